//! The node-facing service (`Federation`): subscribe, plan decisions, model downloads, uploads,
//! evaluations, receipts and secure-aggregation messages.
//!
//! Length: one tonic service is one trait impl block, every handler in it. The resumable upload's
//! spooling (`submit_update`, `upload_status`, `open_partial`) is the part to move into a file of
//! its own next (ARCHITECTURE.md, "Not yet").

use std::future::Future;
use std::io::Read;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use sanctum_protocol::hash::{ContentHash, Hasher};
use sanctum_protocol::pki::Identity;
use sanctum_protocol::proto::{
    self, Ack, Directive, EvaluationReport, FetchModelRequest, ModelChunk, PlanResponse, SecAggMessage,
    SubscribeRequest, UpdateChunk, UpdateReceipt, UploadStatusRequest, UploadStatusResponse, federation_server,
    update_chunk,
};
use sanctum_protocol::tls;
use sanctum_protocol::transfer::{self, CHUNK_BYTES};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::*;
use crate::receipts;
use crate::store::{PartialKey, PartialUpload};

/// A node's directive stream; tells the driver when it is dropped (the node went away, or a
/// reconnect replaced it), whatever ended it.
struct DirectiveStream {
    inner: ReceiverStream<Result<Directive, Status>>,
    /// Taken by `drop` (hence the `Option`) to tell the driver who went away.
    node: Option<NodeName>,
    conn: u64,
    events: mpsc::Sender<Event>,
}

impl Stream for DirectiveStream {
    type Item = Result<Directive, Status>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

impl Drop for DirectiveStream {
    fn drop(&mut self) {
        // A drop cannot await the bounded queue: see `notify_disconnected` for why none is lost.
        if let Some(node) = self.node.take() {
            Inner::notify_disconnected(&self.events, node, self.conn);
        }
    }
}

/// One of a node's open `FetchModel` streams, counted against `limits.fetch_streams_per_node`
/// until it is dropped (read to the end, cancelled, or its connection gone).
struct FetchPermit {
    inner: Arc<Inner>,
    node: NodeName,
}

impl FetchPermit {
    /// Counts a new stream for `node`, or refuses it when the node has its limit open.
    fn take(inner: &Arc<Inner>, node: &NodeName) -> Result<Self, Status> {
        let limit = inner.limits.fetch_streams_per_node;
        let mut open = lock(&inner.fetch_streams);
        let n = open.entry(node.clone()).or_insert(0);
        if *n >= limit {
            return Err(Status::resource_exhausted(format!(
                "'{node}' already has {n} model downloads open, the most limits.fetch_streams_per_node = {limit} allows; \
                 read one to the end or cancel it first"
            )));
        }
        *n += 1;
        Ok(Self { inner: Arc::clone(inner), node: node.clone() })
    }
}

impl Drop for FetchPermit {
    fn drop(&mut self) {
        let mut open = lock(&self.inner.fetch_streams);
        if let Some(n) = open.get_mut(&self.node) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.node);
            }
        }
    }
}

type ChunkRead = tokio::task::JoinHandle<std::io::Result<(std::fs::File, Vec<u8>)>>;

/// The size of a model download's chunks (the wire allows up to [`CHUNK_BYTES`]). A stream whose
/// client stops reading holds about one chunk in the HTTP/2 send buffer once its flow-control
/// window is spent, so this is what an unread stream costs: 1 MiB chunks measured ~1.7 MiB per
/// unread stream, 64 KiB ones a few hundred KiB. Nothing is lost on the wire: HTTP/2 frames are
/// at most 16 KiB whatever the message size.
const MODEL_CHUNK_BYTES: usize = 64 << 10;

/// A stored model streamed from its file: one chunk is read (on the blocking pool) only when the
/// client has taken the previous one, so an open stream holds at most one chunk however large the
/// model and however slowly (or never) the client reads.
struct ModelFileStream {
    /// The file, while no read is in flight.
    file: Option<std::fs::File>,
    reading: Option<ChunkRead>,
    offset: u64,
    total: u64,
    _permit: FetchPermit,
    /// Who downloads: a certificate revoked since the download began gets no further chunk.
    caller: Identity,
    inner: Arc<Inner>,
}

impl ModelFileStream {
    /// Reads up to one chunk (fewer only at the end of the model).
    fn read_chunk(mut file: std::fs::File, left: u64) -> std::io::Result<(std::fs::File, Vec<u8>)> {
        let want = usize::try_from(left).unwrap_or(MODEL_CHUNK_BYTES).min(MODEL_CHUNK_BYTES);
        let mut buf = vec![0u8; want];
        let mut filled = 0;
        while filled < want {
            match file.read(&mut buf[filled..])? {
                0 => break,
                n => filled += n,
            }
        }
        buf.truncate(filled);
        Ok((file, buf))
    }
}

impl Stream for ModelFileStream {
    type Item = Result<ModelChunk, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.reading.is_none() {
            if let Err(revoked) = this.inner.still_trusted(&this.caller) {
                this.file = None;
                return Poll::Ready(Some(Err(revoked)));
            }
            let Some(file) = this.file.take().filter(|_| this.offset < this.total) else {
                return Poll::Ready(None);
            };
            let left = this.total - this.offset;
            this.reading = Some(tokio::task::spawn_blocking(move || Self::read_chunk(file, left)));
        }
        let Some(reading) = this.reading.as_mut() else {
            return Poll::Ready(None);
        };
        let result = match Pin::new(reading).poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(r) => r,
        };
        this.reading = None;
        let (file, data) = match result {
            Ok(Ok((_, data))) if data.is_empty() => {
                return Poll::Ready(Some(Err(Status::internal(format!(
                    "model file ended after {} of {} bytes",
                    this.offset, this.total
                )))));
            }
            Ok(Ok(read)) => read,
            Ok(Err(e)) => return Poll::Ready(Some(Err(Status::internal(format!("cannot read the model: {e}"))))),
            Err(e) => return Poll::Ready(Some(Err(Status::internal(format!("cannot read the model: {e}"))))),
        };
        let msg = ModelChunk { offset: this.offset, total_bytes: this.total, data };
        this.offset += msg.data.len() as u64;
        this.file = Some(file);
        Poll::Ready(Some(Ok(msg)))
    }
}

pub(super) struct FederationApi {
    pub(super) inner: Arc<Inner>,
}

/// Opens the partial upload `key` of `total` bytes on the blocking pool, resumes it at `offset`
/// (checked against what it holds: see [`transfer::check_upload_offset`]) and hashes what it
/// already holds, so the final check covers the whole payload.
async fn open_partial(
    store: &crate::store::Store,
    key: PartialKey,
    total: u64,
    offset: u64,
) -> std::io::Result<Result<(PartialUpload, Hasher), transfer::ResumeError>> {
    let store = store.clone();
    let opened = tokio::task::spawn_blocking(move || {
        let mut partial = store.open_partial(&key, total)?;
        if let Err(e) = transfer::check_upload_offset(offset, partial.acknowledged(), total) {
            return Ok(Err(e));
        }
        if offset < partial.acknowledged() {
            partial.rewind(offset)?;
        }
        let hasher = partial.hash_held()?;
        Ok(Ok((partial, hasher)))
    })
    .await;
    opened.map_err(std::io::Error::other)?
}

/// Waits for the next message of an upload, at most `idle`; `None` when the time ran out.
async fn next_chunk(
    stream: &mut Streaming<UpdateChunk>,
    idle: Duration,
) -> Option<Result<Option<UpdateChunk>, Status>> {
    tokio::time::timeout(idle, stream.message()).await.ok()
}

#[tonic::async_trait]
impl federation_server::Federation for FederationApi {
    type SubscribeStream = Pin<Box<dyn Stream<Item = Result<Directive, Status>> + Send + 'static>>;
    type FetchModelStream = Pin<Box<dyn Stream<Item = Result<ModelChunk, Status>> + Send + 'static>>;

    async fn subscribe(&self, request: Request<SubscribeRequest>) -> Result<Response<Self::SubscribeStream>, Status> {
        let node = caller(&request)?;
        let identity = tls::peer(&request)?.identity.clone();
        let fingerprint = identity.fingerprint.to_hex();
        let hello = request.into_inner();
        // Shown to the lead and kept in the audit log: bounded, never refused (see `bounds`).
        let (device, version) = (bounds::label(&hello.device), bounds::label(&hello.software_version));
        let (tx, rx) = mpsc::channel(32);
        let conn = self.inner.next_conn.fetch_add(1, Ordering::Relaxed);
        lock(&self.inner.nodes).insert(node.clone(), NodeConn { id: conn, fingerprint: fingerprint.clone(), tx });
        // The role guard checked the certificate when the call began; a revocation (or expiry)
        // applied since then found no stream of this node to close, so check again now that it is
        // in `nodes`: from here on a revocation sees (and closes) it.
        let expired = identity.not_after <= time::OffsetDateTime::now_utc();
        if let Err(refused) = self.inner.still_trusted(&identity).and_then(|()| {
            if expired {
                Err(Status::unauthenticated(format!(
                    "the certificate of '{node}' has expired; ask the consortium lead to renew it and reconnect"
                )))
            } else {
                Ok(())
            }
        }) {
            let mut nodes = lock(&self.inner.nodes);
            if nodes.get(&node).is_some_and(|c| c.id == conn) {
                nodes.remove(&node);
            }
            return Err(refused);
        }
        // Made before the wait below: if this call is cancelled while it waits, dropping the
        // stream still tells the driver, and the node does not stay "connected".
        let stream = DirectiveStream {
            inner: ReceiverStream::new(rx),
            node: Some(node.clone()),
            conn,
            events: self.inner.events.clone(),
        };
        self.inner.node_hello(&node, &version, &device);
        // A subscribe loop is itemised within the node's quota, then only counted.
        if self.inner.audit_member(
            &node,
            &fingerprint,
            AuditEvent::NodeConnected { node: node.to_string(), device: device.clone(), version: version.clone() },
        ) {
            tracing::info!(node = %node, device, version, "node connected");
        }
        self.inner.send_event(Event::Connected { node }).await?;
        Ok(Response::new(Box::pin(stream)))
    }

    async fn respond_to_plan(&self, request: Request<PlanResponse>) -> Result<Response<Ack>, Status> {
        let node = caller(&request)?;
        let mut response = request.into_inner();
        let plan_id = bounds::plan_id("plan_id", &response.plan_id)?;
        let run = bounds::run_id("run", &response.run)?;
        // Only a run this coordinator started reaches the driver (and its log lines). A
        // well-formed answer about any other run (or none) is acknowledged and dropped: it creates
        // nothing, and a node answering an offer as its run ends is not told to reconnect.
        if !run.is_some_and(|run| lock(&self.inner.runs).has(&plan_id, &run)) {
            return Ok(Response::new(Ack {}));
        }

        // A long reason is cut, not refused: the refusal itself must count.
        response.reason = bounds::reason(response.reason);
        self.inner.send_event(Event::Decision { node, response }).await?;
        Ok(Response::new(Ack {}))
    }

    async fn fetch_model(
        &self,
        request: Request<FetchModelRequest>,
    ) -> Result<Response<Self::FetchModelStream>, Status> {
        let node = caller(&request)?;
        bounds::sha256_field("sha256", &request.get_ref().sha256)?;
        let hash =
            ContentHash::parse(&request.get_ref().sha256).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let permit = FetchPermit::take(&self.inner, &node)?;
        let (mut file, total) = match self.inner.store.open_model(&hash) {
            Ok(opened) => opened,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Status::not_found(format!("no model with hash {hash}")));
            }
            Err(e) => return Err(Status::internal(format!("cannot read model {hash}: {e}"))),
        };
        // A resumed download: the node holds `offset` bytes already and asks for the rest.
        let offset = request.get_ref().offset;
        transfer::check_download_offset(offset, total)
            .map_err(|e| Status::out_of_range(format!("model {}: {e}", hash.short())))?;
        if offset > 0 {
            use std::io::Seek;
            file.seek(std::io::SeekFrom::Start(offset))
                .map_err(|e| Status::internal(format!("cannot read model {hash}: {e}")))?;
            tracing::info!(
                node = %node,
                model = hash.short(),
                offset,
                total,
                "resuming model download at offset {offset} of {total} bytes"
            );
        }
        let caller = tls::peer(&request)?.identity.clone();
        let inner = Arc::clone(&self.inner);
        let stream = ModelFileStream { file: Some(file), reading: None, offset, total, _permit: permit, caller, inner };
        Ok(Response::new(Box::pin(stream)))
    }

    async fn upload_status(
        &self,
        request: Request<UploadStatusRequest>,
    ) -> Result<Response<UploadStatusResponse>, Status> {
        let node = caller(&request)?;
        let req = request.into_inner();
        let plan_id = bounds::plan_id("plan_id", &req.plan_id)?;
        bounds::sha256_field("payload_sha256", &req.payload_sha256)?;
        let payload = ContentHash::parse(&req.payload_sha256)
            .map_err(|e| Status::invalid_argument(format!("payload_sha256: {e}")))?;
        let info = self.inner.rounds.read().unwrap_or_else(|p| p.into_inner()).get(&plan_id).cloned();
        let Some(info) = info.filter(|i| i.round == req.round) else {
            return Err(Status::failed_precondition(format!(
                "round {} of plan {} is not open: there is no upload of it to resume",
                req.round,
                short(&req.plan_id)
            )));
        };
        if !info.participants.contains(&node) {
            return Err(Status::permission_denied(format!("'{node}' is not a participant of round {}", info.round)));
        }
        let total = (info.num_params + usize::from(info.masked)) as u64 * 4;
        let key = info.partial_key(&node, payload);
        let acknowledged = self
            .inner
            .store
            .partial_acknowledged(&key, total)
            .map_err(|e| Status::internal(format!("partial upload: {e}")))?;
        Ok(Response::new(UploadStatusResponse { acknowledged_bytes: acknowledged, total_bytes: total }))
    }

    async fn submit_update(&self, request: Request<Streaming<UpdateChunk>>) -> Result<Response<UpdateReceipt>, Status> {
        let node = caller(&request)?;
        let identity = tls::peer(&request)?.identity.clone();
        let idle_secs = self.inner.limits.upload_idle_timeout_secs;
        let idle = Duration::from_secs(idle_secs);
        let stalled = || {
            Status::deadline_exceeded(format!(
                "upload sent nothing for {idle_secs} s (limits.upload_idle_timeout_secs); it was dropped, and what was \
                 acknowledged is kept for UploadStatus to resume"
            ))
        };
        let mut stream = request.into_inner();
        let mut header = match next_chunk(&mut stream, idle).await {
            None => return Err(self.inner.reject(&node, "", 0, stalled())),
            Some(Ok(Some(UpdateChunk { part: Some(update_chunk::Part::Header(h)) }))) => h,
            Some(Err(e)) => return Err(e),
            Some(Ok(_)) => {
                return Err(self.inner.reject(
                    &node,
                    "",
                    0,
                    Status::invalid_argument("the first message of an upload must be its header"),
                ));
            }
        };
        let metrics = bounds::metrics(std::mem::take(&mut header.metrics));
        // Every check that needs no payload comes first: nothing is spooled for an upload that
        // names no plan, the wrong round, a node that is not a participant, or a duplicate.
        let reject = |status: Status| self.inner.reject(&node, &header.plan_id, header.round, status);
        let plan_id = bounds::plan_id("plan_id", &header.plan_id).map_err(reject)?;
        bounds::sha256_field("base_model_sha256", &header.base_model_sha256).map_err(reject)?;
        bounds::sha256_field("payload_sha256", &header.payload_sha256).map_err(reject)?;
        let info = {
            let rounds = self.inner.rounds.read().unwrap_or_else(|p| p.into_inner());
            match rounds.get(&plan_id) {
                Some(info) => info.clone(),
                // Named by the one open round when there is one, so a node with a stale plan id
                // hears which plan is training (as when one plan ran at a time).
                None => match rounds.values().next() {
                    Some(open) if rounds.len() == 1 => open.clone(),
                    Some(_) => return Err(reject(Status::failed_precondition("no round of this plan is open"))),
                    None => return Err(reject(Status::failed_precondition("no round is open"))),
                },
            }
        };
        if plan_id != info.plan_id || header.round != info.round {
            return Err(reject(Status::failed_precondition(format!(
                "update is for plan {} round {}, but round {} of plan {} is open",
                short(&header.plan_id),
                header.round,
                info.round,
                short(&info.plan_id)
            ))));
        }
        if header.base_model_sha256 != info.model.to_hex() {
            return Err(reject(Status::invalid_argument(format!(
                "update was computed from model {}, but the round's model is {}",
                short(&header.base_model_sha256),
                info.model.short()
            ))));
        }
        if header.masked != info.masked {
            return Err(reject(Status::invalid_argument(if info.masked {
                "this plan uses secure aggregation: send a masked input".to_string()
            } else {
                "this plan does not use secure aggregation: send the plain update".to_string()
            })));
        }
        let words = info.num_params + usize::from(info.masked);
        if header.num_params != words as u64 {
            return Err(reject(Status::invalid_argument(if info.masked {
                format!("masked input has {} words, the round expects {words}", header.num_params)
            } else {
                format!("update has {} parameters, the model has {}", header.num_params, info.num_params)
            })));
        }
        let payload_hash = ContentHash::parse(&header.payload_sha256)
            .map_err(|e| reject(Status::invalid_argument(format!("payload_sha256: {e}"))))?;
        // Held until this call returns: one upload per participant is spooled at a time.
        // A newcomer that closes a half-open upload of its own is asked to retry: not a rejection.
        let slot = info.claim(&node).map_err(|s| if s.code() == tonic::Code::Unavailable { s } else { reject(s) })?;
        let expected = words as u64 * 4;
        // The round's partial uploads go when it closes; earlier rounds' leftovers (a coordinator
        // that restarted mid-round) go now.
        info.sweep_partials_on_close(&self.inner.store);
        if let Err(e) = self.inner.store.drop_partials(&info.plan_id, Some(info.round)) {
            tracing::warn!("partial uploads of earlier rounds: {e}");
        }
        let key = info.partial_key(&node, payload_hash);
        let offset = header.offset;
        let (mut partial, mut hasher) = match open_partial(&self.inner.store, key, expected, offset).await {
            Ok(Ok(opened)) => opened,
            Ok(Err(e)) => return Err(reject(Status::failed_precondition(format!("upload offset: {e}")))),
            Err(e) => return Err(reject(Status::internal(format!("partial upload: {e}")))),
        };
        if offset > 0 {
            tracing::info!(
                node = %node,
                round = info.round,
                offset,
                total = expected,
                "resuming upload from {node} for round {} at offset {offset} of {expected} bytes",
                info.round
            );
        }
        let mut received = offset;
        // Returning keeps the partial file (a node may resume it) unless the upload broke a rule or
        // its round closed; it always frees the slot. A complete upload moves to the spool.
        loop {
            let next = tokio::select! {
                next = next_chunk(&mut stream, idle) => next,
                () = slot.superseded() => {
                    // Kept: the newer upload resumes from what this one acknowledged.
                    tracing::info!(node = %node, round = info.round, received, "an upload gave way to a newer one from the same node");

                    return Err(Status::aborted(
                        "a newer upload of this update from the same node arrived; this one stopped, keeping what it acknowledged",
                    ));
                }
            };
            let msg = match next {
                None => return Err(reject(stalled())),
                Some(Err(e)) => return Err(e),
                Some(Ok(None)) => break,
                Some(Ok(Some(msg))) => msg,
            };
            // An upload from a certificate revoked since it began ends at its next chunk.
            self.inner.still_trusted(&identity).map_err(reject)?;
            // So does one whose round closed (or whose plan ended) while it was being sent: a slow
            // upload must not hold a spool, and its slot, past its round. A retry of the round is
            // another opening: the failed attempt's upload ends too (nothing of it is aggregated).
            let still_open = self
                .inner
                .rounds
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(&info.plan_id)
                .is_some_and(|open| open.same_opening(&info));
            if !still_open {
                partial.discard();
                return Err(reject(Status::failed_precondition(format!(
                    "round {} of plan {} closed while this update was being uploaded; it was dropped and its spool freed",
                    info.round,
                    short(&info.plan_id)
                ))));
            }
            let data = match msg.part {
                Some(update_chunk::Part::Data(d)) => d,
                _ => {
                    partial.discard();
                    return Err(reject(Status::invalid_argument("an upload carries one header, then only data")));
                }
            };
            if data.len() > CHUNK_BYTES || data.len() % 4 != 0 {
                partial.discard();
                return Err(reject(Status::invalid_argument(format!(
                    "data chunk of {} bytes: chunks are whole f32 values and at most {CHUNK_BYTES} bytes",
                    data.len()
                ))));
            }
            received += data.len() as u64;
            if received > expected {
                partial.discard();
                return Err(reject(Status::invalid_argument(format!(
                    "upload carries more than the {expected} bytes its {words} values need"
                ))));
            }
            hasher.update(&data);
            // Written and, at each chunk boundary, fsync'd off the async workers.
            partial = tokio::task::spawn_blocking(move || partial.append(&data).map(|()| partial))
                .await
                .map_err(|e| reject(Status::internal(format!("spool: {e}"))))?
                .map_err(|e| reject(Status::internal(format!("spool: {e}"))))?;
        }
        if received != expected {
            // Kept: the node may resume it (UploadStatus says from where).
            return Err(reject(Status::invalid_argument(format!("upload ended after {received} of {expected} bytes"))));
        }
        if hasher.finish() != payload_hash {
            partial.discard();
            return Err(reject(Status::invalid_argument(if offset > 0 {
                format!("payload does not match payload_sha256 (resumed at offset {offset}); send it again from 0")
            } else {
                "payload does not match payload_sha256".to_string()
            })));
        }
        let spool = tokio::task::spawn_blocking(move || partial.into_spool())
            .await
            .map_err(|e| reject(Status::internal(format!("spool: {e}"))))?
            .map_err(|e| reject(Status::internal(format!("spool: {e}"))))?;
        let update = SpooledUpdate {
            round: header.round,
            attempt: info.attempt,
            plan_id,
            base_model: header.base_model_sha256.clone(),
            sample_count: header.sample_count,
            metrics,
            masked: header.masked,
            payload_sha256: header.payload_sha256.clone(),
            bytes: received,
            spool,
        };
        let (reply, rx) = oneshot::channel();
        self.inner.send_event(Event::Update { node: node.clone(), update, reply }).await?;
        match rx.await {
            Ok(Ok(())) => Ok(Response::new(UpdateReceipt { accepted: true, reason: String::new() })),
            Ok(Err(reason)) => Err(reject(Status::failed_precondition(reason.to_string()))),
            Err(_) => Err(Status::unavailable("coordinator is shutting down")),
        }
    }

    async fn report_evaluation(&self, request: Request<EvaluationReport>) -> Result<Response<Ack>, Status> {
        let node = caller(&request)?;
        let mut report = request.into_inner();
        let plan_id = bounds::plan_id("plan_id", &report.plan_id)?;
        bounds::sha256_field("model_sha256", &report.model_sha256)?;
        // An evaluation of a plan this coordinator never ran is acknowledged and dropped.
        if lock(&self.inner.runs).latest(&plan_id).is_none() {
            return Ok(Response::new(Ack {}));
        }
        report.metrics = bounds::metrics(report.metrics);
        self.inner.send_event(Event::Evaluation { node, report }).await?;
        Ok(Response::new(Ack {}))
    }

    async fn countersign(&self, request: Request<proto::Countersignature>) -> Result<Response<Ack>, Status> {
        let peer = tls::peer(&request)?.clone();
        let c = request.into_inner();
        let fingerprint = peer.identity.fingerprint.to_hex();
        let signer =
            receipts::Signer { name: &peer.identity.name, fingerprint: &fingerprint, cert_der: &peer.cert_der };
        let wire = receipts::Countersignature {
            plan_id: &c.plan_id,
            round: c.round,
            record_sha256: &c.record_sha256,
            signature: &c.signature,
            agrees: c.agrees,
            reason: &c.reason,
        };
        // Decided and marked under one lock, so two racing copies cannot both be written.
        let accepted = lock(&self.inner.receipts).accept(signer, wire).map_err(|r| {
            let code = match r {
                receipts::Refusal::NotAwaited { .. } => tonic::Code::NotFound,
                receipts::Refusal::NotARecipient { .. } => tonic::Code::PermissionDenied,
                receipts::Refusal::AlreadyCountersigned { .. } => tonic::Code::AlreadyExists,
                _ => tonic::Code::InvalidArgument,
            };
            Status::new(code, r.to_string())
        })?;
        if !accepted.agrees {
            // The node's words, bounded and quoted (`{:?}`) so they cannot forge log lines.
            tracing::error!(
                node = accepted.node,
                round = c.round,
                "node disputes the round record: {:?}",
                bounds::clip_bytes(&accepted.reason, bounds::REASON_BYTES)
            );
        }
        self.inner.audit(&fingerprint, accepted.event());
        self.inner.record_receipt(&accepted);
        Ok(Response::new(Ack {}))
    }

    async fn heartbeat(&self, request: Request<proto::HeartbeatRequest>) -> Result<Response<Ack>, Status> {
        let node = caller(&request)?;
        let hb = request.into_inner();
        let plan_id = bounds::plan_id("plan_id", &hb.plan_id)?;
        let run = bounds::run_id("run", &hb.run)?;
        // One a second per node on average (a token bucket) goes on to the driver; checked
        // first, under one lock, so a flood costs a map lookup a call and no queue slot.
        {
            let now = std::time::Instant::now();
            let per_sec = 1000.0 / crate::round::HEARTBEAT_MIN_GAP as f64;
            let mut buckets = lock(&self.inner.heartbeats);
            let (tokens, at) = buckets.entry(node.clone()).or_insert((super::HEARTBEAT_BURST, now));
            *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * per_sec).min(super::HEARTBEAT_BURST);
            *at = now;
            if *tokens < 1.0 {
                return Err(Status::resource_exhausted(
                    "at most one heartbeat a second counts; send one every heartbeat_interval_ms",
                ));
            }
            *tokens -= 1.0;
        }
        let activity = match proto::HeartbeatPhase::try_from(hb.phase) {
            Ok(proto::HeartbeatPhase::Uploading) => crate::round::Activity::Uploading,
            _ => crate::round::Activity::Training,
        };
        // Never waits for room: a heartbeat the driver has no room for is dropped (the next one
        // comes within an interval), and the node is told so.
        // A heartbeat that names no run is about nothing running: acknowledged, as the engine
        // would have ignored it.
        let Some(run) = run else {
            return Ok(Response::new(Ack {}));
        };
        let ev = Event::Heartbeat { node, plan_id, run, round: hb.round, activity };
        match self.inner.events.try_send(ev) {
            Ok(()) => Ok(Response::new(Ack {})),
            Err(_) => Err(Status::unavailable("coordinator busy: heartbeat dropped; send the next one as usual")),
        }
    }

    async fn sec_agg(&self, request: Request<SecAggMessage>) -> Result<Response<Ack>, Status> {
        let node = caller(&request)?;
        let peer = tls::peer(&request)?.clone();
        let msg = request.into_inner();
        bounds::plan_id("plan_id", &msg.plan_id)?;
        let (plan_id, round) = (msg.plan_id.clone(), msg.round);
        let (reply, rx) = oneshot::channel();
        self.inner.send_event(Event::SecAgg { node: node.clone(), cert_der: peer.cert_der, msg, reply }).await?;
        match rx.await {
            Ok(Ok(())) => Ok(Response::new(Ack {})),
            Ok(Err(reason)) => {
                Err(self.inner.reject(&node, &plan_id, round, Status::failed_precondition(reason.to_string())))
            }
            Err(_) => Err(Status::unavailable("coordinator is shutting down")),
        }
    }
}
