//! One shard's driver: its topic state, its connections and its links to the other shards.
//!
//! Cross-shard messages go over glommio's SPSC mesh (one bounded queue per ordered pair of
//! shards, [`SHARD_QUEUE_MESSAGES_MAX`] each). Sending never blocks the caller: `try_send`,
//! and when the queue is full the message waits in a per-destination overflow queue that a
//! flusher task drains in order. The overflow is bounded by [`SHARD_OVERFLOW_MESSAGES_MAX`]
//! for broadcasts (beyond it they are dropped and counted); join/leave bookkeeping is never
//! dropped (it is bounded by connections × channels). Because no receive path ever awaits a
//! send, two shards can never deadlock on each other's full queues. Commands to the Postgres
//! Changes core follow the same rule (an overflow queue with its own flusher, never dropped).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::Arc;

use ahash::AHashMap;
use glommio::channels::channel_mesh::Senders;
use glommio::channels::shared_channel::ConnectedReceiver;
use glommio::{GlommioError, ResourceType};

use engine::client_error::{CloseReason, SystemMessage};
use engine::limits::{DELAYED_JOIN_ERRORS_PER_CONNECTION_MAX, SHARD_OVERFLOW_MESSAGES_MAX};
use engine::shard::LocalEffect;
use engine::{ConnId, PresenceCoalescing, ShardId, ShardMsg, ShardState, TenantId};

use super::metrics::{self, ShardCounters};
use super::outbox::{Outbox, OutboxState};
use super::tenancy::ShardTenant;
use super::ServerConfig;
use crate::fanout;
use crate::session::{Context, Effects, Session};

/// The `id` of a database broadcast (its metadata is `{"id": "<row id>"}`).
fn database_row_id(body: &engine::BroadcastBody) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Meta {
        id: String,
    }
    match body {
        engine::BroadcastBody::User { metadata, .. } if !metadata.is_empty() => serde_json::from_slice::<Meta>(metadata).ok().map(|m| m.id),
        _ => None,
    }
}

/// Queues `command` in the command overflow, first removing the queued commands it supersedes,
/// so the overflow holds at most a few commands per channel whatever a client does (a token
/// refreshed in a loop while the core is behind costs one queued Subscribe and one queued read
/// check, not one per refresh):
/// - a `Subscribe` or `Unsubscribe` replaces a queued `Subscribe` of the same channel (the core
///   replaces a subscription anyway), and an `Unsubscribe` also the channel's queued policy
///   checks and replay (the channel is gone: nobody waits for their answers);
/// - a policy check for a channel replaces a queued one of the same kind for that channel (the
///   session acts on whichever answer comes, and the newest check carries the newest claims).
///
/// REST callers' checks (each with its own waiting caller) and replays are never replaced by
/// anything but their channel's `Unsubscribe`. Bound: connections × channels × 4 (subscription,
/// read check, write check, replay) plus the REST calls in flight.
fn push_coalesced<T: AsCommand>(queue: &mut VecDeque<T>, item: T) {
    use engine::changes::{AuthzReply, Command};
    let command = item.command();
    match command {
        Command::Subscribe(subscription) => {
            let key = subscription.key;
            queue.retain(|queued| !matches!(queued.command(), Command::Subscribe(s) if s.key == key));
        }
        Command::Unsubscribe(key) => {
            let key = *key;
            queue.retain(|queued| match queued.command() {
                Command::Subscribe(s) => s.key != key,
                Command::Authorize { reply: AuthzReply::Channel(k), .. } => *k != key,
                Command::Replay { key: k, .. } => *k != key,
                _ => true,
            });
        }
        Command::Authorize { request, reply: AuthzReply::Channel(key) } => {
            let (key, kind) = (*key, request.kind);
            queue.retain(|queued| !matches!(queued.command(), Command::Authorize { request: r, reply: AuthzReply::Channel(k) } if *k == key && r.kind == kind));
        }
        Command::Authorize { reply: AuthzReply::Caller(_), .. } | Command::Replay { .. } => {}
    }
    queue.push_back(item);
}

/// What the command overflow holds: a command, with the tenant core it goes to.
trait AsCommand {
    fn command(&self) -> &engine::changes::Command;
}

impl AsCommand for engine::changes::Command {
    fn command(&self) -> &engine::changes::Command {
        self
    }
}

/// A command waiting in the overflow for its tenant's core.
struct Routed {
    to: flume::Sender<engine::changes::Command>,
    command: engine::changes::Command,
}

impl AsCommand for Routed {
    fn command(&self) -> &engine::changes::Command {
        &self.command
    }
}

thread_local! {
    /// Whether this shard's server has a `PgLink` (set when the shard starts).
    pub(crate) static POSTGRES_LINKED: Cell<bool> = const { Cell::new(false) };
}

/// A connection as its shard holds it.
pub(crate) struct Conn {
    pub(crate) outbox: Outbox,
    pub(crate) session: RefCell<Session>,
    pub(crate) fd: RawFd,
    /// When a read last completed ([`super::flush::clock_ms`]): the idle sweep's input.
    pub(crate) last_read_ms: Cell<u32>,
    /// Plain TCP: the shard's flusher may write to `fd` directly and the task reads it with
    /// `recv`, waiting on the shard's epoll set when it is empty (TLS: neither).
    pub(crate) direct: bool,
    /// The connection's tenant on this shard, and the tenant's epoch when it connected (a
    /// different epoch now means the tenant's keys or gates changed: disconnect).
    pub(crate) tenant: Rc<ShardTenant>,
    pub(crate) tenant_epoch: u64,
    /// Counted as one of the tenant's connected users (it has a channel).
    pub(crate) user: Cell<bool>,
    /// Epoll state of a plain connection (`super::readiness`): which set it is registered in
    /// (edge-triggered), the task's waker for its reports, and whether its last two reads were
    /// close together (fast set) or not (slow set).
    pub(crate) epoll_set: Cell<u8>,
    pub(crate) chatty: Cell<bool>,
    pub(crate) epoll_waker: RefCell<Option<std::task::Waker>>,
    /// Plain TCP: when the task's write found the socket full and has made no progress since
    /// ([`super::flush::clock_ms`], never 0 while stalled; 0 when not stalled).
    pub(crate) write_stalled_ms: Cell<u32>,
}

pub(crate) struct Shard {
    pub(crate) id: ShardId,
    pub(crate) config: Arc<ServerConfig>,
    pub(crate) state: RefCell<ShardState>,
    pub(crate) conns: RefCell<AHashMap<ConnId, Rc<Conn>>>,
    pub(crate) metrics: Arc<super::Metrics>,
    senders: Senders<ShardMsg>,
    overflow: RefCell<Vec<VecDeque<ShardMsg>>>,
    flushing: Vec<Cell<bool>>,
    /// Commands for the Postgres Changes core that found its queue full, sent in order by a
    /// flusher task. Never dropped (a lost Unsubscribe would leak a subscription in the core, a
    /// lost Authorize would leave a join waiting until its deadline); bounded by this shard's
    /// connections × channels × the commands a channel has in flight (join, first write, leave,
    /// token refresh).
    pg_overflow: RefCell<VecDeque<Routed>>,
    pg_flushing: Cell<bool>,
    /// Messages for the cluster link's control queue that found it full, sent in order by a
    /// flusher task. Never dropped (a lost interest change would leave a join unanswered or a
    /// subscription behind); bounded by the topics this shard owns × their changes in flight.
    cluster_overflow: RefCell<VecDeque<engine::cluster::ToLink>>,
    cluster_flushing: Cell<bool>,
    /// Join error replies waiting out the delay, per connection (by address; at most
    /// [`DELAYED_JOIN_ERRORS_PER_CONNECTION_MAX`] each, entries removed at zero).
    delayed_replies: RefCell<AHashMap<usize, u32>>,
    next_conn: Cell<u64>,
    /// The tenants this shard has seen (connections, deliveries), and the directory version it
    /// last applied (`super::tenancy`).
    tenants: RefCell<AHashMap<TenantId, Rc<ShardTenant>>>,
    tenants_version: Cell<u64>,
    /// This shard's slot of the status page's data (written by [`Shard::status_ticks`]).
    pub(crate) status: Arc<super::StatusBoard>,
    /// Connections with queued frames for the flusher, and its waker (`super::flush`).
    pub(crate) ready: RefCell<Vec<Rc<Conn>>>,
    pub(crate) flusher: RefCell<Option<std::task::Waker>>,
}

impl Shard {
    pub(crate) fn new(id: ShardId, config: Arc<ServerConfig>, senders: Senders<ShardMsg>, metrics: Arc<super::Metrics>, status: Arc<super::StatusBoard>) -> Shard {
        let shards = config.shards;
        Shard {
            id,
            state: RefCell::new({
                let state = ShardState::new(id, shards).with_coalescing(if config.limits.presence_coalesce.is_zero() {
                    PresenceCoalescing::Immediate
                } else {
                    PresenceCoalescing::Window
                });
                match &config.cluster {
                    Some(port) => state.with_cluster(port.node),
                    None => state,
                }
            }),
            conns: RefCell::new(AHashMap::new()),
            metrics,
            senders,
            overflow: RefCell::new((0..shards).map(|_| VecDeque::new()).collect()),
            flushing: (0..shards).map(|_| Cell::new(false)).collect(),
            pg_overflow: RefCell::new(VecDeque::new()),
            pg_flushing: Cell::new(false),
            cluster_overflow: RefCell::new(VecDeque::new()),
            cluster_flushing: Cell::new(false),
            delayed_replies: RefCell::new(AHashMap::new()),
            next_conn: Cell::new(1),
            tenants: RefCell::new(AHashMap::new()),
            tenants_version: Cell::new(0),
            status,
            ready: RefCell::new(Vec::new()),
            flusher: RefCell::new(None),
            config,
        }
    }

    pub(crate) fn counters(&self) -> &ShardCounters {
        &self.metrics.shards[self.id.index()]
    }

    pub(crate) fn next_conn_id(&self) -> ConnId {
        let id = self.next_conn.get();
        self.next_conn.set(id + 1);
        ConnId(id)
    }

    /// Carries out a session's effects for connection `conn`.
    pub(crate) fn apply(self: &Rc<Self>, conn: &Rc<Conn>, fx: Effects) {
        for frame in fx.frames {
            self.push(conn, frame);
        }
        let delayed = fx.delayed.len();
        for (i, frame) in fx.delayed.into_iter().enumerate() {
            let close = if i + 1 == delayed { fx.close_after_delayed } else { None };
            self.push_delayed(conn, frame, close);
        }
        if delayed == 0 {
            if let Some(reason) = fx.close_after_delayed {
                conn.outbox.close(reason);
            }
        }
        let tenant = &conn.tenant;
        if fx.published > 0 {
            metrics::add(&self.counters().broadcasts_in, fx.published);
        }
        tenant.count_events(fx.published + fx.unknown_events);
        tenant.count_presence(fx.presence_events);
        tenant.count_joins(fx.joins_counted);
        if fx.malformed > 0 {
            metrics::add(&self.counters().malformed_frames, fx.malformed);
        }
        if fx.presence_events > 0 {
            metrics::add(&self.counters().presence_tracks, fx.presence_events);
        }
        if fx.joined > 0 {
            metrics::add(&self.counters().joins, fx.joined);
        }
        if fx.left > 0 {
            metrics::add(&self.counters().leaves, fx.left);
        }
        if !fx.join_errors.is_empty() {
            for code in &fx.join_errors {
                if matches!(&**code, "ConnectionRateLimitReached" | "ClientJoinRateLimitReached" | "ChannelRateLimitReached") {
                    tenant.count_limit_hit();
                }
            }
            self.count_join_errors(&fx.join_errors);
        }
        if let Some(reason) = fx.close {
            conn.outbox.close(reason);
        }
        for command in fx.pg {
            self.send_command(tenant, command);
        }
        self.route(fx.shard);
        // A connection is one of the tenant's users while it has a channel (§9.1).
        let user = conn.session.borrow().channel_count() > 0;
        if user != conn.user.get() {
            conn.user.set(user);
            tenant.add_user(user);
        }
    }

    /// The session context of a call on `conn`: its tenant's keys and limits, borrowed.
    /// A changed tenant directory is applied first, so a SIGHUP's new limits hold for the
    /// very next frame (one atomic load per call when nothing changed).
    pub(crate) fn with_context<R>(self: &Rc<Self>, conn: &Conn, f: impl FnOnce(Context<'_>) -> R) -> R {
        if self.tenants_version.get() != self.config.tenants.version() {
            self.sync_tenants();
        }
        let now_ms = super::conn::unix_now_ms();
        let shard_tenant = &conn.tenant;
        let tenant = shard_tenant.get();
        let ctx = Context {
            limits: &tenant.limits,
            keys: &tenant.keys,
            // A tenant's database is usable only where the server runs cores (`PgLink`).
            database: tenant.database_url.is_some() && POSTGRES_LINKED.with(|linked| linked.get()),
            now_secs: now_ms / 1000,
            now_ms,
            presence_rate_exceeded: shard_tenant.presence_exceeded(),
            tenant: shard_tenant.gate(),
            credentials: &shard_tenant.credentials,
        };
        f(ctx)
    }

    /// This shard's state for `tenant` (created on first sight). The directory is re-read
    /// first when it changed, so a connection never starts on an outdated configuration.
    pub(crate) fn shard_tenant(self: &Rc<Self>, tenant: &Arc<tenants::Tenant>) -> Rc<ShardTenant> {
        if self.tenants_version.get() != self.config.tenants.version() {
            self.sync_tenants();
        }
        let existing = self.tenants.borrow().get(&tenant.id).cloned();
        match existing {
            Some(existing) => existing,
            None => {
                let created = Rc::new(ShardTenant::new(self.id.index(), Arc::clone(tenant)));
                self.tenants.borrow_mut().insert(tenant.id, Rc::clone(&created));
                created
            }
        }
    }

    /// This shard's state for the tenant numbered `id`, if the directory knows it.
    pub(crate) fn tenant_by_id(self: &Rc<Self>, id: TenantId) -> Option<Rc<ShardTenant>> {
        if let Some(existing) = self.tenants.borrow().get(&id) {
            return Some(Rc::clone(existing));
        }
        let directory = self.config.tenants.load();
        let tenant = directory.get(id)?;
        Some(self.shard_tenant(tenant))
    }

    /// Applies a new tenant directory: every tenant this shard knows takes its new
    /// configuration; the sockets of a removed tenant, or of one whose keys, `private_only` or
    /// `suspend` changed, get "Server requested disconnect" then close 1012 (PROTOCOL.md §1.11).
    pub(crate) fn sync_tenants(self: &Rc<Self>) {
        let version = self.config.tenants.version();
        let directory = self.config.tenants.load();
        self.tenants_version.set(version);
        if self.id.index() == 0 {
            if let Some(link) = &self.config.postgres {
                link.databases.directory_changed(&directory);
            }
        }
        let mut disconnect: Vec<TenantId> = Vec::new();
        {
            let tenants = self.tenants.borrow();
            for (id, shard_tenant) in tenants.iter() {
                if shard_tenant.refresh(directory.get(*id)) {
                    disconnect.push(*id);
                }
            }
        }
        // Tenants gone with nobody left on this shard are forgotten.
        self.tenants.borrow_mut().retain(|_, t| !t.is_gone() || Rc::strong_count(t) > 1);
        if disconnect.is_empty() {
            return;
        }
        let due: Vec<Rc<Conn>> = self
            .conns
            .borrow()
            .values()
            .filter(|c| disconnect.contains(&c.tenant.get().id) && (c.tenant.is_gone() || c.tenant_epoch != c.tenant.get().epoch))
            .filter(|c| c.outbox.state() == OutboxState::Open)
            .cloned()
            .collect();
        if !due.is_empty() {
            tracing::info!(shard = self.id.0, connections = due.len(), "tenant configuration changed: disconnecting its sockets");
        }
        for conn in due {
            super::drain::disconnect(&conn);
        }
    }

    /// Sends a command to the Postgres Changes core without waiting: straight into its queue
    /// when there is room and nothing waits before it, else into the overflow.
    pub(super) fn send_command(self: &Rc<Self>, tenant: &ShardTenant, command: engine::changes::Command) {
        let Some(link) = &self.config.postgres else { return };
        let Some(db) = tenant.db(link) else { return };
        let to = db.commands;
        if !self.pg_flushing.get() {
            let rejected = match to.try_send(command) {
                Ok(()) => return,
                Err(flume::TrySendError::Full(command)) => command,
                Err(flume::TrySendError::Disconnected(command)) => {
                    // The core stopped between the lookup and the send (idle stop, a tenant
                    // change): ask for it again once.
                    match tenant.db(link) {
                        Some(db) => {
                            let _ = db.commands.try_send(command);
                        }
                        None => return,
                    }
                    return;
                }
            };
            push_coalesced(&mut self.pg_overflow.borrow_mut(), Routed { to, command: rejected });
            self.pg_flushing.set(true);
            tracing::warn!(shard = self.id.0, "Postgres Changes command queue full: commands wait in the overflow");
            let shard = Rc::clone(self);
            glommio::spawn_local(async move { shard.flush_commands().await }).detach();
            return;
        }
        push_coalesced(&mut self.pg_overflow.borrow_mut(), Routed { to, command });
    }

    /// A REST caller's policy check: through the same queue and overflow as the sessions'
    /// commands (never refused because the queue is momentarily full).
    pub(crate) fn send_caller_command(self: &Rc<Self>, tenant: &ShardTenant, command: engine::changes::Command) {
        self.send_command(tenant, command);
    }

    /// Drains the command overflow in order, waiting for room in the core's queue.
    async fn flush_commands(self: Rc<Self>) {
        loop {
            let next = self.pg_overflow.borrow_mut().pop_front();
            let Some(Routed { to, command }) = next else { break };
            // A core that stopped meanwhile drops its commands (its channels are re-subscribed
            // by nobody: the core is stopped only when its tenant has no subscriptions).
            let _ = to.send_async(command).await;
        }
        self.pg_flushing.set(false);
    }

    /// Writes what the Postgres Changes core sends: `system` statuses and change payloads,
    /// encoded once per (topic, format) within a delivery.
    pub(crate) async fn postgres_inbox(self: Rc<Self>, inbox: flume::Receiver<engine::changes::PgOut>) {
        use engine::changes::PgOut;
        while let Ok(out) = inbox.recv_async().await {
            match out {
                PgOut::System { conn, channel, status, message } => {
                    let conn = self.conns.borrow().get(&conn).cloned();
                    if let Some(conn) = conn {
                        let frame = conn.session.borrow().postgres_changes_system(channel, status, &message);
                        if let Some(frame) = frame {
                            self.push(&conn, frame);
                        }
                    }
                }
                PgOut::Authorized { conn, channel, kind, result } => {
                    let conn = self.conns.borrow().get(&conn).cloned();
                    if let Some(conn) = conn {
                        let mut fx = Effects::default();
                        self.with_context(&conn, |ctx| {
                            let mut state = self.state.borrow_mut();
                            conn.session.borrow_mut().on_authorized(&mut state, ctx, channel, kind, result, &mut fx);
                        });
                        self.apply(&conn, fx);
                    }
                }
                PgOut::Replayed { conn, channel, result } => {
                    let conn = self.conns.borrow().get(&conn).cloned();
                    if let Some(conn) = conn {
                        let mut fx = Effects::default();
                        {
                            let mut state = self.state.borrow_mut();
                            conn.session.borrow_mut().on_replayed(&mut state, channel, result, &mut fx);
                        }
                        self.apply(&conn, fx);
                    }
                }
                PgOut::Publish { topic, message } => {
                    // A database broadcast is one of its tenant's events, dropped while the
                    // tenant is above its events per second (§9.3).
                    if let Some(tenant) = self.tenant_by_id(topic.tenant) {
                        if tenant.events_exceeded() {
                            tenant.count_limit_hit();
                            continue;
                        }
                        tenant.count_events(1);
                    }
                    metrics::add(&self.counters().database_broadcasts, 1);
                    let owner = topic.owner(self.config.shards);
                    self.route(vec![(owner, engine::ShardMsg::Publish { topic, message })]);
                }
                PgOut::Change(delivery) => {
                    tracing::debug!(targets = delivery.targets.len(), "postgres change received by shard");
                    // One core per tenant: the targets' tenant is the first live target's.
                    let tenant = delivery.targets.iter().find_map(|(conn, _)| self.conns.borrow().get(conn).map(|c| Rc::clone(&c.tenant)));
                    if let Some(tenant) = &tenant {
                        if tenant.db_events_exceeded() {
                            tenant.count_limit_hit();
                            continue;
                        }
                        tenant.count_db_events(delivery.targets.len() as u64);
                    }
                    let mut cache: Vec<(String, engine::Format, bytes::Bytes)> = Vec::new();
                    let conns = self.conns.borrow();
                    let mut delivered = 0u64;
                    for (conn_id, serial) in &delivery.targets {
                        let Some(conn) = conns.get(conn_id) else { continue };
                        if !conn.session.borrow_mut().accept_change(*serial, delivery.position) {
                            continue;
                        }
                        let session = conn.session.borrow();
                        let format = session.format();
                        let Some((topic, _)) = session.channel_by_serial(*serial) else { continue };
                        let frame = match cache.iter().find(|(t, f, _)| t == topic && *f == format) {
                            Some((_, _, frame)) => frame.clone(),
                            None => {
                                let payload = match format {
                                    engine::Format::V1 => &delivery.payload_v1,
                                    engine::Format::V2 => &delivery.payload_v2,
                                };
                                let frame = crate::frame::encode_message(format, crate::frame::Ref::NULL, crate::frame::Ref::NULL, topic, "postgres_changes", payload);
                                cache.push((topic.to_string(), format, frame.clone()));
                                frame
                            }
                        };
                        drop(session);
                        self.push(conn, frame);
                        delivered += 1;
                    }
                    metrics::add(&self.counters().deliveries, delivered);
                }
            }
            glommio::yield_if_needed().await;
        }
    }

    /// Queues a join error reply after the join error delay, in a timer task; beyond
    /// [`DELAYED_JOIN_ERRORS_PER_CONNECTION_MAX`] waiting on this connection, at once.
    fn push_delayed(self: &Rc<Self>, conn: &Rc<Conn>, frame: bytes::Bytes, close: Option<CloseReason>) {
        let delay = self.config.limits.join_error_delay;
        // The key is the connection's address: a waiting task holds an `Rc` to it, so the
        // address cannot be reused while its count is above zero.
        let key = Rc::as_ptr(conn) as usize;
        let waiting = self.delayed_replies.borrow().get(&key).copied().unwrap_or(0);
        if delay.is_zero() || waiting >= DELAYED_JOIN_ERRORS_PER_CONNECTION_MAX {
            self.push(conn, frame);
            if let Some(reason) = close {
                conn.outbox.close(reason);
            }
            return;
        }
        self.delayed_replies.borrow_mut().insert(key, waiting + 1);
        let (shard, conn) = (Rc::clone(self), Rc::clone(conn));
        glommio::spawn_local(async move {
            glommio::timer::sleep(delay).await;
            shard.push(&conn, frame);
            if let Some(reason) = close {
                conn.outbox.close(reason);
            }
            let mut counts = shard.delayed_replies.borrow_mut();
            match counts.get_mut(&key) {
                Some(count) if *count > 1 => *count -= 1,
                _ => {
                    counts.remove(&key);
                }
            }
        })
        .detach();
    }

    /// Queues a frame on a connection; counts the connection once if this push overflowed it.
    fn push(&self, conn: &Rc<Conn>, frame: bytes::Bytes) {
        let was_open = conn.outbox.state() == OutboxState::Open;
        if conn.outbox.push(frame) {
            if conn.outbox.schedule() {
                self.schedule(conn);
            }
            return;
        }
        let slow = conn.outbox.state() == OutboxState::Closing(CloseReason::SlowConsumer);
        if was_open && slow {
            metrics::add(&self.counters().slow_consumer_closes, 1);
            tracing::info!(shard = self.id.0, "slow consumer disconnected: outbound queue full");
        }
        metrics::add(if slow { &self.counters().dropped_slow_consumer } else { &self.counters().dropped_closed }, 1);
    }

    /// Routes messages: local ones are handled here (in order), remote ones queued.
    pub(crate) fn route(self: &Rc<Self>, messages: Vec<(ShardId, ShardMsg)>) {
        let mut local = VecDeque::new();
        for (dest, msg) in messages {
            self.dispatch(dest, msg, &mut local);
        }
        while let Some(msg) = local.pop_front() {
            let mut out = Vec::new();
            let effect = self.state.borrow_mut().handle(msg, &mut out);
            for (dest, msg) in out {
                self.dispatch(dest, msg, &mut local);
            }
            if let Some(effect) = effect {
                self.local_effect(effect);
            }
        }
        self.drain_cluster_out();
    }

    /// Hands what the topic state produced for the cluster link to its queues: broadcasts on
    /// the data queue (full → this node only, counted), the rest on the control queue (full →
    /// the overflow, in order, never dropped).
    fn drain_cluster_out(self: &Rc<Self>) {
        let Some(port) = &self.config.cluster else { return };
        let out = self.state.borrow_mut().take_cluster_out();
        for message in out {
            if matches!(message, engine::cluster::ToLink::Publish { .. }) {
                if port.data.try_send(message).is_err() {
                    port.queue_full_drops.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                continue;
            }
            if !self.cluster_flushing.get() {
                match port.control.try_send(message) {
                    Ok(()) => continue,
                    Err(flume::TrySendError::Full(message)) => {
                        self.cluster_overflow.borrow_mut().push_back(message);
                        self.cluster_flushing.set(true);
                        tracing::warn!(shard = self.id.0, "cluster link queue full: messages wait in the overflow");
                        let shard = Rc::clone(self);
                        glommio::spawn_local(async move { shard.flush_cluster().await }).detach();
                    }
                    // The link thread ended (its runtime failed): this node runs alone.
                    Err(flume::TrySendError::Disconnected(_)) => {}
                }
                continue;
            }
            self.cluster_overflow.borrow_mut().push_back(message);
        }
    }

    /// Drains the cluster overflow in order, waiting for room in the link's queue.
    async fn flush_cluster(self: Rc<Self>) {
        let Some(port) = &self.config.cluster else { return };
        let control = port.control.clone();
        loop {
            let next = self.cluster_overflow.borrow_mut().pop_front();
            let Some(message) = next else { break };
            if control.send_async(message).await.is_err() {
                break;
            }
        }
        self.cluster_flushing.set(false);
    }

    /// Handles what the cluster link sends this shard: other nodes' broadcasts and presence,
    /// confirmations of interest (which release the joins waiting on them), sync requests.
    pub(crate) async fn cluster_inbox(self: Rc<Self>, inbox: flume::Receiver<engine::cluster::FromLink>) {
        while let Ok(message) = inbox.recv_async().await {
            let mut out = Vec::new();
            let effects = self.state.borrow_mut().cluster_in(message, &mut out);
            self.route(out);
            for effect in effects {
                self.local_effect(effect);
            }
            self.drain_cluster_out();
            glommio::yield_if_needed().await;
        }
    }

    fn dispatch(self: &Rc<Self>, dest: ShardId, msg: ShardMsg, local: &mut VecDeque<ShardMsg>) {
        if dest == self.id {
            local.push_back(msg);
        } else {
            self.send_remote(dest, msg);
        }
    }

    fn send_remote(self: &Rc<Self>, dest: ShardId, msg: ShardMsg) {
        let index = dest.index();
        // No RefCell borrow is held across `try_send_to` or `spawn_local`: glommio may run other
        // tasks (the flusher included) inside either, and they borrow the overflow queues too.
        if !self.flushing[index].get() {
            let rejected = match self.senders.try_send_to(index, msg) {
                Ok(()) => return,
                Err(GlommioError::WouldBlock(ResourceType::Channel(msg))) => msg,
                Err(error) => {
                    // The peer's receiver is gone: only at shutdown.
                    tracing::debug!(shard = self.id.0, peer = dest.0, %error, "shard queue closed");
                    return;
                }
            };
            self.overflow.borrow_mut()[index].push_back(rejected);
            self.flushing[index].set(true);
            let shard = Rc::clone(self);
            glommio::spawn_local(async move { shard.flush(dest).await }).detach();
            return;
        }
        let mut overflow = self.overflow.borrow_mut();
        let queue = &mut overflow[index];
        if queue.len() >= SHARD_OVERFLOW_MESSAGES_MAX && msg.is_droppable() {
            drop(overflow);
            metrics::add(&self.counters().shard_messages_dropped, 1);
            return;
        }
        queue.push_back(msg);
    }

    /// Whether a message waits in an overflow queue for some peer shard.
    pub(crate) fn overflow_pending(&self) -> bool {
        self.overflow.borrow().iter().any(|queue| !queue.is_empty())
    }

    /// Drains the overflow queue for `dest` in order, waiting for room in the SPSC queue.
    async fn flush(self: Rc<Self>, dest: ShardId) {
        let index = dest.index();
        loop {
            let next = self.overflow.borrow_mut()[index].pop_front();
            let Some(msg) = next else { break };
            if self.senders.send_to(index, msg).await.is_err() {
                break;
            }
        }
        self.flushing[index].set(false);
    }

    fn local_effect(self: &Rc<Self>, effect: LocalEffect) {
        match effect {
            LocalEffect::Deliver { topic, message } => {
                let is_presence = matches!(message.body, engine::BroadcastBody::PresenceDiff(_));
                let tenant = self.tenant_by_id(topic.tenant);
                if !is_presence && tenant.as_ref().is_some_and(|t| t.events_exceeded()) {
                    self.shut_receivers(&topic, &message, tenant.as_deref());
                    return;
                }
                let state = self.state.borrow();
                let conns = self.conns.borrow();
                let subscribers = state.local_subscribers(&topic);
                // A database broadcast carries its row id; a channel that got that row by replay
                // does not get it again live (PROTOCOL.md §3.6).
                let row_id = database_row_id(&message.body);
                // A sampled message: one subscriber's copy carries the probe to its writer.
                let read_at = message.origin.map_or(0, |origin| origin.read_at_micros);
                let mut probe_pending = read_at != 0;
                let delivered = fanout::deliver(self.id, subscribers, &topic, &message, |conn, channel, bytes| {
                    let Some(conn) = conns.get(&conn) else { return false };
                    if let Some(id) = &row_id {
                        if conn.session.borrow().already_replayed(channel, id) {
                            return false;
                        }
                    }
                    self.push(conn, bytes.clone());
                    if probe_pending && conn.outbox.state() == OutboxState::Open {
                        conn.outbox.mark_last(read_at);
                        probe_pending = false;
                    }
                    true
                });
                metrics::add(&self.counters().deliveries, delivered as u64);
                if let Some(tenant) = &tenant {
                    if is_presence {
                        // Every delivered presence_diff counts toward the tenant's rate (§4.6).
                        tenant.count_presence(delivered as u64);
                    } else {
                        // Every channel a broadcast reaches is one of the tenant's events (§9.1).
                        tenant.count_events(delivered as u64);
                    }
                }
                if is_presence {
                    metrics::add(&self.counters().presence_diffs, delivered as u64);
                }
            }
            LocalEffect::SchedulePresenceFlush { topic } => {
                let shard = Rc::clone(self);
                let window = self.config.limits.presence_coalesce;
                glommio::spawn_local(async move {
                    glommio::timer::sleep(window).await;
                    let mut out = Vec::new();
                    shard.state.borrow_mut().flush_presence(&topic, &mut out);
                    shard.route(out);
                })
                .detach();
            }
            LocalEffect::JoinAcked { topic, subscriber, presence } => {
                let conn = self.conns.borrow().get(&subscriber.conn).cloned();
                if let Some(conn) = conn {
                    let mut fx = Effects::default();
                    {
                        let mut state = self.state.borrow_mut();
                        conn.session.borrow_mut().on_join_ack(&mut state, &topic, subscriber.channel, presence, conn.tenant.presence_exceeded(), &mut fx);
                    }
                    self.apply(&conn, fx);
                }
            }
        }
    }

    /// Once a second: close idle connections (`super::flush`) and channels whose token expired
    /// (PROTOCOL.md §6.4). A timer in its own task, racing no read.
    pub(crate) async fn expire_tokens(self: Rc<Self>) {
        loop {
            glommio::timer::sleep(std::time::Duration::from_secs(1)).await;
            let now = super::conn::unix_now();
            // One walk of the connections: idle and stalled ones, empty queues, expired tokens.
            let due = self.sweep_idle(now);
            if self.tenants_version.get() != self.config.tenants.version() {
                self.sync_tenants();
            }
            for tenant in self.tenants.borrow().values() {
                tenant.publish_totals();
                tenant.tick_http();
            }
            for conn in due {
                let mut fx = Effects::default();
                {
                    let mut state = self.state.borrow_mut();
                    conn.session.borrow_mut().expire_channels(&mut state, now, &mut fx);
                }
                self.apply(&conn, fx);
            }
        }
    }

    /// Every rate tick (5 s): publish this shard's window sum and decide, from every shard's,
    /// whether the tenant is above its presence limit (PROTOCOL.md §9.2).
    pub(crate) async fn rate_ticks(self: Rc<Self>) {
        loop {
            glommio::timer::sleep(engine::rate::TICK).await;
            let tenants: Vec<Rc<ShardTenant>> = self.tenants.borrow().values().cloned().collect();
            for tenant in tenants {
                tenant.tick();
            }
        }
    }

    /// §9.3: while the tenant is above its events per second, every local channel a fan-out
    /// message would reach is closed with `system` "Too many messages per second" instead.
    fn shut_receivers(self: &Rc<Self>, topic: &engine::TopicKey, message: &engine::Broadcast, tenant: Option<&ShardTenant>) {
        let is_sender = |sub: &engine::LocalSub| message.origin.is_some_and(|o| o.shard == self.id && o.conn == sub.conn && o.channel == sub.channel);
        let receivers: Vec<(Rc<Conn>, engine::ChannelSerial)> = {
            let state = self.state.borrow();
            let conns = self.conns.borrow();
            state
                .local_subscribers(topic)
                .iter()
                .filter(|sub| sub.receive_broadcasts && (sub.receive_own || !is_sender(sub)))
                .filter_map(|sub| conns.get(&sub.conn).map(|c| (Rc::clone(c), sub.channel)))
                .collect()
        };
        for (conn, serial) in receivers {
            if let Some(tenant) = tenant {
                tenant.count_limit_hit();
            }
            let mut fx = Effects::default();
            {
                let mut state = self.state.borrow_mut();
                conn.session.borrow_mut().shut_channel(&mut state, serial, SystemMessage::TooManyMessages, &mut fx);
            }
            self.apply(&conn, fx);
        }
    }

    /// Refreshes this shard's slot of the status page every second: a sample of its counters,
    /// and every few ticks the summary of its topics (one walk, never per request).
    pub(crate) async fn status_ticks(self: Rc<Self>) {
        use super::status::{Sample, SUMMARY_EVERY_TICKS, TICK, TOP_TOPICS_MAX};
        use std::sync::atomic::Ordering::Relaxed;
        let mut last_deliveries = self.counters().deliveries.load(Relaxed);
        let mut channels = 0;
        let mut tick: u32 = 0;
        loop {
            if tick.is_multiple_of(SUMMARY_EVERY_TICKS) {
                let summary = self.state.borrow().summary(TOP_TOPICS_MAX);
                channels = summary.local_channels as u64;
                self.status.set_summary(self.id.index(), &summary);
            }
            let deliveries = self.counters().deliveries.load(Relaxed);
            self.status.push_sample(
                self.id.index(),
                Sample {
                    unix_secs: super::conn::unix_now(),
                    connections: self.counters().connections_open.load(Relaxed),
                    channels,
                    deliveries_per_second: deliveries.saturating_sub(last_deliveries) / TICK.as_secs().max(1),
                    replication_lag_bytes: self.replication_lag_bytes(),
                },
            );
            last_deliveries = deliveries;
            tick = tick.wrapping_add(1);
            glommio::timer::sleep(TICK).await;
        }
    }

    /// The replication lag for the status history: shard 0 samples it (one number per process).
    fn replication_lag_bytes(&self) -> u64 {
        match (&self.config.postgres_status, self.id.index()) {
            (Some(hook), 0) => (hook.0)()["replication_lag_bytes"].as_u64().unwrap_or(0),
            _ => 0,
        }
    }

    /// Delivers everything another shard sends us.
    pub(crate) async fn receive(self: Rc<Self>, receiver: ConnectedReceiver<ShardMsg>) {
        while let Some(msg) = receiver.recv().await {
            self.route(vec![(self.id, msg)]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::changes::{AuthzReply, AuthzRequest, CallerReply, ChannelKey, CheckKind, Command, Subscription};
    use engine::ChannelSerial;

    fn key(channel: u32) -> ChannelKey {
        ChannelKey { shard: ShardId(0), conn: ConnId(1), channel: ChannelSerial(channel) }
    }

    fn subscribe(channel: u32, claims: &str) -> Command {
        Command::Subscribe(Subscription { key: key(channel), role: "authenticated".into(), claims_json: claims.into(), bindings: Vec::new() })
    }

    fn check(channel: u32, kind: CheckKind, claims: &str) -> Command {
        let request = AuthzRequest { role: "authenticated".into(), claims_json: claims.into(), sub: None, topic: "room".into(), kind };
        Command::Authorize { request, reply: AuthzReply::Channel(key(channel)) }
    }

    fn caller_check() -> Command {
        let request = AuthzRequest { role: "authenticated".into(), claims_json: "{}".into(), sub: None, topic: "room".into(), kind: CheckKind::Write };
        Command::Authorize { request, reply: AuthzReply::Caller(CallerReply::new(|_| {})) }
    }

    /// A short description of each queued command, for comparisons.
    fn shape(queue: &VecDeque<Command>) -> Vec<String> {
        queue
            .iter()
            .map(|command| match command {
                Command::Subscribe(s) => format!("subscribe {} {}", s.key.channel.0, s.claims_json),
                Command::Unsubscribe(k) => format!("unsubscribe {}", k.channel.0),
                Command::Authorize { request, reply: AuthzReply::Channel(k) } => format!("check {} {:?} {}", k.channel.0, request.kind, request.claims_json),
                Command::Authorize { reply: AuthzReply::Caller(_), .. } => "caller check".into(),
                Command::Replay { key, .. } => format!("replay {}", key.channel.0),
            })
            .collect()
    }

    #[test]
    fn a_refresh_loop_costs_one_queued_subscription_and_one_read_check_per_channel() {
        let mut queue = VecDeque::new();
        for refresh in 0..1_000 {
            let claims = format!("{{\"n\":{refresh}}}");
            push_coalesced(&mut queue, check(7, CheckKind::Read, &claims));
            push_coalesced(&mut queue, subscribe(7, &claims));
        }
        push_coalesced(&mut queue, check(7, CheckKind::Write, "w"));
        push_coalesced(&mut queue, subscribe(8, "other"));
        push_coalesced(&mut queue, caller_check());
        push_coalesced(&mut queue, caller_check());
        assert_eq!(
            shape(&queue),
            vec!["check 7 Read {\"n\":999}", "subscribe 7 {\"n\":999}", "check 7 Write w", "subscribe 8 other", "caller check", "caller check"]
        );
    }

    #[test]
    fn an_unsubscribe_removes_what_its_channel_still_had_queued() {
        let mut queue = VecDeque::new();
        push_coalesced(&mut queue, check(7, CheckKind::Read, "a"));
        push_coalesced(&mut queue, Command::Replay { key: key(7), topic: "room".into(), since_ms: 0, limit: 25 });
        push_coalesced(&mut queue, subscribe(7, "a"));
        push_coalesced(&mut queue, subscribe(8, "b"));
        push_coalesced(&mut queue, Command::Unsubscribe(key(7)));
        assert_eq!(shape(&queue), vec!["subscribe 8 b", "unsubscribe 7"]);
    }
}
