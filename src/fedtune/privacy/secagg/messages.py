"""The protocol's messages (Bonawitz et al. 2017, Figure 5: the malicious-server variant with signed
advertisements and a consistency round, with SecAgg+'s neighbour graph)
and a small binary encoding: little-endian integers, length-prefixed strings and blobs, raw arrays with
a dtype code. No pickle; decoding checks the magic, the message type, lengths and bounds.

    round 0  PublicParams    server -> clients  the invitation: field, bounds, threshold, graph seed
             AdvertiseKeys   client -> server   c_pk (encryption), s_pk (masking), signed with its identity
             Roster          server -> clients  public parameters, threshold, everyone's signed public keys
    round 1  ShareKeys       client -> server   commitment to b_u, one AEAD ciphertext per neighbour
             Forwarded       server -> client   the ciphertexts addressed to this client
    round 2  MaskedInput     client -> server   y_u = x_u + PRG(b_u) + sum_v +-PRG(s_uv)  (mod R)
             ConsistencyCheck server -> clients who sent a masked input (U3)
    round 3  ConsistencySig  client -> server   its signature over the U3 it was shown
             UnmaskRequest   server -> clients  U3 and the signatures over it (each client checks >= t)
    round 4  UnmaskShares    client -> server   b-shares of survivors, s-shares of the dropped

The masked vector travels bit-packed to the field's width b = log2(R) (26 bits a value for 2^10 clients
with 16-bit inputs, not a 32-bit word): ``pack_bits`` / ``unpack_bits``. The in-process driver and the
gRPC transport carry exactly these bytes (see docs/PRIVACY.md).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field

import numpy as np

from fedtune.privacy.errors import SecAggAbort
from fedtune.privacy.secagg.quantize import MAX_FIELD_BITS, container

# A transport whose clients keep their own updates (the gRPC deployment) hands the strategy placeholder
# updates with this metric set to 1: there is nothing to sum in them, the clients answer the protocol.
HELD = "secagg_held"
MAGIC = b"FTSA"
VERSION = 3  # 3: signed adverts and the consistency round; 2: MaskedInput bit-packed to the field width
MAX_ITEMS = 1 << 20
MAX_VALUES = 1 << 32


@dataclass(frozen=True)
class PublicParams:
    """Everything every party must agree on before round 0 (sent with the round's invitation)."""

    round: int
    num_values: int  # d: the update's length
    weighted: bool  # a weight channel follows the values (example weighting)
    channels: tuple[str, ...]  # further per-client scalars in [0, 1]
    bound: float  # values are clipped to [-bound, bound]
    l2_bound: float  # 0: none; else the quantised values keep L2 norm <= l2_bound (DP)
    modulus_bits: int
    levels: int
    threshold: float  # t = max(2, ceil(threshold * k)) of a client's k neighbours
    neighbours: int  # 0: complete graph
    graph_seed: bytes  # public seed of the neighbour permutation
    weight_cap: int = 1000  # example weighting: a client's weight is min(n_k, weight_cap) / weight_cap

    @property
    def length(self) -> int:
        """d values, the weight (if weighted), the channels, and each client's fraction of clipped values."""
        return self.num_values + int(self.weighted) + len(self.channels) + 1


@dataclass(frozen=True)
class AdvertiseKeys:
    client_id: str
    c_pk: bytes
    s_pk: bytes
    credential: bytes = b""  # the signer's certificate (deployment) or Ed25519 public key (simulation)
    signature: bytes = b""  # over identity.advert_data(round, client_id, c_pk, s_pk, params_digest)


@dataclass(frozen=True)
class Roster:
    params: PublicParams
    keys: dict[str, tuple[bytes, bytes]]  # U1: client id -> (c_pk, s_pk)
    signed: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)  # client id -> (credential, signature)


@dataclass(frozen=True)
class ShareKeys:
    client_id: str
    commitment: bytes  # SHA-256 commitment to the self-mask seed b_u (lets the server detect bad shares)
    ciphertexts: dict[str, bytes]  # neighbour id -> AEAD(u || v || share of s_u_sk || share of b_u)


@dataclass(frozen=True)
class Forwarded:
    recipient: str
    ciphertexts: dict[str, bytes]  # sender id (in U2) -> ciphertext


@dataclass(frozen=True)
class MaskedInput:
    client_id: str
    masked: np.ndarray = field(repr=False)  # uint16/uint32 (container(bits)), length params.length
    bits: int  # the field width params.modulus_bits: each value is < 2^bits and travels in exactly bits bits


@dataclass(frozen=True)
class ConsistencyCheck:
    survivors: tuple[str, ...]  # U3, as the server shows it to this client


@dataclass(frozen=True)
class ConsistencySig:
    client_id: str
    signature: bytes  # over identity.survivors_data(round, U3, params_digest)


@dataclass(frozen=True)
class UnmaskRequest:
    survivors: tuple[str, ...]  # U3
    signatures: dict[str, bytes] = field(default_factory=dict)  # U4: signer -> its signature over U3


@dataclass(frozen=True)
class UnmaskShares:
    client_id: str
    b_shares: dict[str, bytes]  # survivor u -> share of b_u
    s_shares: dict[str, bytes]  # dropped u -> share of s_u_sk


Message = (
    PublicParams
    | AdvertiseKeys
    | Roster
    | ShareKeys
    | Forwarded
    | MaskedInput
    | ConsistencyCheck
    | ConsistencySig
    | UnmaskRequest
    | UnmaskShares
)
_TYPES: dict[type, int] = {
    AdvertiseKeys: 1,
    Roster: 2,
    ShareKeys: 3,
    Forwarded: 4,
    MaskedInput: 5,
    UnmaskRequest: 6,
    UnmaskShares: 7,
    PublicParams: 8,
    ConsistencyCheck: 9,
    ConsistencySig: 10,
}


class _Writer:
    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def u(self, fmt: str, value: int | float) -> None:
        self.parts.append(struct.pack("<" + fmt, value))

    def blob(self, data: bytes) -> None:
        self.u("I", len(data))
        self.parts.append(bytes(data))

    def text(self, value: str) -> None:
        self.blob(value.encode())

    def blob_map(self, items: dict[str, bytes]) -> None:
        self.u("I", len(items))
        for key, value in items.items():
            self.text(key)
            self.blob(value)

    def packed(self, values: np.ndarray, bits: int) -> None:
        self.u("B", bits)
        self.u("Q", values.size)
        self.parts.append(pack_bits(values, bits))


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = memoryview(data), 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise SecAggAbort("malformed SecAgg message: truncated")
        out = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return out

    def u(self, fmt: str) -> int | float:
        size = struct.calcsize("<" + fmt)
        return struct.unpack("<" + fmt, self.take(size))[0]

    def count(self) -> int:
        n = int(self.u("I"))
        if n > MAX_ITEMS:
            raise SecAggAbort("malformed SecAgg message: too many items")
        return n

    def blob(self) -> bytes:
        return self.take(int(self.u("I")))

    def text(self) -> str:
        return self.blob().decode()

    def blob_map(self) -> dict[str, bytes]:
        return {self.text(): self.blob() for _ in range(self.count())}

    def packed(self) -> tuple[np.ndarray, int]:
        """A bit-packed vector, the message's last field: width, count, then exactly ceil(count * width / 8)
        bytes."""
        bits, count = int(self.u("B")), int(self.u("Q"))
        if not 1 <= bits <= MAX_FIELD_BITS:
            raise SecAggAbort(f"malformed SecAgg masked input: width {bits} bits is outside 1..{MAX_FIELD_BITS}")
        if count > MAX_VALUES:
            raise SecAggAbort(f"malformed SecAgg masked input: {count} values exceed the limit {MAX_VALUES}")
        expected, left = packed_size(count, bits), len(self.data) - self.pos
        if left != expected:
            raise SecAggAbort(
                f"malformed SecAgg masked input: {left} bytes for {count} values of {bits} bits, expected {expected}"
            )
        return unpack_bits(self.take(expected), bits, count), bits

    def done(self) -> None:
        if self.pos != len(self.data):
            raise SecAggAbort("malformed SecAgg message: trailing bytes")


def _params(w: _Writer, p: PublicParams) -> None:
    w.u("Q", p.round)
    w.u("Q", p.num_values)
    w.u("B", int(p.weighted))
    w.u("I", len(p.channels))
    for name in p.channels:
        w.text(name)
    w.u("d", p.bound)
    w.u("d", p.l2_bound)
    w.u("B", p.modulus_bits)
    w.u("Q", p.levels)
    w.u("d", p.threshold)
    w.u("I", p.neighbours)
    w.blob(p.graph_seed)
    w.u("I", p.weight_cap)


def _read_params(r: _Reader) -> PublicParams:
    round_, num_values, weighted = int(r.u("Q")), int(r.u("Q")), bool(r.u("B"))
    channels = tuple(r.text() for _ in range(r.count()))
    bound, l2_bound, bits, levels = float(r.u("d")), float(r.u("d")), int(r.u("B")), int(r.u("Q"))
    threshold, neighbours, seed, weight_cap = float(r.u("d")), int(r.u("I")), r.blob(), int(r.u("I"))
    return PublicParams(
        round_, num_values, weighted, channels, bound, l2_bound, bits, levels, threshold, neighbours, seed, weight_cap
    )


def params_digest(p: PublicParams) -> bytes:
    """SHA-256 of the encoded parameters: what every signature of the round binds to."""
    w = _Writer()
    _params(w, p)
    return hashlib.sha256(b"".join(w.parts)).digest()


def encode(msg: Message) -> bytes:
    w = _Writer()
    w.parts.append(MAGIC)
    w.u("B", VERSION)
    w.u("B", _TYPES[type(msg)])
    if isinstance(msg, PublicParams):
        _params(w, msg)
    elif isinstance(msg, AdvertiseKeys):
        w.text(msg.client_id)
        w.blob(msg.c_pk)
        w.blob(msg.s_pk)
        w.blob(msg.credential)
        w.blob(msg.signature)
    elif isinstance(msg, Roster):
        _params(w, msg.params)
        w.u("I", len(msg.keys))
        for cid, (c_pk, s_pk) in msg.keys.items():
            credential, signature = msg.signed.get(cid, (b"", b""))
            w.text(cid)
            w.blob(c_pk)
            w.blob(s_pk)
            w.blob(credential)
            w.blob(signature)
    elif isinstance(msg, ShareKeys):
        w.text(msg.client_id)
        w.blob(msg.commitment)
        w.blob_map(msg.ciphertexts)
    elif isinstance(msg, Forwarded):
        w.text(msg.recipient)
        w.blob_map(msg.ciphertexts)
    elif isinstance(msg, MaskedInput):
        w.text(msg.client_id)
        w.packed(msg.masked, msg.bits)
    elif isinstance(msg, (ConsistencyCheck, UnmaskRequest)):
        w.u("I", len(msg.survivors))
        for cid in msg.survivors:
            w.text(cid)
        if isinstance(msg, UnmaskRequest):
            w.blob_map(msg.signatures)
    elif isinstance(msg, ConsistencySig):
        w.text(msg.client_id)
        w.blob(msg.signature)
    elif isinstance(msg, UnmaskShares):
        w.text(msg.client_id)
        w.blob_map(msg.b_shares)
        w.blob_map(msg.s_shares)
    return b"".join(w.parts)


def decode(data: bytes) -> Message:
    r = _Reader(data)
    if r.take(4) != MAGIC or r.u("B") != VERSION:
        raise SecAggAbort("not a fedtune SecAgg message (bad magic or version)")
    kind = int(r.u("B"))
    msg: Message
    if kind == 1:
        msg = AdvertiseKeys(r.text(), r.blob(), r.blob(), r.blob(), r.blob())
    elif kind == 2:
        params = _read_params(r)
        keys, signed = {}, {}
        for _ in range(r.count()):
            cid = r.text()
            keys[cid] = (r.blob(), r.blob())
            signed[cid] = (r.blob(), r.blob())
        msg = Roster(params, keys, signed)
    elif kind == 3:
        msg = ShareKeys(r.text(), r.blob(), r.blob_map())
    elif kind == 4:
        msg = Forwarded(r.text(), r.blob_map())
    elif kind == 5:
        client_id = r.text()
        masked, bits = r.packed()
        msg = MaskedInput(client_id, masked, bits)
    elif kind == 6:
        msg = UnmaskRequest(tuple(r.text() for _ in range(r.count())), r.blob_map())
    elif kind == 7:
        msg = UnmaskShares(r.text(), r.blob_map(), r.blob_map())
    elif kind == 8:
        msg = _read_params(r)
    elif kind == 9:
        msg = ConsistencyCheck(tuple(r.text() for _ in range(r.count())))
    elif kind == 10:
        msg = ConsistencySig(r.text(), r.blob())
    else:
        raise SecAggAbort(f"unknown SecAgg message type {kind}")
    r.done()
    return msg


# ----- bit packing ----------------------------------------------------------------------------------------
# Value i occupies bits [i b, (i + 1) b) of a little-endian bit stream (least significant bit first), so
# 8 values fill exactly b bytes. Both directions work on groups of 8 values, one column at a time: for
# value j of a group, at bit offset j b = 8 q + s, its b bits shifted left by s span at most 5 bytes
# (s + b <= 39) starting at byte q of the group's b. Vectorised over the groups: 8 x 5 NumPy operations
# on d / 8 elements, whatever d is.


def packed_size(count: int, bits: int) -> int:
    """Bytes of ``count`` values packed to ``bits`` bits each: ceil(count * bits / 8)."""
    return (count * bits + 7) // 8


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Unsigned integers, each < 2^bits, packed to exactly ``bits`` bits each.

    >>> pack_bits(np.array([1, 2, 3], np.uint32), 2).hex()  # 01 | 10 << 2 | 11 << 4
    '39'
    """
    if not 1 <= bits <= MAX_FIELD_BITS:
        raise SecAggAbort(f"cannot pack SecAgg values to {bits} bits: the width must be in 1..{MAX_FIELD_BITS}")
    if values.ndim != 1 or values.dtype.kind != "u" or values.dtype.itemsize > 4:
        raise SecAggAbort(f"cannot pack SecAgg values of dtype {values.dtype} and shape {values.shape}")
    top = int(values.max(initial=0))
    if top >> bits:
        raise SecAggAbort(f"cannot pack SecAgg values to {bits} bits: {top} is not below the modulus 2^{bits}")
    groups = -(-values.size // 8)
    padded = np.zeros(groups * 8, np.uint32)
    padded[: values.size] = values
    grid = padded.reshape(groups, 8)  # (G, 8) values
    out = np.zeros((groups, bits), np.uint8)  # (G, b) bytes
    for j in range(8):
        q, s = divmod(j * bits, 8)
        shifted = grid[:, j].astype(np.uint64) << np.uint64(s)
        for m in range(min(5, bits - q)):
            out[:, q + m] |= (shifted >> np.uint64(8 * m)).astype(np.uint8)  # astype keeps the low byte
    return out.reshape(-1)[: packed_size(values.size, bits)].tobytes()


def unpack_bits(data: bytes, bits: int, count: int) -> np.ndarray:
    """The inverse of ``pack_bits``: ``count`` values in ``container(bits)``. The padding bits of the last
    byte must be zero, so every vector has exactly one encoding."""
    if not 1 <= bits <= MAX_FIELD_BITS:
        raise SecAggAbort(f"malformed SecAgg masked input: width {bits} bits is outside 1..{MAX_FIELD_BITS}")
    if len(data) != packed_size(count, bits):
        raise SecAggAbort(
            f"malformed SecAgg masked input: {len(data)} bytes for {count} values of {bits} bits, "
            f"expected {packed_size(count, bits)}"
        )
    used = count * bits % 8
    if used and data[-1] >> used:
        raise SecAggAbort("malformed SecAgg masked input: nonzero padding bits after the last value")
    groups = -(-count // 8)
    raw = np.zeros(groups * bits, np.uint8)
    raw[: len(data)] = np.frombuffer(data, np.uint8)
    raw = raw.reshape(groups, bits)  # (G, b) bytes
    out = np.empty((groups, 8), container(bits))  # (G, 8) values
    low = np.uint64((1 << bits) - 1)
    for j in range(8):
        q, s = divmod(j * bits, 8)
        acc = np.zeros(groups, np.uint64)
        for m in range(min(5, bits - q)):
            acc |= raw[:, q + m].astype(np.uint64) << np.uint64(8 * m)
        out[:, j] = (acc >> np.uint64(s)) & low
    flat = out.reshape(-1)
    return flat if flat.size == count else flat[:count].copy()
