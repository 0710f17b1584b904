"""x86-64: this host (``x86``) or another x86-64 CPU by LLVM's name (``x86:znver4``, ``x86:x86-64-v3``).

Code LLVM builds for an ``mcpu`` may use every instruction set that CPU has (AVX-512 for ``znver4``), and the
lookup kernel is chosen by them too; an artifact records them and refuses to load on a CPU lacking one.
"""

from __future__ import annotations

import tvm

from tvm_lut.errors import ArtifactError, TargetError
from tvm_lut.targets.base import Target
from tvm_lut.targets.isa import host_target, llvm_instruction_sets, missing_instruction_sets


class X86(Target):
    family = "x86"
    names = ("x86", "x86:CPU")
    farm_key = "x86"

    @classmethod
    def host(cls, num_cores: int | None = None) -> X86:
        """This machine: ``mcpu`` from the host, ``num-cores`` for MetaSchedule."""
        return cls(host_target(num_cores))

    @classmethod
    def for_cpu(cls, mcpu: str) -> X86:
        """This host's target with another x86-64 CPU as ``mcpu`` (LLVM's names: ``znver4``, ``x86-64-v3``...)."""
        from tvm.target import codegen

        if not codegen.llvm_is_valid_cpu(mcpu, "x86_64-pc-linux-gnu"):
            raise TargetError(f"unknown x86 CPU {mcpu!r} in --target x86:{mcpu}; give an LLVM CPU name such as "
                              "x86-64-v3 (any AVX2 CPU), x86-64-v4 (AVX-512), znver3, znver4, icelake-server")
        spec = {k: v for k, v in dict(host_target().export()).items() if k in ("kind", "num-cores")}
        return cls(tvm.target.Target({**spec, "mcpu": mcpu}))

    @classmethod
    def from_name(cls, name: str) -> X86 | None:
        if name in ("x86", "llvm", "host"):
            return cls.host()
        if name.startswith("x86:"):
            return cls.for_cpu(name.split(":", 1)[1])
        return None

    @classmethod
    def claims(cls, tvm_target: tvm.target.Target) -> bool:
        triple = str(tvm_target.attrs.get("mtriple", ""))
        return str(tvm_target.kind.name) == "llvm" and (triple == "" or triple.startswith("x86_64"))

    @property
    def name(self) -> str:
        from tvm.target import codegen

        mcpu = str(self.tvm.attrs.get("mcpu", ""))
        return "x86" if mcpu in ("", codegen.llvm_get_system_cpu()) else f"x86:{mcpu}"

    def instruction_sets(self) -> list[str]:
        return llvm_instruction_sets(self.tvm)

    def runs_here(self) -> bool:
        """Its code runs here when this CPU has every instruction set of its ``mcpu`` (``x86:znver4``'s
        AVX-512 code does not run on a Zen 3)."""
        return not missing_instruction_sets(self.instruction_sets())

    def local(self) -> X86:
        return self if self.runs_here() else X86.host()

    def check_loadable(self, path: str, manifest: dict) -> None:
        """The instruction sets the manifest records must all be this CPU's: without the check, the first
        instruction this CPU lacks stops the process (SIGILL) in the middle of a run."""
        missing = missing_instruction_sets(manifest.get("instruction_sets", []))
        if missing:
            from tvm.target import codegen

            raise ArtifactError(f"{path}: built for {self.name} ({manifest.get('target', '')}); this CPU "
                                f"({codegen.llvm_get_system_cpu()}) lacks {', '.join(missing)}, so its code would "
                                "stop with an illegal instruction. Recompile it here (--target x86), or for a CPU "
                                "both machines are, e.g. --target x86:x86-64-v3 (any AVX2 CPU)")
