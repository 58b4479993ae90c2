//! Mutual TLS 1.3 for both ends of a tonic channel (rustls with ring), and the role guard.
//!
//! The server side does the handshake itself, reads the peer's [`Identity`] from its verified
//! certificate once, and hands tonic a stream that carries it as connect info: every handler and
//! interceptor sees who called in `request.extensions()`, and nothing in a message can change it.
//! Plaintext clients, clients without a certificate and clients whose certificate comes from
//! another CA never reach a handler.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use crate::pki::{self, Identity, PkiError, Role};

/// How long a peer may take to finish the handshake before it is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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
    fn check(&self, node: &str, cert_der: &[u8]) -> Result<(), String> {
        let cert = CertificateDer::from(cert_der.to_vec());
        self.inner
            .verify_client_cert(&cert, &[], rustls_pki_types::UnixTime::now())
            .map_err(|e| format!("certificate refused: {e}"))?;
        let identity = pki::identity_from_der(cert_der).map_err(|e| e.to_string())?;
        if identity.role != pki::Role::Node || identity.name != node {
            return Err(format!("the certificate is {identity}'s, not node '{node}''s"));
        }
        Ok(())
    }
}

impl crate::secagg::client::PeerVerifier for NodeCertVerifier {
    fn verify(&self, node: &str, cert_der: &[u8], message: &[u8], signature: &[u8]) -> Result<(), String> {
        self.check(node, cert_der)?;
        crate::secagg::keys::verify_message(message, signature, cert_der).map_err(|e| e.to_string())
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

/// Who is calling, attached by the server to every request on a connection.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    /// Read from the verified client certificate.
    pub identity: Identity,
    /// The TCP peer, for logs.
    pub remote: SocketAddr,
    /// The verified end-entity certificate (DER), relayed to peers in secure aggregation.
    pub cert_der: Arc<Vec<u8>>,
}

/// A server-side TLS stream whose peer has been verified and identified.
pub struct AuthenticatedStream {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    peer: PeerInfo,
}

impl AsyncRead for AuthenticatedStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for AuthenticatedStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for AuthenticatedStream {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

/// Revoked certificates by fingerprint (hex SHA-256 of the DER), shared between the accept loop
/// and the per-call guard and replaced whole when the revocation list changes.
#[derive(Debug, Default)]
pub struct Revocations {
    revoked: std::sync::RwLock<std::collections::BTreeMap<String, RevokedCert>>,
}

/// One entry of the consortium's revocation list (`pki/revoked.json`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RevokedCert {
    pub name: String,
    pub fingerprint: String,
    /// UTC, RFC 3339.
    pub revoked_at: String,
    #[serde(default)]
    pub reason: String,
}

impl Revocations {
    /// The entry for a certificate fingerprint, if it is revoked.
    pub fn get(&self, fingerprint: &str) -> Option<RevokedCert> {
        self.revoked.read().unwrap_or_else(|p| p.into_inner()).get(fingerprint).cloned()
    }

    /// Replaces the whole list; returns the entries that were not in it before.
    pub fn replace(&self, entries: Vec<RevokedCert>) -> Vec<RevokedCert> {
        let mut map = self.revoked.write().unwrap_or_else(|p| p.into_inner());
        let fresh = entries.iter().filter(|e| !map.contains_key(&e.fingerprint)).cloned().collect();
        *map = entries.into_iter().map(|e| (e.fingerprint.clone(), e)).collect();
        fresh
    }

    /// How many certificates are revoked.
    pub fn len(&self) -> usize {
        self.revoked.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn refusal(&self, identity: &Identity) -> Option<String> {
        self.get(&identity.fingerprint.to_hex()).map(|r| {
            format!(
                "the certificate of '{}' was revoked at {}{}; ask the consortium lead for a new one",
                identity.name,
                r.revoked_at,
                if r.reason.is_empty() { String::new() } else { format!(" ({})", r.reason) }
            )
        })
    }
}

/// Told of every refused connection (remote address, reason), e.g. to audit it.
pub type RefusalHook = Arc<dyn Fn(&str, &str) + Send + Sync>;

/// Accepts connections on `listener`, completes the mutual TLS handshake and yields only
/// verified, identified streams. Failed handshakes are logged (and passed to `on_refused`) and
/// dropped; the listener goes on.
pub fn mtls_incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    on_refused: Option<RefusalHook>,
    revoked: Arc<Revocations>,
) -> ReceiverStream<Result<AuthenticatedStream, io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = tx.closed() => break,
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let on_refused = on_refused.clone();
            let revoked = Arc::clone(&revoked);
            let refused = move |reason: String| {
                if let Some(hook) = &on_refused {
                    hook(&remote.to_string(), &reason);
                }
            };
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::warn!(%remote, "refused connection: TLS handshake failed: {e}");
                        refused(format!("TLS handshake failed: {e}"));
                        return;
                    }
                    Err(_) => {
                        tracing::warn!(%remote, "refused connection: TLS handshake timed out");
                        refused("TLS handshake timed out".into());
                        return;
                    }
                };
                let identity = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .ok_or(PkiError::NoIdentity)
                    .and_then(|der| Ok((pki::identity_from_der(der)?, Arc::new(der.to_vec()))));
                match identity {
                    Ok((identity, _)) if revoked.refusal(&identity).is_some() => {
                        let why = revoked.refusal(&identity).unwrap_or_default();
                        tracing::warn!(%remote, "refused connection: {why}");
                        refused(why);
                    }
                    Ok((identity, cert_der)) => {
                        tracing::debug!(%remote, peer = %identity, "mutual TLS established");
                        let peer = PeerInfo { identity, remote, cert_der };
                        let stream = AuthenticatedStream { inner: tls, peer };
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Err(e) => {
                        tracing::warn!(%remote, "refused connection: {e}");
                        refused(e.to_string());
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// The verified caller of a request; a request without one never came through [`mtls_incoming`].
pub fn peer<T>(request: &Request<T>) -> Result<&PeerInfo, Status> {
    request
        .extensions()
        .get::<PeerInfo>()
        .ok_or_else(|| Status::unauthenticated("no verified client certificate on this connection"))
}

/// An interceptor that lets through only callers whose certificate has one of `allowed` roles.
pub fn role_guard(
    allowed: &'static [Role],
    revoked: Arc<Revocations>,
    on_refused: Option<RefusalHook>,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone + Send + Sync + 'static {
    move |request: Request<()>| {
        let peer = peer(&request)?;
        let refuse = |status: Status| {
            if let Some(hook) = &on_refused {
                hook(&peer.remote.to_string(), &format!("{}: {}", peer.identity, status.message()));
            }
            Err(status)
        };
        // A certificate revoked while its connection is open is refused on its next call.
        if let Some(why) = revoked.refusal(&peer.identity) {
            return refuse(Status::unauthenticated(why));
        }
        if allowed.contains(&peer.identity.role) {
            Ok(request)
        } else {
            let need: Vec<&str> = allowed.iter().map(|r| r.as_str()).collect();
            refuse(Status::permission_denied(format!(
                "'{}' holds a {} certificate; this call needs role {}",
                peer.identity.name,
                peer.identity.role,
                need.join(" or ")
            )))
        }
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
