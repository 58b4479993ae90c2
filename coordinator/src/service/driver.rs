//! The driver task: the one owner of the running plan. It turns events from the handlers and the
//! clock into the sans-IO state machines' inputs and their actions into messages and files.

use std::collections::{BTreeMap, VecDeque};
use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use sanctum_protocol::hash::ContentHash;
use sanctum_protocol::model::Weights;
use sanctum_protocol::plan::{Plan, PrivacyMode, Weighting};
use sanctum_protocol::privacy::noise::SecureGaussian;
use sanctum_protocol::privacy::{self, Accountant, SampledGaussian};
use sanctum_protocol::proto::{
    self, Directive, PlanFinished, SecAggMessage, directive, plan_event, sec_agg_message, sec_agg_step,
};
use sanctum_protocol::secagg::server::{Outcome, ServerAction};
use sanctum_protocol::secagg::wire;
use sanctum_protocol::transfer::{self};
use tokio::sync::mpsc;
use tonic::Status;

use serde_json::json;

use crate::aggregate::{Accumulator, ClientDp, ServerState, sample_weight};
use crate::round::{Action, PlanRun, RunConfig};
use crate::runs::fresh_run_id;
use crate::secure::{SecAggRound, SessionCertVerifier};
use crate::store::{Store, write_atomic};

use super::*;

/// The plan being run and everything the driver keeps for it.
struct ActiveRun {
    plan_id: String,
    /// This run's id (`OfferPlan.run`), unique per submission.
    run_id: String,
    plan: Plan,
    wire_toml: String,
    run: PlanRun,
    global: Weights,
    model: ContentHash,
    model_bytes: u64,
    server: ServerState,
    acc: Accumulator,
    /// Metrics reported with this round's updates (of the round's starting model).
    round_metrics: BTreeMap<String, proto::Metric>,
    /// The final model's evaluation at each node.
    /// Every metric each node reported on the final model, in its order (the first is the task's
    /// headline metric).
    final_metrics: BTreeMap<String, Vec<proto::Metric>>,
    /// Hash of the initial model and of every round's result, in order.
    lineage: Vec<ContentHash>,
    participants: Vec<String>,
    /// Client-level DP (DP-FedAvg) when the plan asks for it, with the ε it gives the plan.
    client_dp: Option<(ClientDp, ClientDpCost)>,
    /// Noise for DP-FedAvg: OS-seeded ChaCha20.
    secure: SecureGaussian,
    /// The open round's secure aggregation, when the plan asks for it.
    secagg: Option<SecAggRound>,
    /// Client-level distributed DP under secure aggregation: the noise multiplier, and the zCDP ρ
    /// of the rounds released so far.
    secagg_noise: Option<f64>,
    secagg_rho: f64,
    /// The open round's accepted updates (node, payload hash, bytes), for its receipt.
    round_updates: Vec<serde_json::Value>,
}

/// What client-level DP guarantees each hospital for the whole plan.
#[derive(Clone, Copy, Debug)]
struct ClientDpCost {
    noise_multiplier: f64,
    epsilon: f64,
    delta: f64,
}

/// Sets up DP-FedAvg for a plan in client mode: the noise multiplier (given, or the smallest that
/// meets the target over all rounds by the PLD accountant, with every hospital in every round)
/// and the resulting ε.
fn client_dp_for(plan: &Plan) -> Result<Option<(ClientDp, ClientDpCost)>, String> {
    let p = &plan.privacy;
    if p.mode != PrivacyMode::Client {
        return Ok(None);
    }
    let (Some(delta), Some(clip)) = (p.delta, p.clip_norm) else {
        return Err("client-level privacy needs privacy.delta and privacy.clip_norm".into());
    };
    let rounds = u64::from(plan.rounds);
    let sigma = match (p.noise_multiplier, p.target_epsilon) {
        (Some(s), _) => s,
        (None, Some(target)) => {
            privacy::noise_for_epsilon(Accountant::Pld, target, 1.0, rounds, delta).map_err(|e| e.to_string())?
        }
        (None, None) => return Err("client-level privacy needs noise_multiplier or target_epsilon".into()),
    };
    let run = SampledGaussian { sampling_rate: 1.0, noise_multiplier: sigma, steps: rounds };
    let epsilon = privacy::epsilon_with(Accountant::Pld, &run, delta).map_err(|e| e.to_string())?;
    let dp = ClientDp::new(sigma, clip, p.adaptive_clipping.clone())?;
    Ok(Some((dp, ClientDpCost { noise_multiplier: sigma, epsilon, delta })))
}

pub(super) struct Driver {
    inner: Arc<Inner>,
    active: Option<ActiveRun>,
    evaluation_deadline: Duration,
}

impl Driver {
    pub(super) fn new(inner: Arc<Inner>, evaluation_deadline: Duration) -> Self {
        Self { inner, active: None, evaluation_deadline }
    }

    pub(super) async fn run(mut self, mut rx: mpsc::Receiver<Event>) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                ev = rx.recv() => match ev {
                    Some(ev) => self.handle(ev),
                    None => return,
                },
                _ = tick.tick() => {
                    let now = Instant::now();
                    let actions = self.active.as_mut().map(|a| a.run.tick(now)).unwrap_or_default();
                    self.apply(actions);
                    let sa = self.active.as_mut().and_then(|a| a.secagg.as_mut()).map(|r| r.server.tick(now));
                    self.apply_secagg(sa.unwrap_or_default());
                    // A flood's summary is written within a period of its end, even if nothing follows.
                    self.inner.flush_audit_quota(now);
                }
            }
        }
    }

    fn handle(&mut self, ev: Event) {
        let now = Instant::now();
        match ev {
            Event::Connected { node } => {
                let actions = self.active.as_mut().map(|a| a.run.node_connected(&node, now)).unwrap_or_default();
                self.apply(actions);
            }
            Event::Disconnected { node, conn } => {
                let mut nodes = lock(&self.inner.nodes);
                if nodes.get(&node).is_some_and(|c| c.id == conn) {
                    let fingerprint = nodes.remove(&node).map(|c| c.fingerprint).unwrap_or_default();
                    drop(nodes);
                    // A subscribe/disconnect loop is itemised within the node's quota, then counted.
                    if self.inner.audit_member(&node, &fingerprint, "node_disconnected", [("node", json!(node))]) {
                        tracing::info!(node, "node disconnected");
                    }
                    let actions = self.active.as_mut().map(|a| a.run.node_disconnected(&node, now)).unwrap_or_default();
                    self.apply(actions);
                    let sa =
                        self.active.as_mut().and_then(|a| a.secagg.as_mut()).map(|r| r.server.disconnected(&node, now));
                    self.apply_secagg(sa.unwrap_or_default());
                }
            }
            Event::Submit { plan, model_file, again, actor, reply } => {
                let name = plan.name.clone();
                let result = self.submit(*plan, &model_file, again, &actor, now);
                if let Err(status) = &result {
                    self.inner.audit(
                        &actor,
                        "plan_rejected",
                        [("name", json!(name)), ("reason", json!(status.message()))],
                    );
                }
                let _ = reply.send(result);
            }
            Event::Decision { node, response } => {
                let Some(active) =
                    self.active.as_mut().filter(|a| a.plan_id == response.plan_id && a.run_id == response.run)
                else {
                    // The handler let only a started run's (bounded) ids through; still shown short.
                    // Debug only: a node can send these as fast as it likes (answers to a run that
                    // ended), and the log must not grow with them.
                    tracing::debug!(
                        node,
                        plan = short(&response.plan_id),
                        run = short(&response.run),
                        "decision for a run that is not running"
                    );
                    return;
                };
                // Only an answer the run counted is audited and published: repeating one's answer
                // (or answering after recruiting) changes nothing and costs no record.
                let Some(actions) = active.run.decide(&node, response.accept, &response.reason, now) else {
                    tracing::debug!(node, "repeated or late answer to the offer; discarded");
                    return;
                };
                let plan_id = active.plan_id.clone();
                if response.accept {
                    tracing::info!(node, "accepted the plan");
                } else {
                    tracing::warn!(node, reason = response.reason, "refused the plan");
                }
                // Counted against the node's quota all the same: accept/refuse/accept… changes the
                // answer each time.
                self.inner.audit_member(
                    &node,
                    &self.inner.fingerprint(&node),
                    if response.accept { "plan_accepted" } else { "plan_refused" },
                    [
                        ("node", json!(node)),
                        ("plan_id", json!(response.plan_id)),
                        ("reason", json!(response.reason)),
                        ("epsilon", json!(response.privacy.as_ref().map(|p| p.epsilon))),
                        ("delta", json!(response.privacy.as_ref().map(|p| p.delta))),
                    ],
                );
                self.inner.publish(
                    &plan_id,
                    plan_event::Kind::NodeDecision(proto::NodeDecision {
                        node,
                        accepted: response.accept,
                        reason: response.reason,
                        privacy: response.privacy,
                    }),
                );
                self.apply(actions);
            }
            Event::Update { node, update, reply } => match self.admit(&node, update, now) {
                Ok(actions) => {
                    let _ = reply.send(Ok(()));
                    self.apply(actions);
                }
                Err(reason) => {
                    let _ = reply.send(Err(reason));
                }
            },
            Event::SecAgg { node, cert_der, msg, reply } => {
                let result = self.secagg_message(&node, &cert_der, msg, now);
                match result {
                    Ok(actions) => {
                        let _ = reply.send(Ok(()));
                        self.apply_secagg(actions);
                    }
                    Err(reason) => {
                        // The handler's `reject` logs and audits it, within the node's quota.
                        tracing::debug!(node, "secure-aggregation message refused: {reason}");
                        let _ = reply.send(Err(reason));
                    }
                }
            }
            Event::Evaluation { node, report } => {
                let Some(active) = self.active.as_mut() else {
                    return;
                };
                if report.plan_id != active.plan_id || report.model_sha256 != active.model.to_hex() {
                    tracing::warn!(node, "evaluation of a model that is not this plan's final model; ignored");
                    return;
                }
                if !report.metrics.is_empty() {
                    active.final_metrics.insert(node.clone(), report.metrics);
                }
                let actions = active.run.evaluated(&node, now);
                self.apply(actions);
            }
        }
    }

    fn submit(
        &mut self,
        plan: Plan,
        model_file: &[u8],
        again: bool,
        actor: &str,
        now: Instant,
    ) -> Result<Submitted, Status> {
        if let Some(active) = &self.active {
            return Err(Status::failed_precondition(format!(
                "plan '{}' ({}) is still running; wait for it to finish",
                active.plan.name,
                short(&active.plan_id)
            )));
        }
        // The lead's handler parsed it, but `Coordinator::submit` takes a `Plan` from any caller:
        // every number the run computes with must be within the plan limits.
        plan.validate().map_err(|e| Status::invalid_argument(e.to_string()))?;
        let wire_toml = plan.to_wire_toml().map_err(|e| Status::invalid_argument(e.to_string()))?;
        let plan_id = Plan::id_of(&wire_toml).to_hex();
        // Validate everything that can refuse the plan before a run is recorded.
        let client_dp =
            if plan.secure_aggregation { None } else { client_dp_for(&plan).map_err(Status::invalid_argument)? };
        let secagg_noise =
            sanctum_protocol::secagg::encode::distributed_noise(&plan).map_err(Status::invalid_argument)?;
        crate::plan_files::check_model_file(&plan, model_file).map_err(Status::invalid_argument)?;
        if !model_file.is_empty() {
            // Stored by its hash, so nodes fetch it like a global model once they have approved it.
            self.inner.store.put_model(model_file).map_err(|e| Status::internal(format!("model store: {e}")))?;
        }
        let new_run = {
            let mut runs = lock(&self.inner.runs);
            let mut next = runs.clone();
            let new_run = next
                .admit(&plan_id, &plan.name, again, fresh_run_id())
                .map_err(|e| Status::failed_precondition(e.to_string()))?;
            // Durable before any hospital hears of the run, so its id is never given out twice.
            self.inner.runs_file.save(&next).map_err(|e| Status::internal(format!("{e}; the plan was not started")))?;
            *runs = next;
            new_run
        };
        lock(&self.inner.history).start(&new_run.id);
        let global = plan.model.init(plan.seed);
        let bytes = global.to_safetensors().map_err(|e| Status::internal(e.to_string()))?;
        let model = self.inner.store.put_model(&bytes).map_err(|e| Status::internal(format!("model store: {e}")))?;
        let num_params = global.values().len();
        let cfg = RunConfig {
            rounds: plan.rounds,
            min_nodes: plan.min_nodes,
            recruit_deadline: Duration::from_secs(plan.recruit_deadline_secs),
            round_deadline: Duration::from_secs(plan.round_deadline_secs),
            evaluation_deadline: self.evaluation_deadline,
        };
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
        let connected: Vec<String> = lock(&self.inner.nodes).keys().cloned().collect();
        let (run, actions) = PlanRun::start(cfg, connected, now);
        tracing::info!(plan = plan.name, id = short(&plan_id), run = new_run.number, model = %model.short(), "plan started");
        lock(&self.inner.plans).push(proto::PlanSummary {
            plan_id: plan_id.clone(),
            run: new_run.id.clone(),
            run_number: new_run.number,
            name: plan.name.clone(),
            status: "running".into(),
            rounds_planned: plan.rounds,
            ..Default::default()
        });
        self.inner.audit(
            actor,
            "plan_submitted",
            [
                ("plan_id", json!(plan_id)),
                ("run", json!(new_run.id)),
                ("run_number", json!(new_run.number)),
                ("name", json!(plan.name)),
                ("plan_sha256", json!(plan_id)),
                ("rounds", json!(plan.rounds)),
                ("strategy", json!(plan.strategy.name())),
                ("privacy", json!(plan.privacy.mode)),
                ("noise_multiplier", json!(plan.privacy.noise_multiplier)),
                ("target_epsilon", json!(plan.privacy.target_epsilon)),
                ("delta", json!(plan.privacy.delta)),
                ("secure_aggregation", json!(plan.secure_aggregation)),
                ("initial_model", json!(model.to_hex())),
            ],
        );
        self.active = Some(ActiveRun {
            plan_id: plan_id.clone(),
            run_id: new_run.id.clone(),
            server: ServerState::new(plan.strategy.clone(), num_params),
            acc: Accumulator::new(num_params),
            plan,
            wire_toml,
            run,
            global,
            model,
            model_bytes: bytes.len() as u64,
            round_metrics: BTreeMap::new(),
            final_metrics: BTreeMap::new(),
            lineage: vec![model],
            participants: vec![],
            client_dp,
            secure: SecureGaussian::from_os(),
            secagg: None,
            secagg_noise,
            secagg_rho: 0.0,
            round_updates: Vec::new(),
        });
        self.apply(actions);
        Ok(Submitted { plan_id, run: new_run.id, run_number: new_run.number })
    }

    /// Checks a spooled update against the plan and folds it in; the round goes on either way.
    fn admit(&mut self, node: &str, update: SpooledUpdate, now: Instant) -> Result<Vec<Action>, String> {
        let received = [
            ("node", json!(node)),
            ("plan_id", json!(update.plan_id)),
            ("round", json!(update.round)),
            ("payload_sha256", json!(update.payload_sha256)),
            ("bytes", json!(update.bytes)),
            ("masked", json!(update.masked)),
        ];
        let entry = json!({"node": node, "payload_sha256": update.payload_sha256, "bytes": update.bytes});
        let round = update.round;
        let actions = self.admit_checked(node, update, now)?;
        // No further upload of this node is spooled this round (the handlers' pre-spool check).
        if let Some(info) = self.inner.round.read().unwrap_or_else(|p| p.into_inner()).as_ref()
            && info.round == round
        {
            info.admitted(node);
        }
        if let Some(active) = self.active.as_mut() {
            active.round_updates.push(entry);
        }
        self.inner.audit(&self.inner.fingerprint(node), "update_received", received);
        Ok(actions)
    }

    fn admit_checked(&mut self, node: &str, update: SpooledUpdate, now: Instant) -> Result<Vec<Action>, String> {
        let active = self.active.as_mut().ok_or("no plan is running")?;
        if update.plan_id != active.plan_id || update.base_model != active.model.to_hex() {
            return Err("update is for another plan or model".into());
        }
        let mut bytes = Vec::new();
        let mut file = update.spool.reopen().map_err(|e| format!("spool: {e}"))?;
        file.read_to_end(&mut bytes).map_err(|e| format!("spool: {e}"))?;
        if let Some(sa) = active.secagg.as_mut() {
            if !update.masked {
                return Err("this round uses secure aggregation: only masked inputs are accepted".into());
            }
            let words = wire::words_from_le(&bytes).map_err(|e| e.to_string())?;
            // The plan run is asked first, changing nothing: `masked_input` folds the input into
            // the sum, which cannot be undone, so it runs only for an input the run will admit
            // (with the same `now`, `admit_update` below then cannot refuse it).
            active.run.can_admit(node, update.round, now).map_err(|e| e.to_string())?;
            // The masked input joins the running sum only if the node may send one now.
            let sa_actions = sa.server.masked_input(node, &words, now).map_err(|e| e.to_string())?;
            let actions = active.run.admit_update(node, update.round, now).map_err(|e| e.to_string())?;
            if let Some(m) = update.metrics.into_iter().next() {
                active.round_metrics.insert(node.to_string(), m);
            }
            tracing::info!(node, round = update.round, "masked input accepted");
            self.apply_secagg(sa_actions);
            return Ok(actions);
        }
        let weight = match active.plan.strategy.weighting() {
            Weighting::Samples if update.sample_count == 0 => {
                return Err("sample_count is 0 but the plan weights updates by sample count".into());
            }
            // The node's own word, capped as under secure aggregation: one hospital claiming
            // u64::MAX samples weighs as much as one with `max_samples`, not 10¹⁵ times more.
            Weighting::Samples => sample_weight(update.sample_count, active.plan.secagg_settings().max_samples),
            Weighting::Uniform => 1.0,
        };
        let mut values = transfer::le_bytes_to_f32(&bytes)?;
        active.acc.check(&values).map_err(|e| e.to_string())?;
        let actions = active.run.admit_update(node, update.round, now).map_err(|e| e.to_string())?;
        if let Some((dp, _)) = active.client_dp.as_mut() {
            let norm = dp.clip(&mut values);
            tracing::debug!(node, norm, clip = dp.clip_norm(), "update clipped for client-level DP");
        }
        active.acc.add(&values, weight).map_err(|e| e.to_string())?;
        if let Some(m) = update.metrics.into_iter().next() {
            active.round_metrics.insert(node.to_string(), m);
        }
        tracing::info!(node, round = update.round, "update accepted");
        Ok(actions)
    }

    fn send(&self, node: &str, kind: directive::Kind) {
        let tx = lock(&self.inner.nodes).get(node).map(|c| c.tx.clone());
        match tx {
            Some(tx) => {
                if tx.try_send(Ok(Directive { kind: Some(kind) })).is_err() {
                    tracing::warn!(
                        node,
                        "directive stream is full or closed; the node will be dropped if it stays silent"
                    );
                }
            }
            None => tracing::warn!(node, "node is not connected; directive not sent"),
        }
    }

    fn apply(&mut self, actions: Vec<Action>) {
        let mut queue: VecDeque<Action> = actions.into();
        while let Some(action) = queue.pop_front() {
            let Some(active) = self.active.as_mut() else {
                return;
            };
            let plan_id = active.plan_id.clone();
            match action {
                Action::Offer(nodes) => {
                    let offer = directive::Kind::OfferPlan(proto::OfferPlan {
                        plan_id: plan_id.clone(),
                        plan_toml: active.wire_toml.clone(),
                        run: active.run_id.clone(),
                    });
                    for n in nodes {
                        self.send(&n, offer.clone());
                    }
                }
                Action::OpenRound { round, participants, deadline } => {
                    active.acc = Accumulator::new(active.global.values().len());
                    active.round_metrics.clear();
                    active.round_updates.clear();
                    active.participants = participants.clone();
                    active.secagg = None;
                    if active.plan.secure_aggregation {
                        let num_params = active.global.values().len();
                        let opened = SecAggRound::open(
                            &active.plan,
                            &plan_id,
                            round,
                            &participants,
                            num_params,
                            active.secagg_noise,
                            deadline,
                        );
                        match opened {
                            Ok(sa) => {
                                tracing::info!(
                                    round,
                                    threshold = sa.setup.threshold,
                                    gamma = sa.encoding.gamma(),
                                    "secure aggregation opened"
                                );
                                active.secagg = Some(sa);
                            }
                            Err(reason) => {
                                queue.extend(active.run.aggregation_failed(&reason));
                                continue;
                            }
                        }
                    }
                    *self.inner.round.write().unwrap_or_else(|p| p.into_inner()) = Some(RoundInfo::new(
                        plan_id.clone(),
                        round,
                        active.model,
                        active.global.values().len(),
                        active.secagg.is_some(),
                        &participants,
                    ));
                    let start = start_round(&plan_id, round, active, deadline);
                    tracing::info!(round, nodes = participants.len(), model = %active.model.short(), "round opened");
                    let own = lock(&self.inner.audit).own_fingerprint().to_string();
                    self.inner.audit(
                        &own,
                        "round_opened",
                        [
                            ("plan_id", json!(plan_id)),
                            ("round", json!(round)),
                            ("participants", json!(participants)),
                            ("model_sha256", json!(active.model.to_hex())),
                            ("secure_aggregation", json!(active.secagg.as_ref().map(|sa| &sa.setup.participants))),
                            ("threshold", json!(active.secagg.as_ref().map(|sa| sa.setup.threshold))),
                        ],
                    );
                    self.inner.publish(
                        &plan_id,
                        plan_event::Kind::RoundOpened(proto::RoundOpened {
                            round,
                            participants: participants.clone(),
                            model_sha256: active.model.to_hex(),
                        }),
                    );
                    for n in &participants {
                        self.send(n, start.clone());
                    }
                }
                Action::Reoffer(node) => {
                    tracing::info!(node, "node reconnected during the plan; offering it again");
                    let offer = directive::Kind::OfferPlan(proto::OfferPlan {
                        plan_id: plan_id.clone(),
                        plan_toml: active.wire_toml.clone(),
                        run: active.run_id.clone(),
                    });
                    self.send(&node, offer);
                }
                Action::Rejoin { node, .. } if active.secagg.is_some() => {
                    // Its round keys and shares were lost with its process: it cannot rejoin this
                    // secure-aggregation round, and the round stops waiting for it.
                    tracing::info!(node, "participant reconnected; it rejoins at the next round (secure aggregation)");
                    queue.extend(active.run.leave_round(&node, Instant::now()));
                }
                Action::Rejoin { node, round, deadline } => {
                    tracing::info!(node, round, "participant reconnected; sending the round again");
                    let start = start_round(&plan_id, round, active, deadline);
                    self.send(&node, start);
                }
                Action::CloseRound { round, .. } if active.secagg.is_some() => {
                    // The masked inputs are in; the unmasking steps follow (see `apply_secagg`). The
                    // protocol's input step ends only here or when every input is in, so the sum
                    // is never ready before the plan round closes.
                    *self.inner.round.write().unwrap_or_else(|p| p.into_inner()) = None;
                    let now = Instant::now();
                    let sa_actions = active.secagg.as_mut().map(|sa| sa.server.end_inputs(now));
                    tracing::info!(round, "masked inputs collected; unmasking");
                    self.apply_secagg(sa_actions.unwrap_or_default());
                }
                Action::CloseRound { round, reported, dropped } => {
                    *self.inner.round.write().unwrap_or_else(|p| p.into_inner()) = None;
                    let next = match self.close_round(round) {
                        Ok(()) => self.publish_round_closed(round, &reported, &dropped),
                        Err(reason) => {
                            tracing::error!(round, "aggregation failed: {reason}");
                            self.active.as_mut().map(|a| a.run.aggregation_failed(&reason)).unwrap_or_default()
                        }
                    };
                    queue.extend(next);
                }
                Action::Evaluate(nodes) => {
                    let ev = directive::Kind::Evaluate(proto::Evaluate {
                        plan_id: plan_id.clone(),
                        model_sha256: active.model.to_hex(),
                        model_bytes: active.model_bytes,
                        run: active.run_id.clone(),
                    });
                    for n in nodes {
                        self.send(&n, ev.clone());
                    }
                }
                Action::Finish { success, reason } => {
                    self.finish(success, reason);
                    return;
                }
            }
        }
    }

    /// Records the closed round (model, every accepted update's hash and size, who reported and
    /// who dropped) and sends that exact record to each node that reported, to countersign.
    fn send_receipts(&mut self, round: u32, reported: &[String], dropped: &[String]) {
        let Some(active) = self.active.as_ref() else {
            return;
        };
        let params = [
            ("plan_id", json!(active.plan_id)),
            ("round", json!(round)),
            ("model_sha256", json!(active.model.to_hex())),
            ("updates", json!(active.round_updates)),
            ("reported", json!(reported)),
            ("dropped", json!(dropped)),
        ];
        let plan_id = active.plan_id.clone();
        let line = {
            let mut log = lock(&self.inner.audit);
            let own = log.own_fingerprint().to_string();
            log.append_line(&own, "round_record", params.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
        };
        match line {
            Ok((_, line)) => {
                lock(&self.inner.receipts).insert((plan_id.clone(), round), line.clone());
                let receipt = directive::Kind::RoundReceipt(proto::RoundReceipt { plan_id, round, record: line });
                for n in reported {
                    self.send(n, receipt.clone());
                }
            }
            Err(e) => tracing::error!("audit log: {e}"),
        }
    }

    /// A node's secure-aggregation message, handed to the round's state machine.
    fn secagg_message(
        &mut self,
        node: &str,
        cert_der: &[u8],
        msg: SecAggMessage,
        now: Instant,
    ) -> Result<Vec<ServerAction>, String> {
        let active = self.active.as_mut().ok_or("no plan is running")?;
        let sa = active.secagg.as_mut().ok_or("no secure-aggregation round is open")?;
        let params = sa.server.params();
        if msg.plan_id != params.plan_id || msg.round != params.round {
            return Err(format!(
                "message is for plan {} round {}, but round {} of plan {} is aggregating",
                short(&msg.plan_id),
                msg.round,
                params.round,
                short(&params.plan_id)
            ));
        }
        let (plan_id, round) = (params.plan_id.clone(), params.round);
        let step = msg.step.ok_or("the message carries no step")?;
        let result = match step {
            sec_agg_message::Step::Keys(mut k) => {
                // The certificate relayed to peers is the one this TLS session verified.
                k.certificate = cert_der.to_vec();
                let ad = wire::keys_from_wire(&k, &plan_id, round).map_err(|e| e.to_string())?;
                sa.server.advertise(node, ad, &SessionCertVerifier, now)
            }
            sec_agg_message::Step::Shares(list) => {
                sa.server.shares(node, list.shares.iter().map(wire::share_from_wire).collect(), now)
            }
            sec_agg_message::Step::ConsistencySignature(sig) => sa.server.consistency(node, sig, now),
            sec_agg_message::Step::Unmask(u) => {
                let shares = u.shares.iter().map(wire::unmask_from_wire).collect::<Result<Vec<_>, _>>();
                sa.server.unmask(node, shares.map_err(|e| e.to_string())?, now)
            }
        };
        result.map_err(|e| e.to_string())
    }

    /// Carries out what the secure-aggregation state machine asks: relays, and the round's end.
    fn apply_secagg(&mut self, actions: Vec<ServerAction>) {
        for action in actions {
            let Some(active) = self.active.as_mut() else {
                return;
            };
            let Some(sa) = active.secagg.as_ref() else {
                return;
            };
            let params = sa.server.params().clone();
            let step = |step: sec_agg_step::Step| {
                directive::Kind::Secagg(proto::SecAggStep {
                    plan_id: params.plan_id.clone(),
                    round: params.round,
                    step: Some(step),
                })
            };
            let name = |id: u32| params.name_of(id).unwrap_or_default().to_string();
            match action {
                ServerAction::SendPeers { to, keys } => {
                    let msg = step(sec_agg_step::Step::Peers(proto::SecAggPeers {
                        keys: keys.iter().map(wire::keys_to_wire).collect(),
                    }));
                    for id in to {
                        self.send(&name(id), msg.clone());
                    }
                }
                ServerAction::SendShares { u2, per_node } => {
                    // Participants that did not share cannot send a masked input this round.
                    let left: Vec<String> = params
                        .participants
                        .iter()
                        .filter(|p| params.id_of(p).is_some_and(|id| !u2.contains(&id)))
                        .cloned()
                        .collect();
                    for id in &u2 {
                        let shares =
                            per_node.get(id).map(|v| v.iter().map(wire::share_to_wire).collect()).unwrap_or_default();
                        let msg = step(sec_agg_step::Step::Shares(proto::SecAggShares {
                            sharing: u2.iter().copied().collect(),
                            shares,
                        }));
                        self.send(&name(*id), msg);
                    }
                    let now = Instant::now();
                    let mut plan_actions = Vec::new();
                    if let Some(active) = self.active.as_mut() {
                        for node in left {
                            tracing::warn!(node, "did not share its keys in time; left out of this round");
                            plan_actions.extend(active.run.leave_round(&node, now));
                        }
                    }
                    self.apply(plan_actions);
                }
                ServerAction::SendSurvivors { u3 } => {
                    let msg = step(sec_agg_step::Step::Survivors(proto::SecAggSurvivors {
                        survivors: u3.iter().copied().collect(),
                    }));
                    for id in u3 {
                        self.send(&name(id), msg.clone());
                    }
                }
                ServerAction::SendSignatures { to, signatures } => {
                    let msg = step(sec_agg_step::Step::Signatures(proto::SecAggSignatures {
                        signatures: signatures
                            .into_iter()
                            .map(|(id, signature)| proto::NodeSignature { id, signature })
                            .collect(),
                    }));
                    for id in to {
                        self.send(&name(id), msg.clone());
                    }
                }
                ServerAction::Done(outcome) => {
                    let next = match self.close_secagg_round(outcome) {
                        Ok(actions) => actions,
                        Err(reason) => {
                            tracing::error!(round = params.round, "secure aggregation failed: {reason}");
                            self.active.as_mut().map(|a| a.run.aggregation_failed(&reason)).unwrap_or_default()
                        }
                    };
                    self.apply(next);
                }
                ServerAction::Failed(reason) => {
                    tracing::error!(round = params.round, "secure aggregation failed: {reason}");
                    *self.inner.round.write().unwrap_or_else(|p| p.into_inner()) = None;
                    let reason = format!("round {}: {reason}", params.round);
                    let next = self.active.as_mut().map(|a| a.run.aggregation_failed(&reason)).unwrap_or_default();
                    self.apply(next);
                }
            }
        }
    }

    /// The unmasked sum of a round: decode, apply the server step, publish, move on.
    fn close_secagg_round(&mut self, outcome: Outcome) -> Result<Vec<Action>, String> {
        let active = self.active.as_mut().ok_or("no plan is running")?;
        let sa = active.secagg.take().ok_or("no secure-aggregation round is open")?;
        let round = sa.server.params().round;
        // Test hook: the unmasked sum, for tests that check it out of band; never set in production.
        if let Some(dir) = std::env::var_os("SANCTUM_TEST_SECAGG_DUMP") {
            let path = std::path::Path::new(&dir).join(format!("sum-round-{round}.u32"));
            if let Err(e) = std::fs::write(&path, wire::words_to_le(&outcome.sum)) {
                tracing::warn!("test dump {}: {e}", path.display());
            }
        }
        let mean = sa.encoding.decode_mean(&outcome.sum, outcome.survivors.len()).map_err(|e| e.to_string())?;
        // The sum has num_params + 1 words (the update, then the weight); checked all the same,
        // since a panic here would end the driver.
        let update = mean
            .get(..active.global.values().len())
            .ok_or("the unmasked sum is shorter than the model; the round is not applied")?;
        // A step that would leave a non-finite model changes nothing and fails the round: the
        // model is neither stored nor published.
        active.server.step(active.global.values_mut(), update).map_err(|e| format!("round {round}: {e}"))?;
        // The same per-round ρ the nodes charge (`encode::round_rho`, a function of the plan alone).
        if let Some(rho) = sa.encoding.round_rho(update.len() + 1).map_err(|e| e.to_string())? {
            active.secagg_rho += rho;
        }
        let bytes = active.global.to_safetensors().map_err(|e| e.to_string())?;
        active.model = self.inner.store.put_model(&bytes).map_err(|e| format!("model store: {e}"))?;
        active.model_bytes = bytes.len() as u64;
        active.lineage.push(active.model);
        let reported = sa.names(&outcome.survivors);
        let dropped = sa.names(&outcome.dropped);
        tracing::info!(round, survivors = reported.len(), model = %active.model.short(), "round aggregated securely");
        Ok(self.publish_round_closed(round, &reported, &dropped))
    }

    /// Tells the lead (and the audit log) a round closed with the new model, asks those who
    /// reported to countersign its record, and moves the plan on.
    fn publish_round_closed(&mut self, round: u32, reported: &[String], dropped: &[String]) -> Vec<Action> {
        let Some(active) = self.active.as_ref() else {
            return Vec::new();
        };
        let metrics = active
            .round_metrics
            .iter()
            .map(|(node, m)| proto::NodeMetric {
                node: node.clone(),
                value: m.value,
                samples: m.samples,
                name: m.name.clone(),
            })
            .collect();
        self.inner.publish(
            &active.plan_id,
            plan_event::Kind::RoundClosed(proto::RoundClosed {
                round,
                reported: reported.to_vec(),
                dropped: dropped.to_vec(),
                metrics,
                new_model_sha256: active.model.to_hex(),
            }),
        );
        self.send_receipts(round, reported, dropped);
        self.active.as_mut().map(|a| a.run.round_aggregated(round, Instant::now())).unwrap_or_default()
    }

    /// Applies the server step to the admitted updates and publishes the new global model.
    fn close_round(&mut self, round: u32) -> Result<(), String> {
        let active = self.active.as_mut().ok_or("no plan is running")?;
        if active.acc.count() == 0 {
            return Err("no update was admitted".into());
        }
        let mean = match active.client_dp.as_mut() {
            Some((dp, _)) => {
                let secure = &mut active.secure;
                dp.release(active.acc.sum(), active.participants.len(), &mut |std| secure.sample(std))
            }
            None => active.acc.mean().ok_or("no update was admitted")?,
        };
        // A step that would leave a non-finite model (NaN or infinity: FedAdam or FedAvg pushed
        // past f32's range) changes nothing and fails the round with the reason; the model is
        // neither stored nor published.
        active.server.step(active.global.values_mut(), &mean).map_err(|e| format!("round {round}: {e}"))?;
        let bytes = active.global.to_safetensors().map_err(|e| e.to_string())?;
        active.model = self.inner.store.put_model(&bytes).map_err(|e| format!("model store: {e}"))?;
        active.model_bytes = bytes.len() as u64;
        active.lineage.push(active.model);
        tracing::info!(round, updates = active.acc.count(), model = %active.model.short(), "round aggregated");
        Ok(())
    }

    fn finish(&mut self, success: bool, reason: String) {
        let Some(active) = self.active.take() else {
            return;
        };
        *self.inner.round.write().unwrap_or_else(|p| p.into_inner()) = None;
        let model_path = if success {
            match export(&self.inner.store, &active) {
                Ok(p) => p.display().to_string(),
                Err(e) => {
                    tracing::error!("exporting the final model failed: {e}");
                    String::new()
                }
            }
        } else {
            String::new()
        };
        // The coordinator holds no schema: the headline metric is the one the nodes report first.
        let metric_name = active
            .final_metrics
            .values()
            .find_map(|m| m.first())
            .map_or_else(|| "metric".to_string(), |m| m.name.clone());
        let finished = PlanFinished {
            success,
            reason: reason.clone(),
            rounds_completed: active.run.rounds_completed(),
            final_model_sha256: active.model.to_hex(),
            metric_name,
            final_metrics: active
                .final_metrics
                .iter()
                .flat_map(|(node, ms)| {
                    ms.iter().map(|m| proto::NodeMetric {
                        node: node.clone(),
                        value: m.value,
                        samples: m.samples,
                        name: m.name.clone(),
                    })
                })
                .collect(),
            model_path,
            client_epsilon: match (&active.client_dp, active.secagg_noise, active.plan.privacy.delta) {
                (Some((_, c)), _, _) => c.epsilon,
                (None, Some(_), Some(delta)) if active.secagg_rho > 0.0 => {
                    privacy::distributed::epsilon_for_rho(active.secagg_rho, delta).unwrap_or(f64::INFINITY)
                }
                _ => 0.0,
            },
            client_delta: match (&active.client_dp, active.secagg_noise) {
                (Some((_, c)), _) => c.delta,
                (None, Some(_)) => active.plan.privacy.delta.unwrap_or(0.0),
                _ => 0.0,
            },
        };
        if success {
            tracing::info!(plan = active.plan.name, "plan finished: {reason}");
        } else {
            tracing::error!(plan = active.plan.name, "plan failed: {reason}");
        }
        self.inner.publish(&active.plan_id, plan_event::Kind::PlanFinished(finished));
        let closed = directive::Kind::PlanClosed(proto::PlanClosed {
            plan_id: active.plan_id.clone(),
            success,
            reason,
            run: active.run_id.clone(),
        });
        let nodes: Vec<String> = lock(&self.inner.nodes).keys().cloned().collect();
        for n in nodes {
            self.send(&n, closed.clone());
        }
    }
}

/// The directive that asks a participant to train `round` on the current global model.
fn start_round(plan_id: &str, round: u32, active: &ActiveRun, deadline: Instant) -> directive::Kind {
    directive::Kind::StartRound(proto::StartRound {
        plan_id: plan_id.to_string(),
        round,
        model_sha256: active.model.to_hex(),
        model_bytes: active.model_bytes,
        // Checked: `SystemTime + Duration` panics past the platform's range (plans bound their
        // deadlines to 30 days, so the fallback is for a deadline that was never validated).
        deadline_unix_ms: SystemTime::now()
            .checked_add(deadline.saturating_duration_since(Instant::now()))
            .map_or(u64::MAX, unix_ms),
        secure_aggregation: active.secagg.as_ref().map(|sa| sa.setup.clone()),
        run: active.run_id.clone(),
    })
}

/// Writes the final model (safetensors) and its manifest: plan, lineage hash chain, metrics.
fn export(store: &Store, active: &ActiveRun) -> anyhow::Result<PathBuf> {
    // The name is checked at `Plan::parse`; `export_path` keeps every file inside the exports
    // directory even so.
    let stem = format!("{}-{}", active.plan.name, active.model.short());
    let model_path = store.export_path(&stem, ".safetensors")?;
    let manifest_path = store.export_path(&stem, ".manifest.json")?;
    write_atomic(&model_path, &store.read_model(&active.model)?)?;
    let manifest = serde_json::json!({
        "plan_name": active.plan.name,
        "plan_id": active.plan_id,
        "run": active.run_id,
        "strategy": active.plan.strategy.name(),
        "model": active.plan.model.name(),
        "rounds_completed": active.run.rounds_completed(),
        "final_model_sha256": active.model.to_hex(),
        "lineage": active.lineage.iter().map(|h| h.to_hex()).collect::<Vec<_>>(),
        "final_metrics": active.final_metrics.iter().map(|(n, ms)| (n.clone(), ms.iter().map(|m| serde_json::json!({"name": m.name, "value": m.value, "samples": m.samples})).collect::<Vec<_>>().into())).collect::<serde_json::Map<_, _>>(),
        "exported_unix_ms": unix_ms(SystemTime::now()),
        "plan_toml": active.wire_toml,
    });
    write_atomic(&manifest_path, serde_json::to_string_pretty(&manifest)?.as_bytes())?;
    Ok(model_path)
}
