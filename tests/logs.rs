//! `REALTIME_LOG_FORMAT=json`: one JSON object per line on stderr, with the connection and join
//! lifecycle at debug and refusals carrying the client's address and the reason.

mod support;
mod wsclient;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};

use support::{free_port, Server};
use wsclient::*;

#[test]
fn json_logs_are_one_object_per_line_with_the_lifecycle_at_debug() {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut command = Server::command(addr, &[("REALTIME_LOG_FORMAT", "json"), ("RUST_LOG", "debug"), ("REALTIME_DRAIN_SECS", "1")]);
    command.stderr(Stdio::piped());
    let mut child = command.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || BufReader::new(stderr).lines().map_while(Result::ok).collect::<Vec<String>>());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while support::http_request(addr, "GET", "/healthz", &[], b"").map(|r| r.0).ok() != Some(200) {
        assert!(std::time::Instant::now() < deadline, "server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let url = format!("ws://{addr}/realtime/v1/websocket?apikey={}&vsn=1.0.0", anon());
    let mut client = Client::connect(&url);
    join_v1(&mut client, "realtime:logged", "1", config(false, false));
    client.send_text(&v1j("realtime:logged", "phx_leave", json!({}), Some("2"), Some("1")));
    let _ = client.recv_json(WAIT);
    client.close();
    let refused = upgrade(addr, "/realtime/v1/websocket?apikey=not-a-token&vsn=1.0.0", &[]);
    assert_eq!(refused.status, 401);
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    let lines = reader.join().unwrap();

    let events: Vec<Value> = lines
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|line| serde_json::from_str::<Value>(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}")))
        .collect();
    for event in &events {
        assert!(event["timestamp"].is_string() && event["level"].is_string() && event["fields"]["message"].is_string(), "{event}");
    }
    let find = |message: &str| -> &Value {
        events.iter().find(|e| e["fields"]["message"] == message).unwrap_or_else(|| panic!("no {message:?} line in {lines:#?}"))
    };
    let opened = find("connection opened");
    assert_eq!(opened["level"], "DEBUG");
    assert!(opened["fields"]["peer"].as_str().unwrap().starts_with("127.0.0.1:"), "{opened}");
    assert_eq!(find("joined")["fields"]["topic"], "realtime:logged");
    assert_eq!(find("left")["fields"]["topic"], "logged");
    assert!(find("connection closed")["fields"]["peer"].is_string());
    let refusal = find("upgrade refused");
    assert!(refusal["fields"]["peer"].as_str().unwrap().starts_with("127.0.0.1:"), "{refusal}");
    assert_eq!(refusal["fields"]["reason"], "The token provided is not a valid JWT", "{refusal}");
    assert_eq!(refusal["fields"]["status"], 401);
    assert_eq!(find("draining (a second signal stops at once)")["fields"]["signal"], "SIGTERM");
}
