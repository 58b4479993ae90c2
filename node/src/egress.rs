//! The node's record of everything it sent: one JSON line per message, with its size and the
//! policy rule that allowed it, fsync'd before the message leaves.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Why a message was allowed to leave.
#[derive(Clone, Copy, Debug)]
pub enum Rule {
    /// Hello on connect: software version and device.
    Subscribe,
    /// Accepting or refusing a plan, with the reason.
    PlanDecision,
    /// A model update for a plan the policy accepted: a new release (charged first under DP).
    ModelUpdate,
    /// The same bytes as an earlier `ModelUpdate` of the same run and round, sent again: no new
    /// release, nothing new charged.
    ModelUpdateResend,
    /// Metrics of a global model on the local test split.
    Evaluation,
    /// Asking for a global model by hash.
    ModelRequest,
    /// Secure aggregation: signed round keys, encrypted shares, a consistency signature or
    /// unmasking shares (never the update itself; that is the masked ModelUpdate).
    SecAgg,
    /// A countersignature of the coordinator's record of a round.
    Receipt,
    /// "Still training this round": plan id, round, run and phase, nothing of the data.
    Heartbeat,
    /// Asking how much of an interrupted upload the coordinator holds: plan, round and the
    /// payload's hash, which its upload's header carries anyway.
    UploadStatus,
}

impl Rule {
    fn as_str(self) -> &'static str {
        match self {
            Rule::Subscribe => "subscribe: version and device only",
            Rule::PlanDecision => "plan decision under local policy",
            Rule::ModelUpdate => "model update for an accepted plan (policy.allowed_models)",
            Rule::ModelUpdateResend => "re-send of this round's stored update: no new release, no new charge",
            Rule::Evaluation => "aggregate test metric of a global model",
            Rule::ModelRequest => "model request by content hash",
            Rule::Receipt => "countersignature of a round record (hashes only)",
            Rule::Heartbeat => "heartbeat while training: plan, round, run and phase only",
            Rule::SecAgg => "secure-aggregation keys, encrypted shares or signatures for an accepted plan",
            Rule::UploadStatus => "where to resume an upload: plan, round and payload hash only",
        }
    }
}

/// Append-only, fsync'd JSON Lines file.
pub struct EgressLog {
    file: File,
    path: PathBuf,
}

impl EgressLog {
    /// Opens (creating) `dir/egress.jsonl`.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("egress.jsonl");
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        Ok(Self { file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records a message about to leave; it must not leave if this fails.
    pub fn record(
        &mut self,
        call: &str,
        plan_id: &str,
        round: Option<u32>,
        bytes: usize,
        rule: Rule,
    ) -> std::io::Result<()> {
        self.write(call, plan_id, round, bytes, rule, None)
    }

    /// Records an upload about to leave: `bytes` is what this attempt sends (the header and the
    /// data from `offset` on), `offset` the payload bytes the coordinator already held, which a
    /// resumed upload does not send again.
    pub fn record_upload(
        &mut self,
        plan_id: &str,
        round: u32,
        bytes: usize,
        offset: u64,
        rule: Rule,
    ) -> std::io::Result<()> {
        self.write("SubmitUpdate", plan_id, Some(round), bytes, rule, Some(offset))
    }

    fn write(
        &mut self,
        call: &str,
        plan_id: &str,
        round: Option<u32>,
        bytes: usize,
        rule: Rule,
        offset: Option<u64>,
    ) -> std::io::Result<()> {
        let t = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
        let mut line = serde_json::json!({
            "time_unix_ms": t as u64,
            "call": call,
            "plan_id": plan_id,
            "round": round,
            "bytes": bytes,
            "rule": rule.as_str(),
        });
        if let (Some(offset), Some(fields)) = (offset, line.as_object_mut()) {
            fields.insert("offset".into(), offset.into());
        }
        // One write per line: `writeln!` on a `File` would issue one write per token, so a reader
        // (or a crash) could meet half a line.
        let mut text = line.to_string();
        text.push('\n');
        self.file.write_all(text.as_bytes())?;
        self.file.sync_data()
    }
}
