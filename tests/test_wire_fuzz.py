"""The wire decoder, driven by Hypothesis: valid payloads round-trip exactly; arbitrary bytes, mutated
streams and tampered headers raise WireError (never another exception, never a silent wrong tensor)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedtune.transport.grpc import wire
from fedtune.transport.grpc.proto import fedtune_pb2 as pb

LIMITS = wire.Limits(max_payload_bytes=1 << 20, chunk_bytes=64)
DTYPES = [np.float32, np.float16, np.uint16, np.int8, np.uint8, np.int32, np.int64, np.uint32, np.float64]

tensor = st.sampled_from(DTYPES).flatmap(
    lambda dt: arrays(dt, st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple))
)
tensors = st.dictionaries(st.text(min_size=1, max_size=12), tensor, max_size=4)
scalars = st.dictionaries(
    st.text(max_size=8), st.one_of(st.integers(-(2**53), 2**53), st.text(max_size=8), st.booleans(), st.none())
)


def _serialized(payload: wire.Payload, chunk_bytes: int) -> list[bytes]:
    return [c.SerializeToString() for c in wire.encode(payload, chunk_bytes=chunk_bytes)]


def _payload(ts: dict, sc: dict | None = None) -> wire.Payload:
    return wire.Payload(pb.Header(kind=pb.FIT_RESULT, task_id="t", round=3), sc or {}, ts)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(tensors, scalars, st.integers(1, 40))
def test_valid_payloads_round_trip_exactly(ts, sc, chunk_bytes):
    out = wire.decode(_serialized(_payload(ts, sc), chunk_bytes), LIMITS)
    assert list(out.tensors) == list(ts)
    for name, arr in ts.items():
        got = out.tensors[name]
        assert got.dtype == np.dtype(arr.dtype).newbyteorder("<") and got.shape == arr.shape
        assert got.tobytes() == arr.astype(got.dtype).tobytes()
    assert out.scalars == sc
    assert (out.header.kind, out.header.task_id, out.header.round) == (pb.FIT_RESULT, "t", 3)


def test_big_endian_input_travels_little_endian():
    x = np.arange(5, dtype=">f4")
    out = wire.decode(_serialized(_payload({"x": x}), 8), LIMITS)
    assert out.tensors["x"].dtype == np.dtype("<f4") and out.tensors["x"].tolist() == x.tolist()


def _decodes_or_wire_error(stream: list[bytes]) -> wire.Payload | None:
    try:
        out = wire.decode(stream, LIMITS)
    except wire.WireError:
        return None
    # whatever was accepted is self-consistent: every tensor is exactly its declared shape and dtype
    metas = {m.name: m for m in out.header.tensors}
    for name, arr in out.tensors.items():
        assert tuple(metas[name].shape) == arr.shape
    assert sum(a.nbytes for a in out.tensors.values()) == out.header.payload_bytes
    return out


@settings(max_examples=200)
@given(st.lists(st.binary(max_size=200), max_size=6))
def test_arbitrary_bytes_never_crash_the_decoder(stream):
    _decodes_or_wire_error(stream)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(tensors, st.data())
def test_mutated_streams_are_rejected_or_consistent(ts, data):
    stream = _serialized(_payload(ts), 16)
    op = data.draw(st.sampled_from(["flip", "drop", "dup", "truncate", "insert", "swap"]))
    i = data.draw(st.integers(0, len(stream) - 1))
    msg = bytearray(stream[i])
    if op == "flip" and msg:
        pos = data.draw(st.integers(0, len(msg) - 1))
        msg[pos] ^= data.draw(st.integers(1, 255))
        stream[i] = bytes(msg)
    elif op == "drop":
        del stream[i]
    elif op == "dup":
        stream.insert(i, stream[i])
    elif op == "truncate":
        stream[i] = bytes(msg[: data.draw(st.integers(0, max(len(msg) - 1, 0)))])
    elif op == "insert":
        stream.insert(i, data.draw(st.binary(max_size=64)))
    elif op == "swap" and len(stream) > 1:
        j = data.draw(st.integers(0, len(stream) - 1))
        stream[i], stream[j] = stream[j], stream[i]
    out = _decodes_or_wire_error(stream)
    if out is not None and op in ("flip", "truncate", "insert") and i > 0:
        # a changed data chunk can only get through if the bytes are in fact unchanged
        assert all(out.tensors[n].tobytes() == ts[n].astype(out.tensors[n].dtype).tobytes() for n in ts)


def _header(**fields) -> pb.Header:
    h = pb.Header(protocol=wire.PROTOCOL, kind=pb.FIT_RESULT, payload_sha256=hashlib.sha256(b"").hexdigest())
    for key, value in fields.items():
        if key == "tensors":
            h.tensors.extend(value)
        else:
            setattr(h, key, value)
    return h


def _meta(name="x", dtype=pb.FLOAT32, shape=(2,)) -> pb.TensorMeta:
    return pb.TensorMeta(name=name, dtype=dtype, shape=shape)


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        ([], "empty stream"),
        ([pb.Chunk(data=b"abc")], "must start with a header"),
        ([_header(protocol=2)], "protocol version 2"),
        ([_header(tensors=[_meta(dtype=99)])], "unknown dtype"),
        ([_header(tensors=[_meta(), _meta()])], "repeated"),
        ([_header(tensors=[_meta(name="")])], "empty"),
        ([_header(tensors=[_meta(shape=(1,) * 9)])], "rank 9"),
        ([_header(tensors=[_meta(shape=(2**62, 2**62))])], "exceeds the limit"),
        ([_header(tensors=[_meta(shape=(300_000,))], payload_bytes=1_200_000)], "exceeds the limit"),
        ([_header(tensors=[_meta()], payload_bytes=7)], "declares 7 payload bytes"),
        ([_header(scalars_json="[1]")], "must be a JSON object"),
        ([_header(scalars_json="{")], "not valid JSON"),
        ([_header(tensors=[_meta()], payload_bytes=8), pb.Chunk(data=b"\0" * 4)], "ended after 4 of 8"),
        ([_header(tensors=[_meta()], payload_bytes=8), pb.Chunk(data=b"\0" * 9)], "more than the 8"),
        ([_header(tensors=[_meta()], payload_bytes=8), pb.Chunk(data=b"\0" * 8)], "SHA-256 does not match"),
        ([_header(), pb.Chunk(header=_header())], "second header"),
        ([b"\xff\xff\xff"], "not a fedtune.v1.Chunk"),
    ],
)
def test_each_defect_is_named(stream, message):
    stream = [pb.Chunk(header=s) if isinstance(s, pb.Header) else s for s in stream]
    with pytest.raises(wire.WireError, match=message):
        wire.decode(stream, LIMITS)


def test_too_many_tensors():
    metas = [_meta(name=f"t{i}", shape=(0,)) for i in range(wire.MAX_TENSORS + 1)]
    with pytest.raises(wire.WireError, match="tensors, the limit is"):
        wire.decode([pb.Chunk(header=_header(tensors=metas))], LIMITS)


def test_error_carries_the_header_so_the_task_can_be_failed():
    h = _header(task_id="abc", tensors=[_meta()], payload_bytes=8)
    with pytest.raises(wire.WireError) as info:
        wire.decode([pb.Chunk(header=h)], LIMITS)
    assert info.value.header is not None and info.value.header.task_id == "abc"


def test_oversized_is_refused_before_reading_the_body():
    """The limit is checked on the header: the body iterator is never touched."""

    def stream():
        yield pb.Chunk(header=_header(tensors=[_meta(shape=(1 << 20,))], payload_bytes=4 << 20))
        raise AssertionError("the decoder read past an oversized header")

    with pytest.raises(wire.WireError, match=r"4\.0 MiB exceeds the limit of 1\.0 MiB"):
        wire.decode(stream(), LIMITS)


def test_numpy_scalars_travel_as_json_numbers_and_objects_do_not():
    out = wire.decode(_serialized(_payload({}, {"mu": np.float64(0.25), "k": np.int64(3)}), 8), LIMITS)
    assert out.scalars == {"mu": 0.25, "k": 3}
    with pytest.raises(wire.WireError, match="cannot travel as JSON"):
        _serialized(_payload({}, {"x": object()}), 8)


def test_unsupported_dtype_is_refused_on_encode():
    with pytest.raises(wire.WireError, match="does not carry"):
        wire.prepare({"x": np.zeros(2, dtype=np.complex64)})
    with pytest.raises(wire.WireError, match="does not carry"):
        wire.prepare({"x": np.zeros(2, dtype=object)})


def test_chunks_are_bounded():
    x = np.arange(1000, dtype=np.float32)
    chunks = list(wire.encode(_payload({"x": x}), chunk_bytes=256))
    assert [len(c.data) for c in chunks[1:]] == [256] * 15 + [4000 - 15 * 256]
    assert json.loads(chunks[0].header.scalars_json) == {}


# ------------------------------------------------------------------------------------- headers


DIMS = st.one_of(st.integers(0, 8), st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2**31, 2**32, 2**63, 2**64 - 1]))
metas = st.builds(
    pb.TensorMeta,
    name=st.text(max_size=6),
    dtype=st.integers(0, 12),
    shape=st.lists(DIMS, max_size=10),
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(metas, max_size=5),
    st.one_of(st.integers(0, 64), st.integers(0, 2**64 - 1)),
    st.integers(0, 3),
    st.integers(0, 1 << 21),
    st.lists(st.binary(max_size=64), max_size=3),
)
def test_arbitrary_headers_are_refused_with_a_reason_before_allocating(tensor_metas, declared, protocol, budget, body):
    """Any header (dims with zeros hiding huge ones, 2^63, too many dims, unknown dtypes, wrong totals) is
    either consistent and within the budget the receiver granted, or a WireError; nothing else escapes, and
    nothing larger than the budget is ever allocated."""
    header = _header(protocol=protocol, payload_bytes=declared)
    header.tensors.extend(tensor_metas)
    header.payload_sha256 = hashlib.sha256(b"".join(body)).hexdigest()
    allocated = []
    real_empty = np.empty

    def spy_empty(shape, *args, **kwargs):
        allocated.append(int(shape))
        return real_empty(shape, *args, **kwargs)

    stream = [pb.Chunk(header=header), *(pb.Chunk(data=b) for b in body)]
    np.empty = spy_empty  # the decoder's one allocation of the declared size
    try:
        out = wire.decode(stream, LIMITS, admit=lambda h: budget)
    except wire.WireError as err:
        assert str(err) and err.header is not None
        out = None
    finally:
        np.empty = real_empty
    assert all(n <= min(budget, LIMITS.max_payload_bytes) for n in allocated)
    if out is not None:
        assert sum(a.nbytes for a in out.tensors.values()) == declared <= budget


def test_a_zero_dimension_cannot_hide_an_oversized_one():
    for shape in ((0, 2**63), (2**63, 0), (0, 2**64 - 1, 3)):
        with pytest.raises(wire.WireError, match="alone exceeds the limit"):
            wire.decode([pb.Chunk(header=_header(tensors=[_meta(shape=shape)]))], LIMITS)


def test_the_receivers_budget_is_applied_before_the_body_is_read():
    def stream():
        yield pb.Chunk(header=_header(tensors=[_meta(shape=(1000,))], payload_bytes=4000))
        raise AssertionError("the decoder read past a header beyond its budget")

    with pytest.raises(wire.WireError, match="exceeds the limit"):
        wire.decode(stream(), LIMITS, admit=lambda h: 3999)
    refused = wire.WireError("not your task")

    def admit(h):
        raise refused

    with pytest.raises(wire.WireError, match="not your task") as info:
        wire.decode(stream(), LIMITS, admit=admit)
    assert info.value.header is not None
