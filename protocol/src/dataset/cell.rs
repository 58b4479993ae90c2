//! One column of a schema and how a node reads one of its cells: pure functions from the cell's
//! text (CSV) or typed value (Parquet) to a [`CellValue`], then the column's missing-value policy
//! to a [`Cell`]. A [`CellProblem`] has two wordings: `Display`, which may show the offending value
//! and goes only to the node's own log, and [`CellProblem::public`], which never does (a cell is
//! patient data) and may go to the lead. The bounds and level counts it names come from the
//! schema, which every hospital holds, so they are public.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

/// The longest stretch of a bad cell kept for the local log: a hostile or broken file can hold a
/// cell of megabytes, and the log needs only enough to find it.
const MAX_SHOWN: usize = 100;

/// What a column holds and the bounds every cell must keep.
#[derive(Clone, Debug, PartialEq)]
pub enum ColumnKind {
    /// A finite real number within `[min, max]` where given.
    Numeric { min: Option<f64>, max: Option<f64> },
    /// An integer within `[min, max]` where given (`3` and `3.0` both read as 3).
    Integer { min: Option<i64>, max: Option<i64> },
    /// One of `levels` (non-empty, unique); the cell reads as the level's index, which is also
    /// the class index when this is a multi-class label. As a feature it is one-hot encoded,
    /// without the first level's input when `drop_first`.
    Categorical { levels: Vec<String>, drop_first: bool },
    /// `0`, `1`, `true` or `false` (case-insensitive).
    Boolean,
    /// Any present text: only for the patient-id and split columns.
    Text,
}

impl ColumnKind {
    /// The type's name as schema files spell it.
    pub fn name(&self) -> &'static str {
        match self {
            ColumnKind::Numeric { .. } => "numeric",
            ColumnKind::Integer { .. } => "integer",
            ColumnKind::Categorical { .. } => "categorical",
            ColumnKind::Boolean => "boolean",
            ColumnKind::Text => "text",
        }
    }
}

/// What a column is for in the schema.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A model input (expanded to one or more [`super::Feature`]s).
    Feature,
    /// The label of a binary, multi-class or regression task.
    Label,
    /// The survival time.
    Time,
    /// The survival event indicator.
    Event,
    /// The column that says train or test.
    Split,
    /// The patient id ([`super::PrivacyUnit`]).
    Id,
}

/// What a node does with a missing cell of a column.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MissingPolicy {
    /// The file is refused, naming the cell (the default).
    Refuse,
    /// The row is left out of both splits.
    DropRow,
    /// The cell takes this value, declared in the schema and already checked against the column
    /// (right type, within bounds, a known level). Never on a target, split or id column.
    Impute(CellValue),
}

/// A present cell, read as its column's type.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CellValue {
    /// The cell is absent (Parquet null), empty, or one of the schema's missing-value tokens.
    Missing,
    /// A numeric column's finite, in-range value.
    Number(f64),
    /// An integer column's in-range value.
    Integer(i64),
    /// A categorical column's level index.
    Level(usize),
    /// A boolean column's value.
    Boolean(bool),
    /// A text column's cell is present; the value is the caller's own text.
    Text,
}

impl CellValue {
    /// The value as a model sees it before encoding: numbers as they are, booleans 0/1, a level
    /// its index. `None` for [`CellValue::Missing`] and [`CellValue::Text`].
    pub fn as_f64(self) -> Option<f64> {
        match self {
            CellValue::Number(v) => Some(v),
            CellValue::Integer(v) => Some(v as f64),
            CellValue::Level(i) => Some(i as f64),
            CellValue::Boolean(b) => Some(if b { 1.0 } else { 0.0 }),
            CellValue::Missing | CellValue::Text => None,
        }
    }
}

/// A cell after the missing-value policy.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Cell {
    /// The cell's value, read or imputed; never [`CellValue::Missing`].
    Value(CellValue),
    /// The cell was missing and the column's policy leaves the row out.
    DropRow,
}

/// What is wrong with one cell. The `String`s hold the cell's text (cut to 100 characters) for
/// `Display` only; [`CellProblem::public`] never shows them.
#[derive(Clone, Debug, PartialEq)]
pub enum CellProblem {
    /// Missing where the column's policy refuses it.
    Missing,
    NotANumber(String),
    NotFinite(String),
    NotAnInteger(String),
    /// Outside the column's declared bounds, which are public (`min`/`max` as the schema writes
    /// them; `None` is unbounded on that side).
    OutOfRange {
        value: String,
        min: Option<String>,
        max: Option<String>,
    },
    /// Not one of the column's `levels` levels.
    UnknownLevel {
        value: String,
        levels: usize,
    },
    NotABoolean(String),
    /// Neither the split column's train value nor its test value (both from the schema).
    UnknownSplit {
        value: String,
        train: String,
        test: String,
    },
    /// A patient id seen on an earlier row where the schema promises one row per patient.
    DuplicatePatient {
        id: String,
    },
}

impl CellProblem {
    /// The name of the rule the cell breaks, for refusal reasons and counts.
    pub fn rule(&self) -> &'static str {
        match self {
            CellProblem::Missing => "value-present",
            CellProblem::NotANumber(_) => "value-numeric",
            CellProblem::NotFinite(_) => "value-finite",
            CellProblem::NotAnInteger(_) => "value-integer",
            CellProblem::OutOfRange { .. } => "value-in-range",
            CellProblem::UnknownLevel { .. } => "value-known-level",
            CellProblem::NotABoolean(_) => "value-boolean",
            CellProblem::UnknownSplit { .. } => "split-train-or-test",
            CellProblem::DuplicatePatient { .. } => "one-row-per-patient",
        }
    }

    /// What is wrong, in words that hold no value from the file: fit for the lead and for
    /// `data check`. Bounds, level counts and the split values come from the schema.
    pub fn public(&self) -> String {
        match self {
            CellProblem::Missing => "value is missing and the column refuses missing values".into(),
            CellProblem::NotANumber(_) => "value is not a number".into(),
            CellProblem::NotFinite(_) => "value is not a finite number".into(),
            CellProblem::NotAnInteger(_) => "value is not an integer".into(),
            CellProblem::OutOfRange { min, max, .. } => format!("value is outside {}", bounds(min, max)),
            CellProblem::UnknownLevel { levels, .. } => {
                format!("value is not one of the column's {levels} declared levels")
            }
            CellProblem::NotABoolean(_) => "value is not a boolean (0, 1, true or false)".into(),
            CellProblem::UnknownSplit { train, test, .. } => {
                format!("value is neither '{train}' (train) nor '{test}' (test)")
            }
            CellProblem::DuplicatePatient { .. } => "the patient id already appears on an earlier row".into(),
        }
    }
}

/// `[0, 120]`, `[0, ∞)`, … for messages.
fn bounds(min: &Option<String>, max: &Option<String>) -> String {
    match (min, max) {
        (Some(lo), Some(hi)) => format!("the declared range [{lo}, {hi}]"),
        (Some(lo), None) => format!("the declared range [{lo}, ∞)"),
        (None, Some(hi)) => format!("the declared range (-∞, {hi}]"),
        (None, None) => "the declared range".into(),
    }
}

impl fmt::Display for CellProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CellProblem::Missing => f.write_str(
                "value is missing and the column's policy is refuse; fill the cell, remove the row, or declare missing = \"drop_row\" or \"impute\" in the schema",
            ),
            CellProblem::NotANumber(v) => write!(f, "'{v}' is not a number; fix or remove the row"),
            CellProblem::NotFinite(v) => write!(f, "'{v}' is not a finite number; fix or remove the row"),
            CellProblem::NotAnInteger(v) => write!(f, "'{v}' is not an integer; fix or remove the row"),
            CellProblem::OutOfRange { value, min, max } => {
                write!(f, "{value} is outside {}; fix the value or the unit", bounds(min, max))
            }
            CellProblem::UnknownLevel { value, levels } => write!(
                f,
                "'{value}' is not one of the column's {levels} declared levels; map it to a declared level or ask the consortium to add it"
            ),
            CellProblem::NotABoolean(v) => write!(f, "'{v}' is not a boolean (0, 1, true or false); fix or remove the row"),
            CellProblem::UnknownSplit { value, train, test } => {
                write!(f, "'{value}' is neither '{train}' (train) nor '{test}' (test); fix the split column")
            }
            CellProblem::DuplicatePatient { id } => write!(
                f,
                "patient id '{id}' already appears on an earlier row, but the schema promises one row per patient; merge or remove the duplicate"
            ),
        }
    }
}

/// The cell's text for the local log, cut to [`MAX_SHOWN`] characters.
fn shown(raw: &str) -> String {
    match raw.char_indices().nth(MAX_SHOWN) {
        Some((end, _)) => format!("{}…", &raw[..end]),
        None => raw.to_string(),
    }
}

/// One schema column: its name as the schema spells it (a node maps its own header to it), its
/// type and bounds, and its missing-value policy.
#[derive(Clone, Debug)]
pub struct Column {
    pub(super) name: String,
    pub(super) kind: ColumnKind,
    pub(super) unit: Option<String>,
    pub(super) role: Role,
    pub(super) missing: MissingPolicy,
    /// Whether this feature is standardised (always false for non-features and one-hot inputs).
    pub(super) standardize: bool,
    /// The schema's missing-value tokens, shared by every column (a text cell equal to one is
    /// missing).
    pub(super) missing_tokens: Arc<[String]>,
    /// Level text → index, so a table with 10,000 levels reads a cell in O(1).
    pub(super) level_index: HashMap<String, usize>,
}

impl PartialEq for Column {
    fn eq(&self, other: &Self) -> bool {
        // `level_index` is derived from `kind`, so it needs no comparison.
        self.name == other.name
            && self.kind == other.kind
            && self.unit == other.unit
            && self.role == other.role
            && self.missing == other.missing
            && self.standardize == other.standardize
            && self.missing_tokens == other.missing_tokens
    }
}

impl Column {
    /// The column's name in the schema.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its type and bounds.
    pub fn kind(&self) -> &ColumnKind {
        &self.kind
    }

    /// Its unit (free text), if declared.
    pub fn unit(&self) -> Option<&str> {
        self.unit.as_deref()
    }

    /// What it is for.
    pub fn role(&self) -> Role {
        self.role
    }

    /// What a missing cell does.
    pub fn missing(&self) -> MissingPolicy {
        self.missing
    }

    /// Whether it is a feature the schema standardises.
    pub fn standardized(&self) -> bool {
        self.standardize
    }

    /// Reads a CSV cell: `None`, empty text or a missing-value token is [`CellValue::Missing`];
    /// surrounding spaces are ignored. Then as the column's type; see [`Column::read_str`].
    pub fn read(&self, raw: Option<&str>) -> Result<CellValue, CellProblem> {
        match raw.map(str::trim) {
            None => Ok(CellValue::Missing),
            Some(t) if t.is_empty() || self.missing_tokens.iter().any(|m| m == t) => Ok(CellValue::Missing),
            Some(t) => self.read_text(t),
        }
    }

    /// Reads a Parquet string cell: only `None` (null) is missing, as the design says of Parquet;
    /// any text, even empty, is read as the column's type.
    pub fn read_str(&self, raw: Option<&str>) -> Result<CellValue, CellProblem> {
        match raw {
            None => Ok(CellValue::Missing),
            Some(t) => self.read_text(t.trim()),
        }
    }

    /// Reads present text as the column's type.
    fn read_text(&self, t: &str) -> Result<CellValue, CellProblem> {
        match &self.kind {
            ColumnKind::Numeric { .. } => match t.parse::<f64>() {
                Ok(v) => self.number(v, t),
                Err(_) => Err(CellProblem::NotANumber(shown(t))),
            },
            ColumnKind::Integer { .. } => match t.parse::<i64>() {
                Ok(v) => self.integer(v),
                Err(_) => match t.parse::<f64>() {
                    Ok(v) => self.integral_f64(v, t),
                    Err(_) => Err(CellProblem::NotAnInteger(shown(t))),
                },
            },
            ColumnKind::Categorical { levels, .. } => match self.level_index.get(t) {
                Some(&i) => Ok(CellValue::Level(i)),
                None => Err(CellProblem::UnknownLevel { value: shown(t), levels: levels.len() }),
            },
            ColumnKind::Boolean => {
                if t == "1" || t.eq_ignore_ascii_case("true") {
                    Ok(CellValue::Boolean(true))
                } else if t == "0" || t.eq_ignore_ascii_case("false") {
                    Ok(CellValue::Boolean(false))
                } else {
                    Err(CellProblem::NotABoolean(shown(t)))
                }
            }
            ColumnKind::Text => Ok(CellValue::Text),
        }
    }

    /// Reads a Parquet floating-point cell (`None` = null = missing). An integer column takes an
    /// integral value, a boolean column 0.0 or 1.0, a categorical column the level whose text is
    /// the number (`2.0` finds level `2` or `2.0`).
    pub fn read_f64(&self, v: Option<f64>) -> Result<CellValue, CellProblem> {
        let Some(v) = v else { return Ok(CellValue::Missing) };
        match &self.kind {
            ColumnKind::Numeric { .. } => self.number(v, &v.to_string()),
            ColumnKind::Integer { .. } => self.integral_f64(v, &v.to_string()),
            ColumnKind::Boolean if v == 0.0 => Ok(CellValue::Boolean(false)),
            ColumnKind::Boolean if v == 1.0 => Ok(CellValue::Boolean(true)),
            ColumnKind::Boolean => Err(CellProblem::NotABoolean(v.to_string())),
            ColumnKind::Categorical { .. } => self.numeric_level(v, v.to_string()),
            ColumnKind::Text => Ok(CellValue::Text),
        }
    }

    /// Reads a Parquet integer cell (`None` = null = missing). A numeric column takes it as a real
    /// number, a boolean column 0 or 1, a categorical column the level whose text is the number.
    pub fn read_i64(&self, v: Option<i64>) -> Result<CellValue, CellProblem> {
        let Some(v) = v else { return Ok(CellValue::Missing) };
        match &self.kind {
            ColumnKind::Numeric { .. } => self.number(v as f64, &v.to_string()),
            ColumnKind::Integer { .. } => self.integer(v),
            ColumnKind::Boolean if v == 0 => Ok(CellValue::Boolean(false)),
            ColumnKind::Boolean if v == 1 => Ok(CellValue::Boolean(true)),
            ColumnKind::Boolean => Err(CellProblem::NotABoolean(v.to_string())),
            ColumnKind::Categorical { .. } => self.numeric_level(v as f64, v.to_string()),
            ColumnKind::Text => Ok(CellValue::Text),
        }
    }

    /// Reads a Parquet boolean cell (`None` = null = missing). A numeric or integer column takes
    /// it as 0/1 (within its bounds), a categorical column a level spelt `true`/`false` (any case)
    /// or `1`/`0`.
    pub fn read_bool(&self, v: Option<bool>) -> Result<CellValue, CellProblem> {
        let Some(b) = v else { return Ok(CellValue::Missing) };
        match &self.kind {
            ColumnKind::Boolean => Ok(CellValue::Boolean(b)),
            ColumnKind::Numeric { .. } => self.number(if b { 1.0 } else { 0.0 }, if b { "1" } else { "0" }),
            ColumnKind::Integer { .. } => self.integer(i64::from(b)),
            ColumnKind::Categorical { levels, .. } => {
                let (word, digit) = if b { ("true", "1") } else { ("false", "0") };
                levels
                    .iter()
                    .position(|l| l.eq_ignore_ascii_case(word))
                    .or_else(|| self.level_index.get(digit).copied())
                    .map(CellValue::Level)
                    .ok_or(CellProblem::UnknownLevel { value: word.to_string(), levels: levels.len() })
            }
            ColumnKind::Text => Ok(CellValue::Text),
        }
    }

    /// Applies the column's missing-value policy to a read cell.
    pub fn resolve(&self, value: CellValue) -> Result<Cell, CellProblem> {
        match (value, self.missing) {
            (CellValue::Missing, MissingPolicy::Refuse) => Err(CellProblem::Missing),
            (CellValue::Missing, MissingPolicy::DropRow) => Ok(Cell::DropRow),
            (CellValue::Missing, MissingPolicy::Impute(v)) => Ok(Cell::Value(v)),
            (v, _) => Ok(Cell::Value(v)),
        }
    }

    /// [`Column::read`] then [`Column::resolve`]: a CSV cell as the loader uses it.
    pub fn interpret(&self, raw: Option<&str>) -> Result<Cell, CellProblem> {
        self.resolve(self.read(raw)?)
    }

    /// A parsed number for a numeric column: finite and within bounds.
    fn number(&self, v: f64, text: &str) -> Result<CellValue, CellProblem> {
        if !v.is_finite() {
            return Err(CellProblem::NotFinite(shown(text)));
        }
        let (lo, hi) = match self.kind {
            ColumnKind::Numeric { min, max } => (min, max),
            _ => (None, None),
        };
        if lo.is_some_and(|lo| v < lo) || hi.is_some_and(|hi| v > hi) {
            return Err(CellProblem::OutOfRange {
                value: shown(text),
                min: lo.map(|x| x.to_string()),
                max: hi.map(|x| x.to_string()),
            });
        }
        Ok(CellValue::Number(v))
    }

    /// An integer for an integer column: within bounds.
    fn integer(&self, v: i64) -> Result<CellValue, CellProblem> {
        let (lo, hi) = match self.kind {
            ColumnKind::Integer { min, max } => (min, max),
            _ => (None, None),
        };
        if lo.is_some_and(|lo| v < lo) || hi.is_some_and(|hi| v > hi) {
            return Err(CellProblem::OutOfRange {
                value: v.to_string(),
                min: lo.map(|x| x.to_string()),
                max: hi.map(|x| x.to_string()),
            });
        }
        Ok(CellValue::Integer(v))
    }

    /// A real number that must be an integer (`3.0`, `1e3`) for an integer column.
    fn integral_f64(&self, v: f64, text: &str) -> Result<CellValue, CellProblem> {
        if !v.is_finite() {
            return Err(CellProblem::NotFinite(shown(text)));
        }
        // Every f64 at or beyond ±2^63 is outside i64; below that an integral f64 converts exactly.
        const LIMIT: f64 = 9_223_372_036_854_775_808.0;
        if v.fract() != 0.0 || !(-LIMIT..LIMIT).contains(&v) {
            return Err(CellProblem::NotAnInteger(shown(text)));
        }
        self.integer(v as i64)
    }

    /// The level of a categorical column whose text is the number `v`: first by `v`'s own
    /// spelling, then by any level that parses to the same number (`2` for `2.0`).
    fn numeric_level(&self, v: f64, text: String) -> Result<CellValue, CellProblem> {
        let ColumnKind::Categorical { levels, .. } = &self.kind else {
            return Err(CellProblem::UnknownLevel { value: text, levels: 0 });
        };
        if let Some(&i) = self.level_index.get(text.as_str()) {
            return Ok(CellValue::Level(i));
        }
        levels
            .iter()
            .position(|l| l.trim().parse::<f64>().is_ok_and(|x| x == v))
            .map(CellValue::Level)
            .ok_or(CellProblem::UnknownLevel { value: text, levels: levels.len() })
    }
}
