//! W3 (join storms, public vs private) and W6 (REST ingest) against the release server with a
//! throwaway PostgreSQL 15, loopback only, bounded.
//!
//! W3: N connections (opened and upgraded first), then every connection sends one `phx_join` at
//! once and the time until every reply arrived gives joins/s. Public joins (no database work)
//! are the same-run baseline for private joins (a `SELECT` policy on `realtime.messages`), all
//! private joins carrying the same claims and topic, as in a real storm after a deploy.
//! W6: T threads POST batches of B messages to `/api/broadcast` (one connection per request, as
//! the server closes after each response) while one subscriber counts deliveries.
//!
//! Usage: `cargo run --release -p powa-benches --bin storm_load -- [N]` (default 5000).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Instant;

use powa_benches::driver::{frame, read_frame, start_server, token, ws_connect};
use replication::cluster::Cluster;

const THREADS: usize = 10;

/// Joins/s for `n` connections each sending one join with `config`.
fn join_storm(port: u16, n: usize, token: &str, config: &str) -> f64 {
    let barrier = Arc::new(Barrier::new(THREADS + 1));
    let done = Arc::new(Barrier::new(THREADS + 1));
    let ok = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for t in 0..THREADS {
        let (barrier, done, ok, token, config) = (Arc::clone(&barrier), Arc::clone(&done), Arc::clone(&ok), token.to_string(), config.to_string());
        let count = n / THREADS + usize::from(t < n % THREADS);
        threads.push(std::thread::spawn(move || {
            let mut streams: Vec<TcpStream> = (0..count).map(|_| ws_connect(port, &token)).collect();
            let join = frame(&format!(r#"["1","1","realtime:storm","phx_join",{{"config":{config}}}]"#));
            barrier.wait();
            for stream in &mut streams {
                stream.write_all(&join).unwrap();
            }
            for stream in &mut streams {
                let reply = read_frame(stream);
                if reply.windows(13).any(|w| w == b"\"status\":\"ok\"") {
                    ok.fetch_add(1, Ordering::Relaxed);
                }
            }
            done.wait();
            drop(streams);
        }));
    }
    barrier.wait();
    let started = Instant::now();
    done.wait();
    let elapsed = started.elapsed();
    for thread in threads {
        thread.join().unwrap();
    }
    assert_eq!(ok.load(Ordering::Relaxed) as usize, n, "every join must succeed");
    n as f64 / elapsed.as_secs_f64()
}

fn http_post(port: u16, path: &str, token: &str, body: &str) -> u16 {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    String::from_utf8_lossy(&response[9..12]).parse().unwrap_or(0)
}

/// REST messages/s accepted and delivered to one subscriber.
fn rest_ingest(port: u16, token: &str, batch: usize, requests_per_thread: usize) -> (f64, f64) {
    let mut subscriber = ws_connect(port, token);
    subscriber.write_all(&frame(r#"["1","1","realtime:ingest","phx_join",{"config":{}}]"#)).unwrap();
    read_frame(&mut subscriber);
    let messages: Vec<String> = (0..batch).map(|i| format!(r#"{{"topic":"ingest","event":"e","payload":{{"i":{i}}}}}"#)).collect();
    let body = Arc::new(format!(r#"{{"messages":[{}]}}"#, messages.join(",")));
    let total = (batch * requests_per_thread * THREADS) as u64;
    let started = Instant::now();
    let reader = std::thread::spawn(move || {
        let mut got = 0u64;
        while got < total {
            read_frame(&mut subscriber);
            got += 1;
        }
    });
    let threads: Vec<_> = (0..THREADS)
        .map(|_| {
            let (body, token) = (Arc::clone(&body), token.to_string());
            std::thread::spawn(move || {
                for _ in 0..requests_per_thread {
                    assert_eq!(http_post(port, "/api/broadcast", &token, &body), 202);
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let accepted = started.elapsed();
    reader.join().unwrap();
    let delivered = started.elapsed();
    (total as f64 / accepted.as_secs_f64(), total as f64 / delivered.as_secs_f64())
}

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(5000);
    let (cluster, _guard) = Cluster::throwaway().expect("PostgreSQL cluster");
    let (server, port) = start_server(&cluster.url(), &[("REALTIME_JOIN_ERROR_DELAY_MS", "0".into())]);
    cluster
        .psql("create policy storm_read on realtime.messages for select to authenticated using (realtime.topic() = 'storm')")
        .expect("policy");
    let user = token("authenticated", "00000000-0000-0000-0000-000000000001");
    let service = token("service_role", "00000000-0000-0000-0000-000000000001");
    println!("| workload | n | rate |");
    println!("| --- | --- | --- |");
    for round in 0..2 {
        let public = join_storm(port, n, &user, r#"{"broadcast":{"self":false}}"#);
        println!("| W3 public joins (round {}) | {n} | {public:.0} joins/s |", round + 1);
        let private = join_storm(port, n, &user, r#"{"private":true}"#);
        println!("| W3 private joins, same claims (round {}) | {n} | {private:.0} joins/s |", round + 1);
    }
    let (accepted, delivered) = rest_ingest(port, &service, 100, 20);
    println!("| W6 REST batch ingest (100 msgs/request, {THREADS} clients) | {} | {accepted:.0} msgs/s accepted, {delivered:.0} msgs/s delivered to a subscriber |", 100 * 20 * THREADS);
    drop(server);
}
