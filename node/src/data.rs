//! Loads a hospital's CSV and validates it against a plan's schema. Errors come in two forms: the
//! full one (`Display`: path, line, column, the offending value) for the node's own log, so the
//! data steward can fix the row, and [`DataError::public_reason`] for the lead, which names the
//! rule, the file name, the line and the schema's column, never a cell value or a header. Which
//! statistics standardise the features is the caller's explicit choice ([`Standardize`]), made by
//! [`admit`] from the plan's privacy: under DP only the schema's public statistics may, because a
//! model trained on data scaled by the exact private mean and standard deviation carries them out
//! of the hospital uncharged.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use sanctum_protocol::plan::PrivacyMode;
use sanctum_protocol::schema::{DeclaredStatistics, PatientRows, PrivacyUnit, Schema, Standardization};

/// A validated, standardised local dataset (row-major features).
#[derive(Debug, Clone)]
pub struct LocalData {
    pub features: usize,
    /// The train split's own mean and standard deviation (ddof = 1) per feature, before
    /// standardisation, whichever statistics standardised it (for `check` and tests). They never
    /// leave the node; under [`Standardize::Declared`] nothing that leaves depends on them.
    pub train_mean: Vec<f64>,
    pub train_std: Vec<f64>,
    pub train_x: Vec<f32>,
    pub train_y: Vec<f32>,
    pub test_x: Vec<f32>,
    pub test_y: Vec<f32>,
}

impl LocalData {
    pub fn train_len(&self) -> usize {
        self.train_y.len()
    }
    pub fn test_len(&self) -> usize {
        self.test_y.len()
    }
}

/// Which statistics [`load`] standardises the features with.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Standardize {
    /// Features as they are (the schema standardises nothing).
    Off,
    /// The node's own train-split mean and standard deviation (FLamby's per-center
    /// normalisation): only for plans without DP, since the model's scale then depends on them.
    PerNode,
    /// The schema's public statistics, the same at every node.
    Declared(&'static DeclaredStatistics),
}

impl fmt::Display for Standardize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Standardize::Off => f.write_str("no standardisation"),
            Standardize::PerNode => f.write_str("this node's own train-split mean and standard deviation"),
            Standardize::Declared(stats) => write!(f, "the schema's declared statistics ({})", stats.provenance),
        }
    }
}

/// A schema-level rule that refuses a plan's privacy before any data is read. The message names
/// the rule and the schema and nothing of the hospital's data, so it may go to the lead as it is.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RuleBroken {
    #[error(
        "rule dp-public-standardization: under differential privacy a node standardises only with public statistics declared with the schema, and schema '{schema}' declares none (its own train-split mean and standard deviation would leave in the model uncharged); run the plan without DP or declare the statistics in the schema"
    )]
    NoDeclaredStatistics { schema: &'static str },
    #[error(
        "rule dp-privacy-unit: schema '{schema}' protects patients and a patient may have several rows (column '{id_column}'), but DP-SGD here samples and clips rows, so ε would not bound what the model reveals about a patient; use client-level DP or a plan without DP"
    )]
    SeveralRowsPerPatient { schema: &'static str, id_column: &'static str },
}

/// The standardisation a plan with this privacy may use on `schema`, or the rule that refuses
/// the plan. Plans without DP keep per-node statistics so non-DP results stay FLamby's.
/// Client-level DP is not refused for several rows per patient: it clips and noises a hospital's
/// whole update, which bounds every row of every patient at once.
pub fn admit(schema: &Schema, privacy: PrivacyMode) -> Result<Standardize, RuleBroken> {
    if let (PrivacyMode::Example, PrivacyUnit::Patient(PatientRows::Several { id_column })) =
        (privacy, schema.privacy_unit)
    {
        return Err(RuleBroken::SeveralRowsPerPatient { schema: schema.name, id_column });
    }
    match (schema.standardization, privacy) {
        (Standardization::None, _) => Ok(Standardize::Off),
        (Standardization::PerNodeTrain | Standardization::Declared(_), PrivacyMode::None) => Ok(Standardize::PerNode),
        (Standardization::Declared(stats), PrivacyMode::Example | PrivacyMode::Client) => {
            Ok(Standardize::Declared(stats))
        }
        (Standardization::PerNodeTrain, PrivacyMode::Example | PrivacyMode::Client) => {
            Err(RuleBroken::NoDeclaredStatistics { schema: schema.name })
        }
    }
}

/// [`admit`] with the plan's own choice of statistics (`[data] standardize`): `declared` uses the
/// schema's public statistics also without DP; `per_node` is refused under DP.
pub fn admit_plan(schema: &Schema, plan: &sanctum_protocol::plan::Plan) -> Result<Standardize, RuleBroken> {
    use sanctum_protocol::plan::StandardizeWith;
    let default = admit(schema, plan.privacy.mode)?;
    match (plan.data.standardize, plan.privacy.mode, schema.standardization) {
        (None, ..) => Ok(default),
        (Some(StandardizeWith::Declared), _, Standardization::Declared(stats)) => Ok(Standardize::Declared(stats)),
        (Some(StandardizeWith::Declared), ..) => Err(RuleBroken::NoDeclaredStatistics { schema: schema.name }),
        (Some(StandardizeWith::PerNode), PrivacyMode::None, _) => Ok(default),
        (Some(StandardizeWith::PerNode), ..) => Err(RuleBroken::NoDeclaredStatistics { schema: schema.name }),
    }
}

/// What is wrong with one cell. `Display` shows the value (local log only).
#[derive(Debug, Clone, PartialEq)]
pub enum CellProblem {
    Missing,
    NotANumber(String),
    NotFinite(String),
    LabelNotBinary(f64),
    UnknownSplit(String),
    /// A patient id seen before, on `first_line`, where the schema promises one row per patient.
    DuplicatePatient {
        id: String,
        first_line: u64,
    },
}

impl CellProblem {
    /// The rule broken, and what is wrong in words that hold no value from the file (nor a line
    /// number unless `lines`).
    fn public(&self, lines: bool) -> (&'static str, String) {
        match self {
            CellProblem::Missing => ("value-present", "value is missing".into()),
            CellProblem::NotANumber(_) => ("value-numeric", "value is not a number".into()),
            CellProblem::NotFinite(_) => ("value-finite", "value is not a finite number".into()),
            CellProblem::LabelNotBinary(_) => ("label-binary", "label is not 0 or 1".into()),
            CellProblem::UnknownSplit(_) => ("split-train-or-test", "value is neither 'train' nor 'test'".into()),
            CellProblem::DuplicatePatient { first_line, .. } if lines => {
                ("one-row-per-patient", format!("the patient id already appears on line {first_line}"))
            }
            CellProblem::DuplicatePatient { .. } => {
                ("one-row-per-patient", "the patient id already appears on an earlier row".into())
            }
        }
    }
}

impl fmt::Display for CellProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CellProblem::Missing => f.write_str("value is missing; fix or remove the row"),
            CellProblem::NotANumber(raw) => write!(f, "'{raw}' is not a number; fix or remove the row"),
            CellProblem::NotFinite(raw) => write!(f, "'{raw}' is not a finite number; fix or remove the row"),
            CellProblem::LabelNotBinary(v) => write!(f, "label {v} is not 0 or 1"),
            CellProblem::UnknownSplit(raw) => write!(f, "'{raw}' is neither 'train' nor 'test'"),
            CellProblem::DuplicatePatient { id, first_line } => write!(
                f,
                "patient id '{id}' already appears on line {first_line}, but the schema promises one row per patient; merge or remove the duplicate"
            ),
        }
    }
}

/// What is wrong with a whole row or the header. `detail` is the CSV reader's own message
/// (local log only).
#[derive(Debug, Clone, PartialEq)]
pub enum RowProblem {
    UnreadableHeader { detail: String },
    FieldCount { expected: u64, found: u64, detail: String },
    Unparseable { detail: String },
}

impl RowProblem {
    fn of(e: &csv::Error) -> RowProblem {
        match e.kind() {
            csv::ErrorKind::UnequalLengths { expected_len, len, .. } => {
                RowProblem::FieldCount { expected: *expected_len, found: *len, detail: e.to_string() }
            }
            _ => RowProblem::Unparseable { detail: e.to_string() },
        }
    }

    fn public(&self) -> (&'static str, String) {
        match self {
            RowProblem::UnreadableHeader { .. } => ("csv-header", "the header cannot be read as UTF-8 CSV".into()),
            RowProblem::FieldCount { expected, found, .. } => {
                ("csv-field-count", format!("the row has {found} fields, the header has {expected}"))
            }
            RowProblem::Unparseable { .. } => ("csv-well-formed", "the row cannot be read as UTF-8 CSV".into()),
        }
    }
}

impl fmt::Display for RowProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RowProblem::UnreadableHeader { detail } => write!(f, "unreadable header: {detail}"),
            RowProblem::FieldCount { detail, .. } | RowProblem::Unparseable { detail } => f.write_str(detail),
        }
    }
}

/// Why a data file cannot be used. `Display` is the full detail for the node's own log;
/// [`DataError::public_reason`] is what may be sent to the lead.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read data file {path}: {source}; check datasets.path in the node config")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: column '{column}' required by schema '{schema}' is missing (header has: {found})")]
    MissingColumn { path: PathBuf, column: &'static str, schema: &'static str, found: String },
    /// `name` is the schema's name for the column (the file's header matched it exactly).
    #[error("{path} line {line}, column {column} ({name}): {problem}")]
    Cell { path: PathBuf, line: u64, column: usize, name: &'static str, problem: CellProblem },
    #[error("{path} line {line}: {problem}")]
    Row { path: PathBuf, line: u64, problem: RowProblem },
    #[error("{path}: the {split} split is empty; the schema needs rows with {column} = {split}")]
    EmptySplit { path: PathBuf, split: &'static str, column: &'static str },
}

impl DataError {
    /// The refusal reason for the lead: the rule broken, the file's name (not its path), the line
    /// and the schema's column name. Never a cell value nor a header the schema does not name:
    /// those can be patient data, and the full message is in the node's log. With `lines` false
    /// (the policy withholds dataset sizes) not the line either: a line number is a lower bound
    /// on the number of rows.
    pub fn public_reason(&self, lines: bool) -> String {
        const SEE_LOG: &str = "the hospital's node log has the detail";
        let at = |line: &u64| if lines { format!("line {line}") } else { "a row".to_string() };
        match self {
            DataError::Read { path, source } => format!(
                "rule data-file-readable: data file '{}' cannot be read ({}); the hospital should check datasets.path in its node config",
                file_name(path),
                source.kind()
            ),
            DataError::MissingColumn { path, column, schema, .. } => format!(
                "rule schema-columns: '{}' has no column '{column}', which schema '{schema}' requires; {SEE_LOG}",
                file_name(path)
            ),
            DataError::Cell { path, line, column, name, problem } => {
                let (rule, what) = problem.public(lines);
                format!("rule {rule}: '{}' {}, column {column} ({name}): {what}; {SEE_LOG}", file_name(path), at(line))
            }
            DataError::Row { path, line, problem } => {
                let (rule, what) = problem.public();
                format!("rule {rule}: '{}' {}: {what}; {SEE_LOG}", file_name(path), at(line))
            }
            DataError::EmptySplit { path, split, column } => {
                format!("rule splits-non-empty: '{}' has no row with {column} = {split}; {SEE_LOG}", file_name(path))
            }
        }
    }
}

/// The last component of `path`: a data file's directory can name a project or a person.
fn file_name(path: &Path) -> String {
    path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Reads and validates `path` against `schema`, standardising as `standardize` says (choose it
/// with [`admit`]). When the schema promises one row per patient and has a patient-id column,
/// every id must be unique.
pub fn load(path: &Path, schema: &Schema, standardize: Standardize) -> Result<LocalData, DataError> {
    let file = std::fs::File::open(path).map_err(|source| DataError::Read { path: path.to_path_buf(), source })?;
    let mut reader = csv::ReaderBuilder::new().has_headers(true).trim(csv::Trim::All).from_reader(file);
    let headers = reader
        .headers()
        .map_err(|e| DataError::Row {
            path: path.to_path_buf(),
            line: 1,
            problem: RowProblem::UnreadableHeader { detail: e.to_string() },
        })?
        .clone();
    let index: HashMap<&str, usize> = headers.iter().enumerate().map(|(i, h)| (h, i)).collect();
    let col = |name: &'static str| {
        index.get(name).copied().map(|i| (i, name)).ok_or_else(|| DataError::MissingColumn {
            path: path.to_path_buf(),
            column: name,
            schema: schema.name,
            found: headers.iter().collect::<Vec<_>>().join(", "),
        })
    };
    let feature_cols = schema.features.iter().map(|&f| col(f)).collect::<Result<Vec<_>, _>>()?;
    let label_col = col(schema.label)?;
    let split_col = col(schema.split)?;
    let id_col = schema.privacy_unit.id_column().map(col).transpose()?;
    // Only a promise of one row per patient is checked; several rows are the schema's own case.
    let unique_ids = matches!(schema.privacy_unit, PrivacyUnit::Patient(PatientRows::OnePerPatient { .. }));
    let mut first_seen: HashMap<String, u64> = HashMap::new();

    let d = schema.features.len();
    let (mut train_x, mut train_y, mut test_x, mut test_y) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for record in reader.records() {
        let record = record.map_err(|e| {
            let line = e.position().map(|p| p.line()).unwrap_or(0);
            DataError::Row { path: path.to_path_buf(), line, problem: RowProblem::of(&e) }
        })?;
        let line = record.position().map(|p| p.line()).unwrap_or(0);
        let bad = |(c, name): (usize, &'static str), problem| DataError::Cell {
            path: path.to_path_buf(),
            line,
            column: c + 1,
            name,
            problem,
        };
        let cell = |at: (usize, &'static str)| -> Result<f64, DataError> {
            let raw = record.get(at.0).unwrap_or("");
            if raw.is_empty() || raw == "?" {
                return Err(bad(at, CellProblem::Missing));
            }
            match raw.parse::<f64>() {
                Ok(v) if v.is_finite() => Ok(v),
                Ok(_) => Err(bad(at, CellProblem::NotFinite(raw.to_string()))),
                Err(_) => Err(bad(at, CellProblem::NotANumber(raw.to_string()))),
            }
        };
        let mut row = Vec::with_capacity(d);
        for &at in &feature_cols {
            row.push(cell(at)? as f32);
        }
        let label = cell(label_col)?;
        if label != 0.0 && label != 1.0 {
            return Err(bad(label_col, CellProblem::LabelNotBinary(label)));
        }
        if let Some(at) = id_col {
            let id = record.get(at.0).unwrap_or("");
            if id.is_empty() {
                return Err(bad(at, CellProblem::Missing));
            }
            if unique_ids {
                if let Some(&first_line) = first_seen.get(id) {
                    return Err(bad(at, CellProblem::DuplicatePatient { id: id.to_string(), first_line }));
                }
                first_seen.insert(id.to_string(), line);
            }
        }
        match record.get(split_col.0).unwrap_or("") {
            "train" => {
                train_x.extend(row);
                train_y.push(label as f32);
            }
            "test" => {
                test_x.extend(row);
                test_y.push(label as f32);
            }
            other => return Err(bad(split_col, CellProblem::UnknownSplit(other.to_string()))),
        }
    }
    for (rows, split) in [(&train_y, "train"), (&test_y, "test")] {
        if rows.is_empty() {
            return Err(DataError::EmptySplit { path: path.to_path_buf(), split, column: schema.split });
        }
    }
    let (train_mean, train_std) = train_statistics(&train_x, d);
    match standardize {
        Standardize::Off => {}
        Standardize::PerNode => {
            // FLamby adds 1e-9 so a constant feature (Switzerland's chol) maps to 0, not NaN.
            let scale: Vec<f64> = train_std.iter().map(|s| s + 1e-9).collect();
            rescale(&mut train_x, &mut test_x, &train_mean, &scale);
        }
        Standardize::Declared(stats) => {
            // Exactly the published numbers: every node computes the same map, and nothing in it
            // depends on this node's data. `schema` tests that they fit and that std > 0.
            rescale(&mut train_x, &mut test_x, stats.mean, stats.std);
        }
    }
    Ok(LocalData { features: d, train_mean, train_std, train_x, train_y, test_x, test_y })
}

/// The mean and sample standard deviation (ddof = 1, as FLamby) of each feature of the
/// row-major `train` rows.
fn train_statistics(train: &[f32], d: usize) -> (Vec<f64>, Vec<f64>) {
    let n = train.len() / d;
    let (mut means, mut stds) = (Vec::with_capacity(d), Vec::with_capacity(d));
    for j in 0..d {
        let mean = (0..n).map(|i| f64::from(train[i * d + j])).sum::<f64>() / n as f64;
        let var = if n > 1 {
            (0..n).map(|i| (f64::from(train[i * d + j]) - mean).powi(2)).sum::<f64>() / (n - 1) as f64
        } else {
            0.0
        };
        means.push(mean);
        stds.push(var.sqrt());
    }
    (means, stds)
}

/// x ← (x − mean[j]) / scale[j] for feature j of every train and test row, in f64.
fn rescale(train: &mut [f32], test: &mut [f32], mean: &[f64], scale: &[f64]) {
    let d = mean.len();
    for (j, (m, s)) in mean.iter().zip(scale).enumerate() {
        for x in train.iter_mut().skip(j).step_by(d).chain(test.iter_mut().skip(j).step_by(d)) {
            *x = ((f64::from(*x) - m) / s) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use proptest::prelude::*;
    use sanctum_protocol::schema::{HEART_DISEASE, HEART_DISEASE_POOLED_TRAIN, Task};

    use super::*;

    const HEADER: &str =
        "age,sex,trestbps,chol,fbs,thalach,exang,oldpeak,cp_2,cp_3,cp_4,restecg_1,restecg_2,label,split";
    const TWO_TRAIN_ONE_TEST: &str = "60,1,140,200,0,150,0,1.0,0,0,1,0,1,1,train\n50,0,120,220,0,160,1,0.0,1,0,0,1,0,0,train\n55,1,130,210,1,155,0,0.5,0,1,0,0,0,1,test\n";

    fn file(body: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        write!(f, "{HEADER}\n{body}").unwrap();
        f
    }

    /// Heart disease's layout with another standardisation and privacy unit.
    const fn heart_like(standardization: Standardization, privacy_unit: PrivacyUnit) -> Schema {
        Schema {
            name: "heart_like",
            features: HEART_DISEASE.features,
            label: "label",
            split: "split",
            task: Task::BinaryClassification,
            standardization,
            privacy_unit,
        }
    }
    const PER_NODE_ONLY: Schema = heart_like(Standardization::PerNodeTrain, HEART_DISEASE.privacy_unit);
    const UNSCALED: Schema = heart_like(Standardization::None, PrivacyUnit::Row);
    const SEVERAL_ROWS: Schema = heart_like(
        Standardization::Declared(&HEART_DISEASE_POOLED_TRAIN),
        PrivacyUnit::Patient(PatientRows::Several { id_column: "patient_id" }),
    );
    const ONE_ROW_WITH_IDS: Schema = heart_like(
        Standardization::Declared(&HEART_DISEASE_POOLED_TRAIN),
        PrivacyUnit::Patient(PatientRows::OnePerPatient { id_column: Some("patient_id") }),
    );

    fn per_node(path: &Path) -> Result<LocalData, DataError> {
        load(path, &HEART_DISEASE, Standardize::PerNode)
    }

    #[test]
    fn loads_and_standardises_with_train_statistics() {
        let f = file(TWO_TRAIN_ONE_TEST);
        let d = per_node(f.path()).unwrap();
        assert_eq!((d.train_len(), d.test_len(), d.features), (2, 1, 13));
        // age: mean 55, std √50 → train ±0.7071, test 0.
        assert!((d.train_x[0] - 0.70710677).abs() < 1e-5);
        assert!(d.test_x[0].abs() < 1e-6);
        assert_eq!(d.train_y, vec![1.0, 0.0]);
    }

    /// Which standardisation each (schema, privacy) pair gets, and which rule refuses the rest.
    #[test]
    fn admit_allows_per_node_statistics_only_without_dp() {
        use PrivacyMode::{Client, Example, None as NoDp};
        let declared = Ok(Standardize::Declared(&HEART_DISEASE_POOLED_TRAIN));
        let no_stats = Err(RuleBroken::NoDeclaredStatistics { schema: "heart_like" });
        let several = Err(RuleBroken::SeveralRowsPerPatient { schema: "heart_like", id_column: "patient_id" });
        let table: [(&Schema, PrivacyMode, Result<Standardize, RuleBroken>); 12] = [
            (&HEART_DISEASE, NoDp, Ok(Standardize::PerNode)),
            (&HEART_DISEASE, Example, declared.clone()),
            (&HEART_DISEASE, Client, declared.clone()),
            (&PER_NODE_ONLY, NoDp, Ok(Standardize::PerNode)),
            (&PER_NODE_ONLY, Example, no_stats.clone()),
            (&PER_NODE_ONLY, Client, no_stats),
            (&UNSCALED, NoDp, Ok(Standardize::Off)),
            (&UNSCALED, Example, Ok(Standardize::Off)),
            (&SEVERAL_ROWS, NoDp, Ok(Standardize::PerNode)),
            (&SEVERAL_ROWS, Example, several),
            // Client-level DP clips a hospital's whole update, every row of every patient at once.
            (&SEVERAL_ROWS, Client, declared.clone()),
            (&ONE_ROW_WITH_IDS, Example, declared),
        ];
        for (schema, mode, want) in table {
            assert_eq!(admit(schema, mode), want, "{} under {mode:?}", schema.name);
        }
        let e = admit(&PER_NODE_ONLY, Example).unwrap_err().to_string();
        assert!(e.starts_with("rule dp-public-standardization:") && e.contains("'heart_like'"), "{e}");
        let e = admit(&SEVERAL_ROWS, Example).unwrap_err().to_string();
        assert!(e.starts_with("rule dp-privacy-unit:") && e.contains("'patient_id'"), "{e}");
    }

    /// Under DP each value becomes exactly (x − declared mean) / declared std, bit for bit, and not
    /// what the node's own statistics would give.
    #[test]
    fn dp_loading_uses_the_declared_statistics_exactly() {
        let f = file(TWO_TRAIN_ONE_TEST);
        let Ok(Standardize::Declared(stats)) = admit(&HEART_DISEASE, PrivacyMode::Example) else {
            panic!("heart_disease declares its statistics");
        };
        let d = load(f.path(), &HEART_DISEASE, Standardize::Declared(stats)).unwrap();
        let raw = load(f.path(), &HEART_DISEASE, Standardize::Off).unwrap();
        for (got, raw) in [(&d.train_x, &raw.train_x), (&d.test_x, &raw.test_x)] {
            for (i, (g, r)) in got.iter().zip(raw.iter()).enumerate() {
                let j = i % 13;
                let want = ((f64::from(*r) - stats.mean[j]) / stats.std[j]) as f32;
                assert_eq!(g.to_bits(), want.to_bits(), "value {i} (feature {j})");
            }
        }
        // age 60 under the pooled statistics, not the node's own +0.7071.
        assert!((d.train_x[0] - ((60.0 - 52.952674897119344) / 9.625772056075995) as f32).abs() < 1e-7);
        assert_ne!(d.train_x, per_node(f.path()).unwrap().train_x);
    }

    #[test]
    fn a_plan_may_ask_for_declared_statistics_but_never_for_per_node_ones_under_dp() {
        use sanctum_protocol::plan::{Plan, StandardizeWith};
        let base = "name = \"p\"\nrounds = 1\nmin_nodes = 1\n[model]\nkind = \"logistic_regression\"\ninputs = 13\n\
                    [local]\nsteps = 1\nbatch_size = 4\nlearning_rate = 0.1\n[strategy]\nkind = \"fedavg\"\n";
        let dp = "[privacy]\nmode = \"example\"\nnoise_multiplier = 1.0\nclip_norm = 1.0\ndelta = 1e-5\n";
        let plan = |standardize: &str, privacy: &str| {
            Plan::parse(&format!("{base}[data]\nschema = \"heart_disease\"\n{standardize}{privacy}")).unwrap()
        };
        let declared = || match admit(&HEART_DISEASE, PrivacyMode::Example) {
            Ok(d @ Standardize::Declared(_)) => d,
            other => panic!("{other:?}"),
        };
        assert_eq!(admit_plan(&HEART_DISEASE, &plan("", "")), Ok(Standardize::PerNode));
        assert_eq!(admit_plan(&HEART_DISEASE, &plan("standardize = \"declared\"\n", "")), Ok(declared()));
        assert_eq!(admit_plan(&HEART_DISEASE, &plan("standardize = \"per_node\"\n", "")), Ok(Standardize::PerNode));
        assert_eq!(admit_plan(&HEART_DISEASE, &plan("", dp)), Ok(declared()));
        assert_eq!(admit_plan(&HEART_DISEASE, &plan("standardize = \"declared\"\n", dp)), Ok(declared()));
        let refused = admit_plan(&HEART_DISEASE, &plan("standardize = \"per_node\"\n", dp)).unwrap_err().to_string();
        assert!(refused.contains("rule dp-public-standardization"), "{refused}");
        assert_eq!(plan("standardize = \"declared\"\n", "").data.standardize, Some(StandardizeWith::Declared));
    }

    proptest! {
        /// Under declared statistics a row's standardised values depend on that row alone: any
        /// change to another train row leaves them as they were. Per-node statistics fail this,
        /// which is why they are refused under DP.
        #[test]
        fn declared_standardisation_ignores_the_other_rows(
            others in proptest::collection::vec((20u32..90, 80u32..200, 100u32..400), 1..6),
            age in 20u32..90,
        ) {
            let row = |age: u32, bps: u32, chol: u32| format!("{age},1,{bps},{chol},0,150,0,1.0,0,0,1,0,1,1,train\n");
            let first = format!("{}55,1,130,210,1,155,0,0.5,0,1,0,0,0,1,test\n", row(age, 140, 200));
            let with = format!(
                "{first}{}",
                others.iter().map(|&(a, b, c)| row(a, b, c)).collect::<String>()
            );
            let declared = Standardize::Declared(&HEART_DISEASE_POOLED_TRAIN);
            let alone = load(file(&first).path(), &HEART_DISEASE, declared).unwrap();
            let among = load(file(&with).path(), &HEART_DISEASE, declared).unwrap();
            prop_assert_eq!(&alone.train_x[..13], &among.train_x[..13]);
            prop_assert_eq!(&alone.test_x, &among.test_x);
        }
    }

    /// The declared heart-disease statistics are the pooled train split of the four committed
    /// hospital files (recomputed here in f64 from the CSV text, as the derivation script does),
    /// and FLamby's own pooled figures to their 6 decimals.
    #[test]
    fn declared_heart_statistics_are_the_pooled_train_split() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/heart_disease/data");
        let mut rows: Vec<Vec<f64>> = Vec::new();
        for name in ["cleveland", "hungarian", "switzerland", "va"] {
            let mut r = csv::Reader::from_path(dir.join(format!("{name}.csv"))).unwrap();
            for rec in r.records() {
                let rec = rec.unwrap();
                if &rec[14] == "train" {
                    rows.push((0..13).map(|j| rec[j].parse::<f64>().unwrap()).collect());
                }
            }
        }
        let n = rows.len() as f64;
        assert_eq!(rows.len(), 486);
        let golden: serde_json::Value =
            serde_json::from_str(include_str!("../testdata/flamby_heart_norm_stats.json")).unwrap();
        let flamby = &golden["pooled_train"];
        assert_eq!(flamby["n"].as_u64(), Some(486));
        let stats = &HEART_DISEASE_POOLED_TRAIN;
        for j in 0..13 {
            let mean = rows.iter().map(|r| r[j]).sum::<f64>() / n;
            let std = (rows.iter().map(|r| (r[j] - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
            assert!((stats.mean[j] - mean).abs() <= 1e-12 * mean.abs().max(1.0), "feature {j}: mean {mean}");
            assert!((stats.std[j] - std).abs() <= 1e-12 * std, "feature {j}: std {std}");
            let (m, s) = (flamby["mean"][j].as_f64().unwrap(), flamby["std_ddof1"][j].as_f64().unwrap());
            assert!((stats.mean[j] - m).abs() < 5e-7 && (stats.std[j] - s).abs() < 5e-7, "feature {j} vs FLamby");
        }
    }

    #[test]
    fn bad_cells_name_file_line_and_column() {
        let f = file("60,1,140,abc,0,150,0,1.0,0,0,1,0,1,1,train\n");
        let e = per_node(f.path()).unwrap_err().to_string();
        assert!(e.contains("line 2, column 4 (chol)") && e.contains("'abc' is not a number"), "{e}");
        let f = file("60,1,140,200,0,150,0,1.0,0,0,1,0,1,1,train\n60,1,140,200,0,150,0,,0,0,1,0,1,1,train\n");
        let e = per_node(f.path()).unwrap_err().to_string();
        assert!(e.contains("line 3, column 8 (oldpeak): value is missing"), "{e}");
        let f = file("60,1,140,200,0,150,0,1.0,0,0,1,0,1,1\n");
        let e = per_node(f.path()).unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
        let f = file("60,1,140,200,0,150,0,1.0,0,0,1,0,1,2,train\n");
        assert!(per_node(f.path()).unwrap_err().to_string().contains("not 0 or 1"));
        let f = file("60,1,140,200,0,150,0,1.0,0,0,1,0,1,1,train\n");
        assert!(per_node(f.path()).unwrap_err().to_string().contains("test split is empty"));
    }

    #[test]
    fn standardisation_matches_flamby_per_center() {
        let golden: serde_json::Value =
            serde_json::from_str(include_str!("../testdata/flamby_heart_norm_stats.json")).unwrap();
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/heart_disease/data");
        for (center, name) in ["cleveland", "hungarian", "switzerland", "va"].iter().enumerate() {
            let path = dir.join(format!("{name}.csv"));
            // What a node uses for a plan without DP.
            let d = load(&path, &HEART_DISEASE, admit(&HEART_DISEASE, PrivacyMode::None).unwrap()).unwrap();
            let want = &golden["per_center_train"][center.to_string()];
            assert_eq!(want["n"].as_u64().unwrap() as usize, d.train_len(), "{name}");
            let raw = load(&path, &HEART_DISEASE, Standardize::Off).unwrap();
            for j in 0..13 {
                let (m, s) = (want["mean"][j].as_f64().unwrap(), want["std_ddof1"][j].as_f64().unwrap());
                assert!((d.train_mean[j] - m).abs() < 1e-6, "{name} feature {j}: mean {} vs {m}", d.train_mean[j]);
                assert!((d.train_std[j] - s).abs() < 1e-6, "{name} feature {j}: std {} vs {s}", d.train_std[j]);
                // And the data was scaled by them, as FLamby scales each center.
                let want_x = ((f64::from(raw.train_x[j]) - d.train_mean[j]) / (d.train_std[j] + 1e-9)) as f32;
                assert_eq!(d.train_x[j], want_x, "{name} feature {j}");
            }
        }
    }

    #[test]
    fn missing_file_and_missing_column() {
        let e = per_node(Path::new("/nonexistent/heart.csv")).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/heart.csv") && e.contains("datasets.path"), "{e}");
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "age,sex\n1,2").unwrap();
        let e = per_node(f.path()).unwrap_err().to_string();
        assert!(e.contains("column 'trestbps'"), "{e}");
    }

    #[test]
    fn one_row_per_patient_is_checked_when_the_schema_has_an_id_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ids.csv");
        let body = |second_id: &str| {
            format!(
                "{HEADER},patient_id\n60,1,140,200,0,150,0,1.0,0,0,1,0,1,1,train,p1\n50,0,120,220,0,160,1,0.0,1,0,0,1,0,0,test,{second_id}\n"
            )
        };
        std::fs::write(&path, body("p2")).unwrap();
        assert_eq!(load(&path, &ONE_ROW_WITH_IDS, Standardize::PerNode).unwrap().train_len(), 1);
        std::fs::write(&path, body("p1")).unwrap();
        let e = load(&path, &ONE_ROW_WITH_IDS, Standardize::PerNode).unwrap_err();
        assert!(
            e.to_string().contains("line 3, column 16 (patient_id): patient id 'p1' already appears on line 2"),
            "{e}"
        );
        // A schema whose patients may have several rows takes the same file as it is.
        assert_eq!(load(&path, &SEVERAL_ROWS, Standardize::PerNode).unwrap().train_len(), 1);
        // Heart disease has no id column: the file's extra column is ignored.
        assert_eq!(per_node(&path).unwrap().test_len(), 1);
        std::fs::write(&path, format!("{HEADER}\n60,1,140,200,0,150,0,1.0,0,0,1,0,1,1,train\n")).unwrap();
        let e = load(&path, &ONE_ROW_WITH_IDS, Standardize::PerNode).unwrap_err().to_string();
        assert!(e.contains("column 'patient_id'"), "{e}");
    }

    /// Every DataError variant (and every cell and row problem) built from a file whose values,
    /// extra header and directory hold secrets: the public reason names the rule, the file name,
    /// the line and the schema's column, and none of the secrets; the full message keeps them.
    #[test]
    fn public_reasons_never_carry_values_or_headers() {
        const VALUE: &str = "SECRET-VALUE-42";
        const HEADER_TEXT: &str = "PatientName";
        const DIR: &str = "ward-of-Dr-Jones";
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join(DIR);
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("heart.csv");
        let header = format!("{HEADER},{HEADER_TEXT},patient_id");
        let ok = "60,1,140,200,0,150,0,1.0,0,0,1,0,1,1,train";
        let row = |cells: &[(usize, &str)], id: &str| {
            let mut r: Vec<String> = ok.split(',').map(str::to_string).collect();
            for &(i, v) in cells {
                r[i] = v.to_string();
            }
            format!("{},{VALUE},{id}", r.join(","))
        };
        let test_row = row(&[(14, "test")], "p9");
        let with = |rows: &[String]| format!("{header}\n{}\n{test_row}\n", rows.join("\n")).into_bytes();
        let mut bad_utf8 = format!("{header}\n{ok},").into_bytes();
        bad_utf8.extend(VALUE.as_bytes());
        bad_utf8.extend([0xff, b',', b'p', b'1', b'\n']);
        let mut bad_header = format!("{HEADER},{HEADER_TEXT}").into_bytes();
        bad_header.extend([0xff, b'\n']);

        // (file contents or None for no file, rule, column the reason must name)
        let cases: Vec<(Option<Vec<u8>>, &str, &str)> = vec![
            (None, "rule data-file-readable", "heart.csv"),
            (Some(format!("age,sex,{HEADER_TEXT}\n{VALUE},1,2\n").into_bytes()), "rule schema-columns", "'trestbps'"),
            (Some(with(&[row(&[(3, "")], "p1")])), "rule value-present", "(chol)"),
            (Some(with(&[row(&[(3, VALUE)], "p1")])), "rule value-numeric", "(chol)"),
            (Some(with(&[row(&[(3, "inf")], "p1")])), "rule value-finite", "(chol)"),
            (Some(with(&[row(&[(13, "42")], "p1")])), "rule label-binary", "(label)"),
            (Some(with(&[row(&[(14, VALUE)], "p1")])), "rule split-train-or-test", "(split)"),
            (Some(with(&[row(&[], VALUE), row(&[], VALUE)])), "rule one-row-per-patient", "(patient_id)"),
            (Some(with(&[row(&[], "p1"), format!("{ok},{VALUE},p2,{VALUE}")])), "rule csv-field-count", "line 3"),
            (Some(bad_utf8), "rule csv-well-formed", "line 2"),
            (Some(bad_header), "rule csv-header", "line 1"),
            (Some(format!("{header}\n{test_row}\n").into_bytes()), "rule splits-non-empty", "split = train"),
        ];
        let mut seen = std::collections::BTreeSet::new();
        for (contents, rule, column) in cases {
            match &contents {
                Some(c) => std::fs::write(&path, c).unwrap(),
                None => {
                    let _ = std::fs::remove_file(&path);
                }
            }
            let e = load(&path, &ONE_ROW_WITH_IDS, Standardize::PerNode).unwrap_err();
            seen.insert(variant(&e));
            let public = e.public_reason(true);
            assert!(public.starts_with(rule) && public.contains(column), "{rule}: {public}");
            // Without sizes, no line number either (a lower bound on the rows).
            let sizeless = e.public_reason(false);
            assert!(!sizeless.contains("line ") || rule == "rule csv-header", "{rule}: {sizeless}");
            assert!(public.contains("heart.csv"), "{rule}: {public}");
            for secret in [VALUE, HEADER_TEXT, DIR] {
                assert!(!public.contains(secret), "{rule} leaks {secret}: {public}");
            }
            // The node's own log keeps the detail: the path always, and the value where it is one.
            let full = e.to_string();
            assert!(full.contains(DIR), "{rule}: {full}");
            if matches!(rule, "rule value-numeric" | "rule split-train-or-test" | "rule one-row-per-patient") {
                assert!(full.contains(VALUE), "{rule}: {full}");
            }
            if rule == "rule schema-columns" {
                assert!(full.contains(HEADER_TEXT), "{rule}: {full}");
            }
        }
        assert_eq!(seen.len(), VARIANTS, "every DataError variant is in the table: {seen:?}");
    }

    const VARIANTS: usize = 12;

    /// Exhaustive, so a new variant or problem must join the table above.
    fn variant(e: &DataError) -> &'static str {
        match e {
            DataError::Read { .. } => "read",
            DataError::MissingColumn { .. } => "missing column",
            DataError::Cell { problem, .. } => match problem {
                CellProblem::Missing => "cell missing",
                CellProblem::NotANumber(_) => "cell not a number",
                CellProblem::NotFinite(_) => "cell not finite",
                CellProblem::LabelNotBinary(_) => "cell label",
                CellProblem::UnknownSplit(_) => "cell split",
                CellProblem::DuplicatePatient { .. } => "cell duplicate patient",
            },
            DataError::Row { problem, .. } => match problem {
                RowProblem::UnreadableHeader { .. } => "row header",
                RowProblem::FieldCount { .. } => "row field count",
                RowProblem::Unparseable { .. } => "row unparseable",
            },
            DataError::EmptySplit { .. } => "empty split",
        }
    }
}
