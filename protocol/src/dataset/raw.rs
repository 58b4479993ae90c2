//! The schema file exactly as TOML spells it, before any rule is checked. Every table refuses keys
//! it does not know (`deny_unknown_fields`): a misspelt `standardise` must fail loudly, not be
//! ignored while the schema silently means something else. `validate.rs` turns this into
//! [`super::Schema`].

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSchema {
    pub(super) name: String,
    pub(super) version: Option<String>,
    pub(super) description: Option<String>,
    pub(super) task: RawTask,
    pub(super) missing_values: Option<Vec<String>>,
    pub(super) target: RawTarget,
    pub(super) split: RawSplit,
    pub(super) privacy: RawPrivacy,
    pub(super) standardize: Option<RawStandardize>,
    #[serde(default)]
    pub(super) columns: Vec<RawColumn>,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(super) enum RawTask {
    Binary,
    Multiclass,
    Regression,
    Survival,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTarget {
    pub(super) label: Option<String>,
    pub(super) time: Option<String>,
    pub(super) event: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSplit {
    pub(super) column: Option<String>,
    pub(super) train: Option<String>,
    pub(super) test: Option<String>,
    pub(super) rule: Option<RawSplitRule>,
    pub(super) test_fraction: Option<f64>,
    pub(super) seed: Option<u64>,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(super) enum RawSplitRule {
    Hash,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPrivacy {
    pub(super) unit: RawUnit,
    pub(super) rows_per_patient: Option<RawRowsPerPatient>,
    pub(super) id_column: Option<String>,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(super) enum RawUnit {
    Row,
    Patient,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(super) enum RawRowsPerPatient {
    One,
    Several,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStandardize {
    pub(super) with: RawWith,
    pub(super) provenance: Option<String>,
    pub(super) epsilon: Option<f64>,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(super) enum RawWith {
    None,
    PerNode,
    Declared,
    Dp,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawColumn {
    pub(super) name: String,
    #[serde(rename = "type")]
    pub(super) kind: RawKind,
    pub(super) unit: Option<String>,
    pub(super) min: Option<RawNumber>,
    pub(super) max: Option<RawNumber>,
    pub(super) levels: Option<Vec<String>>,
    pub(super) encoding: Option<RawEncoding>,
    pub(super) drop_first: Option<bool>,
    pub(super) missing: Option<RawMissing>,
    pub(super) impute: Option<RawImpute>,
    pub(super) mean: Option<f64>,
    pub(super) std: Option<f64>,
    pub(super) standardize: Option<bool>,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(super) enum RawKind {
    Numeric,
    Integer,
    Categorical,
    Boolean,
    /// Free text, only for the patient-id and split columns (ids such as `P-0042` are no number).
    Text,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(super) enum RawEncoding {
    OneHot,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(super) enum RawMissing {
    Refuse,
    DropRow,
    Impute,
}

/// A TOML number: `min = 0` and `min = 0.0` both mean zero, and an integer column needs to know
/// which one it got to refuse `min = 0.5`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub(super) enum RawNumber {
    Int(i64),
    Float(f64),
}

impl RawNumber {
    pub(super) fn as_f64(self) -> f64 {
        match self {
            RawNumber::Int(i) => i as f64,
            RawNumber::Float(f) => f,
        }
    }
}

/// An impute value as written: a number, a level name or a boolean.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub(super) enum RawImpute {
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
}
