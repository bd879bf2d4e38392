//! `powa-load report`: turns the JSON lines of a suite run (plus callgrind and perf text) into
//! the load section of `benches/RESULTS.md`, between `<!-- load:begin -->` and
//! `<!-- load:end -->`. Values are medians over rounds; ratios are computed per round (same
//! round, same configuration) and shown as their median with every round's value.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::cli::Args;
use crate::procfs;

const BEGIN: &str = "<!-- load:begin -->";
const END: &str = "<!-- load:end -->";

/// Systems in display order, with their description.
const SYSTEMS: &[(&str, &str)] = &[
    ("powa", "powa-realtime (V2 text)"),
    ("powa-bin", "powa-realtime (V2 binary: kind-3 in, kind-4 out)"),
    ("raw", "raw limit (powa-rawfanout)"),
    ("nchan", "nginx + nchan"),
];

fn system_name(label: &str) -> &str {
    SYSTEMS.iter().find(|(l, _)| *l == label).map_or(label, |(_, d)| d)
}

fn get(v: &Value, path: &str) -> Option<f64> {
    let mut cur = v;
    for key in path.split('.') {
        cur = cur.get(key)?;
    }
    cur.as_f64()
}

fn median(mut xs: Vec<f64>) -> Option<f64> {
    xs.retain(|x| x.is_finite());
    if xs.is_empty() {
        return None;
    }
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    Some(if n % 2 == 1 { xs[n / 2] } else { (xs[n / 2 - 1] + xs[n / 2]) / 2.0 })
}

fn rate(x: Option<f64>) -> String {
    match x {
        None => "–".into(),
        Some(x) if x >= 1e6 => format!("{:.2} M", x / 1e6),
        Some(x) if x >= 1e4 => format!("{:.0} k", x / 1e3),
        Some(x) if x >= 1e3 => format!("{:.1} k", x / 1e3),
        Some(x) => format!("{x:.0}"),
    }
}

fn num(x: Option<f64>, digits: usize) -> String {
    x.map_or("–".into(), |x| format!("{x:.digits$}"))
}

fn ratio_cell(per_round: &[f64]) -> String {
    match median(per_round.to_vec()) {
        None => "–".into(),
        Some(m) => {
            let rounds: Vec<String> = per_round.iter().map(|r| format!("{r:.2}")).collect();
            format!("**{m:.2}** ({})", rounds.join(", "))
        }
    }
}

struct Run {
    v: Value,
}

impl Run {
    fn label(&self) -> &str {
        self.v["label"].as_str().unwrap_or("")
    }
    fn round(&self) -> u64 {
        self.v["round"].as_u64().unwrap_or(1)
    }
    fn f(&self, path: &str) -> Option<f64> {
        get(&self.v, path)
    }
}

/// Runs grouped by configuration key, then label.
type Groups<'a> = BTreeMap<String, BTreeMap<String, Vec<&'a Run>>>;

fn group<'a>(runs: &'a [Run], workload: &str, key: impl Fn(&Run) -> String) -> Groups<'a> {
    let mut g: Groups = BTreeMap::new();
    // Profiling runs (labels `*-perf`, `*-cg`) are not part of the tables.
    for r in runs.iter().filter(|r| r.v["workload"] == workload && r.v["mode"] != "fixed" && !r.label().ends_with("-perf") && !r.label().ends_with("-cg")) {
        g.entry(key(r)).or_default().entry(r.label().to_string()).or_default().push(r);
    }
    g
}

fn med(runs: &[&Run], path: &str) -> Option<f64> {
    median(runs.iter().filter_map(|r| r.f(path)).collect())
}

/// Per-round ratios a/b of metric `path` between two labels of one configuration.
fn ratios(by_label: &BTreeMap<String, Vec<&Run>>, a: &str, b: &str, path: &str, invert: bool) -> Vec<f64> {
    let (Some(xs), Some(ys)) = (by_label.get(a), by_label.get(b)) else { return Vec::new() };
    let mut out = Vec::new();
    for x in xs {
        if let Some(y) = ys.iter().find(|y| y.round() == x.round()) {
            if let (Some(xv), Some(yv)) = (x.f(path), y.f(path)) {
                let (num, den) = if invert { (yv, xv) } else { (xv, yv) };
                if den > 0.0 {
                    out.push(num / den);
                }
            }
        }
    }
    out
}

fn ordered_labels(by_label: &BTreeMap<String, Vec<&Run>>) -> Vec<String> {
    let mut labels: Vec<String> = SYSTEMS.iter().map(|(l, _)| l.to_string()).filter(|l| by_label.contains_key(l)).collect();
    labels.extend(by_label.keys().filter(|l| !SYSTEMS.iter().any(|(s, _)| s == *l)).cloned());
    labels
}

fn command_of(runs: &[&Run]) -> String {
    runs.iter().find(|r| r.round() == 1).or(runs.first()).and_then(|r| r.v["argv"].as_str()).unwrap_or("").to_string()
}

/// Parsed `perf report --sort sym` / `--sort dso` text: (percent, name).
fn perf_lines(path: &str) -> Vec<(f64, String)> {
    let Ok(text) = std::fs::read_to_string(path) else { return Vec::new() };
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| {
            let l = l.trim();
            let (pct, rest) = l.split_once('%')?;
            Some((pct.trim().parse().ok()?, rest.trim().to_string()))
        })
        .collect()
}

/// Parsed `callgrind_annotate` text: (total Ir, [(Ir, function)]) without the thread chain.
fn callgrind(path: &str) -> Option<(f64, Vec<(f64, String)>)> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut total = None;
    let mut funcs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let Some((count, rest)) = line.split_once(' ') else { continue };
        let Ok(count) = count.replace(',', "").parse::<f64>() else { continue };
        if rest.contains("PROGRAM TOTALS") {
            total = Some(count);
            continue;
        }
        let Some(total) = total else { continue };
        if count >= total * 0.99 {
            continue;
        }
        let name = rest.split_once(") ").map_or(rest, |(_, n)| n).trim();
        let name = name.split(" [").next().unwrap_or(name);
        // `file:function`; the file part never holds a colon, function names may.
        let name = name.split_once(':').map_or(name, |(_, func)| func);
        funcs.push((count, name.to_string()));
    }
    Some((total?, funcs))
}

/// For text inside a backtick code span in a table: only the pipe needs escaping.
fn md_escape(s: &str) -> String {
    s.replace('|', "\\|")
}

pub fn report(args: &Args) -> Result<()> {
    let results: String = args.req("results")?;
    let out: String = args.req("out")?;
    let commit: String = args.get("commit", "unknown".to_string())?;
    let date: String = args.get("date", String::new())?;
    let command: String = args.get("command", "bash benches/run.sh".to_string())?;
    let pinning: String = args.get("pinning", String::new())?;
    let versions: String = args.get("versions", String::new())?;
    let cg_powa: Option<String> = args.opt("callgrind-powa")?;
    let cg_raw: Option<String> = args.opt("callgrind-raw")?;
    let perf_fanout: Option<String> = args.opt("perf-fanout")?;
    let perf_idle: Option<String> = args.opt("perf-idle")?;
    let duration: String = args.get("duration", String::new())?;
    args.finish()?;

    let text = std::fs::read_to_string(&results).with_context(|| format!("reading {results}"))?;
    let runs: Vec<Run> = text.lines().filter(|l| l.starts_with('{')).filter_map(|l| serde_json::from_str(l).ok()).map(|v| Run { v }).collect();
    if runs.is_empty() {
        bail!("no results in {results}");
    }
    let (cores, kernel, model) = procfs::machine();
    let rounds = runs.iter().map(Run::round).max().unwrap_or(1);
    let mut md = String::new();
    let w = &mut md;
    writeln!(w, "{BEGIN}")?;
    writeln!(w, "## Load suite (`benches/run.sh`)\n")?;
    writeln!(w, "Generated by `{command}` on {date} at commit `{commit}`{}.", if duration.is_empty() { String::new() } else { format!(", suite wall time {duration}") })?;
    writeln!(w, "Machine: {cores} × {model}, kernel {kernel}. {pinning}")?;
    if !versions.is_empty() {
        writeln!(w, "Peers: {versions}.")?;
    }
    writeln!(
        w,
        "Each configuration ran {rounds} round(s), alternating the systems (A B C A B C …), each on a fresh server. \
         Values are medians over rounds; a ratio is computed within each round and shown as **median** (round 1, round 2, …). \
         Absolute numbers move with the other work sharing this VM; the ratios are the result.\n"
    )?;
    writeln!(w, "Definitions: a step publishes at a fixed open-loop rate for the step time; *kept up* = no loss, nothing closed, p99 < 500 ms and latency not growing during the step (least-squares slope of latency against send time < 0.05 s/s, i.e. ≥ 95 % of the offered rate delivered; deliveries/s = offered ÷ (1 + slope)); \
         *peak* = the highest kept-up step of a ×2 ladder refined by ×1.26 steps; *SLO* = p99 < 50 ms; latency is publisher's scheduled send time → receiver's read (CLOCK_MONOTONIC, same host). \
         Server CPU is utime+stime of its processes (softirq work done for it on loopback is not included; the `CPU busy` column is the whole core from /proc/stat).\n")?;

    // ---- W1
    let w1 = group(&runs, "W1", |r| format!("{:06}|{:05}", r.f("subs").unwrap_or(0.0) as u64, r.f("payload_bytes").unwrap_or(0.0) as u64));
    let mut headline: Vec<(String, String, String)> = Vec::new();
    if !w1.is_empty() {
        writeln!(w, "### W1 fan-out 1 → N (one publisher, N subscribers on one topic)\n")?;
        writeln!(
            w,
            "| N | payload | system | peak deliveries/s | p99 at peak | best within SLO (p99) | p99 at half peak | server CPU-s / 1M deliveries | bytes / delivery | CPU busy server/load core | vs raw | vs nchan |"
        )?;
        writeln!(w, "|---|---|---|---|---|---|---|---|---|---|---|---|")?;
        let mut commands = Vec::new();
        for (key, by_label) in &w1 {
            let (n, payload) = key.split_once('|').unwrap_or(("", ""));
            let n: u64 = n.parse().unwrap_or(0);
            let payload: u64 = payload.parse().unwrap_or(0);
            for label in ordered_labels(by_label) {
                let rs = &by_label[&label];
                if commands.len() < 3 && label == "powa" {
                    commands.push(command_of(rs));
                }
                let slo = med(rs, "slo_peak.deliveries_per_s");
                let slo_p99 = med(rs, "slo_peak.latency.p99_ms");
                let slo_cell = match slo {
                    Some(s) if rs.iter().all(|r| r.f("slo_peak.deliveries_per_s").is_some()) => format!("{} ({} ms)", rate(Some(s)), num(slo_p99, 1)),
                    Some(s) => format!("{} in {}/{} rounds", rate(Some(s)), rs.iter().filter(|r| r.f("slo_peak.deliveries_per_s").is_some()).count(), rs.len()),
                    None => "none".into(),
                };
                let busy = |i: usize| median(rs.iter().filter_map(|r| r.v["peak"]["cpu_busy"].get(i).and_then(Value::as_f64)).collect());
                let (vs_raw, vs_nchan) = if label == "raw" || label == "nchan" {
                    ("–".to_string(), "–".to_string())
                } else {
                    (ratio_cell(&ratios(by_label, &label, "raw", "peak.deliveries_per_s", false)), ratio_cell(&ratios(by_label, &label, "nchan", "peak.deliveries_per_s", false)))
                };
                writeln!(
                    w,
                    "| {n} | {payload} B | {} | {} | {} ms | {} | {} ms | {} | {} | {} / {} | {} | {} |",
                    system_name(&label),
                    rate(med(rs, "peak.deliveries_per_s")),
                    num(med(rs, "peak.latency.p99_ms"), 1),
                    slo_cell,
                    num(med(rs, "half_peak.latency.p99_ms"), 1),
                    num(med(rs, "peak.server_cpu_s_per_million"), 2),
                    num(med(rs, "peak.bytes_per_delivery"), 0),
                    busy(0).map_or("–".into(), |b| format!("{:.0} %", b * 100.0)),
                    busy(1).map_or("–".into(), |b| format!("{:.0} %", b * 100.0)),
                    vs_raw,
                    vs_nchan
                )?;
                if label == "powa" && n == 5000 && payload == 100 {
                    let peak = med(rs, "peak.deliveries_per_s");
                    let r = ratios(by_label, "powa", "raw", "peak.deliveries_per_s", false);
                    headline.push((
                        "W1 ≥ 1.5 M deliveries/s at N = 5k, 100 B (server on one of the 2 cores here)".into(),
                        rate(peak),
                        if peak.unwrap_or(0.0) >= 1.5e6 { "met".into() } else { "missed".into() },
                    ));
                    headline.push((
                        "W1 ≥ 60 % of the raw limit, same run".into(),
                        median(r.clone()).map_or("–".into(), |m| format!("{:.0} %", m * 100.0)),
                        if median(r).unwrap_or(0.0) >= 0.6 { "met".into() } else { "missed".into() },
                    ));
                    let half = med(rs, "half_peak.latency.p99_ms");
                    headline.push(("W1 p99 ≤ 5 ms at half of peak".into(), format!("{} ms", num(half, 1)), if half.unwrap_or(1e9) <= 5.0 { "met".into() } else { "missed".into() }));
                    let lost: f64 = rs.iter().flat_map(|r| r.v["steps"].as_array().cloned().unwrap_or_default()).filter(|s| s["kept_up"] == true).filter_map(|s| s["lost"].as_f64()).sum();
                    headline.push(("W1 no loss below peak".into(), format!("{lost:.0} lost in kept-up steps"), if lost == 0.0 { "met".into() } else { "missed".into() }));
                }
            }
        }
        writeln!(w)?;
        for c in commands {
            writeln!(w, "Command (round 1, powa-realtime): `{}`  ", md_escape(&c))?;
        }
        writeln!(w)?;
    }

    // ---- W2
    let w2 = group(&runs, "W2", |r| format!("{:06}", r.f("vus").unwrap_or(0.0) as u64));
    if !w2.is_empty() {
        writeln!(w, "### W2 many small channels (echo channel of 1 + group channel of 6 per user, 2 msg/s to each)\n")?;
        writeln!(w, "No peer runs this pattern here (the raw baseline has no channels); Supabase's published figure for the same pattern is 224k msgs/s on a 2–6 node cluster (see the anchors note), so compare per core only.\n")?;
        writeln!(w, "| users | system | rounds | messages in /s | deliveries/s | lost | p50 | p99 | p99.9 | server cores | server CPU-s / 1M deliveries |")?;
        writeln!(w, "|---|---|---|---|---|---|---|---|---|---|---|")?;
        let mut cmd = String::new();
        for (key, by_label) in &w2 {
            for label in ordered_labels(by_label) {
                let rs = &by_label[&label];
                if cmd.is_empty() {
                    cmd = command_of(rs);
                }
                writeln!(
                    w,
                    "| {} | {} | {} | {} | {} | {} | {} ms | {} ms | {} ms | {} | {} |",
                    key.trim_start_matches('0'),
                    system_name(&label),
                    rs.len(),
                    rate(med(rs, "result.publish_rate")),
                    rate(med(rs, "result.deliveries_per_s")),
                    num(med(rs, "result.lost"), 0),
                    num(med(rs, "result.latency.p50_ms"), 2),
                    num(med(rs, "result.latency.p99_ms"), 1),
                    num(med(rs, "result.latency.p999_ms"), 1),
                    num(med(rs, "result.server_cores"), 2),
                    num(med(rs, "result.server_cpu_s_per_million"), 2),
                )?;
            }
        }
        writeln!(w, "\nCommand (round 1): `{}`\n", md_escape(&cmd))?;
    }

    // ---- W3
    let w3 = group(&runs, "W3", |r| format!("{:06}", r.f("conns").unwrap_or(0.0) as u64));
    if !w3.is_empty() {
        writeln!(w, "### W3 join storm (connect + upgrade + join, public channel)\n")?;
        writeln!(w, "For the raw baseline and nchan, \"joined\" means the WebSocket upgrade completed (they have no join); the rate is connections fully set up per second.\n")?;
        writeln!(w, "| connections | system | joined/s | join p50 | join p99 | connect→joined p99 | failed | server CPU µs / join | vs raw | vs nchan |")?;
        writeln!(w, "|---|---|---|---|---|---|---|---|---|---|")?;
        let mut cmd = String::new();
        for (key, by_label) in &w3 {
            for label in ordered_labels(by_label) {
                let rs = &by_label[&label];
                if cmd.is_empty() && label == "powa" {
                    cmd = command_of(rs);
                }
                let (vs_raw, vs_nchan) = if label == "powa" {
                    (ratio_cell(&ratios(by_label, "powa", "raw", "connect.per_s", false)), ratio_cell(&ratios(by_label, "powa", "nchan", "connect.per_s", false)))
                } else {
                    ("–".into(), "–".into())
                };
                let joins = med(rs, "connect.per_s");
                if label == "powa" {
                    headline.push(("W3 ≥ 20k public joins/s".into(), format!("{}/s", rate(joins)), if joins.unwrap_or(0.0) >= 20_000.0 { "met".into() } else { "missed".into() }));
                }
                writeln!(
                    w,
                    "| {} | {} | {} | {} ms | {} ms | {} ms | {} | {} | {} | {} |",
                    key.trim_start_matches('0'),
                    system_name(&label),
                    rate(joins),
                    if label == "powa" { num(med(rs, "connect.join_latency.p50_ms"), 2) } else { "–".into() },
                    if label == "powa" { num(med(rs, "connect.join_latency.p99_ms"), 1) } else { "–".into() },
                    num(med(rs, "connect.total_latency.p99_ms"), 1),
                    num(med(rs, "connect.failed"), 0),
                    num(med(rs, "server_cpu_us_per_join"), 1),
                    vs_raw,
                    vs_nchan
                )?;
            }
        }
        writeln!(w, "\nCommand (round 1, powa-realtime): `{}`\n", md_escape(&cmd))?;
    }

    // ---- W7
    let w7 = group(&runs, "W7", |r| format!("{:06}", r.f("conns").unwrap_or(0.0) as u64));
    if !w7.is_empty() {
        writeln!(w, "### W7 idle memory per joined connection\n")?;
        writeln!(w, "Server RSS delta and `/proc/meminfo` Slab delta (the kernel's socket memory for **both** loopback ends) divided by the connections, measured a few seconds after the last join. Idle CPU is measured while every connection heartbeats every 25 s.\n")?;
        writeln!(w, "| connections | system | user (RSS) B/conn | kernel slab B/conn | (RSS + slab) / N | idle server cores (heartbeats) | RSS vs raw | RSS vs nchan |")?;
        writeln!(w, "|---|---|---|---|---|---|---|---|")?;
        let mut cmd = String::new();
        for (key, by_label) in &w7 {
            for label in ordered_labels(by_label) {
                let rs = &by_label[&label];
                if cmd.is_empty() && label == "powa" {
                    cmd = command_of(rs);
                }
                let rss = med(rs, "memory.rss_bytes_per_conn");
                if label == "powa" {
                    headline.push((
                        "W7 ≤ 4 KiB user memory per idle joined connection".into(),
                        format!("{} B", num(rss, 0)),
                        if rss.unwrap_or(1e9) <= 4096.0 { "met".into() } else { "missed".into() },
                    ));
                }
                let (vs_raw, vs_nchan) = if label == "powa" {
                    (
                        ratio_cell(&ratios(by_label, "powa", "raw", "memory.rss_bytes_per_conn", false)),
                        ratio_cell(&ratios(by_label, "powa", "nchan", "memory.rss_bytes_per_conn", false)),
                    )
                } else {
                    ("–".into(), "–".into())
                };
                writeln!(
                    w,
                    "| {} | {} | {} | {} | {} | {} | {} | {} |",
                    key.trim_start_matches('0'),
                    system_name(&label),
                    num(rss, 0),
                    num(med(rs, "memory.slab_bytes_per_conn"), 0),
                    num(med(rs, "memory.rss_plus_slab_bytes_per_conn"), 0),
                    num(med(rs, "hold.server_idle_cores"), 3),
                    vs_raw,
                    vs_nchan
                )?;
            }
        }
        writeln!(w, "\n(RSS ratios: lower is better for powa-realtime.) Command (round 1, powa-realtime): `{}`\n", md_escape(&cmd))?;
    }

    // ---- headline
    if !headline.is_empty() {
        let mut h = String::new();
        writeln!(h, "### Against the issue's targets\n")?;
        writeln!(h, "| target | measured (median) | |")?;
        writeln!(h, "|---|---|---|")?;
        for (t, m, v) in &headline {
            writeln!(h, "| {t} | {m} | {v} |")?;
        }
        writeln!(h)?;
        let at = md.find("### W1").or_else(|| md.find("### W2")).unwrap_or(md.len());
        md.insert_str(at, &h);
    }
    let w = &mut md;

    // ---- callgrind
    let fixed = |label: &str| runs.iter().find(|r| r.v["workload"] == "W1" && r.v["mode"] == "fixed" && r.label() == format!("{label}-cg"));
    let mut cg_rows = Vec::new();
    for (label, path) in [("powa", &cg_powa), ("raw", &cg_raw)] {
        if let (Some(path), Some(run)) = (path, fixed(label)) {
            if let Some((total, funcs)) = callgrind(path) {
                let deliveries = run.f("fixed.received").unwrap_or(0.0);
                cg_rows.push((label, total, deliveries, funcs, command_of(&[run])));
            }
        }
    }
    if !cg_rows.is_empty() {
        writeln!(w, "### Instructions per delivery (callgrind, user space only)\n")?;
        writeln!(w, "Fixed W1 run: 1 publisher, 1,000 subscribers, 200 messages of 100 B at 20 msg/s, server under `valgrind --tool=callgrind` with one shard/thread; counters zeroed after the joins and dumped after the last delivery (`callgrind_control -z/-d`). Deterministic up to timer and wake-up effects; kernel work (the send syscalls, TCP) is not counted.\n")?;
        writeln!(w, "| system | Ir total | deliveries | Ir / delivery |")?;
        writeln!(w, "|---|---|---|---|")?;
        for (label, total, deliveries, _, _) in &cg_rows {
            writeln!(w, "| {} | {:.0} M | {:.0} | **{:.0}** |", system_name(label), total / 1e6, deliveries, if *deliveries > 0.0 { total / deliveries } else { 0.0 })?;
        }
        if let Some((_, total, deliveries, funcs, cmd)) = cg_rows.iter().find(|r| r.0 == "powa") {
            writeln!(w, "\nTop functions of powa-realtime (self cost, Ir per delivery):\n")?;
            writeln!(w, "| Ir / delivery | share | function |")?;
            writeln!(w, "|---|---|---|")?;
            for (count, name) in funcs.iter().take(15) {
                writeln!(w, "| {:.0} | {:.1} % | `{}` |", count / deliveries.max(1.0), count / total * 100.0, md_escape(name))?;
            }
            writeln!(w, "\nCommand: `{}`\n", md_escape(cmd))?;
        }
    }

    // ---- profiles and what limits us
    writeln!(w, "### What limits us now\n")?;
    let mut bullets: Vec<String> = Vec::new();
    if let Some(prefix) = &perf_fanout {
        let dso = perf_lines(&format!("{prefix}.dso.txt"));
        let sym = perf_lines(&format!("{prefix}.sym.txt"));
        if !sym.is_empty() {
            let kernel: f64 = dso.iter().filter(|(_, n)| n.contains("kernel")).map(|(p, _)| p).sum();
            let top: Vec<String> = sym.iter().take(8).map(|(p, n)| format!("`{}` {p:.1} %", md_escape(n))).collect();
            bullets.push(format!(
                "**Fan-out at load (W1, N = 5k, `perf record -e cpu-clock -g` on the server):** {kernel:.0} % of the server's samples are in the kernel. Top symbols: {}.",
                top.join(", ")
            ));
        }
    }
    if let Some(prefix) = &perf_idle {
        let sym = perf_lines(&format!("{prefix}.sym.txt"));
        if let Some((p, n)) = sym.first() {
            let mut s = format!("**Idle connections (W7, 15k joined, heartbeats every 25 s):** top symbol `{}` at {p:.0} % of server samples.", md_escape(n));
            if n.contains("io_poll_find") {
                s.push_str(
                    " These are io_uring `ASYNC_CANCEL` submissions from glommio's reactor (it cancels its preemption-timer SQEs on every park/wake); \
                     the kernel looks the cancelled request up among the outstanding poll requests first, and there is one per idle connection, \
                     so every wake-up of the shard costs time proportional to the number of connections.",
                );
            }
            bullets.push(s);
        }
    }
    if let Some((_, total, deliveries, funcs, _)) = cg_rows.iter().find(|r| r.0 == "powa") {
        let share = |pat: &[&str]| -> f64 { funcs.iter().filter(|(_, n)| pat.iter().any(|p| n.contains(p))).map(|(c, _)| c).sum::<f64>() / total * 100.0 };
        let runtime = share(&["glommio", "scoped_tls", "futures_lite", "poll_fn"]);
        let alloc = share(&["malloc", "free", "realloc", "finish_grow", "grow_one", "__rdl_alloc", "_int_"]);
        let ours = share(&["powa_net", "powa_engine", "EncodeCache"]);
        let raw_ir = cg_rows.iter().find(|r| r.0 == "raw").map(|r| r.1 / r.2.max(1.0));
        bullets.push(format!(
            "**User-space instructions (callgrind):** {:.0} Ir per delivery{}; of these ≈{runtime:.0} % are the async runtime (task wake/schedule/poll of one writer task per subscriber, glommio/futures glue), ≈{alloc:.0} % allocation (a fresh `Vec` per write batch), ≈{ours:.0} % the project's own fan-out code.",
            total / deliveries.max(1.0),
            raw_ir.map_or(String::new(), |r| format!(" vs {r:.0} for the raw baseline"))
        ));
    }
    for b in &bullets {
        writeln!(w, "- {b}")?;
    }
    if bullets.is_empty() {
        writeln!(w, "(no profile was recorded in this run)")?;
    }
    writeln!(w)?;
    writeln!(w, "Raw data: the JSON lines of every run are in `target/bench-load/results.jsonl` after `benches/run.sh` (one object per run, every step included).")?;
    writeln!(w, "{END}")?;

    // ---- splice into RESULTS.md
    let existing = std::fs::read_to_string(&out).unwrap_or_default();
    let updated = match (existing.find(BEGIN), existing.find(END)) {
        (Some(b), Some(e)) if e > b => format!("{}{}{}", &existing[..b], md.trim_end(), &existing[e + END.len()..]),
        _ => {
            let mut s = existing.clone();
            if !s.is_empty() && !s.ends_with("\n\n") {
                s.push_str(if s.ends_with('\n') { "\n" } else { "\n\n" });
            }
            s.push_str(&md);
            s
        }
    };
    std::fs::write(&out, updated).with_context(|| format!("writing {out}"))?;
    eprintln!("wrote the load section of {out}");
    Ok(())
}
