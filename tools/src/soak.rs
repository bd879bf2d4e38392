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
#[path = "soak/coordinator.rs"]
mod coordinator;
#[allow(dead_code)]
mod procfs;
#[path = "soak/worker.rs"]
mod worker;
#[path = "soak/ws.rs"]
mod ws;

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
        Some("run") => cli::Args::parse(&argv[1..]).and_then(|a| coordinator::run(&a)),
        Some("__worker") => cli::Args::parse(&argv[1..]).and_then(|a| worker::worker_main(&a)),
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

