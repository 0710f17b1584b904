"""EZCrop: FFT energy-ratio scores, and the pass that physically removes channels (checked against the
same pruning done on the torch model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tvm_lut
from relay_passes import EZCrop, LUTify, ezcrop
from tvm_lut.errors import OptionError
from tvm_lut.frontend import graph
from tvm_lut.math import channel_energy
from tvm_lut.runtime.build import BatchRunner, compile_with_params
from tvm_lut.train import models

from .conftest import randomize_bn


def test_scores_rank_high_frequency_channels_first():
    n, h = 3, 8
    yy, xx = np.mgrid[:h, :h]
    maps = np.zeros((n, 3, h, h))
    maps[:, 0] = 1.0 + 0.01 * yy  # smooth: energy at the centre of the shifted spectrum
    maps[:, 1] = (-1.0) ** (yy + xx)  # checkerboard: all energy at the highest frequency
    s = channel_energy.channel_scores(maps)  # channel 2 is dead (all zeros)
    assert s[1] > s[0] > s[2] == 0.0
    with pytest.raises(ValueError, match="N, C, H, W"):
        channel_energy.channel_scores(maps[0])


def _run(mod, x):
    ex, params = compile_with_params(mod)
    return BatchRunner(ex, [v for _, v in params], [("x", x.shape, "float32")]).run({"x": x})[0]


@pytest.fixture(scope="module")
def vgg():
    torch.manual_seed(0)
    model = randomize_bn(models.VGGSmall(widths=(8, 16, 16), hidden=32))
    x = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    return model, x, tvm_lut.from_torch(model, torch.from_numpy(x))


def test_pruned_module_equals_the_torch_model_pruned_the_same_way(vgg):
    model, x, mod = vgg
    calib = np.random.default_rng(1).standard_normal((32, 3, 32, 32)).astype(np.float32)
    p = EZCrop(calib, 0.5)
    out = p(mod)
    recs = {r["name"]: r for r in ezcrop.records(out)}
    assert all(recs[n]["pruned"] and recs[n]["kept"] == recs[n]["channels"] // 2 for n in recs if n.startswith("features"))
    pruned = channel_energy.prune_torch(model, ezcrop.records(out))
    with torch.no_grad():
        ref = pruned(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_run(out, x), ref, rtol=1e-4, atol=1e-4)
    # physically smaller, names kept for later passes and reports
    before = {l.name: l.weight.size for l in graph.find_layers(mod)}
    after = {l.name: l.weight.size for l in graph.find_layers(out)}
    assert set(before) == set(after) and all(after[n] < before[n] for n in after if n != "classifier.2")
    assert sum(v.size for v in graph.param_values(out["main"]).values()) < \
        0.5 * sum(v.size for v in graph.param_values(mod["main"]).values())
    lut = LUTify(calib, distance="l1", layers={"features.0": "exact"}, progress=False)
    res = lut.run(out)  # a later pass sees the pruned layers under their names
    assert {r["name"] for r in res.layers} == set(after)


def test_ratio_zero_is_identity_and_errors_are_named(vgg):
    model, x, mod = vgg
    out = EZCrop(x, {"features.3": 0.0})(mod)
    with torch.no_grad():
        np.testing.assert_allclose(_run(out, x), model(torch.from_numpy(x)).numpy(), rtol=1e-4, atol=1e-4)
    with pytest.raises(OptionError, match="unknown layer"):
        EZCrop(x, {"features.99": 0.5})(mod)
    with pytest.raises(OptionError, match="ratio"):
        EZCrop(x, 1.0)
    with pytest.raises(OptionError, match="alpha"):
        EZCrop(x, 0.5, alpha=0.0)


def test_residual_outputs_are_kept_whole():
    torch.manual_seed(0)
    model = randomize_bn(models.CifarResNet(blocks=1))
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    mod = tvm_lut.from_torch(model, torch.from_numpy(x))
    p = EZCrop(x, 0.5)
    out = p(mod)
    recs = {r["name"]: r for r in ezcrop.records(out)}
    # inside a basic block the first conv feeds only the second: prunable; the second meets the skip add
    pruned = [n for n, r in recs.items() if r["pruned"]]
    kept = [n for n, r in recs.items() if not r["pruned"] and r["kind"] == "conv2d"]
    assert pruned and kept
    assert all("several users" in recs[n]["reason"] or "not channel-wise" in recs[n]["reason"] for n in kept)
    pruned_torch = channel_energy.prune_torch(model, ezcrop.records(out))
    with torch.no_grad():
        ref = pruned_torch(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_run(out, x), ref, rtol=1e-4, atol=1e-4)
