"""Find the linear layers of a Relax model: conv2d and dense (matmul with a constant weight).

A *layer* is a ``relax.nn.conv2d`` or ``relax.matmul`` whose weight can be evaluated offline (a model
parameter, a constant, or a transpose/reshape of one), together with the per-output-channel affine ops
that follow it on a single-use chain (bias ``add``, ``batch_norm`` in inference mode, ``multiply``/
``subtract``/``divide`` by per-channel constants). Those are folded into the layer's weight matrix
``(D, M)`` and bias ``(M,)``, so one matrix describes what the lookup has to reproduce.

Model parameters follow TVM's convention for frontends with ``keep_params_as_input``: ``main``'s
parameters after ``num_input`` are weights whose values sit in the function attribute ``"params"``,
and whose variable names are the source names (``features.3.weight``). A layer is named after its
weight (``features.3``), so options and reports use the names the user knows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax

LINEAR_OPS = ("relax.nn.conv2d", "relax.matmul")
#: Weighted layers that are listed (and stay exact, with the reason) but not rewritten
OTHER_WEIGHT_OPS = {"relax.nn.conv1d": "conv1d", "relax.nn.conv3d": "conv3d",
                    "relax.nn.conv1d_transpose": "conv1d_transpose", "relax.nn.conv2d_transpose": "conv2d_transpose"}


# ----------------------------------------------------------------------------------------------
# Model parameters
# ----------------------------------------------------------------------------------------------


def num_inputs(func: relax.Function) -> int:
    """Number of data inputs of ``func`` (the rest of its parameters are weights)."""
    if func.attrs is not None and "num_input" in func.attrs:
        return int(func.attrs["num_input"])
    return len(func.params)


def param_values(func: relax.Function) -> dict[str, np.ndarray]:
    """Weight name -> value, from the ``"params"`` attribute that keep-params frontends attach."""
    if func.attrs is None or "params" not in func.attrs:
        return {}
    weights = func.params[num_inputs(func) :]
    return {p.name: t.numpy() for p, t in zip(weights, func.attrs["params"])}


def input_signature(func: relax.Function) -> list[tuple[str, tuple, str]]:
    """(name, shape, dtype) of each data input; symbolic dims appear as their name (a str)."""
    out = []
    for p in func.params[: num_inputs(func)]:
        shape = tuple(int(d) if isinstance(d, tvm.tirx.IntImm) else str(d) for d in p.ty.shape)
        out.append((p.name, shape, str(p.ty.dtype)))
    return out


# ----------------------------------------------------------------------------------------------
# Offline evaluation of weight expressions
# ----------------------------------------------------------------------------------------------


def _static_shape(ty) -> tuple[int, ...] | None:
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    dims = []
    for d in ty.shape:
        if not isinstance(d, tvm.tirx.IntImm):
            return None
        dims.append(int(d))
    return tuple(dims)


_CONST_ELEMENTWISE = {
    "relax.abs": np.abs, "relax.negative": np.negative, "relax.sqrt": np.sqrt,
    "relax.rsqrt": lambda a: 1 / np.sqrt(a), "relax.exp": np.exp,
    "relax.add": np.add, "relax.subtract": np.subtract, "relax.multiply": np.multiply,
    "relax.divide": np.divide, "relax.power": np.power, "relax.maximum": np.maximum, "relax.minimum": np.minimum,
}


class _Resolver:
    """Evaluates, in numpy, the expressions that only depend on weights and constants."""

    def __init__(self, func: relax.Function, bindings: dict):
        self.params = {p: v for p, v in zip(func.params[num_inputs(func) :], param_values(func).values())}
        self.bindings = bindings
        self._memo: dict = {}

    def source_param(self, expr) -> relax.Var | None:
        while True:
            if expr in self.params:
                return expr
            value = self.bindings.get(expr)
            if isinstance(value, relax.Call) and value.args:
                expr = value.args[0]
                continue
            return None

    def value(self, expr) -> np.ndarray | None:
        if expr in self._memo:
            return self._memo[expr]
        out = self._value(expr)
        self._memo[expr] = out
        return out

    def _value(self, expr) -> np.ndarray | None:
        if isinstance(expr, tvm.ir.GenericConst) and isinstance(expr.ty, relax.TensorType):
            return expr.value.numpy()
        if expr in self.params:
            return self.params[expr]
        value = self.bindings.get(expr)
        if not isinstance(value, relax.Call) or not isinstance(value.op, tvm.ir.Op):
            return None
        name = value.op.name
        if name in ("relax.permute_dims", "relax.reshape", "relax.astype", "relax.expand_dims", "relax.squeeze"):
            arg = self.value(value.args[0])
            shape = _static_shape(value.ty)
            if arg is None or shape is None:
                return None
            if name == "relax.permute_dims":
                axes = value.attrs.axes
                arg = np.transpose(arg, None if axes is None else [int(a) for a in axes])
            elif name == "relax.astype":
                arg = arg.astype(str(value.attrs.dtype))
            return np.ascontiguousarray(arg).reshape(shape)
        if name in _CONST_ELEMENTWISE or name in ("relax.sum", "relax.mean", "relax.broadcast_to"):
            return self._evaluate(value, name)
        return None

    def _evaluate(self, call, name: str) -> np.ndarray | None:
        """Weight arithmetic that exporters leave in the graph (weight norm's ``g * v / ||v||``, a weight
        broadcast to a batched matmul), evaluated in numpy when every operand is constant."""
        shape = _static_shape(call.ty)
        if shape is None:
            return None
        args = []
        for a in call.args:
            if isinstance(a, relax.ShapeExpr):
                continue
            v = self.value(a)
            if v is None:
                return None
            args.append(v)
        if name in _CONST_ELEMENTWISE:
            out = _CONST_ELEMENTWISE[name](*args)
        elif name == "relax.broadcast_to":
            out = np.broadcast_to(args[0], shape)
        else:
            axis = call.attrs.axis
            axis = None if axis is None else tuple(int(a) for a in axis)
            reduce = np.sum if name == "relax.sum" else np.mean
            out = reduce(args[0], axis=axis, keepdims=bool(call.attrs.keepdims))
        dtype = str(call.ty.dtype)
        out = np.asarray(out).astype(dtype, copy=False)
        return np.ascontiguousarray(out).reshape(shape) if out.shape == shape else None


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------


@dataclass
class Layer:
    """One conv2d/dense layer of the model, with its affine epilogue folded in."""

    name: str
    kind: str  # "conv2d" | "dense"
    call_var: relax.Var  # binding of the conv2d/matmul
    output_var: relax.Var  # last binding of the folded epilogue (== call_var when none)
    folded_vars: list = field(default_factory=list)  # bindings absorbed into the layer (dropped on rewrite)
    input_expr: object = None  # the activation argument
    input_shape: tuple = ()
    output_shape: tuple = ()
    weight: np.ndarray | None = None  # (D, M), rows ordered (c, kh, kw) for conv
    bias: np.ndarray | None = None  # (M,)
    weight_param: str | None = None  # source name of the weight parameter
    conv: dict | None = None  # kernel_hw, strides, padding, dilation
    unsupported: str | None = None  # why the lookup rewrite cannot apply (stays exact)
    model_batch: int | None = None  # the model's batch (its first input's leading dim), when static

    @property
    def d(self) -> int:
        return int(self.weight.shape[0])

    @property
    def m(self) -> int:
        return int(self.weight.shape[1])

    @property
    def batch(self) -> int:
        return int(self.input_shape[0])

    @property
    def rows_per_sample(self) -> int:
        """Rows one input sample contributes to the layer's (rows x D) matrix. A dense layer's input may
        hold a sample's tokens folded into its first axis (a transformer imported at batch 1 multiplies
        ``(tokens, d)``): its rows are then counted against the model's batch, not that axis."""
        if self.kind == "conv2d":
            return int(self.output_shape[2] * self.output_shape[3])
        if self.model_batch and self.rows % self.model_batch == 0 and self.rows > self.model_batch:
            return self.rows // self.model_batch
        return int(math.prod(self.input_shape[1:-1])) if len(self.input_shape) > 2 else 1

    @property
    def rows(self) -> int:
        """Rows of the layer's (rows x D) matrix at the compiled batch (the kernels' N)."""
        if self.kind == "conv2d":
            return self.batch * self.rows_per_sample
        return int(math.prod(self.input_shape[:-1]))


def uses(func: relax.Function) -> tuple[dict, dict]:
    """(var -> bound value, var -> list of consumer binding vars; the function result counts once)."""
    bindings, consumers = {}, {}

    def refs(expr):
        if isinstance(expr, relax.Call):
            return list(expr.args)
        if isinstance(expr, relax.Tuple):
            return list(expr.fields)
        if isinstance(expr, relax.TupleGetItem):
            return [expr.tuple_value]
        return [expr]

    body = func.body
    for block in body.blocks:
        for b in block.bindings:
            value = b.value
            bindings[b.var] = value
            for r in refs(value):
                if isinstance(r, relax.Var):
                    consumers.setdefault(r, []).append(b.var)
    for r in refs(body.body):
        if isinstance(r, relax.Var):
            consumers.setdefault(r, []).append(None)
    return bindings, consumers


def _per_channel(vec: np.ndarray, out_shape: tuple, axis: int) -> np.ndarray | None:
    """A per-output-channel vector (M,) from a constant broadcast against ``out_shape``, else None."""
    m = out_shape[axis]
    if vec.size == 1:
        return np.full((m,), vec.reshape(()), dtype=np.float32)
    if vec.ndim > len(out_shape):
        return None
    shape = (1,) * (len(out_shape) - vec.ndim) + vec.shape
    for i, s in enumerate(shape):
        if s != 1 and not (i == axis % len(out_shape) and s == m):
            return None
    return vec.reshape(-1).astype(np.float32)


def _fold_epilogue(layer: Layer, bindings, consumers, resolver: _Resolver, w: np.ndarray, b: np.ndarray):
    """Follow single-use affine ops after the layer and fold them into (w, b). Returns (w, b)."""
    axis = 1 if layer.kind == "conv2d" else -1
    cur = layer.call_var
    while True:
        users = consumers.get(cur, [])
        if len(users) != 1 or users[0] is None:
            break
        nxt = users[0]
        value = bindings[nxt]
        if not isinstance(value, relax.Call) or not isinstance(value.op, tvm.ir.Op):
            break
        op = value.op.name
        if op in ("relax.add", "relax.subtract", "relax.multiply", "relax.divide") and len(value.args) == 2:
            other = value.args[1] if value.args[0].same_as(cur) else value.args[0]
            if other.same_as(cur):
                break
            const = resolver.value(other)
            if const is None or _static_shape(value.ty) != tuple(layer.output_shape):
                break
            vec = _per_channel(const, layer.output_shape, axis)
            if vec is None:
                break
            if op == "relax.add":
                b = b + vec
            elif op == "relax.subtract":
                if not value.args[0].same_as(cur):
                    break  # c - y is not an epilogue of y
                b = b - vec
            elif op == "relax.multiply":
                w, b = w * vec, b * vec
            else:
                if not value.args[0].same_as(cur):
                    break
                w, b = w / vec, b / vec
            layer.folded_vars.append(nxt)
            cur = nxt
            continue
        if op == "relax.nn.batch_norm" and value.args[0].same_as(cur):
            if int(value.attrs.axis) % len(layer.output_shape) != axis % len(layer.output_shape):
                break
            if bool(getattr(value.attrs, "training", False)):
                break
            gamma, beta, mean, var = (resolver.value(a) for a in value.args[1:5])
            tuple_users = consumers.get(nxt, [])
            if any(x is None for x in (gamma, beta, mean, var)) or len(tuple_users) != 1 or tuple_users[0] is None:
                break
            getitem = bindings[tuple_users[0]]
            if not isinstance(getitem, relax.TupleGetItem) or int(getitem.index) != 0:
                break
            eps = float(value.attrs.epsilon)
            s = (gamma if value.attrs.scale else np.ones_like(var)) / np.sqrt(var + eps)
            shift = beta if value.attrs.center else np.zeros_like(mean)
            w, b = w * s.astype(np.float32), ((b - mean) * s + shift).astype(np.float32)
            layer.folded_vars += [nxt, tuple_users[0]]
            cur = tuple_users[0]
            continue
        break
    layer.output_var = cur
    return w.astype(np.float32), b.astype(np.float32)


def _layer_name(param: str) -> str:
    """A layer's name from its weight parameter's: ``conv1.weight`` -> ``conv1``; a parametrized weight
    (torch's weight norm: ``conv.parametrizations.weight.original1``) -> ``conv``."""
    for suffix in (".parametrizations.weight.original0", ".parametrizations.weight.original1", ".weight"):
        if param.endswith(suffix):
            return param[: -len(suffix)]
    return param


def _other_weight_layer(call, var, kind: str, resolver, index: int) -> Layer | None:
    """A conv1d/conv3d/transposed conv with a constant weight: listed so that the report says why it stays
    exact, instead of leaving it out silently."""
    if resolver.value(call.args[1]) is None:
        return None
    src = resolver.source_param(call.args[1])
    name = _layer_name(src.name) if src is not None else f"{kind}_{index}"
    x = call.args[0]
    layer = Layer(name=name, kind=kind, call_var=var, output_var=var, input_expr=x,
                  weight_param=None if src is None else src.name,
                  unsupported=f"{kind} layers are not rewritten (only conv2d and dense are)")
    layer.input_shape = _static_shape(x.ty) or ()
    layer.output_shape = _static_shape(call.ty) or ()
    return layer


def find_layers(mod: tvm.IRModule, func_name: str = "main") -> list[Layer]:
    """All conv2d/dense layers of ``mod[func_name]`` in program order, named by their weight; other
    weighted layers (conv1d, conv3d, transposed convs) are listed as unsupported, with the reason."""
    func = mod[func_name]
    bindings, consumers = uses(func)
    resolver = _Resolver(func, bindings)
    signature = input_signature(func)
    model_batch = signature[0][1][0] if signature and signature[0][1] and isinstance(signature[0][1][0], int) else None
    layers: list[Layer] = []
    seen: dict[str, int] = {}
    for var, value in bindings.items():
        if not isinstance(value, relax.Call) or not isinstance(value.op, tvm.ir.Op):
            continue
        if value.op.name in OTHER_WEIGHT_OPS and len(value.args) == 2:
            other = _other_weight_layer(value, var, OTHER_WEIGHT_OPS[value.op.name], resolver, len(layers))
            if other is not None:
                layers.append(other)
            continue
        if value.op.name not in LINEAR_OPS or len(value.args) != 2:
            continue
        kind = "conv2d" if value.op.name == "relax.nn.conv2d" else "dense"
        wexpr = value.args[1]
        w = resolver.value(wexpr)
        if w is None:
            continue  # activation x activation matmul (attention etc.): not a layer
        src = resolver.source_param(wexpr)
        if src is not None:
            base = _layer_name(src.name)
        else:
            base = f"{kind}_{len(layers)}"
        count = seen.get(base, 0)
        seen[base] = count + 1
        name = base if count == 0 else f"{base}#{count + 1}"
        x = value.args[0]
        in_shape, out_shape = _static_shape(x.ty), _static_shape(value.ty)
        layer = Layer(name=name, kind=kind, call_var=var, output_var=var, input_expr=x,
                      weight_param=None if src is None else src.name, model_batch=model_batch)
        if in_shape is None or out_shape is None:
            layer.unsupported = "dynamic shape (the lookup kernels are shape-specialised)"
            layer.input_shape = tuple(str(d) for d in x.ty.shape) if x.ty.shape is not None else ()
            layers.append(layer)
            continue
        layer.input_shape, layer.output_shape = in_shape, out_shape
        if str(x.ty.dtype) != "float32":
            layer.unsupported = f"input dtype {x.ty.dtype} (only float32 layers are rewritten)"
        if kind == "conv2d":
            a = value.attrs
            layer.conv = {
                "kernel_hw": (int(w.shape[2]), int(w.shape[3])),
                "strides": tuple(int(s) for s in a.strides),
                "padding": tuple(int(p) for p in a.padding),
                "dilation": tuple(int(d) for d in a.dilation),
                "groups": int(a.groups),
            }
            if int(a.groups) != 1:
                layer.unsupported = f"grouped/depthwise conv (groups={int(a.groups)})"
            elif (a.data_layout, a.kernel_layout, a.out_layout or a.data_layout) != ("NCHW", "OIHW", "NCHW"):
                layer.unsupported = f"layout {a.data_layout}/{a.kernel_layout} (only NCHW/OIHW)"
            mat = w.reshape(w.shape[0], -1).T  # (C*KH*KW, M), rows ordered (c, kh, kw)
        else:
            while 2 < w.ndim <= int(x.ty.ndim) and w.shape[0] > 0 and (w == w[:1]).all():
                w = w[0]  # a 2-D weight broadcast over a batched matmul's leading axes
            if w.ndim != 2:
                layer.unsupported = f"batched weight of shape {w.shape}"
                layers.append(layer)
                continue
            mat = w
        bias0 = np.zeros(mat.shape[1], np.float32)
        if layer.unsupported is None:
            mat, bias = _fold_epilogue(layer, bindings, consumers, resolver, mat.astype(np.float32), bias0)
        else:
            bias = bias0
        layer.weight = np.ascontiguousarray(mat, dtype=np.float32)
        layer.bias = bias if np.any(bias != 0) or layer.folded_vars else None
        layers.append(layer)
    return layers
