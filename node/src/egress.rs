//! The node's record of everything it sent: one JSON line per message, with its size and the
//! policy rule that allowed it, fsync'd before the message leaves.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
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

/// Where a last line without its newline starts, and its bytes; `None` when the file is empty
/// or ends with a newline. Reads back from the end a block at a time (records are short).
fn torn_tail(file: &mut File) -> std::io::Result<Option<(u64, Vec<u8>)>> {
    const BLOCK: u64 = 4096;
    let len = file.metadata()?.len();
    let mut end = len;
    let mut tail: Vec<u8> = Vec::new();
    while end > 0 {
        let start = end.saturating_sub(BLOCK);
        let mut block = vec![0; usize::try_from(end - start).unwrap_or(0)];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut block)?;
        if end == len && block.last() == Some(&b'\n') {
            return Ok(None);
        }
        if let Some(nl) = block.iter().rposition(|b| *b == b'\n') {
            block.drain(..=nl);
            block.extend_from_slice(&tail);
            return Ok(Some((start + nl as u64 + 1, block)));
        }
        block.extend_from_slice(&tail);
        tail = block;
        end = start;
    }
    Ok((!tail.is_empty()).then_some((0, tail)))
}

/// Append-only, fsync'd JSON Lines file.
pub struct EgressLog {
    file: File,
    path: PathBuf,
}

impl EgressLog {
    /// Opens (creating) `dir/egress.jsonl`. A last line a crash tore during its write (no
    /// newline) is kept and completed if it is a whole record, and cut off otherwise: its fsync
    /// never returned, so its message never left, and the next record must start a line of its own.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("egress.jsonl");
        let mut file = OpenOptions::new().create(true).read(true).append(true).open(&path)?;
        if let Some((at, tail)) = torn_tail(&mut file)? {
            if serde_json::from_slice::<serde_json::Value>(&tail).is_ok_and(|v| v.is_object()) {
                file.write_all(b"\n")?;
                tracing::warn!(egress = %path.display(), "egress log: the last record lacked its newline; kept it and wrote the newline");
            } else {
                file.set_len(at)?;
                tracing::warn!(
                    egress = %path.display(),
                    bytes = tail.len(),
                    "egress log: cut a torn last line (a crash during its write: its message never left)"
                );
            }
            file.sync_data()?;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(dir: &Path) -> Vec<String> {
        std::fs::read_to_string(dir.join("egress.jsonl")).unwrap().lines().map(str::to_string).collect()
    }

    #[test]
    fn a_line_torn_by_a_crash_is_cut_or_completed_before_the_next_record() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = EgressLog::open(dir.path()).unwrap();
        log.record("Subscribe", "", None, 10, Rule::Subscribe).unwrap();
        drop(log);
        let file = dir.path().join("egress.jsonl");
        let whole = std::fs::read_to_string(&file).unwrap();
        // A torn record: half a line after the whole one.
        std::fs::write(&file, format!("{whole}{}", &whole[..whole.len() / 2])).unwrap();
        let mut log = EgressLog::open(dir.path()).unwrap();
        log.record("Subscribe", "", None, 11, Rule::Subscribe).unwrap();
        let l = lines(dir.path());
        assert_eq!(l.len(), 2, "{l:?}");
        assert!(l.iter().all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()), "{l:?}");
        // A whole record without its newline is kept and completed.
        let text = std::fs::read_to_string(&file).unwrap();
        std::fs::write(&file, text.trim_end_matches('\n')).unwrap();
        let mut log = EgressLog::open(dir.path()).unwrap();
        log.record("Subscribe", "", None, 12, Rule::Subscribe).unwrap();
        let l = lines(dir.path());
        assert_eq!(l.len(), 3, "{l:?}");
        assert!(l.iter().all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()), "{l:?}");
        // A torn first line longer than a block, with nothing before it, goes entirely.
        std::fs::write(&file, "x".repeat(10_000)).unwrap();
        drop(EgressLog::open(dir.path()).unwrap());
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "");
    }
}
