//! Audit logs after the heart-disease demo: the coordinator's and every node's log verify offline
//! (also against the consortium CA), hold the events an auditor needs, and any tampering with a
//! copy is caught by `audit verify`, which names the first bad record and exits non-zero.

#![allow(clippy::unwrap_used)] // a test helper: a failed read is a failed test

use std::path::Path;
use std::process::Command;

use sanctum_tests::{bin, run_ok};

fn verify(binary: &str, log: &Path, ca: &Path) -> std::process::Output {
    Command::new(bin(binary)).args(["audit", "verify"]).arg(log).arg("--ca").arg(ca).output().unwrap()
}

fn events(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["event"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn every_log_of_the_demo_verifies_and_tampering_is_caught() {
    let work = tempfile::tempdir().unwrap();
    let plan = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/heart_disease/fedavg_secagg.toml");
    run_ok(
        Command::new(bin("sanctum-coordinator"))
            .args(["simulate", "--plan"])
            .arg(&plan)
            .arg("--workdir")
            .arg(work.path()),
    );
    let ca = work.path().join("nodes/cleveland/ca.pem");
    let coordinator_log = work.path().join("coordinator/audit/audit.jsonl");
    let out = verify("sanctum-coordinator", &coordinator_log, &ca);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    println!("{}", String::from_utf8_lossy(&out.stdout));
    let ev = events(&coordinator_log);
    for want in [
        "log_opened",
        "node_connected",
        "plan_submitted",
        "plan_accepted",
        "round_opened",
        "update_received",
        "round_closed",
        "aggregate_released",
        "model_exported",
        "plan_finished",
    ] {
        assert!(ev.iter().any(|e| e == want), "coordinator log lacks {want}: {ev:?}");
    }
    assert_eq!(ev.iter().filter(|e| *e == "round_closed").count(), 15);
    for h in ["cleveland", "hungarian", "switzerland", "va"] {
        let log = work.path().join(format!("nodes/{h}/state/audit/audit.jsonl"));
        let out = verify("sanctum-node", &log, &ca);
        assert!(out.status.success(), "{h}: {}", String::from_utf8_lossy(&out.stderr));
        println!("{}", String::from_utf8_lossy(&out.stdout));
        let ev = events(&log);
        assert_eq!(ev.iter().filter(|e| *e == "update_sent").count(), 15, "{h}: {ev:?}");
        assert!(ev.iter().any(|e| e == "plan_accepted") && ev.iter().any(|e| e == "evaluation_sent"));
    }

    // A copy with one changed digit in record 7: caught there, exit status 1.
    let copy = work.path().join("tampered.jsonl");
    let text = std::fs::read_to_string(&coordinator_log).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    lines[7] = lines[7].replacen("\"seq\":7", "\"seq\":8", 1);
    std::fs::write(&copy, lines.join("\n") + "\n").unwrap();
    std::fs::copy(work.path().join("coordinator/audit/audit.jsonl.head"), work.path().join("tampered.jsonl.head"))
        .unwrap();
    let out = verify("sanctum-coordinator", &copy, &ca);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("FAILED: record 7"), "{err}");
    // The tail cut off: caught by the signed head.
    std::fs::write(&copy, text.lines().take(20).map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    let out = verify("sanctum-node", &copy, &ca);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("record 20") && err.contains("tail was cut"), "{err}");
    // A log checked against another consortium's CA is refused.
    let other = tempfile::tempdir().unwrap();
    run_ok(
        Command::new(bin("sanctum-coordinator"))
            .args(["pki", "init", "--dir"])
            .arg(other.path())
            .args(["--consortium", "other"]),
    );
    let out = verify("sanctum-coordinator", &coordinator_log, &other.path().join("ca.pem"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("record 0") && err.contains("not accepted"), "{err}");
}
