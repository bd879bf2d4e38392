//! Many tenants' Postgres sides in one process, on a small fixed set of threads.
//!
//! ```text
//!  shards ──Command──▶ tenant A's core ─┐                       worker thread 0 (tokio current-thread
//!  shards ──Command──▶ tenant B's core ─┼─PgOut─▶ one inbox     + LocalSet): A's reader and core,
//!  shards ──Command──▶ tenant C's core ─┘        per shard      C's reader and core, …
//!                                                               worker thread 1: B's reader and core, …
//! ```
//!
//! [`Fleet::handle`] returns a tenant's command queue at once (a map lookup under a mutex, no
//! I/O). On the tenant's first need it schedules, on the least-loaded worker, the tenant's
//! *run*: preflight and schema install ([`crate::install`]), then its replication reader
//! ([`crate::reader::run`], an async task) and its changes core ([`crate::changes`]), all
//! tasks of one `LocalSet` of the tenant's own, nested in the worker's, so stopping the tenant
//! drops every task it started (SQL connections included). Commands wait in the bounded queue
//! ([`COMMANDS_MAX`]) until the core runs.
//!
//! **Failures stay with their tenant.** A transient failure before the core runs (database
//! unreachable, server starting) is retried with backoff (0.5 s doubling to 30 s) while the
//! tenant's commands wait (each attempt bounded by a 10 s connect timeout; given up when nothing
//! needs the tenant for [`FleetConfig::idle_stop`]); a definite one (wrong password, missing database, no privilege,
//! failed install: [`ReplicationError`]) starts the core in its *failed* mode: it opens no
//! connection and answers every command with the database errors it gives when its database is
//! gone (a `system` error "Realtime was unable to connect to the project database", a failed
//! policy check, a failed replay). Such a tenant is started afresh on its next need after
//! [`FleetConfig::retry_failed_after`]; a definite error of the reader after the start (e.g. the
//! role lost REPLICATION) is treated the same way.
//!
//! **Bounds.** At most [`FleetConfig::databases_max`] tenant runs at once (failed ones included,
//! they hold no connection). A tenant beyond it gets a failed-mode run whose error says the
//! node is full (SQLSTATE 53300), so its joins fail at once with the database error instead of
//! hanging; that run ends after [`CAPACITY_RETRY`] and the next need tries again. Connections
//! per running tenant: 1 replication + 3 SQL (metadata and replays; RLS checks of changes;
//! private-channel policy checks), plus 1 short-lived at the start (install) and 1 at a clean
//! stop (dropping the slot): at most [`CONNECTIONS_PER_TENANT_MAX`] per tenant and
//! `databases_max ×` that in total. Threads: [`FleetConfig::workers`] plus at most
//! [`BLOCKING_THREADS_PER_WORKER`] per worker for DNS look-ups (tokio's blocking pool),
//! whatever the number of tenants.
//!
//! **Idle stop.** A running tenant whose core has had no subscription and no command, and that
//! [`FleetConfig::in_use`] does not report in use (e.g. it has open sockets), for
//! [`FleetConfig::idle_stop`] is stopped cleanly: the reader leaves the stream and drops its
//! permanent slot, the core ends, and its command queue then reports `Disconnected`, so the
//! shards ask [`Fleet::handle`] again, which starts it afresh. [`Fleet::retire`] stops a tenant
//! at once (removed, or its URL changed: `handle` with another URL does it too);
//! [`Fleet::stop_all`] stops every tenant for the process's clean shutdown.
//!
//! **Slots.** Each tenant's slot is named from [`FleetConfig::slot`]'s base name and the
//! tenant's external id ([`tenant_slot_name`]), so tenants whose databases share a cluster never
//! share a slot; [`FleetConfig::slot_per_tenant`] `false` keeps the base name as it is (the
//! single-tenant server).

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use engine::TenantId;
use tracing::Instrument;

use crate::changes::{self, Command, CoreStats, PgOut, COMMANDS_MAX, SHARD_INBOX_MAX};
use crate::error::{Fault, ReplicationError};
use crate::pgconn::ConnParams;
use crate::reader::{self, ReaderControl, ReaderStats, SlotConfig};

/// Default number of worker threads.
pub const WORKERS_DEFAULT: usize = 2;
/// Default idle time before a tenant's Postgres side is stopped.
pub const IDLE_STOP_DEFAULT: Duration = Duration::from_secs(300);
/// Default bound of tenant runs at once.
pub const DATABASES_MAX_DEFAULT: usize = 1000;
/// Default wait before a tenant stopped by a definite error is started again on its next need.
pub const RETRY_FAILED_AFTER_DEFAULT: Duration = Duration::from_secs(300);
/// How long a tenant refused for capacity keeps its failed-mode run (its joins fail at once);
/// the next need after it tries again.
pub const CAPACITY_RETRY: Duration = Duration::from_secs(10);
/// Threads of tokio's blocking pool per worker (host name look-ups of connects).
pub const BLOCKING_THREADS_PER_WORKER: usize = 2;
/// Database connections one tenant opens at most at once: 1 replication + 3 SQL steady, +1
/// during its start (install) or its stop (slot drop).
pub const CONNECTIONS_PER_TENANT_MAX: usize = 5;
/// How long a tenant's clean stop waits for its reader to leave the stream and drop its slot.
pub const STOP_WAIT: Duration = Duration::from_secs(10);

/// How long one connection attempt of a tenant's start may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const PREPARE_BACKOFF_MIN: Duration = Duration::from_millis(500);
const PREPARE_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Decides whether a tenant is in use beyond what its core sees (e.g. it has open sockets);
/// called from the worker threads by the idle check. Must not block.
pub type InUse = Arc<dyn Fn(TenantId) -> bool + Send + Sync>;

/// How the fleet runs.
#[derive(Clone)]
pub struct FleetConfig {
    /// Number of shards (one inbox each).
    pub shards: usize,
    /// Worker threads shared by every tenant's reader and core (default 2).
    pub workers: usize,
    /// A tenant idle this long is stopped (default 5 min); `None`: never.
    pub idle_stop: Option<Duration>,
    /// Tenant runs at once (default 1000).
    pub databases_max: usize,
    /// The slot's base name and bounds.
    pub slot: SlotConfig,
    /// `true` (the default): each tenant's slot is [`tenant_slot_name`] of the base name and its
    /// external id; `false`: the base name as it is (for a single tenant).
    pub slot_per_tenant: bool,
    /// A tenant stopped by a definite error is started afresh on its next need after this
    /// (default 5 min).
    pub retry_failed_after: Duration,
    /// Whether a tenant is in use beyond its core (open sockets); `None`: only subscriptions
    /// and commands count.
    pub in_use: Option<InUse>,
    /// Cluster mode: one node per tenant database streams (the leader); see [`FleetCluster`].
    pub cluster: Option<FleetCluster>,
}

/// Cluster mode (CONTRACT.md "Cluster"): every node runs each tenant's core (policy checks and
/// replays stay on the node of the client), but only the node holding the tenant's *leader
/// lock* — a PostgreSQL session advisory lock on the tenant's own database, keyed by the slot
/// name — runs the replication reader. The lock lives as long as the leader's session: a dead
/// node's lock is released when PostgreSQL sees its connection close, and another node's next
/// attempt (every [`LEADER_RETRY`]) takes it. The slot is shared ([`SlotConfig::shared`]):
/// the new leader resumes from where the old one confirmed.
#[derive(Clone)]
pub struct FleetCluster {
    /// Where the core sends messages for other nodes' channels (key shards from
    /// `engine::changes::REMOTE_SHARD_BASE`): the cluster link.
    pub remote: flume::Sender<(engine::ShardId, PgOut)>,
    /// Told when this node starts or stops leading a tenant's database (called on a fleet
    /// worker; must not block).
    pub leadership: Arc<dyn Fn(TenantId, bool) + Send + Sync>,
}

/// How often a node that does not lead tries the leader lock.
pub const LEADER_RETRY: Duration = Duration::from_secs(1);
/// How long a new leader waits between taking the lock and starting the stream, so the other
/// nodes (told by the link at once) re-send their subscriptions first.
pub const TAKEOVER_GRACE: Duration = Duration::from_millis(1500);
/// How often the leader checks that its lock's session is alive.
const LEADER_CHECK: Duration = Duration::from_secs(2);

impl FleetConfig {
    /// The defaults for `shards` shards.
    pub fn new(shards: usize) -> FleetConfig {
        FleetConfig {
            shards,
            workers: WORKERS_DEFAULT,
            idle_stop: Some(IDLE_STOP_DEFAULT),
            databases_max: DATABASES_MAX_DEFAULT,
            slot: SlotConfig::default(),
            slot_per_tenant: true,
            retry_failed_after: RETRY_FAILED_AFTER_DEFAULT,
            in_use: None,
            cluster: None,
        }
    }
}

impl std::fmt::Debug for FleetConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetConfig")
            .field("shards", &self.shards)
            .field("workers", &self.workers)
            .field("idle_stop", &self.idle_stop)
            .field("databases_max", &self.databases_max)
            .field("slot", &self.slot)
            .field("slot_per_tenant", &self.slot_per_tenant)
            .field("retry_failed_after", &self.retry_failed_after)
            .field("in_use", &self.in_use.is_some())
            .field("cluster", &self.cluster.is_some())
            .finish()
    }
}

/// The slot name of a tenant: `<base>_<external id>_<hash>`, the external id lower-cased with
/// every byte outside `[a-z0-9_]` replaced by `_`, cut so the whole name fits PostgreSQL's
/// 63 bytes, and `<hash>` 8 hex digits of the FNV-1a hash of the external id as given, so two
/// ids that sanitise or cut to the same text still get different names. Stable across
/// restarts and versions (a slot outlives the process).
pub fn tenant_slot_name(base: &str, external_id: &str) -> String {
    let clean = |text: &str| -> String { text.chars().map(|c| c.to_ascii_lowercase()).map(|c| if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' { c } else { '_' }).collect() };
    let mut hash: u32 = 0x811c_9dc5;
    for byte in external_id.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    let suffix = format!("_{hash:08x}");
    let mut base = clean(base);
    if base.is_empty() {
        base = reader::SLOT_NAME.into();
    }
    base.truncate(30);
    let mut name = format!("{base}_{}", clean(external_id));
    name.truncate(63 - suffix.len());
    name.push_str(&suffix);
    name
}

/// Where a tenant's run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TenantState {
    /// Scheduled; preflight and install (retried while the database is unreachable).
    Starting,
    /// Reader and core running.
    Running,
    /// A definite error: the core answers every command with the database error.
    Failed,
    /// Stopping (idle, retired, or the fleet stops).
    Stopping,
    /// Ended: its command queue reports `Disconnected`.
    Stopped,
}

impl TenantState {
    fn from_u8(value: u8) -> TenantState {
        match value {
            0 => TenantState::Starting,
            1 => TenantState::Running,
            2 => TenantState::Failed,
            3 => TenantState::Stopping,
            _ => TenantState::Stopped,
        }
    }
}

/// One tenant's figures, for `/metrics` and `/api/status`.
#[derive(Debug, Clone)]
pub struct TenantStats {
    /// The tenant.
    pub tenant: TenantId,
    /// Its external id.
    pub external_id: String,
    /// Its slot's name.
    pub slot: String,
    /// Reader counters.
    pub reader: Arc<ReaderStats>,
    /// Core counters.
    pub core: Arc<CoreStats>,
    /// Whether its database connections are up.
    pub healthy: Arc<AtomicBool>,
    /// Where its run is.
    pub state: TenantState,
    /// The definite error it stopped on, if any.
    pub error: Option<String>,
}

/// A tenant's run, shared by the fleet's map and the run's task.
struct Run {
    tenant: TenantId,
    external_id: String,
    url: String,
    slot: String,
    generation: u64,
    commands: flume::Sender<Command>,
    healthy: Arc<AtomicBool>,
    reader_stats: Arc<ReaderStats>,
    core_stats: Arc<CoreStats>,
    control: Arc<ReaderControl>,
    state: AtomicU8,
    error: Mutex<Option<String>>,
    /// Asks the run to stop (a permit is kept if it is not waiting yet).
    stop: tokio::sync::Notify,
    stop_asked: AtomicBool,
    /// Refused for capacity (holds no connection; not counted against `databases_max`).
    refused: bool,
}

impl Run {
    fn set_state(&self, state: TenantState) {
        self.state.store(state as u8, Ordering::Relaxed);
    }

    fn state(&self) -> TenantState {
        TenantState::from_u8(self.state.load(Ordering::Relaxed))
    }

    fn ask_stop(&self) {
        self.stop_asked.store(true, Ordering::Relaxed);
        self.stop.notify_one();
    }
}

/// What a worker is asked to do.
enum Job {
    Start(Box<StartJob>),
    Quit,
}

struct StartJob {
    run: Arc<Run>,
    commands: flume::Receiver<Command>,
    /// The shards' inboxes (shared by every run).
    shards: Vec<flume::Sender<PgOut>>,
    payload_bytes_max: usize,
    /// Refused for capacity: a failed-mode run with this error.
    refused: Option<ReplicationError>,
    /// The schema is installed already (the single-tenant start did it before listening).
    installed: bool,
}

struct Worker {
    jobs: flume::Sender<Job>,
    load: Arc<AtomicUsize>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

type Runs = Arc<Mutex<HashMap<TenantId, Arc<Run>>>>;

struct Shared {
    config: FleetConfig,
    senders: Vec<flume::Sender<PgOut>>,
    workers: Vec<Worker>,
    runs: Runs,
    generation: AtomicU64,
    stopping: AtomicBool,
}

/// The Postgres sides of many tenants. Cheap to clone (one shared state). Dropping it stops
/// nothing: [`Fleet::stop_all`] does.
#[derive(Clone)]
pub struct Fleet {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet").field("config", &self.shared.config).field("tenants", &self.lock().len()).finish()
    }
}

impl Fleet {
    /// Starts the worker threads; returns the fleet and one bounded inbox per shard
    /// ([`SHARD_INBOX_MAX`]), shared by every tenant's core.
    pub fn new(config: FleetConfig) -> (Fleet, Vec<flume::Receiver<PgOut>>) {
        let mut config = config;
        config.workers = config.workers.max(1);
        config.shards = config.shards.max(1);
        let (senders, inboxes): (Vec<_>, Vec<_>) = (0..config.shards).map(|_| flume::bounded(SHARD_INBOX_MAX)).unzip();
        let runs: Runs = Arc::new(Mutex::new(HashMap::new()));
        let workers = (0..config.workers)
            .map(|index| {
                // Unbounded in type, bounded in use: at most one start per tenant run, and
                // runs are bounded by `databases_max` (+ capacity refusals, one per tenant).
                let (jobs, job_rx) = flume::unbounded();
                let load = Arc::new(AtomicUsize::new(0));
                let thread = spawn_worker(index, job_rx, Arc::clone(&load), Arc::clone(&runs), config.clone());
                Worker { jobs, load, thread: Mutex::new(Some(thread)) }
            })
            .collect();
        let shared = Shared { config, senders, workers, runs, generation: AtomicU64::new(1), stopping: AtomicBool::new(false) };
        (Fleet { shared: Arc::new(shared) }, inboxes)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TenantId, Arc<Run>>> {
        self.shared.runs.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The command queue of `tenant`'s core and its health flag. Non-blocking: a map look-up;
    /// on first need (or after the run stopped, or with another `url`) a start is scheduled on
    /// a worker. Commands wait in the queue until the core runs. When the run stops (idle,
    /// retired, failed and expired), sends report `Disconnected`: ask again.
    pub fn handle(&self, tenant: TenantId, external_id: &str, url: &str, payload_bytes_max: usize) -> (flume::Sender<Command>, Arc<AtomicBool>) {
        self.handle_inner(tenant, external_id, url, payload_bytes_max, false)
    }

    fn handle_inner(&self, tenant: TenantId, external_id: &str, url: &str, payload_bytes_max: usize, installed: bool) -> (flume::Sender<Command>, Arc<AtomicBool>) {
        let mut runs = self.lock();
        if let Some(run) = runs.get(&tenant) {
            if run.url == url && run.external_id == external_id && !run.stop_asked.load(Ordering::Relaxed) {
                return (run.commands.clone(), Arc::clone(&run.healthy));
            }
            // Its URL changed: the old run stops now (it drops its slot), a new one starts.
            let old = runs.remove(&tenant).expect("present");
            old.ask_stop();
        }
        let active = runs.values().filter(|r| !r.refused).count();
        let refused = if self.shared.stopping.load(Ordering::Relaxed) {
            Some(ReplicationError { fault: Fault::Definite, detail: "the server is stopping".into(), sqlstate: None })
        } else if active >= self.shared.config.databases_max {
            tracing::warn!(tenant = external_id, databases_max = self.shared.config.databases_max, "too many tenant databases on this node: the tenant's database is refused for now");
            Some(ReplicationError {
                fault: Fault::Definite,
                detail: format!("this node already serves {} tenant databases (databases_max)", self.shared.config.databases_max),
                sqlstate: Some("53300".into()),
            })
        } else {
            None
        };
        let (commands, command_rx) = flume::bounded(COMMANDS_MAX);
        let slot = if self.shared.config.slot_per_tenant { tenant_slot_name(&self.shared.config.slot.name, external_id) } else { self.shared.config.slot.name.clone() };
        let run = Arc::new(Run {
            tenant,
            external_id: external_id.to_string(),
            url: url.to_string(),
            slot,
            generation: self.shared.generation.fetch_add(1, Ordering::Relaxed),
            commands: commands.clone(),
            // Down until its core has connected (the single-tenant start checked the database).
            healthy: Arc::new(AtomicBool::new(installed)),
            reader_stats: Arc::new(ReaderStats::default()),
            core_stats: Arc::new(CoreStats::default()),
            control: Arc::new(ReaderControl::default()),
            state: AtomicU8::new(TenantState::Starting as u8),
            error: Mutex::new(None),
            stop: tokio::sync::Notify::new(),
            stop_asked: AtomicBool::new(false),
            refused: refused.is_some(),
        });
        let healthy = Arc::clone(&run.healthy);
        let worker = self.shared.workers.iter().min_by_key(|w| w.load.load(Ordering::Relaxed)).expect("at least one worker");
        worker.load.fetch_add(1, Ordering::Relaxed);
        let job = StartJob { run: Arc::clone(&run), commands: command_rx, shards: self.shared.senders.clone(), payload_bytes_max, refused, installed };
        if worker.jobs.send(Job::Start(Box::new(job))).is_err() {
            // The worker has quit (after stop_all): the queue reports Disconnected.
            worker.load.fetch_sub(1, Ordering::Relaxed);
        }
        runs.insert(tenant, run);
        (commands, healthy)
    }

    /// The shards' inboxes every core sends to (cluster mode: the link delivers the leader's
    /// messages for this node's channels through them).
    pub fn shard_senders(&self) -> Vec<flume::Sender<PgOut>> {
        self.shared.senders.clone()
    }

    /// Stops `tenant`'s run now (removed, or its URL changed): the reader drops its slot, the
    /// core ends, its queue reports `Disconnected`. Does not wait.
    pub fn retire(&self, tenant: TenantId) {
        if let Some(run) = self.lock().remove(&tenant) {
            run.ask_stop();
        }
    }

    /// Every tenant's figures.
    pub fn stats(&self) -> Vec<TenantStats> {
        let runs = self.lock();
        let mut stats: Vec<TenantStats> = runs
            .values()
            .map(|run| TenantStats {
                tenant: run.tenant,
                external_id: run.external_id.clone(),
                slot: run.slot.clone(),
                reader: Arc::clone(&run.reader_stats),
                core: Arc::clone(&run.core_stats),
                healthy: Arc::clone(&run.healthy),
                state: run.state(),
                error: run.error.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            })
            .collect();
        stats.sort_by_key(|s| s.tenant.0);
        stats
    }

    /// The reader controls of `tenant`'s current run (the single-tenant server's clean stop).
    pub fn control(&self, tenant: TenantId) -> Option<Arc<ReaderControl>> {
        self.lock().get(&tenant).map(|run| Arc::clone(&run.control))
    }

    /// The clean shutdown: stops every tenant (each reader drops its slot), waits for them up
    /// to `timeout`, then ends the worker threads. Returns whether every run ended in time.
    /// Later [`Fleet::handle`] calls get queues that report `Disconnected`.
    pub fn stop_all(&self, timeout: Duration) -> bool {
        self.shared.stopping.store(true, Ordering::Relaxed);
        let runs: Vec<Arc<Run>> = self.lock().drain().map(|(_, run)| run).collect();
        for run in &runs {
            run.ask_stop();
        }
        let started = Instant::now();
        let all_ended = loop {
            let ended = runs.iter().all(|run| run.state() == TenantState::Stopped);
            if ended || started.elapsed() >= timeout {
                break ended;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        for worker in &self.shared.workers {
            let _ = worker.jobs.send(Job::Quit);
        }
        for worker in &self.shared.workers {
            let thread = worker.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(thread) = thread {
                if all_ended {
                    let _ = thread.join();
                }
            }
        }
        all_ended
    }
}

/// The single-tenant server's use of the fleet: one tenant ([`TenantId::SINGLE`]), the slot's
/// name as configured, the schema already installed (the server checked it before listening).
pub(crate) fn single(fleet: &Fleet, url: &str, payload_bytes_max: usize) -> (flume::Sender<Command>, Arc<AtomicBool>, Arc<ReaderControl>) {
    let (commands, healthy) = fleet.handle_inner(TenantId::SINGLE, "", url, payload_bytes_max, true);
    let control = fleet.control(TenantId::SINGLE).expect("just started");
    (commands, healthy, control)
}

fn spawn_worker(index: usize, jobs: flume::Receiver<Job>, load: Arc<AtomicUsize>, runs: Runs, config: FleetConfig) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name(format!("pg-worker-{index}"))
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .max_blocking_threads(BLOCKING_THREADS_PER_WORKER)
                .thread_name(format!("pg-worker-{index}-blocking"))
                .build()
                .expect("tokio runtime");
            let local = tokio::task::LocalSet::new();
            let config = Rc::new(config);
            local.block_on(&runtime, async move {
                loop {
                    let job = match jobs.recv_async().await {
                        Ok(Job::Start(job)) => job,
                        Ok(Job::Quit) => break,
                        // Every `Fleet` handle is gone: the runs go on (nothing can stop them
                        // but the process's end).
                        Err(_) => std::future::pending().await,
                    };
                    let load = Arc::clone(&load);
                    let runs = Arc::clone(&runs);
                    let config = Rc::clone(&config);
                    tokio::task::spawn_local(async move {
                        let run = Arc::clone(&job.run);
                        // The tenant's own LocalSet: dropping it ends every task the run started.
                        let set = tokio::task::LocalSet::new();
                        set.run_until(tenant_main(*job, &config, &runs)).await;
                        drop(set);
                        run.set_state(TenantState::Stopped);
                        load.fetch_sub(1, Ordering::Relaxed);
                    });
                }
            });
        })
        .expect("spawn a fleet worker thread")
}

/// Removes `run` from the map if it is still the tenant's current run.
fn forget(runs: &Runs, run: &Run) {
    let mut map = runs.lock().unwrap_or_else(|p| p.into_inner());
    if map.get(&run.tenant).is_some_and(|current| current.generation == run.generation) {
        map.remove(&run.tenant);
    }
}

/// Waits `duration` or until the run is asked to stop; true when asked.
async fn wait_or_stop(run: &Run, duration: Duration) -> bool {
    if run.stop_asked.load(Ordering::Relaxed) {
        return true;
    }
    tokio::select! {
        _ = run.stop.notified() => true,
        _ = tokio::time::sleep(duration) => run.stop_asked.load(Ordering::Relaxed),
    }
}

/// Install failures retried before they count as definite (a migration that fails the same
/// way each time).
const INSTALL_ATTEMPTS_MAX: u32 = 5;

/// Preflight and install, retrying transient failures; `Err(None)` when asked to stop, or when
/// the tenant stopped being needed while its database stayed unreachable (no command waiting,
/// not in use, for `idle_stop`).
async fn prepare(run: &Run, commands: &flume::Receiver<Command>, config: &FleetConfig) -> Result<(), Option<ReplicationError>> {
    let mut backoff = PREPARE_BACKOFF_MIN;
    let mut install_failures = 0;
    let mut last_needed = Instant::now();
    loop {
        if !commands.is_empty() || config.in_use.as_ref().is_some_and(|in_use| in_use(run.tenant)) {
            last_needed = Instant::now();
        }
        if config.idle_stop.is_some_and(|idle| last_needed.elapsed() >= idle) {
            tracing::info!(tenant = %run.external_id, "tenant no longer needed while its database is unreachable: giving up for now");
            return Err(None);
        }
        let attempt = async {
            let connect = tokio::time::timeout(CONNECT_TIMEOUT, crate::sql::connect(&run.url));
            let mut client = match connect.await {
                Ok(connected) => connected.map_err(|e| ReplicationError::from_sql(&e))?,
                Err(_) => return Err(ReplicationError { fault: Fault::Transient, detail: "connecting to the database timed out".into(), sqlstate: None }),
            };
            let applied = crate::install::install(&mut client).await.map_err(|e| install_error(&e, &mut install_failures))?;
            tracing::info!(tenant = %run.external_id, migrations = applied.len(), "realtime schema installed");
            if let Err(error) = client.simple_query(crate::install::MAINTAIN_SQL).await {
                tracing::warn!(tenant = %run.external_id, error = %crate::sql::error_text(&error), "realtime.messages partition maintenance failed");
            }
            Ok::<(), ReplicationError>(())
        };
        let result = tokio::select! {
            result = attempt => result,
            _ = run.stop.notified() => return Err(None),
        };
        match result {
            Ok(()) => return Ok(()),
            Err(error) if error.is_definite() => return Err(Some(error)),
            Err(error) => {
                run.healthy.store(false, Ordering::Relaxed);
                run.reader_stats.reconnects.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(tenant = %run.external_id, %error, retry_in_ms = backoff.as_millis() as u64, "tenant database not ready; retrying");
                if wait_or_stop(run, backoff).await {
                    return Err(None);
                }
                backoff = (backoff * 2).min(PREPARE_BACKOFF_MAX);
            }
        }
    }
}

/// An install failure: the set-up checks (wal_level, privileges) are definite; a failed
/// statement is retried ([`INSTALL_ATTEMPTS_MAX`] times: it may have been a lost connection).
fn install_error(error: &crate::install::InstallError, failures: &mut u32) -> ReplicationError {
    let fault = match error {
        crate::install::InstallError::Database { .. } => {
            *failures += 1;
            if *failures >= INSTALL_ATTEMPTS_MAX {
                Fault::Definite
            } else {
                Fault::Transient
            }
        }
        _ => Fault::Definite,
    };
    ReplicationError { fault, detail: error.to_string(), sqlstate: None }
}

async fn tenant_main(job: StartJob, config: &FleetConfig, runs: &Runs) {
    let StartJob { run, commands, shards, payload_bytes_max, refused, installed } = job;
    let failure = match refused {
        Some(error) => Some(error),
        None => match ConnParams::parse(&run.url) {
            Err(error) => Some(ReplicationError::from_pg(&error)),
            Ok(_) if installed => None,
            Ok(_) => match prepare(&run, &commands, config).await {
                Ok(()) => None,
                Err(Some(error)) => Some(error),
                Err(None) => {
                    run.set_state(TenantState::Stopping);
                    forget(runs, &run);
                    return;
                }
            },
        },
    };
    let core = |events, failed| changes::CoreParams {
        url: run.url.clone(),
        tenant: run.tenant,
        shards: Vec::new(),
        remote: config.cluster.as_ref().map(|c| c.remote.clone()),
        payload_bytes_max,
        commands: commands.clone(),
        events,
        stats: Arc::clone(&run.core_stats),
        health: Arc::clone(&run.healthy),
        control: Arc::clone(&run.control),
        failed,
    };
    if let Some(error) = failure {
        let capacity = error.sqlstate.as_deref() == Some("53300");
        if !capacity {
            tracing::error!(tenant = %run.external_id, %error, "tenant database failed for good (its joins get the database error)");
        }
        *run.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.to_string());
        run.healthy.store(false, Ordering::Relaxed);
        run.control.failed.store(true, Ordering::Relaxed);
        run.set_state(TenantState::Failed);
        let (events_tx, events_rx) = flume::bounded(1);
        let _ = events_tx.try_send(reader::WalEvent::StreamFailed(error.clone()));
        drop(events_tx);
        let mut params = core(events_rx, Some(error));
        params.shards = shards;
        tokio::task::spawn_local(changes::run(params));
        let wait = if capacity { CAPACITY_RETRY } else { config.retry_failed_after };
        wait_or_stop(&run, wait).await;
        run.set_state(TenantState::Stopping);
        forget(runs, &run);
        drain(&commands).await;
        return;
    }
    let params = match ConnParams::parse(&run.url) {
        Ok(params) => params,
        Err(_) => return,
    };
    let (events_tx, events_rx) = flume::bounded(reader::QUEUE_EVENTS_MAX);
    let slot = SlotConfig { name: run.slot.clone(), shared: config.cluster.is_some(), ..config.slot.clone() };
    // The reader's and the core's own logs name the tenant (not in single-tenant mode).
    let span = if run.external_id.is_empty() { tracing::Span::none() } else { tracing::info_span!("tenant", id = %run.external_id) };
    let reader = match &config.cluster {
        None => tokio::task::spawn_local(reader::run(params, slot, events_tx, Arc::clone(&run.reader_stats), Arc::clone(&run.control)).instrument(span.clone())),
        Some(cluster) => tokio::task::spawn_local(lead(Arc::clone(&run), cluster.clone(), params, slot, events_tx).instrument(span.clone())),
    };
    let mut core_params = core(events_rx, None);
    core_params.shards = shards;
    tokio::task::spawn_local(changes::run(core_params).instrument(span));
    run.set_state(TenantState::Running);
    tracing::info!(tenant = %run.external_id, slot = %run.slot, "tenant database started");
    // Idle and failure checks.
    let check = config.idle_stop.map(|idle| (idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(5))).unwrap_or(Duration::from_secs(5));
    let mut last_commands = 0u64;
    let mut last_active = Instant::now();
    let mut failed_since: Option<Instant> = None;
    loop {
        if wait_or_stop(&run, check).await {
            break;
        }
        let commands_seen = run.core_stats.commands.load(Ordering::Relaxed);
        let channels = run.core_stats.channels.load(Ordering::Relaxed);
        let in_use = config.in_use.as_ref().is_some_and(|in_use| in_use(run.tenant));
        if commands_seen != last_commands || channels > 0 || in_use || !commands.is_empty() {
            last_commands = commands_seen;
            last_active = Instant::now();
        }
        if config.idle_stop.is_some_and(|idle| last_active.elapsed() >= idle) {
            tracing::info!(tenant = %run.external_id, "tenant idle: stopping its database side");
            break;
        }
        if run.control.failed.load(Ordering::Relaxed) {
            let since = *failed_since.get_or_insert_with(Instant::now);
            run.set_state(TenantState::Failed);
            if since.elapsed() >= config.retry_failed_after {
                break;
            }
        }
    }
    run.set_state(TenantState::Stopping);
    forget(runs, &run);
    run.control.stop.store(true, Ordering::Relaxed);
    if tokio::time::timeout(STOP_WAIT, reader).await.is_err() {
        tracing::warn!(tenant = %run.external_id, "the replication reader did not stop in time");
    }
    drain(&commands).await;
    tracing::info!(tenant = %run.external_id, "tenant database stopped");
}

/// The advisory lock key of a slot (FNV-1a 64 of a fixed prefix and the slot name).
fn leader_lock_key(slot: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in "powa-realtime leader ".bytes().chain(slot.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash as i64
}

/// Cluster mode: takes the tenant's leader lock (retrying every [`LEADER_RETRY`]) and streams
/// while holding it; when the lock's session dies, stops streaming, tells the core the stream
/// is down and tries again. Ends at the run's stop (the shared slot is kept).
async fn lead(run: Arc<Run>, cluster: FleetCluster, params: ConnParams, slot: SlotConfig, events: flume::Sender<reader::WalEvent>) {
    let key = leader_lock_key(&slot.name);
    loop {
        if run.stop_asked.load(Ordering::Relaxed) {
            return;
        }
        let attempt = async {
            let client = tokio::time::timeout(CONNECT_TIMEOUT, crate::sql::connect(&run.url)).await.ok()?.ok()?;
            let row = client.query_one("SELECT pg_try_advisory_lock($1)", &[&key]).await.ok()?;
            row.try_get::<_, bool>(0).ok()?.then_some(client)
        };
        let Some(client) = attempt.await else {
            if wait_or_stop(&run, LEADER_RETRY).await {
                return;
            }
            continue;
        };
        tracing::info!(tenant = %run.external_id, slot = %slot.name, "this node leads the tenant database: it runs the replication stream");
        (cluster.leadership)(run.tenant, true);
        if wait_or_stop(&run, TAKEOVER_GRACE).await {
            (cluster.leadership)(run.tenant, false);
            return;
        }
        let stream = reader::run(params.clone(), slot.clone(), events.clone(), Arc::clone(&run.reader_stats), Arc::clone(&run.control));
        let held = async {
            loop {
                tokio::time::sleep(LEADER_CHECK).await;
                let alive = tokio::time::timeout(LEADER_CHECK, client.simple_query("SELECT 1")).await;
                if !matches!(alive, Ok(Ok(_))) {
                    return;
                }
            }
        };
        tokio::select! {
            _ = stream => {
                // Stopped (the run stops) or failed for good: keep the lock until the run ends.
                (cluster.leadership)(run.tenant, false);
                return;
            }
            _ = held => {
                tracing::warn!(tenant = %run.external_id, "the leader lock's session is gone: this node stops streaming the tenant database");
            }
        }
        (cluster.leadership)(run.tenant, false);
        let _ = events.send_async(reader::WalEvent::StreamDown("this node lost the lead of the database stream".into())).await;
        if wait_or_stop(&run, LEADER_RETRY).await {
            return;
        }
    }
}

/// Lets the core answer what shards queued before the run left the map (a moment only: later
/// sends report `Disconnected` once the run's `LocalSet` is dropped).
async fn drain(commands: &flume::Receiver<Command>) {
    for _ in 0..10 {
        if commands.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_names_are_valid_distinct_and_stable() {
        let name = tenant_slot_name("powa_realtime", "acme");
        assert_eq!(name, format!("powa_realtime_acme_{:08x}", {
            let mut hash: u32 = 0x811c_9dc5;
            for byte in b"acme" {
                hash ^= u32::from(*byte);
                hash = hash.wrapping_mul(0x0100_0193);
            }
            hash
        }));
        let ids = ["acme", "ACME", "a-c.me", "a_c_me", "dev-tenant", &"x".repeat(200), &"x".repeat(201), "ünïcode", "", "1234"];
        let names: Vec<String> = ids.iter().map(|id| tenant_slot_name("powa_realtime", id)).collect();
        for name in &names {
            assert!(name.len() <= 63, "{name}");
            assert!(name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'), "{name}");
        }
        let distinct: std::collections::HashSet<&String> = names.iter().collect();
        assert_eq!(distinct.len(), names.len(), "ids that sanitise alike still differ: {names:?}");
        // A base name that is long or not a valid name is cleaned and cut too.
        let long = tenant_slot_name(&"Base-Name".repeat(10), "acme");
        assert!(long.len() <= 63 && long.starts_with("base_name"), "{long}");
        assert!(tenant_slot_name("", "acme").starts_with("powa_realtime_acme_"));
    }
}
