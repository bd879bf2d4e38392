//! TLS on the listener (`REALTIME_TLS_CERT`, `REALTIME_TLS_KEY`): rustls, TLS 1.2 and 1.3, ALPN
//! `http/1.1`, so `wss://` and `https://` (REST included) share the port.
//!
//! The certificate chain and key are read at start (a bad file refuses to start, naming the file
//! and the problem) and again on [`Tls::reload`] (SIGHUP): the new pair serves the handshakes
//! that start after it; live connections keep theirs. A failed reload keeps the previous pair.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use futures_rustls::TlsAcceptor;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why a certificate or key could not be used.
#[derive(Debug)]
pub enum TlsError {
    /// The certificate file could not be read or holds no usable certificate.
    Cert(PathBuf, String),
    /// The key file could not be read or holds no usable private key.
    Key(PathBuf, String),
    /// The key does not belong to the certificate, or rustls refused the configuration.
    Pair(PathBuf, PathBuf, String),
}

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TlsError::Cert(path, why) => write!(f, "TLS certificate {}: {why}", path.display()),
            TlsError::Key(path, why) => write!(f, "TLS private key {}: {why}", path.display()),
            TlsError::Pair(cert, key, why) => write!(f, "TLS key {} does not fit certificate {}: {why}", key.display(), cert.display()),
        }
    }
}

impl std::error::Error for TlsError {}

/// The listener's TLS: the acceptor every shard uses and the reloadable pair behind it.
pub struct Tls {
    acceptor: TlsAcceptor,
    resolver: Arc<Reloadable>,
}

#[derive(Debug)]
struct Reloadable {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Reloadable {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner())))
    }
}

fn pem_problem(error: rustls_pki_types::pem::Error) -> String {
    match error {
        rustls_pki_types::pem::Error::Io(error) => error.to_string(),
        rustls_pki_types::pem::Error::NoItemsFound => "no PEM section of the expected kind".to_string(),
        other => format!("not valid PEM ({other:?})"),
    }
}

fn load(cert_path: &Path, key_path: &Path, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    let cert_error = |why: String| TlsError::Cert(cert_path.to_path_buf(), why);
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
        .map_err(|e| cert_error(pem_problem(e)))?
        .collect::<Result<_, _>>()
        .map_err(|e| cert_error(pem_problem(e)))?;
    if chain.is_empty() {
        return Err(cert_error("no CERTIFICATE section".to_string()));
    }
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| TlsError::Key(key_path.to_path_buf(), pem_problem(e)))?;
    let signing = provider.key_provider.load_private_key(key).map_err(|e| TlsError::Key(key_path.to_path_buf(), e.to_string()))?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(certified),
        Err(error) => Err(TlsError::Pair(cert_path.to_path_buf(), key_path.to_path_buf(), error.to_string())),
    }
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("cert", &self.resolver.cert_path).field("key", &self.resolver.key_path).finish()
    }
}

impl Tls {
    /// Reads the pair and builds the acceptor.
    pub fn new(cert_path: &Path, key_path: &Path) -> Result<Tls, TlsError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let first = load(cert_path, key_path, &provider)?;
        let resolver = Arc::new(Reloadable {
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
            provider: Arc::clone(&provider),
            current: RwLock::new(Arc::new(first)),
        });
        let pair = |why: rustls::Error| TlsError::Pair(cert_path.to_path_buf(), key_path.to_path_buf(), why.to_string());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(pair)?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(&resolver) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Tls { acceptor: TlsAcceptor::from(Arc::new(config)), resolver })
    }

    /// Re-reads the pair; on error the previous one stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = load(&self.resolver.cert_path, &self.resolver.key_path, &self.resolver.provider)?;
        *self.resolver.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(fresh);
        Ok(())
    }

    pub(crate) fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }
}
