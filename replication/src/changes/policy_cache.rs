//! The policy-check cache (PROTOCOL.md §6.6): answers reused for [`CACHE_TTL`], at most
//! [`CACHE_ENTRIES_MAX`] entries (beyond, the cache is cleared), and identical checks in flight
//! run once (single flight). Pure: the caller passes `now` and runs the query it is told to.

use std::time::Instant;

use ahash::AHashMap;

use super::AuthzReply;
use crate::policy::{AuthzRequest, AuthzResult, CACHE_ENTRIES_MAX, CACHE_TTL};

/// What to do with a check request.
#[derive(Debug)]
pub(crate) enum Lookup {
    /// Answer at once from the cache.
    Answer(AuthzRequest, AuthzReply, AuthzResult),
    /// Run this check, then call [`PolicyCache::complete`].
    Query(AuthzRequest),
    /// The same check is running: the reply waits for it.
    Wait,
}

/// Cached answers and waiting replies.
#[derive(Debug, Default)]
pub(crate) struct PolicyCache {
    entries: AHashMap<AuthzRequest, (Instant, AuthzResult)>,
    inflight: AHashMap<AuthzRequest, Vec<AuthzReply>>,
}

impl PolicyCache {
    /// A check is asked for at `now`.
    pub(crate) fn request(&mut self, request: AuthzRequest, reply: AuthzReply, now: Instant) -> Lookup {
        let fresh = self.entries.get(&request).filter(|(at, result)| now.saturating_duration_since(*at) < CACHE_TTL && result.error.is_none());
        if let Some((_, result)) = fresh {
            let result = result.clone();
            return Lookup::Answer(request, reply, result);
        }
        if let Some(waiters) = self.inflight.get_mut(&request) {
            waiters.push(reply);
            return Lookup::Wait;
        }
        self.inflight.insert(request.clone(), vec![reply]);
        Lookup::Query(request)
    }

    /// The check ran: cache the answer (errors too, but they are never reused) and return the
    /// replies waiting for it.
    pub(crate) fn complete(&mut self, request: &AuthzRequest, result: &AuthzResult, now: Instant) -> Vec<AuthzReply> {
        if self.entries.len() >= CACHE_ENTRIES_MAX {
            self.entries.clear();
        }
        self.entries.insert(request.clone(), (now, result.clone()));
        self.inflight.remove(request).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::changes::ChannelKey;
    use crate::policy::CheckKind;
    use engine::{ChannelSerial, ConnId, ShardId};

    fn request(topic: &str) -> AuthzRequest {
        AuthzRequest { role: "authenticated".into(), claims_json: "{}".into(), sub: None, topic: topic.into(), kind: CheckKind::Read }
    }

    fn reply(n: u32) -> AuthzReply {
        AuthzReply::Channel(ChannelKey { shard: ShardId(0), conn: ConnId(1), channel: ChannelSerial(n) })
    }

    fn granted() -> AuthzResult {
        AuthzResult { broadcast: true, presence: false, error: None }
    }

    #[test]
    fn single_flight_then_cached_until_the_ttl() {
        let mut cache = PolicyCache::default();
        let t0 = Instant::now();
        assert!(matches!(cache.request(request("a"), reply(1), t0), Lookup::Query(_)));
        assert!(matches!(cache.request(request("a"), reply(2), t0), Lookup::Wait));
        assert!(matches!(cache.request(request("b"), reply(3), t0), Lookup::Query(_)), "another topic is another check");
        let waiters = cache.complete(&request("a"), &granted(), t0);
        assert_eq!(waiters.len(), 2, "both replies get the one answer");
        assert!(matches!(cache.request(request("a"), reply(4), t0 + CACHE_TTL - Duration::from_millis(1)), Lookup::Answer(_, _, r) if r == granted()));
        assert!(matches!(cache.request(request("a"), reply(5), t0 + CACHE_TTL), Lookup::Query(_)), "stale after the TTL");
    }

    #[test]
    fn failed_checks_are_not_reused() {
        let mut cache = PolicyCache::default();
        let t0 = Instant::now();
        cache.request(request("a"), reply(1), t0);
        cache.complete(&request("a"), &AuthzResult::failed("db down".into()), t0);
        assert!(matches!(cache.request(request("a"), reply(2), t0), Lookup::Query(_)));
    }
}
