"""The participant loop: join, heartbeat, long-poll for tasks, run them on a ClientWorker, push results.

Under secure aggregation (the fit task says so, and the client refuses to send its update in the clear
when its configuration has ``privacy.secure_aggregation``) the update never leaves this process: the fit
result carries only the example count and metrics, and the update is kept in a SecAggPeer that answers
the round's five SecAgg tasks (its quantised, masked vector and the protocol's shares), then discarded.

The worker holds only this participant's data. Connection trouble (server down or restarting) means
rejoin with exponential backoff, up to ``reconnect_timeout_s``; being refused (revoked, unknown, wrong
protocol) is fatal. ``run`` returns the process exit code:

0  the federation finished          1  the server stopped the federation with an error
2  local configuration or data error  3  cannot connect, or refused by the server
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import yaml
from rich.console import Console

from fedtune.client.worker import ClientWorker
from fedtune.core.messages import ClientUpdate, failure_of
from fedtune.errors import FedtuneError, UpdateRejected
from fedtune.privacy.errors import SecAggAbort
from fedtune.privacy.secagg.deploy import participant_peer
from fedtune.privacy.secagg.peer import SecAggPeer
from fedtune.transport.codecs import Codec, build_codec
from fedtune.transport.grpc import protocol, wire
from fedtune.transport.grpc.proto import fedtune_pb2 as pb
from fedtune.transport.grpc.proto import fedtune_pb2_grpc as pb_grpc

log = logging.getLogger("fedtune.client")

# Refusals that retrying cannot fix.
_FATAL = {
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
# Within a session, RESOURCE_EXHAUSTED is the server shedding load (its deployment.max_concurrent_rpcs or
# max_streams_per_client): wait and ask again. Only at Join does it mean "full" (deployment.max_clients).
_FATAL_IN_SESSION = _FATAL - {grpc.StatusCode.RESOURCE_EXHAUSTED}
_BUSY_RETRIES = 5
# TLS failures look like "unavailable" to gRPC; these words in the details mean retrying is pointless.
# Words of a TLS failure that retrying cannot fix (a server certificate this client does not trust). A bare
# "Handshake read failed (... Connection reset by peer)" is not one of them: it is what a client sees while
# the server restarts after a crash, and it must retry.
_TLS_WORDS = ("certificate", "ssl", "tls", "alert")
_TRANSIENT_WORDS = ("reset by peer", "connection refused", "socket closed")
MAX_MESSAGE = 16 * 2**20 + wire.MAX_SCALARS_JSON + 2**20  # the largest chunk a server may be configured to send
_SECAGG_STAGES = {kind: stage for stage, kind in protocol.SECAGG_KINDS.items()}


class ParticipantError(FedtuneError):
    """Why the participant stops; ``code`` is its exit status."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ClientTLS:
    ca: bytes
    cert: bytes
    key: bytes
    server_name: str | None = None  # override the name checked against the server certificate's SANs

    @classmethod
    def from_paths(cls, ca: Path, cert: Path, key: Path, server_name: str | None = None) -> ClientTLS:
        def read(path: Path, what: str) -> bytes:
            try:
                return Path(path).expanduser().read_bytes()
            except OSError as err:
                raise ParticipantError(f"cannot read the {what} {path}: {err.strerror}", 2) from None

        return cls(
            read(ca, "CA certificate (--ca)"), read(cert, "certificate (--cert)"), read(key, "key (--key)"), server_name
        )


@dataclass(frozen=True)
class Joined:
    """What the server told this client when it joined."""

    session: str
    client_id: str
    config_yaml: str
    heartbeat_s: float
    poll_s: float
    limits: wire.Limits
    codec: Codec
    extra: dict
    secure_aggregation: bool = False  # the server's configuration has privacy.secure_aggregation
    declared_examples: int = 0  # the training examples this session declared at Join (0: none)


@dataclass
class _Beat:
    stop: threading.Event = field(default_factory=threading.Event)
    lost: bool = False
    fatal: ParticipantError | None = None
    thread: threading.Thread | None = None

    def end(self) -> None:
        """Stop the heartbeat thread and wait for it: gRPC aborts the process if a call outlives the channel."""
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=30.0)


class Participant:
    def __init__(
        self,
        target: str,
        tls: ClientTLS,
        *,
        make_worker: Callable[[Joined], ClientWorker],
        reconnect_timeout_s: float = 300.0,
        console: Console | None = None,
        count_examples: Callable[[ClientWorker, str], int] | None = None,
    ) -> None:
        """``count_examples(worker, client_id)``: the training examples this participant declares when it
        joins (its replies then claim at most these; deploy.participant.count_examples). None: none declared."""
        self.target, self.tls, self.make_worker = target, tls, make_worker
        self.reconnect_timeout_s = reconnect_timeout_s
        self.console = console or Console(stderr=True)
        self.worker: ClientWorker | None = None
        self.count_examples = count_examples
        self.joined_as: str | None = None  # the client id (certificate CN) the server read, once joined
        self._config_yaml: str | None = None
        self._residuals: dict[str, np.ndarray] = {}  # top-k error feedback, per client id (kept across rounds)
        self._secagg: tuple[int, SecAggPeer] | None = None  # (round, the peer holding this round's update)
        self._jitter = random.Random()  # backoff jitter only: not a reproducibility stream
        self._max_backoff_s = 10.0  # lowered to the server's heartbeat pace once it is known
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.keepalive_time_ms", 10_000),  # notice a vanished server while waiting on a long poll
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ]
        if tls.server_name:
            options.append(("grpc.ssl_target_name_override", tls.server_name))
        creds = grpc.ssl_channel_credentials(tls.ca, tls.key, tls.cert)
        self.channel = grpc.secure_channel(target, creds, options=options)
        self.stub = pb_grpc.FederationStub(self.channel)

    # ------------------------------------------------------------------------------------ top level

    def run(self) -> int:
        try:
            while True:
                joined = self._join()
                beat = self._start_heartbeat(joined)
                try:
                    self._ensure_worker(joined)
                    if not joined.declared_examples and self._declared_examples():
                        # enrolment declares the count of training examples, known once the worker has read
                        # this participant's own data: join again, before any task was taken, to declare it
                        beat.end()
                        joined = self._join()
                        beat = self._start_heartbeat(joined)
                    finished = self._serve(joined, beat)
                except FedtuneError as err:
                    self._leave(joined, str(err))  # so the server stops sampling us now, and knows why
                    raise
                finally:
                    beat.end()
                if finished is not None:
                    ok, reason = finished
                    self.console.print(("[green]" if ok else "[red]") + f"server: {reason}")
                    return 0 if ok else 1
        except ParticipantError as err:
            self.console.print(f"[bold red]error:[/bold red] {err}")
            return err.code
        except FedtuneError as err:
            self.console.print(f"[bold red]error:[/bold red] {err}")
            return 2
        finally:
            self.channel.close()

    def _leave(self, joined: Joined, reason: str) -> None:
        with contextlib.suppress(grpc.RpcError):  # best effort: the server also notices missing heartbeats
            self.stub.Leave(pb.LeaveRequest(session=joined.session, reason=reason[: protocol.MAX_REASON]), timeout=15)

    def _refused(self, err: grpc.RpcError) -> ParticipantError:
        return ParticipantError(f"the server at {self.target} refused this client: {err.details()}", 3)

    def _declared_examples(self) -> int:
        """The training examples this participant declares at Join (its fits claim at most these); 0 before
        its worker has read the local data, or when it has no ``count_examples``."""
        if self.count_examples is None or self.worker is None or self.joined_as is None:
            return 0
        return self.count_examples(self.worker, self.joined_as)

    def _join(self) -> Joined:
        delay, started, closed = 0.5, time.monotonic(), 0
        declared = self._declared_examples()
        while True:
            try:
                request = pb.JoinRequest(protocol=wire.PROTOCOL, software="fedtune", declared_examples=declared)
                reply = self.stub.Join(request, timeout=15)
                break
            except grpc.RpcError as err:
                details = (err.details() or "").lower()
                shedding = "concurrent rpc limit" in details  # the server is busy (max_concurrent_rpcs), not full
                if err.code() in _FATAL and not shedding:
                    raise self._refused(err) from None
                waited = time.monotonic() - started
                tls_fatal = any(w in details for w in _TLS_WORDS) and not any(w in details for w in _TRANSIENT_WORDS)
                if waited >= self.reconnect_timeout_s or tls_fatal:
                    raise ParticipantError(
                        f"could not join the server at {self.target} ({waited:.0f}s): {err.details()}. Check the "
                        "address, that the server runs, that --ca is the federation's CA, and that this client's "
                        "certificate was issued by it and is not revoked",
                        3,
                    ) from None
                closed = closed + 1 if "socket closed" in details else 0
                hint = ""
                if closed >= 3:  # TCP connects but TLS is cut off: what a server does to a certificate it rejects
                    hint = (
                        " (the server closes the connection during the TLS handshake: is this client's "
                        "certificate issued by the federation's CA?)"
                    )
                self.console.print(f"server {self.target} unavailable{hint}; retrying in {delay:.1f}s")
                time.sleep(delay * (0.5 + self._jitter.random()))
                delay = min(delay * 2, self._max_backoff_s)
        limits = wire.Limits(reply.max_payload_bytes or 1, reply.chunk_bytes or 1 << 20)
        codec = build_codec(reply.codec or "none", **json.loads(reply.codec_params_json or "{}"))
        self.console.print(f"joined {self.target} as [bold]{reply.client_id}[/bold] (codec {codec.name})")
        self.joined_as = reply.client_id
        # after a server restart, retry about as often as the server expects heartbeats
        self._max_backoff_s = min(10.0, max(1.0, 2 * (reply.heartbeat_s or 5.0)))
        return Joined(
            reply.session,
            reply.client_id,
            reply.config_yaml,
            reply.heartbeat_s or 5.0,
            reply.poll_s or 20.0,
            limits,
            codec,
            json.loads(reply.extra_json or "{}"),
            _secagg_configured(reply.config_yaml),
            declared,
        )

    def _ensure_worker(self, joined: Joined) -> None:
        if self.worker is None:
            self.worker = self.make_worker(joined)
            self._config_yaml = joined.config_yaml
        elif joined.config_yaml != self._config_yaml:
            raise ParticipantError(
                "the server's configuration changed since this client built its model; restart the client", 2
            )

    def _start_heartbeat(self, joined: Joined) -> _Beat:
        beat = _Beat()

        def loop() -> None:
            while not beat.stop.wait(joined.heartbeat_s):
                try:
                    request = pb.HeartbeatRequest(session=joined.session)
                    self.stub.Heartbeat(request, timeout=max(2.0, joined.heartbeat_s))
                except grpc.RpcError as err:
                    if err.code() in _FATAL_IN_SESSION:
                        beat.fatal = self._refused(err)
                        return
                    if err.code() == grpc.StatusCode.NOT_FOUND:
                        beat.lost = True
                        return

        beat.thread = threading.Thread(target=loop, name="fedtune-heartbeat", daemon=True)
        beat.thread.start()
        return beat

    # ------------------------------------------------------------------------------------ session

    def _serve(self, joined: Joined, beat: _Beat) -> tuple[bool, str] | None:
        """Pull and run tasks until SHUTDOWN ((ok, reason)) or the session is lost (None: rejoin)."""
        while True:
            if beat.fatal is not None:
                raise beat.fatal
            if beat.lost:
                return None
            try:
                payload = wire.decode(self.stub.Pull(pb.PullRequest(session=joined.session)), joined.limits)
            except grpc.RpcError as err:
                if err.code() in _FATAL_IN_SESSION:
                    raise self._refused(err) from None
                if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    self.console.print(f"server busy ({err.details()}); asking again")
                    time.sleep(min(joined.poll_s, 1.0))
                    continue
                self.console.print(f"lost the server ({err.code().name}: {err.details()}); rejoining")
                return None
            except wire.WireError as err:
                raise ParticipantError(f"the server sent a malformed task: {err}", 1) from None
            kind = payload.header.kind
            if kind == pb.SHUTDOWN:
                return bool(payload.scalars.get("ok", True)), str(payload.scalars.get("reason", "finished"))
            if kind in (pb.FIT, pb.EVALUATE) and not self._run_task(joined, payload):
                return None
            if kind in _SECAGG_STAGES and not self._run_secagg(joined, payload):
                return None

    def _run_task(self, joined: Joined, payload: wire.Payload) -> bool:
        """Run one task and push its result; False if the connection broke."""
        assert self.worker is not None
        h, cid = payload.header, joined.client_id
        started = time.perf_counter()
        residual = None
        try:
            if h.kind == pb.FIT:
                self._secagg = None  # a new round: whatever an earlier round held is gone
                instr = protocol.fit_from_payload(payload, cid)
                held = bool(payload.scalars.get("secure_aggregation"))
                if joined.secure_aggregation and not held:
                    raise UpdateRejected(
                        "the configuration has privacy.secure_aggregation but the task asks for the update in "
                        "the clear; refusing to send it"
                    )
                update = self.worker.fit(instr)
                if held:
                    peer = participant_peer(
                        update,
                        ca=self.tls.ca,
                        cert=self.tls.cert,
                        key=self.tls.key,
                        config_yaml=joined.config_yaml,
                        seed=instr.seed,
                        round_idx=instr.round,
                    )
                    self._secagg = (instr.round, peer)
                    out = protocol.held_update_payload(update, task_id=h.task_id, session=joined.session)
                    what = _describe_fit(update) + "; update kept for secure aggregation"
                else:
                    out, residual = protocol.update_payload(
                        update,
                        task_id=h.task_id,
                        session=joined.session,
                        codec=joined.codec,
                        residual=self._residuals.get(cid),
                    )
                    what = _describe_fit(update)
            else:
                result = self.worker.evaluate(protocol.eval_from_payload(payload, cid))
                out = protocol.eval_result_payload(result, task_id=h.task_id, session=joined.session)
                what = f"evaluated {result.sums.examples} examples"
        except (FedtuneError, ValueError, KeyError, TypeError, RuntimeError) as err:
            failure = failure_of(cid, h.round, err, reason=f"{type(err).__name__}: {err}")  # typed: its cause
            out = protocol.failure_payload(
                failure.reason, task_id=h.task_id, round_idx=h.round, session=joined.session, cause=failure.cause
            )
            what = f"[red]failed: {err}[/red]"
        reply = self._push(joined, out, f"round {h.round} {'train' if h.kind == pb.FIT else 'eval'}", what, started)
        if reply is None:
            return False
        if reply.accepted and residual is not None:
            self._residuals[cid] = residual  # only what the server took leaves the error-feedback residual
        return True

    def _run_secagg(self, joined: Joined, payload: wire.Payload) -> bool:
        """Answer one SecAgg task with the peer holding this round's update; False if the connection broke.
        A refusal (the protocol's own checks, tampering, no update held) is sent as a failure: this client
        drops out of the round, which the protocol survives while enough others remain."""
        h, stage, started = payload.header, _SECAGG_STAGES[payload.header.kind], time.perf_counter()
        held = self._secagg
        try:
            if held is None or held[0] != h.round:
                raise SecAggAbort(f"no update is held for round {h.round} (did this client restart?)")
            message = self.respond_secagg(held[1], stage, protocol.secagg_message(payload, "the server's task"))
            out = protocol.secagg_payload(
                pb.SECAGG_RESULT, message, task_id=h.task_id, round_idx=h.round, session=joined.session
            )
            what = f"answered {stage}"
            if held[1].finished:
                self._secagg = None  # the round's secrets are no longer needed
        except (SecAggAbort, UpdateRejected) as err:
            self._secagg = None
            out = protocol.failure_payload(
                f"{type(err).__name__}: {err}", task_id=h.task_id, round_idx=h.round, session=joined.session
            )
            what = f"[red]dropped out: {err}[/red]"
        return self._push(joined, out, f"round {h.round} secure aggregation", what, started) is not None

    def respond_secagg(self, peer: SecAggPeer, stage: str, message: bytes) -> bytes:
        """The peer's answer to one stage's message (a subclass may intercept it, e.g. to inject faults)."""
        return peer.respond(message)

    def _push(self, joined: Joined, out: wire.Payload, label: str, what: str, started: float) -> pb.PushReply | None:
        """Stream ``out`` to the server and print one line; None if the connection broke."""
        sent = 0

        def counted() -> Iterator[pb.Chunk]:  # streamed lazily: a large update is never copied whole
            nonlocal sent
            for chunk in wire.encode(out, chunk_bytes=joined.limits.chunk_bytes):
                sent += chunk.ByteSize()
                yield chunk

        for attempt in range(_BUSY_RETRIES + 1):
            try:
                reply = self.stub.Push(counted())
                break
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and attempt < _BUSY_RETRIES:
                    time.sleep(1.0)  # the server is shedding load: the task is still ours, send it again
                    sent = 0
                    continue
                if err.code() in _FATAL_IN_SESSION:
                    raise self._refused(err) from None
                self.console.print(f"{label}: could not send the result ({err.code().name}); rejoining")
                return None
        seconds = time.perf_counter() - started
        verdict = "accepted" if reply.accepted else f"[yellow]rejected: {reply.reason}[/yellow]"
        self.console.print(f"{label}: {what}; sent {sent / 1e3:.1f} kB in {seconds:.1f}s; {verdict}")
        return reply

    def close(self) -> None:
        self.channel.close()


def _secagg_configured(config_yaml: str) -> bool:
    try:
        config = yaml.safe_load(config_yaml) or {}
    except yaml.YAMLError:
        return False  # building the worker reports the bad configuration
    privacy = config.get("privacy") if isinstance(config, dict) else None
    return isinstance(privacy, dict) and bool(privacy.get("secure_aggregation"))


def _describe_fit(update: ClientUpdate) -> str:
    loss = update.metrics.get("train_loss", float("nan"))
    steps = int(update.metrics.get("steps", 0))
    rate = update.metrics.get("examples_per_s")
    speed = f" ({rate:.1f} examples/s)" if rate else ""
    return f"{steps} steps on {update.num_examples} examples{speed}, loss {loss:.4f}"
