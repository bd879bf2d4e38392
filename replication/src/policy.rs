//! Private-channel authorization (PROTOCOL.md §6.5–6.6): RLS policies on `realtime.messages`
//! decide who may read (join, receive) and write (send, track) a topic.
//!
//! Each check is one round trip: a transaction that inserts probe rows as the server (read
//! checks) or asks `realtime.powa_can_insert` as the subscriber (write checks), sets the
//! subscriber's role and claims, reads the answer, and rolls back. Nothing is ever committed,
//! so a probe never reaches the replication stream or a subscriber.
//!
//! The core caches answers (see [`CACHE_ENTRIES_MAX`], [`CACHE_TTL`]) and runs concurrent
//! identical checks once, so a join storm of 5,000 private joins with the same claims costs one
//! query.

use std::time::Duration;

use tokio_postgres::{Client, SimpleQueryMessage};

use crate::sql::{self, literal, SqlError};

/// Cache bound: beyond it the cache is cleared (checks are cheap; the bound keeps memory flat
/// under a storm of distinct claims).
pub const CACHE_ENTRIES_MAX: usize = 65_536;

/// How long an answer is reused for *new* joins and sends (an already-joined channel keeps its
/// answer until it rejoins or refreshes its token, as upstream). Policy edits reach new joins
/// within this time.
pub const CACHE_TTL: Duration = Duration::from_secs(30);

pub use engine::changes::{AuthzRequest, AuthzResult, CheckKind};

fn settings(request: &AuthzRequest) -> String {
    format!(
        "SELECT 'cfg', set_config('role', {role}, true), set_config('realtime.topic', {topic}, true), \
         set_config('request.jwt.claims', {claims}, true), set_config('request.jwt.claim.sub', {sub}, true), \
         set_config('request.jwt.claim.role', {role}, true), set_config('request.headers', '{{}}', true); ",
        role = literal(&request.role),
        topic = literal(&request.topic),
        claims = literal(&request.claims_json),
        sub = literal(request.sub.as_deref().unwrap_or("")),
    )
}

/// Runs one check.
pub async fn check(client: &Client, request: &AuthzRequest) -> AuthzResult {
    match run(client, request).await {
        Ok(result) => result,
        Err(error) => {
            let _ = client.batch_execute("ROLLBACK").await;
            AuthzResult::failed(sql::error_text(&error))
        }
    }
}

async fn run(client: &Client, request: &AuthzRequest) -> Result<AuthzResult, SqlError> {
    let sql = match request.kind {
        CheckKind::Read => {
            let broadcast_id = uuid::Uuid::new_v4().to_string();
            let presence_id = uuid::Uuid::new_v4().to_string();
            let topic = literal(&request.topic);
            let now = "(now() at time zone 'utc')";
            format!(
                "BEGIN; \
                 INSERT INTO realtime.messages (id, topic, extension, inserted_at, updated_at) VALUES \
                 ('{broadcast_id}', {topic}, 'broadcast', {now}, {now}), ('{presence_id}', {topic}, 'presence', {now}, {now}); \
                 {settings}\
                 SELECT 'granted', extension FROM realtime.messages WHERE id IN ('{broadcast_id}', '{presence_id}'); \
                 ROLLBACK;",
                settings = settings(request)
            )
        }
        CheckKind::Write => format!(
            "BEGIN; {settings}SELECT 'granted', 'broadcast' WHERE realtime.powa_can_insert({topic}, 'broadcast') \
             UNION ALL SELECT 'granted', 'presence' WHERE realtime.powa_can_insert({topic}, 'presence'); ROLLBACK;",
            settings = settings(request),
            topic = literal(&request.topic)
        ),
    };
    let mut result = AuthzResult { broadcast: false, presence: false, error: None };
    for message in client.simple_query(&sql).await? {
        if let SimpleQueryMessage::Row(row) = message {
            if row.get(0) == Some("granted") {
                match row.get(1) {
                    Some("broadcast") => result.broadcast = true,
                    Some("presence") => result.presence = true,
                    _ => {}
                }
            }
        }
    }
    Ok(result)
}
