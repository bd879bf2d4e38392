//! `ChangesCore`: the Postgres Changes state machine, without IO.
//!
//! It holds the subscription registry (channels, their bindings compiled per table, the
//! table → bindings index), the relations and table metadata the stream announced, and whether
//! the stream is up. The driver (`super`, tokio) feeds it WAL events, commands and the results
//! of the queries it ran, and drains [`ChangesCore::poll_out`] into the shards' queues:
//!
//! ```text
//!  WalEvent ──▶ stream_up / stream_down / stream_failed / relation / match_batch
//!  Command  ──▶ handle_command(now)                      ──▶ poll_out()    → (ShardId, PgOut)
//!  results  ──▶ finish_subscribe / policy_done / replay_done  poll_query()  → Query to run
//!               deliver (with the verdicts of plan_rls)       poll_caller() → a REST caller's answer
//! ```
//!
//! Races are decided here, with generations: a subscription's metadata answer is applied only
//! if the channel still has the generation the answer was asked for (not replaced or left
//! meanwhile), and a matched change is delivered only to channels that still have the
//! generation they had when it was matched (an Unsubscribe that arrives while the batch's RLS
//! queries run wins). The seeded simulation in `core/tests.rs` drives all of it with query
//! completions reordered against WAL events, Subscribes and Unsubscribes.

use std::collections::VecDeque;
use std::sync::Arc;

use ahash::{AHashMap, AHashSet};
use smallvec::SmallVec;

use engine::client_error::{BindingException, ChangesNotice, RowError};
use engine::ShardId;

use super::payload::{self, Variant};
use super::row::{row_image, Kind, RelInfo, Row, TableKey};
use super::policy_cache::{Lookup, PolicyCache};
use super::{AuthzReply, CallerReply, ChannelKey, Command, PgOut, ReplayedMessage, Subscription};
use crate::policy::{AuthzRequest, AuthzResult};
use crate::binding::Binding;
use crate::filter::{self, Collation, Filter};
use crate::pgoutput::Relation;
use crate::reader::Txn;
use crate::sql::TableInfo;

/// A binding with its table-specific compiled parts.
#[derive(Debug)]
pub(crate) struct Bound {
    pub(crate) binding: Binding,
    /// Per matched table: filters compiled against its columns, and visible columns.
    pub(crate) tables: AHashMap<TableKey, Compiled>,
}

impl Bound {
    /// Some table's compiled filters need the database (collated text).
    fn has_database_filters(&self) -> bool {
        self.tables.values().any(|c| c.database)
    }
}

/// A binding compiled for one table.
#[derive(Debug, Clone)]
pub(crate) struct Compiled {
    filters: Vec<(String, Filter)>,
    /// Columns delivered (privileges ∩ select + primary key), by `attnum` order.
    visible: Arc<Vec<bool>>,
    /// The role can read every primary-key column.
    key_visible: bool,
    /// Some filter compares text under a collation PostgreSQL must evaluate.
    database: bool,
}

/// What the metadata queries found for one binding.
#[derive(Debug)]
pub(crate) enum BindingResult {
    /// Compiled for at least one published table (with that table's metadata).
    Active(Bound, Vec<Arc<TableInfo>>),
    /// No published table matches yet: the message, and the binding to retry.
    Waiting(Binding, String),
    /// Refused, with the message.
    Failed(String),
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

/// A claims group: role and claims JSON. Subscribers with identical claims share RLS checks.
pub(crate) type ClaimsGroup = (Arc<str>, Arc<str>);

/// One channel's interest in one change.
#[derive(Debug)]
pub(crate) struct Interest {
    key: ChannelKey,
    generation: u64,
    ids: SmallVec<[u32; 4]>,
    /// Bindings whose text comparison could not be asked of the database (the round trip
    /// failed), with its error: delivered as an error entry when no other binding matched.
    /// Boxed: the rare path must not grow every interest (a batch may hold 200,000).
    unknown: Option<Box<(SmallVec<[u32; 4]>, Arc<str>)>>,
    visible: Arc<Vec<bool>>,
    key_visible: bool,
    claims_group: Option<ClaimsGroup>,
}

/// A batch of transactions after matching: each change with at least one interested channel.
#[derive(Debug, Default)]
pub(crate) struct MatchedBatch {
    changes: Vec<(Arc<Txn>, usize, Vec<Interest>)>,
}

impl MatchedBatch {
    /// No change matched anything.
    pub(crate) fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// Number of matched changes.
    pub(crate) fn len(&self) -> usize {
        self.changes.len()
    }
}

/// A (column value, filter operand) pair of text whose order the database decides.
pub(crate) type TextPair = (Box<[u8]>, Box<[u8]>);

/// (value, operand) text pairs to order under one collation, for the batch's filters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TextOrderQuery {
    /// The collation (and the column type) to compare under.
    pub(crate) collation: Arc<Collation>,
    /// Distinct pairs, sorted.
    pub(crate) pairs: Vec<TextPair>,
}

/// The answers of a batch's [`TextOrderQuery`]s: the order of each pair, or why a collation's
/// comparisons could not be made.
#[derive(Debug, Default)]
pub(crate) struct TextOrders {
    known: AHashMap<(Arc<Collation>, TextPair), std::cmp::Ordering>,
    failed: AHashMap<Arc<Collation>, Arc<str>>,
}

impl TextOrders {
    /// Records one query's answer: one order per pair, or the error.
    pub(crate) fn record(&mut self, query: TextOrderQuery, result: Result<Vec<std::cmp::Ordering>, String>) {
        match result {
            Ok(orders) if orders.len() == query.pairs.len() => {
                for ((value, operand), order) in query.pairs.into_iter().zip(orders) {
                    self.known.insert((Arc::clone(&query.collation), (value, operand)), order);
                }
            }
            Ok(orders) => {
                // Never expected (one row per pair): treated as a failed comparison.
                tracing::warn!(collation = %query.collation.collation_sql, pairs = query.pairs.len(), rows = orders.len(), "text comparison for filters returned a wrong number of rows");
                self.failed.insert(query.collation, Arc::from(engine::client_error::SystemMessage::QueryCancelled.text().as_ref()));
            }
            Err(error) => {
                tracing::warn!(collation = %query.collation.collation_sql, %error, "text comparison for filters failed");
                self.failed.insert(query.collation, Arc::from(error.as_str()));
            }
        }
    }

    fn order(&self, collation: &Arc<Collation>, value: &[u8], operand: &[u8]) -> Option<std::cmp::Ordering> {
        self.known.get(&(Arc::clone(collation), (Box::from(value), Box::from(operand)))).copied()
    }
}

/// (matched change index, the row as committed) of one claims group's checks.
pub(crate) type KeysToCheck = Vec<(usize, Arc<crate::sql::RowImage>)>;

/// A wildcard binding to extend: (channel, binding index, role, binding, tables it covers).
pub(crate) type WildcardBinding = (ChannelKey, usize, Arc<str>, Binding, AHashSet<TableKey>);

/// One RLS round trip to run: a table and, per claims group, the primary keys to check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RlsQuery {
    /// The table.
    pub(crate) table: Arc<TableInfo>,
    /// Per claims group: (matched change index, the committed row) in order.
    pub(crate) groups: Vec<(ClaimsGroup, KeysToCheck)>,
}

/// (matched change index, role, claims) → visible, or the check's error.
#[derive(Debug, Default)]
pub(crate) struct Verdicts(AHashMap<(usize, Arc<str>, Arc<str>), Verdict>);

/// Visible or not, or why the check failed.
type Verdict = Result<bool, Arc<str>>;

impl Verdicts {
    /// Records the answer of one [`RlsQuery`]: per group, one visibility per key, or an error.
    pub(crate) fn record(&mut self, query: &RlsQuery, results: Vec<Result<Vec<bool>, String>>) {
        for (((role, claims), rows), result) in query.groups.iter().zip(results) {
            match result {
                Ok(visible) => {
                    for ((m, _), ok) in rows.iter().zip(visible) {
                        self.0.insert((*m, Arc::clone(role), Arc::clone(claims)), Ok(ok));
                    }
                }
                Err(error) => {
                    tracing::warn!(role = %role, table = %query.table.table, %error, "RLS check failed for one claims group");
                    let message: Arc<str> = Arc::from(error.as_str());
                    for (m, _) in rows {
                        self.0.insert((*m, Arc::clone(role), Arc::clone(claims)), Err(Arc::clone(&message)));
                    }
                }
            }
        }
    }
}

/// A query the driver runs for the core; the result comes back through the named method.
#[derive(Debug)]
pub(crate) enum Query {
    /// Validate a subscription (role, publication, table metadata, column privileges) →
    /// [`ChangesCore::finish_subscribe`] with this generation.
    Metadata {
        /// The subscription.
        subscription: Subscription,
        /// Its generation.
        generation: u64,
    },
    /// A private-channel policy check → [`ChangesCore::policy_done`].
    Policy(AuthzRequest),
    /// A private channel's stored broadcasts → [`ChangesCore::replay_done`].
    Replay {
        /// The channel.
        key: ChannelKey,
        /// Sub-topic.
        topic: String,
        /// Unix ms.
        since_ms: i64,
        /// 1..=25.
        limit: i64,
    },
}

/// Counters the driver copies to `/metrics`-style stats.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counts {
    /// Changes delivered (per channel).
    pub(crate) deliveries: u64,
    /// RLS round trips planned.
    pub(crate) rls_queries: u64,
}

/// The Postgres Changes state machine.
pub(crate) struct ChangesCore {
    shards: usize,
    /// Whose database this core serves: database broadcasts carry it in their topic key.
    tenant: engine::TenantId,
    /// `REALTIME_MAX_PAYLOAD_BYTES`: database broadcasts over it are dropped, like client ones.
    payload_bytes_max: usize,
    stream_up: bool,
    /// The reader stopped on a definite error: nothing will be acknowledged again.
    stream_stopped: bool,
    relations: AHashMap<u32, RelInfo>,
    tables: AHashMap<TableKey, Arc<TableInfo>>,
    channels: AHashMap<ChannelKey, ChannelState>,
    by_table: AHashMap<TableKey, AHashSet<(ChannelKey, usize)>>,
    wildcards: AHashSet<(ChannelKey, usize)>,
    /// Active bindings with a filter the database must evaluate (collated text): while 0, a
    /// batch needs no text-order round trip and [`ChangesCore::plan_text_orders`] returns at once.
    database_bindings: usize,
    next_generation: u64,
    out: VecDeque<(ShardId, PgOut)>,
    queries: VecDeque<Query>,
    callers: VecDeque<(CallerReply, AuthzResult)>,
    policy: PolicyCache,
    counts: Counts,
}

impl ChangesCore {
    /// A core for `shards` shards.
    pub(crate) fn new(shards: usize, payload_bytes_max: usize) -> ChangesCore {
        ChangesCore {
            shards,
            tenant: engine::TenantId::SINGLE,
            payload_bytes_max,
            stream_up: false,
            stream_stopped: false,
            relations: AHashMap::new(),
            tables: AHashMap::new(),
            channels: AHashMap::new(),
            by_table: AHashMap::new(),
            wildcards: AHashSet::new(),
            database_bindings: 0,
            next_generation: 1,
            out: VecDeque::new(),
            queries: VecDeque::new(),
            callers: VecDeque::new(),
            policy: PolicyCache::default(),
            counts: Counts::default(),
        }
    }

    /// The next message for a shard.
    pub(crate) fn poll_out(&mut self) -> Option<(ShardId, PgOut)> {
        self.out.pop_front()
    }

    /// The next query to run.
    pub(crate) fn poll_query(&mut self) -> Option<Query> {
        self.queries.pop_front()
    }

    /// The next answer for a waiting REST caller.
    pub(crate) fn poll_caller(&mut self) -> Option<(CallerReply, AuthzResult)> {
        self.callers.pop_front()
    }

    /// A command from a session (`now` for the policy cache).
    pub(crate) fn handle_command(&mut self, command: Command, now: std::time::Instant) {
        match command {
            Command::Subscribe(subscription) => {
                let generation = self.begin_subscribe(subscription.key);
                self.queries.push_back(Query::Metadata { subscription, generation });
            }
            Command::Unsubscribe(key) => self.unsubscribe(key),
            Command::Authorize { request, reply } => match self.policy.request(request, reply, now) {
                Lookup::Answer(request, reply, result) => self.authorized(&request, reply, result),
                Lookup::Query(request) => self.queries.push_back(Query::Policy(request)),
                Lookup::Wait => {}
            },
            Command::Replay { key, topic, since_ms, limit } => self.queries.push_back(Query::Replay { key, topic, since_ms, limit }),
        }
    }

    /// A policy check ran: every reply waiting for it gets the answer.
    pub(crate) fn policy_done(&mut self, request: &AuthzRequest, result: AuthzResult, now: std::time::Instant) {
        for reply in self.policy.complete(request, &result, now) {
            self.authorized(request, reply, result.clone());
        }
    }

    fn authorized(&mut self, request: &AuthzRequest, reply: AuthzReply, result: AuthzResult) {
        match reply {
            AuthzReply::Channel(key) => self.send(key.shard, PgOut::Authorized { conn: key.conn, channel: key.channel, kind: request.kind, result }),
            AuthzReply::Caller(reply) => self.callers.push_back((reply, result)),
        }
    }

    /// A replay query ran.
    pub(crate) fn replay_done(&mut self, key: ChannelKey, result: Result<Vec<ReplayedMessage>, String>) {
        self.send(key.shard, PgOut::Replayed { conn: key.conn, channel: key.channel, result });
    }

    /// Counters so far.
    pub(crate) fn counts(&self) -> Counts {
        self.counts
    }

    /// Channels with a subscription (active, waiting or being validated).
    pub(crate) fn channel_count(&self) -> usize {
        self.channels.len()
    }

    /// Whether nothing is registered at all (every index empty).
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.channels.is_empty() && self.by_table.is_empty() && self.wildcards.is_empty() && self.database_bindings == 0
    }

    /// Whether publication polling has work: waiting bindings or wildcards to extend.
    pub(crate) fn wants_publication_poll(&self) -> bool {
        self.channels.values().any(|c| !c.waiting.is_empty()) || !self.wildcards.is_empty()
    }

    fn send(&mut self, shard: ShardId, out: PgOut) {
        self.out.push_back((shard, out));
    }

    /// A `system` message for one channel.
    pub(crate) fn system(&mut self, key: ChannelKey, status: &'static str, message: String) {
        self.send(key.shard, PgOut::System { conn: key.conn, channel: key.channel, status, message });
    }

    fn notice(&mut self, key: ChannelKey, notice: &ChangesNotice) {
        self.system(key, notice.status(), notice.text().into_owned());
    }

    // --- the stream -------------------------------------------------------------------------

    /// The stream is up (`reads_publication`: it includes `supabase_realtime`; without it,
    /// Postgres Changes are not live and nothing is acknowledged).
    pub(crate) fn stream_up(&mut self, reads_publication: bool) {
        if !reads_publication {
            self.stream_up = false;
            return;
        }
        self.stream_up = true;
        for key in self.active_channels() {
            self.channels.get_mut(&key).expect("listed").ack_pending = false;
            self.notice(key, &ChangesNotice::Subscribed);
        }
    }

    /// The stream is restarting to read a publication that appeared: no acknowledgement until
    /// the next `stream_up`.
    pub(crate) fn stream_restarting(&mut self) {
        self.stream_up = false;
    }

    /// The stream dropped; subscribers are told.
    pub(crate) fn stream_down(&mut self, reason: String) {
        self.stream_up = false;
        let notice = ChangesNotice::StreamLost { reason };
        for key in self.active_channels() {
            self.notice(key, &notice);
        }
    }

    /// The slot was recreated: changes committed while the stream was down are lost;
    /// subscribers are told (so apps refetch).
    pub(crate) fn changes_missed(&mut self) {
        for key in self.active_channels() {
            self.notice(key, &ChangesNotice::ChangesMissed);
        }
    }

    /// The stream stopped for good (a definite error); subscribers are told, and later
    /// subscriptions at once.
    pub(crate) fn stream_failed(&mut self) {
        self.stream_up = false;
        self.stream_stopped = true;
        for key in self.active_channels() {
            self.notice(key, &ChangesNotice::StreamStopped);
        }
    }

    fn active_channels(&self) -> Vec<ChannelKey> {
        let mut keys: Vec<ChannelKey> = self.channels.iter().filter(|(_, c)| !c.active.is_empty()).map(|(k, _)| *k).collect();
        keys.sort_unstable();
        keys
    }

    /// A relation message; returns the table's key when the core already knows the table (its
    /// metadata should be refreshed: it may have been altered).
    pub(crate) fn relation(&mut self, relation: Relation) -> Option<TableKey> {
        let info = RelInfo::new(relation);
        let key = info.key();
        let known = self.tables.contains_key(&key);
        self.relations.insert(info.relation.oid, info);
        known.then_some(key)
    }

    /// Fresh metadata of a table.
    pub(crate) fn table_refreshed(&mut self, info: Arc<TableInfo>) {
        self.tables.insert((Arc::from(info.schema.as_str()), Arc::from(info.table.as_str())), info);
    }

    // --- subscriptions ----------------------------------------------------------------------

    /// Registers an incoming subscription (replacing an older one of the same channel); the
    /// driver runs its metadata queries and calls [`Self::finish_subscribe`] with this
    /// generation.
    pub(crate) fn begin_subscribe(&mut self, key: ChannelKey) -> u64 {
        self.unsubscribe(key);
        let generation = self.next_generation;
        self.next_generation += 1;
        let state = ChannelState {
            generation,
            role: Arc::from(""),
            claims: Arc::from(""),
            bypasses_rls: false,
            active: Vec::new(),
            waiting: Vec::new(),
            ack_pending: false,
        };
        self.channels.insert(key, state);
        generation
    }

    /// The channel left or its connection closed: everything of it goes.
    pub(crate) fn unsubscribe(&mut self, key: ChannelKey) {
        let Some(state) = self.channels.remove(&key) else { return };
        self.database_bindings = self.database_bindings.saturating_sub(state.active.iter().filter(|b| b.has_database_filters()).count());
        for (index, bound) in state.active.iter().enumerate() {
            if bound.binding.is_wildcard() {
                self.wildcards.remove(&(key, index));
            } else {
                let table = table_key_of(&bound.binding);
                if let Some(set) = self.by_table.get_mut(&table) {
                    set.remove(&(key, index));
                    if set.is_empty() {
                        self.by_table.remove(&table);
                    }
                }
            }
        }
    }

    /// Whether `key` still has subscription `generation`.
    pub(crate) fn is_current(&self, key: ChannelKey, generation: u64) -> bool {
        self.channels.get(&key).is_some_and(|c| c.generation == generation)
    }

    fn activate(&mut self, key: ChannelKey, bound: Bound, infos: Vec<Arc<TableInfo>>) {
        for info in infos {
            self.table_refreshed(info);
        }
        let state = self.channels.get_mut(&key).expect("caller checked");
        let index = state.active.len();
        if bound.has_database_filters() {
            self.database_bindings += 1;
        }
        if bound.binding.is_wildcard() {
            self.wildcards.insert((key, index));
        } else {
            self.by_table.entry(table_key_of(&bound.binding)).or_default().insert((key, index));
        }
        state.active.push(bound);
    }

    /// A channel got active bindings: acknowledge now if the stream is up, at the next
    /// `stream_up` otherwise, or say at once that the stream stopped for good.
    fn acknowledge(&mut self, key: ChannelKey) {
        if self.stream_stopped {
            self.notice(key, &ChangesNotice::StreamStopped);
        } else if self.stream_up {
            self.notice(key, &ChangesNotice::Subscribed);
        } else {
            self.channels.get_mut(&key).expect("present").ack_pending = true;
        }
    }

    /// The metadata answer of subscription `generation` (PROTOCOL.md §5.1–5.4): `Err` when the
    /// queries could not run, else whether the role bypasses RLS and one result per binding.
    /// Ignored when the channel was replaced or left meanwhile.
    pub(crate) fn finish_subscribe(&mut self, key: ChannelKey, generation: u64, role: &str, claims_json: &str, outcome: Result<(bool, Vec<BindingResult>), String>) {
        if !self.is_current(key, generation) {
            return;
        }
        let (bypasses_rls, results) = match outcome {
            Ok(outcome) => outcome,
            Err(message) => {
                self.system(key, "error", message);
                return;
            }
        };
        // All or nothing (PROTOCOL.md §5.1): a binding that fails for any reason other than an
        // unpublished table fails the whole channel, with exactly that one message (§5.4).
        if let Some(BindingResult::Failed(message)) = results.iter().find(|r| matches!(r, BindingResult::Failed(_))) {
            let message = message.clone();
            self.system(key, "error", message);
            return;
        }
        let state = self.channels.get_mut(&key).expect("current");
        state.role = Arc::from(role);
        state.claims = Arc::from(claims_json);
        state.bypasses_rls = bypasses_rls;
        let mut any_active = false;
        for result in results {
            match result {
                BindingResult::Active(bound, infos) => {
                    self.activate(key, bound, infos);
                    any_active = true;
                }
                BindingResult::Waiting(binding, message) => {
                    self.system(key, "error", message);
                    self.channels.get_mut(&key).expect("present").waiting.push(binding);
                }
                BindingResult::Failed(message) => self.system(key, "error", message),
            }
        }
        if any_active {
            self.acknowledge(key);
        }
    }

    /// Waiting bindings to retry against the publication: (channel, generation, role, binding).
    pub(crate) fn waiting_bindings(&self) -> Vec<(ChannelKey, u64, Arc<str>, Binding)> {
        self.channels
            .iter()
            .flat_map(|(key, c)| c.waiting.iter().map(move |b| (*key, c.generation, Arc::clone(&c.role), b.clone())))
            .collect()
    }

    /// A waiting binding's retry found its table published (or failed): apply it.
    pub(crate) fn waiting_resolved(&mut self, key: ChannelKey, generation: u64, binding: &Binding, result: BindingResult) {
        if matches!(result, BindingResult::Waiting(..)) || !self.is_current(key, generation) {
            return;
        }
        self.channels.get_mut(&key).expect("current").waiting.retain(|b| b != binding);
        match result {
            BindingResult::Active(bound, infos) => {
                self.activate(key, bound, infos);
                self.acknowledge(key);
            }
            BindingResult::Failed(message) => self.system(key, "error", message),
            BindingResult::Waiting(..) => unreachable!("returned above"),
        }
    }

    /// Wildcard bindings to extend: (channel, binding index, role, binding, tables known).
    pub(crate) fn wildcard_bindings(&self) -> Vec<WildcardBinding> {
        let mut list: Vec<_> = self
            .wildcards
            .iter()
            .filter_map(|&(key, index)| {
                let state = self.channels.get(&key)?;
                let bound = state.active.get(index)?;
                Some((key, index, Arc::clone(&state.role), bound.binding.clone(), bound.tables.keys().cloned().collect()))
            })
            .collect();
        list.sort_by_key(|(key, index, ..)| (*key, *index));
        list
    }

    /// A wildcard binding now also covers a newly published table.
    pub(crate) fn wildcard_extended(&mut self, key: ChannelKey, index: usize, info: Arc<TableInfo>, compiled: Compiled) {
        let table_key: TableKey = (Arc::from(info.schema.as_str()), Arc::from(info.table.as_str()));
        self.table_refreshed(info);
        if let Some(bound) = self.channels.get_mut(&key).and_then(|state| state.active.get_mut(index)) {
            let before = bound.has_database_filters();
            bound.tables.insert(table_key, compiled);
            if !before && bound.has_database_filters() {
                self.database_bindings += 1;
            }
        }
    }

    /// The same core for `tenant`'s database (the default is [`engine::TenantId::SINGLE`]).
    pub(crate) fn for_tenant(mut self, tenant: engine::TenantId) -> ChangesCore {
        self.tenant = tenant;
        self
    }

    // --- changes ----------------------------------------------------------------------------

    /// Matches a batch of transactions against the bindings (event, then filters in Rust);
    /// database broadcasts (`realtime.messages` inserts) go to their topic's owner at once.
    pub(crate) fn match_batch(&mut self, batch: &[Arc<Txn>], orders: &TextOrders) -> MatchedBatch {
        let mut matched = MatchedBatch::default();
        let mut broadcasts = Vec::new();
        for txn in batch {
            for (index, change) in txn.changes.iter().enumerate() {
                let Some(row) = Row::of(change, &self.relations) else { continue };
                if row.kind == Kind::Insert && &*row.relation.schema == "realtime" && &*row.relation.table == "messages" {
                    if let Some((topic, message)) = payload::database_broadcast(self.tenant, &row, self.payload_bytes_max) {
                        broadcasts.push((topic.owner(self.shards), PgOut::Publish { topic, message }));
                    }
                }
                let interests = self.match_change(&row, orders);
                if !interests.is_empty() {
                    matched.changes.push((Arc::clone(txn), index, interests));
                }
            }
        }
        for (owner, out) in broadcasts {
            self.send(owner, out);
        }
        matched
    }

    /// The bindings that may want a change on `table_key`: its own, then the wildcards.
    fn candidates<'s>(&'s self, table_key: &TableKey) -> impl Iterator<Item = &'s (ChannelKey, usize)> {
        self.by_table.get(table_key).into_iter().flatten().chain(self.wildcards.iter())
    }

    /// Whether any binding on `table_key` has a filter the database must evaluate.
    fn has_database_filters(&self, table_key: &TableKey) -> bool {
        self.candidates(table_key).any(|(key, index)| {
            self.channels.get(key).and_then(|s| s.active.get(*index)).and_then(|b| b.tables.get(table_key)).is_some_and(|c| c.database)
        })
    }

    /// The text comparisons the database must make for this batch's filters (text columns
    /// under a collation that is not byte order), one query per collation: for every change
    /// and binding whose other filters pass, the (value, operand) pairs of those filters.
    /// Empty — and no round trip — when no binding on the batch's tables has such a filter.
    pub(crate) fn plan_text_orders(&self, batch: &[Arc<Txn>]) -> Vec<TextOrderQuery> {
        if self.database_bindings == 0 {
            return Vec::new();
        }
        let mut wanted: AHashMap<Arc<Collation>, AHashSet<TextPair>> = AHashMap::new();
        let mut tables: AHashMap<TableKey, bool> = AHashMap::new();
        for txn in batch {
            for change in &txn.changes {
                let Some(row) = Row::of(change, &self.relations) else { continue };
                let table_key = row.relation.key();
                let relevant = match tables.get(&table_key) {
                    Some(relevant) => *relevant,
                    None => {
                        let relevant = self.has_database_filters(&table_key);
                        tables.insert(table_key.clone(), relevant);
                        relevant
                    }
                };
                if !relevant {
                    continue;
                }
                for &(key, index) in self.candidates(&table_key) {
                    let Some(bound) = self.channels.get(&key).and_then(|s| s.active.get(index)) else { continue };
                    let Some(compiled) = bound.tables.get(&table_key).filter(|c| c.database) else { continue };
                    if !row.kind.wanted_by(bound.binding.event) {
                        continue;
                    }
                    let cell = |column: &str| row.relation.index.get(column).map(|&p| row.filter_cell(p));
                    let others_pass = compiled.filters.iter().filter(|(_, f)| f.database_collation().is_none()).all(|(column, filter)| {
                        let Some(&position) = row.relation.index.get(column) else { return false };
                        filter.matches(|_| row.filter_cell(position))
                    });
                    if !others_pass {
                        continue;
                    }
                    for (column, filter) in &compiled.filters {
                        let (Some(collation), Some(value)) = (filter.database_collation(), cell(column)) else { continue };
                        let Some(Some(text)) = value else { continue };
                        for operand in filter.database_pairs(value) {
                            wanted.entry(Arc::clone(collation)).or_default().insert((Box::from(text), Box::from(operand)));
                        }
                    }
                }
            }
        }
        let mut queries: Vec<TextOrderQuery> = wanted
            .into_iter()
            .map(|(collation, pairs)| {
                let mut pairs: Vec<_> = pairs.into_iter().collect();
                pairs.sort_unstable();
                TextOrderQuery { collation, pairs }
            })
            .collect();
        queries.sort_by(|a, b| (&a.collation.collation_sql, &a.collation.type_sql).cmp(&(&b.collation.collation_sql, &b.collation.type_sql)));
        queries
    }

    fn match_change(&self, row: &Row<'_>, orders: &TextOrders) -> Vec<Interest> {
        let table_key = row.relation.key();
        let mut by_channel: AHashMap<ChannelKey, Interest> = AHashMap::new();
        for &(key, index) in self.candidates(&table_key) {
            let Some(state) = self.channels.get(&key) else { continue };
            let Some(bound) = state.active.get(index) else { continue };
            if !row.kind.wanted_by(bound.binding.event) {
                continue;
            }
            let Some(compiled) = bound.tables.get(&table_key) else { continue };
            // A filter the database had to evaluate but could not (its round trip failed)
            // counts as passing, and the change goes to the channel as an error entry.
            let mut unknown: Option<Arc<str>> = None;
            let passes = compiled.filters.iter().all(|(column, filter)| {
                let Some(&position) = row.relation.index.get(column) else { return false };
                match filter.database_collation() {
                    None => filter.matches(|_| row.filter_cell(position)),
                    Some(collation) => match orders.failed.get(collation) {
                        Some(error) => {
                            unknown = Some(Arc::clone(error));
                            true
                        }
                        None => filter.matches_with(|_| row.filter_cell(position), |a, b| orders.order(collation, a, b)),
                    },
                }
            });
            if !passes {
                continue;
            }
            let interest = by_channel.entry(key).or_insert_with(|| Interest {
                key,
                generation: state.generation,
                ids: SmallVec::new(),
                unknown: None,
                visible: Arc::clone(&compiled.visible),
                key_visible: compiled.key_visible,
                claims_group: (!state.bypasses_rls).then(|| (Arc::clone(&state.role), Arc::clone(&state.claims))),
            });
            match unknown {
                None if !interest.ids.contains(&bound.binding.id) => interest.ids.push(bound.binding.id),
                None => {}
                Some(error) => {
                    let unknown = interest.unknown.get_or_insert_with(|| Box::new((SmallVec::new(), Arc::clone(&error))));
                    if !unknown.0.contains(&bound.binding.id) {
                        unknown.0.push(bound.binding.id);
                    }
                    unknown.1 = error;
                }
            }
        }
        let mut interests: Vec<Interest> = by_channel.into_values().collect();
        interests.sort_by_key(|i| i.key);
        interests
    }

    /// The RLS round trips a matched batch needs: **one per table** for the whole batch, each
    /// checking every distinct claims group (role + claims) of the subscribers that matched
    /// its INSERT/UPDATE changes on an RLS-enabled table with a primary key.
    pub(crate) fn plan_rls(&mut self, matched: &MatchedBatch) -> Vec<RlsQuery> {
        let mut by_table: AHashMap<TableKey, AHashMap<ClaimsGroup, KeysToCheck>> = AHashMap::new();
        for (m, (txn, index, interests)) in matched.changes.iter().enumerate() {
            let Some(row) = Row::of(&txn.changes[*index], &self.relations) else { continue };
            let table_key = row.relation.key();
            let Some(table) = self.tables.get(&table_key) else { continue };
            if row.kind == Kind::Delete || !table.rls_enabled || table.primary_key.is_empty() {
                continue;
            }
            let Some(image) = row_image(&row, table).map(Arc::new) else { continue };
            let groups = by_table.entry(table_key).or_default();
            let mut seen = AHashSet::new();
            for interest in interests {
                if let Some(group) = &interest.claims_group {
                    if seen.insert(group.clone()) {
                        groups.entry(group.clone()).or_default().push((m, Arc::clone(&image)));
                    }
                }
            }
        }
        let mut queries: Vec<RlsQuery> = by_table
            .into_iter()
            .filter_map(|(table_key, groups)| {
                let table = Arc::clone(self.tables.get(&table_key)?);
                let mut groups: Vec<_> = groups.into_iter().collect();
                groups.sort_by(|a, b| a.0.cmp(&b.0));
                Some(RlsQuery { table, groups })
            })
            .collect();
        queries.sort_by(|a, b| (&a.table.schema, &a.table.table).cmp(&(&b.table.schema, &b.table.table)));
        self.counts.rls_queries += queries.len() as u64;
        queries
    }

    /// Delivers a matched batch with the answers of its RLS queries: each change once per
    /// channel that still has the subscription it matched with, with the ids of its matching
    /// bindings; a change the role may not see is skipped, a failed check becomes an error
    /// entry for that claims group only.
    pub(crate) fn deliver(&mut self, matched: MatchedBatch, verdicts: &Verdicts) {
        for (m, (txn, index, interests)) in matched.changes.into_iter().enumerate() {
            let Some(row) = Row::of(&txn.changes[index], &self.relations) else { continue };
            let Some(table) = self.tables.get(&row.relation.key()) else { continue };
            let no_key = table.primary_key.is_empty() && row.kind != Kind::Delete;
            let mut targets = Vec::with_capacity(interests.len());
            for interest in interests {
                if !self.is_current(interest.key, interest.generation) {
                    continue; // unsubscribed or replaced while the batch's checks ran
                }
                let (ids, variant) = match interest.unknown {
                    // Only bindings whose filter could not be evaluated: say so.
                    Some(unknown) if interest.ids.is_empty() => {
                        let (ids, error) = *unknown;
                        (ids, Some(Variant::Error(error)))
                    }
                    _ => (interest.ids, None),
                };
                let variant = if let Some(variant) = variant {
                    variant
                } else if no_key {
                    Variant::Error(Arc::from(RowError::NoPrimaryKey.text()))
                } else if !interest.key_visible && row.kind != Kind::Delete {
                    Variant::Error(Arc::from(RowError::Unauthorized.text()))
                } else {
                    match (&interest.claims_group, row.kind) {
                        (Some((role, claims)), Kind::Insert | Kind::Update) if table.rls_enabled => {
                            match verdicts.0.get(&(m, Arc::clone(role), Arc::clone(claims))) {
                                Some(Ok(true)) => Variant::Row(Arc::clone(&interest.visible)),
                                Some(Ok(false)) | None => continue,
                                Some(Err(message)) => Variant::Error(Arc::clone(message)),
                            }
                        }
                        _ => Variant::Row(Arc::clone(&interest.visible)),
                    }
                };
                targets.push((interest.key, ids, variant));
            }
            self.counts.deliveries += targets.len() as u64;
            let deliveries = payload::deliveries(&txn, index, &row, table, targets);
            for (shard, delivery) in deliveries {
                self.send(shard, PgOut::Change(Arc::new(delivery)));
            }
        }
    }
}

fn table_key_of(binding: &Binding) -> TableKey {
    (Arc::from(binding.schema.as_str()), Arc::from(binding.table.as_str()))
}

/// Compiles a binding for one table: filters against its columns, visible columns for the role
/// (`privileges`: which columns the role may SELECT, by `attnum` order).
pub(crate) fn compile(binding: &Binding, table: &TableInfo, privileges: &[bool]) -> Result<Compiled, String> {
    let mut filters = Vec::with_capacity(binding.filters.len());
    for raw in &binding.filters {
        let position = table.columns.iter().position(|c| c.name == raw.column);
        let Some(index) = position.filter(|i| privileges.get(*i).copied().unwrap_or(false)) else {
            return Err(BindingException::InvalidFilterColumn { column: raw.column.clone() }.text());
        };
        let column = &table.columns[index];
        let compiled = filter::compile_ordered(raw, index, &column.type_name, &column.order).map_err(|e| e.0)?;
        filters.push((raw.column.clone(), compiled));
    }
    let readable = |i: usize| privileges.get(i).copied().unwrap_or(false);
    let mut visible: Vec<bool> = (0..table.columns.len()).map(readable).collect();
    if let Some(select) = &binding.select {
        for column in select {
            let known = table.columns.iter().position(|c| &c.name == column);
            if !known.is_some_and(readable) {
                return Err(BindingException::InvalidSelectColumn { column: column.clone() }.text());
            }
        }
        for (i, column) in table.columns.iter().enumerate() {
            visible[i] = readable(i) && (select.contains(&column.name) || table.primary_key.contains(&column.name));
        }
    }
    let key_visible = table.primary_key.iter().all(|k| table.columns.iter().position(|c| &c.name == k).is_some_and(readable));
    let database = filters.iter().any(|(_, f)| f.database_collation().is_some());
    Ok(Compiled { filters, visible: Arc::new(visible), key_visible, database })
}

/// Which published tables a binding covers.
pub(crate) fn tables_of<'a>(binding: &Binding, published: &'a [(String, String)]) -> Vec<&'a (String, String)> {
    published
        .iter()
        .filter(|(s, t)| (binding.schema == "*" || &binding.schema == s) && (binding.table == "*" || &binding.table == t))
        .collect()
}

#[cfg(test)]
mod tests;
