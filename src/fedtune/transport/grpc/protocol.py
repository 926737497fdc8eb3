"""fedtune messages <-> wire Payloads, both directions, with the checks a receiver must make.

Tensor names on the wire: ``params`` (the global vector), ``extras/<name>`` (strategy arrays such as
SCAFFOLD control variates, in their own dtype), ``delta/<part>`` (the update as the codec encoded it),
``secagg/message`` (one encoded secure-aggregation message, uint8). Scalars (training config, strategy
options, metrics, evaluation sums) travel as one JSON object.

In async mode (FedBuff) a fit task names the model version its ``params`` are and the result echoes it
(scalar ``version``); the server's loop checks the echo against what it dispatched.

Under secure aggregation a fit result carries no tensors at all (``held_update_payload``): the client
keeps its update and answers the SecAgg tasks; the server gets a ``HeldUpdate`` (``held_update_from_payload``).

The server calls the ``*_from_payload`` functions on what a client sent; every one of them raises
UpdateRejected (or CodecError) naming what is wrong, so the client can be told why.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
from pydantic import ValidationError

from fedtune.config.schema import ClientConfig
from fedtune.core.messages import (
    Cause,
    ClientEval,
    ClientFailure,
    ClientUpdate,
    EvalInstruction,
    EvalSums,
    FitInstruction,
    HeldUpdate,
)
from fedtune.errors import UpdateRejected
from fedtune.privacy.secagg.messages import HELD
from fedtune.transport.codecs import Codec, CodecError, decode_update
from fedtune.transport.grpc.proto import fedtune_pb2 as pb
from fedtune.transport.grpc.wire import Payload

EXTRAS, DELTA = "extras/", "delta/"
VERSION = "version"  # async mode: the model version a fit task carries and its result echoes (scalars)
SECAGG = "secagg/message"
# SecAgg task kind per stage (stages are named by what the client sends back: see privacy.secagg.driver)
SECAGG_KINDS = {
    "advertise": pb.SECAGG_ADVERTISE,
    "share": pb.SECAGG_SHARE,
    "masked": pb.SECAGG_MASKED,
    "consistency": pb.SECAGG_CONSISTENCY,
    "unmask": pb.SECAGG_UNMASK,
}


def _header(kind: int, *, task_id: str, round_idx: int, spec_digest: str = "", session: str = "") -> pb.Header:
    return pb.Header(kind=kind, task_id=task_id, round=round_idx, spec_digest=spec_digest, session=session)


def _named_extras(extras: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {EXTRAS + k: np.asarray(v) for k, v in extras.items()}


def _take_extras(tensors: dict[str, np.ndarray], who: str) -> dict[str, np.ndarray]:
    """Strategy arrays, any wire dtype; floating ones must be finite (they reach the aggregate)."""
    out = {}
    for name, arr in tensors.items():
        if not name.startswith(EXTRAS):
            continue
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise UpdateRejected(f"{who}: extra {name!r} contains NaN or Inf values")
        out[name.removeprefix(EXTRAS)] = arr
    return out


# ------------------------------------------------------------------------------------- server -> client


def fit_payload(instr: FitInstruction, task_id: str) -> Payload:
    header = _header(pb.FIT, task_id=task_id, round_idx=instr.round, spec_digest=instr.spec_digest)
    # the typed client config travels as its JSON form and is validated again on arrival (_client_config)
    scalars = {"seed": instr.seed, "train": instr.train.model_dump(mode="json"), "options": instr.options}
    if instr.version is not None:  # async mode: the model version ``params`` is; the reply echoes it
        scalars[VERSION] = instr.version
    return Payload(header, scalars, {"params": instr.params, **_named_extras(instr.extras)})


def eval_payload(instr: EvalInstruction, task_id: str) -> Payload:
    header = _header(pb.EVALUATE, task_id=task_id, round_idx=instr.round, spec_digest=instr.spec_digest)
    scalars = {"batch_size": instr.batch_size, "max_examples": instr.max_examples}
    # extras: the rest of the global model (LoRA residuals), named like the fit extras
    return Payload(header, scalars, {"params": instr.params, **_named_extras(instr.extras)})


def _params(payload: Payload) -> np.ndarray:
    params = payload.tensors.get("params")
    if params is None or params.dtype != np.float32 or params.ndim != 1:
        raise UpdateRejected("the server's task carries no 1-D float32 'params' tensor")
    return params


def _client_config(raw: object) -> ClientConfig:
    """The server's client section, validated once here, at the edge: a bad one is refused with its reason."""
    if not isinstance(raw, dict):
        raise UpdateRejected(f"the server's task carries no client config (got {type(raw).__name__})")
    try:
        return ClientConfig.model_validate(raw)
    except ValidationError as err:
        raise UpdateRejected(f"the server's client config is invalid: {err}") from None


def fit_from_payload(payload: Payload, client_id: str) -> FitInstruction:
    s, h = payload.scalars, payload.header
    return FitInstruction(
        client_id=client_id,
        round=h.round,
        params=_params(payload),
        spec_digest=h.spec_digest,
        seed=int(s["seed"]),
        train=_client_config(s.get("train")),
        extras=_take_extras(payload.tensors, "server task"),
        options=dict(s.get("options") or {}),
        version=_version(s, "the server's task"),
    )


def eval_from_payload(payload: Payload, client_id: str) -> EvalInstruction:
    s, h = payload.scalars, payload.header
    max_examples = s.get("max_examples")
    return EvalInstruction(
        client_id=client_id,
        round=h.round,
        params=_params(payload),
        spec_digest=h.spec_digest,
        batch_size=int(s["batch_size"]),
        max_examples=None if max_examples is None else int(max_examples),
        extras=_take_extras(payload.tensors, "server task"),
    )


# ------------------------------------------------------------------------------------- client -> server


def update_payload(
    update: ClientUpdate, *, task_id: str, session: str, codec: Codec, residual: np.ndarray | None
) -> tuple[Payload, np.ndarray | None]:
    """The wire form of an update, compressed with ``codec``; returns the new error-feedback residual."""
    encoded, residual = codec.encode(update.delta, residual)
    header = _header(
        pb.FIT_RESULT, task_id=task_id, round_idx=update.round, spec_digest=update.spec_digest, session=session
    )
    header.codec = encoded.codec
    header.codec_params_json = json.dumps(encoded.params)
    scalars = {"num_examples": update.num_examples, "metrics": update.metrics}
    if update.version is not None:
        scalars[VERSION] = update.version
    tensors = {DELTA + k: v for k, v in encoded.arrays.items()} | _named_extras(update.extras)
    return Payload(header, scalars, tensors), residual


def _sums_scalars(s: EvalSums) -> dict:
    return {"loss_sum": s.loss_sum, "count": s.count, "correct": s.correct, "examples": s.examples}


def eval_result_payload(result: ClientEval, *, task_id: str, session: str) -> Payload:
    scalars = _sums_scalars(result.sums)
    if result.personal:  # personalisation: the client's own models' sums on the same examples
        scalars["personal"] = {variant: _sums_scalars(s) for variant, s in result.personal.items()}
    return Payload(_header(pb.EVAL_RESULT, task_id=task_id, round_idx=result.round, session=session), scalars)


MAX_REASON = 2000  # characters of a client's reason (a failed task, leaving) that travel and are logged


MAX_REPORTED_REASON = 500  # of those, the characters the server keeps in its failure record
_CAUSES = {Cause.ERROR: pb.CAUSE_ERROR, Cause.STATE_LOST: pb.CAUSE_STATE_LOST}
_FROM_WIRE = {wire_cause: cause for cause, wire_cause in _CAUSES.items()}


def failure_payload(reason: str, *, task_id: str, round_idx: int, session: str, cause: Cause = Cause.ERROR) -> Payload:
    header = _header(pb.FAILURE, task_id=task_id, round_idx=round_idx, session=session)
    header.cause = _CAUSES[cause]
    return Payload(header, {"reason": reason[:MAX_REASON]})


def failure_from_result(payload: Payload, *, client_id: str, round_idx: int) -> ClientFailure:
    """A client's FAILURE result. Its cause is taken at its word (a client could claim it lost its state: it is
    then sent that state again, once a round: docs/STRATEGIES.md); a cause this server does not know is an
    ERROR."""
    reason = str(payload.scalars.get("reason", "no reason given"))[:MAX_REPORTED_REASON]
    cause = _FROM_WIRE.get(payload.header.cause, Cause.ERROR)
    return ClientFailure(client_id, round_idx, f"client reported: {reason}", cause)


RESULT_SLACK = 64 * 1024  # small extras (DP's clipping bit), int8 scales, codec headroom


def result_budget(task_kind: int, numel: int, limit: int) -> int:
    """The most tensor bytes a result to a task of ``task_kind`` (over ``numel`` parameters) can need, known
    before its body is read: the server allocates no more. A fit result is the update in its largest
    encoding (topk at fraction 1: a uint32 index and a float32 value per entry) plus one float32 per
    parameter of strategy extras (SCAFFOLD's dc); an evaluation result is scalars only; a SecAgg message's
    size depends on the cohort, so it is bounded by ``limit`` (deployment.max_message_mb) alone."""
    if task_kind == pb.FIT:
        return min(limit, 12 * numel + RESULT_SLACK)
    if task_kind == pb.EVALUATE:
        return 0
    return limit


def _int(scalars: dict[str, Any], key: str, who: str) -> int:
    value = scalars.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise UpdateRejected(f"{who}: {key!r} must be an integer, got {value!r}")
    return value


def _version(scalars: dict[str, Any], who: str) -> int | None:
    """The model version a task or result names (async mode), or None (a synchronous round)."""
    if VERSION not in scalars:
        return None
    version = _int(scalars, VERSION, who)
    if version < 0:
        raise UpdateRejected(f"{who}: model version {version} is negative")
    return version


def _metrics(raw: Any, who: str) -> dict[str, float]:
    if not isinstance(raw, dict) or len(raw) > 256:
        raise UpdateRejected(f"{who}: metrics must be a JSON object of at most 256 numbers")
    out = {}
    for k, v in raw.items():
        if not isinstance(v, int | float) or isinstance(v, bool):
            raise UpdateRejected(f"{who}: metric {k!r} is not a number")
        out[str(k)] = float(v)
    return out


def update_from_payload(payload: Payload, *, client_id: str, numel: int, spec_digest: str) -> ClientUpdate:
    """Decode and check an update: codec parts, length, finite values, digest, example count."""
    who, h = f"update from {client_id}", payload.header
    if h.spec_digest != spec_digest:
        raise UpdateRejected(f"{who}: spec digest {h.spec_digest!r} does not match the server's {spec_digest}")
    try:
        codec_params = json.loads(h.codec_params_json or "{}")
        parts = {k.removeprefix(DELTA): v for k, v in payload.tensors.items() if k.startswith(DELTA)}
        if not isinstance(codec_params, dict):
            raise CodecError("codec_params_json must be a JSON object")
        delta = decode_update(h.codec or "none", codec_params, parts, numel)
    except (CodecError, json.JSONDecodeError) as err:
        raise UpdateRejected(f"{who}: {err}") from None
    finite = np.isfinite(delta)
    if not finite.all():
        raise UpdateRejected(f"{who} contains {int(delta.size - np.count_nonzero(finite))} NaN or Inf values")
    unknown = [k for k in payload.tensors if not k.startswith((DELTA, EXTRAS))]
    if unknown:
        raise UpdateRejected(f"{who}: unexpected tensors {unknown[:3]}")
    num_examples = _int(payload.scalars, "num_examples", who)
    if num_examples <= 0:
        raise UpdateRejected(f"{who}: reports {num_examples} training examples")
    return ClientUpdate(
        client_id=client_id,
        round=h.round,
        num_examples=num_examples,
        delta=delta,
        spec_digest=h.spec_digest,
        metrics=_metrics(payload.scalars.get("metrics", {}), who),
        extras=_take_extras(payload.tensors, who),
        version=_version(payload.scalars, who),
    )


def _sums(s: dict, who: str) -> EvalSums:
    loss_sum = s.get("loss_sum")
    if not isinstance(loss_sum, int | float) or isinstance(loss_sum, bool) or not math.isfinite(loss_sum):
        raise UpdateRejected(f"{who}: loss_sum must be a finite number, got {loss_sum!r}")
    counts = [_int(s, k, who) for k in ("count", "correct", "examples")]
    if min(counts) < 0 or counts[1] > counts[2]:
        raise UpdateRejected(f"{who}: inconsistent counts {counts}")
    return EvalSums(float(loss_sum), *counts)


PERSONAL_VARIANTS = ("personal", "finetuned")  # what a client may report beside the global model's sums


def eval_from_result(payload: Payload, *, client_id: str) -> ClientEval:
    who, s = f"evaluation from {client_id}", payload.scalars
    personal = s.get("personal") or {}
    if not isinstance(personal, dict) or not set(personal) <= set(PERSONAL_VARIANTS):
        raise UpdateRejected(f"{who}: 'personal' must map {PERSONAL_VARIANTS} to sums")
    own = {}
    for variant, sums in personal.items():
        if not isinstance(sums, dict):
            raise UpdateRejected(f"{who}: personal {variant!r} is not a mapping of sums")
        own[variant] = _sums(sums, f"{who} ({variant})")
    return ClientEval(client_id, payload.header.round, _sums(s, who), own)


# ------------------------------------------------------------------------------------- secure aggregation


def secagg_payload(kind: int, message: bytes, *, task_id: str, round_idx: int, session: str = "") -> Payload:
    """A SecAgg task (server -> client) or its SECAGG_RESULT (client -> server): one encoded message."""
    header = _header(kind, task_id=task_id, round_idx=round_idx, session=session)
    return Payload(header, {}, {SECAGG: np.frombuffer(message, dtype=np.uint8)})


def secagg_message(payload: Payload, who: str) -> bytes:
    """The encoded SecAgg message a payload carries (its content is checked by the protocol's decoder)."""
    arr = payload.tensors.get(SECAGG)
    if arr is None or arr.dtype != np.uint8 or arr.ndim != 1 or len(payload.tensors) != 1:
        raise UpdateRejected(f"{who}: a secure-aggregation message is exactly one 1-D uint8 {SECAGG!r} tensor")
    return arr.tobytes()


def held_update_payload(update: ClientUpdate, *, task_id: str, session: str) -> Payload:
    """A fit result under secure aggregation: example count and metrics only; the update stays here."""
    header = _header(
        pb.FIT_RESULT, task_id=task_id, round_idx=update.round, spec_digest=update.spec_digest, session=session
    )
    return Payload(header, {"num_examples": update.num_examples, "metrics": update.metrics, HELD: True})


def held_update_from_payload(payload: Payload, *, client_id: str, numel: int, spec_digest: str) -> HeldUpdate:
    """What a fit result under secure aggregation says: the client trained on ``num_examples`` examples and
    keeps its update (a HeldUpdate: no delta, none made up); SecAgg sums the real ones without seeing them. A
    result that carries any tensor is refused: under SecAgg no update may reach the server in the clear."""
    who, h = f"update from {client_id}", payload.header
    if h.spec_digest != spec_digest:
        raise UpdateRejected(f"{who}: spec digest {h.spec_digest!r} does not match the server's {spec_digest}")
    if payload.tensors or payload.scalars.get(HELD) is not True:
        carried = f"tensors {sorted(payload.tensors)[:3]}" if payload.tensors else f"no {HELD!r} flag"
        raise UpdateRejected(
            f"{who}: privacy.secure_aggregation is on, so the update must stay on the client (this result has "
            f"{carried}); upgrade the client or check its configuration"
        )
    num_examples = _int(payload.scalars, "num_examples", who)
    if num_examples <= 0:
        raise UpdateRejected(f"{who}: reports {num_examples} training examples")
    return HeldUpdate(
        client_id=client_id,
        round=h.round,
        num_examples=num_examples,
        spec_digest=h.spec_digest,
        metrics=_metrics(payload.scalars.get("metrics", {}), who),
    )
