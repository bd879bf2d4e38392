//! The tenant API (CONTRACT.md "Tenant API"; issue 13 item 5) against a real PostgreSQL
//! control database (`REALTIME_CONTROL_DATABASE_URL`), and read-only over a tenants file.

mod pgsupport;
mod support;
mod wsclient;

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use support::{http_request_host, Server};
use wsclient::{v1, Client, Frame};

const API_SECRET: &str = "api-secret-0123456789-abcdefghijklmnopqrstuvwxyz";
const WAIT: Duration = Duration::from_secs(5);

fn token_for(secret: &str, role: &str) -> String {
    support::token_signed(secret, role)
}

/// Calls the API; returns (status, body as JSON or null).
fn api(server: &Server, method: &str, path: &str, bearer: Option<&str>, body: &Value) -> (u16, Value) {
    let bearer = bearer.map(|b| format!("Bearer {b}"));
    let mut headers: Vec<(&str, &str)> = vec![("Content-Type", "application/json")];
    if let Some(b) = &bearer {
        headers.push(("Authorization", b));
    }
    let body = if body.is_null() { Vec::new() } else { body.to_string().into_bytes() };
    let (status, response) = http_request_host(server.addr, "localhost", method, path, &headers, &body).unwrap();
    (status, serde_json::from_slice(&response).unwrap_or(Value::Null))
}

fn connect(server: &Server, tenant: &str, secret: &str) -> Result<Client, (u16, String)> {
    let url = format!("ws://{}/realtime/v1/websocket?apikey={}&vsn=1.0.0", server.addr, token_for(secret, "anon"));
    Client::try_connect_host(&url, &format!("{tenant}.localhost"))
}

fn join(client: &mut Client, topic: &str) -> Value {
    client.send_text(&v1(topic, "phx_join", json!({"config": {}}), Some("1")));
    loop {
        let frame = client.recv_json(WAIT);
        if frame["event"] == "phx_reply" && frame["ref"] == "1" {
            return frame;
        }
    }
}

fn next_event(client: &mut Client, event: &str) -> Option<Value> {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        match client.recv_frame(deadline - Instant::now()) {
            Frame::Text(text) => {
                let frame: Value = serde_json::from_str(&text).unwrap();
                if frame["event"] == event {
                    return Some(frame);
                }
            }
            other => panic!("waiting for {event}: {}", wsclient::describe(&other)),
        }
    }
    None
}

#[test]
fn tenant_api_over_the_control_database() {
    let mut db = pgsupport::Db::new();
    let server = Server::start(&[("REALTIME_CONTROL_DATABASE_URL", &db.url()), ("API_JWT_SECRET", API_SECRET), ("JWT_SECRET", "")]);
    let admin = token_for(API_SECRET, "admin");
    let acme_secret = "acme-secret-0123456789-abcdefghijklmnopqrstuvwxyz";
    let globex_secret = "globex-secret-0123456789-abcdefghijklmnopqrstuvwxyz";

    // A bad or missing bearer: 403, empty body.
    assert_eq!(api(&server, "GET", "/api/tenants", None, &Value::Null), (403, Value::Null));
    assert_eq!(api(&server, "GET", "/api/tenants", Some(&token_for("wrong", "admin")), &Value::Null), (403, Value::Null));
    // Empty at first; no tenant yet → unknown Host.
    assert_eq!(api(&server, "GET", "/api/tenants", Some(&admin), &Value::Null), (200, json!({"data": []})));
    assert!(matches!(connect(&server, "acme", acme_secret), Err((404, _))));

    // Create (201 + location), with the database given upstream's way; secrets never returned.
    let create = json!({"tenant": {
        "external_id": "acme", "name": "Acme", "jwt_secret": acme_secret, "max_channels_per_client": 3,
        "extensions": [{"type": "postgres_cdc_rls", "settings": {"db_host": "127.0.0.1", "db_port": "5432", "db_name": "postgres", "db_user": "realtime", "db_password": "hunter2", "region": "local"}}]
    }});
    let (status, body) = api(&server, "POST", "/api/tenants", Some(&admin), &create);
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["data"]["external_id"], "acme");
    assert_eq!(body["data"]["max_channels_per_client"], 3);
    assert_eq!(body["data"]["max_concurrent_users"], 200, "omitted limits take upstream's defaults");
    let shown = body.to_string();
    assert!(!shown.contains(acme_secret) && !shown.contains("hunter2"), "{shown}");
    let (status, _) = api(&server, "POST", "/api/tenants", Some(&admin), &json!({"tenant": {"external_id": "globex", "jwt_secret": globex_secret}}));
    assert_eq!(status, 201);
    // Stored in _realtime.tenants (migrated by the server).
    assert_eq!(db.one("SELECT string_agg(external_id, ',' ORDER BY external_id) FROM _realtime.tenants"), "acme,globex");
    assert_eq!(db.one("SELECT max(version) FROM _realtime.schema_migrations"), "1");

    // Live: both tenants serve at once.
    let mut acme = connect(&server, "acme", acme_secret).expect("acme serves right after its creation");
    let mut globex = connect(&server, "globex", globex_secret).expect("globex serves");
    assert_eq!(join(&mut acme, "realtime:a")["payload"]["status"], "ok");
    assert_eq!(join(&mut globex, "realtime:a")["payload"]["status"], "ok");

    // Read: one and all, no secrets.
    let (status, one) = api(&server, "GET", "/api/tenants/acme", Some(&admin), &Value::Null);
    assert_eq!((status, &one["data"]["name"]), (200, &json!("Acme")));
    assert!(one["data"]["extensions"][0]["settings"].get("db_password").is_none());
    assert_eq!(api(&server, "GET", "/api/tenants/initech", Some(&admin), &Value::Null), (404, json!({"message": "not found"})));
    let (_, all) = api(&server, "GET", "/api/tenants", Some(&admin), &Value::Null);
    assert_eq!(all["data"].as_array().unwrap().len(), 2);

    // Update a limit live (200): applies without disconnecting.
    let (status, body) = api(&server, "PATCH", "/api/tenants/acme", Some(&admin), &json!({"tenant": {"max_channels_per_client": 1}}));
    assert_eq!((status, &body["data"]["max_channels_per_client"]), (200, &json!(1)));
    let reply = join(&mut acme, "realtime:b");
    assert_eq!(reply["payload"]["response"]["reason"], "ChannelRateLimitReached: Too many channels");

    // Malformed bodies: 422 naming the field.
    let (status, body) = api(&server, "PUT", "/api/tenants/acme", Some(&admin), &json!({"tenant": {"max_concurrent_users": "lots"}}));
    assert_eq!((status, body), (422, json!({"errors": {"max_concurrent_users": ["is invalid"]}})));
    let (status, body) = api(&server, "POST", "/api/tenants", Some(&admin), &json!({"tenant": {"external_id": "Not A Host!", "jwt_secret": "s"}}));
    assert_eq!(status, 422);
    assert!(body["errors"]["external_id"].is_array(), "{body}");
    let (status, body) = api(&server, "POST", "/api/tenants", Some(&admin), &json!({"nothing": 1}));
    assert_eq!((status, body), (422, json!({"errors": {"tenant": ["can't be blank"]}})));

    // Change globex's secret: its sockets get "Server requested disconnect" + 1012; acme's stay.
    let rotated = "globex-rotated-0123456789-abcdefghijklmnopqrstuvwxyz";
    let (status, _) = api(&server, "PUT", "/api/tenants/globex", Some(&admin), &json!({"tenant": {"jwt_secret": rotated}}));
    assert_eq!(status, 200);
    assert_eq!(next_event(&mut globex, "system").expect("disconnect notice")["payload"]["message"], "Server requested disconnect");
    assert_eq!(globex.recv_close(WAIT), Some(1012));
    acme.send_text(&v1("phoenix", "heartbeat", json!({}), Some("hb")));
    assert_eq!(next_event(&mut acme, "phx_reply").unwrap()["ref"], "hb", "acme's socket is still up");
    assert!(matches!(connect(&server, "globex", globex_secret), Err((401, _))));
    let mut globex = connect(&server, "globex", rotated).expect("the new secret is live");
    assert_eq!(join(&mut globex, "realtime:a")["payload"]["status"], "ok");

    // Health, reload (disconnects), delete (204, also for a missing tenant).
    let (status, health) = api(&server, "GET", "/api/tenants/globex/health", Some(&admin), &Value::Null);
    assert_eq!((status, &health["data"]["healthy"]), (200, &json!(true)));
    assert_eq!(api(&server, "DELETE", "/api/tenants/globex", Some(&admin), &Value::Null).0, 204);
    assert_eq!(next_event(&mut globex, "system").unwrap()["payload"]["message"], "Server requested disconnect");
    assert_eq!(api(&server, "DELETE", "/api/tenants/globex", Some(&admin), &Value::Null).0, 204);
    assert!(matches!(connect(&server, "globex", rotated), Err((404, _))));
    assert_eq!(api(&server, "POST", "/api/tenants/acme/reload", Some(&admin), &Value::Null).0, 204);
    assert_eq!(next_event(&mut acme, "system").unwrap()["payload"]["message"], "Server requested disconnect");

    // A write made straight in the table (another node) is live within a second.
    db.exec("INSERT INTO _realtime.tenants (external_id, config) VALUES ('hooli', '{\"external_id\": \"hooli\", \"jwt_secret\": \"hooli-secret-0123456789-abcdefghijklmnopqrstuvwxyz\"}')");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match connect(&server, "hooli", "hooli-secret-0123456789-abcdefghijklmnopqrstuvwxyz") {
            Ok(_) => break,
            Err(error) => assert!(Instant::now() < deadline, "a row written by another node is picked up within a second: {error:?}"),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // A second server on the same control database sees the same tenants at start.
    let second = Server::start(&[("REALTIME_CONTROL_DATABASE_URL", &db.url()), ("JWT_SECRET", "")]);
    assert!(connect(&second, "hooli", "hooli-secret-0123456789-abcdefghijklmnopqrstuvwxyz").is_ok());
    assert_eq!(api(&second, "GET", "/api/tenants", Some(&admin), &Value::Null).0, 404, "without API_JWT_SECRET the API is not served");
}

#[test]
fn tenant_api_is_read_only_over_a_tenants_file() {
    let dir = std::env::temp_dir().join(format!("powa-api-file-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tenants.toml");
    std::fs::write(&file, "[[tenant]]\nexternal_id = \"acme\"\njwt_secret = \"acme-secret-0123456789\"\nmax_events_per_second = 7\n").unwrap();
    let server = Server::start(&[("REALTIME_TENANTS", file.to_str().unwrap()), ("API_JWT_SECRET", API_SECRET), ("JWT_SECRET", "")]);
    let admin = token_for(API_SECRET, "admin");
    let (status, body) = api(&server, "GET", "/api/tenants/acme", Some(&admin), &Value::Null);
    assert_eq!((status, &body["data"]["max_events_per_second"]), (200, &json!(7)));
    assert!(!body.to_string().contains("acme-secret"));
    let (status, _) = api(&server, "POST", "/api/tenants", Some(&admin), &json!({"tenant": {"external_id": "x", "jwt_secret": "s"}}));
    assert_eq!(status, 405);
    assert_eq!(api(&server, "DELETE", "/api/tenants/acme", Some(&admin), &Value::Null).0, 405);
    assert_eq!(api(&server, "GET", "/api/tenants", None, &Value::Null), (403, Value::Null));
}
