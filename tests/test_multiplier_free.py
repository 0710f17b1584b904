"""PECAN-D's claim, checked on the machine code: with the L1 distance the encode and accumulate kernels
LUTify emits contain no multiply instruction in any loop (no float multiply or FMA anywhere).

What remains is outside the kernels' loops: TVM's parallel-for splits the rows among threads with two
``imul`` per thread launch, and a thread's first-row pointer can take one more. The dequantisation
``acc * scale`` (one float multiply per output value) is a separate elementwise op after the accumulate,
as the issue allows. The L2 encoder is compiled the same way as a control: it must show FMAs in its loop,
so the detector is known to see multiplies.
"""

from __future__ import annotations

import re

import pytest
import tvm

from tvm_lut.targets import host_target
from tir_schedules import kernels, cpu

MUL = re.compile(r"^\s+(v?p?mul\w*|i?mul[bwlq]?|v?f(n)?m(add|sub)\w*|v?pmadd\w*|v?dpbusd\w*|v?dpwssd\w*)\s", re.I)
FLOAT_MUL = re.compile(r"^\s+(v?mul[sp][sd]|v?f(n)?m(add|sub)\w*)\b", re.I)


def _asm(func, name: str) -> list[str]:
    f = cpu.schedule(func).with_attr("global_symbol", name)
    lib = tvm.compile(tvm.IRModule({name: f}), target=host_target())
    return lib.mod.inspect_source("s").splitlines()


def _loop_ranges(lines: list[str]) -> list[tuple[int, int]]:
    """(first, last) line of every loop: a jump back to a label defined above it."""
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.?L\w+):", line))}
    out = []
    for i, line in enumerate(lines):
        m = re.match(r"^\s+j\w*\s+(\.?L\w+)", line)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            out.append((labels[m.group(1)], i))
    return out


def _multiplies_in_loops(lines: list[str]) -> list[str]:
    loops = _loop_ranges(lines)
    return [lines[i].strip() for i in range(len(lines))
            if MUL.match(lines[i]) and any(a <= i <= b for a, b in loops)]


SHAPES = [(64, 8, 16, 4, 40), (63, 7, 16, 9, 37), (1024, 36, 16, 4, 256)]


@pytest.mark.parametrize("n,c,k,v,m", SHAPES)
def test_l1_encode_and_accumulate_have_no_multiplies(n, c, k, v, m):
    for name, func in [("lut_encode_l1", kernels.encode(n, c, k, v, "l1", row_stride=m)),
                       ("lut_accumulate", kernels.accumulate(n, c, k, m, row_offsets=True))]:
        lines = _asm(func, name)
        assert _loop_ranges(lines), f"{name}: no loop found in the assembly (detector broken?)"
        assert not [l for l in lines if FLOAT_MUL.match(l)], f"{name}: float multiply in the L1 path"
        assert _multiplies_in_loops(lines) == [], f"{name}: multiply inside a loop"
        outside = [l.strip() for l in lines if MUL.match(l)]
        assert len(outside) <= 3, f"{name}: unexpected multiplies {outside}"


def test_l2_encoder_control_shows_multiplies():
    lines = _asm(kernels.encode(64, 8, 16, 4, "l2", row_stride=40), "lut_encode_l2")
    assert [l for l in lines if FLOAT_MUL.match(l)]
    assert _multiplies_in_loops(lines)


def test_shuffle_lookup_multiplies_only_to_dequantize():
    """The shuffle lookup's lookups and sums use no multiply: without the epilogue its loops have no float
    multiply at all; with it, the only float multiplies are the per-output FMAs ``acc * scale + bias``."""
    from tir_schedules import shuffle

    lanes = shuffle.isa_for(host_target(), grouped=False).lanes  # 64 needs AVX-512BW; 32 on AVX2 hosts
    bare = _asm(shuffle.lookup(100, 9, 20, lanes, 4, epilogue=False), "lut_lookup_bare")
    assert _loop_ranges(bare) and not [l for l in bare if FLOAT_MUL.match(l)]
    assert not [l for l in _multiplies_in_loops(bare) if not l.startswith("imul")], "vector multiply in a lookup loop"
    full = _asm(shuffle.lookup(100, 9, 20, lanes, 4), "lut_lookup_full")
    floats = [l.strip() for l in full if FLOAT_MUL.match(l)]
    assert floats and all(l.startswith("vfmadd") for l in floats), floats


def test_lutify_keeps_l1_layers_on_the_multiplier_free_kernels():
    import numpy as np
    import torch
    from torch import nn

    import tvm_lut

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 32, 3, padding=1)).eval()
    x = np.random.default_rng(0).standard_normal((8, 4, 12, 12)).astype(np.float32)
    mod = tvm_lut.from_torch(model, torch.from_numpy(x[:1]))
    p = tvm_lut.LUTify(calibration=x, distance="l1", progress=False)
    p_res = p.run(mod)
    assert p_res.layers[0]["kernel"] == "gather"
    q = tvm_lut.LUTify(calibration=x, distance="l2", progress=False)
    q_res = q.run(mod)
    assert q_res.layers[0]["kernel"].startswith("shuffle")
