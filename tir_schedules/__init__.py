"""TIR kernels of the PQ lookup layer and their per-target schedules.

``kernels`` holds the unscheduled PrimFuncs (one per role: im2col, encode, accumulate), ``shuffle`` the
byte-shuffle lookups, ``cpu`` the hand schedules for LLVM CPU targets (x86 and aarch64), ``tuning`` the
MetaSchedule side. Numeric references live in ``tvm_lut.math.pq``; the targets (and the ISA facts the
kernels are built for) in ``tvm_lut.targets``. A target names its schedule family (``Target.schedule``);
``SCHEDULES`` maps the name to the hand schedule of a kernel.
"""

from . import cpu, kernels
from .kernels import KERNEL_ATTR

SCHEDULES = {"cpu": cpu.schedule}  # Target.schedule -> hand schedule of an unscheduled kernel


def schedule_for(target):
    """The hand schedule for kernels built for ``target`` (a ``tvm_lut.targets.Target``)."""
    return SCHEDULES[target.schedule]


__all__ = ["kernels", "cpu", "KERNEL_ATTR", "SCHEDULES", "schedule_for"]
