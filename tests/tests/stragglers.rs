//! Stragglers end to end: three hospitals, one of which stalls before training round 2
//! (`SANCTUM_FAULT_STALL_ROUND=2`, `SANCTUM_FAULT_STALL_SECS=11`, a `fault-injection` build: it
//! sends one heartbeat, then nothing for 11 s, longer than the 10 s round deadline). The
//! coordinator drops it after 5 s of silence (`limits.heartbeat_timeout_secs = 5`), before the
//! deadline. With `min_nodes = 2` round 2 completes with the other two and the stalled node takes
//! part in round 3; with `min_nodes = 3` round 2 fails and, with `retries = 1`, opens again and
//! completes with all three (the two that reported re-send the same bytes); with `retries = 0`
//! the plan fails with the reason.
//!
//! Build first: `cargo build --workspace --bins --features
//! sanctum-coordinator/fault-injection,sanctum-node/fault-injection`.

#![allow(clippy::unwrap_used, clippy::panic)] // test helpers: a failed step is a failed test

use std::time::Instant;

use sanctum_protocol::proto::audit_client::AuditClient;
use sanctum_protocol::proto::lead_client::LeadClient;
use sanctum_protocol::proto::{PlanFinished, PlanStatusRequest, plan_event};
use sanctum_tests::{
    Consortium, CoordinatorProcess, NodeProcess, bin, channel, heart_data, next_event, submit_and_watch,
};

const HOSPITALS: [&str; 3] = ["cleveland", "hungarian", "va"];
const STALLED: &str = "va";
const DEADLINE_SECS: u64 = 10;
const HEARTBEAT_TIMEOUT_SECS: u64 = 5;
const STALL_SECS: &str = "11";

fn plan(name: &str, min_nodes: usize, retries: u32) -> String {
    format!(
        "name = \"{name}\"\nrounds = 3\nmin_nodes = {min_nodes}\nretries = {retries}\nround_deadline_secs = {DEADLINE_SECS}\nrecruit_deadline_secs = 30\n\
         [model]\nkind = \"logistic_regression\"\ninputs = 13\n[data]\nschema = \"heart_disease\"\nschema_sha256 = \"39f2b3691b732094488517b366f5bb898ffb1d537dae5f6f2fc1b24c7f225688\"\n\
         [local]\nsteps = 5\nbatch_size = 4\nlearning_rate = 0.01\n[strategy]\nkind = \"fedavg\"\n"
    )
}

/// A coordinator with a 5 s heartbeat timeout and the three hospitals, `va` stalling in round 2.
fn consortium(c: &Consortium) -> (CoordinatorProcess, Vec<NodeProcess>) {
    let coord = CoordinatorProcess::start_configured(
        c,
        &format!("[limits]\nheartbeat_timeout_secs = {HEARTBEAT_TIMEOUT_SECS}\n"),
        &[],
    );
    let addr = coord.address();
    let stall = [("SANCTUM_FAULT_STALL_ROUND", "2"), ("SANCTUM_FAULT_STALL_SECS", STALL_SECS)];
    let nodes = HOSPITALS
        .iter()
        .map(|h| {
            let env: &[(&str, &str)] = if *h == STALLED { &stall } else { &[] };
            NodeProcess::start_with(c, h, &addr, &heart_data(h), "", env)
        })
        .collect();
    coord.wait_for_nodes(3);
    (coord, nodes)
}

/// What the lead saw of a run, event by event.
#[derive(Default)]
struct Seen {
    /// (round, reported, dropped, seconds the round was open).
    closed: Vec<(u32, Vec<String>, Vec<String>, f64)>,
    failed: Vec<sanctum_protocol::proto::RoundFailed>,
    /// (round, node, state, reason).
    states: Vec<(u32, String, String, String)>,
}

async fn follow(events: &mut tonic::Streaming<sanctum_protocol::proto::PlanEvent>) -> (Seen, PlanFinished) {
    let mut seen = Seen::default();
    let mut opened = Instant::now();
    loop {
        let ev = next_event(events, 120, "the plan stalled").await;
        match ev.kind {
            Some(plan_event::Kind::RoundOpened(r)) => {
                opened = Instant::now();
                println!("round {} opened with {:?}", r.round, r.participants);
            }
            Some(plan_event::Kind::ParticipantState(p)) => {
                println!("  round {}: {} {} {}", p.round, p.node, p.state, p.reason);
                seen.states.push((p.round, p.node, p.state, p.reason));
            }
            Some(plan_event::Kind::RoundFailed(f)) => {
                println!(
                    "round {} attempt {} FAILED after {:.1} s (retrying: {}): {}",
                    f.round,
                    f.attempt,
                    opened.elapsed().as_secs_f64(),
                    f.retrying,
                    f.reason
                );
                seen.failed.push(f);
            }
            Some(plan_event::Kind::RoundClosed(r)) => {
                let secs = opened.elapsed().as_secs_f64();
                println!(
                    "round {} closed after {secs:.1} s: reported {:?}, dropped {:?}",
                    r.round, r.reported, r.dropped
                );
                seen.closed.push((r.round, r.reported, r.dropped, secs));
            }
            Some(plan_event::Kind::PlanFinished(f)) => return (seen, f),
            _ => {}
        }
    }
}

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn a_node_that_stalls_past_the_deadline_is_dropped_and_takes_part_in_the_next_round() {
    let c = Consortium::new();
    let (coord, nodes) = consortium(&c);
    let mut lead = LeadClient::new(channel(&coord.address(), &c.lead()).await.unwrap());
    let (_plan_id, mut events) = submit_and_watch(&mut lead, plan("stragglers", 2, 0)).await;
    let (seen, finished) = follow(&mut events).await;
    assert!(finished.success, "{}", finished.reason);
    assert_eq!(finished.rounds_completed, 3);
    let round = |n: u32| seen.closed.iter().find(|r| r.0 == n).unwrap_or_else(|| panic!("round {n} never closed"));
    let (_, reported, dropped, secs) = round(2);
    assert_eq!((reported, dropped), (&names(&["cleveland", "hungarian"]), &names(&[STALLED])));
    // Dropped by its silence, before the deadline: the round did not wait for it.
    assert!(*secs < DEADLINE_SECS as f64, "round 2 waited {secs:.1} s, the deadline is {DEADLINE_SECS} s");
    assert!(
        seen.states
            .iter()
            .any(|(r, n, s, why)| *r == 2 && n == STALLED && s == "dropped" && why.starts_with("no heartbeat for")),
        "the lead was told why va was dropped"
    );
    assert!(seen.states.iter().any(|(r, n, s, _)| *r == 1 && n == STALLED && s == "training"), "heartbeats in round 1");
    // The stalled node is back for round 3.
    assert_eq!(round(3).1, names(&HOSPITALS));
    assert!(seen.failed.is_empty());

    // The audit log: round 2's round_closed lists va as dropped; no heartbeat is in it.
    let records = coord.audit_records();
    let closed2 = records
        .iter()
        .find(|r| r.event == "round_closed" && r.params["round"] == 2)
        .expect("round 2's round_closed record");
    assert_eq!(closed2.params["dropped"], serde_json::json!([STALLED]));
    assert!(records.iter().all(|r| !r.event.contains("heartbeat")));
    let va = &nodes[2];
    let heartbeats = va.egress().iter().filter(|e| e.call == "Heartbeat").count();
    println!("audit records: {}; va's heartbeats in its egress log: {heartbeats}", records.len());
    assert!(heartbeats >= 3, "each round's heartbeats left through the egress log: {heartbeats}");
}

/// Round 2 fails (min_nodes 3, va silent); with `retries` it is tried again.
async fn run_with_retries(retries: u32) -> (Seen, PlanFinished, CoordinatorProcess, Vec<NodeProcess>, String) {
    let c = Consortium::new();
    let (coord, nodes) = consortium(&c);
    let addr = coord.address();
    let mut lead = LeadClient::new(channel(&addr, &c.lead()).await.unwrap());
    let (plan_id, mut events) = submit_and_watch(&mut lead, plan(&format!("retries-{retries}"), 3, retries)).await;
    let (seen, finished) = follow(&mut events).await;
    // What the lead's `plan status` says, through the API and through the CLI.
    let mut audit = AuditClient::new(channel(&addr, &c.lead()).await.unwrap());
    let status = audit.plan_status(PlanStatusRequest { id: plan_id.clone() }).await.unwrap().into_inner();
    assert_eq!(status.round_failures, seen.failed, "plan status lists the failed attempts");
    let files = c.lead();
    let config = c.dir.path().join("lead.toml");
    std::fs::write(
        &config,
        format!("coordinator = {addr:?}\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n", files.ca, files.cert, files.key),
    )
    .unwrap();
    let out = tokio::process::Command::new(bin("sanctum-coordinator"))
        .args(["plan", "status", &plan_id, "--config"])
        .arg(&config)
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("$ sanctum-coordinator plan status\n{text}{}", String::from_utf8_lossy(&out.stderr));
    // The processes are killed when dropped; the consortium's directory must outlive them.
    std::mem::forget(c);
    (seen, finished, coord, nodes, text)
}

#[tokio::test]
async fn a_round_below_min_nodes_is_retried_and_the_plan_completes() {
    let (seen, finished, coord, nodes, status) = run_with_retries(1).await;
    assert!(finished.success, "{}", finished.reason);
    assert_eq!(finished.rounds_completed, 3);
    let [f] = &seen.failed[..] else { panic!("one failed attempt: {:?}", seen.failed) };
    assert_eq!((f.round, f.attempt, f.retrying), (2, 1, true));
    assert!(f.reason.contains("2 node(s) reported, min_nodes is 3; dropped: va (no heartbeat for"), "{}", f.reason);
    // The retry completed round 2 with all three: va trained once it woke, the others re-sent.
    let r2: Vec<_> = seen.closed.iter().filter(|r| r.0 == 2).collect();
    assert_eq!(r2.len(), 1, "round 2 closed once");
    assert_eq!(r2[0].1, names(&HOSPITALS));
    assert!(status.contains("round 2 attempt 1 FAILED (retried)"), "{status}");
    let records = coord.audit_records();
    let failed: Vec<_> = records.iter().filter(|r| r.event == "round_failed").collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].params["retrying"], true);
    assert_eq!(records.iter().filter(|r| r.event == "round_closed" && r.params["round"] == 2).count(), 1);
    // A node that reported in the failed attempt sent the same bytes again, nothing new trained.
    for node in &nodes[..2] {
        let sent: Vec<String> = node
            .audit_records()
            .iter()
            .filter(|r| r.event == "update_sent" && r.params["round"] == 2)
            .map(|r| r.params["payload_sha256"].as_str().unwrap_or_default().to_string())
            .collect();
        assert_eq!(sent.len(), 2, "{sent:?}");
        assert_eq!(sent[0], sent[1], "the retry got the same bytes");
    }
}

#[tokio::test]
async fn without_retries_the_same_plan_fails_with_the_reason() {
    let (seen, finished, coord, _nodes, status) = run_with_retries(0).await;
    assert!(!finished.success);
    assert_eq!(finished.rounds_completed, 1);
    assert!(
        finished
            .reason
            .starts_with("round 2 failed: 2 node(s) reported, min_nodes is 3; dropped: va (no heartbeat for"),
        "{}",
        finished.reason
    );
    assert!(matches!(&seen.failed[..], [f] if !f.retrying && f.reason == finished.reason));
    assert!(status.contains("round 2 attempt 1 FAILED (no retry left)"), "{status}");
    assert!(status.contains(&format!("reason: {}", finished.reason)), "{status}");
    let records = coord.audit_records();
    assert_eq!(records.iter().filter(|r| r.event == "round_failed").count(), 1);
}
