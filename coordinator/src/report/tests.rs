//! The report's views over hand-made logs: each record built from its typed event, as a writer
//! would append it.

use sanctum_protocol::audit::{AuditEvent, GENESIS_PREV, Record};
use sanctum_protocol::hash::ContentHash;
use sanctum_protocol::plan::PrivacyMode;
use serde_json::json;

use super::model::{Log, cross_check, find_missing, plans};
use super::*;

fn raw(seq: u64, event: &str, params: audit::Params) -> Record {
    Record {
        seq,
        time: "t".into(),
        actor: "c".into(),
        event: event.into(),
        params,
        prev: GENESIS_PREV.into(),
        sig: "00".into(),
    }
}

fn record(seq: u64, event: AuditEvent) -> Record {
    let (name, params) = event.to_parts().unwrap();
    raw(seq, &name, params)
}

fn submitted(plan_id: &str) -> AuditEvent {
    AuditEvent::PlanSubmitted {
        plan_id: plan_id.into(),
        run: Some("r".into()),
        run_number: Some(1),
        name: "n".into(),
        plan_sha256: plan_id.into(),
        rounds: 2,
        strategy: "fedavg".into(),
        privacy: PrivacyMode::None,
        noise_multiplier: None,
        target_epsilon: None,
        delta: None,
        secure_aggregation: false,
        initial_model: "m".into(),
    }
}

fn opened(round: u64) -> AuditEvent {
    AuditEvent::RoundOpened {
        plan_id: "p".into(),
        round,
        participants: vec![],
        model_sha256: "m".into(),
        secure_aggregation: None,
        threshold: None,
    }
}

fn log(records: Vec<Record>) -> Log {
    let verified = audit::Verified {
        records: records.len() as u64,
        writer: "coordinator".into(),
        role: "coordinator".into(),
        fingerprint: "ff".into(),
        head_behind: false,
    };
    Log::from_records("audit.jsonl".into(), Ok(verified), records)
}

/// A round number is the log's: a `round_opened` of round 10^12 is one entry (it once
/// resized a vector to 10^12 slots and exhausted memory).
#[test]
fn a_huge_round_number_costs_one_entry() {
    let closed = AuditEvent::RoundClosed {
        plan_id: "p".into(),
        run: Some("r".into()),
        round: u64::MAX,
        reported: vec![],
        dropped: vec![],
    };
    let coord = log(vec![
        record(1, submitted("p")),
        record(2, opened(1_000_000_000_000)),
        record(3, closed),
        record(4, opened(1)),
    ]);
    let plans = plans(&coord, None);
    let rounds: Vec<u64> = plans[0].rounds.keys().copied().collect();
    assert_eq!(rounds, vec![1, 1_000_000_000_000, u64::MAX]);
}

/// Each node a round record was sent to owes a receipt for that record: one the log holds
/// (even a failed one, shown as FAILED) is not missing; one for another record is. The same
/// whether the record names its run or, as earlier coordinators wrote it, not.
#[test]
fn a_receipt_a_round_record_asked_for_and_no_log_holds_is_missing() {
    for run in [None, Some("r".to_string())] {
        receipts_owed(run);
    }
}

fn receipts_owed(run: Option<String>) {
    let rr = record(
        2,
        AuditEvent::RoundRecord {
            plan_id: "p".into(),
            run: run.clone(),
            round: 1,
            model_sha256: "m".into(),
            updates: vec![],
            reported: vec!["a".into(), "b".into(), "c".into()],
            dropped: vec![],
        },
    );
    let hash = ContentHash::of(rr.line().as_bytes()).to_hex();
    let receipt = |node: &str, hash: &str| {
        record(
            3,
            AuditEvent::Receipt {
                node: node.into(),
                plan_id: "p".into(),
                round: 1,
                record_sha256: hash.into(),
                signature: String::new(),
                agrees: true,
                reason: String::new(),
                certificate: None,
            },
        )
    };
    let coord = log(vec![record(1, submitted("p")), rr, receipt("a", &hash), receipt("c", &"ab".repeat(32))]);
    let mut plans = plans(&coord, None);
    cross_check(&mut plans, &[]);
    find_missing(&mut plans);
    assert_eq!(plans[0].missing, vec![(1, "b".to_string()), (1, "c".to_string())], "{run:?}");
    assert!(plans[0].countersignatures.iter().all(|c| !c.coordinator.as_ref().unwrap().stands()));
}

/// A record of a known kind whose parameter has the wrong type is not used and is listed with
/// its sequence number and the parameter (and fails the report); a kind this version does not
/// know is skipped without complaint.
#[test]
fn a_record_that_does_not_fit_its_kind_is_listed_and_unused_and_an_unknown_kind_is_skipped() {
    let bad_round: audit::Params =
        serde_json::from_value(json!({"plan_id": "p", "round": "2", "participants": [], "model_sha256": "m",
            "secure_aggregation": null, "threshold": null}))
        .unwrap();
    let coord = log(vec![
        record(1, submitted("p")),
        record(2, opened(1)),
        raw(3, "round_opened", bad_round),
        raw(4, "quantum_round_opened", audit::Params::new()),
    ]);
    assert_eq!(coord.unreadable.len(), 1);
    let text = coord.unreadable[0].to_string();
    assert!(text.starts_with("audit record 3 (round_opened): parameter `round`"), "{text}");
    let plans = plans(&coord, None);
    assert_eq!(plans[0].rounds.keys().copied().collect::<Vec<_>>(), vec![1], "the bad record is not used");
    let (mut h, mut m) = (String::new(), String::new());
    render::body(&coord, &[], &plans, true, &mut h, &mut m);
    assert!(m.contains("## Unreadable records") && m.contains("audit record 3 (round_opened)"), "{m}");
    let findings = Findings { unreadable_records: 1, ..Findings::default() };
    assert!(findings.failed());
}
