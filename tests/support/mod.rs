//! Test support: start the real `powa-realtime` binary on a free loopback port and talk to it.
//!
//! Every integration test drives the real binary over real sockets. Nothing here mocks the
//! server; the helpers only spare each test the boilerplate of picking a port, minting tokens
//! and waiting for `/healthz`.
#![allow(dead_code)]

pub mod nats;
pub mod node;
pub mod python;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The secret every test server signs its keys with.
pub const SECRET: &str = "test-secret-0123456789-abcdefghijklmnopqrstuvwxyz";

/// A running server process; killed on drop.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_powa-realtime")
}

/// A port that was free a moment ago (the OS picks it).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().unwrap().port()
}

impl Server {
    /// Starts `powa-realtime serve` with test-friendly defaults (no error delays, 2 shards)
    /// plus `extra_env`, and waits until `/healthz` answers 200.
    pub fn start(extra_env: &[(&str, &str)]) -> Server {
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        Server::start_on(addr, extra_env)
    }

    /// Like [`Server::start`], on a given address.
    pub fn start_on(addr: SocketAddr, extra_env: &[(&str, &str)]) -> Server {
        let mut server = Server::spawn_on(addr, extra_env);
        server.wait_healthy();
        server
    }

    /// Starts the process without waiting for it to serve.
    pub fn spawn_on(addr: SocketAddr, extra_env: &[(&str, &str)]) -> Server {
        let child = Server::command(addr, extra_env).spawn().expect("spawn powa-realtime");
        Server { child, addr }
    }

    /// Spawns a prepared [`Server::command`] (e.g. with a `pre_exec` hook) for `addr` and waits
    /// until it serves.
    pub fn start_command(mut command: Command, addr: SocketAddr) -> Server {
        let child = command.spawn().expect("spawn powa-realtime");
        let mut server = Server { child, addr };
        server.wait_healthy();
        server
    }

    /// The `serve` command [`Server::start_on`] runs, not started yet.
    pub fn command(addr: SocketAddr, extra_env: &[(&str, &str)]) -> Command {
        let mut command = Command::new(binary());
        command
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("REALTIME_ADDR", addr.to_string())
            .env("JWT_SECRET", SECRET)
            .env("REALTIME_SHARDS", "2")
            .env("REALTIME_JOIN_ERROR_DELAY_MS", "0")
            .env("REALTIME_CONNECT_ERROR_DELAY_MS", "0")
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null());
        for (key, value) in extra_env {
            command.env(key, value);
        }
        command
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the server process.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(self.child.id() as libc::pid_t, signal) }, 0, "kill({signal})");
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!("powa-realtime exited early with {status}");
            }
            if let Ok((200, _)) = http_request(self.addr, "GET", "/healthz", &[], b"") {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("powa-realtime did not become healthy within 20 s");
    }

    pub fn ws_url(&self, token: &str, vsn: &str) -> String {
        format!(
            "ws://{}/realtime/v1/websocket?apikey={token}&vsn={vsn}",
            self.addr
        )
    }

    /// The base URL realtime-js takes (`ws://host:port/realtime/v1`).
    pub fn realtime_js_endpoint(&self) -> String {
        format!("ws://{}/realtime/v1", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True while the process is alive (used to assert that bad input never kills it).
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Mints a token for `role` signed with `secret` (a tenant's), with the binary's `token` command.
pub fn token_signed(secret: &str, role: &str) -> String {
    let output = Command::new(binary()).args(["token", "--role", role]).env("JWT_SECRET", secret).output().expect("run powa-realtime token");
    assert!(output.status.success(), "token command failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

/// Mints a token with the binary's own `token` command.
pub fn token(role: &str, extra: &[&str]) -> String {
    let output = Command::new(binary())
        .arg("token")
        .arg("--role")
        .arg(role)
        .args(extra)
        .env("JWT_SECRET", SECRET)
        .output()
        .expect("run powa-realtime token");
    assert!(
        output.status.success(),
        "token command failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

pub fn anon_key() -> String {
    token("anon", &[])
}

pub fn service_key() -> String {
    token("service_role", &[])
}

/// [`http_request`] with `host` as the Host header (the tenant in multi-tenant mode).
pub fn http_request_host(addr: SocketAddr, host: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
    http_exchange(addr, host, method, path, headers, body)
}

/// A minimal blocking HTTP/1.1 client: returns (status, body).
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    http_exchange(addr, "localhost", method, path, headers, body)
}

fn http_exchange(addr: SocketAddr, host: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes())?;
    stream.write_all(body)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response);
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("no status line"))?;
    let body_start = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
        .unwrap_or(response.len());
    Ok((status, response[body_start..].to_vec()))
}

/// Runs `sql` with `psql` as `postgres` on the throwaway cluster listening on `port` (usable
/// from any thread, while the cluster value lives elsewhere); stdout trimmed, or stderr.
pub fn psql_port(port: u16, sql: &str) -> Result<String, String> {
    let psql = replication::cluster::Cluster::bin_dir().map_err(|e| e.to_string())?.join("psql");
    let output = Command::new(psql)
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-At", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-p"])
        .arg(port.to_string())
        .arg("-c")
        .arg(sql)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

/// A series from the server's `/metrics`, summed over its label sets (0 when absent).
#[allow(dead_code)]
pub fn metric(addr: SocketAddr, name: &str) -> u64 {
    let (status, body) = http_request(addr, "GET", "/metrics", &[], b"").expect("metrics");
    assert_eq!(status, 200);
    String::from_utf8_lossy(&body)
        .lines()
        .filter(|line| line.split([' ', '{']).next() == Some(name))
        .filter_map(|line| line.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum::<f64>() as u64
}

/// Polls [`metric`] until it reads `want`; fails with `context` after `within`.
#[allow(dead_code)]
pub fn wait_for_metric(addr: SocketAddr, name: &str, want: u64, within: std::time::Duration, context: &str) {
    let deadline = std::time::Instant::now() + within;
    loop {
        let now = metric(addr, name);
        if now == want {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{context}: {name} is {now}, expected {want}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
