//! Restart and graceful drain (CONTRACT.md "Shutdown", PROTOCOL.md §1.11) on the real binary:
//! a restart on the same port while the old process still drains, every broadcast acknowledged
//! before SIGTERM delivered, `system` "Server requested disconnect" then close 1012, 503s while
//! draining, a second signal, and the official realtime-js client reconnecting by itself.

mod support;
mod wsclient;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use support::{free_port, node, Server};
use wsclient::*;

fn loopback() -> SocketAddr {
    format!("127.0.0.1:{}", free_port()).parse().unwrap()
}

/// Waits until nothing listens on `addr` any more (connect refused).
fn wait_not_listening(addr: SocketAddr, within: Duration) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
            return;
        }
        thread::sleep(Duration::from_millis(5));
    }
    panic!("{addr} still accepts connections {within:?} after the signal");
}

/// What a drained V1 connection saw after the signal.
#[derive(Debug, Default)]
struct Ending {
    /// Topics that got `system` "Server requested disconnect" (status ok).
    notices: Vec<String>,
    /// `payload.n` of every broadcast received.
    received: Vec<u64>,
    close: Option<u16>,
}

/// Reads until the server closes; panics on anything but a clean close.
fn read_to_close(client: &mut Client, within: Duration) -> Ending {
    let deadline = Instant::now() + within;
    let mut ending = Ending::default();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match client.recv_frame(left) {
            Frame::Text(text) => {
                let frame: Value = serde_json::from_str(&text).expect("JSON frame");
                match frame["event"].as_str() {
                    Some("system") => {
                        let payload = &frame["payload"];
                        assert_eq!(payload["message"], "Server requested disconnect", "{frame}");
                        assert_eq!(payload["status"], "ok", "{frame}");
                        assert_eq!(payload["extension"], "system", "{frame}");
                        ending.notices.push(frame["topic"].as_str().unwrap().to_string());
                    }
                    Some("broadcast") => ending.received.push(frame["payload"]["payload"]["n"].as_u64().expect("n")),
                    _ => {}
                }
            }
            Frame::Close(code, _) => {
                ending.close = code;
                return ending;
            }
            other => panic!("expected frames then close 1012, got {}", describe(&other)),
        }
    }
}

#[test]
fn restart_on_the_same_port_while_200_clients_drain() {
    let addr = loopback();
    let env = [("REALTIME_DRAIN_SECS", "2")];
    let mut old = Server::start_on(addr, &env);
    let mut clients: Vec<(Client, String)> = (0..200)
        .map(|i| {
            let mut client = connect_v1(&old);
            let topic = format!("realtime:restart-{}", i % 10);
            join_v1(&mut client, &topic, "1", config(false, false));
            (client, topic)
        })
        .collect();

    let signalled = Instant::now();
    old.signal(libc::SIGTERM);
    wait_not_listening(addr, Duration::from_secs(1));
    // The old process still holds 200 connections on this port; the new one binds anyway.
    let mut new = Server::start_on(addr, &env);
    let restarted = signalled.elapsed();
    eprintln!("new server healthy {restarted:?} after SIGTERM");
    assert!(restarted < Duration::from_secs(3), "restart took {restarted:?}");

    for (client, topic) in &mut clients {
        let ending = read_to_close(client, Duration::from_secs(10));
        assert_eq!(ending.notices, vec![topic.clone()], "one notice per joined channel");
        assert_eq!(ending.close, Some(1012));
    }
    let status = old.wait_exit(Duration::from_secs(2 + 5)).expect("the old server exits within DRAIN_SECS + 5 s");
    assert!(status.success(), "old server exited with {status}");

    // Every client reconnects to the new process on the same address.
    for (client, topic) in &mut clients {
        *client = connect_v1(&new);
        join_v1(client, topic, "2", config(false, false));
    }
    assert!(new.is_running());
}

#[test]
fn a_second_live_server_on_the_port_is_refused() {
    let mut first = Server::start(&[]);
    let mut command = Server::command(first.addr, &[]);
    command.stderr(Stdio::piped());
    let mut second = command.spawn().expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = second.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = second.kill();
            panic!("a second server on {} kept running", first.addr);
        }
        thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    second.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(!status.success());
    assert!(stderr.contains(&format!("cannot listen on {}", first.addr)) && stderr.contains("in use"), "{stderr}");
    assert!(first.is_running());
}

/// Senders broadcast with `ack` as fast as the acks come; SIGTERM lands in the middle. Every
/// broadcast acknowledged before the signal reaches every subscriber before its close 1012.
#[test]
fn every_broadcast_acked_before_sigterm_is_delivered() {
    const TOPICS: usize = 4;
    const SUBSCRIBERS_PER_TOPIC: usize = 6;
    let mut server = Server::start(&[("REALTIME_DRAIN_SECS", "3")]);
    let topic = |t: usize| format!("realtime:acked-{t}");
    let mut subscribers = Vec::new();
    for t in 0..TOPICS {
        for _ in 0..SUBSCRIBERS_PER_TOPIC {
            let mut client = connect_v1(&server);
            join_v1(&mut client, &topic(t), "1", config(false, false));
            subscribers.push((t, client));
        }
    }
    let signal_at: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let senders: Vec<_> = (0..TOPICS)
        .map(|t| {
            let mut client = connect_v1(&server);
            let topic = topic(t);
            join_v1(&mut client, &topic, "1", config(false, true));
            thread::spawn(move || {
                // (n, when its ack arrived)
                let mut acked: Vec<(u64, Instant)> = Vec::new();
                for n in 0u64.. {
                    let r#ref = n.to_string();
                    let frame = v1j(&topic, "broadcast", user_broadcast("tick", json!({ "n": n })), Some(&r#ref), Some("1"));
                    if client.try_send_text(&frame).is_err() {
                        break;
                    }
                    match client.recv_frame(Duration::from_secs(10)) {
                        Frame::Text(text) => {
                            let reply: Value = serde_json::from_str(&text).unwrap();
                            if reply["event"] == "phx_reply" && reply["ref"] == r#ref.as_str() {
                                assert_eq!(reply["payload"]["status"], "ok", "{reply}");
                                acked.push((n, Instant::now()));
                                continue;
                            }
                            assert_eq!(reply["event"], "system", "{reply}");
                            break;
                        }
                        _ => break,
                    }
                }
                acked
            })
        })
        .collect();
    let readers: Vec<_> = subscribers
        .into_iter()
        .map(|(t, mut client)| thread::spawn(move || (t, read_to_close(&mut client, Duration::from_secs(30)))))
        .collect();

    thread::sleep(Duration::from_millis(700));
    *signal_at.lock().unwrap() = Some(Instant::now());
    server.signal(libc::SIGTERM);

    let acked: Vec<Vec<(u64, Instant)>> = senders.into_iter().map(|h| h.join().expect("sender")).collect();
    let signal_at = signal_at.lock().unwrap().unwrap();
    let before: Vec<Vec<u64>> = acked.iter().map(|a| a.iter().filter(|(_, at)| *at < signal_at).map(|(n, _)| *n).collect()).collect();
    for (t, list) in before.iter().enumerate() {
        assert!(list.len() >= 10, "topic {t}: only {} broadcasts acked before the signal", list.len());
    }
    let mut checked = 0;
    for reader in readers {
        let (t, ending) = reader.join().expect("subscriber");
        assert_eq!(ending.close, Some(1012));
        assert_eq!(ending.notices, vec![topic(t)]);
        let got: std::collections::HashSet<u64> = ending.received.iter().copied().collect();
        let missing: Vec<u64> = before[t].iter().copied().filter(|n| !got.contains(n)).collect();
        assert!(missing.is_empty(), "topic {t}: {} acked broadcasts never arrived, first {:?}", missing.len(), &missing[..missing.len().min(5)]);
        checked += before[t].len();
    }
    eprintln!("{checked} (subscriber, acked broadcast) pairs delivered");
    let status = server.wait_exit(Duration::from_secs(3 + 5)).expect("exits within DRAIN_SECS + 5 s");
    assert!(status.success(), "exit status {status}");
}

/// Opens a TCP connection and waits until the server has surely accepted it.
fn accepted_connection(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    thread::sleep(Duration::from_millis(200));
    stream
}

fn send_request(mut stream: TcpStream, request: &str) -> String {
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
}

#[test]
fn healthz_and_rest_answer_503_while_draining() {
    let mut server = Server::start(&[("REALTIME_DRAIN_SECS", "5")]);
    // Two WebSocket clients keep the drain going (the second closes half-way through it).
    let _clients: Vec<Client> = (0..2).map(|_| connect_v1(&server)).collect();
    let health = accepted_connection(server.addr);
    let rest = accepted_connection(server.addr);
    server.signal(libc::SIGTERM);
    thread::sleep(Duration::from_millis(50));
    let response = send_request(health, "GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert!(response.starts_with("HTTP/1.1 503"), "{response}");
    assert!(response.ends_with("\r\n\r\ndraining"), "{response}");
    let body = r#"{"messages":[{"topic":"t","event":"e","payload":{}}]}"#;
    let key = support::service_key();
    let response = send_request(
        rest,
        &format!("POST /api/broadcast HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()),
    );
    assert!(response.starts_with("HTTP/1.1 503"), "{response}");
    assert!(response.ends_with(r#"{"message":"draining"}"#), "{response}");
    let status = server.wait_exit(Duration::from_secs(5 + 5)).expect("exits");
    assert!(status.success(), "exit status {status}");
}

#[test]
fn a_second_signal_exits_at_once() {
    let mut server = Server::start(&[("REALTIME_DRAIN_SECS", "60")]);
    // Three connections: the closes are spread over the 60 s, so the drain lasts.
    let _clients: Vec<Client> = (0..3).map(|_| connect_v1(&server)).collect();
    server.signal(libc::SIGTERM);
    thread::sleep(Duration::from_millis(800));
    assert!(server.is_running(), "the drain should still be running");
    server.signal(libc::SIGINT);
    let status = server.wait_exit(Duration::from_secs(2)).expect("a second signal exits at once");
    assert_eq!(status.code(), Some(128 + libc::SIGINT), "{status}");
}

/// The official client, connected to the old process, gets the notice and the 1012 close,
/// reconnects by itself to the new process on the same address, rejoins and broadcasts.
#[test]
fn realtime_js_reconnects_to_the_restarted_server() {
    let dir = node::prepare();
    let addr = loopback();
    let env = [("REALTIME_DRAIN_SECS", "2")];
    let mut old = Server::start_on(addr, &env);
    let mut child = std::process::Command::new("node")
        .arg("ops/reconnect.mjs")
        .current_dir(&dir)
        .env("POWA_ENDPOINT", old.realtime_js_endpoint())
        .env("POWA_ANON_KEY", support::anon_key())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("node");
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    let stdout = child.stdout.take().unwrap();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            eprintln!("[reconnect.mjs] {line}");
            let _ = lines_tx.send(line);
        }
    });
    let expect = |wanted: &str, within: Duration| {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) if line == wanted => return,
                Ok(line) if line.starts_with("FAIL") => panic!("{line}"),
                Ok(_) => {}
                Err(_) => panic!("realtime-js script did not print {wanted} within {within:?}"),
            }
        }
    };
    expect("SUBSCRIBED", Duration::from_secs(20));
    old.signal(libc::SIGTERM);
    wait_not_listening(addr, Duration::from_secs(1));
    let mut new = Server::start_on(addr, &env);
    expect("DONE", Duration::from_secs(30));
    let status = child.wait().unwrap();
    assert!(status.success(), "node exited with {status}");
    assert!(old.wait_exit(Duration::from_secs(7)).expect("old server exits").success());
    assert!(new.is_running());
}
