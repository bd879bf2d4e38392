//! Postgres Changes: subscriptions, matching, batched RLS, payloads — the driver.
//!
//! Each tenant's core runs as tasks on one of the fleet's worker threads (a current-thread tokio
//! runtime, because the SQL client is tokio-postgres; see [`crate::fleet`]). Sessions send [`Command`]s; the replication reader sends [`WalEvent`]s; the
//! shards that own the subscribing connections get [`PgOut`]s.
//!
//! The decisions live in pure modules, each tested without a database:
//!
//! - `core` — `ChangesCore`: the subscription registry, matching, RLS batch planning and
//!   delivery, stream state; races decided by generations (seeded simulation in `core/tests.rs`);
//! - `payload` — the `data` objects and database broadcasts;
//! - `policy_cache` — policy answers (TTL, bound, single flight; `now` passed in);
//! - `row` — cell access to a row change;
//! - `outbound` — the per-shard queues (control never dropped).
//!
//! This file is the driver: commands go to `ChangesCore::handle_command`, which answers what it
//! can (cached policy answers) and queues the queries it needs (`poll_query`: subscription
//! metadata, policy checks, replays); the driver runs each as a tokio task on a reconnecting
//! connection and hands the result back. WAL batches run their RLS round trips (`plan_rls`)
//! one batch at a time; publication polling is a timer here.
//!
//! For each committed transaction: every row change is matched against the bindings of its
//! table (event, then filters evaluated in Rust); changes to tables with RLS enabled are then
//! checked **once per (table × distinct role+claims) for the whole batch** — subscribers with
//! identical claims share one result — and each change is delivered once per channel with the
//! ids of the channel's matching bindings. The `data` JSON is built once per change and column
//! visibility; channels with the same ids share one payload.
//!
//! Beyond upstream: a subscription is acknowledged ("Subscribed to PostgreSQL") only once it is
//! registered here *and* the replication stream is up, so every change committed after the
//! acknowledgement reaches it; a binding whose table is not published gets a message naming the
//! fix and starts by itself once the table is added (publication polled every 2 s), while the
//! channel's other bindings work; an RLS check that fails affects only the claims group it was
//! run for.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use ahash::AHashMap;
use tokio_postgres::Client;

use engine::client_error::{BindingException, SystemMessage};

use crate::binding::{self, Binding};
use crate::error::ReplicationError;
use crate::reader::{Txn, WalEvent};
use crate::sql;

mod core;
mod outbound;
mod payload;
mod policy_cache;
mod row;

use self::core::{BindingResult, ChangesCore, MatchedBatch, Query, TextOrderQuery, TextOrders, Verdicts};
use outbound::Outbound;

pub use payload::{FIELD_BYTES_MAX_WHEN_CUT, RECORD_BYTES_MAX};

/// Most transactions taken from the reader queue into one batch (one round of RLS checks).
const BATCH_TXNS_MAX: usize = 64;
const PUBLICATION_POLL: Duration = Duration::from_secs(2);
/// The slot's retained WAL is read every this many publication polls (10 s) while streaming.
const SLOT_WATCH_POLLS: u32 = 5;
/// How long the slot watch waits for its answer.
const SLOT_WATCH_DEADLINE: Duration = Duration::from_secs(5);
/// How long a policy check, a subscription's metadata or a replay may wait for the database,
/// connecting included. A database that hangs (stopped, not closed) would otherwise hold the
/// work for ever; past the deadline it fails (a policy check as a denial, which a refresh turns
/// into `Realtime was unable to connect to the project database`, PROTOCOL.md §6.3) and the
/// connection it waited on is dropped. Longer than the session's own deadline for private
/// joins ([`engine::limits::AUTHORIZE_TIMEOUT_SECS`]), so a join answers with the §2.5 text.
const QUERY_DEADLINE: Duration = Duration::from_secs(20);
/// How long the RLS round trip of one table of a WAL batch may take, connecting included. Past
/// it the batch's changes for that table are delivered with `errors` =
/// `["Query was cancelled, please try again"]` (or the unreachable text when no connection
/// could be had) and the connection is dropped, so change delivery never stalls behind a hung
/// database.
const RLS_DEADLINE: Duration = Duration::from_secs(10);

pub use engine::changes::{AuthzReply, CallerReply, ChangeDelivery, ChannelKey, Command, PgOut, ReplayedMessage, Subscription, COMMANDS_MAX, SHARD_INBOX_MAX};

/// Counters.
#[derive(Debug, Default)]
pub struct CoreStats {
    /// Changes delivered (per channel).
    pub deliveries: std::sync::atomic::AtomicU64,
    /// RLS check queries run.
    pub rls_queries: std::sync::atomic::AtomicU64,
    /// Subscriptions active.
    pub channels: std::sync::atomic::AtomicU64,
    /// Round trips of the RLS check queries.
    pub rls_latency: engine::histogram::Histogram,
    /// Messages for a shard dropped because its inbox and overflow were full.
    pub inbox_dropped: std::sync::atomic::AtomicU64,
    /// Commands received from sessions (the fleet's idle check reads it).
    pub commands: std::sync::atomic::AtomicU64,
}

/// Everything one tenant's core runs with ([`run`]).
pub(crate) struct CoreParams {
    /// The tenant's database, for SQL.
    pub(crate) url: String,
    /// Whose database it is: database broadcasts carry it in their topic key.
    pub(crate) tenant: engine::TenantId,
    /// The shards' inboxes (shared by every tenant's core), indexed by shard id.
    pub(crate) shards: Vec<flume::Sender<PgOut>>,
    /// Cluster mode: other nodes' channels' messages (shard ids from `REMOTE_SHARD_BASE`).
    pub(crate) remote: Option<flume::Sender<(engine::ShardId, PgOut)>>,
    /// The payload limit, applied to broadcasts from SQL.
    pub(crate) payload_bytes_max: usize,
    /// Sessions' commands.
    pub(crate) commands: flume::Receiver<Command>,
    /// The reader's events.
    pub(crate) events: flume::Receiver<WalEvent>,
    /// Counters.
    pub(crate) stats: Arc<CoreStats>,
    /// Kept true while the core's database connections are up.
    pub(crate) health: Arc<std::sync::atomic::AtomicBool>,
    /// The reader's controls.
    pub(crate) control: Arc<crate::reader::ReaderControl>,
    /// A definite error met before the core started (wrong password, failed install, no
    /// capacity): the core opens no connection and answers every query with it.
    pub(crate) failed: Option<ReplicationError>,
}

/// A database connection that reconnects (with backoff) when the server restarts or the
/// connection drops; `health` tells `/healthz` whether it is up. A definite connection error
/// (wrong password, missing database: [`ReplicationError`]) is not retried: it is logged once,
/// kept, and returned to every later caller.
pub(crate) struct Db {
    url: String,
    client: RefCell<Option<Rc<Client>>>,
    failed: RefCell<Option<ReplicationError>>,
    health: Arc<std::sync::atomic::AtomicBool>,
    /// The reader's state: health is not reported good while the reader has stopped.
    control: Arc<crate::reader::ReaderControl>,
}

impl Db {
    fn new(url: &str, health: Arc<std::sync::atomic::AtomicBool>, control: Arc<crate::reader::ReaderControl>, failed: Option<ReplicationError>) -> Db {
        Db { url: url.to_string(), client: RefCell::new(None), failed: RefCell::new(failed), health, control }
    }

    /// A live client, reconnecting first when needed; the definite error that stopped it.
    async fn get(&self) -> Result<Rc<Client>, ReplicationError> {
        if let Some(client) = self.client.borrow().as_ref() {
            if !client.is_closed() {
                // A reconnect abandoned at a deadline (`get_until`) left `health` false; a live
                // connection means the database is reachable again.
                let reader_ok = !self.control.failed.load(std::sync::atomic::Ordering::Relaxed);
                self.health.store(reader_ok, std::sync::atomic::Ordering::Relaxed);
                return Ok(Rc::clone(client));
            }
        }
        if let Some(error) = self.failed.borrow().as_ref() {
            return Err(error.clone());
        }
        self.health.store(false, std::sync::atomic::Ordering::Relaxed);
        match connect_retrying(&self.url).await {
            Ok(client) => {
                let client = Rc::new(client);
                let reader_ok = !self.control.failed.load(std::sync::atomic::Ordering::Relaxed);
                self.health.store(reader_ok, std::sync::atomic::Ordering::Relaxed);
                *self.client.borrow_mut() = Some(Rc::clone(&client));
                Ok(client)
            }
            Err(error) => {
                *self.failed.borrow_mut() = Some(error.clone());
                Err(error)
            }
        }
    }

    /// A live client within `deadline`: `None` when connecting ran out of time.
    async fn get_until(&self, deadline: tokio::time::Instant) -> Option<Result<Rc<Client>, ReplicationError>> {
        tokio::time::timeout_at(deadline, self.get()).await.ok()
    }

    /// Forgets `client` (a query on it ran past its deadline, so the server is assumed hung):
    /// the next caller connects afresh. Queries still waiting on it end with their deadlines.
    fn discard(&self, client: &Rc<Client>) {
        let mut current = self.client.borrow_mut();
        if current.as_ref().is_some_and(|c| Rc::ptr_eq(c, client)) {
            tracing::warn!("a database query ran past its deadline: dropping its connection");
            *current = None;
        }
    }
}

fn unreachable_text() -> String {
    SystemMessage::DatabaseUnreachable.text().into_owned()
}

fn cancelled_text() -> String {
    SystemMessage::QueryCancelled.text().into_owned()
}

/// Connects, retrying transient errors with backoff (0.5 s doubling to 10 s); returns a
/// definite error at once.
async fn connect_retrying(url: &str) -> Result<Client, ReplicationError> {
    let mut delay = Duration::from_millis(500);
    loop {
        match sql::connect(url).await {
            Ok(client) => return Ok(client),
            Err(error) => {
                let error = ReplicationError::from_sql(&error);
                if error.is_definite() {
                    tracing::error!(%error, "database connection failed for good (not retrying)");
                    return Err(error);
                }
                tracing::warn!(%error, "database connection failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
/// The driver's handle on the core: every call drains what the core queued — messages for the
/// shards, answers for REST callers, and queries, each run in its own task.
struct Driver {
    core: RefCell<ChangesCore>,
    outbound: Rc<Outbound>,
    stats: Arc<CoreStats>,
    /// Metadata and replay queries.
    meta: Rc<Db>,
    /// Policy checks (their own connection).
    authz: Rc<Db>,
    /// Compiled RLS checks of Postgres Changes.
    policies: CompiledPolicies,
    /// Collations met in table metadata (cleared with every publication poll).
    collations: sql::Collations,
}

impl Driver {
    fn with<R>(self: &Rc<Self>, f: impl FnOnce(&mut ChangesCore) -> R) -> R {
        let mut core = self.core.borrow_mut();
        let result = f(&mut core);
        while let Some((shard, out)) = core.poll_out() {
            self.outbound.send(shard, out);
        }
        while let Some((reply, answer)) = core.poll_caller() {
            reply.send(answer);
        }
        while let Some(query) = core.poll_query() {
            tokio::task::spawn_local(Rc::clone(self).run_query(query));
        }
        let counts = core.counts();
        self.stats.deliveries.store(counts.deliveries, std::sync::atomic::Ordering::Relaxed);
        self.stats.rls_queries.store(counts.rls_queries, std::sync::atomic::Ordering::Relaxed);
        self.stats.channels.store(core.channel_count() as u64, std::sync::atomic::Ordering::Relaxed);
        self.stats.inbox_dropped.store(self.outbound.dropped(), std::sync::atomic::Ordering::Relaxed);
        result
    }

    /// Runs one query of the core and hands the result back, within [`QUERY_DEADLINE`].
    async fn run_query(self: Rc<Self>, query: Query) {
        let deadline = tokio::time::Instant::now() + QUERY_DEADLINE;
        match query {
            Query::Metadata { subscription, generation } => {
                let outcome = match self.meta.get_until(deadline).await {
                    Some(Ok(client)) => match tokio::time::timeout_at(deadline, validate(&client, &subscription, &self.collations)).await {
                        Ok(outcome) => outcome,
                        Err(_) => {
                            self.meta.discard(&client);
                            Err(cancelled_text())
                        }
                    },
                    Some(Err(_)) | None => Err(unreachable_text()),
                };
                self.with(|core| core.finish_subscribe(subscription.key, generation, &subscription.role, &subscription.claims_json, outcome));
            }
            Query::Policy(request) => {
                let result = match self.authz.get_until(deadline).await {
                    Some(Ok(client)) => match tokio::time::timeout_at(deadline, crate::policy::check(&client, &request)).await {
                        Ok(result) => result,
                        Err(_) => {
                            self.authz.discard(&client);
                            crate::policy::AuthzResult::failed(cancelled_text())
                        }
                    },
                    Some(Err(error)) => crate::policy::AuthzResult::failed(error.to_string()),
                    None => crate::policy::AuthzResult::failed(unreachable_text()),
                };
                if let Some(error) = &result.error {
                    tracing::warn!(role = %request.role, topic = %request.topic, %error, "policy check failed (counts as a denial)");
                }
                self.with(|core| core.policy_done(&request, result, std::time::Instant::now()));
            }
            Query::Replay { key, topic, since_ms, limit } => {
                let result = match self.meta.get_until(deadline).await {
                    Some(Ok(client)) => match tokio::time::timeout_at(deadline, replay(&client, &topic, since_ms, limit)).await {
                        Ok(result) => result.map_err(|e| sql::error_text(&e)),
                        Err(_) => {
                            self.meta.discard(&client);
                            Err(cancelled_text())
                        }
                    },
                    Some(Err(error)) => Err(error.to_string()),
                    None => Err(unreachable_text()),
                };
                self.with(|core| core.replay_done(key, result));
            }
        }
    }
}

/// One tenant's core: runs until its task (or the tenant's `LocalSet`) is dropped. Every task
/// it spawns is a `spawn_local` on the current `LocalSet`.
pub(crate) async fn run(params: CoreParams) {
    let CoreParams { url, tenant, shards, remote, payload_bytes_max, commands, events, stats, health, control, failed } = params;
    let meta = Rc::new(Db::new(&url, Arc::clone(&health), Arc::clone(&control), failed.clone()));
    let rls = Db::new(&url, health, Arc::clone(&control), failed.clone());
    let _ = meta.get().await;
    let authz = Rc::new(Db::new(&url, Arc::new(std::sync::atomic::AtomicBool::new(true)), Arc::clone(&control), failed));
    let driver = Rc::new(Driver {
        core: RefCell::new(ChangesCore::new(shards.len(), payload_bytes_max).for_tenant(tenant)),
        outbound: Outbound::with_remote(shards, remote),
        stats,
        meta: Rc::clone(&meta),
        authz,
        policies: CompiledPolicies::default(),
        collations: sql::Collations::default(),
    });
    // Commands: the core answers what it can at once and asks for the queries it needs (each
    // runs in its own task, so a join storm never stalls change delivery).
    {
        let driver = Rc::clone(&driver);
        tokio::task::spawn_local(async move {
            while let Ok(command) = commands.recv_async().await {
                driver.stats.commands.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                driver.with(|core| core.handle_command(command, std::time::Instant::now()));
            }
        });
    }
    // Housekeeping of realtime.messages partitions (bounded: 72 h), hourly.
    {
        let meta = Rc::clone(&meta);
        tokio::task::spawn_local(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                let Ok(client) = meta.get().await else { return };
                if let Err(error) = client.simple_query(crate::install::MAINTAIN_SQL).await {
                    tracing::warn!(error = %sql::error_text(&error), "realtime.messages partition maintenance failed");
                }
            }
        });
    }
    // Publication polling for waiting bindings and wildcards.
    {
        let driver = Rc::clone(&driver);
        let meta = Rc::clone(&meta);
        let control = Arc::clone(&control);
        tokio::task::spawn_local(async move {
            let mut polls = 0u32;
            loop {
                tokio::time::sleep(PUBLICATION_POLL).await;
                let reads_publication = control.reads_publication.load(std::sync::atomic::Ordering::Relaxed);
                let Ok(client) = meta.get().await else { return };
                polls = polls.wrapping_add(1);
                if polls.is_multiple_of(SLOT_WATCH_POLLS) {
                    watch_slot(&meta, &client, &control).await;
                }
                if !reads_publication {
                    if let Ok((true, _)) = sql::published_tables(&client).await {
                        // Until the restarted stream reads the publication, no subscription may
                        // be acknowledged: its "Subscribed" waits for the next StreamUp.
                        driver.with(ChangesCore::stream_restarting);
                        control.restart.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                driver.collations.clear();
                match sql::rls_fingerprint(&client).await {
                    Ok(fingerprint) => driver.policies.observe(fingerprint),
                    Err(error) => tracing::warn!(error = %sql::error_text(&error), "RLS catalog fingerprint failed"),
                }
                if driver.with(|core| core.wants_publication_poll()) {
                    if let Err(error) = poll_publication(&driver, &client).await {
                        tracing::warn!(error = %sql::error_text(&error), "publication poll failed");
                    }
                }
            }
        });
    }
    // WAL events, in order.
    while let Ok(event) = events.recv_async().await {
        let mut batch = Vec::new();
        let mut next = Some(event);
        while let Some(event) = next.take() {
            match event {
                WalEvent::Txn(txn) => {
                    batch.push(txn);
                    if batch.len() < BATCH_TXNS_MAX {
                        next = events.try_recv().ok();
                    }
                }
                other => {
                    if !batch.is_empty() {
                        process_and_confirm(&driver, &rls, &control, std::mem::take(&mut batch)).await;
                    }
                    handle_event(&driver, &meta, &control, other).await;
                    next = events.try_recv().ok();
                }
            }
        }
        if !batch.is_empty() {
            process_and_confirm(&driver, &rls, &control, batch).await;
        }
    }
    // The reader stopped (a definite error): commands, policy checks and replays are still
    // answered.
    std::future::pending::<()>().await;
}

/// The slot's bound while streaming: reads how much WAL the slot the reader streams from
/// retains (`pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)`; 0 on a standby) within
/// [`SLOT_WATCH_DEADLINE`]; beyond `REALTIME_SLOT_MAX_RETAINED_MB` it sets
/// [`crate::reader::ReaderControl::over_bound`], and the reader recreates the slot (subscribers
/// are told changes were missed). A watch that fails or times out only logs (and drops a hung
/// connection); the next one tries again.
async fn watch_slot(meta: &Db, client: &Rc<Client>, control: &crate::reader::ReaderControl) {
    let Some(slot) = control.streaming_slot() else { return };
    let max = control.max_retained_bytes.load(std::sync::atomic::Ordering::Relaxed);
    let params: [(&(dyn tokio_postgres::types::ToSql + Sync), tokio_postgres::types::Type); 1] = [(&slot, tokio_postgres::types::Type::TEXT)];
    let query = client.query_typed(
        "SELECT (CASE WHEN pg_is_in_recovery() THEN 0 ELSE coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0) END)::int8 \
         FROM pg_replication_slots WHERE slot_name = $1",
        &params,
    );
    match tokio::time::timeout(SLOT_WATCH_DEADLINE, query).await {
        Ok(Ok(rows)) => {
            let retained = rows.first().and_then(|r| r.try_get::<_, Option<i64>>(0).ok().flatten()).unwrap_or(0).max(0) as u64;
            if retained > max {
                tracing::warn!(%slot, retained_bytes = retained, max_bytes = max, "the replication slot retains more WAL than allowed while streaming");
                control.over_bound.store(retained, std::sync::atomic::Ordering::Relaxed);
            }
        }
        Ok(Err(error)) => tracing::warn!(error = %sql::error_text(&error), "reading the replication slot's retained WAL failed"),
        Err(_) => {
            tracing::warn!("reading the replication slot's retained WAL timed out");
            meta.discard(client);
        }
    }
}

/// The newest `limit` private broadcasts of `topic` since `since_ms`, oldest first (§3.6).
async fn replay(client: &Client, topic: &str, since_ms: i64, limit: i64) -> Result<Vec<ReplayedMessage>, sql::SqlError> {
    let rows = client
        .query(
            "SELECT id::text, event, payload::text, binary_payload FROM ( \
               SELECT id, event, payload, binary_payload, inserted_at FROM realtime.messages \
               WHERE topic = $1 AND private IS TRUE AND extension = 'broadcast' \
                 AND inserted_at >= (to_timestamp($2::float8 / 1000) AT TIME ZONE 'utc') \
                 AND inserted_at < (now() AT TIME ZONE 'utc') + interval '1 minute' \
               ORDER BY inserted_at DESC LIMIT $3) newest ORDER BY inserted_at ASC",
            &[&topic, &(since_ms as f64), &limit],
        )
        .await?;
    Ok(rows
        .iter()
        .filter_map(|row| {
            // A row whose columns do not read as these types (the table altered by hand) is
            // skipped, like one without an id or event.
            let id: Option<String> = row.try_get(0).ok()?;
            let event: Option<String> = row.try_get(1).ok()?;
            Some(ReplayedMessage { id: id?, event: event?, payload: row.try_get(2).ok()?, binary: row.try_get(3).ok()? })
        })
        .filter(|m| m.payload.is_some() || m.binary.is_some())
        .collect())
}

async fn handle_event(driver: &Rc<Driver>, meta: &Db, control: &crate::reader::ReaderControl, event: WalEvent) {
    match event {
        // A stream without supabase_realtime (dropped, not yet recreated) carries database
        // broadcasts only: Postgres Changes are not live, so nothing is acknowledged until the
        // stream restarts with it.
        WalEvent::StreamUp => driver.with(|core| core.stream_up(control.reads_publication.load(std::sync::atomic::Ordering::Relaxed))),
        WalEvent::StreamDown(reason) => driver.with(|core| core.stream_down(reason)),
        WalEvent::ChangesMissed => driver.with(ChangesCore::changes_missed),
        WalEvent::StreamFailed(_) => {
            // The reader logged the error with what to fix.
            meta.health.store(false, std::sync::atomic::Ordering::Relaxed);
            driver.with(ChangesCore::stream_failed);
        }
        WalEvent::Relation(relation) => {
            if let Some(key) = driver.with(|core| core.relation(relation)) {
                // The table may have changed (ALTER TABLE): refresh what we know about it.
                let Ok(client) = meta.get().await else { return };
                if let Ok(Some(info)) = sql::table_info(&client, &key.0, &key.1).await {
                    driver.with(|core| core.table_refreshed(info));
                }
            }
        }
        WalEvent::Type(_) | WalEvent::Txn(_) => {}
    }
}

/// Every query of a subscription's bindings is sent at once (tokio-postgres pipelines them on
/// the connection): the role and the publication together, then every binding's tables.
async fn validate(meta: &Client, subscription: &Subscription, collations: &sql::Collations) -> Result<(bool, Vec<BindingResult>), String> {
    let (role_info, (publication_exists, published)) =
        futures_util::future::try_join(sql::role_info(meta, &subscription.role), sql::published_tables(meta)).await.map_err(|e| sql::error_text(&e))?;
    let results = futures_util::future::join_all(subscription.bindings.iter().map(|raw| {
        let (role_info, published) = (&role_info, &published);
        async move {
            let binding = match binding::parse_binding_text(raw) {
                Ok(binding) => binding,
                Err(message) => return BindingResult::Failed(message),
            };
            if role_info.is_none() {
                let message = binding::exception_message(&binding, &BindingException::RoleMissing { role: subscription.role.clone() }.text());
                return BindingResult::Failed(message);
            }
            bind(meta, &subscription.role, binding, publication_exists, published, collations).await
        }
    }))
    .await;
    Ok((role_info.is_some_and(|r| r.bypasses_rls), results))
}

/// Fetches the metadata of the published tables a binding covers and compiles it for each.
async fn bind(meta: &Client, role: &str, binding: Binding, publication_exists: bool, published: &[(String, String)], collations: &sql::Collations) -> BindingResult {
    let tables = self::core::tables_of(&binding, published);
    if tables.is_empty() {
        let message = binding::not_published_message(&binding, publication_exists);
        return BindingResult::Waiting(binding, message);
    }
    let mut compiled = AHashMap::new();
    let mut infos = Vec::new();
    let fetched = futures_util::future::join_all(tables.iter().map(|(schema, table)| sql::table_info_for(meta, schema, table, Some(role), collations))).await;
    for ((schema, table), fetched) in tables.into_iter().zip(fetched) {
        let (info, privileges) = match fetched {
            Ok(Some(found)) => found,
            Ok(None) => continue,
            Err(error) => return BindingResult::Failed(binding::exception_message(&binding, &sql::error_text(&error))),
        };
        match self::core::compile(&binding, &info, &privileges) {
            Ok(c) => {
                compiled.insert((Arc::from(schema.as_str()), Arc::from(table.as_str())), c);
                infos.push(info);
            }
            Err(message) if !binding.is_wildcard() => return BindingResult::Failed(binding::exception_message(&binding, &message)),
            Err(_) => {} // a wildcard skips tables its filters do not fit
        }
    }
    BindingResult::Active(self::core::Bound { binding, tables: compiled }, infos)
}

/// Activates waiting bindings whose table got published, and extends wildcards.
async fn poll_publication(driver: &Rc<Driver>, meta: &Client) -> Result<(), sql::SqlError> {
    let (exists, published) = sql::published_tables(meta).await?;
    for (key, generation, role, binding) in driver.with(|core| core.waiting_bindings()) {
        let result = bind(meta, &role, binding.clone(), exists, &published, &driver.collations).await;
        driver.with(|core| core.waiting_resolved(key, generation, &binding, result));
    }
    for (key, index, role, binding, known) in driver.with(|core| core.wildcard_bindings()) {
        for (schema, table) in self::core::tables_of(&binding, &published) {
            let table_key = (Arc::from(schema.as_str()), Arc::from(table.as_str()));
            if known.contains(&table_key) {
                continue;
            }
            let Some(info) = sql::table_info(meta, schema, table).await? else { continue };
            let Ok(privileges) = sql::selectable_columns(meta, &role, info.oid).await else { continue };
            if let Ok(compiled) = self::core::compile(&binding, &info, &privileges) {
                driver.with(|core| core.wildcard_extended(key, index, info, compiled));
            }
        }
    }
    Ok(())
}

/// Compiled SELECT policies per (table oid, role) ([`sql::compile_rls`]), valid while the
/// catalog fingerprint ([`sql::rls_fingerprint`]) is the one they were compiled under; the
/// publication poll re-reads the fingerprint every [`PUBLICATION_POLL`] and clears the cache
/// when policies, roles or tables' RLS settings changed. Bounded: cleared beyond
/// [`POLICIES_MAX`] entries.
#[derive(Default)]
pub(crate) struct CompiledPolicies {
    entries: RefCell<PolicyEntries>,
    fingerprint: RefCell<Option<String>>,
}

/// (table oid, role) → compiled SELECT policy expression.
type PolicyEntries = AHashMap<(i64, Arc<str>), Rc<str>>;

/// Bound of the compiled-policy cache.
const POLICIES_MAX: usize = 16_384;

impl CompiledPolicies {
    /// Clears the cache when the catalog changed since the last call.
    fn observe(&self, fingerprint: String) {
        let mut current = self.fingerprint.borrow_mut();
        if current.as_deref() != Some(fingerprint.as_str()) {
            if current.is_some() {
                tracing::info!("policies, roles or RLS settings changed: recompiling RLS checks");
            }
            self.entries.borrow_mut().clear();
            *current = Some(fingerprint);
        }
    }

    /// The compiled policy of `role` on `table`, compiling it on a miss.
    async fn get(&self, client: &Client, table: &sql::TableInfo, role: &Arc<str>) -> Result<Rc<str>, sql::SqlError> {
        if let Some(policy) = self.entries.borrow().get(&(table.oid, Arc::clone(role))) {
            return Ok(Rc::clone(policy));
        }
        if self.fingerprint.borrow().is_none() {
            self.observe(sql::rls_fingerprint(client).await?);
        }
        let policy: Rc<str> = Rc::from(sql::compile_rls(client, table, role).await?);
        let mut entries = self.entries.borrow_mut();
        if entries.len() >= POLICIES_MAX {
            entries.clear();
        }
        entries.insert((table.oid, Arc::clone(role)), Rc::clone(&policy));
        Ok(policy)
    }
}

/// Processes a batch, then lets the reader confirm it: the slot advances only past
/// transactions handed to the shards.
async fn process_and_confirm(driver: &Rc<Driver>, rls: &Db, control: &crate::reader::ReaderControl, batch: Vec<Arc<Txn>>) {
    let end = batch.iter().map(|t| t.end_lsn).max().unwrap_or(0);
    process(driver, rls, batch).await;
    control.handed_off.fetch_max(end, std::sync::atomic::Ordering::Relaxed);
}

/// The text comparisons of a batch's filters under collations that are not byte order
/// ([`ChangesCore::plan_text_orders`]): every query sent at once on the RLS connection (one
/// round trip for the whole batch), within [`RLS_DEADLINE`]. A query that fails or runs out of
/// time makes its filters' changes error entries for the channels that needed them.
async fn text_orders(rls: &Db, queries: Vec<TextOrderQuery>) -> TextOrders {
    let mut orders = TextOrders::default();
    let deadline = tokio::time::Instant::now() + RLS_DEADLINE;
    let results: Vec<Result<Vec<std::cmp::Ordering>, String>> = match rls.get_until(deadline).await {
        Some(Ok(client)) => {
            let round_trip = futures_util::future::join_all(queries.iter().map(|query| async {
                let pairs: Vec<(&[u8], &[u8])> = query.pairs.iter().map(|(v, o)| (&**v, &**o)).collect();
                sql::text_orders(&client, &query.collation, &pairs).await.map_err(|e| sql::error_text(&e))
            }));
            match tokio::time::timeout_at(deadline, round_trip).await {
                Ok(results) => results,
                Err(_) => {
                    rls.discard(&client);
                    queries.iter().map(|_| Err(cancelled_text())).collect()
                }
            }
        }
        Some(Err(_)) | None => queries.iter().map(|_| Err(unreachable_text())).collect(),
    };
    for (query, result) in queries.into_iter().zip(results) {
        orders.record(query, result);
    }
    orders
}

/// One batch: the text comparisons its filters need from the database (if any: one round
/// trip), match, run its RLS round trips (one per table), deliver.
async fn process(driver: &Rc<Driver>, rls: &Db, batch: Vec<Arc<Txn>>) {
    let order_queries = driver.with(|core| core.plan_text_orders(&batch));
    let orders = if order_queries.is_empty() { TextOrders::default() } else { text_orders(rls, order_queries).await };
    let matched: MatchedBatch = driver.with(|core| core.match_batch(&batch, &orders));
    tracing::debug!(txns = batch.len(), matched = matched.len(), "batch matched");
    if matched.is_empty() {
        return;
    }
    let queries = driver.with(|core| core.plan_rls(&matched));
    let mut verdicts = Verdicts::default();
    for query in &queries {
        let started = std::time::Instant::now();
        let deadline = tokio::time::Instant::now() + RLS_DEADLINE;
        let results: Vec<Result<Vec<bool>, String>> = match rls.get_until(deadline).await {
            Some(Ok(client)) => {
                let round_trip = async {
                    // Each group's role's compiled policies (cached; a failure to compile is that
                    // group's error).
                    let mut policies: Vec<Result<Rc<str>, String>> = Vec::with_capacity(query.groups.len());
                    for ((role, _), _) in &query.groups {
                        policies.push(driver.policies.get(&client, &query.table, role).await.map_err(|e| sql::error_text(&e)));
                    }
                    let images: Vec<Vec<&sql::RowImage>> = query.groups.iter().map(|(_, rows)| rows.iter().map(|(_, image)| &**image).collect()).collect();
                    let runnable: Vec<usize> = (0..query.groups.len()).filter(|g| policies[*g].is_ok()).collect();
                    let request: Vec<sql::RlsGroup<'_>> = runnable
                        .iter()
                        .map(|&g| {
                            let ((role, claims), _) = &query.groups[g];
                            let policy: &str = policies[g].as_ref().map(|p| &**p).unwrap_or("false");
                            sql::RlsGroup { role, claims_json: claims, policy, rows: &images[g] }
                        })
                        .collect();
                    let mut answers = sql::rls_visible_groups(&client, &query.table, &request).await.into_iter();
                    driver.stats.rls_latency.observe(started.elapsed().as_micros() as u64);
                    policies
                        .iter()
                        .map(|policy| match policy {
                            Ok(_) => answers.next().map(|r| r.map_err(|e| sql::error_text(&e))).unwrap_or_else(|| Err(unreachable_text())),
                            Err(error) => Err(error.clone()),
                        })
                        .collect::<Vec<Result<Vec<bool>, String>>>()
                };
                match tokio::time::timeout_at(deadline, round_trip).await {
                    Ok(results) => results,
                    Err(_) => {
                        rls.discard(&client);
                        query.groups.iter().map(|_| Err(cancelled_text())).collect()
                    }
                }
            }
            Some(Err(_)) | None => query.groups.iter().map(|_| Err(unreachable_text())).collect(),
        };
        verdicts.record(query, results);
    }
    driver.with(|core| core.deliver(matched, &verdicts));
}
