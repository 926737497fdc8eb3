"""FedBuff against synchronous FedAvg on the SmolLM2 demo: simulated wall-clock time to a held-out loss.

The demo's set-up (examples/shakespeare_smollm2_fedbuff.yaml: SmolLM2-135M-Instruct, LoRA r 8 on the top 8
layers' attention, one client per (play, role) of six plays, 6 local AdamW steps of batch 4) with heterogeneous
client speeds: lognormal (sigma 0.5) x 10 for a seeded 10% tail; one update costs 6 x the client's factor
simulated seconds. FedAvg samples K clients per round and waits for the slowest; FedBuff keeps M clients
training and steps every K arrivals with weights 1/sqrt(1 + staleness); server SGD lr 1 for both. Both use the
product (``prepare``, ``run_round`` / ``async_step``, the same worker and the same clock rules as
benchmarks/fedbuff.py). Held-out loss: pooled over ``--eval-clients`` clients' first 4 test examples,
every ``--eval-every`` steps.

CPU heavy (a 135M-parameter model on two shared cores): the default is a small scale.

    .venv/bin/python benchmarks/fedbuff_smollm2.py --steps 8 --eval-clients 6   # docs/BENCHMARKS.md's section
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "fedbuff_smollm2.results.json"
EXAMPLE = ROOT / "examples" / "shakespeare_smollm2_fedbuff.yaml"
SECTION = "FedBuff vs synchronous FedAvg on the SmolLM2 demo: simulated time to a held-out loss"
COMMAND = ".venv/bin/python benchmarks/fedbuff_smollm2.py"


def config(args, mode: str):
    from fedtune.config.load import load_config

    overrides = [
        f"federation.rounds={args.steps}",
        f"eval.every={args.eval_every}",
        f"eval.max_clients={args.eval_clients}",
        "eval.baseline=false",
        f"run.threads={args.threads}",
        f"seed={args.seed}",
    ]
    cfg = load_config(EXAMPLE, overrides)
    fed = {"rounds": args.steps}
    if mode == "sync":  # the same model, data and clients; rounds of K clients with a barrier
        fed["clients_per_round"] = args.buffer
        server = cfg.server.model_copy(update={"mode": "sync", "fedbuff": None})
        sim = cfg.simulation.model_copy(update={"client_speed": None})
    else:
        fb = cfg.server.fedbuff.model_copy(update={"concurrency": args.concurrency, "buffer_size": args.buffer})
        server, sim = cfg.server.model_copy(update={"fedbuff": fb}), cfg.simulation
    return cfg.model_validate(
        {
            **cfg.model_dump(),
            "federation": {**cfg.federation.model_dump(), **fed},
            "server": server.model_dump(),
            "simulation": sim.model_dump(),
        }
    )


def _point(report, clock: float, label: str) -> list[tuple[int, float, float]]:
    if report.eval_pooled is None or not report.eval_pooled.count:
        return []
    loss = report.eval_pooled.metrics(accuracy=False)["loss"]
    print(f"{label} step {report.round} sim {clock:.0f}s loss {loss:.4f}", flush=True)
    return [(report.round, clock, loss)]


def run_both(args, save) -> dict:
    """Both algorithms on one resident worker, interleaved step by step (a step each in turn)."""
    from fedtune.config.asynchronous import ClientSpeedConfig
    from fedtune.run.session import prepare
    from fedtune.server.async_loop import async_step, build_clock, build_fedbuff
    from fedtune.server.build import build_strategy
    from fedtune.server.clock import client_speeds
    from fedtune.server.loop import eval_clients, evaluate_global, run_round
    from fedtune.transport.inprocess import InProcessTransport

    sync_cfg, async_cfg = config(args, "sync"), config(args, "async")
    prepared = prepare(async_cfg)
    transport = InProcessTransport(prepared.worker)
    population = transport.client_ids()
    params, spec = prepared.worker.current_params(), prepared.worker.view.spec
    speed = async_cfg.simulation.client_speed or ClientSpeedConfig()
    speeds = client_speeds(speed, population, seed=async_cfg.seed)  # as FedBuff's clock draws them
    local = async_cfg.client.local_steps

    strategy, server = build_strategy(sync_cfg, num_clients=len(population)), build_fedbuff(async_cfg)
    s_state, a_state = strategy.init_state(params, spec), server.init_state(params, spec)
    _, pooled, _ = evaluate_global(async_cfg, server, transport, a_state, eval_clients(async_cfg, population))
    start = pooled.metrics(accuracy=False)["loss"]
    print(f"start loss {start:.4f} over {len(population)} clients", flush=True)
    clock = build_clock(async_cfg, population)
    curves: dict[str, list] = {"sync": [(0, 0.0, start)], "async": [(0, 0.0, start)]}
    sync_time = 0.0
    for _ in range(args.steps):
        s_state, report = run_round(sync_cfg, strategy, transport, s_state)
        sync_time += max(local * speed.seconds_per_step * speeds[c] for c in report.sampled)
        curves["sync"] += _point(report, sync_time, "sync")
        a_state, report = async_step(async_cfg, server, clock, transport, a_state)
        curves["async"] += _point(report, report.aggregate["sim_time"], "async")
        save({"population": len(population), "curves": curves, "steps_done": report.round})
    return {"population": len(population), "curves": curves, "steps_done": args.steps}


def first_reach(curve: list, target: float, column: int) -> float | None:
    return next((p[column] for p in curve if p[2] <= target), None)


def table(res: dict) -> str:
    curves = res["curves"]
    start = curves["sync"][0][2]
    best = max(min(p[2] for p in curves[m]) for m in curves)  # the lower loss both reached
    targets = [start - f * (start - best) for f in (0.5, 0.75, 1.0)]
    lines = [
        "| held-out loss target | FedAvg steps (sim s) | FedBuff steps (sim s) | speed-up |",
        "| --- | --- | --- | --- |",
    ]
    for t in targets:
        got = {m: (first_reach(curves[m], t, 0), first_reach(curves[m], t, 1)) for m in ("sync", "async")}
        cells = [f"{s:.0f} ({sim:.0f} s)" if s is not None else "not reached" for s, sim in got.values()]
        ratio = got["sync"][1] / got["async"][1] if got["sync"][1] and got["async"][1] else None
        lines.append(f"| {t:.3f} | " + " | ".join(cells) + f" | {f'{ratio:.1f}x' if ratio else '-'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="server steps of each (rounds / buffered steps)")
    parser.add_argument("--concurrency", type=int, default=8, help="FedBuff's M")
    parser.add_argument("--buffer", type=int, default=4, help="FedBuff's K, and FedAvg's clients per round")
    parser.add_argument("--eval-every", type=int, default=2)
    parser.add_argument("--eval-clients", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report-only", action="store_true", help="rebuild the table from the saved results")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.report_only:
        res = json.loads(RESULTS.read_text())
    else:
        started, load = time.perf_counter(), os.getloadavg()[0]
        settings = {k: v for k, v in vars(args).items() if k != "report_only"}

        def save(partial: dict) -> dict:  # after every step pair: an interrupted run keeps what it measured
            res = {"args": settings, **partial, "wall_seconds": time.perf_counter() - started}
            res.update(load=[load, os.getloadavg()[0]], date=time.strftime("%Y-%m-%d", time.gmtime()))
            RESULTS.write_text(json.dumps(res, indent=1))
            return res

        res = save(run_both(args, save))
    print(table(res))
    from _common import write_section

    a = res["args"]
    flags = ("steps", "concurrency", "buffer", "eval_every", "eval_clients", "threads", "seed")
    command = " ".join([COMMAND, *(f"--{k.replace('_', '-')} {a[k]}" for k in flags)])
    body = (
        f"`{command}` (results in `benchmarks/fedbuff_smollm2.results.json`; `--report-only` rebuilds the table), "
        f"{res['date']}, load average {res['load'][0]:.0f} at the start and {res['load'][1]:.0f} at the end, "
        f"{res['wall_seconds'] / 60:.0f} min of wall clock. examples/shakespeare_smollm2_fedbuff.yaml "
        f"(SmolLM2-135M-Instruct, LoRA r 8, {res['population']} (play, role) clients, 6 local AdamW steps of batch 4), "
        f"{res['steps_done']} server steps each (of {a['steps']} asked), seed {a['seed']}. "
        "Client speed: lognormal (sigma 0.5) x 10 for a seeded "
        f"10% tail; one update costs 6 x the client's factor simulated seconds. FedAvg samples {a['buffer']} clients "
        f"per round and waits for the slowest; FedBuff keeps M = {a['concurrency']} training and steps every "
        f"K = {a['buffer']} arrivals (1/sqrt(1 + staleness)). Held-out loss pooled over {a['eval_clients']} clients' "
        f"first 4 test examples every {a['eval_every']} steps; the targets are the starting loss minus 50/75/100% "
        "of the drop both reached. Small scale (few steps, one seed): a measurement of this set-up, not a "
        "general claim.\n\n" + table(res)
    )
    write_section(SECTION, body)


if __name__ == "__main__":
    main()
