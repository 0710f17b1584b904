"""``lowrank``: the weight as a product of low-rank factors (NRMF/EVBMF ranks by default).

Fit: a pair (dense: two matmuls; conv: KxK then 1x1) or Tucker-2 (conv: 1x1 -> KxK -> 1x1) at the rank
``rank`` gives (``"evbmf"``, an int, ``[r_in, r_out]`` or ``"energy=0.95"``), the cheaper form unless
``form`` says; a rank that removes no multiplies keeps the layer exact. Emit: the matmuls/convs, keeping
the conv's stride, padding and dilation.
"""

from __future__ import annotations

import numpy as np
from tvm import relax

from tvm_lut.errors import OptionError
from tvm_lut.math import cost, lowrank as lr

from ..registry import KeepExact, RewriteMethod, register
from ..rewrite import LookupEmitter, Plan


class LowRankMethod(RewriteMethod):
    name = "lowrank"
    description = "low-rank factors (EVBMF ranks)"

    def configure(self, plan: Plan, options, planner) -> None:
        rank = options.rank or planner.defaults.rank
        plan.record["rank_rule"] = list(rank) if isinstance(rank, tuple) else rank
        plan.record["form"] = options.form or planner.defaults.form

    def fit(self, plan: Plan, planner, rows=None, targets=None) -> None:
        r, layer = plan.record, plan.layer
        w_md = layer.weight.T.astype(np.float64)  # (M, D), conv columns (c, kh, kw)
        kh, kw = layer.conv["kernel_hw"] if layer.kind == "conv2d" else (1, 1)
        w = w_md if layer.kind == "dense" else w_md.reshape(layer.m, -1, kh, kw)
        rank = r["rank_rule"]
        try:
            if isinstance(rank, list):  # [r_in, r_out]: Tucker-2 at these ranks
                plan.lowrank = lr.factorize_tucker2(w, rank[1], rank[0])
            else:
                plan.lowrank = lr.factorize(w, rank, r["form"])
        except OptionError as e:
            raise KeepExact(str(e)) from None
        stride_area = 1 if layer.kind == "dense" else layer.conv["strides"][0] * layer.conv["strides"][1]
        lr_mul = plan.lowrank.mul_per_pixel(layer.d // (kh * kw), layer.m, stride_area)
        r.update(form=plan.lowrank.form, ranks=list(plan.lowrank.ranks), params=plan.lowrank.params,
                 fit_error=lr.relative_error(w, plan.lowrank))
        if lr_mul >= layer.d * layer.m:
            raise KeepExact(f"rank {list(plan.lowrank.ranks)} ({plan.lowrank.form}) removes no multiplies "
                            f"({lr_mul} vs {layer.d * layer.m} per output pixel)")

    def account(self, plan: Plan) -> None:
        r, layer, f = plan.record, plan.layer, plan.lowrank
        rows, m, d, has_bias = layer.rows_per_sample, layer.m, layer.d, layer.bias is not None
        if layer.kind == "dense" or f.form == "pair":
            stages = [(rows, d, f.ranks[0]), (rows, f.ranks[0], m)]
        else:
            kh, kw = f.kernel_hw
            c = d // (kh * kw)
            in_pixels = int(np.prod(layer.input_shape[2:]))
            stages = [(in_pixels, c, f.ranks[0]), (rows, f.ranks[0] * kh * kw, f.ranks[1]), (rows, f.ranks[1], m)]
        r["lut_ops"] = cost.matmul_chain_ops(stages, m, rows, has_bias)
        r["factor_bytes"] = cost.param_bytes(f.params, m, has_bias)

    def emit(self, emitter: LookupEmitter, plan: Plan, x, as_output: bool):
        return _emit_lowrank(emitter, plan, x, as_output)

    def columns(self, record: dict) -> str:
        return f"{record['form']} ranks {record['ranks']}"


register(LowRankMethod())


def _emit_lowrank(em: LookupEmitter, plan: Plan, x, as_output: bool):
    """Two matmuls (dense); KxK + 1x1 or 1x1 + KxK + 1x1 convs with the layer's attributes (conv)."""
    layer, f, bb = plan.layer, plan.lowrank, em.builder_
    if layer.kind == "dense":
        x2 = x if len(layer.input_shape) == 2 else bb.emit(relax.op.reshape(x, (layer.rows, layer.d)))
        h = bb.emit(relax.op.matmul(x2, relax.const(np.ascontiguousarray(f.first.reshape(f.first.shape[0], -1).T))))
        return em.epilogue(layer, h, [lambda y: relax.op.matmul(y, relax.const(np.ascontiguousarray(f.last.T)))],
                              layer.bias, as_output)
    cv = layer.conv

    def conv(inp, w, spatial: bool):
        if spatial:
            return relax.op.nn.conv2d(inp, relax.const(np.ascontiguousarray(w, np.float32)), strides=cv["strides"],
                                      padding=cv["padding"], dilation=cv["dilation"])
        return relax.op.nn.conv2d(inp, relax.const(np.ascontiguousarray(w, np.float32)))

    last = f.last[:, :, None, None]
    if f.form == "pair":
        h = bb.emit(conv(x, f.first, True))
    else:
        h = bb.emit(conv(bb.emit(conv(x, f.first[:, :, None, None], False)), f.core, True))
    return em.epilogue(layer, h, [lambda y: conv(y, last, False)], layer.bias, as_output, rows_layout=False)
