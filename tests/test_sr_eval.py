"""Super-resolution evaluation as the field does it: MATLAB's bicubic LR, Y-channel PSNR/SSIM, shaved borders."""

import glob
import os

import numpy as np
import pytest

from tvm_lut.math import image_quality as iq, resize
from tvm_lut.train import datasets

SR = os.path.join(datasets.SHARED_DATA, "sr")
needs_sr = pytest.mark.skipif(not os.path.isdir(os.path.join(SR, "set5")),
                              reason=f"the SR test sets are not under {SR} (../shared/data/sr)")


def _png(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_resize_weights_are_normalised_and_mirror_at_the_edges():
    for n, out, s in ((10, 3, 0.25), (7, 14, 2.0), (5, 5, 1.0)):
        w = resize.weights(n, out, s)
        assert w.shape == (out, n)
        np.testing.assert_allclose(w.sum(1), 1.0)
    flat = np.full((9, 13, 3), 77, np.uint8)  # a constant image stays constant, any size, up or down
    assert (resize.imresize(flat, 0.25) == 77).all() and resize.imresize(flat, 0.25).shape == (3, 4, 3)
    assert (resize.imresize(flat, 4) == 77).all() and resize.imresize(flat, 4).shape == (36, 52, 3)
    with pytest.raises(ValueError, match="uint8"):
        resize.imresize(flat.astype(np.float32), 0.5)


def test_psnr_and_ssim_conventions():
    rng = np.random.default_rng(0)
    hr = rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)
    assert iq.psnr(hr, hr, 4) == float("inf") and abs(iq.ssim(hr, hr, 4) - 1.0) < 1e-12
    noisy = np.clip(hr.astype(int) + rng.integers(-3, 4, hr.shape), 0, 255).astype(np.uint8)
    assert 35 < iq.psnr(noisy, hr, 4) < 60 and iq.ssim(noisy, hr, 4) < 1.0
    gray = hr[..., 0]
    np.testing.assert_array_equal(iq.luma(gray), gray.astype(np.float64))  # grayscale is its own Y
    assert iq.luma(np.zeros((1, 1, 3), np.uint8))[0, 0] == 16.0 and round(iq.luma(np.full((1, 1, 3), 255, np.uint8))[0, 0], 6) == 235.0
    assert iq.modcrop(np.zeros((250, 361, 3)), 4).shape == (248, 360, 3)
    with pytest.raises(ValueError, match="differ in shape"):
        iq.psnr(hr[:-1], hr, 2)


@needs_sr
def test_lr_inputs_are_the_sr_lut_authors_own_and_bicubic_gives_the_published_figures():
    """The x4 LR of every Set5 image equals the file the SR-LUT authors evaluate on, pixel for pixel; bicubic
    down and up gives the published Set5 figures (VDSR's table: 28.42 / 0.8104 at x4, 33.66 / 0.9299 at x2;
    the MANIFEST's reproduction: 28.43 and 33.68 dB)."""
    for s, want_psnr, want_ssim in ((4, 28.43, 0.8104), (2, 33.68, 0.9299)):
        ps, ss = [], []
        for f in sorted(glob.glob(os.path.join(SR, "set5", "*.png"))):
            hr = iq.modcrop(_png(f), s)
            lr = resize.imresize(hr, 1 / s)
            ref = os.path.join(SR, "matlab_lr_reference", "set5_srlut", "x4", os.path.basename(f))
            if s == 4 and os.path.isfile(ref):
                np.testing.assert_array_equal(lr, _png(ref))
            up = resize.imresize(lr, s)
            ps.append(iq.psnr(up, hr, s))
            ss.append(iq.ssim(up, hr, s))
        assert abs(np.mean(ps) - want_psnr) < 0.01, (s, np.mean(ps))
        assert abs(np.mean(ss) - want_ssim) < 0.0015, (s, np.mean(ss))
