"""MetaSchedule tuning of the lookup kernels with TVM's XGBoost cost model, and reuse of its database.

Each tunable kernel role has a design space written as a schedule function with sampling instructions
(MetaSchedule ``ScheduleFn``), so the XGBoost model (``XGBModel``) learns which decisions pay:

* ``shuffle_lookup``: tiles of row blocks and of output tiles (``sample_perfect_tile``), which choose
  the loop order (which operand stays in cache) and the parallel axis, and an unroll annotation. The register tile (outputs per block) is part of the kernel itself and is tuned as
  separate workloads (``SHUFFLE_TILES``), the best of which is kept.
* ``accumulate`` (gather path): row and output tiles, parallel axis, vector width, unroll.

Records go to a ``JSONDatabase`` directory (``database_workload.json`` / ``database_tuning_record.json``)
that later compiles reuse (``LUTify(database=DIR)``, ``tvm-lut compile --db DIR``) and later tuning runs
extend. Tuning resumes: a kernel that already has ``trials`` valid records is skipped, one with fewer gets
only the missing trials (MetaSchedule's evolutionary search starts from the best records already there).

Tuning does not always beat the hand schedule (``cpu.schedule``): the design spaces do not contain it, and a
few trials may find nothing better. Each tuning run therefore also measures the hand schedule and the best
tuned kernel side by side and keeps both times in the database directory (``HAND_VS_TUNED``, keyed by the
kernel's structure and target); ``apply_database`` deploys a tuned kernel only where it measured faster.

Measurements run locally, or on a device farm (``RemoteDevices``: the servers registered under one key with a
TVM RPC tracker, ``tvm_lut.targets.farm``) through MetaSchedule's ``RPCRunner``, one worker per server: when a
server dies mid-run its trial fails, the others go on, and every completed record is already in the
database. For an aarch64 farm the candidates are cross-compiled here and uploaded as shared libraries. Two TVM 0.27 pitfalls are handled here (cookbook §4a): builder workers would import every
target's tensor intrinsics (~44 s each, so every build timed out): they are stubbed in the workers;
and the runner's random int32 arguments would send the gather kernel's table offsets out of bounds:
integer arguments are zero-filled (always in range) instead.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import types
from dataclasses import dataclass

import numpy as np
import tvm
import tvm_ffi
from tvm import tirx

from .kernels import KERNEL_ATTR

log = logging.getLogger("tvm_lut")

# the slow ones (CUDA alone parses 27 s of TVMScript); x86 stays: MetaSchedule's default x86 rules use
# its VNNI intrinsics when it tunes exact models
_UNUSED_INTRINSICS = ("cuda", "rocm", "hexagon", "metal", "riscv_cpu", "amdgpu")
SHUFFLE_TILES = (2, 4, 8)  # outputs per register tile, one workload each
HAND_VS_TUNED = "tvm_lut_hand_vs_tuned.json"  # in the database directory: both times per kernel


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


@dataclass(frozen=True)
class RemoteDevices:
    """Where tuning measures: the servers registered under ``key`` with the tracker at ``address``."""

    address: str  # HOST:PORT of the RPC tracker
    key: str  # device kind, e.g. "x86" or "arm64"
    session_timeout_s: int = 120

    def rpc_config(self):
        from tvm.s_tir import meta_schedule as ms

        host, _, port = self.address.rpartition(":")
        return ms.runner.RPCConfig(tracker_host=host, tracker_port=int(port), tracker_key=self.key,
                                   session_timeout_sec=self.session_timeout_s)

    def servers(self) -> int:
        return self.rpc_config().count_num_servers(allow_missing=True)


def _session_with_cpu_device(session):
    """MetaSchedule asks a session for device ``"llvm"``, which this tvm-ffi rejects: map it to ``"cpu"``
    (a subclass wrapping the session; patching the method kept sessions open until their timeout)."""
    from tvm.rpc.client import RPCSession

    class _Session(RPCSession):
        def __init__(self, inner):
            super().__init__(inner._sess)
            self._inner = inner

        def device(self, dev_type, dev_id=0):
            return super().device("cpu" if str(dev_type) == "llvm" else dev_type, dev_id)

    return _Session(session)


def rpc_create_session(rpc_config):
    return _session_with_cpu_device(rpc_config.connect_server())


def rpc_alloc_argument(session, device, args_info, alloc_repeat: int):
    """``alloc_argument`` for a remote device: integer buffers zero-filled, floats random, copied over RPC."""
    return alloc_argument(device, args_info, alloc_repeat)


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
    # the whole output row as one inner tile must be reachable: with a single outer tile nothing runs in
    # parallel, which is what a one-row (batch-1 dense) kernel needs (a thread launch costs ~6 us)
    m_extent = int(sch.get(m).extent)
    mo, mi = sch.split(m, sch.sample_perfect_tile(m, n=2, max_innermost_factor=max(64, min(m_extent, 256))))
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


def measure_us(func: tirx.PrimFunc, target, number: int = 20, farm: RemoteDevices | None = None) -> float:
    """Best of 3 repeats of ``number`` runs of a (scheduled) kernel, in microseconds: here, or on a server
    of ``farm``."""
    lib = tvm.compile(_workload(func), target)
    info = [["TENSOR", b.dtype, [int(d) for d in b.shape]] for b in func.params]
    if farm is None:
        dev = tvm.cpu()
        args = alloc_argument(dev, info, 1)[0]
        t = lib.mod.time_evaluator("main", dev, number=number, repeat=3)
        return min(t(*args).results) * 1e6
    import tempfile

    from tvm_lut import targets
    from tvm_lut.targets.farm import request

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.so")
        targets.resolve(target).export(lib, path)
        sess = request(farm.address, farm.key, farm.session_timeout_s)
        sess.upload(path, "tvm_lut_hand_kernel.so")
        rlib = sess.load_module("tvm_lut_hand_kernel.so")
        dev = sess.cpu()
        args = alloc_argument(dev, info, 1)[0]
        t = rlib.time_evaluator("main", dev, number=number, repeat=3)
        return min(t(*args).results) * 1e6


def valid_records(func: tirx.PrimFunc, db_dir: str) -> int:
    """Distinct schedules of ``func``'s workload measured successfully in the database (what a re-run
    resumes from). Distinct: MetaSchedule's search does not know what earlier runs measured, so on a
    small design space a re-run measures some candidates again; those are not new trials."""
    from tvm.s_tir import meta_schedule as ms

    if not os.path.isfile(os.path.join(db_dir, "database_workload.json")):
        return 0
    db = ms.database.JSONDatabase(work_dir=db_dir)
    mod = _workload(func)
    if not db.has_workload(mod):
        return 0
    wl = db.commit_workload(mod)
    return len({str(r.trace.as_json(remove_postproc=True)) for r in db.get_all_tuning_records()
                if r.workload.same_as(wl)  # JSONDatabase keeps one Workload object per structure
                if r.run_secs and all(float(s) < 1e9 for s in r.run_secs)})


class _task_logger:
    """A MetaSchedule task's logger for one tuning call: ``tvm_lut.tuning``, writing every trial's lines
    to ``DB/logs/tuning.log`` (as ``tune_tir``'s own loggers would) and nothing to the terminal; the file
    handler is closed on exit. No process-wide logging configuration is read or changed."""

    def __init__(self, db_dir: str):
        self.path = os.path.join(db_dir, "logs", "tuning.log")

    def __enter__(self) -> logging.Logger:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.logger = logging.getLogger("tvm_lut.tuning")
        self.logger.setLevel(logging.DEBUG)
        self.logger.propagate = False
        self.handler = logging.FileHandler(self.path, mode="a")
        self.handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(message)s", "%Y-%m-%d %H:%M:%S"))
        self.logger.addHandler(self.handler)
        return self.logger

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self.handler)
        self.handler.close()


def tune_kernel(func: tirx.PrimFunc, target, db_dir: str, trials: int, seed: int = 0,
                farm: RemoteDevices | None = None) -> int:
    """Tune one unscheduled kernel into the database at ``db_dir`` (appends to what is there), up to
    ``trials`` valid records in all; returns how many valid records this call added (0: already tuned,
    or a design space with no unmeasured candidate left; fewer than asked: trials lost with a dead
    server, or the space ran out)."""
    from tvm.s_tir import meta_schedule as ms

    stub_tensor_intrins()
    role = str(func.attrs[KERNEL_ATTR])
    os.makedirs(db_dir, exist_ok=True)
    before = valid_records(func, db_dir)
    todo = trials - before
    if todo <= 0:
        return 0
    workers = max(1, min(2, len(os.sched_getaffinity(0))))
    evaluator = ms.runner.EvaluatorConfig(number=5, repeat=1, min_repeat_ms=0)
    if farm is None:
        runner = ms.runner.LocalRunner(evaluator_config=evaluator, f_alloc_argument=alloc_argument,
                                       initializer=stub_tensor_intrins)
    else:
        servers = farm.servers()
        if servers < 1:
            from tvm_lut.errors import TargetError

            raise TargetError(f"no server with key {farm.key!r} is registered at {farm.address}")
        runner = ms.runner.RPCRunner(rpc_config=farm.rpc_config(), evaluator_config=evaluator,
                                     f_create_session=rpc_create_session, f_alloc_argument=rpc_alloc_argument,
                                     max_workers=servers, initializer=stub_tensor_intrins)
    from tvm_lut import targets

    export = targets.resolve(target).candidate_export
    strategy = ms.search_strategy.EvolutionarySearch(population_size=64, init_min_unmeasured=8, genetic_num_iters=1)
    space = ms.space_generator.ScheduleFn(SPACES[role], sch_rules=[], postprocs=[], mutator_probs={})
    with _task_logger(db_dir) as logger:
        # ``ms.tune_tir`` would name its task loggers through ``logging.config.dictConfig``, which reads the
        # name of every handler on the non-propagating "tvm.s_tir.meta_schedule" logger (an unnamed one,
        # such as pytest >= 9.1 attaches to every non-propagating logger, crashes its second call) and
        # closes every handler of the process, the user's too. The same task, built here with a logger of
        # our own, tunes without touching the process's logging.
        task = ms.TuneContext(mod=_workload(func), target=tvm.target.Target(target) if not isinstance(
            target, tvm.target.Target) else target, space_generator=space, search_strategy=strategy,
            task_name="main", rand_state=ms.utils.fork_seed(seed, n=1)[0], num_threads=workers, logger=logger).clone()
        ms.tune_tasks(
            tasks=[task], task_weights=[1.0], work_dir=db_dir, max_trials_global=todo,
            num_trials_per_iter=min(8, todo),
            builder=ms.builder.LocalBuilder(max_workers=workers, timeout_sec=60, initializer=stub_tensor_intrins,
                                            f_export=export),
            runner=runner,
            database=ms.database.JSONDatabase(work_dir=db_dir),
            cost_model=ms.cost_model.XGBModel(num_warmup_samples=0, extractor="per-store-feature"))
    return valid_records(func, db_dir) - before


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
                        seed: int = 0, farm: RemoteDevices | None = None) -> list[TuneResult]:
    """Tune every tunable kernel of a LUTified module (``LUTify(schedule=False)``) into ``db_dir``.

    Shuffle lookups are tuned once per register tile in ``SHUFFLE_TILES``, ``trials`` each. Returns one
    result per kernel: hand-schedule time vs the best tuned time, both measured here in one process.
    """
    from . import cpu, shuffle

    out = []
    funcs = [(gv.name_hint, f) for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc) and tunable(f)]
    for i, (name, func) in enumerate(funcs):
        role = str(func.attrs[KERNEL_ATTR])
        start = time.time()
        if progress:
            where = f" on {farm.key} servers at {farm.address}" if farm else ""
            print(f"[{i + 1}/{len(funcs)}] tuning {name} ({role}), up to {trials} trials per variant{where}",
                  file=sys.stderr, flush=True)
        hand_us = measure_us(cpu.schedule(func), target, farm=farm)
        variants = [func]
        if role == "shuffle_lookup":
            variants = [shuffle.retile(func, mb) for mb in SHUFFLE_TILES]
        best = None
        ran = 0
        for f in variants:
            ran += tune_kernel(f, target, db_dir, trials, seed, farm)
            got = best_from_database(f, target, db_dir)
            if got is not None and (best is None or got[1] < best[1]):
                best = got
        # the tuned kernel is re-measured the way the hand schedule was (MetaSchedule's own figure uses
        # fewer runs, which on tiny kernels is mostly call overhead)
        tuned_us = None if best is None else measure_us(best[0], target, farm=farm)
        res = TuneResult(name, role, hand_us, tuned_us, ran, time.time() - start)
        record_comparison(func, target, db_dir, name, hand_us, tuned_us)
        if progress:
            tuned = "no valid record" if res.tuned_us is None else f"{res.tuned_us:.1f} us ({res.speedup:.2f}x)"
            print(f"    hand schedule {hand_us:.1f} us, tuned {tuned}, {res.seconds:.0f} s", file=sys.stderr, flush=True)
        out.append(res)
    return out


def _comparison_key(func: tirx.PrimFunc, target) -> str:
    """The kernel (unscheduled, as LUTify builds it) and the target it was timed on."""
    tgt = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
    return f"{tvm_ffi.structural_hash(func):x}:{tgt.kind.name}:{tgt.attrs.get('mcpu', '')}"


def _read_comparisons(db_dir: str) -> dict:
    path = os.path.join(db_dir, HAND_VS_TUNED)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        log.warning("%s: unreadable (%s); tuned kernels are deployed without the hand-schedule check", path, e)
        return {}


def record_comparison(func: tirx.PrimFunc, target, db_dir: str, name: str, hand_us: float,
                      tuned_us: float | None) -> None:
    """Keep the hand-schedule and tuned times of ``func`` (unscheduled) in ``db_dir`` for
    ``apply_database``; written to a temporary file and renamed, so a killed run leaves the old file."""
    records = _read_comparisons(db_dir)
    records[_comparison_key(func, target)] = {"name": name, "role": str(func.attrs[KERNEL_ATTR]),
                                              "hand_us": hand_us, "tuned_us": tuned_us}
    path = os.path.join(db_dir, HAND_VS_TUNED)
    os.makedirs(db_dir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(records, f, indent=1)
    os.replace(path + ".tmp", path)


def best_tuned(func: tirx.PrimFunc, target, db_dir: str) -> tirx.PrimFunc | None:
    """The fastest tuned variant of an unscheduled kernel in ``db_dir`` (any register tile for shuffle
    lookups), or None when nothing was tuned for it; whether it beats the hand schedule is not checked."""
    from . import shuffle

    role = str(func.attrs[KERNEL_ATTR])
    variants = [shuffle.retile(func, mb) for mb in SHUFFLE_TILES] if role == "shuffle_lookup" else [func]
    found = [got for f in variants if (got := best_from_database(f, target, db_dir)) is not None]
    return min(found, key=lambda g: g[1])[0] if found else None


def apply_database(func: tirx.PrimFunc, target, db_dir: str) -> tirx.PrimFunc | None:
    """What to deploy for an unscheduled kernel from ``db_dir``: its fastest tuned variant, or None when
    nothing was tuned for it or when the tuning run measured the hand schedule faster
    (``record_comparison``): then the caller keeps the hand schedule."""
    best = best_tuned(func, target, db_dir)
    if best is None:
        return None
    seen = _read_comparisons(db_dir).get(_comparison_key(func, target))
    if seen is not None and (seen["tuned_us"] is None or seen["tuned_us"] >= seen["hand_us"]):
        log.info("%s: the hand schedule measured faster than the tuned kernel when it was tuned (%.1f vs %s us); "
                 "keeping the hand schedule", seen["name"], seen["hand_us"], seen["tuned_us"])
        return None
    return best
