"""Privacy end to end through ``simulate`` on the digits CNN: epsilon logged and shown every round, the
budget stop, resume of the ledger, and the full stack (DP-FedAvg + SecAgg + local DP-SGD)."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from _models import DIGITS_CNN
from fedtune.config import parse_config
from fedtune.privacy import accountant
from fedtune.run.session import simulate

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def config(tmp_path, privacy: dict, *, rounds: int):
    return parse_config(
        {
            "seed": 2,
            "model": DIGITS_CNN,
            "data": {"source": "digits", "partition": {"kind": "iid", "num_clients": 10}},
            "federation": {"rounds": rounds, "fraction": 0.4},
            "client": {"local_steps": 1, "batch_size": 8, "optimizer": "sgd", "lr": 0.1},
            "server": {"weighting": "uniform"},
            "eval": {"baseline": False, "max_clients": 2, "max_examples_per_client": 8},
            "run": {"out_dir": str(tmp_path), "plot": False},
            "privacy": privacy,
        }
    )


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_epsilon_every_round_in_log_and_table_and_the_budget_stop(tmp_path) -> None:
    two = accountant.epsilon([accountant.poisson_entry(0.4, 1.0, 2)], 1e-5)
    three = accountant.epsilon([accountant.poisson_entry(0.4, 1.0, 3)], 1e-5)
    budget = (two + three) / 2
    out = io.StringIO()
    dp = {"clip": 0.5, "noise_multiplier": 1.0, "epsilon_budget": budget}
    result = simulate(config(tmp_path, {"dp": dp}, rounds=5), console=Console(file=out, width=200), show_progress=False)
    rounds = [r for r in records(result.run_dir) if r["kind"] == "round"]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        expected = accountant.epsilon([accountant.poisson_entry(0.4, 1.0, r["round"])], 1e-5)
        assert r["agg_epsilon"] == pytest.approx(expected)
    stop = [r for r in records(result.run_dir) if r["kind"] == "stop"]
    assert len(stop) == 1 and "epsilon_budget" in stop[0]["reason"]
    text = out.getvalue()
    assert "agg_epsilon" in text and f"{rounds[-1]['agg_epsilon']:.3f}" in text and "stopped after round 2" in text
    assert result.state.round == 2


def test_the_ledger_survives_resume(tmp_path) -> None:
    privacy = {"dp": {"clip": 0.5, "noise_multiplier": 1.1, "sampling": "fixed"}}
    first = simulate(config(tmp_path, privacy, rounds=1), show_progress=False, console=Console(file=io.StringIO()))
    resumed = simulate(
        config(tmp_path, privacy, rounds=2),
        resume_dir=first.run_dir,
        show_progress=False,
        console=Console(file=io.StringIO()),
    )
    assert resumed.state.extra["dp"]["ledger"] == [accountant.fixed_entry(10, 4, 1.1, 2)]
    last = [r for r in records(resumed.run_dir) if r["kind"] == "round"][-1]
    assert last["round"] == 2
    assert last["agg_epsilon"] == pytest.approx(accountant.epsilon([accountant.fixed_entry(10, 4, 1.1, 2)], 1e-5))


def test_full_stack_dp_secagg_and_local_dpsgd(tmp_path) -> None:
    privacy = {
        "dp": {"clip": 0.5, "noise_multiplier": 1.0, "sampling": "fixed"},
        "secure_aggregation": {"neighbours": 2},
        "dpsgd": {"noise_multiplier": 1.0, "max_grad_norm": 1.0},
    }
    cfg = config(tmp_path, privacy, rounds=1)
    result = simulate(cfg, show_progress=False, console=Console(file=io.StringIO()))
    logged = records(result.run_dir)
    summary = next(r for r in logged if r["kind"] == "round")
    assert summary["agg_secagg_survivors"] == summary["agg_aggregated"] == 4
    assert summary["agg_epsilon"] > 0
    clients = [r for r in logged if r["kind"] == "client"]
    assert len(clients) == 4 and all(r["dpsgd_epsilon"] > 0 for r in clients)


@pytest.mark.slow
def test_the_private_demo_config_reports_its_epsilon(tmp_path) -> None:
    """examples/shakespeare_smollm2_dp.yaml, on tiny-llama so it runs in seconds."""
    from pathlib import Path

    from fedtune.config.load import load_config

    example = Path(__file__).parent.parent / "examples" / "shakespeare_smollm2_dp.yaml"
    overrides = [
        "model.name=tiny-llama",
        "model.compute_dtype=float32",
        "model.lora.top_layers=null",
        "federation.rounds=2",
        "eval.max_clients=2",
        "eval.sample_prompt=null",
        f"run.out_dir={tmp_path}",
        "run.plot=false",
    ]
    cfg = load_config(example, overrides)
    out = io.StringIO()
    result = simulate(cfg, show_progress=False, console=Console(file=out, width=200))
    rounds = [r for r in records(result.run_dir) if r["kind"] == "round" and r["round"] > 0]
    assert rounds and all(0 < r["agg_epsilon"] <= 8.0 for r in rounds)
    assert "agg_epsilon" in out.getvalue()
