//! Why a data file cannot be used: [`DataError`]'s `Display` is the full detail for the node's
//! own log; [`DataError::public_reason`] the wording for the lead and
//! [`DataError::steward_reason`] the one for `sanctum-node data check`.

use std::path::{Path, PathBuf};

use sanctum_protocol::dataset::CellProblem;

use crate::table::{Position, TableError};

/// Why a data file cannot be used. `Display` is the full detail for the node's own log;
/// [`DataError::public_reason`] is what may be sent to the lead.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{0}")]
    Table(#[from] TableError),
    #[error(
        "{path}: column '{file_column}' (schema column '{column}' of schema '{schema}') is missing (the file's header has: {found}); rename the column, or map it in the node config under [datasets.columns] {column} = \"<your column>\""
    )]
    MissingColumn { path: PathBuf, column: String, file_column: String, schema: String, found: Box<str> },
    #[error(
        "the node config's [datasets.columns] maps '{key}', which schema '{schema}' has no column of; its columns are: {known}"
    )]
    UnknownMapping { key: String, schema: String, known: String },
    #[error("{path}: the header names column {column} the same as an earlier column; give every column its own name")]
    DuplicateColumn { path: PathBuf, column: usize },
    #[error(
        "{path}: schema columns '{first}' and '{second}' would both be read from one column of the table; fix [datasets.columns] so each schema column has its own"
    )]
    MappedTwice { path: PathBuf, first: String, second: String },
    /// `column` is the file's column, 1-based; `name` the schema's name for it.
    #[error("{path} {position}, column {column} ({name}): {problem}")]
    Cell { path: PathBuf, position: Position, column: usize, name: String, problem: Box<CellProblem> },
    #[error(
        "{path} {position}, column {column} ({name}): the Parquet column holds {found}, but schema column '{name}' is {expected}; export the table with the schema's types"
    )]
    ParquetType {
        path: PathBuf,
        position: Position,
        column: usize,
        name: String,
        expected: &'static str,
        found: &'static str,
    },
    #[error(
        "{path}: the {split} split is empty ({rows} rows kept); the schema's split needs rows in both train and test"
    )]
    EmptySplit { path: PathBuf, split: &'static str, rows: u64 },
}

impl DataError {
    /// The refusal reason for the lead: the rule broken, the file's name (not its path), the
    /// position and the schema's column name. Never a cell value nor a header the schema does not
    /// name: those can be patient data, and the full message is in the node's log. With `lines`
    /// false (the policy withholds dataset sizes) not the position either: a line number is a
    /// lower bound on the number of rows.
    pub fn public_reason(&self, lines: bool) -> String {
        const SEE_LOG: &str = "the hospital's node log has the detail";
        let at = |p: &Position| if lines { p.to_string() } else { "a row".to_string() };
        match self {
            DataError::Table(e) => e.public_reason(lines),
            DataError::MissingColumn { path, column, schema, .. } => format!(
                "rule schema-columns: '{}' has no column for '{column}', which schema '{schema}' requires; {SEE_LOG}",
                file_name(path)
            ),
            DataError::DuplicateColumn { path, column } => format!(
                "rule header-unique: '{}' names column {column} like an earlier one; {SEE_LOG}",
                file_name(path)
            ),
            DataError::MappedTwice { path, first, second } => format!(
                "rule column-mapping: '{}': schema columns '{first}' and '{second}' map to one column of the table; the hospital should fix [datasets.columns]",
                file_name(path)
            ),
            DataError::UnknownMapping { key, schema, .. } => format!(
                "rule column-mapping: the node config maps '{key}', which schema '{schema}' has no column of; the hospital should fix [datasets.columns]"
            ),
            DataError::Cell { path, position, column, name, problem } => format!(
                "rule {}: '{}' {}, column {column} ({name}): {}; {SEE_LOG}",
                problem.rule(),
                file_name(path),
                at(position),
                problem.public()
            ),
            DataError::ParquetType { path, position, column, name, expected, found } => format!(
                "rule parquet-column-types: '{}' {}, column {column} ({name}): the Parquet column holds {found}, the schema's column is {expected}; {SEE_LOG}",
                file_name(path),
                at(position)
            ),
            DataError::EmptySplit { path, split, .. } => {
                format!("rule splits-non-empty: '{}' has no {split} row; {SEE_LOG}", file_name(path))
            }
        }
    }
}

impl DataError {
    /// The wording for the data steward at `sanctum-node data check`: the full path, the
    /// position, the column and what to do, still never a cell value (the output may be pasted
    /// into a ticket). Only a cell problem's own `Display` shows the value, so a cell problem is
    /// worded as for the lead; every other error's `Display` holds no cell value.
    pub fn steward_reason(&self) -> String {
        match self {
            DataError::Cell { path, position, column, name, problem } => format!(
                "{} {position}, column {column} ({name}): {} (rule {}); fix the cell, or change the column's `missing` policy or bounds in the schema if the consortium agrees",
                path.display(),
                problem.public(),
                problem.rule()
            ),
            other => other.to_string(),
        }
    }
}

/// The last component of `path`: a data file's directory can name a project or a person.
fn file_name(path: &Path) -> String {
    path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default()
}
