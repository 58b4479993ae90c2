//! Plain rounds: the decision on a `StartRound` ([`crate::rounds`]), the model fetched (one in
//! memory at a time), local training on a blocking thread, then store → charge → send, in that
//! order, and the round's metrics as `policy.test_metrics` lets them leave.

use std::path::PathBuf;
use std::sync::Arc;

use sanctum_protocol::audit::AuditEvent;
use sanctum_protocol::hash::ContentHash;
use sanctum_protocol::model::Weights;
use sanctum_protocol::plan::{Plan, PrivacyMode};
use sanctum_protocol::privacy::noise::SecureGaussian;
use sanctum_protocol::prost::Message;
use sanctum_protocol::proto::{self, UpdateHeader};
use sanctum_protocol::transfer;

use super::{DaemonError, Node, Trained, name_seed, short};
use crate::budget::{self, Cost, DpPlan};
use crate::correction::Correction;
use crate::data::LocalData;
use crate::egress::Rule;
use crate::release::{Released, Upload};
use crate::rounds::{self, RoundDecision, RoundState, Stored};
use crate::scaffold;
use crate::train;

impl Node {
    /// A model by hash, from the one-model cache or the coordinator.
    pub(super) async fn fetch(
        &mut self,
        plan_id: &str,
        hash_hex: &str,
        size: u64,
    ) -> Result<Arc<Vec<u8>>, DaemonError> {
        let hash = ContentHash::parse(hash_hex).map_err(DaemonError::ModelHash)?;
        if let Some((h, bytes)) = &self.cached
            && *h == hash
        {
            return Ok(Arc::clone(bytes));
        }
        // Drop the previous model before fetching the next one: one model in memory at a time.
        self.cached = None;
        let bytes = Arc::new(self.link.fetch_model(plan_id, hash_hex, size).await?);
        self.cached = Some((hash, Arc::clone(&bytes)));
        Ok(bytes)
    }

    /// What this node's own state says about a `StartRound` (see [`rounds::start_round`]).
    pub(super) fn round_decision(&self, start: &proto::StartRound) -> Result<RoundDecision, DaemonError> {
        let Some(accepted) = self.plans.get(&start.plan_id) else {
            return Ok(RoundDecision::Refuse(format!(
                "round for plan {} which this node did not accept",
                start.plan_id
            )));
        };
        let view = accepted.view();
        let with_setup = start.secure_aggregation.is_some();
        if start.run != accepted.run {
            return Ok(rounds::start_round(&view, &start.run, start.round, with_setup, RoundState::default()));
        }
        // Only whether a release is stored, not its bytes (an update can be hundreds of MB).
        let stored = self
            .releases
            .stored(&start.plan_id, &accepted.run, start.round)
            .map(|masked| if masked { Stored::Masked } else { Stored::Update });
        let released = self.releases.released_rounds(&start.plan_id, &accepted.run)?;
        let state = RoundState {
            stored,
            charged: self.ledger.is_charged(&start.plan_id, &accepted.run, start.round),
            released_ever: released.contains(&start.round),
            released_before: self.count_before(&released, &start.plan_id, &accepted.run, start.round),
        };
        Ok(rounds::start_round(&view, &start.run, start.round, with_setup, state))
    }

    pub(super) async fn run_round(&mut self, start: &proto::StartRound) -> Result<(), DaemonError> {
        let decision = self.round_decision(start)?;
        if let RoundDecision::Refuse(reason) = &decision {
            self.refuse_directive("StartRound", &start.plan_id, start.round, reason)?;
            return Err(DaemonError::Refused { directive: "StartRound", reason: reason.clone() });
        }
        let Some(accepted) = self.plans.get(&start.plan_id) else {
            return Err(DaemonError::NotAccepted { plan_id: start.plan_id.clone() });
        };
        let run = accepted.run.clone();
        match decision {
            RoundDecision::Resend | RoundDecision::ChargeAndSend => {
                let Some(Released::Update { header, payload }) =
                    self.releases.get(&start.plan_id, &run, start.round)?
                else {
                    return Err(DaemonError::ReleaseMissing { round: start.round });
                };
                let header = UpdateHeader::decode(header.as_slice())
                    .map_err(|error| DaemonError::ReleaseDamaged { round: start.round, error })?;
                // The same round asked for again must name the model it was trained on.
                if header.base_model_sha256 != start.model_sha256 {
                    let reason = format!(
                        "round {} was trained on model {}, not {}; it is re-sent only as it was",
                        start.round,
                        short(&header.base_model_sha256),
                        short(&start.model_sha256)
                    );
                    self.refuse_directive("StartRound", &start.plan_id, start.round, &reason)?;
                    return Err(DaemonError::Refused { directive: "StartRound", reason });
                }
                if decision == RoundDecision::ChargeAndSend {
                    if let Some(cost) = self.round_cost(&start.plan_id, start.round)? {
                        self.charge_cost(&start.plan_id, start.round, &cost)?;
                    }
                    tracing::info!(round = start.round, "sending the stored update, charged now (it never left)");
                    self.send_update(&run, header, payload, Rule::ModelUpdate).await?;
                    self.note_round(start);
                    return Ok(());
                }
                tracing::info!(
                    round = start.round,
                    "round asked for again: re-sending the same bytes (no new release)"
                );
                self.send_update(&run, header, payload, Rule::ModelUpdateResend).await?;
                self.note_round(start);
                Ok(())
            }
            RoundDecision::Train => {
                self.train_and_send(start, &run).await?;
                self.note_round(start);
                Ok(())
            }
            RoundDecision::Refuse(_) => Ok(()),
        }
    }

    /// Trains a round, then stores, charges and sends its update, in that order.
    pub(super) async fn train_and_send(&mut self, start: &proto::StartRound, run: &str) -> Result<(), DaemonError> {
        let Some(accepted) = self.plans.get(&start.plan_id) else {
            return Err(DaemonError::NotAccepted { plan_id: start.plan_id.clone() });
        };
        if let Err(reason) = self.still_approved(&accepted.plan) {
            let reason = reason.to_string();
            self.refuse_directive("StartRound", &start.plan_id, start.round, &reason)?;
            return Err(DaemonError::Refused { directive: "StartRound", reason });
        }
        let plan = accepted.plan.clone();
        let data = accepted.data.clone();
        let dp = accepted.dp;
        let script = accepted.script.clone();
        let bytes = self.fetch(&start.plan_id, &start.model_sha256, start.model_bytes).await?;
        tracing::debug!(round = start.round, bytes = bytes.len(), "global model held");
        let global = Weights::from_safetensors(&bytes, &plan.global_layout())?;
        // SCAFFOLD: the global carries c; this node's cᵢ is as its last released round left it.
        let (global, c) = scaffold::split_global(&plan, global)?;
        let control = match c {
            Some(c) => {
                let releases = &self.releases;
                let released = |round: u32| {
                    releases.stored(&start.plan_id, run, round).is_some()
                        || releases.released_rounds(&start.plan_id, run).is_ok_and(|r| r.contains(&round))
                };
                let ci = self.control.load(&start.plan_id, run, global.layout(), released)?;
                Some((c, ci))
            }
            None => None,
        };
        let (steps, lr) = (plan.local.steps, plan.local.learning_rate);
        let job = self.training_job(plan, global, data, dp, start.round, script, control.as_ref());
        let (metric, mut result) = self.train_alive(start, job).await?;
        if let Some((c, ci)) = &control {
            // Δcᵢ follows Δy in the update; cᵢ before and after is durable before the release is.
            let dc = scaffold::delta_c(c.values(), &result.delta, steps, lr)?;
            let after: Vec<f32> = ci.iter().zip(&dc).map(|(a, b)| a + b).collect();
            self.control.save(&start.plan_id, run, start.round, c.layout(), (ci, &after))?;
            result.delta.extend_from_slice(&dc);
        }
        log_trained(start.round, &metric, &result);
        let cost = self.round_cost(&start.plan_id, start.round)?;
        let header = UpdateHeader {
            plan_id: start.plan_id.clone(),
            round: start.round,
            base_model_sha256: start.model_sha256.clone(),
            num_params: result.delta.len() as u64,
            sample_count: if self.cfg.policy.share_sample_counts {
                self.plans.get(&start.plan_id).map_or(0, |a| a.data.train_len() as u64)
            } else {
                0
            },
            payload_sha256: String::new(),
            metrics: self.round_metrics(&start.plan_id, &metric, cost.as_ref())?,
            masked: false,
            // The link sets it: where the coordinator says a resumed upload starts.
            offset: 0,
        };
        let payload = transfer::f32_to_le_bytes(&result.delta);
        // Stored first, so a repeated round gets these bytes back; then charged, durably, before
        // anything about this round leaves.
        self.releases.put(
            &start.plan_id,
            run,
            start.round,
            &Released::Update { header: header.encode_to_vec(), payload: payload.clone() },
        )?;
        if let Some(cost) = &cost {
            self.charge_cost(&start.plan_id, start.round, cost)?;
            #[cfg(feature = "fault-injection")]
            self.faults.crash_after_charge();
        }
        tracing::debug!(round = start.round, "update stored and charged; sending it");
        self.send_update(run, header, payload, Rule::ModelUpdate).await
    }

    /// The metrics that may go with a round's update: the starting model's test metric only as
    /// `policy.test_metrics` allows, ε spent only when it reveals nothing of the data's size.
    pub(super) fn round_metrics(
        &mut self,
        plan_id: &str,
        metric: &train::Evaluation,
        cost: Option<&Cost>,
    ) -> Result<Vec<proto::Metric>, DaemonError> {
        let mut m: Vec<proto::Metric> = self.release_metric(plan_id, metric)?;
        // With sizes withheld, the cost is accounted at the public bound: it reveals nothing.
        if let Some(cost) = cost {
            m.push(proto::Metric {
                name: sanctum_protocol::EPSILON_SPENT_METRIC.into(),
                value: cost.epsilon,
                samples: cost.steps,
            });
        }
        Ok(m)
    }

    /// Test-split metrics as `policy.test_metrics` lets them leave ([`crate::metrics::release`]):
    /// not at all, exact, or the accuracy noised and charged to the ledger first.
    pub(super) fn release_metric(
        &mut self,
        plan_id: &str,
        eval: &train::Evaluation,
    ) -> Result<Vec<proto::Metric>, DaemonError> {
        let Some(accepted) = self.plans.get(plan_id) else {
            return Ok(vec![]);
        };
        let dp = accepted.plan.privacy.mode != PrivacyMode::None;
        let share = self.cfg.policy.share_sample_counts;
        let (accuracy, samples, noise, delta) =
            match crate::metrics::release(&self.cfg.policy, dp, accepted.plan.privacy.delta, eval) {
                crate::metrics::Release::Withheld(why) => {
                    tracing::info!("no test metric sent: {why}");
                    return Ok(vec![]);
                }
                crate::metrics::Release::Exact(m) => {
                    return Ok(m
                        .into_iter()
                        .map(|(name, value, samples)| proto::Metric { name: name.into(), value, samples })
                        .collect());
                }
                crate::metrics::Release::Noised { accuracy, samples, noise, delta } => {
                    (accuracy, samples, noise, delta)
                }
            };
        let key = format!("{}/metrics", accepted.run);
        let releases = self.ledger.releases(plan_id, &key) + 1;
        let cost = budget::metric_cost(noise, releases, delta)?;
        self.charge_to(plan_id, &key, releases, &cost)?;
        let noised = crate::metrics::noised_accuracy(accuracy, samples, noise, &mut SecureGaussian::from_os());
        Ok(vec![proto::Metric {
            name: "accuracy".into(),
            value: noised.value,
            samples: if share { noised.samples } else { 0 },
        }])
    }

    /// One round's work for a blocking thread: evaluate the starting model, then train (DP-SGD
    /// when the plan asks for example-level privacy).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn training_job(
        &self,
        plan: Plan,
        global: Weights,
        data: Arc<LocalData>,
        dp: Option<DpPlan>,
        round: u32,
        script: Option<PathBuf>,
        control: Option<&(Weights, Vec<f32>)>,
    ) -> impl FnOnce() -> Trained + Send + 'static {
        let device = self.device;
        // SCAFFOLD's c − cᵢ, computed here so the job owns it.
        let drift = control.map(|(c, ci)| scaffold::correction(c, ci));
        // Each node and round gets its own batch order, reproducible from the plan's seed.
        let seed = plan.seed
            ^ u64::from(round).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ name_seed(&self.material.identity().name);
        move || {
            let script = script.as_deref();
            let evaluating = std::time::Instant::now();
            let metric = train::evaluate(&plan.model, &global, &data, device, script)?;
            let evaluate_seconds = evaluating.elapsed().as_secs_f64();
            let correction = match (drift, plan.strategy.proximal_mu()) {
                (Some(drift), _) => {
                    Correction::drift(&drift.map_err(|e| train::TrainError::Model(e.to_string()))?, device)?
                }
                (None, Some(mu)) => Correction::proximal(mu, &global, device)?,
                (None, None) => Correction::none(),
            };
            let mut result = match &dp {
                Some(dp) => train::train_round_dp(&plan, &global, &data, device, &dp.setup, script, &correction)?,
                None => train::train_round(&plan, &global, &data, device, seed, script, &correction)?,
            };
            result.evaluate_seconds = evaluate_seconds;
            Ok((metric, result))
        }
    }

    /// Uploads an update (plain or masked) of `run`, then notes durably and audits what left: its
    /// hash and size, which the round record is judged against ([`super::reports`]). A plain
    /// update was noted when it was stored; a masked input is noted here, before it leaves.
    pub(super) async fn send_update(
        &mut self,
        run: &str,
        header: UpdateHeader,
        payload: Vec<u8>,
        rule: Rule,
    ) -> Result<(), DaemonError> {
        let (plan_id, round, masked) = (header.plan_id.clone(), header.round, header.masked);
        if masked {
            let leaving = Upload {
                round,
                payload_sha256: ContentHash::of(&payload).to_hex(),
                bytes: payload.len() as u64,
                answered: false,
            };
            self.releases.note_upload(&plan_id, run, &leaving)?;
        }
        let (hash, bytes) = self.link.upload(header, payload, rule).await?;
        let answered = Upload { round, payload_sha256: hash.clone(), bytes: bytes as u64, answered: true };
        self.releases.note_upload(&plan_id, run, &answered)?;
        Ok(self.audit(AuditEvent::UpdateSent {
            plan_id,
            round: u64::from(round),
            payload_sha256: hash,
            bytes: bytes as u64,
            masked,
            resend: matches!(rule, Rule::ModelUpdateResend),
        })?)
    }
}

/// The node's own log line for a round's local work (`scripts/bench`'s round-overhead benchmark
/// reads its two timings, to the tenth of a millisecond).
pub(super) fn log_trained(round: u32, metric: &train::Evaluation, result: &train::RoundResult) {
    tracing::info!(
        round,
        metric_before = format!("{:.4}", metric.primary().unwrap_or(f64::NAN)),
        loss = format!("{:.4}", result.mean_loss),
        seconds = format!("{:.4}", result.seconds),
        evaluate_seconds = format!("{:.4}", result.evaluate_seconds),
        "local training done"
    );
}
