//! Harness for Sanctum's end-to-end tests: a throw-away consortium made with the real CLIs,
//! the real `sanctum-coordinator` and `sanctum-node` processes on loopback port 0, and clients
//! holding any certificate a test needs (including ones the coordinator must refuse).
//!
//! The binaries must be built first (`cargo build --workspace --bins`, which `scripts/test`
//! does); every process is killed when its handle drops.
//!
//! # Layout
//! - this file: the consortium, channels, the bundled data and waiting helpers;
//! - `coordinator`: a real coordinator process ([`CoordinatorProcess`]);
//! - `node`: a real node process ([`NodeProcess`]) and readers of its state directory (egress
//!   log, privacy ledger, audit log) for checks after the fact;
//! - [`rogue`]: a rogue coordinator holding the real coordinator certificate, which sends a
//!   real node any directive a test scripts and records everything the node sends.
//! - [`peer`]: rogue peers of the coordinator: a client with a node certificate, one with the
//!   lead's, and a raw TCP client with none.
//! - [`runs`]: whole runs from outside: the coordinator's store (SQLite or a PostgreSQL schema of
//!   the test's own) read back, the lead's CLI, a run's final accuracy.
//! - [`scripted`]: scripted nodes: a node certificate's client that accepts every offer and
//!   answers each round as the test says, uploading in the real node's chunks (no node process).

#![allow(clippy::expect_used, clippy::panic)]

mod coordinator;
mod node;
pub mod peer;
pub mod rogue;
pub mod runs;
pub mod scripted;

pub use coordinator::CoordinatorProcess;
pub use node::{EgressRecord, LedgerCharge, NodeProcess, epsilon_by_run, read_audit_records};

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use sanctum_protocol::tls::{self, TlsFiles, TlsMaterial};
use tonic::transport::Channel;

/// Path of a workspace binary next to the test executable's target directory.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target directory");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first with `cargo build --workspace --bins` (scripts/test does)",
        path.display()
    );
    path
}

/// Runs a CLI to completion and insists it succeeded.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.env_remove("LD_LIBRARY_PATH").output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A consortium PKI in a temporary directory, made with `pki init`.
pub struct Consortium {
    pub dir: tempfile::TempDir,
}

impl Default for Consortium {
    fn default() -> Self {
        Self::new()
    }
}

impl Consortium {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        run_ok(Command::new(bin("sanctum-coordinator")).args(["pki", "init", "--dir"]).arg(dir.path().join("pki")));
        Self { dir }
    }

    pub fn pki(&self) -> PathBuf {
        self.dir.path().join("pki")
    }

    /// The files of a member whose key was made by `sanctum-node pki request` and signed by
    /// `sanctum-coordinator pki sign` with `role`.
    pub fn member(&self, name: &str, role: &str) -> TlsFiles {
        let out = self.dir.path().join("members").join(name);
        run_ok(Command::new(bin("sanctum-node")).args(["pki", "request", "--name", name, "--out-dir"]).arg(&out));
        let cert = out.join(format!("{name}.pem"));
        run_ok(
            Command::new(bin("sanctum-coordinator"))
                .args(["pki", "sign", "--dir"])
                .arg(self.pki())
                .arg("--csr")
                .arg(out.join(format!("{name}.csr")))
                .args(["--name", name, "--role", role, "--out"])
                .arg(&cert),
        );
        TlsFiles { ca: self.pki().join("ca.pem"), cert, key: out.join(format!("{name}.key")) }
    }

    /// The lead's files made by `pki init`.
    pub fn lead(&self) -> TlsFiles {
        TlsFiles { ca: self.pki().join("ca.pem"), cert: self.pki().join("lead.pem"), key: self.pki().join("lead.key") }
    }
}

/// A mutual-TLS channel to the coordinator holding `files`' certificate.
pub async fn channel(address: &str, files: &TlsFiles) -> Result<Channel, tls::TlsError> {
    let material = TlsMaterial::load(files)?;
    tls::connect(address, &material).await
}

/// The heart-disease schema file every test hospital holds.
pub const HEART_SCHEMA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/heart_disease/schema.toml");

/// The SHA-256 of [`HEART_SCHEMA`], as the tests' plans name it (`data.schema_sha256`). When the
/// schema file changes, `heart_schema_hash_is_the_files` fails with the new hash: replace the old
/// one in tests/ (`grep -rl OLD tests | xargs sed -i s/OLD/NEW/`).
pub const HEART_SCHEMA_SHA256: &str = "39f2b3691b732094488517b366f5bb898ffb1d537dae5f6f2fc1b24c7f225688";

/// The bundled heart-disease data file of a hospital.
pub fn heart_data(hospital: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/heart_disease/data").join(format!("{hospital}.csv"))
}

/// Polls `f` every 50 ms until it is true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

/// Submits `plan` as the lead and watches the run it started (that run's events only); returns
/// the plan id and the event stream.
pub async fn submit_and_watch(
    lead: &mut sanctum_protocol::proto::lead_client::LeadClient<Channel>,
    plan: impl Into<String>,
) -> (String, tonic::Streaming<sanctum_protocol::proto::PlanEvent>) {
    use sanctum_protocol::proto::{SubmitPlanRequest, WatchPlanRequest};
    let submitted = lead
        .submit_plan(SubmitPlanRequest { plan_toml: plan.into(), again: false, model_file: vec![] })
        .await
        .expect("the coordinator accepts the plan")
        .into_inner();
    let events = lead
        .watch_plan(WatchPlanRequest { plan_id: submitted.plan_id.clone(), run: submitted.run })
        .await
        .expect("the run can be watched")
        .into_inner();
    (submitted.plan_id, events)
}

/// The next event of a watched plan; panics with `stalled` if none comes within `secs`.
pub async fn next_event(
    events: &mut tonic::Streaming<sanctum_protocol::proto::PlanEvent>,
    secs: u64,
    stalled: &str,
) -> sanctum_protocol::proto::PlanEvent {
    tokio::time::timeout(Duration::from_secs(secs), events.message())
        .await
        .expect(stalled)
        .expect("the watch stream failed")
        .expect("the watch stream ended before the plan finished")
}

/// The node decisions and the end of a watched run, waiting at most `secs` for each event.
pub async fn follow_run(
    events: &mut tonic::Streaming<sanctum_protocol::proto::PlanEvent>,
    secs: u64,
) -> (Vec<sanctum_protocol::proto::NodeDecision>, sanctum_protocol::proto::PlanFinished) {
    use sanctum_protocol::proto::plan_event::Kind;
    let mut decisions = Vec::new();
    loop {
        match next_event(events, secs, "the plan stalled").await.kind {
            Some(Kind::NodeDecision(d)) => decisions.push(d),
            Some(Kind::PlanFinished(f)) => return (decisions, f),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    /// The hash the tests' plans carry is the schema file's.
    #[test]
    fn heart_schema_hash_is_the_files() {
        let bytes = std::fs::read(super::HEART_SCHEMA).unwrap();
        let hash = sanctum_protocol::hash::ContentHash::of(&bytes).to_hex();
        assert_eq!(
            hash,
            super::HEART_SCHEMA_SHA256,
            "examples/heart_disease/schema.toml changed: its hash is now {hash}"
        );
    }
}
