//! The auditor's read-only service (the lead may call it too): the coordinator's audit log, the
//! list of plans, one run's status and the nodes seen. Nothing here changes anything; the
//! handlers take a snapshot under the locks and leave the assembling to [`crate::status`].

use std::path::PathBuf;
use std::sync::Arc;

use sanctum_protocol::proto::{self, audit_server};
use sanctum_protocol::tls;
use sanctum_protocol::transfer::CHUNK_BYTES;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use sanctum_protocol::audit::{self};

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
        // Under the lock only the head and the log's length it covers (appends and the head
        // update happen under the same lock, so they match); the log itself is streamed from
        // disk afterwards, a chunk at a time, up to that length: the log is append-only, so
        // those bytes do not change, and no reader holds the lock or the whole log in memory.
        let (path, len, head) = {
            let audit = lock(&self.inner.audit);
            let path = audit.path().to_path_buf();
            let len = std::fs::metadata(&path).map_err(|e| Status::internal(format!("audit log: {e}")))?.len();
            let head =
                std::fs::read(audit::head_path(&path)).map_err(|e| Status::internal(format!("audit head: {e}")))?;
            (path, len, head)
        };
        self.inner.audit(
            &who.fingerprint.to_hex(),
            AuditEvent::AuditLogRead { reader: who.name.clone(), role: who.role.as_str().to_string(), bytes: len },
        );
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(stream_log(path, len, head, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn list_plans(
        &self,
        _request: Request<proto::ListPlansRequest>,
    ) -> Result<Response<proto::ListPlansResponse>, Status> {
        Ok(Response::new(proto::ListPlansResponse { plans: lock(&self.inner.plans).clone() }))
    }

    async fn plan_status(
        &self,
        request: Request<proto::PlanStatusRequest>,
    ) -> Result<Response<proto::PlanStatusResponse>, Status> {
        let summary = resolve_run(&self.inner, &request.get_ref().id)?;
        let (events, kept) = {
            let history = lock(&self.inner.history);
            (history.events(&summary.run), history.contains_key(&summary.run))
        };
        Ok(Response::new(crate::status::plan_status(&summary, &events, kept)))
    }

    async fn list_nodes(
        &self,
        _request: Request<proto::ListNodesRequest>,
    ) -> Result<Response<proto::ListNodesResponse>, Status> {
        let seen: std::collections::BTreeMap<NodeName, crate::status::NodeSeen> =
            lock(&self.inner.seen).iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let connected: BTreeSet<NodeName> = lock(&self.inner.nodes).keys().cloned().collect();
        let plans = lock(&self.inner.plans).clone();
        let runs: Vec<(&proto::PlanSummary, BTreeSet<String>)> = plans
            .iter()
            .map(|p| {
                let events = lock(&self.inner.history).events(&p.run);
                (p, crate::status::run_members(p, &events))
            })
            .collect();
        let now = unix_ms(std::time::SystemTime::now());
        Ok(Response::new(crate::status::node_list(&seen, &connected, &runs, now)))
    }
}

/// The run `id` names (a run id, a plan id or a unique prefix; see [`crate::status::resolve`]),
/// or the status that says why none: NOT_FOUND, or INVALID_ARGUMENT for an empty, malformed or
/// ambiguous id.
pub(super) fn resolve_run(inner: &Inner, id: &str) -> Result<proto::PlanSummary, Status> {
    use crate::status::ResolveError;
    let plans = lock(&inner.plans);
    match crate::status::resolve(&plans, id) {
        Ok(p) => Ok(p.clone()),
        Err(e @ ResolveError::NotFound { .. }) => Err(Status::not_found(e.to_string())),
        Err(e) => Err(Status::invalid_argument(e.to_string())),
    }
}

/// Sends the first `len` bytes of the log at `path` in chunks of at most [`CHUNK_BYTES`], the
/// head with the last one (an empty log is one chunk holding the head); a read error ends the
/// stream with it, a reader gone ends it quietly.
async fn stream_log(path: PathBuf, len: u64, head: Vec<u8>, tx: mpsc::Sender<Result<proto::AuditLogChunk, Status>>) {
    let mut file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) => {
            let _ = tx.send(Err(Status::internal(format!("audit log: {e}")))).await;
            return;
        }
    };
    let (mut left, mut head) = (len, head);
    loop {
        let n = usize::try_from(left.min(CHUNK_BYTES as u64)).unwrap_or(CHUNK_BYTES);
        let mut buf = vec![0u8; n];
        if let Err(e) = file.read_exact(&mut buf).await {
            let _ = tx.send(Err(Status::internal(format!("audit log: {e}")))).await;
            return;
        }
        left -= n as u64;
        let last = left == 0;
        let chunk = proto::AuditLogChunk { log: buf, head: if last { std::mem::take(&mut head) } else { vec![] } };
        if tx.send(Ok(chunk)).await.is_err() || last {
            return;
        }
    }
}
