//! The privacy ledger: what each dataset has spent, written down before anything leaves.
//!
//! Append-only JSON Lines in the node's state directory. A round's charge is appended and
//! fsync'd *before* its update is sent, at most once per (plan, round): a crash after the charge
//! leaves the charge in place (the ledger may then show more than left, never less), and a retry
//! of the same round finds its charge and does not add another. A torn last line (a crash during
//! the write) was never durable, so its update never left; it is ignored. Anything else that does
//! not parse stops the node: a ledger it cannot read is a budget it cannot enforce.
//!
//! Across plans the ε and δ of a dataset add up (basic composition, an upper bound). Within a
//! plan each charge holds the plan's cumulative ε after that round (PLD accountant), so the plan
//! counts with its latest charge.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One round's charge against a dataset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Charge {
    /// The dataset's schema name (a node has one dataset per schema).
    pub dataset: String,
    pub plan_id: String,
    pub plan_name: String,
    pub round: u32,
    /// The plan's ε on this dataset after this round (cumulative, not this round's increment).
    pub epsilon: f64,
    pub delta: f64,
    /// DP-SGD steps taken by the plan up to and including this round.
    pub steps: u64,
    pub sampling_rate: f64,
    pub noise_multiplier: f64,
    /// Which accountant computed `epsilon`.
    pub accountant: String,
    pub time_unix_ms: u64,
}

/// What went wrong with the ledger file.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("privacy ledger {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(
        "privacy ledger {path} line {line} is corrupt ({reason}); the node will not run with a budget it cannot read: restore the file from backup"
    )]
    Corrupt { path: PathBuf, line: usize, reason: String },
}

/// A dataset's spending, summed over plans.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Spent {
    pub epsilon: f64,
    pub delta: f64,
}

/// The ledger file and its parsed charges.
pub struct Ledger {
    path: PathBuf,
    file: File,
    charges: Vec<Charge>,
}

impl Ledger {
    /// Opens (creating) `dir/privacy_ledger.jsonl` and reads every charge.
    pub fn open(dir: &Path) -> Result<Self, LedgerError> {
        let path = dir.join("privacy_ledger.jsonl");
        let io = |source| LedgerError::Io { path: path.clone(), source };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut charges = Vec::new();
        if path.exists() {
            let lines: Vec<String> =
                BufReader::new(File::open(&path).map_err(io)?).lines().collect::<Result<_, _>>().map_err(io)?;
            let last = lines.len();
            for (i, line) in lines.iter().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                match serde_json::from_str::<Charge>(line) {
                    Ok(c) => charges.push(c),
                    // Only the final line can be torn by a crash during its write.
                    Err(_) if i + 1 == last => {
                        tracing::warn!("privacy ledger: ignoring a torn last line (never fsync'd)")
                    }
                    Err(e) => {
                        return Err(LedgerError::Corrupt { path: path.clone(), line: i + 1, reason: e.to_string() });
                    }
                }
            }
        }
        let file = OpenOptions::new().create(true).append(true).open(&path).map_err(io)?;
        Ok(Self { path, file, charges })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether (plan, round) is already charged.
    pub fn is_charged(&self, plan_id: &str, round: u32) -> bool {
        self.charges.iter().any(|c| c.plan_id == plan_id && c.round == round)
    }

    /// Appends and fsyncs a charge; returns `false` (and writes nothing) when its (plan, round)
    /// was already charged.
    pub fn charge(&mut self, charge: Charge) -> Result<bool, LedgerError> {
        if self.is_charged(&charge.plan_id, charge.round) {
            return Ok(false);
        }
        let io = |source| LedgerError::Io { path: self.path.clone(), source };
        let mut line = serde_json::to_string(&charge).map_err(|e| io(std::io::Error::other(e)))?;
        line.push('\n');
        self.file.write_all(line.as_bytes()).map_err(io)?;
        self.file.sync_all().map_err(io)?;
        self.charges.push(charge);
        Ok(true)
    }

    /// Each plan's latest charge on `dataset`, by plan id.
    pub fn plans(&self, dataset: &str) -> BTreeMap<String, Charge> {
        let mut latest: BTreeMap<String, Charge> = BTreeMap::new();
        for c in self.charges.iter().filter(|c| c.dataset == dataset) {
            match latest.get(&c.plan_id) {
                Some(prev) if prev.round >= c.round => {}
                _ => {
                    latest.insert(c.plan_id.clone(), c.clone());
                }
            }
        }
        latest
    }

    /// Total spent on `dataset`, leaving out `except_plan` (to price a plan's next round).
    pub fn spent(&self, dataset: &str, except_plan: Option<&str>) -> Spent {
        self.plans(dataset)
            .values()
            .filter(|c| Some(c.plan_id.as_str()) != except_plan)
            .fold(Spent::default(), |s, c| Spent { epsilon: s.epsilon + c.epsilon, delta: s.delta + c.delta })
    }

    /// Every dataset with a charge.
    pub fn datasets(&self) -> Vec<String> {
        let mut v: Vec<String> = self.charges.iter().map(|c| c.dataset.clone()).collect();
        v.sort();
        v.dedup();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn charge(plan: &str, round: u32, eps: f64) -> Charge {
        Charge {
            dataset: "heart_disease".into(),
            plan_id: plan.into(),
            plan_name: plan.into(),
            round,
            epsilon: eps,
            delta: 1e-5,
            steps: u64::from(round) * 100,
            sampling_rate: 0.02,
            noise_multiplier: 1.3,
            accountant: "pld".into(),
            time_unix_ms: 0,
        }
    }

    #[test]
    fn charges_are_durable_once_per_round_and_sum_across_plans() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = Ledger::open(dir.path()).unwrap();
        assert!(l.charge(charge("a", 1, 0.5)).unwrap());
        assert!(l.charge(charge("a", 2, 0.8)).unwrap());
        assert!(!l.charge(charge("a", 2, 0.1)).unwrap(), "a retry of the same round must not charge again");
        assert!(l.charge(charge("b", 1, 1.0)).unwrap());
        let s = l.spent("heart_disease", None);
        assert!((s.epsilon - 1.8).abs() < 1e-12 && (s.delta - 2e-5).abs() < 1e-18, "{s:?}");
        assert!((l.spent("heart_disease", Some("a")).epsilon - 1.0).abs() < 1e-12);
        drop(l);
        // Reopened after a "crash": the same charges, still idempotent.
        let mut l = Ledger::open(dir.path()).unwrap();
        assert_eq!(l.spent("heart_disease", None), s);
        assert!(!l.charge(charge("b", 1, 0.0)).unwrap());
        assert_eq!(l.datasets(), ["heart_disease"]);
    }

    #[test]
    fn a_torn_last_line_is_ignored_but_corruption_elsewhere_stops_the_node() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = Ledger::open(dir.path()).unwrap();
        l.charge(charge("a", 1, 0.5)).unwrap();
        drop(l);
        let path = dir.path().join("privacy_ledger.jsonl");
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("{\"dataset\":\"heart_dis");
        std::fs::write(&path, &text).unwrap();
        let l = Ledger::open(dir.path()).unwrap();
        assert!((l.spent("heart_disease", None).epsilon - 0.5).abs() < 1e-12);
        drop(l);
        std::fs::write(&path, format!("garbage\n{text}\n")).unwrap();
        let e = Ledger::open(dir.path()).err().unwrap().to_string();
        assert!(e.contains("line 1 is corrupt"), "{e}");
    }
}
