"""TIR kernels, unscheduled and hand-scheduled for x86, against the numpy reference on random shapes."""

import os
import re

import numpy as np
import pytest
import tvm

from tir_schedules import cpu, kernels
from tvm_lut.math import pq
from tvm_lut.targets import host_target

TARGET = host_target()


def _run(func, *arrays, out_shape, out_dtype):
    ex = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), TARGET)
    args = [tvm.runtime.tensor(a) for a in arrays] + [tvm.runtime.tensor(np.zeros(out_shape, out_dtype))]
    ex["main"](*args)
    return args[-1].numpy()


def test_host_target_sets_mcpu_and_cores():
    assert str(TARGET.attrs["mcpu"]) == tvm.target.codegen.llvm_get_system_cpu()
    assert int(TARGET.attrs["num-cores"]) >= 1


@pytest.mark.parametrize("scheduled", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 16, 1), (37, 7, 16, 23), (64, 13, 8, 130), (5, 3, 4, 64)])
def test_accumulate_bit_exact(scheduled, shape):
    n, c, k, m = shape
    rng = np.random.default_rng(sum(shape))
    codes = rng.integers(0, k, (n, c)).astype(np.int32)
    tab = rng.integers(-127, 128, (c, k, m)).astype(np.int8)
    f = kernels.accumulate(n, c, k, m)
    f = cpu.schedule(f) if scheduled else f
    np.testing.assert_array_equal(_run(f, codes, tab, out_shape=(n, m), out_dtype="int32"), pq.accumulate(codes, tab))
    # the variant LUTify uses: row offsets into the flattened table
    g = kernels.accumulate(n, c, k, m, row_offsets=True)
    g = cpu.schedule(g) if scheduled else g
    got = _run(g, pq.row_offsets(codes, k, m), tab.reshape(-1), out_shape=(n, m), out_dtype="int32")
    np.testing.assert_array_equal(got, pq.accumulate(codes, tab))


# K=32 compiles a 32-way argmin: about 21 s a case, so the default suite keeps one (l2, scheduled)
def _encode_case(shape, distance, scheduled, slow=False):
    return pytest.param(shape, distance, scheduled, marks=[pytest.mark.slow] if slow else [],
                        id="x".join(map(str, shape)) + f"-{distance}-{scheduled}")


_K32 = [_encode_case((24, 3, 32, 2), d, s, slow=(d, s) != ("l2", True))
        for d in ("l2", "cosine", "l1") for s in (False, True)]


@pytest.mark.parametrize("shape,distance,scheduled", [
    _encode_case(shape, d, s) for shape in [(33, 5, 16, 4), (7, 3, 16, 9), (50, 11, 8, 3), (64, 6, 16, 4)]
    for d in ("l2", "cosine", "l1") for s in (False, True)] + _K32)
def test_encode_matches_reference(scheduled, distance, shape):
    n, c, k, v = shape
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal((n, c * v)).astype(np.float32)
    cents = rng.standard_normal((c, k, v)).astype(np.float32)
    ec, eb = pq.encoder_operands(cents, distance)
    f = kernels.encode(n, c, k, v, distance)
    f = cpu.schedule(f) if scheduled else f
    got = _run(f, x, np.ascontiguousarray(ec.transpose(0, 2, 1)), eb, out_shape=(n, c), out_dtype="int32")
    ref = pq.encode(x, ec, eb, distance)
    m_out = 3 + n % 5  # the row-offset variant must select the same rows
    g = kernels.encode(n, c, k, v, distance, row_stride=m_out)
    g = cpu.schedule(g) if scheduled else g
    offs = _run(g, x, np.ascontiguousarray(ec.transpose(0, 2, 1)), eb, out_shape=(n, c), out_dtype="int32")
    np.testing.assert_array_equal(offs, pq.row_offsets(got, k, m_out))
    np.testing.assert_array_equal(got, ref)  # bit-exact: the reference rounds each FMA once (pq.fma32)


@pytest.mark.parametrize("scheduled", [False, True])
@pytest.mark.parametrize("distance", ["l2", "cosine", "l1"])
def test_encode_bit_exact_on_near_ties(scheduled, distance):
    """Rows halfway between two centroids (+1e-6 noise): the argmin hangs on the last bit of the scores.
    A reference that rounds the product and the sum separately disagrees with the compiled (fused
    multiply-add) encoder on hundreds of these; ``pq.fma32`` makes it agree on every one."""
    n, c, k, v = 2048, 8, 16, 9
    rng = np.random.default_rng(1)
    cents = rng.standard_normal((c, k, v)).astype(np.float32)
    a, b = rng.integers(0, k, (n, c)), rng.integers(0, k, (n, c))
    mid = (cents[np.arange(c), a] + cents[np.arange(c), b]) * np.float32(0.5)
    x = (mid.reshape(n, c * v) + rng.standard_normal((n, c * v)).astype(np.float32) * np.float32(1e-6)).astype(np.float32)
    ec, eb = pq.encoder_operands(cents, distance)
    f = kernels.encode(n, c, k, v, distance)
    f = cpu.schedule(f) if scheduled else f
    got = _run(f, x, np.ascontiguousarray(ec.transpose(0, 2, 1)), eb, out_shape=(n, c), out_dtype="int32")
    np.testing.assert_array_equal(got, pq.encode(x, ec, eb, distance))


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("scheduled", [False, True])
@pytest.mark.parametrize("distance", ["l2", "l1"])
def test_encode_exact_ties_take_the_first_centroid(scheduled, distance, packed):
    """Duplicated centroids give exactly equal scores: the tree argmin (``kernels.argmin_tree``) must pick
    the lowest index, as a serial strict-< scan and ``np.argmin`` do, wherever the pair sits in the tree
    (neighbours, across halves, first and last, three-way)."""
    n, c, k, v = 64, 5, 16, 4
    rng = np.random.default_rng(3)
    cents = rng.standard_normal((c, k, v)).astype(np.float32)
    dup = [(0, 1), (3, 12), (0, 15), (7, 8), (5, 6)]
    for cb, (i, j) in enumerate(dup):
        cents[cb, j] = cents[cb, i]
    cents[4, 13] = cents[4, 5]  # three-way tie 5, 6, 13
    x = np.concatenate([cents[cb, dup[cb][0]] for cb in range(c)])[None].repeat(n, 0)
    x[::2] += rng.standard_normal((n // 2, c * v)).astype(np.float32) * np.float32(1e-3)
    ec, eb = pq.encoder_operands(cents, distance)
    ref = pq.encode(x, ec, eb, distance)
    assert (ref[1::2] == [i for i, _ in dup]).all()
    if packed:
        f = kernels.encode(n, c, k, v, distance, pack_lanes=16, grouped=True)
        f = cpu.schedule(f) if scheduled else f
        got = _run(f, x, np.ascontiguousarray(ec.transpose(0, 2, 1)), eb,
                   out_shape=shuffle.packed_shape(n, c, 16, True), out_dtype="uint8")
        np.testing.assert_array_equal(got, pq.pack_codes_grouped(ref, 16))
    else:
        f = kernels.encode(n, c, k, v, distance)
        f = cpu.schedule(f) if scheduled else f
        got = _run(f, x, np.ascontiguousarray(ec.transpose(0, 2, 1)), eb, out_shape=(n, c), out_dtype="int32")
        np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("scheduled", [False, True])
@pytest.mark.parametrize("distance", ["l2", "l1"])
def test_encoder_on_column_major_input(scheduled, distance):
    """``x_transposed``: the (C*V, n) input (MADDNESS's layout) gives the same codes, raw and packed."""
    n, c, k, v = 200, 9, 16, 4
    rng = np.random.default_rng(5)
    x = rng.standard_normal((n, c * v)).astype(np.float32)
    ec, eb = pq.encoder_operands(rng.standard_normal((c, k, v)).astype(np.float32), distance)
    cents_t = np.ascontiguousarray(ec.transpose(0, 2, 1))
    ref = pq.encode(x, ec, eb, distance)
    f = kernels.encode(n, c, k, v, distance, x_transposed=True)
    got = _run(cpu.schedule(f) if scheduled else f, np.ascontiguousarray(x.T), cents_t, eb, out_shape=(n, c),
               out_dtype="int32")
    np.testing.assert_array_equal(got, ref)
    pairs = shuffle.padded_pairs(c)
    g = kernels.encode(n, c, k, v, distance, pack_lanes=64, pairs=pairs, x_transposed=True)
    packed = _run(cpu.schedule(g) if scheduled else g, np.ascontiguousarray(x.T), cents_t, eb,
                  out_shape=(shuffle.num_row_blocks(n, 64), pairs, 64), out_dtype="uint8")
    np.testing.assert_array_equal(packed, pq.pack_codes(ref, 64, pairs))
    with pytest.raises(ValueError, match="x_transposed"):
        kernels.encode(n, c, k, v, distance, conv=kernels.ConvInput((1, 4, 6, 6), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
                       x_transposed=True)


def test_fma32_rounds_once():
    """Against exact rational arithmetic: fma32 is the correctly rounded a*b + c."""
    from fractions import Fraction

    rng = np.random.default_rng(0)
    a, b, c = (rng.standard_normal(3000).astype(np.float32) * np.float32(10) ** rng.integers(-6, 6, 3000).astype(np.float32)
               for _ in range(3))
    got = pq.fma32(a, b, c)
    for ai, bi, ci, gi in zip(a, b, c, got):
        exact = Fraction(float(ai)) * Fraction(float(bi)) + Fraction(float(ci))
        lo, hi = np.nextafter(gi, np.float32(-np.inf)), np.nextafter(gi, np.float32(np.inf))
        err = abs(Fraction(float(gi)) - exact)
        assert err <= abs(Fraction(float(lo)) - exact) and err <= abs(Fraction(float(hi)) - exact)


@pytest.mark.parametrize("scheduled", [False, True])
@pytest.mark.parametrize("case", [
    ((2, 3, 9, 8), (3, 3), (2, 1), (1, 0, 2, 1), (1, 2), 28),
    ((1, 4, 6, 6), (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 4),
    ((3, 2, 5, 7), (5, 5), (1, 1), (2, 2, 2, 2), (1, 1), 52),
])
def test_im2col_matches_reference(scheduled, case):
    shape, khw, strides, padding, dilation, d_pad = case
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    f = kernels.im2col(*shape, khw, strides, padding, dilation, d_pad)
    f = cpu.schedule(f) if scheduled else f
    ref = pq.pad_columns(pq.im2col(x, khw, strides, padding, dilation), d_pad)
    np.testing.assert_array_equal(_run(f, x, out_shape=ref.shape, out_dtype="float32"), ref)


def test_kernels_are_opaque_and_tagged():
    f = kernels.accumulate(4, 2, 16, 8)
    assert int(f.attrs["op_pattern"]) == 8 and str(f.attrs[kernels.KERNEL_ATTR]) == "accumulate"
    assert bool(cpu.schedule(f).attrs["tirx.is_scheduled"])


# ----------------------------------------------------------------------------------------------
# Shuffle lookup (pshufb), packed codes, encoder fused with im2col
# ----------------------------------------------------------------------------------------------

from tir_schedules import shuffle  # noqa: E402

# the widest nibble-code pshufb this host runs: a 64-lane case runs as 32 lanes on an AVX2-only host (Zen 3),
# where building the AVX-512BW kernel would abort the whole test process in LLVM
NIBBLE_LANES = shuffle.isa_for(TARGET, grouped=False).lanes

SHUFFLE_SHAPES = [  # (n, c, m, lanes, mb): odd rows, codebooks and outputs; > 256 codebooks (two uint16 blocks)
    (1024, 32, 256, 64, 4), (1000, 33, 250, 64, 8), (77, 5, 13, 32, 4), (77, 5, 13, 16, 2), (63, 1, 7, 64, 4),
    (300, 601, 20, 64, 8), (129, 17, 3, 32, 16),
]


def test_host_has_a_shuffle_isa():
    assert shuffle.isa_for(TARGET) is not None
    assert shuffle.isa_for(tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})).name == "avx2"
    assert shuffle.isa_for(tvm.target.Target({"kind": "llvm", "mcpu": "x86-64"})) is None
    zen4 = tvm.target.Target({"kind": "llvm", "mcpu": "znver4"})  # AVX-512 VBMI + VNNI
    assert [shuffle.isa_for(zen4, grouped=g).name for g in (True, False)] == ["avx512vbmi", "avx512bw"]
    assert shuffle.isa_for(tvm.target.Target({"kind": "llvm", "mcpu": "znver3"}), grouped=False).name == "avx2"


@pytest.mark.parametrize("rows_major", [False, True])
@pytest.mark.parametrize("scheduled", [False, True])
@pytest.mark.parametrize("shape", SHUFFLE_SHAPES)
def test_shuffle_lookup_bit_exact(scheduled, shape, rows_major):
    n, c, m, lanes, mb = shape
    lanes = min(lanes, NIBBLE_LANES)
    rng = np.random.default_rng(sum(shape))
    codes = rng.integers(0, 16, (n, c)).astype(np.int32)
    tab = rng.integers(-127, 128, (c, 16, m)).astype(np.int8)
    tab[0, 0, 0], tab[-1, -1, -1] = -127, 127  # extremes of the int8 range
    scale = rng.random(m).astype(np.float32)
    bias = rng.standard_normal(m).astype(np.float32)
    f = shuffle.lookup(n, c, m, lanes, mb, rows_major=rows_major)
    f = cpu.schedule(f) if scheduled else f
    got = _run(f, pq.pack_codes(codes, lanes, shuffle.padded_pairs(c)), shuffle.pack_tables(tab, mb), scale, bias,
               out_shape=(n, m) if rows_major else (m, n), out_dtype="float32")
    np.testing.assert_array_equal(got if rows_major else got.T, pq.dequantize(pq.accumulate(codes, tab), scale, bias))
    if rows_major:
        return
    bare = _run(shuffle.lookup(n, c, m, lanes, mb, epilogue=False), pq.pack_codes(codes, lanes, shuffle.padded_pairs(c)),
                shuffle.pack_tables(tab, mb), scale, bias, out_shape=(m, n), out_dtype="float32")
    np.testing.assert_array_equal(bare.T, pq.accumulate(codes, tab).astype(np.float32))


@pytest.mark.parametrize("shape", [(77, 5, 12, 32, 4), (1000, 33, 248, 64, 8), (40, 3, 8, 16, 4)])
def test_shuffle_lookup_rows_major_transposes_in_registers(shape):
    """Rows-major output with whole tiles of 4: the 4x4 in-register transposes (``quad``), rows past n
    skipped; bit-exact. 16-row blocks (SSSE3, NEON) keep the tile buffer."""
    n, c, m, lanes, mb = shape
    lanes = min(lanes, NIBBLE_LANES)
    rng = np.random.default_rng(sum(shape))
    codes = rng.integers(0, 16, (n, c)).astype(np.int32)
    tab = rng.integers(-127, 128, (c, 16, m)).astype(np.int8)
    scale, bias = rng.random(m).astype(np.float32), rng.standard_normal(m).astype(np.float32)
    f = cpu.schedule(shuffle.lookup(n, c, m, lanes, mb, rows_major=True))
    assert ("quad" in f.script()) == (lanes >= 32)
    got = _run(f, pq.pack_codes(codes, lanes, shuffle.padded_pairs(c)), shuffle.pack_tables(tab, mb), scale, bias,
               out_shape=(n, m), out_dtype="float32")
    np.testing.assert_array_equal(got, pq.dequantize(pq.accumulate(codes, tab), scale, bias))


GROUPED = shuffle.isa_for(TARGET) is shuffle.ISAS[0]
needs_grouped = pytest.mark.skipif(not GROUPED, reason="host has no AVX-512 VBMI + VNNI (grouped vpermb lookup)")


GROUPED_CASES = [(shape, True) for shape in SHUFFLE_SHAPES + [(16, 70, 9, 16, 8), (40, 3, 5, 48, 4)]] + [
    ((77, 5, 13, 32, 4), False), ((63, 1, 7, 64, 4), False)]  # unscheduled: two small shapes keep the suite short


@needs_grouped
@pytest.mark.parametrize("rows_major", [False, True])
@pytest.mark.parametrize("shape,scheduled", GROUPED_CASES)
def test_grouped_lookup_bit_exact(scheduled, shape, rows_major):
    """vpermb + vpdpbusd: 4 codebooks per lookup, int32 sums; odd rows, codebooks (not multiples of 4)
    and outputs, the whole int8 range (-128 too: no bias trick here)."""
    n, c, m, lanes, mb = shape
    lanes = min(lanes, 64) if lanes % 16 == 0 else 64
    rng = np.random.default_rng(sum(shape) + 1)
    codes = rng.integers(0, 16, (n, c)).astype(np.int32)
    tab = rng.integers(-128, 128, (c, 16, m)).astype(np.int8)
    tab[0, 0, 0], tab[-1, -1, -1] = -128, 127
    scale, bias = rng.random(m).astype(np.float32), rng.standard_normal(m).astype(np.float32)
    f = shuffle.lookup(n, c, m, lanes, mb, shuffle.PERMUTE_INTRINSIC, rows_major=rows_major)
    f = cpu.schedule(f) if scheduled else f
    got = _run(f, pq.pack_codes_grouped(codes, lanes), shuffle.pack_tables(tab, mb, grouped=True), scale, bias,
               out_shape=(n, m) if rows_major else (m, n), out_dtype="float32")
    np.testing.assert_array_equal(got if rows_major else got.T, pq.dequantize(pq.accumulate(codes, tab), scale, bias))
    if not rows_major:
        bare = _run(shuffle.lookup(n, c, m, lanes, mb, shuffle.PERMUTE_INTRINSIC, epilogue=False),
                    pq.pack_codes_grouped(codes, lanes), shuffle.pack_tables(tab, mb, grouped=True), scale, bias,
                    out_shape=(m, n), out_dtype="float32")
        np.testing.assert_array_equal(bare.T, pq.accumulate(codes, tab).astype(np.float32))


@needs_grouped
@pytest.mark.parametrize("images,hw,c,m,lanes,scheduled", [
    (2, 64, 36, 40, 64, True), (3, 16, 8, 16, 64, True), (4, 16, 9, 20, 16, False), (5, 32, 5, 8, 32, True)])
def test_grouped_lookup_writes_batched_nchw(images, hw, c, m, lanes, scheduled):
    """``images=B``: y (B, M, HW) is the (M, B*HW) output with the image axis moved first, bit for bit,
    including blocks that span images (16 rows per image, 64-row blocks) and a partial last block."""
    n = images * hw
    rng = np.random.default_rng(n + c + m)
    codes = rng.integers(0, 16, (n, c)).astype(np.int32)
    tab = rng.integers(-128, 128, (c, 16, m)).astype(np.int8)
    scale, bias = rng.random(m).astype(np.float32), rng.standard_normal(m).astype(np.float32)
    f = shuffle.lookup(n, c, m, lanes, 4, shuffle.PERMUTE_INTRINSIC, images=images)
    assert int(shuffle.retile(f, 8).attrs["tvm_lut.images"]) == images  # tuning's tile variants keep it
    got = _run(cpu.schedule(f) if scheduled else f, pq.pack_codes_grouped(codes, lanes),
               shuffle.pack_tables(tab, 4, grouped=True), scale, bias, out_shape=(images, m, hw), out_dtype="float32")
    ref = pq.dequantize(pq.accumulate(codes, tab), scale, bias)  # (n, m)
    np.testing.assert_array_equal(got, ref.reshape(images, hw, m).transpose(0, 2, 1))


def test_batched_nchw_lookup_rejects_what_it_cannot_write():
    with pytest.raises(ValueError, match="multiple of 16 rows per image, got 40 rows"):
        shuffle.lookup(40, 8, 16, 16, 4, shuffle.PERMUTE_INTRINSIC, images=2)  # 20 pixels per image
    with pytest.raises(ValueError, match="and rows_major"):
        shuffle.lookup(64, 8, 16, 16, 4, shuffle.PERMUTE_INTRINSIC, rows_major=True, images=2)
    with pytest.raises(ValueError, match="multiple of 16 rows per image, got 72 rows"):
        shuffle.lookup(72, 8, 16, 32, 4, images=2)  # nibble kernel, 32-row blocks: 36 pixels per image
    with pytest.raises(ValueError, match="and rows_major"):
        shuffle.lookup(64, 8, 16, 32, 4, rows_major=True, images=2)


@pytest.mark.parametrize("images,hw,c,m,lanes,scheduled", [
    (2, 64, 36, 40, 32, True), (3, 16, 8, 16, 32, True), (4, 8, 9, 20, 16, False), (5, 48, 5, 6, 32, True)])
def test_nibble_lookup_writes_batched_nchw(images, hw, c, m, lanes, scheduled):
    """The nibble (``pshufb``/``tbl``) lookup with ``images=B``: y (B, M, HW) is the (M, B*HW) output with the
    image axis moved first, bit for bit, including 32-row blocks that span images (16 rows per image), a
    partial last block (5 x 48 rows), outputs in a partial register tile (M=6, 20) and 16-row blocks."""
    n = images * hw
    rng = np.random.default_rng(n + c + m)
    codes = rng.integers(0, 16, (n, c)).astype(np.int32)
    tab = rng.integers(-128, 128, (c, 16, m)).astype(np.int8)
    scale, bias = rng.random(m).astype(np.float32), rng.standard_normal(m).astype(np.float32)
    isa = next(i for i in shuffle.ISAS if i.lanes == lanes and not i.grouped)
    f = shuffle.lookup(n, c, m, lanes, 4, isa.intrinsic, images=images)
    assert int(shuffle.retile(f, 8).attrs["tvm_lut.images"]) == images  # tuning's tile variants keep it
    got = _run(cpu.schedule(f) if scheduled else f, pq.pack_codes(codes, lanes, shuffle.padded_pairs(c)),
               shuffle.pack_tables(tab, 4), scale, bias, out_shape=(images, m, hw), out_dtype="float32")
    ref = pq.dequantize(pq.accumulate(codes, tab), scale, bias)  # (n, m)
    np.testing.assert_array_equal(got, ref.reshape(images, hw, m).transpose(0, 2, 1))


def test_pack_codes_grouped_layout():
    codes = (np.arange(3 * 5).reshape(3, 5) * 7) % 16
    p = pq.pack_codes_grouped(codes, 16)
    assert p.shape == (1, 2, 64) and p.dtype == np.uint8
    assert p[0, 0, 4 * 2 + 3] == 48 + codes[2, 3]  # row 2, codebook 3: entry 16*3 + code of group 0
    assert p[0, 1, 4 * 1 + 0] == codes[1, 4]  # row 1, codebook 4 = group 1, slot 0
    assert p[0, 1, 4 * 1 + 1] == 16 and p[0, 0, 4 * 5 + 2] == 32  # padding codebook / padding row: code 0
    assert shuffle.packed_shape(3, 5, 16, grouped=True) == p.shape
    tab = np.arange(5 * 16 * 2).reshape(5, 16, 2).astype(np.int8)
    t = shuffle.pack_tables(tab, 4, grouped=True)
    assert t.shape == (4, 2, 64) and t[1, 0, 16 * 3 + 5] == tab[3, 5, 1] and not t[0, 1, 16:].any()


def test_grouped_lookup_rejects_rows_per_block_not_a_multiple_of_16():
    for lanes in (8, 24, 80):
        with pytest.raises(ValueError, match=f"rows per block must be 16, 32, 48 or 64, got {lanes}"):
            shuffle.lookup(100, 8, 16, lanes, 4, shuffle.PERMUTE_INTRINSIC)


def test_register_tile_fits_the_isa_registers():
    """8 outputs per rows-major tile (16 accumulators) only where there are 32 vector registers."""
    avx512bw, avx2 = shuffle.ISAS[1], shuffle.ISAS[2]
    assert [shuffle.tile_for(avx512bw, rm) for rm in (True, False)] == [8, 4]
    assert [shuffle.tile_for(avx2, rm) for rm in (True, False)] == [4, 4]
    assert shuffle.tile_for(shuffle.ISAS[0], True) == 4  # grouped: transposes 4 outputs in registers


def test_block_rows_fits_small_layers():
    isa = shuffle.ISAS[0]
    assert [shuffle.block_rows(isa, r) for r in (1, 16, 17, 32, 33, 4096)] == [16, 16, 32, 32, 64, 64]
    assert shuffle.block_rows(shuffle.ISAS[1], 16) == 64
    # rows-major outputs: rows M*4 bytes apart share few L1 sets, so blocks shrink where they would not fit
    assert [shuffle.block_rows(isa, 4096, m) for m in (100, 128, 256, 512, 2048)] == [64, 64, 32, 16, 16]
    assert shuffle.block_rows(isa, 20, 256) == 32


def test_pack_codes_layout():
    codes = np.arange(2 * 3).reshape(2, 3) % 16
    p = pq.pack_codes(codes, 16)
    assert p.shape == (1, 2, 16) and p.dtype == np.uint8
    assert p[0, 0, 0] == codes[0, 0] | codes[0, 1] << 4  # byte 0: row 0, codebooks 0 and 1
    assert p[0, 1, 2] == codes[1, 2]  # byte 2: row 1; codebook 3 is padding (0)
    assert p[0, 0, 1] == 0  # byte 1: row 8 (padding)


# the grouped pack stage does not depend on the distance: it is checked with l2 only
@pytest.mark.parametrize("distance,grouped", [("l2", False), ("cosine", False), ("l1", False), ("l2", True)])
@pytest.mark.parametrize("shape", [(33, 5, 4, 64), (77, 6, 9, 32), (64, 1, 3, 16)])
def test_packed_encoder_matches_reference(distance, shape, grouped):
    n, c, v, lanes = shape
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal((n, c * v)).astype(np.float32)
    ec, eb = pq.encoder_operands(rng.standard_normal((c, 16, v)).astype(np.float32), distance)
    f = cpu.schedule(kernels.encode(n, c, 16, v, distance, pack_lanes=lanes, grouped=grouped))
    got = _run(f, x, np.ascontiguousarray(ec.transpose(0, 2, 1)), eb,
               out_shape=shuffle.packed_shape(n, c, lanes, grouped), out_dtype="uint8")
    codes = pq.encode(x, ec, eb, distance)
    np.testing.assert_array_equal(got, pq.pack_codes_grouped(codes, lanes) if grouped else pq.pack_codes(codes, lanes))


def _codebook_lanes(x, ec, eb, distance, n, c, v, lanes, pairs=None, codebook_lanes=16, float_indices=False):
    """The codebook-lane encoder's packed codes: grouped, or two per byte in ``pairs`` rows when given."""
    grouped = pairs is None
    f = kernels.encode_codebook_lanes(n, c, ec.shape[1], v, distance, lanes, grouped=grouped, pairs=pairs,
                                      codebook_lanes=codebook_lanes, float_indices=float_indices)
    assert cpu.schedule(f).same_as(f)  # written vectorized: the hand schedule leaves it as it is
    cents, offsets = kernels.codebook_lane_operands(np.ascontiguousarray(ec.transpose(0, 2, 1)), eb,
                                                    lanes=codebook_lanes)
    ex = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), TARGET)
    out = tvm.runtime.tensor(np.full(shuffle.packed_shape(n, c, lanes, grouped), 255, np.uint8))  # padding too
    ex["main"](*[tvm.runtime.tensor(a) for a in (x, cents, offsets)], out)
    return out.numpy()


# C < 16 (tail block only), C = 37 (two full blocks + a tail ending mid-group), C = 48 (no tail), C = 83
# (five full blocks and a tail: one L1 group of four, then a group of one full block and the tail, which
# reads its zero-padded copy); rows not a multiple of the block (zero-coded padding rows)
@pytest.mark.parametrize("distance", ["l2", "cosine", "l1"])
@pytest.mark.parametrize("shape", [(33, 5, 4, 64), (77, 37, 3, 32), (100, 48, 4, 16), (40, 83, 4, 16)])
def test_codebook_lane_encoder_matches_reference(distance, shape):
    n, c, v, lanes = shape
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal((n, c * v)).astype(np.float32)
    ec, eb = pq.encoder_operands(rng.standard_normal((c, 16, v)).astype(np.float32), distance)
    np.testing.assert_array_equal(_codebook_lanes(x, ec, eb, distance, n, c, v, lanes),
                                  pq.pack_codes_grouped(pq.encode(x, ec, eb, distance), lanes))


# the nibble layout of the pshufb/tbl lookups (AVX2 hosts' dense layers): an odd C (the last byte's high
# nibble is code 0), C = 257 (two uint16 blocks: one padding pair written as code 0), partial row blocks;
# 16 codebook lanes, and 8 with float argmin indices (what LUTify builds for 16-register ISAs: C = 37 and
# 83 then end in a tail block of 5 and 3 codebooks); C = 61 at V=4 and 16 lanes puts the tail block inside
# the one whole L1 group of 4 blocks (elsewhere it is in the last, smaller group)
@pytest.mark.parametrize("codebook_lanes,float_indices", [(16, False), (8, True), (8, False)])
@pytest.mark.parametrize("shape,distance", [((77, 37, 3, 32), "l2"), ((40, 83, 4, 32), "l1"),
                                            ((33, 5, 4, 64), "cosine"), ((20, 257, 1, 16), "l2"),
                                            ((24, 61, 4, 32), "l2")])
def test_codebook_lane_encoder_writes_nibble_codes(shape, distance, codebook_lanes, float_indices):
    n, c, v, lanes = shape
    rng = np.random.default_rng(sum(shape) + 2)
    x = rng.standard_normal((n, c * v)).astype(np.float32)
    ec, eb = pq.encoder_operands(rng.standard_normal((c, 16, v)).astype(np.float32), distance)
    pairs = shuffle.padded_pairs(c)
    np.testing.assert_array_equal(_codebook_lanes(x, ec, eb, distance, n, c, v, lanes, pairs, codebook_lanes,
                                                  float_indices),
                                  pq.pack_codes(pq.encode(x, ec, eb, distance), lanes, pairs))


# the encoder's deinterleave for V > 4 (``_transpose_quads``: joined 4-float loads, in-lane unpacks), 8 lanes
# (AVX2) with nibble codes: V=9 with a whole block and a partial one of 5 codebooks (read from its zero-padded
# copy) and rows past a row block; V=5 (quads at 0 and 1) tail-only; V=8 (two whole quads) no tail; V=12
# under cosine; 16 lanes (AVX-512) with grouped codes: V=9 with a partial block, V=6 under L1
@pytest.mark.parametrize("shape,distance,codebook_lanes", [
    ((45, 13, 9, 32), "l2", 8), ((20, 7, 5, 32), "l2", 8), ((33, 16, 8, 32), "l1", 8),
    ((24, 11, 12, 16), "cosine", 8), ((70, 21, 9, 64), "l2", 16), ((33, 16, 6, 16), "l1", 16)])
def test_codebook_lane_encoder_deinterleaves_long_subvectors(shape, distance, codebook_lanes):
    n, c, v, lanes = shape
    rng = np.random.default_rng(sum(shape) + 5)
    x = rng.standard_normal((n, c * v)).astype(np.float32)
    ec, eb = pq.encoder_operands(rng.standard_normal((c, 16, v)).astype(np.float32), distance)
    codes = pq.encode(x, ec, eb, distance)
    if codebook_lanes == 16:
        np.testing.assert_array_equal(_codebook_lanes(x, ec, eb, distance, n, c, v, lanes),
                                      pq.pack_codes_grouped(codes, lanes))
    else:
        pairs = shuffle.padded_pairs(c)
        np.testing.assert_array_equal(_codebook_lanes(x, ec, eb, distance, n, c, v, lanes, pairs, 8, True),
                                      pq.pack_codes(codes, lanes, pairs))


@pytest.mark.parametrize("lanes", [8, 16])
@pytest.mark.parametrize("v", [5, 6, 7, 8, 9, 12, 13])
def test_long_subvector_deinterleave_reads_each_element_once_in_codebook_order(v, lanes):
    """``_transpose_quads`` on the floats' own positions: vector t must hold element t of every codebook
    of the block, in codebook order, and no 4-float load may leave the block's lanes*V floats."""
    flat = np.arange(lanes * v)
    reads = []

    def load(offset, width):
        reads.append((offset, width))
        return flat[offset:offset + width]

    out = kernels._transpose_quads(load, v, lanes, lambda vs, idx: np.concatenate(vs)[list(idx)])
    assert len(out) == v
    for t, vector in enumerate(out):
        np.testing.assert_array_equal(vector, np.arange(lanes) * v + t)
    assert all(0 <= o and o + w <= lanes * v for o, w in reads)


def test_codebook_lane_operands_follow_the_encoders_lane_order():
    """The 8-lane V=4 encoder deinterleaves by in-lane unpacks, which leave each block's codebooks in the
    order (0, 2, 4, 6, 1, 3, 5, 7); its centroids and offsets must come in that order, other widths and V in
    codebook order (the nibble tests above check the codes end to end)."""
    assert kernels.lane_order(8, 4) == (0, 2, 4, 6, 1, 3, 5, 7)
    assert kernels.lane_order(16, 4) is None and kernels.lane_order(8, 3) is None
    c, v, k = 11, 4, 16  # a whole block of 8 and a partial one of 3 (zero-padded)
    cents = np.arange(c * v * k, dtype=np.float32).reshape(c, v, k)
    offsets = np.arange(c * k, dtype=np.float32).reshape(c, k) + 1000
    cp, op = kernels.codebook_lane_operands(cents, offsets, lanes=8)
    assert cp.shape == (2, v, k, 8) and op.shape == (2, k, 8)
    for block in range(2):
        for lane, q in enumerate((0, 2, 4, 6, 1, 3, 5, 7)):
            cb = block * 8 + q
            np.testing.assert_array_equal(cp[block, :, :, lane], cents[cb] if cb < c else 0)
            np.testing.assert_array_equal(op[block, :, lane], offsets[cb] if cb < c else 0)


def test_codebook_lane_encoder_rejects_too_few_pairs():
    with pytest.raises(ValueError, match="C=37 codebooks need >= 19 pairs"):
        kernels.encode_codebook_lanes(64, 37, 16, 4, "l2", 32, grouped=False, pairs=18)


def test_codebook_lane_encoder_rejects_more_than_16_centroids():
    with pytest.raises(ValueError, match="packed codes need K <= 16, got K=32"):
        kernels.encode_codebook_lanes(64, 16, 32, 4, "l2", 16)
    with pytest.raises(ValueError, match="codebook_lanes must be 8 or 16, got 4"):
        kernels.encode_codebook_lanes(64, 16, 16, 4, "l2", 16, codebook_lanes=4)


_TWO_THREADS = """
import numpy as np, tvm
from tir_schedules import kernels
from tvm_lut.targets import host_target
from tvm_lut.math import pq
assert tvm.get_global_func("runtime.NumThreads")() == 2
n, c, v, lanes = 4096, 64, 4, 16
rng = np.random.default_rng(11)
x = rng.standard_normal((n, c * v)).astype(np.float32)
ec, eb = pq.encoder_operands(rng.standard_normal((c, 16, v)).astype(np.float32), "l2")
want = pq.pack_codes_grouped(pq.encode(x, ec, eb, "l2"), lanes)
f = kernels.encode_codebook_lanes(n, c, 16, v, "l2", lanes)
ex = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), host_target())
cents, offsets = kernels.codebook_lane_operands(np.ascontiguousarray(ec.transpose(0, 2, 1)), eb)
args = [tvm.runtime.tensor(a) for a in (x, cents, offsets)]
for _ in range(5):
    out = tvm.runtime.tensor(np.zeros(want.shape, np.uint8))
    ex["main"](*args, out)
    np.testing.assert_array_equal(out.numpy(), want)
"""


def test_codebook_lane_encoder_on_two_threads():
    """The software-pipelined encoder carries a row's subvectors from one step to the next in scratch
    allocated once for the kernel, which LLVM keeps in registers (constant indices); 256 row blocks on two
    threads (TVM's pool defaults to the physical cores: one here, hence a subprocess) give the reference's
    codes. (A carry in shared memory is not reliably caught: store forwarding hides most such races.)"""
    import subprocess
    import sys

    env = dict(os.environ, TVM_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-c", _TWO_THREADS], env=env, capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-3000:]


def _ties_and_near_ties(n: int, c: int, k: int, v: int, distance: str, dup: list, seed: int):
    """Rows (n, C*V) halfway between two centroids (+1e-6), every third row on a centroid that codebook
    ``cb`` duplicates (``dup[cb] = (i, j)``: centroid j = centroid i, an exact tie); the encoder operands and
    the reference codes (ties resolved to the lowest index, checked)."""
    rng = np.random.default_rng(seed)
    cents = rng.standard_normal((c, k, v)).astype(np.float32)
    for cb, (i, j) in enumerate(dup):
        cents[cb, j] = cents[cb, i]
    a, b = rng.integers(0, k, (n, c)), rng.integers(0, k, (n, c))
    mid = (cents[np.arange(c), a] + cents[np.arange(c), b]) * np.float32(0.5)
    x = (mid.reshape(n, c * v) + rng.standard_normal((n, c * v)).astype(np.float32) * np.float32(1e-6)).astype(np.float32)
    x[::3] = np.concatenate([cents[cb, i] for cb, (i, _) in enumerate(dup)])  # on duplicated centroids: ties
    ec, eb = pq.encoder_operands(cents, distance)
    ref = pq.encode(x, ec, eb, distance)
    assert (ref[::3] == [i for i, _ in dup]).all()
    return x, ec, eb, ref


@pytest.mark.parametrize("distance", ["l2", "l1"])
def test_codebook_lane_encoder_on_ties_and_near_ties(distance):
    """Exact ties (duplicated centroids) take the lowest index; rows halfway between two centroids
    (+1e-6) agree with the FMA-rounding reference, as for ``encode``."""
    n, c, k, v = 512, 20, 16, 4
    x, ec, eb, ref = _ties_and_near_ties(n, c, k, v, distance, [(0, 1), (3, 12), (0, 15), (7, 8)] * 5, seed=5)
    np.testing.assert_array_equal(_codebook_lanes(x, ec, eb, distance, n, c, v, 64), pq.pack_codes_grouped(ref, 64))
    # the 16-register ISAs' variant: 8 codebook lanes, the argmin index carried as a float, nibble codes
    pairs = shuffle.padded_pairs(c)
    np.testing.assert_array_equal(_codebook_lanes(x, ec, eb, distance, n, c, v, 32, pairs, 8, True),
                                  pq.pack_codes(ref, 32, pairs))


def test_score_chains_bind_interleaved_and_depth_first():
    """``ScoreChain`` values: ``interleave`` chains are bound step by step side by side (the fused-score
    encoder's independent multiply-add chains), each group when its first entry is reached; the merges follow
    depth first. A chain-after-chain binding (what the interleaving replaced) fails this test."""
    step = lambda acc, t: acc + tvm.tirx.const(float(t), "float32")
    chains = [kernels.ScoreChain(tvm.tirx.const(float(q), "float32"), step, 2) for q in range(6)]
    expr = kernels._argmin_tree(chains, [tvm.tirx.const(q, "int32") for q in range(6)], "float32", "int32",
                                depth_first=True, interleave=4)
    names = []
    while isinstance(expr, tvm.tirx.Let):
        names.append(expr.var.name)
        expr = expr.body
    first = [f"s{q}_{t}" for t in range(3) for q in range(4)]
    assert names[:12] == first
    rest = [n for n in names[12:] if n.startswith("s")]
    assert rest == [f"s{q}_{t}" for t in range(3) for q in (4, 5)]  # the last, short group of 2
    # the second group is bound after the first group's merges, just before the merge that reads entry 4
    assert names.index("s4_0") > names.index("m0_3")
    assert names[-1].startswith("i") and names.count("m0_6") == 1
    with pytest.raises(ValueError, match="depth first"):
        kernels._argmin_tree(chains, [tvm.tirx.const(q, "int32") for q in range(6)], "float32", "int32")


@pytest.mark.parametrize("scheduled", [False, True])
@pytest.mark.parametrize("conv", [
    ((1, 16, 12, 12), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 9),
    ((2, 3, 11, 9), (3, 3), (2, 1), (1, 0, 1, 2), (1, 2), 4),  # stride, asymmetric padding, dilation, D=27 padded
    ((3, 5, 7, 7), (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 2),
    # stride 1 encodes virtual rows over the padded width: batch 2, dilation, asymmetric padding, a
    # 16-row tile spanning output rows and images' boundaries, D=45 padded to 48 columns
    ((2, 5, 9, 7), (3, 3), (1, 1), (0, 1, 2, 1), (2, 1), 4),
    # 4x4 maps at V=9: the fused encoder's 8-row tiles (24 virtual rows per image, 32 otherwise), batch 2
    ((2, 4, 4, 4), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 9),
])
def test_encoder_fused_with_im2col_matches_reference(scheduled, conv):
    shape, khw, st, pad, dil, v = conv
    spec = kernels.ConvInput(shape, khw, st, pad, dil)
    c = -(-spec.d // v)
    rng = np.random.default_rng(spec.rows)
    x = rng.standard_normal(shape).astype(np.float32)
    ec, eb = pq.encoder_operands(rng.standard_normal((c, 16, v)).astype(np.float32), "l2")
    rows = pq.pad_columns(pq.im2col(x, khw, st, pad, dil), c * v)
    codes = pq.encode(rows, ec, eb, "l2")
    # fused: the scores computed inside the argmin (the 16-register ISAs' encoder)
    cases = (((False, 64, False), (True, 64, False), (True, 16, False), (False, 32, True), (True, 16, True))
             if scheduled else ((False, 64, False), (False, 32, True)))
    for grouped, lanes, fused in cases:
        f = kernels.encode(spec.rows, c, 16, v, "l2", pack_lanes=lanes, conv=spec, grouped=grouped,
                           fused_scores=fused)
        f = cpu.schedule(f) if scheduled else f
        got = _run(f, x, np.ascontiguousarray(ec.transpose(0, 2, 1)), eb,
                   out_shape=shuffle.packed_shape(spec.rows, c, lanes, grouped), out_dtype="uint8")
        np.testing.assert_array_equal(got, pq.pack_codes_grouped(codes, lanes) if grouped else pq.pack_codes(codes, lanes))


def test_fused_encoder_rounds_virtual_rows_to_its_row_tile():
    """Virtual rows per image round up to the encoder's rows per vector: a 4x4 map (22 virtual rows) encodes
    24 rows per image in the fused L2 encoder's 8-row tiles, 32 in the score-buffer encoder's 16-row tiles."""
    spec = kernels.ConvInput((2, 4, 4, 4), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
    assert spec.rows_per_image == 32
    for v, fused, per_image in ((9, True, 24), (4, True, 24), (2, True, 24), (4, False, 32), (9, False, 32)):
        f = kernels.encode(spec.rows, -(-spec.d // v), 16, v, "l2", pack_lanes=32, conv=spec, fused_scores=fused)
        rows = next(b for b in f.body.block.alloc_buffers if b.name == "rows")
        assert int(rows.shape[0]) == 2 * per_image, (v, fused)


@pytest.mark.parametrize("distance", ["l2", "l1"])
@pytest.mark.parametrize("k", [16, 11])
def test_fused_score_encoder_on_ties_and_near_ties(distance, k):
    """The fused-score encoder (``encode(fused_scores=True)``: scores inside a depth-first argmin tree)
    takes the lowest index on exact ties and agrees with the reference on near-ties, also for a K that is
    not a power of two (an uneven tree)."""
    n, c, v = 80, 20, 4
    x, ec, eb, ref = _ties_and_near_ties(n, c, k, v, distance, [(0, 1), (3, k - 1), (0, k - 2), (7, 8)] * 5, seed=k)
    f = cpu.schedule(kernels.encode(n, c, k, v, distance, pack_lanes=32, fused_scores=True))
    got = _run(f, x, np.ascontiguousarray(ec.transpose(0, 2, 1)), eb,
               out_shape=shuffle.packed_shape(n, c, 32), out_dtype="uint8")
    np.testing.assert_array_equal(got, pq.pack_codes(ref, 32))
    with pytest.raises(ValueError, match="fused_scores"):
        kernels.encode(n, c, k, v, distance, fused_scores=True)
    # rows per vector: 8 (16 registers: one ymm per value, whatever V), but 16 for L1 while V <= 4
    for sub, lanes in ((2, 16 if distance == "l1" else 8), (4, 16 if distance == "l1" else 8), (9, 8)):
        f = kernels.encode(n, 4, k, sub, distance, pack_lanes=32, fused_scores=True)
        assert int(f.attrs[kernels.ROW_LANES_ATTR]) == lanes
        vectorized = set(re.findall(r"T\.vectorized\((\d+)\)", cpu.schedule(f).script()))
        assert vectorized == {str(lanes)}
