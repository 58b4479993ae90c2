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
//! - `driver`: the task that owns the running plan and applies the state machine's actions;
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
mod lead;
mod quota;
mod revocation;
mod supervise;
mod transport;

use audit_api::AuditApi;
use driver::Driver;
use federation::FederationApi;
use history::History;
use lead::LeadApi;
pub use revocation::RevocationListError;
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
}

/// Room in the handlers → driver channel. The driver handles an event in microseconds (an
/// update's admission reads its spool, a few ms): 1024 is far more than a consortium's calls in
/// flight, and small enough that a flood waits in its handlers rather than in memory.
const EVENTS_QUEUE: usize = 1024;

/// Heartbeats a node may send at once before the one-a-second rate applies.
const HEARTBEAT_BURST: f64 = 4.0;

struct NodeConn {
    /// Distinguishes a reconnect from the stream it replaced.
    id: u64,
    /// The node's certificate fingerprint, the actor of its audit records.
    fingerprint: String,
    tx: mpsc::Sender<Result<Directive, Status>>,
}

#[derive(Clone, Debug)]
struct RoundInfo {
    plan_id: PlanId,
    run_id: RunId,
    round: u32,
    /// The attempt at `round` (a retry reopens the same round number): an upload of a failed
    /// attempt does not run on into the retry, and each attempt's partial uploads are its own.
    attempt: u32,
    model: ContentHash,
    num_params: usize,
    /// Uploads are masked secure-aggregation inputs (num_params + 1 u32 words).
    masked: bool,
    /// The nodes the round opened with: only they may upload.
    participants: Arc<BTreeSet<NodeName>>,
    /// Who is uploading now and whose update was admitted, shared by every handler of this round
    /// (a clone of the `RoundInfo` holds the same slots); a new round gets fresh ones.
    uploads: Arc<Mutex<RoundUploads>>,
}

/// The open round's upload slots: at most one upload per participant is spooled at a time, and
/// none after its update was admitted. [`PlanRun::admit_update`](crate::round::PlanRun) stays the
/// authority on admission; this is what lets a handler refuse before it spools a byte.
#[derive(Debug, Default)]
struct RoundUploads {
    /// Each uploading participant, with the signal that tells its handler a newer upload of the
    /// same node arrived (the old stream may be half-open: a node that rebooted or lost its
    /// network leaves no FIN behind, and would otherwise hold its slot until the idle timeout).
    in_flight: HashMap<NodeName, Arc<tokio::sync::Notify>>,
    admitted: HashSet<NodeName>,
    /// Removes the round's partial uploads once the round is gone (the driver dropped its
    /// `RoundInfo` and no handler holds a clone): set by the first upload of the round.
    partials: Option<crate::store::PartialSweep>,
}

impl RoundInfo {
    /// The round a driver opened with these participants, with no upload yet.
    fn new(u: crate::engine::UploadRound) -> Self {
        Self {
            plan_id: u.plan_id,
            run_id: u.run_id,
            round: u.round,
            attempt: u.attempt,
            model: u.model,
            num_params: u.num_params,
            masked: u.masked,
            participants: Arc::new(u.participants),
            uploads: Arc::default(),
        }
    }

    /// Whose partial upload of this opening `node`'s payload is.
    fn partial_key(&self, node: &NodeName, payload: ContentHash) -> crate::store::PartialKey {
        crate::store::PartialKey {
            node: node.to_string(),
            plan_id: self.plan_id.to_string(),
            run: self.run_id.to_string(),
            round: self.round,
            attempt: self.attempt,
            payload,
        }
    }

    /// Whether `other` is this same opening of the round (not a retry that reopened its number).
    fn same_opening(&self, other: &RoundInfo) -> bool {
        self.round == other.round && self.attempt == other.attempt && Arc::ptr_eq(&self.uploads, &other.uploads)
    }

    /// Takes `node`'s upload slot, or says why it may not upload now: not a participant, its
    /// update already admitted, or another of its uploads in flight. In the last case the older
    /// upload is told to stop (it keeps its partial file, so the node resumes from it) and the
    /// caller is answered `Unavailable`, which a node retries shortly.
    fn claim(&self, node: &NodeName) -> Result<UploadSlot, Status> {
        if !self.participants.contains(node) {
            return Err(Status::permission_denied(format!(
                "'{node}' is not a participant of round {} (it opened with {} nodes)",
                self.round,
                self.participants.len()
            )));
        }
        let mut uploads = lock(&self.uploads);
        if uploads.admitted.contains(node) {
            return Err(Status::already_exists(format!(
                "'{node}' already had an update admitted in round {}",
                self.round
            )));
        }
        if let Some(older) = uploads.in_flight.get(node) {
            // A stored permit: the older handler sees it even if it is not waiting right now.
            older.notify_one();
            return Err(Status::unavailable(format!(
                "an earlier upload from '{node}' for round {} was still open here; it is being closed and keeps what \
                 it acknowledged: retry in a moment to resume from there",
                self.round
            )));
        }
        let superseded = Arc::new(tokio::sync::Notify::new());
        uploads.in_flight.insert(node.clone(), Arc::clone(&superseded));
        Ok(UploadSlot { uploads: Arc::clone(&self.uploads), node: node.clone(), superseded })
    }

    /// Partial uploads of this round are removed from `store` when the round closes.
    fn sweep_partials_on_close(&self, store: &crate::store::Store) {
        let mut uploads = lock(&self.uploads);
        if uploads.partials.is_none() {
            uploads.partials = Some(store.sweep_on_close(&self.plan_id, &self.run_id, self.round, self.attempt));
        }
    }

    /// The driver admitted `node`'s update: no further upload of its is spooled this round. The
    /// driver records it (not the handler), so an upload whose caller went away while its update
    /// was being admitted still counts.
    fn admitted(&self, node: &NodeName) {
        lock(&self.uploads).admitted.insert(node.clone());
    }
}

/// A participant's upload in progress; dropping it frees the slot, whether the upload failed,
/// timed out, went away or was admitted (then [`RoundInfo::admitted`] keeps the node out).
struct UploadSlot {
    uploads: Arc<Mutex<RoundUploads>>,
    node: NodeName,
    /// Notified when a newer upload of the same node arrives: this one should stop.
    superseded: Arc<tokio::sync::Notify>,
}

impl UploadSlot {
    /// Resolves once a newer upload of the same node asked this one to stop.
    async fn superseded(&self) {
        self.superseded.notified().await;
    }
}

impl Drop for UploadSlot {
    fn drop(&mut self) {
        let mut uploads = lock(&self.uploads);
        if uploads.in_flight.get(&self.node).is_some_and(|n| Arc::ptr_eq(n, &self.superseded)) {
            uploads.in_flight.remove(&self.node);
        }
    }
}

/// Why the driver did not take an upload or a secure-aggregation message: the handler answers
/// `FailedPrecondition` with it.
#[derive(Debug, thiserror::Error)]
enum NotTaken {
    #[error("spool: {0}")]
    Spool(std::io::Error),
    #[error("{0}")]
    Refused(#[from] crate::engine::Refused),
}

/// A header that passed the handler's checks, and where its payload was spooled.
struct SpooledUpdate {
    round: u32,
    /// The attempt at the round the upload was made in: a failed attempt's upload is not
    /// admitted into the retry, even when it completed while the retry opened.
    attempt: u32,
    plan_id: PlanId,
    base_model: String,
    sample_count: u64,
    metrics: Vec<proto::Metric>,
    masked: bool,
    payload_sha256: String,
    bytes: u64,
    spool: tempfile::NamedTempFile,
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
        update: SpooledUpdate,
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
    /// Opens the state directory and the audit log (signed with a key bound to `material`'s
    /// certificate) and starts the driver task.
    pub fn start(options: CoordinatorOptions, material: &TlsMaterial) -> anyhow::Result<Self> {
        // A configured revocation list that cannot be read or parsed stops the start, before
        // anything is opened: running without it would admit every revoked certificate.
        let revocations = match &options.revocation_list {
            Some(path) => {
                let (text, list) = revocation::load(path)?;
                Some((path.clone(), text, list))
            }
            None => None,
        };
        let store = Store::open(&options.state_dir)?;
        let audit = AuditLog::open_for(&options.state_dir.join("audit"), material)?;
        let (events, rx) = mpsc::channel(EVENTS_QUEUE);
        let (plan_events, _) = broadcast::channel(1024);
        let db = durable::Durable::open(&options.store, &options.state_dir)?;
        let rows = db.call(|s| s.runs())?;
        let runs = RunRegistry::from_rows(&rows);
        // Every node seen before this start, for `nodes list` (not connected until it calls).
        let seen: HashMap<NodeName, crate::status::NodeSeen> = db
            .call(|s| s.nodes())?
            .into_iter()
            .map(|n| {
                let s =
                    crate::status::NodeSeen { version: n.version, device: n.device, last_seen_unix_ms: n.last_seen_ms };
                (n.name, s)
            })
            .collect();
        let mut plans = Vec::new();
        for row in &rows {
            let run_id = row.run_id.clone();
            let rounds = db.call(move |s| s.rounds(&run_id))?;
            plans.push(proto::PlanSummary {
                plan_id: row.plan_id.to_string(),
                run: row.run_id.to_string(),
                run_number: row.number,
                name: row.name.clone(),
                status: row.status.as_str().into(),
                rounds_planned: row.rounds_planned,
                rounds_completed: rounds.last().map_or(0, |r| r.round),
                final_model_sha256: row.final_model.clone().unwrap_or_default(),
                reason: row.reason.clone(),
                started_unix_ms: row.submitted_ms,
                finished_unix_ms: row.finished_ms.unwrap_or(0),
                ..Default::default()
            });
        }
        let inner = Arc::new(Inner {
            limits: options.limits.clone(),
            #[cfg(feature = "fault-injection")]
            faults: options.faults.clone(),
            events,
            nodes: Mutex::new(HashMap::new()),
            rounds: RwLock::new(HashMap::new()),
            plan_events,
            history: Mutex::new(History::new(options.limits.events_per_run, options.limits.runs_in_memory)),
            runs: Mutex::new(runs),
            db,
            store,
            next_conn: AtomicU64::new(1),
            audit: Mutex::new(audit),
            audit_quota: Mutex::new(quota::AuditQuota::new(Duration::from_secs(options.limits.refusal_report_secs))),
            revoked: Arc::new(tls::Revocations::default()),
            plans: Mutex::new(plans),
            receipts: Mutex::new(crate::receipts::Awaiting::default()),
            fetch_streams: Mutex::new(HashMap::new()),
            seen: Mutex::new(seen),
            heartbeats: Mutex::new(HashMap::new()),
        });
        if let Some((path, text, list)) = revocations {
            inner.apply_revocations(list);
            tokio::spawn(follow_revocations(inner.clone(), path, text));
        }
        let driver = Driver::new(inner.clone(), options.evaluation_deadline);
        let driver = supervise::supervise(tokio::spawn(driver.run(rx)));
        Ok(Self { inner, driver })
    }

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

impl Inner {
    /// Appends an audit record; a failure to write it is logged loudly (the record is lost, the
    /// service goes on).
    fn audit(&self, actor: &str, event: AuditEvent) {
        if let Err(e) = lock(&self.audit).append_event(actor, &event) {
            tracing::error!("audit log: {e}");
        }
    }

    /// Appends an audit record that member `node` caused, if it is within the quota of its
    /// (node, event) this period ([`quota::ITEMISED_PER_PERIOD`]); beyond it the record is only
    /// counted, and [`Inner::flush_audit_quota`] writes one summary when the period ends. Returns
    /// whether it was written (callers log only what they audit, so the log is bounded too).
    fn audit_member(&self, node: &str, actor: &str, event: AuditEvent) -> bool {
        // The quota counts per kind; members only cause kinds this version writes.
        let kind = sanctum_protocol::audit::KNOWN_EVENTS.iter().copied().find(|k| *k == event.name());
        let now = std::time::Instant::now();
        let itemise = lock(&self.audit_quota).admit(node, kind.unwrap_or("unknown"), now);
        self.flush_audit_quota(now);
        if itemise && let Err(e) = lock(&self.audit).append_event(actor, &event) {
            tracing::error!("audit log: {e}");
        }
        itemise
    }

    /// Writes the summaries of a period that has ended: one `audit_records_suppressed` record per
    /// (node, event) that had records counted but not written. Called with each member record and
    /// from the driver's tick, so a summary comes within a period of the flood's end.
    fn flush_audit_quota(&self, now: std::time::Instant) {
        let (due, period) = {
            let mut q = lock(&self.audit_quota);
            (q.take_due(now), q.period())
        };
        if due.is_empty() {
            return;
        }
        let own = lock(&self.audit).own_fingerprint().to_string();
        for s in due {
            tracing::warn!(
                node = s.node,
                event = s.event,
                suppressed = s.count,
                "a member caused more audit records than the quota allows; the rest were counted"
            );
            self.audit(
                &own,
                AuditEvent::AuditRecordsSuppressed {
                    node: s.node.to_string(),
                    event: s.event.to_string(),
                    suppressed: s.count,
                    itemised: u64::from(s.itemised),
                    period_secs: period.as_secs(),
                },
            );
        }
    }

    /// Whether `plan_id` is the plan running now (its latest run has not finished): only then do
    /// member-caused events (a rejected update) reach its watchers and history.
    fn is_running(&self, plan_id: &str) -> bool {
        lock(&self.plans).iter().rev().find(|p| p.plan_id == plan_id).is_some_and(|p| p.status == "running")
    }

    /// A call from node `node` passed the role guard: it was seen now. One lock and, after its
    /// first call, no allocation.
    fn node_called(&self, node: &NodeName) {
        let now = unix_ms(SystemTime::now());
        let mut seen = lock(&self.seen);
        match seen.get_mut(node) {
            Some(s) => s.last_seen_unix_ms = now,
            None => {
                seen.insert(node.clone(), crate::status::NodeSeen { last_seen_unix_ms: now, ..Default::default() });
            }
        }
    }

    /// What a node said of itself at `Subscribe` (already bounded by `bounds::label`).
    fn node_hello(&self, node: &NodeName, version: &str, device: &str) {
        let now = unix_ms(SystemTime::now());
        {
            let mut seen = lock(&self.seen);
            let s = seen.entry(node.clone()).or_default();
            (s.version, s.device, s.last_seen_unix_ms) = (version.to_string(), device.to_string(), now);
        }
        // Kept in the store at each connection (not at each call), so `nodes list` knows every
        // node ever seen across restarts.
        let row = crate::db::NodeRow {
            name: node.clone(),
            fingerprint: self.fingerprint(node),
            version: version.to_string(),
            device: device.to_string(),
            first_seen_ms: now,
            last_seen_ms: now,
        };
        if let Err(e) = self.db.call(move |s| s.upsert_node(&row)) {
            tracing::error!("store: {e}; the node is remembered until the next restart only");
        }
    }

    /// The certificate fingerprint of a connected node (its audit actor).
    fn fingerprint(&self, node: &str) -> String {
        lock(&self.nodes).get(node).map(|c| c.fingerprint.clone()).unwrap_or_else(|| format!("node:{node}"))
    }

    /// Hands an event to the driver, waiting for room in its queue (backpressure on the caller);
    /// fails only when the driver is gone, i.e. during shutdown.
    async fn send_event(&self, ev: Event) -> Result<(), Status> {
        self.events.send(ev).await.map_err(|_| Status::unavailable("coordinator is shutting down"))
    }

    /// Tells the driver a directive stream ended, from code that cannot await (a `Drop`). A
    /// disconnect is never lost: when the queue is full, a task waits for room and sends it.
    /// Those tasks are bounded too: each directive stream sends its disconnect once, and the
    /// streams open at once are bounded by `limits.max_connections` × `max_concurrent_streams`
    /// (and a node's reconnect ends its previous stream).
    fn notify_disconnected(events: &mpsc::Sender<Event>, node: NodeName, conn: u64) {
        match events.try_send(Event::Disconnected { node, conn }) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(ev)) => {
                let events = events.clone();
                match tokio::runtime::Handle::try_current() {
                    Ok(rt) => {
                        rt.spawn(async move {
                            let _ = events.send(ev).await;
                        });
                    }
                    // No runtime: the process is shutting down and the driver with it.
                    Err(_) => tracing::debug!("disconnect not delivered: no runtime (shutting down)"),
                }
            }
        }
    }

    fn publish(&self, plan_id: &PlanId, kind: plan_event::Kind) {
        // A plan has at most one run going on, so a plan's events belong to its latest run.
        let Some(run) = lock(&self.runs).latest(plan_id).cloned() else {
            return;
        };
        self.publish_run(plan_id, &run, kind);
    }

    /// Publishes an event of run `run` of plan `plan_id` to its watchers and history; what the lead
    /// is told about rounds and the plan's end is also what the audit log keeps.
    fn publish_run(&self, plan_id: &PlanId, run: &RunId, kind: plan_event::Kind) {
        let run = run.clone();
        let own = lock(&self.audit).own_fingerprint().to_string();
        match &kind {
            plan_event::Kind::RoundClosed(r) => {
                if let Some(p) = lock(&self.plans).iter_mut().find(|p| p.run == run) {
                    p.rounds_completed = r.round;
                    p.rounds.push(r.clone());
                }
                self.audit(
                    &own,
                    AuditEvent::RoundClosed {
                        plan_id: plan_id.to_string(),
                        run: Some(run.to_string()),
                        round: u64::from(r.round),
                        reported: r.reported.clone(),
                        dropped: r.dropped.clone(),
                    },
                );
                self.audit(
                    &own,
                    AuditEvent::AggregateReleased {
                        plan_id: plan_id.to_string(),
                        round: u64::from(r.round),
                        model_sha256: r.new_model_sha256.clone(),
                        contributors: r.reported.len() as u64,
                    },
                );
            }
            plan_event::Kind::PlanFinished(f) => {
                if let Some(p) = lock(&self.plans).iter_mut().find(|p| p.run == run) {
                    p.status = if f.success { "succeeded" } else { "failed" }.into();
                    p.finished_unix_ms = unix_ms(SystemTime::now());
                    p.rounds_completed = f.rounds_completed;
                    p.final_model_sha256 = f.final_model_sha256.clone();
                    p.reason = f.reason.clone();
                }
                if !f.model_path.is_empty() {
                    self.audit(
                        &own,
                        AuditEvent::ModelExported {
                            plan_id: plan_id.to_string(),
                            model_sha256: f.final_model_sha256.clone(),
                            path: f.model_path.clone(),
                        },
                    );
                }
                self.audit(
                    &own,
                    AuditEvent::PlanFinished {
                        plan_id: plan_id.to_string(),
                        run: Some(run.to_string()),
                        success: f.success,
                        reason: f.reason.clone(),
                        rounds_completed: f.rounds_completed,
                        final_model_sha256: f.final_model_sha256.clone(),
                        client_epsilon: f.client_epsilon,
                        client_delta: f.client_delta,
                    },
                );
            }
            _ => {}
        }
        if let plan_event::Kind::NodeDecision(d) = &kind {
            self.record_decision(&run, d);
        }
        let ev = PlanEvent { kind: Some(kind) };
        let mut history = lock(&self.history);
        // What the history refuses as junk (events after the run's end, a node's rejected updates
        // beyond its quota) is not broadcast either: live and late watchers see the same run.
        if history.push(&run, ev.clone()) {
            // Kept in the store too, so a watcher after a restart sees the run from its start;
            // not a node's rejected uploads, which a node can cause at will (they are in the audit
            // log, within its quota): what the store keeps grows with rounds and nodes only.
            let rejected = matches!(ev.kind, Some(plan_event::Kind::UpdateRejected(_)));
            let (id, bytes) = (run.clone(), sanctum_protocol::prost::Message::encode_to_vec(&ev));
            if !rejected && let Err(e) = self.db.call(move |s| s.append_event(&id, &bytes)) {
                tracing::error!("store: {e}; the event is kept in memory only");
            }
            let _ = self.plan_events.send((run, ev));
        }
    }

    /// A node's counted answer to a run's offer, kept in the store (the latest per node wins;
    /// earlier answers stay as history).
    fn record_decision(&self, run: &RunId, d: &proto::NodeDecision) {
        let finite = |x: f64| (x.is_finite() && x >= 0.0).then_some(x);
        // The engine wrote the event from the node's `NodeName`: it parses back.
        let Ok(node) = NodeName::parse(&d.node) else {
            tracing::error!("decision of a node whose name is not a certificate name; not stored");
            return;
        };
        let row = crate::db::DecisionRow {
            run_id: run.clone(),
            node,
            accept: d.accepted,
            reason: bounds::clip_bytes(&d.reason, bounds::REASON_BYTES).into_owned(),
            epsilon: d.privacy.as_ref().and_then(|p| finite(p.epsilon)),
            delta: d.privacy.as_ref().and_then(|p| finite(p.delta)),
            at_ms: unix_ms(SystemTime::now()),
        };
        if let Err(e) = self.db.call(move |s| s.record_decision(&row)) {
            tracing::error!("store: {e}; the decision is in the audit log only");
        }
    }

    /// A countersignature the coordinator took, kept in the store beside its round.
    fn record_receipt(&self, accepted: &crate::receipts::Accepted) {
        // The run whose record was countersigned (a late receipt of an earlier run's round is
        // that run's, not the plan's latest). Both ids were this coordinator's own (the run) and
        // the verified certificate's (the node), so they parse.
        let (Ok(run_id), Ok(node)) = (RunId::parse(&accepted.run), NodeName::parse(&accepted.node)) else {
            tracing::error!("receipt of a run or node whose id is not of its form; not stored");
            return;
        };
        let row = crate::db::ReceiptRow {
            run_id,
            round: accepted.round,
            node,
            agrees: accepted.agrees,
            reason: bounds::clip_bytes(&accepted.reason, bounds::REASON_BYTES).into_owned(),
            signature: accepted.signature.clone(),
            at_ms: unix_ms(SystemTime::now()),
        };
        if let Err(e) = self.db.call(move |s| s.record_receipt(&row)) {
            tracing::error!("store: {e}; the receipt is in the audit log only");
        }
    }

    /// Logs and publishes a refused update, and returns the status for the node. `plan_id` is a
    /// plan id (64 hex) or empty: a header whose plan id is not one is rejected with "" so the
    /// node's string never reaches the log; the reason is bounded ([`bounds::REASON_BYTES`]).
    fn reject(&self, node: &str, plan_id: &str, round: u32, status: Status) -> Status {
        let plan_id = if bounds::is_sha256_hex(plan_id) { plan_id } else { "" };
        let reason = bounds::clip_bytes(status.message(), bounds::REASON_BYTES);
        // Itemised within the node's quota, counted beyond it (a loop of bad headers must not
        // choose how fast the audit log and the log grow).
        let itemised = self.audit_member(
            node,
            &self.fingerprint(node),
            AuditEvent::UpdateRejected {
                node: node.to_string(),
                plan_id: plan_id.to_string(),
                round: u64::from(round),
                reason: reason.to_string(),
            },
        );
        if itemised {
            tracing::warn!(node, round, plan = short(plan_id), "rejected update: {reason}");
        }
        // An upload that never named its plan has no watcher to tell, and one for a plan that is
        // not running must not grow (or end) a finished run's history. Only a rejection within the
        // node's quota, and for the round the plan has open, reaches the watchers: a node choosing
        // a new round number for each header must not choose how large the history grows.
        let open_round = self.rounds.read().unwrap_or_else(|p| p.into_inner()).get(plan_id).map(|i| i.round);
        if plan_id.is_empty() || !itemised || open_round != Some(round) || !self.is_running(plan_id) {
            return status;
        }
        let Ok(plan_id) = PlanId::parse(plan_id) else {
            return status;
        };
        self.publish(
            &plan_id,
            plan_event::Kind::UpdateRejected(proto::UpdateRejected {
                round,
                node: node.to_string(),
                reason: reason.into_owned(),
            }),
        );
        status
    }
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
    use crate::test_ids::{node, nodes};

    fn round() -> RoundInfo {
        attempt(1)
    }

    fn attempt(attempt: u32) -> RoundInfo {
        RoundInfo::new(crate::engine::UploadRound {
            plan_id: PlanId::parse(&"ab".repeat(32)).unwrap(),
            run_id: RunId::parse(&"cd".repeat(16)).unwrap(),
            round: 3,
            attempt,
            model: ContentHash::of(b"model"),
            num_params: 14,
            masked: false,
            participants: nodes(&["a", "b"]).into_iter().collect(),
        })
    }

    #[test]
    fn one_upload_per_participant_is_spooled_and_none_after_admission() {
        let info = round();
        let e = info.claim(&node("rogue")).err().map(|s| (s.code(), s.message().to_string()));
        assert_eq!(e.as_ref().map(|e| e.0), Some(tonic::Code::PermissionDenied));
        assert!(e.is_some_and(|e| e.1.contains("not a participant of round 3")));
        let slot = info.claim(&node("a"));
        assert!(slot.is_ok());
        // A clone (what each handler holds) shares the slots.
        let twin = info.clone();
        let dup = twin.claim(&node("a")).err().map(|s| (s.code(), s.message().to_string()));
        assert_eq!(dup.as_ref().map(|e| e.0), Some(tonic::Code::Unavailable), "a node retries Unavailable");
        assert!(dup.is_some_and(|e| e.1.contains("still open here")));
        assert!(twin.claim(&node("b")).is_ok(), "another participant is not held up (its slot is freed at once here)");
        drop(slot);
        // The upload failed: the node may try again.
        let slot = info.claim(&node("a"));
        assert!(slot.is_ok());
        info.admitted(&node("a"));
        drop(slot);
        let again = info.claim(&node("a")).err().map(|s| (s.code(), s.message().to_string()));
        assert_eq!(again.as_ref().map(|e| e.0), Some(tonic::Code::AlreadyExists));
        assert!(again.is_some_and(|e| e.1.contains("already had an update admitted")));
        // The next round starts with fresh slots.
        assert!(round().claim(&node("a")).is_ok());
    }

    /// A participant whose earlier upload stream is half-open (its host rebooted, its network
    /// went) is not locked out until the idle timeout: its new upload tells the old one to stop
    /// and is asked to retry, and the retry gets the slot once the old handler let go.
    #[tokio::test]
    async fn a_new_upload_of_the_same_node_closes_the_one_left_half_open() {
        let info = round();
        let old = info.claim(&node("a")).map_err(|s| s.message().to_string()).unwrap();
        let superseded = tokio::time::timeout(Duration::from_millis(50), old.superseded()).await;
        assert!(superseded.is_err(), "nobody asked the upload to stop yet");
        assert_eq!(info.claim(&node("a")).err().map(|s| s.code()), Some(tonic::Code::Unavailable));
        let superseded = tokio::time::timeout(Duration::from_secs(5), old.superseded()).await;
        assert!(superseded.is_ok(), "the older upload is told to stop");
        drop(old);
        assert!(info.claim(&node("a")).is_ok(), "the retry takes the slot");
    }

    /// A retry of a round reopens its number: an upload of the failed attempt is not of the
    /// retry's opening (so it ends at its next chunk), and the retry's slots are its own.
    #[test]
    fn a_retry_of_a_round_is_another_opening() {
        let (first, retry) = (attempt(1), attempt(2));
        assert!(first.same_opening(&first.clone()));
        assert!(!first.same_opening(&retry), "same round number, another attempt");
        assert!(!first.same_opening(&attempt(1)), "a reopening with the same numbers has fresh slots");
        let held = first.claim(&node("a"));
        assert!(held.is_ok());
        assert!(retry.claim(&node("a")).is_ok(), "the failed attempt's upload does not hold the retry's slot");
    }

    #[test]
    fn short_never_shows_more_than_twelve_characters() {
        assert_eq!(short(&"ab".repeat(32)), "abababababab");
        assert_eq!(short("abc"), "abc");
        assert_eq!(short(&"é".repeat(1 << 20)).chars().count(), 12);
    }
}
