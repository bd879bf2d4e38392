//! Presence seen by clients (PROTOCOL.md §4): the product docs' "Recipe 2 — Presence: who's
//! online" over raw V1 frames, leaves caused by a cut TCP connection and by the idle timeout,
//! and the official Python client (`realtime` on PyPI) next to a raw V2 client.
//!
//! The server coalesces a topic's presence diffs over a short window and runs two shards, so
//! these tests never expect one diff per change: every member folds whatever `presence_state`
//! and `presence_diff` frames it receives into a view and the tests wait (bounded) until the
//! view shows what they expect. Each frame is still checked against the wire shape of §4.
//!
//! The Python test needs `python3` (with `venv`) on PATH and PyPI reachable for the first run;
//! it builds `target/py-venv` once and reuses it. Missing tools are a failure, not a skip.

mod support;
mod wsclient;

use std::collections::BTreeMap;
use std::net::Shutdown;
use std::os::unix::io::AsRawFd;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};
use support::python::{python_with_realtime, repo_dir, PyScript};
use support::Server;
use wsclient::*;

/// How long a leave may take after a socket went away without a word ("promptly").
const PROMPT_LEAVE: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------------------------------------
// A presence member over a raw socket
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq)]
enum Style {
    /// The product docs' helper: `vsn=1.0.0`, `{topic, event, payload, ref}` without `join_ref`.
    DocsV1,
    /// `vsn=2.0.0` arrays `[join_ref, ref, topic, event, payload]`, as realtime-js sends them.
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
}

/// A raw WebSocket client on one presence channel, with the presence state it has been told.
struct Member {
    name: String,
    ws: Client,
    style: Style,
    topic: String,
    join_ref: Option<String>,
    next_ref: u64,
    /// key → metas (each meta as received, `phx_ref` included).
    view: BTreeMap<String, Vec<Value>>,
    /// Every `presence_state` payload received.
    states: Vec<Value>,
    /// Every (key, meta) received in a diff's `joins` / `leaves`.
    joined: Vec<(String, Value)>,
    left: Vec<(String, Value)>,
    /// Replies by ref.
    replies: Vec<(Value, Value)>,
    /// Set once the socket closed or dropped.
    ended: Option<Frame>,
    /// Send a heartbeat whenever this long passed since the last frame we sent.
    keepalive: Option<Duration>,
    last_sent: Instant,
    /// Everything that crossed the socket, for failure messages.
    log: Vec<String>,
}

impl Member {
    fn connect(server: &Server, name: &str, style: Style, topic: &str) -> Member {
        let vsn = match style {
            Style::DocsV1 => "1.0.0",
            Style::V2 => "2.0.0",
        };
        // The docs' `connect(token)`: `${BASE_URL}/realtime/v1/websocket?apikey=${token}&vsn=…`.
        let ws = Client::connect(&server.ws_url(anon(), vsn));
        Member {
            name: name.to_string(),
            ws,
            style,
            topic: topic.to_string(),
            join_ref: None,
            next_ref: 0,
            view: BTreeMap::new(),
            states: Vec::new(),
            joined: Vec::new(),
            left: Vec::new(),
            replies: Vec::new(),
            ended: None,
            keepalive: None,
            last_sent: Instant::now(),
            log: Vec::new(),
        }
    }

    /// The docs' `nextRef()`.
    fn next_ref(&mut self) -> String {
        self.next_ref += 1;
        self.next_ref.to_string()
    }

    fn send_raw(&mut self, text: String) {
        self.log.push(format!("-> {text}"));
        self.ws.send_text(&text);
        self.last_sent = Instant::now();
    }

    /// Sends `event` on the channel's topic; returns the ref used.
    fn send(&mut self, event: &str, payload: Value) -> String {
        let r = self.next_ref();
        let topic = self.topic.clone();
        let text = match self.style {
            // The docs' `send(ws, ref, topic, event, payload)`.
            Style::DocsV1 => v1(&topic, event, payload, Some(&r)),
            Style::V2 => v2(self.join_ref.as_deref(), Some(&r), &topic, event, payload),
        };
        self.send_raw(text);
        r
    }

    fn heartbeat(&mut self) {
        let r = self.next_ref();
        let text = match self.style {
            Style::DocsV1 => v1("phoenix", "heartbeat", json!({}), Some(&r)),
            Style::V2 => v2(None, Some(&r), "phoenix", "heartbeat", json!({})),
        };
        self.send_raw(text);
    }

    /// Joins with `payload` and asserts the exact `ok` reply (§2.6).
    #[track_caller]
    fn join(&mut self, payload: Value) {
        if self.style == Style::V2 {
            // realtime-js uses the join's ref as the channel's join_ref.
            self.join_ref = Some((self.next_ref + 1).to_string());
        }
        let r = self.send("phx_join", payload);
        let reply = self.wait_reply(&r);
        assert_eq!(
            reply,
            json!({"status": "ok", "response": {"postgres_changes": []}}),
            "{}: join reply\n{}",
            self.name,
            self.dump()
        );
    }

    /// Sends `event` with `payload` and asserts the reply `{"status":"ok","response":{}}`.
    #[track_caller]
    fn request_ok(&mut self, event: &str, payload: Value) {
        let r = self.send(event, payload.clone());
        let reply = self.wait_reply(&r);
        assert_eq!(
            reply,
            json!({"status": "ok", "response": {}}),
            "{}: reply to {event} {payload}\n{}",
            self.name,
            self.dump()
        );
    }

    /// The docs' track frame (§0.4): event `presence_diff`, `{"action":"track","data":…}`.
    #[track_caller]
    fn docs_track(&mut self, data: &Value) {
        self.request_ok("presence_diff", json!({"action": "track", "data": data}));
    }

    /// The docs' untrack frame: event `presence_diff`, `{"action":"untrack"}`.
    #[track_caller]
    fn docs_untrack(&mut self) {
        self.request_ok("presence_diff", json!({"action": "untrack"}));
    }

    /// realtime-js's track frame (§4.3).
    #[track_caller]
    fn track(&mut self, payload: &Value) {
        self.request_ok("presence", json!({"type": "presence", "event": "track", "payload": payload}));
    }

    /// Reads one frame (at most `timeout`) and folds it into the member's state. Returns false
    /// when nothing arrived or the socket has ended.
    fn pump(&mut self, timeout: Duration) -> bool {
        if self.ended.is_some() {
            thread::sleep(timeout.min(Duration::from_millis(50)));
            return false;
        }
        let frame = self.ws.recv_frame(timeout);
        match frame {
            Frame::Text(text) => {
                self.log.push(format!("<- {text}"));
                let msg = self.parse(&text);
                self.absorb(msg, &text);
                true
            }
            Frame::Timeout => false,
            other => {
                self.log.push(format!("<- {}", describe(&other)));
                if !matches!(other, Frame::Binary(_)) {
                    self.ended = Some(other);
                }
                true
            }
        }
    }

    #[track_caller]
    fn parse(&self, text: &str) -> Msg {
        let value: Value = serde_json::from_str(text)
            .unwrap_or_else(|e| panic!("{}: server sent non-JSON text ({e}): {text}", self.name));
        match (self.style, value) {
            (Style::DocsV1, Value::Object(mut o)) => {
                assert!(
                    !o.contains_key("join_ref"),
                    "{}: V1 server frames carry no join_ref (§1.5): {text}",
                    self.name
                );
                Msg {
                    join_ref: Value::Null,
                    r#ref: o.remove("ref").unwrap_or_else(|| panic!("{}: V1 frame without ref: {text}", self.name)),
                    topic: o.remove("topic").and_then(|t| t.as_str().map(String::from)).unwrap_or_default(),
                    event: o.remove("event").and_then(|t| t.as_str().map(String::from)).unwrap_or_default(),
                    payload: o.remove("payload").unwrap_or(Value::Null),
                }
            }
            (Style::V2, Value::Array(a)) if a.len() == 5 => Msg {
                join_ref: a[0].clone(),
                r#ref: a[1].clone(),
                topic: a[2].as_str().unwrap_or_default().to_string(),
                event: a[3].as_str().unwrap_or_default().to_string(),
                payload: a[4].clone(),
            },
            (style, _) => panic!("{}: frame of the wrong shape for {style:?}: {text}", self.name),
        }
    }

    #[track_caller]
    fn absorb(&mut self, msg: Msg, text: &str) {
        match msg.event.as_str() {
            "phx_reply" => self.replies.push((msg.r#ref, msg.payload)),
            "presence_state" => {
                assert_eq!(msg.topic, self.topic, "{}: presence_state topic: {text}", self.name);
                assert_eq!(msg.r#ref, Value::Null, "{}: presence_state ref must be null (§4.2): {text}", self.name);
                if self.style == Style::V2 {
                    assert_eq!(
                        msg.join_ref,
                        json!(self.join_ref),
                        "{}: presence_state carries the channel's join_ref (§1.9): {text}",
                        self.name
                    );
                }
                let state = check_presence_map(&msg.payload, text);
                self.states.push(msg.payload.clone());
                // Like the clients: the state replaces what we knew.
                self.view.clear();
                for (key, metas) in state {
                    self.view.insert(key, metas);
                }
            }
            "presence_diff" => {
                assert_eq!(msg.topic, self.topic, "{}: presence_diff topic: {text}", self.name);
                assert_eq!(msg.r#ref, Value::Null, "{}: presence_diff ref must be null (§4.4): {text}", self.name);
                assert_eq!(msg.join_ref, Value::Null, "{}: presence_diff join_ref must be null (§4.4): {text}", self.name);
                let payload = msg.payload.as_object().unwrap_or_else(|| panic!("{}: diff payload not an object: {text}", self.name));
                let mut keys: Vec<&str> = payload.keys().map(String::as_str).collect();
                keys.sort();
                assert_eq!(keys, ["joins", "leaves"], "{}: a diff has exactly joins and leaves (§4.4): {text}", self.name);
                let joins = check_presence_map(&payload["joins"], text);
                let leaves = check_presence_map(&payload["leaves"], text);
                for (key, metas) in joins {
                    let entry = self.view.entry(key.clone()).or_default();
                    for meta in metas {
                        entry.retain(|m| m["phx_ref"] != meta["phx_ref"]);
                        entry.push(meta.clone());
                        self.joined.push((key.clone(), meta));
                    }
                }
                for (key, metas) in leaves {
                    for meta in metas {
                        if let Some(entry) = self.view.get_mut(&key) {
                            entry.retain(|m| m["phx_ref"] != meta["phx_ref"]);
                            if entry.is_empty() {
                                self.view.remove(&key);
                            }
                        }
                        self.left.push((key.clone(), meta));
                    }
                }
            }
            _ => {}
        }
    }

    /// Reads until `done(self)` holds; panics with the member's traffic after `timeout`.
    #[track_caller]
    fn wait_until(&mut self, what: &str, timeout: Duration, done: impl Fn(&Member) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            if done(self) {
                return;
            }
            let now = Instant::now();
            if now >= deadline {
                panic!(
                    "{}: timed out after {timeout:?} waiting for {what}\n  view: {}\n{}",
                    self.name,
                    json!(self.view),
                    self.dump()
                );
            }
            if let Some(every) = self.keepalive {
                if self.ended.is_none() && now.duration_since(self.last_sent) >= every {
                    self.heartbeat();
                }
            }
            let mut slice = deadline - now;
            if let Some(every) = self.keepalive {
                slice = slice.min(every / 2);
            }
            self.pump(slice.max(Duration::from_millis(1)));
        }
    }

    #[track_caller]
    fn wait_reply(&mut self, r: &str) -> Value {
        let wanted = json!(r);
        self.wait_until(&format!("the reply to ref {r}"), WAIT, |m| m.replies.iter().any(|(rr, _)| *rr == wanted));
        let index = self.replies.iter().position(|(rr, _)| *rr == wanted).unwrap();
        self.replies.remove(index).1
    }

    /// Reads whatever arrives within `duration`.
    fn drain(&mut self, duration: Duration) {
        let deadline = Instant::now() + duration;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            if left.is_zero() {
                break;
            }
            self.pump(left);
        }
    }

    /// The tracked data of the single meta under `key` (without `phx_ref`/`phx_ref_prev`).
    fn data_of(&self, key: &str) -> Option<Value> {
        match self.view.get(key) {
            Some(metas) if metas.len() == 1 => Some(strip_refs(&metas[0])),
            _ => None,
        }
    }

    fn has(&self, key: &str, data: &Value) -> bool {
        self.data_of(key).as_ref() == Some(data)
    }

    fn saw_leave(&self, key: &str, data: &Value) -> bool {
        self.left.iter().any(|(k, meta)| k == key && strip_refs(meta) == *data)
    }

    fn dump(&self) -> String {
        let start = self.log.len().saturating_sub(60);
        format!("  traffic of {} (last {} frames):\n    {}", self.name, self.log.len() - start, self.log[start..].join("\n    "))
    }

    /// The raw TCP stream under the WebSocket.
    fn tcp(&self) -> std::net::TcpStream {
        self.ws.stream_clone()
    }
}

/// Checks `{ "<key>": { "metas": [ { "phx_ref": "<string>", ... } ] } }` (§4.2) and returns it
/// as key → metas.
#[track_caller]
fn check_presence_map(value: &Value, text: &str) -> Vec<(String, Vec<Value>)> {
    let map = value.as_object().unwrap_or_else(|| panic!("presence map is not an object: {text}"));
    let mut out = Vec::new();
    for (key, entry) in map {
        let entry = entry.as_object().unwrap_or_else(|| panic!("entry {key} is not an object: {text}"));
        let keys: Vec<&String> = entry.keys().collect();
        assert_eq!(keys, ["metas"], "entry {key} has exactly `metas`: {text}");
        let metas = entry["metas"].as_array().unwrap_or_else(|| panic!("metas of {key} not an array: {text}"));
        for meta in metas {
            let phx_ref = meta.get("phx_ref").and_then(Value::as_str);
            assert!(
                phx_ref.is_some_and(|r| !r.is_empty()),
                "meta of {key} without a phx_ref string: {text}"
            );
        }
        out.push((key.clone(), metas.clone()));
    }
    out
}

fn strip_refs(meta: &Value) -> Value {
    let mut object: Map<String, Value> = meta.as_object().cloned().unwrap_or_default();
    object.remove("phx_ref");
    object.remove("phx_ref_prev");
    Value::Object(object)
}

/// `new Date().toISOString()` for now (UTC, millisecond precision).
fn iso_now() -> String {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let secs = since.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Days since 1970-01-01 to a civil date (proleptic Gregorian calendar).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// The docs' tracked data for one user.
fn docs_user(user_id: &str, display_name: &str, cursor_color: &str) -> Value {
    json!({
        "user_id": user_id,
        "display_name": display_name,
        "cursor_color": cursor_color,
        "joined_at": iso_now(),
    })
}

/// The docs' join: `{ config: { presence: { key: userId } } }`.
fn docs_join(user_id: &str) -> Value {
    json!({"config": {"presence": {"key": user_id}}})
}

/// A realtime-js style join with presence enabled under `key`.
fn js_join(key: &str) -> Value {
    json!({"config": {
        "broadcast": {"ack": false, "self": false},
        "presence": {"key": key, "enabled": true},
        "postgres_changes": [],
        "private": false
    }})
}

// ---------------------------------------------------------------------------------------------
// (a) Recipe 2 over raw V1 frames
// ---------------------------------------------------------------------------------------------

#[test]
fn recipe_2_presence_who_is_online_over_raw_v1_frames() {
    let server = Server::start(&[]);
    let doc_id = format!("{}-{}", std::process::id(), SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis());
    // `presence:doc-${docId}`, no `realtime:` prefix (§0.4, §1.7).
    let channel = format!("presence:doc-{doc_id}");
    let ann = docs_user("user-ann", "Ann", "#e11d48");
    let bob = docs_user("user-bob", "Bob", "#2563eb");

    // Ann opens the page: join, and on the ok reply track (the recipe's message handler).
    let mut a = Member::connect(&server, "ann", Style::DocsV1, &channel);
    a.join(docs_join("user-ann"));
    a.docs_track(&ann);
    // The diff goes to every channel of the topic, the tracking one included (§4.4).
    a.wait_until("Ann to see herself under user-ann", WAIT, |m| m.has("user-ann", &ann));

    // Bob opens the same document.
    let mut b = Member::connect(&server, "bob", Style::DocsV1, &channel);
    b.join(docs_join("user-bob"));
    b.docs_track(&bob);
    b.wait_until("Bob to see himself under user-bob", WAIT, |m| m.has("user-bob", &bob));

    // Ann learns about Bob from a presence_diff: his data verbatim under his key.
    a.wait_until("Ann to see Bob's tracked data under user-bob in a diff", WAIT, |m| {
        m.joined.iter().any(|(k, meta)| k == "user-bob" && strip_refs(meta) == bob)
    });
    let (_, meta) = a.joined.iter().find(|(k, _)| k == "user-bob").unwrap().clone();
    let mut expected = bob.clone();
    expected["phx_ref"] = meta["phx_ref"].clone();
    assert_eq!(meta, expected, "Bob's meta is his data plus phx_ref, nothing else (§4.3)\n{}", a.dump());
    assert_eq!(a.view.keys().collect::<Vec<_>>(), ["user-ann", "user-bob"], "{}", a.dump());

    // A third viewer who joins later, with the recipe's own join (`{presence: {key}}`, no
    // `enabled`), sees both in its presence_state: powa-realtime enables presence for a join
    // that names a key and omits `enabled` (README, "Deviations"), so the recipe's initial
    // snapshot handler runs.
    let mut c = Member::connect(&server, "carol", Style::DocsV1, &channel);
    c.join(json!({"config": {"presence": {"key": "user-carol"}}}));
    c.wait_until("Carol's presence_state with Ann and Bob", WAIT, |m| !m.states.is_empty());
    let state = c.states[0].clone();
    let keys: Vec<&String> = state.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["user-ann", "user-bob"], "Carol's presence_state\n{}", c.dump());
    assert_eq!(strip_refs(&state["user-ann"]["metas"][0]), ann, "{}", c.dump());
    assert_eq!(strip_refs(&state["user-bob"]["metas"][0]), bob, "{}", c.dump());
    assert_eq!(state["user-ann"]["metas"].as_array().unwrap().len(), 1);
    assert_eq!(state["user-bob"]["metas"].as_array().unwrap().len(), 1);

    // Ann closes her tab cleanly: the recipe's beforeunload untrack.
    a.docs_untrack();
    b.wait_until("Bob to see Ann in a diff's leaves", WAIT, |m| m.saw_leave("user-ann", &ann));
    c.wait_until("Carol to see Ann in a diff's leaves", WAIT, |m| m.saw_leave("user-ann", &ann));
    a.wait_until("Ann to drop herself", WAIT, |m| !m.view.contains_key("user-ann"));
    assert!(!c.view.contains_key("user-ann"), "{}", c.dump());
    assert!(c.has("user-bob", &bob), "{}", c.dump());

    // Bob leaves too.
    b.docs_untrack();
    a.wait_until("Ann to see Bob in a diff's leaves", WAIT, |m| m.saw_leave("user-bob", &bob));
    c.wait_until("Carol to see Bob in a diff's leaves", WAIT, |m| m.saw_leave("user-bob", &bob));
    assert!(a.view.is_empty(), "{}", a.dump());
    assert!(c.view.is_empty(), "{}", c.dump());

    // The recipe's joins name a key, so each got exactly one presence_state right after its join
    // (empty for Ann, who was first), and no other.
    a.drain(QUIET);
    b.drain(QUIET);
    assert_eq!(a.states.len(), 1, "Ann's presence_states: {:?}\n{}", a.states, a.dump());
    assert_eq!(b.states.len(), 1, "Bob's presence_states: {:?}\n{}", b.states, b.dump());
    assert_eq!(a.states[0], json!({}), "{}", a.dump());
    // Nothing closed along the way.
    for m in [&a, &b, &c] {
        assert!(m.ended.is_none(), "{}: socket ended\n{}", m.name, m.dump());
    }
}

// ---------------------------------------------------------------------------------------------
// (b) A TCP connection cut without a WebSocket close frame
// ---------------------------------------------------------------------------------------------

/// Observer + member tracked on `topic`; returns both once the observer sees the member.
fn observed_pair(server: &Server, topic: &str, member_key: &str, data: &Value) -> (Member, Member) {
    let mut observer = Member::connect(server, "observer", Style::V2, topic);
    observer.join(js_join("observer"));
    observer.wait_until("the observer's presence_state", WAIT, |m| !m.states.is_empty());
    observer.track(&json!({"name": "observer"}));

    let mut member = Member::connect(server, member_key, Style::V2, topic);
    member.join(js_join(member_key));
    member.track(data);
    member.wait_until("the member to see itself", WAIT, |m| m.has(member_key, data));
    observer.wait_until("the observer to see the member", WAIT, |m| m.has(member_key, data));
    (observer, member)
}

#[track_caller]
fn assert_prompt_leave(observer: &mut Member, key: &str, data: &Value, cut_at: Instant) {
    observer.wait_until(&format!("a leave for {key} within {PROMPT_LEAVE:?}"), PROMPT_LEAVE, |m| {
        m.saw_leave(key, data) && !m.view.contains_key(key)
    });
    eprintln!("[presence_clients] leave of {key} seen {:?} after the cut", cut_at.elapsed());
    assert!(observer.has("observer", &json!({"name": "observer"})), "{}", observer.dump());
    observer.drain(QUIET);
    assert_eq!(observer.view.keys().collect::<Vec<_>>(), ["observer"], "{}", observer.dump());
}

#[test]
fn tcp_shutdown_without_close_frame_sends_leave_promptly() {
    let server = Server::start(&[]);
    let data = json!({"name": "fin"});
    let (mut observer, member) = observed_pair(&server, "realtime:cut-fin", "fin-1", &data);
    // Shut the TCP stream down in both directions (FIN) and drop it; no WebSocket close frame.
    let tcp = member.tcp();
    let cut_at = Instant::now();
    tcp.shutdown(Shutdown::Both).expect("shutdown the TCP stream");
    drop(member);
    drop(tcp);
    assert_prompt_leave(&mut observer, "fin-1", &data, cut_at);
}

#[test]
fn tcp_reset_without_close_frame_sends_leave_promptly() {
    let server = Server::start(&[]);
    let data = json!({"name": "rst"});
    let (mut observer, member) = observed_pair(&server, "realtime:cut-rst", "rst-1", &data);
    // SO_LINGER {on, 0 s}: closing the last descriptor resets the connection (RST).
    let tcp = member.tcp();
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: setsockopt on a descriptor we own, with a correctly sized `linger` value.
    let rc = unsafe {
        libc::setsockopt(
            tcp.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt(SO_LINGER): {}", std::io::Error::last_os_error());
    let cut_at = Instant::now();
    drop(member);
    drop(tcp);
    assert_prompt_leave(&mut observer, "rst-1", &data, cut_at);
}

// ---------------------------------------------------------------------------------------------
// (c) A silent client and the idle timeout
// ---------------------------------------------------------------------------------------------

#[test]
fn silent_client_is_dropped_by_the_idle_timeout_and_its_presence_leaves() {
    let server = Server::start(&[("REALTIME_IDLE_TIMEOUT_SECS", "1")]);
    let topic = "realtime:idle-room";
    let data = json!({"name": "quiet"});

    let mut observer = Member::connect(&server, "observer", Style::V2, topic);
    // The observer stays alive by sending a heartbeat every 250 ms while it waits.
    observer.keepalive = Some(Duration::from_millis(250));
    observer.join(js_join("observer"));
    observer.track(&json!({"name": "observer"}));

    let mut quiet = Member::connect(&server, "quiet", Style::V2, topic);
    quiet.join(js_join("quiet-1"));
    quiet.track(&data);
    let last_frame_at = quiet.last_sent;
    // From here on `quiet` sends nothing (reading does not count as activity).
    observer.wait_until("the observer to see the quiet member", WAIT, |m| m.has("quiet-1", &data));

    observer.wait_until("the quiet member's leave within ~3 s of its last frame", Duration::from_secs(3), |m| {
        m.saw_leave("quiet-1", &data) && !m.view.contains_key("quiet-1")
    });
    let after = last_frame_at.elapsed();
    eprintln!("[presence_clients] idle leave seen {after:?} after the quiet member's last frame");
    assert!(after <= Duration::from_millis(3500), "leave took {after:?}");

    // The quiet socket was closed by the server with 1000 (§1.11).
    quiet.wait_until("the quiet socket to be closed", Duration::from_secs(2), |m| m.ended.is_some());
    match quiet.ended.clone().unwrap() {
        Frame::Close(Some(1000), _) => {}
        other => panic!("the idle socket ended with {} instead of close 1000\n{}", describe(&other), quiet.dump()),
    }

    // The observer, which kept talking, is still connected and still present.
    observer.drain(QUIET);
    assert!(observer.ended.is_none(), "{}", observer.dump());
    assert_eq!(observer.view.keys().collect::<Vec<_>>(), ["observer"], "{}", observer.dump());
    observer.track(&json!({"name": "observer", "still": "here"}));
}

// ---------------------------------------------------------------------------------------------
// (d) The official Python client next to a raw V2 client
// ---------------------------------------------------------------------------------------------

const PY_RUN_TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn python_client_and_raw_v2_client_see_each_other() {
    let python = python_with_realtime();
    let server = Server::start(&[]);
    let sub_topic = "py-room";
    let topic = format!("realtime:{sub_topic}");
    let raw_data = json!({"name": "raw"});
    let py_data = json!({"name": "py"});

    // The raw V2 client joins with presence enabled and tracks first.
    let mut raw = Member::connect(&server, "raw-v2", Style::V2, &topic);
    raw.join(js_join("raw-1"));
    raw.wait_until("the raw client's presence_state", WAIT, |m| !m.states.is_empty());
    raw.track(&raw_data);
    raw.wait_until("the raw client to see itself", WAIT, |m| m.has("raw-1", &raw_data));

    let mut command = Command::new(&python);
    command
        .arg(repo_dir().join("tests").join("python").join("presence_track.py"))
        .args(["--url", &server.realtime_js_endpoint()])
        .args(["--token", anon()])
        .args(["--topic", sub_topic])
        .args(["--key", "py-1"])
        .args(["--name", "py"])
        .args(["--expect-key", "raw-1", "--expect-key", "py-1"])
        .args(["--timeout", "20"])
        .env("PYTHONUNBUFFERED", "1");
    let mut script = PyScript::spawn(command);

    script.wait_event("subscribed", PY_RUN_TIMEOUT);
    // The raw client sees the Python client's track.
    raw.wait_until("the raw client to see the Python client under py-1", Duration::from_secs(10), |m| {
        m.has("py-1", &py_data)
    });
    // The Python client sees both (realtime's presence_state(): key → [{presence_ref, ...}]).
    let state = script.wait_event("state", PY_RUN_TIMEOUT)["state"].clone();
    let context = format!("Python presence state {state}\n{}", script.dump());
    let keys: Vec<&String> = state.as_object().expect("state is an object").keys().collect();
    assert_eq!(keys, ["py-1", "raw-1"], "{context}");
    for (key, data) in [("raw-1", &raw_data), ("py-1", &py_data)] {
        let metas = state[key].as_array().unwrap_or_else(|| panic!("{key} is not a list: {context}"));
        assert_eq!(metas.len(), 1, "{context}");
        let mut meta = metas[0].as_object().unwrap().clone();
        let presence_ref = meta.remove("presence_ref");
        assert!(presence_ref.as_ref().and_then(Value::as_str).is_some_and(|r| !r.is_empty()), "{context}");
        assert_eq!(Value::Object(meta), *data, "{context}");
    }
    // Both name the raw client's meta by the same server-issued ref.
    assert_eq!(
        state["raw-1"][0]["presence_ref"],
        raw.view["raw-1"][0]["phx_ref"],
        "{context}\n{}",
        raw.dump()
    );

    // The Python client closes its socket: the raw client gets the leave.
    let status = script.finish(Duration::from_secs(15));
    assert!(
        matches!(status, Some(s) if s.success()),
        "the Python script exited with {status:?}\n{}",
        script.dump()
    );
    raw.wait_until("the Python client's leave", PROMPT_LEAVE, |m| {
        m.saw_leave("py-1", &py_data) && !m.view.contains_key("py-1")
    });
    assert_eq!(raw.view.keys().collect::<Vec<_>>(), ["raw-1"], "{}", raw.dump());
}
