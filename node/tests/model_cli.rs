//! `sanctum-node model approve | list | revoke | inspect` end to end, as a hospital runs them:
//! approvals land in the approvals file and, exactly once each, in the node's signed audit log,
//! which `sanctum-node audit verify` accepts; a file that is not TorchScript is never approved.

#![allow(clippy::unwrap_used)] // test helpers: a failed step is a failed test

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sanctum_node::approvals::{Approvals, audit_pending};
use sanctum_node::state_lock::StateLock;
use sanctum_protocol::audit::AuditLog;
use sanctum_protocol::hash::ContentHash;
use sanctum_protocol::pki::{self, Role, SignSpec};
use sanctum_protocol::tls::{TlsFiles, TlsMaterial};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/torchscript").join(name)
}

/// A hospital's directory: a CA, the node's certificate and key, node.toml (no datasets).
fn hospital() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let ca = pki::init_ca("test", 1).unwrap();
    let me =
        pki::issue(&ca.cert_pem, &ca.key_pem, &SignSpec { name: "st-olav", role: Role::Node, days: 1, hosts: &[] })
            .unwrap();
    std::fs::write(dir.path().join("ca.pem"), &ca.cert_pem).unwrap();
    std::fs::write(dir.path().join("node.pem"), &me.cert_pem).unwrap();
    std::fs::write(dir.path().join("node.key"), &me.key_pem).unwrap();
    std::fs::write(
        dir.path().join("node.toml"),
        "coordinator = \"127.0.0.1:1\"\nstate_dir = \"state\"\ndevice = \"cpu\"\n[tls]\nca = \"ca.pem\"\ncert = \"node.pem\"\nkey = \"node.key\"\n",
    )
    .unwrap();
    dir
}

fn node(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sanctum-node")).current_dir(dir).args(args).output().unwrap()
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

fn sha_of(path: &Path) -> String {
    ContentHash::of(&std::fs::read(path).unwrap()).to_hex()
}

/// The audit log's records of `event`, as (sha256, key).
fn audit_events(dir: &Path, event: &str) -> Vec<(String, String)> {
    let log = std::fs::read_to_string(dir.join("state/audit/audit.jsonl")).unwrap_or_default();
    log.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["event"] == event)
        .map(|r| {
            (r["params"]["sha256"].as_str().unwrap().to_string(), r["params"]["key"].as_str().unwrap().to_string())
        })
        .collect()
}

fn verify(dir: &Path) -> String {
    let o = node(dir, &["audit", "verify", "state/audit/audit.jsonl", "--ca", "ca.pem"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "audit verify failed: {out}{err}");
    out
}

#[test]
fn approve_list_revoke_and_refuse_files_that_do_not_load() {
    let h = hospital();
    let dir = h.path();
    let logreg = fixture("logreg.pt");
    let sha = sha_of(&logreg);
    let logreg_arg = logreg.to_str().unwrap();

    // Inspect approves nothing.
    let o = node(dir, &["model", "inspect", logreg_arg, "--inputs", "13"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains(&format!("sha256 = \"{sha}\"")) && out.contains("kind = \"torchscript\""), "{out}");
    assert!(!dir.join("approved_models.toml").exists());

    let o = node(
        dir,
        &["model", "approve", logreg_arg, "--config", "node.toml", "--by", "Dr. A. Steward", "--inputs", "13"],
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(out.contains(&format!("approved model {sha} (logreg) by Dr. A. Steward")), "{out}");
    assert!(out.contains("audit log: 1 event(s) written"), "{out}");
    assert!(out.contains("outputs = 1") && out.contains("{ name = \"fc.weight\", shape = [1, 13] }"), "{out}");
    println!("{out}");

    let o = node(dir, &["model", "list", "--config", "node.toml"]);
    let (out, _) = text(&o);
    assert!(
        o.status.success() && out.contains(&format!("{sha} logreg (14 parameters")) && out.contains("; approved"),
        "{out}"
    );

    // A second approval of the same hash is refused.
    let o = node(dir, &["model", "approve", logreg_arg, "--config", "node.toml", "--by", "X", "--inputs", "13"]);
    assert!(!o.status.success());
    assert!(text(&o).1.contains("is already approved (by Dr. A. Steward"), "{}", text(&o).1);

    // Garbage, a zip that is not TorchScript, a module with buffers: not approved, with the reason.
    std::fs::write(dir.join("garbage.pt"), (0..2048u32).map(|i| (i * 7919 % 251) as u8).collect::<Vec<_>>()).unwrap();
    for (file, reason) in [
        ("garbage.pt".to_string(), "not a zip archive"),
        (fixture("batchnorm.pt").display().to_string(), "has buffers (BatchNorm1d.running_mean"),
    ] {
        let o = node(
            dir,
            &["model", "approve", &file, "--config", "node.toml", "--by", "Dr. A. Steward", "--inputs", "13"],
        );
        let (out, err) = text(&o);
        assert_eq!(o.status.code(), Some(1), "{out}{err}");
        assert!(err.contains("is not approved") && err.contains(reason), "{file}: {err}");
    }
    let approvals = Approvals::load(&dir.join("approved_models.toml")).unwrap();
    assert_eq!(approvals.entries().len(), 1, "nothing but logreg was approved");

    let o = node(dir, &["model", "revoke", &sha, "--config", "node.toml", "--by", "Dr. B. Other"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(out.contains("audit log: 1 event(s) written"), "{out}");
    let o = node(dir, &["model", "list", "--config", "node.toml"]);
    assert!(text(&o).0.contains("REVOKED by Dr. B. Other"), "{}", text(&o).0);
    let o = node(dir, &["model", "revoke", &sha, "--config", "node.toml", "--by", "Dr. B. Other"]);
    assert!(!o.status.success() && text(&o).1.contains("is not approved here"), "{}", text(&o).1);

    assert_eq!(audit_events(dir, "model_approved").len(), 1);
    assert_eq!(
        audit_events(dir, "model_revoked"),
        vec![(sha.clone(), audit_events(dir, "model_revoked")[0].1.clone())]
    );
    println!("{}", verify(dir));
}

#[test]
fn an_approval_made_while_the_node_runs_reaches_the_audit_log_once_through_the_node() {
    let h = hospital();
    let dir = h.path();
    let mlp = fixture("mlp.pt");
    let sha = sha_of(&mlp);
    // The running node holds the state directory.
    let lock = StateLock::acquire(&dir.join("state")).unwrap();
    let o = node(
        dir,
        &["model", "approve", mlp.to_str().unwrap(), "--config", "node.toml", "--by", "Dr. A", "--inputs", "13"],
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(out.contains("the node is running; it writes this into its audit log"), "{out}");
    assert!(audit_events(dir, "model_approved").is_empty());
    // What the daemon does at start and on each offer, holding the lock.
    let material =
        TlsMaterial::load(&TlsFiles { ca: dir.join("ca.pem"), cert: dir.join("node.pem"), key: dir.join("node.key") })
            .unwrap();
    let mut log = AuditLog::open_for(&dir.join("state/audit"), &material).unwrap();
    let approvals = Approvals::load(&dir.join("approved_models.toml")).unwrap();
    assert!(approvals.is_approved(&sha).is_some());
    assert_eq!(audit_pending(&approvals, &dir.join("state"), &mut log).unwrap(), 1);
    assert_eq!(audit_pending(&approvals, &dir.join("state"), &mut log).unwrap(), 0, "audited once");
    drop((log, lock));
    // A stopped node: the CLI audits itself, and finds nothing left of the earlier approval.
    let o = node(dir, &["model", "revoke", &sha, "--config", "node.toml", "--by", "Dr. B"]);
    assert!(text(&o).0.contains("audit log: 1 event(s) written"), "{}", text(&o).0);
    assert_eq!(
        audit_events(dir, "model_approved").iter().map(|(s, _)| s.clone()).collect::<Vec<_>>(),
        vec![sha.clone()]
    );
    assert_eq!(audit_events(dir, "model_revoked").len(), 1);
    verify(dir);
}
