use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Map, Value};

use crate::AuthError;

/// Verified claims of a token.
#[derive(Debug, Clone, PartialEq)]
pub struct Claims {
    /// The `role` claim, used verbatim as a Postgres role name (PROTOCOL.md §6.2).
    pub role: String,
    /// Expiry, Unix seconds (decimals rounded).
    pub exp: i64,
    /// The `sub` claim when it is a string.
    pub sub: Option<String>,
    /// Every claim, as compact JSON text (what RLS checks pass as `request.jwt.claims`). Kept
    /// as text, not a map: a joined channel holds its claims for life, and text is several
    /// times smaller.
    pub json: std::sync::Arc<str>,
}

/// The key material one tenant's tokens are checked against: the shared HS secret (used as raw
/// bytes, never base64-decoded) and an optional JWKS for asymmetric keys and `kid`-selected
/// `oct` keys (PROTOCOL.md §6.1 step 3).
#[derive(Clone)]
pub struct KeyStore {
    secret: Vec<u8>,
    jwks: Option<JwkSet>,
}

impl std::fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyStore")
            .field("secret", &"<redacted>")
            .field("jwks_keys", &self.jwks.as_ref().map(|j| j.keys.len()))
            .finish()
    }
}

/// URL-decodes a token and removes every whitespace character (PROTOCOL.md §1.3).
pub fn clean_token(raw: &str) -> String {
    let decoded = percent_encoding::percent_decode_str(raw).decode_utf8_lossy();
    decoded.chars().filter(|c| !c.is_whitespace()).collect()
}

impl KeyStore {
    /// A store with only the HS secret.
    pub fn new(secret: impl Into<Vec<u8>>) -> KeyStore {
        KeyStore { secret: secret.into(), jwks: None }
    }

    /// Adds a JWKS (the JSON text of a `{"keys":[...]}` document).
    pub fn with_jwks_json(mut self, jwks_json: &str) -> Result<KeyStore, serde_json::Error> {
        self.jwks = Some(serde_json::from_str(jwks_json)?);
        Ok(self)
    }

    /// Verifies `token` (already cleaned) at time `now` (Unix seconds).
    pub fn verify(&self, token: &str, now: i64) -> Result<Claims, AuthError> {
        if token.is_empty() {
            return Err(AuthError::NotJwt);
        }
        let raw_claims = decode_claims_segment(token)?;
        check_header_alg(token)?;
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::NotJwt)?;
        let key = self.key_for(&header)?;
        let mut validation = Validation::new(header.alg);
        validation.validate_exp = false; // checked below against the caller's `now`
        validation.validate_aud = false;
        validation.validate_nbf = false;
        validation.required_spec_claims.clear();
        // The claims were read above (`raw_claims`); decoding them again into a `Value` here
        // would go through serde_json's raw-value rule, so they are only skipped.
        jsonwebtoken::decode::<serde::de::IgnoredAny>(token, &key, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::InvalidSignature => AuthError::BadSignature,
                ErrorKind::InvalidAlgorithm
                | ErrorKind::InvalidKeyFormat
                | ErrorKind::InvalidRsaKey(_)
                | ErrorKind::InvalidEcdsaKey
                | ErrorKind::MissingAlgorithm => AuthError::NoSigner { kid: None },
                _ => AuthError::NotJwt,
            }
        })?;
        claims_at(raw_claims, now)
    }

    fn key_for(&self, header: &Header) -> Result<DecodingKey, AuthError> {
        let jwk = |kid: &str| self.jwks.as_ref().and_then(|set| set.find(kid));
        match header.alg {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
                if let Some(jwk) = header.kid.as_deref().and_then(jwk) {
                    if let AlgorithmParameters::OctetKey(oct) = &jwk.algorithm {
                        return URL_SAFE_NO_PAD
                            .decode(oct.value.trim_end_matches('='))
                            .map(|k| DecodingKey::from_secret(&k))
                            .map_err(|_| AuthError::NoSigner { kid: None });
                    }
                }
                // A tenant configured with a JWKS only has no HS secret: an empty key would
                // accept tokens signed with an empty secret.
                if self.secret.is_empty() {
                    return Err(AuthError::NoSigner { kid: None });
                }
                Ok(DecodingKey::from_secret(&self.secret))
            }
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::ES256
            | Algorithm::ES384
            | Algorithm::EdDSA => {
                let Some(kid) = header.kid.as_deref() else {
                    return Err(AuthError::NoSigner { kid: None });
                };
                let no_signer = || AuthError::NoSigner { kid: Some(kid.to_string()) };
                let jwk = jwk(kid).ok_or_else(no_signer)?;
                let family_matches = matches!(
                    (&jwk.algorithm, header.alg),
                    (AlgorithmParameters::RSA(_), Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512)
                        | (AlgorithmParameters::EllipticCurve(_), Algorithm::ES256 | Algorithm::ES384)
                        | (AlgorithmParameters::OctetKeyPair(_), Algorithm::EdDSA)
                );
                if !family_matches {
                    return Err(no_signer());
                }
                DecodingKey::from_jwk(jwk).map_err(|_| no_signer())
            }
            _ => Err(AuthError::NoSigner { kid: None }),
        }
    }
}

/// The header must be a JSON object with a string `alg`; an `alg` this server has no signer for
/// (`none`, `PS256`, anything unknown) is a signer error, not a malformed token (§6.1 step 3).
fn check_header_alg(token: &str) -> Result<(), AuthError> {
    const SUPPORTED: [&str; 9] = ["HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "EdDSA"];
    let header = token.split('.').next().ok_or(AuthError::NotJwt)?;
    let bytes = URL_SAFE_NO_PAD.decode(header.trim_end_matches('=')).map_err(|_| AuthError::NotJwt)?;
    let Ok(Value::Object(header)) = crate::plain_json::from_slice(&bytes) else {
        return Err(AuthError::NotJwt);
    };
    // jsonwebtoken reads the header's other members as `serde_json::Value`s, before any
    // signature check: with the raw-value key an unsigned header would nest strings in strings
    // past serde_json's recursion limit and overflow the stack (issue 16's dependency review).
    // No real header carries that key.
    if header.contains_key(crate::plain_json::RAW_VALUE_KEY) || header.values().any(crate::plain_json::holds_raw_value_key) {
        return Err(AuthError::NotJwt);
    }
    match header.get("alg").and_then(Value::as_str) {
        Some(alg) if SUPPORTED.contains(&alg) => Ok(()),
        Some(_) => Err(AuthError::NoSigner { kid: None }),
        None => Err(AuthError::NotJwt),
    }
}

/// Decodes the claims segment without verifying it, so that a token whose claims are not a
/// JSON object is "not a JWT" before any key is looked up (PROTOCOL.md §6.1 step 2).
fn decode_claims_segment(token: &str) -> Result<Map<String, Value>, AuthError> {
    let mut parts = token.split('.');
    let (Some(_header), Some(claims), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::NotJwt);
    };
    let bytes = URL_SAFE_NO_PAD
        .decode(claims.trim_end_matches('='))
        .map_err(|_| AuthError::NotJwt)?;
    match crate::plain_json::from_slice(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(AuthError::NotJwt),
    }
}

/// Steps 5 and 6 of PROTOCOL.md §6.1, after the signature has been verified.
fn claims_at(all: Map<String, Value>, now: i64) -> Result<Claims, AuthError> {
    let exp = match all.get("exp") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => {
            Some(n.as_i64().unwrap_or_else(|| n.as_f64().unwrap_or(0.0).round() as i64))
        }
        Some(_) => return Err(AuthError::NotJwt),
    };
    if let Some(iat) = all.get("iat") {
        if !iat.is_number() {
            return Err(AuthError::NotJwt);
        }
    }
    if let Some(exp) = exp {
        if exp <= now {
            return Err(AuthError::Expired { seconds_ago: now.saturating_sub(exp) });
        }
    }
    let role = match all.get("role") {
        Some(Value::String(role)) => role.clone(),
        _ => return Err(AuthError::MissingClaims),
    };
    let Some(exp) = exp else {
        return Err(AuthError::MissingClaims);
    };
    let sub = all.get("sub").and_then(Value::as_str).map(str::to_string);
    let json = serde_json::to_string(&all).expect("a JSON map serialises");
    Ok(Claims { role, exp, sub, json: std::sync::Arc::from(json) })
}

/// Signs `claims` with HS256 and `secret` (for `powa-realtime token`, `dev` and tests).
pub fn sign_hs256(secret: &[u8], claims: &Map<String, Value>) -> String {
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &EncodingKey::from_secret(secret))
        .expect("HS256 signing of a JSON map cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: i64 = 1_800_000_000;

    fn token(claims: Value, secret: &[u8]) -> String {
        sign_hs256(secret, claims.as_object().unwrap())
    }

    fn check(token: &str) -> Result<Claims, AuthError> {
        KeyStore::new(b"secret".to_vec()).verify(token, NOW)
    }

    #[test]
    fn accepts_a_valid_token() {
        let claims = check(&token(json!({"role":"authenticated","exp":NOW+10,"sub":"u1"}), b"secret")).unwrap();
        assert_eq!(claims.role, "authenticated");
        assert_eq!(claims.sub.as_deref(), Some("u1"));
        assert_eq!(claims.exp, NOW + 10);
    }

    #[test]
    fn a_store_without_a_secret_refuses_hs_tokens_even_with_an_empty_key() {
        let empty_signed = token(json!({"role":"anon","exp":NOW+10}), b"");
        assert_eq!(KeyStore::new(Vec::new()).verify(&empty_signed, NOW), Err(AuthError::NoSigner { kid: None }));
    }

    #[test]
    fn refuses_in_spec_order() {
        assert_eq!(check("garbage"), Err(AuthError::NotJwt));
        assert_eq!(check(""), Err(AuthError::NotJwt));
        assert_eq!(check("a.b.c"), Err(AuthError::NotJwt));
        let other = token(json!({"role":"anon","exp":NOW+10}), b"other");
        assert_eq!(check(&other), Err(AuthError::BadSignature));
        let expired = token(json!({"role":"anon","exp":NOW-30}), b"secret");
        assert_eq!(check(&expired), Err(AuthError::Expired { seconds_ago: 30 }));
        let exactly_now = token(json!({"role":"anon","exp":NOW}), b"secret");
        assert_eq!(check(&exactly_now), Err(AuthError::Expired { seconds_ago: 0 }));
        let no_role = token(json!({"exp":NOW+10}), b"secret");
        assert_eq!(check(&no_role), Err(AuthError::MissingClaims));
        let no_exp = token(json!({"role":"anon"}), b"secret");
        assert_eq!(check(&no_exp), Err(AuthError::MissingClaims));
        let bad_iat = token(json!({"role":"anon","exp":NOW+10,"iat":"x"}), b"secret");
        assert_eq!(check(&bad_iat), Err(AuthError::NotJwt));
    }

    /// Found by the panic review of issue 16: `now - exp` overflowed (a panic in debug builds)
    /// for a signed token whose `exp` is `i64::MIN` or a float beyond it.
    #[test]
    fn an_exp_at_the_bottom_of_the_range_is_expired_without_overflow() {
        for exp in [json!(i64::MIN), json!(-1e300), json!(i64::MIN + 1)] {
            let ancient = token(json!({"role":"anon","exp":exp}), b"secret");
            assert!(matches!(check(&ancient), Err(AuthError::Expired { seconds_ago }) if seconds_ago > 0), "{exp}");
        }
    }

    #[test]
    fn asymmetric_alg_without_jwks_has_no_signer() {
        // Header {"alg":"RS256","typ":"JWT"} with any claims and signature.
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT","kid":"k1"}"#);
        let claims = URL_SAFE_NO_PAD.encode(br#"{"role":"anon","exp":1900000000}"#);
        let token = format!("{header}.{claims}.c2ln");
        assert_eq!(check(&token), Err(AuthError::NoSigner { kid: Some("k1".into()) }));
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
        let token = format!("{header}.{claims}.c2ln");
        assert_eq!(check(&token), Err(AuthError::NoSigner { kid: None }));
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let token = format!("{header}.{claims}.");
        assert_eq!(check(&token), Err(AuthError::NoSigner { kid: None }));
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"XY999"}"#);
        assert_eq!(check(&format!("{header}.{claims}.c2ln")), Err(AuthError::NoSigner { kid: None }));
    }

    #[test]
    fn cleans_tokens() {
        assert_eq!(clean_token("ab%20c\n d"), "abcd");
        assert_eq!(clean_token("x.y.z"), "x.y.z");
    }

    /// Found by issue 16's dependency review: jsonwebtoken keeps a header's unknown members as
    /// `serde_json::Value`s, and with serde_json's `raw_value` feature an object whose key is
    /// the raw-value marker has its string parsed again, with a fresh recursion limit. A header
    /// of strings nested in strings (checked before any signature) overflowed the stack: on the
    /// old code this test aborts the test process. Now such a header is not a JWT, and a
    /// signed token with the key in its claims verifies without reading them as a `Value`.
    #[test]
    fn a_header_nesting_raw_values_is_refused_on_a_small_stack() {
        let key = crate::plain_json::RAW_VALUE_KEY;
        let nested = crate::plain_json::nested_raw_values(14);
        let header = format!(r#"{{"alg":"HS256","typ":"JWT","x":{nested}}}"#);
        let claims = URL_SAFE_NO_PAD.encode(json!({"role":"anon","exp":NOW+10}).to_string());
        let hostile = format!("{}.{claims}.c2ln", URL_SAFE_NO_PAD.encode(header));
        let outcome = std::thread::Builder::new().stack_size(256 * 1024).spawn(move || check(&hostile)).unwrap().join();
        assert_eq!(outcome.ok(), Some(Err(AuthError::NotJwt)), "refused on a small stack");
        let shallow = format!("{}.{claims}.c2ln", URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"HS256","x":{{"{key}":"1"}}}}"#)));
        assert_eq!(check(&shallow), Err(AuthError::NotJwt));

        let marked = token(json!({"role":"anon","exp":NOW+10,"x":{key: "[1]"}}), b"secret");
        let claims = std::thread::Builder::new().stack_size(256 * 1024).spawn(move || check(&marked)).unwrap().join().unwrap().unwrap();
        assert_eq!(claims.role, "anon");
    }
}
