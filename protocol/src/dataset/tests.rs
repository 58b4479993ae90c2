//! Tests of the schema format: the heart-disease file against the built-in schema, every
//! validation rule (each message checked for the field it names), and cell reading.

use proptest::prelude::*;

use super::*;

/// A small valid schema; tests replace parts of it.
const HEAD: &str = r#"
name = "t"
task = "binary"
[target]
label = "y"
[split]
column = "split"
[privacy]
unit = "row"
"#;

const COLS: &str = r#"
[[columns]]
name = "x"
type = "numeric"
[[columns]]
name = "y"
type = "boolean"
[[columns]]
name = "split"
type = "categorical"
levels = ["train", "test"]
"#;

fn ok(text: &str) -> Schema {
    match Schema::parse(text) {
        Ok(s) => s,
        Err(e) => panic!("schema refused: {e}\n{text}"),
    }
}

/// Parses `text`, which must be refused with a message containing `field`.
fn refused(text: &str, field: &str) -> String {
    match Schema::parse(text) {
        Ok(_) => panic!("schema accepted, expected a refusal naming {field}:\n{text}"),
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains(field), "message does not name {field}: {msg}");
            msg
        }
    }
}

fn with_cols(extra: &str) -> String {
    format!("{HEAD}{COLS}{extra}")
}

// ---------------------------------------------------------------- the heart-disease file

const HEART: &str = include_str!("../../../examples/heart_disease/schema.toml");

/// The file is the built-in schema: same features in order, label, split, privacy unit, and
/// every declared statistic bit for bit.
#[test]
fn heart_disease_file_equals_the_built_in_schema() {
    use crate::schema::{self as builtin, HEART_DISEASE, HEART_DISEASE_POOLED_TRAIN};
    let s = ok(HEART);
    assert_eq!(s.name(), HEART_DISEASE.name);
    assert_eq!(s.task(), Task::Binary);
    let names: Vec<&str> = s.features().iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, HEART_DISEASE.features);
    assert!(s.features().iter().all(|f| f.standardize && f.input == FeatureInput::Value));
    let Target::Label { column } = s.target() else { panic!("not a label target") };
    assert_eq!(s.columns()[column].name(), HEART_DISEASE.label);
    assert_eq!(s.columns()[column].kind(), &ColumnKind::Boolean);
    let SplitRule::Column(split) = s.split() else { panic!("not a split column") };
    assert_eq!(s.columns()[split.column].name(), HEART_DISEASE.split);
    assert_eq!((split.train.as_str(), split.test.as_str()), ("train", "test"));
    assert_eq!(
        HEART_DISEASE.privacy_unit,
        builtin::PrivacyUnit::Patient(builtin::PatientRows::OnePerPatient { id_column: None })
    );
    assert_eq!(s.privacy_unit(), PrivacyUnit::Patient(PatientRows::OnePerPatient { id_column: None }));
    let Standardization::Declared(stats) = s.standardization() else { panic!("not declared") };
    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&stats.mean), bits(HEART_DISEASE_POOLED_TRAIN.mean));
    assert_eq!(bits(&stats.std), bits(HEART_DISEASE_POOLED_TRAIN.std));
    assert_eq!(stats.provenance, HEART_DISEASE_POOLED_TRAIN.provenance);
    assert_eq!(s.sha256(), crate::hash::ContentHash::of(HEART.as_bytes()));
}

/// Every cell of the four committed hospital files reads under the file's bounds and types, so
/// the declared ranges refuse nothing FLamby's table holds.
#[test]
fn heart_disease_files_read_under_the_schema() {
    let s = ok(HEART);
    let files = [
        include_str!("../../../examples/heart_disease/data/cleveland.csv"),
        include_str!("../../../examples/heart_disease/data/hungarian.csv"),
        include_str!("../../../examples/heart_disease/data/switzerland.csv"),
        include_str!("../../../examples/heart_disease/data/va.csv"),
    ];
    let mut rows = 0;
    for text in files {
        let mut lines = text.lines();
        let header: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
        let at: Vec<&Column> = header.iter().map(|h| s.column_named(h).map(|(_, c)| c).unwrap()).collect();
        assert_eq!(at.len(), s.columns().len());
        for line in lines {
            for (cell, col) in line.split(',').zip(&at) {
                if col.role() == Role::Split {
                    let SplitRule::Column(sc) = s.split() else { unreachable!() };
                    assert!(sc.read(Some(cell)).unwrap().is_some());
                } else {
                    assert!(matches!(col.interpret(Some(cell)), Ok(Cell::Value(_))), "{} = {cell}", col.name());
                }
            }
            rows += 1;
        }
    }
    assert_eq!(rows, 740);
}

#[test]
fn load_hashes_the_exact_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("schema.toml");
    std::fs::write(&path, HEART).unwrap();
    let loaded = Schema::load(&path).unwrap();
    assert_eq!(loaded, ok(HEART));
    assert_eq!(loaded.sha256(), crate::hash::ContentHash::of(&std::fs::read(&path).unwrap()));
    // One byte more (a trailing newline) is another schema.
    std::fs::write(&path, format!("{HEART}\n")).unwrap();
    assert_ne!(Schema::load(&path).unwrap().sha256(), loaded.sha256());

    std::fs::write(&path, b"name = \"\xff\"").unwrap();
    assert!(matches!(Schema::load(&path), Err(SchemaError::NotUtf8 { .. })));
    let missing = dir.path().join("nope.toml");
    assert!(matches!(Schema::load(&missing), Err(SchemaError::Read { .. })));
}

// ---------------------------------------------------------------- accepted schemas

#[test]
fn features_expand_one_hot_in_column_order() {
    let s = ok(&format!(
        r#"{HEAD}
[standardize]
with = "declared"
provenance = "reference ranges"
[[columns]]
name = "age"
type = "integer"
min = 0
max = 120
mean = 50
std = 10.0
[[columns]]
name = "y"
type = "boolean"
[[columns]]
name = "cp"
type = "categorical"
levels = ["1", "2", "3"]
drop_first = true
[[columns]]
name = "smoker"
type = "boolean"
[[columns]]
name = "colour"
type = "categorical"
levels = ["red", "blue"]
encoding = "one_hot"
[[columns]]
name = "split"
type = "categorical"
levels = ["test", "train"]
"#
    ));
    let got: Vec<(&str, usize, FeatureInput, bool)> =
        s.features().iter().map(|f| (f.name.as_str(), f.column, f.input, f.standardize)).collect();
    assert_eq!(
        got,
        vec![
            ("age", 0, FeatureInput::Value, true),
            ("cp=2", 2, FeatureInput::OneHot { level: 1 }, false),
            ("cp=3", 2, FeatureInput::OneHot { level: 2 }, false),
            ("smoker", 3, FeatureInput::Value, false),
            ("colour=red", 4, FeatureInput::OneHot { level: 0 }, false),
            ("colour=blue", 4, FeatureInput::OneHot { level: 1 }, false),
        ]
    );
    let Standardization::Declared(stats) = s.standardization() else { panic!() };
    assert_eq!(stats.mean, vec![50.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
    assert_eq!(stats.std, vec![10.0, 1.0, 1.0, 1.0, 1.0, 1.0]);
    let cp = &s.features()[1];
    assert_eq!(cp.encode(CellValue::Level(1)), Some(1.0));
    assert_eq!(cp.encode(CellValue::Level(2)), Some(0.0));
    assert_eq!(s.features()[3].encode(CellValue::Boolean(true)), Some(1.0));
    assert_eq!(s.missing_tokens(), ["", "?", "NA", "NaN"]);
}

#[test]
fn multiclass_classes_come_from_levels_or_the_integer_range() {
    let levels = ok(&format!(
        "{}{}",
        HEAD.replace("binary", "multiclass"),
        COLS.replace("type = \"boolean\"", "type = \"categorical\"\nlevels = [\"a\", \"b\", \"c\"]")
    ));
    assert_eq!(levels.task(), Task::Multiclass { classes: 3 });
    assert_eq!(levels.class_of(CellValue::Level(2)), Some(2));
    let range = ok(&format!(
        "{}{}",
        HEAD.replace("binary", "multiclass"),
        COLS.replace("type = \"boolean\"", "type = \"integer\"\nmin = 1\nmax = 5")
    ));
    assert_eq!(range.task(), Task::Multiclass { classes: 5 });
    assert_eq!(range.class_of(CellValue::Integer(1)), Some(0));
    assert_eq!(range.class_of(CellValue::Integer(5)), Some(4));
    let binary = ok(&with_cols(""));
    assert_eq!(binary.class_of(CellValue::Boolean(true)), Some(1));
    let binary_int =
        ok(&format!("{HEAD}{}", COLS.replace("type = \"boolean\"", "type = \"integer\"\nmin = 0\nmax = 1")));
    assert_eq!(binary_int.task(), Task::Binary);
    assert_eq!(binary_int.class_of(CellValue::Integer(1)), Some(1));
}

#[test]
fn survival_hash_split_and_patient_ids() {
    let s = ok(r#"
name = "brca.v2"
task = "survival"
missing_values = ["", "NA"]
[target]
time = "T"
event = "E"
[split]
rule = "hash"
test_fraction = 0.25
seed = 9
[privacy]
unit = "patient"
rows_per_patient = "several"
id_column = "pid"
[standardize]
with = "dp"
epsilon = 0.5
[[columns]]
name = "pid"
type = "text"
[[columns]]
name = "T"
type = "numeric"
unit = "days"
missing = "drop_row"
[[columns]]
name = "E"
type = "integer"
min = 0
max = 1
[[columns]]
name = "age"
type = "numeric"
min = 0
max = 120
missing = "impute"
impute = 60
"#);
    assert_eq!(s.task(), Task::Survival);
    assert_eq!(s.target(), Target::Survival { time: 1, event: 2 });
    assert_eq!(s.split(), &SplitRule::Hash { seed: 9, test_fraction: 0.25 });
    assert_eq!(s.privacy_unit(), PrivacyUnit::Patient(PatientRows::Several { id_column: 0 }));
    assert_eq!(s.standardization(), &Standardization::Dp { epsilon: 0.5 });
    // An absent min on the survival time is min 0.
    assert_eq!(s.columns()[1].kind(), &ColumnKind::Numeric { min: Some(0.0), max: None });
    assert!(matches!(s.columns()[1].read(Some("-1")), Err(CellProblem::OutOfRange { .. })));
    assert_eq!(s.columns()[1].interpret(Some("NA")), Ok(Cell::DropRow));
    assert_eq!(s.columns()[3].interpret(None), Ok(Cell::Value(CellValue::Number(60.0))));
    assert_eq!(s.columns()[0].interpret(Some("P-7")), Ok(Cell::Value(CellValue::Text)));
    assert_eq!(s.features().len(), 1);
}

// ---------------------------------------------------------------- refusals, one per rule

#[test]
fn unknown_keys_are_refused() {
    refused(&format!("colour = 1\n{HEAD}{COLS}"), "colour");
    refused(&with_cols("standardise = true\n"), "standardise");
    refused(&format!("{}{COLS}", HEAD.replace("column = \"split\"", "column = \"split\"\nfraction = 0.2")), "fraction");
    refused(&format!("{}{COLS}", HEAD.replace("unit = \"row\"", "unit = \"row\"\nepsilon = 1.0")), "epsilon");
    refused(&format!("{}{COLS}", HEAD.replace("label = \"y\"", "label = \"y\"\nlabels = \"y\"")), "labels");
    refused(&format!("{HEAD}[standardize]\nwith = \"none\"\nmean = 1\n{COLS}"), "mean");
    refused(&format!("{}{COLS}", HEAD.replace("binary", "ordinal")), "ordinal");
    refused(&with_cols("[[columns]]\nname = \"q\"\ntype = \"string\"\n"), "string");
}

#[test]
fn the_schema_name_follows_the_rule() {
    for bad in ["", "bad name", "-lead", "é", &"a".repeat(65), "a/b"] {
        refused(&format!("{}{COLS}", HEAD.replace("name = \"t\"", &format!("name = {bad:?}"))), "schema field name:");
    }
    for good in ["a", "heart_disease", "TCGA-BRCA.v1", &"a".repeat(64)] {
        ok(&format!("{}{COLS}", HEAD.replace("name = \"t\"", &format!("name = {good:?}"))));
    }
}

#[test]
fn column_names_are_unique_and_bounded() {
    refused(&with_cols("[[columns]]\nname = \"x\"\ntype = \"numeric\"\n"), "columns[3] 'x'.name");
    refused(&with_cols(&format!("[[columns]]\nname = {:?}\ntype = \"numeric\"\n", "n".repeat(257))), "columns[3].name");
    refused(&with_cols("[[columns]]\nname = \"\"\ntype = \"numeric\"\n"), "columns[3].name");
    refused(&with_cols("[[columns]]\nname = \"a\\nb\"\ntype = \"numeric\"\n"), "columns[3].name");
    refused(&with_cols("[[columns]]\nname = \" a\"\ntype = \"numeric\"\n"), "columns[3].name");
}

#[test]
fn target_split_and_id_columns_must_be_listed() {
    refused(&format!("{}{COLS}", HEAD.replace("label = \"y\"", "label = \"z\"")), "target.label");
    refused(&format!("{}{COLS}", HEAD.replace("column = \"split\"", "column = \"fold\"")), "split.column");
    refused(
        &format!(
            "{}{COLS}",
            HEAD.replace("unit = \"row\"", "unit = \"patient\"\nrows_per_patient = \"one\"\nid_column = \"pid\"")
        ),
        "privacy.id_column",
    );
    // A target column cannot also be the split.
    refused(&format!("{}{COLS}", HEAD.replace("column = \"split\"", "column = \"y\"")), "split.column");
}

#[test]
fn target_shape_fits_the_task() {
    refused(&format!("{}{COLS}", HEAD.replace("label = \"y\"", "label = \"y\"\ntime = \"x\"")), "target.time");
    refused(&format!("{}{COLS}", HEAD.replace("binary", "survival")), "target.label");
    refused(
        &format!("{}{COLS}", HEAD.replace("binary", "survival").replace("label = \"y\"", "time = \"x\"")),
        "target.event",
    );
    refused(&format!("{}{COLS}", HEAD.replace("label = \"y\"", "")), "target.label");
}

#[test]
fn target_types_fit_the_task() {
    let label = |kind: &str| COLS.replace("type = \"boolean\"", kind);
    let binary = |kind: &str| format!("{HEAD}{}", label(kind));
    refused(&binary("type = \"numeric\""), "columns[1] 'y'.type");
    refused(&binary("type = \"integer\"\nmin = 0\nmax = 2"), "columns[1] 'y'.type");
    refused(&binary("type = \"categorical\"\nlevels = [\"a\", \"b\", \"c\"]"), "columns[1] 'y'.type");
    let multi = |kind: &str| format!("{}{}", HEAD.replace("binary", "multiclass"), label(kind));
    refused(&multi("type = \"boolean\""), "columns[1] 'y'.type");
    refused(&multi("type = \"integer\"\nmin = 0"), "columns[1] 'y'.type");
    refused(&multi("type = \"categorical\"\nlevels = [\"a\"]"), "columns[1] 'y'.type");
    refused(&multi("type = \"integer\"\nmin = 0\nmax = 20000"), "columns[1] 'y'.max");
    let regression = |kind: &str| format!("{}{}", HEAD.replace("binary", "regression"), label(kind));
    refused(&regression("type = \"boolean\""), "columns[1] 'y'.type");
    assert_eq!(ok(&regression("type = \"numeric\"")).task(), Task::Regression);
    let survival = |time: &str, event: &str| {
        format!(
            "{}{COLS}[[columns]]\nname = \"T\"\n{time}\n[[columns]]\nname = \"E\"\n{event}\n",
            HEAD.replace("binary", "survival").replace("label = \"y\"", "time = \"T\"\nevent = \"E\"")
        )
    };
    refused(&survival("type = \"numeric\"\nmin = -1", "type = \"boolean\""), "columns[3] 'T'.min");
    refused(&survival("type = \"integer\"\nmin = -1", "type = \"boolean\""), "columns[3] 'T'.min");
    refused(&survival("type = \"boolean\"", "type = \"boolean\""), "columns[3] 'T'.type");
    refused(&survival("type = \"numeric\"", "type = \"numeric\""), "columns[4] 'E'.type");
    ok(&survival("type = \"integer\"", "type = \"integer\"\nmin = 0\nmax = 1"));
}

#[test]
fn levels_are_non_empty_unique_and_bounded() {
    let cat =
        |levels: &str| with_cols(&format!("[[columns]]\nname = \"cp\"\ntype = \"categorical\"\nlevels = {levels}\n"));
    refused(&cat("[]"), "columns[3] 'cp'.levels");
    refused(&cat("[\"1\", \"2\", \"1\"]"), "columns[3] 'cp'.levels[2]");
    refused(&cat("[\"1\", \"\"]"), "columns[3] 'cp'.levels[1]");
    refused(&cat("[\"1\", \"NA\"]"), "columns[3] 'cp'.levels[1]");
    refused(&cat(&format!("[{:?}]", "l".repeat(257))), "columns[3] 'cp'.levels[0]");
    let many: Vec<String> = (0..=limits::MAX_LEVELS).map(|i| format!("\"{i}\"")).collect();
    refused(&cat(&format!("[{}]", many.join(","))), "columns[3] 'cp'.levels");
    ok(&cat(&format!("[{}]", many[..limits::MAX_LEVELS].join(","))));
    refused(&with_cols("[[columns]]\nname = \"cp\"\ntype = \"categorical\"\n"), "columns[3] 'cp'.levels");
    refused(&with_cols("[[columns]]\nname = \"n\"\ntype = \"numeric\"\nlevels = [\"a\"]\n"), "columns[3] 'n'.levels");
    refused(
        &with_cols("[[columns]]\nname = \"cp\"\ntype = \"categorical\"\nlevels = [\"a\"]\ndrop_first = true\n"),
        "columns[3] 'cp'.drop_first",
    );
    refused(
        &with_cols("[[columns]]\nname = \"n\"\ntype = \"numeric\"\ndrop_first = true\n"),
        "columns[3] 'n'.drop_first",
    );
    // `cp=a` from one-hot would collide with a column named `cp=a`.
    refused(
        &with_cols(
            "[[columns]]\nname = \"cp=a\"\ntype = \"numeric\"\n[[columns]]\nname = \"cp\"\ntype = \"categorical\"\nlevels = [\"a\"]\n",
        ),
        "columns[4] 'cp'",
    );
}

#[test]
fn bounds_are_ordered_finite_and_typed() {
    let col = |body: &str| with_cols(&format!("[[columns]]\nname = \"b\"\n{body}\n"));
    refused(&col("type = \"numeric\"\nmin = 5\nmax = 1"), "columns[3] 'b'.min");
    refused(&col("type = \"integer\"\nmin = 5\nmax = 1"), "columns[3] 'b'.min");
    refused(&col("type = \"numeric\"\nmin = nan"), "columns[3] 'b'.min");
    refused(&col("type = \"numeric\"\nmax = inf"), "columns[3] 'b'.max");
    refused(&col("type = \"integer\"\nmin = 0.5"), "columns[3] 'b'.min");
    refused(&col("type = \"boolean\"\nmin = 0"), "columns[3] 'b'.min");
    refused(&col("type = \"categorical\"\nlevels = [\"a\"]\nmax = 1"), "columns[3] 'b'.max");
    ok(&col("type = \"integer\"\nmin = 1.0\nmax = 1"));
}

#[test]
fn impute_values_fit_their_column() {
    let col = |body: &str| with_cols(&format!("[[columns]]\nname = \"v\"\nmissing = \"impute\"\n{body}\n"));
    refused(&col("type = \"numeric\"\nimpute = \"a\""), "columns[3] 'v'.impute");
    refused(&col("type = \"numeric\"\nmin = 0\nmax = 10\nimpute = 11"), "columns[3] 'v'.impute");
    refused(&col("type = \"numeric\"\nimpute = nan"), "columns[3] 'v'.impute");
    refused(&col("type = \"integer\"\nimpute = 1.5"), "columns[3] 'v'.impute");
    refused(&col("type = \"integer\"\nmax = 3\nimpute = 4"), "columns[3] 'v'.impute");
    refused(&col("type = \"boolean\"\nimpute = 1"), "columns[3] 'v'.impute");
    refused(&col("type = \"categorical\"\nlevels = [\"a\", \"b\"]\nimpute = \"c\""), "columns[3] 'v'.impute");
    refused(&col("type = \"categorical\"\nlevels = [\"1\", \"2\"]\nimpute = 1"), "columns[3] 'v'.impute");
    refused(&col("type = \"numeric\""), "columns[3] 'v'.impute");
    refused(&with_cols("[[columns]]\nname = \"v\"\ntype = \"numeric\"\nimpute = 1\n"), "columns[3] 'v'.impute");
    let s = ok(&col("type = \"categorical\"\nlevels = [\"a\", \"b\"]\nimpute = \"b\""));
    assert_eq!(s.columns()[3].missing(), MissingPolicy::Impute(CellValue::Level(1)));
    let s = ok(&col("type = \"integer\"\nimpute = 2.0"));
    assert_eq!(s.columns()[3].missing(), MissingPolicy::Impute(CellValue::Integer(2)));
}

#[test]
fn targets_splits_and_ids_are_never_imputed() {
    let imputed = COLS.replace("type = \"boolean\"", "type = \"boolean\"\nmissing = \"impute\"\nimpute = false");
    refused(&format!("{HEAD}{imputed}"), "columns[1] 'y'.missing");
    let split = COLS.replace(
        "levels = [\"train\", \"test\"]",
        "levels = [\"train\", \"test\"]\nmissing = \"impute\"\nimpute = \"train\"",
    );
    refused(&format!("{HEAD}{split}"), "columns[2] 'split'.missing");
    let id = format!(
        "{}{COLS}[[columns]]\nname = \"pid\"\ntype = \"text\"\nmissing = \"impute\"\nimpute = \"p\"\n",
        HEAD.replace("unit = \"row\"", "unit = \"patient\"\nrows_per_patient = \"one\"\nid_column = \"pid\"")
    );
    refused(&id, "columns[3] 'pid'.missing");
    // drop_row is allowed on a target.
    let dropped = COLS.replace("type = \"boolean\"", "type = \"boolean\"\nmissing = \"drop_row\"");
    assert_eq!(ok(&format!("{HEAD}{dropped}")).columns()[1].missing(), MissingPolicy::DropRow);
}

#[test]
fn declared_statistics_are_complete_and_usable() {
    let declared = |provenance: &str, x: &str| {
        format!(
            "{HEAD}[standardize]\nwith = \"declared\"\n{provenance}\n{}",
            COLS.replace("type = \"numeric\"", &format!("type = \"numeric\"\n{x}"))
        )
    };
    let p = "provenance = \"published reference ranges\"";
    ok(&declared(p, "mean = 1.0\nstd = 2.0"));
    refused(&declared(p, "std = 2.0"), "columns[0] 'x'.mean");
    refused(&declared(p, "mean = 1.0"), "columns[0] 'x'.std");
    refused(&declared(p, "mean = 1.0\nstd = 0.0"), "columns[0] 'x'.std");
    refused(&declared(p, "mean = 1.0\nstd = -1.0"), "columns[0] 'x'.std");
    refused(&declared(p, "mean = 1.0\nstd = inf"), "columns[0] 'x'.std");
    refused(&declared(p, "mean = nan\nstd = 1.0"), "columns[0] 'x'.mean");
    refused(&declared("", "mean = 1.0\nstd = 2.0"), "standardize.provenance");
    refused(&declared("provenance = \" \"", "mean = 1.0\nstd = 2.0"), "standardize.provenance");
    refused(
        &declared(&format!("provenance = {:?}", "p".repeat(4097)), "mean = 1.0\nstd = 2.0"),
        "standardize.provenance",
    );
    // Not standardised, so no statistics.
    refused(&declared(p, "standardize = false\nmean = 1.0\nstd = 2.0"), "columns[0] 'x'.mean");
    refused(
        &format!("{}{COLS}", HEAD).replace("type = \"boolean\"", "type = \"boolean\"\nmean = 0.5"),
        "columns[1] 'y'.mean",
    );
    // Statistics without `declared`.
    refused(
        &format!(
            "{HEAD}[standardize]\nwith = \"per_node\"\n{}",
            COLS.replace("type = \"numeric\"", "type = \"numeric\"\nmean = 1.0")
        ),
        "columns[0] 'x'.mean",
    );
    refused(&format!("{HEAD}[standardize]\nwith = \"per_node\"\n{p}\n{COLS}"), "standardize.provenance");
    assert_eq!(
        ok(&format!("{HEAD}[standardize]\nwith = \"per_node\"\n{COLS}")).standardization(),
        &Standardization::PerNodeTrain
    );
    assert_eq!(ok(&with_cols("")).standardization(), &Standardization::None);
}

#[test]
fn standardize_flags_fit_the_column() {
    refused(
        &with_cols("[[columns]]\nname = \"c\"\ntype = \"categorical\"\nlevels = [\"a\"]\nstandardize = true\n"),
        "columns[3] 'c'.standardize",
    );
    // A split column is not a feature: no feature settings on it.
    let split = COLS.replace("levels = [\"train\", \"test\"]", "levels = [\"train\", \"test\"]\nstandardize = true");
    refused(&format!("{HEAD}{split}"), "columns[2] 'split'.standardize");
    let s = ok(&with_cols("[[columns]]\nname = \"b\"\ntype = \"boolean\"\nstandardize = true\n"));
    assert!(s.features()[1].standardize);
}

#[test]
fn dp_standardisation_needs_bounds_and_epsilon() {
    let dp = |eps: &str, x: &str| {
        format!(
            "{HEAD}[standardize]\nwith = \"dp\"\n{eps}\n{}",
            COLS.replace("type = \"numeric\"", &format!("type = \"numeric\"\n{x}"))
        )
    };
    ok(&dp("epsilon = 0.5", "min = 0\nmax = 1"));
    refused(&dp("epsilon = 0.5", "min = 0"), "columns[0] 'x'.min");
    refused(&dp("epsilon = 0.5", ""), "columns[0] 'x'.min");
    refused(&dp("", "min = 0\nmax = 1"), "standardize.epsilon");
    refused(&dp("epsilon = 0.0", "min = 0\nmax = 1"), "standardize.epsilon");
    refused(&dp("epsilon = inf", "min = 0\nmax = 1"), "standardize.epsilon");
    refused(&dp("epsilon = 0.5", "min = 0\nmax = 1\nmean = 0.5"), "columns[0] 'x'.mean");
    // Unstandardised columns need no bounds.
    ok(&dp("epsilon = 0.5", "standardize = false"));
    refused(
        &format!("{HEAD}[standardize]\nwith = \"declared\"\nprovenance = \"p\"\nepsilon = 1.0\n{COLS}"),
        "standardize.epsilon",
    );
}

#[test]
fn split_rules() {
    let hash = |body: &str| {
        format!("{}{}", HEAD.replace("column = \"split\"", body), COLS.replace("name = \"split\"", "name = \"other\""))
    };
    let s = ok(&hash("rule = \"hash\"\ntest_fraction = 0.2"));
    assert_eq!(s.split(), &SplitRule::Hash { seed: 0, test_fraction: 0.2 });
    // Without a split column, a column named like one is a feature.
    assert_eq!(s.features().len(), 3);
    for f in ["0", "0.0", "1.0", "1.5", "-0.1", "nan"] {
        refused(&hash(&format!("rule = \"hash\"\ntest_fraction = {f}")), "split.test_fraction");
    }
    refused(&hash("rule = \"hash\""), "split.test_fraction");
    refused(&hash("rule = \"hash\"\ntest_fraction = 0.2\ntrain = \"a\""), "split.train");
    refused(&hash(""), "schema field split:");
    refused(&hash("rule = \"hash\"\ntest_fraction = 0.2\ncolumn = \"other\""), "schema field split:");
    refused(&format!("{}{COLS}", HEAD.replace("column = \"split\"", "column = \"split\"\nseed = 3")), "split.seed");
    refused(
        &format!("{}{COLS}", HEAD.replace("column = \"split\"", "column = \"split\"\ntest = \"train\"")),
        "split.test",
    );
    // The split column's levels are its train and test values.
    refused(
        &format!("{HEAD}{}", COLS.replace("[\"train\", \"test\"]", "[\"train\", \"valid\"]")),
        "columns[2] 'split'.levels",
    );
    refused(
        &format!("{HEAD}{}", COLS.replace("[\"train\", \"test\"]", "[\"train\", \"test\", \"x\"]")),
        "columns[2] 'split'.levels",
    );
    refused(
        &format!(
            "{HEAD}{}",
            COLS.replace("levels = [\"train\", \"test\"]", "").replace("\"categorical\"", "\"integer\"")
        ),
        "columns[2] 'split'.type",
    );
    let renamed = ok(&format!(
        "{}{}",
        HEAD.replace("column = \"split\"", "column = \"split\"\ntrain = \"0\"\ntest = \"1\""),
        COLS.replace("[\"train\", \"test\"]", "[\"1\", \"0\"]")
    ));
    let SplitRule::Column(sc) = renamed.split() else { panic!() };
    assert_eq!(sc.read(Some(" 1 ")), Ok(Some(Split::Test)));
    assert_eq!(sc.read(Some("0")), Ok(Some(Split::Train)));
    assert_eq!(sc.read(Some("NA")), Err(CellProblem::Missing));
    assert!(matches!(sc.read(Some("2")), Err(CellProblem::UnknownSplit { .. })));
    let text = ok(&format!(
        "{HEAD}{}",
        COLS.replace(
            "type = \"categorical\"\nlevels = [\"train\", \"test\"]",
            "type = \"text\"\nmissing = \"drop_row\""
        )
    ));
    let SplitRule::Column(sc) = text.split() else { panic!() };
    assert_eq!(sc.read(None), Ok(None));
    assert_eq!(sc.read_str(Some("")).map_err(|e| e.rule()), Err("split-train-or-test"));
}

#[test]
fn privacy_unit_rules() {
    let privacy = |body: &str, extra: &str| format!("{}{COLS}{extra}", HEAD.replace("unit = \"row\"", body));
    refused(&privacy("unit = \"patient\"", ""), "privacy.rows_per_patient");
    refused(&privacy("unit = \"patient\"\nrows_per_patient = \"several\"", ""), "privacy.id_column");
    refused(&privacy("unit = \"row\"\nrows_per_patient = \"one\"", ""), "privacy.rows_per_patient");
    let pid = "[[columns]]\nname = \"pid\"\ntype = \"text\"\n";
    refused(&privacy("unit = \"row\"\nid_column = \"pid\"", pid), "privacy.id_column");
    refused(
        &privacy(
            "unit = \"patient\"\nrows_per_patient = \"one\"\nid_column = \"pid\"",
            "[[columns]]\nname = \"pid\"\ntype = \"boolean\"\n",
        ),
        "columns[3] 'pid'.type",
    );
    let s = ok(&privacy("unit = \"patient\"\nrows_per_patient = \"one\"\nid_column = \"pid\"", pid));
    assert_eq!(s.privacy_unit(), PrivacyUnit::Patient(PatientRows::OnePerPatient { id_column: Some(3) }));
    assert_eq!(s.features().len(), 1, "the id column is no feature");
    // A text column can only be an id or split column.
    refused(&with_cols("[[columns]]\nname = \"note\"\ntype = \"text\"\n"), "columns[3] 'note'.type");
}

#[test]
fn a_schema_needs_a_feature() {
    refused(&format!("{HEAD}{}", &COLS[COLS.find("[[columns]]\nname = \"y\"").unwrap()..]), "schema field columns:");
}

#[test]
fn limits_refuse_hostile_files() {
    let mut cols = String::from(COLS);
    for i in 0..limits::MAX_COLUMNS - 2 {
        cols.push_str(&format!("[[columns]]\nname = \"c{i}\"\ntype = \"boolean\"\n"));
    }
    let msg = refused(&format!("{HEAD}{cols}"), "schema field columns:");
    assert!(msg.contains("100000"), "{msg}");
    refused(
        &format!("{}{COLS}", HEAD.replace("name = \"t\"", &format!("name = \"t\"\nversion = {:?}", "v".repeat(257)))),
        "version",
    );
    refused(
        &with_cols(&format!("[[columns]]\nname = \"u\"\ntype = \"numeric\"\nunit = {:?}\n", "u".repeat(257))),
        "columns[3] 'u'.unit",
    );
    let tokens: Vec<String> = (0..=limits::MAX_MISSING_TOKENS).map(|i| format!("\"m{i}\"")).collect();
    refused(&format!("missing_values = [{}]\n{HEAD}{COLS}", tokens.join(",")), "missing_values");
}

// ---------------------------------------------------------------- cells

fn column(kind: &str) -> Column {
    let s = ok(&with_cols(&format!("[[columns]]\nname = \"c\"\n{kind}\n")));
    s.columns()[3].clone()
}

#[test]
fn numeric_cells() {
    let c = column("type = \"numeric\"\nmin = -1\nmax = 10");
    assert_eq!(c.read(Some("3.5")), Ok(CellValue::Number(3.5)));
    assert_eq!(c.read(Some(" 3.5 ")), Ok(CellValue::Number(3.5)));
    assert_eq!(c.read(Some("-1")), Ok(CellValue::Number(-1.0)));
    for missing in [None, Some(""), Some("  "), Some("?"), Some("NA"), Some("NaN")] {
        assert_eq!(c.read(missing), Ok(CellValue::Missing), "{missing:?}");
    }
    assert_eq!(c.read(Some("abc")), Err(CellProblem::NotANumber("abc".into())));
    assert_eq!(c.read(Some("inf")), Err(CellProblem::NotFinite("inf".into())));
    assert_eq!(
        c.read(Some("10.5")),
        Err(CellProblem::OutOfRange { value: "10.5".into(), min: Some("-1".into()), max: Some("10".into()) })
    );
    assert_eq!(c.interpret(Some("")), Err(CellProblem::Missing));
    // Parquet: typed values, and only null is missing.
    assert_eq!(c.read_f64(Some(2.5)), Ok(CellValue::Number(2.5)));
    assert_eq!(c.read_f64(None), Ok(CellValue::Missing));
    assert_eq!(c.read_f64(Some(f64::NAN)).map_err(|e| e.rule()), Err("value-finite"));
    assert_eq!(c.read_i64(Some(7)), Ok(CellValue::Number(7.0)));
    assert_eq!(c.read_i64(Some(11)).map_err(|e| e.rule()), Err("value-in-range"));
    assert_eq!(c.read_bool(Some(true)), Ok(CellValue::Number(1.0)));
    assert_eq!(c.read_str(Some("NA")).map_err(|e| e.rule()), Err("value-numeric"));
    assert_eq!(c.read_str(Some("4")), Ok(CellValue::Number(4.0)));
}

#[test]
fn integer_cells() {
    let c = column("type = \"integer\"\nmin = 0\nmax = 5");
    assert_eq!(c.read(Some("3")), Ok(CellValue::Integer(3)));
    assert_eq!(c.read(Some("3.0")), Ok(CellValue::Integer(3)));
    assert_eq!(c.read(Some("5e0")), Ok(CellValue::Integer(5)));
    assert_eq!(c.read(Some("3.5")), Err(CellProblem::NotAnInteger("3.5".into())));
    assert_eq!(c.read(Some("x")), Err(CellProblem::NotAnInteger("x".into())));
    assert_eq!(c.read(Some("1e30")).map_err(|e| e.rule()), Err("value-integer"));
    assert_eq!(c.read(Some("6")).map_err(|e| e.rule()), Err("value-in-range"));
    assert_eq!(c.read(Some("-0.0")), Ok(CellValue::Integer(0)));
    assert_eq!(c.read_f64(Some(2.0)), Ok(CellValue::Integer(2)));
    assert_eq!(c.read_f64(Some(2.5)).map_err(|e| e.rule()), Err("value-integer"));
    assert_eq!(c.read_i64(Some(5)), Ok(CellValue::Integer(5)));
    assert_eq!(c.read_i64(Some(-1)).map_err(|e| e.rule()), Err("value-in-range"));
    assert_eq!(c.read_bool(Some(false)), Ok(CellValue::Integer(0)));
}

#[test]
fn boolean_cells() {
    let c = column("type = \"boolean\"");
    for (t, v) in [("1", true), ("0", false), ("true", true), ("TRUE", true), ("False", false)] {
        assert_eq!(c.read(Some(t)), Ok(CellValue::Boolean(v)), "{t}");
    }
    for bad in ["yes", "2", "1.0", "t"] {
        assert_eq!(c.read(Some(bad)), Err(CellProblem::NotABoolean(bad.into())), "{bad}");
    }
    assert_eq!(c.read_f64(Some(1.0)), Ok(CellValue::Boolean(true)));
    assert_eq!(c.read_i64(Some(0)), Ok(CellValue::Boolean(false)));
    assert_eq!(c.read_i64(Some(2)).map_err(|e| e.rule()), Err("value-boolean"));
    assert_eq!(c.read_bool(Some(true)), Ok(CellValue::Boolean(true)));
}

#[test]
fn categorical_cells() {
    let c = column("type = \"categorical\"\nlevels = [\"1\", \"2.0\", \"True\", \"x\"]");
    assert_eq!(c.read(Some("x")), Ok(CellValue::Level(3)));
    assert_eq!(c.read(Some("2.0")), Ok(CellValue::Level(1)));
    // Text is matched exactly: "2" is not the level "2.0" in a CSV.
    assert_eq!(c.read(Some("2")), Err(CellProblem::UnknownLevel { value: "2".into(), levels: 4 }));
    assert_eq!(c.read_i64(Some(1)), Ok(CellValue::Level(0)));
    assert_eq!(c.read_i64(Some(2)), Ok(CellValue::Level(1)));
    assert_eq!(c.read_f64(Some(2.0)), Ok(CellValue::Level(1)));
    assert_eq!(c.read_f64(Some(3.0)).map_err(|e| e.rule()), Err("value-known-level"));
    assert_eq!(c.read_bool(Some(true)), Ok(CellValue::Level(2)));
    assert_eq!(c.read_bool(Some(false)).map_err(|e| e.rule()), Err("value-known-level"));
}

#[test]
fn missing_policies() {
    let refuse = column("type = \"numeric\"");
    assert_eq!(refuse.resolve(CellValue::Missing), Err(CellProblem::Missing));
    let drop = column("type = \"numeric\"\nmissing = \"drop_row\"");
    assert_eq!(drop.interpret(Some("?")), Ok(Cell::DropRow));
    let imputed = column("type = \"boolean\"\nmissing = \"impute\"\nimpute = true");
    assert_eq!(imputed.interpret(None), Ok(Cell::Value(CellValue::Boolean(true))));
    assert_eq!(imputed.interpret(Some("0")), Ok(Cell::Value(CellValue::Boolean(false))));
    // A bad cell is a problem under every policy: only a missing one is resolved.
    assert_eq!(drop.interpret(Some("z")), Err(CellProblem::NotANumber("z".into())));
    let own_tokens = ok(&format!("missing_values = [\"-\"]\n{HEAD}{COLS}"));
    assert_eq!(own_tokens.columns()[0].read(Some("-")), Ok(CellValue::Missing));
    assert_eq!(own_tokens.columns()[0].read(Some("NA")).map_err(|e| e.rule()), Err("value-numeric"));
}

#[test]
fn a_long_cell_is_cut_in_the_local_message() {
    let c = column("type = \"numeric\"");
    let long = "é".repeat(10_000);
    let Err(CellProblem::NotANumber(shown)) = c.read(Some(&long)) else { panic!() };
    assert_eq!(shown.chars().count(), 101);
}

/// Every problem a cell can cause, for the `public()` property below.
fn every_problem(raw: &str) -> Vec<CellProblem> {
    let kinds = [
        "type = \"numeric\"\nmin = 0\nmax = 1",
        "type = \"integer\"\nmin = 0\nmax = 1",
        "type = \"boolean\"",
        "type = \"categorical\"\nlevels = [\"a\", \"b\"]",
    ];
    let mut out: Vec<CellProblem> = kinds.iter().filter_map(|k| column(k).read(Some(raw)).err()).collect();
    out.push(CellProblem::DuplicatePatient { id: raw.to_string() });
    out.push(CellProblem::UnknownSplit { value: raw.to_string(), train: "train".into(), test: "test".into() });
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// A finite value within bounds, written as Rust writes it, reads back as the same f64, from
    /// text and from Parquet.
    #[test]
    fn numeric_round_trip(lo in -1e6f64..0.0, width in 0.0f64..1e6, t in 0.0f64..=1.0) {
        let hi = lo + width;
        let v = (lo + t * width).clamp(lo, hi);
        let c = column(&format!("type = \"numeric\"\nmin = {lo:?}\nmax = {hi:?}"));
        prop_assert_eq!(c.read(Some(&format!("{v}"))), Ok(CellValue::Number(v)));
        prop_assert_eq!(c.read_f64(Some(v)), Ok(CellValue::Number(v)));
        let above = format!("{}", hi + 1.0);
        prop_assert_eq!(c.read(Some(&above)).map_err(|e| e.rule()), Err("value-in-range"));
    }

    /// Any f64 at all reads as itself in an unbounded column, or as not finite.
    #[test]
    fn any_f64_reads_back(v in any::<f64>()) {
        let c = column("type = \"numeric\"");
        let got = c.read(Some(&format!("{v}")));
        if v.is_finite() {
            prop_assert_eq!(got, Ok(CellValue::Number(v)));
        } else if v.is_nan() {
            prop_assert_eq!(got, Ok(CellValue::Missing)); // "NaN" is a default missing token
        } else {
            prop_assert_eq!(got.map_err(|e| e.rule()), Err("value-finite"));
        }
    }

    /// Integers read within [min, max] as themselves (also written `n.0`), outside as out of range.
    #[test]
    fn integer_range(lo in -1000i64..1000, width in 0i64..1000, v in -3000i64..3000) {
        let hi = lo + width;
        let c = column(&format!("type = \"integer\"\nmin = {lo}\nmax = {hi}"));
        let expected = if (lo..=hi).contains(&v) { Ok(CellValue::Integer(v)) } else { Err("value-in-range") };
        prop_assert_eq!(c.read(Some(&v.to_string())).map_err(|e| e.rule()), expected);
        prop_assert_eq!(c.read(Some(&format!("{v}.0"))).map_err(|e| e.rule()), expected);
        prop_assert_eq!(c.read_i64(Some(v)).map_err(|e| e.rule()), expected);
    }

    /// Each declared level reads as its index; anything else is unknown.
    #[test]
    fn levels_read_as_their_index(
        levels in proptest::collection::hash_set("[a-z0-9]{1,8}", 1..30),
        probe in "[a-z0-9]{1,8}",
    ) {
        let levels: Vec<String> = levels.into_iter().collect();
        let list = levels.iter().map(|l| format!("{l:?}")).collect::<Vec<_>>().join(", ");
        let c = column(&format!("type = \"categorical\"\nlevels = [{list}]"));
        for (i, l) in levels.iter().enumerate() {
            prop_assert_eq!(c.read(Some(l)), Ok(CellValue::Level(i)));
        }
        let expected = levels.iter().position(|l| *l == probe).map(CellValue::Level).ok_or(levels.len());
        let got = c.read(Some(&probe)).map_err(|e| match e {
            CellProblem::UnknownLevel { levels, .. } => levels,
            _ => usize::MAX,
        });
        prop_assert_eq!(got, expected);
    }

    /// `public()` never shows the cell; `Display` does (for the local log). The marker `#` is
    /// in no public wording, bound or level, so any leak of the value would show it.
    #[test]
    fn public_wording_never_holds_the_value(body in "[ -~]{0,40}") {
        let raw = format!("#{}#", body.trim());
        for p in every_problem(&raw) {
            prop_assert!(!p.public().contains('#'), "{:?} -> {}", p, p.public());
            prop_assert!(p.to_string().contains('#'), "{:?} -> {}", p, p);
        }
    }
}
