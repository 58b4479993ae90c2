//! Secure-aggregation rounds: the setup checked against the plan and the policy, signed round
//! keys, training while the key steps go on, then charge → encode → mask → upload, and each
//! relayed step answered.

use sanctum_protocol::model::Weights;
use sanctum_protocol::proto::{self, SecAggMessage, UpdateHeader, sec_agg_message, sec_agg_step};
use sanctum_protocol::secagg::client::{Client as SecAggClient, RoundParams};
use sanctum_protocol::secagg::encode::{Weight, encoding_for};
use sanctum_protocol::secagg::wire;

use super::{DaemonError, Node, SecAggRefusal, SecAggRound, Trained};
use crate::egress::Rule;
use crate::release::Released;
use crate::rounds::RoundDecision;

impl Node {
    /// Starts this node's part in a secure-aggregation round: checks the setup against the plan
    /// and the policy, advertises signed round keys, then trains while the steps go on.
    pub(super) async fn start_secagg_round(&mut self, start: &proto::StartRound) -> Result<(), DaemonError> {
        let Some(setup) = start.secure_aggregation.clone() else {
            return Err(SecAggRefusal::NoSetup.into());
        };
        let held = self.secagg.as_ref().map(|r| crate::rounds::OpenSecAgg {
            plan_id: &r.start.plan_id,
            round: r.start.round,
            deadline_unix_ms: r.start.deadline_unix_ms,
        });
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        if let Some(reason) = crate::rounds::secagg_slot_taken(held, &start.plan_id, now) {
            self.refuse_directive("StartRound", &start.plan_id, start.round, &reason)?;
            return Err(DaemonError::Refused { directive: "StartRound", reason });
        }
        if let Some(accepted) = self.plans.get(&start.plan_id)
            && let Err(reason) = self.still_approved(&accepted.plan)
        {
            let reason = reason.to_string();
            self.refuse_directive("StartRound", &start.plan_id, start.round, &reason)?;
            return Err(DaemonError::Refused { directive: "StartRound", reason });
        }
        // A masked input is made once per (run, round) and never re-sent.
        match self.round_decision(start)? {
            RoundDecision::Train => {}
            RoundDecision::Refuse(reason) => {
                self.refuse_directive("StartRound", &start.plan_id, start.round, &reason)?;
                return Err(DaemonError::Refused { directive: "StartRound", reason });
            }
            RoundDecision::Resend | RoundDecision::ChargeAndSend => {
                let reason = format!("round {}'s input was already made; it is not masked again", start.round);
                self.refuse_directive("StartRound", &start.plan_id, start.round, &reason)?;
                return Err(DaemonError::Refused { directive: "StartRound", reason });
            }
        }
        let Some(accepted) = self.plans.get(&start.plan_id) else {
            return Err(DaemonError::NotAccepted { plan_id: start.plan_id.clone() });
        };
        let plan = accepted.plan.clone();
        if !plan.secure_aggregation {
            return Err(SecAggRefusal::NotInPlan.into());
        }
        let me = self.material.identity().name.clone();
        let n = setup.participants.len();
        let t = setup.threshold as usize;
        let wanted = plan.secagg_threshold(n);
        if t < wanted {
            return Err(SecAggRefusal::ThresholdBelowPlan { threshold: t, participants: n, wanted }.into());
        }
        if let Some(min) = self.cfg.policy.min_cohort
            && t < min
        {
            return Err(SecAggRefusal::ThresholdBelowMinCohort { threshold: t, min_cohort: min }.into());
        }
        let settings = plan.secagg_settings();
        if setup.clip_norm != settings.clip_norm || setup.max_samples != settings.max_samples {
            return Err(SecAggRefusal::SettingsDiffer.into());
        }
        let params = RoundParams {
            plan_id: start.plan_id.clone(),
            round: start.round,
            participants: setup.participants.clone(),
            threshold: t,
        };
        let encoding =
            encoding_for(&plan, n, t, accepted.ddg.map(|d| d.noise_multiplier)).map_err(SecAggRefusal::Encoding)?;
        let (sa, keys) = SecAggClient::new(params, &me)?;
        let signature = self.material.sign(&keys.signed_message())?;
        let msg = SecAggMessage {
            plan_id: start.plan_id.clone(),
            round: start.round,
            step: Some(sec_agg_message::Step::Keys(proto::SecAggKeys {
                node: me,
                share_key: keys.share_key.to_vec(),
                mask_key: keys.mask_key.to_vec(),
                signature,
                certificate: vec![],
            })),
        };
        self.link.sec_agg(msg).await?;
        self.secagg = Some(SecAggRound { start: start.clone(), client: sa, encoding, input: None, metrics: vec![] });
        // Train while the key steps go on.
        let accepted = self.plans.get(&start.plan_id).ok_or(DaemonError::PlanClosed)?;
        let (data, dp, script) = (accepted.data.clone(), accepted.dp, accepted.script.clone());
        let bytes = self.fetch(&start.plan_id, &start.model_sha256, start.model_bytes).await?;
        let global = Weights::from_safetensors(&bytes, &plan.model.layout())?;
        let job = self.training_job(plan, global, data, dp, start.round, script, None);
        // A round this one replaced (the same plan's, or another's past its deadline) leaves its
        // training's result unused.
        if let Some(stale) = self.training.replace(tokio::task::spawn_blocking(job)) {
            stale.abort();
        }
        Ok(())
    }

    /// Local training of the secure-aggregation round finished: charge, encode, and mask as soon
    /// as the shares are in.
    pub(super) async fn secagg_trained(
        &mut self,
        joined: Result<Trained, tokio::task::JoinError>,
    ) -> Result<(), DaemonError> {
        let (metric, result) = joined??;
        let Some(start) = self.secagg.as_ref().map(|r| r.start.clone()) else {
            return Ok(());
        };
        let accepted = self.plans.get(&start.plan_id).ok_or(DaemonError::PlanClosedDuringTraining)?;
        if accepted.run != start.run {
            return Err(SecAggRefusal::RunReplaced { round_run: start.run, accepted_run: accepted.run.clone() }.into());
        }
        let run = accepted.run.clone();
        super::training::log_trained(start.round, &metric, &result);
        // The round is marked released (its masked input is never made again), then its privacy
        // cost is charged, durably, before anything about it leaves.
        let cost = self.round_cost(&start.plan_id, start.round)?;
        self.releases.put(&start.plan_id, &run, start.round, &Released::Masked)?;
        if let Some(cost) = &cost {
            self.charge_cost(&start.plan_id, start.round, cost)?;
            #[cfg(feature = "fault-injection")]
            self.faults.crash_after_charge();
        }
        let metrics = self.round_metrics(&start.plan_id, &metric, cost.as_ref())?;
        let accepted = self.plans.get(&start.plan_id).ok_or(DaemonError::PlanClosedDuringTraining)?;
        let weight = match accepted.plan.strategy.weighting() {
            sanctum_protocol::plan::Weighting::Samples => Weight::Samples(accepted.data.train_len() as u64),
            sanctum_protocol::plan::Weighting::Uniform => Weight::Uniform,
        };
        let Some(round) = self.secagg.as_mut() else {
            return Ok(());
        };
        let mut rng = <rand_chacha::ChaCha20Rng as rand::SeedableRng>::from_os_rng();
        let (words, norm) = round.encoding.encode(&result.delta, weight, &mut rng)?;
        tracing::info!(
            round = start.round,
            update_norm = format!("{norm:.4}"),
            "update encoded for secure aggregation"
        );
        #[cfg(feature = "fault-injection")]
        self.faults.dump_secagg_input(&self.material.identity().name, start.round, &words);
        round.input = Some(words);
        round.metrics = metrics;
        if round.client.ready_to_mask() {
            self.send_masked().await?;
        }
        Ok(())
    }

    /// Masks the input and uploads it.
    pub(super) async fn send_masked(&mut self) -> Result<(), DaemonError> {
        let Some(round) = self.secagg.as_mut() else {
            return Ok(());
        };
        let Some(words) = round.input.take() else {
            return Ok(());
        };
        #[cfg(feature = "fault-injection")]
        self.faults.secagg_exit(crate::faults::SecAggPoint::BeforeInput, round.start.round);
        let masked = round.client.masked_input(&words)?;
        let start = round.start.clone();
        let header = UpdateHeader {
            plan_id: start.plan_id.clone(),
            round: start.round,
            base_model_sha256: start.model_sha256.clone(),
            num_params: masked.len() as u64,
            sample_count: 0,
            payload_sha256: String::new(),
            metrics: std::mem::take(&mut round.metrics),
            masked: true,
            // The link sets it: where the coordinator says a resumed upload starts.
            offset: 0,
        };
        self.send_update(&start.run, header, wire::words_to_le(&masked), Rule::ModelUpdate).await?;
        self.note_round(&start);
        #[cfg(feature = "fault-injection")]
        self.faults.secagg_exit(crate::faults::SecAggPoint::AfterInput, start.round);
        Ok(())
    }

    /// One secure-aggregation step relayed by the coordinator.
    pub(super) async fn secagg_step(&mut self, step: proto::SecAggStep) -> Result<(), DaemonError> {
        let Some(round) = self.secagg.as_mut() else {
            return Err(SecAggRefusal::NoRoundOpen { round: step.round }.into());
        };
        if step.plan_id != round.start.plan_id || step.round != round.start.round {
            return Err(SecAggRefusal::OtherRound { step_round: step.round, open_round: round.start.round }.into());
        }
        let reply = |s: sec_agg_message::Step| SecAggMessage {
            plan_id: step.plan_id.clone(),
            round: step.round,
            step: Some(s),
        };
        match step.step.clone().ok_or(SecAggRefusal::EmptyStep)? {
            sec_agg_step::Step::Peers(p) => {
                let ads = p
                    .keys
                    .iter()
                    .map(|k| wire::keys_from_wire(k, &step.plan_id, step.round))
                    .collect::<Result<Vec<_>, _>>()?;
                let shares = round.client.receive_peers(&ads, &self.verifier)?;
                let msg = reply(sec_agg_message::Step::Shares(proto::SecAggShareList {
                    shares: shares.iter().map(wire::share_to_wire).collect(),
                }));
                self.link.sec_agg(msg).await?;
            }
            sec_agg_step::Step::Shares(s) => {
                let u2 = s.sharing.iter().copied().collect();
                let shares: Vec<_> = s.shares.iter().map(wire::share_from_wire).collect();
                round.client.receive_shares(&u2, &shares)?;
                if round.input.is_some() {
                    self.send_masked().await?;
                }
            }
            sec_agg_step::Step::Survivors(s) => {
                let u3 = s.survivors.iter().copied().collect();
                let message = round.client.receive_survivors(&u3)?;
                let signature = self.material.sign(&message)?;
                let msg = reply(sec_agg_message::Step::ConsistencySignature(signature));
                self.link.sec_agg(msg).await?;
            }
            sec_agg_step::Step::Signatures(s) => {
                let sigs: Vec<(u32, Vec<u8>)> = s.signatures.into_iter().map(|n| (n.id, n.signature)).collect();
                let shares = round.client.receive_consistency(&sigs, &self.verifier)?;
                let msg = reply(sec_agg_message::Step::Unmask(proto::SecAggUnmask {
                    shares: shares.iter().map(wire::unmask_to_wire).collect(),
                }));
                self.link.sec_agg(msg).await?;
                tracing::info!(round = step.round, "secure-aggregation shares for unmasking sent");
            }
        }
        Ok(())
    }
}
