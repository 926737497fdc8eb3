"""The wire and the server's resource limits under attack, on 127.0.0.1 with real TLS: malformed headers are
refused with a reason before anything is allocated, results are bound to the task, session and round they
answer, and one enrolled client's stalled uploads (refused beyond deployment.max_streams_per_client, cancelled
at deployment.upload_timeout_s) do not stop honest clients from completing a round."""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import sys
import threading

import grpc
import numpy as np
import pytest

from _grpc_support import Heartbeats, RawClient, server_starter, wait_until
from fedtune.config.schema import ClientConfig
from fedtune.core.messages import ClientFailure, ClientUpdate, FitInstruction
from fedtune.transport.codecs import build_codec
from fedtune.transport.grpc import protocol, wire
from fedtune.transport.grpc.proto import fedtune_pb2 as pb

DIGEST = "0123456789abcdef"
N = 1000


@pytest.fixture
def start(pki):
    with server_starter(
        pki,
        min_clients=1,
        max_clients=16,
        poll_s=0.3,
        heartbeat_s=0.5,
        missed_heartbeats=60,  # nobody is presumed dead because the machine is loaded
        round_timeout_s=120,
        shutdown_grace_s=0.5,
    ) as make:
        yield make


def _fit(cid: str, round_idx: int = 1) -> FitInstruction:
    return FitInstruction(cid, round_idx, np.arange(N, dtype=np.float32), DIGEST, 0, ClientConfig(lr=0.1))


def _update(task: wire.Payload, cid: str) -> wire.Payload:
    update = ClientUpdate(cid, task.header.round, 7, np.full(N, 0.5, np.float32), DIGEST, {"train_loss": 1.5})
    payload, _ = protocol.update_payload(
        update, task_id=task.header.task_id, session="", codec=build_codec("none"), residual=None
    )
    return payload


class Round:
    def __init__(self, method, instructions) -> None:
        self.replies: list = []
        self.thread = threading.Thread(target=lambda: self.replies.extend(method(instructions)), daemon=True)
        self.thread.start()

    def result(self, timeout: float = 120.0) -> dict[str, object]:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the round did not finish"
        return {r.client_id: r for r in self.replies}


def _header_only(task: wire.Payload, own_session: str, **fields) -> pb.Chunk:
    """A result header for ``task`` (one float32 tensor of ``shape``), with any field overridden."""
    shape = fields.pop("shape", (N,))
    header = pb.Header(
        protocol=wire.PROTOCOL,
        kind=pb.FIT_RESULT,
        task_id=task.header.task_id,
        round=task.header.round,
        session=own_session,
        spec_digest=DIGEST,
        scalars_json='{"num_examples": 1}',
    )
    header.tensors.append(pb.TensorMeta(name="delta/values", dtype=pb.FLOAT32, shape=shape))
    header.payload_bytes = 4 * int(np.prod(shape, dtype=object))
    for key, value in fields.items():
        setattr(header, key, value)
    return pb.Chunk(header=header)


def test_malformed_headers_and_unbound_results_are_refused_with_a_reason(start, pki):
    transport = start()  # deployment.max_message_mb at its default (4 GiB): the task's size is what bounds
    clients = {n: RawClient(transport.port, pki, n) for n in ("client_000", "client_001")}
    for client in clients.values():
        client.join()
    a, b = clients["client_000"], clients["client_001"]

    def attempt(header: pb.Chunk) -> str:
        rnd = Round(transport.fit, [_fit("client_000")])
        task = a.pull_task()
        reply = a.stub.Push(iter([_header_only(task, a.session, **header)]), timeout=60)  # the body never comes
        assert not reply.accepted
        (failure,) = rnd.result().values()
        assert isinstance(failure, ClientFailure) and failure.reason.startswith("rejected: ")
        return reply.reason

    # a leading zero hiding 2^63 (a traceback on the old server), and a declaration far above the task's size
    assert "alone exceeds the limit" in attempt({"shape": (0, 2**63)})
    # 1 GiB for a 1,000-value task: the bound is the task's largest result, 12 bytes a value + 64 KiB
    assert f"exceeds the limit of {12 * N + 65536} bytes" in attempt({"shape": (1 << 28,)})
    assert f"at least 80000 bytes exceeds the limit of {12 * N + 65536} bytes" in attempt({"shape": (2 * N, 10)})
    assert "rank 9" in attempt({"shape": (1,) * 9})
    assert "protocol version 7" in attempt({"protocol": 7})
    assert "session" in attempt({"session": "0" * 32})  # not the session the task was delivered to
    assert "for round 5, the task was for round 1" in attempt({"round": 5})

    # a result for another client's task names that, and does not fail the other client's task
    rnd = Round(transport.fit, [_fit("client_000")])
    task = a.pull_task()
    reply = b.push(_update(task, "client_001"))
    assert not reply.accepted and "issued to another client" in reply.reason
    assert a.push(_update(task, "client_000")).accepted
    assert isinstance(rnd.result()["client_000"], ClientUpdate)
    for client in clients.values():
        client.close()


def _stalled_upload(channel: grpc.Channel, header: pb.Chunk, release: threading.Event, out: list) -> None:
    """Send a header, then nothing until ``release``: what a flooder holding the server's threads does."""

    def stream():
        yield header.SerializeToString()
        release.wait(300)

    push = channel.stream_unary("/fedtune.v1.Federation/Push", None, pb.PushReply.FromString)
    try:
        reply = push(stream(), timeout=300)
        out.append(("refused", reply.reason) if not reply.accepted else ("accepted", ""))
    except grpc.RpcError as err:
        out.append((err.code().name, err.details() or ""))


def test_stalled_uploads_of_one_client_do_not_stop_the_honest_ones(start, pki, caplog):
    per_client, stalled = 3, 96
    transport = start(max_streams_per_client=per_client, upload_timeout_s=8)
    honest = {n: RawClient(transport.port, pki, n) for n in ("client_000", "client_001")}
    beats = []
    for client in honest.values():
        client.join()
        beats.append(Heartbeats(client, 0.5))
    flooder = RawClient(transport.port, pki, "client_007")
    flooder.join()  # enrolled: the attack comes from a valid certificate, and it stays alive
    beats.append(Heartbeats(flooder, 0.5))
    # one round for all three; the flooder stalls uploads that name its own open task, so each passes the
    # header checks and waits for a body that never comes
    rnd = Round(transport.fit, [_fit(n) for n in [*honest, "client_007"]])
    header = _header_only(flooder.pull_task(), flooder.session)
    release, outcomes, threads, held = threading.Event(), [], [], []
    channels = [RawClient(transport.port, pki, "client_007").channel for _ in range(8)]  # 8 connections
    try:
        for i in range(stalled):
            t = threading.Thread(target=_stalled_upload, args=(channels[i % 8], header, release, outcomes))
            t.start()
            threads.append(t)
        for name, client in honest.items():  # meanwhile the honest clients train: every update accepted
            held.append(transport.servicer.slots.held("client_007"))
            reply = client.push(_update(client.pull_task(), name))
            assert reply.accepted, reply.reason
        replies = rnd.result()
        assert all(isinstance(replies[n], ClientUpdate) for n in honest)
        # the flooder's task failed when the server cancelled its first stalled upload at the deadline
        flooded = replies["client_007"]
        assert isinstance(flooded, ClientFailure) and "upload_timeout_s=8s" in flooded.reason
        # every stalled upload ends without the flooder's help: refused at once, or cancelled by the server
        for t in threads:
            t.join(240)
        assert len(outcomes) == stalled
        held.append(transport.servicer.slots.held("client_007"))
    finally:
        release.set()
        for beat in beats:
            beat.end()
    assert max(held) <= per_client
    kinds = [kind for kind, _ in outcomes]
    # refused by the servicer, cancelled at the server's deadline, or refused by HTTP/2 itself beyond the
    # connection's grpc.max_concurrent_streams (RST_STREAM, which the client sees as UNAVAILABLE)
    assert set(kinds) <= {"refused", "CANCELLED", "UNAVAILABLE"}, outcomes
    assert all("RST_STREAM" in reason for kind, reason in outcomes if kind == "UNAVAILABLE")
    # the first upload to pass the header checks held its slot until the server's deadline cancelled it (and
    # with it the flooder's task); only the deadline ends an upload whose body never comes
    assert kinds.count("CANCELLED") >= 1
    # refused: beyond the flooder's streams, or naming the task its first cancelled upload closed
    assert all(
        "max_streams_per_client" in reason or "unknown or closed task" in reason
        for kind, reason in outcomes
        if kind == "refused"
    )
    assert "upload_timeout_s=8s; cancelled" in caplog.text
    assert transport.servicer.slots.held("client_007") == 0


_FLOODER = """
import resource, socket, sys
n, port = int(sys.argv[1]), int(sys.argv[2])
sources = sys.argv[3].split(",") if len(sys.argv) > 3 else ["127.0.0.1"]  # the flood's source addresses
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 256), hard))
held, failed = [], 0
for i in range(n):
    try:  # TCP only: no TLS, no certificate
        source = (sources[i % len(sources)], 0)
        held.append(socket.create_connection(("127.0.0.1", port), timeout=10, source_address=source))
    except OSError:
        failed += 1
print(f"OPEN {len(held)} FAILED {failed}", flush=True)
sys.stdin.read()  # hold every socket until the test is done
"""


def _flood(port: int, n: int, sources: list[str]) -> tuple[subprocess.Popen, int]:
    """A process holding ``n`` idle TCP connections from ``sources`` (round robin); (it, how many opened)."""
    flood = subprocess.Popen(
        [sys.executable, "-c", _FLOODER, str(n), str(port), ",".join(sources)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    opened = flood.stdout.readline()
    assert opened.startswith("OPEN "), opened
    return flood, int(opened.split()[1])


def _end(flood: subprocess.Popen) -> None:
    flood.kill()
    flood.wait(10)


@contextlib.contextmanager
def _fd_limit(headroom: int):
    """This process's soft descriptor limit lowered to what it uses now plus ``headroom`` (restored after), so
    that a flood larger than ``headroom`` would exhaust the server's descriptors if nothing shed it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + headroom, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_flood_of_idle_connections_does_not_keep_honest_clients_out(start, pki):
    """1,500 TCP connections that never start TLS, against a server with 400 spare descriptors: the server
    caps connections (deployment.max_connections) and closes those that do not finish the handshake within
    deployment.handshake_timeout_s, so honest clients join and complete a round while the flood is held."""
    with _fd_limit(400):
        # gRPC's own limits, as when deployment.connection_gate is off (the gate's tests follow)
        transport = start(max_connections=100, handshake_timeout_s=2, connection_gate=False)
        # certificates read now: under the flood, a descriptor for a file would be as scarce as for a socket
        honest = {n: RawClient(transport.port, pki, n) for n in ("client_000", "client_001")}
        flood, _ = _flood(transport.port, 1500, ["127.0.0.1"])
        try:
            for client in honest.values():
                client.join(wait=True)  # retried by gRPC until the server has shed the flood
            rnd = Round(transport.fit, [_fit(n) for n in honest])
            for name, client in honest.items():
                assert client.push(_update(client.pull_task(), name)).accepted
            replies = rnd.result()
            assert all(isinstance(replies[n], ClientUpdate) for n in honest)
            assert flood.poll() is None  # the flood was held open the whole time
            for client in honest.values():
                client.close()
        finally:
            _end(flood)


def test_a_participant_waits_out_a_server_at_its_call_limit(start, pki):
    """Calls beyond deployment.max_concurrent_rpcs are refused by gRPC (RESOURCE_EXHAUSTED): a participant
    retries them instead of giving up, and joins once the calls holding the server end."""
    import io

    from rich.console import Console

    from fedtune.transport.grpc.client import ClientTLS, Participant

    transport = start(max_concurrent_rpcs=2, max_streams_per_client=3)
    flooder = RawClient(transport.port, pki, "client_007")
    release, outcomes = threading.Event(), []

    def nothing():  # a request stream that sends no message until released
        release.wait(300)
        yield from ()

    def stall_without_sending():
        push = flooder.channel.stream_unary("/fedtune.v1.Federation/Push", None, pb.PushReply.FromString)
        try:
            push(nothing(), timeout=300)
        except grpc.RpcError as err:
            outcomes.append(err.code().name)

    stalls = [threading.Thread(target=stall_without_sending, daemon=True) for _ in range(2)]
    for t in stalls:
        t.start()
    wait_until(lambda: transport.servicer.slots.held("client_007") == 2, 60, "both stalls to hold the server")

    out = io.StringIO()
    console = Console(file=out, width=200)
    tls = ClientTLS.from_paths(pki / "ca.pem", pki / "clients/client_000.pem", pki / "clients/client_000.key")
    participant = Participant(
        f"127.0.0.1:{transport.port}",
        tls,
        make_worker=lambda joined: object(),
        reconnect_timeout_s=120,
        console=console,
    )
    codes = []
    runner = threading.Thread(target=lambda: codes.append(participant.run()), daemon=True)
    runner.start()
    wait_until(lambda: "retrying" in out.getvalue(), 60, "the participant to be refused and retry")
    assert runner.is_alive() and transport.registry.live() == []
    flooder.close()  # the stalled calls end: the server has room again
    wait_until(lambda: transport.registry.live() == ["client_000"], 60, "the participant to join")
    transport.close(reason="done")
    runner.join(60)
    release.set()
    assert codes == [0], out.getvalue()
    assert "retrying" in out.getvalue() and "refused" not in out.getvalue()


def test_the_gate_caps_unauthenticated_connections_per_address_and_honest_clients_complete_rounds(start, pki):
    """3,000 idle TCP connections from one address (127.0.0.2), held for the whole test, against a server
    with 400 spare descriptors whose handshake timeout (600 s) never sheds them: the connection gate keeps
    deployment.max_unauthenticated_per_address of them and closes the rest at accept, so honest clients
    (127.0.0.1) join and complete a round while the flood is held."""
    with _fd_limit(400):
        transport = start(handshake_timeout_s=600, max_unauthenticated_per_address=8, max_unauthenticated=64)
        honest = {n: RawClient(transport.port, pki, n) for n in ("client_000", "client_001")}
        flood, opened = _flood(transport.port, 3000, ["127.0.0.2"])
        try:
            assert opened > 400  # more than the server's spare descriptors: without the gate they would run out

            def accounted() -> bool:  # every connection the flood opened has been kept or refused by the gate
                stats = transport.gate.stats()
                return (
                    stats.pending_by_address.get("127.0.0.2", 0) + stats.refused_by_address.get("127.0.0.2", 0)
                    >= opened
                )

            wait_until(accounted, 300, "the gate to take in the whole flood")
            assert transport.gate.stats().pending_by_address == {"127.0.0.2": 8}
            for client in honest.values():
                client.join(wait=True)
            rnd = Round(transport.fit, [_fit(n) for n in honest])
            for name, client in honest.items():
                assert client.push(_update(client.pull_task(), name)).accepted
            replies = rnd.result()
            assert all(isinstance(replies[n], ClientUpdate) for n in honest)
            stats = transport.gate.stats()
            assert flood.poll() is None and stats.pending_by_address.get("127.0.0.2") == 8  # still held
            assert stats.authenticated >= 2 and "127.0.0.1" not in stats.refused_by_address
            for client in honest.values():
                client.close()
        finally:
            _end(flood)


def test_a_flood_from_many_addresses_fills_only_the_total_and_authenticated_clients_go_on(start, pki):
    """What the gate does not stop (docs/THREATS.md): 400 connections from 10 addresses fill the total of
    unauthenticated connections (32), so a *new* client is refused while the flood is held; a client that
    authenticated before keeps completing rounds, and once the flood ends new clients get in."""
    transport = start(handshake_timeout_s=600, max_unauthenticated_per_address=8, max_unauthenticated=32)
    early = RawClient(transport.port, pki, "client_000")
    early.join(wait=True)
    beats = Heartbeats(early, 0.5)
    sources = [f"127.0.0.{i}" for i in range(2, 12)]
    flood, opened = _flood(transport.port, 400, sources)
    try:

        def accounted() -> bool:
            stats = transport.gate.stats()
            return (
                sum(stats.pending_by_address.get(a, 0) + stats.refused_by_address.get(a, 0) for a in sources) >= opened
            )

        wait_until(accounted, 300, "the gate to take in the whole flood")
        stats = transport.gate.stats()
        assert stats.pending == 32 and max(stats.pending_by_address.values()) <= 8
        late = RawClient(transport.port, pki, "client_001")
        with pytest.raises(grpc.RpcError) as refused:
            late.join()  # closed at accept: the total is full
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        rnd = Round(transport.fit, [_fit("client_000")])  # the authenticated client is not affected
        assert early.push(_update(early.pull_task(), "client_000")).accepted
        assert isinstance(rnd.result()["client_000"], ClientUpdate)
    finally:
        _end(flood)
    wait_until(lambda: transport.gate.stats().pending == 0, 300, "the flood's connections to close")
    late.join(wait=True)
    beats.end()
    for client in (early, late):
        client.close()
