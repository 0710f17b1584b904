"""Whole-network lookup tables for super-resolution (SR-LUT family, HKLUT's two-branch design), in numpy.

A small network whose receptive field is a few pixels is replaced **whole** by a table indexed by those
pixels' values. HKLUT keeps the tables small by splitting every 8-bit pixel into its 4 most and 4 least
significant bits: an MSB branch sees the high nibbles through 3-pixel patterns (16^3 = 4,096 entries) and
an LSB branch the low nibbles through 2-pixel patterns (16^2 = 256 entries), each entry the ``scale x
scale`` int8 outputs of one LR pixel. Each pattern is applied at 4 rotations of the image (a rotation
ensemble: one table serves 4 orientations); the branch sums its int8 outputs and divides by its number
of patterns. A x4 model is two x2 stages.

Table sizes of HKLUT-S (MSB patterns h, d, b; LSB h, d) at x4 = 2 stages of x2: 2 x (3 x 16,384 + 2 x
1,024) = 102,400 bytes.

This module is the numpy reference: ``upscale`` computes, from the tables, exactly what the compiled
kernel computes (the tests hold the kernel to it), and the torch network (``tvm_lut.train.hklut``)
computes the same function before tabulation.

Arithmetic of one stage, per output pixel (``a`` the branch's int32 sum over patterns and rotations,
``n`` its pattern count, ``x`` the LR pixel it came from, nearest-neighbour):

    y = clip(x / 255 + clip(a_msb / (n_msb * 255), -1, 1) + clip(a_lsb / (n_lsb * 255), -1, 1), 0, 1)

in float32, in that order. A stage's output pixel is ``floor(255 y)`` when it feeds the next stage (the
network floors its input), and the model's final output is ``round(255 y)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# pattern -> the pixels it reads, as (row, column) offsets from the anchor pixel (the anchor is first)
PATTERNS: dict[str, tuple[tuple[int, int], ...]] = {
    "h": ((0, 0), (0, 1), (0, 2)),  # three in a row
    "d": ((0, 0), (1, 1), (2, 2)),  # the diagonal
    "b": ((0, 0), (1, 2), (2, 1)),  # a knight's-move pair
    "h2": ((0, 0), (0, 1)),  # the LSB branch's two-pixel patterns
    "d2": ((0, 0), (1, 1)),
}
LEVELS = 16  # values of a nibble: every table covers all 16^n inputs, no interpolation


def pad_of(pattern: str) -> tuple[int, int]:
    """(bottom, right) reflect padding that keeps the output the size of the input."""
    offs = PATTERNS[pattern]
    return max(o[0] for o in offs), max(o[1] for o in offs)


@dataclass(frozen=True)
class StageTables:
    """One x``scale`` stage: int8 tables ``(16^n, scale, scale)`` per pattern, for each branch."""

    scale: int
    msb: dict[str, np.ndarray]
    lsb: dict[str, np.ndarray]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.msb.values(), *self.lsb.values()))


def split_nibbles(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 pixels -> (high nibbles, low nibbles), each 0..15."""
    return image >> 4, image & 15


def table_index(levels: np.ndarray, pattern: str) -> np.ndarray:
    """The table row each anchor reads: the pattern's nibbles, first pixel most significant (H, W) int."""
    bottom, right = pad_of(pattern)
    h, w = levels.shape
    padded = np.pad(levels.astype(np.int64), ((0, bottom), (0, right)), mode="reflect")
    idx = np.zeros((h, w), np.int64)
    for dy, dx in PATTERNS[pattern]:
        idx = idx * LEVELS + padded[dy:dy + h, dx:dx + w]
    return idx


def branch_sum(levels: np.ndarray, tables: dict[str, np.ndarray], scale: int) -> np.ndarray:
    """Sum over the branch's patterns and the 4 rotations of the looked-up ``scale x scale`` blocks (int32)."""
    h, w = levels.shape
    acc = np.zeros((h * scale, w * scale), np.int32)
    for pattern, table in tables.items():
        for r in range(4):
            rotated = np.rot90(levels, r)
            rh, rw = rotated.shape
            blocks = table[table_index(rotated, pattern)].astype(np.int32)  # (rh, rw, s, s)
            image = blocks.transpose(0, 2, 1, 3).reshape(rh * scale, rw * scale)
            acc += np.rot90(image, -r)
    return acc


def stage(image: np.ndarray, tables: StageTables) -> np.ndarray:
    """One stage on a uint8 (H, W) image: the float32 output ``y`` in [0, 1], (H*scale, W*scale)."""
    s = tables.scale
    hi, lo = split_nibbles(image)
    n_msb, n_lsb = np.float32(len(tables.msb) * 255), np.float32(len(tables.lsb) * 255)
    msb = np.clip(branch_sum(hi, tables.msb, s).astype(np.float32) / n_msb, -1, 1)
    lsb = np.clip(branch_sum(lo, tables.lsb, s).astype(np.float32) / n_lsb, -1, 1)
    nearest = np.repeat(np.repeat(image, s, 0), s, 1).astype(np.float32) / np.float32(255)
    return np.clip((nearest + msb) + lsb, 0, 1).astype(np.float32)


def upscale(image: np.ndarray, stages: list[StageTables]) -> np.ndarray:
    """A uint8 image (H, W) or (H, W, C; each channel alone) through every stage -> uint8, upscaled."""
    if image.dtype != np.uint8:
        raise ValueError(f"upscale takes uint8 images, got {image.dtype}")
    if image.ndim == 3:
        return np.stack([upscale(image[..., c], stages) for c in range(image.shape[2])], axis=-1)
    x = image
    for i, st in enumerate(stages):
        y = stage(x, st)
        last = i == len(stages) - 1
        x = (np.floor(y * np.float32(255) + np.float32(0.5)) if last else np.floor(y * np.float32(255))).astype(np.uint8)
    return x
