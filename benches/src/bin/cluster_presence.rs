//! Presence across cluster nodes (issue 15): a local `nats-server` and three release nodes;
//! M members per node join one topic and track; then every member re-tracks with a new meta in
//! rounds (churn). Reports the time until an observer on every node sees every member
//! (convergence), the presence_diff frames per second the observers receive during the churn,
//! and the time from the last re-track until every observer's view is exact. Loopback only.
//!
//! Usage: `cargo run --release -p powa-benches --bin cluster_presence -- [MEMBERS_PER_NODE] [ROUNDS] [rejoin|retrack]`
//! (default 100 × 20, rejoin). Needs `nats-server` on PATH.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use powa_benches::driver::{binary, frame, token, try_read_frame, upgrade, SECRET};

const NODES: usize = 3;
const TOPIC: &str = "realtime:bench-lobby";

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_port(port: u16) {
    for _ in 0..200 {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("port {port} did not open");
}

fn connect(port: u16, anon: &str) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    upgrade(&mut stream, anon);
    stream
}

/// Joins with join ref `join_ref` (a rejoin after a leave gets a new one).
fn join(stream: &mut TcpStream, key: &str, join_ref: u64) {
    let join_ref = join_ref.to_string();
    let join = serde_json::json!([join_ref, join_ref, TOPIC, "phx_join", {"config": {"presence": {"key": key}}}]).to_string();
    stream.write_all(&frame(&join)).unwrap();
}

fn leave(stream: &mut TcpStream, join_ref: u64) {
    let join_ref = join_ref.to_string();
    stream.write_all(&frame(&serde_json::json!([join_ref, "l", TOPIC, "phx_leave", {}]).to_string())).unwrap();
}

fn track(stream: &mut TcpStream, join_ref: u64, version: u64) {
    let join_ref = join_ref.to_string();
    let track = serde_json::json!([join_ref, "t", TOPIC, "presence", {"type": "presence", "event": "track", "payload": {"v": version}}]).to_string();
    stream.write_all(&frame(&track)).unwrap();
}

/// One server frame's payload, or `None` when none came within the read timeout (a frame that
/// started arriving gets 10 s to finish).
fn next_frame(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut peek = [0u8; 1];
    stream.peek(&mut peek).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let frame = try_read_frame(stream).ok();
    stream.set_read_timeout(Some(Duration::from_millis(200))).ok()?;
    frame
}

/// An observer's view: key → the `v` of each meta.
type View = Arc<Mutex<BTreeMap<String, Vec<u64>>>>;

fn observe(mut stream: TcpStream, view: View, diffs: Arc<AtomicU64>, entries: Arc<AtomicU64>, stop: Arc<AtomicBool>) {
    stream.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    while !stop.load(Ordering::Relaxed) {
        let Some(bytes) = next_frame(&mut stream) else { continue };
        let Ok(value) = serde_json::from_slice::<serde_json::Value>(&bytes) else { continue };
        let (event, payload) = (&value[3], &value[4]);
        let metas = |entry: &serde_json::Value| -> Vec<u64> { entry["metas"].as_array().map(|m| m.iter().filter_map(|m| m["v"].as_u64()).collect()).unwrap_or_default() };
        let mut view = view.lock().unwrap();
        if event == "presence_state" {
            view.clear();
            for (key, entry) in payload.as_object().into_iter().flatten() {
                view.insert(key.clone(), metas(entry));
            }
        } else if event == "presence_diff" {
            diffs.fetch_add(1, Ordering::Relaxed);
            let count = |side: &str| payload[side].as_object().into_iter().flatten().map(|(_, e)| e["metas"].as_array().map_or(0, Vec::len) as u64).sum::<u64>();
            entries.fetch_add(count("joins") + count("leaves"), Ordering::Relaxed);
            for (key, entry) in payload["leaves"].as_object().into_iter().flatten() {
                if let Some(list) = view.get_mut(key) {
                    for v in metas(entry) {
                        if let Some(at) = list.iter().position(|x| *x == v) {
                            list.remove(at);
                        }
                    }
                    if list.is_empty() {
                        view.remove(key);
                    }
                }
            }
            for (key, entry) in payload["joins"].as_object().into_iter().flatten() {
                view.entry(key.clone()).or_default().extend(metas(entry));
            }
        }
    }
}

/// Waits until every view holds exactly `members` keys, each with one meta at `version`.
fn converged(views: &[View], members: usize, version: u64, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < within {
        let done = views.iter().all(|view| {
            let view = view.lock().unwrap();
            view.len() == members && view.values().all(|metas| metas.as_slice() == [version])
        });
        if done {
            return Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let per_node: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(100);
    let rounds: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(20);
    // `rejoin` (default): leave, join, track each round (each join renders the whole
    // presence_state); `retrack`: track a new meta on the same channel (at most 4 rounds: the
    // per-channel presence rate is 5 per 30 s).
    let retrack = args.get(2).is_some_and(|mode| mode == "retrack");
    let rounds = if retrack { rounds.min(4) } else { rounds };
    let dir = std::env::temp_dir().join(format!("powa-cluster-presence-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let nats_port = free_port();
    std::fs::write(dir.join("nats.conf"), format!("listen: 127.0.0.1:{nats_port}\nmax_payload: 8MB\njetstream {{ store_dir: {:?} }}\n", dir.join("js").display().to_string())).unwrap();
    let _nats = Proc(Command::new("nats-server").arg("-c").arg(dir.join("nats.conf")).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("nats-server on PATH"));
    wait_port(nats_port);
    let mut nodes = Vec::new();
    let mut ports = Vec::new();
    for n in 0..NODES {
        let port = free_port();
        let child = Command::new(binary())
            .arg("serve")
            .env("JWT_SECRET", SECRET)
            .env("REALTIME_ADDR", format!("127.0.0.1:{port}"))
            .env("REALTIME_SHARDS", "1")
            .env("REALTIME_NATS_URL", format!("nats://127.0.0.1:{nats_port}"))
            .env("REALTIME_NODE_ID", format!("node{n}"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("start a node");
        wait_port(port);
        nodes.push(Proc(child));
        ports.push(port);
    }
    std::thread::sleep(Duration::from_secs(2));
    let anon = token("anon", "bench");
    let stop = Arc::new(AtomicBool::new(false));
    let diffs = Arc::new(AtomicU64::new(0));
    let entries = Arc::new(AtomicU64::new(0));
    // One observer per node (it tracks nothing).
    let mut views = Vec::new();
    for (n, port) in ports.iter().enumerate() {
        let mut stream = connect(*port, &anon);
        join(&mut stream, &format!("observer{n}"), 1);
        let view: View = Arc::default();
        views.push(Arc::clone(&view));
        let (diffs, entries, stop) = (Arc::clone(&diffs), Arc::clone(&entries), Arc::clone(&stop));
        std::thread::spawn(move || observe(stream, view, diffs, entries, stop));
    }
    std::thread::sleep(Duration::from_millis(500));
    // Members, each with a drainer thread (they receive every diff too).
    let mut members = Vec::new();
    for (n, port) in ports.iter().enumerate() {
        for m in 0..per_node {
            let mut stream = connect(*port, &anon);
            join(&mut stream, &format!("n{n}m{m}"), 1);
            let mut reader = stream.try_clone().unwrap();
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                reader.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
                let mut buf = [0u8; 64 * 1024];
                while !stop.load(Ordering::Relaxed) {
                    let _ = std::io::Read::read(&mut reader, &mut buf);
                }
            });
            members.push((format!("n{n}m{m}"), stream));
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    let total = per_node * NODES;
    let started = Instant::now();
    for (_, member) in &mut members {
        track(member, 1, 0);
    }
    let sent = started.elapsed();
    let first = converged(&views, total, 0, Duration::from_secs(60));
    println!("members: {total} over {NODES} nodes; tracks sent in {:.1} ms", sent.as_secs_f64() * 1e3);
    println!("initial convergence (every observer sees every member): {:?}", first.map(|d| d + sent));
    let diffs_before = diffs.load(Ordering::Relaxed);
    let entries_before = entries.load(Ordering::Relaxed);
    let churn = Instant::now();
    // Churn: each member leaves, joins again and tracks a new meta (a re-track of the same
    // channel is capped at 5 per 30 s by the per-channel presence rate; a new join starts a new
    // window, as in upstream).
    for round in 1..=rounds {
        for (key, member) in &mut members {
            if retrack {
                track(member, 1, round);
            } else {
                leave(member, round);
                join(member, key, round + 1);
                track(member, round + 1, round);
            }
        }
    }
    let churn_sent = churn.elapsed();
    let last = converged(&views, total, rounds, Duration::from_secs(120));
    let elapsed = churn.elapsed();
    let received = diffs.load(Ordering::Relaxed) - diffs_before;
    let changes = entries.load(Ordering::Relaxed) - entries_before;
    println!(
        "churn ({}): {} operations ({rounds} rounds) sent in {:.2} s ({:.0}/s); observers got {received} presence_diff frames in {:.2} s ({:.0}/s per observer)",
        if retrack { "re-track" } else { "leave + join + track" },
        total as u64 * rounds,
        churn_sent.as_secs_f64(),
        (total as u64 * rounds) as f64 / churn_sent.as_secs_f64(),
        elapsed.as_secs_f64(),
        received as f64 / NODES as f64 / elapsed.as_secs_f64()
    );
    println!(
        "presence changes (joins + leaves) seen per observer: {:.0} in {:.2} s = {:.0}/s per observer",
        changes as f64 / NODES as f64,
        elapsed.as_secs_f64(),
        changes as f64 / NODES as f64 / elapsed.as_secs_f64()
    );
    println!("convergence after the last churn frame was sent: {:?}", last.map(|_| elapsed.saturating_sub(churn_sent)));
    stop.store(true, Ordering::Relaxed);
    drop(nodes);
    let _ = std::fs::remove_dir_all(&dir);
}
