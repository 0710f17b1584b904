"""The int8 (VNNI) exact convolution: a layer the priority mask keeps exact, at int8 speed.

Reference: ``tvm_lut.math.int8_conv`` (operands and ``reference``, which this kernel matches bit for bit:
integer sums, then one float32 add and multiply per output).

It reads the input as the int8 encoder does (``encode_int8``): quantized once per call into a uint8 copy
padded at the zero point, and, per kernel row, one 64-byte load and one ``vpermb`` give 16 output pixels'
4 taps (the 4th of a 3-wide kernel meets a zero weight byte) in the 16 int32 lanes. Where the encoder
then issues K ``vpdpbusd`` against 16 centroids, this one issues one per output channel of a block of
``BLOCK`` = 16, against that channel's 4 weight bytes of the row (a broadcast memory operand), and keeps
the 16 accumulators in registers over the input channels. Per 16 outputs x 16 channels x 1 input channel
at 3x3: 3 loads, 3 shuffles and 48 ``vpdpbusd`` (48 x 64 byte products, 36 of them the layer's: 75 % of
the VNNI peak; measured 0.22 ms for the model's stride-1 3x3 convs). Then per channel: one conversion, one add and one multiply (``(acc + offset) * scale``: an add
then a multiply, which LLVM cannot contract into an FMA the emulator would not reproduce) and a
64-byte store of 16 consecutive output pixels.

That is the ``"rows"`` layout: one word per kernel row of one input channel, for the int8 encoder's map
sizes (``encode_int8.lane_offsets``) and those whose 16 pixels' taps span up to 128 bytes (a 4x4 map at
stride 2: two loads and one two-source ``vpermt2b`` per kernel row), kernel width <= 4. Where the input channels come
in fours, the ``"channels"`` layout (``layout``) wastes no byte: the quantized copy holds one int32 word per
pixel and group of 4 channels (channel ``4g + e`` in byte ``e``), so 16 output pixels' words at one tap are
one 64-byte load (two and a ``vpermt2d`` where they span two), and a ``vpdpbusd`` against a channel's word
of the same 4 channels at that tap adds 4 useful products per lane: per 16 outputs x 16 channels x 4 input
channels at 3x3, 9 loads and 144 ``vpdpbusd`` against the rows layout's 12 loads, 12 shuffles and 192
(measured 0.17 ms, any kernel size). Which layers qualify (``eligible``): either layout, and an output
channel count that is a multiple of 16.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from tir_schedules.encode_int8 import LANES, QuantizedInput, lane_offsets, pixel_offsets
from tir_schedules.kernels import ConvInput, opaque_kernel

BLOCK = 16  # output channels whose accumulators stay in registers over the input channels
LOADS = 2  # 64-byte loads a kernel row may need: 16 pixels of a 4x4 map at stride 2 span up to 128 bytes


def word_offsets(conv: ConvInput) -> list[int] | None:
    """The ``"channels"`` layout: ``encode_int8.pixel_offsets`` in words, or None when they do not fit two
    16-word loads."""
    offs = pixel_offsets(conv)
    return offs if offs is not None and offs[-1] < LOADS * LANES else None


def layout(conv: ConvInput) -> str | None:
    """``"channels"`` where the input channels come in fours and 16 pixels' words fit two loads, else
    ``"rows"`` where a kernel row fits a word and 16 pixels' taps two loads, else None."""
    if conv.shape[1] % 4 == 0 and word_offsets(conv) is not None:
        return "channels"
    if conv.kernel_hw[1] <= 4 and lane_offsets(conv, LOADS) is not None:
        return "rows"
    return None


def eligible(conv: ConvInput, m: int) -> str | None:
    """None when this kernel computes the conv (``m`` output channels), else why not."""
    if m % BLOCK:
        return f"M={m} output channels is not a multiple of {BLOCK}"
    if conv.d >= 66_000:
        return f"D={conv.d}: an int32 sum may overflow"
    if layout(conv) is None:
        c, kw = conv.shape[1], conv.kernel_hw[1]
        if kw > 4 and c % 4:
            return f"kernel width {kw} > 4 (one int32 lane holds a kernel row) and C={c} is not a multiple of 4"
        return f"output map {conv.out_hw}: 16 pixels do not fit two 64-byte loads"
    return None


def weight_operands(wq, form: str = "rows"):
    """Int8 weights (M, C, KH, KW) as the kernel's broadcast words, for its ``layout``:

    - ``"rows"``: (M/16, C, KH, 16) int32, channel ``16*b + j``'s KW values of kernel row ``ky`` in bytes
      0..KW-1 of word ``[b, c, ky, j]``, the rest 0;
    - ``"channels"``: (M/16, C/4, KH*KW, 16) int32, byte ``e`` of word ``[b, g, ky*KW + kx, j]`` the weight of
      input channel ``4g + e`` at tap ``(ky, kx)``."""
    import numpy as np

    m, c, kh, kw = wq.shape
    w = np.asarray(wq, np.int8)
    if form == "channels":
        b = w.reshape(m // BLOCK, BLOCK, c // 4, 4, kh, kw).transpose(0, 2, 4, 5, 1, 3)
        return np.ascontiguousarray(b).view(np.int32)[..., 0].reshape(m // BLOCK, c // 4, kh * kw, BLOCK)
    b = np.zeros((m // BLOCK, BLOCK, c, kh, 4), np.int8)
    b[..., :kw] = w.reshape(m // BLOCK, BLOCK, c, kh, kw)
    return np.ascontiguousarray(b.transpose(0, 2, 3, 1, 4)).view(np.int32)[..., 0]


def conv2d_int8(conv: ConvInput, m: int) -> tirx.PrimFunc:
    """The kernel (module docstring) in the conv's ``layout``: x (B, C, H, W) float32, qparams (2,) float32 =
    (inv_scale, zero_point), weight words (``weight_operands(wq, layout(conv))``), offset (M,), scale (M,)
    float32 -> y (B, M, OH*OW) float32 (a reshape away from the layer's output)."""
    why = eligible(conv, m)
    if why is not None:
        raise ValueError(f"the int8 conv does not apply: {why}")
    if layout(conv) == "channels":
        return _kernel(conv, m, ChannelWords(conv))
    return _kernel(conv, m, QuantizedInput(conv, 1 if lane_offsets(conv) is not None else LOADS))


class ChannelWords(QuantizedInput):
    """The ``"channels"`` layout's reader (``encode_int8.QuantizedInput``'s interface, its ``first_tap`` and
    ``dot``): the quantized copy as
    one uint32 word per pixel and group of 4 input channels (channel ``4g + e`` in byte ``e``), planes of
    the padded map, padding at the zero point in every byte; 16 pixels' words at one tap."""

    dtype = "uint32"

    def __init__(self, conv: ConvInput):
        self.conv = conv
        hp, wp = conv.padded_hw
        self.plane = hp * wp  # words per channel group
        self.planes = conv.shape[1] // 4  # planes per image
        offs = word_offsets(conv)
        self._loads = 1 if offs[-1] < LANES else LOADS
        self._contiguous = offs == list(range(LANES))
        self._index = [tirx.const(o, "int32") for o in offs]
        bsz, ci_n = conv.shape[:2]
        self.nbytes = -(-(bsz * ci_n // 4 * self.plane + self._loads * LANES) // LANES) * LANES  # in words
        self.quantize = self._quantize_macro()

    def steps(self) -> tuple[int, int]:
        """(channel groups, taps)."""
        return self.conv.shape[1] // 4, self.conv.kernel_hw[0] * self.conv.kernel_hw[1]

    def step(self, tp):
        """Offset of tap ``tp`` (row-major over the kernel) from a pixel's first tap."""
        kw = self.conv.kernel_hw[1]
        return (tp // kw) * self.conv.dilation[0] * self.conv.padded_hw[1] + (tp % kw) * self.conv.dilation[1]

    def row(self, xq, base):
        """16 pixels' words (4 channels each) at one tap: one load, or two and a ``vpermt2d``."""
        if self._contiguous:
            return xq[tirx.Ramp(base, 1, LANES)]
        return tirx.Shuffle([xq[tirx.Ramp(base + LANES * i, 1, LANES)] for i in range(self._loads)], self._index)

    def _quantize_macro(self):
        bsz, ci_n, h, w = self.conv.shape
        groups, words = ci_n // 4, self.nbytes
        pt, pl = self.conv.padding[0], self.conv.padding[1]
        hp, wp = self.conv.padded_hw
        inner = 16 if w % 16 == 0 else w  # quantize a row in vectors of this many pixels

        def byte(x, qparams, b_, c, yy, x0, bits):
            """Channel ``c``'s quantized values of ``inner`` pixels, shifted to byte ``bits / 8`` of the word:
            ``clip(rint(x * inv_scale) + zero_point, 0, 255)``, clipped in float first (``int8_scores``)."""
            q = T.max(T.min(T.nearbyint(x[b_, c, yy, T.Ramp(x0 * inner, 1, inner)] * T.Broadcast(qparams[0], inner)),
                            T.Broadcast(T.float32(255) - qparams[1], inner)), T.Broadcast(-qparams[1], inner))
            q = T.Cast(f"uint32x{inner}", T.Cast(f"int32x{inner}", q) + T.Broadcast(T.Cast("int32", qparams[1]), inner))
            return q << T.Broadcast(T.uint32(bits), inner)

        @T.macro
        def quantize(x, qparams, xq):
            for z in T.serial(words // LANES):  # padding: the zero point in each of a word's 4 bytes
                xq[T.Ramp(z * LANES, 1, LANES)] = T.Broadcast(T.Cast("uint32", qparams[1]) * T.uint32(0x01010101),
                                                              LANES)
            for b_, g, yy, x0 in T.grid(bsz, groups, h, w // inner):
                xq[T.Ramp(((b_ * groups + g) * hp + yy + pt) * wp + pl + x0 * inner, 1, inner)] = (
                    byte(x, qparams, b_, g * 4, yy, x0, 0) | byte(x, qparams, b_, g * 4 + 1, yy, x0, 8)
                    | byte(x, qparams, b_, g * 4 + 2, yy, x0, 16) | byte(x, qparams, b_, g * 4 + 3, yy, x0, 24))

        return quantize


def _kernel(conv: ConvInput, m: int, reader) -> tirx.PrimFunc:
    """The kernel over a layout's reader (``QuantizedInput`` for ``"rows"``, ``ChannelWords``): per task
    (16 pixels, 16 output channels), the accumulators in registers over ``reader.steps()`` words."""
    bsz, ci_n, h, w = conv.shape
    oh, ow = conv.out_hw
    pixels = oh * ow  # per image: a multiple of 16 (pixel_offsets)
    nb, mb = bsz * pixels // LANES, m // BLOCK
    split = 1 if nb > 1 else mb  # parallel tasks per pixel block
    outer, inner = reader.steps()
    quantize, dot, plane = reader.quantize, reader.dot, reader.plane

    @T.prim_func(private=True)
    def func(
        x: T.Buffer((bsz, ci_n, h, w), "float32"),
        qparams: T.Buffer((2,), "float32"),
        wts: T.Buffer((mb, outer, inner, BLOCK), "int32"),
        offset: T.Buffer((m,), "float32"),
        scale: T.Buffer((m,), "float32"),
        y: T.Buffer((bsz, m, pixels), "float32"),
    ):
        xq = T.alloc_buffer((reader.nbytes,), reader.dtype)
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
                for c in T.serial(outer):
                    for r in T.unroll(inner):
                        xs = T.bind(reader.row(xq, first + c * plane + reader.step(r)))
                        for j in T.unroll(BLOCK):
                            acc[T.Ramp(j * LANES, 1, LANES)] = dot(acc[T.Ramp(j * LANES, 1, LANES)], xs,
                                                                   wts[ob, c, r, j])
                for j in T.unroll(BLOCK):  # (acc + offset) * scale: 16 channels x 16 consecutive pixels
                    y[(pb * LANES) // pixels, ob * BLOCK + j, T.Ramp((pb * LANES) % pixels, 1, LANES)] = (
                        (T.Cast("float32x16", acc[T.Ramp(j * LANES, 1, LANES)])
                         + T.Broadcast(offset[ob * BLOCK + j], LANES)) * T.Broadcast(scale[ob * BLOCK + j], LANES))

    return opaque_kernel(func, "conv-int8").with_attr("tirx.is_scheduled", True)
