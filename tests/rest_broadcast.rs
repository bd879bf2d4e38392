//! REST broadcast (PROTOCOL.md §8) against the real server, with WebSocket subscribers checking
//! what arrives: the service key to public and private topics, the anon key refused on private
//! topics (dropped by the batch endpoint, 403 from the single endpoint), users with and without
//! an `INSERT` policy, missing and bad credentials (401), oversized bodies (413) and payloads
//! (422), and 10,000-message batches.
//!
//! Every refusal is followed by a message that must arrive (a sentinel) and a short settle
//! period, after which the subscribers must hold exactly what they were entitled to.

mod pgsupport;
mod privsupport;
mod support;
mod wsclient;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use privsupport::*;
use support::Server;
use wsclient::{anon, raw_http};

const UNAUTHORIZED: &str = r#"{"message":"Unauthorized"}"#;

fn service() -> String {
    support::service_key()
}

/// `Value` of a frame's raw text.
fn raw_json(msg: &Msg) -> Value {
    serde_json::from_str(&msg.raw).unwrap_or_else(|e| panic!("not JSON ({e}): {}", msg.raw))
}

/// The user events of broadcasts on `topic` that `conn` has received, until `sentinel` plus a
/// settle period (the sentinel included, last).
fn events_until(conn: &mut Conn, topic: &str, sentinel: &str) -> Vec<String> {
    let (before, last) = conn.broadcasts_until(topic, sentinel);
    conn.drain(SETTLE);
    let after = conn.take_pending(|m| m.is_broadcast_on(topic));
    before.iter().chain([&last]).chain(after.iter()).map(|m| m.user_event().to_string()).collect()
}

fn set(events: &[&str]) -> BTreeSet<String> {
    events.iter().map(|e| e.to_string()).collect()
}

#[test]
fn service_key_broadcasts_reach_public_and_private_topics() {
    let (mut db, server) = start_with_acl();
    const TOPIC: &str = "realtime:news";
    grant(&mut db, USER_A, "news", false);
    grant(&mut db, USER_B, "news", false);
    let mut pub_v1 = Conn::open(&server, anon(), Vsn::V1, "public-v1");
    let mut pub_v2 = Conn::open(&server, anon(), Vsn::V2, "public-v2");
    let mut priv_v1 = Conn::open(&server, &user_token(USER_A), Vsn::V1, "member-v1");
    let mut priv_v2 = Conn::open(&server, &user_token(USER_B), Vsn::V2, "member-v2");
    pub_v1.join_ok(TOPIC, config(false, false, false), None);
    pub_v2.join_ok(TOPIC, config(false, false, false), None);
    priv_v1.join_ok(TOPIC, config(true, false, false), None);
    priv_v2.join_ok(TOPIC, config(true, false, false), None);
    let key = service();
    let id = "0b6f3c1e-6a1d-4b8f-9d61-3f0b3b0e8a11";

    // Batch endpoint, both spellings: a public and a private message (with an id) in one call.
    for (i, path) in BATCH_PATHS.iter().enumerate() {
        let body = json!({"messages": [
            {"topic": "news", "event": format!("headline-{i}"), "payload": {"t": i}, "private": false},
            {"topic": "news", "event": format!("secret-{i}"), "payload": {"t": i}, "private": true, "id": id}
        ]});
        assert_eq!(post_with_key(server.addr, path, &key, &body), (202, String::new()), "POST {path}");
        let public = json!({"type": "broadcast", "event": format!("headline-{i}"), "payload": {"t": i}});
        let private = json!({"type": "broadcast", "event": format!("secret-{i}"), "payload": {"t": i}, "meta": {"id": id}});
        assert_eq!(raw_json(&pub_v1.broadcast_msg(TOPIC, &format!("headline-{i}"))), json!({"topic": TOPIC, "event": "broadcast", "payload": public, "ref": null}));
        assert_eq!(raw_json(&pub_v2.broadcast_msg(TOPIC, &format!("headline-{i}"))), json!([null, null, TOPIC, "broadcast", public]));
        assert_eq!(raw_json(&priv_v1.broadcast_msg(TOPIC, &format!("secret-{i}"))), json!({"topic": TOPIC, "event": "broadcast", "payload": private, "ref": null}));
        assert_eq!(raw_json(&priv_v2.broadcast_msg(TOPIC, &format!("secret-{i}"))), json!([null, null, TOPIC, "broadcast", private]));
    }

    // Single endpoint: public (bearer only) and private (apikey only, ?private=true).
    let (status, body) = post_json(server.addr, "/api/broadcast/news/events/single-pub", &[("Authorization", &format!("Bearer {key}"))], &json!({"s": 1}));
    assert_eq!((status, body.as_str()), (202, ""));
    let (status, body) = post_json(server.addr, "/realtime/v1/api/broadcast/news/events/single-priv?private=true", &[("apikey", &key)], &json!({"s": 2}));
    assert_eq!((status, body.as_str()), (202, ""));
    // V1: {"type":"broadcast","event":E,"payload":<body>}; V2: kind 4, JSON encoding, no metadata.
    assert_eq!(pub_v1.broadcast_msg(TOPIC, "single-pub").payload, json!({"type": "broadcast", "event": "single-pub", "payload": {"s": 1}}));
    let got = pub_v2.broadcast_msg(TOPIC, "single-pub");
    let frame = got.kind4.as_ref().unwrap_or_else(|| panic!("expected a binary kind-4 frame, got {}", got.raw));
    assert_eq!((frame.topic.as_str(), frame.encoding, frame.metadata.as_slice()), (TOPIC, 1, &b""[..]), "{}", got.raw);
    assert_eq!(got.payload["payload"], json!({"s": 1}));
    assert_eq!(priv_v1.broadcast_msg(TOPIC, "single-priv").payload, json!({"type": "broadcast", "event": "single-priv", "payload": {"s": 2}}));
    let got = priv_v2.broadcast_msg(TOPIC, "single-priv");
    assert!(got.kind4.as_ref().is_some_and(|f| f.encoding == 1 && f.metadata.is_empty()), "{}", got.raw);
    assert_eq!(got.payload["payload"], json!({"s": 2}));

    // Sentinels; then each side holds nothing of the other.
    let body = json!({"messages": [
        {"topic": "news", "event": "end", "payload": {}, "private": false},
        {"topic": "news", "event": "end", "payload": {}, "private": true}
    ]});
    assert_eq!(post_with_key(server.addr, BATCH_PATHS[0], &key, &body).0, 202);
    for conn in [&mut pub_v1, &mut pub_v2, &mut priv_v1, &mut priv_v2] {
        let events = events_until(conn, TOPIC, "end");
        assert_eq!(events, ["end"], "{}: only the sentinel is left\n{}", conn.name, conn.dump());
    }
}

#[test]
fn private_rest_messages_need_an_insert_policy_and_refusals_leak_nothing() {
    let (mut db, server) = start_with_acl();
    const TOPIC: &str = "realtime:safe";
    grant(&mut db, USER_A, "safe", false); // the member who listens
    grant(&mut db, USER_B, "safe", false); // reads, may not write
    grant(&mut db, USER_C, "safe", true); // may write
    let mut member = Conn::open(&server, &user_token(USER_A), Vsn::V2, "member");
    let mut public = Conn::open(&server, anon(), Vsn::V1, "public");
    member.join_ok(TOPIC, config(true, false, false), None);
    public.join_ok(TOPIC, config(false, false, false), None);
    let anon_key = anon().to_string();
    let reader = user_token(USER_B);
    let writer = user_token(USER_C);
    let stranger = user_token(USER_D);
    let single_private = "/api/broadcast/safe/events/EVENT?private=true";

    // The anon key: private batch messages dropped (still 202), the public one of the same call
    // delivered; the single endpoint answers 403.
    let body = json!({"messages": [
        {"topic": "safe", "event": "anon-private", "payload": {"x": 1}, "private": true},
        {"topic": "safe", "event": "anon-public", "payload": {"x": 2}, "private": false}
    ]});
    assert_eq!(post_with_key(server.addr, BATCH_PATHS[1], &anon_key, &body), (202, String::new()));
    assert_eq!(
        post_with_key(server.addr, &single_private.replace("EVENT", "anon-single"), &anon_key, &json!({"x": 3})),
        (403, UNAUTHORIZED.to_string())
    );
    // A user who may read but not write, and one who may do neither: the same.
    for (who, token) in [("reader", &reader), ("stranger", &stranger)] {
        let body = one_message("safe", &format!("{who}-batch"), json!({}), true);
        assert_eq!(post_with_key(server.addr, BATCH_PATHS[0], token, &body), (202, String::new()), "{who}");
        assert_eq!(
            post_with_key(server.addr, &single_private.replace("EVENT", &format!("{who}-single")), token, &json!({})),
            (403, UNAUTHORIZED.to_string()),
            "{who}"
        );
    }
    // A user with the INSERT policy: delivered through both endpoints.
    assert_eq!(post_with_key(server.addr, BATCH_PATHS[0], &writer, &one_message("safe", "writer-batch", json!({"w": 1}), true)).0, 202);
    assert_eq!(post_with_key(server.addr, &single_private.replace("EVENT", "writer-single"), &writer, &json!({"w": 2})).0, 202);
    // Topics are checked one by one: a granted and a denied topic in one batch.
    let body = json!({"messages": [
        {"topic": "safe", "event": "writer-mixed", "payload": {}, "private": true},
        {"topic": "elsewhere", "event": "writer-denied", "payload": {}, "private": true}
    ]});
    assert_eq!(post_with_key(server.addr, BATCH_PATHS[0], &writer, &body).0, 202);

    // Sentinel from the service key.
    assert_eq!(post_with_key(server.addr, BATCH_PATHS[0], &service(), &one_message("safe", "end", json!({}), true)).0, 202);
    let got: BTreeSet<String> = events_until(&mut member, TOPIC, "end").into_iter().collect();
    assert_eq!(got, set(&["writer-batch", "writer-single", "writer-mixed", "end"]), "{}", member.dump());
    assert_eq!(post_with_key(server.addr, BATCH_PATHS[0], &service(), &one_message("safe", "end", json!({}), false)).0, 202);
    let got: BTreeSet<String> = events_until(&mut public, TOPIC, "end").into_iter().collect();
    assert_eq!(got, set(&["anon-public", "end"]), "{}", public.dump());
}

#[test]
fn missing_or_bad_credentials_get_401_and_send_nothing() {
    let server = Server::start(&[]);
    const TOPIC: &str = "realtime:open";
    let mut listener = Conn::open(&server, anon(), Vsn::V1, "listener");
    listener.join_ok(TOPIC, config(false, false, false), None);
    let anon_key = anon().to_string();
    let svc = service();
    let exp = now_s() + 3600;
    let bad_signature = wsclient::with_wrong_signature(&anon_key, &svc);
    let expired = support::token("service_role", &["--exp=-30"]);
    let foreign = hs256(b"some-other-secret-0123456789abcdefghij", json!({"role": "service_role", "exp": exp}));
    let no_exp = hs256(support::SECRET.as_bytes(), json!({"role": "service_role"}));
    let no_role = hs256(support::SECRET.as_bytes(), json!({"exp": exp}));
    let bearer = |t: &str| format!("Bearer {t}");
    type Case<'a> = (&'a str, Vec<(&'a str, String)>, &'a str);
    let cases: Vec<Case> = vec![
        ("no key at all", vec![], ""),
        ("empty apikey", vec![("apikey", String::new())], ""),
        ("Basic scheme", vec![("Authorization", format!("Basic {svc}"))], ""),
        ("x-api-key header (not read here)", vec![("x-api-key", svc.clone())], ""),
        ("apikey query parameter (not read here)", vec![], "?apikey=SVC"),
        ("bad signature", vec![("apikey", bad_signature.clone())], ""),
        ("expired", vec![("apikey", expired.clone())], ""),
        ("service_role signed with another secret", vec![("Authorization", bearer(&foreign))], ""),
        ("no exp", vec![("apikey", no_exp.clone())], ""),
        ("no role", vec![("apikey", no_role.clone())], ""),
        ("garbage bearer", vec![("Authorization", "Bearer not.a.jwt".into())], ""),
        // Authorization wins over apikey: a bad bearer is refused even beside a good apikey.
        ("bad bearer + good apikey", vec![("Authorization", bearer(&foreign)), ("apikey", svc.clone())], ""),
    ];
    for (what, headers, query) in &cases {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let query = query.replace("SVC", &svc);
        for path in BATCH_PATHS {
            let body = one_message("open", "refused", json!({"case": what}), false);
            assert_eq!(post_json(server.addr, &format!("{path}{query}"), &headers, &body), (401, UNAUTHORIZED.to_string()), "{what}: POST {path}");
        }
        let single = format!("/api/broadcast/open/events/refused{}", if query.is_empty() { String::new() } else { query.clone() });
        assert_eq!(post_json(server.addr, &single, &headers, &json!({"case": what})), (401, UNAUTHORIZED.to_string()), "{what}: POST {single}");
    }
    // What is accepted: lower-case scheme, apikey alone, good bearer beside a bad apikey.
    for (what, headers) in [
        ("lower-case bearer", vec![("authorization", format!("bearer {anon_key}"))]),
        ("apikey alone", vec![("apikey", anon_key.clone())]),
        ("good bearer + bad apikey", vec![("Authorization", bearer(&anon_key)), ("apikey", bad_signature.clone())]),
    ] {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        assert_eq!(post_json(server.addr, BATCH_PATHS[0], &headers, &one_message("open", "accepted", json!({"case": what}), false)).0, 202, "{what}");
    }
    assert_eq!(post_with_key(server.addr, BATCH_PATHS[0], &anon_key, &one_message("open", "end", json!({}), false)).0, 202);
    let (before, _) = listener.broadcasts_until(TOPIC, "end");
    listener.drain(SETTLE);
    let events: Vec<&str> = before.iter().map(|m| m.user_event()).collect();
    assert_eq!(events, ["accepted", "accepted", "accepted"], "{}", listener.dump());
    listener.assert_no_broadcast(TOPIC, "after the sentinel");
}

#[test]
fn cors_preflight_is_answered_on_both_batch_paths() {
    let server = Server::start(&[]);
    for path in BATCH_PATHS.iter().copied().chain(["/api/broadcast/room/events/e"]) {
        let answer = raw_http(server.addr, "OPTIONS", path, false, &[
            ("Origin", "http://example.test"),
            ("Access-Control-Request-Method", "POST"),
            ("Access-Control-Request-Headers", "authorization, apikey, content-type, x-client-info"),
        ]);
        assert!((200..300).contains(&answer.status), "OPTIONS {path}: {answer:?}");
        assert_eq!(answer.header("access-control-allow-origin"), Some("*"), "OPTIONS {path}: {answer:?}");
        let methods = answer.header("access-control-allow-methods").unwrap_or_default().to_ascii_lowercase();
        assert!(methods.contains("post"), "OPTIONS {path}: {answer:?}");
        let allowed = answer.header("access-control-allow-headers").unwrap_or_default().to_ascii_lowercase();
        for header in ["authorization", "apikey", "content-type", "x-client-info"] {
            assert!(allowed.contains(header), "OPTIONS {path}: {header} not allowed: {answer:?}");
        }
    }
}

#[test]
fn oversized_bodies_get_413_and_oversized_payloads_422() {
    // Default payload limit (3,000,000 bytes): the 5,000,000-byte body limit applies.
    let server = Server::start(&[]);
    const TOPIC: &str = "realtime:big";
    let mut listener = Conn::open(&server, anon(), Vsn::V1, "listener");
    listener.join_ok(TOPIC, config(false, false, false), None);
    let key = service();
    let headers = [("Content-Type", "application/json"), ("apikey", key.as_str())];
    for path in [BATCH_PATHS[0], BATCH_PATHS[1], "/api/broadcast/big/events/huge"] {
        // Announced only (the server must not wait for the body), then actually sent.
        let (status, _) = post_announcing(server.addr, path, &headers, 5_000_001, 0);
        assert_eq!(status, 413, "POST {path} announcing 5,000,001 bytes");
        let (status, _) = post_announcing(server.addr, path, &headers, 5_000_001, 5_000_001);
        assert_eq!(status, 413, "POST {path} sending 5,000,001 bytes");
    }
    // A body of exactly 5,000,000 bytes is read: two 2.4 MB payloads, padded with spaces.
    let blob = "x".repeat(2_400_000);
    let mut body = json!({"messages": [
        {"topic": "big", "event": "large-1", "payload": {"blob": blob}},
        {"topic": "big", "event": "large-2", "payload": {"blob": blob}}
    ]})
    .to_string();
    body.push_str(&" ".repeat(5_000_000 - body.len()));
    let (status, answer) = support::http_request(server.addr, "POST", BATCH_PATHS[0], &headers, body.as_bytes()).unwrap();
    assert_eq!((status, String::from_utf8_lossy(&answer).as_ref()), (202, ""), "a 5,000,000-byte body");
    for event in ["large-1", "large-2"] {
        let got = listener.broadcast_msg(TOPIC, event);
        assert_eq!(got.payload["payload"]["blob"].as_str().map(str::len), Some(2_400_000));
    }

    // A small payload limit: 422 with the exact bodies, and an invalid batch sends nothing.
    let small = Server::start(&[("REALTIME_MAX_PAYLOAD_BYTES", "1000")]);
    let mut small_listener = Conn::open(&small, anon(), Vsn::V2, "small-listener");
    small_listener.join_ok(TOPIC, config(false, false, false), None);
    let over = json!({"blob": "y".repeat(3000)});
    let body = json!({"messages": [
        {"topic": "big", "event": "fine", "payload": {"a": 1}},
        {"topic": "big", "event": "too-big", "payload": over}
    ]});
    for path in BATCH_PATHS {
        let (status, answer) = post_with_key(small.addr, path, &key, &body);
        assert_eq!(status, 422, "POST {path}: {answer}");
        assert_eq!(
            serde_json::from_str::<Value>(&answer).unwrap(),
            json!({"errors": {"messages": [{}, {"payload": ["Payload size exceeds tenant limit"]}]}}),
            "POST {path}"
        );
    }
    let (status, answer) = post_with_key(small.addr, "/api/broadcast/big/events/too-big", &key, &over);
    assert_eq!((status, serde_json::from_str::<Value>(&answer).unwrap()), (422, json!({"errors": {"payload": ["Payload size exceeds tenant limit"]}})));
    let (status, _) = post_json(small.addr, "/api/broadcast/big/events/too-big-bin", &[("Content-Type", "application/octet-stream"), ("apikey", key.as_str())], &Value::String("z".repeat(3000)));
    assert_eq!(status, 422, "binary payload over the limit");
    // Within the limit: delivered. Nothing else was.
    assert_eq!(post_with_key(small.addr, BATCH_PATHS[0], &key, &one_message("big", "end", json!({"a": 2}), false)).0, 202);
    let (before, _) = small_listener.broadcasts_until(TOPIC, "end");
    assert!(before.is_empty(), "refused messages were delivered: {before:?}");
    small_listener.drain(SETTLE);
    small_listener.assert_no_broadcast(TOPIC, "after the sentinel");
    listener.drain(SETTLE);
    listener.assert_no_broadcast(TOPIC, "after the large messages");
}

/// Reads until `n` broadcasts on `topic` arrived (or `timeout`); returns their payloads.
fn collect(conn: &mut Conn, topic: &str, n: usize, timeout: Duration) -> Vec<Value> {
    let mut got: Vec<Value> = conn.take_pending(|m| m.is_broadcast_on(topic)).into_iter().map(|m| m.payload).collect();
    let deadline = Instant::now() + timeout;
    while got.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        if let Some(msg) = conn.read(left) {
            if msg.is_broadcast_on(topic) {
                got.push(msg.payload);
            }
        }
    }
    got
}

#[test]
fn ten_thousand_message_batches_are_delivered_and_private_ones_do_not_leak() {
    let (mut db, server) = start_with_acl();
    const TOPIC: &str = "realtime:bulk";
    const N: usize = 10_000;
    grant(&mut db, USER_A, "bulk", false);
    let mut member = Conn::open(&server, &user_token(USER_A), Vsn::V1, "member");
    let mut public = Conn::open(&server, anon(), Vsn::V2, "public");
    member.join_ok(TOPIC, config(true, false, false), None);
    public.join_ok(TOPIC, config(false, false, false), None);

    let batch = |tag: &str| {
        let messages: Vec<Value> = (0..N)
            .map(|i| json!({"topic": "bulk", "event": tag, "payload": {"i": i}, "private": i % 2 == 1}))
            .collect();
        json!({ "messages": messages })
    };
    // The service key: every public message to the public subscriber, every private one to the
    // member, each in order.
    let started = Instant::now();
    let (status, answer) = post_with_key(server.addr, BATCH_PATHS[1], &service(), &batch("svc"));
    assert_eq!((status, answer.as_str()), (202, ""), "10,000-message batch");
    let to_public = collect(&mut public, TOPIC, N / 2, Duration::from_secs(30));
    let to_member = collect(&mut member, TOPIC, N / 2, Duration::from_secs(30));
    eprintln!("[rest_broadcast] 10,000 messages delivered in {:?}", started.elapsed());
    let indices = |got: &[Value]| got.iter().map(|p| p["payload"]["i"].as_u64().unwrap() as usize).collect::<Vec<_>>();
    assert_eq!(to_public.len(), N / 2, "public messages received");
    assert_eq!(indices(&to_public), (0..N).step_by(2).collect::<Vec<_>>(), "public messages, in order");
    assert_eq!(to_member.len(), N / 2, "private messages received");
    assert_eq!(indices(&to_member), (1..N).step_by(2).collect::<Vec<_>>(), "private messages, in order");

    // The anon key: the 5,000 public ones again, none of the private ones.
    let (status, _) = post_with_key(server.addr, BATCH_PATHS[0], anon(), &batch("anon"));
    assert_eq!(status, 202);
    let to_public = collect(&mut public, TOPIC, N / 2, Duration::from_secs(30));
    assert_eq!(indices(&to_public), (0..N).step_by(2).collect::<Vec<_>>(), "anon's public messages, in order");
    assert!(to_public.iter().all(|p| p["event"] == "anon"));
    assert_eq!(post_with_key(server.addr, BATCH_PATHS[0], &service(), &one_message("bulk", "end", json!({}), true)).0, 202);
    let (before, _) = member.broadcasts_until(TOPIC, "end");
    assert!(before.is_empty(), "{} of anon's private messages reached the member, e.g. {}", before.len(), before[0].raw);
    for conn in [&mut member, &mut public] {
        conn.drain(SETTLE);
        conn.assert_no_broadcast(TOPIC, "after the batches");
    }
}
