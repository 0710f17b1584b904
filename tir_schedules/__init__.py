"""TIR kernels of the PQ lookup layer and their per-target schedules.

``kernels`` holds the unscheduled PrimFuncs (one per role: im2col, encode, accumulate), ``shuffle`` the
byte-shuffle lookups, ``cpu`` the hand schedules for LLVM CPU targets (x86 and aarch64), ``tuning`` the
MetaSchedule side. Numeric references live in ``tvm_lut.pq``; the host target in ``tvm_lut.targets``.
"""

from . import cpu, kernels
from .kernels import KERNEL_ATTR

__all__ = ["kernels", "cpu", "KERNEL_ATTR"]
