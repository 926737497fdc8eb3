"""Heterogeneous LoRA ranks: FLoRA stacking and FlexLoRA (exact) against HetLoRA zero-padding.

A tiny, fast workload so that several seeds fit in a few minutes of a shared CPU: a frozen random MLP
(x 32 -> q_proj 64 -> tanh -> v_proj 8 classes) whose labels come from a "teacher" that differs from it by a
rank-6 change of both layers; LoRA (r = 8, alpha = 16, q_proj and v_proj) must learn that change. 12 clients
with label-skewed data (Dirichlet 0.5 over the teacher's labels), 6 per round, 15 rounds of 10 local AdamW
steps. Ranks: half the clients draw r_k = 2, half r_k = 8 (``{tiers: [{r: 2, fraction: 0.5}, {r: 8,
fraction: 0.5}]}``). Reported: the global model's pooled held-out loss and accuracy after the last round
(server-side evaluation on every client's held-out data), per seed, and their mean. The real strategies,
client worker (rank hook, alpha/r_k scaling) and round loop run; only the model and data are synthetic.

    nice -n 10 .venv/bin/python benchmarks/lora_ranks.py --seeds 0 1 2     # writes the docs/BENCHMARKS.md section

``--workload smollm2`` runs the same four modes on SmolLM2-135M-Instruct and the Shakespeare role split through
the whole simulation (``fedtune.run.session.simulate``): 8 roles of three plays, every role every round, LoRA
r = 8 (alpha 16, q_proj/v_proj of the top 2 blocks), ranks drawn from the same two tiers (r = 2 or 8), 2 rounds
of 3 local AdamW steps of 4 x 32 tokens, at most 8 held-out blocks per role. Reported: the global model's pooled
held-out loss and perplexity after the last round. ``--out`` appends each run as a JSON line and
``--table-from`` renders saved runs (one process per seed on a shared machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import peft
import torch
from _common import write_section
from torch import nn

from fedtune.client.build import strategy_extensions
from fedtune.client.worker import ClientWorker
from fedtune.config.schema import Config
from fedtune.server.build import build_strategy
from fedtune.server.loop import run_round
from fedtune.server.strategies import SvdLora
from fedtune.server.strategies.lora_ranks import PRUNED_PREFIX
from fedtune.tasks.base import EvalSums
from fedtune.transport.inprocess import InProcessTransport

D_IN, D_HID, CLASSES, CLIENTS, TRUE_RANK = 32, 64, 8, 12, 6
TIERS = {"tiers": [{"r": 2, "fraction": 0.5}, {"r": 8, "fraction": 0.5}]}
MODES = {  # name -> server section
    "hetlora (zero-padding)": {"lora_aggregation": "hetlora", "lora_client_ranks": TIERS},
    "flexlora (exact, SVD per client)": {"lora_aggregation": "flexlora", "lora_client_ranks": TIERS},
    "flora (exact, stacking)": {"lora_aggregation": "flora", "lora_client_ranks": TIERS},
    "reference: naive, every client r=8": {"lora_aggregation": "naive"},
}
# HetLoRA's own mechanisms (server.hetlora), beside plain zero-padding; gamma and lambda chosen before any run
# (gamma 0.5: a rank-8 client can go 8 -> 4 -> 2 -> 1; lambda 0.01: small beside a cross-entropy near 1)
HETLORA_MODES = {
    "hetlora+prune (self-pruning, gamma 0.5, lambda 0.01)": {
        "lora_aggregation": "hetlora",
        "lora_client_ranks": TIERS,
        "hetlora": {"prune_gamma": 0.5, "prune_lambda": 0.01},
    },
    "hetlora+prune0 (self-pruning, gamma 0.5, no regulariser: the rule alone)": {
        "lora_aggregation": "hetlora",
        "lora_client_ranks": TIERS,
        "hetlora": {"prune_gamma": 0.5},
    },
    "hetlora+sparsity (sparsity-weighted aggregation)": {
        "lora_aggregation": "hetlora",
        "lora_client_ranks": TIERS,
        "hetlora": {"aggregation": "sparsity"},
    },
    "hetlora+both (self-pruning and sparsity weighting)": {
        "lora_aggregation": "hetlora",
        "lora_client_ranks": TIERS,
        "hetlora": {"prune_gamma": 0.5, "prune_lambda": 0.01, "aggregation": "sparsity"},
    },
}
# --study svd: every client at r = 8; fedex and svd hold the same global model after every round (both exact)
# and differ only in how it is split between the adapter (what clients train next) and the residual
SVD_MODES = {
    "naive": {"lora_aggregation": "naive"},
    "fedex": {"lora_aggregation": "fedex"},
    "svd, balanced B = U sqrt(S), A = sqrt(S) V^T (before)": {"lora_aggregation": "svd", "balanced": True},
    "svd, A = c V^T keeps A's scale (now)": {"lora_aggregation": "svd"},
}


# --study cap: the exact modes with server.lora_residual_rank q (error feedback) against exact and naive
CAP_MODES = {
    "naive": {"lora_aggregation": "naive"},
    "fedex (exact)": {"lora_aggregation": "fedex"},
    "fedex, q = 2r = 16": {"lora_aggregation": "fedex", "lora_residual_rank": 16},
    "fedex, q = r = 8": {"lora_aggregation": "fedex", "lora_residual_rank": 8},
    "fedex, q = r/2 = 4": {"lora_aggregation": "fedex", "lora_residual_rank": 4},
    "svd (exact)": {"lora_aggregation": "svd"},
    "svd, q = r = 8": {"lora_aggregation": "svd", "lora_residual_rank": 8},
    "flora (exact, every client r = 8)": {"lora_aggregation": "flora"},
    "flora, q = r = 8": {"lora_aggregation": "flora", "lora_residual_rank": 8},
}
CAP_NOTE = (
    "server.lora_residual_rank q: each round the residual advances by the best rank-q part of its exact "
    "increment plus what earlier rounds held back; the rest is held back (error feedback). \"held back\" is "
    "||E|| / ||increment + E|| after the last round (the lora_residual_held_back metric), \"kB down a fit\" the "
    "mean bytes a fitting client received (in this tiny model v_proj's (8, 64) residual is cheaper dense than "
    "in rank-8 factors, so only q_proj's increments travel factored)"
)

SVD_NOTE = (
    "fedex and svd give the same global model after every round; they differ only in the factors clients "
    "start the next round from"
)


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(D_IN, D_HID)
        self.v_proj = nn.Linear(D_HID, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.v_proj(torch.tanh(self.q_proj(x)))


class Task:
    kind = "module"
    reports_accuracy = True
    compute_dtype = "float32"

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def encode(self, records, *, train: bool):
        return [{"x": torch.as_tensor(x), "y": torch.tensor(int(y))} for x, y in records]

    def collate(self, examples):
        return {"x": torch.stack([e["x"] for e in examples]), "y": torch.stack([e["y"] for e in examples])}

    def loss(self, batch):
        return nn.functional.cross_entropy(self.module(batch["x"]), batch["y"]), len(batch["y"])

    def eval_batch(self, batch) -> EvalSums:
        out = self.module(batch["x"])
        loss = nn.functional.cross_entropy(out, batch["y"], reduction="sum")
        return EvalSums(float(loss), len(out), int((out.argmax(-1) == batch["y"]).sum()), len(out))


def data(seed: int):
    """Teacher = base + rank-6 change; client datasets skewed over the teacher's labels (Dirichlet 0.5)."""
    torch.manual_seed(1000 + seed)
    base = Mlp()
    teacher = Mlp()
    teacher.load_state_dict(base.state_dict())
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for lyr in (teacher.q_proj, teacher.v_proj):
            out_f, in_f = lyr.weight.shape
            u, v = rng.normal(size=(out_f, TRUE_RANK)), rng.normal(size=(TRUE_RANK, in_f))
            lyr.weight.add_(torch.from_numpy(0.6 * u @ v / np.sqrt(in_f)).float())
    xs = rng.normal(size=(6000, D_IN)).astype(np.float32)
    with torch.no_grad():
        ys = teacher(torch.from_numpy(xs)).argmax(-1).numpy()
    shares = rng.dirichlet([0.5] * CLIENTS, size=CLASSES)  # (class, client)
    owner = np.array([rng.choice(CLIENTS, p=shares[y]) for y in ys])
    records = {}
    for k in range(CLIENTS):
        rows = [(xs[i], ys[i]) for i in np.flatnonzero(owner == k)][:300]
        cut = int(0.8 * len(rows))
        records[f"client_{k}"] = (rows[:cut], rows[cut:])
    return base, records


def run(mode: dict, seed: int) -> dict:
    mode = dict(mode)
    balanced = mode.pop("balanced", False)
    base, records = data(seed)
    torch.manual_seed(seed)
    model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    config = Config.model_validate(
        {
            "seed": seed,
            "model": {"lora": {"r": 8, "alpha": 16}},
            "federation": {"rounds": 15, "clients_per_round": 6},
            "client": {"local_steps": 10, "batch_size": 16, "lr": 0.02, "optimizer": "adamw"},
            "server": mode,
            "eval": {"every": 15, "baseline": False, "batch_size": 256},
        }
    )
    ext = strategy_extensions()
    worker = ClientWorker(
        Task(model), records, hook_factories=ext.hook_factories, update_transforms=ext.update_transforms
    )
    strategy = build_strategy(config)
    if balanced:  # the svd mode as it was: balanced factors
        strategy = dataclasses.replace(strategy, plugins=[SvdLora(keep_a_scale=False)])
    state = strategy.init_state(worker.current_params(), worker.view.spec)
    transport = InProcessTransport(worker)
    started, bytes_down, fits = time.perf_counter(), 0, 0
    for _ in range(config.federation.rounds):
        state, report = run_round(config, strategy, transport, state)
        bytes_down += report.bytes_down
        fits += len(report.clients)
    pooled = report.eval_pooled
    kept = [int(v[0]) for k, v in state.arrays.items() if k.startswith(PRUNED_PREFIX)]
    return {
        "loss": pooled.loss_sum / pooled.count,
        "acc": pooled.correct / pooled.examples,
        "kb_down": bytes_down / config.federation.rounds / 1e3,
        "kb_fit": bytes_down / fits / 1e3,
        "held_back": report.aggregate.get("lora_residual_held_back"),
        "seconds": time.perf_counter() - started,
        "ranks": kept,  # self-pruning: each client's rank after the last round (as the server recorded it)
    }


def smollm2_config(mode: dict, seed: int, out: Path, rounds: int = 2, *, baseline: bool = False) -> dict:
    return {
        "seed": seed,
        "model": {
            "kind": "causal_lm",
            "name": "smollm2-135m-instruct",
            "max_length": 32,
            "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"], "top_layers": 2},
        },
        "data": {
            "source": "shakespeare",
            "plays": ["hamlet", "macbeth", "othello"],
            "max_clients": 8,
            "min_train_examples": 8,
            "max_examples_per_client": 48,
        },
        "federation": {"rounds": rounds, "clients_per_round": 8},
        "client": {"local_steps": 3, "batch_size": 4, "lr": 5e-3},
        "server": mode,
        # 2 rounds: evaluate after the last only (the published table); longer runs evaluate every round so the
        # record carries the curve (is a mode behind from the start, or does it fall behind?)
        "eval": {"baseline": baseline, "every": rounds if rounds == 2 else 1, "max_examples_per_client": 8},
        "run": {"out_dir": str(out), "plot": False, "threads": 1},
    }


def run_smollm2(name: str, mode: dict, seed: int, rounds: int = 2) -> dict:
    from rich.console import Console

    from fedtune.config.load import parse_config
    from fedtune.run.session import simulate

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = parse_config(smollm2_config(mode, seed, Path(tmp), rounds))
        result = simulate(cfg, console=Console(file=io.StringIO()), show_progress=False)
        lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in lines if r["kind"] == "round"]
    last = records[-1]
    rec = {
        "mode": name,
        "seed": seed,
        "loss": last["eval_loss"],
        "acc": math.exp(last["eval_loss"]),  # perplexity, in the column the MLP workload gives accuracy
        "kb_down": statistics.mean(r["bytes_down"] for r in records) / 1e3,
        "seconds": time.perf_counter() - started,
    }
    if rounds != 2:  # the 2-round records keep their old shape (the table above reads them)
        rec["rounds"] = rounds
        rec["curve"] = [r["eval_loss"] for r in records if r.get("eval_loss") is not None]
        ranks = [r["agg_hetlora_mean_rank"] for r in records if "agg_hetlora_mean_rank" in r]
        if ranks:  # self-pruning: the mean rank the round's replies keep, round by round
            rec["mean_rank_curve"] = ranks
    return rec


def smollm2_baseline(seed: int) -> float:
    """The held-out loss of SmolLM2 itself (no adapter change) on the workload's held-out blocks."""
    from rich.console import Console

    from fedtune.config.load import parse_config
    from fedtune.run.session import simulate

    with tempfile.TemporaryDirectory() as tmp:  # one round of the reference: its baseline line is round 0
        reference = MODES["reference: naive, every client r=8"]
        cfg = parse_config(smollm2_config(reference, seed, Path(tmp), 1, baseline=True))
        result = simulate(cfg, console=Console(file=io.StringIO()), show_progress=False)
        lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r["eval_loss"] for r in lines if r["kind"] == "round" and r["round"] == 0)


def smollm2_main(args: argparse.Namespace) -> None:
    if args.baseline:
        for seed in args.seeds:
            print(json.dumps({"seed": seed, "baseline_loss": smollm2_baseline(seed)}), flush=True)
        return
    if args.table_from:
        recs = [json.loads(x) for p in args.table_from for x in p.read_text().splitlines()]
        recs = [r for r in recs if r.get("rounds", 2) == args.rounds]
    else:
        recs = []
        for seed in args.seeds:
            for name, mode in (MODES | HETLORA_MODES if args.modes else MODES).items():
                if args.modes and name.split(" ")[0].rstrip(":") not in args.modes:
                    continue
                rec = run_smollm2(name, mode, seed, args.rounds)
                print(json.dumps(rec), flush=True)
                recs.append(rec)
                if args.out is not None:
                    with args.out.open("a") as fh:
                        fh.write(json.dumps(rec) + "\n")
    seeds = sorted({r["seed"] for r in recs})
    results = {
        name: sorted((r for r in recs if r["mode"] == name), key=lambda r: r["seed"]) for name in MODES | HETLORA_MODES
    }
    head = "| mode | " + " | ".join(f"seed {s} loss / ppl" for s in seeds)
    rows = [head + " | mean loss | mean ppl | kB down a round | s / run |", "| --- " * (len(seeds) + 5) + "|"]
    for name, res in results.items():
        if not res:
            continue
        by_seed = {r["seed"]: r for r in res}
        cells = " | ".join(
            f"{by_seed[s]['loss']:.4f} / {by_seed[s]['acc']:.1f}" if s in by_seed else "-" for s in seeds
        )
        mean_loss = statistics.mean(r["loss"] for r in res)
        rows.append(
            f"| {name} | {cells} | {mean_loss:.4f} | {statistics.mean(r['acc'] for r in res):.1f} | "
            f"{statistics.mean(r['kb_down'] for r in res):.1f} | {statistics.mean(r['seconds'] for r in res):.0f} |"
        )
    table = "\n".join(rows)
    if args.rounds != 2:
        table += "\n\n" + curve_table(results, args.rounds)
    print(table)
    if args.write and args.rounds != 2:
        command = (
            "PYTHONPATH=src HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python benchmarks/lora_ranks.py --workload smollm2 "
            f"--rounds {args.rounds} --seeds {' '.join(map(str, seeds))} --modes MODE --out FILE` (one process per "
            f"mode), rendered with `--rounds {args.rounds} --table-from "
            f"benchmarks/lora_ranks_smollm2_r{args.rounds}.results.jsonl --write"
        )
        write_section(
            f"Heterogeneous LoRA ranks on the SmolLM2 role split: {args.rounds} rounds",
            f"Command: `{command}`. The workload of the section above with {args.rounds} rounds instead of 2, "
            f"the global model evaluated after every round.\n\n{table}\n",
        )
    elif args.write:
        command = (
            "PYTHONPATH=src HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/lora_ranks.py --workload smollm2 "
            f"--seeds {' '.join(map(str, seeds))} --write` (run here one process per seed and mode group with "
            "`--out`; the records are in `benchmarks/lora_ranks_smollm2.results.jsonl`, rendered with `--table-from "
            "benchmarks/lora_ranks_smollm2.results.jsonl --write`"
        )
        doc = (__doc__ or "").split("\n\n")[3]
        write_section(
            "Heterogeneous LoRA ranks on the SmolLM2 role split", f"Command: `{command}`.\n\n{doc}\n\n{table}\n"
        )


def curve_table(results: dict[str, list[dict]], rounds: int) -> str:
    """Held-out loss after each round, one row per mode and seed."""
    rows = ["| mode | seed | " + " | ".join(f"round {t}" for t in range(1, rounds + 1)) + " |"]
    rows.append("| --- " * (rounds + 2) + "|")
    for name, res in results.items():
        for r in res:
            if len(r.get("curve", [])) == rounds:
                cells = " | ".join(f"{x:.4f}" for x in r["curve"])
                rows.append(f"| {name.split(' (')[0]} | {r['seed']} | {cells} |")
    return "\n".join(rows)


def cap_main(args: argparse.Namespace) -> None:
    """--study cap: seeds interleaved (every mode of one seed, then the next), the load average seen."""
    load = [os.getloadavg()[0]]
    results: dict[str, list[dict]] = {name: [] for name in CAP_MODES}
    for seed in args.seeds:
        for name, mode in CAP_MODES.items():
            results[name].append(run(mode, seed))
            load.append(os.getloadavg()[0])
    head = "| mode | " + " | ".join(f"seed {s} loss" for s in args.seeds)
    rows = [head + " | mean loss | mean acc | held back | kB down a fit |", "| --- " * (len(args.seeds) + 5) + "|"]
    for name, res in results.items():
        cells = " | ".join(f"{r['loss']:.4f}" for r in res)
        held = [r["held_back"] for r in res if r["held_back"] is not None]
        held_cell = f"{statistics.mean(held):.3f}" if held else "-"
        mean_loss, mean_acc = statistics.mean(r["loss"] for r in res), statistics.mean(r["acc"] for r in res)
        kb = statistics.mean(r["kb_fit"] for r in res)
        rows.append(f"| {name} | {cells} | {mean_loss:.4f} | {mean_acc:.3f} | {held_cell} | {kb:.2f} |")
    table = "\n".join(rows)
    print(table)
    print(f"load average {min(load):.1f}-{max(load):.1f}")
    if not args.no_write:
        seeds = " ".join(map(str, args.seeds))
        command = f"nice -n 10 .venv/bin/python benchmarks/lora_ranks.py --study cap --seeds {seeds}"
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        body = (
            f"Command: `{command}`. The workload of the section \"Heterogeneous LoRA ranks: FLoRA / FlexLoRA vs "
            f"HetLoRA zero-padding\" with every client at rank 8 (r = 8; 6 of 12 clients a round, 15 rounds). "
            f"{CAP_NOTE}.\n\nHeld-out loss after round 15:\n\n{table}\n\n"
            f"Measured {stamp}, load average {min(load):.1f}-{max(load):.1f} (losses do not depend on load)."
        )
        write_section("Rank-capped residual increments on the tiny MLP", body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    parser.add_argument("--study", choices=["ranks", "svd", "cap"], default="ranks")
    parser.add_argument("--workload", choices=["mlp", "smollm2"], default="mlp")
    parser.add_argument("--out", type=Path, help="smollm2: append each run (a JSON line) to this file")
    parser.add_argument("--table-from", type=Path, nargs="+", help="smollm2: only render saved runs")
    parser.add_argument("--write", action="store_true", help="smollm2: write the docs/BENCHMARKS.md section")
    parser.add_argument(
        "--modes", nargs="+", help="smollm2: only these (hetlora flexlora flora reference hetlora+prune ...)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="smollm2: federated rounds (the table above: 2)")
    parser.add_argument("--baseline", action="store_true", help="smollm2: only the base model's held-out loss")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.workload == "smollm2":
        smollm2_main(args)
        return
    if args.study == "cap":
        cap_main(args)
        return
    modes = MODES | HETLORA_MODES if args.study == "ranks" else SVD_MODES
    results = {name: [run(mode, s) for s in args.seeds] for name, mode in modes.items()}
    head = "| mode | " + " | ".join(f"seed {s} loss / acc" for s in args.seeds)
    rows = [head + " | mean loss | mean acc | kB down a round |", "| --- " * (len(args.seeds) + 4) + "|"]
    for name, res in results.items():
        cells = " | ".join(f"{r['loss']:.4f} / {r['acc']:.3f}" for r in res)
        mean_loss = statistics.mean(r["loss"] for r in res)
        mean_acc = statistics.mean(r["acc"] for r in res)
        kb = statistics.mean(r["kb_down"] for r in res)
        rows.append(f"| {name} | {cells} | {mean_loss:.4f} | {mean_acc:.3f} | {kb:.1f} |")
    table = "\n".join(rows)
    pruned = {name: [r["ranks"] for r in res] for name, res in results.items() if any(r["ranks"] for r in res)}
    if pruned:  # where the self-pruning clients ended (they start at 2 or 8)
        table += "\n\nRanks after the last round (clients at rank 1 / 2 / 4 / 8, summed over seeds): " + "; ".join(
            f"{name.split(' ')[0]}: " + " / ".join(str(sum(rs.count(r) for rs in ranks)) for r in (1, 2, 4, 8))
            for name, ranks in pruned.items()
        )
    print(table)
    if not args.no_write:
        doc = (__doc__ or "").split("\n\n")
        seeds = " ".join(map(str, args.seeds))
        command = f"nice -n 10 .venv/bin/python benchmarks/lora_ranks.py --study {args.study} --seeds {seeds}"
        if args.study == "ranks":
            title = "Heterogeneous LoRA ranks: FLoRA / FlexLoRA vs HetLoRA zero-padding"
            body = f"Command: `{command}`.\n\n{doc[1]}\n\n{table}\n"
        else:
            title = "Why svd learned more slowly than fedex"
            body = f"Command: `{command}`. The workload above with every client at rank 8 ({SVD_NOTE})\n\n{table}\n"
        write_section(title, body)


if __name__ == "__main__":
    main()
