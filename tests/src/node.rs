//! A real `sanctum-node run` process, and readers of its state directory (egress log, privacy
//! ledger, audit log) for checks after the fact.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::*;

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

    /// Like [`NodeProcess::start_serving`], with extra environment variables (fault hooks).
    pub fn start_serving_with(
        c: &Consortium,
        name: &str,
        coordinator: &str,
        data: &Path,
        policy: &str,
        env: &[(&str, &str)],
    ) -> Self {
        Self::start_configured(c, name, coordinator, data, policy, env, false)
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

    /// Kills the node (SIGKILL) and waits for it to be gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
