"""Quantile-based adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy, NeurIPS 2021). Pure math.

Each client reports b_k = 1 if its update's norm is at most the current C. The server releases the
noisy fraction of unclipped clients, b_bar = (sum_k (b_k - 1/2) + N(0, sigma_b^2)) / m + 1/2 (centring
halves the sensitivity), and moves C geometrically towards the target quantile gamma:
C <- C * exp(-eta * (b_bar - gamma)). Releasing the count spends privacy too: with update noise z_delta and
count noise sigma_b, a round is one Gaussian mechanism with z = (z_delta^-2 + (2 sigma_b)^-2)^(-1/2)
(the paper's Theorem 1), so for an accounted z the update gets z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2).
"""

from __future__ import annotations

import math


def update_noise_multiplier(z: float, count_noise: float) -> float:
    """z_delta for the update when the count takes noise ``count_noise`` out of an accounted ``z``.

    >>> round(update_noise_multiplier(1.0, 10.0), 6)
    1.001252
    """
    rest = z**-2 - (2.0 * count_noise) ** -2
    if rest <= 0:
        raise ValueError(f"count noise {count_noise} is too small for noise multiplier {z}: need count_noise > z / 2")
    return rest**-0.5


def default_count_noise(expected_clients: float) -> float:
    """The paper's default sigma_b: one twentieth of the expected number of clients per round."""
    return max(expected_clients, 1.0) / 20.0


def unclipped_fraction(centred_sum: float, noise: float, expected_clients: float) -> float:
    """b_bar from the sum of (b_k - 1/2), one noise draw and the expected client count."""
    return (centred_sum + noise) / expected_clients + 0.5


def next_clip(clip: float, fraction: float, *, target_quantile: float, lr: float) -> float:
    """Geometric update: shrink C when more than gamma of the clients fit under it, grow it otherwise.

    >>> next_clip(1.0, 0.5, target_quantile=0.5, lr=0.2)
    1.0
    >>> next_clip(1.0, 1.0, target_quantile=0.5, lr=0.2) < 1.0
    True
    """
    return clip * math.exp(-lr * (fraction - target_quantile))
