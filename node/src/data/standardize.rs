//! How a local dataset's features are standardised: which statistics ([`Standardize`], chosen by
//! [`crate::admission::admit`]), the train split's own statistics, and the map x ← (x − mean) / std
//! applied with declared or DP-released statistics.

use std::fmt;

use sanctum_protocol::dataset::{ColumnKind, DeclaredStatistics, Schema};

use super::LocalData;

/// Which statistics [`load`] standardises the features with.
#[derive(Clone, Debug, PartialEq)]
pub enum Standardize {
    /// Features as they are (the schema standardises nothing).
    Off,
    /// The node's own train-split mean and standard deviation (FLamby's per-center
    /// normalisation): only for plans without DP, since the model's scale then depends on them.
    PerNode,
    /// The schema's public statistics, the same at every node.
    Declared(DeclaredStatistics),
    /// Statistics this node releases under DP spending `epsilon` ([`crate::dp_stats`]), under DP
    /// plans and without DP alike: [`load`] leaves the features as they are, and the caller
    /// estimates, charges and applies them ([`dp_features`], [`standardize_with`]).
    EstimateDp { epsilon: f64 },
}

impl fmt::Display for Standardize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Standardize::Off => f.write_str("no standardisation"),
            Standardize::PerNode => f.write_str("this node's own train-split mean and standard deviation"),
            Standardize::Declared(stats) => write!(f, "the schema's declared statistics ({})", stats.provenance),
            Standardize::EstimateDp { epsilon } => {
                write!(f, "statistics estimated under differential privacy (ε = {epsilon}, charged)")
            }
        }
    }
}

/// A feature standardised under DP whose column declares no min and max: its contribution to the
/// released statistics would be unbounded, so the release is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "schema '{schema}' column '{column}' is standardised under DP without declared min and max; the consortium should declare both bounds in the schema"
)]
pub struct UnboundedFeature {
    pub schema: String,
    pub column: String,
}

/// The mean and sample standard deviation (ddof = 1, as FLamby) of each feature of the
/// row-major `train` rows.
pub(super) fn train_statistics(train: &[f32], d: usize) -> (Vec<f64>, Vec<f64>) {
    let n = train.len() / d.max(1);
    let (mut means, mut stds) = (Vec::with_capacity(d), Vec::with_capacity(d));
    for j in 0..d {
        let mean = (0..n).map(|i| f64::from(train[i * d + j])).sum::<f64>() / n.max(1) as f64;
        let var = if n > 1 {
            (0..n).map(|i| (f64::from(train[i * d + j]) - mean).powi(2)).sum::<f64>() / (n - 1) as f64
        } else {
            0.0
        };
        means.push(mean);
        stds.push(var.sqrt());
    }
    (means, stds)
}

/// The standardised features with their declared bounds, for [`crate::dp_stats::estimate`] over
/// [`LocalData::train_x`]. The schema checked that under `with = "dp"` every standardised column
/// declares min and max; a feature without them is an error, never an unbounded contribution.
pub fn dp_features(schema: &Schema) -> Result<Vec<crate::dp_stats::Bounded>, UnboundedFeature> {
    let mut out = Vec::new();
    for (index, f) in schema.features().iter().enumerate().filter(|(_, f)| f.standardize) {
        let column = &schema.columns()[f.column];
        let (min, max) = match *column.kind() {
            ColumnKind::Numeric { min: Some(lo), max: Some(hi) } => (lo, hi),
            ColumnKind::Integer { min: Some(lo), max: Some(hi) } => (lo as f64, hi as f64),
            _ => {
                return Err(UnboundedFeature { schema: schema.name().to_string(), column: column.name().to_string() });
            }
        };
        out.push(crate::dp_stats::Bounded { index, min, max });
    }
    Ok(out)
}

/// Standardises `data` (loaded with [`Standardize::EstimateDp`]) with released statistics: for
/// each `features[k]`, x ← (x − mean[k]) / std[k] on every train and test row; the other inputs
/// stay as they are. Like [`Standardize::Declared`], nothing in the map depends on the data
/// beyond what was released.
pub fn standardize_with(
    data: &mut LocalData,
    features: &[crate::dp_stats::Bounded],
    released: &crate::dp_stats::Released,
) {
    let mut mean = vec![0.0; data.features];
    let mut scale = vec![1.0; data.features];
    for ((f, m), s) in features.iter().zip(&released.mean).zip(&released.std) {
        if let (Some(mj), Some(sj)) = (mean.get_mut(f.index), scale.get_mut(f.index)) {
            (*mj, *sj) = (*m, *s);
        }
    }
    rescale(&mut data.train_x, &mut data.test_x, &mean, &scale);
}

/// x ← (x − mean[j]) / scale[j] for feature j of every train and test row, in f64.
pub(super) fn rescale(train: &mut [f32], test: &mut [f32], mean: &[f64], scale: &[f64]) {
    let d = mean.len();
    for (j, (m, s)) in mean.iter().zip(scale).enumerate() {
        for x in train.iter_mut().skip(j).step_by(d).chain(test.iter_mut().skip(j).step_by(d)) {
            *x = ((f64::from(*x) - m) / s) as f32;
        }
    }
}
