"""Provenance of the four per-hospital files in this folder (run once; the outputs are committed).

Input: FLamby's Fed-Heart-Disease rows, one per patient, with FLamby's exact train/test split
(`flamby_heart_13features_split.csv`, made from the unmodified UCI files as FLamby's recipe says:
drop slope/ca/thal, drop rows with missing values, label = num > 0, one-hot cp and restecg with the
first level dropped). Output: one CSV per hospital with the 13 features *before* normalisation
(each node standardises with its own train split), the label, and the split.

Usage: python3 prepare.py PATH/TO/flamby_heart_13features_split.csv
"""
import csv
import sys

FEATURES = ["age", "sex", "trestbps", "chol", "fbs", "thalach", "exang", "oldpeak",
            "cp_2.0", "cp_3.0", "cp_4.0", "restecg_1.0", "restecg_2.0"]
OUT_NAMES = [f.replace(".0", "") for f in FEATURES]

def main(src):
    rows = {}
    with open(src, newline="") as f:
        for r in csv.DictReader(f):
            rows.setdefault(r["center_name"], []).append(r)
    for center, rs in rows.items():
        with open(f"{center}.csv", "w", newline="") as out:
            w = csv.writer(out, lineterminator="\n")
            w.writerow(OUT_NAMES + ["label", "split"])
            for r in rs:
                w.writerow([r[f] for f in FEATURES] + [r["label"], r["set"]])
        print(center, len(rs), sum(r["set"] == "train" for r in rs), sum(r["set"] == "test" for r in rs))

if __name__ == "__main__":
    main(sys.argv[1])
