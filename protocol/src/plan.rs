//! The training plan a lead submits (TOML): what model, on which data schema, with which strategy,
//! for how many rounds, under which deadlines. Nodes receive the same plan and check it against
//! their own policy.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::hash::ContentHash;
use crate::model::ModelSpec;

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

/// The aggregation strategy and server optimizer (Reddi et al. 2021 for the adaptive ones).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Strategy {
    /// The global model moves by the weighted mean of the updates.
    Fedavg {
        #[serde(default)]
        weighting: Weighting,
    },
    Fedadam(ServerOptimizer),
    Fedyogi(ServerOptimizer),
    Fedadagrad(ServerOptimizer),
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

impl Strategy {
    /// The strategy's name as plans spell it.
    pub fn name(&self) -> &'static str {
        match self {
            Strategy::Fedavg { .. } => "fedavg",
            Strategy::Fedadam(_) => "fedadam",
            Strategy::Fedyogi(_) => "fedyogi",
            Strategy::Fedadagrad(_) => "fedadagrad",
        }
    }

    /// How updates are weighted.
    pub fn weighting(&self) -> Weighting {
        match self {
            Strategy::Fedavg { weighting } => *weighting,
            Strategy::Fedadam(o) | Strategy::Fedyogi(o) | Strategy::Fedadagrad(o) => o.weighting,
        }
    }
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

/// A finite number in `min ..= max`, or the error naming `field` and the bounds.
fn check_range(field: &'static str, value: f64, min: f64, max: f64) -> Result<(), PlanError> {
    if !(value.is_finite() && (min..=max).contains(&value)) {
        return Err(invalid(field, format!("is {value:?}; it must be a number from {min:?} to {max:?}")));
    }
    Ok(())
}

/// The rule plan names follow, as the error states it.
pub const PLAN_NAME_RULE: &str = "must match [A-Za-z0-9][A-Za-z0-9._-]{0,63} (letters, digits, '.', '_' and '-', starting with a letter or digit, no '..'): it names the exported model's files";

/// Checks a plan name against [`PLAN_NAME_RULE`]. The name becomes a file name under
/// `state/exports`, so it can hold no path separator, no `..`, and no leading dot.
pub fn validate_plan_name(name: &str) -> Result<(), PlanError> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !first_ok || !rest_ok || name.len() > limits::MAX_NAME_CHARS || name.contains("..") {
        return Err(invalid("name", format!("{:?} {PLAN_NAME_RULE}", shorten(name, limits::MAX_NAME_CHARS))));
    }
    Ok(())
}

/// At most `max` characters of `text` (never cut inside a character), with `…` when cut.
fn shorten(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

/// A whole number of seconds in `1 ..= limits::MAX_DEADLINE_SECS`.
fn check_deadline(field: &'static str, secs: u64) -> Result<(), PlanError> {
    if !(1..=limits::MAX_DEADLINE_SECS).contains(&secs) {
        return Err(invalid(
            field,
            format!("is {secs}; it must be 1 to {} seconds (30 days)", limits::MAX_DEADLINE_SECS),
        ));
    }
    Ok(())
}

/// A count in `1 ..= max`.
fn check_count(field: &'static str, value: u64, max: u64) -> Result<(), PlanError> {
    if !(1..=max).contains(&value) {
        return Err(invalid(field, format!("is {value}; it must be 1 to {max}")));
    }
    Ok(())
}

impl Plan {
    /// Parses and validates a plan; the error names the line or the field at fault.
    pub fn parse(text: &str) -> Result<Self, PlanError> {
        let plan: Plan = toml::from_str(text).map_err(|e| PlanError::Toml(e.to_string()))?;
        plan.validate()?;
        Ok(plan)
    }

    /// Cross-field rules that types alone do not hold.
    pub fn validate(&self) -> Result<(), PlanError> {
        validate_plan_name(&self.name)?;
        check_count("rounds", u64::from(self.rounds), u64::from(limits::MAX_ROUNDS))?;
        check_count("min_nodes", self.min_nodes as u64, limits::MAX_NODES as u64)?;
        check_deadline("round_deadline_secs", self.round_deadline_secs)?;
        check_deadline("recruit_deadline_secs", self.recruit_deadline_secs)?;
        if self.retries > limits::MAX_RETRIES {
            return Err(invalid(
                "retries",
                format!("is {}; it must be 0 to {} (attempts after a failed round)", self.retries, limits::MAX_RETRIES),
            ));
        }
        // The size first: `inputs()` and the layout multiply the model's dimensions unchecked.
        self.validate_model_size()?;
        self.validate_data()?;
        self.model.validate().map_err(|e| invalid("model", e.to_string()))?;
        check_count("local.steps", u64::from(self.local.steps), u64::from(limits::MAX_LOCAL_STEPS))?;
        check_count("local.batch_size", u64::from(self.local.batch_size), u64::from(limits::MAX_BATCH_SIZE))?;
        if !(self.local.learning_rate.is_finite() && self.local.learning_rate > 0.0) {
            return Err(invalid("local.learning_rate", "must be a positive number"));
        }
        if let Strategy::Fedadam(o) | Strategy::Fedyogi(o) | Strategy::Fedadagrad(o) = &self.strategy {
            if !(o.server_learning_rate.is_finite() && o.server_learning_rate > 0.0) {
                return Err(invalid("strategy.server_learning_rate", "must be a positive number"));
            }
            for (field, b) in [("strategy.beta1", o.beta1), ("strategy.beta2", o.beta2)] {
                if !(0.0..1.0).contains(&b) {
                    return Err(invalid(field, format!("is {b}; it must be in [0, 1)")));
                }
            }
            if !(o.tau.is_finite() && o.tau > 0.0) {
                return Err(invalid("strategy.tau", "must be a positive number"));
            }
        }
        self.validate_privacy()?;
        self.validate_secagg()?;
        if let Some(sim) = &self.simulation {
            let mut seen = BTreeSet::new();
            for h in &sim.hospitals {
                crate::pki::validate_name(&h.name).map_err(|e| invalid("simulation.hospitals.name", e.to_string()))?;
                if !seen.insert(&h.name) {
                    return Err(invalid("simulation.hospitals", format!("'{}' is listed twice", h.name)));
                }
            }
            if sim.hospitals.len() < self.min_nodes {
                return Err(invalid(
                    "simulation.hospitals",
                    format!("lists {} hospitals but min_nodes is {}", sim.hospitals.len(), self.min_nodes),
                ));
            }
        }
        Ok(())
    }

    /// `[data]` and `local.class_weights` on their own; [`Plan::check_schema`] checks them against
    /// the schema itself.
    fn validate_data(&self) -> Result<(), PlanError> {
        let d = &self.data;
        if validate_plan_name(&d.schema).is_err() {
            return Err(invalid(
                "data.schema",
                format!("{:?} {SCHEMA_NAME_RULE}", shorten(&d.schema, limits::MAX_NAME_CHARS)),
            ));
        }
        match (&d.schema_sha256, &d.schema_file) {
            (None, None) => {
                return Err(invalid(
                    "data.schema_sha256",
                    "is missing: a plan names its schema file by SHA-256; give data.schema_file (the CLI fills the hash in) or the hash itself",
                ));
            }
            (Some(h), _) if !is_sha256_hex(h) => {
                return Err(invalid(
                    "data.schema_sha256",
                    "must be 64 lowercase hex digits (the schema file's SHA-256)",
                ));
            }
            _ => {}
        }
        match &self.local.class_weights {
            None | Some(ClassWeights::Rule(WeightRule::Balanced)) if self.privacy.mode != PrivacyMode::Example => {}
            None => {}
            Some(ClassWeights::Rule(WeightRule::Balanced)) => {
                return Err(invalid(
                    "local.class_weights",
                    "is \"balanced\", which weighs each class by the node's own class counts: one patient then changes every other patient's weight, which DP-SGD's sensitivity does not cover; declare the weights (class_weights = [w0, w1, ...]) for an example-level DP plan",
                ));
            }
            Some(ClassWeights::Declared(w)) => {
                if w.len() < 2 || w.len() > limits::MAX_CLASSES {
                    return Err(invalid(
                        "local.class_weights",
                        format!("lists {} weights; give one per class, 2 to {}", w.len(), limits::MAX_CLASSES),
                    ));
                }
                if let Some(bad) = w.iter().find(|v| !(v.is_finite() && **v > 0.0 && **v <= 1e6)) {
                    return Err(invalid(
                        "local.class_weights",
                        format!("holds {bad:?}; every weight must be a number in (0, 1e6]"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Checks the plan against the schema it names: the hash, the name, the model's inputs
    /// (the schema's expanded features) and outputs (the task's), the model kind for the task,
    /// class weights for the task, and the privacy the task allows. Run by the lead's CLI when
    /// the plan gives its schema file, and by every node against the schema file it holds.
    pub fn check_schema(&self, schema: &crate::dataset::Schema) -> Result<(), PlanError> {
        use crate::dataset::Task;
        let hash = schema.sha256().to_hex();
        if let Some(h) = &self.data.schema_sha256
            && *h != hash
        {
            return Err(invalid(
                "data.schema_sha256",
                format!(
                    "is {h}, but the schema file's SHA-256 is {hash}: the plan was written for another version of the schema"
                ),
            ));
        }
        if self.data.schema != schema.name() {
            return Err(invalid(
                "data.schema",
                format!("is '{}', but the schema file is named '{}'", self.data.schema, schema.name()),
            ));
        }
        let features = schema.features().len();
        if self.model.inputs() != features {
            return Err(invalid(
                "model.inputs",
                format!(
                    "is {} but schema '{}' has {features} features (after one-hot encoding)",
                    self.model.inputs(),
                    schema.name()
                ),
            ));
        }
        let task = schema.task();
        if self.model.outputs() != task.outputs() {
            return Err(invalid(
                "model.outputs",
                format!(
                    "is {} but schema '{}' is a {task} task, whose model has {} output(s)",
                    self.model.outputs(),
                    schema.name(),
                    task.outputs()
                ),
            ));
        }
        if matches!(self.model, ModelSpec::Cox { .. }) && task != Task::Survival {
            return Err(invalid(
                "model.kind",
                format!("is cox, a survival model, but schema '{}' is a {task} task", schema.name()),
            ));
        }
        if let Some(ClassWeights::Declared(w)) = &self.local.class_weights {
            let classes = match task {
                Task::Binary => 2,
                Task::Multiclass { classes } => classes,
                Task::Regression | Task::Survival => 0,
            };
            if w.len() != classes {
                return Err(invalid(
                    "local.class_weights",
                    format!(
                        "lists {} weights but schema '{}' is a {task} task with {classes} classes",
                        w.len(),
                        schema.name()
                    ),
                ));
            }
        }
        if self.local.class_weights.is_some() && matches!(task, Task::Regression | Task::Survival) {
            return Err(invalid(
                "local.class_weights",
                format!("applies to classification; schema '{}' is a {task} task", schema.name()),
            ));
        }
        if task == Task::Survival && self.privacy.mode == PrivacyMode::Example {
            return Err(invalid(
                "privacy.mode",
                "is example, but the Cox partial likelihood couples the rows of a batch (each row's loss depends on its risk set), so there is no per-example gradient to clip; use client-level DP (privacy.mode = \"client\"), which clips each hospital's whole update",
            ));
        }
        Ok(())
    }

    /// The model's depth and parameter count within [`limits`], computed without overflow.
    fn validate_model_size(&self) -> Result<(), PlanError> {
        let layers = match &self.model {
            ModelSpec::LogisticRegression { .. } | ModelSpec::Cox { .. } => 0,
            ModelSpec::Torchscript(t) => t.parameters.len().div_ceil(16),
            ModelSpec::Mlp { hidden, .. } => hidden.len(),
            ModelSpec::Cnn { filters, .. } => filters.len(),
        };
        if layers > limits::MAX_MODEL_LAYERS {
            return Err(invalid(
                "model",
                format!("has {layers} layers; a plan's model may have at most {}", limits::MAX_MODEL_LAYERS),
            ));
        }
        match self.model.checked_num_params() {
            Some(n) if n <= limits::MAX_MODEL_PARAMETERS => Ok(()),
            n => Err(invalid(
                "model",
                format!(
                    "has {} parameters; a plan's model may have at most {} (2^28)",
                    n.map_or_else(|| "more than 2^64".to_string(), |n| n.to_string()),
                    limits::MAX_MODEL_PARAMETERS
                ),
            )),
        }
    }

    /// The model's parameter count, which [`Plan::validate`] has bounded by
    /// [`limits::MAX_MODEL_PARAMETERS`] (so it fits a `u64` and a `usize`).
    pub fn model_parameters(&self) -> u64 {
        self.model.checked_num_params().unwrap_or(u64::MAX)
    }

    fn validate_privacy(&self) -> Result<(), PlanError> {
        let p = &self.privacy;
        match p.mode {
            PrivacyMode::None => {
                if p.noise_multiplier.is_some()
                    || p.target_epsilon.is_some()
                    || p.clip_norm.is_some()
                    || p.adaptive_clipping.is_some()
                {
                    return Err(invalid(
                        "privacy.mode",
                        "is none, but privacy parameters are set; use mode = \"example\"",
                    ));
                }
            }
            PrivacyMode::Example | PrivacyMode::Client => {
                match (p.noise_multiplier, p.target_epsilon) {
                    (Some(_), Some(_)) | (None, None) => {
                        return Err(invalid("privacy", "needs exactly one of noise_multiplier or target_epsilon"));
                    }
                    (Some(sigma), None) => check_range(
                        "privacy.noise_multiplier",
                        sigma,
                        limits::MIN_NOISE_MULTIPLIER,
                        limits::MAX_NOISE_MULTIPLIER,
                    )?,
                    (None, Some(eps)) => {
                        if !(eps.is_finite() && eps > 0.0 && eps <= limits::MAX_TARGET_EPSILON) {
                            return Err(invalid(
                                "privacy.target_epsilon",
                                format!("is {eps:?}; it must be above 0 and at most {:?}", limits::MAX_TARGET_EPSILON),
                            ));
                        }
                    }
                }
                match p.clip_norm {
                    None => {
                        return Err(invalid("privacy.clip_norm", "is required with mode = \"example\" or \"client\""));
                    }
                    Some(c) => check_range("privacy.clip_norm", c, limits::MIN_CLIP_NORM, limits::MAX_CLIP_NORM)?,
                }
                match p.delta {
                    Some(d) if (limits::MIN_DELTA..limits::MAX_DELTA).contains(&d) => {}
                    d => {
                        return Err(invalid(
                            "privacy.delta",
                            format!(
                                "is {}; it is required with mode = \"example\" or \"client\" and must be at least {:?} and below {:?}",
                                d.map_or_else(|| "missing".to_string(), |d| format!("{d:?}")),
                                limits::MIN_DELTA,
                                limits::MAX_DELTA
                            ),
                        ));
                    }
                }
                if p.mode == PrivacyMode::Example && self.local.optimizer != LocalOptimizer::Sgd {
                    return Err(invalid("local.optimizer", "must be sgd with example-level privacy (DP-SGD)"));
                }
                if p.mode == PrivacyMode::Example && p.adaptive_clipping.is_some() {
                    return Err(invalid("privacy.adaptive_clipping", "applies to mode = \"client\" only"));
                }
                if p.mode == PrivacyMode::Client && self.strategy.weighting() != Weighting::Uniform {
                    return Err(invalid(
                        "strategy.weighting",
                        "must be \"uniform\" with client-level privacy: every hospital's update has the same bound",
                    ));
                }
                if let Some(a) = &p.adaptive_clipping {
                    if !(a.target_quantile > 0.0 && a.target_quantile < 1.0) {
                        return Err(invalid("privacy.adaptive_clipping.target_quantile", "must be in (0, 1)"));
                    }
                    if !(a.learning_rate.is_finite()
                        && a.learning_rate > 0.0
                        && a.learning_rate <= limits::MAX_CLIP_LEARNING_RATE)
                    {
                        return Err(invalid(
                            "privacy.adaptive_clipping.learning_rate",
                            format!(
                                "is {:?}; it must be above 0 and at most {:?}",
                                a.learning_rate,
                                limits::MAX_CLIP_LEARNING_RATE
                            ),
                        ));
                    }
                    check_range(
                        "privacy.adaptive_clipping.count_noise_multiplier",
                        a.count_noise_multiplier,
                        limits::MIN_NOISE_MULTIPLIER,
                        limits::MAX_NOISE_MULTIPLIER,
                    )?;
                }
            }
        }
        Ok(())
    }

    fn validate_secagg(&self) -> Result<(), PlanError> {
        if !self.secure_aggregation {
            if self.secagg.is_some() {
                return Err(invalid("secagg", "is set but secure_aggregation is not true"));
            }
            return Ok(());
        }
        let s = self.secagg_settings();
        if self.min_nodes < 2 {
            return Err(invalid(
                "min_nodes",
                "must be at least 2 with secure aggregation (a sum of one is that update)",
            ));
        }
        if self.retries > 0 {
            // A retry would need each node that sent its masked input to mask the same update
            // again under the retry's new keys, and a node never sends a masked input twice.
            return Err(invalid(
                "retries",
                "must be 0 with secure aggregation: a node never sends a round's masked input twice, so a retried round could not count the nodes that reported",
            ));
        }
        if let Some(t) = s.threshold
            && t < 2
        {
            return Err(invalid("secagg.threshold", "must be at least 2"));
        }
        check_range("secagg.clip_norm", s.clip_norm, limits::MIN_CLIP_NORM, limits::MAX_CLIP_NORM)?;
        if let Some(t) = s.threshold
            && t > limits::MAX_NODES
        {
            return Err(invalid("secagg.threshold", format!("is {t}; it must be 2 to {}", limits::MAX_NODES)));
        }
        check_count("secagg.max_samples", s.max_samples, limits::MAX_SAMPLES)?;
        check_deadline("secagg.step_timeout_secs", s.step_timeout_secs)?;
        if self.privacy.adaptive_clipping.is_some() {
            return Err(invalid(
                "privacy.adaptive_clipping",
                "needs each hospital's own update norm, which secure aggregation hides; use a fixed clip_norm",
            ));
        }
        Ok(())
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
mod tests {
    use super::*;

    const PLAN: &str = r#"
name = "t"
rounds = 2
min_nodes = 1
[model]
kind = "logistic_regression"
inputs = 13
[data]
schema = "heart_disease"
schema_sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
[local]
steps = 3
batch_size = 4
learning_rate = 0.01
[strategy]
kind = "fedadam"
server_learning_rate = 0.01
"#;

    /// The plan against its schema: hash, name, inputs, outputs, model kind, class weights and
    /// the privacy a task allows, each refusal naming its field.
    #[test]
    fn a_plan_is_checked_against_its_schema() {
        use crate::dataset::Schema;
        let heart = Schema::parse(include_str!("../../examples/heart_disease/schema.toml")).unwrap();
        let hash = heart.sha256().to_hex();
        let plan = |edit: &dyn Fn(String) -> String| {
            let text = PLAN.replace("0000000000000000000000000000000000000000000000000000000000000000", &hash);
            Plan::parse(&edit(text)).unwrap()
        };
        let same = |t: String| t;
        plan(&same).check_schema(&heart).unwrap();
        let refused = |p: Plan, field: &str| {
            let e = p.check_schema(&heart).unwrap_err().to_string();
            assert!(e.contains(field), "{field}: {e}");
            e
        };
        refused(plan(&|t| t.replace("inputs = 13", "inputs = 12")), "model.inputs");
        refused(plan(&|t| t.replace("inputs = 13", "inputs = 13\noutputs = 2")), "model.outputs");
        refused(plan(&|t| t.replace("schema = \"heart_disease\"", "schema = \"other\"")), "data.schema");
        let e = refused(plan(&|t| t.replace(&hash, &"ab".repeat(32))), "data.schema_sha256");
        assert!(e.contains(&hash), "the file's own hash is named: {e}");
        refused(plan(&|t| t.replace("kind = \"logistic_regression\"", "kind = \"cox\"")), "model.kind");
        refused(plan(&|t| t.replace("steps = 3", "steps = 3\nclass_weights = [1.0, 2.0, 3.0]")), "local.class_weights");
        plan(&|t| t.replace("steps = 3", "steps = 3\nclass_weights = [1.0, 9.0]")).check_schema(&heart).unwrap();
        plan(&|t| t.replace("steps = 3", "steps = 3\nclass_weights = \"balanced\"")).check_schema(&heart).unwrap();
        // Balanced weights depend on the node's counts: refused under example-level DP, at parse.
        let dp = "[privacy]\nmode = \"example\"\nnoise_multiplier = 1.0\nclip_norm = 1.0\ndelta = 1e-5\n";
        let balanced = PLAN.replace("steps = 3", "steps = 3\nclass_weights = \"balanced\"");
        let e = Plan::parse(&format!("{balanced}{dp}")).unwrap_err().to_string();
        assert!(e.contains("local.class_weights") && e.contains("declare the weights"), "{e}");
        for bad in ["[0.0, 1.0]", "[1.0]", "[1.0, inf]"] {
            let t = PLAN.replace("steps = 3", &format!("steps = 3\nclass_weights = {bad}"));
            let e = Plan::parse(&t).unwrap_err().to_string();
            assert!(e.contains("local.class_weights"), "{bad}: {e}");
        }
        // Survival: no example-level DP (the partial likelihood has no per-example gradient).
        let survival = Schema::parse(include_str!("../../examples/tcga_brca/schema.toml")).unwrap();
        let cox = format!(
            "name = \"c\"\nrounds = 1\nmin_nodes = 1\n[model]\nkind = \"cox\"\ninputs = 39\n[data]\nschema = \"{}\"\nschema_sha256 = \"{}\"\n[local]\nsteps = 1\nbatch_size = 8\nlearning_rate = 0.1\n[strategy]\nkind = \"fedavg\"\nweighting = \"uniform\"\n",
            survival.name(),
            survival.sha256().to_hex()
        );
        Plan::parse(&cox).unwrap().check_schema(&survival).unwrap();
        let e = Plan::parse(&format!("{cox}{dp}")).unwrap().check_schema(&survival).unwrap_err().to_string();
        assert!(e.contains("privacy.mode") && e.contains("client"), "{e}");
        let client = "[privacy]\nmode = \"client\"\nnoise_multiplier = 1.0\nclip_norm = 1.0\ndelta = 1e-5\n";
        Plan::parse(&format!("{cox}{client}")).unwrap().check_schema(&survival).unwrap();
    }

    /// The plan id is the SHA-256 of the wire form: a field added with a default must be left
    /// out of it at that default, or every plan written before gets a new id (and a node's
    /// ledger and releases, keyed by plan id, would no longer find it). The id below was
    /// computed from `PLAN` before `retries` existed (commit 8381a30).
    #[test]
    fn a_plan_written_before_retries_keeps_its_id() {
        let plan = Plan::parse(PLAN).unwrap();
        let wire = plan.to_wire_toml().unwrap();
        assert!(!wire.contains("retries"), "{wire}");
        assert_eq!(Plan::id_of(&wire).to_hex(), "eefc5694b55d69b7b269de24ac5bbe0db01e633592f8036fad54362dd89400a7");
        let explicit_zero = Plan::parse(&PLAN.replace("min_nodes = 1", "min_nodes = 1\nretries = 0")).unwrap();
        assert_eq!(explicit_zero.to_wire_toml().unwrap(), wire, "retries = 0 is the default, the same plan");
        // Retries change what the run does, so they are part of the plan (and of its id).
        let retried = Plan::parse(&PLAN.replace("min_nodes = 1", "min_nodes = 1\nretries = 2")).unwrap();
        let retried_wire = retried.to_wire_toml().unwrap();
        assert!(retried_wire.contains("retries = 2"), "{retried_wire}");
        assert_eq!(Plan::parse(&retried_wire).unwrap(), retried);
        assert_ne!(Plan::id_of(&retried_wire), Plan::id_of(&wire));
    }

    #[test]
    fn parses_and_roundtrips_through_the_wire_form() {
        let plan = Plan::parse(PLAN).unwrap();
        assert_eq!(plan.strategy.name(), "fedadam");
        let wire = plan.to_wire_toml().unwrap();
        assert_eq!(Plan::parse(&wire).unwrap(), plan);
    }

    #[test]
    fn errors_name_the_field_or_line() {
        let e = Plan::parse(&PLAN.replace("heart_disease", "no/pe")).unwrap_err().to_string();
        assert!(e.contains("data.schema"), "{e}");
        let e = Plan::parse(&PLAN.replace("schema_sha256 = \"0000", "schema_sha256 = \"ZZ00")).unwrap_err().to_string();
        assert!(e.contains("data.schema_sha256"), "{e}");
        let no_hash: String =
            PLAN.lines().filter(|l| !l.starts_with("schema_sha256")).map(|l| format!("{l}\n")).collect();
        let e = Plan::parse(&no_hash).unwrap_err().to_string();
        assert!(e.contains("data.schema_sha256") && e.contains("schema_file"), "{e}");
        let e = Plan::parse(&PLAN.replace("rounds = 2", "rounds = \"two\"")).unwrap_err().to_string();
        assert!(e.contains("line 3"), "{e}");
        let e = Plan::parse(&PLAN.replace("steps = 3", "steps = 3\nstepz = 1")).unwrap_err().to_string();
        assert!(e.contains("stepz"), "{e}");
        let e = Plan::parse(&PLAN.replace("rounds = 2", "rounds = 0")).unwrap_err().to_string();
        assert!(e.contains("rounds"), "{e}");
        let dp = |extra: &str| Plan::parse(&format!("{PLAN}[privacy]\nmode = \"example\"\n{extra}"));
        let e = dp("clip_norm = 1.0\ndelta = 1e-5").unwrap_err().to_string();
        assert!(e.contains("exactly one of noise_multiplier or target_epsilon"), "{e}");
        let e = dp("noise_multiplier = 1.0\ndelta = 1e-5").unwrap_err().to_string();
        assert!(e.contains("privacy.clip_norm"), "{e}");
        let e = dp("noise_multiplier = 1.0\nclip_norm = 1.0\ndelta = 2").unwrap_err().to_string();
        assert!(e.contains("privacy.delta"), "{e}");
        let ok = dp("target_epsilon = 3.0\nclip_norm = 1.0\ndelta = 1e-5").unwrap();
        assert_eq!(Plan::parse(&ok.to_wire_toml().unwrap()).unwrap(), ok);
    }

    #[test]
    fn plan_names_are_file_names_and_nothing_else() {
        let named = |name: &str| Plan::parse(&PLAN.replace("name = \"t\"", &format!("name = {name:?}")));
        for ok in ["t", "heart-disease-fedavg", "A.b_c-9", "x".repeat(64).as_str(), "v1.2"] {
            assert!(named(ok).is_ok(), "{ok}");
        }
        for bad in [
            "/tmp/evil",
            "../../evil",
            "a/../../b",
            "a..b",
            "..",
            ".hidden",
            "-flag",
            "",
            " ",
            "a b",
            "a\\b",
            "C:evil",
            "Hôpital",
            "病院",
            "x\ty",
            &"x".repeat(65),
        ] {
            let e = named(bad).unwrap_err().to_string();
            assert!(e.contains("`name`") && e.contains(PLAN_NAME_RULE), "{bad:?}: {e}");
        }
        // A long non-ASCII name is shortened by characters in the error, never cut inside one.
        let e = named(&"é".repeat(100)).unwrap_err().to_string();
        assert!(e.contains(&format!("{}…", "é".repeat(64))), "{e}");
    }

    #[test]
    fn numbers_outside_the_limits_are_refused_with_the_field_and_the_bound() {
        let with = |from: &str, to: &str| {
            assert!(PLAN.contains(from), "{from}");
            Plan::parse(&PLAN.replace(from, to)).map(|_| ()).map_err(|e| e.to_string())
        };
        let head = |extra: &str| with("min_nodes = 1", &format!("min_nodes = 1\n{extra}"));
        let max_i64 = i64::MAX.to_string();
        let cases: Vec<(Result<(), String>, &str)> = vec![
            (head(&format!("round_deadline_secs = {max_i64}")), "round_deadline_secs"),
            (head(&format!("recruit_deadline_secs = {max_i64}")), "recruit_deadline_secs"),
            (head("round_deadline_secs = 2592001"), "2592000"),
            (head("recruit_deadline_secs = 0"), "recruit_deadline_secs"),
            // Beyond TOML's i64, but the `toml` crate reads it into a u64 field.
            (head("round_deadline_secs = 9223372036854775808"), "round_deadline_secs"),
            (head("recruit_deadline_secs = 18446744073709551615"), "recruit_deadline_secs"),
            (head("round_deadline_secs = -1"), "line"),
            (with("rounds = 2", "rounds = 10001"), "rounds"),
            (with("rounds = 2", "rounds = 4294967295"), "rounds"),
            (with("min_nodes = 1", "min_nodes = 10001"), "min_nodes"),
            (head("retries = 11"), "retries"),
            (head("retries = -1"), "line"),
            (with("steps = 3", "steps = 100001"), "local.steps"),
            (with("steps = 3", "steps = 4294967295"), "local.steps"),
            (with("batch_size = 4", "batch_size = 1048577"), "local.batch_size"),
            (with("inputs = 13", "inputs = 9223372036854775807"), "9223372036854775808 parameters"),
            (
                with(
                    "kind = \"logistic_regression\"\ninputs = 13",
                    "kind = \"mlp\"\ninputs = 13\nhidden = [4294967296, 4294967296]",
                ),
                "more than 2^64",
            ),
            (
                with(
                    "kind = \"logistic_regression\"\ninputs = 13",
                    "kind = \"mlp\"\ninputs = 13\nhidden = [16385, 16385]",
                ),
                "268435456",
            ),
            (
                with(
                    "kind = \"logistic_regression\"\ninputs = 13",
                    &format!("kind = \"mlp\"\ninputs = 13\nhidden = [{}]", ["1"; 65].join(", ")),
                ),
                "65 layers",
            ),
            (
                with(
                    "kind = \"logistic_regression\"\ninputs = 13",
                    "kind = \"cnn\"\nchannels = 4611686018427387904\nheight = 4\nwidth = 4\nfilters = [1]\nkernel_size = 3",
                ),
                "model",
            ),
        ];
        for (result, needle) in cases {
            let e = result.expect_err(needle);
            assert!(e.contains(needle), "{needle}: {e}");
        }
        let secagg = |extra: &str| {
            let text = PLAN.replace("min_nodes = 1", "min_nodes = 2");
            Plan::parse(&format!("secure_aggregation = true\n{text}[secagg]\n{extra}\n")).map_err(|e| e.to_string())
        };
        assert!(secagg(&format!("step_timeout_secs = {max_i64}")).unwrap_err().contains("secagg.step_timeout_secs"));
        assert!(secagg("threshold = 10001").unwrap_err().contains("secagg.threshold"));
        let retried = PLAN.replace("min_nodes = 1", "min_nodes = 2\nretries = 1");
        let e = Plan::parse(&format!("secure_aggregation = true\n{retried}")).unwrap_err().to_string();
        assert!(e.contains("retries") && e.contains("masked input twice"), "{e}");
        // The bounds themselves are accepted.
        assert!(head("round_deadline_secs = 2592000\nrecruit_deadline_secs = 2592000").is_ok());
        assert!(with("rounds = 2", "rounds = 10000").is_ok());
        assert!(head("retries = 10").is_ok());
        assert!(with("steps = 3", "steps = 100000").is_ok());
        assert!(secagg("step_timeout_secs = 2592000").is_ok());
        let big =
            with("kind = \"logistic_regression\"\ninputs = 13", "kind = \"mlp\"\ninputs = 13\nhidden = [11200, 11200]");
        assert!(big.is_ok(), "{big:?}");
    }

    /// The review's plans: σ = 10⁻³ (a 10¹⁰-point PLD grid), σ = 10⁻³⁰⁰ (σ² underflows), ε = 10⁶
    /// (a search down to σ ≈ 0.07), and every other float that feeds an accountant or the
    /// secure-aggregation sizing, each refused with its field and its bound.
    #[test]
    fn privacy_and_secagg_numbers_outside_the_limits_are_refused_with_the_field_and_the_bound() {
        let client = PLAN
            .replace("kind = \"fedadam\"\nserver_learning_rate = 0.01", "kind = \"fedavg\"\nweighting = \"uniform\"");
        let dp = |mode: &str, body: &str| {
            Plan::parse(&format!("{client}[privacy]\nmode = \"{mode}\"\n{body}\n"))
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        let base = "clip_norm = 1.0\ndelta = 1e-5";
        let adaptive = |a: &str| format!("noise_multiplier = 1.0\n{base}\nadaptive_clipping = {{ {a} }}");
        let cases = [
            ("example", format!("noise_multiplier = 1e-3\n{base}"), "privacy.noise_multiplier", "0.1"),
            ("client", format!("noise_multiplier = 1e-3\n{base}"), "privacy.noise_multiplier", "0.1"),
            ("example", format!("noise_multiplier = 1e-300\n{base}"), "privacy.noise_multiplier", "0.1"),
            ("example", format!("noise_multiplier = 1001.0\n{base}"), "privacy.noise_multiplier", "1000.0"),
            ("example", format!("noise_multiplier = nan\n{base}"), "privacy.noise_multiplier", "0.1"),
            ("example", format!("noise_multiplier = inf\n{base}"), "privacy.noise_multiplier", "1000.0"),
            ("example", format!("target_epsilon = 1e6\n{base}"), "privacy.target_epsilon", "100.0"),
            ("client", format!("target_epsilon = 100.5\n{base}"), "privacy.target_epsilon", "100.0"),
            ("example", format!("target_epsilon = 0.0\n{base}"), "privacy.target_epsilon", "above 0"),
            ("example", "noise_multiplier = 1.0\nclip_norm = 1.0\ndelta = 1e-13".into(), "privacy.delta", "1e-12"),
            ("example", "noise_multiplier = 1.0\nclip_norm = 1.0\ndelta = 0.1".into(), "privacy.delta", "0.1"),
            ("example", "noise_multiplier = 1.0\nclip_norm = 1.0".into(), "privacy.delta", "missing"),
            (
                "example",
                "noise_multiplier = 1.0\nclip_norm = 1e7\ndelta = 1e-5".into(),
                "privacy.clip_norm",
                "1000000.0",
            ),
            ("example", "noise_multiplier = 1.0\nclip_norm = 1e-7\ndelta = 1e-5".into(), "privacy.clip_norm", "1e-6"),
            ("example", "noise_multiplier = 1.0\nclip_norm = inf\ndelta = 1e-5".into(), "privacy.clip_norm", "1e-6"),
            ("client", adaptive("count_noise_multiplier = 1e-3"), "count_noise_multiplier", "0.1"),
            ("client", adaptive("count_noise_multiplier = 1e9"), "count_noise_multiplier", "1000.0"),
            (
                "client",
                adaptive("count_noise_multiplier = 10.0, learning_rate = 11.0"),
                "adaptive_clipping.learning_rate",
                "10.0",
            ),
            ("client", adaptive("count_noise_multiplier = 10.0, target_quantile = 1.0"), "target_quantile", "(0, 1)"),
        ];
        for (mode, body, field, bound) in &cases {
            let e = dp(mode, body).expect_err(body);
            assert!(e.contains(field) && e.contains(bound), "{body}: {e}");
        }
        // The bounds themselves are admitted.
        for (mode, body) in [
            ("example", format!("noise_multiplier = 0.1\n{base}")),
            ("client", format!("noise_multiplier = 1000.0\n{base}")),
            ("example", format!("target_epsilon = 100.0\n{base}")),
            ("example", "noise_multiplier = 1.0\nclip_norm = 1e6\ndelta = 1e-12".into()),
            ("example", "noise_multiplier = 1.0\nclip_norm = 1e-6\ndelta = 0.0999".into()),
            ("client", adaptive("count_noise_multiplier = 0.6, learning_rate = 10.0")),
        ] {
            assert!(dp(mode, &body).is_ok(), "{body}: {:?}", dp(mode, &body));
        }
        let secagg = |extra: &str| {
            let text = PLAN.replace("min_nodes = 1", "min_nodes = 2");
            Plan::parse(&format!("secure_aggregation = true\n{text}[secagg]\n{extra}\n")).map_err(|e| e.to_string())
        };
        for (extra, field, bound) in [
            ("clip_norm = 1e7", "secagg.clip_norm", "1000000.0"),
            ("clip_norm = nan", "secagg.clip_norm", "1e-6"),
            ("max_samples = 1000000001", "secagg.max_samples", "1000000000"),
            ("max_samples = 18446744073709551615", "secagg.max_samples", "1000000000"),
            ("max_samples = 0", "secagg.max_samples", "1000000000"),
        ] {
            let e = secagg(extra).expect_err(extra);
            assert!(e.contains(field) && e.contains(bound), "{extra}: {e}");
        }
        assert!(secagg("clip_norm = 1e6\nmax_samples = 1000000000").is_ok());
    }

    /// Every plan shipped in `examples/` is within the limits.
    #[test]
    fn every_bundled_example_plan_is_within_the_limits() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let sub = entry.unwrap().path();
            let Ok(files) = std::fs::read_dir(&sub) else { continue };
            for file in files {
                let path = file.unwrap().path();
                let is_schema = path.file_name().is_some_and(|n| n.to_string_lossy().starts_with("schema"));
                if path.extension().is_some_and(|e| e == "toml") && !is_schema {
                    let text = std::fs::read_to_string(&path).unwrap();
                    let plan = Plan::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    // Every example names its schema file, and fits it.
                    let file = plan
                        .data
                        .schema_file
                        .clone()
                        .unwrap_or_else(|| panic!("{} has no schema_file", path.display()));
                    let schema = crate::dataset::Schema::load(&sub.join(file)).unwrap();
                    plan.check_schema(&schema).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    seen += 1;
                }
            }
        }
        assert!(seen >= 10, "found {seen} example plans in {}", dir.display());
    }

    #[test]
    fn the_secagg_threshold_is_a_strict_majority_whatever_the_plan_asks() {
        let secagg = |threshold: &str, min_nodes: usize| {
            let text = PLAN.replace("min_nodes = 1", &format!("min_nodes = {min_nodes}"));
            Plan::parse(&format!("secure_aggregation = true\n{text}[secagg]\n{threshold}\n")).unwrap()
        };
        // A plan asking for t = 2 gets 3 of 5 (2·2 ≤ 5 would let two survivor lists each gather
        // t signatures); a floor above the majority is kept; so is min_nodes.
        assert_eq!(secagg("threshold = 2", 2).secagg_threshold(5), 3);
        assert_eq!(secagg("threshold = 2", 2).secagg_threshold(4), 3);
        assert_eq!(secagg("threshold = 4", 2).secagg_threshold(5), 4);
        assert_eq!(secagg("", 4).secagg_threshold(5), 4);
        for plan in [secagg("threshold = 2", 2), secagg("", 2), secagg("threshold = 3", 3)] {
            for n in 2..=200 {
                let t = plan.secagg_threshold(n);
                assert!(2 * t > n && t >= 2, "t = {t} of n = {n}");
            }
        }
        let e = Plan::parse(&format!(
            "secure_aggregation = true\n{}[secagg]\nthreshold = 1\n",
            PLAN.replace("min_nodes = 1", "min_nodes = 2")
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("secagg.threshold"), "{e}");
    }
}
