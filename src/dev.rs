//! `powa-realtime dev`: the private PostgreSQL cluster under `./.powa/` (CONTRACT.md `dev`).
//!
//! With no `DATABASE_URL`, [`start_database`] creates (first run) or reuses `./.powa/pgdata`,
//! starts it on the loopback port kept in `./.powa/pg_port` (chosen at first run; a new free
//! one when that port is taken), and remembers its URL for [`database_url`]. SIGINT and
//! SIGTERM drain the server first (`crate::signals`); then [`shutdown`] stops the cluster
//! (`pg_ctl stop -m fast`) and the process exits with status 0.
//!
//! Only one `dev` may own a `.powa/` directory at a time: it holds an exclusive `flock` on
//! `.powa/dev.lock` for its whole life (released by the kernel however the process ends). A
//! cluster found running while the lock is free was left behind by a killed `dev`: it is
//! stopped and started again.

use std::fs::File;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use anyhow::{bail, Context as _, Result};
use replication::cluster::{self, Cluster, ClusterError};

/// The running dev cluster, stopped by the signal thread or by [`shutdown`].
static CLUSTER: Mutex<Option<Cluster>> = Mutex::new(None);
/// The dev cluster's URL once it runs.
static DATABASE_URL: OnceLock<String> = OnceLock::new();
/// Holds the `.powa/dev.lock` flock for the life of the process.
static LOCK: OnceLock<File> = OnceLock::new();

/// The URL of the cluster `dev` started, if it started one (not when `DATABASE_URL` was set).
pub(crate) fn database_url() -> Option<String> {
    DATABASE_URL.get().cloned()
}

/// What [`start_database`] started.
pub(crate) struct DevDatabase {
    /// `postgres://postgres@127.0.0.1:<port>/postgres`.
    pub(crate) url: String,
    /// The data directory.
    pub(crate) data_dir: PathBuf,
    /// The server log.
    pub(crate) log: PathBuf,
}

/// Stops the dev cluster, if one runs. Waits for a start in progress to finish first.
pub(crate) fn shutdown() {
    let mut guard = CLUSTER.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(mut cluster) = guard.take() {
        cluster.stop();
    }
}

/// From the panic hook: stops the cluster unless its lock is held (a panic while starting or
/// stopping it; the next `dev` then restarts the cluster it finds running).
pub(crate) fn shutdown_after_panic() {
    if let Ok(mut guard) = CLUSTER.try_lock() {
        if let Some(mut cluster) = guard.take() {
            cluster.stop();
        }
    }
}

/// Creates or reuses the cluster under `dir` (normally `./.powa`) and starts it.
pub(crate) fn start_database(dir: &Path) -> Result<DevDatabase> {
    // Held while starting, so a signal arriving meanwhile stops the cluster once it is up.
    let mut slot = CLUSTER.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    lock_dir(dir)?;
    let data_dir = dir.join("pgdata");
    if !Cluster::is_initialized(&data_dir) {
        if data_dir.exists() && std::fs::read_dir(&data_dir).map(|mut d| d.next().is_some()).unwrap_or(false) {
            bail!(
                "{} exists but holds no PostgreSQL cluster (an interrupted first run?); remove it and run `powa-realtime dev` again",
                data_dir.display()
            );
        }
        eprintln!("powa-realtime: creating a PostgreSQL cluster in {} (first run)", data_dir.display());
        // The server user (`postgres` when we are root) must be able to traverse `.powa`.
        allow_traversal(dir)?;
        Cluster::init(&data_dir).map_err(explain)?;
    }
    if Cluster::is_running(&data_dir).map_err(explain)? {
        eprintln!("powa-realtime: stopping the PostgreSQL server a previous `dev` left running in {}", data_dir.display());
        Cluster::stop_data_dir(&data_dir).map_err(explain)?;
    }
    let port_file = dir.join("pg_port");
    let mut port = std::fs::read_to_string(&port_file).ok().and_then(|text| text.trim().parse::<u16>().ok()).filter(|&p| cluster::port_is_free(p));
    let mut attempts = 0;
    let cluster = loop {
        attempts += 1;
        let chosen = match port {
            Some(port) => port,
            None => {
                let fresh = cluster::free_port();
                std::fs::write(&port_file, format!("{fresh}\n")).with_context(|| format!("writing {}", port_file.display()))?;
                fresh
            }
        };
        match Cluster::start(&data_dir, chosen) {
            Ok(cluster) => break cluster,
            Err(ClusterError::PortInUse { .. }) if attempts < 5 => port = None,
            Err(error) => return Err(explain(error)),
        }
    };
    let url = cluster.url();
    let log = cluster.log_file();
    let data_dir = cluster.data_dir().to_path_buf();
    *slot = Some(cluster);
    let _ = DATABASE_URL.set(url.clone());
    Ok(DevDatabase { url, data_dir, log })
}

fn explain(error: ClusterError) -> anyhow::Error {
    anyhow::anyhow!("the embedded PostgreSQL: {error}\n(or set DATABASE_URL to use a database of your own)")
}

/// Takes the exclusive lock on `dir/dev.lock`, or fails if another `dev` holds it.
fn lock_dir(dir: &Path) -> Result<()> {
    if LOCK.get().is_some() {
        return Ok(());
    }
    let path = dir.join("dev.lock");
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!("another `powa-realtime dev` is running in this directory (it holds {}); stop it first", path.display());
    }
    let _ = LOCK.set(file);
    Ok(())
}

/// Makes `dir` traversable (not listable) by others, so the `postgres` OS user reaches the
/// data directory inside it when we run as root.
fn allow_traversal(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(());
    }
    let mode = std::fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?.permissions().mode();
    if mode & 0o001 == 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode((mode & 0o7777) | 0o001)).with_context(|| format!("chmod o+x {}", dir.display()))?;
    }
    Ok(())
}
