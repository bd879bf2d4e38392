//! A small blocking WebSocket client for the protocol tests.
//!
//! It talks to the real `powa-realtime` binary over loopback. Every read has a deadline, so a
//! server that stays silent (or hangs) makes a test fail instead of hanging it. Next to the
//! normal `tungstenite` API it can write raw bytes on the socket, which the bad-input tests
//! use for frames a well-behaved client library refuses to produce (unmasked frames, text
//! frames that are not UTF-8, a frame header announcing a huge payload).
#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::protocol::{Message, WebSocket};

use crate::support::Server;

/// Default wait for a frame the server owes us.
pub const WAIT: Duration = Duration::from_secs(5);
/// How long "nothing arrives" has to hold before we believe it.
pub const QUIET: Duration = Duration::from_millis(400);

/// One thing read from the socket.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Text(String),
    Binary(Vec<u8>),
    /// A close frame: code (if any) and reason.
    Close(Option<u16>, String),
    /// The connection ended without a close frame (EOF, reset, protocol error on our side).
    Dropped(String),
    /// Nothing arrived before the deadline.
    Timeout,
}

pub struct Client {
    ws: WebSocket<TcpStream>,
}

fn socket_addr_of(url: &str) -> SocketAddr {
    let rest = url
        .strip_prefix("ws://")
        .unwrap_or_else(|| panic!("only ws:// URLs are supported: {url}"));
    let authority = rest.split('/').next().unwrap();
    authority
        .to_socket_addrs()
        .unwrap_or_else(|e| panic!("resolve {authority}: {e}"))
        .next()
        .expect("an address")
}

impl Client {
    /// Connects and completes the WebSocket handshake; panics on failure.
    #[track_caller]
    pub fn connect(url: &str) -> Client {
        Self::try_connect_with_headers(url, &[])
            .unwrap_or_else(|e| panic!("WebSocket connect to {url} failed: {e}"))
    }

    /// Connects with extra request headers (for example `x-api-key`).
    #[track_caller]
    pub fn connect_with_headers(url: &str, headers: &[(&str, &str)]) -> Client {
        Self::try_connect_with_headers(url, headers)
            .unwrap_or_else(|e| panic!("WebSocket connect to {url} failed: {e}"))
    }

    pub fn try_connect_with_headers(url: &str, headers: &[(&str, &str)]) -> Result<Client, String> {
        let addr = socket_addr_of(url);
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| format!("tcp connect: {e}"))?;
        stream.set_nodelay(true).ok();
        stream.set_read_timeout(Some(Duration::from_secs(10))).ok();
        stream.set_write_timeout(Some(Duration::from_secs(10))).ok();
        let uri: tungstenite::http::Uri = url.parse().map_err(|e| format!("bad url: {e}"))?;
        let mut request = tungstenite::ClientRequestBuilder::new(uri);
        for (name, value) in headers {
            request = request.with_header(*name, *value);
        }
        match tungstenite::client::client(request, stream) {
            Ok((ws, _response)) => Ok(Client { ws }),
            Err(e) => Err(format!("handshake: {e}")),
        }
    }

    /// Connects with `host` as the Host header (the tenant in multi-tenant mode) instead of
    /// the URL's authority; `Err` carries the refusal (status and body) on a failed upgrade.
    pub fn try_connect_host(url: &str, host: &str) -> Result<Client, (u16, String)> {
        let addr = socket_addr_of(url);
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| (0, format!("tcp connect: {e}")))?;
        stream.set_nodelay(true).ok();
        stream.set_read_timeout(Some(Duration::from_secs(10))).ok();
        stream.set_write_timeout(Some(Duration::from_secs(10))).ok();
        let request = tungstenite::http::Request::builder()
            .uri(url)
            .header("Host", host)
            .header("Connection", "Upgrade")
            .header("Upgrade", "websocket")
            .header("Sec-WebSocket-Version", "13")
            .header("Sec-WebSocket-Key", tungstenite::handshake::client::generate_key())
            .body(())
            .map_err(|e| (0, format!("bad request: {e}")))?;
        match tungstenite::client::client(request, stream) {
            Ok((ws, _response)) => Ok(Client { ws }),
            Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(response))) => {
                let body = response.body().as_ref().map(|b| String::from_utf8_lossy(b).to_string()).unwrap_or_default();
                Err((response.status().as_u16(), body))
            }
            Err(e) => Err((0, format!("handshake: {e}"))),
        }
    }

    /// [`Client::try_connect_host`] that panics on failure.
    #[track_caller]
    pub fn connect_host(url: &str, host: &str) -> Client {
        Self::try_connect_host(url, host).unwrap_or_else(|e| panic!("WebSocket connect to {url} as {host} failed: {e:?}"))
    }

    #[track_caller]
    pub fn send_text(&mut self, text: &str) {
        self.ws
            .send(Message::text(text.to_string()))
            .unwrap_or_else(|e| panic!("send text frame: {e}"));
    }

    /// Like `send_text`, but reports a failure instead of panicking.
    pub fn try_send_text(&mut self, text: &str) -> Result<(), String> {
        self.ws
            .send(Message::text(text.to_string()))
            .map_err(|e| e.to_string())
    }

    #[track_caller]
    pub fn send_json(&mut self, value: &Value) {
        self.send_text(&value.to_string());
    }

    #[track_caller]
    pub fn send_binary(&mut self, bytes: &[u8]) {
        self.ws
            .send(Message::binary(bytes.to_vec()))
            .unwrap_or_else(|e| panic!("send binary frame: {e}"));
    }

    /// Sends a WebSocket ping (the pong is skipped by `recv_frame`).
    #[track_caller]
    pub fn send_ping(&mut self, data: &[u8]) {
        self.ws
            .send(Message::Ping(data.to_vec().into()))
            .unwrap_or_else(|e| panic!("send ping frame: {e}"));
    }

    /// Writes bytes straight onto the TCP stream, bypassing the WebSocket framing.
    /// Use `raw_frame` to build them.
    #[track_caller]
    pub fn send_raw(&mut self, bytes: &[u8]) {
        let stream = self.ws.get_mut();
        stream.write_all(bytes).expect("write raw bytes");
        stream.flush().expect("flush raw bytes");
    }

    /// A second handle on the TCP stream (for writing from another thread).
    pub fn stream_clone(&self) -> TcpStream {
        self.ws.get_ref().try_clone().expect("clone the TCP stream")
    }

    /// The next text, binary or close frame (pings and pongs are skipped), or `Timeout`.
    pub fn recv_frame(&mut self, timeout: Duration) -> Frame {
        let deadline = Instant::now() + timeout;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Frame::Timeout;
            }
            let remaining = (deadline - now).max(Duration::from_millis(1));
            let _ = self.ws.get_mut().set_read_timeout(Some(remaining));
            match self.ws.read() {
                Ok(Message::Text(text)) => return Frame::Text(text.as_str().to_string()),
                Ok(Message::Binary(bytes)) => return Frame::Binary(bytes.to_vec()),
                Ok(Message::Close(frame)) => {
                    return match frame {
                        Some(f) => Frame::Close(Some(u16::from(f.code)), f.reason.as_str().to_string()),
                        None => Frame::Close(None, String::new()),
                    }
                }
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e))
                    if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut =>
                {
                    continue
                }
                Err(e) => return Frame::Dropped(e.to_string()),
            }
        }
    }

    /// The next frame, which must be a text frame holding JSON.
    #[track_caller]
    pub fn recv_json(&mut self, timeout: Duration) -> Value {
        match self.recv_frame(timeout) {
            Frame::Text(text) => serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("server sent a text frame that is not JSON ({e}): {text}")),
            other => panic!("expected a JSON text frame, got {}", describe(&other)),
        }
    }

    /// The next frame, which must be a binary frame.
    #[track_caller]
    pub fn recv_binary(&mut self, timeout: Duration) -> Vec<u8> {
        match self.recv_frame(timeout) {
            Frame::Binary(bytes) => bytes,
            other => panic!("expected a binary frame, got {}", describe(&other)),
        }
    }

    /// The next frame, which must be a close frame; returns its code.
    #[track_caller]
    pub fn recv_close(&mut self, timeout: Duration) -> Option<u16> {
        match self.recv_frame(timeout) {
            Frame::Close(code, _) => code,
            other => panic!("expected a close frame, got {}", describe(&other)),
        }
    }

    /// Asserts that nothing (no data frame, no close, no disconnect) arrives for `duration`.
    #[track_caller]
    pub fn expect_silence(&mut self, duration: Duration) {
        match self.recv_frame(duration) {
            Frame::Timeout => {}
            other => panic!(
                "expected no frame for {duration:?}, got {}",
                describe(&other)
            ),
        }
    }

    /// Sends a close frame (best effort).
    pub fn close(&mut self) {
        let _ = self.ws.close(None);
        let _ = self.ws.flush();
    }
}

/// A readable rendering of a frame for assertion messages.
pub fn describe(frame: &Frame) -> String {
    match frame {
        Frame::Text(t) => format!("text frame {t}"),
        Frame::Binary(b) => format!("binary frame {}", hex_preview(b)),
        Frame::Close(code, reason) => format!("close frame (code {code:?}, reason {reason:?})"),
        Frame::Dropped(why) => format!("connection dropped without close frame ({why})"),
        Frame::Timeout => "nothing (timed out)".to_string(),
    }
}

pub fn hex_preview(bytes: &[u8]) -> String {
    let shown: Vec<String> = bytes.iter().take(64).map(|b| format!("{b:02x}")).collect();
    let text = String::from_utf8_lossy(bytes);
    let text: String = text.chars().take(120).collect();
    format!(
        "[{} bytes: {}{} | {:?}]",
        bytes.len(),
        shown.join(" "),
        if bytes.len() > 64 { " …" } else { "" },
        text
    )
}

// ---------------------------------------------------------------------------------------------
// Keys and connections
// ---------------------------------------------------------------------------------------------

/// The anon key, minted once per test binary.
pub fn anon() -> &'static str {
    static KEY: OnceLock<String> = OnceLock::new();
    KEY.get_or_init(crate::support::anon_key)
}

pub fn connect_v1(server: &Server) -> Client {
    Client::connect(&server.ws_url(anon(), "1.0.0"))
}

pub fn connect_v2(server: &Server) -> Client {
    Client::connect(&server.ws_url(anon(), "2.0.0"))
}

// ---------------------------------------------------------------------------------------------
// Text frame builders
// ---------------------------------------------------------------------------------------------

/// V1 frame `{topic, event, payload, ref}` (no `join_ref` key), as the product docs send it.
pub fn v1(topic: &str, event: &str, payload: Value, r#ref: Option<&str>) -> String {
    json!({"topic": topic, "event": event, "payload": payload, "ref": r#ref}).to_string()
}

/// V1 frame with a `join_ref` key, as the official clients send it.
pub fn v1j(topic: &str, event: &str, payload: Value, r#ref: Option<&str>, join_ref: Option<&str>) -> String {
    json!({"topic": topic, "event": event, "payload": payload, "ref": r#ref, "join_ref": join_ref})
        .to_string()
}

/// V2 frame `[join_ref, ref, topic, event, payload]`.
pub fn v2(join_ref: Option<&str>, r#ref: Option<&str>, topic: &str, event: &str, payload: Value) -> String {
    json!([join_ref, r#ref, topic, event, payload]).to_string()
}

/// What a V1 server frame must look like.
pub fn v1_frame(topic: &str, event: &str, payload: Value, r#ref: Option<&str>) -> Value {
    json!({"topic": topic, "event": event, "payload": payload, "ref": r#ref})
}

/// A V1 `phx_reply`.
pub fn v1_reply(topic: &str, r#ref: Option<&str>, status: &str, response: Value) -> Value {
    v1_frame(topic, "phx_reply", json!({"status": status, "response": response}), r#ref)
}

/// A V2 server frame.
pub fn v2_frame(join_ref: Option<&str>, r#ref: Option<&str>, topic: &str, event: &str, payload: Value) -> Value {
    json!([join_ref, r#ref, topic, event, payload])
}

/// A V2 `phx_reply`.
pub fn v2_reply(join_ref: Option<&str>, r#ref: Option<&str>, topic: &str, status: &str, response: Value) -> Value {
    v2_frame(join_ref, r#ref, topic, "phx_reply", json!({"status": status, "response": response}))
}

/// The `ok` join reply payload's `response` for a join without bindings.
pub fn ok_join_response() -> Value {
    json!({"postgres_changes": []})
}

/// A realtime-js style channel config.
pub fn config(self_: bool, ack: bool) -> Value {
    json!({
        "broadcast": {"self": self_, "ack": ack},
        "presence": {"key": "", "enabled": false},
        "postgres_changes": [],
        "private": false
    })
}

/// A user broadcast payload as the clients put it in a JSON `broadcast` frame.
pub fn user_broadcast(event: &str, payload: Value) -> Value {
    json!({"type": "broadcast", "event": event, "payload": payload})
}

/// Joins over V1 (with `join_ref` = `ref`), asserting the exact `ok` reply.
#[track_caller]
pub fn join_v1(client: &mut Client, topic: &str, join_ref: &str, config: Value) {
    client.send_text(&v1j(topic, "phx_join", json!({"config": config}), Some(join_ref), Some(join_ref)));
    let reply = client.recv_json(WAIT);
    assert_eq!(
        reply,
        v1_reply(topic, Some(join_ref), "ok", ok_join_response()),
        "V1 join reply for {topic}"
    );
}

/// Joins over V2 (`[join_ref, join_ref, topic, "phx_join", ...]`), asserting the exact `ok` reply.
#[track_caller]
pub fn join_v2(client: &mut Client, topic: &str, join_ref: &str, config: Value) {
    client.send_text(&v2(Some(join_ref), Some(join_ref), topic, "phx_join", json!({"config": config})));
    let reply = client.recv_json(WAIT);
    assert_eq!(
        reply,
        v2_reply(Some(join_ref), Some(join_ref), topic, "ok", ok_join_response()),
        "V2 join reply for {topic}"
    );
}

/// Sends a V1 heartbeat and asserts that the very next frame is its reply.
#[track_caller]
pub fn heartbeat_v1(client: &mut Client, r#ref: &str) {
    client.send_text(&v1("phoenix", "heartbeat", json!({}), Some(r#ref)));
    let reply = client.recv_json(WAIT);
    assert_eq!(reply, v1_reply("phoenix", Some(r#ref), "ok", json!({})), "V1 heartbeat reply");
}

/// Sends a V2 heartbeat and asserts that the very next frame is its reply.
#[track_caller]
pub fn heartbeat_v2(client: &mut Client, r#ref: &str) {
    client.send_text(&v2(None, Some(r#ref), "phoenix", "heartbeat", json!({})));
    let reply = client.recv_json(WAIT);
    assert_eq!(
        reply,
        v2_reply(None, Some(r#ref), "phoenix", "ok", json!({})),
        "V2 heartbeat reply"
    );
}

// ---------------------------------------------------------------------------------------------
// V2 binary frames (PROTOCOL.md §1.6.2)
// ---------------------------------------------------------------------------------------------

fn len_u8(field: &str, bytes: &[u8]) -> u8 {
    u8::try_from(bytes.len()).unwrap_or_else(|_| panic!("{field} is longer than 255 bytes"))
}

/// Client → server kind 3 (user broadcast push):
/// `3, join_ref_len, ref_len, topic_len, user_event_len, metadata_len, encoding,
///  join_ref, ref, topic, user_event, metadata, payload`.
pub fn kind3(
    join_ref: &str,
    r#ref: &str,
    topic: &str,
    event: &str,
    metadata: &[u8],
    encoding: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut out = vec![
        3,
        len_u8("join_ref", join_ref.as_bytes()),
        len_u8("ref", r#ref.as_bytes()),
        len_u8("topic", topic.as_bytes()),
        len_u8("event", event.as_bytes()),
        len_u8("metadata", metadata),
        encoding,
    ];
    out.extend_from_slice(join_ref.as_bytes());
    out.extend_from_slice(r#ref.as_bytes());
    out.extend_from_slice(topic.as_bytes());
    out.extend_from_slice(event.as_bytes());
    out.extend_from_slice(metadata);
    out.extend_from_slice(payload);
    out
}

/// A kind-3 frame with a JSON payload (encoding 1) and no metadata, as realtime-js sends it.
pub fn kind3_json(join_ref: &str, r#ref: &str, topic: &str, event: &str, payload: &Value) -> Vec<u8> {
    kind3(join_ref, r#ref, topic, event, b"", 1, payload.to_string().as_bytes())
}

/// Server → client kind 4 (user broadcast), decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct Kind4 {
    pub topic: String,
    pub event: String,
    pub metadata: Vec<u8>,
    pub encoding: u8,
    pub payload: Vec<u8>,
}

impl Kind4 {
    /// The payload parsed as JSON (panics when it is not JSON).
    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.payload)
            .unwrap_or_else(|e| panic!("kind-4 payload is not JSON ({e}): {}", hex_preview(&self.payload)))
    }
}

/// Parses `4, topic_len, user_event_len, metadata_len, encoding, topic, user_event, metadata,
/// payload`; panics with the frame bytes when it does not have that shape.
#[track_caller]
pub fn parse_kind4(bytes: &[u8]) -> Kind4 {
    assert!(
        bytes.len() >= 5 && bytes[0] == 4,
        "expected a kind-4 binary frame, got {}",
        hex_preview(bytes)
    );
    let (topic_len, event_len, meta_len, encoding) =
        (bytes[1] as usize, bytes[2] as usize, bytes[3] as usize, bytes[4]);
    let header_end = 5 + topic_len + event_len + meta_len;
    assert!(
        bytes.len() >= header_end,
        "kind-4 frame shorter than its header says: {}",
        hex_preview(bytes)
    );
    let mut at = 5;
    let mut take = |n: usize| {
        let slice = &bytes[at..at + n];
        at += n;
        slice.to_vec()
    };
    let topic = String::from_utf8(take(topic_len)).expect("kind-4 topic is UTF-8");
    let event = String::from_utf8(take(event_len)).expect("kind-4 event is UTF-8");
    let metadata = take(meta_len);
    Kind4 {
        topic,
        event,
        metadata,
        encoding,
        payload: bytes[header_end..].to_vec(),
    }
}

// ---------------------------------------------------------------------------------------------
// Raw WebSocket frames (RFC 6455 §5.2)
// ---------------------------------------------------------------------------------------------

/// A single final frame with `opcode` (1 text, 2 binary, 8 close, 9 ping), masked with `mask`
/// when given (clients MUST mask; pass `None` to produce an illegal unmasked client frame).
pub fn raw_frame(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = raw_frame_header(opcode, payload.len() as u64, mask);
    match mask {
        Some(key) => out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4])),
        None => out.extend_from_slice(payload),
    }
    out
}

/// Only the header of a final frame announcing `len` payload bytes.
pub fn raw_frame_header(opcode: u8, len: u64, mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = vec![0x80 | (opcode & 0x0f)];
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    if len < 126 {
        out.push(mask_bit | len as u8);
    } else if len <= u16::MAX as u64 {
        out.push(mask_bit | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(mask_bit | 127);
        out.extend_from_slice(&len.to_be_bytes());
    }
    if let Some(key) = mask {
        out.extend_from_slice(&key);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Raw HTTP upgrade requests, to see status codes and bodies of refused handshakes
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn body_json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body_text()))
    }
}

/// Sends a request with `method` and `target` (path + query) plus WebSocket upgrade headers
/// (unless `upgrade` is false) and `extra` headers; reads the status, headers and body.
/// A 101 answer is returned without reading further.
pub fn raw_http(
    addr: SocketAddr,
    method: &str,
    target: &str,
    upgrade: bool,
    extra: &[(&str, &str)],
) -> HttpResponse {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("tcp connect");
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut request = format!("{method} {target} HTTP/1.1\r\nHost: localhost\r\n");
    if upgrade {
        request.push_str(
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n",
        );
    } else {
        request.push_str("Connection: close\r\n");
    }
    for (name, value) in extra {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).expect("write request");

    let mut buf = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        assert!(Instant::now() < deadline, "no complete HTTP head within 10 s: {:?}", String::from_utf8_lossy(&buf));
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk) {
            Ok(0) => panic!("connection closed before the HTTP head was complete: {:?}", String::from_utf8_lossy(&buf)),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => panic!("reading the HTTP head: {e}; got so far {:?}", String::from_utf8_lossy(&buf)),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut response = HttpResponse { status, headers, body: Vec::new() };
    if status == 101 {
        return response;
    }
    let mut rest = buf[head_end..].to_vec();
    let read_more = |stream: &mut TcpStream, rest: &mut Vec<u8>| -> bool {
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                rest.extend_from_slice(&chunk[..n]);
                true
            }
        }
    };
    if let Some(len) = response.header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        while rest.len() < len && read_more(&mut stream, &mut rest) {}
        rest.truncate(len);
        response.body = rest;
    } else if response
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        let mut body = Vec::new();
        loop {
            let Some(line_end) = rest.windows(2).position(|w| w == b"\r\n") else {
                if !read_more(&mut stream, &mut rest) {
                    break;
                }
                continue;
            };
            let size_text = String::from_utf8_lossy(&rest[..line_end]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
                .unwrap_or_else(|_| panic!("bad chunk size {size_text:?}"));
            while rest.len() < line_end + 2 + size + 2 && read_more(&mut stream, &mut rest) {}
            if size == 0 {
                break;
            }
            body.extend_from_slice(&rest[line_end + 2..line_end + 2 + size]);
            rest.drain(..line_end + 2 + size + 2);
        }
        response.body = body;
    } else {
        // No length: the body ends when the server closes (bounded by the read timeout).
        stream.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        while read_more(&mut stream, &mut rest) {}
        response.body = rest;
    }
    response
}

/// A GET with WebSocket upgrade headers.
pub fn upgrade(addr: SocketAddr, target: &str, extra: &[(&str, &str)]) -> HttpResponse {
    raw_http(addr, "GET", target, true, extra)
}

// ---------------------------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------------------------

/// `token` with its signature swapped for the signature of a different token: still three
/// well-formed base64url parts, but the signature does not match.
#[track_caller]
pub fn with_wrong_signature(token: &str, other: &str) -> String {
    let mut parts: Vec<&str> = token.split('.').collect();
    let other_sig = other.split('.').nth(2).expect("other token has a signature");
    assert_eq!(parts.len(), 3, "a JWT has three parts");
    assert_ne!(parts[2], other_sig, "the two tokens must differ");
    parts[2] = other_sig;
    parts.join(".")
}

/// Parses the `N` out of `... Token has expired N seconds ago`.
#[track_caller]
pub fn expired_seconds(reason: &str, prefix: &str) -> i64 {
    let rest = reason
        .strip_prefix(prefix)
        .unwrap_or_else(|| panic!("reason {reason:?} does not start with {prefix:?}"));
    let number = rest
        .strip_suffix(" seconds ago")
        .unwrap_or_else(|| panic!("reason {reason:?} does not end with \" seconds ago\""));
    number
        .parse()
        .unwrap_or_else(|_| panic!("reason {reason:?}: {number:?} is not an integer"))
}
