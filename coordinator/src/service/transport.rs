//! The listener and the gRPC server: mutual TLS on every connection, role guards on every call.

use std::sync::Arc;
use std::time::Duration;

use sanctum_protocol::pki::Role;
use sanctum_protocol::proto::{audit_server, federation_server, lead_server};
use sanctum_protocol::tls::{self, TlsMaterial};
use sanctum_protocol::transfer::CHUNK_BYTES;
use tokio::net::TcpListener;

use serde_json::json;

use super::*;

impl Coordinator {
    /// Serves both gRPC services on `listener` over mutual TLS until `shutdown` completes.
    pub async fn serve(
        &self,
        listener: TcpListener,
        material: &TlsMaterial,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        let inner = self.inner.clone();
        let on_refused: tls::RefusalHook = Arc::new(move |remote: &str, reason: &str| {
            inner.audit(
                "unauthenticated",
                "authentication_failed",
                [("remote", json!(remote)), ("reason", json!(reason))],
            );
        });
        let inner = self.inner.clone();
        let on_denied: tls::RefusalHook = Arc::new(move |remote: &str, reason: &str| {
            inner.audit("unauthorised", "call_refused", [("remote", json!(remote)), ("reason", json!(reason))]);
        });
        let revoked = Arc::clone(&self.inner.revoked);
        let incoming = tls::mtls_incoming(listener, material.server_config()?, Some(on_refused), revoked.clone());
        let guard = |roles: &'static [Role]| tls::role_guard(roles, revoked.clone(), Some(on_denied.clone()));
        let audit = audit_server::AuditServer::new(AuditApi { inner: self.inner.clone() });
        let federation = federation_server::FederationServer::new(FederationApi { inner: self.inner.clone() })
            .max_decoding_message_size(2 * CHUNK_BYTES);
        let lead = lead_server::LeadServer::new(LeadApi { inner: self.inner.clone() });
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(self.inner.limits.keepalive_interval_secs)))
            .add_service(tonic::service::interceptor::InterceptedService::new(federation, guard(&[Role::Node])))
            .add_service(tonic::service::interceptor::InterceptedService::new(lead, guard(&[Role::Lead])))
            .add_service(tonic::service::interceptor::InterceptedService::new(
                audit,
                guard(&[Role::Auditor, Role::Lead]),
            ))
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await?;
        Ok(())
    }
}
