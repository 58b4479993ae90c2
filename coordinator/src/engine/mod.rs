//! The coordinator's engine, sans-IO, in the shape of raft-rs: [`Engine::step`] takes the time
//! and one [`Input`] (a node connected, a decision, a spooled update's bytes, a tick…) and returns
//! the [`Effect`]s the caller must carry out, in order (send a directive, store a model, append an
//! audit record, publish an event, commit a round). It reads no clock, opens no file and sends
//! nothing, so every decision about plans, rounds and aggregation is tested here without tokio
//! (`engine/tests.rs`); the service's executor (`service/driver.rs`) does the I/O.
//!
//! Several runs go on at once, one [`run::RunEngine`] each, keyed by run id; a plan has at most
//! one running run, so the ids nodes send (plan id, round) name a run unambiguously.
//!
//! # Time
//! The engine's clock is [`Millis`]: milliseconds on the executor's monotonic clock. Each run
//! keeps the time it started and hands its plan state machine (`round::PlanRun`) logical time,
//! milliseconds since the run started. The secure-aggregation server (`protocol::secagg`) takes
//! `Instant`s: the engine maps its clock onto the `epoch` it was built with, a value, never read
//! from the system.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sanctum_protocol::plan::Plan;
use sanctum_protocol::proto::{self, EvaluationReport, PlanResponse, SecAggMessage};

use crate::strategy::robust::RoundBuffers;

pub mod checkpoint;
mod effects;
pub mod run;
mod secagg;
#[cfg(test)]
mod tests;

pub use effects::{Actor, Effect, ExportJob, Params, UploadRound};
use run::{Prepared, RunEngine};

/// The engine's clock: milliseconds on the executor's monotonic clock.
pub type Millis = u64;

pub use crate::round::NodeName;
pub use sanctum_protocol::ids::{PlanId, RunId};

/// An update's payload as the service read it back from its spool: f32 values already checked
/// finite, or a masked secure-aggregation input's u32 words.
#[derive(Clone, Debug, PartialEq)]
pub enum Payload {
    Values(crate::aggregate::FiniteValues),
    Words(Vec<u32>),
}

/// The header of an update the service spooled, with its payload read back.
#[derive(Clone, Debug)]
pub struct Update {
    pub round: u32,
    /// The attempt at `round` the upload was made in (a retry reopens the same round number).
    pub attempt: u32,
    pub plan_id: PlanId,
    pub base_model: String,
    pub sample_count: u64,
    pub metrics: Vec<proto::Metric>,
    pub masked: bool,
    pub payload_sha256: String,
    pub bytes: u64,
    /// The payload itself: values, or words when masked.
    pub payload: Payload,
}

/// What happened, as the engine is told.
#[derive(Debug)]
pub enum Input {
    /// A node opened its directive stream (or reopened it).
    Connected { node: NodeName },
    /// A node's current directive stream ended.
    Disconnected { node: NodeName },
    /// A submission that [`Engine::prepare`] accepted and the executor recorded as a run.
    Start { prepared: Box<Prepared>, run_id: RunId, run_number: u32, actor: String },
    /// A node answered an offer.
    Decision { node: NodeName, response: PlanResponse },
    /// A node's update, spooled and read back.
    Update { node: NodeName, update: Box<Update> },
    /// A node's secure-aggregation message; `cert_der` is the certificate its TLS session
    /// verified (relayed to peers in place of whatever the message carries).
    SecAgg { node: NodeName, cert_der: Arc<Vec<u8>>, msg: SecAggMessage },
    /// A node's evaluation of a final model.
    Evaluation { node: NodeName, report: EvaluationReport },
    /// The lead cancels a run.
    Cancel { run_id: RunId, actor: String, by: String },
    /// The executor could not carry out an effect the run depends on (a model not stored).
    StorageFailed { plan_id: PlanId, reason: String },
    /// A participant says it is alive (`Heartbeat`); never audited.
    Heartbeat { node: NodeName, plan_id: PlanId, run: RunId, round: u32, activity: crate::round::Activity },
    /// Time passed.
    Tick,
}

/// Why the engine refused an input; nothing changed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refused {
    #[error("no plan is running")]
    NoPlanRunning,
    #[error("plan {0} is not running")]
    PlanNotRunning(String),
    #[error("no run '{0}' is running: it finished, or never ran on this coordinator")]
    RunNotRunning(String),
    #[error("update is for another plan or model")]
    OtherPlanOrModel,
    #[error("no secure-aggregation round is open")]
    NoSecAggRound,
    #[error(
        "the update was sent in attempt {sent} at round {round}, which failed; attempt {open} is open: send it again"
    )]
    FailedAttempt { round: u32, sent: u32, open: u32 },
    #[error("{0}")]
    Round(#[from] crate::round::Rejection),
    #[error("{0}")]
    Heartbeat(#[from] crate::round::HeartbeatRefused),
    /// The reason from a component that words its own (aggregation, secure aggregation, the
    /// update's encoding).
    #[error("{0}")]
    Invalid(String),
}

/// Why a round's aggregate was not applied: the round fails with this reason, and the model is
/// neither stored nor published.
#[derive(Debug, thiserror::Error)]
pub enum AggregationFailed {
    #[error("no update was admitted")]
    NoUpdate,
    /// The server step would leave a non-finite model.
    #[error("round {round}: {source}")]
    Step { round: u32, source: crate::aggregate::AggregateError },
    #[error("{0}")]
    Model(#[from] sanctum_protocol::model::ModelError),
    #[error("no secure-aggregation round is open")]
    NoSecAggRound,
    #[error("{0}")]
    SecAgg(#[from] sanctum_protocol::secagg::SecAggError),
    #[error("the unmasked sum is shorter than the model; the round is not applied")]
    ShortSum,
    /// A robust aggregator made no Δ (too few updates for Multi-Krum, a buffered update that did
    /// not read back).
    #[error("round {round}: {rule}: {source}")]
    Robust { round: u32, rule: &'static str, source: crate::strategy::robust::RobustError },
}

/// Why a plan's client-level DP cannot be set up; the plan is refused with it.
#[derive(Debug, thiserror::Error)]
pub enum ClientDpSetupError {
    #[error("client-level privacy needs privacy.delta and privacy.clip_norm")]
    NoDeltaOrClip,
    #[error("client-level privacy needs noise_multiplier or target_epsilon")]
    NoNoise,
    #[error("{0}")]
    Accountant(#[from] sanctum_protocol::privacy::PrivacyError),
    #[error("{0}")]
    ClientDp(#[from] crate::aggregate::ClientDpError),
}

/// Why a submission cannot start a run; nothing was recorded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SubmitRefused {
    /// The plan breaks a rule (a bound, its privacy settings, its model file).
    #[error("{0}")]
    Invalid(String),
    #[error("plan '{name}' ({short}) is running as run {run}; wait for it to finish or cancel it")]
    AlreadyRunning { name: String, short: String, run: String },
}

/// Every running run, and the nodes connected now.
pub struct Engine {
    pub(super) runs: BTreeMap<RunId, RunEngine>,
    pub(super) connected: BTreeSet<NodeName>,
    pub(super) epoch: Instant,
    /// The Unix time (ms) at `epoch`, for the deadlines nodes are told.
    pub(super) epoch_unix_ms: u64,
    pub(super) evaluation_deadline: Duration,
    /// A participant that stops sending heartbeats while it trains is dropped after this.
    pub(super) heartbeat_timeout: Duration,
    /// Where a robust run keeps its open round's updates until the round closes (the executor
    /// injects a file-backed one; in memory by default, for tests).
    pub(super) buffers: Box<dyn RoundBuffers>,
}

impl Engine {
    /// An engine with no run. `epoch` is the `Instant` the executor's clock counts from (only the
    /// secure-aggregation server, which takes `Instant`s, sees it).
    pub fn new(epoch: Instant, epoch_unix_ms: u64, evaluation_deadline: Duration) -> Self {
        Self {
            runs: BTreeMap::new(),
            connected: BTreeSet::new(),
            epoch,
            epoch_unix_ms,
            evaluation_deadline,
            heartbeat_timeout: Duration::from_secs(30),
            buffers: Box::new(crate::strategy::robust::MemoryBuffers),
        }
    }

    /// Where the robust runs started or restored from now on keep their rounds' updates (by
    /// default in memory: O(nodes × model); the executor gives one on disk).
    pub fn with_round_buffers(mut self, buffers: Box<dyn RoundBuffers>) -> Self {
        self.buffers = buffers;
        self
    }

    /// The heartbeat timeout of the runs started or restored from now on (default 30 s).
    pub fn with_heartbeat_timeout(mut self, timeout: Duration) -> Self {
        self.heartbeat_timeout = timeout;
        self
    }

    /// Whether any run is going on.
    pub fn is_idle(&self) -> bool {
        self.runs.is_empty()
    }

    /// The runs going on, by id.
    pub fn running(&self) -> impl Iterator<Item = &RunEngine> {
        self.runs.values()
    }

    /// The nodes connected now, as the engine was told.
    pub fn connected(&self) -> &BTreeSet<NodeName> {
        &self.connected
    }

    /// Checks a submission before anything is recorded: every bound, the privacy settings, the
    /// model file, and that the plan has no run going on.
    pub fn prepare(&self, plan: Plan, model_file: &[u8]) -> Result<Prepared, SubmitRefused> {
        let prepared = Prepared::new(plan, model_file)?;
        if let Some(r) = self.runs.values().find(|r| *r.plan_id() == prepared.plan_id) {
            return Err(SubmitRefused::AlreadyRunning {
                name: r.plan().name.clone(),
                short: short(r.plan_id()).to_string(),
                run: r.run_id().to_string(),
            });
        }
        Ok(prepared)
    }

    /// Hands the engine one input; returns what to do, in order, or why the input was refused
    /// (then nothing changed).
    pub fn step(&mut self, now: Millis, input: Input) -> Result<Vec<Effect>, Refused> {
        let mut effects = Vec::new();
        let result = self.route(now, input, &mut effects);
        // A run that finished leaves the engine; its last effects are in `effects`.
        self.runs.retain(|_, r| !r.is_finished());
        result.map(|()| effects)
    }

    fn route(&mut self, now: Millis, input: Input, fx: &mut Vec<Effect>) -> Result<(), Refused> {
        match input {
            Input::Connected { node } => {
                self.connected.insert(node.clone());
                for r in self.runs.values_mut() {
                    r.node_connected(&node, now, fx);
                }
                Ok(())
            }
            Input::Disconnected { node } => {
                self.connected.remove(&node);
                for r in self.runs.values_mut() {
                    r.node_disconnected(&node, now, fx);
                }
                Ok(())
            }
            Input::Start { prepared, run_id, run_number, actor } => {
                let run = RunEngine::start(
                    *prepared,
                    run_id.clone(),
                    run_number,
                    &actor,
                    &self.connected,
                    (self.evaluation_deadline, self.heartbeat_timeout),
                    now,
                    (self.epoch, self.epoch_unix_ms),
                    &*self.buffers,
                    fx,
                );
                self.runs.insert(run_id, run);
                Ok(())
            }
            Input::Decision { node, response } => {
                let Some(r) =
                    self.runs.values_mut().find(|r| *r.plan_id() == response.plan_id && *r.run_id() == response.run)
                else {
                    // Debug only: a node can send these as fast as it likes (answers to a run that
                    // ended), and the log must not grow with them.
                    tracing::debug!(
                        node = %node,
                        plan = short(&response.plan_id),
                        run = short(&response.run),
                        "decision for a run that is not running"
                    );
                    return Ok(());
                };
                r.decision(&node, response, now, fx);
                Ok(())
            }
            Input::Update { node, update } => {
                let r = self.by_plan(&update.plan_id)?;
                r.update(&node, *update, now, fx)
            }
            Input::SecAgg { node, cert_der, msg } => {
                let r = self.by_plan(&msg.plan_id)?;
                r.secagg_message(&node, &cert_der, msg, now, fx)
            }
            Input::Evaluation { node, report } => {
                match self.runs.values_mut().find(|r| *r.plan_id() == report.plan_id) {
                    Some(r) => r.evaluation(&node, report, now, fx),
                    None => tracing::warn!(node = %node, "evaluation of a model that is not this plan's final model; ignored"),
                }
                Ok(())
            }
            Input::Cancel { run_id, actor, by } => {
                let r = self.runs.get_mut(&run_id).ok_or_else(|| Refused::RunNotRunning(run_id.to_string()))?;
                r.cancel(&actor, &by, &self.connected, fx);
                Ok(())
            }
            Input::StorageFailed { plan_id, reason } => {
                if let Some(r) = self.runs.values_mut().find(|r| *r.plan_id() == plan_id) {
                    r.fail(&reason, &self.connected, fx);
                }
                Ok(())
            }
            Input::Heartbeat { node, plan_id, run, round, activity } => {
                let r = self
                    .runs
                    .values_mut()
                    .find(|r| *r.plan_id() == plan_id && *r.run_id() == run)
                    .ok_or_else(|| Refused::RunNotRunning(short(&run).to_string()))?;
                r.heartbeat(&node, round, activity, now, fx)
            }
            Input::Tick => {
                for r in self.runs.values_mut() {
                    r.tick(now, fx);
                }
                Ok(())
            }
        }
        .map(|()| {
            // Every run that asked to finish is told the connected nodes to close it with.
            for r in self.runs.values_mut() {
                r.flush_finish(&self.connected, fx);
            }
        })
    }

    fn by_plan(&mut self, plan_id: &str) -> Result<&mut RunEngine, Refused> {
        if self.runs.is_empty() {
            return Err(Refused::NoPlanRunning);
        }
        self.runs
            .values_mut()
            .find(|r| r.plan_id() == plan_id)
            .ok_or_else(|| Refused::PlanNotRunning(short(plan_id).to_string()))
    }
}

/// `epoch + now`, the `Instant` the secure-aggregation server is given for the engine's `now`.
fn instant(epoch: Instant, now: Millis) -> Instant {
    epoch.checked_add(Duration::from_millis(now)).unwrap_or(epoch)
}

/// The first 12 characters of a hash for messages and logs; never more, whatever the input.
pub fn short(hex: &str) -> &str {
    let end = hex.char_indices().nth(12).map_or(hex.len(), |(i, _)| i);
    &hex[..end]
}
