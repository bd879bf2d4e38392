//! HTTP/1.1 on the shared port, sans-IO: parse a request head (httparse), route it, and build
//! responses. WebSocket upgrades and the small REST surface share one port.

use bytes::Bytes;

use engine::client_error::{HttpMessage, UpgradeError};
use engine::limits::HTTP_HEAD_BYTES_MAX;
use engine::Format;

/// Headers read per request.
const HEADERS_MAX: usize = 48;

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// Method.
    pub method: String,
    /// Path without the query.
    pub path: String,
    /// Raw query string (after `?`), if any.
    pub query: Option<String>,
    /// Headers with lower-cased names.
    pub headers: Vec<(String, String)>,
    /// Bytes of the head, including the blank line.
    pub len: usize,
}

impl Head {
    /// First header named `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// First query parameter named `name`, raw (not URL-decoded).
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query.as_deref()?.split('&').find_map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (key == name).then_some(value)
        })
    }

    fn header_has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .any(|(_, v)| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    }
}

/// A request head that cannot be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadError {
    /// Not HTTP/1.x.
    Malformed,
    /// Longer than [`HTTP_HEAD_BYTES_MAX`] or more than the header limit.
    TooLarge,
}

/// Parses a request head from the start of `buf`; `Ok(None)` when more bytes are needed.
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => {
            let target = request.path.unwrap_or("/");
            let (path, query) = match target.split_once('?') {
                Some((path, query)) => (path.to_string(), Some(query.to_string())),
                None => (target.to_string(), None),
            };
            let headers = request
                .headers
                .iter()
                .map(|h| (h.name.to_ascii_lowercase(), String::from_utf8_lossy(h.value).into_owned()))
                .collect();
            Ok(Some(Head { method: request.method.unwrap_or("").to_string(), path, query, headers, len }))
        }
        Ok(httparse::Status::Partial) if buf.len() > HTTP_HEAD_BYTES_MAX => Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(HeadError::TooLarge),
        Err(_) => Err(HeadError::Malformed),
    }
}

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// A WebSocket path.
    WebSocket,
    /// `GET /healthz`.
    Health,
    /// `GET /metrics`.
    Metrics,
    /// `GET /api/ping`.
    Ping,
    /// A REST broadcast path.
    Rest(crate::rest::RestRoute),
    /// A built-in web page or one of its files (`/inspector`, `/status`, `/assets/...`).
    Page(&'static crate::assets::Asset),
    /// `GET /api/status`: the status page's JSON (service-role key required).
    StatusApi,
    /// `/api/tenants...`: the tenant API.
    TenantApi,
    /// Anything else.
    NotFound,
}

/// Routes a request by path (both spellings of every upstream path, PROTOCOL.md §1.1).
pub fn route(head: &Head) -> Route {
    let path = head.path.trim_end_matches('/');
    match path {
        "/realtime/v1/websocket" | "/socket/websocket" => Route::WebSocket,
        "/healthz" => Route::Health,
        "/metrics" => Route::Metrics,
        "/api/ping" | "/realtime/v1/api/ping" => Route::Ping,
        "/api/status" => Route::StatusApi,
        _ if tenants::api::is_api_path(path) => Route::TenantApi,
        _ => crate::rest::route(path)
            .map(Route::Rest)
            .or_else(|| crate::assets::find(path).map(Route::Page))
            .unwrap_or(Route::NotFound),
    }
}

/// A WebSocket upgrade that passed the checks that need no key material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade {
    /// Negotiated serializer.
    pub format: Format,
    /// The connection token, cleaned (PROTOCOL.md §1.3).
    pub token: String,
    /// `Sec-WebSocket-Key`.
    pub key: String,
}

/// Why an upgrade request is not even an upgrade.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpgradeRefusal {
    /// A GET without valid upgrade headers: 400 with a short text body.
    NotAnUpgrade,
    /// A protocol-level refusal from PROTOCOL.md §1.4.
    Refused(UpgradeError),
}

/// `vsn` → format: absent → V1; `1.0.x` → V1; `2.0.x` → V2; anything else refused.
pub fn negotiate_vsn(vsn: Option<&str>) -> Option<Format> {
    let Some(vsn) = vsn else { return Some(Format::V1) };
    let patch_ok = |patch: &str| !patch.is_empty() && patch.bytes().all(|b| b.is_ascii_digit());
    if let Some(patch) = vsn.strip_prefix("1.0.") {
        return patch_ok(patch).then_some(Format::V1);
    }
    if let Some(patch) = vsn.strip_prefix("2.0.") {
        return patch_ok(patch).then_some(Format::V2);
    }
    None
}

/// PROTOCOL.md §1.4 rows 1, 2 and 5 (rows 6–10 need the key store and run afterwards).
pub fn check_upgrade(head: &Head) -> Result<Upgrade, UpgradeRefusal> {
    if head.method != "GET" {
        return Err(UpgradeRefusal::Refused(UpgradeError::NotGet));
    }
    let is_upgrade = head.header_has_token("connection", "upgrade") && head.header_has_token("upgrade", "websocket");
    let key = head.header("sec-websocket-key");
    let (true, Some(key), Some("13")) = (is_upgrade, key, head.header("sec-websocket-version")) else {
        return Err(UpgradeRefusal::NotAnUpgrade);
    };
    let format = negotiate_vsn(head.query_param("vsn")).ok_or(UpgradeRefusal::Refused(UpgradeError::VsnUnsupported))?;
    let token = head
        .header("x-api-key")
        .or_else(|| head.query_param("apikey"))
        .ok_or(UpgradeRefusal::Refused(UpgradeError::ApiKeyMissing))?;
    Ok(Upgrade { format, token: auth::clean_token(token), key: key.trim().to_string() })
}

/// The 101 response.
pub fn switching_protocols(key: &str) -> Bytes {
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    Bytes::from(format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    ))
}

/// A complete response that closes the connection.
pub fn response(status: u16, content_type: &str, body: &[u8]) -> Bytes {
    response_with_headers(status, content_type, "", body)
}

/// A complete response with extra header lines (each ending in CRLF).
pub fn response_with_headers(status: u16, content_type: &str, extra_headers: &str, body: &[u8]) -> Bytes {
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra_headers}Connection: close\r\n\r\n",
        engine::client_error::http_reason_phrase(status),
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    Bytes::from(out)
}

/// A JSON response `{key: message}`.
pub fn json_message(status: u16, key: &str, message: &str) -> Bytes {
    let body = serde_json::json!({ key: message }).to_string();
    response(status, "application/json", body.as_bytes())
}

/// The response to a refused upgrade.
pub fn upgrade_refused(refusal: &UpgradeRefusal) -> Bytes {
    match refusal {
        UpgradeRefusal::NotAnUpgrade => response(400, "text/plain", HttpMessage::UpgradeRequired.text().as_bytes()),
        UpgradeRefusal::Refused(error) => match error.message() {
            Some(message) => json_message(error.status(), "error", &message),
            None => response(error.status(), "text/plain", b""),
        },
    }
}

/// 404 for unknown paths.
pub fn not_found() -> Bytes {
    json_message(404, "error", HttpMessage::NotFound.text())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Head {
        parse_head(text.as_bytes()).unwrap().unwrap()
    }

    const UPGRADE: &str = "GET /realtime/v1/websocket?apikey=abc%20d&vsn=2.0.0 HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

    #[test]
    fn upgrade_checks() {
        let h = head(UPGRADE);
        assert_eq!(route(&h), Route::WebSocket);
        let upgrade = check_upgrade(&h).unwrap();
        assert_eq!(upgrade.format, Format::V2);
        assert_eq!(upgrade.token, "abcd");
        let with_header = head(&UPGRADE.replace("Host: x\r\n", "Host: x\r\nx-api-key: fromheader\r\n"));
        assert_eq!(check_upgrade(&with_header).unwrap().token, "fromheader");
        let no_key = head(&UPGRADE.replace("apikey=abc%20d&", ""));
        assert_eq!(check_upgrade(&no_key), Err(UpgradeRefusal::Refused(UpgradeError::ApiKeyMissing)));
        let bad_vsn = head(&UPGRADE.replace("2.0.0", "3.0.0"));
        assert_eq!(check_upgrade(&bad_vsn), Err(UpgradeRefusal::Refused(UpgradeError::VsnUnsupported)));
        let plain_get = head("GET /socket/websocket HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(check_upgrade(&plain_get), Err(UpgradeRefusal::NotAnUpgrade));
        let post = head("POST /socket/websocket HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(check_upgrade(&post), Err(UpgradeRefusal::Refused(UpgradeError::NotGet)));
    }

    #[test]
    fn vsn_negotiation() {
        assert_eq!(negotiate_vsn(None), Some(Format::V1));
        assert_eq!(negotiate_vsn(Some("1.0.0")), Some(Format::V1));
        assert_eq!(negotiate_vsn(Some("2.0.3")), Some(Format::V2));
        for bad in ["3.0.0", "2.0", "x", "", "2.0.x", "1.1.0"] {
            assert_eq!(negotiate_vsn(Some(bad)), None, "{bad}");
        }
    }

    #[test]
    fn accept_key_matches_rfc_example() {
        let response = switching_protocols("dGhlIHNhbXBsZSBub25jZQ==");
        assert!(std::str::from_utf8(&response).unwrap().contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
    }

    #[test]
    fn partial_and_oversized_heads() {
        assert_eq!(parse_head(b"GET / HTTP/1.1\r\nHost"), Ok(None));
        let huge = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(HTTP_HEAD_BYTES_MAX + 1));
        assert_eq!(parse_head(huge.as_bytes()), Err(HeadError::TooLarge));
        assert_eq!(parse_head(b"\x00\x01garbage\r\n\r\n"), Err(HeadError::Malformed));
    }

    #[test]
    fn routes() {
        assert_eq!(route(&head("GET /healthz HTTP/1.1\r\n\r\n")), Route::Health);
        assert_eq!(route(&head("GET /socket/websocket/ HTTP/1.1\r\n\r\n")), Route::WebSocket);
        assert_eq!(route(&head("GET /nope HTTP/1.1\r\n\r\n")), Route::NotFound);
    }
}
