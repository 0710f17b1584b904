"""The LUTify pass: rewrite correctness against the numpy emulator, options, and layers left exact."""

import json

import numpy as np
import pytest
import torch
import tvm
from torch import nn

import relay_passes
import tvm_lut
from tvm_lut import relay
from tvm_lut.math import pq


def _run(mod, x):
    vm = tvm.relax.VirtualMachine(tvm_lut.build(mod), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def _assert_matches_emulator(got, ref):
    """Bit-exact: the emulator's encoder rounds each fused multiply-add once, as the compiled code does."""
    np.testing.assert_array_equal(got, ref)


def test_relay_alias_is_the_pass():
    assert relay.transform.LUTify is relay_passes.LUTify is tvm_lut.LUTify
    assert isinstance(relay.transform.LUTify(calibration=np.zeros((1, 1))), tvm.transform.Pass)


LOOKUPS = ["gather", "shuffle"]


@pytest.mark.parametrize("lookup", LOOKUPS)
def test_dense_layer_matches_emulator_bit_exact(lookup):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 48)).eval()
    x = np.random.default_rng(0).standard_normal((256, 30)).astype(np.float32)
    mod = tvm_lut.from_torch(model, torch.from_numpy(x[:32]))
    p = relay.transform.LUTify(calibration=x, progress=False, lookup=lookup)
    p_res = p.run(mod)
    lut = p_res.module
    assert [r["method"] for r in p_res.layers] == ["pq"] and p_res.layers[0]["c"] == 8  # D=30 padded to 32
    assert p_res.layers[0]["kernel"].startswith(lookup)
    assert len(lut["main"].params) == 1  # converted weights leave the signature
    got = _run(lut, x[:32])
    _assert_matches_emulator(got, p_res.pq_layers["0"].emulate(x[:32]))


@pytest.mark.parametrize("lookup", LOOKUPS)
@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_one_element_subvectors_compile_and_match_emulator(kind, lookup):
    """V=1 (16 levels per input scalar): the encoder's unit subvector loop disappears when scheduled, which
    broke its hand schedule (ScheduleError) for convs and gathered dense layers."""
    torch.manual_seed(0)
    rng = np.random.default_rng(4)
    if kind == "dense":
        model, x = nn.Sequential(nn.Linear(20, 40)).eval(), rng.standard_normal((64, 20)).astype(np.float32)
    else:
        model, x = nn.Sequential(nn.Conv2d(3, 24, 3, padding=1)).eval(), rng.standard_normal((8, 3, 8, 8)).astype(np.float32)
    mod = tvm_lut.from_torch(model, torch.from_numpy(x[:2]))
    p = relay.transform.LUTify(calibration=x, progress=False, lookup=lookup, v=1)
    p_res = p.run(mod)
    lut = p_res.module
    assert p_res.layers[0]["method"] == "pq" and p_res.layers[0]["v"] == 1 and p_res.layers[0]["kernel"].startswith(lookup)
    rows = x[:2] if kind == "dense" else pq.im2col(x[:2], (3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
    ref = p_res.pq_layers["0"].emulate(rows)
    if kind == "conv":
        ref = ref.reshape(2, 8, 8, 24).transpose(0, 3, 1, 2)
    _assert_matches_emulator(_run(lut, x[:2]), ref)


def test_dense_layer_on_an_avx2_cpu_matches_emulator_bit_exact():
    """For any AVX2 CPU (``x86:x86-64-v3``) a dense layer takes the 32-lane ``pshufb`` lookup and the
    codebook-lane encoder writing codes two per byte: an odd C (the last byte's high nibble is padding) and
    40 rows (a partial row block) still give the emulator's outputs bit for bit."""
    from tvm_lut import targets

    if not targets.resolve("x86:x86-64-v3").runs_here():
        pytest.skip("this CPU has no AVX2")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(36, 48)).eval()
    x = np.random.default_rng(3).standard_normal((256, 36)).astype(np.float32)
    mod = tvm_lut.from_torch(model, torch.from_numpy(x[:40]))
    p = relay.transform.LUTify(calibration=x, progress=False, lookup="shuffle", target="x86:x86-64-v3")
    p_res = p.run(mod)
    lut = p_res.module
    assert p_res.layers[0]["kernel"] == "shuffle-avx2" and p_res.layers[0]["c"] == 9
    vm = tvm.relax.VirtualMachine(tvm_lut.build(lut, target="x86:x86-64-v3"), tvm.cpu())
    _assert_matches_emulator(vm["main"](tvm.runtime.tensor(x[:40])).numpy(), p_res.pq_layers["0"].emulate(x[:40]))


@pytest.mark.parametrize("lookup", LOOKUPS)
def test_conv_with_stride_padding_dilation_and_bn_matches_emulator(lookup):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(20)
    model = nn.Sequential(nn.Conv2d(4, 20, 3, stride=2, padding=(1, 2), dilation=(2, 1)), bn).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
    x = np.random.default_rng(1).standard_normal((16, 4, 10, 9)).astype(np.float32)
    mod = tvm_lut.from_torch(model, torch.from_numpy(x[:4]))
    p = relay.transform.LUTify(calibration=x, progress=False, lookup=lookup)
    p_res = p.run(mod)
    lut = p_res.module
    text = lut["main"].script(show_meta=False)
    kernel = "lut_accumulate_0" if lookup == "gather" else "lut_lookup_0"
    assert "batch_norm" not in text and "conv2d" not in text and kernel in text
    if lookup == "shuffle":  # the encoder reads the NCHW input itself: no im2col kernel
        assert "lut_im2col" not in text
    got = _run(lut, x[:4])
    rec = p_res.layers[0]
    assert rec["v"] == 9 and rec["has_bias"]  # 3x3 conv default V=9; BN shift becomes the bias
    cols = pq.im2col(x[:4], (3, 3), (2, 2), (1, 2, 1, 2), (2, 1))
    ref = p_res.pq_layers["0"].emulate(cols).reshape(4, got.shape[2], got.shape[3], 20).transpose(0, 3, 1, 2)
    _assert_matches_emulator(got.transpose(0, 2, 3, 1).reshape(-1, 20), ref.transpose(0, 2, 3, 1).reshape(-1, 20))
    with torch.no_grad():
        exact = model(torch.from_numpy(x[:4])).numpy()
    # folded BN is right: far better than predicting each channel's mean (random data, V=9: coarse)
    baseline = np.linalg.norm(exact - exact.mean(axis=(0, 2, 3), keepdims=True))
    assert np.linalg.norm(got - exact) < 0.8 * baseline


def test_batched_conv_lookup_writes_nchw_without_a_transpose():
    """At batch 3 an 8x8 map is 3 images of 64 rows: the grouped lookup writes (3, M, 64), NCHW, and the
    model has no transpose after it; the output still matches the emulator bit for bit."""
    from tir_schedules import shuffle
    from tvm_lut.targets import host_target

    if shuffle.isa_for(host_target()) is not shuffle.ISAS[0]:
        pytest.skip("host has no AVX-512 VBMI + VNNI (the grouped lookup writes the batched NCHW output)")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 24, 3, padding=1)).eval()
    x = np.random.default_rng(2).standard_normal((12, 4, 8, 8)).astype(np.float32)
    mod = tvm_lut.from_torch(model, torch.from_numpy(x[:3]))
    p = relay.transform.LUTify(calibration=x, progress=False, lookup="shuffle")
    p_res = p.run(mod)
    lut = p_res.module
    text = lut["main"].script(show_meta=False)
    assert "lut_lookup_0" in text and "permute_dims" not in text
    got = _run(lut, x[:3])
    assert got.shape == (3, 24, 8, 8)
    ref = p_res.pq_layers["0"].emulate(pq.im2col(x[:3], (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)))  # (3*64, 24)
    _assert_matches_emulator(got, ref.reshape(3, 8, 8, 24).transpose(0, 3, 1, 2))


def test_auto_lookup_small_conv_takes_shuffle_small_dense_takes_gather():
    """A 4x4 map at batch 1 (16 rows) is one encoder tile: the conv takes the shuffle lookup (its encoder
    encodes virtual rows over the padded width and drops the padding columns) and stays bit-exact; a
    dense layer with 8 rows keeps the gather."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(24, 40, 3, padding=1), nn.Flatten(), nn.Linear(640, 32)).eval()
    x = np.random.default_rng(2).standard_normal((64, 24, 4, 4)).astype(np.float32)
    mod = tvm_lut.from_torch(model, torch.from_numpy(x[:1]))
    p = relay.transform.LUTify(calibration=x, progress=False, all_layers=True)
    p_res = p.run(mod)
    lut = p_res.module
    kernels = {r["name"]: r["kernel"] for r in p_res.layers}
    isa = kernels["0"].split("-", 1)[-1]
    if isa not in ("avx512vbmi", "avx512bw", "avx2"):
        pytest.skip(f"host has no 32/64-lane byte shuffle (got {kernels['0']})")
    assert kernels["0"].startswith("shuffle") and kernels["2"] == "gather"
    vm = tvm.relax.VirtualMachine(tvm_lut.build(lut), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x[:1])).numpy()
    conv = p_res.pq_layers["0"].emulate(pq.im2col(x[:1], (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)))
    flat = conv.reshape(1, 4, 4, 40).transpose(0, 3, 1, 2).reshape(1, -1)
    _assert_matches_emulator(got, p_res.pq_layers["2"].emulate(flat))


def test_narrow_and_unsupported_layers_stay_exact_with_reason(small_cnn, small_inputs, caplog):
    mod = tvm_lut.from_torch(small_cnn, torch.from_numpy(small_inputs[:4]))
    p = relay.transform.LUTify(calibration=small_inputs, progress=False)
    with caplog.at_level("INFO", logger="tvm_lut"):
        p_res = p.run(mod)
        lut = p_res.module
    assert "layer features.5 stays exact: grouped/depthwise conv (groups=4)" in caplog.text
    assert "layer fc2 stays exact: narrow layer" in caplog.text
    rec = {r["name"]: r for r in p_res.layers}
    assert rec["features.5"]["method"] == "exact" and "groups=4" in rec["features.5"]["reason"]
    assert rec["fc2"]["method"] == "exact" and "narrow layer (M=10 <= K=16)" in rec["fc2"]["reason"]
    assert rec["features.0"]["method"] == "pq" and rec["fc1"]["method"] == "pq"
    assert json.loads(str(lut.attrs[relay_passes.LAYERS_ATTR])) == p_res.layers
    # remaining exact weights stay parameters, with their values
    names = [q.name for q in lut["main"].params]
    assert "fc2.weight" in names and "features.5.weight" in names and "fc1.weight" not in names
    forced = relay.transform.LUTify(calibration=small_inputs, all_layers=True, progress=False)
    forced_res = forced.run(mod)
    assert {r["name"]: r["method"] for r in forced_res.layers}["fc2"] == "pq"
    # the LUT model still runs and stays close to the exact one
    with torch.no_grad():
        exact = small_cnn(torch.from_numpy(small_inputs[:4])).numpy()
    got = _run(lut, small_inputs[:4])
    assert np.linalg.norm(got - exact) / np.linalg.norm(exact) < 0.5


def test_per_layer_options(small_cnn, small_inputs):
    mod = tvm_lut.from_torch(small_cnn, torch.from_numpy(small_inputs[:4]))
    p = relay.transform.LUTify(calibration=small_inputs, progress=False, layers={
        "features.0": {"k": 8, "v": 3, "distance": "l1"}, "fc1": "exact", "features.3": {"distance": "cosine"}})
    p_res = p.run(mod)
    rec = {r["name"]: r for r in p_res.layers}
    assert (rec["features.0"]["k"], rec["features.0"]["v"], rec["features.0"]["distance"]) == (8, 3, "l1")
    assert p_res.pq_layers["features.0"].centroids.shape == (9, 8, 3)
    assert rec["fc1"]["method"] == "exact" and rec["fc1"]["reason"] == "requested"
    assert rec["features.3"]["distance"] == "cosine"


def test_learned_codebooks_are_used_as_given():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32)).eval()
    cents = np.random.default_rng(0).standard_normal((2, 16, 4)).astype(np.float32)
    x = np.random.default_rng(1).standard_normal((32, 8)).astype(np.float32)
    mod = tvm_lut.from_torch(model, torch.from_numpy(x))
    p = relay.transform.LUTify(codebooks={"0": cents}, progress=False)
    p_res = p.run(mod)
    got = _run(p_res.module, x)
    np.testing.assert_array_equal(p_res.pq_layers["0"].centroids, cents)
    _assert_matches_emulator(got, p_res.pq_layers["0"].emulate(x))


def test_dynamic_shapes_stay_exact():
    model = nn.Sequential(nn.Linear(8, 32)).eval()
    batch = torch.export.Dim("batch", min=2, max=64)
    mod = tvm_lut.from_torch(model, torch.zeros(4, 8), dynamic_shapes=({0: batch},))
    p = relay.transform.LUTify(calibration=np.zeros((4, 8), np.float32), progress=False)
    p_res = p.run(mod)
    assert p_res.layers[0]["method"] == "exact" and "dynamic shape" in p_res.layers[0]["reason"]


def test_unknown_layer_name_is_an_error(small_cnn, small_inputs):
    mod = tvm_lut.from_torch(small_cnn, torch.from_numpy(small_inputs[:4]))
    with pytest.raises(tvm_lut.OptionError, match=r"unknown layer name\(s\) \['features.9'\].*fc1"):
        relay.transform.LUTify(calibration=small_inputs, layers={"features.9": "exact"})(mod)
    with pytest.raises(tvm_lut.OptionError, match="unknown option"):
        relay.transform.LUTify(calibration=small_inputs, layers={"fc1": {"kk": 3}})
    with pytest.raises(tvm_lut.OptionError, match="unknown distance"):
        relay.transform.LUTify(calibration=small_inputs, distance="l3")


def test_k_larger_than_calibration_vectors_is_an_error():
    model = nn.Sequential(nn.Linear(8, 32)).eval()
    mod = tvm_lut.from_torch(model, torch.zeros(4, 8))
    with pytest.raises(tvm_lut.CalibrationError, match=r"layer '0': K=16 centroids need at least 16.*got 8"):
        relay.transform.LUTify(calibration=np.ones((8, 8), np.float32), progress=False)(mod)


def test_missing_calibration_is_an_error():
    mod = tvm_lut.from_torch(nn.Sequential(nn.Linear(8, 32)).eval(), torch.zeros(4, 8))
    with pytest.raises(tvm_lut.CalibrationError, match="needs calibration data"):
        relay.transform.LUTify()(mod)


def test_sequential_calibration_runs(small_cnn, small_inputs):
    mod = tvm_lut.from_torch(small_cnn, torch.from_numpy(small_inputs[:4]))
    p = relay.transform.LUTify(calibration=small_inputs, sequential=True, all_layers=True, progress=False)
    got = _run(p(mod), small_inputs[:4])
    with torch.no_grad():
        exact = small_cnn(torch.from_numpy(small_inputs[:4])).numpy()
    assert np.isfinite(got).all() and np.linalg.norm(got - exact) / np.linalg.norm(exact) < 0.6
