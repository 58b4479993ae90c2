//! The rogue-peer harness: what the coordinator faces from outside. A client holding a valid
//! node certificate (a hostile hospital), one holding the lead's (a careless or hostile plan),
//! and a raw TCP client with no certificate at all (anyone who can reach the port). Tests in
//! `tests/tests/rogue_peer_*.rs` use these against a real `sanctum-coordinator` process and
//! check what it holds (memory, spool, audit records) while they attack.

use std::time::Duration;

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
    let Ok(mut tcp) = TcpStream::connect(coordinator.addr).await else {
        return false;
    };
    let _ = tcp.write_all(b"GET / HTTP/1.1\r\nHost: sanctum\r\n\r\n").await;
    let mut buf = [0u8; 512];
    tokio::time::timeout(timeout, async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// A TCP connection that sends nothing: it holds a handshake slot until the server's handshake
/// timeout closes it.
pub async fn silent_connection(coordinator: &CoordinatorProcess) -> Option<TcpStream> {
    TcpStream::connect(coordinator.addr).await.ok()
}
