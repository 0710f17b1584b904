"""Tutorial 6 -- super-resolution by whole-network lookup tables (HKLUT): train, tabulate, upscale a PNG.

Run:  python tutorials/06_super_resolution_tables.py            (a few minutes: a short training run)
      python tutorials/06_super_resolution_tables.py --tiny     (seconds, for the test suite)

Needs ../shared/data/sr (T91 to train on, Set5 to look at). The same steps on the command line:

    tvm-lut sr train --scale 4 --steps 2000 --nf 32            # resumable; ~/.cache/tvm-lut/sr/x4/
    tvm-lut sr compile ~/.cache/tvm-lut/sr/x4 -o x4-tables/
    tvm-lut sr upscale lr.png -o x4.png --scale 4 --model x4-tables/
    tvm-lut sr eval x4-tables/ --set set5

1. Train an HKLUT network: each 8-bit pixel split into its high and low nibbles; three 3-pixel patterns see the
   high nibbles, two 2-pixel patterns the low ones, each at 4 rotations; x4 is two x2 stages.
2. Tabulate it: every pattern's small network evaluated on all 16^3 (or 16^2) nibble combinations -> int8
   tables, 102,400 bytes in all.
3. Upscale a PNG with the compiled lookup kernels and compare with bicubic on the field's protocol (Y PSNR).
   A short run does not beat bicubic: the published tables train for 200k steps.
"""

import argparse
import os

import numpy as np
from PIL import Image

from tvm_lut.app import cli
from tvm_lut.math import image_quality, resize
from tvm_lut.train import sr_training


def main(tiny: bool = False, out: str = "tutorial6_out") -> dict:
    os.makedirs(out, exist_ok=True)
    # 1. train (a checkpoint a later run resumes from); tiny: a few steps of a narrow network on 4 images
    ckpt = os.path.join(out, "checkpoint")
    state = sr_training.train(scale=4, steps=20 if tiny else 2000, nf=8 if tiny else 32, depth=1 if tiny else 4,
                              batch=4 if tiny else 16, patch=16 if tiny else 32, eval_every=10**9,
                              max_images=4 if tiny else None, progress=not tiny, cache=ckpt)
    # 2. tabulate
    tables = os.path.join(out, "tables")
    cli.main(["sr", "compile", ckpt, "-o", tables])
    # 3. an LR image made as the field makes it (MATLAB bicubic), upscaled through the compiled tables
    _, hr = sr_training.load_set("set5")[1]  # bird
    hr = image_quality.modcrop(hr, 4)
    lr = resize.imresize(hr, 0.25)
    Image.fromarray(lr).save(os.path.join(out, "lr.png"))
    cli.main(["sr", "upscale", os.path.join(out, "lr.png"), "-o", os.path.join(out, "x4.png"), "--model", tables])
    ours = np.asarray(Image.open(os.path.join(out, "x4.png")))
    res = {"steps": state["step"], "shape": ours.shape, "psnr": image_quality.psnr(ours, hr, 4),
           "bicubic_psnr": image_quality.psnr(resize.imresize(lr, 4), hr, 4)}
    print(f"bird x4: tables {res['psnr']:.2f} dB, bicubic {res['bicubic_psnr']:.2f} dB after {res['steps']} steps")
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    main(tiny=ap.parse_args().tiny)
