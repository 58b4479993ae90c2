//! The `[strategy]` section: the aggregation strategy and its parameters, as plans spell it.

use serde::{Deserialize, Serialize};

use super::Weighting;

/// The aggregation strategy: how the nodes train (FedProx's proximal term, SCAFFOLD's
/// correction), how the round's updates are combined (a weighted mean, or a robust rule), and the
/// server optimizer that moves the global model (Reddi et al. 2021 for the adaptive ones).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Strategy {
    /// The global model moves by the weighted mean of the updates.
    Fedavg {
        #[serde(default)]
        weighting: Weighting,
    },
    /// FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020): FedAvg
    /// at the server; each node adds (μ/2)·‖w − w_global‖² to its local loss.
    Fedprox {
        mu: f64,
        #[serde(default)]
        weighting: Weighting,
    },
    /// SCAFFOLD (Karimireddy et al., ICML 2020), control variates by option II: every local SGD
    /// step is corrected by c − cᵢ, the node keeps cᵢ, and the server keeps c. The update a node
    /// sends is Δy followed by Δcᵢ.
    Scaffold {
        #[serde(default = "default_one")]
        server_learning_rate: f64,
        #[serde(default)]
        weighting: Weighting,
    },
    /// FedAvgM (Hsu et al. 2019, "Measuring the Effects of Non-Identical Data Distribution"):
    /// server momentum, v ← β·v + Δ, w ← w + η·v.
    Fedavgm {
        #[serde(default = "default_one")]
        server_learning_rate: f64,
        #[serde(default = "default_momentum")]
        momentum: f64,
        #[serde(default)]
        weighting: Weighting,
    },
    Fedadam(ServerOptimizer),
    Fedyogi(ServerOptimizer),
    Fedadagrad(ServerOptimizer),
    /// Coordinate-wise median of the round's updates (Yin et al., ICML 2018), unweighted.
    Median,
    /// Coordinate-wise trimmed mean (Yin et al. 2018): on each coordinate the ⌊β·n⌋ largest and
    /// smallest values are dropped and the rest averaged, unweighted.
    TrimmedMean {
        trim: f64,
    },
    /// Multi-Krum (Blanchard et al., NeurIPS 2017): each update is scored by the sum of its squared
    /// distances to its n − f − 2 nearest others; the `selected` (m) best are averaged with the
    /// plan's weighting, uniform unless the plan says otherwise (a hospital the rule selects must
    /// not weigh more by claiming more samples, and a plan chosen out of distrust should not ask
    /// every hospital for its size). Needs n ≥ 2f + 3 updates.
    MultiKrum {
        byzantine: usize,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        selected: Option<usize>,
        #[serde(default = "uniform")]
        weighting: Weighting,
    },
}

fn uniform() -> Weighting {
    Weighting::Uniform
}
fn default_one() -> f64 {
    1.0
}
fn default_momentum() -> f64 {
    0.9
}

/// Hyper-parameters of the adaptive server optimizers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerOptimizer {
    pub server_learning_rate: f64,
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    /// Adaptivity floor added to √v.
    #[serde(default = "default_tau")]
    pub tau: f64,
    #[serde(default)]
    pub weighting: Weighting,
}

fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.99
}
fn default_tau() -> f64 {
    1e-3
}

impl Strategy {
    /// The strategy's name as plans spell it.
    pub fn name(&self) -> &'static str {
        match self {
            Strategy::Fedavg { .. } => "fedavg",
            Strategy::Fedprox { .. } => "fedprox",
            Strategy::Scaffold { .. } => "scaffold",
            Strategy::Fedavgm { .. } => "fedavgm",
            Strategy::Fedadam(_) => "fedadam",
            Strategy::Fedyogi(_) => "fedyogi",
            Strategy::Fedadagrad(_) => "fedadagrad",
            Strategy::Median => "median",
            Strategy::TrimmedMean { .. } => "trimmed_mean",
            Strategy::MultiKrum { .. } => "multi_krum",
        }
    }

    /// How updates are weighted; the coordinate-wise rules count every update the same.
    pub fn weighting(&self) -> Weighting {
        match self {
            Strategy::Fedavg { weighting }
            | Strategy::Fedprox { weighting, .. }
            | Strategy::Scaffold { weighting, .. }
            | Strategy::Fedavgm { weighting, .. }
            | Strategy::MultiKrum { weighting, .. } => *weighting,
            Strategy::Fedadam(o) | Strategy::Fedyogi(o) | Strategy::Fedadagrad(o) => o.weighting,
            Strategy::Median | Strategy::TrimmedMean { .. } => Weighting::Uniform,
        }
    }

    /// A robust aggregator: it needs every update of the round on its own at close (so neither
    /// secure aggregation, which hides them, nor client-level DP, whose noise is calibrated to a
    /// mean, applies).
    pub fn is_robust(&self) -> bool {
        matches!(self, Strategy::Median | Strategy::TrimmedMean { .. } | Strategy::MultiKrum { .. })
    }

    /// FedProx's μ, when the nodes add a proximal term.
    pub fn proximal_mu(&self) -> Option<f64> {
        match self {
            Strategy::Fedprox { mu, .. } => Some(*mu),
            _ => None,
        }
    }

    /// SCAFFOLD: the global model carries the server control variate and each update carries the
    /// node's change of its own.
    pub fn is_scaffold(&self) -> bool {
        matches!(self, Strategy::Scaffold { .. })
    }
}
