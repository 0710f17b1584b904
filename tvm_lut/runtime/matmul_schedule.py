"""A register-tiled schedule for legalized ``matmul`` (batched or not): attention's activation products and
the dense layers a model keeps exact.

Legalized, a Relax ``matmul`` is one ``matmul`` block over (batch..., i, j, k) with no schedule: every
multiply-add loads and stores its output element through int64 index arithmetic. In a BERT-class encoder
(4 layers, d=512, 8 heads, 128 tokens; ``benchmarks/bert.py``) whose dense layers are lookups, the two
attention products per layer (8 x 128x128x64 multiply-adds each) took 40-66 ms of a 67-72 ms model on
one core, against 11 ms for every lookup layer together. This schedule keeps a tile of ``ib`` rows x
``nj`` vectors of output columns in registers across the whole reduction:

    for (batch, i_outer) [parallel]: for j_outer:
        acc[ib][nj][vector] = 0
        for k: for ii in ib [unrolled]: for jj in nj [unrolled]:
            acc[ii][jj] += broadcast(A[i, k]) * B[k, j_vector]        # one FMA

one vector load of ``B`` per (k, jj) shared by ``ib`` FMAs, one broadcast of ``A`` shared by ``nj``. The
reduction runs over k in the same order as the unscheduled code, so the sums are the same bit for bit.
Expected: 2 loads per ``ib * nj`` FMAs instead of 3 memory operations per scalar multiply-add, about the
16-lane FMA rate: ~1 ms for those products instead of 40-66. Elementwise blocks fused after the product
(a bias add) are vectorized on their own; a product whose columns do not fill a vector keeps the default
lowering.
"""

from __future__ import annotations

from tvm import tirx

from tvm_lut.runtime.conv2d_schedule import MAX_ACCUMULATORS, vector_width, vectorize_other_blocks

MATMUL_BLOCK = "matmul"


def schedule_matmul(func: tirx.PrimFunc, lanes: int = 16) -> tirx.PrimFunc | None:
    """``func`` (a legalized matmul, possibly fused with elementwise ops after it) scheduled as in the
    module docstring, or None when it is not one this schedule handles."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    try:
        mm = sch.get_sblock(MATMUL_BLOCK)
    except (s_tir.ScheduleError, ValueError):
        return None
    try:
        loops = sch.get_loops(mm)
        kinds = [iv.iter_type for iv in sch.get(mm).iter_vars]
        if len(loops) < 3 or len(kinds) != len(loops) or kinds[-1] != tirx.IterVar.CommReduce or any(
                k != tirx.IterVar.DataPar for k in kinds[:-1]):
            return None
        *batch, i, j, k = loops
        extents = [sch.get(lp).extent for lp in (i, j)]
        if not all(isinstance(e, tirx.IntImm) for e in extents):
            return None
        i_ext, j_ext = (int(e.value) for e in extents)
        vw = vector_width(j_ext, lanes)
        if vw is None or j_ext % vw:
            return None
        per_vec = -(-vw // lanes)
        nj = next(n for n in (2, 1) if (j_ext // vw) % n == 0)
        ib = next(b for b in (8, 4, 2, 1) if i_ext % b == 0 and b * nj * per_vec <= MAX_ACCUMULATORS)
        i_o, i_i = sch.split(i, [None, ib])
        j_o, j_n, j_v = sch.split(j, [None, nj, vw])
        sch.reorder(*batch, i_o, j_o, k, i_i, j_n, j_v)
        sch.vectorize(j_v)
        sch.unroll(j_n)
        sch.unroll(i_i)
        sch.parallel(sch.fuse(*batch, i_o) if batch else i_o)
        sch.decompose_reduction(mm, k)
        vectorize_other_blocks(sch, MATMUL_BLOCK, lanes)
    except s_tir.ScheduleError:
        return None
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)
