//! A coordinator killed with SIGKILL during round 7 of a 15-round plan comes back and finishes
//! it, on SQLite and on PostgreSQL alike: the run resumes from its last completed round (its
//! checkpoint in the store), the nodes that accepted reconnect and are offered it again, each
//! round is recorded once (the audit log's `round_closed` and `round_record`, the store's rounds
//! table and its stored events), each hospital's ledger charges each round once (a round in
//! flight at the crash is run again, and a node that had already released it sends the same
//! bytes without a second charge), and the final accuracy is the one an uninterrupted run of the
//! same plan and seed reaches.
//!
//! Two plans per store, because the nodes' DP-SGD noise (and batch sampling) is drawn from the OS
//! by design, so no DP run is reproducible: a DP plan shows the ledger side (a plan without DP
//! charges nothing), and a plan without DP, whose training is a function of the seed, shows the
//! accuracy side against an uninterrupted run of it (`plan submit --again`, the same seed and
//! nodes; only the kill differs).

#![allow(clippy::expect_used, clippy::panic)] // test helpers: a failed step is a failed test

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sanctum_protocol::audit::Record;
use sanctum_tests::runs::{Backend, FinalAccuracy, lead_config};
use sanctum_tests::{Consortium, CoordinatorProcess, NodeProcess, bin, heart_data, wait_until};

const ROUNDS: u32 = 15;
/// The round in flight when the coordinator is killed.
const KILLED_IN: u32 = 7;
const HOSPITALS: [&str; 3] = ["cleveland", "hungarian", "switzerland"];
/// The hospital that stalls before training round [`KILLED_IN`] (a `fault-injection` hook), so
/// that round cannot close before the kill however fast the others are: the kill's timing is not
/// left to a race with a round that takes 0.1 s.
const STALLED: &str = "switzerland";
/// Shorter than the coordinator's heartbeat timeout (30 s), so the stalled hospital is not
/// dropped and every run trains on all three.
const STALL_SECS: &str = "4";

fn plan(name: &str, dp: bool) -> String {
    let privacy =
        if dp { "[privacy]\nmode = \"example\"\nnoise_multiplier = 1.0\nclip_norm = 1.0\ndelta = 1e-5\n" } else { "" };
    format!(
        "name = \"{name}\"\nrounds = {ROUNDS}\nmin_nodes = 3\nrecruit_deadline_secs = 60\nround_deadline_secs = 120\nseed = 7\n\
    [model]\nkind = \"logistic_regression\"\ninputs = 13\n[data]\nschema = \"heart_disease\"\nschema_sha256 = \"39f2b3691b732094488517b366f5bb898ffb1d537dae5f6f2fc1b24c7f225688\"\n\
    [local]\nsteps = 20\nbatch_size = 8\nlearning_rate = 0.05\n[strategy]\nkind = \"fedavg\"\n{privacy}"
    )
}

fn of_run<'a>(records: &'a [Record], event: &'a str, run: &'a str) -> impl Iterator<Item = &'a Record> + 'a {
    records.iter().filter(move |r| r.event == event && r.params.get("run").and_then(|v| v.as_str()) == Some(run))
}

fn round_of(r: &Record) -> u64 {
    r.params.get("round").and_then(|v| v.as_u64()).unwrap_or(0)
}

fn rounds_closed(coord: &CoordinatorProcess, run: &str) -> Vec<u64> {
    of_run(&coord.audit_records(), "round_closed", run).map(round_of).collect()
}

/// `plan submit` from the lead's CLI (which follows the run), and the run id it printed.
fn submit(lead: &Path, plan: &Path, again: bool) -> (Child, String) {
    let mut cmd = Command::new(bin("sanctum-coordinator"));
    cmd.args(["plan", "submit", "--config"]).arg(lead).arg("--plan").arg(plan);
    if again {
        cmd.arg("--again");
    }
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("spawn plan submit");
    let mut line = String::new();
    // Read through a borrow: the pipe stays open, so the CLI can go on printing the run.
    BufReader::new(child.stdout.as_mut().expect("stdout")).read_line(&mut line).expect("read");
    // "plan 'NAME' submitted: PLAN_ID (run N, RUN_ID)"
    let run = line.trim().strip_suffix(')').and_then(|l| l.rsplit(", ").next()).map(str::to_string);
    let run = run.unwrap_or_else(|| panic!("plan submit printed {line:?}"));
    (child, run)
}

fn wait_finished(coord: &CoordinatorProcess, run: &str, secs: u64) -> Record {
    let mut found = None;
    let ok = wait_until(Duration::from_secs(secs), || {
        found = of_run(&coord.audit_records(), "plan_finished", run).next().cloned();
        found.is_some()
    });
    assert!(ok, "run {run} never finished:\n{}", coord.log_text());
    found.expect("plan_finished")
}

/// Runs `plan` from the lead's CLI, kills the coordinator with SIGKILL as soon as round 6 has
/// closed (round 7 in flight), restarts it, and waits for the run to finish. Checks that it
/// resumed once after round 6, finished all rounds, and recorded each round once in the audit
/// log, the store's rounds table and the store's events. Returns the run id and what was not
/// recorded exactly once.
fn killed_run(
    backend: &Backend,
    coord: &mut CoordinatorProcess,
    nodes: &[NodeProcess],
    lead: &Path,
    plan: &Path,
    into_round: bool,
) -> (String, Vec<String>) {
    let started = Instant::now();
    let (mut cli, run) = submit(lead, plan, false);
    let before = KILLED_IN - 1;
    assert!(
        wait_until(Duration::from_secs(120), || rounds_closed(coord, &run).len() as u32 >= before),
        "round {before} never closed:\n{}",
        coord.log_text()
    );
    // With `into_round` (the DP plan), into round 7 proper: killed once a hospital's round-7
    // update has left (it trained and charged its ledger), so the restarted coordinator meets
    // nodes that already sent. The plan without DP is killed as soon as round 6 closed. Either
    // way round 7 is still open: STALLED waits STALL_SECS before training it.
    let plan_id = of_run(&coord.audit_records(), "plan_submitted", &run)
        .find_map(|r| r.params["plan_id"].as_str().map(str::to_string))
        .expect("the run's plan_submitted record");
    let sent_in_flight = || -> Vec<String> {
        nodes
            .iter()
            .zip(HOSPITALS)
            .filter(|(n, _)| {
                n.egress().iter().any(|e| e.is_release() && e.plan_id == plan_id && e.round == Some(KILLED_IN))
            })
            .map(|(_, name)| name.to_string())
            .collect()
    };
    if into_round {
        assert!(
            wait_until(Duration::from_secs(120), || !sent_in_flight().is_empty()),
            "no hospital sent its round {KILLED_IN} update:\n{}",
            coord.log_text()
        );
    }
    coord.kill9();
    let sent_at_kill = sent_in_flight();
    let closed_at_kill = rounds_closed(coord, &run);
    let charged_in_flight: Vec<String> = nodes
        .iter()
        .zip(HOSPITALS)
        .filter(|(n, _)| n.ledger().iter().any(|c| c.run.as_deref() == Some(run.as_str()) && c.round == KILLED_IN))
        .map(|(_, name)| name.to_string())
        .collect();
    println!(
        "[{}] {}: SIGKILL after {:.1} s, rounds closed {closed_at_kill:?}; round {KILLED_IN} already sent by {sent_at_kill:?}, charged by {charged_in_flight:?}",
        backend.name(),
        plan.display(),
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        closed_at_kill,
        (1..=u64::from(before)).collect::<Vec<_>>(),
        "the kill must land in round {KILLED_IN}, after round {before} closed"
    );
    let _ = cli.kill();
    let _ = cli.wait();

    coord.restart();
    let finished = wait_finished(coord, &run, 240);
    println!(
        "[{}] {}: finished {:.1} s after submission",
        backend.name(),
        plan.display(),
        started.elapsed().as_secs_f64()
    );
    let records = coord.audit_records();
    let resumed: Vec<u64> =
        of_run(&records, "plan_resumed", &run).filter_map(|r| r.params["rounds_completed"].as_u64()).collect();
    println!("[{}] resumed with rounds_completed {resumed:?}", backend.name());
    assert_eq!(resumed, vec![u64::from(before)], "one resume, after the last round it had recorded");
    assert_eq!(finished.params["success"], serde_json::json!(true), "{:?}", finished.params);
    assert_eq!(finished.params["rounds_completed"], serde_json::json!(ROUNDS));

    // Each round once, in order, across the two processes, in each place a round is recorded:
    // the audit log's round_closed and round_record, the store's rounds table and its events.
    // Gathered rather than asserted one by one, so one missing record does not hide the others.
    let all: Vec<u64> = (1..=u64::from(ROUNDS)).collect();
    let plan_id = finished.params["plan_id"].as_str().expect("plan_id").to_string();
    let round_records: Vec<&Record> =
        records.iter().filter(|r| r.event == "round_record" && r.params["plan_id"] == plan_id.as_str()).collect();
    let stored = backend.rounds(coord, &run);
    let mut views = vec![
        ("audit round_closed", rounds_closed(coord, &run)),
        ("audit round_record", round_records.iter().map(|r| round_of(r)).collect()),
        ("store rounds table", stored.iter().map(|(r, _)| u64::from(*r)).collect()),
    ];
    // The events a late watcher is replayed, where the coordinator keeps them in the store (a
    // coordinator that keeps them in memory only has none there to count).
    let events: Vec<u64> = backend.round_closed_events(coord, &run).into_iter().map(u64::from).collect();
    if events.is_empty() {
        println!("[{}] the store holds no RoundClosed event of the run (events kept in memory only)", backend.name());
    } else {
        views.push(("store RoundClosed events", events));
    }
    let mut problems = Vec::new();
    for (what, rounds) in views {
        println!("[{}] {what}: {rounds:?}", backend.name());
        if rounds != all {
            let mut count: BTreeMap<u64, usize> = all.iter().map(|&r| (r, 0)).collect();
            for r in &rounds {
                *count.entry(*r).or_default() += 1;
            }
            let wrong: BTreeMap<u64, usize> = count.into_iter().filter(|&(_, n)| n != 1).collect();
            problems.push(format!(
                "[{}] {}: {what} is {rounds:?}; rounds not there exactly once (round: times) {wrong:?}",
                backend.name(),
                plan.display()
            ));
        }
    }
    // The store and the signed records name the same model for each round.
    for (round, model) in &stored {
        for r in round_records.iter().filter(|r| round_of(r) == u64::from(*round)) {
            assert_eq!(
                r.params["model_sha256"].as_str(),
                Some(model.as_str()),
                "round {round}: store and round_record"
            );
        }
    }
    (run, problems)
}

fn verify_audit(c: &Consortium, coord: &CoordinatorProcess) {
    let verify = Command::new(bin("sanctum-coordinator"))
        .args(["audit", "verify"])
        .arg(coord.state_dir().join("audit/audit.jsonl"))
        .arg("--ca")
        .arg(c.pki().join("ca.pem"))
        .output()
        .expect("audit verify");
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stderr));
}

fn write_plan(c: &Consortium, name: &str, dp: bool) -> PathBuf {
    let path = c.dir.path().join(format!("{name}.toml"));
    std::fs::write(&path, plan(name, dp)).expect("plan");
    path
}

fn kill9_during_round_7_of_15(backend: Backend) {
    let c = Consortium::new();
    let mut coord = backend.start(&c);
    let addr = coord.address();
    // Exact test metrics, so the plan without DP reports its accuracy (a DP plan would report
    // none by default, and this one's accuracy is not compared).
    let nodes: Vec<NodeProcess> = HOSPITALS
        .iter()
        .map(|n| {
            let round = KILLED_IN.to_string();
            let stall = [("SANCTUM_FAULT_STALL_ROUND", round.as_str()), ("SANCTUM_FAULT_STALL_SECS", STALL_SECS)];
            let env: &[(&str, &str)] = if *n == STALLED { &stall } else { &[] };
            NodeProcess::start_serving_with(&c, n, &addr, &heart_data(n), "test_metrics = \"exact\"", env)
        })
        .collect();
    coord.wait_for_nodes(HOSPITALS.len());
    let lead = lead_config(&c, &addr);

    // The DP plan: each round charged once at each hospital.
    let dp_plan = write_plan(&c, "resume-dp", true);
    let (dp_run, mut problems) = killed_run(&backend, &mut coord, &nodes, &lead, &dp_plan, true);
    for (node, name) in nodes.iter().zip(HOSPITALS) {
        let mut per_round: BTreeMap<u32, usize> = BTreeMap::new();
        for charge in node.ledger().iter().filter(|c| c.run.as_deref() == Some(dp_run.as_str())) {
            *per_round.entry(charge.round).or_default() += 1;
        }
        println!("[{}] {name}: charges per round {per_round:?}", backend.name());
        assert_eq!(per_round.keys().copied().collect::<Vec<_>>(), (1..=ROUNDS).collect::<Vec<_>>(), "{name}");
        assert!(per_round.values().all(|&n| n == 1), "{name}: a round charged twice: {per_round:?}");
    }

    // The plan without DP: killed the same way, then run again uninterrupted (same seed).
    let plain_plan = write_plan(&c, "resume-plain", false);
    let (plain_run, more) = killed_run(&backend, &mut coord, &nodes, &lead, &plain_plan, false);
    problems.extend(more);
    let resumed = FinalAccuracy::of_run(&lead, &plain_run);
    let (cli, reference_run) = submit(&lead, &plain_plan, true);
    wait_finished(&coord, &reference_run, 240);
    let out = cli.wait_with_output().expect("plan submit");
    assert!(
        out.status.success(),
        "the uninterrupted run's CLI: {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    let reference = FinalAccuracy::of_run(&lead, &reference_run);
    let difference = resumed.max_difference(&reference);
    println!(
        "[{}] final accuracy: killed and resumed {:.4} {:?}, uninterrupted {:.4} {:?}, largest difference {difference:.6}",
        backend.name(),
        resumed.weighted,
        resumed.per_node,
        reference.weighted,
        reference.per_node
    );
    assert!(difference <= 0.01, "the resumed run's accuracy differs from the uninterrupted one's by {difference}");
    verify_audit(&c, &coord);
    assert!(problems.is_empty(), "rounds not recorded exactly once:\n{}", problems.join("\n"));
}

#[test]
fn sqlite_a_coordinator_killed_during_round_7_of_15_finishes_each_round_once_with_the_same_accuracy() {
    kill9_during_round_7_of_15(Backend::Sqlite);
}

#[test]
fn postgres_a_coordinator_killed_during_round_7_of_15_finishes_each_round_once_with_the_same_accuracy() {
    let Some(backend) = Backend::postgres() else {
        return;
    };
    kill9_during_round_7_of_15(backend);
}
