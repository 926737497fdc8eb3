"""``simulation.client_nproc``: every simulated client trains data-parallel on 2 gloo ranks, end to end."""

from __future__ import annotations

import numpy as np
import pytest

from _models import DIGITS_CNN
from fedtune.config.load import parse_config
from fedtune.run.rundir import MetricsLog
from fedtune.run.session import initial_params, simulate

pytestmark = [pytest.mark.slow]


def config(tmp_path, nproc: int):
    return parse_config(
        {
            "seed": 5,
            "model": DIGITS_CNN,
            "data": {"source": "digits", "partition": {"kind": "iid", "num_clients": 6}},
            "federation": {"rounds": 2, "clients_per_round": 3},
            "client": {"local_steps": 3, "batch_size": 15, "lr": 0.1, "optimizer": "sgd"},  # 15 = 8 + 7 per rank
            "eval": {"max_clients": 2},
            "run": {"out_dir": str(tmp_path / "runs"), "plot": False, "threads": 1},
            "simulation": {"client_nproc": nproc},
        }
    )


def test_two_processes_per_client_match_one(tmp_path) -> None:
    one = simulate(config(tmp_path, 1), show_progress=False)
    two = simulate(config(tmp_path, 2), show_progress=False)
    assert not np.array_equal(one.state.params, initial_params(one.run_dir)), "the run must train"
    np.testing.assert_allclose(two.state.params, one.state.params, rtol=0, atol=1e-5)
    assert [r["clients_ok"] for r in two.rounds[1:]] == [3, 3]
    clients = [r for r in MetricsLog(two.run_dir).read() if r["kind"] == "client"]
    assert len(clients) == 6 and all(c["nproc"] == 2.0 for c in clients)  # rank 0's reply, 2 ranks
