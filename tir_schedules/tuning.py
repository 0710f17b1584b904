"""MetaSchedule tuning of the lookup kernels with TVM's XGBoost cost model, and reuse of its database.

Each tunable kernel role has a design space written as a schedule function with sampling instructions
(MetaSchedule ``ScheduleFn``), so the XGBoost model (``XGBModel``) learns which decisions pay:

* ``shuffle_lookup``: tiles of row blocks and of output tiles (``sample_perfect_tile``), which choose
  the loop order (which operand stays in cache) and the parallel axis, and an unroll annotation. The register tile (outputs per block) is part of the kernel itself and is tuned as
  separate workloads (``SHUFFLE_TILES``), the best of which is kept.
* ``accumulate`` (gather path): row and output tiles, parallel axis, vector width, unroll.

Records go to a ``JSONDatabase`` directory (``database_workload.json`` / ``database_tuning_record.json``)
that later compiles reuse (``LUTify(database=DIR)``, ``tvm-lut compile --db DIR``) and later tuning runs
extend. Two TVM 0.27 pitfalls are handled here (cookbook §4a): builder workers would import every
target's tensor intrinsics (~44 s each, so every build timed out): they are stubbed in the workers;
and the runner's random int32 arguments would send the gather kernel's table offsets out of bounds:
integer arguments are zero-filled (always in range) instead.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import types
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import tirx

from .kernels import KERNEL_ATTR

log = logging.getLogger("tvm_lut")

# the slow ones (CUDA alone parses 27 s of TVMScript); x86 stays: MetaSchedule's default x86 rules use
# its VNNI intrinsics when it tunes exact models
_UNUSED_INTRINSICS = ("cuda", "rocm", "hexagon", "metal", "riscv_cpu", "amdgpu")
SHUFFLE_TILES = (2, 4, 8)  # outputs per register tile, one workload each


def stub_tensor_intrins() -> None:
    """Keep MetaSchedule from parsing tensor intrinsics our kernels never use (44 s per process)."""
    for name in _UNUSED_INTRINSICS:
        full = f"tvm.s_tir.tensor_intrin.{name}"
        if full not in sys.modules:
            sys.modules[full] = types.ModuleType(full)


def alloc_argument(device, args_info, alloc_repeat: int):
    """Runner arguments: integer buffers zero-filled (codes / table offsets stay in range), floats random."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(alloc_repeat):
        args = []
        for info in args_info:
            _, dtype, shape = info
            if "int" in str(dtype):
                arr = np.zeros(shape, dtype=str(dtype))
            else:
                arr = rng.standard_normal(shape).astype(str(dtype))
            args.append(tvm.runtime.tensor(arr, device=device))
        out.append(args)
    return out


# ----------------------------------------------------------------------------------------------
# Design spaces
# ----------------------------------------------------------------------------------------------


def shuffle_space(sch: tvm.s_tir.Schedule) -> None:
    """Row blocks and output tiles each split in two (``sample_perfect_tile``), ordered
    ``rows_outer, tiles_outer, rows_inner, tiles_inner`` with the two outer loops fused and parallel: the
    split decisions choose the parallel axis (a factor of 1 drops an axis from it) and which operand stays
    in cache (inner rows reuse a tile's tables, inner tiles reuse a row block's codes); plus an unroll
    depth. No Python branches on sampled values: every decision replays in the trace."""
    blk = sch.get_sblock("lookup")
    b, ot = sch.get_loops(blk)
    bo, bi = sch.split(b, sch.sample_perfect_tile(b, n=2, max_innermost_factor=16))
    oo, oi = sch.split(ot, sch.sample_perfect_tile(ot, n=2, max_innermost_factor=16))
    sch.reorder(bo, oo, bi, oi)
    sch.parallel(sch.fuse(bo, oo))
    sch.annotate(blk, "pragma_auto_unroll_max_step", sch.sample_categorical([0, 16, 64], [0.34, 0.33, 0.33]))
    sch.annotate(blk, "pragma_unroll_explicit", 1)


def accumulate_space(sch: tvm.s_tir.Schedule) -> None:
    """Gather accumulate: row and output tiles, parallel over both outer loops, vector over the inner
    outputs, codebooks in between."""
    blk = sch.get_sblock("acc")
    n, m, c = sch.get_loops(blk)
    no, ni = sch.split(n, sch.sample_perfect_tile(n, n=2, max_innermost_factor=16))
    mo, mi = sch.split(m, sch.sample_perfect_tile(m, n=2, max_innermost_factor=64))
    sch.reorder(no, mo, ni, c, mi)
    sch.parallel(sch.fuse(no, mo))
    sch.vectorize(mi)
    init = sch.decompose_reduction(blk, c)
    sch.vectorize(sch.get_loops(init)[-1])


SPACES = {"shuffle_lookup": shuffle_space, "accumulate": accumulate_space}


def tunable(func: tirx.PrimFunc) -> bool:
    return func.attrs is not None and KERNEL_ATTR in func.attrs and str(func.attrs[KERNEL_ATTR]) in SPACES


def _workload(func: tirx.PrimFunc) -> tvm.IRModule:
    return tvm.IRModule({"main": func.with_attr("global_symbol", "main")})


# ----------------------------------------------------------------------------------------------
# Tuning and reuse
# ----------------------------------------------------------------------------------------------


@dataclass
class TuneResult:
    name: str
    role: str
    hand_us: float
    tuned_us: float | None
    trials: int
    seconds: float

    @property
    def speedup(self) -> float | None:
        return None if not self.tuned_us else self.hand_us / self.tuned_us


def measure_us(func: tirx.PrimFunc, target, number: int = 20) -> float:
    lib = tvm.compile(_workload(func), target)
    dev = tvm.cpu()
    args = alloc_argument(dev, [["TENSOR", b.dtype, [int(d) for d in b.shape]]
                                for b in func.params], 1)[0]
    t = lib.mod.time_evaluator("main", dev, number=number, repeat=3)
    return min(t(*args).results) * 1e6


def tune_kernel(func: tirx.PrimFunc, target, db_dir: str, trials: int, seed: int = 0) -> None:
    """Tune one unscheduled kernel into the database at ``db_dir`` (appends to what is there)."""
    from tvm.s_tir import meta_schedule as ms

    stub_tensor_intrins()
    role = str(func.attrs[KERNEL_ATTR])
    os.makedirs(db_dir, exist_ok=True)
    workers = max(1, min(2, len(os.sched_getaffinity(0))))
    ms.tune_tir(
        _workload(func), target, db_dir, max_trials_global=trials, num_trials_per_iter=min(8, trials),
        builder=ms.builder.LocalBuilder(max_workers=workers, timeout_sec=60, initializer=stub_tensor_intrins),
        runner=ms.runner.LocalRunner(
            evaluator_config=ms.runner.EvaluatorConfig(number=5, repeat=1, min_repeat_ms=0),
            f_alloc_argument=alloc_argument, initializer=stub_tensor_intrins),
        database=ms.database.JSONDatabase(work_dir=db_dir),
        cost_model=ms.cost_model.XGBModel(num_warmup_samples=0, extractor="per-store-feature"),
        strategy=ms.search_strategy.EvolutionarySearch(population_size=64, init_min_unmeasured=8,
                                                       genetic_num_iters=1),
        space=ms.space_generator.ScheduleFn(SPACES[role], sch_rules=[], postprocs=[], mutator_probs={}),
        num_tuning_cores=workers, seed=seed)


def best_from_database(func: tirx.PrimFunc, target, db_dir: str) -> tuple[tirx.PrimFunc, float] | None:
    """The tuned kernel for ``func`` (unscheduled, as the kernels module builds it) and its measured time
    in seconds, or None when the database has no valid record for it."""
    from tvm.s_tir import meta_schedule as ms

    if not os.path.isfile(os.path.join(db_dir, "database_workload.json")):
        return None
    db = ms.database.JSONDatabase(work_dir=db_dir)
    mod = _workload(func)
    if not db.has_workload(mod):
        return None
    records = db.get_top_k(db.commit_workload(mod), 1)
    if not records or not records[0].run_secs:
        return None
    sch = db.query_schedule(mod, tvm.target.Target(target) if not isinstance(target, tvm.target.Target) else target,
                            workload_name="main")
    if sch is None:
        return None
    secs = float(np.mean([float(s) for s in records[0].run_secs]))
    return sch.mod["main"].with_attr("tirx.is_scheduled", True).without_attr("global_symbol"), secs


def tune_module_kernels(mod: tvm.IRModule, target, db_dir: str, trials: int, progress: bool = True,
                        seed: int = 0) -> list[TuneResult]:
    """Tune every tunable kernel of a LUTified module (``LUTify(schedule=False)``) into ``db_dir``.

    Shuffle lookups are tuned once per register tile in ``SHUFFLE_TILES``, ``trials`` each. Returns one
    result per kernel: hand-schedule time vs the best tuned time, both measured here in one process.
    """
    from . import shuffle, x86

    out = []
    funcs = [(gv.name_hint, f) for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc) and tunable(f)]
    for i, (name, func) in enumerate(funcs):
        role = str(func.attrs[KERNEL_ATTR])
        start = time.time()
        if progress:
            print(f"[{i + 1}/{len(funcs)}] tuning {name} ({role}), {trials} trials", file=sys.stderr, flush=True)
        hand_us = measure_us(x86.schedule(func), target)
        variants = [func]
        if role == "shuffle_lookup":
            variants = [shuffle.retile(func, mb) for mb in SHUFFLE_TILES]
        best = None
        for f in variants:
            tune_kernel(f, target, db_dir, trials, seed)
            got = best_from_database(f, target, db_dir)
            if got is not None and (best is None or got[1] < best):
                best = got[1]
        res = TuneResult(name, role, hand_us, None if best is None else best * 1e6, trials * len(variants),
                         time.time() - start)
        if progress:
            tuned = "no valid record" if res.tuned_us is None else f"{res.tuned_us:.1f} us ({res.speedup:.2f}x)"
            print(f"    hand schedule {hand_us:.1f} us, tuned {tuned}, {res.seconds:.0f} s", file=sys.stderr, flush=True)
        out.append(res)
    return out


def apply_database(func: tirx.PrimFunc, target, db_dir: str) -> tirx.PrimFunc | None:
    """The fastest tuned variant of an unscheduled kernel from ``db_dir`` (any register tile for shuffle
    lookups), or None when nothing was tuned for it."""
    from . import shuffle

    role = str(func.attrs[KERNEL_ATTR])
    variants = [shuffle.retile(func, mb) for mb in SHUFFLE_TILES] if role == "shuffle_lookup" else [func]
    found = [got for f in variants if (got := best_from_database(f, target, db_dir)) is not None]
    if not found:
        return None
    return min(found, key=lambda g: g[1])[0]
