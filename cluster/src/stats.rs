//! What the link reports: counters (relaxed atomics, written by the link thread and the shards'
//! senders) and the list of live nodes, read by `/metrics`, `/api/status` and `/healthz`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

/// One live node as this node last heard it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// Its `REALTIME_NODE_ID`.
    pub node: String,
    /// Its incarnation.
    pub incarnation: u32,
    /// Milliseconds since its last heartbeat.
    pub last_seen_ms: u64,
}

/// The link's counters.
#[derive(Debug, Default)]
pub struct Stats {
    /// Whether the NATS connection is up (false: degraded, local delivery only).
    pub connected: AtomicBool,
    /// Messages and bytes published to NATS.
    pub messages_out: AtomicU64,
    /// Bytes published.
    pub bytes_out: AtomicU64,
    /// Messages received from NATS.
    pub messages_in: AtomicU64,
    /// Bytes received.
    pub bytes_in: AtomicU64,
    /// Broadcasts delivered locally only: NATS was unreachable, the link's queue was full, or
    /// the message was larger than the NATS server's `max_payload`.
    pub dropped_out: AtomicU64,
    /// Broadcasts from other nodes dropped because a shard's inbox was full.
    pub dropped_in: AtomicU64,
    /// Messages from NATS that did not decode (another version, or not ours).
    pub malformed_in: AtomicU64,
    /// Topics with a NATS subscription (this node has subscribers).
    pub routed_topics: AtomicU64,
    /// Presence syncs run, and those that ended at their deadline with answers missing.
    pub syncs: AtomicU64,
    /// Syncs that ended at their deadline.
    pub sync_timeouts: AtomicU64,
    /// Times the NATS connection came back after being lost.
    pub reconnects: AtomicU64,
    /// Nodes declared gone (timeout or goodbye).
    pub nodes_gone: AtomicU64,
    /// Times the NATS client's connection task ended (a panic inside it) and the link made a
    /// new client.
    pub link_restarts: AtomicU64,
    nodes: Mutex<Vec<NodeInfo>>,
    /// Database streams per tenant (external id, `""` in single-tenant mode): the leader node's
    /// name, or `None` when no leader is known.
    leaders: Mutex<Vec<(String, Option<String>)>>,
}

impl Stats {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    /// Whether the NATS connection is up.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Relaxed)
    }

    /// Replaces the node list (the link does it on every sweep).
    pub(crate) fn set_nodes(&self, nodes: Vec<NodeInfo>) {
        *self.nodes.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = nodes;
    }

    /// Replaces the leaders list (the link does it whenever it recomputes them).
    pub(crate) fn set_leaders(&self, leaders: Vec<(String, Option<String>)>) {
        *self.leaders.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = leaders;
    }

    /// The leader of each tenant database this node routes (external id, leader node name).
    pub fn leaders(&self) -> Vec<(String, Option<String>)> {
        self.leaders.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// The other live nodes.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        self.nodes.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// The `/metrics` series (Prometheus text).
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        let gauge = |out: &mut String, name: &str, help: &str, value: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
        };
        let counter = |out: &mut String, name: &str, help: &str, value: &AtomicU64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", value.load(Relaxed));
        };
        gauge(out, "realtime_cluster_connected", "1 while the NATS connection is up (0: degraded, local delivery only).", u64::from(self.is_connected()));
        gauge(out, "realtime_cluster_nodes", "Nodes of the cluster this node hears, itself included.", self.nodes().len() as u64 + 1);
        gauge(out, "realtime_cluster_routed_topics", "Topics this node receives from NATS (it has subscribers).", self.routed_topics.load(Relaxed));
        counter(out, "realtime_cluster_messages_out_total", "Messages published to NATS.", &self.messages_out);
        counter(out, "realtime_cluster_bytes_out_total", "Bytes published to NATS.", &self.bytes_out);
        counter(out, "realtime_cluster_messages_in_total", "Messages received from NATS.", &self.messages_in);
        counter(out, "realtime_cluster_bytes_in_total", "Bytes received from NATS.", &self.bytes_in);
        counter(out, "realtime_cluster_dropped_out_total", "Broadcasts delivered on this node only (NATS unreachable, queue full or too large).", &self.dropped_out);
        counter(out, "realtime_cluster_dropped_in_total", "Broadcasts from other nodes dropped (a shard's inbox was full).", &self.dropped_in);
        counter(out, "realtime_cluster_malformed_in_total", "Messages from NATS that did not decode.", &self.malformed_in);
        counter(out, "realtime_cluster_syncs_total", "Presence syncs with the other nodes.", &self.syncs);
        counter(out, "realtime_cluster_sync_timeouts_total", "Presence syncs that ended at their deadline with answers missing.", &self.sync_timeouts);
        counter(out, "realtime_cluster_reconnects_total", "Times the NATS connection came back.", &self.reconnects);
        counter(out, "realtime_cluster_nodes_gone_total", "Nodes declared gone (timeout or goodbye).", &self.nodes_gone);
        counter(out, "realtime_cluster_link_restarts_total", "Times the NATS client failed inside (a panic in its connection task) and the link connected again.", &self.link_restarts);
    }
}
