"""Reference values for Sanctum's privacy accountants, from independent implementations.

Run once; the JSON files beside this script are committed and the Rust tests compare against them.

    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install opacus==1.6.0 dp_accounting==0.6.0
    /tmp/ref/bin/python generate.py

- rdp_opacus.json: Opacus's RDP of the Poisson-subsampled Gaussian
  (opacus.accountants.analysis.rdp.compute_rdp, Mironov, Talwar and Zhang 2019) on Opacus's default
  orders, and the (ε, δ) Opacus derives with its improved conversion (get_privacy_spent).
- epsilon_reference.json: ε for (q, σ, T, δ) from dp_accounting's PLD accountant
  (PLDAccountant, ADD_OR_REMOVE_ONE, value_discretization_interval 1e-4) and Opacus's PRV accountant
  (eps_error 0.01: its lower bound, estimate and upper bound).
"""
import json
import platform
import sys

import dp_accounting
import opacus
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as opacus_rdp

ORDERS = RDPAccountant.DEFAULT_ALPHAS

RDP_CASES = [
    (q, sigma, steps)
    for q in (256 / 60000, 0.01, 0.1, 0.5, 1.0)
    for sigma in (0.5, 1.1, 4.0)
    for steps in (1, 1000)
]

EPS_CASES = [
    # (q, sigma, steps, delta)
    (256 / 60000, 1.1, 14040, 1e-5),  # the public check: RDP ≈ 2.594, PLD ≈ 2.38
    (256 / 60000, 1.1, 1000, 1e-5),
    (0.01, 1.0, 1000, 1e-5),
    (0.01, 2.0, 5000, 1e-6),
    (0.05, 1.5, 500, 1e-5),
    (0.1, 3.0, 200, 1e-5),
    (4 / 199, 1.0, 1500, 1e-5),  # heart disease, Cleveland: batch 4 of 199, 15 x 100 steps
    (4 / 30, 1.5, 1500, 1e-5),  # heart disease, Switzerland: batch 4 of 30
    (1.0, 5.0, 10, 1e-5),
]


def pld_epsilon(q, sigma, steps, delta):
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


def main():
    rdp = []
    for q, sigma, steps in RDP_CASES:
        values = opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=ORDERS)
        eps, order = opacus_rdp.get_privacy_spent(orders=ORDERS, rdp=values, delta=1e-5)
        rdp.append({"q": q, "sigma": sigma, "steps": steps, "rdp": [float(v) for v in values],
                    "delta": 1e-5, "epsilon": float(eps), "best_order": float(order)})
    eps_cases = []
    for q, sigma, steps, delta in EPS_CASES:
        values = opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=ORDERS)
        rdp_eps, _ = opacus_rdp.get_privacy_spent(orders=ORDERS, rdp=values, delta=delta)
        low, est, up = prv_bounds(q, sigma, steps, delta)
        eps_cases.append({"q": q, "sigma": sigma, "steps": steps, "delta": delta,
                          "rdp_epsilon_opacus": float(rdp_eps),
                          "pld_epsilon_dp_accounting": float(pld_epsilon(q, sigma, steps, delta)),
                          "prv_epsilon_opacus": {"lower": low, "estimate": est, "upper": up}})
        print(eps_cases[-1], file=sys.stderr)
    meta = {"generated_by": "protocol/testdata/privacy/generate.py", "opacus": opacus.__version__,
            "dp_accounting": getattr(dp_accounting, "__version__", "0.6.0"),
            "python": platform.python_version()}
    with open("rdp_opacus.json", "w") as f:
        json.dump({"meta": meta, "orders": [float(o) for o in ORDERS], "cases": rdp}, f, indent=1)
    with open("epsilon_reference.json", "w") as f:
        json.dump({"meta": meta, "cases": eps_cases}, f, indent=1)


def prv_bounds(q, sigma, steps, delta):
    """Opacus's PRV accountant (Gopi et al. 2021): lower bound, estimate, upper bound of ε."""
    eps_error, delta_error = 0.01, delta / 1000
    acc = PRVAccountant()
    acc.history = [(sigma, q, steps)]
    dprv = acc._get_dprv(eps_error=eps_error, delta_error=delta_error)  # noqa: SLF001
    low, est, up = dprv.compute_epsilon(delta, delta_error, eps_error)
    return float(low), float(est), float(up)


if __name__ == "__main__":
    main()
