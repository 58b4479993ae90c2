"""Runs the Flower side of the round-overhead benchmark (`tests/benches/rounds.rs` calls it):
the Flower App in `flower_app/` for a number of rounds on one of Flower's two engines, and writes
what its ServerApp recorded (per round: when its aggregation returned, the slowest local work).

    flower_rounds.py --engine deployment|simulation --config JSON --out FILE

deployment: `flower-superlink` and one `flower-supernode` per hospital as processes on loopback
(insecure: Flower's TLS is server-only and its node authentication is not mutual TLS, so this
favours Flower), the app submitted with `flwr run`; each SuperNode runs its ClientApp in a
process of its own, the SuperLink the ServerApp, as Flower deploys by default.
simulation: `flwr.simulation.run_simulation` (the Ray backend, every virtual node at once, each
given cores / nodes CPUs).
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

APP = Path(__file__).resolve().parent / "flower_app"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, timeout=120):
    """Until something listens on 127.0.0.1:`port` (the SuperLink's APIs take a few seconds)."""
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise SystemExit(f"flower_rounds: {proc.args[0]} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"flower_rounds: nothing listens on port {port} after {timeout} s")


def wait_for(path, procs, timeout):
    end = time.time() + timeout
    while time.time() < end:
        if path.exists():
            return
        for p in procs:
            if p.poll() is not None:
                raise SystemExit(f"flower_rounds: {p.args[0]} exited with {p.returncode} before the run finished")
        time.sleep(0.2)
    raise SystemExit(f"flower_rounds: no result after {timeout} s")


def deployment(cfg, work):
    bindir = Path(sys.executable).parent
    # Flower 1.42 serves its Fleet, Control and runtime APIs over HTTP on one address.
    link = free_port()
    home = work / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:{link}"\ninsecure = true\n'
    )
    # The SuperLink and SuperNodes start Flower's other executables (flower-superexec,
    # flwr-serverapp, flwr-clientapp) from PATH.
    path = f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"
    env = dict(os.environ, PATH=path, FLWR_HOME=str(home), SANCTUM_FLOWER_CONFIG=json.dumps(cfg), PYTHONPATH=str(APP))
    logs = []

    def spawn(name, args):
        log = open(work / f"{name}.log", "w")
        logs.append(log)
        return subprocess.Popen([str(bindir / args[0]), *args[1:]], env=env, stdout=log, stderr=subprocess.STDOUT)

    procs = [
        spawn(
            "superlink",
            [
                "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(link),
                "--database", str(work / "superlink.db"), "--disable-runtime-dependency-installation",
            ],
        )
    ]
    try:
        wait_port(link, procs[0])
        for i in range(cfg["nodes"]):
            procs.append(
                spawn(
                    f"supernode{i}",
                    [
                        "flower-supernode", "--insecure",
                        "--superlink", f"127.0.0.1:{link}",
                        "--host", "127.0.0.1", "--port", str(free_port()),
                        "--node-config", f"partition-id={i} num-partitions={cfg['nodes']}",
                    ],
                )
            )
        run = subprocess.run(
            [str(bindir / "flwr"), "run", str(APP), "bench"], env=env, capture_output=True, text=True, timeout=120
        )
        if run.returncode != 0:
            superlink = (work / "superlink.log").read_text()[-4000:]
            raise SystemExit(f"flower_rounds: flwr run failed:\n{run.stdout}\n{run.stderr}\nsuperlink:\n{superlink}")
        wait_for(Path(cfg["out"]), procs, timeout=900)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        for log in logs:
            log.close()


def simulation(cfg):
    os.environ["SANCTUM_FLOWER_CONFIG"] = json.dumps(cfg)
    sys.path.insert(0, str(APP))
    from flwr.simulation import run_simulation

    import sanctum_flower_bench as app

    run_simulation(
        server_app=app.server_app,
        client_app=app.client_app,
        num_supernodes=cfg["nodes"],
        # All the virtual nodes at once, as Sanctum's nodes share the machine's cores: with one
        # CPU each, Ray would run them in waves of `cores` and count the later waves' work as
        # Flower's overhead.
        backend_config={"client_resources": {"num_cpus": (os.cpu_count() or 1) / cfg["nodes"], "num_gpus": 0.0}},
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", choices=["deployment", "simulation"], required=True)
    ap.add_argument("--config", required=True, help="JSON: see flower_app/sanctum_flower_bench.py")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="sanctum-flower-") as tmp:
        work = Path(tmp)
        cfg = dict(json.loads(args.config), out=str(work / "result.json"))
        if args.engine == "deployment":
            deployment(cfg, work)
        else:
            simulation(cfg)
        result = json.loads(Path(cfg["out"]).read_text())
    result["engine"] = args.engine
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
