"""Update codecs: error bounds against oracles (torch's bfloat16, a plain loop for int8), exact error
feedback for top-k, sizes on the wire, and a decoder that refuses malformed parts."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedtune.transport.codecs import CODEC_NAMES, CodecError, Encoded, build_codec, decode_update

finite32 = st.floats(-1e4, 1e4, allow_nan=False, width=32)
vectors = arrays(np.float32, st.integers(1, 600), elements=finite32)


def _roundtrip(name: str, x: np.ndarray, **params) -> np.ndarray:
    codec = build_codec(name, **params)
    enc, _ = codec.encode(x, None)
    return decode_update(enc.codec, enc.params, enc.arrays, x.size)


@given(vectors)
def test_none_is_bit_exact(x):
    assert np.array_equal(_roundtrip("none", x), x)


@given(vectors)
def test_fp16_matches_numpy_half(x):
    assert np.array_equal(_roundtrip("fp16", x), x.astype(np.float16).astype(np.float32))


@given(vectors)
def test_bf16_matches_torch_rounding(x):
    oracle = torch.from_numpy(x.copy()).to(torch.bfloat16).to(torch.float32).numpy()
    assert np.array_equal(_roundtrip("bf16", x), oracle)


@given(vectors, st.integers(1, 64))
def test_int8_matches_a_plain_loop(x, block):
    got = _roundtrip("int8", x, block=block)
    for start in range(0, x.size, block):
        chunk = x[start : start + block]
        scale = np.float32(np.abs(chunk).max() / np.float32(127.0))
        expect = np.zeros_like(chunk) if scale == 0 else np.clip(np.rint(chunk / scale), -127, 127) * scale
        np.testing.assert_allclose(got[start : start + block], expect, rtol=1e-6, atol=1e-30)
        # and the quantisation error is at most half a step
        assert np.all(np.abs(got[start : start + block] - chunk) <= scale / 2 * (1 + 1e-5) + 1e-30)


@settings(max_examples=50)
@given(st.lists(arrays(np.float32, 97, elements=finite32), min_size=1, max_size=5), st.floats(0.01, 1.0))
def test_topk_error_feedback_loses_nothing(steps, fraction):
    """sent + new residual == update + old residual, exactly, every round (nothing lost, only delayed)."""
    codec, residual = build_codec("topk", fraction=fraction), None
    for x in steps:
        before = x.copy()
        enc, new_residual = codec.encode(x, residual)
        sent = codec.decode(enc, x.size)
        carried = x if residual is None else x + residual
        assert np.array_equal(sent + new_residual, carried)
        assert np.count_nonzero(enc.arrays["values"] == enc.arrays["values"]) == math.ceil(fraction * 97)
        # the largest-magnitude entries were sent
        assert np.abs(carried[enc.arrays["indices"]]).min() >= np.abs(new_residual).max()
        assert np.array_equal(x, before)  # input untouched
        residual = new_residual


def test_wire_sizes():
    x = np.linspace(-1, 1, 10_000, dtype=np.float32)
    sizes = {name: build_codec(name, block=256, fraction=0.01).encode(x, None)[0].nbytes for name in CODEC_NAMES}
    assert sizes == {"none": 40_000, "fp16": 20_000, "bf16": 20_000, "int8": 10_000 + 4 * 40, "topk": 100 * 8}


def test_nan_survives_every_codec_so_the_server_can_reject_it():
    x = np.array([1.0, np.nan, 2.0, 3.0], np.float32)
    for name in ("none", "fp16", "bf16", "int8"):
        assert np.isnan(_roundtrip(name, x)).any(), name


def _enc(codec: str, params=None, **arrays) -> Encoded:
    return Encoded(codec, arrays, params or {})


@pytest.mark.parametrize(
    ("enc", "n", "message"),
    [
        (_enc("none"), 3, "lacks part 'values'"),
        (_enc("none", values=np.zeros(3, np.float64)), 3, "expected float32[3]"),
        (_enc("none", values=np.zeros(2, np.float32)), 3, "expected float32[3]"),
        (_enc("none", values=np.zeros((3, 1), np.float32)), 3, "expected float32[3]"),
        (_enc("none", values=np.zeros(3, np.float32), extra=np.zeros(1, np.float32)), 3, "unexpected parts"),
        (_enc("fp16", values=np.zeros(3, np.float32)), 3, "expected float16[3]"),
        (_enc("int8", {"block": 0}, q=np.zeros(3, np.int8), scales=np.ones(1, np.float32)), 3, "block size"),
        (_enc("int8", {"block": True}, q=np.zeros(3, np.int8), scales=np.ones(3, np.float32)), 3, "block size"),
        (_enc("int8", {"block": 2}, q=np.zeros(3, np.int8), scales=np.ones(1, np.float32)), 3, "scales"),
        (_enc("topk", indices=np.array([5], np.uint32), values=np.ones(1, np.float32)), 3, "below 3"),
        (_enc("topk", indices=np.array([1, 1], np.uint32), values=np.ones(2, np.float32)), 3, "strictly increasing"),
        (_enc("topk", indices=np.array([2, 1], np.uint32), values=np.ones(2, np.float32)), 3, "strictly increasing"),
        (_enc("topk", indices=np.array([0, 1], np.int64), values=np.ones(2, np.float32)), 3, "uint32"),
        (_enc("topk", indices=np.zeros(0, np.uint32), values=np.ones(0, np.float32)), 3, "0 indices"),
        (_enc("zstd", values=np.zeros(3, np.float32)), 3, "unknown codec"),
    ],
)
def test_decoder_refuses_malformed_parts(enc, n, message):
    with pytest.raises(CodecError, match=re.escape(message)):
        decode_update(enc.codec, enc.params, enc.arrays, n)


def test_bad_codec_parameters_are_errors():
    with pytest.raises(CodecError, match="fraction"):
        build_codec("topk", fraction=0.0)
    with pytest.raises(CodecError, match="block"):
        build_codec("int8", block=0)
    with pytest.raises(CodecError, match="1-D float32"):
        build_codec("fp16").encode(np.zeros(3, np.float64), None)
