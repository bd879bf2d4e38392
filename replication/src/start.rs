//! Starting the Postgres side of the server: check the database, install the `realtime`
//! schema, then start the replication reader and the changes core (a [`Fleet`] of one tenant).

use std::sync::Arc;

use crate::changes::{Command, CoreStats, PgOut};
use crate::fleet::{self, Fleet, FleetConfig};
use crate::install::{self, InstallError};
use crate::pgconn::{ConnParams, PgError};
use crate::reader::{self, ReaderStats};


/// Why the server cannot start with this database.
#[derive(Debug)]
pub enum StartError {
    /// `DATABASE_URL` cannot be used.
    Config(PgError),
    /// The database cannot be reached or refused the connection.
    Connect(String),
    /// The database is not set up right, or the install failed.
    Install(InstallError),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Config(error) => write!(f, "{error}"),
            StartError::Connect(error) => write!(f, "cannot connect to DATABASE_URL: {error}"),
            StartError::Install(error) => write!(f, "{error}"),
        }
    }
}

impl std::error::Error for StartError {}

/// The running Postgres side.
pub struct Postgres {
    /// Sessions' commands.
    pub commands: flume::Sender<Command>,
    /// One inbox per shard.
    pub inboxes: Vec<flume::Receiver<PgOut>>,
    /// Reader counters.
    pub reader_stats: Arc<ReaderStats>,
    /// Core counters.
    pub core_stats: Arc<CoreStats>,
    /// True while the core's database connections are up (`/healthz`).
    pub healthy: Arc<std::sync::atomic::AtomicBool>,
    /// The reader's controls (a clean stop drops the slot: [`Postgres::stop`]).
    pub control: Arc<reader::ReaderControl>,
    /// The fleet of one tenant that runs them.
    pub fleet: Fleet,
}

impl Postgres {
    /// A clean stop: the replication stream ends and the slot is dropped, so a stopped server
    /// leaves no WAL retained. Waits at most `timeout`.
    pub fn stop(&self, timeout: std::time::Duration) {
        stop(&self.control, timeout);
    }
}

/// [`Postgres::stop`] with the reader's controls only.
pub fn stop(control: &reader::ReaderControl, timeout: std::time::Duration) {
    control.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let started = std::time::Instant::now();
    while !control.stopped.load(std::sync::atomic::Ordering::Relaxed) && started.elapsed() < timeout {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Checks and installs (blocking, before the server listens), then starts the reader and the
/// core: a [`Fleet`] of one tenant ([`engine::TenantId::SINGLE`]) on one worker thread, with the
/// slot's name as configured, no idle stop, and no retry after a definite error (it is reported
/// and `/healthz` answers 503 until the server is restarted with a fixed configuration).
/// `payload_bytes_max` is the configured payload limit, applied to broadcasts from SQL too.
pub fn start(url: &str, shards: usize, payload_bytes_max: usize, slot: reader::SlotConfig) -> Result<Postgres, StartError> {
    start_with(url, shards, payload_bytes_max, slot, None)
}

/// [`start`], in cluster mode when `cluster` is given (the node streams only while it holds
/// the database's leader lock: [`crate::fleet::FleetCluster`]).
pub fn start_with(url: &str, shards: usize, payload_bytes_max: usize, slot: reader::SlotConfig, cluster: Option<crate::fleet::FleetCluster>) -> Result<Postgres, StartError> {
    ConnParams::parse(url).map_err(StartError::Config)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async {
        let mut client = crate::sql::connect(url).await.map_err(|e| StartError::Connect(crate::sql::error_text(&e)))?;
        let applied = install::install(&mut client).await.map_err(StartError::Install)?;
        tracing::info!(migrations = applied.len(), "realtime schema installed");
        if let Err(error) = client.simple_query(install::MAINTAIN_SQL).await {
            tracing::warn!(error = %crate::sql::error_text(&error), "realtime.messages partition maintenance failed");
        }
        Ok::<(), StartError>(())
    })?;
    drop(local);
    drop(runtime);
    let mut config = FleetConfig::new(shards);
    config.workers = 1;
    config.idle_stop = None;
    config.slot = slot;
    config.slot_per_tenant = false;
    config.retry_failed_after = NEVER;
    config.cluster = cluster;
    let (fleet, inboxes) = Fleet::new(config);
    let (commands, healthy, control) = fleet::single(&fleet, url, payload_bytes_max);
    let stats = fleet.stats().into_iter().next().expect("the one tenant");
    Ok(Postgres { commands, inboxes, reader_stats: stats.reader, core_stats: stats.core, healthy, control, fleet })
}

/// "Never" for the single tenant's retry after a definite error (a century).
const NEVER: std::time::Duration = std::time::Duration::from_secs(100 * 365 * 24 * 3600);
