//! W5: Postgres Changes deliveries per second with K subscribers, with and without RLS.
//!
//! Starts a throwaway PostgreSQL 15 cluster and the release server, joins K raw V2 WebSocket
//! subscribers (each with its own user token, so K distinct claims groups), inserts M rows in
//! one transaction, and measures from COMMIT to the moment every subscriber has received every
//! change. Deliveries/s = K × M / that time. Two tables: `open_items` (no RLS) and `rls_items`
//! (RLS enabled, policy `to authenticated using (true)`: every subscriber may see every row, so
//! every change is RLS-checked for every claims group).
//!
//! Usage: `cargo run --release -p powa-benches --bin pgchanges_load -- [K...]` (default 1 100 1000;
//! M = 200 rows). Loopback only; bounded by a 120 s timeout per run.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use powa_benches::driver::{contains, frame, read_frame, start_server, token, ws_connect};
use replication::cluster::Cluster;

fn rows() -> u64 {
    std::env::var("W5_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(200)
}

/// Returns deliveries/s for K subscribers on `table`, the time to deliver all, and the time
/// until all K subscriptions were live (connect + join + `Subscribed to PostgreSQL`, tokens
/// minted beforehand).
fn run(cluster: &Cluster, k: usize, table: &str) -> (f64, Duration, Duration) {
    let log = std::env::var("W5_SERVER_LOG").unwrap_or_else(|_| "warn".into());
    let (_server, port) = start_server(&cluster.url(), &[("RUST_LOG", log)]);
    let received = Arc::new(AtomicU64::new(0));
    let ready = Arc::new(Barrier::new(k + 1));
    let expected = rows();
    let mut threads = Vec::new();
    let tokens: Vec<String> = (0..k).map(|i| token("authenticated", &format!("00000000-0000-0000-0000-{:012}", i + 1))).collect();
    let subscribing = Instant::now();
    for tok in tokens {
        let received = Arc::clone(&received);
        let ready = Arc::clone(&ready);
        let table = table.to_string();
        threads.push(std::thread::spawn(move || {
            let mut stream = ws_connect(port, &tok);
            let join = format!(r#"["1","1","realtime:w5","phx_join",{{"config":{{"postgres_changes":[{{"event":"INSERT","schema":"public","table":"{table}"}}]}}}}]"#);
            stream.write_all(&frame(&join)).unwrap();
            loop {
                let frame = read_frame(&mut stream);
                if contains(&frame, b"Subscribed to PostgreSQL") {
                    break;
                }
                assert!(!contains(&frame, b"\"status\":\"error\""), "subscription failed: {}", String::from_utf8_lossy(&frame));
            }
            ready.wait();
            let mut got = 0;
            while got < expected {
                let frame = read_frame(&mut stream);
                if contains(&frame, b"postgres_changes") {
                    got += 1;
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    ready.wait();
    let subscribed = subscribing.elapsed();
    let started = Instant::now();
    if std::env::var_os("W5_TRACE").is_some() {
        eprintln!("insert starts at unix {:?}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap());
    }
    cluster
        .psql(&format!("insert into {table} (v) select g from generate_series(1, {}) g", rows()))
        .expect("insert");
    let commit_done = started.elapsed();
    let first_seen = Instant::now();
    while received.load(Ordering::Relaxed) == 0 && first_seen.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_micros(200));
    }
    if std::env::var_os("W5_TRACE").is_some() {
        eprintln!("k={k} {table}: psql returned after {:?}, first delivery {:?} after start (unix {:?})", commit_done, started.elapsed(), std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap());
    }
    for thread in threads {
        thread.join().expect("subscriber");
    }
    let elapsed = started.elapsed();
    let total = received.load(Ordering::Relaxed);
    assert_eq!(total, rows() * k as u64);
    let _ = commit_done;
    (total as f64 / elapsed.as_secs_f64(), elapsed, subscribed)
}

fn main() {
    let ks: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let ks = if ks.is_empty() { vec![1, 100, 1000] } else { ks };
    let (cluster, _guard) = Cluster::throwaway().expect("PostgreSQL cluster (install postgresql-15)");
    // The server creates these roles at its first start; the bench needs them before that.
    cluster
        .psql("create role anon nologin; create role authenticated nologin; create role service_role nologin bypassrls;")
        .expect("roles");
    cluster
        .psql(
            "create table open_items (id bigserial primary key, v int); \
             create table rls_items (id bigserial primary key, v int); \
             alter table rls_items enable row level security; \
             grant select on open_items, rls_items to anon, authenticated, service_role; \
             create publication supabase_realtime for table open_items, rls_items;",
        )
        .expect("schema");
    cluster.psql("create policy all_rows on rls_items for select to authenticated using (true)").expect("policy");
    println!("| subscribers | table | rows | all subscriptions live | time to deliver all | deliveries/s |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for k in ks {
        for table in ["open_items", "rls_items"] {
            let (rate, elapsed, subscribed) = run(&cluster, k, table);
            println!("| {k} | {table} | {} | {:.1} ms | {:.1} ms | {:.0} |", rows(), subscribed.as_secs_f64() * 1000.0, elapsed.as_secs_f64() * 1000.0, rate);
        }
    }
}
