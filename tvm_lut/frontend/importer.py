"""Frontends: PyTorch (``torch.export``) and ONNX models to Relax, with weights under their source names.

Both return an IRModule in TVM's keep-params form: ``main(inputs..., weights...)`` with
``num_input`` and the weight values in the ``"params"`` function attribute. TVM's importers rename
weights to identifiers (``features.3.weight`` -> ``p_features_3_weight``); we rename them back so a
torch layer ``features.3`` is called ``features.3`` in every option and report.
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import os
import re
import warnings
from collections.abc import Sequence

import tvm
from tvm import relax

from tvm_lut.errors import ModelError
from tvm_lut.frontend.graph import num_inputs as graph_num_inputs
from tvm_lut.frontend.native_log import quiet_native

_ABANDONED_BUILDER = re.compile(r"BlockBuilder destroyed with remaining blocks")

#: Module attribute with the model's output names, where the source format has them (ONNX).
OUTPUT_NAMES_ATTR = "tvm_lut.output_names"

log = logging.getLogger("tvm_lut")


def rename_params(mod: tvm.IRModule, names: dict[str, str], func_name: str = "main") -> tvm.IRModule:
    """Rename parameter variables of ``mod[func_name]`` (old var name -> new name); values are kept."""
    func = mod[func_name]
    new_params, remap = [], {}
    for p in func.params:
        new = names.get(p.name)
        if new is None or new == p.name:
            new_params.append(p)
            continue
        nv = relax.Var(new, p.ty)
        new_params.append(nv)
        remap[p] = nv
    if not remap:
        return mod
    out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    out[func_name] = _bind_vars(func, new_params, remap)
    return out


def _bind_vars(func: relax.Function, new_params: list, remap: dict) -> relax.Function:
    """``func`` with parameters replaced (``remap``: old Var -> new Var) throughout its body."""

    @relax.expr_functor.mutator
    class _Rename(relax.expr_functor.PyExprMutator):
        def visit_var_(self, var):
            return remap.get(var, var)

    body = _Rename().visit_expr(func.body)
    return relax.Function(new_params, body, func.ret_ty, func.is_pure, func.attrs)


def _check_file(path: str | os.PathLike, suffixes: Sequence[str]) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelError(f"model file not found: {path}")
    if not any(path.endswith(s) for s in suffixes):
        raise ModelError(f"{path}: unsupported model file type (expected {' or '.join(suffixes)})")
    return path


def from_torch(model, example_inputs, *, dynamic_shapes=None) -> tvm.IRModule:
    """Import a PyTorch module through ``torch.export`` (the module is put in eval mode)."""
    import torch

    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    model = model.eval()
    with torch.no_grad():
        ep = torch.export.export(model, tuple(example_inputs), dynamic_shapes=dynamic_shapes)
    return from_exported_program(ep)


def from_exported_program(ep) -> tvm.IRModule:
    """Import a ``torch.export.ExportedProgram`` keeping parameters as named inputs."""
    from tvm.relax.frontend.torch import from_exported_program as _import

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mod = _import(ep, keep_params_as_input=True, unwrap_unit_return_tuple=True)
    sig = ep.graph_signature
    names = dict(sig.inputs_to_parameters)
    names.update(getattr(sig, "inputs_to_buffers", {}) or {})
    return bounded_takes(rename_params(mod, names))


@relax.expr_functor.mutator
class _BoundedTakes(relax.PyExprMutator):
    def visit_call_(self, call):
        call = super().visit_call_(call)
        if isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.take" and str(call.attrs.mode) == "fast":
            return relax.op.take(call.args[0], call.args[1], call.attrs.axis, mode="clip")
        return call


def bounded_takes(mod: tvm.IRModule) -> tvm.IRModule:
    """Index lookups (embeddings, ``Gather``) clamp their indices instead of trusting them.

    Both importers emit ``take`` in TVM's "fast" mode, which reads out of bounds on a bad index (a token id
    past the vocabulary: a segfault, not an error) and makes every compile print TOPI's "Fast mode
    segfaults when there are out-of-bounds indices" warning. "clip" costs a compare per index."""
    out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    changed = False
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            new = _BoundedTakes(mod).visit_expr(func)
            if not new.same_as(func):
                out[gv] = new
                changed = True
    return out if changed else mod


def fix_batch(mod: tvm.IRModule, batch: int) -> tvm.IRModule:
    """Bind symbolic leading (batch) dims of the inputs to ``batch``: compiled models are static."""
    func = mod["main"]
    bindings = {}
    for p in func.params[: graph_num_inputs(func)]:
        shape = p.ty.shape if isinstance(p.ty, relax.TensorType) else None
        if shape is not None and len(shape) and isinstance(shape[0], tvm.tirx.Var):
            bindings[shape[0]] = batch
    if not bindings:
        return mod
    return relax.transform.BindSymbolicVars(bindings, "main")(mod)


def load_torch_program(path: str | os.PathLike, batch: int = 1) -> tvm.IRModule:
    """Import a ``torch.export.save``-d program (``.pt2``); a dynamic batch dim is fixed to ``batch``."""
    import torch

    path = _check_file(path, (".pt2",))
    try:
        ep = torch.export.load(path)
    except Exception as exc:  # torch raises many types for bad archives
        raise ModelError(f"{path}: not a readable torch.export program ({type(exc).__name__}: {exc})") from exc
    return fix_batch(from_exported_program(ep), batch)


def _module_path(scopes: list[str]) -> str:
    """PyTorch's ONNX scope path -> the module's dotted name: ``blocks / blocks.0 / b / b.0`` is
    ``blocks.0.b.0`` (each ``x.i`` scope refines the ``x`` before it; other scopes nest)."""
    path: list[str] = []
    for s in scopes:
        if path and s.startswith(path[-1] + "."):
            path[-1] = s
        else:
            path.append(s)
    return ".".join(path)


def _onnx_layer_names(graph) -> dict[str, str]:
    """Initializer name -> source name, naming auto-named weights (``onnx::Conv_22``) after their node's
    module path; names stay unique (a repeated path gets the node's position appended)."""
    inits = {i.name for i in graph.initializer}
    taken = {i.name for i in graph.initializer if i.name.endswith(".weight") or i.name.endswith(".bias")}
    out = {}
    for pos, node in enumerate(graph.node):
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        w = node.input[1]
        if w not in inits or w.endswith(".weight") or w in out:
            continue
        if node.name:
            parts = [p for p in node.name.strip("/").split("/") if p]
            base = _module_path(parts[:-1]) if len(parts) >= 2 else parts[0]
            if f"{base}.weight" in taken:
                base = f"{base}_{pos}"
            taken.update({f"{base}.weight", f"{base}.bias"})
            out[w] = f"{base}.weight"
            if node.op_type in ("Conv", "Gemm") and len(node.input) > 2 and node.input[2] in inits:
                out[node.input[2]] = f"{base}.bias"
    return out


def _has_unknown_shapes(mod: tvm.IRModule) -> bool:
    """Whether ``main`` binds a tensor whose shape is not a known list of dims."""
    found = []

    def visit(e):
        ty = getattr(e, "ty", None)
        if isinstance(e, relax.Var) and isinstance(ty, relax.TensorType) and not isinstance(ty.shape,
                                                                                          relax.ShapeExpr):
            found.append(e)

    relax.analysis.post_order_visit(mod["main"].body, visit)
    return bool(found)


def _fold_shape_computations(model, shapes: dict[str, list[int]]):
    """``model`` with its input shapes fixed and what only depends on them folded into constants
    (``Shape -> Gather -> Concat -> Reshape`` chains that exporters write for ``x.view(b, n, -1)``), by
    ONNX Runtime's basic, hardware-independent graph optimisations; TVM's importer needs a Reshape's shape
    to be known when it reads the graph."""
    import tempfile

    import onnx
    import onnxruntime as ort

    m = onnx.ModelProto.FromString(model.SerializeToString())
    for inp in m.graph.input:
        if inp.name in shapes:
            dims = inp.type.tensor_type.shape.dim
            del dims[:]
            for d in shapes[inp.name]:
                dims.add().dim_value = int(d)
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = os.path.join(tmp, "folded.onnx")
        so.log_severity_level = 3
        ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return onnx.load(so.optimized_model_filepath)


def from_onnx(model, shape_dict: dict[str, Sequence[int]] | None = None, *, batch: int = 1,
              _source: str | None = None, _names: dict[str, str] | None = None) -> tvm.IRModule:
    """Import an ONNX model (a path or a ``ModelProto``).

    Symbolic dims of the inputs (``batch``, ``N``...) are fixed: a leading one to ``batch``, unless
    ``shape_dict`` gives the full shape. The compiled model is shape-specialised; ``tvm-lut run``
    iterates over a dataset in chunks of that batch. A graph whose reshapes compute their shapes from the
    input's (``Shape`` ops; TVM's importer rejects those) is imported after folding them for the fixed
    shapes (``_fold_shape_computations``).
    """
    import onnx

    if isinstance(model, (str, os.PathLike)):
        path = _check_file(model, (".onnx",))
        try:
            model = onnx.load(path)
            onnx.checker.check_model(model)
        except Exception as exc:
            raise ModelError(f"{path}: not a valid ONNX model ({type(exc).__name__}: {exc})") from exc
    else:
        path = _source or "<ModelProto>"
    original = model
    graph = model.graph
    init_names = {i.name for i in graph.initializer}
    shapes = dict(shape_dict or {})
    for inp in graph.input:
        if inp.name in init_names or inp.name in shapes:
            continue
        dims = []
        for i, d in enumerate(inp.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(int(d.dim_value))
            elif i == 0:
                dims.append(batch)
            else:
                raise ModelError(f"{path}: input {inp.name!r} has symbolic dim {i} ({d.dim_param!r}); "
                                 "give its shape explicitly (--input-shape)")
        shapes[inp.name] = dims
    # Give initializers unique identifiers before import, then restore source names on the Relax vars.
    model = onnx.ModelProto.FromString(model.SerializeToString())
    # Models of IR version < 4 (the ONNX zoo's mnist-8 among them) list every initializer as a graph input
    # too. TVM's importer then makes each one a function parameter twice (once as an input, once as a
    # weight) while the "params" attribute holds it once, and the compiled main expects more arguments
    # than the model has. An initializer is the weight's value here (we compile for those values), so it
    # leaves the input list.
    real_inputs = [inp for inp in model.graph.input if inp.name not in init_names]
    del model.graph.input[:]
    model.graph.input.extend(real_inputs)
    # weights keep their source names; a folded graph's nodes were renamed by ONNX Runtime's fusions
    # (``/qkv/MatMul/MatMulAddFusion``), so its names come from the graph as exported
    source = {**_onnx_layer_names(model.graph), **(_names or {})}
    safe = {}
    for i, init in enumerate(model.graph.initializer):
        tmp = f"tvmlut_w{i}"
        safe[tmp] = source.get(init.name, init.name)
        old = init.name
        init.name = tmp
        for node in model.graph.node:
            for j, name in enumerate(node.input):
                if name == old:
                    node.input[j] = tmp
    from tvm.relax.frontend.onnx import from_onnx as _import

    printed, failure = io.StringIO(), None
    # the importer prints the failing operator's inputs, and an abandoned import leaves a BlockBuilder
    # warning when it is freed: noise when the folded graph then imports (said in the error when it does not)
    with warnings.catch_warnings(), contextlib.redirect_stdout(printed), quiet_native(_ABANDONED_BUILDER):
        warnings.simplefilter("ignore")
        try:
            mod = _import(model, shape_dict=shapes, keep_params_in_input=True, sanitize_input_names=False)
        except tvm.error.OpNotImplemented as exc:
            raise ModelError(f"{path}: {exc}") from exc
        except (TypeError, ValueError, RuntimeError) as exc:
            failure = (type(exc).__name__, str(exc).strip())
        gc.collect()  # the abandoned builder goes while its warning is still captured
    if failure is None and _source is None and _has_unknown_shapes(mod):
        # a shape computed by graph ops (ShuffleNet's channel shuffle) imports as a tensor of unknown
        # shape, which nothing downstream can build or rewrite: fold the computations and import again
        log.info("%s: tensors of unknown shape after import; folding its shape computations", path)
        return from_onnx(_fold_shape_computations(original, shapes), shapes, batch=batch, _source=path,
                         _names=_onnx_layer_names(original.graph))
    if failure is not None:
        kind, text = failure
        if _source is not None:  # already folded: the importer's own limit
            said = printed.getvalue().strip().splitlines()
            first = text.splitlines()[0][:300] if text else ""
            raise ModelError(f"{path}: TVM's ONNX importer failed ({kind}: {first})"
                             + (f"; it said: {said[0][:300]}" if said else ""))
        log.info("%s: TVM's importer rejected the graph (%s); folding its shape computations", path, kind)
        return from_onnx(_fold_shape_computations(original, shapes), shapes, batch=batch, _source=path,
                         _names=_onnx_layer_names(original.graph))
    mod = bounded_takes(rename_params(mod, safe))
    return mod.with_attr(OUTPUT_NAMES_ATTR, [o.name for o in graph.output])


def load_model(path: str | os.PathLike, *, batch: int = 1, shape_dict=None) -> tvm.IRModule:
    """A model file (``.onnx`` or a ``torch.export`` ``.pt2``) as a Relax IRModule."""
    p = os.fspath(path)
    if p.endswith(".onnx"):
        return from_onnx(p, shape_dict, batch=batch)
    if p.endswith(".pt2"):
        return load_torch_program(p, batch=batch)
    _check_file(p, (".onnx", ".pt2"))
    raise AssertionError("unreachable")
