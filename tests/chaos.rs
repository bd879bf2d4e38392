//! A seeded chaos run (issue 16 item 4, with the cluster of issue 15): three real nodes on a
//! real `nats-server -js`, one presence member per node, and a sequence of faults drawn from a
//! seed — a node SIGKILLed and restarted, a node drained and restarted, NATS restarted quickly,
//! NATS away longer than the node timeout — with broadcasts sent throughout. After the last
//! fault the cluster must heal by itself: every node hears the others, every member's presence
//! view is exactly the three live members, and broadcasts between the members arrive exactly
//! once, in order.
//!
//! The seed is printed; `POWA_CHAOS_SEED=<seed>` replays a run and `POWA_CHAOS_STEPS=<n>` makes
//! it longer (README "Soak and fault runs" documents the long run; the suite runs 6 steps).

mod clustersupport;
mod support;
mod wsclient;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clustersupport::*;
use serde_json::{json, Value};
use support::nats::Nats;
use support::Server;
use wsclient::{v1, Frame};

const TOPIC: &str = "realtime:chaos";
const NAMES: [&str; 3] = ["a", "b", "c"];

/// xorshift64*: reproducible from the seed, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

fn start_node(nats: &Nats, addr: SocketAddr, name: &str) -> Server {
    let timeout = NODE_TIMEOUT_SECS.to_string();
    Server::start_on(addr, &[("REALTIME_NATS_URL", &nats.url()), ("REALTIME_NODE_ID", name), ("REALTIME_NODE_TIMEOUT_SECS", &timeout), ("REALTIME_DRAIN_SECS", "1")])
}

fn member(server: &Server, name: &str) -> View {
    let mut view = View::join(server, TOPIC, name);
    view.track(TOPIC, name);
    view
}

/// Sends `count` numbered broadcasts from `view` (best effort: a closed socket is ignored).
fn chatter(view: &mut View, from: &str, round: u64, count: u64) {
    for n in 0..count {
        let frame = v1(TOPIC, "broadcast", json!({"type": "broadcast", "event": "chat", "payload": {"from": from, "round": round, "n": n}}), None);
        if view.client.try_send_text(&frame).is_err() {
            return;
        }
    }
}

/// Reads `view`'s frames for `within`, applying presence, returning the broadcasts' payloads.
fn drain(view: &mut View, within: Duration) -> Vec<Value> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    while Instant::now() < deadline {
        match view.client.recv_frame(Duration::from_millis(50)) {
            Frame::Text(text) => {
                let frame: Value = serde_json::from_str(&text).unwrap();
                if frame["event"] == "broadcast" {
                    got.push(frame["payload"]["payload"].clone());
                } else {
                    view.apply(&frame);
                }
            }
            Frame::Timeout => {}
            _ => return got,
        }
    }
    got
}

#[test]
fn the_cluster_heals_after_a_seeded_sequence_of_node_and_nats_faults() {
    let seed = env_u64("POWA_CHAOS_SEED").unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1);
    let steps = env_u64("POWA_CHAOS_STEPS").unwrap_or(6);
    eprintln!("chaos seed {seed}, {steps} steps (replay: POWA_CHAOS_SEED={seed} POWA_CHAOS_STEPS={steps} cargo test --test chaos)");
    let mut rng = Rng(seed);
    let mut nats = Nats::start();
    let addrs: Vec<SocketAddr> = (0..3).map(|_| format!("127.0.0.1:{}", support::free_port()).parse().unwrap()).collect();
    let mut nodes: Vec<Server> = (0..3).map(|i| start_node(&nats, addrs[i], NAMES[i])).collect();
    wait_for_nodes(&nodes.iter().collect::<Vec<_>>(), 2);
    let mut members: Vec<View> = (0..3).map(|i| member(&nodes[i], NAMES[i])).collect();
    let mut log = Vec::new();
    for step in 0..steps {
        let target = rng.below(3) as usize;
        let pause = Duration::from_millis(rng.below(1_500));
        let fault = rng.below(5);
        for (i, view) in members.iter_mut().enumerate() {
            chatter(view, NAMES[i], step, 5);
        }
        match fault {
            0 => {
                log.push(format!("step {step}: SIGKILL node {}, back after {pause:?}", NAMES[target]));
                nodes[target].signal(libc::SIGKILL);
                let _ = nodes[target].wait_exit(Duration::from_secs(5));
                std::thread::sleep(pause);
                nodes[target] = start_node(&nats, addrs[target], NAMES[target]);
                members[target] = member(&nodes[target], NAMES[target]);
            }
            1 => {
                log.push(format!("step {step}: drain node {}, back after {pause:?}", NAMES[target]));
                nodes[target].signal(libc::SIGTERM);
                let status = nodes[target].wait_exit(Duration::from_secs(10));
                assert!(status.is_some_and(|s| s.success()), "node {} did not drain cleanly: {status:?} ({log:?})", NAMES[target]);
                std::thread::sleep(pause);
                nodes[target] = start_node(&nats, addrs[target], NAMES[target]);
                members[target] = member(&nodes[target], NAMES[target]);
            }
            2 => {
                log.push(format!("step {step}: NATS restarted after {pause:?}"));
                nats.kill();
                std::thread::sleep(pause);
                nats.restart();
            }
            3 => {
                let away = Duration::from_secs(NODE_TIMEOUT_SECS + 1) + pause;
                log.push(format!("step {step}: NATS away for {away:?} (longer than the node timeout)"));
                nats.kill();
                std::thread::sleep(away);
                nats.restart();
            }
            _ => {
                log.push(format!("step {step}: quiet for {pause:?}"));
                std::thread::sleep(pause);
            }
        }
        for view in members.iter_mut() {
            drain(view, Duration::from_millis(100));
        }
        for (i, node) in nodes.iter_mut().enumerate() {
            assert!(node.is_running(), "node {} died on its own at step {step} ({log:?})", NAMES[i]);
        }
    }
    eprintln!("chaos: {log:#?}");
    // Healing: the nodes meet again, presence views converge to the three live members.
    wait_for_nodes(&nodes.iter().collect::<Vec<_>>(), 2);
    for (i, view) in members.iter_mut().enumerate() {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| view.wait_for(&NAMES, Duration::from_secs(20))));
        if outcome.is_err() {
            let statuses: Vec<Value> = nodes.iter().map(cluster_status).collect();
            panic!("member {}'s presence view did not converge (seed {seed}, {log:?}); nodes: {statuses:#?}", NAMES[i]);
        }
    }
    // Broadcasts after healing: every member hears every other, once each, in order.
    for _ in members.iter_mut().map(|v| drain(v, Duration::from_millis(300))) {}
    for (i, view) in members.iter_mut().enumerate() {
        chatter(view, NAMES[i], 1_000, 20);
    }
    for (i, view) in members.iter_mut().enumerate() {
        let mut got: Vec<(String, u64)> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while got.len() < 40 && Instant::now() < deadline {
            for payload in drain(view, Duration::from_millis(200)) {
                if payload["round"] == 1_000 {
                    got.push((payload["from"].as_str().unwrap().to_string(), payload["n"].as_u64().unwrap()));
                }
            }
        }
        got.extend(drain(view, Duration::from_millis(500)).into_iter().filter(|p| p["round"] == 1_000).map(|p| (p["from"].as_str().unwrap().to_string(), p["n"].as_u64().unwrap())));
        for (j, other) in NAMES.iter().enumerate() {
            if i == j {
                continue;
            }
            let from_other: Vec<u64> = got.iter().filter(|(f, _)| f == other).map(|(_, n)| *n).collect();
            assert_eq!(from_other, (0..20).collect::<Vec<_>>(), "member {} heard from {other} (seed {seed}, {log:?})", NAMES[i]);
        }
    }
}
