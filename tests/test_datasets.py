"""The CIFAR-10 loader gives normalised NCHW floats, or the decoded pixels they come from."""

import os

import numpy as np
import pytest

from tvm_lut.train import datasets

pytestmark = pytest.mark.skipif(not os.path.isdir(os.path.join(datasets.SHARED_DATA, "cifar10_jpeg")),
                                reason=f"CIFAR-10 not found under {datasets.SHARED_DATA} (../shared/data)")


def test_cifar10_normalised_and_raw_are_the_same_images():
    x, y = datasets.load_cifar10("test", limit=8, seed=3)
    raw, y_raw = datasets.load_cifar10("test", limit=8, seed=3, raw=True)
    assert x.shape == (8, 3, 32, 32) and x.dtype == np.float32 and raw.shape == (8, 32, 32, 3) and raw.dtype == np.uint8
    np.testing.assert_array_equal(y, y_raw)
    np.testing.assert_array_equal(datasets.normalize_cifar10(raw), x)
    assert abs(float(x.mean())) < 0.5 and 0.5 < float(x.std()) < 1.5  # roughly standardised
