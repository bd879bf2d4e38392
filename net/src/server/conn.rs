//! One TCP connection: the HTTP head, then either a plain response or a WebSocket session.
//!
//! Two tasks per WebSocket: this one reads (the socket's read timeout is the idle timeout, so
//! no read is ever raced against a timer), and a writer task drains the outbox in batches.
//! When either side ends, the writer shuts the socket down, which wakes a pending read.

use std::cell::RefCell;
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use futures_lite::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use glommio::net::TcpStream;

use auth::AuthError;
use engine::client_error::{CloseReason, UpgradeError};
use engine::limits::{HTTP_BODY_BYTES_MAX, WS_MESSAGE_BYTES_MAX};

use super::metrics;
use super::outbox::{Next, Outbox, OutboxState};
use super::shard::{Conn, Shard};
use crate::http::{self, Route, UpgradeRefusal};
use crate::rest;
use crate::session::{Context, Effects, Session};
use crate::ws::{self, OpCode, WsDecoder, WsError, WsMessage};

/// Time allowed for a client to complete the TLS handshake and send its whole request head: a
/// deadline, not a per-read timeout, so a client trickling bytes cannot hold a connection.
pub(crate) const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for a whole REST body, from the end of the head.
pub(crate) const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes asked for per `read` call: starts small (an idle connection holds little), doubles while
/// reads fill it, up to the maximum; reset when the buffer drains after a burst.
const READ_CHUNK_MIN_BYTES: usize = 512;
const READ_CHUNK_MAX_BYTES: usize = 64 * 1024;
/// A write that makes no progress for this long means the peer stopped reading: the connection
/// is dropped (its queue is already bounded; this frees the socket too).
const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Most bytes the writer gathers into one write.
const WRITE_BATCH_BYTES: usize = 256 * 1024;

pub(crate) fn unix_now() -> i64 {
    unix_now_ms() / 1000
}

pub(crate) fn unix_now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// A connection's byte stream: plain TCP or TLS over it.
pub(crate) trait Transport: futures_lite::AsyncRead + futures_lite::AsyncWrite + Unpin + 'static {
    /// The TCP socket underneath (timeouts, descriptor).
    fn tcp(&self) -> &TcpStream;
}

impl Transport for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

impl Transport for futures_rustls::server::TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
}

/// Reads more bytes into `buf` before `deadline` (the socket's read timeout is set to what is
/// left, so no read is raced against a timer). `None` on EOF, error or a passed deadline.
async fn read_by<S: Transport>(stream: &mut S, buf: &mut BytesMut, chunk: usize, deadline: Instant) -> Option<usize> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return None;
    }
    let _ = stream.tcp().set_read_timeout(Some(left.max(Duration::from_millis(1))));
    let filled = buf.len();
    buf.resize(filled + chunk, 0);
    match stream.read(&mut buf[filled..]).await {
        Ok(0) | Err(_) => {
            buf.truncate(filled);
            None
        }
        Ok(n) => {
            buf.truncate(filled + n);
            Some(n)
        }
    }
}

/// Writes a whole response and flushes it (TLS buffers records until flushed).
async fn send<S: Transport>(stream: &mut S, bytes: &[u8]) {
    if stream.write_all(bytes).await.is_ok() {
        let _ = stream.flush().await;
    }
}

/// The client's address for logs.
fn peer_of(addr: &Option<std::net::SocketAddr>) -> String {
    addr.map_or_else(|| "?".to_string(), |a| a.to_string())
}

pub(crate) async fn serve(shard: Rc<Shard>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let stream_peer = stream.peer_addr().ok();
    let deadline = Instant::now() + HEAD_TIMEOUT;
    match &shard.config.tls {
        None => serve_on(shard, stream, deadline).await,
        Some(tls) => {
            let _ = stream.set_read_timeout(Some(HEAD_TIMEOUT));
            let _ = stream.set_write_timeout(Some(HEAD_TIMEOUT));
            match tls.acceptor().accept(stream).await {
                Ok(stream) => serve_on(shard, stream, deadline).await,
                // A client speaking plain HTTP (or an old TLS) ends here: the socket is closed.
                Err(error) => tracing::debug!(peer = %peer_of(&stream_peer), %error, "TLS handshake failed"),
            }
        }
    }
}

async fn serve_on<S: Transport>(shard: Rc<Shard>, mut stream: S, deadline: Instant) {
    let mut buf = BytesMut::with_capacity(1024);
    let head = loop {
        match http::parse_head(&buf) {
            Ok(Some(head)) => break head,
            Ok(None) => {}
            Err(error) => {
                let status = if error == http::HeadError::TooLarge { 431 } else { 400 };
                send(&mut stream, &http::response(status, "text/plain", b"")).await;
                return;
            }
        }
        if read_by(&mut stream, &mut buf, 1024, deadline).await.is_none() {
            return;
        }
    };
    let _ = buf.split_to(head.len);
    let response = match http::route(&head) {
        Route::WebSocket => return upgrade(shard, stream, head, buf).await,
        Route::Health if shard.config.control.is_draining() => http::response(503, "text/plain", engine::client_error::DRAINING.as_bytes()),
        Route::Health => match &shard.config.postgres {
            Some(link) if !link.healthy.load(std::sync::atomic::Ordering::Relaxed) => http::response(503, "text/plain", engine::client_error::HttpMessage::DatabaseUnavailable.text().as_bytes()),
            _ => http::response(200, "text/plain", b"ok"),
        },
        Route::Metrics => {
            let mut text = shard.metrics.render();
            for hook in &shard.config.metrics_hooks {
                (hook.0)(&mut text);
            }
            http::response(200, "text/plain; version=0.0.4", text.as_bytes())
        }
        Route::Ping => http::json_message(200, "message", "Success"),
        Route::Rest(_) if shard.config.control.is_draining() => rest::draining(),
        Route::Rest(route) => rest_call(&shard, &mut stream, &head, buf, &route).await,
        Route::Page(asset) => http::response_with_headers(200, asset.content_type, crate::assets::PAGE_HEADERS, asset.body),
        Route::StatusApi => status_call(&shard, &head),
        Route::NotFound => http::not_found(),
    };
    send(&mut stream, &response).await;
}

/// `GET /api/status`: the status page's data, for the service role only (it names topics).
fn status_call(shard: &Shard, head: &http::Head) -> Bytes {
    let service_role = rest::authorize(head, &shard.config.keys, unix_now()).is_some_and(|claims| claims.role == "service_role");
    if !service_role {
        return http::json_message(401, "message", engine::client_error::HttpMessage::ServiceRoleRequired.text());
    }
    let postgres = shard.config.postgres.as_ref().map(|link| {
        let mut section = shard.config.postgres_status.as_ref().map_or_else(|| serde_json::json!({}), |hook| (hook.0)());
        section["connected"] = serde_json::Value::Bool(link.healthy.load(std::sync::atomic::Ordering::Relaxed));
        section
    });
    let body = shard.status.render(unix_now(), postgres).to_string();
    http::response_with_headers(200, "application/json", "Cache-Control: no-store\r\n", body.as_bytes())
}

/// Reads the body of a REST call (Content-Length only, at most `HTTP_BODY_BYTES_MAX`), runs it
/// and publishes what it produced.
async fn rest_call<S: Transport>(shard: &Rc<Shard>, stream: &mut S, head: &http::Head, mut body: BytesMut, route: &rest::RestRoute) -> Bytes {
    match head.method.as_str() {
        "OPTIONS" => return rest::response(204, b""),
        "POST" => {}
        _ => return rest::response(405, b""),
    }
    if head.header("transfer-encoding").is_some() {
        return rest::response(411, b"");
    }
    let length: usize = match head.header("content-length").map(|v| v.trim().parse()) {
        None => 0,
        Some(Ok(length)) => length,
        Some(Err(_)) => return rest::response(400, b""),
    };
    if length > HTTP_BODY_BYTES_MAX {
        return rest::response(413, b"");
    }
    // The whole body within BODY_TIMEOUT, however it is trickled.
    let deadline = Instant::now() + BODY_TIMEOUT;
    while body.len() < length {
        let want = (length - body.len()).min(16 * 1024);
        if read_by(stream, &mut body, want, deadline).await.is_none() {
            return rest::response(400, b"");
        }
    }
    body.truncate(length);
    let result = rest::handle(route, head, &body, &shard.config.keys, shard.config.limits.payload_bytes_max, shard.config.database, unix_now());
    let mut response = result.response;
    let mut outgoing = result.outgoing;
    if let (Some(checks), Some(_)) = (result.private_checks, &shard.config.postgres) {
        // One INSERT-policy check per distinct topic (PROTOCOL.md §8.2); granted topics are sent,
        // the others dropped (batch) or answered 403 (single).
        let mut verdicts: Vec<(String, engine::changes::AuthzResult)> = Vec::new();
        for item in &checks.messages {
            if verdicts.iter().any(|(topic, _)| **topic == *item.topic.sub) {
                continue;
            }
            let verdict = write_check(shard, &checks.claims, &item.topic.sub).await;
            verdicts.push((item.topic.sub.to_string(), verdict));
        }
        for item in checks.messages {
            let (_, verdict) = verdicts.iter().find(|(topic, _)| **topic == *item.topic.sub).expect("checked above");
            if checks.single {
                response = rest::private_response(verdict.broadcast, verdict.error.as_deref());
            }
            if verdict.broadcast && verdict.error.is_none() {
                outgoing.push(item);
            }
        }
    }
    metrics::add(&shard.counters().rest_messages, outgoing.len() as u64);
    let messages = outgoing
        .into_iter()
        .map(|o| (o.topic.owner(shard.config.shards), engine::ShardMsg::Publish { topic: o.topic, message: o.message }))
        .collect();
    shard.route(messages);
    response
}

/// Asks the Postgres core whether `claims` may write broadcasts to `topic` (bounded wait).
async fn write_check(shard: &Rc<Shard>, claims: &auth::Claims, topic: &str) -> engine::changes::AuthzResult {
    let (reply, answer) = flume::bounded(1);
    let request = engine::changes::AuthzRequest {
        role: claims.role.clone(),
        claims_json: claims.json.to_string(),
        sub: claims.sub.clone(),
        topic: topic.to_string(),
        kind: engine::changes::CheckKind::Write,
    };
    let failed = |message: &str| engine::changes::AuthzResult { broadcast: false, presence: false, error: Some(message.to_string()) };
    // Through the shard's command queue and its overflow: a momentarily full queue delays the
    // check instead of refusing it; the caller's wait below is bounded either way.
    shard.send_caller_command(engine::changes::Command::Authorize {
        request,
        reply: engine::changes::AuthzReply::Caller(engine::changes::CallerReply::new(move |result| {
            let _ = reply.try_send(result);
        })),
    });
    match glommio::timer::timeout(Duration::from_secs(10), async { Ok(answer.recv_async().await) }).await {
        Ok(Ok(result)) => result,
        _ => failed("authorization timed out"),
    }
}

fn upgrade_error(error: AuthError) -> UpgradeError {
    match error {
        AuthError::Missing => UpgradeError::ApiKeyMissing,
        AuthError::NoSigner { kid } => UpgradeError::NoSigner { kid },
        AuthError::BadSignature => UpgradeError::BadSignature,
        AuthError::Expired { .. } => UpgradeError::Expired,
        AuthError::MissingClaims => UpgradeError::MissingClaims,
        _ => UpgradeError::NotJwt,
    }
}

async fn refuse<S: Transport>(shard: &Shard, stream: &mut S, refusal: UpgradeRefusal) {
    if let UpgradeRefusal::Refused(error) = &refusal {
        let peer = peer_of(&stream.tcp().peer_addr().ok());
        tracing::debug!(%peer, status = error.status(), reason = %error.message().unwrap_or_default(), "upgrade refused");
        if error.delayed() && !shard.config.limits.connect_error_delay.is_zero() {
            glommio::timer::sleep(shard.config.limits.connect_error_delay).await;
        }
    }
    send(stream, &http::upgrade_refused(&refusal)).await;
}

async fn upgrade<S: Transport>(shard: Rc<Shard>, mut stream: S, head: http::Head, mut leftover: BytesMut) {
    let upgrade = match http::check_upgrade(&head) {
        Ok(upgrade) => upgrade,
        Err(refusal) => return refuse(&shard, &mut stream, refusal).await,
    };
    // The request's headers are not needed any more; a long-lived connection should not keep them.
    drop(head);
    if leftover.is_empty() {
        leftover = BytesMut::new();
    }
    if let Err(error) = shard.config.keys.verify(&upgrade.token, unix_now()) {
        return refuse(&shard, &mut stream, UpgradeRefusal::Refused(upgrade_error(error))).await;
    }
    if stream.write_all(&http::switching_protocols(&upgrade.key)).await.is_err() || stream.flush().await.is_err() {
        return;
    }
    let _ = stream.tcp().set_read_timeout(Some(shard.config.limits.idle_timeout));
    let _ = stream.tcp().set_write_timeout(Some(WRITE_STALL_TIMEOUT));
    let id = shard.next_conn_id();
    let conn = Rc::new(Conn {
        outbox: Outbox::new(),
        session: RefCell::new(Session::new(upgrade.format, shard.id, id, upgrade.token)),
        fd: stream.tcp().as_raw_fd(),
    });
    shard.conns.borrow_mut().insert(id, Rc::clone(&conn));
    let peer = peer_of(&stream.tcp().peer_addr().ok());
    tracing::debug!(%peer, conn = id.0, shard = shard.id.0, "connection opened");
    metrics::add(&shard.counters().connections_open, 1);
    metrics::add(&shard.counters().connections_total, 1);

    let (reader, writer) = futures_lite::io::split(stream);
    let writer_task = glommio::spawn_local(write_loop(Rc::clone(&shard), Rc::clone(&conn), writer));
    let reason = read_loop(&shard, &conn, reader, leftover, &peer).await;
    tracing::debug!(%peer, conn = id.0, close = reason.map(|r| r.code()), "connection closed");
    match reason {
        Some(reason) => conn.outbox.close(reason),
        None if conn.outbox.state() == OutboxState::Open => conn.outbox.kill(),
        None => {}
    }
    let mut fx = Effects::default();
    {
        let mut state = shard.state.borrow_mut();
        conn.session.borrow_mut().on_close(&mut state, &mut fx);
    }
    shard.route(fx.shard);
    shard.conns.borrow_mut().remove(&id);
    writer_task.await;
    metrics::sub(&shard.counters().connections_open, 1);
}

/// Reads and handles messages until the connection ends; returns the close to send, if any.
async fn read_loop<S: Transport>(shard: &Rc<Shard>, conn: &Rc<Conn>, mut reader: ReadHalf<S>, mut buf: BytesMut, peer: &str) -> Option<CloseReason> {
    let mut decoder = WsDecoder::new(WS_MESSAGE_BYTES_MAX);
    let mut want = READ_CHUNK_MIN_BYTES;
    loop {
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(message)) => {
                    if let Some(reason) = handle(shard, conn, message) {
                        return Some(reason);
                    }
                }
                Ok(None) => break,
                Err(WsError::TooBig) => return Some(CloseReason::MessageTooBig),
                Err(WsError::InvalidUtf8) => return Some(CloseReason::InvalidPayload),
                Err(error) => {
                    tracing::debug!(peer, %error, "WebSocket protocol error");
                    return Some(CloseReason::ProtocolError);
                }
            }
        }
        if conn.outbox.state() != OutboxState::Open {
            return None;
        }
        glommio::yield_if_needed().await;
        if buf.is_empty() && buf.capacity() > 2 * READ_CHUNK_MAX_BYTES {
            buf = BytesMut::new();
            want = READ_CHUNK_MIN_BYTES;
        }
        // Read straight into the connection's buffer: no per-connection scratch array.
        let filled = buf.len();
        buf.resize(filled + want, 0);
        let result = reader.read(&mut buf[filled..]).await;
        match result {
            Ok(0) => return None,
            Ok(n) => {
                buf.truncate(filled + n);
                if n == want {
                    want = (want * 2).min(READ_CHUNK_MAX_BYTES);
                }
            }
            Err(error) if error.kind() == ErrorKind::TimedOut => return Some(CloseReason::IdleTimeout),
            Err(_) => return None,
        }
    }
}

fn handle(shard: &Rc<Shard>, conn: &Rc<Conn>, message: WsMessage) -> Option<CloseReason> {
    let now_ms = unix_now_ms();
    let ctx = Context {
        limits: &shard.config.limits,
        keys: &shard.config.keys,
        database: shard.config.database,
        now_secs: now_ms / 1000,
        now_ms,
        presence_rate_exceeded: shard.presence_exceeded.get(),
    };
    let mut fx = Effects::default();
    let sampled = metrics::sample_read();
    match message {
        WsMessage::Text(bytes) | WsMessage::Binary(bytes) if bytes.is_empty() => {}
        WsMessage::Text(bytes) => {
            let mut state = shard.state.borrow_mut();
            conn.session.borrow_mut().on_text(&mut state, ctx, &bytes, &mut fx);
        }
        WsMessage::Binary(bytes) => {
            let mut state = shard.state.borrow_mut();
            conn.session.borrow_mut().on_binary(&mut state, ctx, &bytes, &mut fx);
        }
        WsMessage::Ping(payload) => fx.frames.push(ws::encode_frame(OpCode::Pong, &payload)),
        WsMessage::Pong => {}
        WsMessage::Close(_) => return Some(CloseReason::Normal),
    }
    let close = fx.close;
    if let Some(read_at) = sampled {
        metrics::stamp(&mut fx.shard, read_at);
    }
    shard.apply(conn, fx);
    close
}

async fn write_loop<S: Transport>(shard: Rc<Shard>, conn: Rc<Conn>, mut writer: WriteHalf<S>) {
    let mut frames: Vec<Bytes> = Vec::new();
    let mut batch = Vec::new();
    loop {
        match conn.outbox.next(WRITE_BATCH_BYTES, &mut frames).await {
            Next::Write => {
                let result = if let [frame] = frames.as_slice() {
                    writer.write_all(frame).await
                } else {
                    batch.clear();
                    for frame in &frames {
                        batch.extend_from_slice(frame);
                    }
                    writer.write_all(&batch).await
                };
                let result = match result {
                    Ok(()) => writer.flush().await,
                    Err(error) => Err(error),
                };
                frames.clear();
                // Keep no burst-sized buffers on an idle connection.
                if batch.capacity() > 16 * 1024 {
                    batch = Vec::new();
                }
                if frames.capacity() > 1024 {
                    frames = Vec::new();
                }
                if result.is_err() {
                    conn.outbox.kill();
                    break;
                }
                if let Some(read_at) = conn.outbox.written_probe() {
                    shard.observe_delivery(read_at);
                }
            }
            Next::Close(reason) => {
                let frame: Bytes = ws::encode_close(reason.code(), reason.text());
                if writer.write_all(&frame).await.is_ok() {
                    let _ = writer.flush().await;
                }
                break;
            }
            Next::Stop => break,
        }
    }
    shutdown(conn.fd);
}

/// Shuts the socket down in both directions, waking a read pending on it.
fn shutdown(fd: std::os::fd::RawFd) {
    // SAFETY: `fd` belongs to the stream whose halves are still alive (the connection task
    // awaits this writer before dropping them), so it is open and ours.
    unsafe {
        libc::shutdown(fd, libc::SHUT_RDWR);
    }
}
