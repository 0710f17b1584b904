"""Accuracy and latency of LUT builds of a trained model, side by side with ONNX Runtime fp32 and int8,
PyTorch and TVM's exact build (untuned and MetaSchedule-tuned), in one run on this machine.

    python benchmarks/pareto.py                    # the trained ResNet-18-class of benchmarks/train_cifar.py
    python benchmarks/pareto.py --quick            # three configurations, 2,000 test images, no exact tuning
    python benchmarks/pareto.py --random --test-limit 256 --configs v4 --exact-trials 0   # a smoke run

Phase 1 (this process) builds, for each configuration (``CONFIGS``: per-layer V and K, distance, the
priority mask), the LUT model at batch 32 and batch 1; records its build time (LUTify, calibration and
compile of the batch-1 deployment build, as a user's ``tvm-lut compile`` spends it); measures top-1 of the
**compiled** batch-32 model on the test set; and builds the baselines: the exact model with TVM (untuned,
and MetaSchedule/XGBoost-tuned with ``--exact-trials`` per task, the database kept between runs), the
model as ONNX for ONNX Runtime fp32 and its static int8 model (QDQ, per-channel int8 weights, uint8
activations; ``quant_pre_process`` then ``quantize_static``, calibrated on the same rows the LUT models
were), each with its accuracy on the same test images, and PyTorch eager.

Phase 2 times every build in one fresh process per thread count (``TVM_NUM_THREADS``, torch and ONNX
Runtime set to the same), at batch 1 and batch 32: medians of repeated runs in ms.

Writes ``benchmarks/results/pareto.json`` (with the CPU model and its ISA flags), ``pareto.md`` and
``pareto.png`` (top-1 vs batch-1 one-thread latency, each baseline a point). The model's weights come
from ``train_cifar.py``'s cache (``final.pt``; ``--weights`` names another file); ``--random`` uses
untrained weights, for smoke runs only: their accuracy means nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import speed  # noqa: E402  (the export, tuning and timing helpers of the speed benchmark)
import train_cifar  # noqa: E402

from tvm_lut.app.baselines import host_cpu  # noqa: E402

RESULTS = os.path.join(HERE, "results")
BATCHES = (1, 32)

# configuration name -> LUTify options; the first conv (3 input channels) stays exact in all of them
CONFIGS = {
    # V=9 for 3x3 convs (one input channel's patch), 4 otherwise, with LUT-NN's fp32 distances
    "V=9/4 (LUT-NN)": {"encoder": "fp32"},
    "V=9/4 int8 encoder": {"encoder": "int8"},  # LUTify's default: VNNI integer scores where they apply
    "V=4": {"v": 4},
    "V=3": {"v": 3},
    "V=2": {"v": 2},
    "V=4 L1 (PECAN-D)": {"v": 4, "distance": "l1"},
    "mask max-drop=1": {"budget": "max-drop=1.0"},
    "mask max-drop=1, V=4": {"budget": "max-drop=1.0", "v": 4},
    # the mask ranking layers by measured milliseconds saved per point lost (each layer timed exact and as
    # lookups on this host), not by multiplies removed
    "mask max-drop=1 by latency": {"budget": "max-drop=1.0", "mask_rank": "latency"},
    # LUT-NN's learned centroids (benchmarks/learn_centroids.py: soft-PQ fine-tuning distilled from the
    # exact model), compiled with LUTify(codebooks=...) on the fine-tuned weights
    "learned V=9/4": {"learned": True},
    "learned V=9/4 fp32 encoder": {"learned": True, "encoder": "fp32"},  # the codes training computed
    # the same for a run with per-layer V (``learn_centroids.py --layer-v``): each layer at its codebooks' V
    "learned, per-layer V": {"learned": True},
    # layers kept exact run as int8 convs (``LUTify(exact="int8")``, the VNNI kernel ``conv_int8``) instead of
    # fp32: with no lookup at all it is our own int8 build, the reference for what the lookups add
    "int8 exact (no lookups)": {"method": "exact", "exact": "int8"},
    "mask max-drop=1 by latency with int8 exact": {"budget": "max-drop=1.0", "mask_rank": "latency", "exact": "int8"},
}
QUICK = ("V=9/4 (LUT-NN)", "V=9/4 int8 encoder", "V=4", "mask max-drop=1")
KEEP = {"conv1": "exact"}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_model(name: str, weights: str | None, random: bool):
    import torch

    model = train_cifar.MODELS[name]()
    if random:
        return model.eval(), "random weights (smoke run: accuracy means nothing)"
    path = weights or os.path.join(train_cifar.cache_dir(name), "final.pt")
    if not os.path.isfile(path):
        raise SystemExit(f"no trained weights at {path}: run 'python benchmarks/train_cifar.py --model {name}' "
                         "first (resumable), name a file with --weights, or pass --random for a smoke run")
    model.load_state_dict(torch.load(path, map_location="cpu"))
    return model.eval(), path


def top1(ex, params, x: np.ndarray, y: np.ndarray, batch: int) -> float:
    from tvm_lut.runtime.build import BatchRunner

    runner = BatchRunner(ex, [v for _, v in params], [("x", (batch, *x.shape[1:]), "float32")])
    return float((runner.run({"x": x})[0].argmax(1) == y).mean() * 100)


def build(args, cache: str) -> dict:
    """Phase 1: every build exported under ``cache``, accuracies measured; returns the plan phase 2 times."""
    import torch

    import tvm_lut
    from relay_passes import LUTify
    from tvm_lut import targets
    from tvm_lut.app import baselines
    from tvm_lut.runtime.build import compile_with_params
    from tvm_lut.train import datasets

    target = targets.resolve_target("x86")
    model, source = load_model(args.model, args.weights, args.random)
    test_x, test_y = datasets.load_cifar10("test", limit=args.test_limit, seed=0)
    train_x, train_y = datasets.load_cifar10("train", limit=args.calib, seed=1)
    plan: dict = {"model": args.model, "weights": source, "random": bool(args.random), "test_images": int(len(test_y)),
                  "calibration_rows": int(len(train_y)), "cpu": host_cpu(), "configs": [], "baselines": {}}
    mods = {b: tvm_lut.from_torch(model, torch.from_numpy(test_x[:b])) for b in BATCHES}

    # exact: TVM untuned and tuned, ONNX Runtime fp32 and int8, PyTorch
    base = plan["baselines"]
    # the exact model's top-1 is PyTorch's on the whole test set (the untuned TVM build of a ResNet-18-class
    # model takes seconds per batch: hours for 10,000 images); the TVM build is checked against PyTorch's
    # predictions on the first ``--exact-check`` images
    with torch.no_grad():
        logits = torch.cat([model(torch.from_numpy(test_x[i:i + 500])) for i in range(0, len(test_x), 500)])
    ref_pred = logits.argmax(1).numpy()
    base["pytorch"] = {"top1": float((ref_pred == test_y).mean() * 100)}
    base["exact_top1"] = base["pytorch"]["top1"]
    ex, params = compile_with_params(mods[32], target)
    n_check = min(args.exact_check, len(test_y))
    from tvm_lut.runtime.build import BatchRunner

    tvm_pred = BatchRunner(ex, [v for _, v in params], [("x", (32, *test_x.shape[1:]), "float32")]).run(
        {"x": test_x[:n_check]})[0].argmax(1)
    base["tvm_exact"] = {"checked_images": n_check, "agrees_with_pytorch": float((tvm_pred == ref_pred[:n_check]).mean())}
    _log(f"exact model: top-1 {base['exact_top1']:.2f}% (PyTorch); the TVM build predicts the same class on "
         f"{base['tvm_exact']['agrees_with_pytorch'] * 100:.1f}% of {n_check} images")
    for b in BATCHES:
        ex, params = compile_with_params(mods[b], target)
        base["tvm_exact"][f"b{b}"] = speed.export_build(ex, params, [test_x[:b]], os.path.join(cache, f"exact_b{b}"))
        if args.exact_trials:
            t0 = time.time()
            ex, params, tasks = speed.tune_model(mods[b], target, os.path.join(
                cache, "..", f"db_exact_{args.model}_b{b}_t{args.exact_trials}"), args.exact_trials)
            base.setdefault("tvm_tuned", {})[f"b{b}"] = {
                **speed.export_build(ex, params, [test_x[:b]], os.path.join(cache, f"exact_tuned_b{b}")),
                "tasks": tasks, "tuning_s": time.time() - t0}
            _log(f"exact model, MetaSchedule-tuned batch {b}: {tasks} tasks, {time.time() - t0:.0f} s")
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        base["onnxruntime_note"] = baselines.INSTALL_HINT
    else:
        for b in BATCHES:
            path = os.path.join(cache, f"model_b{b}.onnx")
            torch.onnx.export(model, (torch.from_numpy(test_x[:b]),), path, input_names=["x"], output_names=["y"],
                              dynamo=False)
            qdir = os.path.join(cache, f"int8_b{b}")
            os.makedirs(qdir, exist_ok=True)
            t0 = time.time()
            q = baselines.quantize_int8(path, {"x": train_x}, qdir, batch=b)
            base.setdefault("ort_fp32", {})[f"b{b}"] = {"onnx": path}
            base.setdefault("ort_int8", {})[f"b{b}"] = {"onnx": q, "quantize_s": time.time() - t0}
        for kind in ("ort_fp32", "ort_int8"):
            sess = baselines.ort_session(base[kind]["b32"]["onnx"], 2)
            base[kind]["top1"] = float((baselines.ort_top1(sess, {"x": test_x}, 32) == test_y).mean() * 100)
            _log(f"ONNX Runtime {kind[4:]}: top-1 {base[kind]['top1']:.2f}%")

    learned: dict[str, dict] = {}  # run directory -> its model, codebooks, record and imported modules
    names = QUICK if args.quick else [c.strip() for c in args.configs.split(",")] if args.configs else list(CONFIGS)
    for name in names:
        opts = dict(CONFIGS[name] if name in CONFIGS else _parse_config(name))
        entry = {"config": name, "options": dict(opts)}
        src = mods
        run = opts.pop("learned", False)
        if run:
            path = run if isinstance(run, str) else args.learned  # "learned@DIR" names its own run
            if path not in learned:
                learned[path] = load_learned(args, path)
                learned[path]["mods"] = {b: tvm_lut.from_torch(learned[path]["model"], torch.from_numpy(test_x[:b]))
                                         for b in BATCHES}
            opts["codebooks"], src = learned[path]["codebooks"], learned[path]["mods"]
            entry["learned"] = learned[path]["info"]
            if isinstance(run, str):  # the row says which run, by its directory's name, and the other options
                rest = "".join(f"; {k}={v}" for k, v in sorted(opts.items()) if k not in ("codebooks", "layer_v"))
                entry["config"] = f"learned {os.path.basename(os.path.normpath(run))}{rest}"
        _log(f"{name}: building")
        # the deployment build (batch 1), timed as a user's compile: LUTify (fit, mask) + TVM compile
        t0 = time.time()
        # the mask measures accuracy on held-out labelled calibration rows; the others need the inputs only
        calib = {"x": train_x, "labels": train_y} if "budget" in opts else {"x": train_x}
        layers = layer_options(src[1], opts.pop("layer_v", {}))
        if run:  # the layers the run trained exact (learn_centroids.py --exact) stay exact, not k-means lookups
            layers.update({n: "exact" for n in entry["learned"].get("exclude", []) if n not in opts["codebooks"]})
        res1 = LUTify(calib, layers=layers, target=target, progress=False, **opts).run(src[1])
        ex1, p1 = compile_with_params(res1.module, target)
        entry["build_s"] = time.time() - t0
        entry["b1"] = speed.export_build(ex1, p1, [test_x[:1]], os.path.join(cache, f"lut_{len(plan['configs'])}_b1"))
        # the same tables and decisions at batch 32: accuracy on the test set, and the batch-32 latency
        decided = {r["name"]: ("exact" if r["method"] == "exact" else {"method": r["method"]}) for r in res1.layers}
        plain = {k: v for k, v in opts.items() if k != "budget"}
        res32 = LUTify({"x": train_x}, layers=decided, fitted=res1.pq_layers, target=target, progress=False, **plain).run(src[32])
        ex32, p32 = compile_with_params(res32.module, target)
        entry["top1"] = top1(ex32, p32, test_x, test_y, 32)
        entry["b32"] = speed.export_build(ex32, p32, [test_x[:32]], os.path.join(cache, f"lut_{len(plan['configs'])}_b32"))
        pq = [r for r in res1.layers if r["method"] == "pq"]
        entry.update(layers=len(res1.layers), lut_layers=len(pq), kernels=sorted({r.get("kernel", "") for r in pq}),
                     v=sorted({r["v"] for r in pq}), k=sorted({r["k"] for r in pq}))
        entry["bound"] = instruction_bound(res1.layers)
        # what a batch-1 call streams: lookup tables (int8) beside the same layers' int8 weights (ONNX Runtime's)
        entry["table_mb"] = sum(r.get("table_bytes", 0) for r in pq) / 2 ** 20
        entry["int8_weight_mb"] = sum(r["d"] * r["m"] for r in res1.layers if r.get("d") and r.get("m")) / 2 ** 20
        if res1.priority:
            entry["mask"] = {k: res1.priority[k] for k in ("converted", "val_drop", "val_drop_margin", "rank",
                                                           "ms_saved") if k in res1.priority}
        _log(f"{name}: top-1 {entry['top1']:.2f}%, {len(pq)}/{len(res1.layers)} layers as lookups, "
             f"built in {entry['build_s']:.0f} s")
        plan["configs"].append(entry)
    return plan


def load_learned(args, path: str | None = None) -> dict:
    """The fine-tuned model, its codebooks and its run's record from ``learn_centroids.py`` (``path``, else
    ``--learned``, names the run's directory; default: that script's default settings for ``--model``)."""
    import learn_centroids
    import torch

    from tvm_lut.train import lutnn

    path = path or args.learned or learn_centroids.run_dir(args.model, None, learn_centroids.default_tag())
    files = [os.path.join(path, f) for f in ("learned.pt", "codebooks.npz", "learned.json")]
    if not all(os.path.isfile(f) for f in files):
        raise SystemExit(f"no learned centroids in {path}: run 'python benchmarks/learn_centroids.py --model "
                         f"{args.model}' first (resumable), or name its directory with --learned")
    model = train_cifar.MODELS[args.model]()
    model.load_state_dict(torch.load(files[0], map_location="cpu"))
    with open(files[2]) as f:
        info = {**json.load(f), "dir": path}
    return {"model": model.eval(), "codebooks": lutnn.load_codebooks(files[1]), "info": info}


def instruction_bound(layers: list[dict]) -> dict:
    """The counted bound of a build (``tvm_lut.math.cost.instruction_bound``), per sample: 512-bit vector
    instructions of its conv/dense layers (lookup layers with today's fp32 encoder and with int8 encoder
    scores; exact layers as fp32 FMAs, 16 lanes, or as the ``int8`` method builds them: the GEMM's count in
    its ``"channels"`` layout, 4/KW of it in the ``"rows"`` one) against the same layers as ONNX Runtime's
    int8 VNNI GEMM."""
    from tvm_lut.math import cost

    out = {"int8_gemm": 0.0, "lut_fp32_encoder": 0.0, "lut_int8_encoder": 0.0, "lut_as_built": 0.0, "exact_fp32": 0.0,
           "exact_int8": 0.0, "layers": []}
    for r in layers:
        if not r.get("d") or not r.get("m"):
            continue
        rows, d, m = r["rows_per_sample"], r["d"], r["m"]
        gemm = rows * d * m / cost.VECTOR_BYTES
        out["int8_gemm"] += gemm
        if r["method"] == "pq":
            f = cost.instruction_bound(rows, d, m, r["v"], r["k"], "fp32")
            q = cost.instruction_bound(rows, d, m, r["v"], r["k"], "int8")
            out["lut_fp32_encoder"] += f["lut_total"]
            out["lut_int8_encoder"] += q["lut_total"]
            out["lut_as_built"] += (q if r.get("encoder") == "int8" else f)["lut_total"]  # each layer's encoder
            out["layers"].append({"name": r["name"], "m": m, "v": r["v"], "encoder": r.get("encoder", "fp32"),
                                  "ratio_fp32_encoder": f["ratio"], "ratio_int8_encoder": q["ratio"]})
        elif r["method"] == "int8":  # "rows" layout: 4 bytes per kernel row of KW taps, 4/KW of the GEMM's
            rows_layout = r.get("layout") == "rows" and r.get("conv")
            out["exact_int8"] += gemm * (4 / r["conv"]["kernel_hw"][1] if rows_layout else 1)
        else:
            out["exact_fp32"] += 4 * gemm  # fp32 FMAs: 16 lanes, not 64
    exact = out["exact_fp32"] + out["exact_int8"]
    for enc in ("fp32", "int8"):
        out[f"ratio_{enc}_encoder"] = (out[f"lut_{enc}_encoder"] + exact) / out["int8_gemm"]
    out["ratio_as_built"] = (out["lut_as_built"] + exact) / out["int8_gemm"]
    return out


def _layer_v_note(info: dict) -> str:
    """``; V=3 in layers.4.conv1, ...`` for a learned run with per-layer V (``learn_centroids --layer-v``)."""
    by_v: dict[int, list[str]] = {}
    for name, v in sorted((info.get("layer_v") or {}).items()):
        by_v.setdefault(v, []).append(name)
    return "".join(f"; V={v} in {', '.join(names)}" for v, names in sorted(by_v.items()))


def _parse_config(text: str) -> dict:
    """``v=4;k=16;distance=l1;budget=max-drop=1.0`` -> LUTify options (a configuration not in CONFIGS);
    ``learned@DIR`` (with LUTify options after it, ``;``-separated) compiles that learn_centroids run;
    ``v@layers.0=3`` gives the layers named ``layers.0`` or ``layers.0.*`` their own V, ``v@layers.*.conv?=3``
    the layers matching a shell pattern (``layer_v``)."""
    out: dict = {}
    for part in text.split(";"):
        if part.strip().startswith("learned@"):
            out["learned"] = part.strip()[len("learned@"):]
            continue
        key, _, value = part.partition("=")
        key = key.strip()
        if not value:
            raise SystemExit(f"--configs: {text!r} is neither a configuration of CONFIGS ({', '.join(CONFIGS)}) "
                             "nor key=value options")
        if key.startswith("v@"):
            if not value.isdigit():
                raise SystemExit(f"--configs: {part!r}: V must be an integer")
            out.setdefault("layer_v", {})[key[2:]] = int(value)
            continue
        out[key] = int(value) if value.isdigit() else value
    return out


def layer_options(mod, layer_v: dict[str, int]) -> dict:
    """``KEEP`` plus ``{"v": V}`` for each conv/dense layer of ``mod`` under a ``layer_v`` prefix or shell
    pattern (the longest wins); one that names no layer is an error."""
    from learn_centroids import resolve_patterns

    from tvm_lut.frontend import graph

    names = [layer.name for layer in graph.find_layers(mod)]
    out: dict = dict(KEEP)
    for n, v in resolve_patterns(names, layer_v, "--configs v@").items():
        if out.get(n) != "exact":
            out[n] = {"v": v}
    return out


def measure(plan: dict, threads: int) -> dict:
    """Phase 2 (a fresh process with ``TVM_NUM_THREADS=threads``): ms per batch of every build."""
    import torch

    from tvm_lut.app import baselines

    torch.set_num_threads(threads)
    out: dict = {"threads": threads, "configs": [], "baselines": {}}
    for e in plan["configs"]:
        out["configs"].append({f"b{b}_ms": speed.tvm_ms(e[f"b{b}"]) for b in BATCHES})
    base = plan["baselines"]
    for kind in ("tvm_exact", "tvm_tuned"):
        if kind in base:
            out["baselines"][kind] = {f"b{b}_ms": speed.tvm_ms(base[kind][f"b{b}"]) for b in BATCHES}
    for kind in ("ort_fp32", "ort_int8"):
        if kind in base:
            r = {}
            for b in BATCHES:
                sess = baselines.ort_session(base[kind][f"b{b}"]["onnx"], threads)
                x = np.load(base["tvm_exact"][f"b{b}"]["npz"])["x0"]
                r[f"b{b}_ms"] = speed.median_ms(lambda: sess.run(None, {"x": x}))
            out["baselines"][kind] = r
    model, _ = load_model(plan["model"], None if plan["random"] else plan["weights"], plan["random"])
    r = {}
    with torch.inference_mode():
        for b in BATCHES:
            xt = torch.from_numpy(np.load(base["tvm_exact"][f"b{b}"]["npz"])["x0"])
            r[f"b{b}_ms"] = speed.median_ms(lambda: model(xt))
    out["baselines"]["pytorch"] = r
    return out


LABELS = {"tvm_exact": "TVM exact (our default schedules, untuned)", "tvm_tuned": "TVM exact (MetaSchedule)", "ort_fp32": "ONNX Runtime fp32",
          "ort_int8": "ONNX Runtime int8", "pytorch": "PyTorch"}


def summarize(plan: dict, runs: list[dict]) -> tuple[dict, str]:
    """Rows (one per build) with accuracy, build time and latency per thread count; the markdown report."""
    base = plan["baselines"]
    exact = base.get("exact_top1", base["tvm_exact"].get("top1"))
    rows = []
    for i, e in enumerate(plan["configs"]):
        # a build with no lookup layer (our int8 convs alone) is a reference, not a LUT build
        label = f"LUT {e['config']}" if e["lut_layers"] else f"ours, {e['config']}"
        row = {"build": label, "top1": e["top1"], "drop": exact - e["top1"], "build_s": e["build_s"],
               "lut_layers": f"{e['lut_layers']}/{e['layers']}", "kernels": ", ".join(e["kernels"]),
               "table_mb": e.get("table_mb")}
        for run in runs:
            for b in BATCHES:
                row[f"t{run['threads']}_b{b}_ms"] = run["configs"][i][f"b{b}_ms"]
        rows.append(row)
    for kind, label in LABELS.items():
        if kind not in runs[0]["baselines"]:
            continue
        acc = base.get(kind, {}).get("top1", exact if kind.startswith("tvm") else None)
        row = {"build": label, "top1": acc, "drop": None if acc is None else exact - acc}
        for run in runs:
            for b in BATCHES:
                row[f"t{run['threads']}_b{b}_ms"] = run["baselines"][kind][f"b{b}_ms"]
        rows.append(row)
    ref = {r["build"]: r for r in rows}
    t = runs[0]["threads"]
    key = f"t{t}_b1_ms"
    int8 = ref.get(LABELS["ort_int8"], {}).get(key)
    fp32 = ref.get(LABELS["ort_fp32"], {}).get(key)
    for r in rows:
        r["x_ort_int8"] = int8 / r[key] if int8 else None  # > 1: faster than ONNX Runtime int8
        r["x_ort_fp32"] = fp32 / r[key] if fp32 else None
    kept = [r for r in rows if r["build"].startswith("LUT") and r["drop"] <= 1.0]
    best = min(kept, key=lambda r: r[key]) if kept else None
    verdict = {"exact_top1": exact, "threads": t,
               "best_within_1pt": None if best is None else {k: best[k] for k in ("build", "top1", "drop", key,
                                                                                  "x_ort_int8", "x_ort_fp32")},
               "beats_ort_int8": bool(best and best["x_ort_int8"] and best["x_ort_int8"] > 1),
               "beats_3x_ort_fp32": bool(best and best["x_ort_fp32"] and best["x_ort_fp32"] >= 3)}
    cols = [("build", "build"), ("top1", "top-1 %"), ("drop", "drop"), ("build_s", "build s")]
    for run in runs:
        for b in BATCHES:
            cols.append((f"t{run['threads']}_b{b}_ms", f"ms b{b} {run['threads']}t"))
    cols += [("x_ort_int8", "× ORT int8"), ("x_ort_fp32", "× ORT fp32"), ("lut_layers", "LUT layers"),
             ("table_mb", "tables MB"), ("kernels", "kernels")]

    def fmt(v):
        return "" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = [f"# Accuracy vs latency: {plan['model']} on CIFAR-10 (JPEG), {plan['test_images']} test images",
             "", f"CPU: {plan['cpu']['model']}; ISA flags: {' '.join(plan['cpu']['cpu_flags'])}. Weights: {plan['weights']}.",
             f"Calibration: {plan['calibration_rows']} training images (LUT models and the int8 quantizer).",
             "Top-1 of every build is measured on the compiled model; latency is ms per batch (median).", "",
             "| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c[0])) for c in cols) + " |" for r in rows]
    weights_mb = next((e["int8_weight_mb"] for e in plan["configs"] if e.get("int8_weight_mb")), None)
    if weights_mb:
        lines += ["", f"Tables MB: the lookup layers' int8 tables, all read by every batch-1 call; the model's "
                      f"conv/dense weights are {weights_mb:.1f} MB as int8 (what ONNX Runtime int8 reads)."]
    lines += ["", f"Best LUT build within 1.0 point of the exact top-1 ({exact:.2f}%), batch 1, {t} thread(s): "
              + (f"{best['build']}, {best[key]:.2f} ms, {best['x_ort_int8']:.2f}× ONNX Runtime int8, "
                 f"{best['x_ort_fp32']:.2f}× fp32" if best and best["x_ort_int8"] else "none")]
    for e in plan["configs"]:
        if e.get("learned"):
            li = e["learned"]
            part = "" if li.get("complete", True) else f" of a {li['total_steps']}-step schedule, stopped early"
            lines += ["", f"LUT {e['config']}: centroids and weights learned by `benchmarks/learn_centroids.py` "
                      f"({li['steps']} steps of {li['batch']} images{part}, {li['epochs']:g} of a pass over the training set, "
                      f"distillation weight {li['distill']:g}; PyTorch top-1 of the lookup model on "
                      f"{li['eval_images']} test images {li['torch_lut_top1']:.2f}%){_layer_v_note(li)}, "
                      f"from {li['dir']}."]
    lines += ["", "## The counted bound: instructions per sample vs ONNX Runtime int8 (VNNI)", "",
              "512-bit vector instructions the conv/dense layers must issue at best (tvm_lut.math.cost."
              "instruction_bound), as a ratio to the same layers as int8 VNNI GEMM (< 1: lookup can win). "
              "Lookup layers all with the fp32 encoder, all with int8 encoder scores, and as built (each "
              "layer's own encoder); exact layers as fp32 FMAs, or, where built as int8 convs, the GEMM's "
              "count (4 input channels per word) or 4/KW of it (one word per kernel row of KW taps, where the "
              "channels do not come in fours).", "",
              "| build | lookup+exact / int8, fp32 encoder | int8 encoder | as built | widest lookup layer ratio | "
              "narrowest |", "|---|---|---|---|---|---|"]
    for e in plan["configs"]:
        b = e.get("bound")
        if not b:
            continue
        by_m = sorted(b["layers"], key=lambda x: x["m"])
        built = f"{b['ratio_as_built']:.2f}" if "ratio_as_built" in b else "—"
        label = f"LUT {e['config']}" if e["lut_layers"] else f"ours, {e['config']}"
        lines.append(f"| {label} | {b['ratio_fp32_encoder']:.2f} | {b['ratio_int8_encoder']:.2f} | {built} | "
                     + (f"M={by_m[-1]['m']} V={by_m[-1]['v']}: {by_m[-1]['ratio_fp32_encoder']:.2f} | "
                        f"M={by_m[0]['m']} V={by_m[0]['v']}: {by_m[0]['ratio_fp32_encoder']:.2f} |" if by_m else "| |"))
    return {"rows": rows, "verdict": verdict}, "\n".join(lines) + "\n"


def chart(summary: dict, plan: dict, path: str, threads: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = f"t{threads}_b1_ms"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in summary["rows"]:
        if r.get("top1") is None or r.get(key) is None:
            continue
        lut = r["build"].startswith("LUT")
        ax.scatter(r[key], r["top1"], marker="o" if lut else "s", color="tab:blue" if lut else "tab:red")
        ax.annotate(r["build"].replace("LUT ", ""), (r[key], r["top1"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel(f"latency, batch 1, {threads} thread(s) (ms, log)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"{plan['model']} / CIFAR-10: LUT builds (circles) vs baselines (squares)\n{plan['cpu']['model']}",
                 fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet18", choices=sorted(train_cifar.MODELS))
    ap.add_argument("--weights", help="a state dict (.pt) of the model (default: train_cifar.py's final.pt)")
    ap.add_argument("--learned", help="learn_centroids.py's run directory for the 'learned' configuration "
                                      "(default: its default settings)")
    ap.add_argument("--random", action="store_true", help="untrained weights (smoke runs only)")
    ap.add_argument("--configs", help=f"comma-separated names of CONFIGS ({', '.join(CONFIGS)}) or "
                                      "'key=value;...' option sets: LUTify options, v@PATTERN=V (per-layer V), "
                                      "learned@DIR (a learn_centroids.py run)")
    ap.add_argument("--quick", action="store_true", help=f"configurations {', '.join(QUICK)}; 2,000 test images; "
                                                         "no exact tuning")
    ap.add_argument("--test-limit", type=int, default=None, help="test images (default all 10,000)")
    ap.add_argument("--calib", type=int, default=1024, help="calibration images from the training set")
    ap.add_argument("--exact-check", type=int, default=256,
                    help="test images on which the untuned TVM exact build is checked against PyTorch")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--exact-trials", type=int, default=32, help="MetaSchedule trials per task of the exact build")
    ap.add_argument("--out", default=os.path.join(RESULTS, "pareto"))
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # phase 2 worker: the plan file
    args = ap.parse_args()
    if args.measure:
        with open(args.measure) as f:
            plan = json.load(f)
        print(json.dumps(measure(plan, int(os.environ["TVM_NUM_THREADS"]))))
        return 0
    if args.quick:
        args.test_limit = args.test_limit or 2000
        args.exact_trials = 0
    cache = os.path.join(RESULTS, "cache", "pareto")
    if os.path.isdir(cache):
        import shutil

        shutil.rmtree(cache)
    os.makedirs(cache)
    t0 = time.time()
    plan = build(args, cache)
    plan["phase1_s"] = time.time() - t0
    plan_path = os.path.join(cache, "plan.json")
    with open(plan_path, "w") as f:
        json.dump(plan, f)
    runs = []
    for t in [int(s) for s in args.threads.split(",")]:
        _log(f"timing with {t} thread(s)")
        env = {**os.environ, "TVM_NUM_THREADS": str(t), "OMP_NUM_THREADS": str(t)}
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure", plan_path], env=env,
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"timing with {t} thread(s) failed:\n{done.stderr[-3000:]}")
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    summary, md = summarize(plan, runs)
    result = {**plan, "runs": runs, **summary, "command": " ".join(sys.argv)}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(md)
    chart(summary, plan, args.out + ".png", runs[0]["threads"])
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
