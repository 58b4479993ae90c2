//! The listener and the gRPC server: mutual TLS on every connection, role guards on every call,
//! and the bounds of `[limits]` on what a peer can hold.
//!
//! Refused peers cost a counter, not a record: the accept loop and the role guards count them in
//! one [`tls::Refusals`], and a reporter task here writes what was counted to the audit log at
//! most once per `limits.refusal_report_secs` (one `authentication_failed` record with counts by
//! reason, distinct addresses and a few samples), and once more at shutdown if anything is
//! pending. The first refused calls of a period from a verified member are still audited one by
//! one (`call_refused`, with who called).

use std::sync::Arc;
use std::time::Duration;

use sanctum_protocol::pki::Role;
use sanctum_protocol::proto::{audit_server, federation_server, lead_server};
use sanctum_protocol::tls::{self, TlsMaterial};
use sanctum_protocol::transfer::CHUNK_BYTES;
use tokio::net::TcpListener;

use super::*;

/// The hook that audits a refused call of a verified member one by one (`call_refused`, with
/// who called), for the gRPC listener and the status page's mutual TLS alike.
pub(super) fn refusal_hook(inner: &Arc<Inner>) -> tls::RefusalHook {
    let inner = Arc::clone(inner);
    Arc::new(move |remote: &str, reason: &str| {
        inner.audit("unauthorised", AuditEvent::CallRefused { remote: remote.to_string(), reason: reason.to_string() });
    })
}

/// Writes what `refusals` counted to the audit log at most once per `period` (the sleep between
/// two takes is a whole period), until the task is aborted.
pub(super) fn spawn_refusal_reporter(
    inner: &Arc<Inner>,
    refusals: &Arc<tls::Refusals>,
    period: Duration,
) -> tokio::task::JoinHandle<()> {
    let (inner, refusals) = (Arc::clone(inner), Arc::clone(refusals));
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(period).await;
            if let Some(report) = refusals.take_due() {
                audit_refusals(&inner, &report);
            }
        }
    })
}

/// Writes one periodic refusal record (bounded: see [`tls::RefusalReport`]).
pub(super) fn audit_refusals(inner: &Inner, report: &tls::RefusalReport) {
    let by_reason: std::collections::BTreeMap<String, u64> =
        report.by_reason.iter().map(|(class, n)| (class.key().to_string(), *n)).collect();
    let samples: Vec<String> = report.sample_remotes.iter().map(|ip| ip.to_string()).collect();
    inner.metrics.refused_connections(report.by_reason.iter().map(|(class, n)| (class.key(), n)));
    tracing::warn!("refused peers: {} (from {})", report.summary(), report.remotes_summary());
    inner.audit(
        "unauthenticated",
        AuditEvent::AuthenticationFailed {
            // `remote` and `reason` as one line each, as a single refusal's record had them.
            remote: report.remotes_summary(),
            reason: report.summary(),
            refused: Some(report.refused),
            by_reason: Some(by_reason),
            distinct_remotes: Some(report.distinct_remotes as u64),
            distinct_remotes_capped: Some(report.distinct_remotes_capped),
            sample_remotes: Some(samples),
            sample_reasons: Some(report.sample_reasons.clone()),
            over_secs: Some(report.over_secs),
        },
    );
}

/// Why the coordinator stopped serving before it was asked to.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The TLS configuration could not be built from the coordinator's material.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Transport(tonic::transport::Error),
    /// The driver task ended (it panicked or its store failed): a server that answers but never
    /// moves a plan would be worse than none.
    #[error("{0}; the coordinator stopped serving")]
    DriverEnded(String),
}

/// How long a stopping server waits for open streams (a lead's watch, a download) to end.
const DRAIN_GRACE: Duration = Duration::from_secs(10);

impl Coordinator {
    /// Serves both gRPC services on `listener` over mutual TLS until `shutdown` completes.
    pub async fn serve(
        &self,
        listener: TcpListener,
        material: &TlsMaterial,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), ServeError> {
        let limits = &self.inner.limits;
        let period = Duration::from_secs(limits.refusal_report_secs);
        let refusals = Arc::new(tls::Refusals::new(period));
        let on_itemised = refusal_hook(&self.inner);
        let revoked = Arc::clone(&self.inner.revoked);
        let options = tls::IncomingOptions {
            max_handshakes_in_flight: limits.max_handshakes_in_flight,
            max_connections: limits.max_connections,
            handshakes_per_ip: limits.handshakes_per_ip,
            first_byte_timeout: Duration::from_secs(limits.first_byte_timeout_secs),
            handshake_timeout: Duration::from_secs(limits.handshake_timeout_secs),
            connections_per_identity: limits.connections_per_identity,
            // Only for sockets whose peer vanished mid-handshake or before HTTP/2 pings start:
            // the handshake timeout and HTTP/2 keep-alive below cover the rest.
            tcp_keepalive: Some(Duration::from_secs(limits.keepalive_interval_secs)),
            revoked: Arc::clone(&revoked),
            refusals: Arc::clone(&refusals),
        };
        let incoming = tls::mtls_incoming(listener, material.server_config()?, options);
        // Once asked to stop, the server drains for at most `DRAIN_GRACE`: a lead's `plan watch`
        // or an auditor's stream would otherwise hold the process open.
        let (stopping, stopped) = tokio::sync::oneshot::channel::<()>();
        let shutdown = async move {
            shutdown.await;
            let _ = stopping.send(());
        };
        let grace = async move {
            match stopped.await {
                Ok(()) => tokio::time::sleep(DRAIN_GRACE).await,
                Err(_) => std::future::pending::<()>().await,
            }
        };
        let call_guard = tls::CallGuard { revoked, refusals: Arc::clone(&refusals), on_itemised: Some(on_itemised) };
        let guard = |roles: &'static [Role]| tls::role_guard(roles, call_guard.clone());
        // A node's every call that passes its guard marks it seen (for `nodes list`): one lock
        // per call, not per message of a stream.
        let node_guard = {
            let (mut check, inner) = (guard(&[Role::Node]), self.inner.clone());
            move |request: tonic::Request<()>| {
                let request = check(request)?;
                // A certificate's name is a `NodeName` (`pki::identity_from_der` checked it).
                if let Some(node) = tls::peer(&request).ok().and_then(|p| NodeName::parse(&p.identity.name).ok()) {
                    inner.node_called(&node);
                }

                Ok(request)
            }
        };
        // A record per period at most: the sleep between two takes is a whole period.
        let reporter = spawn_refusal_reporter(&self.inner, &refusals, period);
        let audit = audit_server::AuditServer::new(AuditApi { inner: self.inner.clone() });
        let federation = federation_server::FederationServer::new(FederationApi { inner: self.inner.clone() })
            .max_decoding_message_size(2 * CHUNK_BYTES);
        // A plan may carry its TorchScript file (`plan_files::MAX_MODEL_FILE_BYTES`) and its text.
        let lead = lead_server::LeadServer::new(LeadApi { inner: self.inner.clone() })
            .max_decoding_message_size(crate::plan_files::MAX_MODEL_FILE_BYTES + (1 << 20));
        // Keep-alive: the node's client (`tls::connect`) pings every 20 s even while idle. This
        // server is hyper's HTTP/2, which answers every PING and has no ping-strike policy, so it
        // never answers a client's keep-alive with GOAWAY "too_many_pings" (the gRPC-core server
        // default, at most one ping per 5 minutes without data, that Flower's users hit); its own
        // pings, every `keepalive_interval_secs`, drop a peer that stopped answering for
        // `keepalive_timeout_secs`.
        //
        // `timeout` bounds a handler's future, not a response stream: `Subscribe`, `FetchModel`,
        // `WatchPlan` and `StreamAuditLog` return their stream at once, while `SubmitUpdate` reads
        // the whole upload in its handler, hence a generous default (an idle upload is cut much
        // sooner by `upload_idle_timeout_secs`).
        //
        // Flow control stays at hyper's fixed windows (1 MiB per stream and per connection) and
        // 16 KiB frames: an adaptive window would let a peer grow what it may have in flight.
        let server = tonic::transport::Server::builder()
            .max_concurrent_streams(limits.max_concurrent_streams)
            .concurrency_limit_per_connection(limits.concurrency_per_connection)
            .timeout(Duration::from_secs(limits.request_timeout_secs))
            .http2_keepalive_interval(Some(Duration::from_secs(limits.keepalive_interval_secs)))
            .http2_keepalive_timeout(Some(Duration::from_secs(limits.keepalive_timeout_secs)))
            .http2_adaptive_window(Some(false))
            .http2_max_header_list_size(16 * 1024)
            .http2_max_pending_accept_reset_streams(Some(20))
            .add_service(tonic::service::interceptor::InterceptedService::new(federation, node_guard))
            .add_service(tonic::service::interceptor::InterceptedService::new(lead, guard(&[Role::Lead])))
            // Read-only calls (the audit log, plan list and status, nodes list): auditors and the
            // lead. Everything that changes state is on `Lead`, for the lead alone.
            .add_service(tonic::service::interceptor::InterceptedService::new(
                audit,
                guard(&[Role::Auditor, Role::Lead]),
            ))
            .serve_with_incoming_shutdown(incoming, shutdown);
        // A driver that ended would leave a server that answers but never moves a plan: stop
        // with its reason instead (without draining: node streams never end on their own).
        let result = tokio::select! {
            served = server => served.map_err(ServeError::Transport),
            () = grace => {
                tracing::warn!("streams still open {} s after the stop; closing them", DRAIN_GRACE.as_secs());
                Ok(())
            }
            reason = self.driver.ended() => Err(ServeError::DriverEnded(reason)),
        };
        // What was counted since the last report is not lost at shutdown.
        reporter.abort();
        if let Some(report) = refusals.take() {
            audit_refusals(&self.inner, &report);
        }
        result
    }
}
