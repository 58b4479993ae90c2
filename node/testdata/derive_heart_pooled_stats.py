"""Derives the public standardisation statistics that `protocol/src/schema.rs` declares for
`heart_disease` (run once; the numbers are committed in the schema, so a clean clone needs neither
this script nor its input).

Input: FLamby's Fed-Heart-Disease table with FLamby's exact train/test split
(`flamby_heart_13features_split.csv`, the same table `examples/heart_disease/data/prepare.py`
splits into the four hospitals' files). Output: the mean and the sample standard deviation
(ddof = 1) of each feature over the train split of all four centres pooled (n = 486), printed
as Rust slices with every digit of the f64 (Python's `repr` round-trips exactly).

`data::tests::declared_heart_statistics_are_the_pooled_train_split` recomputes the same numbers
in Rust from the committed per-hospital files, and checks them against FLamby's own
`pooled_train` figures in `flamby_heart_norm_stats.json` (6 decimals).

Usage: python3 derive_heart_pooled_stats.py PATH/TO/flamby_heart_13features_split.csv
"""
import csv
import math
import sys

FEATURES = ["age", "sex", "trestbps", "chol", "fbs", "thalach", "exang", "oldpeak",
            "cp_2.0", "cp_3.0", "cp_4.0", "restecg_1.0", "restecg_2.0"]


def main(src):
    with open(src, newline="") as f:
        train = [r for r in csv.DictReader(f) if r["set"] == "train"]
    n = len(train)
    means, stds = [], []
    for name in FEATURES:
        xs = [float(r[name]) for r in train]
        mean = math.fsum(xs) / n
        var = math.fsum((x - mean) ** 2 for x in xs) / (n - 1)
        means.append(mean)
        stds.append(math.sqrt(var))
    print(f"// n = {n} train rows over {len({r['center'] for r in train})} centres")
    print("mean: &[" + ", ".join(repr(m) for m in means) + "],")
    print("std: &[" + ", ".join(repr(s) for s in stds) + "],")


if __name__ == "__main__":
    main(sys.argv[1])
