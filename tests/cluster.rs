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
