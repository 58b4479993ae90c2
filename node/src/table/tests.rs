//! The readers on CSV and Parquet tables written here (every Parquet type, nulls, encodings,
//! row groups and batches, malformed files), and public reasons that carry no value or header.

use std::fs::File;

use parquet::data_type::{BoolType, ByteArray, ByteArrayType, DoubleType, FloatType, Int32Type, Int64Type};
use parquet::file::reader::{FileReader, SerializedFileReader};

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
        ("zstd.parquet", WriterProperties::builder().set_compression(Compression::ZSTD(Default::default())).build()),
        ("gzip.parquet", WriterProperties::builder().set_compression(Compression::GZIP(Default::default())).build()),
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
        ("message t { REQUIRED INT64 ok; REQUIRED INT32 day (DATE); }", "day", Col::I32(vec![Some(1)]), "INT32 (DATE)"),
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
                let TableError::UnsupportedColumn { column, name: got, ty: got_ty, .. } = &e else { unreachable!() };
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
    assert!(matches!(errors.last(), Some(TableError::ParquetNotUtf8 { row_group: 0, row_in_group: 0, column: 0, .. })));

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
