//! The coordinator at run time: the gRPC services nodes and the lead call, and the driver task
//! that owns the plan state and turns the sans-IO [`PlanRun`]'s actions into messages and files.
//!
//! Handlers only decode, check what they can on their own, and hand events to the driver over a
//! channel; the driver is the one place plan state changes, so there are no lock-order puzzles.
//!
//! # Layout
//! - this file: the handle ([`Coordinator`]), the state the services share ([`Inner`]: connected
//!   nodes, the open round, run history, the audit log) and the events handlers send the driver;
//! - `transport`: the listener and the gRPC server's settings;
//! - `federation`: the node-facing service; `lead`: the lead's; `audit_api`: the auditor's;
//! - `revocation`: following the revocation list;
//! - `driver`: the task that owns the running plan and applies the state machine's actions.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sanctum_protocol::hash::ContentHash;
use sanctum_protocol::plan::Plan;
use sanctum_protocol::proto::{self, Directive, EvaluationReport, PlanEvent, PlanResponse, SecAggMessage, plan_event};
use sanctum_protocol::tls::{self, TlsMaterial};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Status};

use sanctum_protocol::audit::AuditLog;
use serde_json::json;

use crate::config::Limits;
use crate::runs::{RunFile, RunRegistry};
use crate::store::Store;

mod audit_api;
mod driver;
mod federation;
mod lead;
mod revocation;
mod transport;

use audit_api::AuditApi;
use driver::Driver;
use federation::FederationApi;
use lead::LeadApi;
use revocation::follow_revocations;

/// Settings of a running coordinator.
#[derive(Clone, Debug)]
pub struct CoordinatorOptions {
    /// Where models, spooled uploads and exports live.
    pub state_dir: PathBuf,
    /// How long the final evaluation waits for nodes.
    pub evaluation_deadline: Duration,
    /// The revocation list to follow (`pki/revoked.json`), if any.
    pub revocation_list: Option<PathBuf>,
    /// Bounds on what one peer can make the coordinator hold (`[limits]` in its config).
    pub limits: Limits,
}

/// A handle on a running coordinator; cheap to clone.
#[derive(Clone)]
pub struct Coordinator {
    inner: Arc<Inner>,
}

struct Inner {
    /// The `[limits]` this coordinator was started with.
    limits: Limits,
    events: mpsc::UnboundedSender<Event>,
    /// Open directive streams, one per connected node (a reconnect replaces the old one).
    nodes: Mutex<HashMap<String, NodeConn>>,
    /// What the open round accepts, so uploads are refused before they are spooled.
    round: RwLock<Option<RoundInfo>>,
    /// Everything that happens to plans, keyed by run id, for `WatchPlan` and the simulator.
    plan_events: broadcast::Sender<(String, PlanEvent)>,
    /// Every event of every run this process started, by run id, in order: a watcher that
    /// subscribes late (or right after submitting) first gets what it missed, and only its own
    /// run's. Publishing appends here and broadcasts under the same lock, so a watcher sees each
    /// event exactly once.
    history: Mutex<HashMap<String, Vec<PlanEvent>>>,
    /// Every run of every plan, kept in `state/runs.json` across restarts.
    runs: Mutex<RunRegistry>,
    runs_file: RunFile,
    store: Store,
    next_conn: AtomicU64,
    /// The coordinator's signed, hash-chained audit log.
    audit: Mutex<AuditLog>,
    /// Revoked certificates, refused at the handshake and on every call.
    revoked: Arc<tls::Revocations>,
    /// Every plan run since start, for auditors.
    plans: Mutex<Vec<proto::PlanSummary>>,
    /// Round records sent to nodes for countersigning, by (plan, round): the exact audit line.
    receipts: Mutex<HashMap<(String, u32), String>>,
}

struct NodeConn {
    /// Distinguishes a reconnect from the stream it replaced.
    id: u64,
    /// The node's certificate fingerprint, the actor of its audit records.
    fingerprint: String,
    tx: mpsc::Sender<Result<Directive, Status>>,
}

#[derive(Clone, Debug)]
struct RoundInfo {
    plan_id: String,
    round: u32,
    model: ContentHash,
    num_params: usize,
    /// Uploads are masked secure-aggregation inputs (num_params + 1 u32 words).
    masked: bool,
}

/// A header that passed the handler's checks, and where its payload was spooled.
struct SpooledUpdate {
    round: u32,
    plan_id: String,
    base_model: String,
    sample_count: u64,
    metrics: Vec<proto::Metric>,
    masked: bool,
    payload_sha256: String,
    bytes: u64,
    spool: tempfile::NamedTempFile,
}

enum Event {
    Connected { node: String },
    Disconnected { node: String, conn: u64 },
    Submit { plan: Box<Plan>, again: bool, actor: String, reply: oneshot::Sender<Result<Submitted, Status>> },
    Decision { node: String, response: PlanResponse },
    Update { node: String, update: SpooledUpdate, reply: oneshot::Sender<Result<(), String>> },
    Evaluation { node: String, report: EvaluationReport },
    SecAgg { node: String, cert_der: Arc<Vec<u8>>, msg: SecAggMessage, reply: oneshot::Sender<Result<(), String>> },
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave these maps half-updated; keep serving.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Coordinator {
    /// Opens the state directory and the audit log (signed with a key bound to `material`'s
    /// certificate) and starts the driver task.
    pub fn start(options: CoordinatorOptions, material: &TlsMaterial) -> anyhow::Result<Self> {
        let store = Store::open(&options.state_dir)?;
        let audit = AuditLog::open_for(&options.state_dir.join("audit"), material)?;
        let (events, rx) = mpsc::unbounded_channel();
        let (plan_events, _) = broadcast::channel(1024);
        let runs_file = RunFile::new(&options.state_dir);
        let runs = runs_file.load()?;
        let inner = Arc::new(Inner {
            limits: options.limits.clone(),
            events,
            nodes: Mutex::new(HashMap::new()),
            round: RwLock::new(None),
            plan_events,
            history: Mutex::new(HashMap::new()),
            runs: Mutex::new(runs),
            runs_file,
            store,
            next_conn: AtomicU64::new(1),
            audit: Mutex::new(audit),
            revoked: Arc::new(tls::Revocations::default()),
            plans: Mutex::new(Vec::new()),
            receipts: Mutex::new(HashMap::new()),
        });
        if let Some(path) = options.revocation_list.clone() {
            // Read once now (a bad list stops the start), then follow it.
            let text = std::fs::read_to_string(&path).unwrap_or_else(|_| "[]".into());
            let list: Vec<tls::RevokedCert> = serde_json::from_str(&text)
                .map_err(|e| anyhow::anyhow!("revocation list {} is not valid JSON: {e}", path.display()))?;
            inner.apply_revocations(list);
            tokio::spawn(follow_revocations(inner.clone(), path, text));
        }
        let driver = Driver::new(inner.clone(), options.evaluation_deadline);
        tokio::spawn(driver.run(rx));
        Ok(Self { inner })
    }

    /// Submits a plan as the lead would (`again`: run a plan that already ran as a new run);
    /// returns the new run.
    pub async fn submit(&self, plan: Plan, again: bool) -> Result<Submitted, Status> {
        let (reply, rx) = oneshot::channel();
        let actor = lock(&self.inner.audit).own_fingerprint().to_string();
        self.inner
            .events
            .send(Event::Submit { plan: Box::new(plan), again, actor, reply })
            .map_err(|_| Status::unavailable("coordinator is shutting down"))?;
        rx.await.map_err(|_| Status::unavailable("coordinator is shutting down"))?
    }

    /// Follows one run's events until it finishes.
    pub fn watch(&self, run: &str) -> impl Stream<Item = PlanEvent> + Send + 'static {
        watch_stream(&self.inner, run)
    }

    /// Names of the nodes connected now.
    pub fn connected_nodes(&self) -> Vec<String> {
        let mut v: Vec<String> = lock(&self.inner.nodes).keys().cloned().collect();
        v.sort();
        v
    }
}

/// A submission that started a run.
#[derive(Clone, Debug)]
pub struct Submitted {
    pub plan_id: String,
    pub run: String,
    /// The run's number among the plan's runs (1 for the first).
    pub run_number: u32,
}

fn watch_stream(inner: &Arc<Inner>, run: &str) -> impl Stream<Item = PlanEvent> + Send + 'static {
    let (past, mut rx) = {
        let history = lock(&inner.history);
        (history.get(run).cloned().unwrap_or_default(), inner.plan_events.subscribe())
    };
    let plan_id = run.to_string();
    let (tx, out) = mpsc::channel(256);
    tokio::spawn(async move {
        for ev in past {
            let last = matches!(ev.kind, Some(plan_event::Kind::PlanFinished(_)));
            if tx.send(ev).await.is_err() || last {
                return;
            }
        }
        loop {
            match rx.recv().await {
                Ok((id, ev)) if id == plan_id => {
                    let last = matches!(ev.kind, Some(plan_event::Kind::PlanFinished(_)));
                    if tx.send(ev).await.is_err() || last {
                        return;
                    }
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!("a plan watcher fell behind and missed {n} events");
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    ReceiverStream::new(out)
}

impl Inner {
    /// Appends an audit record; a failure to write it is logged loudly (the record is lost, the
    /// service goes on).
    fn audit<const N: usize>(&self, actor: &str, event: &str, params: [(&str, serde_json::Value); N]) {
        let params = params.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        if let Err(e) = lock(&self.audit).append(actor, event, params) {
            tracing::error!("audit log: {e}");
        }
    }

    /// The certificate fingerprint of a connected node (its audit actor).
    fn fingerprint(&self, node: &str) -> String {
        lock(&self.nodes).get(node).map(|c| c.fingerprint.clone()).unwrap_or_else(|| format!("node:{node}"))
    }

    fn send_event(&self, ev: Event) {
        // Only fails when the driver is gone, i.e. during shutdown.
        let _ = self.events.send(ev);
    }

    fn publish(&self, plan_id: &str, kind: plan_event::Kind) {
        // One plan runs at a time, so a plan's events belong to its latest run.
        let Some(run) = lock(&self.runs).latest(plan_id).map(str::to_string) else {
            return;
        };
        // What the lead is told about rounds and the plan's end is also what the audit keeps.
        let own = lock(&self.audit).own_fingerprint().to_string();
        match &kind {
            plan_event::Kind::RoundClosed(r) => {
                if let Some(p) = lock(&self.plans).iter_mut().find(|p| p.run == run) {
                    p.rounds_completed = r.round;
                    p.rounds.push(r.clone());
                }
                self.audit(
                    &own,
                    "round_closed",
                    [
                        ("plan_id", json!(plan_id)),
                        ("run", json!(run)),
                        ("round", json!(r.round)),
                        ("reported", json!(r.reported)),
                        ("dropped", json!(r.dropped)),
                    ],
                );
                self.audit(
                    &own,
                    "aggregate_released",
                    [
                        ("plan_id", json!(plan_id)),
                        ("round", json!(r.round)),
                        ("model_sha256", json!(r.new_model_sha256)),
                        ("contributors", json!(r.reported.len())),
                    ],
                );
            }
            plan_event::Kind::PlanFinished(f) => {
                if let Some(p) = lock(&self.plans).iter_mut().find(|p| p.run == run) {
                    p.status = if f.success { "succeeded" } else { "failed" }.into();
                    p.rounds_completed = f.rounds_completed;
                    p.final_model_sha256 = f.final_model_sha256.clone();
                    p.reason = f.reason.clone();
                }
                if !f.model_path.is_empty() {
                    self.audit(
                        &own,
                        "model_exported",
                        [
                            ("plan_id", json!(plan_id)),
                            ("model_sha256", json!(f.final_model_sha256)),
                            ("path", json!(f.model_path)),
                        ],
                    );
                }
                self.audit(
                    &own,
                    "plan_finished",
                    [
                        ("plan_id", json!(plan_id)),
                        ("run", json!(run)),
                        ("success", json!(f.success)),
                        ("reason", json!(f.reason)),
                        ("rounds_completed", json!(f.rounds_completed)),
                        ("final_model_sha256", json!(f.final_model_sha256)),
                        ("client_epsilon", json!(f.client_epsilon)),
                        ("client_delta", json!(f.client_delta)),
                    ],
                );
            }
            _ => {}
        }
        let ev = PlanEvent { kind: Some(kind) };
        let mut history = lock(&self.history);
        history.entry(run.clone()).or_default().push(ev.clone());
        let _ = self.plan_events.send((run, ev));
    }

    /// Logs and publishes a refused update, and returns the status for the node.
    fn reject(&self, node: &str, plan_id: &str, round: u32, status: Status) -> Status {
        tracing::warn!(node, round, "rejected update: {}", status.message());
        self.audit(
            &self.fingerprint(node),
            "update_rejected",
            [
                ("node", json!(node)),
                ("plan_id", json!(plan_id)),
                ("round", json!(round)),
                ("reason", json!(status.message())),
            ],
        );
        // An upload that never named its plan has no watcher to tell.
        if plan_id.is_empty() {
            return status;
        }
        self.publish(
            plan_id,
            plan_event::Kind::UpdateRejected(proto::UpdateRejected {
                round,
                node: node.to_string(),
                reason: status.message().to_string(),
            }),
        );
        status
    }
}

fn caller<T>(request: &Request<T>) -> Result<String, Status> {
    Ok(tls::peer(request)?.identity.name.clone())
}

fn short(hex: &str) -> &str {
    hex.get(..12).unwrap_or(hex)
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
