"""SecAgg's masked vector on the wire: bit-packed to the field width (pack_bits / unpack_bits against a
big-integer oracle), exact message sizes, and decode refusing every malformed packing."""

from __future__ import annotations

import re
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune.privacy.errors import SecAggAbort
from fedtune.privacy.secagg.client import SecAggClient
from fedtune.privacy.secagg.driver import run_protocol
from fedtune.privacy.secagg.messages import (
    MaskedInput,
    PublicParams,
    decode,
    encode,
    pack_bits,
    packed_size,
    unpack_bits,
)
from fedtune.privacy.secagg.quantize import container, field_for
from fedtune.privacy.secagg.server import SecAggServer

# magic, version, type, client id (u32 length + "c00"), width (u8), count (u64)
HEADER = 4 + 1 + 1 + 4 + 3 + 1 + 8


def oracle_pack(values: list[int], bits: int) -> bytes:
    """Value i at bits [i b, (i + 1) b) of one little-endian integer: the definition, one value at a time."""
    total = sum(v << (i * bits) for i, v in enumerate(values))
    return total.to_bytes(packed_size(len(values), bits), "little")


@st.composite
def vectors(draw) -> tuple[np.ndarray, int]:
    bits = draw(st.integers(1, 32))
    top = (1 << bits) - 1
    values = draw(st.lists(st.integers(0, top), max_size=70))
    if values and draw(st.booleans()):  # the largest field element, somewhere
        values[draw(st.integers(0, len(values) - 1))] = top
    return np.array(values, dtype=container(bits)), bits


@settings(max_examples=300, deadline=None)
@given(vectors())
def test_pack_matches_the_oracle_and_round_trips(case) -> None:
    values, bits = case
    packed = pack_bits(values, bits)
    assert packed == oracle_pack(values.tolist(), bits)
    assert len(packed) == -(-values.size * bits // 8)
    back = unpack_bits(packed, bits, values.size)
    assert back.dtype == container(bits) and np.array_equal(back, values)


@settings(max_examples=100, deadline=None)
@given(vectors())
def test_masked_input_message_is_the_packed_vector_plus_a_fixed_header(case) -> None:
    values, bits = case
    data = encode(MaskedInput("c00", values, bits))
    assert len(data) == packed_size(values.size, bits) + HEADER
    msg = decode(data)
    assert isinstance(msg, MaskedInput) and msg.client_id == "c00" and msg.bits == bits
    assert msg.masked.dtype == container(bits) and np.array_equal(msg.masked, values)


@pytest.mark.parametrize("bits", [26, 32, 13])
def test_a_million_values_round_trip(bits: int) -> None:
    d = 1 << 20  # Bonawitz et al.'s vector length
    values = np.random.default_rng(bits).integers(0, 1 << bits, d, dtype=np.uint64).astype(container(bits))
    values[-1] = (1 << bits) - 1
    data = encode(MaskedInput("c00", values, bits))
    assert len(data) == d * bits // 8 + HEADER  # 26 bits: 3.25 MiB instead of 4 MiB of uint32 words
    assert np.array_equal(decode(data).masked, values)


def _masked(count: int, bits: int, body: bytes) -> bytes:
    head = encode(MaskedInput("c00", np.zeros(0, container(min(bits, 32))), min(max(bits, 1), 32)))
    head = head[: HEADER - 9]  # up to and including the client id
    return head + struct.pack("<BQ", bits, count) + body


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (_masked(10, 26, bytes(32)), "32 bytes for 10 values of 26 bits, expected 33"),
        (_masked(10, 26, bytes(34)), "34 bytes for 10 values of 26 bits, expected 33"),
        (_masked(10, 33, bytes(42)), "width 33 bits is outside 1..32"),
        (_masked(10, 0, b""), "width 0 bits is outside 1..32"),
        (_masked(2**40, 26, b""), "exceed the limit"),
        (_masked(3, 5, bytes([0, 0x80])), "nonzero padding bits"),  # 15 bits used of 16
    ],
)
def test_decode_rejects_a_malformed_packing_naming_the_problem(data: bytes, problem: str) -> None:
    with pytest.raises(SecAggAbort, match=re.escape(problem)):
        decode(data)


def test_encode_refuses_values_outside_the_field_and_bad_widths() -> None:
    with pytest.raises(SecAggAbort, match=re.escape("not below the modulus 2^26")):
        encode(MaskedInput("c00", np.array([0, 1 << 26], np.uint32), 26))
    with pytest.raises(SecAggAbort, match=re.escape("1..32")):
        encode(MaskedInput("c00", np.zeros(4, np.uint32), 33))
    with pytest.raises(SecAggAbort, match="dtype"):
        encode(MaskedInput("c00", np.zeros(4, np.int64), 26))


@pytest.mark.parametrize("widen", [False, True])
def test_server_drops_a_masked_input_of_another_width(widen: bool) -> None:
    """A client whose masked vector arrives at another width (here one bit wider, optionally with a value
    >= R) is a dropout; the others' sum is still exact."""
    n, d = 6, 40
    spec = field_for(n, value_bits=8)
    p = PublicParams(1, d, False, (), 1.0, 0.0, spec.modulus_bits, spec.levels, 2 / 3, 0, b"graph")
    rng = np.random.default_rng(0)
    ids = [f"c{i:02d}" for i in range(n)]
    clients = {c: SecAggClient(c, rng.uniform(-1, 1, d).astype(np.float32), p, rng=rng) for c in ids}
    server = SecAggServer(p, ids)

    def rewrite(stage: str, sender: str, recipient: str, data: bytes) -> bytes:
        if stage != "masked" or sender != "c01":
            return data
        msg = decode(data)
        assert isinstance(msg, MaskedInput) and msg.bits == p.modulus_bits
        y = msg.masked.copy()
        if widen:
            y[0] = 1 << p.modulus_bits  # a value >= R, representable only at the wider width
        return encode(MaskedInput(msg.client_id, y, msg.bits + 1))

    result = run_protocol(clients, server, intercept=rewrite)
    assert "c01" not in result.survivors and len(result.survivors) == 5
    assert np.array_equal(result.total, sum(clients[c].plain.astype(np.int64) for c in result.survivors))
