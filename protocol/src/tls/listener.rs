//! The server's accept loop: mutual TLS 1.3 handshakes under caps on what a peer can hold
//! (connections, handshakes per address and in flight, connections per certificate), yielding
//! only streams whose caller is verified and identified.

use std::collections::HashMap;
use std::hash::Hash;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::TcpIncoming;

use super::guard::Revocations;
use super::refusals::{RefusalClass, Refusals};
use crate::pki::{self, Identity, PkiError};

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
