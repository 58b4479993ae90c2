//! The rogue-peer harness: what the coordinator faces from outside. A client holding a valid
//! node certificate (a hostile hospital), one holding the lead's (a careless or hostile plan),
//! and a raw TCP client with no certificate at all (anyone who can reach the port). Tests in
//! `tests/tests/rogue_peer_*.rs` use these against a real `sanctum-coordinator` process and
//! check what it holds (memory, spool, audit records) while they attack.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sanctum_protocol::audit::Record;
use sanctum_protocol::proto::federation_client::FederationClient;
use sanctum_protocol::proto::lead_client::LeadClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::transport::Channel;

use crate::{Consortium, CoordinatorProcess, channel};

/// A hospital's node client: a real node certificate signed by the consortium CA for `name`.
pub async fn node_client(c: &Consortium, coordinator: &CoordinatorProcess, name: &str) -> FederationClient<Channel> {
    let files = c.member(name, "node");
    let ch = channel(&coordinator.address(), &files).await.expect("a node certificate connects");
    FederationClient::new(ch).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20)
}

/// The lead's client (the certificate `pki init` made).
pub async fn lead_client(c: &Consortium, coordinator: &CoordinatorProcess) -> LeadClient<Channel> {
    let ch = channel(&coordinator.address(), &c.lead()).await.expect("the lead connects");
    LeadClient::new(ch).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20)
}

/// One failed handshake from a client without a certificate: connect, send bytes that are not a
/// TLS ClientHello, read until the server closes. Returns whether the server closed within
/// `timeout` (it must not keep a refused connection open).
pub async fn failed_handshake(coordinator: &CoordinatorProcess, timeout: Duration) -> bool {
    failed_handshake_at(coordinator.addr, timeout).await
}

/// [`failed_handshake`] against an address (for tasks that outlive a borrow of the process).
pub async fn failed_handshake_at(addr: SocketAddr, timeout: Duration) -> bool {
    let Ok(mut tcp) = TcpStream::connect(addr).await else {
        return false;
    };
    let _ = tcp.write_all(b"GET / HTTP/1.1\r\nHost: sanctum\r\n\r\n").await;
    until_closed(&mut tcp, timeout).await.is_some()
}

/// A TCP connection that sends nothing: it holds a handshake slot until the server's handshake
/// timeout closes it.
pub async fn silent_connection(coordinator: &CoordinatorProcess) -> Option<TcpStream> {
    TcpStream::connect(coordinator.addr).await.ok()
}

/// A TCP connection from `source` (any of 127.0.0.0/8 on Linux: another loopback address
/// stands for another host) that sends nothing.
pub async fn silent_connection_from(source: std::net::IpAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = if source.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(addr).await
}

/// Waits until the server closes `tcp` (or `timeout` passes); returns how long it was held open.
pub async fn until_closed(tcp: &mut TcpStream, timeout: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 64];
    tokio::time::timeout(timeout, async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
    .map(|()| started.elapsed())
}

/// `total` failed handshakes against `addr`, `concurrency` at a time; returns how many the server
/// closed within `timeout` each, and how long they all took.
pub async fn failed_handshakes(
    addr: SocketAddr,
    total: usize,
    concurrency: usize,
    timeout: Duration,
) -> (usize, Duration) {
    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let closed = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (next, closed) = (Arc::clone(&next), Arc::clone(&closed));
            tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < total {
                    if failed_handshake_at(addr, timeout).await {
                        closed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.await.expect("a handshake worker");
    }
    (closed.load(Ordering::Relaxed), started.elapsed())
}

/// What the coordinator's periodic refusal records (`authentication_failed`) add up to.
#[derive(Debug, Default)]
pub struct RefusalTotals {
    /// Periodic records seen.
    pub records: usize,
    /// Their `refused` counts, summed.
    pub refused: u64,
    /// Their `by_reason` counts, summed per reason.
    pub by_reason: std::collections::BTreeMap<String, u64>,
    /// The largest record, in bytes of its line's JSON.
    pub largest_record_bytes: usize,
}

/// Sums the periodic refusal records among `records`.
pub fn refusal_totals(records: &[Record]) -> RefusalTotals {
    let mut t = RefusalTotals::default();
    for r in records.iter().filter(|r| r.event == "authentication_failed") {
        t.records += 1;
        t.refused += r.params.get("refused").and_then(|v| v.as_u64()).unwrap_or(0);
        if let Some(by) = r.params.get("by_reason").and_then(|v| v.as_object()) {
            for (k, v) in by {
                *t.by_reason.entry(k.clone()).or_default() += v.as_u64().unwrap_or(0);
            }
        }
        let bytes = serde_json::to_string(&r.params).map(|s| s.len()).unwrap_or(0);
        t.largest_record_bytes = t.largest_record_bytes.max(bytes);
    }
    t
}
