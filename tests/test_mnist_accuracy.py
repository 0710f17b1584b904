"""The headline check on real data: a LeNet-5 on MNIST with every layer forced to lookup (post-training
k-means codebooks) stays within 1.5 points of the exact model. Needs ../shared/data/mnist."""

import gzip
import os

import numpy as np
import pytest
import torch

import tvm_lut
from tvm_lut import models, pipeline

from .conftest import mnist_dir


def _load(name, offset, shape):
    with gzip.open(os.path.join(mnist_dir(), name)) as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset).reshape(shape)


@pytest.mark.skipif(not os.path.isdir(mnist_dir()), reason="MNIST not found at ../shared/data/mnist (skipped)")
def test_lenet_mnist_all_layers_within_1_5_points():
    train = models.normalize_mnist(_load("train-images-idx3-ubyte.gz", 16, (-1, 28, 28)))
    train_y = _load("train-labels-idx1-ubyte.gz", 8, (-1,)).astype(np.int64)
    test = models.normalize_mnist(_load("t10k-images-idx3-ubyte.gz", 16, (-1, 28, 28)))
    test_y = _load("t10k-labels-idx1-ubyte.gz", 8, (-1,))
    model = models.train_classifier(models.LeNet5(), train, train_y, epochs=3, progress=False)
    mod = tvm_lut.from_torch(model, torch.from_numpy(test[:32]))
    _, _, manifest = pipeline.compile_and_measure(
        mod, {"x": train[:2048]}, evaluation=({"x": test}, test_y), all_layers=True, measure_latency=False,
        progress=False)
    report = manifest["report"]
    assert all(r["method"] == "pq" for r in report["layers"])
    acc = report["accuracy"]
    assert acc["exact"] > 98.0, acc
    assert acc["drop"] <= 1.5, acc
