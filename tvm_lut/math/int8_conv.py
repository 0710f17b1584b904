"""Int8 exact convolution: a layer kept exact, computed as ONNX Runtime's int8 build computes it.

A hybrid model is only as fast as its exact half: a layer the priority mask keeps exact in fp32 costs
3-4x the int8 conv of ONNX Runtime, more than the lookups it sits between save. Here the exact layer's
arithmetic is that of a static int8 quantization (ONNX Runtime's QDQ with per-channel weights):

- the input is quantized per tensor as the int8 encoder does (``int8_scores.input_quantization`` and
  ``quantize_input``: uint8, zero point 0 for a ReLU's output, else 128), padding at the zero point;
- each output channel's weights are quantized symmetrically, ``wq = rint(w / s_w[o])`` in [-127, 127];
- the products are summed exactly in int32 (``|acc| <= 255 * 127 * D < 2^31`` for ``D < 66,000``);
- ``y = (float32(acc) + offset[o]) * scale[o]`` in float32, with ``scale = s_x * s_w`` and the bias and
  the zero point's sum in ``offset[o] = b[o] / scale[o] - zero_point * sum(wq[o])`` (an add, then a
  multiply: no fused multiply-add for a compiler to choose, so numpy and the kernel round alike).

``reference`` is the numpy emulator the kernel (``tir_schedules.conv_int8``) matches bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import int8_scores as i8
from .pq import im2col

QMAX_WEIGHT = 127
MAX_D = 66_000  # input values per output (C*KH*KW) whose int32 sum cannot overflow


@dataclass(frozen=True)
class Int8Conv:
    """One layer's int8 operands: input quantization, per-channel int8 weights, float32 epilogue."""

    inv_scale: np.float32  # 1 / s_x
    zero_point: int  # 0 (input >= 0) or 128
    weight: np.ndarray  # (M, C, KH, KW) int8
    offset: np.ndarray  # (M,) float32: bias / scale less the zero point's sum, added to the int32 sum
    scale: np.ndarray  # (M,) float32: s_x * s_w[o]

    @property
    def m(self) -> int:
        return int(self.weight.shape[0])


def fit(weight: np.ndarray, bias: np.ndarray | None, rows: np.ndarray) -> Int8Conv:
    """The int8 operands of a conv ``weight`` (M, C, KH, KW) (and ``bias`` (M,) or None) whose input values
    are ``rows`` (calibration inputs, any shape: only their range matters)."""
    w = np.asarray(weight, np.float64)
    if w.ndim != 4:
        raise ValueError(f"expected a (M, C, KH, KW) conv weight, got shape {w.shape}")
    if w[0].size >= MAX_D:
        raise ValueError(f"{w[0].size} inputs per output: an int32 sum of uint8 x int8 products may overflow")
    inv_scale, zp = i8.input_quantization(rows)
    s_w = np.abs(w).reshape(w.shape[0], -1).max(1) / QMAX_WEIGHT
    s_w = np.where(s_w > 0, s_w, 1.0)
    wq = np.clip(np.rint(w / s_w[:, None, None, None]), -QMAX_WEIGHT, QMAX_WEIGHT)
    scale = s_w / float(inv_scale)
    b = np.zeros(w.shape[0]) if bias is None else np.asarray(bias, np.float64)
    offset = b / scale - zp * wq.reshape(w.shape[0], -1).sum(1)
    return Int8Conv(np.float32(inv_scale), int(zp), wq.astype(np.int8), offset.astype(np.float32),
                    scale.astype(np.float32))


def accumulate(x: np.ndarray, op: Int8Conv, strides, padding, dilation) -> np.ndarray:
    """The int32 sums (N, M, OH, OW) of the quantized input (padded at the zero point) and weights."""
    n, _, h, w = x.shape
    _, c, kh, kw = op.weight.shape
    pt, pl, pb, pr = padding
    xq = i8.quantize_input(x, op.inv_scale, op.zero_point).astype(np.int64)
    xp = np.full((n, c, h + pt + pb, w + pl + pr), op.zero_point, np.int64)
    xp[:, :, pt:pt + h, pl:pl + w] = xq
    rows = im2col(xp, (kh, kw), strides, (0, 0, 0, 0), dilation)  # (N*OH*OW, C*KH*KW), columns (c, kh, kw)
    oh = (h + pt + pb - dilation[0] * (kh - 1) - 1) // strides[0] + 1
    ow = (w + pl + pr - dilation[1] * (kw - 1) - 1) // strides[1] + 1
    acc = rows @ op.weight.reshape(op.m, -1).astype(np.int64).T
    return acc.reshape(n, oh, ow, op.m).transpose(0, 3, 1, 2)


def reference(x: np.ndarray, op: Int8Conv, strides, padding, dilation) -> np.ndarray:
    """The layer's float32 output (N, M, OH, OW), as the kernel computes it."""
    acc = accumulate(x, op, strides, padding, dilation)
    return (acc.astype(np.float32) + op.offset[None, :, None, None]) * op.scale[None, :, None, None]
