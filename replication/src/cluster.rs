//! A local PostgreSQL cluster run from the machine's server binaries (`initdb`, `pg_ctl`,
//! `postgres`): the private database of `powa-realtime dev`, and the real database of the tests.
//!
//! - [`Cluster::bin_dir`] finds the binaries: the directory of `initdb` on `PATH` (symlinks
//!   followed), else `/usr/lib/postgresql/<version>/bin`, newest version first.
//! - [`Cluster::init`] runs `initdb` (trust authentication, superuser `postgres`, UTF8, locale C)
//!   and configures logical replication on loopback only.
//! - [`Cluster::start`] / [`Cluster::stop`] wrap `pg_ctl` (`-w`, fast shutdown); dropping a
//!   running [`Cluster`] stops it.
//!
//! PostgreSQL refuses to run as root: when the effective user is root, every server binary runs
//! as the `postgres` OS user through `runuser`, and the data directory is handed to that user.
//! Every command runs in its own process group, so a terminal's Ctrl-C reaches only the calling
//! process, which decides how to stop the cluster.

use std::ffi::CString;
use std::fmt;
use std::io::Write as _;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Longest unix socket path the kernel accepts (`sun_path` is 108 bytes with its NUL).
const UNIX_SOCKET_PATH_MAX: usize = 107;
/// How long `pg_ctl` waits for start-up and shutdown, in seconds.
const PG_CTL_TIMEOUT_SECS: &str = "60";
/// The fix printed whenever the server binaries are missing.
const INSTALL_HINT: &str = "install the PostgreSQL 15 server package, e.g. apt-get install postgresql-15";

/// Why a cluster operation failed. Every message says what to do about it.
#[derive(Debug)]
pub enum ClusterError {
    /// `initdb`/`pg_ctl` are not on `PATH` nor under `/usr/lib/postgresql/*/bin`.
    BinariesNotFound {
        /// The places that were searched.
        searched: Vec<PathBuf>,
    },
    /// `psql` was found neither next to the server binaries nor on `PATH`.
    PsqlNotFound,
    /// Running as root, but there is no `postgres` OS user to run the server as.
    NoPostgresUser,
    /// The `postgres` OS user cannot reach the data directory (a parent directory is closed).
    NotAccessible {
        /// The data directory.
        path: PathBuf,
    },
    /// `start` was given a directory that `init` never prepared.
    NotInitialized {
        /// The data directory.
        path: PathBuf,
    },
    /// Another server already listens on the port.
    PortInUse {
        /// The port.
        port: u16,
    },
    /// A file-system or process-spawning error.
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
    /// A PostgreSQL program ran and failed.
    Command {
        /// What was being done.
        what: String,
        /// Its output (stderr and stdout), plus the tail of the server log where relevant.
        output: String,
        /// What to do about it, when known.
        hint: Option<String>,
    },
    /// `psql` ran the SQL and PostgreSQL reported an error.
    Sql {
        /// The error text psql printed.
        error: String,
    },
}

impl fmt::Display for ClusterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClusterError::BinariesNotFound { searched } => {
                let places: Vec<String> = searched.iter().map(|p| p.display().to_string()).collect();
                write!(f, "the PostgreSQL server binaries (initdb, pg_ctl, postgres) were not found (searched PATH and {}); {INSTALL_HINT}", places.join(", "))
            }
            ClusterError::PsqlNotFound => write!(f, "psql was not found next to the server binaries nor on PATH; install the PostgreSQL client, e.g. apt-get install postgresql-client-15"),
            ClusterError::NoPostgresUser => write!(f, "running as root, but there is no `postgres` OS user to run PostgreSQL as (it refuses to run as root); {INSTALL_HINT} (it creates that user), or run as an ordinary user"),
            ClusterError::NotAccessible { path } => write!(
                f,
                "the `postgres` OS user cannot use {} (PostgreSQL refuses to run as root, so it runs as `postgres`); make every parent directory traversable (chmod o+x) or work in a directory under /tmp",
                path.display()
            ),
            ClusterError::NotInitialized { path } => write!(f, "{} is not a PostgreSQL data directory; create it with Cluster::init first", path.display()),
            ClusterError::PortInUse { port } => write!(f, "port {port} is already in use on 127.0.0.1; pick another port"),
            ClusterError::Io { context, source } => write!(f, "{context}: {source}"),
            ClusterError::Command { what, output, hint } => {
                write!(f, "{what} failed")?;
                if let Some(hint) = hint {
                    write!(f, "; {hint}")?;
                }
                let output = output.trim();
                if !output.is_empty() {
                    write!(f, "\n{output}")?;
                }
                Ok(())
            }
            ClusterError::Sql { error } => write!(f, "SQL error: {}", error.trim()),
        }
    }
}

impl std::error::Error for ClusterError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClusterError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

fn io_error(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ClusterError {
    let context = context.into();
    move |source| ClusterError::Io { context, source }
}

/// Options for [`Cluster::init_with`].
#[derive(Clone, Debug)]
pub struct InitOptions {
    /// `false` writes `fsync = off` (and skips initdb's own syncing): much faster, and a crash
    /// of the machine may corrupt the cluster. For tests only.
    pub fsync: bool,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions { fsync: true }
    }
}

/// A running local PostgreSQL cluster. Dropping it stops the server.
pub struct Cluster {
    bin: PathBuf,
    data_dir: PathBuf,
    port: u16,
    running: bool,
    /// Keeps a throwaway cluster's directory alive until the server has stopped.
    _temp: Option<Arc<TempDirInner>>,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster").field("data_dir", &self.data_dir).field("port", &self.port).field("running", &self.running).finish()
    }
}

impl Cluster {
    /// The directory holding `initdb`, `pg_ctl` and `postgres`: `initdb`'s directory on `PATH`
    /// (symlinks followed), else the newest `/usr/lib/postgresql/<version>/bin`.
    pub fn bin_dir() -> Result<PathBuf, ClusterError> {
        let mut searched = Vec::new();
        let complete = |dir: &Path| ["initdb", "pg_ctl", "postgres"].iter().all(|name| is_executable(&dir.join(name)));
        if let Some(path) = std::env::var_os("PATH") {
            for dir in std::env::split_paths(&path) {
                let initdb = dir.join("initdb");
                if !is_executable(&initdb) {
                    continue;
                }
                // Follow symlinks (e.g. /usr/local/bin/initdb -> /usr/lib/postgresql/15/bin/initdb).
                let real = std::fs::canonicalize(&initdb).unwrap_or(initdb);
                if let Some(real_dir) = real.parent() {
                    if complete(real_dir) {
                        return Ok(real_dir.to_path_buf());
                    }
                }
                if complete(&dir) {
                    return Ok(dir);
                }
            }
        }
        let root = Path::new("/usr/lib/postgresql");
        searched.push(root.join("*/bin"));
        let mut versions: Vec<(Vec<u64>, PathBuf)> = std::fs::read_dir(root)
            .map(|entries| {
                entries
                    .filter_map(|entry| entry.ok())
                    .filter_map(|entry| {
                        let name = entry.file_name().to_string_lossy().into_owned();
                        let key: Option<Vec<u64>> = name.split('.').map(|part| part.parse().ok()).collect();
                        key.map(|key| (key, entry.path().join("bin")))
                    })
                    .collect()
            })
            .unwrap_or_default();
        versions.sort_by(|a, b| b.0.cmp(&a.0));
        for (_, dir) in versions {
            if complete(&dir) {
                return Ok(dir);
            }
        }
        Err(ClusterError::BinariesNotFound { searched })
    }

    /// Creates a cluster in `data_dir` (created if missing; must be empty) with durable writes.
    pub fn init(data_dir: &Path) -> Result<(), ClusterError> {
        Cluster::init_with(data_dir, &InitOptions::default())
    }

    /// Creates a cluster in `data_dir`: `initdb -A trust -U postgres -E UTF8 --locale=C`, then
    /// `wal_level = logical`, 20 WAL senders and slots, listening on 127.0.0.1 only, its unix
    /// socket in the data directory (or /tmp when that path would be too long), and a
    /// `host replication all 127.0.0.1/32 trust` line in `pg_hba.conf`.
    pub fn init_with(data_dir: &Path, options: &InitOptions) -> Result<(), ClusterError> {
        let bin = Cluster::bin_dir()?;
        let owner = server_owner()?;
        std::fs::create_dir_all(data_dir).map_err(io_error(format!("creating {}", data_dir.display())))?;
        let data_dir = absolute(data_dir)?;
        prepare_dir(&data_dir, owner)?;
        let mut initdb = pg_command(&bin.join("initdb"));
        initdb.arg("-D").arg(&data_dir).args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C"]);
        if !options.fsync {
            initdb.arg("--no-sync");
        }
        run(&mut initdb, &format!("initdb for {}", data_dir.display()), None)?;

        let socket_dir = if data_dir.as_os_str().len() + "/.s.PGSQL.65535".len() <= UNIX_SOCKET_PATH_MAX {
            data_dir.display().to_string()
        } else {
            "/tmp".to_string()
        };
        let mut conf = String::from("\n# Added by powa-realtime: logical replication on loopback only.\n");
        conf.push_str("wal_level = logical\n");
        conf.push_str("max_wal_senders = 20\n");
        conf.push_str("max_replication_slots = 20\n");
        conf.push_str("listen_addresses = '127.0.0.1'\n");
        conf.push_str(&format!("unix_socket_directories = '{}'\n", socket_dir.replace('\'', "''")));
        if !options.fsync {
            conf.push_str("# Tests only: a machine crash may corrupt this cluster.\n");
            // synchronous_commit stays on: with it off, WAL reaches the walsender only at the WAL
            // writer's 200 ms tick, which would distort every latency measured against it.
            conf.push_str("fsync = off\nfull_page_writes = off\n");
        }
        append(&data_dir.join("postgresql.conf"), &conf)?;

        let hba_path = data_dir.join("pg_hba.conf");
        let hba = std::fs::read_to_string(&hba_path).map_err(io_error(format!("reading {}", hba_path.display())))?;
        let line = "host    replication     all             127.0.0.1/32            trust";
        let present = hba.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == line.split_whitespace().collect::<Vec<_>>());
        if !present {
            append(&hba_path, &format!("\n# Added by powa-realtime.\n{line}\n"))?;
        }
        Ok(())
    }

    /// Whether `data_dir` holds an initialized cluster.
    pub fn is_initialized(data_dir: &Path) -> bool {
        data_dir.join("PG_VERSION").is_file()
    }

    /// Whether a server is running on `data_dir` (`pg_ctl status`).
    pub fn is_running(data_dir: &Path) -> Result<bool, ClusterError> {
        let bin = Cluster::bin_dir()?;
        let data_dir = absolute(data_dir)?;
        let output = pg_command(&bin.join("pg_ctl")).arg("status").arg("-D").arg(&data_dir).output().map_err(io_error("running pg_ctl status"))?;
        Ok(output.status.success())
    }

    /// Stops whatever server runs on `data_dir` (fast shutdown). Used to clean up a server left
    /// behind by a process that was killed. A no-op when none runs.
    pub fn stop_data_dir(data_dir: &Path) -> Result<(), ClusterError> {
        if !Cluster::is_running(data_dir)? {
            return Ok(());
        }
        let bin = Cluster::bin_dir()?;
        let data_dir = absolute(data_dir)?;
        let mut stop = pg_command(&bin.join("pg_ctl"));
        stop.arg("stop").arg("-D").arg(&data_dir).args(["-m", "fast", "-w", "-t", PG_CTL_TIMEOUT_SECS]);
        run(&mut stop, &format!("pg_ctl stop for {}", data_dir.display()), None).map(|_| ())
    }

    /// Starts the cluster in `data_dir` on `127.0.0.1:<port>` and waits until it accepts
    /// connections. The server log goes to `postgres.log` next to the data directory.
    pub fn start(data_dir: &Path, port: u16) -> Result<Cluster, ClusterError> {
        let bin = Cluster::bin_dir()?;
        let owner = server_owner()?;
        let data_dir = absolute(data_dir)?;
        if !Cluster::is_initialized(&data_dir) {
            return Err(ClusterError::NotInitialized { path: data_dir });
        }
        if TcpListener::bind(("127.0.0.1", port)).is_err() {
            return Err(ClusterError::PortInUse { port });
        }
        let log = log_path(&data_dir);
        if let Some(owner) = owner {
            // pg_ctl opens the log as the server's user.
            if !log.exists() {
                std::fs::write(&log, b"").map_err(io_error(format!("creating {}", log.display())))?;
            }
            chown(&log, owner)?;
        }
        let mut start = pg_command(&bin.join("pg_ctl"));
        start
            .arg("start")
            .arg("-D")
            .arg(&data_dir)
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", PG_CTL_TIMEOUT_SECS])
            .arg("-o")
            .arg(format!("-p {port}"));
        let log_offset = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        if let Err(error) = run(&mut start, &format!("pg_ctl start for {}", data_dir.display()), Some(&log)) {
            let new_log = read_from(&log, log_offset);
            // A half-started server must not outlive the failure.
            let _ = Cluster::stop_data_dir(&data_dir);
            if new_log.contains("could not bind") || new_log.contains("Address already in use") {
                return Err(ClusterError::PortInUse { port });
            }
            return Err(error);
        }
        Ok(Cluster { bin, data_dir, port, running: true, _temp: None })
    }

    /// Stops the server (`pg_ctl stop -m fast -w`). Idempotent; failures are printed to stderr.
    pub fn stop(&mut self) {
        if !self.running {
            return;
        }
        self.running = false;
        let mut stop = pg_command(&self.bin.join("pg_ctl"));
        stop.arg("stop").arg("-D").arg(&self.data_dir).args(["-m", "fast", "-w", "-t", PG_CTL_TIMEOUT_SECS]);
        if let Err(error) = run(&mut stop, &format!("pg_ctl stop for {}", self.data_dir.display()), None) {
            eprintln!("powa-realtime: {error}");
        }
    }

    /// The connection URL: `postgres://postgres@127.0.0.1:<port>/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The (absolute) data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server log file.
    pub fn log_file(&self) -> PathBuf {
        log_path(&self.data_dir)
    }

    /// Runs `sql` with `psql -X -q -v ON_ERROR_STOP=1 -At` as the `postgres` superuser on database
    /// `postgres`, and returns what it printed. Several statements separated by `;` are sent as
    /// one query string (one implicit transaction unless the text has its own `BEGIN`/`COMMIT`).
    pub fn psql(&self, sql: &str) -> Result<String, ClusterError> {
        self.psql_as("postgres", sql)
    }

    /// [`Cluster::psql`] as another (login) role.
    pub fn psql_as(&self, user: &str, sql: &str) -> Result<String, ClusterError> {
        self.psql_output(user, sql).map(|(stdout, _)| stdout)
    }

    /// [`Cluster::psql`] as `user`, returning stdout and stderr (notices and warnings).
    pub fn psql_output(&self, user: &str, sql: &str) -> Result<(String, String), ClusterError> {
        let psql = psql_path(&self.bin)?;
        let mut command = Command::new(psql);
        command
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-At", "-h", "127.0.0.1"])
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-U")
            .arg(user)
            .args(["-d", "postgres", "-c"])
            .arg(sql)
            .stdin(Stdio::null())
            .process_group(0);
        for name in ["PGSERVICE", "PGOPTIONS", "PGPASSWORD", "PGSSLMODE", "PGAPPNAME", "PGTZ", "PGCLIENTENCODING"] {
            command.env_remove(name);
        }
        let output = command.output().map_err(io_error("running psql"))?;
        let stdout = String::from_utf8_lossy(&output.stdout).trim_end().to_string();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        if !output.status.success() {
            return Err(ClusterError::Sql { error: stderr });
        }
        Ok((stdout, stderr))
    }

    /// A fresh cluster for tests: a new directory under /tmp, `fsync = off`, a free port. The
    /// server stops and the directory is removed when both the cluster and the guard are gone.
    pub fn throwaway() -> Result<(Cluster, TempDirGuard), ClusterError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let root = PathBuf::from(format!("/tmp/powa-pg-{}-{n}-{nanos:x}", std::process::id()));
        std::fs::create_dir_all(&root).map_err(io_error(format!("creating {}", root.display())))?;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).map_err(io_error(format!("chmod {}", root.display())))?;
        let inner = Arc::new(TempDirInner { path: root.clone() });
        let guard = TempDirGuard { inner: Arc::clone(&inner) };
        let data_dir = root.join("data");
        Cluster::init_with(&data_dir, &InitOptions { fsync: false })?;
        let mut attempts = 0;
        let mut cluster = loop {
            attempts += 1;
            match Cluster::start(&data_dir, free_port()) {
                Ok(cluster) => break cluster,
                // The free port was taken between choosing and binding: choose again.
                Err(ClusterError::PortInUse { .. }) if attempts < 5 => continue,
                Err(error) => return Err(error),
            }
        };
        cluster._temp = Some(inner);
        Ok((cluster, guard))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Removes a throwaway cluster's directory once it and its [`Cluster`] are both dropped.
#[derive(Debug)]
pub struct TempDirGuard {
    inner: Arc<TempDirInner>,
}

impl TempDirGuard {
    /// The directory (it holds `data/` and `postgres.log`).
    pub fn path(&self) -> &Path {
        &self.inner.path
    }
}

#[derive(Debug)]
struct TempDirInner {
    path: PathBuf,
}

impl Drop for TempDirInner {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A loopback TCP port that was free a moment ago (the OS picks it).
pub fn free_port() -> u16 {
    TcpListener::bind(("127.0.0.1", 0)).and_then(|listener| listener.local_addr()).map(|addr| addr.port()).unwrap_or(0)
}

/// Whether `port` can be bound on 127.0.0.1 right now.
pub fn port_is_free(port: u16) -> bool {
    port != 0 && TcpListener::bind(("127.0.0.1", port)).is_ok()
}

fn log_path(data_dir: &Path) -> PathBuf {
    match data_dir.parent() {
        Some(parent) => parent.join("postgres.log"),
        None => data_dir.join("postgres.log"),
    }
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

fn absolute(path: &Path) -> Result<PathBuf, ClusterError> {
    if path.exists() {
        return std::fs::canonicalize(path).map_err(io_error(format!("resolving {}", path.display())));
    }
    std::path::absolute(path).map_err(io_error(format!("resolving {}", path.display())))
}

fn psql_path(bin: &Path) -> Result<PathBuf, ClusterError> {
    let beside = bin.join("psql");
    if is_executable(&beside) {
        return Ok(beside);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("psql");
            if is_executable(&candidate) {
                return Ok(candidate);
            }
        }
    }
    Err(ClusterError::PsqlNotFound)
}

/// The uid/gid server binaries must run as: `Some(postgres)` when we are root, else `None`
/// (they run as ourselves).
fn server_owner() -> Result<Option<(u32, u32)>, ClusterError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    lookup_user("postgres").map(Some).ok_or(ClusterError::NoPostgresUser)
}

fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let name = CString::new(name).ok()?;
    let mut buffer = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: passwd is plain data; getpwnam_r writes into `pwd` and `buffer`, both owned here
    // and large enough (it reports ERANGE otherwise), and sets `result` to &pwd or null.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwnam_r(name.as_ptr(), &mut pwd, buffer.as_mut_ptr(), buffer.len(), &mut result);
        if rc != 0 || result.is_null() {
            return None;
        }
        Some((pwd.pw_uid, pwd.pw_gid))
    }
}

fn chown(path: &Path, (uid, gid): (u32, u32)) -> Result<(), ClusterError> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(io_error(format!("chown {} to postgres", path.display())))
}

/// Makes `data_dir` private to the server's user and checks that user can reach it.
fn prepare_dir(data_dir: &Path, owner: Option<(u32, u32)>) -> Result<(), ClusterError> {
    if let Some(owner) = owner {
        chown(data_dir, owner)?;
    }
    std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700)).map_err(io_error(format!("chmod 700 {}", data_dir.display())))?;
    if owner.is_some() {
        let reachable = runuser().arg("test").arg("-w").arg(data_dir).stdout(Stdio::null()).stderr(Stdio::null()).status().map(|s| s.success()).unwrap_or(false);
        if !reachable {
            return Err(ClusterError::NotAccessible { path: data_dir.to_path_buf() });
        }
    }
    Ok(())
}

fn runuser() -> Command {
    let program = ["/usr/sbin/runuser", "/sbin/runuser", "/usr/bin/runuser", "/bin/runuser"].into_iter().find(|p| Path::new(p).exists()).unwrap_or("runuser");
    let mut command = Command::new(program);
    command.args(["-u", "postgres", "--"]).current_dir("/").process_group(0);
    command
}

/// A command for a server binary: as the `postgres` OS user when root, from `/`, in its own
/// process group, without PG* variables that could point it elsewhere.
fn pg_command(program: &Path) -> Command {
    // SAFETY: geteuid has no preconditions.
    let mut command = if unsafe { libc::geteuid() } == 0 {
        let mut command = runuser();
        command.arg(program);
        command
    } else {
        let mut command = Command::new(program);
        command.current_dir("/").process_group(0);
        command
    };
    for name in ["PGDATA", "PGPORT", "PGHOST", "PGUSER", "PGDATABASE", "PGOPTIONS", "PGSERVICE"] {
        command.env_remove(name);
    }
    command.stdin(Stdio::null());
    command
}

/// Runs a command to completion; a failure carries its output (and the tail of `log`).
fn run(command: &mut Command, what: &str, log: Option<&Path>) -> Result<Output, ClusterError> {
    let output = command.output().map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            ClusterError::Command { what: what.to_string(), output: source.to_string(), hint: Some(INSTALL_HINT.to_string()) }
        } else {
            ClusterError::Io { context: format!("running {what}"), source }
        }
    })?;
    if output.status.success() {
        return Ok(output);
    }
    let mut text = String::from_utf8_lossy(&output.stderr).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stdout));
    if let Some(log) = log {
        let tail = tail_lines(&read_from(log, 0), 20);
        if !tail.is_empty() {
            text.push_str(&format!("\nlast lines of {}:\n{tail}", log.display()));
        }
    }
    Err(ClusterError::Command { what: what.to_string(), output: text, hint: None })
}

fn read_from(path: &Path, offset: u64) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let start = (offset as usize).min(bytes.len());
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn append(path: &Path, text: &str) -> Result<(), ClusterError> {
    let mut file = std::fs::OpenOptions::new().append(true).open(path).map_err(io_error(format!("opening {}", path.display())))?;
    file.write_all(text.as_bytes()).map_err(io_error(format!("writing {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binaries_are_found() {
        let dir = Cluster::bin_dir().unwrap_or_else(|e| panic!("{e}"));
        assert!(dir.join("initdb").exists() && dir.join("pg_ctl").exists(), "{}", dir.display());
    }

    #[test]
    fn throwaway_cluster_runs_sql_and_is_logical() {
        let (cluster, guard) = Cluster::throwaway().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cluster.psql("select 1").unwrap(), "1");
        assert_eq!(cluster.psql("show wal_level").unwrap(), "logical");
        assert_eq!(cluster.psql("show max_replication_slots").unwrap(), "20");
        assert_eq!(cluster.psql("show max_wal_senders").unwrap(), "20");
        assert_eq!(cluster.psql("show fsync").unwrap(), "off");
        assert_eq!(cluster.psql("show listen_addresses").unwrap(), "127.0.0.1");
        assert_eq!(cluster.url(), format!("postgres://postgres@127.0.0.1:{}/postgres", cluster.port()));
        // A logical replication slot can be created (wal_level and slots are right).
        let slot = cluster.psql("select slot_name from pg_create_logical_replication_slot('t', 'pgoutput', true)").unwrap();
        assert_eq!(slot, "t");
        let error = cluster.psql("select * from no_such_table").unwrap_err();
        assert!(error.to_string().contains("no_such_table"), "{error}");
        let path = guard.path().to_path_buf();
        let data_dir = cluster.data_dir().to_path_buf();
        drop(cluster);
        assert!(!Cluster::is_running(&data_dir).unwrap(), "server still running after drop");
        drop(guard);
        assert!(!path.exists(), "{} not removed", path.display());
    }

    #[test]
    fn guard_dropped_first_keeps_the_directory_until_the_server_stops() {
        let (cluster, guard) = Cluster::throwaway().unwrap_or_else(|e| panic!("{e}"));
        let path = guard.path().to_path_buf();
        drop(guard);
        assert!(path.exists());
        assert_eq!(cluster.psql("select 2").unwrap(), "2");
        drop(cluster);
        assert!(!path.exists());
    }

    #[test]
    fn stop_start_keeps_data_and_port_conflicts_are_reported() {
        let (mut cluster, _guard) = Cluster::throwaway().unwrap_or_else(|e| panic!("{e}"));
        cluster.psql("create table kept(x int); insert into kept values (42)").unwrap();
        let data_dir = cluster.data_dir().to_path_buf();
        let port = cluster.port();
        // Its own port is taken while it runs.
        assert!(matches!(Cluster::start(&data_dir, port), Err(ClusterError::PortInUse { .. })));
        cluster.stop();
        assert!(!Cluster::is_running(&data_dir).unwrap());
        cluster.stop(); // idempotent
        let again = Cluster::start(&data_dir, free_port()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(again.psql("select x from kept").unwrap(), "42");
        // A server left running (as by a killed process) is found and stopped by data dir.
        std::mem::forget(again);
        assert!(Cluster::is_running(&data_dir).unwrap());
        Cluster::stop_data_dir(&data_dir).unwrap();
        assert!(!Cluster::is_running(&data_dir).unwrap());
    }

    #[test]
    fn start_refuses_an_uninitialized_directory() {
        let dir = std::env::temp_dir().join(format!("powa-pg-empty-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let error = Cluster::start(&dir, free_port()).unwrap_err();
        assert!(matches!(error, ClusterError::NotInitialized { .. }), "{error}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn missing_binaries_message_says_how_to_fix() {
        let message = ClusterError::BinariesNotFound { searched: vec![PathBuf::from("/usr/lib/postgresql/*/bin")] }.to_string();
        assert!(message.contains("apt-get install postgresql-15"), "{message}");
    }

    #[test]
    fn long_data_dir_puts_the_socket_in_tmp() {
        let root = std::env::temp_dir().join(format!("powa-pg-long-{}-{}", std::process::id(), "x".repeat(100)));
        std::fs::create_dir_all(&root).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        let data = root.join("data");
        Cluster::init_with(&data, &InitOptions { fsync: false }).unwrap_or_else(|e| panic!("{e}"));
        let conf = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        assert!(conf.contains("unix_socket_directories = '/tmp'"));
        let hba = std::fs::read_to_string(data.join("pg_hba.conf")).unwrap();
        assert!(hba.lines().any(|l| l.starts_with("host") && l.contains("replication") && l.contains("127.0.0.1/32")));
        let _ = std::fs::remove_dir_all(&root);
    }
}
