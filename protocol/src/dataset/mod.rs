//! Dataset schemas as files: what a consortium declares once about a table every hospital holds
//! (columns, types, ranges, missing values, the target, the task, the split, preprocessing), and
//! what a node checks its own data against before it accepts a plan.
//!
//! # Layout
//! - this file: [`Schema`], parsed and validated from TOML ([`Schema::parse`], [`Schema::load`]),
//!   named by the SHA-256 of its exact bytes; what it says about features, target, split,
//!   privacy unit and standardisation; [`SchemaError`].
//! - `raw.rs`: the file as TOML spells it (unknown keys refused).
//! - `validate.rs`: every rule from raw to [`Schema`], with the field and the next step named.
//! - `cell.rs`: [`Column`] and the pure per-cell reading a node's loader uses ([`CellValue`],
//!   [`CellProblem`], [`MissingPolicy`]).
//! - `split.rs`: the hash split rule [`split_of`].
//! - `task.rs`: [`Task`].
//!
//! Nothing here does I/O beyond [`Schema::load`] reading one file.

mod cell;
mod raw;
mod split;
pub mod task;
mod validate;

use std::io::Read;
use std::path::{Path, PathBuf};

pub use cell::{Cell, CellProblem, CellValue, Column, ColumnKind, MissingPolicy, Role};
pub use split::{Split, split_draw, split_of};
pub use task::Task;

use crate::hash::ContentHash;

/// Bounds against hostile or broken schema files: a node must refuse them, not run out of memory.
pub mod limits {
    /// Columns in one schema.
    pub const MAX_COLUMNS: usize = 100_000;
    /// Levels of one categorical column (also the most classes of a multi-class label).
    pub const MAX_LEVELS: usize = 10_000;
    /// Model inputs after one-hot expansion.
    pub const MAX_FEATURES: usize = 1_000_000;
    /// Characters of a name, level, unit, version, missing-value token or split value.
    pub const MAX_STRING: usize = 256;
    /// Characters of the free-text `description` and `provenance`.
    pub const MAX_PROSE: usize = 4096;
    /// Missing-value tokens.
    pub const MAX_MISSING_TOKENS: usize = 100;
    /// Bytes of a schema file (100,000 columns of a few lines each fit well within).
    pub const MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;
}

/// A validated dataset schema. Every accessor's answer already obeys the rules in `validate.rs`
/// (see [`Schema::parse`]); a node can index with the column numbers it returns.
#[derive(Clone, Debug, PartialEq)]
pub struct Schema {
    name: String,
    version: Option<String>,
    description: Option<String>,
    task: Task,
    missing_tokens: Vec<String>,
    columns: Vec<Column>,
    features: Vec<Feature>,
    target: Target,
    split: SplitRule,
    privacy_unit: PrivacyUnit,
    standardization: Standardization,
    /// SHA-256 of the exact bytes parsed: how plans name this schema.
    sha256: ContentHash,
}

/// One model input after one-hot expansion, in the order the model sees them.
#[derive(Clone, Debug, PartialEq)]
pub struct Feature {
    /// `age` for a column that is one input, `cp=2` for the input of level `2` of column `cp`.
    pub name: String,
    /// The source column's index in [`Schema::columns`].
    pub column: usize,
    /// How the input is made from the column's cell.
    pub input: FeatureInput,
    /// Whether standardisation applies to this input (never to a one-hot input).
    pub standardize: bool,
}

/// How a feature's value is made from its column's [`CellValue`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FeatureInput {
    /// The value itself: a number, an integer, a boolean as 0/1.
    Value,
    /// 1 if the cell is this level index, else 0.
    OneHot { level: usize },
}

impl Feature {
    /// The input's value for a resolved cell of its column (never [`CellValue::Missing`] after
    /// [`Column::resolve`]); `None` for a cell the column's type cannot hold.
    pub fn encode(&self, value: CellValue) -> Option<f64> {
        match (self.input, value) {
            (FeatureInput::OneHot { level }, CellValue::Level(i)) => Some(if i == level { 1.0 } else { 0.0 }),
            (FeatureInput::OneHot { .. }, _) => None,
            (FeatureInput::Value, v) => v.as_f64(),
        }
    }
}

/// What the model predicts from: indices into [`Schema::columns`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Binary, multi-class or regression: one label column.
    Label { column: usize },
    /// Survival: the time column and the event column.
    Survival { time: usize, event: usize },
}

/// How rows are assigned to train and test.
#[derive(Clone, Debug, PartialEq)]
pub enum SplitRule {
    /// A column whose cell says train or test.
    Column(SplitColumn),
    /// [`split_of`] with this seed and fraction; the key is the id column's text when
    /// [`PrivacyUnit::id_column`] is set, else the 1-based data row number as decimal text.
    Hash { seed: u64, test_fraction: f64 },
}

/// The split column and its two spellings (`train`/`test` unless the schema says otherwise).
#[derive(Clone, Debug, PartialEq)]
pub struct SplitColumn {
    /// The column's index in [`Schema::columns`].
    pub column: usize,
    /// The cell text meaning train.
    pub train: String,
    /// The cell text meaning test.
    pub test: String,
    /// The column's missing policy is drop_row (else refuse; impute is never allowed).
    drop_missing: bool,
    /// The schema's missing-value tokens.
    missing_tokens: std::sync::Arc<[String]>,
}

impl SplitColumn {
    /// The split of a CSV split cell (spaces around it ignored): `Ok(None)` when the cell is
    /// missing (absent, empty or a missing-value token) and the column's policy drops the row.
    pub fn read(&self, raw: Option<&str>) -> Result<Option<Split>, CellProblem> {
        match raw.map(str::trim) {
            Some(t) if !t.is_empty() && !self.missing_tokens.iter().any(|m| m == t) => self.classify(t).map(Some),
            _ => self.missing(),
        }
    }

    /// [`SplitColumn::read`] for a Parquet string cell: only null is missing.
    pub fn read_str(&self, raw: Option<&str>) -> Result<Option<Split>, CellProblem> {
        match raw {
            Some(t) => self.classify(t.trim()).map(Some),
            None => self.missing(),
        }
    }

    fn missing(&self) -> Result<Option<Split>, CellProblem> {
        if self.drop_missing { Ok(None) } else { Err(CellProblem::Missing) }
    }

    fn classify(&self, t: &str) -> Result<Split, CellProblem> {
        if t == self.train {
            Ok(Split::Train)
        } else if t == self.test {
            Ok(Split::Test)
        } else {
            Err(CellProblem::UnknownSplit {
                value: t.chars().take(100).collect(),
                train: self.train.clone(),
                test: self.test.clone(),
            })
        }
    }
}

/// Whom a DP guarantee on this schema's data protects: ε bounds what the released model reveals
/// about one unit. Column indices point into [`Schema::columns`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrivacyUnit {
    /// One row. Only honest when a row is all that one person contributed.
    Row,
    /// One patient, however their rows are laid out.
    Patient(PatientRows),
}

/// How a patient's data is laid out in rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatientRows {
    /// One row per patient, as the schema's preparation guarantees; with an id column the node
    /// checks the guarantee on load.
    OnePerPatient {
        /// The id column's index, checked for duplicates when present.
        id_column: Option<usize>,
    },
    /// A patient may have several rows, linked by this column. Row-level DP-SGD does not protect
    /// such a patient, so a node refuses example-level DP plans on such a schema.
    Several {
        /// The id column's index.
        id_column: usize,
    },
}

impl PrivacyUnit {
    /// The patient-id column's index, if any.
    pub fn id_column(self) -> Option<usize> {
        match self {
            PrivacyUnit::Row | PrivacyUnit::Patient(PatientRows::OnePerPatient { id_column: None }) => None,
            PrivacyUnit::Patient(PatientRows::OnePerPatient { id_column: Some(c) })
            | PrivacyUnit::Patient(PatientRows::Several { id_column: c }) => Some(c),
        }
    }
}

/// Which statistics standardise the features (those with [`Feature::standardize`]).
#[derive(Clone, Debug, PartialEq)]
pub enum Standardization {
    /// Features enter the model as they are.
    None,
    /// Each node's own train-split mean and standard deviation: never under DP (the model's scale
    /// would carry them out uncharged).
    PerNodeTrain,
    /// Public statistics published with the schema; under DP every node uses exactly these.
    Declared(DeclaredStatistics),
    /// Each node estimates mean and standard deviation of its train split under DP, spending
    /// `epsilon` (charged to its ledger), from the declared `[min, max]` of every standardised
    /// column, which bound each row's contribution.
    Dp { epsilon: f64 },
}

/// A public mean and standard deviation per expanded feature, in [`Schema::features`] order.
/// Inputs that are not standardised (one-hot, `standardize = false`) carry mean 0 and std 1, so
/// `(x − mean) / std` is the identity on them and a loader may apply it to every input.
#[derive(Clone, Debug, PartialEq)]
pub struct DeclaredStatistics {
    /// One per feature, finite.
    pub mean: Vec<f64>,
    /// One per feature, finite and > 0.
    pub std: Vec<f64>,
    /// Where the numbers came from, for `check` and auditors.
    pub provenance: String,
}

/// Why a schema file is refused. Each message names the file or the field and the next step.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("cannot read schema file {path}: {source}; check the path")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("schema file {path} is larger than {limit} bytes; a schema is a short text file, check the path")]
    TooLarge { path: PathBuf, limit: u64 },
    #[error("schema file {path} is not UTF-8 text; save it as UTF-8")]
    NotUtf8 { path: PathBuf },
    /// TOML syntax, a missing required key, an unknown key or a value of the wrong TOML type;
    /// the TOML reader's message names the key and the line.
    #[error("schema is not valid: {0}")]
    Toml(String),
    /// A rule of the schema format; `field` is the path of the key (`columns[3] 'cp'.levels`).
    #[error("schema field {field}: {reason}")]
    Invalid { field: String, reason: String },
}

impl Schema {
    /// Parses and validates a schema from its text; its hash is that of the text's UTF-8 bytes,
    /// the same as [`Schema::load`] of a file holding them.
    pub fn parse(text: &str) -> Result<Schema, SchemaError> {
        let raw: raw::RawSchema = toml::from_str(text).map_err(|e| SchemaError::Toml(e.to_string()))?;
        validate::validate(raw, ContentHash::of(text.as_bytes()))
    }

    /// Reads, hashes and parses a schema file (at most [`limits::MAX_FILE_BYTES`]).
    pub fn load(path: &Path) -> Result<Schema, SchemaError> {
        let read_err = |source| SchemaError::Read { path: path.to_path_buf(), source };
        let file = std::fs::File::open(path).map_err(read_err)?;
        let mut bytes = Vec::new();
        file.take(limits::MAX_FILE_BYTES + 1).read_to_end(&mut bytes).map_err(read_err)?;
        if bytes.len() as u64 > limits::MAX_FILE_BYTES {
            return Err(SchemaError::TooLarge { path: path.to_path_buf(), limit: limits::MAX_FILE_BYTES });
        }
        let text = std::str::from_utf8(&bytes).map_err(|_| SchemaError::NotUtf8 { path: path.to_path_buf() })?;
        Schema::parse(text)
    }

    /// SHA-256 of the file's exact bytes: how plans name the schema.
    pub fn sha256(&self) -> ContentHash {
        self.sha256
    }

    /// The name plans refer to and the ledger keys budgets by.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The free-text version, if declared.
    pub fn version(&self) -> Option<&str> {
        self.version.as_deref()
    }

    /// The free-text description, if declared.
    pub fn description(&self) -> Option<&str> {
        self.description.as_deref()
    }

    /// The task; a multi-class task's classes are its label's levels or integer range.
    pub fn task(&self) -> Task {
        self.task
    }

    /// The text cells that mean missing in a CSV file.
    pub fn missing_tokens(&self) -> &[String] {
        &self.missing_tokens
    }

    /// Every declared column, in file order.
    pub fn columns(&self) -> &[Column] {
        &self.columns
    }

    /// The column named `name` in the schema, with its index.
    pub fn column_named(&self, name: &str) -> Option<(usize, &Column)> {
        self.columns.iter().enumerate().find(|(_, c)| c.name == name)
    }

    /// The model inputs after one-hot expansion; a model's `inputs` must equal their number.
    pub fn features(&self) -> &[Feature] {
        &self.features
    }

    /// The label, or the survival time and event.
    pub fn target(&self) -> Target {
        self.target
    }

    /// The train/test split.
    pub fn split(&self) -> &SplitRule {
        &self.split
    }

    /// Whom a DP guarantee protects.
    pub fn privacy_unit(&self) -> PrivacyUnit {
        self.privacy_unit
    }

    /// Which statistics standardise the features.
    pub fn standardization(&self) -> &Standardization {
        &self.standardization
    }

    /// The class index of a label cell for a binary or multi-class task: the level index of a
    /// categorical label, `value − min` of an integer one, 0/1 of a boolean. `None` for other
    /// tasks or a value the label cannot hold.
    pub fn class_of(&self, value: CellValue) -> Option<usize> {
        let Target::Label { column } = self.target else { return None };
        if matches!(self.task, Task::Regression | Task::Survival) {
            return None;
        }
        let classes = self.task.outputs().max(2);
        let class = match (&self.columns.get(column)?.kind, value) {
            (ColumnKind::Categorical { .. }, CellValue::Level(i)) => i,
            (ColumnKind::Integer { min, .. }, CellValue::Integer(v)) => {
                usize::try_from(v.checked_sub(min.unwrap_or(0))?).ok()?
            }
            (ColumnKind::Boolean, CellValue::Boolean(b)) => usize::from(b),
            _ => return None,
        };
        (class < classes).then_some(class)
    }
}

#[cfg(test)]
mod tests;
