"""Framework overhead: fedtune's simulation against a plain PyTorch loop doing exactly the same training.

Workload "A" of the Flower baseline harness: a ~1.03M-parameter char transformer, 10 clients all sampled,
5 rounds, 20 local SGD steps of batch 32 (lr 0.05) on synthetic tokens. Both sides train the same examples
in the same minibatch order (fedtune's seeded shuffle), average with example weights, and must end with the
same global model (checked). fedtune runs its real coordinator (`fedtune.run.session.coordinate`: validation,
streaming FedAvg, metrics.jsonl, atomic checkpoint and plot every round). Each variant runs in a fresh
process; variants alternate, and the ratio is taken per repetition.

    .venv/bin/python benchmarks/overhead.py --reps 3          # writes the section in docs/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

T0 = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import run_child, write_section  # noqa: E402
from _workloads import build, client_examples  # noqa: E402

ROUNDS, CLIENTS, STEPS, BATCH, LR, SEED = 5, 10, 20, 32, 0.05, 0


def child_fedtune(workload: str, rounds: int, clients: int, steps: int) -> dict:
    from rich.console import Console

    from fedtune.client.worker import ClientWorker
    from fedtune.config import parse_config
    from fedtune.run.session import coordinate
    from fedtune.transport.inprocess import InProcessTransport

    task = build(workload)
    records = {f"c{i:03d}": (client_examples(workload, i, steps * BATCH), []) for i in range(clients)}
    worker = ClientWorker(task, records)
    with tempfile.TemporaryDirectory() as tmp:
        config = parse_config(
            {
                "seed": SEED,
                "model": {"kind": "module", "factory": "torch.nn:Identity", "lora": None},
                "data": {"source": "digits", "partition": {"kind": "iid", "num_clients": clients}},
                "federation": {"rounds": rounds, "clients_per_round": clients},
                "client": {
                    "local_steps": steps,
                    "batch_size": BATCH,
                    "lr": LR,
                    "optimizer": "sgd",
                    "max_grad_norm": None,
                },
                "eval": {"baseline": False, "every": 10_000},
                "run": {"out_dir": tmp, "name": "bench"},
            }
        )
        started = time.perf_counter()
        result = coordinate(
            config,
            InProcessTransport(worker),
            init=(worker.current_params(), worker.view.spec),
            accuracy=False,
            console=Console(quiet=True),
            show_progress=False,
        )
        rounds_s = time.perf_counter() - started
    return {"rounds_s": rounds_s, "checksum": float(np.abs(result.state.params.astype(np.float64)).sum())}


def child_plain(workload: str, rounds: int, clients: int, steps: int) -> dict:
    from fedtune.core.rng import derive_torch_generator

    task = build(workload)
    model = task.module
    data = {f"c{i:03d}": client_examples(workload, i, steps * BATCH) for i in range(clients)}
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    started = time.perf_counter()
    for rnd in range(1, rounds + 1):
        acc = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in global_state.items()}
        total = 0.0
        for cid, examples in data.items():
            model.load_state_dict(global_state)
            opt = torch.optim.SGD(model.parameters(), lr=LR)
            gen = derive_torch_generator(SEED, "shuffle", rnd, cid)
            done = 0
            model.train()
            while done < steps:
                order = torch.randperm(len(examples), generator=gen).tolist()
                for s in range(0, len(order), BATCH):
                    batch = task.collate([examples[i] for i in order[s : s + BATCH]])
                    loss, _ = task.loss(batch)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    done += 1
                    if done == steps:
                        break
            n = float(len(examples))
            for k, v in model.state_dict().items():
                acc[k] += n * v.double()
            total += n
        global_state = {k: (v / total).float() for k, v in acc.items()}
    rounds_s = time.perf_counter() - started
    flat = np.concatenate([v.reshape(-1).numpy() for v in global_state.values()])
    return {"rounds_s": rounds_s, "checksum": float(np.abs(flat.astype(np.float64)).sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", choices=["fedtune", "plain"])
    ap.add_argument("--workload", default="A", choices=["A", "C"])
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--clients", type=int, default=CLIENTS)
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    args = ap.parse_args()
    shape = [args.workload, str(args.rounds), str(args.clients), str(args.steps)]
    if args.child:
        fn = child_fedtune if args.child == "fedtune" else child_plain
        out = fn(args.workload, args.rounds, args.clients, args.steps)
        out["wall_s"] = time.perf_counter() - T0
        print(json.dumps(out))
        return
    script = str(Path(__file__).resolve())
    rows = []
    for rep in range(args.reps):
        order = ["plain", "fedtune"] if rep % 2 == 0 else ["fedtune", "plain"]
        res = {}
        for variant in order:
            res[variant] = run_child(
                [
                    script,
                    "--child",
                    variant,
                    "--workload",
                    shape[0],
                    "--rounds",
                    shape[1],
                    "--clients",
                    shape[2],
                    "--steps",
                    shape[3],
                ]
            )
        ratio = res["fedtune"]["rounds_s"] / res["plain"]["rounds_s"]
        rows.append((res["plain"], res["fedtune"], ratio))
        print(
            f"rep {rep}: plain {res['plain']['rounds_s']:.2f}s fedtune {res['fedtune']['rounds_s']:.2f}s "
            f"ratio {ratio:.3f}  checksums {res['plain']['checksum']:.4f} / {res['fedtune']['checksum']:.4f}"
        )
        rel = abs(res["plain"]["checksum"] - res["fedtune"]["checksum"]) / res["plain"]["checksum"]
        if rel > 1e-5:
            raise SystemExit(f"fedtune and the plain loop ended with different models (relative {rel:.2e})")
    ratios = [r for _, _, r in rows]
    table = "\n".join(
        f"| {i} | {p['rounds_s']:.2f} | {f['rounds_s']:.2f} | {r:.3f} | {p['wall_s']:.2f} | {f['wall_s']:.2f} |"
        for i, (p, f, r) in enumerate(rows)
    )
    body = f"""
Command: `.venv/bin/python benchmarks/overhead.py --reps {args.reps}` (workload {args.workload}: {args.clients}
clients, {args.rounds} rounds, {args.steps} local SGD steps of batch {BATCH}; the ~1.03M-parameter char
transformer of the Flower harness' workload A). Both sides end with the same global model (checksum checked).
"rounds" is the time of the federated rounds; "process" adds interpreter start-up and imports.

| rep | plain PyTorch rounds, s | fedtune rounds, s | ratio | plain process, s | fedtune process, s |
| --- | --- | --- | --- | --- | --- |
{table}

Median ratio fedtune / plain: **{statistics.median(ratios):.3f}** (goal: at most 1.05). For comparison, the Flower
harness measured Flower 1.41 on the same workload at 1.23x its own plain loop (wall) and 1.05x per steady
round (`../shared/tools/flower-baseline/RESULTS-2026-11-21.md`; a different run, so not a side-by-side ratio).
"""
    print(body)
    if not args.no_write:
        write_section("Framework overhead (simulation vs plain PyTorch)", body)


if __name__ == "__main__":
    main()
