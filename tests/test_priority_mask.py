"""PriorityMask: budgets parsed and enforced, measured on held-out data, obeyed by LUTify, in the CLI."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import tvm_lut
from relay_passes import Budget, LUTify, PriorityMask
from relay_passes.priority_mask import drop_margin
from tvm_lut.app import pipeline
from tvm_lut.errors import CalibrationError, OptionError
from tvm_lut.train import models


@pytest.fixture(scope="module")
def lenet():
    d = models.load_mnist_subset()
    model = models.train_classifier(models.LeNet5(), d["train_images"][:6000], d["train_labels"][:6000], epochs=1,
                                    progress=False)
    mod = tvm_lut.from_torch(model, torch.from_numpy(d["test_images"][:16]))
    calib = {"x": d["train_images"][6000:7200], "labels": d["train_labels"][6000:7200]}
    return mod, calib, d


def test_budget_parsing():
    assert Budget.parse("max-drop=2.0") == Budget("max-drop", 2.0)
    assert str(Budget.parse(" min-removed = 0.6 ")) == "min-removed=0.6"
    for bad in ["max-drop", "drop=1", "min-removed=1.5", "min-removed=0", "max-drop=-1", "max-drop=abc"]:
        with pytest.raises(OptionError, match="budget"):
            Budget.parse(bad)


def test_max_drop_needs_labels(lenet):
    mod, calib, _ = lenet
    with pytest.raises(CalibrationError, match="needs labels"):
        PriorityMask({"x": calib["x"]}, "max-drop=1.0", progress=False)(mod)


def _alone_needs(sc: dict, val_n: int) -> float:
    """The budget the layer with priority scores ``sc`` needs to be converted on its own."""
    return sc["drop_alone"] + drop_margin(sc["flips_alone"], val_n)


def test_max_drop_is_met_on_unseen_data(lenet):
    mod, calib, d = lenet
    budget = 1.5
    ex_, _, manifest = pipeline.compile_and_measure(
        mod, calib, distance="l1", budget=f"max-drop={budget}", measure_latency=False, progress=False,
        evaluation=({"x": d["test_images"]}, d["test_labels"]))
    report = manifest["report"]
    pm = report["priority_mask"]
    assert pm["val_drop"] + pm["val_drop_margin"] <= budget
    assert report["accuracy"]["drop"] <= budget, report["accuracy"]  # 2,000 test images never seen by the mask
    methods = {r["name"]: r["method"] for r in report["layers"]}
    assert {n for n, m in methods.items() if m == "pq"} == set(pm["converted"])
    for r in report["layers"]:
        assert "similarity" in r["priority"] and "drop_alone" in r["priority"]
    first = pm["candidates"][0]
    # the search never stops short of the best-ranked layer when it fits alone; the converse need not hold:
    # a longer prefix can fit where its first layer alone does not (errors partly cancel), and what is
    # converted was measured to fit (above)
    first_sc = next(r["priority"] for r in report["layers"] if r["name"] == first)
    if _alone_needs(first_sc, pm["validation_samples"]) <= budget:
        assert pm["converted"][:1] == [first]


@pytest.mark.slow  # about 55 s (three sweeps); test_max_drop_is_met_on_unseen_data checks the budget by default
def test_max_drop_converts_what_fits(lenet):
    """A budget just above the best-ranked layer's own validation drop (+ margin) converts at least it;
    just below, whatever is converted still meets the budget (usually nothing; a longer prefix of the
    ranking can fit where its first layer alone does not, when the layers' errors partly cancel: that
    depends on the LeNet this machine trained)."""
    mod, calib, _ = lenet
    probe = PriorityMask(calib, "max-drop=100", distance="l1", progress=False)
    (everything,), _ = probe.sweep(mod, ["max-drop=100"])
    assert everything["converted"] == everything["candidates"]
    first = everything["candidates"][0]
    need = _alone_needs(everything["scores"][first], everything["validation_samples"])
    (above, below), _ = probe.sweep(mod, [f"max-drop={need + 0.01:.4f}", f"max-drop={max(need - 0.01, 0.0):.4f}"])
    assert above["converted"][:1] == [first]
    assert above["val_drop"] + above["val_drop_margin"] <= need + 0.01
    if need >= 0.01:
        assert below["converted"] == [] or below["val_drop"] + below["val_drop_margin"] <= need - 0.01, below


def test_min_removed_and_separate_pass(lenet):
    mod, calib, _ = lenet
    pm = PriorityMask({"x": calib["x"]}, "min-removed=0.5", distance="l1", progress=False)
    run = pm.run(mod)
    masked = run.module
    assert run.result["mul_removed_frac"] >= 0.5
    assert "drop_alone" not in next(iter(run.result["scores"].values()))  # no labels: similarity only
    lut = LUTify({"x": calib["x"]}, distance="l1", progress=False)
    lut_res = lut.run(masked)  # a later LUTify obeys the mask left on the module
    assert {r["name"] for r in lut_res.layers if r["method"] == "pq"} == set(run.result["converted"])
    removed = 1 - sum(r["lut_ops"]["mul"] if r["method"] == "pq" else r["exact_ops"]["mul"] for r in lut_res.layers) \
        / sum(r["exact_ops"]["mul"] for r in lut_res.layers)
    assert removed >= 0.5
    with pytest.raises(OptionError, match=r"cannot be met: converting every candidate layer removes \d+\.\d%"):
        PriorityMask({"x": calib["x"]}, "min-removed=0.5", distance="l2", progress=False)(mod)


def test_cli_budget(lenet, tmp_path):
    mod, calib, _ = lenet
    model = models.LeNet5().eval()
    path = str(tmp_path / "m.pt2")
    torch.export.save(torch.export.export(model, (torch.from_numpy(calib["x"][:1]),)), path)
    np.savez(tmp_path / "cal.npz", x=calib["x"][:400], labels=calib["labels"][:400])
    np.savez(tmp_path / "nolab.npz", x=calib["x"][:400])
    cmd = [sys.executable, "-m", "tvm_lut.app.cli", "compile", path, "-q", "--no-latency", "--distance", "l1"]
    res = subprocess.run(cmd + ["--calib", str(tmp_path / "cal.npz"), "-o", str(tmp_path / "out"),
                                "--budget", "max-drop=100"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "priority mask, budget max-drop=100" in res.stdout and "drop alone" in res.stdout
    res = subprocess.run(cmd + ["--calib", str(tmp_path / "nolab.npz"), "-o", str(tmp_path / "o2"),
                                "--budget", "max-drop=1"], capture_output=True, text=True)
    assert res.returncode == 2 and "needs a 'labels' array" in res.stderr
    res = subprocess.run(cmd + ["--calib", str(tmp_path / "cal.npz"), "-o", str(tmp_path / "o3"),
                                "--budget", "fewer-ops"], capture_output=True, text=True)
    assert res.returncode == 2 and "expected max-drop=POINTS" in res.stderr
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


def test_switchable_build_is_the_rewritten_model_bit_for_bit(lenet):
    """The mask evaluates every subset of converted layers on one switchable build; each subset's output
    must be the separately rewritten model's, bit for bit (``where`` selects, it does not blend)."""
    import tvm

    from relay_passes.rewrite import rewrite, switchable
    from tvm_lut.frontend.graph import input_signature
    from tvm_lut.runtime.build import BatchRunner, compile_with_params

    mod, calib, d = lenet
    fitter = LUTify(calibration={"x": calib["x"][:300]}, all_layers=True, progress=False)
    fitter_res = fitter.run(mod)
    plans = [p for p in fitter_res.plans if p.record["method"] == "pq"]
    assert len(plans) >= 3
    sig = input_signature(mod["main"])
    x = {"x": d["test_images"][:64]}
    ex, params = compile_with_params(switchable(mod, plans), "x86")
    runner = BatchRunner(ex, [v for _, v in params], sig)
    for chosen in [(1, 2), tuple(range(len(plans)))]:  # all False is the exact model: the mask's own baseline
        on = np.zeros(len(plans), bool)
        on[list(chosen)] = True
        runner.params[-1] = tvm.runtime.tensor(on)
        got = runner.run(x)[0]
        ex_r, params_r = compile_with_params(rewrite(mod, [plans[i] for i in chosen], True), "x86")
        want = BatchRunner(ex_r, [v for _, v in params_r], sig).run(x)[0]
        np.testing.assert_array_equal(got, want, err_msg=str(chosen))


def test_latency_rank_follows_milliseconds_saved_and_drops_layers_no_faster(lenet, monkeypatch):
    """``rank="latency"``: the gain is each layer's measured exact time minus its lookup's (here set by
    hand, so the ranking is known): a layer whose lookup is no faster is never a candidate however many
    multiplies it removes (features.3 removes the most), the others are ranked by accuracy lost per
    millisecond saved, and the decision reports the milliseconds its conversions save."""
    from relay_passes import latency

    mod, calib, _ = lenet
    exact = {"features.0": 1.0, "features.3": 0.5, "classifier.0": 0.4, "classifier.2": 0.2, "classifier.4": 0.05}
    lookup = {"features.0": 0.1, "features.3": 0.9, "classifier.0": 0.1, "classifier.2": 0.1, "classifier.4": 0.04}
    monkeypatch.setattr(latency, "exact_latency_ms", lambda layer, *a, **k: exact[layer.name])
    monkeypatch.setattr(latency, "rewrite_latency_ms", lambda plan, *a, **k: (lookup[plan.layer.name], "model"))
    res = PriorityMask(calib, "max-drop=100", distance="l1", progress=False, rank="latency").run(mod).result
    sc = res["scores"]
    assert res["rank"] == "latency" and "features.3" not in res["candidates"]
    assert "no faster than the exact layer (0.900 vs 0.500 ms)" in sc["features.3"]["why"]
    assert set(res["candidates"]) == set(exact) - {"features.3"} == set(res["converted"])
    total = sum(exact.values())

    def per_ms(nm):
        return (1 - sc[nm]["similarity"] + max(sc[nm]["drop_alone"], 0.0)) / ((exact[nm] - lookup[nm]) / total)

    assert res["candidates"] == sorted(res["candidates"], key=per_ms)
    assert res["ms_saved"] == pytest.approx(sum(exact[nm] - lookup[nm] for nm in res["converted"]))
    assert sc["features.0"]["ms_saved"] == pytest.approx(0.9)
    with pytest.raises(OptionError, match="rank 'speed'"):
        PriorityMask(calib, "max-drop=1", rank="speed")
    with pytest.raises(OptionError, match="mask_rank='speed'"):
        LUTify(calib, budget="max-drop=1", mask_rank="speed")
