"""Aggregation throughput and server memory as the number of clients grows.

1. Throughput: folding K client updates of N float32 values into the running weighted mean
   (fedtune.aggregation.fedavg.WeightedMean), in GB/s of update bytes folded, beside this machine's plain
   NumPy add bandwidth on arrays of the same size (``np.add(acc, x, out=acc)``, float32).
2. Peak memory: the real round loop (sampling, validation, FedOpt/FedAvg strategy) in a fresh process with a
   transport that produces each client's 100 MB update only when the loop asks for it, for 10 and for 100
   clients per round. Because the loop folds replies one at a time, peak memory must not grow with K.

    .venv/bin/python benchmarks/aggregation.py          # writes the section in docs/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from _common import run_child, write_section

N = 25_200_000  # values per update: the 25.2M-parameter model of the Flower harness' workload B (100.8 MB)


def throughput(k: int, reps: int) -> dict:
    from fedtune.aggregation.fedavg import WeightedMean

    rng = np.random.default_rng(0)
    updates = [rng.standard_normal(N, dtype=np.float32) for _ in range(4)]
    fold_s, add_s = [], []
    for _ in range(reps):
        mean = WeightedMean(N)
        started = time.perf_counter()
        for i in range(k):
            mean.add(updates[i % 4], float(i + 1))
        mean.result()
        fold_s.append(time.perf_counter() - started)
        acc = np.zeros(N, dtype=np.float32)
        started = time.perf_counter()
        for i in range(k):
            np.add(acc, updates[i % 4], out=acc)
        add_s.append(time.perf_counter() - started)
    gb = k * N * 4 / 1e9
    return {"fold_gbps": gb / statistics.median(fold_s), "numpy_add_gbps": gb / statistics.median(add_s)}


def memory_child(k: int) -> dict:
    """Peak RSS of one real round with k clients whose updates are generated lazily."""
    from fedtune.config import parse_config
    from fedtune.core.messages import ClientEval, ClientUpdate
    from fedtune.core.params import ParamSpec
    from fedtune.core.state import ServerState
    from fedtune.server.build import build_strategy
    from fedtune.server.loop import run_round
    from fedtune.tasks.base import EvalSums

    spec = ParamSpec(names=("w",), shapes=((N,),), dtypes=("float32",))

    class LazyClients:
        def client_ids(self) -> list[str]:
            return [f"c{i:04d}" for i in range(k)]

        def fit(self, instructions):
            for j, instr in enumerate(instructions):
                delta = np.full(N, 1e-3 * (j + 1), dtype=np.float32)  # produced on demand, dropped after
                yield ClientUpdate(instr.client_id, instr.round, 10 + j, delta, spec.digest)

        def evaluate(self, instructions):
            for instr in instructions:
                yield ClientEval(instr.client_id, instr.round, EvalSums())

        def close(self) -> None:
            pass

    import threading

    import psutil

    config = parse_config({"federation": {"rounds": 1, "clients_per_round": k}, "eval": {"max_clients": 1}})
    state = ServerState(0, np.zeros(N, np.float32), spec)
    strategy = build_strategy(config)
    proc = psutil.Process()
    baseline = proc.memory_info().rss / 2**20
    peak, done = [baseline], threading.Event()

    def sample() -> None:  # current RSS every 5 ms while the round runs
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss / 2**20)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    _, report = run_round(config, strategy, LazyClients(), state)
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    assert len(report.clients) == k and not report.failures
    return {"k": k, "peak_rss_mb": peak[0], "before_round_mb": baseline, "round_s": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--memory-child", type=int)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child)))
        return
    tp = throughput(args.k, args.reps)
    mem = [run_child([str(Path(__file__).resolve()), "--memory-child", str(k)]) for k in (10, 100)]
    growth = [m["peak_rss_mb"] - m["before_round_mb"] for m in mem]
    buffers = [g / (N * 4 / 2**20) for g in growth]
    mem_rows = "\n".join(
        f"| {m['k']} | {m['before_round_mb']:.0f} | {m['peak_rss_mb']:.0f} | {m['round_s']:.1f} |" for m in mem
    )
    body = f"""
Command: `.venv/bin/python benchmarks/aggregation.py` (updates of {N:,} float32 values = {N * 4 / 1e6:.0f} MB).

| what | GB/s of update bytes |
| --- | --- |
| fedtune streaming weighted fold, {args.k} updates | {tp["fold_gbps"]:.2f} |
| plain NumPy `np.add(acc, x, out=acc)`, float32, same arrays | {tp["numpy_add_gbps"]:.2f} |

The fold is a fused multiply-add of each weighted float32 update into one float32 accumulator; ratio
fold / NumPy add: **{tp["fold_gbps"] / tp["numpy_add_gbps"]:.2f}**.

Peak memory of one real round (sampling, validation, FedAvg) whose clients each send a {N * 4 / 1e6:.0f} MB update,
produced only when the loop asks for it:

| clients per round | RSS before the round, MB | peak RSS during the round, MB | round, s |
| --- | --- | --- | --- |
{mem_rows}

Growth of the round's peak over its starting RSS: {growth[0]:.0f} MB with 10 clients, {growth[1]:.0f} MB with 100,
i.e. {buffers[0]:.1f} and {buffers[1]:.1f} model-sized buffers (the global vector, the accumulator, the update in
flight, and the server optimiser's temporaries), the same whatever the number of clients.
"""
    print(body)
    if not args.no_write:
        write_section("Aggregation throughput and server memory", body)


if __name__ == "__main__":
    main()
