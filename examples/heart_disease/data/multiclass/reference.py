"""Independent reference figures for the 5-class heart-disease task, computed in Python from the
committed CSVs in this folder (not by Sanctum): multinomial logistic regression (scikit-learn
LogisticRegression, lbfgs, L2 with C = 1, fitted to convergence) on the 13 features standardised
with the schema's declared statistics (the pooled train split, schema_multiclass.toml), scored on
each hospital's own test split.

  pooled      one model on the union of the four train splits
  local <h>   one model on hospital h's train split only, scored on every hospital's test split

Accuracy, and macro-F1 as scikit-learn computes it by default: the unweighted mean of the F1 of
every class that occurs in the test split's labels or in the predictions (a class a hospital never
sees and the model never predicts does not count). Mean = unweighted mean over the hospitals.

Usage: python3 reference.py   (needs pandas and scikit-learn)
"""
import tomllib

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score

HOSPITALS = ["cleveland", "hungarian", "switzerland", "va"]


def main():
    with open("../../schema_multiclass.toml", "rb") as f:
        schema = tomllib.load(f)
    feats = [c for c in schema["columns"] if c["name"] not in ("num", "split")]
    names = [c["name"] for c in feats]
    mean = np.array([c["mean"] for c in feats])
    std = np.array([c["std"] for c in feats])
    data = {h: pd.read_csv(f"{h}.csv") for h in HOSPITALS}

    def xy(d):
        return (d[names].to_numpy() - mean) / std, d["num"].to_numpy()

    train = {h: xy(d[d.split == "train"]) for h, d in data.items()}
    test = {h: xy(d[d.split == "test"]) for h, d in data.items()}
    print("class counts (num 0..4), train | test")
    for h in HOSPITALS:
        tr = np.bincount(train[h][1], minlength=5)
        te = np.bincount(test[h][1], minlength=5)
        print(f"  {h:<11} {tr.tolist()} | {te.tolist()}")
    fits = [("pooled", np.vstack([train[h][0] for h in HOSPITALS]), np.concatenate([train[h][1] for h in HOSPITALS]))]
    fits += [(f"local {h}", *train[h]) for h in HOSPITALS]
    for metric, fn in [("accuracy", accuracy_score), ("macro-F1", lambda y, p: f1_score(y, p, average="macro"))]:
        print(f"\n{metric} on each hospital's test split")
        print("| trained on | " + " | ".join(HOSPITALS) + " | mean |")
        print("|---|" + "---|" * (len(HOSPITALS) + 1))
        for name, x, y in fits:
            m = LogisticRegression(C=1.0, max_iter=10_000).fit(x, y)
            vals = [fn(test[h][1], m.predict(test[h][0])) for h in HOSPITALS]
            print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {np.mean(vals):.3f} |")
    # The majority class of the pooled train split, for scale.
    maj = np.bincount(fits[0][2]).argmax()
    vals = [accuracy_score(test[h][1], np.full(len(test[h][1]), maj)) for h in HOSPITALS]
    print(f"\nalways predicting num = {maj} (pooled majority): accuracy " + " ".join(f"{v:.3f}" for v in vals) + f"  mean {np.mean(vals):.3f}")


if __name__ == "__main__":
    main()
