"""Heterogeneous LoRA ranks over real ``fedtune server`` / ``fedtune client`` processes (mutual TLS on
127.0.0.1): each participant trains at the rank of its own ``--config`` (model.lora.r 1, 2 or 4 inside the
server's rank-4 adapter), and the networked run gives the global model (adapter and FlexLoRA's residual) of
the in-process simulation with the same ranks named per client (``server.lora_client_ranks``)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from _grpc_support import client_args, deployment_section, find_run_dir, free_port
from fedtune.config import parse_config
from fedtune.core.state import load_state
from fedtune.run.artifacts import global_extras
from fedtune.run.session import simulate

pytestmark = [pytest.mark.timeout(1500), pytest.mark.slow]  # four processes importing transformers, then training
RANKS = {"client_000": 1, "client_001": 2, "client_002": 4}
# `fedtune server` turns the influence bounds' "auto" into "adaptive": spelled out, so both runs agree
ADAPTIVE = {"update_norm_bound": "adaptive", "max_examples_per_client": "adaptive"}


def _config(tmp: Path, pki: Path, port: int) -> dict:
    corpus = tmp / "corpus"
    corpus.mkdir()
    lines = ["To be, or not to be, that is the question.", "All the world's a stage, and all the men merely players."]
    for c, name in enumerate(RANKS):  # one file per participant, unequal sizes (a misweighted fold shows)
        blocks = [" ".join(lines[(c + i) % 2] for _ in range(3)) for i in range(6 + 3 * c)]
        (corpus / f"{name}.txt").write_text("\n\n".join(blocks))
    return {
        "seed": 2,
        "model": {"name": "tiny-llama", "max_length": 32, "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj"]}},
        "data": {"source": "text", "path": str(corpus)},
        "federation": {"rounds": 2, "clients_per_round": len(RANKS)},
        "client": {"local_steps": 3, "batch_size": 4, "lr": 0.05},
        "server": {"lora_aggregation": "flexlora", **ADAPTIVE},
        "eval": {"baseline": False, "every": 2},
        "run": {"out_dir": str(tmp / "runs"), "plot": False, "threads": 1},
        # generous: a client missing a round (its heartbeats starved on a loaded machine) would change the fold
        "deployment": deployment_section(
            pki, port, min_clients=len(RANKS), round_timeout_s=500, quorum_timeout_s=300, missed_heartbeats=120
        ),
    }


def test_participants_at_their_own_ranks_over_grpc_equal_the_simulation(tmp_path: Path, pki: Path, procs) -> None:
    port = free_port()
    cfg = _config(tmp_path, pki, port)
    (tmp_path / "server.yaml").write_text(yaml.safe_dump(cfg))
    procs.cli("server", "server", str(tmp_path / "server.yaml"))
    for name, rank in RANKS.items():
        own = copy.deepcopy(cfg)
        own["model"]["lora"]["r"] = rank  # this participant's hardware budget, in its own config
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(own))
        procs.cli(name, "client", *client_args(port, pki, name), "--config", str(tmp_path / f"{name}.yaml"))
    try:
        assert procs.wait("server", 900) == 0
        for name in RANKS:
            assert procs.wait(name, 120) == 0
    except AssertionError:
        print(procs.logs())
        raise
    run_dir = find_run_dir(tmp_path)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in records if r["kind"] == "failure"]
    announced = {(r["round"], r["client_id"]): r.get("lora_rank") for r in records if r["kind"] == "client"}
    assert announced == {  # the full-rank participant trains unmasked and announces nothing
        (rnd, c): (float(r) if r < 4 else None) for rnd in (1, 2) for c, r in RANKS.items()
    }

    sim_cfg = {k: v for k, v in cfg.items() if k != "deployment"}
    sim_cfg["server"] = {**cfg["server"], "lora_client_ranks": RANKS}
    sim_cfg["run"] = {**cfg["run"], "out_dir": str(tmp_path / "sim")}
    sim_config = parse_config(sim_cfg)
    expected = simulate(sim_config, show_progress=False)
    state = load_state(run_dir / "checkpoint.safetensors")
    assert state.round == 2
    # gRPC folds replies in arrival order, the simulation in sampled order: the last float bits may differ
    np.testing.assert_allclose(state.params, expected.state.params, rtol=1e-4, atol=2e-5)
    net, sim = global_extras(parse_config(cfg), state), global_extras(sim_config, expected.state)
    assert sorted(net) == sorted(sim) and net, "FlexLoRA's residual (the mean product beyond rank 4)"
    for key in sim:
        np.testing.assert_allclose(net[key], sim[key], rtol=1e-4, atol=2e-5)
