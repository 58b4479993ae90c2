#!/usr/bin/env python3
"""dp_accounting's side of `cargo bench -p sanctum-protocol --bench accounting`.

Reads the grid as JSON on stdin (written by the Rust bench, so both sides measure the same points):
  {"interval": 1e-4, "repeats": 3, "max_seconds": 60,
   "epsilon": [[q, sigma, steps, delta], ...],
   "calibration": [[target_epsilon, q, steps, delta, lower, tol], ...]}
and prints one JSON line per point:
  {"kind":"epsilon","q":..,"sigma":..,"steps":..,"delta":..,"epsilon":..,"seconds":..}
  {"kind":"calibration","target_epsilon":..,"q":..,"steps":..,"delta":..,"noise_multiplier":..,"seconds":..}
or, for a point not measured, the same keys with "skipped": "<reason>".

The accountant is dp_accounting's PLDAccountant (ADD_OR_REMOVE_ONE, connect-the-dots, pessimistic
estimate: its defaults) at the interval given, on PoissonSampledDpEvent(q, GaussianDpEvent(sigma))
self-composed T times; calibration is dp_accounting.calibrate_dp_mechanism over the same
accountant. Each time is the median of `repeats` runs, each from a fresh accountant.
"""

import json
import statistics
import sys
import time

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant


def event(q, sigma, steps):
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)


def accountant(interval):
    return pld_privacy_accountant.PLDAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
        value_discretization_interval=interval)


def epsilon(interval, q, sigma, steps, delta):
    acc = accountant(interval)
    acc.compose(event(q, sigma, steps))
    return acc.get_epsilon(delta)


def calibrate(interval, target, q, steps, delta, lower, tol):
    return dp_accounting.calibrate_dp_mechanism(
        lambda: accountant(interval),
        lambda sigma: event(q, sigma, steps),
        target, delta,
        bracket_interval=dp_accounting.LowerEndpointAndGuess(lower, 1.0),
        tol=tol)


def timed(f, repeats, max_seconds):
    """(value, median seconds); after one run slower than max_seconds, that run alone."""
    times, value = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        value = f()
        times.append(time.perf_counter() - t0)
        if times[-1] > max_seconds:
            break
    return value, statistics.median(times)


def main():
    spec = json.load(sys.stdin)
    h, repeats, max_s = spec["interval"], spec["repeats"], spec["max_seconds"]
    for q, sigma, steps, delta in spec["epsilon"]:
        row = {"kind": "epsilon", "q": q, "sigma": sigma, "steps": steps, "delta": delta}
        try:
            row["epsilon"], row["seconds"] = timed(lambda: epsilon(h, q, sigma, steps, delta), repeats, max_s)
        except Exception as e:  # reported, never hidden: the bench prints the reason
            row["skipped"] = f"dp_accounting failed: {type(e).__name__}: {e}"
        print(json.dumps(row), flush=True)
    for target, q, steps, delta, lower, tol in spec["calibration"]:
        row = {"kind": "calibration", "target_epsilon": target, "q": q, "steps": steps, "delta": delta}
        try:
            row["noise_multiplier"], row["seconds"] = timed(
                lambda: calibrate(h, target, q, steps, delta, lower, tol), repeats, max_s)
        except Exception as e:
            row["skipped"] = f"dp_accounting failed: {type(e).__name__}: {e}"
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
