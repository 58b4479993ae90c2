"""Independent reference figures for the diabetes regression example, computed in Python from the
committed CSVs (not by Sanctum), and the emulation that chose the plans' hyper-parameters.

Inputs as the schema builds them: the nine continuous features standardised with the declared
statistics (all 442 patients, ../schema.toml), sex one-hot with level "1" dropped (one 0/1 input
`sex=2`, not standardised), 10 inputs; target y unscaled.

1. Closed form (scikit-learn LinearRegression, ordinary least squares): pooled (the union of the
   four train splits) and local-only (each hospital's train split), scored by RMSE, MAE and R²
   (scikit-learn's r2_score: 1 - SSE / SS around the test split's own mean) on each hospital's
   test split. Deterministic.
2. Emulation of the plans in numpy: a linear model (weights and bias uniform +-1/sqrt(10), as the
   zoo initialises), each round every hospital runs `steps` SGD steps on the mean squared error of
   mini-batches of `batch` rows (reshuffled each pass over its train split) from the global model;
   FedAvg takes the sample-weighted mean, FedAdam steps as coordinator/src/aggregate.rs does
   (m, v started at 0 and tau^2, no bias correction). The grid is scored by the pooled TRAIN
   mean squared error of the final global model, mean over five seeds: the test splits played no
   part in the choice. It is an emulation (Sanctum's batch order and initial draws differ), a
   guide to what the plans should reach, not a Sanctum result.

Usage: python3 reference.py [--grid]   (needs numpy, pandas, scikit-learn)
"""
import sys
import tomllib

import numpy as np
import pandas as pd
from sklearn.linear_model import LinearRegression
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

HOSPITALS = ["hospital_a", "hospital_b", "hospital_c", "hospital_d"]


def load():
    with open("../schema.toml", "rb") as f:
        cols = {c["name"]: c for c in tomllib.load(f)["columns"]}
    cont = ["age", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"]
    mean = np.array([cols[c]["mean"] for c in cont])
    std = np.array([cols[c]["std"] for c in cont])
    out = {}
    for h in HOSPITALS:
        d = pd.read_csv(f"{h}.csv")
        x = np.column_stack([(d[cont].to_numpy() - mean) / std, (d["sex"] == 2).to_numpy(float)])
        tr = (d.split == "train").to_numpy()
        out[h] = ((x[tr], d.y.to_numpy(float)[tr]), (x[~tr], d.y.to_numpy(float)[~tr]))
    return out


def closed_form(data):
    fits = [("pooled", np.vstack([data[h][0][0] for h in HOSPITALS]), np.concatenate([data[h][0][1] for h in HOSPITALS]))]
    fits += [(f"local {h}", *data[h][0]) for h in HOSPITALS]
    rows = {}
    for name, x, y in fits:
        m = LinearRegression().fit(x, y)
        rows[name] = [(np.sqrt(mean_squared_error(yt, m.predict(xt))), mean_absolute_error(yt, m.predict(xt)),
                       r2_score(yt, m.predict(xt))) for xt, yt in (data[h][1] for h in HOSPITALS)]
        if name == "pooled":
            px = np.vstack([data[h][1][0] for h in HOSPITALS])
            py = np.concatenate([data[h][1][1] for h in HOSPITALS])
            print(f"pooled OLS on the pooled test split (n = {len(py)}): RMSE {np.sqrt(mean_squared_error(py, m.predict(px))):.1f}"
                  f"  MAE {mean_absolute_error(py, m.predict(px)):.1f}  R² {r2_score(py, m.predict(px)):.3f};"
                  f"  train R² {m.score(x, y):.3f}, train MSE {mean_squared_error(y, m.predict(x)):.1f}")
    for k, metric in enumerate(["RMSE", "MAE", "R²"]):
        print(f"\n{metric} on each hospital's test split (closed form)")
        print("| trained on | " + " | ".join(HOSPITALS) + " | mean |")
        print("|---|" + "---|" * (len(HOSPITALS) + 1))
        for name, vals in rows.items():
            v = [t[k] for t in vals]
            print(f"| {name} | " + " | ".join(f"{a:.3f}" if k == 2 else f"{a:.1f}" for a in v)
                  + (f" | {np.mean(v):.3f} |" if k == 2 else f" | {np.mean(v):.1f} |"))


def emulate(data, strategy, lr, rounds, steps, batch, server_lr, seed):
    rng = np.random.default_rng(seed)
    n_in = 10
    bound = 1 / np.sqrt(n_in)
    w = np.concatenate([rng.uniform(-bound, bound, n_in), rng.uniform(-bound, bound, 1)])
    m = np.zeros_like(w)
    v = np.full_like(w, 1e-8**2)
    sizes = np.array([len(data[h][0][1]) for h in HOSPITALS], float)
    for _ in range(rounds):
        deltas = []
        for h in HOSPITALS:
            x, y = data[h][0]
            xb = np.column_stack([x, np.ones(len(y))])
            local = w.copy()
            order, pos = rng.permutation(len(y)), 0
            for _ in range(steps):
                if pos + batch > len(y):
                    order, pos = rng.permutation(len(y)), 0
                idx = order[pos:pos + batch]
                pos += batch
                err = xb[idx] @ local - y[idx]
                local -= lr * 2 * xb[idx].T @ err / len(idx)
            deltas.append(local - w)
        d = np.average(deltas, axis=0, weights=sizes)
        if strategy == "fedavg":
            w = w + d
        else:
            m = 0.9 * m + 0.1 * d
            v = 0.999 * v + 0.001 * d * d
            w = w + server_lr * m / (np.sqrt(v) + 1e-8)
    return w


def scores(data, w):
    x = np.vstack([data[h][0][0] for h in HOSPITALS])
    y = np.concatenate([data[h][0][1] for h in HOSPITALS])
    train_mse = np.mean((np.column_stack([x, np.ones(len(y))]) @ w - y) ** 2)
    test = []
    for h in HOSPITALS:
        xt, yt = data[h][1]
        p = np.column_stack([xt, np.ones(len(yt))]) @ w
        test.append((np.sqrt(mean_squared_error(yt, p)), mean_absolute_error(yt, p), r2_score(yt, p)))
    return train_mse, test


def grid(data):
    print("\nemulation grid, pooled train MSE of the final global model, mean over seeds 0-4")
    for rounds, steps, batch in [(20, 100, 16)]:
        for lr in [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]:
            mse = np.mean([scores(data, emulate(data, "fedavg", lr, rounds, steps, batch, 0, s))[0] for s in range(5)])
            print(f"  fedavg  rounds {rounds} steps {steps} batch {batch} lr {lr:<6}  train MSE {mse:10.1f}")
        for slr in [0.1, 0.3, 1.0, 2.0, 3.0, 10.0]:
            mse = np.mean([scores(data, emulate(data, "fedadam", 1e-2, rounds, steps, batch, slr, s))[0] for s in range(5)])
            print(f"  fedadam rounds {rounds} steps {steps} batch {batch} lr 0.01 server lr {slr:<5} train MSE {mse:10.1f}")


def chosen(data):
    for name, strategy, lr, slr in [("fedavg.toml", "fedavg", 1e-2, 0), ("fedadam.toml", "fedadam", 1e-2, 2.0)]:
        runs = [scores(data, emulate(data, strategy, lr, 20, 100, 16, slr, s)) for s in range(5)]
        r2 = np.array([[t[2] for t in r[1]] for r in runs])
        rmse = np.array([[t[0] for t in r[1]] for r in runs])
        print(f"\nemulated {name} (seeds 0-4): R² per hospital " + " ".join(f"{a:.3f}" for a in r2.mean(0))
              + f"  mean {r2.mean():.3f} ± {r2.mean(1).std(ddof=1):.3f};  RMSE " + " ".join(f"{a:.1f}" for a in rmse.mean(0))
              + f"  mean {rmse.mean():.1f}")


if __name__ == "__main__":
    data = load()
    closed_form(data)
    if "--grid" in sys.argv:
        grid(data)
    chosen(data)
