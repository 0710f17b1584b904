"""``butterfly``: a chain of sparse butterfly factors in place of the dense weight (DeBut).

Fit: the chain from ``butterfly.chain_for`` within the parameter ``budget`` (a count, or a fraction of the
dense layer; default 0.2) and its factors by ALS on the layer's weight, or trained ones (``factors=``,
``structured_nn``). Emit: im2col (conv) -> one grouped-matmul kernel per factor -> slice padding + bias.
"""

from __future__ import annotations

import numpy as np
from tvm import relax

from tir_schedules import kernels
from tvm_lut.errors import OptionError
from tvm_lut.frontend import graph
from tvm_lut.math import butterfly as bf, cost

from ..registry import KeepExact, RewriteMethod, register
from ..rewrite import LookupEmitter, Plan, ident


class ButterflyMethod(RewriteMethod):
    name = "butterfly"
    description = "butterfly factor chain (DeBut)"

    def configure(self, plan: Plan, options, planner) -> None:
        plan.record["budget"] = options.budget or planner.defaults.budget

    def fit(self, plan: Plan, planner, rows=None, targets=None) -> None:
        r, layer = plan.record, plan.layer
        w_md = layer.weight.T.astype(np.float64)  # (M, D), conv columns (c, kh, kw)
        if layer.name in planner.factors:
            # given by the user: a mismatch is an error, never silently an exact layer
            plan.chain, plan.factors = trained_chain(layer, planner.factors[layer.name])
        else:
            try:
                plan.chain = bf.chain_for(layer.d, layer.m, r["budget"])
            except OptionError as e:
                raise KeepExact(str(e)) from None
            plan.factors, r["fit_error"] = bf.als_fit(w_md, plan.chain, sweeps=4, seed=planner.seed)
        if "fit_error" not in r:
            r["fit_error"] = float(np.linalg.norm(w_md - bf.product(plan.chain, plan.factors))
                                   / (np.linalg.norm(w_md) or 1.0))
        r.update(chain=plan.chain.describe(), params=plan.chain.params, wasted_params=plan.chain.wasted_params)

    def account(self, plan: Plan) -> None:
        r, layer, chain = plan.record, plan.layer, plan.chain
        has_bias = layer.bias is not None
        r["lut_ops"] = cost.butterfly_ops(layer.rows_per_sample, [f.p for f in chain.factors], chain.params,
                                          layer.m, has_bias)
        r["factor_bytes"] = cost.param_bytes(chain.params, layer.m, has_bias)

    def emit(self, emitter: LookupEmitter, plan: Plan, x, as_output: bool):
        return _emit_butterfly(emitter, plan, x, as_output)

    def columns(self, record: dict) -> str:
        return f"chain {record['chain']}"


register(ButterflyMethod())


def trained_chain(layer: graph.Layer, entry) -> tuple[bf.Chain, list[np.ndarray]]:
    """A ``factors=`` entry checked against the layer, with the per-output scale the compiler folded
    into the layer (batch norm, ``multiply``) moved into the last factor's rows."""
    try:
        chain = bf.Chain.from_json(entry["chain"])
        values = [np.asarray(v, np.float32) for v in entry["values"]]
    except (KeyError, TypeError, ValueError) as e:
        raise OptionError(f"factors[{layer.name!r}] must be {{'chain': ..., 'values': [...]}}: {e}") from None
    if (chain.d_in, chain.d_out) != (layer.d, layer.m):
        raise OptionError(f"factors[{layer.name!r}]: chain {chain.d_in} -> {chain.d_out} does not match the layer "
                          f"({layer.d} -> {layer.m})")
    if len(values) != len(chain.factors) or any(v.shape != f.shape for v, f in zip(values, chain.factors)):
        raise OptionError(f"factors[{layer.name!r}]: value shapes {[v.shape for v in values]} do not match the chain "
                          f"{[f.shape for f in chain.factors]}")
    prod = bf.product(chain, values)  # (M, D)
    target = layer.weight.T.astype(np.float64)
    norm2 = (prod ** 2).sum(1)
    scale = np.where(norm2 > 0, (prod * target).sum(1) / np.maximum(norm2, 1e-300), 1.0)
    if np.linalg.norm(prod * scale[:, None] - target) > 1e-3 * (np.linalg.norm(target) or 1.0):
        raise OptionError(f"factors[{layer.name!r}] do not reproduce the layer's weight (up to a per-output scale): "
                          "were they trained for this model?")
    last, f = values[-1].copy(), chain.factors[-1]
    rows, _cols = bf.support(f)
    full = np.ones(f.p)
    full[: layer.m] = scale
    values[-1] = (last.reshape(-1) * full[rows]).reshape(f.shape).astype(np.float32)
    return chain, values


def _emit_butterfly(em: LookupEmitter, plan: Plan, x, as_output: bool):
    """im2col/reshape -> one grouped-matmul kernel per factor -> slice padded outputs -> bias."""
    layer, chain, bb = plan.layer, plan.chain, em.builder_
    rows, tag = layer.rows, ident(layer.name)
    y = em.rows(plan, x, chain.in_pad)
    for i, (f, vals) in enumerate(zip(chain.factors, plan.factors)):
        gv = em.kernel(("butterfly", rows, f.blocks, f.r, f.s, f.t), f"debut_factor_{tag}_{i}",
                          lambda f=f: kernels.butterfly_factor(rows, f.blocks, f.r, f.s, f.t))
        w = np.ascontiguousarray(np.asarray(vals, np.float32).transpose(0, 2, 1, 3))  # (nb, s, r, t)
        y = bb.emit(relax.call_tir(gv, [y, relax.const(w)], relax.TensorType((rows, f.p), "float32")))
    steps = []
    if chain.out_pad != layer.m:
        steps.append(lambda y: relax.op.strided_slice(y, axes=[1], begin=[0], end=[layer.m]))
    return em.epilogue(layer, y, steps, layer.bias, as_output)
