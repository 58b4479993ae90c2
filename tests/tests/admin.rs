//! The lead's admin commands end to end, through the real `sanctum-coordinator` CLI against a
//! real coordinator and real nodes: `nodes list` (connected, version, device, runs), `plan list`
//! and `plan status` during and after a run, `plan cancel` of a running run (every node is told
//! the plan closed, the run shows cancelled, a second cancel is refused), `plan watch` by prefix,
//! and `model export` (the file's SHA-256 is the manifest's final model; a damaged model is
//! refused and nothing is written). An auditor's certificate reads (list, status, nodes) and is
//! refused every change (cancel, export) with PERMISSION_DENIED, changing nothing.

#![allow(clippy::unwrap_used, clippy::panic)] // test helpers: a failed step is a failed test

use std::path::{Path, PathBuf};
use std::time::Duration;

use sanctum_protocol::hash::ContentHash;
use sanctum_protocol::plan::Plan;
use sanctum_protocol::proto::federation_client::FederationClient;
use sanctum_protocol::proto::{Directive, PlanResponse, SubscribeRequest, directive};
use sanctum_protocol::tls::TlsFiles;
use sanctum_tests::peer::lead_client;
use sanctum_tests::{
    Consortium, CoordinatorProcess, NodeProcess, bin, channel, follow_run, heart_data, submit_and_watch, wait_until,
};
use serde_json::Value;
use tonic::Streaming;

/// A heart-disease plan (logistic regression, FedAvg, no DP) of `rounds` rounds on `min_nodes`.
fn plan(name: &str, rounds: u32, min_nodes: usize, round_deadline_secs: u64) -> String {
    format!(
        "name = \"{name}\"\nrounds = {rounds}\nmin_nodes = {min_nodes}\nround_deadline_secs = {round_deadline_secs}\nrecruit_deadline_secs = 30\n\
         [model]\nkind = \"logistic_regression\"\ninputs = 13\n[data]\nschema = \"heart_disease\"\nschema_sha256 = \"39f2b3691b732094488517b366f5bb898ffb1d537dae5f6f2fc1b24c7f225688\"\n\
         [local]\nsteps = 5\nbatch_size = 4\nlearning_rate = 0.01\n[strategy]\nkind = \"fedavg\"\n"
    )
}

/// A client config (lead.toml's form) holding `files`.
fn client_config(c: &Consortium, coord: &CoordinatorProcess, name: &str, files: &TlsFiles) -> PathBuf {
    let path = c.dir.path().join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "coordinator = {:?}\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
            coord.address(),
            files.ca,
            files.cert,
            files.key
        ),
    )
    .unwrap();
    path
}

/// What one CLI call did.
struct Out {
    ok: bool,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Out {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}\n{}", self.stdout, self.stderr))
    }
}

/// Runs `sanctum-coordinator ARGS --config CONFIG` (without blocking the runtime: the test's
/// scripted node keeps its stream meanwhile).
async fn cli(config: &Path, args: &[&str]) -> Out {
    let out = tokio::process::Command::new(bin("sanctum-coordinator"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .await
        .unwrap();
    let out = Out {
        ok: out.status.success(),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    println!("$ sanctum-coordinator {}\n{}{}", args.join(" "), out.stdout, out.stderr);
    out
}

/// Waits for the next directive of a scripted node; panics with `what` if none comes in 60 s.
async fn next_directive(directives: &mut Streaming<Directive>, what: &str) -> directive::Kind {
    tokio::time::timeout(Duration::from_secs(60), directives.message())
        .await
        .unwrap_or_else(|_| panic!("no directive: {what}"))
        .unwrap()
        .unwrap_or_else(|| panic!("the directive stream ended: {what}"))
        .kind
        .unwrap()
}

/// The JSON row of node `name` in `nodes list --json`.
fn node_row<'a>(nodes: &'a Value, name: &str) -> &'a Value {
    nodes.as_array().unwrap().iter().find(|n| n["name"] == name).unwrap_or_else(|| panic!("{name} not in {nodes}"))
}

fn audit_events(coord: &CoordinatorProcess, event: &str) -> Vec<sanctum_protocol::audit::Record> {
    coord.audit_records().into_iter().filter(|r| r.event == event).collect()
}

#[tokio::test]
async fn a_running_plan_is_listed_inspected_and_cancelled_and_an_auditor_only_reads() {
    let c = Consortium::new();
    let mut coord = CoordinatorProcess::start(&c);
    let addr = coord.address();
    let _nodes: Vec<NodeProcess> = ["cleveland", "hungarian"]
        .iter()
        .map(|n| NodeProcess::start_serving(&c, n, &addr, &heart_data(n), ""))
        .collect();
    // A third hospital the test scripts: it accepts and then never uploads, so round 1 stays open
    // (its deadline is 10 minutes) until the lead cancels the run.
    let slow_files = c.member("slow", "node");
    let mut slow = FederationClient::new(channel(&addr, &slow_files).await.unwrap());
    let hello = SubscribeRequest { software_version: "9.9.9-scripted".into(), device: "cuda:0".into() };
    let mut directives = slow.subscribe(hello).await.unwrap().into_inner();
    coord.wait_for_nodes(3);
    let lead = client_config(&c, &coord, "lead", &c.lead());
    let auditor = client_config(&c, &coord, "auditor", &c.member("inspector", "auditor"));

    // nodes list: everyone connected, with the version and device each sent.
    let listed = cli(&lead, &["nodes", "list", "--json"]).await;
    assert!(listed.ok);
    let nodes = listed.json();
    for name in ["cleveland", "hungarian"] {
        let row = node_row(&nodes, name);
        assert_eq!(row["connected"], true, "{row}");
        assert_eq!(row["version"], sanctum_protocol::VERSION, "{row}");
        assert_eq!(row["device"], "cpu", "{row}");
        assert!(row["last_seen_unix_ms"].as_u64().unwrap() > 0, "{row}");
    }
    let row = node_row(&nodes, "slow");
    assert_eq!((&row["version"], &row["device"]), (&Value::from("9.9.9-scripted"), &Value::from("cuda:0")));
    let text = cli(&auditor, &["nodes", "list"]).await;
    assert!(text.ok, "an auditor lists the nodes");
    let line = text.stdout.lines().find(|l| l.starts_with("cleveland")).unwrap();
    assert!(line.contains(" yes ") && line.contains(sanctum_protocol::VERSION) && line.contains("cpu"), "{line}");

    let mut lead_grpc = lead_client(&c, &coord).await;
    let (plan_id, mut events) = submit_and_watch(&mut lead_grpc, plan("admin-cancel", 3, 3, 600)).await;
    let directive::Kind::OfferPlan(offer) = next_directive(&mut directives, "the offer").await else {
        panic!("the first directive is not the offer")
    };
    let run = offer.run.clone();
    slow.respond_to_plan(PlanResponse {
        plan_id: offer.plan_id.clone(),
        accept: true,
        reason: String::new(),
        privacy: None,
        run: run.clone(),
    })
    .await
    .unwrap();
    assert!(
        matches!(next_directive(&mut directives, "round 1").await, directive::Kind::StartRound(s) if s.round == 1),
        "round 1 opens with the scripted node in it"
    );

    // plan status by a plan-id prefix, during the run: round 1 open, three participants in it.
    let prefix = &plan_id[..10];
    let status = cli(&lead, &["plan", "status", prefix, "--json"]).await;
    assert!(status.ok);
    let s = status.json();
    assert_eq!(
        (&s["run"], &s["status"], &s["current_round"]),
        (&Value::from(run.as_str()), &Value::from("running"), &Value::from(1)),
        "{s}"
    );
    assert_eq!((&s["rounds_completed"], &s["rounds_planned"]), (&Value::from(0), &Value::from(3)));
    let states: Vec<(String, String)> = s["participants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["node"].as_str().unwrap().to_string(), p["state"].as_str().unwrap().to_string()))
        .collect();
    // The real hospitals may already have said they train (heartbeats); the scripted node has not.
    let names: Vec<&str> = states.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["cleveland", "hungarian", "slow"], "{states:?}");
    for (node, state) in &states {
        let allowed: &[&str] = if node == "slow" { &["in_round"] } else { &["in_round", "training", "uploading"] };
        assert!(allowed.contains(&state.as_str()), "{node} is {state}: {states:?}");
    }
    let text = cli(&auditor, &["plan", "status", &run]).await;
    assert!(text.ok && text.stdout.contains("status: running") && text.stdout.contains("round 0/3 (round 1 open)"));
    let list = cli(&auditor, &["plan", "list"]).await;
    assert!(list.ok, "an auditor lists the runs");
    let line = list.stdout.lines().find(|l| l.starts_with(&run[..12])).unwrap();
    assert!(line.contains("admin-cancel") && line.contains("running") && line.contains("0/3"), "{line}");
    assert!(line.contains(&plan_id[..12]), "{line}");

    // The auditor's cancel is refused and changes nothing.
    let refused = cli(&auditor, &["plan", "cancel", &run]).await;
    assert!(!refused.ok);
    assert!(
        refused.stderr.contains("holds a auditor certificate; this call needs role lead")
            && refused.stderr.contains("lead.toml"),
        "{}",
        refused.stderr
    );
    let mut audit_grpc = sanctum_protocol::proto::lead_client::LeadClient::new(
        channel(&addr, &c.member("inspector2", "auditor")).await.unwrap(),
    );
    let err = audit_grpc.cancel_plan(sanctum_protocol::proto::CancelPlanRequest { id: run.clone() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    let still = cli(&lead, &["plan", "status", &run, "--json"]).await.json();
    assert_eq!((&still["status"], &still["current_round"]), (&Value::from("running"), &Value::from(1)));
    assert!(audit_events(&coord, "plan_cancelled").is_empty());

    // The lead cancels, by a prefix of the run id.
    let cancelled = cli(&lead, &["plan", "cancel", &run[..8]]).await;
    assert!(cancelled.ok);
    assert!(cancelled.stdout.contains("cancelled: cancelled by lead"), "{}", cancelled.stdout);
    let (_, finished) = follow_run(&mut events, 30).await;
    assert!(!finished.success);
    assert_eq!(finished.reason, "cancelled by lead");
    match next_directive(&mut directives, "the plan's close").await {
        directive::Kind::PlanClosed(p) => {
            assert_eq!((p.run.as_str(), p.success, p.reason.as_str()), (run.as_str(), false, "cancelled by lead"))
        }
        other => panic!("expected PlanClosed, got {other:?}"),
    }
    for n in &_nodes {
        assert!(
            wait_until(Duration::from_secs(20), || n.audit_records().iter().any(|r| r.event == "plan_closed"
                && r.params.get("reason").and_then(Value::as_str) == Some("cancelled by lead"))),
            "a node was not told the plan closed:\n{}",
            n.log_text()
        );
    }
    let after = cli(&auditor, &["plan", "status", &plan_id, "--json"]).await.json();
    assert_eq!((&after["status"], &after["reason"]), (&Value::from("cancelled"), &Value::from("cancelled by lead")));
    assert_eq!(after["current_round"], 0);
    assert!(after["finished_unix_ms"].as_u64().unwrap() >= after["started_unix_ms"].as_u64().unwrap());
    let list = cli(&lead, &["plan", "list", "--json"]).await.json();
    assert_eq!(list[0]["status"], "cancelled");
    assert!(list[0]["finished"].is_string(), "{list}");

    let again = cli(&lead, &["plan", "cancel", &run]).await;
    assert!(!again.ok);
    assert!(
        again.stderr.contains("has already ended (cancelled: cancelled by lead); there is nothing to cancel"),
        "{}",
        again.stderr
    );
    let records = audit_events(&coord, "plan_cancelled");
    assert_eq!(records.len(), 1, "one cancel, one record");
    assert_eq!(records[0].params["by"], "lead");
    assert_eq!(records[0].params["run"], run.as_str());
    println!("plan_cancelled record: actor {}", records[0].actor);
    let out = c.dir.path().join("cancelled.safetensors");
    let export = cli(&lead, &["model", "export", &run, "--out", out.to_str().unwrap()]).await;
    assert!(!export.ok && export.stderr.contains("did not finish successfully (cancelled"), "{}", export.stderr);
    assert!(!out.exists());

    // The nodes' runs and the errors that name the next step.
    let nodes = cli(&lead, &["nodes", "list", "--json"]).await.json();
    let runs = &node_row(&nodes, "cleveland")["runs"];
    assert_eq!(
        (&runs[0]["run"], &runs[0]["status"]),
        (&Value::from(run.as_str()), &Value::from("cancelled")),
        "{nodes}"
    );
    let missing = cli(&lead, &["plan", "status", "abc"]).await;
    assert_eq!(missing.code, Some(1));
    assert!(missing.stderr.contains("no run matches 'abc': run `sanctum-coordinator plan list`"), "{}", missing.stderr);

    // A store that missed the run's end (its write failed, or a crash came between the audit
    // record and the store's update) does not bring the cancelled run back at the next start:
    // the audit log, written first, is read before any run is resumed.
    coord.kill9();
    let db = rusqlite::Connection::open(coord.state_dir().join("coordinator.sqlite3")).unwrap();
    let reset = db.execute("UPDATE runs SET status = 'running', reason = '' WHERE run_id = ?1", [&run]).unwrap();
    assert_eq!(reset, 1, "the run's row is back to running, as if its end had never been stored");
    drop(db);
    coord.restart();
    assert!(
        wait_until(Duration::from_secs(60), || coord.log_text().contains("recorded in the store, not resumed")),
        "{}",
        coord.log_text()
    );
    let after = cli(&lead, &["plan", "status", &run, "--json"]).await.json();
    assert_eq!((&after["status"], &after["reason"]), (&Value::from("cancelled"), &Value::from("cancelled by lead")));
    assert!(audit_events(&coord, "plan_resumed").is_empty(), "the cancelled run was resumed");
}

#[tokio::test]
async fn a_finished_runs_model_is_exported_and_checked_against_its_manifest() {
    let c = Consortium::new();
    let coord = CoordinatorProcess::start(&c);
    let addr = coord.address();
    let nodes: Vec<NodeProcess> = ["cleveland", "hungarian"]
        .iter()
        .map(|n| NodeProcess::start_serving(&c, n, &addr, &heart_data(n), ""))
        .collect();
    coord.wait_for_nodes(2);
    let lead = client_config(&c, &coord, "lead", &c.lead());
    let auditor = client_config(&c, &coord, "auditor", &c.member("inspector", "auditor"));
    let text = plan("admin-export", 2, 2, 60);
    let mut lead_grpc = lead_client(&c, &coord).await;
    let (plan_id, mut events) = submit_and_watch(&mut lead_grpc, text.clone()).await;
    let (decisions, finished) = follow_run(&mut events, 60).await;
    assert!(finished.success, "{finished:?}");
    assert_eq!(decisions.len(), 2);

    // After the run: status by plan id, as both roles.
    for config in [&lead, &auditor] {
        let s = cli(config, &["plan", "status", &plan_id[..8], "--json"]).await.json();
        assert_eq!((&s["status"], &s["rounds_completed"]), (&Value::from("succeeded"), &Value::from(2)), "{s}");
        assert_eq!(s["final_model_sha256"], finished.final_model_sha256.as_str());
        assert!(s["participants"].as_array().unwrap().iter().all(|p| p["state"] == "reported" && p["round"] == 2));
        assert_eq!(s["last_round"]["reported"].as_array().unwrap().len(), 2);
        assert_eq!(s["last_round"]["metrics"].as_array().unwrap().len(), 2, "each node's metric of round 2: {s}");
    }
    let human = cli(&auditor, &["plan", "status", &plan_id[..8]]).await;
    assert!(human.stdout.contains("status: succeeded") && human.stdout.contains("round 2/2"), "{}", human.stdout);
    assert!(human.stdout.contains("final model:"), "{}", human.stdout);
    // watch takes the same ids: a finished run replays to its end.
    let watched = cli(&lead, &["plan", "watch", &plan_id[..8]]).await;
    assert!(watched.ok && watched.stdout.contains("finished after 2 round(s)"), "{}", watched.stdout);

    // The auditor may not export; nothing is written.
    let auditor_out = c.dir.path().join("auditor.safetensors");
    let refused = cli(&auditor, &["model", "export", &plan_id[..8], "--out", auditor_out.to_str().unwrap()]).await;
    assert!(!refused.ok && refused.stderr.contains("needs role lead"), "{}", refused.stderr);
    assert!(!auditor_out.exists());

    // The lead's export: the model and its manifest, the hash checked against both.
    let out = c.dir.path().join("final.safetensors");
    let export = cli(&lead, &["model", "export", &plan_id[..8], "--out", out.to_str().unwrap(), "--json"]).await;
    assert!(export.ok);
    let bytes = std::fs::read(&out).unwrap();
    let sha = ContentHash::of(&bytes).to_hex();
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(c.dir.path().join("final.safetensors.manifest.json")).unwrap()).unwrap();
    assert_eq!(sha, finished.final_model_sha256);
    assert_eq!(manifest["final_model_sha256"], sha.as_str());
    let lineage = manifest["lineage"].as_array().unwrap();
    assert_eq!(lineage.len(), 3, "the initial model and one per round");
    assert_eq!(lineage.last().unwrap(), sha.as_str());
    assert_eq!(manifest["plan_id"], plan_id.as_str());
    assert_eq!(export.json()["sha256"], sha.as_str());
    // It is the plan's model, as safetensors.
    let parsed = Plan::parse(&text).unwrap();
    let weights = sanctum_protocol::model::Weights::from_safetensors(&bytes, &parsed.model.layout()).unwrap();
    assert_eq!(weights.values().len(), 14);
    println!("exported {} bytes, SHA-256 {sha}", bytes.len());

    // A stored model damaged on the coordinator's disk: the client refuses to write it.
    let stored = coord.state_dir().join("models").join(format!("{sha}.safetensors"));
    let mut damaged = std::fs::read(&stored).unwrap();
    let last = damaged.len() - 1;
    damaged[last] ^= 0x01;
    std::fs::write(&stored, &damaged).unwrap();
    let bad_out = c.dir.path().join("damaged.safetensors");
    let refused = cli(&lead, &["model", "export", &plan_id, "--out", bad_out.to_str().unwrap()]).await;
    assert!(!refused.ok);
    assert!(
        refused.stderr.contains("but the manifest's final_model_sha256 is")
            && refused.stderr.contains("nothing was written"),
        "{}",
        refused.stderr
    );
    assert!(!bad_out.exists() && !c.dir.path().join("damaged.safetensors.manifest.json").exists());
    let reads = audit_events(&coord, "model_export_read");
    assert_eq!(reads.len(), 2, "each export the lead read is audited");
    drop(nodes);
}
