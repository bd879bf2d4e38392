//! A soak worker process: members (long-lived, gap-checking receivers and senders) and
//! churners (connect → join → track → leave → close, again and again) on one current-thread
//! tokio runtime; cumulative counters printed as a `stat` JSON line every second.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io::BufRead;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::rc::Rc;
use std::time::Duration;

use anyhow::Result;
use net::ws::OpCode;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use crate::cli;
use crate::ws::{In, Ws};

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

/// What a member has received so far on its current connection: the next sequence expected
/// per (sender, sender's connection), and the last row id of Postgres Changes.
#[derive(Default)]
struct Received {
    next_expected: HashMap<(u64, u64), u64>,
    last_pg: Option<i64>,
}

impl Received {
    /// Counts one frame and checks it for gaps; `Some` when the channel ended.
    fn frame(&mut self, c: &Counters, global: usize, frame: In) -> Option<End> {
        match frame {
            In::Text(text) => {
                let v = serde_json::from_slice::<Value>(&text).ok()?;
                match v[3].as_str().unwrap_or("") {
                    "broadcast" => self.broadcast(c, &v[4]["payload"]),
                    "postgres_changes" => self.change(c, global, v[4]["data"]["record"]["id"].as_i64()),
                    "presence_diff" | "presence_state" => add(&c.presence_events, 1),
                    "phx_error" | "phx_close" => {
                        add(&c.other_closes, 1);
                        return Some(End::Failed(format!("channel ended: {}", String::from_utf8_lossy(&text))));
                    }
                    _ => {}
                }
                None
            }
            In::Close(code) => {
                add(if code == 1008 { &c.slow_closes } else { &c.other_closes }, 1);
                Some(End::Failed(format!("closed by the server with {code}")))
            }
            In::Other => None,
        }
    }

    fn broadcast(&mut self, c: &Counters, p: &Value) {
        add(&c.deliveries, 1);
        let (Some(sender), Some(e), Some(s)) = (p["p"].as_u64(), p["e"].as_u64(), p["s"].as_u64()) else { return };
        let expected = self.next_expected.entry((sender, e)).or_insert(s);
        if s > *expected {
            add(&c.lost, s - *expected);
        } else if s < *expected {
            add(&c.reordered, 1);
        }
        *expected = (*expected).max(s + 1);
    }

    fn change(&mut self, c: &Counters, global: usize, id: Option<i64>) {
        add(&c.pg_deliveries, 1);
        let Some(id) = id else { return };
        if let Some(last) = self.last_pg {
            if id > last + 1 {
                add(&c.pg_lost, (id - last - 1) as u64);
            } else if id <= last {
                add(&c.reordered, 1);
            }
        }
        let last = self.last_pg.map_or(id, |l| l.max(id));
        self.last_pg = Some(last);
        c.pg_last.borrow_mut().insert(global, last);
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
    let (mut seq, mut hb) = (0u64, 0u64);
    let mut received = Received::default();
    let failed = |why: &str| {
        add(&c.other_closes, 1);
        End::Failed(why.to_string())
    };
    loop {
        tokio::select! {
            frame = ws.next() => {
                match frame {
                    Ok(frame) => {
                        if let Some(end) = received.frame(c, global, frame) {
                            return end;
                        }
                    }
                    Err(error) => return failed(&error.to_string()),
                }
            }
            _ = heartbeat.tick() => {
                hb += 1;
                if ws.text(&format!("[null,\"h{hb}\",\"phoenix\",\"heartbeat\",{{}}]")).await.is_err() {
                    return failed("heartbeat write failed");
                }
            }
            _ = publish.tick(), if ctx.cfg.publish_every.is_some() => {
                let body = json!(["1", null, topic, "broadcast", {"type": "broadcast", "event": "m", "payload": {"p": global, "e": epoch, "s": seq, "x": padding}}]).to_string();
                seq += 1;
                if ws.text(&body).await.is_err() {
                    return failed("publish write failed");
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

pub(crate) fn worker_main(args: &cli::Args) -> Result<i32> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn text(value: Value) -> In {
        In::Text(value.to_string().into_bytes())
    }

    #[test]
    fn gaps_in_sequences_and_row_ids_count_as_lost() {
        let c = Counters::default();
        let mut r = Received::default();
        for s in [0u64, 1, 3, 2, 4] {
            assert!(r.frame(&c, 7, text(json!(["1", null, "realtime:soak-0", "broadcast", {"payload": {"p": 1, "e": 1, "s": s}}]))).is_none());
        }
        // A reconnected sender (new epoch) starts again at 0 without a gap.
        assert!(r.frame(&c, 7, text(json!(["1", null, "realtime:soak-0", "broadcast", {"payload": {"p": 1, "e": 2, "s": 0}}]))).is_none());
        assert_eq!((c.deliveries.get(), c.lost.get(), c.reordered.get()), (6, 1, 1));
        for id in [10i64, 11, 14] {
            r.frame(&c, 7, text(json!(["1", null, "realtime:soak-0", "postgres_changes", {"data": {"record": {"id": id}}}])));
        }
        assert_eq!((c.pg_deliveries.get(), c.pg_lost.get()), (3, 2));
        assert_eq!(c.pg_last.borrow().get(&7), Some(&14));
        assert!(matches!(r.frame(&c, 7, In::Close(1008)), Some(End::Failed(_))));
        assert_eq!(c.slow_closes.get(), 1);
    }
}
