//! Audit logs after the heart-disease demo (client-level DP by distributed noise under secure
//! aggregation, every hospital capped at ε = 12): the coordinator's and every node's log verify
//! offline (also against the consortium CA) and hold the events an auditor needs; the report built
//! from them renders in headless Chromium (the screenshot's path is printed); any tampering with a
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
    let plan = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/heart_disease/fedavg_client_dp_secagg.toml");
    run_ok(
        Command::new(bin("sanctum-coordinator"))
            .args(["simulate", "--max-epsilon", "12", "--plan"])
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
    // Receipts: each hospital checked every round record against what it sent, and countersigned.
    let text = std::fs::read_to_string(&coordinator_log).unwrap();
    let receipts: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["event"] == "receipt")
        .collect();
    assert_eq!(receipts.len(), 60, "15 rounds × 4 hospitals");
    assert!(receipts.iter().all(|r| r["params"]["agrees"] == true), "{receipts:?}");
    assert!(
        receipts.iter().all(|r| r["params"]["certificate"].as_str().is_some_and(|c| c.len() > 100)),
        "re-verifiable"
    );
    for h in ["cleveland", "hungarian", "switzerland", "va"] {
        let log = work.path().join(format!("nodes/{h}/state/audit/audit.jsonl"));
        let out = verify("sanctum-node", &log, &ca);
        assert!(out.status.success(), "{h}: {}", String::from_utf8_lossy(&out.stderr));
        println!("{}", String::from_utf8_lossy(&out.stdout));
        let ev = events(&log);
        assert_eq!(ev.iter().filter(|e| *e == "update_sent").count(), 15, "{h}: {ev:?}");
        assert!(ev.iter().any(|e| e == "plan_accepted") && ev.iter().any(|e| e == "evaluation_sent"));
        assert_eq!(ev.iter().filter(|e| *e == "epsilon_charged").count(), 15, "{h}: {ev:?}");
        assert_eq!(ev.iter().filter(|e| *e == "receipt_signed").count(), 15, "{h}: {ev:?}");
    }

    // The report, from the verified logs, rendered by a real browser.
    let report = work.path().join("report");
    let mut cmd = Command::new(bin("sanctum-coordinator"));
    cmd.args(["audit", "report", "--log"]).arg(&coordinator_log).arg("--ca").arg(&ca).arg("--out").arg(&report);
    for h in ["cleveland", "hungarian", "switzerland", "va"] {
        cmd.arg("--node-log").arg(work.path().join(format!("nodes/{h}/state/audit/audit.jsonl")));
    }
    let out = run_ok(&mut cmd);
    // Every countersignature re-verified (certificate, signature over the verdict, the round
    // record's hash) and matched with the hospital's own record of it.
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(stdout.contains("countersignatures: 60 verified of 60, 0 mismatch(es)"), "{stdout}");
    let html = std::fs::read_to_string(report.join("report.html")).unwrap();
    assert_eq!(html.matches("class=\"ok\">OK (").count(), 5, "every log verified");
    assert!(html.contains("t = 4") && html.contains("policy.max_epsilon = 12") && html.contains("<svg"));
    // ε from the one per-round ρ nodes charge and the coordinator reports (issue 9).
    assert!(html.contains("client-level ε = 9.999"), "the plan's client-level ε is reported");
    let md = std::fs::read_to_string(report.join("report.md")).unwrap();
    assert!(md.contains("## Hospital va") && md.contains("| 15 | 9.99"), "{md}");
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("audit-report.png");
    let _ = std::fs::remove_file(&shot);
    let out = Command::new("chromium")
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,2400"])
        .arg(format!("--screenshot={}", shot.display()))
        .arg(format!("file://{}", report.join("report.html").display()))
        .output()
        .expect("chromium must be installed (scripts/test installs Debian's chromium)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG") && png.len() > 50_000, "screenshot of {} bytes", png.len());
    println!("report rendered by Chromium: screenshot {} ({} bytes)", shot.display(), png.len());

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
