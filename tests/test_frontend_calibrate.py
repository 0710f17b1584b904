"""Frontends keep source names; layer discovery folds bias/BN; calibration collects the real layer inputs."""

import numpy as np
import onnx
import pytest
import torch

import tvm_lut
from tvm_lut.frontend import graph
from tvm_lut.runtime import calibrate


def _hook_inputs(model, x):
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=name: seen.__setitem__(n, inp[0].detach().numpy()))
             for name, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        model(torch.from_numpy(x))
    for h in hooks:
        h.remove()
    return seen


def test_torch_names_and_layers(small_cnn, small_inputs):
    mod = tvm_lut.from_torch(small_cnn, torch.from_numpy(small_inputs[:4]))
    weights = [p.name for p in mod["main"].params[1:]]
    assert "features.0.weight" in weights and "fc2.bias" in weights
    layers = {l.name: l for l in graph.find_layers(mod)}
    assert list(layers) == ["features.0", "features.3", "features.5", "fc1", "fc2"]
    assert layers["features.5"].unsupported.startswith("grouped/depthwise conv (groups=4)")
    assert layers["features.3"].conv["strides"] == (2, 2) and layers["features.3"].conv["dilation"] == (2, 2)
    # conv bias + batch norm folded: weight/bias reproduce conv -> BN exactly
    l0 = layers["features.0"]
    x = small_inputs[:2]
    with torch.no_grad():
        ref = small_cnn.features[1](small_cnn.features[0](torch.from_numpy(x))).numpy()
    cols = tvm_lut.math.pq.im2col(x, (3, 3), (1, 1), (1, 1, 1, 1))
    y = (cols @ l0.weight + l0.bias).reshape(2, 8, 8, 24).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
    assert layers["fc1"].kind == "dense" and layers["fc1"].weight.shape == (512, 40)


def test_onnx_names_from_initializers_and_nodes(tmp_path, small_cnn):
    path = tmp_path / "m.onnx"
    torch.onnx.export(small_cnn, (torch.zeros(1, 3, 8, 8),), str(path), input_names=["input"], dynamo=False,
                      dynamic_axes={"input": {0: "batch"}})
    names = [l.name for l in graph.find_layers(tvm_lut.from_onnx(str(path), batch=3))]
    # features.0's weight is folded with BN by the exporter into an auto-named 'onnx::Conv_*' initializer:
    # it is named after its node instead
    assert names == ["features.0", "features.3", "features.5", "fc1", "fc2"]
    mod = tvm_lut.from_onnx(onnx.load(str(path)), batch=3)
    assert graph.input_signature(mod["main"]) == [("input", (3, 3, 8, 8), "float32")]


class _Block(torch.nn.Module):
    """Repeated blocks with the same inner names: ONNX scopes ``/blocks/blocks.0/b/b.0/Conv``."""

    def __init__(self):
        super().__init__()
        self.b = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 1, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU())

    def forward(self, x):
        return x + self.b(x)


def test_onnx_names_of_repeated_blocks_are_full_module_paths(tmp_path):
    """Each BN-folded conv is named by its whole module path (``blocks.1.b.0``), not its last scope
    (``b.0`` twice: two parameters with one name broke BindParams)."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Sequential(_Block(), _Block())).eval()
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (torch.zeros(1, 3, 8, 8),), str(path), input_names=["input"], dynamo=False)
    mod = tvm_lut.from_onnx(str(path))
    names = [l.name for l in graph.find_layers(mod)]
    assert names == ["0", "1.0.b.0", "1.1.b.0"]
    x = np.random.default_rng(0).standard_normal((64, 3, 8, 8)).astype(np.float32)
    lut = tvm_lut.LUTify(calibration=x, all_layers=True, progress=False)(mod)
    assert tvm_lut.build(lut) is not None


@pytest.mark.parametrize("frontend", ["torch", "onnx"])
def test_calibration_collects_real_layer_inputs(tmp_path, small_cnn, small_inputs, frontend):
    x = small_inputs[:10]
    if frontend == "torch":
        mod = tvm_lut.from_torch(small_cnn, torch.from_numpy(x[:4]))
    else:
        path = tmp_path / "m.onnx"
        torch.onnx.export(small_cnn, (torch.zeros(4, 3, 8, 8),), str(path), input_names=["input"], dynamo=False)
        mod = tvm_lut.from_onnx(str(path))
    layers = graph.find_layers(mod)
    inputs = calibrate.normalize_inputs(x, graph.input_signature(mod["main"]))
    rows = calibrate.collect(mod, layers, inputs, max_rows=10**9, progress=False)  # 10 = 2 full batches + 2
    real = _hook_inputs(small_cnn, x)
    for layer in layers:
        ref = calibrate.layer_rows(layer, real[layer.name])
        assert rows[layer.name].shape == ref.shape
        np.testing.assert_allclose(np.sort(rows[layer.name], axis=0), np.sort(ref, axis=0), rtol=1e-4, atol=1e-4)


def test_token_rows_folded_into_the_first_axis_are_all_collected():
    """A transformer's dense layers imported at batch 1 multiply ``(tokens, d)``: every token of every
    calibration sample is a row (not one row per sample), and a sample counts ``tokens`` rows."""
    tokens, d = 12, 16
    model = torch.nn.Sequential(torch.nn.Linear(d, 32), torch.nn.ReLU(), torch.nn.Linear(32, d)).eval()
    x = np.random.default_rng(0).standard_normal((5, tokens, d)).astype(np.float32)
    mod = tvm_lut.from_torch(model, torch.from_numpy(x[:1]))
    layers = graph.find_layers(mod)
    assert [(l.rows, l.rows_per_sample) for l in layers] == [(tokens, tokens), (tokens, tokens)]
    inputs = calibrate.normalize_inputs(x, graph.input_signature(mod["main"]))
    rows = calibrate.collect(mod, layers, inputs, max_rows=10**9, progress=False)
    real = _hook_inputs(model, x)
    for layer in layers:
        ref = calibrate.layer_rows(layer, real[layer.name])
        assert rows[layer.name].shape == ref.shape == (5 * tokens, layer.d)
        np.testing.assert_allclose(np.sort(rows[layer.name], axis=0), np.sort(ref, axis=0), rtol=1e-4, atol=1e-4)


def test_calibration_subsamples_rows(small_cnn, small_inputs):
    mod = tvm_lut.from_torch(small_cnn, torch.from_numpy(small_inputs[:4]))
    layers = graph.find_layers(mod)[:1]
    inputs = calibrate.normalize_inputs(small_inputs, graph.input_signature(mod["main"]))
    rows = calibrate.collect(mod, layers, inputs, max_rows=500, progress=False)
    assert len(rows["features.0"]) == 500 and rows["features.0"].shape[1] == 27


def test_normalize_inputs_accepts_batches_tensors_and_mappings(small_inputs):
    sig = [("x", (4, 3, 8, 8), "float32")]
    a = calibrate.normalize_inputs([torch.from_numpy(small_inputs[:5]), small_inputs[5:9]], sig)
    b = calibrate.normalize_inputs({"x": small_inputs[:9], "labels": np.zeros(9)}, sig)
    np.testing.assert_array_equal(a["x"], b["x"])


@pytest.mark.parametrize("data,match", [
    (np.zeros((0, 3, 8, 8), np.float32), "empty"),
    ([], "empty"),
    (np.full((4, 3, 8, 8), np.nan, np.float32), "NaN/Inf"),
    (np.zeros((4, 3, 9, 8), np.float32), r"shape \(4, 3, 9, 8\).*expects \(N, 3, 8, 8\)"),
    ({"image": np.zeros((4, 3, 8, 8), np.float32), "other": np.zeros((4, 1))}, "do not match the model inputs"),
])
def test_normalize_inputs_rejects_bad_calibration(data, match):
    with pytest.raises(tvm_lut.CalibrationError, match=match):
        calibrate.normalize_inputs(data, [("x", (4, 3, 8, 8), "float32")])


def test_checked_inputs_are_checked_once():
    """``normalize_inputs`` checks names, shapes and NaN/Inf once: what it returns, given back with the same
    signature, is returned as it is; a plain dict (or another signature) is checked again."""
    from tvm_lut.errors import CalibrationError
    from tvm_lut.runtime.calibrate import CheckedInputs, normalize_inputs

    sig = [("x", (1, 3), "float32")]
    x = np.ones((5, 3), np.float32)
    checked = normalize_inputs({"x": x}, sig)
    assert isinstance(checked, CheckedInputs) and normalize_inputs(checked, sig) is checked
    assert normalize_inputs(checked, [("x", (1, 3), "float64")]) is not checked
    bad = {"x": x.copy()}
    bad["x"][2, 1] = np.nan
    with pytest.raises(CalibrationError, match="1 NaN/Inf"):
        normalize_inputs(bad, sig)
