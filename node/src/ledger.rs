//! The privacy ledger: what each dataset has spent, written down before anything leaves.
//!
//! # The file
//! Append-only JSON Lines, `STATE_DIR/privacy_ledger.jsonl`, one [`Charge`] per line. Only a node
//! holding the state directory's [`StateLock`] writes it ([`Ledger::open`] takes the lock and keeps
//! it); anyone may read it ([`Charges::read`], for `sanctum-node budget` beside a running node).
//!
//! # Durability
//! - A release's charge is appended and fsync'd *before* the release is built and sent, at most
//!   once per (plan, run, round). A crash after the charge leaves the charge in place: the ledger
//!   may then show more than left, never less, and a retry of the same release finds its charge
//!   and adds none.
//! - When the file is created its directory is fsync'd too, so the file itself survives a power
//!   cut and not only its contents.
//! - A last line without its newline was torn by a crash during its write: the fsync that would
//!   have let its release leave never returned. [`Ledger::open`] cuts it off before the next append
//!   (as the audit log does) and logs the cut, so the next charge starts on a line of its own. One
//!   exception, in the safe direction: an unterminated last line that parses as a whole charge is
//!   kept and its newline written, since counting a release that never left overstates what was
//!   spent and dropping one that did would understate it.
//! - A complete (newline-terminated) line that does not parse, anywhere in the file, is corruption
//!   and stops the node: a ledger it cannot read is a budget it cannot enforce. The error names the
//!   file, the line and what to do.
//!
//! # Counting
//! A plan (its id is the SHA-256 of the plan) may run several times; each run has a run id chosen
//! by the coordinator. A charge records one release (one round's update or masked input) of one
//! run, and holds the run's *cumulative* ε after that release (PLD or zCDP accountant over every
//! step the run took), not the release's increment. So a run counts with its largest ε, not its
//! latest round's: a coordinator may send rounds out of order, and the largest is what the
//! accountant computed for the most that was released. Its δ is likewise the largest it recorded.
//! Runs (of one plan or of different plans) add up on a dataset by basic composition, an upper
//! bound. Lines written before runs were recorded read with run `""`: each plan's old charges form
//! one run, as they were counted then.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::state_lock::{StateLock, sync_dir};

/// The ledger's file name inside the state directory.
pub const LEDGER_FILE: &str = "privacy_ledger.jsonl";

/// One release's charge against a dataset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Charge {
    /// The dataset's schema name (a node has one dataset per schema).
    pub dataset: String,
    /// SHA-256 of the plan.
    pub plan_id: String,
    /// The run of the plan this release belongs to, as the coordinator named it; `""` in lines
    /// written before runs were recorded.
    #[serde(default)]
    pub run: String,
    pub plan_name: String,
    /// The round released; unique within its (plan, run).
    pub round: u32,
    /// The run's ε on this dataset after this release (cumulative, not this release's increment).
    pub epsilon: f64,
    pub delta: f64,
    /// DP-SGD steps taken by the run so far, this release's included.
    pub steps: u64,
    pub sampling_rate: f64,
    pub noise_multiplier: f64,
    /// Which accountant computed `epsilon`.
    pub accountant: String,
    pub time_unix_ms: u64,
}

impl Charge {
    /// Why this charge cannot be counted, if it cannot: ε must be a finite non-negative number and
    /// δ a probability, or the sums that enforce the caps mean nothing.
    fn invalid(&self) -> Option<String> {
        if !(self.epsilon.is_finite() && self.epsilon >= 0.0) {
            return Some(format!("ε = {} is not a finite non-negative number", self.epsilon));
        }
        if !(self.delta.is_finite() && (0.0..=1.0).contains(&self.delta)) {
            return Some(format!("δ = {} is not a probability", self.delta));
        }
        None
    }
}

/// What went wrong with the ledger file.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("privacy ledger {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(
        "privacy ledger {path} line {line} is corrupt ({reason}); the node will not run with a budget it cannot read: stop every node on this state directory, restore the file from a backup, or have your data protection officer rebuild the lost charges from the node's audit log (its epsilon_charged records) before starting the node again"
    )]
    Corrupt { path: PathBuf, line: usize, reason: String },
    #[error(
        "refusing to charge plan {plan_id} run '{run}' round {round} to privacy ledger {path}: {reason}; nothing is sent"
    )]
    InvalidCharge { path: PathBuf, plan_id: String, run: String, round: u32, reason: String },
}

/// ε and δ spent (by a run, or summed over runs on a dataset).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Spent {
    pub epsilon: f64,
    pub delta: f64,
}

/// The charges in a ledger file, as read: every question about what was spent.
#[derive(Debug)]
pub struct Charges {
    path: PathBuf,
    charges: Vec<Charge>,
}

/// The end of a ledger file after its last newline.
struct TornTail {
    /// Byte offset where it starts (just after the last newline).
    at: u64,
    /// Its length in bytes.
    bytes: usize,
    /// Whether it parses as a whole charge (then it was pushed onto the charges).
    whole: bool,
}

impl Charges {
    /// Reads `dir`'s ledger without changing it (none yet reads as empty). An unterminated last
    /// line is counted if it parses as a whole charge and ignored otherwise, as [`Ledger::open`]
    /// would keep or cut it; a node may be in the middle of writing it.
    pub fn read(dir: &Path) -> Result<Self, LedgerError> {
        Self::parse(dir.join(LEDGER_FILE)).map(|(charges, _)| charges)
    }

    fn parse(path: PathBuf) -> Result<(Self, Option<TornTail>), LedgerError> {
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => return Err(LedgerError::Io { path, source }),
        };
        let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let mut charges = Vec::new();
        for (i, line) in bytes[..complete].split_inclusive(|&b| b == b'\n').enumerate() {
            let line_no = i + 1;
            let corrupt = |reason: String| LedgerError::Corrupt { path: path.clone(), line: line_no, reason };
            let line = line.strip_suffix(b"\n").unwrap_or(line);
            let text = std::str::from_utf8(line).map_err(|e| corrupt(format!("not UTF-8: {e}")))?;
            if text.trim().is_empty() {
                continue;
            }
            let charge: Charge = serde_json::from_str(text).map_err(|e| corrupt(e.to_string()))?;
            if let Some(reason) = charge.invalid() {
                return Err(corrupt(reason));
            }
            charges.push(charge);
        }
        let torn = (complete < bytes.len()).then(|| {
            let parsed = std::str::from_utf8(&bytes[complete..])
                .ok()
                .and_then(|t| serde_json::from_str::<Charge>(t).ok())
                .filter(|c| c.invalid().is_none());
            let whole = parsed.is_some();
            charges.extend(parsed);
            TornTail { at: complete as u64, bytes: bytes.len() - complete, whole }
        });
        Ok((Self { path, charges }, torn))
    }

    /// The ledger file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn of_run<'a>(&'a self, plan_id: &'a str, run: &'a str) -> impl Iterator<Item = &'a Charge> + 'a {
        self.charges.iter().filter(move |c| c.plan_id == plan_id && c.run == run)
    }

    /// Whether (plan, run, round) is already charged.
    pub fn is_charged(&self, plan_id: &str, run: &str, round: u32) -> bool {
        self.of_run(plan_id, run).any(|c| c.round == round)
    }

    /// How many distinct rounds of the run were charged (each one a release).
    pub fn releases(&self, plan_id: &str, run: &str) -> u32 {
        let rounds: BTreeSet<u32> = self.of_run(plan_id, run).map(|c| c.round).collect();
        u32::try_from(rounds.len()).unwrap_or(u32::MAX)
    }

    /// What the run spent: its largest cumulative ε and its largest δ (zero if it has no charge).
    pub fn run_spent(&self, plan_id: &str, run: &str) -> Spent {
        self.of_run(plan_id, run)
            .fold(Spent::default(), |s, c| Spent { epsilon: s.epsilon.max(c.epsilon), delta: s.delta.max(c.delta) })
    }

    /// Each run's spending on `dataset`, by (plan id, run).
    fn run_totals(&self, dataset: &str) -> BTreeMap<(String, String), Spent> {
        let mut totals: BTreeMap<(String, String), Spent> = BTreeMap::new();
        for c in self.charges.iter().filter(|c| c.dataset == dataset) {
            let s = totals.entry((c.plan_id.clone(), c.run.clone())).or_default();
            s.epsilon = s.epsilon.max(c.epsilon);
            s.delta = s.delta.max(c.delta);
        }
        totals
    }

    /// Total spent on `dataset`: each run's largest ε and δ, summed over runs (basic composition),
    /// leaving out `except` = (plan id, run) (to price that run's next release).
    pub fn spent(&self, dataset: &str, except: Option<(&str, &str)>) -> Spent {
        self.run_totals(dataset)
            .into_iter()
            .filter(|((plan_id, run), _)| except != Some((plan_id.as_str(), run.as_str())))
            .fold(Spent::default(), |s, (_, r)| Spent { epsilon: s.epsilon + r.epsilon, delta: s.delta + r.delta })
    }

    /// Each run on `dataset`, by (plan id, run): its charge with the largest ε (the latest round
    /// among equals).
    pub fn runs(&self, dataset: &str) -> BTreeMap<(String, String), Charge> {
        let mut top: BTreeMap<(String, String), Charge> = BTreeMap::new();
        for c in self.charges.iter().filter(|c| c.dataset == dataset) {
            match top.get(&(c.plan_id.clone(), c.run.clone())) {
                Some(prev) if (prev.epsilon, prev.round) >= (c.epsilon, c.round) => {}
                _ => {
                    top.insert((c.plan_id.clone(), c.run.clone()), c.clone());
                }
            }
        }
        top
    }

    /// Every dataset with a charge.
    pub fn datasets(&self) -> Vec<String> {
        let mut v: Vec<String> = self.charges.iter().map(|c| c.dataset.clone()).collect();
        v.sort();
        v.dedup();
        v
    }
}

/// The ledger a node writes: its charges, the open file and the state directory's lock, held as
/// long as the ledger is open (the node's lifetime).
///
/// It dereferences to [`Charges`] for every question about what was spent: a ledger is its
/// charges plus the right to append one.
#[derive(Debug)]
pub struct Ledger {
    charges: Charges,
    /// Opened for appending only after any torn tail was dealt with.
    file: File,
    /// Bytes of a torn last line cut off when the ledger was opened, for the node's audit log.
    torn_bytes_cut: Option<usize>,
    /// Only the lock's holder may append: two writers would each charge against the same budget.
    _lock: StateLock,
}

impl std::ops::Deref for Ledger {
    type Target = Charges;

    fn deref(&self) -> &Charges {
        &self.charges
    }
}

impl Ledger {
    /// Opens (creating) the ledger in the locked state directory and reads every charge; a torn
    /// last line is cut off (or, if it parses as a whole charge, completed) before anything is
    /// appended. The ledger keeps `lock` until it is dropped.
    pub fn open(lock: StateLock) -> Result<Self, LedgerError> {
        let dir = lock.dir().to_path_buf();
        let path = dir.join(LEDGER_FILE);
        let io = |source| LedgerError::Io { path: path.clone(), source };
        let created = !path.try_exists().map_err(io)?;
        let (charges, torn) = Charges::parse(path.clone())?;
        let mut file = OpenOptions::new().create(true).append(true).open(&path).map_err(io)?;
        if created {
            // The file's entry in the directory: without it a power cut could lose the whole file.
            sync_dir(&dir).map_err(io)?;
        }
        let mut torn_bytes_cut = None;
        match torn {
            Some(TornTail { bytes, whole: true, .. }) => {
                file.write_all(b"\n").map_err(io)?;
                file.sync_all().map_err(io)?;
                tracing::warn!(
                    ledger = %path.display(),
                    bytes,
                    "privacy ledger: the last line lacked its newline but holds a whole charge; kept it and wrote the newline"
                );
            }
            Some(TornTail { at, bytes, whole: false }) => {
                file.set_len(at).map_err(io)?;
                file.sync_all().map_err(io)?;
                tracing::warn!(
                    ledger = %path.display(),
                    bytes,
                    at,
                    "privacy ledger: cut a torn last line (a crash during its write: it was never fsync'd, so its release never left)"
                );
                torn_bytes_cut = Some(bytes);
            }
            None => {}
        }
        Ok(Self { charges, file, torn_bytes_cut, _lock: lock })
    }

    /// Bytes of a torn last line cut off on open, if there was one.
    pub fn torn_bytes_cut(&self) -> Option<usize> {
        self.torn_bytes_cut
    }

    /// Appends and fsyncs a release's charge; returns `false` (and writes nothing) when its
    /// (plan, run, round) was already charged.
    pub fn charge(&mut self, charge: Charge) -> Result<bool, LedgerError> {
        if self.is_charged(&charge.plan_id, &charge.run, charge.round) {
            return Ok(false);
        }
        let path = &self.charges.path;
        if let Some(reason) = charge.invalid() {
            return Err(LedgerError::InvalidCharge {
                path: path.clone(),
                plan_id: charge.plan_id,
                run: charge.run,
                round: charge.round,
                reason,
            });
        }
        let io = |source| LedgerError::Io { path: path.clone(), source };
        let mut line = serde_json::to_string(&charge).map_err(|e| io(std::io::Error::other(e)))?;
        line.push('\n');
        self.file.write_all(line.as_bytes()).map_err(io)?;
        self.file.sync_all().map_err(io)?;
        self.charges.charges.push(charge);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DS: &str = "heart_disease";

    fn charge(plan: &str, run: &str, round: u32, eps: f64) -> Charge {
        Charge {
            dataset: DS.into(),
            plan_id: plan.into(),
            run: run.into(),
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

    fn open(dir: &Path) -> Ledger {
        Ledger::open(StateLock::acquire(dir).unwrap()).unwrap()
    }

    fn ledger_path(dir: &Path) -> PathBuf {
        dir.join(LEDGER_FILE)
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn charges_are_durable_once_per_release_and_sum_across_runs() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = open(dir.path());
        assert!(l.charge(charge("a", "1", 1, 0.5)).unwrap());
        assert!(l.charge(charge("a", "1", 2, 0.8)).unwrap());
        assert!(!l.charge(charge("a", "1", 2, 0.1)).unwrap(), "a retry of the same release must not charge again");
        assert!(l.charge(charge("b", "x", 1, 1.0)).unwrap());
        let s = l.spent(DS, None);
        assert!(close(s.epsilon, 1.8) && (s.delta - 2e-5).abs() < 1e-18, "{s:?}");
        assert!(close(l.spent(DS, Some(("a", "1"))).epsilon, 1.0));
        drop(l);
        // Reopened after a "crash": the same charges, still idempotent.
        let mut l = open(dir.path());
        assert_eq!(l.spent(DS, None), s);
        assert!(!l.charge(charge("b", "x", 1, 0.0)).unwrap());
        assert_eq!(l.datasets(), [DS]);
        assert_eq!(l.torn_bytes_cut(), None);
    }

    /// (charges in order, (plan, run) left out, want ε spent, want releases of ("p", "1"),
    /// want run_spent ε of ("p", "1"), what it shows).
    type Case = (
        &'static [(&'static str, &'static str, u32, f64)],
        Option<(&'static str, &'static str)>,
        f64,
        u32,
        f64,
        &'static str,
    );

    #[test]
    fn run_semantics() {
        let cases: &[Case] = &[
            (&[], None, 0.0, 0, 0.0, "an empty ledger spent nothing"),
            (
                &[("p", "1", 1, 0.4), ("p", "1", 2, 0.7), ("p", "1", 3, 1.0)],
                None,
                1.0,
                3,
                1.0,
                "one run counts its cumulative ε once",
            ),
            (
                &[("p", "1", 1, 0.4), ("p", "1", 2, 0.7), ("p", "2", 1, 0.4), ("p", "2", 2, 0.7)],
                None,
                1.4,
                2,
                0.7,
                "two runs of one plan sum",
            ),
            (
                &[("p", "1", 3, 1.0), ("p", "1", 1, 0.4), ("p", "1", 2, 0.7)],
                None,
                1.0,
                3,
                1.0,
                "rounds out of order count the largest ε, not the latest round's",
            ),
            (
                &[("p", "1", 2, 0.7), ("p", "1", 1, 0.9)],
                None,
                0.9,
                2,
                0.9,
                "a later round with a smaller ε does not lower the run's ε",
            ),
            (
                &[("p", "1", 1, 0.4), ("p", "1", 1, 5.0), ("p", "1", 2, 0.7)],
                None,
                0.7,
                2,
                0.7,
                "a repeated (plan, run, round) is not charged again",
            ),
            (
                &[("p", "1", 1, 0.4), ("p", "2", 1, 0.5), ("q", "1", 1, 0.25)],
                Some(("p", "2")),
                0.65,
                1,
                0.4,
                "leaving out one run keeps the plan's other runs and other plans",
            ),
            (
                &[("p", "1", 1, 0.4), ("q", "1", 1, 0.25)],
                Some(("q", "2")),
                0.65,
                1,
                0.4,
                "leaving out a run with no charge leaves everything in",
            ),
            (
                &[("p", "", 1, 0.3), ("p", "1", 1, 0.5)],
                None,
                0.8,
                1,
                0.5,
                "the run of pre-run ledger lines is a run of its own",
            ),
        ];
        for &(charges, except, want_spent, want_releases, want_run, what) in cases {
            let dir = tempfile::tempdir().unwrap();
            let mut l = open(dir.path());
            for &(plan, run, round, eps) in charges {
                l.charge(charge(plan, run, round, eps)).unwrap();
            }
            for l in [&*l, &Charges::read(dir.path()).unwrap()] {
                let spent = l.spent(DS, except);
                assert!(close(spent.epsilon, want_spent), "{what}: spent {spent:?}, want ε = {want_spent}");
                assert_eq!(l.releases("p", "1"), want_releases, "{what}");
                assert!(close(l.run_spent("p", "1").epsilon, want_run), "{what}: {:?}", l.run_spent("p", "1"));
                let runs = l.runs(DS);
                let sum: f64 = runs
                    .iter()
                    .filter(|(k, _)| except != Some((k.0.as_str(), k.1.as_str())))
                    .map(|(_, c)| c.epsilon)
                    .sum();
                assert!(close(sum, want_spent), "{what}: runs {runs:?}");
                // δ is counted once per run.
                let n_runs = runs.keys().filter(|k| except != Some((k.0.as_str(), k.1.as_str()))).count();
                assert!((spent.delta - n_runs as f64 * 1e-5).abs() < 1e-18, "{what}: δ {}", spent.delta);
            }
        }
    }

    #[test]
    fn runs_shows_each_runs_largest_charge_and_idempotence_is_per_run() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = open(dir.path());
        assert!(l.charge(charge("p", "1", 2, 0.7)).unwrap());
        assert!(l.charge(charge("p", "1", 1, 0.4)).unwrap());
        assert!(l.charge(charge("p", "2", 1, 0.4)).unwrap(), "the same round of another run is another release");
        assert!(l.is_charged("p", "1", 1) && l.is_charged("p", "2", 1) && !l.is_charged("p", "2", 2));
        assert!(!l.is_charged("p", "", 1) && !l.is_charged("q", "1", 1));
        let runs = l.runs(DS);
        assert_eq!(runs.keys().cloned().collect::<Vec<_>>(), [("p".into(), "1".into()), ("p".into(), "2".into())]);
        assert_eq!(runs[&("p".to_string(), "1".to_string())].round, 2);
        assert_eq!(l.run_spent("q", "1"), Spent::default());
        assert!(l.runs("other").is_empty() && l.spent("other", None) == Spent::default());
    }

    #[test]
    fn ledger_lines_written_before_runs_parse_with_an_empty_run() {
        let dir = tempfile::tempdir().unwrap();
        // A line as the ledger wrote it before runs were recorded.
        let old = r#"{"dataset":"heart_disease","plan_id":"p","plan_name":"p","round":1,"epsilon":0.5,"delta":1e-5,"steps":100,"sampling_rate":0.02,"noise_multiplier":1.3,"accountant":"pld","time_unix_ms":0}"#;
        std::fs::write(ledger_path(dir.path()), format!("{old}\n")).unwrap();
        let mut l = open(dir.path());
        assert!(l.is_charged("p", "", 1));
        assert_eq!(l.releases("p", ""), 1);
        assert!(!l.charge(charge("p", "", 1, 0.5)).unwrap());
        assert!(l.charge(charge("p", "r2", 1, 0.5)).unwrap(), "a new run of an old plan is charged in full");
        assert!(close(l.spent(DS, None).epsilon, 1.0));
    }

    #[test]
    fn a_torn_tail_is_cut_then_a_charge_and_a_reopen_keep_it_and_the_old_charges() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = open(dir.path());
        l.charge(charge("a", "1", 1, 0.5)).unwrap();
        l.charge(charge("a", "1", 2, 0.8)).unwrap();
        drop(l);
        let path = ledger_path(dir.path());
        let good = std::fs::read_to_string(&path).unwrap();
        // A crash part-way through writing round 3's charge.
        let torn = "{\"dataset\":\"heart_dis";
        std::fs::write(&path, format!("{good}{torn}")).unwrap();
        // A reader beside a running node ignores the partial line and changes nothing.
        assert!(close(Charges::read(dir.path()).unwrap().spent(DS, None).epsilon, 0.8));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), format!("{good}{torn}"));
        let mut l = open(dir.path());
        assert_eq!(l.torn_bytes_cut(), Some(torn.len()));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), good, "the torn tail is cut before the next append");
        assert!(!l.is_charged("a", "1", 3));
        assert!(l.charge(charge("a", "1", 3, 1.1)).unwrap());
        drop(l);
        let l = open(dir.path());
        assert!(l.is_charged("a", "1", 1) && l.is_charged("a", "1", 2) && l.is_charged("a", "1", 3));
        assert!(close(l.spent(DS, None).epsilon, 1.1));
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 3);
    }

    #[test]
    fn an_unterminated_last_line_holding_a_whole_charge_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = open(dir.path());
        l.charge(charge("a", "1", 1, 0.5)).unwrap();
        l.charge(charge("a", "1", 2, 0.8)).unwrap();
        drop(l);
        let path = ledger_path(dir.path());
        let full = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, full.trim_end_matches('\n')).unwrap();
        assert!(Charges::read(dir.path()).unwrap().is_charged("a", "1", 2));
        let mut l = open(dir.path());
        assert_eq!(l.torn_bytes_cut(), None);
        assert!(l.is_charged("a", "1", 2), "dropping it would understate what may have been spent");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), full, "its newline is written");
        assert!(l.charge(charge("a", "1", 3, 1.1)).unwrap());
        drop(l);
        assert_eq!(open(dir.path()).releases("a", "1"), 3);
    }

    #[test]
    fn a_complete_line_that_does_not_parse_is_corruption_anywhere() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = open(dir.path());
        l.charge(charge("a", "1", 1, 0.5)).unwrap();
        l.charge(charge("a", "1", 2, 0.8)).unwrap();
        drop(l);
        let path = ledger_path(dir.path());
        let good: Vec<String> = std::fs::read_to_string(&path).unwrap().lines().map(String::from).collect();
        let negative = serde_json::to_string(&charge("a", "1", 3, -1.0)).unwrap();
        let cases: &[(String, usize, &str)] = &[
            (format!("garbage\n{}\n{}\n", good[0], good[1]), 1, "first line"),
            (format!("{}\n{{\"dataset\":\"heart_dis\n{}\n", good[0], good[1]), 2, "a torn line in the middle"),
            (format!("{}\n{}\ngarbage\n", good[0], good[1]), 3, "a complete last line"),
            (format!("{}\n{}\n{negative}\n", good[0], good[1]), 3, "a negative ε"),
            (format!("{}\n\u{0}\u{0}\n{}\n", good[0], good[1]), 2, "NUL bytes"),
        ];
        for (text, line, what) in cases {
            std::fs::write(&path, text).unwrap();
            for e in [
                Ledger::open(StateLock::acquire(dir.path()).unwrap()).unwrap_err(),
                Charges::read(dir.path()).unwrap_err(),
            ] {
                assert!(matches!(e, LedgerError::Corrupt { line: l, .. } if l == *line), "{what}: {e:?}");
                let msg = e.to_string();
                assert!(msg.contains(&format!("{} line {line} is corrupt", path.display())), "{what}: {msg}");
                assert!(msg.contains("restore the file from a backup"), "{what}: {msg}");
            }
            assert_eq!(&std::fs::read_to_string(&path).unwrap(), text, "{what}: a corrupt ledger is left as it is");
        }
    }

    #[test]
    fn a_charge_that_cannot_be_counted_is_refused_before_it_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = open(dir.path());
        for (eps, delta) in [(f64::NAN, 1e-5), (f64::INFINITY, 1e-5), (-0.1, 1e-5), (1.0, f64::NAN), (1.0, 1.5)] {
            let c = Charge { delta, ..charge("a", "1", 1, eps) };
            let e = l.charge(c).unwrap_err();
            assert!(matches!(e, LedgerError::InvalidCharge { .. }), "ε = {eps}, δ = {delta}: {e:?}");
        }
        assert!(!l.is_charged("a", "1", 1));
        assert_eq!(std::fs::read_to_string(ledger_path(dir.path())).unwrap(), "");
    }

    #[test]
    fn the_ledger_holds_the_state_directory_lock() {
        let dir = tempfile::tempdir().unwrap();
        let l = open(dir.path());
        assert!(matches!(StateLock::acquire(dir.path()).unwrap_err(), crate::state_lock::StateLockError::InUse { .. }));
        drop(l);
        StateLock::acquire(dir.path()).unwrap();
    }
}
