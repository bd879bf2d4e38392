//! Surviving the database: a PostgreSQL restart and the publication being dropped and
//! recreated. Subscribers are told (a `system` error when the stream drops, a new "Subscribed to
//! PostgreSQL" when it is back) and changes committed afterwards arrive; the server never exits.

mod support;

use std::time::{Duration, Instant};

use replication::cluster::Cluster;
use serde_json::{json, Value};
use support::{service_key, Server};

type Socket = tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<std::net::TcpStream>>;

fn next_matching(socket: &mut Socket, within: Duration, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + within;
    loop {
        assert!(Instant::now() < deadline, "expected frame not seen in {within:?}");
        if let Ok(tungstenite::Message::Text(text)) = socket.read() {
            let value: Value = serde_json::from_str(&text).unwrap();
            if pred(&value) {
                return value;
            }
        }
    }
}

fn is_status(value: &Value, status: &str) -> bool {
    value[3] == "system" && value[4]["extension"] == "postgres_changes" && value[4]["status"] == status
}

#[test]
fn restart_and_publication_recreate_are_survived() {
    let (cluster, _guard) = Cluster::throwaway().expect("PostgreSQL 15");
    cluster
        .psql("create role anon nologin; create role authenticated nologin; create role service_role nologin bypassrls; \
               create table events (id int primary key); grant select on events to service_role; \
               create publication supabase_realtime for table events;")
        .unwrap();
    let mut server = Server::start(&[("DATABASE_URL", &cluster.url())]);
    let (mut socket, _) = tungstenite::connect(server.ws_url(&service_key(), "2.0.0")).unwrap();
    if let tungstenite::stream::MaybeTlsStream::Plain(stream) = socket.get_mut() {
        stream.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    }
    let join = json!(["1", "1", "realtime:ev", "phx_join", {"config": {"postgres_changes": [{"event": "INSERT", "schema": "public", "table": "events"}]}}]);
    socket.send(tungstenite::Message::text(join.to_string())).unwrap();
    next_matching(&mut socket, Duration::from_secs(15), |v| is_status(v, "ok"));
    cluster.psql("insert into events values (1)").unwrap();
    let change = next_matching(&mut socket, Duration::from_secs(10), |v| v[3] == "postgres_changes");
    assert_eq!(change[4]["data"]["record"], json!({"id": 1}));

    // 1. PostgreSQL restarts (same data, same port).
    let port = cluster.port();
    let data_dir = cluster.data_dir().to_path_buf();
    let mut cluster = cluster;
    cluster.stop();
    next_matching(&mut socket, Duration::from_secs(15), |v| is_status(v, "error"));
    let cluster = Cluster::start(&data_dir, port).expect("restart PostgreSQL");
    next_matching(&mut socket, Duration::from_secs(30), |v| is_status(v, "ok"));
    cluster.psql("insert into events values (2)").unwrap();
    let change = next_matching(&mut socket, Duration::from_secs(10), |v| v[3] == "postgres_changes");
    assert_eq!(change[4]["data"]["record"], json!({"id": 2}));

    // 2. The publication is dropped, then recreated.
    cluster.psql("drop publication supabase_realtime").unwrap();
    cluster.psql("insert into events values (3)").unwrap(); // makes the walsender notice
    cluster.psql("create publication supabase_realtime for table events").unwrap();
    next_matching(&mut socket, Duration::from_secs(30), |v| is_status(v, "ok"));
    cluster.psql("insert into events values (4)").unwrap();
    let change = next_matching(&mut socket, Duration::from_secs(10), |v| v[3] == "postgres_changes" && v[4]["data"]["record"]["id"] == 4);
    assert_eq!(change[4]["data"]["type"], json!("INSERT"));
    assert!(server.is_running());
    drop(cluster);
}

/// A definite error (here a password that no longer works) is not retried: subscribers are told
/// that Postgres Changes stopped, `/healthz` answers 503, and nothing reconnects even once the
/// password works again (a retrying reader would, within seconds).
#[test]
fn a_wrong_password_stops_retrying_with_a_clear_message() {
    let (cluster, _guard) = Cluster::throwaway().expect("PostgreSQL 15");
    cluster
        .psql("create role anon nologin; create role authenticated nologin; create role service_role nologin bypassrls; \
               create role powa login superuser password 'right'; \
               create table events (id int primary key); grant select on events to service_role; \
               create publication supabase_realtime for table events;")
        .unwrap();
    // The server's own user authenticates with a password (the rest of the cluster trusts).
    let hba_path = cluster.data_dir().join("pg_hba.conf");
    let hba = std::fs::read_to_string(&hba_path).unwrap();
    std::fs::write(&hba_path, format!("host all powa 127.0.0.1/32 scram-sha-256\nhost replication powa 127.0.0.1/32 scram-sha-256\n{hba}")).unwrap();
    cluster.psql("select pg_reload_conf()").unwrap();
    let url = format!("postgres://powa:right@127.0.0.1:{}/postgres", cluster.port());
    let mut server = Server::start(&[("DATABASE_URL", &url)]);
    let (mut socket, _) = tungstenite::connect(server.ws_url(&service_key(), "2.0.0")).unwrap();
    if let tungstenite::stream::MaybeTlsStream::Plain(stream) = socket.get_mut() {
        stream.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    }
    let join = json!(["1", "1", "realtime:ev", "phx_join", {"config": {"postgres_changes": [{"event": "INSERT", "schema": "public", "table": "events"}]}}]);
    socket.send(tungstenite::Message::text(join.to_string())).unwrap();
    next_matching(&mut socket, Duration::from_secs(15), |v| is_status(v, "ok"));

    cluster.psql("alter role powa password 'changed'; select pg_terminate_backend(pid) from pg_stat_activity where usename = 'powa'").unwrap();
    let stopped = next_matching(&mut socket, Duration::from_secs(20), |v| {
        is_status(v, "error") && v[4]["message"].as_str().is_some_and(|m| m.starts_with("Postgres Changes stopped"))
    });
    assert_eq!(
        stopped[4]["message"],
        "Postgres Changes stopped: the server cannot use its database connection settings; changes are not delivered until the server is reconfigured and restarted"
    );
    let (status, _) = support::http_request(server.addr, "GET", "/healthz", &[], b"").unwrap();
    assert_eq!(status, 503);

    // The password works again: a reader that kept retrying would be back within seconds.
    cluster.psql("alter role powa password 'right'").unwrap();
    let deadline = Instant::now() + Duration::from_secs(6);
    while Instant::now() < deadline {
        if let Ok(tungstenite::Message::Text(text)) = socket.read() {
            let value: Value = serde_json::from_str(&text).unwrap();
            assert!(!is_status(&value, "ok"), "the stream came back after a definite error: {value}");
        }
    }
    // A new subscription is told at once.
    let join = json!(["2", "2", "realtime:ev2", "phx_join", {"config": {"postgres_changes": [{"event": "*", "schema": "public", "table": "events"}]}}]);
    socket.send(tungstenite::Message::text(join.to_string())).unwrap();
    let told = next_matching(&mut socket, Duration::from_secs(10), |v| v[2] == "realtime:ev2" && is_status(v, "error"));
    assert!(told[4]["message"].as_str().unwrap().starts_with("Postgres Changes stopped"), "{told}");
    assert!(server.is_running());
}
