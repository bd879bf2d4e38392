//! Multi-tenant scale (issue 13): the release server with T tenants in a tenants file, C
//! connections per tenant, each naming its tenant in the Host header. Records the start time
//! and memory with T tenants against one tenant, and the join throughput of T × C connections
//! spread over T tenants against the same number of connections in one tenant — same run, same
//! machine, loopback only.
//!
//! Usage: `cargo run --release -p powa-benches --bin tenants_load -- [TENANTS] [CONNS_PER_TENANT]`
//! (default 1000 × 10).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use powa_benches::driver::{binary, frame, read_frame, upgrade_host};

const THREADS: usize = 10;

struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn secret(tenant: usize) -> String {
    format!("tenant-{tenant:04}-secret-0123456789-abcdefghijklmnop")
}

fn host(tenant: usize) -> String {
    format!("t{tenant:04}.localhost")
}

fn token(tenant: usize) -> String {
    let mut claims = serde_json::Map::new();
    claims.insert("role".into(), "anon".into());
    claims.insert("exp".into(), 4_000_000_000i64.into());
    auth::sign_hs256(secret(tenant).as_bytes(), &claims)
}

/// A tenants file with `tenants` tenants, limits high enough that only the engine is measured.
fn write_tenants(path: &Path, tenants: usize) {
    let mut text = String::new();
    for t in 0..tenants {
        text.push_str(&format!(
            "[[tenant]]\nexternal_id = \"t{t:04}\"\njwt_secret = \"{}\"\nmax_concurrent_users = 1000000\nmax_joins_per_second = 1000000\nmax_events_per_second = 1000000\n\n",
            secret(t)
        ));
    }
    std::fs::write(path, text).expect("write the tenants file");
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse().ok()).unwrap_or(0)
}

fn healthy(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 200")
}

/// Starts the server on `tenants_file`; returns it and the time until `/healthz` answered 200.
fn start(tenants_file: &Path) -> (Server, Duration) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let started = Instant::now();
    let child = Command::new(binary())
        .arg("serve")
        .env_clear()
        .env("REALTIME_ADDR", format!("127.0.0.1:{port}"))
        .env("REALTIME_TENANTS", tenants_file)
        .env("REALTIME_CONNECT_ERROR_DELAY_MS", "0")
        .env("REALTIME_JOIN_ERROR_DELAY_MS", "0")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("start the release server");
    let server = Server { child, port };
    while !healthy(port) {
        assert!(started.elapsed() < Duration::from_secs(60), "the server did not start");
        std::thread::sleep(Duration::from_millis(2));
    }
    (server, started.elapsed())
}

fn connect(port: u16, tenant: usize) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    upgrade_host(&mut stream, &token(tenant), &host(tenant));
    stream
}

/// Opens `conns` connections (connection i in tenant `tenant_of(i)`), then every one sends a
/// join at once; returns joins/s (all replies in) and how many were `ok`.
fn join_storm(port: u16, conns: usize, tenant_of: fn(usize, usize) -> usize, tenants: usize) -> (f64, u64) {
    let barrier = Arc::new(Barrier::new(THREADS + 1));
    let done = Arc::new(Barrier::new(THREADS + 1));
    let ok = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for t in 0..THREADS {
        let (barrier, done, ok) = (Arc::clone(&barrier), Arc::clone(&done), Arc::clone(&ok));
        threads.push(std::thread::spawn(move || {
            let mine: Vec<usize> = (0..conns).filter(|i| i % THREADS == t).collect();
            let mut streams: Vec<TcpStream> = mine.iter().map(|&i| connect(port, tenant_of(i, tenants))).collect();
            let join = frame(r#"["1","1","realtime:room","phx_join",{"config":{}}]"#);
            barrier.wait();
            for stream in &mut streams {
                stream.write_all(&join).unwrap();
            }
            for stream in &mut streams {
                let reply = read_frame(stream);
                if reply.windows(13).any(|w| w == b"\"status\":\"ok\"") {
                    ok.fetch_add(1, Ordering::Relaxed);
                }
            }
            done.wait();
            drop(streams);
        }));
    }
    barrier.wait();
    let started = Instant::now();
    done.wait();
    let seconds = started.elapsed().as_secs_f64();
    for thread in threads {
        thread.join().unwrap();
    }
    (conns as f64 / seconds, ok.load(Ordering::Relaxed))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let tenants: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(1000);
    let per_tenant: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(10);
    let conns = tenants * per_tenant;
    let dir = std::env::temp_dir().join(format!("powa-tenants-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (many_file, one_file) = (dir.join("many.toml"), dir.join("one.toml"));
    write_tenants(&many_file, tenants);
    write_tenants(&one_file, 1);
    println!("tenants_load: {tenants} tenants × {per_tenant} connections = {conns}, {THREADS} client threads");

    for round in 1..=2 {
        let (one, one_start) = start(&one_file);
        let one_rss0 = rss_kib(one.child.id());
        let (one_rate, one_ok) = join_storm(one.port, conns, |_, _| 0, 1);
        let one_rss1 = rss_kib(one.child.id());
        drop(one);
        let (many, many_start) = start(&many_file);
        let many_rss0 = rss_kib(many.child.id());
        let (many_rate, many_ok) = join_storm(many.port, conns, |i, tenants| i % tenants, tenants);
        let many_rss1 = rss_kib(many.child.id());
        drop(many);
        println!(
            "round {round}: 1 tenant: start {:.0} ms, RSS {one_rss0} KiB idle, {one_rss1} KiB with {conns} joined; join storm {one_rate:.0} joins/s ({one_ok} ok)",
            one_start.as_secs_f64() * 1000.0
        );
        println!(
            "round {round}: {tenants} tenants: start {:.0} ms, RSS {many_rss0} KiB idle (+{:.1} KiB per tenant), {many_rss1} KiB with {conns} joined; join storm {many_rate:.0} joins/s ({many_ok} ok), {:.2}× one tenant",
            many_start.as_secs_f64() * 1000.0,
            (many_rss0 as f64 - one_rss0 as f64) / tenants as f64,
            many_rate / one_rate
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
