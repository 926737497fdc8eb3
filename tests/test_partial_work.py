"""Partial work at the round deadline (deployment.partial_work): the client stops at its time budget and sends
the steps it finished, weighted by steps done; over real gRPC processes in the slow test."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
import yaml

from _grpc_support import Procs, client_args, deployment_section, digits_data, find_run_dir, free_port, make_pki
from _models import DIGITS_CNN
from fedtune.client.partial import time_budget
from fedtune.client.worker import ClientWorker
from fedtune.config.deployment import TIME_BUDGET_OPTION, DeploymentConfig
from fedtune.config.schema import ClientConfig
from fedtune.core.messages import FitInstruction
from test_strategies_support import ArrayTask, classification_records, seeded

TRAIN = {"local_steps": 6, "batch_size": 4, "lr": 0.1, "optimizer": "sgd", "max_grad_norm": None}


class FakeClock:
    """Advances 2 s every time it is read: the budget's deadline is read once, then once after each step."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        value, self.now = self.now, self.now + 2.0
        return value


def _fit(budget: float | None):
    records = classification_records(1)
    worker = ClientWorker(
        ArrayTask(seeded(lambda: torch.nn.Linear(6, 3))),
        records,
        hook_factories=[functools.partial(time_budget, clock=FakeClock())],
    )
    options = {} if budget is None else {TIME_BUDGET_OPTION: budget}
    train = ClientConfig.model_validate(TRAIN)
    instr = FitInstruction("c0", 1, worker.current_params(), worker.view.spec.digest, 0, train, options=options)
    return worker.fit(instr), len(records["c0"][0])


def test_the_budget_stops_local_training_and_weights_the_reply_by_steps_done():
    update, n = _fit(budget=5.0)  # deadline t=5; checks read t=2, 4, 6: stops after the third of six steps
    assert update.metrics["steps"] == 3 and update.metrics["partial_work"] == 1.0
    assert update.metrics["steps_planned"] == 6 and update.num_examples == round(n * 3 / 6)


def test_a_fit_within_its_budget_or_without_one_is_unchanged():
    full, n = _fit(budget=None)
    assert full.metrics["steps"] == 6 and "partial_work" not in full.metrics and full.num_examples == n
    roomy, _ = _fit(budget=1000.0)
    assert roomy.metrics["steps"] == 6 and "partial_work" not in roomy.metrics
    np.testing.assert_array_equal(roomy.delta, full.delta)
    cut, _ = _fit(budget=5.0)
    assert not np.array_equal(cut.delta, full.delta)  # three steps, not six


def test_partial_work_share_is_validated():
    with pytest.raises(ValueError, match="partial_work_share"):
        DeploymentConfig(partial_work=True, partial_work_share=1.0)


@pytest.mark.slow  # real server and client processes (~1-2 minutes on a loaded machine)
@pytest.mark.timeout(600)
def test_grpc_stragglers_send_their_partial_work(tmp_path):
    pki = make_pki(tmp_path / "pki")
    port = free_port()
    cfg = {
        "seed": 3,
        "model": DIGITS_CNN,
        "data": digits_data(2),
        "federation": {"rounds": 2, "clients_per_round": 2},
        "client": {"local_steps": 50, "batch_size": 16, "lr": 0.01},
        "eval": {"every": 2, "max_examples_per_client": 20},
        "run": {"out_dir": str(tmp_path / "runs"), "plot": False, "threads": 1},
        # a budget of 30 microseconds: every client stops after its first step, whatever the machine's speed
        "deployment": deployment_section(
            pki, port, min_clients=2, round_timeout_s=300.0, partial_work=True, partial_work_share=1e-7
        ),
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    procs = Procs(tmp_path)
    try:
        procs.cli("server", "server", str(path))
        for name in ("client_000", "client_001"):
            procs.cli(name, "client", *client_args(port, pki, name))
        assert procs.wait("server", 400) == 0, procs.logs()
    finally:
        procs.kill_all()
    lines = [json.loads(x) for x in (find_run_dir(tmp_path) / "metrics.jsonl").read_text().splitlines() if x]
    clients = [r for r in lines if r["kind"] == "client"]
    assert len(clients) == 4 and all(r["steps"] == 1 and r["partial_work"] == 1 for r in clients)
    assert all(r["steps_planned"] == 50 for r in clients)
    assert [r["clients_ok"] for r in lines if r["kind"] == "round" and r["round"] > 0] == [2, 2]


@pytest.mark.parametrize(
    ("train", "n", "planned"),
    [
        ({"local_steps": 6, "batch_size": 4}, 10, 6),
        ({"local_epochs": 2, "batch_size": 4}, 10, 6),  # 2 x ceil(10 / 4) minibatches
        ({"local_epochs": 1, "batch_size": 4, "gradient_accumulation_steps": 2}, 10, 2),  # ceil(3 / 2) steps
        ({"local_epochs": 3, "full_batch": True}, 10, 3),
    ],
)
def test_planned_steps_match_the_local_loop(train, n, planned):
    from fedtune.client.partial import planned_steps

    cfg = ClientConfig.model_validate(train)
    instr = FitInstruction("c", 1, np.zeros(1, np.float32), "d", 0, cfg, options={TIME_BUDGET_OPTION: 1.0})
    assert planned_steps(instr, n) == planned
