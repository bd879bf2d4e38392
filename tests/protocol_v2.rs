//! Serializer V2 (`vsn=2.0.0`, JSON arrays + binary frames): PROTOCOL.md §1.6–§1.11, §2, §3,
//! and V1 ↔ V2 interop (§3.3).

mod support;
mod wsclient;

use std::time::Duration;

use serde_json::{json, Value};
use support::Server;
use wsclient::*;

const ROOM: &str = "realtime:room1";

// ---------------------------------------------------------------------------------------------
// §1.8 Heartbeat
// ---------------------------------------------------------------------------------------------

#[test]
fn heartbeat_is_answered_with_the_same_ref() {
    let server = Server::start(&[]);
    let mut c = connect_v2(&server);
    c.send_text(r#"[null,"7","phoenix","heartbeat",{}]"#);
    assert_eq!(
        c.recv_json(WAIT),
        json!([null, "7", "phoenix", "phx_reply", {"status": "ok", "response": {}}])
    );
}

#[test]
fn heartbeat_with_null_ref_gets_null_ref_reply() {
    let server = Server::start(&[]);
    let mut c = connect_v2(&server);
    c.send_text(r#"[null,null,"phoenix","heartbeat",{}]"#);
    assert_eq!(
        c.recv_json(WAIT),
        json!([null, null, "phoenix", "phx_reply", {"status": "ok", "response": {}}])
    );
}

#[test]
fn arrays_with_extra_elements_are_accepted() {
    // §1.6.1: five or more elements; the extra ones are ignored.
    let server = Server::start(&[]);
    let mut c = connect_v2(&server);
    c.send_text(r#"[null,"8","phoenix","heartbeat",{},"extra",42]"#);
    assert_eq!(
        c.recv_json(WAIT),
        json!([null, "8", "phoenix", "phx_reply", {"status": "ok", "response": {}}])
    );
}

// ---------------------------------------------------------------------------------------------
// §2.6 Join ok reply; §1.7 topics
// ---------------------------------------------------------------------------------------------

#[test]
fn join_ok_reply_echoes_join_ref_and_ref() {
    let server = Server::start(&[]);
    let mut c = connect_v2(&server);
    c.send_text(&json!(["1", "1", ROOM, "phx_join", {"config": config(false, false)}]).to_string());
    assert_eq!(
        c.recv_json(WAIT),
        json!(["1", "1", ROOM, "phx_reply", {"status": "ok", "response": {"postgres_changes": []}}])
    );
    // join_ref and ref that differ are both echoed as received.
    c.send_text(&json!(["3", "5", "realtime:other", "phx_join", {"config": config(false, false)}]).to_string());
    assert_eq!(
        c.recv_json(WAIT),
        json!(["3", "5", "realtime:other", "phx_reply", {"status": "ok", "response": {"postgres_changes": []}}])
    );
}

#[test]
fn realtime_js_join_payload_is_accepted() {
    // Appendix A.1 join (presence disabled here, so no presence_state follows).
    let server = Server::start(&[]);
    let mut c = connect_v2(&server);
    let user = support::token("authenticated", &["--sub", "0b6f3c1e-6a1d-4b8f-9d61-3f0b3b0e8a11", "--exp=3600"]);
    c.send_text(
        &json!(["1", "1", ROOM, "phx_join", {
            "config": {"broadcast": {"ack": true, "self": false}, "presence": {"key": "", "enabled": false},
                       "postgres_changes": [], "private": false},
            "access_token": user, "version": "realtime-js/2.119.1"}])
        .to_string(),
    );
    assert_eq!(c.recv_json(WAIT), v2_reply(Some("1"), Some("1"), ROOM, "ok", ok_join_response()));
}

#[test]
fn topic_without_realtime_prefix_is_the_same_channel() {
    let server = Server::start(&[]);
    let mut bare = connect_v2(&server);
    let mut prefixed = connect_v2(&server);
    join_v2(&mut bare, "chat:room-42", "1", config(false, false));
    join_v2(&mut prefixed, "realtime:chat:room-42", "1", config(false, false));

    // Text broadcast from the bare spelling.
    let m1 = user_broadcast("chat_message", json!({"text": "from bare"}));
    bare.send_text(&v2(Some("1"), Some("2"), "chat:room-42", "broadcast", m1.clone()));
    assert_eq!(
        prefixed.recv_json(WAIT),
        v2_frame(None, None, "realtime:chat:room-42", "broadcast", m1)
    );

    // Binary broadcast from the prefixed spelling: the kind-4 topic is the receiver's spelling.
    prefixed.send_binary(&kind3_json("1", "3", "realtime:chat:room-42", "chat_message", &json!({"text": "hi"})));
    let k4 = parse_kind4(&bare.recv_binary(WAIT));
    assert_eq!(k4.topic, "chat:room-42");
    assert_eq!(k4.event, "chat_message");
    assert_eq!(k4.encoding, 1);
    assert_eq!(k4.metadata, b"");
    assert_eq!(k4.json(), json!({"text": "hi"}));
    bare.expect_silence(QUIET);
    prefixed.expect_silence(QUIET);
}

#[test]
fn empty_sub_topic_is_refused() {
    let server = Server::start(&[]);
    let mut c = connect_v2(&server);
    c.send_text(&v2(Some("1"), Some("1"), "realtime:", "phx_join", json!({"config": config(false, false)})));
    assert_eq!(
        c.recv_json(WAIT),
        json!(["1", "1", "realtime:", "phx_reply",
               {"status": "error", "response": {"reason": "TopicNameRequired: You must provide a topic name"}}])
    );
    heartbeat_v2(&mut c, "2");
}

#[test]
fn event_on_unjoined_topic_gets_unmatched_topic() {
    let server = Server::start(&[]);
    let mut c = connect_v2(&server);
    c.send_text(&v2(None, Some("3"), "realtime:nope", "broadcast", user_broadcast("x", json!({}))));
    assert_eq!(
        c.recv_json(WAIT),
        json!([null, "3", "realtime:nope", "phx_reply", {"status": "error", "response": {"reason": "unmatched topic"}}])
    );

    // With a (stale) join_ref on the frame: same payload; upstream answers with a null join_ref
    // (Appendix A.3), echoing it is tolerated here.
    c.send_text(&v2(Some("9"), Some("4"), "realtime:nope", "broadcast", user_broadcast("x", json!({}))));
    let reply = c.recv_json(WAIT);
    assert!(reply[0].is_null() || reply[0] == json!("9"), "join_ref element: {reply}");
    assert_eq!(
        reply.as_array().unwrap()[1..].to_vec(),
        vec![json!("4"), json!("realtime:nope"), json!("phx_reply"),
             json!({"status": "error", "response": {"reason": "unmatched topic"}})],
        "reply: {reply}"
    );

    // A kind-3 binary broadcast on an unjoined topic is a `broadcast` event like any other.
    c.send_binary(&kind3_json("", "5", "realtime:nope", "e", &json!({})));
    let reply = c.recv_json(WAIT);
    assert_eq!(
        reply.as_array().unwrap()[1..].to_vec(),
        vec![json!("5"), json!("realtime:nope"), json!("phx_reply"),
             json!({"status": "error", "response": {"reason": "unmatched topic"}})],
        "reply: {reply}"
    );
    heartbeat_v2(&mut c, "6");
}

// ---------------------------------------------------------------------------------------------
// §1.9 Leave, close, duplicate join
// ---------------------------------------------------------------------------------------------

#[test]
fn leave_replies_ok_then_closes_with_join_ref() {
    let server = Server::start(&[]);
    let mut c = connect_v2(&server);
    join_v2(&mut c, ROOM, "1", config(false, false));
    c.send_text(r#"["1","12","realtime:room1","phx_leave",{}]"#);
    assert_eq!(
        c.recv_json(WAIT),
        json!(["1", "12", ROOM, "phx_reply", {"status": "ok", "response": {}}])
    );
    assert_eq!(c.recv_json(WAIT), json!(["1", "1", ROOM, "phx_close", {}]));
    c.expect_silence(QUIET);
}

#[test]
fn leave_on_unjoined_topic_replies_ok() {
    let server = Server::start(&[]);
    let mut c = connect_v2(&server);
    c.send_text(&v2(None, Some("5"), "realtime:never", "phx_leave", json!({})));
    assert_eq!(
        c.recv_json(WAIT),
        json!([null, "5", "realtime:never", "phx_reply", {"status": "ok", "response": {}}])
    );
    c.expect_silence(QUIET);
}

#[test]
fn duplicate_join_closes_the_old_channel_first() {
    let server = Server::start(&[]);
    let mut c = connect_v2(&server);
    let mut peer = connect_v2(&server);
    join_v2(&mut c, ROOM, "1", config(false, false));
    join_v2(&mut peer, ROOM, "1", config(false, false));

    c.send_text(&v2(Some("2"), Some("2"), ROOM, "phx_join", json!({"config": config(false, false)})));
    assert_eq!(c.recv_json(WAIT), json!(["1", "1", ROOM, "phx_close", {}]));
    assert_eq!(c.recv_json(WAIT), v2_reply(Some("2"), Some("2"), ROOM, "ok", ok_join_response()));

    let msg = user_broadcast("e", json!({"after": "rejoin"}));
    peer.send_text(&v2(Some("1"), Some("2"), ROOM, "broadcast", msg.clone()));
    assert_eq!(c.recv_json(WAIT), v2_frame(None, None, ROOM, "broadcast", msg));
    c.expect_silence(QUIET);
}

// ---------------------------------------------------------------------------------------------
// §3 Broadcast over V2 text frames
// ---------------------------------------------------------------------------------------------

#[test]
fn text_broadcast_self_false_and_true() {
    let server = Server::start(&[]);
    let mut quiet = connect_v2(&server);
    let mut echo = connect_v2(&server);
    join_v2(&mut quiet, ROOM, "1", config(false, false));
    join_v2(&mut echo, ROOM, "1", config(true, false));

    let m1 = user_broadcast("cursor", json!({"x": 1, "y": 2}));
    quiet.send_text(&v2(Some("1"), Some("5"), ROOM, "broadcast", m1.clone()));
    assert_eq!(echo.recv_json(WAIT), v2_frame(None, None, ROOM, "broadcast", m1));
    quiet.expect_silence(QUIET);

    let m2 = user_broadcast("cursor", json!({"x": 3, "y": 4}));
    echo.send_text(&v2(Some("1"), Some("6"), ROOM, "broadcast", m2.clone()));
    assert_eq!(echo.recv_json(WAIT), v2_frame(None, None, ROOM, "broadcast", m2.clone()));
    assert_eq!(quiet.recv_json(WAIT), v2_frame(None, None, ROOM, "broadcast", m2));
    echo.expect_silence(QUIET);
}

#[test]
fn text_broadcast_ack_true_and_false() {
    let server = Server::start(&[]);
    let mut acked = connect_v2(&server);
    let mut plain = connect_v2(&server);
    join_v2(&mut acked, ROOM, "1", config(false, true));
    join_v2(&mut plain, ROOM, "1", config(false, false));

    let m1 = user_broadcast("e", json!({"n": 1}));
    acked.send_text(&v2(Some("1"), Some("5"), ROOM, "broadcast", m1.clone()));
    assert_eq!(
        acked.recv_json(WAIT),
        json!(["1", "5", ROOM, "phx_reply", {"status": "ok", "response": {}}])
    );
    assert_eq!(plain.recv_json(WAIT), v2_frame(None, None, ROOM, "broadcast", m1));

    let m2 = user_broadcast("e", json!({"n": 2}));
    plain.send_text(&v2(Some("1"), Some("6"), ROOM, "broadcast", m2.clone()));
    assert_eq!(acked.recv_json(WAIT), v2_frame(None, None, ROOM, "broadcast", m2));
    plain.expect_silence(QUIET);
}

// ---------------------------------------------------------------------------------------------
// §1.6.2, §3.3 Binary broadcasts and V1 ↔ V2 interop
// ---------------------------------------------------------------------------------------------

#[test]
fn kind3_json_reaches_v2_as_kind4_and_v1_as_json() {
    let server = Server::start(&[]);
    let mut sender = connect_v2(&server);
    let mut v2_peer = connect_v2(&server);
    let mut v1_peer = connect_v1(&server);
    join_v2(&mut sender, ROOM, "1", config(true, true));
    join_v2(&mut v2_peer, ROOM, "1", config(false, false));
    join_v1(&mut v1_peer, ROOM, "1", config(false, false));

    // Exactly the §3.1 example bytes.
    let payload_bytes = br#"{"x":1,"y":2}"#;
    let frame = kind3("1", "5", ROOM, "cursor", b"", 1, payload_bytes);
    let mut expected_header = vec![0x03, 0x01, 0x01, 0x0E, 0x06, 0x00, 0x01];
    expected_header.extend_from_slice(b"15realtime:room1cursor");
    assert_eq!(&frame[..expected_header.len()], &expected_header[..], "test builder matches §3.1");
    sender.send_binary(&frame);

    // Expected kind 4: 04 0E 06 00 01 "realtime:room1" "cursor" {"x":1,"y":2}
    let mut expected_k4 = vec![0x04, 0x0E, 0x06, 0x00, 0x01];
    expected_k4.extend_from_slice(b"realtime:room1cursor");
    expected_k4.extend_from_slice(payload_bytes);

    let got = v2_peer.recv_binary(WAIT);
    assert_eq!(got, expected_k4, "V2 peer kind 4: got {}", hex_preview(&got));

    assert_eq!(
        v1_peer.recv_json(WAIT),
        json!({"topic": ROOM, "event": "broadcast",
               "payload": {"type": "broadcast", "event": "cursor", "payload": {"x": 1, "y": 2}}, "ref": null})
    );

    // The sender (self: true, ack: true) gets the JSON ack reply and its own kind-4 frame, in
    // either order.
    let mut saw_ack = false;
    let mut saw_own = false;
    for _ in 0..2 {
        match sender.recv_frame(WAIT) {
            Frame::Text(t) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                assert_eq!(v, json!(["1", "5", ROOM, "phx_reply", {"status": "ok", "response": {}}]));
                saw_ack = true;
            }
            Frame::Binary(b) => {
                assert_eq!(b, expected_k4, "sender's own kind 4: got {}", hex_preview(&b));
                saw_own = true;
            }
            other => panic!("sender: expected ack and own message, got {}", describe(&other)),
        }
    }
    assert!(saw_ack && saw_own);
    sender.expect_silence(QUIET);
    v2_peer.expect_silence(Duration::from_millis(50));
    v1_peer.expect_silence(Duration::from_millis(50));
}

#[test]
fn kind3_binary_reaches_v2_as_kind4_encoding0_and_not_v1() {
    let server = Server::start(&[]);
    let mut sender = connect_v2(&server);
    let mut v2_peer = connect_v2(&server);
    let mut v1_peer = connect_v1(&server);
    join_v2(&mut sender, ROOM, "1", config(false, false));
    join_v2(&mut v2_peer, ROOM, "1", config(false, false));
    join_v1(&mut v1_peer, ROOM, "1", config(false, false));

    let payload: Vec<u8> = vec![0x00, 0xff, 0xfe, 0x01, 0x80, b'{', 0x00];
    sender.send_binary(&kind3("1", "5", ROOM, "blob", b"", 0, &payload));
    let k4 = parse_kind4(&v2_peer.recv_binary(WAIT));
    assert_eq!(
        k4,
        Kind4 { topic: ROOM.into(), event: "blob".into(), metadata: vec![], encoding: 0, payload: payload.clone() }
    );
    v1_peer.expect_silence(QUIET);
    sender.expect_silence(Duration::from_millis(50));

    // The V1 socket is still fine and still subscribed.
    heartbeat_v1(&mut v1_peer, "2");
    sender.send_binary(&kind3_json("1", "6", ROOM, "after", &json!({"ok": true})));
    assert_eq!(
        v1_peer.recv_json(WAIT),
        v1_frame(ROOM, "broadcast", user_broadcast("after", json!({"ok": true})), None)
    );
}

#[test]
fn kind3_with_persist_metadata_is_delivered_with_empty_metadata() {
    // §3.7: `persist` metadata is ignored without failing; §3.3: kind 4 carries empty metadata.
    let server = Server::start(&[]);
    let mut sender = connect_v2(&server);
    let mut peer = connect_v2(&server);
    join_v2(&mut sender, ROOM, "1", config(false, true));
    join_v2(&mut peer, ROOM, "1", config(false, false));
    sender.send_binary(&kind3("1", "5", ROOM, "e", br#"{"persist":true}"#, 1, br#"{"a":1}"#));
    assert_eq!(
        sender.recv_json(WAIT),
        json!(["1", "5", ROOM, "phx_reply", {"status": "ok", "response": {}}])
    );
    let k4 = parse_kind4(&peer.recv_binary(WAIT));
    assert_eq!(k4.topic, ROOM);
    assert_eq!(k4.event, "e");
    assert_eq!(k4.encoding, 1);
    assert_eq!(k4.metadata, b"", "metadata: {:?}", String::from_utf8_lossy(&k4.metadata));
    assert_eq!(k4.json(), json!({"a": 1}));
}

#[test]
fn kind3_self_false_skips_sender_and_ack_false_has_no_reply() {
    let server = Server::start(&[]);
    let mut sender = connect_v2(&server);
    let mut peer = connect_v2(&server);
    join_v2(&mut sender, ROOM, "1", config(false, false));
    join_v2(&mut peer, ROOM, "1", config(false, false));
    sender.send_binary(&kind3_json("1", "5", ROOM, "e", &json!({"n": 1})));
    let k4 = parse_kind4(&peer.recv_binary(WAIT));
    assert_eq!(k4.json(), json!({"n": 1}));
    sender.expect_silence(QUIET);
    heartbeat_v2(&mut sender, "6");
}

#[test]
fn v1_json_broadcast_reaches_v2_as_text_array() {
    let server = Server::start(&[]);
    let mut v1_sender = connect_v1(&server);
    let mut v2_peer = connect_v2(&server);
    let mut v1_peer = connect_v1(&server);
    join_v1(&mut v1_sender, ROOM, "1", config(false, false));
    join_v2(&mut v2_peer, ROOM, "1", config(false, false));
    join_v1(&mut v1_peer, ROOM, "1", config(false, false));

    let msg = user_broadcast("cursor", json!({"x": 1, "y": 2}));
    v1_sender.send_text(&v1j(ROOM, "broadcast", msg.clone(), Some("5"), Some("1")));
    assert_eq!(v2_peer.recv_json(WAIT), json!([null, null, ROOM, "broadcast", msg.clone()]));
    assert_eq!(v1_peer.recv_json(WAIT), v1_frame(ROOM, "broadcast", msg, None));
}

#[test]
fn v2_text_broadcast_reaches_v1_as_object() {
    let server = Server::start(&[]);
    let mut v2_sender = connect_v2(&server);
    let mut v1_peer = connect_v1(&server);
    join_v2(&mut v2_sender, ROOM, "1", config(false, false));
    join_v1(&mut v1_peer, ROOM, "1", config(false, false));
    let msg = json!({"type": "broadcast", "event": "e", "payload": {"deep": [1, {"k": null}]}});
    v2_sender.send_text(&v2(Some("1"), Some("5"), ROOM, "broadcast", msg.clone()));
    assert_eq!(v1_peer.recv_json(WAIT), v1_frame(ROOM, "broadcast", msg, None));
}

#[test]
fn two_hundred_binary_broadcasts_arrive_in_order() {
    let server = Server::start(&[]);
    let mut a = connect_v2(&server);
    let mut b = connect_v2(&server);
    join_v2(&mut a, ROOM, "1", config(false, false));
    join_v2(&mut b, ROOM, "1", config(false, false));
    for i in 0..200 {
        a.send_binary(&kind3_json("1", &format!("{}", i + 2), ROOM, "seq", &json!({"i": i})));
    }
    for i in 0..200 {
        let k4 = parse_kind4(&b.recv_binary(WAIT));
        assert_eq!((k4.event.as_str(), k4.json()), ("seq", json!({"i": i})), "message #{i}");
    }
    b.expect_silence(QUIET);
}

#[test]
fn fifty_mixed_receivers_each_get_every_message_once() {
    let server = Server::start(&[]);
    // 25 V1 + 25 V2 sockets; with 2 shards the connections land on both.
    let mut v1s: Vec<Client> = (0..25).map(|_| connect_v1(&server)).collect();
    let mut v2s: Vec<Client> = (0..25).map(|_| connect_v2(&server)).collect();
    for c in v1s.iter_mut() {
        join_v1(c, ROOM, "1", config(false, false));
    }
    for c in v2s.iter_mut() {
        join_v2(c, ROOM, "1", config(false, false));
    }
    let mut sender = connect_v2(&server);
    join_v2(&mut sender, ROOM, "1", config(false, true));
    for i in 0..5 {
        let r = format!("{}", i + 2);
        sender.send_binary(&kind3_json("1", &r, ROOM, "fan", &json!({"i": i})));
        assert_eq!(sender.recv_json(WAIT), v2_reply(Some("1"), Some(&r), ROOM, "ok", json!({})));
    }
    for (n, c) in v2s.iter_mut().enumerate() {
        for i in 0..5 {
            let k4 = parse_kind4(&c.recv_binary(WAIT));
            assert_eq!(
                (k4.topic.as_str(), k4.event.as_str(), k4.encoding, k4.json()),
                (ROOM, "fan", 1, json!({"i": i})),
                "V2 receiver {n}, message {i}"
            );
        }
    }
    for (n, c) in v1s.iter_mut().enumerate() {
        for i in 0..5 {
            assert_eq!(
                c.recv_json(WAIT),
                v1_frame(ROOM, "broadcast", user_broadcast("fan", json!({"i": i})), None),
                "V1 receiver {n}, message {i}"
            );
        }
    }
    for c in v1s.iter_mut().chain(v2s.iter_mut()) {
        c.expect_silence(Duration::from_millis(20));
    }
    sender.expect_silence(QUIET);
}

#[test]
fn unknown_event_on_joined_channel_gets_no_reply() {
    let server = Server::start(&[]);
    let mut c = connect_v2(&server);
    join_v2(&mut c, ROOM, "1", config(false, true));
    c.send_text(&v2(Some("1"), Some("2"), ROOM, "what_is_this", json!({})));
    c.expect_silence(QUIET);
    heartbeat_v2(&mut c, "3");
}

// ---------------------------------------------------------------------------------------------
// §3.5 Payload size
// ---------------------------------------------------------------------------------------------

#[test]
fn payload_over_the_limit_is_refused_with_ack_and_not_delivered() {
    let server = Server::start(&[("REALTIME_MAX_PAYLOAD_BYTES", "1000")]);
    let mut a = connect_v2(&server);
    let mut b = connect_v2(&server);
    join_v2(&mut a, ROOM, "1", config(false, true));
    join_v2(&mut b, ROOM, "1", config(false, false));
    let error = json!({"status": "error", "response": "payload_size_exceeded"});

    // Text frame.
    a.send_text(&v2(Some("1"), Some("5"), ROOM, "broadcast", user_broadcast("big", json!({"t": "x".repeat(2000)}))));
    assert_eq!(a.recv_json(WAIT), json!(["1", "5", ROOM, "phx_reply", error.clone()]));
    // Binary kind 3, JSON and raw.
    let big_json = json!({"t": "y".repeat(2000)});
    a.send_binary(&kind3_json("1", "6", ROOM, "big", &big_json));
    assert_eq!(a.recv_json(WAIT), json!(["1", "6", ROOM, "phx_reply", error.clone()]));
    a.send_binary(&kind3("1", "7", ROOM, "big", b"", 0, &vec![7u8; 2000]));
    assert_eq!(a.recv_json(WAIT), json!(["1", "7", ROOM, "phx_reply", error]));
    b.expect_silence(QUIET);

    a.send_binary(&kind3_json("1", "8", ROOM, "small", &json!({"t": "ok"})));
    assert_eq!(a.recv_json(WAIT), v2_reply(Some("1"), Some("8"), ROOM, "ok", json!({})));
    assert_eq!(parse_kind4(&b.recv_binary(WAIT)).json(), json!({"t": "ok"}));
}

// ---------------------------------------------------------------------------------------------
// §2.5 Join errors, §9.1 channels per socket
// ---------------------------------------------------------------------------------------------

#[track_caller]
fn join_error(c: &mut Client, topic: &str, payload: Value) -> String {
    c.send_text(&v2(Some("1"), Some("1"), topic, "phx_join", payload));
    let reply = c.recv_json(WAIT);
    let arr = reply.as_array().unwrap_or_else(|| panic!("reply: {reply}"));
    assert_eq!(arr.len(), 5, "reply: {reply}");
    assert_eq!(&arr[..4], &[json!("1"), json!("1"), json!(topic), json!("phx_reply")], "reply: {reply}");
    assert_eq!(arr[4]["status"], json!("error"), "reply: {reply}");
    let response = arr[4]["response"].as_object().unwrap_or_else(|| panic!("reply: {reply}"));
    assert_eq!(response.len(), 1, "response holds only `reason`: {reply}");
    response["reason"].as_str().unwrap_or_else(|| panic!("reply: {reply}")).to_string()
}

#[test]
fn expired_access_token_is_refused_with_age() {
    let server = Server::start(&[]);
    let mut c = connect_v2(&server);
    let expired = support::token("authenticated", &["--sub", "x", "--exp=-30"]);
    let reason = join_error(&mut c, ROOM, json!({"config": config(false, false), "access_token": expired}));
    let n = expired_seconds(&reason, "InvalidJWTToken: Token has expired ");
    assert!((29..=45).contains(&n), "expired about 30 s ago, server says {n}: {reason:?}");
}

#[test]
fn garbage_access_token_is_malformed() {
    let server = Server::start(&[]);
    let mut c = connect_v2(&server);
    let reason = join_error(&mut c, ROOM, json!({"config": config(false, false), "access_token": "garbage"}));
    assert_eq!(reason, "MalformedJWT: The token provided is not a valid JWT");
}

#[test]
fn the_101st_channel_on_a_socket_is_refused() {
    let server = Server::start(&[]);
    let mut c = connect_v2(&server);
    for i in 0..100 {
        let r = format!("{}", i + 1);
        join_v2(&mut c, &format!("realtime:chan-{i}"), &r, config(false, false));
    }
    c.send_text(&v2(Some("101"), Some("101"), "realtime:chan-100", "phx_join", json!({"config": config(false, false)})));
    assert_eq!(
        c.recv_json(WAIT),
        json!(["101", "101", "realtime:chan-100", "phx_reply",
               {"status": "error", "response": {"reason": "ChannelRateLimitReached: Too many channels"}}])
    );
    heartbeat_v2(&mut c, "102");
}
