//! Postgres Changes against a real PostgreSQL 15 (PROTOCOL.md §2.6, §5, §0.4), over raw V1 and
//! V2 sockets, plus the official Python client (`realtime` on PyPI).
//!
//! Every test starts its own throwaway cluster (`replication::cluster::Cluster::throwaway`) and
//! its own server with `DATABASE_URL`, so tests never hear each other's changes and a test that
//! kills the replication connection disturbs nobody else.
//!
//! No sleeps stand in for synchronisation: a test waits for the `system` "Subscribed to
//! PostgreSQL" message, then commits, then waits (bounded) for the change. Changes are delivered
//! in commit order (§5.9), and all channels of one connection are written by one shard, so the
//! arrival of a later change on a connection proves that an earlier change that did not arrive on
//! it was not delivered; the tests use such "sentinel" changes instead of quiet periods.

mod pgsupport;
mod support;
mod wsclient;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pgsupport::Db;
use serde_json::{json, Value};
use support::python::{python_with_realtime, repo_dir, PyScript};
use support::Server;
use wsclient::*;

/// Wait for a `system` message (the first subscription may wait for the replication stream).
const SUBSCRIBE_WAIT: Duration = Duration::from_secs(10);
/// Wait for a change that must arrive.
const CHANGE_WAIT: Duration = Duration::from_secs(5);
/// The publication is polled every 2 s; a newly published table must start within this.
const PUBLICATION_WAIT: Duration = Duration::from_secs(8);

const SUBSCRIBED: &str = "Subscribed to PostgreSQL";
const NOT_PUBLISHED_PREFIX: &str =
    "Unable to subscribe to changes with given parameters. Please check Realtime is enabled for the given connect parameters: ";
const EXCEPTION_PREFIX: &str =
    "Unable to subscribe to changes with given parameters. An exception happened so please check your connect parameters: ";
const NO_PARAMS_PREFIX: &str =
    "No subscription params provided. Please provide at least a `schema` or `table` to subscribe to: ";

const USER_A: &str = "7b0d3f5e-1c2a-4e6b-9f80-a1b2c3d4e5f6";
const USER_B: &str = "c9e8d7c6-b5a4-4321-8fed-0123456789ab";

// ---------------------------------------------------------------------------------------------
// A raw client that keeps every frame it has not consumed yet
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq)]
enum Vsn {
    V1,
    V2,
}

/// One server frame, whatever the serializer.
#[derive(Debug, Clone)]
struct Msg {
    join_ref: Value,
    r#ref: Value,
    topic: String,
    event: String,
    payload: Value,
    raw: String,
}

struct Conn {
    name: String,
    ws: Client,
    vsn: Vsn,
    next_ref: u64,
    /// topic → the join_ref of its current join.
    join_refs: HashMap<String, String>,
    /// Frames read but not consumed yet, in arrival order.
    pending: VecDeque<Msg>,
    log: Vec<String>,
}

impl Conn {
    fn open(server: &Server, token: &str, vsn: Vsn, name: &str) -> Conn {
        let v = match vsn {
            Vsn::V1 => "1.0.0",
            Vsn::V2 => "2.0.0",
        };
        Conn {
            name: name.to_string(),
            ws: Client::connect(&server.ws_url(token, v)),
            vsn,
            next_ref: 0,
            join_refs: HashMap::new(),
            pending: VecDeque::new(),
            log: Vec::new(),
        }
    }

    fn next_ref(&mut self) -> String {
        self.next_ref += 1;
        self.next_ref.to_string()
    }

    fn send_raw(&mut self, text: String) {
        self.log.push(format!("-> {text}"));
        self.ws.send_text(&text);
    }

    /// Sends `event` on `topic` (V1 with a `join_ref` key only when given); returns the ref.
    fn send(&mut self, topic: &str, event: &str, payload: Value, join_ref: Option<&str>) -> String {
        let r = self.next_ref();
        let text = match self.vsn {
            Vsn::V1 => {
                let mut frame = json!({"topic": topic, "event": event, "payload": payload, "ref": r});
                if let Some(join_ref) = join_ref {
                    frame["join_ref"] = json!(join_ref);
                }
                frame.to_string()
            }
            Vsn::V2 => json!([join_ref, r, topic, event, payload]).to_string(),
        };
        self.send_raw(text);
        r
    }

    #[track_caller]
    fn parse(&self, text: &str) -> Msg {
        let value: Value = serde_json::from_str(text)
            .unwrap_or_else(|e| panic!("{}: server sent non-JSON text ({e}): {text}", self.name));
        match (self.vsn, value) {
            (Vsn::V1, Value::Object(mut o)) => Msg {
                join_ref: o.remove("join_ref").unwrap_or(Value::Null),
                r#ref: o.remove("ref").unwrap_or_else(|| panic!("{}: V1 frame without ref: {text}", self.name)),
                topic: o.remove("topic").and_then(|t| t.as_str().map(String::from)).unwrap_or_default(),
                event: o.remove("event").and_then(|t| t.as_str().map(String::from)).unwrap_or_default(),
                payload: o.remove("payload").unwrap_or(Value::Null),
                raw: text.to_string(),
            },
            (Vsn::V2, Value::Array(a)) if a.len() == 5 => Msg {
                join_ref: a[0].clone(),
                r#ref: a[1].clone(),
                topic: a[2].as_str().unwrap_or_default().to_string(),
                event: a[3].as_str().unwrap_or_default().to_string(),
                payload: a[4].clone(),
                raw: text.to_string(),
            },
            (vsn, _) => panic!("{}: frame of the wrong shape for {vsn:?}: {text}", self.name),
        }
    }

    /// Reads one frame (at most `timeout`); `None` when nothing arrived.
    #[track_caller]
    fn read(&mut self, timeout: Duration) -> Option<Msg> {
        match self.ws.recv_frame(timeout) {
            Frame::Text(text) => {
                self.log.push(format!("<- {text}"));
                Some(self.parse(&text))
            }
            Frame::Timeout => None,
            other => panic!("{}: unexpected {}\n{}", self.name, describe(&other), self.dump()),
        }
    }

    /// The first frame (pending or new) that satisfies `pred`; others stay pending.
    #[track_caller]
    fn wait(&mut self, what: &str, timeout: Duration, pred: impl Fn(&Msg) -> bool) -> Msg {
        if let Some(position) = self.pending.iter().position(&pred) {
            return self.pending.remove(position).unwrap();
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!("{}: no {what} within {timeout:?}\n{}", self.name, self.dump());
            }
            if let Some(msg) = self.read(left) {
                if pred(&msg) {
                    return msg;
                }
                self.pending.push_back(msg);
            }
        }
    }

    /// Joins `topic` with these `postgres_changes` bindings (realtime-js's config shape), asserts
    /// the exact `ok` reply of §2.6 (each binding echoed as sent plus an integer `id`) and
    /// returns the ids.
    #[track_caller]
    fn join(&mut self, topic: &str, bindings: &Value, access_token: Option<&str>) -> Vec<u64> {
        let mut payload = json!({"config": {
            "broadcast": {"ack": false, "self": false},
            "presence": {"key": "", "enabled": false},
            "postgres_changes": bindings,
            "private": false
        }});
        if let Some(token) = access_token {
            payload["access_token"] = json!(token);
        }
        let join_ref = (self.next_ref + 1).to_string();
        let r = self.send(topic, "phx_join", payload, Some(&join_ref));
        assert_eq!(r, join_ref);
        self.join_refs.insert(topic.to_string(), join_ref.clone());
        let reply = self.wait(&format!("join reply on {topic}"), WAIT, |m| m.event == "phx_reply" && m.r#ref == json!(r));
        let context = format!("{}: join reply {}\n{}", self.name, reply.raw, self.dump());
        assert_eq!(reply.topic, topic, "{context}");
        if self.vsn == Vsn::V2 {
            assert_eq!(reply.join_ref, json!(join_ref), "{context}");
        }
        assert_eq!(reply.payload["status"], "ok", "{context}");
        let echoed = reply.payload["response"]["postgres_changes"]
            .as_array()
            .unwrap_or_else(|| panic!("no response.postgres_changes array: {context}"))
            .clone();
        let sent = bindings.as_array().unwrap();
        assert_eq!(echoed.len(), sent.len(), "{context}");
        let mut ids = Vec::new();
        for (echo, binding) in echoed.iter().zip(sent) {
            let mut echo = echo.as_object().unwrap_or_else(|| panic!("binding echo is not an object: {context}")).clone();
            let id = echo.remove("id").unwrap_or_else(|| panic!("binding echo without id: {context}"));
            let id = id.as_u64().unwrap_or_else(|| panic!("id {id} is not a non-negative JSON integer: {context}"));
            assert!(id != 0 && id < (1 << 31), "id {id} must be non-zero and 31-bit: {context}");
            assert_eq!(Value::Object(echo), *binding, "the binding must be echoed exactly as sent: {context}");
            ids.push(id);
        }
        ids
    }

    /// The next `system` message of `topic`, after checking its envelope (§2.7): V2
    /// `[join_ref, null, topic, "system", payload]`, V1 `ref` null; payload with exactly
    /// `extension`, `status`, `message`, `channel` (= the sub-topic).
    #[track_caller]
    fn system(&mut self, topic: &str, timeout: Duration) -> Value {
        let msg = self.wait(&format!("system message on {topic}"), timeout, |m| m.topic == topic && m.event == "system");
        let context = format!("{}: {}\n{}", self.name, msg.raw, self.dump());
        assert_eq!(msg.r#ref, Value::Null, "system pushes have a null ref: {context}");
        if self.vsn == Vsn::V2 {
            assert_eq!(msg.join_ref, json!(self.join_refs[topic]), "system pushes carry the join_ref: {context}");
        }
        let payload = msg.payload.as_object().unwrap_or_else(|| panic!("payload is not an object: {context}"));
        let mut keys: Vec<&str> = payload.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["channel", "extension", "message", "status"], "{context}");
        assert_eq!(payload["extension"], "postgres_changes", "{context}");
        assert_eq!(payload["channel"], json!(topic.strip_prefix("realtime:").unwrap_or(topic)), "{context}");
        assert!(payload["message"].is_string(), "{context}");
        msg.payload
    }

    /// Waits for `system` "Subscribed to PostgreSQL" on `topic`.
    #[track_caller]
    fn subscribed(&mut self, topic: &str) {
        let payload = self.system(topic, SUBSCRIBE_WAIT);
        assert_eq!(
            (payload["status"].as_str(), payload["message"].as_str()),
            (Some("ok"), Some(SUBSCRIBED)),
            "{}: expected the Subscribed message on {topic}, got {payload}\n{}",
            self.name,
            self.dump()
        );
    }

    /// Waits for a `system` error on `topic`; returns its message.
    #[track_caller]
    fn system_error(&mut self, topic: &str, timeout: Duration) -> String {
        let payload = self.system(topic, timeout);
        assert_eq!(payload["status"], "error", "{}: expected a system error on {topic}, got {payload}\n{}", self.name, self.dump());
        payload["message"].as_str().unwrap().to_string()
    }

    /// The next `postgres_changes` message of `topic` (envelope checked: §5.5 fan-out messages
    /// have a null ref, and in V2 a null join_ref); returns (payload, raw frame text).
    #[track_caller]
    fn change(&mut self, topic: &str) -> (Value, String) {
        let msg = self.wait(&format!("postgres_changes on {topic}"), CHANGE_WAIT, |m| m.topic == topic && m.event == "postgres_changes");
        let context = format!("{}: {}\n{}", self.name, msg.raw, self.dump());
        assert_eq!(msg.r#ref, Value::Null, "{context}");
        if self.vsn == Vsn::V2 {
            assert_eq!(msg.join_ref, Value::Null, "{context}");
        }
        (msg.payload, msg.raw)
    }

    /// Payloads of the `postgres_changes` messages of `topic` read so far and not consumed.
    fn pending_changes(&self, topic: &str) -> Vec<Value> {
        self.pending.iter().filter(|m| m.topic == topic && m.event == "postgres_changes").map(|m| m.payload.clone()).collect()
    }

    /// `system` payloads of `topic` read so far and not consumed.
    fn pending_system(&self, topic: &str) -> Vec<Value> {
        self.pending.iter().filter(|m| m.topic == topic && m.event == "system").map(|m| m.payload.clone()).collect()
    }

    /// Asserts that nothing for `topic` was read so far (apart from what was consumed).
    #[track_caller]
    fn assert_nothing_pending(&self, topic: &str) {
        let stray: Vec<&str> = self.pending.iter().filter(|m| m.topic == topic).map(|m| m.raw.as_str()).collect();
        assert!(stray.is_empty(), "{}: unexpected frames on {topic}: {stray:#?}\n{}", self.name, self.dump());
    }

    fn dump(&self) -> String {
        let start = self.log.len().saturating_sub(60);
        let mut lines: Vec<String> = self.log[start..]
            .iter()
            .map(|l| if l.len() > 700 { format!("{}… ({} bytes)", l.chars().take(600).collect::<String>(), l.len()) } else { l.clone() })
            .collect();
        lines.insert(0, format!("--- last frames of {} ---", self.name));
        lines.join("\n")
    }
}

// ---------------------------------------------------------------------------------------------
// Payload checks (PROTOCOL.md §5.5)
// ---------------------------------------------------------------------------------------------

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Parses `YYYY-MM-DDTHH:MM:SS.mmmZ` (exactly that shape) into milliseconds since the epoch.
fn parse_commit_timestamp(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    if b.len() != 24 {
        return None;
    }
    for (i, c) in b.iter().enumerate() {
        let ok = match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            19 => *c == b'.',
            23 => *c == b'Z',
            _ => c.is_ascii_digit(),
        };
        if !ok {
            return None;
        }
    }
    let n = |from: usize, to: usize| text[from..to].parse::<i64>().unwrap();
    let days = days_from_civil(n(0, 4), n(5, 7), n(8, 10));
    Some(((days * 24 + n(11, 13)) * 60 + n(14, 16)) * 60_000 + n(17, 19) * 1000 + n(20, 23))
}

/// What a change message must carry.
struct Want<'a> {
    kind: &'a str,
    table: &'a str,
    ids: &'a [u64],
    columns: &'a Value,
    record: Option<&'a Value>,
    old_record: Option<&'a Value>,
    /// Local wall-clock window (ms) around the commit.
    window: (i64, i64),
}

/// Checks a `postgres_changes` payload against §5.5 exactly (and, for V1, the three extra keys
/// of §0.4).
#[track_caller]
fn check_change(vsn: Vsn, payload: &Value, want: &Want<'_>, context: &str) {
    let context = format!("{context}\npayload: {payload}");
    let object = payload.as_object().unwrap_or_else(|| panic!("payload is not an object: {context}"));
    let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["data", "ids"], "{context}");
    let ids = payload["ids"].as_array().unwrap_or_else(|| panic!("ids is not an array: {context}"));
    let mut got_ids: Vec<u64> = ids.iter().map(|id| id.as_u64().unwrap_or_else(|| panic!("id {id} is not an integer: {context}"))).collect();
    got_ids.sort_unstable();
    let mut want_ids = want.ids.to_vec();
    want_ids.sort_unstable();
    assert_eq!(got_ids, want_ids, "ids: {context}");

    let mut data = payload["data"].as_object().unwrap_or_else(|| panic!("data is not an object: {context}")).clone();
    match vsn {
        Vsn::V1 => {
            let event_type = data.remove("eventType");
            let new = data.remove("new");
            let old = data.remove("old");
            assert_eq!(event_type, Some(json!(want.kind)), "V1 data.eventType (§0.4): {context}");
            assert_eq!(new.as_ref(), Some(want.record.unwrap_or(&json!({}))), "V1 data.new (§0.4): {context}");
            assert_eq!(old.as_ref(), Some(want.old_record.unwrap_or(&json!({}))), "V1 data.old (§0.4): {context}");
        }
        Vsn::V2 => {
            for key in ["eventType", "new", "old"] {
                assert!(!data.contains_key(key), "V2 data must not carry `{key}` (§5.5): {context}");
            }
        }
    }
    let stamp = data.remove("commit_timestamp").unwrap_or_else(|| panic!("no commit_timestamp: {context}"));
    let stamp = stamp.as_str().unwrap_or_else(|| panic!("commit_timestamp is not a string: {context}"));
    let millis = parse_commit_timestamp(stamp).unwrap_or_else(|| panic!("commit_timestamp {stamp:?} is not YYYY-MM-DDTHH:MM:SS.mmmZ: {context}"));
    let (from, to) = want.window;
    assert!(
        millis >= from - 50 && millis <= to + 50,
        "commit_timestamp {stamp} ({millis}) is outside the commit's wall-clock window [{from}, {to}] ms: {context}"
    );
    let mut expected = json!({
        "schema": "public",
        "table": want.table,
        "type": want.kind,
        "columns": want.columns,
        "errors": null,
    });
    if let Some(record) = want.record {
        expected["record"] = record.clone();
    }
    if let Some(old) = want.old_record {
        expected["old_record"] = old.clone();
    }
    assert_eq!(Value::Object(data), expected, "data (without commit_timestamp): {context}");
}

/// Runs `f` and returns its result with the local wall-clock window (ms) around it.
fn timed<T>(f: impl FnOnce() -> T) -> (T, (i64, i64)) {
    let from = now_ms();
    let out = f();
    (out, (from, now_ms()))
}

fn binding(event: &str, table: &str) -> Value {
    json!({"event": event, "schema": "public", "table": table})
}

fn filtered(event: &str, table: &str, filter: &str) -> Value {
    json!({"event": event, "schema": "public", "table": table, "filter": filter})
}

fn record_id(payload: &Value) -> Value {
    let data = &payload["data"];
    match data["type"].as_str() {
        Some("DELETE") => data["old_record"]["id"].clone(),
        _ => data["record"]["id"].clone(),
    }
}

/// `(type, id)` of a change payload, for sequence assertions.
fn summary(payload: &Value) -> (String, Value) {
    (payload["data"]["type"].as_str().unwrap_or("?").to_string(), record_id(payload))
}

// ---------------------------------------------------------------------------------------------
// 1. Typed columns, INSERT / UPDATE / DELETE, replica identity, V1 and V2
// ---------------------------------------------------------------------------------------------

const TYPED_COLUMNS: &str = "id int8 PRIMARY KEY, i4 int4, i8 int8, num numeric, flag bool, t text, vc varchar(32), \
     u uuid, j json, jb jsonb, b bytea, d date, ts timestamp, tstz timestamptz, ia int4[], ta text[], m public.mood";

const TYPED_ROW: &str = r#"(1, -2147483648, 9007199254740993, 12345678901234567890.123456789, true,
    E'quote " backslash \\ unicode \u00fc \U0001F600 line\nbreak\ttab', 'varchar ''quoted''',
    'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{"b": [1, 2.5, {"c": null}], "a": "x"}',
    '{"k": {"n": -1.25, "t": true, "s": "\u00fc"}}', '\x0001ff10', '2026-08-21', '2026-08-21 10:15:30.123456',
    '2026-08-21 12:15:30.123456+02', '{1,2,-3}', '{"a","b c",NULL,"d\"e"}', 'happy')"#;

const TYPED_UPDATE: &str = "i4 = 7, t = 'changed', jb = '[]', ta = '{}', ia = NULL, m = 'sad', \
     tstz = '1999-12-31 23:59:59.999999-05', ts = '2026-01-02 03:04:05', num = 0.5, flag = false, b = ''";

#[test]
fn typed_columns_insert_update_delete_and_replica_identity_v1_and_v2() {
    let mut db = Db::new();
    // A non-UTC server time zone: the wire format must not depend on it (§5.5: UTC).
    db.exec("ALTER SYSTEM SET TimeZone = 'Asia/Kolkata'");
    db.exec("SELECT pg_reload_conf()");
    db.exec("CREATE TYPE public.mood AS ENUM ('sad', 'ok', 'happy')");
    db.exec(&format!("CREATE TABLE public.typed ({TYPED_COLUMNS})"));
    db.exec(&format!("CREATE TABLE public.typed_full ({TYPED_COLUMNS})"));
    db.exec("ALTER TABLE public.typed_full REPLICA IDENTITY FULL");
    db.exec("CREATE PUBLICATION supabase_realtime FOR TABLE public.typed, public.typed_full");
    let server = db.server();
    db.exec("GRANT SELECT ON public.typed, public.typed_full TO anon, authenticated");

    let columns = db.columns("public.typed");
    let typnames: Vec<&str> = columns.as_array().unwrap().iter().map(|c| c["type"].as_str().unwrap()).collect();
    assert_eq!(
        typnames,
        ["int8", "int4", "int8", "numeric", "bool", "text", "varchar", "uuid", "json", "jsonb", "bytea", "date", "timestamp", "timestamptz", "_int4", "_text", "mood"]
    );

    let topic = "realtime:typed";
    let bindings = json!([binding("*", "typed"), binding("*", "typed_full")]);
    let mut v2 = Conn::open(&server, anon(), Vsn::V2, "v2");
    let ids = v2.join(topic, &bindings, None);
    assert_ne!(ids[0], ids[1], "different bindings get different ids");
    v2.subscribed(topic);
    let mut v1 = Conn::open(&server, anon(), Vsn::V1, "v1");
    let ids_v1 = v1.join(topic, &bindings, None);
    assert_eq!(ids_v1, ids, "identical bindings get identical ids (§2.6)");
    v1.subscribed(topic);

    for (index, table, full) in [(0usize, "typed", false), (1, "typed_full", true)] {
        let qualified = format!("public.{table}");
        let id = [ids[index]];
        let expect = |db: &mut Db, v1: &mut Conn, v2: &mut Conn, what: &str, kind: &str, record: Option<&Value>, old: Option<&Value>, window: (i64, i64)| {
            let _ = db;
            for conn in [v2, v1] {
                let (payload, raw) = conn.change(topic);
                let context = format!("{} {table}: {what}\n{}", conn.name, conn.dump());
                check_change(conn.vsn, &payload, &Want { kind, table, ids: &id, columns: &columns, record, old_record: old, window }, &context);
                if what == "insert of the full row" {
                    // Exact digits: numeric and int8 are JSON numbers as to_jsonb prints them,
                    // never rounded through a double.
                    for needle in ["\"num\":12345678901234567890.123456789", "\"i8\":9007199254740993", "\"i4\":-2147483648"] {
                        assert!(raw.contains(needle), "{needle} not in the frame: {context}\n{raw}");
                    }
                }
            }
        };

        // INSERT of a row using every type, then of a row of NULLs.
        let (_, window) = timed(|| db.exec(&format!("INSERT INTO {qualified} VALUES {TYPED_ROW}")));
        let row1 = db.row(&qualified, "id = 1");
        assert_eq!(row1["b"], "0001ff10");
        assert_eq!(row1["tstz"], "2026-08-21T10:15:30.123456+00:00");
        expect(&mut db, &mut v1, &mut v2, "insert of the full row", "INSERT", Some(&row1), None, window);

        let (_, window) = timed(|| db.exec(&format!("INSERT INTO {qualified} (id) VALUES (2)")));
        let row2 = db.row(&qualified, "id = 2");
        assert_eq!(row2["t"], Value::Null);
        expect(&mut db, &mut v1, &mut v2, "insert of NULLs", "INSERT", Some(&row2), None, window);

        // UPDATE: default identity → old_record is the key; FULL → the whole old row.
        let (_, window) = timed(|| db.exec(&format!("UPDATE {qualified} SET {TYPED_UPDATE} WHERE id = 1")));
        let row1_new = db.row(&qualified, "id = 1");
        let old = if full { row1.clone() } else { json!({"id": 1}) };
        expect(&mut db, &mut v1, &mut v2, "update", "UPDATE", Some(&row1_new), Some(&old), window);

        // UPDATE of the primary key: old_record has the old key.
        let (_, window) = timed(|| db.exec(&format!("UPDATE {qualified} SET id = 3 WHERE id = 2")));
        let row3 = db.row(&qualified, "id = 3");
        let old = if full { row2.clone() } else { json!({"id": 2}) };
        expect(&mut db, &mut v1, &mut v2, "update of the key", "UPDATE", Some(&row3), Some(&old), window);

        // DELETE: no record; old_record as for UPDATE.
        let (_, window) = timed(|| db.exec(&format!("DELETE FROM {qualified} WHERE id = 1")));
        let old = if full { row1_new.clone() } else { json!({"id": 1}) };
        expect(&mut db, &mut v1, &mut v2, "delete", "DELETE", None, Some(&old), window);
    }
    v1.assert_nothing_pending(topic);
    v2.assert_nothing_pending(topic);
}

// ---------------------------------------------------------------------------------------------
// 2. The product docs' Recipe 1, verbatim
// ---------------------------------------------------------------------------------------------

/// The recipe's Step 1 (publication), byte for byte.
const RECIPE_1_STEP_1: &str = "-- Add public.todos to the supabase_realtime publication. If the publication
-- doesn't exist yet, create it.
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'supabase_realtime') THEN
    CREATE PUBLICATION supabase_realtime;
  END IF;
END $$;

ALTER PUBLICATION supabase_realtime ADD TABLE public.todos;";

/// The recipe's Step 2 (RLS), byte for byte.
const RECIPE_1_STEP_2: &str = "ALTER TABLE public.todos ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_todos_read ON public.todos
  FOR SELECT TO authenticated
  USING (owner_id = auth.uid());";

const TODOS_TABLE: &str = "CREATE TABLE public.todos (
  id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
  title text NOT NULL,
  done boolean NOT NULL DEFAULT false,
  owner_id uuid NOT NULL
)";

/// The page's `connect(token)`, `send(ws, ref, topic, event, payload)` and `nextRef()`:
/// `vsn=1.0.0`, frames `{topic, event, payload, ref}` without `join_ref`.
struct DocsSocket {
    conn: Conn,
    my_ref: u64,
}

impl DocsSocket {
    fn connect(server: &Server, token: &str) -> DocsSocket {
        // `${BASE_URL}/realtime/v1/websocket?apikey=${token}&vsn=1.0.0`
        DocsSocket { conn: Conn::open(server, token, Vsn::V1, "recipe-1"), my_ref: 1 }
    }

    /// `const nextRef = () => String(myRef++);` (starts at 1)
    fn next_ref(&mut self) -> String {
        let r = self.my_ref.to_string();
        self.my_ref += 1;
        r
    }

    /// `ws.send(JSON.stringify({ topic, event, payload, ref }))`
    fn send(&mut self, r: &str, topic: &str, event: &str, payload: Value) {
        self.conn.send_raw(json!({"topic": topic, "event": event, "payload": payload, "ref": r}).to_string());
    }
}

/// The recipe's UI: `addTodoToUI`, `updateTodoInUI`, `removeTodoFromUI`.
#[derive(Default)]
struct TodoUi {
    rows: BTreeMap<i64, Value>,
    handled: Vec<(String, Value)>,
}

impl TodoUi {
    /// The recipe's `message` handler for a `postgres_changes` frame.
    fn on_message(&mut self, msg: &Msg) {
        assert_eq!(msg.event, "postgres_changes");
        // const { eventType, new: newRow, old: oldRow } = msg.payload.data;
        let data = &msg.payload["data"];
        let (event_type, new_row, old_row) = (&data["eventType"], &data["new"], &data["old"]);
        match event_type.as_str() {
            Some("INSERT") | Some("UPDATE") => {
                let id = new_row["id"].as_i64().unwrap_or_else(|| panic!("newRow.id missing: {}", msg.raw));
                self.rows.insert(id, new_row.clone());
            }
            Some("DELETE") => {
                let id = old_row["id"].as_i64().unwrap_or_else(|| panic!("oldRow.id missing: {}", msg.raw));
                self.rows.remove(&id);
            }
            _ => panic!("the recipe's switch sees eventType {event_type}: {}", msg.raw),
        }
        self.handled.push((event_type.as_str().unwrap().to_string(), data.clone()));
    }
}

#[test]
fn recipe_1_live_updating_todo_list_verbatim() {
    let mut db = Db::new();
    db.exec(TODOS_TABLE);
    db.exec(RECIPE_1_STEP_1);
    let server = db.server();
    db.exec(RECIPE_1_STEP_2);
    db.exec("GRANT SELECT ON public.todos TO anon, authenticated");

    // Step 3: the signed-in user's access token.
    let access_token = support::token("authenticated", &["--sub", USER_A]);
    let mut ws = DocsSocket::connect(&server, &access_token);
    let topic = "realtime:public:todos";
    // ws.addEventListener("open", ...): the join, with ref nextRef() = "1".
    let join_ref = ws.next_ref();
    ws.send(
        &join_ref,
        topic,
        "phx_join",
        json!({"config": {"postgres_changes": [{"event": "*", "schema": "public", "table": "todos"}]}}),
    );
    // msg.event === "phx_reply" && msg.payload.status === "ok" → "Joined channel: realtime:public:todos"
    let reply = ws.conn.wait("the join reply", WAIT, |m| m.event == "phx_reply");
    assert_eq!(reply.topic, topic, "{}", reply.raw);
    assert_eq!(reply.r#ref, json!(join_ref), "{}", reply.raw);
    assert_eq!(reply.payload["status"], "ok", "{}", reply.raw);
    let echoed = &reply.payload["response"]["postgres_changes"];
    assert_eq!(echoed.as_array().map(Vec::len), Some(1), "{}", reply.raw);
    let id = echoed[0]["id"].as_u64().unwrap_or_else(|| panic!("no integer id: {}", reply.raw));
    assert_eq!(echoed[0], json!({"event": "*", "schema": "public", "table": "todos", "id": id}), "{}", reply.raw);
    // The test (not the page) waits until the subscription is live before writing.
    ws.conn.join_refs.insert(topic.to_string(), join_ref.clone());
    ws.conn.subscribed(topic);

    // The page's heartbeat: send(ws, nextRef(), "phoenix", "heartbeat", {}).
    let heartbeat = |ws: &mut DocsSocket| {
        let r = ws.next_ref();
        ws.send(&r, "phoenix", "heartbeat", json!({}));
        let reply = ws.conn.wait("the heartbeat reply", WAIT, |m| m.topic == "phoenix");
        assert_eq!(
            serde_json::from_str::<Value>(&reply.raw).unwrap(),
            json!({"topic": "phoenix", "event": "phx_reply", "payload": {"status": "ok", "response": {}}, "ref": r}),
        );
    };
    heartbeat(&mut ws);

    let mut ui = TodoUi::default();
    let handle_next = |ws: &mut DocsSocket, ui: &mut TodoUi| {
        let msg = ws.conn.wait("a postgres_changes frame", CHANGE_WAIT, |m| m.event == "postgres_changes");
        assert_eq!(msg.topic, topic, "{}", msg.raw);
        assert_eq!(msg.payload["ids"], json!([id]), "{}", msg.raw);
        ui.on_message(&msg);
    };

    let insert = |db: &mut Db, title: &str, owner: &str| -> i64 {
        db.one(&format!("INSERT INTO public.todos (title, owner_id) VALUES ('{title}', '{owner}') RETURNING id")).parse().unwrap()
    };
    let milk = insert(&mut db, "Buy milk", USER_A);
    handle_next(&mut ws, &mut ui);
    assert_eq!(ui.rows.get(&milk), Some(&db.row("public.todos", &format!("id = {milk}"))));
    // Another user's todo: RLS keeps it away.
    let _other = insert(&mut db, "Walk the dog", USER_B);
    let call = insert(&mut db, "Call mom", USER_A);
    handle_next(&mut ws, &mut ui);
    db.exec(&format!("UPDATE public.todos SET done = true WHERE id = {milk}"));
    handle_next(&mut ws, &mut ui);
    db.exec(&format!("DELETE FROM public.todos WHERE id = {call}"));
    handle_next(&mut ws, &mut ui);
    heartbeat(&mut ws);

    let seen: Vec<(String, Value)> = ui.handled.iter().map(|(e, d)| (e.clone(), record_id(&json!({"data": d})))).collect();
    assert_eq!(
        seen,
        [("INSERT".into(), json!(milk)), ("INSERT".into(), json!(call)), ("UPDATE".into(), json!(milk)), ("DELETE".into(), json!(call))],
        "the user's own todos only, in commit order\n{}",
        ws.conn.dump()
    );
    // The UI now shows exactly the table as the user may see it.
    let milk_row = db.row("public.todos", &format!("id = {milk}"));
    assert_eq!(milk_row["done"], true);
    assert_eq!(ui.rows, BTreeMap::from([(milk, milk_row)]), "{}", ws.conn.dump());
    // `new`/`old` as the handler read them.
    let (_, update) = &ui.handled[2];
    assert_eq!(update["old"], json!({"id": milk}));
    let (_, delete) = &ui.handled[3];
    assert_eq!((&delete["new"], &delete["old"]), (&json!({}), &json!({"id": call})));
    let (_, first) = &ui.handled[0];
    assert_eq!(first["old"], json!({}));
    ws.conn.assert_nothing_pending(topic);
}

/// Issue 11: the RLS check judges the row as committed, so the owner gets a todo's INSERT and
/// UPDATE even when the row is updated and deleted right after (each statement its own
/// transaction, all three within a few ms); another user gets only the key-only DELETE.
#[test]
fn recipe_1_insert_update_delete_in_quick_succession_reach_the_owner() {
    let mut db = Db::new();
    db.exec(TODOS_TABLE);
    db.exec(RECIPE_1_STEP_1);
    let server = db.server();
    db.exec(RECIPE_1_STEP_2);
    db.exec("GRANT SELECT ON public.todos TO anon, authenticated");
    let topic = "realtime:public:todos";
    let bindings = json!([binding("*", "todos")]);
    let mut owner = Conn::open(&server, &support::token("authenticated", &["--sub", USER_A]), Vsn::V2, "owner");
    let mut other = Conn::open(&server, &support::token("authenticated", &["--sub", USER_B]), Vsn::V2, "other");
    for conn in [&mut owner, &mut other] {
        conn.join(topic, &bindings, None);
        conn.subscribed(topic);
    }
    let mut fastest_ms = i64::MAX;
    for id in 1001..1006 {
        // Three transactions in one round trip.
        db.exec(&format!(
            "BEGIN; INSERT INTO public.todos (id, title, owner_id) VALUES ({id}, 'Buy milk', '{USER_A}'); COMMIT; \
             BEGIN; UPDATE public.todos SET done = true WHERE id = {id}; COMMIT; \
             BEGIN; DELETE FROM public.todos WHERE id = {id}; COMMIT;"
        ));
        let mut stamps = Vec::new();
        for (want, done) in [("INSERT", false), ("UPDATE", true)] {
            let (payload, raw) = owner.change(topic);
            assert_eq!(summary(&payload), (want.to_string(), json!(id)), "{raw}\n{}", owner.dump());
            assert_eq!(payload["data"]["record"]["done"], json!(done), "{raw}");
            assert_eq!(payload["data"]["record"]["owner_id"], json!(USER_A), "{raw}");
            stamps.push(parse_commit_timestamp(payload["data"]["commit_timestamp"].as_str().unwrap()).unwrap());
        }
        for conn in [&mut owner, &mut other] {
            let (payload, raw) = conn.change(topic);
            assert_eq!(summary(&payload), ("DELETE".to_string(), json!(id)), "{raw}\n{}", conn.dump());
            assert_eq!(payload["data"]["old_record"], json!({"id": id}), "{raw}");
            stamps.push(parse_commit_timestamp(payload["data"]["commit_timestamp"].as_str().unwrap()).unwrap());
        }
        fastest_ms = fastest_ms.min(stamps.iter().max().unwrap() - stamps.iter().min().unwrap());
    }
    assert!(fastest_ms <= 10, "at least one insert → update → delete committed within 10 ms (fastest {fastest_ms} ms)");
    owner.assert_nothing_pending(topic);
    other.assert_nothing_pending(topic);
}

/// Issue 11: an UPDATE whose new image lacks an unchanged TOASTed column (replica identity
/// default) cannot be judged on the image alone; the check reads the row back by key, so the
/// owner still gets it and another user does not.
#[test]
fn update_with_an_unchanged_toasted_column_is_checked_by_reading_the_row() {
    let mut db = Db::new();
    db.exec("CREATE TABLE public.docs (id int PRIMARY KEY, body text, done bool NOT NULL DEFAULT false, owner_id uuid NOT NULL)");
    db.exec("ALTER TABLE public.docs ALTER COLUMN body SET STORAGE EXTERNAL");
    db.exec("CREATE PUBLICATION supabase_realtime FOR TABLE public.docs");
    let server = db.server();
    db.exec("GRANT SELECT ON public.docs TO anon, authenticated");
    db.exec("ALTER TABLE public.docs ENABLE ROW LEVEL SECURITY");
    db.exec("CREATE POLICY own_docs ON public.docs FOR SELECT TO authenticated USING (owner_id = auth.uid())");
    let topic = "realtime:docs";
    let mut owner = Conn::open(&server, &support::token("authenticated", &["--sub", USER_A]), Vsn::V2, "owner");
    let mut other = Conn::open(&server, &support::token("authenticated", &["--sub", USER_B]), Vsn::V2, "other");
    for conn in [&mut owner, &mut other] {
        conn.join(topic, &json!([binding("UPDATE", "docs")]), None);
        conn.subscribed(topic);
    }
    db.exec(&format!("INSERT INTO public.docs (id, body, owner_id) VALUES (1, (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 400) g), '{USER_A}')"));
    db.exec(&format!("INSERT INTO public.docs (id, body, owner_id) VALUES (2, 'short', '{USER_B}')"));
    db.exec("UPDATE public.docs SET done = true WHERE id = 1");
    db.exec("UPDATE public.docs SET done = true WHERE id = 2");
    let (payload, raw) = owner.change(topic);
    assert_eq!(summary(&payload), ("UPDATE".to_string(), json!(1)), "{raw}");
    assert_eq!(payload["data"]["record"]["done"], json!(true), "{raw}");
    assert!(payload["data"]["record"].get("body").is_none(), "the unchanged TOASTed body was not in the WAL, so the image was incomplete: {raw}");
    // The other user's own row is the sentinel: row 1's UPDATE was withheld from them.
    let (payload, raw) = other.change(topic);
    assert_eq!(summary(&payload), ("UPDATE".to_string(), json!(2)), "{raw}");
    owner.assert_nothing_pending(topic);
    other.assert_nothing_pending(topic);
}

/// Issue 11: compiled RLS checks follow policy edits without a restart (the catalog fingerprint
/// is polled every 2 s): a policy switched to deny stops INSERTs, switched back lets them through.
#[test]
fn policy_edits_are_picked_up_without_a_restart() {
    let mut db = Db::new();
    db.exec(TODOS_TABLE);
    db.exec(RECIPE_1_STEP_1);
    let server = db.server();
    db.exec(RECIPE_1_STEP_2);
    db.exec("GRANT SELECT ON public.todos TO anon, authenticated");
    let topic = "realtime:public:todos";
    let mut owner = Conn::open(&server, &support::token("authenticated", &["--sub", USER_A]), Vsn::V2, "owner");
    owner.join(topic, &json!([binding("*", "todos")]), None);
    owner.subscribed(topic);
    db.exec(&format!("INSERT INTO public.todos (id, title, owner_id) VALUES (1, 'a', '{USER_A}')"));
    assert_eq!(summary(&owner.change(topic).0), ("INSERT".to_string(), json!(1)));
    // Deny everything.
    db.exec("ALTER POLICY own_todos_read ON public.todos USING (false)");
    std::thread::sleep(Duration::from_millis(2500));
    db.exec(&format!("INSERT INTO public.todos (id, title, owner_id) VALUES (2, 'b', '{USER_A}')"));
    db.exec("DELETE FROM public.todos WHERE id = 2");
    // The DELETE (never RLS-checked) is the sentinel: the INSERT before it was withheld.
    assert_eq!(summary(&owner.change(topic).0), ("DELETE".to_string(), json!(2)), "{}", owner.dump());
    // Allow again.
    db.exec("ALTER POLICY own_todos_read ON public.todos USING (owner_id = auth.uid())");
    std::thread::sleep(Duration::from_millis(2500));
    db.exec(&format!("INSERT INTO public.todos (id, title, owner_id) VALUES (3, 'c', '{USER_A}')"));
    assert_eq!(summary(&owner.change(topic).0), ("INSERT".to_string(), json!(3)), "{}", owner.dump());
    owner.assert_nothing_pending(topic);
}

// ---------------------------------------------------------------------------------------------
// 3. RLS per subscriber (§5.6)
// ---------------------------------------------------------------------------------------------

#[test]
fn rls_each_user_gets_own_rows_anon_none_deletes_unchecked_with_key_only() {
    let mut db = Db::new();
    db.exec("CREATE TABLE public.notes (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, body text, owner_id uuid)");
    db.exec("ALTER TABLE public.notes REPLICA IDENTITY FULL");
    db.exec("CREATE PUBLICATION supabase_realtime FOR TABLE public.notes");
    let server = db.server();
    db.exec("GRANT SELECT ON public.notes TO anon, authenticated, service_role");
    db.exec("ALTER TABLE public.notes ENABLE ROW LEVEL SECURITY");
    db.exec("CREATE POLICY notes_own ON public.notes FOR SELECT TO authenticated USING (owner_id = auth.uid())");
    let columns = db.columns("public.notes");

    let token_a = support::token("authenticated", &["--sub", USER_A]);
    let token_b = support::token("authenticated", &["--sub", USER_B]);
    let service = support::service_key();
    let mut clients = vec![
        (Conn::open(&server, &token_a, Vsn::V2, "user-a"), "realtime:notes-a"),
        (Conn::open(&server, &token_b, Vsn::V1, "user-b"), "realtime:notes-b"),
        (Conn::open(&server, anon(), Vsn::V2, "anon"), "realtime:notes-anon"),
        (Conn::open(&server, &service, Vsn::V2, "service"), "realtime:notes-service"),
        // Connected with the anon key, joined with user A's token as `access_token`: the
        // channel's token decides (§2.3), so this is user A too.
        (Conn::open(&server, anon(), Vsn::V2, "anon-key+a-token"), "realtime:notes-a-by-join"),
    ];
    let bindings = json!([binding("*", "notes")]);
    let mut id = 0;
    for (index, (conn, topic)) in clients.iter_mut().enumerate() {
        let access_token = (index == 4).then_some(token_a.as_str());
        id = conn.join(topic, &bindings, access_token)[0];
        conn.subscribed(topic);
    }

    // Each step waits until its change reached the clients that must get it before the next
    // step runs (written when the RLS check read the table as it was when the change was
    // processed, §5.6 rule 5; the check now judges the committed row, see
    // recipe_1_insert_update_delete_in_quick_succession_reach_the_owner, and the waits stay).
    // Clients that must not get a change are covered by order: their next expected change
    // would be preceded by it.
    let (a, b, an, sv, a2) = (0usize, 1usize, 2usize, 3usize, 4usize);
    let row = |db: &mut Db, id: i64| db.row("public.notes", &format!("id = {id}"));
    // `record_of`: the row whose current image is the expected record (Some(0): the id the
    // statement prints with RETURNING); `to`: the clients that must get the change.
    let step = |db: &mut Db, clients: &mut Vec<(Conn, &str)>, kind: &str, sql: &str, record_of: Option<i64>, old: Option<Value>, to: &[usize]| -> Vec<String> {
        let (lines, window) = timed(|| db.exec(sql));
        let record_id: Option<i64> = match (record_of, lines.first()) {
            (Some(0), Some(line)) => Some(line.parse().unwrap()),
            (Some(id), _) if id != 0 => Some(id),
            _ => None,
        };
        let record = record_id.map(|id| row(db, id));
        for &index in to {
            let (conn, topic) = &mut clients[index];
            let (payload, _) = conn.change(topic);
            let context = format!("{}: expected {kind} after {sql}\n{}", conn.name, conn.dump());
            check_change(
                conn.vsn,
                &payload,
                &Want { kind, table: "notes", ids: &[id], columns: &columns, record: record.as_ref(), old_record: old.as_ref(), window },
                &context,
            );
        }
        lines
    };
    let insert = |body: &str, owner: &str| format!("INSERT INTO public.notes (body, owner_id) VALUES ('{body}', '{owner}') RETURNING id");

    let n1: i64 = step(&mut db, &mut clients, "INSERT", &insert("note of a", USER_A), Some(0), None, &[a, sv, a2])[0].parse().unwrap();
    let n2: i64 = step(&mut db, &mut clients, "INSERT", &insert("note of b", USER_B), Some(0), None, &[b, sv])[0].parse().unwrap();
    // UPDATE under RLS: the old row is complete (REPLICA IDENTITY FULL); only DELETE is reduced.
    let n2_old = row(&mut db, n2);
    step(&mut db, &mut clients, "UPDATE", &format!("UPDATE public.notes SET body = 'b edited' WHERE id = {n2}"), Some(n2), Some(n2_old), &[b, sv]);
    // DELETE is not RLS-checked: everyone gets it, and with RLS enabled old_record is the primary
    // key only, although the replica identity is FULL (§5.6 rule 6).
    step(&mut db, &mut clients, "DELETE", &format!("DELETE FROM public.notes WHERE id = {n1}"), None, Some(json!({"id": n1})), &[a, b, an, sv, a2]);
    step(&mut db, &mut clients, "INSERT", &insert("second of a", USER_A), Some(0), None, &[a, sv, a2]);
    let n4: i64 = step(&mut db, &mut clients, "INSERT", &insert("second of b", USER_B), Some(0), None, &[b, sv])[0].parse().unwrap();
    step(&mut db, &mut clients, "DELETE", &format!("DELETE FROM public.notes WHERE id = {n4}"), None, Some(json!({"id": n4})), &[a, b, an, sv, a2]);
    for (conn, topic) in clients.iter() {
        conn.assert_nothing_pending(topic);
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Event filter, column filters, several bindings on one channel
// ---------------------------------------------------------------------------------------------

#[test]
fn event_filter_column_filters_and_three_bindings_on_one_channel() {
    let mut db = Db::new();
    db.exec("CREATE TABLE public.items (id int PRIMARY KEY, title text, qty int, status text)");
    db.exec("CREATE PUBLICATION supabase_realtime FOR TABLE public.items");
    let server = db.server();
    db.exec("GRANT SELECT ON public.items TO anon, authenticated");

    let mut conn = Conn::open(&server, anon(), Vsn::V2, "filters");
    let mut v1 = Conn::open(&server, anon(), Vsn::V1, "filters-v1");
    // (topic, filter or event-only binding)
    let single: Vec<(&str, Value)> = vec![
        ("realtime:ev-insert", binding("INSERT", "items")),
        ("realtime:f-eq", filtered("*", "items", "id=eq.1")),
        ("realtime:f-neq", filtered("*", "items", "id=neq.1")),
        ("realtime:f-lt", filtered("*", "items", "qty=lt.10")),
        ("realtime:f-gt", filtered("*", "items", "qty=gt.10")),
        ("realtime:f-in", filtered("*", "items", "status=in.(\"on hold\",open)")),
        ("realtime:f-quoted", filtered("*", "items", "title=eq.\"x, y\"")),
    ];
    let mut single_ids = HashMap::new();
    for (topic, b) in &single {
        let ids = conn.join(topic, &json!([b]), None);
        conn.subscribed(topic);
        single_ids.insert(*topic, ids[0]);
    }
    // The same filters over V1 (evaluated once per change, delivered per serializer).
    let ids = v1.join("realtime:f-in", &json!([single[5].1]), None);
    assert_eq!(ids[0], single_ids["realtime:f-in"]);
    v1.subscribed("realtime:f-in");
    let three = "realtime:three";
    let b1 = binding("INSERT", "items");
    let b2 = filtered("UPDATE", "items", "id=eq.2");
    let b3 = filtered("*", "items", "qty=gt.10");
    let three_ids = conn.join(three, &json!([b1, b2, b3]), None);
    conn.subscribed(three);
    let (i1, i2, i3) = (three_ids[0], three_ids[1], three_ids[2]);

    let steps = [
        "INSERT INTO public.items VALUES (1, 'x, y', 5, 'open')",      // S1
        "INSERT INTO public.items VALUES (2, 'plain', 10, 'on hold')", // S2
        "INSERT INTO public.items VALUES (3, 'z', 20, 'closed')",      // S3
        "UPDATE public.items SET qty = 15 WHERE id = 2",               // S4
        "UPDATE public.items SET qty = 6 WHERE id = 1",                // S5
        "DELETE FROM public.items WHERE id = 1",                       // S6: old row = key only
        "DELETE FROM public.items WHERE id = 3",                       // S7
        "INSERT INTO public.items VALUES (4, 'end', 10, 'end')",       // S8: sentinel
    ];
    for step in steps {
        db.exec(step);
    }
    let s = |n: usize| -> (String, Value) {
        let (kind, id) = match n {
            1 => ("INSERT", 1),
            2 => ("INSERT", 2),
            3 => ("INSERT", 3),
            4 => ("UPDATE", 2),
            5 => ("UPDATE", 1),
            6 => ("DELETE", 1),
            7 => ("DELETE", 3),
            8 => ("INSERT", 4),
            _ => unreachable!(),
        };
        (kind.to_string(), json!(id))
    };
    // The sentinel S8 matches ev-insert, f-neq and three (b1): once it is in on this connection,
    // everything earlier has been delivered too.
    let mut got: HashMap<&str, Vec<Value>> = HashMap::new();
    for topic in ["realtime:ev-insert", "realtime:f-neq", three] {
        loop {
            let (payload, _) = conn.change(topic);
            let last = summary(&payload) == s(8);
            got.entry(topic).or_default().push(payload);
            if last {
                break;
            }
        }
    }
    for (topic, _) in &single {
        let rest = conn.pending_changes(topic);
        got.entry(topic).or_default().extend(rest);
    }
    let expected: Vec<(&str, Vec<usize>)> = vec![
        ("realtime:ev-insert", vec![1, 2, 3, 8]),
        ("realtime:f-eq", vec![1, 5, 6]),
        ("realtime:f-neq", vec![2, 3, 4, 7, 8]),
        // DELETE tests the old row; with the default replica identity `qty` is not in it (§5.2).
        ("realtime:f-lt", vec![1, 5]),
        ("realtime:f-gt", vec![3, 4]),
        ("realtime:f-in", vec![1, 2, 4, 5]),
        ("realtime:f-quoted", vec![1, 5]),
    ];
    for (topic, steps) in expected {
        let seen: Vec<(String, Value)> = got.get(topic).map(|v| v.iter().map(summary).collect()).unwrap_or_default();
        let want: Vec<(String, Value)> = steps.iter().map(|n| s(*n)).collect();
        assert_eq!(seen, want, "{topic}: changes delivered\n{}", conn.dump());
        for payload in &got[topic] {
            assert_eq!(payload["ids"], json!([single_ids[topic]]), "{topic}: {payload}");
        }
    }
    // V1 got the same f-in changes.
    let mut v1_seen = Vec::new();
    for _ in 0..4 {
        v1_seen.push(summary(&v1.change("realtime:f-in").0));
    }
    assert_eq!(v1_seen, [s(1), s(2), s(4), s(5)], "{}", v1.dump());

    // Three bindings: one message per change, with the ids of the bindings that match.
    let seen: Vec<((String, Value), Vec<u64>)> = got[three]
        .iter()
        .map(|p| {
            let mut ids: Vec<u64> = p["ids"].as_array().unwrap().iter().map(|i| i.as_u64().unwrap()).collect();
            ids.sort_unstable();
            (summary(p), ids)
        })
        .collect();
    let sorted = |mut v: Vec<u64>| {
        v.sort_unstable();
        v
    };
    assert_eq!(
        seen,
        [
            (s(1), vec![i1]),
            (s(2), vec![i1]),
            (s(3), sorted(vec![i1, i3])),
            (s(4), sorted(vec![i2, i3])),
            (s(8), vec![i1]),
        ],
        "{three}: ids per change (b1 INSERT, b2 UPDATE id=eq.2, b3 * qty=gt.10)\n{}",
        conn.dump()
    );
}

/// Text `gt` on a column under an ICU collation (issue 11 item 4) follows the collation, not the
/// bytes: `'X' > 'x'` and `'Zebra' > 'x'` in `en-x-icu` (bytes say no), `'é' > 'x'` and
/// `'Éclair' > 'x'` do not hold (bytes say yes) — on a table without RLS (the server's own
/// comparison round trip) and on one with RLS (then the RLS check follows).
#[test]
fn text_filters_follow_the_columns_icu_collation() {
    let mut db = Db::new();
    db.exec("CREATE TABLE public.words (id int PRIMARY KEY, name text COLLATE \"en-x-icu\")");
    db.exec("CREATE TABLE public.rls_words (id int PRIMARY KEY, name varchar(20) COLLATE \"en-x-icu\", visible boolean)");
    db.exec("ALTER TABLE public.rls_words ENABLE ROW LEVEL SECURITY");
    db.exec("CREATE TABLE public.marks (id int PRIMARY KEY)");
    db.exec("CREATE PUBLICATION supabase_realtime FOR TABLE public.words, public.rls_words, public.marks");
    let server = db.server();
    db.exec("GRANT SELECT ON public.words, public.rls_words, public.marks TO anon, authenticated");
    db.exec("CREATE POLICY shown ON public.rls_words FOR SELECT TO anon USING (visible)");

    let mut conn = Conn::open(&server, anon(), Vsn::V2, "collated");
    let topics = [
        ("realtime:words-gt", filtered("*", "words", "name=gt.x")),
        ("realtime:words-lte", filtered("INSERT", "words", "name=lte.x")),
        ("realtime:rls-gt", filtered("INSERT", "rls_words", "name=gt.x")),
        ("realtime:sentinel", binding("INSERT", "marks")),
    ];
    for (topic, b) in &topics {
        conn.join(topic, &json!([b]), None);
        conn.subscribed(topic);
    }
    let names = ["X", "é", "Zebra", "apple", "y", "Éclair", "x", "xa"];
    for (i, name) in names.iter().enumerate() {
        db.exec(&format!("INSERT INTO public.words VALUES ({}, '{name}')", i + 1));
        db.exec(&format!("INSERT INTO public.rls_words VALUES ({}, '{name}', {})", i + 1, i % 4 != 2));
    }
    db.exec("UPDATE public.words SET name = 'Y' WHERE id = 4"); // apple → Y: now > 'x'
    db.exec("INSERT INTO public.marks VALUES (100)");
    loop {
        let (payload, _) = conn.change("realtime:sentinel");
        if record_id(&payload) == json!(100) {
            break;
        }
    }
    let ids = |topic: &str| -> Vec<(String, Value)> { conn.pending_changes(topic).iter().map(summary).collect() };
    let insert = |id: i64| ("INSERT".to_string(), json!(id));
    // PostgreSQL's own answer, for the record.
    let pg = db.one("SELECT string_agg(id::text, ',' ORDER BY id) FROM public.words WHERE name > 'x'");
    assert_eq!(pg.trim(), "1,3,4,5,8", "en-x-icu: X, Zebra, Y, y, xa are after x");
    assert_eq!(ids("realtime:words-gt"), vec![insert(1), insert(3), insert(5), insert(8), ("UPDATE".to_string(), json!(4))], "{}", conn.dump());
    assert_eq!(ids("realtime:words-lte"), vec![insert(2), insert(4), insert(6), insert(7)], "{}", conn.dump());
    // RLS hides rows 3 and 7 (visible = false); of the rest, X, y, xa are after x.
    assert_eq!(ids("realtime:rls-gt"), vec![insert(1), insert(5), insert(8)], "{}", conn.dump());
}

// ---------------------------------------------------------------------------------------------
// 5. A table that is not in the publication (§0.4, §5.4)
// ---------------------------------------------------------------------------------------------

#[test]
fn table_not_in_publication_names_the_fix_then_starts_by_itself() {
    let mut db = Db::new();
    db.exec("CREATE TABLE public.pubbed (id int PRIMARY KEY, v text)");
    db.exec("CREATE TABLE public.later (id int PRIMARY KEY, v text)");
    db.exec("CREATE PUBLICATION supabase_realtime FOR TABLE public.pubbed");
    let server = db.server();
    db.exec("GRANT SELECT ON public.pubbed, public.later TO anon, authenticated");

    let mixed = "realtime:mixed";
    let mut conn = Conn::open(&server, anon(), Vsn::V2, "mixed");
    let ids = conn.join(mixed, &json!([binding("*", "pubbed"), binding("*", "later")]), None);
    let (pubbed_id, later_id) = (ids[0], ids[1]);
    // One error for `later` (naming the fix) and one ok for the binding that works, in any order.
    let first = conn.system(mixed, SUBSCRIBE_WAIT);
    let second = conn.system(mixed, SUBSCRIBE_WAIT);
    let (error, ok) = if first["status"] == "error" { (first, second) } else { (second, first) };
    assert_eq!((ok["status"].as_str(), ok["message"].as_str()), (Some("ok"), Some(SUBSCRIBED)), "{}", conn.dump());
    assert_eq!(error["status"], "error", "{}", conn.dump());
    let message = error["message"].as_str().unwrap();
    let params = "[event: *, schema: public, table: later, filters: [], select: nil]";
    assert!(message.starts_with(&format!("{NOT_PUBLISHED_PREFIX}{params}")), "upstream's text first (§5.4): {message}");
    assert!(message.contains("ALTER PUBLICATION supabase_realtime ADD TABLE public.later"), "names the fix (§0.4): {message}");

    // A channel whose only binding is the missing table.
    let only = "realtime:only-later";
    let mut v1 = Conn::open(&server, anon(), Vsn::V1, "only-later");
    let only_id = v1.join(only, &json!([binding("INSERT", "later")]), None)[0];
    let message = v1.system_error(only, SUBSCRIBE_WAIT);
    assert!(message.contains("ALTER PUBLICATION supabase_realtime ADD TABLE public.later"), "{message}");

    // The working binding works; the missing table produces nothing.
    db.exec("INSERT INTO public.pubbed VALUES (1, 'a')");
    db.exec("INSERT INTO public.later VALUES (1, 'not published yet')");
    db.exec("INSERT INTO public.pubbed VALUES (2, 'b')");
    for n in [1, 2] {
        let (payload, _) = conn.change(mixed);
        assert_eq!((payload["ids"].clone(), summary(&payload)), (json!([pubbed_id]), ("INSERT".into(), json!(n))), "{}", conn.dump());
    }

    db.exec("ALTER PUBLICATION supabase_realtime ADD TABLE public.later");
    // Meanwhile the channel's other binding keeps working.
    db.exec("INSERT INTO public.pubbed VALUES (3, 'c')");
    let (payload, _) = conn.change(mixed);
    assert_eq!((payload["ids"].clone(), summary(&payload)), (json!([pubbed_id]), ("INSERT".into(), json!(3))), "{}", conn.dump());
    // The subscription starts by itself: a new ok on both channels.
    conn.subscribed_within(mixed, PUBLICATION_WAIT);
    v1.subscribed_within(only, PUBLICATION_WAIT);

    db.exec("INSERT INTO public.later VALUES (2, 'now published')");
    let (payload, _) = conn.change(mixed);
    assert_eq!((payload["ids"].clone(), summary(&payload)), (json!([later_id]), ("INSERT".into(), json!(2))), "{}", conn.dump());
    assert_eq!(payload["data"]["record"], json!({"id": 2, "v": "now published"}));
    let (payload, _) = v1.change(only);
    assert_eq!((payload["ids"].clone(), summary(&payload)), (json!([only_id]), ("INSERT".into(), json!(2))), "{}", v1.dump());
    db.exec("INSERT INTO public.pubbed VALUES (4, 'd')");
    let (payload, _) = conn.change(mixed);
    assert_eq!((payload["ids"].clone(), summary(&payload)), (json!([pubbed_id]), ("INSERT".into(), json!(4))), "{}", conn.dump());
    conn.assert_nothing_pending(mixed);
    v1.assert_nothing_pending(only);
}

impl Conn {
    #[track_caller]
    fn subscribed_within(&mut self, topic: &str, timeout: Duration) {
        let payload = self.system(topic, timeout);
        assert_eq!(
            (payload["status"].as_str(), payload["message"].as_str()),
            (Some("ok"), Some(SUBSCRIBED)),
            "{}: expected the Subscribed message on {topic}, got {payload}\n{}",
            self.name,
            self.dump()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 6. A change committed right after the ok arrives (beyond upstream, issue 4)
// ---------------------------------------------------------------------------------------------

#[test]
fn change_committed_right_after_subscribed_always_arrives() {
    let mut db = Db::new();
    db.exec("CREATE TABLE public.fast (id int PRIMARY KEY, n int)");
    db.exec("CREATE PUBLICATION supabase_realtime FOR TABLE public.fast");
    let server = db.server();
    db.exec("GRANT SELECT ON public.fast TO anon, authenticated");

    let mut long_lived = Conn::open(&server, anon(), Vsn::V2, "fast-v2");
    for i in 0..20 {
        // Even rounds on a fresh V1 connection, odd rounds on a long-lived V2 one.
        let mut fresh;
        let conn = if i % 2 == 0 {
            fresh = Conn::open(&server, anon(), Vsn::V1, &format!("fast-v1-{i}"));
            &mut fresh
        } else {
            &mut long_lived
        };
        let topic = format!("realtime:fast-{i}");
        let bindings = json!([{"event": "INSERT", "schema": "public", "table": "fast"}]);
        let id = conn.join(&topic, &bindings, None)[0];
        conn.subscribed(&topic);
        // At once: no sleep, no probe.
        db.exec(&format!("INSERT INTO public.fast VALUES ({i}, {i})"));
        let (payload, _) = conn.change(&topic);
        assert_eq!(payload["ids"], json!([id]), "round {i}\n{}", conn.dump());
        assert_eq!(payload["data"]["record"], json!({"id": i, "n": i}), "round {i}: the change committed right after the ok\n{}", conn.dump());
        if i % 2 == 1 {
            // Leave, so later rounds' inserts do not pile up on this channel.
            let join_ref = conn.join_refs[&topic].clone();
            let r = conn.send(&topic, "phx_leave", json!({}), Some(&join_ref));
            conn.wait("the leave reply", WAIT, |m| m.event == "phx_reply" && m.r#ref == json!(r));
            conn.pending.clear();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 7. The replication connection is killed
// ---------------------------------------------------------------------------------------------

#[test]
fn replication_backend_killed_is_survived_and_later_changes_arrive() {
    let mut db = Db::new();
    db.exec("CREATE TABLE public.k (id int PRIMARY KEY)");
    db.exec("CREATE PUBLICATION supabase_realtime FOR TABLE public.k");
    let server = db.server();
    db.exec("GRANT SELECT ON public.k TO anon, authenticated");

    let topic = "realtime:k";
    let mut v2 = Conn::open(&server, anon(), Vsn::V2, "k-v2");
    let mut v1 = Conn::open(&server, anon(), Vsn::V1, "k-v1");
    for conn in [&mut v2, &mut v1] {
        conn.join(topic, &json!([binding("*", "k")]), None);
        conn.subscribed(topic);
    }
    db.exec("INSERT INTO public.k VALUES (0)");
    for conn in [&mut v2, &mut v1] {
        assert_eq!(summary(&conn.change(topic).0), ("INSERT".into(), json!(0)));
    }

    for round in 1..=2 {
        let killed = db.exec("SELECT pg_terminate_backend(pid) FROM pg_stat_replication");
        assert_eq!(killed, ["t"], "round {round}: exactly the server's walsender is terminated");
        for conn in [&mut v2, &mut v1] {
            let message = conn.system_error(topic, SUBSCRIBE_WAIT);
            assert!(!message.is_empty());
            conn.subscribed_within(topic, Duration::from_secs(15));
        }
        db.exec(&format!("INSERT INTO public.k VALUES ({round})"));
        for conn in [&mut v2, &mut v1] {
            assert_eq!(summary(&conn.change(topic).0), ("INSERT".into(), json!(round)), "round {round}\n{}", conn.dump());
        }
    }
    // A channel joined after the recovery works too.
    let fresh = "realtime:k-after";
    v2.join(fresh, &json!([binding("DELETE", "k")]), None);
    v2.subscribed(fresh);
    db.exec("DELETE FROM public.k WHERE id = 0");
    assert_eq!(summary(&v2.change(fresh).0), ("DELETE".into(), json!(0)));
    assert_eq!(summary(&v2.change(topic).0), ("DELETE".into(), json!(0)));
    let mut server = server;
    assert!(server.is_running());
}

// ---------------------------------------------------------------------------------------------
// 8. Hostile filters
// ---------------------------------------------------------------------------------------------

#[test]
fn hostile_filters_get_their_error_and_nothing_else_happens() {
    let mut db = Db::new();
    db.exec("CREATE TABLE public.hostile (id int PRIMARY KEY, title text, at timestamptz)");
    db.exec("CREATE PUBLICATION supabase_realtime FOR TABLE public.hostile");
    let server = db.server();
    db.exec("GRANT SELECT ON public.hostile TO anon, authenticated");

    // A well-behaved subscriber on its own connection.
    let mut good = Conn::open(&server, anon(), Vsn::V1, "good");
    good.join("realtime:good", &json!([binding("*", "hostile")]), None);
    good.subscribed("realtime:good");

    let in_10k = format!("id=in.({})", (1..=10_000).map(|n| n.to_string()).collect::<Vec<_>>().join(","));
    let injection_text = "title=eq.x'; drop table hostile;--";
    let injection_int = "id=eq.1; drop table hostile;--";
    // (topic, filter, Some(expected exception text) or None for a valid filter, exact params)
    let cases: Vec<(&str, String, Option<&str>, Option<&str>)> = vec![
        ("realtime:h-text-injection", injection_text.into(), None, None),
        (
            "realtime:h-int-injection",
            injection_int.into(),
            Some("invalid input syntax for type integer: \"1; drop table hostile;--\""),
            Some(r#"[event: *, schema: public, table: hostile, filters: [{"id", "eq", "1; drop table hostile;--", false}], select: nil]"#),
        ),
        ("realtime:h-quoted-column", "\"id\"=eq.1".into(), Some("invalid column for filter \"id\""), None),
        ("realtime:h-semicolon-column", "id;drop table hostile=eq.1".into(), Some("invalid column for filter id;drop table hostile"), None),
        (
            "realtime:h-unknown-column",
            "nope=eq.1".into(),
            Some("invalid column for filter nope"),
            Some(r#"[event: *, schema: public, table: hostile, filters: [{"nope", "eq", "1", false}], select: nil]"#),
        ),
        ("realtime:h-in-10k", in_10k, Some("too many values for `in` filter. Maximum 100"), None),
        (
            "realtime:h-wrong-type",
            "id=eq.abc".into(),
            Some("invalid input syntax for type integer: \"abc\""),
            Some(r#"[event: *, schema: public, table: hostile, filters: [{"id", "eq", "abc", false}], select: nil]"#),
        ),
        ("realtime:h-in-quotes", "title=in.(\"a'b\",\"c;d\")".into(), None, None),
        // Found by the panic review of issue 16: this zone was sliced inside the `€`, which
        // panicked the changes core and ended the process. An operand that does not read as a
        // timestamp is compared as text, so the join succeeds.
        ("realtime:h-zone-multibyte", "at=lt.2024-01-01T10:00+a€".into(), None, None),
    ];
    let mut h = Conn::open(&server, anon(), Vsn::V2, "hostile");
    let mut case_ids = HashMap::new();
    for (topic, filter, exception, params) in &cases {
        let ids = h.join(topic, &json!([filtered("*", "hostile", filter)]), None);
        case_ids.insert(*topic, ids[0]);
        let payload = h.system(topic, SUBSCRIBE_WAIT);
        let message = payload["message"].as_str().unwrap();
        match exception {
            None => assert_eq!((payload["status"].as_str(), message), (Some("ok"), SUBSCRIBED), "{topic} ({filter}) is a valid filter"),
            Some(exception) => {
                assert_eq!(payload["status"], "error", "{topic}: {payload}");
                assert!(message.starts_with(EXCEPTION_PREFIX), "{topic}: §5.4 prefix: {message:.300}");
                if let Some(params) = params {
                    assert!(
                        message.starts_with(&format!("{EXCEPTION_PREFIX}{params}. Exception: ")),
                        "{topic}: expected the parameters {params} then `. Exception: `, got {message}"
                    );
                }
                assert!(message.contains(exception), "{topic}: expected {exception:?} in {message:.400}");
            }
        }
    }
    // Nothing else happened: the table is there and empty, the server runs.
    assert_eq!(db.one("SELECT to_regclass('public.hostile') IS NOT NULL"), "t");
    assert_eq!(db.one("SELECT count(*) FROM public.hostile"), "0");
    let mut server = server;
    assert!(server.is_running());

    // An unfiltered channel on the hostile connection, as the sentinel.
    let all = "realtime:h-all";
    h.join(all, &json!([binding("INSERT", "hostile")]), None);
    h.subscribed(all);
    db.exec("INSERT INTO public.hostile VALUES (1, 'x''; drop table hostile;--'), (2, 'a''b'), (3, 'c;d'), (4, 'plain')");
    // The sentinel row, in a later transaction.
    db.exec("INSERT INTO public.hostile VALUES (5, 'sentinel')");
    for n in 1..=5 {
        assert_eq!(summary(&good.change("realtime:good").0), ("INSERT".into(), json!(n)), "{}", good.dump());
        assert_eq!(summary(&h.change(all).0), ("INSERT".into(), json!(n)), "{}", h.dump());
    }
    let delivered = |h: &Conn, topic: &str| -> Vec<Value> { h.pending_changes(topic).iter().map(record_id).collect() };
    assert_eq!(delivered(&h, "realtime:h-text-injection"), [json!(1)], "{}", h.dump());
    assert_eq!(delivered(&h, "realtime:h-in-quotes"), [json!(2), json!(3)], "{}", h.dump());
    assert!(delivered(&h, "realtime:h-zone-multibyte").is_empty(), "NULL is never less than anything\n{}", h.dump());
    for (topic, _, exception, _) in &cases {
        if exception.is_some() {
            assert!(delivered(&h, topic).is_empty(), "{topic} failed to subscribe but got changes\n{}", h.dump());
            assert!(h.pending_system(topic).is_empty(), "{topic}: exactly one system message\n{}", h.dump());
        }
    }
    assert_eq!(db.one("SELECT count(*) FROM public.hostile"), "5");
}

// ---------------------------------------------------------------------------------------------
// 9. Binding shape and parse errors (§5.1–5.3)
// ---------------------------------------------------------------------------------------------

#[test]
fn binding_shape_and_parse_errors_and_all_or_nothing_channels() {
    let mut db = Db::new();
    db.exec("CREATE TABLE public.shapes (id int PRIMARY KEY)");
    db.exec("CREATE PUBLICATION supabase_realtime FOR TABLE public.shapes");
    let server = db.server();
    db.exec("GRANT SELECT ON public.shapes TO anon, authenticated");

    let cases: Vec<(&str, Value, String)> = vec![
        (
            "realtime:s-filter-null",
            json!({"event": "*", "schema": "public", "table": "shapes", "filter": null}),
            format!(r#"{NO_PARAMS_PREFIX}%{{"event" => "*", "filter" => nil, "schema" => "public", "table" => "shapes"}}"#),
        ),
        (
            "realtime:s-schema-filter",
            json!({"schema": "public", "filter": "id=eq.1"}),
            format!(r#"{NO_PARAMS_PREFIX}%{{"filter" => "id=eq.1", "schema" => "public"}}"#),
        ),
        ("realtime:s-event-only", json!({"event": "INSERT"}), format!(r#"{NO_PARAMS_PREFIX}%{{"event" => "INSERT"}}"#)),
        (
            "realtime:s-redacted",
            json!({"schema": "public", "table": "shapes", "filter": null, "user_token": "secret"}),
            format!("{NO_PARAMS_PREFIX}<redacted>"),
        ),
        (
            "realtime:s-bad-op",
            json!({"schema": "public", "table": "shapes", "filter": "subject=foo.hey"}),
            r#"Error parsing `filter` params: ["foo", "hey"]"#.into(),
        ),
        (
            "realtime:s-no-equals",
            json!({"schema": "public", "table": "shapes", "filter": "undefined"}),
            r#"Error parsing `filter` params: ["undefined"]"#.into(),
        ),
        ("realtime:s-no-dot", json!({"schema": "public", "table": "shapes", "filter": "id=eq5"}), r#"Error parsing `filter` params: ["eq5"]"#.into()),
        (
            "realtime:s-in-no-parens",
            json!({"schema": "public", "table": "shapes", "filter": "id=in.1"}),
            "Error parsing `filter` params: `in` filter value must be wrapped by parentheses".into(),
        ),
        (
            "realtime:s-empty-segment",
            json!({"schema": "public", "table": "shapes", "filter": "id=eq.1,"}),
            "Error parsing `filter` params: filter must not contain empty segments (check for extra commas)".into(),
        ),
        (
            "realtime:s-select-string",
            json!({"schema": "public", "table": "shapes", "select": "id"}),
            r#"Error parsing `select` params: expected a list of column name strings, e.g. select: ["col1", "col2"]"#.into(),
        ),
        (
            "realtime:s-select-wildcard",
            json!({"schema": "public", "table": "*", "select": ["id"]}),
            "Column selection is not supported for wildcard subscriptions. Provide an explicit schema and table name.".into(),
        ),
    ];
    let mut conn = Conn::open(&server, anon(), Vsn::V2, "shapes");
    for (topic, b, expected) in &cases {
        conn.join(topic, &json!([b]), None);
        let message = conn.system_error(topic, SUBSCRIBE_WAIT);
        assert_eq!(&message, expected, "{topic}: binding {b}");
    }
    // All or nothing (§5.1): a valid binding next to a broken one is not active either.
    let mixed = "realtime:s-mixed";
    conn.join(mixed, &json!([binding("*", "shapes"), {"event": "*", "schema": "public", "table": "shapes", "filter": null}]), None);
    let message = conn.system_error(mixed, SUBSCRIBE_WAIT);
    assert!(message.starts_with(NO_PARAMS_PREFIX), "{message}");
    // The same over V1.
    let mut v1 = Conn::open(&server, anon(), Vsn::V1, "shapes-v1");
    v1.join("realtime:s-filter-null", &json!([cases[0].1]), None);
    assert_eq!(v1.system_error("realtime:s-filter-null", SUBSCRIBE_WAIT), cases[0].2);

    // Sentinel: an unfiltered channel on the same connection gets both inserts; once the second
    // is in, the broken channels have had every chance to get the first. They get nothing, and
    // no further system message ("exactly one of" ok/error, §5.4).
    let control = "realtime:s-control";
    conn.join(control, &json!([binding("*", "shapes")]), None);
    conn.subscribed(control);
    db.exec("INSERT INTO public.shapes VALUES (1)");
    db.exec("INSERT INTO public.shapes VALUES (2)");
    assert_eq!(summary(&conn.change(control).0), ("INSERT".into(), json!(1)));
    assert_eq!(summary(&conn.change(control).0), ("INSERT".into(), json!(2)));
    for (topic, _, _) in &cases {
        conn.assert_nothing_pending(topic);
    }
    let extra_system = conn.pending_system(mixed);
    let first_change: Vec<Value> = conn.pending_changes(mixed).into_iter().filter(|p| record_id(p) == json!(1)).collect();
    assert!(
        extra_system.is_empty() && first_change.is_empty(),
        "{mixed}: one broken binding makes the whole channel fail (§5.1 all-or-nothing, §5.4 exactly one \
         system message), but after the error it also got {extra_system:?} and the change {first_change:?}\n{}",
        conn.dump()
    );
}

// ---------------------------------------------------------------------------------------------
// 10. Column privileges, `select`, and the error rows of §5.6
// ---------------------------------------------------------------------------------------------

#[test]
fn column_privileges_select_lists_and_error_rows() {
    let mut db = Db::new();
    db.exec("CREATE TABLE public.secrets (id int PRIMARY KEY, title text, secret text)");
    db.exec("CREATE TABLE public.nopk (a int, b text)");
    db.exec("ALTER TABLE public.nopk REPLICA IDENTITY FULL");
    db.exec("CREATE TABLE public.hidden_pk (id int PRIMARY KEY, title text)");
    db.exec("CREATE PUBLICATION supabase_realtime FOR TABLE public.secrets, public.nopk, public.hidden_pk");
    let server = db.server();
    db.exec("GRANT SELECT (id, title) ON public.secrets TO anon");
    db.exec("GRANT SELECT ON public.nopk TO anon");
    db.exec("GRANT SELECT (title) ON public.hidden_pk TO anon");
    db.exec("GRANT SELECT ON public.secrets TO service_role");

    let mut anon_conn = Conn::open(&server, anon(), Vsn::V2, "anon");
    let mut service = Conn::open(&server, &support::service_key(), Vsn::V2, "service");
    let secrets = "realtime:secrets";
    anon_conn.join(secrets, &json!([binding("*", "secrets")]), None);
    anon_conn.subscribed(secrets);
    let nopk = "realtime:nopk";
    anon_conn.join(nopk, &json!([binding("*", "nopk")]), None);
    anon_conn.subscribed(nopk);
    let hidden = "realtime:hidden-pk";
    anon_conn.join(hidden, &json!([binding("*", "hidden_pk")]), None);
    anon_conn.subscribed(hidden);
    // A filter or a select on a column the role cannot read is refused (§5.2, §5.3).
    let bad_filter = "realtime:secret-filter";
    anon_conn.join(bad_filter, &json!([filtered("*", "secrets", "secret=eq.s")]), None);
    let message = anon_conn.system_error(bad_filter, SUBSCRIBE_WAIT);
    assert!(message.starts_with(EXCEPTION_PREFIX) && message.contains("invalid column for filter secret"), "{message}");
    let bad_select = "realtime:secret-select";
    anon_conn.join(bad_select, &json!([{"event": "*", "schema": "public", "table": "secrets", "select": ["secret"]}]), None);
    let message = anon_conn.system_error(bad_select, SUBSCRIBE_WAIT);
    assert!(message.starts_with(EXCEPTION_PREFIX) && message.contains("invalid column for select secret"), "{message}");
    // `select` limits the columns, plus the primary key (§5.3).
    let selected = "realtime:secrets-select";
    service.join(selected, &json!([{"event": "*", "schema": "public", "table": "secrets", "select": ["title"]}]), None);
    service.subscribed(selected);
    let everything = "realtime:secrets-all";
    service.join(everything, &json!([binding("*", "secrets")]), None);
    service.subscribed(everything);

    db.exec("INSERT INTO public.secrets VALUES (1, 'visible', 'hidden')");
    let (payload, _) = anon_conn.change(secrets);
    let data = &payload["data"];
    assert_eq!(data["columns"], json!([{"name": "id", "type": "int4"}, {"name": "title", "type": "text"}]), "{payload}");
    assert_eq!(data["record"], json!({"id": 1, "title": "visible"}), "columns the role cannot SELECT are removed (§5.6 rule 1): {payload}");
    let (payload, _) = service.change(selected);
    assert_eq!(payload["data"]["columns"], json!([{"name": "id", "type": "int4"}, {"name": "title", "type": "text"}]), "{payload}");
    assert_eq!(payload["data"]["record"], json!({"id": 1, "title": "visible"}), "{payload}");
    let (payload, _) = service.change(everything);
    assert_eq!(payload["data"]["record"], json!({"id": 1, "title": "visible", "secret": "hidden"}), "{payload}");

    // No primary key: the error row of §5.6 rule 2 (UPDATE also has an empty old_record).
    db.exec("INSERT INTO public.nopk VALUES (1, 'x')");
    let (payload, _) = anon_conn.change(nopk);
    assert_eq!(
        payload["data"],
        json!({"schema": "public", "table": "nopk", "type": "INSERT", "columns": [], "record": {}, "commit_timestamp": null,
               "errors": ["Error 400: Bad Request, no primary key"]}),
        "{payload}"
    );
    db.exec("UPDATE public.nopk SET b = 'y'");
    let (payload, _) = anon_conn.change(nopk);
    assert_eq!(
        payload["data"],
        json!({"schema": "public", "table": "nopk", "type": "UPDATE", "columns": [], "record": {}, "old_record": {}, "commit_timestamp": null,
               "errors": ["Error 400: Bad Request, no primary key"]}),
        "{payload}"
    );
    // Primary key not readable by the role: rule 3.
    db.exec("INSERT INTO public.hidden_pk VALUES (1, 't')");
    let (payload, _) = anon_conn.change(hidden);
    assert_eq!(
        payload["data"],
        json!({"schema": "public", "table": "hidden_pk", "type": "INSERT", "columns": [], "record": {}, "commit_timestamp": null,
               "errors": ["Error 401: Unauthorized"]}),
        "{payload}"
    );
}

// ---------------------------------------------------------------------------------------------
// 11. The official Python client
// ---------------------------------------------------------------------------------------------

/// The `realtime` release pinned for these tests (PROTOCOL.md §0.1 baseline); the venv is the
const PY_RUN_TIMEOUT: Duration = Duration::from_secs(30);

#[test]
fn python_client_receives_an_insert() {
    let python = python_with_realtime();
    let mut db = Db::new();
    db.exec(TODOS_TABLE);
    db.exec("CREATE PUBLICATION supabase_realtime FOR TABLE public.todos");
    let server = db.server();
    db.exec("GRANT SELECT ON public.todos TO anon, authenticated");
    let columns = db.columns("public.todos");

    let mut command = Command::new(&python);
    command
        .arg(repo_dir().join("tests").join("python").join("postgres_insert.py"))
        .args(["--url", &server.realtime_js_endpoint()])
        .args(["--token", anon()])
        .args(["--topic", "py-todos"])
        .args(["--timeout", "20"])
        .env("PYTHONUNBUFFERED", "1");
    let mut script = PyScript::spawn(command);
    script.wait_event("subscribed", PY_RUN_TIMEOUT);
    // The `system` ok reached the client's on_system callback: the subscription is live.
    let system = script.wait_event("system", PY_RUN_TIMEOUT);
    assert_eq!(system["payload"]["message"], SUBSCRIBED, "{}", script.dump());
    assert_eq!(system["payload"]["channel"], "py-todos", "{}", script.dump());

    let (lines, window) = timed(|| db.exec(&format!("INSERT INTO public.todos (title, owner_id) VALUES ('from SQL', '{USER_A}') RETURNING id")));
    let id: i64 = lines[0].parse().unwrap();
    let row = db.row("public.todos", &format!("id = {id}"));
    let change = script.wait_event("change", PY_RUN_TIMEOUT);
    let binding_id = change["binding_id"].as_u64().unwrap_or_else(|| panic!("no binding id: {change}"));
    check_change(
        Vsn::V2,
        &change["payload"],
        &Want { kind: "INSERT", table: "todos", ids: &[binding_id], columns: &columns, record: Some(&row), old_record: None, window },
        &script.dump(),
    );
    let status = script.wait_exit(Duration::from_secs(15));
    assert!(matches!(status, Some(s) if s.success()), "the Python script exited with {status:?}\n{}", script.dump());
}

// ---------------------------------------------------------------------------------------------
// 10. Connections that go away
// ---------------------------------------------------------------------------------------------

fn metric(server: &Server, name: &str) -> u64 {
    support::metric(server.addr, name)
}

fn wait_for_subscriptions(server: &Server, want: u64, context: &str) {
    support::wait_for_metric(server.addr, "realtime_postgres_changes_subscriptions", want, Duration::from_secs(10), context);
}

/// Found by the RefCell review of issue 16: a connection that closed (with or without a close
/// frame) dropped its channels' Unsubscribe commands, so the changes core kept matching and
/// checking rows for channels nobody could receive, for ever; and its channels were not
/// counted in `realtime_leaves_total`.
#[test]
fn a_closed_connections_subscriptions_leave_the_changes_core() {
    let mut db = Db::new();
    db.exec("CREATE TABLE public.gone (id int PRIMARY KEY)");
    db.exec("CREATE PUBLICATION supabase_realtime FOR TABLE public.gone");
    let server = db.server();
    db.exec("GRANT SELECT ON public.gone TO anon, authenticated");
    let mut stay = Conn::open(&server, anon(), Vsn::V1, "stay");
    stay.join("realtime:stay", &json!([binding("*", "gone")]), None);
    stay.subscribed("realtime:stay");
    wait_for_subscriptions(&server, 1, "one subscriber");
    for (round, with_close_frame) in [(0, false), (1, true), (2, false)] {
        let mut leaving = Conn::open(&server, anon(), Vsn::V2, "leaving");
        for topic in ["realtime:a", "realtime:b"] {
            leaving.join(topic, &json!([binding("INSERT", "gone"), filtered("DELETE", "gone", "id=eq.1")]), None);
            leaving.subscribed(topic);
        }
        wait_for_subscriptions(&server, 3, &format!("round {round}: joined"));
        let leaves = metric(&server, "realtime_leaves_total");
        if with_close_frame {
            leaving.ws.close();
        }
        drop(leaving);
        wait_for_subscriptions(&server, 1, &format!("round {round}: closed (close frame: {with_close_frame})"));
        assert_eq!(metric(&server, "realtime_leaves_total"), leaves + 2, "round {round}: both channels counted as left");
    }
    // The one left still gets its changes.
    db.exec("INSERT INTO public.gone VALUES (1)");
    assert_eq!(summary(&stay.change("realtime:stay").0), ("INSERT".into(), json!(1)), "{}", stay.dump());
}
