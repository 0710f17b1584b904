"""The machine's table-lookup ceiling, measured: clock and byte-shuffle throughput of this core.

    python benchmarks/lookup_peak.py            # prints JSON

A lookup kernel's "fraction of the ceiling" needs the ceiling of *this* core, not a datasheet figure: how
many ``vpshufb`` / ``vpermb`` (+ ``vpdpbusd``) retire per cycle, and the clock they run at (a VM's
``/proc/cpuinfo`` shows the nominal clock; turbo runs higher). A small C loop of independent instructions
in inline assembly (no memory traffic) is compiled with the host C compiler (``cc -O2``) and timed:

* ``clock_ghz``: a chain of dependent 1-cycle register-register integer adds (not ``add $imm``: cores
  since Golden Cove fold chains of small immediate adds at rename, which read 6.3 GHz on a 3 GHz core);
* ``vpshufb_per_cycle`` (zmm, AVX-512BW; ymm on an AVX2-only core): the nibble kernel's lookup, 64 (32)
  lookups each;
* ``vpermb_vpdpbusd_per_cycle``: pairs of ``vpermb`` + ``vpdpbusd`` into 16 independent accumulators, the
  grouped kernel's inner step (64 lookups summed per pair); null without AVX-512 VBMI/VNNI;
* ``fma_per_cycle``: ``vfmadd231ps`` into independent accumulators, 512-bit (16 float multiply-adds each)
  or 256-bit on an AVX2-only core (8 each; ``vector_bits`` says which): the ceiling of an exact dense
  layer, and of the encoder's distance arithmetic.
* ``fma_broadcast_per_cycle``: the same FMAs, each with its own float read from memory and broadcast to
  every lane (AVX2: a ``vbroadcastss`` load per FMA; AVX-512: the FMA's embedded ``{1to16}`` broadcast):
  the inner step of the row-lane encoders (``kernels.encode``: 8 or 16 rows in the lanes, one centroid
  value broadcast per multiply-add), whose ceiling this is rather than ``fma_per_cycle``. On the Zen 3 VM
  this was written on it depends on the machine's state: 1.21-1.32 with FMAs alone at 1.74-1.76 in most
  runs, 2.00 for both in a quieter one.

The AVX-512 program is tried first, then the AVX2 one (measured on a Zen 3: 3.14 GHz, 1.98 ymm
``vpshufb`` and 2.04 ymm FMAs per cycle). Returns None where there is no C compiler or the CPU has
neither (the caller then falls back to the nominal clock and one shuffle per cycle, and says so).
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
#ifdef PERM
#define CLOB "xmm0","xmm1","xmm2","xmm3","xmm4","xmm5","xmm6","xmm7","xmm8","xmm9","xmm10","xmm11","xmm12", \
  "xmm13","xmm14","xmm15","xmm16","xmm17","xmm18","xmm19","xmm20","xmm21","xmm22","xmm23","xmm24","xmm25", \
  "xmm26","xmm27","xmm28","xmm29","xmm30","xmm31"
#else
#define CLOB "xmm0","xmm1","xmm2","xmm3","xmm4","xmm5","xmm6","xmm7","xmm8","xmm9","xmm10","xmm11","xmm12", \
  "xmm13","xmm14","xmm15"
#endif
int main(void){
  long n, N = 100000000; double t0;
  t0 = now(); n = N;
  __asm__ volatile("mov $1,%%rcx\n\t1:\n\tadd %%rcx,%%rax\n\tadd %%rcx,%%rax\n\tadd %%rcx,%%rax\n\tadd %%rcx,%%rax\n\t"
                   "dec %0\n\tjnz 1b" : "+r"(n) :: "rax", "rcx");
  double ghz = 4.0 * N / (now() - t0) / 1e9;
  N = 30000000; n = N; t0 = now();
  __asm__ volatile(ZERO "1:\n\t" SHUF "dec %0\n\tjnz 1b" : "+r"(n) :: CLOB);
  double shuf = 12.0 * N / ((now() - t0) * ghz * 1e9);
#ifdef PERM
  n = N; t0 = now();
  __asm__ volatile(ZERO "1:\n\t" PERM "dec %0\n\tjnz 1b" : "+r"(n) :: CLOB);
  double perm = 16.0 * N / ((now() - t0) * ghz * 1e9);
#else
  double perm = -1;
#endif
  n = N; t0 = now();
  __asm__ volatile(ZERO "1:\n\t" FMA "dec %0\n\tjnz 1b" : "+r"(n) :: CLOB);
  double fma = (double)FMAS * N / ((now() - t0) * ghz * 1e9);
  static float centroids[64] __attribute__((aligned(64)));
  for (int i = 0; i < 64; i++) centroids[i] = 0.5f;
  float *cp = centroids;
  n = N; t0 = now();
  __asm__ volatile(ZERO "1:\n\t" FMA_BCAST "dec %0\n\tjnz 1b" : "+r"(n) : "S"(cp) : CLOB);
  double fma_bcast = (double)FMAS * N / ((now() - t0) * ghz * 1e9);
  printf("{\"clock_ghz\": %.3f, \"vpshufb_per_cycle\": %.3f, \"fma_per_cycle\": %.3f, "
         "\"fma_broadcast_per_cycle\": %.3f, \"vector_bits\": %d, \"vpermb_vpdpbusd_per_cycle\": ",
         ghz, shuf, fma, fma_bcast, BITS);
  if (perm < 0) printf("null}\n"); else printf("%.3f}\n", perm);
  return 0;
}
"""


def _defines(bits: int) -> str:
    """The timed loops for 512-bit (AVX-512 BW/VBMI/VNNI: zmm) or 256-bit (AVX2: ymm, no vpermb) vectors."""
    r = "zmm" if bits == 512 else "ymm"
    shuf = "".join(f"vpshufb %%{r}0, %%{r}{i}, %%{r}{i}\\n\\t" for i in range(1, 13))
    accs = range(16) if bits == 512 else range(3, 15)  # ymm0-15 only: 12 accumulators
    fma = "".join(f"vfmadd231ps %%{r}1, %%{r}2, %%{r}{(16 if bits == 512 else 0) + i}\\n\\t" for i in accs)
    # one float per FMA from memory, broadcast: AVX2 loads it into one of three rotating temporaries
    # (ymm0, ymm1, ymm15: no false dependency between consecutive FMAs); AVX-512 embeds the broadcast
    if bits == 512:
        fma_bcast = "".join(f"vfmadd231ps {4 * i}(%%rsi)%{{1to16%}}, %%zmm2, %%zmm{16 + i}\\n\\t" for i in accs)
    else:
        fma_bcast = "".join(f"vbroadcastss {4 * i}(%%rsi), %%ymm{(0, 1, 15)[i % 3]}\\n\\t"
                            f"vfmadd231ps %%ymm{(0, 1, 15)[i % 3]}, %%ymm2, %%ymm{i}\\n\\t" for i in accs)
    out = (f'#define BITS {bits}\n#define FMAS {len(accs)}\n#define ZERO "vpxor %%xmm0,%%xmm0,%%xmm0\\n\\t"\n'
           f'#define SHUF "{shuf}"\n#define FMA "{fma}"\n#define FMA_BCAST "{fma_bcast}"\n')
    if bits == 512:
        perm = "".join(f"vpermb %%zmm{1 + i % 4}, %%zmm0, %%zmm{5 + i % 8}\\n\\tvpdpbusd %%zmm{5 + i % 8}, %%zmm13, %%zmm{16 + i}\\n\\t"
                       for i in range(16))
        out += f'#define PERM "{perm}"\n'
    return out


def measure() -> dict | None:
    """Clock, shuffle and FMA throughput of this core, or None where they cannot be measured here."""
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        for bits, flags in ((512, ["-mavx512bw", "-mavx512vbmi", "-mavx512vnni"]), (256, ["-mavx2", "-mfma"])):
            src, exe = os.path.join(tmp, f"peak{bits}.c"), os.path.join(tmp, f"peak{bits}")
            with open(src, "w") as f:
                f.write(_defines(bits) + _SOURCE)
            built = subprocess.run([cc, "-O2", *flags, src, "-o", exe], capture_output=True, text=True)
            if built.returncode != 0:
                continue
            ran = subprocess.run([exe], capture_output=True, text=True)  # SIGILL without the instructions
            if ran.returncode == 0:
                return json.loads(ran.stdout)
        return None


if __name__ == "__main__":
    print(json.dumps(measure()))
