//! `sanctum-node evaluate`: a hospital's offline evaluation of a released model (the exported
//! `.safetensors` of a run) on its own test split, with the task's metrics. Nothing connects and
//! nothing leaves: the hospital reads the numbers itself.
//!
//! The features are standardised as the plan implies ([`crate::data::admit_plan`]), as the nodes
//! did in training. A plan that standardises with each node's own train split (FLamby's
//! per-center normalisation) trained a model on *its* nodes' statistics; a model trained on
//! another table (pooled training on the concatenation of every hospital's table) is evaluated
//! with that table's train-split statistics (`--standardize-from`), or its inputs would be on
//! another scale than the one it learnt.
//!
//! The plan's `data.schema_file` is read relative to the plan file, as the lead's tools do
//! (coordinator/src/plan_files.rs; the node does not depend on the coordinator crate): it fills
//! a missing `data.schema_sha256`, and the `--schema` this hospital holds must be that file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sanctum_protocol::dataset::{DeclaredStatistics, Schema};
use sanctum_protocol::model::{ModelSpec, Weights};
use sanctum_protocol::plan::Plan;

use crate::data::{self, Standardize, TableSource};
use crate::table::Format;
use crate::train;

/// `sanctum-node evaluate …`
#[derive(Debug, Clone, clap::Args)]
pub struct EvaluateArgs {
    /// The schema file (TOML) this hospital holds for the plan's dataset.
    #[arg(long)]
    pub schema: PathBuf,
    /// This hospital's table (CSV or Parquet); its test split is evaluated.
    #[arg(long)]
    pub data: PathBuf,
    /// `csv` or `parquet` (default: from the file's extension).
    #[arg(long)]
    pub format: Option<Format>,
    /// The plan the model was trained under (its model and standardisation).
    #[arg(long)]
    pub plan: PathBuf,
    /// The released model: a run's exported `.safetensors`.
    #[arg(long)]
    pub model: PathBuf,
    /// A column the table names otherwise: `SCHEMA_COLUMN=TABLE_COLUMN` (repeatable), as
    /// `[datasets.columns]` in node.toml.
    #[arg(long = "map", value_name = "SCHEMA_COLUMN=TABLE_COLUMN")]
    pub map: Vec<String>,
    /// Standardise with this table's train-split mean and standard deviation instead of this
    /// hospital's own: the table the model was trained on (pooled training). Only for plans that
    /// standardise with each node's own statistics.
    #[arg(long, value_name = "TABLE")]
    pub standardize_from: Option<PathBuf>,
    /// `cpu` (default), `cuda` or `auto`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Print the metrics as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Why an evaluation could not be made. Each message names the file and the next step.
#[derive(Debug, thiserror::Error)]
pub enum EvaluateError {
    #[error("cannot read plan {path}: {source}; check the path")]
    PlanRead { path: PathBuf, source: std::io::Error },
    #[error("plan {path}: {reason}")]
    Plan { path: PathBuf, reason: String },
    #[error("schema {path}: {reason}")]
    Schema { path: PathBuf, reason: String },
    #[error(
        "schema {schema} does not fit plan {plan}: {reason}; evaluate with the schema file the plan was trained on"
    )]
    SchemaMismatch { schema: PathBuf, plan: PathBuf, reason: String },
    #[error("--map {0:?}: write SCHEMA_COLUMN=TABLE_COLUMN")]
    Map(String),
    #[error("cannot read model {path}: {source}; pass the run's exported .safetensors (simulate --workdir prints it)")]
    ModelRead { path: PathBuf, source: std::io::Error },
    #[error(
        "model {path} is not the plan's model: {reason}; evaluate it with the plan it was trained under (its [model] is {model})"
    )]
    Model { path: PathBuf, reason: String, model: String },
    #[error("{0}")]
    Standardize(String),
    #[error("{0}")]
    Data(String),
    #[error("{0}")]
    Device(#[from] crate::train::DeviceError),
    #[error("evaluation failed: {0}")]
    Train(String),
}

/// What an evaluation found: the task's metrics on the test split, in the task's order.
#[derive(Debug, Clone)]
pub struct Report {
    pub schema: String,
    pub task: String,
    pub data: PathBuf,
    pub model: PathBuf,
    pub model_sha256: String,
    /// How the features were standardised.
    pub standardized_with: String,
    pub test_samples: u64,
    pub metrics: Vec<(&'static str, f64)>,
}

impl Report {
    /// The report as JSON (`metrics` by name).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "schema": self.schema,
            "task": self.task,
            "data": self.data.display().to_string(),
            "model": self.model.display().to_string(),
            "model_sha256": self.model_sha256,
            "standardized_with": self.standardized_with,
            "test_samples": self.test_samples,
            "metric": self.metrics.first().map(|(n, _)| *n),
            "metrics": self.metrics.iter().map(|(n, v)| ((*n).to_string(), serde_json::json!(v))).collect::<serde_json::Map<_, _>>(),
        })
    }

    /// The report as text.
    pub fn to_text(&self) -> String {
        let mut out = format!(
            "model {} (SHA-256 {})\ndata {} (schema {}, task {}), {} test rows, standardised with {}\n",
            self.model.display(),
            self.model_sha256,
            self.data.display(),
            self.schema,
            self.task,
            self.test_samples,
            self.standardized_with
        );
        for (name, value) in &self.metrics {
            out.push_str(&format!("{name:<18} {value:.4}\n"));
        }
        out
    }
}

/// Runs `evaluate`; the text (or JSON) to print.
pub fn run(args: &EvaluateArgs) -> Result<String, EvaluateError> {
    let report = evaluate(args)?;
    Ok(if args.json {
        serde_json::to_string_pretty(&report.to_json()).map_err(|e| EvaluateError::Train(e.to_string()))? + "\n"
    } else {
        report.to_text()
    })
}

/// The plan at `path`, its schema file (if it names one) read relative to it and its hash filled
/// in, checked against `schema`.
pub fn plan_for(path: &Path, schema_path: &Path, schema: &Schema) -> Result<Plan, EvaluateError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| EvaluateError::PlanRead { path: path.to_path_buf(), source })?;
    let mut plan =
        Plan::parse(&text).map_err(|e| EvaluateError::Plan { path: path.to_path_buf(), reason: e.to_string() })?;
    let base = path.parent().unwrap_or(Path::new("."));
    if let Some(file) = plan.data.schema_file.clone() {
        let named = if file.is_absolute() { file } else { base.join(file) };
        let own = Schema::load(&named).map_err(|e| EvaluateError::Plan {
            path: path.to_path_buf(),
            reason: format!("data.schema_file {}: {e} (the path is relative to the plan file)", named.display()),
        })?;
        let hash = own.sha256().to_hex();
        match &plan.data.schema_sha256 {
            None => plan.data.schema_sha256 = Some(hash),
            Some(h) if *h != hash => {
                return Err(EvaluateError::Plan {
                    path: path.to_path_buf(),
                    reason: format!(
                        "data.schema_sha256 is {h} but data.schema_file {} has SHA-256 {hash}; fix the plan",
                        named.display()
                    ),
                });
            }
            Some(_) => {}
        }
    }
    plan.check_schema(schema).map_err(|e| EvaluateError::SchemaMismatch {
        schema: schema_path.to_path_buf(),
        plan: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(plan)
}

fn columns(map: &[String]) -> Result<BTreeMap<String, String>, EvaluateError> {
    let mut columns = BTreeMap::new();
    for m in map {
        let (from, to) = m.split_once('=').ok_or_else(|| EvaluateError::Map(m.clone()))?;
        columns.insert(from.trim().to_string(), to.trim().to_string());
    }
    Ok(columns)
}

/// The statistics that standardise this hospital's test split: the plan's own, or with
/// `--standardize-from` the other table's train split, computed exactly as
/// [`Standardize::PerNode`] does on that table (mean, std + 1e-9; one-hot inputs untouched).
fn standardization(args: &EvaluateArgs, schema: &Schema, plan: &Plan) -> Result<Standardize, EvaluateError> {
    let own = data::admit_plan(schema, plan).map_err(|e| EvaluateError::Standardize(e.to_string()))?;
    if let Standardize::EstimateDp { .. } = own {
        // Each node released its own noised statistics, which this table's evaluation cannot
        // reproduce; evaluating on raw features would give meaningless figures.
        return Err(EvaluateError::Standardize(format!(
            "schema '{}' has each node estimate its standardisation statistics under DP, so an offline evaluation cannot reproduce the scale the model was trained on; evaluate at the nodes (the plan's final evaluation) instead",
            schema.name()
        )));
    }
    let Some(other) = &args.standardize_from else {
        return Ok(own);
    };
    if own != Standardize::PerNode {
        return Err(EvaluateError::Standardize(format!(
            "--standardize-from {}: plan {} standardises with {own}, the same at every table, so the model was trained on those; drop --standardize-from",
            other.display(),
            args.plan.display()
        )));
    }
    let source = TableSource { path: other.clone(), format: None, columns: columns(&args.map)? };
    let table = data::load(&source, schema, &Standardize::Off).map_err(|e| EvaluateError::Data(e.steward_reason()))?;
    let (mean, std): (Vec<f64>, Vec<f64>) = schema
        .features()
        .iter()
        .zip(table.train_mean.iter().zip(&table.train_std))
        .map(|(f, (m, s))| if f.standardize { (*m, s + 1e-9) } else { (0.0, 1.0) })
        .unzip();
    Ok(Standardize::Declared(DeclaredStatistics {
        mean,
        std,
        provenance: format!("the train split of {} ({} rows)", other.display(), table.train_len()),
    }))
}

/// Loads the plan, the schema, the model and the table, and evaluates the model on the test split.
pub fn evaluate(args: &EvaluateArgs) -> Result<Report, EvaluateError> {
    let schema = Schema::load(&args.schema)
        .map_err(|e| EvaluateError::Schema { path: args.schema.clone(), reason: e.to_string() })?;
    let plan = plan_for(&args.plan, &args.schema, &schema)?;
    let bytes =
        std::fs::read(&args.model).map_err(|source| EvaluateError::ModelRead { path: args.model.clone(), source })?;
    let model_err =
        |reason: String| EvaluateError::Model { path: args.model.clone(), reason, model: describe_model(&plan.model) };
    let weights = Weights::from_safetensors(&bytes, &plan.model.layout()).map_err(|e| model_err(e.to_string()))?;
    let script = match &plan.model {
        ModelSpec::Torchscript(spec) => {
            let file = spec.file.clone().ok_or_else(|| EvaluateError::Plan {
                path: args.plan.clone(),
                reason:
                    "the model is TorchScript but the plan gives no model.file (the .pt file, relative to the plan)"
                        .into(),
            })?;
            let base = args.plan.parent().unwrap_or(Path::new("."));
            Some(if file.is_absolute() { file } else { base.join(file) })
        }
        _ => None,
    };
    let standardize = standardization(args, &schema, &plan)?;
    let source = TableSource { path: args.data.clone(), format: args.format, columns: columns(&args.map)? };
    let local = data::load(&source, &schema, &standardize).map_err(|e| EvaluateError::Data(e.steward_reason()))?;
    let device = train::parse_device(&args.device).map_err(EvaluateError::Device)?;
    train::check_device(device).map_err(EvaluateError::Device)?;
    let eval = train::evaluate(&plan.model, &weights, &local, device, script.as_deref())
        .map_err(|e| EvaluateError::Train(e.to_string()))?;
    Ok(Report {
        schema: schema.name().to_string(),
        task: schema.task().to_string(),
        data: args.data.clone(),
        model: args.model.clone(),
        model_sha256: sanctum_protocol::hash::ContentHash::of(&bytes).to_hex(),
        standardized_with: standardize.to_string(),
        test_samples: eval.samples,
        metrics: eval.metrics,
    })
}

/// The plan's model as its tensors, for an error message: `fc.weight [5, 13], fc.bias [5]`.
fn describe_model(model: &ModelSpec) -> String {
    model.layout().iter().map(|t| format!("{} {:?}", t.name, t.shape)).collect::<Vec<_>>().join(", ")
}
