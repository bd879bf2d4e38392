//! `powa-load`: an open-loop load generator for powa-realtime and same-run baselines.
//!
//! The coordinator process starts worker processes (this binary again, hidden subcommand
//! `__worker`), each an epoll loop with its own 127.0.0.x source address, so one run can hold
//! more connections than the 20k-file limit of a single process. Publishers stamp each payload
//! with CLOCK_MONOTONIC and a per-publisher sequence number; receivers find those fields with a
//! substring search (no JSON parsing), record latency in a histogram and count gaps.
//! See `powa-load help`.

mod cli;
mod hist;
mod pool;
mod procfs;
mod report;
mod wire;
mod worker;
mod workloads;

use anyhow::{bail, Result};

const HELP: &str = "\
powa-load <workload> [options]      (loopback targets only)

workloads
  fanout     W1: 1 publisher → N subscribers on one topic; steps the offered deliveries/s up a
             ×--factor (2) ladder until the delivered rate stops growing (2 steps without +10 %),
             then up to two ×factor^(1/3) steps above the best kept-up step (kept up = no loss,
             ≥ 95 % delivered, p99 < --loose-p99-ms 500), then runs half of that peak. Reports
             that peak and the best step with p99 < the SLO.
             --subs N (1000) --payload BYTES (100) --start DELIVERIES/S (50000) --step-ms (2000)
             --drain-ms (2000) --max-steps (14) --slo-p99-ms (50) --no-half
             --rates D1,D2,…   fixed deliveries/s steps instead of the search
             --rate MSG/S --count M [--exec-before CMD] [--exec-after CMD]
                        one fixed publish of M messages (instruction counting)
  rooms      W2: every user joins an echo channel (self) and a group channel of --group (6)
             and sends --msg-rate (2) msg/s to each. --vus (6000) --duration-ms (10000)
  storm      W3: connect + join as fast as possible. --conns (15000) --concurrency (256 per worker)
  idle       W7: connect + join --conns (15000) idle connections; server memory per connection
             from RSS and /proc/meminfo Slab deltas. --settle-ms (3000) --hold-s (0)
             [--exec-before CMD] (run when the hold starts, e.g. a profiler)
  presence   W4 presence churn: not in powa-load; measured by `cargo bench -p powa-benches --bench presence`
  pgchanges  W5 Postgres Changes: not in powa-load; `cargo run --release -p powa-benches --bin pgchanges_load`
  rest       W6 REST ingest: not in powa-load; `cargo run --release -p powa-benches --bin storm_load`
  report     writes the load section of benches/RESULTS.md from a suite's JSON lines
             --results FILE --out FILE [--commit --date --command --pinning --versions
             --callgrind-powa FILE --callgrind-raw FILE --perf-fanout PREFIX --perf-idle PREFIX]

common options
  --target 127.0.0.1:4000   --publish-target ADDR (W1: the publisher on another node of a cluster)
  --proto phoenix|raw|nchan   --vsn 2|1   --binary (V2 kind-3 sends)
  --token JWT (phoenix)     --server-pid PID[,PID…]  (CPU and RSS from /proc)
  --per-worker 5000 (connections per worker process)  --src-first 2 --src-count 19 (127.0.0.x)
  --heartbeat 25 (s)  --read-delay-us 0  --label TEXT  --round N  --json-out FILE (append the JSON line)

Human-readable progress goes to stderr, one JSON line per run to stdout.
";

/// Workloads measured by other drivers (they need PostgreSQL or engine-level counting).
fn elsewhere(workload: &str, where_: &str) -> Result<()> {
    bail!("{workload}: not implemented in powa-load; it is measured by {where_} (see benches/RESULTS.md)")
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let result = run(argv);
    if let Err(error) = result {
        eprintln!("powa-load: {error:#}");
        std::process::exit(1);
    }
}

fn run(argv: Vec<String>) -> Result<()> {
    let Some(command) = argv.first() else {
        eprint!("{HELP}");
        bail!("missing workload");
    };
    let args = cli::Args::parse(&argv[1..])?;
    match command.as_str() {
        "fanout" | "w1" => workloads::fanout(&args),
        "rooms" | "w2" => workloads::rooms(&args),
        "storm" | "w3" => workloads::connections(&args, "W3"),
        "idle" | "w7" => workloads::connections(&args, "W7"),
        "presence" | "w4" => elsewhere("W4 presence churn", "`cargo bench -p powa-benches --bench presence`"),
        "pgchanges" | "w5" => elsewhere("W5 Postgres Changes", "`cargo run --release -p powa-benches --bin pgchanges_load`"),
        "rest" | "w6" => elsewhere("W6 REST ingest", "`cargo run --release -p powa-benches --bin storm_load`"),
        "report" => report::report(&args),
        "__worker" => worker_main(&args),
        "help" | "--help" | "-h" => {
            print!("{HELP}");
            Ok(())
        }
        other => bail!("unknown workload {other:?}; see `powa-load help`"),
    }
}

fn worker_main(args: &cli::Args) -> Result<()> {
    let target: String = args.req("target")?;
    let plan = match args.req::<String>("plan")?.as_str() {
        "sub" => worker::Plan::Sub,
        "pub" => worker::Plan::Pub,
        "rooms" => worker::Plan::Rooms,
        other => bail!("unknown plan {other}"),
    };
    let proto = wire::Proto::parse(&args.req::<String>("proto")?, &args.get("vsn", "2".to_string())?, args.flag("binary")).map_err(anyhow::Error::msg)?;
    let cfg = worker::Config {
        target: target.parse()?,
        src: args.req::<String>("src")?.parse()?,
        proto,
        token: args.get("token", String::new())?,
        plan,
        conns: args.req("conns")?,
        base: args.get("base", 0)?,
        payload: args.get("payload", 100)?,
        concurrency: args.get("concurrency", 256)?,
        heartbeat_secs: args.get("heartbeat", 25)?,
        topic_each: args.flag("topic-each"),
        fanout: args.get("fanout", 0)?,
        group: args.get("group", 6)?,
        read_delay_us: args.get("read-delay-us", 0)?,
    };
    args.finish()?;
    worker::Worker::new(cfg).run();
    Ok(())
}
