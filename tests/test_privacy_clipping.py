"""Clipping never exceeds C (property test), keeps direction, guards zero and non-finite updates."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedtune.aggregation.clip import clip_l2
from fedtune.core.params import l2_norm

finite = st.floats(min_value=-(2.0**60), max_value=2.0**60, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=300, deadline=None)
@given(vec=arrays(np.float32, st.integers(1, 2000), elements=finite), bound=st.floats(1e-6, 1e6))
def test_clipped_norm_never_exceeds_bound(vec: np.ndarray, bound: float) -> None:
    before = vec.copy()
    out, norm = clip_l2(vec, bound)
    assert np.array_equal(vec, before)  # input untouched
    assert out.dtype == np.float32 and out is not vec
    assert l2_norm(out) <= bound
    if norm <= bound:
        assert np.array_equal(out, vec)
    elif norm > 0:
        # same direction: out is a positive multiple of vec
        scale = l2_norm(out) / norm
        np.testing.assert_allclose(out, (vec.astype(np.float64) * scale), rtol=1e-5, atol=1e-30 + 1e-6 * bound)


def test_zero_update_is_not_divided_by_its_norm() -> None:
    out, norm = clip_l2(np.zeros(5, np.float32), 1.0)
    assert norm == 0.0 and not out.any()


def test_non_finite_update_is_rejected() -> None:
    with pytest.raises(ValueError, match="NaN or Inf"):
        clip_l2(np.array([1.0, np.inf], np.float32), 1.0)
    with pytest.raises(ValueError, match="positive"):
        clip_l2(np.ones(2, np.float32), 0.0)
