//! The built-in dataset schemas a plan can name. A node validates its own data file against the
//! schema before it accepts a plan; the data itself never leaves the node.

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
    /// Each node standardises every feature with its own train-split mean and standard deviation
    /// (FLamby's per-center normalisation), so no statistics cross the hospital boundary.
    pub standardize: bool,
}

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
    standardize: true,
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
