"""TIR kernels of the PQ lookup layer and their per-target schedules.

``kernels`` holds the unscheduled PrimFuncs (one per role: im2col, encode, accumulate); ``x86`` the hand
schedules and the host target. Numeric references live in ``tvm_lut.pq``.
"""

from . import kernels, x86
from .kernels import KERNEL_ATTR

__all__ = ["kernels", "x86", "KERNEL_ATTR"]
