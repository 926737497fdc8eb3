"""What exactness under bf16 costs: one training step (forward + backward) of the exact LoRA modes against
naive LoRA, both under ``model.compute_dtype: bfloat16``.

SmolLM2-135M-Instruct's architecture (30 blocks, hidden 576, 9 query / 3 key-value heads of 64, vocab 49,152)
with random weights, and the demo's adapter (r = 8, alpha 16, on q/k/v/o of the top 8 blocks: 32 adapted
layers). The exact modes (fedex / svd / flora / flexlora) load a dense residual R into every adapted layer;
under bf16 the layer computes W0 x in bf16 plus the whole change s (B A + R) x in float32
(``fedtune.client.hooks.LoraResidual(separate=True)``), which costs one float32 (out, in) matmul per adapted
layer and call more than naive LoRA. "W0 x computed twice" is that hook as it was before it reused the base
layer's own output (a second bf16 base matmul per adapted layer). One step = forward and backward of a batch
of random tokens, timed in CPU seconds of one torch thread; the variants run interleaved, in rotating order,
and the table gives the median over repetitions of each variant's time divided by naive bf16's in the same
repetition.

    nice -n 10 .venv/bin/python benchmarks/lora_bf16_cost.py --reps 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_section
from _workloads import smollm2_config

from fedtune.client.hooks import LoraResidual
from fedtune.config.schema import LoraConfig
from fedtune.models.lora import apply_lora
from fedtune.server.strategies.lora import RESIDUAL_PREFIX


class RecomputedBase(LoraResidual):
    """The hook before it reused the base layer's output: W0 x is computed a second time in the hook."""

    def _capture_hook(self, key):  # type: ignore[no-untyped-def]
        return lambda *_: None


def build(layers: int) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    config = smollm2_config(layers)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    lora = LoraConfig(r=8, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], top_layers=8)
    return apply_lora(model, lora, task_type="causal_lm")


def residuals(model: torch.nn.Module) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            w = module.base_layer.weight
            out[RESIDUAL_PREFIX + name] = rng.normal(0, 1e-3, tuple(w.shape)).astype(np.float32)
    return out


def step(model: torch.nn.Module, batch: torch.Tensor, dtype: torch.dtype | None) -> float:
    """CPU seconds of one forward + backward (one torch thread: on a shared machine CPU time measures the
    work, where wall time measures mostly the other processes)."""
    model.zero_grad(set_to_none=True)
    start = time.process_time()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(1)
    models = {name: build(args.layers) for name in ("naive", "exact", "before")}
    extras = residuals(models["exact"])
    LoraResidual(separate=True).load(models["exact"], extras)
    RecomputedBase(separate=True).load(models["before"], extras)
    batch = torch.randint(0, 49152, (args.batch, args.seq))
    variants = {
        "naive LoRA, bf16": (models["naive"], torch.bfloat16),
        "exact, bf16, W0 x reused (now)": (models["exact"], torch.bfloat16),
        "exact, bf16, W0 x computed twice (before)": (models["before"], torch.bfloat16),
        "naive LoRA, float32": (models["naive"], None),
    }
    names = list(variants)
    for name in names:  # warm-up
        step(*variants[name][:1], batch, variants[name][1])
    times: dict[str, list[float]] = {n: [] for n in names}
    loads = [os.getloadavg()[0]]
    for rep in range(args.reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            model, dtype = variants[name]
            times[name].append(step(model, batch, dtype))
        loads.append(os.getloadavg()[0])
        print(f"rep {rep}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names), flush=True)
    base = times["naive LoRA, bf16"]
    rows = ["| variant | median CPU s / step | x naive bf16 (median of per-repetition ratios) |", "| --- | --- | --- |"]
    for name in names:
        ratio = statistics.median(t / b for t, b in zip(times[name], base, strict=True))
        rows.append(f"| {name} | {statistics.median(times[name]):.3f} | {ratio:.3f} |")
    table = "\n".join(rows)
    print(table)
    if not args.no_write:
        command = f"nice -n 10 .venv/bin/python benchmarks/lora_bf16_cost.py --reps {args.reps}"
        if (args.layers, args.batch, args.seq) != (30, 2, 128):
            command += f" --layers {args.layers} --batch {args.batch} --seq {args.seq}"
        intro = (__doc__ or "").split("\n\n")[1]
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        body = (
            f"Command: `{command}`.\n\n{intro} Batch {args.batch} x {args.seq} tokens, {args.reps} repetitions.\n\n"
            f"{table}\n\nMeasured {stamp} on the shared 2-core machine, load average "
            f"{min(loads):.1f}-{max(loads):.1f}."
        )
        write_section("What exactness costs under bf16 (SmolLM2-shaped, one training step)", body)


if __name__ == "__main__":
    main()
