"""FedPer over real ``fedtune server`` / ``fedtune client`` processes: each participant keeps its local head in its
own cache (never on the server), reports its personalised metric beside the global one, and the networked run
matches the in-process simulation of the same configuration."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from _grpc_support import (
    deployment_section,
    digits_data,
    free_port,
    make_pki,
    run_deployment,
)
from _models import DIGITS_CNN
from fedtune.config import parse_config
from fedtune.core.state import load_state
from fedtune.run.session import simulate

pytestmark = [pytest.mark.slow]  # three processes training on a loaded machine
CLIENTS = ("client_000", "client_001")


def _config(tmp: Path, pki: Path, port: int) -> dict:
    return {
        "seed": 3,
        "model": DIGITS_CNN,
        "data": digits_data(2),
        "federation": {"rounds": 2, "clients_per_round": 2},
        "client": {"local_steps": 10, "batch_size": 16, "lr": 0.01},
        "eval": {"every": 1, "max_examples_per_client": 40, "baseline": False},
        "personalization": {"method": "fedper", "local_params": ["head.4.*"]},
        "run": {"out_dir": str(tmp / "runs"), "plot": False, "threads": 1},
        "deployment": deployment_section(pki, port, min_clients=2),
    }


def test_fedper_over_grpc_keeps_heads_in_each_participants_cache(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki-root")
    port = free_port()
    cfg = _config(tmp_path, pki, port)
    run_dir = run_deployment(tmp_path, cfg, CLIENTS, port, pki, server_s=300)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in lines if r["kind"] == "round"][-1]
    assert "eval_personal_accuracy" in last and "eval_client_mean_accuracy" in last
    assert not (run_dir / "client_state" / "personal-local").exists()  # the server holds no client's head
    for name in CLIENTS:
        heads = list((tmp_path / f"cache-{name}" / "client_state").glob("*/personal-local/*/r*.safetensors"))
        assert heads, f"{name} kept no local head in its cache"

    sim = parse_config({**cfg, "run": {**cfg["run"], "out_dir": str(tmp_path / "sim")}})
    expected = simulate(sim, show_progress=False)
    # gRPC folds replies in arrival order, the simulation in sampled order: the last float bits may differ
    np.testing.assert_allclose(
        load_state(run_dir / "checkpoint.safetensors").params, expected.state.params, rtol=1e-4, atol=2e-5
    )
    sim_last = [r for r in expected.rounds if r["round"] == 2][-1]
    assert last["eval_personal_accuracy"] == pytest.approx(sim_last["eval_personal_accuracy"], abs=0.03)
