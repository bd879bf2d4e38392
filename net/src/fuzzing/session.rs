//! The session harness: one [`Session`] on one shard, driven without sockets as the session
//! tests do, fed a sequence of operations decoded from the fuzz input (see [`session`]).

use std::collections::{HashSet, VecDeque};
use std::sync::OnceLock;

use bytes::Bytes;
use serde_json::{json, Value};

use engine::changes::{AuthzReply, AuthzResult, Command as PgCommand};
use engine::limits::Limits;
use engine::{ChannelSerial, ConnId, Format, ShardId, ShardState};

use crate::frame::{self, Event};
use crate::session::{Context, Effects, Session};

const SECRET: &[u8] = b"fuzz-session-secret-0123456789-abcdefghijklmnop";
const NOW: i64 = 1_800_000_000;
const CHANNELS_MAX: usize = 4;

/// anon (1 h), authenticated (2 h), anon expiring 5 s after the start.
fn tokens() -> &'static [String; 3] {
    static TOKENS: OnceLock<[String; 3]> = OnceLock::new();
    TOKENS.get_or_init(|| {
        let sign = |role: &str, exp: i64| auth::sign_hs256(SECRET, json!({"role": role, "exp": exp, "sub": "u"}).as_object().expect("an object"));
        [sign("anon", NOW + 3600), sign("authenticated", NOW + 7200), sign("anon", NOW + 5)]
    })
}

/// A session fed an arbitrary sequence of client frames (PROTOCOL.md §1–§4, §6.3). Byte 0 picks
/// V1 or V2 and whether a database is configured; then each operation is a byte (its low nibble
/// the kind, its high nibble a topic or variant) and, for raw frames, a length byte and that
/// many bytes: joins of eight topics (public, private, presence on or off), leaves, broadcasts
/// (text and binary kind 3, with or without ack), presence track/untrack, heartbeats,
/// `access_token` refreshes (fresh, expired, garbage), raw text and binary frames, policy
/// answers (granted, denied, failed), and the clock moving past token expiry and authorization
/// deadlines.
///
/// Joins may carry a Postgres Changes binding (bit 7 of a join's byte).
///
/// Invariants: no panic; never more channels than the limit (4 here); every Postgres Changes
/// subscription the session asked the core for belongs to a channel it still holds, and none
/// is left once the connection closes; every reply carries the
/// topic and ref of a frame the client sent; no push (broadcast, presence, system) for a topic
/// the client never joined successfully, and no `phx_close` for one it never asked to join;
/// every frame is a valid server frame (JSON text or kind-4 binary).
pub fn session(data: &[u8]) {
    let Some((&mode, ops)) = data.split_first() else {
        return;
    };
    let mut harness = Harness::new(mode);
    let mut ops = ops;
    while let Some((&op, rest)) = ops.split_first() {
        ops = rest;
        let mut fx = Effects::default();
        if !harness.step(op, &mut ops, &mut fx) {
            return;
        }
        let closed = fx.close.is_some();
        harness.pump(fx);
        assert!(harness.session.channel_count() <= CHANNELS_MAX, "{} channels, limit {CHANNELS_MAX}", harness.session.channel_count());
        for serial in &harness.subscribed {
            assert!(harness.session.holds_serial(*serial), "a Postgres Changes subscription for channel {serial:?}, which the session no longer holds");
        }
        if closed {
            break;
        }
    }
    // The connection closes: nothing may stay subscribed in the core.
    let mut fx = Effects::default();
    harness.session.on_close(&mut harness.state, &mut fx);
    harness.pump(fx);
    assert!(harness.subscribed.is_empty(), "subscriptions left after the close: {:?}", harness.subscribed);
}

struct Harness {
    format: Format,
    database: bool,
    limits: Limits,
    keys: auth::KeyStore,
    credentials: crate::session::Credentials,
    state: ShardState,
    session: Session,
    now: i64,
    next_ref: u32,
    /// (topic, ref) of every frame the client sent, and of its joins.
    sent: HashSet<(String, Value)>,
    joins_sent: HashSet<(String, Value)>,
    /// Topics with an ok join reply.
    joined: HashSet<String>,
    /// Policy checks waiting for an answer (bounded).
    pg: VecDeque<PgCommand>,
    /// Channels with a Postgres Changes subscription in the core (Subscribe minus Unsubscribe).
    subscribed: HashSet<ChannelSerial>,
}

impl Harness {
    fn new(mode: u8) -> Harness {
        let format = if mode & 1 == 0 { Format::V1 } else { Format::V2 };
        let keys = auth::KeyStore::new(SECRET.to_vec());
        let credentials = crate::session::Credentials::default();
        let conn_cred = credentials.verify(&keys, &tokens()[0], NOW).expect("the connection token is valid");
        Harness {
            format,
            database: mode & 2 != 0,
            limits: Limits { channels_per_client_max: CHANNELS_MAX as u32, ..Limits::default() },
            keys,
            credentials,
            state: ShardState::new(ShardId(0), 1),
            session: Session::new(format, ShardId(0), ConnId(0), conn_cred),
            now: NOW,
            next_ref: 0,
            sent: HashSet::new(),
            joins_sent: HashSet::new(),
            joined: HashSet::new(),
            pg: VecDeque::new(),
            subscribed: HashSet::new(),
        }
    }

    /// Runs one operation; false when the input ended inside it.
    fn step(&mut self, op: u8, ops: &mut &[u8], fx: &mut Effects) -> bool {
        let topic_index = usize::from(op >> 4) % 8;
        let topic = format!("realtime:t{topic_index}");
        let join_ref = format!("j{topic_index}");
        self.next_ref += 1;
        let r = self.next_ref.to_string();
        let text = |format: Format, event: &str, payload: Value| -> String {
            match format {
                Format::V1 => json!({"topic": topic, "event": event, "payload": payload, "ref": r, "join_ref": join_ref}).to_string(),
                Format::V2 => json!([join_ref, r, topic, event, payload]).to_string(),
            }
        };
        match op & 0x0F {
            0 | 1 => {
                let private = op & 0x10 != 0 && op & 1 != 0;
                let bindings = if op & 0x80 != 0 { json!([{"event": "*", "schema": "public", "table": "items"}]) } else { json!([]) };
                let config = json!({"broadcast": {"self": true, "ack": op & 0x40 != 0}, "presence": {"key": "", "enabled": op & 0x20 != 0}, "postgres_changes": bindings, "private": private});
                self.send_text(text(self.format, "phx_join", json!({ "config": config })), fx);
            }
            2 => self.send_text(text(self.format, "phx_leave", json!({})), fx),
            3 => self.send_text(text(self.format, "broadcast", json!({"type": "broadcast", "event": "e", "payload": {"n": self.next_ref}})), fx),
            4 => {
                let payload = if op & 0x80 == 0 { json!({"type": "presence", "event": "track", "payload": {"n": self.next_ref}}) } else { json!({"type": "presence", "event": "untrack"}) };
                self.send_text(text(self.format, "presence", payload), fx);
            }
            5 => {
                let frame = match self.format {
                    Format::V1 => json!({"topic": "phoenix", "event": "heartbeat", "payload": {}, "ref": r}).to_string(),
                    Format::V2 => json!([null, r, "phoenix", "heartbeat", {}]).to_string(),
                };
                self.send_text(frame, fx);
            }
            6 => {
                let token = match op >> 6 {
                    0 => tokens()[1].clone(),
                    1 => tokens()[2].clone(),
                    2 => "garbage".to_string(),
                    _ => tokens()[0].clone(),
                };
                self.send_text(text(self.format, "access_token", json!({ "access_token": token })), fx);
            }
            7 | 8 => {
                let Some((&len, rest)) = ops.split_first() else { return false };
                let (bytes, rest) = rest.split_at(usize::from(len).min(rest.len()));
                *ops = rest;
                if op & 0x0F == 7 {
                    self.send_text(String::from_utf8_lossy(bytes).into_owned(), fx);
                } else {
                    self.send_binary(bytes, fx);
                }
            }
            9 => {
                let payload = json!({"type": "broadcast", "event": "b", "payload": {"n": self.next_ref}});
                let bytes = frame::encode_user_broadcast_push(&join_ref, &r, &topic, "b", true, payload.to_string().as_bytes());
                self.send_binary(&bytes, fx);
            }
            10 => self.answer_policy_check(op >> 6, fx),
            11 => {
                self.now += i64::from(op >> 4) * 4;
                self.session.expire_channels(&mut self.state, self.now, fx);
            }
            _ => {
                self.pg.pop_front();
            }
        }
        true
    }

    /// Records what the frame asks (topic, ref) when it decodes, then hands it to the session.
    fn send_text(&mut self, frame: String, fx: &mut Effects) {
        if let Ok(decoded) = frame::decode_text(self.format, frame.as_bytes()) {
            let ref_value: Value = match decoded.ref_ {
                frame::Ref::Json(raw) => serde_json::from_str(raw).unwrap_or(Value::Null),
                frame::Ref::Text(t) => Value::String(t.to_string()),
            };
            if matches!(decoded.event, Event::Join) {
                self.joins_sent.insert((decoded.topic.to_string(), ref_value.clone()));
            }
            self.sent.insert((decoded.topic.to_string(), ref_value));
        }
        let ctx = Context { limits: &self.limits, keys: &self.keys, database: self.database, now_secs: self.now, now_ms: self.now * 1000, presence_rate_exceeded: false, tenant: crate::session::TenantGate::default(), credentials: &self.credentials };
        self.session.on_text(&mut self.state, ctx, frame.as_bytes(), fx);
    }

    fn send_binary(&mut self, bytes: &[u8], fx: &mut Effects) {
        if self.format == Format::V2 {
            if let Ok(push) = frame::decode_binary(bytes) {
                self.sent.insert((push.topic.to_string(), Value::String(push.ref_.to_string())));
            }
        }
        let ctx = Context { limits: &self.limits, keys: &self.keys, database: self.database, now_secs: self.now, now_ms: self.now * 1000, presence_rate_exceeded: false, tenant: crate::session::TenantGate::default(), credentials: &self.credentials };
        self.session.on_binary(&mut self.state, ctx, bytes, fx);
    }

    /// Answers the oldest policy check: granted, broadcast only, denied, or failed.
    fn answer_policy_check(&mut self, variant: u8, fx: &mut Effects) {
        let Some(PgCommand::Authorize { request, reply: AuthzReply::Channel(key) }) = self.pg.pop_front() else { return };
        let result = match variant {
            0 => AuthzResult { broadcast: true, presence: true, error: None },
            1 => AuthzResult { broadcast: true, presence: false, error: None },
            2 => AuthzResult { broadcast: false, presence: false, error: None },
            _ => AuthzResult::failed("boom".into()),
        };
        let ctx = Context { limits: &self.limits, keys: &self.keys, database: self.database, now_secs: self.now, now_ms: self.now * 1000, presence_rate_exceeded: false, tenant: crate::session::TenantGate::default(), credentials: &self.credentials };
        self.session.on_authorized(&mut self.state, ctx, key.channel, request.kind, result, fx);
    }

    /// What the core would hold after these commands.
    fn track_subscriptions(&mut self, commands: &[PgCommand]) {
        for command in commands {
            match command {
                PgCommand::Subscribe(subscription) => {
                    self.subscribed.insert(subscription.key.channel);
                }
                PgCommand::Unsubscribe(key) => {
                    self.subscribed.remove(&key.channel);
                }
                _ => {}
            }
        }
    }

    /// Delivers shard messages (join acks, broadcasts) until quiet, then checks every frame the
    /// client got.
    fn pump(&mut self, mut fx: Effects) {
        let mut written: Vec<Bytes> = std::mem::take(&mut fx.frames);
        written.extend(std::mem::take(&mut fx.delayed));
        let commands = std::mem::take(&mut fx.pg);
        self.track_subscriptions(&commands);
        self.pg.extend(commands.into_iter().filter(|c| matches!(c, PgCommand::Authorize { reply: AuthzReply::Channel(_), .. })));
        self.pg.truncate(64);
        let mut queue: VecDeque<_> = std::mem::take(&mut fx.shard).into();
        let mut steps = 0;
        while let Some((_, msg)) = queue.pop_front() {
            steps += 1;
            assert!(steps < 10_000, "shard messages do not settle");
            let mut out = Vec::new();
            match self.state.handle(msg, &mut out) {
                Some(engine::shard::LocalEffect::JoinAcked { topic, subscriber, presence }) => {
                    let mut ack = Effects::default();
                    self.session.on_join_ack(&mut self.state, &topic, subscriber.channel, presence, false, &mut ack);
                    self.track_subscriptions(&ack.pg);
                    written.extend(ack.frames);
                    written.extend(ack.delayed);
                    queue.extend(ack.shard);
                }
                Some(engine::shard::LocalEffect::Deliver { topic, message }) => {
                    let subs = self.state.local_subscribers(&topic).to_vec();
                    crate::fanout::deliver(ShardId(0), &subs, &topic, &message, |_, _, bytes| {
                        written.push(bytes.clone());
                        true
                    });
                }
                Some(engine::shard::LocalEffect::SchedulePresenceFlush { .. }) | None => {}
            }
            queue.extend(out);
        }
        for frame in &written {
            self.check(frame);
        }
    }

    /// Checks one frame the server wrote to this client.
    fn check(&mut self, frame: &Bytes) {
        let opcode = frame[0] & 0x0F;
        let payload = super::server_frame_payload(frame);
        if opcode == 0x2 {
            assert!(payload.first() == Some(&4) && payload.len() >= 5, "a binary frame that is not kind 4");
            let topic = payload.get(5..5 + usize::from(payload[1])).expect("kind-4 topic within the frame");
            let topic = std::str::from_utf8(topic).expect("kind-4 topic is UTF-8");
            assert!(self.joined.contains(topic), "a binary push for {topic:?}, never joined");
            return;
        }
        assert_eq!(opcode, 0x1, "a server frame that is neither text nor binary");
        let value: Value = serde_json::from_slice(payload).expect("a server text frame is JSON");
        let (r, topic, event, body) = match self.format {
            Format::V1 => (value["ref"].clone(), value["topic"].as_str().expect("topic").to_string(), value["event"].as_str().expect("event").to_string(), value["payload"].clone()),
            Format::V2 => (value[1].clone(), value[2].as_str().expect("topic").to_string(), value[3].as_str().expect("event").to_string(), value[4].clone()),
        };
        if event == "phx_reply" {
            assert!(self.sent.contains(&(topic.clone(), r.clone())), "a reply on {topic:?} with ref {r} the client never sent");
            if body["status"] == "ok" && self.joins_sent.contains(&(topic.clone(), r)) {
                self.joined.insert(topic);
            }
        } else if event == "phx_close" {
            // A duplicate join closes the previous instance even while it was still joining
            // (§1.9): a close needs only a join the client sent.
            assert!(self.joins_sent.iter().any(|(t, _)| *t == topic), "phx_close for {topic:?}, never asked to join");
        } else {
            assert!(self.joined.contains(&topic), "{event} for {topic:?}, never joined");
        }
    }
}
