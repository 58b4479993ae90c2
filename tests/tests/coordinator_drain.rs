//! A coordinator asked to stop (SIGTERM) drains: every event it took is carried out in full, it
//! records `coordinator_stopped` with the runs still going on, lets the nodes go and exits 0; the
//! next start resumes those runs from their last completed round, each round closed once.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed step is a failed test

use std::process::{Command, Stdio};
use std::time::Duration;

use sanctum_tests::{Consortium, CoordinatorProcess, NodeProcess, bin, heart_data, wait_until};

const ROUNDS: u32 = 5;

fn plan() -> String {
    format!(
        "name = \"drain\"\nrounds = {ROUNDS}\nmin_nodes = 3\nrecruit_deadline_secs = 60\nround_deadline_secs = 120\nseed = 7\n\
    [model]\nkind = \"logistic_regression\"\ninputs = 13\n[data]\nschema = \"heart_disease\"\nschema_sha256 = \"39f2b3691b732094488517b366f5bb898ffb1d537dae5f6f2fc1b24c7f225688\"\n\
    [local]\nsteps = 40\nbatch_size = 4\nlearning_rate = 0.01\n[strategy]\nkind = \"fedavg\"\n\
    [privacy]\nmode = \"example\"\nnoise_multiplier = 1.0\nclip_norm = 1.0\ndelta = 1e-5\n"
    )
}

/// A consortium of three hospitals that keep serving, a lead's config, and the plan file.
struct Setup {
    c: Consortium,
    coord: CoordinatorProcess,
    nodes: Vec<NodeProcess>,
    lead: std::path::PathBuf,
    plan: std::path::PathBuf,
}

fn setup(plan_text: &str) -> Setup {
    let c = Consortium::new();
    let coord = CoordinatorProcess::start(&c);
    let addr = coord.address();
    let names = ["cleveland", "hungarian", "switzerland"];
    let nodes: Vec<NodeProcess> =
        names.iter().map(|n| NodeProcess::start_serving(&c, n, &addr, &heart_data(n), "max_epsilon = 50.0")).collect();
    coord.wait_for_nodes(names.len());
    let lead = c.dir.path().join("lead.toml");
    let files = c.lead();
    std::fs::write(
        &lead,
        format!("coordinator = {addr:?}\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n", files.ca, files.cert, files.key),
    )
    .unwrap();
    let plan = c.dir.path().join("plan.toml");
    std::fs::write(&plan, plan_text).unwrap();
    Setup { c, coord, nodes, lead, plan }
}

/// `plan submit` from the lead's CLI, in the background (it follows the run until the
/// coordinator goes away).
fn submit(s: &Setup) -> std::process::Child {
    Command::new(bin("sanctum-coordinator"))
        .args(["plan", "submit", "--config"])
        .arg(&s.lead)
        .arg("--plan")
        .arg(&s.plan)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn rounds_closed(coord: &CoordinatorProcess) -> Vec<u64> {
    coord
        .audit_records()
        .iter()
        .filter(|r| r.event == "round_closed")
        .filter_map(|r| r.params.get("round").and_then(|v| v.as_u64()))
        .collect()
}

#[test]
fn sigterm_drains_the_coordinator_and_the_next_start_resumes_the_plan() {
    let mut s = setup(&plan());
    let mut lead = submit(&s);
    assert!(
        wait_until(Duration::from_secs(120), || rounds_closed(&s.coord).len() >= 2),
        "round 2 never closed:\n{}",
        s.coord.log_text()
    );
    let term = Command::new("kill").arg("-TERM").arg(s.coord.pid().to_string()).status().unwrap();
    assert!(term.success());
    let started = std::time::Instant::now();
    let status = s.coord.wait_exit(Duration::from_secs(30));
    let status = status.unwrap_or_else(|| panic!("no exit within 30 s of SIGTERM:\n{}", s.coord.log_text()));
    println!("SIGTERM: exited with {status} after {:.2} s", started.elapsed().as_secs_f64());
    assert!(status.success(), "{status}\n{}", s.coord.log_text());
    let records = s.coord.audit_records();
    let events: Vec<&str> = records.iter().map(|r| r.event.as_str()).collect();
    // During the drain's grace the server still takes countersignatures of rounds already
    // recorded (a node's `ReportReceipt`); nothing else follows the stop.
    let stopped = records.iter().rposition(|r| r.event == "coordinator_stopped").expect("coordinator_stopped");
    assert!(events[stopped + 1..].iter().all(|e| *e == "receipt"), "{events:?}");
    let last = &records[stopped];
    assert_eq!(last.params["signal"], "SIGTERM");
    assert_eq!(last.params["running"].as_array().map(Vec::len), Some(1), "the running run is named");
    let _ = lead.kill();
    let _ = lead.wait();

    s.coord.restart();
    assert!(
        wait_until(Duration::from_secs(240), || s.coord.audit_records().iter().any(|r| r.event == "plan_finished")),
        "the resumed plan never finished:\n{}",
        s.coord.log_text()
    );
    let finished = s.coord.audit_records().into_iter().find(|r| r.event == "plan_finished").unwrap();
    assert_eq!(finished.params["success"], serde_json::json!(true), "{:?}", finished.params);
    assert_eq!(rounds_closed(&s.coord), vec![1, 2, 3, 4, 5], "each round closed exactly once");
    for node in &s.nodes {
        assert!(node.ledger().iter().all(|c| c.round >= 1), "{}", node.config.display());
    }
    let _ = &s.c;
}
