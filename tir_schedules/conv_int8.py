"""The int8 (VNNI) exact convolution: a layer the priority mask keeps exact, at int8 speed.

Reference: ``tvm_lut.math.int8_conv`` (operands and ``reference``, which this kernel matches bit for bit:
integer sums, then one float32 multiply and add per output).

It reads the input as the int8 encoder does (``encode_int8``): quantized once per call into a uint8 copy
padded at the zero point, and, per kernel row, one 64-byte load and one ``vpermb`` give 16 output pixels'
4 taps (the 4th of a 3-wide kernel meets a zero weight byte) in the 16 int32 lanes. Where the encoder
then issues K ``vpdpbusd`` against 16 centroids, this one issues one per output channel of a block of
``BLOCK`` = 16, against that channel's 4 weight bytes of the row (a broadcast memory operand), and keeps
the 16 accumulators in registers over the input channels. Per 16 outputs x 16 channels x 1 input channel
at 3x3: 3 loads, 3 shuffles and 48 ``vpdpbusd`` (48 x 64 byte products, 36 of them the layer's: 75 % of
the VNNI peak, ONNX Runtime's im2col GEMM packs 4 input values per lane without waste but pays for the
im2col). Then per channel: one conversion, one add and one multiply (``(acc + offset) * scale``: an add
then a multiply, which LLVM cannot contract into an FMA the emulator would not reproduce) and a
64-byte store of 16 consecutive output pixels.

Which layers qualify (``eligible``): the int8 encoder's map sizes (``encode_int8.lane_offsets``) and also
those whose 16 pixels' taps span up to 128 bytes (a 4x4 map at stride 2: two loads and one two-source
``vpermt2b`` per kernel row), kernel width <= 4 and an output channel count that is a multiple of 16.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from tir_schedules.encode_int8 import LANES, QuantizedInput, lane_offsets
from tir_schedules.kernels import ConvInput, opaque_kernel

BLOCK = 16  # output channels whose accumulators stay in registers over the input channels
LOADS = 2  # 64-byte loads a kernel row may need: 16 pixels of a 4x4 map at stride 2 span up to 128 bytes


def eligible(conv: ConvInput, m: int) -> str | None:
    """None when this kernel computes the conv (``m`` output channels), else why not."""
    kh, kw = conv.kernel_hw
    if kw > 4:
        return f"kernel width {kw} > 4 (one int32 lane holds a kernel row)"
    if m % BLOCK:
        return f"M={m} output channels is not a multiple of {BLOCK}"
    if lane_offsets(conv, LOADS) is None:
        return f"output map {conv.out_hw}: 16 pixels do not fit two 64-byte loads"
    if conv.d >= 66_000:
        return f"D={conv.d}: an int32 sum may overflow"
    return None


def weight_operands(wq):
    """Int8 weights (M, C, KH, KW) -> (M/16, C, KH, 16) int32: channel ``16*b + j``'s KW values of kernel
    row ``ky`` in bytes 0..KW-1 of word ``[b, c, ky, j]``, the rest 0."""
    import numpy as np

    m, c, kh, kw = wq.shape
    b = np.zeros((m // BLOCK, BLOCK, c, kh, 4), np.int8)
    b[..., :kw] = np.asarray(wq, np.int8).reshape(m // BLOCK, BLOCK, c, kh, kw)
    return np.ascontiguousarray(b.transpose(0, 2, 3, 1, 4)).view(np.int32)[..., 0]


def conv2d_int8(conv: ConvInput, m: int) -> tirx.PrimFunc:
    """The kernel (module docstring): x (B, C, H, W) float32, qparams (2,) float32 = (inv_scale,
    zero_point), weight words (M/16, C, KH, 16) int32 (``weight_operands``), offset (M,), scale (M,)
    float32 -> y (B, M, OH*OW) float32 (a reshape away from the layer's output)."""
    why = eligible(conv, m)
    if why is not None:
        raise ValueError(f"the int8 conv does not apply: {why}")
    bsz, ci_n, h, w = conv.shape
    kh = conv.kernel_hw[0]
    oh, ow = conv.out_hw
    pixels = oh * ow  # per image: a multiple of 16 (lane_offsets)
    nb, mb = bsz * pixels // LANES, m // BLOCK
    split = 1 if nb > 1 else mb  # parallel tasks per pixel block
    reader = QuantizedInput(conv, 1 if lane_offsets(conv) is not None else LOADS)
    flat, quantize, dot = reader.nbytes, reader.quantize, reader.dot

    @T.prim_func(private=True)
    def func(
        x: T.Buffer((bsz, ci_n, h, w), "float32"),
        qparams: T.Buffer((2,), "float32"),
        wts: T.Buffer((mb, ci_n, kh, BLOCK), "int32"),
        offset: T.Buffer((m,), "float32"),
        scale: T.Buffer((m,), "float32"),
        y: T.Buffer((bsz, m, pixels), "float32"),
    ):
        xq = T.alloc_buffer((flat,), "uint8")
        quantize(x, qparams, xq)
        # tasks: pixel blocks; a single block (a 4x4 map) is split by channel blocks so the cores share it
        for t in T.parallel(nb * split):
            pb = T.bind(t // split)
            first = T.bind(reader.first_tap(pb * LANES))
            for o2 in T.serial(mb // split):
                ob = T.bind((t % split) * (mb // split) + o2)
                acc = T.alloc_buffer((BLOCK * LANES,), "int32", scope="local")
                for j in T.unroll(BLOCK):
                    acc[T.Ramp(j * LANES, 1, LANES)] = T.Broadcast(T.int32(0), LANES)
                for ci in T.serial(ci_n):
                    for r in T.unroll(kh):
                        xs = T.bind(reader.row(xq, first + ci * reader.plane + r * reader.row_stride))
                        for j in T.unroll(BLOCK):
                            acc[T.Ramp(j * LANES, 1, LANES)] = dot(acc[T.Ramp(j * LANES, 1, LANES)], xs,
                                                                   wts[ob, ci, r, j])
                for j in T.unroll(BLOCK):
                    y[(pb * LANES) // pixels, ob * BLOCK + j, T.Ramp((pb * LANES) % pixels, 1, LANES)] = (
                        (T.Cast("float32x16", acc[T.Ramp(j * LANES, 1, LANES)])
                         + T.Broadcast(offset[ob * BLOCK + j], LANES)) * T.Broadcast(scale[ob * BLOCK + j], LANES))

    return opaque_kernel(func, "conv-int8").with_attr("tirx.is_scheduled", True)
