//! The tenant-wide presence events limit (PROTOCOL.md §4.6, §9.2): tracks and delivered diffs
//! count; once the 60-second average is above the limit (checked every 5 s), a track closes
//! its channel with `Too many presence messages per second`.

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{anon_key, Server};

fn connect(server: &Server) -> tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<std::net::TcpStream>> {
    let (mut socket, _) = tungstenite::connect(server.ws_url(&anon_key(), "2.0.0")).expect("connect");
    if let tungstenite::stream::MaybeTlsStream::Plain(stream) = socket.get_mut() {
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    }
    socket
}

fn send(socket: &mut tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<std::net::TcpStream>>, value: Value) {
    socket.send(tungstenite::Message::text(value.to_string())).unwrap();
}

/// Reads frames until one satisfies `pred` (bounded).
fn wait_for(socket: &mut tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<std::net::TcpStream>>, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Ok(tungstenite::Message::Text(text)) = socket.read() {
            let value: Value = serde_json::from_str(&text).unwrap();
            if pred(&value) {
                return value;
            }
        }
    }
    panic!("frame not seen in time");
}

#[test]
fn tenant_presence_rate_closes_channels_once_above_the_limit() {
    // 1 event/s: the first 5 s bucket already averages far above it after a few tracks.
    let server = Server::start(&[("REALTIME_MAX_PRESENCE_EVENTS_PER_SECOND", "1"), ("REALTIME_PRESENCE_COALESCE_MS", "0")]);
    let mut socket = connect(&server);
    // Ten channels, one track each (each channel stays under its own 5 per 30 s).
    for i in 0..10 {
        let topic = format!("realtime:p{i}");
        send(&mut socket, json!(["1", "1", topic, "phx_join", {"config": {"presence": {"key": format!("k{i}")}}}]));
        wait_for(&mut socket, |v| v[3] == "phx_reply" && v[2] == topic.as_str());
        send(&mut socket, json!(["1", "2", topic, "presence", {"event": "track", "payload": {"i": i}}]));
        wait_for(&mut socket, |v| v[3] == "presence_diff" && v[2] == topic.as_str());
    }
    // After the next rate tick (≤ 5 s), a track is refused and its channel closed.
    std::thread::sleep(Duration::from_millis(5500));
    send(&mut socket, json!(["1", "3", "realtime:p0", "presence", {"event": "track", "payload": {"again": true}}]));
    let system = wait_for(&mut socket, |v| v[3] == "system");
    assert_eq!(system[4]["message"], json!("Too many presence messages per second"));
    let close = wait_for(&mut socket, |v| v[3] == "phx_close");
    assert_eq!(close[2], json!("realtime:p0"));
    // Broadcast on another channel still works: only presence is limited.
    send(&mut socket, json!(["1", "1", "realtime:b", "phx_join", {"config": {"broadcast": {"ack": true}}}]));
    wait_for(&mut socket, |v| v[3] == "phx_reply" && v[2] == "realtime:b");
    send(&mut socket, json!(["1", "4", "realtime:b", "broadcast", {"type": "broadcast", "event": "e", "payload": {}}]));
    let ack = wait_for(&mut socket, |v| v[3] == "phx_reply" && v[1] == "4");
    assert_eq!(ack[4]["status"], json!("ok"));
}
