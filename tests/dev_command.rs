//! `powa-realtime dev` (CONTRACT.md): its own PostgreSQL under `./.powa/`, Ctrl-C stops the
//! server and the cluster cleanly, a second run reuses the data. Uses the machine's real
//! PostgreSQL server binaries; without them this test fails and says what to install.

mod support;
mod wsclient;

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use replication::cluster::Cluster;

/// A working directory under /tmp, removed at the end (after the cluster has stopped).
struct WorkDir(PathBuf);

impl WorkDir {
    fn new() -> WorkDir {
        use std::os::unix::fs::PermissionsExt as _;
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let path = PathBuf::from(format!("/tmp/powa-devcmd-{}-{nanos:x}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap();
        // The `postgres` OS user (used when the tests run as root) must traverse it.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        WorkDir(path)
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let data_dir = self.0.join(".powa/pgdata");
        let _ = Cluster::stop_data_dir(&data_dir);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Dev {
    child: Child,
    lines: mpsc::Receiver<String>,
    addr: SocketAddr,
}

impl Dev {
    fn start(dir: &Path) -> Dev {
        Dev::start_with(dir, &[])
    }

    fn start_with(dir: &Path, extra_env: &[(&str, &str)]) -> Dev {
        Cluster::bin_dir().unwrap_or_else(|e| panic!("{e}"));
        let addr: SocketAddr = format!("127.0.0.1:{}", support::free_port()).parse().unwrap();
        let mut child = Command::new(support::binary())
            .arg("dev")
            .current_dir(dir)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("REALTIME_ADDR", addr.to_string())
            .env("REALTIME_SHARDS", "2")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .envs(extra_env.iter().copied())
            .spawn()
            .expect("spawn powa-realtime dev");
        let stdout = child.stdout.take().unwrap();
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let mut dev = Dev { child, lines, addr };
        dev.wait_healthy();
        dev
    }

    fn wait_healthy(&mut self) {
        // The first run creates the cluster (initdb) before serving.
        let deadline = Instant::now() + Duration::from_secs(90);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("powa-realtime dev exited early with {status}");
            }
            if let Ok((200, _)) = support::http_request(self.addr, "GET", "/healthz", &[], b"") {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("powa-realtime dev did not become healthy within 90 s");
    }

    /// The `anon key:` line of the banner (before `DATABASE_URL:`).
    fn anon_key(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Ok(line) = self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            if let Some(rest) = line.trim().strip_prefix("anon key:") {
                return rest.trim().to_string();
            }
        }
        panic!("dev printed no anon key line");
    }

    /// The `DATABASE_URL:` line of the banner.
    fn database_url(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Ok(line) = self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            if let Some(rest) = line.trim().strip_prefix("DATABASE_URL:") {
                return rest.trim().to_string();
            }
        }
        panic!("dev printed no DATABASE_URL line");
    }

    /// Sends SIGINT (Ctrl-C) and waits for the exit.
    fn interrupt(mut self) -> ExitStatus {
        // SAFETY: kill on our own child's pid.
        assert_eq!(unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) }, 0);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("powa-realtime dev did not exit within 60 s of SIGINT");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn psql(url: &str, sql: &str) -> String {
    let output = Command::new("psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-At"])
        .arg(url)
        .arg("-c")
        .arg(sql)
        .output()
        .expect("run psql (install the PostgreSQL client, e.g. apt-get install postgresql-client-15)");
    assert!(output.status.success(), "psql {url} -c {sql:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// Processes whose command line names `data_dir` (a postgres serving it).
fn processes_using(data_dir: &Path) -> Vec<String> {
    let needle = data_dir.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().filter_map(Result::ok) {
        if !entry.file_name().to_string_lossy().chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmdline.contains(&needle) {
            found.push(format!("{}: {cmdline}", entry.file_name().to_string_lossy()));
        }
    }
    found
}

#[test]
fn dev_runs_its_own_postgres_stops_on_ctrl_c_and_reuses_the_data() {
    let work = WorkDir::new();
    let data_dir = work.0.join(".powa/pgdata");

    // First run: creates the cluster.
    let dev = Dev::start(&work.0);
    let url = dev.database_url();
    assert!(url.starts_with("postgres://postgres@127.0.0.1:"), "{url}");
    assert_eq!(psql(&url, "select 1"), "1");
    assert_eq!(psql(&url, "show wal_level"), "logical");
    psql(&url, "create table kept (x int); insert into kept values (42)");
    let port: u16 = std::fs::read_to_string(work.0.join(".powa/pg_port")).unwrap().trim().parse().unwrap();
    assert!(url.contains(&format!(":{port}/")), "{url} vs pg_port {port}");
    assert!(!processes_using(&data_dir).is_empty(), "no postgres serving {}", data_dir.display());

    let status = dev.interrupt();
    assert!(status.success(), "dev exited with {status} on SIGINT");
    assert_eq!(processes_using(&data_dir), Vec::<String>::new(), "postgres still running after SIGINT");
    assert!(!Cluster::is_running(&data_dir).unwrap());

    // Second run: same data directory, same port, the table is still there.
    let dev = Dev::start(&work.0);
    let url2 = dev.database_url();
    assert_eq!(url2, url);
    assert_eq!(psql(&url2, "select x from kept"), "42");
    let status = dev.interrupt();
    assert!(status.success(), "dev exited with {status} on SIGINT");
    assert_eq!(processes_using(&data_dir), Vec::<String>::new(), "postgres still running after SIGINT");
}

#[test]
fn dev_picks_a_new_port_when_its_port_is_taken() {
    let work = WorkDir::new();
    let dev = Dev::start(&work.0);
    let url = dev.database_url();
    let port: u16 = std::fs::read_to_string(work.0.join(".powa/pg_port")).unwrap().trim().parse().unwrap();
    assert!(dev.interrupt().success());

    // Something else takes the port meanwhile.
    let _squatter = std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind the old port");
    let dev = Dev::start(&work.0);
    let url2 = dev.database_url();
    assert_ne!(url2, url);
    let new_port: u16 = std::fs::read_to_string(work.0.join(".powa/pg_port")).unwrap().trim().parse().unwrap();
    assert_ne!(new_port, port);
    assert!(url2.contains(&format!(":{new_port}/")), "{url2}");
    assert_eq!(psql(&url2, "select 1"), "1");
    assert!(dev.interrupt().success());
}

/// CONTRACT.md "Shutdown": `dev` drains the server first (its clients get the notice and close
/// 1012 while PostgreSQL still runs), then stops PostgreSQL, and exits 0.
#[test]
fn dev_drains_the_server_before_stopping_postgres() {
    let work = WorkDir::new();
    let data_dir = work.0.join(".powa/pgdata");
    let mut dev = Dev::start_with(&work.0, &[("REALTIME_DRAIN_SECS", "4"), ("REALTIME_SHARDS", "1")]);
    let key = dev.anon_key();
    let url = dev.database_url();
    let ws_url = format!("ws://{}/realtime/v1/websocket?apikey={key}&vsn=1.0.0", dev.addr);
    let mut clients: Vec<wsclient::Client> = (0..2)
        .map(|_| {
            let mut client = wsclient::Client::connect(&ws_url);
            wsclient::join_v1(&mut client, "realtime:dev-drain", "1", wsclient::config(false, false));
            client
        })
        .collect();
    // SAFETY: kill on our own child's pid.
    assert_eq!(unsafe { libc::kill(dev.child.id() as libc::pid_t, libc::SIGINT) }, 0);
    // One shard, two connections: the closes are spread over the drain, so the second comes
    // about half the drain after the first. PostgreSQL must answer right after the first close,
    // while the server is still draining the second.
    let deadline = Instant::now() + Duration::from_secs(10);
    let first = loop {
        assert!(Instant::now() < deadline, "no disconnect notice within 10 s of SIGINT");
        let got = clients.iter_mut().position(|client| match client.recv_frame(Duration::from_millis(20)) {
            wsclient::Frame::Timeout => false,
            wsclient::Frame::Text(text) => {
                assert!(text.contains("Server requested disconnect"), "{text}");
                true
            }
            other => panic!("expected the disconnect notice, got {}", wsclient::describe(&other)),
        });
        if let Some(index) = got {
            break index;
        }
    };
    assert!(!processes_using(&data_dir).is_empty(), "PostgreSQL stopped before the server drained");
    assert_eq!(psql(&url, "select 1"), "1");
    assert_eq!(clients[first].recv_close(Duration::from_secs(10)), Some(1012));
    let second = &mut clients[1 - first];
    let notice = second.recv_json(Duration::from_secs(10));
    assert_eq!(notice["payload"]["message"], "Server requested disconnect", "{notice}");
    assert_eq!(second.recv_close(Duration::from_secs(10)), Some(1012));
    let deadline = Instant::now() + Duration::from_secs(4 + 5 + 10);
    let status = loop {
        if let Some(status) = dev.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "dev did not exit after the drain");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "dev exited with {status}");
    assert_eq!(processes_using(&data_dir), Vec::<String>::new(), "postgres still running after the drain");
}
