//! Multi-tenant mode (issue 13; PROTOCOL.md §1.2, §1.4, §1.11, §2.4–2.5, §9; CONTRACT.md
//! "Tenants file"): the real binary with a tenants file, real WebSocket clients that name their
//! tenant in the Host header, and real HTTP requests.

mod support;
mod wsclient;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use support::{http_request, http_request_host, node, Server};
use wsclient::{v1, Client, Frame};

const ACME_SECRET: &str = "acme-secret-0123456789-abcdefghijklmnopqrstuvwxyz";
const GLOBEX_SECRET: &str = "globex-secret-0123456789-abcdefghijklmnopqrstuvwxyz";
const WAIT: Duration = Duration::from_secs(5);
/// One rate tick (§9.2) plus slack: limits are decided at ticks.
const TICK: Duration = Duration::from_millis(5_600);

fn token_for(secret: &str, role: &str) -> String {
    support::token_signed(secret, role)
}

/// A scratch directory for the tenants file.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("powa-mt-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write_tenants(path: &Path, extra_acme: &str, extra_globex: &str) {
    let text = format!(
        "[[tenant]]\nexternal_id = \"acme\"\njwt_secret = \"{ACME_SECRET}\"\n{extra_acme}\n\n[[tenant]]\nexternal_id = \"globex\"\njwt_secret = \"{GLOBEX_SECRET}\"\n{extra_globex}\n"
    );
    std::fs::write(path, text).unwrap();
}

fn start(name: &str, extra_acme: &str, extra_globex: &str) -> (Server, PathBuf) {
    let dir = scratch(name);
    let file = dir.join("tenants.toml");
    write_tenants(&file, extra_acme, extra_globex);
    let server = Server::start(&[("REALTIME_TENANTS", file.to_str().unwrap()), ("JWT_SECRET", "")]);
    (server, file)
}

fn url(server: &Server, token: &str) -> String {
    format!("ws://{}/realtime/v1/websocket?apikey={token}&vsn=1.0.0", server.addr)
}

fn connect(server: &Server, tenant: &str) -> Client {
    let secret = if tenant == "acme" { ACME_SECRET } else { GLOBEX_SECRET };
    Client::connect_host(&url(server, &token_for(secret, "anon")), &format!("{tenant}.localhost:{}", server.addr.port()))
}

/// Joins `topic` (V1) and returns the reply.
fn join(client: &mut Client, topic: &str, config: Value) -> Value {
    client.send_text(&v1(topic, "phx_join", json!({ "config": config }), Some("1")));
    loop {
        let frame = client.recv_json(WAIT);
        if frame["event"] == "phx_reply" && frame["ref"] == "1" {
            return frame;
        }
    }
}

fn joined(client: &mut Client, topic: &str) {
    let reply = join(client, topic, json!({"broadcast": {"self": false}, "presence": {"key": "me"}}));
    assert_eq!(reply["payload"]["status"], "ok", "{reply}");
}

fn broadcast(client: &mut Client, topic: &str, n: u32) {
    client.send_text(&v1(topic, "broadcast", json!({"type": "broadcast", "event": "e", "payload": {"n": n}}), None));
}

/// The next frame with `event` on `client` within `timeout` (others skipped), if any.
fn next_event(client: &mut Client, event: &str, timeout: Duration) -> Option<Value> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        match client.recv_frame(deadline - Instant::now()) {
            Frame::Text(text) => {
                let frame: Value = serde_json::from_str(&text).unwrap();
                if frame["event"] == event {
                    return Some(frame);
                }
            }
            Frame::Timeout => return None,
            other => panic!("unexpected frame waiting for {event}: {}", wsclient::describe(&other)),
        }
    }
    None
}

fn body_json(body: &[u8]) -> Value {
    serde_json::from_slice(body).unwrap_or_else(|_| json!(String::from_utf8_lossy(body)))
}

#[test]
fn two_tenants_with_the_same_channel_names_never_see_each_other() {
    let (server, _file) = start("isolation", "", "");
    let (mut acme_a, mut acme_b) = (connect(&server, "acme"), connect(&server, "acme"));
    let (mut globex_a, mut globex_b) = (connect(&server, "globex"), connect(&server, "globex"));
    for client in [&mut acme_a, &mut acme_b, &mut globex_a, &mut globex_b] {
        joined(client, "realtime:room");
    }
    // Presence: each tenant's members see only their own tenant's state.
    acme_a.send_text(&v1("realtime:room", "presence", json!({"type": "presence", "event": "track", "payload": {"who": "acme"}}), Some("2")));
    let diff = next_event(&mut acme_b, "presence_diff", WAIT).expect("acme member sees the acme track");
    assert_eq!(diff["payload"]["joins"]["me"]["metas"][0]["who"], "acme");
    // Broadcast: many from each tenant; each receiver counts only its own tenant's.
    for n in 0..20 {
        broadcast(&mut acme_a, "realtime:room", n);
        broadcast(&mut globex_a, "realtime:room", 100 + n);
    }
    for (client, base) in [(&mut acme_b, 0), (&mut globex_b, 100)] {
        for n in 0..20 {
            let frame = next_event(client, "broadcast", WAIT).expect("own tenant's broadcast");
            assert_eq!(frame["payload"]["payload"]["n"], base + n, "{frame}");
        }
    }
    assert!(next_event(&mut globex_b, "presence_diff", Duration::from_millis(300)).is_none(), "acme's presence never reaches globex");
    assert!(next_event(&mut globex_b, "broadcast", Duration::from_millis(300)).is_none());
    // REST: the Host decides the tenant, the token must be that tenant's.
    let port = server.addr.port();
    let body = json!({"messages": [{"topic": "room", "event": "e", "payload": {"n": "rest"}}]}).to_string();
    let acme_service = token_for(ACME_SECRET, "service_role");
    let bearer = format!("Bearer {acme_service}");
    let (status, _) = http_request_host(server.addr, &format!("acme.localhost:{port}"), "POST", "/api/broadcast", &[("Authorization", &bearer), ("Content-Type", "application/json")], body.as_bytes()).unwrap();
    assert_eq!(status, 202);
    assert_eq!(next_event(&mut acme_b, "broadcast", WAIT).unwrap()["payload"]["payload"]["n"], "rest");
    assert!(next_event(&mut globex_b, "broadcast", Duration::from_millis(300)).is_none());
    // Acme's key at globex's Host: refused as a bad signature.
    let (status, body) = http_request_host(server.addr, &format!("globex.localhost:{port}"), "POST", "/api/broadcast", &[("Authorization", &bearer), ("Content-Type", "application/json")], body.as_bytes()).unwrap();
    assert_eq!((status, body_json(&body)), (401, json!({"message": "Unauthorized"})));
    match Client::try_connect_host(&url(&server, &token_for(ACME_SECRET, "anon")), "globex.localhost") {
        Err((401, body)) => assert_eq!(body_json(body.as_bytes()), json!({"error": "Failed to validate JWT signature"})),
        other => panic!("a token signed for acme must be refused by globex: {:?}", other.map(|_| ())),
    }
}

#[test]
fn unknown_suspended_and_private_only_tenants_get_the_exact_answers() {
    let (server, _file) = start("gates", "private_only = true", "suspend = true");
    let anon = token_for(ACME_SECRET, "anon");
    // Unknown Host: 404 on upgrade, 401 on REST and ping; remembered for /api/status.
    match Client::try_connect_host(&url(&server, &anon), "initech.example.com") {
        Err((404, body)) => assert_eq!(body_json(body.as_bytes()), json!({"error": "Tenant not found"})),
        other => panic!("unknown tenant: {:?}", other.map(|_| ())),
    }
    let (status, body) = http_request_host(server.addr, "initech.example.com", "POST", "/api/broadcast", &[("apikey", &anon)], b"{}").unwrap();
    assert_eq!((status, body_json(&body)), (401, json!({"message": "Tenant not found in database"})));
    let (status, _) = http_request_host(server.addr, "initech.example.com", "GET", "/api/ping", &[], b"").unwrap();
    assert_eq!(status, 401);
    let (status, body) = http_request_host(server.addr, "acme.example.com", "GET", "/realtime/v1/api/ping", &[], b"").unwrap();
    assert_eq!((status, body_json(&body)), (200, json!({"message": "Success"})));
    // Suspended: 403 on upgrade and REST.
    match Client::try_connect_host(&url(&server, &token_for(GLOBEX_SECRET, "anon")), "globex.localhost") {
        Err((403, body)) => assert_eq!(body_json(body.as_bytes()), json!({"error": "Realtime was disabled for this tenant"})),
        other => panic!("suspended tenant: {:?}", other.map(|_| ())),
    }
    let globex_anon = token_for(GLOBEX_SECRET, "anon");
    let (status, body) = http_request_host(server.addr, "globex.localhost", "POST", "/api/broadcast", &[("apikey", &globex_anon)], b"{}").unwrap();
    assert_eq!((status, body_json(&body)), (403, json!({"message": "Tenant is suspended"})));
    // Private only: a public join is refused.
    let mut client = connect(&server, "acme");
    let reply = join(&mut client, "realtime:public-room", json!({}));
    assert_eq!(reply["payload"], json!({"status": "error", "response": {"reason": "PrivateOnly: This project only allows private channels"}}));
    // The unknown host is listed with what was derived from it.
    let service = format!("Bearer {}", token_for(ACME_SECRET, "service_role"));
    let (status, body) = http_request_host(server.addr, "acme.localhost", "GET", "/api/status", &[("Authorization", &service)], b"").unwrap();
    assert_eq!(status, 200);
    let status_json = body_json(&body);
    let unknown = &status_json["tenants"]["unknown_hosts"];
    assert!(unknown.as_array().unwrap().iter().any(|u| u["host"] == "initech.example.com" && u["derived_tenant"] == "initech" && u["count"].as_u64() >= Some(2)), "{status_json}");
    assert_eq!(status_json["tenants"]["count"], 2);
    // Without a Host naming a tenant, /healthz still answers (not tenant-scoped).
    assert_eq!(http_request(server.addr, "GET", "/healthz", &[], b"").unwrap().0, 200);
}

#[test]
fn concurrent_users_and_channels_per_client_are_per_tenant() {
    let (server, _file) = start("users", "max_concurrent_users = 2\nmax_channels_per_client = 2", "");
    let mut first = connect(&server, "acme");
    joined(&mut first, "realtime:a");
    joined(&mut first, "realtime:b");
    let reply = join(&mut first, "realtime:c", json!({}));
    assert_eq!(reply["payload"]["response"]["reason"], "ChannelRateLimitReached: Too many channels");
    // A second socket may connect (not a user yet) and become the second user.
    let mut second = connect(&server, "acme");
    let mut third = connect(&server, "acme");
    joined(&mut second, "realtime:a");
    // The tenant is full: a socket without channels may not join...
    let reply = join(&mut third, "realtime:a", json!({}));
    assert_eq!(reply["payload"]["response"]["reason"], "ConnectionRateLimitReached: Too many connected users");
    // ...nor may a new socket connect.
    match Client::try_connect_host(&url(&server, &token_for(ACME_SECRET, "anon")), "acme.localhost") {
        Err((429, body)) => assert_eq!(body_json(body.as_bytes()), json!({"error": "Too many connected users"})),
        other => panic!("a full tenant refuses upgrades: {:?}", other.map(|_| ())),
    }
    // The other tenant is unaffected.
    let mut globex: Vec<Client> = (0..3).map(|_| connect(&server, "globex")).collect();
    for client in &mut globex {
        joined(client, "realtime:a");
    }
    // A user that leaves frees its place.
    drop(first);
    let deadline = Instant::now() + WAIT;
    loop {
        let reply = join(&mut third, "realtime:a", json!({}));
        if reply["payload"]["status"] == "ok" {
            break;
        }
        assert!(Instant::now() < deadline, "the freed place was never given: {reply}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn joins_per_second_close_the_socket_with_1001_and_refuse_upgrades() {
    let (server, _file) = start("joins", "max_joins_per_second = 1", "");
    let mut client = connect(&server, "acme");
    // 8 joins inside the first 5 s window: 8 / 5 s ≥ 1/s at the first tick.
    for i in 0..8 {
        joined(&mut client, &format!("realtime:j{i}"));
    }
    std::thread::sleep(TICK);
    let reply = join(&mut client, "realtime:late", json!({}));
    assert_eq!(reply["payload"]["response"]["reason"], "ClientJoinRateLimitReached: Too many joins per second");
    assert_eq!(client.recv_close(WAIT), Some(1001), "the socket closes with 1001 after the error reply");
    match Client::try_connect_host(&url(&server, &token_for(ACME_SECRET, "anon")), "acme.localhost") {
        Err((429, body)) => assert_eq!(body_json(body.as_bytes()), json!({"error": "Too many joins per second"})),
        other => panic!("upgrades are refused while triggered: {:?}", other.map(|_| ())),
    }
    // Globex joins on.
    let mut globex = connect(&server, "globex");
    joined(&mut globex, "realtime:j0");
}

#[test]
fn events_per_second_close_receiving_channels_and_refuse_rest() {
    let (server, _file) = start("events", "max_events_per_second = 2", "");
    let (mut sender, mut receiver) = (connect(&server, "acme"), connect(&server, "acme"));
    joined(&mut sender, "realtime:room");
    joined(&mut receiver, "realtime:room");
    let (mut globex_sender, mut globex_receiver) = (connect(&server, "globex"), connect(&server, "globex"));
    joined(&mut globex_sender, "realtime:room");
    joined(&mut globex_receiver, "realtime:room");
    // 10 broadcasts + 10 deliveries in the first window: 20 / 5 s ≥ 2/s.
    for n in 0..10 {
        broadcast(&mut sender, "realtime:room", n);
    }
    for _ in 0..10 {
        next_event(&mut receiver, "broadcast", WAIT).expect("delivered below the limit");
    }
    std::thread::sleep(TICK);
    broadcast(&mut sender, "realtime:room", 99);
    let system = next_event(&mut receiver, "system", WAIT).expect("the receiving channel is shut");
    assert_eq!(
        system["payload"],
        json!({"extension": "system", "status": "error", "message": "Too many messages per second", "channel": "room"})
    );
    assert!(next_event(&mut receiver, "phx_close", WAIT).is_some());
    let service = format!("Bearer {}", token_for(ACME_SECRET, "service_role"));
    let body = json!({"messages": [{"topic": "room", "event": "e", "payload": {}}]}).to_string();
    let (status, body) = http_request_host(server.addr, "acme.localhost", "POST", "/api/broadcast", &[("Authorization", &service), ("Content-Type", "application/json")], body.as_bytes()).unwrap();
    assert_eq!((status, body_json(&body)), (429, json!({"message": "Too many requests"})));
    // Globex is unaffected.
    broadcast(&mut globex_sender, "realtime:room", 1);
    assert_eq!(next_event(&mut globex_receiver, "broadcast", WAIT).unwrap()["payload"]["payload"]["n"], 1);
    // Per-tenant metrics name both tenants and count acme's limit hits.
    let (_, metrics) = http_request(server.addr, "GET", "/metrics", &[], b"").unwrap();
    let metrics = String::from_utf8(metrics).unwrap();
    assert!(metrics.contains("realtime_tenant_connections{tenant=\"acme\"} 2"), "{metrics}");
    assert!(metrics.contains("realtime_tenant_connections{tenant=\"globex\"} 2"));
    assert!(metrics.contains("realtime_tenants 2"));
    let deadline = Instant::now() + WAIT;
    while metrics_value(&server, "realtime_tenant_limit_hits_total{tenant=\"acme\"}").is_none_or(|v| v < 1) {
        assert!(Instant::now() < deadline, "limit hits are published within a second");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn metrics_value(server: &Server, series: &str) -> Option<u64> {
    let (_, body) = http_request(server.addr, "GET", "/metrics", &[], b"").ok()?;
    let text = String::from_utf8(body).ok()?;
    text.lines().find_map(|line| line.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
}

#[test]
fn sighup_applies_limits_live_disconnects_changed_tenants_and_keeps_tenants_on_a_broken_file() {
    let (server, file) = start("sighup", "", "");
    let mut acme = connect(&server, "acme");
    let mut globex = connect(&server, "globex");
    joined(&mut acme, "realtime:room");
    joined(&mut globex, "realtime:room");
    // A broken file: both tenants keep working, nobody is disconnected.
    std::fs::write(&file, "[[tenant]]\nexternal_id = \"acme\"\n").unwrap();
    server.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(1500));
    let mut again = connect(&server, "globex");
    joined(&mut again, "realtime:room");
    broadcast(&mut again, "realtime:room", 1);
    assert_eq!(next_event(&mut globex, "broadcast", WAIT).unwrap()["payload"]["payload"]["n"], 1);
    // Globex's secret changes and acme's channel limit: globex's sockets are disconnected with
    // "Server requested disconnect" + 1012, acme's stay up with the new limit applied.
    const ROTATED: &str = "globex-rotated-0123456789-abcdefghijklmnopqrstuvwxyz";
    let text = format!(
        "[[tenant]]\nexternal_id = \"acme\"\njwt_secret = \"{ACME_SECRET}\"\nmax_channels_per_client = 2\n\n[[tenant]]\nexternal_id = \"globex\"\njwt_secret = \"{ROTATED}\"\n"
    );
    std::fs::write(&file, text).unwrap();
    server.signal(libc::SIGHUP);
    let system = next_event(&mut globex, "system", WAIT).expect("globex gets the disconnect notice");
    assert_eq!(system["payload"]["message"], "Server requested disconnect");
    assert_eq!(globex.recv_close(WAIT), Some(1012));
    joined(&mut acme, "realtime:second");
    let reply = join(&mut acme, "realtime:third", json!({}));
    assert_eq!(reply["payload"]["response"]["reason"], "ChannelRateLimitReached: Too many channels", "the new limit applies without a reconnect");
    // Globex's old key is refused now, the new one accepted.
    match Client::try_connect_host(&url(&server, &token_for(GLOBEX_SECRET, "anon")), "globex.localhost") {
        Err((401, _)) => {}
        other => panic!("the old key must be refused: {:?}", other.map(|_| ())),
    }
    let mut rotated = Client::connect_host(&url(&server, &token_for(ROTATED, "anon")), "globex.localhost");
    joined(&mut rotated, "realtime:room");
    // Removing a tenant disconnects it too, and its Host becomes unknown.
    let text = format!("[[tenant]]\nexternal_id = \"acme\"\njwt_secret = \"{ACME_SECRET}\"\nmax_channels_per_client = 2\n");
    std::fs::write(&file, text).unwrap();
    server.signal(libc::SIGHUP);
    assert_eq!(next_event(&mut rotated, "system", WAIT).unwrap()["payload"]["message"], "Server requested disconnect");
    assert_eq!(rotated.recv_close(WAIT), Some(1012));
    assert!(matches!(Client::try_connect_host(&url(&server, &token_for(ROTATED, "anon")), "globex.localhost"), Err((404, _))));
    broadcast(&mut acme, "realtime:room", 5);
}

#[test]
fn an_invalid_tenants_file_refuses_to_start() {
    let dir = scratch("invalid");
    let file = dir.join("tenants.toml");
    std::fs::write(&file, "[[tenant]]\nexternal_id = \"acme\"\njwt_secret = \"s\"\nmax_concurent_users = 3\n").unwrap();
    let port = support::free_port();
    let output = Server::command(format!("127.0.0.1:{port}").parse().unwrap(), &[("REALTIME_TENANTS", file.to_str().unwrap())]).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("max_concurent_users"), "the error names the field: {stderr}");
}

#[test]
fn single_tenant_mode_takes_the_tenant_limits_from_the_environment() {
    let server = Server::start(&[("REALTIME_MAX_CONCURRENT_USERS", "1"), ("REALTIME_MAX_JOINS_PER_SECOND", "0"), ("REALTIME_MAX_EVENTS_PER_SECOND", "0")]);
    let anon = support::anon_key();
    let ws = format!("ws://{}/realtime/v1/websocket?apikey={anon}&vsn=1.0.0", server.addr);
    // Any Host maps to the one tenant.
    let mut first = Client::connect_host(&ws, "whatever.example.com");
    let mut second = Client::connect_host(&ws, "localhost");
    joined(&mut first, "realtime:room");
    let reply = join(&mut second, "realtime:room", json!({}));
    assert_eq!(reply["payload"]["response"]["reason"], "ConnectionRateLimitReached: Too many connected users");
    match Client::try_connect_host(&ws, "localhost") {
        Err((429, body)) => assert_eq!(body_json(body.as_bytes()), json!({"error": "Too many connected users"})),
        other => panic!("REALTIME_MAX_CONCURRENT_USERS=1 refuses a second user's upgrade: {:?}", other.map(|_| ())),
    }
    // No per-tenant series in single-tenant mode.
    let (_, metrics) = http_request(server.addr, "GET", "/metrics", &[], b"").unwrap();
    assert!(!String::from_utf8(metrics).unwrap().contains("realtime_tenant_connections"));
}

#[test]
fn realtime_js_clients_of_two_tenants_stay_apart() {
    let dir = node::prepare();
    let (mut server, _file) = start("realtime-js", "", "");
    let mut command = node::command(&dir, &["tenants/multi_tenant.test.mjs"]);
    command
        .env("POWA_ENDPOINT", server.realtime_js_endpoint())
        .env("POWA_ACME_ANON", token_for(ACME_SECRET, "anon"))
        .env("POWA_GLOBEX_ANON", token_for(GLOBEX_SECRET, "anon"));
    node::run("realtime-js multi-tenant", command, Duration::from_secs(90), &mut server);
}

#[test]
fn payload_and_presence_limits_are_per_tenant() {
    let (server, _file) = start("payload-presence", "max_payload_size_in_kb = 1\nmax_presence_events_per_second = 1", "");
    let big = "x".repeat(2_000);
    // Payload: 1 KB for acme (+ the 500-byte envelope allowance), upstream's 3000 KB for globex.
    let mut results = Vec::new();
    for tenant in ["acme", "globex"] {
        let mut client = connect(&server, tenant);
        let reply = join(&mut client, "realtime:big", json!({"broadcast": {"ack": true}}));
        assert_eq!(reply["payload"]["status"], "ok");
        client.send_text(&v1("realtime:big", "broadcast", json!({"type": "broadcast", "event": "e", "payload": {"big": big}}), Some("9")));
        let ack = loop {
            let frame = client.recv_json(WAIT);
            if frame["ref"] == "9" {
                break frame;
            }
        };
        results.push((tenant, ack["payload"]["status"].clone(), ack["payload"]["response"].clone()));
    }
    assert_eq!(results[0], ("acme", json!("error"), json!("payload_size_exceeded")));
    assert_eq!(results[1].1, json!("ok"), "globex's limit is upstream's default");
    // Presence: 1 event/s for acme. Six members tracking: 6 tracks + their diffs in the first
    // window put acme above the limit at the tick; the next track closes that channel.
    let mut members: Vec<Client> = (0..6).map(|_| connect(&server, "acme")).collect();
    for (i, member) in members.iter_mut().enumerate() {
        let reply = join(member, "realtime:lobby", json!({"presence": {"key": format!("m{i}")}}));
        assert_eq!(reply["payload"]["status"], "ok");
        member.send_text(&v1("realtime:lobby", "presence", json!({"type": "presence", "event": "track", "payload": {"i": i}}), Some("2")));
    }
    std::thread::sleep(TICK);
    members[0].send_text(&v1("realtime:lobby", "presence", json!({"type": "presence", "event": "track", "payload": {"again": true}}), Some("3")));
    let system = next_event(&mut members[0], "system", WAIT).expect("the tracking channel is shut");
    assert_eq!(system["payload"]["message"], "Too many presence messages per second");
    // Globex tracks on.
    let mut globex = connect(&server, "globex");
    let reply = join(&mut globex, "realtime:lobby", json!({"presence": {"key": "g"}}));
    assert_eq!(reply["payload"]["status"], "ok");
    globex.send_text(&v1("realtime:lobby", "presence", json!({"type": "presence", "event": "track", "payload": {}}), Some("2")));
    let diff = next_event(&mut globex, "presence_diff", WAIT).expect("globex's own track is diffed");
    assert!(diff["payload"]["joins"]["g"].is_object());
}

/// A raw HTTP exchange: the whole response text (head and body).
fn raw_http(server: &Server, host: &str, request_line: &str, headers: &[(&str, &str)], body: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(server.addr).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut request = format!("{request_line}\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
}

#[test]
fn rest_requests_carry_the_rate_headers_and_are_refused_above_the_rate() {
    let (server, _file) = start("http-rate", "max_events_per_second = 2", "");
    let service = format!("Bearer {}", token_for(ACME_SECRET, "service_role"));
    let body = json!({"messages": [{"topic": "room", "event": "e", "payload": {}}]}).to_string();
    let post = |server: &Server| raw_http(server, "acme.localhost", "POST /api/broadcast HTTP/1.1", &[("Authorization", &service), ("Content-Type", "application/json")], &body);
    let first = post(&server);
    assert!(first.starts_with("HTTP/1.1 202"), "{first}");
    assert!(first.contains("x-rate-rolling: 0\r\nx-rate-limit: 2\r\nx-rate-limit-remaining: 2\r\n"), "{first}");
    for _ in 0..5 {
        post(&server);
    }
    // Six requests in the first second: 6/s ≥ 2/s once the second has ticked.
    std::thread::sleep(Duration::from_millis(1_300));
    let refused = post(&server);
    assert!(refused.starts_with("HTTP/1.1 429"), "{refused}");
    assert!(refused.contains("x-rate-limit: 2\r\nx-rate-limit-remaining: 0\r\n"), "{refused}");
    assert!(refused.ends_with(r#"{"message":"Too many requests"}"#), "{refused}");
    // Globex has upstream's default limit and its own rate.
    let globex_service = format!("Bearer {}", token_for(GLOBEX_SECRET, "service_role"));
    let globex = raw_http(&server, "globex.localhost", "POST /api/broadcast HTTP/1.1", &[("Authorization", &globex_service), ("Content-Type", "application/json")], &body);
    assert!(globex.starts_with("HTTP/1.1 202") && globex.contains("x-rate-limit: 100\r\n"), "{globex}");
}
