//! The node-facing service (`Federation`): subscribe, plan decisions, model downloads, uploads,
//! evaluations, receipts and secure-aggregation messages.

use std::io::Write;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use sanctum_protocol::hash::{ContentHash, Hasher};
use sanctum_protocol::proto::{
    self, Ack, Directive, EvaluationReport, FetchModelRequest, ModelChunk, PlanResponse, SecAggMessage,
    SubscribeRequest, UpdateChunk, UpdateReceipt, federation_server, update_chunk,
};
use sanctum_protocol::tls;
use sanctum_protocol::transfer::{self, CHUNK_BYTES};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use serde_json::json;

use super::*;

/// Sends `UnboundedSender`-side notice when a node's directive stream is dropped.
struct DirectiveStream {
    inner: ReceiverStream<Result<Directive, Status>>,
    node: String,
    conn: u64,
    events: mpsc::UnboundedSender<Event>,
}

impl Stream for DirectiveStream {
    type Item = Result<Directive, Status>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

impl Drop for DirectiveStream {
    fn drop(&mut self) {
        let _ = self.events.send(Event::Disconnected { node: self.node.clone(), conn: self.conn });
    }
}

pub(super) struct FederationApi {
    pub(super) inner: Arc<Inner>,
}

/// Re-reads the revocation list every 200 ms; a list that cannot be read keeps the last good one

#[tonic::async_trait]
impl federation_server::Federation for FederationApi {
    type SubscribeStream = Pin<Box<dyn Stream<Item = Result<Directive, Status>> + Send + 'static>>;
    type FetchModelStream = ReceiverStream<Result<ModelChunk, Status>>;

    async fn subscribe(&self, request: Request<SubscribeRequest>) -> Result<Response<Self::SubscribeStream>, Status> {
        let node = caller(&request)?;
        let fingerprint = tls::peer(&request)?.identity.fingerprint.to_hex();
        let hello = request.into_inner();
        let (tx, rx) = mpsc::channel(32);
        let conn = self.inner.next_conn.fetch_add(1, Ordering::Relaxed);
        lock(&self.inner.nodes).insert(node.clone(), NodeConn { id: conn, fingerprint: fingerprint.clone(), tx });
        tracing::info!(node, device = hello.device, version = hello.software_version, "node connected");
        self.inner.audit(
            &fingerprint,
            "node_connected",
            [("node", json!(node)), ("device", json!(hello.device)), ("version", json!(hello.software_version))],
        );
        self.inner.send_event(Event::Connected { node: node.clone() });
        let stream = DirectiveStream { inner: ReceiverStream::new(rx), node, conn, events: self.inner.events.clone() };
        Ok(Response::new(Box::pin(stream)))
    }

    async fn respond_to_plan(&self, request: Request<PlanResponse>) -> Result<Response<Ack>, Status> {
        let node = caller(&request)?;
        self.inner.send_event(Event::Decision { node, response: request.into_inner() });
        Ok(Response::new(Ack {}))
    }

    async fn fetch_model(
        &self,
        request: Request<FetchModelRequest>,
    ) -> Result<Response<Self::FetchModelStream>, Status> {
        let hash = ContentHash::parse(&request.get_ref().sha256).map_err(Status::invalid_argument)?;
        let bytes = match self.inner.store.read_model(&hash) {
            Ok(b) => Arc::new(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Status::not_found(format!("no model with hash {hash}")));
            }
            Err(e) => return Err(Status::internal(format!("cannot read model {hash}: {e}"))),
        };
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let total = bytes.len() as u64;
            for (offset, chunk) in transfer::chunks(&bytes) {
                let msg = ModelChunk { offset, data: chunk.to_vec(), total_bytes: total };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn submit_update(&self, request: Request<Streaming<UpdateChunk>>) -> Result<Response<UpdateReceipt>, Status> {
        let node = caller(&request)?;
        let mut stream = request.into_inner();
        let header = match stream.message().await? {
            Some(UpdateChunk { part: Some(update_chunk::Part::Header(h)) }) => h,
            _ => {
                return Err(self.inner.reject(
                    &node,
                    "",
                    0,
                    Status::invalid_argument("the first message of an upload must be its header"),
                ));
            }
        };
        let reject = |status: Status| self.inner.reject(&node, &header.plan_id, header.round, status);
        let info = self
            .inner
            .round
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| reject(Status::failed_precondition("no round is open")))?;
        if header.plan_id != info.plan_id || header.round != info.round {
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
        let expected = words as u64 * 4;
        let mut spool = self.inner.store.spool().map_err(|e| reject(Status::internal(format!("spool: {e}"))))?;
        let mut hasher = Hasher::default();
        let mut received = 0u64;
        while let Some(msg) = stream.message().await? {
            let data = match msg.part {
                Some(update_chunk::Part::Data(d)) => d,
                _ => {
                    return Err(reject(Status::invalid_argument("an upload carries one header, then only data")));
                }
            };
            if data.len() > CHUNK_BYTES || data.len() % 4 != 0 {
                return Err(reject(Status::invalid_argument(format!(
                    "data chunk of {} bytes: chunks are whole f32 values and at most {CHUNK_BYTES} bytes",
                    data.len()
                ))));
            }
            received += data.len() as u64;
            if received > expected {
                return Err(reject(Status::invalid_argument(format!(
                    "upload carries more than the {expected} bytes its {words} values need"
                ))));
            }
            hasher.update(&data);
            spool.write_all(&data).map_err(|e| reject(Status::internal(format!("spool: {e}"))))?;
        }
        if received != expected {
            return Err(reject(Status::invalid_argument(format!("upload ended after {received} of {expected} bytes"))));
        }
        if hasher.finish() != payload_hash {
            return Err(reject(Status::invalid_argument("payload does not match payload_sha256")));
        }
        spool.flush().map_err(|e| reject(Status::internal(format!("spool: {e}"))))?;
        let update = SpooledUpdate {
            round: header.round,
            plan_id: header.plan_id.clone(),
            base_model: header.base_model_sha256.clone(),
            sample_count: header.sample_count,
            metrics: header.metrics.clone(),
            masked: header.masked,
            payload_sha256: header.payload_sha256.clone(),
            bytes: received,
            spool,
        };
        let (reply, rx) = oneshot::channel();
        self.inner.send_event(Event::Update { node: node.clone(), update, reply });
        match rx.await {
            Ok(Ok(())) => Ok(Response::new(UpdateReceipt { accepted: true, reason: String::new() })),
            Ok(Err(reason)) => Err(reject(Status::failed_precondition(reason))),
            Err(_) => Err(Status::unavailable("coordinator is shutting down")),
        }
    }

    async fn report_evaluation(&self, request: Request<EvaluationReport>) -> Result<Response<Ack>, Status> {
        let node = caller(&request)?;
        self.inner.send_event(Event::Evaluation { node, report: request.into_inner() });
        Ok(Response::new(Ack {}))
    }

    async fn countersign(&self, request: Request<proto::Countersignature>) -> Result<Response<Ack>, Status> {
        let peer = tls::peer(&request)?.clone();
        let c = request.into_inner();
        let line = lock(&self.inner.receipts).get(&(c.plan_id.clone(), c.round)).cloned().ok_or_else(|| {
            Status::not_found(format!(
                "no round record for plan {} round {} awaits a receipt",
                short(&c.plan_id),
                c.round
            ))
        })?;
        if ContentHash::of(line.as_bytes()).to_hex() != c.record_sha256 {
            return Err(Status::invalid_argument("record_sha256 is not the hash of the round record that was sent"));
        }
        sanctum_protocol::secagg::keys::verify_message(line.as_bytes(), &c.signature, &peer.cert_der)
            .map_err(|e| Status::invalid_argument(format!("countersignature: {e}")))?;
        if !c.agrees {
            tracing::error!(node = peer.identity.name, round = c.round, "node disputes the round record: {}", c.reason);
        }
        self.inner.audit(
            &peer.identity.fingerprint.to_hex(),
            "receipt",
            [
                ("node", json!(peer.identity.name)),
                ("plan_id", json!(c.plan_id)),
                ("round", json!(c.round)),
                ("record_sha256", json!(c.record_sha256)),
                ("signature", json!(hex::encode(&c.signature))),
                ("agrees", json!(c.agrees)),
                ("reason", json!(c.reason)),
            ],
        );
        Ok(Response::new(Ack {}))
    }

    async fn sec_agg(&self, request: Request<SecAggMessage>) -> Result<Response<Ack>, Status> {
        let peer = tls::peer(&request)?.clone();
        let node = peer.identity.name.clone();
        let msg = request.into_inner();
        let (plan_id, round) = (msg.plan_id.clone(), msg.round);
        let (reply, rx) = oneshot::channel();
        self.inner.send_event(Event::SecAgg { node: node.clone(), cert_der: peer.cert_der, msg, reply });
        match rx.await {
            Ok(Ok(())) => Ok(Response::new(Ack {})),
            Ok(Err(reason)) => Err(self.inner.reject(&node, &plan_id, round, Status::failed_precondition(reason))),
            Err(_) => Err(Status::unavailable("coordinator is shutting down")),
        }
    }
}
