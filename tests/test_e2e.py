"""End-to-end federated runs on a tiny randomly initialised Llama (no download, seconds on a CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from fedtune.config import parse_config
from fedtune.core.state import load_state
from fedtune.run import rundir
from fedtune.run.session import simulate

LINES = [
    "To be, or not to be, that is the question.",
    "Whether tis nobler in the mind to suffer the slings and arrows.",
    "The quality of mercy is not strained; it droppeth as the gentle rain.",
    "All the world's a stage, and all the men and women merely players.",
    "Now is the winter of our discontent made glorious summer by this sun.",
]


def write_corpus(root: Path, clients: int = 4, paragraphs: int = 12) -> Path:
    """One .txt file per client (a natural partition), each with a different mix of lines."""
    root.mkdir(parents=True, exist_ok=True)
    for c in range(clients):
        paras = [" ".join(LINES[(c + i + j) % len(LINES)] for j in range(3)) for i in range(paragraphs)]
        (root / f"speaker_{c}.txt").write_text("\n\n".join(paras))
    return root


def tiny_config(tmp_path: Path, **over: object) -> dict:
    cfg = {
        "seed": 3,
        "model": {
            "name": "tiny-llama",
            "max_length": 32,
            "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        },
        "data": {"source": "text", "path": str(write_corpus(tmp_path / "corpus"))},
        "federation": {"rounds": 3, "clients_per_round": 2},
        "client": {"local_steps": 4, "batch_size": 4, "lr": 0.05},
        "eval": {"batch_size": 8},
        "run": {"out_dir": str(tmp_path / "runs"), "name": "tiny", "plot": True},
    }
    for key, value in over.items():
        section, field = key.split("__")
        cfg.setdefault(section, {})[field] = value
    return cfg


def quiet() -> Console:
    return Console(quiet=True)


def test_federated_lora_run_lowers_loss_and_writes_run_dir(tmp_path: Path) -> None:
    result = simulate(parse_config(tiny_config(tmp_path)), console=quiet(), show_progress=False)
    rounds = result.rounds
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    assert rounds[-1]["eval_loss"] < rounds[0]["eval_loss"] - 0.05
    assert rounds[-1]["eval_perplexity"] == pytest.approx(np.exp(rounds[-1]["eval_loss"]), rel=1e-6)
    run_dir = result.run_dir
    for name in (rundir.CONFIG, rundir.METRICS, rundir.CHECKPOINT, rundir.PLOT, rundir.SUMMARY):
        assert (run_dir / name).is_file(), name
    lines = [json.loads(x) for x in (run_dir / rundir.METRICS).read_text().splitlines()]
    clients = [x for x in lines if x["kind"] == "client"]
    assert len(clients) == 3 * 2 and all(c["bytes_up"] > 0 and c["num_examples"] > 0 for c in clients)
    assert {x["kind"] for x in lines} >= {"round", "client", "eval_client"}
    assert load_state(run_dir / rundir.CHECKPOINT).round == 3


def test_resume_equals_uninterrupted(tmp_path: Path) -> None:
    full = simulate(
        parse_config(tiny_config(tmp_path / "a", federation__rounds=4)), console=quiet(), show_progress=False
    )
    # "crash" after round 2: run 2 rounds, leave a torn half-written round 3 in the metrics, then resume
    part_cfg = tiny_config(tmp_path / "b", federation__rounds=2)
    part = simulate(parse_config(part_cfg), console=quiet(), show_progress=False)
    with open(part.run_dir / rundir.METRICS, "a") as fh:
        fh.write(json.dumps({"kind": "round", "round": 3, "eval_loss": 0.0}) + '\n{"kind": "cli')
    resumed_cfg = parse_config(tiny_config(tmp_path / "b", federation__rounds=4))
    resumed = simulate(resumed_cfg, resume_dir=part.run_dir, console=quiet(), show_progress=False)
    np.testing.assert_array_equal(resumed.state.params, full.state.params)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert strip(resumed.rounds) == strip(full.rounds)


def test_weighting_changes_the_result(tmp_path: Path) -> None:
    """Clients hold different amounts of data, so example weighting and uniform weighting must differ."""
    base = tiny_config(tmp_path, federation__rounds=1)
    corpus = tmp_path / "corpus"
    (corpus / "speaker_0.txt").write_text("\n\n".join([" ".join(LINES)] * 40))  # a much larger client
    base["federation"]["clients_per_round"] = 4
    a = simulate(parse_config(base), console=quiet(), show_progress=False)
    base["server"] = {"weighting": "uniform"}
    base["run"]["out_dir"] = str(tmp_path / "runs2")
    b = simulate(parse_config(base), console=quiet(), show_progress=False)
    assert np.abs(a.state.params - b.state.params).max() > 1e-5


def test_a_run_that_fails_to_start_leaves_no_run_directory(tmp_path: Path) -> None:
    """Data that cannot be loaded is a clear error naming the path, and no half-made run directory remains."""
    from fedtune.errors import FedtuneError

    missing = tmp_path / "no-such-corpus"
    config = parse_config(tiny_config(tmp_path, data__path=str(missing)))
    with pytest.raises(FedtuneError, match="no-such-corpus"):
        simulate(config, console=quiet(), show_progress=False)
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(runs.iterdir())
