//! The metrics a node reports on its test split, for every task (pure Rust, f64 throughout),
//! defined to agree with the implementations the field uses: scikit-learn for classification and
//! regression, lifelines (as FLamby calls it) for the C-index.
//!
//! Checked against `node/testdata/score_references.json` (scikit-learn 1.9.1, lifelines 0.30.3,
//! written by `node/testdata/make_score_references.py`) to 1e-9, and by property tests.
//!
//! # Definitions and the choices they make
//! - **accuracy**: the share of rows predicted right. Binary: predicted positive iff the logit is
//!   `> 0` (probability > 0.5; a logit of exactly 0 is negative, as `train.rs` has always done).
//!   Multi-class: the arg-max of the row's logits, the first one on ties (numpy's and torch's
//!   rule); a NaN logit never wins against a number.
//! - **balanced accuracy**: scikit-learn's `balanced_accuracy_score`: the mean recall over the
//!   classes that occur in the truth. A class that occurs only among the predictions has no
//!   recall and is left out of the mean (scikit-learn then warns "y_pred contains classes not in
//!   y_true"); so a test split with one class only scores that class's recall.
//! - **AUROC**: the Mann–Whitney statistic, P(score of a positive > score of a negative) with a
//!   tie counted ½, which equals scikit-learn's `roc_auc_score` (trapezoidal ROC). Undefined
//!   (`None`) when the truth has one class only (scikit-learn warns and returns NaN) or a score
//!   is NaN. Counted in integers, O(n log n).
//! - **macro-F1**: scikit-learn's `f1_score(average="macro")` with its defaults `labels=None`,
//!   `zero_division="warn"`: F1 = 2TP / (2TP + FP + FN) per class, averaged over the classes that
//!   occur in the truth or in the predictions. A class in the truth that is never predicted scores
//!   0. A class absent from both is not averaged (with `labels=range(k)` scikit-learn would count
//!   it as 0, `zero_division="warn"` acting as 0; we follow the default call).
//! - **RMSE, MAE**: as `sqrt(mean_squared_error)` and `mean_absolute_error`.
//! - **R²**: scikit-learn's `r2_score` with `force_finite=True`: 1 − SS_res / SS_tot; for a
//!   constant truth (SS_tot = 0) 1.0 if the prediction is perfect and 0.0 otherwise; undefined
//!   for fewer than two rows (scikit-learn warns and returns NaN).
//! - **C-index**: Harrell's, on **risk scores** (higher risk = shorter survival, a Cox model's
//!   linear predictor): lifelines' `concordance_index(time, -risk, event)`, which is how FLamby's
//!   `fed_tcga_brca/metric.py` calls it. A pair (i, j) is admissible when i has an event and
//!   either tᵢ < tⱼ, or tᵢ = tⱼ and j is censored (two events at the same time, and any pair whose
//!   earlier member is censored, are not comparable); it is concordant when riskᵢ > riskⱼ, and a
//!   tie in risk counts ½. Undefined when no pair is admissible (lifelines raises
//!   `ZeroDivisionError`) or a risk is NaN. O(n log n) with a Fenwick tree.
//!
//! Every metric is `None` for an empty input; [`task_metrics`] skips the undefined ones.

use sanctum_protocol::dataset::Task;
use std::cmp::Ordering;

/// What a task's test rows are scored against, one entry per row, in the order of the outputs.
#[derive(Clone, Copy, Debug)]
pub enum Targets<'a> {
    /// Binary: 0.0 or 1.0. Multi-class: the class index (0 ≤ c < classes) as a float.
    /// Regression: the value.
    Labels(&'a [f32]),
    /// Survival: each row's time (the event's or the censoring's) and whether the event occurred.
    Survival {
        /// Non-negative times, in the schema's unit.
        time: &'a [f32],
        /// `true` when the event was observed, `false` when the row is censored at `time`.
        event: &'a [bool],
    },
}

/// Why a task's outputs and targets cannot be scored: a caller's mistake, never the data's.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ScoreError {
    #[error("{task} outputs have {outputs} values, not a multiple of the task's {width} outputs per row")]
    OutputWidth { task: &'static str, outputs: usize, width: usize },
    #[error("{rows} rows of outputs but {targets} targets: pass the test split's targets in the outputs' order")]
    RowCount { rows: usize, targets: usize },
    #[error("a {task} task is scored against {expected}, not {given}")]
    TargetKind { task: &'static str, expected: &'static str, given: &'static str },
    #[error("row {row}: the label is not a class of this {task} task (0 to {max}): check the schema's label column")]
    BadLabel { task: &'static str, row: usize, max: usize },
}

/// The metrics of `task.metrics()`, in that order, for `outputs` (row-major, `task.outputs()`
/// values per row: logits for binary and multi-class, the prediction for regression, the risk
/// score for survival) against `targets`. A metric undefined on these rows (AUROC or balanced
/// accuracy without both classes, a C-index with no admissible pair, R² on one row, any metric
/// on no rows) is left out rather than reported as NaN.
pub fn task_metrics(
    task: Task,
    outputs: &[f32],
    targets: &Targets<'_>,
) -> Result<Vec<(&'static str, f64)>, ScoreError> {
    let width = task.outputs();
    if width == 0 || !outputs.len().is_multiple_of(width) {
        return Err(ScoreError::OutputWidth { task: task.name(), outputs: outputs.len(), width });
    }
    let rows = outputs.len() / width;
    let values: Vec<(&'static str, Option<f64>)> = match (task, targets) {
        (Task::Binary, Targets::Labels(labels)) => {
            check_rows(rows, labels.len())?;
            let truth = class_labels(task, labels, 2)?;
            let positive: Vec<bool> = truth.iter().map(|&c| c == 1).collect();
            let pred: Vec<usize> = outputs.iter().map(|&z| usize::from(z > 0.0)).collect();
            let scores: Vec<f64> = outputs.iter().map(|&z| f64::from(z)).collect();
            vec![
                ("accuracy", accuracy(&truth, &pred)),
                ("balanced_accuracy", balanced_accuracy(&truth, &pred)),
                ("auroc", auroc(&scores, &positive)),
            ]
        }
        (Task::Multiclass { classes }, Targets::Labels(labels)) => {
            check_rows(rows, labels.len())?;
            let truth = class_labels(task, labels, classes)?;
            let pred = argmax_rows(outputs, classes);
            vec![("accuracy", accuracy(&truth, &pred)), ("macro_f1", macro_f1(&truth, &pred))]
        }
        (Task::Regression, Targets::Labels(labels)) => {
            check_rows(rows, labels.len())?;
            let pred: Vec<f64> = outputs.iter().map(|&v| f64::from(v)).collect();
            let truth: Vec<f64> = labels.iter().map(|&v| f64::from(v)).collect();
            vec![("rmse", rmse(&pred, &truth)), ("mae", mae(&pred, &truth)), ("r2", r2(&pred, &truth))]
        }
        (Task::Survival, Targets::Survival { time, event }) => {
            check_rows(rows, time.len())?;
            check_rows(rows, event.len())?;
            let risk: Vec<f64> = outputs.iter().map(|&v| f64::from(v)).collect();
            let time: Vec<f64> = time.iter().map(|&v| f64::from(v)).collect();
            vec![("c_index", c_index(&risk, &time, event))]
        }
        (Task::Survival, Targets::Labels(_)) => {
            return Err(ScoreError::TargetKind { task: task.name(), expected: "times and events", given: "labels" });
        }
        (_, Targets::Survival { .. }) => {
            return Err(ScoreError::TargetKind { task: task.name(), expected: "labels", given: "times and events" });
        }
    };
    Ok(values.into_iter().filter_map(|(name, v)| v.map(|v| (name, v))).collect())
}

fn check_rows(rows: usize, targets: usize) -> Result<(), ScoreError> {
    if rows == targets { Ok(()) } else { Err(ScoreError::RowCount { rows, targets }) }
}

/// Class indices from float labels, each an integer in `0..classes`.
fn class_labels(task: Task, labels: &[f32], classes: usize) -> Result<Vec<usize>, ScoreError> {
    labels
        .iter()
        .enumerate()
        .map(|(row, &y)| {
            // `as` saturates; the round trip rejects fractions, negatives, NaN and huge values.
            let c = y as usize;
            if y >= 0.0 && c as f32 == y && c < classes {
                Ok(c)
            } else {
                Err(ScoreError::BadLabel { task: task.name(), row, max: classes.saturating_sub(1) })
            }
        })
        .collect()
}

/// Each row's predicted class: the index of its largest logit, the first on ties; a NaN never
/// beats a number (a row of NaNs predicts class 0). `outputs` is row-major with `classes` values
/// per row; a trailing partial row is ignored.
pub fn argmax_rows(outputs: &[f32], classes: usize) -> Vec<usize> {
    if classes == 0 {
        return Vec::new();
    }
    outputs
        .chunks_exact(classes)
        .map(|row| {
            let mut best = 0;
            for (c, &v) in row.iter().enumerate().skip(1) {
                if v > row[best] || (row[best].is_nan() && !v.is_nan()) {
                    best = c;
                }
            }
            best
        })
        .collect()
}

/// The share of rows with `pred == truth`; `None` when empty or the lengths differ.
pub fn accuracy(truth: &[usize], pred: &[usize]) -> Option<f64> {
    if truth.is_empty() || truth.len() != pred.len() {
        return None;
    }
    let right = truth.iter().zip(pred).filter(|(t, p)| t == p).count();
    Some(right as f64 / truth.len() as f64)
}

/// scikit-learn's `balanced_accuracy_score`: the mean, over the classes present in `truth`, of
/// each class's recall; `None` when empty or the lengths differ.
pub fn balanced_accuracy(truth: &[usize], pred: &[usize]) -> Option<f64> {
    if truth.is_empty() || truth.len() != pred.len() {
        return None;
    }
    let classes = truth.iter().max().copied().unwrap_or(0) + 1;
    let (mut support, mut hits) = (vec![0u64; classes], vec![0u64; classes]);
    for (&t, &p) in truth.iter().zip(pred) {
        support[t] += 1;
        hits[t] += u64::from(t == p);
    }
    let recalls: Vec<f64> =
        support.iter().zip(&hits).filter(|&(&s, _)| s > 0).map(|(&s, &h)| h as f64 / s as f64).collect();
    Some(recalls.iter().sum::<f64>() / recalls.len() as f64)
}

/// scikit-learn's `f1_score(average="macro")` with its default labels (those in the truth or the
/// predictions) and `zero_division="warn"` (a class never predicted and never true cannot occur
/// among those labels; one in the truth but never predicted scores 0); `None` when empty or the
/// lengths differ.
pub fn macro_f1(truth: &[usize], pred: &[usize]) -> Option<f64> {
    if truth.is_empty() || truth.len() != pred.len() {
        return None;
    }
    let classes = truth.iter().chain(pred).max().copied().unwrap_or(0) + 1;
    let (mut tp, mut fp, mut fn_) = (vec![0u64; classes], vec![0u64; classes], vec![0u64; classes]);
    for (&t, &p) in truth.iter().zip(pred) {
        if t == p {
            tp[t] += 1;
        } else {
            fp[p] += 1;
            fn_[t] += 1;
        }
    }
    let f1s: Vec<f64> = (0..classes)
        .filter(|&c| tp[c] + fp[c] + fn_[c] > 0)
        .map(|c| 2.0 * tp[c] as f64 / (2 * tp[c] + fp[c] + fn_[c]) as f64)
        .collect();
    Some(f1s.iter().sum::<f64>() / f1s.len() as f64)
}

/// The area under the ROC curve of `scores` for the rows where `positive` is true against the
/// rest: P(s₊ > s₋) + ½ P(s₊ = s₋). `None` when the truth lacks a class, a score is NaN, or the
/// lengths differ.
pub fn auroc(scores: &[f64], positive: &[bool]) -> Option<f64> {
    if scores.len() != positive.len() || scores.iter().any(|s| s.is_nan()) {
        return None;
    }
    let n_pos = positive.iter().filter(|&&p| p).count() as u128;
    let n_neg = positive.len() as u128 - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_unstable_by(|&a, &b| cmp_f64(scores[a], scores[b]));
    // Twice the Mann–Whitney U, in integers: each positive scores 2 per negative strictly below it
    // and 1 per negative tied with it.
    let (mut twice_u, mut neg_below) = (0u128, 0u128);
    let mut start = 0;
    while start < order.len() {
        let mut end = start;
        while end < order.len() && scores[order[end]] == scores[order[start]] {
            end += 1;
        }
        let pos_here = order[start..end].iter().filter(|&&i| positive[i]).count() as u128;
        let neg_here = (end - start) as u128 - pos_here;
        twice_u += pos_here * (2 * neg_below + neg_here);
        neg_below += neg_here;
        start = end;
    }
    Some(twice_u as f64 / (2 * n_pos * n_neg) as f64)
}

/// Root mean squared error; `None` when empty or the lengths differ.
pub fn rmse(pred: &[f64], truth: &[f64]) -> Option<f64> {
    mean_of(pred, truth, |d| d * d).map(f64::sqrt)
}

/// Mean absolute error; `None` when empty or the lengths differ.
pub fn mae(pred: &[f64], truth: &[f64]) -> Option<f64> {
    mean_of(pred, truth, f64::abs)
}

fn mean_of(pred: &[f64], truth: &[f64], f: impl Fn(f64) -> f64) -> Option<f64> {
    if pred.is_empty() || pred.len() != truth.len() {
        return None;
    }
    Some(truth.iter().zip(pred).map(|(t, p)| f(t - p)).sum::<f64>() / pred.len() as f64)
}

/// scikit-learn's `r2_score` (`force_finite=True`): 1 − SS_res/SS_tot, with 1.0 for a perfect
/// prediction and 0.0 otherwise when the truth is constant; `None` for fewer than two rows or
/// lengths that differ.
pub fn r2(pred: &[f64], truth: &[f64]) -> Option<f64> {
    if pred.len() < 2 || pred.len() != truth.len() {
        return None;
    }
    let mean = truth.iter().sum::<f64>() / truth.len() as f64;
    let ss_res: f64 = truth.iter().zip(pred).map(|(t, p)| (t - p) * (t - p)).sum();
    let ss_tot: f64 = truth.iter().map(|t| (t - mean) * (t - mean)).sum();
    Some(match (ss_res == 0.0, ss_tot == 0.0) {
        (true, _) => 1.0,
        (false, true) => 0.0,
        (false, false) => 1.0 - ss_res / ss_tot,
    })
}

/// Harrell's C-index of `risk` (higher = shorter survival) against right-censored `time` and
/// `event`, equal to lifelines' `concordance_index(time, -risk, event)`: see the module doc for
/// the admissible pairs. `None` when no pair is admissible, a risk or time is NaN, or the lengths
/// differ.
pub fn c_index(risk: &[f64], time: &[f64], event: &[bool]) -> Option<f64> {
    let n = risk.len();
    if time.len() != n || event.len() != n || risk.iter().chain(time).any(|v| v.is_nan()) {
        return None;
    }
    // Ranks of the event rows' risks: the Fenwick tree counts, per rank, the events seen so far.
    let mut levels: Vec<f64> = (0..n).filter(|&i| event[i]).map(|i| risk[i]).collect();
    levels.sort_unstable_by(|a, b| cmp_f64(*a, *b));
    levels.dedup_by(|a, b| a == b);
    let rank = |r: f64| levels.partition_point(|&l| l < r);
    let mut pool = Fenwick::new(levels.len());
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_unstable_by(|&a, &b| cmp_f64(time[a], time[b]));
    let (mut pairs, mut concordant, mut tied) = (0u128, 0u128, 0u128);
    // `pool` holds the events that left strictly earlier than the current time. At each time,
    // the events are compared with the pool, then the censored rows with the pool and this time's
    // events; then this time's events join the pool (censored rows never do).
    let mut start = 0;
    while start < n {
        let mut end = start;
        while end < n && time[order[end]] == time[order[start]] {
            end += 1;
        }
        let group = &order[start..end];
        let mut score = |pool: &Fenwick, i: usize| {
            let (below, equal) = pool.below_and_equal(rank(risk[i]), risk[i], &levels);
            pairs += pool.total;
            // An earlier event with a higher risk than row i is concordant.
            concordant += pool.total - below - equal;
            tied += equal;
        };
        for &i in group.iter().filter(|&&i| event[i]) {
            score(&pool, i);
        }
        for &i in group.iter().filter(|&&i| event[i]) {
            pool.add(rank(risk[i]));
        }
        for &i in group.iter().filter(|&&i| !event[i]) {
            score(&pool, i);
        }
        start = end;
    }
    if pairs == 0 {
        return None;
    }
    Some((concordant as f64 + tied as f64 / 2.0) / pairs as f64)
}

/// Counts per risk rank, with prefix sums in O(log n).
struct Fenwick {
    tree: Vec<u128>,
    total: u128,
}

impl Fenwick {
    fn new(len: usize) -> Self {
        Fenwick { tree: vec![0; len + 1], total: 0 }
    }

    fn add(&mut self, rank: usize) {
        let mut i = rank + 1;
        while i < self.tree.len() {
            self.tree[i] += 1;
            i += i & i.wrapping_neg();
        }
        self.total += 1;
    }

    /// How many entries have a rank below `rank`.
    fn prefix(&self, rank: usize) -> u128 {
        let (mut i, mut sum) = (rank.min(self.tree.len() - 1), 0);
        while i > 0 {
            sum += self.tree[i];
            i -= i & i.wrapping_neg();
        }
        sum
    }

    /// How many entries are below `value` and how many equal it, `rank` being `value`'s
    /// position among `levels` (the ranked values).
    fn below_and_equal(&self, rank: usize, value: f64, levels: &[f64]) -> (u128, u128) {
        let below = self.prefix(rank);
        let equal = if levels.get(rank) == Some(&value) { self.prefix(rank + 1) - below } else { 0 };
        (below, equal)
    }
}

/// A total order on non-NaN floats (−0 = +0), the callers having rejected NaN.
fn cmp_f64(a: f64, b: f64) -> Ordering {
    a.partial_cmp(&b).unwrap_or(Ordering::Equal)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::Value;

    fn references() -> Value {
        let text = include_str!("../testdata/score_references.json");
        serde_json::from_str(text).expect("score_references.json parses")
    }

    fn floats(v: &Value) -> Vec<f32> {
        v.as_array().expect("an array").iter().map(|x| x.as_f64().expect("a number") as f32).collect()
    }

    fn check_case(task: Task, case: &Value, targets: &Targets<'_>) {
        let name = case["name"].as_str().expect("a name");
        let outputs = floats(&case["outputs"]);
        let got = task_metrics(task, &outputs, targets).expect("scorable");
        let want = case["metrics"].as_object().expect("metrics");
        let expected_names: Vec<&str> = task.metrics().iter().copied().filter(|m| want.contains_key(*m)).collect();
        let got_names: Vec<&str> = got.iter().map(|(m, _)| *m).collect();
        assert_eq!(got_names, expected_names, "{task} {name}: the defined metrics, in task.metrics() order");
        for (metric, value) in got {
            let reference = want[metric].as_f64().expect("a number");
            assert!((value - reference).abs() <= 1e-9, "{task} {name} {metric}: {value} vs reference {reference}");
        }
    }

    #[test]
    fn binary_metrics_match_scikit_learn() {
        let refs = references();
        for case in refs["binary"].as_array().expect("cases") {
            let labels = floats(&case["labels"]);
            check_case(Task::Binary, case, &Targets::Labels(&labels));
        }
    }

    #[test]
    fn multiclass_metrics_match_scikit_learn() {
        let refs = references();
        for case in refs["multiclass"].as_array().expect("cases") {
            let labels = floats(&case["labels"]);
            let classes = case["classes"].as_u64().expect("classes") as usize;
            check_case(Task::Multiclass { classes }, case, &Targets::Labels(&labels));
        }
    }

    #[test]
    fn regression_metrics_match_scikit_learn() {
        let refs = references();
        for case in refs["regression"].as_array().expect("cases") {
            let labels = floats(&case["labels"]);
            check_case(Task::Regression, case, &Targets::Labels(&labels));
        }
    }

    #[test]
    fn c_index_matches_lifelines_as_flamby_calls_it() {
        let refs = references();
        for case in refs["survival"].as_array().expect("cases") {
            let time = floats(&case["time"]);
            let event: Vec<bool> =
                case["event"].as_array().expect("events").iter().map(|e| e.as_bool().expect("a bool")).collect();
            check_case(Task::Survival, case, &Targets::Survival { time: &time, event: &event });
        }
    }

    /// The O(n²) definition, written from the pair rules alone, as the oracle for the fast one.
    fn c_index_naive(risk: &[f64], time: &[f64], event: &[bool]) -> Option<f64> {
        let (mut pairs, mut score) = (0.0, 0.0);
        for i in 0..risk.len() {
            for j in 0..risk.len() {
                if event[i] && (time[i] < time[j] || (time[i] == time[j] && !event[j])) {
                    pairs += 1.0;
                    score += if risk[i] > risk[j] {
                        1.0
                    } else if risk[i] == risk[j] {
                        0.5
                    } else {
                        0.0
                    };
                }
            }
        }
        (pairs > 0.0).then(|| score / pairs)
    }

    fn auroc_naive(scores: &[f64], positive: &[bool]) -> Option<f64> {
        let (mut pairs, mut score) = (0.0, 0.0);
        for i in (0..scores.len()).filter(|&i| positive[i]) {
            for j in (0..scores.len()).filter(|&j| !positive[j]) {
                pairs += 1.0;
                score += if scores[i] > scores[j] {
                    1.0
                } else if scores[i] == scores[j] {
                    0.5
                } else {
                    0.0
                };
            }
        }
        (pairs > 0.0).then(|| score / pairs)
    }

    #[test]
    fn undefined_metrics_are_skipped_and_shapes_are_checked() {
        let one_class = task_metrics(Task::Binary, &[0.3, -0.2], &Targets::Labels(&[1.0, 1.0])).expect("scorable");
        assert_eq!(one_class.iter().map(|(m, _)| *m).collect::<Vec<_>>(), ["accuracy", "balanced_accuracy"]);
        assert!(task_metrics(Task::Regression, &[], &Targets::Labels(&[])).expect("scorable").is_empty());
        assert_eq!(
            task_metrics(Task::Binary, &[0.3], &Targets::Labels(&[1.0, 0.0])),
            Err(ScoreError::RowCount { rows: 1, targets: 2 })
        );
        assert_eq!(
            task_metrics(Task::Multiclass { classes: 3 }, &[0.0; 4], &Targets::Labels(&[0.0])),
            Err(ScoreError::OutputWidth { task: "multiclass", outputs: 4, width: 3 })
        );
        assert_eq!(
            task_metrics(Task::Multiclass { classes: 3 }, &[0.0; 3], &Targets::Labels(&[3.0])),
            Err(ScoreError::BadLabel { task: "multiclass", row: 0, max: 2 })
        );
        assert!(matches!(
            task_metrics(Task::Binary, &[0.0], &Targets::Labels(&[0.5])),
            Err(ScoreError::BadLabel { row: 0, .. })
        ));
        assert!(matches!(
            task_metrics(Task::Survival, &[0.0], &Targets::Labels(&[1.0])),
            Err(ScoreError::TargetKind { .. })
        ));
        assert_eq!(auroc(&[f64::NAN, 1.0], &[true, false]), None);
        assert_eq!(argmax_rows(&[f32::NAN, 1.0, 0.5, 2.0, 2.0, 1.0], 3), vec![1, 0]);
    }

    #[test]
    fn c_index_counts_tied_times_as_lifelines_does() {
        // Rows: (risk, time, event). Two events at t = 1 are not comparable with each other; the
        // censored row at t = 1 is comparable with both (they left no later than it did).
        let risk = [2.0, 1.0, 0.5, 1.0];
        let time = [1.0, 1.0, 1.0, 3.0];
        let event = [true, true, false, true];
        // Pairs: (0,2) 1, (1,2) 1, (0,3) 1, (1,3) ½ → 3.5 / 4.
        assert_eq!(c_index(&risk, &time, &event), Some(3.5 / 4.0));
    }

    fn arb_rows() -> impl Strategy<Value = Vec<(i8, u8, bool)>> {
        // Small integer ranges make ties in scores and times common.
        prop::collection::vec((-6i8..6, 0u8..12, any::<bool>()), 0..60)
    }

    proptest! {
        #[test]
        fn fast_auroc_and_c_index_equal_their_definitions(rows in arb_rows()) {
            let s: Vec<f64> = rows.iter().map(|r| f64::from(r.0)).collect();
            let t: Vec<f64> = rows.iter().map(|r| f64::from(r.1)).collect();
            let e: Vec<bool> = rows.iter().map(|r| r.2).collect();
            prop_assert_eq!(c_index(&s, &t, &e), c_index_naive(&s, &t, &e));
            let (a, b) = (auroc(&s, &e), auroc_naive(&s, &e));
            prop_assert!(a == b || matches!((a, b), (Some(x), Some(y)) if (x - y).abs() < 1e-12));
        }

        #[test]
        fn auroc_is_invariant_to_strictly_increasing_transforms(rows in arb_rows(), shift in -5.0f64..5.0) {
            let s: Vec<f64> = rows.iter().map(|r| f64::from(r.0) / 3.0).collect();
            let e: Vec<bool> = rows.iter().map(|r| r.2).collect();
            let transformed: Vec<f64> = s.iter().map(|v| (v + shift).exp() + v.powi(3)).collect();
            prop_assert_eq!(auroc(&s, &e), auroc(&transformed, &e));
        }

        #[test]
        fn auroc_of_the_negated_score_is_its_complement(
            scores in prop::collection::hash_set(-1_000i32..1_000, 2..50),
            labels in prop::collection::vec(any::<bool>(), 50),
        ) {
            let s: Vec<f64> = scores.into_iter().map(f64::from).collect();
            let e = &labels[..s.len()];
            let neg: Vec<f64> = s.iter().map(|v| -v).collect();
            if let (Some(a), Some(b)) = (auroc(&s, e), auroc(&neg, e)) {
                prop_assert!((a + b - 1.0).abs() < 1e-12, "{} + {} != 1", a, b);
            } else {
                prop_assert!(auroc(&s, e).is_none() && auroc(&neg, e).is_none());
            }
        }

        #[test]
        fn c_index_is_invariant_to_monotone_transforms(rows in arb_rows()) {
            let s: Vec<f64> = rows.iter().map(|r| f64::from(r.0)).collect();
            let t: Vec<f64> = rows.iter().map(|r| f64::from(r.1)).collect();
            let e: Vec<bool> = rows.iter().map(|r| r.2).collect();
            let s2: Vec<f64> = s.iter().map(|v| 1.0 / (1.0 + (-v).exp())).collect();
            let t2: Vec<f64> = t.iter().map(|v| v.sqrt() * 10.0 + 1.0).collect();
            prop_assert_eq!(c_index(&s, &t, &e), c_index(&s2, &t2, &e));
        }

        #[test]
        fn r2_of_a_perfect_prediction_is_one(truth in prop::collection::vec(-1e3f64..1e3, 2..40)) {
            prop_assert_eq!(r2(&truth, &truth), Some(1.0));
        }

        #[test]
        fn bounded_metrics_stay_in_the_unit_interval(
            rows in prop::collection::vec((-3.0f32..3.0, 0u8..4, 0u8..12, any::<bool>()), 1..60),
        ) {
            let logits: Vec<f32> = rows.iter().map(|r| (r.0 * 2.0).round() / 2.0).collect();
            let binary: Vec<f32> = rows.iter().map(|r| f32::from(u8::from(r.3))).collect();
            let classes: Vec<f32> = rows.iter().map(|r| f32::from(r.1)).collect();
            let multi: Vec<f32> = rows.iter().flat_map(|r| [r.0, -r.0, r.0 * 0.5, 0.25]).collect();
            let time: Vec<f32> = rows.iter().map(|r| f32::from(r.2)).collect();
            let event: Vec<bool> = rows.iter().map(|r| r.3).collect();
            let all = [
                task_metrics(Task::Binary, &logits, &Targets::Labels(&binary)),
                task_metrics(Task::Multiclass { classes: 4 }, &multi, &Targets::Labels(&classes)),
                task_metrics(Task::Survival, &logits, &Targets::Survival { time: &time, event: &event }),
            ];
            for metrics in all {
                for (name, v) in metrics.expect("scorable") {
                    prop_assert!((0.0..=1.0).contains(&v), "{} = {}", name, v);
                }
            }
            let regression = task_metrics(Task::Regression, &logits, &Targets::Labels(&binary)).expect("scorable");
            for (name, v) in regression {
                prop_assert!(v.is_finite() && (name == "r2" || v >= 0.0) && (name != "r2" || v <= 1.0), "{} = {}", name, v);
            }
        }
    }
}
