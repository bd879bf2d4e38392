//! The coordinator: workloads W1 (fan-out), W2 (rooms), W3 (join storm) and W7 (idle memory).
//! Human-readable progress goes to stderr; one JSON line per run goes to stdout (and is
//! appended to `--json-out` when given).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::cli::Args;
use crate::hist::Hist;
use crate::pool::{field_hist, field_u64, fields, Pool};
use crate::procfs::{self, mono_ns};
use crate::wire::Proto;

/// Options every workload shares.
pub struct Common {
    target: SocketAddrV4,
    /// W1 across cluster nodes: the publisher connects here instead of `target`.
    publish_target: Option<SocketAddrV4>,
    proto: Proto,
    vsn: String,
    binary: bool,
    token: String,
    server_pids: Vec<u32>,
    src_first: u8,
    src_count: u8,
    per_worker: usize,
    json_out: Option<String>,
    label: String,
    heartbeat: u64,
    read_delay_us: u64,
    payload: usize,
    round: u64,
}

impl Common {
    pub fn parse(args: &Args) -> Result<Common> {
        let target: String = args.get("target", "127.0.0.1:4000".to_string())?;
        let target: SocketAddrV4 = target.parse().context("--target must be IPv4 host:port")?;
        if target.ip().octets()[0] != 127 {
            bail!("--target must be a loopback address (127.0.0.0/8)");
        }
        let publish_target: Option<String> = args.opt("publish-target")?;
        let publish_target: Option<SocketAddrV4> = publish_target.map(|t| t.parse().context("--publish-target must be IPv4 host:port")).transpose()?;
        if publish_target.is_some_and(|t| t.ip().octets()[0] != 127) {
            bail!("--publish-target must be a loopback address (127.0.0.0/8)");
        }
        let proto_name: String = args.get("proto", "phoenix".to_string())?;
        let vsn: String = args.get("vsn", "2".to_string())?;
        let binary = args.flag("binary");
        let proto = Proto::parse(&proto_name, &vsn, binary).map_err(anyhow::Error::msg)?;
        let token: String = args.get("token", String::new())?;
        if proto.is_phoenix() && token.is_empty() {
            bail!("--token is required for --proto phoenix (JWT_SECRET=… powa-realtime token --role anon)");
        }
        let pids: String = args.get("server-pid", String::new())?;
        let server_pids = pids.split(',').filter(|s| !s.is_empty()).map(|s| s.trim().parse()).collect::<Result<Vec<u32>, _>>().context("--server-pid")?;
        let src_first: u8 = args.get("src-first", 2)?;
        let src_count: u8 = args.get("src-count", 19)?;
        if src_first < 1 || src_count == 0 || src_first as usize + src_count as usize > 255 {
            bail!("bad --src-first/--src-count");
        }
        Ok(Common {
            target,
            publish_target,
            proto,
            vsn,
            binary,
            token,
            server_pids,
            src_first,
            src_count,
            per_worker: args.get("per-worker", 5000)?,
            json_out: args.opt("json-out")?,
            label: args.get("label", String::new())?,
            heartbeat: args.get("heartbeat", 25)?,
            read_delay_us: args.get("read-delay-us", 0)?,
            payload: args.get("payload", 100)?,
            round: args.get("round", 1)?,
        })
    }

    fn src(&self, worker: usize) -> Ipv4Addr {
        Ipv4Addr::new(127, 0, 0, self.src_first + (worker % self.src_count as usize) as u8)
    }

    /// Arguments of one worker.
    #[allow(clippy::too_many_arguments)]
    fn worker_args(&self, worker: usize, plan: &str, conns: usize, base: usize, concurrency: usize, fanout: u64, group: usize, topic_each: bool) -> Vec<String> {
        let target = match (plan, self.publish_target) {
            ("pub", Some(publish)) => publish,
            _ => self.target,
        };
        let mut a: Vec<String> = vec![
            "--target".into(),
            target.to_string(),
            "--src".into(),
            self.src(worker).to_string(),
            "--proto".into(),
            match self.proto {
                Proto::Phoenix { .. } => "phoenix".into(),
                Proto::Raw => "raw".into(),
                Proto::Nchan => "nchan".into(),
            },
            "--vsn".into(),
            self.vsn.clone(),
            "--plan".into(),
            plan.into(),
            "--conns".into(),
            conns.to_string(),
            "--base".into(),
            base.to_string(),
            "--payload".into(),
            self.payload.to_string(),
            "--concurrency".into(),
            concurrency.to_string(),
            "--heartbeat".into(),
            self.heartbeat.to_string(),
            "--fanout".into(),
            fanout.to_string(),
            "--group".into(),
            group.to_string(),
            "--read-delay-us".into(),
            self.read_delay_us.to_string(),
        ];
        if !self.token.is_empty() {
            a.push("--token".into());
            a.push(self.token.clone());
        }
        if self.binary {
            a.push("--binary".into());
        }
        if topic_each {
            a.push("--topic-each".into());
        }
        a
    }

    fn server_cpu(&self) -> f64 {
        procfs::cpu_seconds_all(&self.server_pids)
    }

    fn server_rss(&self) -> u64 {
        procfs::rss_kib_all(&self.server_pids)
    }

    fn base_json(&self, workload: &str) -> Value {
        let (cores, kernel, model) = procfs::machine();
        // The command line, with the token elided.
        let mut argv: Vec<String> = Vec::new();
        let mut hide = false;
        for arg in std::env::args() {
            argv.push(if hide { "$TOKEN".to_string() } else { arg.clone() });
            hide = arg == "--token";
        }
        if let Some(first) = argv.first_mut() {
            *first = "powa-load".into();
        }
        json!({
            "workload": workload,
            "label": self.label,
            "round": self.round,
            "argv": argv.join(" "),
            "proto": self.proto.name(),
            "target": self.target.to_string(),
            "payload_bytes": self.payload,
            "machine": {"nproc": cores, "kernel": kernel, "cpu": model},
            "unix_time": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        })
    }

    fn output(&self, value: &Value) -> Result<()> {
        let line = serde_json::to_string(value)?;
        println!("{line}");
        if let Some(path) = &self.json_out {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).with_context(|| format!("opening {path}"))?;
            writeln!(f, "{line}")?;
        }
        Ok(())
    }
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

fn lat_json(h: &Hist) -> Value {
    json!({"p50_ms": ms(h.quantile(0.5)), "p99_ms": ms(h.quantile(0.99)), "p999_ms": ms(h.quantile(0.999)), "max_ms": ms(h.max()), "samples": h.count()})
}

/// Splits `total` connections into chunks of at most `per` (each a multiple of `unit`).
fn split(total: usize, per: usize, unit: usize) -> Vec<usize> {
    let per = (per / unit).max(1) * unit;
    let mut out = Vec::new();
    let mut left = total;
    let workers = total.div_ceil(per).max(1);
    // Spread evenly rather than filling the first workers.
    for w in 0..workers {
        let units_left = left / unit;
        let share = units_left.div_ceil(workers - w) * unit;
        let share = share.min(left);
        out.push(share);
        left -= share;
    }
    out
}

struct Connected {
    ok: u64,
    failed: u64,
    rate: f64,
    upgrade: Hist,
    join: Hist,
    total: Hist,
    first_error: String,
    seconds: f64,
}

/// Sends `connect` to the given workers and waits until each reported `ready`.
fn connect(pool: &mut Pool, workers: &[usize], timeout: Duration) -> Result<Connected> {
    for &w in workers {
        pool.send(w, "connect")?;
    }
    let mut c = Connected { ok: 0, failed: 0, rate: 0.0, upgrade: Hist::new(), join: Hist::new(), total: Hist::new(), first_error: String::new(), seconds: 0.0 };
    let (mut first, mut last) = (u64::MAX, 0u64);
    for &w in workers {
        let line = pool.wait(w, "ready", timeout)?;
        let f = fields(&line);
        c.ok += field_u64(&f, "ok")?;
        c.failed += field_u64(&f, "failed")?;
        first = first.min(field_u64(&f, "first")?);
        last = last.max(field_u64(&f, "last")?);
        c.upgrade.merge(&field_hist(&f, "hu")?);
        c.join.merge(&field_hist(&f, "hj")?);
        c.total.merge(&field_hist(&f, "ht")?);
        if c.first_error.is_empty() && f.get("err").is_some_and(|e| e != "-") {
            c.first_error = f["err"].clone();
        }
    }
    c.seconds = last.saturating_sub(first) as f64 / 1e9;
    c.rate = if c.seconds > 0.0 { c.ok as f64 / c.seconds } else { 0.0 };
    Ok(c)
}

fn connected_json(c: &Connected) -> Value {
    json!({
        "ok": c.ok, "failed": c.failed, "seconds": c.seconds, "per_s": c.rate,
        "first_error": c.first_error,
        "upgrade_latency": lat_json(&c.upgrade), "join_latency": lat_json(&c.join), "total_latency": lat_json(&c.total),
    })
}

fn run_hook(cmd: &Option<String>) -> Result<()> {
    if let Some(cmd) = cmd {
        let status = std::process::Command::new("sh").arg("-c").arg(cmd).status().context("running hook")?;
        if !status.success() {
            eprintln!("hook {cmd:?} exited with {status}");
        }
    }
    Ok(())
}

/// Result of one publish step.
struct Step {
    k: u64,
    pub_rate: f64,
    sent: u64,
    expected: u64,
    recv: u64,
    recv_final: u64,
    gaps: u64,
    reorder: u64,
    closed: u64,
    close_reason: String,
    bytes: u64,
    deliveries_per_s: f64,
    hist: Hist,
    server_cpu: f64,
    server_util: f64,
    loadgen_util: f64,
    wall: f64,
    /// Busy fraction per CPU (all processes, including softirq) over the step.
    cpu_busy: Vec<f64>,
    /// Growth of latency per second of sending (backlog indicator).
    slope: f64,
    /// No loss, nothing closed, p99 under the SLO.
    pass: bool,
    /// Kept up: no loss, nothing closed, ≥ 95 % of the offered rate delivered, p99 under the
    /// loose bound (the server is not building a backlog).
    kept_up: bool,
}

impl Step {
    fn json(&self) -> Value {
        json!({
            "step": self.k, "publish_rate": self.pub_rate, "sent": self.sent, "expected": self.expected,
            "received": self.recv, "received_late": self.recv_final - self.recv, "lost": self.expected.saturating_sub(self.recv_final),
            "gaps": self.gaps, "reordered": self.reorder, "closed": self.closed, "close_reason": self.close_reason,
            "deliveries_per_s": self.deliveries_per_s, "bytes_per_delivery": if self.recv > 0 { self.bytes as f64 / self.recv as f64 } else { 0.0 },
            "latency": lat_json(&self.hist),
            "server_cpu_s": self.server_cpu, "server_cores": self.server_util,
            "server_cpu_s_per_million": if self.recv > 0 { self.server_cpu / self.recv as f64 * 1e6 } else { 0.0 },
            "loadgen_cores": self.loadgen_util, "wall_s": self.wall, "cpu_busy": self.cpu_busy, "latency_slope": self.slope, "pass": self.pass, "kept_up": self.kept_up,
        })
    }

    fn line(&self) -> String {
        format!(
            "step {:>3}  publish {:>9.1}/s  delivered {:>10.0}/s  lost {:>7}  late {:>6}  p50 {:>7.2} ms  p99 {:>7.2} ms  p99.9 {:>7.2} ms  slope {:+.3}  server {:.2} cores  loadgen {:.2} cores  cpus busy {}  {}",
            self.k,
            self.pub_rate,
            self.deliveries_per_s,
            self.expected.saturating_sub(self.recv_final),
            self.recv_final - self.recv,
            ms(self.hist.quantile(0.5)),
            ms(self.hist.quantile(0.99)),
            ms(self.hist.quantile(0.999)),
            self.slope,
            self.server_util,
            self.loadgen_util,
            self.cpu_busy.iter().map(|b| format!("{:.0}%", b * 100.0)).collect::<Vec<_>>().join("/"),
            if self.pass {
                "PASS"
            } else if self.kept_up {
                "slow"
            } else {
                "FAIL"
            }
        )
    }
}

struct StepPlan {
    /// (worker, rate) pairs that publish.
    publishers: Vec<(usize, f64)>,
    receivers: Vec<usize>,
    duration_ms: u64,
    drain_ms: u64,
    slo_p99_ms: f64,
    loose_p99_ms: f64,
}

fn count_all(pool: &mut Pool, receivers: &[usize], k: u64) -> Result<(u64, u64)> {
    let answers = pool.ask(receivers, &format!("count {k}"), &format!("count {k} "), Duration::from_secs(30))?;
    let mut recv = 0;
    let mut closed = 0;
    for a in answers {
        let w: Vec<&str> = a.split_whitespace().collect();
        recv += w.get(2).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        closed += w.get(3).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    }
    Ok((recv, closed))
}

fn run_step(common: &Common, pool: &mut Pool, plan: &StepPlan, k: u64) -> Result<Step> {
    let cpu0 = common.server_cpu();
    let lg0 = procfs::cpu_seconds_all(&pool.pids);
    let jiffies0 = procfs::cpu_jiffies();
    let t0 = mono_ns();
    let started = Instant::now();
    for &(w, rate) in &plan.publishers {
        pool.send(w, &format!("pub {k} {rate} {}", plan.duration_ms))?;
    }
    let (mut sent, mut expected) = (0u64, 0u64);
    for &(w, _) in &plan.publishers {
        let line = pool.wait(w, &format!("sent {k} "), Duration::from_millis(plan.duration_ms + 60_000))?;
        let v: Vec<u64> = line.split_whitespace().skip(2).filter_map(|x| x.parse().ok()).collect();
        sent += v.first().copied().unwrap_or(0);
        expected += v.get(1).copied().unwrap_or(0);
    }
    // Drain: wait until every expected delivery arrived or the drain time is over.
    let deadline = Instant::now() + Duration::from_millis(plan.drain_ms);
    loop {
        let (recv, closed) = count_all(pool, &plan.receivers, k)?;
        if recv >= expected || closed > 0 || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu1 = common.server_cpu();
    let lg1 = procfs::cpu_seconds_all(&pool.pids);
    let cpu_busy = procfs::cpu_busy(&jiffies0, &procfs::cpu_jiffies());
    let answers = pool.ask(&plan.receivers, &format!("report {k}"), &format!("report {k} "), Duration::from_secs(30))?;
    let mut step = Step {
        k,
        pub_rate: plan.publishers.iter().map(|p| p.1).sum(),
        sent,
        expected,
        recv: 0,
        recv_final: 0,
        gaps: 0,
        reorder: 0,
        closed: 0,
        close_reason: String::new(),
        bytes: 0,
        deliveries_per_s: 0.0,
        hist: Hist::new(),
        server_cpu: cpu1 - cpu0,
        server_util: (cpu1 - cpu0) / wall,
        loadgen_util: (lg1 - lg0) / wall,
        wall,
        cpu_busy,
        slope: 0.0,
        pass: false,
        kept_up: false,
    };
    let mut last = 0u64;
    let mut first = u64::MAX;
    let mut slope = 0.0f64;
    for a in &answers {
        let f = fields(a);
        step.recv += field_u64(&f, "recv")?;
        step.bytes += field_u64(&f, "bytes")?;
        step.gaps += field_u64(&f, "gaps")?;
        step.reorder += field_u64(&f, "reorder")?;
        step.closed += field_u64(&f, "closed")?;
        last = last.max(field_u64(&f, "last")?);
        slope = slope.max(f.get("slope").and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0));
        let fst = field_u64(&f, "first")?;
        if fst > 0 {
            first = first.min(fst);
        }
        if let Some(c) = f.get("close").filter(|c| *c != "-") {
            step.close_reason = c.clone();
        }
        step.hist.merge(&field_hist(&f, "h")?);
    }
    // Messages were published over `publish_span`. If the server keeps up, latency does not
    // depend on when a message was sent; if it delivers only a fraction r of the offered rate,
    // latency grows by (1/r − 1) s per second of sending. The slope of the least-squares fit of
    // latency against send time (the largest over the receiving workers) gives r.
    let _ = (t0, first, last);
    let pub_rate: f64 = plan.publishers.iter().map(|p| p.1).sum();
    let publishers = plan.publishers.len().max(1) as f64;
    let per_pub = sent as f64 / publishers;
    let publish_span = ((per_pub - 1.0).max(1.0) / (pub_rate / publishers)).max(1e-3);
    step.slope = slope;
    step.deliveries_per_s = step.recv as f64 / publish_span / (1.0 + slope.max(0.0));
    step.recv_final = step.recv;
    let clean = step.recv >= expected && step.closed == 0 && step.gaps == 0;
    let p99 = ms(step.hist.quantile(0.99));
    step.pass = clean && p99 < plan.slo_p99_ms && slope < 0.05;
    step.kept_up = clean && p99 < plan.loose_p99_ms && slope < 0.05;
    if step.recv < expected && step.closed == 0 {
        // Let the backlog clear before the next step; count what arrives late.
        let quiet = Instant::now() + Duration::from_secs(20);
        let mut prev = step.recv;
        let mut stable_since = Instant::now();
        while Instant::now() < quiet {
            std::thread::sleep(Duration::from_millis(100));
            let (recv, _) = count_all(pool, &plan.receivers, k)?;
            if recv != prev {
                prev = recv;
                stable_since = Instant::now();
            } else if stable_since.elapsed() >= Duration::from_millis(1000) || recv >= expected {
                break;
            }
        }
        step.recv_final = prev;
    }
    Ok(step)
}

// ---------------------------------------------------------------------------------------------
// W1: fan-out 1 → N

pub fn fanout(args: &Args) -> Result<()> {
    let common = Common::parse(args)?;
    let subs: usize = args.get("subs", 1000)?;
    let step_ms: u64 = args.get("step-ms", 2000)?;
    let drain_ms: u64 = args.get("drain-ms", 2000)?;
    let start: f64 = args.get("start", 50_000.0)?;
    let max_steps: u64 = args.get("max-steps", 14)?;
    let slo: f64 = args.get("slo-p99-ms", 50.0)?;
    let loose: f64 = args.get("loose-p99-ms", 500.0)?;
    let factor: f64 = args.get("factor", 2.0)?;
    let fixed_rate: Option<f64> = args.opt("rate")?;
    let fixed_count: Option<u64> = args.opt("count")?;
    let fixed_steps: Option<String> = args.opt("rates")?;
    let no_half = args.flag("no-half");
    let hook_before: Option<String> = args.opt("exec-before")?;
    let hook_after: Option<String> = args.opt("exec-after")?;
    let concurrency: usize = args.get("concurrency", 200)?;
    args.finish()?;
    if subs == 0 {
        bail!("--subs must be > 0");
    }

    let shares = split(subs, common.per_worker, 1);
    let mut lists = Vec::new();
    let mut base = 0;
    for (w, &n) in shares.iter().enumerate() {
        lists.push(common.worker_args(w, "sub", n, base, concurrency, 0, 0, false));
        base += n;
    }
    let pub_worker = lists.len();
    lists.push(common.worker_args(pub_worker, "pub", 1, 0, 1, subs as u64, 0, false));
    eprintln!(
        "W1 fan-out: {} subscribers ({} workers) + 1 publisher, {} B payload, proto {}, target {}",
        subs,
        shares.len(),
        common.payload,
        common.proto.name(),
        common.target
    );
    let rss_before = common.server_rss();
    let mut pool = Pool::spawn(lists)?;
    let receivers: Vec<usize> = (0..pub_worker).collect();
    let c = connect(&mut pool, &receivers, Duration::from_secs(300))?;
    eprintln!("  subscribers ready: {} ok, {} failed in {:.2} s ({:.0}/s) {}", c.ok, c.failed, c.seconds, c.rate, c.first_error);
    let p = connect(&mut pool, &[pub_worker], Duration::from_secs(60))?;
    if c.failed > 0 || p.failed > 0 {
        let err = if c.first_error.is_empty() { p.first_error.clone() } else { c.first_error.clone() };
        pool.quit();
        bail!("connection set-up failed: {err}");
    }
    std::thread::sleep(Duration::from_millis(300));
    let rss_connected = common.server_rss();

    let mut plan = StepPlan { publishers: Vec::new(), receivers: receivers.clone(), duration_ms: step_ms, drain_ms, slo_p99_ms: slo, loose_p99_ms: loose };
    let mut steps: Vec<Step> = Vec::new();
    let mut k = 1u64;
    let run = |pool: &mut Pool, plan: &StepPlan, k: u64| -> Result<Step> {
        let s = run_step(&common, pool, plan, k)?;
        eprintln!("  {}", s.line());
        Ok(s)
    };

    let mut out = common.base_json("W1");
    out["subs"] = json!(subs);
    out["connect"] = connected_json(&c);
    out["server_rss_kib_before"] = json!(rss_before);
    out["server_rss_kib_connected"] = json!(rss_connected);

    if let (Some(rate), Some(count)) = (fixed_rate, fixed_count) {
        // Fixed run (instruction counting): exactly `count` messages at `rate`.
        let duration_ms = ((count as f64 / rate) * 1000.0).ceil() as u64;
        plan.publishers = vec![(pub_worker, rate)];
        plan.duration_ms = duration_ms;
        run_hook(&hook_before)?;
        let s = run(&mut pool, &plan, k)?;
        run_hook(&hook_after)?;
        out["mode"] = json!("fixed");
        out["fixed"] = s.json();
        pool.quit();
        return common.output(&out);
    }

    // Warm-up (not evaluated).
    plan.publishers = vec![(pub_worker, (start / 4.0 / subs as f64).clamp(1.0, 1000.0))];
    plan.duration_ms = 500;
    eprint!("  warm-up:");
    let _ = run(&mut pool, &plan, k)?;
    k += 1;
    plan.duration_ms = step_ms;

    let mut rates: Vec<f64> = Vec::new();
    let mut aborted = String::new();
    if let Some(list) = fixed_steps {
        // Explicit deliveries/s steps.
        for r in list.split(',').filter(|s| !s.is_empty()) {
            let d: f64 = r.parse().context("--rates")?;
            plan.publishers = vec![(pub_worker, d / subs as f64)];
            let s = run(&mut pool, &plan, k)?;
            k += 1;
            rates.push(d);
            let closed = s.closed;
            steps.push(s);
            if closed > 0 {
                aborted = "connections closed".into();
                break;
            }
        }
    } else {
        // A geometric ladder (×factor) of offered deliveries/s, stopped when the delivered rate
        // has not grown by 10 % for two steps in a row (or a step delivered under half of what
        // was offered), then up to two ×factor^(1/3) steps above the best kept-up rate.
        // Latency is not monotonic in the rate (more load → more frames per write, fewer
        // syscalls per delivery), so neither the SLO nor one missed step ends the ladder.
        let mut rate = start;
        let mut stale = 0;
        let mut best_delivered = 0.0f64;
        for _ in 0..max_steps {
            plan.publishers = vec![(pub_worker, rate / subs as f64)];
            let s = run(&mut pool, &plan, k)?;
            k += 1;
            let (delivered, closed) = (s.deliveries_per_s, s.closed);
            steps.push(s);
            if closed > 0 {
                aborted = format!("{closed} subscriber connection(s) closed by the server");
                break;
            }
            if delivered > best_delivered * 1.1 {
                stale = 0;
            } else {
                stale += 1;
            }
            best_delivered = best_delivered.max(delivered);
            if stale >= 2 || delivered < 0.5 * rate {
                break;
            }
            rate *= factor;
        }
        let offered = |s: &Step| s.pub_rate * subs as f64;
        let best = steps.iter().filter(|s| s.kept_up).map(offered).fold(0.0, f64::max);
        let fine = factor.cbrt();
        let mut next = best * fine;
        while aborted.is_empty() && best > 0.0 && fine > 1.05 && next < best * factor * 0.99 && k < 60 {
            if steps.iter().any(|s| (offered(s) - next).abs() < next * 0.01) {
                break;
            }
            plan.publishers = vec![(pub_worker, next / subs as f64)];
            let s = run(&mut pool, &plan, k)?;
            k += 1;
            let kept_up = s.kept_up;
            steps.push(s);
            if !kept_up {
                break;
            }
            next *= fine;
        }
    }

    let best_of = |f: fn(&Step) -> bool| steps.iter().filter(|s| f(s)).max_by(|a, b| a.deliveries_per_s.total_cmp(&b.deliveries_per_s));
    let slo_peak = best_of(|s| s.pass);
    let peak = best_of(|s| s.kept_up);
    let mut half: Option<Step> = None;
    if let (Some(p), false, true) = (peak, no_half, aborted.is_empty()) {
        plan.publishers = vec![(pub_worker, p.pub_rate / 2.0)];
        half = Some(run(&mut pool, &plan, k)?);
    }
    let rss_end = common.server_rss();
    if let Some(p) = slo_peak {
        eprintln!("  => best rate within the {slo} ms p99 SLO: {:.0} deliveries/s (p99 {:.2} ms)", p.deliveries_per_s, ms(p.hist.quantile(0.99)));
    } else {
        eprintln!("  => no step met the {slo} ms p99 SLO");
    }
    match peak {
        Some(p) => eprintln!(
            "  => peak kept-up rate {:.0} deliveries/s (publish {:.1}/s), p99 {:.2} ms; at half of it p99 {} ms; server {:.2} CPU-s per 1M deliveries",
            p.deliveries_per_s,
            p.pub_rate,
            ms(p.hist.quantile(0.99)),
            half.as_ref().map_or("-".into(), |h| format!("{:.2}", ms(h.hist.quantile(0.99)))),
            if p.recv > 0 { p.server_cpu / p.recv as f64 * 1e6 } else { 0.0 }
        ),
        None => eprintln!("  => the server kept up with no step"),
    }
    out["mode"] = json!("search");
    out["slo_p99_ms"] = json!(slo);
    out["loose_p99_ms"] = json!(loose);
    out["slo_peak"] = slo_peak.map_or(Value::Null, Step::json);
    out["aborted"] = json!(aborted);
    out["peak"] = peak.map_or(Value::Null, Step::json);
    out["half_peak"] = half.as_ref().map_or(Value::Null, Step::json);
    out["steps"] = Value::Array(steps.iter().map(Step::json).collect());
    out["server_rss_kib_end"] = json!(rss_end);
    pool.quit();
    common.output(&out)
}

// ---------------------------------------------------------------------------------------------
// W2: many small channels

pub fn rooms(args: &Args) -> Result<()> {
    let common = Common::parse(args)?;
    let group: usize = args.get("group", 6)?;
    let vus: usize = args.get("vus", 6000)?;
    let msg_rate: f64 = args.get("msg-rate", 2.0)?;
    let duration_ms: u64 = args.get("duration-ms", 10_000)?;
    let warmup_ms: u64 = args.get("warmup-ms", 2000)?;
    let drain_ms: u64 = args.get("drain-ms", 3000)?;
    let slo: f64 = args.get("slo-p99-ms", 50.0)?;
    let loose: f64 = args.get("loose-p99-ms", 500.0)?;
    let concurrency: usize = args.get("concurrency", 200)?;
    args.finish()?;
    if !common.proto.is_phoenix() {
        bail!("W2 needs channels: only --proto phoenix");
    }
    if group < 2 || !vus.is_multiple_of(group) {
        bail!("--vus must be a multiple of --group (≥ 2)");
    }
    let shares = split(vus, common.per_worker, group);
    let mut lists = Vec::new();
    let mut base = 0;
    for (w, &n) in shares.iter().enumerate() {
        lists.push(common.worker_args(w, "rooms", n, base, concurrency, 0, group, false));
        base += n;
    }
    eprintln!(
        "W2 rooms: {vus} users in {} groups of {group} + one echo channel each, {msg_rate} msg/s per channel, {} workers, proto {}",
        vus / group,
        shares.len(),
        common.proto.name()
    );
    let mut pool = Pool::spawn(lists)?;
    let all: Vec<usize> = (0..shares.len()).collect();
    let c = connect(&mut pool, &all, Duration::from_secs(300))?;
    eprintln!("  users ready: {} ok, {} failed in {:.2} s {}", c.ok, c.failed, c.seconds, c.first_error);
    if c.failed > 0 {
        pool.quit();
        bail!("connection set-up failed: {}", c.first_error);
    }
    // Each user has two send slots (echo, group), each sending `msg_rate` per second.
    let pubs: Vec<(usize, f64)> = shares.iter().enumerate().map(|(w, &n)| (w, n as f64 * 2.0 * msg_rate)).collect();
    let mut plan = StepPlan { publishers: pubs, receivers: all.clone(), duration_ms: warmup_ms, drain_ms, slo_p99_ms: slo, loose_p99_ms: loose };
    let w = run_step(&common, &mut pool, &plan, 1)?;
    eprintln!("  warm-up {}", w.line());
    plan.duration_ms = duration_ms;
    let s = run_step(&common, &mut pool, &plan, 2)?;
    eprintln!("  {}", s.line());
    let mut out = common.base_json("W2");
    out["vus"] = json!(vus);
    out["group"] = json!(group);
    out["msg_rate_per_channel"] = json!(msg_rate);
    out["connect"] = connected_json(&c);
    out["result"] = s.json();
    out["server_rss_kib"] = json!(common.server_rss());
    pool.quit();
    common.output(&out)
}

// ---------------------------------------------------------------------------------------------
// W3 join storm and W7 idle memory

pub fn connections(args: &Args, workload: &str) -> Result<()> {
    let common = Common::parse(args)?;
    let conns: usize = args.get("conns", 15_000)?;
    let default_concurrency = if workload == "W3" { 256 } else { 64 };
    let concurrency: usize = args.get("concurrency", default_concurrency)?;
    let settle_ms: u64 = args.get("settle-ms", 3000)?;
    let hold_s: u64 = args.get("hold-s", 0)?;
    let topic_each = args.flag("topic-each");
    let hook_hold: Option<String> = args.opt("exec-before")?;
    args.finish()?;
    let shares = split(conns, common.per_worker, 1);
    let mut lists = Vec::new();
    let mut base = 0;
    for (w, &n) in shares.iter().enumerate() {
        lists.push(common.worker_args(w, "sub", n, base, concurrency, 0, 0, topic_each));
        base += n;
    }
    eprintln!(
        "{workload}: {conns} connections ({} workers, {concurrency} in flight each), {} topic(s), proto {}",
        shares.len(),
        if topic_each { "one per connection" } else { "one shared" },
        common.proto.name()
    );
    let mut pool = Pool::spawn(lists)?;
    std::thread::sleep(Duration::from_millis(300));
    let rss0 = common.server_rss();
    let slab0 = procfs::slab_kib();
    let cpu0 = common.server_cpu();
    let all: Vec<usize> = (0..shares.len()).collect();
    let c = connect(&mut pool, &all, Duration::from_secs(600))?;
    let cpu1 = common.server_cpu();
    eprintln!(
        "  {} joined, {} failed in {:.2} s: {:.0} connect+join/s; join p50 {:.2} ms p99 {:.2} ms; connect→joined p99 {:.2} ms {}",
        c.ok,
        c.failed,
        c.seconds,
        c.rate,
        ms(c.join.quantile(0.5)),
        ms(c.join.quantile(0.99)),
        ms(c.total.quantile(0.99)),
        c.first_error
    );
    std::thread::sleep(Duration::from_millis(settle_ms));
    let rss1 = common.server_rss();
    let slab1 = procfs::slab_kib();
    let per = |kib: i64| if c.ok > 0 { kib as f64 * 1024.0 / c.ok as f64 } else { 0.0 };
    let rss_delta = rss1 as i64 - rss0 as i64;
    let slab_delta = slab1 as i64 - slab0 as i64;
    eprintln!(
        "  server RSS {} → {} KiB ({:.0} B/conn), slab +{} KiB ({:.0} B/conn, both socket ends); (RSS+slab)/N = {:.0} B",
        rss0,
        rss1,
        per(rss_delta),
        slab_delta,
        per(slab_delta),
        per(rss_delta + slab_delta)
    );
    let mut out = common.base_json(workload);
    out["conns"] = json!(conns);
    out["concurrency_per_worker"] = json!(concurrency);
    out["workers"] = json!(shares.len());
    out["topic_each"] = json!(topic_each);
    out["connect"] = connected_json(&c);
    out["server_cpu_s_connect"] = json!(cpu1 - cpu0);
    out["server_cpu_us_per_join"] = json!(if c.ok > 0 { (cpu1 - cpu0) / c.ok as f64 * 1e6 } else { 0.0 });
    out["memory"] = json!({
        "rss_kib_before": rss0, "rss_kib_after": rss1, "slab_kib_before": slab0, "slab_kib_after": slab1,
        "rss_bytes_per_conn": per(rss_delta), "slab_bytes_per_conn": per(slab_delta),
        "rss_plus_slab_bytes_per_conn": per(rss_delta + slab_delta),
    });
    if hold_s > 0 {
        run_hook(&hook_hold)?;
        let cpu_h0 = common.server_cpu();
        std::thread::sleep(Duration::from_secs(hold_s));
        let cpu_h1 = common.server_cpu();
        let status = pool.ask(&all, "status", "status", Duration::from_secs(30))?;
        let open: u64 = status.iter().map(|l| fields(l).get("open").and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)).sum();
        let rss2 = common.server_rss();
        eprintln!("  after holding {hold_s} s: {open} still open, RSS {rss2} KiB, server idle CPU {:.3} cores", (cpu_h1 - cpu_h0) / hold_s as f64);
        out["hold"] = json!({"seconds": hold_s, "open": open, "rss_kib": rss2, "server_idle_cores": (cpu_h1 - cpu_h0) / hold_s as f64});
    }
    pool.quit();
    common.output(&out)
}
