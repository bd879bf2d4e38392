//! Malformed and hostile input: PROTOCOL.md §1.10, §1.11, §9.1. Bad frames are dropped without
//! a reply, the socket stays usable, and nothing a client sends kills the process.

mod support;
mod wsclient;

use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, Instant};

use serde_json::json;
use support::Server;
use wsclient::*;

const ROOM: &str = "realtime:room1";

/// After a batch of bad frames, the next frame the socket gets must be the heartbeat reply:
/// the bad frames produced nothing and did not close the connection.
#[track_caller]
fn still_usable_v1(c: &mut Client, r: &str) {
    heartbeat_v1(c, r);
}

#[track_caller]
fn still_usable_v2(c: &mut Client, r: &str) {
    heartbeat_v2(c, r);
}

#[test]
fn malformed_v1_text_frames_are_dropped() {
    let mut server = Server::start(&[]);
    let mut c = connect_v1(&server);
    join_v1(&mut c, ROOM, "1", config(true, true));
    let deep = format!("{}{}", "[".repeat(20_000), "]".repeat(20_000));
    let bad: Vec<String> = vec![
        "hello".into(),
        "".into(),
        "{".into(),
        r#"{"topic":"#.into(),
        "null".into(),
        "42".into(),
        r#""just a string""#.into(),
        "[]".into(),
        // A V2 array on a V1 socket is the wrong shape.
        r#"[null,"9","phoenix","heartbeat",{}]"#.into(),
        // Required keys missing (§1.5): ref, payload, event, topic.
        r#"{"topic":"phoenix","event":"heartbeat","payload":{}}"#.into(),
        r#"{"topic":"phoenix","event":"heartbeat","ref":"9"}"#.into(),
        r#"{"topic":"phoenix","payload":{},"ref":"9"}"#.into(),
        r#"{"event":"heartbeat","payload":{},"ref":"9"}"#.into(),
        // Wrong types.
        r#"{"topic":5,"event":"heartbeat","payload":{},"ref":"9"}"#.into(),
        r#"{"topic":"phoenix","event":null,"payload":{},"ref":"9"}"#.into(),
        r#"{"topic":"realtime:room1","event":["broadcast"],"payload":{},"ref":"9"}"#.into(),
        // Trailing garbage after a valid object.
        r#"{"topic":"phoenix","event":"heartbeat","payload":{},"ref":"9"} trailing"#.into(),
        deep,
        "\u{0}\u{1}\u{2}".into(),
    ];
    for frame in &bad {
        c.send_text(frame);
    }
    c.expect_silence(QUIET);
    still_usable_v1(&mut c, "2");
    // The channel survived too.
    let msg = user_broadcast("e", json!({"n": 1}));
    c.send_text(&v1j(ROOM, "broadcast", msg.clone(), Some("3"), Some("1")));
    let mut got = vec![c.recv_json(WAIT), c.recv_json(WAIT)];
    got.sort_by_key(|v| v["event"].as_str().unwrap_or("").to_string());
    assert_eq!(
        got,
        vec![v1_frame(ROOM, "broadcast", msg, None), v1_reply(ROOM, Some("3"), "ok", json!({}))]
    );
    assert!(server.is_running());
}

#[test]
fn malformed_v2_text_frames_are_dropped() {
    let mut server = Server::start(&[]);
    let mut c = connect_v2(&server);
    join_v2(&mut c, ROOM, "1", config(false, true));
    let bad = [
        "hello",
        "",
        "[",
        "{}",
        // A V1 object on a V2 socket is the wrong shape.
        r#"{"topic":"phoenix","event":"heartbeat","payload":{},"ref":"9"}"#,
        "[]",
        r#"[null,"9","phoenix","heartbeat"]"#,
        r#"[null,"9",5,"heartbeat",{}]"#,
        r#"[null,"9","phoenix",7,{}]"#,
        r#"[null,"9",null,"heartbeat",{}]"#,
        "null",
        "true",
        r#"[null,"9","phoenix","heartbeat",{}]]"#,
    ];
    for frame in bad {
        c.send_text(frame);
    }
    c.expect_silence(QUIET);
    still_usable_v2(&mut c, "2");
    c.send_text(&v2(Some("1"), Some("3"), ROOM, "broadcast", user_broadcast("e", json!({}))));
    assert_eq!(c.recv_json(WAIT), v2_reply(Some("1"), Some("3"), ROOM, "ok", json!({})));
    assert!(server.is_running());
}

#[test]
fn malformed_binary_frames_are_dropped() {
    let mut server = Server::start(&[]);
    let mut c = connect_v2(&server);
    let mut peer = connect_v2(&server);
    join_v2(&mut c, ROOM, "1", config(true, true));
    join_v2(&mut peer, ROOM, "1", config(false, false));

    let mut truncated = kind3_json("1", "9", ROOM, "e", &json!({"a": 1}));
    truncated.truncate(10); // header says more than the frame holds
    let mut bad_utf8_topic = kind3("1", "9", ROOM, "e", b"", 1, b"{}");
    bad_utf8_topic[7 + 2] = 0xff; // first byte of the topic
    let bad: Vec<Vec<u8>> = vec![
        vec![],
        vec![9, 1, 2, 3],
        vec![255; 40],
        // Kinds the server sends, not accepts (§1.6.2): 1, 2, 4.
        vec![1, 0, 0, 0, 0],
        vec![2, 0, 0],
        {
            let mut k4 = vec![4, ROOM.len() as u8, 1, 0, 1];
            k4.extend_from_slice(ROOM.as_bytes());
            k4.extend_from_slice(b"e{}");
            k4
        },
        vec![3],
        vec![3, 1, 1, 14, 6, 0],
        truncated,
        bad_utf8_topic,
    ];
    for frame in &bad {
        c.send_binary(frame);
    }
    c.expect_silence(QUIET);
    peer.expect_silence(Duration::from_millis(50));
    still_usable_v2(&mut c, "2");
    assert!(server.is_running());
}

#[test]
fn text_frame_that_is_not_utf8_closes_with_1007() {
    // RFC 6455 §8.1: a text message must be UTF-8; the connection is failed with 1007.
    let mut server = Server::start(&[]);
    let mut c = connect_v1(&server);
    c.send_raw(&raw_frame(0x1, &[0xff, 0xfe, 0x80, b'{', b'}'], Some([1, 2, 3, 4])));
    assert_eq!(c.recv_close(WAIT), Some(1007));
    // Reassembled from fragments: the message as a whole is checked.
    let mut c2 = connect_v2(&server);
    let mut head = raw_frame(0x1, b"[null,\"1\",\"phoenix\",\"heartbeat\",{\"x\":\"", Some([9, 8, 7, 6]));
    head[0] &= 0x7f; // clear FIN
    c2.send_raw(&head);
    c2.send_raw(&raw_frame(0x0, &[0xc3, 0x28, b'"', b'}', b']'], Some([1, 1, 1, 1])));
    assert_eq!(c2.recv_close(WAIT), Some(1007));
    assert!(server.is_running());
    let mut other = connect_v1(&server);
    still_usable_v1(&mut other, "1");
}

/// Issue 9's reproducer, byte for byte: a 1-byte non-final text fragment, then a continuation
/// whose header declares 2^64 - 1 bytes. The size check used to overflow and panic the shard.
const CONTINUATION_OF_U64_MAX: [u8; 21] = [
    0x01, 0x81, 0x11, 0x22, 0x33, 0x44, 0x69, 0x80, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
    0x02, 0x03, 0x04,
];

#[test]
fn continuation_declaring_u64_max_closes_1009_and_every_shard_keeps_serving() {
    let mut server = Server::start(&[]);
    // Subscribers spread over the shards by SO_REUSEPORT (16 sockets: all on one of the two
    // shards with probability 2^-15).
    let mut subscribers: Vec<Client> = (0..16)
        .map(|i| {
            let mut c = connect_v1(&server);
            join_v1(&mut c, ROOM, &i.to_string(), config(false, false));
            c
        })
        .collect();
    // As many attackers, so that every shard decodes the message.
    for _ in 0..16 {
        let mut attacker = connect_v2(&server);
        attacker.send_raw(&CONTINUATION_OF_U64_MAX);
        assert_eq!(attacker.recv_close(WAIT), Some(1009));
    }
    assert!(server.is_running());
    // Every shard still accepts and answers: fresh health checks all succeed.
    for i in 0..32 {
        let (status, _) = support::http_request(server.addr, "GET", "/healthz", &[], b"").expect("healthz");
        assert_eq!(status, 200, "healthz #{i}");
    }
    // And the existing clients on every shard still get broadcasts.
    let mut sender = connect_v2(&server);
    join_v2(&mut sender, ROOM, "1", config(false, true));
    sender.send_binary(&kind3_json("1", "2", ROOM, "e", &json!({"after": "attack"})));
    assert_eq!(sender.recv_json(WAIT), v2_reply(Some("1"), Some("2"), ROOM, "ok", json!({})));
    for (i, c) in subscribers.iter_mut().enumerate() {
        assert_eq!(
            c.recv_json(WAIT),
            v1_frame(ROOM, "broadcast", user_broadcast("e", json!({"after": "attack"})), None),
            "subscriber {i}"
        );
    }
}

#[test]
fn over_long_topic_gets_a_join_error() {
    let mut server = Server::start(&[]);
    let mut c = connect_v1(&server);
    let topic = format!("realtime:{}", "x".repeat(1_000_000));
    c.send_text(&v1j(&topic, "phx_join", json!({"config": config(false, false)}), Some("1"), Some("1")));
    let reply = c.recv_json(WAIT);
    assert_eq!(reply["payload"], json!({"status": "error", "response": {"reason": "TopicNameTooLong: Topic name must be at most 255 bytes"}}));
    // The longest allowed topic joins.
    let longest = format!("realtime:{}", "y".repeat(255 - "realtime:".len()));
    join_v1(&mut c, &longest, "2", config(false, false));
    still_usable_v1(&mut c, "3");
    assert!(server.is_running());
}

#[test]
fn fragmented_frames_are_reassembled() {
    // RFC 6455 §5.4: a message may be split into a text frame with FIN=0 and continuations.
    let server = Server::start(&[]);
    let mut c = connect_v1(&server);
    let msg = br#"{"topic":"phoenix","event":"heartbeat","payload":{},"ref":"77"}"#;
    let (first, second) = msg.split_at(20);
    let mut head = raw_frame(0x1, first, Some([5, 6, 7, 8]));
    head[0] &= 0x7f; // clear FIN
    c.send_raw(&head);
    c.send_raw(&raw_frame(0x0, second, Some([8, 7, 6, 5])));
    assert_eq!(c.recv_json(WAIT), v1_reply("phoenix", Some("77"), "ok", json!({})));
}

#[test]
fn frame_over_five_megabytes_closes_with_1009() {
    let mut server = Server::start(&[]);
    let mut c = connect_v1(&server);
    let len: u64 = 5_000_001;
    let mut writer = c.stream_clone();
    let handle = std::thread::spawn(move || {
        let _ = writer.set_write_timeout(Some(Duration::from_secs(10)));
        let mask = [0x11, 0x22, 0x33, 0x44];
        if writer.write_all(&raw_frame_header(0x1, len, Some(mask))).is_err() {
            return;
        }
        // The masked body of 'a' * len, in chunks; stop quietly once the server hangs up.
        let chunk: Vec<u8> = (0..65_536).map(|i| b'a' ^ mask[i % 4]).collect();
        let mut left = len as usize;
        while left > 0 {
            let n = left.min(chunk.len());
            if writer.write_all(&chunk[..n]).is_err() {
                return;
            }
            left -= n;
        }
        let _ = writer.flush();
    });
    let frame = c.recv_frame(Duration::from_secs(20));
    let _ = handle.join();
    match &frame {
        Frame::Close(code, _) => assert_eq!(*code, Some(1009), "close code"),
        other => panic!("expected close 1009, got {}", describe(other)),
    }
    assert!(server.is_running());
    let mut other = connect_v2(&server);
    still_usable_v2(&mut other, "1");
}

#[test]
fn large_but_legal_frame_keeps_the_connection() {
    // 4 MB is under the 5 MB frame limit: not JSON, so dropped, and the socket stays open.
    let mut server = Server::start(&[]);
    let mut c = connect_v1(&server);
    c.send_text(&"z".repeat(4_000_000));
    still_usable_v1(&mut c, "1");
    assert!(server.is_running());
}

#[test]
fn ten_thousand_joins_on_one_socket() {
    let mut server = Server::start(&[]);
    let mut c = connect_v2(&server);
    let started = Instant::now();
    let total = 10_000;
    let batch = 500;
    let mut replies: HashMap<String, serde_json::Value> = HashMap::new();
    let mut next = 0;
    while next < total {
        let end = (next + batch).min(total);
        for i in next..end {
            let r = i.to_string();
            c.send_text(&v2(Some(&r), Some(&r), &format!("realtime:t-{i}"), "phx_join", json!({"config": config(false, false)})));
        }
        for _ in next..end {
            let reply = c.recv_json(Duration::from_secs(20));
            let r = reply[1].as_str().unwrap_or_else(|| panic!("reply without ref: {reply}")).to_string();
            assert!(replies.insert(r, reply).is_none(), "duplicate reply");
        }
        next = end;
        assert!(started.elapsed() < Duration::from_secs(120), "10,000 joins took too long");
    }
    for i in 0..total {
        let r = i.to_string();
        let topic = format!("realtime:t-{i}");
        let expected = if i < 100 {
            v2_reply(Some(&r), Some(&r), &topic, "ok", ok_join_response())
        } else {
            v2_reply(Some(&r), Some(&r), &topic, "error", json!({"reason": "ChannelRateLimitReached: Too many channels"}))
        };
        assert_eq!(replies.get(&r), Some(&expected), "join #{i}");
    }
    still_usable_v2(&mut c, "x");
    assert!(server.is_running());
    let mut other = connect_v1(&server);
    join_v1(&mut other, ROOM, "1", config(false, false));
    still_usable_v1(&mut other, "2");
}

/// Join error replies wait out the join error delay in a timer each, at most 32 per connection:
/// the replies beyond those are sent at once, so failing joins fast costs no more timers.
#[test]
fn delayed_join_errors_per_connection_are_bounded() {
    let server = Server::start(&[("REALTIME_JOIN_ERROR_DELAY_MS", "1500")]);
    let mut c = connect_v2(&server);
    let cap = 32;
    let total = cap + 8;
    let started = Instant::now();
    for i in 0..total {
        let r = i.to_string();
        c.send_text(&v2(Some(&r), Some(&r), &format!("realtime:e-{i}"), "phx_join", json!({"config": config(false, false), "access_token": "garbage"})));
    }
    let mut refs = Vec::new();
    for _ in 0..total {
        let reply = c.recv_json(Duration::from_secs(10));
        assert_eq!(reply[4]["response"]["reason"], "MalformedJWT: The token provided is not a valid JWT", "{reply}");
        refs.push((reply[1].as_str().unwrap().parse::<usize>().unwrap(), started.elapsed()));
    }
    let (at_once, delayed) = refs.split_at(total - cap);
    for (r, elapsed) in at_once {
        assert!(*r >= cap && *elapsed < Duration::from_millis(1000), "join #{r} beyond the cap is answered at once ({elapsed:?})");
    }
    let mut delayed_refs: Vec<usize> = delayed.iter().map(|(r, _)| *r).collect();
    delayed_refs.sort_unstable();
    assert_eq!(delayed_refs, (0..cap).collect::<Vec<_>>());
    assert!(delayed.iter().all(|(_, elapsed)| *elapsed >= Duration::from_millis(1400)), "the first {cap} wait out the delay: {delayed:?}");
}

#[test]
fn unmasked_client_frame_is_a_protocol_error() {
    let mut server = Server::start(&[]);
    let mut c = connect_v1(&server);
    c.send_raw(&raw_frame(0x1, br#"{"topic":"phoenix","event":"heartbeat","payload":{},"ref":"1"}"#, None));
    match c.recv_frame(WAIT) {
        Frame::Close(code, _) => assert_eq!(code, Some(1002), "close code"),
        other => panic!("expected close 1002, got {}", describe(&other)),
    }
    assert!(server.is_running());
    let mut other = connect_v1(&server);
    still_usable_v1(&mut other, "1");
}

#[test]
fn abrupt_disconnects_do_not_hurt_others() {
    let mut server = Server::start(&[]);
    let mut stay = connect_v1(&server);
    join_v1(&mut stay, ROOM, "1", config(false, false));
    for i in 0..20 {
        let mut c = connect_v2(&server);
        join_v2(&mut c, ROOM, "1", config(false, false));
        if i % 2 == 0 {
            // Half a frame, then gone.
            c.send_raw(&raw_frame_header(0x1, 100, Some([1, 2, 3, 4])));
        }
        drop(c);
    }
    let mut sender = connect_v2(&server);
    join_v2(&mut sender, ROOM, "1", config(false, true));
    sender.send_binary(&kind3_json("1", "2", ROOM, "e", &json!({"still": "here"})));
    assert_eq!(sender.recv_json(WAIT), v2_reply(Some("1"), Some("2"), ROOM, "ok", json!({})));
    assert_eq!(
        stay.recv_json(WAIT),
        v1_frame(ROOM, "broadcast", user_broadcast("e", json!({"still": "here"})), None)
    );
    assert!(server.is_running());
}
