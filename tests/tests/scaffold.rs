//! SCAFFOLD and FedProx end to end, and SCAFFOLD's promise that a hospital keeps its control
//! variate cᵢ durably: three hospitals run the same SCAFFOLD plan three times (no DP, so a run
//! repeats bit for bit). In the second run `va` is killed (SIGKILL) right after round 2 closes
//! and started again; round 3 fails without it (`min_nodes = 3`) and is retried once all three
//! are back (the other two re-send the same bytes), and the run must end on the very model the
//! uninterrupted run ends on: round 3 trains with the cᵢ `va` stored. In the third, `va`'s `state/scaffold` is deleted while
//! it is down, and the final model differs, which shows that the check can fail. A FedProx run
//! ends on another model than FedAvg from the same start: the proximal term reaches the nodes.

#![allow(clippy::unwrap_used, clippy::panic)] // test helpers: a failed step is a failed test

use sanctum_protocol::proto::lead_client::LeadClient;
use sanctum_protocol::proto::{PlanFinished, plan_event};
use std::time::Duration;

use sanctum_tests::{
    Consortium, CoordinatorProcess, NodeProcess, channel, heart_data, next_event, submit_and_watch, wait_until,
};

const HOSPITALS: [&str; 3] = ["cleveland", "hungarian", "va"];
const RESTARTED: &str = "va";

fn plan(name: &str, strategy: &str) -> String {
    format!(
        "name = \"{name}\"\nrounds = 4\nmin_nodes = 3\nretries = 1\nround_deadline_secs = 120\nrecruit_deadline_secs = 30\n\
         [model]\nkind = \"logistic_regression\"\ninputs = 13\n[data]\nschema = \"heart_disease\"\nschema_sha256 = \"39f2b3691b732094488517b366f5bb898ffb1d537dae5f6f2fc1b24c7f225688\"\n\
         [local]\nsteps = 20\nbatch_size = 4\nlearning_rate = 0.05\n[strategy]\n{strategy}\n"
    )
}

#[derive(Clone, Copy, PartialEq)]
enum Restart {
    No,
    Keep,
    WipeControlVariate,
}

/// Runs `plan` on a fresh consortium; with a restart, `va` is killed after round 2 closes and
/// started again (its control variate deleted first for `WipeControlVariate`).
async fn run(plan: String, restart: Restart) -> PlanFinished {
    let c = Consortium::new();
    let coord = CoordinatorProcess::start_configured(&c, "[limits]\nheartbeat_timeout_secs = 60\n", &[]);
    let addr = coord.address();
    let mut nodes: Vec<(&str, NodeProcess)> =
        HOSPITALS.iter().map(|h| (*h, NodeProcess::start(&c, h, &addr, &heart_data(h)))).collect();
    coord.wait_for_nodes(3);
    let mut lead = LeadClient::new(channel(&addr, &c.lead()).await.unwrap());
    let (_id, mut events) = submit_and_watch(&mut lead, plan).await;
    loop {
        let ev = next_event(&mut events, 180, "the plan stalled").await;
        match ev.kind {
            Some(plan_event::Kind::RoundFailed(f)) => {
                println!("round {} attempt {} failed: {}", f.round, f.attempt, f.reason)
            }
            Some(plan_event::Kind::RoundClosed(r)) => {
                println!("round {}: reported {:?}, dropped {:?}", r.round, r.reported, r.dropped);
                if r.round == 2 && restart != Restart::No {
                    let (_, va) = nodes.iter_mut().find(|(n, _)| *n == RESTARTED).unwrap();
                    let dir = va.state_dir().join("scaffold");
                    let files: Vec<_> = walk(&dir);
                    println!("{RESTARTED}'s control variate before the kill: {files:?}");
                    assert_eq!(files.len(), 1, "one file: cᵢ before and after round 2");
                    assert!(files[0].ends_with("control-variate-2.safetensors"), "{files:?}");
                    va.kill();
                    if restart == Restart::WipeControlVariate {
                        std::fs::remove_dir_all(&dir).unwrap();
                    }
                    va.restart();
                    println!("{RESTARTED} killed after round 2 and started again ({})", restart_name(restart));
                }
            }
            Some(plan_event::Kind::PlanFinished(f)) => {
                assert!(f.success, "{}", f.reason);
                assert_eq!(f.rounds_completed, 4);
                // A closed run's control variates are gone from every hospital (once it hears the
                // run closed, just after the lead does).
                for (name, n) in &nodes {
                    let dir = n.state_dir().join("scaffold");
                    let gone = wait_until(Duration::from_secs(20), || walk(&dir).is_empty());
                    assert!(gone, "{name} kept its cᵢ after the run: {:?}", walk(&dir));
                }
                return f;
            }
            _ => {}
        }
    }
}

fn restart_name(r: Restart) -> &'static str {
    match r {
        Restart::No => "no restart",
        Restart::Keep => "state kept",
        Restart::WipeControlVariate => "control variate deleted",
    }
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.path().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path().display().to_string());
        }
    }
    out
}

#[tokio::test]
async fn a_restarted_hospital_goes_on_with_its_stored_control_variate() {
    let scaffold = "kind = \"scaffold\"";
    let whole = run(plan("scaffold", scaffold), Restart::No).await;
    let restarted = run(plan("scaffold", scaffold), Restart::Keep).await;
    let wiped = run(plan("scaffold", scaffold), Restart::WipeControlVariate).await;
    println!(
        "final models: uninterrupted {}, restarted {}, restarted without cᵢ {}",
        &whole.final_model_sha256[..12],
        &restarted.final_model_sha256[..12],
        &wiped.final_model_sha256[..12]
    );
    assert_eq!(restarted.final_model_sha256, whole.final_model_sha256, "the restart changed the run");
    assert_ne!(wiped.final_model_sha256, whole.final_model_sha256, "cᵢ made no difference: the check cannot fail");
    let fedavg = run(plan("fedavg", "kind = \"fedavg\""), Restart::No).await;
    let fedprox = run(plan("fedprox", "kind = \"fedprox\"\nmu = 1.0"), Restart::No).await;
    println!(
        "FedAvg {}, FedProx {}, SCAFFOLD {}",
        &fedavg.final_model_sha256[..12],
        &fedprox.final_model_sha256[..12],
        &whole.final_model_sha256[..12]
    );
    assert_ne!(fedprox.final_model_sha256, fedavg.final_model_sha256, "μ did not reach the nodes");
    assert_ne!(whole.final_model_sha256, fedavg.final_model_sha256, "SCAFFOLD trained as FedAvg");
    for f in [&whole, &fedavg, &fedprox] {
        let acc: Vec<f64> = f.final_metrics.iter().filter(|m| m.name == "accuracy").map(|m| m.value).collect();
        println!("accuracy per hospital: {acc:?}");
        assert_eq!(acc.len(), 3);
        assert!(acc.iter().all(|a| *a > 0.5), "{acc:?}");
    }
}
