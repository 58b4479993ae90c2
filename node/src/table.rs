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

use std::fmt;
use std::fs::File;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use parquet::basic::{ConvertedType, LogicalType, Repetition, Type as PhysicalType};
use parquet::column::reader::{ColumnReader, ColumnReaderImpl};
use parquet::data_type::{BoolType, ByteArray, ByteArrayType, DoubleType, FloatType, Int32Type, Int64Type};
use parquet::errors::ParquetError;
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::schema::types::Type as SchemaType;

/// How many cells one Parquet batch holds across all columns (the rows per batch follow from
/// the width): bounds the reader's memory besides the column chunks' current pages.
const BATCH_CELLS: usize = 1 << 18;
/// The longest text cell a Parquet file may hold (1 MiB): a table's cells are values, not
/// documents.
const MAX_CELL_BYTES: usize = 1 << 20;
/// The most text one Parquet batch may hold across its rows (64 MiB).
const MAX_BATCH_TEXT_BYTES: usize = 64 << 20;
/// The most rows one Parquet batch holds, however narrow the table.
const MAX_BATCH_ROWS: usize = 1024;

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

impl FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Format, String> {
        match s.to_ascii_lowercase().as_str() {
            "csv" => Ok(Format::Csv),
            "parquet" | "pq" => Ok(Format::Parquet),
            _ => Err(format!("unknown table format '{s}': use csv or parquet")),
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
            Source::Csv(csv) => Cells::Csv(&csv.record),
            Source::Parquet(pq) => Cells::Parquet { columns: &pq.columns, index: pq.batch_pos - 1 },
        };
        Some(Ok(Row { position, cells }))
    }
}

/// A CSV read into one reused record.
struct CsvSource {
    reader: csv::Reader<File>,
    /// The current row's fields, overwritten by each read (no allocation per row once grown).
    record: csv::StringRecord,
    /// Data rows read so far.
    rows: u64,
}

impl CsvSource {
    fn open(path: &Path, file: File) -> Result<(Vec<String>, CsvSource), TableError> {
        // Trimmed as a spreadsheet's export pads cells; csv's reader buffers the file itself.
        let mut reader = csv::ReaderBuilder::new().has_headers(true).trim(csv::Trim::All).from_reader(file);
        let header: Vec<String> = match reader.headers() {
            Ok(h) => h.iter().map(str::to_owned).collect(),
            Err(e) => return Err(csv_error(path, &e, 1)),
        };
        if header.is_empty() {
            return Err(TableError::Empty { path: path.to_path_buf(), what: EmptyTable::NoHeader });
        }
        Ok((header, CsvSource { reader, record: csv::StringRecord::new(), rows: 0 }))
    }

    fn advance(&mut self, path: &Path) -> Result<Option<Position>, TableError> {
        match self.reader.read_record(&mut self.record) {
            Ok(true) => {
                let line = self.record.position().map_or(0, |p| p.line());
                let row = self.rows;
                self.rows += 1;
                Ok(Some(Position::Csv { line, row }))
            }
            Ok(false) => Ok(None),
            Err(e) => Err(csv_error(path, &e, 0)),
        }
    }
}

/// `line` when the csv crate's error has no position (its header errors may not).
fn csv_error(path: &Path, e: &csv::Error, line: u64) -> TableError {
    let path = path.to_path_buf();
    let line_of = |pos: Option<&csv::Position>| pos.map_or(line, |p| p.line());
    match e.kind() {
        csv::ErrorKind::Io(io) => TableError::Io { path, source: std::io::Error::new(io.kind(), io.to_string()) },
        csv::ErrorKind::Utf8 { pos, err } => {
            TableError::CsvNotUtf8 { path, line: line_of(pos.as_ref()), column: Some(err.field()) }
        }
        csv::ErrorKind::UnequalLengths { pos, expected_len, len } => {
            TableError::FieldCount { path, line: line_of(pos.as_ref()), expected: *expected_len, found: *len }
        }
        _ => TableError::Csv { path, line: line_of(e.position()), detail: e.to_string() },
    }
}

/// A Parquet file read one row group at a time, each in batches of rows across every column.
struct ParquetSource {
    file: SerializedFileReader<File>,
    /// One per top-level column, in the schema's order (all primitive: checked at open).
    columns: Vec<ParquetColumn>,
    /// Rows per batch, from [`BATCH_CELLS`] and the width.
    batch_rows: usize,
    /// The next row group to open.
    next_group: usize,
    /// The row group being read.
    group: usize,
    /// Rows of the current row group not yet in a batch.
    group_rows_left: u64,
    /// The next row's index within its row group, and over the file.
    row_in_group: u64,
    row: u64,
    /// Rows in the current batch, and how many of them were handed out.
    batch_len: usize,
    batch_pos: usize,
}

impl ParquetSource {
    fn open(path: &Path, file: File) -> Result<(Vec<String>, ParquetSource), TableError> {
        let file = guarded(path, None, || SerializedFileReader::new(file))?;
        let schema = file.metadata().file_metadata().schema_descr();
        let mut header = Vec::new();
        let mut columns = Vec::new();
        for (column, field) in schema.root_schema().get_fields().iter().enumerate() {
            let kind = column_kind(field).map_err(|ty| TableError::UnsupportedColumn {
                path: path.to_path_buf(),
                column,
                name: field.name().to_string(),
                ty,
            })?;
            header.push(field.name().to_string());
            // Every field so far is a primitive, so field `column` is leaf `column`.
            columns.push(ParquetColumn::new(kind, schema.column(column).max_def_level()));
        }
        if columns.is_empty() {
            return Err(TableError::Empty { path: path.to_path_buf(), what: EmptyTable::NoColumns });
        }
        let batch_rows = (BATCH_CELLS / columns.len()).clamp(1, MAX_BATCH_ROWS);
        let source = ParquetSource {
            file,
            columns,
            batch_rows,
            next_group: 0,
            group: 0,
            group_rows_left: 0,
            row_in_group: 0,
            row: 0,
            batch_len: 0,
            batch_pos: 0,
        };
        Ok((header, source))
    }

    fn advance(&mut self, path: &Path) -> Result<Option<Position>, TableError> {
        while self.batch_pos == self.batch_len {
            if self.group_rows_left == 0 && !self.open_next_group(path)? {
                return Ok(None);
            }
            let n = self.group_rows_left.min(self.batch_rows as u64) as usize;
            let (group, first) = (self.group, self.row_in_group);
            for (index, column) in self.columns.iter_mut().enumerate() {
                column.fill(path, group, first, index, n)?;
            }
            self.group_rows_left -= n as u64;
            self.batch_len = n;
            self.batch_pos = 0;
        }
        let position = Position::Parquet { row_group: self.group, row_in_group: self.row_in_group, row: self.row };
        self.batch_pos += 1;
        self.row_in_group += 1;
        self.row += 1;
        Ok(Some(position))
    }

    /// Opens the next row group with rows; false after the last one.
    fn open_next_group(&mut self, path: &Path) -> Result<bool, TableError> {
        while self.next_group < self.file.num_row_groups() {
            let group = self.next_group;
            self.next_group += 1;
            let rows = self.file.metadata().row_group(group).num_rows();
            let rows = u64::try_from(rows).map_err(|_| TableError::Parquet {
                path: path.to_path_buf(),
                row_group: Some(group),
                detail: format!("the row group claims {rows} rows"),
            })?;
            if rows == 0 {
                continue;
            }
            let reader = guarded(path, Some(group), || self.file.get_row_group(group))?;
            for (index, column) in self.columns.iter_mut().enumerate() {
                let chunk = guarded(path, Some(group), || reader.get_column_reader(index))?;
                column.reader = Some(TypedReader::of(chunk, column.kind).ok_or_else(|| TableError::Parquet {
                    path: path.to_path_buf(),
                    row_group: Some(group),
                    detail: format!("column {index}'s chunk is not of the schema's type"),
                })?);
            }
            self.group = group;
            self.group_rows_left = rows;
            self.row_in_group = 0;
            return Ok(true);
        }
        Ok(false)
    }
}

/// Runs a call into the parquet crate, turning its error, or a panic on a malformed file (the
/// crate asserts some invariants that a corrupt file can break), into a [`TableError`]: a bad
/// table must not take the node down with it.
fn guarded<T>(
    path: &Path,
    row_group: Option<usize>,
    call: impl FnOnce() -> Result<T, ParquetError>,
) -> Result<T, TableError> {
    let detail = match catch_unwind(AssertUnwindSafe(call)) {
        Ok(Ok(value)) => return Ok(value),
        Ok(Err(e)) => e.to_string(),
        Err(_) => "the Parquet reader failed on malformed data".to_string(),
    };
    Err(TableError::Parquet { path: path.to_path_buf(), row_group, detail })
}

/// What a Parquet column's cells become.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Bool,
    /// `unsigned`: UINT_8/16/32 stored in INT32's bits.
    Int32 {
        unsigned: bool,
    },
    Int64,
    Float,
    Double,
    Text,
}

/// The kind of a top-level field, or the description of a type this reader refuses (for the
/// error): nested, repeated, binary, timestamps, dates, decimals, INT96, fixed-length arrays,
/// unsigned 64-bit integers (which do not fit an i64).
fn column_kind(field: &SchemaType) -> Result<Kind, String> {
    if field.is_group() {
        return Err("group (nested)".to_string());
    }
    let info = field.get_basic_info();
    let physical = field.get_physical_type();
    if info.has_repetition() && info.repetition() == Repetition::REPEATED {
        return Err(format!("repeated {physical:?} (a list)"));
    }
    let logical = info.logical_type_ref();
    let converted = info.converted_type();
    let kind = match (physical, logical) {
        (PhysicalType::BOOLEAN, None) => Some(Kind::Bool),
        (PhysicalType::INT32, None) => match converted {
            ConvertedType::NONE | ConvertedType::INT_8 | ConvertedType::INT_16 | ConvertedType::INT_32 => {
                Some(Kind::Int32 { unsigned: false })
            }
            ConvertedType::UINT_8 | ConvertedType::UINT_16 | ConvertedType::UINT_32 => {
                Some(Kind::Int32 { unsigned: true })
            }
            _ => None,
        },
        (PhysicalType::INT32, Some(LogicalType::Integer(int))) => Some(Kind::Int32 { unsigned: !int.is_signed }),
        (PhysicalType::INT64, None) => match converted {
            ConvertedType::NONE | ConvertedType::INT_64 => Some(Kind::Int64),
            _ => None,
        },
        (PhysicalType::INT64, Some(LogicalType::Integer(int))) if int.is_signed || int.bit_width < 64 => {
            Some(Kind::Int64)
        }
        (PhysicalType::FLOAT, None) => Some(Kind::Float),
        (PhysicalType::DOUBLE, None) => Some(Kind::Double),
        (PhysicalType::BYTE_ARRAY, Some(LogicalType::String | LogicalType::Enum)) => Some(Kind::Text),
        (PhysicalType::BYTE_ARRAY, None) if matches!(converted, ConvertedType::UTF8 | ConvertedType::ENUM) => {
            Some(Kind::Text)
        }
        _ => None,
    };
    kind.ok_or_else(|| match (logical, converted) {
        (Some(LogicalType::Integer(int)), _) => {
            format!("{physical:?} (INTEGER({}, {}))", int.bit_width, if int.is_signed { "signed" } else { "unsigned" })
        }
        // The variant's name (TIMESTAMP, DECIMAL, …) says enough; its parameters are noise here.
        (Some(logical), _) => {
            let name = format!("{logical:?}");
            format!("{physical:?} ({})", name.split(['(', ' ', '{']).next().unwrap_or_default().to_uppercase())
        }
        (None, ConvertedType::NONE) => format!("{physical:?}"),
        (None, converted) => format!("{physical:?} ({converted:?})"),
    })
}

/// A column chunk's reader, typed by the column's [`Kind`].
enum TypedReader {
    Bool(ColumnReaderImpl<BoolType>),
    Int32(ColumnReaderImpl<Int32Type>),
    Int64(ColumnReaderImpl<Int64Type>),
    Float(ColumnReaderImpl<FloatType>),
    Double(ColumnReaderImpl<DoubleType>),
    Text(ColumnReaderImpl<ByteArrayType>),
}

impl TypedReader {
    fn of(reader: ColumnReader, kind: Kind) -> Option<TypedReader> {
        Some(match (reader, kind) {
            (ColumnReader::BoolColumnReader(r), Kind::Bool) => TypedReader::Bool(r),
            (ColumnReader::Int32ColumnReader(r), Kind::Int32 { .. }) => TypedReader::Int32(r),
            (ColumnReader::Int64ColumnReader(r), Kind::Int64) => TypedReader::Int64(r),
            (ColumnReader::FloatColumnReader(r), Kind::Float) => TypedReader::Float(r),
            (ColumnReader::DoubleColumnReader(r), Kind::Double) => TypedReader::Double(r),
            (ColumnReader::ByteArrayColumnReader(r), Kind::Text) => TypedReader::Text(r),
            _ => return None,
        })
    }
}

/// One batch of one column's values: only the non-null ones, in order (as Parquet stores them).
#[derive(Default)]
struct Values {
    bools: Vec<bool>,
    int32: Vec<i32>,
    int64: Vec<i64>,
    float: Vec<f32>,
    double: Vec<f64>,
    bytes: Vec<ByteArray>,
    /// The batch's strings, checked UTF-8, end to end; `ends[k]` is where string `k` ends.
    text: String,
    ends: Vec<usize>,
}

/// One column's reader and its current batch, every buffer reused from batch to batch.
struct ParquetColumn {
    kind: Kind,
    /// 0 for a REQUIRED column (no nulls), 1 for an OPTIONAL one.
    max_def: i16,
    reader: Option<TypedReader>,
    def: Vec<i16>,
    /// Per row of the batch: the index of its value in `values`, or [`NULL_SLOT`].
    slots: Vec<u32>,
    values: Values,
}

const NULL_SLOT: u32 = u32::MAX;

impl fmt::Debug for ParquetColumn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ParquetColumn").field("kind", &self.kind).field("rows", &self.slots.len()).finish()
    }
}

impl ParquetColumn {
    fn new(kind: Kind, max_def: i16) -> ParquetColumn {
        ParquetColumn { kind, max_def, reader: None, def: Vec::new(), slots: Vec::new(), values: Values::default() }
    }

    /// Reads the next `n` rows of the column chunk; `first` is the first one's index in
    /// `group`, `index` the column's (both for errors).
    fn fill(&mut self, path: &Path, group: usize, first: u64, index: usize, n: usize) -> Result<(), TableError> {
        let corrupt = |detail: String| TableError::Parquet { path: path.to_path_buf(), row_group: Some(group), detail };
        self.def.clear();
        self.slots.clear();
        let (def, v) = (&mut self.def, &mut self.values);
        let (read, values) = match &mut self.reader {
            Some(TypedReader::Bool(r)) => {
                (guarded(path, Some(group), || read_rows(r, n, def, &mut v.bools))?, v.bools.len())
            }
            Some(TypedReader::Int32(r)) => {
                (guarded(path, Some(group), || read_rows(r, n, def, &mut v.int32))?, v.int32.len())
            }
            Some(TypedReader::Int64(r)) => {
                (guarded(path, Some(group), || read_rows(r, n, def, &mut v.int64))?, v.int64.len())
            }
            Some(TypedReader::Float(r)) => {
                (guarded(path, Some(group), || read_rows(r, n, def, &mut v.float))?, v.float.len())
            }
            Some(TypedReader::Double(r)) => {
                (guarded(path, Some(group), || read_rows(r, n, def, &mut v.double))?, v.double.len())
            }
            Some(TypedReader::Text(r)) => {
                (guarded(path, Some(group), || read_rows(r, n, def, &mut v.bytes))?, v.bytes.len())
            }
            None => return Err(corrupt(format!("column {index} has no chunk in this row group"))),
        };
        if read != n {
            return Err(corrupt(format!("column {index}'s chunk ends after {read} of the row group's rows")));
        }
        if self.max_def == 0 {
            // u32 is enough: a batch holds at most MAX_BATCH_ROWS rows.
            self.slots.extend((0..n).map(|i| i as u32));
        } else {
            let mut next = 0u32;
            for &d in &self.def {
                if d == self.max_def {
                    self.slots.push(next);
                    next += 1;
                } else {
                    self.slots.push(NULL_SLOT);
                }
            }
        }
        let present = self.slots.iter().filter(|&&s| s != NULL_SLOT).count();
        if self.slots.len() != n || present != values {
            return Err(corrupt(format!("column {index}'s levels and values disagree")));
        }
        if self.kind == Kind::Text {
            let v = &mut self.values;
            v.text.clear();
            v.ends.clear();
            for (k, bytes) in v.bytes.iter().enumerate() {
                let Ok(s) = std::str::from_utf8(bytes.data()) else {
                    let row = self.slots.iter().position(|&s| s as usize == k).unwrap_or(0) as u64;
                    return Err(TableError::ParquetNotUtf8 {
                        path: path.to_path_buf(),
                        row_group: group,
                        row_in_group: first + row,
                        column: index,
                    });
                };
                // A dictionary can hand one huge string to every row: bounded per cell and per
                // batch, so a small file cannot make the node allocate gigabytes.
                if s.len() > MAX_CELL_BYTES || v.text.len() + s.len() > MAX_BATCH_TEXT_BYTES {
                    let row = self.slots.iter().position(|&s| s as usize == k).unwrap_or(0) as u64;
                    return Err(TableError::CellTooLarge {
                        path: path.to_path_buf(),
                        row_group: group,
                        row_in_group: first + row,
                        column: index,
                        max: MAX_CELL_BYTES,
                    });
                }
                v.text.push_str(s);
                v.ends.push(v.text.len());
            }
        }
        Ok(())
    }

    /// Row `index` of the current batch.
    fn cell(&self, index: usize) -> RawCell<'_> {
        let Some(&slot) = self.slots.get(index) else { return RawCell::Missing };
        if slot == NULL_SLOT {
            return RawCell::Missing;
        }
        let k = slot as usize;
        let v = &self.values;
        let cell = match self.kind {
            Kind::Bool => v.bools.get(k).map(|&b| RawCell::Bool(b)),
            Kind::Int32 { unsigned: false } => v.int32.get(k).map(|&i| RawCell::Int(i64::from(i))),
            // An unsigned column keeps its bits in an i32: reinterpret, do not sign-extend.
            Kind::Int32 { unsigned: true } => v.int32.get(k).map(|&i| RawCell::Int(i64::from(i as u32))),
            Kind::Int64 => v.int64.get(k).map(|&i| RawCell::Int(i)),
            Kind::Float => v.float.get(k).map(|&x| RawCell::Float(f64::from(x))),
            Kind::Double => v.double.get(k).map(|&x| RawCell::Float(x)),
            Kind::Text => {
                let start = if k == 0 { 0 } else { v.ends.get(k - 1).copied().unwrap_or(0) };
                v.ends.get(k).and_then(|&end| v.text.get(start..end)).map(RawCell::Text)
            }
        };
        cell.unwrap_or(RawCell::Missing)
    }
}

/// Reads `n` rows (records) of a flat column, or fewer at the chunk's end.
fn read_rows<T: parquet::data_type::DataType>(
    reader: &mut ColumnReaderImpl<T>,
    n: usize,
    def: &mut Vec<i16>,
    values: &mut Vec<T::T>,
) -> Result<usize, ParquetError> {
    values.clear();
    let mut read = 0;
    while read < n {
        let (records, _, _) = reader.read_records(n - read, Some(def), None, values)?;
        if records == 0 {
            break;
        }
        read += records;
    }
    Ok(read)
}

#[cfg(test)]
mod tests {
    use super::*;
    use parquet::basic::{Compression, Encoding};
    use parquet::data_type::DataType;
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::{SerializedColumnWriter, SerializedFileWriter};
    use parquet::schema::parser::parse_message_type;
    use std::sync::Arc;

    /// One column's values for the test writer; `None` is a null.
    enum Col {
        Bool(Vec<Option<bool>>),
        I32(Vec<Option<i32>>),
        I64(Vec<Option<i64>>),
        F32(Vec<Option<f32>>),
        F64(Vec<Option<f64>>),
        Str(Vec<Option<&'static str>>),
        Bytes(Vec<Option<Vec<u8>>>),
    }

    fn write_typed<T: DataType>(w: &mut SerializedColumnWriter<'_>, cells: &[Option<T::T>])
    where
        T::T: Clone,
    {
        let typed = w.typed::<T>();
        let values: Vec<T::T> = cells.iter().flatten().cloned().collect();
        let def: Vec<i16> = cells.iter().map(|c| i16::from(c.is_some())).collect();
        let optional = typed.get_descriptor().max_def_level() > 0;
        typed.write_batch(&values, optional.then_some(&def[..]), None).unwrap();
    }

    /// Writes `groups` (row groups, each one `Col` per schema column) to `path` as `schema`.
    fn write_parquet(path: &Path, schema: &str, groups: &[Vec<Col>], props: WriterProperties) {
        let schema = Arc::new(parse_message_type(schema).unwrap());
        let mut writer = SerializedFileWriter::new(File::create(path).unwrap(), schema, Arc::new(props)).unwrap();
        for group in groups {
            let mut rg = writer.next_row_group().unwrap();
            for col in group {
                let mut w = rg.next_column().unwrap().unwrap();
                match col {
                    Col::Bool(v) => write_typed::<BoolType>(&mut w, v),
                    Col::I32(v) => write_typed::<Int32Type>(&mut w, v),
                    Col::I64(v) => write_typed::<Int64Type>(&mut w, v),
                    Col::F32(v) => write_typed::<FloatType>(&mut w, v),
                    Col::F64(v) => write_typed::<DoubleType>(&mut w, v),
                    Col::Str(v) => {
                        let v: Vec<Option<ByteArray>> = v.iter().map(|s| s.map(ByteArray::from)).collect();
                        write_typed::<ByteArrayType>(&mut w, &v)
                    }
                    Col::Bytes(v) => {
                        let v: Vec<Option<ByteArray>> = v.iter().map(|s| s.clone().map(ByteArray::from)).collect();
                        write_typed::<ByteArrayType>(&mut w, &v)
                    }
                }
                w.close().unwrap();
            }
            rg.close().unwrap();
        }
        writer.close().unwrap();
    }

    fn plain() -> WriterProperties {
        WriterProperties::builder().build()
    }

    /// A cell as text, so a CSV and a Parquet table can be compared (a null reads as "").
    fn render(cell: RawCell<'_>) -> String {
        match cell {
            RawCell::Missing => String::new(),
            RawCell::Text(s) => s.to_string(),
            RawCell::Float(x) => x.to_string(),
            RawCell::Int(i) => i.to_string(),
            RawCell::Bool(b) => b.to_string(),
        }
    }

    /// A table's header and its rows as text, with their positions.
    type Rendered = (Vec<String>, Vec<(Position, Vec<String>)>);

    fn read_all(path: &Path) -> Result<Rendered, TableError> {
        let mut reader = TableReader::open(path, None)?;
        let header = reader.header().to_vec();
        let mut rows = Vec::new();
        while let Some(row) = reader.next_row() {
            let row = row?;
            assert_eq!(row.len(), header.len());
            rows.push((row.position(), row.cells().map(render).collect()));
        }
        Ok((header, rows))
    }

    fn raw_rows(path: &Path) -> Vec<Vec<OwnedCell>> {
        let mut reader = TableReader::open(path, None).unwrap();
        let mut rows = Vec::new();
        while let Some(row) = reader.next_row() {
            rows.push(row.unwrap().cells().map(OwnedCell::from).collect());
        }
        rows
    }

    #[derive(Debug, PartialEq)]
    enum OwnedCell {
        Missing,
        Text(String),
        Float(f64),
        Int(i64),
        Bool(bool),
    }

    impl From<RawCell<'_>> for OwnedCell {
        fn from(c: RawCell<'_>) -> OwnedCell {
            match c {
                RawCell::Missing => OwnedCell::Missing,
                RawCell::Text(s) => OwnedCell::Text(s.to_string()),
                RawCell::Float(x) => OwnedCell::Float(x),
                RawCell::Int(i) => OwnedCell::Int(i),
                RawCell::Bool(b) => OwnedCell::Bool(b),
            }
        }
    }

    fn error_of(path: &Path) -> TableError {
        match read_all(path) {
            Err(e) => e,
            Ok(rows) => panic!("{} read without error: {rows:?}", path.display()),
        }
    }

    const TABLE_SCHEMA: &str = "message t { OPTIONAL DOUBLE age; OPTIONAL INT64 sex; OPTIONAL BINARY cp (UTF8); OPTIONAL BOOLEAN smoker; REQUIRED INT32 n; }";

    fn table_groups() -> Vec<Vec<Col>> {
        vec![
            vec![
                Col::F64(vec![Some(63.5), None]),
                Col::I64(vec![Some(1), Some(0)]),
                Col::Str(vec![Some("typical"), Some("")]),
                Col::Bool(vec![Some(true), Some(false)]),
                Col::I32(vec![Some(-3), Some(7)]),
            ],
            vec![
                Col::F64(vec![Some(41.0)]),
                Col::I64(vec![None]),
                Col::Str(vec![None]),
                Col::Bool(vec![None]),
                Col::I32(vec![Some(0)]),
            ],
        ]
    }

    #[test]
    fn csv_and_parquet_give_the_same_rows() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("t.csv");
        std::fs::write(&csv, "age, sex ,cp,smoker,n\n 63.5 ,1,typical,true,-3\n,0,,false,7\n41,,,,0\n").unwrap();
        let pq = dir.path().join("t.parquet");
        write_parquet(&pq, TABLE_SCHEMA, &table_groups(), plain());
        let (csv_header, csv_rows) = read_all(&csv).unwrap();
        let (pq_header, pq_rows) = read_all(&pq).unwrap();
        assert_eq!(csv_header, ["age", "sex", "cp", "smoker", "n"]);
        assert_eq!(csv_header, pq_header);
        let cells = |rows: &[(Position, Vec<String>)]| rows.iter().map(|(_, c)| c.clone()).collect::<Vec<_>>();
        assert_eq!(cells(&csv_rows), cells(&pq_rows));
        assert_eq!(cells(&csv_rows)[0], ["63.5", "1", "typical", "true", "-3"]);
        let row_numbers = |rows: &[(Position, Vec<String>)]| rows.iter().map(|(p, _)| p.row()).collect::<Vec<_>>();
        assert_eq!(row_numbers(&csv_rows), [0, 1, 2]);
        assert_eq!(row_numbers(&pq_rows), [0, 1, 2]);
        // Typed as the file stores them: a CSV has only text, Parquet its columns' types.
        assert_eq!(
            raw_rows(&pq)[0],
            [
                OwnedCell::Float(63.5),
                OwnedCell::Int(1),
                OwnedCell::Text("typical".into()),
                OwnedCell::Bool(true),
                OwnedCell::Int(-3)
            ]
        );
        assert_eq!(raw_rows(&csv)[1][0], OwnedCell::Text(String::new()));
    }

    #[test]
    fn csv_positions_are_physical_lines_across_quoted_newlines() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("q.csv");
        std::fs::write(&csv, "a,b\n1,\"two\nlines\"\n2,x\n3,\"three\nmore\nlines\"\n4,y\n").unwrap();
        let (_, rows) = read_all(&csv).unwrap();
        let lines: Vec<u64> = rows
            .iter()
            .map(|(p, _)| match p {
                Position::Csv { line, .. } => *line,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(lines, [2, 4, 5, 8]);
        assert_eq!(rows[0].1, ["1", "two\nlines"]);
        assert_eq!(rows[3].0.to_string(), "line 8");
    }

    #[test]
    fn parquet_positions_name_row_group_and_row_across_groups_and_batches() {
        let dir = tempfile::tempdir().unwrap();
        let pq = dir.path().join("groups.parquet");
        // One narrow column: batches of MAX_BATCH_ROWS, so the 2,500-row group spans three.
        let sizes = [3usize, 2500, 0, 2];
        let mut next = 0i64;
        let groups: Vec<Vec<Col>> = sizes
            .iter()
            .map(|&n| {
                let v = (0..n)
                    .map(|_| {
                        next += 1;
                        Some(next - 1)
                    })
                    .collect();
                vec![Col::I64(v)]
            })
            .collect();
        write_parquet(&pq, "message g { REQUIRED INT64 id; }", &groups, plain());
        let (_, rows) = read_all(&pq).unwrap();
        assert_eq!(rows.len(), 2505);
        for (i, (position, cells)) in rows.iter().enumerate() {
            assert_eq!(cells[0], i.to_string(), "row {i}");
            assert_eq!(position.row(), i as u64);
        }
        let at = |i: usize| match rows[i].0 {
            Position::Parquet { row_group, row_in_group, .. } => (row_group, row_in_group),
            other => panic!("{other:?}"),
        };
        assert_eq!(at(0), (0, 0));
        assert_eq!(at(2), (0, 2));
        assert_eq!(at(3), (1, 0));
        assert_eq!(at(3 + 1024), (1, 1024));
        assert_eq!(at(2502), (1, 2499));
        // The empty row group 2 is skipped; group 3 keeps its own index.
        assert_eq!(at(2503), (3, 0));
        assert_eq!(at(2504), (3, 1));
        assert_eq!(rows[2504].0.to_string(), "row group 3, row 1");
    }

    #[test]
    fn parquet_nulls_are_missing_in_every_type() {
        let dir = tempfile::tempdir().unwrap();
        let pq = dir.path().join("nulls.parquet");
        let schema = "message n { OPTIONAL BOOLEAN b; OPTIONAL INT32 i; OPTIONAL INT64 l; OPTIONAL FLOAT f; OPTIONAL DOUBLE d; OPTIONAL BINARY s (STRING); }";
        let groups = vec![vec![
            Col::Bool(vec![None, Some(false), None]),
            Col::I32(vec![Some(5), None, None]),
            Col::I64(vec![None, None, Some(-9)]),
            Col::F32(vec![Some(0.5), None, Some(1.5)]),
            Col::F64(vec![None, Some(2.25), None]),
            Col::Str(vec![None, Some("x"), None]),
        ]];
        write_parquet(&pq, schema, &groups, plain());
        use OwnedCell::*;
        assert_eq!(
            raw_rows(&pq),
            [
                vec![Missing, Int(5), Missing, Float(0.5), Missing, Missing],
                vec![Bool(false), Missing, Missing, Missing, Float(2.25), Text("x".into())],
                vec![Missing, Missing, Int(-9), Float(1.5), Missing, Missing],
            ]
        );
    }

    #[test]
    fn parquet_unsigned_and_narrow_integers_read_as_their_values() {
        let dir = tempfile::tempdir().unwrap();
        let pq = dir.path().join("ints.parquet");
        let schema = "message i { REQUIRED INT32 u (INTEGER(32,false)); REQUIRED INT32 s8 (INTEGER(8,true)); }";
        write_parquet(&pq, schema, &[vec![Col::I32(vec![Some(-1)]), Col::I32(vec![Some(-7)])]], plain());
        assert_eq!(raw_rows(&pq), [vec![OwnedCell::Int(i64::from(u32::MAX)), OwnedCell::Int(-7)]]);
    }

    #[test]
    fn dictionary_encoded_and_compressed_strings_read_alike() {
        let dir = tempfile::tempdir().unwrap();
        let levels = ["typical", "atypical", "non-anginal", "asymptomatic"];
        let cells: Vec<Option<&'static str>> =
            (0..3000).map(|i| if i % 11 == 0 { None } else { Some(levels[i % 4]) }).collect();
        let schema = "message d { OPTIONAL BINARY cp (UTF8); }";
        let mut tables = Vec::new();
        for (name, props) in [
            ("dict.parquet", WriterProperties::builder().set_dictionary_enabled(true).build()),
            ("plain.parquet", WriterProperties::builder().set_dictionary_enabled(false).build()),
            ("snappy.parquet", WriterProperties::builder().set_compression(Compression::SNAPPY).build()),
            (
                "zstd.parquet",
                WriterProperties::builder().set_compression(Compression::ZSTD(Default::default())).build(),
            ),
            (
                "gzip.parquet",
                WriterProperties::builder().set_compression(Compression::GZIP(Default::default())).build(),
            ),
        ] {
            let path = dir.path().join(name);
            write_parquet(&path, schema, &[vec![Col::Str(cells.clone())]], props);
            tables.push((name, path));
        }
        // The dictionary file is dictionary-encoded and the plain one is not, or the test proves nothing.
        let encodings = |path: &Path| {
            let reader = SerializedFileReader::new(File::open(path).unwrap()).unwrap();
            reader.metadata().row_group(0).column(0).encodings().collect::<Vec<_>>()
        };
        assert!(encodings(&tables[0].1).contains(&Encoding::RLE_DICTIONARY), "{:?}", encodings(&tables[0].1));
        assert!(!encodings(&tables[1].1).contains(&Encoding::RLE_DICTIONARY), "{:?}", encodings(&tables[1].1));
        let expected: Vec<Vec<OwnedCell>> =
            cells.iter().map(|c| vec![c.map_or(OwnedCell::Missing, |s| OwnedCell::Text(s.to_string()))]).collect();
        for (name, path) in &tables {
            assert!(raw_rows(path) == expected, "{name}");
        }
    }

    /// A dictionary bomb: one 2 MiB string that every row references is a few KiB on disk
    /// (zstd), but copying it per row would allocate gigabytes. Refused at the first such cell,
    /// naming its row group, row and column, with no value in the public reason.
    #[test]
    fn a_dictionary_bomb_is_refused_before_it_is_copied() {
        let dir = tempfile::tempdir().unwrap();
        let huge: &'static str = Box::leak("SECRET".repeat((2 << 20) / 6).into_boxed_str());
        let cells: Vec<Option<&'static str>> = (0..4096).map(|_| Some(huge)).collect();
        let path = dir.path().join("bomb.parquet");
        let props = WriterProperties::builder()
            .set_dictionary_enabled(true)
            .set_compression(Compression::ZSTD(Default::default()))
            .build();
        write_parquet(&path, "message d { OPTIONAL BINARY note (UTF8); }", &[vec![Col::Str(cells)]], props);
        println!("bomb: {} bytes on disk", std::fs::metadata(&path).unwrap().len());
        let e = error_of(&path);
        assert!(matches!(e, TableError::CellTooLarge { row_group: 0, row_in_group: 0, column: 0, .. }), "{e}");
        let public = e.public_reason(true);
        assert!(public.starts_with("rule cell-size:") && !public.contains("SECRET"), "{public}");
    }

    #[test]
    fn parquet_column_of_an_unsupported_type_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let cases: [(&str, &str, Col, &str); 4] = [
            (
                "message t { REQUIRED INT64 ok; REQUIRED INT64 admitted (TIMESTAMP(MILLIS,true)); }",
                "admitted",
                Col::I64(vec![Some(1)]),
                "INT64 (TIMESTAMP)",
            ),
            (
                "message t { REQUIRED INT64 ok; REQUIRED BINARY blob; }",
                "blob",
                Col::Bytes(vec![Some(vec![0, 1])]),
                "BYTE_ARRAY",
            ),
            (
                "message t { REQUIRED INT64 ok; REQUIRED INT32 day (DATE); }",
                "day",
                Col::I32(vec![Some(1)]),
                "INT32 (DATE)",
            ),
            ("message t { REQUIRED INT64 ok; REPEATED INT32 visits; }", "visits", Col::I32(vec![]), "repeated INT32"),
        ];
        for (i, (schema, name, col, ty)) in cases.into_iter().enumerate() {
            let path = dir.path().join(format!("case{i}.parquet"));
            if name != "visits" {
                write_parquet(&path, schema, &[vec![Col::I64(vec![Some(1)]), col]], plain());
            } else {
                // A repeated column's writer needs repetition levels: an empty file is enough.
                write_parquet(&path, schema, &[], plain());
            }
            match TableReader::open(&path, None) {
                Err(e @ TableError::UnsupportedColumn { .. }) => {
                    let TableError::UnsupportedColumn { column, name: got, ty: got_ty, .. } = &e else {
                        unreachable!()
                    };
                    assert_eq!((*column, got.as_str()), (1, name));
                    assert!(got_ty.starts_with(ty), "{got_ty}");
                    assert!(e.to_string().contains(name), "{e}");
                    let public = e.public_reason(true);
                    assert!(public.contains("column 1") && !public.contains(name), "{public}");
                }
                other => panic!("{name}: {other:?}"),
            }
        }
    }

    #[test]
    fn nested_parquet_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested.parquet");
        write_parquet(
            &path,
            "message t { REQUIRED INT64 id; OPTIONAL group address { OPTIONAL BINARY city (UTF8); } }",
            &[],
            plain(),
        );
        match TableReader::open(&path, None) {
            Err(TableError::UnsupportedColumn { column: 1, name, ty, .. }) => {
                assert_eq!(name, "address");
                assert!(ty.contains("nested"), "{ty}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn truncated_or_corrupt_parquet_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.parquet");
        let groups = vec![vec![Col::I64((0..500).map(Some).collect())], vec![Col::I64((0..500).map(Some).collect())]];
        write_parquet(
            &good,
            "message t { REQUIRED INT64 id; }",
            &groups,
            WriterProperties::builder().set_compression(Compression::SNAPPY).build(),
        );
        let bytes = std::fs::read(&good).unwrap();

        // Cut in half: no footer, so not a Parquet file at all.
        let truncated = dir.path().join("truncated.parquet");
        std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
        match error_of(&truncated) {
            TableError::Parquet { row_group: None, .. } => {}
            other => panic!("{other:?}"),
        }

        // A CSV named .parquet.
        let csv = dir.path().join("csv.parquet");
        std::fs::write(&csv, "a,b\n1,2\n").unwrap();
        assert!(matches!(error_of(&csv), TableError::Parquet { row_group: None, .. }));

        // Footer intact, the second row group's pages overwritten: refused there, after the
        // first group's rows were read.
        let reader = SerializedFileReader::new(File::open(&good).unwrap()).unwrap();
        let start = reader.metadata().row_group(1).column(0).byte_range().0 as usize;
        let mut corrupt = bytes.clone();
        for b in &mut corrupt[start..start + 40] {
            *b = 0xA5;
        }
        let damaged = dir.path().join("damaged.parquet");
        std::fs::write(&damaged, &corrupt).unwrap();
        let mut reader = TableReader::open(&damaged, None).unwrap();
        let mut rows = 0;
        let err = loop {
            match reader.next_row() {
                Some(Ok(_)) => rows += 1,
                Some(Err(e)) => break e,
                None => panic!("the damaged file read to its end"),
            }
        };
        assert_eq!(rows, 500);
        assert!(matches!(err, TableError::Parquet { row_group: Some(1), .. }), "{err:?}");
        assert!(err.public_reason(true).contains("row group 1"), "{}", err.public_reason(true));
        assert!(reader.next_row().is_none(), "the reader stops after its first error");
    }

    #[test]
    fn empty_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["empty.csv", "empty.parquet"] {
            let path = dir.path().join(name);
            std::fs::write(&path, b"").unwrap();
            assert!(matches!(error_of(&path), TableError::Empty { what: EmptyTable::NoBytes, .. }), "{name}");
        }
        let blank = dir.path().join("blank.csv");
        std::fs::write(&blank, "\n\n").unwrap();
        assert!(matches!(error_of(&blank), TableError::Empty { what: EmptyTable::NoHeader, .. }));
        // A header alone is a table with no rows, not an error.
        let header_only = dir.path().join("header.csv");
        std::fs::write(&header_only, "a,b\n").unwrap();
        assert_eq!(read_all(&header_only).unwrap().1.len(), 0);
        let no_columns = dir.path().join("nocols.parquet");
        write_parquet(&no_columns, "message t { }", &[], plain());
        assert!(matches!(error_of(&no_columns), TableError::Empty { what: EmptyTable::NoColumns, .. }));
    }

    #[test]
    fn ragged_csv_row_is_refused_with_its_line_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("ragged.csv");
        std::fs::write(&csv, "a,b,c\n1,2,3\n\"x\ny\",5,6\n7,8\n9,10,11\n").unwrap();
        let mut reader = TableReader::open(&csv, None).unwrap();
        assert!(reader.next_row().unwrap().is_ok());
        assert!(reader.next_row().unwrap().is_ok());
        match reader.next_row() {
            Some(Err(e @ TableError::FieldCount { line: 5, expected: 3, found: 2, .. })) => {
                assert_eq!(
                    e.public_reason(true),
                    "rule csv-field-count: 'ragged.csv' line 5: the row has 2 fields, the header has 3; the hospital's node log has the detail"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(reader.next_row().is_none());
    }

    #[test]
    fn csv_that_is_not_utf8_names_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("latin1.csv");
        std::fs::write(&csv, b"name,age\nok,1\nJos\xe9,2\n").unwrap();
        assert!(matches!(error_of(&csv), TableError::CsvNotUtf8 { line: 3, column: Some(0), .. }));
        let header = dir.path().join("latin1_header.csv");
        std::fs::write(&header, b"n\xe9,age\nok,1\n").unwrap();
        assert!(matches!(error_of(&header), TableError::CsvNotUtf8 { line: 1, .. }));
    }

    #[test]
    fn format_comes_from_the_setting_or_the_extension() {
        assert_eq!(Format::from_extension(Path::new("/d/t.csv")).unwrap(), Format::Csv);
        assert_eq!(Format::from_extension(Path::new("t.CSV")).unwrap(), Format::Csv);
        assert_eq!(Format::from_extension(Path::new("t.parquet")).unwrap(), Format::Parquet);
        assert_eq!(Format::from_extension(Path::new("t.pq")).unwrap(), Format::Parquet);
        for bad in ["t.txt", "t", "t.csv.gz"] {
            let e = Format::from_extension(Path::new(bad)).unwrap_err();
            assert!(matches!(e, TableError::UnknownFormat { .. }), "{bad}");
            assert!(e.to_string().contains(".parquet"), "{e}");
        }
        assert_eq!(Format::resolve(Path::new("t.txt"), Some(Format::Csv)).unwrap(), Format::Csv);
        assert_eq!(Format::resolve(Path::new("t.csv"), Some(Format::Parquet)).unwrap(), Format::Parquet);
        assert_eq!("Parquet".parse::<Format>().unwrap(), Format::Parquet);
        assert!("xlsx".parse::<Format>().is_err());
    }

    #[test]
    fn public_reasons_carry_no_values_headers_or_directories() {
        const VALUE: &str = "SECRET-VALUE-42";
        const HEADER: &str = "PatientName";
        const DIR: &str = "ward-of-Dr-Jones";
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join(DIR);
        std::fs::create_dir(&dir).unwrap();
        let write = |name: &str, bytes: &[u8]| {
            let p = dir.join(name);
            std::fs::write(&p, bytes).unwrap();
            p
        };
        let mut errors = vec![
            error_of(&write("ragged.csv", format!("{HEADER},b\n{VALUE},1,2\n").as_bytes())),
            error_of(&write("utf8.csv", &[format!("{HEADER}\n{VALUE}").as_bytes(), b"\xe9\n"].concat())),
            error_of(&write("bad.parquet", format!("{HEADER}\n{VALUE}\n").as_bytes())),
            error_of(&write("empty.csv", b"")),
            error_of(&dir.join("absent.csv")),
            Format::from_extension(&dir.join("table.txt")).unwrap_err(),
        ];
        let typed = dir.join("typed.parquet");
        write_parquet(&typed, &format!("message t {{ REQUIRED INT96 {HEADER}; }}"), &[], plain());
        errors.push(error_of(&typed));
        let not_utf8 = dir.join("bytes.parquet");
        let mut bad = VALUE.as_bytes().to_vec();
        bad.push(0xff);
        write_parquet(
            &not_utf8,
            &format!("message t {{ REQUIRED BINARY {HEADER} (UTF8); }}"),
            &[vec![Col::Bytes(vec![Some(bad)])]],
            plain(),
        );
        errors.push(error_of(&not_utf8));
        assert!(matches!(
            errors.last(),
            Some(TableError::ParquetNotUtf8 { row_group: 0, row_in_group: 0, column: 0, .. })
        ));

        for e in &errors {
            for positions in [true, false] {
                let public = e.public_reason(positions);
                assert!(public.starts_with("rule "), "{public}");
                for secret in [VALUE, HEADER, DIR] {
                    assert!(!public.contains(secret), "{secret} in {public}");
                }
                if !positions {
                    assert!(!public.contains("line ") && !public.contains("row group "), "{public}");
                }
            }
        }
        // The local message keeps the detail the data steward needs.
        assert!(errors[0].to_string().contains(DIR), "{}", errors[0]);
        assert!(errors[6].to_string().contains(HEADER), "{}", errors[6]);
    }

    /// The fixtures pandas and pyarrow wrote (node/testdata/tables/make_pandas_tables.py): every
    /// Parquet codec pandas offers reads as the CSV pandas wrote from the same frame.
    #[test]
    fn reads_what_pandas_and_pyarrow_write() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/tables");
        let (csv_header, csv_rows) = read_all(&dir.join("pandas.csv")).unwrap();
        assert_eq!(csv_header, ["age", "sex", "cp", "smoker", "visits", "ward", "split"]);
        assert_eq!(csv_rows.len(), 10);
        for name in ["pandas_snappy.parquet", "pandas_none.parquet", "pandas_zstd.parquet", "pandas_gzip.parquet"] {
            let path = dir.join(name);
            let mut reader = TableReader::open(&path, None).unwrap();
            assert_eq!(reader.header(), &csv_header[..], "{name}");
            let mut n = 0;
            while let Some(row) = reader.next_row() {
                let row = row.unwrap();
                let csv = &csv_rows[n].1;
                for (c, cell) in row.cells().enumerate() {
                    let text = csv[c].as_str();
                    let same = match cell {
                        RawCell::Missing => text.is_empty(),
                        RawCell::Float(x) => text.parse::<f64>() == Ok(x),
                        RawCell::Int(i) => text.parse::<i64>() == Ok(i),
                        // pandas writes Python's True / False.
                        RawCell::Bool(b) => text == if b { "True" } else { "False" },
                        RawCell::Text(t) => text == t,
                    };
                    assert!(same, "{name} row {n} column {c}: {cell:?} against '{text}'");
                }
                if name == "pandas_snappy.parquet" {
                    // Written with row_group_size=4: rows 4..8 are group 1, 8..10 group 2.
                    let expected = (n / 4, (n % 4) as u64);
                    match row.position() {
                        Position::Parquet { row_group, row_in_group, row } => {
                            assert_eq!(((row_group, row_in_group), row), (expected, n as u64))
                        }
                        other => panic!("{other:?}"),
                    }
                }
                n += 1;
            }
            assert_eq!(n, 10, "{name}");
        }
        // A categorical column is dictionary-encoded, a datetime column refused by name.
        let reader = SerializedFileReader::new(File::open(dir.join("pandas_snappy.parquet")).unwrap()).unwrap();
        assert!(reader.metadata().row_group(0).column(2).encodings().any(|e| e == Encoding::RLE_DICTIONARY));
        match TableReader::open(&dir.join("pandas_timestamp.parquet"), None) {
            Err(TableError::UnsupportedColumn { column: 7, name, ty, .. }) => {
                assert_eq!(name, "admitted");
                assert!(ty.contains("TIMESTAMP"), "{ty}");
            }
            other => panic!("{other:?}"),
        }
    }

    /// The rare-disease shape: 5,000 columns by 2,000 rows, as CSV and as Parquet, read row by
    /// row. Nothing keeps a row past the next call (the reader hands out borrowed rows), so the
    /// memory is one CSV record or one Parquet batch plus each column's current page. Ignored:
    /// writing the tables takes longer than a unit test should; run it with
    /// `cargo test -p sanctum-node --lib table::tests::streams_a_wide_table -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn streams_a_wide_table() {
        const COLS: usize = 5000;
        const ROWS: usize = 2000;
        let dir = tempfile::tempdir().unwrap();
        let bit = |r: usize, c: usize| (r * 31 + c * 17).is_multiple_of(97);

        let started = std::time::Instant::now();
        let csv = dir.path().join("wide.csv");
        let mut text = String::with_capacity(COLS * 8);
        let mut out = std::io::BufWriter::new(File::create(&csv).unwrap());
        text.extend((0..COLS).map(|c| format!("v{c},")));
        text.pop();
        text.push('\n');
        std::io::Write::write_all(&mut out, text.as_bytes()).unwrap();
        for r in 0..ROWS {
            text.clear();
            for c in 0..COLS {
                text.push(if bit(r, c) { '1' } else { '0' });
                text.push(if c + 1 == COLS { '\n' } else { ',' });
            }
            std::io::Write::write_all(&mut out, text.as_bytes()).unwrap();
        }
        drop(out);
        let pq = dir.path().join("wide.parquet");
        let schema: String = (0..COLS).map(|c| format!("OPTIONAL INT32 v{c}; ")).collect();
        // Two row groups of 1,000 rows, as a writer with a row-group limit makes them.
        let groups: Vec<Vec<Col>> = (0..2)
            .map(|g| {
                (0..COLS)
                    .map(|c| Col::I32((0..ROWS / 2).map(|r| Some(i32::from(bit(g * ROWS / 2 + r, c)))).collect()))
                    .collect()
            })
            .collect();
        write_parquet(
            &pq,
            &format!("message wide {{ {schema}}}"),
            &groups,
            WriterProperties::builder().set_compression(Compression::SNAPPY).build(),
        );
        drop(groups);
        println!(
            "wrote {COLS} x {ROWS} as CSV ({} MB) and Parquet ({} MB) in {:.2?}",
            std::fs::metadata(&csv).unwrap().len() / 1_000_000,
            std::fs::metadata(&pq).unwrap().len() / 1_000_000,
            started.elapsed()
        );

        for path in [&csv, &pq] {
            let started = std::time::Instant::now();
            let mut reader = TableReader::open(path, None).unwrap();
            assert_eq!(reader.header().len(), COLS);
            let (mut rows, mut ones) = (0usize, 0usize);
            while let Some(row) = reader.next_row() {
                let row = row.unwrap();
                assert_eq!(row.position().row(), rows as u64);
                for cell in row.cells() {
                    match cell {
                        RawCell::Text("1") | RawCell::Int(1) => ones += 1,
                        RawCell::Text("0") | RawCell::Int(0) => {}
                        other => panic!("{other:?}"),
                    }
                }
                rows += 1;
            }
            let took = started.elapsed();
            let expected = (0..ROWS).flat_map(|r| (0..COLS).map(move |c| (r, c))).filter(|&(r, c)| bit(r, c)).count();
            assert_eq!((rows, ones), (ROWS, expected));
            println!(
                "{}: {rows} rows x {COLS} columns in {took:.2?} ({:.0} rows/s, {:.1} M cells/s)",
                path.file_name().unwrap().to_string_lossy(),
                rows as f64 / took.as_secs_f64(),
                (rows * COLS) as f64 / took.as_secs_f64() / 1e6
            );
        }
    }
}
