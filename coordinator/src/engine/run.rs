//! One run of a plan inside the engine: its plan state machine (`round::PlanRun`), the global
//! model and server optimizer, the open round's accumulator, client-level DP and secure
//! aggregation. Every method appends what the executor must do to an effect list; nothing here
//! reads a clock or touches a file.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sanctum_protocol::audit::{AuditEvent, PlanDecision, RoundUpdate};
use sanctum_protocol::hash::ContentHash;
use sanctum_protocol::model::Weights;
use sanctum_protocol::plan::{Plan, PrivacyMode, Weighting};
use sanctum_protocol::privacy::noise::SecureGaussian;
use sanctum_protocol::privacy::{self, Accountant, SampledGaussian};
use sanctum_protocol::proto::{self, EvaluationReport, PlanFinished, PlanResponse, directive, plan_event};
use sanctum_protocol::transfer;
use serde_json::json;

use super::effects::{Actor, Effect, ExportJob, UploadRound};
use super::{Millis, NodeName, PlanId, Refused, RunId, SubmitRefused, Update, instant, short};
use crate::aggregate::{Accumulator, ClientDp, ServerState, sample_weight};
use crate::round::{Action, PlanRun, RunConfig};
use crate::secure::SecAggRound;

/// What client-level DP guarantees each hospital for the whole plan.
#[derive(Clone, Copy, Debug)]
pub(super) struct ClientDpCost {
    pub(super) noise_multiplier: f64,
    pub(super) epsilon: f64,
    pub(super) delta: f64,
}

/// A submission that passed every check and may start a run.
#[derive(Debug)]
pub struct Prepared {
    pub plan: Plan,
    pub plan_id: PlanId,
    pub wire_toml: String,
    client_dp: Option<(ClientDp, ClientDpCost)>,
    secagg_noise: Option<f64>,
}

impl Prepared {
    /// Checks everything that can refuse the plan before a run is recorded.
    pub(super) fn new(plan: Plan, model_file: &[u8]) -> Result<Self, SubmitRefused> {
        let invalid = SubmitRefused::Invalid;
        // The lead's handler parsed it, but `Coordinator::submit` takes a `Plan` from any caller:
        // every number the run computes with must be within the plan limits.
        plan.validate().map_err(|e| invalid(e.to_string()))?;
        let wire_toml = plan.to_wire_toml().map_err(|e| invalid(e.to_string()))?;
        let plan_id = PlanId::of_hash(&Plan::id_of(&wire_toml));
        let client_dp =
            if plan.secure_aggregation { None } else { client_dp_for(&plan).map_err(|e| invalid(e.to_string()))? };
        let secagg_noise =
            sanctum_protocol::secagg::encode::distributed_noise(&plan).map_err(|e| invalid(e.to_string()))?;
        crate::plan_files::check_model_file(&plan, model_file).map_err(|e| invalid(e.to_string()))?;
        Ok(Self { plan, plan_id, wire_toml, client_dp, secagg_noise })
    }
}

/// Sets up DP-FedAvg for a plan in client mode: the noise multiplier (given, or the smallest that
/// meets the target over all rounds by the PLD accountant, with every hospital in every round)
/// and the resulting ε.
fn client_dp_for(plan: &Plan) -> Result<Option<(ClientDp, ClientDpCost)>, super::ClientDpSetupError> {
    let p = &plan.privacy;
    if p.mode != PrivacyMode::Client {
        return Ok(None);
    }
    let (Some(delta), Some(clip)) = (p.delta, p.clip_norm) else {
        return Err(super::ClientDpSetupError::NoDeltaOrClip);
    };
    let rounds = u64::from(plan.rounds);
    let sigma = match (p.noise_multiplier, p.target_epsilon) {
        (Some(s), _) => s,
        (None, Some(target)) => privacy::noise_for_epsilon(Accountant::Pld, target, 1.0, rounds, delta)?,
        (None, None) => return Err(super::ClientDpSetupError::NoNoise),
    };
    let run = SampledGaussian { sampling_rate: 1.0, noise_multiplier: sigma, steps: rounds };
    let epsilon = privacy::epsilon_with(Accountant::Pld, &run, delta)?;
    let dp = ClientDp::new(sigma, clip, p.adaptive_clipping.clone())?;
    Ok(Some((dp, ClientDpCost { noise_multiplier: sigma, epsilon, delta })))
}

/// What the plan state machine needs of a plan; `evaluation_deadline` and `heartbeat_timeout`
/// are the coordinator's.
pub(super) fn run_config(plan: &Plan, evaluation_deadline: Duration, heartbeat_timeout: Duration) -> RunConfig {
    RunConfig {
        rounds: plan.rounds,
        min_nodes: plan.min_nodes,
        recruit_deadline: Duration::from_secs(plan.recruit_deadline_secs),
        round_deadline: Duration::from_secs(plan.round_deadline_secs),
        evaluation_deadline,
        retries: plan.retries,
        heartbeat_timeout,
    }
}

/// One run and everything the engine keeps for it.
pub struct RunEngine {
    pub(super) plan_id: PlanId,
    /// This run's id (`OfferPlan.run`), unique per submission.
    pub(super) run_id: RunId,
    pub(super) run_number: u32,
    pub(super) plan: Plan,
    pub(super) wire_toml: String,
    /// The engine's clock when the run started: the plan state machine sees time since then.
    started: Millis,
    /// The `Instant` of the engine's clock's zero (a value it was given; see the module doc).
    epoch: Instant,
    /// The Unix time (ms) of the engine's clock's zero, for the deadlines nodes are told.
    epoch_unix_ms: u64,
    pub(super) run: PlanRun,
    pub(super) global: Weights,
    pub(super) model: ContentHash,
    pub(super) model_bytes: u64,
    pub(super) server: ServerState,
    pub(super) acc: Accumulator,
    /// Metrics reported with this round's updates (of the round's starting model).
    pub(super) round_metrics: BTreeMap<String, proto::Metric>,
    /// Every metric each node reported on the final model, in its order (the first is the task's
    /// headline metric).
    pub(super) final_metrics: BTreeMap<NodeName, Vec<proto::Metric>>,
    /// The last round a checkpoint closed, kept in every later checkpoint of the run (one during
    /// the final evaluation too) so a restart still completes its audit records.
    pub(super) last_closed: Option<super::checkpoint::ClosedRound>,
    /// Hash of the initial model and of every round's result, in order.
    pub(super) lineage: Vec<ContentHash>,
    pub(super) participants: Vec<NodeName>,
    /// Client-level DP (DP-FedAvg) when the plan asks for it, with the ε it gives the plan.
    pub(super) client_dp: Option<(ClientDp, ClientDpCost)>,
    /// Noise for DP-FedAvg: OS-seeded ChaCha20 (seeded once at the run's start: randomness, not I/O).
    pub(super) secure: SecureGaussian,
    /// The open round's secure aggregation, when the plan asks for it.
    pub(super) secagg: Option<SecAggRound>,
    /// Client-level distributed DP under secure aggregation: the noise multiplier, and the zCDP ρ
    /// of the rounds released so far.
    pub(super) secagg_noise: Option<f64>,
    pub(super) secagg_rho: f64,
    /// The open round's accepted updates (node, payload hash, bytes), for its receipt.
    pub(super) round_updates: Vec<RoundUpdate>,
    /// The plan state machine asked to finish: carried out once the connected nodes are known.
    finishing: Option<(bool, String)>,
    finished: bool,
    /// The lead cancelled the run.
    cancelled: bool,
}

impl RunEngine {
    /// Starts a run: stores the initial model, audits the submission and offers the plan to the
    /// nodes connected now.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn start(
        prepared: Prepared,
        run_id: RunId,
        run_number: u32,
        actor: &str,
        connected: &BTreeSet<NodeName>,
        (evaluation_deadline, heartbeat_timeout): (Duration, Duration),
        now: Millis,
        (epoch, epoch_unix_ms): (Instant, u64),
        fx: &mut Vec<Effect>,
    ) -> Self {
        let Prepared { plan, plan_id, wire_toml, client_dp, secagg_noise } = prepared;
        let global = plan.model.init(plan.seed);
        // Safetensors of a model the plan limits bound cannot fail to encode; if it did, the run
        // starts from an empty file the nodes refuse, and the round fails with their reasons.
        let bytes = global.to_safetensors().unwrap_or_default();
        let model = ContentHash::of(&bytes);
        let model_bytes = bytes.len() as u64;
        fx.push(Effect::StoreModel { plan_id: plan_id.clone(), hash: model, bytes: Arc::new(bytes) });
        let num_params = global.values().len();
        let cfg = run_config(&plan, evaluation_deadline, heartbeat_timeout);
        // Under secure aggregation client-level noise is added by the nodes, not here.
        if let Some(sigma) = secagg_noise {
            tracing::info!(
                noise_multiplier = format!("{sigma:.3}"),
                "client-level DP with distributed discrete Gaussian noise: each node adds its share under secure aggregation"
            );
        }
        if let Some((_, cost)) = &client_dp {
            tracing::info!(
                noise_multiplier = format!("{:.3}", cost.noise_multiplier),
                epsilon = format!("{:.3}", cost.epsilon),
                delta = cost.delta,
                "client-level DP: each hospital's whole dataset is protected at this (ε, δ) in the released models"
            );
        }
        let (run, actions) = PlanRun::start(cfg, connected.iter().cloned(), 0);
        tracing::info!(plan = plan.name, id = short(&plan_id), run = run_number, model = %model.short(), "plan started");
        fx.push(Effect::Audit {
            actor: Actor::Fingerprint(actor.to_string()),
            event: AuditEvent::PlanSubmitted {
                plan_id: plan_id.to_string(),
                run: Some(run_id.to_string()),
                run_number: Some(run_number),
                name: plan.name.clone(),
                plan_sha256: plan_id.to_string(),
                rounds: plan.rounds,
                strategy: plan.strategy.name().to_string(),
                privacy: plan.privacy.mode,
                noise_multiplier: plan.privacy.noise_multiplier,
                target_epsilon: plan.privacy.target_epsilon,
                delta: plan.privacy.delta,
                secure_aggregation: plan.secure_aggregation,
                initial_model: model.to_hex(),
            },
        });
        let mut this = Self {
            plan_id,
            run_id,
            run_number,
            server: ServerState::new(plan.strategy.clone(), num_params),
            acc: Accumulator::new(num_params),
            plan,
            wire_toml,
            started: now,
            epoch,
            epoch_unix_ms,
            run,
            global,
            model,
            model_bytes,
            round_metrics: BTreeMap::new(),
            final_metrics: BTreeMap::new(),
            last_closed: None,
            lineage: vec![model],
            participants: vec![],
            client_dp,
            secure: SecureGaussian::from_os(),
            secagg: None,
            secagg_noise,
            secagg_rho: 0.0,
            round_updates: Vec::new(),
            finishing: None,
            finished: false,
            cancelled: false,
        };
        // Durable before any node hears of the run: a restart finds it and offers it again.
        fx.push(this.checkpoint_effect(None));
        this.apply(actions, now, fx);
        this
    }

    /// A run rebuilt from its checkpoint (see `checkpoint.rs`), with its plan state machine
    /// already resumed.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn restored(
        prepared: Prepared,
        cp: &super::checkpoint::RunCheckpoint,
        run: PlanRun,
        global: Weights,
        server: ServerState,
        lineage: Vec<ContentHash>,
        now: Millis,
        (epoch, epoch_unix_ms): (Instant, u64),
    ) -> Self {
        let Prepared { plan, plan_id, wire_toml, client_dp, secagg_noise } = prepared;
        let num_params = global.values().len();
        // The adaptive clip norm is the checkpoint's; σ and the plan's ε are the plan's.
        let client_dp = match (client_dp, &cp.client_dp) {
            (Some((_, cost)), Some(saved)) => Some((saved.clone(), cost)),
            (other, _) => other,
        };
        let model = lineage.last().copied().unwrap_or_else(|| ContentHash::of(&[]));
        Self {
            plan_id,
            run_id: cp.run_id.clone(),
            run_number: cp.run_number,
            plan,
            wire_toml,
            started: now,
            epoch,
            epoch_unix_ms,
            run,
            global,
            model,
            model_bytes: cp.model_bytes,
            server,
            acc: Accumulator::new(num_params),
            round_metrics: BTreeMap::new(),
            final_metrics: super::checkpoint::metrics_from_saved(&cp.final_metrics),
            last_closed: cp.last_round.clone(),
            lineage,
            participants: vec![],
            client_dp,
            secure: SecureGaussian::from_os(),
            secagg: None,
            secagg_noise,
            secagg_rho: cp.secagg_rho,
            round_updates: Vec::new(),
            finishing: None,
            finished: false,
            cancelled: false,
        }
    }

    pub fn plan_id(&self) -> &PlanId {
        &self.plan_id
    }

    pub fn run_id(&self) -> &RunId {
        &self.run_id
    }

    /// The run's number among its plan's runs (1 for the first).
    pub fn run_number(&self) -> u32 {
        self.run_number
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Whether the run ended (its `Finish` effect was returned).
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Rounds whose aggregate was applied.
    pub fn rounds_completed(&self) -> u32 {
        self.run.rounds_completed()
    }

    /// The `Instant` the secure-aggregation server is given for the engine's `now`.
    pub(super) fn instant(&self, now: Millis) -> Instant {
        instant(self.epoch, now)
    }

    /// Logical time: milliseconds since the run started.
    pub(super) fn logical(&self, now: Millis) -> Millis {
        now.saturating_sub(self.started)
    }

    pub(super) fn node_connected(&mut self, node: &NodeName, now: Millis, fx: &mut Vec<Effect>) {
        let actions = self.run.node_connected(node, self.logical(now));
        self.apply(actions, now, fx);
    }

    pub(super) fn node_disconnected(&mut self, node: &NodeName, now: Millis, fx: &mut Vec<Effect>) {
        let actions = self.run.node_disconnected(node, self.logical(now));
        self.apply(actions, now, fx);
        let at = self.instant(now);
        let sa = self.secagg.as_mut().map(|r| r.server.disconnected(node, at));
        self.apply_secagg(sa.unwrap_or_default(), now, fx);
    }

    pub(super) fn tick(&mut self, now: Millis, fx: &mut Vec<Effect>) {
        let actions = self.run.tick(self.logical(now));
        self.apply(actions, now, fx);
        let at = self.instant(now);
        let sa = self.secagg.as_mut().map(|r| r.server.tick(at));
        self.apply_secagg(sa.unwrap_or_default(), now, fx);
    }

    pub(super) fn decision(&mut self, node: &NodeName, response: PlanResponse, now: Millis, fx: &mut Vec<Effect>) {
        // Only an answer the run counted is audited and published: repeating one's answer (or
        // answering after recruiting) changes nothing and costs no record.
        let t = self.logical(now);
        let Some(actions) = self.run.decide(node, response.accept, &response.reason, t) else {
            tracing::debug!(node = %node, "repeated or late answer to the offer; discarded");
            return;
        };
        if response.accept {
            tracing::info!(node = %node, "accepted the plan");
        } else {
            tracing::warn!(node = %node, reason = response.reason, "refused the plan");
        }
        // Counted against the node's quota all the same: accept/refuse/accept… changes the answer
        // each time.
        let decision = PlanDecision {
            node: Some(node.to_string()),
            plan_id: response.plan_id.clone(),
            run: None,
            reason: response.reason.clone(),
            epsilon: response.privacy.as_ref().map(|p| p.epsilon),
            delta: response.privacy.as_ref().map(|p| p.delta),
        };
        let event =
            if response.accept { AuditEvent::PlanAccepted(decision) } else { AuditEvent::PlanRefused(decision) };
        fx.push(Effect::AuditMember { node: node.clone(), event });
        self.publish(
            fx,
            plan_event::Kind::NodeDecision(proto::NodeDecision {
                node: node.to_string(),
                accepted: response.accept,
                reason: response.reason,
                privacy: response.privacy,
            }),
        );
        self.apply(actions, now, fx);
    }

    /// A participant's heartbeat: the plan state machine decides whether it counts; a change of
    /// state is published (never audited: heartbeats would flood the log).
    pub(super) fn heartbeat(
        &mut self,
        node: &NodeName,
        round: u32,
        activity: crate::round::Activity,
        now: Millis,
        fx: &mut Vec<Effect>,
    ) -> Result<(), Refused> {
        let actions = self.run.heartbeat(node, round, activity, self.logical(now))?;
        self.apply(actions, now, fx);
        Ok(())
    }

    pub(super) fn evaluation(&mut self, node: &NodeName, report: EvaluationReport, now: Millis, fx: &mut Vec<Effect>) {
        if report.model_sha256 != self.model.to_hex() {
            tracing::warn!(node = %node, "evaluation of a model that is not this plan's final model; ignored");
            return;
        }
        let kept = !report.metrics.is_empty() && self.run.awaits_evaluation(node);
        if kept {
            self.final_metrics.insert(node.clone(), report.metrics);
        }
        let actions = self.run.evaluated(node, self.logical(now));
        self.apply(actions, now, fx);
        // Saved while the evaluation goes on (not after the last report: the run's end follows):
        // a node evaluates a model once, so a restart must not need this node's metrics again.
        // Only work saved: a failure to write it is logged, and the run goes on.
        if kept && !self.finished && self.finishing.is_none() {
            let mut cp = self.checkpoint_effect(None);
            if let Effect::Checkpoint { required, .. } = &mut cp {
                *required = false;
            }
            fx.push(cp);
        }
    }

    /// The lead ends the run: it fails with the lead's name as the reason.
    pub(super) fn cancel(&mut self, actor: &str, by: &str, connected: &BTreeSet<NodeName>, fx: &mut Vec<Effect>) {
        let reason = format!("cancelled by {by}");
        fx.push(Effect::Audit {
            actor: Actor::Fingerprint(actor.to_string()),
            event: AuditEvent::PlanCancelled {
                plan_id: self.plan_id.to_string(),
                run: self.run_id.to_string(),
                by: by.to_string(),
                rounds_completed: self.run.rounds_completed(),
            },
        });
        self.cancelled = true;
        let actions = self.run.cancel(&reason);
        self.apply(actions, 0, fx);
        self.flush_finish(connected, fx);
    }

    /// The executor could not carry out an effect the run depends on.
    pub(super) fn fail(&mut self, reason: &str, connected: &BTreeSet<NodeName>, fx: &mut Vec<Effect>) {
        let actions = self.run.aggregation_failed(reason);
        self.apply(actions, 0, fx);
        self.flush_finish(connected, fx);
    }

    /// Checks an update against the plan and folds it in; the round goes on either way.
    pub(super) fn update(
        &mut self,
        node: &NodeName,
        update: Update,
        now: Millis,
        fx: &mut Vec<Effect>,
    ) -> Result<(), Refused> {
        let received = AuditEvent::UpdateReceived {
            node: node.to_string(),
            plan_id: update.plan_id.to_string(),
            round: u64::from(update.round),
            payload_sha256: update.payload_sha256.clone(),
            bytes: update.bytes,
            masked: update.masked,
        };
        let entry =
            RoundUpdate { node: node.to_string(), payload_sha256: update.payload_sha256.clone(), bytes: update.bytes };
        let round = update.round;
        let mut later = Vec::new();
        self.admit_checked(node, update, entry, now, &mut later)?;
        // No further upload of this node is spooled this round (the handlers' pre-spool check).
        fx.push(Effect::Admitted { plan_id: self.plan_id.clone(), round, node: node.clone() });
        fx.push(Effect::Audit { actor: Actor::Node(node.clone()), event: received });
        fx.append(&mut later);
        Ok(())
    }

    /// Admits an update, listing `entry` in the round's updates before anything else happens: the
    /// update that closes the round is in the record its sender countersigns.
    fn admit_checked(
        &mut self,
        node: &NodeName,
        update: Update,
        entry: RoundUpdate,
        now: Millis,
        fx: &mut Vec<Effect>,
    ) -> Result<(), Refused> {
        if update.plan_id != self.plan_id || update.base_model != self.model.to_hex() {
            return Err(Refused::OtherPlanOrModel);
        }
        // Nothing of a failed attempt is aggregated, even an upload that completed as the retry
        // opened (the retry reopens the same round number on the same model).
        if let Some(open) = self.run.attempt()
            && self.run.open_round() == Some(update.round)
            && open != update.attempt
        {
            return Err(Refused::FailedAttempt { round: update.round, sent: update.attempt, open });
        }
        let t = self.logical(now);
        let at = self.instant(now);
        if let Some(sa) = self.secagg.as_mut() {
            if !update.masked {
                return Err(Refused::Invalid(
                    "this round uses secure aggregation: only masked inputs are accepted".into(),
                ));
            }
            let words = sanctum_protocol::secagg::wire::words_from_le(&update.payload)
                .map_err(|e| Refused::Invalid(e.to_string()))?;
            // The plan run is asked first, changing nothing: `masked_input` folds the input into
            // the sum, which cannot be undone, so it runs only for an input the run will admit
            // (with the same `now`, `admit_update` below then cannot refuse it).
            self.run.can_admit(node, update.round, t)?;
            // The masked input joins the running sum only if the node may send one now.
            let sa_actions = sa.server.masked_input(node, &words, at).map_err(|e| Refused::Invalid(e.to_string()))?;
            let actions = self.run.admit_update(node, update.round, t)?;
            if let Some(m) = update.metrics.into_iter().next() {
                self.round_metrics.insert(node.to_string(), m);
            }
            tracing::info!(node = %node, round = update.round, "masked input accepted");
            self.round_updates.push(entry);
            self.apply_secagg(sa_actions, now, fx);
            self.apply(actions, now, fx);
            return Ok(());
        }
        let weight = match self.plan.strategy.weighting() {
            Weighting::Samples if update.sample_count == 0 => {
                return Err(Refused::Invalid("sample_count is 0 but the plan weights updates by sample count".into()));
            }
            // The node's own word, capped as under secure aggregation: one hospital claiming
            // u64::MAX samples weighs as much as one with `max_samples`, not 10¹⁵ times more.
            Weighting::Samples => sample_weight(update.sample_count, self.plan.secagg_settings().max_samples),
            Weighting::Uniform => 1.0,
        };
        let mut values = transfer::le_bytes_to_f32(&update.payload).map_err(|e| Refused::Invalid(e.to_string()))?;
        self.acc.check(&values).map_err(|e| Refused::Invalid(e.to_string()))?;
        let actions = self.run.admit_update(node, update.round, t)?;
        if let Some((dp, _)) = self.client_dp.as_mut() {
            let norm = dp.clip(&mut values);
            tracing::debug!(node = %node, norm, clip = dp.clip_norm(), "update clipped for client-level DP");
        }
        self.acc.add(&values, weight).map_err(|e| Refused::Invalid(e.to_string()))?;
        if let Some(m) = update.metrics.into_iter().next() {
            self.round_metrics.insert(node.to_string(), m);
        }
        tracing::info!(node = %node, round = update.round, "update accepted");
        self.round_updates.push(entry);
        self.apply(actions, now, fx);
        Ok(())
    }

    fn send(&self, fx: &mut Vec<Effect>, node: &NodeName, kind: directive::Kind) {
        fx.push(Effect::Send { node: node.clone(), kind });
    }

    pub(super) fn publish(&self, fx: &mut Vec<Effect>, kind: plan_event::Kind) {
        fx.push(Effect::Publish { plan_id: self.plan_id.clone(), run_id: self.run_id.clone(), kind });
    }

    fn offer(&self) -> directive::Kind {
        directive::Kind::OfferPlan(proto::OfferPlan {
            plan_id: self.plan_id.to_string(),
            plan_toml: self.wire_toml.clone(),
            run: self.run_id.to_string(),
        })
    }

    /// Carries out the plan state machine's actions, and those they lead to.
    pub(super) fn apply(&mut self, actions: Vec<Action>, now: Millis, fx: &mut Vec<Effect>) {
        let mut queue: VecDeque<Action> = actions.into();
        while let Some(action) = queue.pop_front() {
            if self.finished || self.finishing.is_some() {
                return;
            }
            let plan_id = self.plan_id.clone();
            match action {
                Action::Offer(nodes) => {
                    let offer = self.offer();
                    for n in nodes {
                        self.send(fx, &n, offer.clone());
                    }
                }
                Action::OpenRound { round, participants, deadline } => {
                    if self.run.rounds_completed() == 0 {
                        // Recruiting is over: who accepted is durable before round 1 starts, so a
                        // restart during round 1 offers the run again to exactly them.
                        fx.push(self.checkpoint_effect(None));
                    }
                    self.acc = Accumulator::new(self.global.values().len());
                    self.round_metrics.clear();
                    self.round_updates.clear();
                    self.participants = participants.clone();
                    self.secagg = None;
                    let deadline_engine = self.started.saturating_add(deadline);
                    if self.plan.secure_aggregation {
                        let num_params = self.global.values().len();
                        let opened = SecAggRound::open(
                            &self.plan,
                            &plan_id,
                            round,
                            &participants.iter().map(NodeName::to_string).collect::<Vec<_>>(),
                            num_params,
                            self.secagg_noise,
                            self.instant(now),
                            self.instant(deadline_engine),
                        );
                        match opened {
                            Ok(sa) => {
                                tracing::info!(
                                    round,
                                    threshold = sa.setup.threshold,
                                    gamma = sa.encoding.gamma(),
                                    "secure aggregation opened"
                                );
                                self.secagg = Some(sa);
                            }
                            Err(reason) => {
                                queue.extend(self.run.aggregation_failed(&reason.to_string()));
                                continue;
                            }
                        }
                    }
                    fx.push(Effect::OpenUploads(UploadRound {
                        plan_id: plan_id.clone(),
                        run_id: self.run_id.clone(),
                        round,
                        attempt: self.run.attempt().unwrap_or(1),
                        model: self.model,
                        num_params: self.global.values().len(),
                        masked: self.secagg.is_some(),
                        participants: participants.iter().cloned().collect(),
                    }));
                    let start = self.start_round(round, deadline_engine);
                    tracing::info!(round, nodes = participants.len(), model = %self.model.short(), "round opened");
                    fx.push(Effect::Audit {
                        actor: Actor::Coordinator,
                        event: AuditEvent::RoundOpened {
                            plan_id: plan_id.to_string(),
                            round: u64::from(round),
                            participants: participants.iter().map(ToString::to_string).collect(),
                            model_sha256: self.model.to_hex(),
                            secure_aggregation: self.secagg.as_ref().map(|sa| sa.setup.participants.clone()),
                            threshold: self.secagg.as_ref().map(|sa| sa.setup.threshold as u64),
                        },
                    });
                    self.publish(
                        fx,
                        plan_event::Kind::RoundOpened(proto::RoundOpened {
                            round,
                            participants: participants.iter().map(NodeName::to_string).collect(),
                            model_sha256: self.model.to_hex(),
                        }),
                    );
                    for n in &participants {
                        self.send(fx, n, start.clone());
                    }
                }
                Action::Reoffer(node) => {
                    tracing::info!(node = %node, "node reconnected during the plan; offering it again");
                    let offer = self.offer();
                    self.send(fx, &node, offer);
                }
                Action::Rejoin { node, .. } if self.secagg.is_some() => {
                    // Its round keys and shares were lost with its process: it cannot rejoin this
                    // secure-aggregation round, and the round stops waiting for it.
                    tracing::info!(node = %node, "participant reconnected; it rejoins at the next round (secure aggregation)");
                    let t = self.logical(now);
                    queue.extend(self.run.leave_round(&node, t));
                }
                Action::Rejoin { node, round, deadline } => {
                    tracing::info!(node = %node, round, "participant reconnected; sending the round again");
                    let start = self.start_round(round, self.started.saturating_add(deadline));
                    self.send(fx, &node, start);
                }
                Action::CloseRound { round, .. } if self.secagg.is_some() => {
                    // The masked inputs are in; the unmasking steps follow (see `apply_secagg`). The
                    // protocol's input step ends only here or when every input is in, so the sum is
                    // never ready before the plan round closes.
                    fx.push(Effect::CloseUploads { plan_id: plan_id.clone() });
                    let at = self.instant(now);
                    let sa_actions = self.secagg.as_mut().map(|sa| sa.server.end_inputs(at));
                    tracing::info!(round, "masked inputs collected; unmasking");
                    self.apply_secagg(sa_actions.unwrap_or_default(), now, fx);
                }
                Action::CloseRound { round, reported, dropped } => {
                    fx.push(Effect::CloseUploads { plan_id: plan_id.clone() });
                    let next = match self.close_round(round, fx) {
                        Ok(()) => self.publish_round_closed(round, &reported, &dropped, now, fx),
                        Err(reason) => {
                            tracing::error!(round, "aggregation failed: {reason}");
                            self.run.aggregation_failed(&reason.to_string())
                        }
                    };
                    queue.extend(next);
                }
                Action::Evaluate(nodes) => {
                    let ev = directive::Kind::Evaluate(proto::Evaluate {
                        plan_id: plan_id.to_string(),
                        model_sha256: self.model.to_hex(),
                        model_bytes: self.model_bytes,
                        run: self.run_id.to_string(),
                    });
                    for n in nodes {
                        if self.final_metrics.contains_key(&n) {
                            // Its metrics came before a restart (and are in the checkpoint).
                            queue.extend(self.run.evaluated(&n, self.logical(now)));
                        } else {
                            self.send(fx, &n, ev.clone());
                        }
                    }
                }
                Action::RoundFailed { round, attempt, reason, retrying } => {
                    // Nothing of the failed attempt is aggregated: its uploads close, and a retry
                    // starts from the same global model with a fresh accumulator (`OpenRound`).
                    fx.push(Effect::CloseUploads { plan_id: plan_id.clone() });
                    self.secagg = None;
                    if retrying {
                        tracing::warn!(round, attempt, "round failed; retrying: {reason}");
                    } else {
                        tracing::error!(round, attempt, "round failed; no retry left: {reason}");
                    }
                    fx.push(Effect::Audit {
                        actor: Actor::Coordinator,
                        event: AuditEvent::RoundFailed {
                            plan_id: plan_id.to_string(),
                            run: self.run_id.to_string(),
                            round: u64::from(round),
                            attempt,
                            reason: reason.clone(),
                            retrying,
                        },
                    });
                    self.publish(
                        fx,
                        plan_event::Kind::RoundFailed(proto::RoundFailed { round, attempt, reason, retrying }),
                    );
                }
                Action::Participant { round, node, phase } => {
                    if let crate::round::ParticipantPhase::Dropped(why) = &phase {
                        tracing::warn!(node = %node, round, "participant dropped from the round: {why}");
                    }
                    self.publish(
                        fx,
                        plan_event::Kind::ParticipantState(proto::ParticipantState {
                            round,
                            node: node.into_string(),
                            state: phase.name().into(),
                            reason: phase.reason().into(),
                        }),
                    );
                }
                Action::Finish { success, reason } => {
                    self.finishing = Some((success, reason));
                    return;
                }
            }
        }
    }

    /// The directive that asks a participant to train `round` on the current global model, due at
    /// `deadline` on the engine's clock.
    fn start_round(&self, round: u32, deadline: Millis) -> directive::Kind {
        directive::Kind::StartRound(proto::StartRound {
            plan_id: self.plan_id.to_string(),
            round,
            model_sha256: self.model.to_hex(),
            model_bytes: self.model_bytes,
            deadline_unix_ms: self.epoch_unix_ms.saturating_add(deadline),
            secure_aggregation: self.secagg.as_ref().map(|sa| sa.setup.clone()),
            run: self.run_id.to_string(),
            heartbeat_interval_ms: self.run.heartbeat_interval(),
        })
    }

    /// Stores the new global model and records it in the lineage.
    pub(super) fn store_global(&mut self, fx: &mut Vec<Effect>) -> Result<(), super::AggregationFailed> {
        let bytes = self.global.to_safetensors()?;
        self.model = ContentHash::of(&bytes);
        self.model_bytes = bytes.len() as u64;
        self.lineage.push(self.model);
        fx.push(Effect::StoreModel { plan_id: self.plan_id.clone(), hash: self.model, bytes: Arc::new(bytes) });
        Ok(())
    }

    /// Applies the server step to the admitted updates and stores the new global model.
    fn close_round(&mut self, round: u32, fx: &mut Vec<Effect>) -> Result<(), super::AggregationFailed> {
        if self.acc.count() == 0 {
            return Err(super::AggregationFailed::NoUpdate);
        }
        let mean = match self.client_dp.as_mut() {
            Some((dp, _)) => {
                let secure = &mut self.secure;
                dp.release(self.acc.sum(), self.participants.len(), &mut |std| secure.sample(std))
            }
            None => self.acc.mean().ok_or(super::AggregationFailed::NoUpdate)?,
        };
        // A step that would leave a non-finite model (NaN or infinity: FedAdam or FedAvg pushed
        // past f32's range) changes nothing and fails the round with the reason; the model is
        // neither stored nor published.
        self.server
            .step(self.global.values_mut(), &mean)
            .map_err(|source| super::AggregationFailed::Step { round, source })?;
        self.store_global(fx)?;
        tracing::info!(round, updates = self.acc.count(), model = %self.model.short(), "round aggregated");
        Ok(())
    }

    /// Tells the lead (and the audit log) a round closed with the new model, asks those who
    /// reported to countersign its record, and moves the plan on.
    pub(super) fn publish_round_closed(
        &mut self,
        round: u32,
        reported: &[NodeName],
        dropped: &[NodeName],
        now: Millis,
        fx: &mut Vec<Effect>,
    ) -> Vec<Action> {
        // The round is durable (with the state after it) before anyone is told it closed. The
        // plan state machine is asked first, so the checkpoint holds the completed round.
        let next = self.run.round_aggregated(round, self.logical(now));
        let record = AuditEvent::RoundRecord {
            plan_id: self.plan_id.to_string(),
            round: u64::from(round),
            model_sha256: self.model.to_hex(),
            updates: self.round_updates.clone(),
            reported: reported.iter().map(ToString::to_string).collect(),
            dropped: dropped.iter().map(ToString::to_string).collect(),
        };
        fx.push(self.checkpoint_effect(Some(super::checkpoint::ClosedRound {
            round,
            model_sha256: self.model.to_hex(),
            reported: reported.to_vec(),
            dropped: dropped.to_vec(),
            // Cannot fail: the record's fields are strings, numbers and lists of them.
            record: record.to_parts().map(|(_, params)| params).unwrap_or_default(),
        })));
        let metrics = self
            .round_metrics
            .iter()
            .map(|(node, m)| proto::NodeMetric {
                node: node.clone(),
                value: m.value,
                samples: m.samples,
                name: m.name.clone(),
            })
            .collect();
        self.publish(
            fx,
            plan_event::Kind::RoundClosed(proto::RoundClosed {
                round,
                reported: reported.iter().map(NodeName::to_string).collect(),
                dropped: dropped.iter().map(NodeName::to_string).collect(),
                metrics,
                new_model_sha256: self.model.to_hex(),
            }),
        );
        fx.push(Effect::RoundRecord {
            plan_id: self.plan_id.clone(),
            run_id: self.run_id.clone(),
            round,
            record,
            countersigners: reported.to_vec(),
        });
        next
    }

    /// Carries out a finish the plan state machine asked for: the final model's export, the
    /// lead's summary, and `PlanClosed` to every connected node.
    pub(super) fn flush_finish(&mut self, connected: &BTreeSet<NodeName>, fx: &mut Vec<Effect>) {
        let Some((success, reason)) = self.finishing.take() else {
            return;
        };
        if self.finished {
            return;
        }
        self.finished = true;
        self.secagg = None;
        fx.push(Effect::CloseUploads { plan_id: self.plan_id.clone() });
        let export = success.then(|| Box::new(self.export_job()));
        // The coordinator holds no schema: the headline metric is the one the nodes report first.
        let metric_name = self
            .final_metrics
            .values()
            .find_map(|m| m.first())
            .map_or_else(|| "metric".to_string(), |m| m.name.clone());
        let finished = PlanFinished {
            success,
            reason: reason.clone(),
            rounds_completed: self.run.rounds_completed(),
            final_model_sha256: self.model.to_hex(),
            metric_name,
            final_metrics: self
                .final_metrics
                .iter()
                .flat_map(|(node, ms)| {
                    ms.iter().map(|m| proto::NodeMetric {
                        node: node.to_string(),
                        value: m.value,
                        samples: m.samples,
                        name: m.name.clone(),
                    })
                })
                .collect(),
            model_path: String::new(),
            client_epsilon: match (&self.client_dp, self.secagg_noise, self.plan.privacy.delta) {
                (Some((_, c)), _, _) => c.epsilon,
                (None, Some(_), Some(delta)) if self.secagg_rho > 0.0 => {
                    privacy::distributed::epsilon_for_rho(self.secagg_rho, delta).unwrap_or(f64::INFINITY)
                }
                _ => 0.0,
            },
            client_delta: match (&self.client_dp, self.secagg_noise) {
                (Some((_, c)), _) => c.delta,
                (None, Some(_)) => self.plan.privacy.delta.unwrap_or(0.0),
                _ => 0.0,
            },
        };
        if success {
            tracing::info!(plan = self.plan.name, "plan finished: {reason}");
        } else {
            tracing::error!(plan = self.plan.name, "plan failed: {reason}");
        }
        let closed = directive::Kind::PlanClosed(proto::PlanClosed {
            plan_id: self.plan_id.to_string(),
            success,
            reason,
            run: self.run_id.to_string(),
        });
        fx.push(Effect::Finish {
            plan_id: self.plan_id.clone(),
            run_id: self.run_id.clone(),
            export,
            finished: Box::new(finished),
            closed: Box::new(closed),
            notify: connected.iter().cloned().collect(),
            cancelled: self.cancelled,
        });
    }

    /// The final model and its manifest: plan, lineage hash chain, metrics.
    fn export_job(&self) -> ExportJob {
        let mut manifest = serde_json::Map::new();
        let final_metrics: serde_json::Map<String, serde_json::Value> = self
            .final_metrics
            .iter()
            .map(|(n, ms)| {
                let list = ms
                    .iter()
                    .map(|m| json!({"name": m.name, "value": m.value, "samples": m.samples}))
                    .collect::<Vec<_>>();
                (n.to_string(), list.into())
            })
            .collect();
        for (k, v) in [
            ("plan_name", json!(self.plan.name)),
            ("plan_id", json!(self.plan_id)),
            ("run", json!(self.run_id)),
            ("strategy", json!(self.plan.strategy.name())),
            ("model", json!(self.plan.model.name())),
            ("rounds_completed", json!(self.run.rounds_completed())),
            ("final_model_sha256", json!(self.model.to_hex())),
            ("lineage", json!(self.lineage.iter().map(|h| h.to_hex()).collect::<Vec<_>>())),
            ("final_metrics", serde_json::Value::Object(final_metrics)),
            ("plan_toml", json!(self.wire_toml)),
        ] {
            manifest.insert(k.to_string(), v);
        }
        // The name is checked at `Plan::parse`; the executor keeps every file inside the exports
        // directory even so.
        ExportJob { stem: format!("{}-{}", self.plan.name, self.model.short()), model: self.model, manifest }
    }
}
