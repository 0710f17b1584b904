"""Latency baselines users compare against (``tvm_lut.app.baselines``): ONNX Runtime fp32 and int8 and PyTorch,
measured in the same process as the builds, and the report's headline built on them."""

import sys

import numpy as np
import pytest
import torch

from tests.test_onnx_patterns import mnist8_pattern
from tvm_lut.app import baselines
from tvm_lut.app.report import latency_lines

pytest.importorskip("onnxruntime", reason="onnxruntime is a dependency of tvm-lut: pip install -e .")


def test_onnxruntime_fp32_and_int8_and_pytorch_are_timed_and_int8_accuracy_measured(tmp_path):
    model = mnist8_pattern()  # opset 8, IR 3, a bias Add: the quantizer needs opset 13 and no bias rescale
    rng = np.random.default_rng(0)
    x = {"Input3": rng.standard_normal((40, 1, 16, 16)).astype(np.float32)}
    held, labels = {"Input3": x["Input3"][:10]}, np.arange(10) % 10
    torch_mod = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 10)).eval()
    got = baselines.measure(batch=1, threads=1, calibration=x, onnx_model=model, torch_module=torch_mod,
                            held=held, labels=labels)
    assert got["notes"] == []
    for key in ("onnxruntime_fp32_ms", "onnxruntime_int8_ms", "pytorch_ms"):
        assert got[key] > 0
    assert 0 <= got["onnxruntime_int8_accuracy"] <= 100 and 0 <= got["onnxruntime_fp32_accuracy"] <= 100


def test_without_onnxruntime_the_report_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    got = baselines.measure(batch=1, threads=1, calibration={"Input3": np.zeros((2, 1, 16, 16), np.float32)},
                            onnx_model=mnist8_pattern())
    assert got["notes"] == [baselines.INSTALL_HINT] and "onnxruntime_fp32_ms" not in got
    lines = latency_lines({"batch": 1, "threads": 1, "lut_ms": 1.0, "exact_ms": 2.0, "speedup": 2.0, "note": ""}, got)
    assert "pip install onnxruntime" in "\n".join(lines)


def test_headline_is_against_onnxruntime_not_the_untuned_tvm_build():
    lat = {"batch": 1, "threads": 2, "lut_ms": 2.0, "exact_ms": 20.0, "speedup": 10.0, "note": "n"}
    lines = latency_lines(lat, {"onnxruntime_fp32_ms": 3.0, "onnxruntime_int8_ms": 1.0, "pytorch_ms": 4.0,
                                "notes": []})
    assert lines[0] == ("latency per batch of 1, 2 threads: LUT 2.000 ms: 1.50x ONNX Runtime fp32 (3.000 ms), "
                        "0.50x ONNX Runtime int8 (1.000 ms), 2.00x PyTorch (4.000 ms)")
    assert "untuned" not in lines[0] and "untuned" in lines[1]
