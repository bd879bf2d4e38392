//! TLS on the listener (`REALTIME_TLS_CERT`, `REALTIME_TLS_KEY`): `wss://` and `https://` on one
//! port with a CA made in the test (openssl CLI), the official clients over `wss://`, a plain
//! HTTP client on the TLS port, a reload on SIGHUP that keeps live connections, and files that
//! refuse to start.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};
use tungstenite::Message;

use support::python::{python_with_realtime, repo_dir, PyScript};
use support::{free_port, node, Server};

/// A directory with a test CA and a server pair signed by it, removed on drop.
struct Pki {
    dir: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl").args(args).current_dir(dir).output().expect("the openssl CLI is required by the TLS tests");
    assert!(output.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
}

impl Pki {
    fn new(name: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("powa-tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        openssl(
            &dir,
            &[
                "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
                "-subj", "/CN=powa test CA", "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign",
            ],
        );
        std::fs::write(dir.join("ext.cnf"), "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n").unwrap();
        let pki = Pki { dir };
        pki.issue("server", "localhost");
        pki
    }

    /// Makes `<name>.key` and `<name>.pem` (signed by the CA).
    fn issue(&self, name: &str, cn: &str) {
        let key = format!("{name}.key");
        let csr = format!("{name}.csr");
        let pem = format!("{name}.pem");
        openssl(&self.dir, &["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", &key, "-out", &csr, "-subj", &format!("/CN={cn}")]);
        openssl(&self.dir, &["x509", "-req", "-in", &csr, "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", &pem, "-days", "2", "-extfile", "ext.cnf"]);
    }

    fn path(&self, file: &str) -> String {
        self.dir.join(file).to_string_lossy().into_owned()
    }

    fn client_config(&self, versions: &[&'static rustls::SupportedProtocolVersion]) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(self.dir.join("ca.pem")).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

fn tls_connect(addr: SocketAddr, config: &Arc<rustls::ClientConfig>) -> std::io::Result<Tls> {
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    let connection = rustls::ClientConnection::new(Arc::clone(config), ServerName::try_from("localhost").unwrap().to_owned()).map_err(std::io::Error::other)?;
    let mut stream = rustls::StreamOwned::new(connection, tcp);
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock)?;
    }
    Ok(stream)
}

/// One HTTPS request; returns (status, body).
fn https(addr: SocketAddr, config: &Arc<rustls::ClientConfig>, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> std::io::Result<(u16, String)> {
    let mut stream = tls_connect(addr, config)?;
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes())?;
    stream.write_all(body)?;
    let mut response = Vec::new();
    // The server closes after the response (without close_notify: an unexpected EOF is fine).
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| std::io::Error::other(format!("no status line in {text:?}")))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// Starts a TLS server and waits until `/healthz` answers 200 over HTTPS.
fn start_tls(pki: &Pki) -> Server {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let (cert, key) = (pki.path("server.pem"), pki.path("server.key"));
    let mut server = Server::spawn_on(addr, &[("REALTIME_TLS_CERT", &cert), ("REALTIME_TLS_KEY", &key)]);
    let config = pki.client_config(&[&rustls::version::TLS13]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        assert!(server.is_running(), "the TLS server exited early");
        if let Ok((200, _)) = https(addr, &config, "GET", "/healthz", &[], b"") {
            return server;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the TLS server did not answer /healthz within 20 s");
}

/// A WebSocket over TLS.
fn wss(server: &Server, config: &Arc<rustls::ClientConfig>) -> tungstenite::WebSocket<Tls> {
    let stream = tls_connect(server.addr, config).expect("TLS connect");
    let url = format!("ws://localhost:{}/realtime/v1/websocket?apikey={}&vsn=1.0.0", server.addr.port(), support::anon_key());
    let (ws, _) = tungstenite::client::client(url, stream).expect("WebSocket handshake over TLS");
    ws
}

fn read_json(ws: &mut tungstenite::WebSocket<Tls>) -> Value {
    loop {
        match ws.read().expect("read") {
            Message::Text(text) => return serde_json::from_str(text.as_str()).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn join_and_echo(ws: &mut tungstenite::WebSocket<Tls>, topic: &str) {
    let join = json!({"topic": topic, "event": "phx_join", "payload": {"config": {"broadcast": {"self": true}}}, "ref": "1", "join_ref": "1"});
    ws.send(Message::text(join.to_string())).unwrap();
    let reply = read_json(ws);
    assert_eq!(reply["payload"]["status"], "ok", "{reply}");
    let message = json!({"topic": topic, "event": "broadcast", "payload": {"type": "broadcast", "event": "e", "payload": {"over": "tls"}}, "ref": "2", "join_ref": "1"});
    ws.send(Message::text(message.to_string())).unwrap();
    let echoed = read_json(ws);
    assert_eq!(echoed["payload"]["payload"], json!({"over": "tls"}), "{echoed}");
}

#[test]
fn wss_and_https_share_the_port_with_tls_1_2_and_1_3() {
    let pki = Pki::new("basic");
    let mut server = start_tls(&pki);
    for versions in [&[&rustls::version::TLS13][..], &[&rustls::version::TLS12][..]] {
        let config = pki.client_config(versions);
        let stream = tls_connect(server.addr, &config).unwrap();
        assert_eq!(stream.conn.alpn_protocol(), Some(&b"http/1.1"[..]));
        assert_eq!(stream.conn.protocol_version(), Some(versions[0].version));
        let mut ws = wss(&server, &config);
        join_and_echo(&mut ws, "realtime:tls-room");
        let key = support::service_key();
        let body = json!({"messages": [{"topic": "tls-room", "event": "rest", "payload": {"via": "https"}}]}).to_string();
        let (status, _) = https(server.addr, &config, "POST", "/api/broadcast", &[("Authorization", &format!("Bearer {key}")), ("Content-Type", "application/json")], body.as_bytes()).unwrap();
        assert_eq!(status, 202);
        let got = read_json(&mut ws);
        assert_eq!(got["payload"]["payload"], json!({"via": "https"}), "{got}");
        let (status, metrics) = https(server.addr, &config, "GET", "/metrics", &[], b"").unwrap();
        assert_eq!(status, 200);
        assert!(metrics.contains("realtime_connections "), "{metrics}");
    }
    assert!(server.is_running());
}

#[test]
fn a_plain_http_client_on_the_tls_port_gets_a_clean_close() {
    let pki = Pki::new("plain");
    let mut server = start_tls(&pki);
    let mut tcp = TcpStream::connect(server.addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    let result = tcp.read_to_end(&mut answer);
    assert!(result.is_ok(), "expected the server to close the connection, got {result:?}");
    assert!(started.elapsed() < Duration::from_secs(4));
    assert!(!answer.starts_with(b"HTTP/"), "plain HTTP must not be answered on the TLS port");
    // The server is unharmed.
    let config = pki.client_config(&[&rustls::version::TLS13]);
    assert_eq!(https(server.addr, &config, "GET", "/healthz", &[], b"").unwrap().0, 200);
    assert!(server.is_running());
}

fn end_entity(stream: &Tls) -> Vec<u8> {
    stream.conn.peer_certificates().expect("peer certificates")[0].as_ref().to_vec()
}

fn pem_der(path: &str) -> Vec<u8> {
    CertificateDer::from_pem_file(path).unwrap().as_ref().to_vec()
}

#[test]
fn sighup_reloads_the_pair_and_keeps_live_connections() {
    let pki = Pki::new("reload");
    let server = start_tls(&pki);
    let config = pki.client_config(&[&rustls::version::TLS13]);
    let first = pem_der(&pki.path("server.pem"));
    assert_eq!(end_entity(&tls_connect(server.addr, &config).unwrap()), first);
    let mut live = wss(&server, &config);
    join_and_echo(&mut live, "realtime:reload");

    pki.issue("next", "localhost");
    std::fs::copy(pki.path("next.pem"), pki.path("server.pem")).unwrap();
    std::fs::copy(pki.path("next.key"), pki.path("server.key")).unwrap();
    let second = pem_der(&pki.path("server.pem"));
    assert_ne!(first, second);
    server.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if end_entity(&tls_connect(server.addr, &config).unwrap()) == second {
            break;
        }
        assert!(Instant::now() < deadline, "new handshakes still get the old certificate");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The connection made before the reload still works.
    let message = json!({"topic": "realtime:reload", "event": "broadcast", "payload": {"type": "broadcast", "event": "e", "payload": {"after": "reload"}}, "ref": "3", "join_ref": "1"});
    live.send(Message::text(message.to_string())).unwrap();
    assert_eq!(read_json(&mut live)["payload"]["payload"], json!({"after": "reload"}));

    // A broken file on SIGHUP keeps the current pair.
    std::fs::write(pki.path("server.key"), "not a key").unwrap();
    server.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(end_entity(&tls_connect(server.addr, &config).unwrap()), second);
}

/// Runs `serve` with the given TLS files; returns (exited non-zero, stderr).
fn refused(cert: &str, key: &str) -> String {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut command = Server::command(addr, &[("REALTIME_TLS_CERT", cert), ("REALTIME_TLS_KEY", key)]);
    command.stderr(Stdio::piped());
    let mut child = command.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("serve started with TLS files {cert} / {key}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(!status.success(), "{stderr}");
    stderr
}

#[test]
fn bad_tls_files_refuse_to_start_naming_the_file_and_the_problem() {
    let pki = Pki::new("bad");
    let (cert, key) = (pki.path("server.pem"), pki.path("server.key"));
    let missing = pki.path("missing.pem");
    let stderr = refused(&missing, &key);
    assert!(stderr.contains(&format!("TLS certificate {missing}")) && stderr.contains("No such file"), "{stderr}");
    let garbage = pki.path("garbage.key");
    std::fs::write(&garbage, "hello").unwrap();
    let stderr = refused(&cert, &garbage);
    assert!(stderr.contains(&format!("TLS private key {garbage}")) && stderr.contains("no PEM section"), "{stderr}");
    let stderr = refused(&key, &key);
    assert!(stderr.contains(&format!("TLS certificate {key}")) && stderr.contains("no CERTIFICATE section"), "{stderr}");
    pki.issue("other", "localhost");
    let other_key = pki.path("other.key");
    let stderr = refused(&cert, &other_key);
    assert!(stderr.contains(&format!("TLS key {other_key} does not fit certificate {cert}")), "{stderr}");
    let stderr = refused(&cert, "");
    assert!(stderr.contains("REALTIME_TLS_CERT and REALTIME_TLS_KEY go together"), "{stderr}");
}

#[test]
fn realtime_js_over_wss_with_the_test_ca() {
    let dir = node::prepare();
    let pki = Pki::new("js");
    let mut server = start_tls(&pki);
    let user_sub = "0b0e6c9e-3f1a-4a57-9c2f-6f1c2d3e4a5b";
    let anon = support::anon_key();
    let mut command = node::command(&dir, &["broadcast_v1.test.mjs", "broadcast_v2.test.mjs", "presence.test.mjs"]);
    command
        .env("NODE_EXTRA_CA_CERTS", pki.path("ca.pem"))
        .env("POWA_ENDPOINT", format!("wss://localhost:{}/realtime/v1", server.addr.port()))
        .env("POWA_ANON_KEY", &anon)
        .env("POWA_SERVICE_KEY", support::service_key())
        .env("POWA_USER_TOKEN", support::token("authenticated", &["--sub", user_sub]))
        .env("POWA_EXPIRED_TOKEN", support::token("authenticated", &["--sub", user_sub, "--exp=-30"]))
        .env("POWA_BAD_TOKEN", node::tamper_signature(&anon));
    node::run("realtime-js over wss", command, Duration::from_secs(120), &mut server);
}

#[test]
fn python_client_over_wss_with_the_test_ca() {
    let python = python_with_realtime();
    let pki = Pki::new("py");
    let server = start_tls(&pki);
    let mut command = Command::new(&python);
    command
        .arg(repo_dir().join("tests").join("python").join("presence_track.py"))
        .args(["--url", &format!("wss://localhost:{}/realtime/v1", server.addr.port())])
        .args(["--token", &support::anon_key()])
        .args(["--topic", "tls-presence"])
        .args(["--key", "py-tls"])
        .args(["--name", "py"])
        .args(["--expect-key", "py-tls"])
        .args(["--timeout", "20"])
        .env("SSL_CERT_FILE", pki.path("ca.pem"))
        .env("PYTHONUNBUFFERED", "1");
    let mut script = PyScript::spawn(command);
    script.wait_event("subscribed", Duration::from_secs(30));
    let state = script.wait_event("state", Duration::from_secs(30))["state"].clone();
    assert!(state.get("py-tls").is_some(), "{state}");
    let status = script.finish(Duration::from_secs(20)).expect("the Python client exits");
    assert!(status.success(), "{}", script.dump());
}
