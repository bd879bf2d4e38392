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
