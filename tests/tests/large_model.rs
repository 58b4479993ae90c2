//! No message-size ceiling: a global model and an update of more than 500 MB travel in chunks,
//! with their hashes checked, through a real round.

use std::process::Command;

use sanctum_tests::{HEART_SCHEMA, bin, heart_data};

#[test]
fn a_500_mb_model_makes_a_full_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    // 13·11200 + 11200 + 11200² + 11200 + 11200 + 1 = 125,619,201 parameters = 502.5 MB of f32.
    let plan = format!(
        "name = \"large\"\nrounds = 1\nmin_nodes = 1\nround_deadline_secs = 600\n\
         [model]\nkind = \"mlp\"\ninputs = 13\nhidden = [11200, 11200]\n[data]\nschema = \"heart_disease\"\nschema_sha256 = \"39f2b3691b732094488517b366f5bb898ffb1d537dae5f6f2fc1b24c7f225688\"\nschema_file = {HEART_SCHEMA:?}\n\
         [local]\nsteps = 1\nbatch_size = 4\nlearning_rate = 0.001\n[strategy]\nkind = \"fedavg\"\n\
         [simulation]\nhospitals = [{{ name = \"cleveland\", data = {:?} }}]\n",
        heart_data("cleveland")
    );
    let plan_path = dir.path().join("plan.toml");
    std::fs::write(&plan_path, plan).unwrap();
    let json = dir.path().join("summary.json");
    let work = dir.path().join("work");
    let out = Command::new(bin("sanctum-coordinator"))
        .args(["simulate", "--device", "cpu", "--plan"])
        .arg(&plan_path)
        .arg("--json")
        .arg(&json)
        .arg("--workdir")
        .arg(&work)
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    println!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success());
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(summary["rounds_completed"], 1);
    assert!(summary["per_node"]["cleveland"]["metric"].as_f64().is_some());
    let model = std::path::PathBuf::from(summary["model_path"].as_str().unwrap());
    let size = std::fs::metadata(&model).unwrap().len();
    println!("exported model: {} ({size} bytes)", model.display());
    assert!(size > 500_000_000, "model is only {size} bytes");
    // The node sent an update of the same size, in chunks, and wrote it down.
    let egress = std::fs::read_to_string(work.join("nodes/cleveland/state/egress.jsonl")).unwrap();
    let update = egress.lines().find(|l| l.contains("\"SubmitUpdate\"")).unwrap();
    let record: serde_json::Value = serde_json::from_str(update).unwrap();
    assert!(record["bytes"].as_u64().unwrap() > 500_000_000, "{update}");
}
