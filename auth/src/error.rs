use std::fmt;

/// Why a token was refused. One variant per row of PROTOCOL.md §6.1; the client-visible
/// strings for each context (upgrade body, join reason, refresh message) are chosen by the
/// engine's `client_error` module, not here.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuthError {
    /// No token was given at all.
    Missing,
    /// Not three base64url segments with a JSON object header and claims.
    NotJwt,
    /// No key for the token's `alg` (and `kid`, when the lookup was for one).
    NoSigner {
        /// The `kid` whose lookup failed, when there was one.
        kid: Option<String>,
    },
    /// The signature does not verify with the selected key.
    BadSignature,
    /// `exp` is not after `now`.
    Expired {
        /// `now - exp`, whole seconds.
        seconds_ago: i64,
    },
    /// `role` or `exp` is absent.
    MissingClaims,
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthError::Missing => write!(f, "no token"),
            AuthError::NotJwt => write!(f, "not a JWT"),
            AuthError::NoSigner { kid: Some(kid) } => write!(f, "no signer for kid {kid:?}"),
            AuthError::NoSigner { kid: None } => write!(f, "no signer for this alg"),
            AuthError::BadSignature => write!(f, "bad signature"),
            AuthError::Expired { seconds_ago } => write!(f, "expired {seconds_ago} s ago"),
            AuthError::MissingClaims => write!(f, "role or exp missing"),
        }
    }
}

impl std::error::Error for AuthError {}
