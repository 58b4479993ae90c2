//! A hospital's node is killed mid-plan: its round goes on with the others at once (no waiting
//! for the deadline) and the plan completes with the survivors; a node restarted mid-plan is
//! offered the plan again and takes part in the rounds that follow.

use sanctum_protocol::proto::lead_client::LeadClient;
use sanctum_protocol::proto::plan_event;
use sanctum_tests::{Consortium, CoordinatorProcess, NodeProcess, channel, heart_data, next_event, submit_and_watch};

#[tokio::test]
async fn a_killed_node_is_dropped_and_the_plan_completes_with_the_others() {
    let c = Consortium::new();
    let coord = CoordinatorProcess::start(&c);
    let addr = coord.address();
    let mut nodes: Vec<(String, NodeProcess)> = ["cleveland", "hungarian", "va"]
        .iter()
        .map(|h| (h.to_string(), NodeProcess::start(&c, h, &addr, &heart_data(h))))
        .collect();
    coord.wait_for_nodes(3);
    let mut lead = LeadClient::new(channel(&addr, &c.lead()).await.unwrap());
    // The deadline is far longer than the test may take: only the disconnect can close the round.
    let plan = "name = \"faults\"\nrounds = 4\nmin_nodes = 2\nround_deadline_secs = 600\n\
                [model]\nkind = \"logistic_regression\"\ninputs = 13\n[data]\nschema = \"heart_disease\"\nschema_sha256 = \"39f2b3691b732094488517b366f5bb898ffb1d537dae5f6f2fc1b24c7f225688\"\n\
                [local]\nsteps = 20\nbatch_size = 4\nlearning_rate = 0.01\n[strategy]\nkind = \"fedavg\"\n";
    let (_plan_id, mut events) = submit_and_watch(&mut lead, plan).await;

    let mut killed = false;
    let mut va_left_out = false;
    let finished = loop {
        let ev =
            next_event(&mut events, 120, "the plan waited for the deadline instead of dropping the killed node").await;
        match ev.kind {
            Some(plan_event::Kind::RoundOpened(r)) if r.round == 2 && !killed => {
                let (_, va) = nodes.iter_mut().find(|(n, _)| n == "va").unwrap();
                va.child.kill().unwrap();
                va.child.wait().unwrap();
                killed = true;
            }
            Some(plan_event::Kind::RoundOpened(r)) if killed && !r.participants.contains(&"va".to_string()) => {
                va_left_out = true;
            }
            Some(plan_event::Kind::RoundClosed(r)) => {
                println!("round {}: reported {:?}, dropped {:?}", r.round, r.reported, r.dropped);
            }
            Some(plan_event::Kind::PlanFinished(f)) => break f,
            _ => {}
        }
    };
    assert!(finished.success, "{}", finished.reason);
    assert_eq!(finished.rounds_completed, 4);
    assert!(va_left_out, "va was still asked to train after it died");
    let evaluated: Vec<&str> =
        finished.final_metrics.iter().filter(|m| m.name == "accuracy").map(|m| m.node.as_str()).collect();
    assert_eq!(evaluated, ["cleveland", "hungarian"]);
    assert!(coord.log_text().contains("node disconnected"));
}

#[tokio::test]
async fn a_restarted_node_rejoins_the_running_plan() {
    let c = Consortium::new();
    let coord = CoordinatorProcess::start(&c);
    let addr = coord.address();
    let mut nodes: Vec<(String, NodeProcess)> = ["cleveland", "hungarian"]
        .iter()
        .map(|h| (h.to_string(), NodeProcess::start(&c, h, &addr, &heart_data(h))))
        .collect();
    coord.wait_for_nodes(2);
    let mut lead = LeadClient::new(channel(&addr, &c.lead()).await.unwrap());
    // Enough rounds that many open after the node is back, whatever the machine's load.
    let plan = "name = \"restart\"\nrounds = 40\nmin_nodes = 1\nround_deadline_secs = 600\n\
                [model]\nkind = \"logistic_regression\"\ninputs = 13\n[data]\nschema = \"heart_disease\"\nschema_sha256 = \"39f2b3691b732094488517b366f5bb898ffb1d537dae5f6f2fc1b24c7f225688\"\n\
                [local]\nsteps = 2000\nbatch_size = 4\nlearning_rate = 0.001\n[strategy]\nkind = \"fedavg\"\n";
    let (_plan_id, mut events) = submit_and_watch(&mut lead, plan).await;
    let mut restarted = false;
    let mut reported_after_restart = false;
    let finished = loop {
        let ev = next_event(&mut events, 180, "the plan stalled").await;
        match ev.kind {
            Some(plan_event::Kind::RoundOpened(r)) if r.round == 2 && !restarted => {
                let (_, va) = nodes.iter_mut().find(|(n, _)| n == "cleveland").unwrap();
                va.restart();
                restarted = true;
            }
            Some(plan_event::Kind::RoundClosed(r)) => {
                println!("round {}: reported {:?}, dropped {:?}", r.round, r.reported, r.dropped);
                if restarted && r.round > 2 && r.reported.contains(&"cleveland".to_string()) {
                    reported_after_restart = true;
                }
            }
            Some(plan_event::Kind::PlanFinished(f)) => break f,
            _ => {}
        }
    };
    assert!(finished.success, "{}", finished.reason);
    assert!(reported_after_restart, "the restarted node never took part again");
    let evaluated: Vec<&str> =
        finished.final_metrics.iter().filter(|m| m.name == "accuracy").map(|m| m.node.as_str()).collect();
    assert_eq!(evaluated, ["cleveland", "hungarian"]);
    assert!(coord.log_text().contains("offering it again"));
}
