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


OPTIMIZERS = {"sgd": "FedAvg (server SGD, lr 1)", "adam": "FedAdam (lr 0.01)"}


def _reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process (Linux: VmHWM); False where not supported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def memory_child(k: int, optimizer: str) -> dict:
    """Peak memory of one real round with k clients whose updates are generated lazily."""
    import threading
    import tracemalloc

    import psutil

    from fedtune.config import parse_config
    from fedtune.core.messages import ClientEval, ClientUpdate
    from fedtune.core.params import ParamSpec
    from fedtune.server.build import build_strategy
    from fedtune.server.loop import run_round
    from fedtune.tasks.base import EvalSums

    spec = ParamSpec(names=("w",), shapes=((N,),), dtypes=("float32",))

    class LazyClients:
        def client_ids(self) -> list[str]:
            return [f"c{i:04d}" for i in range(k)]

        def fit(self, instructions):
            for j, instr in enumerate(instructions):
                # produced on demand and held by no local here, so only the consumer keeps it alive
                yield ClientUpdate(
                    instr.client_id, instr.round, 10 + j, np.full(N, 1e-3 * (j + 1), dtype=np.float32), spec.digest
                )

        def evaluate(self, instructions):
            for instr in instructions:
                yield ClientEval(instr.client_id, instr.round, EvalSums())

        def close(self) -> None:
            pass

    server = {"optimizer": optimizer} | ({"lr": 0.01} if optimizer != "sgd" else {})
    config = parse_config(
        {"federation": {"rounds": 1, "clients_per_round": k}, "eval": {"max_clients": 1}, "server": server}
    )
    strategy = build_strategy(config)
    state = strategy.init_state(np.full(N, 0.01, np.float32), spec)
    # np.zeros pages stay unmapped until written; a server past its first round has written its moments,
    # so copy them to make them resident before measuring the round's growth.
    state = state.evolve(arrays={name: v.copy() for name, v in state.arrays.items()})
    proc = psutil.Process()
    hwm = _reset_peak_rss()
    baseline = proc.memory_info().rss / 2**20
    peak, done = [baseline], threading.Event()

    def sample() -> None:  # current RSS every 5 ms while the round runs (where VmHWM cannot be reset)
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss / 2**20)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    tracemalloc.start()  # NumPy reports its data buffers to tracemalloc: the exact allocation peak
    started = time.perf_counter()
    _, report = run_round(config, strategy, LazyClients(), state)
    seconds = time.perf_counter() - started
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    done.set()
    sampler.join()
    assert len(report.clients) == k and not report.failures
    peak_rss = max(peak[0], _rss_mb("VmHWM")) if hwm else peak[0]
    return {
        "k": k,
        "optimizer": optimizer,
        "peak_rss_mb": peak_rss,
        "before_round_mb": baseline,
        "traced_peak_mb": traced_peak / 2**20,
        "round_s": seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--memory-child", type=int)
    ap.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="sgd")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.optimizer)))
        return
    tp = throughput(args.k, args.reps)
    script = str(Path(__file__).resolve())
    mem = [run_child([script, "--memory-child", str(k), "--optimizer", opt]) for opt in OPTIMIZERS for k in (10, 100)]
    buffer_mb = N * 4 / 2**20
    mem_rows = "\n".join(
        f"| {OPTIMIZERS[m['optimizer']]} | {m['k']} | {m['before_round_mb']:.0f} | {m['peak_rss_mb']:.0f} "
        f"| {(m['peak_rss_mb'] - m['before_round_mb']) / buffer_mb:.2f} | {m['traced_peak_mb'] / buffer_mb:.2f} "
        f"| {m['round_s']:.1f} |"
        for m in mem
    )
    body = f"""
Command: `.venv/bin/python benchmarks/aggregation.py` (updates of {N:,} float32 values = {N * 4 / 1e6:.0f} MB).

| what | GB/s of update bytes |
| --- | --- |
| fedtune streaming weighted fold, {args.k} updates | {tp["fold_gbps"]:.2f} |
| plain NumPy `np.add(acc, x, out=acc)`, float32, same arrays | {tp["numpy_add_gbps"]:.2f} |

The fold is a fused multiply-add of each weighted float32 update into one float32 accumulator; ratio
fold / NumPy add: **{tp["fold_gbps"] / tp["numpy_add_gbps"]:.2f}**.

Peak memory of one real round (sampling, validation, aggregation, server optimiser step) whose clients each
send a {N * 4 / 1e6:.0f} MB update, produced only when the loop asks for it. The server state (global vector,
and Adam's two moments) is resident before the round. Growth is in model-sized buffers ({buffer_mb:.0f} MiB):
from the process's peak RSS (VmHWM, reset before the round), and from the peak of the NumPy allocations
made during the round (tracemalloc, exact).

| server | clients per round | RSS before, MB | peak RSS, MB | RSS growth, buffers | NumPy peak, buffers | round, s |
| --- | --- | --- | --- | --- | --- | --- |
{mem_rows}

The minimum for a server whose state is an immutable value: while folding, the accumulator and the one update
in flight (2 buffers); at the step, the accumulator (now the mean delta) and the fresh outputs: new global
vector for FedAvg (2 buffers), new vector and new moments for FedAdam (4 buffers). The old state stays
referenced by the caller, and the float64 arithmetic of the step works on blocks of a few hundred KB.
None of it grows with the number of clients.
"""
    print(body)
    if not args.no_write:
        write_section("Aggregation throughput and server memory", body)


if __name__ == "__main__":
    main()
