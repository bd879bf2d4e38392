//! TLS to the project database: with `sslmode=require` against a PostgreSQL that has a
//! (self-signed) certificate, both the replication and the SQL connections are encrypted, and
//! Postgres Changes work end to end.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use replication::cluster::Cluster;
use serde_json::{json, Value};
use support::{service_key, Server};

fn enable_ssl(cluster: &Cluster) {
    let dir = cluster.data_dir();
    let status = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1"])
        .arg("-keyout")
        .arg(dir.join("server.key"))
        .arg("-out")
        .arg(dir.join("server.crt"))
        .output()
        .expect("openssl is needed to make the test certificate");
    assert!(status.status.success(), "openssl: {}", String::from_utf8_lossy(&status.stderr));
    if unsafe { libc::geteuid() } == 0 {
        for file in ["server.key", "server.crt"] {
            let owner = Command::new("chown").arg("postgres:postgres").arg(dir.join(file)).status().unwrap();
            assert!(owner.success());
        }
    }
    let mode = Command::new("chmod").arg("600").arg(dir.join("server.key")).status().unwrap();
    assert!(mode.success());
    cluster.psql("ALTER SYSTEM SET ssl = on").unwrap();
    cluster.psql("SELECT pg_reload_conf()").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while cluster.psql("SHOW ssl").unwrap().trim() != "on" {
        assert!(Instant::now() < deadline, "ssl did not turn on");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn changes_flow_over_tls_and_every_connection_is_encrypted() {
    let (cluster, _guard) = Cluster::throwaway().expect("PostgreSQL 15");
    enable_ssl(&cluster);
    cluster
        .psql("create role anon nologin; create role authenticated nologin; create role service_role nologin bypassrls; \
               create table notes (id int primary key, body text); grant select on notes to service_role; \
               create publication supabase_realtime for table notes;")
        .unwrap();
    let url = format!("{}?sslmode=require", cluster.url());
    let server = Server::start(&[("DATABASE_URL", &url)]);
    let (mut socket, _) = tungstenite::connect(server.ws_url(&service_key(), "2.0.0")).unwrap();
    if let tungstenite::stream::MaybeTlsStream::Plain(stream) = socket.get_mut() {
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    }
    let join = json!(["1", "1", "realtime:notes", "phx_join", {"config": {"postgres_changes": [{"event": "INSERT", "schema": "public", "table": "notes"}]}}]);
    socket.send(tungstenite::Message::text(join.to_string())).unwrap();
    let mut next = || -> Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            assert!(Instant::now() < deadline, "no frame in time");
            if let Ok(tungstenite::Message::Text(text)) = socket.read() {
                return serde_json::from_str(&text).unwrap();
            }
        }
    };
    assert_eq!(next()[4]["status"], json!("ok"));
    assert_eq!(next()[4]["message"], json!("Subscribed to PostgreSQL"));
    cluster.psql("insert into notes values (1, 'over tls')").unwrap();
    let change = next();
    assert_eq!(change[3], json!("postgres_changes"));
    assert_eq!(change[4]["data"]["record"], json!({"id": 1, "body": "over tls"}));
    // Every server connection (replication + SQL) is encrypted.
    let rows = cluster
        .psql("select count(*) filter (where s.ssl), count(*) filter (where not s.ssl) from pg_stat_ssl s join pg_stat_activity a using (pid) where a.application_name = 'powa-realtime'")
        .unwrap();
    let counts: Vec<i64> = rows.trim().split('|').map(|c| c.parse().unwrap()).collect();
    assert!(counts[0] >= 2, "encrypted server connections: {rows}");
    assert_eq!(counts[1], 0, "unencrypted server connections: {rows}");
}

#[test]
fn require_refuses_a_database_without_tls() {
    let (cluster, _guard) = Cluster::throwaway().expect("PostgreSQL 15");
    let output = Command::new(support::binary())
        .arg("serve")
        .env("JWT_SECRET", support::SECRET)
        .env("REALTIME_ADDR", format!("127.0.0.1:{}", support::free_port()))
        .env("DATABASE_URL", format!("{}?sslmode=require", cluster.url()))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("DATABASE_URL"), "{stderr}");
}
