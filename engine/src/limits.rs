//! Every bound the server enforces, in one struct.
//!
//! Defaults are PROTOCOL.md §9's values; the tenant-wide aggregate limits default to 0
//! (unlimited) in single-tenant mode (CONTRACT.md). Each bound is named with its unit last.

use std::time::Duration;

/// Largest WebSocket message (after reassembling fragments) the server accepts: PROTOCOL.md
/// §1.11. Larger → close 1009.
pub const WS_MESSAGE_BYTES_MAX: usize = 5_000_000;

/// Bytes of frames a connection may have queued but not yet written. A subscriber that falls
/// this far behind is disconnected (close 1008 "slow consumer") instead of growing memory or
/// stalling its shard. Two maximal payloads fit, so one large broadcast never trips it alone.
pub const OUTBOUND_QUEUED_BYTES_MAX: usize = 2 * WS_MESSAGE_BYTES_MAX + 1024 * 1024;

/// Capacity (messages) of each cross-shard SPSC queue.
pub const SHARD_QUEUE_MESSAGES_MAX: usize = 4096;

/// Messages one shard may hold for a peer whose queue is full before it drops *broadcast
/// deliveries* to it (control messages are never dropped; they are bounded by connection and
/// channel counts).
pub const SHARD_OVERFLOW_MESSAGES_MAX: usize = 65_536;

/// Cluster mode: node incarnations an owner shard remembers as gone (to ignore their late
/// presence); the oldest is forgotten first.
pub const GONE_NODES_REMEMBERED_MAX: usize = 1024;

/// Longest HTTP request head the server reads (PROTOCOL.md §9.1 header limit is per value;
/// the whole head gets a bit more).
pub const HTTP_HEAD_BYTES_MAX: usize = 16 * 1024;

/// Longest channel topic a join may name, as sent (`realtime:` prefix included): the most a
/// V2 binary frame can carry (its topic length is one byte, PROTOCOL.md §1.6.2), so every
/// joined topic can be delivered in every format. Longer joins get
/// [`crate::client_error::JoinError::TopicNameTooLong`].
pub const TOPIC_BYTES_MAX: usize = 255;

/// Longest a private channel's join waits for its policy check (and replay) from the database;
/// past it the join fails with `UnableToConnectToProject` (PROTOCOL.md §2.5) and the channel
/// slot is freed, whatever the database does later.
pub const AUTHORIZE_TIMEOUT_SECS: i64 = 15;

/// Postgres Changes bindings one join may carry (upstream has no bound; each binding costs
/// metadata queries on the single changes thread). Beyond: the join fails with
/// `PostgresChangesBindingsLimit` (see `client_error::JoinError::TooManyBindings`).
pub const BINDINGS_PER_JOIN_MAX: usize = 100;

/// Join error replies one connection may have waiting out `REALTIME_JOIN_ERROR_DELAY_MS` (one
/// timer each). Beyond: the reply is sent at once, so a client that fails joins faster than the
/// delay costs no more timers.
pub const DELAYED_JOIN_ERRORS_PER_CONNECTION_MAX: u32 = 32;

/// Presence frames a channel may send per [`PRESENCE_WINDOW`] (upstream
/// `CLIENT_PRESENCE_MAX_CALLS`); the next one closes the channel (PROTOCOL.md §4.6).
pub const PRESENCE_CALLS_PER_WINDOW_MAX: u32 = 5;

/// The per-channel presence window (upstream `CLIENT_PRESENCE_WINDOW_MS`).
pub const PRESENCE_WINDOW: Duration = Duration::from_secs(30);

/// Largest REST body.
pub const HTTP_BODY_BYTES_MAX: usize = WS_MESSAGE_BYTES_MAX;

/// Default presence coalescing window: short enough to be invisible in a who-is-online list,
/// long enough that a burst of N joins to one topic costs each member a handful of diffs instead
/// of N (measured in benches/RESULTS.md, "Presence churn").
pub const PRESENCE_COALESCE_DEFAULT_MS: u64 = 50;

const _: () = assert!(OUTBOUND_QUEUED_BYTES_MAX > WS_MESSAGE_BYTES_MAX);
const _: () = assert!(SHARD_OVERFLOW_MESSAGES_MAX >= SHARD_QUEUE_MESSAGES_MAX);

/// Runtime-configurable limits (`REALTIME_MAX_*`, CONTRACT.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Connections with at least one joined channel; 0 = unlimited.
    pub concurrent_users_max: u32,
    /// Tenant events per second (rolling 60 s average); 0 = unlimited.
    pub events_per_second_max: u32,
    /// Tenant joins per second; 0 = unlimited.
    pub joins_per_second_max: u32,
    /// Tenant presence events per second; 0 = unlimited.
    pub presence_events_per_second_max: u32,
    /// Joined channels per connection.
    pub channels_per_client_max: u32,
    /// Largest user payload of a broadcast or presence track, bytes.
    pub payload_bytes_max: usize,
    /// A connection that sends nothing for this long is closed with 1000.
    pub idle_timeout: Duration,
    /// Delay before a join error reply (upstream `CHANNEL_ERROR_BACKOFF_MS`).
    pub join_error_delay: Duration,
    /// Delay before a failed upgrade's response (upstream `CONNECT_ERROR_BACKOFF_MS`).
    pub connect_error_delay: Duration,
    /// Presence diffs of one topic are merged over this window (0 = send each change at once,
    /// as upstream). See README "Presence".
    pub presence_coalesce: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            concurrent_users_max: 0,
            events_per_second_max: 0,
            joins_per_second_max: 0,
            presence_events_per_second_max: 0,
            channels_per_client_max: 100,
            payload_bytes_max: 3_000_000,
            idle_timeout: Duration::from_secs(60),
            join_error_delay: Duration::from_millis(5000),
            connect_error_delay: Duration::from_millis(2000),
            presence_coalesce: Duration::from_millis(PRESENCE_COALESCE_DEFAULT_MS),
        }
    }
}

/// A limit whose value breaks a relation with another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitsError(pub String);

impl std::fmt::Display for LimitsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LimitsError {}

impl Limits {
    /// Checks the relations between limits at start-up.
    pub fn validate(&self) -> Result<(), LimitsError> {
        if self.payload_bytes_max == 0 || self.payload_bytes_max > WS_MESSAGE_BYTES_MAX {
            return Err(LimitsError(format!(
                "REALTIME_MAX_PAYLOAD_BYTES must be in 1..={WS_MESSAGE_BYTES_MAX} (a payload travels in one WebSocket message)"
            )));
        }
        if self.channels_per_client_max == 0 {
            return Err(LimitsError("REALTIME_MAX_CHANNELS_PER_CLIENT must be at least 1".into()));
        }
        if self.presence_coalesce > Duration::from_secs(5) {
            return Err(LimitsError("REALTIME_PRESENCE_COALESCE_MS must be at most 5000".into()));
        }
        if self.idle_timeout < Duration::from_secs(1) {
            return Err(LimitsError("REALTIME_IDLE_TIMEOUT_SECS must be at least 1".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_match_the_contract() {
        let limits = Limits::default();
        limits.validate().unwrap();
        assert_eq!(limits.channels_per_client_max, 100);
        assert_eq!(limits.payload_bytes_max, 3_000_000);
        assert_eq!(limits.idle_timeout, Duration::from_secs(60));
    }

    #[test]
    fn rejects_payload_limit_above_frame_limit() {
        let limits = Limits { payload_bytes_max: WS_MESSAGE_BYTES_MAX + 1, ..Limits::default() };
        assert!(limits.validate().is_err());
    }
}
