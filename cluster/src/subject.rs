//! NATS subjects: every one starts with the cluster name (`REALTIME_CLUSTER`).
//!
//! A topic's subject is `<cluster>.t.<tenant>.<kind><hash>`: the tenant's external id when it is
//! a plain token (`[A-Za-z0-9_-]`, at most 64 bytes; `_` for single-tenant mode), else `=` and
//! a hash of it; the kind is `p` (private) or `u` (public); the hash is xxh3-64 of the
//! sub-topic in hex. Channel names may hold any character and be long, which subjects may not:
//! the hash keeps every subject short and valid, and the message itself carries the sub-topic,
//! so the (2^-64) chance of two topics sharing a subject is caught by comparing it.

use xxhash_rust::xxh3::xxh3_64;

/// The longest tenant external id used as is in a subject.
const TENANT_TOKEN_MAX: usize = 64;

/// Whether `name` can be a cluster name (one subject token).
pub fn valid_cluster_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= TENANT_TOKEN_MAX && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The subject token for a tenant's external id.
pub fn tenant_token(external_id: &str) -> String {
    if external_id.is_empty() {
        return "_".to_owned();
    }
    if external_id.len() <= TENANT_TOKEN_MAX && external_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        return external_id.to_owned();
    }
    format!("={:016x}", xxh3_64(external_id.as_bytes()))
}

/// The subject a topic's broadcasts and presence changes travel on.
pub fn topic(cluster: &str, tenant_external_id: &str, private: bool, sub: &str) -> String {
    format!("{cluster}.t.{}.{}{:016x}", tenant_token(tenant_external_id), if private { 'p' } else { 'u' }, xxh3_64(sub.as_bytes()))
}

/// Presence sync requests (every node subscribes; the message names the topic).
pub fn sync(cluster: &str) -> String {
    format!("{cluster}.sync")
}

/// Node heartbeats and goodbyes.
pub fn heartbeat(cluster: &str) -> String {
    format!("{cluster}.hb")
}

/// This node's inbox for sync answers (`<inbox>.<request>`); subscribed as `<inbox>.*`.
pub fn inbox(cluster: &str, incarnation: u32) -> String {
    format!("{cluster}.inbox.{incarnation:08x}")
}

/// Postgres Changes subscription changes for the node `incarnation` (it leads their database).
pub fn pg_commands(cluster: &str, incarnation: u32) -> String {
    format!("{cluster}.pgc.{incarnation:08x}")
}

/// The leader's Postgres Changes messages for the node `incarnation`'s channels.
pub fn pg_out(cluster: &str, incarnation: u32) -> String {
    format!("{cluster}.pgo.{incarnation:08x}")
}

/// A subject nobody subscribes: a request to it comes back as "no responders" once the NATS
/// server has processed everything this connection sent before it (the round trip that
/// confirms a subscription).
pub fn barrier(cluster: &str, incarnation: u32) -> String {
    format!("{cluster}.barrier.{incarnation:08x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_valid_tokens_whatever_the_names() {
        let subject = topic("powa", "acme", false, "room.with spaces*and>wildcards");
        assert!(subject.starts_with("powa.t.acme.u"));
        assert_eq!(subject.split('.').count(), 4);
        assert!(!subject.contains(' ') && !subject.contains('*') && !subject.contains('>'));
        assert_ne!(topic("powa", "acme", false, "room"), topic("powa", "acme", true, "room"));
        assert_ne!(topic("powa", "acme", false, "room"), topic("powa", "other", false, "room"));
        assert_eq!(tenant_token(""), "_");
        assert!(tenant_token("a.b").starts_with('='));
        assert!(tenant_token(&"x".repeat(65)).starts_with('='));
        assert!(valid_cluster_name("powa-1") && !valid_cluster_name("a.b") && !valid_cluster_name(""));
    }

    #[test]
    fn the_hash_is_fixed_across_builds() {
        // Nodes of different builds and machines must agree on subjects.
        // Nodes of different builds and machines must agree on subjects: xxh3 is specified, so
        // the value is a constant.
        assert_eq!(topic("powa", "acme", false, "room"), "powa.t.acme.u06d19c8d94228de3");
    }
}
