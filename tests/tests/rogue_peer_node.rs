//! A hospital's own node certificate, used against a real coordinator: strings it chooses are
//! bounded before they reach memory, the audit log or the log; model downloads stream from disk
//! and are limited per node; uploads are refused before spooling when they cannot count, and an
//! idle one is dropped with its spool; no claimed sample count outweighs the plan's
//! `max_samples`; a global model that is no longer finite fails the round with the reason.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed step is a failed test

use std::time::{Duration, Instant};

use sanctum_protocol::hash::ContentHash;
use sanctum_protocol::model::Weights;
use sanctum_protocol::plan::Plan;
use sanctum_protocol::proto::federation_client::FederationClient;
use sanctum_protocol::proto::{
    EvaluationReport, FetchModelRequest, PlanFinished, PlanResponse, RoundClosed, SecAggMessage, SubscribeRequest,
    UpdateChunk, UpdateHeader, directive, plan_event, update_chunk,
};
use sanctum_protocol::transfer;
use sanctum_tests::peer::lead_client;
use sanctum_tests::scripted::{client, data, header, scripted_node, subscribed};
use sanctum_tests::{Consortium, CoordinatorProcess, NodeProcess, heart_data, next_event, submit_and_watch};
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

const MIB: u64 = 1 << 20;

/// A heart-disease plan with `model` (TOML lines of `[model]`) and `extra` top-level lines.
fn plan(name: &str, rounds: u32, min_nodes: usize, model: &str, extra: &str) -> String {
    format!(
        "name = \"{name}\"\nrounds = {rounds}\nmin_nodes = {min_nodes}\nround_deadline_secs = 60\nrecruit_deadline_secs = 30\n{extra}\
         [model]\n{model}\n[data]\nschema = \"heart_disease\"\nschema_sha256 = \"39f2b3691b732094488517b366f5bb898ffb1d537dae5f6f2fc1b24c7f225688\"\n\
         [local]\nsteps = 5\nbatch_size = 4\nlearning_rate = 0.01\n[strategy]\nkind = \"fedavg\"\n"
    )
}

const LOGISTIC: &str = "kind = \"logistic_regression\"\ninputs = 13";

fn file_len(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

fn audit_len(coord: &CoordinatorProcess) -> u64 {
    file_len(&coord.state_dir().join("audit/audit.jsonl"))
}

/// Downloads a stored model and decodes it with `plan`'s layout.
async fn fetch_weights(client: &mut FederationClient<Channel>, hash: &str, plan: &Plan) -> Vec<f32> {
    let mut stream =
        client.fetch_model(FetchModelRequest { sha256: hash.into(), offset: 0 }).await.unwrap().into_inner();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        assert_eq!(chunk.offset, bytes.len() as u64);
        bytes.extend_from_slice(&chunk.data);
    }
    assert_eq!(ContentHash::of(&bytes).to_hex(), hash);
    Weights::from_safetensors(&bytes, &plan.model.layout()).unwrap().values().to_vec()
}

/// The run's round closings and its end, from its watch stream.
async fn follow(events: &mut Streaming<sanctum_protocol::proto::PlanEvent>) -> (Vec<RoundClosed>, PlanFinished) {
    let mut closed = Vec::new();
    loop {
        match next_event(events, 180, "the plan stalled").await.kind {
            Some(plan_event::Kind::RoundClosed(r)) => closed.push(r),
            Some(plan_event::Kind::PlanFinished(f)) => return (closed, f),
            _ => {}
        }
    }
}

#[tokio::test]
async fn a_hundred_plan_ids_of_two_mib_each_leave_the_coordinators_memory_and_logs_bounded() {
    let c = Consortium::new();
    let coord = CoordinatorProcess::start(&c);
    let files = c.member("rogue", "node");
    let mut rogue = client(&coord, &files).await;
    // One call first, so the connection and the handlers' first allocations are in the baseline.
    let _ = rogue.report_evaluation(EvaluationReport::default()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (rss0, audit0, log0) = (coord.rss_kib(), audit_len(&coord), file_len(&coord.log));

    // 2 MiB less 1 KiB, so every message still fits the federation service's 2 MiB decoding limit
    // and reaches a handler (a larger one is refused by gRPC before any of our code runs).
    let id_bytes = (2 * MIB - 1024) as usize;
    let mut outcomes: Vec<(&str, Code, usize)> = Vec::new();
    for i in 0..100usize {
        // Each id different, not hex ('z'), and of 2 MiB.
        let id = format!("{i:03}{}", "z".repeat(id_bytes - 3));
        let kind = ["RespondToPlan", "SubmitUpdate", "ReportEvaluation", "SecAgg", "FetchModel", "Subscribe"][i % 6];
        let result: Result<(), tonic::Status> = match kind {
            "RespondToPlan" => rogue
                .respond_to_plan(PlanResponse {
                    plan_id: id,
                    accept: false,
                    reason: "no".into(),
                    privacy: None,
                    run: "r".into(),
                })
                .await
                .map(drop),
            "SubmitUpdate" => {
                let h = UpdateChunk {
                    part: Some(update_chunk::Part::Header(UpdateHeader {
                        plan_id: id,
                        round: 1,
                        num_params: 1,
                        sample_count: 1,
                        ..Default::default()
                    })),
                };
                rogue.submit_update(tokio_stream::iter(vec![h, data(&[0; 4])])).await.map(drop)
            }
            "ReportEvaluation" => rogue
                .report_evaluation(EvaluationReport { plan_id: id, model_sha256: "00".repeat(32), metrics: vec![] })
                .await
                .map(drop),
            "SecAgg" => rogue.sec_agg(SecAggMessage { plan_id: id, round: 1, step: None }).await.map(drop),
            "FetchModel" => rogue.fetch_model(FetchModelRequest { sha256: id, offset: 0 }).await.map(drop),
            // Free text, not a name: cut, never refused (the node still connects).
            _ => rogue
                .subscribe(SubscribeRequest {
                    device: id[..id_bytes / 2].into(),
                    software_version: id[id_bytes / 2..].into(),
                })
                .await
                .map(drop),
        };
        let (code, msg_len) = match &result {
            Ok(()) => (Code::Ok, 0),
            Err(s) => (s.code(), s.message().len()),
        };
        outcomes.push((kind, code, msg_len));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss1, audit1, log1) = (coord.rss_kib(), audit_len(&coord), file_len(&coord.log));
    let rss_growth_mib = rss1.saturating_sub(rss0) as f64 / 1024.0;
    let audit_growth = audit1.saturating_sub(audit0);
    let log_growth = log1.saturating_sub(log0);
    println!(
        "100 calls with 2 MiB ids: RSS {rss0} → {rss1} KiB (+{rss_growth_mib:.1} MiB); audit log +{audit_growth} bytes; coordinator log +{log_growth} bytes"
    );
    assert!(rss_growth_mib < 64.0, "RSS grew by {rss_growth_mib:.1} MiB (bound 64 MiB)");
    assert!(audit_growth < MIB, "audit log grew by {audit_growth} bytes (bound 1 MiB)");
    assert!(log_growth < MIB, "coordinator log grew by {log_growth} bytes (bound 1 MiB)");
    for kind in ["RespondToPlan", "SubmitUpdate", "ReportEvaluation", "SecAgg", "FetchModel", "Subscribe"] {
        let of: Vec<_> = outcomes.iter().filter(|o| o.0 == kind).collect();
        println!(
            "  {kind}: {} calls, codes {:?}",
            of.len(),
            of.iter().map(|o| format!("{:?}", o.1)).collect::<std::collections::BTreeSet<_>>()
        );
        let want = if kind == "Subscribe" { Code::Ok } else { Code::InvalidArgument };
        assert!(of.iter().all(|o| o.1 == want), "{kind}: {of:?}");
        assert!(of.iter().all(|o| o.2 < 1024), "{kind}: a refusal never echoes the id: {of:?}");
    }
    let largest = coord.audit_records().iter().map(|r| serde_json::to_string(&r.params).unwrap().len()).max();
    println!("largest audit record: {largest:?} bytes of parameters");
    assert!(largest.unwrap_or(0) < 4096, "no audit record holds a node's long string");
}

#[tokio::test]
async fn two_hundred_fetch_model_streams_that_never_read_hold_bounded_memory() {
    // A 1,016,001-parameter MLP: its model file is 3.9 MiB. Stored when the plan is submitted, so
    // its hash is known from the plan itself (no node needs to join for the model to exist).
    let model = "kind = \"mlp\"\ninputs = 13\nhidden = [1000, 1000]";
    let toml = plan("fetch-flood", 1, 1, model, "");
    let parsed = Plan::parse(&toml).unwrap();
    let bytes = parsed.model.init(parsed.seed).to_safetensors().unwrap();
    let hash = ContentHash::of(&bytes).to_hex();
    println!("model {} of {} bytes", &hash[..12], bytes.len());

    for (limits, per_node) in [("", 4usize), ("[limits]\nfetch_streams_per_node = 1000\n", 1000)] {
        let c = Consortium::new();
        let coord = CoordinatorProcess::start_configured(&c, limits, &[]);
        let mut lead = lead_client(&c, &coord).await;
        let (_plan_id, _events) = submit_and_watch(&mut lead, toml.clone()).await;
        let files = c.member("rogue", "node");
        // Four connections of one node: a connection's own stream limit never decides this test.
        let mut clients = Vec::new();
        for _ in 0..4 {
            clients.push(client(&coord, &files).await);
        }
        let mut reader = client(&coord, &files).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let rss0 = coord.rss_kib();
        let calls = (0..200).map(|i| {
            let mut cl = clients[i % clients.len()].clone();
            let hash = hash.clone();
            tokio::spawn(async move { cl.fetch_model(FetchModelRequest { sha256: hash, offset: 0 }).await })
        });
        let mut open = Vec::new();
        let mut refused = Vec::new();
        for call in calls.collect::<Vec<_>>() {
            match call.await.unwrap() {
                Ok(stream) => open.push(stream.into_inner()),
                Err(s) => refused.push(s),
            }
        }
        // Give the server every chance to fill what it would buffer for streams nobody reads.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss1 = coord.rss_kib();
        let growth_mib = rss1.saturating_sub(rss0) as f64 / 1024.0;
        println!(
            "fetch_streams_per_node = {per_node}: {} streams open and unread, {} refused; RSS {rss0} → {rss1} KiB (+{growth_mib:.1} MiB; 200 whole models would be {} MiB)",
            open.len(),
            refused.len(),
            200 * bytes.len() as u64 / MIB
        );
        let expect_open = per_node.min(200);
        assert_eq!(open.len(), expect_open, "{:?}", refused.first());
        for s in &refused {
            assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
            assert!(s.message().contains("fetch_streams_per_node = 4"), "the limit is named: {}", s.message());
        }
        assert!(growth_mib < 64.0, "RSS grew by {growth_mib:.1} MiB with {} unread streams (bound 64 MiB)", open.len());
        // Streams dropped give their place back, and a download read as it comes delivers the
        // whole model, in order, from the file. (On a connection of its own: the unread streams
        // hold their connections' HTTP/2 windows, which would starve a reader sharing one.)
        drop(open);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut stream =
            reader.fetch_model(FetchModelRequest { sha256: hash.clone(), offset: 0 }).await.unwrap().into_inner();
        let mut got = Vec::new();
        while let Some(chunk) = stream.message().await.unwrap() {
            assert!(chunk.data.len() <= transfer::CHUNK_BYTES && chunk.total_bytes == bytes.len() as u64);
            assert_eq!(chunk.offset, got.len() as u64);
            got.extend_from_slice(&chunk.data);
        }
        assert_eq!(ContentHash::of(&got).to_hex(), hash);
    }
}

#[tokio::test]
async fn two_hundred_uploads_that_stop_four_bytes_short_free_their_spool() {
    let c = Consortium::new();
    // A 1 s audit-quota period: the 199 duplicates' rejections spend the node's allowance at once,
    // and the idle upload's rejection (2 s later) is in the next period, so it is itemised.
    let coord = CoordinatorProcess::start_configured(
        &c,
        "[limits]\nupload_idle_timeout_secs = 2\nrefusal_report_secs = 1\n",
        &[],
    );
    let addr = coord.address();
    let honest: Vec<NodeProcess> =
        ["cleveland", "hungarian"].iter().map(|h| NodeProcess::start(&c, h, &addr, &heart_data(h))).collect();
    let files = c.member("rogue", "node");
    let mut rogue = client(&coord, &files).await;
    let mut directives = rogue.subscribe(SubscribeRequest::default()).await.unwrap().into_inner();
    coord.wait_for_nodes(3);
    let mut lead = lead_client(&c, &coord).await;
    let (plan_id, mut events) = submit_and_watch(&mut lead, plan("stall", 1, 2, LOGISTIC, "")).await;

    let start = loop {
        match directives.message().await.unwrap().and_then(|d| d.kind) {
            Some(directive::Kind::OfferPlan(o)) => {
                let accept =
                    PlanResponse { plan_id: o.plan_id, accept: true, reason: String::new(), privacy: None, run: o.run };
                rogue.respond_to_plan(accept).await.unwrap();
            }
            Some(directive::Kind::StartRound(s)) => break s,
            _ => {}
        }
    };
    // The spool and the partial uploads kept for resuming, sampled every 10 ms from now until the
    // attack is over.
    let spool_dir = coord.state_dir().join("spool");
    let partial_dir = coord.state_dir().join("partial");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut most = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // Files only: the spool's `robust/` directory holds no upload.
                let count = |d: &std::path::Path| {
                    std::fs::read_dir(d).map(|d| d.flatten().filter(|e| e.path().is_file()).count()).unwrap_or(0)
                };
                most = most.max(count(&spool_dir) + count(&partial_dir));
                std::thread::sleep(Duration::from_millis(10));
            }
            most
        })
    };
    // 14 parameters = 56 bytes; each upload sends the header and 52 of them, then stalls.
    let payload = transfer::f32_to_le_bytes(&[0.01f32; 14]);
    // First 50 uploads that send their header and end: each is refused for its length, and none
    // costs the coordinator a partial file (opened, with its fsyncs, only once data arrives).
    for _ in 0..50 {
        let r = rogue.clone().submit_update(tokio_stream::iter(vec![header(&plan_id, &start, &payload, 14, 10)])).await;
        let s = r.expect_err("an upload of no data is refused");
        assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
        assert!(s.message().contains("ended after 0 of 56 bytes"), "{}", s.message());
    }
    // Nor do uploads of a header and an empty data chunk: refused before anything is opened.
    for _ in 0..20 {
        let msgs = vec![header(&plan_id, &start, &payload, 14, 10), data(&[])];
        let s = rogue.clone().submit_update(tokio_stream::iter(msgs)).await.expect_err("an empty chunk is refused");
        assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
        assert!(s.message().contains("data chunk of 0 bytes"), "{}", s.message());
    }
    assert_eq!(coord.partial_files(), 0, "a header-only upload left a partial file");
    let started = Instant::now();
    let uploads: Vec<_> = (0..200)
        .map(|_| {
            let mut cl = rogue.clone();
            let msgs = vec![header(&plan_id, &start, &payload, 14, 10), data(&payload[..52])];
            tokio::spawn(async move {
                let stalled = tokio_stream::iter(msgs).chain(tokio_stream::pending());
                let r = cl.submit_update(stalled).await;
                (r.map(drop), started.elapsed())
            })
        })
        .collect();
    let mut codes = std::collections::BTreeMap::<String, usize>::new();
    let mut idle_message = String::new();
    let mut slowest = Duration::ZERO;
    // Well past the idle timeout; an upload still open then is counted as never ended.
    let give_up = tokio::time::Instant::now() + Duration::from_secs(30);
    for u in uploads {
        let Ok(done) = tokio::time::timeout_at(give_up, u).await else {
            *codes.entry("never ended".into()).or_default() += 1;
            continue;
        };
        let (r, took) = done.unwrap();
        slowest = slowest.max(took);
        let code = match r {
            Ok(()) => Code::Ok,
            Err(s) => {
                if s.code() == Code::DeadlineExceeded {
                    idle_message = s.message().to_string();
                }
                s.code()
            }
        };
        *codes.entry(format!("{code:?}")).or_default() += 1;
    }
    // Each new upload of the node closes the one it still holds (a half-open stream after a
    // reboot must not lock it out), so the flood ends with every upload aborted or asked to retry;
    // one more, left alone, then meets the idle timeout.
    let mut cl = rogue.clone();
    let msgs = vec![header(&plan_id, &start, &payload, 14, 10), data(&payload[..52])];
    let last = cl.submit_update(tokio_stream::iter(msgs).chain(tokio_stream::pending())).await;
    if let Err(s) = &last {
        if s.code() == Code::DeadlineExceeded {
            idle_message = s.message().to_string();
        }
        *codes.entry(format!("{:?}", s.code())).or_default() += 1;
    }
    let drained = sanctum_tests::wait_until(Duration::from_secs(10), || coord.spool_files() == 0);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let most = sampler.join().unwrap();
    println!(
        "200 stalled uploads: {codes:?}; most spool files at once {most}; all answered within {slowest:?}; spool empty afterwards: {drained}"
    );
    println!("idle upload: {idle_message}");
    assert!(most <= 3, "at most one upload in flight or held per node (3 nodes) is on disk; saw {most}");
    assert!(drained, "the stalled upload's spool file was not removed");
    // What the stalled upload sent is kept so it could resume, one partial for the node and round.
    assert!(coord.partial_files() <= 1, "one partial per participant and round: {}", coord.partial_files());
    assert!(codes.get("DeadlineExceeded").copied().unwrap_or(0) >= 1, "{codes:?}");
    assert!(
        codes.get("Unavailable").copied().unwrap_or(0) >= 150,
        "duplicates are answered before spooling (asked to retry): {codes:?}"
    );
    assert!(idle_message.contains("upload_idle_timeout_secs"), "{idle_message}");
    let audited = coord
        .audit_records()
        .iter()
        .filter(|r| {
            r.event == "update_rejected"
                && r.params["reason"].as_str().unwrap_or("").contains("upload_idle_timeout_secs")
        })
        .count();
    assert!(audited >= 1, "the idle upload is audited as rejected");

    // The rogue leaves; the round completes with the honest hospitals.
    drop(directives);
    drop(rogue);
    let (closed, finished) = follow(&mut events).await;
    assert!(finished.success, "{}", finished.reason);
    assert_eq!(closed.len(), 1);
    let mut reported = closed[0].reported.clone();
    reported.sort();
    assert_eq!(reported, ["cleveland", "hungarian"]);
    // The round closed: its partial uploads are gone with it.
    assert!(
        sanctum_tests::wait_until(Duration::from_secs(10), || coord.partial_files() == 0),
        "the closed round's partial uploads were not removed: {}",
        coord.partial_files()
    );
    drop(honest);
}

#[tokio::test]
async fn an_update_weighted_u64_max_is_bounded_by_max_samples() {
    let c = Consortium::new();
    let coord = CoordinatorProcess::start(&c);
    let (_, heavy, heavy_dirs) = subscribed(&c, &coord, "heavy").await;
    let (light_files, light, light_dirs) = subscribed(&c, &coord, "light").await;
    coord.wait_for_nodes(2);
    let toml = plan("weights", 1, 2, LOGISTIC, "");
    let parsed = Plan::parse(&toml).unwrap();
    let max_samples = parsed.secagg_settings().max_samples;
    let mut lead = lead_client(&c, &coord).await;
    let (_plan_id, mut events) = submit_and_watch(&mut lead, toml).await;
    // "heavy" moves every weight by +1 and claims u64::MAX samples; "light" moves none and claims
    // half of max_samples. Capped, the mean moves by max/(max + max/2) = 2/3; uncapped, by 1 − 1e-15.
    let heavy_run = tokio::spawn(scripted_node(heavy, heavy_dirs, |_| (vec![1.0; 14], u64::MAX)));
    let light_run = tokio::spawn(scripted_node(light, light_dirs, move |_| (vec![0.0; 14], max_samples / 2)));
    let (closed, finished) = follow(&mut events).await;
    let starts = heavy_run.await.unwrap();
    light_run.await.unwrap();
    assert!(finished.success, "{}", finished.reason);
    let mut fetcher = client(&coord, &light_files).await;
    let before = fetch_weights(&mut fetcher, &starts[0].model_sha256, &parsed).await;
    let after = fetch_weights(&mut fetcher, &closed[0].new_model_sha256, &parsed).await;
    let moved: Vec<f64> = before.iter().zip(&after).map(|(b, a)| f64::from(*a) - f64::from(*b)).collect();
    let want = max_samples as f64 / (max_samples as f64 + (max_samples / 2) as f64);
    println!(
        "max_samples = {max_samples}; every weight moved by {:.6}…{:.6}; the capped weighted mean is {want:.6}",
        moved.iter().copied().fold(f64::INFINITY, f64::min),
        moved.iter().copied().fold(f64::NEG_INFINITY, f64::max)
    );
    for (i, m) in moved.iter().enumerate() {
        assert!((m - want).abs() < 1e-5, "parameter {i} moved by {m}, the capped weighted mean is {want}");
    }
}

#[tokio::test]
async fn a_global_model_pushed_past_f32_range_fails_the_round_with_the_reason() {
    let c = Consortium::new();
    let coord = CoordinatorProcess::start(&c);
    let (_, a, a_dirs) = subscribed(&c, &coord, "a").await;
    let (_, b, b_dirs) = subscribed(&c, &coord, "b").await;
    coord.wait_for_nodes(2);
    let mut lead = lead_client(&c, &coord).await;
    let (_plan_id, mut events) = submit_and_watch(&mut lead, plan("overflow", 2, 2, LOGISTIC, "")).await;
    // Finite updates at f32::MAX: round 1's model is still finite (w + MAX rounds to MAX), round
    // 2's is MAX + MAX, which f32 cannot hold.
    let a_run = tokio::spawn(scripted_node(a, a_dirs, |_| (vec![f32::MAX; 14], 1)));
    let b_run = tokio::spawn(scripted_node(b, b_dirs, |_| (vec![f32::MAX; 14], 1)));
    let (closed, finished) = follow(&mut events).await;
    drop((a_run, b_run));
    println!(
        "rounds closed: {:?}; finished: success {} — {}",
        closed.iter().map(|r| r.round).collect::<Vec<_>>(),
        finished.success,
        finished.reason
    );
    assert!(!finished.success, "a non-finite global model must fail the round");
    assert!(finished.reason.contains("round 2") && finished.reason.contains("non-finite"), "{}", finished.reason);
    assert_eq!(finished.rounds_completed, 1);
    assert_eq!(closed.iter().map(|r| r.round).collect::<Vec<_>>(), [1], "round 2's model is never published");
    // Stored: the initial model and round 1's, not round 2's.
    let models = std::fs::read_dir(coord.state_dir().join("models")).unwrap().count();
    assert_eq!(models, 2, "the non-finite model was stored");
    let plan_failed = coord.audit_records().into_iter().find(|r| r.event == "plan_finished").unwrap();
    assert!(plan_failed.params["reason"].as_str().unwrap().contains("non-finite"), "{:?}", plan_failed.params);
}

#[tokio::test]
async fn a_node_flooding_rejections_costs_a_bounded_number_of_audit_records() {
    use sanctum_protocol::proto::WatchPlanRequest;
    let c = Consortium::new();
    // A 2 s quota period so the summary is written within the test; a history of 32 events a run,
    // which 2,000 rejections published into the finished run would flush (its end included).
    let coord =
        CoordinatorProcess::start_configured(&c, "[limits]\nrefusal_report_secs = 2\nevents_per_run = 32\n", &[]);
    let (_, a, a_dirs) = subscribed(&c, &coord, "a").await;
    let (_, b, b_dirs) = subscribed(&c, &coord, "b").await;
    coord.wait_for_nodes(2);
    let mut lead = lead_client(&c, &coord).await;
    let (plan_id, mut events) = submit_and_watch(&mut lead, plan("flood", 1, 2, LOGISTIC, "")).await;
    let a_run = tokio::spawn(scripted_node(a.clone(), a_dirs, |_| (vec![0.01; 14], 10)));
    let b_run = tokio::spawn(scripted_node(b, b_dirs, |_| (vec![0.01; 14], 10)));
    let (_closed, finished) = follow(&mut events).await;
    assert!(finished.success, "{}", finished.reason);
    let starts = a_run.await.unwrap();
    b_run.await.unwrap();
    // Let the run's own records (disconnects, receipts) land before the baseline.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = coord.audit_records().len();
    let log0 = file_len(&coord.log);

    // 2,000 well-formed headers for the finished plan's round: each one is refused ("no round is
    // open") and, before the quota, cost a signed, fsync'd record and an event in the run.
    let payload = transfer::f32_to_le_bytes(&[0.0f32; 14]);
    let mut rogue = a.clone();
    let started = Instant::now();
    let mut refused = 0;
    for _ in 0..2000 {
        let msgs = vec![header(&plan_id, &starts[0], &payload, 14, 1), data(&payload)];
        if rogue.submit_update(tokio_stream::iter(msgs)).await.is_err() {
            refused += 1;
        }
    }
    let took = started.elapsed();
    let after_flood = coord.audit_records();
    let grew = after_flood.len() - before;
    let log_grew = file_len(&coord.log).saturating_sub(log0);
    println!(
        "2000 bad uploads in {took:?}: {refused} refused; audit log +{grew} records; coordinator log +{log_grew} bytes"
    );
    assert_eq!(refused, 2000);
    // 16 itemised per (node, event) per 2 s period, plus a summary per period; the flood may
    // straddle a period boundary (a period starts with the first member record after the last
    // summary, not with the flood), so the bound counts every period the flood touched.
    let periods = took.as_secs() as usize / 2 + 2;
    let bound = periods * (16 + 1);
    assert!(grew <= bound, "the audit log grew by {grew} records for one node's 2,000 rejections (bound {bound})");
    assert!(log_grew < 64 << 10, "the coordinator log grew by {log_grew} bytes (bound 64 KiB)");

    // Within a period of the flood's end, the summaries (one per period the flood touched) count
    // what was not itemised.
    let accounted = |records: &[sanctum_protocol::audit::Record]| {
        let itemised = records[before..].iter().filter(|r| r.event == "update_rejected").count() as u64;
        let suppressed: u64 = records
            .iter()
            .filter(|r| r.event == "audit_records_suppressed")
            .filter_map(|r| r.params["suppressed"].as_u64())
            .sum();
        itemised + suppressed
    };
    let summarised = sanctum_tests::wait_until(Duration::from_secs(10), || accounted(&coord.audit_records()) == 2000);
    let records = coord.audit_records();
    let summaries: Vec<_> = records.iter().filter(|r| r.event == "audit_records_suppressed").collect();
    println!("summary: {:?}", summaries.iter().map(|r| &r.params).collect::<Vec<_>>());
    assert!(summarised, "every rejection is either itemised or counted: {} of 2000", accounted(&records));
    assert!(
        !summaries.is_empty() && summaries.len() <= periods,
        "one summary per (node, event) per period: {} summaries over {periods} periods",
        summaries.len()
    );
    for s in &summaries {
        assert_eq!(s.params["node"], "a");
        assert_eq!(s.params["event"], "update_rejected");
    }

    // A late watcher of the finished run still gets its end.
    let mut late = lead
        .watch_plan(WatchPlanRequest { plan_id: plan_id.clone(), run: String::new() })
        .await
        .expect("the finished run can be watched")
        .into_inner();
    let mut replayed = 0;
    let end = loop {
        let ev = next_event(&mut late, 10, "the finished run's end was pushed out of its history").await;
        replayed += 1;
        assert!(
            !matches!(ev.kind, Some(plan_event::Kind::UpdateRejected(_))),
            "a rejection of an upload for a finished run was published into it"
        );
        if let Some(plan_event::Kind::PlanFinished(f)) = ev.kind {
            break f;
        }
    };
    println!("late watcher: {replayed} events, ending with success = {}", end.success);
    assert!(end.success);
}
