"""The int8 (VNNI) exact conv: bit-exact against its numpy emulator, close to fp32, and through LUTify's
``exact="int8"`` / ``{"method": "int8"}`` with the reason recorded where it does not apply."""

import numpy as np
import pytest
import torch
import tvm
from torch import nn

import tvm_lut
from relay_passes import LUTify, PriorityMask
from tir_schedules import conv_int8, shuffle
from tir_schedules.kernels import ConvInput
from tvm_lut.errors import OptionError
from tvm_lut.math import int8_conv as ic
from tvm_lut.runtime.build import build
from tvm_lut.targets import host_target

TARGET = host_target()
needs_vnni = pytest.mark.skipif(shuffle.isa_for(TARGET) is not shuffle.ISAS[0],
                                reason="host has no AVX-512 VBMI + VNNI (the int8 conv's target)")


def test_reference_is_the_quantized_conv_and_close_to_fp32():
    rng = np.random.default_rng(0)
    x = np.maximum(rng.standard_normal((2, 8, 8, 8)), 0).astype(np.float32)
    w = rng.standard_normal((16, 8, 3, 3)) * 0.1
    b = rng.standard_normal(16)
    op = ic.fit(w, b, x)
    assert op.zero_point == 0 and op.weight.dtype == np.int8 and np.abs(op.weight).max() == ic.QMAX_WEIGHT
    y = ic.reference(x, op, (1, 1), (1, 1, 1, 1), (1, 1))
    with torch.no_grad():
        fp = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w.astype(np.float32)),
                                        torch.from_numpy(b.astype(np.float32)), padding=1).numpy()
    assert y.shape == fp.shape and np.abs(y - fp).max() < 0.02 * np.abs(fp).max()
    # a signed input: zero point 128, padded at the zero point, so the padding still reads 0.0
    xs = rng.standard_normal((1, 8, 8, 8)).astype(np.float32)
    ops = ic.fit(w, None, xs)
    assert ops.zero_point == 128
    with torch.no_grad():
        fps = torch.nn.functional.conv2d(torch.from_numpy(xs), torch.from_numpy(w.astype(np.float32)),
                                         padding=1).numpy()
    assert np.abs(ic.reference(xs, ops, (1, 1), (1, 1, 1, 1), (1, 1)) - fps).max() < 0.03 * np.abs(fps).max()


def test_eligibility_says_why_not():
    conv = ConvInput((1, 64, 32, 32), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
    assert conv_int8.eligible(conv, 64) is None
    assert "multiple of 16" in conv_int8.eligible(conv, 40)
    # stride 2 to a 4x4 map: 70 bytes of taps, two loads (the int8 encoder reads one and does not apply)
    assert conv_int8.eligible(ConvInput((1, 64, 8, 8), (3, 3), (2, 2), (1, 1, 1, 1), (1, 1)), 64) is None
    assert "64-byte" in conv_int8.eligible(ConvInput((1, 8, 7, 7), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)), 16)
    assert "width" in conv_int8.eligible(ConvInput((1, 6, 16, 16), (5, 5), (1, 1), (2, 2, 2, 2), (1, 1)), 16)
    with pytest.raises(ValueError, match="does not apply"):
        conv_int8.conv2d_int8(conv, 40)


@needs_vnni
@pytest.mark.parametrize("shape,m,kernel,pad,stride,signed,form", [
    ((1, 64, 32, 32), 64, (3, 3), 1, 1, False, "channels"),  # 16 pixels' words: one load per tap
    ((1, 16, 32, 32), 32, (3, 3), 1, 2, False, "channels"),  # stride 2 to 16x16: two loads and a vpermt2d
    ((2, 8, 16, 16), 16, (3, 3), 1, 2, True, "rows"),  # two images, stride 2 to 8x8: lanes from two output rows
    ((1, 3, 8, 8), 16, (3, 3), 1, 1, True, "rows"),  # 3 input channels (a network's first conv)
    ((1, 12, 4, 4), 32, (3, 3), 1, 1, False, "channels"),  # a 4x4 map: 16 pixels from four output rows
    ((2, 6, 4, 4), 16, (3, 3), 1, 1, True, "rows"),  # the same map with channels not in fours
    ((2, 24, 8, 8), 16, (1, 1), 0, 2, False, "rows"),  # a strided 1x1 shortcut to 4x4
    ((2, 32, 8, 8), 32, (3, 3), 1, 2, False, "rows"),  # stride 2 to 4x4: two loads and a two-source shuffle
    ((1, 8, 16, 16), 16, (5, 5), 2, 1, False, "channels"),  # a 5x5 kernel: 25 taps, no row word
])
def test_kernel_is_bit_exact_against_the_reference(shape, m, kernel, pad, stride, signed, form):
    rng = np.random.default_rng(sum(shape) + m)
    x = rng.standard_normal(shape).astype(np.float32)
    x = x if signed else np.maximum(x, 0)
    w = rng.standard_normal((m, shape[1], *kernel)) * 0.2
    op = ic.fit(w, rng.standard_normal(m), x)
    x.flat[::97] *= 1e30  # far outside the calibrated range (and int32): clipped, as numpy clips
    conv = ConvInput(shape, kernel, (stride, stride), (pad, pad, pad, pad), (1, 1))
    assert conv_int8.eligible(conv, m) is None and conv_int8.layout(conv) == form
    ref = ic.reference(x, op, conv.strides, conv.padding, conv.dilation)
    f = conv_int8.conv2d_int8(conv, m)
    ex = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), TARGET)
    out = tvm.runtime.tensor(np.zeros((shape[0], m, ref.shape[2] * ref.shape[3]), np.float32))
    ex["main"](*[tvm.runtime.tensor(a) for a in (x, np.array([op.inv_scale, op.zero_point], np.float32),
                                                 conv_int8.weight_operands(op.weight, form), op.offset, op.scale)], out)
    np.testing.assert_array_equal(out.numpy().reshape(ref.shape), ref)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 48, 3, padding=1), nn.ReLU(), nn.Conv2d(48, 40, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(40 * 8 * 8, 10)).eval()


@needs_vnni
def test_lutify_exact_int8_runs_kept_layers_in_int8_and_matches_the_emulator():
    model = _model()
    with torch.no_grad():  # a batch norm that is not the identity: folded into the int8 weights and offsets
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    x = np.random.default_rng(1).standard_normal((32, 3, 8, 8)).astype(np.float32)
    mod = tvm_lut.from_torch(model, torch.from_numpy(x[:1]))
    res = LUTify(calibration=x, progress=False, exact="int8", layers={"0": "exact", "5": "exact"}).run(mod)
    recs = {r["name"]: r for r in res.layers}
    assert recs["3"]["method"] == "pq"  # lookups stay lookups
    # kept exact (requested here; by the mask or as too narrow to pay, likewise): int8 where it applies
    assert recs["0"]["method"] == "int8" and recs["0"]["exact_reason"] == "requested"
    assert recs["0"]["zero_point"] == 128  # the network's signed input
    assert recs["5"]["method"] == "exact" and "multiple of 16" in recs["5"]["reason"]
    assert recs["8"]["method"] == "exact" and "not a convolution" in recs["8"]["reason"]
    plan0 = next(p for p in res.plans if p.layer.name == "0")
    got = tvm.relax.VirtualMachine(build(res.module), tvm.cpu())["main"](tvm.runtime.tensor(x[:1])).numpy()
    with torch.no_grad():
        exact = model(torch.from_numpy(x[:1])).numpy()
    assert np.linalg.norm(got - exact) < 0.5 * np.linalg.norm(exact)
    # the first layer alone, compiled: bit for bit the emulator's conv (batch norm folded in), then ReLU
    first = nn.Sequential(model[0], model[1]).eval()
    one = LUTify(calibration=x, progress=False, layers={"0": {"method": "int8"}}).run(
        tvm_lut.from_torch(first, torch.from_numpy(x[:1])))
    assert one.layers[0]["method"] == "int8"
    y = tvm.relax.VirtualMachine(build(one.module), tvm.cpu())["main"](tvm.runtime.tensor(x[:1])).numpy()
    np.testing.assert_array_equal(y, ic.reference(x[:1], one.plans[0].state, (1, 1), (1, 1, 1, 1), (1, 1)))
    np.testing.assert_array_equal(one.plans[0].state.weight, plan0.state.weight)
    with torch.no_grad():
        assert np.abs(y - first(torch.from_numpy(x[:1])).numpy()).max() < 0.05 * np.abs(y).max()


def test_exact_int8_is_refused_by_name_and_falls_back_to_fp32_where_it_cannot_run():
    with pytest.raises(OptionError, match="exact='int16'"):
        LUTify(calibration=None, exact="int16")
    with pytest.raises(OptionError, match="exact='int16'"):
        PriorityMask(None, "max-drop=1", exact="int16")
    model = nn.Sequential(nn.Conv2d(8, 32, 3, padding=1)).eval()
    x = np.random.default_rng(4).standard_normal((16, 8, 8, 8)).astype(np.float32)
    mod = tvm_lut.from_torch(model, torch.from_numpy(x[:1]))
    res = LUTify(calibration=x, progress=False, exact="int8", method="exact", target="arm").run(mod)
    rec = res.layers[0]
    assert rec["method"] == "exact" and "requested" in rec["reason"] and "lacks" in rec["reason"]


@needs_vnni
def test_cli_exact_int8_deploys_the_int8_conv(tmp_path):
    """``tvm-lut compile --exact int8``: the layer the user keeps exact is deployed as the int8 kernel, and the
    artifact runs it close to the fp32 model."""
    import json
    import os

    from tvm_lut.app import cli
    from tvm_lut.runtime.artifact import Model

    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(32 * 8 * 8, 10)).eval()
    x = np.random.default_rng(6).standard_normal((48, 8, 8, 8)).astype(np.float32)
    pt2 = str(tmp_path / "model.pt2")
    torch.export.save(torch.export.export(model, (torch.from_numpy(x[:1]),)), pt2)
    np.savez(tmp_path / "calib.npz", input=x)
    out = str(tmp_path / "out")
    assert cli.main(["compile", pt2, "--calib", str(tmp_path / "calib.npz"), "-o", out, "--layer", "0:exact",
                     "--layer", "2:exact", "--exact", "int8", "--budget", "none", "--no-latency", "-q"]) == 0
    rec = {r["name"]: r for r in json.load(open(os.path.join(out, "manifest.json")))["layers"]}
    assert rec["0"]["method"] == rec["2"]["method"] == "int8" and rec["5"]["method"] == "exact"
    got = Model(out).run({"input": x[:4]})["output"]
    with torch.no_grad():
        want = model(torch.from_numpy(x[:4])).numpy()
    assert np.linalg.norm(got - want) < 0.05 * np.linalg.norm(want)
