//! A consortium's own data, through the real processes: tables no one here has seen, with schema
//! files written from the schema format alone, trained end to end.
//!
//! - a survival table at three hospitals, each naming its columns its own way (mapped with
//!   `[datasets.columns]`), with a categorical column one-hot encoded, missing values dropped and
//!   imputed, a patient id and the hash split, trained as a linear Cox model with FedAvg: every
//!   hospital reports a C-index well above chance on data with a real signal;
//! - the rare-disease shape: 5,000 binary variant columns, 1 % positive labels, four hospitals
//!   (two CSV, two Parquet); `data check` takes seconds, a class-weighted logistic regression
//!   trains and every hospital reports AUROC and balanced accuracy, the node's memory bounded.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed step is a failed test

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sanctum_protocol::hash::ContentHash;
use sanctum_protocol::proto::PlanFinished;
use sanctum_tests::peer::lead_client;
use sanctum_tests::{Consortium, CoordinatorProcess, NodeProcess, bin, follow_run, submit_and_watch};

/// splitmix64: a small seeded generator, so every run makes the same tables.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform().max(1e-12), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
    fn exponential(&mut self, rate: f64) -> f64 {
        -(1.0 - self.uniform()).ln() / rate
    }
}

/// `metric` of every node in the final evaluation, by node.
fn final_metric(finished: &PlanFinished, metric: &str) -> std::collections::BTreeMap<String, f64> {
    finished.final_metrics.iter().filter(|m| m.name == metric).map(|m| (m.node.clone(), m.value)).collect()
}

/// The survival schema, written from the schema format (design notes and the examples' schema
/// files), as a consortium would write it for its own registry.
const SURVIVAL_SCHEMA: &str = r#"# A made-up cancer registry: time to death or censoring, four covariates.
name = "registry_survival"
version = "1"
description = "synthetic survival registry for the end-to-end test"
task = "survival"
missing_values = ["", "NA", "unknown"]

[target]
time = "time"
event = "event"

[split]
rule = "hash"
test_fraction = 0.3
seed = 11

[privacy]
unit = "patient"
rows_per_patient = "one"
id_column = "patient_id"

[standardize]
with = "per_node"

[[columns]]
name = "patient_id"
type = "text"

[[columns]]
name = "age"
type = "numeric"
unit = "years"
min = 18.0
max = 100.0
missing = "impute"
impute = 60.0

[[columns]]
name = "marker"
type = "numeric"
unit = "mg/l"
min = 0.0
max = 50.0
missing = "drop_row"

[[columns]]
name = "stage"
type = "categorical"
levels = ["I", "II", "III"]
encoding = "one_hot"

[[columns]]
name = "smoker"
type = "boolean"
missing = "impute"
impute = false

[[columns]]
name = "time"
type = "numeric"
unit = "days"
min = 0.0

[[columns]]
name = "event"
type = "boolean"
"#;

/// Model inputs of [`SURVIVAL_SCHEMA`]: age, marker, stage=I, stage=II, stage=III, smoker.
const SURVIVAL_INPUTS: usize = 6;

/// One hospital of the survival test: its name, its own column names (in the schema's column
/// order) and its number of rows.
struct Hospital {
    name: &'static str,
    columns: [&'static str; 7],
    rows: usize,
}

const SCHEMA_COLUMNS: [&str; 7] = ["patient_id", "age", "marker", "stage", "smoker", "time", "event"];

/// Writes `h`'s table: hazard exp(0.9·z_age + 1.1·z_marker + 0.8·[stage III]), exponential
/// times, independent exponential censoring (about a third censored); a few ages missing
/// (imputed) and a few markers missing (rows dropped). Columns in the hospital's own order
/// (reversed at odd hospitals), returning the rows a `drop_row` leaves out.
fn write_survival_table(path: &Path, h: &Hospital, rng: &mut Rng, reversed: bool) -> usize {
    let mut order: Vec<usize> = (0..7).collect();
    if reversed {
        order.reverse();
    }
    let mut text = order.iter().map(|&i| h.columns[i]).collect::<Vec<_>>().join(",") + "\n";
    let mut dropped = 0;
    for r in 0..h.rows {
        let age = (62.0 + 10.0 * rng.normal()).clamp(20.0, 95.0);
        let marker = (8.0 + 4.0 * rng.normal()).clamp(0.1, 45.0);
        let stage = ["I", "II", "III"][(rng.uniform() * 3.0) as usize];
        let smoker = rng.uniform() < 0.3;
        let risk = 0.9 * (age - 62.0) / 10.0 + 1.1 * (marker - 8.0) / 4.0 + if stage == "III" { 0.8 } else { 0.0 };
        let t_event = rng.exponential(0.002 * f64::exp(risk));
        let t_censor = rng.exponential(0.001);
        let (time, event) = if t_event <= t_censor { (t_event, true) } else { (t_censor, false) };
        let age_cell = if r % 23 == 5 { String::new() } else { format!("{age:.1}") };
        let marker_cell = if r % 31 == 7 {
            dropped += 1;
            "NA".to_string()
        } else {
            format!("{marker:.2}")
        };
        let smoker_cell =
            if r % 37 == 3 { "unknown".to_string() } else { (if smoker { "1" } else { "0" }).to_string() };
        let cells = [
            format!("{}-{r:04}", h.name.to_uppercase()),
            age_cell,
            marker_cell,
            stage.to_string(),
            smoker_cell,
            format!("{:.1}", time.max(0.5)),
            (if event { "true" } else { "false" }).to_string(),
        ];
        let line: Vec<&str> = order.iter().map(|&i| cells[i].as_str()).collect();
        writeln!(text, "{}", line.join(",")).unwrap();
    }
    std::fs::write(path, text).unwrap();
    dropped
}

/// The `[[datasets]]` table of a hospital: its schema file, its table and its column names.
fn datasets_block(schema: &Path, data: &Path, format: Option<&str>, mapping: &[(&str, &str)]) -> String {
    let mut block = format!("[[datasets]]\nschema = {schema:?}\npath = {data:?}\n");
    if let Some(f) = format {
        writeln!(block, "format = {f:?}").unwrap();
    }
    if !mapping.is_empty() {
        block.push_str("[datasets.columns]\n");
        for (schema_col, file_col) in mapping {
            writeln!(block, "{schema_col} = {file_col:?}").unwrap();
        }
    }
    block
}

#[tokio::test]
async fn a_survival_table_from_outside_the_repository_trains_end_to_end_with_its_own_column_names() {
    let started = Instant::now();
    let c = Consortium::new();
    let dir = c.dir.path().join("registry");
    std::fs::create_dir_all(&dir).unwrap();
    let schema = dir.join("schema.toml");
    std::fs::write(&schema, SURVIVAL_SCHEMA).unwrap();
    let hospitals = [
        Hospital {
            name: "north",
            columns: ["pid", "AGE_YRS", "CRP_mg_l", "TumourStage", "smokes", "days_to_event", "died"],
            rows: 320,
        },
        Hospital {
            name: "south",
            columns: ["PatientID", "age_years", "crp", "stage_ajcc", "smoker_flag", "surv_days", "status"],
            rows: 280,
        },
        Hospital {
            name: "east",
            columns: ["mrn", "Age", "Marker (mg/l)", "Stage", "Smoker", "FollowUp", "Event"],
            rows: 300,
        },
    ];
    let coord = CoordinatorProcess::start(&c);
    let mut rng = Rng(20_240_611);
    let mut nodes = Vec::new();
    for (i, h) in hospitals.iter().enumerate() {
        let data = dir.join(format!("{}.csv", h.name));
        let dropped = write_survival_table(&data, h, &mut rng, i % 2 == 1);
        let mapping: Vec<(&str, &str)> = SCHEMA_COLUMNS.iter().copied().zip(h.columns.iter().copied()).collect();
        // The steward's check first, with the same mapping as node.toml.
        let mut check = Command::new(bin("sanctum-node"));
        check.args(["data", "check", "--json", "--schema"]).arg(&schema).arg("--data").arg(&data);
        for (s, f) in &mapping {
            check.arg("--map").arg(format!("{s}={f}"));
        }
        let out = check.env_remove("LD_LIBRARY_PATH").output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "data check of {}: {stdout}\n{}", h.name, String::from_utf8_lossy(&out.stderr));
        let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        let (train, test) = (report["train_rows"].as_u64().unwrap(), report["test_rows"].as_u64().unwrap());
        println!(
            "{}: {} rows, {train} train + {test} test, {} dropped (marker missing), age imputed {} times",
            h.name, h.rows, report["columns"]["marker"]["dropped_rows"], report["columns"]["age"]["missing"]
        );
        assert_eq!(report["features"], SURVIVAL_INPUTS);
        assert_eq!(report["columns"]["marker"]["dropped_rows"], dropped as u64);
        assert_eq!((train + test) as usize, h.rows - dropped, "{}: rows kept", h.name);
        let block = datasets_block(&schema, &data, None, &mapping);
        nodes.push(NodeProcess::start_with_datasets(
            &c,
            h.name,
            &coord.address(),
            &block,
            "allowed_models = [\"cox\"]",
        ));
    }
    coord.wait_for_nodes(hospitals.len());

    let sha = ContentHash::of(SURVIVAL_SCHEMA.as_bytes()).to_hex();
    let plan = format!(
        "name = \"registry-cox\"\nseed = 3\nrounds = 4\nmin_nodes = 3\nround_deadline_secs = 120\nrecruit_deadline_secs = 30\n\
         [model]\nkind = \"cox\"\ninputs = {SURVIVAL_INPUTS}\n\
         [data]\nschema = \"registry_survival\"\nschema_sha256 = \"{sha}\"\n\
         [local]\nsteps = 25\nbatch_size = 32\noptimizer = \"sgd\"\nlearning_rate = 0.1\n\
         [strategy]\nkind = \"fedavg\"\nweighting = \"samples\"\n"
    );
    let mut lead = lead_client(&c, &coord).await;
    let (_, mut events) = submit_and_watch(&mut lead, plan).await;
    let (decisions, finished) = follow_run(&mut events, 240).await;
    for d in &decisions {
        assert!(d.accepted, "{} refused: {}", d.node, d.reason);
    }
    assert!(finished.success, "{}", finished.reason);
    assert_eq!(finished.rounds_completed, 4);
    let c_index = final_metric(&finished, "c_index");
    println!("final C-index per hospital: {c_index:?} (wall {:.1} s)", started.elapsed().as_secs_f64());
    assert_eq!(c_index.len(), 3, "every hospital reports its C-index: {:?}", finished.final_metrics);
    for (node, v) in &c_index {
        assert!(*v > 0.5, "{node}: C-index {v} is not above chance");
    }
    let mean = c_index.values().sum::<f64>() / 3.0;
    // The true risk separates patients well (Harrell's C of the true risk is about 0.8 here).
    assert!(mean > 0.65, "mean C-index {mean}");
}

/// Number of variant columns of the rare-disease table.
const VARIANTS: usize = 5_000;
/// The columns that carry the signal.
const SIGNAL: usize = 5;

/// The rare-disease schema: 5,000 boolean variant columns, a boolean label, a split column.
fn variant_schema() -> String {
    let mut s = String::from(
        "name = \"rare_variants\"\nversion = \"1\"\ndescription = \"synthetic rare-disease variant calls\"\ntask = \"binary\"\n\
         [target]\nlabel = \"affected\"\n[split]\ncolumn = \"split\"\n[privacy]\nunit = \"patient\"\nrows_per_patient = \"one\"\n\
         [standardize]\nwith = \"none\"\n",
    );
    for v in 0..VARIANTS {
        writeln!(s, "[[columns]]\nname = \"v{v:04}\"\ntype = \"boolean\"").unwrap();
    }
    s.push_str("[[columns]]\nname = \"affected\"\ntype = \"boolean\"\n");
    s.push_str("[[columns]]\nname = \"split\"\ntype = \"categorical\"\nlevels = [\"train\", \"test\"]\n");
    s
}

/// One hospital's variant rows: 600 patients, exactly 6 affected (1 %), 4 in train and 2 in test
/// (so AUROC is defined on every test split). Affected patients carry each signal variant with
/// probability 0.9, others with 0.05; every other variant is present with probability 0.02.
struct Variants {
    calls: Vec<Vec<bool>>,
    affected: Vec<bool>,
    test: Vec<bool>,
}

fn variant_rows(rng: &mut Rng) -> Variants {
    const ROWS: usize = 600;
    let affected_rows = [17usize, 150, 299, 420, 481, 556];
    let mut v = Variants { calls: Vec::with_capacity(ROWS), affected: vec![false; ROWS], test: vec![false; ROWS] };
    for r in 0..ROWS {
        // Every fifth row is test; two of the affected rows (150, 420) fall on it.
        v.test[r] = r % 5 == 0;
        v.affected[r] = affected_rows.contains(&r);
        let row = (0..VARIANTS)
            .map(|c| {
                let p = match (c < SIGNAL, v.affected[r]) {
                    (true, true) => 0.9,
                    (true, false) => 0.05,
                    (false, _) => 0.02,
                };
                rng.uniform() < p
            })
            .collect();
        v.calls.push(row);
    }
    assert_eq!(affected_rows.iter().filter(|&&r| v.test[r]).count(), 2, "fixture: two affected test rows");
    v
}

fn write_variants_csv(path: &Path, v: &Variants) {
    let mut text = String::with_capacity(v.calls.len() * (VARIANTS * 2 + 16));
    for c in 0..VARIANTS {
        write!(text, "v{c:04},").unwrap();
    }
    text.push_str("affected,split\n");
    for (r, row) in v.calls.iter().enumerate() {
        for &b in row {
            text.push_str(if b { "1," } else { "0," });
        }
        text.push_str(if v.affected[r] { "1," } else { "0," });
        text.push_str(if v.test[r] { "test\n" } else { "train\n" });
    }
    std::fs::write(path, text).unwrap();
}

/// Writes the rows as Parquet (BOOLEAN variant and label columns, a UTF-8 split column), in row
/// groups of 256 rows, with the `parquet` crate's column writers.
fn write_variants_parquet(path: &Path, v: &Variants) {
    use parquet::data_type::{BoolType, ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;

    let mut message = String::from("message variants {\n");
    for c in 0..VARIANTS {
        writeln!(message, "  REQUIRED BOOLEAN v{c:04};").unwrap();
    }
    message.push_str("  REQUIRED BOOLEAN affected;\n  REQUIRED BYTE_ARRAY split (UTF8);\n}\n");
    let schema = Arc::new(parse_message_type(&message).unwrap());
    let props = Arc::new(WriterProperties::builder().build());
    let mut writer = SerializedFileWriter::new(std::fs::File::create(path).unwrap(), schema, props).unwrap();
    for rows in (0..v.calls.len()).collect::<Vec<_>>().chunks(256) {
        let mut group = writer.next_row_group().unwrap();
        for c in 0..VARIANTS + 2 {
            let mut col = group.next_column().unwrap().unwrap();
            if c < VARIANTS {
                let values: Vec<bool> = rows.iter().map(|&r| v.calls[r][c]).collect();
                col.typed::<BoolType>().write_batch(&values, None, None).unwrap();
            } else if c == VARIANTS {
                let values: Vec<bool> = rows.iter().map(|&r| v.affected[r]).collect();
                col.typed::<BoolType>().write_batch(&values, None, None).unwrap();
            } else {
                let values: Vec<ByteArray> =
                    rows.iter().map(|&r| ByteArray::from(if v.test[r] { "test" } else { "train" })).collect();
                col.typed::<ByteArrayType>().write_batch(&values, None, None).unwrap();
            }
            col.close().unwrap();
        }
        group.close().unwrap();
    }
    writer.close().unwrap();
}

#[tokio::test]
async fn a_rare_disease_variant_table_checks_in_seconds_and_trains_with_class_weights_within_memory_bounds() {
    let started = Instant::now();
    let c = Consortium::new();
    let dir = c.dir.path().join("variants");
    std::fs::create_dir_all(&dir).unwrap();
    let schema_text = variant_schema();
    let schema = dir.join("schema.toml");
    std::fs::write(&schema, &schema_text).unwrap();
    let mut rng = Rng(7);
    let names = ["lyon", "leiden", "graz", "porto"];
    let mut files = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let rows = variant_rows(&mut rng);
        let path = if i < 2 {
            let p = dir.join(format!("{name}.csv"));
            write_variants_csv(&p, &rows);
            p
        } else {
            let p = dir.join(format!("{name}.parquet"));
            write_variants_parquet(&p, &rows);
            p
        };
        files.push(path);
    }
    println!("tables written in {:.1} s", started.elapsed().as_secs_f64());

    // `data check` on a CSV and on a Parquet table: seconds, and the right counts.
    for file in [&files[0], &files[2]] {
        let t = Instant::now();
        let out = Command::new(bin("sanctum-node"))
            .args(["data", "check", "--json", "--schema"])
            .arg(&schema)
            .arg("--data")
            .arg(file)
            .env_remove("LD_LIBRARY_PATH")
            .output()
            .unwrap();
        let wall = t.elapsed();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "data check {}: {stdout}\n{}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        println!(
            "data check {}: {:.2} s wall ({} s inside), {} rows, {} train, {} test, {} features, {} bytes",
            file.file_name().unwrap().to_string_lossy(),
            wall.as_secs_f64(),
            report["seconds"],
            report["rows"],
            report["train_rows"],
            report["test_rows"],
            report["features"],
            std::fs::metadata(file).unwrap().len()
        );
        assert_eq!(report["rows"], 600);
        assert_eq!(report["test_rows"], 120);
        assert_eq!(report["features"], VARIANTS);
        assert_eq!(report["columns"]["affected"]["valid"], 600);
        assert!(wall < Duration::from_secs(30), "data check took {wall:?}");
    }

    let coord = CoordinatorProcess::start(&c);
    let nodes: Vec<NodeProcess> = names
        .iter()
        .zip(&files)
        .map(|(name, file)| {
            let block = datasets_block(&schema, file, None, &[]);
            NodeProcess::start_with_datasets(
                &c,
                name,
                &coord.address(),
                &block,
                "allowed_models = [\"logistic_regression\"]",
            )
        })
        .collect();
    coord.wait_for_nodes(names.len());
    let baseline: Vec<u64> = nodes.iter().map(NodeProcess::peak_rss_kib).collect();

    let sha = ContentHash::of(schema_text.as_bytes()).to_hex();
    let plan = format!(
        "name = \"rare-variants\"\nseed = 1\nrounds = 3\nmin_nodes = 4\nround_deadline_secs = 120\nrecruit_deadline_secs = 60\n\
         [model]\nkind = \"logistic_regression\"\ninputs = {VARIANTS}\n\
         [data]\nschema = \"rare_variants\"\nschema_sha256 = \"{sha}\"\n\
         [local]\nsteps = 20\nbatch_size = 64\noptimizer = \"sgd\"\nlearning_rate = 0.05\nclass_weights = [1.0, 99.0]\n\
         [strategy]\nkind = \"fedavg\"\nweighting = \"samples\"\n"
    );
    let mut lead = lead_client(&c, &coord).await;
    let t = Instant::now();
    let (_, mut events) = submit_and_watch(&mut lead, plan).await;
    let (decisions, finished) = follow_run(&mut events, 300).await;
    for d in &decisions {
        assert!(d.accepted, "{} refused: {}", d.node, d.reason);
    }
    assert!(finished.success, "{}", finished.reason);
    assert_eq!(finished.rounds_completed, 3);
    let auroc = final_metric(&finished, "auroc");
    let balanced = final_metric(&finished, "balanced_accuracy");
    println!("plan ran in {:.1} s; final AUROC {auroc:?}; balanced accuracy {balanced:?}", t.elapsed().as_secs_f64());
    println!("accuracy {:?}", final_metric(&finished, "accuracy"));
    assert_eq!(auroc.len(), 4, "AUROC from every hospital: {:?}", finished.final_metrics);
    assert_eq!(balanced.len(), 4, "balanced accuracy from every hospital: {:?}", finished.final_metrics);
    for v in auroc.values().chain(balanced.values()) {
        assert!((0.0..=1.0).contains(v), "{v}");
    }
    // The class weights are what learns the rare class here: the same plan without them ends
    // with every hospital's AUROC below 0.4 (measured with `simulate`: 0.20-0.35; 60 steps in,
    // the many negative rows push every present variant's weight down, and affected patients
    // carry a few more variants), with them at 1.0.
    let mean_auroc = auroc.values().sum::<f64>() / 4.0;
    assert!(mean_auroc > 0.6, "the signal variants were not learnt: mean AUROC {mean_auroc}");

    // Memory: 600 × 5,000 features are 12 MB as f32 (the node keeps them once, in f32). The
    // bound: loading and training add at most 256 MiB to what the node held when it connected
    // (libtorch itself, about 360 MiB on CPU), and the peak stays under 2 GiB.
    const GROWTH_KIB: u64 = 256 * 1024;
    const PEAK_KIB: u64 = 2048 * 1024;
    for ((name, node), base) in names.iter().zip(&nodes).zip(&baseline) {
        let peak = node.peak_rss_kib();
        println!(
            "{name}: node peak RSS {} MiB, {} MiB at connection (+{} MiB)",
            peak / 1024,
            base / 1024,
            peak.saturating_sub(*base) / 1024
        );
        assert!(peak > 0 && *base > 0, "{name}: no /proc status for pid {}", node.pid());
        assert!(peak - base < GROWTH_KIB, "{name}: the plan grew the node by {} KiB", peak - base);
        assert!(peak < PEAK_KIB, "{name}: node peak RSS {peak} KiB above {PEAK_KIB} KiB");
    }
    println!("wall {:.1} s", started.elapsed().as_secs_f64());
}
