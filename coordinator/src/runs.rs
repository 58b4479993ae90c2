//! Runs of plans: every submission of a plan is a new *run* with an id of its own, so a hospital
//! can tell a second run of the same plan (which it accounts in full) from the same run offered
//! again after a reconnect (which it must not train twice).
//!
//! The registry is kept in `state/runs.json` (written atomically), so run ids stay unique and a
//! plan that already ran is recognised across coordinator restarts. Whether a submission may
//! start a run is decided here, without I/O ([`RunRegistry::admit`]); the file is read and
//! written by [`RunFile`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sanctum_protocol::ids::{PlanId, RunId};
use serde::{Deserialize, Serialize};

/// Every run of every plan this coordinator started, in order per plan.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunRegistry {
    /// Plan id (SHA-256 of the plan) → its run ids, oldest first. Never shrinks: a run id, once
    /// given out, is never given to another run.
    pub plans: BTreeMap<PlanId, Vec<RunId>>,
}

/// A run the registry admitted: its id and its number among the plan's runs (1 for the first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewRun {
    pub id: RunId,
    pub number: u32,
}

/// Why a submission does not start a run.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RunRefused {
    #[error(
        "plan '{name}' ({short}) already ran {runs} time(s) on this coordinator (last run {last}); submit it again with `--again` to start a new run, which every hospital accounts in full against its privacy budget"
    )]
    AlreadyRan { name: String, short: String, runs: usize, last: RunId },
}

impl RunRegistry {
    /// The registry the durable store holds: every run id of every plan, by run number, so
    /// [`RunRegistry::admit`] decides on the store's runs as it did on `runs.json`.
    pub fn from_rows(rows: &[crate::db::RunRow]) -> Self {
        let mut by_plan: BTreeMap<PlanId, Vec<(u32, RunId)>> = BTreeMap::new();
        for row in rows {
            by_plan.entry(row.plan_id.clone()).or_default().push((row.number, row.run_id.clone()));
        }
        let plans = by_plan
            .into_iter()
            .map(|(plan, mut runs)| {
                runs.sort();
                (plan, runs.into_iter().map(|(_, id)| id).collect())
            })
            .collect();
        Self { plans }
    }

    /// Decides whether `plan_id` may start a run and, if so, records it under `fresh_id` (a
    /// random id the caller drew). A plan that already ran starts again only when `again`.
    pub fn admit(&mut self, plan_id: &PlanId, name: &str, again: bool, fresh_id: RunId) -> Result<NewRun, RunRefused> {
        let runs = self.plans.entry(plan_id.clone()).or_default();
        if let Some(last) = runs.last()
            && !again
        {
            return Err(RunRefused::AlreadyRan {
                name: name.to_string(),
                short: plan_id[..12].to_string(),
                runs: runs.len(),
                last: last.clone(),
            });
        }
        runs.push(fresh_id.clone());
        Ok(NewRun { id: fresh_id, number: u32::try_from(runs.len()).unwrap_or(u32::MAX) })
    }

    /// The latest run of a plan.
    pub fn latest(&self, plan_id: &PlanId) -> Option<&RunId> {
        self.plans.get(plan_id).and_then(|r| r.last())
    }

    /// Whether `run` is a run of `plan_id`.
    pub fn has(&self, plan_id: &PlanId, run: &RunId) -> bool {
        self.plans.get(plan_id).is_some_and(|r| r.iter().any(|x| x == run))
    }

    /// The number of a run among its plan's runs.
    pub fn number(&self, plan_id: &PlanId, run: &RunId) -> Option<u32> {
        let pos = self.plans.get(plan_id)?.iter().position(|x| x == run)?;
        u32::try_from(pos + 1).ok()
    }
}

/// A fresh run id: 128 random bits, in hex. Random rather than counted so that a
/// coordinator that lost its state still never reuses an id a hospital has already seen.
pub fn fresh_run_id() -> RunId {
    // `rand::random` draws from the thread-local CSPRNG, seeded (and reseeded) by the OS.
    RunId::from_bits(rand::random::<u128>())
}

/// What went wrong with `runs.json`.
#[derive(Debug, thiserror::Error)]
pub enum RunFileError {
    #[error("run registry {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(
        "run registry {path} is not valid JSON ({reason}); restore it from backup: without it the coordinator cannot tell a plan's earlier runs from new ones"
    )]
    Corrupt { path: PathBuf, reason: String },
}

/// The registry's file in the state directory.
pub struct RunFile {
    path: PathBuf,
}

impl RunFile {
    pub fn new(state_dir: &Path) -> Self {
        Self { path: state_dir.join("runs.json") }
    }

    /// Reads the registry; a missing file is an empty one.
    pub fn load(&self) -> Result<RunRegistry, RunFileError> {
        match std::fs::read_to_string(&self.path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| RunFileError::Corrupt { path: self.path.clone(), reason: e.to_string() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(RunRegistry::default()),
            Err(source) => Err(RunFileError::Io { path: self.path.clone(), source }),
        }
    }

    /// Writes the registry atomically (temp file, fsync, rename, fsync of the directory).
    pub fn save(&self, registry: &RunRegistry) -> Result<(), RunFileError> {
        let io = |source| RunFileError::Io { path: self.path.clone(), source };
        let text = serde_json::to_vec_pretty(registry).map_err(|e| io(std::io::Error::other(e)))?;
        crate::store::write_atomic(&self.path, &text).map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_ids::{plan, run};

    #[test]
    fn a_plan_runs_again_only_when_asked_and_each_run_is_new() {
        let mut r = RunRegistry::default();
        let first = r.admit(&plan("p"), "heart", false, run("r1")).unwrap();
        assert_eq!(first, NewRun { id: run("r1"), number: 1 });
        let e = r.admit(&plan("p"), "heart", false, run("r2")).unwrap_err().to_string();
        assert!(e.contains("already ran 1 time(s)") && e.contains("--again") && e.contains(run("r1").as_str()), "{e}");
        assert_eq!(r.latest(&plan("p")), Some(&run("r1")), "a refused submission records nothing");
        let second = r.admit(&plan("p"), "heart", true, run("r2")).unwrap();
        assert_eq!(second.number, 2);
        assert_eq!(r.latest(&plan("p")), Some(&run("r2")));
        let (p, q) = (plan("p"), plan("q"));
        assert!(r.has(&p, &run("r1")) && r.has(&p, &run("r2")) && !r.has(&p, &run("r3")) && !r.has(&q, &run("r1")));
        assert_eq!(r.number(&p, &run("r1")), Some(1));
        // `again` on a plan that never ran is simply its first run.
        assert_eq!(r.admit(&plan("q"), "other", true, run("r3")).unwrap().number, 1);
    }

    #[test]
    fn the_registry_survives_a_restart_and_refuses_a_corrupt_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = RunFile::new(dir.path());
        assert_eq!(file.load().unwrap(), RunRegistry::default());
        let mut r = RunRegistry::default();
        r.admit(&plan("p"), "heart", false, fresh_run_id()).unwrap();
        file.save(&r).unwrap();
        let mut again = file.load().unwrap();
        assert_eq!(again, r);
        assert!(again.admit(&plan("p"), "heart", false, fresh_run_id()).is_err(), "the earlier run is remembered");
        std::fs::write(dir.path().join("runs.json"), "{not json").unwrap();
        let e = file.load().unwrap_err().to_string();
        assert!(e.contains("restore it from backup"), "{e}");
    }

    #[test]
    fn run_ids_are_random_128_bit_hex() {
        let (a, b) = (fresh_run_id(), fresh_run_id());
        assert_eq!(a.len(), 32);
        assert_eq!(RunId::parse(&a), Ok(a.clone()), "of the run id's form");
        assert_ne!(a, b);
    }
}
