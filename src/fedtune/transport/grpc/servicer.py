"""The gRPC handlers of fedtune.v1.Federation (server side).

Every handler first establishes who is calling from the TLS certificate (Authenticator), then acts on
the Registry. Push receives *raw bytes* (no generated deserializer), so a garbage byte stream reaches
our decoder, is rejected with a reason, and the client is told that reason in its PushReply instead of
an opaque gRPC error.

A result's header is checked against the open task it names before its body is read (``_admit``): the task
must be the caller's, delivered to the session the header names, for the same round, and the body may be
at most the size such a task's result can have (protocol.result_budget), so nothing larger is allocated.
Each client holds at most ``deployment.max_streams_per_client`` Pull/Push streams, and every upload is
cancelled ``deployment.upload_timeout_s`` after it started (limits.py).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import grpc

from fedtune.config.deployment import DeploymentConfig
from fedtune.core.messages import ClientFailure
from fedtune.errors import UpdateRejected
from fedtune.transport.grpc import protocol, wire
from fedtune.transport.grpc.auth import Authenticator, AuthError
from fedtune.transport.grpc.declared import Declarations
from fedtune.transport.grpc.limits import StreamSlots
from fedtune.transport.grpc.proto import fedtune_pb2 as pb
from fedtune.transport.grpc.registry import SHUTDOWN, Registry, SecAggReply, SessionError, Task

log = logging.getLogger("fedtune.server")
SERVICE = "fedtune.v1.Federation"

_EXPECTED = {pb.FIT: pb.FIT_RESULT, pb.EVALUATE: pb.EVAL_RESULT} | dict.fromkeys(
    protocol.SECAGG_KINDS.values(), pb.SECAGG_RESULT
)


class _Counted:
    """Iterates raw request messages and counts their bytes (what the client put on the wire)."""

    def __init__(self, raw: Iterator[bytes]) -> None:
        self.raw, self.nbytes = raw, 0

    def __iter__(self) -> Iterator[bytes]:
        for message in self.raw:
            self.nbytes += len(message)
            yield message


class Servicer:
    def __init__(
        self,
        registry: Registry,
        auth: Authenticator,
        limits: wire.Limits,
        *,
        dep: DeploymentConfig,
        config_yaml: str,
        extra: dict[str, Any],
        secure_aggregation: bool = False,
    ) -> None:
        self.registry, self.auth, self.limits, self.dep = registry, auth, limits, dep
        self.config_yaml, self.extra = config_yaml, extra
        self.secure_aggregation = secure_aggregation  # fit results must then carry no update
        self.slots = StreamSlots(dep.max_streams_per_client)
        # example counts declared at Join bound later fit results (declared.py)
        self.declarations = Declarations(
            refuse_over=dep.over_declared == "refuse", required=dep.require_declared_examples
        )

    def _busy(self, cid: str) -> str:
        return (
            f"client {cid!r} already has {self.slots.per_client} open streams "
            "(deployment.max_streams_per_client); finish one first"
        )

    def _who(self, context: grpc.ServicerContext) -> str:
        try:
            return self.auth.identify(context)
        except AuthError as err:
            log.warning("refused %s: %s", context.peer(), err)
            self.registry.refuse(err.client_id or context.peer(), str(err))
            context.abort(err.code, str(err))
            raise  # unreachable: abort raises

    def _session(self, cid: str, token: str, context: grpc.ServicerContext):
        try:
            return self.registry.touch(cid, token)
        except SessionError as err:
            context.abort(grpc.StatusCode.NOT_FOUND, str(err))
            raise

    # ------------------------------------------------------------------------------------ handlers

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        cid = self._who(context)
        if request.protocol != wire.PROTOCOL:
            reason = f"client speaks protocol {request.protocol}, this server speaks {wire.PROTOCOL}: upgrade fedtune"
            self.registry.refuse(cid, reason)
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, reason)
        if self.registry.closed:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the federation has finished")
        try:
            session, rejoined = self.registry.join(cid)
        except UpdateRejected as err:
            self.registry.refuse(cid, str(err))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
            raise
        log.info("client %s %s from %s", cid, "rejoined" if rejoined else "joined", context.peer())
        declared = self.declarations.record(cid, request.declared_examples)
        if declared is not None:
            log.info("client %s: at most %d training examples (declared at Join)", cid, declared)
        dep = self.dep
        codec_params = {"int8": {"block": dep.codec_block}, "topk": {"fraction": dep.topk_fraction}}
        return pb.JoinReply(
            session=session.token,
            client_id=cid,
            config_yaml=self.config_yaml,
            heartbeat_s=dep.heartbeat_s,
            poll_s=dep.poll_s,
            max_payload_bytes=self.limits.max_payload_bytes,
            chunk_bytes=self.limits.chunk_bytes,
            codec=dep.codec,
            codec_params_json=json.dumps(codec_params.get(dep.codec, {})),
            extra_json=json.dumps(self.extra),
        )

    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatReply:
        self._session(self._who(context), request.session, context)
        return pb.HeartbeatReply(ok=True)

    def Leave(self, request: pb.LeaveRequest, context: grpc.ServicerContext) -> pb.LeaveReply:
        cid = self._who(context)
        reason = request.reason[: protocol.MAX_REASON]  # the client's own words: bounded before they are logged
        self.registry.leave(cid, request.session, reason)
        if reason:
            log.warning("client %s left: %s", cid, reason)
        else:
            log.info("client %s left", cid)
        return pb.LeaveReply()

    def Pull(self, request: pb.PullRequest, context: grpc.ServicerContext) -> Iterator[pb.Chunk]:
        cid = self._who(context)
        session = self._session(cid, request.session, context)
        if not self.slots.take(cid):
            log.warning("refused a poll: %s", self._busy(cid))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, self._busy(cid))
        try:
            try:
                item = self.registry.take(session, self.dep.poll_s)
            except SessionError as err:
                context.abort(grpc.StatusCode.NOT_FOUND, str(err))
            if item is None or item is SHUTDOWN:
                kind = pb.IDLE if item is None else pb.SHUTDOWN
                scalars = self.registry.shutdown_reason if item is SHUTDOWN else {}
                header = pb.Header(kind=kind)
                yield from wire.encode(wire.Payload(header, scalars), chunk_bytes=self.limits.chunk_bytes)
                return
            yield from self._stream_task(item)
        finally:
            self.slots.give(cid)

    def _stream_task(self, task: Task) -> Iterator[pb.Chunk]:
        sent, complete = 0, False
        try:
            for chunk in wire.encode(task.payload, chunk_bytes=self.limits.chunk_bytes, prepared=task.prepared):
                sent += chunk.ByteSize()
                yield chunk
            complete = True
            task.bytes_down = sent
        finally:
            if not complete:  # the client went away mid-stream: it will pull the task again
                self.registry.requeue(task)

    def Push(self, request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> pb.PushReply:
        cid = self._who(context)
        if not self.slots.take(cid):
            return self._reject(cid, "", self._busy(cid))
        # the server's own deadline: a stalled upload frees its thread and slot whatever the client asked for
        expired = threading.Event()
        timer = threading.Timer(self.dep.upload_timeout_s, self._cancel_upload, (cid, context, expired))
        timer.daemon = True
        timer.start()
        try:
            return self._push(cid, request_iterator, expired)
        except Exception as err:  # a defect of ours: logged in full here, the client gets a reason, not a traceback
            log.exception("internal error handling a result from client %s", cid)
            return self._reject(cid, "", f"internal error on the server ({type(err).__name__}); see its log")
        finally:
            timer.cancel()
            self.slots.give(cid)

    def _cancel_upload(self, cid: str, context: grpc.ServicerContext, expired: threading.Event) -> None:
        log.warning("client %s: %s", cid, self._expired_reason())
        expired.set()
        context.cancel()

    def _expired_reason(self) -> str:
        return f"upload not complete within deployment.upload_timeout_s={self.dep.upload_timeout_s:g}s; cancelled"

    def _admit(self, cid: str, admitted: list[Task]) -> wire.Admit:
        """The decoder's header check: the open task the header names, and the bytes its result may carry."""

        def admit(header: pb.Header) -> int:
            try:
                task = self.registry.peek(header.task_id, cid)
            except UpdateRejected as err:
                raise wire.WireError(str(err)) from None
            if header.session != task.session:
                raise wire.WireError(
                    f"result names session {header.session[:8]!r} but task {header.task_id[:16]!r} was delivered to "
                    f"session {str(task.session)[:8]!r}: a result from another connection or process of this client"
                )
            if header.round != task.round:
                raise wire.WireError(f"result is for round {header.round}, the task was for round {task.round}")
            admitted.append(task)
            if header.kind == pb.FAILURE:
                return 0
            numel = task.payload.tensors["params"].size if task.kind == pb.FIT else 0
            return protocol.result_budget(task.kind, numel, self.limits.max_payload_bytes)

        return admit

    def _push(self, cid: str, request_iterator: Iterator[bytes], expired: threading.Event) -> pb.PushReply:
        counted, admitted = _Counted(request_iterator), []
        try:
            payload = wire.decode(counted, self.limits, self._admit(cid, admitted))
        except wire.WireError as err:
            reason = self._expired_reason() if expired.is_set() else str(err)
            if err.header is not None:
                return self._reject(cid, err.header.task_id, reason)
            # Undecodable from the first byte, so it names no task; a participant works on one task at a
            # time, so it can only have meant the one it holds: fail that now rather than at the deadline.
            return self._reject(cid, self.registry.only_open_task(cid), reason)
        except grpc.RpcError:  # cancelled: the client went away, or deployment.upload_timeout_s passed
            reason = self._expired_reason() if expired.is_set() else "upload cancelled: the connection was lost"
            return self._reject(cid, admitted[0].task_id if admitted else "", reason)
        try:
            task = self.registry.claim(payload.header.task_id, cid)
        except UpdateRejected as err:
            return self._reject(cid, "", str(err))
        try:
            reply = self._reply(task, payload, cid, counted.nbytes)
        except (UpdateRejected, ValueError, TypeError, KeyError) as err:  # every refusal, never a traceback
            self.registry.finish(task, ClientFailure(cid, task.round, f"rejected: {err}"))
            return self._reject(cid, "", str(err))
        if not self.registry.finish(task, reply):
            return self._reject(cid, "", f"round {task.round}'s deadline passed before the result was checked")
        if isinstance(reply, ClientFailure):
            log.warning("client %s could not do its round-%d task: %s", cid, task.round, reply.reason)
        return pb.PushReply(accepted=True)

    def _reject(self, cid: str, task_id: str, reason: str) -> pb.PushReply:
        """Log and refuse a result; if it named an open task of the caller, that task fails now."""
        log.warning("rejected result from client %s: %s", cid, reason)
        if task_id:
            try:
                task = self.registry.claim(task_id, cid)
            except UpdateRejected:
                pass  # someone else's task, or closed: nothing to fail
            else:
                self.registry.finish(task, ClientFailure(cid, task.round, f"rejected: {reason}"))
        return pb.PushReply(accepted=False, reason=reason)

    def _reply(self, task: Task, payload: wire.Payload, cid: str, nbytes: int):
        """The ClientUpdate (HeldUpdate under SecAgg) / ClientEval / ClientFailure a checked result stands for."""
        h = payload.header
        if h.round != task.round:
            raise UpdateRejected(f"result is for round {h.round}, the task was for round {task.round}")
        if h.kind == pb.FAILURE:
            return protocol.failure_from_result(payload, client_id=cid, round_idx=task.round)
        if h.kind != _EXPECTED[task.kind]:
            raise UpdateRejected(
                f"result kind {pb.Kind.Name(h.kind) if h.kind in pb.Kind.values() else h.kind} "
                f"does not answer a {pb.Kind.Name(task.kind)} task"
            )
        if task.kind == pb.EVALUATE:  # the bytes sent: the model and the strategy's arrays (a LoRA residual)
            return replace(protocol.eval_from_result(payload, client_id=cid), bytes_down=task.bytes_down)
        if task.kind != pb.FIT:
            message = protocol.secagg_message(payload, f"secure aggregation reply from {cid}")
            return SecAggReply(cid, task.round, message)
        params = task.payload.tensors["params"]
        # under SecAgg the update stays on the client: nothing here ever decodes a "delta/..." tensor
        decode = protocol.held_update_from_payload if self.secure_aggregation else protocol.update_from_payload
        update = decode(payload, client_id=cid, numel=params.size, spec_digest=task.payload.header.spec_digest)
        update = self.declarations.bound(update)  # capped by, or refused above, the count declared at Join
        log.info(
            "round %d client %s: down %.1f kB, up %.1f kB (codec %s)",
            task.round,
            cid,
            task.bytes_down / 1e3,
            nbytes / 1e3,
            h.codec or "none",
        )
        return replace(update, bytes_down=task.bytes_down, bytes_up=nbytes)


def add_servicer(server: grpc.Server, servicer: Servicer) -> None:
    """Register the handlers; Push takes raw bytes so that our decoder sees (and explains) garbage."""
    handlers = {
        "Join": grpc.unary_unary_rpc_method_handler(
            servicer.Join, pb.JoinRequest.FromString, pb.JoinReply.SerializeToString
        ),
        "Heartbeat": grpc.unary_unary_rpc_method_handler(
            servicer.Heartbeat, pb.HeartbeatRequest.FromString, pb.HeartbeatReply.SerializeToString
        ),
        "Leave": grpc.unary_unary_rpc_method_handler(
            servicer.Leave, pb.LeaveRequest.FromString, pb.LeaveReply.SerializeToString
        ),
        "Pull": grpc.unary_stream_rpc_method_handler(
            servicer.Pull, pb.PullRequest.FromString, pb.Chunk.SerializeToString
        ),
        "Push": grpc.stream_unary_rpc_method_handler(servicer.Push, None, pb.PushReply.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
