//! The robust aggregators through the real service: `simulate` runs the heart-disease median,
//! trimmed-mean and Multi-Krum plans (four hospitals as node processes over mutual TLS), each
//! round's updates kept on disk under `spool/robust` until it closes. Each plan completes, lands
//! on a model of its own (not FedAvg's from the same start: the rule, not the mean, made it), scores
//! like FedAvg on honest hospitals, and leaves no buffered update behind. (With four hospitals and
//! β = 0.25 the trimmed mean drops one value at each end: it is the median, model for model.) What a poisoned update
//! does to each rule is measured in the engine's test
//! (`engine::tests::a_scaled_up_update_moves_the_median_and_trimmed_mean_models_by_less_than_the_honest_spread_while_fedavg_moves_far`).

#![allow(clippy::unwrap_used, clippy::panic)] // test helpers: a failed step is a failed test

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use sanctum_tests::bin;

fn example(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/heart_disease").join(file)
}

/// `simulate` on `plan` keeping its work directory; the JSON summary.
fn simulate(plan: &str, work: &Path) -> serde_json::Value {
    let json = work.join("summary.json");
    let started = Instant::now();
    let out = Command::new(bin("sanctum-coordinator"))
        .args(["simulate", "--device", "cpu", "--plan"])
        .arg(example(plan))
        .arg("--workdir")
        .arg(work)
        .arg("--json")
        .arg(&json)
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    let text = std::fs::read_to_string(&json).unwrap_or_else(|e| {
        panic!(
            "{plan}: no summary ({e}):\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let summary: serde_json::Value = serde_json::from_str(&text).unwrap();
    println!(
        "{plan}: {:.1} s, success {}, mean accuracy {:.4}, final model {}",
        started.elapsed().as_secs_f64(),
        summary["success"],
        summary["mean_metric"].as_f64().unwrap_or(f64::NAN),
        summary["final_model_sha256"]
    );
    summary
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.path().is_dir() {
            out.extend(files_under(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

#[test]
fn robust_plans_run_end_to_end_on_their_own_rule_and_leave_no_buffer() {
    let dir = tempfile::tempdir().unwrap();
    let fedavg = simulate("fedavg.toml", &dir.path().join("fedavg"));
    assert_eq!(fedavg["success"], true, "{}", fedavg["reason"]);
    for plan in ["median.toml", "trimmed_mean.toml", "multi_krum.toml"] {
        let work = dir.path().join(plan.trim_end_matches(".toml"));
        let s = simulate(plan, &work);
        assert_eq!(s["success"], true, "{plan}: {}", s["reason"]);
        assert_eq!(s["rounds_completed"], fedavg["rounds_completed"]);
        assert_ne!(s["final_model_sha256"], fedavg["final_model_sha256"], "{plan} averaged like FedAvg");
        let (acc, base) = (s["mean_metric"].as_f64().unwrap(), fedavg["mean_metric"].as_f64().unwrap());
        assert!((acc - base).abs() < 0.05, "{plan}: mean accuracy {acc} against FedAvg's {base}");
        let left = files_under(&work.join("coordinator/spool/robust"));
        assert!(left.is_empty(), "{plan} left buffered updates: {left:?}");
    }
}
