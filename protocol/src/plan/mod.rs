//! The training plan a lead submits (TOML): what model, on which data schema, with which strategy,
//! for how many rounds, under which deadlines. Nodes receive the same plan and check it against
//! their own policy.
//!
//! # Layout
//! - this file: the format's types ([`Plan`] and its sections, as TOML spells them), [`PlanError`],
//!   the [`limits`] on every number, [`Plan::parse`] and the wire form whose hash is the plan id.
//! - `validate.rs`: [`Plan::validate`], every cross-field rule with the field named, and
//!   [`Plan::check_schema`] against the dataset schema.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::hash::ContentHash;
use crate::model::{ModelSpec, TensorSpec, Weights};

mod strategy;
mod validate;

pub use strategy::{ServerOptimizer, Strategy};
pub use validate::validate_plan_name;

/// A validated plan. Build it with [`Plan::parse`]; its fields then hold the invariants
/// `validate` checks (positive rounds, known schema, model inputs equal to the schema's features…).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// A human name for the plan, shown in tables and logs.
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Seeds the initial model and each node's batch order, so a run can be reproduced.
    #[serde(default)]
    pub seed: u64,
    /// How the initial model is drawn from `seed`.
    #[serde(default, skip_serializing_if = "InitScheme::is_default")]
    pub init: InitScheme,
    /// Federated rounds to run.
    pub rounds: u32,
    /// Fewest nodes that must accept the plan and report in each round; below it the plan fails.
    pub min_nodes: usize,
    /// Seconds a round waits for updates before dropping late nodes.
    #[serde(default = "default_round_deadline")]
    pub round_deadline_secs: u64,
    /// Seconds the coordinator waits for nodes to accept or refuse the plan.
    #[serde(default = "default_recruit_deadline")]
    pub recruit_deadline_secs: u64,
    /// How many times a round that ends with fewer than `min_nodes` reports (or cannot open with
    /// `min_nodes` connected) is tried again: the same round, on the same global model, with the
    /// nodes connected then. 0 (the default) fails the plan at the first such round. At most
    /// [`limits::MAX_RETRIES`]. Left out of the wire form at 0, so a plan written before this
    /// field keeps its id.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub retries: u32,
    pub model: ModelSpec,
    pub data: DataSpec,
    pub local: LocalTraining,
    pub strategy: Strategy,
    /// Differential privacy of what leaves each node; off unless the plan asks for it.
    #[serde(default)]
    pub privacy: PrivacySpec,
    /// Secure aggregation (Bonawitz et al. 2017): the coordinator learns only the sum of each
    /// round's updates, never one hospital's.
    #[serde(default)]
    pub secure_aggregation: bool,
    /// Settings of secure aggregation; defaults apply when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secagg: Option<SecAggSettings>,
    /// Only for `sanctum-coordinator simulate`; never sent to nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub simulation: Option<Simulation>,
}

fn default_round_deadline() -> u64 {
    600
}
fn default_recruit_deadline() -> u64 {
    120
}
fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// Which data the plan trains on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// The schema's name (the `name` in its file): what logs, tables and each hospital's privacy
    /// ledger call the dataset.
    pub schema: String,
    /// Which schema file exactly: the SHA-256 of its bytes, 64 lowercase hex digits. Required on
    /// the wire; a lead's plan may give `schema_file` instead and the CLI fills this in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_sha256: Option<String>,
    /// Lead side only, like `[simulation]`: the schema file, relative to the plan. The CLI reads
    /// it, fills `schema_sha256` and checks the plan against the schema; it is never sent.
    #[serde(default, skip_serializing)]
    pub schema_file: Option<PathBuf>,
    /// Which statistics standardise the features; absent: the schema's declared public ones
    /// under DP, each node's own train split without (FLamby's per-center normalisation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standardize: Option<StandardizeWith>,
}

/// A plan's choice of standardisation statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StandardizeWith {
    /// The public statistics the schema declares (also without DP, for one scale everywhere).
    Declared,
    /// Each node's own train-split mean and standard deviation: refused under DP, where they
    /// would leave in the model uncharged.
    PerNode,
}

/// What each node does locally in a round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalTraining {
    /// Optimizer steps (mini-batches) per round.
    pub steps: u32,
    pub batch_size: u32,
    #[serde(default)]
    pub optimizer: LocalOptimizer,
    pub learning_rate: f64,
    /// Class weighting of the loss, for imbalanced classification (binary or multi-class).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_weights: Option<ClassWeights>,
}

/// How a classification loss weighs each class.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ClassWeights {
    /// `"balanced"`: each node weighs class c by n / (k · n_c) over its own train split (as
    /// scikit-learn's `class_weight="balanced"`). The weights then depend on the node's data, so
    /// one patient changes every other patient's weight: DP-SGD's sensitivity no longer holds and
    /// example-level DP plans must declare their weights instead.
    Rule(WeightRule),
    /// One positive weight per class, in class order (binary: `[w0, w1]`), the same at every node.
    Declared(Vec<f64>),
}

/// A data-dependent class weighting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightRule {
    Balanced,
}

/// The node-side optimizer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LocalOptimizer {
    #[default]
    Sgd,
    Adam,
}

/// How a run's initial model is drawn from the plan's seed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InitScheme {
    /// PyTorch's layer rules (uniform in ±1/√fan_in) from a ChaCha20 stream seeded by the seed.
    #[default]
    Chacha20,
    /// Exactly the weights PyTorch draws for the same layers after `torch.manual_seed(seed)` on
    /// the CPU ([`crate::torch_init`]), to start where a PyTorch baseline with that seed starts.
    Pytorch,
}

impl InitScheme {
    fn is_default(&self) -> bool {
        *self == InitScheme::Chacha20
    }
}

/// How node updates are weighted in the average.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Weighting {
    /// By each node's training-sample count (FedAvg as published); reveals dataset sizes to the
    /// coordinator, so a node's policy may refuse it.
    #[default]
    Samples,
    /// Every node counts the same.
    Uniform,
}

/// Which differential privacy a plan asks of its nodes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrivacyMode {
    /// Updates leave without noise.
    #[default]
    None,
    /// Example-level DP at every node: DP-SGD (Poisson sampling, per-example clipping, Gaussian
    /// noise), protecting each hospital's patients.
    Example,
    /// Client-level DP at the coordinator (DP-FedAvg, McMahan et al. 2018): each hospital's
    /// update is clipped and the sum is noised, protecting whole hospitals from anyone who sees
    /// the released models. The coordinator itself sees the updates.
    Client,
}

/// Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive
/// Clipping"): the clip norm follows a noised estimate of a quantile of the update norms.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveClipping {
    /// The quantile of update norms the clip norm tracks (γ).
    #[serde(default = "default_quantile")]
    pub target_quantile: f64,
    /// Geometric step size of the clip-norm update (η_C).
    #[serde(default = "default_clip_lr")]
    pub learning_rate: f64,
    /// Noise multiplier of the count of unclipped updates (σ_b); the update noise is raised so
    /// the pair still has the plan's noise multiplier.
    pub count_noise_multiplier: f64,
}

fn default_quantile() -> f64 {
    0.5
}
fn default_clip_lr() -> f64 {
    0.2
}

/// The `[privacy]` section.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacySpec {
    #[serde(default)]
    pub mode: PrivacyMode,
    /// Noise standard deviation / clip norm. Give this or `target_epsilon`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise_multiplier: Option<f64>,
    /// ε each node may spend on the whole plan; each node derives the noise multiplier for its
    /// own sampling rate and step count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_epsilon: Option<f64>,
    /// δ of the (ε, δ) guarantee, per node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<f64>,
    /// Per-example gradient clipping norm (example mode), or per-update clipping norm — the
    /// initial one with adaptive clipping — (client mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_norm: Option<f64>,
    /// Client mode only: let the clip norm adapt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adaptive_clipping: Option<AdaptiveClipping>,
}

/// The `[secagg]` section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecAggSettings {
    /// The fewest nodes whose inputs may be summed (t of t-of-n), as a floor: a round with n
    /// participants uses the largest of this, a strict majority (⌊n/2⌋ + 1), `min_nodes` and 2
    /// ([`Plan::secagg_threshold`]). A strict majority is never given up: with 2t ≤ n the
    /// coordinator could show two disjoint groups two survivor lists and learn both secrets of
    /// one hospital, and every node refuses such a round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<usize>,
    /// L2 bound each node clips its update to before quantising (without client-level privacy;
    /// with it, `privacy.clip_norm` is the bound).
    #[serde(default = "default_secagg_clip")]
    pub clip_norm: f64,
    /// Aggregation weight under sample weighting: min(samples, max_samples) / max_samples, summed
    /// masked like the update. The cap also applies without secure aggregation: the coordinator
    /// weighs a plain update by min(samples, max_samples) (this section's default, since
    /// `[secagg]` is only accepted with `secure_aggregation = true`), so no node's claimed sample
    /// count can outweigh the others'.
    #[serde(default = "default_max_samples")]
    pub max_samples: u64,
    /// Seconds each step other than the masked input waits for nodes.
    #[serde(default = "default_step_timeout")]
    pub step_timeout_secs: u64,
}

impl Default for SecAggSettings {
    fn default() -> Self {
        Self {
            threshold: None,
            clip_norm: default_secagg_clip(),
            max_samples: default_max_samples(),
            step_timeout_secs: default_step_timeout(),
        }
    }
}

fn default_secagg_clip() -> f64 {
    10.0
}
fn default_max_samples() -> u64 {
    10_000
}
fn default_step_timeout() -> u64 {
    60
}

/// Where `simulate` finds each hospital's data, and the published numbers to compare against.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Simulation {
    pub hospitals: Vec<SimulatedHospital>,
    #[serde(default)]
    pub reference: Option<Reference>,
}

/// One simulated hospital: its name (which becomes its certificate) and its data file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulatedHospital {
    pub name: String,
    /// Relative paths are resolved against the plan file's directory.
    pub data: PathBuf,
}

/// Published results to print beside ours.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reference {
    /// Where the numbers come from.
    pub source: String,
    pub mean: f64,
    #[serde(default)]
    pub per_node: BTreeMap<String, f64>,
}

/// The rule schema names follow (a plan's, since the ledger keys budgets by it and logs show it).
pub const SCHEMA_NAME_RULE: &str = "must match [A-Za-z0-9][A-Za-z0-9._-]{0,63} (the schema file's `name`)";

/// Whether `text` is a SHA-256 in 64 lowercase hex digits.
pub fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Why a plan was refused.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("plan is not valid TOML: {0}")]
    Toml(String),
    #[error("plan field `{field}` {problem}")]
    Invalid { field: &'static str, problem: String },
}

fn invalid(field: &'static str, problem: impl Into<String>) -> PlanError {
    PlanError::Invalid { field, problem: problem.into() }
}

/// Bounds on a plan's numbers, checked by [`Plan::validate`]. Both sides parse every plan, so
/// neither the coordinator nor a node ever does arithmetic on a number outside them: every
/// deadline fits an `Instant` or a `SystemTime` with room to spare, rounds × steps fits a `u64`
/// many times over, and the model's size is known to fit memory before anything is allocated.
/// A node's policy may set lower caps of its own (`policy.max_model_parameters`,
/// `policy.max_local_steps`).
pub mod limits {
    /// Longest any deadline of a plan may be (recruitment, a round, a secure-aggregation step):
    /// 30 days. A round that waits longer for hospitals is better run again.
    pub const MAX_DEADLINE_SECS: u64 = 30 * 24 * 3600;
    /// Most rounds one plan may ask for.
    pub const MAX_ROUNDS: u32 = 10_000;
    /// Most nodes `min_nodes` or `secagg.threshold` may ask for.
    pub const MAX_NODES: usize = 10_000;
    /// Most `retries` a plan may ask for, per round: a round that fails ten times running has a
    /// cause that another attempt will not fix (a hospital down, a policy that refuses).
    pub const MAX_RETRIES: u32 = 10;
    /// Most parameters a plan's model may have: 2²⁸, 1 GiB as `f32` (the coordinator holds a
    /// few copies of it, each node one model and its update).
    pub const MAX_MODEL_PARAMETERS: u64 = 1 << 28;
    /// Most hidden layers (MLP) or convolutions (CNN).
    pub const MAX_MODEL_LAYERS: usize = 64;
    /// Largest TorchScript file a plan may carry: 64 MiB. The coordinator refuses a larger one at
    /// submission and a node fetches no more than this.
    pub const MAX_MODEL_FILE_BYTES: usize = 64 << 20;
    /// Most classes a classification plan may weigh (`local.class_weights`).
    pub const MAX_CLASSES: usize = 10_000;
    /// Most local optimizer steps per round.
    pub const MAX_LOCAL_STEPS: u32 = 100_000;
    /// Largest mini-batch.
    pub const MAX_BATCH_SIZE: u32 = 1 << 20;
    /// Longest plan name, in characters (ASCII only, see [`super::validate_plan_name`]).
    pub const MAX_NAME_CHARS: usize = 64;
    /// Smallest noise multiplier σ (`privacy.noise_multiplier`, and the least any accountant
    /// searches when it derives σ from `privacy.target_epsilon`). The PLD accountant's grid grows
    /// as 1/σ²: at σ = 10⁻³ one step needs ~10¹⁰ points. Below 0.1 a single step already costs
    /// ε in the hundreds, which is no privacy worth accounting.
    pub const MIN_NOISE_MULTIPLIER: f64 = 0.1;
    /// Largest noise multiplier: beyond 1000 the noise drowns any model (and ε is ~0).
    pub const MAX_NOISE_MULTIPLIER: f64 = 1000.0;
    /// Largest `privacy.target_epsilon`: ε beyond 100 is no guarantee (e¹⁰⁰ ≈ 10⁴³), and a
    /// larger target only drives the noise search to the smallest σ.
    pub const MAX_TARGET_EPSILON: f64 = 100.0;
    /// Smallest `privacy.delta`: well above the PLD accountant's window tail (10⁻¹⁵), which it
    /// adds to δ, so a reachable ε exists.
    pub const MIN_DELTA: f64 = 1e-12;
    /// `privacy.delta` must be below this: a δ of 10 % lets the mechanism leak a whole record
    /// one time in ten.
    pub const MAX_DELTA: f64 = 0.1;
    /// Smallest clip norm (`privacy.clip_norm`, `secagg.clip_norm`).
    pub const MIN_CLIP_NORM: f64 = 1e-6;
    /// Largest clip norm: the secure-aggregation quantiser spreads 32 bits over ±clip_norm.
    pub const MAX_CLIP_NORM: f64 = 1e6;
    /// Largest `privacy.adaptive_clipping.learning_rate` (η_C; Andrew et al. use 0.2): the clip
    /// norm moves by a factor of at most e^η a round.
    pub const MAX_CLIP_LEARNING_RATE: f64 = 10.0;
    /// Largest `secagg.max_samples`: the weight min(samples, max)/max is summed as a fraction,
    /// and 10⁹ records per hospital is beyond any consortium.
    pub const MAX_SAMPLES: u64 = 1_000_000_000;
}

/// The rule plan names follow, as the error states it.
pub const PLAN_NAME_RULE: &str = "must match [A-Za-z0-9][A-Za-z0-9._-]{0,63} (letters, digits, '.', '_' and '-', starting with a letter or digit, no '..'): it names the exported model's files";

/// The name prefix of SCAFFOLD's server control variate in a published global model: one tensor
/// `scaffold.c.<name>` per model tensor, after the model's own.
pub const CONTROL_VARIATE_PREFIX: &str = "scaffold.c.";

impl Plan {
    /// The tensors of a published global model, in the order updates use: the model's own, then
    /// (SCAFFOLD only) the server control variate, one tensor per model tensor. A node reading the
    /// model alone (to evaluate it, or an exported model) takes the model's tensors by name and
    /// never sees the control variate.
    pub fn global_layout(&self) -> Vec<TensorSpec> {
        let model = self.model.layout();
        if !self.strategy.is_scaffold() {
            return model;
        }
        let control = model
            .iter()
            .map(|t| TensorSpec { name: format!("{CONTROL_VARIATE_PREFIX}{}", t.name), shape: t.shape.clone() });
        model.iter().cloned().chain(control).collect()
    }

    /// The run's first global model: the model's initial weights from the plan's seed, and for
    /// SCAFFOLD a server control variate of zeros (as the paper starts it).
    pub fn initial_global(&self) -> Weights {
        let model = match self.init {
            InitScheme::Chacha20 => self.model.init(self.seed),
            InitScheme::Pytorch => crate::torch_init::pytorch_init(self.model.layout(), self.seed),
        };
        if !self.strategy.is_scaffold() {
            return model;
        }
        let mut values = model.values().to_vec();
        values.resize(model.values().len() * 2, 0.0);
        // The layout's size is twice the model's by construction.
        Weights::new(self.global_layout(), values).unwrap_or(model)
    }

    /// Parses and validates a plan; the error names the line or the field at fault.
    pub fn parse(text: &str) -> Result<Self, PlanError> {
        let plan: Plan = toml::from_str(text).map_err(|e| PlanError::Toml(e.to_string()))?;
        plan.validate()?;
        Ok(plan)
    }

    /// The secure-aggregation settings (defaults filled in).
    pub fn secagg_settings(&self) -> SecAggSettings {
        self.secagg.clone().unwrap_or_default()
    }

    /// The threshold t for a round with `participants` nodes: a strict majority (2t > n), raised
    /// to the plan's `secagg.threshold` and to `min_nodes`, never below 2. The coordinator sets
    /// this and every node requires at least this.
    ///
    /// The plan's threshold is a floor rather than a value checked at [`Plan::parse`] because n,
    /// the hospitals that accepted and are connected when a round opens, is known only then: any
    /// fixed t gives 2t ≤ n for some consortium, so parse could only refuse every explicit
    /// threshold. Raising t to a majority costs dropout tolerance (fewer may leave), never privacy.
    pub fn secagg_threshold(&self, participants: usize) -> usize {
        let s = self.secagg_settings();
        let majority = participants / 2 + 1;
        s.threshold.unwrap_or(0).max(majority).max(self.min_nodes).max(2)
    }

    /// The plan as sent to nodes: canonical TOML without the simulation section. Its SHA-256 is
    /// the plan id both sides log.
    pub fn to_wire_toml(&self) -> Result<String, PlanError> {
        if self.data.schema_sha256.is_none() {
            return Err(invalid(
                "data.schema_sha256",
                "is missing: resolve data.schema_file first (`Plan::resolve_files`), a node needs the hash",
            ));
        }
        let mut wire = self.clone();
        wire.simulation = None;
        wire.data.schema_file = None;
        if let ModelSpec::Torchscript(t) = &mut wire.model {
            t.file = None;
        }
        toml::to_string(&wire).map_err(|e| PlanError::Toml(e.to_string()))
    }

    /// The content address of [`Plan::to_wire_toml`].
    pub fn id_of(wire_toml: &str) -> ContentHash {
        ContentHash::of(wire_toml.as_bytes())
    }
}

#[cfg(test)]
mod tests;
