//! Reads a hospital's table (CSV or Parquet, streamed by [`crate::table`]) and validates it
//! against a plan's schema file ([`sanctum_protocol::dataset::Schema`]): the hospital's own column
//! names are mapped to the schema's, every cell is read as its column's type within its declared
//! range, missing cells follow the column's policy (refuse, drop the row, impute the declared
//! constant), categorical features are one-hot encoded, the split is the schema's column or hash
//! rule, and the features are standardised as [`admit`] decides from the plan's privacy.
//!
//! Layout: this file opens the table against the schema and reads it row by row ([`load`],
//! [`check`]); [`error`] holds [`DataError`] and its public wording; [`standardize`] the
//! statistics the features are standardised with. [`admit`] lives in [`crate::admission`].
//!
//! Errors come in two forms: the full one (`Display`: path, position, column, the offending value)
//! for the node's own log, so the data steward can fix the row, and [`DataError::public_reason`]
//! for the lead, which names the rule, the file name, the line (or row group) and the schema's
//! column, never a cell value nor a header of the file. [`check`] streams the whole table and
//! counts, per column, present, missing, out-of-range and unknown-level cells (`data check`).

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;

use sanctum_protocol::dataset::{
    CellProblem, CellValue, Column, ColumnKind, PatientRows, PrivacyUnit, Role, Schema, Split, SplitRule, Target, Task,
    split_of,
};

use crate::table::{Format, Position, RawCell, TableReader};

mod error;
mod standardize;

// What a plan's privacy allows is an admission decision; re-exported so `data::admit` still names it.
pub use crate::admission::{RuleBroken, admit, admit_plan};
pub use error::DataError;
pub use standardize::{Standardize, UnboundedFeature, dp_features, standardize_with};
use standardize::{rescale, train_statistics};

/// A validated, standardised local dataset (row-major features).
#[derive(Debug, Clone)]
pub struct LocalData {
    pub features: usize,
    /// The schema's task, which decides the loss and the metrics.
    pub task: Task,
    /// The train split's own mean and standard deviation (ddof = 1) per feature, before
    /// standardisation, whichever statistics standardised it (for `check` and tests). They never
    /// leave the node; under [`Standardize::Declared`] nothing that leaves depends on them.
    pub train_mean: Vec<f64>,
    pub train_std: Vec<f64>,
    pub train_x: Vec<f32>,
    /// Binary: 0/1; multi-class: the class index; regression: the value; survival: the time.
    pub train_y: Vec<f32>,
    /// Survival only: whether the event was observed (empty for other tasks).
    pub train_event: Vec<bool>,
    pub test_x: Vec<f32>,
    pub test_y: Vec<f32>,
    pub test_event: Vec<bool>,
    /// Rows left out by a `drop_row` policy, per schema column (local log and `check` only).
    pub dropped: BTreeMap<String, u64>,
}

impl LocalData {
    pub fn train_len(&self) -> usize {
        self.train_y.len()
    }
    pub fn test_len(&self) -> usize {
        self.test_y.len()
    }
}

/// Where a dataset is and how its columns are named: a node config's `[[datasets]]` entry.
#[derive(Clone, Debug, Default)]
pub struct TableSource {
    pub path: PathBuf,
    /// `None`: from the file's extension.
    pub format: Option<Format>,
    /// Schema column name → this file's column name, for columns the hospital names otherwise.
    pub columns: BTreeMap<String, String>,
}

impl TableSource {
    /// A file whose columns carry the schema's names.
    pub fn plain(path: impl Into<PathBuf>) -> Self {
        TableSource { path: path.into(), ..TableSource::default() }
    }
}

/// A table opened against a schema: the table, and which file column holds each schema column.
struct Reader<'s> {
    table: TableReader,
    state: RowState<'s>,
}

/// What reading rows needs besides the table itself.
struct RowState<'s> {
    schema: &'s Schema,
    path: PathBuf,
    /// Per schema column, the file's column index.
    file_col: Vec<usize>,
    /// The id column must be unique (one row per patient with an id column).
    unique_ids: bool,
    seen_ids: HashSet<String>,
    /// Per schema column, this row's value (reused).
    values: Vec<CellValue>,
}

/// What one row came to.
enum RowOutcome {
    Kept {
        split: Split,
    },
    /// Left out by the `drop_row` policy of this schema column.
    Dropped {
        column: usize,
    },
}

/// A problem with one cell: the schema column, the file's column (0-based) and what is wrong.
struct Bad {
    column: usize,
    kind: BadKind,
}

enum BadKind {
    Cell(CellProblem),
    ParquetType { expected: &'static str, found: &'static str },
}

impl<'s> Reader<'s> {
    fn open(source: &TableSource, schema: &'s Schema) -> Result<Reader<'s>, DataError> {
        for key in source.columns.keys() {
            if schema.column_named(key).is_none() {
                return Err(DataError::UnknownMapping {
                    key: key.clone(),
                    schema: schema.name().to_string(),
                    known: schema.columns().iter().map(Column::name).collect::<Vec<_>>().join(", "),
                });
            }
        }
        let table = TableReader::open(&source.path, source.format)?;
        let header = table.header();
        // A header naming a column twice would let the first silently win.
        for (i, h) in header.iter().enumerate() {
            if header[..i].contains(h) {
                return Err(DataError::DuplicateColumn { path: source.path.clone(), column: i + 1 });
            }
        }
        let mut file_col = Vec::with_capacity(schema.columns().len());
        for column in schema.columns() {
            let file_column = source.columns.get(column.name()).map_or(column.name(), String::as_str);
            let Some(i) = header.iter().position(|h| h == file_column) else {
                return Err(DataError::MissingColumn {
                    path: source.path.clone(),
                    column: column.name().to_string(),
                    file_column: file_column.to_string(),
                    schema: schema.name().to_string(),
                    found: header.join(", ").into(),
                });
            };
            // Two schema columns read from one file column (the label from a feature's column):
            // a mapping mistake, never what a steward means.
            if let Some(other) = file_col.iter().position(|&c| c == i) {
                return Err(DataError::MappedTwice {
                    path: source.path.clone(),
                    first: schema.columns()[other].name().to_string(),
                    second: column.name().to_string(),
                });
            }
            file_col.push(i);
        }
        let unique_ids = matches!(schema.privacy_unit(), PrivacyUnit::Patient(PatientRows::OnePerPatient { .. }));
        let values = vec![CellValue::Missing; schema.columns().len()];
        let path = source.path.clone();
        Ok(Reader { table, state: RowState { schema, path, file_col, unique_ids, seen_ids: HashSet::new(), values } })
    }
}

impl RowState<'_> {
    fn data_error(&self, position: Position, bad: Bad) -> DataError {
        let path = self.path.clone();
        let column = self.file_col[bad.column] + 1;
        let name = self.schema.columns()[bad.column].name().to_string();
        match bad.kind {
            BadKind::Cell(problem) => DataError::Cell { path, position, column, name, problem: Box::new(problem) },
            BadKind::ParquetType { expected, found } => {
                DataError::ParquetType { path, position, column, name, expected, found }
            }
        }
    }
}

/// Reads one cell of a schema column as the file holds it.
fn read_cell(column: &Column, raw: Option<RawCell<'_>>, parquet: bool) -> Result<CellValue, BadKind> {
    let strict_type = |found: &'static str| BadKind::ParquetType { expected: column.kind().name(), found };
    let value = match raw {
        None | Some(RawCell::Missing) => Ok(CellValue::Missing),
        Some(RawCell::Text(t)) if !parquet => column.read(Some(t)),
        // A Parquet file states its types: a numeric, integer or boolean column stored as text is
        // a table made for another schema, refused rather than parsed.
        Some(RawCell::Text(_))
            if matches!(
                column.kind(),
                ColumnKind::Numeric { .. } | ColumnKind::Integer { .. } | ColumnKind::Boolean
            ) =>
        {
            return Err(strict_type("text"));
        }
        Some(RawCell::Text(t)) => column.read_str(Some(t)),
        Some(RawCell::Float(_)) if matches!(column.kind(), ColumnKind::Integer { .. } | ColumnKind::Boolean) => {
            return Err(strict_type("floating-point numbers"));
        }
        Some(RawCell::Float(v)) => column.read_f64(Some(v)),
        Some(RawCell::Int(v)) => column.read_i64(Some(v)),
        Some(RawCell::Bool(b)) => column.read_bool(Some(b)),
    };
    value.map_err(BadKind::Cell)
}

/// The text of an id or key cell, for the duplicate check and the hash split.
fn key_text(raw: Option<RawCell<'_>>) -> Option<String> {
    match raw? {
        RawCell::Text(t) => Some(t.trim().to_string()),
        RawCell::Int(v) => Some(v.to_string()),
        RawCell::Float(v) => Some(v.to_string()),
        RawCell::Bool(b) => Some(b.to_string()),
        RawCell::Missing => None,
    }
}

/// One row's cells: read each schema column, apply its missing policy, check the patient id and
/// find the split. On `Kept`, `values` holds every column's value.
fn process_row(r: &mut RowState<'_>, row: &crate::table::Row<'_>, parquet: bool) -> Result<RowOutcome, Bad> {
    let schema = r.schema;
    let split_column = match schema.split() {
        SplitRule::Column(c) => Some(c.column),
        SplitRule::Hash { .. } => None,
    };
    let mut dropped = None;
    for (ci, column) in schema.columns().iter().enumerate() {
        if Some(ci) == split_column {
            continue;
        }
        let raw = row.cell(r.file_col[ci]);
        let value = read_cell(column, raw, parquet).map_err(|kind| Bad { column: ci, kind })?;
        match column.resolve(value) {
            Ok(sanctum_protocol::dataset::Cell::Value(v)) => r.values[ci] = v,
            Ok(sanctum_protocol::dataset::Cell::DropRow) => {
                dropped.get_or_insert(ci);
            }
            Err(p) => return Err(Bad { column: ci, kind: BadKind::Cell(p) }),
        }
        // A survival time with no declared lower bound must still be a time.
        if column.role() == Role::Time && r.values[ci].as_f64().is_some_and(|t| t < 0.0) && dropped.is_none() {
            return Err(Bad {
                column: ci,
                kind: BadKind::Cell(CellProblem::OutOfRange {
                    value: r.values[ci].as_f64().map(|t| t.to_string()).unwrap_or_default(),
                    min: Some("0".into()),
                    max: None,
                }),
            });
        }
    }
    let split = match schema.split() {
        SplitRule::Column(c) => {
            let raw = row.cell(r.file_col[c.column]);
            let read = match raw {
                None | Some(RawCell::Missing) => c.read_str(None),
                Some(RawCell::Text(t)) if parquet => c.read_str(Some(t)),
                Some(RawCell::Text(t)) => c.read(Some(t)),
                Some(_) => {
                    return Err(Bad {
                        column: c.column,
                        kind: BadKind::ParquetType { expected: "text", found: "numbers" },
                    });
                }
            };
            match read.map_err(|p| Bad { column: c.column, kind: BadKind::Cell(p) })? {
                Some(s) => Some(s),
                None => {
                    dropped.get_or_insert(c.column);
                    None
                }
            }
        }
        SplitRule::Hash { .. } => None,
    };
    if let Some(column) = dropped {
        return Ok(RowOutcome::Dropped { column });
    }
    let id = schema.privacy_unit().id_column().and_then(|c| key_text(row.cell(r.file_col[c])));
    if let (true, Some(c), Some(id)) = (r.unique_ids, schema.privacy_unit().id_column(), &id)
        && !r.seen_ids.insert(id.clone())
    {
        return Err(Bad { column: c, kind: BadKind::Cell(CellProblem::DuplicatePatient { id: id.clone() }) });
    }
    let split = match (split, schema.split()) {
        (Some(s), _) => s,
        (None, SplitRule::Hash { seed, test_fraction }) => {
            // The id's text when the schema has one, else the 1-based data row number.
            let key = id.unwrap_or_else(|| (row.position().row() + 1).to_string());
            split_of(*seed, key.as_bytes(), *test_fraction)
        }
        (None, SplitRule::Column(_)) => Split::Train,
    };
    Ok(RowOutcome::Kept { split })
}

/// Reads and validates `source` against `schema`, standardising as `standardize` says (choose it
/// with [`admit`]). When the schema promises one row per patient and has a patient-id column,
/// every id must be unique. The first problem ends the load.
pub fn load(source: &TableSource, schema: &Schema, standardize: &Standardize) -> Result<LocalData, DataError> {
    let Reader { mut table, mut state } = Reader::open(source, schema)?;
    let parquet = table.format() == Format::Parquet;
    let task = schema.task();
    let d = schema.features().len();
    let mut data = LocalData {
        features: d,
        task,
        train_mean: Vec::new(),
        train_std: Vec::new(),
        train_x: Vec::new(),
        train_y: Vec::new(),
        train_event: Vec::new(),
        test_x: Vec::new(),
        test_y: Vec::new(),
        test_event: Vec::new(),
        dropped: BTreeMap::new(),
    };
    let mut kept = 0u64;
    while let Some(row) = table.next_row() {
        let row = row?;
        let position = row.position();
        let split = match process_row(&mut state, &row, parquet) {
            Ok(RowOutcome::Kept { split }) => split,
            Ok(RowOutcome::Dropped { column }) => {
                *data.dropped.entry(schema.columns()[column].name().to_string()).or_default() += 1;
                continue;
            }
            Err(bad) => return Err(state.data_error(position, bad)),
        };
        let (x, y, event) = match split {
            Split::Train => (&mut data.train_x, &mut data.train_y, &mut data.train_event),
            Split::Test => (&mut data.test_x, &mut data.test_y, &mut data.test_event),
        };
        for f in schema.features() {
            // `process_row` resolved every feature column to a value of its type.
            x.push(f.encode(state.values[f.column]).unwrap_or(0.0) as f32);
        }
        match schema.target() {
            Target::Label { column } => {
                let value = state.values[column];
                let y_value = match task {
                    Task::Binary | Task::Multiclass { .. } => match schema.class_of(value) {
                        Some(c) => c as f64,
                        None => {
                            let problem = CellProblem::UnknownLevel {
                                value: format!("{value:?}"),
                                levels: task.outputs().max(2),
                            };
                            return Err(state.data_error(position, Bad { column, kind: BadKind::Cell(problem) }));
                        }
                    },
                    Task::Regression | Task::Survival => value.as_f64().unwrap_or(0.0),
                };
                y.push(y_value as f32);
            }
            Target::Survival { time, event: e } => {
                y.push(state.values[time].as_f64().unwrap_or(0.0) as f32);
                let observed = match state.values[e] {
                    CellValue::Boolean(b) => b,
                    CellValue::Integer(0) => false,
                    CellValue::Integer(1) => true,
                    other => {
                        let problem = CellProblem::NotABoolean(format!("{other:?}"));
                        return Err(state.data_error(position, Bad { column: e, kind: BadKind::Cell(problem) }));
                    }
                };
                event.push(observed);
            }
        }
        kept += 1;
    }
    for (rows, split) in [(data.train_y.len(), "train"), (data.test_y.len(), "test")] {
        if rows == 0 {
            return Err(DataError::EmptySplit { path: source.path.clone(), split, rows: kept });
        }
    }
    let (train_mean, train_std) = train_statistics(&data.train_x, d);
    match standardize {
        // The caller standardises once it has released the statistics (`standardize_with`).
        Standardize::Off | Standardize::EstimateDp { .. } => {}
        Standardize::PerNode => {
            // FLamby adds 1e-9 so a constant feature (Switzerland's chol) maps to 0, not NaN. Only
            // the features the schema standardises; one-hot inputs stay 0/1.
            let (mean, scale): (Vec<f64>, Vec<f64>) = schema
                .features()
                .iter()
                .zip(train_mean.iter().zip(&train_std))
                .map(|(f, (m, s))| if f.standardize { (*m, s + 1e-9) } else { (0.0, 1.0) })
                .unzip();
            rescale(&mut data.train_x, &mut data.test_x, &mean, &scale);
        }
        Standardize::Declared(stats) => {
            // Exactly the published numbers: every node computes the same map, and nothing in it
            // depends on this node's data. The schema checked that they fit and that std > 0.
            rescale(&mut data.train_x, &mut data.test_x, &stats.mean, &stats.std);
        }
    }
    data.train_mean = train_mean;
    data.train_std = train_std;
    Ok(data)
}

/// Per schema column, what [`check`] saw. Counts only: never a value.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ColumnCounts {
    /// Cells read as a value of the column's type within its range.
    pub valid: u64,
    pub missing: u64,
    pub out_of_range: u64,
    /// Categorical columns: cells that are none of the declared levels.
    pub unknown_levels: u64,
    /// Other problems: not a number, not an integer, not a boolean, unknown split value,
    /// duplicate patient id, a Parquet type the schema does not take.
    pub invalid: u64,
    /// Rows this column's `drop_row` policy left out.
    pub dropped_rows: u64,
}

/// What [`check`] found in a whole table.
#[derive(Debug, Default)]
pub struct CheckReport {
    /// Data rows read.
    pub rows: u64,
    pub train_rows: u64,
    pub test_rows: u64,
    /// Per schema column, in the schema's order.
    pub columns: Vec<(String, ColumnCounts)>,
    /// The first problem, as the node would refuse the file.
    pub first_problem: Option<DataError>,
}

/// Streams the whole table through the schema, counting per column, and keeps the first problem.
/// Memory is one row (plus the set of patient ids when the schema checks them): a table larger
/// than memory can be checked. A file-level problem (unreadable, missing column) is the error.
pub fn check(source: &TableSource, schema: &Schema) -> Result<CheckReport, DataError> {
    let Reader { mut table, mut state } = Reader::open(source, schema)?;
    let parquet = table.format() == Format::Parquet;
    let n = schema.columns().len();
    let mut counts = vec![ColumnCounts::default(); n];
    let mut report = CheckReport::default();
    while let Some(row) = table.next_row() {
        let row = match row {
            Ok(row) => row,
            Err(e) => {
                report.first_problem.get_or_insert(DataError::Table(e));
                break;
            }
        };
        report.rows += 1;
        let position = row.position();
        // Count every cell of the row, not only the first bad one.
        for (ci, column) in schema.columns().iter().enumerate() {
            let raw = row.cell(state.file_col[ci]);
            let c = &mut counts[ci];
            let split_col = matches!(schema.split(), SplitRule::Column(s) if s.column == ci);
            if split_col {
                continue;
            }
            match read_cell(column, raw, parquet) {
                Ok(CellValue::Missing) => c.missing += 1,
                Ok(_) => c.valid += 1,
                Err(BadKind::Cell(CellProblem::OutOfRange { .. })) => c.out_of_range += 1,
                Err(BadKind::Cell(CellProblem::UnknownLevel { .. })) => c.unknown_levels += 1,
                Err(_) => c.invalid += 1,
            }
        }
        match process_row(&mut state, &row, parquet) {
            Ok(RowOutcome::Kept { split }) => {
                if let SplitRule::Column(s) = schema.split() {
                    counts[s.column].valid += 1;
                }
                match split {
                    Split::Train => report.train_rows += 1,
                    Split::Test => report.test_rows += 1,
                }
            }
            Ok(RowOutcome::Dropped { column }) => counts[column].dropped_rows += 1,
            Err(bad) => {
                // Cells were counted above; the split column and the id's uniqueness only here.
                let split_col = matches!(schema.split(), SplitRule::Column(s) if s.column == bad.column);
                match &bad.kind {
                    BadKind::Cell(CellProblem::DuplicatePatient { .. }) => counts[bad.column].invalid += 1,
                    BadKind::Cell(CellProblem::Missing) if split_col => counts[bad.column].missing += 1,
                    _ if split_col => counts[bad.column].invalid += 1,
                    _ => {}
                }
                if report.first_problem.is_none() {
                    report.first_problem = Some(state.data_error(position, bad));
                }
            }
        }
    }
    if report.first_problem.is_none() {
        for (rows, split) in [(report.train_rows, "train"), (report.test_rows, "test")] {
            if rows == 0 {
                report.first_problem = Some(DataError::EmptySplit {
                    path: source.path.clone(),
                    split,
                    rows: report.train_rows + report.test_rows,
                });
                break;
            }
        }
    }
    report.columns = schema.columns().iter().map(|c| c.name().to_string()).zip(counts).collect();
    Ok(report)
}

#[cfg(test)]
mod tests;
