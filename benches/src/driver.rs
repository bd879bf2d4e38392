//! What the database load drivers (`pgchanges_load`, `storm_load`) share: starting the release
//! server next to them, minting tokens, and a minimal blocking WebSocket client.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The secret the drivers' servers sign with.
pub const SECRET: &str = "bench-secret-0123456789-abcdefghijklmnop";

/// The `powa-realtime` binary next to the running driver (both built with `--release`).
pub fn binary() -> std::path::PathBuf {
    std::env::current_exe().expect("current exe").parent().expect("dir").join("powa-realtime")
}

/// A token for `role` with subject `sub`.
pub fn token(role: &str, sub: &str) -> String {
    let out = Command::new(binary()).args(["token", "--role", role, "--sub", sub]).env("JWT_SECRET", SECRET).output().expect("token");
    String::from_utf8(out.stdout).expect("utf8").trim().to_string()
}

/// The server process; killed on drop.
pub struct ServerProcess(Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `powa-realtime serve` on a free loopback port with `DATABASE_URL = database_url`
/// and `extra_env`, and waits (bounded) until it accepts connections.
pub fn start_server(database_url: &str, extra_env: &[(&str, String)]) -> (ServerProcess, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut command = Command::new(binary());
    command
        .arg("serve")
        .env("JWT_SECRET", SECRET)
        .env("REALTIME_ADDR", format!("127.0.0.1:{port}"))
        .env("DATABASE_URL", database_url)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
    for (key, value) in extra_env {
        command.env(key, value);
    }
    let child = command.spawn().expect("start server");
    for _ in 0..200 {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (ServerProcess(child), port)
}

/// Opens a V2 WebSocket to the server.
pub fn ws_connect(port: u16, token: &str) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    upgrade(&mut stream, token);
    stream
}

/// Sends the V2 WebSocket upgrade on an open stream (plain or TLS) and reads the 101 head.
pub fn upgrade<S: Read + Write + ?Sized>(stream: &mut S, token: &str) {
    upgrade_host(stream, token, "localhost");
}

/// [`upgrade`] naming `host` in the Host header (the tenant in multi-tenant mode).
pub fn upgrade_host<S: Read + Write + ?Sized>(stream: &mut S, token: &str, host: &str) {
    let request = format!(
        "GET /realtime/v1/websocket?apikey={token}&vsn=2.0.0 HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).unwrap();
    stream.flush().unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "upgrade failed: {}", String::from_utf8_lossy(&head));
}

/// A masked client text frame.
pub fn frame(text: &str) -> Vec<u8> {
    let mut out = vec![0x81u8];
    let len = text.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    }
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(text.as_bytes());
    out
}

/// Reads one server frame's payload.
pub fn read_frame(stream: &mut TcpStream) -> Vec<u8> {
    try_read_frame(stream).expect("a server frame")
}

/// Reads one server frame's payload, or the read error (a timeout when none came).
pub fn try_read_frame(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut header = [0u8; 2];
    stream.read_exact(&mut header)?;
    let len = match header[1] & 0x7F {
        126 => {
            let mut b = [0u8; 2];
            stream.read_exact(&mut b)?;
            u16::from_be_bytes(b) as usize
        }
        127 => {
            let mut b = [0u8; 8];
            stream.read_exact(&mut b)?;
            u64::from_be_bytes(b) as usize
        }
        n => n as usize,
    };
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload)?;
    Ok(payload)
}

/// Whether `haystack` contains `needle`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
