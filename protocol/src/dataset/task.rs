//! What a model predicts, which fixes its output width, its loss and the metrics a node reports.

use std::fmt;

/// The learning task a dataset schema declares (`task = "binary"` …). The number of classes of a
/// multi-class task is the number of levels of its label column.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Task {
    /// Label 0 or 1; binary cross-entropy on one logit; accuracy (at logit 0), balanced accuracy,
    /// AUROC.
    Binary,
    /// Label one of `classes` (≥ 2) levels; cross-entropy on `classes` logits; accuracy, macro-F1.
    Multiclass { classes: usize },
    /// A real-valued label; mean squared error on one output; RMSE, MAE, R².
    Regression,
    /// A time and an event indicator; Cox partial likelihood (Breslow ties) on one risk score;
    /// Harrell's C-index.
    Survival,
}

impl Task {
    /// The task's name as schemas spell it.
    pub fn name(self) -> &'static str {
        match self {
            Task::Binary => "binary",
            Task::Multiclass { .. } => "multiclass",
            Task::Regression => "regression",
            Task::Survival => "survival",
        }
    }

    /// How many outputs the model must have.
    pub fn outputs(self) -> usize {
        match self {
            Task::Multiclass { classes } => classes,
            Task::Binary | Task::Regression | Task::Survival => 1,
        }
    }

    /// The metrics a node computes on its test split, the first being the task's headline metric.
    pub fn metrics(self) -> &'static [&'static str] {
        match self {
            Task::Binary => &["accuracy", "balanced_accuracy", "auroc"],
            Task::Multiclass { .. } => &["accuracy", "macro_f1"],
            Task::Regression => &["rmse", "mae", "r2"],
            Task::Survival => &["c_index"],
        }
    }

    /// The headline metric, shown in tables.
    pub fn primary_metric(self) -> &'static str {
        self.metrics()[0]
    }

    /// Whether a larger value of `metric` is better (false for the error metrics).
    pub fn higher_is_better(metric: &str) -> bool {
        !matches!(metric, "rmse" | "mae" | "loss")
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Task::Multiclass { classes } => write!(f, "multiclass ({classes} classes)"),
            other => f.write_str(other.name()),
        }
    }
}
