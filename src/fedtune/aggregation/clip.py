"""L2 clipping of a whole update, written once: DP's sensitivity bound (client and server side), the server's
influence bound (``server.update_norm_bound``) and ``norm_bounded_mean`` all clip with ``clip_l2``. Pure;
inputs are never mutated."""

from __future__ import annotations

import math

import numpy as np

from fedtune.core.params import l2_norm

# Scaling by C / norm and rounding back to float32 can land a hair above C; shrinking the factor by this
# relative margin (far above float32's 2^-24 rounding) keeps the clipped norm <= C without a retry loop.
_MARGIN = 2.0**-20


def clip_l2(vec: np.ndarray, bound: float, *, norm: float | None = None) -> tuple[np.ndarray, float]:
    """(a float32 copy of ``vec`` scaled to L2 norm <= ``bound``, the norm before clipping).

    A zero update stays zero (no division by its norm); a non-finite one is an error, since its norm
    cannot bound anything. ``norm``: ``l2_norm(vec)`` when the caller has measured it already.

    >>> out, norm = clip_l2(np.array([3.0, 4.0], np.float32), 1.0)
    >>> norm, bool(l2_norm(out) <= 1.0)
    (5.0, True)
    >>> clip_l2(np.zeros(3, np.float32), 1.0)[0].tolist()
    [0.0, 0.0, 0.0]
    """
    if not bound > 0:
        raise ValueError(f"clip bound must be positive, got {bound}")
    norm = l2_norm(vec) if norm is None else norm
    if not math.isfinite(norm):
        raise ValueError("cannot clip an update with NaN or Inf values")
    if norm <= bound:
        return np.array(vec, dtype=np.float32, copy=True), norm
    factor = bound / norm * (1.0 - _MARGIN)
    out = (vec.astype(np.float64) * factor).astype(np.float32)
    if l2_norm(out) > bound:  # cannot happen with the margin; a guard, not a code path
        raise AssertionError("clipped norm exceeds the bound")
    return out, norm
