//! A small async PostgreSQL wire-protocol client for the replication connection (tokio; many
//! tenants' replication connections share the fleet's worker threads).
//!
//! Only what logical replication needs: startup (with `replication=database`), password, MD5
//! and SCRAM-SHA-256 authentication (SCRAM through `postgres-protocol`'s sans-IO state machine),
//! simple queries, and the CopyBoth stream of `START_REPLICATION`. Messages are framed by hand:
//! a tag byte and a big-endian length.

use std::str::FromStr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

/// Largest backend message accepted (a replication CopyData carries one WAL record's change).
const MESSAGE_BYTES_MAX: usize = 1 << 30;

/// [`PgConn::read_available`] stops taking bytes without waiting beyond this much buffered.
pub const AVAILABLE_BYTES_MAX: usize = 4 << 20;

/// Whether to use TLS (see `crate::tls`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plain TCP.
    Disable,
    /// TLS when the server offers it (libpq's default).
    Prefer,
    /// TLS or fail.
    Require,
}

/// Connection parameters, from a `postgres://` URL or a key=value string.
#[derive(Debug, Clone)]
pub struct ConnParams {
    /// TLS mode.
    pub ssl_mode: SslMode,
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
    /// User.
    pub user: String,
    /// Password, if any.
    pub password: Option<String>,
    /// Database.
    pub dbname: String,
    /// The URL as given (for the SQL client).
    pub url: String,
}

/// Errors of the replication connection.
#[derive(Debug)]
pub enum PgError {
    /// TCP or protocol IO failed (transient; see [`crate::error::ReplicationError`] for the
    /// classification of all variants).
    Io(std::io::Error),
    /// The server answered with an error.
    Server {
        /// SQLSTATE.
        code: String,
        /// Message.
        message: String,
    },
    /// The server sent something this client does not understand.
    Protocol(String),
    /// The configuration cannot work (bad URL, unsupported option): definite.
    Config(String),
}

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PgError::Io(error) => write!(f, "connection: {error}"),
            PgError::Server { code, message } => write!(f, "{message} (SQLSTATE {code})"),
            PgError::Protocol(message) => write!(f, "protocol: {message}"),
            PgError::Config(message) => write!(f, "{message}"),
        }
    }
}

impl std::error::Error for PgError {}

impl From<std::io::Error> for PgError {
    fn from(error: std::io::Error) -> PgError {
        PgError::Io(error)
    }
}


impl ConnParams {
    /// Parses a URL (`postgres://user:pass@host:port/db`) or key=value connection string.
    pub fn parse(url: &str) -> Result<ConnParams, PgError> {
        let config = tokio_postgres::Config::from_str(url).map_err(|e| PgError::Config(format!("DATABASE_URL is not valid: {e}")))?;
        let ssl_mode = match config.get_ssl_mode() {
            tokio_postgres::config::SslMode::Disable => SslMode::Disable,
            tokio_postgres::config::SslMode::Require => SslMode::Require,
            _ => SslMode::Prefer,
        };
        let host = match config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
            Some(tokio_postgres::config::Host::Unix(_)) => {
                return Err(PgError::Config("DATABASE_URL must name a TCP host (unix sockets are not supported)".into()))
            }
            None => "localhost".into(),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let user = config.get_user().unwrap_or("postgres").to_string();
        let password = config.get_password().map(|p| String::from_utf8_lossy(p).into_owned());
        let dbname = config.get_dbname().unwrap_or(&user).to_string();
        Ok(ConnParams { ssl_mode, host, port, user, password, dbname, url: url.to_string() })
    }
}

/// One backend message: tag and body.
#[derive(Debug)]
pub struct BackendMessage {
    /// Message type byte.
    pub tag: u8,
    /// Body (after the length).
    pub body: Bytes,
}

/// The byte stream under a connection: plain TCP or TLS over it (tokio, so many connections
/// share a worker thread).
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Stream {
    async fn read_buf(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
        match self {
            Stream::Plain(tcp) => tcp.read_buf(buf).await,
            Stream::Tls(tls) => tls.read_buf(buf).await,
        }
    }

    async fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Stream::Plain(tcp) => tcp.write_all(bytes).await,
            Stream::Tls(tls) => {
                tls.write_all(bytes).await?;
                tls.flush().await
            }
        }
    }
}

/// The SSLRequest code (protocol §55.2.10).
const SSL_REQUEST_CODE: i32 = 80_877_103;

/// Negotiates TLS on a fresh TCP connection as `mode` asks.
async fn negotiate_tls(mut tcp: TcpStream, params: &ConnParams) -> Result<Stream, PgError> {
    if params.ssl_mode == SslMode::Disable {
        return Ok(Stream::Plain(tcp));
    }
    let mut request = BytesMut::with_capacity(8);
    request.put_i32(8);
    request.put_i32(SSL_REQUEST_CODE);
    tcp.write_all(&request).await?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await?;
    match (answer[0], params.ssl_mode) {
        (b'S', _) => {
            let name = rustls::pki_types::ServerName::try_from(params.host.clone())
                .map_err(|_| PgError::Config(format!("{} is not a valid TLS server name", params.host)))?;
            let connector = tokio_rustls::TlsConnector::from(crate::tls::client_config());
            let tls = connector.connect(name, tcp).await.map_err(|e| PgError::Io(std::io::Error::other(format!("TLS handshake: {e}"))))?;
            Ok(Stream::Tls(Box::new(tls)))
        }
        (_, SslMode::Require) => Err(PgError::Config("the database does not accept TLS connections, and DATABASE_URL has sslmode=require".into())),
        _ => Ok(Stream::Plain(tcp)),
    }
}

/// A connection (async: it runs as a task on the runtime of the thread that made it).
pub struct PgConn {
    stream: Stream,
    buf: BytesMut,
    /// Bound of each query's answer (the `timeout` given to [`PgConn::connect`]).
    timeout: Duration,
}

fn cstring(out: &mut BytesMut, text: &str) {
    out.put_slice(text.as_bytes());
    out.put_u8(0);
}

fn read_cstring(body: &mut Bytes) -> Result<String, PgError> {
    let end = body.iter().position(|b| *b == 0).ok_or_else(|| PgError::Protocol("unterminated string".into()))?;
    let text = String::from_utf8_lossy(&body[..end]).into_owned();
    body.advance(end + 1);
    Ok(text)
}

/// Parses an ErrorResponse body.
fn server_error(mut body: Bytes) -> PgError {
    let (mut code, mut message) = (String::new(), String::new());
    while body.has_remaining() {
        let field = body.get_u8();
        if field == 0 {
            break;
        }
        let Ok(value) = read_cstring(&mut body) else { break };
        match field {
            b'C' => code = value,
            b'M' => message = value,
            _ => {}
        }
    }
    PgError::Server { code, message }
}

impl PgConn {
    /// Connects and authenticates. `startup` adds parameters (e.g. `replication=database`,
    /// GUCs such as `TimeZone`).
    pub async fn connect(params: &ConnParams, startup: &[(&str, &str)], timeout: Duration) -> Result<PgConn, PgError> {
        match tokio::time::timeout(timeout, PgConn::connect_inner(params, startup, timeout)).await {
            Ok(result) => result,
            Err(_) => Err(PgError::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, "connecting to the database timed out"))),
        }
    }

    async fn connect_inner(params: &ConnParams, startup: &[(&str, &str)], timeout: Duration) -> Result<PgConn, PgError> {
        let tcp = TcpStream::connect((params.host.as_str(), params.port)).await?;
        tcp.set_nodelay(true)?;
        let stream = negotiate_tls(tcp, params).await?;
        let mut conn = PgConn { stream, buf: BytesMut::with_capacity(64 * 1024), timeout };
        let mut body = BytesMut::new();
        body.put_i32(196_608); // protocol 3.0
        cstring(&mut body, "user");
        cstring(&mut body, &params.user);
        cstring(&mut body, "database");
        cstring(&mut body, &params.dbname);
        for (key, value) in startup {
            cstring(&mut body, key);
            cstring(&mut body, value);
        }
        body.put_u8(0);
        let mut packet = BytesMut::with_capacity(body.len() + 4);
        packet.put_i32(body.len() as i32 + 4);
        packet.put_slice(&body);
        conn.stream.write_all(&packet).await?;
        conn.authenticate(params).await?;
        // ParameterStatus / BackendKeyData until ReadyForQuery.
        loop {
            let message = conn.read_message().await?;
            match message.tag {
                b'Z' => return Ok(conn),
                b'E' => return Err(server_error(message.body)),
                _ => {}
            }
        }
    }

    async fn authenticate(&mut self, params: &ConnParams) -> Result<(), PgError> {
        let mut scram: Option<ScramSha256> = None;
        loop {
            let message = self.read_message().await?;
            match message.tag {
                b'E' => return Err(server_error(message.body)),
                b'R' => {}
                other => return Err(PgError::Protocol(format!("unexpected message {:?} during authentication", other as char))),
            }
            let mut body = message.body;
            if body.len() < 4 {
                return Err(PgError::Protocol("short authentication message".into()));
            }
            let password = || params.password.clone().ok_or_else(|| PgError::Config("the database asks for a password and DATABASE_URL has none".into()));
            match body.get_i32() {
                0 => return Ok(()),
                3 => {
                    let mut out = BytesMut::new();
                    cstring(&mut out, &password()?);
                    self.send(b'p', &out).await?;
                }
                5 => {
                    if body.len() < 4 {
                        return Err(PgError::Protocol("short MD5 salt".into()));
                    }
                    let salt = [body[0], body[1], body[2], body[3]];
                    let hashed = postgres_protocol::authentication::md5_hash(params.user.as_bytes(), password()?.as_bytes(), salt);
                    let mut out = BytesMut::new();
                    cstring(&mut out, &hashed);
                    self.send(b'p', &out).await?;
                }
                10 => {
                    let mut mechanisms = Vec::new();
                    while body.first().is_some_and(|b| *b != 0) {
                        mechanisms.push(read_cstring(&mut body)?);
                    }
                    if !mechanisms.iter().any(|m| m == "SCRAM-SHA-256") {
                        return Err(PgError::Config(format!("the database offers only {mechanisms:?}; SCRAM-SHA-256 is supported")));
                    }
                    let state = ScramSha256::new(password()?.as_bytes(), ChannelBinding::unsupported());
                    let first = state.message().to_vec();
                    let mut out = BytesMut::new();
                    cstring(&mut out, "SCRAM-SHA-256");
                    out.put_i32(first.len() as i32);
                    out.put_slice(&first);
                    self.send(b'p', &out).await?;
                    scram = Some(state);
                }
                11 => {
                    let state = scram.as_mut().ok_or_else(|| PgError::Protocol("SASL continue without start".into()))?;
                    state.update(&body).map_err(|e| PgError::Protocol(format!("SCRAM: {e}")))?;
                    let reply = state.message().to_vec();
                    self.send(b'p', &reply).await?;
                }
                12 => {
                    let mut state = scram.take().ok_or_else(|| PgError::Protocol("SASL final without start".into()))?;
                    state.finish(&body).map_err(|e| PgError::Protocol(format!("SCRAM server signature: {e}")))?;
                }
                other => return Err(PgError::Config(format!("unsupported authentication method {other}"))),
            }
        }
    }

    /// Sends one frontend message.
    pub async fn send(&mut self, tag: u8, body: &[u8]) -> Result<(), PgError> {
        let mut out = BytesMut::with_capacity(body.len() + 5);
        out.put_u8(tag);
        out.put_i32(body.len() as i32 + 4);
        out.put_slice(body);
        self.stream.write_all(&out).await?;
        Ok(())
    }

    /// Whether the connection is encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self.stream, Stream::Tls(_))
    }

    /// Reads one backend message. Cancel-safe: bytes read before the future is dropped stay in
    /// the connection's buffer (the replication loop races it against its status timer).
    pub async fn read_message(&mut self) -> Result<BackendMessage, PgError> {
        loop {
            // Nothing reserved on a header's word (up to 1 GiB): the buffer grows as bytes
            // arrive, so a broken server cannot make us allocate what it never sends.
            if let Some(message) = self.take_message()? {
                return Ok(message);
            }
            if self.buf.capacity() - self.buf.len() < 16 * 1024 {
                self.buf.reserve(64 * 1024);
            }
            let n = self.stream.read_buf(&mut self.buf).await?;
            if n == 0 {
                return Err(PgError::Io(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the database closed the connection")));
            }
        }
    }

    /// Every message available now: waits for one (cancel-safe, like
    /// [`PgConn::read_message`]), then takes what the socket already holds without waiting
    /// (up to [`AVAILABLE_BYTES_MAX`]). When an ErrorResponse came with them, or the connection
    /// ended right behind them, returns that error instead of the messages: what arrived with
    /// the end of a replication stream is not processed (nothing was confirmed past it, so the
    /// slot sends it again after the reconnect — or the slot's bounds decide that it is lost).
    /// A process frozen while the walsender went away (SIGSTOP, a suspended VM) thus sees the
    /// stream's end, not the data that waited in the socket.
    pub async fn read_available(&mut self) -> Result<Vec<BackendMessage>, PgError> {
        let first = self.read_message().await?;
        let mut ended = None;
        while self.buf.len() < AVAILABLE_BYTES_MAX {
            if self.buf.capacity() - self.buf.len() < 16 * 1024 {
                self.buf.reserve(64 * 1024);
            }
            match futures_util::FutureExt::now_or_never(self.stream.read_buf(&mut self.buf)) {
                None => break,
                Some(Ok(0)) => {
                    ended = Some(PgError::Io(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the database closed the connection")));
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => {
                    ended = Some(PgError::Io(error));
                    break;
                }
            }
        }
        let mut messages = vec![first];
        while let Some(message) = self.take_message()? {
            messages.push(message);
        }
        if let Some(error) = messages.iter().find(|m| m.tag == b'E') {
            return Err(server_error(error.body.clone()));
        }
        match ended {
            Some(error) => Err(error),
            None => Ok(messages),
        }
    }

    /// A complete message from the buffer, if there is one.
    fn take_message(&mut self) -> Result<Option<BackendMessage>, PgError> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if !(4..=MESSAGE_BYTES_MAX).contains(&len) {
            return Err(PgError::Protocol(format!("bad message length {len}")));
        }
        if self.buf.len() <= len {
            return Ok(None);
        }
        let tag = self.buf[0];
        let mut frame = self.buf.split_to(len + 1);
        frame.advance(5);
        Ok(Some(BackendMessage { tag, body: frame.freeze() }))
    }

    /// Runs a simple query; returns the rows of its last result (text values). The answer must
    /// come within the connection's timeout.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, PgError> {
        let timeout = self.timeout;
        match tokio::time::timeout(timeout, self.simple_query_inner(sql)).await {
            Ok(result) => result,
            Err(_) => Err(timed_out("a query")),
        }
    }

    async fn simple_query_inner(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, PgError> {
        let mut body = BytesMut::new();
        cstring(&mut body, sql);
        self.send(b'Q', &body).await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let message = self.read_message().await?;
            match message.tag {
                b'T' => rows.clear(),
                b'D' => rows.push(parse_data_row(message.body)?),
                b'E' => error = Some(server_error(message.body)),
                b'Z' => break,
                _ => {}
            }
        }
        match error {
            Some(error) => Err(error),
            None => Ok(rows),
        }
    }

    /// Sends `START_REPLICATION ...` and waits for the CopyBoth response (within the
    /// connection's timeout).
    pub async fn start_copy_both(&mut self, sql: &str) -> Result<(), PgError> {
        let timeout = self.timeout;
        match tokio::time::timeout(timeout, self.start_copy_both_inner(sql)).await {
            Ok(result) => result,
            Err(_) => Err(timed_out("START_REPLICATION")),
        }
    }

    async fn start_copy_both_inner(&mut self, sql: &str) -> Result<(), PgError> {
        let mut body = BytesMut::new();
        cstring(&mut body, sql);
        self.send(b'Q', &body).await?;
        loop {
            let message = self.read_message().await?;
            match message.tag {
                b'W' => return Ok(()),
                b'E' => return Err(server_error(message.body)),
                b'N' | b'S' => {}
                other => return Err(PgError::Protocol(format!("unexpected {:?} before CopyBoth", other as char))),
            }
        }
    }

    /// The error carried by an ErrorResponse body.
    pub fn error_of(body: Bytes) -> PgError {
        server_error(body)
    }
}

fn timed_out(what: &str) -> PgError {
    PgError::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("{what} got no answer in time")))
}

fn parse_data_row(mut body: Bytes) -> Result<Vec<Option<String>>, PgError> {
    if body.len() < 2 {
        return Err(PgError::Protocol("short DataRow".into()));
    }
    let count = body.get_i16().max(0) as usize;
    let mut row = Vec::with_capacity(count);
    for _ in 0..count {
        if body.len() < 4 {
            return Err(PgError::Protocol("short DataRow cell".into()));
        }
        let len = body.get_i32();
        if len < 0 {
            row.push(None);
        } else {
            let len = len as usize;
            if body.len() < len {
                return Err(PgError::Protocol("short DataRow value".into()));
            }
            row.push(Some(String::from_utf8_lossy(&body[..len]).into_owned()));
            body.advance(len);
        }
    }
    Ok(row)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let p = ConnParams::parse("postgres://app:s%40cret@db.local:6543/proj").unwrap();
        assert_eq!((p.host.as_str(), p.port, p.user.as_str(), p.password.as_deref(), p.dbname.as_str()), ("db.local", 6543, "app", Some("s@cret"), "proj"));
        let p = ConnParams::parse("postgres://postgres@127.0.0.1:5432/postgres").unwrap();
        assert_eq!(p.password, None);
        assert_eq!(ConnParams::parse("postgres://x@h/db?sslmode=require").unwrap().ssl_mode, SslMode::Require);
        assert_eq!(ConnParams::parse("postgres://x@h/db").unwrap().ssl_mode, SslMode::Prefer);
        assert_eq!(ConnParams::parse("postgres://x@h/db?sslmode=disable").unwrap().ssl_mode, SslMode::Disable);
    }

    #[test]
    fn error_responses_and_rows_parse() {
        let mut body = BytesMut::new();
        body.put_u8(b'S');
        cstring(&mut body, "ERROR");
        body.put_u8(b'C');
        cstring(&mut body, "42704");
        body.put_u8(b'M');
        cstring(&mut body, "publication \"x\" does not exist");
        body.put_u8(0);
        match server_error(body.freeze()) {
            PgError::Server { code, message } => {
                assert_eq!(code, "42704");
                assert!(message.contains("publication"));
            }
            other => panic!("{other:?}"),
        }
        let mut row = BytesMut::new();
        row.put_i16(2);
        row.put_i32(2);
        row.put_slice(b"ab");
        row.put_i32(-1);
        assert_eq!(parse_data_row(row.freeze()).unwrap(), vec![Some("ab".into()), None]);
    }
}
