//! `powa-soak`: a long run against powa-realtime with churn, sampled into a CSV (issue 16).
//!
//! The coordinator (`powa-soak run`) starts worker processes (this binary again, hidden
//! subcommand `__worker`), each a current-thread tokio loop whose connections bind their own
//! 127.x.y.z source addresses (so ephemeral ports never run out under churn). Each worker holds:
//!
//! - **members**: long-lived V2 connections, one room each (`realtime:soak-<room>`, presence
//!   enabled, a few with a Postgres Changes binding). They heartbeat every 25 s, broadcast now and
//!   then (payload `{"p": sender, "s": sequence}`), and check every broadcast and change they
//!   receive for gaps per sender (changes: per row id) — a gap on a connection that stayed open
//!   is a lost delivery;
//! - **churners**: connect, join a random room, track presence, sometimes broadcast, stay about
//!   `--hold-ms`, leave, close, and start again from another source address.
//!
//! Every `--sample-s` the coordinator writes one CSV row: server RSS, descriptors and CPU (from
//! /proc), the workers' counters and rates. At the end it prints a verdict line: memory flat (end
//! RSS within 5 % of the RSS at `--mark-s`) and zero lost deliveries (connections closed as slow
//! consumers are counted apart, and none is expected since every client reads promptly).

#[allow(dead_code)]
mod cli;
#[allow(dead_code)]
mod procfs;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use net::ws::{encode_client_frame, OpCode};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const HELP: &str = "\
powa-soak run [options]            (loopback targets only; see tools/soak.sh)
  --target 127.0.0.1:4000  --token JWT (anon key)  --server-pid PID
  --conns 15000 (members + churners)  --workers 4  --duration-s 1800  --sample-s 10  --mark-s 300
  --churn-per-s 200 (connect/join/track/leave/close cycles per second)  --hold-ms 5000
  --room-size 50  --publish-per-s 300 (member broadcasts per second, all rooms)  --payload 100
  --pg-url URL (Postgres Changes: inserts into public.soak_changes; the server must use the same
  database)  --pg-per-s 20 (rows/s)  --pg-subs 200 (members with a binding)
  --csv FILE (soak.csv)  --summary FILE (summary.json)
Exit status 0 when both verdicts pass, 2 when one fails.
";

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let result = match argv.first().map(String::as_str) {
        Some("run") => cli::Args::parse(&argv[1..]).and_then(|a| run(&a)),
        Some("__worker") => cli::Args::parse(&argv[1..]).and_then(|a| worker_main(&a)),
        Some("help" | "--help" | "-h") => {
            print!("{HELP}");
            Ok(0)
        }
        _ => {
            eprint!("{HELP}");
            Ok(1)
        }
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(error) => {
            eprintln!("powa-soak: {error:#}");
            std::process::exit(1);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Worker
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
struct WorkerConfig {
    index: usize,
    target: SocketAddrV4,
    token: String,
    /// Global index of this worker's first member.
    first_member: usize,
    members: usize,
    churners: usize,
    rooms: usize,
    room_size: usize,
    publish_every: Option<Duration>,
    hold: Duration,
    payload: usize,
    /// Members (global index) below this have a Postgres Changes binding.
    pg_subs: usize,
}

/// Cumulative counters of one worker, printed every second as a `stat` JSON line.
#[derive(Default)]
struct Counters {
    open: Cell<i64>,
    members_open: Cell<i64>,
    connects: Cell<u64>,
    connect_failed: Cell<u64>,
    join_errors: Cell<u64>,
    deliveries: Cell<u64>,
    lost: Cell<u64>,
    reordered: Cell<u64>,
    pg_deliveries: Cell<u64>,
    pg_lost: Cell<u64>,
    slow_closes: Cell<u64>,
    other_closes: Cell<u64>,
    churn_cycles: Cell<u64>,
    tracks: Cell<u64>,
    presence_events: Cell<u64>,
    publishes: Cell<u64>,
    first_error: RefCell<String>,
    /// Per Postgres Changes subscriber: the last row id it saw (for the tail check).
    pg_last: RefCell<HashMap<usize, i64>>,
}

fn add(cell: &Cell<u64>, n: u64) {
    cell.set(cell.get() + n);
}

impl Counters {
    fn error(&self, text: String) {
        let mut first = self.first_error.borrow_mut();
        if first.is_empty() {
            *first = text;
        }
    }

    fn json(&self) -> Value {
        let pg_last = self.pg_last.borrow();
        json!({
            "open": self.open.get(), "members_open": self.members_open.get(),
            "connects": self.connects.get(), "connect_failed": self.connect_failed.get(), "join_errors": self.join_errors.get(),
            "deliveries": self.deliveries.get(), "lost": self.lost.get(), "reordered": self.reordered.get(),
            "pg_deliveries": self.pg_deliveries.get(), "pg_lost": self.pg_lost.get(),
            "pg_subs": pg_last.len(), "pg_last_min": pg_last.values().min().copied().unwrap_or(0),
            "slow_closes": self.slow_closes.get(), "other_closes": self.other_closes.get(),
            "churn_cycles": self.churn_cycles.get(), "tracks": self.tracks.get(), "presence_events": self.presence_events.get(),
            "publishes": self.publishes.get(), "first_error": *self.first_error.borrow(),
        })
    }
}

struct Ctx {
    cfg: WorkerConfig,
    counters: Counters,
    stop: tokio::sync::watch::Receiver<bool>,
    /// Initial connects in flight at once.
    ramp: tokio::sync::Semaphore,
    next_src: Cell<u32>,
}

impl Ctx {
    /// The next source address: 127.<worker+1>.<a>.<b>, b in 1..=250.
    fn src(&self) -> Ipv4Addr {
        let n = self.next_src.get();
        self.next_src.set(n.wrapping_add(1));
        Ipv4Addr::new(127, (1 + self.cfg.index % 250) as u8, ((n / 250) % 250) as u8, (n % 250 + 1) as u8)
    }

    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }
}

/// One client WebSocket on a tokio stream: masked frames out, unmasked frames in.
struct Ws {
    stream: TcpStream,
    buf: Vec<u8>,
    start: usize,
}

enum In {
    Text(Vec<u8>),
    Close(u16),
    Other,
}

impl Ws {
    async fn connect(src: Ipv4Addr, target: SocketAddrV4, token: &str) -> std::io::Result<Ws> {
        let socket = TcpSocket::new_v4()?;
        socket.bind(std::net::SocketAddr::V4(SocketAddrV4::new(src, 0)))?;
        let stream = tokio::time::timeout(Duration::from_secs(10), socket.connect(std::net::SocketAddr::V4(target)))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
        stream.set_nodelay(true)?;
        let mut ws = Ws { stream, buf: Vec::with_capacity(4096), start: 0 };
        let request = format!(
            "GET /realtime/v1/websocket?apikey={token}&vsn=2.0.0 HTTP/1.1\r\nHost: {target}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: cG93YS1zb2FrLWNsaWVudA==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        ws.stream.write_all(request.as_bytes()).await?;
        let head_end = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some(p) = ws.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    return Ok(p + 4);
                }
                let mut chunk = [0u8; 2048];
                let n = ws.stream.read(&mut chunk).await?;
                if n == 0 {
                    return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed during the upgrade"));
                }
                ws.buf.extend_from_slice(&chunk[..n]);
            }
        })
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "upgrade timed out"))??;
        if !ws.buf.starts_with(b"HTTP/1.1 101") {
            let line = String::from_utf8_lossy(&ws.buf[..ws.buf.len().min(80)]).lines().next().unwrap_or("").to_string();
            return Err(std::io::Error::other(format!("upgrade refused: {line}")));
        }
        ws.buf.drain(..head_end);
        Ok(ws)
    }

    async fn send(&mut self, opcode: OpCode, body: &[u8]) -> std::io::Result<()> {
        let mut out = BytesMut::with_capacity(body.len() + 14);
        encode_client_frame(opcode, true, body, [0; 4], &mut out);
        self.stream.write_all(&out).await
    }

    async fn text(&mut self, body: &str) -> std::io::Result<()> {
        self.send(OpCode::Text, body.as_bytes()).await
    }

    /// The next frame (cancel-safe: bytes are kept in `buf` between calls).
    async fn next(&mut self) -> std::io::Result<In> {
        loop {
            if let Some((opcode, header, end)) = server_frame(&self.buf[self.start..]) {
                let payload = self.buf[self.start + header..self.start + end].to_vec();
                self.start += end;
                if self.start > 64 * 1024 || self.start == self.buf.len() {
                    self.buf.drain(..self.start);
                    self.start = 0;
                }
                return Ok(match opcode {
                    0x1 => In::Text(payload),
                    0x8 => In::Close(if payload.len() >= 2 { u16::from_be_bytes([payload[0], payload[1]]) } else { 1005 }),
                    0x9 => {
                        self.send(OpCode::Pong, &payload).await?;
                        In::Other
                    }
                    _ => In::Other,
                });
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed by the server"));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// One server frame at the start of `buf`: (opcode, header length, total length).
fn server_frame(buf: &[u8]) -> Option<(u8, usize, usize)> {
    let (&b0, &b1) = (buf.first()?, buf.get(1)?);
    let (len, header): (usize, usize) = match b1 & 0x7f {
        126 => (u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?]) as usize, 4),
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize, 10),
        n => (n as usize, 2),
    };
    let header = header + if b1 & 0x80 != 0 { 4 } else { 0 };
    (buf.len() >= header.checked_add(len)?).then_some((b0 & 0x0f, header, header + len))
}

fn join_frame(topic: &str, presence_key: &str, pg: bool) -> String {
    let changes = if pg { json!([{"event": "INSERT", "schema": "public", "table": "soak_changes"}]) } else { json!([]) };
    json!(["1", "1", topic, "phx_join", {"config": {"broadcast": {"self": false, "ack": false}, "presence": {"key": presence_key, "enabled": true}, "postgres_changes": changes, "private": false}}]).to_string()
}

/// Waits for the join reply (ref "1"); other frames before it are ignored.
async fn joined(ws: &mut Ws) -> std::io::Result<bool> {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let In::Text(text) = ws.next().await? {
                let v: Value = serde_json::from_slice(&text).unwrap_or(Value::Null);
                if v[3] == "phx_reply" && v[1] == "1" {
                    return Ok(v[4]["status"] == "ok");
                }
            }
        }
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no join reply"))?
}

/// Why a member's connection ended.
enum End {
    Stopped,
    Failed(String),
}

async fn member(ctx: Rc<Ctx>, slot: usize) {
    let global = ctx.cfg.first_member + slot;
    let room = global / ctx.cfg.room_size.max(1) % ctx.cfg.rooms.max(1);
    let topic = format!("realtime:soak-{room}");
    let pg = global < ctx.cfg.pg_subs;
    // Spread the first broadcasts over the period.
    let mut first = true;
    // Connections of this member so far: a reconnected sender starts its sequence again, so
    // receivers key sequences by (sender, epoch).
    let mut epoch: u64 = 0;
    loop {
        if ctx.stopped() {
            return;
        }
        let permit = if first { ctx.ramp.acquire().await.ok() } else { None };
        let ws = Ws::connect(ctx.src(), ctx.cfg.target, &ctx.cfg.token).await;
        let mut ws = match ws {
            Ok(ws) => ws,
            Err(error) => {
                add(&ctx.counters.connect_failed, 1);
                ctx.counters.error(format!("member connect: {error}"));
                drop(permit);
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        add(&ctx.counters.connects, 1);
        let ok = ws.text(&join_frame(&topic, &format!("m{global}"), pg)).await.is_ok() && joined(&mut ws).await.unwrap_or(false);
        drop(permit);
        if !ok {
            add(&ctx.counters.join_errors, 1);
            ctx.counters.error(format!("member {global}: join failed"));
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        ctx.counters.open.set(ctx.counters.open.get() + 1);
        ctx.counters.members_open.set(ctx.counters.members_open.get() + 1);
        let offset = if first { (global as u64 * 7919) % 1000 } else { 0 };
        first = false;
        epoch += 1;
        let end = member_session(&ctx, &mut ws, global, epoch, &topic, Duration::from_millis(offset)).await;
        ctx.counters.open.set(ctx.counters.open.get() - 1);
        ctx.counters.members_open.set(ctx.counters.members_open.get() - 1);
        match end {
            End::Stopped => {
                let _ = ws.send(OpCode::Close, &1000u16.to_be_bytes()).await;
                return;
            }
            End::Failed(why) => {
                ctx.counters.error(format!("member {global}: {why}"));
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

async fn member_session(ctx: &Ctx, ws: &mut Ws, global: usize, epoch: u64, topic: &str, offset: Duration) -> End {
    let c = &ctx.counters;
    let mut stop = ctx.stop.clone();
    let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + Duration::from_secs(25), Duration::from_secs(25));
    let period = ctx.cfg.publish_every.unwrap_or(Duration::from_secs(86_400 * 365));
    let first_publish = tokio::time::Instant::now() + period.mul_f64((offset.as_millis() as f64) / 1000.0);
    let mut publish = tokio::time::interval_at(first_publish, period);
    publish.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let padding = "x".repeat(ctx.cfg.payload.saturating_sub(30));
    let mut seq: u64 = 0;
    let mut next_expected: HashMap<(u64, u64), u64> = HashMap::new();
    let mut last_pg: Option<i64> = None;
    let mut hb = 0u64;
    loop {
        tokio::select! {
            frame = ws.next() => {
                let frame = match frame {
                    Ok(frame) => frame,
                    Err(error) => {
                        add(&c.other_closes, 1);
                        return End::Failed(error.to_string());
                    }
                };
                match frame {
                    In::Text(text) => {
                        let Ok(v) = serde_json::from_slice::<Value>(&text) else { continue };
                        match v[3].as_str().unwrap_or("") {
                            "broadcast" => {
                                add(&c.deliveries, 1);
                                let p = &v[4]["payload"];
                                if let (Some(sender), Some(e), Some(s)) = (p["p"].as_u64(), p["e"].as_u64(), p["s"].as_u64()) {
                                    let expected = next_expected.entry((sender, e)).or_insert(s);
                                    if s > *expected {
                                        add(&c.lost, s - *expected);
                                    } else if s < *expected {
                                        add(&c.reordered, 1);
                                    }
                                    *expected = (*expected).max(s + 1);
                                }
                            }
                            "postgres_changes" => {
                                add(&c.pg_deliveries, 1);
                                if let Some(id) = v[4]["data"]["record"]["id"].as_i64() {
                                    if let Some(last) = last_pg {
                                        if id > last + 1 {
                                            add(&c.pg_lost, (id - last - 1) as u64);
                                        } else if id <= last {
                                            add(&c.reordered, 1);
                                        }
                                    }
                                    last_pg = Some(last_pg.map_or(id, |l| l.max(id)));
                                    c.pg_last.borrow_mut().insert(global, last_pg.unwrap_or(id));
                                }
                            }
                            "presence_diff" | "presence_state" => add(&c.presence_events, 1),
                            "phx_error" | "phx_close" => {
                                add(&c.other_closes, 1);
                                return End::Failed(format!("channel ended: {}", String::from_utf8_lossy(&text)));
                            }
                            _ => {}
                        }
                    }
                    In::Close(code) => {
                        if code == 1008 {
                            add(&c.slow_closes, 1);
                        } else {
                            add(&c.other_closes, 1);
                        }
                        return End::Failed(format!("closed by the server with {code}"));
                    }
                    In::Other => {}
                }
            }
            _ = heartbeat.tick() => {
                hb += 1;
                if ws.text(&format!("[null,\"h{hb}\",\"phoenix\",\"heartbeat\",{{}}]")).await.is_err() {
                    add(&c.other_closes, 1);
                    return End::Failed("heartbeat write failed".into());
                }
            }
            _ = publish.tick(), if ctx.cfg.publish_every.is_some() => {
                let body = json!(["1", null, topic, "broadcast", {"type": "broadcast", "event": "m", "payload": {"p": global, "e": epoch, "s": seq, "x": padding}}]).to_string();
                seq += 1;
                if ws.text(&body).await.is_err() {
                    add(&c.other_closes, 1);
                    return End::Failed("publish write failed".into());
                }
                add(&c.publishes, 1);
            }
            _ = stop.changed() => return End::Stopped,
        }
    }
}

/// Connect, join, track, maybe broadcast, hold, leave, close — again and again.
async fn churner(ctx: Rc<Ctx>, slot: usize) {
    let c = &ctx.counters;
    let mut cycle: u64 = 0;
    let mut stop = ctx.stop.clone();
    // Start spread over one hold so the churn rate is even from the start.
    let spread = ctx.cfg.hold.mul_f64(((slot * 7919) % 1000) as f64 / 1000.0);
    tokio::time::sleep(spread).await;
    while !ctx.stopped() {
        cycle += 1;
        let room = (slot * 31 + cycle as usize * 17) % ctx.cfg.rooms.max(1);
        let topic = format!("realtime:soak-{room}");
        let mut ws = match Ws::connect(ctx.src(), ctx.cfg.target, &ctx.cfg.token).await {
            Ok(ws) => ws,
            Err(error) => {
                add(&c.connect_failed, 1);
                c.error(format!("churner connect: {error}"));
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        add(&c.connects, 1);
        c.open.set(c.open.get() + 1);
        let key = format!("c{}-{slot}-{cycle}", ctx.cfg.index);
        let ok = ws.text(&join_frame(&topic, &key, false)).await.is_ok() && joined(&mut ws).await.unwrap_or(false);
        if ok {
            let track = json!(["1", "2", topic, "presence", {"type": "presence", "event": "track", "payload": {"online_at": cycle}}]).to_string();
            if ws.text(&track).await.is_ok() {
                add(&c.tracks, 1);
            }
            if cycle.is_multiple_of(4) {
                let body = json!(["1", null, topic, "broadcast", {"type": "broadcast", "event": "c", "payload": {"churn": true}}]).to_string();
                if ws.text(&body).await.is_ok() {
                    add(&c.publishes, 1);
                }
            }
            // Hold the channel, reading everything that arrives.
            let jitter = 0.5 + ((slot as u64 * 131 + cycle * 37) % 1000) as f64 / 1000.0;
            let until = tokio::time::Instant::now() + ctx.cfg.hold.mul_f64(jitter);
            loop {
                tokio::select! {
                    frame = ws.next() => {
                        if frame.is_err() {
                            break;
                        }
                    }
                    _ = tokio::time::sleep_until(until) => break,
                    _ = stop.changed() => break,
                }
            }
            let leave = json!(["1", "3", topic, "phx_leave", {}]).to_string();
            let _ = ws.text(&leave).await;
        } else {
            add(&c.join_errors, 1);
            c.error(format!("churner {slot}: join failed"));
        }
        let _ = ws.send(OpCode::Close, &1000u16.to_be_bytes()).await;
        let _ = ws.stream.shutdown().await;
        drop(ws);
        c.open.set(c.open.get() - 1);
        add(&c.churn_cycles, 1);
    }
}

fn worker_main(args: &cli::Args) -> Result<i32> {
    let publish_every_ms: u64 = args.get("publish-every-ms", 0)?;
    let cfg = WorkerConfig {
        index: args.req("index")?,
        target: args.req::<String>("target")?.parse()?,
        token: args.req("token")?,
        first_member: args.req("first-member")?,
        members: args.req("members")?,
        churners: args.req("churners")?,
        rooms: args.req("rooms")?,
        room_size: args.req("room-size")?,
        publish_every: (publish_every_ms > 0).then(|| Duration::from_millis(publish_every_ms)),
        hold: Duration::from_millis(args.req("hold-ms")?),
        payload: args.get("payload", 100)?,
        pg_subs: args.get("pg-subs", 0)?,
    };
    args.finish()?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let ctx = Rc::new(Ctx { cfg: cfg.clone(), counters: Counters::default(), stop: stop_rx, ramp: tokio::sync::Semaphore::new(64), next_src: Cell::new(0) });
        let mut tasks = Vec::new();
        for slot in 0..cfg.members {
            tasks.push(tokio::task::spawn_local(member(Rc::clone(&ctx), slot)));
        }
        for slot in 0..cfg.churners {
            tasks.push(tokio::task::spawn_local(churner(Rc::clone(&ctx), slot)));
        }
        // Commands on stdin: `stop` (or EOF) ends the run.
        let (line_tx, mut line_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        std::thread::spawn(move || {
            let stdin = std::io::stdin();
            for line in stdin.lock().lines() {
                let Ok(line) = line else { break };
                if line_tx.send(line).is_err() {
                    return;
                }
            }
            let _ = line_tx.send("stop".into());
        });
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => println!("stat {}", ctx.counters.json()),
                line = line_rx.recv() => {
                    if line.as_deref().unwrap_or("stop").trim() == "stop" {
                        break;
                    }
                }
            }
        }
        let _ = stop_tx.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(15), futures_join(tasks)).await;
        println!("final {}", ctx.counters.json());
    });
    Ok(0)
}

async fn futures_join(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for task in tasks {
        let _ = task.await;
    }
}

// ---------------------------------------------------------------------------------------------
// Coordinator
// ---------------------------------------------------------------------------------------------

struct WorkerProc {
    child: Child,
    stdin: Option<ChildStdin>,
    latest: Arc<Mutex<Value>>,
    done: Arc<Mutex<Option<Value>>>,
}

fn sum(workers: &[WorkerProc], key: &str) -> i64 {
    workers.iter().map(|w| w.latest.lock().unwrap()[key].as_i64().unwrap_or(0)).sum()
}

fn fd_count(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count() as u64).unwrap_or(0)
}

/// A `psql` session fed on stdin (for the Postgres Changes part).
struct Psql {
    child: Child,
    stdin: ChildStdin,
}

impl Psql {
    fn open(url: &str) -> Result<Psql> {
        let mut child = Command::new("psql")
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", url])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .context("starting psql (needed for --pg-url)")?;
        let stdin = child.stdin.take().context("psql stdin")?;
        Ok(Psql { child, stdin })
    }

    fn exec(&mut self, sql: &str) -> Result<()> {
        writeln!(self.stdin, "{sql}").context("writing to psql")?;
        self.stdin.flush()?;
        Ok(())
    }

    /// Runs `sql` in a separate psql and returns its one-line output.
    fn query(url: &str, sql: &str) -> Result<String> {
        let out = Command::new("psql").args(["-X", "-q", "-At", "-c", sql, url]).output().context("psql")?;
        if !out.status.success() {
            bail!("psql {sql:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

const PG_SETUP: &str = "CREATE TABLE IF NOT EXISTS public.soak_changes (id bigserial PRIMARY KEY, v int NOT NULL); \
GRANT SELECT ON public.soak_changes TO anon, authenticated; \
DO $$ BEGIN \
  IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'supabase_realtime') THEN CREATE PUBLICATION supabase_realtime; END IF; \
  IF NOT EXISTS (SELECT 1 FROM pg_publication_tables WHERE pubname = 'supabase_realtime' AND tablename = 'soak_changes') THEN \
    ALTER PUBLICATION supabase_realtime ADD TABLE public.soak_changes; END IF; \
END $$;";

fn run(args: &cli::Args) -> Result<i32> {
    let target: SocketAddrV4 = args.get("target", "127.0.0.1:4000".to_string())?.parse().context("--target must be IPv4 host:port")?;
    if target.ip().octets()[0] != 127 {
        bail!("--target must be a loopback address (127.0.0.0/8)");
    }
    let token: String = args.req("token")?;
    let server_pid: u32 = args.req("server-pid")?;
    let conns: usize = args.get("conns", 15_000)?;
    let workers_n: usize = args.get("workers", 4)?;
    let duration = Duration::from_secs(args.get("duration-s", 1800)?);
    let sample = Duration::from_secs(args.get("sample-s", 10)?);
    let mark = Duration::from_secs(args.get("mark-s", 300)?);
    let churn_per_s: f64 = args.get("churn-per-s", 200.0)?;
    let hold_ms: u64 = args.get("hold-ms", 5000)?;
    let room_size: usize = args.get("room-size", 50)?;
    let publish_per_s: f64 = args.get("publish-per-s", 300.0)?;
    let payload: usize = args.get("payload", 100)?;
    let pg_url: Option<String> = args.opt("pg-url")?;
    let pg_per_s: u64 = args.get("pg-per-s", 20)?;
    let pg_subs: usize = if pg_url.is_some() { args.get("pg-subs", 200)? } else { 0 };
    let csv_path: String = args.get("csv", "soak.csv".to_string())?;
    let summary_path: String = args.get("summary", "summary.json".to_string())?;
    args.finish()?;
    if workers_n == 0 || conns < workers_n {
        bail!("--conns must be at least --workers");
    }

    // Churners needed for the churn rate: each cycle lasts about one hold plus set-up.
    let churners = ((churn_per_s * (hold_ms as f64 / 1000.0 + 0.05)).ceil() as usize).min(conns / 2);
    let members = conns - churners;
    let rooms = members.div_ceil(room_size.max(1)).max(1);
    let publish_every_ms = if publish_per_s > 0.0 { ((members as f64 / publish_per_s) * 1000.0).round().max(1.0) as u64 } else { 0 };
    eprintln!(
        "powa-soak: {conns} connections ({members} members in {rooms} rooms of {room_size}, {churners} churners ≈ {churn_per_s}/s), {workers_n} workers, {}s, member broadcasts {publish_per_s}/s (each member every {publish_every_ms} ms), Postgres Changes {}",
        duration.as_secs(),
        if pg_url.is_some() { format!("{pg_per_s} rows/s to {pg_subs} subscribers") } else { "off".into() }
    );

    let mut pg = match &pg_url {
        Some(url) => {
            let mut psql = Psql::open(url)?;
            psql.exec(PG_SETUP)?;
            Some(psql)
        }
        None => None,
    };

    let exe = std::env::current_exe()?;
    let mut workers: Vec<WorkerProc> = Vec::new();
    let (mut member_base, mut churn_left) = (0usize, churners);
    for w in 0..workers_n {
        let m = members / workers_n + usize::from(w < members % workers_n);
        let ch = churn_left / (workers_n - w);
        churn_left -= ch;
        let mut child = Command::new(&exe)
            .arg("__worker")
            .args(["--index", &w.to_string(), "--target", &target.to_string(), "--token", &token])
            .args(["--first-member", &member_base.to_string(), "--members", &m.to_string(), "--churners", &ch.to_string()])
            .args(["--rooms", &rooms.to_string(), "--room-size", &room_size.to_string(), "--publish-every-ms", &publish_every_ms.to_string()])
            .args(["--hold-ms", &hold_ms.to_string(), "--payload", &payload.to_string(), "--pg-subs", &pg_subs.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting a worker")?;
        member_base += m;
        let stdout = child.stdout.take().context("worker stdout")?;
        let latest = Arc::new(Mutex::new(json!({})));
        let done = Arc::new(Mutex::new(None));
        let (l, d) = (Arc::clone(&latest), Arc::clone(&done));
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("stat ") {
                    if let Ok(v) = serde_json::from_str(rest) {
                        *l.lock().unwrap() = v;
                    }
                } else if let Some(rest) = line.strip_prefix("final ") {
                    if let Ok(v) = serde_json::from_str::<Value>(rest) {
                        *l.lock().unwrap() = v.clone();
                        *d.lock().unwrap() = Some(v);
                    }
                }
            }
        });
        let stdin = child.stdin.take();
        workers.push(WorkerProc { child, stdin, latest, done });
    }

    let mut csv = std::fs::File::create(&csv_path).with_context(|| format!("creating {csv_path}"))?;
    writeln!(
        csv,
        "t_s,rss_kib,fds,cpu_pct,open_conns,members_open,connects,connect_failed,join_errors,churn_cycles,churn_per_s,deliveries,deliveries_per_s,lost,reordered,pg_inserted,pg_deliveries,pg_lost,slow_closes,other_closes,tracks,presence_events,publishes"
    )?;
    let started = Instant::now();
    let (mut last_t, mut last_cpu) = (0.0f64, procfs::cpu_seconds(server_pid).unwrap_or(0.0));
    let (mut last_deliveries, mut last_churn) = (0i64, 0i64);
    let mut pg_inserted: i64 = 0;
    let mut next_sample = sample;
    let mut next_insert = Duration::ZERO;
    let mut rows: Vec<(f64, u64)> = Vec::new();
    let mut write_row = |csv: &mut std::fs::File, workers: &[WorkerProc], pg_inserted: i64, rows: &mut Vec<(f64, u64)>| -> Result<()> {
        let t = started.elapsed().as_secs_f64();
        let rss = procfs::rss_kib(server_pid).unwrap_or(0);
        let cpu = procfs::cpu_seconds(server_pid).unwrap_or(last_cpu);
        let dt = (t - last_t).max(1e-3);
        let cpu_pct = (cpu - last_cpu) / dt * 100.0;
        let deliveries = sum(workers, "deliveries") + sum(workers, "pg_deliveries");
        let churn = sum(workers, "churn_cycles");
        writeln!(
            csv,
            "{:.1},{rss},{},{cpu_pct:.1},{},{},{},{},{},{churn},{:.1},{deliveries},{:.1},{},{},{pg_inserted},{},{},{},{},{},{},{}",
            t,
            fd_count(server_pid),
            sum(workers, "open"),
            sum(workers, "members_open"),
            sum(workers, "connects"),
            sum(workers, "connect_failed"),
            sum(workers, "join_errors"),
            (churn - last_churn) as f64 / dt,
            (deliveries - last_deliveries) as f64 / dt,
            sum(workers, "lost"),
            sum(workers, "reordered"),
            sum(workers, "pg_deliveries"),
            sum(workers, "pg_lost"),
            sum(workers, "slow_closes"),
            sum(workers, "other_closes"),
            sum(workers, "tracks"),
            sum(workers, "presence_events"),
            sum(workers, "publishes"),
        )?;
        csv.flush()?;
        eprintln!(
            "t={t:>6.0}s rss={:.1} MiB fds={} cpu={cpu_pct:.0}% open={} churn={:.0}/s deliveries={:.0}/s lost={} pg={}/{} slow={} closes={}",
            rss as f64 / 1024.0,
            fd_count(server_pid),
            sum(workers, "open"),
            (churn - last_churn) as f64 / dt,
            (deliveries - last_deliveries) as f64 / dt,
            sum(workers, "lost"),
            sum(workers, "pg_deliveries"),
            pg_inserted,
            sum(workers, "slow_closes"),
            sum(workers, "other_closes"),
        );
        rows.push((t, rss));
        (last_t, last_cpu, last_deliveries, last_churn) = (t, cpu, deliveries, churn);
        Ok(())
    };
    while started.elapsed() < duration {
        let now = started.elapsed();
        if let Some(psql) = pg.as_mut() {
            if now >= next_insert {
                // Ten batches a second.
                let rows_now = (pg_per_s / 10).max(1);
                psql.exec(&format!("INSERT INTO public.soak_changes (v) SELECT g FROM generate_series(1, {rows_now}) g;"))?;
                pg_inserted += rows_now as i64;
                next_insert += Duration::from_millis(100);
            }
        }
        if now >= next_sample {
            write_row(&mut csv, &workers, pg_inserted, &mut rows)?;
            next_sample += sample;
        }
        std::thread::sleep(Duration::from_millis(if pg.is_some() { 20 } else { 100 }));
    }
    // Let the last changes arrive (bounded: 20 s), then stop the workers and take the final
    // counts.
    std::thread::sleep(Duration::from_secs(2));
    let pg_last_min = |workers: &[WorkerProc]| workers.iter().map(|w| w.latest.lock().unwrap()["pg_last_min"].as_i64().unwrap_or(0)).filter(|v| *v > 0).min().unwrap_or(0);
    let pg_max_id = match &pg_url {
        Some(url) => {
            let max = Psql::query(url, "SELECT coalesce(max(id), 0) FROM public.soak_changes")?.parse::<i64>().unwrap_or(0);
            let deadline = Instant::now() + Duration::from_secs(20);
            while pg_last_min(&workers) < max && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(200));
            }
            max
        }
        None => 0,
    };
    write_row(&mut csv, &workers, pg_inserted, &mut rows)?;
    for w in &mut workers {
        if let Some(mut stdin) = w.stdin.take() {
            let _ = writeln!(stdin, "stop");
        }
    }
    for w in &mut workers {
        let deadline = Instant::now() + Duration::from_secs(30);
        while w.done.lock().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = w.child.kill();
        let _ = w.child.wait();
    }
    if let Some(mut psql) = pg.take() {
        let _ = psql.exec("\\q");
        let _ = psql.child.wait();
    }

    // Verdicts.
    let mark_rss = rows.iter().min_by_key(|(t, _)| ((t - mark.as_secs_f64()).abs() * 1000.0) as u64).map(|r| r.1).unwrap_or(0);
    let end_rss = rows.last().map(|r| r.1).unwrap_or(0);
    let growth = if mark_rss > 0 { end_rss as f64 / mark_rss as f64 - 1.0 } else { f64::NAN };
    let memory_ok = mark_rss > 0 && growth <= 0.05;
    let (lost, pg_lost, deliveries) = (sum(&workers, "lost"), sum(&workers, "pg_lost"), sum(&workers, "deliveries"));
    let pg_tail_lost = if pg_url.is_some() { (pg_max_id - pg_last_min(&workers)).max(0) } else { 0 };
    let delivered_ok = lost == 0 && pg_lost == 0 && pg_tail_lost == 0 && deliveries > 0 && (pg_url.is_none() || sum(&workers, "pg_deliveries") > 0);
    let first_error = workers.iter().map(|w| w.latest.lock().unwrap()["first_error"].as_str().unwrap_or("").to_string()).find(|e| !e.is_empty()).unwrap_or_default();
    let summary = json!({
        "conns": conns, "members": members, "churners": churners, "rooms": rooms, "workers": workers_n,
        "duration_s": duration.as_secs(), "samples": rows.len(), "mark_s": mark.as_secs(),
        "rss_mark_kib": mark_rss, "rss_end_kib": end_rss, "rss_peak_kib": rows.iter().map(|r| r.1).max().unwrap_or(0), "rss_growth": growth,
        "deliveries": deliveries, "lost": lost, "reordered": sum(&workers, "reordered"),
        "pg_inserted": pg_inserted, "pg_max_id": pg_max_id, "pg_deliveries": sum(&workers, "pg_deliveries"), "pg_lost": pg_lost, "pg_tail_lost": pg_tail_lost,
        "slow_closes": sum(&workers, "slow_closes"), "other_closes": sum(&workers, "other_closes"),
        "connects": sum(&workers, "connects"), "connect_failed": sum(&workers, "connect_failed"), "join_errors": sum(&workers, "join_errors"),
        "churn_cycles": sum(&workers, "churn_cycles"), "tracks": sum(&workers, "tracks"), "publishes": sum(&workers, "publishes"),
        "first_error": first_error,
        "memory_verdict": if memory_ok { "pass" } else { "fail" },
        "delivery_verdict": if delivered_ok { "pass" } else { "fail" },
    });
    std::fs::write(&summary_path, serde_json::to_string_pretty(&summary)? + "\n").with_context(|| format!("writing {summary_path}"))?;
    println!(
        "VERDICT memory={} (RSS {:.1} MiB at {}s, {:.1} MiB at the end, {:+.1} %) deliveries={} ({deliveries} broadcasts, lost {lost}; Postgres changes {} of {pg_inserted} rows × subscribers, lost {pg_lost}, tail {pg_tail_lost}; slow-consumer closes {}, other closes {})",
        if memory_ok { "pass" } else { "fail" },
        mark_rss as f64 / 1024.0,
        mark.as_secs(),
        end_rss as f64 / 1024.0,
        growth * 100.0,
        if delivered_ok { "pass" } else { "fail" },
        sum(&workers, "pg_deliveries"),
        sum(&workers, "slow_closes"),
        sum(&workers, "other_closes"),
    );
    Ok(if memory_ok && delivered_ok { 0 } else { 2 })
}
