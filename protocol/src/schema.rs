//! The built-in dataset schemas a plan can name. A node validates its own data file against the
//! schema before it accepts a plan; the data itself never leaves the node. A schema also states
//! what a DP guarantee on it protects (its privacy unit) and which standardisation statistics are
//! public, because both decide whether a DP plan's ε is true of the released model.

/// What the model predicts, which fixes the loss and the metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    /// Label 0 or 1; binary cross-entropy on logits; metric: accuracy at 0.5.
    BinaryClassification,
}

impl Task {
    /// The metric every node reports for this task.
    pub fn metric(self) -> &'static str {
        match self {
            Task::BinaryClassification => "accuracy",
        }
    }
}

/// How features are scaled before the model sees them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Standardization {
    /// Features enter the model as they are: nothing data-dependent, so any plan may use them.
    None,
    /// Only per-node statistics: each node standardises with its own train split's mean and
    /// standard deviation (FLamby's per-center normalisation). The released model's scale then
    /// depends on those exact private statistics, which no DP accountant charges, so a node
    /// refuses DP plans on such a schema.
    PerNodeTrain,
    /// Public per-feature statistics, published by the consortium with the schema. Under DP every
    /// node standardises with exactly these, so standardising reveals nothing about its data;
    /// plans without DP keep per-node train statistics, so non-DP results stay FLamby's.
    Declared(&'static DeclaredStatistics),
}

/// A mean and standard deviation per feature, in the schema's feature order, that are public.
#[derive(Debug, PartialEq)]
pub struct DeclaredStatistics {
    /// One per feature, finite.
    pub mean: &'static [f64],
    /// One per feature, finite and > 0 (a node divides by it).
    pub std: &'static [f64],
    /// Where the numbers came from, for `check` and auditors.
    pub provenance: &'static str,
}

/// Whom a DP guarantee on this schema's data protects: ε bounds what the released model reveals
/// about one unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrivacyUnit {
    /// One row. Only honest when a row is all that one person contributed.
    Row,
    /// One patient, however their rows are laid out.
    Patient(PatientRows),
}

/// How a patient's data is laid out in rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatientRows {
    /// The schema guarantees one row per patient (its preparation says so), so row-level sampling
    /// and clipping are patient-level. With an id column the node checks the guarantee on load.
    OnePerPatient {
        /// A column naming the patient, checked for duplicates when present.
        id_column: Option<&'static str>,
    },
    /// A patient may have several rows, linked by this column. Row-level DP-SGD does not protect
    /// such a patient (their rows are sampled and clipped one by one), so until sampling and
    /// clipping work per patient a node refuses example-level DP plans on such a schema.
    Several {
        /// The column naming the patient.
        id_column: &'static str,
    },
}

impl PrivacyUnit {
    /// The patient-id column the data file must have, if any.
    pub fn id_column(self) -> Option<&'static str> {
        match self {
            PrivacyUnit::Row | PrivacyUnit::Patient(PatientRows::OnePerPatient { id_column: None }) => None,
            PrivacyUnit::Patient(PatientRows::OnePerPatient { id_column: Some(c) })
            | PrivacyUnit::Patient(PatientRows::Several { id_column: c }) => Some(c),
        }
    }
}

/// A tabular dataset layout: named numeric feature columns, a label and a train/test split column.
#[derive(Debug)]
pub struct Schema {
    /// The name plans refer to.
    pub name: &'static str,
    /// Feature columns, in the order the model sees them.
    pub features: &'static [&'static str],
    /// The label column.
    pub label: &'static str,
    /// The column that says `train` or `test` for each row.
    pub split: &'static str,
    pub task: Task,
    /// Which statistics standardise the features; under DP only public ones may.
    pub standardization: Standardization,
    /// What one unit of privacy is in this data (ARCHITECTURE.md, "Privacy unit").
    pub privacy_unit: PrivacyUnit,
}

/// The pooled train-split mean and sample standard deviation (ddof = 1) of each heart-disease
/// feature over FLamby's four centres (n = 486: Cleveland 199, Hungary 172, Switzerland 30,
/// VA Long Beach 85), from FLamby's derived table `flamby_heart_13features_split.csv` by
/// `node/testdata/derive_heart_pooled_stats.py`; they agree with FLamby's own `pooled_train`
/// figures (`node/testdata/flamby_heart_norm_stats.json`) to its 6 decimals, and a node test
/// recomputes them from the committed hospital files. The consortium publishes them with the
/// schema. They cost no privacy here because the UCI data they summarise is itself public; a
/// consortium on private data must declare statistics from a public source (published reference
/// ranges) or estimate them under DP and charge every ledger, never pool the private splits.
pub const HEART_DISEASE_POOLED_TRAIN: DeclaredStatistics = DeclaredStatistics {
    mean: &[
        52.952674897119344,
        0.757201646090535,
        133.15020576131687,
        219.83744855967078,
        0.15020576131687244,
        139.28189300411523,
        0.3868312757201646,
        0.9362139917695473,
        0.19958847736625515,
        0.21604938271604937,
        0.5246913580246914,
        0.14814814814814814,
        0.24074074074074073,
    ],
    std: &[
        9.625772056075995,
        0.4292160060780276,
        19.191065091313153,
        93.66437294757434,
        0.35764112469042425,
        26.09200140732931,
        0.4875263041586747,
        1.0721234674098115,
        0.4001028674313007,
        0.41197241128431406,
        0.4999045346053351,
        0.3556128247120123,
        0.42797372819776147,
    ],
    provenance: "pooled train split of FLamby's four Fed-Heart-Disease centres (n = 486), published with the schema",
};

/// UCI Heart Disease as FLamby's Fed-Heart-Disease prepares it (13 features, binary label).
pub const HEART_DISEASE: Schema = Schema {
    name: "heart_disease",
    features: &[
        "age",
        "sex",
        "trestbps",
        "chol",
        "fbs",
        "thalach",
        "exang",
        "oldpeak",
        "cp_2",
        "cp_3",
        "cp_4",
        "restecg_1",
        "restecg_2",
    ],
    label: "label",
    split: "split",
    task: Task::BinaryClassification,
    standardization: Standardization::Declared(&HEART_DISEASE_POOLED_TRAIN),
    // UCI's processed files hold one row per patient and FLamby keeps that (its derived table
    // and `examples/heart_disease/data/prepare.py` say so); the files carry no patient id.
    privacy_unit: PrivacyUnit::Patient(PatientRows::OnePerPatient { id_column: None }),
};

/// Every schema this build knows.
pub const ALL: &[&Schema] = &[&HEART_DISEASE];

/// Finds a schema by name.
pub fn lookup(name: &str) -> Option<&'static Schema> {
    ALL.iter().copied().find(|s| s.name == name)
}

/// The names of every known schema, for error messages.
pub fn known_names() -> String {
    ALL.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node divides by the declared std and indexes both slices by feature, so a schema with a
    /// short, non-finite or zero entry would fail at a hospital instead of here.
    #[test]
    fn declared_statistics_fit_their_schema() {
        for s in ALL {
            if let Standardization::Declared(stats) = s.standardization {
                assert_eq!(stats.mean.len(), s.features.len(), "{}", s.name);
                assert_eq!(stats.std.len(), s.features.len(), "{}", s.name);
                assert!(stats.mean.iter().all(|m| m.is_finite()), "{}", s.name);
                assert!(stats.std.iter().all(|v| v.is_finite() && *v > 0.0), "{}", s.name);
                assert!(!stats.provenance.is_empty(), "{}", s.name);
            }
        }
    }

    /// A patient-id column must be a real column that is neither a feature, the label nor the
    /// split, or the node would train on patient ids.
    #[test]
    fn patient_id_columns_are_separate_columns() {
        for s in ALL {
            if let Some(id) = s.privacy_unit.id_column() {
                assert!(!s.features.contains(&id) && id != s.label && id != s.split, "{}", s.name);
            }
        }
    }
}
