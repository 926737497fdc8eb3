"""The secure noise generator: every call draws from a fresh stretch of the ChaCha20 keystream.

A fixed key makes each statistic below a deterministic number, so a bound far outside its sampling
spread cannot fail by chance; with independent normals E[X_j^2 X_{j+8}^2] = 1 (variance 8 per term).
"""

from __future__ import annotations

import numpy as np

from fedtune.privacy.noise import SecureGenerator, chacha_bytes

KEY = bytes(range(32))


def test_two_draws_share_no_keystream_block() -> None:
    gen = SecureGenerator(key=KEY)
    first, second = gen.random(4095), gen.random(4097)  # not whole 64-byte blocks: positions must carry over
    # 53-bit uniforms: two independent draws of 4096 collide with probability ~1e-9
    assert not set(first.tolist()) & set(second.tolist())
    # and, at the byte level, the generator's whole output is one keystream read once, in order
    raw = chacha_bytes(KEY, bytes(16), 2 * 8 * 4096)
    words = np.frombuffer(raw, dtype="<u8")
    expected = ((words >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
    np.testing.assert_array_equal(np.concatenate([first, second]), expected)


def test_normals_are_independent_within_and_across_draws() -> None:
    gen = SecureGenerator(key=KEY)
    n = 1 << 20
    x = gen.standard_normal(n)
    assert abs(x.mean()) < 0.01 and abs(x.var() - 1) < 0.01  # 10 sigma at n = 2^20
    # 8 uint64 words make one 64-byte block: the lag at which a shifted keystream would show. Each half
    # (Box-Muller's cosines, then its sines) is checked on its own: opposite biases would cancel overall.
    for part in (x[: n // 2], x[n // 2 :]):
        for lag in (1, 8, 16):
            fourth = float(np.mean(part[:-lag] ** 2 * part[lag:] ** 2))
            assert abs(fourth - 1.0) < 0.04, (lag, fourth)  # sd sqrt(8 / 2^19) = 0.004
    assert abs(float(np.mean(x[: n // 2] ** 2 * x[n // 2 :] ** 2)) - 1.0) < 0.04  # one radius, cos and sin
    y = gen.standard_normal(n)
    for lag in range(0, 33):
        corr = float(np.corrcoef(x[lag:], y[: n - lag])[0, 1])
        assert abs(corr) < 0.01, (lag, corr)  # sd 2^-10 = 0.001
        corr = float(np.corrcoef(y[lag:], x[: n - lag])[0, 1])
        assert abs(corr) < 0.01, (lag, corr)


def test_default_key_comes_from_the_os() -> None:
    assert not np.array_equal(SecureGenerator().random(8), SecureGenerator().random(8))
