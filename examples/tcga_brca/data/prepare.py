"""Provenance of the six per-region files in this folder (run once; the outputs are committed).

Input: FLamby's Fed-TCGA-BRCA files (owkin/FLamby @ edacf54, flamby/datasets/fed_tcga_brca/),
copied unmodified into ../shared/data/tcga_brca/:
  brca.csv              1096 patients: pid, the 39 covariates, E (event), T (time in days)
  train_test_split.csv  1088 patients: pid, fold (train/test), fold2 (<fold>_<center>)
  centers.csv           tissue source site (TSS) code -> region
and, to check against, the joined table derived/fed_tcga_brca_39features_split.csv.

FLamby's FedTcgaBrca(center=c, train=...) keeps the rows of brca.csv whose pid has
fold2 == "<train|test>_<c>", in brca.csv order, x = columns 1..39, y = (E, T); it does not
normalise anything. This script does the same for each center and writes one CSV per region:
  pid, the 39 covariates under their original names (text as in brca.csv), T, E, split
with E written 0/1 (brca.csv has 0.0/1.0; the schema reads E as a boolean) and split = FLamby's
fold. The 8 patients of brca.csv that train_test_split.csv leaves out (all from TSS codes whose
region is "Other") are in no file, as in FLamby.

It checks, and fails otherwise: the center of every patient (from fold2) equals the region of its
TSS code (the second field of the TCGA barcode) in centers.csv; every value equals the derived
table's; the train/test sizes are FLamby's (248/63, 156/40, 164/42, 129/33, 129/33, 40/11).

Usage: python3 prepare.py PATH/TO/shared/data/tcga_brca   (writes into the current directory)
"""
import csv
import os
import sys

REGIONS = ["Northeast", "South", "West", "Midwest", "Europe", "Canada"]  # FLamby's centers 0..5
SIZES = [(248, 63), (156, 40), (164, 42), (129, 33), (129, 33), (40, 11)]


def read(path):
    with open(path, newline="") as f:
        r = csv.reader(f)
        header = next(r)
        return header, [dict(zip(header, row)) for row in r]


def main(src):
    header, brca = read(os.path.join(src, "brca.csv"))
    assert len(header) == 42 and header[0] == "pid" and header[40:] == ["E", "T"], header
    covariates = header[1:40]
    _, split = read(os.path.join(src, "train_test_split.csv"))
    _, centers = read(os.path.join(src, "centers.csv"))
    region_of_tss = {c["TSS Code"]: c["Region"] for c in centers}
    fold = {}
    for s in split:
        f, c = s["fold2"].split("_")
        assert f == s["fold"], s
        c = int(c)
        assert region_of_tss[s["pid"].split("-")[1]] == REGIONS[c], s
        fold[s["pid"]] = (c, f)
    assert len(fold) == len(split) == 1088

    _, derived = read(os.path.join(src, "derived", "fed_tcga_brca_39features_split.csv"))
    derived = {d["pid"]: d for d in derived}
    assert set(derived) == set(fold)

    out_header = ["pid"] + covariates + ["T", "E", "split"]
    per_center = {c: [] for c in range(6)}
    for row in brca:
        if row["pid"] not in fold:
            continue
        c, f = fold[row["pid"]]
        d = derived[row["pid"]]
        assert int(d["center"]) == c and d["set"] == f, row["pid"]
        for k in covariates + ["E", "T"]:
            assert float(d[k]) == float(row[k]), (row["pid"], k)
        assert row["E"] in ("0.0", "1.0"), row["E"]
        assert float(row["T"]) >= 0.0, row["T"]
        per_center[c].append([row["pid"]] + [row[k] for k in covariates] + [row["T"], row["E"][0], f])

    for c, rows in per_center.items():
        n_train = sum(r[-1] == "train" for r in rows)
        assert (n_train, len(rows) - n_train) == SIZES[c], (c, n_train, len(rows))
        with open(f"{REGIONS[c].lower()}.csv", "w", newline="") as out:
            w = csv.writer(out, lineterminator="\n")
            w.writerow(out_header)
            w.writerows(rows)
        events = sum(r[-2] == "1" for r in rows)
        print(f"{c} {REGIONS[c]:<9} rows {len(rows):>3}  train {n_train:>3}  test {len(rows) - n_train:>2}  events {events}")


if __name__ == "__main__":
    main(sys.argv[1])
