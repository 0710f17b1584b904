"""The headline checks on real data (full MNIST, ../shared/data/mnist; skipped without it), with every
layer of a LeNet-5 converted to lookup and accuracy measured by the compiled TVM model on the 10k test set:

* post-training k-means codebooks stay within 1.5 points of the exact model;
* learned centroids (LUT-NN: two epochs of fine-tuning) stay within 0.5 points (marked ``slow``: run
  with ``python -m pytest -m slow``; ``benchmarks/accuracy.py`` measures it too).
"""

import os

import pytest
import torch

import tvm_lut
from relay_passes import LUTify
from tvm_lut.app import pipeline
from tvm_lut.runtime.build import BatchRunner, compile_with_params, resolve_target
from tvm_lut.train import datasets, lutnn, models

from .conftest import mnist_dir

pytestmark = pytest.mark.skipif(not os.path.isdir(mnist_dir()),
                                reason="MNIST not found at ../shared/data/mnist (skipped)")


@pytest.fixture(scope="module")
def lenet_mnist():
    d = datasets.load_mnist(mnist_dir())
    train, train_y = models.normalize_mnist(d["train_images"]), d["train_labels"]
    test, test_y = models.normalize_mnist(d["test_images"]), d["test_labels"]
    torch.manual_seed(0)  # the initial weights too: not whatever the tests before left in torch's generator
    model = models.train_classifier(models.LeNet5(), train, train_y, epochs=3, progress=False)
    return model, train, train_y, test, test_y


def test_lenet_mnist_all_layers_within_1_5_points(lenet_mnist):
    model, train, _, test, test_y = lenet_mnist
    mod = tvm_lut.from_torch(model, torch.from_numpy(test[:32]))
    _, _, manifest = pipeline.compile_and_measure(
        mod, {"x": train[:2048]}, evaluation=({"x": test}, test_y), all_layers=True, measure_latency=False,
        progress=False)
    report = manifest["report"]
    assert all(r["method"] == "pq" for r in report["layers"])
    acc = report["accuracy"]
    assert acc["exact"] > 98.0, acc
    assert acc["drop"] <= 1.5, acc


@pytest.mark.slow  # about 5 min on 2 cores (two fine-tuning epochs on 60k images): `pytest -m slow`
def test_lenet_mnist_learned_centroids_within_0_5_points(lenet_mnist):
    model, train, train_y, test, test_y = lenet_mnist
    exact = models.accuracy(models.predict(model, test), test_y)
    ds = torch.utils.data.TensorDataset(torch.from_numpy(train), torch.from_numpy(train_y))
    loader = torch.utils.data.DataLoader(ds, batch_size=64, shuffle=True, drop_last=True)
    res = lutnn.finetune(model, loader, epochs=2, lr=1e-3, progress=False)
    assert len(res.codebooks) == 5
    mod = tvm_lut.from_torch(lutnn.to_exact(res.model), torch.from_numpy(test[:100]))
    lut = LUTify(codebooks=res.codebooks, progress=False)
    lut_res = lut.run(mod)
    ex, params = compile_with_params(lut_res.module, resolve_target("x86"))
    logits = BatchRunner(ex, [v for _, v in params], [("x", (100, 1, 28, 28), "float32")]).run({"x": test})[0]
    assert all(r["method"] == "pq" for r in lut_res.layers)
    acc = models.accuracy(logits, test_y)
    assert exact > 98.0 and exact - acc <= 0.5, (exact, acc)
    # the compiled model and the torch lookup layers agree (the kernel's fused multiply-adds may flip a
    # code on a float near-tie, so not necessarily on every image)
    assert (logits.argmax(1) == models.predict(res.model, test).argmax(1)).mean() >= 0.999
