//! The node-facing service (`Federation`): subscribe, plan decisions, model downloads, uploads,
//! evaluations, receipts and secure-aggregation messages.
//!
//! The resumable upload's handlers (`UploadStatus`, `SubmitUpdate`) are in `uploads.rs`, beside
//! the upload gates they check.

use std::future::Future;
use std::io::Read;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use sanctum_protocol::hash::ContentHash;
use sanctum_protocol::pki::Identity;
use sanctum_protocol::proto::{
    self, Ack, Directive, EvaluationReport, FetchModelRequest, ModelChunk, PlanResponse, SecAggMessage,
    SubscribeRequest, UpdateChunk, UpdateReceipt, UploadStatusRequest, UploadStatusResponse, federation_server,
};
use sanctum_protocol::tls;
use sanctum_protocol::transfer::{self};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::*;
use crate::receipts;

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
        this.inner.metrics.sent(msg.data.len());
        this.file = Some(file);
        Poll::Ready(Some(Ok(msg)))
    }
}

pub(super) struct FederationApi {
    pub(super) inner: Arc<Inner>,
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
        self.resume_point(request).await
    }

    async fn submit_update(&self, request: Request<Streaming<UpdateChunk>>) -> Result<Response<UpdateReceipt>, Status> {
        self.spool_update(request).await
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
