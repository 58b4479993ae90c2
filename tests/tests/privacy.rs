//! Example-level DP end to end: each node derives its own DP-SGD noise and ε from its own data,
//! refuses a plan that would overspend its policy's cap (the lead sees why), and trains with
//! DP-SGD when it accepts.

use std::time::Duration;

use sanctum_protocol::proto::lead_client::LeadClient;
use sanctum_protocol::proto::{SubmitPlanRequest, WatchPlanRequest, plan_event};
use sanctum_tests::{Consortium, CoordinatorProcess, NodeProcess, channel, heart_data, wait_until};
use tokio_stream::StreamExt;

#[tokio::test]
async fn a_plan_that_would_overspend_is_refused_and_the_others_train_privately() {
    let c = Consortium::new();
    let coord = CoordinatorProcess::start(&c);
    let addr = coord.address();
    // 2 rounds × 50 steps at σ = 0.8 with batch 4: ε ≈ 2.63 on Cleveland's 199 training rows and
    // ≈ 2.96 on Hungary's 172 (δ = 1e-5, `sanctum-node privacy epsilon`).
    let strict = NodeProcess::start_with_policy(&c, "cleveland", &addr, &heart_data("cleveland"), "max_epsilon = 2.0");
    let lenient = NodeProcess::start_with_policy(&c, "hungarian", &addr, &heart_data("hungarian"), "max_epsilon = 4.0");
    assert!(
        wait_until(Duration::from_secs(60), || coord.log_text().matches("node connected").count() >= 2),
        "nodes did not connect:\n{}",
        coord.log_text()
    );
    let plan = "name = \"dp\"\nrounds = 2\nmin_nodes = 1\n\
                [model]\nkind = \"logistic_regression\"\ninputs = 13\n[data]\nschema = \"heart_disease\"\n\
                [local]\nsteps = 50\nbatch_size = 4\nlearning_rate = 0.01\n[strategy]\nkind = \"fedavg\"\n\
                [privacy]\nmode = \"example\"\nnoise_multiplier = 0.8\nclip_norm = 1.0\ndelta = 1e-5\n";
    let mut lead = LeadClient::new(channel(&addr, &c.lead()).await.unwrap());
    let plan_id = lead.submit_plan(SubmitPlanRequest { plan_toml: plan.into() }).await.unwrap().into_inner().plan_id;
    let mut events = lead.watch_plan(WatchPlanRequest { plan_id }).await.unwrap().into_inner();
    let mut refusal = None;
    let finished = loop {
        let ev = tokio::time::timeout(Duration::from_secs(120), events.next()).await.unwrap().unwrap().unwrap();
        match ev.kind {
            Some(plan_event::Kind::NodeDecision(d)) if !d.accepted => refusal = Some((d.node, d.reason)),
            Some(plan_event::Kind::PlanFinished(f)) => break f,
            _ => {}
        }
    };
    let (node, reason) = refusal.expect("cleveland must refuse");
    println!("{node}: {reason}");
    assert_eq!(node, "cleveland");
    assert!(reason.contains("plan would spend ε = 2.63") && reason.contains("policy.max_epsilon is 2"), "{reason}");
    assert!(finished.success, "{}", finished.reason);
    assert_eq!(finished.final_metrics.iter().map(|m| m.node.as_str()).collect::<Vec<_>>(), ["hungarian"]);
    let log = lenient.log_text();
    assert!(log.contains("plan uses example-level DP"), "{log}");
    assert!(log.contains("epsilon_spent=\"2.96"), "{log}");
    drop(strict);
}
