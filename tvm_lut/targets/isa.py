"""What a CPU target's code may execute: its instruction sets, and the byte shuffle its table lookups use.

These are facts about targets, not kernels: the lookup kernel a layer gets (``base.Target.lookup_kernel``),
the ISA level a test expects and the instruction sets an artifact records all come from here; the kernels
(``tir_schedules.shuffle``) read the intrinsic and lane count of the ``ShuffleISA`` they are built for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import tvm


@dataclass(frozen=True)
class ShuffleISA:
    """A byte-shuffle instruction: how many rows one lookup covers and the LLVM intrinsic."""

    name: str
    lanes: int
    intrinsic: str
    features: tuple[str, ...] = ()  # LLVM features the target needs (default: ``name``)
    grouped: bool = False  # codes one per byte, 4 codebooks per lookup (``vpermb`` + ``vpdpbusd``)
    registers: int = 32  # vector registers (x86-64 without AVX-512: 16)


PERMUTE_INTRINSIC = "llvm.x86.avx512.permvar.qi.512"  # vpermb: 64-byte table, 6-bit byte indices
DOT_INTRINSIC = "llvm.x86.avx512.vpdpbusd.512"  # vpdpbusd: int32 += 4 adjacent u8 x s8 products

ISAS = (
    ShuffleISA("avx512vbmi", 64, PERMUTE_INTRINSIC, ("avx512vbmi", "avx512vnni"), grouped=True),
    ShuffleISA("avx512bw", 64, "llvm.x86.avx512.pshuf.b.512"),
    ShuffleISA("avx2", 32, "llvm.x86.avx2.pshuf.b", registers=16),
    ShuffleISA("ssse3", 16, "llvm.x86.ssse3.pshuf.b.128", registers=16),
    # AArch64 ``tbl`` (one-register table): an index >= 16 reads 0 where pshufb tests bit 7; our
    # indices are nibbles (0..15), so both compute the same lookup
    ShuffleISA("neon", 16, "llvm.aarch64.neon.tbl1.v16i8"),
)
def isa_for(target: tvm.target.Target, grouped: bool = True) -> ShuffleISA | None:
    """The widest byte shuffle ``target`` has, or None (then the gather accumulate is used).

    ``grouped=False`` skips the grouped (``vpermb``) kernel: the widest nibble-code ``pshufb`` the target has,
    e.g. to build ``lookup``'s default kernel for it (a 64-lane one needs AVX-512BW; LLVM aborts the process,
    with no Python error, when asked to select an intrinsic the target lacks)."""
    if str(target.kind.name) != "llvm":
        return None
    if str(target.attrs.get("mtriple", "")).startswith("aarch64"):
        return ISAS[-1]  # NEON is mandatory on AArch64
    from tvm.target import codegen

    for isa in ISAS[:-1]:
        if isa.grouped and not grouped:
            continue
        try:
            if all(codegen.target_has_features(f, target) for f in (isa.features or (isa.name,))):
                return isa
        except Exception:  # a target LLVM cannot describe (e.g. another architecture)
            return None
    return None



def host_target(num_cores: int | None = None) -> tvm.target.Target:
    """The LLVM target of this machine: ``mcpu`` from the host and ``num-cores`` for MetaSchedule."""
    cores = num_cores or len(os.sched_getaffinity(0))
    return tvm.target.Target(
        {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(), "num-cores": cores}
    )


# LLVM x86 feature names that are instruction sets (code using one stops with SIGILL on a CPU without it);
# llvm_get_cpu_features' other names ("fast-...", "macrofusion", "64bit") are tuning hints or always there
_ISA_PREFIXES = ("sse", "ssse3", "avx", "fma", "f16c", "bmi", "amx", "gfni", "vaes", "vpclmulqdq", "sha", "aes",
                 "pclmul", "popcnt", "lzcnt", "movbe", "adx")


def llvm_instruction_sets(target: tvm.target.Target) -> list[str]:
    """The x86 instruction-set extensions code built for ``target`` may use (its ``mcpu`` and ``mattr``)."""
    from tvm.target import codegen

    return sorted(f for f in codegen.llvm_get_cpu_features(target) if f.startswith(_ISA_PREFIXES))


def missing_instruction_sets(required) -> list[str]:
    """Which of ``required`` (names from ``llvm_instruction_sets``) this machine's CPU lacks."""
    have = set(llvm_instruction_sets(host_target()))
    return sorted(set(required) - have)
