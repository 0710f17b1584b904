"""PSNR and SSIM as super-resolution papers report them: on the Y channel, borders shaved, HR modcropped.

Protocol (``../shared/data/sr/MANIFEST.txt``): crop the HR image to a multiple of the scale (``modcrop``),
make the LR input with MATLAB's bicubic (``resize.imresize``), round the SR output to uint8, take Y =
16 + (65.481 R + 128.553 G + 24.966 B) / 255 (MATLAB's ``rgb2ycbcr``; a grayscale image is its own Y),
cut ``scale`` pixels off every border, then PSNR = 10 log10(255^2 / MSE) and SSIM with Wang et al.'s 11x11
Gaussian window (sigma 1.5, K1 = 0.01, K2 = 0.03). With these the published bicubic figures come out
(Set5 x4: 28.43 dB, ``tests/test_sr_eval.py``).
"""

from __future__ import annotations

import numpy as np


def modcrop(image: np.ndarray, scale: int) -> np.ndarray:
    """The top-left part of ``image`` whose height and width are multiples of ``scale``."""
    h, w = image.shape[:2]
    return image[: h - h % scale, : w - w % scale]


def luma(image: np.ndarray) -> np.ndarray:
    """Y in float64 (16..235 for RGB); a 2-D (grayscale) image is used as Y as it is."""
    x = image.astype(np.float64)
    if x.ndim == 2:
        return x
    return 16.0 + (65.481 * x[..., 0] + 128.553 * x[..., 1] + 24.966 * x[..., 2]) / 255.0


def _shave(y: np.ndarray, border: int) -> np.ndarray:
    return y[border:-border, border:-border] if border else y


def psnr(sr: np.ndarray, hr: np.ndarray, border: int) -> float:
    """Y-channel PSNR in dB of uint8 images of the same shape, ``border`` pixels cut off each side."""
    if sr.shape != hr.shape:
        raise ValueError(f"SR image {sr.shape} and HR image {hr.shape} differ in shape")
    mse = np.mean((_shave(luma(sr), border) - _shave(luma(hr), border)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def _gaussian_filter_valid(x: np.ndarray, size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Separable Gaussian window over ``x``, keeping only positions where it fits (MATLAB's 'valid')."""
    r = np.arange(size) - (size - 1) / 2
    g = np.exp(-(r**2) / (2 * sigma**2))
    g /= g.sum()
    rows = np.apply_along_axis(lambda v: np.convolve(v, g, mode="valid"), 0, x)
    return np.apply_along_axis(lambda v: np.convolve(v, g, mode="valid"), 1, rows)


def ssim(sr: np.ndarray, hr: np.ndarray, border: int) -> float:
    """Y-channel SSIM (Wang et al. 2004, the window and constants SR papers use), ``border`` pixels cut."""
    if sr.shape != hr.shape:
        raise ValueError(f"SR image {sr.shape} and HR image {hr.shape} differ in shape")
    a, b = _shave(luma(sr), border), _shave(luma(hr), border)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_a, mu_b = _gaussian_filter_valid(a), _gaussian_filter_valid(b)
    var_a = _gaussian_filter_valid(a * a) - mu_a**2
    var_b = _gaussian_filter_valid(b * b) - mu_b**2
    cov = _gaussian_filter_valid(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(s.mean())
