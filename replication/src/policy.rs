//! Private-channel authorization (PROTOCOL.md §6.5–6.6): RLS policies on `realtime.messages`
//! decide who may read (join, receive) and write (send, track) a topic.
//!
//! Each check is a transaction that inserts probe rows as the server (read checks) or asks
//! `realtime.powa_can_insert` as the subscriber (write checks), sets the subscriber's role and
//! claims, reads the answer, and rolls back: prepared statements with bound parameters,
//! pipelined (two round trips: prepare, then the whole transaction). Nothing is ever committed,
//! so a probe never reaches the replication stream or a subscriber.
//!
//! The core caches answers (see [`CACHE_ENTRIES_MAX`], [`CACHE_TTL`]) and runs concurrent
//! identical checks once, so a join storm of 5,000 private joins with the same claims costs one
//! query.

use std::time::Duration;

use tokio_postgres::Client;

use crate::sql::{self, SqlError};

/// Cache bound: beyond it the cache is cleared (checks are cheap; the bound keeps memory flat
/// under a storm of distinct claims).
pub const CACHE_ENTRIES_MAX: usize = 65_536;

/// How long an answer is reused for *new* joins and sends (an already-joined channel keeps its
/// answer until it rejoins or refreshes its token, as upstream). Policy edits reach new joins
/// within this time.
pub const CACHE_TTL: Duration = Duration::from_secs(30);

pub use engine::changes::{AuthzRequest, AuthzResult, CheckKind};

/// The subscriber's role and claims, as `realtime.topic()` and `auth.*()` read them: `$1` role,
/// `$2` topic, `$3` claims JSON, `$4` the `sub` claim.
const SETTINGS: &str = "SELECT set_config('role', $1, true), set_config('realtime.topic', $2, true), \
     set_config('request.jwt.claims', $3, true), set_config('request.jwt.claim.sub', $4, true), \
     set_config('request.jwt.claim.role', $1, true), set_config('request.headers', '{}', true)";

/// Read check, step 1 (as the server): one probe row per extension (`$1`, `$3` ids, `$2` topic).
const PROBES: &str = "INSERT INTO realtime.messages (id, topic, extension, inserted_at, updated_at) VALUES \
     ($1::text::uuid, $2, 'broadcast', now() at time zone 'utc', now() at time zone 'utc'), \
     ($3::text::uuid, $2, 'presence', now() at time zone 'utc', now() at time zone 'utc')";

/// Read check, step 2 (as the subscriber): which probes its SELECT policies let it see.
const VISIBLE_PROBES: &str = "SELECT extension::text FROM realtime.messages WHERE id IN ($1::text::uuid, $2::text::uuid)";

/// Write check (as the subscriber): which extensions its INSERT policies allow on topic `$1`.
const WRITABLE: &str = "SELECT 'broadcast'::text WHERE realtime.powa_can_insert($1, 'broadcast') \
     UNION ALL SELECT 'presence'::text WHERE realtime.powa_can_insert($1, 'presence')";

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

/// One check, pipelined: the statements are prepared (one round trip), then `BEGIN`, the
/// steps and `ROLLBACK` are all sent before any answer is read (one more). Every value is a
/// bound parameter.
async fn run(client: &Client, request: &AuthzRequest) -> Result<AuthzResult, SqlError> {
    use std::future::Future;
    use std::pin::Pin;

    type Step<'a> = Pin<Box<dyn Future<Output = Result<Option<Vec<tokio_postgres::Row>>, SqlError>> + 'a>>;
    let sub = request.sub.as_deref().unwrap_or("");
    let (role, topic, claims) = (request.role.as_str(), request.topic.as_str(), request.claims_json.as_str());
    let settings = client.prepare(SETTINGS);
    let (broadcast_id, presence_id) = (uuid::Uuid::new_v4().to_string(), uuid::Uuid::new_v4().to_string());
    let mut steps: Vec<Step<'_>> = Vec::with_capacity(5);
    match request.kind {
        CheckKind::Read => {
            let (settings, probes, visible) = futures_util::future::try_join3(settings, client.prepare(PROBES), client.prepare(VISIBLE_PROBES)).await?;
            let (broadcast_id, presence_id) = (&broadcast_id, &presence_id);
            steps.push(Box::pin(async { client.simple_query("BEGIN").await.map(|_| None) }));
            steps.push(Box::pin(async move { client.query(&probes, &[broadcast_id, &topic, presence_id]).await.map(|_| None) }));
            steps.push(Box::pin(async move { client.query(&settings, &[&role, &topic, &claims, &sub]).await.map(|_| None) }));
            steps.push(Box::pin(async move { client.query(&visible, &[broadcast_id, presence_id]).await.map(Some) }));
        }
        CheckKind::Write => {
            let (settings, writable) = futures_util::future::try_join(settings, client.prepare(WRITABLE)).await?;
            steps.push(Box::pin(async { client.simple_query("BEGIN").await.map(|_| None) }));
            steps.push(Box::pin(async move { client.query(&settings, &[&role, &topic, &claims, &sub]).await.map(|_| None) }));
            steps.push(Box::pin(async move { client.query(&writable, &[&topic]).await.map(Some) }));
        }
    }
    steps.push(Box::pin(async { client.simple_query("ROLLBACK").await.map(|_| None) }));
    let mut result = AuthzResult { broadcast: false, presence: false, error: None };
    for outcome in futures_util::future::join_all(steps).await {
        let Some(rows) = outcome? else { continue };
        for row in rows {
            match row.get::<_, Option<String>>(0).as_deref() {
                Some("broadcast") => result.broadcast = true,
                Some("presence") => result.presence = true,
                _ => {}
            }
        }
    }
    Ok(result)
}
