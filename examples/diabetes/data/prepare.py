"""Provenance of the four per-hospital files in this folder (run once; the outputs are committed).

Input: scikit-learn's diabetes data, RAW (`sklearn.datasets.load_diabetes(scaled=False)`, the
table of Efron, Hastie, Johnstone and Tibshirani 2004 as scikit-learn ships it in
`sklearn/datasets/data/diabetes_data_raw.csv.gz` and `diabetes_target.csv.gz`): 442 patients,
age, sex, bmi, bp, s1..s6 and the target, a quantitative measure of disease progression one
year after baseline.

Output: `hospital_{a,b,c,d}.csv`, one row per patient, columns
  patient (the 1-based row of the patient in scikit-learn's table, for traceability),
  age, sex, bmi, bp, s1, s2, s3, s4, s5, s6 (scikit-learn's names and raw values),
  y (the target), split (train/test).

Hospital assignment (why: real hospitals differ in case mix, and age is the simplest documented
axis of it; a hard split by age quartile would leave each hospital a narrow age band, which no
real catchment has). Each patient has an age quantile q = (rank of age among the 442, ties
averaged, minus 1/2) / 442. Hospital k (a, b, c, d) has an age centre c_k = 0.125, 0.375, 0.625,
0.875 and a size weight s_k = 0.35, 0.30, 0.20, 0.15 (so the hospitals differ in size too: 114,
136, 108 and 84 patients; mean age 35, 45, 57, 62, with overlapping ranges); the patient goes to hospital k
with probability proportional to s_k * exp(-(q - c_k)^2 / (2 * 0.2^2)). The draw is
reproducible without any random-number library: u = int(SHA-256("sanctum-diabetes/hospital/" +
str(SEED) + "/" + str(patient))[:8 bytes], big-endian) / 2^64, and the patient goes to the first
k whose cumulative probability exceeds u.

Train/test split, per hospital, 75/25 exactly: a hospital's patients are ordered by
SHA-256("sanctum-diabetes/split/" + str(SEED) + "/" + str(patient)) and the first round(n / 4)
are test. SEED = 2004 (the paper's year).

It also prints the declared statistics the schema publishes (mean and sample std, ddof = 1, of
each feature over all 442 patients) and the per-hospital summaries quoted in ../README.md.

Usage: python3 prepare.py   (needs scikit-learn; writes into the current directory)
"""
import csv
import hashlib
import math

from sklearn.datasets import load_diabetes

SEED = 2004
HOSPITALS = ["hospital_a", "hospital_b", "hospital_c", "hospital_d"]
CENTRES = [0.125, 0.375, 0.625, 0.875]
SIZES = [0.35, 0.30, 0.20, 0.15]
WIDTH = 0.2
FEATURES = ["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"]


def uniform(tag, patient):
    digest = hashlib.sha256(f"sanctum-diabetes/{tag}/{SEED}/{patient}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def text(v):
    """The value as the raw table spells it: integers without a decimal point."""
    v = float(v)
    return str(int(v)) if v.is_integer() else repr(v)


def age_quantiles(ages):
    order = sorted(range(len(ages)), key=lambda i: ages[i])
    ranks = [0.0] * len(ages)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and ages[order[j + 1]] == ages[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1  # 1-based average rank of the tie group
        i = j + 1
    return [(r - 0.5) / len(ages) for r in ranks]


def main():
    d = load_diabetes(scaled=False)
    x, y = d.data, d.target
    assert list(d.feature_names) == FEATURES and x.shape == (442, 10)
    q = age_quantiles([row[0] for row in x])
    members = {h: [] for h in HOSPITALS}
    for i in range(len(y)):
        patient = i + 1
        w = [s * math.exp(-((q[i] - c) ** 2) / (2 * WIDTH**2)) for s, c in zip(SIZES, CENTRES)]
        u, acc = uniform("hospital", patient), 0.0
        for h, wk in zip(HOSPITALS, w):
            acc += wk / sum(w)
            if u < acc:
                members[h].append(i)
                break
        else:
            members[HOSPITALS[-1]].append(i)
    for h, idx in members.items():
        order = sorted(idx, key=lambda i: hashlib.sha256(f"sanctum-diabetes/split/{SEED}/{i + 1}".encode()).digest())
        test = set(order[: round(len(idx) / 4)])
        with open(f"{h}.csv", "w", newline="") as out:
            wr = csv.writer(out, lineterminator="\n")
            wr.writerow(["patient"] + FEATURES + ["y", "split"])
            for i in idx:
                wr.writerow([i + 1] + [text(v) for v in x[i]] + [text(y[i]), "test" if i in test else "train"])
        ages = [x[i][0] for i in idx]
        ys = [y[i] for i in idx]
        print(f"{h}: {len(idx)} patients (train {len(idx) - len(test)}, test {len(test)}), "
              f"age mean {sum(ages) / len(ages):.1f} [{min(ages):.0f}-{max(ages):.0f}], "
              f"y mean {sum(ys) / len(ys):.1f}, sex=2 {sum(x[i][1] == 2 for i in idx) / len(idx):.2f}")
    print("\ndeclared statistics over all 442 patients (mean, sample std ddof = 1):")
    for j, name in enumerate(FEATURES):
        col = [float(row[j]) for row in x]
        m = math.fsum(col) / len(col)
        s = math.sqrt(math.fsum((v - m) ** 2 for v in col) / (len(col) - 1))
        print(f"  {name:<4} mean {m!r}  std {s!r}  min {text(min(col))}  max {text(max(col))}")
    print(f"  y    min {text(min(y))}  max {text(max(y))}")


if __name__ == "__main__":
    main()
