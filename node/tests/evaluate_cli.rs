//! `sanctum-node evaluate` end to end, as a hospital runs it on a released model: the metrics it
//! prints are those of the node's own evaluation on the same split; a model file of another
//! layout is refused naming the tensor; `--standardize-from` the hospital's own table is the
//! hospital's own standardisation, and a plan with declared statistics refuses it.

#![allow(clippy::unwrap_used)] // test helpers: a failed step is a failed test

use std::path::Path;
use std::process::{Command, Output};

use sanctum_node::cli_evaluate::plan_for;
use sanctum_node::data::{self, TableSource};
use sanctum_node::train;
use sanctum_protocol::dataset::Schema;
use sanctum_protocol::model::ModelSpec;

const SCHEMA: &str = r#"
name = "tiny_three_class"
task = "multiclass"

[target]
label = "y"

[split]
column = "split"

[privacy]
unit = "row"

[standardize]
with = "declared"
provenance = "made up for the test"

[[columns]]
name = "a"
type = "numeric"
mean = 1.0
std = 2.0

[[columns]]
name = "b"
type = "numeric"
mean = -1.0
std = 0.5

[[columns]]
name = "y"
type = "categorical"
levels = ["0", "1", "2"]

[[columns]]
name = "split"
type = "categorical"
levels = ["train", "test"]
"#;

/// A plan as a lead writes it: the schema by file (relative to the plan), no hash.
fn plan(standardize: Option<&str>) -> String {
    format!(
        "name = \"tiny\"\nrounds = 1\nmin_nodes = 1\n[model]\nkind = \"logistic_regression\"\ninputs = 2\noutputs = 3\n[data]\nschema = \"tiny_three_class\"\nschema_file = \"schema.toml\"\n{}[local]\nsteps = 1\nbatch_size = 4\nlearning_rate = 0.1\n[strategy]\nkind = \"fedavg\"\nweighting = \"samples\"\n",
        standardize.map(|s| format!("standardize = \"{s}\"\n")).unwrap_or_default()
    )
}

/// 40 rows, a deterministic pattern with every class in both splits; column `b` named `bee`
/// in the file (mapped with --map).
fn table() -> String {
    let mut t = String::from("a,bee,y,split\n");
    for i in 0..40u32 {
        let a = f64::from(i % 7) * 0.9 - 1.5;
        let b = f64::from((i * 5) % 11) * 0.3 - 1.0;
        let y = (i * 3 + i / 5) % 3;
        let split = if i % 4 == 0 { "test" } else { "train" };
        t.push_str(&format!("{a},{b},{y},{split}\n"));
    }
    t
}

fn setup(standardize: Option<&str>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("schema.toml"), SCHEMA).unwrap();
    std::fs::write(dir.path().join("plan.toml"), plan(standardize)).unwrap();
    std::fs::write(dir.path().join("hospital.csv"), table()).unwrap();
    let spec = ModelSpec::LogisticRegression { inputs: 2, outputs: 3 };
    std::fs::write(dir.path().join("model.safetensors"), spec.init(7).to_safetensors().unwrap()).unwrap();
    dir
}

fn evaluate(dir: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sanctum-node"))
        .current_dir(dir)
        .args([
            "evaluate",
            "--schema",
            "schema.toml",
            "--data",
            "hospital.csv",
            "--plan",
            "plan.toml",
            "--model",
            "model.safetensors",
            "--map",
            "b=bee",
        ])
        .args(extra)
        .output()
        .unwrap()
}

fn json(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "evaluate failed: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// The node's own evaluation of the same model on the same split, in process.
fn in_process(dir: &Path) -> Vec<(&'static str, f64)> {
    let schema = Schema::load(&dir.join("schema.toml")).unwrap();
    let plan = plan_for(&dir.join("plan.toml"), &dir.join("schema.toml"), &schema).unwrap();
    assert_eq!(plan.data.schema_sha256.as_deref(), Some(schema.sha256().to_hex().as_str()));
    let mut source = TableSource::plain(dir.join("hospital.csv"));
    source.columns.insert("b".into(), "bee".into());
    let local = data::load(&source, &schema, &data::admit_plan(&schema, &plan).unwrap()).unwrap();
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let weights = sanctum_protocol::model::Weights::from_safetensors(&bytes, &plan.model.layout()).unwrap();
    train::evaluate(&plan.model, &weights, &local, tch::Device::Cpu, None).unwrap().metrics
}

#[test]
fn evaluate_prints_the_nodes_own_metrics_of_a_released_model() {
    for standardize in [None, Some("declared")] {
        let dir = setup(standardize);
        let out = json(&evaluate(dir.path(), &["--json"]));
        let expected = in_process(dir.path());
        println!("plan standardize {standardize:?}: {}", out["metrics"]);
        assert_eq!(out["test_samples"], 10);
        assert_eq!(out["metric"], "accuracy");
        for (name, value) in &expected {
            let got = out["metrics"][*name].as_f64().unwrap();
            assert!((got - value).abs() < 1e-12, "{name}: evaluate {got}, the node's own evaluation {value}");
        }
        // The text form names the metrics too.
        let text = evaluate(dir.path(), &[]);
        assert!(text.status.success());
        let text = String::from_utf8_lossy(&text.stdout);
        assert!(text.contains("accuracy") && text.contains("macro_f1"), "{text}");
    }
}

#[test]
fn standardize_from_the_own_table_is_the_own_standardisation_and_declared_plans_refuse_it() {
    // Without DP and without `standardize = "declared"`, the node standardises with its own
    // train split: statistics taken from the same table by --standardize-from give the same
    // inputs, so the same metrics to the last bit.
    let dir = setup(None);
    let own = json(&evaluate(dir.path(), &["--json"]));
    let from = json(&evaluate(dir.path(), &["--json", "--standardize-from", "hospital.csv"]));
    assert_eq!(own["metrics"], from["metrics"]);
    assert_ne!(own["standardized_with"], from["standardized_with"]);

    let dir = setup(Some("declared"));
    let out = evaluate(dir.path(), &["--standardize-from", "hospital.csv"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("declared statistics") && err.contains("drop --standardize-from"), "{err}");
}

#[test]
fn a_model_of_another_layout_is_refused_naming_the_tensor() {
    let dir = setup(None);
    // A binary head (fc.weight [1, 2]) where the plan's model has three outputs.
    let wrong = ModelSpec::LogisticRegression { inputs: 2, outputs: 1 };
    std::fs::write(dir.path().join("model.safetensors"), wrong.init(0).to_safetensors().unwrap()).unwrap();
    let out = evaluate(dir.path(), &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    println!("{err}");
    assert!(err.contains("'fc.weight'") && err.contains("[1, 2]") && err.contains("[3, 2]"), "{err}");
    assert!(err.contains("evaluate it with the plan it was trained under"), "{err}");

    // A file that is not safetensors at all.
    std::fs::write(dir.path().join("model.safetensors"), b"not a model").unwrap();
    let err = evaluate(dir.path(), &[]);
    assert!(!err.status.success());
    assert!(String::from_utf8_lossy(&err.stderr).contains("not valid safetensors"));

    // A schema file that is not the plan's (another version): refused, naming both hashes.
    let dir = setup(None);
    std::fs::write(dir.path().join("other.toml"), SCHEMA.replace("made up for the test", "another version")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sanctum-node"))
        .current_dir(dir.path())
        .args(["evaluate", "--schema", "other.toml", "--data", "hospital.csv", "--plan", "plan.toml"])
        .args(["--model", "model.safetensors", "--map", "b=bee"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("schema_sha256") && err.contains("evaluate with the schema file the plan was trained on"),
        "{err}"
    );
}
