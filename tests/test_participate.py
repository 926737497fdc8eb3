"""The client API: the user's own training loop federated with fedtune.participate, in simulation and over gRPC
against a real ``fedtune server`` process. The oracle is FedAvg by hand: every client moves every weight by a
known amount and reports a known example count, so the global model after each round is known exactly."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import fedtune
from _grpc_support import Procs, deployment_section, digits_data, free_port, make_pki
from _models import DIGITS_CNN
from fedtune.client.weights import TrainableView
from fedtune.core.state import load_state
from fedtune.errors import ConfigError, FedtuneError
from fedtune.run import rundir

SHIFT = {"a": 1.0, "b": -0.5, "c": 0.25}  # what each client adds to every weight
COUNT = {"a": 30, "b": 10, "c": 60}  # the example count each reports


def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


def sim_config(tmp_path: Path, rounds: int = 3, **over: object) -> dict:
    return {
        "federation": {"rounds": rounds, "clients_per_round": 3},
        "eval": {"baseline": True},
        "run": {"out_dir": str(tmp_path / "runs"), "plot": False},
        **over,
    }


def shift(model: torch.nn.Module, amount: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(amount)


def fedavg_step() -> float:
    return sum(SHIFT[c] * COUNT[c] for c in SHIFT) / sum(COUNT.values())


def test_own_loop_in_simulation_is_fedavg_of_what_it_sends(tmp_path: Path) -> None:
    model = net()
    start = TrainableView(model).read()
    seen = []

    def evaluate(m: torch.nn.Module, cid: str) -> dict:
        return {"loss": 2.0 if cid == "a" else 1.0, "num_examples": COUNT[cid], "accuracy": 0.5}

    run = fedtune.participate(sim_config(tmp_path), model=model, clients=list(SHIFT), evaluate=evaluate, quiet=True)
    for job in run:
        seen.append((job.round, job.client_id))
        assert job.model is model  # the user's own object, holding the global model of the round
        shift(job.model, SHIFT[job.client_id])
        job.send(COUNT[job.client_id], metrics={"train_loss": 0.1})
    result = run.result
    assert sorted(seen) == [(r, c) for r in (1, 2, 3) for c in "abc"]
    expected = start + 3 * fedavg_step()
    np.testing.assert_allclose(result.state.params, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(TrainableView(result.model).read(), expected, rtol=1e-6, atol=1e-6)
    final = result.final
    assert final["train_loss"] == pytest.approx(0.1) and final["eval_accuracy"] == pytest.approx(0.5)
    assert final["eval_loss"] == pytest.approx((2.0 * 30 + 10 + 60) / 100)  # example-weighted
    written = yaml.safe_load((result.run_dir / rundir.CONFIG).read_text())
    assert written["data"]["source"] == "python" and written["model"]["name"] == "python:Sequential"
    clients = [r for r in rundir.MetricsLog(result.run_dir).read() if r["kind"] == "client"]
    assert len(clients) == 9 and all(c["fit_seconds"] >= 0 for c in clients)  # your loop's time, per client


def test_a_loop_that_stops_early_unwinds_and_the_run_resumes(tmp_path: Path) -> None:
    model = net()
    start = TrainableView(model).read()
    run = fedtune.participate(sim_config(tmp_path), model=model, clients=list(SHIFT), quiet=True)
    for job in run:
        if job.round == 2:
            break  # e.g. the user interrupts
        shift(job.model, SHIFT[job.client_id])
        job.send(COUNT[job.client_id])
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert load_state(run_dir / rundir.CHECKPOINT).round == 1
    again = fedtune.participate(sim_config(tmp_path), model=net(), clients=list(SHIFT), resume=run_dir, quiet=True)
    for job in again:
        shift(job.model, SHIFT[job.client_id])
        job.send(COUNT[job.client_id])
    np.testing.assert_allclose(again.result.state.params, start + 3 * fedavg_step(), rtol=1e-6, atol=1e-6)


def test_misuse_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="FedProx"):
        fedtune.participate(sim_config(tmp_path, server={"proximal_mu": 0.1}), model=net(), clients=2)
    with pytest.raises(ConfigError, match="SCAFFOLD"):
        fedtune.participate(sim_config(tmp_path, server={"scaffold": True}), model=net(), clients=2)


def test_your_own_loop_refuses_what_only_the_built_in_loop_does() -> None:
    """The check both paths run (simulation, and over gRPC on the config the server sends): each mode that acts
    inside fedtune's local loop is named, the heterogeneous-rank LoRA modes included."""
    from fedtune.client.external import check_external
    from fedtune.config import parse_config

    lora = {"model": {"lora": {"r": 4, "alpha": 8.0}}}
    for server, named in (
        ({"proximal_mu": 0.1}, "FedProx"),
        ({"scaffold": True}, "SCAFFOLD"),
        ({"lora_aggregation": "flora"}, "'flora'"),
        ({"lora_aggregation": "hetlora"}, "'hetlora'"),
        ({"lora_aggregation": "flexlora"}, "'flexlora'"),
    ):
        extra = lora if "lora_aggregation" in server else {}
        if server.get("scaffold"):
            extra = {"client": {"optimizer": "sgd"}}
        with pytest.raises(ConfigError, match=named):
            check_external(parse_config({"server": server, **extra}))
    check_external(parse_config({"server": {"lora_aggregation": "fedex"}, **lora}))  # exact modes: fine


def test_misuse_of_a_participation_is_named(tmp_path: Path) -> None:
    run = fedtune.participate(sim_config(tmp_path), model=net(), clients=2, quiet=True)
    with pytest.raises(FedtuneError, match=r"without job\.send"):
        for _job in run:
            pass
    with pytest.raises(ValueError, match="positive int"):
        for job in fedtune.participate(sim_config(tmp_path), model=net(), clients=2, quiet=True):
            job.send(0)


def test_own_loops_over_grpc_against_fedtune_server(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    port, rounds = free_port(), 2
    cfg = {
        "seed": 3,
        "model": DIGITS_CNN,
        "data": digits_data(2),
        "federation": {"rounds": rounds, "clients_per_round": 2},
        "eval": {"baseline": False},
        "run": {"out_dir": str(tmp_path / "runs"), "plot": False, "threads": 1},
        "deployment": deployment_section(pki, port, min_clients=2),
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    procs = Procs(tmp_path)
    procs.cli("server", "server", str(tmp_path / "config.yaml"))
    shifts, counts = {"client_000": 0.5, "client_001": -0.25}, {"client_000": 30, "client_001": 10}
    errors: list[BaseException] = []

    def participant(name: str) -> None:
        try:
            run = fedtune.participate(
                server=f"127.0.0.1:{port}",
                ca=pki / "ca.pem",
                cert=pki / "clients" / f"{name}.pem",
                key=pki / "clients" / f"{name}.key",
                evaluate=lambda m, cid: {"loss": 1.5, "num_examples": 4},
                reconnect_timeout_s=120,
                quiet=True,
            )
            for job in run:  # the server's model (digits CNN), built from the config it sends
                assert job.client_id == name
                shift(job.model, shifts[name])
                job.send(counts[name])
            assert run.result == 0
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=participant, args=(n,)) for n in shifts]
    try:
        for t in threads:
            t.start()
        assert procs.wait("server", 200) == 0
        for t in threads:
            t.join(60)
        assert not errors, errors
    except AssertionError:
        print(procs.logs())
        raise
    finally:
        procs.kill_all()
    (run_dir,) = (tmp_path / "runs").iterdir()
    start = load_state(run_dir / "initial.safetensors").params
    step = sum(shifts[c] * counts[c] for c in shifts) / sum(counts.values())
    np.testing.assert_allclose(load_state(run_dir / rundir.CHECKPOINT).params, start + rounds * step, atol=1e-5)
    final = next(r for r in rundir.MetricsLog(run_dir).rounds() if r["round"] == rounds)
    assert final["eval_loss"] == pytest.approx(1.5)
