//! The channel state machine, driven without sockets: a harness holds several sessions on one
//! shard and pumps shard messages synchronously.

use super::*;
use crate::fanout;
use engine::changes::Command as PgCommand;
use serde_json::{json, Value};

const SECRET: &[u8] = b"secret";
const NOW: i64 = 1_800_000_000;

fn token(role: &str, exp_in: i64) -> String {
    let claims = json!({"role": role, "exp": NOW + exp_in});
    auth::sign_hs256(SECRET, claims.as_object().unwrap())
}

struct Harness {
    state: ShardState,
    sessions: Vec<Session>,
    written: Vec<Vec<Bytes>>,
    delayed: Vec<Vec<Bytes>>,
    closed: Vec<Option<CloseReason>>,
    limits: Limits,
    keys: KeyStore,
    /// Milliseconds added to the fixed clock (presence rate windows).
    clock_ms: i64,
    /// Whether a database is configured.
    database: bool,
    /// The tenant's presence rate is exceeded.
    presence_rate_exceeded: bool,
    /// Commands sent to the Postgres core.
    pg: Vec<PgCommand>,
    /// The tenant's gates.
    tenant: TenantGate,
    /// Joins counted toward the tenant's rate, and a close after the delayed frames.
    joins_counted: u64,
    close_after_delayed: Vec<Option<CloseReason>>,
    /// The shard's verified tokens.
    credentials: crate::session::Credentials,
}

impl Harness {
    fn new() -> Harness {
        Harness {
            state: ShardState::new(ShardId(0), 1),
            sessions: Vec::new(),
            written: Vec::new(),
            delayed: Vec::new(),
            closed: Vec::new(),
            limits: Limits::default(),
            keys: KeyStore::new(SECRET.to_vec()),
            clock_ms: 0,
            database: false,
            presence_rate_exceeded: false,
            pg: Vec::new(),
            tenant: TenantGate::default(),
            joins_counted: 0,
            close_after_delayed: Vec::new(),
            credentials: crate::session::Credentials::default(),
        }
    }

    fn connect(&mut self, format: Format) -> usize {
        let index = self.sessions.len();
        self.sessions.push(Session::new(format, ShardId(0), ConnId(index as u64), self.credentials.verify(&self.keys, &token("anon", 3600), NOW).expect("a valid token")));
        self.written.push(Vec::new());
        self.delayed.push(Vec::new());
        self.closed.push(None);
        self.close_after_delayed.push(None);
        index
    }

    fn ctx(&self) -> (Limits, KeyStore) {
        (self.limits.clone(), self.keys.clone())
    }

    fn text(&mut self, conn: usize, frame: &str) {
        let (limits, keys) = self.ctx();
        let ctx = Context { limits: &limits, keys: &keys, database: self.database, now_secs: NOW, now_ms: NOW * 1000 + self.clock_ms, presence_rate_exceeded: self.presence_rate_exceeded, tenant: self.tenant, credentials: &self.credentials };
        let mut fx = Effects::default();
        self.sessions[conn].on_text(&mut self.state, ctx, frame.as_bytes(), &mut fx);
        self.apply(conn, fx);
    }

    fn binary(&mut self, conn: usize, bytes: &[u8]) {
        let (limits, keys) = self.ctx();
        let ctx = Context { limits: &limits, keys: &keys, database: self.database, now_secs: NOW, now_ms: NOW * 1000 + self.clock_ms, presence_rate_exceeded: self.presence_rate_exceeded, tenant: self.tenant, credentials: &self.credentials };
        let mut fx = Effects::default();
        self.sessions[conn].on_binary(&mut self.state, ctx, bytes, &mut fx);
        self.apply(conn, fx);
    }

    fn apply(&mut self, conn: usize, fx: Effects) {
        self.pg.extend(fx.pg);
        self.written[conn].extend(fx.frames);
        self.delayed[conn].extend(fx.delayed);
        if fx.close.is_some() {
            self.closed[conn] = fx.close;
        }
        self.joins_counted += fx.joins_counted;
        if fx.close_after_delayed.is_some() {
            self.close_after_delayed[conn] = fx.close_after_delayed;
        }
        let mut queue: std::collections::VecDeque<_> = fx.shard.into();
        while let Some((_, msg)) = queue.pop_front() {
            let mut out = Vec::new();
            match self.state.handle(msg, &mut out) {
                Some(engine::shard::LocalEffect::JoinAcked { topic, subscriber, presence }) => {
                    let target = subscriber.conn.0 as usize;
                    let mut fx = Effects::default();
                    self.sessions[target].on_join_ack(&mut self.state, &topic, subscriber.channel, presence, self.presence_rate_exceeded, &mut fx);
                    self.written[target].extend(fx.frames);
                }
                Some(engine::shard::LocalEffect::Deliver { topic, message }) => {
                    let subs = self.state.local_subscribers(&topic).to_vec();
                    let written = &mut self.written;
                    fanout::deliver(ShardId(0), &subs, &topic, &message, |c, _, bytes| {
                        written[c.0 as usize].push(bytes.clone());
                        true
                    });
                }
                Some(engine::shard::LocalEffect::SchedulePresenceFlush { .. }) | None => {}
            }
            queue.extend(out);
        }
    }

    /// Frames written to `conn` since the last call, as JSON (binary frames as `{"binary": [...]}`).
    fn take(&mut self, conn: usize) -> Vec<Value> {
        self.written[conn].drain(..).map(|f| decode_server_frame(&f)).collect()
    }

    fn take_delayed(&mut self, conn: usize) -> Vec<Value> {
        self.delayed[conn].drain(..).map(|f| decode_server_frame(&f)).collect()
    }
}

fn decode_server_frame(frame: &[u8]) -> Value {
    let payload = match frame[1] & 0x7F {
        126 => &frame[4..],
        127 => &frame[10..],
        _ => &frame[2..],
    };
    if frame[0] & 0x0F == 0x2 {
        json!({"binary": payload})
    } else {
        serde_json::from_slice(payload).unwrap()
    }
}

fn v2_join(topic: &str, config: Value) -> String {
    json!(["1", "1", topic, "phx_join", {"config": config}]).to_string()
}

#[test]
fn heartbeat_is_answered_in_both_formats() {
    let mut h = Harness::new();
    let v2 = h.connect(Format::V2);
    let v1 = h.connect(Format::V1);
    h.text(v2, r#"[null,"7","phoenix","heartbeat",{}]"#);
    h.text(v1, r#"{"topic":"phoenix","event":"heartbeat","payload":{},"ref":null}"#);
    assert_eq!(h.take(v2), vec![json!([null, "7", "phoenix", "phx_reply", {"status": "ok", "response": {}}])]);
    assert_eq!(h.take(v1), vec![json!({"topic": "phoenix", "event": "phx_reply", "payload": {"status": "ok", "response": {}}, "ref": null})]);
}

#[test]
fn join_broadcast_and_leave() {
    let mut h = Harness::new();
    let a = h.connect(Format::V2);
    let b = h.connect(Format::V1);
    h.text(a, &v2_join("realtime:room1", json!({"broadcast": {"ack": true, "self": false}})));
    assert_eq!(h.take(a), vec![json!(["1", "1", "realtime:room1", "phx_reply", {"status": "ok", "response": {"postgres_changes": []}}])]);
    // V1 client joins the same channel without the prefix (product docs style, no join_ref).
    h.text(b, r#"{"topic":"room1","event":"phx_join","payload":{"config":{"broadcast":{"self":true}}},"ref":"1"}"#);
    assert_eq!(h.take(b), vec![json!({"topic": "room1", "event": "phx_reply", "payload": {"status": "ok", "response": {"postgres_changes": []}}, "ref": "1"})]);

    h.text(a, r#"["1","5","realtime:room1","broadcast",{"type":"broadcast","event":"cursor","payload":{"x":1}}]"#);
    assert_eq!(h.take(a), vec![json!(["1", "5", "realtime:room1", "phx_reply", {"status": "ok", "response": {}}])]);
    assert_eq!(h.take(b), vec![json!({"topic": "room1", "event": "broadcast", "payload": {"type": "broadcast", "event": "cursor", "payload": {"x": 1}}, "ref": null})]);

    // b has self: true and receives its own message; a receives it as a V2 array.
    h.text(b, r#"{"topic":"room1","event":"broadcast","payload":{"type":"broadcast","event":"e","payload":2},"ref":"2"}"#);
    assert_eq!(h.take(b), vec![json!({"topic": "room1", "event": "broadcast", "payload": {"type": "broadcast", "event": "e", "payload": 2}, "ref": null})]);
    assert_eq!(h.take(a), vec![json!([null, null, "realtime:room1", "broadcast", {"type": "broadcast", "event": "e", "payload": 2}])]);

    h.text(a, r#"["1","12","realtime:room1","phx_leave",{}]"#);
    assert_eq!(
        h.take(a),
        vec![
            json!(["1", "12", "realtime:room1", "phx_reply", {"status": "ok", "response": {}}]),
            json!(["1", "1", "realtime:room1", "phx_close", {}]),
        ]
    );
    h.text(b, r#"{"topic":"room1","event":"broadcast","payload":{},"ref":"3"}"#);
    assert!(h.take(a).is_empty(), "a left and must not receive");
}

#[test]
fn binary_broadcast_reaches_v1_as_json_and_v2_as_kind_4() {
    let mut h = Harness::new();
    let sender = h.connect(Format::V2);
    let v2 = h.connect(Format::V2);
    let v1 = h.connect(Format::V1);
    h.text(sender, &v2_join("realtime:room1", json!({"broadcast": {"self": true}})));
    h.text(v2, &v2_join("realtime:room1", json!({})));
    h.text(v1, r#"{"topic":"realtime:room1","event":"phx_join","payload":{"config":{}},"ref":"1","join_ref":"1"}"#);
    for conn in [sender, v2, v1] {
        h.take(conn);
    }
    let push = frame::encode_user_broadcast_push("1", "5", "realtime:room1", "cursor", true, br#"{"x":1,"y":2}"#);
    h.binary(sender, &push);
    let mut expected = vec![4u8, 14, 6, 0, 1];
    expected.extend_from_slice(b"realtime:room1cursor{\"x\":1,\"y\":2}");
    assert_eq!(h.take(sender), vec![json!({"binary": expected.clone()})]);
    assert_eq!(h.take(v2), vec![json!({"binary": expected})]);
    assert_eq!(
        h.take(v1),
        vec![json!({"topic": "realtime:room1", "event": "broadcast", "payload": {"type": "broadcast", "event": "cursor", "payload": {"x": 1, "y": 2}}, "ref": null})]
    );
    // Raw binary payloads never reach V1.
    let push = frame::encode_user_broadcast_push("1", "6", "realtime:room1", "bin", false, &[0, 159, 146, 150]);
    h.binary(sender, &push);
    assert_eq!(h.take(v2).len(), 1);
    assert!(h.take(v1).is_empty());
}

#[test]
fn unmatched_topics_and_leave_of_unjoined() {
    let mut h = Harness::new();
    let a = h.connect(Format::V2);
    h.text(a, r#"["4","4","realtime:nope","broadcast",{}]"#);
    h.text(a, r#"["4","5","realtime:nope","phx_leave",{}]"#);
    assert_eq!(
        h.take(a),
        vec![
            json!([null, "4", "realtime:nope", "phx_reply", {"status": "error", "response": {"reason": "unmatched topic"}}]),
            json!(["4", "5", "realtime:nope", "phx_reply", {"status": "ok", "response": {}}]),
        ]
    );
}

#[test]
fn join_errors_are_delayed_and_exact() {
    let mut h = Harness::new();
    let a = h.connect(Format::V2);
    h.text(a, &v2_join("realtime:", json!({})));
    let expired = json!(["1", "2", "realtime:x", "phx_join", {"config": {}, "access_token": token("authenticated", -30)}]).to_string();
    h.text(a, &expired);
    h.text(a, r#"["1","3","realtime:y","phx_join",{"config":{},"access_token":"garbage"}]"#);
    h.text(a, r#"["1","4","realtime:z","phx_join",{"config":{"private":true}}]"#);
    h.text(a, r#"["1","5","realtime:w","phx_join",[1]]"#);
    assert!(h.take(a).is_empty(), "errors wait for the join error delay");
    let reasons: Vec<_> = h.take_delayed(a).into_iter().map(|f| f[4]["response"]["reason"].clone()).collect();
    assert_eq!(
        reasons,
        vec![
            json!("TopicNameRequired: You must provide a topic name"),
            json!("InvalidJWTToken: Token has expired 30 seconds ago"),
            json!("MalformedJWT: The token provided is not a valid JWT"),
            json!("UnableToConnectToProject: Realtime was unable to connect to the project database"),
            json!("Unknown Error on Channel"),
        ]
    );
}

#[test]
fn topics_longer_than_the_limit_are_refused() {
    let mut h = Harness::new();
    let a = h.connect(Format::V2);
    let at_limit = format!("realtime:{}", "t".repeat(255 - "realtime:".len()));
    let over_limit = format!("{at_limit}u");
    let bare_over_limit = "x".repeat(256);
    h.text(a, &v2_join(&at_limit, json!({})));
    h.text(a, &v2_join(&over_limit, json!({})));
    h.text(a, &v2_join(&bare_over_limit, json!({})));
    let ok = h.take(a);
    assert_eq!(ok.len(), 1, "only the topic at the limit joins");
    assert_eq!(ok[0][2], json!(at_limit));
    assert_eq!(ok[0][4]["status"], json!("ok"));
    let refused = h.take_delayed(a);
    assert_eq!(refused.len(), 2);
    for (frame, topic) in refused.iter().zip([&over_limit, &bare_over_limit]) {
        assert_eq!(frame[2], json!(topic));
        assert_eq!(frame[4]["response"]["reason"], json!("TopicNameTooLong: Topic name must be at most 255 bytes"));
    }
}

#[test]
fn bindings_per_join_are_bounded() {
    let mut h = Harness::new();
    h.database = true;
    let a = h.connect(Format::V2);
    let bindings = |n: usize| (0..n).map(|i| json!({"event": "*", "schema": "public", "table": format!("t{i}")})).collect::<Vec<_>>();
    let max = engine::limits::BINDINGS_PER_JOIN_MAX;
    h.text(a, &v2_join("realtime:over", json!({"postgres_changes": bindings(max + 1)})));
    assert_eq!(
        h.take_delayed(a),
        vec![json!(["1", "1", "realtime:over", "phx_reply", {"status": "error", "response": {"reason": format!("PostgresChangesBindingsLimit: Too many postgres_changes bindings, at most {max} per channel")}}])]
    );
    assert!(h.pg.is_empty(), "nothing reaches the changes core");
    assert_eq!(h.sessions[a].channel_count(), 0);
    h.text(a, &v2_join("realtime:at", json!({"postgres_changes": bindings(max)})));
    let reply = &h.take(a)[0];
    assert_eq!((reply[4]["status"].as_str(), reply[4]["response"]["postgres_changes"].as_array().map(Vec::len)), (Some("ok"), Some(max)));
}

#[test]
fn channel_limit_and_duplicate_join() {
    let mut h = Harness::new();
    h.limits.channels_per_client_max = 2;
    let a = h.connect(Format::V2);
    h.text(a, &v2_join("realtime:a", json!({})));
    h.text(a, &v2_join("realtime:b", json!({})));
    h.text(a, &v2_join("realtime:c", json!({})));
    assert_eq!(h.take(a).len(), 2);
    assert_eq!(h.take_delayed(a)[0][4]["response"]["reason"], json!("ChannelRateLimitReached: Too many channels"));
    // Re-join of `a` with a new join_ref closes the old channel first.
    h.text(a, r#"["9","9","realtime:a","phx_join",{"config":{}}]"#);
    assert_eq!(
        h.take(a),
        vec![
            json!(["1", "1", "realtime:a", "phx_close", {}]),
            json!(["9", "9", "realtime:a", "phx_reply", {"status": "ok", "response": {"postgres_changes": []}}]),
        ]
    );
    assert_eq!(h.sessions[a].channel_count(), 2);
}

#[test]
fn oversized_broadcast_with_ack_is_refused() {
    let mut h = Harness::new();
    h.limits.payload_bytes_max = 100;
    let a = h.connect(Format::V2);
    let b = h.connect(Format::V2);
    h.text(a, &v2_join("realtime:r", json!({"broadcast": {"ack": true}})));
    h.text(b, &v2_join("realtime:r", json!({})));
    h.take(a);
    h.take(b);
    let big = "x".repeat(1000);
    h.text(a, &json!(["1", "2", "realtime:r", "broadcast", {"type": "broadcast", "event": "e", "payload": big}]).to_string());
    assert_eq!(h.take(a), vec![json!(["1", "2", "realtime:r", "phx_reply", {"status": "error", "response": "payload_size_exceeded"}])]);
    assert!(h.take(b).is_empty());
}

#[test]
fn access_token_refresh() {
    let mut h = Harness::new();
    let a = h.connect(Format::V2);
    h.text(a, &v2_join("realtime:r", json!({})));
    h.take(a);
    // A valid refresh: no reply.
    h.text(a, &json!(["1", "3", "realtime:r", "access_token", {"access_token": token("authenticated", 600)}]).to_string());
    assert!(h.take(a).is_empty());
    // An expired one closes the channel with a system message.
    h.text(a, &json!(["1", "4", "realtime:r", "access_token", {"access_token": token("authenticated", -5)}]).to_string());
    assert_eq!(
        h.take(a),
        vec![
            json!(["1", null, "realtime:r", "system", {"extension": "system", "status": "error", "message": "Token has expired 5 seconds ago", "channel": "r"}]),
            json!(["1", "1", "realtime:r", "phx_close", {}]),
        ]
    );
    assert_eq!(h.sessions[a].channel_count(), 0);
}

#[test]
fn close_unsubscribes_everything() {
    let mut h = Harness::new();
    let a = h.connect(Format::V2);
    for i in 0..10 {
        h.text(a, &v2_join(&format!("realtime:t{i}"), json!({})));
    }
    assert_eq!(h.state.local_topics(), 10);
    let mut fx = Effects::default();
    h.sessions[a].on_close(&mut h.state, &mut fx);
    h.apply(a, fx);
    assert_eq!(h.state.local_topics(), 0);
    assert_eq!(h.state.owned_topics(), 0);
}

#[test]
fn malformed_frames_are_dropped_silently() {
    let mut h = Harness::new();
    let a = h.connect(Format::V2);
    for frame in ["", "garbage", "{}", "[1,2]", r#"["1","1","t","e"]"#, "\u{0}"] {
        h.text(a, frame);
    }
    h.binary(a, &[9, 9, 9]);
    assert!(h.take(a).is_empty());
    assert!(h.take_delayed(a).is_empty());
}

fn presence_join(h: &mut Harness, conn: usize, key: &str) {
    let config = json!({"presence": {"enabled": true, "key": key}});
    h.text(conn, &json!(["1", "1", "realtime:doc", "phx_join", {"config": config}]).to_string());
}

fn metas(value: &Value, key: &str) -> Vec<Value> {
    value[key]["metas"].as_array().cloned().unwrap_or_default()
}

#[test]
fn presence_state_track_diff_and_leave() {
    let mut h = Harness::new();
    let a = h.connect(Format::V2);
    let b = h.connect(Format::V1);
    presence_join(&mut h, a, "ann");
    let frames = h.take(a);
    assert_eq!(frames[1], json!(["1", null, "realtime:doc", "presence_state", {}]));

    h.text(a, r#"["1","2","realtime:doc","presence",{"type":"presence","event":"track","payload":{"name":"Ann","phx_ref":"spoof"}}]"#);
    let frames = h.take(a);
    assert_eq!(frames[0], json!(["1", "2", "realtime:doc", "phx_reply", {"status": "ok", "response": {}}]));
    // The diff reaches the sender too (PROTOCOL.md §4.4), as a fan-out frame.
    assert_eq!(frames[1][0], Value::Null);
    assert_eq!(frames[1][3], json!("presence_diff"));
    let joined = metas(&frames[1][4]["joins"], "ann");
    assert_eq!(joined.len(), 1);
    assert_eq!(joined[0]["name"], json!("Ann"));
    assert_ne!(joined[0]["phx_ref"], json!("spoof"), "payload phx_ref is overwritten");

    // b joins (V1, Python style presence frames) and sees ann in presence_state.
    h.text(b, r#"{"topic":"realtime:doc","event":"phx_join","payload":{"config":{"presence":{"enabled":true,"key":"bob"}}},"ref":"1","join_ref":"1"}"#);
    let frames = h.take(b);
    assert_eq!(frames[1]["event"], json!("presence_state"));
    assert_eq!(metas(&frames[1]["payload"], "ann")[0]["name"], json!("Ann"));

    // Identical re-track: ok, no diff. Different payload: diff with phx_ref_prev.
    h.text(a, r#"["1","3","realtime:doc","presence",{"event":"track","payload":{"name":"Ann"}}]"#);
    assert_eq!(h.take(a).len(), 1);
    assert!(h.take(b).is_empty());
    h.text(a, r#"["1","4","realtime:doc","presence",{"event":"track","payload":{"name":"Ann B."}}]"#);
    h.take(a);
    let diff = &h.take(b)[0]["payload"];
    assert_eq!(metas(&diff["joins"], "ann")[0]["phx_ref_prev"], joined[0]["phx_ref"]);
    assert_eq!(metas(&diff["leaves"], "ann")[0]["name"], json!("Ann"));

    // a leaves: b sees the leave.
    h.text(a, r#"["1","5","realtime:doc","phx_leave",{}]"#);
    let diff = &h.take(b)[0]["payload"];
    assert_eq!(metas(&diff["leaves"], "ann")[0]["name"], json!("Ann B."));
    assert_eq!(diff["joins"], json!({}));
}

#[test]
fn presence_replies_and_docs_frames() {
    let mut h = Harness::new();
    let a = h.connect(Format::V1);
    let b = h.connect(Format::V1);
    h.text(a, r#"{"topic":"presence:doc-1","event":"phx_join","payload":{"config":{"presence":{"key":"u1"}}},"ref":"1"}"#);
    h.text(b, r#"{"topic":"presence:doc-1","event":"phx_join","payload":{"config":{"presence":{"key":"u2"}}},"ref":"1"}"#);
    h.take(a);
    h.take(b);
    // The product docs' frame tracks...
    h.text(a, r#"{"topic":"presence:doc-1","event":"presence_diff","payload":{"action":"track","data":{"user_id":"u1"}},"ref":"2"}"#);
    assert_eq!(h.take(a)[0]["payload"], json!({"status": "ok", "response": {}}));
    let diff = h.take(b);
    assert_eq!(diff[0]["event"], json!("presence_diff"));
    assert_eq!(metas(&diff[0]["payload"]["joins"], "u1")[0]["user_id"], json!("u1"));
    // ...and untracks.
    h.text(a, r#"{"topic":"presence:doc-1","event":"presence_diff","payload":{"action":"untrack"},"ref":"3"}"#);
    h.take(a);
    assert_eq!(metas(&h.take(b)[0]["payload"]["leaves"], "u1").len(), 1);
    // Reply table of §4.3.
    h.text(a, r#"{"topic":"presence:doc-1","event":"presence","payload":{"type":"presence"},"ref":"4"}"#);
    h.text(a, r#"{"topic":"presence:doc-1","event":"presence","payload":{"event":"track","payload":[1]},"ref":"5"}"#);
    h.text(a, r#"{"topic":"presence:doc-1","event":"presence","payload":{"event":"wave"},"ref":"6"}"#);
    let replies: Vec<_> = h.take(a).into_iter().map(|f| f["payload"].clone()).collect();
    assert_eq!(
        replies,
        vec![
            json!({"status": "ok", "response": {}}),
            json!({"status": "error", "response": {"reason": "Presence track payload must be a map"}}),
            json!({"status": "error", "response": {}}),
        ]
    );
}

#[test]
fn presence_rate_limit_closes_the_channel() {
    let mut h = Harness::new();
    let a = h.connect(Format::V2);
    presence_join(&mut h, a, "k");
    h.take(a);
    for i in 0..5 {
        h.text(a, &json!(["1", format!("r{i}"), "realtime:doc", "presence", {"event": "track", "payload": {"i": i}}]).to_string());
    }
    h.take(a);
    h.text(a, r#"["1","r6","realtime:doc","presence",{"event":"untrack"}]"#);
    let frames = h.take(a);
    assert_eq!(frames[0][4]["message"], json!("Client presence rate limit exceeded"));
    assert_eq!(frames[1], json!(["1", "1", "realtime:doc", "phx_close", {}]));
    // After 30 s the window reopens (on a new join).
    h.clock_ms += 30_000;
    presence_join(&mut h, a, "k");
    h.take(a);
    h.text(a, r#"["1","x","realtime:doc","presence",{"event":"track","payload":{}}]"#);
    assert_eq!(h.take(a)[0][4], json!({"status": "ok", "response": {}}));
}

#[test]
fn generated_presence_keys_are_unique_uuids() {
    let mut h = Harness::new();
    let a = h.connect(Format::V2);
    let mut keys = std::collections::BTreeSet::new();
    for i in 0..20 {
        let topic = format!("realtime:p{i}");
        h.text(a, &json!(["1", "1", topic, "phx_join", {"config": {"presence": {"key": ""}}}]).to_string());
        h.text(a, &json!(["1", "2", topic, "presence", {"event": "track", "payload": {}}]).to_string());
        let frames = h.take(a);
        let joins = frames.last().unwrap()[4]["joins"].as_object().unwrap().clone();
        let key = joins.keys().next().unwrap().clone();
        assert_eq!(uuid::Uuid::parse_str(&key).unwrap().get_version_num(), 1);
        keys.insert(key);
    }
    assert_eq!(keys.len(), 20);
}

#[test]
fn channel_tokens_expire_while_connected() {
    let mut h = Harness::new();
    let a = h.connect(Format::V2);
    let short = token("authenticated", 5);
    h.text(a, &json!(["1", "1", "realtime:r", "phx_join", {"config": {}, "access_token": short}]).to_string());
    h.text(a, &v2_join("realtime:long", json!({})));
    h.take(a);
    assert_eq!(h.sessions[a].next_expiry(), Some(NOW + 5));
    let mut fx = Effects::default();
    h.sessions[a].expire_channels(&mut h.state, NOW + 4, &mut fx);
    h.apply(a, fx);
    assert!(h.take(a).is_empty(), "not expired yet");
    let mut fx = Effects::default();
    h.sessions[a].expire_channels(&mut h.state, NOW + 7, &mut fx);
    h.apply(a, fx);
    assert_eq!(
        h.take(a),
        vec![
            json!(["1", null, "realtime:r", "system", {"extension": "system", "status": "error", "message": "Token has expired 2 seconds ago", "channel": "r"}]),
            json!(["1", "1", "realtime:r", "phx_close", {}]),
        ]
    );
    assert_eq!(h.sessions[a].channel_count(), 1, "the other channel and the socket stay");
}

/// Answers the pending policy check of `conn` (the core's role in these tests).
fn answer(h: &mut Harness, conn: usize, broadcast: bool, presence: bool) -> engine::changes::CheckKind {
    let index = h.pg.iter().position(|c| matches!(c, PgCommand::Authorize { reply: engine::changes::AuthzReply::Channel(k), .. } if k.conn.0 as usize == conn)).expect("a check was requested");
    let PgCommand::Authorize { request, reply: engine::changes::AuthzReply::Channel(key) } = h.pg.remove(index) else { unreachable!() };
    let (limits, keys) = h.ctx();
    let ctx = Context { limits: &limits, keys: &keys, database: true, now_secs: NOW, now_ms: NOW * 1000, presence_rate_exceeded: false, tenant: TenantGate::default(), credentials: &h.credentials };
    let mut fx = Effects::default();
    let result = engine::changes::AuthzResult { broadcast, presence, error: None };
    h.sessions[conn].on_authorized(&mut h.state, ctx, key.channel, request.kind, result, &mut fx);
    h.apply(conn, fx);
    request.kind
}

#[test]
fn private_join_waits_for_the_read_check() {
    let mut h = Harness::new();
    h.database = true;
    let a = h.connect(Format::V2);
    h.text(a, &v2_join("realtime:secret", json!({"private": true})));
    assert!(h.take(a).is_empty(), "no reply before the check");
    assert_eq!(answer(&mut h, a, false, false), engine::changes::CheckKind::Read);
    assert_eq!(
        h.take_delayed(a)[0][4]["response"]["reason"],
        json!("Unauthorized: You do not have permissions to read from this Channel topic: secret")
    );
    assert_eq!(h.sessions[a].channel_count(), 0);
    h.text(a, &v2_join("realtime:secret", json!({"private": true})));
    answer(&mut h, a, true, false);
    assert_eq!(h.take(a)[0][4], json!({"status": "ok", "response": {"postgres_changes": []}}));
}

#[test]
fn a_private_join_without_a_policy_answer_fails_at_its_deadline() {
    let mut h = Harness::new();
    h.database = true;
    let a = h.connect(Format::V2);
    h.text(a, &v2_join("realtime:secret", json!({"private": true})));
    let deadline = NOW + engine::limits::AUTHORIZE_TIMEOUT_SECS;
    assert_eq!(h.sessions[a].next_expiry(), Some(deadline), "the driver's timer looks at this session");
    let mut fx = Effects::default();
    h.sessions[a].expire_channels(&mut h.state, deadline - 1, &mut fx);
    h.apply(a, fx);
    assert!(h.take(a).is_empty() && h.take_delayed(a).is_empty(), "still waiting");
    let mut fx = Effects::default();
    h.sessions[a].expire_channels(&mut h.state, deadline, &mut fx);
    h.apply(a, fx);
    assert_eq!(
        h.take_delayed(a),
        vec![json!(["1", "1", "realtime:secret", "phx_reply", {"status": "error", "response": {"reason": "UnableToConnectToProject: Realtime was unable to connect to the project database"}}])]
    );
    assert_eq!(h.sessions[a].channel_count(), 0, "the channel slot is free");
    // The answer arrives late: nothing happens.
    answer(&mut h, a, true, true);
    assert!(h.take(a).is_empty() && h.take_delayed(a).is_empty());
    assert_eq!(h.sessions[a].channel_count(), 0);
}

#[test]
fn private_writes_are_checked_once_and_denied_silently() {
    let mut h = Harness::new();
    h.database = true;
    let a = h.connect(Format::V2);
    let b = h.connect(Format::V2);
    let public = h.connect(Format::V2);
    for conn in [a, b] {
        h.text(conn, &v2_join("realtime:room", json!({"private": true, "broadcast": {"ack": true}})));
        answer(&mut h, conn, true, true);
        h.take(conn);
    }
    h.text(public, &v2_join("realtime:room", json!({})));
    h.take(public);
    // First send: queued behind a write check; granted → delivered and acked.
    h.text(a, r#"["1","2","realtime:room","broadcast",{"type":"broadcast","event":"e","payload":1}]"#);
    h.text(a, r#"["1","3","realtime:room","broadcast",{"type":"broadcast","event":"e","payload":2}]"#);
    assert!(h.take(b).is_empty());
    assert_eq!(answer(&mut h, a, true, false), engine::changes::CheckKind::Write);
    assert_eq!(h.take(a).len(), 2, "two acks");
    assert_eq!(h.take(b).len(), 2);
    assert!(h.take(public).is_empty(), "private and public channels of one name never meet");
    // Later sends need no new check.
    h.text(a, r#"["1","4","realtime:room","broadcast",{"type":"broadcast","event":"e","payload":3}]"#);
    assert!(h.pg.is_empty());
    assert_eq!(h.take(b).len(), 1);
    assert_eq!(h.take(a).len(), 1, "its ack");
    // b may not write: dropped, no reply even with ack.
    h.text(b, r#"["1","5","realtime:room","broadcast",{"type":"broadcast","event":"e","payload":4}]"#);
    answer(&mut h, b, false, false);
    assert!(h.take(b).is_empty());
    assert!(h.take(a).is_empty());
    // Track needs presence write: denied → error reply.
    h.text(b, r#"["1","6","realtime:room","presence",{"event":"track","payload":{}}]"#);
    assert_eq!(h.take(b)[0][4], json!({"status": "error", "response": {}}));
}

#[test]
fn refresh_rechecks_reads() {
    let mut h = Harness::new();
    h.database = true;
    let a = h.connect(Format::V2);
    h.text(a, &v2_join("realtime:room", json!({"private": true})));
    answer(&mut h, a, true, false);
    h.take(a);
    h.text(a, &json!(["1", "9", "realtime:room", "access_token", {"access_token": token("authenticated", 600)}]).to_string());
    answer(&mut h, a, false, false);
    let frames = h.take(a);
    assert_eq!(frames[0][4]["message"], json!("You do not have permissions to read from this Channel topic: room"));
    assert_eq!(frames[1][3], json!("phx_close"));
}

#[test]
fn replay_follows_the_join_reply() {
    let mut h = Harness::new();
    h.database = true;
    let a = h.connect(Format::V2);
    h.text(a, &v2_join("realtime:room", json!({"private": true, "broadcast": {"replay": {"since": 1_700_000_000_000i64, "limit": 50}}})));
    answer(&mut h, a, true, false);
    let index = h.pg.iter().position(|c| matches!(c, PgCommand::Replay { .. })).expect("replay requested");
    let PgCommand::Replay { key, topic, since_ms, limit } = h.pg.remove(index) else { unreachable!() };
    assert_eq!((topic.as_str(), since_ms, limit), ("room", 1_700_000_000_000, 25), "limit clamped to 25");
    assert!(h.take(a).is_empty(), "nothing before the reply");
    let messages = vec![
        engine::changes::ReplayedMessage { id: "id-1".into(), event: "e1".into(), payload: Some(r#"{"n":1}"#.into()), binary: None },
        engine::changes::ReplayedMessage { id: "id-2".into(), event: "e2".into(), payload: Some(r#"{"n":2}"#.into()), binary: None },
    ];
    let mut fx = Effects::default();
    h.sessions[a].on_replayed(&mut h.state, key.channel, Ok(messages), &mut fx);
    h.apply(a, fx);
    let frames = h.take(a);
    assert_eq!(frames[0][3], json!("phx_reply"));
    assert_eq!(frames[1], json!(["1", null, "realtime:room", "broadcast", {"type": "broadcast", "event": "e1", "payload": {"n": 1}, "meta": {"replayed": true, "id": "id-1"}}]));
    assert_eq!(frames[2][4]["meta"]["id"], json!("id-2"));
    assert!(h.sessions[a].already_replayed(key.channel, "id-1"));
    assert!(!h.sessions[a].already_replayed(key.channel, "id-3"));
}

#[test]
fn replay_parameters_are_checked() {
    let mut h = Harness::new();
    h.database = true;
    let a = h.connect(Format::V2);
    h.text(a, &v2_join("realtime:pub", json!({"broadcast": {"replay": {"since": 1}}})));
    h.text(a, &v2_join("realtime:priv", json!({"private": true, "broadcast": {"replay": {"limit": 3}}})));
    let reasons: Vec<_> = h.take_delayed(a).into_iter().map(|f| f[4]["response"]["reason"].clone()).collect();
    assert_eq!(reasons, vec![json!("UnableToReplayMessages: Replay is not allowed for public channels"), json!("UnableToReplayMessages: Replay params are not valid")]);
}

#[test]
fn tenant_presence_rate_closes_tracks_and_join_syncs() {
    let mut h = Harness::new();
    let a = h.connect(Format::V2);
    presence_join(&mut h, a, "k");
    h.take(a);
    h.presence_rate_exceeded = true;
    h.text(a, r#"["1","2","realtime:doc","presence",{"event":"track","payload":{}}]"#);
    let frames = h.take(a);
    assert_eq!(frames[0][4]["message"], json!("Too many presence messages per second"));
    assert_eq!(frames[1][3], json!("phx_close"));
    // A join that would get presence_state is closed instead.
    presence_join(&mut h, a, "k");
    let frames = h.take(a);
    assert_eq!(frames[0][3], json!("phx_reply"));
    assert_eq!(frames[1][4]["message"], json!("Too many presence messages per second"));
}

#[test]
fn disconnect_notices_cover_every_joined_channel_and_count_lifecycle() {
    let mut h = Harness::new();
    let a = h.connect(Format::V2);
    h.text(a, &v2_join("realtime:one", json!({})));
    h.text(a, r#"["2","2","two","phx_join",{"config":{}}]"#);
    h.take(a);
    let mut notices: Vec<Value> = h.sessions[a].disconnect_notices().iter().map(|f| decode_server_frame(f)).collect();
    notices.sort_by_key(|n| n[2].as_str().unwrap().to_string());
    assert_eq!(
        notices,
        vec![
            json!(["1", null, "realtime:one", "system", {"extension": "system", "status": "ok", "message": "Server requested disconnect", "channel": "one"}]),
            json!(["2", null, "two", "system", {"extension": "system", "status": "ok", "message": "Server requested disconnect", "channel": "two"}]),
        ]
    );
    // Joins and leaves are reported for metrics; a refused join by its code.
    let (limits, keys) = h.ctx();
    let ctx = Context { limits: &limits, keys: &keys, database: false, now_secs: NOW, now_ms: NOW * 1000, presence_rate_exceeded: false, tenant: TenantGate::default(), credentials: &h.credentials };
    let mut fx = Effects::default();
    h.sessions[a].on_text(&mut h.state, ctx, br#"["3","3","three","phx_join",{"config":{},"access_token":"nope"}]"#, &mut fx);
    assert_eq!(fx.join_errors, vec![Box::<str>::from("MalformedJWT")]);
    let mut fx = Effects::default();
    h.sessions[a].on_close(&mut h.state, &mut fx);
    assert_eq!(fx.left, 2);
}

#[test]
fn tenant_gates_answer_in_upstreams_order_and_count_joins() {
    let reason = |h: &mut Harness, conn: usize| -> String {
        let delayed = h.take_delayed(conn);
        delayed.last().map(|f| f["payload"]["response"]["reason"].as_str().unwrap_or_default().to_string()).unwrap_or_default()
    };
    let join = |topic: &str, private: bool| format!(r#"{{"topic":"{topic}","event":"phx_join","payload":{{"config":{{"private":{private}}}}},"ref":"1","join_ref":"1"}}"#);
    let mut h = Harness::new();
    h.database = true;
    let conn = h.connect(Format::V1);

    h.tenant.private_only = true;
    h.text(conn, &join("realtime:a", false));
    assert_eq!(reason(&mut h, conn), "PrivateOnly: This project only allows private channels");
    assert_eq!(h.joins_counted, 0, "refused before the joins count");

    h.tenant.private_only = false;
    h.tenant.users_full = true;
    h.text(conn, &join("realtime:a", false));
    assert_eq!(reason(&mut h, conn), "ConnectionRateLimitReached: Too many connected users");
    assert_eq!(h.joins_counted, 0);

    h.tenant.users_full = false;
    h.text(conn, &join("realtime:a", false));
    assert!(h.take(conn).iter().any(|f| f["payload"]["status"] == "ok"));
    assert_eq!(h.joins_counted, 1);
    // A socket already counted as a user may join more channels when the tenant is full.
    h.tenant.users_full = true;
    h.text(conn, &join("realtime:b", false));
    assert!(h.take(conn).iter().any(|f| f["payload"]["status"] == "ok"));
    assert_eq!(h.joins_counted, 2);

    h.tenant.joins_exceeded = true;
    h.text(conn, &join("realtime:c", false));
    assert_eq!(reason(&mut h, conn), "ClientJoinRateLimitReached: Too many joins per second");
    assert_eq!(h.joins_counted, 3, "counted even though it failed");
    assert_eq!(h.close_after_delayed[conn], Some(CloseReason::GoingAway));

    let other = h.connect(Format::V1);
    h.tenant = TenantGate { gone: true, ..TenantGate::default() };
    h.text(other, &join("realtime:a", false));
    assert_eq!(reason(&mut h, other), "TenantNotFound: Tenant with the given ID does not exist");
    assert_eq!(h.close_after_delayed[other], Some(CloseReason::GoingAway));
    h.tenant = TenantGate { suspended: true, ..TenantGate::default() };
    h.text(other, &join("realtime:a", false));
    assert_eq!(reason(&mut h, other), "RealtimeDisabledForTenant: Realtime disabled for this tenant");
}

#[test]
fn topics_carry_the_connections_tenant() {
    let mut h = Harness::new();
    let a = h.connect(Format::V1);
    h.tenant.id = engine::TenantId(7);
    h.text(a, r#"{"topic":"realtime:room","event":"phx_join","payload":{},"ref":"1","join_ref":"1"}"#);
    let b = h.connect(Format::V1);
    h.tenant.id = engine::TenantId(8);
    h.text(b, r#"{"topic":"realtime:room","event":"phx_join","payload":{},"ref":"1","join_ref":"1"}"#);
    h.take(a);
    h.take(b);
    h.tenant.id = engine::TenantId(7);
    h.text(a, r#"{"topic":"realtime:room","event":"broadcast","payload":{"event":"e","payload":{}},"ref":"2","join_ref":"1"}"#);
    h.text(a, r#"{"topic":"realtime:room","event":"broadcast","payload":{"event":"e","payload":{}},"ref":"3","join_ref":"1"}"#);
    assert!(h.take(b).is_empty(), "a broadcast in tenant 7 never reaches tenant 8's channel of the same name");
}

/// Found by the panic review of issue 16: the channel serial was `+= 1` on a `u32` (a panic
/// in debug builds after 2^32 joins on one socket; in release a wrap that could hand a live
/// channel's serial to a new one, so database pushes would reach the wrong channel).
#[test]
fn channel_serials_wrap_without_reusing_a_live_one() {
    let mut h = Harness::new();
    let a = h.connect(Format::V2);
    h.sessions[a].next_serial = u32::MAX - 1;
    for room in ["realtime:r1", "realtime:r2", "realtime:r3"] {
        h.text(a, &v2_join(room, json!({"broadcast": {"self": true}})));
    }
    h.sessions[a].next_serial = u32::MAX - 1;
    h.text(a, &v2_join("realtime:r4", json!({"broadcast": {"self": true}})));
    let serial = |h: &Harness, topic: &str| h.sessions[a].channels.get(topic).map(|c| c.serial.0);
    let serials: Vec<_> = ["realtime:r1", "realtime:r2", "realtime:r3", "realtime:r4"].iter().map(|t| serial(&h, t)).collect();
    assert_eq!(serials, vec![Some(u32::MAX - 1), Some(u32::MAX), Some(1), Some(2)], "0 and the live serials are skipped");
    h.take(a);
    // Every channel still gets its own broadcasts.
    for (n, room) in ["realtime:r1", "realtime:r2", "realtime:r3", "realtime:r4"].iter().enumerate() {
        h.text(a, &json!([null, null, room, "broadcast", {"type": "broadcast", "event": "e", "payload": n}]).to_string());
        assert_eq!(h.take(a), vec![json!([null, null, room, "broadcast", {"type": "broadcast", "event": "e", "payload": n}])]);
    }
}
