"""``--target cam``: PQ layers offloaded to the CAM simulator give the x86 path's outputs bit for bit,
with per-layer searches/reads/cycles/energy whose counts match what the simulator did."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import tvm_lut
from relay_passes import LUTify
from tvm_lut.app import cli, pipeline
from tvm_lut.errors import OptionError
from tvm_lut.runtime.build import BatchRunner, compile_with_params
from tvm_lut.targets import cam_simulator as cam


def _run(lut_mod, target, x, batch):
    ex, params = compile_with_params(lut_mod, target)
    runner = BatchRunner(ex, [v for _, v in params], [("x", (batch,) + x.shape[1:], "float32")])
    return runner.run({"x": x})[0]


@pytest.mark.parametrize("distance", ["l1", "l2"])
def test_cam_gives_the_x86_outputs_bit_for_bit(small_cnn, small_inputs, distance):
    mod = tvm_lut.from_torch(small_cnn, torch.from_numpy(small_inputs[:8]))
    on_x86 = LUTify(calibration=small_inputs, distance=distance, all_layers=True, progress=False)
    on_cam = LUTify(calibration=small_inputs, distance=distance, all_layers=True, target="cam", progress=False)
    res = on_cam.run(mod)
    x86_mod, cam_mod = on_x86(mod), res.module
    pq_layers = [r for r in res.layers if r["method"] == "pq"]
    assert len(pq_layers) >= 4 and all(r["kernel"] == "cam" for r in pq_layers)
    cam.reset_counters()
    got = _run(cam_mod, "cam", small_inputs, 8)
    np.testing.assert_array_equal(got, _run(x86_mod, "x86", small_inputs, 8))
    # the simulator did exactly what the cost model counts (8 batches of 8)
    report = cam.model_report(res.layers, cam.CAMParams())
    for layer in report["layers"]:
        done = cam.COUNTERS[layer["layer"]]
        assert done == {k: 8 * layer[k] for k in ("searches", "reads", "adds")}, layer["layer"]
        assert (layer["cam_mul"] == 0) == (distance == "l1")
    assert report["total"]["cam_mul"] == 0 if distance == "l1" else report["total"]["cam_mul"] > 0


def test_layer_cost_by_hand():
    p = cam.CAMParams(arrays=4, array_words=64, read_bytes_per_cycle=32, clock_ghz=2.0, e_search_bit_fj=2.0,
                      e_read_byte_pj=1.0, e_add_pj=0.5)
    c = cam.layer_cost(rows=10, c=6, k=16, v=4, m=40, distance="l1", params=p)
    assert (c["searches"], c["reads"], c["adds"], c["cam_mul"], c["host_mul"]) == (60, 60, 2400, 0, 400)
    assert c["search_cycles"] == 10 * 2 and c["read_cycles"] == 60 * 2 and c["cycles"] == 140
    assert c["time_us"] == pytest.approx(140 / 2000)
    # search 60*16*4*8 bits * 2 fJ; read 60*40 B * 1 pJ; add 2400 * 0.5 pJ
    assert c["energy_nj"] == pytest.approx((60 * 16 * 4 * 8 * 2e-15 + 2400e-12 + 1200e-12) * 1e9)
    assert c["arrays_used"] == 2 and c["resident"]
    l2 = cam.layer_cost(10, 6, 16, 4, 40, "l2", p)
    assert l2["cam_mul"] == 60 * 16 * 4
    assert l2["energy_nj"] - c["energy_nj"] == pytest.approx(60 * 16 * 4 * p.e_cell_mul_pj * 1e-3)
    assert set(cam.SOURCES) >= {"e_search_bit_fj", "e_read_byte_pj", "e_add_pj", "cycles_per_search"}


def test_params_overrides_and_bad_values(tmp_path, monkeypatch):
    p = cam.CAMParams().with_overrides(cam.CAMParams.parse_cli(["arrays=32", "clock_ghz=0.5"]))
    assert p.arrays == 32 and p.clock_ghz == 0.5
    with pytest.raises(OptionError, match="unknown CAM parameter"):
        cam.CAMParams().with_overrides({"bogus": 1})
    with pytest.raises(OptionError, match="must be > 0"):
        cam.CAMParams(arrays=0)
    with pytest.raises(OptionError, match="expected a number"):
        cam.CAMParams().with_overrides({"arrays": "many"})
    with pytest.raises(OptionError, match="NAME=VALUE"):
        cam.CAMParams.parse_cli(["arrays"])
    f = tmp_path / "cam.json"
    f.write_text(json.dumps({"e_read_byte_pj": 2.5}))
    monkeypatch.setenv("TVM_LUT_CAM_PARAMS", str(f))
    assert cam.CAMParams.from_env().e_read_byte_pj == 2.5
    f.write_text("[1, 2]")
    with pytest.raises(OptionError, match="JSON object"):
        cam.CAMParams.from_env()
    with pytest.raises(OptionError, match="K=128"):
        cam.layer_cost(1, 1, 128, 1, 1, "l1", cam.CAMParams())


def test_cam_artifact_runs_in_a_fresh_process_and_reports(tmp_path, small_cnn, small_inputs, capsys):
    mod = tvm_lut.from_torch(small_cnn, torch.from_numpy(small_inputs[:1]))
    labels = np.arange(len(small_inputs)) % 10
    out = str(tmp_path / "cam_art")
    manifest = pipeline.compile_to_dir(out, mod, {"x": small_inputs, "labels": labels}, target="cam", distance="l1",
                                       all_layers=True, progress=False, cam_params={"arrays": 8})
    rep = manifest["report"]
    assert manifest["target_name"] == "cam" and rep["latency"] is None and "simulator" in rep["latency_note"]
    assert rep["cam"]["params"]["arrays"] == 8 and rep["cam"]["total"]["cam_mul"] == 0
    assert {l["layer"] for l in rep["cam"]["layers"]} == {r["name"] for r in rep["layers"] if r["method"] == "pq"}
    np.save(tmp_path / "x.npy", small_inputs[:5])
    code = ("import numpy as np, sys; from tvm_lut.runtime.artifact import Model; "
            f"y = Model({out!r}).run({{'x': np.load({str(tmp_path / 'x.npy')!r})}})['output']; "
            f"np.save({str(tmp_path / 'y.npy')!r}, y)")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    from tvm_lut.runtime.artifact import Model

    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), Model(out).run({"x": small_inputs[:5]})["output"])
    assert cli.main(["report", out]) == 0
    text = capsys.readouterr().out
    assert "CAM simulator" in text and "searches" in text and "energy nJ" in text


def test_cam_param_needs_the_cam_target(tmp_path, capsys):
    np.savez(tmp_path / "c.npz", x=np.zeros((2, 3), np.float32))
    assert cli.main(["compile", os.devnull, "--calib", str(tmp_path / "c.npz"), "-o", str(tmp_path / "o"),
                     "--cam-param", "arrays=2"]) == 2
    assert "--target cam only" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
