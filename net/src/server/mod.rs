//! The glommio drivers: executors, the shard mesh, listeners and connection tasks.
//!
//! Thin by design: every decision about what a frame means lives in the sans-IO cores
//! ([`crate::session`], [`engine::shard`]); this module reads, calls them, and writes.

mod conn;
mod metrics;
mod outbox;
mod shard;

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

use glommio::channels::channel_mesh::MeshBuilder;
use glommio::{CpuSet, LocalExecutorPoolBuilder, PoolPlacement};

use auth::KeyStore;
use engine::limits::SHARD_QUEUE_MESSAGES_MAX;
use engine::{Limits, ShardId, ShardMsg};

pub use metrics::Metrics;

/// io_uring buffer memory per executor: the minimum, so that executors start under the
/// default 8 MiB memlock limit (measured: 192 KiB pinned per executor).
const IO_MEMORY_BYTES: usize = 64 << 10;

/// Everything the shards share (read-only).
#[derive(Debug)]
pub struct ServerConfig {
    /// Listen address (every shard binds it with SO_REUSEPORT).
    pub addr: SocketAddr,
    /// Number of shards (executors).
    pub shards: usize,
    /// Limits.
    pub limits: Limits,
    /// JWT key material.
    pub keys: KeyStore,
    /// Whether a project database is configured.
    pub database: bool,
    /// The Postgres Changes core, when a database is configured.
    pub postgres: Option<PgLink>,
}

/// Queues between the shards and the Postgres Changes core (both bounded: commands
/// `engine::changes::COMMANDS_MAX`, each inbox `SHARD_INBOX_MAX`).
#[derive(Debug)]
pub struct PgLink {
    /// Sessions' commands to the core.
    pub commands: flume::Sender<engine::changes::Command>,
    /// One inbox per shard, indexed by shard id.
    pub inboxes: Vec<flume::Receiver<engine::changes::PgOut>>,
    /// Whether the database connection is up (`/healthz` answers 503 otherwise).
    pub healthy: std::sync::Arc<std::sync::atomic::AtomicBool>,
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
    // glommio binds with SO_REUSEPORT, which would let a second server share the port
    // silently. A plain bind first fails if anything listens there already.
    let probe = std::net::TcpListener::bind(config.addr).map_err(|e| ServerError::AddressInUse(config.addr, e))?;
    drop(probe);

    let shards = config.shards;
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::new(shards));
    let mesh = MeshBuilder::<ShardMsg, _>::full(shards, SHARD_QUEUE_MESSAGES_MAX);
    // Only the CPUs this process may run on (`taskset`, cgroups): glommio's `online()` lists all.
    let allowed = allowed_cpus();
    let cpus = CpuSet::online().ok().map(|set| set.filter(|location| allowed.as_ref().is_none_or(|a| a.contains(&location.cpu))));
    let cores = cpus.as_ref().map_or(1, |c| c.len());
    let placement = if shards <= cores { PoolPlacement::MaxSpread(shards, cpus) } else { PoolPlacement::Unbound(shards) };
    let handles = LocalExecutorPoolBuilder::new(placement)
        .io_memory(IO_MEMORY_BYTES)
        .name("shard")
        .on_all_shards(move || async move { shard_main(config, mesh, metrics).await })
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

async fn shard_main(config: Arc<ServerConfig>, mesh: MeshBuilder<ShardMsg, glommio::channels::channel_mesh::Full>, metrics: Arc<Metrics>) -> Result<(), String> {
    let (senders, mut receivers) = mesh.join().await.map_err(|e| format!("shard mesh join failed: {e}"))?;
    let id = ShardId(senders.peer_id() as u16);
    let listener = glommio::net::TcpListener::bind(config.addr).map_err(|e| format!("bind {}: {e}", config.addr))?;
    let shard = Rc::new(shard::Shard::new(id, Arc::clone(&config), senders, metrics));
    for (_, receiver) in receivers.streams() {
        glommio::spawn_local(Rc::clone(&shard).receive(receiver)).detach();
    }
    glommio::spawn_local(Rc::clone(&shard).expire_tokens()).detach();
    glommio::spawn_local(Rc::clone(&shard).rate_ticks()).detach();
    if let Some(link) = &config.postgres {
        let inbox = link.inboxes[id.index()].clone();
        glommio::spawn_local(Rc::clone(&shard).postgres_inbox(inbox)).detach();
    }
    tracing::info!(shard = id.0, addr = %config.addr, "shard listening");
    loop {
        match listener.accept().await {
            Ok(stream) => {
                glommio::spawn_local(conn::serve(Rc::clone(&shard), stream)).detach();
            }
            Err(error) => {
                // Typically EMFILE: back off briefly instead of spinning.
                tracing::warn!(shard = id.0, %error, "accept failed");
                glommio::timer::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}
