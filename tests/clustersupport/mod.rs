//! What the cluster tests share (`tests/cluster.rs`, `tests/chaos.rs`): nodes on one NATS,
//! their status, joins and broadcasts over the test WebSocket client, and a presence view.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::nats::Nats;
use crate::support::{http_request, Server};
use crate::wsclient::{anon, v1, v2, Client, Frame};

pub const WAIT: Duration = Duration::from_secs(10);
/// `REALTIME_NODE_TIMEOUT_SECS` in these tests.
pub const NODE_TIMEOUT_SECS: u64 = 2;

pub fn node(nats: &Nats, name: &str) -> Server {
    let timeout = NODE_TIMEOUT_SECS.to_string();
    Server::start(&[("REALTIME_NATS_URL", &nats.url()), ("REALTIME_NODE_ID", name), ("REALTIME_NODE_TIMEOUT_SECS", &timeout), ("REALTIME_DRAIN_SECS", "1")])
}

/// `/api/status`'s cluster section.
pub fn cluster_status(server: &Server) -> Value {
    let auth = format!("Bearer {}", crate::support::service_key());
    let (status, body) = http_request(server.addr, "GET", "/api/status", &[("authorization", &auth)], b"").expect("status");
    assert_eq!(status, 200);
    serde_json::from_slice::<Value>(&body).expect("status JSON")["cluster"].clone()
}

/// Waits until every node hears the `others` other nodes.
pub fn wait_for_nodes(servers: &[&Server], others: usize) {
    let deadline = Instant::now() + WAIT;
    for server in servers {
        loop {
            let status = cluster_status(server);
            if status["nats_connected"] == true && status["nodes"].as_array().map_or(0, Vec::len) == others {
                break;
            }
            assert!(Instant::now() < deadline, "nodes did not meet: {status}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

pub fn connect(server: &Server, vsn: &str) -> Client {
    Client::connect(&server.ws_url(anon(), vsn))
}

/// Joins `topic` (V1) and returns once the `ok` reply arrived.
pub fn join_v1(client: &mut Client, topic: &str, config: Value) {
    client.send_text(&v1(topic, "phx_join", json!({"config": config}), Some("1")));
    loop {
        let frame = client.recv_json(WAIT);
        if frame["event"] == "phx_reply" && frame["ref"] == "1" {
            assert_eq!(frame["payload"]["status"], "ok", "{frame}");
            return;
        }
    }
}

/// Joins `topic` (V2) and returns once the `ok` reply arrived.
pub fn join_v2(client: &mut Client, topic: &str, config: Value) {
    client.send_text(&v2(Some("1"), Some("1"), topic, "phx_join", json!({"config": config})));
    loop {
        let frame = client.recv_json(WAIT);
        if frame[3] == "phx_reply" && frame[1] == "1" {
            assert_eq!(frame[4]["status"], "ok", "{frame}");
            return;
        }
    }
}

/// The next broadcast's payload on a V1 client (other frames skipped).
pub fn next_broadcast_v1(client: &mut Client) -> Value {
    loop {
        let frame = client.recv_json(WAIT);
        if frame["event"] == "broadcast" {
            return frame["payload"].clone();
        }
    }
}

pub fn rest_broadcast(server: &Server, topic: &str, payload: Value) {
    let body = json!({"messages": [{"topic": topic, "event": "ev", "payload": payload}]}).to_string();
    let auth = format!("Bearer {}", crate::support::service_key());
    let (status, answer) = http_request(server.addr, "POST", "/api/broadcast", &[("authorization", &auth), ("apikey", anon()), ("content-type", "application/json")], body.as_bytes()).expect("REST");
    assert_eq!(status, 202, "{}", String::from_utf8_lossy(&answer));
}

/// Presence members of a V1 client's view, by key, from its `presence_state` and diffs.
pub struct View {
    pub client: Client,
    pub refs: std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
    pub history: Vec<String>,
    pub members: std::collections::BTreeMap<String, usize>,
}

impl View {
    pub fn join(server: &Server, topic: &str, key: &str) -> View {
        let mut client = connect(server, "1.0.0");
        client.send_text(&v1(topic, "phx_join", json!({"config": {"presence": {"key": key}}}), Some("1")));
        let mut view = View { client, members: Default::default(), refs: Default::default(), history: Vec::new() };
        // The `ok` reply, then the `presence_state`.
        view.pump_until(|frame| frame["event"] == "presence_state");
        view
    }

    /// Applies a `presence_state` or `presence_diff` (by `phx_ref`, as the clients do: a
    /// leave removes that ref, a join adds it).
    pub fn apply(&mut self, frame: &Value) {
        let refs = |entry: &Value| -> Vec<String> { entry["metas"].as_array().unwrap().iter().map(|m| m["phx_ref"].as_str().unwrap_or_default().to_string()).collect() };
        match frame["event"].as_str() {
            Some("presence_state") => {
                self.history.push(frame["payload"].to_string());
                self.refs = frame["payload"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), refs(v).into_iter().collect())).collect();
            }
            Some("presence_diff") => {
                self.history.push(frame["payload"].to_string());
                for (key, entry) in frame["payload"]["leaves"].as_object().unwrap() {
                    if let Some(set) = self.refs.get_mut(key) {
                        for r in refs(entry) {
                            set.remove(&r);
                        }
                    }
                }
                for (key, entry) in frame["payload"]["joins"].as_object().unwrap() {
                    self.refs.entry(key.clone()).or_default().extend(refs(entry));
                }
                self.refs.retain(|_, set| !set.is_empty());
            }
            _ => return,
        }
        self.members = self.refs.iter().map(|(k, set)| (k.clone(), set.len())).collect();
    }

    pub fn pump_until(&mut self, done: impl Fn(&Value) -> bool) {
        loop {
            let frame = self.client.recv_json(WAIT);
            self.apply(&frame);
            if done(&frame) {
                return;
            }
        }
    }

    pub fn track(&mut self, topic: &str, name: &str) {
        self.client.send_text(&v1(topic, "presence", json!({"type": "presence", "event": "track", "payload": {"name": name}}), Some("t")));
    }

    /// Reads frames until the view holds exactly `keys` (each once), or panics after `within`.
    pub fn wait_for(&mut self, keys: &[&str], within: Duration) {
        let deadline = Instant::now() + within;
        let want: std::collections::BTreeMap<String, usize> = keys.iter().map(|k| (k.to_string(), 1)).collect();
        while self.members != want {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "presence view {:?}, expected {:?}; refs {:?}; frames {:#?}", self.members, want, self.refs, self.history);
            match self.client.recv_frame(left.min(Duration::from_millis(200))) {
                Frame::Text(text) => {
                    let frame: Value = serde_json::from_str(&text).unwrap();
                    self.apply(&frame);
                }
                Frame::Timeout => {}
                other => panic!("unexpected frame {}", crate::wsclient::describe(&other)),
            }
        }
    }
}
