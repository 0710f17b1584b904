"""The int8 (VNNI) convolution encoder: nearest centroids from integer scores, 64 products per instruction.

Reference: ``tvm_lut.math.int8_scores`` (operands, scores, codes) and ``tvm_lut.math.pq.pack_codes_grouped``
(the output layout, read by ``shuffle``'s grouped ``vpermb`` lookup). Bit-exact: integer arithmetic only.

For a KxK convolution whose subspace is one input channel's patch (V = KH*KW, LUT-NN's setting for 3x3),
16 output pixels share the vector lanes. Per (16 pixels, channel) the fp32 encoder issues V*K = 144 FMAs
(K=16) and a 3-instruction-per-merge argmin tree (45); this one issues, per kernel row ``ky``:

- one 64-byte load of the quantized, zero-padded input at the pixels' first tap, and one byte shuffle
  (``vpermb`` with a constant index) that gives lane ``j`` the 4 bytes ``(ky, 0..3)`` of pixel ``j``'s
  patch (the 4th tap of a 3-wide kernel meets a zero centroid byte);
- K ``vpdpbusd``: lane ``j`` of centroid ``k``'s accumulator adds the 4 products of those bytes with the
  centroid's 4 int8 values of that row (a broadcast memory operand),

then, per centroid, ``(score << 4) | k`` (``llvm.fshl``: one ``vpshldd`` on AVX512-VBMI2) and a 15-step
``vpminsd`` tree whose low 4 bits are the code, first minimum on ties. At 3x3: 3 + 48 + 16 + 15 = 82
instructions against ~190, the counted bound's ``K/M`` against ``4K/M`` per output (``math.cost``).
Four codebooks' codes combine into one int32 per pixel (``16j + code`` in byte ``j``) and store as one
64-byte vector: the grouped layout's 16 rows x 4 codebooks.

A subspace may also be one kernel row of one channel (V = KW, KH codebooks per channel: three times
LUT-NN's codebooks at 3x3, for accuracy): the same loads and ``vpdpbusd`` (K per row), but each row gets
its own keys and argmin tree, 3 + 48 + 48 + 45 = 144 instructions per (16 pixels, channel) at 3x3 (the
fp32 encoder: 3 x (48 FMAs + 45) = 279), and three codes to look up instead of one.

The input is quantized once per call into a zero-padded uint8 copy (``C*(H+2p)*(W+2p)`` bytes, the
fp32 encoder's padded copy at a quarter of the size): ``clip(rint(x * inv_scale) + zero_point, 0,
255)``, padding at the zero point (the quantized 0.0).

Which layers qualify (``eligible``): K=16, kernel width <= 4, C a multiple of 4, 16 consecutive output
pixels inside one image whose taps span at most 64 bytes of the padded input (an output width that is a
multiple of 16, or divides 16: at stride 1 32x32, 16x16, 8x8 and 4x4 maps qualify; at stride 2 16x16 and
8x8 outputs, not 4x4, whose four input row pairs span more than 64 bytes).
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from tir_schedules.kernels import ConvInput, opaque_kernel
from tvm_lut.targets.isa import DOT_INTRINSIC

LANES = 16  # output pixels per vector: int32 lanes of a 512-bit register
SLACK = 64  # bytes past the padded input that a last 64-byte load may touch


def pixel_offsets(conv: ConvInput) -> list[int] | None:
    """Offset of each of 16 consecutive output pixels' first tap from pixel 0's in the padded plane (in
    elements), or None when the 16 are not rows of one image (an output width that is a multiple of 16, or
    divides 16 and the map)."""
    oh, ow = conv.out_hw
    wp = conv.padded_hw[1]
    sh, sw = conv.strides
    if ow % LANES == 0:
        return [j * sw for j in range(LANES)]
    if LANES % ow == 0 and (oh * ow) % LANES == 0:
        return [(j // ow) * sh * wp + (j % ow) * sw for j in range(LANES)]
    return None


def lane_offsets(conv: ConvInput, loads: int = 1) -> list[int] | None:
    """``pixel_offsets`` in bytes of the padded uint8 copy, or None when they do not fit ``loads`` consecutive
    64-byte loads with the kernel row's 4 taps (two: a two-source ``vpermt2b`` picks from 128 bytes)."""
    offs = pixel_offsets(conv)
    if offs is None:
        return None
    span = offs[-1] + 3 * conv.dilation[1] + 1
    return offs if span <= 64 * loads else None


def rows_per_codebook(kernel_hw: tuple[int, int], v: int) -> int | None:
    """Kernel rows one codebook's subspace covers: ``KH`` for one input channel's patch (V = KH*KW,
    LUT-NN's setting), 1 for one kernel row (V = KW: KH codebooks per channel), else None (this encoder
    does not apply)."""
    kh, kw = kernel_hw
    if v == kh * kw:
        return kh
    if v == kw:
        return 1
    return None


def eligible(conv: ConvInput, c: int, k: int, v: int) -> str | None:
    """None when this encoder applies to the layer (``c`` codebooks of ``v`` values), else why not (the
    fp32 encoder is used then)."""
    kh, kw = conv.kernel_hw
    if k != 16:
        return f"K={k} (the int8 encoder packs K=16 codes)"
    if rows_per_codebook(conv.kernel_hw, v) is None:
        return f"V={v} is neither one channel's {kh}x{kw} patch nor one kernel row"
    if kw > 4:
        return f"kernel width {kw} > 4 (one int32 lane holds a kernel row)"
    if c % 4:
        return f"C={c} is not a multiple of 4"
    if lane_offsets(conv) is None:
        return f"output map {conv.out_hw}: 16 pixels do not fit one 64-byte load"
    return None


def centroid_operands(cq, kernel_hw: tuple[int, int]):
    """Int8 centroids (C, K, V) -> (C, R, K) int32, R = the kernel rows of one subspace
    (``rows_per_codebook``): row ``r``'s KW values of centroid k, negated (the kernel adds ``vpdpbusd``
    products to the offset), bytes 0..KW-1 of the word, the rest 0."""
    import numpy as np

    kw = kernel_hw[1]
    c, k, v = cq.shape
    r = rows_per_codebook(kernel_hw, v)
    if r is None:
        raise ValueError(f"V={v} is neither one channel's {kernel_hw} patch nor one kernel row")
    b = np.zeros((c, r, k, 4), np.int8)
    b[..., :kw] = (-np.asarray(cq, np.int16)).astype(np.int8).reshape(c, k, r, kw).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(b).view(np.int32)[..., 0]


def padded_bytes(conv: ConvInput, loads: int = 1) -> int:
    """Bytes of the quantized, zero-point-padded copy of ``conv``'s input (``quantize_padded``), with the
    slack the last ``loads`` 64-byte loads may read past it, rounded up to 64."""
    hp, wp = conv.padded_hw
    return -(-(conv.shape[0] * conv.shape[1] * hp * wp + SLACK * loads) // 64) * 64


def quantize_padded(conv: ConvInput, loads: int = 1):
    """A TVMScript macro ``quantize(x, qparams, xq)``: ``conv``'s float32 input ``x`` (B, C, H, W) into the flat
    uint8 buffer ``xq`` (``padded_bytes(conv, loads)``), planes of the padded map, padding at the zero point (the
    quantized 0.0): ``clip(rint(x * inv_scale) + zero_point, 0, 255)``, ``qparams = (inv_scale,
    zero_point)``. The kernels that read a quantized input in place (this encoder, ``conv_int8``) share it."""
    bsz, ci_n, h, w = conv.shape
    pt, pl = conv.padding[0], conv.padding[1]
    hp, wp = conv.padded_hw
    flat = padded_bytes(conv, loads)
    inner = 16 if w % 16 == 0 else w  # quantize a row in vectors of this many pixels

    @T.macro
    def quantize(x, qparams, xq):
        for z in T.serial(flat // 64):  # padding at the zero point (the quantized 0.0)
            xq[T.Ramp(z * 64, 1, 64)] = T.Broadcast(T.Cast("uint8", T.Cast("int32", qparams[1])), 64)
        for b_, ci, y, x0 in T.grid(bsz, ci_n, h, w // inner):
            # clipped in float before the conversion (so a value far outside int32 cannot overflow it),
            # then shifted by the zero point: clip(rint(x * inv_scale) + zero_point, 0, 255)
            xq[T.Ramp(((b_ * ci_n + ci) * hp + y + pt) * wp + pl + x0 * inner, 1, inner)] = T.Cast(
                f"uint8x{inner}", T.Cast(f"int32x{inner}", T.max(T.min(
                    T.nearbyint(x[b_, ci, y, T.Ramp(x0 * inner, 1, inner)] * T.Broadcast(qparams[0], inner)),
                    T.Broadcast(T.float32(255) - qparams[1], inner)), T.Broadcast(-qparams[1], inner)))
                + T.Broadcast(T.Cast("int32", qparams[1]), inner))

    return quantize


class QuantizedInput:
    """How the int8 kernels read a conv's input in place (this encoder and ``conv_int8``): the padded uint8
    copy (``nbytes``, filled by the ``quantize`` macro), 16 output pixels' first taps (``first_tap``), one
    kernel row's taps of them in the int32 lanes (``row``) and the ``vpdpbusd`` that multiplies those bytes
    by a broadcast 4-byte word (``dot``). ``loads``: 64-byte loads per kernel row (``lane_offsets``): 1, or 2
    where 16 pixels' taps span up to 128 bytes (a 4x4 map at stride 2)."""

    dtype = "uint8"  # the padded copy's element

    def __init__(self, conv: ConvInput, loads: int = 1):
        if lane_offsets(conv, loads) is None:
            raise ValueError(f"output map {conv.out_hw}: 16 pixels' taps do not fit {64 * loads} bytes")
        self.conv, self.loads = conv, loads
        self.nbytes = padded_bytes(conv, loads)
        self.quantize = quantize_padded(conv, loads)
        hp, wp = conv.padded_hw
        self.plane = hp * wp  # bytes per channel
        self.planes = conv.shape[1]  # planes per image
        self.row_stride = conv.dilation[0] * wp  # bytes from one kernel row's taps to the next's
        # vpermb index: lane j's 4 bytes are the 4 taps of its pixel's kernel row
        offs = lane_offsets(conv, loads)
        self._index = [tirx.const(offs[j] + e * conv.dilation[1], "int32") for j in range(LANES) for e in range(4)]

    def first_tap(self, p0):
        """Offset of output pixel ``p0``'s first tap (channel 0) in the padded copy; ``p0`` counts the
        pixels of all images."""
        oh, ow = self.conv.out_hw
        sh, sw = self.conv.strides
        wp = self.conv.padded_hw[1]
        return (p0 // (oh * ow)) * self.planes * self.plane + (p0 % (oh * ow)) // ow * sh * wp + p0 % ow * sw

    def steps(self) -> tuple[int, int]:
        """(input channels, kernel rows): the words a pixel's sum takes, as an outer and an unrolled loop."""
        return self.conv.shape[1], self.conv.kernel_hw[0]

    def step(self, r):
        """Offset of unrolled step ``r`` (kernel row r) from a pixel's first tap."""
        return r * self.row_stride

    def row(self, xq, base):
        """The 64 bytes ``vpdpbusd`` multiplies for one kernel row whose first taps start at ``base``: lane j =
        taps 0..3 of pixel j (one 64-byte load and one ``vpermb``; two loads and one ``vpermt2b``)."""
        return tirx.Shuffle([xq[tirx.Ramp(base + 64 * i, 1, 64)] for i in range(self.loads)], self._index)

    @staticmethod
    def dot(acc, xs, word):
        """``acc`` (int32x16) plus, per lane, the 4 products of its bytes of ``xs`` with the 4 bytes of ``word``."""
        return tirx.call_llvm_pure_intrin("int32x16", DOT_INTRINSIC, acc, tirx.reinterpret("int8x64", xs),
                                          tirx.reinterpret("int8x64", tirx.Broadcast(word, LANES)))


def encode_conv_int8(conv: ConvInput, c: int, k: int, pack_lanes: int, v: int | None = None) -> tirx.PrimFunc:
    """The kernel (module docstring): x (B, CI, H, W) float32, qparams (2,) float32 = (inv_scale,
    zero_point), centroid words (C, R, K) int32 (``centroid_operands``), offsets (C, K) int32 ->
    grouped packed codes (ceil(N/L), C/4, 4L) uint8, L = ``pack_lanes`` (a multiple of 16). ``c``
    codebooks of ``v`` values (default one channel's patch: C = CI; one kernel row, V = KW: C = CI*KH,
    codebook ``ci*KH + ky`` for input channel ``ci``'s row ``ky``)."""
    v = conv.kernel_hw[0] * conv.kernel_hw[1] if v is None else v
    why = eligible(conv, c, k, v)
    if why is not None:
        raise ValueError(f"the int8 encoder does not apply: {why}")
    rpc = rows_per_codebook(conv.kernel_hw, v)
    per_channel = conv.kernel_hw[0] // rpc  # codebooks per input channel
    if c != conv.shape[1] * per_channel:
        raise ValueError(f"{c} codebooks of V={v} do not cover {conv.shape[1]} channels of a {conv.kernel_hw} kernel")
    if pack_lanes % LANES:
        raise ValueError(f"pack_lanes must be a multiple of {LANES}, got {pack_lanes}")
    bsz, ci_n, h, w = conv.shape
    n = conv.rows
    reader = QuantizedInput(conv)
    plane, flat, quantize, dot = reader.plane, reader.nbytes, reader.quantize, reader.dot
    nb, groups, sub = -(-n // pack_lanes), c // 4, pack_lanes // LANES

    def vec(value: int):
        """An int32 constant vector (``value`` taken modulo 2^32, as a bit pattern)."""
        return tirx.Broadcast(tirx.const((value + (1 << 31)) % (1 << 32) - (1 << 31), "int32"), LANES)

    def channel_code(xq, cents, offsets, base, cb):
        """Codes (int32x16, 0..15) of codebook ``cb`` for the 16 pixels whose first tap is at ``base``
        (statements: the bindings; returns the bound code)."""
        if per_channel == 1:
            first = base + cb * plane
        else:  # codebook ci*KH + ky: input channel ci's kernel row ky
            first = base + (cb // per_channel) * plane + (cb % per_channel) * (rpc * reader.row_stride)
        xs = [T.bind(reader.row(xq, first + r * reader.row_stride)) for r in range(rpc)]
        keys = []
        for q in range(k):
            acc = tirx.Broadcast(offsets[cb, q], LANES)
            for r in range(rpc):
                acc = dot(acc, xs[r], cents[cb, r, q])
            # (score << 4) | q: the minimum's low 4 bits are its centroid, the first on ties
            keys.append(T.bind(tirx.call_llvm_pure_intrin("int32x16", "llvm.fshl", acc, vec(q << 28), vec(4))))
        while len(keys) > 1:
            keys = [T.bind(T.min(keys[i], keys[i + 1])) for i in range(0, len(keys), 2)]
        return T.bind(keys[0] & vec(15))

    def group_word(xq, cents, offsets, base, g):
        """One int32 per pixel holding the 4 codes of codebook group ``g``, byte j = 16j + code: the
        grouped layout's 16 rows x 4 codebooks as one 64-byte vector."""
        codes = [channel_code(xq, cents, offsets, base, g * 4 + j) for j in range(4)]
        return (codes[0] | ((codes[1] | vec(16)) << vec(8)) | ((codes[2] | vec(32)) << vec(16))
                | ((codes[3] | vec(48)) << vec(24)))

    @T.prim_func(private=True)
    def func(
        x: T.Buffer((bsz, ci_n, h, w), "float32"),
        qparams: T.Buffer((2,), "float32"),
        cents: T.Buffer((c, rpc, k), "int32"),
        offsets: T.Buffer((c, k), "int32"),
        packed: T.Buffer((nb, groups, 4 * pack_lanes), "uint8"),
    ):
        xq = T.alloc_buffer((flat,), "uint8")
        quantize(x, qparams, xq)
        for rb in T.parallel(nb):
            for s in T.serial(sub):
                if rb * pack_lanes + s * LANES < n:
                    for g in T.serial(groups):
                        packed[rb, g, T.Ramp(s * 64, 1, 64)] = T.reinterpret("uint8x64", group_word(
                            xq, cents, offsets, reader.first_tap(rb * pack_lanes + s * LANES), g))
                else:  # rows past the layer's: code 0 of each codebook, byte j = 16j
                    for g in T.serial(groups):
                        packed[rb, g, T.Ramp(s * 64, 1, 64)] = T.reinterpret("uint8x64", vec(0x30201000))

    return opaque_kernel(func, "encode").with_attr("tirx.is_scheduled", True)
