"""Tutorial 3 -- learned centroids (LUT-NN / PECAN-D) and a priority-mask budget (TabConv).

Run:  python tutorials/03_learned_centroids_and_budget.py            (about 1-2 min)
      python tutorials/03_learned_centroids_and_budget.py --tiny     (smaller, for the test suite)

1. Train a LeNet-5 on the MNIST subset shipped with tvm-lut.
2. Post-training k-means codebooks for every layer: the baseline.
3. ``lutnn.finetune``: replace each conv/dense by a lookup layer and learn its centroids by backprop
   (hard nearest-centroid forward, soft-assignment backward with a learned temperature, int8 tables in
   the loop), here with the multiplier-free L1 distance (PECAN-D).
4. Compile the fine-tuned weights with ``LUTify(codebooks=...)``: the compiled model computes the same
   codes and tables as the torch lookup layers.
5. ``LUTify(budget="max-drop=1.0")``: let the priority mask keep the most sensitive layers exact.
"""

import argparse

import numpy as np
import torch

import tvm_lut
from relay_passes import LUTify
from tvm_lut.runtime.build import BatchRunner, compile_with_params, resolve_target
from tvm_lut.train import lutnn, models


def accuracy_of(mod, x, y, batch) -> float:
    ex, params = compile_with_params(mod, resolve_target("x86"))
    logits = BatchRunner(ex, [v for _, v in params], [("x", (batch, 1, 28, 28), "float32")]).run({"x": x})[0]
    return models.accuracy(logits, y)


def main(tiny: bool = False, out: str | None = None) -> dict:  # noqa: ARG001 (same signature as the others)
    data = models.load_mnist_subset()
    n_train = 4000 if tiny else 12000
    tx, ty = data["train_images"][:n_train], data["train_labels"][:n_train]
    vx, vy = data["test_images"][: 500 if tiny else 2000], data["test_labels"][: 500 if tiny else 2000]
    model = models.train_classifier(models.LeNet5(), tx, ty, epochs=2 if tiny else 3, progress=False)
    batch = 50
    exact = models.accuracy(models.predict(model, vx), vy)
    mod = tvm_lut.from_torch(model, torch.from_numpy(vx[:batch]))

    # 2. post-training k-means, every layer, L1 encoder
    kmeans = accuracy_of(LUTify({"x": tx[:1024]}, all_layers=True, distance="l1", progress=False)(mod), vx, vy, batch)

    # 3. learn the centroids (and fine-tune the weights) on the training data
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.from_numpy(tx), torch.from_numpy(ty)),
                                         batch_size=64, shuffle=True, drop_last=True)
    result = lutnn.finetune(model, loader, epochs=1, distance="l1", max_steps=40 if tiny else None,
                            progress=not tiny)

    # 4. compile the fine-tuned weights with the learned codebooks
    tuned = tvm_lut.from_torch(lutnn.to_exact(result.model), torch.from_numpy(vx[:batch]))
    learned = accuracy_of(LUTify(codebooks=result.codebooks, progress=False)(tuned), vx, vy, batch)
    with torch.no_grad():
        torch_lut = models.accuracy(result.model(torch.from_numpy(vx)).numpy(), vy)

    # 5. a budget: at most 1 point lost on held-out calibration samples; sensitive layers stay exact
    calib = {"x": tx[-1000:], "labels": ty[-1000:]}
    masked_pass = LUTify(calib, budget="max-drop=1.0", distance="l1", progress=False)
    masked_run = masked_pass.run(mod)  # the module and what the pass decided per layer
    masked = accuracy_of(masked_run.module, vx, vy, batch)
    kept = [r["name"] for r in masked_run.layers if r["method"] != "pq"]

    res = {"exact": exact, "kmeans_l1": kmeans, "learned_l1": learned, "learned_l1_torch": torch_lut,
           "budget_1pt": masked, "kept_exact": kept}
    print(f"exact {exact:.2f}%   k-means L1 {kmeans:.2f}%   learned L1 {learned:.2f}% "
          f"(torch lookup layers: {torch_lut:.2f}%)   max-drop=1.0 mask {masked:.2f}% with {kept} exact")
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    np.set_printoptions(precision=3)
    main(tiny=args.tiny)
