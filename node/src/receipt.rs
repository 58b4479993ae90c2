//! Countersigning a round record (pure): does the coordinator's record of a closed round list
//! exactly what this node sent, and what the node signs to say so (agreeing, or disputing with
//! the reason). The signed statement covers the verdict and the reason, not only the record, so
//! the coordinator cannot write a dispute down as agreement ([`sanctum_protocol::receipt`]).

use sanctum_protocol::audit::Record;
use sanctum_protocol::hash::ContentHash;
use sanctum_protocol::receipt::{MAX_REASON_BYTES, Statement};

/// What this node sent in a round: the payload's SHA-256 (hex) and its size in bytes.
#[derive(Clone, Copy, Debug)]
pub struct Sent<'a> {
    pub payload_sha256: &'a str,
    pub bytes: u64,
}

/// What this node's durable state says about its update in one run's round (the daemon looks it
/// up in [`crate::release`]; a round of a run the node sent nothing in is no candidate at all).
#[derive(Clone, Copy, Debug)]
pub enum Knowledge<'a> {
    /// The upload finished (the coordinator answered it): the record must list exactly this.
    Sent(Sent<'a>),
    /// Stored and about to leave when the node last knew (it stopped before the coordinator
    /// answered): the record may list exactly this, or, if it never arrived, nothing.
    Leaving(Sent<'a>),
    /// Released by a node that kept no hash of what it sent (an earlier version): this node
    /// cannot confirm any record of the round, so it disputes, saying why.
    NotKnown,
}

/// The node's verdict on one round record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// SHA-256 of the record's exact line, as received.
    pub record_sha256: ContentHash,
    pub agrees: bool,
    /// Every mismatch found, joined; empty when it agrees; at most `MAX_REASON_BYTES`.
    pub reason: String,
}

impl Verdict {
    /// The statement the node signs with its certificate key.
    pub fn statement<'a>(&'a self, plan_id: &'a str, round: u32) -> Statement<'a> {
        Statement { plan_id, round, record_sha256: self.record_sha256, agrees: self.agrees, reason: &self.reason }
    }
}

/// Lowercase hex, as audit records write signatures.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Cuts `text` to at most `max` bytes on a character boundary (a reason is text, never sliced
/// inside a character).
fn clip(mut text: String, max: usize) -> String {
    if text.len() > max {
        let end = (0..=max).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
        text.truncate(end);
    }
    text
}

/// Checks the record the coordinator sent for `plan_id` round `round` against what node `me`
/// sent in it (`None`: nothing), in the one run the caller means (a run the record names is not
/// compared: see [`judge_runs`]). The record must be that round's `round_record` and list this
/// node's update exactly once with the same hash and size, or not at all when nothing was sent.
pub fn judge(record_line: &str, plan_id: &str, round: u32, me: &str, sent: Option<Sent<'_>>) -> Verdict {
    let read = read(record_line, plan_id, round, me);
    let runs: Vec<Knowledge<'_>> = sent.map(Knowledge::Sent).into_iter().collect();
    conclude(record_line, read, &runs, "")
}

/// The run a round record names, read from the record's line (what the node signs, never a
/// field of the message that carried it): `None` for a record that names none (written by an
/// earlier coordinator) or does not read; [`judge_runs`] disputes a `run` that is not a string.
pub fn record_run(record_line: &str) -> Option<String> {
    let record = serde_json::from_str::<Record>(record_line).ok()?;
    record.params.get("run")?.as_str().map(str::to_string)
}

/// [`judge`] against the runs of the plan in which this node has an update for `round`, each
/// named (`(run, what the node holds)`). A record that names its run is judged against that run
/// alone: it must list exactly that run's update, or nothing where the node released nothing in
/// it (or its update may not have arrived). A record that names none (an earlier coordinator's)
/// is agreed to when it fits one of them, told apart by the payload's hash, which differs
/// between any two releases; a record that leaves this node out fits a run only where its update
/// may not have arrived (`Leaving`). With no candidate run, the record must not list this node.
pub fn judge_runs(record_line: &str, plan_id: &str, round: u32, me: &str, runs: &[(&str, Knowledge<'_>)]) -> Verdict {
    let read = read(record_line, plan_id, round, me);
    let (candidates, whose): (Vec<Knowledge<'_>>, &str) = match &read.run {
        RecordRun::Named(named) => {
            (runs.iter().filter(|(run, _)| run == named).map(|(_, k)| *k).collect(), " in the run the record names")
        }
        RecordRun::Unnamed | RecordRun::Malformed => (runs.iter().map(|(_, k)| *k).collect(), ""),
    };
    conclude(record_line, read, &candidates, whose)
}

/// The run a record names, as [`read`] finds it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum RecordRun {
    Named(String),
    /// No `run` parameter: the record of an earlier coordinator.
    Unnamed,
    /// A `run` that is not a string: no run this node could have taken part in (a dispute).
    Malformed,
}

/// What the record says, as far as this node checks it.
struct Read {
    problems: Vec<String>,
    /// This node's updates the record lists: (payload SHA-256, bytes).
    listed: Vec<(String, u64)>,
    run: RecordRun,
    /// The line is no audit record at all: nothing in it is compared with the runs.
    unreadable: bool,
}

/// Reads the record line: whether it is this round's `round_record`, the run it names, and
/// which of this node's updates it lists.
fn read(record_line: &str, plan_id: &str, round: u32, me: &str) -> Read {
    let mut problems = Vec::new();
    let record = match serde_json::from_str::<Record>(record_line) {
        Err(e) => {
            problems.push(format!("the record is not an audit record ({e})"));
            return Read { problems, listed: Vec::new(), run: RecordRun::Unnamed, unreadable: true };
        }
        Ok(record) => record,
    };
    let get = |k: &str| record.params.get(k).cloned().unwrap_or_default();
    if record.event != "round_record"
        || get("plan_id").as_str() != Some(plan_id)
        || get("round").as_u64() != Some(u64::from(round))
    {
        problems.push("the record is not this round's record".to_string());
    }
    let run = match record.params.get("run") {
        None => RecordRun::Unnamed,
        Some(serde_json::Value::String(run)) => RecordRun::Named(run.clone()),
        Some(_) => {
            problems.push("the record's run is not a run id".to_string());
            RecordRun::Malformed
        }
    };
    let listed: Vec<(String, u64)> = get("updates")
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|u| u["node"].as_str() == Some(me))
                .map(|u| {
                    let hash = u["payload_sha256"].as_str().unwrap_or_default().to_string();
                    (hash, u["bytes"].as_u64().unwrap_or(0))
                })
                .collect()
        })
        .unwrap_or_default();
    Read { problems, listed, run, unreadable: false }
}

/// The verdict on a record read as `read`, against the runs it may be of (`whose` says, in a
/// dispute of a listed update, which runs those were).
fn conclude(record_line: &str, read: Read, runs: &[Knowledge<'_>], whose: &str) -> Verdict {
    let record_sha256 = ContentHash::of(record_line.as_bytes());
    let Read { mut problems, listed, unreadable, .. } = read;
    if unreadable {
        // Said already: the line is not a record.
    } else if runs.is_empty() {
        if !listed.is_empty() {
            problems.push(format!("the record lists an update this node never sent{whose}"));
        }
    } else {
        let misfits: Vec<String> = runs.iter().filter_map(|k| misfit(*k, &listed)).collect();
        if misfits.len() == runs.len() {
            // No run fits: every run's reason, so the dispute says what this node holds.
            problems.push(misfits.join("; or "));
        }
    }
    let reason = clip(problems.join("; "), MAX_REASON_BYTES);
    Verdict { record_sha256, agrees: problems.is_empty(), reason }
}

/// Why the record's listing of this node's updates does not fit one run's update (`None`: fits).
fn misfit(known: Knowledge<'_>, listed: &[(String, u64)]) -> Option<String> {
    let exactly = |s: &Sent<'_>| matches!(listed, [(h, b)] if h == s.payload_sha256 && *b == s.bytes);
    match known {
        Knowledge::Sent(s) if exactly(&s) => None,
        Knowledge::Sent(s) => {
            Some(format!("this node sent {} bytes with SHA-256 {}, the record lists {listed:?}", s.bytes, s.payload_sha256))
        }
        Knowledge::Leaving(s) if listed.is_empty() || exactly(&s) => None,
        Knowledge::Leaving(s) => Some(format!(
            "this node's update of {} bytes with SHA-256 {} may not have arrived, the record lists {listed:?}",
            s.bytes, s.payload_sha256
        )),
        Knowledge::NotKnown => Some(
            "this node keeps no hash of what it sent in this round (released by an earlier version of the node), so it cannot confirm the record"
                .to_string(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use sanctum_protocol::audit::GENESIS_PREV;
    use serde_json::{Value, json};

    use super::*;

    fn record(event: &str, plan: &str, round: u32, updates: Value) -> String {
        record_in(None, event, plan, round, updates)
    }

    /// A record whose `run` parameter is `run` (`None`: none, as earlier coordinators wrote it).
    fn record_in(run: Option<Value>, event: &str, plan: &str, round: u32, updates: Value) -> String {
        let mut params = BTreeMap::from([
            ("plan_id".to_string(), json!(plan)),
            ("round".to_string(), json!(round)),
            ("updates".to_string(), updates),
        ]);
        if let Some(run) = run {
            params.insert("run".to_string(), run);
        }
        Record {
            seq: 1,
            time: "t".into(),
            actor: "c".into(),
            event: event.into(),
            params,
            prev: GENESIS_PREV.into(),
            sig: "00".into(),
        }
        .line()
    }

    /// (what, record line, the runs this node holds an update of the round in, agrees, a phrase)
    type Case<'a> = (&'a str, String, Vec<(&'a str, Knowledge<'a>)>, bool, &'a str);

    const H: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const OTHER: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    #[test]
    fn a_record_is_agreed_to_only_when_it_lists_exactly_what_was_sent() {
        let mine = |h: &str, b: u64| json!({"node": "cleveland", "payload_sha256": h, "bytes": b});
        let theirs = json!({"node": "hungarian", "payload_sha256": OTHER, "bytes": 8});
        let sent = Some(Sent { payload_sha256: H, bytes: 56 });
        // (what, record line, what was sent, agrees, a phrase of the reason)
        let cases: Vec<(&str, String, Option<Sent<'_>>, bool, &str)> = vec![
            ("exactly what was sent", record("round_record", "p", 2, json!([mine(H, 56), theirs])), sent, true, ""),
            ("nothing sent, nothing listed", record("round_record", "p", 2, json!([theirs])), None, true, ""),
            ("another hash", record("round_record", "p", 2, json!([mine(OTHER, 56)])), sent, false, "the record lists"),
            ("another size", record("round_record", "p", 2, json!([mine(H, 57)])), sent, false, "sent 56 bytes"),
            ("listed twice", record("round_record", "p", 2, json!([mine(H, 56), mine(H, 56)])), sent, false, "lists"),
            ("left out", record("round_record", "p", 2, json!([theirs])), sent, false, "the record lists []"),
            ("never sent", record("round_record", "p", 2, json!([mine(H, 56)])), None, false, "never sent"),
            ("another event", record("round_closed", "p", 2, json!([mine(H, 56)])), sent, false, "not this round's"),
            ("another plan", record("round_record", "q", 2, json!([mine(H, 56)])), sent, false, "not this round's"),
            ("another round", record("round_record", "p", 3, json!([mine(H, 56)])), sent, false, "not this round's"),
            ("not a record", "{\"seq\":".to_string(), None, false, "not an audit record"),
        ];
        for (what, line, sent, agrees, phrase) in cases {
            let v = judge(&line, "p", 2, "cleveland", sent);
            assert_eq!(v.agrees, agrees, "{what}: {}", v.reason);
            assert!(v.reason.contains(phrase) && (agrees == v.reason.is_empty()), "{what}: {}", v.reason);
            assert_eq!(v.record_sha256, ContentHash::of(line.as_bytes()), "{what}: the hash of the line as received");
        }
    }

    #[test]
    fn each_run_of_a_plan_is_a_candidate_and_a_record_must_fit_one() {
        let mine = |h: &str, b: u64| json!({"node": "cleveland", "payload_sha256": h, "bytes": b});
        let theirs = json!({"node": "hungarian", "payload_sha256": OTHER, "bytes": 8});
        const THIRD: &str = "cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc";
        let run1 = ("run-1", Knowledge::Sent(Sent { payload_sha256: H, bytes: 56 }));
        let run2 = ("run-2", Knowledge::Sent(Sent { payload_sha256: OTHER, bytes: 56 }));
        let leaving = ("run-1", Knowledge::Leaving(Sent { payload_sha256: H, bytes: 56 }));
        let not_known = ("run-1", Knowledge::NotKnown);
        // Records that name no run (an earlier coordinator's): every run is a candidate.
        let line = |updates: Value| record("round_record", "p", 2, updates);
        let cases: Vec<Case<'_>> = vec![
            ("run 1's update", line(json!([mine(H, 56), theirs])), vec![run1, run2], true, ""),
            ("run 2's update", line(json!([mine(OTHER, 56)])), vec![run1, run2], true, ""),
            ("neither run's", line(json!([mine(THIRD, 56)])), vec![run1, run2], false, "; or this node sent"),
            ("left out of both", line(json!([theirs])), vec![run1, run2], false, "the record lists []"),
            ("run 1's hash, run 2's size", line(json!([mine(H, 57)])), vec![run1, run2], false, "sent 56 bytes"),
            ("leaving, listed", line(json!([mine(H, 56)])), vec![leaving], true, ""),
            ("leaving, never arrived", line(json!([theirs])), vec![leaving], true, ""),
            ("leaving, another hash", line(json!([mine(OTHER, 56)])), vec![leaving], false, "may not have arrived"),
            ("leaving, another size", line(json!([mine(H, 55)])), vec![leaving], false, "may not have arrived"),
            ("not known, listed", line(json!([mine(H, 56)])), vec![not_known], false, "cannot confirm"),
            ("not known, left out", line(json!([theirs])), vec![not_known], false, "cannot confirm"),
            ("no run, listed", line(json!([mine(H, 56)])), vec![], false, "never sent"),
            ("no run, left out", line(json!([theirs])), vec![], true, ""),
            (
                "a run fits, another round",
                record("round_record", "p", 3, json!([mine(H, 56)])),
                vec![run1],
                false,
                "not this round's",
            ),
        ];
        for (what, line, runs, agrees, phrase) in cases {
            let v = judge_runs(&line, "p", 2, "cleveland", &runs);
            assert_eq!(v.agrees, agrees, "{what}: {}", v.reason);
            assert!(v.reason.contains(phrase) && (agrees == v.reason.is_empty()), "{what}: {}", v.reason);
        }
    }

    /// A record that names its run is judged against that run's release alone; before records
    /// named their run, every row marked "the gap" below was agreed to, because the record fits
    /// the other run.
    #[test]
    fn a_record_that_names_its_run_is_judged_against_that_run_alone() {
        let mine = |h: &str, b: u64| json!({"node": "cleveland", "payload_sha256": h, "bytes": b});
        let theirs = json!({"node": "hungarian", "payload_sha256": OTHER, "bytes": 8});
        const B: &str = "cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc";
        let a_sent = ("run-a", Knowledge::Sent(Sent { payload_sha256: H, bytes: 56 }));
        let a_leaving = ("run-a", Knowledge::Leaving(Sent { payload_sha256: H, bytes: 56 }));
        let b_sent = ("run-b", Knowledge::Sent(Sent { payload_sha256: B, bytes: 48 }));
        let b_leaving = ("run-b", Knowledge::Leaving(Sent { payload_sha256: B, bytes: 48 }));
        let of = |run: Value, updates: Value| record_in(Some(run), "round_record", "p", 2, updates);
        let b = || json!("run-b");
        let cases: Vec<Case<'_>> = vec![
            ("B's record lists B's update", of(b(), json!([mine(B, 48), theirs])), vec![a_sent, b_sent], true, ""),
            (
                "B's record lists A's update (the gap)",
                of(b(), json!([mine(H, 56)])),
                vec![a_sent, b_sent],
                false,
                "this node sent 48 bytes with SHA-256 cccc",
            ),
            (
                "B's record omits B's answered update",
                of(b(), json!([theirs])),
                vec![a_sent, b_sent],
                false,
                "the record lists []",
            ),
            (
                "B's record omits it, A's unconfirmed (the gap)",
                of(b(), json!([theirs])),
                vec![a_leaving, b_sent],
                false,
                "this node sent 48 bytes",
            ),
            (
                "B's record lists A's unconfirmed one (the gap)",
                of(b(), json!([mine(H, 56)])),
                vec![a_leaving, b_sent],
                false,
                "this node sent 48 bytes",
            ),
            ("B's record omits B's unconfirmed update", of(b(), json!([theirs])), vec![a_sent, b_leaving], true, ""),
            (
                "B's record lists B's unconfirmed update",
                of(b(), json!([mine(B, 48)])),
                vec![a_sent, b_leaving],
                true,
                "",
            ),
            ("B's record, nothing released in B, omitted", of(b(), json!([theirs])), vec![a_sent], true, ""),
            (
                "B's record, nothing released in B, A's listed (the gap)",
                of(b(), json!([mine(H, 56)])),
                vec![a_sent],
                false,
                "never sent in the run the record names",
            ),
            (
                "a run this node never heard of",
                of(json!("run-z"), json!([mine(B, 48)])),
                vec![a_sent, b_sent],
                false,
                "never sent",
            ),
            (
                "a run that is not a string",
                of(json!(7), json!([mine(B, 48)])),
                vec![a_sent, b_sent],
                false,
                "the record's run is not a run id",
            ),
            ("a null run", of(Value::Null, json!([theirs])), vec![], false, "not a run id"),
            (
                "B's record of another round",
                record_in(Some(b()), "round_record", "p", 3, json!([mine(B, 48)])),
                vec![b_sent],
                false,
                "not this round's",
            ),
            // Unnamed: as before, any run that fits.
            (
                "no run named, A's update",
                record("round_record", "p", 2, json!([mine(H, 56)])),
                vec![a_sent, b_sent],
                true,
                "",
            ),
            (
                "no run named, omitted, A's unconfirmed",
                record("round_record", "p", 2, json!([theirs])),
                vec![a_leaving, b_sent],
                true,
                "",
            ),
        ];
        for (what, line, runs, agrees, phrase) in cases {
            let v = judge_runs(&line, "p", 2, "cleveland", &runs);
            assert_eq!(v.agrees, agrees, "{what}: {}", v.reason);
            assert!(v.reason.contains(phrase) && (agrees == v.reason.is_empty()), "{what}: {}", v.reason);
        }
        // The run comes from the line, and only from a string.
        assert_eq!(record_run(&of(b(), json!([]))).as_deref(), Some("run-b"));
        assert_eq!(record_run(&record("round_record", "p", 2, json!([]))), None);
        assert_eq!(record_run(&of(json!(7), json!([]))), None);
        assert_eq!(record_run("not json"), None);
    }

    #[test]
    fn a_long_reason_is_cut_on_a_character_boundary() {
        let listed: Vec<Value> =
            (0..200).map(|_| json!({"node": "zürich-é", "payload_sha256": "é".repeat(20), "bytes": 1})).collect();
        let v = judge(
            &record("round_record", "p", 1, json!(listed)),
            "p",
            1,
            "zürich-é",
            Some(Sent { payload_sha256: H, bytes: 2 }),
        );
        assert!(!v.agrees && v.reason.len() <= MAX_REASON_BYTES && v.reason.len() > MAX_REASON_BYTES - 4);
        assert_eq!(clip("aé".to_string(), 2), "a", "never inside a character");
    }

    #[test]
    fn the_statement_signed_carries_the_verdict_and_reason() {
        let v = judge("not json", "p", 1, "n", None);
        let s = v.statement("p", 1);
        assert_eq!((s.agrees, s.reason, s.record_sha256), (false, v.reason.as_str(), ContentHash::of(b"not json")));
        assert_eq!(hex(&[0, 0xab, 0x10]), "00ab10");
    }
}
