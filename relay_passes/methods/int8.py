"""``int8``: the layer stays exact, in int8 arithmetic (VNNI): ONNX Runtime's static quantization of it.

A hybrid model is only as fast as its exact half. A conv kept exact in fp32 costs 3-4x ONNX Runtime's int8
conv, more than the lookups beside it save; this method computes it as a static int8 quantization does
(``tvm_lut.math.int8_conv``: per-tensor uint8 input from the layer's calibration range, per-channel int8
weights, int32 sums, one float32 epilogue) with ``tir_schedules.conv_int8``, which reads the input in place
(no im2col) and keeps 16 output channels' accumulators in registers.

Fit: the layer's folded weight and bias (batch norm included) quantized, the input scale from its
calibration rows. Emit: one kernel, then a reshape (a view) to the layer's NCHW output. Applies to convs
the kernel covers (``conv_int8.eligible``) on targets with AVX-512 VBMI and VNNI; any other layer stays
exact in fp32, with the reason (``KeepExact``).
"""

from __future__ import annotations

import numpy as np
from tvm import relax

from tir_schedules import conv_int8
from tvm_lut import targets
from tvm_lut.math import int8_conv

from ..registry import KeepExact, RewriteMethod, register
from ..rewrite import LookupEmitter, Plan, conv_input, ident

#: what the kernel executes beyond AVX-512: ``vpermb`` (the pixels' taps) and ``vpdpbusd`` (the sums)
REQUIRED_ISA = ("avx512vbmi", "avx512vnni")


class Int8Method(RewriteMethod):
    name = "int8"
    calibrated = True  # the input's quantization scale comes from the layer's calibration rows
    description = "exact in int8 arithmetic (VNNI), as ONNX Runtime's static quantization"

    def fit(self, plan: Plan, planner, rows=None, targets_=None) -> None:
        self.fit_layer(plan, planner.target, rows)

    def fit_layer(self, plan: Plan, target, rows) -> None:
        """``fit`` for ``target``: the layer's int8 operands into ``plan.state`` (its record says how far the
        int8 weights are from the layer's); ``KeepExact`` where the kernel cannot run it."""
        layer, r = plan.layer, plan.record
        why = self.refusal(plan, target)
        if why is not None:
            raise KeepExact(why)
        if rows is None or not len(rows):
            raise KeepExact("no calibration rows to choose the input's int8 scale from")
        kh, kw = layer.conv["kernel_hw"]
        weight = layer.weight.T.reshape(layer.m, layer.d // (kh * kw), kh, kw)
        plan.state = int8_conv.fit(weight, layer.bias, rows)
        w_hat = plan.state.weight.astype(np.float64) * (plan.state.scale * plan.state.inv_scale)[:, None, None, None]
        r.update(input_scale=float(1.0 / plan.state.inv_scale), zero_point=plan.state.zero_point,
                 layout=conv_int8.layout(conv_input(layer)),
                 weight_error=float(np.linalg.norm(w_hat - weight) / max(np.linalg.norm(weight), 1e-30)))

    def account(self, plan: Plan) -> None:
        r, layer = plan.record, plan.layer
        r["lut_ops"] = dict(r["exact_ops"])  # the same products, on bytes
        r["factor_bytes"] = layer.d * layer.m + 8 * layer.m  # what it stores: int8 weights, offset and scale

    def emit(self, emitter: LookupEmitter, plan: Plan, x, as_output: bool):
        layer, op, bb = plan.layer, plan.state, emitter.builder_
        conv = conv_input(layer)
        gv = emitter.kernel(("conv-int8", conv.shape, conv.kernel_hw, conv.strides, conv.padding, conv.dilation,
                             layer.m), f"int8_conv_{ident(layer.name)}", lambda: conv_int8.conv2d_int8(conv, layer.m))
        n_, m, oh, ow = layer.output_shape
        words = conv_int8.weight_operands(op.weight, conv_int8.layout(conv))
        y = bb.emit(relax.call_tir(gv, [x, relax.const(np.array([op.inv_scale, op.zero_point], np.float32)),
                                        relax.const(words), relax.const(op.offset), relax.const(op.scale)],
                                   relax.TensorType((n_, m, oh * ow), "float32")))
        return emitter.epilogue(layer, y, [lambda t: relax.op.reshape(t, (n_, m, oh, ow))], None, as_output,
                                rows_layout=False)

    def columns(self, record: dict) -> str:
        return f"int8 VNNI (weights {100 * record.get('weight_error', 0):.2f} % off)"

    def refusal(self, plan: Plan, target) -> str | None:
        """None when the layer can run as the int8 kernel on ``target``, else why not."""
        layer = plan.layer
        if layer.kind != "conv2d":
            return "not a convolution (the int8 kernel reads a convolution's input in place)"
        have = set(targets.resolve(target).instruction_sets())
        missing = [f for f in REQUIRED_ISA if f not in have]
        if missing:
            return f"the target lacks {', '.join(missing)}"
        return conv_int8.eligible(conv_input(layer), layer.m)


register(Int8Method())
