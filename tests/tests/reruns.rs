//! The same plan submitted twice, as a new consortium would do it from the README: `serve`, two
//! nodes that keep serving, and `plan submit` from the lead's CLI. A second submission is refused
//! unless `--again` is given; the second run's live view shows only its own rounds; each hospital
//! accounts both runs in full, and what left equals what was charged.

use std::process::Command;

use sanctum_tests::{Consortium, CoordinatorProcess, NodeProcess, bin, epsilon_by_run, heart_data, run_ok};

const PLAN: &str = "name = \"rerun\"\nrounds = 2\nmin_nodes = 2\nrecruit_deadline_secs = 60\n\
    [model]\nkind = \"logistic_regression\"\ninputs = 13\n[data]\nschema = \"heart_disease\"\nschema_sha256 = \"39f2b3691b732094488517b366f5bb898ffb1d537dae5f6f2fc1b24c7f225688\"\n\
    [local]\nsteps = 10\nbatch_size = 4\nlearning_rate = 0.01\n[strategy]\nkind = \"fedavg\"\n\
    [privacy]\nmode = \"example\"\nnoise_multiplier = 1.0\nclip_norm = 1.0\ndelta = 1e-5\n";

#[test]
fn a_plan_runs_again_only_with_again_and_every_run_is_charged_in_full() {
    let c = Consortium::new();
    let coord = CoordinatorProcess::start(&c);
    let addr = coord.address();
    let nodes: Vec<NodeProcess> = ["cleveland", "hungarian"]
        .iter()
        .map(|n| NodeProcess::start_serving(&c, n, &addr, &heart_data(n), "max_epsilon = 10.0"))
        .collect();
    coord.wait_for_nodes(2);
    let lead = c.dir.path().join("lead.toml");
    let files = c.lead();
    std::fs::write(
        &lead,
        format!("coordinator = {addr:?}\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n", files.ca, files.cert, files.key),
    )
    .unwrap();
    let plan = c.dir.path().join("plan.toml");
    std::fs::write(&plan, PLAN).unwrap();
    let submit = |again: bool| {
        let mut cmd = Command::new(bin("sanctum-coordinator"));
        cmd.args(["plan", "submit", "--config"]).arg(&lead).arg("--plan").arg(&plan).env_remove("LD_LIBRARY_PATH");
        if again {
            cmd.arg("--again");
        }
        cmd
    };

    let first = String::from_utf8(run_ok(&mut submit(false)).stdout).unwrap();
    assert!(first.contains("(run 1,") && first.contains("finished"), "{first}");

    let refused = submit(false).output().unwrap();
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("already ran 1 time(s)") && why.contains("--again"), "{why}");

    let second = String::from_utf8(run_ok(&mut submit(true)).stdout).unwrap();
    assert!(second.contains("(run 2,") && second.contains("finished"), "{second}");
    // Only this run's events: two round lines and two decisions, not the first run's as well.
    assert_eq!(second.matches("node(s) reporting").count(), 2, "{second}");
    assert_eq!(second.matches("accepted the plan").count(), 2, "{second}");

    // ε of 20 DP-SGD steps per run, by the accountant the nodes use.
    for node in &nodes {
        let charges = node.ledger();
        let runs = epsilon_by_run(&charges);
        assert_eq!(runs.len(), 2, "two runs charged: {runs:?}");
        assert_eq!(charges.len(), 4, "one charge per release");
        let releases = node.egress().iter().filter(|e| e.is_release()).count();
        assert_eq!(releases, charges.len(), "releases in the egress log equal charges in the ledger");
        let out = run_ok(Command::new(bin("sanctum-node")).args(["budget", "--json", "--config"]).arg(&node.config));
        let budget: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let spent = budget[0]["epsilon_spent"].as_f64().unwrap();
        let sum: f64 = runs.values().sum();
        assert!((spent - sum).abs() < 1e-9 && spent > 1.5 * runs.values().next().copied().unwrap(), "{budget}");
    }

    // The auditor's report shows the two runs apart: two plan sections, and per hospital one ε
    // series per run.
    let report = c.dir.path().join("report");
    let mut cmd = Command::new(bin("sanctum-coordinator"));
    cmd.args(["audit", "report", "--log"])
        .arg(c.dir.path().join("coordinator/state/audit/audit.jsonl"))
        .arg("--ca")
        .arg(c.pki().join("ca.pem"))
        .arg("--out")
        .arg(&report);
    for node in &nodes {
        cmd.arg("--node-log").arg(node.state_dir().join("audit/audit.jsonl"));
    }
    run_ok(&mut cmd);
    let md = std::fs::read_to_string(report.join("report.md")).unwrap();
    assert_eq!(md.matches("## Plan rerun").count(), 2, "{md}");
    for n in ["cleveland", "hungarian"] {
        let section = md.split(&format!("## Hospital {n}")).nth(1).unwrap_or_default();
        let section = section.split("## Hospital").next().unwrap_or_default();
        assert_eq!(section.matches(" run ").count(), 2, "{n}: one ε series per run\n{md}");
    }
}
