//! Streams a hospital's table, CSV or Parquet, one row at a time, so a table larger than memory
//! can be checked: a CSV reuses one record buffer, a Parquet file is read a row group at a time in
//! batches of a few hundred thousand cells, never the whole file. This module only reads; what a
//! cell means (a missing-value token, a number, a level) is decided by [`crate::data`] against the
//! schema.
//!
//! Errors come in two forms, as in [`crate::data`]: `Display` is the full detail for the node's
//! own log (path, column name, the reader's message), [`TableError::public_reason`] what may be
//! sent to the lead: the rule, the file's name (not its directory), the line or row group and the
//! column's index, never a cell value nor a header (a badly made file can have patient data in
//! its header).
//!
//! Layout: this file holds what both formats share (the [`Row`] a reader lends, [`Position`],
//! [`RawCell`], [`TableError`] and [`TableReader`], which opens either); `csv_reader` and
//! `parquet_reader` hold the two sources.

use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use csv_reader::CsvSource;
use parquet_reader::{ParquetColumn, ParquetSource};

mod csv_reader;
mod parquet_reader;

/// A table's file format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Csv,
    Parquet,
}

impl Format {
    /// The format named by `path`'s extension (case-insensitive): `.csv`, `.parquet` or `.pq`.
    pub fn from_extension(path: &Path) -> Result<Format, TableError> {
        let ext = path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase());
        match ext.as_deref() {
            Some("csv") => Ok(Format::Csv),
            Some("parquet" | "pq") => Ok(Format::Parquet),
            _ => Err(TableError::UnknownFormat { path: path.to_path_buf() }),
        }
    }

    /// `explicit` when set (the node config's setting), otherwise the extension's.
    pub fn resolve(path: &Path, explicit: Option<Format>) -> Result<Format, TableError> {
        explicit.map_or_else(|| Format::from_extension(path), Ok)
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Csv => "csv",
            Format::Parquet => "parquet",
        })
    }
}

/// A `--format` (or `format =`) value that names no table format.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown table format '{0}': use csv or parquet")]
pub struct UnknownFormatName(pub String);

impl FromStr for Format {
    type Err = UnknownFormatName;
    fn from_str(s: &str) -> Result<Format, UnknownFormatName> {
        match s.to_ascii_lowercase().as_str() {
            "csv" => Ok(Format::Csv),
            "parquet" | "pq" => Ok(Format::Parquet),
            _ => Err(UnknownFormatName(s.to_string())),
        }
    }
}

/// Where a row is in its file, for error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Position {
    /// `line` is the 1-based physical line the record starts on (the header is line 1; a quoted
    /// field spanning lines moves the next record's line on), as the csv crate counts it.
    /// `row` is the 0-based data row number (the header is not a row).
    Csv { line: u64, row: u64 },
    /// `row_group` is 0-based, `row_in_group` 0-based within it, `row` 0-based over the file.
    Parquet { row_group: usize, row_in_group: u64, row: u64 },
}

impl Position {
    /// The 0-based data row number over the whole file, whichever the format.
    pub fn row(&self) -> u64 {
        match *self {
            Position::Csv { row, .. } | Position::Parquet { row, .. } => row,
        }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Position::Csv { line, .. } => write!(f, "line {line}"),
            Position::Parquet { row_group, row_in_group, .. } => write!(f, "row group {row_group}, row {row_in_group}"),
        }
    }
}

/// One cell as the file holds it. A CSV cell is always [`RawCell::Text`] (trimmed; an empty field
/// is `Text("")`: whether it means missing is the schema's call); a Parquet null is
/// [`RawCell::Missing`], other Parquet cells carry their column's type.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RawCell<'a> {
    Missing,
    Text(&'a str),
    Float(f64),
    Int(i64),
    Bool(bool),
}

/// One row, borrowed from the reader until the next call to [`TableReader::next_row`].
#[derive(Debug)]
pub struct Row<'a> {
    position: Position,
    cells: Cells<'a>,
}

#[derive(Debug)]
enum Cells<'a> {
    Csv(&'a csv::StringRecord),
    Parquet { columns: &'a [ParquetColumn], index: usize },
}

impl<'a> Row<'a> {
    pub fn position(&self) -> Position {
        self.position
    }

    /// The number of cells, equal to the header's length.
    pub fn len(&self) -> usize {
        match &self.cells {
            Cells::Csv(record) => record.len(),
            Cells::Parquet { columns, .. } => columns.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The cell in column `column` (0-based, the header's order); `None` past the last column.
    pub fn cell(&self, column: usize) -> Option<RawCell<'a>> {
        match self.cells {
            Cells::Csv(record) => record.get(column).map(RawCell::Text),
            Cells::Parquet { columns, index } => columns.get(column).map(|c| c.cell(index)),
        }
    }

    /// Every cell in the header's order.
    pub fn cells(&self) -> impl Iterator<Item = RawCell<'a>> + '_ {
        (0..self.len()).filter_map(|c| self.cell(c))
    }
}

/// Why a table cannot be read. `Display` is the full detail for the node's log;
/// [`TableError::public_reason`] is what may be sent to the lead.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("cannot read table {path}: {source}; check datasets.path in the node config")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(
        "{path}: cannot tell the table's format from its name; name it .csv, .parquet or .pq, or set the dataset's format in the node config"
    )]
    UnknownFormat { path: PathBuf },
    #[error("{path} is empty: {what}; export the table again with its header")]
    Empty { path: PathBuf, what: EmptyTable },
    /// `column` is 0-based, when the csv crate knows it.
    #[error("{path} line {line}: not UTF-8 text{}; save the table as UTF-8", column.map(|c| format!(" in column {c}")).unwrap_or_default())]
    CsvNotUtf8 { path: PathBuf, line: u64, column: Option<usize> },
    #[error("{path} line {line}: {found} fields where the header has {expected}; fix the row's quoting or separators")]
    FieldCount { path: PathBuf, line: u64, expected: u64, found: u64 },
    #[error("{path} line {line}: cannot read the CSV: {detail}")]
    Csv { path: PathBuf, line: u64, detail: String },
    /// `row_group` when the damage is inside one (the footer read, `None` otherwise).
    #[error("{path}{}: not a readable Parquet file: {detail}; export the table again", row_group.map(|g| format!(" row group {g}")).unwrap_or_default())]
    Parquet { path: PathBuf, row_group: Option<usize>, detail: String },
    /// `column` is 0-based; `name` is the file's column name (local log only).
    #[error(
        "{path}: column {column} ('{name}') has Parquet type {ty}, which Sanctum does not read; store it as boolean, integer, float, double or string"
    )]
    UnsupportedColumn { path: PathBuf, column: usize, name: String, ty: String },
    #[error(
        "{path} row group {row_group}, row {row_in_group}, column {column}: string is not UTF-8; export the table again"
    )]
    ParquetNotUtf8 { path: PathBuf, row_group: usize, row_in_group: u64, column: usize },
    #[error(
        "{path} row group {row_group}, row {row_in_group}, column {column}: a text cell longer than {max} bytes (or too much text in one batch); a table's cells are values, export it again without such a column"
    )]
    CellTooLarge { path: PathBuf, row_group: usize, row_in_group: u64, column: usize, max: usize },
}

/// What an empty table lacks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmptyTable {
    /// A zero-byte file.
    NoBytes,
    /// A CSV without a header line.
    NoHeader,
    /// A header or Parquet schema with no column.
    NoColumns,
}

impl fmt::Display for EmptyTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EmptyTable::NoBytes => "the file has no bytes",
            EmptyTable::NoHeader => "the file has no header line",
            EmptyTable::NoColumns => "the table has no columns",
        })
    }
}

impl TableError {
    /// The file this error is about.
    pub fn path(&self) -> &Path {
        match self {
            TableError::Io { path, .. }
            | TableError::UnknownFormat { path }
            | TableError::Empty { path, .. }
            | TableError::CsvNotUtf8 { path, .. }
            | TableError::FieldCount { path, .. }
            | TableError::Csv { path, .. }
            | TableError::Parquet { path, .. }
            | TableError::UnsupportedColumn { path, .. }
            | TableError::ParquetNotUtf8 { path, .. }
            | TableError::CellTooLarge { path, .. } => path,
        }
    }

    /// The refusal reason for the lead: the rule broken, the file's name (not its path), the
    /// line or row group and the column's index, never a cell value, a column name nor the
    /// reader's own message (which may quote either). With `positions` false (the policy
    /// withholds dataset sizes) no line, row group or row either: each is a lower bound on the
    /// number of rows.
    pub fn public_reason(&self, positions: bool) -> String {
        const SEE_LOG: &str = "the hospital's node log has the detail";
        let name = file_name(self.path());
        let line = |line: &u64| if positions { format!("line {line}") } else { "a row".to_string() };
        match self {
            TableError::Io { source, .. } => format!(
                "rule data-file-readable: data file '{name}' cannot be read ({}); the hospital should check datasets.path in its node config",
                source.kind()
            ),
            TableError::UnknownFormat { .. } => {
                format!("rule table-format: '{name}' is neither .csv nor .parquet and no format is set; {SEE_LOG}")
            }
            TableError::Empty { what, .. } => format!("rule table-not-empty: '{name}': {what}; {SEE_LOG}"),
            TableError::CsvNotUtf8 { line: l, column, .. } => format!(
                "rule csv-utf8: '{name}' {}{}: not UTF-8 text; {SEE_LOG}",
                line(l),
                column.map(|c| format!(", column {c}")).unwrap_or_default()
            ),
            TableError::FieldCount { line: l, expected, found, .. } => format!(
                "rule csv-field-count: '{name}' {}: the row has {found} fields, the header has {expected}; {SEE_LOG}",
                line(l)
            ),
            TableError::Csv { line: l, .. } => {
                format!("rule csv-well-formed: '{name}' {}: the row cannot be read as CSV; {SEE_LOG}", line(l))
            }
            TableError::Parquet { row_group, .. } => {
                let at = match row_group {
                    Some(g) if positions => format!(" row group {g}"),
                    Some(_) => " a row group".to_string(),
                    None => String::new(),
                };
                format!("rule parquet-readable: '{name}'{at} is not a readable Parquet file; {SEE_LOG}")
            }
            TableError::UnsupportedColumn { column, ty, .. } => format!(
                "rule parquet-column-types: '{name}' column {column} has Parquet type {ty}, which Sanctum does not read; {SEE_LOG}"
            ),
            TableError::CellTooLarge { row_group, row_in_group, column, max, .. } => {
                let at = if positions { format!("row group {row_group}, row {row_in_group}") } else { "a row".into() };
                format!(
                    "rule cell-size: '{name}' {at}, column {column}: a text cell longer than {max} bytes; {SEE_LOG}"
                )
            }
            TableError::ParquetNotUtf8 { row_group, row_in_group, column, .. } => {
                let at = if positions { format!("row group {row_group}, row {row_in_group}") } else { "a row".into() };
                format!("rule parquet-utf8: '{name}' {at}, column {column}: a string is not UTF-8; {SEE_LOG}")
            }
        }
    }
}

/// The last component of `path`: a data file's directory can name a project or a person.
fn file_name(path: &Path) -> String {
    path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default()
}

/// A table opened for streaming. After an error, [`TableReader::next_row`] returns `None`: the
/// first problem is the one reported.
pub struct TableReader {
    path: PathBuf,
    format: Format,
    header: Vec<String>,
    source: Source,
    /// Set after an error or the last row, so the reader is fused.
    done: bool,
}

// The Parquet source holds a boxed file reader without `Debug`.
impl fmt::Debug for TableReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TableReader")
            .field("path", &self.path)
            .field("format", &self.format)
            .field("columns", &self.header.len())
            .finish_non_exhaustive()
    }
}

enum Source {
    Csv(CsvSource),
    Parquet(Box<ParquetSource>),
}

impl TableReader {
    /// Opens `path` as `format`, or as its extension says when `format` is `None`, and reads its
    /// header (a CSV's first line, a Parquet file's schema, whose every column is checked to be
    /// of a type this reader can return).
    pub fn open(path: &Path, format: Option<Format>) -> Result<TableReader, TableError> {
        let format = Format::resolve(path, format)?;
        let io = |source| TableError::Io { path: path.to_path_buf(), source };
        let file = File::open(path).map_err(io)?;
        if file.metadata().map_err(io)?.len() == 0 {
            return Err(TableError::Empty { path: path.to_path_buf(), what: EmptyTable::NoBytes });
        }
        let (header, source) = match format {
            Format::Csv => {
                let (header, source) = CsvSource::open(path, file)?;
                (header, Source::Csv(source))
            }
            Format::Parquet => {
                let (header, source) = ParquetSource::open(path, file)?;
                (header, Source::Parquet(Box::new(source)))
            }
        };
        if header.is_empty() {
            return Err(TableError::Empty { path: path.to_path_buf(), what: EmptyTable::NoColumns });
        }
        Ok(TableReader { path: path.to_path_buf(), format, header, source, done: false })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// The column names as the file has them (untrimmed for Parquet, trimmed for CSV).
    pub fn header(&self) -> &[String] {
        &self.header
    }

    /// The next row, `None` after the last one or after an error. Not an `Iterator`: the row
    /// borrows the reader's buffers until the next call (a lending iterator).
    pub fn next_row(&mut self) -> Option<Result<Row<'_>, TableError>> {
        if self.done {
            return None;
        }
        let next = match &mut self.source {
            Source::Csv(csv) => csv.advance(&self.path),
            Source::Parquet(pq) => pq.advance(&self.path),
        };
        let position = match next {
            Ok(Some(position)) => position,
            Ok(None) => {
                self.done = true;
                return None;
            }
            Err(e) => {
                self.done = true;
                return Some(Err(e));
            }
        };
        let cells = match &self.source {
            Source::Csv(csv) => Cells::Csv(csv.record()),
            Source::Parquet(pq) => {
                let (columns, index) = pq.current();
                Cells::Parquet { columns, index }
            }
        };
        Some(Ok(Row { position, cells }))
    }
}

#[cfg(test)]
mod tests;
