//! Starting the Postgres side of the server: check the database, install the `realtime`
//! schema, then start the replication reader and the changes core.

use std::sync::Arc;

use crate::changes::{self, Command, CoreStats, PgOut};
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

/// Checks and installs (blocking, before the server listens), then starts the threads.
/// `payload_bytes_max` is the configured payload limit, applied to broadcasts from SQL too.
pub fn start(url: &str, shards: usize, payload_bytes_max: usize, slot: reader::SlotConfig) -> Result<Postgres, StartError> {
    let params = ConnParams::parse(url).map_err(StartError::Config)?;
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
    let (events_tx, events_rx) = flume::bounded(reader::QUEUE_EVENTS_MAX);
    let reader_stats = Arc::new(ReaderStats::default());
    let control = Arc::new(reader::ReaderControl::default());
    reader::spawn(params, slot, events_tx, Arc::clone(&reader_stats), Arc::clone(&control));
    let healthy = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let core = changes::spawn(url.to_string(), shards, payload_bytes_max, events_rx, Arc::clone(&healthy), Arc::clone(&control));
    Ok(Postgres { commands: core.commands, inboxes: core.shard_inboxes, reader_stats, core_stats: core.stats, healthy, control })
}
