//! A tenant's counters, shared by every shard: one cache-line slot per shard, written only by
//! that shard (relaxed atomics), summed by whoever needs the tenant-wide figure (the tenant-wide
//! limits of PROTOCOL.md §9, `/metrics`, the database manager's idle check).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// One shard's share of a tenant's counters.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct ShardSlot {
    /// Open WebSocket connections of the tenant on this shard.
    pub connections: AtomicU64,
    /// Connections with at least one joined channel (the concurrent-users limit counts these).
    pub users: AtomicU64,
    /// Window sums as of this shard's last tick (§9.2): events, joins, presence events.
    pub events_window: AtomicU64,
    /// See `events_window`.
    pub joins_window: AtomicU64,
    /// See `events_window` (Postgres Changes deliveries).
    pub db_events_window: AtomicU64,
    /// REST requests in the last 60 s (1 s buckets), as of this shard's last second.
    pub http_window: AtomicU64,
    /// See `events_window`.
    pub presence_window: AtomicU64,
    /// Totals since start, published by the shard every second (for `/metrics`).
    pub events_total: AtomicU64,
    /// See `events_total`.
    pub joins_total: AtomicU64,
    /// Refusals and channel shutdowns caused by a tenant limit.
    pub limit_hits_total: AtomicU64,
}

/// A tenant's counters: one slot per shard, and the tenant-wide verdicts of the last tick.
#[derive(Debug)]
pub struct TenantCounters {
    slots: Box<[ShardSlot]>,
    /// Cluster mode: the other nodes' sums of `users` and the window fields, as their last
    /// heartbeats said (written by the cluster link; zero on a single node). Tenant-wide
    /// limits decide on local + remote, so they hold cluster-wide with a heartbeat of lag.
    pub remote: ShardSlot,
    /// Whether the tenant's events / joins / presence events per second are triggered, as
    /// decided by the last shard that ticked (every shard decides from the same published sums;
    /// a shard that never saw the tenant before reads them too).
    pub events_exceeded: AtomicBool,
    /// See `events_exceeded`.
    pub joins_exceeded: AtomicBool,
    /// See `events_exceeded` (Postgres Changes: dropped while set).
    pub db_events_exceeded: AtomicBool,
    /// The tenant's REST requests per second, rolling average over 60 s (PROTOCOL.md §8.1).
    pub http_rolling: AtomicU64,
    /// See `events_exceeded`.
    pub presence_exceeded: AtomicBool,
}

impl TenantCounters {
    /// Counters for `shards` shards.
    pub fn new(shards: usize) -> TenantCounters {
        TenantCounters {
            slots: (0..shards.max(1)).map(|_| ShardSlot::default()).collect(),
            remote: ShardSlot::default(),
            events_exceeded: AtomicBool::new(false),
            joins_exceeded: AtomicBool::new(false),
            db_events_exceeded: AtomicBool::new(false),
            http_rolling: AtomicU64::new(0),
            presence_exceeded: AtomicBool::new(false),
        }
    }

    /// Shard `shard`'s slot (an out-of-range shard gets the last slot rather than a panic).
    pub fn slot(&self, shard: usize) -> &ShardSlot {
        &self.slots[shard.min(self.slots.len() - 1)]
    }

    /// The sum of one field over every shard of every node (this node's shards plus the other
    /// nodes' last reported sums).
    pub fn sum(&self, field: impl Fn(&ShardSlot) -> &AtomicU64) -> u64 {
        self.local_sum(&field).saturating_add(field(&self.remote).load(Ordering::Relaxed))
    }

    /// The sum of one field over this node's shards.
    pub fn local_sum(&self, field: impl Fn(&ShardSlot) -> &AtomicU64) -> u64 {
        self.slots.iter().fold(0u64, |sum, slot| sum.saturating_add(field(slot).load(Ordering::Relaxed)))
    }

    /// Tenant-wide (cluster-wide) connected users.
    pub fn users(&self) -> u64 {
        self.sum(|s| &s.users)
    }

    /// Tenant-wide open connections.
    pub fn connections(&self) -> u64 {
        self.sum(|s| &s.connections)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_every_shard() {
        let counters = TenantCounters::new(3);
        counters.slot(0).users.fetch_add(2, Ordering::Relaxed);
        counters.slot(2).users.fetch_add(5, Ordering::Relaxed);
        counters.slot(99).connections.fetch_add(1, Ordering::Relaxed);
        assert_eq!(counters.users(), 7);
        counters.remote.users.store(10, Ordering::Relaxed);
        assert_eq!(counters.users(), 17, "other nodes' users count toward the limit");
        assert_eq!(counters.local_sum(|s| &s.users), 7);
        assert_eq!(counters.connections(), 1);
        assert!(std::mem::size_of::<ShardSlot>().is_multiple_of(64));
    }

    /// Found by the panic review of issue 16: a peer's heartbeat near `u64::MAX` (bytes from
    /// NATS) overflowed the sum (a panic in debug builds, a wrap below the limits in release).
    #[test]
    fn sums_saturate_instead_of_wrapping() {
        let counters = TenantCounters::new(2);
        counters.slot(0).users.store(u64::MAX - 1, Ordering::Relaxed);
        counters.slot(1).users.store(5, Ordering::Relaxed);
        assert_eq!(counters.local_sum(|s| &s.users), u64::MAX);
        counters.remote.users.store(u64::MAX, Ordering::Relaxed);
        assert_eq!(counters.users(), u64::MAX, "still above every limit");
    }
}
