"""FedBuff (asynchronous, buffered) against synchronous FedAvg: simulated wall-clock time to a target accuracy.

Question: with heterogeneous client speeds (lognormal, sigma 0.5, plus a tail of 10% of clients 10x slower),
how much simulated time does each need to reach a next-character accuracy on the Shakespeare benchmark?
Synchronous FedAvg waits for the slowest of its C sampled clients every round (a round lasts the maximum of
their durations); FedBuff keeps M clients training and steps after every K arrivals, discounting stale
updates by 1/sqrt(1 + staleness) (Nguyen et al. 2022).

Both use the product: CharTask on a ClientWorker, InProcessTransport, ``build_strategy`` + ``run_round`` for
FedAvg and ``build_fedbuff`` + ``async_step`` for FedBuff, and the same client speeds and durations
(``fedtune.server.clock``): a dispatch of S local steps costs S x seconds_per_step x the client's factor. Both
train the same number of client updates per server step (C = K = 10, 5 local steps of batch 10), so the
comparison is at equal server steps and equal client compute per step; what differs is the time a step takes.

Reduced scale so that it runs in a few minutes on two shared CPU cores: 100 (play, role) clients with up to 40
segments each, and the paper's model shrunk to one LSTM layer of 64 units (``--hidden``/``--layers``).

    nice -n 10 .venv/bin/python benchmarks/fedbuff.py            # runs both, writes docs/BENCHMARKS.md's section
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "fedbuff.results.json"
SECTION = "FedBuff vs synchronous FedAvg: simulated time to accuracy with slow clients"
COMMAND = "nice -n 10 .venv/bin/python benchmarks/fedbuff.py"
DATA = {"num_clients": 100, "min_train": 6, "max_train": 40, "max_test": 2, "seed": 0}
SPEED = {"seconds_per_step": 1.0, "sigma": 0.5, "slow_fraction": 0.1, "slow_factor": 10.0}
CLIENT = {"local_steps": 5, "batch_size": 10, "lr": 1.47, "optimizer": "sgd", "max_grad_norm": None}
TARGETS = (0.20, 0.25, 0.30)


def config(mode: str, steps: int, concurrency: int, buffer: int, eval_every: int, seed: int):
    from fedtune.config.schema import Config

    server: dict = {"mode": mode}
    if mode == "async":
        server["fedbuff"] = {"concurrency": concurrency, "buffer_size": buffer}
    return Config.model_validate(
        {
            "seed": seed,  # client speeds, sampling, dispatch and local shuffling
            "federation": {"rounds": steps} | ({"clients_per_round": buffer} if mode == "sync" else {}),
            "client": CLIENT,
            "server": server,
            "eval": {"every": eval_every, "batch_size": 200, "baseline": False},
            "simulation": {"client_speed": SPEED} if mode == "async" else {},
        }
    )


def build(hidden: int, layers: int):
    import torch
    from _charlm import CharLSTM, CharTask, select_clients

    from fedtune.client.build import strategy_extensions
    from fedtune.client.worker import ClientWorker
    from fedtune.core.rng import derive_seed
    from fedtune.data.cache import default_cache_dir
    from fedtune.data.shakespeare import load_shakespeare

    torch.set_num_threads(1)
    records = select_clients(load_shakespeare(default_cache_dir(None)).clients, **DATA)
    torch.manual_seed(derive_seed(0, "bench-init"))  # both runs start from the same weights
    task = CharTask(CharLSTM(hidden=hidden, layers=layers))
    ext = strategy_extensions()
    return ClientWorker(task, records, hook_factories=ext.hook_factories, update_transforms=ext.update_transforms)


def run_sync(args, seed: int) -> list[tuple[int, float, float]]:
    """FedAvg rounds; a round's simulated time is the slowest sampled client's (the barrier)."""
    from fedtune.config.asynchronous import ClientSpeedConfig
    from fedtune.server.build import build_strategy
    from fedtune.server.clock import client_speeds
    from fedtune.server.loop import run_round
    from fedtune.transport.inprocess import InProcessTransport

    worker = build(args.hidden, args.layers)
    cfg = config("sync", args.steps, args.concurrency, args.buffer, args.eval_every, seed)
    speeds = client_speeds(ClientSpeedConfig(**SPEED), list(worker.records), seed=cfg.seed)  # as FedBuff's clock
    strategy = build_strategy(cfg, num_clients=len(worker.records))
    state = strategy.init_state(worker.current_params(), worker.view.spec)
    transport, clock, curve = InProcessTransport(worker), 0.0, []
    while state.round < args.steps:
        state, report = run_round(cfg, strategy, transport, state)
        clock += max(CLIENT["local_steps"] * SPEED["seconds_per_step"] * speeds[c] for c in report.sampled)
        curve += _point(report, clock, "sync")
        if curve and curve[-1][2] >= args.stop:
            break
    return curve


def run_async(args, seed: int) -> list[tuple[int, float, float]]:
    from fedtune.server.async_loop import async_step, build_clock, build_fedbuff
    from fedtune.transport.inprocess import InProcessTransport

    worker = build(args.hidden, args.layers)
    cfg = config("async", args.steps, args.concurrency, args.buffer, args.eval_every, seed)
    server, transport, curve = build_fedbuff(cfg), InProcessTransport(worker), []
    clock = build_clock(cfg, transport.client_ids())
    state = server.init_state(worker.current_params(), worker.view.spec)
    while state.round < args.steps:
        state, report = async_step(cfg, server, clock, transport, state)
        curve += _point(report, report.aggregate["sim_time"], "async")
        if curve and curve[-1][2] >= args.stop:
            break
    return curve


def _point(report, clock: float, label: str) -> list[tuple[int, float, float]]:
    if report.eval_pooled is None or not report.eval_pooled.count:
        return []
    acc = report.eval_pooled.metrics(accuracy=True)["accuracy"]
    print(f"{label} step {report.round} sim {clock:.0f}s acc {acc:.4f}", flush=True)
    return [(report.round, clock, acc)]


def first_reach(curve: list, target: float, column: int) -> float | None:
    """The step (column 0) or simulated time (column 1) of the first evaluation whose accuracy reaches target."""
    return next((p[column] for p in curve if p[2] >= target), None)


def table(runs: dict) -> str:
    """Per target: steps and simulated seconds of each algorithm, per seed (seed: FedAvg / FedBuff)."""
    seeds = sorted(runs, key=int)
    head = "| target accuracy | " + " | ".join(
        f"seed {k}: FedAvg steps (s) | seed {k}: FedBuff steps (s) | seed {k}: speed-up" for k in seeds
    )
    lines = [head + " |", "|" + " --- |" * (1 + 3 * len(seeds))]
    for t in TARGETS:
        cells = []
        for k in seeds:
            got = {m: (first_reach(runs[k][m], t, 0), first_reach(runs[k][m], t, 1)) for m in ("sync", "async")}
            for m in ("sync", "async"):
                step, sim = got[m]
                cells.append(f"{step:.0f} ({sim:.0f} s)" if step is not None else "not reached")
            s_time, a_time = got["sync"][1], got["async"][1]
            cells.append(f"{s_time / a_time:.1f}x" if s_time and a_time else "-")
        lines.append(f"| {t:.0%} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reading(runs: dict) -> str:
    """What the table says, computed from the results (mean simulated seconds per server step, all seeds)."""
    per_step = {
        m: sum(r[m][-1][1] for r in runs.values()) / sum(r[m][-1][0] for r in runs.values()) for m in ("sync", "async")
    }
    return (
        f"A synchronous round lasted {per_step['sync']:.1f} simulated s on average (the slowest of its clients: "
        "with 10 slow clients among 100, two rounds in three sample one of them), a buffered step "
        f"{per_step['async']:.1f} s ({per_step['sync'] / per_step['async']:.0f}x shorter). FedBuff needs more "
        "steps to a target, since stale updates are discounted and trained on older models, but each costs a "
        "fraction of the time. The synchronous baseline drops no stragglers (no deadline, no over-selection)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150, help="server steps at most (rounds / buffered steps)")
    parser.add_argument("--concurrency", type=int, default=30, help="FedBuff's M")
    parser.add_argument("--buffer", type=int, default=10, help="FedBuff's K, and FedAvg's clients per round")
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--stop", type=float, default=max(TARGETS), help="stop a run at this accuracy")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--seeds", default="0,1", help="run seeds (comma-separated); saved seeds are reused")
    parser.add_argument("--report-only", action="store_true", help="rebuild the table from the saved results")
    args = parser.parse_args()
    res = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if not args.report_only:
        settings = {k: v for k, v in vars(args).items() if k not in ("seeds", "report_only")}
        if res.get("args") != settings:
            res = {"args": settings, "runs": {}, "wall_seconds": {}}  # other settings: nothing to reuse
        for seed in (int(k) for k in args.seeds.split(",")):
            if str(seed) in res["runs"]:
                continue
            started = time.perf_counter()
            res["runs"][str(seed)] = {"sync": run_sync(args, seed), "async": run_async(args, seed)}
            res["wall_seconds"][str(seed)] = time.perf_counter() - started
            RESULTS.write_text(json.dumps(res, indent=1))
    runs = res["runs"]
    print(table(runs))
    from _common import write_section

    a = res["args"]
    body = (
        f"`{COMMAND}` (results in `benchmarks/fedbuff.results.json`; the table is rebuilt from it with "
        f"`--report-only`). {DATA['num_clients']} Shakespeare (play, role) clients, an LSTM of {a['hidden']} "
        f"units x {a['layers']} layer(s), 5 local SGD steps of batch 10 (lr 1.47) per client update. Client speed: "
        "lognormal (sigma 0.5) x 10 for a seeded 10% tail; one update costs 5 x the client's factor simulated "
        f"seconds. FedAvg samples {a['buffer']} clients per round and waits for the slowest; FedBuff keeps "
        f"M = {a['concurrency']} clients training and steps every K = {a['buffer']} arrivals with weights "
        "1/sqrt(1 + staleness), server SGD lr 1 for both. Accuracy is pooled held-out next-character accuracy, "
        f"evaluated every {a['eval_every']} steps (so steps and times are those of the first evaluation at or "
        f"above the target). Seeds {', '.join(sorted(runs, key=int))}; each seed's two runs took "
        f"{max(res['wall_seconds'].values()):.0f} s of wall clock at most.\n\n" + table(runs) + "\n\n" + reading(runs)
    )
    write_section(SECTION, body)


if __name__ == "__main__":
    main()
