"""HKLUT training on T91: patches pair MATLAB-bicubic LR with HR, runs resume from their checkpoint."""

import os

import numpy as np
import pytest

from tvm_lut.errors import CalibrationError
from tvm_lut.math import resize
from tvm_lut.train import sr_training

pytestmark = pytest.mark.skipif(not os.path.isdir(os.path.join(sr_training.sr_root(), "t91")),
                                reason=f"T91 is not under {sr_training.sr_root()} (../shared/data/sr)")


def test_patches_are_aligned_lr_hr_pairs():
    img = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    pairs = sr_training.planes([img], 4)
    assert len(pairs) == 3 and pairs[0][0].shape == (10, 12) and pairs[0][1].shape == (40, 48)
    np.testing.assert_array_equal(pairs[1][0], resize.imresize(img, 0.25)[..., 1])
    lr, hr = sr_training.patch_batch(pairs, 4, 5, 8, np.random.default_rng(1))
    assert lr.shape == (5, 1, 8, 8) and hr.shape == (5, 1, 32, 32) and float(lr.max()) <= 1.0


def test_training_resumes_and_refuses_other_settings(tmp_path):
    kw = dict(scale=2, batch=2, patch=12, nf=4, depth=1, eval_every=10**9, progress=False, cache=str(tmp_path),
              max_images=2)
    first = sr_training.train(steps=4, max_minutes=1e-9, **kw)  # stops after its first step, resumable
    assert first["step"] == 1 and not first["done"] and os.path.isfile(tmp_path / "last.pt")
    done = sr_training.train(steps=4, **kw)
    assert done["step"] == 4 and done["done"] and os.path.isfile(tmp_path / "final.pt")
    with pytest.raises(CalibrationError, match="resume with those settings"):
        sr_training.train(steps=8, **kw)
