"""Tensors <-> a stream of ``fedtune.v1.Chunk`` messages: one Header, then raw little-endian bytes.

Never pickle: an array is its dtype tag, its shape and its bytes. The header lists every tensor and the
payload's total size and SHA-256, so the receiver checks size limits *before* allocating, rejects a
stream that is longer or shorter than announced, and verifies the bytes afterwards. Chunks are at most
``chunk_bytes`` each, so a payload of any size (models above gRPC's 2 GB message ceiling) streams
through messages of bounded size.

Everything the decoder rejects raises WireError with a message saying what was wrong; it is the one
function the fuzz test drives with arbitrary bytes. Every header field is checked before anything is
allocated: each dimension on its own (a zero elsewhere cannot hide an oversized one), the exact total, and
the budget the receiver grants *this* header (``admit``: the server's bound for the task the header names),
so the buffer is never larger than the task's known size.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

from fedtune.errors import FedtuneError
from fedtune.transport.grpc.proto import fedtune_pb2 as pb

PROTOCOL = 1  # the schema version in every header; bump with the proto package (fedtune.v1)

# wire tag <-> NumPy dtype, all little-endian; bfloat16 travels as uint16 bit patterns
_DTYPES: dict[int, np.dtype] = {
    pb.FLOAT32: np.dtype("<f4"),
    pb.FLOAT16: np.dtype("<f2"),
    pb.UINT16: np.dtype("<u2"),
    pb.INT8: np.dtype("i1"),
    pb.UINT8: np.dtype("u1"),
    pb.INT32: np.dtype("<i4"),
    pb.INT64: np.dtype("<i8"),
    pb.UINT32: np.dtype("<u4"),
    pb.FLOAT64: np.dtype("<f8"),
}
_TAGS: dict[str, int] = {dt.str.lstrip("<>|="): tag for tag, dt in _DTYPES.items()}

MAX_TENSORS = 4096  # per payload; a real one has a handful (params, delta parts, strategy extras)
MAX_RANK = 8
MAX_NAME = 256
MAX_SCALARS_JSON = 1 << 20  # 1 MiB of JSON scalars is far beyond any training config or metrics


class WireError(FedtuneError):
    """A stream that is not a well-formed fedtune payload; the message says what is wrong.

    ``header`` is the stream's header when it was readable (so the receiver knows which task failed).
    """

    def __init__(self, message: str, header: pb.Header | None = None) -> None:
        super().__init__(message)
        self.header = header


@dataclass(frozen=True)
class Limits:
    max_payload_bytes: int  # the largest payload accepted (sum of tensor bytes)
    chunk_bytes: int = 1 << 20  # data bytes per Chunk message when sending

    def __post_init__(self) -> None:
        if self.max_payload_bytes <= 0 or self.chunk_bytes <= 0:
            raise ValueError("wire limits must be positive")


@dataclass(frozen=True)
class Payload:
    """A decoded (or to-be-encoded) message: header fields, JSON scalars and named arrays."""

    header: pb.Header
    scalars: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class Prepared:
    """Tensors ready to stream: metadata, little-endian byte views, total size and digest.

    Preparing once lets the server send the same global vector to many clients without re-hashing it.
    """

    metas: tuple[pb.TensorMeta, ...]
    views: tuple[memoryview, ...]
    nbytes: int
    sha256: str


def _le_contiguous(name: str, arr: np.ndarray) -> np.ndarray:
    if not isinstance(arr, np.ndarray):
        raise WireError(f"tensor {name!r} is a {type(arr).__name__}, not a NumPy array")
    key = arr.dtype.str.lstrip("<>|=")
    if key not in _TAGS:
        raise WireError(f"tensor {name!r} has dtype {arr.dtype}, which the wire format does not carry")
    return arr.astype(_DTYPES[_TAGS[key]], order="C", copy=False)  # keeps 0-d arrays 0-d


def prepare(tensors: Mapping[str, np.ndarray]) -> Prepared:
    """Check, convert to little-endian contiguous, and hash ``tensors`` (in their order)."""
    digest = hashlib.sha256()
    metas, views, total = [], [], 0
    for name, arr in tensors.items():
        arr = _le_contiguous(name, arr)
        metas.append(pb.TensorMeta(name=name, dtype=_TAGS[arr.dtype.str.lstrip("<>|=")], shape=arr.shape))
        view = memoryview(arr.reshape(-1)).cast("B")
        digest.update(view)
        views.append(view)
        total += arr.nbytes
    return Prepared(tuple(metas), tuple(views), total, digest.hexdigest())


def _json_scalar(value: Any) -> Any:
    """NumPy scalars (a strategy's np.float32 option, say) as plain numbers; anything else is an error."""
    if isinstance(value, np.generic):
        return value.item()
    raise WireError(f"scalar of type {type(value).__name__} cannot travel as JSON: {value!r}")


def encode(payload: Payload, *, chunk_bytes: int, prepared: Prepared | None = None) -> Iterator[pb.Chunk]:
    """The header chunk then data chunks of at most ``chunk_bytes`` (lazily: nothing is copied up front)."""
    prep = prepared if prepared is not None else prepare(payload.tensors)
    header = pb.Header()
    header.CopyFrom(payload.header)
    header.protocol = PROTOCOL
    header.scalars_json = json.dumps(payload.scalars, allow_nan=True, default=_json_scalar)
    del header.tensors[:]
    header.tensors.extend(prep.metas)
    header.payload_bytes = prep.nbytes
    header.payload_sha256 = prep.sha256
    yield pb.Chunk(header=header)
    for view in prep.views:
        for start in range(0, len(view), chunk_bytes):
            yield pb.Chunk(data=bytes(view[start : start + chunk_bytes]))


# ----------------------------------------------------------------------------------------------- decoding


def _parse_chunk(raw: bytes | pb.Chunk, index: int) -> pb.Chunk:
    if isinstance(raw, pb.Chunk):
        return raw
    try:
        return pb.Chunk.FromString(raw)
    except (DecodeError, ValueError, TypeError) as err:
        raise WireError(f"message {index} is not a fedtune.v1.Chunk: {err or 'undecodable bytes'}") from None


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes} bytes"


def _check_metas(header: pb.Header, limit: int) -> list[tuple[str, np.dtype, tuple[int, ...], int]]:
    """(name, dtype, shape, nbytes) per tensor, after checking every field and the declared total against
    ``limit`` bytes. Each dimension is bounded on its own, so the exact product stays small: a leading zero
    cannot hide a dimension of 2^63 that would later break the reshape."""
    if len(header.tensors) > MAX_TENSORS:
        raise WireError(f"payload lists {len(header.tensors)} tensors, the limit is {MAX_TENSORS}")
    out, names, total = [], set(), 0
    for meta in header.tensors:
        name = meta.name
        if not name or len(name) > MAX_NAME or name in names:
            raise WireError(f"tensor name {name[:MAX_NAME]!r} is empty, too long or repeated")
        names.add(name)
        if meta.dtype not in _DTYPES:
            raise WireError(f"tensor {name!r} has unknown dtype tag {meta.dtype}")
        if len(meta.shape) > MAX_RANK:
            raise WireError(f"tensor {name!r} has rank {len(meta.shape)}, the limit is {MAX_RANK}")
        dtype, shape = _DTYPES[meta.dtype], tuple(int(d) for d in meta.shape)
        for dim in shape:
            if dim < 0 or dim > limit:
                raise WireError(
                    f"tensor {name!r} has dimension {dim} in shape {list(shape)}, which alone exceeds the limit of "
                    f"{limit} bytes (deployment.max_message_mb, or the size of the task it answers)"
                )
        nbytes = dtype.itemsize * math.prod(shape)  # exact: at most MAX_RANK factors, each bounded above
        total += nbytes
        if total > limit:
            raise WireError(
                f"payload of at least {_size(total)} exceeds the limit of {_size(limit)} "
                "(deployment.max_message_mb, or the size of the task it answers)"
            )
        out.append((name, dtype, shape, nbytes))
    if total != header.payload_bytes:
        raise WireError(f"header declares {header.payload_bytes} payload bytes but its tensors need {total}")
    return out


def _scalars(header: pb.Header) -> dict[str, Any]:
    text = header.scalars_json or "{}"
    if len(text) > MAX_SCALARS_JSON:
        raise WireError(f"scalars_json of {len(text)} characters exceeds the limit of {MAX_SCALARS_JSON}")
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        raise WireError(f"scalars_json is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise WireError(f"scalars_json must be a JSON object, got {type(value).__name__}")
    return value


Admit = Callable[[pb.Header], int]  # a header -> the bytes its payload may carry, or WireError saying why not


def decode(stream: Iterable[bytes | pb.Chunk], limits: Limits, admit: Admit | None = None) -> Payload:
    """Assemble a stream of chunks (or their serialized bytes) into a Payload, checking everything.

    ``admit`` is asked about the header before anything is allocated: it may refuse it (raise WireError)
    or return a smaller byte budget than ``limits`` (the server: the size of the task the header answers).
    Any other error a malformed stream provokes is reported as a WireError too, never as a traceback."""
    chunks = iter(stream)
    first = next(chunks, None)
    if first is None:
        raise WireError("empty stream: expected a header")
    head = _parse_chunk(first, 0)
    if head.WhichOneof("part") != "header":
        raise WireError("a stream must start with a header")
    header = head.header
    try:
        return _decode_body(header, chunks, limits, admit)
    except WireError as err:
        raise WireError(str(err), header) from None
    except (ValueError, TypeError, OverflowError, MemoryError) as err:  # a check we lack: still a refusal
        raise WireError(f"malformed payload ({type(err).__name__}: {err})", header) from None


def _decode_body(header: pb.Header, chunks: Iterator[bytes | pb.Chunk], limits: Limits, admit: Admit | None) -> Payload:
    if header.protocol != PROTOCOL:
        raise WireError(f"protocol version {header.protocol} is not supported (this side speaks {PROTOCOL})")
    limit = limits.max_payload_bytes if admit is None else min(limits.max_payload_bytes, admit(header))
    metas = _check_metas(header, limit)
    scalars = _scalars(header)
    buf = np.empty(header.payload_bytes, dtype=np.uint8)
    view, pos, digest = memoryview(buf), 0, hashlib.sha256()
    for index, raw in enumerate(chunks, start=1):
        chunk = _parse_chunk(raw, index)
        if chunk.WhichOneof("part") != "data":
            raise WireError(f"message {index} is a second header; expected data")
        data = chunk.data
        if pos + len(data) > len(buf):
            raise WireError(f"stream carries more than the {len(buf)} payload bytes its header declares")
        view[pos : pos + len(data)] = data
        digest.update(data)
        pos += len(data)
    if pos != len(buf):
        raise WireError(f"stream ended after {pos} of {len(buf)} payload bytes")
    if digest.hexdigest() != header.payload_sha256:
        raise WireError("payload SHA-256 does not match the header (corrupted or tampered stream)")
    tensors, offset = {}, 0
    for name, dtype, shape, nbytes in metas:
        count = nbytes // dtype.itemsize
        arr = np.frombuffer(buf, dtype=dtype, count=count, offset=offset).reshape(shape)
        # unaligned views work but are slow and fragile downstream: copy those (rare: after an int8 part)
        tensors[name] = arr if offset % dtype.itemsize == 0 else arr.copy()
        offset += nbytes
    return Payload(header=header, scalars=scalars, tensors=tensors)


def payload_chunks_needed(nbytes: int, chunk_bytes: int) -> int:
    """How many data chunks a payload of ``nbytes`` streams as (for progress and tests)."""
    return math.ceil(nbytes / chunk_bytes)
