//! A hospital's own node certificate sending ids that are not of their form (a path, one hex
//! character too many, upper case, NUL, another charset) in the id fields of SubmitUpdate,
//! Heartbeat, UploadStatus and RespondToPlan, against a real coordinator with a run going on: each
//! call is refused with InvalidArgument naming the field and what was wrong (never echoing the
//! value), nothing of the value reaches the log or the audit log, and the coordinator goes on
//! serving the same node's well-formed calls for the same run.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed step is a failed test

use std::time::Duration;

use sanctum_protocol::proto::federation_client::FederationClient;
use sanctum_protocol::proto::{
    Directive, HeartbeatRequest, PlanResponse, SubscribeRequest, UpdateChunk, UpdateHeader, UploadStatusRequest,
    directive, plan_event, update_chunk,
};
use sanctum_tests::peer::{lead_client, node_client};
use sanctum_tests::{Consortium, CoordinatorProcess, next_event, submit_and_watch};
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};

/// A one-hospital heart-disease plan (the rogue is the only node, so it is offered the run).
const PLAN: &str = "name = \"ids\"\nrounds = 2\nmin_nodes = 1\nround_deadline_secs = 60\nrecruit_deadline_secs = 30\n\
    [model]\nkind = \"logistic_regression\"\ninputs = 13\n[data]\nschema = \"heart_disease\"\n\
    schema_sha256 = \"39f2b3691b732094488517b366f5bb898ffb1d537dae5f6f2fc1b24c7f225688\"\n\
    [local]\nsteps = 5\nbatch_size = 4\nlearning_rate = 0.01\n[strategy]\nkind = \"fedavg\"\n";

/// The next directive of `kind` on the stream (others skipped), within 20 s.
async fn next_directive(directives: &mut Streaming<Directive>, want: &str) -> directive::Kind {
    loop {
        let d = tokio::time::timeout(Duration::from_secs(20), directives.message())
            .await
            .unwrap_or_else(|_| panic!("no {want} within 20 s"))
            .unwrap()
            .unwrap_or_else(|| panic!("the directive stream ended before {want}"));
        let kind = d.kind.unwrap();
        let name = match &kind {
            directive::Kind::OfferPlan(_) => "OfferPlan",
            directive::Kind::StartRound(_) => "StartRound",
            _ => "other",
        };
        if name == want {
            return kind;
        }
    }
}

fn header(plan_id: &str, round: u32) -> UpdateChunk {
    UpdateChunk {
        part: Some(update_chunk::Part::Header(UpdateHeader {
            plan_id: plan_id.into(),
            round,
            base_model_sha256: "00".repeat(32),
            num_params: 14,
            sample_count: 1,
            payload_sha256: "00".repeat(32),
            ..Default::default()
        })),
    }
}

async fn heartbeat(node: &mut FederationClient<Channel>, plan_id: &str, run: &str) -> Result<(), Status> {
    let hb = HeartbeatRequest { plan_id: plan_id.into(), run: run.into(), round: 1, phase: 0 };
    node.heartbeat(hb).await.map(drop)
}

async fn answer(node: &mut FederationClient<Channel>, plan_id: &str, run: &str) -> Result<(), Status> {
    let r = PlanResponse { plan_id: plan_id.into(), run: run.into(), accept: true, ..Default::default() };
    node.respond_to_plan(r).await.map(drop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_wire_ids_are_refused_as_invalid_arguments_and_the_coordinator_keeps_serving() {
    let c = Consortium::new();
    let mut coord = CoordinatorProcess::start(&c);
    let mut node = node_client(&c, &coord, "rogue").await;
    let mut directives = node.clone().subscribe(SubscribeRequest::default()).await.unwrap().into_inner();
    coord.wait_for_nodes(1);
    let mut lead = lead_client(&c, &coord).await;
    let (plan_id, mut events) = submit_and_watch(&mut lead, PLAN).await;
    let directive::Kind::OfferPlan(offer) = next_directive(&mut directives, "OfferPlan").await else { unreachable!() };
    let run = offer.run.clone();
    assert_eq!((run.len(), offer.plan_id.as_str()), (32, plan_id.as_str()));

    const HOSTILE: &str = "../../etc";
    let hex65 = format!("{plan_id}a");
    // Upper case from its first character on, whatever the run's hex digits are.
    let upper_run = format!("A{}", run[1..].to_uppercase());
    let nul_plan = format!("{}\0", &plan_id[..63]);
    // (call, field, what the message must say). The run-id rows are the ones the typed `RunId`
    // adds: before it, any 1 to 128 of [A-Za-z0-9_-] passed and the call was acknowledged.
    let mut outcomes: Vec<(&str, Result<(), Status>, &str, &str)> = Vec::new();
    for (plan, why) in
        [(HOSTILE, "a path character"), (hex65.as_str(), "has 65 bytes"), (&nul_plan, "a control character")]
    {
        let up = node.submit_update(tokio_stream::iter(vec![header(plan, 1)])).await.map(drop);
        outcomes.push(("SubmitUpdate", up, "plan_id", why));
        outcomes.push(("Heartbeat", heartbeat(&mut node, plan, &run).await, "plan_id", why));
        let status = UploadStatusRequest { plan_id: plan.into(), round: 1, payload_sha256: "00".repeat(32) };
        outcomes.push(("UploadStatus", node.upload_status(status).await.map(drop), "plan_id", why));
        outcomes.push(("RespondToPlan", answer(&mut node, plan, &run).await, "plan_id", why));
    }
    for (bad_run, why) in [
        (HOSTILE, "a path character"),
        (upper_run.as_str(), "an upper-case letter"),
        ("run_2-a", "a character the form does not allow"),
        (&hex65[..33], "has 33 bytes"),
    ] {
        outcomes.push(("Heartbeat", heartbeat(&mut node, &plan_id, bad_run).await, "run", why));
        outcomes.push(("RespondToPlan", answer(&mut node, &plan_id, bad_run).await, "run", why));
    }
    for (call, result, field, why) in &outcomes {
        let e = result.as_ref().expect_err(&format!("{call} with a malformed {field} was accepted"));
        println!("{call:<13} {field:<7} {:?}: {}", e.code(), e.message());
        assert_eq!(e.code(), Code::InvalidArgument, "{call} {field}: {e:?}");
        assert!(e.message().starts_with(&format!("{field}: ")), "{call}: the field is named: {}", e.message());
        assert!(e.message().contains(why), "{call} {field}: says what was wrong ({why}): {}", e.message());
        assert!(!e.message().contains(HOSTILE) && !e.message().contains(&upper_run), "{call}: value echoed");
    }
    println!("{} hostile calls refused", outcomes.len());

    // The coordinator goes on serving: the same node's well-formed answer for the run counts,
    // round 1 opens, and its heartbeat for it is taken.
    answer(&mut node, &plan_id, &run).await.expect("a well-formed answer is taken");
    let decided = loop {
        match next_event(&mut events, 20, "the node's decision was not published").await.kind {
            Some(plan_event::Kind::NodeDecision(d)) => break d,
            _ => continue,
        }
    };
    assert_eq!((decided.node.as_str(), decided.accepted), ("rogue", true));
    let directive::Kind::StartRound(start) = next_directive(&mut directives, "StartRound").await else {
        unreachable!()
    };
    assert_eq!((start.round, start.run.as_str()), (1, run.as_str()));
    heartbeat(&mut node, &plan_id, &run).await.expect("a well-formed heartbeat is taken");
    assert!(coord.alive(), "the coordinator is still running");

    // Nothing of the hostile values reached the log or the audit log.
    let log = coord.log_text();
    assert!(!log.contains(HOSTILE) && !log.contains(&upper_run) && !log.contains(&hex65), "a hostile id was logged");
    let audit = std::fs::read_to_string(coord.state_dir().join("audit/audit.jsonl")).unwrap();
    assert!(
        !audit.contains(HOSTILE) && !audit.contains(&upper_run) && !audit.contains(&hex65),
        "a hostile id was audited"
    );
}
