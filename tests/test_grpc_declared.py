"""Example counts declared at Join bound what a client's later replies may claim (issue #13, bounded
influence): on 127.0.0.1 with mutual TLS, a lying client is weighted as it declared or refused
(deployment.over_declared), a rejoin cannot raise its count, and real participants declare their own."""

from __future__ import annotations

import re
import threading

import numpy as np
import pytest
import yaml

from _grpc_support import (
    REPO,
    RawClient,
    client_args,
    deployment_section,
    digits_data,
    free_port,
    server_starter,
)
from _models import DIGITS_CNN
from fedtune.config.schema import ClientConfig
from fedtune.core.messages import ClientFailure, ClientUpdate, FitInstruction
from fedtune.transport.codecs import build_codec
from fedtune.transport.grpc import protocol, wire

pytestmark = pytest.mark.timeout(900)  # an upper bound for a loaded machine, not a speed test
DIGEST = "0123456789abcdef"
N = 100
FAULT_CLIENT = str(REPO / "tests" / "grpc_fault_client.py")


@pytest.fixture
def start(pki):
    with server_starter(
        pki, min_clients=1, max_clients=8, poll_s=0.3, heartbeat_s=0.5, missed_heartbeats=60, round_timeout_s=300
    ) as make:
        yield make


def _round(transport, names: list[str]) -> tuple[threading.Thread, list]:
    replies: list = []
    instructions = [FitInstruction(n, 1, np.zeros(N, np.float32), DIGEST, 0, ClientConfig(lr=0.1)) for n in names]
    thread = threading.Thread(target=lambda: replies.extend(transport.fit(instructions)), daemon=True)
    thread.start()
    return thread, replies


def _answer(client: RawClient, cid: str, claimed: int):
    task = client.pull_task(timeout=120)
    update = ClientUpdate(cid, task.header.round, claimed, np.full(N, 0.5, np.float32), DIGEST, {})
    payload, _ = protocol.update_payload(
        update, task_id=task.header.task_id, session="", codec=build_codec("none"), residual=None
    )
    return client.push(payload)


def _fit_round(transport, claims: dict[str, tuple[RawClient, int]]) -> tuple[dict, dict]:
    """One fit round in which each client claims its count: (PushReply by client, reply by client)."""
    thread, replies = _round(transport, list(claims))
    pushed = {cid: _answer(client, cid, claimed) for cid, (client, claimed) in claims.items()}
    thread.join(300)
    assert not thread.is_alive(), "the round did not finish"
    return pushed, {r.client_id: r for r in replies}


def test_a_claim_above_the_count_declared_at_join_is_weighted_as_declared(start, pki, caplog):
    transport = start()  # over_declared: cap (the default)
    liar, honest = RawClient(transport.port, pki, "client_000"), RawClient(transport.port, pki, "client_001")
    liar.join(declared_examples=10)
    honest.join(declared_examples=7)
    pushed, replies = _fit_round(transport, {"client_000": (liar, 10**6), "client_001": (honest, 7)})
    assert pushed["client_000"].accepted and pushed["client_001"].accepted
    assert replies["client_000"].num_examples == 10  # weighted as declared, not as claimed
    assert replies["client_001"].num_examples == 7
    assert "claims 1000000 training examples, more than the 10 it declared when it joined" in caplog.text

    # a rejoin declaring more keeps the first count; declaring less lowers it
    liar.join(declared_examples=10**6)
    assert transport.servicer.declarations.count("client_000") == 10
    assert "more than the 10 it declared before: 10 stays in force" in caplog.text
    pushed, replies = _fit_round(transport, {"client_000": (liar, 500)})
    assert replies["client_000"].num_examples == 10
    liar.join(declared_examples=3)
    pushed, replies = _fit_round(transport, {"client_000": (liar, 5)})
    assert replies["client_000"].num_examples == 3
    for client in (liar, honest):
        client.close()


def test_over_declared_refuse_refuses_the_lying_update_and_undeclared_ones_when_required(start, pki):
    transport = start(over_declared="refuse", require_declared_examples=True)
    liar, silent = RawClient(transport.port, pki, "client_000"), RawClient(transport.port, pki, "client_001")
    honest = RawClient(transport.port, pki, "client_002")
    liar.join(declared_examples=10)
    silent.join()  # declares nothing
    honest.join(declared_examples=10)
    pushed, replies = _fit_round(
        transport, {"client_000": (liar, 11), "client_001": (silent, 1), "client_002": (honest, 10)}
    )
    assert not pushed["client_000"].accepted
    assert "claims 11 training examples, more than the 10 it declared when it joined" in pushed["client_000"].reason
    assert not pushed["client_001"].accepted and "declared no example count" in pushed["client_001"].reason
    assert isinstance(replies["client_000"], ClientFailure) and isinstance(replies["client_001"], ClientFailure)
    assert isinstance(replies["client_002"], ClientUpdate) and replies["client_002"].num_examples == 10
    for client in (liar, silent, honest):
        client.close()


def test_participants_declare_their_own_count_and_a_lying_one_is_refused(tmp_path, pki, procs):
    """Real processes: two ``fedtune client`` participants declare the training examples of their own data at
    Join; a hostile client declares 50 and claims 10^12 with updates of 1e30s. Under ``over_declared:
    refuse`` its every update is refused at the wire, with the reason sent to it, and the two honest
    clients complete every round."""
    port = free_port()
    deployment = deployment_section(pki, port, min_clients=3, over_declared="refuse", require_declared_examples=True)
    cfg = {
        "seed": 5,
        "model": DIGITS_CNN,
        "data": digits_data(3),
        "federation": {"rounds": 2, "clients_per_round": 3},
        "client": {"local_steps": 3, "batch_size": 16, "lr": 0.01},
        "eval": {"every": 100, "baseline": False, "max_examples_per_client": 20},
        "run": {"out_dir": str(tmp_path / "runs"), "plot": False, "threads": 1},
        "deployment": deployment,
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    procs.cli("server", "server", str(tmp_path / "config.yaml"))
    for name in ("client_000", "client_001"):
        procs.cli(name, "client", *client_args(port, pki, name))
    procs.start("liar", [FAULT_CLIENT, "inflate", "--declare", "50", *client_args(port, pki, "client_002")])
    try:
        assert procs.wait("server", 600) == 0
        for name in ("client_000", "client_001", "liar"):
            assert procs.wait(name, 120) == 0, name
    except AssertionError:
        print(procs.logs())
        raise
    server_log = " ".join(procs.log("server").split())
    for name in ("client_000", "client_001"):
        # what the participant counted in its own data is what the server recorded
        (counted,) = re.findall(r"(\d+) training examples;", procs.log(name))
        assert f"client {name}: at most {counted} training examples (declared at Join)" in server_log
    assert "client client_002: at most 50 training examples (declared at Join)" in server_log
    refusals = re.findall(r"REPLY round=(\d) attack=inflate accepted=False reason=(.*)", procs.log("liar"))
    assert [r for r, _ in refusals] == ["1", "2"], procs.log("liar")
    assert all("claims 1000000000000 training examples, more than the 50 it declared" in why for _, why in refusals)
    assert "round 2/2" in server_log or "finished round 2" in server_log
    assert wire.PROTOCOL  # the protocol version is unchanged: the declaration is a new, optional field
