"""AArch64 (``arm``): ``llvm -mtriple=aarch64-linux-gnu -mattr=+neon``; shuffle lookups use NEON ``tbl``.

Its code runs on an aarch64 TVM runtime (over RPC: ``tvm-lut farm``, or the emulated one ``tvm-lut farm
setup-arm`` installs) and is exported with the aarch64 cross compiler; calibration and accuracy runs use
a host build of the same tables (``Target.local``).
"""

from __future__ import annotations

import os
import shutil

import tvm

from tvm_lut.errors import ArtifactError, TargetError
from tvm_lut.targets.arm_emulator import CROSS_CXX
from tvm_lut.targets.base import Target
from tvm_lut.targets.x86 import X86

ARM_TRIPLE = "aarch64-linux-gnu"


def _cross_compiler():
    from tvm.support import cc

    if shutil.which(CROSS_CXX) is None:
        raise TargetError(f"exporting for {ARM_TRIPLE} needs the cross compiler {CROSS_CXX} "
                          "(run 'tvm-lut farm setup-arm' or install g++-aarch64-linux-gnu)")
    return cc.cross_compiler(CROSS_CXX)


def export_candidate(mod) -> str:
    """MetaSchedule builder export for an aarch64 farm: a shared library from the cross compiler (the
    default .tar would be linked by the remote, which has no compiler)."""
    import tempfile

    path = os.path.join(tempfile.mkdtemp(prefix="tvm_lut_ms_"), "candidate.so")
    mod.export_library(path, fcompile=_cross_compiler())
    return path


class Arm(Target):
    family = "arm"
    names = ("arm",)
    farm_key = "arm64"
    candidate_export = staticmethod(export_candidate)

    @classmethod
    def generic(cls, num_cores: int = 4, mcpu: str | None = None) -> Arm:
        """Generic AArch64 with NEON (mandatory on AArch64); ``mcpu`` e.g. ``cortex-a72`` or ``neoverse-n1``."""
        spec = {"kind": "llvm", "mtriple": ARM_TRIPLE, "mattr": ["+neon"], "num-cores": num_cores}
        if mcpu:
            spec["mcpu"] = mcpu
        return cls(tvm.target.Target(spec))

    @classmethod
    def from_name(cls, name: str) -> Arm | None:
        return cls.generic() if name in ("arm", "aarch64", "arm64") else None

    @classmethod
    def claims(cls, tvm_target: tvm.target.Target) -> bool:
        return str(tvm_target.attrs.get("mtriple", "")).startswith("aarch64")

    @property
    def name(self) -> str:
        return "arm"

    def local(self) -> X86:
        return X86.host()  # this x86 process runs a host build of the same tables

    def export(self, executable, path: str) -> None:
        executable.export_library(path, fcompile=_cross_compiler())

    def check_loadable(self, path: str, manifest: dict) -> None:
        raise ArtifactError(f"{path}: built for aarch64 (--target arm); this x86 process cannot load it. Run "
                            f"it on an aarch64 TVM runtime, e.g. over RPC: 'tvm-lut run {path} --farm HOST:PORT "
                            "--key arm64 ...' (see 'tvm-lut farm')")
