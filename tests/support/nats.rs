//! A throwaway `nats-server -js` on a free loopback port, in its own temporary directory, for
//! the cluster tests. `tools/test.sh` installs the Debian package `nats-server` when missing;
//! without it these tests fail with a clear message (never skip).

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `nats-server` (killed on drop, its directory removed).
pub struct Nats {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
}

impl Nats {
    /// Starts `nats-server -js` with an 8 MB `max_payload` (payloads may be 3 MB) and waits
    /// until it accepts connections.
    pub fn start() -> Nats {
        let port = super::free_port();
        let dir = std::env::temp_dir().join(format!("powa-nats-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the NATS directory");
        let mut nats = Nats { child: None, port, dir };
        nats.spawn();
        nats
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let config = self.dir.join("nats.conf");
        let store = self.dir.join("js");
        std::fs::write(&config, format!("listen: 127.0.0.1:{}\nmax_payload: 8MB\njetstream {{ store_dir: {:?} }}\n", self.port, store.display().to_string()))
            .expect("write nats.conf");
        let child = Command::new("nats-server")
            .arg("-c")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `nats-server` ({e}): the cluster tests need it; `bash tools/test.sh` installs the Debian package nats-server"));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not listen on {} within 10 s", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
