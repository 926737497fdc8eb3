"""scikit-learn's 8x8 handwritten digits (1,797 images, bundled with scikit-learn: no download)."""

from __future__ import annotations

import numpy as np

from fedtune.data.types import ArrayExample

DIGIT_NAMES = [str(d) for d in range(10)]
_MAX_PIXEL = 16.0  # the images hold integer intensities 0..16


def load_digits_records() -> list[ArrayExample]:
    """Images as float32 arrays of shape (1, 8, 8) scaled to [0, 1] (a one-channel image), in dataset order."""
    from sklearn.datasets import load_digits  # imported here: scikit-learn is slow to import

    bunch = load_digits()
    images = (np.asarray(bunch.images, dtype=np.float32) / _MAX_PIXEL)[:, None, :, :]
    labels = bunch.target.tolist()
    return [ArrayExample(x=image.copy(), label=int(y)) for image, y in zip(images, labels, strict=True)]
