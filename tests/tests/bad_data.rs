//! Bad data, each case end to end through real processes: one hospital's node holds two
//! datasets (heart disease and a small registry, two schema files); the registry table is bad in
//! one way per case. The node refuses the registry plan (or trains, for the policies that accept
//! missing values) and the reason the lead sees names the rule, the file's name, the line (or
//! the row group) and the column, and carries no cell value: a distinctive secret in the bad
//! cell appears nowhere the coordinator keeps anything (events, its log, its state directory)
//! nor in the node's audit or egress logs, only in the node's own log. Then the same node
//! process trains a heart-disease plan to the end: it keeps serving its other dataset.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed step is a failed test

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use sanctum_protocol::hash::ContentHash;
use sanctum_tests::peer::lead_client;
use sanctum_tests::{
    Consortium, CoordinatorProcess, HEART_SCHEMA, HEART_SCHEMA_SHA256, NodeProcess, follow_run, heart_data,
    submit_and_watch,
};

/// The second schema a hospital holds: a small binary registry with one column per
/// missing-value policy.
const REGISTRY_SCHEMA: &str = r#"name = "registry"
version = "1"
task = "binary"

[target]
label = "outcome"

[split]
column = "split"

[privacy]
unit = "patient"
rows_per_patient = "one"

[standardize]
with = "per_node"

[[columns]]
name = "age"
type = "numeric"
unit = "years"
min = 0.0
max = 120.0

[[columns]]
name = "grade"
type = "categorical"
levels = ["low", "high"]

[[columns]]
name = "marker_r"
type = "numeric"
missing = "refuse"

[[columns]]
name = "marker_d"
type = "numeric"
missing = "drop_row"

[[columns]]
name = "marker_i"
type = "numeric"
missing = "impute"
impute = 1.5

[[columns]]
name = "outcome"
type = "boolean"

[[columns]]
name = "split"
type = "categorical"
levels = ["train", "test"]
"#;

/// Model inputs of the registry: age, grade=low, grade=high, marker_r, marker_d, marker_i.
const REGISTRY_INPUTS: usize = 6;
const COLUMNS: [&str; 7] = ["age", "grade", "marker_r", "marker_d", "marker_i", "outcome", "split"];
const ROWS: usize = 40;

/// The good registry table as text cells (header order [`COLUMNS`]): 30 train rows, 10 test rows.
fn good_rows() -> Vec<[String; 7]> {
    (0..ROWS)
        .map(|r| {
            let outcome = r % 3 == 0;
            [
                format!("{}", 40 + (r * 7) % 35),
                (if r % 2 == 0 { "low" } else { "high" }).to_string(),
                format!("{:.2}", 1.0 + (r % 5) as f64 * 0.5 + if outcome { 1.0 } else { 0.0 }),
                format!("{:.2}", 2.0 + (r % 4) as f64 * 0.25),
                format!("{:.2}", 0.5 + (r % 6) as f64 * 0.3),
                (if outcome { "1" } else { "0" }).to_string(),
                (if r % 4 == 1 { "test" } else { "train" }).to_string(),
            ]
        })
        .collect()
}

fn write_csv(path: &Path, header: &[&str], rows: &[[String; 7]]) {
    let mut text = header.join(",") + "\n";
    for row in rows {
        writeln!(text, "{}", row.join(",")).unwrap();
    }
    std::fs::write(path, text).unwrap();
}

/// Writes `rows` as Parquet, one row group of 16 rows after another: numeric columns DOUBLE
/// (OPTIONAL, an empty text cell a null), text columns UTF-8, the label BOOLEAN. `age_as_text`
/// stores the age column as strings (another schema than the consortium's); `without` leaves a
/// column out.
fn write_parquet(path: &Path, rows: &[[String; 7]], age_as_text: bool, without: Option<&str>) {
    use parquet::data_type::{BoolType, ByteArray, ByteArrayType, DoubleType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;

    let kept: Vec<usize> = (0..7).filter(|&i| Some(COLUMNS[i]) != without).collect();
    let text = |i: usize| matches!(COLUMNS[i], "grade" | "split") || (i == 0 && age_as_text);
    let mut message = String::from("message registry {\n");
    for &i in &kept {
        let ty = if text(i) {
            "BYTE_ARRAY"
        } else if COLUMNS[i] == "outcome" {
            "BOOLEAN"
        } else {
            "DOUBLE"
        };
        let utf8 = if text(i) { " (UTF8)" } else { "" };
        writeln!(message, "  OPTIONAL {ty} {}{utf8};", COLUMNS[i]).unwrap();
    }
    message.push_str("}\n");
    let schema = Arc::new(parse_message_type(&message).unwrap());
    let props = Arc::new(WriterProperties::builder().build());
    let mut writer = SerializedFileWriter::new(std::fs::File::create(path).unwrap(), schema, props).unwrap();
    for group_rows in rows.chunks(16) {
        let mut group = writer.next_row_group().unwrap();
        for &i in &kept {
            let mut col = group.next_column().unwrap().unwrap();
            let cells: Vec<&str> = group_rows.iter().map(|r| r[i].as_str()).collect();
            let def: Vec<i16> = cells.iter().map(|c| i16::from(!c.is_empty())).collect();
            let present = cells.iter().filter(|c| !c.is_empty());
            if text(i) {
                let v: Vec<ByteArray> = present.map(|c| ByteArray::from(*c)).collect();
                col.typed::<ByteArrayType>().write_batch(&v, Some(&def), None).unwrap();
            } else if COLUMNS[i] == "outcome" {
                let v: Vec<bool> = present.map(|c| *c == "1").collect();
                col.typed::<BoolType>().write_batch(&v, Some(&def), None).unwrap();
            } else {
                let v: Vec<f64> = present.map(|c| c.parse().unwrap()).collect();
                col.typed::<DoubleType>().write_batch(&v, Some(&def), None).unwrap();
            }
            col.close().unwrap();
        }
        group.close().unwrap();
    }
    writer.close().unwrap();
}

/// What the node must do with the registry plan.
enum Expect {
    /// Refuse it with a reason holding every one of these.
    Refused(&'static [&'static str]),
    /// Train on this many rows (train + test).
    Trains { rows: usize },
}

fn plan(name: &str, schema: &str, sha: &str, inputs: usize) -> String {
    format!(
        "name = \"{name}\"\nrounds = 1\nmin_nodes = 1\nround_deadline_secs = 60\nrecruit_deadline_secs = 30\n\
         [model]\nkind = \"logistic_regression\"\ninputs = {inputs}\n[data]\nschema = \"{schema}\"\nschema_sha256 = \"{sha}\"\n\
         [local]\nsteps = 5\nbatch_size = 4\nlearning_rate = 0.01\n[strategy]\nkind = \"fedavg\"\n"
    )
}

/// Every file under `dir` whose bytes contain `needle`.
fn files_holding(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            found.extend(files_holding(&p, needle));
        } else if std::fs::read(&p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle)) {
            found.push(p.display().to_string());
        }
    }
    found
}

/// One case: the hospital `case` holds heart disease and the registry table `file` (written by
/// `write` into the hospital's data directory), with `mapping` as its `[datasets.columns]`.
/// `secret` is in the bad cell when there is one.
async fn case(
    case: &str,
    file: &str,
    write: impl FnOnce(&Path),
    mapping: &[(&str, &str)],
    secret: Option<&str>,
    expect: Expect,
) {
    let started = Instant::now();
    let c = Consortium::new();
    // A directory name that must not reach the lead either.
    let data_dir = c.dir.path().join("ward-of-dr-jones");
    std::fs::create_dir_all(&data_dir).unwrap();
    let schema = data_dir.join("registry.toml");
    std::fs::write(&schema, REGISTRY_SCHEMA).unwrap();
    let table = data_dir.join(file);
    write(&table);
    let mut datasets = format!(
        "[[datasets]]\nschema = {HEART_SCHEMA:?}\npath = {:?}\n[[datasets]]\nschema = {schema:?}\npath = {table:?}\n",
        heart_data("cleveland")
    );
    if !mapping.is_empty() {
        datasets.push_str("[datasets.columns]\n");
        for (s, f) in mapping {
            writeln!(datasets, "{s} = {f:?}").unwrap();
        }
    }
    let coord = CoordinatorProcess::start(&c);
    let node = NodeProcess::start_with_datasets(
        &c,
        "cleveland",
        &coord.address(),
        &datasets,
        "allowed_models = [\"logistic_regression\"]",
    );
    coord.wait_for_nodes(1);
    let mut lead = lead_client(&c, &coord).await;

    let sha = ContentHash::of(REGISTRY_SCHEMA.as_bytes()).to_hex();
    let (_, mut events) =
        submit_and_watch(&mut lead, plan(&format!("registry-{case}"), "registry", &sha, REGISTRY_INPUTS)).await;
    let (decisions, finished) = follow_run(&mut events, 180).await;
    let decision = decisions.iter().find(|d| d.node == "cleveland").expect("the node decided");
    println!("[{case}] accepted {}: {:?}", decision.accepted, decision.reason);
    println!("[{case}] plan finished: success {}, {:?}", finished.success, finished.reason);
    for reason in [&decision.reason, &finished.reason] {
        assert!(!reason.contains("ward-of-dr-jones"), "[{case}] the reason names the data's directory: {reason}");
    }
    match expect {
        Expect::Refused(words) => {
            assert!(!decision.accepted, "[{case}] the node accepted a plan on bad data");
            assert!(!finished.success, "[{case}] {}", finished.reason);
            for w in words {
                assert!(decision.reason.contains(w), "[{case}] the reason lacks {w:?}: {}", decision.reason);
                assert!(finished.reason.contains(w), "[{case}] the plan's end lacks {w:?}: {}", finished.reason);
            }
            // The full detail stays in the node's log, for the data steward.
            let log = node.log_text();
            assert!(log.contains(file), "[{case}] the node log does not name the file:\n{log}");
            // The node's signed audit log records the refusal with the public reason.
            let refused: Vec<_> = node
                .audit_records()
                .into_iter()
                .filter(|r| r.event == "plan_refused")
                .map(|r| serde_json::to_string(&r).unwrap())
                .collect();
            assert_eq!(refused.len(), 1, "[{case}] {refused:?}");
            assert!(refused[0].contains(words[0]), "[{case}] audit record: {}", refused[0]);
        }
        Expect::Trains { rows } => {
            assert!(decision.accepted, "[{case}] refused: {}", decision.reason);
            assert!(finished.success, "[{case}] {}", finished.reason);
            assert_eq!(finished.rounds_completed, 1);
            assert_eq!(finished.final_metrics.iter().filter(|m| m.node == "cleveland").count(), 3);
            let log = node.log_text();
            let line = log
                .lines()
                .find(|l| l.contains("accepting plan") && l.contains(&format!("registry-{case}")))
                .unwrap_or_else(|| panic!("[{case}] no acceptance in the node log:\n{log}"));
            let field = |k: &str| -> usize {
                let at = line.find(&format!("{k}=")).unwrap_or_else(|| panic!("{line}")) + k.len() + 1;
                line[at..].split(|ch: char| !ch.is_ascii_digit()).next().unwrap().parse().unwrap()
            };
            let (train, test) = (field("train"), field("test"));
            println!("[{case}] trained on {train} train + {test} test rows");
            assert_eq!(train + test, rows, "[{case}] rows kept: {line}");
        }
    }
    if let Some(secret) = secret {
        let s = secret.as_bytes();
        for d in &decisions {
            assert!(!d.reason.contains(secret), "[{case}] a decision carries the cell value: {}", d.reason);
        }
        assert!(!finished.reason.contains(secret), "[{case}] the plan's end carries the cell value");
        // Everything the coordinator wrote: its config, log, audit log, stores.
        let at_coordinator = files_holding(&c.dir.path().join("coordinator"), s);
        assert!(at_coordinator.is_empty(), "[{case}] the cell value reached the coordinator: {at_coordinator:?}");
        // What the node keeps to show others: its audit log, its egress log.
        let mut at_node = files_holding(&node.state_dir().join("audit"), s);
        let egress = std::fs::read(node.state_dir().join("egress.jsonl")).unwrap_or_default();
        if egress.windows(s.len()).any(|w| w == s) {
            at_node.push("egress.jsonl".into());
        }
        assert!(at_node.is_empty(), "[{case}] the cell value is in the node's {at_node:?}");
        // It was in the cell the node read: its own log has the full detail.
        println!("[{case}] the node's own log holds the value: {}", node.log_text().contains(secret));
    }

    // The same node process goes on serving its other dataset.
    let (_, mut events) =
        submit_and_watch(&mut lead, plan(&format!("heart-after-{case}"), "heart_disease", HEART_SCHEMA_SHA256, 13))
            .await;
    let (decisions, finished) = follow_run(&mut events, 180).await;
    assert!(decisions.iter().all(|d| d.accepted), "[{case}] {decisions:?}");
    assert!(finished.success, "[{case}] the heart-disease plan after the bad one: {}", finished.reason);
    assert_eq!(finished.rounds_completed, 1);
    assert!(finished.final_metrics.iter().any(|m| m.node == "cleveland" && m.name == "accuracy"));
    println!("[{case}] heart disease trained after it; case wall {:.1} s", started.elapsed().as_secs_f64());
}

fn csv_with(edit: impl FnOnce(&mut Vec<[String; 7]>)) -> impl FnOnce(&Path) {
    move |p: &Path| {
        let mut rows = good_rows();
        edit(&mut rows);
        write_csv(p, &COLUMNS, &rows);
    }
}

// Data row r is on line r + 2 (line 1 is the header).

#[tokio::test]
async fn a_column_mapping_the_schema_lacks_is_refused_naming_it() {
    let expect = Expect::Refused(&["rule column-mapping", "'weight'", "schema 'registry'"]);
    case("unknown-column", "registry.csv", csv_with(|_| {}), &[("weight", "WEIGHT_KG")], None, expect).await;
}

#[tokio::test]
async fn a_table_without_a_schema_column_is_refused_naming_file_and_column() {
    let write = |p: &Path| {
        let rows: Vec<[String; 7]> = good_rows();
        // marker_r's header renamed: the file has no column for it.
        let header = ["age", "grade", "marker_x", "marker_d", "marker_i", "outcome", "split"];
        write_csv(p, &header, &rows);
    };
    let expect = Expect::Refused(&["rule schema-columns", "'no_marker.csv'", "'marker_r'"]);
    case("missing-column", "no_marker.csv", write, &[], None, expect).await;
}

#[tokio::test]
async fn text_in_a_numeric_column_is_refused_naming_file_line_and_column_without_the_value() {
    const SECRET: &str = "ZEBRA-SECRET-7731";
    let expect = Expect::Refused(&["rule value-numeric", "'wrong_type.csv' line 7, column 1 (age)", "not a number"]);
    case("wrong-type", "wrong_type.csv", csv_with(|r| r[5][0] = SECRET.into()), &[], Some(SECRET), expect).await;
}

#[tokio::test]
async fn an_out_of_range_value_is_refused_naming_the_declared_range_without_the_value() {
    const SECRET: &str = "987654.3125";
    let expect = Expect::Refused(&["rule value-in-range", "'out_of_range.csv' line 9, column 1 (age)", "[0, 120]"]);
    case("out-of-range", "out_of_range.csv", csv_with(|r| r[7][0] = SECRET.into()), &[], Some("987654"), expect).await;
}

#[tokio::test]
async fn an_unknown_categorical_level_is_refused_without_the_level() {
    const SECRET: &str = "SECRETLEVEL4242";
    let expect = Expect::Refused(&["rule value-known-level", "'unknown_level.csv' line 5, column 2 (grade)"]);
    case("unknown-level", "unknown_level.csv", csv_with(|r| r[3][1] = SECRET.into()), &[], Some(SECRET), expect).await;
}

#[tokio::test]
async fn a_missing_value_under_refuse_is_refused_naming_the_cell() {
    let expect =
        Expect::Refused(&["rule value-present", "'missing_refuse.csv' line 12, column 3 (marker_r)", "missing"]);
    case("missing-refuse", "missing_refuse.csv", csv_with(|r| r[10][2] = String::new()), &[], None, expect).await;
}

#[tokio::test]
async fn missing_values_under_drop_row_train_without_those_rows() {
    let write = csv_with(|r| {
        for i in [2, 11, 30] {
            r[i][3] = "NA".into();
        }
    });
    case("missing-drop-row", "missing_drop.csv", write, &[], None, Expect::Trains { rows: ROWS - 3 }).await;
}

#[tokio::test]
async fn missing_values_under_impute_train_on_every_row() {
    let write = csv_with(|r| {
        for i in [0, 9, 21, 33] {
            r[i][4] = String::new();
        }
    });
    case("missing-impute", "missing_impute.csv", write, &[], None, Expect::Trains { rows: ROWS }).await;
}

#[tokio::test]
async fn a_table_with_an_empty_test_split_is_refused() {
    let write = csv_with(|rows| {
        for r in rows.iter_mut() {
            r[6] = "train".into();
        }
    });
    let expect = Expect::Refused(&["rule splits-non-empty", "'all_train.csv'", "no test row"]);
    case("empty-test-split", "all_train.csv", write, &[], None, expect).await;
}

#[tokio::test]
async fn a_parquet_numeric_column_stored_as_strings_is_refused_naming_row_group_and_column() {
    const SECRET: &str = "31415926535";
    let write = |p: &Path| {
        let mut rows = good_rows();
        rows[0][0] = SECRET.into();
        write_parquet(p, &rows, true, None);
    };
    let expect = Expect::Refused(&["rule parquet-column-types", "'strings.parquet' row group", "column 1 (age)"]);
    case("parquet-strings", "strings.parquet", write, &[], Some(SECRET), expect).await;
}

#[tokio::test]
async fn a_parquet_file_without_a_schema_column_is_refused_naming_it() {
    let write = |p: &Path| write_parquet(p, &good_rows(), false, Some("marker_r"));
    let expect = Expect::Refused(&["rule schema-columns", "'no_column.parquet'", "'marker_r'"]);
    case("parquet-missing-column", "no_column.parquet", write, &[], None, expect).await;
}

#[tokio::test]
async fn a_parquet_table_that_follows_the_schema_trains() {
    // The control for the two Parquet cases: the same writer, the consortium's types.
    let write = |p: &Path| {
        let mut rows = good_rows();
        rows[4][3] = String::new(); // a null under drop_row
        write_parquet(p, &rows, false, None);
    };
    case("parquet-good", "good.parquet", write, &[], None, Expect::Trains { rows: ROWS - 1 }).await;
}

#[tokio::test]
async fn an_empty_file_is_refused_naming_it() {
    let expect = Expect::Refused(&["rule table-not-empty", "'empty.csv'"]);
    case("empty-file", "empty.csv", |p: &Path| std::fs::write(p, b"").unwrap(), &[], None, expect).await;
}
