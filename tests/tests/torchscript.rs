//! TorchScript models end to end: the example (`examples/torchscript`: a PyTorch MLP saved with
//! `torch.jit.save`) trains through `simulate`, which approves it at each hospital, and ends where
//! the zoo's MLP of the same layout ends; without approval every hospital refuses it naming the
//! hash; a file that does not load as TorchScript, approved by hand-editing the approvals file
//! (bypassing `model approve`'s load check), is refused by the node, which goes on serving.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed step is a failed test

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use sanctum_protocol::hash::ContentHash;
use sanctum_protocol::proto::{NodeDecision, PlanFinished, SubmitPlanRequest, WatchPlanRequest};
use sanctum_tests::peer::lead_client;
use sanctum_tests::{
    Consortium, CoordinatorProcess, HEART_SCHEMA, HEART_SCHEMA_SHA256, NodeProcess, bin, follow_run, heart_data,
    submit_and_watch,
};

fn example(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/torchscript").join(file)
}

/// Runs `simulate` on `plan` with `extra` arguments; its exit success and JSON summary.
fn simulate(plan: &Path, extra: &[&str]) -> (bool, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("summary.json");
    let started = Instant::now();
    let out = Command::new(bin("sanctum-coordinator"))
        .args(["simulate", "--device", "cpu", "--plan"])
        .arg(plan)
        .arg("--json")
        .arg(&json)
        .args(extra)
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!(
        "simulate {} {extra:?}: {:.1} s\n{stdout}",
        plan.file_name().unwrap().to_string_lossy(),
        started.elapsed().as_secs_f64()
    );
    let summary = std::fs::read_to_string(&json)
        .unwrap_or_else(|e| panic!("no summary ({e}):\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr)));
    (out.status.success(), serde_json::from_str(&summary).unwrap())
}

#[test]
fn the_torchscript_example_trains_like_its_zoo_twin_and_is_refused_naming_the_hash_unapproved() {
    let (ok, script) = simulate(&example("fedavg.toml"), &[]);
    assert!(ok && script["success"] == true, "{}", script["reason"]);
    let (ok, zoo) = simulate(&example("fedavg_zoo.toml"), &[]);
    assert!(ok && zoo["success"] == true, "{}", zoo["reason"]);
    assert_eq!(script["rounds_completed"], zoo["rounds_completed"]);
    let hospitals: Vec<&String> = zoo["per_node"].as_object().unwrap().keys().collect();
    assert_eq!(hospitals.len(), 4);
    // The module starts from the zoo's weights (same layout, same seed) and computes the same
    // functions: within noise means within 0.02 on every hospital's metrics (the runs on one
    // machine are in fact bit for bit the same model, which is printed, not required).
    for h in &hospitals {
        for m in ["accuracy", "auroc", "balanced_accuracy"] {
            let (a, b) = (&script["per_node"][h.as_str()]["metrics"][m], &zoo["per_node"][h.as_str()]["metrics"][m]);
            let (a, b) = (a.as_f64().unwrap_or_else(|| panic!("{h} {m}: {a}")), b.as_f64().unwrap());
            println!("{h} {m}: torchscript {a:.4}, zoo {b:.4}");
            assert!((a - b).abs() <= 0.02, "{h} {m}: torchscript {a} against the zoo's {b}");
        }
    }
    println!(
        "final models: torchscript {}, zoo {} (equal: {})",
        script["final_model_sha256"],
        zoo["final_model_sha256"],
        script["final_model_sha256"] == zoo["final_model_sha256"]
    );

    // Not approved: each hospital refuses, naming the model's hash.
    let plan = std::fs::read_to_string(example("fedavg.toml")).unwrap();
    let sha = plan.lines().find_map(|l| l.strip_prefix("sha256 = ")).unwrap().trim_matches('"').to_string();
    assert_eq!(sha, ContentHash::of(&std::fs::read(example("model.pt")).unwrap()).to_hex());
    let (ok, refused) = simulate(&example("fedavg.toml"), &["--no-approve"]);
    assert!(!ok && refused["success"] == false, "an unapproved model trained");
    let reason = refused["reason"].as_str().unwrap();
    for h in &hospitals {
        assert!(
            reason.contains(&format!("{h} refused: model {sha} is not approved at this hospital")),
            "{h}: {reason}"
        );
    }
    assert!(reason.contains("sanctum-node model approve"), "the reason names the next step: {reason}");
}

/// A serving node holding heart disease whose approvals file was edited by hand to approve bytes
/// that are no TorchScript archive, and the lead's refused plan of that "model": the node's
/// decision and the plan's end.
struct GarbageRefused {
    c: Consortium,
    coord: CoordinatorProcess,
    node: NodeProcess,
    sha: String,
    decision: NodeDecision,
    finished: PlanFinished,
}

async fn garbage_refused() -> GarbageRefused {
    let c = Consortium::new();
    let coord = CoordinatorProcess::start(&c);
    let datasets = format!("[[datasets]]\nschema = {HEART_SCHEMA:?}\npath = {:?}\n", heart_data("cleveland"));
    let node = NodeProcess::start_with_datasets(
        &c,
        "cleveland",
        &coord.address(),
        &datasets,
        "allowed_models = [\"logistic_regression\", \"torchscript\"]",
    );
    coord.wait_for_nodes(1);

    // Bytes that are no TorchScript archive, approved by editing the approvals file directly
    // (`model approve` would have refused them: it loads the file first).
    let garbage: Vec<u8> = b"PK\x03\x04 not a TorchScript archive "
        .iter()
        .copied()
        .chain((0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8))
        .collect();
    let sha = ContentHash::of(&garbage).to_hex();
    std::fs::write(
        node.config.with_file_name("approved_models.toml"),
        format!(
            "[[model]]\nsha256 = \"{sha}\"\nname = \"garbage\"\napproved_by = \"edited by hand\"\n\
             approved_at = \"2026-01-01T00:00:00Z\"\nparameters = 14\nfile = \"garbage.pt\"\n"
        ),
    )
    .unwrap();
    let plan = format!(
        "name = \"garbage-torchscript\"\nrounds = 1\nmin_nodes = 1\nround_deadline_secs = 60\nrecruit_deadline_secs = 30\n\
         [model]\nkind = \"torchscript\"\nsha256 = \"{sha}\"\ninputs = 13\noutputs = 1\n\
         parameters = [{{ name = \"fc.weight\", shape = [1, 13] }}, {{ name = \"fc.bias\", shape = [1] }}]\n\
         [data]\nschema = \"heart_disease\"\nschema_sha256 = \"{HEART_SCHEMA_SHA256}\"\n\
         [local]\nsteps = 5\nbatch_size = 4\nlearning_rate = 0.01\n[strategy]\nkind = \"fedavg\"\n"
    );
    let mut lead = lead_client(&c, &coord).await;
    let submitted = lead
        .submit_plan(SubmitPlanRequest { plan_toml: plan, again: false, model_file: garbage })
        .await
        .expect("the coordinator takes the file: its hash is the plan's")
        .into_inner();
    let mut events = lead
        .watch_plan(WatchPlanRequest { plan_id: submitted.plan_id.clone(), run: submitted.run })
        .await
        .unwrap()
        .into_inner();
    let (decisions, finished) = follow_run(&mut events, 180).await;
    let decision = decisions.into_iter().find(|d| d.node == "cleveland").expect("the node decided");
    println!("garbage model: accepted {}, {:?}\nplan: {:?}", decision.accepted, decision.reason, finished.reason);
    GarbageRefused { c, coord, node, sha, decision, finished }
}

#[tokio::test]
async fn a_torchscript_file_that_does_not_load_is_refused_and_the_node_keeps_serving() {
    let GarbageRefused { c, coord, node, sha, decision: d, finished } = garbage_refused().await;
    assert!(!d.accepted, "a file that does not load was trained");
    assert!(
        d.reason.contains("the plan's TorchScript model") && d.reason.contains("does not load here"),
        "{}",
        d.reason
    );
    assert!(!finished.success);
    // What the lead learns names no directory of the hospital (the file's path is in its log).
    let state = node.state_dir().display().to_string();
    for reason in [&d.reason, &finished.reason] {
        assert!(!reason.contains(&state), "the lead learns the hospital's directory {state}: {reason}");
    }
    assert!(node.log_text().contains(&sha), "the node's log names the file");
    // The approval was honoured: the refusal is the load, not the hash.
    assert!(!d.reason.contains("is not approved"), "{}", d.reason);

    let mut lead = lead_client(&c, &coord).await;
    // The same process trains a zoo plan next.
    let zoo = format!(
        "name = \"heart-after-garbage\"\nrounds = 2\nmin_nodes = 1\nround_deadline_secs = 60\nrecruit_deadline_secs = 30\n\
         [model]\nkind = \"logistic_regression\"\ninputs = 13\n\
         [data]\nschema = \"heart_disease\"\nschema_sha256 = \"{HEART_SCHEMA_SHA256}\"\n\
         [local]\nsteps = 5\nbatch_size = 4\nlearning_rate = 0.01\n[strategy]\nkind = \"fedavg\"\n"
    );
    let (_, mut events) = submit_and_watch(&mut lead, zoo).await;
    let (decisions, finished) = follow_run(&mut events, 180).await;
    assert!(decisions.iter().all(|d| d.accepted), "{decisions:?}");
    assert!(finished.success, "{}", finished.reason);
    assert_eq!(finished.rounds_completed, 2);
    let accuracy = finished.final_metrics.iter().find(|m| m.node == "cleveland" && m.name == "accuracy");
    println!("heart disease after the garbage model: {accuracy:?}");
    assert!(accuracy.is_some(), "{:?}", finished.final_metrics);
}
