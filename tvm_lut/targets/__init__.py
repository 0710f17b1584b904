"""The targets tvm-lut compiles for, by name, and what each implies for building and exporting.

========  ==========================================================  =====================================
name      TVM target                                                  runs / exports
========  ==========================================================  =====================================
``x86``   this host's LLVM target (``mcpu`` from the host: cookbook    here; ``export_library`` with the
          P3), ``num-cores`` for MetaSchedule                          host compiler
``x86:CPU`` another x86-64 CPU, e.g. ``x86:znver4`` (AVX-512) or       here only if this CPU has every
          ``x86:x86-64-v3`` (any AVX2 CPU): LLVM's ``mcpu`` names       instruction set of ``CPU``; else
                                                                      calibrated here, run there
``arm``   ``llvm -mtriple=aarch64-linux-gnu -mattr=+neon``: shuffle    on an aarch64 TVM runtime (over RPC:
          lookups use NEON ``tbl`` (16 rows per instruction)            ``tvm-lut farm``); exported with the
                                                                      aarch64 cross compiler
``cam``   the host target with the ``cam`` key: each PQ layer's        here, with ``tvm_lut.targets.cam_simulator`` imported
          encode and table readout run on the CAM simulator            (the .so calls it by name)
          (``cam_simulator``), the rest of the model on the CPU
========  ==========================================================  =====================================

Each is one ``Target`` object (``base.Target``: ``x86.X86``, ``arm.Arm``, ``cam.Cam``) that answers for it:
resolution, instruction sets, the lookup kernel a layer gets, its hand schedules, where calibration runs,
export, and what the report says. A ``tvm.target.Target`` or a target dict is accepted wherever a name is. Calibration and accuracy runs
always happen on the host (``Target.local``): a cross target only changes what the final build is for.

Code LLVM builds for an x86 ``mcpu`` may use every instruction set that CPU has (AVX-512 for ``znver4``,
and the lookup kernel is chosen by them too). ``instruction_sets`` lists them; an artifact records the list and
refuses to load on a CPU that lacks one (``missing_instruction_sets``), where it would otherwise stop the
process with an illegal instruction.
"""

from __future__ import annotations

import tvm

from tvm_lut.errors import TargetError
from tvm_lut.targets.arm import ARM_TRIPLE, Arm
from tvm_lut.targets.base import Target
from tvm_lut.targets.cam import CAM_KEY, Cam
from tvm_lut.targets.isa import host_target, missing_instruction_sets
from tvm_lut.targets.x86 import X86

__all__ = ["ARM_TRIPLE", "CAM_KEY", "TARGETS", "Arm", "Cam", "Target", "X86", "host_target", "instruction_sets",
           "kinds", "missing_instruction_sets", "Other", "of_artifact", "register", "resolve", "resolve_target", "unregister"]

class Other(Target):
    """A TVM target of no kind of ours: built as given, run nowhere here (calibration on this host),
    gather lookups where it has no byte shuffle."""

    def local(self) -> X86:
        return X86.host()


_KINDS: list[type[Target]] = [Cam, Arm, X86]  # asked in order: a cam target is also an x86 one


def kinds() -> tuple[type[Target], ...]:
    """The target kinds ``resolve`` asks, in order (registered ones first)."""
    return tuple(_KINDS)


def register(kind: type[Target]) -> type[Target]:
    """Add a target kind (a ``Target`` subclass): ``resolve`` asks it before the built-in ones, so it may
    claim a name or a TVM target they would take. Returns ``kind`` (usable as a class decorator)."""
    if not (isinstance(kind, type) and issubclass(kind, Target)):
        raise TypeError(f"register() takes a Target subclass, got {kind!r}")
    if kind not in _KINDS:
        _KINDS.insert(0, kind)
    return kind


def unregister(kind: type[Target]) -> None:
    if kind in _KINDS:
        _KINDS.remove(kind)


def __getattr__(name: str):
    if name == "TARGETS":  # the names users give (``--target``), of every kind registered now
        return tuple(n for kind in reversed(_KINDS) for n in kind.names)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def resolve(target) -> Target:
    """A name (``x86``, ``x86:CPU``, ``arm``, ``cam``), a target dict, a ``tvm.target.Target`` or a
    ``Target`` -> the ``Target`` object."""
    if isinstance(target, Target):
        return target
    if isinstance(target, dict):
        try:
            target = tvm.target.Target(target)
        except Exception as exc:
            raise TargetError(f"invalid target dict {target!r}: {exc}") from None
    if isinstance(target, tvm.target.Target):
        return next((kind(target) for kind in _KINDS if kind.claims(target)), None) or Other(target)
    if target is None:
        return X86.host()
    if isinstance(target, str):
        for kind in _KINDS:
            got = kind.from_name(target)
            if got is not None:
                return got
    raise TargetError(f"unknown target {target!r}; supported: {', '.join(__getattr__('TARGETS'))} (or a TVM target dict)")


def of_artifact(manifest: dict) -> Target:
    """The target an artifact was built for, from its manifest (``target_name``, else the target string)."""
    name = manifest.get("target_name", "x86")
    try:
        return resolve(name)
    except TargetError:
        return resolve(tvm.target.Target(manifest["target"]))


def instruction_sets(target) -> list[str]:
    """``resolve(target).instruction_sets()``: what code built for ``target`` may execute."""
    return resolve(target).instruction_sets()


def resolve_target(target) -> tvm.target.Target:
    """``resolve(target).tvm``: the ``tvm.target.Target`` to build with."""
    return resolve(target).tvm
