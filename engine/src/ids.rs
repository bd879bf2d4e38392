//! Newtypes for the ids that cross module boundaries.

/// Index of a shard (one glommio executor), `0..shards`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardId(pub u16);

/// A connection, unique within the shard that accepted it (a shard never reuses one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// One join of one channel on one connection. A re-join of the same topic gets a new serial,
/// so a late message addressed to the old join can never reach the new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelSerial(pub u32);

/// A tenant (project), numbered by the process: the same external id keeps its number across
/// reloads. Single-tenant mode has one tenant, [`TenantId::SINGLE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct TenantId(pub u32);

impl TenantId {
    /// The one tenant of single-tenant mode.
    pub const SINGLE: TenantId = TenantId(0);
}

impl ShardId {
    /// As an index into per-shard arrays.
    pub fn index(self) -> usize {
        usize::from(self.0)
    }
}
