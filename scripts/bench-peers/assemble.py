"""Assembles BENCHMARKS.md from the benchmark logs `scripts/bench` collected.

Each benchmark prints its tables between `<!-- NAME:begin -->` and `<!-- NAME:end -->`; this
script puts each block under its heading, with the machine, versions and command above, and
keeps the hand-written findings (between `<!-- notes:begin -->` and `<!-- notes:end -->`) and
the blocks of benchmarks this run skipped (`--only`) from the file it replaces.
"""

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

SECTIONS = [
    ("training", "1. Local training against PyTorch",
     "One whole local round (the global weights loaded, the steps, the update), per step: ours is "
     "the node's `train_round`, PyTorch's a Flower-client-style loop over the same shapes, batch, "
     "learning rate and thread count. Goal: within 5 % of PyTorch (ratio ≤ 1.05)."),
    ("opacus", "2a. DP-SGD against Opacus",
     "Ours is the node's `train_round_dp` (Poisson sampling, ghost clipping, hardened noise from the "
     "OS-seeded CSPRNG, the round's setup included); Opacus 1.6 runs each grad-sample mode with "
     "Poisson sampling (through its DPDataLoader, which the plain PyTorch loop does not use) and "
     "its default, unhardened noise, timed from after `make_private`. Both sides get the same "
     "libtorch threads; ours also draws the next step's noise on the cores libtorch leaves free, "
     "as the node does in production, which Opacus cannot. "
     "In brackets: ours / theirs. Goals: ≤ 0.8× Opacus's fastest mode; ≤ 2× our plain round at "
     "batch 64 and ≤ 1.3× at batch 256."),
    ("dpsgd", "2b. DP-SGD against our plain step; the noise generator against its keystream",
     "`cargo bench -p sanctum-node --bench dpsgd`. Goals: the noise generator within 1.5× of the raw "
     "keystream it reads."),
    ("accounting", "3. Accounting against dp-accounting",
     "ε for a plan and the noise multiplier for a target ε, against dp-accounting's PLD accountant "
     "at the same discretisation (`cargo bench -p sanctum-protocol --bench accounting`, which runs "
     "`scripts/bench-peers/accounting.py` in the same run; ours computes the two neighbouring "
     "relations on two threads). Goals: ≥ 10× faster, ε within 0.1 %, no DP simulation waiting "
     "more than 1 s on accounting."),
    ("flower", "4. Round overhead against Flower",
     "`cargo bench -p sanctum-tests --bench rounds`, which runs `scripts/bench-peers/flower_rounds.py` "
     "(the Flower App in `scripts/bench-peers/flower_app/`) in the same run. Goal: ≤ 50 ms per round "
     "through real mutual-TLS processes, below even Flower's in-process simulation."),
    ("scale", "5. Aggregation at scale",
     "`cargo bench -p sanctum-tests --bench scale`. Goals: coordinator throughput ≥ 0.5× a plain "
     "loopback TCP copy of the same bytes; peak RSS ≤ 3× the model size."),
    ("secagg", "6. Secure aggregation against its keystream bound",
     "`cargo bench -p sanctum-protocol --bench secagg`. Goal: unmasking within 1.5× of its keystream bound."),
]


def blocks(text):
    return {m.group(1): m.group(2).strip("\n") for m in
            re.finditer(r"<!-- (\w+):begin -->\n(.*?)\n?<!-- \1:end -->", text, re.S)}


def sh(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine():
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        mem = next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal"))
        mem_gib = int(mem.split()[1]) / 2**20
    except (OSError, StopIteration):
        mem_gib = float("nan")
    return f"{model}, {os.cpu_count()} logical CPUs, {mem_gib:.0f} GiB memory, {platform.system()} {platform.release()}"


def versions():
    from importlib import metadata

    out = {}
    for name in ("torch", "opacus", "dp-accounting", "flwr"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--logs", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", required=True)
    ap.add_argument("--device", required=True)
    ap.add_argument("--command", required=True)
    args = ap.parse_args()

    old = Path(args.out).read_text() if Path(args.out).exists() else ""
    kept = blocks(old)
    fresh = {}
    for log in Path(args.logs).glob("*.out"):
        fresh.update(blocks(log.read_text()))
    # Each fresh table names its own run, so a table kept from an earlier run (--only) keeps its own.
    stamp = f"_Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC at commit {{commit}} by `{args.command}`._"
    if args.device != "cpu":
        # A GPU run fills the GPU section and leaves the CPU tables as they were.
        fresh = {f"{k}_cuda": f"Device: {args.device}.\n\n{b}" for k, b in fresh.items()}
    notes = kept.get("notes", "_No findings written yet._")
    commit = sh("git", "rev-parse", "--short", "HEAD")
    dirty = sh("git", "status", "--porcelain", "--untracked-files=no")
    if dirty and dirty != "unknown":
        commit += " (with uncommitted changes)"
    fresh = {k: stamp.format(commit=commit) + "\n\n" + b for k, b in fresh.items()}
    v = versions()
    lines = [
        "# Benchmarks",
        "",
        "Sanctum against what a hospital would run instead, each figure a ratio of two things timed "
        "side by side in one run on one machine. Written by `scripts/bench` (the test suite runs none "
        "of it); rerun it to refresh every table.",
        "",
        f"- Last command: `{args.command}` (each table names the run that measured it)",
        f"- Last run: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; commit {commit}",
        f"- Machine: {machine()}",
        f"- Device: {args.device}; libtorch intra-op threads on both sides of the training rows: {args.threads}",
        f"- Rust: {sh('rustc', '--version')}",
        "- Peers (PyPI, in the cache's venv): " + ", ".join(f"{k} {x}" for k, x in v.items())
        + f"; Python {platform.python_version()}",
        "",
    ]
    for key, title, intro in SECTIONS:
        lines += [f"## {title}", ""]
        if intro:
            lines += [intro, ""]
        body = fresh.get(key, kept.get(key))
        if body is None:
            body = f"Not run (`scripts/bench --only {key}`)."
        lines += [f"<!-- {key}:begin -->", body, f"<!-- {key}:end -->", ""]
    lines += [
        "## 7. GPU",
        "",
        "`scripts/bench --device cuda` runs the same suite on a GPU; its tables land here, the device named.",
        "",
    ]
    gpu = [k for k in sorted(fresh) if k.endswith("_cuda")] or [k for k in sorted(kept) if k.endswith("_cuda")]
    if not gpu:
        lines += ["No GPU rows yet: no GPU machine was lent to a session that ran the suite.", ""]
    for key in gpu:
        lines += [f"<!-- {key}:begin -->", fresh.get(key, kept.get(key)), f"<!-- {key}:end -->", ""]
    lines += [
        "## Findings (profiles behind the gaps)",
        "",
        "<!-- notes:begin -->",
        notes,
        "<!-- notes:end -->",
        "",
    ]
    Path(args.out).write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
