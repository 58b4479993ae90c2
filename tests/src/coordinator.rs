//! A real `sanctum-coordinator serve` process: started on loopback port 0 with any config a test
//! needs, restarted on the same state, killed with SIGKILL or stopped with SIGTERM, and its log
//! and audit log read back.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::*;

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
        self.status_kib("VmRSS:")
    }

    /// The most it has held resident since it started, in KiB (`VmHWM` in `/proc/PID/status`).
    pub fn peak_rss_kib(&self) -> u64 {
        self.status_kib("VmHWM:")
    }

    /// A `kB` field of `/proc/PID/status` (0 when it cannot be read).
    fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
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

    /// Uploads in its upload spool now: the files directly in `state/spool/` (its `robust/`
    /// subdirectory holds the robust aggregators' round buffers, not uploads).
    pub fn spool_files(&self) -> usize {
        std::fs::read_dir(self.state_dir().join("spool"))
            .map(|d| d.filter_map(Result::ok).filter(|e| e.path().is_file()).count())
            .unwrap_or(0)
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
