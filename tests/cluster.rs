//! Cluster mode (CONTRACT.md "Cluster"): several real `powa-realtime serve` processes meeting
//! over a real `nats-server -js` (started here on a free loopback port), driven by real
//! WebSocket clients and the official realtime-js client.

mod support;
mod wsclient;
mod clustersupport;

use std::time::{Duration, Instant};

use serde_json::json;

use clustersupport::*;
use support::nats::Nats;
use support::{http_request, node, Server};
use wsclient::{anon, v1, Client};

#[test]
fn broadcasts_cross_nodes_in_order_in_both_formats() {
    let nats = Nats::start();
    let (a, b, c) = (node(&nats, "a"), node(&nats, "b"), node(&nats, "c"));
    wait_for_nodes(&[&a, &b, &c], 2);
    let mut on_a = connect(&a, "1.0.0");
    let mut on_c = connect(&c, "2.0.0");
    let mut sender = connect(&b, "1.0.0");
    join_v1(&mut on_a, "realtime:room", json!({}));
    join_v2(&mut on_c, "realtime:room", json!({}));
    join_v1(&mut sender, "realtime:room", json!({"broadcast": {"self": false, "ack": true}}));
    for i in 0..200 {
        sender.send_text(&v1("realtime:room", "broadcast", json!({"type": "broadcast", "event": "n", "payload": {"i": i}}), Some(&format!("b{i}"))));
    }
    for i in 0..200 {
        let payload = next_broadcast_v1(&mut on_a);
        assert_eq!(payload["payload"]["i"], i, "node a, message {i}: {payload}");
    }
    for i in 0..200 {
        let frame = loop {
            let frame = on_c.recv_json(WAIT);
            if frame[3] == "broadcast" {
                break frame;
            }
        };
        assert_eq!(frame[4]["payload"]["i"], i, "node c (V2), message {i}: {frame}");
    }
    // `self: false` on a cluster holds too: the sender gets its acks, never its messages.
    let mut acks = 0;
    let deadline = Instant::now() + WAIT;
    while acks < 200 && Instant::now() < deadline {
        let frame = sender.recv_json(WAIT);
        assert_ne!(frame["event"], "broadcast", "the sender heard itself: {frame}");
        if frame["event"] == "phx_reply" && frame["ref"].as_str().is_some_and(|r| r.starts_with('b')) {
            acks += 1;
        }
    }
    assert_eq!(acks, 200);
    sender.expect_silence(Duration::from_millis(300));
    // Each broadcast crossed NATS once from node b, whatever the number of receiving nodes.
    let out = cluster_status(&b)["messages_out"].as_u64().unwrap();
    assert!((200..260).contains(&out), "node b published {out} messages for 200 broadcasts (plus heartbeats and syncs)");
}

#[test]
fn a_join_ok_on_one_node_then_a_broadcast_from_another_always_arrives() {
    let nats = Nats::start();
    let (a, b) = (node(&nats, "a"), node(&nats, "b"));
    wait_for_nodes(&[&a, &b], 1);
    let mut client = connect(&a, "1.0.0");
    for i in 0..200 {
        let topic = format!("fresh-{i}");
        join_v1(&mut client, &format!("realtime:{topic}"), json!({}));
        rest_broadcast(&b, &topic, json!({"i": i}));
        let payload = next_broadcast_v1(&mut client);
        assert_eq!(payload["payload"]["i"], i, "round {i}");
        client.send_text(&v1(&format!("realtime:{topic}"), "phx_leave", json!({}), Some("2")));
    }
}

#[test]
fn presence_converges_across_three_nodes_and_a_dead_node_leaves_within_the_timeout() {
    let nats = Nats::start();
    let (a, b) = (node(&nats, "a"), node(&nats, "b"));
    let c = node(&nats, "c");
    wait_for_nodes(&[&a, &b, &c], 2);
    let topic = "realtime:lobby";
    let mut views = [View::join(&a, topic, "ann"), View::join(&b, topic, "bob"), View::join(&c, topic, "cat")];
    for (view, name) in views.iter_mut().zip(["ann", "bob", "cat"]) {
        view.track(topic, name);
    }
    for view in views.iter_mut() {
        view.wait_for(&["ann", "bob", "cat"], WAIT);
    }
    // A late joiner on a node that had nobody in the topic gets everyone in its presence_state.
    let mut late = View::join(&a, topic, "dan");
    assert_eq!(late.members.keys().cloned().collect::<Vec<_>>(), ["ann", "bob", "cat"], "presence_state of a new subscriber");
    late.track(topic, "dan");
    for view in views.iter_mut() {
        view.wait_for(&["ann", "bob", "cat", "dan"], WAIT);
    }
    // SIGKILL node c: its member leaves everywhere within the node timeout (plus a beat).
    c.signal(libc::SIGKILL);
    let killed = Instant::now();
    views[0].wait_for(&["ann", "bob", "dan"], Duration::from_secs(NODE_TIMEOUT_SECS + 3));
    views[1].wait_for(&["ann", "bob", "dan"], Duration::from_secs(NODE_TIMEOUT_SECS + 3));
    let took = killed.elapsed();
    assert!(took >= Duration::from_secs(1), "left after {took:?}: before the timeout could have expired");
}

#[test]
fn a_drained_node_s_members_leave_at_once() {
    let nats = Nats::start();
    let a = node(&nats, "a");
    let mut b = node(&nats, "b");
    wait_for_nodes(&[&a, &b], 1);
    let topic = "realtime:drain";
    let mut on_a = View::join(&a, topic, "ann");
    let mut on_b = View::join(&b, topic, "bob");
    on_a.track(topic, "ann");
    on_b.track(topic, "bob");
    on_a.wait_for(&["ann", "bob"], WAIT);
    b.signal(libc::SIGTERM);
    // Well before the 2 s node timeout: the goodbye removes bob at once.
    on_a.wait_for(&["ann"], Duration::from_millis(1_500));
    assert!(b.wait_exit(Duration::from_secs(10)).is_some(), "node b did not exit after its drain");
}

#[test]
fn a_nats_restart_degrades_then_recovers_without_duplicates() {
    let mut nats = Nats::start();
    let (a, b) = (node(&nats, "a"), node(&nats, "b"));
    wait_for_nodes(&[&a, &b], 1);
    let topic = "realtime:weather";
    let mut on_a = View::join(&a, topic, "ann");
    let mut on_b = View::join(&b, topic, "bob");
    on_a.track(topic, "ann");
    on_a.wait_for(&["ann"], WAIT);
    on_b.wait_for(&["ann"], WAIT);

    nats.kill();
    let deadline = Instant::now() + WAIT;
    while http_request(a.addr, "GET", "/healthz", &[], b"").ok().map(|(_, body)| body) != Some(b"ok degraded".to_vec()) {
        assert!(Instant::now() < deadline, "node a never said it is degraded");
        std::thread::sleep(Duration::from_millis(50));
    }
    let metrics = String::from_utf8(http_request(a.addr, "GET", "/metrics", &[], b"").unwrap().1).unwrap();
    assert!(metrics.contains("realtime_cluster_connected 0"), "{metrics}");
    // While NATS is away each node serves its own clients: bob tracks, only b knows.
    on_b.track(topic, "bob");
    on_b.wait_for(&["ann", "bob"], WAIT);
    rest_broadcast(&a, "weather", json!({"during": "outage"}));
    let local = next_broadcast_v1(&mut on_a.client);
    assert_eq!(local["payload"]["during"], "outage", "local delivery while degraded");

    nats.restart();
    wait_for_nodes(&[&a, &b], 1);
    // Presence re-syncs by itself: a learns about bob.
    on_a.wait_for(&["ann", "bob"], Duration::from_secs(15));
    // Cross-node delivery resumes, exactly once.
    let mut receiver = connect(&a, "1.0.0");
    join_v1(&mut receiver, "realtime:after", json!({}));
    for i in 0..20 {
        rest_broadcast(&b, "after", json!({"i": i}));
    }
    for i in 0..20 {
        assert_eq!(next_broadcast_v1(&mut receiver)["payload"]["i"], i);
    }
    receiver.expect_silence(Duration::from_millis(500));
}

#[test]
fn realtime_js_clients_on_different_nodes_talk() {
    let dir = node::prepare();
    let nats = Nats::start();
    let (mut a, b, c) = (node(&nats, "a"), node(&nats, "b"), node(&nats, "c"));
    wait_for_nodes(&[&a, &b, &c], 2);
    let mut command = node::command(&dir, &["cluster/cluster.test.mjs"]);
    command
        .env("POWA_ENDPOINT_A", a.realtime_js_endpoint())
        .env("POWA_ENDPOINT_B", b.realtime_js_endpoint())
        .env("POWA_ENDPOINT_C", c.realtime_js_endpoint())
        .env("POWA_ANON_KEY", anon());
    node::run("realtime-js cluster", command, Duration::from_secs(90), &mut a);
}

#[test]
fn single_node_mode_has_no_cluster_section_and_says_plain_ok() {
    let server = Server::start(&[]);
    assert_eq!(http_request(server.addr, "GET", "/healthz", &[], b"").unwrap(), (200, b"ok".to_vec()));
    assert!(cluster_status(&server).is_null());
}

#[test]
fn the_concurrent_users_limit_counts_every_node() {
    let nats = Nats::start();
    let timeout = NODE_TIMEOUT_SECS.to_string();
    let env = |name: &str| -> Vec<(&str, String)> {
        vec![("REALTIME_NATS_URL", nats.url()), ("REALTIME_NODE_ID", name.to_owned()), ("REALTIME_NODE_TIMEOUT_SECS", timeout.clone()), ("REALTIME_MAX_CONCURRENT_USERS", "2".into())]
    };
    let start = |name: &str| {
        let vars = env(name);
        let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Server::start(&vars)
    };
    let (a, b) = (start("a"), start("b"));
    wait_for_nodes(&[&a, &b], 1);
    let mut first = connect(&a, "1.0.0");
    join_v1(&mut first, "realtime:one", json!({}));
    let mut second = connect(&b, "1.0.0");
    join_v1(&mut second, "realtime:two", json!({}));
    // Each node alone holds one user, under the limit of 2; together they are at it. The
    // counts travel with the heartbeats (one beat of lag): then a third user is refused, at the
    // upgrade (429, §1.4) or at its join.
    let third_user = |server: &Server| -> Result<(), String> {
        let mut third = Client::try_connect_with_headers(&server.ws_url(anon(), "1.0.0"), &[]).map_err(|e| e.to_string())?;
        third.send_text(&v1("realtime:three", "phx_join", json!({"config": {}}), Some("1")));
        let reply = third.recv_json(WAIT);
        match reply["payload"]["status"].as_str() {
            Some("ok") => Ok(()),
            _ => Err(reply["payload"]["response"]["reason"].to_string()),
        }
    };
    let deadline = Instant::now() + WAIT;
    let refusal = loop {
        match third_user(&a) {
            Err(refusal) => break refusal,
            Ok(()) => assert!(Instant::now() < deadline, "a third user was still let in"),
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(refusal.contains("429") || refusal.contains("ConnectionRateLimitReached: Too many connected users"), "{refusal}");
    // A user leaving on node b frees a place on node a.
    second.close();
    let deadline = Instant::now() + WAIT;
    while third_user(&a).is_err() {
        assert!(Instant::now() < deadline, "the place freed on node b was not given on node a");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A TCP load balancer for the failover test: each connection goes to the first backend that
/// accepts it, bytes are piped both ways until either side closes.
fn balancer(backends: Vec<std::net::SocketAddr>) -> std::net::SocketAddr {
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the balancer");
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            let Some(backend) = backends.iter().find_map(|b| TcpStream::connect(b).ok()) else { continue };
            let pipe = |mut from: TcpStream, mut to: TcpStream| {
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16 * 1024];
                    while let Ok(n) = from.read(&mut buf) {
                        if n == 0 || to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown(Shutdown::Both);
                    let _ = from.shutdown(Shutdown::Both);
                });
            };
            pipe(client.try_clone().unwrap(), backend.try_clone().unwrap());
            pipe(backend, client);
        }
    });
    addr
}

#[test]
fn a_killed_node_s_realtime_js_clients_come_back_through_another_node() {
    let dir = node::prepare();
    let nats = Nats::start();
    let (a, mut b) = (node(&nats, "a"), node(&nats, "b"));
    wait_for_nodes(&[&a, &b], 1);
    let lb = balancer(vec![a.addr, b.addr]);
    let ready = std::env::temp_dir().join(format!("powa-failover-{}-{}", std::process::id(), lb.port()));
    let _ = std::fs::remove_file(&ready);
    // Kill node a (SIGKILL) once the client is settled on it.
    let killer = {
        let ready = ready.clone();
        let pid = a.pid() as libc::pid_t;
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !ready.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        })
    };
    let mut command = node::command(&dir, &["cluster/failover.test.mjs"]);
    command
        .env("POWA_ENDPOINT_LB", format!("ws://{lb}/realtime/v1"))
        .env("POWA_ENDPOINT_B", b.realtime_js_endpoint())
        .env("POWA_ANON_KEY", anon())
        .env("POWA_READY_FILE", &ready);
    node::run("realtime-js failover", command, Duration::from_secs(90), &mut b);
    killer.join().unwrap();
    let _ = std::fs::remove_file(&ready);
    drop(a);
}

/// Publishes one message with headers on `subject` as a plain NATS client (not a node): the
/// raw protocol, so that the header block is exactly `header`. Returns once the server
/// answered the PING after it (it has processed the message).
fn raw_nats_publish_with_header(nats: &Nats, subject: &str, header: &str, payload: &str) {
    use std::io::{BufRead as _, BufReader, Write as _};
    let stream = std::net::TcpStream::connect(("127.0.0.1", nats.port)).expect("connect to NATS");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).expect("INFO");
    assert!(line.starts_with("INFO "), "{line}");
    let mut writer = stream;
    let message = format!(
        "CONNECT {{\"verbose\":false,\"pedantic\":false,\"headers\":true,\"protocol\":1,\"name\":\"not-a-node\"}}\r\nHPUB {subject} {} {}\r\n{header}{payload}\r\nPING\r\n",
        header.len(),
        header.len() + payload.len()
    );
    writer.write_all(message.as_bytes()).expect("publish");
    loop {
        line.clear();
        reader.read_line(&mut line).expect("PONG");
        assert!(!line.starts_with("-ERR"), "NATS refused the message: {line}");
        if line.starts_with("PONG") {
            return;
        }
    }
}

/// Any client allowed to publish on the cluster's subjects could stop every node at once:
/// async-nats 0.51 parses a message's headers inside its connection task and asserts that a
/// header value holds no `\r`, but its line splitting keeps a lone `\r` inside the value (found
/// by reading its source, issue 16's dependency review). The link now survives a panic inside
/// the NATS client (ARCHITECTURE.md "A panic ends the process", the one exception): that task
/// ends, the link connects again, every topic re-subscribes and re-syncs, and cross-node
/// delivery resumes.
#[test]
fn a_hostile_nats_header_does_not_stop_the_nodes() {
    let nats = Nats::start();
    let (mut a, mut b) = (node(&nats, "a"), node(&nats, "b"));
    wait_for_nodes(&[&a, &b], 1);
    let mut on_a = connect(&a, "1.0.0");
    join_v1(&mut on_a, "realtime:room", json!({}));
    rest_broadcast(&b, "room", json!({"before": true}));
    assert_eq!(next_broadcast_v1(&mut on_a)["payload"]["before"], true);

    for round in 0..3 {
        raw_nats_publish_with_header(&nats, "powa.hb", "NATS/1.0\r\nX: a\rb\r\n\r\n", "boom");
        std::thread::sleep(Duration::from_millis(300));
        assert!(a.is_running() && b.is_running(), "round {round}: a node exited on a hostile NATS header");
        // Each node's link started again, once per hostile message.
        for (name, server) in [("a", &a), ("b", &b)] {
            crate::support::wait_for_metric(server.addr, "realtime_cluster_link_restarts_total", round + 1, WAIT, &format!("node {name}, round {round}"));
        }
        wait_for_nodes(&[&a, &b], 1);
        // The joined channel (its topic's subscription re-made on the new connection) hears
        // node b again; a broadcast published while the subscription was being re-made may
        // be lost (as while NATS is away), so retry until one arrives.
        let deadline = Instant::now() + WAIT;
        'delivered: loop {
            rest_broadcast(&b, "room", json!({"round": round}));
            let until = Instant::now() + Duration::from_millis(500);
            while Instant::now() < until {
                match on_a.recv_frame(Duration::from_millis(100)) {
                    wsclient::Frame::Text(text) if text.contains("\"round\":") => {
                        let frame: serde_json::Value = serde_json::from_str(&text).unwrap();
                        if frame["payload"]["payload"]["round"] == round {
                            break 'delivered;
                        }
                    }
                    wsclient::Frame::Close(..) | wsclient::Frame::Dropped(_) => panic!("round {round}: the client on node a was dropped"),
                    _ => {}
                }
            }
            assert!(Instant::now() < deadline, "round {round}: no broadcast from node b reached node a after the link restarted");
        }
    }
    // Presence still crosses nodes after the restarts.
    let mut view_a = View::join(&a, "realtime:people", "ann");
    let mut view_b = View::join(&b, "realtime:people", "bob");
    view_a.track("realtime:people", "ann");
    view_b.track("realtime:people", "bob");
    view_a.wait_for(&["ann", "bob"], WAIT);
    view_b.wait_for(&["ann", "bob"], WAIT);
}

/// A fake NATS server for the hostile-server test: it greets each connection, answers its
/// `PING`s, and sends `hostile[i]` to the i-th connection once the client is set up (later
/// connections get nothing hostile).
fn fake_nats(hostile: Vec<&'static str>) -> u16 {
    use std::io::{BufRead as _, BufReader, Write as _};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the fake NATS");
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for (i, stream) in listener.incoming().enumerate() {
            let Ok(stream) = stream else { continue };
            let bad = hostile.get(i).copied();
            std::thread::spawn(move || {
                let mut writer = stream.try_clone().unwrap();
                let info = format!("INFO {{\"server_id\":\"fake\",\"server_name\":\"fake\",\"version\":\"2.9.11\",\"proto\":1,\"go\":\"go1.19\",\"host\":\"127.0.0.1\",\"port\":{port},\"headers\":true,\"max_payload\":8388608}}\r\n");
                if writer.write_all(info.as_bytes()).is_err() {
                    return;
                }
                let mut reader = BufReader::new(stream);
                let mut line = String::new();
                let mut sent_bad = false;
                loop {
                    line.clear();
                    match reader.read_line(&mut line) {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    if line.starts_with("PING") && writer.write_all(b"PONG\r\n").is_err() {
                        return;
                    }
                    // Once the client subscribes, it is past its handshake.
                    if line.starts_with("SUB ") && !sent_bad {
                        if let Some(bad) = bad {
                            let _ = writer.write_all(bad.as_bytes());
                        }
                        sent_bad = true;
                    }
                }
            });
        }
    });
    port
}

/// What a hostile NATS server (or anyone in the middle of a plain `nats://` link) can send to
/// make async-nats 0.51 panic inside its connection task, read off its parser in issue 16's
/// dependency review: a bare `-ERR` line (slices `[5..4]`), a `MSG` whose length is
/// `usize::MAX` (the length check overflows) and a header value with a lone `\r`. Each ends
/// only the client's task: the node connects again and keeps serving.
#[test]
fn a_hostile_nats_server_does_not_stop_a_node() {
    let hostile = vec!["-ERR\r\n", "MSG powa.hb 1 18446744073709551615\r\nx\r\n", "HMSG powa.hb 1 20 21\r\nNATS/1.0\r\nX: a\rb\r\n\r\nx\r\n"];
    let port = fake_nats(hostile.clone());
    let url = format!("nats://127.0.0.1:{port}");
    let mut server = Server::start(&[("REALTIME_NATS_URL", &url), ("REALTIME_NODE_ID", "a"), ("REALTIME_NODE_TIMEOUT_SECS", "2")]);
    crate::support::wait_for_metric(server.addr, "realtime_cluster_link_restarts_total", hostile.len() as u64, Duration::from_secs(20), "one restart per hostile message");
    assert!(server.is_running(), "the node exited");
    let deadline = Instant::now() + WAIT;
    while cluster_status(&server)["nats_connected"] != true {
        assert!(Instant::now() < deadline, "the node did not connect again after the last hostile message");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Its own clients were served all along.
    let mut client = connect(&server, "1.0.0");
    join_v1(&mut client, "realtime:room", json!({}));
    rest_broadcast(&server, "room", json!({"after": true}));
    assert_eq!(next_broadcast_v1(&mut client)["payload"]["after"], true);
}
