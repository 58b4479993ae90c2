//! What the node reports back besides updates: evaluations of models of a run's lineage (or a
//! refusal without a value) and countersigned round records ([`crate::receipt`] judges them
//! against the release store's durable `uploads`, so a restarted node judges as it would have).

use sanctum_protocol::audit::AuditEvent;
use sanctum_protocol::model::Weights;
use sanctum_protocol::plan::PrivacyMode;
use sanctum_protocol::proto::{self, EvaluationReport};

use super::{DaemonError, Node};
use crate::receipt::{Knowledge, Sent, Verdict};
use crate::release::{ReleaseError, ReleaseStore, RoundUpload};
use crate::train;

/// Judges a round record against what the store says this node sent in that round. A record
/// that names its run (read from the record's line, which the node signs, never from the
/// message's fields) is judged against that run alone, found even where an earlier node wrote
/// its directory; one that names none (an earlier coordinator's) against every run of the plan
/// the store holds and `accepted_run` (the plan's accepted run, found likewise).
pub(super) fn judge_receipt(
    releases: &ReleaseStore,
    receipt: &proto::RoundReceipt,
    me: &str,
    accepted_run: Option<&str>,
) -> Result<Verdict, ReleaseError> {
    let named = crate::receipt::record_run(&receipt.record);
    let found = releases.round_uploads(&receipt.plan_id, receipt.round, named.as_deref().or(accepted_run))?;
    let runs: Vec<(&str, Knowledge<'_>)> = found
        .iter()
        .map(|(run, upload)| {
            let known = match upload {
                RoundUpload::Known(u) => {
                    let sent = Sent { payload_sha256: &u.payload_sha256, bytes: u.bytes };
                    if u.answered { Knowledge::Sent(sent) } else { Knowledge::Leaving(sent) }
                }
                RoundUpload::NotKnown => Knowledge::NotKnown,
            };
            (run.as_str(), known)
        })
        .collect();
    Ok(crate::receipt::judge_runs(&receipt.record, &receipt.plan_id, receipt.round, me, &runs))
}

impl Node {
    /// Checks the coordinator's record of a closed round against what this node sent, and
    /// countersigns it (agreeing or, with the reason, disputing): the decision and the signed
    /// statement are `receipt`'s; this sends it and keeps it in the node's own audit log.
    pub(super) async fn countersign(&mut self, receipt: &proto::RoundReceipt) -> Result<(), DaemonError> {
        let me = self.material.identity().name.clone();
        let accepted_run = self.plans.get(&receipt.plan_id).map(|a| a.run.as_str());
        let verdict = judge_receipt(&self.releases, receipt, &me, accepted_run)?;
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use sanctum_protocol::audit::{GENESIS_PREV, Record};
    use sanctum_protocol::hash::ContentHash;
    use serde_json::{Value, json};

    use super::*;
    use crate::release::{Released, Upload};

    const ME: &str = "cleveland";

    fn receipt(round: u32, updates: Value) -> proto::RoundReceipt {
        receipt_of(None, round, updates)
    }

    /// A receipt whose record names run `run` (`None`: none, as earlier coordinators wrote it).
    fn receipt_of(run: Option<&str>, round: u32, updates: Value) -> proto::RoundReceipt {
        let mut params = BTreeMap::from([
            ("plan_id".to_string(), json!("p")),
            ("round".to_string(), json!(round)),
            ("updates".to_string(), updates),
        ]);
        if let Some(run) = run {
            params.insert("run".to_string(), json!(run));
        }
        let record = Record {
            seq: 9,
            time: "t".into(),
            actor: "c".into(),
            event: "round_record".into(),
            params,
            prev: GENESIS_PREV.into(),
            sig: "00".into(),
        };
        proto::RoundReceipt { plan_id: "p".into(), round, record: record.line() }
    }

    fn listed(payload: &[u8]) -> Value {
        json!({"node": ME, "payload_sha256": ContentHash::of(payload).to_hex(), "bytes": payload.len()})
    }

    fn theirs() -> Value {
        json!({"node": "hungarian", "payload_sha256": "bb".repeat(32), "bytes": 8})
    }

    /// What `train_and_send` and `send_update` leave in the store for a plain round: the release
    /// (noted as leaving), then the note that the coordinator answered.
    fn send_plain(store: &ReleaseStore, run: &str, round: u32, payload: &[u8]) {
        store.put("p", run, round, &Released::Update { header: vec![1, 2], payload: payload.to_vec() }).unwrap();
        let answered = Upload {
            round,
            payload_sha256: ContentHash::of(payload).to_hex(),
            bytes: payload.len() as u64,
            answered: true,
        };
        store.note_upload("p", run, &answered).unwrap();
    }

    fn verdict(store: &ReleaseStore, r: &proto::RoundReceipt, accepted: Option<&str>) -> Verdict {
        judge_receipt(store, r, ME, accepted).unwrap()
    }

    #[test]
    fn a_node_restarted_between_sending_and_the_receipt_agrees_with_a_correct_record_only() {
        let dir = tempfile::tempdir().unwrap();
        let sent = vec![7u8; 56];
        send_plain(&ReleaseStore::open(dir.path()).unwrap(), "run-1", 2, &sent);
        // The restart: a new store on the same directory, no accepted plan yet (a record written
        // at the coordinator's recovery comes before the plan is offered again).
        let store = ReleaseStore::open(dir.path()).unwrap();
        let correct = receipt(2, json!([listed(&sent), theirs()]));
        let v = verdict(&store, &correct, None);
        assert!(v.agrees, "{}", v.reason);
        // What the in-memory map gave a restarted node: nothing sent, so a dispute.
        let before = crate::receipt::judge(&correct.record, "p", 2, ME, None);
        assert!(!before.agrees && before.reason.contains("never sent"), "{}", before.reason);
        let mut other_size = listed(&sent);
        other_size["bytes"] = json!(57);
        // (what, receipt, a phrase of the dispute)
        let wrong = [
            ("another hash", receipt(2, json!([listed(&[8u8; 56])]))),
            ("another size", receipt(2, json!([other_size]))),
            ("left out", receipt(2, json!([theirs()]))),
            ("listed twice", receipt(2, json!([listed(&sent), listed(&sent)]))),
            ("a round it never sent", receipt(3, json!([listed(&sent)]))),
        ];
        for (what, r) in wrong {
            let v = verdict(&store, &r, None);
            assert!(!v.agrees, "{what}: agreed");
            let phrase = if r.round == 3 { "never sent" } else { "this node sent 56 bytes with SHA-256" };
            assert!(v.reason.contains(phrase), "{what}: {}", v.reason);
        }
    }

    #[test]
    fn two_runs_of_one_plan_are_judged_each_against_its_own_release() {
        let dir = tempfile::tempdir().unwrap();
        let store = ReleaseStore::open(dir.path()).unwrap();
        let (run1, run2) = (vec![1u8; 40], vec![2u8; 48]);
        send_plain(&store, "run-1", 2, &run1);
        send_plain(&store, "run-1", 3, &[3u8; 40]);
        store.close("p", "run-1").unwrap();
        send_plain(&store, "run-2", 2, &run2);
        let store = ReleaseStore::open(dir.path()).unwrap();
        for accepted in [None, Some("run-2")] {
            for (what, r) in
                [("run 1's", receipt(2, json!([listed(&run1)]))), ("run 2's", receipt(2, json!([listed(&run2)])))]
            {
                let v = verdict(&store, &r, accepted);
                assert!(v.agrees, "{what} record, accepted {accepted:?}: {}", v.reason);
            }
            // A late receipt of run 1's round 3, which run 2 has not reached.
            let v = verdict(&store, &receipt(3, json!([listed(&[3u8; 40])])), accepted);
            assert!(v.agrees, "run 1's round 3: {}", v.reason);
            let v = verdict(&store, &receipt(3, json!([theirs()])), accepted);
            assert!(!v.agrees && v.reason.contains("this node sent 40 bytes"), "{}", v.reason);
            // One run's hash with the other's size fits neither.
            let mut mixed = listed(&run1);
            mixed["bytes"] = json!(48);
            let v = verdict(&store, &receipt(2, json!([mixed])), accepted);
            assert!(!v.agrees && v.reason.contains("; or "), "{}", v.reason);
            let v = verdict(&store, &receipt(2, json!([theirs()])), accepted);
            assert!(!v.agrees, "left out of both runs: {}", v.reason);
        }
    }

    /// Run 1's round 2 update was left unconfirmed by a crash; run 2's was answered. A record
    /// naming run 2 is judged against run 2's release alone, after a restart too; one naming no
    /// run as before (any run that fits: leaving run 2's update out still fits run 1, the gap
    /// that naming the run closes).
    #[test]
    fn a_record_that_names_its_run_is_judged_against_that_runs_release_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (run1, run2) = (vec![1u8; 40], vec![2u8; 48]);
        {
            let store = ReleaseStore::open(dir.path()).unwrap();
            store.put("p", "run-1", 2, &Released::Update { header: vec![1], payload: run1.clone() }).unwrap();
            let leaving =
                Upload { round: 2, payload_sha256: ContentHash::of(&run1).to_hex(), bytes: 40, answered: false };
            store.note_upload("p", "run-1", &leaving).unwrap();
            store.close("p", "run-1").unwrap();
            send_plain(&store, "run-2", 2, &run2);
        }
        let store = ReleaseStore::open(dir.path()).unwrap();
        for accepted in [None, Some("run-1"), Some("run-2")] {
            let of2 = |updates: Value| receipt_of(Some("run-2"), 2, updates);
            // (what, receipt, agrees, a phrase of the reason)
            let cases = [
                ("run 2's record, run 2's update", of2(json!([listed(&run2), theirs()])), true, ""),
                ("run 2's record, run 1's update", of2(json!([listed(&run1)])), false, "this node sent 48 bytes"),
                ("run 2's record, left out", of2(json!([theirs()])), false, "the record lists []"),
                ("run 1's record, left out", receipt_of(Some("run-1"), 2, json!([theirs()])), true, ""),
                (
                    "run 1's record, run 2's update",
                    receipt_of(Some("run-1"), 2, json!([listed(&run2)])),
                    false,
                    "may not have arrived",
                ),
                (
                    "a run never taken part in",
                    receipt_of(Some("run-9"), 2, json!([listed(&run2)])),
                    false,
                    "never sent",
                ),
                ("no run named, left out", receipt(2, json!([theirs()])), true, ""),
                ("no run named, run 2's update", receipt(2, json!([listed(&run2)])), true, ""),
            ];
            for (what, r, agrees, phrase) in cases {
                let v = verdict(&store, &r, accepted);
                assert_eq!(v.agrees, agrees, "{what}, accepted {accepted:?}: {}", v.reason);
                assert!(v.reason.contains(phrase), "{what}, accepted {accepted:?}: {}", v.reason);
            }
        }
        // The run is the record's, not the message's: a receipt whose fields say another plan
        // round is still judged by its line (and is not this round's record).
        let mut r = receipt_of(Some("run-2"), 2, json!([listed(&run2)]));
        r.round = 3;
        let v = verdict(&store, &r, None);
        assert!(!v.agrees && v.reason.contains("not this round's"), "{}", v.reason);
    }

    #[test]
    fn a_masked_input_that_may_not_have_arrived_is_listed_exactly_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let masked = vec![5u8; 64];
        {
            let store = ReleaseStore::open(dir.path()).unwrap();
            store.put("p", "run-1", 1, &Released::Masked).unwrap();
            // Noted by `send_update` just before it leaves; the node stopped before the answer.
            let leaving =
                Upload { round: 1, payload_sha256: ContentHash::of(&masked).to_hex(), bytes: 64, answered: false };
            store.note_upload("p", "run-1", &leaving).unwrap();
        }
        let store = ReleaseStore::open(dir.path()).unwrap();
        assert!(verdict(&store, &receipt(1, json!([listed(&masked)])), None).agrees, "it arrived");
        assert!(verdict(&store, &receipt(1, json!([theirs()])), None).agrees, "it never arrived");
        let v = verdict(&store, &receipt(1, json!([listed(&[6u8; 64])])), None);
        assert!(!v.agrees && v.reason.contains("may not have arrived"), "{}", v.reason);
    }

    #[test]
    fn a_round_released_by_an_earlier_node_is_not_known_and_disputed_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let store = ReleaseStore::open(dir.path()).unwrap();
        send_plain(&store, "run-1", 1, &[1u8; 40]);
        // An earlier node kept neither `uploads` nor `run`: remove them from the run directory.
        let run_dir =
            std::fs::read_dir(dir.path().join("releases")).unwrap().flatten().next().map(|e| e.path()).unwrap();
        std::fs::remove_file(run_dir.join("uploads")).unwrap();
        std::fs::remove_file(run_dir.join("run")).unwrap();
        let store = ReleaseStore::open(dir.path()).unwrap();
        let r = receipt(1, json!([listed(&[1u8; 40])]));
        let v = verdict(&store, &r, Some("run-1"));
        assert!(!v.agrees && v.reason.contains("cannot confirm the record"), "{}", v.reason);
        // Without the accepted run the directory is not found: judged as before (nothing sent).
        let v = verdict(&store, &r, None);
        assert!(!v.agrees && v.reason.contains("never sent"), "{}", v.reason);
        // A record that names the run finds the directory without it.
        let v = verdict(&store, &receipt_of(Some("run-1"), 1, json!([listed(&[1u8; 40])])), None);
        assert!(!v.agrees && v.reason.contains("cannot confirm the record"), "{}", v.reason);
    }
}
