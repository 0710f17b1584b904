"""The speed benchmark's report arithmetic (``benchmarks/speed.py``): ratios, lookup ceiling fraction and the
arithmetic bound of an exact-argmin PQ layer, on a synthetic run (no builds)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
speed = pytest.importorskip("speed")

PEAK = {"clock_ghz": 2.0, "vpshufb_per_cycle": 2.0, "vpermb_vpdpbusd_per_cycle": 1.0, "fma_per_cycle": 2.0}


def _run(tvm_tuned_ms: float) -> tuple[dict, dict]:
    n, d, m, k, v = 1024, 256, 128, 16, 4
    plan = {"kernel": [{"N": n, "D": d, "M": m, "kernels": {"encode": {"hand_us": 50.0},
                                                              "shuffle_lookup": {"hand_us": 40.0, "tuned_us": 30.0}}}],
            "e2e": []}
    run = {"threads": 1, "e2e": [], "kernel": [{"N": n, "D": d, "M": m, "V": v, "C": d // v, "K": k,
                                                 "lut_kernel": "shuffle-avx512vbmi", "lut_layer_ms": 0.1,
                                                 "tvm_untuned_ms": 5.0, "tvm_tuned_ms": tvm_tuned_ms,
                                                 "torch_ms": 0.5}]}
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
