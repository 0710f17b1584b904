"""The HKLUT stage kernel: MSB/LSB table lookups with the rotation ensemble and the pixel shuffle, in TIR.

One stage maps a uint8 (H, W) plane to a uint8 (H*s, W*s) plane (``tvm_lut.math.sr_lut.stage``, then
``floor(255 y)`` between stages or ``round(255 y)`` at the end). The numpy reference rotates the image,
looks up, and rotates back; the kernel never moves the image: rotation ``r`` of a pattern is the pattern
with rotated offsets read in place, and its ``s x s`` block lands rotated in the output::

    r   reads (dy, dx) as     output (a, b) takes table entry
    0   (dy, dx)              (a, b)
    1   (dx, -dy)             (s-1-b, a)
    2   (-dy, -dx)            (s-1-a, s-1-b)
    3   (-dx, dy)             (b, s-1-a)

with reflection at every border (the reference pads the rotated image's bottom and right, which are the
original's four sides over the four rotations). Per output pixel: one index per (pattern, rotation) from
2 or 3 nibbles, one int8 read each (12 MSB + 8 LSB for HKLUT-S), integer sums, then the same float32
arithmetic in the same order as the reference, so the result is bit-exact (``tests/test_sr_kernel.py``).

``stage_x2`` is the fast form for x2 stages (HKLUT's x4 is two of them): the nibble planes are reflect-padded
once, a table entry's 2x2 block is one int32 word read once per LR pixel, pattern and rotation, the four
sub-pixels take its bytes by shifts, and a last pass does the pixel shuffle. Measured on the Intel Xeon
(AVX-512) this was written on, one thread, 320x180 -> 1280x720 (two x2 stages): 7.1 ms (1.5 + 5.6), against
33.7 ms for ``stage`` (which recomputes every index for each of the four sub-pixels and gathers each byte)
and 224 ms for the numpy reference.

Tables are flat int8 arrays ``(16^n * s * s,)`` per pattern, module constants after tabulation.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import te, tirx

from tvm_lut.math import sr_lut

from .kernels import opaque_kernel

# rotation r: where offset (dy, dx) of the rotated frame lies in the image, and which table entry (row,
# column of the s x s block) output sub-pixel (a, b) takes
_OFFSET = (lambda dy, dx: (dy, dx), lambda dy, dx: (dx, -dy), lambda dy, dx: (-dy, -dx), lambda dy, dx: (-dx, dy))
_ENTRY = (lambda a, b, s: (a, b), lambda a, b, s: (s - 1 - b, a), lambda a, b, s: (s - 1 - a, s - 1 - b),
          lambda a, b, s: (b, s - 1 - a))


def _f32(v: float):
    return tirx.const(v, "float32")


def _output_level(msb_sum, lsb_sum, pixel, n_msb: int, n_lsb: int, final: bool):
    """The stage's arithmetic after the lookups, as ``sr_lut.stage`` does it (float32, same order): the
    branches' int32 sums scaled and clipped, added to the nearest LR pixel, clipped, then the uint8 level
    (rounded for the model's last stage, floored when it feeds another)."""
    hi = msb_sum.astype("float32") / _f32(n_msb * 255)
    lo = lsb_sum.astype("float32") / _f32(n_lsb * 255)
    nearest = pixel.astype("float32") / _f32(255)
    v = tirx.max(tirx.min((nearest + tirx.max(tirx.min(hi, _f32(1)), _f32(-1)))
                          + tirx.max(tirx.min(lo, _f32(1)), _f32(-1)), _f32(1)), _f32(0))
    level = v * _f32(255) + _f32(0.5) if final else v * _f32(255)
    return tirx.floor(level).astype("uint8")


def _reflect(c, n: int):
    """Index ``c`` (at most 2 outside ``[0, n)``) reflected into the image, without repeating the edge."""
    return tirx.Select(c < 0, -c, tirx.Select(c >= n, 2 * n - 2 - c, c))


def stage(h: int, w: int, scale: int, msb: tuple[str, ...], lsb: tuple[str, ...], final: bool) -> tirx.PrimFunc:
    """The stage as a PrimFunc ``(image, *msb tables, *lsb tables, out)``: uint8 (h, w) -> uint8 (h*s, w*s).

    ``final``: round the output to the nearest level (the model's last stage) instead of flooring it (a
    stage that feeds another: the network floors its input)."""
    if min(h, w) < 3:
        raise ValueError(f"an HKLUT stage needs an image of at least 3x3 pixels (its patterns span 3), got {h}x{w}")
    s = scale
    image = te.placeholder((h, w), "uint8", name="image")
    tables = {(branch, p): te.placeholder((sr_lut.LEVELS ** len(sr_lut.PATTERNS[p]) * s * s,), "int8",
                                          name=f"{branch}_{p}")
              for branch, pats in (("msb", msb), ("lsb", lsb)) for p in pats}

    def nibble(branch: str, y, x):
        v = image[_reflect(y, h), _reflect(x, w)].astype("int32")
        return tirx.shift_right(v, 4) if branch == "msb" else tirx.bitwise_and(v, 15)

    def branch_sum(branch: str, pats, p, q, a, b):
        acc = tirx.const(0, "int32")
        for pat in pats:
            table = tables[(branch, pat)]
            for r in range(4):
                idx = tirx.const(0, "int32")
                for dy, dx in sr_lut.PATTERNS[pat]:
                    oy, ox = _OFFSET[r](dy, dx)
                    idx = idx * sr_lut.LEVELS + nibble(branch, p + oy, q + ox)
                ta, tb = _ENTRY[r](a, b, s)
                acc = acc + table[(idx * s + ta) * s + tb].astype("int32")
        return acc

    def pixel(y, x):
        p, a, q, b = y // s, y % s, x // s, x % s
        return _output_level(branch_sum("msb", msb, p, q, a, b), branch_sum("lsb", lsb, p, q, a, b), image[p, q],
                             len(msb), len(lsb), final)

    out = te.compute((h * s, w * s), pixel, name="sr_out")
    func = te.create_prim_func([image, *tables.values(), out]).without_attr("global_symbol")
    return opaque_kernel(func, "sr_stage")


def stage_x2(h: int, w: int, msb: tuple[str, ...], lsb: tuple[str, ...], final: bool) -> tirx.PrimFunc:
    """``stage`` for scale 2 with one 32-bit read per (pattern, rotation): a table entry's 2x2 int8 block is
    one word, so each LR pixel gathers ``words`` once (20 for HKLUT-S) and its four outputs take their
    bytes (sign-extended by two shifts) in the rotation's order. Tables come as int32 ``(16^n,)`` (the
    int8 ``(16^n, 2, 2)`` tables' bytes, little-endian). Same arguments and results as ``stage``."""
    if min(h, w) < 3:
        raise ValueError(f"an HKLUT stage needs an image of at least 3x3 pixels (its patterns span 3), got {h}x{w}")
    s = 2
    image = te.placeholder((h, w), "uint8", name="image")
    tables = {(branch, p): te.placeholder((sr_lut.LEVELS ** len(sr_lut.PATTERNS[p]),), "int32", name=f"{branch}_{p}")
              for branch, pats in (("msb", msb), ("lsb", lsb)) for p in pats}

    # the nibble planes, reflect-padded by 2 on every side once, so the pattern reads below are plain
    # (vectorisable) loads instead of a reflected gather per pixel and pattern
    def plane(branch: str):
        def at(y, x):
            v = image[_reflect(y - 2, h), _reflect(x - 2, w)].astype("int32")
            return tirx.shift_right(v, 4) if branch == "msb" else tirx.bitwise_and(v, 15)

        return te.compute((h + 4, w + 4), at, name=f"plane_{branch}")

    planes = {"msb": plane("msb"), "lsb": plane("lsb")}

    def nibble(branch: str, y, x):
        return planes[branch][y + 2, x + 2]

    def reader(branch: str, pat: str, r: int, table):
        def read(p, q):
            idx = tirx.const(0, "int32")
            for dy, dx in sr_lut.PATTERNS[pat]:
                oy, ox = _OFFSET[r](dy, dx)
                idx = idx * sr_lut.LEVELS + nibble(branch, p + oy, q + ox)
            return table[idx]

        return read

    words = []  # (branch, rotation, the word each LR pixel reads for that pattern and rotation)
    for (branch, pat), table in tables.items():
        for r in range(4):
            words.append((branch, r, te.compute((h, w), reader(branch, pat, r, table), name=f"word_{branch}_{pat}_{r}")))

    def subpixel(k, p, q):
        """Output sub-pixel k = 2a + b of LR pixel (p, q): every word's byte for it, then the stage's
        arithmetic (the byte a rotation puts at (a, b) is entry (ta, tb), byte 2 ta + tb of the word)."""
        a, b = k // s, k % s
        sums = {"msb": tirx.const(0, "int32"), "lsb": tirx.const(0, "int32")}
        for branch, r, word in words:
            ta, tb = _ENTRY[r](a, b, s)
            byte = ta * s + tb
            sums[branch] = sums[branch] + tirx.shift_right(tirx.shift_left(word[p, q], 24 - 8 * byte), 24)
        return _output_level(sums["msb"], sums["lsb"], image[p, q], len(msb), len(lsb), final)

    # the four sub-pixel planes, then the pixel shuffle (one byte moved per output pixel)
    sub = te.compute((s * s, h, w), subpixel, name="subpixels")

    def pixel(y, x):
        return sub[(y % s) * s + x % s, y // s, x // s]

    out = te.compute((h * s, w * s), pixel, name="sr_out")
    func = te.create_prim_func([image, *tables.values(), out]).without_attr("global_symbol")
    return opaque_kernel(func, "sr_stage")


def words_of(table: np.ndarray) -> np.ndarray:
    """An int8 ``(16^n, 2, 2)`` table as the int32 words ``stage_x2`` reads (the same bytes)."""
    return np.ascontiguousarray(table.reshape(len(table), 4)).view("<i4").reshape(-1)


def schedule(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Threads over output rows, vector lanes over the output columns; ``stage_x2``'s per-pixel words are
    computed per LR row, just before the two output rows that read them (they stay in cache)."""
    sch = tvm.s_tir.Schedule(func)
    block = sch.get_sblock("sr_out")
    y, x = sch.get_loops(block)
    children = sch.get_child_blocks(sch.get_sblock("root")) if _has_root(sch) else []
    word_blocks = [b for b in children if sch.get(b).name_hint.startswith(("word_", "subpixels"))]
    for b in children:
        if sch.get(b).name_hint.startswith("plane_"):
            py, px = sch.get_loops(b)
            sch.parallel(py)
            sch.vectorize(sch.split(px, factors=[None, 16])[1])
    if word_blocks:
        p, _a = sch.split(y, factors=[None, 2])
        for wb in sorted(word_blocks, key=lambda b: not sch.get(b).name_hint.startswith("subpixels")):
            sch.compute_at(wb, p)  # the sub-pixels first: the words' consumer must be under the loop
            wq = sch.get_loops(wb)[-1]
            wo, wi = sch.split(wq, factors=[None, 16])
            sch.vectorize(wi)
        sch.parallel(p)
    else:
        sch.parallel(y)
    xo, xi = sch.split(x, factors=[None, 16])
    sch.vectorize(xi)
    return sch.mod["main"]


def _has_root(sch) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except Exception:
        return False
