//! Mutual TLS 1.3 for both ends of a tonic channel (rustls with ring), and the role guard.
//!
//! The server side does the handshake itself, reads the peer's [`Identity`] from its verified
//! certificate once, and hands tonic a stream that carries it as connect info: every handler and
//! interceptor sees who called in `request.extensions()`, and nothing in a message can change it.
//! Plaintext clients, clients without a certificate and clients whose certificate comes from
//! another CA never reach a handler.
//!
//! What a peer that never authenticates can cost is bounded: connections open (beyond the limit
//! one is closed at once), handshakes in flight from one IP address (likewise), the time before
//! the first byte of the ClientHello (short, so silent sockets go fast), handshakes in flight at
//! once (a connection whose first byte came waits for one) and the time a handshake may take. A
//! silent socket holds a connection slot and its address's share, never a handshake slot. What
//! one member's certificate can hold is bounded too: connections open per certificate. Refusals
//! are counted in [`refusals`], never written one by one.

use std::collections::HashMap;
use std::hash::Hash;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use crate::pki::{self, Identity, PkiError, Role};

pub mod refusals;

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
    /// Counts this connection as open until the server drops it.
    _slot: ConnectionSlot,
    /// Counts it against its certificate's `connections_per_identity` until then.
    _identity_slot: CapSlot<String>,
}

/// Counts per key (a source address, a certificate fingerprint) held at once, each key capped.
/// Keys with nothing held are removed, so the map holds only what is open.
struct PerKeyCap<K> {
    held: std::sync::Mutex<HashMap<K, usize>>,
    max: usize,
}

impl<K: Eq + Hash + Clone> PerKeyCap<K> {
    fn new(max: usize) -> Self {
        Self { held: std::sync::Mutex::new(HashMap::new()), max: max.max(1) }
    }

    /// Takes one for `key` if fewer than `max` are held.
    fn try_take(&self, key: &K) -> bool {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let n = held.entry(key.clone()).or_insert(0);
        if *n < self.max {
            *n += 1;
            true
        } else {
            false
        }
    }

    fn give_back(&self, key: &K) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = held.get_mut(key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(key);
            }
        }
    }

    /// How many `key` holds.
    #[cfg(test)]
    fn held(&self, key: &K) -> usize {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).get(key).copied().unwrap_or(0)
    }

    /// Keys holding anything.
    #[cfg(test)]
    fn keys(&self) -> usize {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// One of a key's share in a [`PerKeyCap`], given back when dropped.
struct CapSlot<K: Eq + Hash + Clone> {
    cap: Arc<PerKeyCap<K>>,
    key: K,
}

impl<K: Eq + Hash + Clone> CapSlot<K> {
    fn take(cap: &Arc<PerKeyCap<K>>, key: K) -> Option<Self> {
        cap.try_take(&key).then(|| Self { cap: Arc::clone(cap), key })
    }
}

impl<K: Eq + Hash + Clone> Drop for CapSlot<K> {
    fn drop(&mut self) {
        self.cap.give_back(&self.key);
    }
}

/// One of `max_connections`, held from accept until the connection is dropped.
struct ConnectionSlot(Arc<AtomicUsize>);

impl ConnectionSlot {
    /// A slot if fewer than `max` are taken.
    fn take(open: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
        open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| Self(Arc::clone(open)))
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
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

/// Told of a refused call that is audited on its own (remote address, reason).
pub type RefusalHook = Arc<dyn Fn(&str, &str) + Send + Sync>;

/// What [`mtls_incoming`] allows a peer, and where it counts refusals.
#[derive(Clone, Debug)]
pub struct IncomingOptions {
    /// TLS handshakes in progress at once; a connection whose first byte came waits for one
    /// (within its handshake timeout). A connection that has sent nothing does not hold one.
    pub max_handshakes_in_flight: usize,
    /// Connections open at once, in handshake or served; one beyond it is closed at once and
    /// counted as refused.
    pub max_connections: usize,
    /// Connections from one IP address in handshake at once (from accept to the handshake's end,
    /// silent ones included); one beyond it is closed at once and counted as refused. Served
    /// connections do not count, so nodes behind one address are not limited by it.
    pub handshakes_per_ip: usize,
    /// Time a peer gets to send the first byte of its ClientHello: a silent socket is closed
    /// after it, long before `handshake_timeout`.
    pub first_byte_timeout: Duration,
    /// Time a peer gets to finish the handshake, from accept (waiting for a slot included).
    pub handshake_timeout: Duration,
    /// Authenticated connections open at once with the same certificate; one beyond it is closed
    /// after the handshake and counted as refused.
    pub connections_per_identity: usize,
    /// Idle time before TCP keep-alive probes start on an accepted socket (`None`: the system's
    /// default, normally off).
    pub tcp_keepalive: Option<Duration>,
    /// Certificates refused at the end of the handshake.
    pub revoked: Arc<Revocations>,
    /// Where refused connections are counted (and their log lines rate-limited).
    pub refusals: Arc<Refusals>,
}

impl Default for IncomingOptions {
    /// The defaults of the coordinator's `[limits]`, nothing revoked.
    fn default() -> Self {
        Self {
            max_handshakes_in_flight: 64,
            max_connections: 1024,
            handshakes_per_ip: 4,
            first_byte_timeout: Duration::from_secs(2),
            handshake_timeout: Duration::from_secs(10),
            connections_per_identity: 8,
            tcp_keepalive: Some(Duration::from_secs(20)),
            revoked: Arc::default(),
            refusals: Arc::default(),
        }
    }
}

/// Accepts connections on `listener`, completes the mutual TLS handshake and yields only
/// verified, identified streams. Refused connections are counted in `options.refusals` and
/// dropped; the listener goes on.
pub fn mtls_incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    options: IncomingOptions,
) -> ReceiverStream<Result<AuthenticatedStream, io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    let handshakes = Arc::new(Semaphore::new(options.max_handshakes_in_flight.max(1)));
    let open = Arc::new(AtomicUsize::new(0));
    let per_ip = Arc::new(PerKeyCap::<IpAddr>::new(options.handshakes_per_ip));
    let per_identity = Arc::new(PerKeyCap::<String>::new(options.connections_per_identity));
    let mut incoming = TcpIncoming::from(listener).with_nodelay(Some(true)).with_keepalive(options.tcp_keepalive);
    tokio::spawn(async move {
        loop {
            // Accepting costs a connection slot at most: nothing here waits on a peer.
            let tcp = tokio::select! {
                accepted = incoming.next() => match accepted {
                    Some(Ok(tcp)) => tcp,
                    Some(Err(e)) => {
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                    None => break,
                },
                () = tx.closed() => break,
            };
            let Ok(remote) = tcp.peer_addr() else {
                // Gone already.
                continue;
            };
            let refusals = Arc::clone(&options.refusals);
            let Some(slot) = ConnectionSlot::take(&open, options.max_connections) else {
                drop(tcp);
                let why = format!("{} connections are open (limits.max_connections)", options.max_connections);
                refusals.refuse(RefusalClass::ConnectionLimit, remote, &why);
                continue;
            };
            // One address cannot hold every slot: its handshakes in flight are capped.
            let Some(address_slot) = CapSlot::take(&per_ip, remote.ip()) else {
                drop(tcp);
                let why = format!(
                    "{} handshakes from {} are in flight (limits.handshakes_per_ip)",
                    options.handshakes_per_ip,
                    remote.ip()
                );
                refusals.refuse(RefusalClass::AddressLimit, remote, &why);
                continue;
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let revoked = Arc::clone(&options.revoked);
            let handshakes = Arc::clone(&handshakes);
            let per_identity = Arc::clone(&per_identity);
            let (first_byte, timeout) = (options.first_byte_timeout, options.handshake_timeout);
            let per_identity_max = options.connections_per_identity;
            tokio::spawn(async move {
                let handshake = async {
                    // A silent socket is cut after the first-byte timeout, before it takes a
                    // handshake slot; a peeked byte stays in the socket for rustls.
                    match tokio::time::timeout(first_byte, tcp.peek(&mut [0u8; 1])).await {
                        Ok(Ok(n)) if n > 0 => {}
                        Ok(Ok(_)) => {
                            let why = "closed before sending a ClientHello".to_string();
                            return Err((RefusalClass::HandshakeFailed, why));
                        }
                        Ok(Err(e)) => {
                            let why = format!("TLS handshake failed: {e}");
                            return Err((RefusalClass::HandshakeFailed, why));
                        }
                        Err(_) => {
                            let why = format!("sent nothing within {} s of connecting", first_byte.as_secs());
                            return Err((RefusalClass::HandshakeTimedOut, why));
                        }
                    }
                    let Ok(_permit) = handshakes.acquire_owned().await else {
                        let why = "the server is shutting down".to_string();
                        return Err((RefusalClass::HandshakeFailed, why));
                    };
                    acceptor
                        .accept(tcp)
                        .await
                        .map_err(|e| (RefusalClass::HandshakeFailed, format!("TLS handshake failed: {e}")))
                };
                let handshake = tokio::time::timeout(timeout, handshake).await;
                // The handshake is over, whatever its end: the address's share goes back.
                drop(address_slot);
                let tls = match handshake {
                    Ok(Ok(tls)) => tls,
                    Ok(Err((class, why))) => {
                        refusals.refuse(class, remote, &why);
                        return;
                    }
                    Err(_) => {
                        let why = format!("TLS handshake timed out after {} s", timeout.as_secs());
                        refusals.refuse(RefusalClass::HandshakeTimedOut, remote, &why);
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
                    Ok((identity, cert_der)) => {
                        if let Some(why) = revoked.refusal(&identity) {
                            refusals.refuse(RefusalClass::Revoked, remote, &why);
                            return;
                        }
                        // One member's certificate cannot take every connection slot.
                        let Some(identity_slot) = CapSlot::take(&per_identity, identity.fingerprint.to_hex()) else {
                            let why = format!(
                                "{identity} already has {per_identity_max} connections open (limits.connections_per_identity)"
                            );
                            refusals.refuse(RefusalClass::IdentityLimit, remote, &why);
                            return;
                        };
                        tracing::debug!(%remote, peer = %identity, "mutual TLS established");
                        let peer = PeerInfo { identity, remote, cert_der };
                        let stream =
                            AuthenticatedStream { inner: tls, peer, _slot: slot, _identity_slot: identity_slot };
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Err(e) => {
                        refusals.refuse(RefusalClass::NoIdentity, remote, &e.to_string());
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

/// What every role guard shares: the revocation list, the refusal counter and who audits the
/// refused calls that are itemised.
#[derive(Clone, Default)]
pub struct CallGuard {
    pub revoked: Arc<Revocations>,
    pub refusals: Arc<Refusals>,
    /// Told of a refused call within the period's allowance
    /// ([`refusals::CALLS_ITEMISED_PER_PERIOD`]); the rest are only counted.
    pub on_itemised: Option<RefusalHook>,
}

/// Why a certificate that was valid at the handshake is refused now, if it has expired since.
fn expiry_refusal(identity: &Identity, now: time::OffsetDateTime) -> Option<String> {
    (identity.not_after <= now).then(|| {
        let at = identity
            .not_after
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| identity.not_after.to_string());
        format!(
            "the certificate of '{}' expired at {at}; ask the consortium lead to renew it (`sanctum-coordinator pki renew {}`; the private key stays where it is), install the new certificate and reconnect",
            identity.name, identity.name
        )
    })
}

/// An interceptor that lets through only callers whose certificate has one of `allowed` roles
/// and is, at the time of the call, neither revoked nor expired (a connection may outlive both).
pub fn role_guard(
    allowed: &'static [Role],
    guard: CallGuard,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone + Send + Sync + 'static {
    move |request: Request<()>| {
        let peer = peer(&request)?;
        let refuse = |status: Status| {
            let reason = format!("{}: {}", peer.identity, status.message());
            if guard.refusals.refuse(RefusalClass::CallRefused, peer.remote, &reason)
                && let Some(hook) = &guard.on_itemised
            {
                hook(&peer.remote.to_string(), &reason);
            }
            Err(status)
        };
        // A certificate revoked while its connection is open is refused on its next call.
        if let Some(why) = guard.revoked.refusal(&peer.identity) {
            return refuse(Status::unauthenticated(why));
        }
        // So is one that expired: TLS checked its validity only at the handshake.
        if let Some(why) = expiry_refusal(&peer.identity, time::OffsetDateTime::now_utc()) {
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
    use crate::hash::ContentHash;

    fn identity(role: Role, not_after: time::OffsetDateTime) -> Identity {
        Identity { name: "cleveland".into(), role, fingerprint: ContentHash::of(b"cert"), not_after }
    }

    fn call_from(identity: Identity) -> Request<()> {
        let mut request = Request::new(());
        let remote = SocketAddr::from(([127, 0, 0, 1], 4000));
        request.extensions_mut().insert(PeerInfo { identity, remote, cert_der: Arc::new(Vec::new()) });
        request
    }

    #[test]
    fn a_certificate_that_expired_on_an_open_connection_is_refused_on_its_next_call_with_how_to_renew() {
        let audited = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let seen = Arc::clone(&audited);
        let hook: RefusalHook = Arc::new(move |_remote: &str, reason: &str| {
            seen.lock().unwrap_or_else(|p| p.into_inner()).push(reason.to_string());
        });
        let guard = CallGuard { on_itemised: Some(hook), ..CallGuard::default() };
        let mut check = role_guard(&[Role::Node], guard);
        let now = time::OffsetDateTime::now_utc();
        // Valid until tomorrow: served.
        assert!(check(call_from(identity(Role::Node, now + time::Duration::days(1)))).is_ok());
        // It expired a second ago, after its handshake: refused, saying how to renew.
        let Err(status) = check(call_from(identity(Role::Node, now - time::Duration::seconds(1)))) else {
            panic!("an expired certificate was let through");
        };
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        assert!(status.message().contains("expired at"), "{}", status.message());
        assert!(status.message().contains("sanctum-coordinator pki renew cleveland"), "{}", status.message());
        // The refusal is audited (the first of its period is itemised).
        let audited = audited.lock().unwrap_or_else(|p| p.into_inner()).clone();
        assert_eq!(audited.len(), 1);
        assert!(audited[0].starts_with("cleveland (node): the certificate of 'cleveland' expired"), "{audited:?}");
    }

    #[test]
    fn expiry_is_checked_to_the_second() {
        let now = time::OffsetDateTime::now_utc();
        assert!(expiry_refusal(&identity(Role::Node, now), now).is_some(), "not_after is the last valid instant");
        assert!(expiry_refusal(&identity(Role::Node, now + time::Duration::seconds(1)), now).is_none());
    }

    #[test]
    fn a_member_with_the_wrong_role_is_refused_and_counted() {
        let guard = CallGuard::default();
        let refusals = Arc::clone(&guard.refusals);
        let mut check = role_guard(&[Role::Lead], guard);
        let later = time::OffsetDateTime::now_utc() + time::Duration::days(1);
        for _ in 0..(refusals::CALLS_ITEMISED_PER_PERIOD + 5) {
            let status = check(call_from(identity(Role::Node, later))).err().map(|s| s.code());
            assert_eq!(status, Some(tonic::Code::PermissionDenied));
        }
        // The first of the period are itemised; the 5 beyond the allowance are counted.
        let report = refusals.take().map(|r| r.by_reason);
        assert_eq!(report, Some(vec![(RefusalClass::CallRefused, 5)]));
    }

    #[test]
    fn a_per_key_cap_holds_at_most_max_per_key_and_forgets_keys_with_nothing_held() {
        let cap = Arc::new(PerKeyCap::<IpAddr>::new(2));
        let (a, b) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]));
        let first = CapSlot::take(&cap, a);
        let second = CapSlot::take(&cap, a);
        assert!(first.is_some() && second.is_some());
        assert!(CapSlot::take(&cap, a).is_none(), "a third for the same key is refused");
        // Another key has its own share.
        let other = CapSlot::take(&cap, b);
        assert!(other.is_some());
        assert_eq!((cap.held(&a), cap.held(&b)), (2, 1));
        // A dropped slot goes back, and a key with nothing held is forgotten.
        drop(first);
        assert_eq!(cap.held(&a), 1);
        assert!(CapSlot::take(&cap, a).is_some_and(|s| {
            drop(s);
            true
        }));
        drop((second, other));
        assert_eq!(cap.keys(), 0, "nothing held, nothing remembered");
        // A cap of zero is treated as one (validate refuses zero anyway).
        let one = Arc::new(PerKeyCap::<String>::new(0));
        let held = CapSlot::take(&one, "f".to_string());
        assert!(held.is_some() && CapSlot::take(&one, "f".to_string()).is_none());
    }

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
