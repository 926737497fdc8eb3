"""What a round costs beyond training: fedtune against the plain PyTorch loop of the Flower baseline harness,
side by side in one run (variants interleaved, each in a fresh process).

Workloads are the harness' (../shared/tools/flower-baseline, README section 2), run through its own
``bench/plain.py`` for the plain side and through ``fedtune.simulate`` (the Python API a user calls: config
validation, run directory, metrics.jsonl, an atomic checkpoint every round, report.html) for fedtune:

  D      start-up: 2 clients, 1 round, 1 step of the 9.6k-parameter micro MLP: process wall time and peak RSS
  C100   100 clients, all sampled, 3 rounds, 1 local SGD step of batch 32: the steady round (round 2)
  C1000  the same with 1,000 clients

The steady round of fedtune is the wall time from the start of round 2 to the start of round 3 (training,
aggregation and everything the run writes after the round); plain's is the median of its rounds 2 and 3.
Both sides train the same model shape on synthetic data of the same shapes (not the same values: the
ratio is about time, not the model).

    nice -n 10 .venv/bin/python benchmarks/round_overhead.py --reps 3   # needs ../shared; writes docs/BENCHMARKS.md

On a machine far busier than its cores, run both sides with one torch thread (``OMP_NUM_THREADS=1``, inherited
by every child): two spinning threads per process then measure the contention, not the round.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# ../shared beside the checkout (or beside the folder of worktrees)
BASELINE = next(
    (d / "shared" / "tools" / "flower-baseline" for d in (ROOT.parent, ROOT.parent.parent) if (d / "shared").is_dir()),
    ROOT.parent / "shared" / "tools" / "flower-baseline",
)
WORKLOADS = {"D": (2, 1), "C100": (100, 3), "C1000": (1000, 3)}  # clients, rounds
BATCH, LR = 32, 0.05


def child_fedtune(clients: int, rounds: int, out: str) -> None:
    """One fedtune run of the workload; prints its round start times (perf_counter, since launch)."""
    import torch
    from torch.utils.data import TensorDataset

    import fedtune
    import fedtune.server.loop as loop

    starts: list[float] = []
    cpu: list[float] = []  # process CPU time (all threads) at the same instants
    run_round = loop.run_round

    def timed(*args, **kwargs):
        starts.append(time.perf_counter())
        cpu.append(time.process_time())
        return run_round(*args, **kwargs)

    loop.run_round = timed  # the loop calls it by module name: round boundaries, nothing else changes
    g = torch.Generator().manual_seed(17)
    data = {
        f"c{i:04d}": TensorDataset(torch.randn(BATCH, 64, generator=g), torch.randint(0, 10, (BATCH,), generator=g))
        for i in range(clients)
    }
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    config = {
        "seed": 0,
        "federation": {"rounds": rounds, "clients_per_round": clients},
        "client": {"local_steps": 1, "batch_size": BATCH, "lr": LR, "optimizer": "sgd", "max_grad_norm": None},
        "eval": {"baseline": False, "every": 10_000},
        "run": {"out_dir": out, "name": "bench", "plot": False},
    }
    fedtune.simulate(config, model=model, datasets=data, quiet=True)
    print(json.dumps({"starts": starts, "cpu": cpu, "end": time.perf_counter()}))


def _wrapped(cmd: list[str]) -> list[str]:
    """``cmd`` run by a tiny Python wrapper that prints the child's own peak RSS and CPU time (user + system, from
    os.wait4) on stderr last."""
    code = (
        "import os,subprocess,sys;p=subprocess.Popen(sys.argv[1:]);_,s,u=os.wait4(p.pid,0);"
        "sys.stderr.write(f'\\nPEAK_RSS_KB {u.ru_maxrss} CPU_S {u.ru_utime+u.ru_stime}\\n');"
        "sys.exit(os.waitstatus_to_exitcode(s))"
    )
    return [sys.executable, "-c", code, *cmd]


def run_variant(cmd: list[str]) -> dict:
    started = time.perf_counter()
    proc = subprocess.run(_wrapped(cmd), capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed:\n{proc.stderr[-3000:]}")
    rss = [line for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS_KB ")][-1].split()
    return {"wall_s": wall, "peak_rss_mb": int(rss[1]) / 1024, "cpu_s": float(rss[3]), "stdout": proc.stdout}


# Runs bench/plain.py unchanged, in-process through runpy, with its clock (time.time) wrapped so that every
# reading also notes the process CPU time at that instant: a round's CPU time is then read off the same
# t_start / t_end it records. On a machine busier than its cores, CPU time is what the round costs; wall
# time also counts the waiting for a core.
PLAIN_CLOCK = """
import json, runpy, sys, time
wall, notes = time.time, {}
def clock():
    t = wall()
    notes[repr(t)] = time.process_time()
    return t
time.time = clock
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
print(json.dumps(notes))
"""


def plain(workload: str, scratch: Path, python: str) -> dict:
    clients, rounds = WORKLOADS[workload]
    out = scratch / f"plain-{workload}.json"
    cmd = [python, "-c", PLAIN_CLOCK, str(scratch / "bench" / "plain.py"), "--model", "micro"]
    cmd += ["--clients", str(clients), "--rounds", str(rounds), "--steps", "1", "--bs", str(BATCH), "--out", str(out)]
    res = run_variant(cmd)
    data, notes = json.loads(out.read_text()), json.loads(res["stdout"].strip().splitlines()[-1])
    rounds_s = [r["t_end"] - r["t_start"] for r in data["rounds"]]
    cpu_s = [notes[repr(r["t_end"])] - notes[repr(r["t_start"])] for r in data["rounds"]]
    res["steady_s"] = statistics.median(rounds_s[1:]) if len(rounds_s) > 1 else float("nan")
    res["steady_cpu_s"] = statistics.median(cpu_s[1:]) if len(cpu_s) > 1 else float("nan")
    return res


def fedtune_run(workload: str, scratch: Path) -> dict:
    clients, rounds = WORKLOADS[workload]
    out = tempfile.mkdtemp(dir=scratch)
    try:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(clients), str(rounds), out]
        res = run_variant(cmd)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    times = json.loads(res["stdout"].strip().splitlines()[-1])
    starts = times["starts"]
    res["steady_s"] = starts[2] - starts[1] if len(starts) > 2 else float("nan")
    res["steady_cpu_s"] = times["cpu"][2] - times["cpu"][1] if len(starts) > 2 else float("nan")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=3, metavar=("CLIENTS", "ROUNDS", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workloads", default="D,C100,C1000")
    ap.add_argument("--baseline", default=str(BASELINE), help="the flower-baseline folder (copied to a scratch dir)")
    ap.add_argument("--plain-python", default=sys.executable, help="python for bench/plain.py (needs only torch)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    args = ap.parse_args()
    if args.child:
        child_fedtune(int(args.child[0]), int(args.child[1]), args.child[2])
        return
    if not (Path(args.baseline) / "bench" / "plain.py").is_file():
        raise SystemExit(f"no bench/plain.py under {args.baseline}: pass --baseline (the flower-baseline folder)")
    scratch = Path(tempfile.mkdtemp(prefix="fedtune-round-overhead-"))
    shutil.copytree(Path(args.baseline) / "bench", scratch / "bench")  # run, never import, the harness' code
    workloads = args.workloads.split(",")
    rows: dict[str, list[tuple[dict, dict]]] = {w: [] for w in workloads}
    load = [os.getloadavg()[0]]
    try:
        for rep in range(args.reps):
            for w in workloads:  # interleaved: plain and fedtune alternate which goes first
                order = ["plain", "fedtune"] if rep % 2 == 0 else ["fedtune", "plain"]
                res = {
                    v: plain(w, scratch, args.plain_python) if v == "plain" else fedtune_run(w, scratch) for v in order
                }
                rows[w].append((res["plain"], res["fedtune"]))
                load.append(os.getloadavg()[0])
                p, f = res["plain"], res["fedtune"]
                print(
                    f"rep {rep} {w}: " + " | ".join(_line(n, r) for n, r in (("plain", p), ("fedtune", f))), flush=True
                )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    body = report(rows, args.reps, load)
    print(body)
    if not args.no_write:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _common import write_section

        write_section("Round overhead and start-up (against the Flower harness' plain loop)", body)


def _line(name: str, r: dict) -> str:
    rss, steady, steady_cpu = r["peak_rss_mb"], r["steady_s"], r["steady_cpu_s"]
    return (
        f"{name} wall {r['wall_s']:.2f}s cpu {r['cpu_s']:.2f}s rss {rss:.0f}MB "
        f"steady {steady:.3f}s (cpu {steady_cpu:.3f}s)"
    )


def _ratio(rows: list[tuple[dict, dict]], key: str) -> tuple[float, float, float]:
    ratios = sorted(f[key] / p[key] for p, f in rows)
    return ratios[0], statistics.median(ratios), ratios[-1]


def report(rows: dict[str, list[tuple[dict, dict]]], reps: int, load: list[float]) -> str:
    order, plural = ",".join(rows), "s" if reps != 1 else ""
    lines = [
        "| workload | measure | plain (median) | fedtune (median) | ratio min / median / max | goal |",
        "| --- | --- | --- | --- | --- | --- |",
    ]

    def add(w: str, label: str, key: str, unit: str, goal: str) -> None:
        if w not in rows or not rows[w]:
            return
        p = statistics.median(r[0][key] for r in rows[w])
        f = statistics.median(r[1][key] for r in rows[w])
        lo, med, hi = _ratio(rows[w], key)
        lines.append(
            f"| {w} | {label} | {p:.3f} {unit} | {f:.3f} {unit} | {lo:.2f} / **{med:.2f}** / {hi:.2f} | {goal} |"
        )

    add("D", "process wall time (launch to exit)", "wall_s", "s", "<= 1.3")
    add("D", "process CPU time (user + system)", "cpu_s", "s", "")
    add("D", "peak RSS", "peak_rss_mb", "MB", "")
    add("C100", "steady round (wall)", "steady_s", "s", "<= 1.1")
    add("C100", "steady round (process CPU)", "steady_cpu_s", "s", "")
    add("C1000", "steady round (wall)", "steady_s", "s", "<= 1.1")
    add("C1000", "steady round (process CPU)", "steady_cpu_s", "s", "")
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    return f"""
Command: `{threads}nice -n 10 .venv/bin/python benchmarks/round_overhead.py --reps {reps} --workloads {order}` (needs
`../shared/tools/flower-baseline`; its `bench/` is copied to a scratch directory and its `plain.py` run as is).
Plain: the harness' one-process PyTorch FedAvg loop (model rebuilt per client, weighted state-dict average).
fedtune: `fedtune.simulate` with the same micro MLP (9.6k parameters), 1 local SGD step of batch 32, every
client sampled, `run.plot: false`. {reps} repetition{plural}, variants interleaved; ratios taken per repetition.
Steady round: plain's median of rounds 2..R; fedtune's from the start of round 2 to the start of round 3, so it
includes what the run writes after the round (metrics.jsonl, status.json, the checkpoint). Wall time and
process CPU time (user + system, all threads; plain's read at the same instants as its own `time.time()`
round marks, through a wrapped clock, its code run unchanged by `runpy`). Workloads in the order given.
Load average (1 min) during the runs: {min(load):.1f} to {max(load):.1f} on a shared 2-core machine.

{chr(10).join(lines)}
"""


if __name__ == "__main__":
    main()
