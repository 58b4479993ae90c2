//! One run of a plan inside the engine: its plan state machine (`round::PlanRun`), the global
//! model and server optimizer, the open round's accumulator (or, for a robust aggregator, the
//! round buffer its updates are kept in until the round closes), client-level DP and secure
//! aggregation. Every method appends what the executor must do to an effect list; nothing here
//! reads a clock or touches a file (a robust run's buffer is a trait object the executor
//! injected, whose errors come back as values).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sanctum_protocol::audit::{AuditEvent, PlanDecision, RoundUpdate};
use sanctum_protocol::hash::ContentHash;
use sanctum_protocol::model::Weights;
use sanctum_protocol::plan::{Plan, Weighting};
use sanctum_protocol::privacy::noise::SecureGaussian;
use sanctum_protocol::proto::{self, EvaluationReport, PlanResponse, directive, plan_event};

use super::effects::{Actor, Effect};
use super::{Millis, NodeName, Payload, PlanId, Refused, RunId, Update, instant, short};
use crate::aggregate::{Accumulator, ClientDp, sample_weight};
use crate::round::PlanRun;
use crate::secure::SecAggRound;
use crate::strategy::ServerState;
use crate::strategy::robust::{RobustRound, RoundBuffers};

mod apply;
mod close;
mod prepare;

pub use prepare::Prepared;
pub(super) use prepare::{ClientDpCost, run_config};

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
    /// The robust aggregator's rule and the open round's kept updates, when the plan names one
    /// (then `acc` only checks updates; it sums nothing).
    pub(super) robust: Option<RobustRound>,
    /// Metrics reported with this round's updates (of the round's starting model).
    pub(super) round_metrics: BTreeMap<String, Vec<proto::Metric>>,
    /// Every metric each node reported on the final model, in its order (the first is the task's
    /// headline metric).
    pub(super) final_metrics: BTreeMap<NodeName, Vec<proto::Metric>>,
    /// The last round a checkpoint closed, kept in every later checkpoint of the run (one during
    /// the final evaluation too) so a restart still completes its audit records.
    pub(super) last_closed: Option<crate::engine::checkpoint::ClosedRound>,
    /// Hash of the initial model and of every round's result, in order.
    pub(super) lineage: Vec<ContentHash>,
    pub(super) participants: Vec<NodeName>,
    /// Client-level DP (DP-FedAvg) when the plan asks for it, with the ε it gives the plan.
    pub(super) client_dp: Option<(ClientDp, ClientDpCost)>,
    /// Noise for DP-FedAvg: OS-keyed AES-256-CTR (keyed once at the run's start: randomness, not I/O).
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
        buffers: &dyn RoundBuffers,
        fx: &mut Vec<Effect>,
    ) -> Self {
        let Prepared { plan, plan_id, wire_toml, client_dp, secagg_noise } = prepared;
        let global = plan.initial_global();
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
        let robust = robust_round(&plan, &run_id, num_params, buffers);
        let mut this = Self {
            plan_id,
            run_id,
            run_number,
            server: ServerState::new(plan.strategy.clone(), num_params),
            acc: Accumulator::new(num_params),
            robust,
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
        cp: &crate::engine::checkpoint::RunCheckpoint,
        run: PlanRun,
        global: Weights,
        server: ServerState,
        lineage: Vec<ContentHash>,
        now: Millis,
        (epoch, epoch_unix_ms): (Instant, u64),
        buffers: &dyn RoundBuffers,
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
            robust: robust_round(&plan, &cp.run_id, num_params, buffers),
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
            final_metrics: crate::engine::checkpoint::metrics_from_saved(&cp.final_metrics),
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
            let Payload::Words(words) = &update.payload else {
                return Err(Refused::Invalid(
                    "this round uses secure aggregation: only masked inputs are accepted".into(),
                ));
            };
            // The plan run is asked first, changing nothing: `masked_input` folds the input into
            // the sum, which cannot be undone, so it runs only for an input the run will admit
            // (with the same `now`, `admit_update` below then cannot refuse it).
            self.run.can_admit(node, update.round, t)?;
            // The masked input joins the running sum only if the node may send one now.
            let sa_actions = sa.server.masked_input(node, words, at).map_err(|e| Refused::Invalid(e.to_string()))?;
            let actions = self.run.admit_update(node, update.round, t)?;
            self.round_metrics.insert(node.to_string(), kept_metrics(update.metrics));
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
        let Payload::Values(values) = update.payload else {
            return Err(Refused::Invalid(
                "this round does not use secure aggregation: masked inputs are not accepted".into(),
            ));
        };
        // Checked finite as it was read back (`FiniteValues`); the shape here.
        self.acc.check_shape(values.len()).map_err(|e| Refused::Invalid(e.to_string()))?;
        let actions = self.run.admit_update(node, update.round, t)?;
        if let Some(robust) = self.robust.as_mut() {
            // Checked (shape, finite) and admitted: kept until the round closes. An update that
            // cannot be kept fails the round (as an aggregation that cannot be made does), so
            // the round's actions, its close among them, are not carried out.
            if let Err(e) = robust.put(node.as_str(), weight, values.as_slice()) {
                let reason = format!(
                    "round {}: {}: the update of {node} could not be kept until the round closes: {e}; check the disk of the coordinator's state directory (spool/robust)",
                    update.round,
                    robust.name()
                );
                tracing::error!("aggregation failed: {reason}");
                let failed = self.run.aggregation_failed(&reason);
                self.apply(failed, now, fx);
                return Ok(());
            }
            self.round_metrics.insert(node.to_string(), kept_metrics(update.metrics));
            tracing::info!(node = %node, round = update.round, kept = robust.count(), "update accepted and kept for the robust aggregator");
            self.round_updates.push(entry);
            self.apply(actions, now, fx);
            return Ok(());
        }
        if let Some((dp, _)) = self.client_dp.as_mut() {
            let mut clipped = values.into_inner();
            let norm = dp.clip(&mut clipped);
            tracing::debug!(node = %node, norm, clip = dp.clip_norm(), "update clipped for client-level DP");
            // Scaled by a factor in (0, 1]: still finite; checked again all the same.
            self.acc.add(&clipped, weight).map_err(|e| Refused::Invalid(e.to_string()))?;
        } else {
            self.acc.add_finite(&values, weight).map_err(|e| Refused::Invalid(e.to_string()))?;
        }
        self.round_metrics.insert(node.to_string(), kept_metrics(update.metrics));
        tracing::info!(node = %node, round = update.round, "update accepted");
        self.round_updates.push(entry);
        self.apply(actions, now, fx);
        Ok(())
    }

    /// Forgets the open round's kept updates (robust runs only).
    pub(super) fn clear_robust(&mut self) {
        if let Some(r) = self.robust.as_mut() {
            r.clear();
        }
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
}

/// What the coordinator keeps of the metrics a node sends with an update: its headline test
/// metric (the first that is not ε) and the ε it has spent on the run so far, each at most once;
/// nothing else a node sends is kept, so a node cannot grow the run's records.
fn kept_metrics(metrics: Vec<proto::Metric>) -> Vec<proto::Metric> {
    let is_eps = |m: &proto::Metric| m.name == sanctum_protocol::EPSILON_SPENT_METRIC;
    let headline = metrics.iter().find(|m| !is_eps(m)).cloned();
    let eps = metrics.into_iter().find(is_eps);
    headline.into_iter().chain(eps).collect()
}

/// The robust aggregator of a plan that names one, with the run's (empty) round buffer.
fn robust_round(plan: &Plan, run_id: &RunId, num_params: usize, buffers: &dyn RoundBuffers) -> Option<RobustRound> {
    let rule = crate::strategy::robust::rule(&plan.strategy)?;
    Some(RobustRound::new(rule, buffers.open(run_id.as_str()), num_params))
}
