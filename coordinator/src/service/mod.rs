//! The coordinator at run time: the gRPC services nodes and the lead call, and the driver task
//! that owns the plan state and turns the sans-IO [`PlanRun`]'s actions into messages and files.
//!
//! Handlers only decode, check what they can on their own, and hand events to the driver over a
//! channel; the driver is the one place plan state changes, so there are no lock-order puzzles.
//!
//! # Layout
//! - this file: the handle ([`Coordinator`]), the state the services share ([`Inner`]: connected
//!   nodes, the open rounds, run history, the audit log) and the events handlers send the driver;
//! - `start`: opening the state directory, the audit log and the store, and starting the driver;
//! - `inner`: what the services and the driver do with [`Inner`] (audit records, the node
//!   registry, events, decisions, receipts, refusals);
//! - `transport`: the listener and the gRPC server's settings;
//! - `federation`: the node-facing service, with its upload handlers and gates in `uploads`;
//!   `lead`: the lead's; `audit_api`: the auditor's;
//! - `revocation`: following the revocation list;
//! - `driver`: the task that runs the engine and carries out its effects (`driver/restore.rs`:
//!   what a restart resumes); `durable`: the store on its own thread; `supervise`: the driver
//!   task's end;
//! - `status_source`: what the status page and the metrics endpoint read (`crate::web::Source`);
//! - `bounds`: the bounds on strings a node chooses; `history`: the bounded event history;
//!   `quota`: how many audit records one member can cause per period.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sanctum_protocol::hash::ContentHash;
use sanctum_protocol::ids::{NodeName, PlanId, RunId};
use sanctum_protocol::plan::Plan;
use sanctum_protocol::proto::{self, Directive, EvaluationReport, PlanEvent, PlanResponse, SecAggMessage, plan_event};
use sanctum_protocol::tls::{self, TlsMaterial};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Status};

use sanctum_protocol::audit::{AuditEvent, AuditLog};

use crate::config::Limits;
use crate::runs::RunRegistry;
use crate::store::Store;

mod audit_api;
mod bounds;
mod driver;
mod durable;
mod federation;
mod history;
mod inner;
mod lead;
mod quota;
mod revocation;
mod start;
mod status_source;
mod supervise;
mod transport;
mod uploads;

use audit_api::AuditApi;
use driver::Driver;
use federation::FederationApi;
use history::History;
use lead::LeadApi;
pub use revocation::RevocationListError;
use revocation::follow_revocations;
pub use start::{StartError, StatusError};
pub use transport::ServeError;
use uploads::RoundInfo;

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
    /// The durable store (`[store]` in its config): SQLite in the state directory by default.
    pub store: crate::db::StoreConfig,
    /// The test hooks switched on (`main` reads them from the environment).
    #[cfg(feature = "fault-injection")]
    pub faults: crate::faults::FaultOptions,
}

/// A handle on a running coordinator; cheap to clone.
#[derive(Clone)]
pub struct Coordinator {
    inner: Arc<Inner>,
    /// The driver task's supervisor: `serve` stops with its reason if the driver ends.
    driver: supervise::DriverWatch,
}

struct Inner {
    /// The `[limits]` this coordinator was started with.
    limits: Limits,
    /// The test hooks switched on.
    #[cfg(feature = "fault-injection")]
    faults: crate::faults::FaultOptions,
    /// Handlers → driver. Bounded ([`EVENTS_QUEUE`]): a handler awaits room, so a flood of calls
    /// slows its callers instead of growing a queue (see [`Inner::notify_disconnected`] for the
    /// one sender that cannot await).
    events: mpsc::Sender<Event>,
    /// Open directive streams, one per connected node (a reconnect replaces the old one).
    nodes: Mutex<HashMap<NodeName, NodeConn>>,
    /// What each running plan's open round accepts, by plan id, so uploads are refused before
    /// they are spooled.
    rounds: RwLock<HashMap<PlanId, RoundInfo>>,
    /// Everything that happens to plans, keyed by run id, for `WatchPlan` and the simulator.
    plan_events: broadcast::Sender<(RunId, PlanEvent)>,
    /// The events of the runs this process started, by run id, in order, within
    /// `limits.events_per_run` and `limits.runs_in_memory`: a watcher that subscribes late (or
    /// right after submitting) first gets what it missed, and only its own run's. Publishing
    /// appends here and broadcasts under the same lock, so a watcher sees each event exactly once.
    history: Mutex<History>,
    /// Every run of every plan, kept in `state/runs.json` across restarts.
    runs: Mutex<RunRegistry>,
    /// The durable store (runs, rounds, checkpoints), on its own thread.
    db: durable::Durable,
    store: Store,
    next_conn: AtomicU64,
    /// The coordinator's signed, hash-chained audit log.
    audit: Mutex<AuditLog>,
    /// Records a member causes (rejected uploads, decisions, connects), itemised up to a quota
    /// per period and summarised beyond it ([`Inner::audit_member`]).
    audit_quota: Mutex<quota::AuditQuota>,
    /// Revoked certificates, refused at the handshake and on every call.
    revoked: Arc<tls::Revocations>,
    /// Every plan run since start, for auditors.
    plans: Mutex<Vec<proto::PlanSummary>>,
    /// Round records sent to nodes for countersigning, by (plan, round), and who has signed each.
    receipts: Mutex<crate::receipts::Awaiting>,
    /// Open `FetchModel` streams per node, at most `limits.fetch_streams_per_node` each; a node
    /// with none has no entry, so the map is bounded by the nodes streaming now.
    fetch_streams: Mutex<HashMap<NodeName, usize>>,
    /// Every node seen since start (version, device, last call), for `nodes list`. Keyed by
    /// certificate name and created only for callers past the node role guard, so bounded by the
    /// nodes the CA admitted; the durable store will persist it.
    seen: Mutex<HashMap<NodeName, crate::status::NodeSeen>>,
    /// Each node's heartbeat allowance (tokens, when last refilled): one a second on average
    /// reaches the driver, with a burst of [`HEARTBEAT_BURST`] so that a round's "uploading"
    /// and the next round's first heartbeat both pass; the rest are refused here without a
    /// queue slot. Which heartbeats count is the plan state machine's rule (one a second per
    /// participant and round). Keyed by certificate name past the node role guard, so bounded
    /// like `seen`.
    heartbeats: Mutex<HashMap<NodeName, (f64, std::time::Instant)>>,
    /// When each node's row was last written to the store (`node_hello`), so a reconnect loop
    /// cannot choose how often the store commits.
    node_rows: Mutex<quota::NodeRowWrites>,
    /// The Prometheus metrics and round times the status page shows (`crate::metrics`).
    metrics: crate::metrics::Metrics,
    /// Updates read back from their spool and decoded, waiting for or in the driver, at once:
    /// one per core. Each upload's handler reads and checks its own payload on a blocking
    /// thread, beside the others, and holds a slot until the driver has folded it, so at most
    /// this many decoded updates are alive whatever the number of nodes.
    decode_slots: Arc<tokio::sync::Semaphore>,
}

/// Room in the handlers → driver channel. The driver handles an event in microseconds (an
/// update's admission reads its spool, a few ms): 1024 is far more than a consortium's calls in
/// flight, and small enough that a flood waits in its handlers rather than in memory.
const EVENTS_QUEUE: usize = 1024;

/// Heartbeats a node may send at once before the one-a-second rate applies (the node keeps the
/// same bucket, so it does not send what would be refused here).
const HEARTBEAT_BURST: f64 = sanctum_protocol::HEARTBEAT_BURST;

struct NodeConn {
    /// Distinguishes a reconnect from the stream it replaced.
    id: u64,
    /// The node's certificate fingerprint, the actor of its audit records.
    fingerprint: String,
    tx: mpsc::Sender<Result<Directive, Status>>,
}

/// Why the driver did not take an upload or a secure-aggregation message: the handler answers
/// `FailedPrecondition` with it.
#[derive(Debug, thiserror::Error)]
enum NotTaken {
    #[error("{0}")]
    Refused(#[from] crate::engine::Refused),
}

enum Event {
    Connected {
        node: NodeName,
    },
    Disconnected {
        node: NodeName,
        conn: u64,
    },
    Submit {
        plan: Box<Plan>,
        /// A TorchScript plan's model file (empty otherwise).
        model_file: Vec<u8>,
        again: bool,
        actor: String,
        reply: oneshot::Sender<Result<Submitted, Status>>,
    },
    Decision {
        node: NodeName,
        response: PlanResponse,
    },
    Update {
        node: NodeName,
        update: Box<crate::engine::Update>,
        /// One of `Inner::decode_slots`, given back once the driver has taken the update.
        decode_slot: tokio::sync::OwnedSemaphorePermit,
        reply: oneshot::Sender<Result<(), NotTaken>>,
    },
    Evaluation {
        node: NodeName,
        report: EvaluationReport,
    },
    SecAgg {
        node: NodeName,
        cert_der: Arc<Vec<u8>>,
        msg: SecAggMessage,
        reply: oneshot::Sender<Result<(), NotTaken>>,
    },
    /// A participant's heartbeat (no reply: it is dropped when the queue is full).
    Heartbeat {
        node: NodeName,
        plan_id: PlanId,
        run: RunId,
        round: u32,
        activity: crate::round::Activity,
    },
    /// The process is stopping (SIGTERM or SIGINT): record it, and end every node's directive
    /// stream so the server can drain. Running runs stay running in the store and resume at the
    /// next start.
    Drain {
        signal: &'static str,
        reply: oneshot::Sender<()>,
    },
    /// The lead cancels `run`: it ends as failed, "cancelled by `lead`".
    Cancel {
        run: RunId,
        /// The lead's certificate name (in the reason) and fingerprint (the audit actor).
        lead: String,
        actor: String,
        reply: oneshot::Sender<Result<proto::CancelPlanResponse, Status>>,
    },
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave these maps half-updated; keep serving.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Coordinator {
    /// Submits a plan as the lead would (`again`: run a plan that already ran as a new run);
    /// returns the new run.
    pub async fn submit(&self, plan: Plan, again: bool) -> Result<Submitted, Status> {
        self.submit_with_model(plan, Vec::new(), again).await
    }

    /// [`Coordinator::submit`] with a TorchScript plan's model file.
    pub async fn submit_with_model(&self, plan: Plan, model_file: Vec<u8>, again: bool) -> Result<Submitted, Status> {
        let (reply, rx) = oneshot::channel();
        let actor = lock(&self.inner.audit).own_fingerprint().to_string();
        self.inner
            .events
            .send(Event::Submit { plan: Box::new(plan), model_file, again, actor, reply })
            .await
            .map_err(|_| Status::unavailable("coordinator is shutting down"))?;
        rx.await.map_err(|_| Status::unavailable("coordinator is shutting down"))?
    }

    /// Follows one run's events until it finishes.
    pub fn watch(&self, run: &RunId) -> impl Stream<Item = PlanEvent> + Send + 'static {
        watch_stream(&self.inner, run)
    }

    /// Tells the driver the process is stopping and waits until it has recorded it and closed
    /// every node's directive stream (see `Event::Drain`).
    pub async fn drain(&self, signal: &'static str) {
        let (reply, done) = oneshot::channel();
        if self.inner.events.send(Event::Drain { signal, reply }).await.is_ok() {
            let _ = done.await;
        }
    }

    /// Names of the nodes connected now.
    pub fn connected_nodes(&self) -> Vec<String> {
        let mut v: Vec<String> = lock(&self.inner.nodes).keys().map(NodeName::to_string).collect();
        v.sort();
        v
    }
}

/// A submission that started a run.
#[derive(Clone, Debug)]
pub struct Submitted {
    pub plan_id: PlanId,
    pub run: RunId,
    /// The run's number among the plan's runs (1 for the first).
    pub run_number: u32,
}

fn watch_stream(inner: &Arc<Inner>, run: &RunId) -> impl Stream<Item = PlanEvent> + Send + 'static {
    let (mut past, mut rx) = {
        let history = lock(&inner.history);
        (history.events(run), inner.plan_events.subscribe())
    };
    if past.is_empty() {
        // A run of an earlier process (finished, or resumed with nothing new yet): its events
        // from the store, within the same bound as the history's.
        let (id, limit) = (run.clone(), inner.limits.events_per_run);
        match inner.db.call(move |s| s.events(&id, 0, limit)) {
            Ok(stored) => {
                past = stored
                    .into_iter()
                    .filter_map(|(_, bytes)| <PlanEvent as sanctum_protocol::prost::Message>::decode(&bytes[..]).ok())
                    .collect();
            }
            Err(e) => tracing::error!("store: {e}; the watcher gets new events only"),
        }
    }
    let plan_id = run.clone();
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

/// The caller's name, from its verified certificate. The certificate's name was checked against
/// the same rule when it was read (`pki::identity_from_der`), so this refuses nothing TLS let in.
fn caller<T>(request: &Request<T>) -> Result<NodeName, Status> {
    NodeName::parse(&tls::peer(request)?.identity.name)
        .map_err(|e| Status::unauthenticated(format!("the certificate's name: {e}")))
}

/// The first 12 characters of a hash for messages and logs; never more, whatever the input (a
/// node's 2 MiB "plan id" shows as 12 characters).
fn short(hex: &str) -> &str {
    let end = hex.char_indices().nth(12).map_or(hex.len(), |(i, _)| i);
    &hex[..end]
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_never_shows_more_than_twelve_characters() {
        assert_eq!(short(&"ab".repeat(32)), "abababababab");
        assert_eq!(short("abc"), "abc");
        assert_eq!(short(&"é".repeat(1 << 20)).chars().count(), 12);
    }
}
