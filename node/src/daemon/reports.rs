//! What the node reports back besides updates: evaluations of models of a run's lineage (or a
//! refusal without a value) and countersigned round records ([`crate::receipt`] judges them).

use sanctum_protocol::audit::AuditEvent;
use sanctum_protocol::model::Weights;
use sanctum_protocol::plan::PrivacyMode;
use sanctum_protocol::proto::{self, EvaluationReport};

use super::{DaemonError, Node};
use crate::train;

impl Node {
    /// Checks the coordinator's record of a closed round against what this node sent, and
    /// countersigns it (agreeing or, with the reason, disputing): the decision and the signed
    /// statement are `receipt`'s; this sends it and keeps it in the node's own audit log.
    pub(super) async fn countersign(&mut self, receipt: &proto::RoundReceipt) -> Result<(), DaemonError> {
        let me = self.material.identity().name.clone();
        let sent = self.sent.get(&(receipt.plan_id.clone(), receipt.round));
        let sent = sent.map(|(hash, bytes)| crate::receipt::Sent { payload_sha256: hash, bytes: *bytes as u64 });
        let verdict = crate::receipt::judge(&receipt.record, &receipt.plan_id, receipt.round, &me, sent);
        let signature = verdict.statement(&receipt.plan_id, receipt.round).sign(|m| self.material.sign(m))?;
        self.audit(AuditEvent::ReceiptSigned {
            plan_id: receipt.plan_id.clone(),
            round: u64::from(receipt.round),
            record_sha256: verdict.record_sha256.to_hex(),
            agrees: verdict.agrees,
            reason: verdict.reason.clone(),
            signature: Some(crate::receipt::hex(&signature)),
        })?;
        if !verdict.agrees {
            tracing::error!(
                round = receipt.round,
                "the coordinator's round record does not match what this node sent: {}",
                verdict.reason
            );
        }
        let msg = proto::Countersignature {
            plan_id: receipt.plan_id.clone(),
            round: receipt.round,
            record_sha256: verdict.record_sha256.to_hex(),
            signature,
            agrees: verdict.agrees,
            reason: verdict.reason,
        };
        self.link.countersign(msg).await?;
        Ok(())
    }

    /// Refuses an evaluation (audited, logged) and answers it without a value, so an honest
    /// coordinator does not wait for this node; the refusal is returned as the error.
    pub(super) async fn decline_evaluation(&mut self, ev: &proto::Evaluate, reason: &str) -> Result<(), DaemonError> {
        self.refuse_directive("Evaluate", &ev.plan_id, 0, reason)?;
        let report =
            EvaluationReport { plan_id: ev.plan_id.clone(), model_sha256: ev.model_sha256.clone(), metrics: vec![] };
        self.link.report_evaluation(report).await?;
        Err(DaemonError::Refused { directive: "Evaluate", reason: reason.to_string() })
    }

    /// Evaluates a model of an accepted run's lineage on the test split, and reports the metric
    /// only as `policy.test_metrics` allows.
    pub(super) async fn evaluate(&mut self, ev: &proto::Evaluate) -> Result<(), DaemonError> {
        let Some(accepted) = self.plans.get(&ev.plan_id) else {
            let reason = format!("evaluation for plan {} which this node did not accept", ev.plan_id);
            return self.decline_evaluation(ev, &reason).await;
        };
        let view = accepted.view();
        if let Err(reason) = accepted.lineage.evaluate(&view, &ev.run, &ev.model_sha256) {
            return self.decline_evaluation(ev, &reason.to_string()).await;
        }
        if let Err(reason) = self.still_approved(&accepted.plan) {
            return self.decline_evaluation(ev, &reason.to_string()).await;
        }
        let allowed = self
            .cfg
            .policy
            .test_metrics
            .allows(accepted.plan.privacy.mode != PrivacyMode::None, self.cfg.policy.share_sample_counts);
        let layout = accepted.plan.model.layout();
        let model = accepted.plan.model.clone();
        let data = accepted.data.clone();
        let script = accepted.script.clone();
        if let Some(a) = self.plans.get_mut(&ev.plan_id) {
            a.lineage.record_evaluation(&ev.model_sha256);
        }
        let metrics = if allowed {
            let bytes = self.fetch(&ev.plan_id, &ev.model_sha256, ev.model_bytes).await?;
            let weights = Weights::from_safetensors(&bytes, &layout)?;
            let device = self.device;
            let eval = tokio::task::spawn_blocking(move || {
                train::evaluate(&model, &weights, &data, device, script.as_deref())
            })
            .await??;
            tracing::info!(metrics = ?eval.metrics, samples = eval.samples, "final model evaluated");
            self.release_metric(&ev.plan_id, &eval)?
        } else {
            tracing::info!(
                "final model not evaluated for the coordinator: policy.test_metrics keeps test metrics here"
            );
            vec![]
        };
        // An answer without a value tells the coordinator not to wait for this node.
        let report = EvaluationReport { plan_id: ev.plan_id.clone(), model_sha256: ev.model_sha256.clone(), metrics };
        let first = report.metrics.first();
        self.audit(AuditEvent::EvaluationSent {
            plan_id: ev.plan_id.clone(),
            run: ev.run.clone(),
            model_sha256: ev.model_sha256.clone(),
            value: first.map(|m| m.value),
            samples: first.map(|m| m.samples),
        })?;
        self.link.report_evaluation(report).await?;
        Ok(())
    }
}
