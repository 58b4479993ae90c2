//! Closing a round (aggregation, the new global model, the round record) and finishing a run
//! (the final report and the model export).

use std::collections::BTreeSet;
use std::sync::Arc;

use sanctum_protocol::audit::AuditEvent;
use sanctum_protocol::hash::ContentHash;
use sanctum_protocol::privacy;
use sanctum_protocol::proto::{self, PlanFinished, directive, plan_event};
use serde_json::json;

use crate::engine::effects::{Effect, ExportJob};
use crate::engine::{Millis, NodeName};
use crate::round::Action;

use super::RunEngine;

impl RunEngine {
    /// Stores the new global model and records it in the lineage.
    pub(in crate::engine) fn store_global(
        &mut self,
        fx: &mut Vec<Effect>,
    ) -> Result<(), crate::engine::AggregationFailed> {
        let bytes = self.global.to_safetensors()?;
        self.model = ContentHash::of(&bytes);
        self.model_bytes = bytes.len() as u64;
        self.lineage.push(self.model);
        fx.push(Effect::StoreModel { plan_id: self.plan_id.clone(), hash: self.model, bytes: Arc::new(bytes) });
        Ok(())
    }

    /// Applies the server step to the admitted updates and stores the new global model.
    pub(super) fn close_round(
        &mut self,
        round: u32,
        fx: &mut Vec<Effect>,
    ) -> Result<(), crate::engine::AggregationFailed> {
        if self.robust.is_some() {
            return self.close_robust_round(round, fx);
        }
        if self.acc.count() == 0 {
            return Err(crate::engine::AggregationFailed::NoUpdate);
        }
        let shape = crate::strategy::RoundShape { reported: self.acc.count(), participants: self.participants.len() };
        let released;
        let mean: &[f64] = match self.client_dp.as_mut() {
            Some((dp, _)) => {
                let secure = &mut self.secure;
                released = dp.release(self.acc.sum(), self.participants.len(), &mut |std| secure.sample(std));
                &released
            }
            // In the sum's own buffer: no second buffer of the model's size at the close.
            None => self.acc.mean_in_place().ok_or(crate::engine::AggregationFailed::NoUpdate)?,
        };
        // A step that would leave a non-finite model (NaN or infinity: FedAdam or FedAvg pushed
        // past f32's range) changes nothing and fails the round with the reason; the model is
        // neither stored nor published.
        self.server
            .step(self.global.values_mut(), mean, shape)
            .map_err(|source| crate::engine::AggregationFailed::Step { round, source })?;
        self.store_global(fx)?;
        tracing::info!(round, updates = self.acc.count(), model = %self.model.short(), "round aggregated");
        Ok(())
    }

    /// A robust round's close: the rule reads the kept updates back a block at a time and makes
    /// Δ, the FedAvg step applies it; the kept updates are removed whatever the outcome.
    fn close_robust_round(&mut self, round: u32, fx: &mut Vec<Effect>) -> Result<(), crate::engine::AggregationFailed> {
        let Some(robust) = self.robust.as_mut() else {
            return Err(crate::engine::AggregationFailed::NoUpdate);
        };
        let reported = robust.count();
        if reported == 0 {
            return Err(crate::engine::AggregationFailed::NoUpdate);
        }
        let rule = robust.name();
        let delta = robust.combine(crate::strategy::robust::BLOCK);
        robust.clear();
        let delta = delta.map_err(|source| crate::engine::AggregationFailed::Robust { round, rule, source })?;
        let shape = crate::strategy::RoundShape { reported, participants: self.participants.len() };
        self.server
            .step(self.global.values_mut(), &delta, shape)
            .map_err(|source| crate::engine::AggregationFailed::Step { round, source })?;
        self.store_global(fx)?;
        tracing::info!(round, updates = reported, rule, model = %self.model.short(), "round aggregated");
        Ok(())
    }

    /// Tells the lead (and the audit log) a round closed with the new model, asks those who
    /// reported to countersign its record, and moves the plan on.
    pub(in crate::engine) fn publish_round_closed(
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
        // The record names its run: the plan's other runs record the same round numbers, and a
        // node judges the record against its release in this run alone.
        let record = AuditEvent::RoundRecord {
            plan_id: self.plan_id.to_string(),
            run: Some(self.run_id.to_string()),
            round: u64::from(round),
            model_sha256: self.model.to_hex(),
            updates: self.round_updates.clone(),
            reported: reported.iter().map(ToString::to_string).collect(),
            dropped: dropped.iter().map(ToString::to_string).collect(),
        };
        fx.push(self.checkpoint_effect(Some(crate::engine::checkpoint::ClosedRound {
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
            .flat_map(|(node, ms)| ms.iter().map(move |m| (node, m)))
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
    pub(in crate::engine) fn flush_finish(&mut self, connected: &BTreeSet<NodeName>, fx: &mut Vec<Effect>) {
        let Some((success, reason)) = self.finishing.take() else {
            return;
        };
        if self.finished {
            return;
        }
        self.finished = true;
        self.secagg = None;
        self.clear_robust();
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
    pub(super) fn export_job(&self) -> ExportJob {
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
