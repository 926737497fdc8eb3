"""Downlink bytes per client and round in real ``fedtune.simulate`` runs: naive averaging against fedex.

A random-weight Llama of SmolLM2-135M's shape cut to 8 blocks (hidden 576, 9 query / 3 key-value heads of 64,
vocab 49,152, SmolLM2's tokenizer) with the demo's adapter (r = 8 on q/k/v/o of the top 8 blocks: 245,760
float32 values, the demo's SmolLM2 adapter exactly; the blocks below carry no adapter, so they change no byte
sent). N clients with a few lines of text each, K of them a round, one local step. The figures are the ``bytes_down``
each run reports (the adapter vector and strategy arrays of every fit, as the in-process transport counts
what a network would carry), per fitting client. "dense (before)" is what the same fits carried before the
residual travelled as increments: the adapter plus every module's dense (out, in) residual.

    nice -n 10 .venv/bin/python benchmarks/lora_downlink_run.py --runs 4/4/4 20/20/3 4/20/12

``--residual-rank Q`` compares instead exact fedex with fedex under ``server.lora_residual_rank: Q`` (each
round's increment capped at rank Q, the rest held back on the server: docs/STRATEGIES.md, "Capping the
increment's rank"), in the same runs' shape, and writes its own section.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_bytes_section
from _workloads import smollm2_config
from rich.console import Console

from fedtune.config import parse_config
from fedtune.data.cache import default_cache_dir
from fedtune.models.hub import resolve_model
from fedtune.run.session import simulate
from fedtune.server.strategies.lora import RESIDUAL_PREFIX

MB = 1e6
LINES = ["To be, or not to be, that is the question.", "All the world's a stage, and all the men merely players."]


def smollm2_shaped(folder: Path) -> Path:
    """A random 8-block SmolLM2-135M-shaped Llama with SmolLM2's tokenizer (that of ``tiny-llama``)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("tiny-llama", default_cache_dir(None)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = smollm2_config(8, len(tokenizer), pad_token_id=pad)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def corpus(folder: Path, population: int) -> Path:
    folder.mkdir(parents=True)
    for c in range(population):
        text = "\n\n".join(" ".join(LINES[(c + i) % 2] for _ in range(3)) for i in range(6))
        (folder / f"speaker_{c:02d}.txt").write_text(text)
    return folder


def one_run(
    model: Path, data: Path, out: Path, mode: str, k: int, rounds: int, residual_rank: int | None = None
) -> list[dict]:
    """Per trained round: bytes sent down per fitting client, and the adapter's and dense residual's bytes."""
    label = mode if residual_rank is None else f"{mode}-q{residual_rank}"
    raw = {
        "seed": 1,
        "model": {
            "name": str(model),
            "max_length": 32,
            "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "top_layers": 8},
        },
        "data": {"source": "text", "path": str(data)},
        "federation": {"rounds": rounds, "clients_per_round": k},
        "client": {"local_steps": 1, "batch_size": 2, "lr": 0.01},
        "eval": {"baseline": False, "every": 1000, "max_clients": 1, "max_examples_per_client": 2},
        "server": {"lora_aggregation": mode, "lora_residual_rank": residual_rank},
        "simulation": {"client_state": f"memory:downlink-{label}-{data.name}"},
        "run": {"out_dir": str(out / f"{label}-{data.name}"), "plot": False, "threads": 1},
    }
    result = simulate(parse_config(raw), console=Console(quiet=True), show_progress=False)
    adapter = result.state.params.nbytes
    dense = sum(v.nbytes for key, v in result.state.arrays.items() if key.startswith(RESIDUAL_PREFIX))
    return [
        {"round": r["round"], "per_client": r["bytes_down"] / r["clients_ok"], "adapter": adapter, "dense": dense}
        for r in result.rounds
        if r["round"] > 0 and r["clients_ok"]
    ]


def measure(specs: list[str], modes: list[tuple[str, int | None]]) -> Iterator[tuple[int, int, int, list[list[dict]]]]:
    """Per K/N/R spec: K, N, R and one ``one_run`` per (mode, residual rank), on one model and corpus."""
    with tempfile.TemporaryDirectory() as tmp:
        model = smollm2_shaped(Path(tmp) / "model")
        for spec in specs:
            k, population, rounds = map(int, spec.split("/"))
            data = corpus(Path(tmp) / f"corpus-{k}-of-{population}", population)
            results = [one_run(model, data, Path(tmp), mode, k, rounds, residual_rank=q) for mode, q in modes]
            yield k, population, rounds, results


def _row(who: str, round_label: str, naive: float, fedex: dict) -> str:
    before = fedex["adapter"] + fedex["dense"]
    return (
        f"| {who} | {round_label} | {naive / MB:.3f} | {before / MB:.2f} ({before / naive:.1f}x) "
        f"| {fedex['per_client'] / MB:.2f} ({fedex['per_client'] / naive:.1f}x) |"
    )


CAPPED_INTRO = """The runs above (a random-weight SmolLM2-135M-shaped Llama cut to 8 blocks, the demo's adapter:
r = 8 on q/k/v/o of the top 8 blocks, 245,760 float32 values; N clients, K of them a round, one local step),
three per shape: naive averaging, exact fedex, and fedex with ``server.lora_residual_rank`` Q (each round's
increment capped at rank Q, the rest held back on the server). The figures are the ``bytes_down`` each run
reports per fitting client (the adapter vector and strategy arrays of every fit)."""


def _capped_row(who: str, round_label: str, naive: float, exact: float, capped: float) -> str:
    return (
        f"| {who} | {round_label} | {naive / MB:.3f} | {exact / MB:.2f} ({exact / naive:.1f}x) "
        f"| {capped / MB:.2f} ({capped / naive:.1f}x) |"
    )


def capped_main(args: argparse.Namespace) -> None:
    """--residual-rank Q: per run and round, naive against exact fedex against fedex capped at rank Q."""
    q = args.residual_rank
    load = [os.getloadavg()[0]]
    rows = [
        f"| K of N | round | naive MB | fedex exact (x naive) | fedex, lora_residual_rank {q} (x naive) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for k, population, rounds, (naive, exact, capped) in measure(
        args.runs, [("naive", None), ("fedex", None), ("fedex", q)]
    ):
        load.append(os.getloadavg()[0])
        who = f"{k} of {population}"
        for n, e, c in zip(naive, exact, capped, strict=True):
            rows.append(_capped_row(who, str(c["round"]), n["per_client"], e["per_client"], c["per_client"]))
        if rounds > 2:  # rounds 2..R together
            means = [sum(r["per_client"] for r in run[1:]) / (len(run) - 1) for run in (naive, exact, capped)]
            rows.append(_capped_row(who, f"2-{rounds} mean", *means))
    table = "\n".join(rows)
    print(table)
    if args.write:
        runs = " ".join(args.runs)
        script = "nice -n 10 .venv/bin/python benchmarks/lora_downlink_run.py"
        command = f"{script} --runs {runs} --residual-rank {q} --write"
        title = "Downlink of the rank-capped exact LoRA modes in simulate runs"
        write_bytes_section(title, command, "\n\n" + CAPPED_INTRO, table, load)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--runs", nargs="+", default=["4/4/4", "20/20/3", "4/20/12"], help="K/N/R: K of N clients a round, R rounds"
    )
    parser.add_argument("--residual-rank", type=int, help="compare exact fedex with server.lora_residual_rank Q")
    parser.add_argument("--write", action="store_true", help="replace the docs/BENCHMARKS.md section")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.residual_rank is not None:
        capped_main(args)
        return
    load = [os.getloadavg()[0]]
    rows = [
        "| K of N | round | naive MB | fedex dense residual, before (x naive) | fedex now (x naive) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for k, population, rounds, (naive, fedex) in measure(args.runs, [("naive", None), ("fedex", None)]):
        load.append(os.getloadavg()[0])
        for n, f in zip(naive, fedex, strict=True):
            rows.append(_row(f"{k} of {population}", str(f["round"]), n["per_client"], f))
        later = fedex[1:]  # rounds 2..R together: every round's fits, all bytes over all fitting clients
        if len(later) > 1:
            mean = sum(f["per_client"] for f in later) / len(later)
            rows.append(
                _row(
                    f"{k} of {population}",
                    f"2-{rounds} mean",
                    naive[-1]["per_client"],
                    {**later[0], "per_client": mean},
                )
            )
    table = "\n".join(rows)
    print(table)
    if args.write:
        command = f"nice -n 10 .venv/bin/python benchmarks/lora_downlink_run.py --runs {' '.join(args.runs)} --write"
        write_bytes_section("Downlink of the exact LoRA modes in simulate runs", command, __doc__, table, load)


if __name__ == "__main__":
    main()
