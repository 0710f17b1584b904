"""Shuffle-lookup accumulate: the PQ table readout done by byte shuffles (``pshufb``), codes packed two per byte.

With K=16 one codebook's int8 table column (16 entries for one output) fits a 128-bit register, and a byte
shuffle looks up one entry per byte lane: 16 (SSSE3, or NEON ``tbl`` on AArch64), 32 (AVX2) or 64
(AVX-512BW) rows per instruction
(RESEARCH.md §2, the MADDNESS/LUT-NN orientation). Per 64-row block and tile of ``mb`` outputs::

    codes  = packed[b, pair, :]                 # 64 bytes: low nibble = codebook 2p, high = 2p+1
    for o in tile:                              # the tile's accumulators stay in registers
        v0 = pshufb(broadcast(T[o, 2p]), codes & 15)   # 64 lookups
        v1 = pshufb(broadcast(T[o, 2p+1]), codes >> 4)
        acc_lo[o] += v0 + v1      (as 32 x uint16: even byte + 256 * odd byte, wraps mod 2^16)
        acc_hi[o] += (v0 >> 8) + (v1 >> 8)     (the odd bytes alone)

Tables are stored biased, ``uint8(T + 128)``, so the odd byte of each 16-bit word is extracted with one
shift and the even byte is ``acc_lo - (acc_hi << 8)`` once per block: the int8 -> int16 widening costs one
shift per lookup vector instead of two sign extensions and a lane extract (the sign extensions compete with
the shuffle for the same ports). Each 16-bit word holds two rows: byte ``2i`` is row ``i`` and byte
``2i+1`` row ``L/2 + i`` of the block (``pack_codes`` lays them out so), so the even sums are rows
``0..L/2-1`` in order and the odd sums the rest. Blocks of up to 256 codebooks (``CODEBOOK_BLOCK``) are
summed in uint16 (255 * 256 < 2^16), then added to int32 with the bias ``128 * codebooks`` removed, then
``y = float(acc) * scale + bias`` (one fused multiply-add per output: the only multiply of the kernel).

Output is ``y[M, N]`` (outputs-major: for a convolution at batch 1 that is already NCHW; at batch B
``y[B, M, N/B]``, see ``lookup``'s ``images``) or, with ``rows_major``,
``y[N, M]`` (a dense layer's layout, stored from a small per-tile buffer).

Numpy reference: ``tvm_lut.math.pq.pack_codes`` (the code layout) and ``tvm_lut.math.pq.accumulate`` (the sums).

**Grouped variant (AVX-512 VBMI + VNNI, ``ShuffleISA.grouped``).** ``vpermb`` looks a byte up in a whole
64-byte register, i.e. in the tables of four codebooks at once (index ``16j + code`` for codebook ``j`` of
the group), and ``vpdpbusd`` with a vector of ones adds four adjacent signed bytes into an int32 lane.
Codes are stored one per byte, ``(row, codebook-in-group)`` adjacent, so one 64-byte code vector is 16
rows x 4 codebooks and per output::

    v = vpermb(T[o, group], codes[group, 16 rows])   # 64 lookups: 4 codebooks of 16 rows
    acc[o, rows] = vpdpbusd(acc[o, rows], ones, v)   # + the 4 codebooks' int8 entries, exact in int32

Two instructions per 64 lookups and no bias, widening or flush: on the machine this was written on (Zen 5)
``pshufb``, its 128->512-bit table broadcast and the ``>> 8`` widening all issue on the same two shuffle
ports (measured: 2 per cycle together), so the nibble kernel spends three of those slots per 64 lookups;
the grouped kernel one. Tables are plain int8 ``(M_pad, groups, 64)`` (``pack_tables(grouped=True)``),
the same bytes as the nibble layout. Rows per block are 16, 32 or 64 (``block_rows``), a multiple of 16.
Reference layout: ``tvm_lut.math.pq.pack_codes_grouped``.
"""

from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import tirx
from tvm.script import tirx as T

from tvm_lut.targets.isa import (  # noqa: F401  (the targets' ISA facts these kernels are built for)
    DOT_INTRINSIC,
    ISAS,
    PERMUTE_INTRINSIC,
    ShuffleISA,
    isa_for,
)

from .kernels import UNPCKHPD, UNPCKHPS, UNPCKLPD, UNPCKLPS, in_lane, opaque_kernel

DEFAULT_TILE = 4  # outputs per register tile of the hand schedule (measured best of 2/4/8/16 at C=32)
DEFAULT_TILE_ROWS_MAJOR = 8  # nibble kernel, rows-major: mb floats per row store; wider tiles store less often
# (where the ISA has 32 vector registers: 8 outputs take 16 accumulators; with 16 registers (AVX2, SSSE3) they
# spill, and ``tile_for`` keeps DEFAULT_TILE)
CODEBOOK_BLOCK = 256  # codebooks summed in uint16 before the int32 flush: 255 * 256 < 65536
GROUP = 4  # codebooks per 64-byte grouped table (4 x K=16 entries)


def tile_for(isa: ShuffleISA, rows_major: bool) -> int:
    """The hand schedule's register tile (outputs per tile): DEFAULT_TILE, or DEFAULT_TILE_ROWS_MAJOR for
    a nibble kernel's rows-major output where 32 vector registers hold its 16 accumulators. Measured on a
    Zen 3 (AVX2, lookup alone, N=1024, one thread): mb 8 -> 4 took 187 -> 167 us at C=64/M=128, 261 -> 227
    at C=32/M=256, 336 -> 313 at C=144/M=128, and 651 -> 690 at C=288/M=128."""
    wide = rows_major and not isa.grouped and isa.registers >= 32
    return DEFAULT_TILE_ROWS_MAJOR if wide else DEFAULT_TILE


def output_shape(n: int, m: int, rows_major: bool = False, images: int = 1) -> tuple[int, ...]:
    """The lookup's output ``y``: ``(n, m)`` rows-major, ``(m, n)`` outputs-major, or ``(images, m, n / images)``
    (a batched convolution's NCHW output, grouped kernel)."""
    return (n, m) if rows_major else (m, n) if images == 1 else (images, m, n // images)


def padded_pairs(c: int) -> int:
    """Codebook pairs stored per row block: ceil(C/2), rounded up to whole uint16 blocks."""
    pairs = -(-c // 2)
    half_block = CODEBOOK_BLOCK // 2
    blocks = -(-pairs // half_block)
    return -(-pairs // blocks) * blocks


def num_row_blocks(n: int, lanes: int) -> int:
    return -(-n // lanes)


def num_groups(c: int) -> int:
    """Codebook groups of the grouped layout: ceil(C/4)."""
    return -(-c // GROUP)


L1_WAYS, L1_SETS, LINE = 8, 64, 64  # a conservative x86 L1 data cache: 32 KB or more, 8 ways or more


def block_rows(isa: ShuffleISA, rows: int, rows_major_m: int | None = None) -> int:
    """Rows per block for a layer of ``rows`` rows: the ISA's lanes, or for the grouped kernel the
    smallest of 16/32/64 that holds them (a 16-row layer, a 4x4 map at batch 1, wastes no lookups).

    With a rows-major (rows, M) output (``rows_major_m=M``) the grouped kernel writes 16 bytes per row and
    output tile, so each row's cache line is written by several consecutive tiles and must stay in L1
    between them. Rows M*4 bytes apart map to only ``L1_SETS / gcd(M*4/64, L1_SETS)`` sets of the L1
    (4 at M=256): a block keeps at most ``L1_WAYS`` lines per set, so blocks there hold 32 rows (or 16)
    instead of 64. Measured at N=1024, C=32, M=256, one thread: 79 us with 32-row blocks against 196 us
    with 64."""
    if not isa.grouped:
        return isa.lanes
    fit = next(b for b in (16, 32) if rows <= b) if rows <= 32 else 64
    if rows_major_m is not None and (rows_major_m * 4) % LINE == 0:
        sets = L1_SETS // math.gcd(rows_major_m * 4 // LINE, L1_SETS)
        fit = min(fit, max([16] + [b for b in (32, 64) if b <= sets * L1_WAYS]))
    return fit


def packed_shape(n: int, c: int, lanes: int, grouped: bool = False) -> tuple[int, int, int]:
    """Shape of the packed codes: ``(blocks, pairs, lanes)`` nibbles, or ``(blocks, groups, 4*lanes)``."""
    if grouped:
        return (num_row_blocks(n, lanes), num_groups(c), GROUP * lanes)
    return (num_row_blocks(n, lanes), padded_pairs(c), lanes)


def pack_tables(tables_q: np.ndarray, mb: int, grouped: bool = False) -> np.ndarray:
    """int8 tables (C, K=16, M) -> biased uint8 (M_pad, 2*pairs, 16), zero entries (biased 128) as padding;
    ``grouped``: int8 (M_pad, groups, 64), entry ``16j + k`` of group ``g`` = ``T[4g+j, k]``, zero padding."""
    c, k, m = tables_q.shape
    if k != 16:
        raise ValueError(f"the shuffle lookup needs K=16 centroids per codebook, got K={k}")
    if grouped:
        g, m_pad = num_groups(c), -(-m // mb) * mb
        out = np.zeros((m_pad, g * GROUP, 16), np.int8)
        out[:m, :c, :] = tables_q.transpose(2, 0, 1)
        return out.reshape(m_pad, g, GROUP * 16)
    pairs = padded_pairs(c)
    m_pad = -(-m // mb) * mb
    out = np.full((m_pad, 2 * pairs, 16), 128, np.uint8)
    out[:m, :c, :] = (tables_q.astype(np.int16) + 128).astype(np.uint8).transpose(2, 0, 1)
    return out


def _dequant(val, scale, bias, o, width: int, epilogue: bool):
    """``val * scale[o] + bias[o]`` (one FMA per output), or ``val`` alone without the epilogue."""
    if not epilogue:
        return val
    if width == 1:
        return val * scale[o] + bias[o]
    return val * tirx.Broadcast(scale[o], width) + tirx.Broadcast(bias[o], width)


def _outputs_major_index(o, row, width: int, images: int, hw: int) -> list:
    """Indices of output ``o`` for rows ``row .. row+width-1`` (one image) in an outputs-major ``y``: ``(m, n)``,
    or ``(images, m, hw)`` at batch ``images`` with ``hw`` rows (output pixels) per image."""
    if images == 1:
        return [o, row if width == 1 else tirx.Ramp(row, 1, width)]
    return [row // hw, o, row % hw if width == 1 else tirx.Ramp(row % hw, 1, width)]


@T.macro
def _store_tile_rows(y, tile, vb, vot, n, m, lanes, mb, full_tiles):
    """Rows-major output: each of the block's rows stores its ``mb`` dequantised outputs from the local
    tile (one vector store per row when the output tiles are full)."""
    for r in range(lanes):
        if vb * lanes + r < n:
            if full_tiles:
                y[vb * lanes + r, T.ramp(vot * mb, 1, mb)] = tile[r, T.ramp(0, 1, mb)]
            else:
                for i in range(mb):
                    if vot * mb + i < m:
                        y[vb * lanes + r, vot * mb + i] = tile[r, i]


def _lanes128(pattern) -> list:
    """``kernels.in_lane`` for two 16-float vectors (four 128-bit lanes), as TIR constants."""
    return [tirx.const(i, "int32") for i in in_lane(pattern, 16)]


_UNPACK_LO_PS, _UNPACK_HI_PS = _lanes128(UNPCKLPS), _lanes128(UNPCKHPS)
_UNPACK_LO_PD, _UNPACK_HI_PD = _lanes128(UNPCKLPD), _lanes128(UNPCKHPD)


def transposed4(vecs: list):
    """Four 16-float vectors a0..a3 (four outputs of 16 rows each) as one 64-float vector whose element
    ``16t + 4q + e`` is ``a_e`` of row ``4q + t``: 4x4 block transposes by ``unpcklps/unpckhps`` then
    ``unpcklpd/unpckhpd``, eight shuffles in all."""
    a0, a1, a2, a3 = vecs
    lo01, hi01 = tirx.Shuffle([a0, a1], _UNPACK_LO_PS), tirx.Shuffle([a0, a1], _UNPACK_HI_PS)
    lo23, hi23 = tirx.Shuffle([a2, a3], _UNPACK_LO_PS), tirx.Shuffle([a2, a3], _UNPACK_HI_PS)
    rows = [tirx.Shuffle([lo01, lo23], _UNPACK_LO_PD), tirx.Shuffle([lo01, lo23], _UNPACK_HI_PD),
            tirx.Shuffle([hi01, hi23], _UNPACK_LO_PD), tirx.Shuffle([hi01, hi23], _UNPACK_HI_PD)]
    return tirx.Shuffle(rows, [tirx.const(i, "int32") for i in range(64)])


@T.macro
def _store_transposed(y, quad, piece, src, scale, bias, vot, first_row, pieces: int, mb: int, n, full_rows: bool):
    """Rows-major output of ``pieces`` 16-row pieces starting at row ``first_row``, by 4x4 in-register
    transposes: ``piece(src, g, e, s, scale, bias, vot)`` is tile output ``4g + e`` of piece ``s`` (16
    dequantised floats); ``quad[g, 16t + 4q + e]`` is then output ``4g + e`` of the piece's row ``4q + t``,
    and each row's ``mb`` outputs are ``mb/4`` pieces of 4 and one store (rows past ``n`` skipped)."""
    for s in T.unroll(pieces):
        for g in T.unroll(mb // 4):
            quad[g, T.ramp(0, 1, 64)] = transposed4([piece(src, g, e, s, scale, bias, vot) for e in range(4)])
        for q in T.unroll(4):
            for t in T.unroll(4):
                if full_rows or first_row + s * 16 + q * 4 + t < n:
                    y[first_row + s * 16 + q * 4 + t, T.ramp(vot * mb, 1, mb)] = T.Shuffle(
                        [quad[g, T.ramp(t * 16 + q * 4, 1, 4)] for g in range(mb // 4)], list(range(mb)))


def lookup(n: int, c: int, m: int, lanes: int = 64, mb: int = 8, intrinsic: str | None = None,
           epilogue: bool = True, rows_major: bool = False, images: int = 1) -> tirx.PrimFunc:
    """The shuffle accumulate for ``n`` rows, ``c`` codebooks (K=16), ``m`` outputs: packed codes
    ``(ceil(n/lanes), pairs, lanes)`` uint8 and ``pack_tables`` -> ``y (m, n)`` float32.

    One schedulable block per (row block, output tile of ``mb``); MetaSchedule tunes how those are tiled,
    ordered, parallelised and unrolled (``tuning.shuffle_space``); ``mb`` (the register tile) is a
    template parameter: it sets how many accumulators live in registers.

    ``rows_major=True`` writes ``y (n, m)`` instead (a dense layer's layout): each tile is dequantised into
    a small local buffer and stored row by row, ``mb`` contiguous outputs per row, which costs far less than
    a separate transpose of the whole output.

    ``intrinsic=PERMUTE_INTRINSIC`` builds the grouped kernel instead (module docstring): codes and tables
    in the grouped layouts (``packed_shape(..., grouped=True)``, ``pack_tables(..., grouped=True)``).

    ``images=B`` (outputs-major) writes ``y (B, m, n / B)`` instead of ``y (m, n)``: a convolution's NCHW
    output at batch B, with no transpose after the kernel. The rows are ``B`` images of ``n / B`` output
    pixels each, a multiple of the rows one vector stores (grouped kernel: 16; nibble kernel: half a row
    block, ``lanes / 2``, the rows of one byte nibble's sums), so no stored vector spans two images.
    """
    if intrinsic == PERMUTE_INTRINSIC:
        return _grouped_lookup(n, c, m, lanes, mb, epilogue, rows_major, images)
    isa = next(i for i in ISAS if i.lanes == lanes and not i.grouped)  # the default for that width (x86)
    intrinsic = intrinsic or isa.intrinsic
    half = lanes // 2
    if images != 1 and (rows_major or n % images or (n // images) % half):
        raise ValueError(f"nibble lookup: images={images} needs an outputs-major output and a multiple of {half} "
                         f"rows per image, got {n} rows{' and rows_major' if rows_major else ''}")
    hw = n // images  # output pixels per image
    pairs = padded_pairs(c)
    ncb = -(-pairs // (CODEBOOK_BLOCK // 2))
    per_block = pairs // ncb
    nb = num_row_blocks(n, lanes)
    mt = -(-m // mb)
    m_pad = mt * mb
    bias_total = 128 * 2 * pairs
    full_rows = n % lanes == 0
    u16 = f"uint16x{half}"
    y_shape = output_shape(n, m, rows_major, images)
    y_all = tuple(slice(0, e) for e in y_shape)  # the whole output (each block writes a strided part)
    full_tiles = m % mb == 0

    def y_at(o, row, width: int) -> list:
        return _outputs_major_index(o, row, width, images, hw)

    def ramp(base, width):
        return tirx.Ramp(base, 1, width)

    def shuffled(packed, tables, vb, o, pair, high: bool):
        codes = packed[vb, pair, ramp(0, lanes)]
        idx = (tirx.shift_right(codes, tirx.Broadcast(tirx.const(4, "uint8"), lanes)) if high
               else tirx.bitwise_and(codes, tirx.Broadcast(tirx.const(15, "uint8"), lanes)))
        t = tables[o, pair * 2 + int(high), ramp(0, 16)]
        table = t if lanes == 16 else tirx.Shuffle([t] * (lanes // 16), list(range(lanes)))
        return tirx.reinterpret(u16, tirx.call_llvm_pure_intrin(f"int8x{lanes}", intrinsic, table, idx))

    def dequant(val, scale, bias, o, width: int):
        return _dequant(val, scale, bias, o, width, epilogue)

    def odd(v):
        return tirx.shift_right(v, tirx.Broadcast(tirx.const(8, "uint16"), half))

    # rows-major output by 4x4 transposes in registers (``transposed4``), as the grouped kernel does, where
    # the output tiles are whole multiples of 4 and a block's halves are whole 16-row vectors (32 or 64
    # lanes); else through a (lanes, mb) tile buffer, element by element
    transpose4 = rows_major and full_tiles and mb % 4 == 0 and half % 16 == 0

    def piece(sums, g, e, s, scale, bias, vot):
        """Tile output ``4g + e`` of rows ``16s .. 16s+15`` of a half (``sums``: sum_lo or sum_hi), dequantised."""
        return dequant(T.Cast("float32x16", sums[g * 4 + e, T.ramp(s * 16, 1, 16)]), scale, bias,
                       vot * mb + g * 4 + e, 16)

    @T.prim_func(private=True, s_tir=True)
    def func(
        packed: T.Buffer((nb, pairs, lanes), "uint8"),
        tables: T.Buffer((m_pad, pairs * 2, 16), "uint8"),
        scale: T.Buffer((m,), "float32"),
        bias: T.Buffer((m,), "float32"),
        y: T.Buffer(y_shape, "float32"),
    ):
        for b, ot in T.grid(nb, mt):
            with T.sblock("lookup"):
                vb, vot = T.axis.remap("SS", [b, ot])
                T.reads(packed[vb, 0:pairs, 0:lanes], tables[vot * mb:vot * mb + mb, 0:pairs * 2, 0:16],
                        scale[0:m], bias[0:m])
                T.writes(y[y_all])
                acc_lo = T.sblock_alloc_buffer((mb, half), "uint16", scope="local")
                acc_hi = T.sblock_alloc_buffer((mb, half), "uint16", scope="local")
                sum_lo = T.sblock_alloc_buffer((mb, half), "int32", scope="local")
                sum_hi = T.sblock_alloc_buffer((mb, half), "int32", scope="local")
                for i in T.unroll(mb):
                    sum_lo[i, T.ramp(0, 1, half)] = T.Broadcast(T.int32(-bias_total), half)
                    sum_hi[i, T.ramp(0, 1, half)] = T.Broadcast(T.int32(-bias_total), half)
                for cb in range(ncb):
                    for i in T.unroll(mb):
                        acc_lo[i, T.ramp(0, 1, half)] = T.Broadcast(T.uint16(0), half)
                        acc_hi[i, T.ramp(0, 1, half)] = T.Broadcast(T.uint16(0), half)
                    for p in range(per_block):
                        for i in T.unroll(mb):
                            acc_lo[i, T.ramp(0, 1, half)] = (
                                acc_lo[i, T.ramp(0, 1, half)]
                                + shuffled(packed, tables, vb, vot * mb + i, cb * per_block + p, False)
                                + shuffled(packed, tables, vb, vot * mb + i, cb * per_block + p, True))
                            acc_hi[i, T.ramp(0, 1, half)] = (
                                acc_hi[i, T.ramp(0, 1, half)]
                                + odd(shuffled(packed, tables, vb, vot * mb + i, cb * per_block + p, False))
                                + odd(shuffled(packed, tables, vb, vot * mb + i, cb * per_block + p, True)))
                    for i in T.unroll(mb):
                        sum_lo[i, T.ramp(0, 1, half)] = sum_lo[i, T.ramp(0, 1, half)] + T.Cast(
                            f"int32x{half}", acc_lo[i, T.ramp(0, 1, half)]
                            - T.shift_left(acc_hi[i, T.ramp(0, 1, half)], T.Broadcast(T.uint16(8), half)))
                        sum_hi[i, T.ramp(0, 1, half)] = sum_hi[i, T.ramp(0, 1, half)] + T.Cast(
                            f"int32x{half}", acc_hi[i, T.ramp(0, 1, half)])
                if transpose4:
                    quad = T.sblock_alloc_buffer((mb // 4, 64), "float32", scope="local")
                    # the even bytes' rows (sum_lo: the block's first half), then the odd bytes' (sum_hi)
                    _store_transposed(y, quad, piece, sum_lo, scale, bias, vot, vb * lanes, half // 16, mb, n,
                                      full_rows)
                    _store_transposed(y, quad, piece, sum_hi, scale, bias, vot, vb * lanes + half, half // 16, mb,
                                      n, full_rows)
                elif rows_major:
                    tile = T.sblock_alloc_buffer((lanes, mb), "float32", scope="local")
                    for i in T.unroll(mb):
                        for r in T.vectorized(half):
                            tile[r, i] = dequant(T.Cast("float32", sum_lo[i, r]), scale, bias, T.min(vot * mb + i, m - 1), 1)
                            tile[half + r, i] = dequant(T.Cast("float32", sum_hi[i, r]), scale, bias,
                                                        T.min(vot * mb + i, m - 1), 1)
                    _store_tile_rows(y, tile, vb, vot, n, m, lanes, mb, full_tiles)
                for i in T.unroll(mb):
                    if not rows_major and vot * mb + i < m:
                        if full_rows or vb * lanes + lanes <= n:
                            T.buffer_store(y, dequant(T.Cast(f"float32x{half}", sum_lo[i, T.ramp(0, 1, half)]), scale,
                                                      bias, vot * mb + i, half), y_at(vot * mb + i, vb * lanes, half))
                            T.buffer_store(y, dequant(T.Cast(f"float32x{half}", sum_hi[i, T.ramp(0, 1, half)]), scale,
                                                      bias, vot * mb + i, half),
                                           y_at(vot * mb + i, vb * lanes + half, half))
                        else:
                            for r in range(half):
                                if vb * lanes + r < n:
                                    T.buffer_store(y, dequant(T.Cast("float32", sum_lo[i, r]), scale, bias, vot * mb + i,
                                                              1), y_at(vot * mb + i, vb * lanes + r, 1))
                                if vb * lanes + half + r < n:
                                    T.buffer_store(y, dequant(T.Cast("float32", sum_hi[i, r]), scale, bias, vot * mb + i,
                                                              1), y_at(vot * mb + i, vb * lanes + half + r, 1))

    # "estimated_flops": MetaSchedule's flop counter cannot walk vector expressions (Broadcast, Shuffle);
    # given here it is the number of table lookups plus the per-output FMA
    return (opaque_kernel(func, "shuffle_lookup").with_attr("estimated_flops", n * c * m + 2 * n * m)
            .with_attr("tvm_lut.shape", [n, c, m, lanes]).with_attr("tvm_lut.mb", mb)
            .with_attr("tvm_lut.intrinsic", intrinsic).with_attr("tvm_lut.epilogue", int(epilogue))
            .with_attr("tvm_lut.rows_major", int(rows_major)).with_attr("tvm_lut.images", images))


def _grouped_lookup(n: int, c: int, m: int, lanes: int, mb: int, epilogue: bool,
                    rows_major: bool, images: int = 1) -> tirx.PrimFunc:
    """The grouped (``vpermb`` + ``vpdpbusd``) kernel, same block structure and output as ``lookup``:
    codes ``packed_shape(n, c, lanes, grouped=True)``, tables ``pack_tables(..., grouped=True)``."""
    if lanes % 16 or not 16 <= lanes <= 64:
        raise ValueError(f"grouped lookup: rows per block must be 16, 32, 48 or 64, got {lanes}")
    sub = lanes // 16  # 16-row vectors per block
    groups, nb = num_groups(c), num_row_blocks(n, lanes)
    mt = -(-m // mb)
    m_pad = mt * mb
    if images != 1 and (rows_major or n % images or (n // images) % 16):
        raise ValueError(f"grouped lookup: images={images} needs an outputs-major output and a multiple of 16 "
                         f"rows per image, got {n} rows{' and rows_major' if rows_major else ''}")
    hw = n // images  # output pixels per image
    y_shape = output_shape(n, m, rows_major, images)
    y_all = tuple(slice(0, e) for e in y_shape)  # the whole output (each block writes a strided part)
    full_rows, full_tiles = n % lanes == 0, m % mb == 0

    def y_at(o, row, width: int) -> list:
        return _outputs_major_index(o, row, width, images, hw)

    def looked_up(packed, tables, vb, o, g, s):
        """64 lookups: rows ``16s..16s+15`` of the block x the 4 codebooks of group ``g``, for output ``o``."""
        idx = packed[vb, g, tirx.Ramp(s * 64, 1, 64)]
        return tirx.call_llvm_pure_intrin("int8x64", PERMUTE_INTRINSIC, tables[o, g, tirx.Ramp(0, 1, 64)], idx)

    def add4(acc, v):
        """acc (16 x int32) + the sum of each 4 adjacent signed bytes of v: vpdpbusd with u8 ones."""
        return tirx.call_llvm_pure_intrin("int32x16", DOT_INTRINSIC, acc, tirx.Broadcast(tirx.const(1, "int8"), 64), v)

    def dequant(val, scale, bias, o, width: int):
        return _dequant(val, scale, bias, o, width, epilogue)

    # rows-major output by 4x4 transposes in registers where the output tiles are whole multiples of 4
    transpose4 = rows_major and full_tiles and mb % 4 == 0

    def piece(acc, g, e, s, scale, bias, vot):
        """Tile output ``4g + e`` of the block's rows ``16s .. 16s+15``, dequantised."""
        return dequant(T.Cast("float32x16", acc[g * 4 + e, s, T.ramp(0, 1, 16)]), scale, bias, vot * mb + g * 4 + e,
                       16)

    @T.prim_func(private=True, s_tir=True)
    def func(
        packed: T.Buffer((nb, groups, GROUP * lanes), "uint8"),
        tables: T.Buffer((m_pad, groups, GROUP * 16), "int8"),
        scale: T.Buffer((m,), "float32"),
        bias: T.Buffer((m,), "float32"),
        y: T.Buffer(y_shape, "float32"),
    ):
        for b, ot in T.grid(nb, mt):
            with T.sblock("lookup"):
                vb, vot = T.axis.remap("SS", [b, ot])
                T.reads(packed[vb, 0:groups, 0:GROUP * lanes], tables[vot * mb:vot * mb + mb, 0:groups, 0:64],
                        scale[0:m], bias[0:m])
                T.writes(y[y_all])
                acc = T.sblock_alloc_buffer((mb, sub, 16), "int32", scope="local")
                for i in T.unroll(mb):
                    for s in T.unroll(sub):
                        acc[i, s, T.ramp(0, 1, 16)] = T.Broadcast(T.int32(0), 16)
                for g in range(groups):
                    for i in T.unroll(mb):
                        for s in T.unroll(sub):
                            acc[i, s, T.ramp(0, 1, 16)] = add4(acc[i, s, T.ramp(0, 1, 16)],
                                                               looked_up(packed, tables, vb, vot * mb + i, g, s))
                if transpose4:
                    quad = T.sblock_alloc_buffer((mb // 4, 64), "float32", scope="local")
                    _store_transposed(y, quad, piece, acc, scale, bias, vot, vb * lanes, sub, mb, n, full_rows)
                elif rows_major:
                    tile = T.sblock_alloc_buffer((lanes, mb), "float32", scope="local")
                    for i in T.unroll(mb):
                        for s in T.unroll(sub):
                            for r in T.vectorized(16):
                                tile[s * 16 + r, i] = dequant(T.Cast("float32", acc[i, s, r]), scale, bias,
                                                              T.min(vot * mb + i, m - 1), 1)
                    _store_tile_rows(y, tile, vb, vot, n, m, lanes, mb, full_tiles)
                for i in T.unroll(mb):
                    if not rows_major and vot * mb + i < m:
                        for s in T.unroll(sub):
                            if full_rows or vb * lanes + lanes <= n:
                                T.buffer_store(y, dequant(T.Cast("float32x16", acc[i, s, T.ramp(0, 1, 16)]), scale,
                                                          bias, vot * mb + i, 16),
                                               y_at(vot * mb + i, vb * lanes + s * 16, 16))
                            else:
                                for r in range(16):
                                    if vb * lanes + s * 16 + r < n:
                                        T.buffer_store(y, dequant(T.Cast("float32", acc[i, s, r]), scale, bias,
                                                                  vot * mb + i, 1),
                                                       y_at(vot * mb + i, vb * lanes + s * 16 + r, 1))

    return (opaque_kernel(func, "shuffle_lookup").with_attr("estimated_flops", n * c * m + 2 * n * m)
            .with_attr("tvm_lut.shape", [n, c, m, lanes]).with_attr("tvm_lut.mb", mb)
            .with_attr("tvm_lut.intrinsic", PERMUTE_INTRINSIC).with_attr("tvm_lut.epilogue", int(epilogue))
            .with_attr("tvm_lut.rows_major", int(rows_major)).with_attr("tvm_lut.images", images))


def retile(func: tirx.PrimFunc, mb: int) -> tirx.PrimFunc:
    """The same shuffle lookup built with another register tile ``mb`` (its tables pack to ``mb`` rows)."""
    n, c, m, lanes = (int(x) for x in func.attrs["tvm_lut.shape"])
    return lookup(n, c, m, lanes, mb, str(func.attrs["tvm_lut.intrinsic"]), bool(int(func.attrs["tvm_lut.epilogue"])),
                  bool(int(func.attrs["tvm_lut.rows_major"])), int(func.attrs.get("tvm_lut.images", 1)))


def tile_of(func: tirx.PrimFunc) -> int:
    """The register tile a shuffle lookup (scheduled or not) was built with."""
    return int(func.attrs["tvm_lut.mb"])
