//! Fuzz harness for token verification, shared by the cargo-fuzz target in `fuzz/` and the
//! stable test that replays its corpus (`auth/tests/fuzz_corpus.rs`).

use serde_json::{Map, Value};

use crate::{clean_token, sign_hs256, KeyStore};

/// The secret the harness's store holds.
const SECRET: &[u8] = b"fuzz-secret-0123456789-abcdefghijklmnop";
/// A JWKS with an HS key under a `kid` (oct), so `kid` lookups run too.
const JWKS: &str = r#"{"keys":[{"kty":"oct","kid":"k1","alg":"HS256","k":"ZnV6ei1qd2tzLXNlY3JldC0wMTIzNDU2Nzg5"}]}"#;

/// Any bytes as a token (raw, then cleaned as the upgrade does): verification answers with
/// claims or a typed error, never panics; accepted claims have an `exp` in the future. A token the harness signs itself from the input's claims verifies
/// when they have a string `role`, a future integer `exp` and no `iat` that is not a number
/// (PROTOCOL.md §6.1: `iat`, when present, must be a number).
pub fn jwt(data: &[u8]) {
    let store = KeyStore::new(SECRET).with_jwks_json(JWKS).expect("the harness's JWKS parses");
    let now = 1_800_000_000;
    let text = String::from_utf8_lossy(data);
    for token in [text.to_string(), clean_token(&text)] {
        if let Ok(claims) = store.verify(&token, now) {
            assert!(claims.exp > now, "accepted an expired token: {token}");
        }
    }
    if let Ok(Value::Object(claims)) = serde_json::from_slice::<Value>(data) {
        check_signed(&store, claims, now);
    }
}

fn check_signed(store: &KeyStore, claims: Map<String, Value>, now: i64) {
    let token = sign_hs256(SECRET, &claims);
    let valid = claims.get("role").is_some_and(Value::is_string)
        && claims.get("exp").and_then(Value::as_i64).is_some_and(|exp| exp > now)
        && claims.get("iat").is_none_or(Value::is_number);
    let verified = store.verify(&token, now);
    if valid {
        assert!(verified.is_ok(), "a well-formed token was refused: {claims:?} → {verified:?}");
    }
}
