"""Scale-out benchmark: rounds per minute and peak memory for 10, 100 and 1,000 simulated clients per round.

Side by side in one run: fedtune in-process, fedtune on Ray with 1 and 2 workers, and (with ``--flower
HARNESS``) Flower's Ray simulation from the Flower baseline harness, all on the harness's workload C: the
"micro" MLP 64-128-10 (9,610 parameters), every client sampled every round, 1 local SGD step (lr 0.05) on a
batch of 32 synthetic examples (x ~ N(0, 1)^64, y uniform over 10 classes), R = 3 rounds, no evaluation.
The one difference: Flower's harness draws a fresh batch per (client, round), fedtune clients hold a fixed
batch of 32; the compute per client is the same. Every fedtune process uses 1 torch thread (Flower's default
actor gets 2, its num_cpus=1 variant 1).

Every variant runs as a child process; this script samples the child's whole process tree (the Ray daemons
and actors included) with psutil: peak sum of PSS (shared pages counted once) and of RSS, and CPU used by
other processes on the machine meanwhile ("foreign" cores: contention on a shared machine).

    .venv/bin/python benchmarks/scale.py --out /tmp/scale.json                       # fedtune only
    .venv/bin/python benchmarks/scale.py --flower /tmp/x/flower-baseline --out ...   # with Flower

Steady round = median wall time of rounds 2..R (round 1 includes warm-up); rounds/min = 60 / steady round.
"""

from __future__ import annotations

import time

T = {"script_start": time.time()}  # before any heavy import, like the Flower harness

import argparse  # noqa: E402
import contextlib  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

MICRO = {"d_in": 64, "hidden": 128, "classes": 10}  # the harness's micro_mlp: 9,610 parameters
BATCH, LR, STEPS = 32, 0.05, 1


# ---------------------------------------------------------------------------------------------------------
# Child: one fedtune variant
# ---------------------------------------------------------------------------------------------------------
def micro_worker(num_clients: int):
    """The workload-C worker: a micro MLP (seeded) and ``num_clients`` clients of 32 synthetic examples."""
    import numpy as np
    import torch

    from fedtune.client.worker import ClientWorker
    from fedtune.data.types import ArrayExample
    from fedtune.tasks.module import ModuleTask

    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Linear(MICRO["d_in"], MICRO["hidden"]),
        torch.nn.ReLU(),
        torch.nn.Linear(MICRO["hidden"], MICRO["classes"]),
    )
    rng = np.random.default_rng(0)
    records = {}
    for i in range(num_clients):
        x = rng.standard_normal((BATCH, MICRO["d_in"]), dtype=np.float32)
        y = rng.integers(0, MICRO["classes"], BATCH)
        records[f"client{i:04d}"] = ([ArrayExample(x[j], int(y[j])) for j in range(BATCH)], [])
    return ClientWorker(ModuleTask(module), records)


def run_fedtune(backend: str, workers: int, clients: int, rounds: int, out: str) -> None:
    import torch

    from fedtune.config.load import parse_config
    from fedtune.server.build import build_strategy
    from fedtune.server.loop import run_round

    # One torch thread per process everywhere (Ray pins each actor to cpus_per_worker=1): on this shared
    # 2-core machine two OpenMP threads spin against other load and made in-process rounds 5-10x slower.
    torch.set_num_threads(1)
    T["imported"] = time.time()
    simulation = {"backend": backend}
    if backend == "ray":
        simulation |= {"num_workers": workers, "num_cpus": os.cpu_count(), "cpus_per_worker": 1}
    config = parse_config(
        {
            "federation": {"rounds": 10**6, "clients_per_round": clients},  # never the last round: no eval
            "client": {"local_steps": STEPS, "batch_size": BATCH, "lr": LR, "optimizer": "sgd", "max_grad_norm": None},
            "eval": {"every": 10**6},
            "simulation": simulation,
        }
    )
    factory = functools.partial(micro_worker, clients)
    worker = factory()
    if backend == "ray":
        from fedtune.transport.ray_backend import RayTransport

        transport = RayTransport(factory, list(worker.records), config.simulation)
    else:
        from fedtune.transport.inprocess import InProcessTransport

        transport = InProcessTransport(worker)
    T["transport_ready"] = time.time()
    strategy = build_strategy(config)
    state = strategy.init_state(worker.current_params(), worker.view.spec)
    log = []
    for _ in range(rounds):
        t0 = time.time()
        state, report = run_round(config, strategy, transport, state)
        log.append({"t_start": t0, "t_end": time.time(), "ok": len(report.clients), "failed": len(report.failures)})
    transport.close()
    import numpy as np

    T["script_end"] = time.time()
    result = {
        "T": T,
        "rounds": log,
        "num_params": int(worker.view.spec.numel),
        "torch_threads": torch.get_num_threads(),
        "final_norm": float(np.linalg.norm(state.params)),
    }
    Path(out).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------------------
# Parent: run each variant as a child and measure its process tree
# ---------------------------------------------------------------------------------------------------------
def _busy_cpu_s() -> float:
    with open("/proc/stat") as fh:
        vals = [int(v) for v in fh.readline().split()[1:]]
    return (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")


def _pss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(cmd: list[str], env: dict, log_path: Path, timeout_s: float) -> dict:
    """Wall time, peak tree memory, tree CPU and foreign CPU of one command."""
    import psutil

    busy0 = _busy_cpu_s()
    with open(log_path, "w") as log:
        t0 = time.time()
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        root = psutil.Process(child.pid)
        try:
            peak, cpu = _sample_until_exit(child, root, t0, timeout_s)
        finally:  # interrupted or timed out: leave no Ray daemons behind
            with contextlib.suppress(OSError):
                os.killpg(child.pid, signal.SIGKILL)
        rc = child.wait()
        wall = time.time() - t0
    tree_cpu = sum(cpu.values())
    foreign = max(0.0, _busy_cpu_s() - busy0 - tree_cpu)
    return {"rc": rc, "wall_s": wall, "peak": peak, "tree_cpu_s": tree_cpu, "foreign_cores": foreign / wall}


def _sample_until_exit(child: subprocess.Popen, root, t0: float, timeout_s: float) -> tuple[dict, dict]:
    import psutil

    peak = {"pss_mb": 0.0, "rss_mb": 0.0, "procs": 0}
    cpu: dict[int, float] = {}
    while child.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            procs = []
        # daemons that double-fork away from the child still carry its session id
        seen = {p.pid for p in procs}
        for p in psutil.process_iter():
            try:
                if p.pid not in seen and os.getsid(p.pid) == child.pid:
                    procs.append(p)
            except (OSError, psutil.Error):
                continue
        rss = pss = 0
        for p in procs:
            try:
                rss += p.memory_info().rss
                pss += _pss_bytes(p.pid)
                cpu[p.pid] = sum(p.cpu_times()[:2])
            except psutil.Error:
                continue
        peak["pss_mb"] = max(peak["pss_mb"], pss / 2**20)
        peak["rss_mb"] = max(peak["rss_mb"], rss / 2**20)
        peak["procs"] = max(peak["procs"], len(procs))
        if time.time() - t0 > timeout_s:
            break
        time.sleep(0.25)
    return peak, cpu


def summarise(result: dict, t_launch: float) -> dict:
    rounds = result.get("rounds", [])
    steady = [r["t_end"] - r["t_start"] for r in rounds[1:]] or [float("nan")]
    first = rounds[0]["t_start"] if rounds else float("nan")
    median = statistics.median(steady)
    return {
        "to_round1_s": first - t_launch,
        "round1_s": rounds[0]["t_end"] - rounds[0]["t_start"] if rounds else float("nan"),
        "steady_round_s": median,
        "rounds_per_min": 60.0 / median if median > 0 else float("nan"),
    }


def flower_rounds(raw: dict) -> list[dict]:
    """The Flower harness's per-round timestamps, in this script's form."""
    return [{"t_start": r["t_start"], "t_end": r["t_end"], "ok": r.get("n_replies", 0)} for r in raw["rounds"]]


def variants(args: argparse.Namespace) -> list[tuple[str, list[str], dict]]:
    here = Path(__file__).resolve()
    out = []
    for k in args.clients:
        for name in args.fedtune:
            backend, workers = ("inprocess", 0) if name == "inprocess" else ("ray", int(name.removeprefix("ray")))
            cmd = [sys.executable, str(here), "--child", backend, str(workers), str(k), str(args.rounds)]
            out.append((f"fedtune-{name}", cmd, {"clients": k}))
        if args.flower and k in args.flower_clients:
            harness = Path(args.flower)
            for cpus in args.flower_cpus:  # Flower's default num_cpus=2: 1 actor x 2 threads; 1: 2 actors
                cmd = [str(harness / "venv/bin/python"), str(harness / "bench/flower_sim.py"), "--model", "micro"]
                cmd += ["--clients", str(k), "--rounds", str(args.rounds), "--steps", str(STEPS)]
                cmd += ["--bs", str(BATCH), "--cpus-per-client", str(cpus)]
                out.append((f"flower-cpus{cpus:g}", cmd, {"clients": k}))
    return out


def parent(args: argparse.Namespace) -> None:
    scratch = Path(tempfile.mkdtemp(prefix="fedtune-scale-"))
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", FLWR_TELEMETRY_ENABLED="0")
    if args.flower:
        harness = Path(args.flower).resolve()
        # the harness's env.sh puts RAY_TMPDIR under its folder; a short path keeps Ray's socket paths under
        # the 107-byte AF_UNIX limit wherever the harness was copied
        env |= {"FLWR_HOME": str(harness / "work/flwr_home"), "RAY_TMPDIR": "/tmp/fedtune-flwr-ray"}
    rows = []
    for name, cmd, meta in variants(args):
        out = scratch / f"{name}-{meta['clients']}.json"
        cmd = [*cmd, "--out", str(out)]
        t_launch = time.time()
        measured = measure(cmd, env, out.with_suffix(".log"), args.timeout)
        row = {"variant": name, **meta, **measured, "cmd": " ".join(cmd)}
        if measured["rc"] == 0 and out.is_file():
            raw = json.loads(out.read_text())
            if name.startswith("flower"):
                raw = {"rounds": flower_rounds(raw), "T": raw["T"]}
            row |= summarise(raw, t_launch)
        rows.append(row)
        print(_line(row), flush=True)
    report = {"rows": rows, "machine": {"cpus": os.cpu_count()}, "scratch": str(scratch)}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    print("\n" + table(rows))


def _line(row: dict) -> str:
    keys = ("wall_s", "to_round1_s", "steady_round_s", "rounds_per_min", "foreign_cores")
    vals = " ".join(f"{k}={row.get(k, float('nan')):.2f}" for k in keys)
    return f"{row['variant']:>18} K={row['clients']:<5} rc={row['rc']} {vals} pss={row['peak']['pss_mb']:.0f}MB"


def table(rows: list[dict]) -> str:
    cols = ["variant", "K", "steady round, s", "rounds/min", "launch to round 1, s", "wall, s", "peak PSS, MB"]
    cols += ["peak RSS sum, MB", "procs", "foreign cores"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    nan = float("nan")
    for r in rows:
        cells = [r["variant"], str(r["clients"]), f"{r.get('steady_round_s', nan):.3f}"]
        cells += [f"{r.get('rounds_per_min', nan):.1f}", f"{r.get('to_round1_s', nan):.1f}", f"{r['wall_s']:.1f}"]
        cells += [f"{r['peak']['pss_mb']:.0f}", f"{r['peak']['rss_mb']:.0f}", str(r["peak"]["procs"])]
        cells += [f"{r['foreign_cores']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000], help="clients per round (K)")
    ap.add_argument("--rounds", type=int, default=3, help="R (the harness's workload C uses 3)")
    ap.add_argument("--fedtune", nargs="*", default=["inprocess", "ray1", "ray2"], help="inprocess, rayN")
    ap.add_argument("--flower", default=None, help="path to a copy of the Flower baseline harness (with venv/)")
    ap.add_argument("--flower-clients", type=int, nargs="*", default=[100, 1000], help="K for Flower (C100, C1000)")
    ap.add_argument("--flower-cpus", type=float, nargs="+", default=[1.0, 2.0], help="Flower client num_cpus")
    ap.add_argument("--timeout", type=float, default=400, help="seconds per variant before it is killed")
    ap.add_argument("--out", default=None, help="write all results as JSON here")
    ap.add_argument("--child", nargs=4, metavar=("BACKEND", "WORKERS", "CLIENTS", "ROUNDS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        backend, workers, clients, rounds = args.child
        run_fedtune(backend, int(workers), int(clients), int(rounds), args.out)
    else:
        parent(args)


if __name__ == "__main__":
    main()
