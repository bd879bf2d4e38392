//! Multi-tenant mode with a database per tenant (issue 13 item 3): two tenants on two real
//! PostgreSQL databases, each feeding only its own subscribers (Postgres Changes and
//! `realtime.send`), and a tenant whose database does not exist failing alone.

mod pgsupport;
mod support;
mod wsclient;

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use support::{http_request, Server};
use wsclient::{v1, Client, Frame};

/// A tenant's first database need starts its replication stream (install, slot): generous.
const START: Duration = Duration::from_secs(40);

fn secret(tenant: &str) -> String {
    format!("{tenant}-secret-0123456789-abcdefghijklmnopqrstuvwxyz")
}

fn token_for(tenant: &str, role: &str) -> String {
    support::token_signed(&secret(tenant), role)
}

fn connect(server: &Server, tenant: &str) -> Client {
    let url = format!("ws://{}/realtime/v1/websocket?apikey={}&vsn=1.0.0", server.addr, token_for(tenant, "service_role"));
    Client::connect_host(&url, &format!("{tenant}.localhost"))
}

/// Joins `topic` with a Postgres Changes binding on `public.todos`; returns the ok reply.
fn join_changes(client: &mut Client, topic: &str) {
    let config = json!({"broadcast": {"self": false}, "postgres_changes": [{"event": "*", "schema": "public", "table": "todos"}]});
    client.send_text(&v1(topic, "phx_join", json!({ "config": config }), Some("1")));
    let reply = next(client, |f| f["event"] == "phx_reply", Duration::from_secs(10)).expect("join reply");
    assert_eq!(reply["payload"]["status"], "ok", "{reply}");
}

/// The next frame matching `want` within `timeout`.
fn next(client: &mut Client, want: impl Fn(&Value) -> bool, timeout: Duration) -> Option<Value> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        match client.recv_frame(deadline - Instant::now()) {
            Frame::Text(text) => {
                let frame: Value = serde_json::from_str(&text).unwrap();
                if want(&frame) {
                    return Some(frame);
                }
            }
            Frame::Timeout => return None,
            other => panic!("unexpected frame: {}", wsclient::describe(&other)),
        }
    }
    None
}

fn system(client: &mut Client) -> Value {
    next(client, |f| f["event"] == "system" && f["payload"]["extension"] == "postgres_changes", START).expect("a postgres_changes system message")
}

fn change(client: &mut Client, timeout: Duration) -> Option<Value> {
    next(client, |f| f["event"] == "postgres_changes", timeout)
}

#[test]
fn each_tenants_database_feeds_only_its_own_subscribers() {
    let mut db = pgsupport::Db::new();
    // The API roles (cluster-wide; the server's install keeps existing ones), so that the
    // tables can be granted before anyone subscribes.
    db.exec("CREATE ROLE anon NOLOGIN; CREATE ROLE authenticated NOLOGIN; CREATE ROLE service_role NOLOGIN BYPASSRLS");
    for name in ["acme", "globex"] {
        db.exec(&format!("CREATE DATABASE {name}"));
        db.exec(&format!("\\c {name}"));
        db.exec("CREATE TABLE public.todos (id bigint PRIMARY KEY, title text NOT NULL)");
        db.exec("CREATE PUBLICATION supabase_realtime FOR TABLE public.todos");
        db.exec("GRANT SELECT ON public.todos TO anon, authenticated, service_role");
    }
    let port = db.cluster.port();
    let dir = std::env::temp_dir().join(format!("powa-mt-pg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tenants.toml");
    let mut text = String::new();
    for (tenant, database) in [("acme", "acme"), ("globex", "globex"), ("initech", "no_such_database")] {
        text.push_str(&format!(
            "[[tenant]]\nexternal_id = \"{tenant}\"\njwt_secret = \"{}\"\ndatabase_url = \"postgres://postgres@127.0.0.1:{port}/{database}\"\n\n",
            secret(tenant)
        ));
    }
    std::fs::write(&file, text).unwrap();
    let server = Server::start(&[("REALTIME_TENANTS", file.to_str().unwrap()), ("JWT_SECRET", ""), ("REALTIME_SLOT_NAME", "mt")]);

    let mut acme = connect(&server, "acme");
    let mut globex = connect(&server, "globex");
    join_changes(&mut acme, "realtime:todos");
    join_changes(&mut globex, "realtime:todos");
    assert_eq!(system(&mut acme)["payload"]["status"], "ok", "acme's stream starts on its first need");
    assert_eq!(system(&mut globex)["payload"]["status"], "ok");

    // A tenant whose database does not exist: its subscription fails, alone.
    let mut initech = connect(&server, "initech");
    join_changes(&mut initech, "realtime:todos");
    let failed = system(&mut initech);
    assert_eq!(failed["payload"]["status"], "error", "{failed}");

    // Each database's rows reach only its tenant, though every name is the same.
    db.exec("\\c acme");
    db.exec("INSERT INTO public.todos VALUES (1, 'acme todo')");
    db.exec("SELECT realtime.send('{\"from\": \"acme sql\"}'::jsonb, 'note', 'todos', false)");
    let row = change(&mut acme, Duration::from_secs(15)).expect("acme's row reaches acme");
    assert_eq!(row["payload"]["data"]["record"]["title"], "acme todo", "{row}");
    let note = next(&mut acme, |f| f["event"] == "broadcast", Duration::from_secs(15)).expect("acme's realtime.send reaches acme");
    assert_eq!(note["payload"]["payload"]["from"], "acme sql");
    db.exec("\\c globex");
    db.exec("INSERT INTO public.todos VALUES (1, 'globex todo')");
    let row = change(&mut globex, Duration::from_secs(15)).expect("globex's row reaches globex");
    assert_eq!(row["payload"]["data"]["record"]["title"], "globex todo", "globex never gets acme's row first");
    assert!(change(&mut acme, Duration::from_millis(800)).is_none(), "acme never gets globex's row");
    assert!(next(&mut globex, |f| f["event"] == "broadcast", Duration::from_millis(300)).is_none(), "globex never gets acme's realtime.send");

    // Each tenant has its own slot, named after it.
    db.exec("\\c postgres");
    let slots = db.one("SELECT string_agg(slot_name, ',' ORDER BY slot_name) FROM pg_replication_slots");
    assert!(slots.contains("mt_acme_") && slots.contains("mt_globex_"), "{slots}");
    // The fleet reports its tenants.
    let (_, metrics) = http_request(server.addr, "GET", "/metrics", &[], b"").unwrap();
    let metrics = String::from_utf8(metrics).unwrap();
    assert!(metrics.contains("realtime_tenant_databases{state=\"running\"} 2"), "{metrics}");

    // Globex removed from the file: its sockets are disconnected and its stream stops at once,
    // dropping its slot; acme streams on.
    let text = format!("[[tenant]]\nexternal_id = \"acme\"\njwt_secret = \"{}\"\ndatabase_url = \"postgres://postgres@127.0.0.1:{port}/acme\"\n", secret("acme"));
    std::fs::write(&file, text).unwrap();
    server.signal(libc::SIGHUP);
    let notice = next(&mut globex, |f| f["event"] == "system" && f["payload"]["message"] == "Server requested disconnect", Duration::from_secs(5));
    assert!(notice.is_some(), "globex's socket is told to go");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let slots = db.one("SELECT coalesce(string_agg(slot_name, ',' ORDER BY slot_name), '') FROM pg_replication_slots");
        if !slots.contains("mt_globex_") {
            assert!(slots.contains("mt_acme_"), "{slots}");
            break;
        }
        assert!(Instant::now() < deadline, "globex's slot outlived its tenant: {slots}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Closing globex's sockets unsubscribes their channels; that must not start a stream again
    // for the removed tenant (found by review: it did, as `tenant-N`, slot and all). The socket
    // is closed by now (it got its notice); the fleet must settle at acme's stream alone.
    drop(globex);
    std::thread::sleep(Duration::from_secs(2));
    let slots = db.one("SELECT coalesce(string_agg(slot_name, ',' ORDER BY slot_name), '') FROM pg_replication_slots");
    assert!(slots.starts_with("mt_acme_") && !slots.contains(','), "only acme streams: {slots}");
    let (_, metrics) = http_request(server.addr, "GET", "/metrics", &[], b"").unwrap();
    let metrics = String::from_utf8(metrics).unwrap();
    assert!(metrics.contains("realtime_tenant_databases{state=\"running\"} 1"), "{metrics}");
    db.exec("\\c acme");
    db.exec("INSERT INTO public.todos VALUES (2, 'still streaming')");
    let row = change(&mut acme, Duration::from_secs(15)).expect("acme streams on");
    assert_eq!(row["payload"]["data"]["record"]["title"], "still streaming");
}
