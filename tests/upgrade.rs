//! The HTTP side of the WebSocket upgrade and the plain HTTP endpoints: PROTOCOL.md §1.1,
//! §1.3, §1.4 and CONTRACT.md. Status codes and bodies are read over raw TCP.

mod support;
mod wsclient;

use serde_json::json;
use support::Server;
use wsclient::*;

const WS: &str = "/realtime/v1/websocket";

#[track_caller]
fn assert_json_error(resp: &HttpResponse, status: u16, message: &str) {
    assert_eq!(resp.status, status, "status; body {:?}", resp.body_text());
    assert_eq!(resp.body_json(), json!({"error": message}), "body");
    let ct = resp.header("content-type").unwrap_or("");
    assert!(ct.starts_with("application/json"), "content-type {ct:?}");
}

#[test]
fn valid_key_upgrades_with_101() {
    let server = Server::start(&[]);
    let resp = upgrade(server.addr, &format!("{WS}?apikey={}&vsn=1.0.0", anon()), &[]);
    assert_eq!(resp.status, 101);
    assert!(
        resp.header("upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket")),
        "headers {:?}",
        resp.headers
    );
    assert_eq!(resp.header("sec-websocket-accept"), Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
    assert_eq!(resp.header("sec-websocket-protocol"), None, "no subprotocol is selected");
}

#[test]
fn missing_api_key_is_401() {
    let server = Server::start(&[]);
    let resp = upgrade(server.addr, &format!("{WS}?vsn=1.0.0"), &[]);
    assert_json_error(&resp, 401, "API key is missing");
}

#[test]
fn authorization_header_is_not_read_on_upgrade() {
    let server = Server::start(&[]);
    let bearer = format!("Bearer {}", anon());
    let resp = upgrade(server.addr, &format!("{WS}?vsn=2.0.0"), &[("Authorization", &bearer)]);
    assert_json_error(&resp, 401, "API key is missing");
}

#[test]
fn garbage_token_is_401_not_a_valid_jwt() {
    let server = Server::start(&[]);
    let resp = upgrade(server.addr, &format!("{WS}?apikey=garbage&vsn=1.0.0"), &[]);
    assert_json_error(&resp, 401, "The token provided is not a valid JWT");
}

#[test]
fn wrong_signature_is_401() {
    let server = Server::start(&[]);
    let bad = with_wrong_signature(anon(), &support::service_key());
    let resp = upgrade(server.addr, &format!("{WS}?apikey={bad}&vsn=1.0.0"), &[]);
    assert_json_error(&resp, 401, "Failed to validate JWT signature");
}

#[test]
fn expired_token_is_401() {
    let server = Server::start(&[]);
    let expired = support::token("anon", &["--exp=-30"]);
    let resp = upgrade(server.addr, &format!("{WS}?apikey={expired}&vsn=1.0.0"), &[]);
    assert_json_error(&resp, 401, "Token has expired");
}

#[test]
fn unsupported_vsn_is_403_with_empty_body() {
    let server = Server::start(&[]);
    for vsn in ["3.0.0", "abc", "0.9.0"] {
        let resp = upgrade(server.addr, &format!("{WS}?apikey={}&vsn={vsn}", anon()), &[]);
        assert_eq!(resp.status, 403, "vsn={vsn}; body {:?}", resp.body_text());
        assert!(resp.body.is_empty(), "vsn={vsn}: body must be empty, got {:?}", resp.body_text());
    }
}

#[test]
fn vsn_check_comes_before_the_token_check() {
    // §1.4: row 2 (vsn) before row 5 (no token).
    let server = Server::start(&[]);
    let resp = upgrade(server.addr, &format!("{WS}?vsn=3.0.0"), &[]);
    assert_eq!(resp.status, 403, "body {:?}", resp.body_text());
    assert!(resp.body.is_empty(), "body {:?}", resp.body_text());
}

#[test]
fn missing_vsn_means_v1() {
    let server = Server::start(&[]);
    let mut c = Client::connect(&format!("ws://{}{WS}?apikey={}", server.addr, anon()));
    heartbeat_v1(&mut c, "1");
}

#[test]
fn vsn_2_0_x_means_v2_and_1_0_x_means_v1() {
    let server = Server::start(&[]);
    let mut c2 = Client::connect(&format!("ws://{}{WS}?apikey={}&vsn=2.0.1", server.addr, anon()));
    heartbeat_v2(&mut c2, "1");
    let mut c1 = Client::connect(&format!("ws://{}{WS}?apikey={}&vsn=1.0.3", server.addr, anon()));
    heartbeat_v1(&mut c1, "1");
}

#[test]
fn x_api_key_header_works_without_query_key() {
    let server = Server::start(&[]);
    let resp = upgrade(server.addr, &format!("{WS}?vsn=1.0.0"), &[("x-api-key", anon())]);
    assert_eq!(resp.status, 101, "body {:?}", resp.body_text());
    let mut c = Client::connect_with_headers(&format!("ws://{}{WS}?vsn=2.0.0", server.addr), &[("x-api-key", anon())]);
    heartbeat_v2(&mut c, "1");
}

#[test]
fn x_api_key_header_takes_precedence_over_query() {
    let server = Server::start(&[]);
    // Good header, garbage query: accepted.
    let resp = upgrade(server.addr, &format!("{WS}?apikey=garbage&vsn=1.0.0"), &[("x-api-key", anon())]);
    assert_eq!(resp.status, 101, "body {:?}", resp.body_text());
    // Garbage header, good query: refused.
    let resp = upgrade(server.addr, &format!("{WS}?apikey={}&vsn=1.0.0", anon()), &[("x-api-key", "garbage")]);
    assert_json_error(&resp, 401, "The token provided is not a valid JWT");
}

#[test]
fn token_is_cleaned_of_url_encoded_whitespace() {
    // §1.3: URL-decoded, then all whitespace removed.
    let server = Server::start(&[]);
    let key = anon();
    let (a, b) = key.split_at(key.len() / 2);
    let resp = upgrade(server.addr, &format!("{WS}?apikey={a}%0A%20{b}&vsn=1.0.0"), &[]);
    assert_eq!(resp.status, 101, "body {:?}", resp.body_text());
}

#[test]
fn both_websocket_paths_work() {
    let server = Server::start(&[]);
    for path in ["/realtime/v1/websocket", "/socket/websocket"] {
        let resp = upgrade(server.addr, &format!("{path}?apikey={}&vsn=2.0.0", anon()), &[]);
        assert_eq!(resp.status, 101, "{path}: body {:?}", resp.body_text());
        let mut c = Client::connect(&format!("ws://{}{path}?apikey={}&vsn=2.0.0", server.addr, anon()));
        heartbeat_v2(&mut c, "1");
        join_v2(&mut c, "realtime:room1", "2", config(false, false));
    }
}

#[test]
fn both_paths_share_channels() {
    let server = Server::start(&[]);
    let mut a = Client::connect(&format!("ws://{}/socket/websocket?apikey={}&vsn=1.0.0", server.addr, anon()));
    let mut b = Client::connect(&format!("ws://{}/realtime/v1/websocket?apikey={}&vsn=1.0.0", server.addr, anon()));
    join_v1(&mut a, "realtime:room1", "1", config(false, false));
    join_v1(&mut b, "realtime:room1", "1", config(false, false));
    let msg = user_broadcast("e", json!({"n": 1}));
    a.send_text(&v1j("realtime:room1", "broadcast", msg.clone(), Some("2"), Some("1")));
    assert_eq!(b.recv_json(WAIT), v1_frame("realtime:room1", "broadcast", msg, None));
}

#[test]
fn websocket_errors_also_on_socket_path() {
    let server = Server::start(&[]);
    let resp = upgrade(server.addr, "/socket/websocket?vsn=1.0.0", &[]);
    assert_json_error(&resp, 401, "API key is missing");
}

#[test]
fn non_get_on_websocket_path_is_400() {
    let server = Server::start(&[]);
    let resp = raw_http(server.addr, "POST", &format!("{WS}?apikey={}&vsn=1.0.0", anon()), true, &[("Content-Length", "0")]);
    assert_eq!(resp.status, 400, "body {:?}", resp.body_text());
}

#[test]
fn get_without_upgrade_headers_is_400() {
    let server = Server::start(&[]);
    let resp = raw_http(server.addr, "GET", &format!("{WS}?apikey={}&vsn=1.0.0", anon()), false, &[]);
    assert_eq!(resp.status, 400, "body {:?}", resp.body_text());
}

#[test]
fn healthz_is_200() {
    let server = Server::start(&[]);
    let (status, _) = support::http_request(server.addr, "GET", "/healthz", &[], b"").expect("healthz");
    assert_eq!(status, 200);
    let resp = raw_http(server.addr, "GET", "/healthz", false, &[]);
    assert_eq!(resp.status, 200);
}

#[test]
fn unknown_path_is_404_with_json_body() {
    let server = Server::start(&[]);
    let resp = raw_http(server.addr, "GET", "/no/such/path", false, &[]);
    assert_eq!(resp.status, 404, "body {:?}", resp.body_text());
    let body = resp.body_json();
    assert!(body.is_object(), "404 body is a JSON object: {body}");
    // An upgrade attempt on an unknown path is not a WebSocket either.
    let resp = upgrade(server.addr, &format!("/nope/websocket?apikey={}&vsn=1.0.0", anon()), &[]);
    assert_eq!(resp.status, 404, "body {:?}", resp.body_text());
}

#[test]
fn server_survives_a_burst_of_refused_upgrades() {
    let mut server = Server::start(&[]);
    for i in 0..50 {
        let target = match i % 4 {
            0 => format!("{WS}?vsn=1.0.0"),
            1 => format!("{WS}?apikey=garbage&vsn=1.0.0"),
            2 => format!("{WS}?apikey={}&vsn=9.9.9", anon()),
            _ => format!("{WS}?apikey=a.b.c&vsn=2.0.0"),
        };
        let resp = upgrade(server.addr, &target, &[]);
        assert!(matches!(resp.status, 401 | 403), "{target}: {}", resp.status);
    }
    assert!(server.is_running());
    let mut c = connect_v2(&server);
    heartbeat_v2(&mut c, "1");
}
