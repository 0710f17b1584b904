"""Tutorial 5 -- one model, three targets: x86, a simulated CAM, and aarch64 on a local device farm.

Run:  python tutorials/05_targets_arm_farm_cam.py            (about 1 min; the ARM part needs the emulator)
      python tutorials/05_targets_arm_farm_cam.py --tiny

1. ``--target x86`` and ``--target cam`` with the multiplier-free L1 distance (PECAN-D): the CAM build runs
   each PQ layer's nearest-centroid search and table readout in the simulator (``tvm_lut.targets.cam_simulator``), and its
   predictions are the x86 build's, bit for bit. ``tvm-lut report`` shows what the CAM did per layer.
2. ``--target arm``: cross-compiled for aarch64 (NEON ``tbl`` lookups). If ``tvm-lut farm setup-arm`` has
   been run (as root, once), a farm with one emulated arm64 server runs it and we compare with x86.

The equivalent commands::

    tvm-lut compile model.pt2 --calib calib.npz --target cam --distance l1 -o out-cam/
    tvm-lut report out-cam/
    tvm-lut farm setup-arm && tvm-lut farm start --arm 1
    tvm-lut compile model.pt2 --calib calib.npz --target arm -o out-arm/
    tvm-lut run out-arm/ --input data.npz --output pred.npz --farm HOST:PORT --key arm64
    tvm-lut farm stop
"""

import argparse
import os
import subprocess
import sys

import numpy as np
import torch

from tvm_lut.runtime.artifact import Model
from tvm_lut.targets import arm_emulator
from tvm_lut.train import models


def sh(*args: str) -> str:
    print("$ tvm-lut " + " ".join(args))
    res = subprocess.run([sys.executable, "-m", "tvm_lut.app.cli", *args], check=True, capture_output=True, text=True)
    print(res.stdout)
    return res.stdout


def main(tiny: bool = False, out: str = "tutorial5_out") -> dict:
    os.makedirs(out, exist_ok=True)
    data = models.load_mnist_subset()
    n_train = 3000 if tiny else 12000
    model = models.train_classifier(models.LeNet5(), data["train_images"][:n_train],
                                    data["train_labels"][:n_train], epochs=1 if tiny else 3, progress=False)
    x = models.normalize_mnist(data["train_images"][:1]).reshape(1, 1, 28, 28)
    pt2 = os.path.join(out, "lenet5.pt2")
    torch.export.save(torch.export.export(model.eval(), (torch.from_numpy(x),)), pt2)
    n_cal = 300 if tiny else 1500
    calib = os.path.join(out, "calib.npz")
    np.savez(calib, x=models.normalize_mnist(data["train_images"][:n_cal]).reshape(-1, 1, 28, 28),
             labels=data["train_labels"][:n_cal])
    test = models.normalize_mnist(data["test_images"][:50 if tiny else 500]).reshape(-1, 1, 28, 28)

    results = {}
    for target in ("x86", "cam"):
        art = os.path.join(out, target)
        sh("compile", pt2, "--calib", calib, "--target", target, "--distance", "l1", "--all-layers", "-o", art, "-q",
           "--no-latency")
        results[target] = Model(art).run({"x": test})["output"]
    same = np.array_equal(results["x86"], results["cam"])
    print(f"cam vs x86 on {len(test)} test images: outputs identical: {same}")
    sh("report", os.path.join(out, "cam"))

    art = os.path.join(out, "arm")
    sh("compile", pt2, "--calib", calib, "--target", "arm", "--all-layers", "-o", art, "-q", "--no-latency")
    reason = arm_emulator.unavailable_reason()
    if reason:
        print(f"skipping the aarch64 run: {reason}")
        return {"cam_identical": same, "arm_identical": None}
    from tvm_lut.runtime.artifact import run_remote
    from tvm_lut.targets.farm import Farm

    os.environ.setdefault("TVM_LUT_FARM_DIR", os.path.join(out, "farm"))
    farm = Farm().start(x86=0, arm=1)
    try:
        x86_art = os.path.join(out, "x86-l2")
        sh("compile", pt2, "--calib", calib, "--all-layers", "-o", x86_art, "-q", "--no-latency")
        on_arm = run_remote(art, {"x": test}, farm.address, "arm64")["output"]
        on_x86 = Model(x86_art).run({"x": test})["output"]
    finally:
        farm.stop()
    arm_same = np.array_equal(on_arm.argmax(1), on_x86.argmax(1))
    print(f"aarch64 (qemu) vs x86 on {len(test)} images: same predictions: {arm_same}, "
          f"max |difference| {np.abs(on_arm - on_x86).max():.3g}")
    return {"cam_identical": same, "arm_identical": arm_same}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default="tutorial5_out")
    a = ap.parse_args()
    main(a.tiny, a.out)
