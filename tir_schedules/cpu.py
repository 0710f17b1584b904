"""Hand schedules for the PQ kernels on LLVM CPU targets: x86 (each ISA level) and aarch64 (NEON).

Set ``mcpu`` to the host CPU (``tvm_lut.targets.host_target``): the generic x86-64 target leaves the int8 widening in
the accumulate kernel scalar, 3-4x slower (cookbook P3). Each schedule keeps the kernel's arithmetic
exactly as written (same reduction order per output), so scheduled and unscheduled kernels agree bit
for bit with the numpy reference on the integer path.
"""

from __future__ import annotations

import tvm
from tvm import tirx

from .kernels import KERNEL_ATTR, ROW_LANES_ATTR


def _inner_factor(extent: int, candidates: tuple[int, ...] = (64, 32, 16, 8, 4, 2)) -> int:
    """Largest vector width that divides ``extent`` (1 if none): avoids predicated tails."""
    for f in candidates:
        if extent % f == 0:
            return f
    return 1


def schedule_accumulate(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """rows in parallel; per row, codebooks outer and a vector of outputs inner (int8 -> int32 widen)."""
    sch = tvm.s_tir.Schedule(func)
    blk = sch.get_sblock("acc")
    n, m, c = sch.get_loops(blk)
    m_extent = int(sch.get(m).extent)
    f = _inner_factor(m_extent)
    mo, mi = sch.split(m, [None, f])
    sch.reorder(n, mo, c, mi)
    sch.parallel(n)
    if f > 1:
        sch.vectorize(mi)
    init = sch.decompose_reduction(blk, c)
    if f > 1:
        sch.vectorize(sch.get_loops(init)[-1])
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def schedule_encode(func: tirx.PrimFunc, max_lanes: int | None = None) -> tirx.PrimFunc:
    """Encoder: up to 16 rows share the vector lanes, so both the score update and the argmin are
    vector ops (a scalar argmin over K=16 cost 95% of the time before); tiles of rows run in parallel.

    For each tile and codebook the scores live in a small local buffer laid out (C, K, rows): the score
    update walks the subvector elements with the rows as vector lanes, and the argmin is a tree of vector
    compare/selects (``kernels.argmin_tree``). A packed encoder keeps its codes (codebook, row), so each
    tile stores its 16 codes as one vector. Odd row counts fall back to vectorizing over K
    (``_encode_k_vector``). With the scores fused into the argmin (``kernels.encode(fused_scores=True)``)
    there is no score block: the argmin alone is vectorized over the tile's rows. ``max_lanes`` caps the
    rows per vector (default: the kernel's ``kernels.ROW_LANES_ATTR``, else 16).
    """
    if max_lanes is None:
        max_lanes = int(func.attrs.get(ROW_LANES_ATTR, 16))
    sch = tvm.s_tir.Schedule(func)
    arg = sch.get_sblock("argmin")
    n, c = sch.get_loops(arg)
    lanes = _inner_factor(int(sch.get(n).extent), tuple(f for f in (16, 8, 4, 2) if f <= max_lanes))
    if lanes == 1:
        return _encode_k_vector(func)
    tile, lane = sch.split(n, [None, lanes])
    sch.reorder(tile, c, lane)
    if _has_block(sch, "pack"):  # internal codes: (codebook, row), so a tile's 16 codes store as one vector
        sch.transform_layout(arg, ("write", 0), lambda r, cb: (cb, r))
    if not _has_block(sch, "score"):  # scores fused into the argmin (``kernels.encode(fused_scores=True)``)
        sch.parallel(tile)
        sch.vectorize(lane)
        _inline_or_fuse_patch(sch, c)
        _schedule_pad(sch)
        _schedule_pack(sch)
        return sch.mod["main"].with_attr("tirx.is_scheduled", True)
    score = sch.get_sblock("score")
    sch.compute_at(score, c)
    sch.set_scope(score, 0, "local")
    sch.transform_layout(score, ("write", 0), lambda r, cb, q: (cb, q, r))
    if int(sch.get(score).iter_vars[-1].dom.extent) == 1:  # V=1: compute_at dropped the unit subvector loop
        s_lane, s_k = sch.get_loops(score)[-2:]
        sch.reorder(s_k, s_lane)
        reduce_at = s_k
    else:
        s_lane, s_k, s_v = sch.get_loops(score)[-3:]
        sch.reorder(s_v, s_k, s_lane)
        reduce_at = s_v
    sch.parallel(tile)  # before decompose_reduction: afterwards the loop no longer qualifies
    sch.vectorize(s_lane)
    init = sch.decompose_reduction(score, reduce_at)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(lane)
    _inline_or_fuse_patch(sch, c)
    _schedule_pad(sch)
    _schedule_pack(sch)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _has_block(sch: tvm.s_tir.Schedule, name: str) -> bool:
    try:
        sch.get_sblock(name)
        return True
    except Exception:
        return False


def _inline_or_fuse_patch(sch: tvm.s_tir.Schedule, codebook_loop, row_lanes: bool = True) -> None:
    """The encoder's input rows: a plain copy is inlined; an im2col patch (``kernels.encode(conv=...)``)
    is computed per row tile and codebook into a small local buffer laid out (column, row) so the rows are
    the vector lanes: the (rows, D) matrix never reaches memory."""
    patch = sch.get_sblock("patch")
    if "tvm_lut.fused_im2col" not in sch.mod["main"].attrs:
        sch.compute_inline(patch)
        return
    sch.compute_at(patch, codebook_loop)
    sch.set_scope(patch, 0, "local")
    if not row_lanes:  # one row per iteration (odd row counts): a V-long local patch
        return
    sch.transform_layout(patch, ("write", 0), lambda r, col: (col, r))
    loops = sch.get_loops(patch)
    depth = next(i for i, loop in enumerate(loops) if sch.get(loop).same_as(sch.get(codebook_loop)))
    if len(loops) - depth == 3:  # (row, column) under the codebook loop
        row, col = loops[-2:]
        sch.reorder(col, row)
    else:  # V=1: compute_at dropped the unit column loop
        row = loops[-1]
    sch.vectorize(row)


def _schedule_pad(sch: tvm.s_tir.Schedule) -> None:
    """The fused conv encoder's zero-padded input copy: planes in parallel; LLVM turns the zero fill
    into memset and vectorizes each contiguous row copy."""
    if not _has_block(sch, "pad_copy"):  # no fused convolution: no padded copy
        return
    b, ci = sch.get_loops(sch.get_sblock("pad_copy"))[:2]
    sch.parallel(sch.fuse(b, ci))


def _schedule_pack(sch: tvm.s_tir.Schedule) -> None:
    """Packed-code output (``kernels.encode(pack_lanes=...)``): row blocks in parallel."""
    if not _has_block(sch, "pack"):  # unpacked encoder: no such block
        return
    sch.parallel(sch.get_loops(sch.get_sblock("pack"))[0])


def _encode_k_vector(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Encoder for odd row counts: rows in parallel, the K scores of a subvector as one vector."""
    sch = tvm.s_tir.Schedule(func)
    score = sch.get_sblock("score")
    arg = sch.get_sblock("argmin")
    n, c = sch.get_loops(arg)
    sch.compute_at(score, c)
    sch.set_scope(score, 0, "local")
    k_loop, v_loop = sch.get_loops(score)[-2:]
    sch.reorder(v_loop, k_loop)
    sch.parallel(n)  # before decompose_reduction: afterwards the loop no longer qualifies
    if _inner_factor(int(sch.get(k_loop).extent)) == int(sch.get(k_loop).extent):
        sch.vectorize(k_loop)
        init = sch.decompose_reduction(score, v_loop)
        sch.vectorize(sch.get_loops(init)[-1])
    _inline_or_fuse_patch(sch, c, row_lanes=False)
    _schedule_pad(sch)
    _schedule_pack(sch)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def schedule_im2col(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """rows in parallel; the patch gather is memory bound and needs nothing more."""
    sch = tvm.s_tir.Schedule(func)
    blk = sch.get_sblock("im2col")
    r, _col = sch.get_loops(blk)
    sch.parallel(r)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def schedule_butterfly(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """A butterfly factor: (row, block) pairs in parallel; per input digit ``j`` the block's outputs are
    updated as one vector: with ``t = 1`` the ``r`` outputs (contiguous in ``y`` and in the stored values,
    ``x`` broadcast), with ``t >= 4`` the ``t`` diagonal lanes (contiguous in ``x``, ``w`` and ``y``)."""
    sch = tvm.s_tir.Schedule(func)
    blk = sch.get_sblock("factor")
    row, b, j, i, d = sch.get_loops(blk)
    t = int(sch.get(d).extent)
    outer = sch.fuse(row, b)
    sch.parallel(outer)
    inner = sch.fuse(i, d) if t == 1 else d
    f = _inner_factor(int(sch.get(inner).extent), (16, 8, 4))
    vectorized = f > 1 and (t == 1 or t >= 4)
    if vectorized:  # vectorize before decompose_reduction: the update block alone no longer qualifies
        sch.vectorize(sch.split(inner, [None, f])[1])
    init = sch.decompose_reduction(blk, j)
    if vectorized:
        loops = sch.get_loops(init)
        ii = sch.fuse(*loops[-2:]) if t == 1 else loops[-1]
        sch.vectorize(sch.split(ii, [None, f])[1])
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def schedule_shuffle(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Shuffle lookup: (row block, output tile) pairs in parallel; each tile keeps its accumulators in
    registers (the kernel's own structure, ``shuffle.lookup``)."""
    sch = tvm.s_tir.Schedule(func)
    b, ot = sch.get_loops(sch.get_sblock("lookup"))
    # row blocks in parallel, not fused with the tiles: a fused loop divides by the tile count (an imul),
    # a nest keeps every address an induction variable (the L1 path stays multiplier-free)
    sch.parallel(b)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


_SCHEDULES = {
    "shuffle_lookup": schedule_shuffle,
    "butterfly": schedule_butterfly,
    "accumulate": schedule_accumulate,
    "encode": schedule_encode,
    "im2col": schedule_im2col,
}


def schedule(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Apply the hand schedule matching the kernel's ``tvm_lut.kernel`` role."""
    if func.attrs.get("tirx.is_scheduled"):  # written vectorized (``kernels.encode_codebook_lanes``)
        return func
    role = str(func.attrs[KERNEL_ATTR])
    return _SCHEDULES[role](func)
