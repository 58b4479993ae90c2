//! Transfers resume from the last acknowledged chunk. A node killed (by its fault hook) once 60 %
//! of its round-1 upload is acknowledged is restarted without the hook: it asks `UploadStatus`
//! where to resume, the coordinator logs the offset, and only the rest leaves the node; the round
//! completes with its update admitted, released and charged once. Model downloads resume at any
//! byte: a second participant, driven by this test, fetches the round's model whole and then from
//! an offset, and is refused past the end.
//!
//! The second participant is a test-driven node (a real node certificate) so that the round
//! stays open, deterministically, until the restarted node has resumed: it uploads only when the
//! test lets it. Needs the `fault-injection` builds of both binaries.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed step is a failed test

use std::time::Duration;

use sanctum_protocol::hash::ContentHash;
use sanctum_protocol::proto::{
    Directive, EvaluationReport, FetchModelRequest, PlanResponse, SubscribeRequest, UpdateChunk, UpdateHeader,
    directive, federation_client::FederationClient, plan_event, update_chunk,
};
use sanctum_protocol::transfer::{self, CHUNK_BYTES};
use sanctum_tests::peer::{lead_client, node_client};
use sanctum_tests::{
    Consortium, CoordinatorProcess, HEART_SCHEMA, HEART_SCHEMA_SHA256, NodeProcess, heart_data, next_event,
    submit_and_watch, wait_until,
};
use tokio::sync::oneshot;
use tonic::transport::Channel;

/// 13 → 2048 → 1024 → 1: 2,127,873 parameters, an update of 8,511,492 bytes (9 chunks of 1 MiB).
const HIDDEN: (usize, usize) = (2048, 1024);
const PARAMS: usize = 13 * HIDDEN.0 + HIDDEN.0 + HIDDEN.0 * HIDDEN.1 + HIDDEN.1 + HIDDEN.1 + 1;

fn plan() -> String {
    format!(
        "name = \"resume-transfer\"\nrounds = 1\nmin_nodes = 2\nrecruit_deadline_secs = 60\nround_deadline_secs = 600\n\
         [model]\nkind = \"mlp\"\ninputs = 13\nhidden = [{}, {}]\n\
         [data]\nschema = \"heart_disease\"\nschema_sha256 = \"{HEART_SCHEMA_SHA256}\"\n\
         [local]\nsteps = 2\nbatch_size = 4\nlearning_rate = 0.001\n[strategy]\nkind = \"fedavg\"\n\
         [privacy]\nmode = \"example\"\nnoise_multiplier = 1.0\nclip_norm = 1.0\ndelta = 1e-5\n",
        HIDDEN.0, HIDDEN.1
    )
}

/// What the test-driven participant saw of the round's model download.
struct Fetched {
    total: u64,
    offset: u64,
    tail_matches: bool,
    past_end: tonic::Code,
}

async fn fetch_from(
    client: &mut FederationClient<Channel>,
    sha256: &str,
    offset: u64,
) -> Result<Vec<u8>, tonic::Status> {
    let mut stream = client.fetch_model(FetchModelRequest { sha256: sha256.into(), offset }).await?.into_inner();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.message().await? {
        assert_eq!(chunk.offset, offset + bytes.len() as u64, "chunks start where asked and follow on");
        bytes.extend_from_slice(&chunk.data);
    }
    Ok(bytes)
}

/// The second participant: accepts the plan; on its round, fetches the model whole and from an
/// offset (reported on `fetched`), then uploads a zero update only once `go` fires; declines the
/// evaluation.
async fn gated_participant(
    mut client: FederationClient<Channel>,
    fetched: oneshot::Sender<Fetched>,
    go: oneshot::Receiver<()>,
) {
    let mut directives = client
        .subscribe(SubscribeRequest { software_version: "test".into(), device: "cpu".into() })
        .await
        .expect("subscribe")
        .into_inner();
    let (mut fetched, mut go) = (Some(fetched), Some(go));
    while let Ok(Some(Directive { kind: Some(kind) })) = directives.message().await {
        match kind {
            directive::Kind::OfferPlan(o) => {
                let accept =
                    PlanResponse { plan_id: o.plan_id, accept: true, reason: String::new(), privacy: None, run: o.run };
                client.respond_to_plan(accept).await.expect("accept");
            }
            directive::Kind::StartRound(r) => {
                let whole = fetch_from(&mut client, &r.model_sha256, 0).await.expect("the model");
                let total = whole.len() as u64;
                assert_eq!(total, r.model_bytes);
                // Any byte offset: here one inside a download chunk.
                let offset = total / 2 + 3;
                let tail = fetch_from(&mut client, &r.model_sha256, offset).await.expect("the rest of the model");
                let past_end = fetch_from(&mut client, &r.model_sha256, total + 1).await.err().map(|s| s.code());
                if let Some(tx) = fetched.take() {
                    let tail_matches = tail == whole[offset as usize..];
                    let _ =
                        tx.send(Fetched { total, offset, tail_matches, past_end: past_end.unwrap_or(tonic::Code::Ok) });
                }
                if let Some(rx) = go.take() {
                    let _ = rx.await;
                }
                let payload = transfer::f32_to_le_bytes(&vec![0.0; PARAMS]);
                let header = UpdateHeader {
                    plan_id: r.plan_id.clone(),
                    round: r.round,
                    base_model_sha256: r.model_sha256.clone(),
                    num_params: PARAMS as u64,
                    sample_count: 100,
                    payload_sha256: ContentHash::of(&payload).to_hex(),
                    metrics: vec![],
                    masked: false,
                    offset: 0,
                };
                let mut msgs = vec![UpdateChunk { part: Some(update_chunk::Part::Header(header)) }];
                msgs.extend(
                    transfer::chunks(&payload)
                        .map(|(_, c)| UpdateChunk { part: Some(update_chunk::Part::Data(c.to_vec())) }),
                );
                client.submit_update(tokio_stream::iter(msgs)).await.expect("the gated update is admitted");
            }
            directive::Kind::Evaluate(e) => {
                let report = EvaluationReport { plan_id: e.plan_id, model_sha256: e.model_sha256, metrics: vec![] };
                let _ = client.report_evaluation(report).await;
            }
            _ => {}
        }
    }
}

/// `resuming upload from NODE for round R at offset X of Y bytes` → (X, Y).
fn resumed_offset(log: &str, node: &str) -> Option<(u64, u64)> {
    let marker = format!("resuming upload from {node} for round 1 at offset ");
    let line = log.lines().find(|l| l.contains(&marker))?;
    let rest = &line[line.find(&marker)? + marker.len()..];
    let mut words = rest.split_whitespace();
    let x = words.next()?.parse().ok()?;
    let _of = words.next()?;
    let y = words.next()?.parse().ok()?;
    Some((x, y))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upload_cut_at_60_percent_resumes_after_a_restart_from_the_last_acknowledged_chunk() {
    let c = Consortium::new();
    let coord = CoordinatorProcess::start(&c);
    let addr = coord.address();
    let datasets = format!("[[datasets]]\nschema = {HEART_SCHEMA:?}\npath = {:?}\n", heart_data("cleveland"));
    let policy = "allowed_models = [\"mlp\"]\nmax_epsilon = 10.0\n";
    let mut cut = NodeProcess::start_with_datasets_env(
        &c,
        "cleveland",
        &addr,
        &datasets,
        policy,
        &[("SANCTUM_FAULT_UPLOAD_EXIT_AT_PERCENT", "60")],
    );
    let (fetched_tx, fetched_rx) = oneshot::channel();
    let (go_tx, go_rx) = oneshot::channel();
    let gated = tokio::spawn(gated_participant(node_client(&c, &coord, "gated").await, fetched_tx, go_rx));
    tokio::task::block_in_place(|| coord.wait_for_nodes(2));

    let mut lead = lead_client(&c, &coord).await;
    let (plan_id, mut events) = submit_and_watch(&mut lead, plan()).await;

    // The download: whole, then from an offset inside a chunk, and refused past the end.
    let fetched = tokio::time::timeout(Duration::from_secs(120), fetched_rx).await.expect("round 1 opens").unwrap();
    println!(
        "model download: {} bytes; resumed at offset {} gave the same {} bytes; offset {} refused with {:?}",
        fetched.total,
        fetched.offset,
        fetched.total - fetched.offset,
        fetched.total + 1,
        fetched.past_end
    );
    assert!(fetched.tail_matches, "a download from an offset is the model's tail");
    assert_eq!(fetched.past_end, tonic::Code::OutOfRange);

    // The hook ends the node once 60 % of its round-1 upload is acknowledged.
    let status = cut.exited(Duration::from_secs(300)).await.expect("the node exits at its upload's 60 %");
    assert_eq!(status.code(), Some(71), "{}", cut.log_text());
    let partial_dir = coord.state_dir().join("partial");
    let partials = std::fs::read_dir(&partial_dir).map(|d| d.count()).unwrap_or(0);
    assert_eq!(partials, 1, "the coordinator keeps the partial upload");
    let egress_before = cut.egress();
    let ledger_before = cut.ledger();

    cut.restart();
    let resumed = tokio::task::block_in_place(|| {
        wait_until(Duration::from_secs(180), || resumed_offset(&coord.log_text(), "cleveland").is_some())
    });
    assert!(resumed, "the coordinator never logged a resumed upload:\n{}", coord.log_text());
    let (offset, total) = resumed_offset(&coord.log_text(), "cleveland").unwrap_or_default();
    println!(
        "resumed upload: offset {offset} of {total} bytes ({:.1} %, {} of {} chunks)",
        100.0 * offset as f64 / total as f64,
        offset / CHUNK_BYTES as u64,
        (total as usize).div_ceil(CHUNK_BYTES)
    );
    assert_eq!(total, PARAMS as u64 * 4);
    assert!(offset > 0 && offset < total);
    assert!(offset * 2 >= total, "at least half was acknowledged before the cut");
    assert!(offset * 100 >= total * 60, "the cut came once 60 % was acknowledged");
    assert_eq!(offset % CHUNK_BYTES as u64, 0, "the offset is a chunk boundary");

    // Only now may the second participant report: the round was held open for the resume.
    let _ = go_tx.send(());
    let finished = loop {
        let ev = next_event(&mut events, 300, "the plan stalled").await;
        if let Some(plan_event::Kind::PlanFinished(f)) = ev.kind {
            break f;
        }
    };
    assert!(finished.success, "{}", finished.reason);
    assert_eq!(finished.rounds_completed, 1);

    // The coordinator admitted the resumed update once, and holds no partial upload any more.
    let received: Vec<_> = coord
        .audit_records()
        .into_iter()
        .filter(|r| r.event == "update_received" && r.params["node"] == "cleveland")
        .collect();
    assert_eq!(received.len(), 1, "{received:?}");
    assert_eq!(received[0].params["round"], 1);
    assert_eq!(received[0].params["bytes"], total);
    assert!(
        wait_until(Duration::from_secs(10), || std::fs::read_dir(&partial_dir).map(|d| d.count()).unwrap_or(0) == 0)
    );

    // What left the node: one release of round 1 (the cut one, recorded in full before it left),
    // then the resume, recorded with its offset and only the bytes it sent.
    let egress = cut.egress();
    let uploads: Vec<_> = egress.iter().filter(|e| e.call == "SubmitUpdate" && e.plan_id == plan_id).collect();
    for u in &uploads {
        println!("egress: {} round {:?} {} bytes offset {} ({})", u.call, u.round, u.bytes, u.raw["offset"], u.rule);
    }
    assert_eq!(uploads.iter().filter(|u| u.is_release()).count(), 1, "released once");
    assert_eq!(uploads.len(), 2);
    let resend = uploads[1];
    assert!(resend.is_resend());
    assert_eq!(resend.raw["offset"], offset);
    assert!(resend.bytes < (total - offset) + 1024 && resend.bytes >= total - offset, "{}", resend.bytes);
    assert!(uploads[0].bytes >= total);
    assert!(egress.iter().any(|e| e.call == "UploadStatus"), "the node asked where to resume");
    assert_eq!(egress_before.iter().filter(|e| e.call == "SubmitUpdate").count(), 1);
    // Charged once: the charge made before the cut is the only one.
    let charges: Vec<_> = cut.ledger().into_iter().filter(|l| l.plan_id == plan_id).collect();
    assert_eq!(charges.len(), 1, "charged once");
    assert_eq!(ledger_before.len(), 1);
    assert!(cut.log_text().contains("resuming upload at offset"));
    gated.abort();
}
