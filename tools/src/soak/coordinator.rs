//! The soak coordinator: starts the workers, inserts the Postgres rows, samples the server
//! from /proc into the CSV, and decides the verdicts.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddrV4;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::{cli, procfs};

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

/// The run's options (see `powa-soak help`).
struct Options {
    target: SocketAddrV4,
    token: String,
    server_pid: u32,
    conns: usize,
    workers: usize,
    duration: Duration,
    sample: Duration,
    mark: Duration,
    churn_per_s: f64,
    hold_ms: u64,
    room_size: usize,
    publish_per_s: f64,
    payload: usize,
    pg_url: Option<String>,
    pg_per_s: u64,
    pg_subs: usize,
    csv_path: String,
    summary_path: String,
}

impl Options {
    fn parse(args: &cli::Args) -> Result<Options> {
        let target: SocketAddrV4 = args.get("target", "127.0.0.1:4000".to_string())?.parse().context("--target must be IPv4 host:port")?;
        if target.ip().octets()[0] != 127 {
            bail!("--target must be a loopback address (127.0.0.0/8)");
        }
        let pg_url: Option<String> = args.opt("pg-url")?;
        let options = Options {
            target,
            token: args.req("token")?,
            server_pid: args.req("server-pid")?,
            conns: args.get("conns", 15_000)?,
            workers: args.get("workers", 4)?,
            duration: Duration::from_secs(args.get("duration-s", 1800)?),
            sample: Duration::from_secs(args.get("sample-s", 10)?),
            mark: Duration::from_secs(args.get("mark-s", 300)?),
            churn_per_s: args.get("churn-per-s", 200.0)?,
            hold_ms: args.get("hold-ms", 5000)?,
            room_size: args.get("room-size", 50)?.max(1),
            publish_per_s: args.get("publish-per-s", 300.0)?,
            payload: args.get("payload", 100)?,
            pg_per_s: args.get("pg-per-s", 20)?,
            pg_subs: if pg_url.is_some() { args.get("pg-subs", 200)? } else { 0 },
            pg_url,
            csv_path: args.get("csv", "soak.csv".to_string())?,
            summary_path: args.get("summary", "summary.json".to_string())?,
        };
        args.finish()?;
        if options.workers == 0 || options.conns < options.workers {
            bail!("--conns must be at least --workers");
        }
        Ok(options)
    }
}

/// How the connections are split.
struct Plan {
    members: usize,
    churners: usize,
    rooms: usize,
    publish_every_ms: u64,
}

impl Plan {
    fn of(o: &Options) -> Plan {
        // Churners needed for the churn rate: each cycle lasts about one hold plus set-up.
        let churners = ((o.churn_per_s * (o.hold_ms as f64 / 1000.0 + 0.05)).ceil() as usize).min(o.conns / 2);
        let members = o.conns - churners;
        let rooms = members.div_ceil(o.room_size).max(1);
        let publish_every_ms = if o.publish_per_s > 0.0 { ((members as f64 / o.publish_per_s) * 1000.0).round().max(1.0) as u64 } else { 0 };
        Plan { members, churners, rooms, publish_every_ms }
    }
}

/// Starts worker `index` with `members` members from `first_member` and `churners` churners; a
/// thread keeps its latest `stat` line.
fn spawn_worker(o: &Options, plan: &Plan, index: usize, first_member: usize, members: usize, churners: usize) -> Result<WorkerProc> {
    let mut child = Command::new(std::env::current_exe()?)
        .arg("__worker")
        .args(["--index", &index.to_string(), "--target", &o.target.to_string(), "--token", &o.token])
        .args(["--first-member", &first_member.to_string(), "--members", &members.to_string(), "--churners", &churners.to_string()])
        .args(["--rooms", &plan.rooms.to_string(), "--room-size", &o.room_size.to_string(), "--publish-every-ms", &plan.publish_every_ms.to_string()])
        .args(["--hold-ms", &o.hold_ms.to_string(), "--payload", &o.payload.to_string(), "--pg-subs", &o.pg_subs.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting a worker")?;
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
    Ok(WorkerProc { child, stdin, latest, done })
}

/// Writes the CSV rows: the server from /proc, the workers' counters and per-second rates.
struct Sampler {
    csv: std::fs::File,
    started: Instant,
    server_pid: u32,
    last: (f64, f64, i64, i64),
    /// (t, RSS KiB) of every row, for the memory verdict.
    rows: Vec<(f64, u64)>,
}

const CSV_HEADER: &str = "t_s,rss_kib,fds,cpu_pct,open_conns,members_open,connects,connect_failed,join_errors,churn_cycles,churn_per_s,deliveries,deliveries_per_s,lost,reordered,pg_inserted,pg_deliveries,pg_lost,slow_closes,other_closes,tracks,presence_events,publishes";

impl Sampler {
    fn new(path: &str, server_pid: u32) -> Result<Sampler> {
        let mut csv = std::fs::File::create(path).with_context(|| format!("creating {path}"))?;
        writeln!(csv, "{CSV_HEADER}")?;
        let cpu = procfs::cpu_seconds(server_pid).unwrap_or(0.0);
        Ok(Sampler { csv, started: Instant::now(), server_pid, last: (0.0, cpu, 0, 0), rows: Vec::new() })
    }

    fn row(&mut self, workers: &[WorkerProc], pg_inserted: i64) -> Result<()> {
        let (last_t, last_cpu, last_deliveries, last_churn) = self.last;
        let t = self.started.elapsed().as_secs_f64();
        let rss = procfs::rss_kib(self.server_pid).unwrap_or(0);
        let cpu = procfs::cpu_seconds(self.server_pid).unwrap_or(last_cpu);
        let fds = fd_count(self.server_pid);
        let dt = (t - last_t).max(1e-3);
        let cpu_pct = (cpu - last_cpu) / dt * 100.0;
        let deliveries = sum(workers, "deliveries") + sum(workers, "pg_deliveries");
        let churn = sum(workers, "churn_cycles");
        let (churn_rate, delivery_rate) = ((churn - last_churn) as f64 / dt, (deliveries - last_deliveries) as f64 / dt);
        let counters: Vec<String> = ["open", "members_open", "connects", "connect_failed", "join_errors"].iter().map(|k| sum(workers, k).to_string()).collect();
        let tail: Vec<String> = ["lost", "reordered"].iter().map(|k| sum(workers, k).to_string()).collect();
        let pg: Vec<String> = ["pg_deliveries", "pg_lost", "slow_closes", "other_closes", "tracks", "presence_events", "publishes"].iter().map(|k| sum(workers, k).to_string()).collect();
        writeln!(
            self.csv,
            "{t:.1},{rss},{fds},{cpu_pct:.1},{},{churn},{churn_rate:.1},{deliveries},{delivery_rate:.1},{},{pg_inserted},{}",
            counters.join(","),
            tail.join(","),
            pg.join(",")
        )?;
        self.csv.flush()?;
        eprintln!(
            "t={t:>6.0}s rss={:.1} MiB fds={fds} cpu={cpu_pct:.0}% open={} churn={churn_rate:.0}/s deliveries={delivery_rate:.0}/s lost={} pg={}/{pg_inserted} slow={} closes={}",
            rss as f64 / 1024.0,
            sum(workers, "open"),
            sum(workers, "lost"),
            sum(workers, "pg_deliveries"),
            sum(workers, "slow_closes"),
            sum(workers, "other_closes"),
        );
        self.rows.push((t, rss));
        self.last = (t, cpu, deliveries, churn);
        Ok(())
    }
}

fn pg_last_min(workers: &[WorkerProc]) -> i64 {
    workers.iter().map(|w| w.latest.lock().unwrap()["pg_last_min"].as_i64().unwrap_or(0)).filter(|v| *v > 0).min().unwrap_or(0)
}

pub(crate) fn run(args: &cli::Args) -> Result<i32> {
    let o = Options::parse(args)?;
    let plan = Plan::of(&o);
    eprintln!(
        "powa-soak: {} connections ({} members in {} rooms of {}, {} churners ≈ {}/s), {} workers, {}s, member broadcasts {}/s (each member every {} ms), Postgres Changes {}",
        o.conns,
        plan.members,
        plan.rooms,
        o.room_size,
        plan.churners,
        o.churn_per_s,
        o.workers,
        o.duration.as_secs(),
        o.publish_per_s,
        plan.publish_every_ms,
        if o.pg_url.is_some() { format!("{} rows/s to {} subscribers", o.pg_per_s, o.pg_subs) } else { "off".into() }
    );
    let mut pg = match &o.pg_url {
        Some(url) => {
            let mut psql = Psql::open(url)?;
            psql.exec(PG_SETUP)?;
            Some(psql)
        }
        None => None,
    };
    let mut workers: Vec<WorkerProc> = Vec::new();
    let (mut first_member, mut churn_left) = (0usize, plan.churners);
    for w in 0..o.workers {
        let members = plan.members / o.workers + usize::from(w < plan.members % o.workers);
        let churners = churn_left / (o.workers - w);
        churn_left -= churners;
        workers.push(spawn_worker(&o, &plan, w, first_member, members, churners)?);
        first_member += members;
    }

    let mut sampler = Sampler::new(&o.csv_path, o.server_pid)?;
    let mut pg_inserted: i64 = 0;
    let (mut next_sample, mut next_insert) = (o.sample, Duration::ZERO);
    while sampler.started.elapsed() < o.duration {
        let now = sampler.started.elapsed();
        if let Some(psql) = pg.as_mut().filter(|_| now >= next_insert) {
            // Ten batches a second.
            let rows_now = (o.pg_per_s / 10).max(1);
            psql.exec(&format!("INSERT INTO public.soak_changes (v) SELECT g FROM generate_series(1, {rows_now}) g;"))?;
            pg_inserted += rows_now as i64;
            next_insert += Duration::from_millis(100);
        }
        if now >= next_sample {
            sampler.row(&workers, pg_inserted)?;
            next_sample += o.sample;
        }
        std::thread::sleep(Duration::from_millis(if pg.is_some() { 20 } else { 100 }));
    }
    // Let the last changes arrive (bounded: 20 s), then stop the workers and take the final
    // counts.
    std::thread::sleep(Duration::from_secs(2));
    let pg_max_id = match &o.pg_url {
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
    sampler.row(&workers, pg_inserted)?;
    stop_workers(&mut workers);
    if let Some(mut psql) = pg.take() {
        let _ = psql.exec("\\q");
        let _ = psql.child.wait();
    }
    verdicts(&o, &plan, &workers, &sampler.rows, pg_inserted, pg_max_id)
}

fn stop_workers(workers: &mut [WorkerProc]) {
    for w in workers.iter_mut() {
        if let Some(mut stdin) = w.stdin.take() {
            let _ = writeln!(stdin, "stop");
        }
    }
    for w in workers.iter_mut() {
        let deadline = Instant::now() + Duration::from_secs(30);
        while w.done.lock().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = w.child.kill();
        let _ = w.child.wait();
    }
}

/// Memory (end RSS within 5 % of the RSS at the mark) and deliveries (no gap, no tail loss,
/// something delivered): written to the summary, printed as the VERDICT line; the exit status.
fn verdicts(o: &Options, plan: &Plan, workers: &[WorkerProc], rows: &[(f64, u64)], pg_inserted: i64, pg_max_id: i64) -> Result<i32> {
    let mark_rss = rows.iter().min_by_key(|(t, _)| ((t - o.mark.as_secs_f64()).abs() * 1000.0) as u64).map(|r| r.1).unwrap_or(0);
    let end_rss = rows.last().map(|r| r.1).unwrap_or(0);
    let growth = if mark_rss > 0 { end_rss as f64 / mark_rss as f64 - 1.0 } else { f64::NAN };
    let memory_ok = mark_rss > 0 && growth <= 0.05;
    let (lost, pg_lost, deliveries, pg_deliveries) = (sum(workers, "lost"), sum(workers, "pg_lost"), sum(workers, "deliveries"), sum(workers, "pg_deliveries"));
    let pg_tail_lost = if o.pg_url.is_some() { (pg_max_id - pg_last_min(workers)).max(0) } else { 0 };
    let delivered_ok = lost == 0 && pg_lost == 0 && pg_tail_lost == 0 && deliveries > 0 && (o.pg_url.is_none() || pg_deliveries > 0);
    let first_error = workers.iter().map(|w| w.latest.lock().unwrap()["first_error"].as_str().unwrap_or("").to_string()).find(|e| !e.is_empty()).unwrap_or_default();
    let verdict = |ok: bool| if ok { "pass" } else { "fail" };
    let summary = json!({
        "conns": o.conns, "members": plan.members, "churners": plan.churners, "rooms": plan.rooms, "workers": o.workers,
        "duration_s": o.duration.as_secs(), "samples": rows.len(), "mark_s": o.mark.as_secs(),
        "rss_mark_kib": mark_rss, "rss_end_kib": end_rss, "rss_peak_kib": rows.iter().map(|r| r.1).max().unwrap_or(0), "rss_growth": growth,
        "deliveries": deliveries, "lost": lost, "reordered": sum(workers, "reordered"),
        "pg_inserted": pg_inserted, "pg_max_id": pg_max_id, "pg_deliveries": pg_deliveries, "pg_lost": pg_lost, "pg_tail_lost": pg_tail_lost,
        "slow_closes": sum(workers, "slow_closes"), "other_closes": sum(workers, "other_closes"),
        "connects": sum(workers, "connects"), "connect_failed": sum(workers, "connect_failed"), "join_errors": sum(workers, "join_errors"),
        "churn_cycles": sum(workers, "churn_cycles"), "tracks": sum(workers, "tracks"), "publishes": sum(workers, "publishes"),
        "first_error": first_error,
        "memory_verdict": verdict(memory_ok),
        "delivery_verdict": verdict(delivered_ok),
    });
    std::fs::write(&o.summary_path, serde_json::to_string_pretty(&summary)? + "\n").with_context(|| format!("writing {}", o.summary_path))?;
    println!(
        "VERDICT memory={} (RSS {:.1} MiB at {}s, {:.1} MiB at the end, {:+.1} %) deliveries={} ({deliveries} broadcasts, lost {lost}; Postgres changes {pg_deliveries} of {pg_inserted} rows × subscribers, lost {pg_lost}, tail {pg_tail_lost}; slow-consumer closes {}, other closes {})",
        verdict(memory_ok),
        mark_rss as f64 / 1024.0,
        o.mark.as_secs(),
        end_rss as f64 / 1024.0,
        growth * 100.0,
        verdict(delivered_ok),
        sum(workers, "slow_closes"),
        sum(workers, "other_closes"),
    );
    Ok(if memory_ok && delivered_ok { 0 } else { 2 })
}
