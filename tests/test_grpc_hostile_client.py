"""An enrolled but hostile client over gRPC (issue #13 item 2): real ``fedtune server`` and ``fedtune client``
processes on 127.0.0.1 with mutual TLS, and a participant that answers every round with a finite update of
1e30s claiming 10^12 examples (``grpc_fault_client.py inflate``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from _grpc_support import REPO, client_args, deployment_section, digits_data, find_run_dir, free_port
from _models import DIGITS_CNN
from fedtune.core.state import load_state

pytestmark = pytest.mark.timeout(900)  # an upper bound for a loaded machine, not a speed test
FAULT_CLIENT = str(REPO / "tests" / "grpc_fault_client.py")


def _config(tmp: Path, pki: Path, port: int, *, clients: int, rounds: int) -> Path:
    cfg = {
        "seed": 5,
        "model": DIGITS_CNN,
        "data": digits_data(3),
        "federation": {"rounds": rounds, "clients_per_round": clients},
        "client": {"local_steps": 10, "batch_size": 16, "lr": 0.01},
        "eval": {"every": 100, "baseline": False, "max_examples_per_client": 20},
        "run": {"out_dir": str(tmp / "runs"), "plot": False, "threads": 1},
        # the server's defaults: update_norm_bound and max_examples_per_client "auto" (adaptive in a deployment)
        "deployment": deployment_section(pki, port, min_clients=clients),
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_an_inflating_client_cannot_destroy_the_model_and_honest_clients_finish(tmp_path, pki, procs):
    """Round 1 has no medians yet to bound it: its aggregate overflows and the round is rejected (the model
    kept, the reason logged). From round 2 the inflated count is capped and the update clipped to the round-1
    medians, so every round completes with all three clients and the model stays finite."""
    port = free_port()
    procs.cli("server", "server", str(_config(tmp_path, pki, port, clients=3, rounds=3)))
    for name in ("client_000", "client_001"):
        procs.cli(name, "client", *client_args(port, pki, name))
    procs.start("hostile", [FAULT_CLIENT, "inflate", *client_args(port, pki, "client_002")])
    try:
        assert procs.wait("server", 600) == 0
        for name in ("client_000", "client_001", "hostile"):
            assert procs.wait(name, 120) == 0, name
    except AssertionError:
        print(procs.logs())
        raise
    run_dir = find_run_dir(tmp_path)
    records = _records(run_dir)
    rounds = {r["round"]: r for r in records if r["kind"] == "round"}
    assert sorted(rounds) == [1, 2, 3]
    assert rounds[1]["status"] == "failed" and "not finite" in rounds[1]["reason"]
    assert all("status" not in rounds[r] and rounds[r]["clients_ok"] == 3 for r in (2, 3))
    hostile = [r for r in records if r["kind"] == "client" and r["client_id"] == "client_002" and r["round"] >= 2]
    assert len(hostile) == 2
    for r in hostile:  # weighted at most 3x the previous round's median count, scaled to 3x its median norm
        assert r["examples_capped_from"] == 10**12 and r["num_examples"] < 10_000 and r["update_clipped"] == 1
    state = load_state(run_dir / "checkpoint.safetensors")
    assert state.round == 3 and np.isfinite(state.params).all() and np.abs(state.params).max() < 100
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and summary["rounds_failed"] == [1]
    assert "round 1 rejected: the aggregated model is not finite" in procs.log("server")
    for name in ("client_000", "client_001"):
        assert "federation finished after round 3" in procs.log(name)


def test_a_server_whose_every_round_is_rejected_exits_non_zero(tmp_path, pki, procs):
    """A federation of one hostile client: no median can bound it, every aggregate is rejected, and
    ``fedtune server`` exits 4 (no round completed) saying so (the model on disk is the initial one, finite)."""
    port = free_port()
    procs.cli("server", "server", str(_config(tmp_path, pki, port, clients=1, rounds=2)))
    procs.start("hostile", [FAULT_CLIENT, "inflate", *client_args(port, pki, "client_002")])
    try:
        assert procs.wait("server", 600) == 4  # EXIT_NO_ROUND, not a config error (2)
    except AssertionError:
        print(procs.logs())
        raise
    log = " ".join(procs.log("server").split())  # the console wraps long lines
    assert "error: none of rounds 1-2 could be completed" in log and "the global model is unchanged" in log
    state = load_state(find_run_dir(tmp_path) / "checkpoint.safetensors")
    assert state.round == 2 and np.isfinite(state.params).all()
