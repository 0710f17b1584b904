"""Every x86 ISA level the lookup kernels have, on whatever x86 machine the suite runs.

The suite runs on machines that differ from session to session (AVX2-only Zen 3, AMD and Intel AVX-512,
with or without VBMI). A test that hard-codes one machine's decision passes there and fails elsewhere. Here
each level is forced through the target (``x86:CPU``, an LLVM CPU name that has exactly that level's byte
shuffle), so one machine exercises what every other would pick:

* the kernel LUTify chooses for each layer is the one ``Target.lookup_kernel`` decides for that target, and
  the widest shuffle of the level is taken where the layer has the rows for it;
* where this CPU runs the level's code, the compiled model gives the emulator's outputs bit for bit (the
  emulator rounds as the level's code does: once per fused multiply-add, twice where the CPU has no FMA);
* on every level, runnable here or not, the lookup kernels are compiled for it and their assembly holds
  that level's shuffle instruction on that level's vector registers (``vpermb`` on zmm for VBMI, ``vpshufb``
  on zmm/ymm, ``pshufb`` on xmm), so a kernel this host cannot run is still built and inspected.
"""

import numpy as np
import pytest
import torch
import tvm
from torch import nn

import tvm_lut
from tir_schedules import shuffle
from tir_schedules.kernels import KERNEL_ATTR
from tvm_lut import targets
from tvm_lut.targets import resolve_target

# level (ShuffleISA name) -> an LLVM CPU whose widest byte shuffle is that level's, and the instruction
# and register class its lookup kernel must compile to
LEVELS = {
    "avx512vbmi": ("icelake-server", "vpermb", "zmm"),
    "avx512bw": ("skylake-avx512", "vpshufb", "zmm"),
    "avx2": ("haswell", "vpshufb", "ymm"),
    "ssse3": ("x86-64-v2", "pshufb", "xmm"),
}
BATCH = 24  # conv: 24 x 64 rows (shuffle everywhere); dense: 24 rows (gather on 64 lanes, shuffle on 32/16)


def test_levels_cover_every_x86_shuffle_isa():
    assert sorted(LEVELS) == sorted(i.name for i in shuffle.ISAS if i.name != "neon")
    for name, (mcpu, _, _) in LEVELS.items():
        assert shuffle.isa_for(resolve_target(f"x86:{mcpu}")).name == name


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 24, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(24 * 64, 40)).eval()
    x = np.random.default_rng(0).standard_normal((96, 4, 8, 8)).astype(np.float32)
    return model, x


def _asm_of_lookups(lut, target) -> list[str]:
    """The assembly of each table-readout kernel of ``lut`` compiled alone for ``target`` (no run)."""
    out = []
    for gv, f in lut.functions.items():
        if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and KERNEL_ATTR in f.attrs \
                and str(f.attrs[KERNEL_ATTR]) == "shuffle_lookup":
            lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target)
            out.append(lib.mod.inspect_source("s"))
    return out


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_each_isa_level_takes_its_kernel_and_matches_the_emulator(level):
    mcpu, instr, reg = LEVELS[level]
    name = f"x86:{mcpu}"
    tgt = resolve_target(name)
    model, x = _model()
    mod = tvm_lut.from_torch(model, torch.from_numpy(x[:BATCH]))
    p = tvm_lut.LUTify(calibration=x, progress=False, all_layers=True, target=name)
    res = p.run(mod)
    lut = res.module
    rows = {"0": BATCH * 64, "3": BATCH}
    kinds = {r["name"]: r["kernel"] for r in res.layers}
    for r in res.layers:  # the pass takes the decision the public rule makes for this target
        assert r["kernel"] == targets.resolve(tgt).lookup_kernel("auto", r["k"], rows[r["name"]], r["kind"], r["distance"]), r
    assert kinds["0"] == f"shuffle-{level}"  # the conv has the rows for this level's widest shuffle
    lanes = shuffle.isa_for(tgt).lanes
    assert kinds["3"] == ("gather" if BATCH < lanes // 2 else f"shuffle-{level}")

    asm = _asm_of_lookups(lut, tgt)
    assert len(asm) == sum(k.startswith("shuffle") for k in kinds.values())
    for text in asm:  # the level's shuffle on the level's registers, compiled whether or not it runs here
        hits = [ln for ln in text.splitlines() if ln.strip().startswith(instr + "\t") or ln.strip().startswith(instr + " ")]
        assert hits and all(f"%{reg}" in ln for ln in hits), (level, hits[:3])

    if not targets.resolve(name).runs_here():
        return  # this CPU lacks the level's instructions: compiled and inspected above, not run
    vm = tvm.relax.VirtualMachine(tvm_lut.build(lut, target=name), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x[:BATCH])).numpy()
    from tvm_lut.math import pq

    fused = tvm.target.codegen.target_has_features("fma", tgt)  # x86-64-v2 has no FMA: two roundings
    conv = res.pq_layers["0"].emulate(pq.im2col(x[:BATCH], (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)), fused)
    flat = np.maximum(conv, 0).reshape(BATCH, 8, 8, 24).transpose(0, 3, 1, 2).reshape(BATCH, -1)
    ref = res.pq_layers["3"].emulate(flat, fused)
    np.testing.assert_array_equal(got, ref)  # bit for bit (the emulator rounds as the compiled code does)
