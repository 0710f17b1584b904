"""The int8 (VNNI) encoder: bit-exact against its numpy reference, the same codes in torch, and through LUTify."""

import numpy as np
import pytest
import torch
import tvm
from torch import nn

import tvm_lut
from relay_passes import LUTify
from tir_schedules import encode_int8, shuffle
from tir_schedules.kernels import ConvInput
from tvm_lut.math import int8_scores as i8, pq
from tvm_lut.runtime.build import build
from tvm_lut.targets import host_target

TARGET = host_target()
GROUPED = shuffle.isa_for(TARGET) is shuffle.ISAS[0]
needs_vnni = pytest.mark.skipif(not GROUPED, reason="host has no AVX-512 VBMI + VNNI (the int8 encoder's target)")


def _operands(x, conv, signed=False, seed=0, v=None):
    rows = pq.im2col(x, conv.kernel_hw, conv.strides, conv.padding, conv.dilation)
    cents = pq.fit_codebooks(rows[:4000], v or conv.kernel_hw[0] * conv.kernel_hw[1], 16, "l2", seed)
    enc = i8.fit(cents, *i8.input_quantization(rows))
    assert enc.zero_point == (128 if signed else 0)
    return rows, cents, enc


def test_reference_codes_are_the_first_integer_minimum_and_torch_agrees():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 36)).astype(np.float32)  # signed input: zero point 128
    cents = pq.fit_codebooks(x, 9, 16, "l2")
    enc = i8.fit(cents, *i8.input_quantization(x))
    assert enc.zero_point == 128 and enc.centroids.dtype == np.int8 and np.abs(enc.offsets).max() < i8.OFFSET_LIMIT
    xq = i8.quantize_input(x, enc.inv_scale, enc.zero_point)
    s = i8.scores(xq, enc)
    codes = i8.encode(xq, enc)
    np.testing.assert_array_equal(s[np.arange(500)[:, None], np.arange(4), codes], s.min(-1))
    assert (s == s.min(-1, keepdims=True)).sum(-1).max() >= 1
    # torch: the training path's codes, bit for bit
    np.testing.assert_array_equal(i8.codes_torch(torch.from_numpy(x), enc).numpy(), codes)
    # near the fp32 nearest centroid: the integer scores are a close approximation
    fp = pq.encode(x, *pq.encoder_operands(cents, "l2"), "l2")
    assert np.mean(fp == codes) > 0.97


def test_eligibility_says_why_not():
    conv = ConvInput((1, 64, 32, 32), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
    assert encode_int8.eligible(conv, 64, 16, 9) is None
    assert encode_int8.eligible(ConvInput((1, 64, 32, 32), (3, 3), (2, 2), (1, 1, 1, 1), (1, 1)), 64, 16, 9) is None
    # stride 2 to a 4x4 map: the 16 pixels' four input row pairs span more than one 64-byte load
    assert "64-byte" in encode_int8.eligible(ConvInput((1, 64, 8, 8), (3, 3), (2, 2), (1, 1, 1, 1), (1, 1)), 64, 16, 9)
    assert "K=8" in encode_int8.eligible(conv, 64, 8, 9)
    assert "V=4" in encode_int8.eligible(conv, 64, 16, 4)
    # one kernel row per subspace: 3 codebooks per channel
    assert encode_int8.eligible(conv, 192, 16, 3) is None
    assert "multiple of 4" in encode_int8.eligible(ConvInput((1, 6, 32, 32), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)), 18, 16, 3)
    assert "multiple of 4" in encode_int8.eligible(ConvInput((1, 6, 32, 32), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)), 6, 16, 9)
    assert "64-byte" in encode_int8.eligible(ConvInput((1, 8, 7, 7), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)), 8, 16, 9)
    assert "width" in encode_int8.eligible(ConvInput((1, 8, 16, 16), (5, 5), (1, 1), (2, 2, 2, 2), (1, 1)), 8, 16, 25)


@needs_vnni
@pytest.mark.parametrize("shape,kernel,pad,lanes,signed,stride", [
    ((1, 64, 32, 32), (3, 3), 1, 64, False, 1),
    ((1, 16, 32, 32), (3, 3), 1, 64, False, 2),  # stride 2 to 16x16: lane j reads 2j
    ((2, 8, 16, 16), (3, 3), 1, 32, True, 2),  # stride 2 to 8x8: 16 pixels from two output rows
    ((2, 8, 8, 8), (3, 3), 1, 32, True, 1),  # two images, 8-wide rows: lanes from two output rows
    ((1, 12, 4, 4), (3, 3), 1, 16, False, 1),  # a 4x4 map: 16 pixels from four output rows
    ((1, 4, 16, 16), (2, 2), 0, 64, True, 1),  # no padding, a 2x2 kernel: a 15x15 output does not qualify
    ((3, 8, 16, 16), (1, 3), 0, 64, False, 1),  # a 1x3 kernel; 224 rows: the last 64-row block half empty
])
def test_kernel_is_bit_exact_against_the_reference(shape, kernel, pad, lanes, signed, stride):
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal(shape).astype(np.float32)
    x = x if signed else np.maximum(x, 0)
    conv = ConvInput(shape, kernel, (stride, stride), (pad, pad, pad, pad), (1, 1))
    c = shape[1]
    why = encode_int8.eligible(conv, c, 16, kernel[0] * kernel[1])
    if why is not None:
        with pytest.raises(ValueError, match="does not apply"):
            encode_int8.encode_conv_int8(conv, c, 16, lanes)
        return
    _, _, enc = _operands(x, conv, signed)
    x.flat[::101] *= 1e30  # far outside the calibrated range (and int32): clipped to 0 or 255, as numpy clips
    rows = pq.im2col(x, conv.kernel_hw, conv.strides, conv.padding, conv.dilation)
    ref = pq.pack_codes_grouped(i8.encode_float(rows, enc), lanes)
    f = encode_int8.encode_conv_int8(conv, c, 16, lanes)
    ex = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), TARGET)
    args = [tvm.runtime.tensor(a) for a in (x, np.array([enc.inv_scale, enc.zero_point], np.float32),
                                            encode_int8.centroid_operands(enc.centroids, kernel), enc.offsets)]
    out = tvm.runtime.tensor(np.zeros(ref.shape, np.uint8))
    ex["main"](*args, out)
    np.testing.assert_array_equal(out.numpy(), ref)


@needs_vnni
@pytest.mark.parametrize("shape,pad,lanes,signed,stride", [
    ((1, 64, 32, 32), 1, 64, False, 1),
    ((2, 8, 16, 16), 1, 32, True, 2),  # stride 2 to 8x8: 16 pixels from two output rows
    ((1, 12, 4, 4), 1, 16, False, 1),  # a 4x4 map: 16 pixels from four output rows
])
def test_row_subspaces_are_bit_exact_against_the_reference(shape, pad, lanes, signed, stride):
    """V=3 at 3x3 (one kernel row per codebook, 3 codebooks per channel): the same kernel, one argmin per row."""
    rng = np.random.default_rng(sum(shape) + 1)
    x = rng.standard_normal(shape).astype(np.float32)
    x = x if signed else np.maximum(x, 0)
    conv = ConvInput(shape, (3, 3), (stride, stride), (pad, pad, pad, pad), (1, 1))
    c = shape[1] * 3
    assert encode_int8.eligible(conv, c, 16, 3) is None
    rows, cents, enc = _operands(x, conv, signed, v=3)
    assert enc.centroids.shape == (c, 16, 3)
    ref = pq.pack_codes_grouped(i8.encode_float(rows, enc), lanes)
    f = encode_int8.encode_conv_int8(conv, c, 16, lanes, v=3)
    ex = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), TARGET)
    args = [tvm.runtime.tensor(a) for a in (x, np.array([enc.inv_scale, enc.zero_point], np.float32),
                                            encode_int8.centroid_operands(enc.centroids, (3, 3)), enc.offsets)]
    out = tvm.runtime.tensor(np.zeros(ref.shape, np.uint8))
    ex["main"](*args, out)
    np.testing.assert_array_equal(out.numpy(), ref)
    # codes differ between codebooks of one channel's rows (each row has its own argmin)
    codes = i8.encode_float(rows, enc).reshape(len(rows), shape[1], 3)
    assert (codes[..., 0] != codes[..., 1]).any()
    with pytest.raises(ValueError, match="do not cover"):
        encode_int8.encode_conv_int8(conv, shape[1], 16, lanes, v=3)


@needs_vnni
def test_lutify_int8_encoder_matches_its_emulator_and_records_why_other_layers_keep_fp32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, stride=2, padding=1)).eval()
    x = np.random.default_rng(3).standard_normal((24, 8, 16, 16)).astype(np.float32)
    mod = tvm_lut.from_torch(model, torch.from_numpy(x[:1]))
    res = LUTify(calibration=x, progress=False, encoder="int8").run(mod)
    recs = {r["name"]: r for r in res.layers}
    assert recs["2"]["encoder"] == "int8" and recs["0"]["encoder"] == "int8"
    # the strided conv writes an 8x8 map: its 16 pixels' input rows fit one load, so it qualifies too
    assert recs["4"]["encoder"] == "int8" and res.pq_layers["4"].int8 is not None
    vm = tvm.relax.VirtualMachine(build(res.module), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x[:1])).numpy()
    # the emulator, layer by layer on the compiled model's own intermediate values: the first layer's
    # output is compared bit for bit (the whole chain is held to the emulator by the kernel tests)
    q0 = res.pq_layers["0"]
    y0 = q0.emulate(pq.im2col(x[:1], (3, 3), (1, 1), (1, 1, 1, 1))).reshape(1, 16, 16, 32).transpose(0, 3, 1, 2)
    one = LUTify(calibration=x, progress=False, encoder="int8",
                 fitted={"0": q0}).run(tvm_lut.from_torch(nn.Sequential(model[0]).eval(), torch.from_numpy(x[:1])))
    got0 = tvm.relax.VirtualMachine(build(one.module), tvm.cpu())["main"](tvm.runtime.tensor(x[:1])).numpy()
    np.testing.assert_array_equal(got0, y0)
    with torch.no_grad():
        exact = model(torch.from_numpy(x[:1])).numpy()
    assert np.linalg.norm(got - exact) < 0.8 * np.linalg.norm(exact)


@needs_vnni
def test_lutify_row_subspaces_get_the_int8_encoder_and_match_the_emulator():
    """A 3x3 conv asked for V=3 (LayerOptions): 3 codebooks per channel, int8 scores, bit for bit."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(8, 32, 3, padding=1)).eval()
    x = np.random.default_rng(5).standard_normal((24, 8, 16, 16)).astype(np.float32)
    mod = tvm_lut.from_torch(model, torch.from_numpy(x[:1]))
    res = LUTify(calibration=x, progress=False, encoder="int8", layers={"0": {"v": 3}}).run(mod)
    rec = res.layers[0]
    assert rec["method"] == "pq" and rec["v"] == 3 and rec["c"] == 24 and rec["encoder"] == "int8"
    q = res.pq_layers["0"]
    assert q.int8 is not None and q.int8.centroids.shape == (24, 16, 3)
    got = tvm.relax.VirtualMachine(build(res.module), tvm.cpu())["main"](tvm.runtime.tensor(x[:1])).numpy()
    want = q.emulate(pq.im2col(x[:1], (3, 3), (1, 1), (1, 1, 1, 1))).reshape(1, 16, 16, 32).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(got, want)


def test_int8_on_a_target_without_it_keeps_fp32_with_the_reason():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 32, 3, padding=1)).eval()
    x = np.random.default_rng(4).standard_normal((16, 8, 8, 8)).astype(np.float32)
    mod = tvm_lut.from_torch(model, torch.from_numpy(x[:1]))
    res = LUTify(calibration=x, progress=False, encoder="int8", target="arm", all_layers=True).run(mod)
    rec = res.layers[0]
    assert rec["method"] == "pq"
    assert rec["encoder"] == "fp32" and "grouped layout" in rec["encoder_note"]
    with pytest.raises(tvm_lut.errors.OptionError, match="encoder"):
        LUTify(calibration=x, encoder="int4")
