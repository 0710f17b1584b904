"""The machine's table-lookup ceiling, measured: clock and byte-shuffle throughput of this core.

    python benchmarks/lookup_peak.py            # prints JSON

A lookup kernel's "fraction of the ceiling" needs the ceiling of *this* core, not a datasheet figure: how
many ``vpshufb`` / ``vpermb`` (+ ``vpdpbusd``) retire per cycle, and the clock they run at (a VM's
``/proc/cpuinfo`` shows the nominal clock; turbo runs higher). A small C loop of independent instructions
in inline assembly (no memory traffic) is compiled with the host C compiler (``cc -O2``) and timed:

* ``clock_ghz``: a chain of dependent 1-cycle register-register integer adds (not ``add $imm``: cores
  since Golden Cove fold chains of small immediate adds at rename, which read 6.3 GHz on a 3 GHz core);
* ``vpshufb_per_cycle`` (zmm, AVX-512BW): the nibble kernel's lookup, 64 lookups each;
* ``vpermb_vpdpbusd_per_cycle``: pairs of ``vpermb`` + ``vpdpbusd`` into 16 independent accumulators, the
  grouped kernel's inner step (64 lookups summed per pair);
* ``fma_per_cycle``: 512-bit ``vfmadd231ps`` into 16 independent accumulators (16 float multiply-adds
  each): the ceiling of an exact dense layer, and of the encoder's distance arithmetic.

Returns None where there is no C compiler or the CPU lacks AVX-512 VBMI/VNNI (the caller then falls back
to the nominal clock and one shuffle per cycle, and says so).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile

_SOURCE = r"""
#include <stdio.h>
#include <time.h>
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
#define CLOB "xmm0","xmm1","xmm2","xmm3","xmm4","xmm5","xmm6","xmm7","xmm8","xmm9","xmm10","xmm11","xmm12", \
  "xmm13","xmm14","xmm15","xmm16","xmm17","xmm18","xmm19","xmm20","xmm21","xmm22","xmm23","xmm24","xmm25", \
  "xmm26","xmm27","xmm28","xmm29","xmm30","xmm31"
int main(void){
  long n, N = 100000000; double t0;
  t0 = now(); n = N;
  __asm__ volatile("mov $1,%%rcx\n\t1:\n\tadd %%rcx,%%rax\n\tadd %%rcx,%%rax\n\tadd %%rcx,%%rax\n\tadd %%rcx,%%rax\n\t"
                   "dec %0\n\tjnz 1b" : "+r"(n) :: "rax", "rcx");
  double ghz = 4.0 * N / (now() - t0) / 1e9;
  N = 30000000; n = N; t0 = now();
  __asm__ volatile("vpxord %%zmm0,%%zmm0,%%zmm0\n\t1:\n\t" SHUF "dec %0\n\tjnz 1b" : "+r"(n) :: CLOB);
  double shuf = 12.0 * N / ((now() - t0) * ghz * 1e9);
  n = N; t0 = now();
  __asm__ volatile("vpxord %%zmm0,%%zmm0,%%zmm0\n\t1:\n\t" PERM "dec %0\n\tjnz 1b" : "+r"(n) :: CLOB);
  double perm = 16.0 * N / ((now() - t0) * ghz * 1e9);
  n = N; t0 = now();
  __asm__ volatile("vpxord %%zmm0,%%zmm0,%%zmm0\n\t1:\n\t" FMA "dec %0\n\tjnz 1b" : "+r"(n) :: CLOB);
  double fma = 16.0 * N / ((now() - t0) * ghz * 1e9);
  printf("{\"clock_ghz\": %.3f, \"vpshufb_per_cycle\": %.3f, \"vpermb_vpdpbusd_per_cycle\": %.3f, "
         "\"fma_per_cycle\": %.3f}\n", ghz, shuf, perm, fma);
  return 0;
}
"""


def _defines() -> str:
    shuf = "".join(f"vpshufb %%zmm0, %%zmm{r}, %%zmm{r}\\n\\t" for r in range(1, 13))
    perm = "".join(f"vpermb %%zmm{1 + i % 4}, %%zmm0, %%zmm{5 + i % 8}\\n\\tvpdpbusd %%zmm{5 + i % 8}, %%zmm13, %%zmm{16 + i}\\n\\t"
                   for i in range(16))
    fma = "".join(f"vfmadd231ps %%zmm1, %%zmm2, %%zmm{16 + i}\\n\\t" for i in range(16))
    return f'#define SHUF "{shuf}"\n#define PERM "{perm}"\n#define FMA "{fma}"\n'


def measure() -> dict | None:
    """Clock, shuffle and FMA throughput of this core, or None where they cannot be measured here."""
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = os.path.join(tmp, "peak.c"), os.path.join(tmp, "peak")
        with open(src, "w") as f:
            f.write(_defines() + _SOURCE)
        built = subprocess.run([cc, "-O2", "-mavx512bw", "-mavx512vbmi", "-mavx512vnni", src, "-o", exe],
                               capture_output=True, text=True)
        if built.returncode != 0:
            return None
        ran = subprocess.run([exe], capture_output=True, text=True)  # SIGILL without VBMI/VNNI
        if ran.returncode != 0:
            return None
        return json.loads(ran.stdout)


if __name__ == "__main__":
    print(json.dumps(measure()))
