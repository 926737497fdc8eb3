"""fedex vs svd under bf16 autocast: how far apart the same global model evaluates, with the residual folded
into W0 (cast to bf16 with it) or with the whole change s (B A + R) applied in float32 beside the bf16 W0 x
(what the client does under bf16 now), and, for reference, both modes with float32 compute.

tiny-llama (random weights, 2 layers), LoRA r = 4 on q_proj / v_proj, 3 text clients, one round of 3 local
steps at lr 0.3 (so fedex's residual is far from zero), ``model.compute_dtype: bfloat16``. Both modes hold the
same global model after the round (exact); the table gives the pooled held-out loss the server's evaluation
computes for each. Under bf16 the round's training is the same in both modes (the residual is zero until the
first aggregation), so the loss gap is what evaluating one product split two ways costs.

    nice -n 10 .venv/bin/python benchmarks/lora_bf16.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_section
from rich.console import Console

from fedtune.client.hooks import LoraResidual
from fedtune.config import parse_config
from fedtune.core.messages import EvalInstruction
from fedtune.run.session import simulate
from fedtune.server.build import build_strategy

LINES = ["To be, or not to be, that is the question.", "All the world's a stage, and all the men merely players."]


def config(root: Path, mode: str, dtype: str = "bfloat16") -> dict:
    corpus = root / "corpus"
    corpus.mkdir(parents=True)
    for c in range(3):
        text = "\n\n".join(" ".join(LINES[(c + i) % 2] for _ in range(3)) for i in range(8))
        (corpus / f"speaker_{c}.txt").write_text(text)
    return {
        "seed": 2,
        "model": {
            "name": "tiny-llama",
            "max_length": 32,
            "compute_dtype": dtype,
            "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        },
        "data": {"source": "text", "path": str(corpus)},
        "federation": {"rounds": 1, "clients_per_round": 3},
        "client": {"local_steps": 3, "batch_size": 4, "lr": 0.3},
        "eval": {"batch_size": 8},
        "server": {"lora_aggregation": mode},
        "run": {"out_dir": str(root / "runs"), "plot": False},
    }


def pooled(worker, state, extras) -> float:
    evals = [
        worker.evaluate(EvalInstruction(c, state.round, state.params, state.spec.digest, 8, None, extras))
        for c in sorted(worker.records)
    ]
    return sum(e.sums.loss_sum for e in evals) / sum(e.sums.count for e in evals)


def main() -> None:
    losses: dict[str, list[float]] = {"fedex": [], "svd": []}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("bfloat16", "float32"):
            for mode in ("fedex", "svd"):
                raw = config(Path(tmp) / dtype / mode, mode, dtype)
                result = simulate(parse_config(raw), console=Console(quiet=True), show_progress=False)
                worker, state = result.prepared.worker, result.state
                extras = build_strategy(parse_config(raw)).eval_payload(state)
                if dtype == "bfloat16":
                    worker.residual = LoraResidual(separate=True)
                    losses[mode].append(pooled(worker, state, extras))
                    worker.residual = LoraResidual(separate=False)
                losses[mode].append(pooled(worker, state, extras))
    rows = ["| compute, residual applied | fedex loss | svd loss | difference |", "| --- | --- | --- | --- |"]
    labels = (
        "bf16, s (B A + R) in float32 beside W0 x (now)",
        "bf16, R folded into W0 and cast to bf16 (before)",
        "float32 (reference)",
    )
    for i, label in enumerate(labels):
        f, s = losses["fedex"][i], losses["svd"][i]
        rows.append(f"| {label} | {f:.9f} | {s:.9f} | {abs(f - s):.2e} |")
    table = "\n".join(rows)
    print(table)
    if "--no-write" not in sys.argv:
        intro = (__doc__ or "").split("\n\n")[1]
        body = f"Command: `nice -n 10 .venv/bin/python benchmarks/lora_bf16.py`.\n\n{intro}\n\n{table}\n"
        write_section("fedex vs svd under bf16", body)


if __name__ == "__main__":
    main()
