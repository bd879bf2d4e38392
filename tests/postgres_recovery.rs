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
