"""Whole-subnetwork lookup: a per-pixel subnetwork of a few quantized inputs replaced by one table read.

``relay_passes.tabulate`` finds subnetworks that map ``n`` input channels, each taking one of ``levels``
values ``k * step`` (an HKLUT branch reads 2 or 3 pixels of a 4-bit plane), to ``c`` outputs per pixel,
evaluates them on all ``levels ** n`` inputs and stores the outputs as an int8 table. This kernel is what
replaces the subnetwork: per pixel, each input's level index ``round(x / step)`` (clamped to the table), the
entry ``sum_i k_i * levels^(n-1-i)`` (first input most significant, as ``tvm_lut.math.sr_lut.table_index``),
and ``c`` int8 reads dequantized as ``q * scale + offset``.

Compute, schedule and numpy reference side by side: ``compute`` (a PrimFunc ``(x, table, out)``),
``schedule`` (vectorised over the pixels of a row, threads over rows), ``reference`` (the same float32
arithmetic in numpy; the tests compare the compiled kernel to it bit for bit).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import te, tirx

from .kernels import opaque_kernel


def compute(shape: tuple[int, int, int, int], c: int, levels: int, steps: tuple[float, ...], scale: float,
            offset: float) -> tirx.PrimFunc:
    """``(x (B, n, H, W) float32, table (levels^n * c,) int8, out (B, c, H, W) float32)``."""
    b, n, h, w = (int(d) for d in shape)
    if len(steps) != n:
        raise ValueError(f"one step per input channel: {n} channels, {len(steps)} steps")
    x = te.placeholder((b, n, h, w), "float32", name="x")
    table = te.placeholder((levels ** n * c,), "int8", name="table")

    def level(bb, i, yy, xx):
        k = tirx.round(x[bb, i, yy, xx] * tirx.const(1.0 / steps[i], "float32")).astype("int32")
        return tirx.max(tirx.min(k, levels - 1), 0)

    def entry(bb, yy, xx):
        idx = level(bb, 0, yy, xx)
        for i in range(1, n):
            idx = idx * levels + level(bb, i, yy, xx)
        return idx

    out = te.compute((b, c, h, w), lambda bb, cc, yy, xx: table[entry(bb, yy, xx) * c + cc].astype("float32")
                     * tirx.const(scale, "float32") + tirx.const(offset, "float32"), name="out")
    return opaque_kernel(te.create_prim_func([x, table, out]), "table_lookup")


def schedule(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Threads over (batch, channel, row), the row's pixels vectorised in 16-lane chunks where they divide."""
    sch = tvm.s_tir.Schedule(func)
    blk = sch.get_sblock("out")
    bb, cc, yy, xx = sch.get_loops(blk)
    sch.parallel(sch.fuse(bb, cc, yy))
    w = int(sch.get(xx).extent)
    if w % 16 == 0:
        _, inner = sch.split(xx, factors=[None, 16])
        sch.vectorize(inner)
    return sch.mod["main"]


def reference(x: np.ndarray, table: np.ndarray, c: int, levels: int, steps: tuple[float, ...], scale: float,
              offset: float) -> np.ndarray:
    """numpy: the kernel's float32 arithmetic, for bit-exact tests."""
    x = x.astype(np.float32)
    n = x.shape[1]
    idx = np.zeros((x.shape[0], x.shape[2], x.shape[3]), np.int64)
    for i in range(n):
        k = np.rint(x[:, i] * np.float32(1.0 / steps[i])).astype(np.int64)
        idx = idx * levels + np.clip(k, 0, levels - 1)
    q = table.reshape(-1, c)[idx].astype(np.float32)  # (B, H, W, c)
    return np.moveaxis(q * np.float32(scale) + np.float32(offset), -1, 1)
