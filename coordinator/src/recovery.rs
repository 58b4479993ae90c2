//! What a restart must still write to the audit log for a run's last committed round. A round is
//! committed to the store (with the run's checkpoint) before its audit records are appended
//! (`round_closed`, then `aggregate_released`, then the `round_record` nodes countersign), so a
//! crash between the commit and the last of them leaves records missing; a resumed run never
//! closes that round again, so the restart writes exactly the missing ones, once. Pure: it reads
//! the records, the caller appends.

use sanctum_protocol::audit::{AuditEvent, EventError, Params, Record};

/// The `round_record` a checkpoint keeps (as its parameters: the store's format), typed again to
/// be appended. An error names record 0: the parameters come from the store, not from a log.
pub fn round_record(params: &Params) -> Result<AuditEvent, EventError> {
    AuditEvent::from_parts(0, "round_record", params)
}

/// Which of a round's audit records are not in the log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Missing {
    pub round_closed: bool,
    pub aggregate_released: bool,
    pub round_record: bool,
}

impl Missing {
    pub fn any(&self) -> bool {
        self.round_closed || self.aggregate_released || self.round_record
    }
}

/// The records of round `round` of run `run_id` (plan `plan_id`) missing from `records`. Only
/// records after the run's `plan_submitted` count: the same plan's earlier runs have rounds of the
/// same numbers (`aggregate_released` and `round_record` name the plan and round, not the run).
pub fn missing(records: &[Record], plan_id: &str, run_id: &str, round: u32) -> Missing {
    let start = records
        .iter()
        .position(|r| r.event == "plan_submitted" && r.params.get("run").and_then(|v| v.as_str()) == Some(run_id))
        .unwrap_or(0);
    let is = |r: &Record, event: &str| {
        r.event == event
            && r.params.get("plan_id").and_then(|v| v.as_str()) == Some(plan_id)
            && r.params.get("round").and_then(|v| v.as_u64()) == Some(u64::from(round))
    };
    let after = &records[start..];
    Missing {
        round_closed: !after.iter().any(|r| is(r, "round_closed")),
        aggregate_released: !after.iter().any(|r| is(r, "aggregate_released")),
        round_record: !after.iter().any(|r| is(r, "round_record")),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::json;

    use super::*;

    fn rec(event: &str, params: serde_json::Value) -> Record {
        let params: BTreeMap<String, serde_json::Value> =
            params.as_object().map(|m| m.clone().into_iter().collect()).unwrap_or_default();
        Record {
            seq: 0,
            time: String::new(),
            actor: String::new(),
            event: event.into(),
            params,
            prev: String::new(),
            sig: String::new(),
        }
    }

    fn round(n: u32) -> [Record; 3] {
        [
            rec("round_closed", json!({"plan_id": "p", "run": "r2", "round": n})),
            rec("aggregate_released", json!({"plan_id": "p", "round": n})),
            rec("round_record", json!({"plan_id": "p", "round": n})),
        ]
    }

    #[test]
    fn each_crash_point_after_the_commit_leaves_exactly_the_records_after_it_missing() {
        let mut log = vec![
            // The plan's first run had a round 3 too: it must not count for run r2.
            rec("plan_submitted", json!({"plan_id": "p", "run": "r1"})),
            round(3)[0].clone(),
            round(3)[1].clone(),
            round(3)[2].clone(),
            rec("plan_submitted", json!({"plan_id": "p", "run": "r2"})),
        ];
        let all = Missing { round_closed: true, aggregate_released: true, round_record: true };
        assert_eq!(missing(&log, "p", "r2", 3), all, "crash right after the commit");
        let [closed, released, record] = round(3);
        log.push(closed);
        assert_eq!(missing(&log, "p", "r2", 3), Missing { round_closed: false, ..all });
        log.push(released);
        assert_eq!(missing(&log, "p", "r2", 3), Missing { round_record: true, ..Missing::default() });
        log.push(record);
        assert!(!missing(&log, "p", "r2", 3).any(), "nothing to write: the crash came later");
        // Another round, or another plan, is not this one.
        assert!(missing(&log, "p", "r2", 4).round_record);
        assert!(missing(&log, "q", "r2", 3).round_closed);
    }
}
