//! A coordinator killed with SIGKILL in the middle of a plan comes back and finishes it: the run
//! resumes from its last completed round (its checkpoint in the state database), the nodes that
//! accepted reconnect and are offered it again, each round is recorded once, and each hospital's
//! ledger charges each round once (a round in flight at the crash is run again, and a node that
//! had already released it sends the same bytes without a second charge).

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use sanctum_tests::{Consortium, CoordinatorProcess, NodeProcess, bin, heart_data, wait_until};

const ROUNDS: u32 = 8;

fn plan() -> String {
    format!(
        "name = \"resume\"\nrounds = {ROUNDS}\nmin_nodes = 3\nrecruit_deadline_secs = 60\nround_deadline_secs = 120\nseed = 7\n\
    [model]\nkind = \"logistic_regression\"\ninputs = 13\n[data]\nschema = \"heart_disease\"\nschema_sha256 = \"39f2b3691b732094488517b366f5bb898ffb1d537dae5f6f2fc1b24c7f225688\"\n\
    [local]\nsteps = 40\nbatch_size = 4\nlearning_rate = 0.01\n[strategy]\nkind = \"fedavg\"\n\
    [privacy]\nmode = \"example\"\nnoise_multiplier = 1.0\nclip_norm = 1.0\ndelta = 1e-5\n"
    )
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
fn a_coordinator_killed_mid_plan_resumes_from_its_last_round_and_counts_each_round_once() {
    let c = Consortium::new();
    let mut coord = CoordinatorProcess::start(&c);
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
    let plan_path = c.dir.path().join("plan.toml");
    std::fs::write(&plan_path, plan()).unwrap();
    // Submitted from the lead's CLI, which follows the run until the coordinator goes away.
    let mut submit = Command::new(bin("sanctum-coordinator"))
        .args(["plan", "submit", "--config"])
        .arg(&lead)
        .arg("--plan")
        .arg(&plan_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    let kill_after = ROUNDS / 2 - 1;
    assert!(
        wait_until(Duration::from_secs(120), || rounds_closed(&coord).len() as u32 >= kill_after),
        "round {kill_after} never closed:\n{}",
        coord.log_text()
    );
    coord.kill9();
    let before = rounds_closed(&coord);
    println!("killed with SIGKILL after rounds {before:?}");
    let _ = submit.kill();
    let _ = submit.wait();

    coord.restart();
    assert!(
        wait_until(Duration::from_secs(240), || coord.audit_records().iter().any(|r| r.event == "plan_finished")),
        "the resumed plan never finished:\n{}",
        coord.log_text()
    );
    let records = coord.audit_records();
    let resumed: Vec<_> = records.iter().filter(|r| r.event == "plan_resumed").collect();
    assert_eq!(resumed.len(), 1, "one resume");
    let resumed_at = resumed[0].params["rounds_completed"].as_u64().unwrap();
    assert_eq!(resumed_at, before.len() as u64, "it resumed after the last round it had recorded");
    let finished = records.iter().find(|r| r.event == "plan_finished").unwrap();
    assert_eq!(finished.params["success"], serde_json::json!(true), "{:?}", finished.params);
    assert_eq!(finished.params["rounds_completed"], serde_json::json!(ROUNDS));

    // Each round closed once, in order, across the two processes.
    let closed = rounds_closed(&coord);
    assert_eq!(closed, (1..=u64::from(ROUNDS)).collect::<Vec<_>>(), "each round closed exactly once");
    // The audit log of both processes verifies as one chain.
    let verify = Command::new(bin("sanctum-coordinator"))
        .args(["audit", "verify"])
        .arg(coord.state_dir().join("audit/audit.jsonl"))
        .arg("--ca")
        .arg(c.pki().join("ca.pem"))
        .output()
        .unwrap();
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stderr));

    // Each hospital charged each round of the run once.
    for node in &nodes {
        let mut per_round: BTreeMap<u32, usize> = BTreeMap::new();
        for charge in node.ledger() {
            *per_round.entry(charge.round).or_default() += 1;
        }
        println!("{}: charges per round {per_round:?}", node.config.display());
        assert_eq!(per_round.keys().copied().collect::<Vec<_>>(), (1..=ROUNDS).collect::<Vec<_>>());
        assert!(per_round.values().all(|&n| n == 1), "a round charged twice: {per_round:?}");
    }
}
