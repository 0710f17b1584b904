"""MATLAB's ``imresize(x, scale, 'bicubic')`` in numpy: how super-resolution papers make their LR inputs.

SR networks are trained and evaluated on LR images made by MATLAB's antialiased bicubic, not Pillow's or
OpenCV's: the pixels differ by up to 14 levels, and the SR-LUT authors found 0.6 dB between the two on
Set14 x4 (``../shared/data/sr/MANIFEST.txt``, "LR generation"). The resize is separable: one weight matrix
per axis, rows first, in float64, rounded once at the end. Reproduces the SR-LUT authors' Set5 x4 LR files
exactly (``tests/test_sr_eval.py``).
"""

from __future__ import annotations

import math

import numpy as np


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's)."""
    a = np.abs(x)
    return np.where(a <= 1, 1.5 * a**3 - 2.5 * a**2 + 1,
                    np.where(a <= 2, -0.5 * a**3 + 2.5 * a**2 - 4 * a + 2, 0.0))


def weights(in_len: int, out_len: int, scale: float) -> np.ndarray:
    """The (out_len, in_len) matrix that resizes one axis by ``scale`` (< 1 shrinks, antialiased).

    Output pixel ``i`` (1-based) sits at ``u = i / scale + (1 - 1 / scale) / 2`` in the input; a shrink
    widens the kernel to ``4 / scale`` taps and scales it by ``scale``. Each row is normalised to sum 1;
    taps outside the image are mirrored (0 -> 1, -1 -> 2, n+1 -> n)."""
    kw = 4.0 / scale if scale < 1 else 4.0
    u = np.arange(1, out_len + 1, dtype=np.float64) / scale + 0.5 * (1 - 1 / scale)
    left = np.floor(u - kw / 2)
    taps = left[:, None] + np.arange(math.ceil(kw) + 2)[None, :]
    w = scale * _cubic(scale * (u[:, None] - taps)) if scale < 1 else _cubic(u[:, None] - taps)
    w /= w.sum(axis=1, keepdims=True)
    j = taps.astype(np.int64)
    j = np.where(j < 1, 1 - j, j)
    j = np.where(j > in_len, 2 * in_len + 1 - j, j)
    m = np.zeros((out_len, in_len))
    np.add.at(m, (np.repeat(np.arange(out_len), taps.shape[1]), j.ravel() - 1), w.ravel())
    return m


def imresize(image: np.ndarray, scale: float) -> np.ndarray:
    """``image`` (H, W) or (H, W, C), uint8, resized by ``scale`` as MATLAB's bicubic imresize; uint8 out.

    The output size is ``ceil(H * scale) x ceil(W * scale)``."""
    if image.dtype != np.uint8:
        raise ValueError(f"imresize takes uint8 images, got {image.dtype}")
    h, w = image.shape[:2]
    oh, ow = math.ceil(h * scale), math.ceil(w * scale)
    x = image.astype(np.float64)
    x = np.tensordot(weights(h, oh, scale), x, axes=(1, 0))  # rows first
    x = np.moveaxis(np.tensordot(weights(w, ow, scale), x, axes=(1, 1)), 0, 1)
    return np.clip(np.floor(x + 0.5), 0, 255).astype(np.uint8)  # MATLAB rounds halves away from zero
