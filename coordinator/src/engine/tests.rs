//! The engine driven by hand: inputs in, effects out, no tokio, no files, time as a number.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use sanctum_protocol::plan::Plan;
use sanctum_protocol::proto::{self, directive};

use super::*;
use crate::aggregate::FiniteValues;
use crate::test_ids as ids;

fn plan(name: &str, rounds: u32, min_nodes: usize) -> Plan {
    plan_with_strategy(name, rounds, min_nodes, "kind = \"fedavg\"")
}

/// A plan whose `[strategy]` section is `strategy`.
fn plan_with_strategy(name: &str, rounds: u32, min_nodes: usize, strategy: &str) -> Plan {
    Plan::parse(&format!(
        r#"
name = "{name}"
rounds = {rounds}
min_nodes = {min_nodes}
round_deadline_secs = 30
recruit_deadline_secs = 10
[model]
kind = "logistic_regression"
inputs = 3
[data]
schema = "heart_disease"
schema_sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
[local]
steps = 1
batch_size = 4
learning_rate = 0.01
[strategy]
{strategy}
"#
    ))
    .unwrap()
}

fn engine() -> Engine {
    Engine::new(Instant::now(), 1_000_000, Duration::from_secs(5))
}

/// Starts `plan` as run `run` at `now`.
fn start(e: &mut Engine, plan: Plan, run: &str, now: Millis) -> (PlanId, Vec<Effect>) {
    let prepared = e.prepare(plan, &[]).unwrap();
    let plan_id = prepared.plan_id.clone();
    let fx = e
        .step(
            now,
            Input::Start {
                prepared: Box::new(prepared),
                run_id: ids::run(run),
                run_number: 1,
                actor: "lead-fp".into(),
            },
        )
        .unwrap();
    (plan_id, fx)
}

fn accept(plan_id: &str, run: &str) -> PlanResponse {
    PlanResponse { plan_id: plan_id.into(), run: ids::run(run).into_string(), accept: true, ..Default::default() }
}

/// The directives sent, by node, in order.
fn sent(fx: &[Effect]) -> BTreeMap<String, Vec<&directive::Kind>> {
    let mut m: BTreeMap<String, Vec<&directive::Kind>> = BTreeMap::new();
    for f in fx {
        if let Effect::Send { node, kind } = f {
            m.entry(node.to_string()).or_default().push(kind);
        }
    }
    m
}

fn start_round_of(fx: &[Effect]) -> Option<proto::StartRound> {
    fx.iter().find_map(|f| match f {
        Effect::Send { kind: directive::Kind::StartRound(s), .. } => Some(s.clone()),
        _ => None,
    })
}

fn update(plan_id: &str, s: &proto::StartRound, value: f32) -> Box<Update> {
    let values = vec![value; 4];
    Box::new(Update {
        round: s.round,
        attempt: 1,
        plan_id: PlanId::parse(plan_id).unwrap(),
        base_model: s.model_sha256.clone(),
        sample_count: 10,
        metrics: vec![],
        masked: false,
        payload_sha256: "00".repeat(32),
        bytes: 16,
        payload: Payload::Values(FiniteValues::new(values).expect("finite test values")),
    })
}

fn events(fx: &[Effect]) -> Vec<&str> {
    fx.iter()
        .filter_map(|f| match f {
            Effect::Audit { event, .. } | Effect::AuditMember { event, .. } => Some(event.name()),
            Effect::RoundRecord { record, .. } => Some(record.name()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_whole_run_is_inputs_in_and_effects_out() {
    let mut e = engine();
    for n in ["a", "b"] {
        e.step(0, Input::Connected { node: ids::node(n) }).unwrap();
    }
    let (plan_id, fx) = start(&mut e, plan("p", 2, 2), "r1", 0);
    // The initial model is stored before the plan is offered.
    assert!(matches!(fx.first(), Some(Effect::StoreModel { .. })));
    assert_eq!(events(&fx), ["plan_submitted"]);
    let offers = sent(&fx);
    assert_eq!(offers.keys().collect::<Vec<_>>(), ["a", "b"]);
    assert!(matches!(offers["a"][..], [directive::Kind::OfferPlan(o)] if o.run == ids::run("r1")));

    assert!(e.step(10, Input::Decision { node: ids::node("a"), response: accept(&plan_id, "r1") }).is_ok());
    let fx = e.step(20, Input::Decision { node: ids::node("b"), response: accept(&plan_id, "r1") }).unwrap();
    let s = start_round_of(&fx).expect("round 1 opens when both accepted");
    assert_eq!(s.round, 1);
    // Deadline = the engine's epoch in Unix ms + now + 30 s.
    assert_eq!(s.deadline_unix_ms, 1_000_000 + 20 + 30_000);
    assert!(fx.iter().any(|f| matches!(f, Effect::OpenUploads(u) if u.round == 1 && u.participants.len() == 2)));

    e.step(30, Input::Update { node: ids::node("a"), update: update(&plan_id, &s, 1.0) }).unwrap();
    // A second update from the same node is refused and changes nothing.
    let dup = e.step(31, Input::Update { node: ids::node("a"), update: update(&plan_id, &s, 9.0) });
    assert!(matches!(dup, Err(Refused::Round(crate::round::Rejection::Duplicate(_)))), "{dup:?}");
    let fx = e.step(40, Input::Update { node: ids::node("b"), update: update(&plan_id, &s, 3.0) }).unwrap();
    // The round closes: the new model is stored before round 2 names it.
    let stored = fx.iter().position(|f| matches!(f, Effect::StoreModel { .. })).unwrap();
    let record = fx.iter().position(|f| matches!(f, Effect::RoundRecord { round: 1, .. })).unwrap();
    let s2 = start_round_of(&fx).expect("round 2 opens");
    let opened =
        fx.iter().position(|f| matches!(f, Effect::Send { kind: directive::Kind::StartRound(_), .. })).unwrap();
    assert!(stored < record && record < opened);
    assert_eq!(s2.round, 2);
    assert_ne!(s2.model_sha256, s.model_sha256);

    e.step(50, Input::Update { node: ids::node("a"), update: update(&plan_id, &s2, 1.0) }).unwrap();
    let fx = e.step(60, Input::Update { node: ids::node("b"), update: update(&plan_id, &s2, 1.0) }).unwrap();
    let evaluate = fx.iter().find_map(|f| match f {
        Effect::Send { kind: directive::Kind::Evaluate(ev), .. } => Some(ev.clone()),
        _ => None,
    });
    let ev = evaluate.expect("the final model is evaluated");
    for n in ["a", "b"] {
        let report = proto::EvaluationReport {
            plan_id: plan_id.to_string(),
            model_sha256: ev.model_sha256.clone(),
            metrics: vec![proto::Metric { name: "accuracy".into(), value: 0.8, samples: 5 }],
        };
        let fx = e.step(70, Input::Evaluation { node: ids::node(n), report }).unwrap();
        if n == "b" {
            let Some(Effect::Finish { export, finished, notify, .. }) =
                fx.iter().find(|f| matches!(f, Effect::Finish { .. }))
            else {
                panic!("the run finishes: {fx:?}");
            };
            assert!(finished.success, "{}", finished.reason);
            assert_eq!(finished.rounds_completed, 2);
            assert_eq!(finished.final_metrics.len(), 2);
            assert_eq!(notify, &["a".to_string(), "b".to_string()]);
            let job = export.as_ref().expect("a successful run is exported");
            assert_eq!(job.manifest["lineage"].as_array().map(Vec::len), Some(3), "initial model and two rounds");
        }
    }
    assert!(e.is_idle(), "the finished run left the engine");
}

#[test]
fn a_late_node_is_dropped_at_the_deadline_in_logical_time_and_the_round_goes_on() {
    let mut e = engine();
    for n in ["a", "b", "c"] {
        e.step(0, Input::Connected { node: ids::node(n) }).unwrap();
    }
    // The run starts at 5 s on the engine's clock: its deadlines count from there.
    let (plan_id, _) = start(&mut e, plan("p", 2, 2), "r1", 5_000);
    let mut fx = Vec::new();
    for n in ["a", "b", "c"] {
        fx = e.step(5_000, Input::Decision { node: ids::node(n), response: accept(&plan_id, "r1") }).unwrap();
    }
    let s = start_round_of(&fx).unwrap();
    e.step(6_000, Input::Update { node: ids::node("a"), update: update(&plan_id, &s, 1.0) }).unwrap();
    e.step(6_000, Input::Update { node: ids::node("b"), update: update(&plan_id, &s, 1.0) }).unwrap();
    assert!(e.step(34_999, Input::Tick).unwrap().iter().all(|f| !matches!(f, Effect::RoundRecord { .. })));
    let fx = e.step(35_000, Input::Tick).unwrap();
    let Some(Effect::RoundRecord { record, .. }) = fx.iter().find(|f| matches!(f, Effect::RoundRecord { .. })) else {
        panic!("the round closes at its deadline: {fx:?}");
    };
    let params = record.to_parts().unwrap().1;
    assert_eq!(params["dropped"], serde_json::json!(["c"]));
    // The record names its run (the plan's other runs record the same round numbers).
    assert_eq!(params["run"], serde_json::json!(ids::run("r1").to_string()));
    // The late node takes part in the next round.
    let s2 = start_round_of(&fx).unwrap();
    assert_eq!(s2.round, 2);
    let to: Vec<String> = sent(&fx)
        .into_iter()
        .filter(|(_, k)| k.iter().any(|k| matches!(k, directive::Kind::StartRound(_))))
        .map(|(n, _)| n)
        .collect();
    assert_eq!(to, ["a", "b", "c"], "round 2 goes to a, b and c");
    let late = e.step(35_001, Input::Update { node: ids::node("c"), update: update(&plan_id, &s, 1.0) });
    assert!(late.is_err(), "round 1's update from c is refused once round 2 is open");
}

#[test]
fn two_plans_run_at_once_on_the_same_nodes_each_with_its_own_rounds() {
    let mut e = engine();
    for n in ["a", "b"] {
        e.step(0, Input::Connected { node: ids::node(n) }).unwrap();
    }
    let (p1, _) = start(&mut e, plan("one", 1, 2), "r1", 0);
    let (p2, _) = start(&mut e, plan("two", 1, 2), "r2", 0);
    assert_ne!(p1, p2);
    // The same plan cannot have two runs going on.
    let again = e.prepare(plan("one", 1, 2), &[]);
    assert!(matches!(again, Err(SubmitRefused::AlreadyRunning { ref run, .. }) if *run == ids::run("r1")), "{again:?}");
    let mut s1 = None;
    let mut s2 = None;
    for n in ["a", "b"] {
        s1 = start_round_of(&e.step(1, Input::Decision { node: ids::node(n), response: accept(&p1, "r1") }).unwrap())
            .or(s1);
        s2 = start_round_of(&e.step(1, Input::Decision { node: ids::node(n), response: accept(&p2, "r2") }).unwrap())
            .or(s2);
    }
    let (s1, s2) = (s1.unwrap(), s2.unwrap());
    assert_eq!((s1.plan_id.as_str(), s2.plan_id.as_str()), (p1.as_str(), p2.as_str()));
    // An update goes to its own plan's round; one for plan two with plan one's model is refused.
    e.step(2, Input::Update { node: ids::node("a"), update: update(&p1, &s1, 1.0) }).unwrap();
    let mut crossed = update(&p2, &s2, 1.0);
    crossed.base_model = s1.model_sha256.clone();
    if s1.model_sha256 != s2.model_sha256 {
        assert_eq!(
            e.step(2, Input::Update { node: ids::node("a"), update: crossed }).err(),
            Some(Refused::OtherPlanOrModel)
        );
    }
    e.step(2, Input::Update { node: ids::node("a"), update: update(&p2, &s2, 1.0) }).unwrap();
    let fx = e.step(3, Input::Update { node: ids::node("b"), update: update(&p1, &s1, 1.0) }).unwrap();
    assert!(fx.iter().any(|f| matches!(f, Effect::RoundRecord { plan_id, .. } if *plan_id == p1)));
    assert!(fx.iter().all(|f| !matches!(f, Effect::RoundRecord { plan_id, .. } if *plan_id == p2)));
    assert_eq!(e.running().count(), 2);
}

#[test]
fn a_cancel_ends_the_run_for_every_connected_node_and_a_second_is_refused() {
    let mut e = engine();
    e.step(0, Input::Connected { node: ids::node("a") }).unwrap();
    let (plan_id, _) = start(&mut e, plan("p", 3, 1), "r1", 0);
    e.step(1, Input::Decision { node: ids::node("a"), response: accept(&plan_id, "r1") }).unwrap();
    let fx = e.step(2, Input::Cancel { run_id: ids::run("r1"), actor: "lead-fp".into(), by: "lead".into() }).unwrap();
    assert_eq!(events(&fx), ["plan_cancelled"]);
    let Some(Effect::Finish { finished, notify, export, .. }) = fx.iter().find(|f| matches!(f, Effect::Finish { .. }))
    else {
        panic!("{fx:?}");
    };
    assert!(!finished.success);
    assert_eq!(finished.reason, "cancelled by lead");
    assert_eq!(notify, &["a".to_string()]);
    assert!(export.is_none(), "a cancelled run is not exported");
    assert!(fx.iter().any(|f| matches!(f, Effect::CloseUploads { .. })));
    let again = e.step(3, Input::Cancel { run_id: ids::run("r1"), actor: "lead-fp".into(), by: "lead".into() });
    assert_eq!(again.err(), Some(Refused::RunNotRunning(ids::run("r1").to_string())));
}

#[test]
fn a_model_that_cannot_be_stored_fails_its_plan_with_the_reason() {
    let mut e = engine();
    e.step(0, Input::Connected { node: ids::node("a") }).unwrap();
    let (plan_id, _) = start(&mut e, plan("p", 3, 1), "r1", 0);
    let fx = e.step(1, Input::StorageFailed { plan_id, reason: "disk full".into() }).unwrap();
    assert!(fx.iter().any(|f| matches!(f, Effect::Finish { finished, .. } if finished.reason == "disk full")));
    assert!(e.is_idle());
}

#[test]
fn inputs_for_no_run_are_refused_with_the_reason() {
    let mut e = engine();
    let s = proto::StartRound { round: 1, model_sha256: "00".repeat(32), ..Default::default() };
    let r = e.step(0, Input::Update { node: ids::node("a"), update: update(&"ab".repeat(32), &s, 1.0) });
    assert_eq!(r.err(), Some(Refused::NoPlanRunning));
    // A decision for a run that is not running is discarded quietly.
    assert!(e.step(0, Input::Decision { node: ids::node("a"), response: accept("x", "y") }).unwrap().is_empty());
}

/// `plan` with `retries` and a short deadline for the straggler tests.
fn plan_with_retries(rounds: u32, min_nodes: usize, retries: u32) -> Plan {
    let mut p = plan("p", rounds, min_nodes);
    p.retries = retries;
    p
}

fn published(fx: &[Effect]) -> Vec<&proto::plan_event::Kind> {
    fx.iter()
        .filter_map(|f| match f {
            Effect::Publish { kind, .. } => Some(kind),
            _ => None,
        })
        .collect()
}

#[test]
fn a_round_below_min_nodes_is_retried_on_the_same_model_and_the_same_bytes_are_admitted_again() {
    let mut e = engine();
    for n in ["a", "b", "c"] {
        e.step(0, Input::Connected { node: ids::node(n) }).unwrap();
    }
    let (plan_id, _) = start(&mut e, plan_with_retries(2, 3, 1), "r1", 0);
    let mut fx = Vec::new();
    for n in ["a", "b", "c"] {
        fx = e.step(0, Input::Decision { node: ids::node(n), response: accept(&plan_id, "r1") }).unwrap();
    }
    let s1 = start_round_of(&fx).unwrap();
    assert_eq!(s1.heartbeat_interval_ms, 10_000, "a third of the default 30 s timeout");
    e.step(1_000, Input::Update { node: ids::node("a"), update: update(&plan_id, &s1, 1.0) }).unwrap();
    e.step(1_000, Input::Update { node: ids::node("b"), update: update(&plan_id, &s1, 3.0) }).unwrap();
    // c stalls past the deadline: the attempt fails, is audited and published, and round 1 opens
    // again at once for a, b and c, on the same global model.
    let fx = e.step(30_000, Input::Tick).unwrap();
    assert_eq!(events(&fx), ["round_failed", "round_opened"]);
    let Some(Effect::Audit { event, .. }) =
        fx.iter().find(|f| matches!(f, Effect::Audit { event, .. } if event.name() == "round_failed"))
    else {
        panic!("{fx:?}");
    };
    let params = event.to_parts().unwrap().1;
    assert_eq!(params["attempt"], serde_json::json!(1));
    assert_eq!(params["retrying"], serde_json::json!(true));
    let reason = params["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("2 node(s) reported, min_nodes is 3; dropped: c (late"), "{reason}");
    assert!(
        published(&fx).iter().any(|k| matches!(k,
        proto::plan_event::Kind::RoundFailed(f) if f.round == 1 && f.attempt == 1 && f.retrying && f.reason == reason))
    );
    assert!(
        fx.iter().all(|f| !matches!(f, Effect::RoundRecord { .. } | Effect::StoreModel { .. })),
        "nothing aggregated"
    );
    let s1b = start_round_of(&fx).expect("the retry opens");
    assert_eq!((s1b.round, &s1b.model_sha256), (1, &s1.model_sha256), "same round, same model");
    assert_eq!(sent(&fx).len(), 3, "a, b and c are asked again");
    // An upload of the failed attempt that completes as the retry opens is not admitted into it.
    let stale = e.step(30_050, Input::Update { node: ids::node("c"), update: update(&plan_id, &s1, 5.0) });
    assert!(matches!(stale, Err(Refused::FailedAttempt { round: 1, sent: 1, open: 2 })), "{stale:?}");
    // A node that already released round 1 sends the same bytes again (node/src/rounds.rs:
    // Resend, or ChargeAndSend without DP, nothing new charged): admitted in the new attempt.
    let retry = |value| Box::new(Update { attempt: 2, ..*update(&plan_id, &s1, value) });
    e.step(30_100, Input::Update { node: ids::node("a"), update: retry(1.0) }).unwrap();
    e.step(30_200, Input::Update { node: ids::node("b"), update: retry(3.0) }).unwrap();
    let fx = e.step(30_300, Input::Update { node: ids::node("c"), update: retry(5.0) }).unwrap();
    let Some(Effect::RoundRecord { record, .. }) = fx.iter().find(|f| matches!(f, Effect::RoundRecord { .. })) else {
        panic!("the retry completes: {fx:?}");
    };
    let params = record.to_parts().unwrap().1;
    assert_eq!(params["reported"], serde_json::json!(["a", "b", "c"]));
    assert_eq!(params["updates"].as_array().map(Vec::len), Some(3), "only the retry's updates are in the record");
    assert_eq!(start_round_of(&fx).map(|s| s.round), Some(2));
}

#[test]
fn without_retries_the_same_failure_ends_the_plan_with_the_reason() {
    let mut e = engine();
    for n in ["a", "b", "c"] {
        e.step(0, Input::Connected { node: ids::node(n) }).unwrap();
    }
    let (plan_id, _) = start(&mut e, plan_with_retries(2, 3, 0), "r1", 0);
    let mut fx = Vec::new();
    for n in ["a", "b", "c"] {
        fx = e.step(0, Input::Decision { node: ids::node(n), response: accept(&plan_id, "r1") }).unwrap();
    }
    let s1 = start_round_of(&fx).unwrap();
    e.step(1_000, Input::Update { node: ids::node("a"), update: update(&plan_id, &s1, 1.0) }).unwrap();
    e.step(1_000, Input::Update { node: ids::node("b"), update: update(&plan_id, &s1, 1.0) }).unwrap();
    let fx = e.step(30_000, Input::Tick).unwrap();
    assert_eq!(events(&fx), ["round_failed"]);
    let Some(Effect::Finish { finished, .. }) = fx.iter().find(|f| matches!(f, Effect::Finish { .. })) else {
        panic!("{fx:?}");
    };
    assert!(!finished.success);
    assert!(
        finished.reason.starts_with("round 1 failed: 2 node(s) reported, min_nodes is 3; dropped: c (late"),
        "{}",
        finished.reason
    );
    assert!(e.is_idle());
}

#[test]
fn a_participant_whose_heartbeats_stop_is_dropped_before_the_deadline_and_rejoins_the_next_round() {
    let mut e =
        Engine::new(Instant::now(), 1_000_000, Duration::from_secs(5)).with_heartbeat_timeout(Duration::from_secs(6));
    for n in ["a", "b", "c"] {
        e.step(0, Input::Connected { node: ids::node(n) }).unwrap();
    }
    let (plan_id, _) = start(&mut e, plan("p", 2, 2), "r1", 0);
    let mut fx = Vec::new();
    for n in ["a", "b", "c"] {
        fx = e.step(0, Input::Decision { node: ids::node(n), response: accept(&plan_id, "r1") }).unwrap();
    }
    let s1 = start_round_of(&fx).unwrap();
    assert_eq!(s1.heartbeat_interval_ms, 2_000);
    let hb = |node: &str, activity| Input::Heartbeat {
        node: ids::node(node),
        plan_id: plan_id.clone(),
        run: ids::run("r1"),
        round: 1,
        activity,
    };
    use crate::round::Activity;
    let fx = e.step(1_000, hb("c", Activity::Training)).unwrap();
    assert!(events(&fx).is_empty(), "heartbeats are never audited");
    assert!(matches!(published(&fx)[..], [proto::plan_event::Kind::ParticipantState(p)] if p.state == "training"));
    assert!(matches!(
        e.step(1_500, hb("c", Activity::Training)),
        Err(Refused::Heartbeat(crate::round::HeartbeatRefused::TooFrequent))
    ));
    let wrong_run = Input::Heartbeat {
        node: ids::node("c"),
        plan_id: plan_id.clone(),
        run: ids::run("r9"),
        round: 1,
        activity: Activity::Training,
    };
    assert!(matches!(e.step(1_600, wrong_run), Err(Refused::RunNotRunning(_))));
    e.step(2_000, Input::Update { node: ids::node("a"), update: update(&plan_id, &s1, 1.0) }).unwrap();
    e.step(2_000, Input::Update { node: ids::node("b"), update: update(&plan_id, &s1, 1.0) }).unwrap();
    // c stalls (connected, silent): dropped 6 s after its last heartbeat, long before the 30 s
    // deadline, and the round closes with a and b.
    assert!(e.step(6_999, Input::Tick).unwrap().iter().all(|f| !matches!(f, Effect::RoundRecord { .. })));
    let fx = e.step(7_000, Input::Tick).unwrap();
    assert!(published(&fx).iter().any(|k| matches!(k,
        proto::plan_event::Kind::ParticipantState(p) if p.node == "c" && p.state == "dropped" && p.reason == "no heartbeat for 6 s")));
    let Some(Effect::RoundRecord { record, .. }) = fx.iter().find(|f| matches!(f, Effect::RoundRecord { .. })) else {
        panic!("{fx:?}");
    };
    let params = record.to_parts().unwrap().1;
    assert_eq!(params["dropped"], serde_json::json!(["c"]));
    let s2 = start_round_of(&fx).unwrap();
    assert_eq!(s2.round, 2);
    assert!(sent(&fx).get("c").is_some_and(|k| k.iter().any(|k| matches!(k, directive::Kind::StartRound(_)))));
    // c takes part in round 2.
    e.step(8_000, Input::Update { node: ids::node("c"), update: update(&plan_id, &s2, 1.0) }).unwrap();
}

/// The checkpoint and stored models among `fx`: the last checkpoint, and every model by hash.
fn durable(fx: &[Effect]) -> (Option<checkpoint::RunCheckpoint>, BTreeMap<String, Vec<u8>>) {
    let mut cp = None;
    let mut models = BTreeMap::new();
    for f in fx {
        match f {
            Effect::Checkpoint { state, .. } => cp = Some((**state).clone()),
            Effect::StoreModel { hash, bytes, .. } => {
                models.insert(hash.to_hex(), bytes.to_vec());
            }
            _ => {}
        }
    }
    (cp, models)
}

#[test]
fn a_run_stopped_during_round_1_resumes_with_the_nodes_that_had_accepted() {
    let mut e = engine();
    for n in ["a", "b", "c"] {
        e.step(0, Input::Connected { node: ids::node(n) }).unwrap();
    }
    let (plan_id, start_fx) = start(&mut e, plan("p", 2, 2), "r1", 0);
    let (_, mut models) = durable(&start_fx);
    e.step(1, Input::Decision { node: ids::node("a"), response: accept(&plan_id, "r1") }).unwrap();
    e.step(1, Input::Decision { node: ids::node("b"), response: accept(&plan_id, "r1") }).unwrap();
    let refuse = PlanResponse { accept: false, reason: "no".into(), ..accept(&plan_id, "r1") };
    let fx = e.step(2, Input::Decision { node: ids::node("c"), response: refuse }).unwrap();
    let (cp, more) = durable(&fx);
    models.extend(more);
    let cp = cp.expect("recruiting's end is checkpointed when round 1 opens");
    assert_eq!(cp.rounds_completed, 0);
    assert_eq!(cp.accepted.iter().map(NodeName::as_str).collect::<Vec<_>>(), ["a", "b"]);

    // A new process: nobody is connected yet; the run waits for the nodes that had accepted.
    let mut e = engine();
    let model = models[&cp.model].clone();
    e.restore(0, cp, &model, None).unwrap();
    assert!(e.step(5_000, Input::Tick).unwrap().is_empty(), "still waiting for a and b");
    assert!(
        sent(&e.step(5_001, Input::Connected { node: ids::node("c") }).unwrap()).is_empty(),
        "c refused: not offered"
    );
    let fx = e.step(6_000, Input::Connected { node: ids::node("a") }).unwrap();
    assert!(matches!(sent(&fx)["a"][..], [directive::Kind::OfferPlan(_)]));
    e.step(6_001, Input::Connected { node: ids::node("b") }).unwrap();
    e.step(6_002, Input::Decision { node: ids::node("a"), response: accept(&plan_id, "r1") }).unwrap();
    let fx = e.step(6_003, Input::Decision { node: ids::node("b"), response: accept(&plan_id, "r1") }).unwrap();
    let s = start_round_of(&fx).expect("round 1 opens again with a and b");
    assert_eq!(s.round, 1);
    assert_eq!(sent(&fx).len(), 2);
}

#[test]
fn a_run_stopped_while_recruiting_recruits_anew_after_the_restart() {
    let mut e = engine();
    let (plan_id, fx) = start(&mut e, plan("p", 1, 2), "r1", 0);
    let (cp, models) = durable(&fx);
    let cp = cp.expect("the run's start is checkpointed");
    assert!(cp.accepted.is_empty());
    let mut e = engine();
    let model = models[&cp.model].clone();
    e.restore(0, cp, &model, None).unwrap();
    // No node is back yet: the run waits (it used to fail at the first tick, nobody having
    // accepted).
    assert!(e.step(100, Input::Tick).unwrap().is_empty());
    assert!(!e.is_idle());
    e.step(200, Input::Connected { node: ids::node("a") }).unwrap();
    assert!(
        start_round_of(
            &e.step(300, Input::Decision { node: ids::node("a"), response: accept(&plan_id, "r1") }).unwrap()
        )
        .is_none(),
        "one of min_nodes 2"
    );
    e.step(400, Input::Connected { node: ids::node("b") }).unwrap();
    let fx = e.step(500, Input::Decision { node: ids::node("b"), response: accept(&plan_id, "r1") }).unwrap();
    assert_eq!(start_round_of(&fx).map(|s| s.round), Some(1));
    // Past the recruiting deadline with too few, it fails as a fresh run would.
    let mut e = engine();
    let (_, fx) = start(&mut e, plan("q", 1, 2), "r2", 0);
    let (cp, models) = durable(&fx);
    let cp = cp.unwrap();
    let model = models[&cp.model].clone();
    let mut e2 = engine();
    e2.restore(0, cp, &model, None).unwrap();
    let fx = e2.step(10_001, Input::Tick).unwrap();
    assert!(fx.iter().any(|f| matches!(f, Effect::Finish { finished, .. } if !finished.success)), "{fx:?}");
}

/// A restart during the final evaluation keeps the metrics that came before it (they are in the
/// checkpoint) and asks only the nodes that had not reported: a node evaluates a model once, so
/// asking it again would only be refused, and the run would end without its metrics.
#[test]
fn a_run_stopped_during_its_final_evaluation_keeps_the_metrics_that_came_and_asks_only_the_rest() {
    let mut e = engine();
    for n in ["a", "b"] {
        e.step(0, Input::Connected { node: ids::node(n) }).unwrap();
    }
    let (plan_id, start_fx) = start(&mut e, plan("p", 1, 2), "r1", 0);
    let (_, mut models) = durable(&start_fx);
    e.step(1, Input::Decision { node: ids::node("a"), response: accept(&plan_id, "r1") }).unwrap();
    let fx = e.step(2, Input::Decision { node: ids::node("b"), response: accept(&plan_id, "r1") }).unwrap();
    let s = start_round_of(&fx).unwrap();
    e.step(3, Input::Update { node: ids::node("a"), update: update(&plan_id, &s, 1.0) }).unwrap();
    let fx = e.step(4, Input::Update { node: ids::node("b"), update: update(&plan_id, &s, 3.0) }).unwrap();
    models.extend(durable(&fx).1);
    let ev = fx
        .iter()
        .find_map(|f| match f {
            Effect::Send { kind: directive::Kind::Evaluate(ev), .. } => Some(ev.clone()),
            _ => None,
        })
        .expect("the final model is evaluated");
    let report = |value: f64| proto::EvaluationReport {
        plan_id: plan_id.to_string(),
        model_sha256: ev.model_sha256.clone(),
        metrics: vec![proto::Metric { name: "accuracy".into(), value, samples: 5 }],
    };
    let fx = e.step(5, Input::Evaluation { node: ids::node("a"), report: report(0.75) }).unwrap();
    let (cp, _) = durable(&fx);
    let cp = cp.expect("an evaluation report is made durable before it counts");
    assert_eq!(cp.rounds_completed, 1);
    assert_eq!(cp.final_metrics.keys().map(|n| n.to_string()).collect::<Vec<_>>(), ["a"]);
    assert!(cp.last_round.is_some(), "the last closed round is still named");
    // A second report of the same node changes nothing (the first is the one kept).
    let again = e.step(6, Input::Evaluation { node: ids::node("a"), report: report(0.1) }).unwrap();
    assert!(durable(&again).0.is_none());

    // A new process; a and b come back and accept the run again.
    let mut e = engine();
    let model = models[&cp.model].clone();
    e.restore(0, cp, &model, None).unwrap();
    for n in ["a", "b"] {
        e.step(10, Input::Connected { node: ids::node(n) }).unwrap();
    }
    e.step(11, Input::Decision { node: ids::node("a"), response: accept(&plan_id, "r1") }).unwrap();
    let fx = e.step(12, Input::Decision { node: ids::node("b"), response: accept(&plan_id, "r1") }).unwrap();
    let asked: Vec<String> = sent(&fx)
        .into_iter()
        .filter(|(_, k)| k.iter().any(|k| matches!(k, directive::Kind::Evaluate(_))))
        .map(|(n, _)| n.to_string())
        .collect();
    assert_eq!(asked, ["b"], "only the node that had not reported is asked");
    assert!(start_round_of(&fx).is_none(), "no round runs again");
    let fx = e.step(13, Input::Evaluation { node: ids::node("b"), report: report(0.85) }).unwrap();
    let Some(Effect::Finish { finished, export, .. }) = fx.iter().find(|f| matches!(f, Effect::Finish { .. })) else {
        panic!("the run finishes: {fx:?}");
    };
    assert!(finished.success, "{}", finished.reason);
    let mut got: Vec<(String, f64)> = finished.final_metrics.iter().map(|m| (m.node.clone(), m.value)).collect();
    got.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(got, [("a".to_string(), 0.75), ("b".to_string(), 0.85)]);
    let manifest = &export.as_ref().expect("exported").manifest;
    assert_eq!(manifest["final_metrics"]["a"][0]["value"], serde_json::json!(0.75));
}

// ---------------------------------------------------------------------------------------------
// Robust aggregators: the round's updates kept in an injected buffer until the round closes.
// ---------------------------------------------------------------------------------------------

fn update_values(plan_id: &str, s: &proto::StartRound, values: &[f32]) -> Box<Update> {
    let payload = Payload::Values(FiniteValues::new(values.to_vec()).expect("finite test values"));
    Box::new(Update { bytes: values.len() as u64 * 4, payload, ..*update(plan_id, s, 0.0) })
}

/// What a [`SharedBuffers`] buffer holds, seen from the test.
#[derive(Default)]
struct BufferState {
    kept: Vec<Vec<f32>>,
    /// Every `put` fails (a full disk).
    fail: bool,
    puts: usize,
    clears: usize,
}

/// Round buffers whose contents the test can look at, and make fail.
#[derive(Clone, Default)]
struct SharedBuffers(std::sync::Arc<std::sync::Mutex<BufferState>>);

impl SharedBuffers {
    fn state(&self) -> std::sync::MutexGuard<'_, BufferState> {
        self.0.lock().unwrap()
    }
}

impl crate::strategy::robust::RoundBuffers for SharedBuffers {
    fn open(&self, _run: &str) -> Box<dyn crate::strategy::robust::RoundBuffer> {
        Box::new(self.clone())
    }
}

impl crate::strategy::robust::RoundBuffer for SharedBuffers {
    fn put(&mut self, _node: &str, values: &[f32]) -> std::io::Result<()> {
        let mut s = self.state();
        s.puts += 1;
        if s.fail {
            return Err(std::io::Error::other("No space left on device (os error 28)"));
        }
        s.kept.push(values.to_vec());
        Ok(())
    }
    fn count(&self) -> usize {
        self.state().kept.len()
    }
    fn read_block(&self, slot: usize, start: usize, out: &mut [f32]) -> std::io::Result<()> {
        out.copy_from_slice(&self.state().kept[slot][start..start + out.len()]);
        Ok(())
    }
    fn clear(&mut self) -> std::io::Result<()> {
        let mut s = self.state();
        s.kept.clear();
        s.clears += 1;
        Ok(())
    }
}

/// Runs one round of `strategy` with `updates` (node, values) from as many nodes; returns the
/// model's move (new − initial) and the effects of the last update.
fn one_round(strategy: &str, updates: &[(&str, Vec<f32>)], buffers: &SharedBuffers) -> (Vec<f64>, Vec<Effect>) {
    let mut e = engine().with_round_buffers(Box::new(buffers.clone()));
    for (n, _) in updates {
        e.step(0, Input::Connected { node: ids::node(n) }).unwrap();
    }
    let p = plan_with_strategy("robust", 1, updates.len(), strategy);
    let initial = p.initial_global();
    let layout = p.global_layout();
    let (plan_id, _) = start(&mut e, p, "r1", 0);
    let mut fx = Vec::new();
    for (n, _) in updates {
        fx = e.step(1, Input::Decision { node: ids::node(n), response: accept(&plan_id, "r1") }).unwrap();
    }
    let s = start_round_of(&fx).expect("round 1 opens");
    for (n, values) in updates {
        fx = e.step(2, Input::Update { node: ids::node(n), update: update_values(&plan_id, &s, values) }).unwrap();
    }
    let Some(bytes) = fx.iter().find_map(|f| match f {
        Effect::StoreModel { bytes, .. } => Some(bytes.clone()),
        _ => None,
    }) else {
        return (Vec::new(), fx);
    };
    let new = sanctum_protocol::model::Weights::from_safetensors(&bytes, &layout).unwrap();
    let moved = new.values().iter().zip(initial.values()).map(|(a, b)| f64::from(*a) - f64::from(*b)).collect();
    (moved, fx)
}

fn l2(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f64>().sqrt()
}

/// Issue 13's must-show: four hospitals with similar updates and one that sends its update
/// scaled ×10. The bound: on each coordinate the median and the trimmed mean (k = ⌊0.2 · 5⌋ = 1
/// ≥ one rogue) lie within the honest updates' [min, max], so the model's move is at most
/// `spread` = √Σₖ maxᵢ (hᵢₖ − h̄ₖ)² from the honest mean h̄ (in L2). FedAvg's moves by
/// (10 h₀ − h̄)/5 ≈ 1.8 ‖h̄‖ from it.
#[test]
fn a_scaled_up_update_moves_the_median_and_trimmed_mean_models_by_less_than_the_honest_spread_while_fedavg_moves_far() {
    let honest: [[f32; 4]; 4] =
        [[0.10, -0.20, 0.05, 0.30], [0.11, -0.19, 0.06, 0.28], [0.09, -0.21, 0.04, 0.31], [0.12, -0.18, 0.05, 0.29]];
    let rogue: Vec<f32> = honest[0].iter().map(|v| v * 10.0).collect();
    let mean: Vec<f64> = (0..4).map(|k| honest.iter().map(|h| f64::from(h[k])).sum::<f64>() / 4.0).collect();
    let spread = (0..4)
        .map(|k| honest.iter().map(|h| (f64::from(h[k]) - mean[k]).powi(2)).fold(0.0, f64::max))
        .sum::<f64>()
        .sqrt();
    let norm = mean.iter().map(|x| x * x).sum::<f64>().sqrt();
    let rogue_norm = rogue.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let mut updates: Vec<(&str, Vec<f32>)> =
        ["cleveland", "hungarian", "switzerland", "va"].iter().zip(&honest).map(|(n, h)| (*n, h.to_vec())).collect();
    updates.push(("rogue", rogue));
    println!(
        "honest mean ‖h̄‖ = {norm:.4}; rogue ‖10·h₀‖ = {rogue_norm:.4} ({:.1}× ‖h̄‖); bound (honest spread) = {spread:.4} ({:.1}% of ‖h̄‖)",
        rogue_norm / norm,
        100.0 * spread / norm
    );
    let mut moved = BTreeMap::new();
    for (name, strategy) in [
        ("fedavg", "kind = \"fedavg\"\nweighting = \"uniform\""),
        ("median", "kind = \"median\""),
        ("trimmed_mean", "kind = \"trimmed_mean\"\ntrim = 0.2"),
        ("multi_krum", "kind = \"multi_krum\"\nbyzantine = 1"),
    ] {
        let (delta, fx) = one_round(strategy, &updates, &SharedBuffers::default());
        assert_eq!(delta.len(), 4, "{name}: the round closed: {fx:?}");
        let off = l2(&delta, &mean);
        println!(
            "{name:>12}: model moved by {:?}; ‖Δ − h̄‖ = {off:.4} = {:.1}% of ‖h̄‖ = {:.2}× ‖h̄‖",
            delta.iter().map(|d| (d * 1e4).round() / 1e4).collect::<Vec<_>>(),
            100.0 * off / norm,
            off / norm
        );
        moved.insert(name, off);
    }
    // f32 rounding of the model's weights: well below the figures compared.
    let slack = 1e-5;
    assert!(moved["median"] <= spread + slack, "median: {} > {spread}", moved["median"]);
    assert!(moved["trimmed_mean"] <= spread + slack, "trimmed mean: {} > {spread}", moved["trimmed_mean"]);
    assert!(moved["multi_krum"] <= slack, "multi-krum drops the rogue: {}", moved["multi_krum"]);
    assert!(moved["fedavg"] >= 1.5 * norm, "fedavg: {} < 1.5 × {norm}", moved["fedavg"]);
    assert!(moved["fedavg"] >= 10.0 * moved["median"].max(moved["trimmed_mean"]));
}

#[test]
fn a_robust_round_keeps_its_updates_until_it_closes_and_the_streaming_strategies_keep_none() {
    let buffers = SharedBuffers::default();
    let updates: Vec<(&str, Vec<f32>)> =
        vec![("a", vec![1.0, 2.0, 3.0, 4.0]), ("b", vec![3.0, 0.0, 3.0, 0.0]), ("c", vec![100.0, -1.0, 3.0, 2.0])];
    let (delta, fx) = one_round("kind = \"median\"", &updates, &buffers);
    // Coordinate-wise median of the three: (3, 0, 3, 2).
    let want = [3.0, 0.0, 3.0, 2.0];
    assert!(l2(&delta, &want) < 1e-6, "{delta:?}");
    assert!(fx.iter().any(|f| matches!(f, Effect::RoundRecord { .. })), "the round closed: {fx:?}");
    let s = buffers.state();
    assert_eq!(s.puts, 3, "each admitted update is kept");
    assert!(s.kept.is_empty(), "the close removed them");
    assert!(s.clears >= 2, "cleared at the round's opening and its close: {}", s.clears);
    drop(s);
    // FedAvg keeps the streaming sum: nothing is buffered.
    let fedavg = SharedBuffers::default();
    let (delta, _) = one_round("kind = \"fedavg\"", &updates, &fedavg);
    assert!((delta[0] - 104.0 / 3.0).abs() < 1e-5, "{delta:?}");
    let s = fedavg.state();
    assert_eq!((s.puts, s.clears), (0, 0));
}

#[test]
fn a_robust_update_that_cannot_be_kept_fails_the_round_with_the_reason_and_panics_nothing() {
    let buffers = SharedBuffers::default();
    buffers.state().fail = true;
    let updates: Vec<(&str, Vec<f32>)> = vec![("a", vec![1.0; 4]), ("b", vec![2.0; 4])];
    let mut e = engine().with_round_buffers(Box::new(buffers.clone()));
    for (n, _) in &updates {
        e.step(0, Input::Connected { node: ids::node(n) }).unwrap();
    }
    let (plan_id, _) = start(&mut e, plan_with_strategy("robust", 1, 2, "kind = \"median\""), "r1", 0);
    let mut fx = Vec::new();
    for (n, _) in &updates {
        fx = e.step(1, Input::Decision { node: ids::node(n), response: accept(&plan_id, "r1") }).unwrap();
    }
    let s = start_round_of(&fx).unwrap();
    let fx =
        e.step(2, Input::Update { node: ids::node("a"), update: update_values(&plan_id, &s, &updates[0].1) }).unwrap();
    let Some(Effect::Finish { finished, .. }) = fx.iter().find(|f| matches!(f, Effect::Finish { .. })) else {
        panic!("the run fails at once: {fx:?}");
    };
    assert!(!finished.success);
    assert!(
        finished.reason.contains(
            "round 1: median: the update of a could not be kept until the round closes: No space left on device"
        ) && finished.reason.contains("spool/robust"),
        "{}",
        finished.reason
    );
    assert!(!fx.iter().any(|f| matches!(f, Effect::StoreModel { .. })), "no model is made");
    assert!(e.is_idle());
    assert_eq!(buffers.state().puts, 1);
}

/// A restart in the middle of a robust round: the new process's buffer is empty (the file-backed
/// one removes `spool/robust` at start), the round runs again from its start, and its close
/// uses exactly the updates sent again.
#[test]
fn a_robust_run_restored_mid_round_runs_the_round_again_on_an_empty_buffer() {
    let before = SharedBuffers::default();
    let mut e = engine().with_round_buffers(Box::new(before.clone()));
    for n in ["a", "b", "c"] {
        e.step(0, Input::Connected { node: ids::node(n) }).unwrap();
    }
    let p = plan_with_strategy("robust", 1, 3, "kind = \"trimmed_mean\"\ntrim = 0.34");
    let initial = p.initial_global();
    let (plan_id, start_fx) = start(&mut e, p.clone(), "r1", 0);
    let (_, mut models) = durable(&start_fx);
    let mut fx = Vec::new();
    for n in ["a", "b", "c"] {
        fx = e.step(1, Input::Decision { node: ids::node(n), response: accept(&plan_id, "r1") }).unwrap();
    }
    let (cp, more) = durable(&fx);
    models.extend(more);
    let s = start_round_of(&fx).unwrap();
    for n in ["a", "b"] {
        e.step(2, Input::Update { node: ids::node(n), update: update_values(&plan_id, &s, &[50.0; 4]) }).unwrap();
    }
    assert_eq!(before.state().kept.len(), 2);

    let after = SharedBuffers::default();
    let mut e = engine().with_round_buffers(Box::new(after.clone()));
    let cp = cp.unwrap();
    let model = models[&cp.model].clone();
    e.restore(0, cp, &model, None).unwrap();
    let mut fx = Vec::new();
    for n in ["a", "b", "c"] {
        e.step(10, Input::Connected { node: ids::node(n) }).unwrap();
        fx = e.step(11, Input::Decision { node: ids::node(n), response: accept(&plan_id, "r1") }).unwrap();
    }
    let s = start_round_of(&fx).expect("round 1 opens again");
    assert_eq!(s.round, 1);
    assert!(after.state().kept.is_empty());
    let mut fx = Vec::new();
    for (n, v) in [("a", 1.0), ("b", 2.0), ("c", 30.0)] {
        fx = e.step(12, Input::Update { node: ids::node(n), update: update_values(&plan_id, &s, &[v; 4]) }).unwrap();
    }
    // k = ⌊0.34 · 3⌋ = 1: the middle value, 2, on every coordinate; the 50s of the earlier
    // process are nowhere.
    let bytes = fx
        .iter()
        .find_map(|f| match f {
            Effect::StoreModel { bytes, .. } => Some(bytes.clone()),
            _ => None,
        })
        .expect("the round closes");
    let new = sanctum_protocol::model::Weights::from_safetensors(&bytes, &p.global_layout()).unwrap();
    for (a, b) in new.values().iter().zip(initial.values()) {
        assert!((f64::from(*a) - f64::from(*b) - 2.0).abs() < 1e-5, "{a} − {b}");
    }
    assert!(after.state().kept.is_empty());
}

#[test]
fn the_robust_example_plans_parse_resolve_and_are_accepted_for_a_run() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/heart_disease");
    for (file, kind) in
        [("median.toml", "median"), ("trimmed_mean.toml", "trimmed_mean"), ("multi_krum.toml", "multi_krum")]
    {
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        let mut p = Plan::parse(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
        crate::plan_files::resolve(&mut p, &dir).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(p.strategy.name(), kind);
        assert!(p.strategy.is_robust() && crate::strategy::robust::rule(&p.strategy).is_some());
        engine().prepare(p, &[]).unwrap_or_else(|e| panic!("{file}: {e}"));
    }
}
