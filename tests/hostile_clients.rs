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

/// The RSS a round left behind: the smallest of 20 samples over 2 s. One sample a second after
/// the close sometimes still caught the round's peak (the allocator hands memory back a moment
/// later: 30 MiB at +1 s, 24 MiB at the next round), which read as growth; memory really kept
/// shows in every sample, so the minimum keeps the bounds' meaning.
fn settled_rss_kib(pid: u32) -> u64 {
    let mut least = u64::MAX;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(100));
        least = least.min(rss_kib(pid));
    }
    least
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

/// One refused upgrade: writes the request on a fresh socket; the answer is read later.
fn send_upgrade(server: &Server, token: &str) -> TcpStream {
    let mut stream = TcpStream::connect(server.addr).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let request = format!(
        "GET /realtime/v1/websocket?apikey={token}&vsn=1.0.0 HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).expect("write the upgrade");
    stream
}

/// Reads a refused upgrade's answer to the end: (status, body).
fn read_refusal(stream: &mut TcpStream) -> (u16, String) {
    let mut bytes = Vec::new();
    let _ = stream.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// 2,000 upgrades with bad tokens (garbage, expired, wrong signature) from four threads, 100
/// in flight per thread: each gets its documented 401 body no sooner than the connect error
/// delay, normal clients keep joining quickly meanwhile, and the memory comes back.
#[test]
fn an_upgrade_flood_with_bad_tokens_gets_delayed_401s_and_hurts_nobody() {
    const DELAY_MS: u64 = 200;
    let delay = DELAY_MS.to_string();
    let mut server = Server::start(&[("REALTIME_CONNECT_ERROR_DELAY_MS", &delay)]);
    let pid = server.pid();
    normal_round_trip(&server, "warm-up");
    let baseline = rss_kib(pid);
    let expired = support::token("anon", &["--exp=-30"]);
    let wrong_signature = with_wrong_signature(anon(), &support::service_key());
    let bad: Vec<(String, &'static str)> = vec![
        ("garbage".to_string(), r#"{"error":"The token provided is not a valid JWT"}"#),
        (expired, r#"{"error":"Token has expired"}"#),
        (wrong_signature, r#"{"error":"Failed to validate JWT signature"}"#),
    ];
    let started = Instant::now();
    std::thread::scope(|scope| {
        let flooders: Vec<_> = (0..4)
            .map(|thread| {
                let (server, bad) = (&server, &bad);
                scope.spawn(move || {
                    let mut fastest = Duration::MAX;
                    for wave in 0..5 {
                        let mut wave_streams = Vec::with_capacity(100);
                        for i in 0..100 {
                            let (token, body) = &bad[(thread + wave + i) % bad.len()];
                            wave_streams.push((send_upgrade(server, token), *body, Instant::now()));
                        }
                        for (mut stream, expected, sent) in wave_streams {
                            let (status, body) = read_refusal(&mut stream);
                            fastest = fastest.min(sent.elapsed());
                            assert_eq!((status, body.as_str()), (401, expected), "thread {thread} wave {wave}");
                        }
                    }
                    fastest
                })
            })
            .collect();
        // Normal clients keep joining while the flood runs.
        let mut worst = Duration::ZERO;
        let mut normal = 0;
        while flooders.iter().any(|f| !f.is_finished()) {
            worst = worst.max(normal_round_trip(&server, &format!("n{normal}")));
            normal += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
        let fastest = flooders.into_iter().map(|f| f.join().expect("flooder")).min().unwrap();
        eprintln!(
            "upgrade flood: 2,000 refused in {:?}; fastest refusal {fastest:?} (delay {DELAY_MS} ms); {normal} normal connect+join+heartbeat, worst {worst:?}",
            started.elapsed()
        );
        assert!(fastest >= Duration::from_millis(DELAY_MS - 10), "a refusal came before the connect error delay: {fastest:?}");
        assert!(normal >= 2, "normal clients got in only {normal} times");
        assert!(worst < Duration::from_secs(5), "a normal client waited {worst:?} during the flood");
    });
    std::thread::sleep(Duration::from_secs(1));
    let after = rss_kib(pid);
    eprintln!("upgrade flood: RSS baseline {baseline} KiB, after {after} KiB");
    assert!(server.is_running());
    assert!(after < baseline + 32 * 1024, "RSS grew by more than 32 MiB: {baseline} → {after} KiB");
}

/// JSON nested 100,000 deep inside a join payload and inside a broadcast payload: no stack is
/// blown (the process would abort), the socket and the channel keep working, and subscribers
/// get nothing but well-formed frames.
#[test]
fn deeply_nested_json_in_a_join_and_a_broadcast_hurts_nobody() {
    let mut server = Server::start(&[]);
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let mut listener = connect_v1(&server);
    join_v1(&mut listener, ROOM, "1", config(false, false));
    let mut c = connect_v1(&server);
    // A join whose payload carries the nesting beside its config.
    let join = format!(r#"{{"topic":"realtime:deep","event":"phx_join","payload":{{"config":{{}},"deep":{deep}}},"ref":"1","join_ref":"1"}}"#);
    c.send_text(&join);
    // serde_json's depth limit refuses the payload: the join fails with the catch-all reason
    // (PROTOCOL.md §2.5 "anything unexpected"), the socket stays.
    let reply = c.recv_json(WAIT);
    eprintln!("deep join payload: {}", reply["payload"]);
    assert_eq!(reply, v1_reply("realtime:deep", Some("1"), "error", json!({"reason": "Unknown Error on Channel"})));
    // A broadcast whose payload is the nesting, on a channel with a listener.
    join_v1(&mut c, ROOM, "2", config(false, true));
    let push = format!(r#"{{"topic":"{ROOM}","event":"broadcast","payload":{{"type":"broadcast","event":"deep","payload":{{"deep":{deep}}}}},"ref":"3","join_ref":"2"}}"#);
    c.send_text(&push);
    match listener.recv_frame(WAIT) {
        Frame::Timeout => eprintln!("deep broadcast: dropped"),
        Frame::Text(text) => {
            assert!(text.len() > 200_000 && text.contains(r#""event":"deep""#), "a delivered deep broadcast is whole: {}", &text[..200]);
            eprintln!("deep broadcast: delivered whole ({} bytes)", text.len());
        }
        other => panic!("the listener must survive a deep broadcast: {}", describe(&other)),
    }
    match c.recv_frame(QUIET) {
        Frame::Timeout => {}
        Frame::Text(text) => assert_eq!(serde_json::from_str::<serde_json::Value>(&text).unwrap(), v1_reply(ROOM, Some("3"), "ok", json!({}))),
        other => panic!("the sender must survive its deep broadcast: {}", describe(&other)),
    }
    heartbeat_v1(&mut c, "hb");
    heartbeat_v1(&mut listener, "hb");
    let small = user_broadcast("e", json!({"after": "deep"}));
    c.send_text(&v1j(ROOM, "broadcast", small.clone(), None, Some("2")));
    assert_eq!(listener.recv_json(WAIT), v1_frame(ROOM, "broadcast", small, None));
    assert!(server.is_running());
}

/// One round: a stalled subscriber, a reader and a publisher on `topic`; 20 MB (2,500 × 8 KB)
/// broadcast. Returns (messages the stalled one got before its close, RSS peak sampled).
fn stalled_subscriber_round(server: &Server, pid: u32, topic: &str) -> (usize, u64) {
    let mut stalled = connect_v1(server);
    let mut reader = connect_v1(server);
    let mut publisher = connect_v1(server);
    for c in [&mut stalled, &mut reader, &mut publisher] {
        join_v1(c, topic, "1", config(false, false));
    }
    const MESSAGES: usize = 2_500; // × 8 KB = 20 MB
    let filler = "x".repeat(8_000);
    let reading = std::thread::spawn(move || {
        let mut seen = Vec::with_capacity(MESSAGES);
        while seen.len() < MESSAGES {
            let frame = reader.recv_json(Duration::from_secs(30));
            if frame["event"] == "broadcast" {
                seen.push(frame["payload"]["payload"]["i"].as_u64().expect("i"));
            }
        }
        seen
    });
    let mut peak = 0;
    for i in 0..MESSAGES {
        let push = user_broadcast("e", json!({"i": i, "f": filler}));
        publisher.send_text(&v1j(topic, "broadcast", push, None, Some("1")));
        if i % 250 == 0 {
            peak = peak.max(rss_kib(pid));
        }
    }
    let seen = reading.join().expect("the reading subscriber");
    assert_eq!(seen, (0..MESSAGES as u64).collect::<Vec<_>>(), "the reader got every message in order");
    // Drain the stalled one: what was queued, then the close.
    let mut received = 0usize;
    let closed = loop {
        match stalled.recv_frame(Duration::from_secs(20)) {
            Frame::Text(_) => received += 1,
            Frame::Close(code, _) => break code,
            other => panic!("the stalled subscriber should get a close, got {} after {received} messages", describe(&other)),
        }
    };
    assert_eq!(closed, Some(1008), "slow consumer close");
    assert!(received < MESSAGES, "the stalled subscriber cannot have got everything ({received})");
    (received, peak)
}

/// A subscriber that never reads while 20 MB is broadcast to its channel, four times: each is
/// closed as a slow consumer (1008) once its queue passes the bound, the subscriber that reads
/// gets every message, memory stays bounded, and it comes back: after an overflow the shard's
/// sweep returns free heap to the system for a few seconds (`outbox::trim_if_wanted`), so RSS
/// after a round is within about 1 MiB of the baseline on this machine (without the trim glibc
/// kept +6 to +15 MiB, and sometimes more after a later round).
#[test]
fn a_subscriber_that_never_reads_twenty_megabytes_is_cut_and_its_memory_comes_back() {
    let mut server = Server::start(&[]);
    let pid = server.pid();
    normal_round_trip(&server, "warm-up");
    let baseline = rss_kib(pid);
    let mut rounds = Vec::new();
    for round in 0..4 {
        let (received, peak) = stalled_subscriber_round(&server, pid, &format!("realtime:flood20-{round}"));
        rounds.push((received, peak, settled_rss_kib(pid)));
    }
    eprintln!("20 MB to a stalled subscriber, 4 rounds: RSS baseline {baseline} KiB; (messages before the 1008 close, peak KiB, after KiB) {rounds:?}");
    assert!(server.is_running());
    normal_round_trip(&server, "after");
    let peak = rounds.iter().map(|r| r.1).max().unwrap();
    assert!(peak < baseline + 64 * 1024, "the stalled queue is bounded: RSS {baseline} → {peak} KiB");
    for (round, (_, _, after)) in rounds.iter().enumerate() {
        assert!(*after < baseline + 32 * 1024, "round {round}: RSS did not come back: {baseline} → {after} KiB");
    }
    let early = rounds[0].2.max(rounds[1].2);
    let late = rounds[2].2.max(rounds[3].2);
    assert!(late < early + 4 * 1024, "RSS grows round after round: {rounds:?}");
}
