"""TIR PrimFuncs of the PQ lookup layer, shape-specialised and unscheduled.

Each kernel mirrors a numpy function in ``tvm_lut.math.pq`` (the reference the tests hold it against):

===========================  ============================  =============================================
kernel                       computes                      numpy reference
===========================  ============================  =============================================
``im2col``                   NCHW -> (rows, D_pad) patches ``pq.im2col`` + ``pq.pad_columns``
``encode``                   argmin_k (b_k -/+ dist terms) ``pq.encode`` (``l2``, ``cosine``, ``l1``)
``encode_codebook_lanes``    the same, packed, dense rows  ``pq.encode`` + ``pq.pack_codes(_grouped)``
``accumulate``               sum_c int8 T[c, code, m]      ``pq.accumulate``
``butterfly_factor``         grouped r x s matmuls         ``butterfly.apply_factor``
===========================  ============================  =============================================

Kernels are tagged ``"op_pattern": 8`` (opaque: FuseOps leaves them alone; see cookbook P5) and
``"tvm_lut.kernel"`` with their role, which schedules and tuning filter on.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, NamedTuple

import numpy as np
import tvm
from tvm import te, tirx
from tvm.script import tirx as T

from tvm_lut.math import distances

KERNEL_ATTR = "tvm_lut.kernel"
ROW_LANES_ATTR = "tvm_lut.max_row_lanes"  # an encoder's cap on rows per vector (``cpu.schedule_encode``)
# scores the fused-score encoder accumulates side by side (``ScoreChain``): 4 independent multiply-add
# chains in program order. Measured on a Zen 3 (V=9, one thread): 1 -> 4 took 64 channels 32x32 from
# 438 to 368 us; 8 measured the same as 4 (its 8 accumulators and 9 subvector elements exceed 16 ymm),
# 5-7 slower (2026-12-05, alternating: 4 394-399 us, 5 435-438, 6 433-445, 7 447-455, 8 402-414). Its
# centroid broadcasts (one load per multiply-add) cost more there: ``benchmarks/lookup_peak.py``'s
# ``fma_broadcast_per_cycle``, 1.2-1.3 FMAs per cycle against 1.75 without them in most runs on that VM
FUSED_SCORE_CHAINS = 4


def opaque_kernel(func: tirx.PrimFunc, role: str) -> tirx.PrimFunc:
    """``func`` marked as one of our kernels (``role``): opaque to Relax's operator fusion, its buffers
    declared non-aliasing (LLVM may vectorise loads and stores across them)."""
    return func.with_attr("op_pattern", 8).with_attr(KERNEL_ATTR, role).with_attr("tirx.noalias", True)


def im2col(
    n: int,
    c: int,
    h: int,
    w: int,
    kernel_hw: tuple[int, int],
    strides: tuple[int, int],
    padding: tuple[int, int, int, int],
    dilation: tuple[int, int],
    d_pad: int,
) -> tirx.PrimFunc:
    """(N, C, H, W) float32 -> (N*OH*OW, D_pad) patch rows, columns (c, kh, kw), zero padded."""
    kh, kw = kernel_hw
    sh, sw = strides
    pt, pl, pb, pr = padding
    dh, dw = dilation
    oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
    d = c * kh * kw
    x = te.placeholder((n, c, h, w), "float32", name="x")

    def patch(r, col):
        b, rem = r // (oh * ow), r % (oh * ow)
        y, xx = rem // ow, rem % ow
        ci, tap = col // (kh * kw), col % (kh * kw)
        iy = y * sh - pt + (tap // kw) * dh
        ix = xx * sw - pl + (tap % kw) * dw
        inside = tirx.all(col < d, iy >= 0, iy < h, ix >= 0, ix < w)
        return tirx.if_then_else(inside, x[b, tirx.min(ci, c - 1), iy, ix], tirx.const(0.0, "float32"))

    cols = te.compute((n * oh * ow, d_pad), patch, name="im2col")
    return opaque_kernel(te.create_prim_func([x, cols]).without_attr("global_symbol"), "im2col")


@dataclass(frozen=True)
class ConvInput:
    """An NCHW input read as im2col rows on the fly (the encoder fused with im2col): columns (c, kh, kw)."""

    shape: tuple[int, int, int, int]
    kernel_hw: tuple[int, int]
    strides: tuple[int, int]
    padding: tuple[int, int, int, int]
    dilation: tuple[int, int]
    virtual: bool = True  # allow virtual rows (stride 1): the packed encoder; its unpacked twin encodes real rows
    row_tile: int = 16  # virtual rows per image round up to this: the encoder's rows per vector

    @property
    def out_hw(self) -> tuple[int, int]:
        _, _, h, w = self.shape
        (kh, kw), (sh, sw), (pt, pl, pb, pr), (dh, dw) = self.kernel_hw, self.strides, self.padding, self.dilation
        return (h + pt + pb - dh * (kh - 1) - 1) // sh + 1, (w + pl + pr - dw * (kw - 1) - 1) // sw + 1

    @property
    def rows(self) -> int:
        oh, ow = self.out_hw
        return self.shape[0] * oh * ow

    @property
    def d(self) -> int:
        return self.shape[1] * self.kernel_hw[0] * self.kernel_hw[1]

    # -- the zero-padded copy the fused encoder reads ---------------------------------------------
    # The encoder first copies the input once into a flat zero-padded buffer (``pad_zero`` +
    # ``pad_copy``: C*Hp*Wp floats, a ninth of the im2col matrix at 3x3), then reads every patch element
    # from it with no bounds test. With stride 1 the rows are "virtual": row q of an image stands for
    # the output pixel (q // Wp, q % Wp) of the padded width Wp, so 16 consecutive rows are 16
    # consecutive floats of the padded plane for every tap, one vector load even where a 16-row tile
    # spans several output rows (8x8 and 4x4 maps). The Wp - OW columns per output row that are not
    # real pixels are encoded and dropped (their reads stay inside the buffer's slack).

    @property
    def padded_hw(self) -> tuple[int, int]:
        _, _, h, w = self.shape
        pt, pl, pb, pr = self.padding
        return h + pt + pb, w + pl + pr

    @property
    def virtual_rows(self) -> bool:
        """Stride 1: encode rows over the padded width (contiguous loads); else the real rows."""
        return self.virtual and tuple(self.strides) == (1, 1)

    @property
    def rows_per_image(self) -> int:
        """Encoded rows per image: with virtual rows up to the last real pixel, rounded up to ``row_tile``
        (whole vector tiles that never span two images); otherwise OH*OW. A 4x4 map (padded width 6) has
        22 such rows: 32 in 16-row tiles, 24 in 8-row tiles."""
        oh, ow = self.out_hw
        if not self.virtual_rows:
            return oh * ow
        return -(-((oh - 1) * self.padded_hw[1] + ow) // self.row_tile) * self.row_tile

    @property
    def encoded_rows(self) -> int:
        return self.shape[0] * self.rows_per_image

    def flat_size(self, columns: int) -> int:
        """Length of the flat padded buffer: B x Cp planes of Hp*Wp (Cp: enough zero channels for
        ``columns`` im2col columns) plus the slack the last virtual rows read past the last plane."""
        hp, wp = self.padded_hw
        kh, kw = self.kernel_hw
        dh, dw = self.dilation
        taps = kh * kw
        return self.shape[0] * -(-columns // taps) * hp * wp + self.rows_per_image + (kh - 1) * dh * wp + (kw - 1) * dw

    def flat_offset(self, columns: int, b, ci, y, x):
        """Where input element (b, ci, y, x) sits in the flat padded buffer."""
        hp, wp = self.padded_hw
        pt, pl = self.padding[0], self.padding[1]
        cp = -(-columns // (self.kernel_hw[0] * self.kernel_hw[1]))
        return ((b * cp + ci) * hp + y + pt) * wp + x + pl

    def column_offset(self, col):
        """Where im2col column ``col`` = (c, kh, kw) reads, relative to its row's first element: the offset
        of channel c's plane plus the tap's row and column in the flat padded buffer."""
        hp, wp = self.padded_hw
        kh, kw = self.kernel_hw
        dh, dw = self.dilation
        ci, tap = col // (kh * kw), col % (kh * kw)
        return ci * hp * wp + (tap // kw) * dh * wp + (tap % kw) * dw

    def flat_value(self, xflat, columns: int, r, col, col_offsets=None):
        """Element (encoded row r, col) of the im2col matrix, read from the flat padded buffer; with
        ``col_offsets`` (a buffer of ``column_offset`` per column) the column's offset is read, not
        computed: with V=4 at 3x3 the divisions by the kernel size cost the fused-score encoder ~18 % (Zen 3:
        574 -> 470 us at 64 channels 32x32)."""
        hp, wp = self.padded_hw
        kh, kw = self.kernel_hw
        sh, sw = self.strides
        cp = -(-columns // (kh * kw))
        rpi = self.rows_per_image
        b, q = r // rpi, r % rpi
        if self.virtual_rows:
            pixel = q  # (q // wp) * wp + q % wp: the padded-plane offset of the virtual pixel
        else:
            ow = self.out_hw[1]
            pixel = (q // ow) * sh * wp + (q % ow) * sw
        offset = self.column_offset(col) if col_offsets is None else col_offsets[col]
        return xflat[b * cp * hp * wp + pixel + offset]

    def encoded_row(self, r):
        """The encoded row holding real row r (output pixel r of the N*OH*OW im2col rows)."""
        oh, ow = self.out_hw
        if not self.virtual_rows:
            return r
        b, rem = r // (oh * ow), r % (oh * ow)
        return b * self.rows_per_image + (rem // ow) * self.padded_hw[1] + rem % ow


class ScoreChain(NamedTuple):
    """A score as the accumulation it is: ``acc = init``, then ``acc = step(acc, t)`` for t < ``length``.
    ``_argmin_tree`` binds each step, so that several chains can be interleaved step by step."""
    init: tvm.ir.PrimExpr
    step: Callable[[tvm.ir.PrimExpr, int], tvm.ir.PrimExpr]
    length: int


def _argmin_tree(values: list, indices: list, value_dtype: str, index_dtype: str,
                 depth_first: bool = False, interleave: int = 1) -> tvm.ir.PrimExpr:
    """The index of the first minimum of ``values`` by a balanced tree of pairwise compares:
    ``ceil(log2 K)`` dependent steps instead of a K-long chain of min/compare (which bounded the encoder
    by latency, not throughput). Each pair keeps the earlier entry unless the later one is strictly
    smaller, so ties resolve to the lowest index exactly as a serial strict-``<`` scan does. Intermediate
    values are ``Let``-bound, so each value is computed once and no subtree is duplicated. Scalars or
    vectors (one argmin per lane).

    The bindings go level by level (all K values first), or with ``depth_first`` each value just before
    the merge that reads it, so at most ``log2 K`` partial minima are live at once instead of all K values
    (for the fused-score encoder, whose values are the scores themselves: 16 rows x 16 scores spill 16
    AVX2 registers). Both trees merge contiguous runs of entries, so both give the first minimum.

    Values may be ``ScoreChain``s (depth first): then the chains of ``interleave`` consecutive entries
    are bound together, step by step (step t of each, then step t+1), when the first of them is reached.
    A score's steps depend on each other (V multiply-adds, each waiting on the last), the interleaved
    chains do not: written one chain after another, the out-of-order core's scheduler fills with
    multiply-adds that wait on their predecessor, and the FMA ports idle. Each step is the same
    operation as before, so the scores, and the codes, are unchanged."""
    binds: list[tuple[tirx.Var, tvm.ir.PrimExpr]] = []

    def bind(name: str, value, dtype: str) -> tirx.Var:
        var = tirx.Var(name, dtype)
        binds.append((var, value))
        return var

    chained: dict[int, tirx.Var] = {}  # ScoreChain entries bound so far: their final accumulator

    def leaf(q: int):
        if not isinstance(values[q], ScoreChain):
            return bind(f"s{q}", values[q], value_dtype), indices[q]
        if q not in chained:
            run = list(range(q, min(q + interleave, len(values))))
            acc = {p: bind(f"s{p}_0", values[p].init, value_dtype) for p in run}
            for t in range(max(values[p].length for p in run)):
                for p in run:
                    if t < values[p].length:
                        acc[p] = bind(f"s{p}_{t + 1}", values[p].step(acc[p], t), value_dtype)
            chained.update(acc)
        return chained[q], indices[q]

    def merge(first, second, name: str):
        (va, ia), (vb, ib) = first, second
        later = vb < va  # not Let-bound: a bool vector Let trips TVM's analyzer; LLVM shares the compare
        return (bind(f"m{name}", tirx.Select(later, vb, va), value_dtype),
                bind(f"i{name}", tirx.Select(later, ib, ia), index_dtype))

    def build(lo: int, hi: int):  # depth first: the entries lo .. hi-1
        if hi - lo == 1:
            return leaf(lo)
        mid = lo + (hi - lo + 1) // 2
        return merge(build(lo, mid), build(mid, hi), f"{lo}_{hi}")

    if any(isinstance(value, ScoreChain) for value in values) and not depth_first:
        raise ValueError("ScoreChain values are bound depth first (depth_first=True)")
    if depth_first:
        root = build(0, len(values))
    else:
        level = [leaf(q) for q in range(len(values))]
        depth = 0
        while len(level) > 1:
            depth += 1
            nxt = [merge(level[a], level[a + 1], f"{depth}_{a}") for a in range(0, len(level) - 1, 2)]
            if len(level) % 2:
                nxt.append(level[-1])
            level = nxt
        root = level[0]
    out = root[1]
    for var, value in reversed(binds):
        out = tirx.Let(var, value, out)
    return out


def argmin_tree(score: tirx.Buffer, i, j, k: int, first, stride: int) -> tvm.ir.PrimExpr:
    """``first + stride * argmin_q score[i, j, q]``, the first minimum (``_argmin_tree``); the schedule
    vectorizes it over rows."""
    first = tirx.const(first, "int32") if isinstance(first, int) else first
    return _argmin_tree([score[i, j, q] for q in range(k)], [first + q * stride for q in range(k)],
                        "float32", "int32")


def encode(n: int, c: int, k: int, v: int, distance: str, row_stride: int | None = None,
           pack_lanes: int | None = None, pairs: int | None = None, conv: ConvInput | None = None,
           x_transposed: bool = False, grouped: bool = False, fused_scores: bool = False) -> tirx.PrimFunc:
    """codes[n, c] = argmin_k score[n, c, k], one kernel for the three distances.

    With ``row_stride=M`` the kernel writes, instead of the code, the offset of the selected table row
    in the flattened (C*K*M) table, ``(c*K + code) * M``, which is what ``accumulate(...,
    row_offsets=True)`` reads: the selected centroid's offset is a loop induction value, so no
    multiply is spent on table addressing anywhere (this keeps the l1 path multiplier-free).

    With ``pack_lanes=L`` (K=16) the codes come out packed two per byte in the shuffle kernel's layout
    ``(ceil(n/L), pairs, L)`` uint8 (``pq.pack_codes`` is the reference; ``shuffle.lookup`` reads it);
    with ``grouped`` one code per byte in the grouped kernel's layout ``(ceil(n/L), ceil(C/4), 4L)``
    (``pq.pack_codes_grouped``).

    With ``conv`` the input is the layer's NCHW tensor, copied once into a zero-padded buffer from which
    each row's patch is read (the encoder fused with im2col: the (rows, D) matrix is never written; the
    packed encoder at stride 1 scores virtual rows, see ``ConvInput``); otherwise ``x`` is the (n, C*V) rows, or
    with ``x_transposed`` the (C*V, n) column-major matrix (MADDNESS's input layout): the rows that share
    the vector lanes then load contiguously instead of by gathers.

    ``score = offset[c, k] - sum_v x[n, cV+v] * p[c, k, v]`` for ``l2`` (offset ``0.5||p||^2``) and
    ``cosine`` (unit centroids, zero offset); ``score = offset[c, k] + sum_v |x[n, cV+v] - p[c, k, v]|``
    for ``l1`` (zero offset; subtract, abs and add only: no multiplies). The distance is resolved when
    the kernel is built, so each variant compiles to its own straight-line code.

    ``fused_scores`` (packed codes only) computes each score inside the argmin instead of in a score
    buffer, the argmin's Let bindings in depth-first order (``_argmin_tree(depth_first=True)``): a partial
    minimum is formed as soon as its two scores exist, and ``FUSED_SCORE_CHAINS`` scores at a time
    accumulate side by side (``ScoreChain``). With 16 rows per vector the score buffer holds 16 x 16
    floats, which on a 16-register ISA (AVX2: 32 ymm registers' worth) spill, a load and a store per
    multiply-add. Same scores and tie rule: the codes are identical. The fused encoder takes 8 rows per
    vector (``ROW_LANES_ATTR``), one ymm per value: with 16 rows each subvector element, score chain and
    the running minimum and index take two, more than 16 registers from V=2 up. Measured on a Zen 3,
    one thread, 16 -> 8 rows: V=9 522 -> 438 us at 64 channels 32x32; medians of 5 alternations, V=4
    509 -> 477 there, 303 -> 258 at 128 channels 16x16, 493 -> 415 and 399 -> 318 for the demo's 5x5 convs
    at batch 16; V=2 726 -> 617;
    V=3 unchanged (527 against 532). The L1 encoder (subtract, abs and add per element: PECAN-D,
    rows from a separate im2col) keeps 16 rows for V <= 4: (1024, 576) rows, V=2 1139-1149 us with 16
    against 1179-1191 with 8, V=4 966-978 against 957-960 (L2 on the same rows, V=4: 740-752 against
    679-683). The score-buffer encoder (32-register ISAs) takes up to 16.
    """
    if fused_scores and pack_lanes is None:
        raise ValueError("fused_scores applies to the packed-code encoder (pack_lanes=...)")
    dist = distances.get(distance)
    l1 = dist.multiplier_free  # subtract, abs and add only
    stride = 1 if row_stride is None else int(row_stride)
    base = 0 if row_stride is None else k * stride  # offset of codebook c's first row is c * base
    if pack_lanes is not None and (row_stride is not None or k > 16):
        raise ValueError("packed codes need K <= 16 and raw codes (no row_stride)")
    if x_transposed and conv is not None:
        raise ValueError("x_transposed applies to a (C*V, n) matrix input, not to a fused convolution")
    x_shape = conv.shape if conv is not None else ((c * v, n) if x_transposed else (n, c * v))
    if conv is not None and pack_lanes is None:
        conv = replace(conv, virtual=False)  # raw (n, C) codes: encode the real rows only
    # the fused-score encoder's rows per vector (ROW_LANES_ATTR): 8, one ymm register per value; the L1
    # encoder keeps 16 for V <= 4 (no spills measured there: see the docstring)
    row_lanes = 16 if (l1 and v <= 4) else 8
    if conv is not None and fused_scores:
        conv = replace(conv, row_tile=row_lanes)  # virtual rows in whole tiles of that many rows
    # rows the encoder scores: a fused convolution may encode more (virtual rows, ``ConvInput``)
    ne = conv.encoded_rows if conv is not None else n
    flat = conv.flat_size(c * v) if conv is not None else 1

    # subvectors that straddle kernel taps (V=4 at 3x3): a column's channel and tap need divisions by the
    # kernel size per codebook, so read the column offsets from a table; where V divides the taps or the
    # taps divide V (V=9 or 3 at 3x3, 1x1 kernels) they fold to constants once the subvector loop unrolls
    taps = conv.kernel_hw[0] * conv.kernel_hw[1] if conv is not None else 1
    offset_table = conv is not None and taps % v != 0 and v % taps != 0

    def input_rows_macro():
        """The encoder's (ne, C*V) input rows: copied from x, or for a fused convolution read from the
        zero-padded copy ``xflat`` written first. One macro object per kernel: a macro expanded twice
        renames its blocks (``patch_1``), and the schedules look them up by name."""

        @T.macro
        def input_rows(x, xflat, rows, col_offsets):
            if offset_table:
                for col in T.serial(c * v):
                    with T.sblock("col_offset"):
                        vcol = T.axis.remap("S", [col])
                        col_offsets[vcol] = conv.column_offset(vcol)
            if conv is not None:
                for z in T.serial(flat):
                    with T.sblock("pad_zero"):
                        vz = T.axis.remap("S", [z])
                        xflat[vz] = T.float32(0)
                for pb_, pc, py, px in T.grid(*conv.shape):
                    with T.sblock("pad_copy"):
                        vb, vc, vy, vx = T.axis.remap("SSSS", [pb_, pc, py, px])
                        xflat[conv.flat_offset(c * v, vb, vc, vy, vx)] = x[vb, vc, vy, vx]
            for i, col in T.grid(ne, c * v):
                with T.sblock("patch"):
                    vi, vcol = T.axis.remap("SS", [i, col])
                    if conv is not None:
                        rows[vi, vcol] = conv.flat_value(xflat, c * v, vi, vcol, col_offsets if offset_table else None)
                    elif x_transposed:
                        rows[vi, vcol] = x[vcol, vi]
                    else:
                        rows[vi, vcol] = x[vi, vcol]

        return input_rows

    def score_step(acc, x, p):
        """One subvector element's term of a score: ``acc + |x - p|`` (l1) or ``acc - x * p``."""
        return dist.score_step(acc, x, p, fabs=T.fabs)

    def score_macro():
        """The score reduction over ``count`` rows, ``score[i, j, q] = offset[j, q] -/+ sum_t ...``, as a
        block named "score" (one macro object per kernel, as ``input_rows_macro``)."""

        @T.macro
        def score_block(score, rows, cents, offsets, count):
            for i, j, q, t in T.grid(count, c, k, v):
                with T.sblock("score"):
                    vi, vj, vq, vt = T.axis.remap("SSSR", [i, j, q, t])
                    with T.init():
                        score[vi, vj, vq] = offsets[vj, vq]
                    score[vi, vj, vq] = score_step(score[vi, vj, vq], rows[vi, vj * v + vt], cents[vj, vt, vq])

        return score_block

    input_rows, score_block = input_rows_macro(), score_macro()

    @T.prim_func(private=True, s_tir=True)
    def func(
        x: T.Buffer(x_shape, "float32"),
        cents: T.Buffer((c, v, k), "float32"),
        offsets: T.Buffer((c, k), "float32"),
        codes: T.Buffer((n, c), "int32"),
    ):
        score = T.sblock_alloc_buffer((n, c, k), "float32")
        rows = T.sblock_alloc_buffer((ne, c * v), "float32")
        xflat = T.sblock_alloc_buffer((flat,), "float32")
        col_offsets = T.sblock_alloc_buffer((c * v if offset_table else 1,), "int32")
        input_rows(x, xflat, rows, col_offsets)
        score_block(score, rows, cents, offsets, n)
        for i, j in T.grid(n, c):
            with T.sblock("argmin"):
                vi, vj = T.axis.remap("SS", [i, j])
                codes[vi, vj] = argmin_tree(score, vi, vj, k, vj * base, stride)

    def finish(f: tirx.PrimFunc) -> tirx.PrimFunc:
        f = opaque_kernel(f, "encode")
        if fused_scores:  # rows per vector such that a tile's values fit 16 ymm registers
            f = f.with_attr(ROW_LANES_ATTR, row_lanes)
        return f.with_attr("tvm_lut.fused_im2col", True) if conv is not None else f

    if pack_lanes is None:
        return finish(func)

    lanes, half = pack_lanes, pack_lanes // 2
    pairs = -(-c // 2) if pairs is None else pairs
    nb = -(-n // lanes)
    groups = -(-c // 4)
    packed_shape = (nb, groups, 4 * lanes) if grouped else (nb, pairs, lanes)

    def score_chain(rows, cents, offsets, i, j, q) -> ScoreChain:
        """Score of centroid q of codebook j for row i, in the score block's operation order."""
        return ScoreChain(offsets[j, q], lambda acc, t: score_step(acc, rows[i, j * v + t], cents[j, t, q]), v)

    def code_at(codes, row, col):
        """Code of codebook ``col`` for row ``row`` (0 beyond the rows/codebooks)."""
        src = T.min(row, n - 1) if conv is None else conv.encoded_row(T.min(row, n - 1))
        return T.if_then_else(tirx.all(row < n, col < c), codes[src, T.min(col, c - 1)], 0)

    def nibble_row(vb, vj):
        """Row of byte ``vj`` of nibble block ``vb``: the two halves of the block interleave."""
        return vb * lanes + (vj % 2) * half + vj // 2

    input_rows, score_block = input_rows_macro(), score_macro()

    @T.prim_func(private=True, s_tir=True)
    def packed_func(
        x: T.Buffer(x_shape, "float32"),
        cents: T.Buffer((c, v, k), "float32"),
        offsets: T.Buffer((c, k), "float32"),
        packed: T.Buffer(packed_shape, "uint8"),
    ):
        score = T.sblock_alloc_buffer((1, 1, 1) if fused_scores else (ne, c, k), "float32")
        rows = T.sblock_alloc_buffer((ne, c * v), "float32")
        xflat = T.sblock_alloc_buffer((flat,), "float32")
        col_offsets = T.sblock_alloc_buffer((c * v if offset_table else 1,), "int32")
        input_rows(x, xflat, rows, col_offsets)
        codes = T.sblock_alloc_buffer((ne, c), "int32")
        if fused_scores:  # the scores inline into the argmin (a depth-first ``_argmin_tree``): no score buffer
            for i, j in T.grid(ne, c):
                with T.sblock("argmin"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    codes[vi, vj] = _argmin_tree(
                        [score_chain(rows, cents, offsets, vi, vj, q) for q in range(k)],
                        [tirx.const(q, "int32") for q in range(k)], "float32", "int32", depth_first=True,
                        interleave=FUSED_SCORE_CHAINS)
        else:
            score_block(score, rows, cents, offsets, ne)
            for i, j in T.grid(ne, c):
                with T.sblock("argmin"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    codes[vi, vj] = argmin_tree(score, vi, vj, k, 0, 1)
        if grouped:
            for b, g, j in T.grid(nb, groups, 4 * lanes):
                with T.sblock("pack"):
                    vb, vg, vj = T.axis.remap("SSS", [b, g, j])
                    packed[vb, vg, vj] = T.Cast("uint8", code_at(codes, vb * lanes + vj // 4, vg * 4 + vj % 4)
                                                + (vj % 4) * 16)
        else:
            for b, p, j in T.grid(nb, pairs, lanes):
                with T.sblock("pack"):
                    vb, vp, vj = T.axis.remap("SSS", [b, p, j])
                    packed[vb, vp, vj] = T.Cast("uint8", T.bitwise_or(
                        code_at(codes, nibble_row(vb, vj), vp * 2),
                        T.shift_left(code_at(codes, nibble_row(vb, vj), vp * 2 + 1), 4)))

    return finish(packed_func)


CODEBOOK_LANES = 16  # codebooks scored side by side in one 512-bit float vector
# on 16-register ISAs (AVX2): one 256-bit vector. With 16 lanes each score and subvector element took two
# ymm registers (and spilled); measured on a Zen 3 with float indices (below), N=1024, V=4, one thread:
# D=256 221 -> 206 us, D=576 579 -> 451, D=1152 1014 -> 920
CODEBOOK_LANES_16_REGISTERS = 8
CENTROID_L1_BYTES = 16 * 1024  # centroids kept in L1 while a block of rows is encoded (of 32-48 KB)

# x86 ``unpcklps/unpckhps/unpcklpd/unpckhpd``: which 4 of two vectors' 8 elements of each 128-bit lane they take
UNPCKLPS, UNPCKHPS, UNPCKLPD, UNPCKHPD = (0, 4, 1, 5), (2, 6, 3, 7), (0, 1, 4, 5), (2, 3, 6, 7)


def in_lane(pattern: tuple[int, ...], lanes: int) -> list[int]:
    """Shuffle indices into two concatenated ``lanes``-element vectors that apply ``pattern`` (0-3: the first
    vector's elements of a 128-bit lane, 4-7: the second's) to each 128-bit lane."""
    return [q * 4 + p if p < 4 else lanes + q * 4 + p - 4 for q in range(lanes // 4) for p in pattern]


def _transpose4_in_lanes(raw: list, lanes: int, shuffle: Callable) -> list:
    """Four vectors -> four, by two levels of in-lane unpacks (8 single-cycle shuffles): with
    ``raw[i]`` = floats ``lanes*i .. lanes*i + lanes-1`` of a block of ``lanes`` codebooks x V=4 subvector
    elements, vector ``t`` holds element ``t`` of every codebook, in the order ``lane_order`` gives (not
    codebook order: that would need lane-crossing permutes). ``shuffle(vectors, indices)`` builds the
    shuffle: ``tirx.Shuffle`` in the kernel, numpy indexing in ``lane_order``."""
    a, b = shuffle(raw[:2], in_lane(UNPCKLPS, lanes)), shuffle(raw[:2], in_lane(UNPCKHPS, lanes))
    c, d = shuffle(raw[2:], in_lane(UNPCKLPS, lanes)), shuffle(raw[2:], in_lane(UNPCKHPS, lanes))
    return [shuffle([a, c], in_lane(UNPCKLPD, lanes)), shuffle([a, c], in_lane(UNPCKHPD, lanes)),
            shuffle([b, d], in_lane(UNPCKLPD, lanes)), shuffle([b, d], in_lane(UNPCKHPD, lanes))]


def _transpose_quads(load: Callable[[int, int], tvm.ir.PrimExpr], v: int, lanes: int, shuffle: Callable) -> list:
    """The codebook-lane deinterleave for V > 4: one row's ``lanes`` codebooks x V floats (``load(offset,
    width)`` reads them) -> V vectors, vector t = element t of the codebooks, in codebook order.

    Elements t0 .. t0+3 (t0 = 0, 4, ..., the last quad ending at element V-1) of codebooks i, i+4, ... (one
    per 128-bit lane) are 4-float loads joined into one vector (``vinsertf128``/``vinsertf32x4`` from
    memory); ``_transpose4_in_lanes`` of four such vectors leaves element t0+j of codebooks 4g .. 4g+3 in
    128-bit lane g: codebook order. Every load stays inside the block.

    LLVM lowered the generic V-vector shuffle this replaces to lane-crossing permutes plus spills. At V=9
    (D=576), instructions in the encoder's step (144 multiply-adds): 8 lanes on AVX2 579 -> 373 (no
    ``vpermps``, 12 inserts and 19 in-lane shuffles); 16 lanes compiled for ``icelake-server`` 477 -> 347
    (45 ``vpermt2ps`` -> 0, ~140 register moves and spills -> ~50; counted in the assembly, not timed:
    no AVX-512 machine was at hand)."""
    out: list = [None] * v
    for t0 in sorted({*range(0, v - 3, 4), v - 4}):
        joined = [shuffle([load((i + 4 * g) * v + t0, 4) for g in range(lanes // 4)], range(lanes)) for i in range(4)]
        for j, vector in enumerate(_transpose4_in_lanes(joined, lanes, shuffle)):
            if out[t0 + j] is None:
                out[t0 + j] = vector
    return out


def lane_order(lanes: int, v: int) -> tuple[int, ...] | None:
    """The codebook in each vector lane of ``encode_codebook_lanes``, or None for codebook order.

    Where the 16-register encoder (8 lanes) has V=4, its deinterleave is ``_transpose4_in_lanes``: lane
    ``l`` of each subvector-element vector then holds codebook ``order[l]`` of the block, (0, 2, 4, 6, 1,
    3, 5, 7), and ``codebook_lane_operands`` lays the centroids and offsets out in the same order. In
    codebook order the same deinterleave took LLVM 26 shuffles and blends per step (12 ``vpermps``)
    instead of 8; the scores and codes are the same, lane for lane."""
    if lanes != CODEBOOK_LANES_16_REGISTERS or v != 4:
        return None
    labels = [np.arange(lanes * i, lanes * (i + 1)) for i in range(4)]  # float j of the block: codebook j // 4
    out = _transpose4_in_lanes(labels, lanes, lambda vs, idx: np.concatenate(vs)[idx])
    assert all((vec % 4 == t).all() for t, vec in enumerate(out))  # vector t: element t of each codebook
    return tuple(int(q) for q in out[0] // 4)


def codebook_lane_operands(cents: np.ndarray, offsets: np.ndarray,
                           lanes: int = CODEBOOK_LANES) -> tuple[np.ndarray, np.ndarray]:
    """``encode``'s operands, centroids (C, V, K) and offsets (C, K), in ``encode_codebook_lanes``' layout
    for ``lanes`` codebook lanes L: (ceil(C/L), V, K, L) and (ceil(C/L), K, L), codebook innermost, so that
    the values of one (subvector element, centroid) for L codebooks are one contiguous vector, the
    codebooks of a block in the kernel's ``lane_order``. Codebooks past C are zero (their codes are never
    stored)."""
    c, v, k = cents.shape
    blocks = -(-c // lanes)
    cp = np.zeros((blocks * lanes, v, k), np.float32)
    cp[:c] = cents
    op = np.zeros((blocks * lanes, k), np.float32)
    op[:c] = offsets
    order = list(lane_order(lanes, v) or range(lanes))  # each block's codebooks in the kernel's lane order
    return (np.ascontiguousarray(cp.reshape(blocks, lanes, v, k)[:, order].transpose(0, 2, 3, 1)),
            np.ascontiguousarray(op.reshape(blocks, lanes, k)[:, order].transpose(0, 2, 1)))


def encode_codebook_lanes(n: int, c: int, k: int, v: int, distance: str, pack_lanes: int, grouped: bool = True,
                          pairs: int | None = None, codebook_lanes: int = CODEBOOK_LANES,
                          float_indices: bool = False) -> tirx.PrimFunc:
    """A dense layer's encoder with ``codebook_lanes`` (16; 8 on AVX2) codebooks of one row as the vector
    lanes, writing grouped packed codes (``pq.pack_codes_grouped``, ``shuffle``'s ``vpermb`` kernel) or,
    with ``grouped=False``, codes
    two per byte (``pq.pack_codes`` with ``pairs`` byte rows, default ceil(C/2): the ``pshufb``/``tbl``
    kernels' layout; the padding pairs are written as code 0). Already vectorized (no schedule).

    ``encode`` puts 16 *rows* in the lanes, which on a row-major (n, C*V) input costs a strided gather
    per subvector element (16 loads each). Here one row's C*V floats are read contiguously: V vector
    loads cover 16 codebooks, and V two-source permutes (``Shuffle``) deinterleave them into one vector
    per subvector element. The centroids come codebook-innermost (``codebook_lane_operands``), so every
    score update is a vector FMA with a full-vector memory operand (no broadcast), and the argmin over K
    is a tree of vertical vector compares (``_argmin_tree``) as in ``encode``. A row's 16 codes then store
    as four 4-byte groups. Scores are computed as in ``encode`` (same operation order), so the codes are
    the same: bit-exact against ``pq.encode``.

    Codebooks past the last whole block form a partial block: its columns are copied, zero-padded, into a
    per-row-block slot and read from there (its padding codebooks' centroids are zero and their codes are
    not stored); rows past ``n`` in the last block of ``pack_lanes`` rows get code 0, as
    ``pq.pack_codes_grouped`` writes them.

    The blocks, the partial one included, go through a software-pipelined loop (``encode_span``): each
    step loads and deinterleaves the next step's subvectors while the current ones are scored. The loop is
    emitted once for the whole L1 groups and once more for a last, smaller group, each with its group size
    a constant (a runtime size, one loop for all, measured 5-7 % slower); the partial block has no loop of
    its own: each copy of the scores and argmin tree costs LLVM seconds (C=100, 8 lanes: 8.0-8.9 s with
    three copies, 4.6-4.7 s with two).

    For ISAs with 16 vector registers (AVX2): ``codebook_lanes=8`` scores 8 codebooks per step, one ymm
    register per score (operands: ``codebook_lane_operands(..., lanes=8)``), and ``float_indices`` carries
    the argmin's index as a float. With int32 indices that end up stored as bytes, LLVM narrowed each index
    select to bytes and packed each compare mask down to them: three more shuffles per merge of the tree.
    A float select stays one ``vblendvps``; the codes are the same (0..15 are exact floats). At V=4 its
    deinterleave is two levels of in-lane unpacks, which leave the codebooks in ``lane_order``: 220
    instructions a step instead of 257 at D=256. Measured on a Zen 3, N=1024, one thread, both built in
    one process and alternated 5 times, median us: D=256 201 -> 189, D=400 324 -> 306, D=576 449 -> 423,
    D=1152 892 -> 837. At V > 4 (8 or 16 lanes) the deinterleave is ``_transpose_quads`` (joined 4-float
    loads, in-lane unpacks, codebook order) instead of LLVM's lowering of one V-vector shuffle. 8 lanes,
    N=1024, D=576, both built in one process and alternated 3-5 times, median us: V=9 443 -> 380 (and
    648 -> 540 in a slower state of the machine), V=8 462 -> 342, V=6 438 -> 379, V=5 (D=580) 438 -> 408,
    V=12 455 -> 387.
    """
    if k > 16:
        raise ValueError(f"packed codes need K <= 16, got K={k}")
    if codebook_lanes not in (8, 16):
        raise ValueError(f"codebook_lanes must be 8 or 16, got {codebook_lanes}")
    lanes = codebook_lanes
    dist = distances.get(distance)
    d, blocks, full = c * v, -(-c // lanes), c // lanes
    groups, nb = -(-c // 4), -(-n // pack_lanes)
    code_pairs = -(-c // 2)
    pairs = code_pairs if pairs is None else pairs
    if not grouped and (pairs < code_pairs or pack_lanes % 2):
        raise ValueError(f"nibble codes of C={c} codebooks need >= {code_pairs} pairs and an even row block, "
                         f"got pairs={pairs}, pack_lanes={pack_lanes}")
    vec, ivec = f"float32x{lanes}", f"int32x{lanes}"

    order = lane_order(lanes, v)  # None: lane q holds codebook q of the block

    def shuffle_of(vectors: list, indices) -> tirx.Shuffle:
        return tirx.Shuffle(vectors, [tirx.const(i, "int32") for i in indices])

    def deinterleave(load: Callable[[int, int], tvm.ir.PrimExpr]) -> list:
        """One row's L*V floats of a block (L codebook lanes; ``load(offset, width)`` reads ``width`` of them
        from ``offset``) -> V vectors, vector t = element t of the L codebooks (in ``lane_order``)."""
        if order is not None:
            return _transpose4_in_lanes([load(lanes * i, lanes) for i in range(v)], lanes, shuffle_of)
        if v > 4:
            return _transpose_quads(load, v, lanes, shuffle_of)
        raw = [load(lanes * i, lanes) for i in range(v)]
        return [shuffle_of(raw, [q * v + t for q in range(lanes)]) for t in range(v)]

    tail_cols = d - full * lanes * v  # the partial block's columns of a row (0: no partial block)

    def row_block(x, r, b) -> list:
        """Row r's subvectors of full codebook block b, deinterleaved."""
        return deinterleave(lambda offset, width: x[r, tirx.Ramp(b * (lanes * v) + offset, 1, width)])

    def tail_block(xt, rb, rr) -> list:
        """Row ``rr`` of row block ``rb``'s subvectors of the partial block, from its zero-padded copy."""
        return deinterleave(lambda offset, width: xt[rb, rr, tirx.Ramp(offset, 1, width)])

    def carry(xn, xs: list) -> None:
        """Store V vectors into the carried scratch ``xn`` (one statement each, constant offsets: LLVM keeps
        ``xn`` in registers)."""
        for t, value in enumerate(xs):
            T.buffer_store(xn, value, [tirx.Ramp(lanes * t, 1, lanes)])

    def snapshot(xn) -> list:
        """The V vectors in ``xn``, bound to variables before ``carry`` overwrites them."""
        return [T.bind(xn[tirx.Ramp(lanes * t, 1, lanes)]) for t in range(v)]

    def codes_from(xs: list, cents, offsets, b):
        """The 16 codes (int32 vector) of one row for codebook block b, given its deinterleaved subvectors."""
        scores = []
        for q in range(k):
            score = offsets[b, q, tirx.Ramp(0, 1, lanes)]
            for t in range(v):
                p = cents[b, t, q, tirx.Ramp(0, 1, lanes)]
                score = dist.score_step(score, xs[t], p, fabs=T.fabs)
            scores.append(score)
        index = "float32" if float_indices else "int32"
        codes = _argmin_tree(scores, [tirx.Broadcast(tirx.const(q, index), lanes) for q in range(k)], vec,
                             f"{index}x{lanes}")
        codes = tirx.Cast(ivec, codes) if float_indices else codes
        if order is None:
            return codes
        var = tirx.Var("lane_codes", ivec)  # back to codebook order for the byte packing (one shuffle)
        return tirx.Let(var, codes, shuffle_of([var], [order.index(q) for q in range(lanes)]))

    def grouped_bytes(codes):
        """Byte of codebook j within its group of 4 is ``16 * (j % 4) + code`` (its vpermb table index)."""
        return tirx.Cast(f"uint8x{lanes}", codes + tirx.Ramp(0, 1, lanes) % 4 * 16)

    def nibble_bytes(codes):
        """The L/2 bytes of L codebooks' codes two per byte: codebook 2p low nibble, 2p+1 high."""
        var = tirx.Var("codes", ivec)  # bound once: the argmin tree's Let chain is read by both shuffles
        even, odd = (shuffle_of([var], [2 * p + h for p in range(lanes // 2)]) for h in (0, 1))
        shift = tirx.Broadcast(tirx.const(4, "int32"), lanes // 2)
        return tirx.Let(var, codes, tirx.Cast(f"uint8x{lanes // 2}", even | (odd << shift)))

    # a block's L codes as bytes, and where they go: grouped, L/4 4-byte groups at the row's slot; nibbles,
    # one byte in each of L/2 pair rows, at byte 2r (first half of the row block) or 2(r - L/2) + 1 (second)
    to_bytes, width = (grouped_bytes, lanes) if grouped else (nibble_bytes, lanes // 2)
    zero_bytes = (grouped_bytes(tirx.Broadcast(tirx.const(0, "int32"), lanes)) if grouped
                  else tirx.Broadcast(tirx.const(0, "uint8"), width))  # code 0 (rows past n)
    half = pack_lanes // 2

    code_rows = groups if grouped else code_pairs  # groups or pairs holding real codebooks
    per_block = lanes // 4 if grouped else lanes // 2  # groups or pairs of a block's codes

    def store_codes(packed, code, rb, rr, b, partial: bool) -> None:
        """Store the groups (grouped) or pairs (nibbles) of block ``b``'s ``code`` for row ``rr`` of row block
        ``rb``; those of the partial block past the last codebook are not stored (``partial``: ``b`` may be
        the partial block)."""
        for q in range(per_block):
            if not partial or q < code_rows - full * per_block:  # statically in range
                _store_code(packed, code, rb, rr, b, q)
            else:  # the partial block's last rows: only while they hold real codebooks
                with T.If(b * per_block + q < code_rows):
                    with T.Then():
                        _store_code(packed, code, rb, rr, b, q)

    def _store_code(packed, code, rb, rr, b, q) -> None:
        if grouped:
            T.buffer_store(packed, code[T.Ramp(q * 4, 1, 4)], [rb, b * per_block + q, T.Ramp(rr * 4, 1, 4)])
        else:
            T.buffer_store(packed, code[q], [rb, b * per_block + q, rr % half * 2 + rr // half])

    group = max(1, CENTROID_L1_BYTES // (v * k * lanes * 4))  # codebook blocks whose centroids share L1
    whole_groups, last_group = blocks // group, blocks % group  # the partial block counts as a block

    @T.macro
    def load_next(x, xt, xn, rb, rr, b, partial: bool):
        """Carry row ``rr`` of row block ``rb``, codebook block ``b`` into ``xn``; with ``partial`` (the span
        holds the partial block) a branch reads that block from ``xt``."""
        if not partial:
            carry(xn, row_block(x, T.min(rb * pack_lanes + rr, n - 1), b))
        elif full == 0:
            carry(xn, tail_block(xt, rb, rr))
        else:
            if b < full:
                carry(xn, row_block(x, T.min(rb * pack_lanes + rr, n - 1), b))
            else:
                carry(xn, tail_block(xt, rb, rr))

    @T.macro
    def encode_span(x, xt, cents, offsets, packed, code, xn, rb, g0, gs, partial):
        """The rows of row block ``rb`` for codebook blocks ``g0 .. g0+gs-1`` (the partial one included, read
        from its zero-padded copy ``xt``), row by row, software-pipelined: each step loads and deinterleaves
        the *next* (row, block)'s subvectors into ``xn`` before scoring the current ones, so the loads and
        permutes are off the scores' critical path. Before, loads -> permutes -> 4 dependent FMAs -> a
        4-level argmin tree made a ~55-cycle chain per step, about a step's 53 cycles of FMA-port work, and
        the out-of-order window (~130 vector uops a step) could not overlap steps: one thread, N=1024,
        120 -> 98 us at D=256, 309 -> 284 at D=576, 620 -> 532 at D=1152. Rows past ``n`` are read clamped
        and get code 0. ``gs`` is a Python int: a constant trip count; ``partial``: whether the blocks
        include the partial one (only that span has its branch and store guards)."""
        load_next(x, xt, xn, rb, 0, g0, partial)
        for rr in T.serial(pack_lanes):
            for j in T.serial(gs):
                cur = snapshot(xn)
                load_next(x, xt, xn, rb, T.Select(j + 1 < gs, rr, T.min(rr + 1, pack_lanes - 1)),
                          g0 + T.Select(j + 1 < gs, j + 1, 0), partial)
                code[T.Ramp(0, 1, width)] = T.Select(  # rows past n: code 0 (a branch here timed the same)
                    rb * pack_lanes + rr < n, to_bytes(codes_from(cur, cents, offsets, g0 + j)), zero_bytes)
                store_codes(packed, code, rb, rr, g0 + j, partial)

    @T.prim_func(private=True)
    def func(
        x: T.Buffer((n, d), "float32"),
        cents: T.Buffer((blocks, v, k, lanes), "float32"),
        offsets: T.Buffer((blocks, k, lanes), "float32"),
        packed: T.Buffer((nb, groups, 4 * pack_lanes) if grouped else (nb, pairs, pack_lanes), "uint8"),
    ):
        # scratch that LLVM keeps in registers (constant indices only): as memory, the threads would share it.
        # At the root because inside the parallel loop TVM makes a "local" buffer a heap workspace per
        # iteration, which measured slower (per-block slots: 105 us against 98 at D=256)
        code = T.alloc_buffer((lanes,), "uint8", scope="local")
        xn = T.alloc_buffer((v * lanes,), "float32", scope="local")
        # the partial block's columns, zero-padded to a whole block: a slot per row block (threads)
        xt = T.alloc_buffer((nb, pack_lanes, lanes * v) if tail_cols > 0 else (1, 1, 1), "float32")
        for rb in T.parallel(nb):
            if tail_cols > 0:
                for rr, j in T.grid(pack_lanes, lanes * v - tail_cols):  # the padding columns
                    xt[rb, rr, tail_cols + j] = T.float32(0)
                for rr, j in T.grid(pack_lanes, tail_cols):
                    xt[rb, rr, j] = x[T.min(rb * pack_lanes + rr, n - 1), full * (lanes * v) + j]
            # codebook blocks in groups whose centroids fit in L1 (CENTROID_L1_BYTES), each group over the
            # block's rows: a row's groups are contiguous reads of x, and a group's centroids stay in L1
            # across the rows (row-outermost re-read all C*V*K floats per row: 74 KB at D=1152, from L2)
            if whole_groups > 0:
                for gi in T.serial(whole_groups):
                    encode_span(x, xt, cents, offsets, packed, code, xn, rb, gi * group, group,
                                tail_cols > 0 and last_group == 0)
            if last_group > 0:
                encode_span(x, xt, cents, offsets, packed, code, xn, rb, whole_groups * group, last_group,
                            tail_cols > 0)
            if not grouped and pairs > code_pairs:  # the lookup's padding pairs: code 0
                for p in T.serial(pairs - code_pairs):
                    packed[rb, code_pairs + p, T.Ramp(0, 1, pack_lanes)] = T.Broadcast(T.uint8(0), pack_lanes)

    return opaque_kernel(func, "encode").with_attr("tirx.is_scheduled", True)


def accumulate(n: int, c: int, k: int, m: int, row_offsets: bool = False) -> tirx.PrimFunc:
    """acc[n, m] = sum_c int32(T[c, codes[n, c], m]) over int8 tables (C, K, M).

    ``row_offsets=True``: ``codes`` hold table row offsets from ``encode(..., row_stride=M)`` and the
    tables come flattened to (C*K*M,): ``acc[n, m] = sum_c int32(T_flat[codes[n, c] + m])``, loads and
    adds only.
    """
    if row_offsets:
        return _accumulate_offsets(n, c, k, m)

    @T.prim_func(private=True, s_tir=True)
    def func(
        codes: T.Buffer((n, c), "int32"),
        tables: T.Buffer((c, k, m), "int8"),
        acc: T.Buffer((n, m), "int32"),
    ):
        for i, o, j in T.grid(n, m, c):
            with T.sblock("acc"):
                vi, vo, vj = T.axis.remap("SSR", [i, o, j])
                with T.init():
                    acc[vi, vo] = 0
                acc[vi, vo] = acc[vi, vo] + T.Cast("int32", tables[vj, codes[vi, vj], vo])

    return opaque_kernel(func, "accumulate")


def _accumulate_offsets(n: int, c: int, k: int, m: int) -> tirx.PrimFunc:
    @T.prim_func(private=True, s_tir=True)
    def func(
        codes: T.Buffer((n, c), "int32"),
        tables: T.Buffer((c * k * m,), "int8"),
        acc: T.Buffer((n, m), "int32"),
    ):
        for i, o, j in T.grid(n, m, c):
            with T.sblock("acc"):
                vi, vo, vj = T.axis.remap("SSR", [i, o, j])
                with T.init():
                    acc[vi, vo] = 0
                acc[vi, vo] = acc[vi, vo] + T.Cast("int32", tables[codes[vi, vj] + vo])

    return opaque_kernel(func, "accumulate")


def butterfly_factor(n: int, nb: int, r: int, s: int, t: int) -> tirx.PrimFunc:
    """One DeBut factor R(p, q | r, s, t) on ``n`` rows: ``nb * t`` grouped ``r x s`` matmuls.

    ``x`` (n, q = nb*s*t), values ``w`` stored ``(nb, s, r, t)`` (``butterfly.py``'s ``(nb, r, s, t)``
    with the middle axes swapped, so that for a fixed input digit ``j`` the outputs ``(i, d)`` of a
    block are contiguous), ``y`` (n, p = nb*r*t)::

        y[n, b*r*t + i*t + d] = sum_j w[b, j, i, d] * x[n, b*s*t + j*t + d]

    Reference: ``tvm_lut.math.butterfly.apply_factor``.
    """
    p, q = nb * r * t, nb * s * t

    @T.prim_func(private=True, s_tir=True)
    def func(
        x: T.Buffer((n, q), "float32"),
        w: T.Buffer((nb, s, r, t), "float32"),
        y: T.Buffer((n, p), "float32"),
    ):
        for row, b, j, i, d in T.grid(n, nb, s, r, t):
            with T.sblock("factor"):
                vn, vb, vj, vi, vd = T.axis.remap("SSRSS", [row, b, j, i, d])
                with T.init():
                    y[vn, vb * (r * t) + vi * t + vd] = T.float32(0)
                y[vn, vb * (r * t) + vi * t + vd] = (y[vn, vb * (r * t) + vi * t + vd]
                                                     + w[vb, vj, vi, vd] * x[vn, vb * (s * t) + vj * t + vd])

    return opaque_kernel(func, "butterfly")
