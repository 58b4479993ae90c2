//! A rogue coordinator for attack tests: it holds the consortium's real coordinator certificate,
//! so a real `sanctum-node` process connects to it as it would to the real one, and the test
//! script decides every directive the node gets. Whatever the node sends back is recorded in
//! arrival order (plan decisions, model requests, every upload's header and payload bytes with
//! their SHA-256, evaluations, secure-aggregation messages, countersignatures), and the test
//! waits on what was recorded, with a timeout, instead of sleeping.
//!
//! The node never learns it is being tested: the server speaks the `Federation` service over
//! the same mutual TLS (`sanctum_protocol::tls`) the real coordinator uses. It accepts every
//! upload and every message, the way a curious coordinator would, so nothing the node refuses
//! is refused for it.
//!
//! Length: one fake coordinator: the recorder the tests read, the directives they script and the
//! `Federation` service that feeds the recorder, which must answer every RPC of the protocol.

// Messages are built with `..Default::default()` even where every field is named today: the
// protocol gains fields while these tests keep compiling.
#![allow(clippy::needless_update)]

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use sanctum_protocol::hash::{ContentHash, Hasher};
use sanctum_protocol::plan::Plan;
use sanctum_protocol::prost::Message;
use sanctum_protocol::proto::{
    self, Ack, Countersignature, Directive, EvaluationReport, FetchModelRequest, ModelChunk, PlanResponse,
    SecAggMessage, SubscribeRequest, UpdateChunk, UpdateHeader, UpdateReceipt, directive, federation_server,
    update_chunk,
};
use sanctum_protocol::tls::{self, TlsFiles, TlsMaterial};
use sanctum_protocol::transfer;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::Consortium;

/// One message a node sent, as the rogue coordinator received it.
#[derive(Clone, Debug)]
pub struct Received {
    /// Position in arrival order over all nodes (see [`RogueCoordinator::mark`]).
    pub seq: usize,
    /// The sender's name, read from its verified certificate.
    pub node: String,
    pub message: Sent,
}

/// What a node sent, one variant per `Federation` call.
#[derive(Clone, Debug)]
pub enum Sent {
    Subscribe(SubscribeRequest),
    PlanResponse(PlanResponse),
    FetchModel(FetchModelRequest),
    Update(Upload),
    Evaluation(EvaluationReport),
    SecAgg(SecAggMessage),
    Countersign(Countersignature),
}

/// One `SubmitUpdate` call: its header and every data byte that came after it.
#[derive(Clone, Debug)]
pub struct Upload {
    pub header: UpdateHeader,
    /// The data chunks concatenated, as received.
    pub payload: Vec<u8>,
    /// SHA-256 (hex) of `payload`, computed here (not the header's claim).
    pub sha256: String,
    /// Set when the upload did not end cleanly (a broken stream, a second header).
    pub error: Option<String>,
}

impl Sent {
    /// The gRPC method's name, as the node's egress log calls it.
    pub fn call(&self) -> &'static str {
        match self {
            Sent::Subscribe(_) => "Subscribe",
            Sent::PlanResponse(_) => "RespondToPlan",
            Sent::FetchModel(_) => "FetchModel",
            Sent::Update(_) => "SubmitUpdate",
            Sent::Evaluation(_) => "ReportEvaluation",
            Sent::SecAgg(_) => "SecAgg",
            Sent::Countersign(_) => "Countersign",
        }
    }

    /// Every byte of the message as the node encoded it, an upload's payload included: what a
    /// test searches for things that must never leave the hospital.
    pub fn wire_bytes(&self) -> Vec<u8> {
        match self {
            Sent::Subscribe(m) => m.encode_to_vec(),
            Sent::PlanResponse(m) => m.encode_to_vec(),
            Sent::FetchModel(m) => m.encode_to_vec(),
            Sent::Update(u) => {
                let mut bytes = u.header.encode_to_vec();
                bytes.extend_from_slice(&u.payload);
                bytes
            }
            Sent::Evaluation(m) => m.encode_to_vec(),
            Sent::SecAgg(m) => m.encode_to_vec(),
            Sent::Countersign(m) => m.encode_to_vec(),
        }
    }
}

/// A model the rogue coordinator serves, as directives name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Model {
    pub sha256: String,
    pub bytes: u64,
}

/// A wait that ran out: what was awaited and everything recorded by then.
#[derive(Debug)]
pub struct WaitTimeout {
    pub what: String,
    pub recorded: String,
}

impl fmt::Display for WaitTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "timed out waiting for {}; the rogue coordinator recorded:\n{}", self.what, self.recorded)
    }
}

impl std::error::Error for WaitTimeout {}

/// State shared by the server's handlers and the test script.
struct Shared {
    /// Models served by `FetchModel`, by hex SHA-256; a test registers them before naming them.
    models: Mutex<HashMap<String, Arc<Vec<u8>>>>,
    /// The directive stream of each connected node, by certificate name; a reconnect replaces it.
    streams: Mutex<HashMap<String, mpsc::UnboundedSender<Result<Directive, Status>>>>,
    /// Everything received, in arrival order.
    received: Mutex<Vec<Received>>,
    /// Bumped after every change to `received` or `streams`, so waits wake without polling.
    changed: watch::Sender<u64>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn record(&self, node: &str, message: Sent) {
        {
            let mut received = lock(&self.received);
            let seq = received.len();
            received.push(Received { seq, node: node.to_string(), message });
        }
        self.changed.send_modify(|v| *v += 1);
    }
}

/// The running rogue coordinator; the server stops when it drops.
pub struct RogueCoordinator {
    /// Where it listens (127.0.0.1, a port the OS chose).
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    /// Dropping it stops the server gracefully; the task is aborted as well, since the nodes'
    /// open directive streams would hold a graceful shutdown forever.
    _shutdown: oneshot::Sender<()>,
    server: tokio::task::JoinHandle<()>,
    /// Numbers the barrier offers, so each one's answer is told apart.
    barriers: std::sync::atomic::AtomicU64,
}

impl Drop for RogueCoordinator {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// How long waits last unless a test says otherwise: long enough for DP-SGD noise calibration
/// and a few local steps on a loaded CI machine.
pub const WAIT: Duration = Duration::from_secs(180);

impl RogueCoordinator {
    /// Starts serving `Federation` on 127.0.0.1:0 with the consortium's coordinator certificate
    /// (made by `pki init`), over the same mutual TLS the real coordinator uses.
    pub async fn start(c: &Consortium) -> Self {
        let files = TlsFiles {
            ca: c.pki().join("ca.pem"),
            cert: c.pki().join("coordinator.pem"),
            key: c.pki().join("coordinator.key"),
        };
        let material = TlsMaterial::load(&files).expect("the consortium's coordinator certificate");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let (changed, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            models: Mutex::default(),
            streams: Mutex::default(),
            received: Mutex::default(),
            changed,
        });
        let incoming = tls::mtls_incoming(
            listener,
            material.server_config().expect("server TLS config"),
            tls::IncomingOptions::default(),
        );
        let api = federation_server::FederationServer::new(RogueApi { shared: Arc::clone(&shared) })
            .max_decoding_message_size(2 * transfer::CHUNK_BYTES);
        let (shutdown, stop) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let result = tonic::transport::Server::builder()
                .add_service(api)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stop.await;
                })
                .await;
            if let Err(e) = result {
                eprintln!("rogue coordinator stopped: {e}");
            }
        });
        Self { addr, shared, _shutdown: shutdown, server, barriers: Default::default() }
    }

    /// `localhost:PORT`: the name in the coordinator's certificate, for a node's config.
    pub fn address(&self) -> String {
        format!("localhost:{}", self.addr.port())
    }

    /// Serves `bytes` to `FetchModel` from now on.
    pub fn register_model(&self, bytes: Vec<u8>) -> Model {
        let model = Model { sha256: ContentHash::of(&bytes).to_hex(), bytes: bytes.len() as u64 };
        lock(&self.shared.models).insert(model.sha256.clone(), Arc::new(bytes));
        model
    }

    /// Registers the plan's model initialised with `seed` (the real coordinator uses the plan's
    /// own seed for round 1; any other seed makes a model outside the plan's lineage).
    pub fn register_initial_model(&self, plan_toml: &str, seed: u64) -> Model {
        let plan = Plan::parse(plan_toml).expect("a valid plan");
        self.register_model(plan.model.init(seed).to_safetensors().expect("safetensors"))
    }

    /// Pushes a directive down `node`'s Subscribe stream; panics when the node is not connected.
    pub fn send(&self, node: &str, directive: Directive) {
        let streams = lock(&self.shared.streams);
        let tx = streams.get(node).unwrap_or_else(|| panic!("node '{node}' is not connected to the rogue coordinator"));
        tx.send(Ok(directive)).unwrap_or_else(|_| panic!("node '{node}' closed its directive stream"));
    }

    /// Whether `node` has a directive stream open.
    pub fn connected(&self, node: &str) -> bool {
        lock(&self.shared.streams).get(node).is_some_and(|tx| !tx.is_closed())
    }

    /// A copy of everything received so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        lock(&self.shared.received).clone()
    }

    /// What `node` sent, in order.
    pub fn from(&self, node: &str) -> Vec<Sent> {
        lock(&self.shared.received).iter().filter(|r| r.node == node).map(|r| r.message.clone()).collect()
    }

    /// The number of records so far: pass it to the `*_since` helpers to look only at what came
    /// after this point of the script.
    pub fn mark(&self) -> usize {
        lock(&self.shared.received).len()
    }

    /// Every upload `node` made, in order.
    pub fn uploads(&self, node: &str) -> Vec<Upload> {
        self.uploads_since(node, 0)
    }

    /// The uploads `node` made after `mark`.
    pub fn uploads_since(&self, node: &str, mark: usize) -> Vec<Upload> {
        lock(&self.shared.received)
            .iter()
            .filter(|r| r.node == node && r.seq >= mark)
            .filter_map(|r| match &r.message {
                Sent::Update(u) => Some(u.clone()),
                _ => None,
            })
            .collect()
    }

    /// The distinct releases among `node`'s uploads: (plan, round, payload SHA-256). A re-send of
    /// the very same bytes is not a new release; fresh noise on the same round is.
    pub fn distinct_releases(&self, node: &str) -> BTreeSet<(String, u32, String)> {
        self.uploads(node).into_iter().map(|u| (u.header.plan_id, u.header.round, u.sha256)).collect()
    }

    /// Everything recorded, one line per message, for failure messages.
    pub fn summary(&self) -> String {
        summarise(&lock(&self.shared.received))
    }

    /// Waits until `f` finds what it looks for in the records, or `timeout` passes. `f` sees
    /// every record so far each time something new arrives.
    pub async fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&[Received]) -> Option<T>,
    ) -> Result<T, WaitTimeout> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut changes = self.shared.changed.subscribe();
        loop {
            // Marked seen before looking, so a record arriving during the look still wakes us.
            changes.borrow_and_update();
            if let Some(found) = f(&lock(&self.shared.received)) {
                return Ok(found);
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => {
                    return Err(WaitTimeout { what: what.to_string(), recorded: self.summary() });
                }
            }
        }
    }

    /// Waits until `node` has opened its directive stream.
    pub async fn wait_connected(&self, node: &str, timeout: Duration) -> Result<(), WaitTimeout> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut changes = self.shared.changed.subscribe();
        loop {
            changes.borrow_and_update();
            if self.connected(node) {
                return Ok(());
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => {
                    return Err(WaitTimeout { what: format!("node '{node}' to connect"), recorded: self.summary() });
                }
            }
        }
    }

    /// Waits for `node`'s decision on `plan_id` sent after `mark` (a decision naming another run
    /// than `run` does not count; one naming no run does, for nodes that do not name it yet).
    pub async fn wait_decision(
        &self,
        node: &str,
        plan_id: &str,
        run: &str,
        mark: usize,
        timeout: Duration,
    ) -> Result<PlanResponse, WaitTimeout> {
        self.wait_for(&format!("{node}'s decision on plan {plan_id} run '{run}'"), timeout, |recs| {
            recs.iter().filter(|r| r.node == node && r.seq >= mark).find_map(|r| match &r.message {
                Sent::PlanResponse(p) if p.plan_id == plan_id && (p.run.is_empty() || p.run == run) => Some(p.clone()),
                _ => None,
            })
        })
        .await
    }

    /// Waits for an upload by `node` for (plan, round) sent after `mark`.
    pub async fn wait_upload(
        &self,
        node: &str,
        plan_id: &str,
        round: u32,
        mark: usize,
        timeout: Duration,
    ) -> Result<Upload, WaitTimeout> {
        self.wait_for(&format!("{node}'s upload for round {round}"), timeout, |recs| {
            recs.iter().filter(|r| r.node == node && r.seq >= mark).find_map(|r| match &r.message {
                Sent::Update(u) if u.header.plan_id == plan_id && u.header.round == round => Some(u.clone()),
                _ => None,
            })
        })
        .await
    }

    /// Returns once `node` has handled every directive sent to it before this call: it offers a
    /// plan whose id does not match its text (which every node refuses at once, changing
    /// nothing) and waits for the refusal. The node reads its directive stream in order, so the
    /// refusal comes after whatever the earlier directives made it send.
    pub async fn barrier(&self, node: &str, timeout: Duration) -> Result<(), WaitTimeout> {
        let n = self.barriers.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("barrier-{n}");
        let mark = self.mark();
        self.send(
            node,
            Directive {
                kind: Some(directive::Kind::OfferPlan(proto::OfferPlan {
                    plan_id: id.clone(),
                    plan_toml: "# not a plan: a barrier in the test script\n".into(),
                    run: id.clone(),
                    ..Default::default()
                })),
            },
        );
        self.wait_decision(node, &id, &id, mark, timeout).await.map(|_| ())
    }
}

fn summarise(received: &[Received]) -> String {
    let mut out = String::new();
    for r in received {
        let what = match &r.message {
            Sent::Subscribe(m) => format!("version {} device {}", m.software_version, m.device),
            Sent::PlanResponse(m) => format!(
                "plan {} run '{}' accept={} reason={:?} privacy={:?}",
                short(&m.plan_id),
                m.run,
                m.accept,
                m.reason,
                m.privacy
            ),
            Sent::FetchModel(m) => format!("model {}", short(&m.sha256)),
            Sent::Update(u) => format!(
                "plan {} round {} base {} {} bytes sha256 {} masked={} metrics={:?}{}",
                short(&u.header.plan_id),
                u.header.round,
                short(&u.header.base_model_sha256),
                u.payload.len(),
                short(&u.sha256),
                u.header.masked,
                u.header.metrics.iter().map(|m| (&m.name, m.value)).collect::<Vec<_>>(),
                u.error.as_ref().map(|e| format!(" error: {e}")).unwrap_or_default()
            ),
            Sent::Evaluation(m) => format!(
                "plan {} model {} metrics={:?}",
                short(&m.plan_id),
                short(&m.model_sha256),
                m.metrics.iter().map(|m| (&m.name, m.value)).collect::<Vec<_>>()
            ),
            Sent::SecAgg(m) => format!(
                "plan {} round {} step {}",
                short(&m.plan_id),
                m.round,
                match &m.step {
                    Some(proto::sec_agg_message::Step::Keys(_)) => "keys",
                    Some(proto::sec_agg_message::Step::Shares(_)) => "shares",
                    Some(proto::sec_agg_message::Step::ConsistencySignature(_)) => "consistency signature",
                    Some(proto::sec_agg_message::Step::Unmask(_)) => "unmask",
                    None => "none",
                }
            ),
            Sent::Countersign(m) => {
                format!("plan {} round {} agrees={} reason={:?}", short(&m.plan_id), m.round, m.agrees, m.reason)
            }
        };
        out.push_str(&format!("  #{} {} {}: {what}\n", r.seq, r.node, r.message.call()));
    }
    if out.is_empty() {
        out.push_str("  (nothing)\n");
    }
    out
}

fn short(hex: &str) -> &str {
    hex.get(..12).unwrap_or(hex)
}

/// Directives as a coordinator would build them; every field not named is left at its default.
pub mod directives {
    use super::*;

    /// The plan id a node expects for `plan_toml`: the SHA-256 of its bytes.
    pub fn plan_id(plan_toml: &str) -> String {
        Plan::id_of(plan_toml).to_hex()
    }

    pub fn offer(plan_toml: &str, run: &str) -> Directive {
        Directive {
            kind: Some(directive::Kind::OfferPlan(proto::OfferPlan {
                plan_id: plan_id(plan_toml),
                plan_toml: plan_toml.to_string(),
                run: run.to_string(),
                ..Default::default()
            })),
        }
    }

    /// A round to train on `model`, due in ten minutes.
    pub fn start_round(plan_id: &str, run: &str, round: u32, model: &Model) -> Directive {
        Directive { kind: Some(directive::Kind::StartRound(start(plan_id, run, round, model))) }
    }

    /// A secure-aggregation round with the given setup.
    pub fn start_secagg_round(
        plan_id: &str,
        run: &str,
        round: u32,
        model: &Model,
        setup: proto::SecAggSetup,
    ) -> Directive {
        let mut s = start(plan_id, run, round, model);
        s.secure_aggregation = Some(setup);
        Directive { kind: Some(directive::Kind::StartRound(s)) }
    }

    fn start(plan_id: &str, run: &str, round: u32, model: &Model) -> proto::StartRound {
        let deadline = std::time::SystemTime::now() + Duration::from_secs(600);
        proto::StartRound {
            plan_id: plan_id.to_string(),
            round,
            model_sha256: model.sha256.clone(),
            model_bytes: model.bytes,
            deadline_unix_ms: deadline.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
            run: run.to_string(),
            ..Default::default()
        }
    }

    pub fn evaluate(plan_id: &str, run: &str, model: &Model) -> Directive {
        Directive {
            kind: Some(directive::Kind::Evaluate(proto::Evaluate {
                plan_id: plan_id.to_string(),
                model_sha256: model.sha256.clone(),
                model_bytes: model.bytes,
                run: run.to_string(),
                ..Default::default()
            })),
        }
    }

    pub fn plan_closed(plan_id: &str, run: &str, success: bool) -> Directive {
        Directive {
            kind: Some(directive::Kind::PlanClosed(proto::PlanClosed {
                plan_id: plan_id.to_string(),
                success,
                reason: if success { String::new() } else { "closed by the test".into() },
                run: run.to_string(),
                ..Default::default()
            })),
        }
    }

    pub fn secagg_step(step: proto::SecAggStep) -> Directive {
        Directive { kind: Some(directive::Kind::Secagg(step)) }
    }

    pub fn round_receipt(plan_id: &str, round: u32, record: &str) -> Directive {
        Directive {
            kind: Some(directive::Kind::RoundReceipt(proto::RoundReceipt {
                plan_id: plan_id.to_string(),
                round,
                record: record.to_string(),
                ..Default::default()
            })),
        }
    }
}

/// The `Federation` service: records, serves registered models, accepts everything.
struct RogueApi {
    shared: Arc<Shared>,
}

fn caller<T>(request: &Request<T>) -> Result<String, Status> {
    Ok(tls::peer(request)?.identity.name.clone())
}

#[tonic::async_trait]
impl federation_server::Federation for RogueApi {
    type SubscribeStream = UnboundedReceiverStream<Result<Directive, Status>>;
    type FetchModelStream = Pin<Box<dyn Stream<Item = Result<ModelChunk, Status>> + Send + 'static>>;

    async fn subscribe(&self, request: Request<SubscribeRequest>) -> Result<Response<Self::SubscribeStream>, Status> {
        let node = caller(&request)?;
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.shared.streams).insert(node.clone(), tx);
        self.shared.record(&node, Sent::Subscribe(request.into_inner()));
        Ok(Response::new(UnboundedReceiverStream::new(rx)))
    }

    async fn respond_to_plan(&self, request: Request<PlanResponse>) -> Result<Response<Ack>, Status> {
        let node = caller(&request)?;
        self.shared.record(&node, Sent::PlanResponse(request.into_inner()));
        Ok(Response::new(Ack {}))
    }

    async fn fetch_model(
        &self,
        request: Request<FetchModelRequest>,
    ) -> Result<Response<Self::FetchModelStream>, Status> {
        let node = caller(&request)?;
        let req = request.into_inner();
        let bytes = lock(&self.shared.models).get(&req.sha256).cloned();
        self.shared.record(&node, Sent::FetchModel(req.clone()));
        let bytes = bytes.ok_or_else(|| Status::not_found(format!("no model with hash {}", req.sha256)))?;
        let total = bytes.len() as u64;
        let chunks: Vec<Result<ModelChunk, Status>> = transfer::chunks(&bytes)
            .map(|(offset, data)| {
                Ok(ModelChunk { offset, data: data.to_vec(), total_bytes: total, ..Default::default() })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    async fn submit_update(&self, request: Request<Streaming<UpdateChunk>>) -> Result<Response<UpdateReceipt>, Status> {
        let node = caller(&request)?;
        let mut stream = request.into_inner();
        let header = match stream.message().await {
            Ok(Some(UpdateChunk { part: Some(update_chunk::Part::Header(h)) })) => h,
            other => {
                let why = format!("the first message of an upload must be its header, got {other:?}");
                return Err(Status::invalid_argument(why));
            }
        };
        let mut payload = Vec::new();
        let mut error = None;
        loop {
            match stream.message().await {
                Ok(Some(UpdateChunk { part: Some(update_chunk::Part::Data(d)) })) => payload.extend_from_slice(&d),
                Ok(Some(other)) => {
                    error = Some(format!("an upload carries one header, then only data; got {other:?}"));
                    break;
                }
                Ok(None) => break,
                Err(s) => {
                    error = Some(format!("upload stream broke: {}", s.message()));
                    break;
                }
            }
        }
        let mut hasher = Hasher::default();
        hasher.update(&payload);
        let sha256 = hasher.finish().to_hex();
        self.shared.record(&node, Sent::Update(Upload { header, payload, sha256, error }));
        Ok(Response::new(UpdateReceipt { accepted: true, ..Default::default() }))
    }

    async fn upload_status(
        &self,
        _request: Request<proto::UploadStatusRequest>,
    ) -> Result<Response<proto::UploadStatusResponse>, Status> {
        // Keeps no partial uploads: a node sends everything, as to a coordinator without resume.
        Err(Status::unimplemented("this coordinator does not resume uploads"))
    }

    async fn heartbeat(&self, _request: Request<proto::HeartbeatRequest>) -> Result<Response<Ack>, Status> {
        // Stub so the harness compiles with the Heartbeat rpc (added by the resume-transfer
        // helper; the straggler work may replace it with a recording one).
        Ok(Response::new(Ack {}))
    }

    async fn report_evaluation(&self, request: Request<EvaluationReport>) -> Result<Response<Ack>, Status> {
        let node = caller(&request)?;
        self.shared.record(&node, Sent::Evaluation(request.into_inner()));
        Ok(Response::new(Ack {}))
    }

    async fn sec_agg(&self, request: Request<SecAggMessage>) -> Result<Response<Ack>, Status> {
        let node = caller(&request)?;
        self.shared.record(&node, Sent::SecAgg(request.into_inner()));
        Ok(Response::new(Ack {}))
    }

    async fn countersign(&self, request: Request<Countersignature>) -> Result<Response<Ack>, Status> {
        let node = caller(&request)?;
        self.shared.record(&node, Sent::Countersign(request.into_inner()));
        Ok(Response::new(Ack {}))
    }
}
