"""Tutorial 4 -- structured rewrites: DeBut butterfly chains, low rank with EVBMF ranks, EZCrop pruning.

Run:  python tutorials/04_butterfly_lowrank_ezcrop.py            (about 2 min)
      python tutorials/04_butterfly_lowrank_ezcrop.py --tiny     (smaller, for the test suite)

1. Train a LeNet-5 on the MNIST subset shipped with tvm-lut.
2. Post-training, straight in the compiler: ``LUTify(method="lowrank")`` (EVBMF ranks) and
   ``LUTify(method="butterfly")`` (ALS from the weights), no data needed.
3. With fine-tuning: ``structured_nn.convert`` -> ``finetune`` (distilled from the exact model) ->
   ``structured_options`` + ``to_exact`` -> ``LUTify(method="exact", layers=..., factors=...)``.
4. ``EZCrop``: remove half of the conv channels by FFT energy ratio, physically.
5. ``measure_layers``: every rewritten layer timed against the exact layer it replaces.
"""

import argparse

import numpy as np
import torch

import tvm_lut
from relay_passes import EZCrop, LUTify, latency
from tvm_lut.app import pipeline
from tvm_lut.runtime.build import BatchRunner, compile_with_params, resolve_target
from tvm_lut.train import models, structured_nn as sn

KEEP = ["features.0", "classifier.4"]  # first conv (1 input channel) and the 10-way classifier stay exact


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
    res = {"exact": exact}

    # 2. post-training rewrites in the compiler
    keep = {n: "exact" for n in KEEP}
    for method in ("lowrank", "butterfly"):
        p = LUTify(method=method, layers=keep, progress=False)
        run = p.run(mod)
        res[f"{method}_post"] = accuracy_of(run.module, vx, vy, batch)
        res[f"{method}_post_params_removed"] = pipeline.totals(run.layers)["params_removed_frac"]

    # 3. fine-tuned DeBut chains (15 % of each layer's parameters), then compiled
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.from_numpy(tx), torch.from_numpy(ty)),
                                         batch_size=64, shuffle=True, drop_last=True)
    chains = sn.convert(model, "butterfly", budget=0.15, exclude=KEEP)
    tuned, _ = sn.finetune(chains, loader, epochs=2 if tiny else 3, lr_=3e-3, teacher=model, progress=not tiny)
    layers, factors = sn.structured_options(tuned)
    fine = LUTify(method="exact", layers=layers, factors=factors, progress=False)
    fine_res = fine.run(tvm_lut.from_torch(sn.to_exact(tuned), torch.from_numpy(vx[:batch])))
    fine_mod = fine_res.module
    res["butterfly_tuned"] = accuracy_of(fine_mod, vx, vy, batch)
    with torch.no_grad():
        res["butterfly_tuned_torch"] = models.accuracy(tuned(torch.from_numpy(vx)).numpy(), vy)
    res["butterfly_tuned_params_removed"] = pipeline.totals(fine_res.layers)["params_removed_frac"]

    # 4. EZCrop: half the channels of both convs, removed from the module
    pruned = EZCrop(tx[:256], 0.5)(mod)
    res["ezcrop_post"] = accuracy_of(pruned, vx, vy, batch)

    # 5. measured per layer: is each rewrite faster than the exact layer?
    latency.measure_layers(fine_res.plans)
    res["slower_than_exact"] = [r["name"] for r in fine_res.layers if r.get("slower_than_exact")]

    print(f"exact {exact:.2f}%")
    print(f"post-training, in the compiler: low rank {res['lowrank_post']:.2f}% "
          f"({res['lowrank_post_params_removed']:.0%} params removed), butterfly {res['butterfly_post']:.2f}% "
          f"({res['butterfly_post_params_removed']:.0%})")
    print(f"fine-tuned DeBut: {res['butterfly_tuned']:.2f}% compiled ({res['butterfly_tuned_torch']:.2f}% in torch), "
          f"{res['butterfly_tuned_params_removed']:.0%} params removed; slower than exact: "
          f"{res['slower_than_exact'] or 'none'}")
    print(f"EZCrop 50 %, no fine-tuning: {res['ezcrop_post']:.2f}%")
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    np.set_printoptions(precision=3)
    main(tiny=args.tiny)
