//! Shared pieces of the private-channel, REST, SQL-broadcast and token tests
//! (`tests/private_channels.rs`, `rest_broadcast.rs`, `sql_broadcast.rs`, `tokens.rs`,
//! `realtime_js_private.rs`):
//!
//! - [`Conn`], a raw V1/V2 client that keeps the frames a test has not consumed yet, so that a
//!   test can wait for one frame and later assert what else arrived. V2 binary kind-4 broadcasts
//!   are decoded into the same shape as JSON broadcasts (`{"type":"broadcast","event",
//!   "payload","meta"?}`), so one assertion covers every origin of PROTOCOL.md §3.3;
//! - the access-control table and policies most tests gate private topics with;
//! - asymmetric keys (RS256, ES256) and the JWKS file the server reads (`JWT_JWKS`).
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::{json, Value};

use crate::pgsupport::Db;
use crate::support::{self, Server};
use crate::wsclient::{hex_preview, kind3_json, parse_kind4, Client, Frame, Kind4, WAIT};

/// Users of the tests (`sub` claims of `authenticated` tokens).
pub const USER_A: &str = "0a4c2d1e-5b6f-4a7b-8c9d-0e1f2a3b4c5d";
pub const USER_B: &str = "1b5d3e2f-6c7a-4b8c-9dae-1f2a3b4c5d6e";
pub const USER_C: &str = "2c6e4f3a-7d8b-4c9d-aebf-2a3b4c5d6e7f";
pub const USER_D: &str = "3d7f5a4b-8e9c-4dae-bfca-3b4c5d6e7f80";

/// How long a message that must arrive may take.
pub const ARRIVE: Duration = Duration::from_secs(5);
/// How long "nothing more arrives" has to hold before we believe it.
pub const SETTLE: Duration = Duration::from_millis(600);

pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

pub fn now_s() -> i64 {
    now_ms() / 1000
}

/// The join reason for a private topic nobody may read (PROTOCOL.md §2.5).
pub fn unauthorized(sub: &str) -> String {
    format!("Unauthorized: You do not have permissions to read from this Channel topic: {sub}")
}

// ---------------------------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------------------------

/// A signed-in user's access token (`role: authenticated`, `sub: user`), valid for an hour.
pub fn user_token(user: &str) -> String {
    support::token("authenticated", &["--sub", user])
}

/// A token with exactly these claims, HS256-signed with `secret` (not necessarily the server's).
pub fn hs256(secret: &[u8], claims: Value) -> String {
    auth::sign_hs256(secret, claims.as_object().expect("claims are a JSON object"))
}

/// A JWT with this header and these claims whose signature is `signature` (not computed).
pub fn unsigned_jwt(header: Value, claims: Value, signature: &str) -> String {
    let part = |v: &Value| URL_SAFE_NO_PAD.encode(v.to_string());
    format!("{}.{}.{signature}", part(&header), part(&claims))
}

/// `token` with its claims segment replaced (header and signature kept): a forgery.
pub fn with_claims(token: &str, claims: Value) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "not a JWT: {token}");
    format!("{}.{}.{}", parts[0], URL_SAFE_NO_PAD.encode(claims.to_string()), parts[2])
}

/// The claims of a token, decoded without verification.
pub fn claims_of(token: &str) -> Value {
    let segment = token.split('.').nth(1).expect("a JWT has a claims segment");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(segment).expect("base64url claims")).expect("JSON claims")
}

/// An RSA and an EC P-256 key pair made with `openssl`, and the JWKS holding their public
/// halves under `rsa_kid` and `ec_kid`. The files live in a temporary directory removed on drop.
pub struct Keys {
    pub dir: PathBuf,
    pub rsa_kid: String,
    pub ec_kid: String,
    rsa_pem: Vec<u8>,
    ec_pem: Vec<u8>,
    /// A second RSA key whose public half is NOT in the JWKS (for forged RS256 signatures).
    other_rsa_pem: Vec<u8>,
}

fn openssl(args: &[&str]) -> Vec<u8> {
    let output = Command::new("openssl")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("could not run openssl ({e}); the JWKS tests need the openssl command"));
    assert!(output.status.success(), "openssl {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    output.stdout
}

impl Keys {
    pub fn generate(tag: &str) -> Keys {
        let dir = std::env::temp_dir().join(format!("powa-jwks-{tag}-{}-{}", std::process::id(), now_ms()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
        openssl(&["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", &path("rsa.pem")]);
        openssl(&["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", &path("other.pem")]);
        openssl(&["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", &path("ec.pem")]);

        // RSA: n from the modulus in hex, e from the public exponent (65537 → AQAB).
        let modulus = String::from_utf8(openssl(&["rsa", "-in", &path("rsa.pem"), "-noout", "-modulus"])).unwrap();
        let hex = modulus.trim().strip_prefix("Modulus=").expect("openssl prints Modulus=<hex>");
        let n: Vec<u8> = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
        let text = String::from_utf8(openssl(&["pkey", "-in", &path("rsa.pem"), "-noout", "-text"])).unwrap();
        assert!(text.contains("publicExponent: 65537"), "expected e = 65537:\n{text}");

        // EC: the DER SubjectPublicKeyInfo ends with the uncompressed point 04 || x || y.
        let der = openssl(&["pkey", "-in", &path("ec.pem"), "-pubout", "-outform", "DER"]);
        let point = &der[der.len() - 65..];
        assert_eq!(point[0], 4, "uncompressed EC point");

        let rsa_kid = format!("rsa-{tag}");
        let ec_kid = format!("ec-{tag}");
        let jwks = json!({"keys": [
            {"kty": "RSA", "kid": rsa_kid, "use": "sig", "alg": "RS256", "n": URL_SAFE_NO_PAD.encode(&n), "e": "AQAB"},
            {"kty": "EC", "kid": ec_kid, "use": "sig", "alg": "ES256", "crv": "P-256",
             "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..65])}
        ]});
        std::fs::write(dir.join("jwks.json"), serde_json::to_vec_pretty(&jwks).unwrap()).unwrap();
        let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
        Keys { rsa_pem: read("rsa.pem"), ec_pem: read("ec.pem"), other_rsa_pem: read("other.pem"), dir, rsa_kid, ec_kid }
    }

    pub fn jwks_path(&self) -> PathBuf {
        self.dir.join("jwks.json")
    }

    fn sign(alg: jsonwebtoken::Algorithm, kid: &str, key: &jsonwebtoken::EncodingKey, claims: &Value) -> String {
        let mut header = jsonwebtoken::Header::new(alg);
        header.kid = Some(kid.to_string());
        jsonwebtoken::encode(&header, claims, key).expect("signing a JSON value")
    }

    /// RS256, signed with the RSA key of the JWKS, header `kid` = `kid`.
    pub fn rs256(&self, kid: &str, claims: &Value) -> String {
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(&self.rsa_pem).expect("RSA PEM");
        Self::sign(jsonwebtoken::Algorithm::RS256, kid, &key, claims)
    }

    /// RS256 with the right `kid` but signed by a key that is not in the JWKS.
    pub fn rs256_forged(&self, claims: &Value) -> String {
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(&self.other_rsa_pem).expect("RSA PEM");
        Self::sign(jsonwebtoken::Algorithm::RS256, &self.rsa_kid, &key, claims)
    }

    /// ES256, signed with the EC key of the JWKS.
    pub fn es256(&self, kid: &str, claims: &Value) -> String {
        let key = jsonwebtoken::EncodingKey::from_ec_pem(&self.ec_pem).expect("EC PEM");
        Self::sign(jsonwebtoken::Algorithm::ES256, kid, &key, claims)
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Claims of a signed-in user valid for `lifetime` seconds.
pub fn user_claims(user: &str, lifetime: i64) -> Value {
    json!({"role": "authenticated", "sub": user, "exp": now_s() + lifetime, "iat": now_s()})
}

// ---------------------------------------------------------------------------------------------
// Database: the access-control table the policies of most tests read
// ---------------------------------------------------------------------------------------------

/// `public.acl(user_id, topic, can_write)`: a row lets `authenticated` user `user_id` read the
/// private topic (SELECT policy), and with `can_write` also send on it (INSERT policy). Nothing
/// else is granted: anon has no policy at all.
pub const ACL_SQL: &str = "
CREATE TABLE public.acl (user_id uuid NOT NULL, topic text NOT NULL, can_write boolean NOT NULL DEFAULT false);
GRANT SELECT ON public.acl TO anon, authenticated;
CREATE POLICY acl_read ON realtime.messages FOR SELECT TO authenticated
  USING (EXISTS (SELECT 1 FROM public.acl a WHERE a.user_id = auth.uid() AND a.topic = realtime.topic()));
CREATE POLICY acl_write ON realtime.messages FOR INSERT TO authenticated
  WITH CHECK (EXISTS (SELECT 1 FROM public.acl a WHERE a.user_id = auth.uid() AND a.topic = realtime.topic() AND a.can_write));
";

/// A throwaway cluster, the server on it, and the ACL table and policies.
pub fn start_with_acl() -> (Db, Server) {
    start_with_acl_env(&[])
}

/// Same, with extra server environment.
pub fn start_with_acl_env(extra: &[(&str, &str)]) -> (Db, Server) {
    let mut db = Db::new();
    let url = db.url();
    let mut env: Vec<(&str, &str)> = vec![("DATABASE_URL", url.as_str())];
    env.extend_from_slice(extra);
    let server = Server::start(&env);
    db.exec(ACL_SQL);
    (db, server)
}

/// Lets `user` read `topic` (and send on it when `write`).
pub fn grant(db: &mut Db, user: &str, topic: &str, write: bool) {
    db.exec(&format!("INSERT INTO public.acl VALUES ('{user}', '{}', {write})", topic.replace('\'', "''")));
}

// ---------------------------------------------------------------------------------------------
// Join configs
// ---------------------------------------------------------------------------------------------

/// realtime-js's join config (PROTOCOL.md §2.1).
pub fn config(private: bool, ack: bool, self_: bool) -> Value {
    json!({
        "broadcast": {"ack": ack, "self": self_},
        "presence": {"key": "", "enabled": false},
        "postgres_changes": [],
        "private": private
    })
}

/// realtime-js's join config with `broadcast.replay`.
pub fn replay_config(private: bool, replay: Value) -> Value {
    json!({
        "broadcast": {"ack": false, "self": false, "replay": replay},
        "presence": {"key": "", "enabled": false},
        "postgres_changes": [],
        "private": private
    })
}

// ---------------------------------------------------------------------------------------------
// A raw client that keeps what it has not consumed
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vsn {
    V1,
    V2,
}

/// One server frame, whatever the serializer. A kind-4 binary broadcast becomes
/// `event = "broadcast"` with payload `{"type":"broadcast","event":E,"payload":P[,"meta":M]}`
/// (P parsed when the encoding is JSON, else the hex of the bytes), and keeps its decoded
/// frame in `kind4`.
#[derive(Debug, Clone)]
pub struct Msg {
    pub join_ref: Value,
    pub r#ref: Value,
    pub topic: String,
    pub event: String,
    pub payload: Value,
    pub kind4: Option<Kind4>,
    pub raw: String,
}

impl Msg {
    /// The user event of a broadcast (`payload.event`).
    pub fn user_event(&self) -> &str {
        self.payload["event"].as_str().unwrap_or("")
    }

    pub fn is_broadcast_on(&self, topic: &str) -> bool {
        self.topic == topic && self.event == "broadcast"
    }
}

/// How the socket ended, when it did.
#[derive(Debug, Clone)]
pub enum Ended {
    Closed(Option<u16>, String),
    Dropped(String),
}

pub struct Conn {
    pub name: String,
    ws: Client,
    pub vsn: Vsn,
    next_ref: u64,
    /// topic → join_ref of its latest join.
    pub join_refs: HashMap<String, String>,
    pending: VecDeque<Msg>,
    log: Vec<String>,
    pub ended: Option<Ended>,
}

impl Conn {
    #[track_caller]
    pub fn open(server: &Server, token: &str, vsn: Vsn, name: &str) -> Conn {
        let v = match vsn {
            Vsn::V1 => "1.0.0",
            Vsn::V2 => "2.0.0",
        };
        Conn {
            name: name.to_string(),
            ws: Client::connect(&server.ws_url(token, v)),
            vsn,
            next_ref: 0,
            join_refs: HashMap::new(),
            pending: VecDeque::new(),
            log: Vec::new(),
            ended: None,
        }
    }

    pub fn next_ref(&mut self) -> String {
        self.next_ref += 1;
        self.next_ref.to_string()
    }

    fn log_line(&mut self, line: String) {
        let line = if line.len() > 600 { format!("{}… ({} bytes)", line.chars().take(500).collect::<String>(), line.len()) } else { line };
        self.log.push(line);
    }

    /// Sends a raw text frame.
    pub fn send_text(&mut self, text: String) {
        self.log_line(format!("-> {text}"));
        self.ws.send_text(&text);
    }

    /// Sends several text frames in one TCP write (the server reads them together).
    pub fn send_frames(&mut self, texts: &[String]) {
        let mut bytes = Vec::new();
        for text in texts {
            self.log_line(format!("-> {text}"));
            bytes.extend_from_slice(&crate::wsclient::raw_frame(0x1, text.as_bytes(), Some([1, 2, 3, 4])));
        }
        self.ws.send_raw(&bytes);
    }

    /// Sends `event` on `topic` with the topic's join_ref (V1: the `join_ref` key; omitted when
    /// the topic was never joined); returns the ref.
    pub fn send(&mut self, topic: &str, event: &str, payload: Value) -> String {
        let join_ref = self.join_refs.get(topic).cloned();
        let r = self.next_ref();
        let text = match self.vsn {
            Vsn::V1 => {
                let mut frame = json!({"topic": topic, "event": event, "payload": payload, "ref": r});
                if let Some(join_ref) = join_ref {
                    frame["join_ref"] = json!(join_ref);
                }
                frame.to_string()
            }
            Vsn::V2 => json!([join_ref, r, topic, event, payload]).to_string(),
        };
        self.send_text(text);
        r
    }

    /// A JSON user broadcast (`{"type":"broadcast","event":E,"payload":P}`); returns the ref.
    pub fn broadcast(&mut self, topic: &str, event: &str, payload: Value) -> String {
        self.send(topic, "broadcast", json!({"type": "broadcast", "event": event, "payload": payload}))
    }

    /// A V2 binary kind-3 broadcast with a JSON payload, as realtime-js sends it; returns the ref.
    pub fn broadcast_binary(&mut self, topic: &str, event: &str, payload: Value) -> String {
        assert_eq!(self.vsn, Vsn::V2, "binary frames need V2");
        let join_ref = self.join_refs.get(topic).cloned().unwrap_or_default();
        let r = self.next_ref();
        let bytes = kind3_json(&join_ref, &r, topic, event, &payload);
        self.log_line(format!("-> binary kind 3 {topic} {event} {payload}"));
        self.ws.send_binary(&bytes);
        r
    }

    /// `access_token` on a joined channel (never answered, PROTOCOL.md §6.3).
    pub fn refresh(&mut self, topic: &str, token: &str) {
        self.send(topic, "access_token", json!({"access_token": token}));
    }

    #[track_caller]
    fn parse_text(&self, text: &str) -> Msg {
        let value: Value = serde_json::from_str(text)
            .unwrap_or_else(|e| panic!("{}: server sent non-JSON text ({e}): {text}", self.name));
        match (self.vsn, value) {
            (Vsn::V1, Value::Object(mut o)) => Msg {
                join_ref: o.remove("join_ref").unwrap_or(Value::Null),
                r#ref: o.remove("ref").unwrap_or_else(|| panic!("{}: V1 frame without ref: {text}", self.name)),
                topic: o.remove("topic").and_then(|t| t.as_str().map(String::from)).unwrap_or_default(),
                event: o.remove("event").and_then(|t| t.as_str().map(String::from)).unwrap_or_default(),
                payload: o.remove("payload").unwrap_or(Value::Null),
                kind4: None,
                raw: text.to_string(),
            },
            (Vsn::V2, Value::Array(a)) if a.len() == 5 => Msg {
                join_ref: a[0].clone(),
                r#ref: a[1].clone(),
                topic: a[2].as_str().unwrap_or_default().to_string(),
                event: a[3].as_str().unwrap_or_default().to_string(),
                payload: a[4].clone(),
                kind4: None,
                raw: text.to_string(),
            },
            (vsn, _) => panic!("{}: frame of the wrong shape for {vsn:?}: {text}", self.name),
        }
    }

    #[track_caller]
    fn parse_binary(&self, bytes: &[u8]) -> Msg {
        assert_eq!(self.vsn, Vsn::V2, "{}: a V1 socket got a binary frame {}", self.name, hex_preview(bytes));
        let frame = parse_kind4(bytes);
        let payload = if frame.encoding == 1 {
            serde_json::from_slice(&frame.payload)
                .unwrap_or_else(|e| panic!("{}: kind-4 JSON payload does not parse ({e}): {}", self.name, hex_preview(bytes)))
        } else {
            Value::String(frame.payload.iter().map(|b| format!("{b:02x}")).collect())
        };
        let mut body = json!({"type": "broadcast", "event": frame.event, "payload": payload});
        if !frame.metadata.is_empty() {
            body["meta"] = serde_json::from_slice(&frame.metadata)
                .unwrap_or_else(|e| panic!("{}: kind-4 metadata is not JSON ({e}): {}", self.name, hex_preview(bytes)));
        }
        let raw = format!(
            "binary kind 4 encoding {} topic {:?} event {:?} metadata {} payload {}",
            frame.encoding,
            frame.topic,
            frame.event,
            String::from_utf8_lossy(&frame.metadata),
            if frame.encoding == 1 { String::from_utf8_lossy(&frame.payload).into_owned() } else { hex_preview(&frame.payload) }
        );
        Msg { join_ref: Value::Null, r#ref: Value::Null, topic: frame.topic.clone(), event: "broadcast".into(), payload: body, kind4: Some(frame), raw }
    }

    /// Reads one frame (at most `timeout`); `None` when nothing arrived or the socket has ended
    /// (see `ended`).
    #[track_caller]
    pub fn read(&mut self, timeout: Duration) -> Option<Msg> {
        if self.ended.is_some() {
            std::thread::sleep(timeout.min(Duration::from_millis(50)));
            return None;
        }
        match self.ws.recv_frame(timeout) {
            Frame::Text(text) => {
                let msg = self.parse_text(&text);
                self.log_line(format!("<- {text}"));
                Some(msg)
            }
            Frame::Binary(bytes) => {
                let msg = self.parse_binary(&bytes);
                self.log_line(format!("<- {}", msg.raw));
                Some(msg)
            }
            Frame::Timeout => None,
            Frame::Close(code, reason) => {
                self.log_line(format!("<- close {code:?} {reason:?}"));
                self.ended = Some(Ended::Closed(code, reason));
                None
            }
            Frame::Dropped(why) => {
                self.log_line(format!("<- dropped: {why}"));
                self.ended = Some(Ended::Dropped(why));
                None
            }
        }
    }

    /// The first frame (pending or new) that satisfies `pred`; others stay pending.
    #[track_caller]
    pub fn wait(&mut self, what: &str, timeout: Duration, pred: impl Fn(&Msg) -> bool) -> Msg {
        match self.try_wait(timeout, &pred) {
            Some(msg) => msg,
            None => panic!("{}: no {what} within {timeout:?}\n{}", self.name, self.dump()),
        }
    }

    /// Like `wait`, `None` on timeout.
    pub fn try_wait(&mut self, timeout: Duration, pred: impl Fn(&Msg) -> bool) -> Option<Msg> {
        if let Some(position) = self.pending.iter().position(&pred) {
            return self.pending.remove(position);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            if let Some(msg) = self.read(left) {
                if pred(&msg) {
                    return Some(msg);
                }
                self.pending.push_back(msg);
            }
        }
    }

    /// Reads everything that arrives during `duration` into the pending queue.
    pub fn drain(&mut self, duration: Duration) {
        let deadline = Instant::now() + duration;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            if let Some(msg) = self.read(left) {
                self.pending.push_back(msg);
            }
        }
    }

    /// Pending (read, not consumed) frames that satisfy `pred`, removed from the queue.
    pub fn take_pending(&mut self, pred: impl Fn(&Msg) -> bool) -> Vec<Msg> {
        let (taken, kept): (Vec<Msg>, Vec<Msg>) = self.pending.drain(..).partition(|m| pred(m));
        self.pending = kept.into();
        taken
    }

    /// Asserts that no broadcast for `topic` has been read and not consumed.
    #[track_caller]
    pub fn assert_no_broadcast(&self, topic: &str, context: &str) {
        let stray: Vec<&str> = self.pending.iter().filter(|m| m.is_broadcast_on(topic)).map(|m| m.raw.as_str()).collect();
        assert!(stray.is_empty(), "{}: {context}: unexpected broadcasts on {topic}: {stray:#?}\n{}", self.name, self.dump());
    }

    /// Asserts that nothing at all for `topic` has been read and not consumed.
    #[track_caller]
    pub fn assert_nothing_on(&self, topic: &str, context: &str) {
        let stray: Vec<&str> = self.pending.iter().filter(|m| m.topic == topic).map(|m| m.raw.as_str()).collect();
        assert!(stray.is_empty(), "{}: {context}: unexpected frames on {topic}: {stray:#?}\n{}", self.name, self.dump());
    }

    /// Sends a join and returns its reply (any status). `access_token` goes into the payload
    /// when given.
    #[track_caller]
    pub fn join(&mut self, topic: &str, config: Value, access_token: Option<&str>) -> Msg {
        let mut payload = json!({ "config": config });
        if let Some(token) = access_token {
            payload["access_token"] = json!(token);
        }
        self.join_payload(topic, payload)
    }

    /// Sends a join with this exact payload and returns its reply.
    #[track_caller]
    pub fn join_payload(&mut self, topic: &str, payload: Value) -> Msg {
        let join_ref = (self.next_ref + 1).to_string();
        self.join_refs.insert(topic.to_string(), join_ref.clone());
        let r = self.send(topic, "phx_join", payload);
        assert_eq!(r, join_ref);
        let reply = self.wait(&format!("join reply on {topic}"), WAIT, |m| m.event == "phx_reply" && m.r#ref == json!(r) && m.topic == topic);
        let context = format!("{}: join reply {}", self.name, reply.raw);
        if self.vsn == Vsn::V2 {
            assert_eq!(reply.join_ref, json!(join_ref), "{context}");
        }
        reply
    }

    /// Joins and asserts the exact `ok` reply without bindings (§2.6).
    #[track_caller]
    pub fn join_ok(&mut self, topic: &str, config: Value, access_token: Option<&str>) {
        let reply = self.join(topic, config, access_token);
        assert_eq!(
            reply.payload,
            json!({"status": "ok", "response": {"postgres_changes": []}}),
            "{}: expected an ok join reply on {topic}, got {}\n{}",
            self.name,
            reply.raw,
            self.dump()
        );
    }

    /// Joins, asserts an error reply whose response is exactly `{"reason": R}`, and returns R.
    #[track_caller]
    pub fn join_error(&mut self, topic: &str, config: Value, access_token: Option<&str>) -> String {
        let reply = self.join(topic, config, access_token);
        self.join_refs.remove(topic);
        self.error_reason(&reply)
    }

    #[track_caller]
    pub fn error_reason(&self, reply: &Msg) -> String {
        let context = format!("{}: join reply {}\n{}", self.name, reply.raw, self.dump());
        assert_eq!(reply.payload["status"], "error", "expected an error reply: {context}");
        let response = reply.payload["response"].as_object().unwrap_or_else(|| panic!("no response object: {context}"));
        assert_eq!(response.len(), 1, "the response holds only `reason`: {context}");
        response["reason"].as_str().unwrap_or_else(|| panic!("reason is not a string: {context}")).to_string()
    }

    /// The reply to the frame sent with `r` (any topic).
    #[track_caller]
    pub fn reply(&mut self, r: &str, timeout: Duration) -> Msg {
        let r = json!(r);
        self.wait("reply", timeout, move |m| m.event == "phx_reply" && m.r#ref == r)
    }

    /// Asserts that no reply to `r` arrives within `duration` (other frames stay pending).
    #[track_caller]
    pub fn assert_no_reply(&mut self, r: &str, duration: Duration) {
        let want = json!(r);
        if let Some(reply) = self.try_wait(duration, move |m| m.event == "phx_reply" && m.r#ref == want) {
            panic!("{}: expected no reply to ref {r}, got {}\n{}", self.name, reply.raw, self.dump());
        }
    }

    /// The next broadcast with user event `event` on `topic`; returns the whole frame.
    #[track_caller]
    pub fn broadcast_msg(&mut self, topic: &str, event: &str) -> Msg {
        self.wait(&format!("broadcast {event:?} on {topic}"), ARRIVE, |m| m.is_broadcast_on(topic) && m.user_event() == event)
    }

    /// Collects the broadcasts on `topic` until one with user event `sentinel` arrives; returns
    /// the ones before it (including those already pending) and the sentinel.
    #[track_caller]
    pub fn broadcasts_until(&mut self, topic: &str, sentinel: &str) -> (Vec<Msg>, Msg) {
        let last = self.broadcast_msg(topic, sentinel);
        let before = self.take_pending(|m| m.is_broadcast_on(topic));
        (before, last)
    }

    /// Heartbeat round trip (proves the socket is alive and served).
    #[track_caller]
    pub fn heartbeat(&mut self) {
        let r = self.send("phoenix", "heartbeat", json!({}));
        let reply = self.reply(&r, WAIT);
        assert_eq!(reply.payload, json!({"status": "ok", "response": {}}), "{}: heartbeat reply {}", self.name, reply.raw);
    }

    /// Waits for the server-side close of `topic`: `system` (status error) then `phx_close`
    /// carrying the join_ref (PROTOCOL.md §1.9, §6.4). Returns the system message text.
    #[track_caller]
    pub fn closed_by_server(&mut self, topic: &str, timeout: Duration) -> String {
        let join_ref = self.join_refs.get(topic).cloned().unwrap_or_else(|| panic!("{topic} was not joined"));
        let system = self.wait(&format!("system message on {topic}"), timeout, |m| m.topic == topic && m.event == "system");
        let context = format!("{}: {}\n{}", self.name, system.raw, self.dump());
        let sub = topic.strip_prefix("realtime:").unwrap_or(topic);
        let payload = system.payload.as_object().unwrap_or_else(|| panic!("system payload is not an object: {context}"));
        let mut keys: Vec<&str> = payload.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["channel", "extension", "message", "status"], "{context}");
        assert_eq!(payload["extension"], "system", "{context}");
        assert_eq!(payload["status"], "error", "{context}");
        assert_eq!(payload["channel"], json!(sub), "{context}");
        assert_eq!(system.r#ref, Value::Null, "{context}");
        if self.vsn == Vsn::V2 {
            assert_eq!(system.join_ref, json!(join_ref), "{context}");
        }
        let close = self.wait(&format!("phx_close on {topic}"), WAIT, |m| m.topic == topic && m.event == "phx_close");
        let context = format!("{}: {}\n{}", self.name, close.raw, self.dump());
        assert_eq!(close.payload, json!({}), "{context}");
        assert_eq!(close.r#ref, json!(join_ref), "phx_close carries the join_ref in ref: {context}");
        if self.vsn == Vsn::V2 {
            assert_eq!(close.join_ref, json!(join_ref), "{context}");
        }
        // No frame on the topic may sit between the system message and the close.
        self.join_refs.remove(topic);
        payload["message"].as_str().unwrap().to_string()
    }

    pub fn dump(&self) -> String {
        let start = self.log.len().saturating_sub(40);
        let mut lines: Vec<String> = self.log[start..].to_vec();
        lines.insert(0, format!("--- last frames of {} ({} in all) ---", self.name, self.log.len()));
        lines.join("\n")
    }

    pub fn close(&mut self) {
        self.ws.close();
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

/// The REST batch endpoint, both spellings.
pub const BATCH_PATHS: [&str; 2] = ["/api/broadcast", "/realtime/v1/api/broadcast"];

/// POSTs a JSON body with these headers (and `Content-Type: application/json` unless they set
/// one); returns (status, body text).
#[track_caller]
pub fn post_json(addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: &Value) -> (u16, String) {
    let mut all = headers.to_vec();
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("content-type")) {
        all.push(("Content-Type", "application/json"));
    }
    let (status, body) = support::http_request(addr, "POST", path, &all, body.to_string().as_bytes())
        .unwrap_or_else(|e| panic!("POST {path}: {e}"));
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// `apikey` + `Authorization: Bearer` with the same key, as the docs' REST example sends them.
pub fn key_headers(key: &str) -> Vec<(&'static str, String)> {
    vec![("apikey", key.to_string()), ("Authorization", format!("Bearer {key}"))]
}

/// `post_json` with `key_headers(key)`.
#[track_caller]
pub fn post_with_key(addr: SocketAddr, path: &str, key: &str, body: &Value) -> (u16, String) {
    let headers = key_headers(key);
    let borrowed: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
    post_json(addr, path, &borrowed, body)
}

/// A batch body with one message.
pub fn one_message(topic: &str, event: &str, payload: Value, private: bool) -> Value {
    json!({"messages": [{"topic": topic, "event": event, "payload": payload, "private": private}]})
}

/// Sends a request head announcing `content_length` bytes, then writes `body_bytes` of it from
/// another thread (ignoring write errors: the server may answer and close before reading it),
/// and returns the status line's code and the body of the answer.
pub fn post_announcing(addr: SocketAddr, path: &str, headers: &[(&str, &str)], content_length: usize, body_bytes: usize) -> (u16, String) {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    stream.set_write_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut head = format!("POST {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {content_length}\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).expect("write the request head");
    let mut writer = stream.try_clone().unwrap();
    let feeder = std::thread::spawn(move || {
        let chunk = vec![b' '; 64 * 1024];
        let mut left = body_bytes;
        while left > 0 {
            let n = left.min(chunk.len());
            if writer.write_all(&chunk[..n]).is_err() {
                return;
            }
            left -= n;
        }
    });
    let mut response = Vec::new();
    let mut buffer = [0u8; 8192];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => response.extend_from_slice(&buffer[..n]),
            Err(_) => break,
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
    let _ = feeder.join();
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no HTTP status line in {text:?}"));
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// The repository root.
pub fn repo_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}
