"""Provenance of the four per-hospital files in this folder (run once; the outputs are committed).

Input: FLamby's Fed-Heart-Disease rows, one per patient, with FLamby's exact train/test split
(`flamby_heart_13features_split.csv`, made from the unmodified UCI files as FLamby's recipe says:
drop slope/ca/thal, drop rows with missing values, label = num > 0, one-hot cp and restecg with the
first level dropped). Output: one CSV per hospital with the 13 features *before* normalisation
(each node standardises with its own train split), the label, and the split.

With the folder of the unmodified UCI files (`processed.<hospital>.data`) as a second argument it
also writes `multiclass/<hospital>.csv`: the same rows in the same order, the same 13 features and
split, and UCI's raw diagnosis `num` (0 = no disease, 1-4 = disease present) in place of the
binary label, read from the UCI file at the row's `source_row` (0-based line) and checked against
the derived table's `num` and against label = (num > 0). UCI's processed Hungarian file holds only
num 0 and 1, and FLamby's Switzerland train split has no num 0: see ../README.md.

Usage: python3 prepare.py PATH/TO/flamby_heart_13features_split.csv [PATH/TO/uci_folder]
"""
import csv
import os
import sys

FEATURES = ["age", "sex", "trestbps", "chol", "fbs", "thalach", "exang", "oldpeak",
            "cp_2.0", "cp_3.0", "cp_4.0", "restecg_1.0", "restecg_2.0"]
OUT_NAMES = [f.replace(".0", "") for f in FEATURES]

def uci_num(uci_dir, center):
    """The 14th field (num) of every line of UCI's processed file, by 0-based line number."""
    with open(os.path.join(uci_dir, f"processed.{center}.data"), newline="") as f:
        return [line[13] for line in csv.reader(f)]

def main(src, uci_dir=None):
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
    if uci_dir is None:
        return
    os.makedirs("multiclass", exist_ok=True)
    for center, rs in rows.items():
        nums = uci_num(uci_dir, center)
        counts = {s: [0] * 5 for s in ("train", "test")}
        with open(os.path.join("multiclass", f"{center}.csv"), "w", newline="") as out:
            w = csv.writer(out, lineterminator="\n")
            w.writerow(OUT_NAMES + ["num", "split"])
            for r in rs:
                num = nums[int(r["source_row"])]
                assert num == r["num"] and num in ("0", "1", "2", "3", "4"), (center, r["source_row"], num)
                assert r["label"] == ("1" if num != "0" else "0"), (center, r["source_row"])
                counts[r["set"]][int(num)] += 1
                w.writerow([r[f] for f in FEATURES] + [num, r["set"]])
        print(f"multiclass/{center}.csv  num 0..4  train {counts['train']}  test {counts['test']}")

if __name__ == "__main__":
    main(*sys.argv[1:3])
