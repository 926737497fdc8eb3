"""Real ``fedtune server`` and ``fedtune client`` processes on 127.0.0.1, with faults injected.

The model is the small digits CNN (``fedtune.models.cnn:digits_cnn``); each client takes its own
partition of the digits (``--data partition:client_00k``), exactly the shard the simulation gives it,
so the networked run can be compared with the in-process simulation of the same configuration.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import yaml

from _grpc_support import (
    REPO,
    client_args,
    deployment_section,
    digits_data,
    find_run_dir,
    free_port,
    wait_until,
)
from _models import DIGITS_CNN
from fedtune.config import parse_config
from fedtune.core.messages import ClientEval, ClientFailure, ClientUpdate, EvalInstruction, FitInstruction
from fedtune.core.state import load_state
from fedtune.run.session import coordinate, prepare, simulate
from fedtune.transport.base import Transport
from fedtune.transport.inprocess import InProcessTransport

pytestmark = pytest.mark.timeout(900)  # an upper bound for a loaded machine, not a speed test
FAULT_CLIENT = str(REPO / "tests" / "grpc_fault_client.py")


def _config(tmp: Path, pki: Path, port: int, *, num_clients: int, rounds: int, **deployment) -> dict:
    return {
        "seed": 3,
        "model": DIGITS_CNN,
        "data": digits_data(num_clients),
        "federation": {"rounds": rounds, "clients_per_round": 2},
        "client": {"local_steps": 40, "batch_size": 16, "lr": 0.01},
        "eval": {"every": 2, "max_examples_per_client": 40},
        "run": {"out_dir": str(tmp / "runs"), "plot": False, "threads": 1},
        "deployment": deployment_section(pki, port, min_clients=num_clients, **deployment),
    }


def _write(tmp: Path, cfg: dict) -> Path:
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _assert_same_model(actual: np.ndarray, expected: np.ndarray) -> None:
    # Bit for bit: the loop folds replies in sampled order whatever order they arrive in over the network.
    assert actual.dtype == expected.dtype == np.float32
    assert actual.tobytes() == expected.tobytes(), f"max difference {np.abs(actual - expected).max()}"


class _SameParticipation:
    """The in-process transport, with each (round, client) fit that did not reach the networked run's fold
    failing here too. Whether a client misses a round's deadline or its heartbeats (a process starved of CPU
    for seconds on a loaded machine) is timing, not the fold: with the participation fixed, the in-process run
    is the networked run's exact oracle whatever the load did."""

    def __init__(self, inner: Transport, accepted: set[tuple[int, str]]) -> None:
        self.inner, self.accepted = inner, accepted

    def client_ids(self) -> list[str]:
        return self.inner.client_ids()

    def fit(self, instructions: Sequence[FitInstruction]) -> Iterator[ClientUpdate | ClientFailure]:
        missed = [i for i in instructions if (i.round, i.client_id) not in self.accepted]
        yield from (ClientFailure(i.client_id, i.round, "missed in the networked run") for i in missed)
        yield from self.inner.fit([i for i in instructions if (i.round, i.client_id) in self.accepted])

    def evaluate(self, instructions: Sequence[EvalInstruction]) -> Iterator[ClientEval | ClientFailure]:
        return self.inner.evaluate(instructions)

    def close(self) -> None:
        self.inner.close()


def _oracle(shared: tuple[dict, np.ndarray], run_dir: Path, tmp: Path) -> np.ndarray:
    """The in-process global model for the networked run in ``run_dir``: the shared simulation when every
    sampled client's update was folded, else the same configuration in process with the same participation.
    Only liveness may have cost a client a round: no update rejected, no client error."""
    cfg, expected = shared
    records = _records(run_dir)
    failures = [r for r in records if r["kind"] == "failure"]
    assert not [f for f in failures if f["reason"].startswith(("rejected", "client reported"))], failures
    if all(r.get("clients_failed", 0) == 0 for r in records if r["kind"] == "round"):
        return expected
    print(f"clients missed rounds (timing, on a loaded machine): {failures}")
    accepted = {(r["round"], r["client_id"]) for r in records if r["kind"] == "client"}
    config = parse_config({**cfg, "server": ADAPTIVE, "run": {**cfg["run"], "out_dir": str(tmp / "oracle")}})
    prepared = prepare(config)
    transport = _SameParticipation(InProcessTransport(prepared.worker), accepted)
    init = (prepared.worker.current_params(), prepared.worker.view.spec)
    accuracy = prepared.task.reports_accuracy
    return coordinate(config, transport, init=init, accuracy=accuracy, show_progress=False).state.params


ROUNDS = 4
# `fedtune server` turns the influence bounds' "auto" into "adaptive"; the simulation says so itself
ADAPTIVE = {"update_norm_bound": "adaptive", "max_examples_per_client": "adaptive"}


@pytest.fixture(scope="module")
def shared(tmp_path_factory, pki):
    """One configuration for the equality and the resume tests, and its in-process simulation (the oracle)."""
    tmp = tmp_path_factory.mktemp("shared")
    cfg = _config(tmp, pki, 0, num_clients=3, rounds=ROUNDS)
    sim = parse_config({**cfg, "server": ADAPTIVE, "run": {**cfg["run"], "out_dir": str(tmp / "sim")}})
    return cfg, simulate(sim, show_progress=False).state.params


def _with(cfg: dict, tmp: Path, port: int) -> dict:
    run, deployment = {**cfg["run"], "out_dir": str(tmp / "runs")}, {**cfg["deployment"], "port": port}
    return {**cfg, "run": run, "deployment": deployment}


@pytest.mark.slow  # the default suite runs the same comparison with a server crash in the middle (below)
def test_grpc_and_inprocess_give_the_same_global_model(tmp_path, pki, procs, shared):
    cfg = shared[0]
    port = free_port()
    procs.cli("server", "server", str(_write(tmp_path, _with(cfg, tmp_path, port))))
    for name in ("client_000", "client_001", "client_002"):
        procs.cli(name, "client", *client_args(port, pki, name))
    try:
        assert procs.wait("server", 150) == 0
        for name in ("client_000", "client_001", "client_002"):
            assert procs.wait(name, 120) == 0
            assert f"federation finished after round {ROUNDS}" in procs.log(name)
    except AssertionError:
        print(procs.logs())
        raise
    run_dir = find_run_dir(tmp_path)
    state = load_state(run_dir / "checkpoint.safetensors")
    assert state.round == ROUNDS
    _assert_same_model(state.params, _oracle(shared, run_dir, tmp_path))
    records = _records(run_dir)
    rounds = [r for r in records if r["kind"] == "round"]
    assert [r["round"] for r in rounds] == list(range(ROUNDS + 1))
    assert all(r["clients_ok"] >= 1 for r in rounds[1:])
    clients = [r for r in records if r["kind"] == "client"]
    assert all(r["bytes_up"] > 10_000 and r["bytes_down"] > 10_000 for r in clients)  # 2,570 float32 + framing
    assert "2/2" in procs.log("server") and "acc" in procs.log("server")  # the progress table, as simulated


def test_server_killed_with_sigkill_resumes_and_loses_nothing(tmp_path, pki, procs, shared):
    """The same configuration over gRPC, with the server SIGKILLed mid-run and resumed, ends with the
    global model of the uninterrupted in-process simulation: the transport changes nothing, and nothing
    is lost or done twice across the crash."""
    cfg = shared[0]
    port = free_port()
    procs.cli("server", "server", str(_write(tmp_path, _with(cfg, tmp_path, port))))
    for name in ("client_000", "client_001", "client_002"):
        procs.cli(name, "client", *client_args(port, pki, name))
    run_dir = find_run_dir(tmp_path)

    def checkpoint_round() -> int:
        try:
            return load_state(run_dir / "checkpoint.safetensors").round
        except Exception:  # not written yet
            return 0

    try:
        wait_until(lambda: checkpoint_round() >= 1, 300, "round 1's checkpoint")
        procs.kill("server")  # SIGKILL: no cleanup, in the middle of round 2 (or its evaluation)
        killed_at = checkpoint_round()
        assert killed_at < ROUNDS, "the run finished before the kill"
        procs.cli("server", "server", "--resume", str(run_dir), "--dashboard", "--dashboard-port", "0")
        assert procs.wait("server", 300) == 0
        for name in ("client_000", "client_001", "client_002"):
            assert procs.wait(name, 120) == 0
    except AssertionError:
        print(procs.logs())
        raise
    assert f"after round {killed_at}" in procs.log("server")
    rounds = [r["round"] for r in _records(run_dir) if r["kind"] == "round"]
    assert rounds == list(range(ROUNDS + 1))  # every round once: nothing lost, nothing twice
    state = load_state(run_dir / "checkpoint.safetensors")
    assert state.round == ROUNDS
    _assert_same_model(state.params, _oracle(shared, run_dir, tmp_path))
    clients = [r for r in _records(run_dir) if r["kind"] == "client"]
    assert clients and all(r["bytes_up"] > 10_000 and r["bytes_down"] > 10_000 for r in clients)
    assert "2/2" in procs.log("server")  # the progress table, as in the simulation
    assert "dashboard: http://127.0.0.1:" in procs.log("server") and "?token=" in procs.log("server")
    status = json.loads((run_dir / "status.json").read_text())  # what the dashboard shows: the deployment's view
    assert status["state"] == "finished" and status["round"] == ROUNDS and status["enrolled"] is None
    assert status["clients"] and set(status["clients"]) <= {"client_000", "client_001", "client_002"}


@pytest.mark.slow  # the same crash-and-resume path as above; this one checks the port a port-0 server reuses
def test_a_server_on_port_0_resumes_on_the_port_it_bound(tmp_path, pki, procs, shared):
    cfg = shared[0]
    procs.cli("server", "server", str(_write(tmp_path, _with(cfg, tmp_path, 0))))
    run_dir = find_run_dir(tmp_path)
    record = run_dir / "server.json"
    wait_until(record.is_file, 300, "server.json")
    port = json.loads(record.read_text())["port"]
    assert port > 0
    for name in ("client_000", "client_001", "client_002"):
        procs.cli(name, "client", *client_args(port, pki, name))
    try:
        wait_until(lambda: (run_dir / "checkpoint.safetensors").is_file(), 300, "round 1's checkpoint")
        procs.kill("server")
        procs.cli("server", "server", "--resume", str(run_dir))
        assert procs.wait("server", 300) == 0
        for name in ("client_000", "client_001", "client_002"):
            assert procs.wait(name, 120) == 0
    except AssertionError:
        print(procs.logs())
        raise
    assert json.loads(record.read_text())["port"] == port
    assert procs.log("server").count(f"listening on 127.0.0.1:{port} (mutual TLS)") == 2  # first start, --resume
    _assert_same_model(load_state(run_dir / "checkpoint.safetensors").params, _oracle(shared, run_dir, tmp_path))


def test_cli_client_refused_exits_3_with_a_clear_message(tmp_path, pki, procs):
    """A revoked client and one whose certificate comes from another CA: `fedtune client` exits 3."""
    from fedtune.config.deployment import DeploymentConfig
    from fedtune.transport.grpc.server import GrpcServerTransport, ServerTLS

    dep = DeploymentConfig(
        port=0, tls_ca=str(pki / "ca.pem"), tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"),
        revocation_list=str(pki / "revoked.txt"), min_clients=1,
    )  # fmt: skip
    transport = GrpcServerTransport(dep, tls=ServerTLS.from_config(dep), config_yaml="seed: 0\n")
    port = transport.start()
    try:
        procs.cli("revoked", "client", *client_args(port, pki, "revoked"))
        procs.cli("intruder", "client", *client_args(port, pki, "intruder"), "--reconnect-timeout", "4")
        assert procs.wait("revoked", 60) == 3 and "has been revoked" in procs.log("revoked")
        assert procs.wait("intruder", 60) == 3 and "issued by the federation's CA" in procs.log("intruder")
    finally:
        transport.stop()
    assert transport.registry.live() == []


def test_killed_client_garbage_client_and_restarted_client(tmp_path, pki, procs):
    port = free_port()
    cfg = _config(tmp_path, pki, port, num_clients=3, rounds=5, max_message_mb=1)
    cfg["federation"]["clients_per_round"] = 3
    cfg["eval"] = {"every": 100, "baseline": False, "max_examples_per_client": 20}
    config = _write(tmp_path, cfg)
    procs.cli("server", "server", str(config))
    procs.cli("client_000", "client", *client_args(port, pki, "client_000"))
    victim = [FAULT_CLIENT, "slow", "--slow-round", "1", *client_args(port, pki, "client_001")]
    procs.start("victim", victim)
    procs.start("evil", [FAULT_CLIENT, "evil", *client_args(port, pki, "client_002")])
    try:
        wait_until(lambda: "FAULT: training round 1" in procs.log("victim"), 90, "the victim to start round 1")
        procs.kill("victim")  # SIGKILL mid-round: only missed heartbeats tell the server
        wait_until(lambda: "client client_001 presumed dead" in procs.log("server"), 60, "heartbeat detection")
        procs.cli("victim", "client", *client_args(port, pki, "client_001"))  # it comes back
        assert procs.wait("server", 120) == 0
        for name in ("client_000", "victim", "evil"):
            assert procs.wait(name, 120) == 0, name
    except AssertionError:
        print(procs.logs())
        raise
    records = _records(find_run_dir(tmp_path))
    failures: dict[tuple[int, str], str] = {}  # (round, client) -> every reason, training and evaluation
    for r in records:
        if r["kind"] == "failure":
            failures[(r["round"], r["client_id"])] = failures.get((r["round"], r["client_id"]), "") + r["reason"]
    accepted = {(r["round"], r["client_id"]) for r in records if r["kind"] == "client"}
    assert "no heartbeat" in failures[(1, "client_001")]
    assert (1, "client_000") in accepted  # round 1 completed with the one good client left
    assert any(cid == "client_001" for rnd, cid in accepted if rnd >= 2)  # the restarted client rejoined
    assert "not a fedtune.v1.Chunk" in failures[(1, "client_002")]
    assert "NaN or Inf" in failures[(2, "client_002")]
    assert "expected float32" in failures[(3, "client_002")]
    assert (4, "client_002") in accepted  # the first of the duplicates
    assert "exceeds the limit" in failures[(5, "client_002")]
    rounds = [r for r in records if r["kind"] == "round"]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4, 5] and all(r["clients_ok"] >= 1 for r in rounds)
    told = procs.log("evil")
    for words in (
        "attack=garbage accepted=False reason=message 0 is not a fedtune.v1.Chunk",
        "attack=nan accepted=False",
        "attack=shape accepted=False",
        "attack=duplicate accepted=True",
        "attack=duplicate accepted=False reason=unknown or closed task",
        "attack=oversized accepted=False reason=tensor 'delta/values' has dimension 400000",
    ):
        assert words in told, words
    assert "rejected result from client client_002" in procs.log("server")
