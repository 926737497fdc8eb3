"""Local training throughput: fedtune's built-in loop, the Hugging Face Trainer path, a bare PyTorch + peft loop.

One client's local round on SmolLM2-135M-Instruct with LoRA (r=8 on q/v), the same seeded token batches for
all three (B sequences of L tokens), AdamW, gradient clipping at 1.0:

* ``builtin``: ``fedtune.client.train.local_train`` (client.trainer: builtin);
* ``hf``: ``fedtune.client.hf_trainer.hf_local_train`` (client.trainer: hf, transformers.Trainer);
* ``bare``: a hand-written loop: ``model(input_ids, labels=...)``, backward, clip, step.

Each path runs in a fresh process (so peak RSS is its own), after one untimed warmup round of 1 step; the paths
alternate within each repetition, and the ratios to the bare loop are taken per repetition.

    nice -n 10 .venv/bin/python benchmarks/local_training.py --steps 6 --reps 2   # writes docs/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import run_child, write_section

PATHS = ("builtin", "hf", "bare")
MODEL = "smollm2-135m-instruct"


def _setup(batch: int, length: int) -> tuple[object, list[dict]]:
    import torch

    from fedtune.config import parse_config
    from fedtune.data.cache import default_cache_dir
    from fedtune.tasks.build import build_run_task

    config = parse_config(
        {
            "model": {"name": MODEL, "max_length": length, "lora": {"r": 8, "alpha": 16}},
            "data": {"source": "text", "path": "unused"},
        }
    )
    task = build_run_task(config, num_labels=None, cache_dir=default_cache_dir(None))
    g = torch.Generator().manual_seed(0)
    vocab = task.module.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (batch * 64, length), generator=g)  # more than any run uses: no repeats
    examples = [{"input_ids": r, "labels": r.clone(), "attention_mask": torch.ones_like(r)} for r in ids]
    return task, examples


def _client_cfg(steps: int, batch: int, trainer: str) -> object:
    from fedtune.config.schema import ClientConfig

    return ClientConfig(local_steps=steps, batch_size=batch, lr=1e-4, optimizer="adamw", trainer=trainer)


def child(path: str, steps: int, batch: int, length: int) -> dict:
    import torch

    from fedtune.client.train import LocalHooks, LocalRun, local_train

    task, examples = _setup(batch, length)

    def fedtune_round(n: int) -> None:
        if path == "hf":
            from fedtune.client.hf_trainer import hf_local_train

            hf_local_train(
                task, examples, _client_cfg(n, batch, "hf"), LocalRun(0, 1, "a", rounds=1), hooks=LocalHooks()
            )
        else:
            local_train(task, examples, _client_cfg(n, batch, "builtin"), LocalRun(0, 1, "a"))

    def bare_round(n: int) -> None:
        model = task.module
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        model.train()
        for step in range(n):
            chunk = examples[step * batch : (step + 1) * batch]
            out = model(
                input_ids=torch.stack([e["input_ids"] for e in chunk]),
                attention_mask=torch.stack([e["attention_mask"] for e in chunk]),
                labels=torch.stack([e["labels"] for e in chunk]),
                use_cache=False,
            )
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()

    run = bare_round if path == "bare" else fedtune_round
    task.module.train()
    run(1)  # warmup: first-step imports and allocator growth
    started = time.perf_counter()
    run(steps)
    seconds = time.perf_counter() - started
    # this process's own peak (run_child's fallback, RUSAGE_CHILDREN, is the maximum over every child so far)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"path": path, "seconds": seconds, "tokens_per_s": steps * batch * length / seconds, "peak_rss_mb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--child", choices=PATHS)
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.batch, args.length)))
        return
    rows = []
    for rep in range(args.reps):
        for path in PATHS[rep % 3 :] + PATHS[: rep % 3]:  # the order rotates: no path is always first or last
            res = run_child([__file__, "--child", path, "--steps", str(args.steps), "--batch", str(args.batch),
                             "--length", str(args.length)])  # fmt: skip
            rows.append({"rep": rep, **res})
            print(json.dumps(rows[-1]), flush=True)
    table = [
        "| rep | path | tokens/s | seconds | peak RSS, MB | tokens/s relative to bare |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    ratios: dict[str, list[float]] = {p: [] for p in PATHS}
    for rep in range(args.reps):
        bare = next(r for r in rows if r["rep"] == rep and r["path"] == "bare")
        for r in (r for r in rows if r["rep"] == rep):
            ratio = r["tokens_per_s"] / bare["tokens_per_s"]
            ratios[r["path"]].append(ratio)
            table.append(
                f"| {rep} | {r['path']} | {r['tokens_per_s']:.0f} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} "
                f"| {ratio:.3f} |"
            )
    summary = ", ".join(f"{p} {statistics.median(v):.3f}" for p, v in ratios.items() if p != "bare")
    body = (
        f"Command: `nice -n 10 .venv/bin/python benchmarks/local_training.py --steps {args.steps} --batch "
        f"{args.batch} --length {args.length} --reps {args.reps}`. One client's local round on {MODEL} with LoRA "
        f"r=8 on q/v, AdamW, clipping 1.0, {args.steps} timed steps of {args.batch} x {args.length} random tokens "
        "(the same seeded batches for every path) after a 1-step warmup; each path in a fresh process (its own peak "
        "RSS), the three alternating within a repetition in an order that rotates between repetitions. "
        "`builtin` is fedtune's loop (`client.trainer: builtin`), "
        "`hf` the Trainer path (`client.trainer: hf`: transformers.Trainer, its setup included in the round), `bare` "
        "a hand-written PyTorch + peft loop.\n\n"
        + "\n".join(table)
        + f"\n\nMedian tokens/s relative to the bare loop: {summary} (goal for the built-in loop: at least 0.95)."
    )
    print(body)
    if not args.no_write:
        write_section("Local training throughput (built-in loop, HF Trainer, bare PyTorch + peft)", body)


if __name__ == "__main__":
    main()
