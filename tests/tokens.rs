//! The token lifecycle on live channels (PROTOCOL.md §6.1, §6.3, §6.4) against the real server
//! with a database: `access_token` refresh on private channels (kept with a fresh token, closed
//! when the new claims may no longer read or the token is bad), expiry without refresh (the
//! `system` message and `phx_close`, the socket staying open), and asymmetric tokens verified
//! against a JWKS (`JWT_JWKS`, RS256 and ES256), with the exact refusals for unknown key ids.

mod pgsupport;
mod privsupport;
mod support;
mod wsclient;

use std::time::{Duration, Instant};

use serde_json::json;

use privsupport::*;
use wsclient::{anon, expired_seconds, upgrade};

/// A refresh is never answered; this long without any frame on the topic means "kept".
const NO_ANSWER: Duration = Duration::from_millis(800);

fn service() -> String {
    support::service_key()
}

/// Sends a private broadcast on `sub` through REST with the service key (a message that must
/// reach every member).
fn rest_private(server: &support::Server, sub: &str, event: &str) {
    let (status, body) = post_with_key(server.addr, BATCH_PATHS[0], &service(), &one_message(sub, event, json!({}), true));
    assert_eq!((status, body.as_str()), (202, ""), "REST sentinel");
}

fn rest_public(server: &support::Server, sub: &str, event: &str) {
    let (status, body) = post_with_key(server.addr, BATCH_PATHS[0], &service(), &one_message(sub, event, json!({}), false));
    assert_eq!((status, body.as_str()), (202, ""), "REST sentinel");
}

#[test]
fn refreshing_a_private_channel_keeps_it_with_a_fresh_token_and_closes_it_otherwise() {
    let (mut db, server) = start_with_acl();
    for topic in ["keep", "revoke", "expire", "forge", "ignore"] {
        grant(&mut db, USER_A, topic, true);
    }
    let first = user_token(USER_A);
    let fresh = support::token("authenticated", &["--sub", USER_A, "--exp", "7200"]);
    assert_ne!(first, fresh);
    let mut a = Conn::open(&server, anon(), Vsn::V2, "user-a");
    for topic in ["keep", "revoke", "expire", "forge", "ignore"] {
        a.join_ok(&format!("realtime:{topic}"), config(true, true, false), Some(&first));
    }

    // A fresh token for the same user: no answer, the channel stays, receives and may send.
    a.refresh("realtime:keep", &fresh);
    a.drain(NO_ANSWER);
    a.assert_nothing_on("realtime:keep", "after a refresh with a fresh token");
    rest_private(&server, "keep", "after-refresh");
    a.broadcast_msg("realtime:keep", "after-refresh");
    let r = a.broadcast_binary("realtime:keep", "mine", json!({}));
    assert_eq!(a.reply(&r, ARRIVE).payload, json!({"status": "ok", "response": {}}), "send after the refresh (write re-checked with the new claims)");

    // Ignored: an `sb_` key, null, the current token again.
    a.send("realtime:ignore", "access_token", json!({"access_token": "sb_publishable_abc"}));
    a.send("realtime:ignore", "access_token", json!({"access_token": null}));
    a.refresh("realtime:ignore", &first);
    a.drain(NO_ANSWER);
    a.assert_nothing_on("realtime:ignore", "after ignored refreshes");

    // Another user's token (no read on the topic): closed, §6.3.
    a.refresh("realtime:revoke", &user_token(USER_B));
    assert_eq!(a.closed_by_server("realtime:revoke", ARRIVE), "You do not have permissions to read from this Channel topic: revoke");
    // An expired token.
    a.refresh("realtime:expire", &support::token("authenticated", &["--sub", USER_A, "--exp=-30"]));
    let message = a.closed_by_server("realtime:expire", ARRIVE);
    let n = expired_seconds(&message, "Token has expired ");
    assert!((29..=40).contains(&n), "{message}");
    // A token whose claims were swapped for service_role.
    a.refresh("realtime:forge", &with_claims(&first, json!({"role": "service_role", "exp": now_s() + 3600})));
    assert_eq!(a.closed_by_server("realtime:forge", ARRIVE), "Failed to validate JWT signature");

    // The socket and the kept channels live on; closed channels get nothing more.
    a.heartbeat();
    for sub in ["keep", "ignore", "revoke", "expire", "forge"] {
        rest_private(&server, sub, "end");
    }
    for sub in ["keep", "ignore"] {
        a.broadcast_msg(&format!("realtime:{sub}"), "end");
    }
    a.drain(SETTLE);
    for sub in ["revoke", "expire", "forge"] {
        a.assert_nothing_on(&format!("realtime:{sub}"), "a closed channel");
    }
    assert!(a.ended.is_none(), "the socket must stay open: {:?}", a.ended);
}

#[test]
fn a_channel_whose_token_expires_without_refresh_is_closed_and_the_socket_stays_open() {
    let (mut db, server) = start_with_acl();
    grant(&mut db, USER_A, "short-priv", false);
    let long = user_token(USER_A);
    let mut c = Conn::open(&server, anon(), Vsn::V1, "channels");
    c.join_ok("realtime:long", config(false, false, false), Some(&long));
    c.join_ok("realtime:refreshed", config(false, false, false), Some(&support::token("authenticated", &["--sub", USER_A, "--exp=3"])));
    let short = support::token("authenticated", &["--sub", USER_A, "--exp=3"]);
    let exp = claims_of(&short)["exp"].as_i64().unwrap();
    c.join_ok("realtime:short-pub", config(false, false, false), Some(&short));
    c.join_ok("realtime:short-priv", config(true, false, false), Some(&short));
    // The connection token itself is short-lived: the channel relying on it expires too.
    let short_conn = support::token("anon", &["--exp=3"]);
    let mut d = Conn::open(&server, &short_conn, Vsn::V2, "short-connection-token");
    d.join_ok("realtime:conn-token", config(false, false, false), None);
    // Refreshed in time: kept.
    c.refresh("realtime:refreshed", &long);

    let started = Instant::now();
    let expired = |conn: &mut Conn, topic: &str| {
        let message = conn.closed_by_server(topic, Duration::from_secs(9));
        let n = expired_seconds(&message, "Token has expired ");
        assert!((0..=3).contains(&n), "{topic}: {message}");
        assert!(now_s() >= exp, "{topic} closed before the token expired");
        eprintln!("[tokens] {topic} closed {:?} after the joins", started.elapsed());
    };
    expired(&mut c, "realtime:short-pub");
    expired(&mut c, "realtime:short-priv");
    expired(&mut d, "realtime:conn-token");
    // The sockets stay open; the other channels continue.
    c.heartbeat();
    d.heartbeat();
    for sub in ["long", "refreshed", "short-pub", "conn-token"] {
        rest_public(&server, sub, "end");
    }
    c.broadcast_msg("realtime:long", "end");
    c.broadcast_msg("realtime:refreshed", "end");
    c.drain(SETTLE);
    d.drain(SETTLE);
    c.assert_nothing_on("realtime:short-pub", "a closed channel");
    c.assert_nothing_on("realtime:short-priv", "a closed channel");
    d.assert_nothing_on("realtime:conn-token", "a closed channel");
    assert!(c.ended.is_none() && d.ended.is_none(), "sockets closed: {:?} {:?}", c.ended, d.ended);
    // A join that relies on the expired connection token fails; one with a fresh token works.
    let reason = d.join_error("realtime:again", config(false, false, false), None);
    let n = expired_seconds(&reason, "InvalidJWTToken: Token has expired ");
    assert!((0..=15).contains(&n), "{reason}");
    d.join_ok("realtime:again", config(false, false, false), Some(&long));
}

#[test]
fn rs256_and_es256_tokens_from_a_jwks_are_accepted_and_unknown_key_ids_refused() {
    let keys = Keys::generate("tokens");
    let jwks = keys.jwks_path().to_string_lossy().into_owned();
    let (mut db, server) = start_with_acl_env(&[("JWT_JWKS", &jwks)]);
    grant(&mut db, USER_A, "jwks-room", true);
    grant(&mut db, USER_B, "jwks-room", false);
    let rs_a = keys.rs256(&keys.rsa_kid, &user_claims(USER_A, 3600));
    let es_b = keys.es256(&keys.ec_kid, &user_claims(USER_B, 3600));

    // As connection tokens: the upgrade succeeds and the private joins pass the policy.
    let mut a = Conn::open(&server, &rs_a, Vsn::V1, "rs256-user");
    a.join_ok("realtime:jwks-room", config(true, true, false), None);
    let mut b = Conn::open(&server, &es_b, Vsn::V2, "es256-user");
    b.join_ok("realtime:jwks-room", config(true, false, false), None);
    // As channel tokens beside the HS256 anon connection token.
    let mut c = Conn::open(&server, anon(), Vsn::V1, "hs256-connection");
    c.join_ok("realtime:jwks-room", config(true, false, false), Some(&rs_a));
    // RS256 sender (write granted) reaches the ES256 member.
    let r = a.broadcast("realtime:jwks-room", "signed", json!({"alg": "RS256"}));
    assert_eq!(a.reply(&r, ARRIVE).payload["status"], "ok", "{}", a.dump());
    assert_eq!(b.broadcast_msg("realtime:jwks-room", "signed").payload["payload"], json!({"alg": "RS256"}));
    c.broadcast_msg("realtime:jwks-room", "signed");

    // Refused tokens: at the upgrade, in a join, in a refresh.
    let unknown = keys.rs256("no-such-kid", &user_claims(USER_A, 3600));
    let signer_kid = |kid: &str| format!("Failed to generate JWT signer for key ID (kid) \"{kid}\", check your JWT secret or JWKS configuration");
    let no_kid = {
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(&std::fs::read(keys.dir.join("rsa.pem")).unwrap()).unwrap();
        jsonwebtoken::encode(&jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256), &user_claims(USER_A, 3600), &key).unwrap()
    };
    let forged = keys.rs256_forged(&json!({"role": "service_role", "exp": now_s() + 3600}));
    let wrong_family = keys.es256(&keys.rsa_kid, &user_claims(USER_A, 3600));
    let cases = [
        ("unknown kid", &unknown, signer_kid("no-such-kid"), "JwtSignerError"),
        ("RS256 without kid", &no_kid, "Failed to generate JWT signer, check your JWT secret or JWKS configuration".to_string(), "JwtSignerError"),
        ("RS256 signed by a key not in the JWKS", &forged, "Failed to validate JWT signature".to_string(), "JwtSignatureError"),
        ("ES256 naming the RSA key", &wrong_family, signer_kid(&keys.rsa_kid), "JwtSignerError"),
    ];
    for (i, (what, token, message, code)) in cases.iter().enumerate() {
        let answer = upgrade(server.addr, &format!("/realtime/v1/websocket?apikey={token}&vsn=1.0.0"), &[]);
        assert_eq!((answer.status, answer.body_json()), (401, json!({"error": message})), "upgrade with {what}");
        assert_eq!(c.join_error("realtime:jwks-join", config(true, false, false), Some(token)), format!("{code}: {message}"), "join with {what}");
        let topic = format!("realtime:refresh-{i}");
        c.join_ok(&topic, config(false, false, false), None);
        c.refresh(&topic, token);
        assert_eq!(&c.closed_by_server(&topic, ARRIVE), message, "refresh with {what}");
    }
    // Refreshing an HS256 channel with the same user's RS256 token keeps it.
    let mut d = Conn::open(&server, anon(), Vsn::V1, "hs256-then-rs256");
    d.join_ok("realtime:jwks-room", config(true, false, false), Some(&user_token(USER_A)));
    d.refresh("realtime:jwks-room", &keys.rs256(&keys.rsa_kid, &user_claims(USER_A, 7200)));
    d.drain(NO_ANSWER);
    d.assert_nothing_on("realtime:jwks-room", "after refreshing with an RS256 token");
    rest_private(&server, "jwks-room", "end");
    d.broadcast_msg("realtime:jwks-room", "end");
    b.broadcast_msg("realtime:jwks-room", "end");
}

#[test]
fn tokens_with_an_unsupported_alg_get_the_signer_error() {
    // PROTOCOL.md §6.1 step 3: a decodable header whose `alg` has no signer (`none`, `PS256`,
    // `HS256` without a valid signature is a different case) → the signer error without kid.
    let server = support::Server::start(&[]);
    let exp = now_s() + 3600;
    let signer = "Failed to generate JWT signer, check your JWT secret or JWKS configuration";
    let mut c = Conn::open(&server, anon(), Vsn::V1, "client");
    let mut wrong = Vec::new();
    for (what, token) in [
        ("alg none, empty signature", unsigned_jwt(json!({"alg": "none", "typ": "JWT"}), json!({"role": "service_role", "exp": exp}), "")),
        ("alg none, some signature", unsigned_jwt(json!({"alg": "none", "typ": "JWT"}), json!({"role": "service_role", "exp": exp}), "c2lnbmF0dXJl")),
        ("alg PS256 without kid", unsigned_jwt(json!({"alg": "PS256", "typ": "JWT"}), json!({"role": "service_role", "exp": exp}), "c2lnbmF0dXJl")),
        ("alg XY999", unsigned_jwt(json!({"alg": "XY999", "typ": "JWT"}), json!({"role": "service_role", "exp": exp}), "c2lnbmF0dXJl")),
    ] {
        let answer = upgrade(server.addr, &format!("/realtime/v1/websocket?apikey={token}&vsn=1.0.0"), &[]);
        let got = (answer.status, answer.body_json());
        if got != (401, json!({"error": signer})) {
            wrong.push(format!("upgrade with {what}: {got:?}"));
        }
        let reason = c.join_error("realtime:room", config(false, false, false), Some(&token));
        if reason != format!("JwtSignerError: {signer}") {
            wrong.push(format!("join with {what}: {reason:?}"));
        }
    }
    c.heartbeat();
    assert!(wrong.is_empty(), "expected the signer error of §6.1 step 3, got:\n{}", wrong.join("\n"));
}
