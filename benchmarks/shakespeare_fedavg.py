"""McMahan et al. 2017, Table 2 (Shakespeare LSTM), scaled down to run on two CPU cores.

Question: how many communication rounds does FedAvg (E=5 local epochs, batch B=10) need to reach a target
next-character accuracy, compared with FedSGD (one full-batch gradient step per client per round), with a
client per (play, role) and C = 0.1 of the clients per round, on the natural non-IID split and on an IID
balanced shuffle of the same data? Then FedAvgM, FedAdam, FedYogi and FedProx on the same clients.

Every run goes through the product: CharTask (a fedtune Task) on a ClientWorker, InProcessTransport,
fedtune.server.build.build_strategy and fedtune.server.loop.run_round. Rounds-to-target is the first round
at which the best accuracy so far reaches the target, linearly interpolated between evaluations.

    .venv/bin/python benchmarks/shakespeare_fedavg.py --workers 2   # the grid: about an hour of CPU, see the Cost note
    .venv/bin/python benchmarks/shakespeare_fedavg.py --report-only         # rebuild table and plot
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "shakespeare_fedavg.results.json"  # tracked: the report is rebuilt from it
NOTES = ROOT / "benchmarks" / "shakespeare_fedavg.notes.md"  # the written reading of the results
PLOT = ROOT / "docs" / "img" / "shakespeare_fedavg.png"
DOC = ROOT / "docs" / "BENCHMARKS.md"
SECTION = "## Shakespeare: FedAvg vs FedSGD (McMahan et al. 2017, Table 2)"
COMMAND = ".venv/bin/python benchmarks/shakespeare_fedavg.py --workers 2"

# The scaled-down federation (the paper: 1,146 roles, C = 0.1, unbounded clients, thousands of rounds).
DATA = {"num_clients": 40, "min_train": 6, "max_train": 100, "max_test": 2, "seed": 0}
# next-character accuracy targets (the paper's 54% needs thousands of rounds on the full corpus); runs stop
# once the best accuracy reaches STOP or after max_rounds
TARGETS = (0.25, 0.35)
STOP = 0.38


@dataclass(frozen=True)
class Experiment:
    name: str  # the row label: FedSGD, FedAvg, FedAvgM, FedAdam, FedYogi, FedProx
    partition: str  # "noniid" (one client per role) or "iid" (the same segments shuffled, dealt evenly)
    client: dict = field(default_factory=dict)
    server: dict = field(default_factory=dict)
    max_rounds: int = 60
    eval_every: int = 1

    @property
    def key(self) -> str:
        return f"{self.name}|{self.partition}|lr={self.client['lr']}|{json.dumps(self.server, sort_keys=True)}"


def fedsgd(partition: str, lr: float, rounds: int) -> Experiment:
    client = {"local_steps": 1, "full_batch": True, "lr": lr, "optimizer": "sgd", "max_grad_norm": None}
    return Experiment("FedSGD", partition, client, {}, rounds, eval_every=5)


def fedavg(
    partition: str, client_lr: float, rounds: int, name: str = "FedAvg", server: dict | None = None
) -> Experiment:
    client = {"local_epochs": 5, "batch_size": 10, "lr": client_lr, "optimizer": "sgd", "max_grad_norm": None}
    return Experiment(name, partition, client, dict(server or {}), rounds)


def experiments() -> list[Experiment]:
    """The grid: the paper's comparison first, the server-side comparison next, FedSGD's long runs last."""
    runs = [fedavg(p, lr, 50) for lr in (1.47, 3.0, 4.5, 6.0) for p in ("noniid", "iid")]
    runs += [
        fedavg("noniid", 1.47, 50, "FedAvgM", {"optimizer": "momentum", "momentum": 0.9, "lr": 0.3}),
        fedavg("noniid", 1.47, 50, "FedAdam", {"optimizer": "adam", "lr": 0.01, "tau": 1e-3}),
        fedavg("noniid", 1.47, 50, "FedYogi", {"optimizer": "yogi", "lr": 0.01, "tau": 1e-3}),
        fedavg("noniid", 1.47, 50, "FedProx", {"proximal_mu": 0.01}),
    ]
    # FedSGD needs large steps: its grid is doubled until the best rate is inside it
    runs += [fedsgd(p, lr, 200) for lr in (3.0, 6.0, 12.0, 1.47) for p in ("noniid", "iid")]
    return runs


# --------------------------------------------------------------------------------------------- one run


def build_records(partition: str) -> dict:
    from _charlm import iid_balanced, select_clients

    from fedtune.data.cache import default_cache_dir
    from fedtune.data.shakespeare import load_shakespeare

    fed = load_shakespeare(default_cache_dir(None))
    records = select_clients(fed.clients, **DATA)
    return iid_balanced(records, DATA["seed"]) if partition == "iid" else records


def run_experiment(exp: Experiment, *, stop: float = STOP) -> dict:
    import torch
    from _charlm import VOCAB, CharLSTM, CharTask

    from fedtune.client.build import strategy_extensions
    from fedtune.client.worker import ClientWorker
    from fedtune.config.schema import Config
    from fedtune.core.rng import derive_seed
    from fedtune.server.build import build_strategy
    from fedtune.server.loop import run_round
    from fedtune.transport.inprocess import InProcessTransport

    torch.set_num_threads(1)
    records = build_records(exp.partition)
    config = Config.model_validate(
        {
            "seed": 0,
            "federation": {"rounds": exp.max_rounds, "fraction": 0.1},
            "client": exp.client,
            "server": exp.server,
            "eval": {"every": exp.eval_every, "batch_size": 200, "baseline": False},
        }
    )
    torch.manual_seed(derive_seed(0, "bench-init"))  # every run starts from the same weights
    task = CharTask(CharLSTM())
    ext = strategy_extensions()
    worker = ClientWorker(task, records, hook_factories=ext.hook_factories, update_transforms=ext.update_transforms)
    strategy = build_strategy(config, num_clients=len(records))
    state = strategy.init_state(worker.current_params(), worker.view.spec)
    transport = InProcessTransport(worker)
    curve, started, cpu_started = [], time.perf_counter(), time.process_time()
    diverged, worse_than_uniform = False, 0
    while state.round < exp.max_rounds:
        state, report = run_round(config, strategy, transport, state)
        if report.eval_pooled is not None and report.eval_pooled.count:
            acc = report.eval_pooled.metrics(accuracy=True)["accuracy"]
            curve.append((report.round, acc))
            print(f"{exp.key} round {report.round} acc {acc:.4f} ({time.perf_counter() - started:.0f}s)", flush=True)
            # diverged: the held-out loss is not finite, or worse than predicting every character uniformly
            # (ln V) at two evaluations in a row (one spike may recover)
            loss = report.eval_pooled.loss_sum / report.eval_pooled.count
            worse_than_uniform = worse_than_uniform + 1 if loss > math.log(len(VOCAB)) else 0
            if not math.isfinite(loss) or worse_than_uniform >= 2:
                diverged = True
                break
            if acc >= stop:
                break
    return {
        "experiment": asdict(exp),
        "key": exp.key,
        "curve": curve,
        "seconds": time.perf_counter() - started,  # wall clock, inflated when the machine is shared
        "cpu_seconds": time.process_time() - cpu_started,
        "clients": len(records),
        "train_segments": sum(len(t) for t, _ in records.values()),
        "client_sizes": sorted(len(t) for t, _ in records.values()),
        "diverged": diverged,
    }


# --------------------------------------------------------------------------------------------- analysis


def rounds_to_target(curve: list[tuple[int, float]], target: float) -> float | None:
    """First round where the best accuracy so far reaches ``target``, interpolated between evaluations."""
    best, prev_round, prev_best = 0.0, 0, 0.0
    for round_idx, acc in curve:
        best = max(best, acc)
        if best >= target:
            if prev_best >= target or round_idx == prev_round:
                return float(round_idx)
            frac = (target - prev_best) / (best - prev_best)
            return prev_round + frac * (round_idx - prev_round)
        prev_round, prev_best = round_idx, best
    return None


def best_runs(results: list[dict], target: float) -> dict[tuple[str, str], dict]:
    """Per (algorithm, partition): the grid point reaching ``target`` in the fewest rounds (else best accuracy)."""
    best: dict[tuple[str, str], dict] = {}
    for res in results:
        exp = res["experiment"]
        r = rounds_to_target(res["curve"], target)
        res = {**res, "rounds": r, "max_acc": max((a for _, a in res["curve"]), default=0.0)}
        score = (r if r is not None else math.inf, -res["max_acc"])
        old = best.get((exp["name"], exp["partition"]))
        if old is None or score < (old["rounds"] if old["rounds"] is not None else math.inf, -old["max_acc"]):
            best[(exp["name"], exp["partition"])] = res
    return best


def fmt_rounds(res: dict) -> str:
    lr = res["experiment"]["client"]["lr"]
    if res["rounds"] is None:
        return f"> {res['experiment']['max_rounds']} [{lr}]"
    return f"{res['rounds']:.1f} [{lr}]"


def speedup(res: dict, base: dict | None) -> str:
    if base is None or res is base or res["rounds"] is None:
        return "-"
    if base["rounds"] is None:
        return f"> {base['experiment']['max_rounds'] / res['rounds']:.1f}x"
    return f"{base['rounds'] / res['rounds']:.1f}x"


ORDER = ["FedSGD", "FedAvg", "FedAvgM", "FedAdam", "FedYogi", "FedProx"]
OPTIMIZER_ROWS = ["FedAvg", "FedAvgM", "FedAdam", "FedYogi", "FedProx"]
OPTIMIZER_CLIENT_LR = 1.47  # the optimiser comparison holds the client side fixed at the paper's lr


def _best_acc(res: dict) -> float:
    return max((a for _, a in res["curve"]), default=0.0)


def _cpu_per_round(res: dict) -> str:
    return f"{res['cpu_seconds'] / res['curve'][-1][0]:.1f}" if res.get("cpu_seconds") else "n/a"


def optimizer_table(results: list[dict], targets: tuple[float, ...] = (0.25, 0.30, 0.35)) -> str:
    """Same clients, same client side (E=5, B=10, SGD lr 1.47), non-IID: only the server side changes."""
    head = "| algorithm | server | " + " | ".join(f"rounds to {t:.0%}" for t in targets)
    head += " | best acc (rounds run) | CPU s per round |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for name in OPTIMIZER_ROWS:
        for res in results:
            e = res["experiment"]
            if (e["name"], e["partition"], e["client"]["lr"]) != (name, "noniid", OPTIMIZER_CLIENT_LR):
                continue
            cells = []
            for t in targets:
                r = rounds_to_target(res["curve"], t)
                cells.append(f"{r:.1f}" if r is not None else f"> {e['max_rounds']}")
            server = ", ".join(f"{k}={v}" for k, v in e["server"].items()) or "sgd, lr=1"
            lines.append(
                f"| {name} | {server} | "
                + " | ".join(cells)
                + f" | {_best_acc(res):.1%} ({res['curve'][-1][0]}) | {_cpu_per_round(res)} |"
            )
    return "\n".join(lines)


def table(results: list[dict], targets: tuple[float, ...] = TARGETS) -> str:
    per_target = [best_runs(results, t) for t in targets]
    head = "| algorithm | partition | E | B | server | "
    head += " | ".join(f"rounds to {t:.0%} [client lr] | vs FedSGD" for t in targets)
    head += " | best acc (rounds run) | CPU s per round |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    seen = {(r["experiment"]["name"], r["experiment"]["partition"]) for r in results}
    for name in ("FedSGD", "FedAvg"):
        for partition in ("noniid", "iid"):
            if (name, partition) not in seen:
                continue
            cells = []
            for best in per_target:
                res = best[(name, partition)]
                cells += [fmt_rounds(res), speedup(res, best.get(("FedSGD", partition)))]
            runs = [r for r in results if (r["experiment"]["name"], r["experiment"]["partition"]) == (name, partition)]
            top = max(runs, key=lambda r: max((a for _, a in r["curve"]), default=0.0))
            e = top["experiment"]
            c = e["client"]
            cells += [f"{_best_acc(top):.1%} ({top['curve'][-1][0]})", _cpu_per_round(top)]
            server = ", ".join(f"{k}={v}" for k, v in e["server"].items()) or "sgd, lr=1"
            epochs, batch = ("1 step", "all") if c.get("full_batch") else (c.get("local_epochs"), c.get("batch_size"))
            part = "non-IID (role)" if partition == "noniid" else "IID (balanced)"
            lines.append(f"| {name} | {part} | {epochs} | {batch} | {server} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def grid_table(results: list[dict], targets: tuple[float, ...] = TARGETS) -> str:
    """Every client learning rate tried: rounds to each target, per (algorithm, partition)."""
    lrs = sorted({r["experiment"]["client"]["lr"] for r in results if r["experiment"]["name"] in ("FedSGD", "FedAvg")})
    head = "| algorithm | partition | " + " | ".join(f"lr {lr}" for lr in lrs) + " |"
    lines = [head, "|" + " --- |" * (len(lrs) + 2)]
    for name in ("FedSGD", "FedAvg"):
        for partition in ("noniid", "iid"):
            cells = []
            for lr in lrs:
                runs = [
                    r
                    for r in results
                    if (r["experiment"]["name"], r["experiment"]["partition"], r["experiment"]["client"]["lr"])
                    == (name, partition, lr)
                ]
                if not runs:
                    cells.append("")
                    continue
                res, parts = runs[0], []
                for t in targets:
                    r = rounds_to_target(res["curve"], t)
                    parts.append(f"{r:.1f}" if r is not None else f"> {res['curve'][-1][0]}")
                cell = " / ".join(parts)
                if res.get("diverged"):
                    cell += f" (diverged, round {res['curve'][-1][0]})"
                cells.append(cell)
            if any(cells):
                part = "non-IID (role)" if partition == "noniid" else "IID (balanced)"
                lines.append(f"| {name} | {part} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[dict], targets: tuple[float, ...], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = best_runs(results, targets[0])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in ("FedSGD", "FedAvg"):  # left: the paper's comparison, best point of each lr grid
        for partition in ("noniid", "iid"):
            res = best.get((name, partition))
            if res is not None:
                rounds, accs = zip(*res["curve"], strict=True)
                style = "-" if partition == "noniid" else "--"
                label = f"{name} {partition} (client lr {res['experiment']['client']['lr']})"
                axes[0].plot(rounds, accs, style, label=label)
    for name in OPTIMIZER_ROWS:  # right: the server side on fixed clients
        for res in results:
            e = res["experiment"]
            if (e["name"], e["partition"], e["client"]["lr"]) == (name, "noniid", OPTIMIZER_CLIENT_LR):
                rounds, accs = zip(*res["curve"], strict=True)
                axes[1].plot(rounds, accs, "k-" if name == "FedAvg" else "-", lw=1.5, label=name)
    titles = (
        "FedAvg (E=5, B=10) vs FedSGD",
        f"server side on fixed clients (non-IID, client lr {OPTIMIZER_CLIENT_LR})",
    )
    for ax, title in zip(axes, titles, strict=True):
        for t in targets:
            ax.axhline(t, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_xlabel("communication round")
        ax.set_ylabel("held-out next-character accuracy")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def write_section(results: list[dict], notes: str) -> None:
    meta = results[0]
    per_round = DATA["num_clients"] // 10
    role_sizes = next((r["client_sizes"] for r in results if r["experiment"]["partition"] == "noniid"), [])
    sizes = (
        f"role clients hold {min(role_sizes)} to {max(role_sizes)} segments (median "
        f"{role_sizes[len(role_sizes) // 2]}); the IID control deals the same segments evenly, "
        f"{meta['train_segments'] // meta['clients']} or {meta['train_segments'] // meta['clients'] + 1} per client, "
        "as the paper's balanced IID set"
        if role_sizes
        else "the IID control deals the same segments evenly over the clients"
    )
    body = "\n".join(
        [
            SECTION,
            "",
            f"Command: `{COMMAND}` (results are kept in `benchmarks/shakespeare_fedavg.results.json`, runs already "
            "there are skipped; `--report-only` rebuilds this section and the plot from them).",
            "",
            f"Setup: {meta['clients']} (play, role) clients drawn (seeded) from the roles with at least "
            f"{DATA['min_train']} training segments, each capped at {DATA['max_train']} training and "
            f"{DATA['max_test']} held-out 80-character segments ({meta['train_segments']} training segments in "
            f"all; {sizes}); C = 0.1, i.e. {per_round} clients per round, weighted by example count; "
            "the paper's model (8-d embedding, 2 x LSTM 256, "
            "822k parameters); plain local SGD, no gradient clipping; accuracy is next-character accuracy on the "
            "pooled held-out segments of all clients (identical for both partitions). Rounds to target are "
            "linearly interpolated between evaluations (every round; every 5 rounds for FedSGD) and each cell "
            "is the best point of its client learning-rate grid (the chosen lr in brackets). Runs stop at "
            f"{STOP:.0%} accuracy or after their round cap.",
            "",
            table(results),
            "",
            "Every grid point, rounds to " + " / ".join(f"{t:.0%}" for t in TARGETS) + " (a run that diverged, "
            "i.e. whose held-out loss was above the uniform predictor's ln V at two evaluations in a row, stops "
            "there):",
            "",
            grid_table(results),
            "",
            f"Server optimisers and FedProx on the same non-IID clients, client side fixed (E = 5, B = 10, "
            f"SGD lr {OPTIMIZER_CLIENT_LR}); one untuned server setting each:",
            "",
            optimizer_table(results),
            "",
            "![Shakespeare FedAvg vs FedSGD](img/shakespeare_fedavg.png)",
            "",
            notes.strip(),
            "",
        ]
    )
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    start = text.find(SECTION)
    if start >= 0:
        nxt = text.find("\n## ", start + len(SECTION))
        text = text[:start] + body + (text[nxt + 1 :] if nxt >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + body
    DOC.write_text(text)


# --------------------------------------------------------------------------------------------- main


def _wanted(exp: Experiment, only: str | None) -> bool:
    return only is None or any(part in exp.key for part in only.split(","))


def _completed(pool: ProcessPoolExecutor, todo: list[Experiment]):
    futures = [pool.submit(run_experiment, exp) for exp in todo]
    for future in as_completed(futures):
        yield future.result()


def load_results() -> list[dict]:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else []


def save_results(results: list[dict]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=1, help="parallel runs (one CPU thread each)")
    parser.add_argument("--report-only", action="store_true", help="rebuild the table and plot from saved results")
    parser.add_argument("--only", default=None, help="comma-separated substrings of experiment keys to run")
    parser.add_argument("--notes", default=str(NOTES), help="a file whose text is appended under the tables")
    args = parser.parse_args()

    results = load_results()
    if not args.report_only:
        done = {r["key"] for r in results}
        todo = [e for e in experiments() if e.key not in done and _wanted(e, args.only)]
        with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
            for res in _completed(pool, todo):
                results.append(res)
                save_results(results)  # after every run, so an interrupted benchmark resumes
    notes = Path(args.notes).read_text() if Path(args.notes).is_file() else ""
    print(table(results))
    print(optimizer_table(results))
    plot(results, TARGETS, PLOT)
    write_section(results, notes)


if __name__ == "__main__":
    main()
