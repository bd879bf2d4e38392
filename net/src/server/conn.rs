//! One TCP connection: the HTTP head, then either a plain response or a WebSocket session.
//!
//! One task per WebSocket owns both directions: it reads and handles messages, and it writes
//! the outbound queue whenever the shard's flusher does not (TLS, a full socket, closing; see
//! `outbox.rs` and `flush.rs`). No read carries a timer: the shard's once-a-second sweep closes
//! idle connections through their outbox. When the write side ends it shuts the socket down.

use std::cell::RefCell;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use futures_lite::io::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;

use auth::AuthError;
use engine::client_error::{CloseReason, RestError, UpgradeError};
use engine::limits::{HTTP_BODY_BYTES_MAX, WS_MESSAGE_BYTES_MAX};

use super::metrics;
use super::outbox::{Next, Outbox, OutboxState};
use super::shard::{Conn, Shard};
use crate::http::{self, Route, UpgradeRefusal};
use crate::rest;
use crate::session::{Effects, Session};
use crate::ws::{self, OpCode, WsDecoder, WsError, WsMessage};

/// Time allowed for a client to complete the TLS handshake and send its whole request head: a
/// deadline, not a per-read timeout, so a client trickling bytes cannot hold a connection.
pub(crate) const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for a whole REST body, from the end of the head.
pub(crate) const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes asked for per WebSocket read (into the shard's scratch buffer).
const READ_SCRATCH_BYTES: usize = 64 * 1024;
/// A write that makes no progress for this long means the peer stopped reading: the connection
/// is dropped (its queue is already bounded; this frees the socket too).
pub(crate) const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Most bytes the writer gathers into one write.
const WRITE_BATCH_BYTES: usize = 256 * 1024;

pub(crate) fn unix_now() -> i64 {
    unix_now_ms() / 1000
}

pub(crate) fn unix_now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// A connection's byte stream before the upgrade: plain TCP or TLS over it.
pub(crate) trait Transport: futures_lite::AsyncRead + futures_lite::AsyncWrite + Unpin + 'static {
    /// What the connection's socket becomes once it is a WebSocket.
    type Live: LiveSocket;
    /// The TCP socket underneath (timeouts, descriptor).
    fn tcp(&self) -> &TcpStream;
    /// The socket for the connection's live phase (after the upgrade response was written).
    fn into_live(self) -> std::io::Result<Self::Live>;
}

impl Transport for TcpStream {
    type Live = PlainSocket;

    fn tcp(&self) -> &TcpStream {
        self
    }

    /// Keeps the bare descriptor and drops glommio's stream: a live plain connection is read
    /// and written with non-blocking syscalls, waiting on the shard's epoll sets
    /// (`readiness.rs`), so it keeps no io_uring request, timer record or poll source. glommio
    /// gives its descriptor up only by closing it, so the socket is duplicated first; when the
    /// process is out of descriptors (the duplicate needs one more for a moment), the connection
    /// keeps glommio's stream instead and is served all the same.
    fn into_live(self) -> std::io::Result<PlainSocket> {
        // SAFETY: the descriptor belongs to `self`, open until `self` is dropped below; the
        // duplicate (close-on-exec) refers to the same socket and is owned from here on.
        match unsafe { std::os::fd::BorrowedFd::borrow_raw(self.as_raw_fd()) }.try_clone_to_owned() {
            Ok(fd) => {
                drop(self);
                Ok(PlainSocket::Bare(fd))
            }
            Err(error) => {
                tracing::debug!(%error, "no descriptor to spare: the connection keeps glommio's stream");
                Ok(PlainSocket::Stream(Box::new(self)))
            }
        }
    }
}

impl Transport for futures_rustls::server::TlsStream<TcpStream> {
    type Live = Self;

    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }

    fn into_live(self) -> std::io::Result<Self> {
        Ok(self)
    }
}

/// A WebSocket connection's socket, as its task reads and (on the slow path) writes it.
pub(crate) trait LiveSocket: 'static {
    /// Plain TCP: the shard's flusher writes the socket directly while it has room.
    const DIRECT: bool;
    /// The descriptor (the flusher's writes, shutdown).
    fn fd(&self) -> std::os::fd::RawFd;
    /// Reads into `buf` through the shard's `scratch` buffer.
    fn poll_recv(&mut self, cx: &mut TaskContext<'_>, conn: &Conn, id: engine::ConnId, scratch: &mut [u8], buf: &mut BytesMut) -> Poll<std::io::Result<usize>>;
    /// Writes from `bytes`.
    fn poll_send(&mut self, cx: &mut TaskContext<'_>, conn: &Conn, id: engine::ConnId, bytes: &[u8]) -> Poll<std::io::Result<usize>>;
    /// Pushes out what the transport buffers (TLS records).
    fn poll_flush_out(&mut self, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>>;
    /// The client's address (for logs; looked up when needed rather than kept).
    fn peer(&self) -> Option<std::net::SocketAddr>;
}

/// A read through glommio (TLS, or a plain stream kept for want of a descriptor) into the
/// shard's `scratch`, appended to `buf`.
fn poll_read_into<R: futures_lite::AsyncRead + Unpin>(reader: &mut R, cx: &mut TaskContext<'_>, scratch: &mut [u8], buf: &mut BytesMut) -> Poll<std::io::Result<usize>> {
    match Pin::new(reader).poll_read(cx, scratch) {
        Poll::Ready(Ok(n)) => {
            buf.extend_from_slice(&scratch[..n]);
            Poll::Ready(Ok(n))
        }
        other => other,
    }
}

/// A live plain TCP connection: the bare descriptor (see [`Transport::into_live`]), or, when
/// the process had no descriptor to spare at the upgrade, glommio's stream (boxed: rare).
pub(crate) enum PlainSocket {
    Bare(std::os::fd::OwnedFd),
    Stream(Box<TcpStream>),
}

impl LiveSocket for PlainSocket {
    const DIRECT: bool = true;

    fn fd(&self) -> std::os::fd::RawFd {
        match self {
            PlainSocket::Bare(fd) => fd.as_raw_fd(),
            PlainSocket::Stream(stream) => stream.as_raw_fd(),
        }
    }

    fn poll_recv(&mut self, cx: &mut TaskContext<'_>, conn: &Conn, id: engine::ConnId, scratch: &mut [u8], buf: &mut BytesMut) -> Poll<std::io::Result<usize>> {
        match self {
            PlainSocket::Bare(_) => super::readiness::poll_read(cx, conn, id, scratch, buf),
            PlainSocket::Stream(stream) => poll_read_into(&mut **stream, cx, scratch, buf),
        }
    }

    fn poll_send(&mut self, cx: &mut TaskContext<'_>, conn: &Conn, id: engine::ConnId, bytes: &[u8]) -> Poll<std::io::Result<usize>> {
        match self {
            PlainSocket::Bare(_) => super::readiness::poll_write(cx, conn, id, bytes),
            // glommio's write timeout (WRITE_STALL_TIMEOUT) bounds a stalled write.
            PlainSocket::Stream(stream) => futures_lite::AsyncWrite::poll_write(Pin::new(&mut **stream), cx, bytes),
        }
    }

    fn poll_flush_out(&mut self, _: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn peer(&self) -> Option<std::net::SocketAddr> {
        match self {
            PlainSocket::Bare(fd) => socket2::SockRef::from(fd).peer_addr().ok().and_then(|address| address.as_socket()),
            PlainSocket::Stream(stream) => stream.peer_addr().ok(),
        }
    }
}

impl LiveSocket for futures_rustls::server::TlsStream<TcpStream> {
    const DIRECT: bool = false;

    fn fd(&self) -> std::os::fd::RawFd {
        self.get_ref().0.as_raw_fd()
    }

    fn poll_recv(&mut self, cx: &mut TaskContext<'_>, _: &Conn, _: engine::ConnId, scratch: &mut [u8], buf: &mut BytesMut) -> Poll<std::io::Result<usize>> {
        poll_read_into(self, cx, scratch, buf)
    }

    fn poll_send(&mut self, cx: &mut TaskContext<'_>, _: &Conn, _: engine::ConnId, bytes: &[u8]) -> Poll<std::io::Result<usize>> {
        futures_lite::AsyncWrite::poll_write(Pin::new(self), cx, bytes)
    }

    fn poll_flush_out(&mut self, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        futures_lite::AsyncWrite::poll_flush(Pin::new(self), cx)
    }

    fn peer(&self) -> Option<std::net::SocketAddr> {
        self.get_ref().0.peer_addr().ok()
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
        Route::Health if !single_database_healthy(&shard) => http::response(503, "text/plain", engine::client_error::HttpMessage::DatabaseUnavailable.text().as_bytes()),
        Route::Health if shard.config.cluster.as_ref().is_some_and(|port| !(port.connected)()) => http::response(200, "text/plain", b"ok degraded"),
        Route::Health => http::response(200, "text/plain", b"ok"),
        Route::Metrics => {
            let mut text = shard.metrics.render();
            for hook in &shard.config.metrics_hooks {
                (hook.0)(&mut text);
            }
            super::tenancy::render_metrics(&shard.config.tenants.load(), &mut text);
            http::response(200, "text/plain; version=0.0.4", text.as_bytes())
        }
        Route::Ping => match tenant_of(&shard, &head) {
            Ok(_) => http::json_message(200, "message", "Success"),
            Err(refusal) => refusal,
        },
        Route::Rest(_) if shard.config.control.is_draining() => rest::draining(),
        Route::Rest(route) => rest_call(&shard, &mut stream, &head, buf, &route).await,
        Route::Page(asset) => http::response_with_headers(200, asset.content_type, crate::assets::PAGE_HEADERS, asset.body),
        Route::StatusApi => status_call(&shard, &head),
        Route::TenantApi => tenant_api_call(&shard, &mut stream, &head, buf).await,
        Route::NotFound => http::not_found(),
    };
    send(&mut stream, &response).await;
}

/// `/healthz` in single-tenant mode with a database: whether its core's connections are up.
/// Multi-tenant mode answers 200 whatever one tenant's database does (each tenant's joins
/// report their own database errors).
fn single_database_healthy(shard: &Shard) -> bool {
    let directory = shard.config.tenants.load();
    if directory.multi_tenant() {
        return true;
    }
    let Some(link) = &shard.config.postgres else { return true };
    let Some(tenant) = directory.get(engine::TenantId::SINGLE) else { return true };
    let Some(url) = tenant.database_url.as_deref() else { return true };
    link.databases.handle(tenant.id, url).healthy.load(std::sync::atomic::Ordering::Relaxed)
}

/// The tenant of a tenant-scoped REST request (PROTOCOL.md §8.1): unknown → 401, suspended →
/// 403 (both with CORS headers, like every REST answer).
fn tenant_of(shard: &Shard, head: &http::Head) -> Result<Arc<tenants::Tenant>, Bytes> {
    let directory = shard.config.tenants.load();
    let host = head.header("host");
    match directory.resolve(host) {
        None => {
            shard.config.tenants.note_unknown_host(host, unix_now());
            Err(rest::refusal(401, RestError::TenantNotFound))
        }
        Some(tenant) if tenant.suspend => Err(rest::refusal(403, RestError::TenantSuspended)),
        Some(tenant) => Ok(Arc::clone(tenant)),
    }
}

/// `GET /api/status`: the status page's data, for the service role only (it names topics).
fn status_call(shard: &Shard, head: &http::Head) -> Bytes {
    let directory = shard.config.tenants.load();
    let service_role = directory
        .resolve(head.header("host"))
        .and_then(|tenant| rest::authorize(head, &tenant.keys, unix_now()))
        .is_some_and(|claims| claims.role == "service_role");
    if !service_role {
        return http::json_message(401, "message", engine::client_error::HttpMessage::ServiceRoleRequired.text());
    }
    let postgres = shard.config.postgres.as_ref().filter(|_| !directory.multi_tenant()).map(|_| {
        let mut section = shard.config.postgres_status.as_ref().map_or_else(|| serde_json::json!({}), |hook| (hook.0)());
        section["connected"] = serde_json::Value::Bool(single_database_healthy(shard));
        section
    });
    let mut body = shard.status.render(unix_now(), postgres);
    if let Some(hook) = shard.config.cluster.as_ref().and_then(|port| port.status.as_ref()) {
        body["cluster"] = (hook.0)();
    }
    if directory.multi_tenant() {
        body["tenants"] = super::tenancy::status_json(&directory, &shard.config.tenants);
    }
    let body = body.to_string();
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
    if let Err(refusal) = read_body(stream, head, &mut body).await {
        return refusal;
    }
    let tenant = match tenant_of(shard, head) {
        Ok(tenant) => tenant,
        Err(refusal) => return refusal,
    };
    let shard_tenant = shard.shard_tenant(&tenant);
    // PROTOCOL.md §8.1: the tenant's REST request rate (60 s rolling average, as of the last
    // second) against its events per second, before the handler; §9.3: also while its events
    // per second are triggered. Answers carry the rate headers when the tenant has a limit.
    shard_tenant.count_http();
    let (rolling, limit) = shard_tenant.http_rate();
    let rated = |response: Bytes| if limit == 0 { response } else { rest::with_rate_headers(response, rolling, limit) };
    if (limit != 0 && rolling >= u64::from(limit)) || shard_tenant.events_exceeded() {
        shard_tenant.count_limit_hit();
        return rated(rest::refusal(429, RestError::TooManyRequests));
    }
    let rest_tenant = rest::RestTenant { id: tenant.id, keys: &tenant.keys, payload_bytes_max: tenant.limits.payload_bytes_max, database: tenant.database_url.is_some() && shard.config.postgres.is_some() };
    let result = rest::handle(rest_tenant, route, head, &body, unix_now());
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
            let verdict = write_check(shard, &shard_tenant, &checks.claims, &item.topic.sub).await;
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
    shard_tenant.count_events(outgoing.len() as u64);
    let response = rated(response);
    let messages = outgoing
        .into_iter()
        .map(|o| (o.topic.owner(shard.config.shards), engine::ShardMsg::Publish { topic: o.topic, message: o.message }))
        .collect();
    shard.route(messages);
    response
}

/// Reads a request's body (Content-Length only, at most `HTTP_BODY_BYTES_MAX`, the whole body
/// within `BODY_TIMEOUT` however it is trickled) into `body`, which holds what came with the head.
async fn read_body<S: Transport>(stream: &mut S, head: &http::Head, body: &mut BytesMut) -> Result<(), Bytes> {
    if head.header("transfer-encoding").is_some() {
        return Err(rest::response(411, b""));
    }
    let length: usize = match head.header("content-length").map(|v| v.trim().parse()) {
        None => 0,
        Some(Ok(length)) => length,
        Some(Err(_)) => return Err(rest::response(400, b"")),
    };
    if length > HTTP_BODY_BYTES_MAX {
        return Err(rest::response(413, b""));
    }
    let deadline = Instant::now() + BODY_TIMEOUT;
    while body.len() < length {
        let want = (length - body.len()).min(16 * 1024);
        if read_by(stream, body, want, deadline).await.is_none() {
            return Err(rest::response(400, b""));
        }
    }
    body.truncate(length);
    Ok(())
}

/// How long a tenant API call may take (the control database answers it).
const TENANT_API_TIMEOUT: Duration = Duration::from_secs(10);

/// `/api/tenants...`: handed to the binary's [`super::TenantApi`] (404 without one).
async fn tenant_api_call<S: Transport>(shard: &Rc<Shard>, stream: &mut S, head: &http::Head, mut body: BytesMut) -> Bytes {
    let Some(api) = &shard.config.tenant_api else { return http::not_found() };
    if let Err(refusal) = read_body(stream, head, &mut body).await {
        return refusal;
    }
    let request = tenants::api::ApiRequest {
        method: head.method.clone(),
        path: head.path.clone(),
        authorization: head.header("authorization").map(str::to_string),
        body: body.to_vec(),
    };
    let answer = api.call(request);
    let response = match glommio::timer::timeout(TENANT_API_TIMEOUT, async { Ok(answer.recv_async().await) }).await {
        Ok(Ok(response)) => response,
        _ => tenants::api::ApiResponse::unavailable("the tenant store did not answer in time"),
    };
    let location = response.location.map(|l| format!("Location: {l}\r\n")).unwrap_or_default();
    let content_type = if response.body.is_empty() { "text/plain" } else { "application/json" };
    http::response_with_headers(response.status, content_type, &location, &response.body)
}

/// Asks the Postgres core whether `claims` may write broadcasts to `topic` (bounded wait).
async fn write_check(shard: &Rc<Shard>, tenant: &super::tenancy::ShardTenant, claims: &auth::Claims, topic: &str) -> engine::changes::AuthzResult {
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
    shard.send_caller_command(tenant, engine::changes::Command::Authorize {
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
    // PROTOCOL.md §1.4's order: GET and vsn (rows 1–2), the tenant (3–4), the token (5–10),
    // the tenant's users and joins (11–12).
    let checked = http::check_upgrade(&head);
    if let Err(refusal @ (UpgradeRefusal::NotAnUpgrade | UpgradeRefusal::Refused(UpgradeError::NotGet | UpgradeError::VsnUnsupported))) = checked {
        return refuse(&shard, &mut stream, refusal).await;
    }
    let directory = shard.config.tenants.load();
    let host = head.header("host");
    let tenant = match directory.resolve(host) {
        Some(tenant) => Arc::clone(tenant),
        None => {
            shard.config.tenants.note_unknown_host(host, unix_now());
            return refuse(&shard, &mut stream, UpgradeRefusal::Refused(UpgradeError::TenantNotFound)).await;
        }
    };
    drop(directory);
    if tenant.suspend {
        return refuse(&shard, &mut stream, UpgradeRefusal::Refused(UpgradeError::TenantSuspended)).await;
    }
    let upgrade = match checked {
        Ok(upgrade) => upgrade,
        Err(refusal) => return refuse(&shard, &mut stream, refusal).await,
    };
    // The request's headers are not needed any more; a long-lived connection should not keep them.
    drop(head);
    if leftover.is_empty() {
        leftover = BytesMut::new();
    }
    let shard_tenant = shard.shard_tenant(&tenant);
    let conn_cred = match shard_tenant.credentials.verify(&tenant.keys, &upgrade.token, unix_now()) {
        Ok(cred) => cred,
        Err(error) => return refuse(&shard, &mut stream, UpgradeRefusal::Refused(upgrade_error(error))).await,
    };
    let limited = if shard_tenant.users_full() {
        Some(UpgradeError::TooManyUsers)
    } else if shard_tenant.joins_exceeded() {
        Some(UpgradeError::TooManyJoins)
    } else {
        None
    };
    if let Some(error) = limited {
        shard_tenant.count_limit_hit();
        return refuse(&shard, &mut stream, UpgradeRefusal::Refused(error)).await;
    }
    if stream.write_all(&http::switching_protocols(&upgrade.key)).await.is_err() || stream.flush().await.is_err() {
        return;
    }
    // No read timeout: the shard's idle sweep closes silent connections (`flush.rs`). A write
    // that makes no progress for WRITE_STALL_TIMEOUT drops the connection (TLS: glommio's write
    // timeout; plain: the idle sweep, `Conn::write_stalled_ms`).
    let _ = stream.tcp().set_read_timeout(None);
    let _ = stream.tcp().set_write_timeout(Some(WRITE_STALL_TIMEOUT));
    let peer = tracing::enabled!(tracing::Level::DEBUG).then(|| peer_of(&stream.tcp().peer_addr().ok()));
    let Ok(socket) = stream.into_live() else { return };
    let id = shard.next_conn_id();
    let direct = <S::Live as LiveSocket>::DIRECT;
    let conn = Rc::new(Conn {
        outbox: Outbox::new(direct),
        session: RefCell::new(Session::new(upgrade.format, shard.id, id, conn_cred)),
        fd: socket.fd(),
        last_read_ms: std::cell::Cell::new(super::flush::clock_ms()),
        direct,
        tenant_epoch: tenant.epoch,
        tenant: Rc::clone(&shard_tenant),
        user: std::cell::Cell::new(false),
        epoll_set: std::cell::Cell::new(super::readiness::SET_NONE),
        chatty: std::cell::Cell::new(true),
        epoll_waker: RefCell::new(None),
        write_stalled_ms: std::cell::Cell::new(0),
    });
    shard.conns.borrow_mut().insert(id, Rc::clone(&conn));
    if let Some(peer) = peer {
        tracing::debug!(%peer, conn = id.0, shard = shard.id.0, "connection opened");
    }
    metrics::add(&shard.counters().connections_open, 1);
    metrics::add(&shard.counters().connections_total, 1);
    shard_tenant.add_connection(true);
    // The connection lives on in a task of its own whose future holds only what a live
    // connection needs; the HTTP/upgrade task (sized for every path: TLS handshake, REST,
    // authorization) ends here and frees its memory.
    glommio::spawn_local(live(shard, conn, id, socket, leftover)).detach();
}

/// A WebSocket connection after the upgrade, until it is closed.
async fn live<S: LiveSocket>(shard: Rc<Shard>, conn: Rc<Conn>, id: engine::ConnId, socket: S, leftover: BytesMut) {
    let mut writer = TaskWriter::new(socket, id);
    let reason = read_loop(&shard, &conn, id, &mut writer, leftover).await;
    if tracing::enabled!(tracing::Level::DEBUG) {
        // Looked up now rather than kept for the connection's life (an idle connection holds as
        // little as it can); "?" once the socket no longer knows its peer.
        let peer = peer_of(&writer.stream.peer());
        tracing::debug!(%peer, conn = id.0, close = reason.map(|r| r.code()), "connection closed");
    }
    closed(&shard, &conn, reason);
    // Whatever is still queued, then the close frame. The connection stays in the shard's map
    // until then: the epoll thread's reports find its task through it (a plain socket that is
    // full waits for writability there), and the idle sweep still drops it if that write stalls.
    std::future::poll_fn(|cx| writer.poll_write_side(cx, &shard, &conn)).await;
    shutdown(conn.fd);
    shard.conns.borrow_mut().remove(&id);
    metrics::sub(&shard.counters().connections_open, 1);
}

/// The connection's session ends (its channels leave, its counts drop); its queue closes with
/// `reason`, or dies without one. Not part of `live`'s future: what it needs lives only here.
fn closed(shard: &Rc<Shard>, conn: &Rc<Conn>, reason: Option<CloseReason>) {
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
    if fx.left > 0 {
        metrics::add(&shard.counters().leaves, fx.left);
    }
    // The channels' Postgres Changes subscriptions leave the core with the connection.
    for command in fx.pg {
        shard.send_command(&conn.tenant, command);
    }
    shard.route(fx.shard);
    if conn.user.replace(false) {
        conn.tenant.add_user(false);
    }
    conn.tenant.add_connection(false);
}

/// What woke the connection's task.
enum Event {
    Read(std::io::Result<usize>),
    /// The write side is finished (close frame written, or the connection is dead).
    WriterDone,
}

/// Reads and handles messages until the connection ends; returns the close to send, if any.
/// The same task writes whatever the shard's flusher does not (see `outbox.rs`).
async fn read_loop<S: LiveSocket>(shard: &Rc<Shard>, conn: &Rc<Conn>, id: engine::ConnId, writer: &mut TaskWriter<S>, mut buf: BytesMut) -> Option<CloseReason> {
    let mut decoder = WsDecoder::new(WS_MESSAGE_BYTES_MAX);
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
                    tracing::debug!(peer = %peer_of(&writer.stream.peer()), %error, "WebSocket protocol error");
                    return Some(CloseReason::ProtocolError);
                }
            }
        }
        if conn.outbox.state() != OutboxState::Open {
            return None;
        }
        glommio::yield_if_needed().await;
        if buf.is_empty() && buf.capacity() > 0 {
            // An idle connection holds no read buffer (reads land in the shard's scratch).
            buf = BytesMut::new();
        }
        let event = std::future::poll_fn(|cx| poll_read_or_write(cx, shard, conn, id, writer, &mut buf)).await;
        match event {
            Event::Read(Ok(0)) | Event::Read(Err(_)) | Event::WriterDone => return None,
            Event::Read(Ok(_)) => {
                let now = super::flush::clock_ms();
                conn.chatty.set(now.wrapping_sub(conn.last_read_ms.replace(now)) < super::readiness::CHATTY_GAP_MS);
            }
        }
    }
}

thread_local! {
    /// The shard's read scratch: every WebSocket read lands here and is copied into its
    /// connection's buffer, so an idle connection holds no read buffer (glommio reads into the
    /// buffer given at poll time, once the socket is readable).
    static READ_SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; READ_SCRATCH_BYTES].into_boxed_slice());
}

/// The write side first (it may finish the connection), then a read into `buf`.
fn poll_read_or_write<S: LiveSocket>(cx: &mut TaskContext<'_>, shard: &Rc<Shard>, conn: &Rc<Conn>, id: engine::ConnId, writer: &mut TaskWriter<S>, buf: &mut BytesMut) -> Poll<Event> {
    if writer.poll_write_side(cx, shard, conn).is_ready() {
        return Poll::Ready(Event::WriterDone);
    }
    // Plain TCP: a non-blocking `recv`, no io_uring request while idle (`readiness.rs`).
    READ_SCRATCH.with(|scratch| writer.stream.poll_recv(cx, conn, id, &mut scratch.borrow_mut()[..], buf)).map(Event::Read)
}

fn handle(shard: &Rc<Shard>, conn: &Rc<Conn>, message: WsMessage) -> Option<CloseReason> {
    let mut fx = Effects::default();
    let sampled = metrics::sample_read();
    match message {
        WsMessage::Text(bytes) | WsMessage::Binary(bytes) if bytes.is_empty() => {}
        WsMessage::Text(bytes) => shard.with_context(conn, |ctx| {
            let mut state = shard.state.borrow_mut();
            conn.session.borrow_mut().on_text(&mut state, ctx, &bytes, &mut fx);
        }),
        WsMessage::Binary(bytes) => shard.with_context(conn, |ctx| {
            let mut state = shard.state.borrow_mut();
            conn.session.borrow_mut().on_binary(&mut state, ctx, &bytes, &mut fx);
        }),
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

/// The connection task's write side: writes the queue while the shard's flusher does not
/// (TLS, a full socket, closing), then the close frame.
struct TaskWriter<S> {
    stream: S,
    id: engine::ConnId,
    /// Bytes being written and how far; empty when idle (no capacity kept after a burst).
    pending: Vec<u8>,
    written: usize,
    flush_due: bool,
    close_sent: bool,
    done: bool,
    frames: Vec<Bytes>,
}

impl<S: LiveSocket> TaskWriter<S> {
    fn new(stream: S, id: engine::ConnId) -> Self {
        TaskWriter { stream, id, pending: Vec::new(), written: 0, flush_due: false, close_sent: false, done: false, frames: Vec::new() }
    }

    /// Drives the write side; `Ready` once it is finished for good.
    fn poll_write_side(&mut self, cx: &mut TaskContext<'_>, shard: &Shard, conn: &Conn) -> Poll<()> {
        if self.done {
            return Poll::Ready(());
        }
        loop {
            while self.written < self.pending.len() {
                match self.stream.poll_send(cx, conn, self.id, &self.pending[self.written..]) {
                    Poll::Ready(Ok(n)) if n > 0 => self.written += n,
                    Poll::Ready(_) => return self.finish(conn, true),
                    Poll::Pending => return Poll::Pending,
                }
            }
            if self.flush_due {
                match self.stream.poll_flush_out(cx) {
                    Poll::Ready(Ok(())) => self.flush_due = false,
                    Poll::Ready(Err(_)) => return self.finish(conn, true),
                    Poll::Pending => return Poll::Pending,
                }
                if let Some(read_at) = conn.outbox.written_probe() {
                    shard.observe_delivery(read_at);
                }
            }
            if self.close_sent {
                return self.finish(conn, false);
            }
            // Keep no burst-sized buffers on an idle connection.
            if self.pending.capacity() > 16 * 1024 {
                self.pending = Vec::new();
            } else {
                self.pending.clear();
            }
            self.written = 0;
            conn.outbox.task_idle(conn.direct);
            match conn.outbox.poll_next(cx, WRITE_BATCH_BYTES, &mut self.frames) {
                Poll::Ready(Next::Write) => {
                    for frame in &self.frames {
                        self.pending.extend_from_slice(frame);
                    }
                    self.frames.clear();
                    if self.frames.capacity() > 1024 {
                        self.frames = Vec::new();
                    }
                    self.flush_due = true;
                }
                Poll::Ready(Next::Close(reason)) => {
                    self.pending.extend_from_slice(&ws::encode_close(reason.code(), reason.text()));
                    self.flush_due = true;
                    self.close_sent = true;
                }
                Poll::Ready(Next::Stop) => return self.finish(conn, false),
                Poll::Pending => {
                    if self.pending.capacity() > 0 {
                        self.pending = Vec::new();
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    fn finish(&mut self, conn: &Conn, failed: bool) -> Poll<()> {
        if failed {
            conn.outbox.kill();
        }
        self.done = true;
        self.pending = Vec::new();
        // Wakes a read pending on the socket.
        shutdown(conn.fd);
        Poll::Ready(())
    }
}

/// Shuts the socket down in both directions, waking a read pending on it.
fn shutdown(fd: std::os::fd::RawFd) {
    // SAFETY: `fd` belongs to the stream whose halves are still alive (the connection task
    // awaits this writer before dropping them), so it is open and ours.
    unsafe {
        libc::shutdown(fd, libc::SHUT_RDWR);
    }
}
