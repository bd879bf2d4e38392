//! The glommio drivers: executors, the shard mesh, listeners and connection tasks.
//!
//! Thin by design: every decision about what a frame means lives in the sans-IO cores
//! ([`crate::session`], [`engine::shard`]); this module reads, calls them, and writes.

mod conn;
mod control;
mod drain;
mod metrics;
mod flush;
mod outbox;
mod readiness;
mod shard;
mod status;
mod tenancy;
mod tls;

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

use glommio::channels::channel_mesh::MeshBuilder;
use glommio::{CpuSet, LocalExecutorPoolBuilder, PoolPlacement};

use engine::limits::SHARD_QUEUE_MESSAGES_MAX;
use engine::{Limits, ShardId, ShardMsg};

pub use control::Control;
pub use metrics::{series, Metrics, MetricsHook};
pub use tls::{Tls, TlsError};
pub use status::{StatusBoard, StatusHook};

/// io_uring buffer memory per executor: the minimum, so that executors start under the
/// default 8 MiB memlock limit (measured: 192 KiB pinned per executor).
const IO_MEMORY_BYTES: usize = 64 << 10;

/// Pending connections each shard's listener holds (the kernel caps it at `somaxconn`).
const LISTEN_BACKLOG: i32 = 4096;

/// Everything the shards share (read-only).
#[derive(Debug)]
pub struct ServerConfig {
    /// Listen address (every shard binds it with SO_REUSEPORT).
    pub addr: SocketAddr,
    /// Number of shards (executors).
    pub shards: usize,
    /// Limits: the per-process ones (idle timeout, delays, presence coalescing) for every
    /// tenant; each tenant's own limits live in its [`tenants::Tenant`].
    pub limits: Limits,
    /// The tenants (single-tenant mode: one, whatever the Host).
    pub tenants: Arc<tenants::Registry>,
    /// The tenants' Postgres Changes cores, when any tenant may have a database.
    pub postgres: Option<PgLink>,
    /// How long the graceful drain may take (`REALTIME_DRAIN_SECS`).
    pub drain: std::time::Duration,
    /// The drain trigger, shared with the binary's signal thread.
    pub control: Arc<Control>,
    /// More `/metrics` series (the binary's Postgres side).
    pub metrics_hooks: Vec<MetricsHook>,
    /// The tenant API; `None` answers its paths with 404 (`API_JWT_SECRET` unset).
    pub tenant_api: Option<Arc<dyn TenantApi>>,
    /// The Postgres Changes section of `GET /api/status` (the binary's).
    pub postgres_status: Option<StatusHook>,
    /// Cluster mode (`REALTIME_NATS_URL`): the queues to and from the cluster link.
    pub cluster: Option<ClusterPort>,
    /// TLS on the listener (`REALTIME_TLS_CERT`/`REALTIME_TLS_KEY`); the binary keeps a handle
    /// to reload the pair on SIGHUP.
    pub tls: Option<Arc<Tls>>,
    /// Test hook (never set in production; the binary reads it from `POWA_TEST_PANIC_SHARD`):
    /// this shard panics shortly after it starts listening, so tests can check that a dead
    /// shard takes the whole process down instead of leaving it half alive.
    pub panic_shard_for_tests: Option<usize>,
}

/// Queues between the shards and the tenants' Postgres Changes cores. Every core sends into the
/// same per-shard inboxes (bounded, `engine::changes::SHARD_INBOX_MAX`); commands go to the
/// core of the connection's tenant, found through [`Databases`].
#[derive(Debug)]
pub struct PgLink {
    /// One inbox per shard, indexed by shard id, shared by every tenant's core.
    pub inboxes: Vec<flume::Receiver<engine::changes::PgOut>>,
    /// Finds (and starts on first need) a tenant's core.
    pub databases: Arc<dyn Databases>,
}

/// The shards' end of the cluster link (the binary starts the link; net never sees NATS).
/// Broadcasts go on `data` (bounded; full → delivered on this node only, counted in
/// `queue_full_drops`); everything else on `control` (bounded; full → the shard's own overflow,
/// never dropped). Each shard reads its `inboxes` entry.
pub struct ClusterPort {
    /// This node's incarnation (the high half of its presence replicas' ids).
    pub node: u32,
    /// Broadcasts for other nodes.
    pub data: flume::Sender<engine::cluster::ToLink>,
    /// Interest, presence and snapshot answers.
    pub control: flume::Sender<engine::cluster::ToLink>,
    /// One inbox per shard, indexed by shard id.
    pub inboxes: Vec<flume::Receiver<engine::cluster::FromLink>>,
    /// Whether the link is connected to NATS (`/healthz` says `ok degraded` when not).
    pub connected: Box<dyn Fn() -> bool + Send + Sync>,
    /// Broadcasts that found the link's queue full.
    pub queue_full_drops: Arc<std::sync::atomic::AtomicU64>,
    /// The cluster section of `GET /api/status`.
    pub status: Option<StatusHook>,
}

impl std::fmt::Debug for ClusterPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterPort").field("node", &self.node).finish_non_exhaustive()
    }
}

/// A tenant's Postgres Changes core as the shards see it.
#[derive(Debug, Clone)]
pub struct DbHandle {
    /// Sessions' commands to the core (bounded: `engine::changes::COMMANDS_MAX`). When the core
    /// stopped (idle, or its tenant changed), sends fail as disconnected and the shard asks
    /// [`Databases::handle`] again.
    pub commands: flume::Sender<engine::changes::Command>,
    /// Whether the core's database connections are up.
    pub healthy: Arc<std::sync::atomic::AtomicBool>,
}

/// Where shards find the core of a tenant that has a database. The binary implements it over
/// `replication` (net never sees the database side's types). Called on a shard thread: it must
/// not block (a start is only scheduled; the core reports failures through its answers).
pub trait Databases: Send + Sync + std::fmt::Debug {
    /// The core of `tenant`, whose database is `url`, started on first need.
    fn handle(&self, tenant: engine::TenantId, url: &str) -> DbHandle;

    /// The tenant directory changed (called by shard 0, once per change): stop at once what
    /// belongs to tenants that are gone (their replication slots are dropped).
    fn directory_changed(&self, _directory: &tenants::Directory) {}
}

/// The tenant API (`/api/tenants...`, CONTRACT.md): the binary answers it (the tenants file
/// read-only, or the control database). The answer comes on the returned channel; the
/// connection waits for it with a bound.
pub trait TenantApi: Send + Sync + std::fmt::Debug {
    /// Answers `request` (authorization included).
    fn call(&self, request: tenants::api::ApiRequest) -> flume::Receiver<tenants::api::ApiResponse>;
}

/// Start-up failures.
#[derive(Debug)]
pub enum ServerError {
    /// The address is already served (possibly by another powa-realtime: SO_REUSEPORT would
    /// otherwise silently share the port with it).
    AddressInUse(SocketAddr, std::io::Error),
    /// Executors could not start.
    Runtime(String),
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServerError::AddressInUse(addr, error) => write!(f, "cannot listen on {addr}: {error} (is another server running on this port?)"),
            ServerError::Runtime(error) => write!(f, "cannot start the shards: {error}"),
        }
    }
}

impl std::error::Error for ServerError {}

/// Runs the server until the process ends.
pub fn run(config: ServerConfig) -> Result<(), ServerError> {
    assert!(config.shards >= 1);
    // The shards' listeners use SO_REUSEPORT, which would let a second server share the port
    // silently. A bind without it first fails if anything listens there already; with
    // SO_REUSEADDR it ignores the previous process's connections (TIME_WAIT or draining).
    probe(config.addr).map_err(|e| ServerError::AddressInUse(config.addr, e))?;

    let shards = config.shards;
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::new(shards));
    let status = Arc::new(StatusBoard::new(shards));
    let mesh = MeshBuilder::<ShardMsg, _>::full(shards, SHARD_QUEUE_MESSAGES_MAX);
    // Only the CPUs this process may run on (`taskset`, cgroups): glommio's `online()` lists all.
    let allowed = allowed_cpus();
    let cpus = CpuSet::online().ok().map(|set| set.filter(|location| allowed.as_ref().is_none_or(|a| a.contains(&location.cpu))));
    let cores = cpus.as_ref().map_or(1, |c| c.len());
    let placement = if shards <= cores { PoolPlacement::MaxSpread(shards, cpus) } else { PoolPlacement::Unbound(shards) };
    let handles = LocalExecutorPoolBuilder::new(placement)
        .io_memory(IO_MEMORY_BYTES)
        .name("shard")
        .on_all_shards(move || async move { shard_main(config, mesh, metrics, status).await })
        .map_err(|e| ServerError::Runtime(e.to_string()))?;
    for result in handles.join_all() {
        match result {
            Ok(Ok(())) => {}
            Ok(Err(error)) => return Err(ServerError::Runtime(error)),
            Err(error) => return Err(ServerError::Runtime(error.to_string())),
        }
    }
    Ok(())
}

fn socket_for(addr: SocketAddr) -> std::io::Result<socket2::Socket> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    Ok(socket)
}

/// Binds `addr` with SO_REUSEADDR only: fails while any socket listens there, succeeds over
/// connections left by a previous process.
fn probe(addr: SocketAddr) -> std::io::Result<()> {
    socket_for(addr)?.bind(&addr.into())
}

/// A shard's listening socket: SO_REUSEADDR (a restart binds at once, whatever connections the
/// previous process left) and SO_REUSEPORT (every shard listens on the same port).
fn listen(addr: SocketAddr) -> std::io::Result<Listener> {
    use std::os::fd::{FromRawFd as _, IntoRawFd as _};
    let socket = socket_for(addr)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    let fd = socket.into_raw_fd();
    // SAFETY: the descriptor is a bound, listening TCP socket whose ownership moves here.
    Ok(Listener { listener: unsafe { glommio::net::TcpListener::from_raw_fd(fd) }, fd })
}

/// A shard's listener and its descriptor (glommio's type does not expose it).
struct Listener {
    listener: glommio::net::TcpListener,
    fd: std::os::fd::RawFd,
}

/// Stops accepting on `listener` (a pending accept fails); idempotent.
fn stop_listening(listener: &Listener) {
    // SAFETY: the descriptor belongs to `listener.listener`, alive for the duration of the call.
    unsafe { libc::shutdown(listener.fd, libc::SHUT_RDWR) };
}

/// The CPUs in the process's affinity mask, if it can be read.
fn allowed_cpus() -> Option<Vec<usize>> {
    // SAFETY: `set` is a plain bit set owned by this frame; the call writes at most its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return None;
        }
        Some((0..libc::CPU_SETSIZE as usize).filter(|cpu| libc::CPU_ISSET(*cpu, &set)).collect())
    }
}

async fn shard_main(
    config: Arc<ServerConfig>,
    mesh: MeshBuilder<ShardMsg, glommio::channels::channel_mesh::Full>,
    metrics: Arc<Metrics>,
    status: Arc<StatusBoard>,
) -> Result<(), String> {
    let (senders, mut receivers) = mesh.join().await.map_err(|e| format!("shard mesh join failed: {e}"))?;
    let id = ShardId(senders.peer_id() as u16);
    let listener = listen(config.addr).map_err(|e| format!("bind {}: {e}", config.addr))?;
    shard::POSTGRES_LINKED.with(|linked| linked.set(config.postgres.is_some()));
    let shard = Rc::new(shard::Shard::new(id, Arc::clone(&config), senders, metrics, status));
    for (_, receiver) in receivers.streams() {
        glommio::spawn_local(Rc::clone(&shard).receive(receiver)).detach();
    }
    readiness::start(&shard).map_err(|e| format!("shard {} epoll set: {e}", id.0))?;
    glommio::spawn_local(Rc::clone(&shard).flusher()).detach();
    glommio::spawn_local(Rc::clone(&shard).expire_tokens()).detach();
    glommio::spawn_local(Rc::clone(&shard).rate_ticks()).detach();
    glommio::spawn_local(Rc::clone(&shard).sample_gauges()).detach();
    glommio::spawn_local(Rc::clone(&shard).status_ticks()).detach();
    if let Some(link) = &config.postgres {
        let inbox = link.inboxes[id.index()].clone();
        glommio::spawn_local(Rc::clone(&shard).postgres_inbox(inbox)).detach();
    }
    if let Some(port) = &config.cluster {
        let inbox = port.inboxes[id.index()].clone();
        glommio::spawn_local(Rc::clone(&shard).cluster_inbox(inbox)).detach();
    }
    // A drain shuts the listener down, which ends a pending accept with an error. The task
    // holds the listener, so its descriptor stays ours until the shutdown is done.
    let listener = Rc::new(listener);
    let control = Arc::clone(&config.control);
    let held = Rc::clone(&listener);
    glommio::spawn_local(async move {
        control.drain_started().await;
        stop_listening(&held);
    })
    .detach();
    tracing::info!(shard = id.0, addr = %config.addr, "shard listening");
    if config.panic_shard_for_tests == Some(id.index()) {
        glommio::spawn_local(async move {
            glommio::timer::sleep(std::time::Duration::from_millis(500)).await;
            panic!("test hook: shard {} panics on purpose (POWA_TEST_PANIC_SHARD)", id.0);
        })
        .detach();
    }
    while !config.control.is_draining() {
        match listener.listener.accept().await {
            Ok(stream) => {
                glommio::spawn_local(conn::serve(Rc::clone(&shard), stream)).detach();
            }
            Err(_) if config.control.is_draining() => break,
            Err(error) => {
                // Typically EMFILE: back off briefly instead of spinning.
                tracing::warn!(shard = id.0, %error, "accept failed");
                glommio::timer::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
    // Closing the listener resets connections still in its backlog: they retry elsewhere.
    stop_listening(&listener);
    drop(listener);
    shard.drain().await;
    Ok(())
}
