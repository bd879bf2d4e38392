//! Faults injected on purpose (issue 16 part 4): PostgreSQL frozen with SIGSTOP (it hangs, it
//! does not close) while clients join. Waits are bounded, the answers are the documented
//! strings, what needs no database keeps working, and everything recovers on SIGCONT.

mod pgsupport;
mod privsupport;
mod support;
mod wsclient;

use std::path::Path;
use std::time::{Duration, Instant};

use privsupport::*;

/// The pids of the processes serving `data_dir` (the postmaster and its backends).
fn postgres_pids(data_dir: &Path) -> Vec<i32> {
    let needle = data_dir.to_string_lossy().into_owned();
    let mut pids: Vec<i32> = Vec::new();
    let postmaster = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok().and_then(|text| text.lines().next().and_then(|l| l.trim().parse::<i32>().ok()));
    pids.extend(postmaster);
    for entry in std::fs::read_dir("/proc").unwrap().filter_map(Result::ok) {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else { continue };
        let parent = status.lines().find_map(|l| l.strip_prefix("PPid:")).and_then(|v| v.trim().parse::<i32>().ok());
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if parent.is_some_and(|p| pids.contains(&p)) || String::from_utf8_lossy(&cmdline).contains(&needle) {
            pids.push(pid);
        }
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}

fn signal_all(pids: &[i32], signal: i32) {
    for pid in pids {
        // SAFETY: kill(2) on processes of the cluster this test started.
        unsafe {
            libc::kill(*pid, signal);
        }
    }
}

/// Resumes the cluster even when an assertion fails half-way (a stopped postmaster would
/// otherwise outlive the test).
struct Frozen(Vec<i32>);

impl Drop for Frozen {
    fn drop(&mut self) {
        signal_all(&self.0, libc::SIGCONT);
    }
}

#[test]
fn a_frozen_database_gives_bounded_documented_errors_and_everything_recovers() {
    let (mut db, server) = start_with_acl();
    grant(&mut db, USER_A, "frozen-room", true);
    let mut c = Conn::open(&server, &user_token(USER_A), Vsn::V1, "frozen");
    c.join_ok("realtime:frozen-room", config(true, false, false), None);

    let pids = postgres_pids(db.cluster.data_dir());
    assert!(pids.len() >= 2, "found the postmaster and its backends: {pids:?}");
    signal_all(&pids, libc::SIGSTOP);
    let frozen = Frozen(pids);

    // A private join needs a policy check: it fails within the authorization deadline (15 s)
    // with the database error, instead of waiting for ever.
    let started = Instant::now();
    let topic = "realtime:frozen-other";
    let r = c.send(topic, "phx_join", serde_json::json!({"config": config(true, false, false)}));
    let reply = c.wait("the private join's reply", Duration::from_secs(30), |m| m.event == "phx_reply" && m.r#ref == serde_json::json!(r) && m.topic == topic);
    let waited = started.elapsed();
    let reason = c.error_reason(&reply);
    eprintln!("frozen database: the private join was answered after {waited:?}");
    assert_eq!(reason, "UnableToConnectToProject: Realtime was unable to connect to the project database");
    assert!(waited < Duration::from_secs(25), "the private join waited {waited:?}");
    // Public channels need no database: they join and broadcast as usual meanwhile.
    let mut p = Conn::open(&server, wsclient::anon(), Vsn::V2, "public");
    p.join_ok("realtime:frozen-public", config(false, true, true), None);
    let r = p.broadcast("realtime:frozen-public", "still", serde_json::json!({"db": "frozen"}));
    assert_eq!(p.reply(&r, Duration::from_secs(5)).payload["status"], "ok");
    p.broadcast_msg("realtime:frozen-public", "still");

    // SIGCONT: the same private join now succeeds.
    drop(frozen);
    grant(&mut db, USER_A, "frozen-after", false);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let reply = c.join("realtime:frozen-after", config(true, false, false), None);
        if reply.payload["status"] == "ok" {
            break;
        }
        assert!(Instant::now() < deadline, "no recovery after SIGCONT: {}", reply.raw);
        c.join_refs.remove("realtime:frozen-after");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A join config with Postgres Changes bindings on `public.<table>` for `event`.
fn changes_config(event: &str, table: &str) -> serde_json::Value {
    serde_json::json!({
        "broadcast": {"ack": false, "self": false},
        "presence": {"key": "", "enabled": false},
        "postgres_changes": [{"event": event, "schema": "public", "table": table}],
        "private": false
    })
}

/// Waits for the "Subscribed to PostgreSQL" notice of `topic`.
fn subscribed(c: &mut Conn, topic: &str) {
    let msg = c.wait("Subscribed to PostgreSQL", Duration::from_secs(20), |m| m.topic == topic && m.event == "system");
    assert_eq!(msg.payload["status"], "ok", "{}", msg.raw);
}

/// The next Postgres change on `topic`: its `data` object.
fn next_change(c: &mut Conn, topic: &str, timeout: Duration) -> serde_json::Value {
    let msg = c.wait("a Postgres change", timeout, |m| m.topic == topic && m.event == "postgres_changes");
    msg.payload["data"].clone()
}

/// Waits (bounded) until some backend of the cluster sleeps in `pg_sleep`.
fn wait_for_pg_sleep(db: &mut pgsupport::Db) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while db.one("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'") == "0" {
        assert!(Instant::now() < deadline, "no backend entered pg_sleep");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// PostgreSQL frozen while the RLS check of a Postgres change runs: the change is delivered
/// after the RLS deadline (10 s) with `errors` = `["Query was cancelled, please try again"]`
/// instead of stalling every later change; after SIGCONT the next change passes its check.
#[test]
fn a_database_frozen_during_the_rls_round_trip_gives_a_bounded_cancelled_error() {
    let mut db = pgsupport::Db::new();
    db.exec("CREATE TABLE public.todos (id int PRIMARY KEY, title text NOT NULL, owner_id uuid NOT NULL)");
    db.exec("CREATE PUBLICATION supabase_realtime FOR TABLE public.todos");
    let server = db.server();
    db.exec("GRANT SELECT ON public.todos TO anon, authenticated");
    db.exec("ALTER TABLE public.todos ENABLE ROW LEVEL SECURITY");
    // A policy that is slow for one title: the test freezes the database while it sleeps.
    db.exec(
        "CREATE FUNCTION public.slow_gate(t text) RETURNS boolean LANGUAGE plpgsql AS $$ \
         BEGIN IF t = 'slow' THEN PERFORM pg_sleep(3); END IF; RETURN true; END $$",
    );
    db.exec("CREATE POLICY own_todos ON public.todos FOR SELECT TO authenticated USING (owner_id = auth.uid() AND public.slow_gate(title))");
    let topic = "realtime:todos";
    let mut owner = Conn::open(&server, &user_token(USER_A), Vsn::V2, "owner");
    owner.join(topic, changes_config("INSERT", "todos"), None);
    subscribed(&mut owner, topic);
    db.exec(&format!("INSERT INTO public.todos VALUES (1, 'fast', '{USER_A}')"));
    let data = next_change(&mut owner, topic, Duration::from_secs(10));
    assert_eq!((data["record"]["id"].clone(), data["errors"].clone()), (serde_json::json!(1), serde_json::Value::Null), "{data}");

    db.exec(&format!("INSERT INTO public.todos VALUES (2, 'slow', '{USER_A}')"));
    let started = Instant::now();
    wait_for_pg_sleep(&mut db);
    let pids = postgres_pids(db.cluster.data_dir());
    signal_all(&pids, libc::SIGSTOP);
    let frozen = Frozen(pids);
    let data = next_change(&mut owner, topic, Duration::from_secs(30));
    let waited = started.elapsed();
    eprintln!("RLS round trip frozen: the change arrived after {waited:?} with errors {}", data["errors"]);
    assert_eq!(data["type"], "INSERT", "{data}");
    assert_eq!(data["errors"], serde_json::json!(["Query was cancelled, please try again"]), "{data}");
    assert!(waited < Duration::from_secs(20), "the change waited {waited:?}");
    // Public broadcast channels need no database meanwhile.
    let mut p = Conn::open(&server, wsclient::anon(), Vsn::V2, "public");
    p.join_ok("realtime:frozen-public", config(false, true, true), None);
    let r = p.broadcast("realtime:frozen-public", "still", serde_json::json!({}));
    assert_eq!(p.reply(&r, Duration::from_secs(5)).payload["status"], "ok");

    drop(frozen);
    db.exec(&format!("INSERT INTO public.todos VALUES (3, 'fast', '{USER_A}')"));
    let data = next_change(&mut owner, topic, Duration::from_secs(30));
    eprintln!("RLS round trip: after SIGCONT the next change arrived {:?} after the freeze began", started.elapsed());
    assert_eq!((data["record"]["id"].clone(), data["errors"].clone()), (serde_json::json!(3), serde_json::Value::Null), "{data}");
}

/// PostgreSQL frozen when a private channel refreshes its token: the re-check gets no answer,
/// and after the policy-check deadline (20 s) the channel is closed with the §6.3 text
/// `Realtime was unable to connect to the project database` instead of keeping the new claims
/// unchecked for ever; after SIGCONT the channel can be joined again.
#[test]
fn a_database_frozen_during_a_token_refresh_closes_the_private_channel_in_bounded_time() {
    let (mut db, server) = start_with_acl();
    grant(&mut db, USER_A, "refresh-room", false);
    let topic = "realtime:refresh-room";
    let mut c = Conn::open(&server, &user_token(USER_A), Vsn::V1, "refresher");
    c.join_ok(topic, config(true, false, false), None);
    let fresh = hs256(support::SECRET.as_bytes(), user_claims(USER_A, 7200));

    let pids = postgres_pids(db.cluster.data_dir());
    signal_all(&pids, libc::SIGSTOP);
    let frozen = Frozen(pids);
    let started = Instant::now();
    c.refresh(topic, &fresh);
    let message = c.closed_by_server(topic, Duration::from_secs(40));
    let waited = started.elapsed();
    eprintln!("token refresh with a frozen database: channel closed after {waited:?}: {message}");
    assert_eq!(message, "Realtime was unable to connect to the project database");
    assert!(waited < Duration::from_secs(30), "the refresh waited {waited:?}");
    c.heartbeat();

    drop(frozen);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let reply = c.join(topic, config(true, false, false), Some(&fresh));
        if reply.payload["status"] == "ok" {
            break;
        }
        assert!(Instant::now() < deadline, "no recovery after SIGCONT: {}", reply.raw);
        c.join_refs.remove(topic);
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A SELECT policy on realtime.messages that raises (a disk-full-like database error) counts
/// as a denial (PROTOCOL.md §6.5): that private join fails with `Unauthorized`; private
/// channels the policy does not trip over, and public ones, are unaffected.
#[test]
fn a_policy_that_raises_is_a_denial_and_other_channels_are_unaffected() {
    let (mut db, server) = start_with_acl();
    db.exec(
        "CREATE FUNCTION public.disk_full() RETURNS boolean LANGUAGE plpgsql AS $$ \
         BEGIN RAISE EXCEPTION 'could not extend file: No space left on device' USING ERRCODE = 'disk_full'; END $$",
    );
    db.exec("CREATE POLICY broken ON realtime.messages FOR SELECT TO authenticated USING (CASE WHEN realtime.topic() = 'broken-room' THEN public.disk_full() ELSE false END)");
    grant(&mut db, USER_A, "fine-room", true);
    let mut c = Conn::open(&server, &user_token(USER_A), Vsn::V2, "user");
    for _ in 0..3 {
        assert_eq!(c.join_error("realtime:broken-room", config(true, false, false), None), unauthorized("broken-room"));
    }
    c.join_ok("realtime:fine-room", config(true, true, true), None);
    let r = c.broadcast("realtime:fine-room", "ok", serde_json::json!({"n": 1}));
    assert_eq!(c.reply(&r, Duration::from_secs(10)).payload["status"], "ok");
    c.broadcast_msg("realtime:fine-room", "ok");
    let mut p = Conn::open(&server, wsclient::anon(), Vsn::V1, "public");
    p.join_ok("realtime:public-room", config(false, true, false), None);
    p.heartbeat();
}

/// The replication connection killed (`pg_terminate_backend` of the walsender) right as each of
/// four multi-statement transactions commits (5,000 rows in 50 statements each, same round trip): after the
/// reader reconnects, every committed row reaches the subscriber exactly once.
#[test]
fn the_replication_connection_cut_as_transactions_commit_loses_and_repeats_nothing() {
    let mut db = pgsupport::Db::new();
    db.exec("CREATE TABLE public.items (id int PRIMARY KEY, n int NOT NULL)");
    db.exec("CREATE PUBLICATION supabase_realtime FOR TABLE public.items");
    let server = db.server();
    db.exec("GRANT SELECT ON public.items TO anon, authenticated");
    let topic = "realtime:items";
    let mut c = Conn::open(&server, wsclient::anon(), Vsn::V2, "items");
    c.join(topic, changes_config("INSERT", "items"), None);
    subscribed(&mut c, topic);
    const ROUNDS: i64 = 4;
    const STATEMENTS: i64 = 50;
    const ROWS: i64 = 100;
    let total = ROUNDS * STATEMENTS * ROWS;
    let mut seen: std::collections::BTreeMap<i64, u32> = std::collections::BTreeMap::new();
    let mut kills = 0;
    let started = Instant::now();
    for round in 0..ROUNDS {
        // Wait (bounded) until the walsender streams again, so each round cuts a live stream.
        let deadline = Instant::now() + Duration::from_secs(30);
        while db.one("SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'") == "0" {
            assert!(Instant::now() < deadline, "round {round}: the replication stream did not come back");
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut sql = String::from("BEGIN;");
        for s in 0..STATEMENTS {
            let first = round * STATEMENTS * ROWS + s * ROWS + 1;
            sql.push_str(&format!("INSERT INTO public.items SELECT g, {round} FROM generate_series({first}, {}) g;", first + ROWS - 1));
        }
        sql.push_str("COMMIT; SELECT count(pg_terminate_backend(pid)) FROM pg_stat_replication;");
        kills += db.one(&sql).parse::<i64>().unwrap();
        // Read what arrives meanwhile (the subscriber must keep up: it is not the slow consumer here).
        while let Some(msg) = c.try_wait(Duration::from_millis(300), |m| m.topic == topic && m.event == "postgres_changes") {
            *seen.entry(msg.payload["data"]["record"]["id"].as_i64().expect("id")).or_default() += 1;
        }
    }
    db.exec("INSERT INTO public.items VALUES (1000000, -1)");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !seen.contains_key(&1_000_000) {
        assert!(Instant::now() < deadline, "only {} of {total} rows and no sentinel after 60 s", seen.len());
        if let Some(msg) = c.try_wait(Duration::from_secs(1), |m| m.topic == topic && m.event == "postgres_changes") {
            *seen.entry(msg.payload["data"]["record"]["id"].as_i64().expect("id")).or_default() += 1;
        }
    }
    // Changes arrive in commit order: nothing of the rounds can follow the sentinel.
    while let Some(msg) = c.try_wait(Duration::from_millis(500), |m| m.topic == topic && m.event == "postgres_changes") {
        *seen.entry(msg.payload["data"]["record"]["id"].as_i64().expect("id")).or_default() += 1;
    }
    seen.remove(&1_000_000);
    let missing: Vec<i64> = (1..=total).filter(|id| !seen.contains_key(id)).collect();
    let repeated: Vec<(i64, u32)> = seen.iter().filter(|(_, n)| **n > 1).map(|(id, n)| (*id, *n)).collect();
    eprintln!(
        "replication cut {kills} times as transactions committed: {} of {total} rows delivered in {:?}, {} missing, {} repeated",
        seen.len(),
        started.elapsed(),
        missing.len(),
        repeated.len()
    );
    assert!(kills >= ROUNDS, "every round killed a walsender ({kills})");
    assert!(missing.is_empty(), "rows lost: {} (first {:?})", missing.len(), &missing[..missing.len().min(10)]);
    assert!(repeated.is_empty(), "rows delivered more than once: {} (first {:?})", repeated.len(), &repeated[..repeated.len().min(10)]);
    assert_eq!(seen.len() as i64, total);
}

/// CPU time (user + system, clock ticks) the process has used.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    let after_name = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Sends an upgrade request on a fresh socket (the answer is read later).
fn raw_upgrade(addr: std::net::SocketAddr) -> Option<std::net::TcpStream> {
    use std::io::Write;
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    let request = format!(
        "GET /realtime/v1/websocket?apikey={}&vsn=1.0.0 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        wsclient::anon()
    );
    stream.write_all(request.as_bytes()).ok()?;
    Some(stream)
}

/// Whether the socket's upgrade was answered with 101 within `timeout`.
fn upgraded(stream: &mut std::net::TcpStream, timeout: Duration) -> bool {
    use std::io::Read;
    stream.set_read_timeout(Some(timeout)).unwrap();
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 101")
}

/// File descriptors exhausted (the server started with RLIMIT_NOFILE = 256): accept fails with
/// EMFILE and backs off without spinning (CPU measured), connections already open keep
/// working, and the connections left waiting in the backlog are served once others close.
#[test]
fn exhausted_file_descriptors_make_accept_back_off_and_it_recovers() {
    use std::os::unix::process::CommandExt;
    const LIMIT: u64 = 256;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", support::free_port()).parse().unwrap();
    let mut command = support::Server::command(addr, &[("RUST_LOG", "error")]);
    // SAFETY: setrlimit is async-signal-safe; the closure touches nothing else.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit { rlim_cur: LIMIT, rlim_max: LIMIT };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut server = support::Server::start_command(command, addr);
    let pid = server.pid();
    let mut early = wsclient::connect_v1(&server);
    wsclient::join_v1(&mut early, "realtime:early", "1", wsclient::config(false, false));

    let mut sockets: Vec<std::net::TcpStream> = (0..400).filter_map(|_| raw_upgrade(addr)).collect();
    std::thread::sleep(Duration::from_secs(2));
    let (mut served, mut waiting): (Vec<_>, Vec<_>) = (Vec::new(), Vec::new());
    for mut stream in sockets.drain(..) {
        if upgraded(&mut stream, Duration::from_millis(50)) {
            served.push(stream);
        } else {
            waiting.push(stream);
        }
    }
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0);
    eprintln!("fd exhaustion: {} upgraded, {} waiting in the backlog; the server holds {fds} fds (limit {LIMIT})", served.len(), waiting.len());
    assert!(served.len() >= 100, "only {} connections were served before the limit", served.len());
    assert!(!waiting.is_empty(), "the limit was never reached");

    // Out of descriptors: accept backs off instead of spinning.
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_ticks(pid) - before;
    eprintln!("fd exhaustion: the server used {used} CPU ticks in 3 s while accept failed");
    assert!(used < 90, "accept spins while out of descriptors: {used} ticks in 3 s (300 = one core)");
    // A connection that was already open keeps working.
    wsclient::heartbeat_v1(&mut early, "hb");
    wsclient::join_v1(&mut early, "realtime:early-2", "2", wsclient::config(false, false));
    assert!(server.is_running());

    // Descriptors come back: the waiting connections get their upgrade, and new ones connect.
    served.truncate(served.len().saturating_sub(waiting.len() + 20));
    let started = Instant::now();
    let mut recovered = 0;
    for stream in &mut waiting {
        recovered += usize::from(upgraded(stream, Duration::from_secs(15)));
    }
    eprintln!("fd exhaustion: {recovered} of {} waiting connections upgraded {:?} after others closed", waiting.len(), started.elapsed());
    assert_eq!(recovered, waiting.len(), "every waiting connection is served once descriptors are free");
    drop(waiting);
    let mut late = wsclient::connect_v1(&server);
    wsclient::heartbeat_v1(&mut late, "late");
    wsclient::heartbeat_v1(&mut early, "hb-2");
    assert!(server.is_running());
}

/// Regression (issue 16, found by the session fuzz harness): an `access_token` with an expired
/// token sent in the same write as a private join, so it reaches the server before the join's
/// policy answer. The join is answered first (ok), then the channel is closed for the token
/// (`system` + `phx_close`), as upstream orders them. Before the fix the `system` + `phx_close`
/// went out at once and the join never got a reply.
#[test]
fn a_bad_refresh_before_the_private_join_is_answered_closes_after_the_reply() {
    let (mut db, server) = start_with_acl();
    grant(&mut db, USER_A, "early-refresh", false);
    let topic = "realtime:early-refresh";
    let mut c = Conn::open(&server, &user_token(USER_A), Vsn::V2, "early");
    let expired = hs256(support::SECRET.as_bytes(), serde_json::json!({"role": "authenticated", "sub": USER_A, "exp": now_s() - 30}));
    let join = serde_json::json!(["1", "1", topic, "phx_join", {"config": config(true, false, false)}]).to_string();
    let refresh = serde_json::json!(["1", "2", topic, "access_token", {"access_token": expired}]).to_string();
    // Both frames in one write: the session reads them before the policy answer comes back.
    c.send_frames(&[join, refresh]);
    c.join_refs.insert(topic.to_string(), "1".to_string());
    let first = c.wait("the join's reply", Duration::from_secs(10), |m| m.topic == topic);
    assert_eq!((first.event.as_str(), first.r#ref.clone()), ("phx_reply", serde_json::json!("1")), "the join is answered first: {}", first.raw);
    assert_eq!(first.payload["status"], "ok", "{}", first.raw);
    let message = c.closed_by_server(topic, Duration::from_secs(5));
    assert!(message.starts_with("Token has expired "), "{message}");
    c.heartbeat();
}
