"""Per-layer latency, measured: each layer is compiled on its own, exact and as rewritten, and timed.

A rewrite that removes multiplies can still run slower than the dense layer it replaces (the top
complaint about factorised layers); counts do not show that, a clock does. For every conv/dense layer
of a LUTify run this builds two one-layer Relax modules on the layer's real input shape:

- exact: ``conv2d``/``matmul`` with the folded weight (+ bias), as the compiler would run it;
- rewritten: the same module passed through the same rewrite (PQ, butterfly or low rank) with the
  already fitted tables / factors,

compiles both for the target and times them with TVM's ``time_evaluator`` (``BatchRunner.latency_ms``),
side by side in one process. The records get ``latency = {"exact_ms", "rewrite_ms"}`` and
``slower_than_exact`` where the rewrite loses.
"""

from __future__ import annotations

import logging

import numpy as np
import tvm
from tvm import relax

from . import graph
from .build import BatchRunner, resolve_target

log = logging.getLogger("tvm_lut")


def single_layer_module(layer: graph.Layer) -> tvm.IRModule:
    """``main(x)`` = the layer alone (folded weight and bias as constants) on its input shape."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(list(layer.input_shape), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            if layer.kind == "conv2d":
                cv = layer.conv
                kh, kw = cv["kernel_hw"]
                w = np.ascontiguousarray(layer.weight.T.reshape(layer.m, -1, kh, kw))
                y = bb.emit(relax.op.nn.conv2d(x, relax.const(w), strides=cv["strides"], padding=cv["padding"],
                                               dilation=cv["dilation"]))
                bshape = (1, layer.m, 1, 1)
            else:
                y = bb.emit(relax.op.matmul(x, relax.const(np.ascontiguousarray(layer.weight))))
                bshape = (layer.m,)
            if layer.bias is not None:
                y = bb.emit(relax.op.add(y, relax.const(layer.bias.reshape(bshape).astype(np.float32))))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def measure_layers(plans: list, target="x86", schedule: bool = True) -> None:
    """Time every layer of a LUTify run (``LUTify._plans``) exact and rewritten; fills the records."""
    from relay_passes.lutify import _Plan, _rewrite

    tgt = resolve_target(target)
    for plan in plans:
        layer, rec = plan.layer, plan.record
        if layer.weight is None or layer.unsupported:
            continue
        exact_mod = single_layer_module(layer)
        sig = [("x", tuple(layer.input_shape), "float32")]
        exact_ms = BatchRunner(tvm.compile(exact_mod, tgt), [], sig).latency_ms()
        rec["latency"] = {"exact_ms": exact_ms}
        if rec["method"] == "exact":
            continue
        (one,) = graph.find_layers(exact_mod)
        twin = _Plan(one, rec, plan.pq_layer, plan.chain, plan.factors, plan.lowrank)
        rewritten = _rewrite(exact_mod, [twin], schedule)
        rewrite_ms = BatchRunner(tvm.compile(rewritten, tgt), [], sig).latency_ms()
        rec["latency"]["rewrite_ms"] = rewrite_ms
        rec["slower_than_exact"] = bool(rewrite_ms > exact_ms)
        if rewrite_ms > exact_ms:
            log.warning("layer %s: the %s rewrite runs slower than the exact layer on %s (%.3f ms vs %.3f ms)",
                        layer.name, rec["method"], tgt.kind.name, rewrite_ms, exact_ms)


def layer_time(rec: dict) -> float | None:
    """The layer's time in the compiled model: rewritten if converted, else exact (ms)."""
    lat = rec.get("latency")
    if not lat:
        return None
    return lat.get("rewrite_ms", lat["exact_ms"]) if rec["method"] != "exact" else lat["exact_ms"]
