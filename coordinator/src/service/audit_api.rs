//! The auditor's read-only service: the coordinator's audit log and the list of plans.

use std::sync::Arc;

use sanctum_protocol::proto::{self, audit_server};
use sanctum_protocol::tls;
use sanctum_protocol::transfer::CHUNK_BYTES;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use sanctum_protocol::audit::{self};
use serde_json::json;

use super::*;

/// The auditor's read-only service.
pub(super) struct AuditApi {
    pub(super) inner: Arc<Inner>,
}

#[tonic::async_trait]
impl audit_server::Audit for AuditApi {
    type StreamAuditLogStream = ReceiverStream<Result<proto::AuditLogChunk, Status>>;

    async fn stream_audit_log(
        &self,
        request: Request<proto::AuditLogRequest>,
    ) -> Result<Response<Self::StreamAuditLogStream>, Status> {
        let who = tls::peer(&request)?.identity.clone();
        // Read under the lock so the log and its head match.
        let (log, head) = {
            let audit = lock(&self.inner.audit);
            let log = std::fs::read(audit.path()).map_err(|e| Status::internal(format!("audit log: {e}")))?;
            let head = std::fs::read(audit::head_path(audit.path()))
                .map_err(|e| Status::internal(format!("audit head: {e}")))?;
            (log, head)
        };
        self.inner.audit(
            &who.fingerprint.to_hex(),
            "audit_log_read",
            [("reader", json!(who.name)), ("role", json!(who.role.as_str())), ("bytes", json!(log.len()))],
        );
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let chunks: Vec<&[u8]> = log.chunks(CHUNK_BYTES).collect();
            let n = chunks.len();
            for (i, c) in chunks.into_iter().enumerate() {
                let last = i + 1 == n;
                let chunk = proto::AuditLogChunk { log: c.to_vec(), head: if last { head.clone() } else { vec![] } };
                if tx.send(Ok(chunk)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn list_plans(
        &self,
        _request: Request<proto::ListPlansRequest>,
    ) -> Result<Response<proto::ListPlansResponse>, Status> {
        Ok(Response::new(proto::ListPlansResponse { plans: lock(&self.inner.plans).clone() }))
    }
}
