//! Mutual TLS 1.3 for both ends of a tonic channel (rustls with ring), and the role guard.
//!
//! The server side does the handshake itself, reads the peer's [`Identity`] from its verified
//! certificate once, and hands tonic a stream that carries it as connect info: every handler and
//! interceptor sees who called in `request.extensions()`, and nothing in a message can change it.
//! Plaintext clients, clients without a certificate and clients whose certificate comes from
//! another CA never reach a handler.
//!
//! # Layout
//! - this file: the PEM files and what is loaded from them ([`TlsMaterial`]: server and client
//!   configurations, the node-certificate check of secure aggregation) and the client's
//!   [`connect`].
//! - `listener`: the server's accept loop, [`mtls_incoming`], with its caps (connections,
//!   handshakes per address and in flight, connections per certificate) and the
//!   [`AuthenticatedStream`] that carries the caller's [`PeerInfo`].
//! - `guard`: the per-call checks, [`role_guard`] (role, revocation, expiry) and the
//!   [`Revocations`] list both sides consult.
//! - [`refusals`]: counts of refused connections and calls, rate-limited in the logs.
//!
//! What a peer that never authenticates can cost is bounded: connections open (beyond the limit
//! one is closed at once), handshakes in flight from one IP address (likewise), the time before
//! the first byte of the ClientHello (short, so silent sockets go fast), handshakes in flight at
//! once (a connection whose first byte came waits for one) and the time a handshake may take. A
//! silent socket holds a connection slot and its address's share, never a handshake slot. What
//! one member's certificate can hold is bounded too: connections open per certificate. Refusals
//! are counted in [`refusals`], never written one by one.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

use crate::pki::{self, Identity, PkiError};
use crate::secagg::client::PeerRefusal;

mod guard;
mod listener;
pub mod refusals;

pub use guard::{CallGuard, CallerRefusal, RefusalHook, Revocations, RevokedCert, caller_refusal, peer, role_guard};
pub use listener::{AuthenticatedStream, IncomingOptions, PeerInfo, mtls_incoming};
pub use refusals::{RefusalClass, RefusalReport, Refusals};

/// Paths to the three PEM files every party holds.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The consortium CA certificate: the only root trusted.
    pub ca: PathBuf,
    /// This party's certificate, signed by the consortium CA.
    pub cert: PathBuf,
    /// This party's private key; it never leaves the machine.
    pub key: PathBuf,
}

/// What can go wrong setting up TLS.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} '{path}': {source}; check the [tls] section of the config")]
    Read { what: &'static str, path: PathBuf, source: io::Error },
    #[error("{what} '{path}' is not valid PEM: {reason}")]
    Pem { what: &'static str, path: PathBuf, reason: String },
    #[error("rustls refused the configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("{0}")]
    Pki(#[from] PkiError),
    #[error("invalid coordinator address '{0}': expected host:port or https://host:port")]
    Address(String),
    #[error("cannot connect to the coordinator at {addr}: {reason}")]
    Connect { addr: String, reason: String },
}

/// A party's trust root, certificate chain and key, loaded and checked.
pub struct TlsMaterial {
    roots: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    identity: Identity,
}

impl TlsMaterial {
    /// Loads the three PEM files named in a config.
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let read = |what: &'static str, path: &Path| {
            std::fs::read(path).map_err(|source| TlsError::Read { what, path: path.to_path_buf(), source })
        };
        Self::from_pem_with_paths(
            (&read("CA certificate", &files.ca)?, &files.ca),
            (&read("certificate", &files.cert)?, &files.cert),
            (&read("private key", &files.key)?, &files.key),
        )
    }

    /// Builds from PEM text already in memory (simulations and tests).
    pub fn from_pem(ca: &str, cert: &str, key: &str) -> Result<Self, TlsError> {
        let mem = Path::new("<memory>");
        Self::from_pem_with_paths((ca.as_bytes(), mem), (cert.as_bytes(), mem), (key.as_bytes(), mem))
    }

    fn from_pem_with_paths(ca: (&[u8], &Path), cert: (&[u8], &Path), key: (&[u8], &Path)) -> Result<Self, TlsError> {
        let certs = |what: &'static str, (bytes, path): (&[u8], &Path)| {
            let list: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(bytes).collect();
            match list {
                Ok(l) if !l.is_empty() => Ok(l),
                Ok(_) => {
                    Err(TlsError::Pem { what, path: path.to_path_buf(), reason: "no CERTIFICATE block found".into() })
                }
                Err(e) => Err(TlsError::Pem { what, path: path.to_path_buf(), reason: e.to_string() }),
            }
        };
        let roots = certs("CA certificate", ca)?;
        let chain = certs("certificate", cert)?;
        let key = PrivateKeyDer::from_pem_slice(key.0).map_err(|e| TlsError::Pem {
            what: "private key",
            path: key.1.to_path_buf(),
            reason: e.to_string(),
        })?;
        let identity = pki::identity_from_der(&chain[0])?;
        Ok(Self { roots, chain, key, identity })
    }

    /// Who this party is, as its own certificate says.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    fn root_store(&self) -> Result<RootCertStore, TlsError> {
        let mut store = RootCertStore::empty();
        for root in &self.roots {
            store.add(root.clone())?;
        }
        Ok(store)
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// A server configuration: TLS 1.3 only, client certificates from the consortium CA required.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(self.root_store()?), Self::provider())
            .build()
            .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
        let mut cfg = ServerConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(cfg))
    }

    /// The same server configuration for HTTP/1.1 (the status page behind mutual TLS): a browser
    /// or Prometheus that presents a consortium certificate is offered `http/1.1` by ALPN.
    pub fn https_server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let mut cfg = (*self.server_config()?).clone();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }

    /// A client configuration: TLS 1.3 only, presents this party's certificate.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let mut cfg = ClientConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.root_store()?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(cfg))
    }
}

/// Checks node certificates relayed by the coordinator (secure aggregation): chain to the
/// consortium CA, validity now, role `node` and the expected name, then a signature made with the
/// certified key. The coordinator relays them but cannot forge them.
pub struct NodeCertVerifier {
    inner: Arc<dyn rustls::server::danger::ClientCertVerifier>,
}

impl NodeCertVerifier {
    fn check(&self, node: &str, cert_der: &[u8]) -> Result<(), PeerRefusal> {
        let cert = CertificateDer::from(cert_der.to_vec());
        self.inner
            .verify_client_cert(&cert, &[], rustls_pki_types::UnixTime::now())
            .map_err(|e| PeerRefusal::Certificate(e.to_string()))?;
        let identity = pki::identity_from_der(cert_der)?;
        if identity.role != pki::Role::Node || identity.name != node {
            return Err(PeerRefusal::WrongIdentity { found: identity.to_string(), node: node.to_string() });
        }
        Ok(())
    }
}

impl crate::secagg::client::PeerVerifier for NodeCertVerifier {
    fn verify(&self, node: &str, cert_der: &[u8], message: &[u8], signature: &[u8]) -> Result<(), PeerRefusal> {
        self.check(node, cert_der)?;
        Ok(crate::secagg::keys::verify_message(message, signature, cert_der)?)
    }
}

impl TlsMaterial {
    /// A verifier of node certificates against this party's trust root.
    pub fn node_cert_verifier(&self) -> Result<NodeCertVerifier, TlsError> {
        let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(self.root_store()?), Self::provider())
            .build()
            .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
        Ok(NodeCertVerifier { inner })
    }

    /// Signs a secure-aggregation message with this party's certificate key.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, crate::secagg::keys::KeySignatureError> {
        match &self.key {
            PrivateKeyDer::Pkcs8(der) => crate::secagg::keys::sign_message_pkcs8(message, der.secret_pkcs8_der()),
            _ => Err(crate::secagg::keys::KeySignatureError::Key("the key is not PKCS#8".into())),
        }
    }

    /// This party's own certificate (DER).
    pub fn cert_der(&self) -> &[u8] {
        &self.chain[0]
    }
}

/// Splits `host:port` or `https://host:port` into its parts.
pub fn parse_address(address: &str) -> Result<(String, u16), TlsError> {
    let rest = address.strip_prefix("https://").unwrap_or(address);
    let rest = rest.trim_end_matches('/');
    let (host, port) = rest.rsplit_once(':').ok_or_else(|| TlsError::Address(address.to_string()))?;
    let port: u16 = port.parse().map_err(|_| TlsError::Address(address.to_string()))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(TlsError::Address(address.to_string()));
    }
    Ok((host.to_string(), port))
}

/// Dials the coordinator over mutual TLS 1.3 and returns a tonic channel.
pub async fn connect(address: &str, material: &TlsMaterial) -> Result<Channel, TlsError> {
    let (host, port) = parse_address(address)?;
    let server_name =
        ServerName::try_from(host.clone()).map_err(|_| TlsError::Address(address.to_string()))?.to_owned();
    let connector = TlsConnector::from(material.client_config()?);
    let endpoint = Endpoint::from_shared(format!("http://{host}:{port}"))
        .map_err(|_| TlsError::Address(address.to_string()))?
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    let target = format!("{host}:{port}");
    endpoint
        .connect_with_connector(tower::service_fn(move |_uri| {
            let connector = connector.clone();
            let server_name = server_name.clone();
            let target = target.clone();
            async move {
                let tcp = TcpStream::connect(&target).await?;
                tcp.set_nodelay(true)?;
                let tls = connector.connect(server_name, tcp).await?;
                Ok::<_, io::Error>(TokioIo::new(tls))
            }
        }))
        .await
        .map_err(|e| TlsError::Connect { addr: address.to_string(), reason: error_chain(&e) })
}

/// An error and its sources on one line, so the root cause (a refused certificate) shows.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(parse_address("localhost:7000").ok(), Some(("localhost".into(), 7000)));
        assert_eq!(parse_address("https://127.0.0.1:1/").ok(), Some(("127.0.0.1".into(), 1)));
        assert_eq!(parse_address("[::1]:9").ok(), Some(("::1".into(), 9)));
        assert!(parse_address("localhost").is_err());
        assert!(parse_address(":80").is_err());
        assert!(parse_address("h:99999").is_err());
    }
}
