"""The tutorials and the demo run end to end (tiny settings), so they never rot."""

import importlib.util
import json
import os

import numpy as np
import pytest

from tvm_lut.app import cli
from tvm_lut.train import sr_training

TUTORIALS = os.path.join(os.path.dirname(__file__), "..", "tutorials")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(TUTORIALS, name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tutorial_torch_to_deployed_so(tmp_path):
    exact, lut = _load("01_torch_to_deployed_so").main(tiny=True, out=str(tmp_path))
    assert os.path.isfile(tmp_path / "model.so") and exact > 90.0 and lut > exact - 3.0


@pytest.mark.slow  # about 30 s; the ONNX CLI path is tested by test_deploy_cli.py::test_cli_onnx_batch1_compile_run_report
def test_tutorial_onnx_cli(tmp_path):
    pred = _load("02_onnx_through_the_cli").main(tiny=True, out=str(tmp_path))
    assert pred["logits"].shape == (50, 10)  # the ONNX output name
    manifest = json.load(open(tmp_path / "artifact" / "manifest.json"))
    assert all(l["method"] == "pq" for l in manifest["layers"])


def test_demo_main_job(tmp_path, capsys):
    out = str(tmp_path / "demo")
    assert cli.main(["demo", "--out", out, "--epochs", "1", "--calib-images", "256", "-q"]) == 0
    text = capsys.readouterr().out
    assert "accuracy on 2000 held-out rows" in text and "latency per batch" in text
    # the headline is against what users compare with, timed in the same run
    assert "x ONNX Runtime fp32" in text and "x ONNX Runtime int8" in text and "x PyTorch" in text
    assert "TVM exact build (default lowering, untuned)" in text
    for f in ("demo.png", "demo.json", "test.npz", "model/model.so", "model/manifest.json"):
        assert os.path.isfile(os.path.join(out, f)), f
    assert open(os.path.join(out, "demo.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    report = json.load(open(os.path.join(out, "demo.json")))
    assert len(report["layers"]) == 5 and all(r["method"] == "pq" for r in report["layers"])
    assert report["accuracy"]["exact"] > 85 and report["latency"]["lut_ms"] > 0
    base = report["baselines"]
    assert base["onnxruntime_fp32_ms"] > 0 and base["onnxruntime_int8_ms"] > 0 and base["pytorch_ms"] > 0
    assert base["onnxruntime_int8_accuracy"] > 85  # ONNX Runtime int8's accuracy on the same test images
    # the chart's accuracy-vs-latency points: ours and every baseline, each with both measured
    from tvm_lut.app import demo

    assert {p[0] for p in demo.chart_points(report)} == {"LUT (tvm-lut)", "TVM exact (untuned)", "ONNX Runtime fp32",
                                                         "ONNX Runtime int8", "PyTorch"}
    assert cli.main(["run", os.path.join(out, "model"), "--input", os.path.join(out, "test.npz"),
                     "--output", os.path.join(out, "pred.npz")]) == 0
    assert np.load(os.path.join(out, "pred.npz"))["output"].shape == (2000, 10)


@pytest.mark.slow  # about 60 s; fine-tuning is tested in test_lutnn.py, budgets in test_priority_mask.py
def test_tutorial_learned_centroids_and_budget():
    res = _load("03_learned_centroids_and_budget").main(tiny=True)
    assert res["learned_l1"] == res["learned_l1_torch"]  # compiled == torch lookup layers
    assert res["exact"] > 85 and res["learned_l1"] > res["exact"] - 10


def test_tutorial_butterfly_lowrank_ezcrop():
    res = _load("04_butterfly_lowrank_ezcrop").main(tiny=True)
    assert abs(res["butterfly_tuned"] - res["butterfly_tuned_torch"]) <= 0.5  # compiled == torch chains
    assert res["butterfly_tuned"] > res["exact"] - 5 and res["butterfly_tuned_params_removed"] > 0.75
    assert res["exact"] > 85


@pytest.mark.slow  # about 100 s; its parts (ARM cross-build, farm, CAM) are each tested in test_arm/test_farm/test_cam
def test_tutorial_targets(tmp_path, monkeypatch):
    monkeypatch.setenv("TVM_LUT_FARM_DIR", str(tmp_path / "farm"))
    res = _load("05_targets_arm_farm_cam").main(tiny=True, out=str(tmp_path))
    assert res["cam_identical"] is True
    assert res["arm_identical"] in (True, None)  # None: no emulated aarch64 runtime here (the tutorial says why)
    assert os.path.isfile(tmp_path / "arm" / "model.so")


@pytest.mark.skipif(not os.path.isdir(os.path.join(sr_training.sr_root(), "t91")),
                    reason=f"the SR data (T91, Set5) is not under {sr_training.sr_root()} (../shared/data/sr)")
def test_tutorial_super_resolution(tmp_path):
    res = _load("06_super_resolution_tables").main(tiny=True, out=str(tmp_path))
    assert res["steps"] == 20 and res["shape"] == (288, 288, 3) and np.isfinite(res["psnr"])
    assert os.path.isfile(tmp_path / "tables" / "manifest.json") and os.path.isfile(tmp_path / "x4.png")
