"""EZCrop: FFT energy-ratio channel pruning that physically removes channels from a Relax model.

Score (Lin et al., EZCrop): for each output channel of a conv layer, on calibration data,
``S = log(1 + |fftshift(FFT2(F))|)`` of its feature map ``F`` (after the layer's activation, before
any pooling); ``ratio = 1 - (sum of S in the centred square of half-width ceil(alpha * h/2), alpha=0.25)
/ (sum of S)``, averaged over the samples. Channels with much energy away from the centre carry detail;
the lowest-ratio channels are pruned (``tvm_lut.math.channel_energy.channel_scores`` is the numpy reference).

Removal is physical, as the module is rewritten: the pruned conv is re-emitted with only the kept
output channels (its bias and batch norm folded into the kept weights: batch norm parameters of the
removed channels disappear with them), the channel-wise ops after it (ReLU, pooling...) simply run on
fewer channels, and the *next* layer is re-emitted with only the matching input channels (for a dense
layer after a flatten, the matching columns). Weight parameters keep their source names, so later
passes and reports still say ``features.3``.

A conv is a candidate only when its output reaches exactly one next conv/dense layer through
single-use channel-wise ops (a plain chain, as in VGG); a residual add, a concat or a grouped next
layer keeps it whole, with the reason in its record (``records(mod)``: the ``tvm_lut.ezcrop`` attribute).
"""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from tvm_lut.errors import OptionError
from tvm_lut.frontend import graph
from tvm_lut.math import channel_energy
from tvm_lut.runtime import calibrate
from tvm_lut.runtime.build import BatchRunner, bind_params, resolve_target

log = logging.getLogger("tvm_lut")

EZCROP_ATTR = "tvm_lut.ezcrop"

#: ops that act on each channel independently (pruning a channel before them removes it after them)
CHANNELWISE = {"relax.nn.relu", "relax.nn.max_pool2d", "relax.nn.avg_pool2d", "relax.clip", "relax.nn.gelu",
               "relax.nn.silu", "relax.sigmoid", "relax.tanh", "relax.nn.leakyrelu", "relax.nn.relu6"}
POOLS = {"relax.nn.max_pool2d", "relax.nn.avg_pool2d"}


def _follow(layer: graph.Layer, by_call: dict, bindings: dict, consumers: dict):
    """From a conv's output, the single-use channel-wise path to the next layer.

    Returns (next layer, the var whose maps are scored, a flatten reshape var or None), or a str reason.
    """
    cur, score_var, seen_pool = layer.output_var, layer.output_var, False
    while True:
        users = consumers.get(cur, [])
        if len(users) != 1 or users[0] is None:
            return "its output has several users or is a model output (residual/branch)"
        nxt = users[0]
        value = bindings[nxt]
        if nxt in by_call:
            nl = by_call[nxt]
            if not value.args[0].same_as(cur):
                return f"it feeds {nl.name} as a weight"
            if nl.unsupported or nl.kind != "conv2d":
                return f"next layer {nl.name} cannot take fewer inputs ({nl.unsupported or nl.kind})"
            return nl, score_var, None
        if not isinstance(value, relax.Call) or not isinstance(value.op, tvm.ir.Op):
            return "a non-operator use follows it"
        op = value.op.name
        if op in CHANNELWISE and value.args[0].same_as(cur):
            if op in POOLS:
                seen_pool = True
            elif not seen_pool:
                score_var = nxt
            cur = nxt
            continue
        if op == "relax.reshape" and len(value.ty.shape) == 2:  # flatten (N, C, H, W) -> (N, C*H*W)
            users2 = consumers.get(nxt, [])
            if len(users2) == 1 and users2[0] in by_call and by_call[users2[0]].kind == "dense" \
                    and bindings[users2[0]].args[0].same_as(nxt):
                return by_call[users2[0]], score_var, nxt
        return f"{op} follows it (not channel-wise)"


@tvm.transform.module_pass(opt_level=0, name="EZCrop")
class EZCrop:
    """Prune conv output channels by FFT energy ratio and remove them physically.

    Parameters
    ----------
    calibration : model inputs to score channels on (a few hundred samples; ``max_samples`` are used).
    ratio : fraction of each candidate conv's output channels to remove (``0.5``), or a dict by layer
        name (layers not in it are kept whole).
    alpha : half-width of the centred low-frequency square, as a fraction of half the map size.
    exclude : layer names never pruned.
    """

    def __init__(self, calibration, ratio=0.5, *, alpha: float = 0.25, exclude=(), max_samples: int = 256,
                 target="x86", seed: int = 0):
        if isinstance(ratio, dict):
            bad = {k: v for k, v in ratio.items() if not 0 <= float(v) < 1}
        else:
            bad = {"*": ratio} if not 0 <= float(ratio) < 1 else {}
        if bad:
            raise OptionError(f"EZCrop ratio {bad} must be within [0, 1): the fraction of channels removed")
        if not 0 < alpha < 1:
            raise OptionError(f"EZCrop alpha {alpha} must be within (0, 1)")
        self.calibration = calibration
        self.ratio = ratio
        self.alpha = alpha
        self.exclude = set(exclude)
        self.max_samples = max_samples
        self.target = target
        self.seed = seed

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        # torch's max_pool2d arrives as (out, zeros_like(out))[0]: fold such tuples away first, so a
        # pooled map has the one user it really has
        mod = relax.transform.DeadCodeElimination(["main"])(relax.transform.CanonicalizeBindings()(mod))
        func = mod["main"]
        found = graph.find_layers(mod)
        names = {l.name for l in found}
        asked = set(self.ratio) if isinstance(self.ratio, dict) else set()
        unknown = sorted((asked | self.exclude) - names)
        if unknown:
            raise OptionError(f"unknown layer name(s) {unknown}; the model's layers are: {sorted(names)}")
        bindings, consumers = graph.uses(func)
        by_call = {l.call_var: l for l in found}
        pairs, records = {}, {l.name: {"name": l.name, "kind": l.kind, "pruned": False} for l in found}
        for l in found:
            rec = records[l.name]
            frac = self.ratio.get(l.name, 0.0) if isinstance(self.ratio, dict) else float(self.ratio)
            if l.kind != "conv2d" or l.name in self.exclude or frac <= 0:
                rec["reason"] = "not requested" if l.kind == "conv2d" else f"{l.kind} output (not pruned)"
                continue
            if l.unsupported:
                rec["reason"] = l.unsupported
                continue
            nxt = _follow(l, by_call, bindings, consumers)
            if isinstance(nxt, str):
                rec["reason"] = nxt
                log.info("EZCrop: %s kept whole: %s", l.name, nxt)
                continue
            pairs[l.name] = (l, *nxt, frac)
        if not pairs:
            return mod.with_attr(EZCROP_ATTR, json.dumps(list(records.values())))
        # score the channels of every candidate on the calibration data
        signature = graph.input_signature(func)
        inputs = calibrate.normalize_inputs(self.calibration, signature)
        n = len(next(iter(inputs.values())))
        if n > self.max_samples:
            idx = np.sort(np.random.default_rng(self.seed).choice(n, self.max_samples, replace=False))
            inputs = {k: v[idx] for k, v in inputs.items()}
        order = list(pairs)
        tgt = resolve_target(self.target)
        inst = calibrate.expose(mod, [pairs[nm][2] for nm in order])
        runner = BatchRunner(tvm.compile(bind_params(inst), tgt), [], signature)
        sums = {nm: None for nm in order}
        count = 0
        for outs, valid in runner.run_batches(inputs):
            for nm, fmap in zip(order, outs[1:]):
                s = channel_energy.channel_scores(fmap[:valid], self.alpha) * valid
                sums[nm] = s if sums[nm] is None else sums[nm] + s
            count += valid
        keep_out: dict[str, np.ndarray] = {}
        for nm in order:
            layer, _nl, _sv, _flat, frac = pairs[nm]
            scores = sums[nm] / count
            m = layer.m
            k = max(1, m - int(math.floor(frac * m + 1e-9)))
            keep = np.sort(np.argsort(-scores, kind="stable")[:k])
            keep_out[nm] = keep
            records[nm].update(pruned=True, channels=m, kept=int(k), kept_channels=keep.tolist(),
                               scores=[float(v) for v in scores], next_layer=pairs[nm][1].name)
        out = _prune(mod, found, pairs, keep_out)
        return out.with_attr(EZCROP_ATTR, json.dumps(list(records.values())))


def records(mod: tvm.IRModule) -> list[dict]:
    """The per-layer records an EZCrop run left on ``mod`` (pruned or not, why, the kept channels)."""
    if mod.attrs is None or EZCROP_ATTR not in mod.attrs:
        raise ValueError("this module has not been through EZCrop (no tvm_lut.ezcrop attribute)")
    return json.loads(str(mod.attrs[EZCROP_ATTR]))


@mutator
class _Pruner(PyExprMutator):
    """Re-emits every touched layer (pruned outputs and/or inputs) with its folded, sliced weight as a
    fresh parameter carrying the source name; flatten reshapes get the smaller width."""

    def __init__(self, mod, plans: dict, reshapes: dict):
        super().__init__(mod)
        self.plans = plans  # call_var -> (layer, weight (M', C', kh, kw) or (D', M'), bias (M',), param name)
        self.reshapes = reshapes  # reshape var -> new 2-D width
        self.drop = [v for (l, *_r) in plans.values() for v in l.folded_vars]
        self.new_params: list[tuple[relax.Var, np.ndarray]] = []

    def visit_var_binding_(self, binding):
        plan = self.plans.get(binding.var)
        if plan is not None:
            layer, w, b, pname = plan
            x = self.visit_expr(layer.input_expr)
            wvar = relax.Var(pname, relax.TensorType(list(w.shape), "float32"))
            self.new_params.append((wvar, w))
            if layer.kind == "conv2d":
                cv = layer.conv
                y = self.builder_.emit(relax.op.nn.conv2d(x, wvar, strides=cv["strides"], padding=cv["padding"],
                                                          dilation=cv["dilation"]))
                bshape = (1, w.shape[0], 1, 1)
            else:
                y = self.builder_.emit(relax.op.matmul(x, wvar))
                bshape = (w.shape[1],)
            if b is not None:
                y = self.builder_.emit(relax.op.add(y, relax.const(b.reshape(bshape).astype(np.float32))))
            out = layer.output_var
            if not isinstance(out, relax.DataflowVar):
                y = self.builder_.emit_output(y)
            self.set_var_remap(out, y)
            return
        if any(binding.var.same_as(v) for v in self.drop):
            return
        width = self.reshapes.get(binding.var)
        if width is not None:
            x = self.visit_expr(binding.value.args[0])
            n = int(binding.var.ty.shape[0])
            new = self.builder_.emit(relax.op.reshape(x, (n, width)))
            self.set_var_remap(binding.var, new)
            return
        super().visit_var_binding_(binding)


def _prune(mod: tvm.IRModule, found: list, pairs: dict, keep_out: dict) -> tvm.IRModule:
    """Slice weights (outputs of pruned layers, inputs of their next layers) and rewrite ``main``."""
    keep_in: dict[str, tuple[np.ndarray, object]] = {}
    reshapes = {}
    for nm, (layer, nl, _sv, flat, _f) in pairs.items():
        keep = keep_out[nm]
        if flat is not None:  # dense after flatten: columns c*HW .. (c+1)*HW of each kept channel
            hw = nl.d // layer.m
            cols = (keep[:, None] * hw + np.arange(hw)[None, :]).reshape(-1)
            keep_in[nl.name] = cols
            reshapes[flat] = len(cols)
        else:
            keep_in[nl.name] = keep
    plans = {}
    for layer in found:
        nm = layer.name
        if nm not in keep_out and nm not in keep_in:
            continue
        w, b = layer.weight, (layer.bias if layer.bias is not None else None)  # (D, M) folded
        if layer.kind == "conv2d":
            kh, kw = layer.conv["kernel_hw"]
            w4 = w.T.reshape(layer.m, -1, kh, kw)
            if nm in keep_in:
                w4 = w4[:, keep_in[nm]]
            if nm in keep_out:
                w4, b = w4[keep_out[nm]], (None if b is None else b[keep_out[nm]])
            new_w = np.ascontiguousarray(w4, np.float32)
        else:
            new_w = w[keep_in[nm]] if nm in keep_in else w
            new_w = np.ascontiguousarray(new_w, np.float32)
        pname = layer.weight_param or f"{nm}.weight"
        plans[layer.call_var] = (layer, new_w, b, pname)
    func = mod["main"]
    m = _Pruner(mod, plans, reshapes)
    body_fn = m.visit_expr(func)
    values = list(func.attrs["params"]) if func.attrs is not None and "params" in func.attrs else []
    params = list(body_fn.params) + [v for v, _ in m.new_params]
    new = relax.Function(params, body_fn.body, body_fn.ret_ty, body_fn.is_pure, body_fn.attrs)
    new = new.with_attr("params", values + [tvm.runtime.tensor(w) for _, w in m.new_params])
    out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    out["main"] = new
    out = relax.transform.Normalize()(out)
    out = relax.transform.DeadCodeElimination(["main"])(out)
    from .rewrite import drop_unused_params

    return drop_unused_params(out)
