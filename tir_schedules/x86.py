"""Hand schedules for the PQ kernels on x86 CPUs (LLVM), and the host target they assume.

Set ``mcpu`` to the host CPU (``host_target``): the generic x86-64 target leaves the int8 widening in
the accumulate kernel scalar, 3-4x slower (cookbook P3). Each schedule keeps the kernel's arithmetic
exactly as written (same reduction order per output), so scheduled and unscheduled kernels agree bit
for bit with the numpy reference on the integer path.
"""

from __future__ import annotations

import os

import tvm
from tvm import tirx

from .kernels import KERNEL_ATTR


def host_target(num_cores: int | None = None) -> tvm.target.Target:
    """The LLVM target of this machine: ``mcpu`` from the host and ``num-cores`` for MetaSchedule."""
    cores = num_cores or len(os.sched_getaffinity(0))
    return tvm.target.Target(
        {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(), "num-cores": cores}
    )


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


def schedule_encode(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """rows in parallel; each (row, codebook) computes its K scores in registers, then the argmin."""
    sch = tvm.s_tir.Schedule(func)
    score = sch.get_sblock("score")
    arg = sch.get_sblock("argmin")
    n, c, _k = sch.get_loops(arg)
    sch.compute_at(score, c)
    sch.set_scope(score, 0, "local")
    k_loop, v_loop = sch.get_loops(score)[-2:]
    sch.reorder(v_loop, k_loop)
    sch.parallel(n)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def schedule_im2col(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """rows in parallel; the patch gather is memory bound and needs nothing more."""
    sch = tvm.s_tir.Schedule(func)
    blk = sch.get_sblock("im2col")
    r, _col = sch.get_loops(blk)
    sch.parallel(r)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


_SCHEDULES = {
    "accumulate": schedule_accumulate,
    "encode": schedule_encode,
    "im2col": schedule_im2col,
}


def schedule(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Apply the hand schedule matching the kernel's ``tvm_lut.kernel`` role."""
    role = str(func.attrs[KERNEL_ATTR])
    return _SCHEDULES[role](func)
