"""scikit-learn digits as ArrayExample records."""

from __future__ import annotations

import numpy as np

from fedtune.data.digits import load_digits_records


def test_digits_records() -> None:
    from sklearn.datasets import load_digits

    records = load_digits_records()
    bunch = load_digits()
    assert len(records) == 1797
    assert {r.label for r in records} == set(range(10))
    first = records[0]
    assert first.x.shape == (1, 8, 8) and first.x.dtype == np.float32
    assert np.allclose(first.x[0], bunch.images[0] / 16.0)
    assert [r.label for r in records[:20]] == bunch.target[:20].tolist()
    stacked = np.stack([r.x for r in records])
    assert stacked.min() == 0.0 and stacked.max() == 1.0
    records[0].x[0, 0, 0] = 5.0  # arrays are independent copies
    assert records[1].x.max() <= 1.0
