//! The link thread: one NATS connection (async-nats on a current-thread tokio runtime) between
//! this node's shards and the other nodes.
//!
//! Queues (all bounded; shards never block on them and never see NATS types):
//! - shards → link, broadcasts: [`DATA_QUEUE_MAX`]; full → the broadcast is delivered on this
//!   node only and counted (`dropped_out`), as while NATS is unreachable;
//! - shards → link, everything else (interest, presence, snapshots): [`CONTROL_QUEUE_MAX`];
//!   full → the shard keeps the message in its own overflow and retries (never dropped);
//! - link → each shard: [`INBOX_MAX`]; a remote broadcast that finds it full is dropped and
//!   counted (`dropped_in`); state changes wait for room.
//!
//! A topic with local subscribers has one NATS subscription, made when its owner shard asks
//! ([`ToLink::Interest`]) and confirmed only after a round trip to the NATS server (a request
//! to a subject nobody serves comes back "no responders" once the server has processed the
//! subscription before it), followed by a presence sync: every other live node answers with
//! its own presence of the topic. Only then does the owner acknowledge the joins waiting on it,
//! so a broadcast published anywhere after a client saw `ok` reaches it. With NATS unreachable
//! the confirmation comes at once (degraded: local delivery only), and when NATS is back every
//! topic re-syncs and every node republishes its own presence.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt as _;

use engine::cluster::{FromLink, ToLink};
use engine::presence::Delta;
use engine::{Broadcast, TenantId, TopicKey};

use crate::stats::{NodeInfo, Stats};
use crate::subject;
use crate::wire::{self, TenantCounts, Wire, COUNTS};

/// Broadcasts waiting for the link (all shards together).
pub const DATA_QUEUE_MAX: usize = 65_536;
/// Interest changes, presence deltas and snapshot answers waiting for the link.
pub const CONTROL_QUEUE_MAX: usize = 65_536;
/// Messages from the link waiting for one shard.
pub const INBOX_MAX: usize = 65_536;
/// Sync requests from other nodes waiting for a shard's answer.
const REPLIES_PENDING_MAX: usize = 65_536;
/// Nodes declared gone that are remembered (to notice one that comes back).
const GONE_REMEMBERED_MAX: usize = 1024;
/// The bound on every wait for NATS (subscribe, the confirming round trip, a publish).
const OP_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a presence sync waits for the other nodes' answers.
const SYNC_WAIT: Duration = Duration::from_millis(500);
/// Commands async-nats buffers for its connection task.
const CLIENT_CAPACITY: usize = 65_536;
/// The link thread's name (the process's panic hook recognises it: [`contains_panic`]).
pub const THREAD_NAME: &str = "cluster-link";

/// Whether the process survives a panic on `thread` raised at `file` (the panic location):
/// yes for one on the link thread inside a dependency, no for anything else.
///
/// async-nats parses what the NATS server sends inside its connection task, and that parser
/// can panic on bytes another NATS client published (0.51 asserts that a header value holds no
/// `\r`, but its line splitting keeps a lone `\r` in the value): with the rule "a panic ends
/// the process", any client allowed to publish on the cluster's subjects could stop every node
/// at once. tokio catches a task's panic and ends only that task; the link sees the client's
/// event stream end and connects again with a new client ([`run`]). A panic in the link's own
/// code (a workspace file: cargo names those by paths relative to the workspace, dependencies
/// by absolute paths) still ends the process, and so does one that unwinds the link's loop
/// itself rather than a task of the client.
pub fn contains_panic(thread: Option<&str>, file: Option<&str>) -> bool {
    thread == Some(THREAD_NAME) && file.is_some_and(|file| std::path::Path::new(file).is_absolute())
}

/// How the link is set up (from CONTRACT.md's variables).
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// `REALTIME_NATS_URL`: comma-separated NATS URLs.
    pub urls: String,
    /// `REALTIME_CLUSTER`: the prefix of every subject.
    pub cluster: String,
    /// `REALTIME_NODE_ID`.
    pub node_id: String,
    /// `REALTIME_NODE_TIMEOUT_SECS`.
    pub node_timeout: Duration,
    /// This node's engine shards.
    pub shards: usize,
}

/// Start-up failures.
#[derive(Debug)]
pub enum ClusterError {
    /// `REALTIME_CLUSTER` is not one subject token.
    ClusterName(String),
    /// The URL list is empty or not NATS URLs.
    Urls(String),
    /// The link thread could not start.
    Thread(std::io::Error),
}

impl std::fmt::Display for ClusterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClusterError::ClusterName(name) => write!(f, "REALTIME_CLUSTER {name:?} must be letters, digits, '_' or '-' (at most 64)"),
            ClusterError::Urls(error) => write!(f, "REALTIME_NATS_URL: {error}"),
            ClusterError::Thread(error) => write!(f, "cannot start the cluster link thread: {error}"),
        }
    }
}

impl std::error::Error for ClusterError {}

/// The shards' side of a running link.
#[derive(Debug)]
pub struct Link {
    /// This process's incarnation (non-zero, random per start): the high half of its presence
    /// replicas' ids.
    pub incarnation: u32,
    /// Broadcasts to other nodes ([`DATA_QUEUE_MAX`]).
    pub data: flume::Sender<ToLink>,
    /// Everything else to the link ([`CONTROL_QUEUE_MAX`]).
    pub control: flume::Sender<ToLink>,
    /// One inbox per shard ([`INBOX_MAX`]).
    pub inboxes: Vec<flume::Receiver<FromLink>>,
    /// Counters and the node list.
    pub stats: Arc<Stats>,
    /// Cluster mode with databases: the shards' per-tenant Postgres Changes command queues.
    pub pg_router: Option<crate::pg::PgRouter>,
    leave: flume::Sender<flume::Sender<()>>,
}

impl Link {
    /// Starts the link thread. It connects in the background (retrying with backoff); until it
    /// is connected the node is degraded.
    pub fn start(config: LinkConfig, registry: Arc<tenants::Registry>, pg: Option<crate::pg::PgPort>) -> Result<Link, ClusterError> {
        if !subject::valid_cluster_name(&config.cluster) {
            return Err(ClusterError::ClusterName(config.cluster));
        }
        let urls: Vec<async_nats::ServerAddr> = config
            .urls
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .map(|url| url.parse::<async_nats::ServerAddr>().map_err(|e| ClusterError::Urls(format!("{url}: {e}"))))
            .collect::<Result<_, _>>()?;
        if urls.is_empty() {
            return Err(ClusterError::Urls("no URL".into()));
        }
        let incarnation = new_incarnation(&config.node_id);
        let (data, data_rx) = flume::bounded(DATA_QUEUE_MAX);
        let (control, control_rx) = flume::bounded(CONTROL_QUEUE_MAX);
        let (inbox_tx, inboxes): (Vec<_>, Vec<_>) = (0..config.shards).map(|_| flume::bounded(INBOX_MAX)).unzip();
        let (leave, leave_rx) = flume::bounded(1);
        let stats = Arc::new(Stats::default());
        let thread_stats = Arc::clone(&stats);
        let (pg_router, new_tenants) = match &pg {
            Some(_) => {
                let (router, receiver) = crate::pg::PgRouter::new();
                (Some(router), Some(receiver))
            }
            None => (None, None),
        };
        std::thread::Builder::new()
            .name(THREAD_NAME.into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        tracing::error!(%error, "cluster link: cannot build its runtime; this node runs alone");
                        return;
                    }
                };
                let local = tokio::task::LocalSet::new();
                let queues = Queues { data: data_rx, control: control_rx, inboxes: inbox_tx, leave: leave_rx, pg, new_tenants };
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| local.block_on(&runtime, run(config, urls, incarnation, registry, thread_stats, queues))));
                if ran.is_err() {
                    // A panic inside a dependency that the hook let through (`contains_panic`)
                    // unwound the link's own loop, not a task of the NATS client: the link
                    // cannot go on, and a panic raised here ends the process.
                    panic!("the cluster link's loop unwound from a panic inside a dependency");
                }
            })
            .map_err(ClusterError::Thread)?;
        Ok(Link { incarnation, data, control, inboxes, stats, pg_router, leave })
    }

    /// Says goodbye (the other nodes drop this node's presences at once) and stops the link;
    /// waits at most 2 s. Called at the start of a drain.
    pub fn leave(&self) {
        let (done, wait) = flume::bounded(1);
        if self.leave.try_send(done).is_ok() {
            let _ = wait.recv_timeout(OP_TIMEOUT);
        }
    }
}

/// A random non-zero incarnation (time, pid and name hashed).
fn new_incarnation(node_id: &str) -> u32 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let seed = format!("{node_id}/{}/{nanos}", std::process::id());
    let hash = xxhash_rust::xxh3::xxh3_64(seed.as_bytes());
    ((hash >> 32) as u32 ^ hash as u32).max(1)
}

struct Node {
    name: String,
    last_seen: Instant,
}

struct PendingSync {
    want: usize,
    got: Vec<Delta>,
    done: Option<tokio::sync::oneshot::Sender<Vec<Delta>>>,
}

struct TopicSub {
    task: tokio::task::JoinHandle<()>,
    /// The interest's generation, and whether its owner got the confirmation: a task started
    /// again on a new client confirms only if the first one had not.
    generation: u64,
    confirmed: Rc<Cell<bool>>,
}

/// The queues the link thread serves.
struct Queues {
    data: flume::Receiver<ToLink>,
    control: flume::Receiver<ToLink>,
    inboxes: Vec<flume::Sender<FromLink>>,
    leave: flume::Receiver<flume::Sender<()>>,
    pg: Option<crate::pg::PgPort>,
    new_tenants: Option<flume::Receiver<(TenantId, flume::Receiver<engine::changes::Command>)>>,
}

/// The link's state, owned by its thread (tasks share it through `Rc`).
pub(crate) struct Shared {
    config: LinkConfig,
    incarnation: u32,
    /// Replaced when the client's connection task ends ([`contains_panic`]).
    client: RefCell<async_nats::Client>,
    registry: Arc<tenants::Registry>,
    stats: Arc<Stats>,
    inboxes: Vec<flume::Sender<FromLink>>,
    topics: RefCell<HashMap<TopicKey, TopicSub>>,
    syncs: RefCell<HashMap<u64, PendingSync>>,
    replies: RefCell<HashMap<u64, String>>,
    next_request: Cell<u64>,
    nodes: RefCell<HashMap<u32, Node>>,
    gone: RefCell<VecDeque<u32>>,
    inbox: String,
    /// Each other node's tenant counts, from its last heartbeat.
    counts: RefCell<HashMap<u32, Vec<TenantCounts>>>,
    /// Postgres Changes routing (cluster mode with databases).
    pub(crate) pg: Option<crate::pg::PgState>,
}

/// The fields of a tenant's counters a heartbeat carries, in [`TenantCounts::values`] order.
fn count_fields() -> [fn(&tenants::ShardSlot) -> &std::sync::atomic::AtomicU64; COUNTS] {
    [|s| &s.users, |s| &s.events_window, |s| &s.joins_window, |s| &s.db_events_window, |s| &s.presence_window, |s| &s.http_window]
}

impl Shared {
    fn connected(&self) -> bool {
        self.client().connection_state() == async_nats::connection::State::Connected
    }

    /// The current NATS client (a handle: cheap to clone).
    fn client(&self) -> async_nats::Client {
        self.client.borrow().clone()
    }

    pub(crate) fn external_id(&self, tenant: TenantId) -> Option<Arc<str>> {
        self.registry.load().get(tenant).map(|t| Arc::clone(&t.external_id))
    }

    fn tenant_of(&self, external_id: &str) -> Option<TenantId> {
        let directory = self.registry.load();
        if !directory.multi_tenant() {
            return external_id.is_empty().then_some(TenantId::SINGLE);
        }
        directory.by_external_id(external_id).map(|t| t.id)
    }

    fn owner_inbox(&self, topic: &TopicKey) -> &flume::Sender<FromLink> {
        &self.inboxes[topic.owner(self.config.shards).index()]
    }

    /// Publishes unless NATS is unreachable; false when the message did not go out.
    async fn publish(&self, subject: String, reply: Option<String>, payload: Bytes) -> bool {
        if !self.connected() {
            return false;
        }
        let len = payload.len() as u64;
        let sent = match reply {
            Some(reply) => tokio::time::timeout(OP_TIMEOUT, self.client().publish_with_reply(subject, reply, payload)).await,
            None => tokio::time::timeout(OP_TIMEOUT, self.client().publish(subject, payload)).await,
        };
        match sent {
            Ok(Ok(())) => {
                Stats::add(&self.stats.messages_out, 1);
                Stats::add(&self.stats.bytes_out, len);
                true
            }
            Ok(Err(error)) => {
                tracing::debug!(%error, "cluster publish failed");
                false
            }
            Err(_) => false,
        }
    }

    /// The other nodes this node hears.
    fn live_nodes(&self) -> usize {
        self.nodes.borrow().len()
    }

    /// Asks every other live node for its presence of `topic` and waits for the answers (at
    /// most [`SYNC_WAIT`]).
    async fn sync(&self, tenant: &str, topic: &TopicKey) -> Vec<Delta> {
        let want = self.live_nodes();
        if want == 0 || !self.connected() {
            return Vec::new();
        }
        Stats::add(&self.stats.syncs, 1);
        let id = self.next_request.get();
        self.next_request.set(id + 1);
        let (done, answers) = tokio::sync::oneshot::channel();
        self.syncs.borrow_mut().insert(id, PendingSync { want, got: Vec::new(), done: Some(done) });
        // The entry goes however this ends: the topic's task may be aborted at an await below
        // (interest off or on again), and a node that never answers would leave it for ever.
        let guard = ForgetSync { syncs: &self.syncs, id };
        let request = wire::encode(&Wire::SyncRequest { tenant: tenant.to_owned(), private: topic.private, sub: Arc::clone(&topic.sub) });
        let sent = self.publish(subject::sync(&self.config.cluster), Some(format!("{}.{id}", self.inbox)), request).await;
        let states = match sent {
            true => tokio::time::timeout(SYNC_WAIT, answers).await.ok().and_then(Result::ok),
            false => None,
        };
        let states = match states {
            Some(states) => states,
            None => {
                Stats::add(&self.stats.sync_timeouts, 1);
                let got = self.syncs.borrow_mut().remove(&id).map(|pending| pending.got).unwrap_or_default();
                got
            }
        };
        drop(guard);
        states
    }

    /// Tells every shard.
    async fn to_all_shards(&self, msg: FromLink) {
        for inbox in &self.inboxes {
            let _ = inbox.send_async(msg.clone()).await;
        }
    }

    fn set_nodes(&self) {
        let now = Instant::now();
        let nodes = self
            .nodes
            .borrow()
            .iter()
            .map(|(incarnation, node)| NodeInfo { node: node.name.clone(), incarnation: *incarnation, last_seen_ms: now.duration_since(node.last_seen).as_millis() as u64 })
            .collect();
        self.stats.set_nodes(nodes);
    }

    /// Sends a subscription change to the leader of its database.
    pub(crate) async fn send_pg(&self, outgoing: crate::pg::Outgoing) {
        let crate::pg::Outgoing::Command { to, tenant, command } = outgoing;
        let payload = wire::encode(&Wire::PgCommand { tenant: tenant.to_string(), from: self.incarnation, command });
        if !self.publish(subject::pg_commands(&self.config.cluster, to), None, payload).await {
            Stats::add(&self.stats.dropped_out, 1);
        }
    }

    /// Recomputes the database leaders and re-sends what a change of leader needs.
    async fn reconcile_pg(&self) {
        let Some(pg) = &self.pg else { return };
        let outgoing = pg.reconcile(|tenant| self.external_id(tenant)).await;
        for message in outgoing {
            self.send_pg(message).await;
        }
        let nodes = self.nodes.borrow();
        let name = |incarnation: u32| if incarnation == self.incarnation { Some(self.config.node_id.clone()) } else { nodes.get(&incarnation).map(|n| n.name.clone()) };
        let mut leaders: Vec<(String, Option<String>)> = pg.leaders().into_iter().filter_map(|(t, l)| Some((self.external_id(t)?.to_string(), l.and_then(name)))).collect();
        leaders.sort();
        self.stats.set_leaders(leaders);
    }

    /// This node's heartbeat.
    fn heartbeat(&self) -> Bytes {
        let leads = self.pg.as_ref().map(|pg| pg.leading().into_iter().filter_map(|t| self.external_id(t)).map(|t| t.to_string()).collect()).unwrap_or_default();
        wire::encode(&Wire::Heartbeat { incarnation: self.incarnation, node: self.config.node_id.clone(), counts: self.local_counts(), leads })
    }

    /// This node's tenants with anything to count, for its heartbeat.
    fn local_counts(&self) -> Vec<TenantCounts> {
        let directory = self.registry.load();
        directory
            .tenants()
            .into_iter()
            .filter_map(|tenant| {
                let values = count_fields().map(|field| tenant.counters.local_sum(field));
                values.iter().any(|v| *v != 0).then(|| TenantCounts { tenant: tenant.external_id.to_string(), values })
            })
            .collect()
    }

    /// Writes the other nodes' summed counts into every tenant's `remote` slot, where the
    /// shards' limit decisions read them.
    fn apply_remote_counts(&self) {
        let mut sums: HashMap<&str, [u64; COUNTS]> = HashMap::new();
        let counts = self.counts.borrow();
        for entry in counts.values().flatten() {
            let sum = sums.entry(entry.tenant.as_str()).or_insert([0; COUNTS]);
            for (total, value) in sum.iter_mut().zip(entry.values) {
                *total = total.saturating_add(value);
            }
        }
        let directory = self.registry.load();
        for tenant in directory.tenants() {
            let values = sums.get(&*tenant.external_id).copied().unwrap_or([0; COUNTS]);
            for (field, value) in count_fields().into_iter().zip(values) {
                field(&tenant.counters.remote).store(value, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    /// Node `incarnation` is gone: every shard drops its presences.
    async fn node_gone(&self, incarnation: u32, why: &str) {
        self.counts.borrow_mut().remove(&incarnation);
        self.apply_remote_counts();
        if let Some(pg) = &self.pg {
            pg.node_gone(incarnation).await;
            self.reconcile_pg().await;
        }
        // A node may be gone before this node heard its first heartbeat (its members came
        // with a sync answer): its presences leave all the same.
        let name = self.nodes.borrow_mut().remove(&incarnation).map(|node| node.name);
        if self.gone.borrow().contains(&incarnation) && name.is_none() {
            return;
        }
        tracing::info!(node = name.as_deref().unwrap_or("?"), incarnation = format!("{incarnation:08x}"), why, "cluster node gone: its presences leave");
        Stats::add(&self.stats.nodes_gone, 1);
        {
            let mut gone = self.gone.borrow_mut();
            if !gone.contains(&incarnation) {
                gone.push_back(incarnation);
                if gone.len() > GONE_REMEMBERED_MAX {
                    gone.pop_front();
                }
            }
        }
        self.set_nodes();
        self.to_all_shards(FromLink::NodeGone { node: incarnation }).await;
    }

    /// Presence came from node `incarnation` (a sync answer, a delta): if it has not been heard
    /// yet, it is tracked from now, so it times out like any node if it stays silent.
    fn saw_node(&self, incarnation: u32) {
        if incarnation == self.incarnation || incarnation == 0 || self.gone.borrow().contains(&incarnation) {
            return;
        }
        self.nodes.borrow_mut().entry(incarnation).or_insert_with(|| Node { name: String::new(), last_seen: Instant::now() });
    }

    /// [`Shared::saw_node`] for every node a delta names.
    fn saw_nodes_of(&self, delta: &Delta) {
        let mut last = None;
        for dot in delta.elements.keys() {
            let node = dot.replica.node();
            if last != Some(node) {
                self.saw_node(node);
                last = Some(node);
            }
        }
    }
}

/// A NATS client that connects in the background (retrying for ever), with its events.
async fn connect(config: &LinkConfig, urls: &[async_nats::ServerAddr]) -> Option<(async_nats::Client, tokio::sync::mpsc::Receiver<async_nats::Event>)> {
    // The sender lives in the client's connection task (through the callback), so the
    // receiver ends when that task does.
    let (event_tx, events) = tokio::sync::mpsc::channel::<async_nats::Event>(256);
    let options = async_nats::ConnectOptions::new()
        .name(format!("powa-realtime {}", config.node_id))
        .no_echo()
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(OP_TIMEOUT)
        .ping_interval(Duration::from_secs(2))
        .client_capacity(CLIENT_CAPACITY)
        .subscription_capacity(CLIENT_CAPACITY)
        .reconnect_delay_callback(|attempts| Duration::from_millis((50u64 << attempts.min(6)).min(2_000)))
        .event_callback(move |event| {
            let event_tx = event_tx.clone();
            async move {
                let _ = event_tx.try_send(event);
            }
        });
    match options.connect(urls.to_vec()).await {
        Ok(client) => Some((client, events)),
        Err(error) => {
            tracing::error!(%error, "cluster link: cannot use REALTIME_NATS_URL; this node runs alone");
            None
        }
    }
}

async fn run(config: LinkConfig, urls: Vec<async_nats::ServerAddr>, incarnation: u32, registry: Arc<tenants::Registry>, stats: Arc<Stats>, queues: Queues) {
    let Queues { data: data_rx, control: control_rx, inboxes, leave: leave_rx, pg, new_tenants } = queues;
    let Some((client, mut events)) = connect(&config, &urls).await else { return };
    tracing::info!(node = %config.node_id, incarnation = format!("{incarnation:08x}"), cluster = %config.cluster, "cluster link started");
    let shared = Rc::new(Shared {
        inbox: subject::inbox(&config.cluster, incarnation),
        config,
        incarnation,
        client: RefCell::new(client),
        registry,
        stats,
        inboxes,
        topics: RefCell::new(HashMap::new()),
        syncs: RefCell::new(HashMap::new()),
        replies: RefCell::new(HashMap::new()),
        next_request: Cell::new(1),
        nodes: RefCell::new(HashMap::new()),
        gone: RefCell::new(VecDeque::new()),
        counts: RefCell::new(HashMap::new()),
        pg: pg.map(|port| crate::pg::PgState::new(port, incarnation)),
    });
    let subscribe = |subject: String| {
        let client = shared.client();
        async move {
            loop {
                match client.subscribe(subject.clone()).await {
                    Ok(sub) => return sub,
                    Err(error) => {
                        tracing::warn!(%error, %subject, "cluster link: subscribe failed; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        }
    };
    let mut heartbeats = subscribe(subject::heartbeat(&shared.config.cluster)).await;
    let mut sync_requests = subscribe(subject::sync(&shared.config.cluster)).await;
    let mut answers = subscribe(format!("{}.*", shared.inbox)).await;
    let (mut pg_commands, mut pg_out) = match &shared.pg {
        Some(_) => (Some(subscribe(subject::pg_commands(&shared.config.cluster, incarnation)).await), Some(subscribe(subject::pg_out(&shared.config.cluster, incarnation)).await)),
        None => (None, None),
    };

    let beat = (shared.config.node_timeout / 3).clamp(Duration::from_millis(100), Duration::from_secs(1));
    let mut ticker = tokio::time::interval(beat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            leave = leave_rx.recv_async() => {
                let bye = wire::encode(&Wire::Bye { incarnation: shared.incarnation });
                shared.publish(subject::heartbeat(&shared.config.cluster), None, bye).await;
                let _ = tokio::time::timeout(OP_TIMEOUT, shared.client().flush()).await;
                tracing::info!("cluster link: goodbye sent");
                if let Ok(done) = leave {
                    let _ = done.try_send(());
                }
                // Keep serving the shards until the process exits, without heartbeats: the
                // other nodes already dropped this node.
                break;
            }
            event = events.recv() => match event {
                Some(event) => on_event(&shared, event).await,
                None => {
                    // The client's connection task ended: only a panic inside it does that
                    // (`contains_panic`), and every subscription went with it. A new client;
                    // its first `Connected` heals (re-syncs presence, republishes ours).
                    Stats::add(&shared.stats.link_restarts, 1);
                    shared.stats.connected.store(false, std::sync::atomic::Ordering::Relaxed);
                    tracing::error!("cluster link: the NATS client failed inside (see the panic above); connecting again with a new client");
                    let Some((client, new_events)) = connect(&shared.config, &urls).await else { return };
                    *shared.client.borrow_mut() = client;
                    events = new_events;
                    heartbeats = subscribe(subject::heartbeat(&shared.config.cluster)).await;
                    sync_requests = subscribe(subject::sync(&shared.config.cluster)).await;
                    answers = subscribe(format!("{}.*", shared.inbox)).await;
                    if shared.pg.is_some() {
                        pg_commands = Some(subscribe(subject::pg_commands(&shared.config.cluster, incarnation)).await);
                        pg_out = Some(subscribe(subject::pg_out(&shared.config.cluster, incarnation)).await);
                    }
                    resubscribe_topics(&shared);
                }
            },
            message = control_rx.recv_async() => match message {
                Ok(message) => on_shard_message(&shared, message).await,
                Err(_) => return,
            },
            message = data_rx.recv_async() => match message {
                Ok(message) => on_shard_message(&shared, message).await,
                Err(_) => return,
            },
            Some(message) = heartbeats.next() => on_heartbeat(&shared, message).await,
            Some(message) = sync_requests.next() => on_sync_request(&shared, message).await,
            Some(message) = answers.next() => on_answer(&shared, message),
            Some((tenant, commands)) = async { match &new_tenants { Some(r) => r.recv_async().await.ok(), None => std::future::pending().await } } => {
                crate::pg::spawn_router(Rc::clone(&shared), tenant, commands);
            }
            Some(first) = async { match &shared.pg { Some(pg) => pg.remote().recv_async().await.ok(), None => std::future::pending().await } } => {
                on_remote_pg(&shared, first).await;
            }
            Some((tenant, leading)) = async { match &shared.pg { Some(pg) => pg.leadership().recv_async().await.ok(), None => std::future::pending().await } } => {
                if let Some(pg) = &shared.pg {
                    pg.set_leading(tenant, leading);
                }
                shared.reconcile_pg().await;
                // Tell the other nodes at once, not at the next beat.
                let beat = shared.heartbeat();
                shared.publish(subject::heartbeat(&shared.config.cluster), None, beat).await;
            }
            Some(message) = next_of(&mut pg_commands) => on_pg_command(&shared, message).await,
            Some(message) = next_of(&mut pg_out) => on_pg_out(&shared, message).await,
            _ = ticker.tick() => {
                if shared.connected() {
                    let beat = shared.heartbeat();
                    shared.publish(subject::heartbeat(&shared.config.cluster), None, beat).await;
                }
                let timeout = shared.config.node_timeout;
                let dead: Vec<u32> = shared.nodes.borrow().iter().filter(|(_, n)| n.last_seen.elapsed() > timeout).map(|(i, _)| *i).collect();
                for incarnation in dead {
                    shared.node_gone(incarnation, "no heartbeat within REALTIME_NODE_TIMEOUT_SECS").await;
                }
                shared.set_nodes();
                shared.apply_remote_counts();
            }
        }
    }
    // After the goodbye: shards still publish while they drain; drop it all quietly.
    drop(heartbeats);
    loop {
        tokio::select! {
            message = control_rx.recv_async() => if message.is_err() { return },
            message = data_rx.recv_async() => if message.is_err() { return },
        }
    }
}

async fn on_event(shared: &Rc<Shared>, event: async_nats::Event) {
    match event {
        async_nats::Event::Connected => {
            let was = shared.stats.connected.swap(true, std::sync::atomic::Ordering::Relaxed);
            if !was {
                tracing::info!("cluster link: connected to NATS");
                Stats::add(&shared.stats.reconnects, 1);
                // What was published while NATS was away is lost: every node re-syncs and
                // republishes its own presence.
                heal(shared);
            }
        }
        async_nats::Event::Disconnected => {
            shared.stats.connected.store(false, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!("cluster link: NATS unreachable; serving this node's clients only until it is back");
        }
        async_nats::Event::SlowConsumer(_) => {
            tracing::warn!("cluster link: NATS dropped messages for this node (slow consumer); re-syncing presence");
            resync_all(shared);
        }
        other => tracing::info!(event = %other, "cluster link event"),
    }
}

/// After NATS or a node comes back: re-sync every routed topic and republish this node's own
/// presence now, and once more two heartbeats later. The other nodes reconnect at their own
/// pace; what one of them published before this node's subscriptions were back, or asked
/// before this node could answer, is made up by the second round (the chaos run found the
/// race).
fn heal(shared: &Rc<Shared>) {
    let shared = Rc::clone(shared);
    tokio::task::spawn_local(async move {
        resync_all(&shared);
        shared.to_all_shards(FromLink::Republish).await;
        tokio::time::sleep(heal_delay(&shared.config)).await;
        if shared.connected() {
            resync_all(&shared);
            shared.to_all_shards(FromLink::Republish).await;
        }
    });
}

/// Two heartbeat periods.
fn heal_delay(config: &LinkConfig) -> Duration {
    (config.node_timeout / 3).clamp(Duration::from_millis(100), Duration::from_secs(1)) * 2
}

/// Removes a pending sync when its `sync` call ends or is dropped.
struct ForgetSync<'a> {
    syncs: &'a RefCell<HashMap<u64, PendingSync>>,
    id: u64,
}

impl Drop for ForgetSync<'_> {
    fn drop(&mut self) {
        self.syncs.borrow_mut().remove(&self.id);
    }
}

/// Re-syncs every topic with interest (its owner merges the answers).
fn resync_all(shared: &Rc<Shared>) {
    let topics: Vec<TopicKey> = shared.topics.borrow().keys().cloned().collect();
    for topic in topics {
        let shared = Rc::clone(shared);
        tokio::task::spawn_local(async move {
            let Some(tenant) = shared.external_id(topic.tenant) else { return };
            let states = shared.sync(&tenant, &topic).await;
            let _ = shared.owner_inbox(&topic).send_async(FromLink::Synced { topic, generation: None, states }).await;
        });
    }
}

async fn on_shard_message(shared: &Rc<Shared>, message: ToLink) {
    match message {
        ToLink::Interest { topic, on: true, generation } => {
            let confirmed = Rc::new(Cell::new(false));
            let task = tokio::task::spawn_local(topic_task(Rc::clone(shared), topic.clone(), generation, Rc::clone(&confirmed)));
            if let Some(old) = shared.topics.borrow_mut().insert(topic, TopicSub { task, generation, confirmed }) {
                old.task.abort();
            }
            shared.stats.routed_topics.store(shared.topics.borrow().len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        ToLink::Interest { topic, on: false, .. } => {
            // Aborting the task drops its subscription, which unsubscribes.
            if let Some(old) = shared.topics.borrow_mut().remove(&topic) {
                old.task.abort();
            }
            shared.stats.routed_topics.store(shared.topics.borrow().len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        ToLink::Publish { topic, message } => {
            let sent = match shared.external_id(topic.tenant) {
                Some(tenant) => {
                    let payload = wire::encode(&Wire::Broadcast { private: topic.private, sub: Arc::clone(&topic.sub), body: message.body.clone() });
                    shared.publish(subject::topic(&shared.config.cluster, &tenant, topic.private, &topic.sub), None, payload).await
                }
                None => false,
            };
            if !sent {
                Stats::add(&shared.stats.dropped_out, 1);
            }
        }
        ToLink::Presence { topic, delta } => {
            // Lost while NATS is away; the republish on reconnect makes up for it.
            if let Some(tenant) = shared.external_id(topic.tenant) {
                let payload = wire::encode(&Wire::Presence { private: topic.private, sub: Arc::clone(&topic.sub), delta: (*delta).clone() });
                shared.publish(subject::topic(&shared.config.cluster, &tenant, topic.private, &topic.sub), None, payload).await;
            }
        }
        ToLink::Snapshot { request, delta } => {
            let reply = shared.replies.borrow_mut().remove(&request);
            if let Some(reply) = reply {
                shared.publish(reply, None, wire::encode(&Wire::Snapshot { delta })).await;
            }
        }
    }
}

/// A new client: every topic's task starts again on it (confirming its interest only if the
/// old task had not).
fn resubscribe_topics(shared: &Rc<Shared>) {
    let mut topics = shared.topics.borrow_mut();
    for (topic, sub) in topics.iter_mut() {
        sub.task.abort();
        // Spawned, not run: the task borrows `topics` only after this borrow ends.
        sub.task = tokio::task::spawn_local(topic_task(Rc::clone(shared), topic.clone(), sub.generation, Rc::clone(&sub.confirmed)));
    }
}

/// One topic's subscription: subscribe, confirm by a round trip, sync presence, tell the owner
/// (once per interest: `confirmed`), then forward what other nodes send until the interest ends
/// (the task is aborted).
async fn topic_task(shared: Rc<Shared>, topic: TopicKey, generation: u64, confirmed: Rc<Cell<bool>>) {
    let inbox = shared.owner_inbox(&topic).clone();
    let Some(tenant) = shared.external_id(topic.tenant) else {
        if !confirmed.get() {
            let _ = inbox.send_async(FromLink::Synced { topic, generation: Some(generation), states: Vec::new() }).await;
            confirmed.set(true);
        }
        return;
    };
    let subject = subject::topic(&shared.config.cluster, &tenant, topic.private, &topic.sub);
    let mut subscription = None;
    loop {
        if subscription.is_none() {
            if let Ok(Ok(sub)) = tokio::time::timeout(OP_TIMEOUT, shared.client().subscribe(subject.clone())).await {
                subscription = Some(sub);
            }
        }
        let mut states = Vec::new();
        if subscription.is_some() && shared.connected() {
            let barrier = tokio::time::timeout(OP_TIMEOUT, shared.client().request(subject::barrier(&shared.config.cluster, shared.incarnation), Bytes::new())).await;
            // "No responders" (or any answer) means the server processed the subscription.
            if matches!(barrier, Ok(Ok(_)) | Ok(Err(_))) {
                states = shared.sync(&tenant, &topic).await;
            }
        }
        if !confirmed.get() {
            // Degraded or not: the joins waiting on this topic are answered now.
            let _ = inbox.send_async(FromLink::Synced { topic: topic.clone(), generation: Some(generation), states }).await;
            confirmed.set(true);
        } else if !states.is_empty() {
            let _ = inbox.send_async(FromLink::Synced { topic: topic.clone(), generation: None, states }).await;
        }
        if subscription.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let Some(mut subscription) = subscription else { return };
    while let Some(message) = subscription.next().await {
        Stats::add(&shared.stats.messages_in, 1);
        Stats::add(&shared.stats.bytes_in, message.payload.len() as u64);
        match wire::decode(&message.payload) {
            Ok(Wire::Broadcast { private, sub, body }) if private == topic.private && sub == topic.sub => {
                let message = Arc::new(Broadcast { origin: None, body });
                if let Err(flume::TrySendError::Full(_)) = inbox.try_send(FromLink::Remote { topic: topic.clone(), message }) {
                    Stats::add(&shared.stats.dropped_in, 1);
                }
            }
            Ok(Wire::Presence { private, sub, delta }) if private == topic.private && sub == topic.sub => {
                shared.saw_nodes_of(&delta);
                let _ = inbox.send_async(FromLink::Presence { topic: topic.clone(), delta }).await;
            }
            // Another topic with the same subject hash (2^-64), or not ours.
            Ok(_) => {}
            Err(_) => Stats::add(&shared.stats.malformed_in, 1),
        }
    }
}

async fn on_heartbeat(shared: &Rc<Shared>, message: async_nats::Message) {
    Stats::add(&shared.stats.messages_in, 1);
    match wire::decode(&message.payload) {
        Ok(Wire::Heartbeat { incarnation, node, counts, leads }) if incarnation != shared.incarnation => {
            shared.counts.borrow_mut().insert(incarnation, counts);
            if let Some(pg) = &shared.pg {
                pg.set_leads(incarnation, Some(leads));
                shared.reconcile_pg().await;
            }
            // Known by name (a node first seen through its presence has no name yet).
            let known = shared.nodes.borrow().get(&incarnation).is_some_and(|n| !n.name.is_empty());
            if !known {
                // The same name with a new incarnation: that node restarted; its old self is gone.
                let restarted: Vec<u32> = shared.nodes.borrow().iter().filter(|(i, n)| n.name == node && **i != incarnation).map(|(i, _)| *i).collect();
                for old in restarted {
                    shared.node_gone(old, "restarted").await;
                }
                let returned = {
                    let mut gone = shared.gone.borrow_mut();
                    let before = gone.len();
                    gone.retain(|i| *i != incarnation);
                    gone.len() != before
                };
                tracing::info!(%node, incarnation = format!("{incarnation:08x}"), returned, "cluster node joined");
                shared.nodes.borrow_mut().insert(incarnation, Node { name: node, last_seen: Instant::now() });
                shared.set_nodes();
                if returned {
                    // Declared gone but alive (a partition healed): its presences were
                    // forgotten here, and ours there. Accept it again, merge both ways.
                    shared.to_all_shards(FromLink::NodeBack { node: incarnation }).await;
                    heal(shared);
                }
            } else if let Some(entry) = shared.nodes.borrow_mut().get_mut(&incarnation) {
                entry.last_seen = Instant::now();
                if entry.name.is_empty() {
                    entry.name = node;
                }
            }
        }
        Ok(Wire::Bye { incarnation }) => shared.node_gone(incarnation, "goodbye").await,
        Ok(_) => {}
        Err(_) => Stats::add(&shared.stats.malformed_in, 1),
    }
}

async fn on_sync_request(shared: &Rc<Shared>, message: async_nats::Message) {
    Stats::add(&shared.stats.messages_in, 1);
    let Some(reply) = message.reply.map(|r| r.to_string()) else { return };
    let Ok(Wire::SyncRequest { tenant, private, sub }) = wire::decode(&message.payload) else {
        Stats::add(&shared.stats.malformed_in, 1);
        return;
    };
    let empty = || wire::encode(&Wire::Snapshot { delta: Delta::default() });
    let Some(tenant) = shared.tenant_of(&tenant) else {
        shared.publish(reply, None, empty()).await;
        return;
    };
    if shared.replies.borrow().len() >= REPLIES_PENDING_MAX {
        shared.publish(reply, None, empty()).await;
        return;
    }
    let topic = TopicKey::new_sub(tenant, &sub, private);
    let request = shared.next_request.get();
    shared.next_request.set(request + 1);
    shared.replies.borrow_mut().insert(request, reply.clone());
    if shared.owner_inbox(&topic).try_send(FromLink::SnapshotRequest { topic, request }).is_err() {
        shared.replies.borrow_mut().remove(&request);
        shared.publish(reply, None, empty()).await;
    }
}

fn on_answer(shared: &Rc<Shared>, message: async_nats::Message) {
    Stats::add(&shared.stats.messages_in, 1);
    let Some(id) = message.subject.rsplit('.').next().and_then(|id| id.parse::<u64>().ok()) else { return };
    let Ok(Wire::Snapshot { delta }) = wire::decode(&message.payload) else {
        Stats::add(&shared.stats.malformed_in, 1);
        return;
    };
    shared.saw_nodes_of(&delta);
    let mut syncs = shared.syncs.borrow_mut();
    let Some(pending) = syncs.get_mut(&id) else { return };
    pending.got.push(delta);
    if pending.got.len() >= pending.want {
        if let Some(mut pending) = syncs.remove(&id) {
            if let Some(done) = pending.done.take() {
                let _ = done.send(std::mem::take(&mut pending.got));
            }
        }
    }
}

/// The next message of an optional subscription (never, without one).
async fn next_of(sub: &mut Option<async_nats::Subscriber>) -> Option<async_nats::Message> {
    match sub {
        Some(sub) => sub.next().await,
        None => std::future::pending().await,
    }
}

/// The cores' messages for other nodes' channels: `first` and whatever else is queued (up to a
/// batch), one NATS message per destination node.
async fn on_remote_pg(shared: &Rc<Shared>, first: (engine::ShardId, engine::changes::PgOut)) {
    let Some(pg) = &shared.pg else { return };
    let mut batch = vec![first];
    while batch.len() < 1024 {
        match pg.remote().try_recv() {
            Ok(item) => batch.push(item),
            Err(_) => break,
        }
    }
    for (node, items) in pg.group_remote(batch) {
        let payload = wire::encode(&Wire::PgOut { items });
        if !shared.publish(subject::pg_out(&shared.config.cluster, node), None, payload).await {
            Stats::add(&shared.stats.dropped_out, 1);
        }
    }
}

/// A follower's subscription change for a database this node leads.
async fn on_pg_command(shared: &Rc<Shared>, message: async_nats::Message) {
    Stats::add(&shared.stats.messages_in, 1);
    let Some(pg) = &shared.pg else { return };
    match wire::decode(&message.payload) {
        Ok(Wire::PgCommand { tenant, from, command }) => match shared.tenant_of(&tenant) {
            Some(tenant) => pg.from_node(tenant, from, command).await,
            None => tracing::debug!(tenant, "cluster link: a subscription for an unknown tenant"),
        },
        _ => Stats::add(&shared.stats.malformed_in, 1),
    }
}

/// The leader's messages for this node's channels.
async fn on_pg_out(shared: &Rc<Shared>, message: async_nats::Message) {
    Stats::add(&shared.stats.messages_in, 1);
    Stats::add(&shared.stats.bytes_in, message.payload.len() as u64);
    let Some(pg) = &shared.pg else { return };
    match wire::decode(&message.payload) {
        Ok(Wire::PgOut { items }) => {
            let dropped = pg.deliver(items).await;
            Stats::add(&shared.stats.dropped_in, dropped);
        }
        _ => Stats::add(&shared.stats.malformed_in, 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contains_only_dependency_panics_on_the_link_thread() {
        let dependency = "/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/async-nats-0.51.0/src/header.rs";
        assert!(contains_panic(Some(THREAD_NAME), Some(dependency)));
        assert!(!contains_panic(Some(THREAD_NAME), Some("cluster/src/link.rs")));
        assert!(!contains_panic(Some("shard0"), Some(dependency)));
        assert!(!contains_panic(None, Some(dependency)));
        assert!(!contains_panic(Some(THREAD_NAME), None));
        // The rule rests on cargo naming workspace files by relative paths: a build that
        // remaps them would make the link's own panics look like a dependency's.
        assert!(!std::path::Path::new(file!()).is_absolute(), "{}", file!());
    }
}
