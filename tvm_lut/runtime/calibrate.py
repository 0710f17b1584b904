"""Calibration: the real inputs of every conv2d/dense layer, collected from the model itself.

The model is instrumented in Relax (``main`` additionally returns each layer's input activation),
compiled with TVM and run on the calibration batches, so the same code serves PyTorch and ONNX
models. Conv inputs are unfolded (im2col) into rows; each layer keeps a random subsample of at most
``max_rows`` rows for k-means.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvm_lut import targets
from tvm_lut.errors import CalibrationError
from tvm_lut.frontend import graph
from tvm_lut.math import pq
from tvm_lut.runtime.build import BatchRunner, bind_params, vector_lanes
from tvm_lut.runtime.elementwise import fuse_and_vectorize

log = logging.getLogger("tvm_lut")

RESERVED = ("labels",)


def _as_array(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def check_labels(labels, rows: int, classes: int | None, where: str) -> np.ndarray:
    """Class labels as int64 ``(rows,)``, or a ``CalibrationError`` that names ``where`` (the file) and the
    bad values: labels must be whole numbers, one per sample, in ``[0, classes)`` (``classes``: the
    model's number of outputs, None when its output shape is not static)."""
    arr = _as_array(labels)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise CalibrationError(f"{where}: 'labels' must be one class index per sample, got shape {arr.shape}")
    if len(arr) != rows:
        raise CalibrationError(f"{where}: 'labels' has {len(arr)} entries but the inputs have {rows} samples")
    if arr.dtype.kind in "fc":
        whole = np.isfinite(arr.real) & (arr.real == np.round(arr.real)) & (arr.imag == 0 if arr.dtype.kind == "c" else True)
        if not whole.all():
            bad = np.unique(arr[~whole])[:5]
            raise CalibrationError(f"{where}: 'labels' must be integer class indices; got {arr.dtype} values such as "
                                   f"{', '.join(repr(float(b.real)) for b in bad)} ({int((~whole).sum())} entries)")
        arr = arr.real.astype(np.int64)
    elif arr.dtype.kind not in "iu":
        raise CalibrationError(f"{where}: 'labels' must be integer class indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    top = f"[0, {classes})" if classes else "[0, ...)"
    out = (arr < 0) | (arr >= classes if classes else False)
    if out.any():
        bad = np.unique(arr[out])
        shown = ", ".join(str(int(b)) for b in bad[:8]) + (", ..." if len(bad) > 8 else "")
        model = f": the model has {classes} outputs" if classes else ""
        raise CalibrationError(f"{where}: 'labels' {shown} ({int(out.sum())} of {rows} entries) are outside {top}{model}")
    return arr


def normalize_inputs(data, signature: list[tuple[str, tuple, str]], what: str = "calibration") -> dict[str, np.ndarray]:
    """Bring user data into {model input name: array of samples}, checking names, shapes and values.

    Accepts one array/tensor (single-input models), a list of batches (concatenated), a mapping
    name -> array (an ``np.load``-ed ``.npz``; the key ``labels`` is ignored here), or a list of such
    mappings. Named arrays must carry the model's input names; an unnamed one (a bare array, or
    numpy's default ``arr_0``) is taken as the only input of a single-input model.
    """
    if data is None:
        raise CalibrationError(f"no {what} data given")
    if isinstance(data, CheckedInputs) and data.signature == _key(signature):
        return data  # checked once (names, shapes, NaN/Inf) for this signature: the pipeline, the mask and
        # the planner all take the same rows, and a NaN scan of every row each time was wasted work
    names = [s[0] for s in signature]
    if isinstance(data, Mapping) or hasattr(data, "files"):
        mapping = {k: _as_array(data[k]) for k in (data.files if hasattr(data, "files") else data.keys())
                   if k not in RESERVED}
    elif isinstance(data, (list, tuple)) and data and (isinstance(data[0], Mapping)):
        mapping = {k: np.concatenate([_as_array(b[k]) for b in data]) for k in data[0] if k not in RESERVED}
    elif isinstance(data, (list, tuple)):
        if not data:
            raise CalibrationError(f"{what} data is empty (no batches)")
        mapping = {"": np.concatenate([_as_array(b) for b in data])}
    else:
        mapping = {"": _as_array(data)}
    if set(mapping) in ({""}, {"arr_0"}):  # unnamed: a bare array, or np.savez(path, array)
        if len(names) != 1:
            raise CalibrationError(f"the model has {len(names)} inputs ({', '.join(names)}): give {what} data "
                                   "as arrays named after them")
        mapping = {names[0]: next(iter(mapping.values()))}
    unknown = sorted(set(mapping) - set(names))
    missing = [n for n in names if n not in mapping]
    if unknown or missing:
        raise CalibrationError(f"{what} arrays {unknown} do not match the model inputs {names}"
                               + (f" (missing: {missing})" if missing else ""))
    out, count = {}, None
    for name, shape, dtype in signature:
        arr = mapping[name]
        if arr.size == 0 or arr.ndim == 0 or len(arr) == 0:
            raise CalibrationError(f"{what} array {name!r} is empty")
        if tuple(arr.shape[1:]) != tuple(shape[1:]):
            raise CalibrationError(f"{what} array {name!r} has shape {arr.shape}, but model input {name!r} "
                                   f"expects (N, {', '.join(map(str, shape[1:]))})")
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise CalibrationError(f"{what} array {name!r} contains {bad} NaN/Inf values")
        if count is not None and len(arr) != count:
            raise CalibrationError(f"{what} arrays have different sample counts ({count} vs {len(arr)} for {name!r})")
        count = len(arr)
        out[name] = arr.astype(dtype, copy=False)
    return CheckedInputs(out, _key(signature))


def _key(signature) -> tuple:
    return tuple((str(n), tuple(int(d) for d in s[1:]), str(t)) for n, s, t in signature)


class CheckedInputs(dict):
    """{input name: samples} that ``normalize_inputs`` has checked against ``signature``; given back to it
    with the same signature, it is returned as it is (a slice or a copy is a plain dict and checked again)."""

    def __init__(self, arrays: dict, signature: tuple):
        super().__init__(arrays)
        self.signature = signature


@mutator
class _ExposeInputs(PyExprMutator):
    """Re-emits ``main`` and makes the given variables visible outside dataflow blocks."""

    def __init__(self, mod, targets):
        super().__init__(mod)
        self.targets = list(targets)
        self.exposed: dict = {}

    def visit_var_binding_(self, binding):
        super().visit_var_binding_(binding)
        if any(binding.var.same_as(t) for t in self.targets):
            new = self.visit_expr(binding.var)
            if isinstance(new, relax.DataflowVar):
                new = self.builder_.emit_output(new)
            self.exposed[binding.var] = new


def expose(mod: tvm.IRModule, exprs: list) -> tvm.IRModule:
    """A module whose ``main`` returns (original output, value of exprs[0], exprs[1], ...): any bound
    variables or inputs of ``main`` (layer inputs for calibration, feature maps for channel scores)."""
    func = mod["main"]
    targets = [e for e in exprs if not any(e.same_as(p) for p in func.params)]
    m = _ExposeInputs(mod, targets)
    new = m.visit_expr(func)
    outs = []
    for e in exprs:
        param = next((p for p in new.params if e.same_as(p)), None)
        outs.append(param if param is not None else next(v for k, v in m.exposed.items() if k.same_as(e)))
    result = relax.BlockBuilder().normalize(relax.Tuple([new.body.body, *outs]))
    body = relax.SeqExpr(new.body.blocks, result)
    inst = relax.Function(new.params, body, result.ty, func.is_pure, func.attrs)
    out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    out["main"] = inst
    return relax.transform.Normalize()(out)


def instrument(mod: tvm.IRModule, layers: list[graph.Layer]) -> tvm.IRModule:
    """A module whose ``main`` returns (original output, input of layer 0, input of layer 1, ...)."""
    return expose(mod, [l.input_expr for l in layers])


def layer_rows(layer: graph.Layer, x: np.ndarray) -> np.ndarray:
    """The (rows, D) matrix a layer multiplies by its weight, from its input activation."""
    if layer.kind == "conv2d":
        c = layer.conv
        return pq.im2col(x, c["kernel_hw"], c["strides"], c["padding"], c["dilation"])
    return x.reshape(-1, x.shape[-1])


def compile_or_explain(build):
    """Run ``build()``; a TVM failure to build the (exact, imported) model becomes a ``ModelError`` that
    says so, instead of an internal assertion from deep inside TVM's lowering."""
    from tvm_lut.errors import LUTError, ModelError

    try:
        return build()
    except LUTError:
        raise
    except Exception as exc:
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ModelError(f"TVM cannot build this model as imported, before any rewrite ({type(exc).__name__}: "
                         f"{first[:300]}). Typical cause: an ONNX graph with data-dependent shapes (e.g. "
                         "Slice/Split with computed bounds); export it with static shapes, or as a torch.export "
                         ".pt2 file") from None


def collect(
    mod: tvm.IRModule,
    layers: list[graph.Layer],
    inputs: dict[str, np.ndarray],
    *,
    target="x86",
    max_rows: int = 16384,
    seed: int = 0,
    progress: bool = True,
    keys: list[str] | None = None,
) -> dict[str, np.ndarray]:
    """Layer key -> calibration rows (n, D) from running the model on ``inputs``.

    Rows are subsampled with one random stream per layer, seeded by ``seed`` and the layer's key
    (its name unless ``keys`` are given): two runs of the same layer on the same inputs (say in the
    exact model and in a partly converted one) pick the same rows, so their rows pair up.
    """
    import zlib

    from tqdm import tqdm

    if not layers:
        return {}
    signature = graph.input_signature(mod["main"])
    local = targets.resolve(target).local()
    # the exact model's convs and elementwise ops scheduled (``runtime.elementwise``): calibration runs the
    # whole exact model on every calibration batch
    ex = compile_or_explain(lambda: tvm.compile(fuse_and_vectorize(bind_params(instrument(mod, layers)),
                                                                   vector_lanes(local)), local.tvm))
    runner = BatchRunner(ex, [], signature)
    n = len(next(iter(inputs.values())))
    keys = keys or [l.name for l in layers]
    rngs = [np.random.default_rng([seed, zlib.crc32(k.encode())]) for k in keys]
    rows: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    steps = (n + runner.batch - 1) // runner.batch
    bar = tqdm(total=steps, desc="calibrating", unit="batch", disable=True if (not progress or steps < 4) else None, leave=False)
    for outs, valid in runner.run_batches(inputs):
        for layer, key, rng, x in zip(layers, keys, rngs, outs[1:]):
            # the activation's first axis is the batch, or a sample's rows folded into it (a transformer's
            # tokens at batch 1: (tokens, d)): keep the valid samples' rows either way
            per = x.shape[0] // runner.batch if runner.batch and x.shape[0] % runner.batch == 0 else 1
            r = layer_rows(layer, x[:valid * per])
            keep = min(len(r), max(1, int(np.ceil(max_rows * valid / n))))
            if keep < len(r):
                r = r[np.sort(rng.choice(len(r), keep, replace=False))]
            rows[key].append(r.astype(np.float32))
        bar.update(1)
    bar.close()
    return {name: np.concatenate(parts)[:max_rows] for name, parts in rows.items()}
