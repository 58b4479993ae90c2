"""Independent reference figures for Fed-TCGA-BRCA, computed in Python from the committed CSVs (not
by Sanctum): a linear Cox model fitted by lifelines' CoxPHFitter (Breslow ties, exact Newton
maximum of the partial likelihood with a small ridge penalty, since several of the one-hot
covariates are collinear or constant within a region), scored by Harrell's C-index on each
region's test split exactly as FLamby scores it: lifelines.utils.concordance_index(T, -risk, E).

  pooled      one model on the union of the six train splits
  local <r>   one model on region r's train split only, scored on every region's test split

Usage: python3 reference.py [penalizer ...]   (default 0.1; needs pandas and lifelines)
"""
import sys

import pandas as pd
from lifelines import CoxPHFitter
from lifelines.utils import concordance_index

REGIONS = ["northeast", "south", "west", "midwest", "europe", "canada"]


def c_index(model, test, covariates):
    risk = model.predict_partial_hazard(test[covariates]).to_numpy()
    try:
        return concordance_index(test["T"], -risk, test["E"])
    except ZeroDivisionError:  # no comparable pair (no event in the test split)
        return float("nan")


def fit(train, covariates, penalizer):
    # Constant columns carry no information and make the Hessian singular: drop them per fit.
    used = [c for c in covariates if train[c].nunique() > 1]
    m = CoxPHFitter(penalizer=penalizer)
    m.fit(train[used + ["T", "E"]], duration_col="T", event_col="E")
    return m, used


def main(penalizers):
    data = {r: pd.read_csv(f"{r}.csv") for r in REGIONS}
    covariates = list(data[REGIONS[0]].columns[1:40])
    train = {r: d[d.split == "train"] for r, d in data.items()}
    test = {r: d[d.split == "test"] for r, d in data.items()}
    for r in REGIONS:
        print(f"{r:<9} train {len(train[r]):>3} ({int(train[r].E.sum()):>2} events)  test {len(test[r]):>2} ({int(test[r].E.sum())} events)")
    for pen in penalizers:
        print(f"\npenalizer {pen}: C-index on each region's test split")
        print("| trained on | " + " | ".join(REGIONS) + " | mean |")
        print("|---|" + "---|" * (len(REGIONS) + 1))
        fits = [("pooled", pd.concat(train.values()))] + [(f"local {r}", train[r]) for r in REGIONS]
        for name, tr in fits:
            m, used = fit(tr, covariates, pen)
            cs = [c_index(m, test[r], used) for r in REGIONS]
            valid = [c for c in cs if c == c]
            print(f"| {name} | " + " | ".join(f"{c:.3f}" for c in cs) + f" | {sum(valid) / len(valid):.3f} |")


if __name__ == "__main__":
    main([float(p) for p in sys.argv[1:]] or [0.1])
