//! Example-level DP end to end: each node derives its own DP-SGD noise and ε from its own data,
//! refuses a plan that would overspend its policy's cap (the lead sees why), and trains with
//! DP-SGD when it accepts.

use std::process::Command;
use std::time::Duration;

use sanctum_protocol::proto::lead_client::LeadClient;
use sanctum_protocol::proto::plan_event;
use sanctum_tests::{
    Consortium, CoordinatorProcess, HEART_SCHEMA, NodeProcess, bin, channel, heart_data, next_event, run_ok,
    submit_and_watch, wait_until,
};

#[tokio::test]
async fn a_plan_that_would_overspend_is_refused_and_the_others_train_privately() {
    let c = Consortium::new();
    let coord = CoordinatorProcess::start(&c);
    let addr = coord.address();
    // 2 rounds × 50 steps at σ = 0.8 with batch 4: ε ≈ 2.63 on Cleveland's 199 training rows and
    // ≈ 2.96 on Hungary's 172 (δ = 1e-5, `sanctum-node privacy epsilon`).
    let strict = NodeProcess::start_with_policy(&c, "cleveland", &addr, &heart_data("cleveland"), "max_epsilon = 2.0");
    let lenient = NodeProcess::start_with_policy(
        &c,
        "hungarian",
        &addr,
        &heart_data("hungarian"),
        // Its owner chose to share the exact test accuracy even under DP (the default is none).
        "max_epsilon = 4.0\ntest_metrics = \"exact\"",
    );
    // A δ cap below the plan's δ: refused whatever ε.
    let tight_delta =
        NodeProcess::start_with_policy(&c, "va", &addr, &heart_data("va"), "max_epsilon = 10.0\nmax_delta = 1e-6");
    coord.wait_for_nodes(3);
    let plan = "name = \"dp\"\nrounds = 2\nmin_nodes = 1\n\
                [model]\nkind = \"logistic_regression\"\ninputs = 13\n[data]\nschema = \"heart_disease\"\nschema_sha256 = \"39f2b3691b732094488517b366f5bb898ffb1d537dae5f6f2fc1b24c7f225688\"\n\
                [local]\nsteps = 50\nbatch_size = 4\nlearning_rate = 0.01\n[strategy]\nkind = \"fedavg\"\n\
                [privacy]\nmode = \"example\"\nnoise_multiplier = 0.8\nclip_norm = 1.0\ndelta = 1e-5\n";
    let mut lead = LeadClient::new(channel(&addr, &c.lead()).await.unwrap());
    let (_plan_id, mut events) = submit_and_watch(&mut lead, plan).await;
    let mut refusals = std::collections::BTreeMap::new();
    let mut cost = None;
    let finished = loop {
        let ev = next_event(&mut events, 120, "the plan stalled").await;
        match ev.kind {
            Some(plan_event::Kind::NodeDecision(d)) if !d.accepted => {
                refusals.insert(d.node, d.reason);
            }
            Some(plan_event::Kind::NodeDecision(d)) => cost = d.privacy.map(|p| (d.node, p)),
            Some(plan_event::Kind::PlanFinished(f)) => break f,
            _ => {}
        }
    };
    println!("{refusals:?}");
    assert_eq!(refusals.keys().collect::<Vec<_>>(), ["cleveland", "va"]);
    let reason = &refusals["cleveland"];
    assert!(reason.contains("plan would spend ε = 2.63") && reason.contains("policy.max_epsilon is 2"), "{reason}");
    let reason = &refusals["va"];
    assert!(reason.contains("δ = 1e-5") && reason.contains("policy.max_delta is 1e-6"), "{reason}");
    assert!(finished.success, "{}", finished.reason);
    assert_eq!(
        finished.final_metrics.iter().filter(|m| m.name == "accuracy").map(|m| m.node.as_str()).collect::<Vec<_>>(),
        ["hungarian"]
    );
    // Before training, the lead learned what the plan costs the hospital that accepted it.
    let (node, p) = cost.expect("hungarian's decision carries its privacy cost");
    assert_eq!(node, "hungarian");
    assert!((p.epsilon - 2.9618).abs() < 1e-3 && p.steps == 100 && p.delta == 1e-5, "{p:?}");
    let log = lenient.log_text();
    assert!(log.contains("plan uses example-level DP"), "{log}");
    assert!(log.contains("epsilon_spent=\"2.96"), "{log}");
    drop((strict, tight_delta));
}

#[tokio::test]
async fn a_crash_between_charge_and_send_leaves_the_charge_once_and_never_less() {
    let c = Consortium::new();
    let coord = CoordinatorProcess::start(&c);
    let addr = coord.address();
    let mut crashing = NodeProcess::start_with(
        &c,
        "cleveland",
        &addr,
        &heart_data("cleveland"),
        "max_epsilon = 10.0",
        &[("SANCTUM_FAULT_CRASH_AFTER_CHARGE", "1")],
    );
    let _honest = NodeProcess::start(&c, "hungarian", &addr, &heart_data("hungarian"));
    coord.wait_for_nodes(2);
    let plan = "name = \"crash\"\nrounds = 2\nmin_nodes = 1\n\
                [model]\nkind = \"logistic_regression\"\ninputs = 13\n[data]\nschema = \"heart_disease\"\nschema_sha256 = \"39f2b3691b732094488517b366f5bb898ffb1d537dae5f6f2fc1b24c7f225688\"\n\
                [local]\nsteps = 10\nbatch_size = 4\nlearning_rate = 0.01\n[strategy]\nkind = \"fedavg\"\n\
                [privacy]\nmode = \"example\"\nnoise_multiplier = 1.0\nclip_norm = 1.0\ndelta = 1e-5\n";
    let mut lead = LeadClient::new(channel(&addr, &c.lead()).await.unwrap());
    let (plan_id, mut events) = submit_and_watch(&mut lead, plan).await;
    let finished = loop {
        let ev = next_event(&mut events, 120, "the plan stalled").await;
        if let Some(plan_event::Kind::PlanFinished(f)) = ev.kind {
            break f;
        }
    };
    assert!(finished.success, "{}", finished.reason);
    // The node died right after its round-1 charge was fsync'd, before the update left.
    let status = crashing.child.wait().unwrap();
    assert_eq!(status.code(), Some(70), "{}", crashing.log_text());
    let egress = std::fs::read_to_string(crashing.config.with_file_name("state").join("egress.jsonl")).unwrap();
    assert!(!egress.contains("SubmitUpdate"), "the update must not have left:\n{egress}");

    let budget = |node: &NodeProcess| -> serde_json::Value {
        let out = run_ok(Command::new(bin("sanctum-node")).args(["budget", "--json", "--config"]).arg(&node.config));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    // ε of 10 DP-SGD steps at q = 4/199, σ = 1, δ = 1e-5 by the same accountant the node uses.
    let truth = sanctum_protocol::privacy::epsilon_with(
        sanctum_protocol::privacy::Accountant::Pld,
        &sanctum_protocol::privacy::SampledGaussian { sampling_rate: 4.0 / 199.0, noise_multiplier: 1.0, steps: 10 },
        1e-5,
    )
    .unwrap();
    let check = |b: &serde_json::Value| {
        let d = &b[0];
        assert_eq!(d["dataset"], "heart_disease");
        let plans = d["runs"].as_array().unwrap();
        assert_eq!(plans.len(), 1, "{b}");
        assert_eq!(plans[0]["plan_id"], plan_id.as_str());
        assert_eq!(plans[0]["round"], 1);
        let spent = d["epsilon_spent"].as_f64().unwrap();
        assert!((spent - truth).abs() < 1e-9, "spent {spent}, truth {truth}");
        let remaining = d["epsilon_remaining"].as_f64().unwrap();
        assert!(remaining <= 10.0 - truth + 1e-12, "remaining {remaining} is more than the truth");
    };
    check(&budget(&crashing));
    let ledger = std::fs::read_to_string(crashing.config.with_file_name("state").join("privacy_ledger.jsonl")).unwrap();
    assert_eq!(ledger.lines().count(), 1, "{ledger}");

    // After a restart the node opens the same ledger: the charge is there once, still.
    crashing.restart();
    assert!(wait_until(Duration::from_secs(60), || crashing
        .log_text()
        .matches("connected; waiting for plans")
        .count()
        >= 2));
    check(&budget(&crashing));
}

#[test]
fn client_level_dp_reports_the_epsilon_of_the_released_models() {
    let dir = tempfile::tempdir().unwrap();
    let plan = format!(
        "name = \"client-dp\"\nrounds = 2\nmin_nodes = 2\n\
         [model]\nkind = \"logistic_regression\"\ninputs = 13\n[data]\nschema = \"heart_disease\"\nschema_sha256 = \"39f2b3691b732094488517b366f5bb898ffb1d537dae5f6f2fc1b24c7f225688\"\nschema_file = {HEART_SCHEMA:?}\n\
         [local]\nsteps = 10\nbatch_size = 4\nlearning_rate = 0.01\n[strategy]\nkind = \"fedavg\"\nweighting = \"uniform\"\n\
         [privacy]\nmode = \"client\"\nnoise_multiplier = 2.0\nclip_norm = 0.5\ndelta = 1e-5\n\
         adaptive_clipping = {{ count_noise_multiplier = 10.0 }}\n\
         [simulation]\nhospitals = [{{ name = \"cleveland\", data = {:?} }}, {{ name = \"hungarian\", data = {:?} }}]\n",
        heart_data("cleveland"),
        heart_data("hungarian")
    );
    let path = dir.path().join("plan.toml");
    std::fs::write(&path, plan).unwrap();
    let json = dir.path().join("summary.json");
    let out = run_ok(
        Command::new(bin("sanctum-coordinator"))
            .args(["simulate", "--device", "cpu", "--plan"])
            .arg(&path)
            .arg("--json")
            .arg(&json),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(summary["rounds_completed"], 2);
    // Every hospital in every round: the Gaussian mechanism with σ = 2 composed twice.
    let want = sanctum_protocol::privacy::epsilon_with(
        sanctum_protocol::privacy::Accountant::Pld,
        &sanctum_protocol::privacy::SampledGaussian { sampling_rate: 1.0, noise_multiplier: 2.0, steps: 2 },
        1e-5,
    )
    .unwrap();
    let got = summary["client_epsilon"].as_f64().unwrap();
    assert!((got - want).abs() < 1e-9, "client ε {got}, want {want}");
    assert!(stdout.contains("client-level DP (DP-FedAvg)"), "{stdout}");
}
