//! Secure aggregation end to end with real processes over mutual TLS: one hospital drops after
//! sharing its keys but before its masked input, another right after sending it. The round still
//! completes; the coordinator's unmasked sum equals the sum of the survivors' quantised inputs,
//! read out of band from what each node wrote before masking; the next round goes on with the
//! two that remain. Out-of-turn or malformed messages are refused with a reason.

#![allow(clippy::unwrap_used)] // a test helper: a missing dump is a failed test

use std::collections::BTreeMap;
use std::path::Path;

use sanctum_protocol::proto::federation_client::FederationClient;
use sanctum_protocol::proto::lead_client::LeadClient;
use sanctum_protocol::proto::{SecAggMessage, SubmitPlanRequest, WatchPlanRequest, plan_event, sec_agg_message};
use sanctum_tests::{Consortium, CoordinatorProcess, NodeProcess, channel, heart_data, next_event};

fn words(path: &Path) -> Vec<u32> {
    let bytes = std::fs::read(path).unwrap();
    bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

#[tokio::test]
async fn a_round_survives_dropouts_before_and_after_the_masked_input() {
    let c = Consortium::new();
    let dump = tempfile::tempdir().unwrap();
    let dump_dir = dump.path().to_str().unwrap().to_string();
    let coord = CoordinatorProcess::start_with(&c, &[("SANCTUM_TEST_SECAGG_DUMP", &dump_dir)]);
    let addr = coord.address();
    let fault = |h: &str| match h {
        "cleveland" => Some("before_input"),
        "hungarian" => Some("after_input"),
        _ => None,
    };
    let nodes: BTreeMap<String, NodeProcess> = ["cleveland", "hungarian", "switzerland", "va"]
        .iter()
        .map(|h| {
            let mut env = vec![("SANCTUM_TEST_SECAGG_DUMP", dump_dir.as_str())];
            if let Some(at) = fault(h) {
                env.push(("SANCTUM_FAULT_SECAGG_EXIT", at));
            }
            (h.to_string(), NodeProcess::start_with(&c, h, &addr, &heart_data(h), "min_cohort = 2", &env))
        })
        .collect();
    coord.wait_for_nodes(4);
    let mut lead = LeadClient::new(channel(&addr, &c.lead()).await.unwrap());
    let plan = "name = \"secagg-dropouts\"\nrounds = 2\nmin_nodes = 2\nround_deadline_secs = 600\n\
                secure_aggregation = true\n[secagg]\nthreshold = 2\nstep_timeout_secs = 120\n\
                [model]\nkind = \"logistic_regression\"\ninputs = 13\n[data]\nschema = \"heart_disease\"\n\
                [local]\nsteps = 20\nbatch_size = 4\nlearning_rate = 0.01\n[strategy]\nkind = \"fedavg\"\n";
    let plan_id = lead.submit_plan(SubmitPlanRequest { plan_toml: plan.into() }).await.unwrap().into_inner().plan_id;
    let mut events = lead.watch_plan(WatchPlanRequest { plan_id: plan_id.clone() }).await.unwrap().into_inner();
    let mut closed = Vec::new();
    let finished = loop {
        let ev = next_event(&mut events, 240, "the secure-aggregation plan stalled").await;
        match ev.kind {
            Some(plan_event::Kind::RoundClosed(r)) => {
                println!("round {}: reported {:?}, dropped {:?}", r.round, r.reported, r.dropped);
                closed.push(r);
            }
            Some(plan_event::Kind::PlanFinished(f)) => break f,
            _ => {}
        }
    };
    let logs = || nodes.iter().map(|(n, p)| format!("--- {n}\n{}", p.log_text())).collect::<String>();
    assert!(finished.success, "{}\n{}\n{}", finished.reason, coord.log_text(), logs());
    assert_eq!(finished.rounds_completed, 2);
    // Round 1: cleveland shared its keys and left before masking; hungarian's masked input is in
    // the sum although it left right after sending it.
    assert_eq!(closed[0].reported, ["hungarian", "switzerland", "va"]);
    assert_eq!(closed[0].dropped, ["cleveland"]);
    assert!(nodes["cleveland"].log_text().contains("SANCTUM_FAULT_SECAGG_EXIT=before_input"));
    assert!(nodes["hungarian"].log_text().contains("SANCTUM_FAULT_SECAGG_EXIT=after_input"));
    // Out of band: the unmasked sum is exactly the survivors' quantised inputs summed mod 2³².
    let sum = words(&dump.path().join("sum-round-1.u32"));
    let mut want = vec![0u32; sum.len()];
    for h in ["hungarian", "switzerland", "va"] {
        for (w, x) in want.iter_mut().zip(words(&dump.path().join(format!("{h}-round-1.u32")))) {
            *w = w.wrapping_add(x);
        }
    }
    assert_eq!(sum, want, "the aggregate is not the survivors' sum");
    assert!(dump.path().join("cleveland-round-1.u32").exists(), "cleveland had encoded its input before leaving");
    // Round 2 goes on with the two that remain.
    assert_eq!(closed[1].reported, ["switzerland", "va"]);

    // A node's secure-aggregation message outside any round is refused with the reason.
    let files = c.member("va-prime", "node");
    let mut node = FederationClient::new(channel(&addr, &files).await.unwrap());
    let err = node
        .sec_agg(SecAggMessage {
            plan_id,
            round: 1,
            step: Some(sec_agg_message::Step::ConsistencySignature(vec![1, 2, 3])),
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("no plan is running"), "{}", err.message());
}
