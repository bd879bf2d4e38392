//! Back-pressure: a subscriber that stops reading is disconnected once its outbound queue
//! passes its bound (close 1008 "slow consumer"), while the other subscribers of the same topic
//! keep receiving everything, and the server stays up.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::{anon_key, http_request, Server};

fn connect(server: &Server, token: &str) -> TcpStream {
    let mut stream = TcpStream::connect(server.addr).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let request = format!(
        "GET /realtime/v1/websocket?apikey={token}&vsn=1.0.0 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    stream
}

fn send(stream: &mut TcpStream, text: &str) {
    try_send(stream, text).unwrap();
}

fn try_send(stream: &mut TcpStream, text: &str) -> std::io::Result<()> {
    let mut frame = vec![0x81u8];
    let len = text.len();
    if len < 126 {
        frame.push(0x80 | len as u8);
    } else if len <= 65535 {
        frame.push(0x80 | 126);
        frame.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        frame.push(0x80 | 127);
        frame.extend_from_slice(&(len as u64).to_be_bytes());
    }
    frame.extend_from_slice(&[0, 0, 0, 0]);
    frame.extend_from_slice(text.as_bytes());
    stream.write_all(&frame)
}

/// Reads one frame: (opcode, payload). `None` at EOF.
fn read_frame(stream: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut header = [0u8; 2];
    stream.read_exact(&mut header).ok()?;
    let len = match header[1] & 0x7F {
        126 => {
            let mut b = [0u8; 2];
            stream.read_exact(&mut b).ok()?;
            u16::from_be_bytes(b) as usize
        }
        127 => {
            let mut b = [0u8; 8];
            stream.read_exact(&mut b).ok()?;
            u64::from_be_bytes(b) as usize
        }
        n => n as usize,
    };
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).ok()?;
    Some((header[0] & 0x0F, payload))
}

/// Three connections joined to `topic` (each join answered ok): the test's stalled subscriber,
/// reading subscriber and publisher.
/// The server's `realtime_connections` gauge.
fn open_connections(server: &Server) -> u64 {
    support::metric(server.addr, "realtime_connections")
}

/// `SO_RCVBUF` (which also turns the kernel's receive autotuning off for the socket).
fn set_receive_buffer(stream: &TcpStream, bytes: libc::c_int) {
    use std::os::fd::AsRawFd;
    // SAFETY: a live socket descriptor and a pointer to a c_int of the size passed.
    let rc = unsafe { libc::setsockopt(stream.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, (&bytes as *const libc::c_int).cast(), std::mem::size_of::<libc::c_int>() as libc::socklen_t) };
    assert_eq!(rc, 0, "setsockopt(SO_RCVBUF): {}", std::io::Error::last_os_error());
}

fn three_joined(server: &Server, token: &str, topic: &str) -> [TcpStream; 3] {
    let join = format!(r#"{{"topic":"{topic}","event":"phx_join","payload":{{"config":{{}}}},"ref":"1"}}"#);
    let mut streams = [connect(server, token), connect(server, token), connect(server, token)];
    for stream in &mut streams {
        send(stream, &join);
        let (_, reply) = read_frame(stream).expect("join reply");
        assert!(String::from_utf8_lossy(&reply).contains("\"ok\""));
    }
    streams
}

#[test]
fn a_stalled_subscriber_is_closed_and_others_keep_receiving() {
    let server = Server::start(&[]);
    let key = anon_key();
    let [mut stalled, mut reader, mut publisher] = three_joined(&server, &key, "flood");
    // The stalled subscriber never reads until the flood is over.
    // 4,000 × 8 KB = 32 MB: far past the 11 MB outbound bound plus the kernel buffers.
    let filler = "x".repeat(8000);
    const MESSAGES: usize = 4000;
    let reader_thread = std::thread::spawn(move || {
        let mut seen = 0;
        while seen < MESSAGES {
            let (_, payload) = read_frame(&mut reader).expect("the reading subscriber keeps receiving");
            if payload.windows(9).any(|w| w == b"broadcast") {
                seen += 1;
            }
        }
        seen
    });
    for i in 0..MESSAGES {
        let frame = format!(r#"{{"topic":"flood","event":"broadcast","payload":{{"type":"broadcast","event":"e","payload":{{"i":{i},"f":"{filler}"}}}},"ref":null}}"#);
        send(&mut publisher, &frame);
    }
    assert_eq!(reader_thread.join().unwrap(), MESSAGES, "no loss for the subscriber that keeps up");
    // Now drain the stalled one: buffered broadcasts, then a close 1008 (or the end of the stream).
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut close_code = None;
    let mut received = 0;
    while Instant::now() < deadline {
        match read_frame(&mut stalled) {
            Some((0x8, payload)) => {
                close_code = Some(u16::from_be_bytes([payload[0], payload[1]]));
                break;
            }
            Some(_) => received += 1,
            None => break,
        }
    }
    assert!(received < MESSAGES, "the stalled subscriber cannot have received everything ({received})");
    assert_eq!(close_code, Some(1008), "slow consumers are closed with 1008 after {received} messages");
    let (status, body) = http_request(server.addr, "GET", "/metrics", &[], b"").unwrap();
    assert_eq!(status, 200);
    let metrics = String::from_utf8(body).unwrap();
    assert!(metrics.lines().any(|l| l.starts_with("realtime_slow_consumer_closes_total ") && !l.ends_with(" 0")), "{metrics}");
    let mut server = server;
    assert!(server.is_running());
}

/// A subscriber whose socket stays full (it never reads) while its queue is below the bound is
/// dropped once its write has made no progress for 30 s; the connection that keeps reading is
/// unaffected. (Plain TCP: the idle sweep's write-stall check, `Conn::write_stalled_ms`.)
#[test]
fn a_subscriber_whose_socket_stays_full_for_30_seconds_is_dropped() {
    let server = Server::start(&[]);
    let key = anon_key();
    let [mut stalled, mut reader, mut publisher] = three_joined(&server, &key, "stall");
    // A fixed, small receive buffer (receive autotuning off; `tcp_rmem` max is 32 MB here), so
    // what the kernel holds for the client that never reads stays far below what is sent.
    set_receive_buffer(&stalled, 64 * 1024);
    // 1,000 × 8 KB = 8 MB: more than the kernel buffers of a socket that is never read (its
    // receive window stays small), less than the 11 MB outbound bound (no slow-consumer close).
    const MESSAGES: usize = 1000;
    let filler = "x".repeat(8000);
    let reader_thread = std::thread::spawn(move || {
        let mut seen = 0;
        while seen < MESSAGES {
            let (_, payload) = read_frame(&mut reader).expect("the reading subscriber keeps receiving");
            if payload.windows(9).any(|w| w == b"broadcast") {
                seen += 1;
            }
        }
        // Handed back: it stays open (the gauge below counts on it).
        (seen, reader)
    });
    let flood_started = Instant::now();
    for i in 0..MESSAGES {
        let frame = format!(r#"{{"topic":"stall","event":"broadcast","payload":{{"type":"broadcast","event":"e","payload":{{"i":{i},"f":"{filler}"}}}},"ref":null}}"#);
        send(&mut publisher, &frame);
    }
    let (seen, _reader) = reader_thread.join().unwrap();
    assert_eq!(seen, MESSAGES, "no loss for the subscriber that keeps up");
    // The stalled client keeps sending heartbeats (so the idle timeout is not what closes it)
    // and reads nothing until the server has dropped it (the open-connections gauge falls to 2).
    // The drop comes 30 s after the last progress of the server's write; that is at least 30 s
    // after the flood started, and may be later: the kernel can still take a few bytes now and
    // then (receive-queue collapsing), and each is progress.
    let heartbeat = r#"{"topic":"phoenix","event":"heartbeat","payload":{},"ref":"hb"}"#;
    let mut last_heartbeat: Option<Instant> = None;
    let dropped_after = loop {
        if open_connections(&server) == 2 {
            break flood_started.elapsed();
        }
        assert!(flood_started.elapsed() < Duration::from_secs(120), "the stalled subscriber was not dropped within 120 s");
        if last_heartbeat.is_none_or(|at| at.elapsed() >= Duration::from_secs(6)) {
            // Best effort: the server may drop the connection at any moment now.
            let _ = try_send(&mut stalled, heartbeat);
            last_heartbeat = Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(dropped_after >= Duration::from_secs(30), "dropped after {dropped_after:?}, before 30 s without progress");
    // Now it reads: what the kernel held, then the end of the stream — no close frame (there
    // was no room to send one), and not everything.
    let mut received = 0;
    let mut close = None;
    while let Some((opcode, payload)) = read_frame(&mut stalled) {
        if opcode == 0x8 {
            close = Some(payload);
            break;
        }
        if payload.windows(9).any(|w| w == b"broadcast") {
            received += 1;
        }
    }
    assert!(close.is_none(), "a dropped connection gets no close frame: {close:?}");
    assert!(received < MESSAGES, "the stalled subscriber was dropped before it got everything ({received})");
    eprintln!("stalled subscriber dropped {dropped_after:?} after the flood started; it then read {received} of {MESSAGES} messages");
    // The others are fine.
    send(&mut publisher, heartbeat);
    let (_, reply) = read_frame(&mut publisher).expect("the publisher's connection is alive");
    assert!(String::from_utf8_lossy(&reply).contains("\"ok\""));
    let mut server = server;
    assert!(server.is_running());
}
