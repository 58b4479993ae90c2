//! A dishonest coordinator against the audit trail: after a short real plan (two hospitals, two
//! rounds, `simulate` as in `audit.rs`), it rewrites a hospital's countersignature in its own log
//! (the verdict flipped to a dispute with a reason the hospital never gave) and re-signs and
//! re-chains the log with its own audit key, so the log still passes `audit verify`. `audit
//! report` must show that countersignature as failed (its signature does not cover the recorded
//! verdict), and, given the hospital's own log, the mismatch with the hospital's record. A log
//! that fails verification refuses the report unless `--allow-unverified`, which marks it red.
//! A receipt deleted from the log (and the log re-chained) is shown MISSING. A report with a
//! failed, missing or mismatching countersignature exits 1.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed step is a failed test

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use sanctum_protocol::audit::{self, AuditLog, Record, Writer};
use sanctum_tests::{HEART_SCHEMA, bin, heart_data, run_ok};
use serde_json::{Value, json};

const HOSPITALS: [&str; 2] = ["cleveland", "hungarian"];

/// One short plan run by `simulate`, kept for every test of this file.
struct Run {
    work: tempfile::TempDir,
}

impl Run {
    fn coordinator_dir(&self) -> PathBuf {
        self.work.path().join("coordinator/audit")
    }
    fn ca(&self) -> PathBuf {
        self.work.path().join("nodes/cleveland/ca.pem")
    }
    fn node_log(&self, h: &str) -> PathBuf {
        self.work.path().join(format!("nodes/{h}/state/audit/audit.jsonl"))
    }
}

fn run() -> &'static Run {
    static RUN: OnceLock<Run> = OnceLock::new();
    RUN.get_or_init(|| {
        let work = tempfile::tempdir().unwrap();
        let hospitals: Vec<String> = HOSPITALS
            .iter()
            .map(|h| format!("    {{ name = \"{h}\", data = {:?} }},", heart_data(h).display().to_string()))
            .collect();
        let plan = format!(
            r#"name = "receipts"
seed = 0
rounds = 2
min_nodes = 2
round_deadline_secs = 120
recruit_deadline_secs = 60

[model]
kind = "logistic_regression"
inputs = 13

[data]
schema = "heart_disease"
schema_sha256 = "39f2b3691b732094488517b366f5bb898ffb1d537dae5f6f2fc1b24c7f225688"
schema_file = {HEART_SCHEMA:?}

[local]
steps = 5
batch_size = 4
optimizer = "sgd"
learning_rate = 0.01

[strategy]
kind = "fedavg"
weighting = "samples"

[simulation]
hospitals = [
{}
]
"#,
            hospitals.join("\n")
        );
        let path = work.path().join("plan.toml");
        std::fs::write(&path, plan).unwrap();
        let started = std::time::Instant::now();
        run_ok(
            Command::new(bin("sanctum-coordinator"))
                .args(["simulate", "--plan"])
                .arg(&path)
                .arg("--workdir")
                .arg(work.path()),
        );
        println!("simulate: 2 hospitals × 2 rounds in {:.1} s", started.elapsed().as_secs_f64());
        Run { work }
    })
}

fn report(log: &Path, nodes: &[PathBuf], ca: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut cmd = Command::new(bin("sanctum-coordinator"));
    cmd.args(["audit", "report", "--log"]).arg(log).arg("--ca").arg(ca).arg("--out").arg(out).args(extra);
    for n in nodes {
        cmd.arg("--node-log").arg(n);
    }
    cmd.env_remove("LD_LIBRARY_PATH").output().unwrap()
}

fn verify(log: &Path, ca: &Path) -> Output {
    Command::new(bin("sanctum-coordinator")).args(["audit", "verify"]).arg(log).arg("--ca").arg(ca).output().unwrap()
}

/// The dishonest coordinator's rewrite: a copy of its audit directory where `receipt` record
/// `target` says what `rewrite` makes it say, re-signed and re-chained with the coordinator's own
/// audit key (`audit.key`) through the audit log's own API: the log is cut just before the
/// record, reopened (the chain continues from its last record), and the record and everything
/// after it appended again; `rewrite` returning false drops the record instead. Returns the
/// forged log's path.
fn forge(run: &Run, into: &Path, rewrite: impl Fn(&mut BTreeMap<String, Value>) -> bool) -> (PathBuf, Record) {
    let src = run.coordinator_dir();
    std::fs::create_dir_all(into).unwrap();
    std::fs::copy(src.join("audit.key"), into.join("audit.key")).unwrap();
    let records = audit::read_records(&src.join("audit.jsonl")).unwrap();
    let target = records.iter().rposition(|r| r.event == "receipt").expect("a receipt in the coordinator's log");
    let text = std::fs::read_to_string(src.join("audit.jsonl")).unwrap();
    let kept: String = text.lines().take(target).map(|l| format!("{l}\n")).collect();
    std::fs::write(into.join("audit.jsonl"), kept).unwrap();
    // The binding exists already, so the certificate key is never asked for: the audit key alone
    // re-signs, which is all a dishonest coordinator needs.
    let refuse = |_: &[u8]| Err::<Vec<u8>, audit::SignError>("not needed".into());
    let writer = Writer { name: "coordinator", role: "coordinator", cert_der: &[], sign_with_cert_key: &refuse };
    let mut log = AuditLog::open(into, &writer).unwrap();
    let mut original = records[target].clone();
    for (i, r) in records.iter().enumerate().skip(target) {
        let mut params = r.params.clone();
        if i == target {
            original = r.clone();
            if !rewrite(&mut params) {
                continue;
            }
        }
        log.append(&r.actor, &r.event, params).unwrap();
    }
    (into.join("audit.jsonl"), original)
}

#[test]
fn a_receipt_whose_verdict_was_flipped_by_the_coordinator_is_shown_in_the_report() {
    let run = run();
    let honest = run.coordinator_dir().join("audit.jsonl");
    let nodes: Vec<PathBuf> = HOSPITALS.iter().map(|h| run.node_log(h)).collect();
    let out_dir = tempfile::tempdir().unwrap();

    // The honest log: every countersignature verifies and matches the hospitals' own records.
    let out = report(&honest, &nodes, &run.ca(), &out_dir.path().join("honest"), &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("honest: {stdout}");
    assert!(stdout.contains("countersignatures: 4 verified of 4, 0 mismatch(es)"), "{stdout}");
    let md = std::fs::read_to_string(out_dir.path().join("honest/report.md")).unwrap();
    assert!(
        md.contains("4 verified, 0 FAILED, 0 MISSING; 0 mismatch(es)")
            && !md.contains("**FAILED")
            && !md.contains("MISMATCH")
            && !md.contains("MISSING:"),
        "{md}"
    );
    assert_eq!(md.matches("| verified | matches |").count(), 4, "{md}");

    // The dishonest coordinator turns an agreeing receipt into a dispute.
    let (forged, original) = forge(run, &out_dir.path().join("forged"), |p| {
        p.insert("agrees".into(), json!(false));
        p.insert("reason".into(), json!("the record lists an update this node never sent"));
        true
    });
    assert_eq!(original.params["agrees"], json!(true), "the hospital agreed");
    let node = original.params["node"].as_str().unwrap().to_string();
    let round = original.params["round"].as_u64().unwrap();
    let out = verify(&forged, &run.ca());
    assert!(out.status.success(), "the rewritten log still verifies: {}", String::from_utf8_lossy(&out.stderr));
    println!("forged log: {}", String::from_utf8_lossy(&out.stdout).trim());

    // Without the hospital's log: the countersignature does not verify over the recorded verdict.
    let out = report(&forged, &[], &run.ca(), &out_dir.path().join("alone"), &[]);
    assert_failed(&out, "1 countersignature(s) FAILED verification, 0 MISSING, 0 MISMATCH");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("forged, coordinator's log alone: {stdout}");
    assert!(stdout.contains("countersignatures: 3 verified of 4"), "{stdout}");
    let md = std::fs::read_to_string(out_dir.path().join("alone/report.md")).unwrap();
    let row = md
        .lines()
        .find(|l| l.starts_with(&format!("| {round} | {node} | disputes |")))
        .unwrap_or_else(|| panic!("no row for {node}'s forged receipt in round {round}:\n{md}"));
    println!("{row}");
    assert!(row.contains("**FAILED: the signature does not verify over the recorded verdict"), "{row}");
    assert!(!md.contains(&format!("DISPUTED by {node}")), "a forged dispute is not reported as the hospital's: {md}");
    assert!(md.contains(&format!("1 FAILED verification ({node})")), "{md}");
    let html = std::fs::read_to_string(out_dir.path().join("alone/report.html")).unwrap();
    assert!(html.contains("<tr class=\"bad\"><td>") && html.contains("FAILED: the signature does not verify"));

    // With the hospitals' logs: the mismatch with the hospital's own record, saying what differs.
    let out = report(&forged, &nodes, &run.ca(), &out_dir.path().join("crossed"), &[]);
    assert_failed(&out, "1 countersignature(s) FAILED verification, 0 MISSING, 1 MISMATCH");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("forged, with the hospitals' logs: {stdout}");
    assert!(stdout.contains("3 verified of 4, 1 mismatch(es)"), "{stdout}");
    let md = std::fs::read_to_string(out_dir.path().join("crossed/report.md")).unwrap();
    let row = md.lines().find(|l| l.starts_with(&format!("| {round} | {node} | disputes |"))).unwrap();
    println!("{row}");
    assert!(
        row.contains("**MISMATCH: verdict: the coordinator's log says the hospital disputes, the hospital's log says it agrees; reason:"),
        "{row}"
    );
}

/// The report was written, and the exit status is 1 with `want` on stderr.
fn assert_failed(out: &Output, want: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("exit {:?}: {}", out.status.code(), stderr.trim());
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(want), "{stderr}");
}

/// The dishonest coordinator deletes a receipt from its log (as it would a dispute it wants
/// unseen; the verdict does not matter to the finding) and re-chains the log: it still passes
/// `audit verify`, and `audit report` shows the round record's countersignature from that
/// hospital as MISSING, or, given the hospital's log, the receipt the hospital signed and the
/// coordinator's log does not hold; either way it exits 1.
#[test]
fn a_receipt_deleted_from_the_coordinators_log_is_shown_missing() {
    let run = run();
    let out_dir = tempfile::tempdir().unwrap();
    let (forged, original) = forge(run, &out_dir.path().join("forged"), |_| false);
    let node = original.params["node"].as_str().unwrap().to_string();
    let round = original.params["round"].as_u64().unwrap();
    let out = verify(&forged, &run.ca());
    assert!(out.status.success(), "the cut log still verifies: {}", String::from_utf8_lossy(&out.stderr));

    let out = report(&forged, &[], &run.ca(), &out_dir.path().join("alone"), &[]);
    assert_failed(&out, "0 countersignature(s) FAILED verification, 1 MISSING, 0 MISMATCH");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("deleted, coordinator's log alone: {stdout}");
    assert!(stdout.contains("countersignatures: 3 verified of 3, 0 mismatch(es) with the hospitals' logs, 1 missing"));
    let md = std::fs::read_to_string(out_dir.path().join("alone/report.md")).unwrap();
    let want = format!("| {round} | {node} | — |  | **MISSING: no countersignature from {node}** | — |");
    let row = md.lines().find(|l| l.starts_with(&want)).unwrap_or_else(|| panic!("no MISSING row {want}:\n{md}"));
    println!("{row}");
    assert!(md.contains("3 verified, 0 FAILED, 1 MISSING;") && md.contains(&format!("1 MISSING ({node})")), "{md}");
    let html = std::fs::read_to_string(out_dir.path().join("alone/report.html")).unwrap();
    assert!(html.contains(&format!("<td class=\"bad\">MISSING: no countersignature from {node}</td>")), "red");

    // With the hospitals' logs: the hospital signed it, the coordinator's log does not hold it
    // (one row, not also MISSING).
    let nodes: Vec<PathBuf> = HOSPITALS.iter().map(|h| run.node_log(h)).collect();
    let out = report(&forged, &nodes, &run.ca(), &out_dir.path().join("crossed"), &[]);
    assert_failed(&out, "0 countersignature(s) FAILED verification, 0 MISSING, 1 MISMATCH");
    let md = std::fs::read_to_string(out_dir.path().join("crossed/report.md")).unwrap();
    assert!(md.contains("the coordinator's log holds no receipt for this countersignature"), "{md}");
}

#[test]
fn a_log_that_fails_verification_refuses_the_report_or_is_marked_red_and_unused() {
    let run = run();
    let out_dir = tempfile::tempdir().unwrap();
    // One hospital's log with a byte changed (not re-signed): it no longer verifies.
    let bad = out_dir.path().join("hungarian.jsonl");
    let text = std::fs::read_to_string(run.node_log("hungarian")).unwrap();
    std::fs::write(&bad, text.replacen("\"update_sent\"", "\"update_Sent\"", 1)).unwrap();
    std::fs::copy(audit::head_path(&run.node_log("hungarian")), audit::head_path(&bad)).unwrap();
    let honest = run.coordinator_dir().join("audit.jsonl");
    let nodes = [run.node_log("cleveland"), bad.clone()];

    let out = report(&honest, &nodes, &run.ca(), &out_dir.path().join("refused"), &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("refused: {stderr}");
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("refused") && stderr.contains("hungarian.jsonl") && stderr.contains("--allow-unverified"));
    assert!(!out_dir.path().join("refused/report.html").exists(), "no report from an unverified log");

    let out = report(&honest, &nodes, &run.ca(), &out_dir.path().join("allowed"), &["--allow-unverified"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let md = std::fs::read_to_string(out_dir.path().join("allowed/report.md")).unwrap();
    let html = std::fs::read_to_string(out_dir.path().join("allowed/report.html")).unwrap();
    assert!(md.contains("> **UNVERIFIED: 1 log(s) failed verification") && html.contains("class=\"banner\""), "{md}");
    let row = md.lines().find(|l| l.starts_with("| ") && l.contains("hungarian.jsonl")).unwrap();
    println!("{row}");
    assert!(row.starts_with("| unverified (claims 'hungarian') |") && row.contains("**FAILED: record"), "{row}");
    assert!(html.contains("<tr class=\"bad\"><td>unverified (claims 'hungarian')"), "a red row");
    assert!(!md.contains("## Hospital hungarian"), "none of its records are used: {md}");
    assert!(md.contains("## Hospital cleveland"));
}
