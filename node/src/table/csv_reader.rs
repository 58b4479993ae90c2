//! The CSV source of a [`super::TableReader`]: one reused record, so memory stays one row
//! whatever the file's size.

use std::fs::File;
use std::path::Path;

use super::{EmptyTable, Position, TableError};

/// A CSV read into one reused record.
pub(super) struct CsvSource {
    reader: csv::Reader<File>,
    /// The current row's fields, overwritten by each read (no allocation per row once grown).
    record: csv::StringRecord,
    /// Data rows read so far.
    rows: u64,
}

impl CsvSource {
    pub(super) fn open(path: &Path, file: File) -> Result<(Vec<String>, CsvSource), TableError> {
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

    /// The current row's fields (after [`CsvSource::advance`] returned a position).
    pub(super) fn record(&self) -> &csv::StringRecord {
        &self.record
    }

    pub(super) fn advance(&mut self, path: &Path) -> Result<Option<Position>, TableError> {
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
