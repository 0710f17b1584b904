"""The Pareto benchmark's verdict (``benchmarks/pareto.py``): ratios against ONNX Runtime and the best LUT build
within one point of the exact top-1, on a synthetic run (no builds)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
pareto = pytest.importorskip("pareto")


def _plan_and_runs(fast_ms: float):
    plan = {"model": "resnet18", "weights": "w.pt", "test_images": 10000, "calibration_rows": 1024,
            "cpu": {"model": "test CPU", "cpu_flags": ["avx2"], "instruction_sets": ["avx2"]},
            "configs": [{"config": "V=2", "top1": 92.6, "build_s": 50.0, "lut_layers": 19, "layers": 21,
                         "kernels": ["shuffle-avx2"]},
                        {"config": "V=9/4 (LUT-NN)", "top1": 85.0, "build_s": 40.0, "lut_layers": 19, "layers": 21,
                         "kernels": ["shuffle-avx2"]}],
            "baselines": {"tvm_exact": {"top1": 93.0}, "ort_fp32": {"top1": 93.0}, "ort_int8": {"top1": 92.9},
                          "pytorch": {"top1": 93.0}}}
    base = {"tvm_exact": {"b1_ms": 40.0, "b32_ms": 900.0}, "ort_fp32": {"b1_ms": 7.5, "b32_ms": 150.0},
            "ort_int8": {"b1_ms": 2.5, "b32_ms": 60.0}, "pytorch": {"b1_ms": 9.0, "b32_ms": 200.0}}
    runs = [{"threads": 1, "configs": [{"b1_ms": fast_ms, "b32_ms": 50.0}, {"b1_ms": 1.0, "b32_ms": 30.0}],
             "baselines": base}]
    return plan, runs


def test_the_verdict_takes_the_fastest_build_within_one_point():
    plan, runs = _plan_and_runs(2.0)
    plan["configs"][0].update(table_mb=24.5, int8_weight_mb=10.7)
    summary, md = pareto.summarize(plan, runs)
    assert "| 24.50 |" in md and "weights are 10.7 MB as int8" in md
    v = summary["verdict"]
    assert v["best_within_1pt"]["build"] == "LUT V=2"  # V=9/4 is faster but 8 points down
    assert v["best_within_1pt"]["x_ort_int8"] == pytest.approx(1.25) and v["beats_ort_int8"]
    assert v["best_within_1pt"]["x_ort_fp32"] == pytest.approx(3.75) and v["beats_3x_ort_fp32"]
    assert "| LUT V=2 | 92.60 | 0.40 |" in md and "ONNX Runtime int8" in md


def test_a_learned_configuration_says_how_its_centroids_were_learned():
    plan, runs = _plan_and_runs(2.0)
    plan["configs"][1]["learned"] = {"steps": 300, "batch": 64, "epochs": 0.4, "distill": 0.5, "eval_images": 2000,
                                     "torch_lut_top1": 84.25, "dir": "/cache/resnet18-lut"}
    _, md = pareto.summarize(plan, runs)
    assert "LUT V=9/4 (LUT-NN): centroids and weights learned by `benchmarks/learn_centroids.py` (300 steps of 64 " \
           "images, 0.4 of a pass" in md and "84.25%" in md
    plan["configs"][1]["learned"]["layer_v"] = {"b.conv2": 3, "b.conv1": 3}
    _, md = pareto.summarize(plan, runs)
    assert "84.25%); V=3 in b.conv1, b.conv2, from /cache/resnet18-lut" in md


def test_a_build_without_lookups_is_a_reference_not_the_verdict():
    """Our int8 convs alone (``exact=int8``, every layer kept exact): shown as ours, never the best LUT build."""
    plan, runs = _plan_and_runs(2.0)
    plan["configs"][1].update(config="int8 exact (no lookups)", top1=92.9, lut_layers=0)
    summary, md = pareto.summarize(plan, runs)
    assert summary["verdict"]["best_within_1pt"]["build"] == "LUT V=2"  # the int8 build is faster and closer
    assert "| ours, int8 exact (no lookups) | 92.90 |" in md


def test_a_slower_build_does_not_pass_for_a_win():
    summary, _ = pareto.summarize(*_plan_and_runs(5.0))
    assert not summary["verdict"]["beats_ort_int8"] and not summary["verdict"]["beats_3x_ort_fp32"]


@pytest.mark.parametrize("m,v,k", [(64, 9, 16), (512, 4, 16), (128, 2, 16)])
def test_instruction_bound_is_the_documented_ratio(m, v, k):
    """The counted bound's closed form per output: 3/V + 4K/M + 4K/(VM) (fp32 encoder), 3/V + K/M + 4K/(VM) (int8)."""
    from tvm_lut.math import cost

    d = 9 * m
    f = cost.instruction_bound(1024, d, m, v, k, "fp32")
    q = cost.instruction_bound(1024, d, m, v, k, "int8")
    assert f["ratio"] == pytest.approx(3 / v + 4 * k / m + 4 * k / (v * m))
    assert q["ratio"] == pytest.approx(3 / v + k / m + 4 * k / (v * m))
    assert f["int8_gemm"] == 1024 * d * m / 64


def test_model_bound_counts_exact_layers_as_fp32():
    layers = [{"name": "a", "method": "pq", "rows_per_sample": 256, "d": 576, "m": 64, "v": 9, "k": 16},
              {"name": "b", "method": "exact", "rows_per_sample": 1024, "d": 27, "m": 64}]
    b = pareto.instruction_bound(layers)
    assert b["exact_fp32"] == 4 * 1024 * 27 * 64 / 64
    assert b["int8_gemm"] == (256 * 576 * 64 + 1024 * 27 * 64) / 64
    assert [x["name"] for x in b["layers"]] == ["a"]


def test_per_layer_v_configurations_select_layers_by_name_prefix_or_pattern():
    """``v@layers.0=3`` / ``v@layers.*.conv?=3`` (pareto) and ``--layer-v`` (learn_centroids) pick the same
    layers; a pattern that selects nothing is refused with the layer names."""
    import learn_centroids
    import torch

    import tvm_lut

    assert pareto._parse_config("v@layers.0=3;k=16") == {"layer_v": {"layers.0": 3}, "k": 16}
    assert pareto._parse_config("budget=max-drop=1.0;v=4") == {"budget": "max-drop=1.0", "v": 4}
    assert pareto._parse_config("learned@/runs/a=b;encoder=fp32") == {"learned": "/runs/a=b", "encoder": "fp32"}
    with pytest.raises(SystemExit, match="integer"):
        pareto._parse_config("v@layers.0=x")
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 1))).eval()
    mod = tvm_lut.from_torch(net, torch.zeros(1, 3, 8, 8))
    assert learn_centroids.layers_matching(["2.0", "2.1", "20.0"], "2") == ["2.0", "2.1"]
    opts = pareto.layer_options(mod, {"2": 4, "2.0": 3})  # the longer prefix wins
    assert opts["2.0"] == {"v": 3} and opts["2.1"] == {"v": 4}
    with pytest.raises(SystemExit, match="names no layer"):
        pareto.layer_options(mod, {"nope": 3})
    assert learn_centroids.resolve_layer_v(net, learn_centroids.parse_layer_v("2.*=3"), ["0"]) == {"2.0": 3, "2.1": 3}
    with pytest.raises(SystemExit, match="PATTERN=V"):
        learn_centroids.parse_layer_v("2.0")
    args = learn_centroids.build_parser().parse_args(["--layer-v", "2.*=3"])
    assert learn_centroids.tag_of(args).startswith(learn_centroids.default_tag() + "-lv")
    # --exact: more layers trained (and compiled) exact, by the same patterns; the tag says so
    wide = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3), torch.nn.ReLU(),
                               torch.nn.Sequential(torch.nn.Conv2d(32, 32, 3), torch.nn.Conv2d(32, 8, 1)))
    # conv1 (EXCLUDE) and the narrow 2.1 (M=8 <= K) are exact anyway; 2.0 because --exact names it
    assert learn_centroids.exact_layers(wide, "2.0, 2.0") == ["2.0", "2.1", "conv1"]
    assert learn_centroids.exact_layers(wide, "") == ["2.1", "conv1"]
    with pytest.raises(SystemExit, match="--exact: 'nope' names no layer"):
        learn_centroids.exact_layers(wide, "nope")
    args = learn_centroids.build_parser().parse_args(["--exact", "2.1,2.0"])
    assert learn_centroids.tag_of(args) == learn_centroids.tag_of(
        learn_centroids.build_parser().parse_args(["--exact", "2.0,2.1"])) != learn_centroids.default_tag()


def test_init_from_names_its_own_run_and_refuses_an_unfinished_directory(tmp_path):
    """``learn_centroids --init-from DIR`` continues another run: its tag carries a digest of that run (so
    its checkpoints never mix with a fresh run's), and a directory without the run's files is refused,
    naming what is missing, before any training."""
    import learn_centroids

    run = tmp_path / "resnet18-lut-vdefault-e0.7"
    run.mkdir()
    (run / "codebooks.npz").write_bytes(b"")
    args = learn_centroids.build_parser().parse_args(["--init-from", str(run)])
    tag = learn_centroids.tag_of(args)
    assert tag.startswith(learn_centroids.default_tag() + "-from") and tag != learn_centroids.default_tag()
    with pytest.raises(SystemExit, match=r"missing learned\.pt, learned\.json"):
        learn_centroids.load_start("resnet18", str(run))
