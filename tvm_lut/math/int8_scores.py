"""Int8 encoder scores: the nearest-centroid search in integers, as a VNNI ``vpdpbusd`` encoder computes it.

The fp32 encoder spends V multiply-adds per (row, codebook, centroid) on 16 float lanes; ``vpdpbusd``
multiplies 4 unsigned bytes by 4 signed bytes and adds them into one int32 lane, 64 products per
instruction. The scores become integers:

- the input ``x`` is quantized per tensor, ``xq = clip(rint(x * inv_scale) + zero_point, 0, 255)``
  (uint8; ``zero_point`` 0 for a non-negative input such as a ReLU's output, 128 otherwise), computed
  in float32 with round-half-even, as the kernel's ``vcvtps2dq`` does;
- each codebook's centroids are quantized with their own scale, ``cq = rint(p / s_c)`` in [-127, 127];
  a positive factor per codebook does not move that codebook's argmin;
- ``score[k] = offset[k] - xq . cq[k]``, ``offset[k] = rint(0.5 * (s_c / s_x) * ||cq[k]||^2) +
  zero_point * sum(cq[k])`` (L2: ``0.5||p||^2 - x.p`` divided by ``s_x * s_c``, the zero point folded in).

The code is the first minimum (lowest index on ties). Every quantity is an integer below 2^27 (offsets
are clipped to +-2^26; ``|xq . cq| <= 255 * 127 * V``), so numpy here, the kernel (which packs the
centroid index into the score's low 4 bits: ``(score << 4) | k``, one ``vpminsd`` per merge) and torch
(``codes_torch``, exact in float64) give the same codes bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

OFFSET_LIMIT = 1 << 26  # |offset| bound: with |xq . cq| < 2^19 (V <= 12) every score fits 27 bits + sign
QMAX_CENTROID = 127


@dataclass(frozen=True)
class Int8Encoder:
    """One layer's int8 encoder operands: input quantization, centroids (C, K, V) int8, offsets (C, K)."""

    inv_scale: np.float32  # 1 / s_x, the multiplier the kernel applies to each input value
    zero_point: int  # 0 (input >= 0) or 128
    centroids: np.ndarray  # (C, K, V) int8, per-codebook scale
    offsets: np.ndarray  # (C, K) int32

    @property
    def scale(self) -> float:
        return float(1.0 / self.inv_scale)


def input_quantization(rows: np.ndarray, percentile: float = 99.99) -> tuple[np.float32, int]:
    """(inv_scale, zero_point) for a layer's calibration inputs: unsigned when no value is negative (the
    usual ReLU output), else symmetric around 128; the range is the ``percentile`` of |x| (a few outliers
    do not stretch the grid)."""
    x = np.asarray(rows, np.float32)
    signed = bool((x < 0).any())
    top = float(np.percentile(np.abs(x), percentile)) if x.size else 0.0
    top = top if top > 0 else 1.0
    return np.float32((127.0 if signed else 255.0) / top), (128 if signed else 0)


def quantize_input(x: np.ndarray, inv_scale: np.float32, zero_point: int) -> np.ndarray:
    """uint8 ``clip(rint(x * inv_scale) + zero_point, 0, 255)``, the product rounded to float32 first."""
    q = np.rint(np.asarray(x, np.float32) * np.float32(inv_scale))
    return np.clip(q + zero_point, 0, 255).astype(np.uint8)


def fit(centroids: np.ndarray, inv_scale: np.float32, zero_point: int) -> Int8Encoder:
    """The int8 operands of L2 centroids (C, K, V) for inputs quantized with ``inv_scale``/``zero_point``."""
    p = np.asarray(centroids, np.float64)
    s_c = np.abs(p).max(axis=(1, 2)) / QMAX_CENTROID  # per codebook
    s_c = np.where(s_c > 0, s_c, 1.0)
    cq = np.clip(np.rint(p / s_c[:, None, None]), -QMAX_CENTROID, QMAX_CENTROID)
    s_x = 1.0 / float(inv_scale)
    off = np.rint(0.5 * (s_c / s_x)[:, None] * (cq * cq).sum(-1)) + zero_point * cq.sum(-1)
    off = np.clip(off, -OFFSET_LIMIT, OFFSET_LIMIT).astype(np.int32)
    return Int8Encoder(np.float32(inv_scale), int(zero_point), cq.astype(np.int8), off)


def scores(xq: np.ndarray, enc: Int8Encoder) -> np.ndarray:
    """Integer scores (N, C, K) of quantized rows (N, C*V)."""
    c, k, v = enc.centroids.shape
    xs = xq.astype(np.int64).reshape(xq.shape[0], c, v)
    return enc.offsets.astype(np.int64)[None] - np.einsum("ncv,ckv->nck", xs, enc.centroids.astype(np.int64))


def encode(xq: np.ndarray, enc: Int8Encoder) -> np.ndarray:
    """Codes (N, C) int32 of quantized rows (N, C*V): the first minimum of ``scores``."""
    return scores(xq, enc).argmin(-1).astype(np.int32)


def encode_float(x: np.ndarray, enc: Int8Encoder) -> np.ndarray:
    """Codes of float rows (N, C*V), quantized first: what the compiled layer computes."""
    return encode(quantize_input(x, enc.inv_scale, enc.zero_point), enc)


def codes_torch(x, enc: Int8Encoder):
    """The same codes from a torch float tensor (N, C*V): the training path's forward (exact in float64,
    ``torch.round`` rounds half to even like ``np.rint``)."""
    import torch

    q = torch.clamp(torch.round(x.to(torch.float32) * float(enc.inv_scale)) + enc.zero_point, 0, 255)
    c, k, v = enc.centroids.shape
    cq = torch.from_numpy(enc.centroids.astype(np.float64)).to(x.device)
    s = torch.from_numpy(enc.offsets.astype(np.float64)).to(x.device)[None] - torch.einsum(
        "ncv,ckv->nck", q.to(torch.float64).reshape(-1, c, v), cq)
    return s.argmin(-1)
