"""Local DP-SGD's per-client ledger lives off-worker (the client state store), through ``simulate``: the
cumulative ``dpsgd_epsilon`` of a client composes exactly its own rounds (oracle: dp-accounting directly),
and a run that is interrupted, even after clients saved a round the server never checkpointed, reports
the same per-client epsilons as an uninterrupted one."""

from __future__ import annotations

import io
import json
import shutil
from collections import defaultdict
from pathlib import Path

import dp_accounting
import pytest
from rich.console import Console

from _models import DIGITS_CNN
from fedtune.config import parse_config
from fedtune.run.session import simulate

pytestmark = [pytest.mark.filterwarnings("ignore:Full backward hook is firing")]

Z = 1.1
DELTA = 1e-5


def config(tmp_path: Path, *, rounds: int, **simulation):
    return parse_config(
        {
            "seed": 1,  # client_003 is sampled in rounds 1 and 3, not 2
            "model": DIGITS_CNN,
            "data": {"source": "digits", "partition": {"kind": "iid", "num_clients": 6}},
            "federation": {"rounds": rounds, "clients_per_round": 3},
            # 20 steps of 8 over ~240 examples: each round touches one epoch, one Gaussian mechanism
            "client": {"local_steps": 20, "batch_size": 8, "optimizer": "sgd", "lr": 0.05},
            "eval": {"baseline": False, "max_clients": 1, "max_examples_per_client": 4},
            "run": {"out_dir": str(tmp_path), "plot": False, "threads": 1},
            "privacy": {"dpsgd": {"noise_multiplier": Z, "max_grad_norm": 1.0, "delta": DELTA}},
            "simulation": simulation,
        }
    )


def run(cfg, resume_dir: Path | None = None):
    return simulate(cfg, resume_dir=resume_dir, show_progress=False, console=Console(file=io.StringIO()))


def client_records(run_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["kind"] == "client"]


def oracle_epsilon(mechanisms: int) -> float:
    """dp-accounting directly: ``mechanisms`` Gaussian mechanisms of sensitivity 2C (replace-one), RDP."""
    acc = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    acc.compose(dp_accounting.GaussianDpEvent(Z / 2), mechanisms)
    return acc.get_epsilon(DELTA)


def epsilons(records: list[dict]) -> dict[tuple[int, str], float]:
    return {(r["round"], r["client_id"]): r["dpsgd_epsilon"] for r in records}


def test_cumulative_epsilon_composes_each_clients_own_rounds(tmp_path) -> None:
    result = run(config(tmp_path, rounds=3))
    records = client_records(result.run_dir)
    rounds_of: dict[str, list[int]] = defaultdict(list)
    for r in records:
        rounds_of[r["client_id"]].append(r["round"])
    assert any(rs == [1, 3] for rs in rounds_of.values()), f"no client sampled in rounds 1 and 3 only: {rounds_of}"
    one = oracle_epsilon(1)
    for r in records:
        times = rounds_of[r["client_id"]].index(r["round"]) + 1  # this client's rounds so far, this one included
        assert r["dpsgd_epsilon_round"] == pytest.approx(one, rel=1e-9)
        assert r["dpsgd_epsilon"] == pytest.approx(oracle_epsilon(times), rel=1e-9), (r["client_id"], r["round"])
    # the ledger is on disk in the run directory, one folder per client that trained
    assert len(list((result.run_dir / "client_state" / "dpsgd").iterdir())) == len(rounds_of)


def test_interrupted_and_replayed_run_reports_the_same_epsilons(tmp_path) -> None:
    whole = epsilons(client_records(run(config(tmp_path / "whole", rounds=4)).run_dir))

    first = run(config(tmp_path / "parts", rounds=2))
    saved = tmp_path / "checkpoint-round-2.safetensors"
    shutil.copy(first.run_dir / "checkpoint.safetensors", saved)
    run(config(tmp_path / "parts", rounds=3), resume_dir=first.run_dir)  # round 3's clients save their ledgers
    # ... and the server "crashes" before its round-3 checkpoint: resume from round 2, so round 3 is replayed
    shutil.copy(saved, first.run_dir / "checkpoint.safetensors")
    resumed = run(config(tmp_path / "parts", rounds=4), resume_dir=first.run_dir)

    got = epsilons(client_records(resumed.run_dir))
    assert got == whole
    # not vacuous: some client trained both before and after the interruption (its ledger had to carry over)
    before = {cid for rnd, cid in whole if rnd <= 2}
    assert any(cid in before and rnd >= 3 for rnd, cid in whole)
    assert max(whole.values()) > oracle_epsilon(1)
