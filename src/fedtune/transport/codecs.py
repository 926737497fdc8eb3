"""Update compression on the wire: a flat float32 update in, a few named arrays out, and back.

Pure NumPy, no transport imports, inputs never mutated. ``encode`` returns the wire arrays and, for
top-k, the new error-feedback residual (state is a value: the caller keeps it, per client);
``decode`` checks every array it is given, since on the server those arrays come from the network.

* ``none``  float32 as is (bit-exact).
* ``fp16``  IEEE half: 2 bytes a value; values beyond +-65504 overflow to Inf and are then rejected.
* ``bf16``  bfloat16 (float32's upper 16 bits, round-to-nearest-even): float32's range, 8-bit mantissa.
* ``int8``  blockwise absmax: per block of ``block`` values one float32 scale = max|x| / 127 and
  int8 codes round(x / scale); about 1 + 4 / block bytes a value (Dettmers et al. 2022, blockwise).
* ``topk``  the ``fraction`` largest-magnitude entries (uint32 indices + float32 values) with error
  feedback: what was not sent is added to the next update of the same client (Stich et al. 2018;
  Karimireddy et al. 2019, EF-SGD), so nothing is lost, only delayed.

>>> import numpy as np
>>> codec = build_codec("int8", block=4)
>>> enc, _ = codec.encode(np.array([1.0, -2.0, 0.5, 0.0, 3.0], np.float32), None)
>>> codec.decode(enc, 5).astype(float).round(2).tolist()  # scales 2/127 and 3/127
[1.01, -2.0, 0.5, 0.0, 3.0]
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from fedtune.errors import FedtuneError

CODEC_NAMES = ("none", "fp16", "bf16", "int8", "topk")


class CodecError(FedtuneError):
    """Encoded arrays that cannot be decoded (missing part, wrong dtype or size, index out of range)."""


@dataclass(frozen=True)
class Encoded:
    """What a codec puts on the wire: named arrays plus the codec's (JSON-able) parameters."""

    codec: str
    arrays: dict[str, np.ndarray]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


class Codec(Protocol):
    name: str

    def params(self) -> dict[str, Any]: ...

    def encode(self, x: np.ndarray, residual: np.ndarray | None) -> tuple[Encoded, np.ndarray | None]:
        """(wire arrays, new residual). ``residual`` is the error-feedback state (None where unused)."""
        ...

    def decode(self, enc: Encoded, n: int) -> np.ndarray:
        """A new float32 vector of length ``n``; CodecError when ``enc`` is malformed."""
        ...


def _part(enc: Encoded, name: str, dtype: np.dtype | type, size: int) -> np.ndarray:
    """The wire array ``name``, checked to be 1-D of ``dtype`` and ``size`` values."""
    arr = enc.arrays.get(name)
    if arr is None:
        raise CodecError(f"{enc.codec} update lacks part {name!r} (has {sorted(enc.arrays)})")
    if arr.dtype != np.dtype(dtype) or arr.ndim != 1 or arr.size != size:
        raise CodecError(
            f"{enc.codec} part {name!r} is {arr.dtype}{list(arr.shape)}, expected {np.dtype(dtype)}[{size}]"
        )
    extra = set(enc.arrays) - set(_PARTS[enc.codec])
    if extra:
        raise CodecError(f"{enc.codec} update has unexpected parts {sorted(extra)}")
    return arr


def _as_f32(x: np.ndarray) -> np.ndarray:
    if x.dtype != np.float32 or x.ndim != 1:
        raise CodecError(f"codecs take a 1-D float32 vector, got {x.dtype}{list(x.shape)}")
    return x


class Identity:
    name = "none"

    def params(self) -> dict[str, Any]:
        return {}

    def encode(self, x: np.ndarray, residual: np.ndarray | None) -> tuple[Encoded, np.ndarray | None]:
        return Encoded(self.name, {"values": _as_f32(x)}), None

    def decode(self, enc: Encoded, n: int) -> np.ndarray:
        return np.array(_part(enc, "values", np.float32, n), dtype=np.float32)


class Float16:
    name = "fp16"

    def params(self) -> dict[str, Any]:
        return {}

    def encode(self, x: np.ndarray, residual: np.ndarray | None) -> tuple[Encoded, np.ndarray | None]:
        with np.errstate(over="ignore"):  # overflow to Inf is caught by the server's finite check
            return Encoded(self.name, {"values": _as_f32(x).astype(np.float16)}), None

    def decode(self, enc: Encoded, n: int) -> np.ndarray:
        return _part(enc, "values", np.float16, n).astype(np.float32)


def to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even; NaN stays NaN."""
    bits = x.view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    out = ((bits + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():  # rounding could carry a NaN's payload into the exponent: force a quiet NaN
        out[nan] = np.uint16(0x7FC0)
    return out


def from_bfloat16_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


class BFloat16:
    name = "bf16"

    def params(self) -> dict[str, Any]:
        return {}

    def encode(self, x: np.ndarray, residual: np.ndarray | None) -> tuple[Encoded, np.ndarray | None]:
        return Encoded(self.name, {"values": to_bfloat16_bits(_as_f32(x))}), None

    def decode(self, enc: Encoded, n: int) -> np.ndarray:
        return from_bfloat16_bits(_part(enc, "values", np.uint16, n))


class BlockInt8:
    name = "int8"

    def __init__(self, block: int = 256) -> None:
        if not 1 <= block <= 1 << 20:
            raise CodecError(f"int8 block size must be in [1, 2^20], got {block}")
        self.block = int(block)

    def params(self) -> dict[str, Any]:
        return {"block": self.block}

    def encode(self, x: np.ndarray, residual: np.ndarray | None) -> tuple[Encoded, np.ndarray | None]:
        x = _as_f32(x)
        n, b = x.size, self.block
        blocks = math.ceil(n / b)
        padded = np.zeros(blocks * b, dtype=np.float32)
        padded[:n] = x
        padded = padded.reshape(blocks, b)  # (blocks, block)
        scales = (np.abs(padded).max(axis=1) / 127.0).astype(np.float32)  # (blocks,)
        safe = np.where(scales > 0, scales, 1.0).astype(np.float32)
        with np.errstate(invalid="ignore"):  # NaN input stays NaN in the scale and is rejected later
            q = np.clip(np.rint(padded / safe[:, None]), -127, 127).astype(np.int8)
        return Encoded(self.name, {"q": q.reshape(-1)[:n], "scales": scales}, self.params()), None

    def decode(self, enc: Encoded, n: int) -> np.ndarray:
        block = enc.params.get("block")
        if not isinstance(block, int) or isinstance(block, bool) or not 1 <= block <= 1 << 20:
            raise CodecError(f"int8 update has block size {block!r}, expected an integer in [1, 2^20]")
        blocks = math.ceil(n / block)
        q = _part(enc, "q", np.int8, n)
        scales = _part(enc, "scales", np.float32, blocks)
        return (q.astype(np.float32) * np.repeat(scales, block)[:n]).astype(np.float32)


class TopK:
    """Top-k sparsification with error feedback; the residual is the caller's per-client state."""

    name = "topk"

    def __init__(self, fraction: float = 0.01) -> None:
        if not 0 < fraction <= 1:
            raise CodecError(f"topk fraction must be in (0, 1], got {fraction}")
        self.fraction = float(fraction)

    def params(self) -> dict[str, Any]:
        return {"fraction": self.fraction}

    def k(self, n: int) -> int:
        return max(1, min(n, math.ceil(self.fraction * n)))

    def encode(self, x: np.ndarray, residual: np.ndarray | None) -> tuple[Encoded, np.ndarray | None]:
        x = _as_f32(x)
        if x.size >= 1 << 32:
            raise CodecError("topk indices are uint32: vectors of 2^32 values or more are not supported")
        acc = x + residual if residual is not None and residual.shape == x.shape else x.copy()
        k = self.k(x.size)
        idx = np.sort(np.argpartition(np.abs(acc), x.size - k)[x.size - k :]).astype(np.uint32)
        values = acc[idx].astype(np.float32)
        acc[idx] = 0.0  # acc is ours: what was sent leaves the residual
        return Encoded(self.name, {"indices": idx, "values": values}, self.params()), acc

    def decode(self, enc: Encoded, n: int) -> np.ndarray:
        idx = enc.arrays.get("indices")
        k = 0 if idx is None else idx.size
        if not 1 <= k <= n:
            raise CodecError(f"topk update has {k} indices for a vector of {n} values")
        idx = _part(enc, "indices", np.uint32, k)
        values = _part(enc, "values", np.float32, k)
        if int(idx[-1]) >= n or (k > 1 and not bool(np.all(idx[1:] > idx[:-1]))):
            raise CodecError(f"topk indices must be strictly increasing and below {n}")
        out = np.zeros(n, dtype=np.float32)
        out[idx] = values
        return out


_PARTS: dict[str, tuple[str, ...]] = {
    "none": ("values",),
    "fp16": ("values",),
    "bf16": ("values",),
    "int8": ("q", "scales"),
    "topk": ("indices", "values"),
}


def build_codec(name: str, **params: Any) -> Codec:
    """The codec called ``name`` with its parameters (``block`` for int8, ``fraction`` for topk)."""
    if name == "none":
        return Identity()
    if name == "fp16":
        return Float16()
    if name == "bf16":
        return BFloat16()
    if name == "int8":
        return BlockInt8(int(params.get("block", 256)))
    if name == "topk":
        return TopK(float(params.get("fraction", 0.01)))
    raise CodecError(f"unknown codec {name!r}; known: {', '.join(CODEC_NAMES)}")


def decode_update(codec: str, params: Mapping[str, Any], arrays: dict[str, np.ndarray], n: int) -> np.ndarray:
    """Decode arrays received from the network with the codec they name (the server's side)."""
    if codec not in _PARTS:
        raise CodecError(f"unknown codec {codec!r}; known: {', '.join(CODEC_NAMES)}")
    enc = Encoded(codec, arrays, dict(params))
    if codec == "int8":
        return BlockInt8(1).decode(enc, n)  # the block size comes from enc.params
    return build_codec(codec, **({"fraction": 1.0} if codec == "topk" else {})).decode(enc, n)
