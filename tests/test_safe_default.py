"""``tvm-lut compile`` with no flags never ships a model that lost its accuracy silently: a priority-mask
budget by default (``max-drop=1`` with labels, ``max-disagree=1`` without), ``--budget none`` / ``--all-layers``
for today's convert-everything behaviour, and a summary that says what was kept and what to try next."""

import json

import numpy as np
import pytest
import torch

from tvm_lut.app import cli
from tvm_lut.app.pipeline import default_budget


def test_default_budget_policy():
    assert default_budget(None, True) == ("max-drop=1", default_budget(None, True)[1])
    assert default_budget(None, False)[0] == "max-disagree=1"
    assert default_budget("none", True)[0] is None and default_budget("None", False)[0] is None
    assert default_budget(None, True, all_layers=True)[0] is None
    assert default_budget(None, True, method="lowrank")[0] is None
    assert default_budget("min-removed=0.5", True) == ("min-removed=0.5", "asked")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """An MLP with random weights whose top-1 varies from sample to sample (so approximation flips it)."""
    d = tmp_path_factory.mktemp("safe")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)).eval()
    path = d / "model.onnx"
    torch.onnx.export(model, (torch.zeros(1, 3, 8, 8),), str(path), input_names=["image"],
                      output_names=["logits"], dynamo=False)
    x = np.random.default_rng(5).standard_normal((160, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():  # labels the exact model gets right: exact accuracy 100 %, every flip is a loss
        labels = model(torch.from_numpy(x)).argmax(-1).numpy()
    np.savez(d / "labelled.npz", image=x, labels=labels)
    np.savez(d / "plain.npz", image=x)
    return str(path), d


def _compile(capsys, model, calib, out, *flags):
    assert cli.main(["compile", model, "--calib", str(calib), "-o", str(out), "-q", "--no-latency", *flags]) == 0
    text = capsys.readouterr().out
    return json.load(open(out / "report.json")), text


def test_labelled_default_is_max_drop_1_and_everything_is_the_old_behaviour(files, tmp_path, capsys):
    model, d = files
    # K=2 centroids: coarse enough that converting every layer costs accuracy the mask must refuse
    rep, text = _compile(capsys, model, d / "labelled.npz", tmp_path / "a", "--k", "2")
    assert rep["budget"]["budget"] == "max-drop=1" and "priority_mask" in rep
    pm = rep["priority_mask"]
    assert pm["val_drop"] + pm["val_drop_margin"] <= 1.0  # what the mask guaranteed on its validation rows
    assert "budget: max-drop=1 (default (the calibration data has labels)" in text
    assert f"drop {rep['accuracy']['drop']:+.2f} points" in text
    assert "WARNING" not in text or rep["accuracy"]["drop"] > 1.0
    every, text_all = _compile(capsys, model, d / "labelled.npz", tmp_path / "b", "--k", "2", "--budget", "none")
    assert "priority_mask" not in every and every["budget"]["budget"] is None
    assert sum(r["method"] == "pq" for r in every["layers"]) > sum(r["method"] == "pq" for r in rep["layers"])
    assert every["accuracy"]["drop"] > 1.0  # what the default refused to ship ...
    assert "WARNING: the LUT model lost" in text_all and "--budget max-drop=1" in text_all  # ... is said out loud


def test_unlabelled_default_keeps_top1_agreement(files, tmp_path, capsys):
    model, d = files
    rep, text = _compile(capsys, model, d / "plain.npz", tmp_path / "c")
    assert rep["budget"]["budget"] == "max-disagree=1" and rep["priority_mask"]["val_reference"]
    assert "accuracy" not in rep or rep["accuracy"] is None
    assert rep["agreement"]["rows"] == 32 and "top-1 agreement with the exact model on 32 held-out" in text
    assert "budget: max-disagree=1" in text


@pytest.fixture(scope="module")
def keras_squeezenet(tmp_path_factory):
    """The issue's case: a SqueezeNet exported the way Keras exports one (NHWC input transposed to NCHW inside
    the graph, opset 13), random weights standardised so that its top-1 varies over ten classes, and labels
    its exact build gets right. Converting every layer ruins it (as the Keras model went 75.0 % -> 27.7 %)."""
    from tests import zoo

    d = tmp_path_factory.mktemp("keras")
    torch.manual_seed(0)
    net = zoo.import_torchvision().models.squeezenet1_1(weights=None, num_classes=10).eval()
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight)
            torch.nn.init.normal_(m.bias, std=0.1)

    class NHWC(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net
            self.register_buffer("mu", torch.zeros(10))
            self.register_buffer("sd", torch.ones(10))

        def forward(self, x):
            return (self.net(x.permute(0, 3, 1, 2)) - self.mu) / self.sd

    model = NHWC().eval()
    x = torch.randn(300, 32, 32, 3)
    with torch.no_grad():
        y = net(x.permute(0, 3, 1, 2))
        model.mu.copy_(y.mean(0))
        model.sd.copy_(y.std(0) + 1e-3)
        labels = model(x).argmax(-1).numpy()
    assert len(np.unique(labels)) >= 5
    path = d / "squeezenet_nhwc.onnx"
    torch.onnx.export(model, (x[:1],), str(path), input_names=["input_1"], output_names=["dense"], dynamo=False,
                      opset_version=13)
    np.savez(d / "calib.npz", input_1=x[:200].numpy(), labels=labels[:200])
    np.savez(d / "test.npz", input_1=x[200:].numpy())
    return str(path), d, labels[200:]


def test_keras_nhwc_squeezenet_is_not_shipped_ruined(keras_squeezenet, tmp_path, capsys):
    model, d, test_labels = keras_squeezenet
    every, text_all = _compile(capsys, model, d / "calib.npz", tmp_path / "all", "--budget", "none")
    assert every["accuracy"]["drop"] > 20 and "WARNING: the LUT model lost" in text_all  # what no flags must refuse
    rep, text = _compile(capsys, model, d / "calib.npz", tmp_path / "default")
    pm = rep["priority_mask"]
    assert rep["budget"]["budget"] == "max-drop=1" and pm["val_drop"] + pm["val_drop_margin"] <= 1.0
    assert rep["accuracy"]["drop"] <= 1.0
    if not pm["converted"]:  # nothing fitted the budget: said, with what to try
        assert "NOTE: no layer could be converted within max-drop=1" in text and "--codebooks" in text
    # the shipped artifact on 100 rows neither the mask nor the report saw
    assert cli.main(["run", str(tmp_path / "default"), "--input", str(d / "test.npz"),
                     "--output", str(tmp_path / "y.npz")]) == 0
    y = np.load(tmp_path / "y.npz")
    top1 = y[y.files[0]].argmax(-1)
    assert (top1 == test_labels).mean() >= 0.95, (top1 == test_labels).mean()
