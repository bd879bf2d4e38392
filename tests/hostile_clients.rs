//! Hostile clients against the real binary (issue 16 part 3), bounded and on loopback: each
//! gets its documented answer, the server stays healthy, other clients are unaffected, and the
//! memory it took comes back (RSS measured from /proc, with a generous bound).

mod support;
mod wsclient;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::json;
use support::Server;
use wsclient::*;

const ROOM: &str = "realtime:hostile";

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    status.lines().find_map(|line| line.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()).expect("VmRSS")
}

/// Connects, joins `ROOM` and answers a heartbeat: the time a normal client needs.
fn normal_round_trip(server: &Server, r: &str) -> Duration {
    let started = Instant::now();
    let mut c = connect_v1(server);
    join_v1(&mut c, ROOM, r, config(false, false));
    heartbeat_v1(&mut c, "hb");
    started.elapsed()
}

/// Opens 2,000 connections that send half a request head and then nothing; checks that normal
/// clients keep getting in meanwhile, and that the head deadline (10 s) closes every one.
fn slowloris_round(server: &Server, round: u32) {
    let half_head = format!("GET /realtime/v1/websocket?apikey={}&vsn=1.0.0 HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: web", anon());
    let mut slow: Vec<TcpStream> = Vec::with_capacity(2_000);
    for i in 0..2_000 {
        let mut stream = TcpStream::connect(server.addr).unwrap_or_else(|e| panic!("slowloris connection {i}: {e}"));
        stream.write_all(half_head.as_bytes()).expect("half a head");
        slow.push(stream);
    }
    let mut worst = Duration::ZERO;
    for i in 0..20 {
        worst = worst.max(normal_round_trip(server, &format!("r{round}-{i}")));
    }
    eprintln!("slowloris round {round}: normal connect+join+heartbeat worst {worst:?} beside 2,000 hanging heads");
    assert!(worst < Duration::from_secs(5), "a normal client waited {worst:?} behind the slowloris heads");
    std::thread::sleep(Duration::from_secs(11));
    let deadline = Instant::now() + Duration::from_secs(20);
    for (i, stream) in slow.iter_mut().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(100));
        stream.set_read_timeout(Some(left)).unwrap();
        let mut rest = Vec::new();
        match stream.read_to_end(&mut rest) {
            Ok(_) => {}
            Err(error) if matches!(error.kind(), std::io::ErrorKind::ConnectionReset) => {}
            Err(error) => panic!("slowloris connection {i} still open after the head deadline: {error}"),
        }
    }
}

#[test]
fn two_thousand_slowloris_heads_do_not_stop_normal_clients_and_are_cut_at_the_deadline() {
    let mut server = Server::start(&[]);
    let pid = server.pid();
    normal_round_trip(&server, "warm-up");
    let baseline = rss_kib(pid);
    slowloris_round(&server, 1);
    let after_first = rss_kib(pid);
    slowloris_round(&server, 2);
    let after_second = rss_kib(pid);
    eprintln!("slowloris: RSS baseline {baseline} KiB, after round 1 {after_first} KiB, after round 2 {after_second} KiB");
    assert!(server.is_running());
    // The allocator may keep what the first round freed; a second round must reuse it, not grow.
    assert!(after_first < baseline + 48 * 1024, "RSS grew by more than 48 MiB: {baseline} → {after_first} KiB");
    assert!(after_second < after_first + 8 * 1024, "RSS keeps growing round after round: {after_first} → {after_second} KiB");
}

#[test]
fn fifty_thousand_pings_get_their_pongs_and_the_socket_keeps_working() {
    let mut server = Server::start(&[]);
    let mut c = connect_v1(&server);
    join_v1(&mut c, ROOM, "1", config(false, false));
    let mut writer = c.stream_clone();
    let handle = std::thread::spawn(move || {
        let mut burst = Vec::new();
        for i in 0..50_000u32 {
            burst.extend_from_slice(&raw_frame(0x9, &i.to_be_bytes(), Some([1, 2, 3, 4])));
            if burst.len() > 64 * 1024 {
                writer.write_all(&burst).expect("write pings");
                burst.clear();
            }
        }
        writer.write_all(&burst).expect("write pings");
    });
    handle.join().unwrap();
    // The pongs come first (the client skips them), then the heartbeat's reply.
    heartbeat_v1(&mut c, "after-pings");
    let mut other = connect_v2(&server);
    heartbeat_v2(&mut other, "1");
    assert!(server.is_running());
}

#[test]
fn ten_thousand_one_byte_fragments_reassemble_into_one_message() {
    let server = Server::start(&[]);
    let mut c = connect_v1(&server);
    let padding = "p".repeat(10_000);
    let text = format!(r#"{{"topic":"phoenix","event":"heartbeat","payload":{{"pad":"{padding}"}},"ref":"frag"}}"#);
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len() * 7);
    for (i, byte) in bytes.iter().enumerate() {
        let opcode = if i == 0 { 0x1 } else { 0x0 };
        let mut frame = raw_frame(opcode, &[*byte], Some([7, 7, 7, 7]));
        if i + 1 < bytes.len() {
            frame[0] &= 0x7f; // not final
        }
        out.extend_from_slice(&frame);
    }
    c.send_raw(&out);
    assert_eq!(c.recv_json(Duration::from_secs(20)), v1_reply("phoenix", Some("frag"), "ok", json!({})));
}

#[test]
fn garbage_after_the_upgrade_is_a_protocol_error_and_hurts_nobody_else() {
    let mut server = Server::start(&[]);
    let mut bystander = connect_v1(&server);
    join_v1(&mut bystander, ROOM, "1", config(false, false));
    let mut seed: u32 = 0x9e37_79b9;
    for round in 0..20 {
        let mut c = connect_v2(&server);
        let garbage: Vec<u8> = (0..4096)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                seed as u8
            })
            .collect();
        c.send_raw(&garbage);
        match c.recv_frame(Duration::from_secs(10)) {
            Frame::Close(Some(code), _) => assert!([1002, 1007, 1009].contains(&code), "round {round}: close {code}"),
            Frame::Dropped(_) | Frame::Close(None, _) => {}
            other => panic!("round {round}: expected a close, got {}", describe(&other)),
        }
    }
    assert!(server.is_running());
    heartbeat_v1(&mut bystander, "still-here");
}
