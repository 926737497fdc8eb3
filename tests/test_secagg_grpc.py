"""Secure aggregation over the gRPC deployment: real ``fedtune client`` processes on 127.0.0.1, each
keeping its own update and answering the SecAgg tasks; the server only ever sees masked vectors.

The model is the small digits CNN (as in test_grpc_e2e.py), each client takes its own partition of the
digits, so the networked run can be compared with the in-process simulation of the same configuration.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml
from rich.console import Console

from _grpc_support import (
    CLIENTS,
    DP_ADAPTIVE_SECAGG,
    REPO,
    Procs,
    client_args,
    deployment_section,
    digits_data,
    find_run_dir,
    free_port,
)
from _models import DIGITS_CNN
from fedtune.config import parse_config
from fedtune.core.messages import ClientUpdate, HeldUpdate
from fedtune.core.state import load_state
from fedtune.errors import ConfigError, UpdateRejected
from fedtune.run.session import initial_params, simulate
from fedtune.server.summing import check_secagg_transport
from fedtune.transport.base import Capabilities
from fedtune.transport.codecs import build_codec
from fedtune.transport.grpc import protocol, wire
from fedtune.transport.grpc.proto import fedtune_pb2 as pb

FAULT_CLIENT = str(REPO / "tests" / "secagg_fault_client.py")


DP = DP_ADAPTIVE_SECAGG  # DP-FedAvg over SecAgg, with adaptive clipping (_grpc_support)


def _config(tmp: Path, pki: Path, port: int, *, num_clients: int, rounds: int, **privacy) -> dict:
    return {
        "seed": 5,
        "model": DIGITS_CNN,
        # unequal shares: example weighting (w = min(n, cap) / cap inside SecAgg) must match the simulation
        "data": digits_data(num_clients),
        "federation": {"rounds": rounds, "clients_per_round": num_clients},
        "client": {"local_steps": 8, "batch_size": 16, "lr": 0.01},
        "eval": {"every": 1, "max_examples_per_client": 30},
        # threshold 0.6: with 4 clients each has 3 neighbours and t = 2, so one may drop before unmasking
        "privacy": {"secure_aggregation": {"threshold": 0.6, **privacy}},
        "run": {"out_dir": str(tmp / "runs"), "plot": False, "threads": 1},
        "deployment": deployment_section(pki, port, min_clients=num_clients),
    }


def _simulated(cfg: dict, tmp: Path) -> tuple[np.ndarray, np.ndarray]:
    """The simulation's final model and its initial one."""
    sim = parse_config({**cfg, "run": {**cfg["run"], "out_dir": str(tmp / "sim")}})
    result = simulate(sim, show_progress=False)
    return result.state.params, initial_params(result.run_dir)


def _rounds(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, filter(str.strip, lines)) if r["kind"] == "round"]


def _assert_same_model(actual: np.ndarray, expected: np.ndarray, initial: np.ndarray) -> None:
    # The SecAgg sum is exact in the field, but each client rounds with its own private randomness
    # (docs/PRIVACY.md), so two runs agree only within the quantisation bound: each coordinate of a round's
    # mean moves by less than one step, 2 * clip_range / levels (2e-9 for 4 clients in the 32-bit field),
    # and the next round trains from that slightly different model. 1e-5 is far below what one round moves.
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5)
    assert np.abs(expected - initial).max() > 1e-3  # the bound is tight enough to tell models apart


class _WireSpy:
    """Records the tensors of every payload this (the server's) process decodes."""

    def __init__(self, monkeypatch) -> None:
        self.seen: list[tuple[int, dict[str, tuple[str, tuple]]]] = []
        decode = wire.decode

        def spying(messages, limits, admit=None):
            payload = decode(messages, limits, admit)
            tensors = {k: (v.dtype.str, v.shape) for k, v in payload.tensors.items()}
            self.seen.append((payload.header.kind, tensors))
            return payload

        monkeypatch.setattr(wire, "decode", spying)

        def never(*args, **kwargs):
            raise AssertionError("the server decoded a plaintext update under secure aggregation")

        monkeypatch.setattr(protocol, "update_from_payload", never)


@pytest.mark.parametrize("dp", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["secagg", "dp+secagg"])
def test_secagg_over_grpc_matches_the_simulation_and_the_server_sees_no_plaintext(
    dp, tmp_path, pki, procs, monkeypatch
):
    """(1) 4 client processes, 2 rounds: the same global model as the in-process SecAgg simulation
    (also under DP-FedAvg with adaptive clipping, whose clipping bits are summed securely);
    (4) the server process (this one) never decodes an update tensor: fit results carry none, and every
    SecAgg message it receives is an opaque uint8 blob whose content only the protocol decodes."""
    from fedtune.deploy.serve import run_server

    port = free_port()
    cfg = _config(tmp_path, pki, port, num_clients=4, rounds=2)
    if dp:
        cfg.update(DP)
    expected, initial = _simulated(cfg, tmp_path)
    spy = _WireSpy(monkeypatch)
    outcome: dict = {}

    def serve() -> None:
        try:
            outcome["result"] = run_server(parse_config(cfg), console=Console(quiet=True), show_progress=False)
        except BaseException as err:  # reported by the test below
            outcome["error"] = err

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    for name in CLIENTS[:4]:
        procs.cli(name, "client", *client_args(port, pki, name))
    server.join(240)
    try:
        assert not server.is_alive(), "the server did not finish"
        assert "error" not in outcome, outcome.get("error")
        for name in CLIENTS[:4]:
            assert procs.wait(name, 30) == 0
            assert "update kept for secure aggregation" in procs.log(name)
    except AssertionError:
        print(procs.logs())
        raise
    result = outcome["result"]
    assert result.state.round == 2
    _assert_same_model(result.state.params, expected, initial)
    rounds = [r for r in result.rounds if r["round"] > 0]
    assert [r["agg_secagg_survivors"] for r in rounds] == [4, 4]
    assert all(r["agg_secagg_clipped_values"] >= 0 for r in rounds)  # reported per round (exact: test_secagg_malicious)
    assert all(r["agg_aggregated"] == 4 for r in rounds)

    kinds = [kind for kind, _ in spy.seen]
    assert kinds.count(pb.FIT_RESULT) == 8
    assert kinds.count(pb.SECAGG_RESULT) == 2 * 4 * 5  # rounds x clients x stages
    for kind, tensors in spy.seen:
        assert not any(name.startswith("delta/") for name in tensors)
        if kind == pb.FIT_RESULT:
            assert tensors == {}
        if kind == pb.SECAGG_RESULT:
            assert list(tensors) == ["secagg/message"] and tensors["secagg/message"][0] == "|u1"


def _start_with_a_faulty_client(tmp: Path, pki: Path, procs: Procs, cfg: dict, mode: str, stage: str) -> None:
    """The server, healthy clients, and the last of ``min_clients`` as a secagg_fault_client (MODE at STAGE)."""
    port, n = cfg["deployment"]["port"], cfg["deployment"]["min_clients"]
    (tmp / "config.yaml").write_text(yaml.safe_dump(cfg))
    procs.cli("server", "server", str(tmp / "config.yaml"))
    for name in CLIENTS[: n - 1]:
        procs.cli(name, "client", *client_args(port, pki, name))
    faulty = CLIENTS[n - 1]
    procs.start(faulty, [FAULT_CLIENT, mode, "--stage", stage, *client_args(port, pki, faulty)])


@pytest.mark.slow  # ~70-100 s on a loaded 2-core machine; the default suite runs the first test
def test_a_client_killed_before_unmasking_still_counts(tmp_path, pki, procs):
    """client_003 sends its masked input, then dies before sending any unmasking share: its input is in
    the sum (its self-mask is rebuilt from the others' shares), so the model equals the simulation's."""
    port = free_port()
    cfg = _config(tmp_path, pki, port, num_clients=4, rounds=1)
    expected, initial = _simulated(cfg, tmp_path)
    _start_with_a_faulty_client(tmp_path, pki, procs, cfg, "die", "unmask")
    try:
        assert procs.wait("server", 200) == 0
        assert procs.wait("client_003", 10) == 17
        assert "FAULT: die at unmask of round 1" in procs.log("client_003")
    except AssertionError:
        print(procs.logs())
        raise
    run_dir = find_run_dir(tmp_path)
    (record,) = [r for r in _rounds(run_dir) if r["round"] == 1]
    assert record["agg_secagg_survivors"] == 4 and record["agg_aggregated"] == 4
    assert record["agg_secagg_dropouts"] == "client_003@unmask"
    _assert_same_model(load_state(run_dir / "checkpoint.safetensors").params, expected, initial)
    assert "client_003 dropped out of secure aggregation round 1 at unmask" in procs.log("server")


@pytest.mark.slow  # ~70-100 s on a loaded 2-core machine; the default suite runs the first test
def test_too_many_dropouts_abort_the_round_cleanly_and_the_next_round_runs(tmp_path, pki, procs):
    """3 clients; in round 1 client_002 refuses to send its masked input: 2 inputs cannot be summed
    securely, so round 1 aborts (the model is kept, the reason is logged); round 2 aggregates all 3."""
    port = free_port()
    cfg = _config(tmp_path, pki, port, num_clients=3, rounds=2)
    _start_with_a_faulty_client(tmp_path, pki, procs, cfg, "refuse", "masked")
    try:
        assert procs.wait("server", 200) == 0
        for name in CLIENTS[:3]:
            assert procs.wait(name, 30) == 0
    except AssertionError:
        print(procs.logs())
        raise
    run_dir = find_run_dir(tmp_path)
    records = {r["round"]: r for r in _rounds(run_dir)}
    assert records[1]["agg_aggregated"] == 0 and records[1]["status"] == "failed"  # not a completed round
    assert "2 masked inputs arrived, at least 3 are needed" in records[1]["agg_secagg_abort"]
    assert records[1]["eval_loss"] == records[0]["eval_loss"]  # the same model, evaluated on the same data
    assert records[2]["agg_aggregated"] == 3 and records[2]["agg_secagg_survivors"] == 3
    final = load_state(run_dir / "checkpoint.safetensors")
    assert final.round == 2 and not np.array_equal(final.params, initial_params(run_dir))
    log = procs.log("server")
    assert "secure aggregation round 1 aborted" in log and "injected refusal at masked" in log


# ----- the parts, without processes ------------------------------------------------------------------------


def _update(n: int = 6) -> ClientUpdate:
    return ClientUpdate("c", 1, 5, np.linspace(-1, 1, n, dtype=np.float32), "digest", {"train_loss": 0.5})


def test_a_plaintext_update_is_refused_under_secagg_and_a_held_one_carries_no_delta() -> None:
    plain, _ = protocol.update_payload(_update(), task_id="t", session="s", codec=build_codec("none"), residual=None)
    with pytest.raises(UpdateRejected, match="must stay on the client"):
        protocol.held_update_from_payload(plain, client_id="c", numel=6, spec_digest="digest")
    held = protocol.held_update_payload(_update(), task_id="t", session="s")
    assert held.tensors == {}
    update = protocol.held_update_from_payload(held, client_id="c", numel=6, spec_digest="digest")
    assert isinstance(update, HeldUpdate) and not hasattr(update, "delta")
    assert update.metrics == {"train_loss": 0.5} and update.num_examples == 5 and update.round == 1


def test_secagg_message_payload_round_trips_and_rejects_other_tensors() -> None:
    blob = bytes(range(200))
    payload = protocol.secagg_payload(pb.SECAGG_RESULT, blob, task_id="t", round_idx=3)
    decoded = wire.decode(wire.encode(payload, chunk_bytes=64), wire.Limits(1 << 20, 64))
    assert protocol.secagg_message(decoded, "c") == blob and decoded.header.round == 3
    decoded.tensors["delta/values"] = np.zeros(3, np.float32)
    with pytest.raises(UpdateRejected, match="exactly one"):
        protocol.secagg_message(decoded, "c")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"deployment": {"codec": "int8"}}, "deployment.codec='int8'"),
        ({"privacy": {"secure_aggregation": {"simulate_dropout": 0.1}}}, "simulate_dropout"),
    ],
)
def test_secagg_over_grpc_refuses_what_cannot_work(overrides, message, tmp_path) -> None:
    cfg = _config(tmp_path, tmp_path, 1, num_clients=3, rounds=1)
    for section, values in overrides.items():
        cfg[section] = {**cfg[section], **values}

    class GrpcServerTransport:  # what check_secagg_transport looks at: the declared capabilities
        capabilities = Capabilities(secure_sum=True)

        def secagg_exchange(self, round_idx, stage, messages):
            return {}

    with pytest.raises(ConfigError, match=message):
        check_secagg_transport(parse_config(cfg), GrpcServerTransport())
    GrpcServerTransport.capabilities = Capabilities()  # not started for SecAgg: would see plaintext
    with pytest.raises(ConfigError, match="plaintext"):
        plain = _config(tmp_path, tmp_path, 1, num_clients=3, rounds=1)
        check_secagg_transport(parse_config(plain), GrpcServerTransport())


@pytest.mark.slow  # ~60-100 s on a loaded 2-core machine
def test_distributed_dp_over_grpc_reports_epsilon_and_sends_no_plaintext(tmp_path, pki, procs, monkeypatch):
    """privacy.dp.distributed over gRPC: each participant noises its own update (Skellam share, private seed)
    before SecAgg; the server never decodes an update tensor, and epsilon is charged per round at the noise
    shares of the survivors."""
    from fedtune.deploy.serve import run_server
    from fedtune.privacy import accountant, distributed
    from fedtune.privacy.ddp_client import config_plan

    port = free_port()
    cfg = _config(tmp_path, pki, port, num_clients=4, rounds=2)
    cfg["server"] = {"weighting": "uniform"}
    cfg["privacy"]["dp"] = {"clip": 0.5, "noise_multiplier": 0.5, "distributed": True}
    cfg["deployment"]["quorum_timeout_s"] = 200  # four client processes importing torch on a loaded machine
    cfg["deployment"]["round_timeout_s"] = 240  # and training 8 steps each: 30 s a client at load average 27
    spy = _WireSpy(monkeypatch)
    outcome: dict = {}

    def serve() -> None:
        try:
            outcome["result"] = run_server(parse_config(cfg), console=Console(quiet=True), show_progress=False)
        except BaseException as err:  # reported below
            outcome["error"] = err

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    for name in CLIENTS[:4]:
        procs.cli(name, "client", *client_args(port, pki, name))
    server.join(240)
    try:
        assert not server.is_alive(), "the server did not finish"
        assert "error" not in outcome, outcome.get("error")
    except AssertionError:
        print(procs.logs())
        raise
    result = outcome["result"]
    parsed = parse_config(cfg)
    plan = config_plan(
        parsed.privacy.dp, rounds=2, clients_per_round=4, expected_dropout=0.1, dim=result.state.spec.numel
    )
    ledger: list = []
    for r in [r for r in result.rounds if r["round"] > 0]:
        ledger = accountant.append(ledger, distributed.entry(plan, r["agg_secagg_survivors"]))
        assert r["agg_ddp_noise_shares"] == r["agg_secagg_survivors"] == 4
        assert r["agg_epsilon"] == pytest.approx(accountant.epsilon(ledger, 1e-5))
    assert np.isfinite(result.state.params).all()
    for name in CLIENTS[:4]:  # each participant says what its updates cost with its noise share alone
        assert "if the other clients' noise shares were missing" in procs.log(name), procs.log(name)[-3000:]
    for kind, tensors in spy.seen:
        assert not any(name.startswith("delta/") for name in tensors)
        if kind == pb.FIT_RESULT:
            assert tensors == {}
