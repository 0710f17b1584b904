"""Rewrite methods are a registry: a method written outside the package is one class and one ``register``
call, and then LUTify, the per-layer options, the report records and ``tvm-lut compile --method`` all take
it, with no change to tvm-lut.

The toy method here, ``half``, stores each weight in float16 (half the bytes) and computes in float32: a
real rewrite with its own fit, cost accounting and emitted computation."""

import json

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

import tvm_lut
from relay_passes import LUTify, registry
from relay_passes.registry import KeepExact, RewriteMethod
from tvm_lut.app import cli
from tvm_lut.math import cost


class HalfWeights(RewriteMethod):
    name = "half"
    description = "float16 weights"

    def fit(self, plan, planner, rows=None, targets=None):
        w16 = plan.layer.weight.astype(np.float16)
        if not np.isfinite(w16).all():
            raise KeepExact("a weight overflows float16")
        plan.state = w16

    def account(self, plan):
        layer, r = plan.layer, plan.record
        r["lut_ops"] = cost.exact_ops(layer.rows_per_sample, layer.d, layer.m, layer.bias is not None)
        r["weight16_bytes"] = 2 * layer.d * layer.m

    def emit(self, emitter, plan, x, as_output):
        layer = plan.layer
        x2 = emitter.rows(plan, x, layer.d)  # im2col for a conv, (rows, D) for dense
        y = emitter.builder_.emit(relax.op.matmul(x2, relax.const(plan.state.astype(np.float32))))
        return emitter.epilogue(layer, y, [], layer.bias, as_output)

    def columns(self, record):
        return "fp16"


@pytest.fixture
def half():
    registry.register(HalfWeights())
    yield
    registry.unregister("half")


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(8 * 36, 10)).eval()


def test_a_method_registered_from_outside_rewrites_layers(half):
    model, x = _model(), torch.randn(2, 3, 6, 6)
    mod = tvm_lut.from_torch(model, x)
    p = LUTify(method="half", progress=False)  # no calibration: the method does not ask for rows
    p_res = p.run(mod)
    lut = p_res.module
    assert [r["method"] for r in p_res.layers] == ["half", "half"]
    assert all(r["lut_ops"]["mul"] > 0 and r["weight16_bytes"] for r in p_res.layers)
    assert json.loads(str(lut.attrs["tvm_lut.layers"]))[0]["method"] == "half"
    assert len(lut["main"].params) == 1  # every weight became a float16-rounded constant of the method
    out = tvm.relax.VirtualMachine(tvm_lut.build(lut), tvm.cpu())["main"](tvm.runtime.tensor(x.numpy())).numpy()
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(out, ref, rtol=2e-2, atol=2e-2 * np.abs(ref).max())
    assert not np.array_equal(out, ref)
    # per layer, beside the built-ins
    p2 = LUTify(calibration=np.random.default_rng(0).standard_normal((64, 3, 6, 6)).astype(np.float32),
                layers={"4": "half"}, all_layers=True, progress=False)
    p2_res = p2.run(mod)
    assert {r["name"]: r["method"] for r in p2_res.layers} == {"0": "pq", "4": "half"}


def test_cli_takes_a_registered_method(half, tmp_path, capsys):
    model, x = _model(), torch.randn(1, 3, 6, 6)
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=["y"], dynamo=False)
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(1).standard_normal((16, 3, 6, 6)).astype(np.float32))
    assert cli.main(["compile", str(path), "--calib", str(tmp_path / "c.npz"), "-o", str(tmp_path / "out"),
                     "--method", "half", "-q", "--no-latency"]) == 0
    rep = json.load(open(tmp_path / "out" / "report.json"))
    assert {r["method"] for r in rep["layers"]} == {"half"}


def test_unregistered_names_are_refused_with_the_registered_ones():
    assert "half" not in registry.names() and registry.names()[:3] == ["pq", "butterfly", "lowrank"]
    with pytest.raises(tvm_lut.OptionError, match="unknown method 'half'"):
        LUTify(method="half")
