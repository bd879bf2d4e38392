//! Deadlines for a whole HTTP request head (10 s, TLS handshake included) and a whole REST body
//! (30 s): a client that trickles bytes, each within any per-read timeout, is still cut off.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::Server;

/// Sends one byte of `data` per `every` until the server closes; returns the elapsed time and
/// what the server answered.
fn trickle(mut stream: TcpStream, data: &[u8], every: Duration) -> (Duration, Vec<u8>) {
    let started = Instant::now();
    stream.set_read_timeout(Some(every)).unwrap();
    let mut answer = Vec::new();
    for byte in data.iter().cycle() {
        let mut chunk = [0u8; 1024];
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                answer.extend_from_slice(&chunk[..n]);
                continue;
            }
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock || error.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break,
        }
        if stream.write_all(&[*byte]).is_err() {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the server kept a trickling client for a minute");
    }
    (started.elapsed(), answer)
}

#[test]
fn a_trickled_request_head_is_cut_off_after_10_s() {
    let server = Server::start(&[]);
    let stream = TcpStream::connect(server.addr).unwrap();
    let (elapsed, answer) = trickle(stream, b"GET /healthz HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", Duration::from_millis(500));
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    assert!(elapsed >= Duration::from_secs(9) && elapsed < Duration::from_secs(13), "closed after {elapsed:?}");
}

#[test]
fn a_trickled_rest_body_is_cut_off_after_30_s() {
    let server = Server::start(&[]);
    let mut stream = TcpStream::connect(server.addr).unwrap();
    let key = support::service_key();
    let head = format!("POST /api/broadcast HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    let (elapsed, answer) = trickle(stream, b"{\"messages\":[", Duration::from_millis(500));
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(elapsed >= Duration::from_secs(29) && elapsed < Duration::from_secs(33), "answered after {elapsed:?}");
}
