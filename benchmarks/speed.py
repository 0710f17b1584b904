"""Speed of the LUT kernels and models against exact TVM (untuned and MetaSchedule-tuned), PyTorch eager
and ONNX Runtime, side by side in one run on this machine.

    python benchmarks/speed.py [--quick] [--trials 64] [--threads 1,2] [--only kernel,e2e]

Phase 1 (this process) builds every variant once and exports it (``benchmarks/results/cache/speed/<out
name>``, emptied first: every tuning database starts empty):

* kernel level, one linear layer ``x (N, D) @ W (D, M)`` (K=16, V=4 so C=D/4), on the issue's shapes
  (N=1024, D in {256, 576, 1152}, M in {64, 128, 256}) and MADDNESS's (N=1024, D=128, M=256, C=32);
  D=576 and 1152 also at V=9 (C=D/9): they are the im2col widths of 3x3 convs over 64 and 128 channels,
  which LUT-NN, and LUTify by default, split one input channel's 3x3 patch per subspace. The exact
  baselines of a shape are built once for both V:
  the LUT layer as deployed (packed-code encoder + shuffle lookup + transpose to (N, M)), the LUT
  kernels alone (encoder + lookup, hand schedule and tuned), the deployed layer's kernels called back to
  back on preallocated buffers (how MADDNESS's harness times its kernels: RESEARCH.md §6 is compared at
  its shape), TVM's exact dense untuned and tuned with
  MetaSchedule/XGBoost with the same trial budget as the LUT kernels, and ``torch.nn.functional.linear``;
* end to end: a ResNet-18-class CIFAR model (64-512 channels), a ResNet-20-class one (16-64) and LeNet-5
  (random weights: speed does not depend on them), batch 1 and 32: LUT model (every conv/dense but the
  first conv; narrow layers with M <= K=16, i.e. the 10-way classifiers, stay exact as LUTify's default),
  exact TVM default build, exact TVM tuned
  (MetaSchedule over all its tasks, ``--e2e-trials`` per task), PyTorch eager and ONNX Runtime.

Phase 2 measures everything in one fresh subprocess per thread count (``TVM_NUM_THREADS``, torch and ORT
set to the same count), so 1- and 2-thread figures come from the same builds. Times are medians of
repeated runs in ms; machines are noisy, so read the ratios within one run. Writes JSON, a markdown
table and a PNG next to it (``benchmarks/results/speed.*``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from maddness_layouts import MADDNESS_US  # noqa: E402

CACHE = os.path.join(HERE, "results", "cache", "speed")

KERNEL_SHAPES = [(1024, d, m, 4) for d in (256, 576, 1152) for m in (64, 128, 256)] + [(1024, 128, 256, 4)] + [
    (1024, d, m, 9) for d in (576, 1152) for m in (64, 128, 256)]  # (N, D, M, V)
QUICK_KERNEL_SHAPES = [(1024, 256, 128, 4), (1024, 128, 256, 4)]
MADDNESS_SHAPE = (1024, 128, 256, 32)  # N, D, M, C of RESEARCH.md §6's peer measurement (MADDNESS_US)
SHUFFLE_CEILING_PER_CYCLE = 1  # fallback where lookup_peak cannot measure the core: 1 shuffle/cycle, nominal clock


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------
# Phase 1: build
# ----------------------------------------------------------------------------------------------


def export_build(ex, params, inputs, path: str) -> dict:
    """Export an executable, its weight arguments and sample inputs; returns the entry the worker reads."""
    ex.export_library(path + ".so")
    np.savez(path + ".npz", **{f"p{i}": v for i, (_, v) in enumerate(params)},
             **{f"x{i}": v for i, v in enumerate(inputs)})
    return {"so": path + ".so", "npz": path + ".npz", "n_params": len(params), "n_inputs": len(inputs)}


def _stub_builder():
    from tvm.s_tir import meta_schedule as ms

    from tir_schedules import tuning

    tuning.stub_tensor_intrins()
    return ms.builder.LocalBuilder(max_workers=2, timeout_sec=90, initializer=tuning.stub_tensor_intrins)


def tune_model(mod, target, work_dir: str, trials_per_task: int):
    """MetaSchedule (XGBoost) tuning of a model's ops, then a build using the tuned kernels.

    Exact models: every task. LUT models: every task except tvm-lut's own kernels (hand-scheduled or
    tuned by ``tvm-lut tune``), so the LUT model's remaining exact layers and elementwise ops get the same
    tuning budget as the exact model's. Returns (executable, params, number of tasks tuned)."""
    import tvm
    from tvm import relax, tirx
    from tvm.s_tir import meta_schedule as ms

    from tir_schedules.kernels import KERNEL_ATTR
    from tvm_lut.runtime.build import split_params

    def ours(task) -> bool:
        return any(isinstance(f, tirx.PrimFunc) and f.attrs is not None and KERNEL_ATTR in f.attrs
                   for f in task.dispatched[0].functions.values())

    stripped, params = split_params(mod)
    fused = relax.get_pipeline("zero")(stripped)  # legalize + fuse: the tasks MetaSchedule tunes
    tasks = [t for t in ms.relax_integration.extract_tasks(fused, target) if not ours(t)]
    os.makedirs(work_dir, exist_ok=True)
    db = ms.database.JSONDatabase(work_dir=work_dir)
    if tasks:
        ctxs, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            tasks, work_dir, strategy=ms.search_strategy.EvolutionarySearch(
                population_size=64, init_min_unmeasured=8, genetic_num_iters=1), num_threads=2, seed=0)
        db = ms.tune_tasks(
            tasks=ctxs, task_weights=weights, work_dir=work_dir, max_trials_global=trials_per_task * len(ctxs),
            max_trials_per_task=trials_per_task, num_trials_per_iter=min(16, trials_per_task),
            builder=_stub_builder(),
            runner=ms.runner.LocalRunner(evaluator_config=ms.runner.EvaluatorConfig(number=3, repeat=1,
                                                                                     min_repeat_ms=0)),
            cost_model=ms.cost_model.XGBModel(num_warmup_samples=0, extractor="per-store-feature"),
            database=db)
    # the zero pipeline applies the database (MetaScheduleApplyDatabase) when one is current
    with target, db, tvm.transform.PassContext(opt_level=3):
        built = relax.get_pipeline("zero")(stripped)
    return tvm.compile(built, target), params, len(tasks)


def _lut_layer_kernels(lut_mod):
    from tvm import tirx

    from tir_schedules.kernels import KERNEL_ATTR

    return {str(f.attrs[KERNEL_ATTR]): f for _, f in lut_mod.functions.items()
            if isinstance(f, tirx.PrimFunc) and f.attrs is not None and KERNEL_ATTR in f.attrs}


def _kernel_chain(mod, path: str) -> dict | None:
    """The LUT layer's ``main`` as the chain of ``call_tir`` kernels it runs (``rewrite.kernel_calls_between``),
    for timing the kernels back to back outside the VM: ``{"calls": [{"name", "args", "shape", "dtype"}],
    "npz"}`` where each argument is ``["input", 0]``, ``["const", key]`` (saved in ``path + ".npz"``) or
    ``["call", j]`` (call j's output). None when ``main`` is anything but such a chain."""
    from relay_passes import rewrite

    func = mod["main"]
    bound = {b.var: b.value for block in func.body.blocks for b in block.bindings}
    calls = rewrite.kernel_calls_between(bound.get, func.params[0], func.body.body)
    if calls is None:
        return None
    consts: dict[str, np.ndarray] = {}

    def arg(a):
        if isinstance(a, rewrite.LayerInput):
            return ["input", 0]
        if isinstance(a, int):
            return ["call", a]
        consts[f"c{len(consts)}"] = a.numpy()
        return ["const", f"c{len(consts) - 1}"]

    out = [{"name": c.name, "args": [arg(a) for a in c.args], "shape": list(c.shape), "dtype": c.dtype}
           for c in calls]
    np.savez(path + ".npz", **consts)
    return {"calls": out, "npz": path + ".npz"}


def parse_shapes(text: str) -> list[tuple[int, int, int, int]]:
    """``--shapes``: comma-separated ``N:D:M`` (V=4) or ``N:D:M:V``."""
    shapes = []
    for item in text.split(","):
        try:
            fields = [int(f) for f in item.split(":")]
        except ValueError:
            fields = []
        if len(fields) not in (3, 4) or min(fields) < 1:
            raise SystemExit(f"--shapes: {item!r} is not N:D:M or N:D:M:V (positive integers)")
        shapes.append((*fields, 4) if len(fields) == 3 else tuple(fields))
    return shapes


def build_kernels(shapes, trials: int, target, cache: str) -> list[dict]:
    import torch
    from torch import nn

    import tvm_lut
    from tir_schedules import cpu, shuffle, tuning
    from tvm_lut.runtime.build import compile_with_params

    out = []
    exact: dict[tuple[int, int, int], dict] = {}  # (N, D, M) -> its exact builds, shared by every V
    for n, d, m, v in shapes:
        tag = f"linear_n{n}_d{d}_m{m}"
        _log(f"kernel {tag} V={v}: building")
        torch.manual_seed(0)
        layer = nn.Linear(d, m).eval()
        x = np.random.default_rng(d * 1000 + m).standard_normal((n, d)).astype(np.float32)
        mod = tvm_lut.from_torch(layer, torch.from_numpy(x))
        entry = {"N": n, "D": d, "M": m, "V": v, "C": -(-d // v), "K": 16, "torch": {"d": d, "m": m, "n": n}}
        # the two kernels alone: hand schedule vs tuned (same trial budget as the exact dense)
        ks = _lut_layer_kernels(tvm_lut.LUTify(calibration=x, all_layers=True, v=v, progress=False, target=target,
                                               schedule=False)(mod))
        db = os.path.join(cache, "db_lut")
        entry["kernels"] = {}
        for role, f in ks.items():
            rec = {"hand_us": tuning.measure_us(cpu.schedule(f), target)}
            if role in tuning.SPACES and trials:
                t0 = time.time()
                variants = ([shuffle.retile(f, mb) for mb in tuning.SHUFFLE_TILES]
                            if role == "shuffle_lookup" else [f])
                for variant in variants:
                    if tuning.best_from_database(variant, target, db) is None:
                        tuning.tune_kernel(variant, target, db, trials)
                best = tuning.best_tuned(f, target, db)
                rec["tuned_us"] = tuning.measure_us(best, target) if best is not None else None
                # LUTify(database=...) below deploys the tuned kernel only where it measured faster
                tuning.record_comparison(f, target, db, role, rec["hand_us"], rec["tuned_us"])
                rec["deployed"] = "tuned" if tuning.apply_database(f, target, db) is not None else "hand"
                rec["tuned_tile"] = shuffle.tile_of(best) if best is not None and role == "shuffle_lookup" else None
                rec["tuning_s"] = time.time() - t0
                rec["trials"] = trials * len(variants)
            entry["kernels"][role] = rec
        # the LUT layer as deployed: tuned kernels where the database has them
        p = tvm_lut.LUTify(calibration=x, all_layers=True, v=v, progress=False, target=target,
                           database=db if trials else None)
        p_res = p.run(mod)
        lut = p_res.module
        entry["lut_kernel"] = p_res.layers[0]["kernel"]
        ex, params = compile_with_params(lut, target)
        entry["lut_layer"] = export_build(ex, params, [x], os.path.join(cache, f"{tag}_v{v}_lut"))
        entry["lut_layer"]["chain"] = _kernel_chain(lut, os.path.join(cache, f"{tag}_v{v}_lut_chain"))
        if (n, d, m) not in exact:  # exact dense: untuned and tuned
            ex, params = compile_with_params(mod, target)
            exact[n, d, m] = {"tvm_untuned": export_build(ex, params, [x], os.path.join(cache, tag + "_exact"))}
            if trials:
                t0 = time.time()
                ex, params, _ = tune_model(mod, target, os.path.join(cache, "db_exact_" + tag), trials)
                exact[n, d, m]["tvm_tuning_s"] = time.time() - t0
                exact[n, d, m]["tvm_tuned"] = export_build(ex, params, [x], os.path.join(cache, tag + "_exact_tuned"))
        entry.update(exact[n, d, m])
        out.append(entry)
    return out


E2E = {  # name: (models class, constructor kwargs, input shape, layers kept exact)
    "ResNet-18 (CIFAR)": ("CifarResNet", {"widths": [64, 128, 256, 512], "blocks": 2}, (3, 32, 32), ["conv1"]),
    "ResNet-20 (CIFAR)": ("CifarResNet", {}, (3, 32, 32), ["conv1"]),
    "LeNet-5 (MNIST)": ("LeNet5", {}, (1, 28, 28), []),
}


def _make_model(cls_name: str, kwargs: dict):
    import torch

    from tvm_lut.train import models

    torch.manual_seed(0)
    return getattr(models, cls_name)(**kwargs).eval()


def build_e2e(names, batches, e2e_trials: int, target, cache: str) -> list[dict]:
    import torch

    import tvm_lut
    from tvm_lut.runtime.build import compile_with_params

    out = []
    rng = np.random.default_rng(1)
    for name in names:
        cls_name, kwargs, shape, exclude = E2E[name]
        model = _make_model(cls_name, kwargs)
        calib = rng.standard_normal((256, *shape)).astype(np.float32)
        for batch in batches:
            tag = f"{name.split(' ')[0]}_b{batch}"
            _log(f"end to end {name} batch {batch}: building")
            x = calib[:batch]
            mod = tvm_lut.from_torch(model, torch.from_numpy(x))
            p = tvm_lut.LUTify(calibration=calib, progress=False, target=target,
                               layers={e: "exact" for e in exclude})
            p_res = p.run(mod)
            lut = p_res.module
            entry = {"model": name, "batch": batch, "class": cls_name, "kwargs": kwargs, "shape": list(shape),
                     "lut_layers": sum(r["method"] == "pq" for r in p_res.layers), "layers": len(p_res.layers),
                     "kernels": sorted({r.get("kernel", "") for r in p_res.layers if r["method"] == "pq"})}
            ex, params = compile_with_params(lut, target)
            entry["lut"] = export_build(ex, params, [x], os.path.join(cache, tag + "_lut"))
            ex, params = compile_with_params(mod, target)
            entry["tvm_untuned"] = export_build(ex, params, [x], os.path.join(cache, tag + "_exact"))
            if e2e_trials:
                t0 = time.time()
                ex, params, n_tasks = tune_model(mod, target, os.path.join(cache, "db_exact_" + tag), e2e_trials)
                entry["tvm_tuning_s"], entry["tvm_tasks"] = time.time() - t0, n_tasks
                entry["tvm_tuned"] = export_build(ex, params, [x], os.path.join(cache, tag + "_exact_tuned"))
                t0 = time.time()
                ex, params, n_tasks = tune_model(lut, target, os.path.join(cache, "db_lutrest_" + tag), e2e_trials)
                entry["lut_rest_tuning_s"], entry["lut_rest_tasks"] = time.time() - t0, n_tasks
                entry["lut_tuned"] = export_build(ex, params, [x], os.path.join(cache, tag + "_lut_tuned"))
            onnx_path = os.path.join(cache, tag + ".onnx")
            torch.onnx.export(model, (torch.from_numpy(x),), onnx_path, input_names=["x"], output_names=["y"],
                              dynamo=False)
            entry["onnx"] = onnx_path
            np.save(os.path.join(cache, tag + "_x.npy"), x)
            entry["x"] = os.path.join(cache, tag + "_x.npy")
            out.append(entry)
    return out


# ----------------------------------------------------------------------------------------------
# Phase 2: measure (one subprocess per thread count)
# ----------------------------------------------------------------------------------------------


def _load(art: dict):
    """An exported build (``_export``): its library, a VM over it, and its sample inputs and weights as
    device tensors."""
    import tvm
    from tvm import relax

    dev = tvm.cpu()
    lib = tvm.runtime.load_module(art["so"])
    data = np.load(art["npz"])
    inputs = [tvm.runtime.tensor(data[f"x{i}"], dev) for i in range(art["n_inputs"])]
    params = [tvm.runtime.tensor(data[f"p{i}"], dev) for i in range(art["n_params"])]
    return lib, relax.VirtualMachine(lib, dev), inputs, params


def tvm_ms(art: dict, number: int = 20) -> float:
    import tvm

    _, vm, inputs, params = _load(art)
    args = inputs + params
    vm["main"](*args)
    once = time.perf_counter()
    vm["main"](*args)
    once = time.perf_counter() - once
    number = int(min(max(0.3 / max(once, 1e-6), 1), 2000))
    res = vm.time_evaluator("main", tvm.cpu(), number=number, repeat=5)(*args)
    return float(np.median(res.results) * 1e3)


def _chain_ms(art: dict) -> float | None:
    """The deployed layer's kernels called back to back on preallocated buffers (one output buffer, as a
    C++ harness like MADDNESS's calls its kernels), from the layer's own ``.so``; checked against the VM."""
    import tvm

    from relay_passes import latency, rewrite

    chain = art.get("chain")
    if not chain:
        return None
    dev = tvm.cpu()
    lib, vm, inputs, params = _load(art)
    consts = np.load(chain["npz"])
    x = inputs[0].numpy()
    calls = [rewrite.KernelCall(c["name"], tuple(rewrite.LayerInput(x.shape) if a[0] == "input" else a[1]
                                                 if a[0] == "call" else tvm.runtime.tensor(consts[a[1]], dev)
                                                 for a in c["args"]), tuple(c["shape"]), c["dtype"])
             for c in chain["calls"]]
    steps = [(m.get_function(name), args) for m, name, args in latency.kernel_steps(lib, calls, x)]

    def run():
        for f, args in steps:
            f(*args)

    run()
    want = vm["main"](*inputs, *params).numpy()
    if not np.array_equal(steps[-1][1][-1].numpy(), want):
        raise RuntimeError(f"{art['so']}: its kernels called back to back do not reproduce the VM's output")
    return median_ms(run)


def median_ms(fn, budget_s: float = 0.3) -> float:
    fn()
    t = time.perf_counter()
    fn()
    once = time.perf_counter() - t
    number = int(min(max(budget_s / max(once, 1e-6), 1), 2000))
    times = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - t) / number)
    return float(np.median(times) * 1e3)


def measure(plan: dict, threads: int) -> dict:
    import onnxruntime as ort
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    res = {"threads": threads, "kernel": [], "e2e": []}
    rng = np.random.default_rng(0)
    for e in plan["kernel"]:
        r = {k: e[k] for k in ("N", "D", "M", "V", "C", "K", "lut_kernel")}
        r["lut_layer_ms"] = tvm_ms(e["lut_layer"])
        r["chain_ms"] = _chain_ms(e["lut_layer"])
        r["tvm_untuned_ms"] = tvm_ms(e["tvm_untuned"])
        r["tvm_tuned_ms"] = tvm_ms(e["tvm_tuned"]) if "tvm_tuned" in e else None
        x = torch.from_numpy(rng.standard_normal((e["N"], e["D"])).astype(np.float32))
        w = torch.from_numpy(rng.standard_normal((e["M"], e["D"])).astype(np.float32))
        b = torch.zeros(e["M"])
        with torch.no_grad():
            r["torch_ms"] = median_ms(lambda: F.linear(x, w, b))
        res["kernel"].append(r)
    for e in plan["e2e"]:
        r = {k: e[k] for k in ("model", "batch", "lut_layers", "layers", "kernels")}
        r["lut_untuned_ms"] = tvm_ms(e["lut"])
        r["lut_ms"] = tvm_ms(e["lut_tuned"]) if "lut_tuned" in e else r["lut_untuned_ms"]
        r["tvm_untuned_ms"] = tvm_ms(e["tvm_untuned"])
        r["tvm_tuned_ms"] = tvm_ms(e["tvm_tuned"]) if "tvm_tuned" in e else None
        x = np.load(e["x"])
        model = _make_model(e["class"], e["kwargs"])
        with torch.no_grad():
            xt = torch.from_numpy(x)
            r["torch_ms"] = median_ms(lambda: model(xt))
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(e["onnx"], so, providers=["CPUExecutionProvider"])
        r["ort_ms"] = median_ms(lambda: sess.run(None, {"x": x}))
        res["e2e"].append(r)
    return res


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def _cpu_mhz() -> float:
    try:
        with open("/proc/cpuinfo") as f:
            return max(float(l.split(":")[1]) for l in f if l.startswith("cpu MHz"))
    except (OSError, ValueError):
        return float("nan")


def _table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
    def fmt(v):
        if v is None:
            return "-"
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    head = "| " + " | ".join(h for _, h in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    return "\n".join([head, sep] + ["| " + " | ".join(fmt(r.get(k)) for k, _ in cols) + " |" for r in rows])


def _ceiling(kernel: str, peak: dict | None) -> float:
    """Lookups per cycle the kernel's lookup instruction allows on this core (``lookup_peak``): 64 per
    ``vpermb`` + ``vpdpbusd`` pair for the grouped kernel, lanes per ``pshufb`` for the nibble kernel."""
    lanes = {"shuffle-avx512vbmi": 64, "shuffle-avx512bw": 64, "shuffle-avx2": 32, "shuffle-ssse3": 16}.get(kernel, 64)
    if peak is None:
        return lanes * SHUFFLE_CEILING_PER_CYCLE
    if kernel == "shuffle-avx512vbmi":
        return lanes * peak["vpermb_vpdpbusd_per_cycle"]
    return lanes * peak["vpshufb_per_cycle"]


def summarize(plan: dict, runs: list[dict], peak: dict | None = None) -> tuple[dict, str]:
    mhz = peak["clock_ghz"] * 1e3 if peak else _cpu_mhz()
    kern_info = {(e["N"], e["D"], e["M"], e["V"]): e for e in plan["kernel"]}
    clock = "measured" if peak else "nominal"
    md = [f"# Speed, {platform.processor() or platform.machine()} ({mhz:.0f} MHz {clock}), one run\n"]
    for run in runs:
        t = run["threads"]
        for r in run["kernel"]:
            info = kern_info[(r["N"], r["D"], r["M"], r["V"])]
            ks = info["kernels"]
            lookups = r["N"] * r["C"] * r["M"]
            look = ks.get("shuffle_lookup", {})
            ceiling = _ceiling(r["lut_kernel"], peak)  # lookups per cycle
            best = min(v for v in (look.get("hand_us"), look.get("tuned_us")) if v) if look else None
            r["lookup_hand_us"], r["lookup_tuned_us"] = look.get("hand_us"), look.get("tuned_us")
            r["encode_us"] = ks.get("encode", {}).get("hand_us")
            r["tuning_improves"] = (look.get("tuned_us") is not None and look["tuned_us"] < look["hand_us"])
            r["kernels_ms"] = ((r["encode_us"] or 0) + (best or 0)) / 1e3 if best else None
            if best and mhz == mhz:
                per_cycle = lookups / (best * 1e-6 * mhz * 1e6)
                r["lookups_per_cycle"] = per_cycle
                r["ceiling_frac"] = per_cycle / ceiling
            r["vs_tvm_tuned"] = r["tvm_tuned_ms"] / r["lut_layer_ms"] if r["tvm_tuned_ms"] else None
            if peak and peak.get("fma_per_cycle") and r["tvm_tuned_ms"]:
                # the arithmetic bound of exact-argmin PQ on this core: the encoder's N*D*K distance
                # multiply-adds at the FMA peak plus N*C*M lookups at the lookup ceiling, with the argmin,
                # loads and stores free. TVM's tuned dense is held to its measured time, not its floor.
                fmas_per_ms = peak.get("vector_bits", 512) // 32 * peak["fma_per_cycle"] * mhz * 1e3
                floor_ms = (r["N"] * r["D"] * r["K"] / fmas_per_ms
                            + lookups / (ceiling * mhz * 1e3))
                r["tvm_tuned_fma_frac"] = r["N"] * r["D"] * r["M"] / fmas_per_ms / r["tvm_tuned_ms"]
                r["vs_tvm_tuned_bound"] = r["tvm_tuned_ms"] / floor_ms
            r["vs_torch"] = r["torch_ms"] / r["lut_layer_ms"]
            r["kernels_vs_torch"] = r["torch_ms"] / r["kernels_ms"] if r.get("kernels_ms") else None
        md.append(f"\n## Kernel: one linear layer, {t} thread(s) (ms; ratios > 1: LUT faster)\n")
        md.append(_table(run["kernel"], [
            ("N", "N"), ("D", "D"), ("M", "M"), ("V", "V"), ("C", "C"), ("lut_layer_ms", "LUT layer"),
            ("kernels_ms", "LUT kernels"), ("chain_ms", "kernels back to back"), ("encode_us", "encode µs"),
            ("lookup_hand_us", "lookup hand µs"),
            ("lookup_tuned_us", "lookup tuned µs"), ("tvm_untuned_ms", "TVM exact"),
            ("tvm_tuned_ms", "TVM exact tuned"), ("torch_ms", "PyTorch"), ("vs_tvm_tuned", "× TVM tuned"),
            ("vs_torch", "× PyTorch"), ("lookups_per_cycle", "lookups/cycle"), ("ceiling_frac", "of ceiling"),
            ("tvm_tuned_fma_frac", "TVM tuned, of FMA peak"), ("vs_tvm_tuned_bound", "× TVM tuned, bound")]))
        for r in run["kernel"]:
            if (r["N"], r["D"], r["M"], r["C"]) == MADDNESS_SHAPE:
                r["vs_maddness"] = {k: r[k] * 1e3 / MADDNESS_US for k in ("lut_layer_ms", "chain_ms", "kernels_ms")
                                    if r.get(k)}
                md.append(f"\nMADDNESS's shape (N, D, M, C) = {MADDNESS_SHAPE}, against its {MADDNESS_US:.0f} µs "
                          "(RESEARCH.md §6, measured on another day): " + ", ".join(
                              f"{name} {r[k] * 1e3:.0f} µs = {r['vs_maddness'][k]:.2f}×" for k, name in
                              (("lut_layer_ms", "LUT layer"), ("chain_ms", "kernels back to back"),
                               ("kernels_ms", "kernels alone")) if k in r["vs_maddness"]) + ".\n")
        for r in run["e2e"]:
            r["vs_tvm_tuned"] = r["tvm_tuned_ms"] / r["lut_ms"] if r["tvm_tuned_ms"] else None
            r["vs_tvm_untuned"] = r["tvm_untuned_ms"] / r["lut_ms"]
            r["vs_ort"] = r["ort_ms"] / r["lut_ms"]
            r["vs_torch"] = r["torch_ms"] / r["lut_ms"]
        md.append(f"\n## End to end, {t} thread(s) (ms per batch; ratios > 1: LUT faster)\n")
        md.append(_table(run["e2e"], [
            ("model", "model"), ("batch", "batch"), ("lut_untuned_ms", "LUT, rest untuned"), ("lut_ms", "LUT"),
            ("tvm_untuned_ms", "TVM exact"),
            ("tvm_tuned_ms", "TVM exact tuned"), ("torch_ms", "PyTorch"), ("ort_ms", "ONNX Runtime"),
            ("vs_tvm_tuned", "× TVM tuned"), ("vs_ort", "× ORT"), ("vs_torch", "× PyTorch")]))
    md.append("\nEnd to end, LUT = lookup layers with their hand schedules + the model's other ops tuned "
              "by MetaSchedule with the same per-task budget as the exact model; 'rest untuned' = TVM's default "
              "lowering for those ops.\n")
    md.append("\nLUT kernels = the encoder + shuffle lookup as LUTify emits them for the layer (the lookup: the "
              "better of hand and tuned schedule), each timed alone; kernels back to back = the deployed "
              "layer's own kernels called one after the other on preallocated buffers (one output buffer, as a C++ "
              "harness calls a kernel), outside the VM; LUT layer = the deployed layer, called through the VM "
              "(which allocates its output per call and alternates two output buffers). "
              + ("Ceiling = lookups per cycle of the kernel's lookup instruction on this core, measured by "
                 f"benchmarks/lookup_peak.py: {json.dumps(peak)} (grouped kernel: 64 per vpermb+vpdpbusd pair; "
                 "nibble kernel: lanes per vpshufb); lookups/cycle at the measured clock. "
                 "'× TVM tuned, bound' = the most an fp32 exact-argmin PQ layer (one multiply-add per centroid and "
                 "input element) could reach against that TVM time on this core: the encoder's N*D*K distance multiply-adds at the measured FMA peak plus the N*C*M "
                 "lookups at the ceiling, argmin, loads and stores counted as free; 'of FMA peak' = the tuned "
                 "exact dense's N*D*M multiply-adds against that peak.\n" if peak else
                 f"Ceiling = lanes x {SHUFFLE_CEILING_PER_CYCLE} shuffle/cycle at the nominal clock (no C compiler "
                 "or neither AVX-512 nor AVX2 here: lookup_peak.py could not measure the core).\n"))
    return {"machine": {"cpu_mhz": mhz, "platform": platform.platform(), "lookup_peak": peak}, "runs": runs,
            "build": {"kernel": [{k: v for k, v in e.items() if k in ("N", "D", "M", "V", "kernels", "tvm_tuning_s")}
                                 for e in plan["kernel"]],
                      "e2e": [{k: v for k, v in e.items() if k in ("model", "batch", "tvm_tuning_s", "tvm_tasks", "lut_rest_tuning_s", "lut_rest_tasks")}
                              for e in plan["e2e"]]}}, "\n".join(md)


def _chart(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = result["runs"][0]
    rows = run["e2e"]
    if not rows:
        return
    labels = [f"{r['model'].split(' ')[0]}\nb{r['batch']}" for r in rows]
    keys = [("lut_ms", "LUT"), ("tvm_tuned_ms", "TVM tuned"), ("torch_ms", "PyTorch"), ("ort_ms", "ORT")]
    fig, ax = plt.subplots(figsize=(9, 4))
    w = 0.2
    for i, (k, name) in enumerate(keys):
        ax.bar(np.arange(len(rows)) + i * w, [r.get(k) or 0 for r in rows], w, label=name)
    ax.set_xticks(np.arange(len(rows)) + 1.5 * w, labels)
    ax.set_yscale("log")
    ax.set_ylabel(f"ms per batch ({run['threads']} thread)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two kernel shapes, ResNet-20 and LeNet, batch 1")
    ap.add_argument("--trials", type=int, default=64, help="MetaSchedule trials per kernel (LUT and exact dense)")
    ap.add_argument("--e2e-trials", type=int, default=32, help="trials per task when tuning exact models")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--models", default=None, help="comma-separated prefixes of the end-to-end models (ResNet-18,...)")
    ap.add_argument("--batches", default="1,32", help="end-to-end batch sizes")
    ap.add_argument("--shapes", default=None, metavar="N:D:M[:V],...",
                    help="kernel shapes instead of the default list (V: subvector length, default 4)")
    ap.add_argument("--only", default="kernel,e2e")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "speed"))
    ap.add_argument("--measure-only", action="store_true",
                    help="skip phase 1: measure the builds of the last run with the same --out again")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:  # phase 2 in a fresh process
        plan = json.load(open(args.worker))
        json.dump(measure(plan, int(os.environ["TVM_NUM_THREADS"])), sys.stdout)
        return
    # the build phase times kernels (hand vs tuned) and MetaSchedule measures candidates: both with the
    # first thread count (default 1), set before TVM starts its thread pool
    os.environ["TVM_NUM_THREADS"] = args.threads.split(",")[0]
    from tir_schedules import tuning

    tuning.stub_tensor_intrins()
    # this run's builds and tuning databases: one directory per --out name, emptied before a build, so that
    # every kernel and model is tuned from an empty database with exactly the trial budget given (reused
    # databases gave TVM's exact builds earlier runs' records too) and --measure-only finds this run's builds
    cache = os.path.join(CACHE, os.path.basename(args.out))
    plan_path = os.path.join(cache, "plan.json")
    if args.measure_only and not os.path.exists(plan_path):
        raise SystemExit(f"--measure-only: no build for --out {args.out} ({plan_path} is missing); "
                         "run once without --measure-only")
    if not args.measure_only:
        shutil.rmtree(cache, ignore_errors=True)
        os.makedirs(cache)
    from tvm_lut.targets import host_target

    target = host_target()
    only = set(args.only.split(","))
    t0 = time.time()
    plan = {"kernel": [], "e2e": []}
    if args.measure_only:
        plan = json.load(open(plan_path))
        only = set()
    if "kernel" in only:
        shapes = QUICK_KERNEL_SHAPES if args.quick else KERNEL_SHAPES
        if args.shapes:
            shapes = parse_shapes(args.shapes)
        plan["kernel"] = build_kernels(shapes, args.trials, target, cache)
    if "e2e" in only:
        names = ["ResNet-20 (CIFAR)", "LeNet-5 (MNIST)"] if args.quick else list(E2E)
        if args.models:
            names = [n for n in E2E if any(n.startswith(p) for p in args.models.split(","))]
        batches = [1] if args.quick else [int(b) for b in args.batches.split(",")]
        plan["e2e"] = build_e2e(names, batches, args.e2e_trials, target, cache)
    build_s = time.time() - t0
    if not args.measure_only:
        json.dump(plan, open(plan_path, "w"))
    runs = []
    for t in [int(s) for s in args.threads.split(",")]:
        _log(f"measuring with {t} thread(s)")
        env = dict(os.environ, TVM_NUM_THREADS=str(t), OMP_NUM_THREADS=str(t))
        proc = subprocess.run([sys.executable, __file__, "--worker", plan_path], env=env, capture_output=True,
                              text=True, check=True)
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    from lookup_peak import measure as measure_peak

    result, md = summarize(plan, runs, measure_peak())
    result["build_s"] = build_s
    result["settings"] = {"trials": args.trials, "e2e_trials": args.e2e_trials, "quick": args.quick}
    print(md)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(args.out + ".md", "w") as f:
        f.write(md + "\n")
    _chart(result, args.out + ".png")
    _log(f"wrote {args.out}.json/.md/.png (build {build_s:.0f} s)")


if __name__ == "__main__":
    main()
