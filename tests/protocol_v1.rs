//! Serializer V1 (`vsn=1.0.0`, JSON objects): PROTOCOL.md §1.5, §1.7–§1.11, §2, §3, §6.1, §9.1.
//!
//! Every test starts its own server and talks to it with raw WebSocket clients; expected frames
//! are compared as parsed JSON, so key order does not matter but every key does (a V1 server
//! frame must never carry `join_ref`).

mod support;
mod wsclient;

use std::time::{Duration, Instant};

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
    let mut c = connect_v1(&server);
    c.send_text(r#"{"topic":"phoenix","event":"heartbeat","payload":{},"ref":"7"}"#);
    assert_eq!(
        c.recv_json(WAIT),
        json!({"topic":"phoenix","event":"phx_reply","payload":{"status":"ok","response":{}},"ref":"7"})
    );
}

#[test]
fn heartbeat_with_null_ref_gets_null_ref_reply() {
    // The Python client sends `ref: null` (and a `join_ref` key).
    let server = Server::start(&[]);
    let mut c = connect_v1(&server);
    c.send_text(r#"{"topic":"phoenix","event":"heartbeat","payload":{},"ref":null,"join_ref":null}"#);
    assert_eq!(
        c.recv_json(WAIT),
        json!({"topic":"phoenix","event":"phx_reply","payload":{"status":"ok","response":{}},"ref":null})
    );
}

#[test]
fn refs_are_echoed_verbatim() {
    let server = Server::start(&[]);
    let mut c = connect_v1(&server);
    for r in ["ref-✓-1", "", "0", "a b\"c"] {
        heartbeat_v1(&mut c, r);
    }
}

#[test]
fn heartbeats_are_answered_while_channels_are_joined() {
    let server = Server::start(&[]);
    let mut c = connect_v1(&server);
    join_v1(&mut c, ROOM, "1", config(false, false));
    for i in 2..6 {
        heartbeat_v1(&mut c, &i.to_string());
    }
}

// ---------------------------------------------------------------------------------------------
// §2.6 Join ok reply; §1.7 topics
// ---------------------------------------------------------------------------------------------

#[test]
fn join_ok_reply_has_exact_shape_and_no_join_ref() {
    let server = Server::start(&[]);
    let mut c = connect_v1(&server);
    c.send_text(
        &json!({"topic": ROOM, "event": "phx_join", "payload": {"config": config(false, false)},
                "ref": "1", "join_ref": "1"})
        .to_string(),
    );
    let reply = c.recv_json(WAIT);
    assert_eq!(
        reply,
        json!({"topic": ROOM, "event": "phx_reply",
               "payload": {"status": "ok", "response": {"postgres_changes": []}}, "ref": "1"})
    );
    assert!(reply.get("join_ref").is_none(), "V1 server frames never carry join_ref: {reply}");
}

#[test]
fn join_with_a_valid_user_access_token_succeeds() {
    let server = Server::start(&[]);
    let mut c = connect_v1(&server);
    let user = support::token("authenticated", &["--sub", "0b6f3c1e-6a1d-4b8f-9d61-3f0b3b0e8a11", "--exp=3600"]);
    c.send_text(&v1j(
        ROOM,
        "phx_join",
        json!({"config": config(false, false), "access_token": user, "version": "realtime-js/2.119.1"}),
        Some("1"),
        Some("1"),
    ));
    assert_eq!(c.recv_json(WAIT), v1_reply(ROOM, Some("1"), "ok", ok_join_response()));
}

#[test]
fn lenient_config_fields_do_not_fail_the_join() {
    // §2.2: unparsable fields fall back to their defaults; unknown keys are ignored.
    let server = Server::start(&[]);
    let mut c = connect_v1(&server);
    let payload = json!({
        "config": {
            "broadcast": {"ack": "yes", "self": "TRUE"},
            "presence": {"key": "", "enabled": false},
            "postgres_changes": null,
            "private": "false",
            "postgres_changes_options": {"wait": false, "timeout": 15000}
        },
        "version": "realtime-js/2.119.1",
        "something_new": 1
    });
    c.send_text(&v1j(ROOM, "phx_join", payload, Some("1"), Some("1")));
    assert_eq!(c.recv_json(WAIT), v1_reply(ROOM, Some("1"), "ok", ok_join_response()));
}

#[test]
fn string_booleans_in_config_are_coerced() {
    // §2.2 boolean coercion: "True" counts as true, so the sender gets its own message.
    let server = Server::start(&[]);
    let mut a = connect_v1(&server);
    let cfg = json!({"broadcast": {"self": "True", "ack": "false"}, "presence": {"key": "", "enabled": false},
                     "postgres_changes": [], "private": false});
    join_v1(&mut a, ROOM, "1", cfg);
    let msg = user_broadcast("ping", json!({"n": 1}));
    a.send_text(&v1j(ROOM, "broadcast", msg.clone(), Some("2"), Some("1")));
    assert_eq!(a.recv_json(WAIT), v1_frame(ROOM, "broadcast", msg, None));
    a.expect_silence(QUIET);
}

#[test]
fn topic_without_realtime_prefix_is_the_same_channel() {
    let server = Server::start(&[]);
    let mut bare = connect_v1(&server);
    let mut prefixed = connect_v1(&server);
    join_v1(&mut bare, "chat:room-42", "1", config(false, false));
    join_v1(&mut prefixed, "realtime:chat:room-42", "1", config(false, false));

    let m1 = user_broadcast("chat_message", json!({"text": "from bare"}));
    bare.send_text(&v1j("chat:room-42", "broadcast", m1.clone(), Some("2"), Some("1")));
    assert_eq!(
        prefixed.recv_json(WAIT),
        v1_frame("realtime:chat:room-42", "broadcast", m1, None),
        "the receiver sees its own spelling of the topic"
    );

    let m2 = user_broadcast("chat_message", json!({"text": "from prefixed"}));
    prefixed.send_text(&v1j("realtime:chat:room-42", "broadcast", m2.clone(), Some("2"), Some("1")));
    assert_eq!(bare.recv_json(WAIT), v1_frame("chat:room-42", "broadcast", m2, None));
    bare.expect_silence(QUIET);
    prefixed.expect_silence(QUIET);
}

#[test]
fn empty_sub_topic_is_refused() {
    let server = Server::start(&[]);
    let mut c = connect_v1(&server);
    c.send_text(&v1j("realtime:", "phx_join", json!({"config": config(false, false)}), Some("1"), Some("1")));
    assert_eq!(
        c.recv_json(WAIT),
        v1_reply(
            "realtime:",
            Some("1"),
            "error",
            json!({"reason": "TopicNameRequired: You must provide a topic name"})
        )
    );
    heartbeat_v1(&mut c, "2");
}

#[test]
fn event_on_unjoined_topic_gets_unmatched_topic() {
    let server = Server::start(&[]);
    let mut c = connect_v1(&server);
    c.send_text(&v1j(
        "realtime:nope",
        "broadcast",
        user_broadcast("x", json!({})),
        Some("3"),
        Some("1"),
    ));
    assert_eq!(
        c.recv_json(WAIT),
        v1_reply("realtime:nope", Some("3"), "error", json!({"reason": "unmatched topic"}))
    );
    heartbeat_v1(&mut c, "4");
}

// ---------------------------------------------------------------------------------------------
// §1.9 Leave, close, duplicate join, join_ref leniency
// ---------------------------------------------------------------------------------------------

#[test]
fn leave_replies_ok_then_closes_with_join_ref() {
    let server = Server::start(&[]);
    let mut c = connect_v1(&server);
    join_v1(&mut c, ROOM, "1", config(false, false));
    c.send_text(&v1j(ROOM, "phx_leave", json!({}), Some("12"), Some("1")));
    assert_eq!(c.recv_json(WAIT), v1_reply(ROOM, Some("12"), "ok", json!({})));
    assert_eq!(c.recv_json(WAIT), v1_frame(ROOM, "phx_close", json!({}), Some("1")));

    // The channel is gone: further events on it are unmatched.
    c.send_text(&v1j(ROOM, "broadcast", user_broadcast("x", json!({})), Some("13"), Some("1")));
    assert_eq!(
        c.recv_json(WAIT),
        v1_reply(ROOM, Some("13"), "error", json!({"reason": "unmatched topic"}))
    );
}

#[test]
fn leave_after_join_without_join_ref_closes_with_null_ref() {
    // §1.9: V1 phx_close `ref` is the join_ref the client sent, or null when it sent none.
    let server = Server::start(&[]);
    let mut c = connect_v1(&server);
    c.send_text(&v1(ROOM, "phx_join", json!({"config": config(false, false)}), Some("1")));
    assert_eq!(c.recv_json(WAIT), v1_reply(ROOM, Some("1"), "ok", ok_join_response()));
    c.send_text(&v1(ROOM, "phx_leave", json!({}), Some("2")));
    assert_eq!(c.recv_json(WAIT), v1_reply(ROOM, Some("2"), "ok", json!({})));
    assert_eq!(c.recv_json(WAIT), v1_frame(ROOM, "phx_close", json!({}), None));
}

#[test]
fn leave_on_unjoined_topic_replies_ok() {
    let server = Server::start(&[]);
    let mut c = connect_v1(&server);
    c.send_text(&v1j("realtime:never", "phx_leave", json!({}), Some("5"), Some("4")));
    assert_eq!(c.recv_json(WAIT), v1_reply("realtime:never", Some("5"), "ok", json!({})));
    c.expect_silence(QUIET);
}

#[test]
fn duplicate_join_closes_the_old_channel_first() {
    let server = Server::start(&[]);
    let mut c = connect_v1(&server);
    let mut peer = connect_v1(&server);
    join_v1(&mut c, ROOM, "1", config(false, false));
    join_v1(&mut peer, ROOM, "1", config(false, false));

    c.send_text(&v1j(ROOM, "phx_join", json!({"config": config(false, false)}), Some("2"), Some("2")));
    assert_eq!(
        c.recv_json(WAIT),
        v1_frame(ROOM, "phx_close", json!({}), Some("1")),
        "old channel closed with the old join_ref"
    );
    assert_eq!(c.recv_json(WAIT), v1_reply(ROOM, Some("2"), "ok", ok_join_response()));

    // Only the new channel is subscribed: a broadcast arrives exactly once.
    let msg = user_broadcast("e", json!({"after": "rejoin"}));
    peer.send_text(&v1j(ROOM, "broadcast", msg.clone(), Some("2"), Some("1")));
    assert_eq!(c.recv_json(WAIT), v1_frame(ROOM, "broadcast", msg, None));
    c.expect_silence(QUIET);
}

#[test]
fn frames_with_stale_or_missing_join_ref_are_processed() {
    let server = Server::start(&[]);
    let mut a = connect_v1(&server);
    let mut b = connect_v1(&server);
    join_v1(&mut a, ROOM, "1", config(false, true));
    join_v1(&mut b, ROOM, "1", config(false, false));

    let m1 = user_broadcast("e", json!({"n": 1}));
    a.send_text(&v1j(ROOM, "broadcast", m1.clone(), Some("2"), Some("99")));
    assert_eq!(a.recv_json(WAIT), v1_reply(ROOM, Some("2"), "ok", json!({})));
    assert_eq!(b.recv_json(WAIT), v1_frame(ROOM, "broadcast", m1, None));

    let m2 = user_broadcast("e", json!({"n": 2}));
    a.send_text(&v1(ROOM, "broadcast", m2.clone(), Some("3")));
    assert_eq!(a.recv_json(WAIT), v1_reply(ROOM, Some("3"), "ok", json!({})));
    assert_eq!(b.recv_json(WAIT), v1_frame(ROOM, "broadcast", m2, None));
}

// ---------------------------------------------------------------------------------------------
// §3 Broadcast
// ---------------------------------------------------------------------------------------------

#[test]
fn broadcast_self_false_skips_the_sender() {
    let server = Server::start(&[]);
    let mut a = connect_v1(&server);
    let mut b = connect_v1(&server);
    join_v1(&mut a, ROOM, "1", config(false, false));
    join_v1(&mut b, ROOM, "1", config(false, false));
    let msg = user_broadcast("cursor", json!({"x": 1, "y": 2}));
    a.send_text(&v1j(ROOM, "broadcast", msg.clone(), Some("5"), Some("1")));
    assert_eq!(b.recv_json(WAIT), v1_frame(ROOM, "broadcast", msg, None));
    a.expect_silence(QUIET);
}

#[test]
fn broadcast_self_true_reaches_the_sender_too() {
    let server = Server::start(&[]);
    let mut a = connect_v1(&server);
    let mut b = connect_v1(&server);
    join_v1(&mut a, ROOM, "1", config(true, false));
    join_v1(&mut b, ROOM, "1", config(false, false));
    let msg = user_broadcast("cursor", json!({"x": 1, "y": 2}));
    a.send_text(&v1j(ROOM, "broadcast", msg.clone(), Some("5"), Some("1")));
    assert_eq!(a.recv_json(WAIT), v1_frame(ROOM, "broadcast", msg.clone(), None));
    assert_eq!(b.recv_json(WAIT), v1_frame(ROOM, "broadcast", msg, None));
    a.expect_silence(QUIET);
}

#[test]
fn broadcast_payload_is_forwarded_as_is() {
    // §3.1: no validation of type/event/payload; non-object payloads are forwarded too.
    let server = Server::start(&[]);
    let mut a = connect_v1(&server);
    let mut b = connect_v1(&server);
    join_v1(&mut a, ROOM, "1", config(false, false));
    join_v1(&mut b, ROOM, "1", config(false, false));
    for payload in [
        json!({"anything": [1, 2, {"deep": null}], "unicode": "héllo ✓"}),
        json!({"type": "broadcast", "event": "e"}),
        json!([1, 2, 3]),
        json!("a string"),
    ] {
        a.send_text(&v1j(ROOM, "broadcast", payload.clone(), Some("5"), Some("1")));
        assert_eq!(b.recv_json(WAIT), v1_frame(ROOM, "broadcast", payload, None));
    }
}

#[test]
fn ack_true_gets_ok_reply() {
    let server = Server::start(&[]);
    let mut a = connect_v1(&server);
    join_v1(&mut a, ROOM, "1", config(false, true));
    // No other subscriber: the ack is sent regardless.
    a.send_text(&v1j(ROOM, "broadcast", user_broadcast("e", json!({"v": 1})), Some("5"), Some("1")));
    assert_eq!(
        a.recv_json(WAIT),
        json!({"topic": ROOM, "event": "phx_reply", "payload": {"status": "ok", "response": {}}, "ref": "5"})
    );
    a.expect_silence(QUIET);
}

#[test]
fn ack_false_gets_no_reply() {
    let server = Server::start(&[]);
    let mut a = connect_v1(&server);
    let mut b = connect_v1(&server);
    join_v1(&mut a, ROOM, "1", config(false, false));
    join_v1(&mut b, ROOM, "1", config(false, false));
    let msg = user_broadcast("e", json!({"v": 1}));
    a.send_text(&v1j(ROOM, "broadcast", msg.clone(), Some("5"), Some("1")));
    assert_eq!(b.recv_json(WAIT), v1_frame(ROOM, "broadcast", msg, None));
    a.expect_silence(QUIET);
    heartbeat_v1(&mut a, "6");
}

#[test]
fn two_hundred_broadcasts_arrive_in_order() {
    let server = Server::start(&[]);
    let mut a = connect_v1(&server);
    let mut b = connect_v1(&server);
    join_v1(&mut a, ROOM, "1", config(false, false));
    join_v1(&mut b, ROOM, "1", config(false, false));
    for i in 0..200 {
        a.send_text(&v1j(ROOM, "broadcast", user_broadcast("seq", json!({"i": i})), Some(&format!("{}", i + 2)), Some("1")));
    }
    for i in 0..200 {
        let frame = b.recv_json(WAIT);
        assert_eq!(frame, v1_frame(ROOM, "broadcast", user_broadcast("seq", json!({"i": i})), None), "message #{i}");
    }
    b.expect_silence(QUIET);
}

#[test]
fn fifty_receivers_each_get_every_message_once() {
    let server = Server::start(&[]);
    let mut receivers: Vec<Client> = (0..50).map(|_| connect_v1(&server)).collect();
    for r in receivers.iter_mut() {
        join_v1(r, ROOM, "1", config(false, false));
    }
    let mut sender = connect_v1(&server);
    join_v1(&mut sender, ROOM, "1", config(false, true));
    for i in 0..5 {
        let r = format!("{}", i + 2);
        sender.send_text(&v1j(ROOM, "broadcast", user_broadcast("fan", json!({"i": i})), Some(&r), Some("1")));
        assert_eq!(sender.recv_json(WAIT), v1_reply(ROOM, Some(&r), "ok", json!({})));
    }
    for (n, r) in receivers.iter_mut().enumerate() {
        for i in 0..5 {
            assert_eq!(
                r.recv_json(WAIT),
                v1_frame(ROOM, "broadcast", user_broadcast("fan", json!({"i": i})), None),
                "receiver {n}, message {i}"
            );
        }
    }
    for r in receivers.iter_mut() {
        r.expect_silence(Duration::from_millis(20));
    }
    sender.expect_silence(QUIET);
}

#[test]
fn unknown_event_on_joined_channel_gets_no_reply() {
    let server = Server::start(&[]);
    let mut c = connect_v1(&server);
    join_v1(&mut c, ROOM, "1", config(false, true));
    c.send_text(&v1j(ROOM, "something_else", json!({"a": 1}), Some("2"), Some("1")));
    // The product docs' presence_diff-with-action frames are accepted as track (§0.4) — not
    // tested here; a truly unknown event must stay silent.
    c.expect_silence(QUIET);
    heartbeat_v1(&mut c, "3");
}

// ---------------------------------------------------------------------------------------------
// §3.5 Payload size
// ---------------------------------------------------------------------------------------------

#[test]
fn payload_over_the_limit_is_refused_with_ack_and_not_delivered() {
    let server = Server::start(&[("REALTIME_MAX_PAYLOAD_BYTES", "1000")]);
    let mut a = connect_v1(&server);
    let mut b = connect_v1(&server);
    join_v1(&mut a, ROOM, "1", config(false, true));
    join_v1(&mut b, ROOM, "1", config(false, false));

    let big = user_broadcast("big", json!({"text": "x".repeat(2000)}));
    a.send_text(&v1j(ROOM, "broadcast", big, Some("5"), Some("1")));
    assert_eq!(
        a.recv_json(WAIT),
        json!({"topic": ROOM, "event": "phx_reply",
               "payload": {"status": "error", "response": "payload_size_exceeded"}, "ref": "5"})
    );
    b.expect_silence(QUIET);

    // A small message still goes through.
    let small = user_broadcast("small", json!({"text": "ok"}));
    a.send_text(&v1j(ROOM, "broadcast", small.clone(), Some("6"), Some("1")));
    assert_eq!(a.recv_json(WAIT), v1_reply(ROOM, Some("6"), "ok", json!({})));
    assert_eq!(b.recv_json(WAIT), v1_frame(ROOM, "broadcast", small, None));
}

#[test]
fn payload_over_the_limit_without_ack_is_dropped_silently() {
    let server = Server::start(&[("REALTIME_MAX_PAYLOAD_BYTES", "1000")]);
    let mut a = connect_v1(&server);
    let mut b = connect_v1(&server);
    join_v1(&mut a, ROOM, "1", config(true, false));
    join_v1(&mut b, ROOM, "1", config(false, false));
    a.send_text(&v1j(ROOM, "broadcast", user_broadcast("big", json!({"text": "x".repeat(2000)})), Some("5"), Some("1")));
    a.expect_silence(QUIET);
    b.expect_silence(Duration::from_millis(50));
    heartbeat_v1(&mut a, "6");
}

// ---------------------------------------------------------------------------------------------
// §2.3–§2.5, §6.1 Channel tokens
// ---------------------------------------------------------------------------------------------

#[track_caller]
fn join_error_reason(c: &mut Client, topic: &str, payload: Value) -> String {
    c.send_text(&v1j(topic, "phx_join", payload, Some("1"), Some("1")));
    let reply = c.recv_json(WAIT);
    assert_eq!(reply["topic"], json!(topic), "reply: {reply}");
    assert_eq!(reply["event"], json!("phx_reply"), "reply: {reply}");
    assert_eq!(reply["ref"], json!("1"), "reply: {reply}");
    assert!(reply.get("join_ref").is_none(), "reply: {reply}");
    assert_eq!(reply["payload"]["status"], json!("error"), "reply: {reply}");
    let response = reply["payload"]["response"].as_object().unwrap_or_else(|| panic!("reply: {reply}"));
    assert_eq!(response.len(), 1, "response holds only `reason`: {reply}");
    response["reason"].as_str().unwrap_or_else(|| panic!("reply: {reply}")).to_string()
}

#[test]
fn expired_access_token_is_refused_with_age() {
    let server = Server::start(&[]);
    let mut c = connect_v1(&server);
    let expired = support::token("authenticated", &["--sub", "x", "--exp=-30"]);
    let reason = join_error_reason(&mut c, ROOM, json!({"config": config(false, false), "access_token": expired}));
    let n = expired_seconds(&reason, "InvalidJWTToken: Token has expired ");
    assert!((29..=45).contains(&n), "expired about 30 s ago, server says {n}: {reason:?}");
    heartbeat_v1(&mut c, "2");
}

#[test]
fn garbage_access_token_is_malformed() {
    let server = Server::start(&[]);
    let mut c = connect_v1(&server);
    let reason = join_error_reason(&mut c, ROOM, json!({"config": config(false, false), "access_token": "garbage"}));
    assert_eq!(reason, "MalformedJWT: The token provided is not a valid JWT");
}

#[test]
fn empty_access_token_is_malformed() {
    let server = Server::start(&[]);
    let mut c = connect_v1(&server);
    let reason = join_error_reason(&mut c, ROOM, json!({"config": config(false, false), "access_token": ""}));
    assert_eq!(reason, "MalformedJWT: The token provided is not a valid JWT");
}

#[test]
fn access_token_with_wrong_signature_is_refused() {
    let server = Server::start(&[]);
    let mut c = connect_v1(&server);
    let bad = with_wrong_signature(
        &support::token("authenticated", &["--sub", "a", "--exp=3600"]),
        &support::token("authenticated", &["--sub", "b", "--exp=3600"]),
    );
    let reason = join_error_reason(&mut c, ROOM, json!({"config": config(false, false), "access_token": bad}));
    assert_eq!(reason, "JwtSignatureError: Failed to validate JWT signature");
}

#[test]
fn sb_api_key_as_access_token_uses_the_connection_token() {
    // §2.3 step 1: new-style `sb_` keys are not JWTs; the connection token is used instead.
    let server = Server::start(&[]);
    let mut c = connect_v1(&server);
    c.send_text(&v1j(
        ROOM,
        "phx_join",
        json!({"config": config(false, false), "access_token": "sb_publishable_abc123"}),
        Some("1"),
        Some("1"),
    ));
    assert_eq!(c.recv_json(WAIT), v1_reply(ROOM, Some("1"), "ok", ok_join_response()));
}

#[test]
fn join_payload_that_is_not_an_object_is_an_unknown_error() {
    // §2.2 (SHOULD): a join payload that is not a JSON object → "Unknown Error on Channel".
    let server = Server::start(&[]);
    let mut c = connect_v1(&server);
    let reason = join_error_reason(&mut c, ROOM, json!("not an object"));
    assert_eq!(reason, "Unknown Error on Channel");
    heartbeat_v1(&mut c, "2");
}

#[test]
fn failed_rejoin_leaves_the_topic_closed() {
    // §2.5 notes: the duplicate join closes the old channel before the join is checked.
    let server = Server::start(&[]);
    let mut c = connect_v1(&server);
    join_v1(&mut c, ROOM, "1", config(false, false));
    c.send_text(&v1j(ROOM, "phx_join", json!({"config": config(false, false), "access_token": "garbage"}), Some("2"), Some("2")));
    assert_eq!(c.recv_json(WAIT), v1_frame(ROOM, "phx_close", json!({}), Some("1")));
    assert_eq!(
        c.recv_json(WAIT),
        v1_reply(ROOM, Some("2"), "error", json!({"reason": "MalformedJWT: The token provided is not a valid JWT"}))
    );
    c.send_text(&v1j(ROOM, "broadcast", user_broadcast("x", json!({})), Some("3"), Some("2")));
    assert_eq!(
        c.recv_json(WAIT),
        v1_reply(ROOM, Some("3"), "error", json!({"reason": "unmatched topic"}))
    );
}

#[test]
fn user_token_takes_precedence_over_access_token() {
    // §2.3 step 2: user_token if it is a string, else access_token.
    let server = Server::start(&[]);
    let mut c = connect_v1(&server);
    let good = support::token("authenticated", &["--sub", "a", "--exp=3600"]);
    let reason = join_error_reason(
        &mut c,
        ROOM,
        json!({"config": config(false, false), "access_token": good, "user_token": "garbage"}),
    );
    assert_eq!(reason, "MalformedJWT: The token provided is not a valid JWT");
}

// ---------------------------------------------------------------------------------------------
// §9.1 Channels per socket
// ---------------------------------------------------------------------------------------------

#[test]
fn the_101st_channel_on_a_socket_is_refused() {
    let server = Server::start(&[]);
    let mut c = connect_v1(&server);
    for i in 0..100 {
        join_v1(&mut c, &format!("realtime:chan-{i}"), &format!("{}", i + 1), config(false, false));
    }
    let topic = "realtime:chan-100";
    c.send_text(&v1j(topic, "phx_join", json!({"config": config(false, false)}), Some("101"), Some("101")));
    assert_eq!(
        c.recv_json(WAIT),
        v1_reply(topic, Some("101"), "error", json!({"reason": "ChannelRateLimitReached: Too many channels"}))
    );
    heartbeat_v1(&mut c, "102");
    // Leaving one makes room for another.
    c.send_text(&v1j("realtime:chan-0", "phx_leave", json!({}), Some("103"), Some("1")));
    assert_eq!(c.recv_json(WAIT), v1_reply("realtime:chan-0", Some("103"), "ok", json!({})));
    assert_eq!(c.recv_json(WAIT), v1_frame("realtime:chan-0", "phx_close", json!({}), Some("1")));
    join_v1(&mut c, topic, "104", config(false, false));
}

// ---------------------------------------------------------------------------------------------
// §1.11 Idle timeout
// ---------------------------------------------------------------------------------------------

#[test]
fn idle_socket_is_closed_with_1000() {
    let server = Server::start(&[("REALTIME_IDLE_TIMEOUT_SECS", "1")]);
    let mut c = connect_v1(&server);
    let started = Instant::now();
    let code = c.recv_close(Duration::from_secs(3));
    assert_eq!(code, Some(1000), "idle close code");
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "closed after {:?}, before the 1 s idle timeout could have run out",
        started.elapsed()
    );
}

#[test]
fn websocket_pings_keep_the_socket_open() {
    // §1.11: any text/binary/ping frame resets the idle timer.
    let server = Server::start(&[("REALTIME_IDLE_TIMEOUT_SECS", "1")]);
    let mut c = connect_v1(&server);
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(3000) {
        c.send_ping(b"keepalive");
        c.expect_silence(Duration::from_millis(300));
    }
    heartbeat_v1(&mut c, "1");
}

#[test]
fn heartbeating_socket_is_not_closed() {
    let server = Server::start(&[("REALTIME_IDLE_TIMEOUT_SECS", "1")]);
    let mut c = connect_v1(&server);
    join_v1(&mut c, ROOM, "1", config(false, false));
    let started = Instant::now();
    let mut n = 2;
    while started.elapsed() < Duration::from_millis(3200) {
        std::thread::sleep(Duration::from_millis(300));
        heartbeat_v1(&mut c, &n.to_string());
        n += 1;
    }
}
