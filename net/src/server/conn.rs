//! One TCP connection: the HTTP head, then either a plain response or a WebSocket session.
//!
//! Two tasks per WebSocket: this one reads (the socket's read timeout is the idle timeout, so
//! no read is ever raced against a timer), and a writer task drains the outbox in batches.
//! When either side ends, the writer shuts the socket down, which wakes a pending read.

use std::cell::RefCell;
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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

/// Time allowed for a client to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
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

pub(crate) async fn serve(shard: Rc<Shard>, mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(HEAD_TIMEOUT));
    let mut buf = BytesMut::with_capacity(1024);
    let head = loop {
        match http::parse_head(&buf) {
            Ok(Some(head)) => break head,
            Ok(None) => {}
            Err(error) => {
                let status = if error == http::HeadError::TooLarge { 431 } else { 400 };
                let _ = stream.write_all(&http::response(status, "text/plain", b"")).await;
                return;
            }
        }
        let filled = buf.len();
        buf.resize(filled + 1024, 0);
        match stream.read(&mut buf[filled..]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.truncate(filled + n),
        }
    };
    let _ = buf.split_to(head.len);
    let response = match http::route(&head) {
        Route::WebSocket => return upgrade(shard, stream, head, buf).await,
        Route::Health => match &shard.config.postgres {
            Some(link) if !link.healthy.load(std::sync::atomic::Ordering::Relaxed) => http::response(503, "text/plain", engine::client_error::HttpMessage::DatabaseUnavailable.text().as_bytes()),
            _ => http::response(200, "text/plain", b"ok"),
        },
        Route::Metrics => http::response(200, "text/plain; version=0.0.4", shard.metrics.render().as_bytes()),
        Route::Ping => http::json_message(200, "message", "Success"),
        Route::Rest(route) => rest_call(&shard, &mut stream, &head, buf, &route).await,
        Route::NotFound => http::not_found(),
    };
    let _ = stream.write_all(&response).await;
}

/// Reads the body of a REST call (Content-Length only, at most `HTTP_BODY_BYTES_MAX`), runs it
/// and publishes what it produced.
async fn rest_call(shard: &Rc<Shard>, stream: &mut TcpStream, head: &http::Head, mut body: BytesMut, route: &rest::RestRoute) -> Bytes {
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
    let mut chunk = vec![0u8; 16 * 1024];
    while body.len() < length {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return rest::response(400, b""),
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    body.truncate(length);
    let result = rest::handle(route, head, &body, &shard.config.keys, shard.config.limits.payload_bytes_max, shard.config.database, unix_now());
    let mut response = result.response;
    let mut outgoing = result.outgoing;
    if let (Some(checks), Some(link)) = (result.private_checks, &shard.config.postgres) {
        // One INSERT-policy check per distinct topic (PROTOCOL.md §8.2); granted topics are sent,
        // the others dropped (batch) or answered 403 (single).
        let mut verdicts: Vec<(String, engine::changes::AuthzResult)> = Vec::new();
        for item in &checks.messages {
            if verdicts.iter().any(|(topic, _)| **topic == *item.topic.sub) {
                continue;
            }
            let verdict = write_check(link, &checks.claims, &item.topic.sub).await;
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
    let messages = outgoing
        .into_iter()
        .map(|o| (o.topic.owner(shard.config.shards), engine::ShardMsg::Publish { topic: o.topic, message: o.message }))
        .collect();
    shard.route(messages);
    response
}

/// Asks the Postgres core whether `claims` may write broadcasts to `topic` (bounded wait).
async fn write_check(link: &super::PgLink, claims: &auth::Claims, topic: &str) -> engine::changes::AuthzResult {
    let (reply, answer) = flume::bounded(1);
    let request = engine::changes::AuthzRequest {
        role: claims.role.clone(),
        claims_json: claims.json.to_string(),
        sub: claims.sub.clone(),
        topic: topic.to_string(),
        kind: engine::changes::CheckKind::Write,
    };
    let failed = |message: &str| engine::changes::AuthzResult { broadcast: false, presence: false, error: Some(message.to_string()) };
    if link.commands.try_send(engine::changes::Command::Authorize { request, reply: engine::changes::AuthzReply::Caller(engine::changes::CallerReply::new(move |result| {
        let _ = reply.try_send(result);
    })) }).is_err() {
        return failed("authorization queue full");
    }
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

async fn refuse(shard: &Shard, stream: &mut TcpStream, refusal: UpgradeRefusal) {
    if let UpgradeRefusal::Refused(error) = &refusal {
        tracing::debug!(?error, "upgrade refused");
        if error.delayed() && !shard.config.limits.connect_error_delay.is_zero() {
            glommio::timer::sleep(shard.config.limits.connect_error_delay).await;
        }
    }
    let _ = stream.write_all(&http::upgrade_refused(&refusal)).await;
}

async fn upgrade(shard: Rc<Shard>, mut stream: TcpStream, head: http::Head, mut leftover: BytesMut) {
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
    if stream.write_all(&http::switching_protocols(&upgrade.key)).await.is_err() {
        return;
    }
    let _ = stream.set_read_timeout(Some(shard.config.limits.idle_timeout));
    let _ = stream.set_write_timeout(Some(WRITE_STALL_TIMEOUT));
    let id = shard.next_conn_id();
    let conn = Rc::new(Conn {
        outbox: Outbox::new(),
        session: RefCell::new(Session::new(upgrade.format, shard.id, id, upgrade.token)),
        fd: stream.as_raw_fd(),
    });
    shard.conns.borrow_mut().insert(id, Rc::clone(&conn));
    metrics::add(&shard.counters().connections_open, 1);
    metrics::add(&shard.counters().connections_total, 1);

    let (reader, writer) = futures_lite::io::split(stream);
    let writer_task = glommio::spawn_local(write_loop(Rc::clone(&conn), writer));
    let reason = read_loop(&shard, &conn, reader, leftover).await;
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
async fn read_loop(shard: &Rc<Shard>, conn: &Rc<Conn>, mut reader: ReadHalf<TcpStream>, mut buf: BytesMut) -> Option<CloseReason> {
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
                Err(error) => {
                    tracing::debug!(%error, "WebSocket protocol error");
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
    shard.apply(conn, fx);
    close
}

async fn write_loop(conn: Rc<Conn>, mut writer: WriteHalf<TcpStream>) {
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
            }
            Next::Close(reason) => {
                let frame: Bytes = ws::encode_close(reason.code(), reason.text());
                let _ = writer.write_all(&frame).await;
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
