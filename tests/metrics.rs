//! `/metrics` (README.md "Metrics"): every documented series appears, and the ones a normal
//! session drives move. One server on a real PostgreSQL 15 with a published RLS table; one raw
//! V1 client joins with presence and Postgres Changes, broadcasts, tracks, gets a change, fails
//! a join and leaves; a REST broadcast and a `realtime.send` come from outside.

mod pgsupport;
mod support;
mod wsclient;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use pgsupport::Db;
use serde_json::{json, Value};
use support::http_request;
use wsclient::*;

/// Series that must be above zero after the session below.
const MOVES: &[&str] = &[
    "realtime_connections",
    "realtime_connections_total",
    "realtime_channels",
    "realtime_topics",
    "realtime_joins_total",
    "realtime_leaves_total",
    "realtime_join_errors_total",
    "realtime_broadcasts_received_total",
    "realtime_rest_messages_total",
    "realtime_database_broadcasts_total",
    "realtime_deliveries_total",
    "realtime_delivery_latency_seconds",
    "realtime_presence_members",
    "realtime_presence_tracks_total",
    "realtime_presence_diffs_total",
    "realtime_shards",
    "realtime_shard_connections",
    "realtime_process_start_time_seconds",
    "realtime_process_resident_memory_bytes",
    "realtime_process_cpu_seconds_total",
    "realtime_process_open_fds",
    "realtime_process_max_fds",
    "realtime_database_up",
    "realtime_replication_confirmed_lsn",
    "realtime_postgres_changes_decoded_total",
    "realtime_postgres_changes_deliveries_total",
    "realtime_postgres_changes_subscriptions",
    "realtime_rls_checks_total",
    "realtime_rls_check_seconds",
];

/// Failure counters and lags: zero in a healthy run (their causes are driven by other tests,
/// e.g. `realtime_slow_consumer_closes_total` in tests/backpressure.rs), so only their
/// presence is checked here.
const MAY_BE_ZERO: &[&str] = &[
    "realtime_outbound_queue_bytes",
    "realtime_slow_consumer_closes_total",
    "realtime_shard_messages_dropped_total",
    "realtime_deliveries_dropped_total",
    "realtime_malformed_frames_total",
    "realtime_replication_lag_bytes",
    "realtime_replication_lag_seconds",
    "realtime_replication_reconnects_total",
    "realtime_postgres_transactions_dropped_total",
    "realtime_postgres_changes_dropped_total",
    "realtime_postgres_changes_inbox_dropped_total",
];

/// The metric names in README.md's "Metrics" table (first column, in backticks).
fn documented() -> Vec<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme.split("\n## Metrics\n").nth(1).expect("README.md has a Metrics section");
    let section = section.split("\n## ").next().unwrap();
    let names: Vec<String> = section
        .lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|rest| rest.split('`').next())
        .filter(|name| name.starts_with("realtime_"))
        .map(str::to_string)
        .collect();
    assert!(names.len() >= 30, "README.md documents only {} metrics", names.len());
    names
}

/// Sums every sample of each series (all label sets; a histogram by its `_count`).
fn scrape(addr: std::net::SocketAddr) -> BTreeMap<String, f64> {
    let (status, body) = http_request(addr, "GET", "/metrics", &[], b"").unwrap();
    assert_eq!(status, 200);
    let text = String::from_utf8(body).unwrap();
    let mut values: BTreeMap<String, f64> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad line {line:?}"));
        let name = series.split('{').next().unwrap();
        assert!(name.starts_with("realtime_"), "unprefixed series {line:?}");
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line:?}"));
        if let Some(base) = name.strip_suffix("_count") {
            values.insert(base.to_string(), value);
        }
        if name.ends_with("_bucket") || name.ends_with("_sum") {
            continue;
        }
        *values.entry(name.to_string()).or_default() += value;
    }
    values
}

/// Reads frames until one satisfies `wanted`; returns it.
fn until(client: &mut Client, what: &str, wanted: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match client.recv_frame(left) {
            Frame::Text(text) => {
                let frame: Value = serde_json::from_str(&text).unwrap();
                if wanted(&frame) {
                    return frame;
                }
            }
            other => panic!("waiting for {what}: {}", describe(&other)),
        }
    }
}

#[test]
fn every_documented_metric_appears_and_the_session_ones_move() {
    let documented = documented();
    for name in &documented {
        assert!(MOVES.contains(&name.as_str()) || MAY_BE_ZERO.contains(&name.as_str()), "{name} is documented but this test does not classify it");
    }
    for name in MOVES.iter().chain(MAY_BE_ZERO) {
        assert!(documented.iter().any(|d| d == name), "{name} is checked here but not documented in README.md");
    }

    let mut db = Db::new();
    db.exec(
        "CREATE TABLE public.items (id serial PRIMARY KEY, body text);
         ALTER TABLE public.items ENABLE ROW LEVEL SECURITY;
         CREATE POLICY items_read ON public.items FOR SELECT USING (true);
         CREATE PUBLICATION supabase_realtime FOR TABLE public.items;",
    );
    let server = db.server();
    db.exec("GRANT SELECT ON public.items TO anon, authenticated");
    let topic = "realtime:metrics";
    let mut client = connect_v1(&server);
    let join_config = json!({
        "broadcast": {"self": true, "ack": false},
        "presence": {"key": "me", "enabled": true},
        "postgres_changes": [{"event": "*", "schema": "public", "table": "items"}],
        "private": false
    });
    client.send_text(&v1j(topic, "phx_join", json!({"config": join_config}), Some("1"), Some("1")));
    until(&mut client, "the join reply", |f| f["event"] == "phx_reply" && f["payload"]["status"] == "ok");
    until(&mut client, "Subscribed to PostgreSQL", |f| f["event"] == "system" && f["payload"]["message"] == "Subscribed to PostgreSQL");

    // Enough broadcasts that some are latency samples (1 frame in 64 per shard).
    for n in 0..140 {
        client.send_text(&v1j(topic, "broadcast", user_broadcast("hello", json!({ "n": n })), Some("2"), Some("1")));
        until(&mut client, "its own broadcast", |f| f["event"] == "broadcast" && f["payload"]["payload"]["n"] == n);
    }
    client.send_text(&v1j(topic, "presence", json!({"type": "presence", "event": "track", "payload": {"at": 1}}), Some("3"), Some("1")));
    until(&mut client, "the presence diff", |f| f["event"] == "presence_diff");
    db.exec("INSERT INTO public.items (body) VALUES ('one')");
    until(&mut client, "the change", |f| f["event"] == "postgres_changes");
    let key = support::service_key();
    let (status, _) = http_request(
        server.addr,
        "POST",
        "/api/broadcast",
        &[("Authorization", &format!("Bearer {key}")), ("Content-Type", "application/json")],
        json!({"messages": [{"topic": "metrics", "event": "rest", "payload": {}}]}).to_string().as_bytes(),
    )
    .unwrap();
    assert_eq!(status, 202);
    until(&mut client, "the REST broadcast", |f| f["event"] == "broadcast" && f["payload"]["event"] == "rest");
    db.exec("SELECT realtime.send('{\"x\": 1}'::jsonb, 'from-sql', 'metrics', false)");
    until(&mut client, "the SQL broadcast", |f| f["event"] == "broadcast" && f["payload"]["event"] == "from-sql");
    client.send_text(&v1j("realtime:refused", "phx_join", json!({"config": {}, "access_token": "not-a-jwt"}), Some("4"), Some("4")));
    until(&mut client, "the join error", |f| f["event"] == "phx_reply" && f["payload"]["status"] == "error");
    // A second channel, left again: one leave.
    join_v1(&mut client, "realtime:left", "5", config(false, false));
    client.send_text(&v1j("realtime:left", "phx_leave", json!({}), Some("6"), Some("5")));
    until(&mut client, "the leave reply", |f| f["event"] == "phx_reply" && f["ref"] == "6");
    // The sampled gauges are refreshed once a second.
    std::thread::sleep(Duration::from_millis(1300));

    let values = scrape(server.addr);
    let mut missing = Vec::new();
    let mut still = Vec::new();
    for name in &documented {
        match values.get(name) {
            None => missing.push(name.clone()),
            Some(value) if *value <= 0.0 && MOVES.contains(&name.as_str()) => still.push(name.clone()),
            Some(_) => {}
        }
    }
    assert!(missing.is_empty(), "documented but not exposed: {missing:?}\n{values:#?}");
    assert!(still.is_empty(), "did not move: {still:?}\n{values:#?}");
    assert_eq!(values["realtime_joins_total"], 2.0, "{values:#?}");
    assert_eq!(values["realtime_leaves_total"], 1.0);
    assert_eq!(values["realtime_join_errors_total"], 1.0);
    assert_eq!(values["realtime_presence_members"], 1.0);
}
