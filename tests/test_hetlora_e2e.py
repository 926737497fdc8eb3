"""HetLoRA with self-pruning and sparsity weighting, and fine-tuning at each client's rank, through
``simulate`` (tiny-llama): a resumed run equals an uninterrupted one (the pruned ranks live in the server
state), and ``fedtune export --client ID --finetuned`` writes that client's adapter at its own rank, which
plain peft and plain transformers load as the model the client evaluated."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from fedtune.cli import app
from fedtune.config import parse_config
from fedtune.core.state import load_state
from fedtune.run.session import simulate
from fedtune.server.strategies.lora_ranks import PRUNED_PREFIX

pytestmark = pytest.mark.timeout(600)
RANKS = {"speaker_0": 2, "speaker_1": 4, "speaker_2": 4}


def config(tmp_path: Path, out: str, *, rounds: int):
    corpus = tmp_path / "corpus"
    if not corpus.exists():
        corpus.mkdir(parents=True)
        lines = ["To be, or not to be, that is the question.", "All the world's a stage, and all the men players."]
        for c in range(3):
            (corpus / f"speaker_{c}.txt").write_text(
                "\n\n".join(" ".join(lines[(c + i) % 2] for _ in range(3)) for i in range(8))
            )
    return parse_config(
        {
            "seed": 2,
            "model": {
                "name": "tiny-llama",
                "max_length": 32,
                "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
            },
            "data": {"source": "text", "path": str(corpus)},
            "federation": {"rounds": rounds, "clients_per_round": 3},
            "client": {"local_steps": 3, "batch_size": 4, "lr": 0.05},
            "eval": {"batch_size": 8, "baseline": False},
            "server": {
                "lora_aggregation": "hetlora",
                "lora_client_ranks": RANKS,
                "hetlora": {"prune_gamma": 0.5, "prune_lambda": 5.0, "aggregation": "sparsity"},
            },
            "personalization": {"finetune_steps": 2},
            "run": {"out_dir": str(tmp_path / out), "plot": False, "threads": 1},
        }
    )


def run(cfg, resume_dir: Path | None = None):
    return simulate(cfg, resume_dir=resume_dir, show_progress=False, console=Console(file=io.StringIO()))


def rounds(run_dir: Path, *, last: int) -> list[dict]:
    """The round lines without timings; before ``last``, without what a shorter run's own last round adds
    (its fine-tuned figures, and the per-client means reported beside them)."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    skip = ("seconds", "fit_seconds")
    return [
        {
            k: v
            for k, v in r.items()
            if k not in skip and (r["round"] == last or ("finetuned" not in k and "client_mean" not in k))
        }
        for r in lines
        if r["kind"] == "round"
    ]


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run(config(tmp_path_factory.mktemp("het"), "whole", rounds=3)).run_dir


def test_pruned_ranks_survive_resume_and_the_run_equals_an_uninterrupted_one(whole: Path, tmp_path: Path) -> None:
    first = run(config(tmp_path, "parts", rounds=2)).run_dir
    resumed = run(config(tmp_path, "parts", rounds=3), resume_dir=first).run_dir
    got, expected = load_state(resumed / "checkpoint.safetensors"), load_state(whole / "checkpoint.safetensors")
    np.testing.assert_array_equal(got.params, expected.params)
    records = {k: v for k, v in expected.arrays.items() if k.startswith(PRUNED_PREFIX)}
    assert set(records) == {PRUNED_PREFIX + c for c in RANKS}
    for key, value in records.items():
        np.testing.assert_array_equal(got.arrays[key], value)
    ranks = {k.removeprefix(PRUNED_PREFIX): int(v[0]) for k, v in records.items()}
    assert all(ranks[c] <= RANKS[c] for c in RANKS) and ranks != RANKS  # (seeded) a client pruned itself
    assert rounds(resumed, last=3) == rounds(whole, last=3)
    last = rounds(whole, last=3)[-1]
    assert "agg_hetlora_mean_rank" in last and "eval_finetuned_client_mean_loss" in last


def test_export_writes_a_clients_finetuned_adapter_at_its_rank(whole: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedtune.data.cache import default_cache_dir
    from fedtune.models.hub import load_causal_lm
    from fedtune.run.personal_export import personal_task

    client = "speaker_0"
    result = CliRunner().invoke(app, ["export", str(whole), str(tmp_path / "out"), "--client", client, "--finetuned"])
    assert result.exit_code == 0, result.output
    adapter = tmp_path / "out" / "adapter"
    # its rank: the one it was assigned (2), or the one it pruned itself to, as the server recorded it
    rank = int(load_state(whole / "checkpoint.safetensors").arrays[PRUNED_PREFIX + client][0])
    assert rank <= RANKS[client] and json.loads((adapter / "adapter_config.json").read_text())["r"] == rank
    task = personal_task(whole, client, finetuned=True)  # the model the client evaluated
    ids = torch.tensor([[1, 400, 2000, 35, 9, 77]])
    with torch.no_grad():
        expected = task.module.eval()(input_ids=ids).logits
    base, _ = load_causal_lm("tiny-llama", default_cache_dir(None))
    loaded = PeftModel.from_pretrained(base, adapter).eval()
    assert all(m.r["default"] == rank for m in loaded.modules() if hasattr(m, "lora_A") and m.lora_A)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(plain(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
    shutil.rmtree(tmp_path / "out")
