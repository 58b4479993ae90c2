//! The node daemon: dials out to the coordinator over mutual TLS, follows its directive stream,
//! and answers each directive under the local policy. It reconnects with back-off when the
//! coordinator goes away; training runs on a blocking thread so the connection stays serviced.
//! The decisions are pure modules ([`crate::admission`], [`crate::budget`], [`crate::rounds`],
//! [`crate::receipt`]); everything sent goes through [`crate::link::Link`].
//!
//! Here: the node's state, the reconnect loop, the session (directive stream) and the dispatch
//! of each directive. [`offer`]: plan offers; [`training`]: plain rounds; [`secagg`]:
//! secure-aggregation rounds; [`charge`]: pricing and charging releases; [`reports`]:
//! evaluations and countersigned round records; [`error`]: why a directive was not carried out.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sanctum_protocol::hash::ContentHash;
use sanctum_protocol::plan::Plan;
use sanctum_protocol::proto::{self, Directive, PlanResponse, SubscribeRequest, directive};
use sanctum_protocol::secagg::client::Client as SecAggClient;
use sanctum_protocol::secagg::encode::Encoding;
use sanctum_protocol::tls::{self, NodeCertVerifier, TlsMaterial};
use tch::Device;

use sanctum_protocol::audit::{AuditError, AuditEvent, AuditLog, PlanDecision};

use crate::backoff::{BASE, CAP};
use crate::budget::{DdgPlan, DpPlan};
use crate::config::NodeConfig;
use crate::data::LocalData;
use crate::egress::EgressLog;
use crate::ledger::Ledger;
use crate::link::{Link, LinkError};
use crate::release::ReleaseStore;
use crate::rounds::{Lineage, RunView};
use crate::train;

mod charge;
mod error;
mod heartbeat;
mod offer;
mod reports;
mod secagg;
mod training;

use error::Chain;
pub use error::{ChargeError, DaemonError, SecAggRefusal};

/// A run of a plan this node accepted, with its validated data.
struct Accepted {
    plan: Plan,
    /// The coordinator's id of this run (`OfferPlan.run`); every release is charged to it.
    run: String,
    /// Models of this run the node may evaluate, and what it evaluated.
    lineage: Lineage,
    data: Arc<LocalData>,
    /// DP-SGD settings derived from this node's own data, when the plan asks for privacy.
    dp: Option<DpPlan>,
    /// Client-level DP by distributed noise under secure aggregation.
    ddg: Option<DdgPlan>,
    /// A TorchScript plan's model file, fetched by hash, checked and loaded once at acceptance.
    script: Option<PathBuf>,
}

impl Accepted {
    /// What the directive decisions need to know of this run.
    fn view(&self) -> RunView<'_> {
        RunView { run: &self.run, rounds: self.plan.rounds, secure_aggregation: self.plan.secure_aggregation }
    }
}

/// What a round of local training returns: the metric of the starting model and the update.
type Trained = Result<(train::Evaluation, train::RoundResult), train::TrainError>;

/// This node's part in the open secure-aggregation round.
struct SecAggRound {
    start: proto::StartRound,
    client: SecAggClient,
    encoding: Encoding,
    /// The quantised (and, under client-level DP, noised) input, once training is done.
    input: Option<Vec<u32>>,
    metrics: Vec<proto::Metric>,
}

/// The running node.
pub struct Node {
    cfg: NodeConfig,
    material: TlsMaterial,
    device: Device,
    /// The only way out: the gRPC client, each message recorded in the egress log first.
    link: Link,
    /// What each dataset has spent; charged before an update leaves.
    ledger: Ledger,
    /// Each open run's latest release, so a repeated round re-sends the same bytes.
    releases: ReleaseStore,
    /// SCAFFOLD's control variate of each open run.
    control: crate::scaffold::ControlVariates,
    /// Exit once the plan offered to this node is closed (simulations and tests).
    exit_after_plan: bool,
    plans: HashMap<String, Accepted>,
    /// Plans offered (or offered again) since this session began. An accepted plan the
    /// coordinator did not offer again after a reconnect may have ended while the node was away,
    /// so it does not count against a new secure-aggregation plan
    /// (`admission::check_one_secure_aggregation`).
    offered_this_session: HashSet<String>,
    /// The last global model fetched, to avoid fetching it twice.
    cached: Option<(ContentHash, Arc<Vec<u8>>)>,
    /// The coordinator's heartbeat limits, mirrored: what it would refuse is not sent.
    heartbeats: heartbeat::HeartbeatGate,
    /// Checks peers' certificates and signatures relayed by the coordinator.
    verifier: NodeCertVerifier,
    secagg: Option<SecAggRound>,
    /// Local training of a secure-aggregation round, run while the directive stream is served.
    training: Option<tokio::task::JoinHandle<Trained>>,
    /// This node's signed, hash-chained audit log.
    audit: AuditLog,
    /// The end-to-end tests' hooks ([`Node::with_faults`]); none unless `main` sets them.
    #[cfg(feature = "fault-injection")]
    faults: crate::faults::FaultOptions,
}

/// What the session loop woke up for.
enum Wake {
    Directive(Result<Option<Directive>, tonic::Status>),
    Trained(Result<Trained, tokio::task::JoinError>),
}

/// What ends a session with the coordinator.
enum SessionEnd {
    /// The stream broke or could not be opened: reconnect.
    Lost(String),
    /// `exit_after_plan` and the plan closed.
    Done,
    /// A stop was asked for (SIGTERM or SIGINT) and the directive in flight is finished.
    Stopped,
}

/// Set once to the name of the signal that asks the node to stop (`None` while it runs).
pub type Stop = tokio::sync::watch::Receiver<Option<&'static str>>;

/// How long a stopping node lets the directive in flight run on (training included) before it
/// abandons it. Abandoning happens only at an await point: every ledger, egress and audit write
/// is synchronous and fsync'd between awaits, and a charge and its audit record are written with
/// nothing awaited between them, so none is ever cut; at worst a release is charged and not
/// sent, which the ledger allows (it may show more than left, never less).
const DRAIN_GRACE: Duration = Duration::from_secs(20);

/// Resolves once a stop is asked for; never, if the sender is gone without asking.
async fn stop_requested(stop: &mut Stop) -> &'static str {
    match stop.wait_for(Option::is_some).await {
        Ok(signal) => signal.unwrap_or("signal"),
        Err(_) => std::future::pending().await,
    }
}

/// Runs `work` (a directive being handled) to its end; when a stop is asked for meanwhile, lets
/// it run on for at most [`DRAIN_GRACE`]. Returns its output (`None` when abandoned) and whether
/// a stop was asked for.
async fn finish_or_drain<F: Future>(work: F, stop: &mut Stop) -> (Option<F::Output>, bool) {
    tokio::pin!(work);
    tokio::select! {
        biased;
        out = &mut work => (Some(out), false),
        signal = stop_requested(stop) => {
            tracing::info!("{signal}: stopping once the directive in flight is done (at most {} s)", DRAIN_GRACE.as_secs());
            match tokio::time::timeout(DRAIN_GRACE, work).await {
                Ok(out) => (Some(out), true),
                Err(_) => {
                    tracing::warn!("the directive in flight did not finish within {} s; abandoned", DRAIN_GRACE.as_secs());
                    (None, true)
                }
            }
        }
    }
}

impl Node {
    pub fn new(
        cfg: NodeConfig,
        material: TlsMaterial,
        device: Device,
        exit_after_plan: bool,
    ) -> Result<Self, DaemonError> {
        // First of all: one node process per state directory (two would share one budget).
        let lock = crate::state_lock::StateLock::acquire(&cfg.state_dir)?;
        let egress = EgressLog::open(&cfg.state_dir)
            .map_err(|error| DaemonError::EgressOpen { dir: cfg.state_dir.clone(), error })?;
        let ledger = Ledger::open(lock)?;
        let releases = ReleaseStore::open(&cfg.state_dir)?;
        let control = crate::scaffold::ControlVariates::open(&cfg.state_dir);
        let verifier = material.node_cert_verifier()?;
        let audit = AuditLog::open_for(&cfg.state_dir.join("audit"), &material)?;
        let link = Link::new(egress, &cfg.state_dir);
        Ok(Self {
            cfg,
            material,
            device,
            link,
            ledger,
            releases,
            control,
            exit_after_plan,
            plans: HashMap::new(),
            offered_this_session: HashSet::new(),
            cached: None,
            heartbeats: heartbeat::HeartbeatGate::default(),
            verifier,
            secagg: None,
            training: None,
            audit,
            #[cfg(feature = "fault-injection")]
            faults: crate::faults::FaultOptions::default(),
        })
    }

    /// Switches the end-to-end tests' hooks on (`fault-injection` builds only; `main` reads them
    /// from the environment, [`crate::faults::FaultOptions::from_lookup`]).
    #[cfg(feature = "fault-injection")]
    pub fn with_faults(mut self, faults: crate::faults::FaultOptions) -> Self {
        self.link.cut_uploads(faults.upload_cut());
        self.faults = faults;
        self
    }

    /// Runs until `stop` asks it to (it drains: the directive in flight finishes, then a
    /// `node_stopped` audit record) or, with `exit_after_plan`, the plan closes. Reconnects after
    /// a randomised delay ([`crate::backoff::full_jitter`]) so that nodes do not come back in
    /// lock-step after a coordinator restart.
    pub async fn run(mut self, mut stop: Stop) -> Result<(), DaemonError> {
        let mut attempt: u32 = 0;
        loop {
            let mut backoff = crate::backoff::full_jitter(BASE, CAP, attempt, rand::random::<f64>());
            attempt = attempt.saturating_add(1);
            let connected = tokio::select! {
                biased;
                signal = stop_requested(&mut stop) => return self.stopped(signal),
                connected = tls::connect(&self.cfg.coordinator, &self.material) => connected,
            };
            match connected {
                Ok(channel) => {
                    attempt = 0;
                    self.link.connect(channel);
                    let end = self.session(&mut stop).await;
                    self.link.disconnect();
                    match end {
                        SessionEnd::Done => return Ok(()),
                        SessionEnd::Stopped => return self.stopped(stop_requested(&mut stop).await),
                        SessionEnd::Lost(why) => {
                            tracing::warn!("connection to the coordinator lost: {why}; reconnecting")
                        }
                    }
                    backoff = crate::backoff::full_jitter(BASE, CAP, 0, rand::random::<f64>());
                }
                Err(e) if e.to_string().contains("Expired") => tracing::error!(
                    "{e}: the coordinator refused this node's certificate as expired; ask the consortium lead to renew it (`sanctum-coordinator pki renew --dir PKI {}`) and replace {}; retrying in {:.1} s",
                    self.material.identity().name,
                    self.cfg.tls.cert.display(),
                    backoff.as_secs_f64()
                ),
                Err(e) => tracing::warn!("{e}; retrying in {:.1} s", backoff.as_secs_f64()),
            }
            tokio::select! {
                biased;
                signal = stop_requested(&mut stop) => return self.stopped(signal),
                () = tokio::time::sleep(backoff) => {}
            }
        }
    }

    /// The last record of a drained node: why it stopped. Nothing is in flight any more.
    fn stopped(&mut self, signal: &'static str) -> Result<(), DaemonError> {
        if self.training.take().is_some() {
            tracing::info!(
                "the secure-aggregation round being trained is left unfinished: nothing of it was charged or sent"
            );
        }
        self.audit(AuditEvent::NodeStopped { reason: "signal".into(), signal: signal.to_string() })?;
        tracing::info!("{signal}: stopped");
        Ok(())
    }

    /// Appends to the audit log; this node's own action, so its own certificate is the actor.
    fn audit(&mut self, event: AuditEvent) -> Result<(), AuditError> {
        let own = self.audit.own_fingerprint().to_string();
        self.audit.append_event(&own, &event)?;
        Ok(())
    }

    async fn session(&mut self, stop: &mut Stop) -> SessionEnd {
        let hello = SubscribeRequest {
            software_version: sanctum_protocol::VERSION.to_string(),
            device: train::device_name(self.device),
        };
        let mut stream = match self.link.subscribe(hello).await {
            Ok(stream) => stream,
            Err(LinkError::Rpc(s)) => return SessionEnd::Lost(format!("{}: {}", s.code(), s.message())),
            Err(e) => return SessionEnd::Lost(e.to_string()),
        };
        tracing::info!(coordinator = self.cfg.coordinator, "connected; waiting for plans");
        self.offered_this_session.clear();
        if let Err(e) = self.audit(AuditEvent::Connected { coordinator: self.cfg.coordinator.clone() }) {
            return SessionEnd::Lost(format!("audit log: {e}"));
        }
        loop {
            // A stop comes first: no new directive is taken once it is asked for.
            let wake = match self.training.as_mut() {
                Some(handle) => tokio::select! {
                    biased;
                    _ = stop_requested(stop) => return SessionEnd::Stopped,
                    joined = handle => Wake::Trained(joined),
                    msg = stream.message() => Wake::Directive(msg),
                },
                None => tokio::select! {
                    biased;
                    _ = stop_requested(stop) => return SessionEnd::Stopped,
                    msg = stream.message() => Wake::Directive(msg),
                },
            };
            let msg = match wake {
                Wake::Trained(joined) => {
                    self.training = None;
                    let (done, stopping) = finish_or_drain(self.secagg_trained(joined), stop).await;
                    if let Some(Err(e)) = done {
                        tracing::error!("secure-aggregation round not completed: {}", Chain(&e));
                        self.secagg = None;
                    }
                    if stopping {
                        return SessionEnd::Stopped;
                    }
                    continue;
                }
                Wake::Directive(msg) => msg,
            };
            match msg {
                Ok(Some(Directive { kind: Some(kind) })) => {
                    let (end, stopping) = finish_or_drain(self.handle(kind), stop).await;
                    if let Some(Some(end)) = end {
                        return end;
                    }
                    if stopping {
                        return SessionEnd::Stopped;
                    }
                }
                Ok(Some(Directive { kind: None })) => tracing::warn!("empty directive ignored"),
                Ok(None) => return SessionEnd::Lost("the coordinator closed the stream".into()),
                Err(s) => return SessionEnd::Lost(format!("{}: {}", s.code(), s.message())),
            }
        }
    }

    async fn handle(&mut self, kind: directive::Kind) -> Option<SessionEnd> {
        match kind {
            directive::Kind::OfferPlan(offer) => {
                self.offered_this_session.insert(offer.plan_id.clone());
                if let Err(e) = self.audit_approvals() {
                    return Some(SessionEnd::Lost(format!("audit log: {e}")));
                }
                let considered = match self.consider(&offer) {
                    Ok(accepted) => self.prepare_script(&offer.plan_id, accepted).await,
                    Err(reason) => Err(reason),
                };
                let (accept, reason) = match considered {
                    Ok(mut accepted) => {
                        tracing::info!(
                            plan = accepted.plan.name,
                            run = accepted.run,
                            train = accepted.data.train_len(),
                            test = accepted.data.test_len(),
                            "accepting plan"
                        );
                        // The same run offered again (a reconnect) keeps what the node saw of it.
                        if let Some(prev) = self.plans.get(&offer.plan_id).filter(|p| p.run == offer.run) {
                            accepted.lineage.models.extend(prev.lineage.models.iter().cloned());
                            accepted.lineage.evaluated.clone_from(&prev.lineage.evaluated);
                            accepted.lineage.saw_last_round |= prev.lineage.saw_last_round;
                            accepted.lineage.final_model.clone_from(&prev.lineage.final_model);
                        }
                        self.plans.insert(offer.plan_id.clone(), accepted);
                        (true, String::new())
                    }
                    Err(reason) => {
                        tracing::warn!(plan = offer.plan_id, "refusing plan: {reason}");
                        (false, reason.to_string())
                    }
                };
                let accepted = self.plans.get(&offer.plan_id).filter(|_| accept);
                // When the policy withholds dataset sizes every figure here is accounted at the
                // public lower bound on the rows (`DpPlan::accounted_rate`), so none reveals n.
                let privacy = accepted.and_then(|a| a.dp).map(|dp| proto::PrivacyCost {
                    epsilon: dp.epsilon,
                    delta: dp.delta,
                    steps: dp.steps,
                    sampling_rate: dp.accounted_rate,
                    noise_multiplier: dp.setup.noise_multiplier,
                    ..Default::default()
                });
                // Client-level DP by distributed noise: one release per round, no sampling.
                let privacy = privacy.or_else(|| {
                    accepted.and_then(|a| a.ddg.map(|d| (d, a.plan.rounds))).map(|(d, rounds)| proto::PrivacyCost {
                        epsilon: d.epsilon,
                        delta: d.delta,
                        steps: u64::from(rounds),
                        sampling_rate: 1.0,
                        noise_multiplier: d.noise_multiplier,
                        ..Default::default()
                    })
                });
                // The hospital's cap and what other plans spent, when its policy shares them.
                let privacy = privacy.map(|mut cost| {
                    if self.cfg.policy.share_budget
                        && let Some(a) = accepted
                    {
                        let before = self.ledger.spent(&a.plan.data.schema, Some((&offer.plan_id, &offer.run)));
                        cost.max_epsilon = self.cfg.policy.max_epsilon;
                        cost.epsilon_spent_before = Some(before.epsilon);
                    }
                    cost
                });
                let decision = PlanDecision {
                    node: None,
                    plan_id: offer.plan_id.clone(),
                    run: Some(offer.run.clone()),
                    reason: reason.clone(),
                    epsilon: privacy.as_ref().map(|p| p.epsilon),
                    delta: privacy.as_ref().map(|p| p.delta),
                };
                let event = if accept { AuditEvent::PlanAccepted(decision) } else { AuditEvent::PlanRefused(decision) };
                if let Err(e) = self.audit(event) {
                    return Some(SessionEnd::Lost(format!("audit log: {e}")));
                }
                let msg =
                    PlanResponse { plan_id: offer.plan_id.clone(), accept, reason, privacy, run: offer.run.clone() };
                match self.link.respond_to_plan(msg).await {
                    Ok(()) => {}
                    Err(LinkError::Rpc(s)) => return Some(SessionEnd::Lost(format!("RespondToPlan: {}", s.message()))),
                    Err(e) => return Some(SessionEnd::Lost(e.to_string())),
                }
            }
            directive::Kind::StartRound(start) if start.secure_aggregation.is_some() => {
                if let Err(e) = self.start_secagg_round(&start).await {
                    tracing::error!(
                        round = start.round,
                        "not taking part in this secure-aggregation round: {}",
                        Chain(&e)
                    );
                    // A refused directive never ends another round this node is in.
                    if self.secagg_is(&start.plan_id, start.round) {
                        self.secagg = None;
                    }
                }
            }
            directive::Kind::StartRound(start) => {
                tracing::debug!(round = start.round, "round directive received");
                if let Err(e) = self.run_round(&start).await {
                    tracing::error!(round = start.round, "round not completed: {}", Chain(&e));
                }
            }
            directive::Kind::RoundReceipt(receipt) => {
                if let Err(e) = self.countersign(&receipt).await {
                    tracing::error!(round = receipt.round, "round record not countersigned: {}", Chain(&e));
                }
            }
            directive::Kind::Secagg(step) => {
                let (plan_id, round) = (step.plan_id.clone(), step.round);
                if let Err(e) = self.secagg_step(step).await {
                    tracing::error!("secure-aggregation step refused: {}", Chain(&e));
                    if self.secagg_is(&plan_id, round) {
                        self.secagg = None;
                    }
                }
            }
            directive::Kind::Evaluate(ev) => {
                if let Err(e) = self.evaluate(&ev).await {
                    tracing::error!("final evaluation not completed: {}", Chain(&e));
                }
            }
            directive::Kind::PlanClosed(closed) => {
                let ours = self.plans.get(&closed.plan_id).is_some_and(|a| a.run == closed.run);
                if ours && self.secagg.as_ref().is_some_and(|r| r.start.plan_id == closed.plan_id) {
                    self.secagg = None;
                    if let Some(h) = self.training.take() {
                        h.abort();
                    }
                }
                let name = if ours { self.plans.remove(&closed.plan_id).map(|a| a.plan.name) } else { None };
                // The run is over for this node: its kept releases go, and it is never run again.
                // Runs it never heard of leave nothing on disk.
                if (ours || self.releases.knows(&closed.plan_id, &closed.run))
                    && let Err(e) = self.releases.close(&closed.plan_id, &closed.run)
                {
                    tracing::error!("{e}");
                }
                self.control.forget(&closed.plan_id, &closed.run);
                if let Err(e) = self.audit(AuditEvent::PlanClosed {
                    plan_id: closed.plan_id.clone(),
                    run: closed.run.clone(),
                    success: closed.success,
                    reason: closed.reason.clone(),
                }) {
                    return Some(SessionEnd::Lost(format!("audit log: {e}")));
                }
                tracing::info!(
                    plan = name.as_deref().unwrap_or(&closed.plan_id),
                    success = closed.success,
                    reason = closed.reason,
                    "plan closed"
                );
                // A simulated node serves one plan, whether it took part or refused it.
                if self.exit_after_plan {
                    return Some(SessionEnd::Done);
                }
            }
        }
        None
    }

    /// Refuses a directive: logged and audited here, nothing sent.
    fn refuse_directive(&mut self, what: &str, plan_id: &str, round: u32, reason: &str) -> Result<(), AuditError> {
        tracing::warn!(plan = plan_id, round, "{what} refused: {reason}");
        self.audit(AuditEvent::DirectiveRefused {
            directive: what.to_string(),
            plan_id: plan_id.to_string(),
            round: u64::from(round),
            reason: reason.to_string(),
        })
    }

    /// Whether the open secure-aggregation round is (plan, round).
    fn secagg_is(&self, plan_id: &str, round: u32) -> bool {
        self.secagg.as_ref().is_some_and(|r| r.start.plan_id == plan_id && r.start.round == round)
    }

    /// Records, once a round's release has left, the model it was trained on in the run's
    /// lineage (and whether it was the plan's last round). Only models the node really trained
    /// on, and only after it released something for them, enter the lineage.
    fn note_round(&mut self, start: &proto::StartRound) {
        if let Some(a) = self.plans.get_mut(&start.plan_id).filter(|a| a.run == start.run) {
            a.lineage.models.insert(start.model_sha256.clone());
            a.lineage.saw_last_round |= start.round == a.plan.rounds;
        }
    }
}

/// The first 12 hex digits of a hash, for messages.
fn short(hex: &str) -> &str {
    hex.get(..12).unwrap_or(hex)
}

fn name_seed(name: &str) -> u64 {
    let h = ContentHash::of(name.as_bytes()).to_hex();
    u64::from_str_radix(&h[..16], 16).unwrap_or(0)
}
