"""GrpcServerTransport: the Transport protocol over gRPC, with clients that connect in.

Clients join (identity = their TLS certificate's CN), send heartbeats, long-poll for tasks and push
results. ``fit``/``evaluate`` queue one task per instruction and yield replies as they arrive; at the
round deadline the stragglers are yielded as failures and their late results refused. A client that dies
(missed heartbeats), restarts (rejoins) or leaves fails its open task at once, so the round goes on.

Every result is checked before it is yielded (wire format, size, task ownership, codec, length, finite
values, spec digest); a bad one is logged, the client is told why in its PushReply, and the round
continues with the others. The coordinator's loop re-validates what it receives, independently.

Secure aggregation (Bonawitz et al. 2017; ``secure_aggregation=True``): fit tasks tell the client to keep
its update, and its result is a placeholder with no tensors. The SecAgg summer then drives the
protocol's five message rounds through ``secagg_exchange`` (the SecAggNetwork seam of
fedtune.privacy.secagg.driver): one task per client and stage (kinds SECAGG_*), collected with the same
inbox and deadline machinery as training; whoever has not answered at the stage's deadline has dropped.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, replace
from pathlib import Path

import grpc

from fedtune.config.deployment import TIME_BUDGET_OPTION, DeploymentConfig
from fedtune.core.messages import ClientEval, ClientFailure, EvalInstruction, FitInstruction, Reply
from fedtune.errors import ConfigError, FedtuneError
from fedtune.transport.base import Capabilities
from fedtune.transport.grpc import protocol, wire
from fedtune.transport.grpc.auth import Authenticator
from fedtune.transport.grpc.dispatch import LiveFit
from fedtune.transport.grpc.gate import ConnectionGate
from fedtune.transport.grpc.limits import server_options
from fedtune.transport.grpc.proto import fedtune_pb2 as pb
from fedtune.transport.grpc.registry import Registry, Task
from fedtune.transport.grpc.servicer import Servicer, add_servicer

log = logging.getLogger("fedtune.server")


class QuorumError(FedtuneError):
    """Fewer than deployment.min_clients clients connected within deployment.quorum_timeout_s."""


@dataclass(frozen=True)
class ServerTLS:
    ca: bytes
    cert: bytes
    key: bytes

    @classmethod
    def from_config(cls, dep: DeploymentConfig) -> ServerTLS:
        if not (dep.tls_ca and dep.tls_cert and dep.tls_key):
            raise ConfigError(
                "the server needs deployment.tls_ca, deployment.tls_cert and deployment.tls_key "
                "(create a first set with `fedtune certs OUT_DIR --clients a,b`)"
            )
        return cls(_read(dep.tls_ca, "tls_ca"), _read(dep.tls_cert, "tls_cert"), _read(dep.tls_key, "tls_key"))


def _read(path: str, key: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as err:
        raise ConfigError(f"deployment.{key}: cannot read {path} ({err.strerror})") from None


def grpc_options(dep: DeploymentConfig) -> list[tuple[str, int]]:
    """Channel options both sides share: one message is one chunk plus headroom for the header."""
    message = dep.chunk_kb * 1024 + wire.MAX_SCALARS_JSON + (1 << 20)
    return [
        ("grpc.max_receive_message_length", message),
        ("grpc.max_send_message_length", message),
    ]


class GrpcServerTransport:
    """Implements fedtune.transport.base.Transport. ``start()`` before use; ``close()`` tells clients to exit."""

    def __init__(
        self,
        dep: DeploymentConfig,
        *,
        tls: ServerTLS,
        config_yaml: str,
        extra: dict | None = None,
        secure_aggregation: bool = False,
    ):
        self.dep, self.secure_aggregation = dep, secure_aggregation
        # started for SecAgg, it carries the protocol's message rounds and its clients keep their updates;
        # otherwise it also dispatches fits one at a time (FedBuff: ``Dispatch``, through ``self.live``)
        self.capabilities = Capabilities(secure_sum=secure_aggregation, asynchronous=not secure_aggregation)
        self.limits = wire.Limits(dep.max_payload_bytes, dep.chunk_kb * 1024)
        self.registry = Registry(dead_after_s=dep.dead_after_s, max_clients=dep.max_clients)
        # caps connections that have not authenticated, per source address and in all (gate.py)
        self.gate = (
            ConnectionGate(per_address=dep.max_unauthenticated_per_address, total=dep.max_unauthenticated)
            if dep.connection_gate
            else None
        )
        auth = Authenticator(
            allowed=dep.allowed_clients,
            revocation_list=Path(dep.revocation_list).expanduser() if dep.revocation_list else None,
            on_identified=self.gate.authenticated if self.gate is not None else None,
        )
        self.servicer = Servicer(
            self.registry,
            auth,
            self.limits,
            dep=dep,
            config_yaml=config_yaml,
            extra=extra or {},
            secure_aggregation=secure_aggregation,
        )
        self.live = LiveFit(self.registry, dep)  # asynchronous fit: fedtune.transport.base.Dispatch
        self.tls = tls
        self.port: int | None = None
        self._server: grpc.Server | None = None

    def start(self) -> int:
        """Listen on deployment.address:port; returns the bound port."""
        # one thread per admitted call at most: a flood of calls is refused by gRPC, never queued on threads
        limit = self.dep.rpc_limit
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=limit, thread_name_prefix="fedtune-rpc"),
            options=[
                *grpc_options(self.dep),
                *server_options(self.dep),
                ("grpc.so_reuseport", 0),  # a second server on a busy port must fail, not share it
            ],
            maximum_concurrent_rpcs=limit,
        )
        add_servicer(server, self.servicer)
        creds = grpc.ssl_server_credentials(
            [(self.tls.key, self.tls.cert)], root_certificates=self.tls.ca, require_client_auth=True
        )
        address = f"{self.dep.address}:{self.dep.port}"
        # behind the gate, gRPC listens on loopback only and the gate owns the public address
        listen = "127.0.0.1:0" if self.gate is not None else address
        try:
            port = server.add_secure_port(listen, creds)
        except RuntimeError as err:
            raise FedtuneError(f"cannot listen on {listen}: {err} (port in use?)") from None
        if not port:
            raise FedtuneError(f"cannot listen on {listen} (port in use, or not an address of this machine?)")
        server.start()
        if self.gate is not None:
            try:
                port = self.gate.start(self.dep.address, self.dep.port, port)
            except OSError as err:
                server.stop(None)
                raise FedtuneError(f"{err} (port in use, or not an address of this machine?)") from None
        self._server, self.port = server, port
        log.info("listening on %s:%d (TLS, client certificates required)", self.dep.address, port)
        return port

    # ------------------------------------------------------------------------------------ Transport

    def client_ids(self) -> list[str]:
        """The enrolled clients (sorted: every client that has joined, live or not), after waiting for the
        quorum of deployment.min_clients live ones."""
        need, started = self.dep.min_clients, time.monotonic()
        live = self.registry.live()
        while len(live) < need:
            waited = time.monotonic() - started
            if waited >= self.dep.quorum_timeout_s:
                raise QuorumError(
                    f"only {len(live)} of deployment.min_clients={need} clients connected within "
                    f"deployment.quorum_timeout_s={self.dep.quorum_timeout_s:g}s ({', '.join(live) or 'none'})"
                )
            log.info("waiting for clients: %d of %d connected %s", len(live), need, live)
            live = self.registry.wait_for(need, min(10.0, self.dep.quorum_timeout_s - waited))
        return self.registry.enrolled()

    def fit(self, instructions: Sequence[FitInstruction]) -> Iterator[Reply | ClientFailure]:
        shared = _SharedPrepare()
        tasks, inbox = [], queue.Queue()
        for instr in instructions:
            task_id = Task.new_id()
            if self.dep.partial_work:  # the client stops in time and sends what it has (client/partial.py)
                budget = self.dep.partial_work_share * self.dep.round_timeout_s
                instr = replace(instr, options={**instr.options, TIME_BUDGET_OPTION: budget})
            payload = protocol.fit_payload(instr, task_id)
            if self.secure_aggregation:
                payload.scalars["secure_aggregation"] = True  # keep the update: SecAgg's tasks follow
            prepared = shared.prepare(instr.params, payload)
            tasks.append(Task(instr.client_id, pb.FIT, instr.round, payload, prepared, inbox, task_id=task_id))
        return self._collect(tasks, self.dep.round_timeout_s, "training")

    def secagg_exchange(self, round_idx: int, stage: str, messages: Mapping[str, bytes]) -> dict[str, bytes]:
        """One stage of a SecAgg round: send each client its message, return the replies that arrive
        before the stage's deadline (``round_timeout_s``). A client that fails, dies (missed heartbeats)
        or is late has dropped; who answered is the CN of the certificate that pushed the reply."""
        if not self.secure_aggregation:
            raise FedtuneError("secagg_exchange on a transport started without secure_aggregation")
        kind, inbox, tasks = protocol.SECAGG_KINDS[stage], queue.Queue(), []
        for cid, message in messages.items():
            task_id = Task.new_id()
            payload = protocol.secagg_payload(kind, message, task_id=task_id, round_idx=round_idx)
            tasks.append(Task(cid, kind, round_idx, payload, wire.prepare(payload.tensors), inbox, task_id=task_id))
        replies = {}
        for reply in self._collect(tasks, self.dep.round_timeout_s, f"secure aggregation ({stage})"):
            if isinstance(reply, ClientFailure):
                log.warning(
                    "client %s dropped out of secure aggregation round %d at %s: %s",
                    reply.client_id,
                    round_idx,
                    stage,
                    reply.reason,
                )
            else:
                replies[reply.client_id] = reply.message
        return replies

    def evaluate(self, instructions: Sequence[EvalInstruction]) -> Iterator[ClientEval | ClientFailure]:
        shared = _SharedPrepare()
        tasks, inbox = [], queue.Queue()
        for instr in instructions:
            task_id = Task.new_id()
            payload = protocol.eval_payload(instr, task_id)
            prepared = shared.prepare(instr.params, payload)
            tasks.append(Task(instr.client_id, pb.EVALUATE, instr.round, payload, prepared, inbox, task_id=task_id))
        return self._collect(tasks, self.dep.eval_timeout_s or self.dep.round_timeout_s, "evaluation")

    def _collect(self, tasks: list[Task], timeout: float, what: str) -> Iterator:
        """Queue the tasks, then yield replies as they arrive until all are in or the deadline passes."""
        if not tasks:
            return
        inbox, open_ = tasks[0].inbox, {t.task_id: t for t in tasks}
        deadline = time.monotonic() + timeout
        for task in tasks:
            self.registry.assign(task)
        try:
            while open_:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    task_id, reply = inbox.get(timeout=min(left, 0.25))
                except queue.Empty:
                    for cid in self.registry.reap():
                        log.warning("client %s presumed dead (missed heartbeats)", cid)
                    continue
                open_.pop(task_id, None)
                yield reply
            expired = self.registry.expire(list(open_.values()))
            while not inbox.empty():  # answered in the instant before the deadline
                task_id, reply = inbox.get_nowait()
                open_.pop(task_id, None)
                yield reply
            for task in expired:
                reason = f"straggler: no {what} reply within {timeout:g}s; dropped from round {task.round}"
                log.warning("client %s: %s", task.client_id, reason)
                yield ClientFailure(task.client_id, task.round, reason)
        finally:
            self.registry.expire(list(open_.values()))  # the caller stopped early: close what is left

    # ------------------------------------------------------------------------------------ Dispatch (async)

    def connected(self) -> list[str]:
        return self.live.connected()

    def dispatch(self, instruction: FitInstruction) -> None:
        self.live.dispatch(instruction)

    def next_reply(self, timeout: float) -> Reply | ClientFailure | None:
        return self.live.next_reply(timeout)

    def abandon(self) -> None:
        self.live.abandon()

    def close(self, *, ok: bool = True, reason: str = "the federation finished") -> None:
        """Tell every client to exit (with ``reason``), wait up to shutdown_grace_s, stop listening."""
        if self._server is None:
            return
        self.registry.close({"ok": ok, "reason": reason})
        self.registry.wait_told(self.dep.shutdown_grace_s)
        self.stop()

    def stop(self) -> None:
        """Stop listening without telling clients (they keep reconnecting: for a server that will restart)."""
        if self._server is not None:
            self._server.stop(grace=1.0).wait(5.0)
            if self.gate is not None:  # after the server: what it sent last (a SHUTDOWN) is relayed first
                self.gate.stop()
            self._server = None


class _SharedPrepare:
    """Hash and lay out each distinct parameter vector once per round, however many clients receive it."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, tuple[str, ...]], wire.Prepared] = {}

    def prepare(self, params: object, payload: wire.Payload) -> wire.Prepared:
        key = (id(params), tuple(payload.tensors))
        if key not in self._cache or len(payload.tensors) > 1:  # extras differ per client: no sharing
            self._cache[key] = wire.prepare(payload.tensors)
        return self._cache[key]
