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
``cam``   the host target with the ``cam`` key: each PQ layer's        here, with ``tvm_lut.cam`` imported
          encode and table readout run on the CAM simulator            (the .so calls it by name)
          (``tvm_lut.cam``), the rest of the model on the CPU
========  ==========================================================  =====================================

A ``tvm.target.Target`` or a target dict is accepted wherever a name is. Calibration and accuracy runs
always happen on the host (``host_for``): a cross target only changes what the final build is for.

Code LLVM builds for an x86 ``mcpu`` may use every instruction set that CPU has (AVX-512 for ``znver4``,
and the lookup kernel is chosen by them too). ``instruction_sets`` lists them; an artifact records the list and
refuses to load on a CPU that lacks one (``missing_instruction_sets``), where it would otherwise stop the
process with an illegal instruction.
"""

from __future__ import annotations

import os

import tvm

from .errors import TargetError


def host_target(num_cores: int | None = None) -> tvm.target.Target:
    """The LLVM target of this machine: ``mcpu`` from the host and ``num-cores`` for MetaSchedule."""
    cores = num_cores or len(os.sched_getaffinity(0))
    return tvm.target.Target(
        {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(), "num-cores": cores}
    )


TARGETS = ("x86", "x86:CPU", "arm", "cam")
CAM_KEY = "cam"
ARM_TRIPLE = "aarch64-linux-gnu"


def arm_target(num_cores: int = 4, mcpu: str | None = None) -> tvm.target.Target:
    """Generic AArch64 with NEON (mandatory on AArch64); ``mcpu`` e.g. ``cortex-a72`` or ``neoverse-n1``."""
    spec = {"kind": "llvm", "mtriple": ARM_TRIPLE, "mattr": ["+neon"], "num-cores": num_cores}
    if mcpu:
        spec["mcpu"] = mcpu
    return tvm.target.Target(spec)


def cam_target() -> tvm.target.Target:
    """The host target tagged with the ``cam`` key (``is_cam``): LUT layers are offloaded at build time."""

    spec = dict(host_target().export())
    spec["keys"] = [CAM_KEY, "cpu"]
    return tvm.target.Target({k: v for k, v in spec.items() if not k.startswith("feature.")})


# LLVM x86 feature names that are instruction sets (code using one stops with SIGILL on a CPU without it);
# llvm_get_cpu_features' other names ("fast-...", "macrofusion", "64bit") are tuning hints or always there
_ISA_PREFIXES = ("sse", "ssse3", "avx", "fma", "f16c", "bmi", "amx", "gfni", "vaes", "vpclmulqdq", "sha", "aes",
                 "pclmul", "popcnt", "lzcnt", "movbe", "adx")


def x86_target(mcpu: str) -> tvm.target.Target:
    """This host's target with another x86-64 CPU as ``mcpu`` (LLVM's names: ``znver4``, ``x86-64-v3``...)."""
    from tvm.target import codegen


    if not codegen.llvm_is_valid_cpu(mcpu, "x86_64-pc-linux-gnu"):
        raise TargetError(f"unknown x86 CPU {mcpu!r} in --target x86:{mcpu}; give an LLVM CPU name such as "
                          "x86-64-v3 (any AVX2 CPU), x86-64-v4 (AVX-512), znver3, znver4, icelake-server")
    spec = {k: v for k, v in dict(host_target().export()).items() if k in ("kind", "num-cores")}
    return tvm.target.Target({**spec, "mcpu": mcpu})


def is_x86(target) -> bool:
    """An LLVM target for x86-64 (this host's kind of machine, whatever its ``mcpu``)."""
    tgt = resolve_target(target)
    triple = str(tgt.attrs.get("mtriple", ""))
    return str(tgt.kind.name) == "llvm" and (triple == "" or triple.startswith("x86_64"))


def instruction_sets(target) -> list[str]:
    """The x86 instruction-set extensions code built for ``target`` may use (its ``mcpu`` and ``mattr``)."""
    from tvm.target import codegen

    tgt = resolve_target(target)
    return sorted(f for f in codegen.llvm_get_cpu_features(tgt) if f.startswith(_ISA_PREFIXES))


def missing_instruction_sets(required) -> list[str]:
    """Which of ``required`` (names from ``instruction_sets``) this machine's CPU lacks."""

    have = set(instruction_sets(host_target()))
    return sorted(set(required) - have)


def resolve_target(target) -> tvm.target.Target:
    """A target name (``x86``, ``x86:CPU``, ``arm``, ``cam``), a target dict, or a ``tvm.target.Target`` -> Target."""
    if isinstance(target, tvm.target.Target):
        return target
    if isinstance(target, dict):
        try:
            return tvm.target.Target(target)
        except Exception as exc:
            raise TargetError(f"invalid target dict {target!r}: {exc}") from None
    if target in ("x86", "llvm", "host", None):

        return host_target()
    if isinstance(target, str) and target.startswith("x86:"):
        return x86_target(target.split(":", 1)[1])
    if target in ("arm", "aarch64", "arm64"):
        return arm_target()
    if target == "cam":
        return cam_target()
    raise TargetError(f"unknown target {target!r}; supported: {', '.join(TARGETS)} (or a TVM target dict)")


def is_cam(target) -> bool:
    return CAM_KEY in [str(k) for k in resolve_target(target).keys]


def is_arm(target) -> bool:
    tgt = resolve_target(target)
    return str(tgt.attrs.get("mtriple", "")).startswith("aarch64")


def runs_on_host(target) -> bool:
    """Whether code built for ``target`` runs in this (x86-64) process: an x86 target whose instruction sets
    this CPU has all of (``x86:znver4``'s AVX-512 code does not run on a Zen 3)."""
    tgt = resolve_target(target)
    return is_x86(tgt) and not missing_instruction_sets(instruction_sets(tgt))


def host_for(target) -> tvm.target.Target:
    """Where calibration, priority-mask and accuracy runs happen for a build for ``target``: the target
    itself when it runs here (minus the CAM offload), else this host."""
    tgt = resolve_target(target)
    if runs_on_host(tgt) and not is_cam(tgt):
        return tgt

    return host_target()


def export_library(executable, path: str, target) -> None:
    """``executable.export_library(path)`` with the compiler ``target`` needs (aarch64: the cross g++)."""
    if is_arm(target):
        import shutil

        from tvm.support import cc

        from .arm_emulator import CROSS_CXX

        if shutil.which(CROSS_CXX) is None:
            raise TargetError(f"exporting for {ARM_TRIPLE} needs the cross compiler {CROSS_CXX} "
                              "(run 'tvm-lut farm setup-arm' or install g++-aarch64-linux-gnu)")
        executable.export_library(path, fcompile=cc.cross_compiler(CROSS_CXX))
        return
    executable.export_library(path)


def name_of(target) -> str:
    """The short name a manifest records: ``x86`` (this host's CPU), ``x86:CPU``, ``arm``, ``cam`` or the
    target's string."""
    tgt = resolve_target(target)
    if is_cam(tgt):
        return "cam"
    if is_arm(tgt):
        return "arm"
    if is_x86(tgt):
        from tvm.target import codegen

        mcpu = str(tgt.attrs.get("mcpu", ""))
        return "x86" if mcpu in ("", codegen.llvm_get_system_cpu()) else f"x86:{mcpu}"
    return str(tgt)

