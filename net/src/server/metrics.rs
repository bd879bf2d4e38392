//! Counters for `/metrics` (Prometheus text). One slot per shard, written only by its shard
//! with relaxed atomics and summed when scraped: the only atomics in the data path.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub(crate) struct ShardCounters {
    pub(crate) connections_open: AtomicU64,
    pub(crate) connections_total: AtomicU64,
    pub(crate) broadcasts_in: AtomicU64,
    pub(crate) deliveries: AtomicU64,
    pub(crate) slow_consumer_closes: AtomicU64,
    pub(crate) shard_messages_dropped: AtomicU64,
    pub(crate) malformed_frames: AtomicU64,
}

/// All shards' counters.
#[derive(Debug)]
pub struct Metrics {
    pub(crate) shards: Vec<ShardCounters>,
    /// Each shard's presence events in the last 60 s, published every rate tick: the tenant-wide
    /// presence rate is their sum (read by every shard).
    pub(crate) presence_window_sums: Vec<AtomicU64>,
}

pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

pub(crate) fn sub(counter: &AtomicU64, n: u64) {
    counter.fetch_sub(n, Ordering::Relaxed);
}

impl Metrics {
    pub(crate) fn new(shards: usize) -> Metrics {
        Metrics {
            shards: (0..shards).map(|_| ShardCounters::default()).collect(),
            presence_window_sums: (0..shards).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn sum(&self, field: impl Fn(&ShardCounters) -> &AtomicU64) -> u64 {
        self.shards.iter().map(|s| field(s).load(Ordering::Relaxed)).sum()
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let rows: [(&str, &str, &str, u64); 7] = [
            ("realtime_connections", "gauge", "Open WebSocket connections", self.sum(|s| &s.connections_open)),
            ("realtime_connections_total", "counter", "WebSocket connections accepted", self.sum(|s| &s.connections_total)),
            ("realtime_broadcasts_received_total", "counter", "Broadcasts received from clients", self.sum(|s| &s.broadcasts_in)),
            ("realtime_deliveries_total", "counter", "Frames fanned out to subscribers", self.sum(|s| &s.deliveries)),
            ("realtime_slow_consumer_closes_total", "counter", "Connections closed because their outbound queue overflowed", self.sum(|s| &s.slow_consumer_closes)),
            ("realtime_shard_messages_dropped_total", "counter", "Broadcast messages dropped because a peer shard's queue overflowed", self.sum(|s| &s.shard_messages_dropped)),
            ("realtime_malformed_frames_total", "counter", "Client frames dropped as malformed", self.sum(|s| &s.malformed_frames)),
        ];
        for (name, kind, help, value) in rows {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        }
        out
    }
}
