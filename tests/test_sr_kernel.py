"""The HKLUT stage kernel is bit-exact against the numpy table reference (odd sizes, x2 and x4, scheduled)."""

import numpy as np
import pytest
import torch
import tvm

from tir_schedules import sr_lookup
from tvm_lut.math import sr_lut
from tvm_lut.targets import host_target
from tvm_lut.train import hklut


def _run(func, x: np.ndarray, st: sr_lut.StageTables, words: bool = False) -> np.ndarray:
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), host_target())
    out = tvm.runtime.tensor(np.zeros((x.shape[0] * st.scale, x.shape[1] * st.scale), np.uint8))
    flat = sr_lookup.words_of if words else (lambda t: np.ascontiguousarray(t.reshape(-1)))
    tables = [tvm.runtime.tensor(flat(t)) for t in (*st.msb.values(), *st.lsb.values())]
    lib["main"](tvm.runtime.tensor(x), *tables, out)
    return out.numpy()


@pytest.mark.parametrize("scale,shape", [(4, (7, 9)), (4, (3, 5)), (2, (17, 33))])
def test_stage_kernels_match_the_table_reference(scale, shape):
    torch.manual_seed(scale)
    stages = hklut.tabulate(hklut.HKNet(scale=scale, nf=16, depth=1))
    x = np.random.default_rng(shape[0]).integers(0, 256, shape, dtype=np.uint8)
    want = sr_lut.upscale(x, stages)
    for i, st in enumerate(stages):
        final = i == len(stages) - 1
        func = sr_lookup.stage(x.shape[0], x.shape[1], st.scale, tuple(st.msb), tuple(st.lsb), final)
        y = sr_lut.stage(x, st) * np.float32(255)
        ref = np.floor(y + np.float32(0.5) if final else y).astype(np.uint8)
        got = _run(sr_lookup.schedule(func), x, st)
        np.testing.assert_array_equal(got, ref)
        if st.scale == 2:  # the fast x2 kernel: one 32-bit read per pattern and rotation, same bytes out
            fast = sr_lookup.stage_x2(x.shape[0], x.shape[1], tuple(st.msb), tuple(st.lsb), final)
            np.testing.assert_array_equal(_run(sr_lookup.schedule(fast), x, st, words=True), ref)
            np.testing.assert_array_equal(_run(fast, x, st, words=True), ref)  # unscheduled too
        x = got
    np.testing.assert_array_equal(x, want)


def test_an_image_smaller_than_the_patterns_is_refused():
    with pytest.raises(ValueError, match="at least 3x3"):
        sr_lookup.stage(2, 8, 2, ("h", "d", "b"), ("h2", "d2"), True)
    with pytest.raises(ValueError, match="at least 3x3"):
        sr_lookup.stage_x2(8, 2, ("h", "d", "b"), ("h2", "d2"), True)
