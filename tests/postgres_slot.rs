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
use support::{psql_port as psql, service_key, Server};

type Socket = tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<std::net::TcpStream>>;

const ROWS: i64 = 1000;
const MISSED: &str = "Changes committed while the replication stream was down were missed (the server was away too long or too much WAL was pending); refetch the data";


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

// ---------------------------------------------------------------------------------------------
// Failover to a promoted replica (issue 11): PostgreSQL 15 does not copy logical slots to
// standbys, so a replica promoted as it is has no slot (the server recreates it and says changes
// were missed); failover tooling that carries the slot over (Patroni's permanent slots,
// pg_failover_slots) puts the slot's state into the replica before promotion, which the test
// does by copying `pg_replslot/powa_realtime` into the stopped standby (then nothing is lost).
// ---------------------------------------------------------------------------------------------

/// Runs a PostgreSQL program as the `postgres` OS user (the tests run as root).
fn pg_tool(program: &str, args: &[&str]) -> String {
    let bin = Cluster::bin_dir().unwrap().join(program);
    let output = Command::new("runuser").args(["-u", "postgres", "--"]).arg(bin).args(args).current_dir("/").stdin(Stdio::null()).output().unwrap();
    assert!(output.status.success(), "{program} {args:?}: {}{}", String::from_utf8_lossy(&output.stderr), String::from_utf8_lossy(&output.stdout));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A streaming standby of `primary` made with `pg_basebackup -R`, started on a free port. It
/// keeps 512 MB of WAL (`wal_keep_size`), so WAL back to a slot carried over later is still
/// there after its restartpoints.
fn standby_of(primary: &Cluster, root: &std::path::Path) -> Cluster {
    let dir = root.join("standby");
    std::fs::create_dir_all(dir.join("data")).unwrap();
    let data = dir.join("data");
    assert!(Command::new("chown").args(["postgres:postgres"]).arg(&data).status().unwrap().success());
    assert!(Command::new("chmod").arg("700").arg(&data).status().unwrap().success());
    let port = primary.port().to_string();
    pg_tool("pg_basebackup", &["-h", "127.0.0.1", "-p", &port, "-U", "postgres", "-D", data.to_str().unwrap(), "-X", "stream", "-R", "-c", "fast"]);
    let auto = data.join("postgresql.auto.conf");
    let mut conf = std::fs::read_to_string(&auto).unwrap();
    conf.push_str("wal_keep_size = '512MB'\n");
    std::fs::write(&auto, conf).unwrap();
    let standby = Cluster::start(&data, replication::cluster::free_port()).expect("start the standby");
    let deadline = Instant::now() + Duration::from_secs(20);
    while psql(primary.port(), "select count(*) from pg_stat_replication where application_name <> 'powa-realtime' and state = 'streaming'").unwrap() != "1" {
        assert!(Instant::now() < deadline, "the standby does not stream");
        std::thread::sleep(Duration::from_millis(100));
    }
    standby
}

/// Stops the primary and waits until the standby has replayed everything up to the primary's
/// shutdown checkpoint (so every row committed on the primary is on the standby).
fn stop_primary_and_wait_for_replay(primary: &mut Cluster, standby: &Cluster) {
    primary.stop();
    let control = pg_tool("pg_controldata", &["-D", primary.data_dir().to_str().unwrap()]);
    let checkpoint = control.lines().find_map(|l| l.strip_prefix("Latest checkpoint location:")).expect("checkpoint location").trim().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    while psql(standby.port(), &format!("select pg_last_wal_replay_lsn() >= '{checkpoint}'::pg_lsn")).unwrap() != "t" {
        assert!(Instant::now() < deadline, "the standby did not replay up to the primary's shutdown checkpoint {checkpoint}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Stops the standby, optionally copies `slot_dir` (the primary's `pg_replslot/<slot>`) into it,
/// detaches it from the old primary and starts it on `port` (the old primary's), then promotes
/// it (unless it was promoted already) and waits until it accepts writes.
fn promote_on(mut standby: Cluster, port: u16, slot_dir: Option<&std::path::Path>) -> Cluster {
    let data = standby.data_dir().to_path_buf();
    standby.stop();
    drop(standby);
    if let Some(slot_dir) = slot_dir {
        let target = data.join("pg_replslot/powa_realtime");
        assert!(Command::new("cp").arg("-a").arg(slot_dir).arg(&target).status().unwrap().success());
    }
    let auto = data.join("postgresql.auto.conf");
    let conf: String = std::fs::read_to_string(&auto).unwrap().lines().filter(|l| !l.starts_with("primary_conninfo")).map(|l| format!("{l}\n")).collect();
    std::fs::write(&auto, conf).unwrap();
    let promoted = Cluster::start(&data, port).expect("start the standby on the primary's port");
    if psql(port, "select pg_is_in_recovery()").unwrap() == "t" {
        pg_tool("pg_ctl", &["promote", "-w", "-D", data.to_str().unwrap()]);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while psql(port, "select pg_is_in_recovery()").unwrap() != "f" {
        assert!(Instant::now() < deadline, "the standby was not promoted");
        std::thread::sleep(Duration::from_millis(50));
    }
    promoted
}

fn slots(port: u16) -> String {
    psql(port, "select slot_name, slot_type, plugin, temporary, active from pg_replication_slots order by 1").unwrap()
}

/// (a) A replica promoted without the slot (PostgreSQL 15 as it is), reached at the primary's
/// address: the server finds no slot, creates one, tells subscribers changes were missed
/// (a row committed on the promoted replica before the server reached it is not delivered), and
/// changes flow again.
#[test]
fn failover_to_a_replica_without_the_slot_recreates_it_and_says_changes_were_missed() {
    let (mut primary, guard) = Cluster::throwaway().expect("PostgreSQL 15");
    setup(&primary);
    let standby = standby_of(&primary, guard.path());
    let port = primary.port();
    let server = Server::start(&[("DATABASE_URL", &primary.url())]);
    let mut socket = connect(&server);
    primary.psql("insert into events values (1)").unwrap();
    let (ids, _) = collect_until(&mut socket, 1, Duration::from_secs(10));
    assert_eq!(ids, [1]);
    assert_eq!(slots(port), "powa_realtime|logical|pgoutput|f|t");
    stop_primary_and_wait_for_replay(&mut primary, &standby);
    assert_eq!(slots(standby.port()), "", "PostgreSQL 15 keeps no logical slot on a standby");
    // Promote where the server cannot see it yet, commit a row there, then move it to the
    // primary's address.
    let standby_data = standby.data_dir().to_path_buf();
    let standby_port = standby.port();
    pg_tool("pg_ctl", &["promote", "-w", "-D", standby_data.to_str().unwrap()]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while psql(standby_port, "select pg_is_in_recovery()").unwrap() != "f" {
        assert!(Instant::now() < deadline, "not promoted");
        std::thread::sleep(Duration::from_millis(50));
    }
    psql(standby_port, "insert into events values (2)").unwrap();
    let promoted = promote_on(standby, port, None);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut system = Vec::new();
    loop {
        assert!(Instant::now() < deadline, "no missed-changes message: {system:?}");
        if let Some(v) = read(&mut socket) {
            assert_ne!(v[3], "postgres_changes", "row 2 was committed before the slot existed: {v}");
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
    assert_eq!(slots(port), "powa_realtime|logical|pgoutput|f|t", "the server made a new slot on the promoted replica");
    promoted.psql("insert into events values (3)").unwrap();
    let (ids, _) = collect_until(&mut socket, 1, Duration::from_secs(10));
    assert_eq!(ids, [3]);
}

/// (b) A replica promoted *with* the slot, as failover tooling does it (the slot's state put
/// into the standby before promotion: here `pg_replslot/powa_realtime` copied from the stopped
/// primary into the stopped standby, which keeps the WAL back to the slot's `restart_lsn`),
/// reached at the primary's address while a writer commits 1,000 rows (retrying while no
/// primary accepts writes): the server resumes from the slot and every row arrives exactly
/// once, in order, with no missed-changes message.
#[test]
fn failover_to_a_replica_promoted_with_the_slot_loses_nothing() {
    let (mut primary, guard) = Cluster::throwaway().expect("PostgreSQL 15");
    setup(&primary);
    let standby = standby_of(&primary, guard.path());
    let port = primary.port();
    let server = Server::start(&[("DATABASE_URL", &primary.url())]);
    let mut socket = connect(&server);
    let writer = writer(port);
    let slot_copy = guard.path().join("slot-copy");
    let switcher = {
        let slot_copy = slot_copy.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(800));
            stop_primary_and_wait_for_replay(&mut primary, &standby);
            // What the failover tool carries over: the slot as the primary last saved it (at
            // its shutdown checkpoint).
            assert!(Command::new("cp").arg("-a").arg(primary.data_dir().join("pg_replslot/powa_realtime")).arg(&slot_copy).status().unwrap().success());
            let promoted = promote_on(standby, port, Some(&slot_copy));
            (primary, promoted)
        })
    };
    let (ids, system) = collect(&mut socket, Duration::from_secs(120));
    writer.join().unwrap();
    let (_old_primary, promoted) = switcher.join().unwrap();
    assert_all_once_in_order(&ids, &system);
    assert!(!system.iter().any(|s| s["message"] == MISSED), "{system:?}");
    assert!(system.iter().any(|s| s["status"] == "error"), "the drop was announced: {system:?}");
    assert_eq!(slots(promoted.port()), "powa_realtime|logical|pgoutput|f|t", "the server streams from the carried-over slot");
}

/// Reads until `n` changes arrived (bounded); returns their ids and the `system` messages.
fn collect_until(socket: &mut Socket, n: usize, within: Duration) -> (Vec<i64>, Vec<Value>) {
    let deadline = Instant::now() + within;
    let (mut ids, mut system) = (Vec::new(), Vec::new());
    while ids.len() < n {
        assert!(Instant::now() < deadline, "only {ids:?} arrived; system {system:?}");
        if let Some(v) = read(socket) {
            if v[3] == "postgres_changes" {
                ids.push(v[4]["data"]["record"]["id"].as_i64().unwrap());
            } else if v[3] == "system" {
                system.push(v[4].clone());
            }
        }
    }
    (ids, system)
}
