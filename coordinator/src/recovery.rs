//! What a restart must still write to the audit log, and what it reads back from it. Pure: it
//! reads the records (typed, as [`AuditEvent`]s), the caller appends.
//!
//! - **A round's records.** A round is committed to the store (with the run's checkpoint) before
//!   its audit records are appended (`round_closed`, then `aggregate_released`, then the
//!   `round_record` nodes countersign), so a crash between the commit and the last of them leaves
//!   records missing; a resumed run never closes that round again, so the restart writes exactly
//!   the missing ones, once ([`missing`]).
//! - **A run's end.** A run's end goes to the store, then the audit log (`plan_finished`). A
//!   store write that failed must not bring an ended run back to life ([`Runs::ended`]); a crash
//!   between the two must not leave the log without the end: the restart writes the
//!   `plan_finished` of every run the store says ended and the log started but never ended
//!   ([`Runs::end_missing`], [`plan_finished`]).
//!
//! A record whose parameters do not read as its kind (a hand-made or altered record: our writer
//! builds every record from an [`AuditEvent`]) counts as absent, so the restart writes one that
//! reads; the report lists the unreadable one and uses none of it.

use std::collections::{HashMap, HashSet};

use sanctum_protocol::audit::{AuditEvent, EventError, Params, Record};
use sanctum_protocol::hash::ContentHash;

use crate::db::{RunRow, RunStatus};

/// The `round_record` a checkpoint keeps (as its parameters: the store's format), typed again to
/// be appended, naming run `run_id`: a checkpoint an earlier coordinator wrote kept a record
/// without its run, and the record written now is one the nodes judge by its run. An error names
/// record 0: the parameters come from the store, not from a log.
pub fn round_record(params: &Params, run_id: &str) -> Result<AuditEvent, EventError> {
    let mut event = AuditEvent::from_parts(0, "round_record", params)?;
    if let AuditEvent::RoundRecord { run: run @ None, .. } = &mut event {
        *run = Some(run_id.to_string());
    }
    Ok(event)
}

/// One record of the log a restart reads, with its typed event.
#[derive(Clone, Debug)]
pub struct Entry<'a> {
    pub record: &'a Record,
    pub event: AuditEvent,
}

/// The records a restart reads, typed: only the kinds it looks at (runs' starts and ends, rounds,
/// receipts), so a log of months costs its runs and rounds in memory, not its connections. A
/// record that does not read as its kind is left out (see the module's note).
pub fn entries(records: &[Record]) -> Vec<Entry<'_>> {
    use AuditEvent as E;
    records
        .iter()
        .filter_map(|record| {
            let event = record.typed().ok()?;
            matches!(
                event,
                E::PlanSubmitted { .. }
                    | E::PlanCancelled { .. }
                    | E::PlanFinished { .. }
                    | E::RoundClosed { .. }
                    | E::AggregateReleased { .. }
                    | E::RoundRecord { .. }
                    | E::Receipt { .. }
            )
            .then_some(Entry { record, event })
        })
        .collect()
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

/// Whether `event` starts run `run_id`.
fn starts(event: &AuditEvent, run_id: &str) -> bool {
    matches!(event, AuditEvent::PlanSubmitted { run: Some(run), .. } if run == run_id)
}

/// Whether a record of plan `p`, run `r` (`None`: a record that names no run) and round `n` is
/// one of run `run_id`'s round `round`: a record naming a run is of that run alone; one naming
/// none (written by an earlier coordinator) is matched by plan and round, as it always was.
fn of_run(p: &str, r: Option<&String>, n: u64, plan_id: &str, run_id: &str, round: u64) -> bool {
    p == plan_id && n == round && r.is_none_or(|r| r == run_id)
}

/// The log from run `run_id`'s `plan_submitted` on (the whole log if it holds none): the same
/// plan's earlier runs have rounds of the same numbers, and `aggregate_released` names no run.
fn since_start<'l, 'a>(log: &'l [Entry<'a>], run_id: &str) -> &'l [Entry<'a>] {
    let start = log.iter().position(|e| starts(&e.event, run_id)).unwrap_or(0);
    &log[start..]
}

/// The records of round `round` of run `run_id` (plan `plan_id`) missing from `log`. Only
/// records after the run's `plan_submitted` count, and of those a `round_closed` or
/// `round_record` that names another run does not (`aggregate_released` names the plan and round,
/// not the run; older `round_closed` and `round_record` records name no run either).
pub fn missing(log: &[Entry<'_>], plan_id: &str, run_id: &str, round: u32) -> Missing {
    let round = u64::from(round);
    let mut out = Missing { round_closed: true, aggregate_released: true, round_record: true };
    for e in since_start(log, run_id) {
        match &e.event {
            AuditEvent::RoundClosed { plan_id: p, run: r, round: n, .. }
                if of_run(p, r.as_ref(), *n, plan_id, run_id, round) =>
            {
                out.round_closed = false;
            }
            AuditEvent::AggregateReleased { plan_id: p, round: n, .. } if p == plan_id && *n == round => {
                out.aggregate_released = false;
            }
            AuditEvent::RoundRecord { plan_id: p, run: r, round: n, .. }
                if of_run(p, r.as_ref(), *n, plan_id, run_id, round) =>
            {
                out.round_record = false;
            }
            _ => {}
        }
    }
    out
}

/// The exact line of the last `round_record` of run `run_id`'s (plan `plan_id`) round `round`
/// the log holds, as [`missing`] finds it: what the nodes were sent and countersign.
pub fn round_record_line(log: &[Entry<'_>], plan_id: &str, run_id: &str, round: u32) -> Option<String> {
    since_start(log, run_id)
        .iter()
        .rev()
        .find(|e| {
            matches!(&e.event, AuditEvent::RoundRecord { plan_id: p, run: r, round: n, .. }
                if of_run(p, r.as_ref(), *n, plan_id, run_id, u64::from(round)))
        })
        .map(|e| e.record.line())
}

/// The nodes whose receipt for the round record with this hash the log holds.
pub fn signed<'a>(log: &'a [Entry<'_>], record: &ContentHash) -> Vec<&'a str> {
    let hex = record.to_hex();
    log.iter()
        .filter_map(|e| match &e.event {
            AuditEvent::Receipt { node, record_sha256, .. } if *record_sha256 == hex => Some(node.as_str()),
            _ => None,
        })
        .collect()
}

/// How the audit log says a run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ended {
    pub status: RunStatus,
    pub reason: String,
    /// The final model, on success.
    pub model: Option<String>,
}

/// The runs the audit log started (`plan_submitted` with a run id) and those it ended
/// (`plan_finished`), by run id.
#[derive(Clone, Debug, Default)]
pub struct Runs {
    started: HashSet<String>,
    ended: HashMap<String, Ended>,
}

impl Runs {
    pub fn read(log: &[Entry<'_>]) -> Self {
        let mut cancelled = HashSet::new();
        let mut runs = Runs::default();
        for e in log {
            match &e.event {
                AuditEvent::PlanSubmitted { run: Some(run), .. } => {
                    runs.started.insert(run.clone());
                }
                AuditEvent::PlanCancelled { run, .. } => {
                    cancelled.insert(run.clone());
                }
                AuditEvent::PlanFinished { run: Some(run), success, reason, final_model_sha256, .. } => {
                    let status = match (success, cancelled.contains(run)) {
                        (true, _) => RunStatus::Succeeded,
                        (false, true) => RunStatus::Cancelled,
                        (false, false) => RunStatus::Failed,
                    };
                    let ended =
                        Ended { status, reason: reason.clone(), model: success.then(|| final_model_sha256.clone()) };
                    runs.ended.insert(run.clone(), ended);
                }
                _ => {}
            }
        }
        runs
    }

    /// How the log says run `run_id` ended, if it does.
    pub fn ended(&self, run_id: &str) -> Option<&Ended> {
        self.ended.get(run_id)
    }

    /// Whether the log must still be told how this run ended: the store says it ended, the log
    /// holds its start and not its end. A run the log never started (one from before runs were
    /// logged, or from another log) gets no invented end.
    pub fn end_missing(&self, row: &RunRow) -> bool {
        let id = row.run_id.as_str();
        row.status != RunStatus::Running && self.started.contains(id) && !self.ended.contains_key(id)
    }
}

/// The `plan_finished` a restart writes for a run whose end the store holds and the log lacks,
/// from what the store knows: the outcome and reason, the rounds completed and the model the
/// checkpoint holds (`rounds_completed`, `model`), the final model on success. The client ε the
/// run's end computed was never stored: it is written as unknown (NaN, `null` in the line), which
/// the report leaves out.
pub fn plan_finished(row: &RunRow, rounds_completed: u32, model: Option<&str>) -> AuditEvent {
    AuditEvent::PlanFinished {
        plan_id: row.plan_id.to_string(),
        run: Some(row.run_id.to_string()),
        success: row.status == RunStatus::Succeeded,
        reason: row.reason.clone(),
        rounds_completed,
        final_model_sha256: row.final_model.as_deref().or(model).unwrap_or_default().to_string(),
        client_epsilon: f64::NAN,
        client_delta: f64::NAN,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_ids::{plan, run};

    fn rec(event: AuditEvent) -> Record {
        let (event, params) = event.to_parts().unwrap();
        Record {
            seq: 0,
            time: String::new(),
            actor: String::new(),
            event,
            params,
            prev: String::new(),
            sig: String::new(),
        }
    }

    fn submitted(plan_id: &str, run: &str) -> Record {
        rec(AuditEvent::PlanSubmitted {
            plan_id: plan_id.into(),
            run: Some(run.into()),
            run_number: Some(1),
            name: "heart".into(),
            plan_sha256: plan_id.into(),
            rounds: 5,
            strategy: "fedavg".into(),
            privacy: sanctum_protocol::plan::PrivacyMode::None,
            noise_multiplier: None,
            target_epsilon: None,
            delta: None,
            secure_aggregation: false,
            initial_model: "m0".into(),
        })
    }

    fn round(n: u64) -> [Record; 3] {
        round_of(Some("r2"), n)
    }

    /// Round `n`'s three records of plan `p`, naming run `run` (`None`: as an earlier coordinator
    /// wrote them, naming no run).
    fn round_of(run: Option<&str>, n: u64) -> [Record; 3] {
        let p = || "p".to_string();
        let names = || vec!["cleveland".to_string()];
        let run = run.map(str::to_string);
        [
            rec(AuditEvent::RoundClosed {
                plan_id: p(),
                run: run.clone(),
                round: n,
                reported: names(),
                dropped: vec![],
            }),
            rec(AuditEvent::AggregateReleased { plan_id: p(), round: n, model_sha256: "m".into(), contributors: 1 }),
            rec(AuditEvent::RoundRecord {
                plan_id: p(),
                run,
                round: n,
                model_sha256: "m".into(),
                updates: vec![],
                reported: names(),
                dropped: vec![],
            }),
        ]
    }

    #[test]
    fn each_crash_point_after_the_commit_leaves_exactly_the_records_after_it_missing() {
        let mut log = vec![
            // The plan's first run had a round 3 too: it must not count for run r2.
            submitted("p", "r1"),
            round(3)[0].clone(),
            round(3)[1].clone(),
            round(3)[2].clone(),
            submitted("p", "r2"),
        ];
        let all = Missing { round_closed: true, aggregate_released: true, round_record: true };
        assert_eq!(missing(&entries(&log), "p", "r2", 3), all, "crash right after the commit");
        let [closed, released, record] = round(3);
        log.push(closed);
        assert_eq!(missing(&entries(&log), "p", "r2", 3), Missing { round_closed: false, ..all });
        log.push(released);
        assert_eq!(missing(&entries(&log), "p", "r2", 3), Missing { round_record: true, ..Missing::default() });
        log.push(record);
        assert!(!missing(&entries(&log), "p", "r2", 3).any(), "nothing to write: the crash came later");
        // Another round, or another plan, is not this one.
        assert!(missing(&entries(&log), "p", "r2", 4).round_record);
        assert!(missing(&entries(&log), "q", "r2", 3).round_closed);
        // The record's line is the last one the log holds; the receipts are those naming its hash.
        let line = round_record_line(&entries(&log), "p", "r2", 3).unwrap();
        assert_eq!(line, log[log.len() - 1].line());
        let hash = ContentHash::of(line.as_bytes());
        let receipt = |node: &str, of: &ContentHash| {
            rec(AuditEvent::Receipt {
                node: node.into(),
                plan_id: "p".into(),
                round: 3,
                record_sha256: of.to_hex(),
                signature: "00".into(),
                agrees: true,
                reason: String::new(),
                certificate: None,
            })
        };
        log.push(receipt("cleveland", &hash));
        log.push(receipt("hungarian", &ContentHash::of(b"another record")));
        assert_eq!(signed(&entries(&log), &hash), vec!["cleveland"]);
    }

    /// A record named as its kind whose parameters do not read as it counts as absent: the
    /// restart writes one that reads (before typing, a `round_record` naming the plan and round
    /// counted whatever else it held).
    #[test]
    fn a_record_that_does_not_read_as_its_kind_counts_as_absent() {
        let mut log = vec![submitted("p", "r2")];
        let mut record = round(3)[2].clone();
        record.params.remove("updates");
        log.push(record);
        assert!(missing(&entries(&log), "p", "r2", 3).round_record);
        assert_eq!(round_record_line(&entries(&log), "p", "r2", 3), None);
    }

    /// A round record names its run: run r1's record of round 3 does not stand for run r2's,
    /// wherever it lies in the log (after r2's start: a later recovery of r1; or r2's start
    /// missing from the log), while a record naming no run (an earlier coordinator's) still
    /// counts by plan and round after the run's start, as before. Before records named their
    /// run, r1's record hid r2's missing one, and its line was taken for r2's.
    #[test]
    fn another_runs_record_of_the_same_round_does_not_hide_a_missing_one() {
        let [_, _, r1_record] = round_of(Some("r1"), 3);
        let [r2_closed, r2_released, r2_record] = round(3);
        let only_record = Missing { round_record: true, ..Missing::default() };
        // r1's record after r2's start; r2's round 3 was committed and its record lost.
        let mut log = vec![submitted("p", "r1"), submitted("p", "r2"), r1_record.clone(), r2_closed, r2_released];
        assert_eq!(missing(&entries(&log), "p", "r2", 3), only_record, "r1's record is not r2's");
        assert_eq!(round_record_line(&entries(&log), "p", "r2", 3), None);
        assert!(!missing(&entries(&log), "p", "r1", 3).round_record, "it is r1's");
        log.push(r2_record.clone());
        assert!(!missing(&entries(&log), "p", "r2", 3).any());
        assert_eq!(round_record_line(&entries(&log), "p", "r2", 3), Some(r2_record.line()));
        // r1's record written after r2's: r2's line is still the one found for r2.
        log.push(r1_record.clone());
        assert_eq!(round_record_line(&entries(&log), "p", "r2", 3), Some(r2_record.line()));
        assert_eq!(round_record_line(&entries(&log), "p", "r1", 3), Some(r1_record.line()));
        // A log without r2's start is read whole: r1's named records still do not count for r2.
        let [r1_closed, r1_released, _] = round_of(Some("r1"), 3);
        let headless = vec![r1_closed, r1_released, r1_record];
        let m = missing(&entries(&headless), "p", "r2", 3);
        assert!(m.round_closed && m.round_record && !m.aggregate_released, "{m:?}");
        // Records naming no run count for the run whose start they follow, as they always did.
        let [old_closed, old_released, old_record] = round_of(None, 3);
        let old = vec![submitted("p", "r1"), submitted("p", "r2"), old_closed, old_released, old_record.clone()];
        assert!(!missing(&entries(&old), "p", "r2", 3).any());
        assert_eq!(round_record_line(&entries(&old), "p", "r2", 3), Some(old_record.line()));
    }

    /// The record a restart writes from the checkpoint names the run, whether the checkpoint
    /// (written by an earlier coordinator) kept it or not.
    #[test]
    fn the_record_written_at_restart_names_its_run() {
        for kept in [None, Some("r2")] {
            let [_, _, record] = round_of(kept, 3);
            let written = round_record(&record.params, "r2").unwrap();
            assert!(
                matches!(&written, AuditEvent::RoundRecord { run: Some(r), round: 3, .. } if r == "r2"),
                "{kept:?}: {written:?}"
            );
        }
        let mut broken = round(3)[2].params.clone();
        broken.remove("updates");
        assert!(round_record(&broken, "r2").is_err());
    }

    fn row(label: &str, status: RunStatus, reason: &str, model: Option<&str>) -> RunRow {
        RunRow {
            run_id: run(label),
            plan_id: plan("heart"),
            number: 1,
            name: "heart".into(),
            wire_toml: String::new(),
            submitted_by: String::new(),
            submitted_ms: 0,
            rounds_planned: 5,
            status,
            reason: reason.into(),
            final_model: model.map(str::to_string),
            finished_ms: None,
        }
    }

    fn finished(label: &str, success: bool, reason: &str) -> Record {
        rec(AuditEvent::PlanFinished {
            plan_id: plan("heart").to_string(),
            run: Some(run(label).to_string()),
            success,
            reason: reason.into(),
            rounds_completed: 5,
            final_model_sha256: "m5".into(),
            client_epsilon: 0.0,
            client_delta: 0.0,
        })
    }

    /// One table: each run as the store has it, what the log holds of it, and whether the
    /// restart writes its `plan_finished`.
    #[test]
    fn a_run_the_store_ended_and_the_log_started_but_never_ended_gets_its_end_written() {
        use RunStatus::*;
        let p = plan("heart").to_string();
        let log = vec![
            submitted(&p, run("done").as_str()),
            finished("done", true, "all rounds done"),
            submitted(&p, run("crashed").as_str()),
            submitted(&p, run("failed").as_str()),
            submitted(&p, run("cancelled").as_str()),
            rec(AuditEvent::PlanCancelled {
                plan_id: p.clone(),
                run: run("cancelled").to_string(),
                by: "lead".into(),
                rounds_completed: 2,
            }),
            submitted(&p, run("interrupted").as_str()),
            submitted(&p, run("going").as_str()),
            // A malformed end does not count: the end is written again, readable.
            submitted(&p, run("garbled").as_str()),
            {
                let mut r = finished("garbled", false, "x");
                r.params.remove("success");
                r
            },
        ];
        let cases = [
            ("done", Succeeded, false, "its end is in the log"),
            ("crashed", Succeeded, true, "the crash came between the store and the log"),
            ("failed", Failed, true, "a failed run's end"),
            ("cancelled", Cancelled, true, "a cancelled run's end"),
            ("interrupted", Interrupted, true, "a run a restart could not resume"),
            ("going", Running, false, "still running: it is resumed, not ended"),
            ("never-logged", Succeeded, false, "the log never started it: no invented end"),
            ("garbled", Failed, true, "its end does not read"),
        ];
        let entries = entries(&log);
        let runs = Runs::read(&entries);
        for (label, status, want, what) in cases {
            assert_eq!(runs.end_missing(&row(label, status, "r", None)), want, "{label}: {what}");
        }
        assert_eq!(
            runs.ended(run("done").as_str()),
            Some(&Ended { status: Succeeded, reason: "all rounds done".into(), model: Some("m5".into()) })
        );
        assert_eq!(runs.ended(run("cancelled").as_str()), None);
    }

    /// The end written at restart says what the store knows, and reads back as the run's end:
    /// the next restart writes nothing, and a cancelled run reads as cancelled.
    #[test]
    fn the_end_written_at_restart_holds_what_the_store_knows_and_reads_back() {
        let ok = row("crashed", RunStatus::Succeeded, "all 5 rounds completed", Some("m5"));
        let event = plan_finished(&ok, 5, Some("m4"));
        let AuditEvent::PlanFinished { success, reason, rounds_completed, final_model_sha256, client_epsilon, .. } =
            &event
        else {
            panic!("not a plan_finished: {event:?}");
        };
        assert!(*success && reason == "all 5 rounds completed" && *rounds_completed == 5);
        assert_eq!(final_model_sha256, "m5", "the store's final model, not the checkpoint's");
        assert!(client_epsilon.is_nan(), "never stored: unknown");
        // The line holds `null` for the unknown ε and reads back to the same line.
        let r = rec(event);
        assert_eq!(r.params.get("client_epsilon"), Some(&serde_json::Value::Null));
        assert_eq!(rec(r.typed().unwrap()).line(), r.line());

        let cancelled = row("cancelled", RunStatus::Cancelled, "cancelled by LEAD", None);
        let event = plan_finished(&cancelled, 2, Some("m2"));
        assert!(
            matches!(&event, AuditEvent::PlanFinished { success: false, final_model_sha256, .. } if final_model_sha256 == "m2")
        );
        let log = vec![
            submitted(plan("heart").as_str(), run("cancelled").as_str()),
            rec(AuditEvent::PlanCancelled {
                plan_id: plan("heart").to_string(),
                run: run("cancelled").to_string(),
                by: "lead".into(),
                rounds_completed: 2,
            }),
            rec(event),
        ];
        let entries = entries(&log);
        let runs = Runs::read(&entries);
        assert!(!runs.end_missing(&cancelled), "written once");
        assert_eq!(runs.ended(run("cancelled").as_str()).map(|e| e.status), Some(RunStatus::Cancelled));
    }
}
