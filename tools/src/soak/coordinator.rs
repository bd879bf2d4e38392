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

pub(crate) fn run(args: &cli::Args) -> Result<i32> {
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

