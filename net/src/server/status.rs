//! The data behind `/status` and `GET /api/status`: per-shard snapshots that each shard writes
//! about once a second, read (and summed) only when a status request comes in.
//!
//! Each shard owns one slot behind a `Mutex`. A shard locks only its own slot, once per tick,
//! and a status request locks each slot briefly to copy it: neither is on the data path, and no
//! topic is walked per request (the topic walk, [`engine::ShardState::summary`], runs every
//! [`SUMMARY_EVERY_TICKS`] ticks on the owning shard).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// How often each shard refreshes its slot.
pub(crate) const TICK: Duration = Duration::from_secs(1);
/// The topic walk runs every this many ticks.
pub(crate) const SUMMARY_EVERY_TICKS: u32 = 5;
/// Samples kept for the live charts (one per tick: five minutes).
pub(crate) const HISTORY_SAMPLES_MAX: usize = 300;
/// Topics listed per shard (the page shows the top of their union).
pub(crate) const TOP_TOPICS_MAX: usize = 10;

/// The Postgres Changes part of the status data, from the binary (which knows the replication
/// side; `net` does not).
pub struct StatusHook(pub Box<dyn Fn() -> Value + Send + Sync>);

impl std::fmt::Debug for StatusHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StatusHook")
    }
}

/// One second of one shard.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Sample {
    pub(crate) unix_secs: i64,
    pub(crate) connections: u64,
    pub(crate) channels: u64,
    pub(crate) deliveries_per_second: u64,
    /// Replication lag (bytes), sampled by shard 0 only (it is one number per process).
    pub(crate) replication_lag_bytes: u64,
}

/// A topic in a shard's top list.
#[derive(Debug, Clone)]
pub(crate) struct TopTopic {
    pub(crate) sub_topic: String,
    pub(crate) private: bool,
    pub(crate) subscribers: u64,
}

/// What one shard last reported.
#[derive(Debug, Default)]
pub(crate) struct ShardSlot {
    pub(crate) owned_topics: u64,
    pub(crate) presence_members: u64,
    pub(crate) top_topics: Vec<TopTopic>,
    /// Bounded by [`HISTORY_SAMPLES_MAX`]: the oldest sample goes when a new one comes.
    pub(crate) history: VecDeque<Sample>,
}

/// All shards' slots.
#[derive(Debug)]
pub struct StatusBoard {
    started: Instant,
    pub(crate) shards: Vec<Mutex<ShardSlot>>,
}

impl StatusBoard {
    pub(crate) fn new(shards: usize) -> StatusBoard {
        StatusBoard { started: Instant::now(), shards: (0..shards).map(|_| Mutex::new(ShardSlot::default())).collect() }
    }

    pub(crate) fn push_sample(&self, shard: usize, sample: Sample) {
        let mut slot = self.shards[shard].lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if slot.history.len() == HISTORY_SAMPLES_MAX {
            slot.history.pop_front();
        }
        slot.history.push_back(sample);
    }

    pub(crate) fn set_summary(&self, shard: usize, summary: &engine::shard::ShardSummary) {
        let mut slot = self.shards[shard].lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        slot.owned_topics = summary.owned_topics as u64;
        slot.presence_members = summary.presence_members as u64;
        slot.top_topics = summary
            .top_topics
            .iter()
            .map(|(topic, subscribers)| TopTopic { sub_topic: topic.sub.to_string(), private: topic.private, subscribers: *subscribers as u64 })
            .collect();
    }

    /// The JSON of `GET /api/status`. `postgres` is `None` without a database.
    pub(crate) fn render(&self, now_unix_secs: i64, postgres: Option<Value>) -> Value {
        let mut shards = Vec::with_capacity(self.shards.len());
        let mut top: Vec<TopTopic> = Vec::new();
        let mut history: Vec<Sample> = Vec::new();
        let (mut owned_topics, mut presence_members) = (0, 0);
        for (index, slot) in self.shards.iter().enumerate() {
            let slot = slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let last = slot.history.back().copied().unwrap_or_default();
            shards.push(json!({
                "id": index,
                "connections": last.connections,
                "channels": last.channels,
                "owned_topics": slot.owned_topics,
                "deliveries_per_second": last.deliveries_per_second,
            }));
            owned_topics += slot.owned_topics;
            presence_members += slot.presence_members;
            top.extend(slot.top_topics.iter().cloned());
            merge_history(&mut history, &slot.history);
        }
        top.sort_by(|a, b| b.subscribers.cmp(&a.subscribers).then_with(|| a.sub_topic.cmp(&b.sub_topic)));
        top.truncate(TOP_TOPICS_MAX);
        let sum = |field: fn(&Value) -> u64| shards.iter().map(field).sum::<u64>();
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": self.started.elapsed().as_secs(),
            "now": now_unix_secs,
            "totals": {
                "connections": sum(|s| s["connections"].as_u64().unwrap_or(0)),
                "channels": sum(|s| s["channels"].as_u64().unwrap_or(0)),
                "topics": owned_topics,
                "presence_members": presence_members,
                "deliveries_per_second": sum(|s| s["deliveries_per_second"].as_u64().unwrap_or(0)),
            },
            "shards": shards,
            "top_topics": top.iter().map(|t| json!({"topic": t.sub_topic, "private": t.private, "subscribers": t.subscribers})).collect::<Vec<_>>(),
            "postgres": postgres,
            "history": {
                "interval_seconds": TICK.as_secs(),
                "time": history.iter().map(|s| s.unix_secs).collect::<Vec<_>>(),
                "connections": history.iter().map(|s| s.connections).collect::<Vec<_>>(),
                "channels": history.iter().map(|s| s.channels).collect::<Vec<_>>(),
                "deliveries_per_second": history.iter().map(|s| s.deliveries_per_second).collect::<Vec<_>>(),
                "replication_lag_bytes": history.iter().map(|s| s.replication_lag_bytes).collect::<Vec<_>>(),
            },
        })
    }
}

/// Adds one shard's samples into the node's, second by second (shards tick independently, so
/// samples are matched by their second).
fn merge_history(total: &mut Vec<Sample>, shard: &VecDeque<Sample>) {
    for sample in shard {
        match total.binary_search_by_key(&sample.unix_secs, |s| s.unix_secs) {
            Ok(at) => {
                let merged = &mut total[at];
                merged.connections += sample.connections;
                merged.channels += sample.channels;
                merged.deliveries_per_second += sample.deliveries_per_second;
                merged.replication_lag_bytes += sample.replication_lag_bytes;
            }
            Err(at) => total.insert(at, *sample),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_is_bounded_and_merged_by_second() {
        let board = StatusBoard::new(2);
        for second in 0..(HISTORY_SAMPLES_MAX as i64 + 10) {
            board.push_sample(0, Sample { unix_secs: second, connections: 1, channels: 2, deliveries_per_second: 3, replication_lag_bytes: 0 });
        }
        board.push_sample(1, Sample { unix_secs: HISTORY_SAMPLES_MAX as i64 + 9, connections: 10, channels: 20, deliveries_per_second: 30, replication_lag_bytes: 7 });
        let status = board.render(0, None);
        let connections = status["history"]["connections"].as_array().unwrap();
        assert_eq!(connections.len(), HISTORY_SAMPLES_MAX);
        assert_eq!(connections.last().unwrap(), 11);
        assert_eq!(status["history"]["time"][0], 10, "the oldest samples went first");
        assert_eq!(status["totals"]["connections"], 11);
        assert_eq!(status["totals"]["deliveries_per_second"], 33);
        assert_eq!(status["shards"][1]["channels"], 20);
        assert_eq!(status["postgres"], Value::Null);
        assert_eq!(status["history"]["replication_lag_bytes"].as_array().unwrap().last().unwrap(), 7);
    }

    #[test]
    fn top_topics_are_the_union_of_the_shards_tops() {
        let board = StatusBoard::new(2);
        let topic = |name: &str, n: usize| (engine::TopicKey::new(engine::TenantId::SINGLE, name, false), n);
        let summary = |top: Vec<(engine::TopicKey, usize)>| engine::shard::ShardSummary { owned_topics: top.len(), local_channels: 0, presence_members: 1, top_topics: top };
        board.set_summary(0, &summary(vec![topic("a", 5), topic("b", 1)]));
        board.set_summary(1, &summary(vec![topic("realtime:c", 7)]));
        let status = board.render(0, None);
        assert_eq!(status["top_topics"], json!([
            {"topic": "c", "private": false, "subscribers": 7},
            {"topic": "a", "private": false, "subscribers": 5},
            {"topic": "b", "private": false, "subscribers": 1},
        ]));
        assert_eq!(status["totals"]["topics"], 3);
        assert_eq!(status["totals"]["presence_members"], 2);
    }
}
