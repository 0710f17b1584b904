"""Model shapes this project did not write, through ``compile --budget`` as a new user would: repeated
blocks with depthwise convs (MobileNet-style), layers we do not rewrite (conv1d, transposed conv), and
an ONNX graph TVM itself cannot build."""

import json

import numpy as np
import torch
from torch import nn

from tvm_lut.app import cli


class _InvRes(nn.Module):
    def __init__(self, c: int, e: int = 4):
        super().__init__()
        self.b = nn.Sequential(nn.Conv2d(c, c * e, 1, bias=False), nn.BatchNorm2d(c * e), nn.ReLU6(),
                               nn.Conv2d(c * e, c * e, 3, padding=1, groups=c * e, bias=False), nn.BatchNorm2d(c * e),
                               nn.ReLU6(), nn.Conv2d(c * e, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.b(x)


class _MobileNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.blocks = nn.Sequential(_InvRes(16), _InvRes(16))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


class _Conv1dAndTransposed(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 16, 5, padding=2)
        self.up = nn.ConvTranspose1d(16, 8, 2, stride=2)
        self.fc = nn.Linear(8 * 32, 40)
        self.out = nn.Linear(40, 3)

    def forward(self, x):
        return self.out(torch.relu(self.fc(torch.relu(self.up(torch.relu(self.c1(x)))).flatten(1))))


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(12, 48)
        self.out = nn.Linear(16, 5)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)  # ONNX: Slice with computed bounds
        return self.out((torch.softmax(q @ k.transpose(1, 2), -1) @ v).mean(1))


def _files(tmp_path, model, x, labels=True, onnx_file=True):
    model.eval()
    path = str(tmp_path / ("m.onnx" if onnx_file else "m.pt2"))
    if onnx_file:
        torch.onnx.export(model, (torch.from_numpy(x[:1]),), path, input_names=["x"], dynamo=False,
                          dynamic_axes={"x": {0: "batch"}})
    else:
        torch.export.save(torch.export.export(model, (torch.from_numpy(x[:1]),)), path)
    arrays = {"x": x}
    if labels:
        with torch.no_grad():
            arrays["labels"] = model(torch.from_numpy(x)).argmax(1).numpy()
    np.savez(tmp_path / "calib.npz", **arrays)
    return path, str(tmp_path / "calib.npz")


def test_mobilenet_style_onnx_through_compile_budget(tmp_path):
    torch.manual_seed(0)
    model = _MobileNetish()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 1.5)
    x = np.random.default_rng(0).standard_normal((120, 3, 32, 32)).astype(np.float32)
    path, calib = _files(tmp_path, model, x)
    out = tmp_path / "out"
    assert cli.main(["compile", path, "--calib", calib, "--budget", "max-drop=2.0", "--batch", "8", "-o", str(out),
                     "-q", "--no-latency"]) == 0
    layers = {l["name"]: l for l in json.load(open(out / "manifest.json"))["layers"]}
    assert {"blocks.0.b.0", "blocks.1.b.0", "blocks.0.b.3", "blocks.1.b.3"} <= set(layers)
    assert "groups=64" in layers["blocks.0.b.3"]["reason"]


def test_unsupported_weighted_layers_are_listed_exact_with_the_reason(tmp_path, capsys):
    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((60, 4, 16)).astype(np.float32)
    path, calib = _files(tmp_path, _Conv1dAndTransposed(), x, onnx_file=False)
    out = tmp_path / "out"
    assert cli.main(["compile", path, "--calib", calib, "--all-layers", "-o", str(out), "-q", "--no-latency"]) == 0
    layers = {l["name"]: l for l in json.load(open(out / "manifest.json"))["layers"]}
    assert layers["c1"]["method"] == "exact" and "conv1d layers are not rewritten" in layers["c1"]["reason"]
    assert layers["up"]["kind"] == "conv1d_transpose" and layers["up"]["method"] == "exact"
    assert layers["fc"]["method"] == "pq"
    assert cli.main(["report", str(out)]) == 0
    assert "conv1d layers are not rewritten" in capsys.readouterr().out


def test_a_slice_with_computed_bounds_builds(tmp_path, capsys):
    """The TorchScript export writes ``chunk`` as Slices whose bounds are computed from the input's shape:
    imported as they are, tensors of unknown shape that TVM could not build ("TVM cannot build this model
    as imported"). ``from_onnx`` folds those computations for the fixed shapes, and the model compiles."""
    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((40, 8, 12)).astype(np.float32)
    path, calib = _files(tmp_path, _Attention(), x)
    out = tmp_path / "out"
    assert cli.main(["compile", path, "--calib", calib, "--budget", "max-drop=2.0", "-o", str(out), "-q",
                     "--no-latency"]) == 0
    rep = json.load(open(out / "report.json"))
    assert sorted(r["name"] for r in rep["layers"]) == ["out", "qkv"]


def test_a_model_tvm_cannot_build_gets_a_clear_error(tmp_path, capsys, monkeypatch):
    """Whatever TVM fails to build (an internal check deep in its lowering) becomes an error that says so,
    with the exit status of bad input, and nothing is written."""
    from tvm_lut.app import pipeline

    def fails(*_a, **_k):
        raise RuntimeError("InternalError: Check failed: (data_ty->shape.has_value()) is false")

    monkeypatch.setattr(pipeline, "compile_with_params", fails)
    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((40, 8, 12)).astype(np.float32)
    path, calib = _files(tmp_path, _Attention(), x)
    out = tmp_path / "out"
    assert cli.main(["compile", path, "--calib", calib, "--budget", "none", "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert "TVM cannot build this model as imported" in err and "data_ty->shape" in err
    assert not out.exists()
