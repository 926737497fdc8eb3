"""What a fitting client's copy of the exact LoRA modes' residual costs it: the save of the whole dense copy.

SmolLM2-135M's architecture with random weights and the demo's adapter (r = 8 on q/k/v/o of the top 8 blocks),
so the residual is 32 dense (out, in) float32 matrices, 28.3 MB. Two timings, interleaved, ``--repeats``
times: one client's ``ResidualCopy.resolve`` for a fit after a round it took part in (load its copy, add one
increment of rank (K - 1) r in factored form, save the new dense copy; what ``ClientWorker.begin_fit`` does)
and the store's ``save`` alone (the dense copy written, in a disk store: a
safetensors file written and renamed, as on a participant or in a simulation's run directory; in a memory
store: a copy). Medians, in milliseconds.

    nice -n 10 .venv/bin/python benchmarks/residual_copy.py --repeats 15 --write
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_section
from lora_downlink import smollm2_adapter

from fedtune.aggregation.lora import lora_pairs
from fedtune.client.residual_copy import NS_RESIDUAL, ResidualCopy
from fedtune.core.keys import RESIDUAL_BASE, RESIDUAL_PREFIX, RESIDUAL_VERSION
from fedtune.core.state_store import ClientState
from fedtune.server.strategies.lora_wire import increment_key

K = 4  # clients a round: the increment's rank is (K - 1) r


def _version(v: int) -> np.ndarray:
    return np.array([v], np.int64)


def measure(address: str, pairs, repeats: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    copy = ResidualCopy(address)
    dense = {
        RESIDUAL_PREFIX + p.module: rng.normal(0, 1e-3, (p.out_features, p.in_features)).astype(np.float32)
        for p in pairs
    }
    copy.resolve("c", {RESIDUAL_VERSION: _version(0), **dense}, round=1)
    rank = (K - 1) * pairs[0].rank
    fit_ms, save_ms = [], []
    for i in range(1, repeats + 1):
        payload = {RESIDUAL_VERSION: _version(i), RESIDUAL_BASE: _version(i - 1)}
        for p in pairs:
            payload[increment_key(i, p.module, "B")] = rng.normal(0, 1e-3, (p.out_features, rank)).astype(np.float32)
            payload[increment_key(i, p.module, "A")] = rng.normal(0, 1e-3, (rank, p.in_features)).astype(np.float32)
        started = time.perf_counter()
        out = copy.resolve("c", payload, round=i + 1)
        fit_ms.append((time.perf_counter() - started) * 1e3)
        state = ClientState({k.removeprefix(RESIDUAL_PREFIX): v for k, v in out.items()}, {"version": i})
        started = time.perf_counter()
        copy.store.save("other", NS_RESIDUAL, state, round=i + 1)  # another client's key: the save alone
        save_ms.append((time.perf_counter() - started) * 1e3)
    return {"fit": statistics.median(fit_ms), "save": statistics.median(save_ms)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--write", action="store_true", help="update docs/BENCHMARKS.md")
    args = parser.parse_args()
    _, spec = smollm2_adapter()
    pairs = lora_pairs(spec)
    mb = sum(4 * p.out_features * p.in_features for p in pairs) / 1e6
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        rows = {}
        for name, address in (("disk", f"disk:{tmp}/store"), ("memory", "memory:residual-copy-bench")):
            rows[name] = measure(address, pairs, args.repeats)
            load.append(os.getloadavg()[0])
    rank = (K - 1) * pairs[0].rank
    table = "\n".join(
        [
            f"| store | a fit's resolve: load, add a rank-{rank} increment, save (ms) | the save alone (ms) |",
            "| --- | --- | --- |",
            *(f"| {name} | {r['fit']:.0f} | {r['save']:.0f} |" for name, r in rows.items()),
        ]
    )
    print(f"residual: {len(pairs)} modules, {mb:.1f} MB\n{table}\nload average {min(load):.1f}-{max(load):.1f}")
    if args.write:
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        intro = __doc__.split("\n\n")[1]
        write_section(
            "The per-fit residual copy",
            f"Command: `nice -n 10 .venv/bin/python benchmarks/residual_copy.py --repeats {args.repeats} --write`.\n\n"
            f"{intro}\n\n{table}\n\nMeasured {stamp}, load average {min(load):.1f}-{max(load):.1f} (2 shared "
            "cores).",
        )


if __name__ == "__main__":
    main()
