//! A short run of `tools/soak.sh` (issue 16 part 5) in the normal suite: a couple of thousand
//! connections with churn, member broadcasts and Postgres Changes for about a minute against
//! the debug binary, sampled every 5 s. The CSV must have its samples and both verdicts must
//! hold: memory flat after the mark, no lost delivery.

mod pgsupport;
mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use pgsupport::Db;

#[test]
fn a_short_soak_keeps_memory_flat_and_loses_nothing() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::env::temp_dir().join(format!("powa-soak-smoke-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let db = Db::new();
    let started = Instant::now();
    let output = Command::new("bash")
        .arg(root.join("tools/soak.sh"))
        .args(["--profile", "debug", "--server-bin", support::binary()])
        .args(["--conns", "2000", "--workers", "2", "--duration-s", "60", "--sample-s", "5", "--mark-s", "20"])
        .args(["--churn-per-s", "40", "--hold-ms", "2000", "--room-size", "50", "--publish-per-s", "100"])
        .args(["--database-url", &db.url(), "--pg-per-s", "20", "--pg-subs", "100"])
        .arg("--out")
        .arg(&out)
        .current_dir(root)
        .output()
        .expect("run tools/soak.sh");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("{stderr}\n{stdout}\nsoak smoke took {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(240), "the smoke run is meant to be short");

    let csv = std::fs::read_to_string(out.join("soak.csv")).expect("soak.csv");
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().expect("a header").split(',').collect();
    let rows: Vec<Vec<f64>> = lines.map(|l| l.split(',').map(|v| v.parse::<f64>().expect("a number")).collect()).collect();
    assert!(rows.len() >= 11, "one sample every 5 s for 60 s: {} rows", rows.len());
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap_or_else(|| panic!("column {name}"));
    let last = rows.last().unwrap();
    assert!(rows.iter().all(|r| r[col("rss_kib")] > 0.0 && r[col("fds")] > 0.0), "every sample has the server's RSS and fds");
    assert!(last[col("open_conns")] >= 1900.0, "the connections stayed up: {}", last[col("open_conns")]);
    assert!(last[col("churn_cycles")] >= 600.0, "churn happened: {}", last[col("churn_cycles")]);
    assert!(last[col("deliveries")] >= 50_000.0, "broadcasts were delivered: {}", last[col("deliveries")]);
    assert!(last[col("pg_deliveries")] >= 20_000.0, "Postgres changes were delivered: {}", last[col("pg_deliveries")]);
    assert_eq!(last[col("lost")], 0.0, "no broadcast lost");
    assert_eq!(last[col("pg_lost")], 0.0, "no change lost");

    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).expect("summary.json")).expect("JSON");
    assert_eq!(summary["delivery_verdict"], "pass", "{summary:#}");
    assert_eq!(summary["memory_verdict"], "pass", "{summary:#}");
    assert_eq!(summary["pg_tail_lost"], 0, "{summary:#}");
    assert!(stdout.contains("VERDICT memory=pass") && stdout.contains("deliveries=pass"), "{stdout}");
    assert!(output.status.success(), "tools/soak.sh exited with {}", output.status);
    if Command::new("gnuplot").arg("--version").output().is_ok() {
        assert!(out.join("soak.png").exists(), "gnuplot is installed, so the plot is drawn");
    }
    let _ = std::fs::remove_dir_all(&out);
}
