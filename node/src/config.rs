//! `node.toml`: the one file a hospital's IT team writes. Relative paths are resolved against the
//! file's directory; every error names the file and the field.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sanctum_protocol::dataset::Schema;
use sanctum_protocol::tls::TlsFiles;
use serde::Deserialize;

use crate::data::TableSource;
use crate::table::Format;

/// The node's configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// `host:port` of the coordinator; the node only ever dials out.
    pub coordinator: String,
    pub tls: TlsFiles,
    /// `auto` (GPU when there is one), `cpu`, `cuda` or `cuda:N`.
    #[serde(default = "default_device")]
    pub device: String,
    /// Threads libtorch may use on the CPU (default: libtorch's choice).
    #[serde(default)]
    pub threads: Option<usize>,
    /// Where the egress log lives.
    pub state_dir: PathBuf,
    /// The hospital's datasets, one per schema it can train on.
    #[serde(default)]
    pub datasets: Vec<DatasetConfig>,
    #[serde(default)]
    pub policy: Policy,
}

fn default_device() -> String {
    "auto".into()
}

/// A local data file and the schema file it follows.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    /// The schema file the consortium distributes (TOML), which this table follows. A plan names
    /// the schema by the SHA-256 of this file.
    pub schema: PathBuf,
    /// The table: CSV or Parquet.
    pub path: PathBuf,
    /// `csv` or `parquet`; by default the file's extension says.
    #[serde(default)]
    pub format: Option<Format>,
    /// Schema column name = this table's column name, for the columns the hospital names
    /// otherwise (`age = "AGE_YEARS"`).
    #[serde(default)]
    pub columns: BTreeMap<String, String>,
    /// The schema file, read by [`NodeConfig::load`].
    #[serde(skip)]
    loaded: Option<Arc<Schema>>,
}

impl DatasetConfig {
    /// The schema file's contents (read when the config was loaded).
    pub fn schema(&self) -> Option<&Schema> {
        self.loaded.as_deref()
    }

    /// The schema's name: what the ledger and the logs call this dataset.
    pub fn name(&self) -> String {
        self.loaded.as_ref().map_or_else(|| self.schema.display().to_string(), |s| s.name().to_string())
    }

    /// Where the table is and how its columns are named.
    pub fn source(&self) -> TableSource {
        TableSource { path: self.path.clone(), format: self.format, columns: self.columns.clone() }
    }

    /// A dataset with its schema already read (tests, tools).
    pub fn with_schema(schema: Schema, path: PathBuf) -> Self {
        DatasetConfig {
            schema: PathBuf::new(),
            path,
            format: None,
            columns: BTreeMap::new(),
            loaded: Some(Arc::new(schema)),
        }
    }

    /// Reads the schema file named by `schema` (already resolved).
    fn read_schema(&mut self, index: usize) -> Result<(), ConfigProblem> {
        match Schema::load(&self.schema) {
            Ok(s) => {
                self.loaded = Some(Arc::new(s));
                Ok(())
            }
            Err(sanctum_protocol::dataset::SchemaError::Read { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                Err(ConfigProblem::NoSchemaFile { index, path: self.schema.clone() })
            }
            Err(reason) => Err(ConfigProblem::Schema { index, reason }),
        }
    }
}

/// The hospital's rules. Anything not allowed here is refused.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Model kinds this hospital will train (`logistic_regression`, `mlp`); empty allows none.
    #[serde(default)]
    pub allowed_models: Vec<String>,
    /// Whether the node may tell the coordinator how many training examples it has (FedAvg
    /// weights); plans that need it are refused when false.
    #[serde(default = "yes")]
    pub share_sample_counts: bool,
    /// Most rounds a single plan may ask for.
    #[serde(default = "default_max_rounds")]
    pub max_rounds: u32,
    /// Largest model (number of parameters) this node will download and train: memory, disk
    /// and time are the hospital's. Plans are bounded at 2²⁸ anyway (`plan::limits`).
    #[serde(default = "default_max_model_parameters")]
    pub max_model_parameters: u64,
    /// Most local optimizer steps a plan may ask for per round (`local.steps`).
    #[serde(default = "default_max_local_steps")]
    pub max_local_steps: u32,
    /// When set, only plans with example-level DP whose ε on this hospital's data (for the whole
    /// plan, at the plan's δ) is at most this are accepted; plans without DP are refused.
    #[serde(default)]
    pub max_epsilon: Option<f64>,
    /// When set, only plans with secure aggregation are accepted, and only if no sum of fewer than
    /// this many hospitals' updates can be released (the round's threshold t).
    #[serde(default)]
    pub min_cohort: Option<usize>,
    /// When set, δ summed over every plan a dataset took part in may not exceed this; plans
    /// without DP are refused.
    #[serde(default)]
    pub max_delta: Option<f64>,
    /// What the node may tell the coordinator about a model's performance on its test split
    /// (the metric measured before each round, and the final evaluation). Test patients are
    /// patients too: under DP the default is to send none.
    #[serde(default)]
    pub test_metrics: TestMetrics,
    /// With `test_metrics = "noised"`: the standard deviation of the Gaussian noise added to the
    /// count of correct predictions and to the count of test examples (see `metrics`).
    #[serde(default)]
    pub test_metric_noise: Option<f64>,
    /// With `share_sample_counts = false`: a number of training rows the hospital is willing to
    /// publish as a lower bound on its own. ε is then accounted (and σ chosen for a target) at
    /// q = batch / this bound rather than at the real q, so no decision, charge or noise scale
    /// depends on the real size. Without it, q = 1: safe, but far noisier.
    #[serde(default)]
    pub public_min_train_rows: Option<u64>,
    /// The hospital's approved TorchScript models (`sanctum-node model approve` writes it);
    /// relative to node.toml. A missing file approves none.
    #[serde(default = "default_model_approvals")]
    pub model_approvals: PathBuf,
    /// Whether the node tells the coordinator its ε cap (`max_epsilon`) and what its data had
    /// spent on other plans when it accepts a plan, so the lead's status page can show ε against
    /// the cap. Off by default: it tells the consortium how much of the dataset's budget other
    /// plans (perhaps of other consortia) have used.
    #[serde(default)]
    pub share_budget: bool,
}

fn default_model_approvals() -> PathBuf {
    PathBuf::from("approved_models.toml")
}

/// Whether test-split metrics leave the hospital.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TestMetrics {
    /// `none` under a plan with DP (the metric is not covered by the plan's ε), `exact` without.
    #[default]
    Auto,
    /// Never: evaluation requests are answered without a value.
    None,
    /// The exact metric (a release that no ε accounts for: choose it only for data the hospital
    /// would publish aggregate accuracy on anyway).
    Exact,
    /// Noised by the Gaussian mechanism (`test_metric_noise`) and charged to the ledger before
    /// it leaves, at the plan's δ; plans without a δ get no metric.
    Noised,
}

impl TestMetrics {
    /// Whether a metric may leave for a plan with (`dp`) or without differential privacy, when
    /// the policy shares dataset sizes (`share`) or not: an exact accuracy is a fraction whose
    /// denominator is the test split's size, so `auto` sends none when sizes are withheld.
    pub fn allows(self, dp: bool, share: bool) -> bool {
        match self {
            TestMetrics::Auto => !dp && share,
            TestMetrics::None => false,
            TestMetrics::Exact | TestMetrics::Noised => true,
        }
    }
}

impl Policy {
    /// The privacy caps in words, when any is set.
    pub fn cap_text(&self) -> Option<String> {
        match (self.max_epsilon, self.max_delta) {
            (None, None) => None,
            (Some(e), None) => Some(format!("ε ≤ {e}")),
            (None, Some(d)) => Some(format!("δ ≤ {d:e}")),
            (Some(e), Some(d)) => Some(format!("ε ≤ {e} and δ ≤ {d:e}")),
        }
    }
}

fn yes() -> bool {
    true
}
fn default_max_rounds() -> u32 {
    1000
}
/// 2²⁷ parameters, 512 MiB as f32: room for the largest model the tests train (125.6 M), half
/// of what a plan may carry.
fn default_max_model_parameters() -> u64 {
    1 << 27
}
/// A hundred times the examples' 100 steps per round.
fn default_max_local_steps() -> u32 {
    10_000
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            allowed_models: vec![],
            share_sample_counts: true,
            max_rounds: default_max_rounds(),
            max_model_parameters: default_max_model_parameters(),
            max_local_steps: default_max_local_steps(),
            max_epsilon: None,
            min_cohort: None,
            max_delta: None,
            test_metrics: TestMetrics::Auto,
            test_metric_noise: None,
            public_min_train_rows: None,
            model_approvals: default_model_approvals(),
            share_budget: false,
        }
    }
}

/// A config that cannot be used: the file, and what is wrong in it.
#[derive(Debug, thiserror::Error)]
#[error("config {path}: {problem}")]
pub struct ConfigError {
    pub path: PathBuf,
    pub problem: ConfigProblem,
}

/// What is wrong in a node config, naming the field and what to write instead.
#[derive(Debug, thiserror::Error)]
pub enum ConfigProblem {
    #[error("cannot read: {0}")]
    Read(std::io::Error),
    /// The TOML parser's message (it names the line and the field).
    #[error("{0}")]
    Toml(toml::de::Error),
    #[error(
        "datasets[{index}].schema: there is no schema file at {}; a schema is a TOML file your consortium distributes (README, \"Bring your own data\"): put the file next to node.toml and give its path here",
        path.display()
    )]
    NoSchemaFile { index: usize, path: PathBuf },
    #[error("datasets[{index}].schema: {reason}")]
    Schema { index: usize, reason: sanctum_protocol::dataset::SchemaError },
    #[error(
        "datasets[{index}]: another dataset already follows a schema named '{name}'; each schema name may have one dataset (its privacy budget is kept by that name)"
    )]
    SharedSchemaName { index: usize, name: String },
    #[error("device: {0}")]
    Device(#[from] crate::train::DeviceError),
    #[error("threads must be at least 1")]
    NoThreads,
    #[error("policy.max_epsilon is {0}; it must be a positive number")]
    MaxEpsilon(f64),
    #[error("policy.max_delta is {0}; it must be in (0, 1)")]
    MaxDelta(f64),
    #[error(
        "policy.test_metrics = \"noised\" needs policy.test_metric_noise (the noise's standard deviation per count, e.g. 5.0)"
    )]
    NoisedWithoutNoise,
    #[error("policy.test_metric_noise is {0}; it must be a positive number")]
    MetricNoise(f64),
    #[error(
        "policy.test_metric_noise is set but policy.test_metrics is not \"noised\"; remove it or set test_metrics = \"noised\""
    )]
    NoiseWithoutNoised,
    #[error(
        "policy.test_metrics = \"exact\" with share_sample_counts = false: an exact accuracy is a fraction whose denominator is the test split's size; use \"noised\" or \"none\""
    )]
    ExactWithoutSampleCounts,
    #[error("policy.public_min_train_rows must be at least 1")]
    NoPublicRows,
    #[error(
        "policy.public_min_train_rows applies only with share_sample_counts = false; remove it or set share_sample_counts = false"
    )]
    PublicRowsWhileSharing,
    /// A cap of zero would refuse every plan: `field` is the policy's key.
    #[error("policy.{field} must be at least 1")]
    ZeroCap { field: &'static str },
    #[error("policy.min_cohort must be at least 2 (a sum of one hospital is its update)")]
    MinCohort,
}

impl NodeConfig {
    /// Reads, resolves relative paths and validates.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let err = |problem: ConfigProblem| ConfigError { path: path.to_path_buf(), problem };
        let text = std::fs::read_to_string(path).map_err(|e| err(ConfigProblem::Read(e)))?;
        let mut cfg: NodeConfig = toml::from_str(&text).map_err(|e| err(ConfigProblem::Toml(e)))?;
        let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let resolve = |p: &Path| {
            if p.is_absolute() { p.to_path_buf() } else { base.join(p) }
        };
        cfg.tls = TlsFiles { ca: resolve(&cfg.tls.ca), cert: resolve(&cfg.tls.cert), key: resolve(&cfg.tls.key) };
        cfg.state_dir = resolve(&cfg.state_dir);
        cfg.policy.model_approvals = resolve(&cfg.policy.model_approvals);
        for (i, d) in cfg.datasets.iter_mut().enumerate() {
            d.path = resolve(&d.path);
            d.schema = resolve(&d.schema);
            d.read_schema(i).map_err(err)?;
        }
        cfg.validate().map_err(err)?;
        Ok(cfg)
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigProblem> {
        // The ledger keys budgets by the schema's name: two tables under one name would share
        // (and confuse) one budget.
        let mut names = std::collections::BTreeSet::new();
        for (i, d) in self.datasets.iter().enumerate() {
            if d.schema().is_some() && !names.insert(d.name()) {
                return Err(ConfigProblem::SharedSchemaName { index: i, name: d.name() });
            }
        }
        crate::train::parse_device(&self.device)?;
        if self.threads == Some(0) {
            return Err(ConfigProblem::NoThreads);
        }
        let p = &self.policy;
        if let Some(e) = p.max_epsilon
            && !(e.is_finite() && e > 0.0)
        {
            return Err(ConfigProblem::MaxEpsilon(e));
        }
        if let Some(d) = p.max_delta
            && !(d > 0.0 && d < 1.0)
        {
            return Err(ConfigProblem::MaxDelta(d));
        }
        match (p.test_metrics, p.test_metric_noise) {
            (TestMetrics::Noised, None) => return Err(ConfigProblem::NoisedWithoutNoise),
            (TestMetrics::Noised, Some(s)) if !(s.is_finite() && s > 0.0) => {
                return Err(ConfigProblem::MetricNoise(s));
            }
            (TestMetrics::Noised, Some(_)) | (_, None) => {}
            (_, Some(_)) => return Err(ConfigProblem::NoiseWithoutNoised),
        }
        if p.test_metrics == TestMetrics::Exact && !p.share_sample_counts {
            return Err(ConfigProblem::ExactWithoutSampleCounts);
        }
        if p.public_min_train_rows == Some(0) {
            return Err(ConfigProblem::NoPublicRows);
        }
        if p.public_min_train_rows.is_some() && p.share_sample_counts {
            return Err(ConfigProblem::PublicRowsWhileSharing);
        }
        if p.max_model_parameters == 0 {
            return Err(ConfigProblem::ZeroCap { field: "max_model_parameters" });
        }
        if p.max_local_steps == 0 {
            return Err(ConfigProblem::ZeroCap { field: "max_local_steps" });
        }
        if p.min_cohort.is_some_and(|m| m < 2) {
            return Err(ConfigProblem::MinCohort);
        }
        Ok(())
    }

    /// The dataset whose schema has this name.
    pub fn dataset(&self, schema: &str) -> Option<&DatasetConfig> {
        self.datasets.iter().find(|d| d.schema().is_some_and(|s| s.name() == schema))
    }

    /// The dataset whose schema file has this SHA-256 (hex).
    pub fn dataset_with_schema(&self, sha256: &str) -> Option<&DatasetConfig> {
        self.datasets.iter().find(|d| d.schema().is_some_and(|s| s.sha256().to_hex() == sha256))
    }
}
