//! W5: Postgres Changes deliveries per second with K subscribers, with and without RLS.
//!
//! Starts a throwaway PostgreSQL 15 cluster and the release server, joins K raw V2 WebSocket
//! subscribers (each with its own user token, so K distinct claims groups), inserts M rows in
//! one transaction, and measures from COMMIT to the moment every subscriber has received every
//! change. Deliveries/s = K × M / that time. Two tables: `open_items` (no RLS) and `rls_items`
//! (RLS enabled, policy `to authenticated using (true)`: every subscriber may see every row, so
//! every change is RLS-checked for every claims group).
//!
//! Usage: `cargo run --release -p powa-benches --bin pgchanges_load -- [K...]` (default 1 100 1000;
//! M = 200 rows). Loopback only; bounded by a 120 s timeout per run.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use replication::cluster::Cluster;

const SECRET: &str = "bench-secret-0123456789-abcdefghijklmnop";
fn rows() -> u64 {
    std::env::var("W5_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(200)
}

fn binary() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.parent().expect("dir").join("powa-realtime")
}

fn token(sub: &str) -> String {
    let out = Command::new(binary())
        .args(["token", "--role", "authenticated", "--sub", sub])
        .env("JWT_SECRET", SECRET)
        .output()
        .expect("token");
    String::from_utf8(out.stdout).expect("utf8").trim().to_string()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn ws_connect(port: u16, token: &str) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let request = format!(
        "GET /realtime/v1/websocket?apikey={token}&vsn=2.0.0 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "upgrade failed: {}", String::from_utf8_lossy(&head));
    stream
}

fn send_text(stream: &mut TcpStream, text: &str) {
    let mut frame = vec![0x81u8];
    let len = text.len();
    if len < 126 {
        frame.push(0x80 | len as u8);
    } else {
        frame.push(0x80 | 126);
        frame.extend_from_slice(&(len as u16).to_be_bytes());
    }
    frame.extend_from_slice(&[0, 0, 0, 0]);
    frame.extend_from_slice(text.as_bytes());
    stream.write_all(&frame).unwrap();
}

/// Reads one frame's payload.
fn read_frame(stream: &mut TcpStream) -> Vec<u8> {
    let mut header = [0u8; 2];
    stream.read_exact(&mut header).unwrap();
    let len = match header[1] & 0x7F {
        126 => {
            let mut b = [0u8; 2];
            stream.read_exact(&mut b).unwrap();
            u16::from_be_bytes(b) as usize
        }
        127 => {
            let mut b = [0u8; 8];
            stream.read_exact(&mut b).unwrap();
            u64::from_be_bytes(b) as usize
        }
        n => n as usize,
    };
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).unwrap();
    payload
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

struct ServerProcess(Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Returns deliveries/s for K subscribers on `table`.
fn run(cluster: &Cluster, k: usize, table: &str) -> (f64, Duration) {
    let port = free_port();
    let server = Command::new(binary())
        .arg("serve")
        .env("JWT_SECRET", SECRET)
        .env("REALTIME_ADDR", format!("127.0.0.1:{port}"))
        .env("DATABASE_URL", cluster.url())
        .env("RUST_LOG", std::env::var("W5_SERVER_LOG").unwrap_or_else(|_| "warn".into()))
        .stdout(Stdio::null())
        .spawn()
        .expect("start server");
    let _server = ServerProcess(server);
    for _ in 0..100 {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let received = Arc::new(AtomicU64::new(0));
    let ready = Arc::new(Barrier::new(k + 1));
    let expected = rows();
    let mut threads = Vec::new();
    for i in 0..k {
        let tok = token(&format!("00000000-0000-0000-0000-{:012}", i + 1));
        let received = Arc::clone(&received);
        let ready = Arc::clone(&ready);
        let table = table.to_string();
        threads.push(std::thread::spawn(move || {
            let mut stream = ws_connect(port, &tok);
            let join = format!(r#"["1","1","realtime:w5","phx_join",{{"config":{{"postgres_changes":[{{"event":"INSERT","schema":"public","table":"{table}"}}]}}}}]"#);
            send_text(&mut stream, &join);
            loop {
                let frame = read_frame(&mut stream);
                if contains(&frame, b"Subscribed to PostgreSQL") {
                    break;
                }
                assert!(!contains(&frame, b"\"status\":\"error\""), "subscription failed: {}", String::from_utf8_lossy(&frame));
            }
            ready.wait();
            let mut got = 0;
            while got < expected {
                let frame = read_frame(&mut stream);
                if contains(&frame, b"postgres_changes") {
                    got += 1;
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    ready.wait();
    let started = Instant::now();
    if std::env::var_os("W5_TRACE").is_some() {
        eprintln!("insert starts at unix {:?}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap());
    }
    cluster
        .psql(&format!("insert into {table} (v) select g from generate_series(1, {}) g", rows()))
        .expect("insert");
    let commit_done = started.elapsed();
    let first_seen = Instant::now();
    while received.load(Ordering::Relaxed) == 0 && first_seen.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_micros(200));
    }
    if std::env::var_os("W5_TRACE").is_some() {
        eprintln!("k={k} {table}: psql returned after {:?}, first delivery {:?} after start (unix {:?})", commit_done, started.elapsed(), std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap());
    }
    for thread in threads {
        thread.join().expect("subscriber");
    }
    let elapsed = started.elapsed();
    let total = received.load(Ordering::Relaxed);
    assert_eq!(total, rows() * k as u64);
    let _ = commit_done;
    (total as f64 / elapsed.as_secs_f64(), elapsed)
}

fn main() {
    let ks: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let ks = if ks.is_empty() { vec![1, 100, 1000] } else { ks };
    let (cluster, _guard) = Cluster::throwaway().expect("PostgreSQL cluster (install postgresql-15)");
    // The server creates these roles at its first start; the bench needs them before that.
    cluster
        .psql("create role anon nologin; create role authenticated nologin; create role service_role nologin bypassrls;")
        .expect("roles");
    cluster
        .psql(
            "create table open_items (id bigserial primary key, v int); \
             create table rls_items (id bigserial primary key, v int); \
             alter table rls_items enable row level security; \
             grant select on open_items, rls_items to anon, authenticated, service_role; \
             create publication supabase_realtime for table open_items, rls_items;",
        )
        .expect("schema");
    cluster.psql("create policy all_rows on rls_items for select to authenticated using (true)").expect("policy");
    println!("| subscribers | table | rows | time to deliver all | deliveries/s |");
    println!("| --- | --- | --- | --- | --- |");
    for k in ks {
        for table in ["open_items", "rls_items"] {
            let (rate, elapsed) = run(&cluster, k, table);
            println!("| {k} | {table} | {} | {:.1} ms | {:.0} |", rows(), elapsed.as_secs_f64() * 1000.0, rate);
        }
    }
}
