//! Bad input gets a clear error that names the cause, and nothing is lost: nodes refuse plans
//! they cannot serve (the lead sees why), bad updates are rejected while the round goes on.

use std::process::Command;

use sanctum_protocol::hash::ContentHash;
use sanctum_protocol::proto::federation_client::FederationClient;
use sanctum_protocol::proto::lead_client::LeadClient;
use sanctum_protocol::proto::{
    PlanResponse, SubmitPlanRequest, SubscribeRequest, UpdateChunk, UpdateHeader, WatchPlanRequest, directive,
    plan_event, update_chunk,
};
use sanctum_protocol::transfer;
use sanctum_tests::{Consortium, CoordinatorProcess, HEART_SCHEMA, NodeProcess, bin, channel, heart_data, next_event};
use tonic::Code;

fn plan(rounds: u32, min_nodes: usize, extra: &str) -> String {
    format!(
        "name = \"bad-input\"\nrounds = {rounds}\nmin_nodes = {min_nodes}\nround_deadline_secs = 60\nrecruit_deadline_secs = 30\n\
         [model]\nkind = \"logistic_regression\"\ninputs = 13\n[data]\nschema = \"heart_disease\"\nschema_sha256 = \"39f2b3691b732094488517b366f5bb898ffb1d537dae5f6f2fc1b24c7f225688\"\nschema_file = {HEART_SCHEMA:?}\n\
         [local]\nsteps = 5\nbatch_size = 4\nlearning_rate = 0.01\n[strategy]\nkind = \"fedavg\"\n{extra}"
    )
}

#[test]
fn nodes_refuse_what_their_data_cannot_serve_and_the_lead_sees_why() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A malformed row (line 3, column 4), a file without the `chol` column, and a missing file.
    let good = std::fs::read_to_string(heart_data("switzerland")).unwrap();
    let mut lines: Vec<String> = good.lines().map(String::from).collect();
    lines[2] = lines[2].replacen(',', "~", 3).replacen('~', ",", 2).replace('~', ",abc,");
    let bad_row: Vec<String> = lines[2].split(',').map(String::from).collect();
    assert_eq!(bad_row[3], "abc", "fixture: {}", lines[2]);
    let mut fixed = lines.clone();
    fixed[2] = {
        let mut cells: Vec<&str> = lines[2].split(',').collect();
        cells.remove(4);
        cells.join(",")
    };
    std::fs::write(d.join("malformed.csv"), fixed.join("\n")).unwrap();
    let no_chol: Vec<String> = good
        .lines()
        .map(|l| {
            let mut c: Vec<&str> = l.split(',').collect();
            c.remove(3);
            c.join(",")
        })
        .collect();
    std::fs::write(d.join("no_chol.csv"), no_chol.join("\n")).unwrap();
    let plan_path = d.join("plan.toml");
    std::fs::write(
        &plan_path,
        plan(
            2,
            2,
            &format!(
                "[simulation]\nhospitals = [\n {{ name = \"cleveland\", data = {:?} }},\n {{ name = \"hungarian\", data = {:?} }},\n \
                 {{ name = \"malformed\", data = \"malformed.csv\" }},\n {{ name = \"schema-mismatch\", data = \"no_chol.csv\" }},\n \
                 {{ name = \"missing\", data = \"nowhere.csv\" }},\n]\n",
                heart_data("cleveland"),
                heart_data("hungarian")
            ),
        ),
    )
    .unwrap();
    let json = d.join("summary.json");
    let out = Command::new(bin("sanctum-coordinator"))
        .args(["simulate", "--device", "cpu", "--plan"])
        .arg(&plan_path)
        .arg("--json")
        .arg(&json)
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the plan goes on with the nodes that accepted");
    assert!(
        stdout.contains("malformed REFUSED the plan:")
            && stdout.contains("rule value-numeric: 'malformed.csv' line 3, column 4 (chol): value is not a number"),
        "malformed row not named"
    );
    assert!(
        stdout.contains("schema-mismatch REFUSED the plan:")
            && stdout.contains("has no column for 'chol', which schema 'heart_disease' requires")
    );
    assert!(
        stdout.contains("missing REFUSED the plan: rule data-file-readable: data file 'nowhere.csv' cannot be read")
    );
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(summary["rounds_completed"], 2);
    let per_node = summary["per_node"].as_object().unwrap();
    assert_eq!(per_node.keys().collect::<Vec<_>>(), ["cleveland", "hungarian"]);
}

fn header(plan_id: &str, round: u32, model: &str, num_params: u64, payload: &[u8]) -> UpdateChunk {
    UpdateChunk {
        part: Some(update_chunk::Part::Header(UpdateHeader {
            plan_id: plan_id.into(),
            round,
            base_model_sha256: model.into(),
            num_params,
            sample_count: 10,
            payload_sha256: ContentHash::of(payload).to_hex(),
            metrics: vec![],
            masked: false,
            offset: 0,
        })),
    }
}

fn data(payload: &[u8]) -> UpdateChunk {
    UpdateChunk { part: Some(update_chunk::Part::Data(payload.to_vec())) }
}

#[tokio::test]
async fn bad_updates_are_rejected_logged_and_the_round_goes_on() {
    let c = Consortium::new();
    let coord = CoordinatorProcess::start(&c);
    let addr = coord.address();
    let mut lead = LeadClient::new(channel(&addr, &c.lead()).await.unwrap());

    // A plan that is not TOML is refused with the reason, and nothing starts.
    let s =
        lead.submit_plan(SubmitPlanRequest { plan_toml: "rounds = [".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("not valid TOML"), "{}", s.message());
    let s = lead.watch_plan(WatchPlanRequest { plan_id: "f00d".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(s.code(), Code::NotFound, "{s:?}");

    let honest: Vec<NodeProcess> =
        ["cleveland", "hungarian"].iter().map(|h| NodeProcess::start(&c, h, &addr, &heart_data(h))).collect();
    let rogue_files = c.member("rogue", "node");
    let mut rogue = FederationClient::new(channel(&addr, &rogue_files).await.unwrap());
    let mut directives = rogue.subscribe(SubscribeRequest::default()).await.unwrap().into_inner();
    coord.wait_for_nodes(3);

    let plan_id = lead
        .submit_plan(SubmitPlanRequest { plan_toml: plan(2, 2, ""), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .plan_id;
    let mut events = lead
        .watch_plan(WatchPlanRequest { plan_id: plan_id.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();

    // The rogue accepts, then sends garbage in round 1.
    let mut rejections = Vec::new();
    while let Some(d) = directives.message().await.unwrap() {
        match d.kind {
            Some(directive::Kind::OfferPlan(o)) => {
                rogue
                    .respond_to_plan(PlanResponse {
                        plan_id: o.plan_id,
                        accept: true,
                        reason: String::new(),
                        privacy: None,
                        run: o.run,
                    })
                    .await
                    .unwrap();
            }
            Some(directive::Kind::StartRound(r)) => {
                let model = r.model_sha256.clone();
                let short = transfer::f32_to_le_bytes(&[0.1, 0.2, 0.3]);
                let mut nan = vec![0.01f32; 14];
                nan[5] = f32::NAN;
                let nan = transfer::f32_to_le_bytes(&nan);
                let attempts = vec![
                    ("wrong shape", vec![header(&plan_id, r.round, &model, 3, &short), data(&short)]),
                    ("NaN", vec![header(&plan_id, r.round, &model, 14, &nan), data(&nan)]),
                    ("no header", vec![data(&nan)]),
                    ("hash mismatch", vec![header(&plan_id, r.round, &model, 14, &short), data(&nan)]),
                ];
                for (what, msgs) in attempts {
                    let s = rogue.submit_update(tokio_stream::iter(msgs)).await.expect_err(what);
                    println!("{what}: {:?} {}", s.code(), s.message());
                    rejections.push((what, s));
                }
                break;
            }
            _ => {}
        }
    }
    // The rogue goes away; the round closes with the two honest hospitals.
    drop(directives);
    drop(rogue);

    let mut rejected_events = Vec::new();
    let finished = loop {
        let ev = next_event(&mut events, 120, "plan stalled").await;
        match ev.kind {
            Some(plan_event::Kind::UpdateRejected(r)) => rejected_events.push(r),
            Some(plan_event::Kind::PlanFinished(f)) => break f,
            _ => {}
        }
    };
    assert!(finished.success, "{}", finished.reason);
    assert_eq!(finished.rounds_completed, 2);
    assert_eq!(finished.final_metrics.iter().filter(|m| m.name == "accuracy").count(), 2);

    let msg = |what: &str| rejections.iter().find(|(w, _)| *w == what).map(|(_, s)| s.message().to_string()).unwrap();
    assert!(msg("wrong shape").contains("update has 3 parameters, the model has 14"));
    assert!(msg("NaN").contains("non-finite value (NaN or infinity) at parameter 5"));
    assert!(msg("no header").contains("first message of an upload must be its header"));
    assert!(
        msg("hash mismatch").contains("ended after 56 of 56 bytes")
            || msg("hash mismatch").contains("payload does not match")
    );
    assert!(rejected_events.iter().filter(|r| r.node == "rogue").count() >= 3, "{rejected_events:?}");
    let log = coord.log_text();
    assert!(log.contains("rejected update"), "{log}");
    for n in &honest {
        assert!(n.log_text().contains("update accepted by the coordinator"), "{}", n.log_text());
    }
}
