//! The Postgres Changes core: subscriptions, matching, batched RLS, payloads.
//!
//! Runs on its own thread (a current-thread tokio runtime, because the SQL client is
//! tokio-postgres). Sessions send [`Command`]s; the replication reader sends [`WalEvent`]s; the
//! core sends [`PgOut`] to the shards that own the subscribing connections.
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

use ahash::{AHashMap, AHashSet};
use bytes::Bytes;
use smallvec::SmallVec;
use tokio_postgres::Client;

use engine::client_error::{BindingException, ChangesNotice, RowError, SystemMessage};
use engine::{ChannelSerial, ConnId, ShardId};

use crate::binding::{self, Binding, EventFilter};
use crate::error::ReplicationError;
use crate::filter::{self, Filter};
use crate::pgoutput::{Cell, OldKind, Relation, Tuple};
use crate::reader::{RowChange, Txn, WalEvent};
use crate::sql::{self, TableInfo};
use crate::value;

mod outbound;
use outbound::Outbound;

/// A change whose record JSON is longer than this is cut down (PROTOCOL.md §5.6, rule 7).
pub const RECORD_BYTES_MAX: usize = 1_048_576;
/// In a cut-down record, fields whose JSON is longer than this are dropped.
pub const FIELD_BYTES_MAX_WHEN_CUT: usize = 64;
/// Most transactions taken from the reader queue into one batch (one round of RLS checks).
const BATCH_TXNS_MAX: usize = 64;
const PUBLICATION_POLL: Duration = Duration::from_secs(2);

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
}

type TableKey = (Arc<str>, Arc<str>);

/// A binding with its table-specific compiled parts.
#[derive(Debug)]
struct Bound {
    binding: Binding,
    /// Per matched table: filters compiled against its columns, and visible columns.
    tables: AHashMap<TableKey, Compiled>,
}

#[derive(Debug, Clone)]
struct Compiled {
    filters: Vec<(String, Filter)>,
    /// Columns delivered (privileges ∩ select + primary key), by `attnum` order.
    visible: Arc<Vec<bool>>,
    /// The role can read every primary-key column.
    key_visible: bool,
}

#[derive(Debug)]
struct ChannelState {
    generation: u64,
    role: Arc<str>,
    claims: Arc<str>,
    bypasses_rls: bool,
    active: Vec<Bound>,
    /// Bindings waiting for their table to be published.
    waiting: Vec<Binding>,
    /// "Subscribed" not sent yet because the stream was down.
    ack_pending: bool,
}

struct RelInfo {
    schema: Arc<str>,
    table: Arc<str>,
    relation: Relation,
    index: AHashMap<String, usize>,
}

struct Core {
    shards: Rc<Outbound>,
    /// The reader stopped on a definite error: nothing will be acknowledged again.
    stream_stopped: bool,
    /// `REALTIME_MAX_PAYLOAD_BYTES`: database broadcasts over it are dropped, like client ones.
    payload_bytes_max: usize,
    stream_up: bool,
    relations: AHashMap<u32, RelInfo>,
    tables: AHashMap<TableKey, Arc<TableInfo>>,
    channels: AHashMap<ChannelKey, ChannelState>,
    by_table: AHashMap<TableKey, AHashSet<(ChannelKey, usize)>>,
    wildcards: AHashSet<(ChannelKey, usize)>,
    next_generation: u64,
    stats: Arc<CoreStats>,
}

/// Handles to a running core.
pub struct CoreHandle {
    /// Where sessions send commands.
    pub commands: flume::Sender<Command>,
    /// One inbox per shard.
    pub shard_inboxes: Vec<flume::Receiver<PgOut>>,
    /// Counters.
    pub stats: Arc<CoreStats>,
}

/// Starts the core thread: `url` for SQL, `events` from the reader; `health` is kept true
/// while its database connections are up.
pub fn spawn(url: String, shards: usize, payload_bytes_max: usize, events: flume::Receiver<WalEvent>, health: Arc<std::sync::atomic::AtomicBool>, control: Arc<crate::reader::ReaderControl>) -> CoreHandle {
    let (commands, command_rx) = flume::bounded(COMMANDS_MAX);
    let (senders, inboxes): (Vec<_>, Vec<_>) = (0..shards).map(|_| flume::bounded(SHARD_INBOX_MAX)).unzip();
    let stats = Arc::new(CoreStats::default());
    let thread_stats = Arc::clone(&stats);
    std::thread::Builder::new()
        .name("changes".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
            let local = tokio::task::LocalSet::new();
            local.block_on(&runtime, run(url, senders, payload_bytes_max, command_rx, events, thread_stats, health, control));
        })
        .expect("spawn the changes thread");
    CoreHandle { commands, shard_inboxes: inboxes, stats }
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
    fn new(url: &str, health: Arc<std::sync::atomic::AtomicBool>, control: Arc<crate::reader::ReaderControl>) -> Db {
        Db { url: url.to_string(), client: RefCell::new(None), failed: RefCell::new(None), health, control }
    }

    /// A live client, reconnecting first when needed; the definite error that stopped it.
    async fn get(&self) -> Result<Rc<Client>, ReplicationError> {
        if let Some(client) = self.client.borrow().as_ref() {
            if !client.is_closed() {
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
async fn run(
    url: String,
    shards: Vec<flume::Sender<PgOut>>,
    payload_bytes_max: usize,
    commands: flume::Receiver<Command>,
    events: flume::Receiver<WalEvent>,
    stats: Arc<CoreStats>,
    health: Arc<std::sync::atomic::AtomicBool>,
    control: Arc<crate::reader::ReaderControl>,
) {
    let meta = Rc::new(Db::new(&url, Arc::clone(&health), Arc::clone(&control)));
    let rls = Db::new(&url, health, Arc::clone(&control));
    let _ = meta.get().await;
    let core = Rc::new(RefCell::new(Core {
        shards: Outbound::new(shards),
        stream_stopped: false,
        payload_bytes_max,
        stream_up: false,
        relations: AHashMap::new(),
        tables: AHashMap::new(),
        channels: AHashMap::new(),
        by_table: AHashMap::new(),
        wildcards: AHashSet::new(),
        next_generation: 1,
        stats,
    }));
    // Commands: each subscription is validated in its own task (metadata queries), so a join
    // storm never stalls change delivery. Policy checks run on their own connection, cached and
    // single-flight.
    {
        let core = Rc::clone(&core);
        let meta = Rc::clone(&meta);
        let authz = Rc::new(Authz { db: Db::new(&url, Arc::new(std::sync::atomic::AtomicBool::new(true)), Arc::clone(&control)), cache: RefCell::new(AHashMap::new()), inflight: RefCell::new(AHashMap::new()) });
        tokio::task::spawn_local(async move {
            while let Ok(command) = commands.recv_async().await {
                match command {
                    Command::Subscribe(subscription) => {
                        let generation = core.borrow_mut().begin(subscription.key);
                        tokio::task::spawn_local(subscribe(Rc::clone(&core), Rc::clone(&meta), subscription, generation));
                    }
                    Command::Unsubscribe(key) => core.borrow_mut().remove(key),
                    Command::Authorize { request, reply } => authorize(&core, &authz, request, reply),
                    Command::Replay { key, topic, since_ms, limit } => {
                        let (core, meta) = (Rc::clone(&core), Rc::clone(&meta));
                        tokio::task::spawn_local(async move {
                            let result = match meta.get().await {
                                Ok(client) => replay(&client, &topic, since_ms, limit).await.map_err(|e| sql::error_text(&e)),
                                Err(error) => Err(error.to_string()),
                            };
                            core.borrow().send(key.shard, PgOut::Replayed { conn: key.conn, channel: key.channel, result });
                        });
                    }
                }
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
        let core = Rc::clone(&core);
        let meta = Rc::clone(&meta);
        let control = Arc::clone(&control);
        tokio::task::spawn_local(async move {
            loop {
                tokio::time::sleep(PUBLICATION_POLL).await;
                let reads_publication = control.reads_publication.load(std::sync::atomic::Ordering::Relaxed);
                let Ok(client) = meta.get().await else { return };
                if !reads_publication {
                    if let Ok((true, _)) = sql::published_tables(&client).await {
                        // Until the restarted stream reads the publication, no subscription may
                        // be acknowledged: its "Subscribed" waits for the next StreamUp.
                        core.borrow_mut().stream_up = false;
                        control.restart.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                let wanted = {
                    let core = core.borrow();
                    core.channels.values().any(|c| !c.waiting.is_empty()) || !core.wildcards.is_empty()
                };
                if wanted {
                    if let Err(error) = poll_publication(&core, &client).await {
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
                        process(&core, &rls, std::mem::take(&mut batch)).await;
                    }
                    handle_event(&core, &meta, &control, other).await;
                    next = events.try_recv().ok();
                }
            }
        }
        if !batch.is_empty() {
            process(&core, &rls, batch).await;
        }
    }
    // The reader stopped (a definite error): commands, policy checks and replays are still
    // answered.
    std::future::pending::<()>().await;
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
            let id: Option<String> = row.get(0);
            let event: Option<String> = row.get(1);
            Some(ReplayedMessage { id: id?, event: event?, payload: row.get(2), binary: row.get(3) })
        })
        .filter(|m| m.payload.is_some() || m.binary.is_some())
        .collect())
}

/// Policy checks: cache (bounded, TTL) and in-flight requests.
struct Authz {
    db: Db,
    cache: RefCell<AHashMap<crate::policy::AuthzRequest, (std::time::Instant, crate::policy::AuthzResult)>>,
    inflight: RefCell<AHashMap<crate::policy::AuthzRequest, Vec<AuthzReply>>>,
}

fn send_authz(core: &Core, request: &crate::policy::AuthzRequest, reply: AuthzReply, result: crate::policy::AuthzResult) {
    match reply {
        AuthzReply::Channel(key) => core.send(key.shard, PgOut::Authorized { conn: key.conn, channel: key.channel, kind: request.kind, result }),
        AuthzReply::Caller(reply) => reply.send(result),
    }
}

fn authorize(core: &Rc<RefCell<Core>>, authz: &Rc<Authz>, request: crate::policy::AuthzRequest, reply: AuthzReply) {
    let cached = authz.cache.borrow().get(&request).filter(|(at, r)| at.elapsed() < crate::policy::CACHE_TTL && r.error.is_none()).map(|(_, r)| r.clone());
    if let Some(result) = cached {
        send_authz(&core.borrow(), &request, reply, result);
        return;
    }
    let mut inflight = authz.inflight.borrow_mut();
    if let Some(waiters) = inflight.get_mut(&request) {
        waiters.push(reply);
        return;
    }
    inflight.insert(request.clone(), vec![reply]);
    drop(inflight);
    let (core, authz) = (Rc::clone(core), Rc::clone(authz));
    tokio::task::spawn_local(async move {
        let result = match authz.db.get().await {
            Ok(client) => crate::policy::check(&client, &request).await,
            Err(error) => crate::policy::AuthzResult { broadcast: false, presence: false, error: Some(error.to_string()) },
        };
        if let Some(error) = &result.error {
            tracing::warn!(role = %request.role, topic = %request.topic, %error, "policy check failed (counts as a denial)");
        }
        {
            let mut cache = authz.cache.borrow_mut();
            if cache.len() >= crate::policy::CACHE_ENTRIES_MAX {
                cache.clear();
            }
            cache.insert(request.clone(), (std::time::Instant::now(), result.clone()));
        }
        let waiters = authz.inflight.borrow_mut().remove(&request).unwrap_or_default();
        let core = core.borrow();
        for reply in waiters {
            send_authz(&core, &request, reply, result.clone());
        }
    });
}

async fn handle_event(core: &Rc<RefCell<Core>>, meta: &Db, control: &crate::reader::ReaderControl, event: WalEvent) {
    match event {
        WalEvent::StreamUp => {
            // A stream without supabase_realtime (dropped, not yet recreated) carries database
            // broadcasts only: Postgres Changes are not live, so nothing is acknowledged until the
            // stream restarts with it.
            if !control.reads_publication.load(std::sync::atomic::Ordering::Relaxed) {
                core.borrow_mut().stream_up = false;
                return;
            }
            let mut core = core.borrow_mut();
            core.stream_up = true;
            let keys: Vec<ChannelKey> = core.channels.iter().filter(|(_, c)| !c.active.is_empty()).map(|(k, _)| *k).collect();
            for key in keys {
                core.channels.get_mut(&key).expect("listed").ack_pending = false;
                core.notice(key, &ChangesNotice::Subscribed);
            }
        }
        WalEvent::StreamDown(reason) => {
            let mut core = core.borrow_mut();
            core.stream_up = false;
            let keys: Vec<ChannelKey> = core.channels.iter().filter(|(_, c)| !c.active.is_empty()).map(|(k, _)| *k).collect();
            let notice = ChangesNotice::StreamLost { reason };
            for key in keys {
                core.notice(key, &notice);
            }
        }
        WalEvent::StreamFailed(_) => {
            // The reader logged the error with what to fix; subscribers learn that changes
            // stopped, and later subscriptions are told at once instead of waiting for a stream.
            meta.health.store(false, std::sync::atomic::Ordering::Relaxed);
            let mut core = core.borrow_mut();
            core.stream_up = false;
            core.stream_stopped = true;
            let keys: Vec<ChannelKey> = core.channels.iter().filter(|(_, c)| !c.active.is_empty()).map(|(k, _)| *k).collect();
            for key in keys {
                core.notice(key, &ChangesNotice::StreamStopped);
            }
        }
        WalEvent::Relation(relation) => {
            let schema: Arc<str> = Arc::from(relation.namespace.as_str());
            let table: Arc<str> = Arc::from(relation.name.as_str());
            let index = relation.columns.iter().enumerate().map(|(i, c)| (c.name.clone(), i)).collect();
            let key: TableKey = (Arc::clone(&schema), Arc::clone(&table));
            let known = core.borrow().tables.contains_key(&key);
            core.borrow_mut().relations.insert(relation.oid, RelInfo { schema, table, relation, index });
            if known {
                // The table may have changed (ALTER TABLE): refresh what we know about it.
                let Ok(client) = meta.get().await else { return };
                if let Ok(Some(info)) = sql::table_info(&client, &key.0, &key.1).await {
                    core.borrow_mut().tables.insert(key, info);
                }
            }
        }
        WalEvent::Type(_) | WalEvent::Txn(_) => {}
    }
}

impl Core {
    /// Never drops a control message; see [`outbound`].
    fn send(&self, shard: ShardId, out: PgOut) {
        self.shards.send(shard, out);
    }

    fn system(&self, key: ChannelKey, status: &'static str, message: String) {
        self.send(key.shard, PgOut::System { conn: key.conn, channel: key.channel, status, message });
    }

    fn notice(&self, key: ChannelKey, notice: &ChangesNotice) {
        self.system(key, notice.status(), notice.text().into_owned());
    }

    /// A channel got active bindings: acknowledge now if the stream is up, at the next
    /// `StreamUp` otherwise, or say at once that the stream stopped for good.
    fn acknowledge(&mut self, key: ChannelKey) {
        if self.stream_stopped {
            self.notice(key, &ChangesNotice::StreamStopped);
        } else if self.stream_up {
            self.notice(key, &ChangesNotice::Subscribed);
        } else {
            self.channels.get_mut(&key).expect("present").ack_pending = true;
        }
    }

    /// Registers an incoming subscription (replacing an older one of the same channel).
    fn begin(&mut self, key: ChannelKey) -> u64 {
        self.remove(key);
        let generation = self.next_generation;
        self.next_generation += 1;
        self.channels.insert(
            key,
            ChannelState {
                generation,
                role: Arc::from(""),
                claims: Arc::from(""),
                bypasses_rls: false,
                active: Vec::new(),
                waiting: Vec::new(),
                ack_pending: false,
            },
        );
        generation
    }

    fn remove(&mut self, key: ChannelKey) {
        if let Some(state) = self.channels.remove(&key) {
            for (index, bound) in state.active.iter().enumerate() {
                if bound.binding.is_wildcard() {
                    self.wildcards.remove(&(key, index));
                } else {
                    let table: TableKey = (Arc::from(bound.binding.schema.as_str()), Arc::from(bound.binding.table.as_str()));
                    if let Some(set) = self.by_table.get_mut(&table) {
                        set.remove(&(key, index));
                        if set.is_empty() {
                            self.by_table.remove(&table);
                        }
                    }
                }
            }
            self.stats.channels.store(self.channels.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn activate(&mut self, key: ChannelKey, bound: Bound) {
        let state = self.channels.get_mut(&key).expect("caller checked");
        let index = state.active.len();
        if bound.binding.is_wildcard() {
            self.wildcards.insert((key, index));
        } else {
            let table: TableKey = (Arc::from(bound.binding.schema.as_str()), Arc::from(bound.binding.table.as_str()));
            self.by_table.entry(table).or_default().insert((key, index));
        }
        state.active.push(bound);
        self.stats.channels.store(self.channels.len() as u64, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Compiles a binding for one table: filters against its columns, visible columns for the role.
async fn compile_for_table(meta: &Client, role: &str, binding: &Binding, table: &TableInfo) -> Result<Compiled, String> {
    let privileges = sql::selectable_columns(meta, role, table.oid).await.map_err(|e| sql::error_text(&e))?;
    let mut filters = Vec::with_capacity(binding.filters.len());
    for raw in &binding.filters {
        let position = table.columns.iter().position(|c| c.name == raw.column);
        let Some(index) = position.filter(|i| privileges.get(*i).copied().unwrap_or(false)) else {
            return Err(BindingException::InvalidFilterColumn { column: raw.column.clone() }.text());
        };
        let compiled = filter::compile(raw, index, &table.columns[index].type_name).map_err(|e| e.0)?;
        filters.push((raw.column.clone(), compiled));
    }
    let mut visible: Vec<bool> = privileges.clone();
    if let Some(select) = &binding.select {
        for column in select {
            let known = table.columns.iter().position(|c| &c.name == column);
            if !known.is_some_and(|i| privileges[i]) {
                return Err(BindingException::InvalidSelectColumn { column: column.clone() }.text());
            }
        }
        for (i, column) in table.columns.iter().enumerate() {
            visible[i] = privileges[i] && (select.contains(&column.name) || table.primary_key.contains(&column.name));
        }
    }
    let key_visible = table
        .primary_key
        .iter()
        .all(|k| table.columns.iter().position(|c| &c.name == k).is_some_and(|i| privileges[i]));
    Ok(Compiled { filters, visible: Arc::new(visible), key_visible })
}

/// Validates a subscription and activates what can be (PROTOCOL.md §5.1–5.4).
async fn subscribe(core: Rc<RefCell<Core>>, meta: Rc<Db>, subscription: Subscription, generation: u64) {
    let key = subscription.key;
    let role = subscription.role.clone();
    let outcome = match meta.get().await {
        Ok(client) => validate(&client, &subscription).await,
        Err(_) => Err(SystemMessage::DatabaseUnreachable.text().into_owned()),
    };
    let mut core = core.borrow_mut();
    let Some(state) = core.channels.get_mut(&key) else { return };
    if state.generation != generation {
        return; // replaced or left meanwhile
    }
    let (bypasses_rls, results) = match outcome {
        Ok(outcome) => outcome,
        Err(message) => {
            core.system(key, "error", message);
            return;
        }
    };
    // All or nothing (PROTOCOL.md §5.1): a binding that fails for any reason other than an
    // unpublished table fails the whole channel, with exactly that one message (§5.4).
    if let Some(BindingResult::Failed(message)) = results.iter().find(|r| matches!(r, BindingResult::Failed(_))) {
        let message = message.clone();
        core.system(key, "error", message);
        return;
    }
    state.role = Arc::from(role.as_str());
    state.claims = Arc::from(subscription.claims_json.as_str());
    state.bypasses_rls = bypasses_rls;
    let mut any_active = false;
    for result in results {
        match result {
            BindingResult::Active(bound, infos) => {
                for info in infos {
                    core.tables.insert((Arc::from(info.schema.as_str()), Arc::from(info.table.as_str())), info);
                }
                core.activate(key, bound);
                any_active = true;
            }
            BindingResult::Waiting(binding, message) => {
                core.system(key, "error", message);
                core.channels.get_mut(&key).expect("present").waiting.push(binding);
            }
            BindingResult::Failed(message) => core.system(key, "error", message),
        }
    }
    if any_active {
        core.acknowledge(key);
    }
}

enum BindingResult {
    Active(Bound, Vec<Arc<TableInfo>>),
    Waiting(Binding, String),
    Failed(String),
}

async fn validate(meta: &Client, subscription: &Subscription) -> Result<(bool, Vec<BindingResult>), String> {
    let role_info = sql::role_info(meta, &subscription.role).await.map_err(|e| sql::error_text(&e))?;
    let (publication_exists, published) = sql::published_tables(meta).await.map_err(|e| sql::error_text(&e))?;
    let mut results = Vec::with_capacity(subscription.bindings.len());
    for raw in &subscription.bindings {
        let binding = match binding::parse_binding_text(raw) {
            Ok(binding) => binding,
            Err(message) => {
                results.push(BindingResult::Failed(message));
                continue;
            }
        };
        let Some(role) = role_info else {
            let message = binding::exception_message(&binding, &BindingException::RoleMissing { role: subscription.role.clone() }.text());
            results.push(BindingResult::Failed(message));
            continue;
        };
        let _ = role;
        results.push(bind(meta, &subscription.role, binding, publication_exists, &published).await);
    }
    Ok((role_info.is_some_and(|r| r.bypasses_rls), results))
}

async fn bind(meta: &Client, role: &str, binding: Binding, publication_exists: bool, published: &[(String, String)]) -> BindingResult {
    let tables: Vec<&(String, String)> = published
        .iter()
        .filter(|(s, t)| (binding.schema == "*" || &binding.schema == s) && (binding.table == "*" || &binding.table == t))
        .collect();
    if tables.is_empty() {
        let message = binding::not_published_message(&binding, publication_exists);
        return BindingResult::Waiting(binding, message);
    }
    let mut compiled = AHashMap::new();
    let mut infos = Vec::new();
    for (schema, table) in tables {
        let info = match sql::table_info(meta, schema, table).await {
            Ok(Some(info)) => info,
            Ok(None) => continue,
            Err(error) => return BindingResult::Failed(binding::exception_message(&binding, &sql::error_text(&error))),
        };
        match compile_for_table(meta, role, &binding, &info).await {
            Ok(c) => {
                compiled.insert((Arc::from(schema.as_str()), Arc::from(table.as_str())), c);
                infos.push(info);
            }
            Err(message) if !binding.is_wildcard() => return BindingResult::Failed(binding::exception_message(&binding, &message)),
            Err(_) => {} // a wildcard skips tables its filters do not fit
        }
    }
    BindingResult::Active(Bound { binding, tables: compiled }, infos)
}

/// Activates waiting bindings whose table got published, and extends wildcards.
async fn poll_publication(core: &Rc<RefCell<Core>>, meta: &Client) -> Result<(), sql::SqlError> {
    let (exists, published) = sql::published_tables(meta).await?;
    let waiting: Vec<(ChannelKey, u64, Arc<str>, Binding)> = core
        .borrow()
        .channels
        .iter()
        .flat_map(|(key, c)| c.waiting.iter().map(move |b| (*key, c.generation, Arc::clone(&c.role), b.clone())))
        .collect();
    for (key, generation, role, binding) in waiting {
        let result = bind(meta, &role, binding.clone(), exists, &published).await;
        if let BindingResult::Waiting(..) = result {
            continue;
        }
        let mut core = core.borrow_mut();
        let Some(state) = core.channels.get_mut(&key) else { continue };
        if state.generation != generation {
            continue;
        }
        state.waiting.retain(|b| b != &binding);
        match result {
            BindingResult::Active(bound, infos) => {
                for info in infos {
                    core.tables.insert((Arc::from(info.schema.as_str()), Arc::from(info.table.as_str())), info);
                }
                core.activate(key, bound);
                core.acknowledge(key);
            }
            BindingResult::Failed(message) => core.system(key, "error", message),
            BindingResult::Waiting(..) => unreachable!("skipped above"),
        }
    }
    // Wildcards: compile for newly published tables.
    let wildcards: Vec<(ChannelKey, usize)> = core.borrow().wildcards.iter().copied().collect();
    for (key, index) in wildcards {
        let (role, binding, known) = {
            let core = core.borrow();
            let Some(state) = core.channels.get(&key) else { continue };
            let bound = &state.active[index];
            (Arc::clone(&state.role), bound.binding.clone(), bound.tables.keys().cloned().collect::<AHashSet<_>>())
        };
        for (schema, table) in &published {
            let table_key: TableKey = (Arc::from(schema.as_str()), Arc::from(table.as_str()));
            let matches = (binding.schema == "*" || &binding.schema == schema) && (binding.table == "*" || &binding.table == table);
            if !matches || known.contains(&table_key) {
                continue;
            }
            let Some(info) = sql::table_info(meta, schema, table).await? else { continue };
            if let Ok(compiled) = compile_for_table(meta, &role, &binding, &info).await {
                let mut core = core.borrow_mut();
                core.tables.insert(table_key.clone(), info);
                if let Some(state) = core.channels.get_mut(&key) {
                    if let Some(bound) = state.active.get_mut(index) {
                        bound.tables.insert(table_key, compiled);
                    }
                }
            }
        }
    }
    Ok(())
}

/// The kind of a row change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Insert,
    Update,
    Delete,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Insert => "INSERT",
            Kind::Update => "UPDATE",
            Kind::Delete => "DELETE",
        }
    }

    fn wanted_by(self, event: EventFilter) -> bool {
        matches!(
            (event, self),
            (EventFilter::All, _) | (EventFilter::Insert, Kind::Insert) | (EventFilter::Update, Kind::Update) | (EventFilter::Delete, Kind::Delete)
        )
    }
}

/// A change ready to match: its rows as cell accessors.
struct Row<'a> {
    kind: Kind,
    relation: &'a RelInfo,
    new: Option<&'a Tuple>,
    old: Option<(OldKind, &'a Tuple)>,
}

impl<'a> Row<'a> {
    fn of(change: &'a RowChange, relations: &'a AHashMap<u32, RelInfo>) -> Option<Row<'a>> {
        Some(match change {
            RowChange::Insert { relation, new } => Row { kind: Kind::Insert, relation: relations.get(relation)?, new: Some(new), old: None },
            RowChange::Update { relation, old, new } => {
                Row { kind: Kind::Update, relation: relations.get(relation)?, new: Some(new), old: old.as_ref().map(|(k, t)| (*k, t)) }
            }
            RowChange::Delete { relation, old } => Row { kind: Kind::Delete, relation: relations.get(relation)?, new: None, old: Some((old.0, &old.1)) },
        })
    }

    /// A cell of the new row (INSERT/UPDATE): `None` = absent (unchanged TOAST without a full
    /// old row), `Some(None)` = NULL.
    fn new_cell(&self, index: usize) -> Option<Option<&'a [u8]>> {
        let new = self.new?;
        match new.0.get(index)? {
            Cell::Null => Some(None),
            Cell::Text(bytes) | Cell::Binary(bytes) => Some(Some(&bytes[..])),
            Cell::UnchangedToast => match self.old {
                Some((OldKind::Full, old)) => match old.0.get(index)? {
                    Cell::Text(bytes) | Cell::Binary(bytes) => Some(Some(&bytes[..])),
                    Cell::Null => Some(None),
                    Cell::UnchangedToast => None,
                },
                _ => None,
            },
        }
    }

    /// A cell of the old row: only replica-identity columns for key-only images.
    fn old_cell(&self, index: usize) -> Option<Option<&'a [u8]>> {
        let (kind, old) = self.old?;
        if kind == OldKind::Key && !self.relation.relation.columns.get(index)?.key {
            return None;
        }
        match old.0.get(index)? {
            Cell::Null => Some(None),
            Cell::Text(bytes) | Cell::Binary(bytes) => Some(Some(&bytes[..])),
            Cell::UnchangedToast => None,
        }
    }

    /// The image filters test: the new row, or the old one for DELETE (PROTOCOL.md §5.2).
    fn filter_cell(&self, index: usize) -> Option<Option<&'a [u8]>> {
        match self.kind {
            Kind::Delete => self.old_cell(index),
            _ => self.new_cell(index),
        }
    }
}

/// One channel's interest in one change.
struct Interest {
    key: ChannelKey,
    ids: SmallVec<[u32; 4]>,
    visible: Arc<Vec<bool>>,
    key_visible: bool,
    claims_group: Option<ClaimsGroup>,
}

async fn process(core: &Rc<RefCell<Core>>, rls: &Db, batch: Vec<Arc<Txn>>) {
    // 1. Match (no awaits: the core is borrowed).
    let mut matched: Vec<(Arc<Txn>, usize, Vec<Interest>)> = Vec::new();
    {
        let core = core.borrow();
        for txn in &batch {
            for (index, change) in txn.changes.iter().enumerate() {
                let Some(row) = Row::of(change, &core.relations) else { continue };
                if row.kind == Kind::Insert && &*row.relation.schema == "realtime" && &*row.relation.table == "messages" {
                    if let Some((topic, message)) = database_broadcast(&row, core.payload_bytes_max) {
                        let owner = topic.owner(core.shards.shards());
                        core.send(owner, PgOut::Publish { topic, message });
                    }
                }
                let interests = match_change(&core, &row);
                if !interests.is_empty() {
                    matched.push((Arc::clone(txn), index, interests));
                }
            }
        }
    }
    tracing::debug!(txns = batch.len(), matched = matched.len(), "batch matched");
    if matched.is_empty() {
        return;
    }
    // 2. RLS: one query per (table, role + claims) for the whole batch.
    let mut requests: RlsRequests = AHashMap::new();
    {
        let core = core.borrow();
        for (m, (txn, index, interests)) in matched.iter().enumerate() {
            let Some(row) = Row::of(&txn.changes[*index], &core.relations) else { continue };
            let table_key: TableKey = (Arc::clone(&row.relation.schema), Arc::clone(&row.relation.table));
            let Some(table) = core.tables.get(&table_key) else { continue };
            if row.kind == Kind::Delete || !table.rls_enabled || table.primary_key.is_empty() {
                continue;
            }
            let Some(pk) = primary_key_values(&row, table) else { continue };
            let mut seen = AHashSet::new();
            for interest in interests {
                if let Some((role, claims)) = &interest.claims_group {
                    if seen.insert((Arc::clone(role), Arc::clone(claims))) {
                        requests.entry((table_key.clone(), Arc::clone(role), Arc::clone(claims))).or_default().push((m, pk.clone()));
                    }
                }
            }
        }
    }
    // (matched index, role, claims) → visible / error. One round trip per table for all of
    // its claims groups.
    let mut verdicts: Verdicts = AHashMap::new();
    let mut by_table: AHashMap<TableKey, Vec<(ClaimsGroup, KeysToCheck)>> = AHashMap::new();
    for ((table_key, role, claims), rows) in requests {
        by_table.entry(table_key).or_default().push(((role, claims), rows));
    }
    for (table_key, groups) in by_table {
        let table = core.borrow().tables.get(&table_key).cloned();
        let Some(table) = table else { continue };
        let keys: Vec<Vec<Vec<String>>> = groups.iter().map(|(_, rows)| rows.iter().map(|(_, pk)| pk.clone()).collect()).collect();
        let request: Vec<sql::RlsGroup<'_>> = groups
            .iter()
            .zip(&keys)
            .map(|(((role, claims), _), rows)| sql::RlsGroup { role, claims_json: claims, rows })
            .collect();
        core.borrow().stats.rls_queries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let results: Vec<Result<Vec<bool>, String>> = match rls.get().await {
            Ok(client) => sql::rls_visible_groups(&client, &table, &request).await.into_iter().map(|r| r.map_err(|e| sql::error_text(&e))).collect(),
            Err(_) => groups.iter().map(|_| Err(SystemMessage::DatabaseUnreachable.text().into_owned())).collect(),
        };
        for (((role, claims), rows), result) in groups.iter().zip(results) {
            match result {
                Ok(visible) => {
                    for ((m, _), ok) in rows.iter().zip(visible) {
                        verdicts.insert((*m, Arc::clone(role), Arc::clone(claims)), Ok(ok));
                    }
                }
                Err(error) => {
                    let message: Arc<str> = Arc::from(error.as_str());
                    tracing::warn!(role = %role, table = %table.table, error = %message, "RLS check failed for one claims group");
                    for (m, _) in rows {
                        verdicts.insert((*m, Arc::clone(role), Arc::clone(claims)), Err(Arc::clone(&message)));
                    }
                }
            }
        }
    }
    // 3. Payloads and delivery.
    let core = core.borrow();
    for (m, (txn, index, interests)) in matched.iter().enumerate() {
        let Some(row) = Row::of(&txn.changes[*index], &core.relations) else { continue };
        let table_key: TableKey = (Arc::clone(&row.relation.schema), Arc::clone(&row.relation.table));
        let Some(table) = core.tables.get(&table_key) else { continue };
        deliver_change(&core, txn, &row, table, m, interests, &verdicts);
    }
}

/// A row inserted into `realtime.messages` as a broadcast (PROTOCOL.md §3.4): topic, event,
/// `binary_payload` if set else `payload`, metadata `{"id": "<row id>"}`; rows missing any of
/// them (or over the payload limit) are skipped.
fn database_broadcast(row: &Row<'_>, payload_bytes_max: usize) -> Option<(engine::TopicKey, Arc<engine::Broadcast>)> {
    let cell = |name: &str| -> Option<Option<&[u8]>> { row.new_cell(*row.relation.index.get(name)?) };
    let text = |name: &str| cell(name).flatten().and_then(|b| std::str::from_utf8(b).ok());
    let topic = text("topic")?;
    let event = text("event")?;
    let id = text("id")?;
    let private = match cell("private").flatten()? {
        b"t" => true,
        b"f" => false,
        _ => return None,
    };
    text("inserted_at")?;
    let (encoding, payload) = match (cell("binary_payload").flatten(), cell("payload").flatten()) {
        (Some(hex), _) => {
            let digits = hex.strip_prefix(b"\\x").unwrap_or(hex);
            (engine::broadcast::PayloadEncoding::Binary, Bytes::from(decode_hex(digits)?))
        }
        (None, Some(json)) => (engine::broadcast::PayloadEncoding::Json, Bytes::copy_from_slice(json)),
        (None, None) => return None,
    };
    if payload.len() > payload_bytes_max {
        tracing::warn!(topic, "database broadcast over the payload limit dropped");
        return None;
    }
    let mut metadata = Vec::with_capacity(id.len() + 10);
    metadata.extend_from_slice(b"{\"id\":");
    write_str(&mut metadata, id);
    metadata.push(b'}');
    let message = engine::Broadcast {
        origin: None,
        body: engine::BroadcastBody::User { event: Bytes::copy_from_slice(event.as_bytes()), encoding, payload, metadata: Bytes::from(metadata) },
    };
    Some((engine::TopicKey::new_sub(topic, private), Arc::new(message)))
}

fn decode_hex(digits: &[u8]) -> Option<Vec<u8>> {
    if !digits.len().is_multiple_of(2) {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    digits.chunks(2).map(|pair| Some(nibble(pair[0])? << 4 | nibble(pair[1])?)).collect()
}

fn primary_key_values(row: &Row<'_>, table: &TableInfo) -> Option<Vec<String>> {
    table
        .primary_key
        .iter()
        .map(|name| {
            let index = *row.relation.index.get(name)?;
            row.new_cell(index)?.map(|b| String::from_utf8_lossy(b).into_owned())
        })
        .collect()
}

fn match_change(core: &Core, row: &Row<'_>) -> Vec<Interest> {
    let table_key: TableKey = (Arc::clone(&row.relation.schema), Arc::clone(&row.relation.table));
    let mut by_channel: AHashMap<ChannelKey, Interest> = AHashMap::new();
    let exact = core.by_table.get(&table_key).into_iter().flatten();
    for &(key, index) in exact.chain(core.wildcards.iter()) {
        let Some(state) = core.channels.get(&key) else { continue };
        let Some(bound) = state.active.get(index) else { continue };
        if !row.kind.wanted_by(bound.binding.event) {
            continue;
        }
        let Some(compiled) = bound.tables.get(&table_key) else { continue };
        let passes = compiled.filters.iter().all(|(column, filter)| {
            let Some(&position) = row.relation.index.get(column) else { return false };
            filter.matches(|_| row.filter_cell(position))
        });
        if !passes {
            continue;
        }
        let interest = by_channel.entry(key).or_insert_with(|| Interest {
            key,
            ids: SmallVec::new(),
            visible: Arc::clone(&compiled.visible),
            key_visible: compiled.key_visible,
            claims_group: (!state.bypasses_rls).then(|| (Arc::clone(&state.role), Arc::clone(&state.claims))),
        });
        if !interest.ids.contains(&bound.binding.id) {
            interest.ids.push(bound.binding.id);
        }
    }
    by_channel.into_values().collect()
}

/// A claims group: role and claims JSON.
type ClaimsGroup = (Arc<str>, Arc<str>);
/// (matched change index, claims group) → visible, or the check's error.
type Verdicts = AHashMap<(usize, Arc<str>, Arc<str>), Result<bool, Arc<str>>>;
/// (table, claims group) → (matched change index, primary key values) to check.
type RlsRequests = AHashMap<(TableKey, Arc<str>, Arc<str>), Vec<(usize, Vec<String>)>>;

/// (matched change index, primary key values) of one claims group's checks.
type KeysToCheck = Vec<(usize, Vec<String>)>;

/// What a channel gets for a change.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Variant {
    Row(Arc<Vec<bool>>),
    Error(Arc<str>),
}

fn deliver_change(
    core: &Core,
    txn: &Txn,
    row: &Row<'_>,
    table: &TableInfo,
    m: usize,
    interests: &[Interest],
    verdicts: &Verdicts,
) {
    let no_key = table.primary_key.is_empty() && row.kind != Kind::Delete;
    let mut groups: AHashMap<(SmallVec<[u32; 4]>, Variant), Vec<ChannelKey>> = AHashMap::new();
    for interest in interests {
        let variant = if no_key {
            Variant::Error(Arc::from(RowError::NoPrimaryKey.text()))
        } else if !interest.key_visible && row.kind != Kind::Delete {
            Variant::Error(Arc::from(RowError::Unauthorized.text()))
        } else {
            match (&interest.claims_group, row.kind) {
                (Some((role, claims)), Kind::Insert | Kind::Update) if table.rls_enabled => {
                    match verdicts.get(&(m, Arc::clone(role), Arc::clone(claims))) {
                        Some(Ok(true)) => Variant::Row(Arc::clone(&interest.visible)),
                        Some(Ok(false)) | None => continue,
                        Some(Err(message)) => Variant::Error(Arc::clone(message)),
                    }
                }
                _ => Variant::Row(Arc::clone(&interest.visible)),
            }
        };
        let mut ids = interest.ids.clone();
        ids.sort_unstable();
        groups.entry((ids, variant)).or_default().push(interest.key);
    }
    let mut data_cache: AHashMap<Variant, (Bytes, Bytes)> = AHashMap::new();
    for ((ids, variant), keys) in groups {
        let (data_v1, data_v2) = data_cache
            .entry(variant.clone())
            .or_insert_with(|| build_data(txn, row, table, &variant))
            .clone();
        let ids_json = format!("[{}]", ids.iter().map(u32::to_string).collect::<Vec<_>>().join(","));
        let wrap = |data: &Bytes| {
            let mut out = Vec::with_capacity(data.len() + ids_json.len() + 20);
            out.extend_from_slice(b"{\"ids\":");
            out.extend_from_slice(ids_json.as_bytes());
            out.extend_from_slice(b",\"data\":");
            out.extend_from_slice(data);
            out.push(b'}');
            Bytes::from(out)
        };
        let (payload_v1, payload_v2) = (wrap(&data_v1), wrap(&data_v2));
        let mut per_shard: AHashMap<ShardId, Vec<(ConnId, ChannelSerial)>> = AHashMap::new();
        for key in &keys {
            per_shard.entry(key.shard).or_default().push((key.conn, key.channel));
        }
        core.stats.deliveries.fetch_add(keys.len() as u64, std::sync::atomic::Ordering::Relaxed);
        for (shard, targets) in per_shard {
            let delivery = ChangeDelivery { payload_v1: payload_v1.clone(), payload_v2: payload_v2.clone(), targets };
            core.send(shard, PgOut::Change(Arc::new(delivery)));
        }
    }
}

fn write_str(out: &mut Vec<u8>, text: &str) {
    serde_json::to_writer(&mut *out, text).expect("writing to a Vec cannot fail");
}

/// Writes `{"col": value, ...}` for the columns `cell` yields, visible ones only; returns
/// whether anything was cut for size.
fn write_record<'a>(out: &mut Vec<u8>, row: &Row<'a>, table: &TableInfo, visible: &[bool], cell: impl Fn(usize) -> Option<Option<&'a [u8]>>, only_key: bool, cut: bool) {
    out.push(b'{');
    let mut first = true;
    for (i, column) in row.relation.relation.columns.iter().enumerate() {
        let table_index = table.columns.iter().position(|c| c.name == column.name);
        if !table_index.is_some_and(|t| visible.get(t).copied().unwrap_or(false)) {
            continue;
        }
        if only_key && !table.primary_key.contains(&column.name) {
            continue;
        }
        let Some(value) = cell(i) else { continue };
        let mut rendered = Vec::new();
        match value {
            None => rendered.extend_from_slice(b"null"),
            Some(text) => value::write_json_value(column.type_oid, text, &mut rendered),
        }
        if cut && rendered.len() > FIELD_BYTES_MAX_WHEN_CUT {
            continue;
        }
        if !first {
            out.push(b',');
        }
        first = false;
        write_str(out, &column.name);
        out.push(b':');
        out.extend_from_slice(&rendered);
    }
    out.push(b'}');
}

/// The `data` object for V1 and V2 (PROTOCOL.md §5.5, §5.6).
fn build_data(txn: &Txn, row: &Row<'_>, table: &TableInfo, variant: &Variant) -> (Bytes, Bytes) {
    let mut head = Vec::with_capacity(256);
    head.extend_from_slice(b"{\"schema\":");
    write_str(&mut head, &table.schema);
    head.extend_from_slice(b",\"table\":");
    write_str(&mut head, &table.table);
    head.extend_from_slice(b",\"type\":");
    write_str(&mut head, row.kind.name());
    let (v2, record, old_record) = match variant {
        Variant::Error(message) => {
            let mut body = head.clone();
            body.extend_from_slice(b",\"columns\":[],\"commit_timestamp\":null");
            let (record, old_record): (Option<&[u8]>, Option<&[u8]>) = match row.kind {
                Kind::Insert => (Some(b"{}"), None),
                Kind::Update => (Some(b"{}"), Some(b"{}")),
                Kind::Delete => (None, Some(b"{}")),
            };
            if let Some(r) = record {
                body.extend_from_slice(b",\"record\":");
                body.extend_from_slice(r);
            }
            if let Some(o) = old_record {
                body.extend_from_slice(b",\"old_record\":");
                body.extend_from_slice(o);
            }
            body.extend_from_slice(b",\"errors\":[");
            write_str(&mut body, message);
            body.push(b']');
            (body, record.map(<[u8]>::to_vec), old_record.map(<[u8]>::to_vec))
        }
        Variant::Row(visible) => {
            let mut body = head.clone();
            body.extend_from_slice(b",\"commit_timestamp\":");
            write_str(&mut body, &value::format_commit_timestamp(txn.commit_time));
            body.extend_from_slice(b",\"columns\":[");
            let mut first = true;
            for (i, column) in table.columns.iter().enumerate() {
                if !visible.get(i).copied().unwrap_or(false) {
                    continue;
                }
                if !first {
                    body.push(b',');
                }
                first = false;
                body.extend_from_slice(b"{\"name\":");
                write_str(&mut body, &column.name);
                body.extend_from_slice(b",\"type\":");
                write_str(&mut body, &column.type_name);
                body.push(b'}');
            }
            body.push(b']');
            let render = |cut: bool| {
                let record = (row.kind != Kind::Delete).then(|| {
                    let mut out = Vec::new();
                    write_record(&mut out, row, table, visible, |i| row.new_cell(i), false, cut);
                    out
                });
                let old_record = (row.kind != Kind::Insert).then(|| {
                    let mut out = Vec::new();
                    let reduce_to_key = row.kind == Kind::Delete && table.rls_enabled;
                    if row.old.is_some() {
                        write_record(&mut out, row, table, visible, |i| row.old_cell(i), reduce_to_key, cut);
                    } else if row.relation.relation.replica_identity == b'n' {
                        out.extend_from_slice(b"{}");
                    } else {
                        // Default identity and an unchanged key: the key, from the new row.
                        write_record(&mut out, row, table, visible, |i| row.new_cell(i), true, cut);
                    }
                    out
                });
                (record, old_record)
            };
            let (mut record, mut old_record) = render(false);
            let size = record.as_ref().map_or(0, Vec::len) + old_record.as_ref().map_or(0, Vec::len);
            let too_big = size > RECORD_BYTES_MAX;
            if too_big {
                (record, old_record) = render(true);
            }
            if let Some(r) = &record {
                body.extend_from_slice(b",\"record\":");
                body.extend_from_slice(r);
            }
            if let Some(o) = &old_record {
                body.extend_from_slice(b",\"old_record\":");
                body.extend_from_slice(o);
            }
            if too_big {
                body.extend_from_slice(b",\"errors\":[");
                write_str(&mut body, RowError::PayloadTooLarge.text());
                body.push(b']');
            } else {
                body.extend_from_slice(b",\"errors\":null");
            }
            (body, record, old_record)
        }
    };
    let mut v1 = v2.clone();
    v1.extend_from_slice(b",\"eventType\":");
    write_str(&mut v1, row.kind.name());
    v1.extend_from_slice(b",\"new\":");
    v1.extend_from_slice(record.as_deref().unwrap_or(b"{}"));
    v1.extend_from_slice(b",\"old\":");
    v1.extend_from_slice(old_record.as_deref().unwrap_or(b"{}"));
    v1.push(b'}');
    let mut v2 = v2;
    v2.push(b'}');
    (Bytes::from(v1), Bytes::from(v2))
}
