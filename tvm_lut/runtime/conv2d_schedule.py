"""A register-tiled schedule for the exact layers' ``conv2d`` (NCHW): what a LUT model keeps exact must be fast too.

Legalized, a Relax ``conv2d`` is a ``pad_temp`` block and a ``conv2d_nchw`` reduction over (ic, kh, kw)
with no schedule: every multiply-add loads and stores its output element. Measured on one core (AMD EPYC,
AVX-512), 64 -> 64 channels, 3x3, 32x32: 51-60 ms, against 1.3 ms for PyTorch. This schedule keeps a tile of
``oc_block`` output channels x one vector of output pixels in registers across the whole reduction:

    for (n, oc_outer) [parallel]: for oh: for ow_outer:
        acc[oc_block][vector] = 0
        for ic, kh, kw: for oc in oc_block [unrolled]:
            acc[oc] += x_pad[ic, oh + kh, ow_vector + kw] * broadcast(w[oc, ic, kh, kw])   # one FMA

one vector load of input per (ic, kh, kw) shared by ``oc_block`` FMAs. Same loop order of the reduction,
so the sums are the same as the unscheduled code's. Measured (same shape, one thread): 0.38 ms with 8
output channels per tile, 0.33 ms with 16 (16 accumulators of 16 floats: half the AVX-512 registers).
Blocks fused after the conv (bias, ReLU, a residual add) and the padding are vectorized on their own.
Grouped and depthwise convs (other block names) keep the default lowering.
"""

from __future__ import annotations

import math

from tvm import tirx

CONV_BLOCK = "conv2d_nchw"
MAX_ACCUMULATORS = 16  # vector registers the tile may hold (of 32 with AVX-512; AVX2 has 16 and spills some)


def vector_width(extent: int, lanes: int) -> int | None:
    """Lanes of one vector along a loop of ``extent``: ``lanes`` or half of it where it divides, the whole
    loop where it is short (at most two vectors), else None."""
    for w in (lanes, lanes // 2):
        if extent % w == 0:
            return w
    return extent if extent <= 2 * lanes else None


def vectorize_block(sch, block, lanes: int, parallel_min: int | None = None) -> bool:
    """An injective block's loops fused and split into vectors of gcd(elements, ``lanes``), the outer loop
    parallel from ``parallel_min`` elements; False (nothing changed) when no width of 4 or more divides
    them or an extent is not constant. Shared with ``runtime.elementwise``."""
    loops = sch.get_loops(block)
    extents = [sch.get(lp).extent for lp in loops]
    if not loops or not all(isinstance(e, tirx.IntImm) for e in extents):
        return False
    total = math.prod(int(e.value) for e in extents)
    width = math.gcd(total, lanes)
    if width < 4:
        return False
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    outer, inner = sch.split(fused, [None, width])
    sch.vectorize(inner)
    if parallel_min is not None and total >= parallel_min:
        sch.parallel(outer)
    return True


def vectorize_other_blocks(sch, main: str, lanes: int) -> None:
    """Vectorize every data-parallel block beside the scheduled reduction ``main`` (its padding, the
    elementwise ops fused after it: bias, ReLU, a residual add), each on its own; its ``_init`` stays."""
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        name = sch.get(block).name_hint
        if name != main and not name.endswith("_init") and all(
                iv.iter_type == tirx.IterVar.DataPar for iv in sch.get(block).iter_vars):
            vectorize_block(sch, block, lanes)


def schedule_conv2d(func: tirx.PrimFunc, lanes: int = 16) -> tirx.PrimFunc | None:
    """``func`` (a legalized conv2d, possibly fused with elementwise ops after it) scheduled as in the
    module docstring, or None when it is not one this schedule handles."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    try:
        conv = sch.get_sblock(CONV_BLOCK)
    except (s_tir.ScheduleError, ValueError):
        return None
    try:
        loops = sch.get_loops(conv)
        if len(loops) != 7:
            return None
        n, oc, oh, ow, ic, kh, kw = loops
        oc_ext, ow_ext = (sch.get(lp).extent for lp in (oc, ow))
        if not (isinstance(oc_ext, tirx.IntImm) and isinstance(ow_ext, tirx.IntImm)):
            return None
        vw = vector_width(int(ow_ext.value), lanes)
        if vw is None:
            return None
        per_oc = -(-vw // lanes)
        ocb = next(b for b in (16, 8, 4, 2, 1) if int(oc_ext.value) % b == 0 and b * per_oc <= MAX_ACCUMULATORS)
        oc_o, oc_i = sch.split(oc, [None, ocb])
        ow_o, ow_i = sch.split(ow, [None, vw])
        sch.reorder(n, oc_o, oh, ow_o, ic, kh, kw, oc_i, ow_i)
        sch.vectorize(ow_i)
        sch.unroll(oc_i)
        sch.parallel(sch.fuse(n, oc_o))
        sch.decompose_reduction(conv, ic)
        vectorize_other_blocks(sch, CONV_BLOCK, lanes)
    except s_tir.ScheduleError:
        return None
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)
