"""The speed benchmark's report arithmetic (``benchmarks/speed.py``): ratios, lookup ceiling fraction and the
arithmetic bound of an exact-argmin PQ layer, on a synthetic run (no builds)."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
speed = pytest.importorskip("speed")

PEAK = {"clock_ghz": 2.0, "vpshufb_per_cycle": 2.0, "vpermb_vpdpbusd_per_cycle": 1.0, "fma_per_cycle": 2.0}


def _run(tvm_tuned_ms: float, d: int = 256, m: int = 128, chain_ms: float | None = None) -> tuple[dict, dict]:
    n, k, v = 1024, 16, 4
    plan = {"kernel": [{"N": n, "D": d, "M": m, "V": v, "kernels": {"encode": {"hand_us": 50.0},
                                                              "shuffle_lookup": {"hand_us": 40.0, "tuned_us": 30.0}}}],
            "e2e": []}
    run = {"threads": 1, "e2e": [], "kernel": [{"N": n, "D": d, "M": m, "V": v, "C": d // v, "K": k,
                                                 "lut_kernel": "shuffle-avx512vbmi", "lut_layer_ms": 0.1,
                                                 "tvm_untuned_ms": 5.0, "tvm_tuned_ms": tvm_tuned_ms,
                                                 "torch_ms": 0.5, "chain_ms": chain_ms}]}
    result, md = speed.summarize(plan, [run], PEAK)
    return result["runs"][0]["kernel"][0], md


def test_kernel_row_ratios_ceiling_and_bound():
    r, md = _run(0.4)
    assert r["vs_tvm_tuned"] == pytest.approx(4.0) and r["vs_torch"] == pytest.approx(5.0)
    assert r["tuning_improves"] and r["kernels_ms"] == pytest.approx(0.080)
    cycles_per_ms = 2.0e6
    lookups = 1024 * 64 * 128
    assert r["lookups_per_cycle"] == pytest.approx(lookups / (30e-3 * cycles_per_ms))
    assert r["ceiling_frac"] == pytest.approx(r["lookups_per_cycle"] / 64)
    # floor: N*D*K multiply-adds at 32 per cycle + N*C*M lookups at 64 per cycle
    floor_ms = (1024 * 256 * 16 / 32 + lookups / 64) / cycles_per_ms
    assert r["vs_tvm_tuned_bound"] == pytest.approx(0.4 / floor_ms)
    assert r["tvm_tuned_fma_frac"] == pytest.approx(1024 * 256 * 128 / 32 / cycles_per_ms / 0.4)
    assert "× TVM tuned, bound" in md


def test_bound_scales_with_the_exact_time_and_is_absent_without_a_tuned_build():
    assert _run(0.8)[0]["vs_tvm_tuned_bound"] == pytest.approx(2 * _run(0.4)[0]["vs_tvm_tuned_bound"])
    r, _ = _run(None)
    assert r["vs_tvm_tuned"] is None and "vs_tvm_tuned_bound" not in r


def test_kernel_shapes_take_a_subvector_length_and_bad_ones_are_refused():
    assert speed.parse_shapes("1024:576:128,1024:576:128:9") == [(1024, 576, 128, 4), (1024, 576, 128, 9)]
    for bad in ("1024:576", "1024:576:128:9:1", "1024:x:128", "1024:576:0"):
        with pytest.raises(SystemExit, match="is not N:D:M or N:D:M:V"):
            speed.parse_shapes(bad)
    # the default list: the shapes at V=4, MADDNESS's, and the 3x3-conv widths at LUT-NN's V=9
    assert {(d, v) for _, d, _, v in speed.KERNEL_SHAPES} == {(256, 4), (576, 4), (1152, 4), (128, 4), (576, 9),
                                                              (1152, 9)}


def test_maddness_shape_row_is_compared_with_maddness():
    r, md = _run(0.4, d=128, m=256, chain_ms=0.114 * 1.1)
    assert r["vs_maddness"]["chain_ms"] == pytest.approx(1.1)
    assert r["vs_maddness"]["lut_layer_ms"] == pytest.approx(0.1 / 0.114)
    assert r["vs_maddness"]["kernels_ms"] == pytest.approx(0.080 / 0.114)
    assert "kernels back to back 125 µs = 1.10×" in md
    other, md = _run(0.4)  # any other shape: no MADDNESS comparison
    assert "vs_maddness" not in other and "MADDNESS's shape" not in md


def test_kernel_chain_reproduces_the_deployed_layer_and_rejects_a_wrong_one(tmp_path):
    """The back-to-back timing calls the deployed layer's own kernels outside the VM; it must check that
    they compute what the VM computes (here a tampered table must be caught)."""
    torch = pytest.importorskip("torch")
    import tvm_lut
    from tvm_lut.runtime.build import compile_with_params

    x = np.random.default_rng(0).standard_normal((40, 32)).astype(np.float32)
    mod = tvm_lut.from_torch(torch.nn.Linear(32, 24).eval(), torch.from_numpy(x))
    lut = tvm_lut.LUTify(calibration=x, all_layers=True, v=4, progress=False)(mod)
    ex, params = compile_with_params(lut, "x86")
    art = speed.export_build(ex, params, [x], str(tmp_path / "layer"))
    art["chain"] = speed._kernel_chain(lut, str(tmp_path / "chain"))
    assert [c["name"] for c in art["chain"]["calls"]] == ["lut_encode_weight", "lut_lookup_weight"]
    assert art["chain"]["calls"][1]["args"][0] == ["call", 0] and art["chain"]["calls"][0]["args"][0] == ["input", 0]
    assert speed._chain_ms(art) > 0
    consts = dict(np.load(art["chain"]["npz"]))
    key = art["chain"]["calls"][1]["args"][1][1]  # the lookup's tables
    consts[key] = consts[key] + np.ones_like(consts[key])
    np.savez(art["chain"]["npz"], **consts)
    with pytest.raises(RuntimeError, match="do not reproduce"):
        speed._chain_ms(art)


def test_lookup_peak_measures_fma_with_and_without_a_broadcast_per_multiply_add():
    """``benchmarks/lookup_peak.py`` on this core (x86 with a C compiler): every ceiling present and positive, and
    a broadcast per multiply-add (the row-lane encoders' inner step) no faster than multiply-adds alone (with
    room for this machine's run-to-run noise between the two loops)."""
    import platform
    import shutil

    if platform.machine() not in ("x86_64", "AMD64") or not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("lookup_peak measures x86 cores with a C compiler")
    try:
        with open("/proc/cpuinfo") as f:
            avx2 = " avx2" in f.read()
    except OSError:
        pytest.skip("no /proc/cpuinfo to say whether this core has AVX2")
    if not avx2:
        pytest.skip("lookup_peak measures AVX2 or AVX-512 cores; this one has neither")
    lookup_peak = pytest.importorskip("lookup_peak")
    peak = lookup_peak.measure()
    assert peak is not None, "an AVX2 core, but lookup_peak's timing loops did not build or run"
    for key in ("clock_ghz", "vpshufb_per_cycle", "fma_per_cycle", "fma_broadcast_per_cycle"):
        assert peak[key] > 0, (key, peak)
    assert peak["vector_bits"] in (256, 512)
    assert peak["fma_broadcast_per_cycle"] <= 1.5 * peak["fma_per_cycle"], peak


def test_measure_only_without_a_build_names_the_missing_plan_and_creates_nothing(tmp_path):
    import subprocess

    name = f"no_such_run_{os.getpid()}"
    script = os.path.join(os.path.dirname(speed.__file__), "speed.py")
    proc = subprocess.run([sys.executable, script, "--measure-only", "--out", str(tmp_path / name)],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert f"no build for --out {tmp_path / name}" in proc.stderr and "plan.json is missing" in proc.stderr
    assert not os.path.exists(os.path.join(speed.CACHE, name))


def test_layer_costs_table_reports_the_v3_price_and_fp32_fallbacks():
    """``benchmarks/layer_costs.py``'s table: V=3 over V=9 (int8 encoders) and against ONNX Runtime int8; a
    configuration that asked for int8 but got the fp32 encoder is named, not passed off as int8."""
    layer_costs = pytest.importorskip("layer_costs")

    def row(side, v3_encoder="int8"):
        return {"shape": {"cin": 64, "cout": 64, "side": side, "stride": 1, "out_side": side},
                "ORT fp32": {"ms": 0.7}, "ORT int8": {"ms": 0.3},
                "V=9 int8": {"ms": 0.1, "encoder": "int8"}, "V=9 fp32": {"ms": 0.3, "encoder": "fp32"},
                "V=3 int8": {"ms": 0.25, "encoder": v3_encoder}, "V=3 fp32": {"ms": 0.5, "encoder": "fp32"}}

    md = layer_costs.summarize([row(32), row(4, "fp32")])
    assert "| 64 -> 64, 32x32, 1 | 0.700 | 0.300 | 0.100 | 0.300 | 0.250 | 0.500 | 2.50 | 1.20 |" in md
    assert "Kept the fp32 encoder" in md and "64->64@4: V=3 int8" in md and "64->64@32" not in md.split("Kept")[1]


def test_bert_time_breakdown_groups_calls_and_reports_ratios():
    """``benchmarks/bert.py``: VM calls grouped by what they compute (a matmul with a weight operand is a dense
    layer, one of two activations is attention), and the table's ratios against ONNX Runtime fp32."""
    bert = pytest.importorskip("bert")
    assert bert.group_of("lut_encode_0_q", False) == "lookup"
    assert bert.group_of("lut_accumulate_0_ff1", False) == "lookup"
    assert bert.group_of("fused_matmul_add", True) == "dense matmul"
    assert bert.group_of("matmul3", False) == "attention matmul"
    assert bert.group_of("fused_softmax_broadcast_to", False) == "softmax"
    assert bert.group_of("layer_norm1", False) == "layer norm"
    assert bert.group_of("vm.builtin.alloc_tensor", False) == "VM builtins"
    assert bert.group_of("fused_reshape4_divide", False) == "elementwise/layout"
    split = dict.fromkeys(bert.GROUPS, 0.0) | {"lookup": 2.0, "attention matmul": 1.0}
    rows = [{"build": "LUT V=8", "ms": 4.0, "breakdown": split, "rel_err": 0.2, "build_s": 30.0},
            {"build": "ONNX Runtime fp32", "ms": 8.0, "rel_err": 0.0}]
    md = bert.summarize(rows, {"layers": 4, "d": 512, "heads": 8, "ffn": 2048, "tokens": 128})
    assert "| LUT V=8 | 4.00 | 2.00 | 0.200 | 30 |" in md and "| ONNX Runtime fp32 | 8.00 | 1.00 |" in md
    assert "| LUT V=8 | 2.00 | 0.00 | 1.00 |" in md
