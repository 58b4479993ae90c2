#!/usr/bin/env python3
"""Writes score_references.json: reference values for node/src/scores.rs and node/src/loss.rs
from independent implementations (scikit-learn, lifelines, statsmodels).

Run once, with its output committed (a clean clone needs neither this script nor the venv):

    python3 -m venv ~/.cache/sanctum/pyenv-scores
    ~/.cache/sanctum/pyenv-scores/bin/pip install scikit-learn lifelines statsmodels numpy
    ~/.cache/sanctum/pyenv-scores/bin/python node/testdata/make_score_references.py

Every model output, label, time and weight is rounded to float32 before any reference is
computed, so the Rust side, which holds model outputs as f32, sees exactly the same numbers.
The datasets are drawn from a fixed seed and built to hit the edge cases: ties in scores, ties in
times (between two events and between an event and a censored row), censoring, imbalanced
classes, a class that is never predicted, a class absent from both truth and prediction, one
class only (AUROC undefined), constant regression truth.
"""

import json
import math
import os
import warnings

import lifelines
import numpy as np
import scipy
import sklearn
import statsmodels
from lifelines.utils import concordance_index
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    log_loss,
    mean_absolute_error,
    mean_squared_error,
    r2_score,
    roc_auc_score,
)
from statsmodels.duration.hazard_regression import PHReg

rng = np.random.default_rng(20240611)


def f32(a):
    """Round to float32 and back, so JSON carries exactly the value Rust holds as f32."""
    return np.asarray(a, dtype=np.float32).astype(np.float64)


def listed(a):
    return [float(v) for v in np.asarray(a, dtype=np.float64)]


def binary_case(name, logits, labels):
    logits, labels = f32(logits), np.asarray(labels, dtype=np.int64)
    pred = (logits > 0).astype(np.int64)  # logit 0 is probability 0.5, predicted negative
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bal = balanced_accuracy_score(labels, pred)
    metrics = {"accuracy": accuracy_score(labels, pred), "balanced_accuracy": bal}
    undefined = {}
    with warnings.catch_warnings(record=True) as auroc_caught:
        warnings.simplefilter("always")
        auroc = roc_auc_score(labels, logits)
    if math.isnan(auroc):  # one class only: sklearn warns and returns NaN; scores.rs skips the metric
        undefined["auroc"] = "; ".join(str(w.message) for w in auroc_caught)
    else:
        metrics["auroc"] = auroc
    return {
        "name": name,
        "outputs": listed(logits),
        "labels": listed(labels),
        "metrics": metrics,
        "undefined": undefined,
        "sklearn_warnings": sorted({str(w.message) for w in caught}),
    }


def multiclass_case(name, logits, labels, classes):
    logits, labels = f32(logits), np.asarray(labels, dtype=np.int64)
    pred = np.argmax(logits, axis=1)  # first maximum on ties, as numpy and torch do
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        macro = f1_score(labels, pred, average="macro")  # sklearn's defaults: labels=None, zero_division="warn"
        all_labels = f1_score(labels, pred, average="macro", labels=list(range(classes)))
    return {
        "name": name,
        "classes": classes,
        "outputs": listed(logits.reshape(-1)),
        "labels": listed(labels),
        "metrics": {"accuracy": accuracy_score(labels, pred), "macro_f1": macro},
        # Not what scores.rs computes: the macro-F1 over all `classes` labels, a class absent from
        # both truth and prediction counted as 0 (zero_division="warn"); kept to show the choice.
        "macro_f1_over_all_classes": all_labels,
        "sklearn_warnings": sorted({str(w.message) for w in caught}),
    }


def regression_case(name, pred, truth):
    pred, truth = f32(pred), f32(truth)
    return {
        "name": name,
        "outputs": listed(pred),
        "labels": listed(truth),
        "metrics": {
            "rmse": math.sqrt(mean_squared_error(truth, pred)),
            "mae": mean_absolute_error(truth, pred),
            "r2": r2_score(truth, pred),
        },
    }


def survival_case(name, risk, time, event):
    risk, time, event = f32(risk), f32(time), np.asarray(event, dtype=bool)
    # lifelines wants scores where higher means longer survival; a Cox risk score is the opposite,
    # so it is negated, exactly as FLamby's fed_tcga_brca/metric.py does.
    metrics, undefined = {}, {}
    try:
        metrics["c_index"] = concordance_index(time, -risk, event)
    except ZeroDivisionError as e:  # no admissible pair: scores.rs skips the metric
        undefined["c_index"] = str(e)
    return {
        "name": name,
        "outputs": listed(risk),
        "time": listed(time),
        "event": [bool(e) for e in event],
        "metrics": metrics,
        "undefined": undefined,
    }


def flamby_cox_loss(eta, time, event):
    """A numpy transcription of FLamby's fed_tcga_brca BaselineLoss (owkin/FLamby @ edacf54): rows
    stably sorted by time descending, row i's risk set is the rows sorted before it and itself,
    so of rows tied in time only those earlier in the input order; the sum over events divided
    by the number of rows."""
    order = sorted(range(len(time)), key=lambda i: -time[i])
    s, e = eta[order], event[order].astype(np.float64)
    loss = np.zeros(len(s))
    for i in range(1, len(s)):
        aux = s[: i + 1] - s[i]
        m = aux.max()
        loss[i] = m + math.log(np.exp(aux - m).sum())
    return float((loss * e).mean())


def cox_case(name, n, p, time, event):
    x = f32(rng.normal(size=(n, p)))
    params = f32(rng.normal(scale=0.5, size=p))
    time, event = f32(time), np.asarray(event, dtype=bool)
    model = PHReg(time, x, status=event.astype(np.float64), ties="breslow")
    eta = x @ params
    return {
        "name": name,
        "x": [listed(row) for row in x],
        "params": listed(params),
        "eta": listed(eta),
        "time": listed(time),
        "event": [bool(v) for v in event],
        "statsmodels_loglike": float(model.loglike(params)),
        "statsmodels_score": listed(model.score(params)),
        "flamby_loss": flamby_cox_loss(eta, time, event),
    }


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# --- binary -------------------------------------------------------------------------------------
n = 60
labels = (rng.random(n) < 0.2).astype(np.int64)  # imbalanced, about 20 % positive
logits = np.round(rng.normal(size=n) + 1.2 * labels, 1)  # rounded to 0.1: ties in scores
logits[:3] = 0.0  # logit exactly 0: probability 0.5, predicted negative
binary = [
    binary_case("imbalanced_with_tied_scores", logits, labels),
    binary_case("never_predicts_positive", -np.abs(logits) - 0.5, labels),
    binary_case("one_class_in_truth", np.round(rng.normal(size=20), 1), np.zeros(20)),
    binary_case("perfect", np.where(labels == 1, 2.0, -2.0), labels),
]
n = 2000
labels = (rng.random(n) < 0.01).astype(np.int64)  # the rare-disease shape: 1 % positive
labels[:2] = 1
binary.append(binary_case("rare_positive_large", np.round(rng.normal(size=n) + 1.5 * labels, 2), labels))

# --- multiclass ---------------------------------------------------------------------------------
k, n = 4, 80
labels = rng.choice(k, size=n, p=[0.5, 0.3, 0.15, 0.05])
logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[labels]
logits[:, 3] -= 10.0  # class 3 is in the truth but never predicted
logits[0] = [0.5, 0.5, 0.1, -11.0]  # a tie for the maximum: argmax takes the first
multiclass = [multiclass_case("class_never_predicted", logits, labels, k)]
k, n = 5, 50
labels = rng.choice([0, 1, 3, 4], size=n)  # class 2 is absent from the truth
logits = rng.normal(size=(n, k)) + 1.0 * np.eye(k)[labels]
logits[:, 2] -= 10.0  # ... and never predicted
multiclass.append(multiclass_case("class_absent_from_truth_and_prediction", logits, labels, k))
labels = rng.choice(3, size=40)
multiclass.append(multiclass_case("perfect", 3.0 * np.eye(3)[labels], labels, 3))

# --- regression ---------------------------------------------------------------------------------
truth = rng.normal(loc=150.0, scale=75.0, size=100)
regression = [
    regression_case("noisy", truth + rng.normal(scale=40.0, size=100), truth),
    regression_case("perfect", truth, truth),
    regression_case("constant_truth_imperfect", rng.normal(size=10), np.full(10, 3.0)),
    regression_case("constant_truth_perfect", np.full(10, 3.0), np.full(10, 3.0)),
]

# --- survival (C-index) -------------------------------------------------------------------------
n = 80
time = np.ceil(rng.exponential(scale=20.0, size=n))  # whole days: many ties in time
event = rng.random(n) < 0.6  # about 40 % censored
risk = np.round(rng.normal(size=n) - 0.03 * time, 1)  # rounded: ties in risk
time[:4] = [5.0, 5.0, 5.0, 5.0]
event[:4] = [True, True, False, False]  # ties between events and between an event and censoring
survival = [survival_case("ties_and_censoring", risk, time, event)]
n = 1000
time = np.round(rng.weibull(1.5, size=n) * 1000.0)
event = rng.random(n) < 0.3
risk = np.round(rng.normal(size=n) - 0.001 * time, 2)
survival.append(survival_case("large", risk, time, event))
survival.append(survival_case("perfect_no_ties", -np.arange(30.0), np.arange(30.0) + 1.0, np.ones(30, dtype=bool)))
survival.append(
    # Only the first row is an event and it is the last to leave: no comparable pair, undefined.
    survival_case("no_admissible_pair", [0.1, 0.2, 0.3], [9.0, 1.0, 2.0], [True, False, False])
)

# --- Cox partial likelihood (Breslow) -----------------------------------------------------------
n = 40
time = np.ceil(rng.exponential(scale=10.0, size=n))  # ties in time
event = rng.random(n) < 0.7
cox = [cox_case("tied_times", n, 3, time, event)]
n = 25
time = rng.permutation(np.arange(1.0, n + 1.0))  # no ties: FLamby's loss is Breslow's here
event = rng.random(n) < 0.6
cox.append(cox_case("no_ties", n, 4, time, event))

# --- class-weighted log losses ------------------------------------------------------------------
n = 50
labels = (rng.random(n) < 0.25).astype(np.int64)
logits = f32(rng.normal(size=n) + labels)
w = f32([1.0, 3.0])
weighted_binary = {
    "name": "binary_bce",
    "outputs": listed(logits),
    "labels": listed(labels),
    "class_weights": listed(w),
    # sklearn's log_loss with sample weights divides by the sum of the weights (as PyTorch's
    # weighted CrossEntropyLoss does): sum_i w_i l_i / sum_i w_i.
    "log_loss_unweighted": log_loss(labels, sigmoid(logits), labels=[0, 1]),
    "log_loss_weighted": log_loss(labels, sigmoid(logits), sample_weight=w[labels], labels=[0, 1]),
    "sum_of_weights": float(w[labels].sum()),
}
k, n = 3, 45
labels = rng.choice(k, size=n, p=[0.6, 0.3, 0.1])
logits = f32(rng.normal(size=(n, k)))
w = f32([0.5, 1.0, 4.0])
weighted_multiclass = {
    "name": "multiclass_ce",
    "classes": k,
    "outputs": listed(logits.reshape(-1)),
    "labels": listed(labels),
    "class_weights": listed(w),
    "log_loss_unweighted": log_loss(labels, softmax(logits), labels=list(range(k))),
    "log_loss_weighted": log_loss(labels, softmax(logits), sample_weight=w[labels], labels=list(range(k))),
    "sum_of_weights": float(w[labels].sum()),
}

out = {
    "provenance": {
        "script": "node/testdata/make_score_references.py",
        "seed": 20240611,
        "scikit-learn": sklearn.__version__,
        "lifelines": lifelines.__version__,
        "statsmodels": statsmodels.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "flamby_loss": "numpy transcription of owkin/FLamby@edacf54 flamby/datasets/fed_tcga_brca/loss.py",
    },
    "binary": binary,
    "multiclass": multiclass,
    "regression": regression,
    "survival": survival,
    "cox": cox,
    "weighted_loss": [weighted_binary, weighted_multiclass],
}
path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "score_references.json")
with open(path, "w") as f:
    json.dump(out, f, allow_nan=False)
    f.write("\n")
print(f"wrote {path}")
