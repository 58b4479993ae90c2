//! SCAFFOLD at the node (Karimireddy et al., ICML 2020, Algorithm 1, option II): the node's
//! control variate cᵢ, kept durably per run, and the half of the update that changes it.
//!
//! The global model the coordinator publishes carries c after the model's own tensors
//! (`Plan::global_layout`). A round trains with every gradient corrected by c − cᵢ
//! ([`crate::correction`]), then
//!   cᵢ⁺ = cᵢ − c + (x − yᵢ)/(K·η),   so   Δcᵢ = cᵢ⁺ − cᵢ = −c − Δyᵢ/(K·η),
//! with K the local steps, η the local learning rate and Δyᵢ = yᵢ − x the model update. The node
//! sends (Δyᵢ, Δcᵢ); Δcᵢ is a function of Δyᵢ and the public c, so it reveals nothing Δyᵢ does
//! not, and under DP-SGD it is post-processing.
//!
//! **Durability.** `state/scaffold/<run key>/control-variate-<round>.safetensors` holds cᵢ before
//! and after the round (`before.<name>`, `after.<name>`), written (temp, fsync, rename, fsync of
//! the directory) before the round's release is stored. The next round reads `after` if that
//! round's update was released (stored or sent) and `before` if it never was, so a crash between
//! any two writes leaves cᵢ matching what left the node. The run key is the SHA-256 of the plan
//! and run ids, as the release store names its directories.

use std::path::{Path, PathBuf};

use sanctum_protocol::hash::ContentHash;
use sanctum_protocol::model::{ModelError, TensorSpec, Weights};
use sanctum_protocol::plan::Plan;

/// What went wrong with the control variate.
#[derive(Debug, thiserror::Error)]
pub enum ScaffoldError {
    #[error("SCAFFOLD control variate {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(
        "SCAFFOLD control variate {path} is damaged ({reason}); the round is refused: this node's cᵢ for the run is lost, so the run cannot go on exactly (start a new run of the plan)"
    )]
    Damaged { path: PathBuf, reason: String },
    #[error("the global model is not this plan's SCAFFOLD model: {0}")]
    Global(ModelError),
    #[error(
        "SCAFFOLD: {what} has a non-finite value at parameter {index}; the round is refused before anything is stored, charged or sent (lower the plan's strategy.server_learning_rate or raise local.learning_rate, or ask the consortium lead why)"
    )]
    NonFinite { what: &'static str, index: usize },
}

/// The global model split into the model's weights and the server control variate c.
pub fn split_global(plan: &Plan, global: Weights) -> Result<(Weights, Option<Weights>), ScaffoldError> {
    if !plan.strategy.is_scaffold() {
        return Ok((global, None));
    }
    let layout = plan.model.layout();
    let p: usize = layout.iter().map(TensorSpec::numel).sum();
    if global.values().len() != 2 * p {
        return Err(ScaffoldError::Global(ModelError::Size { got: global.values().len(), want: 2 * p }));
    }
    let (model, c) = global.values().split_at(p);
    // A coordinator's c that is not finite would make every correction and Δcᵢ non-finite.
    if let Some(index) = c.iter().position(|v| !v.is_finite()) {
        return Err(ScaffoldError::NonFinite { what: "the server control variate c", index });
    }
    let model = Weights::new(layout.clone(), model.to_vec()).map_err(ScaffoldError::Global)?;
    let c = Weights::new(layout, c.to_vec()).map_err(ScaffoldError::Global)?;
    Ok((model, Some(c)))
}

/// c − cᵢ, the correction every local step adds to its gradient.
pub fn correction(c: &Weights, ci: &[f32]) -> Result<Weights, ScaffoldError> {
    let values = c.values().iter().zip(ci).map(|(c, ci)| c - ci).collect();
    Weights::new(c.layout().to_vec(), values).map_err(ScaffoldError::Global)
}

/// Δcᵢ = −c − Δy/(K·η), in f64 before rounding to f32; refused when a value leaves f32's range
/// (a c near f32's largest value, or a tiny K·η), before it is stored, charged or sent.
pub fn delta_c(c: &[f32], delta_y: &[f32], steps: u32, learning_rate: f64) -> Result<Vec<f32>, ScaffoldError> {
    let k_eta = f64::from(steps.max(1)) * learning_rate;
    let dc: Vec<f32> = c.iter().zip(delta_y).map(|(c, d)| (-f64::from(*c) - f64::from(*d) / k_eta) as f32).collect();
    match dc.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(ScaffoldError::NonFinite { what: "the control-variate change Δcᵢ", index }),
        None => Ok(dc),
    }
}

/// The node's control variates, one directory per run.
pub struct ControlVariates {
    dir: PathBuf,
}

fn run_key(plan_id: &str, run: &str) -> String {
    let mut key = Vec::with_capacity(plan_id.len() + run.len() + 1);
    key.extend_from_slice(plan_id.as_bytes());
    key.push(0);
    key.extend_from_slice(run.as_bytes());
    ContentHash::of(&key).to_hex()[..32].to_string()
}

const PREFIX: &str = "control-variate-";
const SUFFIX: &str = ".safetensors";

impl ControlVariates {
    pub fn open(state_dir: &Path) -> Self {
        Self { dir: state_dir.join("scaffold") }
    }

    fn run_dir(&self, plan_id: &str, run: &str) -> PathBuf {
        self.dir.join(run_key(plan_id, run))
    }

    /// The newest file of the run and its round.
    fn newest(&self, dir: &Path) -> Result<Option<(u32, PathBuf)>, ScaffoldError> {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(ScaffoldError::Io { path: dir.to_path_buf(), source }),
        };
        let mut best: Option<(u32, PathBuf)> = None;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let round = name.strip_prefix(PREFIX).and_then(|r| r.strip_suffix(SUFFIX)).and_then(|r| r.parse().ok());
            if let Some(round) = round
                && best.as_ref().is_none_or(|(b, _)| round > *b)
            {
                best = Some((round, e.path()));
            }
        }
        Ok(best)
    }

    /// cᵢ for the next round of the run: zeros before its first round; otherwise the newest
    /// file's `after` if `released(its round)`, else its `before`.
    pub fn load(
        &self,
        plan_id: &str,
        run: &str,
        layout: &[TensorSpec],
        released: impl Fn(u32) -> bool,
    ) -> Result<Vec<f32>, ScaffoldError> {
        let p: usize = layout.iter().map(TensorSpec::numel).sum();
        let Some((round, path)) = self.newest(&self.run_dir(plan_id, run))? else {
            return Ok(vec![0.0; p]);
        };
        let bytes = std::fs::read(&path).map_err(|source| ScaffoldError::Io { path: path.clone(), source })?;
        let which = if released(round) { "after." } else { "before." };
        let named: Vec<TensorSpec> =
            layout.iter().map(|t| TensorSpec { name: format!("{which}{}", t.name), shape: t.shape.clone() }).collect();
        let w = Weights::from_safetensors(&bytes, &named)
            .map_err(|e| ScaffoldError::Damaged { path: path.clone(), reason: e.to_string() })?;
        if let Some(i) = w.values().iter().position(|v| !v.is_finite()) {
            return Err(ScaffoldError::Damaged { path, reason: format!("non-finite value at {i}") });
        }
        Ok(w.values().to_vec())
    }

    /// Durably records cᵢ before and after `round`, then removes the run's older files.
    pub fn save(
        &self,
        plan_id: &str,
        run: &str,
        round: u32,
        layout: &[TensorSpec],
        (before, after): (&[f32], &[f32]),
    ) -> Result<(), ScaffoldError> {
        let dir = self.run_dir(plan_id, run);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ScaffoldError::Io { path, source }
        };
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let named = |prefix: &'static str| {
            layout.iter().map(move |t| TensorSpec { name: format!("{prefix}{}", t.name), shape: t.shape.clone() })
        };
        let layout2: Vec<TensorSpec> = named("before.").chain(named("after.")).collect();
        let values: Vec<f32> = before.iter().chain(after).copied().collect();
        let path = dir.join(format!("{PREFIX}{round}{SUFFIX}"));
        let bytes = Weights::new(layout2, values)
            .and_then(|w| w.to_safetensors())
            .map_err(|e| ScaffoldError::Damaged { path: path.clone(), reason: e.to_string() })?;
        let tmp = dir.join(format!(".{PREFIX}{round}.tmp"));
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        std::io::Write::write_all(&mut f, &bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        drop(f);
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        crate::state_lock::sync_dir(&dir).map_err(io(&dir))?;
        for e in std::fs::read_dir(&dir).map_err(io(&dir))?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(PREFIX) && e.path() != path {
                // Left behind, an older file is never read: only the newest is.
                if let Err(err) = std::fs::remove_file(e.path()) {
                    tracing::warn!("SCAFFOLD: cannot remove {}: {err}", e.path().display());
                }
            }
        }
        Ok(())
    }

    /// Deletes a finished run's control variate.
    pub fn forget(&self, plan_id: &str, run: &str) {
        let dir = self.run_dir(plan_id, run);
        if dir.exists()
            && let Err(err) = std::fs::remove_dir_all(&dir)
        {
            tracing::warn!("SCAFFOLD: cannot remove {}: {err}", dir.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Vec<TensorSpec> {
        vec![
            TensorSpec { name: "fc.weight".into(), shape: vec![1, 2] },
            TensorSpec { name: "fc.bias".into(), shape: vec![1] },
        ]
    }

    #[test]
    fn delta_c_is_minus_c_minus_the_average_step() {
        // K = 10, η = 0.1: Δy/(Kη) = Δy.
        assert_eq!(delta_c(&[0.5, -1.0], &[1.0, 2.0], 10, 0.1).unwrap(), vec![-1.5, -1.0]);
        // Out of f32's range: refused, naming the parameter.
        let e = delta_c(&[0.0, f32::MAX], &[0.0, -f32::MAX], 1, 0.1).unwrap_err();
        assert!(e.to_string().contains("parameter 1") && e.to_string().contains("before anything is stored"), "{e}");
        // With cᵢ⁺ = cᵢ + Δcᵢ: cᵢ⁺ = cᵢ − c + (x − y)/(Kη), the paper's option II.
        let (ci, c, dy) = ([0.25f32], [0.5f32], [-0.2f32]);
        let dc = delta_c(&c, &dy, 4, 0.5).unwrap();
        let want = f64::from(ci[0]) - f64::from(c[0]) + 0.2 / 2.0;
        assert!((f64::from(ci[0] + dc[0]) - want).abs() < 1e-7);
    }

    #[test]
    fn a_global_model_whose_control_variate_is_not_finite_or_of_the_wrong_size_is_refused() {
        let plan = sanctum_protocol::plan::Plan::parse(
            "name='t'\nrounds=1\nmin_nodes=1\n[model]\nkind='logistic_regression'\ninputs=2\n[data]\nschema='s'\nschema_sha256='0000000000000000000000000000000000000000000000000000000000000000'\n[local]\nsteps=1\nbatch_size=1\nlearning_rate=0.1\n[strategy]\nkind='scaffold'\n",
        )
        .unwrap();
        let mut g = plan.initial_global();
        let (model, c) = split_global(&plan, g.clone()).unwrap();
        assert_eq!((model.values().len(), c.unwrap().values().len()), (3, 3));
        g.values_mut()[4] = f32::NAN;
        let e = split_global(&plan, g).unwrap_err().to_string();
        assert!(e.contains("server control variate") && e.contains("parameter 1"), "{e}");
        let short = Weights::new(plan.model.layout(), vec![0.0; 3]).unwrap();
        assert!(matches!(split_global(&plan, short), Err(ScaffoldError::Global(_))));
    }

    #[test]
    fn the_next_round_reads_after_only_if_the_round_was_released() {
        let dir = tempfile::tempdir().unwrap();
        let cv = ControlVariates::open(dir.path());
        let l = layout();
        assert_eq!(cv.load("p", "r", &l, |_| true).unwrap(), vec![0.0; 3], "zeros before the first round");
        cv.save("p", "r", 1, &l, (&[0.0; 3], &[1.0, 2.0, 3.0])).unwrap();
        assert_eq!(cv.load("p", "r", &l, |r| r == 1).unwrap(), vec![1.0, 2.0, 3.0]);
        assert_eq!(cv.load("p", "r", &l, |_| false).unwrap(), vec![0.0; 3], "crash before the release");
        cv.save("p", "r", 2, &l, (&[1.0, 2.0, 3.0], &[4.0, 5.0, 6.0])).unwrap();
        assert_eq!(cv.load("p", "r", &l, |_| true).unwrap(), vec![4.0, 5.0, 6.0]);
        let files = std::fs::read_dir(cv.run_dir("p", "r")).unwrap().count();
        assert_eq!(files, 1, "only the newest file is kept");
        assert_eq!(cv.load("p", "other-run", &l, |_| true).unwrap(), vec![0.0; 3], "runs are apart");
        // A damaged file refuses the round with the reason.
        let (_, path) = cv.newest(&cv.run_dir("p", "r")).unwrap().unwrap();
        std::fs::write(&path, b"garbage").unwrap();
        let e = cv.load("p", "r", &l, |_| true).unwrap_err();
        assert!(e.to_string().contains("is damaged") && e.to_string().contains("start a new run"), "{e}");
        cv.forget("p", "r");
        assert!(!cv.run_dir("p", "r").exists());
    }
}
