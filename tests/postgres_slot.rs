//! The replication slot (issue 11 item 3): no change is lost across a reconnect — the walsender
//! killed, PostgreSQL restarted — while a writer commits 1,000 rows (all arrive exactly once, in
//! commit order); the bounds (retained WAL, time away) drop and recreate the slot and tell
//! subscribers — at a reconnect and, for retained WAL, while streaming; a stale slot is dropped
//! at start; a clean stop (drain) drops the slot.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use replication::cluster::Cluster;
use serde_json::{json, Value};
use support::{service_key, Server};

type Socket = tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<std::net::TcpStream>>;

const ROWS: i64 = 1000;
const MISSED: &str = "Changes committed while the replication stream was down were missed (the server was away too long or too much WAL was pending); refetch the data";

fn psql(port: u16, sql: &str) -> Result<String, String> {
    let psql = Cluster::bin_dir().map_err(|e| e.to_string())?.join("psql");
    let output = Command::new(psql)
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-At", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-p"])
        .arg(port.to_string())
        .arg("-c")
        .arg(sql)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

fn setup(cluster: &Cluster) {
    cluster
        .psql("create role anon nologin; create role authenticated nologin; create role service_role nologin bypassrls; \
               create table events (id int primary key); grant select on events to service_role; \
               create table filler (body text); \
               create publication supabase_realtime for table events;")
        .unwrap();
}

fn connect(server: &Server) -> Socket {
    let (mut socket, _) = tungstenite::connect(server.ws_url(&service_key(), "2.0.0")).unwrap();
    if let tungstenite::stream::MaybeTlsStream::Plain(stream) = socket.get_mut() {
        stream.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    }
    let join = json!(["1", "1", "realtime:ev", "phx_join", {"config": {"postgres_changes": [{"event": "INSERT", "schema": "public", "table": "events"}]}}]);
    socket.send(tungstenite::Message::text(join.to_string())).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(Instant::now() < deadline, "no Subscribed");
        if let Some(v) = read(&mut socket) {
            if is_status(&v, "ok") {
                return socket;
            }
        }
    }
}

fn read(socket: &mut Socket) -> Option<Value> {
    match socket.read() {
        Ok(tungstenite::Message::Text(text)) => serde_json::from_str(&text).ok(),
        _ => None,
    }
}

fn is_status(value: &Value, status: &str) -> bool {
    value[3] == "system" && value[4]["extension"] == "postgres_changes" && value[4]["status"] == status
}

/// Commits rows 1..=ROWS, one transaction each, in chunks of 10 per psql call, retrying a chunk
/// that fails (PostgreSQL restarting; `on conflict do nothing` keeps a retried chunk's rows
/// committed once).
fn writer(port: u16) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for chunk in 0..ROWS / 10 {
            let sql: String = (1..=10).map(|i| format!("BEGIN; INSERT INTO events VALUES ({}) ON CONFLICT DO NOTHING; COMMIT; SELECT pg_sleep(0.002); ", chunk * 10 + i)).collect();
            let deadline = Instant::now() + Duration::from_secs(60);
            while let Err(error) = psql(port, &sql) {
                assert!(Instant::now() < deadline, "the writer could not commit chunk {chunk}: {error}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    })
}

/// Reads until every row arrived (and 1.5 s more, to catch duplicates); returns the ids in
/// arrival order and the `system` messages seen.
fn collect(socket: &mut Socket, within: Duration) -> (Vec<i64>, Vec<Value>) {
    let deadline = Instant::now() + within;
    let mut ids = Vec::new();
    let mut system = Vec::new();
    let mut quiet_until: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if now > deadline || quiet_until.is_some_and(|q| now > q) {
            return (ids, system);
        }
        if let Some(v) = read(socket) {
            if v[3] == "postgres_changes" {
                ids.push(v[4]["data"]["record"]["id"].as_i64().unwrap());
                if ids.len() as i64 >= ROWS && quiet_until.is_none() {
                    quiet_until = Some(Instant::now() + Duration::from_millis(1500));
                }
            } else if v[3] == "system" {
                system.push(v[4].clone());
            }
        }
    }
}

fn assert_all_once_in_order(ids: &[i64], system: &[Value]) {
    let expected: Vec<i64> = (1..=ROWS).collect();
    if ids != expected {
        let mut seen = std::collections::BTreeMap::new();
        for id in ids {
            *seen.entry(*id).or_insert(0) += 1;
        }
        let missing: Vec<i64> = expected.iter().filter(|i| !seen.contains_key(i)).copied().collect();
        let duplicated: Vec<i64> = seen.iter().filter(|(_, n)| **n > 1).map(|(i, _)| *i).collect();
        panic!("{} changes; missing {missing:?}; duplicated {duplicated:?}; out of order: {}; system: {system:?}", ids.len(), ids.windows(2).any(|w| w[0] >= w[1]));
    }
}

fn slot_retained(port: u16) -> Vec<(String, i64)> {
    psql(port, "select slot_name, pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint from pg_replication_slots order by 1")
        .unwrap()
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (name, bytes) = l.split_once('|').unwrap();
            (name.to_string(), bytes.parse().unwrap())
        })
        .collect()
}

#[test]
fn walsender_killed_while_writing_loses_nothing() {
    let (cluster, _guard) = Cluster::throwaway().expect("PostgreSQL 15");
    setup(&cluster);
    let server = Server::start(&[("DATABASE_URL", &cluster.url())]);
    let mut socket = connect(&server);
    let port = cluster.port();
    let writer = writer(port);
    // Kill the walsender twice while the writer runs.
    let killer = std::thread::spawn(move || {
        for _ in 0..2 {
            std::thread::sleep(Duration::from_millis(700));
            psql(port, "select pg_terminate_backend(pid) from pg_stat_replication").unwrap();
        }
    });
    let (ids, system) = collect(&mut socket, Duration::from_secs(90));
    writer.join().unwrap();
    killer.join().unwrap();
    assert_all_once_in_order(&ids, &system);
    assert!(system.iter().any(|s| s["status"] == "error"), "the drop was announced: {system:?}");
    assert!(system.iter().any(|s| s["status"] == "ok"), "the stream's return was announced: {system:?}");
    assert!(!system.iter().any(|s| s["message"] == MISSED), "{system:?}");
}

#[test]
fn postgres_restarted_while_writing_loses_nothing() {
    let (cluster, _guard) = Cluster::throwaway().expect("PostgreSQL 15");
    setup(&cluster);
    let server = Server::start(&[("DATABASE_URL", &cluster.url())]);
    let mut socket = connect(&server);
    let port = cluster.port();
    let data_dir = cluster.data_dir().to_path_buf();
    let writer = writer(port);
    let restarter = std::thread::spawn(move || {
        let mut cluster = cluster;
        std::thread::sleep(Duration::from_millis(800));
        cluster.stop();
        std::thread::sleep(Duration::from_millis(500));
        Cluster::start(&data_dir, port).expect("restart PostgreSQL")
    });
    let (ids, system) = collect(&mut socket, Duration::from_secs(120));
    writer.join().unwrap();
    let cluster = restarter.join().unwrap();
    assert_all_once_in_order(&ids, &system);
    assert!(system.iter().any(|s| s["status"] == "error"), "{system:?}");
    assert!(!system.iter().any(|s| s["message"] == MISSED), "{system:?}");
    drop(cluster);
}

/// The server stops reading (SIGSTOP) while 4 MB of WAL is written and a row is committed;
/// with `REALTIME_SLOT_MAX_RETAINED_MB=1` the reconnect drops and recreates the slot, tells
/// subscribers that changes were missed, and the slot keeps no WAL afterwards. Later changes
/// flow again.
#[test]
fn exceeding_the_retained_wal_bound_recreates_the_slot_and_says_so() {
    let (cluster, _guard) = Cluster::throwaway().expect("PostgreSQL 15");
    setup(&cluster);
    let mut server = Server::start(&[("DATABASE_URL", &cluster.url()), ("REALTIME_SLOT_MAX_RETAINED_MB", "1")]);
    let mut socket = connect(&server);
    let port = cluster.port();
    let pid = server.pid().to_string();
    Command::new("kill").args(["-STOP", &pid]).status().unwrap();
    cluster.psql("insert into events values (1); insert into filler select repeat('x', 1000) from generate_series(1, 4000);").unwrap();
    let before = slot_retained(port);
    assert!(before.iter().any(|(name, bytes)| name == "powa_realtime" && *bytes > 1024 * 1024), "{before:?}");
    cluster.psql("select pg_terminate_backend(pid) from pg_stat_replication").unwrap();
    Command::new("kill").args(["-CONT", &pid]).status().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "no missed-changes message");
        if let Some(v) = read(&mut socket) {
            assert_ne!(v[3], "postgres_changes", "row 1 was committed while away and must not arrive: {v}");
            if is_status(&v, "error") && v[4]["message"] == MISSED {
                break;
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while read(&mut socket).is_none_or(|v| !is_status(&v, "ok")) {
        assert!(Instant::now() < deadline, "the stream did not come back");
    }
    let after = slot_retained(port);
    assert!(after.iter().all(|(_, bytes)| *bytes < 1024 * 1024), "the recreated slot keeps no WAL: {after:?}");
    assert_eq!(after.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["powa_realtime"]);
    cluster.psql("insert into events values (2)").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(Instant::now() < deadline, "row 2 did not arrive");
        if let Some(v) = read(&mut socket) {
            if v[3] == "postgres_changes" {
                assert_eq!(v[4]["data"]["record"]["id"], 2);
                break;
            }
        }
    }
    assert!(server.is_running());
}

/// The bound is watched while the stream is up, not only at a reconnect: a transaction left
/// open holds the slot's `restart_lsn` back while 4 MB of WAL is written, so the slot retains
/// more than `REALTIME_SLOT_MAX_RETAINED_MB=1` although the server reads everything. Within the
/// watch's period (10 s) the server leaves the stream, drops and recreates the slot (creating it
/// waits for the open transaction, which the test then ends), tells subscribers changes were
/// missed and comes back; `pg_replication_slots` then shows one slot that retains no WAL, and
/// later changes flow.
#[test]
fn exceeding_the_retained_wal_bound_while_streaming_recreates_the_slot_and_says_so() {
    let (cluster, _guard) = Cluster::throwaway().expect("PostgreSQL 15");
    setup(&cluster);
    let mut server = Server::start(&[("DATABASE_URL", &cluster.url()), ("REALTIME_SLOT_MAX_RETAINED_MB", "1")]);
    let mut socket = connect(&server);
    let port = cluster.port();
    // A session that keeps a transaction (with an xid) open.
    let psql_bin = Cluster::bin_dir().unwrap().join("psql");
    let mut holder = Command::new(psql_bin)
        .args(["-X", "-q", "-At", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-p"])
        .arg(port.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut holder_in = holder.stdin.take().unwrap();
    use std::io::Write;
    writeln!(holder_in, "BEGIN; INSERT INTO filler VALUES ('held open');").unwrap();
    holder_in.flush().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while psql(port, "select count(*) from pg_stat_activity where state = 'idle in transaction'").unwrap() != "1" {
        assert!(Instant::now() < deadline, "the open transaction did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    cluster.psql("insert into events values (1); insert into filler select repeat('x', 1000) from generate_series(1, 4000);").unwrap();
    // Row 1 is delivered: the stream is up and reading.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(Instant::now() < deadline, "row 1 did not arrive");
        if let Some(v) = read(&mut socket) {
            if v[3] == "postgres_changes" {
                assert_eq!(v[4]["data"]["record"]["id"], 1);
                break;
            }
        }
    }
    let walsender = psql(port, "select pid from pg_stat_replication").unwrap();
    assert!(!walsender.is_empty(), "streaming");
    let before = slot_retained(port);
    assert!(before.iter().any(|(name, bytes)| name == "powa_realtime" && *bytes > 1024 * 1024), "{before:?}");
    // The watch (every 10 s) makes the server leave the stream.
    let deadline = Instant::now() + Duration::from_secs(25);
    while psql(port, &format!("select count(*) from pg_stat_replication where pid = {walsender}")).unwrap() != "0" {
        assert!(Instant::now() < deadline, "the server did not leave the stream over the bound: {:?}", slot_retained(port));
        let _ = read(&mut socket);
    }
    writeln!(holder_in, "ROLLBACK;").unwrap();
    drop(holder_in);
    let _ = holder.wait();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut system = Vec::new();
    loop {
        assert!(Instant::now() < deadline, "no missed-changes message: {system:?}");
        if let Some(v) = read(&mut socket) {
            assert_ne!(v[3], "postgres_changes", "{v}");
            if v[3] == "system" {
                system.push(v[4].clone());
            }
            if is_status(&v, "error") && v[4]["message"] == MISSED {
                break;
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while read(&mut socket).is_none_or(|v| !is_status(&v, "ok")) {
        assert!(Instant::now() < deadline, "the stream did not come back");
    }
    let after = slot_retained(port);
    assert_eq!(after.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["powa_realtime"], "{after:?}");
    assert!(after.iter().all(|(_, bytes)| *bytes < 1024 * 1024), "the recreated slot keeps no WAL: {after:?}");
    cluster.psql("insert into events values (2)").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(Instant::now() < deadline, "row 2 did not arrive");
        if let Some(v) = read(&mut socket) {
            if v[3] == "postgres_changes" {
                assert_eq!(v[4]["data"]["record"]["id"], 2);
                break;
            }
        }
    }
    assert!(server.is_running());
}

/// With `REALTIME_SLOT_MAX_AWAY_SECS=1`, a server that stopped reading for 3 s gets a new slot
/// and the missed-changes message.
#[test]
fn exceeding_the_away_bound_recreates_the_slot_and_says_so() {
    let (cluster, _guard) = Cluster::throwaway().expect("PostgreSQL 15");
    setup(&cluster);
    let server = Server::start(&[("DATABASE_URL", &cluster.url()), ("REALTIME_SLOT_MAX_AWAY_SECS", "1")]);
    let mut socket = connect(&server);
    let pid = server.pid().to_string();
    Command::new("kill").args(["-STOP", &pid]).status().unwrap();
    cluster.psql("insert into events values (1)").unwrap();
    std::thread::sleep(Duration::from_secs(3));
    cluster.psql("select pg_terminate_backend(pid) from pg_stat_replication").unwrap();
    Command::new("kill").args(["-CONT", &pid]).status().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "no missed-changes message");
        if let Some(v) = read(&mut socket) {
            assert_ne!(v[3], "postgres_changes", "{v}");
            if is_status(&v, "error") && v[4]["message"] == MISSED {
                break;
            }
        }
    }
}

/// A stale slot (a crashed server's, retaining WAL) is dropped at start; a clean stop (SIGTERM,
/// drain) drops the server's slot, so nothing retains WAL afterwards.
#[test]
fn a_stale_slot_is_dropped_at_start_and_a_clean_stop_drops_the_slot() {
    let (cluster, _guard) = Cluster::throwaway().expect("PostgreSQL 15");
    setup(&cluster);
    let port = cluster.port();
    cluster.psql("select pg_create_logical_replication_slot('powa_realtime', 'pgoutput')").unwrap();
    cluster.psql("insert into filler select repeat('x', 1000) from generate_series(1, 3000)").unwrap();
    assert!(slot_retained(port)[0].1 > 1024 * 1024);
    let mut server = Server::start(&[("DATABASE_URL", &cluster.url())]);
    let _socket = connect(&server);
    let slots = slot_retained(port);
    assert_eq!(slots.len(), 1, "{slots:?}");
    assert!(slots[0].1 < 1024 * 1024, "the stale slot was replaced: {slots:?}");
    server.signal(libc_sigterm());
    let status = server.wait_exit(Duration::from_secs(30)).expect("the server stops");
    assert!(status.success(), "{status:?}");
    assert_eq!(psql(port, "select count(*) from pg_replication_slots").unwrap(), "0", "the slot was dropped at the clean stop");
}

fn libc_sigterm() -> i32 {
    15
}
