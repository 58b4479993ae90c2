//! The loss of every task on tch tensors, differentiable through autograd: per example (what
//! DP-SGD clips) and for a batch (what plain training minimises). Every libtorch call is a
//! fallible `f_*` call, as in `train.rs`.
//!
//! # Definitions
//! With ℓᵢ the loss of row i and wᵢ its class weight (1 without class weights):
//! - **binary**: ℓᵢ = wᵢ · BCE(σ(zᵢ), yᵢ) on the logit zᵢ (`binary_cross_entropy_with_logits`),
//!   wᵢ = w₀ or w₁ by the row's label.
//! - **multi-class**: ℓᵢ = w_{yᵢ} · (−log softmax(zᵢ)_{yᵢ}) on the row's k logits.
//! - **regression**: ℓᵢ = (ŷᵢ − yᵢ)²; class weights are refused.
//! - **survival**: no per-example loss (the partial likelihood couples a batch's rows, which is why
//!   example-level DP is refused for survival). The batch loss is the negative Cox partial log
//!   likelihood with Breslow's ties, divided by the batch's number of rows n (censored rows
//!   included), as FLamby's Fed-TCGA-BRCA `BaselineLoss` divides:
//!   L = −(1/n) Σ_{i: eventᵢ} [ηᵢ − log Σ_{j: tⱼ ≥ tᵢ} exp ηⱼ].
//!   Computed stably: rows sorted by time descending, a cumulative log-sum-exp over them, each row
//!   reading it at the last row tied with its time (so a tie's risk set holds every tied row).
//!   Class weights are refused.
//!
//! # The batch mean divides by n, not by Σ wᵢ
//! [`batch_loss`] is exactly the mean of [`per_example_loss`] over the batch: (1/n) Σ wᵢ ℓᵢ. PyTorch's
//! `CrossEntropyLoss(weight=w)` and scikit-learn's `log_loss(sample_weight=)` divide by Σ wᵢ
//! instead. We divide by n so that plain training and DP-SGD (which clips each wᵢ ℓᵢ's gradient and
//! divides the noised sum by the expected batch size) minimise the same objective. With
//! `class_weights = "balanced"` (wᶜ = n / (k nᶜ) on the train split) the mean weight over the
//! train split is 1, so the two conventions agree in expectation; with declared weights the loss
//! is scaled by the batch's mean weight. Tests check both forms against scikit-learn.
//!
//! # Breslow against FLamby's loss
//! FLamby's `BaselineLoss` (owkin/FLamby @ edacf54, `flamby/datasets/fed_tcga_brca/loss.py`) sorts
//! the rows stably by time descending and gives row i the risk set of the rows sorted before it
//! and itself. Without tied times that is Breslow's risk set and the two losses are equal (a test
//! checks it to 1e-12). With tied times FLamby's risk set of a tied row holds only the tied rows
//! that came before it in the input order, so its loss depends on the row order; Breslow's holds
//! all of them (statsmodels' `PHReg(ties="breslow")`, R's `coxph(ties="breslow")`). We implement
//! Breslow, as issue 11 asks.

use sanctum_protocol::dataset::Task;
use tch::{Device, Kind, Reduction, TchError, Tensor};

/// A batch's targets as tensors, one entry per row of the outputs.
#[derive(Clone, Copy, Debug)]
pub enum LossTargets<'a> {
    /// `[n]` floats: binary 0.0/1.0, multi-class the class index, regression the value.
    Labels(&'a Tensor),
    /// Survival: `[n]` times and `[n]` event indicators (1 = event observed, 0 = censored; any
    /// kind libtorch converts to a float).
    Survival {
        /// Each row's time; only its order matters to the loss (it never gets a gradient).
        time: &'a Tensor,
        /// Each row's event indicator.
        event: &'a Tensor,
    },
}

/// Why a loss cannot be computed: a caller's mistake or a libtorch error.
#[derive(Debug, thiserror::Error)]
pub enum LossError {
    #[error("libtorch: {0}")]
    Torch(#[from] TchError),
    #[error(
        "a survival task has no per-example loss (the Cox partial likelihood couples a batch's rows): use client-level DP, not example-level DP-SGD"
    )]
    NoPerExampleLoss,
    #[error("{given} class weights for a {task} task with {classes} classes: give one positive weight per class")]
    ClassWeightCount { task: &'static str, given: usize, classes: usize },
    #[error(
        "class weights apply to binary and multiclass tasks, not to a {task} task: remove `class_weights` from the plan"
    )]
    ClassWeightsNotApplicable { task: &'static str },
    #[error("class weight {index} is {value}: every class weight must be finite and positive")]
    ClassWeightValue { index: usize, value: f64 },
    #[error("a {task} task is trained against {expected}, not {given}")]
    TargetKind { task: &'static str, expected: &'static str, given: &'static str },
    #[error("{task} outputs have shape {shape:?}, expected [n, {width}]")]
    OutputShape { task: &'static str, shape: Vec<i64>, width: i64 },
    #[error("{outputs} rows of outputs but {targets} targets")]
    RowCount { outputs: i64, targets: i64 },
    #[error("a survival time is not a finite number: check the schema's time column")]
    BadTime,
    #[error("the batch has no rows")]
    EmptyBatch,
}

/// Each row's loss, `[n]`, for a binary, multi-class or regression batch: `outputs` is `[n, k]`
/// (`[n]` also accepted when k = 1), `class_weights` one positive weight per class (binary:
/// `[w₀, w₁]`). A survival task has none ([`LossError::NoPerExampleLoss`]).
pub fn per_example_loss(
    task: Task,
    outputs: &Tensor,
    targets: &LossTargets<'_>,
    class_weights: Option<&[f64]>,
) -> Result<Tensor, LossError> {
    let y = match targets {
        LossTargets::Labels(y) => *y,
        LossTargets::Survival { .. } if task == Task::Survival => return Err(LossError::NoPerExampleLoss),
        LossTargets::Survival { .. } => {
            return Err(LossError::TargetKind { task: task.name(), expected: "labels", given: "times and events" });
        }
    };
    if task == Task::Survival {
        return Err(LossError::NoPerExampleLoss);
    }
    let weights = checked_weights(task, class_weights)?;
    let z = shaped(task, outputs)?;
    let y = y.f_view([-1])?.f_to_kind(z.kind())?;
    check_rows(&z, &y)?;
    match task {
        Task::Binary => {
            let w = match &weights {
                Some(w) => {
                    // wᵢ = w₀ + (w₁ − w₀) yᵢ, per row by its label.
                    Some(y.f_mul_scalar(w[1] - w[0])?.f_add_scalar(w[0])?)
                }
                None => None,
            };
            Ok(z.f_binary_cross_entropy_with_logits::<Tensor>(&y, w, None, Reduction::None)?)
        }
        Task::Multiclass { .. } => {
            let class = y.f_to_kind(Kind::Int64)?;
            let nll = z.f_log_softmax(1, None)?.f_gather(1, &class.f_view([-1, 1])?, false)?.f_view([-1])?.f_neg()?;
            match &weights {
                Some(w) => {
                    let table = Tensor::f_from_slice(w)?.f_to_kind(z.kind())?.f_to_device(z.device())?;
                    Ok(nll.f_mul(&table.f_index_select(0, &class)?)?)
                }
                None => Ok(nll),
            }
        }
        Task::Regression => Ok(z.f_sub(&y)?.f_square()?),
        Task::Survival => Err(LossError::NoPerExampleLoss),
    }
}

/// The batch's loss, a scalar: the mean of [`per_example_loss`] over the n rows (dividing by n,
/// see the module doc) for binary, multi-class and regression; the negative Cox partial log
/// likelihood with Breslow ties divided by n ([`cox_breslow_loss`]) for survival.
pub fn batch_loss(
    task: Task,
    outputs: &Tensor,
    targets: &LossTargets<'_>,
    class_weights: Option<&[f64]>,
) -> Result<Tensor, LossError> {
    if task == Task::Survival {
        if class_weights.is_some() {
            return Err(LossError::ClassWeightsNotApplicable { task: task.name() });
        }
        return match targets {
            LossTargets::Survival { time, event } => cox_breslow_loss(&shaped(task, outputs)?, time, event),
            LossTargets::Labels(_) => {
                Err(LossError::TargetKind { task: task.name(), expected: "times and events", given: "labels" })
            }
        };
    }
    let per = per_example_loss(task, outputs, targets, class_weights)?;
    if per.size()[0] == 0 {
        return Err(LossError::EmptyBatch);
    }
    Ok(per.f_mean(None)?)
}

/// −(1/n) Σ_{i: eventᵢ} [ηᵢ − log Σ_{j: tⱼ ≥ tᵢ} exp ηⱼ] for the `[n]` risk scores `eta` (Breslow's
/// ties; see the module doc). Adding a constant to every ηᵢ does not change it, so a model's bias
/// gets no gradient.
pub fn cox_breslow_loss(eta: &Tensor, time: &Tensor, event: &Tensor) -> Result<Tensor, LossError> {
    let eta = eta.f_view([-1])?;
    let n = eta.size()[0];
    if n == 0 {
        return Err(LossError::EmptyBatch);
    }
    let time = host_values(time)?;
    let event = host_values(event)?;
    if time.len() as i64 != n || event.len() as i64 != n {
        return Err(LossError::RowCount { outputs: n, targets: time.len().min(event.len()) as i64 });
    }
    if time.iter().any(|t| !t.is_finite()) {
        return Err(LossError::BadTime);
    }
    let mut order: Vec<usize> = (0..time.len()).collect();
    order.sort_by(|&a, &b| time[b].total_cmp(&time[a]));
    // last[p]: the last sorted position tied in time with position p; the cumulative
    // log-sum-exp there covers every row j with tⱼ ≥ t at p.
    let mut last = vec![0i64; order.len()];
    let mut end = order.len();
    for p in (0..order.len()).rev() {
        if p + 1 < order.len() && time[order[p]] != time[order[p + 1]] {
            end = p + 1;
        }
        last[p] = end as i64 - 1;
    }
    let device = eta.device();
    let order: Vec<i64> = order.iter().map(|&i| i as i64).collect();
    let sorted_events: Vec<f64> = order.iter().map(|&i| event[i as usize]).collect();
    let order = Tensor::f_from_slice(&order)?.f_to_device(device)?;
    let last = Tensor::f_from_slice(&last)?.f_to_device(device)?;
    let events = Tensor::f_from_slice(&sorted_events)?.f_to_kind(eta.kind())?.f_to_device(device)?;
    let sorted = eta.f_index_select(0, &order)?;
    let log_risk = sorted.f_logcumsumexp(0)?.f_index_select(0, &last)?;
    let per_event = log_risk.f_sub(&sorted)?.f_mul(&events)?;
    Ok(per_event.f_sum(None)?.f_div_scalar(n as f64)?)
}

/// A tensor's values as f64 on the host, flattened.
fn host_values(t: &Tensor) -> Result<Vec<f64>, LossError> {
    let t = t.f_to_device(Device::Cpu)?.f_to_kind(Kind::Double)?.f_contiguous()?.f_view([-1])?;
    Ok(Vec::<f64>::try_from(&t)?)
}

/// The outputs as `[n, k]` for multi-class, `[n]` otherwise, after checking the width.
fn shaped(task: Task, outputs: &Tensor) -> Result<Tensor, LossError> {
    let shape = outputs.size();
    let width = task.outputs() as i64;
    match (task, shape.as_slice()) {
        (Task::Multiclass { .. }, [_, k]) if *k == width => Ok(outputs.shallow_clone()),
        (Task::Multiclass { .. }, _) => Err(LossError::OutputShape { task: task.name(), shape, width }),
        (_, [_]) | (_, [_, 1]) => Ok(outputs.f_view([-1])?),
        _ => Err(LossError::OutputShape { task: task.name(), shape, width }),
    }
}

fn check_rows(z: &Tensor, y: &Tensor) -> Result<(), LossError> {
    let (outputs, targets) = (z.size()[0], y.size()[0]);
    if outputs == targets { Ok(()) } else { Err(LossError::RowCount { outputs, targets }) }
}

fn checked_weights(task: Task, class_weights: Option<&[f64]>) -> Result<Option<Vec<f64>>, LossError> {
    let Some(w) = class_weights else { return Ok(None) };
    let classes = match task {
        Task::Binary => 2,
        Task::Multiclass { classes } => classes,
        Task::Regression | Task::Survival => return Err(LossError::ClassWeightsNotApplicable { task: task.name() }),
    };
    if w.len() != classes {
        return Err(LossError::ClassWeightCount { task: task.name(), given: w.len(), classes });
    }
    if let Some((index, &value)) = w.iter().enumerate().find(|(_, v)| !(v.is_finite() && **v > 0.0)) {
        return Err(LossError::ClassWeightValue { index, value });
    }
    Ok(Some(w.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::Value;

    fn references() -> Value {
        serde_json::from_str(include_str!("../testdata/score_references.json")).expect("score_references.json parses")
    }

    fn doubles(v: &Value) -> Vec<f64> {
        v.as_array().expect("an array").iter().map(|x| x.as_f64().expect("a number")).collect()
    }

    fn bools(v: &Value) -> Vec<f64> {
        v.as_array().expect("an array").iter().map(|x| f64::from(u8::from(x.as_bool().expect("a bool")))).collect()
    }

    fn value(t: &Tensor) -> f64 {
        t.f_double_value(&[]).expect("a scalar")
    }

    fn relative(a: f64, b: f64) -> f64 {
        (a - b).abs() / b.abs().max(1e-300)
    }

    #[test]
    fn cox_loss_times_n_is_statsmodels_breslow_negative_log_likelihood() {
        let refs = references();
        for case in refs["cox"].as_array().expect("cases") {
            let name = case["name"].as_str().expect("a name");
            let x: Vec<f64> = case["x"].as_array().expect("rows").iter().flat_map(doubles).collect();
            let params = doubles(&case["params"]);
            let (time, event) =
                (Tensor::from_slice(&doubles(&case["time"])), Tensor::from_slice(&bools(&case["event"])));
            let n = time.size()[0];
            let x = Tensor::from_slice(&x).view([n, params.len() as i64]);
            let beta = Tensor::from_slice(&params).set_requires_grad(true);
            let eta = x.matmul(&beta);
            let loss = batch_loss(Task::Survival, &eta, &LossTargets::Survival { time: &time, event: &event }, None)
                .expect("a loss");
            let want = -case["statsmodels_loglike"].as_f64().expect("loglike");
            let got = value(&loss) * n as f64;
            assert!(relative(got, want) < 1e-6, "{name}: n·loss {got} vs −loglike {want}");
            // The gradient through autograd against statsmodels' score (the loglike's gradient).
            loss.backward();
            let grad: Vec<f64> = Vec::try_from(&beta.grad()).expect("a gradient");
            for (g, s) in grad.iter().zip(doubles(&case["statsmodels_score"])) {
                assert!((g * n as f64 + s).abs() <= 1e-6 * s.abs().max(1.0), "{name}: n·∂loss {g} vs −score {s}");
            }
        }
    }

    #[test]
    fn cox_loss_is_flambys_without_tied_times_and_breslows_with_them() {
        let refs = references();
        for case in refs["cox"].as_array().expect("cases") {
            let eta = Tensor::from_slice(&doubles(&case["eta"]));
            let (time, event) =
                (Tensor::from_slice(&doubles(&case["time"])), Tensor::from_slice(&bools(&case["event"])));
            let ours = value(&cox_breslow_loss(&eta, &time, &event).expect("a loss"));
            let flamby = case["flamby_loss"].as_f64().expect("flamby_loss");
            match case["name"].as_str() {
                Some("no_ties") => assert!((ours - flamby).abs() < 1e-12, "{ours} vs FLamby {flamby}"),
                // With ties FLamby's risk sets are smaller, so its loss is lower than Breslow's.
                _ => assert!(flamby < ours - 1e-3, "tied times: FLamby {flamby} vs Breslow {ours}"),
            }
        }
    }

    #[test]
    fn cox_loss_is_finite_for_huge_scores_and_ignores_a_shift() {
        let time = Tensor::from_slice(&[3.0f64, 1.0, 2.0, 2.0]);
        let event = Tensor::from_slice(&[1.0f64, 1.0, 0.0, 1.0]);
        let eta = Tensor::from_slice(&[800.0f64, -900.0, 700.0, 750.0]);
        let loss = value(&cox_breslow_loss(&eta, &time, &event).expect("a loss"));
        let shifted = value(&cox_breslow_loss(&eta.f_add_scalar(1e3).expect("add"), &time, &event).expect("a loss"));
        assert!(loss.is_finite() && (loss - shifted).abs() < 1e-9, "{loss} vs shifted {shifted}");
        // In f32 too, where exp(800) alone overflows.
        let eta32 = eta.to_kind(Kind::Float);
        assert!(value(&cox_breslow_loss(&eta32, &time, &event).expect("a loss")).is_finite());
    }

    #[test]
    fn weighted_losses_match_scikit_learn_log_loss() {
        let refs = references();
        for case in refs["weighted_loss"].as_array().expect("cases") {
            let name = case["name"].as_str().expect("a name");
            let (task, width) = match case["classes"].as_u64() {
                Some(k) => (Task::Multiclass { classes: k as usize }, k as i64),
                None => (Task::Binary, 1),
            };
            let outputs = Tensor::from_slice(&doubles(&case["outputs"])).view([-1, width]);
            let labels = Tensor::from_slice(&doubles(&case["labels"]));
            let n = labels.size()[0] as f64;
            let weights = doubles(&case["class_weights"]);
            let targets = LossTargets::Labels(&labels);
            let plain = value(&batch_loss(task, &outputs, &targets, None).expect("a loss"));
            let want = case["log_loss_unweighted"].as_f64().expect("log loss");
            assert!(relative(plain, want) < 1e-9, "{name}: {plain} vs log_loss {want}");
            let weighted = batch_loss(task, &outputs, &targets, Some(&weights)).expect("a loss");
            let per = per_example_loss(task, &outputs, &targets, Some(&weights)).expect("losses");
            assert!(
                (value(&weighted) - value(&per.mean(Kind::Double))).abs() < 1e-12,
                "{name}: the mean of per-example"
            );
            // Ours divides by n, scikit-learn's (and PyTorch's) by the sum of the weights.
            let sum_w = case["sum_of_weights"].as_f64().expect("sum of weights");
            let want = case["log_loss_weighted"].as_f64().expect("log loss");
            let got = value(&weighted) * n / sum_w;
            assert!(relative(got, want) < 1e-9, "{name}: {got} vs weighted log_loss {want}");
        }
    }

    #[test]
    fn regression_loss_is_the_squared_error_and_shapes_are_checked() {
        let pred = Tensor::from_slice(&[1.0f32, 2.0, 4.0]).view([3, 1]);
        let y = Tensor::from_slice(&[1.5f32, 2.0, 1.0]);
        let targets = LossTargets::Labels(&y);
        let per: Vec<f32> =
            Vec::try_from(&per_example_loss(Task::Regression, &pred, &targets, None).expect("losses")).expect("values");
        assert_eq!(per, vec![0.25, 0.0, 9.0]);
        let mean = value(&batch_loss(Task::Regression, &pred, &targets, None).expect("a loss"));
        assert!((mean - 9.25 / 3.0).abs() < 1e-6);
        assert!(matches!(
            batch_loss(Task::Regression, &pred, &targets, Some(&[1.0, 2.0])),
            Err(LossError::ClassWeightsNotApplicable { .. })
        ));
        assert!(matches!(
            batch_loss(Task::Binary, &pred, &targets, Some(&[1.0])),
            Err(LossError::ClassWeightCount { given: 1, classes: 2, .. })
        ));
        assert!(matches!(
            batch_loss(Task::Binary, &pred, &targets, Some(&[1.0, 0.0])),
            Err(LossError::ClassWeightValue { index: 1, .. })
        ));
        assert!(matches!(
            batch_loss(Task::Multiclass { classes: 3 }, &pred, &targets, None),
            Err(LossError::OutputShape { .. })
        ));
        let short = Tensor::from_slice(&[1.0f32]);
        assert!(matches!(
            batch_loss(Task::Regression, &pred, &LossTargets::Labels(&short), None),
            Err(LossError::RowCount { outputs: 3, targets: 1 })
        ));
        let event = Tensor::from_slice(&[1.0f32, 0.0, 1.0]);
        let survival = LossTargets::Survival { time: &y, event: &event };
        assert!(matches!(per_example_loss(Task::Survival, &pred, &survival, None), Err(LossError::NoPerExampleLoss)));
        assert!(batch_loss(Task::Survival, &pred, &survival, None).is_ok());
    }

    /// The Breslow loss written from its definition, O(n²), in f64.
    fn cox_naive(eta: &[f64], time: &[f64], event: &[f64]) -> f64 {
        let mut sum = 0.0;
        for i in (0..eta.len()).filter(|&i| event[i] > 0.5) {
            let risk: f64 = (0..eta.len()).filter(|&j| time[j] >= time[i]).map(|j| eta[j].exp()).sum();
            sum += risk.ln() - eta[i];
        }
        sum / eta.len() as f64
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn cox_loss_and_its_gradient_match_the_definition_and_finite_differences(
            rows in prop::collection::vec((-3.0f64..3.0, 0u8..6, any::<bool>()), 1..25),
        ) {
            let eta: Vec<f64> = rows.iter().map(|r| r.0).collect();
            let time: Vec<f64> = rows.iter().map(|r| f64::from(r.1)).collect();
            let event: Vec<f64> = rows.iter().map(|r| f64::from(u8::from(r.2))).collect();
            let (t, e) = (Tensor::from_slice(&time), Tensor::from_slice(&event));
            let x = Tensor::from_slice(&eta).set_requires_grad(true);
            let loss = cox_breslow_loss(&x, &t, &e).expect("a loss");
            prop_assert!((value(&loss) - cox_naive(&eta, &time, &event)).abs() < 1e-10);
            loss.backward();
            let grad: Vec<f64> = Vec::try_from(&x.grad()).expect("a gradient");
            let h = 1e-6;
            for i in 0..eta.len() {
                let (mut up, mut down) = (eta.clone(), eta.clone());
                up[i] += h;
                down[i] -= h;
                let fd = (cox_naive(&up, &time, &event) - cox_naive(&down, &time, &event)) / (2.0 * h);
                prop_assert!((grad[i] - fd).abs() < 1e-6, "row {}: autograd {} vs finite difference {}", i, grad[i], fd);
            }
        }
    }
}
