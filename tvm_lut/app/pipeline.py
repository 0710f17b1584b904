"""The whole job behind ``tvm-lut compile`` (and the demo): LUTify, build, measure, save.

Measurements are side by side in one process: the exact model and the LUT model are built for the
same target the same way (weights as runtime inputs, kernels hand-scheduled, other ops TVM's default
CPU lowering), and timed with TVM's ``time_evaluator`` on the same batch. When the calibration data
carries ``labels``, a held-out part of it (never used for calibration) gives exact vs LUT accuracy.
"""

from __future__ import annotations

import logging

import numpy as np
import tvm

from relay_passes import LUTify
from tvm_lut import targets
from tvm_lut.errors import CalibrationError
from tvm_lut.frontend import graph
from tvm_lut.frontend.importer import OUTPUT_NAMES_ATTR
from tvm_lut.runtime import artifact
from tvm_lut.runtime.build import BatchRunner, compile_with_params, default_threads
from tvm_lut.runtime.calibrate import CheckedInputs, check_labels, compile_or_explain, normalize_inputs

log = logging.getLogger("tvm_lut")


def num_outputs(mod: tvm.IRModule) -> int | None:
    """The last dim of the model's (first) output: its number of classes for a classifier; None when
    that dim is not static."""
    ty = mod["main"].ret_ty
    if hasattr(ty, "fields"):
        ty = ty.fields[0] if len(ty.fields) else None
    shape = getattr(ty, "shape", None)
    if shape is None or not hasattr(shape, "values") or not len(shape.values):
        return None
    last = shape.values[-1]
    return int(last) if isinstance(last, tvm.tirx.IntImm) else None


DEFAULT_BUDGET = {"labels": "max-drop=1", "no labels": "max-disagree=1"}


def default_budget(asked: str | None, has_labels: bool, method: str = "pq", all_layers: bool = False
                   ) -> tuple[str | None, str]:
    """The priority-mask budget ``tvm-lut compile`` uses, and why: what was asked (``none``: no mask,
    every layer LUTify converts by itself), else no mask when the user asked for every layer
    (``--all-layers``) or for a method the mask does not choose (it chooses PQ layers), else
    ``max-drop=1`` with labels and ``max-disagree=1`` (top-1 agreement with the exact model) without:
    a compile never ships a model that lost its accuracy without a budget saying how much it may."""
    if asked is not None:
        if str(asked).strip().lower() == "none":
            return None, "--budget none: no priority mask"
        return str(asked), "asked"
    if all_layers:
        return None, "--all-layers: every layer converted, no priority mask"
    if method != "pq":
        return None, f"--method {method}: the priority mask chooses PQ layers only"
    if has_labels:
        return DEFAULT_BUDGET["labels"], "default (the calibration data has labels); --budget none converts every layer"
    return DEFAULT_BUDGET["no labels"], ("default (no labels: top-1 agreement with the exact model); "
                                         "--budget none converts every layer")


def split_calibration(data, signature, holdout: float, seed: int = 0, classes: int | None = None,
                      where: str = "calibration data", hold_unlabelled: bool = True):
    """(calibration inputs, held-out inputs or None, held-out labels or None) from user data.

    Without labels, rows are still held out (when there are enough, and ``hold_unlabelled``) for top-1
    agreement.

    With labels (checked by ``calibrate.check_labels`` against ``classes``; errors name ``where``), the
    calibration part keeps its own ``labels`` entry (for a priority-mask budget)."""
    labels = None
    if hasattr(data, "files") or isinstance(data, dict):
        keys = data.files if hasattr(data, "files") else list(data)
        if "labels" in keys:
            labels = data["labels"]
    inputs = normalize_inputs(data, signature)
    n = len(next(iter(inputs.values())))
    if labels is None:
        # no labels: still hold rows back (when there are enough) to measure top-1 agreement with the
        # exact model on rows the calibration never saw
        n_hold = int(round(n * holdout)) if hold_unlabelled else 0
        if n_hold < 2 or n - n_hold < 8:
            return inputs, None, None
        perm = np.random.default_rng(seed).permutation(n)
        hold, cal = np.sort(perm[:n_hold]), np.sort(perm[n_hold:])
        # rows of checked arrays need no second check by the passes that take them
        return (CheckedInputs({k: v[cal] for k, v in inputs.items()}, inputs.signature),
                CheckedInputs({k: v[hold] for k, v in inputs.items()}, inputs.signature), None)
    labels = check_labels(labels, n, classes, where)
    n_hold = int(round(n * holdout))
    if n_hold < 1 or n - n_hold < 1:
        raise CalibrationError(f"cannot hold back {holdout:.0%} of {n} samples for accuracy: need more data "
                               "or another --holdout")
    perm = np.random.default_rng(seed).permutation(n)
    hold, cal = np.sort(perm[:n_hold]), np.sort(perm[n_hold:])
    return ({**{k: v[cal] for k, v in inputs.items()}, "labels": labels[cal]},
            {k: v[hold] for k, v in inputs.items()}, labels[hold])


def totals(layers: list[dict]) -> dict:
    """Model-wide sums of a LUTify pass's layer records: multiplies/adds exact vs rewritten (``lut_*``:
    PQ, butterfly and low-rank layers as rewritten, exact layers as they are), bytes, parameters."""
    t = {"exact_mul": 0, "exact_add": 0, "lut_mul": 0, "lut_add": 0, "lut_cmp": 0,
         "weight_bytes": 0, "lut_weight_bytes": 0, "table_bytes": 0, "codebook_bytes": 0, "factor_bytes": 0,
         "exact_params": 0, "params": 0}
    for r in layers:
        if "exact_ops" not in r:
            continue
        t["exact_mul"] += r["exact_ops"]["mul"]
        t["exact_add"] += r["exact_ops"]["add"]
        t["weight_bytes"] += r["weight_bytes"]
        t["exact_params"] += r.get("exact_params", 0)
        t["params"] += layer_params(r)
        if r["method"] != "exact":
            t["lut_mul"] += r["lut_ops"]["mul"]
            t["lut_add"] += r["lut_ops"]["add"]
            t["lut_cmp"] += r["lut_ops"]["cmp"]
            t["table_bytes"] += r.get("table_bytes", 0)
            t["codebook_bytes"] += r.get("codebook_bytes", 0)
            t["factor_bytes"] += r.get("factor_bytes", 0)
        else:
            t["lut_mul"] += r["exact_ops"]["mul"]
            t["lut_add"] += r["exact_ops"]["add"]
            t["lut_weight_bytes"] += r["weight_bytes"]
    t["mul_removed_frac"] = 1.0 - t["lut_mul"] / t["exact_mul"] if t["exact_mul"] else 0.0
    t["params_removed_frac"] = 1.0 - t["params"] / t["exact_params"] if t["exact_params"] else 0.0
    return t


def layer_params(r: dict) -> int:
    """Stored numbers of a layer as rewritten: exact weights (+bias), PQ tables + codebooks (entries, not
    bytes), or the butterfly / low-rank factors (+bias)."""
    if "exact_params" not in r:
        return 0
    bias = r["m"] if r.get("has_bias") else 0
    if r["method"] == "pq":
        return r["c"] * r["k"] * r["m"] + r["c"] * r["k"] * r["v"] + bias
    if r["method"] != "exact" and "params" in r:  # butterfly / low-rank factors, or a method's own count
        return r["params"] + bias
    return r["exact_params"]


def _top1(runner: BatchRunner, inputs) -> np.ndarray:
    logits = runner.run(inputs)[0]
    return logits.reshape(len(logits), -1).argmax(-1)


def _accuracy(runner: BatchRunner, inputs, labels) -> tuple[float, np.ndarray]:
    pred = _top1(runner, inputs)
    return float((pred == labels.reshape(-1)).mean() * 100.0), pred


def compile_and_measure(
    mod: tvm.IRModule,
    calibration,
    *,
    target="x86",
    holdout: float = 0.2,
    seed: int = 0,
    output_names: list[str] | None = None,
    source: str = "",
    measure_latency: bool = True,
    progress: bool = True,
    evaluation: tuple | None = None,
    cam_params: dict | None = None,
    calibration_name: str = "calibration data",
    budget_policy: str | None = None,
    baselines: dict | None = None,
    **lutify_options,
) -> tuple[object, list, dict]:
    """LUTify ``mod`` on ``calibration`` and build it; returns (executable, params, manifest).

    ``evaluation=(inputs, labels)`` measures accuracy on that data instead of a held-out part of the
    calibration data. ``cam_params`` ({name: value}) overrides the CAM simulator's device parameters in
    the report of a ``cam`` build. ``calibration_name`` (the file) is what errors about the data name;
    ``budget_policy`` says in the report why ``budget`` is what it is (``default_budget``).
    ``baselines={"onnx": path or ModelProto, "torch": module}``: the source model, timed beside the builds
    (``tvm_lut.app.baselines``: ONNX Runtime fp32 and int8, PyTorch) when latency is measured.
    """
    build_for = targets.resolve(target)
    tgt = build_for.tvm
    signature = graph.input_signature(mod["main"])
    for name, shape, _ in signature:
        if any(isinstance(d, str) for d in shape):
            raise CalibrationError(f"model input {name!r} has a dynamic shape {shape}: give a fixed shape")
    classes = num_outputs(mod)
    # with separate evaluation data, unlabelled calibration rows are all used for calibration
    calib, held, labels = split_calibration(calibration, signature, holdout, seed, classes, calibration_name,
                                            hold_unlabelled=evaluation is None)
    if evaluation is not None:
        held = normalize_inputs(evaluation[0], signature, what="evaluation")
        labels = check_labels(evaluation[1], len(next(iter(held.values()))), classes, "evaluation data")
    local = build_for.local()
    host = local.tvm
    # the exact model first: a model TVM cannot build at all gets that said plainly (ModelError)
    exact_ex, exact_params = compile_or_explain(lambda: compile_with_params(mod, host))
    pass_ = LUTify(calibration=calib, target=build_for, seed=seed, progress=progress, **lutify_options)
    result = pass_.run(mod)
    lut_mod, layers = result.module, result.layers
    lut_ex, lut_params = compile_with_params(lut_mod, tgt)
    # accuracy and latency runs happen here: a cross build (arm) is measured through a host build of the
    # same tables (tests/test_arm.py checks that both predict the same); the exact model always on the host
    on_host = build_for.runs_here()
    run_ex = lut_ex if on_host else compile_with_params(result.retarget(host), host)[0]
    lut_run = BatchRunner(run_ex, [v for _, v in lut_params], signature)
    exact_run = BatchRunner(exact_ex, [v for _, v in exact_params], signature)
    report: dict = {
        "model": source,
        "target": str(tgt),
        "target_name": build_for.name,
        "batch": lut_run.batch,
        "layers": layers,
        "totals": totals(layers),
        "accuracy": None,
        "latency": None,
    }
    if pass_.database:
        report["tuning"] = {"database": pass_.database, "tuned_kernels": list(result.tuned)}
    if result.priority:
        report["priority_mask"] = {k: v for k, v in result.priority.items() if k not in ("scores", "decision")}
    if budget_policy is not None:
        report["budget"] = {"budget": lutify_options.get("budget"), "why": budget_policy}
    if held is not None and labels is not None:
        acc_e, pred_e = _accuracy(exact_run, held, labels)
        acc_l, pred_l = _accuracy(lut_run, held, labels)
        report["accuracy"] = {"exact": acc_e, "lut": acc_l, "drop": acc_e - acc_l, "rows": int(len(labels)),
                              "agreement": float((pred_e == pred_l).mean() * 100.0)}
        if not on_host:
            report["accuracy"]["measured_on"] = f"host build of the same tables ({local.name})"
    elif held is not None:  # no labels: how often the LUT model's top-1 is the exact model's
        pred_e, pred_l = _top1(exact_run, held), _top1(lut_run, held)
        report["agreement"] = {"rows": int(len(pred_e)), "agreement": float((pred_e == pred_l).mean() * 100.0)}
        if not on_host:
            report["agreement"]["measured_on"] = f"host build of the same tables ({local.name})"
    section = build_for.device_report(layers, cam_params)
    if section is not None:  # the CAM simulator's cycles and energy
        report[section[0]] = section[1]
    if measure_latency and build_for.latency_note() is not None:
        report["latency_note"] = build_for.latency_note()
    elif measure_latency:
        from relay_passes import latency

        # the rewritten layers' kernels are timed from the model's own build (run_ex is lut_ex here)
        latency.measure_layers(result.plans, tgt, executable=run_ex, kernel_calls=result.kernel_calls)
        e_ms, l_ms = exact_run.latency_ms(), lut_run.latency_ms()
        report["latency"] = {"exact_ms": e_ms, "lut_ms": l_ms, "speedup": e_ms / l_ms, "batch": lut_run.batch,
                             "threads": default_threads(), "note": "per batch; LUT kernels hand-scheduled "
                             + ("or tuned (see tuning); " if result.tuned else "; ")
                             + "exact layers and other ops: TVM default CPU lowering, untuned"}
        if baselines is not None:  # what users compare against, in this process, same batch and threads
            from tvm_lut.app import baselines as bl

            report["baselines"] = bl.measure(
                batch=lut_run.batch, threads=default_threads(),
                calibration={k: v for k, v in calib.items() if k != "labels"},
                onnx_model=baselines.get("onnx"), torch_module=baselines.get("torch"), held=held, labels=labels)
    outputs = output_names or _output_names(lut_mod)
    manifest = {
        "source": source,
        # target, target_name, and what the code may execute: loading refuses a CPU without one of the
        # instruction sets (artifact.Model)
        **build_for.describe(),
        "inputs": [{"name": n, "shape": list(s), "dtype": d} for n, s, d in signature],
        "outputs": outputs,
        "layers": layers,
        "report": report,
        "options": {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
                    for k, v in lutify_options.items()},
    }
    return lut_ex, lut_params, manifest


def _output_names(mod: tvm.IRModule) -> list[str]:
    """The source model's output names (ONNX), else ``output`` / ``output_0``, ``output_1``..."""
    ty = mod["main"].ret_ty
    count = len(ty.fields) if hasattr(ty, "fields") else 1
    if mod.attrs is not None and OUTPUT_NAMES_ATTR in mod.attrs:
        names = [str(n) for n in mod.attrs[OUTPUT_NAMES_ATTR]]
        if len(names) == count:
            return names
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


def compile_to_dir(out: str, mod: tvm.IRModule, calibration, **kwargs) -> dict:
    """``compile_and_measure`` and write the artifact to ``out`` atomically; returns the manifest."""
    ex, params, manifest = compile_and_measure(mod, calibration, **kwargs)
    artifact.save(out, ex, params, manifest, target=kwargs.get("target", "x86"))
    return manifest
