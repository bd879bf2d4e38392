//! Security checks against the real binary (issue 16 part 6): token forgeries and edge cases at
//! the upgrade, oversized tokens and headers, CORS on REST, and hostile channel names and filter
//! values that must never reach SQL text (checked on what PostgreSQL itself logged with
//! `log_statement = all`).

mod pgsupport;
mod privsupport;
mod support;
mod wsclient;

use std::time::Duration;

use serde_json::json;

use privsupport::*;
use wsclient::upgrade;

fn upgrade_with(server: &support::Server, token: &str) -> wsclient::HttpResponse {
    upgrade(server.addr, &format!("/realtime/v1/websocket?apikey={token}&vsn=1.0.0"), &[])
}

#[test]
fn forged_and_borderline_tokens_are_refused_at_the_upgrade() {
    let keys = Keys::generate("security");
    let jwks = keys.jwks_path().to_string_lossy().into_owned();
    let server = support::Server::start(&[("JWT_JWKS", &jwks)]);
    let now = now_s();

    // HS/RS key confusion: an HS256 token whose HMAC key is the RSA *public* key of the JWKS.
    // The HS secret is JWT_SECRET only; public key material never verifies an HS token.
    let public_pem = std::process::Command::new("openssl")
        .args(["pkey", "-in"])
        .arg(keys.dir.join("rsa.pem"))
        .arg("-pubout")
        .output()
        .expect("openssl")
        .stdout;
    assert!(public_pem.starts_with(b"-----BEGIN PUBLIC KEY-----"));
    let confused = hs256(&public_pem, json!({"role": "service_role", "exp": now + 3600}));
    let answer = upgrade_with(&server, &confused);
    assert_eq!((answer.status, answer.body_json()), (401, json!({"error": "Failed to validate JWT signature"})), "HS256 keyed with the RSA public key");
    // The same with the JWKS key's `kid` in the header.
    let confused_kid = unsigned_jwt(json!({"alg": "HS256", "typ": "JWT", "kid": keys.rsa_kid}), json!({"role": "service_role", "exp": now + 3600}), confused.rsplit('.').next().unwrap());
    let answer = upgrade_with(&server, &confused_kid);
    assert_eq!(answer.status, 401, "HS256 naming the RSA key's kid: {}", answer.body_text());

    // Expired by one second, and expiring this very second (valid strictly before `exp`).
    for (what, exp) in [("expired one second ago", now - 1), ("exp = now", now)] {
        let token = hs256(support::SECRET.as_bytes(), json!({"role": "anon", "exp": exp}));
        let answer = upgrade_with(&server, &token);
        assert_eq!((answer.status, answer.body_json()), (401, json!({"error": "Token has expired"})), "{what}");
    }
    let fresh = hs256(support::SECRET.as_bytes(), json!({"role": "anon", "exp": now + 60}));
    assert_eq!(upgrade_with(&server, &fresh).status, 101, "a token valid for another minute is accepted");

    // Oversized: a 64 KiB token in the query and in a header, and a 20 KiB header value: the
    // request head is over its 16 KiB limit (431), and the server keeps serving.
    let huge = format!("{}.{}.{}", "a".repeat(20_000), "b".repeat(30_000), "c".repeat(15_000));
    assert_eq!(upgrade_with(&server, &huge).status, 431, "64 KiB token in the query");
    let answer = upgrade(server.addr, "/realtime/v1/websocket?vsn=1.0.0", &[("apikey", &huge)]);
    assert_eq!(answer.status, 431, "64 KiB token in a header");
    let answer = upgrade(server.addr, "/realtime/v1/websocket?vsn=1.0.0", &[("apikey", &fresh), ("x-padding", &"p".repeat(20_000))]);
    assert_eq!(answer.status, 431, "20 KiB header value");
    assert_eq!(upgrade_with(&server, &fresh).status, 101, "still serving");
}

#[test]
fn rest_answers_cors_preflights_for_browsers() {
    let server = support::Server::start(&[]);
    for path in ["/api/broadcast", "/realtime/v1/api/broadcast"] {
        let answer = wsclient::raw_http(server.addr, "OPTIONS", path, false, &[("origin", "https://app.example"), ("access-control-request-method", "POST")]);
        assert_eq!(answer.status, 204, "{path}");
        assert_eq!(answer.header("access-control-allow-origin"), Some("*"), "{path}");
        let methods = answer.header("access-control-allow-methods").unwrap_or_default().to_ascii_uppercase();
        assert!(methods.contains("POST"), "{path}: {methods}");
        let headers = answer.header("access-control-allow-headers").unwrap_or_default().to_ascii_lowercase();
        for needed in ["authorization", "apikey", "content-type"] {
            assert!(headers.contains(needed), "{path}: {headers}");
        }
    }
}

/// What PostgreSQL logged as statement text (not the `DETAIL: parameters:` lines, where bound
/// values legitimately appear).
fn statement_lines(log: &str) -> Vec<&str> {
    log.lines().filter(|line| !line.contains("DETAIL:") && (line.contains("statement:") || line.contains("execute "))).collect()
}

#[test]
fn hostile_channel_names_and_filter_values_never_reach_sql_text() {
    let (mut db, server) = start_with_acl();
    db.exec("CREATE TABLE public.notes (id bigint PRIMARY KEY, title text); GRANT SELECT ON public.notes TO anon, authenticated;");
    db.exec("CREATE PUBLICATION supabase_realtime FOR TABLE public.notes;");
    db.exec("ALTER SYSTEM SET log_statement = 'all'; SELECT pg_reload_conf();");
    std::thread::sleep(Duration::from_millis(300));

    let marker = "zz_injected_marker";
    let hostile_topic = format!("realtime:room'); DROP TABLE public.acl; SELECT ('{marker}");
    let hostile_value = format!("x'); DROP TABLE public.notes; SELECT ('{marker}");
    let user = USER_A;
    let mut c = Conn::open(&server, &user_token(user), Vsn::V1, "hostile");
    // A private join runs the read policy check with the topic as a value.
    let reason = c.join_error(&hostile_topic, config(true, false, false), None);
    assert!(reason.starts_with("Unauthorized: "), "{reason}");
    // A Postgres Changes binding whose filter value looks like SQL.
    let topic = "realtime:notes-watch";
    let join = json!({
        "broadcast": {"ack": false, "self": false},
        "presence": {"key": "", "enabled": false},
        "postgres_changes": [{"event": "*", "schema": "public", "table": "notes", "filter": format!("title=eq.{hostile_value}")}],
        "private": false
    });
    let reply = c.join(topic, join, None);
    assert_eq!(reply.payload["status"], "ok", "{}", reply.raw);
    c.wait("Subscribed to PostgreSQL", Duration::from_secs(15), |m| m.event == "system" && m.payload["message"] == "Subscribed to PostgreSQL");
    db.exec(&format!("INSERT INTO public.notes VALUES (1, '{}')", hostile_value.replace('\'', "''")));
    // The change matches the filter (the title equals the hostile value) and reaches us.
    let change = c.wait("the change", Duration::from_secs(15), |m| m.event == "postgres_changes");
    assert_eq!(change.payload["data"]["record"]["title"], json!(hostile_value), "{}", change.raw);
    // Both tables are still there, and no statement text PostgreSQL ran holds the marker.
    assert_eq!(db.one("SELECT (SELECT count(*) FROM public.acl) >= 0 AND (SELECT count(*) FROM public.notes) = 1"), "t");
    db.exec("ALTER SYSTEM RESET log_statement; SELECT pg_reload_conf();");
    let log = std::fs::read_to_string(db.cluster.log_file()).expect("read the PostgreSQL log");
    assert!(log.contains("statement:") || log.contains("execute "), "log_statement = all logged nothing");
    let with_marker: Vec<&str> = statement_lines(&log).into_iter().filter(|line| line.contains(marker)).collect();
    assert!(with_marker.iter().any(|line| line.contains("INSERT INTO public.notes")), "the log shows the test's own INSERT (so a leak would show too)");
    let leaked: Vec<&str> = with_marker.into_iter().filter(|line| !line.contains("INSERT INTO public.notes")).collect();
    assert!(leaked.is_empty(), "client text reached SQL statements:\n{}", leaked.join("\n"));
}

/// A token header nesting JSON strings in strings under serde_json's raw-value key (issue 16's
/// dependency review): jsonwebtoken read the header's unknown members as `serde_json::Value`s
/// before any signature check, and each raw-value string was parsed again with a fresh
/// recursion limit, so one unsigned token overflowed a shard's stack and aborted the process.
/// On the old code the debug build's shard overflowed its stack on the join below (process
/// abort); the upgrade's 10 levels only got the signature error. Now both are "not a JWT" (14
/// levels, 92 KB, in a join's `access_token`; 10 levels fit in the 16 KiB head) and the server
/// keeps serving.
#[test]
fn a_token_header_nesting_raw_values_is_not_a_jwt() {
    let server = support::Server::start(&[]);
    let exp = now_s() + 3600;
    let nested = |levels: usize| {
        let nested = auth::plain_json::nested_raw_values(levels);
        let header = format!(r#"{{"alg":"HS256","typ":"JWT","x":{nested}}}"#);
        let claims = json!({"role": "anon", "exp": exp}).to_string();
        use base64::Engine as _;
        let part = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!("{}.{}.c2lnbmF0dXJl", part(&header), part(&claims))
    };
    let mut c = Conn::open(&server, wsclient::anon(), Vsn::V1, "client");
    let reason = c.join_error("realtime:room", config(false, false, false), Some(&nested(14)));
    assert_eq!(reason, "MalformedJWT: The token provided is not a valid JWT");
    c.heartbeat();

    let small = nested(10);
    assert!(small.len() < 15_000, "{}", small.len());
    let answer = upgrade_with(&server, &small);
    assert_eq!((answer.status, answer.body_json()), (401, json!({"error": "The token provided is not a valid JWT"})));

    let fresh = hs256(support::SECRET.as_bytes(), json!({"role": "anon", "exp": exp}));
    assert_eq!(upgrade_with(&server, &fresh).status, 101, "still serving");
}
