//! `/metrics` (Prometheus text, every name prefixed `realtime_`). One slot per shard, written
//! only by its shard with relaxed atomics and summed when scraped: no atomic is shared between
//! shards on the data path. Gauges that would cost a write per event (joined channels, topics,
//! presence members, queued outbound bytes) are sampled by each shard once a second instead.
//! Labels stay small: `shard`, `reason` (a join error's code), `cause` (why a delivery was
//! dropped) — never a topic or a user. The binary adds the Postgres side through
//! [`MetricsHook`]s. README.md "Metrics" lists every series; a test checks each appears.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use engine::histogram::Histogram;


use super::shard::Shard;

/// How often each shard samples its gauges.
const GAUGE_SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// One client frame in this many (per shard) carries its read time for the delivery latency
/// histogram; each shard that delivers it marks one subscriber's copy.
const LATENCY_SAMPLE_EVERY: u64 = 64;

thread_local! {
    /// Frames read on this shard (a shard is one thread), for the latency sampling.
    static FRAMES_READ: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Microseconds on a process-wide monotonic clock, never 0.
pub(crate) fn now_micros() -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(std::time::Instant::now).elapsed().as_micros() as u64 + 1
}

/// For every [`LATENCY_SAMPLE_EVERY`]th frame read on this shard: the read time to stamp on
/// the broadcasts it publishes.
pub(crate) fn sample_read() -> Option<u64> {
    let n = FRAMES_READ.with(|count| {
        let n = count.get().wrapping_add(1);
        count.set(n);
        n
    });
    n.is_multiple_of(LATENCY_SAMPLE_EVERY).then(now_micros)
}

/// Stamps the broadcasts in `messages` (just built, not shared yet) with their read time.
pub(crate) fn stamp(messages: &mut [(engine::ShardId, engine::ShardMsg)], read_at_micros: u64) {
    for (_, message) in messages {
        if let engine::ShardMsg::Publish { message, .. } = message {
            if let Some(origin) = std::sync::Arc::get_mut(message).and_then(|m| m.origin.as_mut()) {
                origin.read_at_micros = read_at_micros;
            }
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct ShardCounters {
    pub(crate) connections_open: AtomicU64,
    pub(crate) connections_total: AtomicU64,
    pub(crate) broadcasts_in: AtomicU64,
    pub(crate) rest_messages: AtomicU64,
    pub(crate) database_broadcasts: AtomicU64,
    pub(crate) deliveries: AtomicU64,
    pub(crate) presence_diffs: AtomicU64,
    pub(crate) presence_tracks: AtomicU64,
    pub(crate) joins: AtomicU64,
    pub(crate) leaves: AtomicU64,
    pub(crate) slow_consumer_closes: AtomicU64,
    pub(crate) dropped_slow_consumer: AtomicU64,
    pub(crate) dropped_closed: AtomicU64,
    pub(crate) shard_messages_dropped: AtomicU64,
    pub(crate) malformed_frames: AtomicU64,
    /// Sampled gauges.
    pub(crate) channels: AtomicU64,
    pub(crate) topics: AtomicU64,
    pub(crate) presence_members: AtomicU64,
    pub(crate) outbound_bytes: AtomicU64,
    /// Refused joins by code (a fixed set of codes; a refused join is the rare path).
    pub(crate) join_errors: Mutex<BTreeMap<Box<str>, u64>>,
    /// Sampled client broadcasts: sender frame read → subscriber write, observed by the
    /// subscriber's shard.
    pub(crate) delivery_latency: Histogram,
}

/// A renderer the binary adds to `/metrics` (the Postgres side). Appends complete series.
pub struct MetricsHook(pub Box<dyn Fn(&mut String) + Send + Sync>);

impl std::fmt::Debug for MetricsHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MetricsHook")
    }
}

/// All shards' counters.
#[derive(Debug)]
pub struct Metrics {
    pub(crate) shards: Vec<ShardCounters>,
}

pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

pub(crate) fn sub(counter: &AtomicU64, n: u64) {
    counter.fetch_sub(n, Ordering::Relaxed);
}

fn set(gauge: &AtomicU64, n: u64) {
    gauge.store(n, Ordering::Relaxed);
}

/// Writes one unlabelled series with its HELP and TYPE lines.
pub fn series(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
}

impl Metrics {
    pub(crate) fn new(shards: usize) -> Metrics {
        Metrics {
            shards: (0..shards).map(|_| ShardCounters::default()).collect(),
        }
    }

    fn sum(&self, field: impl Fn(&ShardCounters) -> &AtomicU64) -> u64 {
        self.shards.iter().map(|s| field(s).load(Ordering::Relaxed)).sum()
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let rows: [(&str, &str, &str, u64); 19] = [
            ("realtime_connections", "gauge", "Open WebSocket connections", self.sum(|s| &s.connections_open)),
            ("realtime_connections_total", "counter", "WebSocket connections accepted", self.sum(|s| &s.connections_total)),
            ("realtime_channels", "gauge", "Channels on open connections (sampled each second)", self.sum(|s| &s.channels)),
            ("realtime_topics", "gauge", "Topics with at least one subscriber (sampled each second)", self.sum(|s| &s.topics)),
            ("realtime_joins_total", "counter", "Channel joins acknowledged", self.sum(|s| &s.joins)),
            ("realtime_leaves_total", "counter", "Joined channels left (leave, duplicate join, close, server-side close)", self.sum(|s| &s.leaves)),
            ("realtime_broadcasts_received_total", "counter", "Broadcasts received from clients", self.sum(|s| &s.broadcasts_in)),
            ("realtime_rest_messages_total", "counter", "Broadcasts accepted from the REST API", self.sum(|s| &s.rest_messages)),
            ("realtime_database_broadcasts_total", "counter", "Broadcasts read from realtime.messages (realtime.send)", self.sum(|s| &s.database_broadcasts)),
            ("realtime_deliveries_total", "counter", "Frames fanned out to subscribers", self.sum(|s| &s.deliveries)),
            ("realtime_presence_members", "gauge", "Tracked presence members (sampled each second)", self.sum(|s| &s.presence_members)),
            ("realtime_presence_tracks_total", "counter", "Presence track and untrack events accepted from clients", self.sum(|s| &s.presence_tracks)),
            ("realtime_presence_diffs_total", "counter", "presence_diff frames delivered", self.sum(|s| &s.presence_diffs)),
            ("realtime_outbound_queue_bytes", "gauge", "Bytes queued on connections but not written yet (sampled each second)", self.sum(|s| &s.outbound_bytes)),
            ("realtime_slow_consumer_closes_total", "counter", "Connections closed because their outbound queue overflowed", self.sum(|s| &s.slow_consumer_closes)),
            ("realtime_shard_messages_dropped_total", "counter", "Broadcast messages dropped because a peer shard's queue overflowed", self.sum(|s| &s.shard_messages_dropped)),
            ("realtime_malformed_frames_total", "counter", "Client frames dropped as malformed", self.sum(|s| &s.malformed_frames)),
            ("realtime_shards", "gauge", "Engine shards", self.shards.len() as u64),
            ("realtime_process_start_time_seconds", "gauge", "Start time of the process, Unix seconds", process_start_time()),
        ];
        for (name, kind, help, value) in rows {
            series(&mut out, name, kind, help, value);
        }
        let name = "realtime_shard_connections";
        let _ = writeln!(out, "# HELP {name} Open WebSocket connections per shard\n# TYPE {name} gauge");
        for (index, shard) in self.shards.iter().enumerate() {
            let _ = writeln!(out, "{name}{{shard=\"{index}\"}} {}", shard.connections_open.load(Ordering::Relaxed));
        }
        let name = "realtime_deliveries_dropped_total";
        let _ = writeln!(out, "# HELP {name} Frames not delivered, by cause\n# TYPE {name} counter");
        let _ = writeln!(out, "{name}{{cause=\"slow_consumer\"}} {}", self.sum(|s| &s.dropped_slow_consumer));
        let _ = writeln!(out, "{name}{{cause=\"connection_closing\"}} {}", self.sum(|s| &s.dropped_closed));
        let _ = writeln!(out, "{name}{{cause=\"shard_queue\"}} {}", self.sum(|s| &s.shard_messages_dropped));
        let mut errors: BTreeMap<Box<str>, u64> = BTreeMap::new();
        for shard in &self.shards {
            for (reason, count) in shard.join_errors.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                *errors.entry(reason.clone()).or_default() += count;
            }
        }
        let name = "realtime_join_errors_total";
        let _ = writeln!(out, "# HELP {name} Refused joins, by the reason's code\n# TYPE {name} counter");
        for (reason, count) in errors {
            let _ = writeln!(out, "{name}{{reason=\"{reason}\"}} {count}");
        }
        Histogram::render(
            "realtime_delivery_latency_seconds",
            "Sampled client broadcasts: sender frame read to subscriber socket write",
            self.shards.iter().map(|s| &s.delivery_latency),
            &mut out,
        );
        process_metrics(&mut out);
        out
    }
}

/// RSS, CPU time and open descriptors of this process, from /proc (Linux).
fn process_metrics(out: &mut String) {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    // SAFETY: as above.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    if let Ok(statm) = std::fs::read_to_string("/proc/self/statm") {
        if let Some(resident) = statm.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()) {
            series(out, "realtime_process_resident_memory_bytes", "gauge", "Resident memory", resident * page);
        }
    }
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // Fields after the command name (which may hold spaces): utime and stime are the 12th
        // and 13th of them.
        let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
        if let (Some(user), Some(system)) = (fields.get(11).and_then(|v| v.parse::<u64>().ok()), fields.get(12).and_then(|v| v.parse::<u64>().ok())) {
            series(out, "realtime_process_cpu_seconds_total", "counter", "User and system CPU time", (user + system) as f64 / ticks);
        }
    }
    if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
        series(out, "realtime_process_open_fds", "gauge", "Open file descriptors", entries.count());
    }
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        series(out, "realtime_process_max_fds", "gauge", "The open-file limit", limit.rlim_cur);
    }
}

fn process_start_time() -> u64 {
    static START: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *START.get_or_init(|| super::conn::unix_now() as u64)
}

impl Shard {
    /// Once a second: this shard's gauges that would cost a write per event.
    pub(crate) async fn sample_gauges(self: Rc<Self>) {
        process_start_time();
        loop {
            let (mut channels, mut outbound) = (0u64, 0u64);
            for conn in self.conns.borrow().values() {
                channels += conn.session.borrow().channel_count() as u64;
                outbound += conn.outbox.queued_bytes() as u64;
            }
            let counters = self.counters();
            set(&counters.channels, channels);
            set(&counters.outbound_bytes, outbound);
            {
                let state = self.state.borrow();
                set(&counters.topics, state.owned_topics() as u64);
                set(&counters.presence_members, state.presence_members() as u64);
            }
            glommio::timer::sleep(GAUGE_SAMPLE_INTERVAL).await;
        }
    }

    /// A sampled frame was written: record its latency.
    pub(crate) fn observe_delivery(&self, read_at_micros: u64) {
        self.counters().delivery_latency.observe(now_micros().saturating_sub(read_at_micros));
    }

    /// Counts refused joins by code.
    pub(crate) fn count_join_errors(&self, codes: &[Box<str>]) {
        let mut errors = self.counters().join_errors.lock().unwrap_or_else(|p| p.into_inner());
        for code in codes {
            *errors.entry(code.clone()).or_default() += 1;
        }
    }
}

