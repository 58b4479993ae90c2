//! Secure aggregation end to end with real processes over mutual TLS, under the strict-majority
//! threshold (2t > n): one hospital drops after sharing its keys but before its masked input, and
//! another right after sending it. Each round completes; the coordinator's unmasked sum equals the
//! sum of the survivors' quantised inputs, read out of band from what each node wrote before
//! masking; the last round goes on with the two that remain, and every round's threshold in the
//! coordinator's audit log is a strict majority. Out-of-turn messages are refused with a reason.
//!
//! The two dropouts fall in different rounds. The data has four hospitals, so a round of all four
//! has t = 3, and one leaving before its input and one after its input in the same round would
//! leave two signers, which the majority rule rightly refuses. Round 1 (t = 3 of 4) loses a node
//! before its masked input and goes on with 3; round 2 (t = 2 of those 3) loses one after its
//! masked input and goes on with 2 ≥ t. `SANCTUM_FAULT_SECAGG_ROUND` keeps the second node's exit
//! for round 2.

#![allow(clippy::unwrap_used, clippy::panic)] // test helpers: a missing dump or record is a failed test

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use sanctum_protocol::proto::federation_client::FederationClient;
use sanctum_protocol::proto::lead_client::LeadClient;
use sanctum_protocol::proto::{SecAggMessage, plan_event, sec_agg_message};
use sanctum_tests::{Consortium, CoordinatorProcess, NodeProcess, channel, heart_data, next_event, submit_and_watch};

/// The exit status of the `SANCTUM_FAULT_SECAGG_EXIT` hook (node/src/daemon.rs `test_fault`).
const FAULT_EXIT: i32 = 71;

fn words(path: &Path) -> Vec<u32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// The quantised inputs `hospitals` wrote before masking in `round`, summed mod 2³².
fn inputs_summed(dump: &Path, round: u32, hospitals: &[&str]) -> Vec<u32> {
    let mut sum: Option<Vec<u32>> = None;
    for h in hospitals {
        let x = words(&dump.join(format!("{h}-round-{round}.u32")));
        sum = Some(match sum {
            None => x,
            Some(s) => {
                assert_eq!(s.len(), x.len(), "{h}'s round-{round} input has another length");
                s.iter().zip(&x).map(|(a, b)| a.wrapping_add(*b)).collect()
            }
        });
    }
    sum.unwrap()
}

#[tokio::test]
async fn a_round_survives_dropouts_before_and_after_the_masked_input() {
    let c = Consortium::new();
    let dump = tempfile::tempdir().unwrap();
    let dump_dir = dump.path().to_str().unwrap().to_string();
    let coord = CoordinatorProcess::start_with(&c, &[("SANCTUM_TEST_SECAGG_DUMP", &dump_dir)]);
    let addr = coord.address();
    let fault = |h: &str| match h {
        "cleveland" => Some(("before_input", "1")),
        "hungarian" => Some(("after_input", "2")),
        _ => None,
    };
    let mut nodes: BTreeMap<String, NodeProcess> = ["cleveland", "hungarian", "switzerland", "va"]
        .iter()
        .map(|h| {
            let mut env = vec![("SANCTUM_TEST_SECAGG_DUMP", dump_dir.as_str())];
            if let Some((at, round)) = fault(h) {
                env.push(("SANCTUM_FAULT_SECAGG_EXIT", at));
                env.push(("SANCTUM_FAULT_SECAGG_ROUND", round));
            }
            (h.to_string(), NodeProcess::start_with(&c, h, &addr, &heart_data(h), "min_cohort = 2", &env))
        })
        .collect();
    coord.wait_for_nodes(4);
    let mut lead = LeadClient::new(channel(&addr, &c.lead()).await.unwrap());
    // `threshold = 2` is a floor: the coordinator raises it to a majority of each round.
    let plan = "name = \"secagg-dropouts\"\nrounds = 3\nmin_nodes = 2\nround_deadline_secs = 600\n\
                secure_aggregation = true\n[secagg]\nthreshold = 2\nstep_timeout_secs = 120\n\
                [model]\nkind = \"logistic_regression\"\ninputs = 13\n[data]\nschema = \"heart_disease\"\nschema_sha256 = \"39f2b3691b732094488517b366f5bb898ffb1d537dae5f6f2fc1b24c7f225688\"\n\
                [local]\nsteps = 20\nbatch_size = 4\nlearning_rate = 0.01\n[strategy]\nkind = \"fedavg\"\n";
    let (plan_id, mut events) = submit_and_watch(&mut lead, plan).await;
    let (mut opened, mut closed) = (Vec::new(), Vec::new());
    let finished = loop {
        let ev = next_event(&mut events, 240, "the secure-aggregation plan stalled").await;
        match ev.kind {
            Some(plan_event::Kind::RoundOpened(r)) => opened.push(r),
            Some(plan_event::Kind::RoundClosed(r)) => {
                println!("round {}: reported {:?}, dropped {:?}", r.round, r.reported, r.dropped);
                closed.push(r);
            }
            Some(plan_event::Kind::PlanFinished(f)) => break f,
            _ => {}
        }
    };
    let logs = nodes.iter().map(|(n, p)| format!("--- {n}\n{}", p.log_text())).collect::<String>();
    assert!(finished.success, "{}\n{}\n{logs}", finished.reason, coord.log_text());
    assert_eq!(finished.rounds_completed, 3);
    assert_eq!(closed.iter().map(|r| r.round).collect::<Vec<_>>(), [1, 2, 3]);

    // Each hook fired where it was set, and nowhere else: the node exited with the hook's status,
    // at the step and in the round asked for.
    for (h, at, round) in [("cleveland", "before_input", 1), ("hungarian", "after_input", 2)] {
        let node = nodes.get_mut(h).unwrap();
        let status = node.exited(Duration::from_secs(10)).await;
        assert_eq!(status.and_then(|s| s.code()), Some(FAULT_EXIT), "{h} did not leave through the hook\n{logs}");
        let log = node.log_text();
        assert!(log.contains(&format!("SANCTUM_FAULT_SECAGG_EXIT={at} in round {round}: exiting")), "{h}:\n{log}");
        assert_eq!(log.matches("SANCTUM_FAULT_SECAGG_EXIT=").count(), 1, "{h}:\n{log}");
    }

    // Round 1 (4 participants, t = 3): cleveland shared its keys and left before masking; the
    // other three's inputs are the sum.
    assert_eq!(closed[0].reported, ["hungarian", "switzerland", "va"]);
    assert_eq!(closed[0].dropped, ["cleveland"]);
    // Round 2 (3 participants, t = 2): hungarian's masked input is in the sum although it left
    // right after sending it, before the consistency check; two signers remain, which is ≥ t.
    assert_eq!(closed[1].reported, ["hungarian", "switzerland", "va"]);
    assert!(closed[1].dropped.is_empty(), "{:?}", closed[1].dropped);
    // Round 3 goes on with the two that remain (t = 2 of 2).
    assert_eq!(closed[2].reported, ["switzerland", "va"]);
    assert!(closed[2].dropped.is_empty(), "{:?}", closed[2].dropped);

    // Out of band: each unmasked sum is exactly its survivors' quantised inputs summed mod 2³².
    let d = dump.path();
    for (round, survivors) in [
        (1, &["hungarian", "switzerland", "va"][..]),
        (2, &["hungarian", "switzerland", "va"]),
        (3, &["switzerland", "va"]),
    ] {
        let sum = words(&d.join(format!("sum-round-{round}.u32")));
        assert_eq!(sum, inputs_summed(d, round, survivors), "round {round}'s aggregate is not the survivors' sum");
    }
    // Cleveland had encoded its round-1 input before leaving, and the check above tells it apart:
    // with it the sum would differ.
    let with_cleveland = inputs_summed(d, 1, &["cleveland", "hungarian", "switzerland", "va"]);
    assert_ne!(words(&d.join("sum-round-1.u32")), with_cleveland, "cleveland's input would not change the sum");
    for gone in ["cleveland-round-2", "cleveland-round-3", "hungarian-round-3"] {
        assert!(!d.join(format!("{gone}.u32")).exists(), "{gone}: a node that left made another input");
    }

    // The threshold of every round, as the coordinator's audit log records it, is a strict majority
    // of that round's participants (the plan's floor of 2 was raised to 3 of 4), and the audited
    // participants are the ones the lead saw in RoundOpened.
    let audit = c.dir.path().join("coordinator/state/audit/audit.jsonl");
    let rounds: Vec<(Vec<String>, u64)> = sanctum_protocol::audit::read_records(&audit)
        .unwrap()
        .into_iter()
        .filter(|r| r.event == "round_opened" && r.params["plan_id"] == plan_id.as_str())
        .map(|r| {
            let names = r.params["participants"].as_array().unwrap().iter().map(|n| n.as_str().unwrap().to_string());
            (names.collect(), r.params["threshold"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(rounds.iter().map(|(p, t)| (p.len(), *t)).collect::<Vec<_>>(), [(4, 3), (3, 2), (2, 2)]);
    assert_eq!(opened.len(), 3);
    for ((participants, t), event) in rounds.iter().zip(&opened) {
        assert!(2 * *t as usize > participants.len(), "round {}: t = {t} of {}", event.round, participants.len());
        assert_eq!(participants, &event.participants, "round {}", event.round);
    }

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
