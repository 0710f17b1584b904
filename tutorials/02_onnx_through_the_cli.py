"""Tutorial 2 -- an ONNX model through the ``tvm-lut`` command line.

Run:  python tutorials/02_onnx_through_the_cli.py            (about 40 s)
      python tutorials/02_onnx_through_the_cli.py --tiny

Any ONNX classifier works the same way; here we export a LeNet-5 from PyTorch with a fixed batch of 1
(as many edge models are) and write the two files the CLI needs:

* ``calib.npz``: one array per model input, named like the input (here ``image``), plus an optional
  ``labels`` array: a fifth of the labelled rows is held back to measure exact vs LUT accuracy;
* ``data.npz``: the inputs to run. ``tvm-lut run`` feeds them through the batch-1 model one by one.

Then:  tvm-lut compile model.onnx --calib calib.npz --target x86 -o out/ --all-layers
       tvm-lut run out/ --input data.npz --output pred.npz
       tvm-lut report out/
"""

import argparse
import os
import subprocess
import sys

import numpy as np
import torch

from tvm_lut.train import models


def sh(*args: str) -> str:
    print("$ tvm-lut " + " ".join(args))
    res = subprocess.run([sys.executable, "-m", "tvm_lut.app.cli", *args], check=True, capture_output=True, text=True)
    print(res.stdout)
    return res.stdout


def main(tiny: bool = False, out: str = "tutorial2_out") -> dict:
    os.makedirs(out, exist_ok=True)
    data = models.load_mnist_subset()
    n_train = 6000 if tiny else 12000
    model = models.train_classifier(models.LeNet5(), data["train_images"][:n_train],
                                    data["train_labels"][:n_train], epochs=3, progress=False)
    onnx_path = os.path.join(out, "lenet5.onnx")
    torch.onnx.export(model, (torch.zeros(1, 1, 28, 28),), onnx_path, input_names=["image"],
                      output_names=["logits"], dynamo=False)
    n_cal = 300 if tiny else 1500
    np.savez(os.path.join(out, "calib.npz"), image=data["train_images"][:n_cal], labels=data["train_labels"][:n_cal])
    n_run = 50 if tiny else 2000
    np.savez(os.path.join(out, "data.npz"), image=data["test_images"][:n_run], labels=data["test_labels"][:n_run])

    art = os.path.join(out, "artifact")
    sh("compile", onnx_path, "--calib", os.path.join(out, "calib.npz"), "--target", "x86", "-o", art,
       "--all-layers", "-q")
    sh("run", art, "--input", os.path.join(out, "data.npz"), "--output", os.path.join(out, "pred.npz"))
    sh("report", art)
    pred = np.load(os.path.join(out, "pred.npz"))
    return {k: pred[k] for k in pred.files}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default="tutorial2_out")
    a = ap.parse_args()
    main(a.tiny, a.out)
