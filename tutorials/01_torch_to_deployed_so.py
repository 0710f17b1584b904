"""Tutorial 1 -- a PyTorch model through ``relay.transform.LUTify()`` to a deployed ``.so``.

Run:  python tutorials/01_torch_to_deployed_so.py            (about 20 s)
      python tutorials/01_torch_to_deployed_so.py --tiny     (smaller, for the test suite)

Steps: train a LeNet-5 on the MNIST subset shipped with tvm-lut, import it with torch.export, rewrite
its conv/dense layers into table lookups, build for this x86 host, export ``model.so``, and load it
back with nothing but the TVM runtime, as a deployment would.
"""

import argparse
import os

import numpy as np
import torch
import tvm
from tvm import relax

import tvm_lut
from tvm_lut import relay
from tvm_lut.train import models


def main(tiny: bool = False, out: str = "tutorial1_out") -> tuple[float, float]:
    # 1. A trained model. Any nn.Module works; torch.export needs example inputs of the deployed shape.
    data = models.load_mnist_subset()
    n_train = 6000 if tiny else 12000
    model = models.train_classifier(models.LeNet5(), data["train_images"][:n_train],
                                    data["train_labels"][:n_train], epochs=3, progress=False)
    batch = 8
    example = torch.from_numpy(data["test_images"][:batch])

    # 2. Import. Weights keep their torch names: layers are called features.0, features.3, classifier.0 ...
    mod = tvm_lut.from_torch(model, example)

    # 3. LUTify: learn K=16 centroids per subspace from real layer inputs, then replace each layer by
    #    encode (nearest centroid) + table accumulate. Narrow layers (M <= K) stay exact unless forced.
    lutify = relay.transform.LUTify(calibration=data["train_images"][: 512 if tiny else 2048], progress=False)
    res = lutify.run(mod)
    mod = res.module
    for rec in res.layers:
        print(f"  {rec['name']:13s} {rec['method']:5s} {rec.get('reason', '')}")

    # 4. Build for this CPU and export one self-contained shared library.
    lib = tvm_lut.build(mod, target="x86")
    os.makedirs(out, exist_ok=True)
    so = os.path.join(out, "model.so")
    lib.export_library(so)

    # 5. Deploy: load the .so with the plain TVM runtime and run the test images batch by batch.
    vm = relax.VirtualMachine(tvm.runtime.load_module(so), tvm.cpu())
    test_x, test_y = data["test_images"], data["test_labels"]
    n = (len(test_x) // batch) * batch
    preds = [vm["main"](tvm.runtime.tensor(test_x[i : i + batch])).numpy().argmax(1) for i in range(0, n, batch)]
    acc = float((np.concatenate(preds) == test_y[:n]).mean() * 100)
    with torch.no_grad():
        exact = models.accuracy(model(torch.from_numpy(test_x[:n])).numpy(), test_y[:n])
    print(f"exact (PyTorch) {exact:.2f}%   LUT (deployed .so) {acc:.2f}%   -> {so}")
    return exact, acc


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default="tutorial1_out")
    a = ap.parse_args()
    main(a.tiny, a.out)
