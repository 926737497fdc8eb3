"""Personalisation on label-skewed AG News: per-client held-out accuracy of personalised models vs the global one.

MiniLM (all-minilm-l6-v2, LoRA r=4 on query/value of the top layer, the classifier head trained) on
``../shared/data/agnews_subset`` (4 classes), split over clients by Dirichlet(alpha) label skew; each client's
held-out set is a share of its own records, so it has the client's own label mix. Every client is
sampled every round. Each method runs once per seed; the table gives the mean over seeds of the final round's
mean-over-clients accuracy (``eval_*client_mean_accuracy``), global model and personalised model on the same
held-out examples:

    naive   FedAvg of A and B (global); also fine-tuned locally for ``finetune_steps`` after the last round
    ffa     FFA-LoRA (A frozen, B averaged; global)
    fedsa   FedSA-LoRA (A averaged, B kept per client): personalised
    fedper  FedPer, the classifier head kept per client: personalised
    ditto   Ditto (lambda 0.1): personalised

    PYTHONPATH=src HF_HUB_OFFLINE=1 nice -n 10 python benchmarks/personalization.py --seeds 0 1 [--write]
    # or one process per seed (--out), then: --table-from seed0.jsonl seed1.jsonl --write

Needs ../shared (not part of the default tests).

``--workload smollm2``: SmolLM2-135M-Instruct on the Shakespeare role split instead (the issue's "SmolLM2 role
split"; no ../shared needed): the per-client held-out loss of each method's global, personalised and
fine-tuned models, with per-seed and per-client tables (``SMOLLM2_METHODS``; FedPer keeps the top block's LoRA).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, write_section

DATA = ROOT.parent.parent / "shared" / "data" / "agnews_subset"
CLASSES = ["world", "sports", "business", "tech"]
METHODS = {
    "naive": {"server": {"lora_aggregation": "naive"}, "personalization": {"finetune_steps": 6}},
    "ffa": {"server": {"lora_aggregation": "ffa"}},
    "fedsa": {"personalization": {"method": "fedsa"}},
    "fedper": {"personalization": {"method": "fedper", "local_params": ["*classifier*"]}},
    "ditto": {"personalization": {"method": "ditto", "ditto_lambda": 0.1}},
}


def find_data() -> Path:
    for candidate in (DATA, Path("/work/shared/data/agnews_subset")):
        if (candidate / "train.csv").is_file():
            return candidate
    raise SystemExit(f"AG News subset not found at {DATA}: this benchmark needs ../shared/data")


def write_subset(out: Path, rows: int) -> Path:
    """The first ``rows`` training rows as a text,label CSV with class names."""
    with (find_data() / "train.csv").open(newline="") as fh:
        records = [(text, CLASSES[int(label)]) for text, label in csv.reader(fh)][:rows]
    path = out / "agnews.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows(records)
    return path


# --workload smollm2: SmolLM2-135M-Instruct on the Shakespeare role split (one client per (play, role), each
# role's last 20% of speeches held out): the "SmolLM2 role split", sized for a shared 2-core CPU.
# No classifier head, so FedPer keeps the top block's LoRA (layer 29) on each client instead.
SMOLLM2_METHODS = {
    "naive": {"server": {"lora_aggregation": "naive"}, "personalization": {"finetune_steps": 4}},
    "ffa": {"server": {"lora_aggregation": "ffa"}},
    "fedsa": {"personalization": {"method": "fedsa"}},
    "fedper": {"personalization": {"method": "fedper", "local_params": ["*layers.29.*"]}},
    "ditto": {"personalization": {"method": "ditto", "ditto_lambda": 0.1}},
    # Ditto with a 10x and 100x stronger pull toward the global model (lambda is tuned per task in Li et al. 2021)
    "ditto_lam1": {"personalization": {"method": "ditto", "ditto_lambda": 1.0}},
    "ditto_lam10": {"personalization": {"method": "ditto", "ditto_lambda": 10.0}},
}
SMOLLM2_PLAYS = ["hamlet", "macbeth", "othello"]


def smollm2_config(out: Path, method: str, seed: int, args: argparse.Namespace) -> dict:
    spec = SMOLLM2_METHODS[method]
    return {
        "seed": seed,
        "model": {
            "kind": "causal_lm",
            "name": "smollm2-135m-instruct",
            "max_length": 32,
            "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "top_layers": 2},
        },
        "data": {
            "source": "shakespeare",
            "plays": SMOLLM2_PLAYS,
            "max_clients": args.clients,
            "min_train_examples": 8,
            "max_examples_per_client": 48,
        },
        "federation": {"rounds": args.rounds, "clients_per_round": args.clients},
        "client": {"local_steps": args.steps, "batch_size": 4, "lr": 5e-3},
        "server": spec.get("server", {}),
        "eval": {"baseline": False, "every": args.rounds, "max_examples_per_client": args.eval_examples},
        "personalization": spec.get("personalization", {}),
        "run": {"out_dir": str(out), "plot": False, "threads": 1},
    }


def config(data: Path, out: Path, method: str, seed: int, args: argparse.Namespace) -> dict:
    if args.workload == "smollm2":
        return smollm2_config(out, method, seed, args)
    spec = METHODS[method]
    return {
        "seed": seed,
        "model": {
            "kind": "classification",
            "name": "all-minilm-l6-v2",
            "max_length": 24,
            "lora": {"r": 4, "alpha": 8, "target_modules": ["query", "value"], "top_layers": 1},
        },
        "data": {
            "source": "classification",
            "path": str(data),
            "partition": {"kind": "dirichlet_labels", "alpha": args.alpha, "num_clients": args.clients},
            "test_fraction": 0.3,
        },
        "federation": {"rounds": args.rounds, "clients_per_round": args.clients},
        "client": {"local_steps": args.steps, "batch_size": 8, "lr": 5e-3},
        "server": spec.get("server", {}),
        "eval": {"baseline": False, "every": args.rounds, "max_examples_per_client": args.eval_examples},
        "personalization": spec.get("personalization", {}),
        "run": {"out_dir": str(out), "plot": False, "threads": 1},
    }


def final_round(run_dir: Path) -> dict:
    """The last round line, with that round's per-client evaluation lines under ``clients``."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in lines if r["kind"] == "round"][-1]
    clients = [r for r in lines if r["kind"] == "eval_client" and r.get("round") == last["round"]]
    return {**last, "clients": clients}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=["agnews", "smollm2"], default="agnews")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", nargs="+", help="default: every method of the workload")
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--eval-examples", type=int, default=20, help="held-out examples per client")
    parser.add_argument("--write", action="store_true", help="replace the section in docs/BENCHMARKS.md")
    parser.add_argument("--out", type=Path, help="append each run's final round (a JSON line) to this file")
    parser.add_argument("--table-from", type=Path, nargs="+", help="only render (and --write) the table of saved runs")
    args = parser.parse_args()
    args.methods = args.methods or list(SMOLLM2_METHODS if args.workload == "smollm2" else METHODS)
    if args.table_from:
        results: dict[str, list[dict]] = {}
        for path in args.table_from:
            for line in path.read_text().splitlines():
                rec = json.loads(line)
                results.setdefault(rec["method"], []).append(rec)
        args.seeds = sorted({r["seed"] for recs in results.values() for r in recs})
        publish(results, args)
        return

    from fedtune.config.load import parse_config
    from fedtune.run.session import simulate

    results: dict[str, list[dict]] = {m: [] for m in args.methods}
    with tempfile.TemporaryDirectory() as tmp:
        data = write_subset(Path(tmp), args.rows) if args.workload == "agnews" else Path(tmp)
        for seed in args.seeds:
            for method in args.methods:
                started, load_start = time.perf_counter(), os.getloadavg()[0]
                stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
                cfg = parse_config(config(data, Path(tmp) / "runs", method, seed, args))
                run = simulate(cfg, console=Console(file=io.StringIO()), show_progress=False)
                rec = final_round(run.run_dir)
                rec = {"method": method, "seed": seed, **rec, "wall_s": time.perf_counter() - started}
                # when and at what load (1-minute average at start and end): wall_s is load, not cost
                rec |= {"started": stamp, "load_start": load_start, "load_end": os.getloadavg()[0]}
                results[method].append(rec)
                print(json.dumps(rec), flush=True)
                if args.out is not None:
                    with args.out.open("a") as fh:
                        fh.write(json.dumps(rec) + "\n")
    publish(results, args)


SMOLLM2_TITLE = "Personalisation on the SmolLM2 role split (FedSA-LoRA, Ditto, local fine-tuning)"


def publish(results: dict[str, list[dict]], args: argparse.Namespace) -> None:
    results = {m: recs for m, recs in results.items() if recs}
    table = render_smollm2(results, args) if args.workload == "smollm2" else render(results, args)
    print(table)
    if args.write:
        title = "Personalisation (FedSA-LoRA, FedPer, Ditto, local fine-tuning) on label-skewed AG News"
        write_section(SMOLLM2_TITLE if args.workload == "smollm2" else title, table)


VARIANTS = {"global": "", "personalised": "personal_", "fine-tuned": "finetuned_"}  # eval_client line prefixes


def _client_losses(rec: dict, prefix: str) -> dict[str, float]:
    """Each evaluated client's held-out loss (mean over its tokens) for one variant of one run."""
    return {c["client_id"]: c[f"{prefix}loss"] for c in rec["clients"] if f"{prefix}loss" in c}


def _mean_sd(values: list[float], digits: int = 3) -> str:
    if not values:
        return "-"
    spread = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.{digits}f}{spread}"


def render_smollm2(results: dict[str, list[dict]], args: argparse.Namespace) -> str:
    """Client-mean held-out loss (and the perplexity of that mean) per method and variant; per seed; per client."""
    seeds = sorted({r["seed"] for recs in results.values() for r in recs})
    head = "| method | " + " | ".join(f"{v}, client-mean loss (ppl)" for v in VARIANTS)
    rows = [head + " | clients better than naive's global model | bytes up / round | s / run |", "| --- " * 7 + "|"]
    for method, recs in results.items():
        cells = []
        for prefix in VARIANTS.values():
            means = [statistics.mean(c.values()) for r in recs if (c := _client_losses(r, prefix))]
            cells.append(f"{_mean_sd(means)} ({math.exp(statistics.mean(means)):.1f})" if means else "-")
        naive = {r["seed"]: _client_losses(r, "") for r in results.get("naive", [])}  # the plain global model
        better = [
            (own[c] < naive[r["seed"]][c])
            for r in recs
            if (own := _client_losses(r, "personal_") or _client_losses(r, "finetuned_")) and r["seed"] in naive
            for c in own
            if c in naive[r["seed"]]
        ]
        wins = f"{sum(better)} of {len(better)}" if better else "-"
        bytes_up = statistics.mean(r["bytes_up"] for r in recs)
        wall = statistics.mean(r["wall_s"] for r in recs)
        rows.append(f"| {method} | {' | '.join(cells)} | {wins} | {bytes_up:,.0f} | {wall:.0f} |")
    per_seed = [
        "| method, variant | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "| --- " * (len(seeds) + 1) + "|",
    ]
    for method, recs in results.items():
        by_seed = {r["seed"]: r for r in recs}
        for variant, prefix in VARIANTS.items():
            vals = [_client_losses(by_seed[s], prefix) if s in by_seed else {} for s in seeds]
            if any(vals):
                cells = [f"{statistics.mean(v.values()):.4f}" if v else "-" for v in vals]
                per_seed.append(f"| {method}, {variant} | {' | '.join(cells)} |")
    columns = [(m, v, p) for m in results for v, p in VARIANTS.items() if any(_client_losses(r, p) for r in results[m])]
    clients = sorted({c for recs in results.values() for r in recs for c in _client_losses(r, "")})
    per_client = [
        "| client | " + " | ".join(f"{m} {v}" for m, v, _ in columns) + " |",
        "| --- " * (len(columns) + 1) + "|",
    ]
    for client in clients:
        cells = []
        for method, _, prefix in columns:
            vals = [x[client] for r in results[method] if client in (x := _client_losses(r, prefix))]
            cells.append(f"{statistics.mean(vals):.3f}" if vals else "-")
        per_client.append(f"| {client} | {' | '.join(cells)} |")
    records = " ".join(_repo_path(p) for p in args.table_from or []) or "(this run's output)"
    command = (
        "PYTHONPATH=src HF_HUB_OFFLINE=1 python benchmarks/personalization.py --workload smollm2 --seeds "
        f"{' '.join(map(str, seeds))} --methods {' '.join(results)} --clients {args.clients} --rounds {args.rounds} "
        f"--steps {args.steps} --eval-examples {args.eval_examples}\n"
        f"# run here one process per (method, seed) (--out); the records: {records}\n"
        f"# rendered with --table-from {records} (and the same options); the section holds two budgets,\n"
        "# so the printed table was pasted (--write would replace the whole section)"
    )
    setup = (
        f"SmolLM2-135M-Instruct, LoRA r=4 (alpha 8) on q_proj/v_proj of the top 2 blocks; Shakespeare role split "
        f"({', '.join(SMOLLM2_PLAYS)}; the {args.clients} roles with most text, one client per (play, role), each "
        "role's last 20% of speeches held out, at most 48 training blocks of 32 tokens a role); every role every "
        f"round, {args.rounds} rounds x {args.steps} local AdamW steps of 4 blocks (lr 5e-3); at most "
        f"{args.eval_examples} held-out blocks per role. {len(seeds)} seed(s). Loss: held-out cross-entropy per "
        "token (nats), mean over clients of each client's own loss (mean ± standard deviation over seeds; the "
        "perplexity in brackets is exp of that mean). Global, personalised and fine-tuned columns are measured on "
        "the same held-out blocks in the same run. fedsa's 'global' model holds B = 0 (it is the base model: "
        "only A is shared), so fedsa is compared with the naive and ffa global models. 'clients better than "
        "naive's global model': (seed, client) pairs where the client's personalised (naive: fine-tuned) loss is "
        "below the loss of naive averaging's global model of the same seed (Ditto's global model is that model). "
        f"Methods: {_smollm2_methods(results)}."
    )
    return (
        f"{setup}\n\n```\n{command}\n```\n\n"
        + "\n".join(rows)
        + "\n\nPer seed (client-mean loss):\n\n"
        + "\n".join(per_seed)
        + "\n\nPer client (held-out loss, mean over seeds):\n\n"
        + "\n".join(per_client)
        + _when(results)
    )


def _repo_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _smollm2_methods(results: dict[str, list[dict]]) -> str:
    """What each rendered method's section of SMOLLM2_METHODS sets (Ditto's lambda and personal steps)."""
    out = []
    for method in results:
        p = SMOLLM2_METHODS[method].get("personalization", {})
        if p.get("method") == "ditto":
            steps = p.get("ditto_steps", "local_steps (as many as the global model's)")
            out.append(f"{method}: Ditto, lambda {p['ditto_lambda']}, personal steps per round {steps}")
        elif p.get("method") == "fedper":
            names = ", ".join(f"`{n}`" for n in p["local_params"])
            out.append(f"{method}: FedPer, local {names}")
        elif p.get("method") == "fedsa":
            out.append(f"{method}: FedSA-LoRA (B local)")
        else:
            mode = SMOLLM2_METHODS[method].get("server", {}).get("lora_aggregation", "naive")
            tune = f", then {p['finetune_steps']} fine-tuning steps" if p.get("finetune_steps") else ""
            out.append(f"{method}: {mode} LoRA averaging{tune}")
    return "; ".join(out)


def _when(results: dict[str, list[dict]]) -> str:
    """When the records were measured and the 1-minute load average at each run's start and end."""
    recs = [r for recs in results.values() for r in recs if "started" in r]
    if not recs:
        return ""
    loads = [x for r in recs for x in (r["load_start"], r["load_end"])]
    starts = sorted(r["started"] for r in recs)
    return (
        f"\n\nRuns started {starts[0]} to {starts[-1]}; 1-minute load average at run start/end "
        f'{min(loads):.1f}-{max(loads):.1f} ("s / run" is load, not cost).'
    )


def _mean(values: list[float]) -> str:
    if not values:
        return "-"
    spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.3f}{spread}"


COLUMNS = {  # header -> round-record key; client mean: the mean over clients of each client's own accuracy
    "global, client mean": "eval_client_mean_accuracy",
    "personalised, client mean": "eval_personal_client_mean_accuracy",
    "fine-tuned after federation, client mean": "eval_finetuned_client_mean_accuracy",
    "global, pooled": "eval_accuracy",
    "personalised, pooled": "eval_personal_accuracy",
    "fine-tuned, pooled": "eval_finetuned_accuracy",
}


def render(results: dict[str, list[dict]], args: argparse.Namespace) -> str:
    rows = [
        "| method | " + " | ".join(COLUMNS) + " | bytes up / round | s / run |",
        "| --- " * (len(COLUMNS) + 3) + "|",
    ]
    for method, recs in results.items():
        cells = [_mean([r[k] for r in recs if k in r]) for k in COLUMNS.values()]
        bytes_up = statistics.mean(r["bytes_up"] for r in recs)
        wall = statistics.mean(r["wall_s"] for r in recs)
        rows.append(f"| {method} | {' | '.join(cells)} | {bytes_up:,.0f} | {wall:.0f} |")
    command = (
        f"PYTHONPATH=src HF_HUB_OFFLINE=1 nice -n 10 python benchmarks/personalization.py --seeds "
        f"{' '.join(map(str, args.seeds))} --alpha {args.alpha} --clients {args.clients} --rounds {args.rounds} "
        f"--steps {args.steps} --rows {args.rows} --eval-examples {args.eval_examples} --write"
    )
    setup = (
        f"MiniLM + LoRA r=4 (query/value, top layer) + classifier head; AG News first {args.rows} training rows, "
        f"Dirichlet alpha {args.alpha} label skew over {args.clients} clients (30% of each client's records held out), "
        f"all clients every round, {args.rounds} rounds x {args.steps} local steps of 8 (max 24 tokens), "
        f"at most {args.eval_examples} held-out examples per client; {len(args.seeds)} seed(s), "
        "mean ± standard deviation over seeds of the final round's mean over clients of each client's accuracy. "
        "Global and personalised columns are measured on the same held-out examples in the same run. FedSA's and "
        "FedPer's 'global model' holds the local parts at their initial values (B = 0, a fresh head): it is not "
        "meant to be used alone."
    )
    return f"{setup}\n\n```\n{command}\n```\n\n" + "\n".join(rows)


if __name__ == "__main__":
    main()
