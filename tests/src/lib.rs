//! Harness for Sanctum's end-to-end tests: a throw-away consortium made with the real CLIs,
//! the real `sanctum-coordinator` and `sanctum-node` processes on loopback port 0, and clients
//! holding any certificate a test needs (including ones the coordinator must refuse).
//!
//! The binaries must be built first (`cargo build --workspace --bins`, which `scripts/test`
//! does); every process is killed when its handle drops.
//!
//! # Layout
//! - this file: the consortium, the processes, channels, and readers of a node's state
//!   directory (egress log, privacy ledger, audit log) for checks after the fact;
//! - [`rogue`]: a rogue coordinator holding the real coordinator certificate, which sends a
//!   real node any directive a test scripts and records everything the node sends.
//! - [`peer`]: rogue peers of the coordinator: a client with a node certificate, one with the
//!   lead's, and a raw TCP client with none.
//! - [`runs`]: whole runs from outside: the coordinator's store (SQLite or a PostgreSQL schema of
//!   the test's own) read back, the lead's CLI, a run's final accuracy.

#![allow(clippy::expect_used, clippy::panic)]

pub mod peer;
pub mod rogue;
pub mod runs;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
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

/// A running `sanctum-coordinator serve`.
pub struct CoordinatorProcess {
    child: Child,
    pub addr: SocketAddr,
    pub log: PathBuf,
    dir: PathBuf,
}

impl CoordinatorProcess {
    /// Starts it on 127.0.0.1:0 and waits for the address it bound.
    pub fn start(c: &Consortium) -> Self {
        Self::start_with(c, &[])
    }

    /// Like [`CoordinatorProcess::start`], with extra environment variables (test hooks).
    pub fn start_with(c: &Consortium, env: &[(&str, &str)]) -> Self {
        Self::start_configured(c, "", env)
    }

    /// Like [`CoordinatorProcess::start_with`], with `extra` appended to `coordinator.toml` after
    /// its `[tls]` table (so it starts with a table of its own, e.g. `[limits]`).
    pub fn start_configured(c: &Consortium, extra: &str, env: &[(&str, &str)]) -> Self {
        match Self::try_start_configured(c, extra, env) {
            Ok(p) => p,
            Err(log) => panic!("coordinator did not start; log:\n{log}"),
        }
    }

    /// Starts the coordinator; when it does not print its address, the log of why (for tests of
    /// configurations it must refuse).
    pub fn try_start_configured(c: &Consortium, extra: &str, env: &[(&str, &str)]) -> Result<Self, String> {
        let dir = c.dir.path().join("coordinator");
        std::fs::create_dir_all(&dir).expect("mkdir");
        let config = dir.join("coordinator.toml");
        let pki = c.pki();
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:0\"\nstate_dir = \"state\"\nevaluation_deadline_secs = 30\nrevocation_list = {:?}\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
                pki.join("revoked.json"),
                pki.join("ca.pem"),
                pki.join("coordinator.pem"),
                pki.join("coordinator.key")
            ) + extra,
        )
        .expect("write config");
        let log = dir.join("coordinator.log");
        let (child, addr) = Self::serve(&config, std::fs::File::create(&log).expect("log"), env)
            .map_err(|line| format!("stdout {line:?}\n{}", std::fs::read_to_string(&log).unwrap_or_default()))?;
        Ok(Self { child, addr, log, dir })
    }

    /// Spawns `serve --config CONFIG` with its log going to `stderr` and waits for the address it
    /// bound; the first line of its stdout when it is not that address (the process is then gone).
    fn serve(config: &Path, stderr: std::fs::File, env: &[(&str, &str)]) -> Result<(Child, SocketAddr), String> {
        let mut child = Command::new(bin("sanctum-coordinator"))
            .args(["serve", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn coordinator");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("read");
        match line.trim().strip_prefix("listening on ").and_then(|a| a.parse().ok()) {
            Some(addr) => Ok((child, addr)),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                Err(line)
            }
        }
    }

    /// The process id, e.g. to read its memory from `/proc`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its resident set size in KiB (`VmRSS` in `/proc/PID/status`).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// Its state directory (`state/` beside its config).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// The records of its audit log, as written so far.
    pub fn audit_records(&self) -> Vec<sanctum_protocol::audit::Record> {
        read_audit_records(&self.state_dir().join("audit"))
    }

    /// Partial uploads it holds now, kept so an interrupted upload resumes (`state/partial/`).
    pub fn partial_files(&self) -> usize {
        std::fs::read_dir(self.state_dir().join("partial")).map(|d| d.count()).unwrap_or(0)
    }

    /// Files in its upload spool now.
    pub fn spool_files(&self) -> usize {
        std::fs::read_dir(self.state_dir().join("spool")).map(|d| d.count()).unwrap_or(0)
    }

    /// `localhost:PORT`, the name in the coordinator's certificate.
    pub fn address(&self) -> String {
        format!("localhost:{}", self.addr.port())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `n` node connections are in the log; panics with the log if they never come.
    pub fn wait_for_nodes(&self, n: usize) {
        assert!(
            wait_until(Duration::from_secs(60), || self.log_text().matches("node connected").count() >= n),
            "nodes did not connect:\n{}",
            self.log_text()
        );
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits up to `timeout` for it to exit on its own (after a signal); its status, or `None`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Kills it with SIGKILL (no chance to flush or drain), as a crash or `kill -9` would.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same port, config and state directory (after [`Self::kill9`]), so
    /// the nodes' configured address reaches it; the log goes on in the same file.
    pub fn restart(&mut self) {
        let config = self.dir.join("coordinator.toml");
        let text = std::fs::read_to_string(&config).expect("config");
        let port = self.addr.port();
        let text = text.replacen("listen = \"127.0.0.1:0\"", &format!("listen = \"127.0.0.1:{port}\""), 1);
        std::fs::write(&config, text).expect("config");
        let log = std::fs::OpenOptions::new().append(true).open(&self.log).expect("log");
        let (child, _) = Self::serve(&config, log, &[])
            .unwrap_or_else(|line| panic!("the coordinator did not restart: {line:?}\n{}", self.log_text()));
        self.child = child;
    }
}

impl Drop for CoordinatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `sanctum-node run --exit-after-plan`.
pub struct NodeProcess {
    pub child: Child,
    pub log: PathBuf,
    /// The node's config file, for `sanctum-node budget` and restarts.
    pub config: PathBuf,
    /// Whether it runs with `--exit-after-plan` (kept for restarts).
    exit_after_plan: bool,
}

impl NodeProcess {
    pub fn start(c: &Consortium, name: &str, coordinator: &str, data: &Path) -> Self {
        Self::start_with_policy(c, name, coordinator, data, "")
    }

    /// Like [`NodeProcess::start`], with extra lines in the node's `[policy]` section.
    pub fn start_with_policy(c: &Consortium, name: &str, coordinator: &str, data: &Path, policy: &str) -> Self {
        Self::start_with(c, name, coordinator, data, policy, &[])
    }

    /// Like [`NodeProcess::start_with_policy`], with extra environment variables (fault hooks).
    pub fn start_with(
        c: &Consortium,
        name: &str,
        coordinator: &str,
        data: &Path,
        policy: &str,
        env: &[(&str, &str)],
    ) -> Self {
        Self::start_configured(c, name, coordinator, data, policy, env, true)
    }

    /// Like [`NodeProcess::start_with_policy`], but without `--exit-after-plan`: the node serves
    /// plan after plan (and run after run) until the test drops it.
    pub fn start_serving(c: &Consortium, name: &str, coordinator: &str, data: &Path, policy: &str) -> Self {
        Self::start_configured(c, name, coordinator, data, policy, &[], false)
    }

    fn start_configured(
        c: &Consortium,
        name: &str,
        coordinator: &str,
        data: &Path,
        policy: &str,
        env: &[(&str, &str)],
        exit_after_plan: bool,
    ) -> Self {
        let datasets = format!("[[datasets]]\nschema = {HEART_SCHEMA:?}\npath = {data:?}\n");
        let policy = format!("allowed_models = [\"logistic_regression\"]\n{policy}");
        Self::start_configured_with(c, name, coordinator, &datasets, &policy, env, exit_after_plan)
    }

    /// A node that serves plan after plan (as [`NodeProcess::start_serving`]) whose `node.toml`
    /// holds `datasets`, whole `[[datasets]]` tables in TOML (schema files, paths, formats,
    /// `[datasets.columns]`), and `policy`, the whole body of its `[policy]` table
    /// (`allowed_models` included).
    pub fn start_with_datasets(c: &Consortium, name: &str, coordinator: &str, datasets: &str, policy: &str) -> Self {
        Self::start_configured_with(c, name, coordinator, datasets, policy, &[], false)
    }

    /// Like [`NodeProcess::start_with_datasets`], with extra environment variables (fault hooks);
    /// [`NodeProcess::restart`] starts it again without them.
    pub fn start_with_datasets_env(
        c: &Consortium,
        name: &str,
        coordinator: &str,
        datasets: &str,
        policy: &str,
        env: &[(&str, &str)],
    ) -> Self {
        Self::start_configured_with(c, name, coordinator, datasets, policy, env, false)
    }

    fn start_configured_with(
        c: &Consortium,
        name: &str,
        coordinator: &str,
        datasets: &str,
        policy: &str,
        env: &[(&str, &str)],
        exit_after_plan: bool,
    ) -> Self {
        let files = c.member(name, "node");
        let dir = c.dir.path().join("members").join(name);
        let config = dir.join("node.toml");
        std::fs::write(
            &config,
            format!(
                "coordinator = {coordinator:?}\ndevice = \"cpu\"\nthreads = 1\nstate_dir = \"state\"\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n{datasets}\n[policy]\n{policy}\n",
                files.ca, files.cert, files.key
            ),
        )
        .expect("write node config");
        let log = dir.join("node.log");
        let child = Self::spawn(&config, &log, env, exit_after_plan);
        Self { child, log, config, exit_after_plan }
    }

    /// The process id, e.g. to read its memory from `/proc`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its peak resident set size so far in KiB (`VmHWM` in `/proc/PID/status`; 0 once it exited).
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    fn spawn(config: &Path, log: &Path, env: &[(&str, &str)], exit_after_plan: bool) -> Child {
        let mut cmd = Command::new(bin("sanctum-node"));
        cmd.arg("run");
        if exit_after_plan {
            cmd.arg("--exit-after-plan");
        }
        cmd.arg("--config")
            .arg(config)
            .env_remove("LD_LIBRARY_PATH")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::OpenOptions::new().create(true).append(true).open(log).expect("log"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.spawn().expect("spawn node")
    }

    /// Starts the same node again (same key, config and state directory) after it stopped.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Self::spawn(&self.config, &self.log, &[], self.exit_after_plan);
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (polling the process, without blocking the runtime) until the node exits; `None`
    /// when it is still running after `timeout`.
    pub async fn exited(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let end = tokio::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if tokio::time::Instant::now() >= end {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The node's state directory (`state_dir = "state"` next to its config).
    pub fn state_dir(&self) -> PathBuf {
        self.config.with_file_name("state")
    }

    /// The node's egress log as it stands (empty when there is none yet).
    pub fn egress(&self) -> Vec<EgressRecord> {
        json_lines(&self.state_dir().join("egress.jsonl")).into_iter().map(EgressRecord::from_json).collect()
    }

    /// The node's privacy ledger as it stands (empty when there is none yet).
    pub fn ledger(&self) -> Vec<LedgerCharge> {
        json_lines(&self.state_dir().join("privacy_ledger.jsonl")).into_iter().map(LedgerCharge::from_json).collect()
    }

    /// The node's audit log records, in order (empty when there is none yet).
    pub fn audit_records(&self) -> Vec<sanctum_protocol::audit::Record> {
        read_audit_records(&self.state_dir().join("audit"))
    }
}

/// The records of the audit log in `dir` (`audit.jsonl`), in order; empty when there is none yet.
pub fn read_audit_records(dir: &Path) -> Vec<sanctum_protocol::audit::Record> {
    let path = dir.join("audit.jsonl");
    if !path.exists() {
        return Vec::new();
    }
    sanctum_protocol::audit::read_records(&path).unwrap_or_else(|e| panic!("audit log: {e}"))
}

/// Parses a JSON Lines file; a missing file is empty, a line that does not parse fails the test.
/// A last line without its newline is a write still under way (the file is read while the node
/// runs) and is left for the next read.
fn json_lines(path: &Path) -> Vec<serde_json::Value> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{} has a bad line ({e}): {l}", path.display())))
        .collect()
}

/// One line of a node's egress log (`node/src/egress.rs`): a message about to leave.
#[derive(Clone, Debug)]
pub struct EgressRecord {
    pub call: String,
    pub plan_id: String,
    pub round: Option<u32>,
    pub bytes: u64,
    /// The policy rule that let it leave, in words.
    pub rule: String,
    /// The whole line, for fields added later (a run id, a payload hash).
    pub raw: serde_json::Value,
}

impl EgressRecord {
    fn from_json(raw: serde_json::Value) -> Self {
        let text = |k: &str| raw.get(k).and_then(|v| v.as_str()).unwrap_or_default().to_string();
        Self {
            call: text("call"),
            plan_id: text("plan_id"),
            round: raw.get("round").and_then(|v| v.as_u64()).map(|r| r as u32),
            bytes: raw.get("bytes").and_then(|v| v.as_u64()).unwrap_or(0),
            rule: text("rule"),
            raw,
        }
    }

    /// An upload that re-sends bytes already released (and charged) for its round, which the
    /// node marks in the rule ("re-send ..."); it is not a new release.
    pub fn is_resend(&self) -> bool {
        let rule = self.rule.to_lowercase();
        rule.contains("re-send") || rule.contains("resend") || rule.contains("re-sent")
    }

    /// An upload that carried a new release (a plain update or a masked input).
    pub fn is_release(&self) -> bool {
        self.call == "SubmitUpdate" && !self.is_resend()
    }
}

/// One charge of a node's privacy ledger (`node/src/ledger.rs`).
#[derive(Clone, Debug)]
pub struct LedgerCharge {
    pub dataset: String,
    pub plan_id: String,
    /// The plan run charged (absent in ledgers written before runs were recorded).
    pub run: Option<String>,
    pub round: u32,
    /// The run's cumulative ε after this round.
    pub epsilon: f64,
    pub delta: f64,
    pub steps: u64,
    pub raw: serde_json::Value,
}

impl LedgerCharge {
    fn from_json(raw: serde_json::Value) -> Self {
        let text = |k: &str| raw.get(k).and_then(|v| v.as_str()).unwrap_or_default().to_string();
        let num = |k: &str| raw.get(k).and_then(|v| v.as_f64()).unwrap_or(f64::NAN);
        Self {
            dataset: text("dataset"),
            plan_id: text("plan_id"),
            run: raw.get("run").and_then(|v| v.as_str()).map(str::to_string),
            round: raw.get("round").and_then(|v| v.as_u64()).unwrap_or(u64::MAX) as u32,
            epsilon: num("epsilon"),
            delta: num("delta"),
            steps: raw.get("steps").and_then(|v| v.as_u64()).unwrap_or(0),
            raw,
        }
    }
}

/// ε spent per (plan, run): each run counts with its largest cumulative charge.
pub fn epsilon_by_run(charges: &[LedgerCharge]) -> std::collections::BTreeMap<(String, Option<String>), f64> {
    let mut by_run = std::collections::BTreeMap::new();
    for c in charges {
        let e = by_run.entry((c.plan_id.clone(), c.run.clone())).or_insert(0.0_f64);
        *e = e.max(c.epsilon);
    }
    by_run
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
