"""`fedtune run` exits non-zero, saying why, when no round of the run could be completed (issue #13 item 2)."""

from __future__ import annotations

import json

import yaml
from typer.testing import CliRunner

from _models import DIGITS_CNN
from fedtune.cli import app
from fedtune.errors import EXIT_CONFIG, EXIT_NO_ROUND


def _config(tmp_path, **server) -> str:
    cfg = {
        "seed": 2,
        "model": DIGITS_CNN,
        "data": {"source": "digits", "partition": {"kind": "iid", "num_clients": 3}},
        "federation": {"rounds": 2, "clients_per_round": 3},
        "client": {"local_steps": 2, "batch_size": 8},
        "eval": {"baseline": False, "max_examples_per_client": 10},
        "server": server,
        "run": {"out_dir": str(tmp_path / "runs"), "plot": False, "threads": 1},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_a_run_in_which_no_round_completes_exits_4_with_the_reason(tmp_path) -> None:
    # every step is longer than 1e-12 x max(1, |model|): every aggregate is rejected, the model never changes
    result = CliRunner().invoke(app, ["run", _config(tmp_path, max_step_ratio=1e-12)])
    out = " ".join(result.output.split())  # the console wraps long lines
    assert result.exit_code == EXIT_NO_ROUND == 4, out  # its own status: not a configuration error's (2)
    assert "error: none of rounds 1-2 could be completed" in out and "server.max_step_ratio=1e-12" in out
    assert "the global model is unchanged" in out
    run_dir = next((tmp_path / "runs").iterdir())
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rounds if r["kind"] == "round"] == ["failed", "failed"]


def test_the_same_run_with_the_default_step_limit_exits_0(tmp_path) -> None:
    result = CliRunner().invoke(app, ["run", _config(tmp_path)])
    assert result.exit_code == 0, result.output


def test_a_configuration_error_still_exits_2(tmp_path) -> None:
    result = CliRunner().invoke(app, ["run", _config(tmp_path, max_step_ratio=-1)])
    assert result.exit_code == EXIT_CONFIG == 2, result.output
    assert "max_step_ratio" in result.output
