//! The Parquet source of a [`super::TableReader`]: a row group at a time, in batches of rows
//! across every column, each column's buffers reused from batch to batch; the column types it
//! reads, and a guard that turns the parquet crate's panics on malformed files into errors.

use std::fmt;
use std::fs::File;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use parquet::basic::{ConvertedType, LogicalType, Repetition, Type as PhysicalType};
use parquet::column::reader::{ColumnReader, ColumnReaderImpl};
use parquet::data_type::{BoolType, ByteArray, ByteArrayType, DoubleType, FloatType, Int32Type, Int64Type};
use parquet::errors::ParquetError;
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::schema::types::Type as SchemaType;

use super::{EmptyTable, Position, RawCell, TableError};

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

/// A Parquet file read one row group at a time, each in batches of rows across every column.
pub(super) struct ParquetSource {
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
    pub(super) fn open(path: &Path, file: File) -> Result<(Vec<String>, ParquetSource), TableError> {
        let file = guarded(path, None, || SerializedFileReader::new(file))?;
        let schema = file.metadata().file_metadata().schema_descr();
        let mut header = Vec::new();
        let mut columns = Vec::new();
        for (column, field) in schema.root_schema().get_fields().iter().enumerate() {
            let kind = column_kind(field).map_err(|ty| TableError::UnsupportedColumn {
                path: path.to_path_buf(),
                column,
                name: field.name().to_string(),
                ty: ty.to_string(),
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

    /// The current batch's columns and the current row's index in it (after
    /// [`ParquetSource::advance`] returned a position).
    pub(super) fn current(&self) -> (&[ParquetColumn], usize) {
        (&self.columns, self.batch_pos.saturating_sub(1))
    }

    pub(super) fn advance(&mut self, path: &Path) -> Result<Option<Position>, TableError> {
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

/// A Parquet type this reader refuses; `Display` describes it for [`TableError::UnsupportedColumn`]
/// (the variant's name of a logical type, TIMESTAMP or DECIMAL, says enough; its parameters are
/// noise here).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Unsupported {
    Nested,
    Repeated(PhysicalType),
    Integer { physical: PhysicalType, bits: i8, signed: bool },
    Logical { physical: PhysicalType, name: String },
    Plain(PhysicalType),
    Converted(PhysicalType, ConvertedType),
}

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unsupported::Nested => f.write_str("group (nested)"),
            Unsupported::Repeated(physical) => write!(f, "repeated {physical:?} (a list)"),
            Unsupported::Integer { physical, bits, signed } => {
                write!(f, "{physical:?} (INTEGER({bits}, {}))", if *signed { "signed" } else { "unsigned" })
            }
            Unsupported::Logical { physical, name } => write!(f, "{physical:?} ({name})"),
            Unsupported::Plain(physical) => write!(f, "{physical:?}"),
            Unsupported::Converted(physical, converted) => write!(f, "{physical:?} ({converted:?})"),
        }
    }
}

/// The kind of a top-level field, or the type this reader refuses: nested, repeated, binary,
/// timestamps, dates, decimals, INT96, fixed-length arrays, unsigned 64-bit integers (which do
/// not fit an i64).
fn column_kind(field: &SchemaType) -> Result<Kind, Unsupported> {
    if field.is_group() {
        return Err(Unsupported::Nested);
    }
    let info = field.get_basic_info();
    let physical = field.get_physical_type();
    if info.has_repetition() && info.repetition() == Repetition::REPEATED {
        return Err(Unsupported::Repeated(physical));
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
            Unsupported::Integer { physical, bits: int.bit_width, signed: int.is_signed }
        }
        (Some(logical), _) => {
            let name = format!("{logical:?}");
            Unsupported::Logical {
                physical,
                name: name.split(['(', ' ', '{']).next().unwrap_or_default().to_uppercase(),
            }
        }
        (None, ConvertedType::NONE) => Unsupported::Plain(physical),
        (None, converted) => Unsupported::Converted(physical, converted),
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
pub(super) struct ParquetColumn {
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
    pub(super) fn cell(&self, index: usize) -> RawCell<'_> {
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
