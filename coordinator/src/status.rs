//! What the lead and auditors are told about runs and nodes (`plan list | status | cancel |
//! watch`, `nodes list`, `model export`): pure functions from what the coordinator holds (the
//! runs' summaries, their kept events, the nodes it has seen) to the response messages, and the
//! resolution of the id a lead types into one run.
//!
//! No I/O and no locks: the service's handlers take a snapshot under their locks, call these, and
//! encode the result. The durable store will later be the source of the same inputs.

use std::collections::{BTreeMap, BTreeSet};

use sanctum_protocol::ids::NodeName;

use sanctum_protocol::proto::{
    ListNodesResponse, NodeInfo, NodeRun, ParticipantStatus, PlanEvent, PlanStatusResponse, PlanSummary, plan_event,
};

/// The most characters an id a lead types may have (a run id has 32, a plan id 64; run ids are
/// `[A-Za-z0-9_-]{1,128}` as the coordinator accepts them).
pub const ID_CHARS: usize = 128;

/// How many candidates an ambiguous id's message names.
const CANDIDATES_SHOWN: usize = 5;

/// What the coordinator keeps of a node it has seen since it started (bounded by the nodes the
/// CA admitted: keyed by certificate name, created only for callers that passed the node role
/// guard).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeSeen {
    /// As sent at its last `Subscribe`, bounded (`bounds::label`).
    pub version: String,
    pub device: String,
    /// Its last call (Unix ms).
    pub last_seen_unix_ms: u64,
}

/// Why an id names no single run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error(
        "no run id given: pass a run id or a plan id (or a prefix); run `sanctum-coordinator plan list` to see them"
    )]
    Empty,
    #[error(
        "an id is 1 to {ID_CHARS} characters of [A-Za-z0-9_-] (got {len} bytes that are not); run `sanctum-coordinator plan list` to see the runs"
    )]
    Malformed { len: usize },
    #[error("no run matches '{id}': run `sanctum-coordinator plan list` to see the runs since the coordinator started")]
    NotFound { id: String },
    #[error("'{id}' matches {count} runs or plans ({candidates}): give more characters of the one you mean")]
    Ambiguous { id: String, count: usize, candidates: String },
}

/// Whether `s` may be echoed as an id: 1 to [`ID_CHARS`] of `[A-Za-z0-9_-]`.
fn is_id(s: &str) -> bool {
    (1..=ID_CHARS).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The run `id` names among `plans` (every run since start, oldest first): a run id, a plan id
/// (its latest run), or a prefix that matches exactly one run id or one plan id. Hex is case-
/// insensitive; a prefix that matches both a run and a plan is ambiguous.
pub fn resolve<'a>(plans: &'a [PlanSummary], id: &str) -> Result<&'a PlanSummary, ResolveError> {
    let id = id.trim();
    if id.is_empty() {
        return Err(ResolveError::Empty);
    }
    if !is_id(id) {
        return Err(ResolveError::Malformed { len: id.len() });
    }
    let id = id.to_ascii_lowercase();
    let latest = |plan_id: &str| plans.iter().rev().find(|p| p.plan_id == plan_id);
    if let Some(run) = plans.iter().find(|p| p.run == id) {
        return Ok(run);
    }
    if let Some(run) = latest(&id) {
        return Ok(run);
    }
    let runs: Vec<&PlanSummary> = plans.iter().filter(|p| p.run.starts_with(&id)).collect();
    let plan_ids: BTreeSet<&str> =
        plans.iter().filter(|p| p.plan_id.starts_with(&id)).map(|p| p.plan_id.as_str()).collect();
    match (runs.as_slice(), plan_ids.len()) {
        ([], 0) => Err(ResolveError::NotFound { id }),
        ([run], 0) => Ok(run),
        ([], 1) => plan_ids.first().and_then(|p| latest(p)).ok_or(ResolveError::NotFound { id }),
        _ => {
            let mut shown: Vec<String> = runs
                .iter()
                .map(|r| format!("run {} of '{}'", head(&r.run, 12), r.name))
                .chain(plan_ids.iter().map(|p| {
                    let name = latest(p).map(|r| r.name.as_str()).unwrap_or_default();
                    format!("plan {} '{name}'", head(p, 12))
                }))
                .collect();
            let count = shown.len();
            if count > CANDIDATES_SHOWN {
                shown.truncate(CANDIDATES_SHOWN);
                shown.push(format!("{} more", count - CANDIDATES_SHOWN));
            }
            Err(ResolveError::Ambiguous { id, count, candidates: shown.join(", ") })
        }
    }
}

/// The first `n` characters of `s` (never cut inside a character).
pub fn head(s: &str, n: usize) -> &str {
    s.char_indices().nth(n).map_or(s, |(i, _)| &s[..i])
}

/// Participant states, as `ParticipantStatus.state` spells them.
pub mod state {
    pub const ACCEPTED: &str = "accepted";
    pub const REFUSED: &str = "refused";
    /// In the round open now, not heard from yet (fetching the model, or a node that sends no
    /// heartbeats); its update may have arrived.
    pub const IN_ROUND: &str = "in_round";
    /// In the open round, training or uploading as its heartbeats say (`round::ParticipantPhase`).
    pub const TRAINING: &str = "training";
    pub const UPLOADING: &str = "uploading";
    pub const REPORTED: &str = "reported";
    /// Dropped because the round's deadline passed before its update.
    pub const LATE: &str = "late";
    pub const DROPPED: &str = "dropped";
}

/// Failed round attempts a status carries, the latest.
pub const FAILURES_SHOWN: usize = 16;

/// A run's status from its summary and the events kept of it (`events_kept`: whether the run's
/// history is still held; when not, participants come from the round records alone).
pub fn plan_status(summary: &PlanSummary, events: &[PlanEvent], events_kept: bool) -> PlanStatusResponse {
    let last_round = summary.rounds.last().cloned();
    let closed = last_round.as_ref().map_or(0, |r| r.round);
    let mut participants: BTreeMap<String, ParticipantStatus> = BTreeMap::new();
    let mut open: Option<(u32, Vec<String>)> = None;
    let mut rejected: BTreeMap<String, String> = BTreeMap::new();
    // The latest state each participant of a round's current attempt was published in.
    let mut phases: BTreeMap<(u32, String), (String, String)> = BTreeMap::new();
    let mut out = PlanStatusResponse { events_kept, ..Default::default() };
    for ev in events {
        match &ev.kind {
            Some(plan_event::Kind::NodeDecision(d)) => {
                participants.insert(
                    d.node.clone(),
                    ParticipantStatus {
                        node: d.node.clone(),
                        state: if d.accepted { state::ACCEPTED } else { state::REFUSED }.into(),
                        reason: d.reason.clone(),
                        round: 0,
                        privacy: d.privacy,
                    },
                );
            }
            Some(plan_event::Kind::RoundOpened(r)) => {
                open = Some((r.round, r.participants.clone()));
                rejected.clear();
                // A retry of the round starts its participants afresh.
                phases.retain(|(round, _), _| *round != r.round);
            }
            Some(plan_event::Kind::ParticipantState(p)) => {
                phases.insert((p.round, p.node.clone()), (p.state.clone(), p.reason.clone()));
            }
            Some(plan_event::Kind::RoundFailed(f)) => {
                if out.round_failures.len() == FAILURES_SHOWN {
                    out.round_failures.remove(0);
                }
                out.round_failures.push(f.clone());
            }
            Some(plan_event::Kind::UpdateRejected(r)) if open.as_ref().is_some_and(|(n, _)| *n == r.round) => {
                rejected.insert(r.node.clone(), format!("update rejected: {}", r.reason));
            }
            Some(plan_event::Kind::PlanFinished(f)) => {
                out.client_epsilon = f.client_epsilon;
                out.client_delta = f.client_delta;
                out.metric_name = f.metric_name.clone();
                out.final_metrics = f.final_metrics.clone();
            }
            _ => {}
        }
    }
    fn entry<'m>(map: &'m mut BTreeMap<String, ParticipantStatus>, node: &str) -> &'m mut ParticipantStatus {
        map.entry(node.to_string()).or_insert_with(|| ParticipantStatus {
            node: node.to_string(),
            state: state::ACCEPTED.into(),
            ..Default::default()
        })
    }
    // The last closed round first, then the open one over it: a node in the open round is there.
    if let Some(r) = &last_round {
        for (nodes, s) in [(&r.reported, state::REPORTED), (&r.dropped, state::DROPPED)] {
            for n in nodes {
                let published = phases.get(&(r.round, n.clone()));
                let p = entry(&mut participants, n);
                p.state = s.into();
                p.round = r.round;
                p.reason.clear();
                // A dropped node says why: late, or dropped with the reason.
                if s == state::DROPPED
                    && let Some((st, why)) = published.filter(|(st, _)| st == state::LATE || st == state::DROPPED)
                {
                    p.state = st.clone();
                    p.reason = why.clone();
                }
            }
        }
    }
    if summary.status == "running"
        && let Some((round, nodes)) = open.filter(|(round, _)| *round > closed)
    {
        out.current_round = round;
        for n in &nodes {
            let (st, why) =
                phases.get(&(round, n.clone())).cloned().unwrap_or_else(|| (state::IN_ROUND.into(), String::new()));
            let p = entry(&mut participants, n);
            p.state = st;
            p.round = round;
            p.reason = rejected.get(n).cloned().unwrap_or(why);
        }
    }
    let mut plan = summary.clone();
    plan.rounds = last_round.iter().cloned().collect();
    out.plan = Some(plan);
    out.last_round = last_round;
    out.participants = participants.into_values().collect();
    out
}

/// The nodes a run involves: those that accepted it, and those in any of its rounds.
pub fn run_members(summary: &PlanSummary, events: &[PlanEvent]) -> BTreeSet<String> {
    let mut nodes: BTreeSet<String> =
        summary.rounds.iter().flat_map(|r| r.reported.iter().chain(&r.dropped)).cloned().collect();
    for ev in events {
        match &ev.kind {
            Some(plan_event::Kind::NodeDecision(d)) if d.accepted => {
                nodes.insert(d.node.clone());
            }
            Some(plan_event::Kind::RoundOpened(r)) => nodes.extend(r.participants.iter().cloned()),
            _ => {}
        }
    }
    nodes
}

/// Every node seen or connected, by name: connected now or not, last seen (now for a connected
/// node: its stream is open), version, device, and the runs (`runs`: each run's summary with
/// [`run_members`]) it takes part in, oldest first.
pub fn node_list(
    seen: &BTreeMap<NodeName, NodeSeen>,
    connected: &BTreeSet<NodeName>,
    runs: &[(&PlanSummary, BTreeSet<String>)],
    now_unix_ms: u64,
) -> ListNodesResponse {
    let names: BTreeSet<&NodeName> = seen.keys().chain(connected.iter()).collect();
    let nodes = names
        .into_iter()
        .map(|name| {
            let s = seen.get(name).cloned().unwrap_or_default();
            let is_connected = connected.contains(name);
            NodeInfo {
                name: name.to_string(),
                connected: is_connected,
                last_seen_unix_ms: if is_connected {
                    now_unix_ms.max(s.last_seen_unix_ms)
                } else {
                    s.last_seen_unix_ms
                },
                version: s.version,
                device: s.device,
                runs: runs
                    .iter()
                    .filter(|(_, members)| members.contains(name.as_str()))
                    .map(|(p, _)| NodeRun {
                        plan_id: p.plan_id.clone(),
                        run: p.run.clone(),
                        name: p.name.clone(),
                        status: p.status.clone(),
                    })
                    .collect(),
            }
        })
        .collect();
    ListNodesResponse { nodes }
}

#[cfg(test)]
mod tests {
    use sanctum_protocol::proto::{NodeDecision, NodeMetric, PlanFinished, RoundClosed, RoundOpened, UpdateRejected};

    use super::*;

    fn run(plan: char, run: char, name: &str, status: &str) -> PlanSummary {
        PlanSummary {
            plan_id: plan.to_string().repeat(64),
            run: run.to_string().repeat(32),
            name: name.into(),
            status: status.into(),
            rounds_planned: 3,
            ..Default::default()
        }
    }

    fn ev(kind: plan_event::Kind) -> PlanEvent {
        PlanEvent { kind: Some(kind) }
    }

    fn decision(node: &str, accepted: bool, reason: &str) -> PlanEvent {
        ev(plan_event::Kind::NodeDecision(NodeDecision {
            node: node.into(),
            accepted,
            reason: reason.into(),
            privacy: None,
        }))
    }

    fn opened(round: u32, nodes: &[&str]) -> PlanEvent {
        ev(plan_event::Kind::RoundOpened(RoundOpened {
            round,
            participants: nodes.iter().map(|s| s.to_string()).collect(),
            model_sha256: String::new(),
        }))
    }

    fn closed(round: u32, reported: &[&str], dropped: &[&str]) -> RoundClosed {
        RoundClosed {
            round,
            reported: reported.iter().map(|s| s.to_string()).collect(),
            dropped: dropped.iter().map(|s| s.to_string()).collect(),
            metrics: vec![NodeMetric { node: reported[0].into(), value: 0.75, samples: 30, name: "accuracy".into() }],
            new_model_sha256: "c".repeat(64),
        }
    }

    #[test]
    fn an_id_is_a_run_a_plan_or_a_unique_prefix_of_either() {
        // Plan a ran twice (runs 1 and 2), plan b once (run 3); a run id starting like plan b's id.
        let mut plans = vec![run('a', '1', "heart", "failed"), run('a', '2', "heart", "running")];
        plans.push(PlanSummary { run: format!("b{}", "3".repeat(31)), ..run('b', '3', "other", "succeeded") });
        let got = |id: &str| resolve(&plans, id).map(|p| p.run.clone());
        assert_eq!(got(&"1".repeat(32)), Ok("1".repeat(32)), "a run id is that run");
        assert_eq!(got(&"a".repeat(64)), Ok("2".repeat(32)), "a plan id is its latest run");
        assert_eq!(got("aaaa"), Ok("2".repeat(32)), "a plan prefix is its latest run");
        assert_eq!(got("AAAA"), Ok("2".repeat(32)), "hex is case-insensitive");
        assert_eq!(got("11"), Ok("1".repeat(32)), "a run prefix is that run");
        assert_eq!(got(" 22 "), Ok("2".repeat(32)));
        // "b" starts plan b's id and run 3's id: two candidates.
        let e = resolve(&plans, "b").unwrap_err();
        assert!(matches!(&e, ResolveError::Ambiguous { count: 2, .. }), "{e:?}");
        assert!(e.to_string().contains("'other'") && e.to_string().contains("more characters"), "{e}");
        let e = resolve(&plans, "abc").unwrap_err().to_string();
        assert_eq!(
            e,
            "no run matches 'abc': run `sanctum-coordinator plan list` to see the runs since the coordinator started"
        );
        assert_eq!(resolve(&plans, "  "), Err(ResolveError::Empty));
        // What is not an id is never echoed.
        let e = resolve(&plans, "a\nforged log line").unwrap_err();
        assert_eq!(e, ResolveError::Malformed { len: 17 });
        assert!(!e.to_string().contains("forged"));
        assert!(matches!(resolve(&plans, &"a".repeat(129)), Err(ResolveError::Malformed { len: 129 })));
        assert!(matches!(resolve(&[], "a"), Err(ResolveError::NotFound { .. })));
    }

    #[test]
    fn many_candidates_are_named_up_to_five() {
        let plans: Vec<PlanSummary> = (0..8)
            .map(|i| PlanSummary { run: format!("f{i}{}", "0".repeat(30)), ..run('0', '0', "p", "failed") })
            .collect();
        let e = resolve(&plans, "f").unwrap_err().to_string();
        assert!(e.contains("matches 8 runs") && e.contains("3 more"), "{e}");
    }

    #[test]
    fn a_running_round_shows_who_is_in_it_and_the_last_rounds_outcome() {
        let mut summary = run('a', '1', "heart", "running");
        summary.rounds = vec![closed(1, &["a"], &["b"]), closed(2, &["a", "b"], &[])];
        summary.rounds_completed = 2;
        let events = vec![
            decision("a", true, ""),
            decision("b", true, ""),
            decision("c", false, "the plan's ε exceeds this hospital's cap"),
            opened(1, &["a", "b"]),
            opened(2, &["a", "b"]),
            opened(3, &["a"]),
            ev(plan_event::Kind::UpdateRejected(UpdateRejected { round: 3, node: "a".into(), reason: "bad".into() })),
        ];
        let s = plan_status(&summary, &events, true);
        assert_eq!(s.current_round, 3);
        let states: Vec<(&str, &str, u32, &str)> =
            s.participants.iter().map(|p| (p.node.as_str(), p.state.as_str(), p.round, p.reason.as_str())).collect();
        assert_eq!(
            states,
            [
                ("a", "in_round", 3, "update rejected: bad"),
                ("b", "reported", 2, ""),
                ("c", "refused", 0, "the plan's ε exceeds this hospital's cap"),
            ]
        );
        assert_eq!(s.last_round.as_ref().map(|r| r.round), Some(2));
        let plan = s.plan.unwrap_or_default();
        assert_eq!(plan.rounds.len(), 1, "only the last round travels");
        assert_eq!((plan.rounds_completed, plan.rounds_planned), (2, 3));
        assert!(s.events_kept);
    }

    fn participant(round: u32, node: &str, state: &str, reason: &str) -> PlanEvent {
        ev(plan_event::Kind::ParticipantState(sanctum_protocol::proto::ParticipantState {
            round,
            node: node.into(),
            state: state.into(),
            reason: reason.into(),
        }))
    }

    #[test]
    fn participants_show_training_uploading_late_and_dropped_and_failed_attempts_are_listed() {
        let mut summary = run('a', '1', "heart", "running");
        summary.rounds = vec![closed(1, &["a"], &["b", "c"])];
        let failed = sanctum_protocol::proto::RoundFailed {
            round: 2,
            attempt: 1,
            reason: "round 2 failed: 2 node(s) reported, min_nodes is 3; dropped: c (no heartbeat for 5 s)".into(),
            retrying: true,
        };
        let events = vec![
            decision("a", true, ""),
            decision("b", true, ""),
            decision("c", true, ""),
            decision("d", true, ""),
            opened(1, &["a", "b", "c"]),
            participant(1, "b", "late", "the round's deadline passed before its update"),
            participant(1, "c", "dropped", "no heartbeat for 5 s"),
            opened(2, &["a", "b", "c", "d"]),
            participant(2, "c", "dropped", "no heartbeat for 5 s"),
            ev(plan_event::Kind::RoundFailed(failed.clone())),
            // The retry: c's drop in the failed attempt is forgotten.
            opened(2, &["a", "b", "c", "d"]),
            participant(2, "a", "training", ""),
            participant(2, "b", "training", ""),
            participant(2, "b", "uploading", ""),
        ];
        let s = plan_status(&summary, &events, true);
        let states: Vec<(&str, &str, u32, &str)> =
            s.participants.iter().map(|p| (p.node.as_str(), p.state.as_str(), p.round, p.reason.as_str())).collect();
        assert_eq!(
            states,
            [("a", "training", 2, ""), ("b", "uploading", 2, ""), ("c", "in_round", 2, ""), ("d", "in_round", 2, "")]
        );
        assert_eq!(s.round_failures, [failed]);
        // Once round 2 is over, the last closed round tells a late node from a dropped one.
        let s = plan_status(&summary, &events[..7], true);
        let states: Vec<(&str, &str, &str)> =
            s.participants.iter().map(|p| (p.node.as_str(), p.state.as_str(), p.reason.as_str())).collect();
        assert_eq!(
            states,
            [
                ("a", "reported", ""),
                ("b", "late", "the round's deadline passed before its update"),
                ("c", "dropped", "no heartbeat for 5 s"),
                ("d", "accepted", ""),
            ]
        );
    }

    #[test]
    fn a_finished_run_has_no_open_round_and_shows_its_end() {
        let mut summary = run('a', '1', "heart", "failed");
        summary.reason = "cancelled by lead".into();
        summary.rounds = vec![closed(1, &["a"], &["b"])];
        let finished = PlanFinished {
            success: false,
            reason: "cancelled by lead".into(),
            client_epsilon: 1.5,
            client_delta: 1e-5,
            metric_name: "accuracy".into(),
            ..Default::default()
        };
        let events = vec![
            decision("a", true, ""),
            opened(1, &["a", "b"]),
            opened(2, &["a"]),
            ev(plan_event::Kind::PlanFinished(finished)),
        ];
        let s = plan_status(&summary, &events, true);
        assert_eq!(s.current_round, 0, "round 2 was open when the run ended: it is not open now");
        let states: Vec<(&str, &str)> = s.participants.iter().map(|p| (p.node.as_str(), p.state.as_str())).collect();
        assert_eq!(states, [("a", "reported"), ("b", "dropped")]);
        assert_eq!((s.client_epsilon, s.client_delta), (1.5, 1e-5));
        assert_eq!(s.plan.map(|p| p.reason), Some("cancelled by lead".into()));
    }

    #[test]
    fn without_kept_events_participants_come_from_the_rounds() {
        let mut summary = run('a', '1', "heart", "succeeded");
        summary.rounds = vec![closed(1, &["a", "b"], &[])];
        let s = plan_status(&summary, &[], false);
        assert!(!s.events_kept);
        assert_eq!(s.participants.len(), 2);
        assert!(s.participants.iter().all(|p| p.state == "reported" && p.round == 1));
    }

    #[test]
    fn nodes_are_listed_with_what_was_seen_and_their_runs() {
        let mut r1 = run('a', '1', "heart", "succeeded");
        r1.rounds = vec![closed(1, &["a"], &["b"])];
        let r2 = run('b', '2', "other", "running");
        let members1 = run_members(&r1, &[decision("a", true, ""), decision("c", false, "no")]);
        assert_eq!(members1, ["a", "b"].map(String::from).into_iter().collect(), "a refusal is no part in a run");
        let members2 = run_members(&r2, &[decision("a", true, ""), opened(1, &["a", "c"])]);
        let seen: BTreeMap<NodeName, NodeSeen> = [
            ("a", NodeSeen { version: "0.1.0".into(), device: "cpu".into(), last_seen_unix_ms: 100 }),
            ("b", NodeSeen { version: "0.1.0".into(), device: "cuda:0".into(), last_seen_unix_ms: 200 }),
        ]
        .into_iter()
        .map(|(k, v)| (crate::test_ids::node(k), v))
        .collect();
        // "c" connected but has no seen entry yet (a race at start-up): listed all the same.
        let connected: BTreeSet<NodeName> = crate::test_ids::nodes(&["a", "c"]).into_iter().collect();
        let list = node_list(&seen, &connected, &[(&r1, members1), (&r2, members2)], 1000);
        let rows: Vec<(&str, bool, u64, &str, Vec<&str>)> = list
            .nodes
            .iter()
            .map(|n| {
                (
                    n.name.as_str(),
                    n.connected,
                    n.last_seen_unix_ms,
                    n.device.as_str(),
                    n.runs.iter().map(|r| r.name.as_str()).collect(),
                )
            })
            .collect();
        assert_eq!(
            rows,
            [
                ("a", true, 1000, "cpu", vec!["heart", "other"]),
                ("b", false, 200, "cuda:0", vec!["heart"]),
                ("c", true, 1000, "", vec!["other"]),
            ]
        );
    }
}
