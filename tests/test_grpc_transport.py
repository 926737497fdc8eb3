"""GrpcServerTransport over real TLS sockets on 127.0.0.1, driven by hand-written clients in this process.

Each bad input (garbage bytes, wrong shape, wrong spec digest, NaN, oversized, duplicate, replay,
another client's task) is rejected with a reason the client receives, and the round yields the good
update and a failure per bad one. Authentication, deadlines, heartbeats, rejoin and quorum are here too.
"""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest

from _grpc_support import Heartbeats, RawClient, server_starter
from fedtune.config.schema import ClientConfig
from fedtune.core.messages import ClientFailure, ClientUpdate, EvalInstruction, FitInstruction
from fedtune.transport.codecs import build_codec
from fedtune.transport.grpc import protocol, wire
from fedtune.transport.grpc.proto import fedtune_pb2 as pb
from fedtune.transport.grpc.server import QuorumError

pytestmark = pytest.mark.timeout(600)  # a guard against a hang, not a speed test
DIGEST = "0123456789abcdef"
N = 1000


@pytest.fixture
def start(pki):
    with server_starter(
        pki,
        revocation_list=str(pki / "revoked.txt"),
        min_clients=1,
        poll_s=0.3,
        heartbeat_s=0.5,
        round_timeout_s=20,
        shutdown_grace_s=0.5,
    ) as make:
        yield make


def _client(transport, pki, name) -> RawClient:
    client = RawClient(transport.port, pki, name)
    client.join()
    return client


def _fit(cid: str, round_idx: int = 1, params: np.ndarray | None = None) -> FitInstruction:
    params = np.arange(N, dtype=np.float32) if params is None else params
    extras = {"c": np.ones(3, np.float32), "mask": np.array([1, 0], np.int8)}
    return FitInstruction(cid, round_idx, params, DIGEST, 0, ClientConfig(lr=0.1), extras, {"mu": np.float64(0.25)})


def _update(task: wire.Payload, cid: str, delta: np.ndarray | None = None, *, codec="none", digest=DIGEST):
    delta = np.full(N, 0.5, np.float32) if delta is None else delta
    update = ClientUpdate(cid, task.header.round, 7, delta, digest, {"train_loss": 1.5})
    payload, _ = protocol.update_payload(
        update, task_id=task.header.task_id, session="", codec=build_codec(codec), residual=None
    )
    return payload


class Round:
    """Run transport.fit (or evaluate) in a thread while the test plays the clients."""

    def __init__(self, method, instructions) -> None:
        self.replies: list = []
        self.thread = threading.Thread(target=lambda: self.replies.extend(method(instructions)), daemon=True)
        self.thread.start()

    def result(self, timeout: float | None = 30.0) -> dict[str, object]:
        self.thread.join(timeout)  # None: until the round ends (the test's timeout is the hang guard)
        assert not self.thread.is_alive(), "the round did not finish"
        return {r.client_id: r for r in self.replies}


def test_good_update_and_every_kind_of_bad_input_in_one_round(start, pki):
    transport = start(max_message_mb=0.05)  # 52 kB: the 4 kB update fits, 100 kB does not
    names = ["client_000", "client_001", "client_002", "client_003", "client_004", "client_005"]
    clients = {n: _client(transport, pki, n) for n in names}
    assert transport.client_ids() == names
    rnd = Round(transport.fit, [_fit(n) for n in names])
    tasks = {n: c.pull_task() for n, c in clients.items()}
    # the instruction arrived intact: params, strategy extras and options
    t0 = tasks["client_000"]
    fit = protocol.fit_from_payload(t0, "client_000")
    assert np.array_equal(fit.params, np.arange(N, dtype=np.float32)) and fit.options == {"mu": 0.25}
    assert fit.extras["c"].tolist() == [1, 1, 1] and fit.train == ClientConfig(lr=0.1)  # typed, across the wire
    assert fit.extras["mask"].dtype == np.int8 and fit.extras["mask"].tolist() == [1, 0]

    # client_001 tries to answer client_000's task: refused, and client_000's task stays open
    reply = clients["client_001"].push(_update(t0, "client_001"))
    assert not reply.accepted and "issued to another client" in reply.reason
    good = clients["client_000"].push(_update(t0, "client_000"))
    assert good.accepted, good.reason
    dup = clients["client_000"].push(_update(t0, "client_000"))
    assert not dup.accepted and "duplicate" in dup.reason

    nan = np.full(N, 0.5, np.float32)
    nan[[3, 9]] = np.nan

    def send(name: str, delta=None, **kw) -> pb.PushReply:
        return clients[name].push(_update(tasks[name], name, delta, **kw))

    bad = {
        "client_001": send("client_001", nan),
        "client_002": send("client_002", np.ones(N - 1, np.float32)),
        "client_003": send("client_003", digest="ffff"),
        "client_004": clients["client_004"].push_raw([b"\x00garbage\xff" * 10, b"more"]),
        "client_005": send("client_005", np.ones(25_000, np.float32)),
    }
    expected = {
        "client_001": "2 NaN or Inf values",
        "client_002": "expected float32[1000]",
        "client_003": "spec digest 'ffff' does not match",
        "client_004": "not a fedtune.v1.Chunk",
        "client_005": "exceeds the limit",
    }
    for name, reply in bad.items():
        assert not reply.accepted and expected[name] in reply.reason, (name, reply.reason)
    # the garbage named no task, but client_004 held only one: that one failed at once (no wait for the deadline)
    late = clients["client_004"].push(_update(tasks["client_004"], "client_004"))
    assert not late.accepted and "unknown or closed task" in late.reason

    out = rnd.result()
    assert isinstance(out["client_000"], ClientUpdate)
    upd = out["client_000"]
    assert np.array_equal(upd.delta, np.full(N, 0.5, np.float32)) and upd.num_examples == 7
    assert upd.metrics == {"train_loss": 1.5} and upd.bytes_up > 4000 and upd.bytes_down > 4000
    for name in ("client_001", "client_002", "client_003", "client_004", "client_005"):
        assert isinstance(out[name], ClientFailure) and expected[name] in out[name].reason


def test_replayed_result_from_an_earlier_round_is_refused(start, pki):
    transport = start()
    client = _client(transport, pki, "client_000")
    rnd = Round(transport.fit, [_fit("client_000", 1)])
    first = _update(client.pull_task(), "client_000")
    assert client.push(first).accepted
    rnd.result()
    rnd = Round(transport.fit, [_fit("client_000", 2)])
    task2 = client.pull_task()
    replay = client.push(first)
    assert not replay.accepted and "unknown or closed task" in replay.reason
    # a result that claims the new task but an old round is refused too
    stale = _update(task2, "client_000")
    stale.header.round = 1
    reply = client.push(stale)
    assert not reply.accepted and "for round 1, the task was for round 2" in reply.reason
    assert isinstance(rnd.result()["client_000"], ClientFailure)


def test_straggler_is_dropped_at_the_deadline_and_its_late_result_refused(start, pki):
    transport = start(round_timeout_s=1.0)
    fast, slow = _client(transport, pki, "client_000"), _client(transport, pki, "client_001")
    beats = Heartbeats(slow, 0.2)
    started = time.monotonic()
    rnd = Round(transport.fit, [_fit("client_000"), _fit("client_001")])
    assert fast.push(_update(fast.pull_task(), "client_000")).accepted
    late_task = slow.pull_task()
    out = rnd.result()
    assert time.monotonic() - started > 0.9  # the deadline was waited for (no upper bound: the machine may be loaded)
    assert isinstance(out["client_000"], ClientUpdate)
    assert "straggler" in out["client_001"].reason
    late = slow.push(_update(late_task, "client_001"))
    assert not late.accepted and "unknown or closed task" in late.reason
    beats.end()


def test_heartbeats_detect_a_dead_client_mid_round(start, pki):
    transport = start(heartbeat_s=0.2, missed_heartbeats=2)
    alive, dead = _client(transport, pki, "client_000"), _client(transport, pki, "client_001")
    beats = Heartbeats(alive, 0.1)
    rnd = Round(transport.fit, [_fit("client_000"), _fit("client_001")])
    dead.pull_task()  # ... and then it goes silent, as a killed process would
    task = alive.pull_task()
    time.sleep(0.8)
    assert alive.push(_update(task, "client_000")).accepted
    out = rnd.result(timeout=10)
    assert isinstance(out["client_000"], ClientUpdate)
    assert "no heartbeat" in out["client_001"].reason
    assert transport.registry.live() == ["client_000"]
    # the population rounds sample from is every enrolled client: a dead one is sampled and fails, so who
    # happens to be connected cannot steer the sample (issue #13, item 8)
    assert transport.client_ids() == ["client_000", "client_001"]
    beats.end()


def test_restarted_client_rejoins_and_its_lost_task_fails_at_once(start, pki):
    transport = start()
    old = _client(transport, pki, "client_000")
    rnd = Round(transport.fit, [_fit("client_000")])
    old.pull_task()
    new = _client(transport, pki, "client_000")  # same certificate, a new process
    out = rnd.result(timeout=5)
    assert "restarted and rejoined" in out["client_000"].reason
    with pytest.raises(grpc.RpcError) as err:
        old.pull()
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    rnd = Round(transport.fit, [_fit("client_000", 2)])
    assert new.push(_update(new.pull_task(), "client_000")).accepted
    assert isinstance(rnd.result()["client_000"], ClientUpdate)


def test_unknown_revoked_and_unlisted_clients_are_refused(start, pki):
    transport = start(allowed_clients=["client_000", "client_001", "revoked"])
    intruder = RawClient(transport.port, pki, "intruder")  # certificate from another CA
    with pytest.raises(grpc.RpcError) as err:
        intruder.join()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # the TLS handshake fails
    for name, words in (("revoked", "has been revoked"), ("client_002", "not in this federation")):
        with pytest.raises(grpc.RpcError) as err:
            RawClient(transport.port, pki, name).join()
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and words in err.value.details()
    # revocation takes effect live, without a restart
    client = _client(transport, pki, "client_001")
    revoked = pki / "revoked.txt"
    original = revoked.read_text()
    try:
        revoked.write_text(original + "client_001\n")
        with pytest.raises(grpc.RpcError) as err:
            client.heartbeat()
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        revoked.write_text(original)


def test_a_client_cannot_claim_another_identity(start, pki):
    """The session token of one client is useless with another client's certificate."""
    transport = start()
    a, b = _client(transport, pki, "client_000"), RawClient(transport.port, pki, "client_001")
    b.session = a.session  # b stole a's token
    with pytest.raises(grpc.RpcError) as err:
        b.pull()
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_quorum_timeout_names_who_is_missing(start, pki):
    transport = start(min_clients=2, quorum_timeout_s=0.5)
    _client(transport, pki, "client_000")
    with pytest.raises(QuorumError, match=r"only 1 of deployment.min_clients=2 .*client_000"):
        transport.client_ids()


def test_int8_update_and_evaluation_over_the_wire(start, pki):
    transport = start()
    client = _client(transport, pki, "client_000")
    rnd = Round(transport.fit, [_fit("client_000")])
    delta = np.linspace(-1, 1, N, dtype=np.float32)
    assert client.push(_update(client.pull_task(), "client_000", delta, codec="int8")).accepted
    upd = rnd.result()["client_000"]
    np.testing.assert_allclose(upd.delta, delta, atol=1 / 127)
    assert upd.bytes_up < 2000  # ~1 byte a value instead of 4
    residual = {"lora/residual/layer.q_proj": np.arange(12, dtype=np.float32).reshape(3, 4)}  # the rest of the model
    ev = Round(
        transport.evaluate, [EvalInstruction("client_000", 1, np.zeros(N, np.float32), DIGEST, 8, None, residual)]
    )
    task = client.pull_task()
    assert task.header.kind == pb.EVALUATE
    received = protocol.eval_from_payload(task, "client_000")
    assert list(received.extras) == list(residual)
    np.testing.assert_array_equal(received.extras["lora/residual/layer.q_proj"], residual["lora/residual/layer.q_proj"])
    from fedtune.core.messages import ClientEval
    from fedtune.tasks.base import EvalSums

    result = ClientEval("client_000", 1, EvalSums(3.0, 6, 2, 4))
    assert client.push(protocol.eval_result_payload(result, task_id=task.header.task_id, session="")).accepted
    assert ev.result()["client_000"].sums == EvalSums(3.0, 6, 2, 4)


def test_close_tells_clients_why(start, pki):
    transport = start()
    client = _client(transport, pki, "client_000")
    closer = threading.Thread(target=transport.close, kwargs={"ok": False, "reason": "quorum lost"})
    closer.start()
    payload = client.pull()
    closer.join(10)
    assert payload.header.kind == pb.SHUTDOWN and payload.scalars == {"ok": False, "reason": "quorum lost"}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_payload_above_2gb_streams_both_ways(start, pki):
    """gRPC caps one message at 2 GB; chunked streaming carries a 2.1 GB vector down and back up. How long
    that takes depends on the machine's load: no step has a deadline of its own (the round's is beyond the
    test's, and so is the liveness check's: a gap between heartbeats while gigabytes are copied is not a
    dead client), the test's timeout is the one hang guard."""
    n = 2**29 + 2**24  # 553M float32 values = 2.21 GB
    transport = start(max_message_mb=4096, chunk_kb=4096, round_timeout_s=3600, heartbeat_s=3600, idle_timeout_s=7200)
    client = _client(transport, pki, "client_000")
    params = np.ones(n, np.float32)
    params[-1] = 7.0
    rnd = Round(transport.fit, [_fit("client_000", params=params)])
    task = client.pull_task(timeout=None)
    got = task.tensors["params"]
    assert got.nbytes > 2**31 and got[-1] == 7.0 and got[0] == 1.0
    delta = got  # send it back as the update (zero-copy)
    update = ClientUpdate("client_000", 1, 1, delta, DIGEST)
    payload, _ = protocol.update_payload(
        update, task_id=task.header.task_id, session="", codec=build_codec("none"), residual=None
    )
    assert client.push(payload, chunk_bytes=4 << 20, timeout=None).accepted
    del task, got, delta, payload
    upd = rnd.result(timeout=None)["client_000"]
    assert upd.delta.size == n and upd.delta[-1] == 7.0 and upd.bytes_up > 2**31
