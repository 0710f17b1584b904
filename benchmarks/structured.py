"""Structured rewrites side by side: exact, DeBut butterfly chains, low rank (EVBMF ranks), EZCrop
channel pruning and PQ lookups, on LeNet-5 / MNIST and VGG-small / CIFAR-10 (JPEG).

    python benchmarks/structured.py               # both models, ~40-60 min on 2 cores
    python benchmarks/structured.py --only mnist  # or: cifar
    python benchmarks/structured.py --quick       # tiny subsets: checks the script end to end

Per model and method: parameters and multiplies of the conv/dense layers (``tvm_lut.math.cost`` counting,
per input sample), top-1 accuracy of the **compiled TVM model** on the full test set, whole-model
latency at batch 1 (exact TVM build and rewritten build, same process, one after the other), and how
many rewritten layers run slower than the exact layer they replace (``relay_passes.latency``: each layer
compiled alone, exact vs rewritten). Exact TVM builds are untuned (TVM's default CPU lowering); issue 5
brings tuned baselines, so latency ratios here are indicative only.

Recipes: DeBut and low rank are initialised from the trained model (ALS; truncated SVD/HOSVD at EVBMF
ranks) and fine-tuned in torch with distillation from the exact model, then handed to the compiler
(``structured_nn.structured_options``; low-rank weights are refactorised exactly at the same ranks).
EZCrop prunes half of every prunable conv's channels by FFT energy ratio with the Relax pass, the torch
twin of the pruned model is fine-tuned the same way, and the compiled model is the pass's output with the
fine-tuned weights (the torch twin; tests check it computes what the pass emits). PQ is post-training k-means (L2, K=16) with no fine-tuning (learned centroids: see
accuracy.py). The first conv (1 or 3 input channels) and, for DeBut and low rank, the last (classifier) layer stay
exact: EVBMF gives the 10-class output layer rank 1, which no fine-tuning recovers from.

Writes benchmarks/results/structured.json and structured.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from accuracy import CACHE, RESULTS, loader, log, shared_data_present, trained  # noqa: E402

import tvm_lut  # noqa: E402
from relay_passes import EZCrop, LUTify, ezcrop, latency  # noqa: E402
from tvm_lut.app import pipeline
from tvm_lut.math import channel_energy  # noqa: E402
from tvm_lut.runtime.build import BatchRunner, compile_with_params, resolve_target  # noqa: E402
from tvm_lut.train import datasets, models, structured_nn as sn  # noqa: E402


def compiled_eval(mod, test_x, test_y, batch: int, **lutify_kw) -> dict:
    """Rewrite with LUTify, build, measure accuracy (TVM, whole test set), counts, per-layer times,
    and batch-1 latency of this build."""
    tgt = resolve_target("x86")
    p = LUTify(target=tgt, progress=False, **lutify_kw)
    p_res = p.run(mod)
    out = p_res.module
    ex, params = compile_with_params(out, tgt)
    sig = [("x", (batch, *test_x.shape[1:]), "float32")]
    logits = BatchRunner(ex, [v for _, v in params], sig).run({"x": test_x})[0]
    latency.measure_layers(p_res.plans, tgt)
    t = pipeline.totals(p_res.layers)
    slower = [r["name"] for r in p_res.layers if r.get("slower_than_exact")]
    return {"acc": models.accuracy(logits, test_y), "params": t["params"], "exact_params": t["exact_params"],
            "mul": t["lut_mul"], "exact_mul": t["exact_mul"], "slower_layers": slower,
            "rewritten": [r["name"] for r in p_res.layers if r["method"] != "exact"],
            "layers": [{k: r.get(k) for k in ("name", "method", "chain", "ranks", "form", "latency", "reason")}
                       for r in p_res.layers], "module": out}


def batch1_latency(mod) -> float:
    tgt = resolve_target("x86")
    x = mod["main"].params[0]
    shape = tuple(int(d) for d in x.ty.shape)
    ex, params = compile_with_params(mod, tgt)
    return BatchRunner(ex, [v for _, v in params], [("x", shape, "float32")]).latency_ms()


METHODS = ("butterfly", "lowrank", "ezcrop", "pq")


def case(rows, *, dataset, name, model, tx, ty, vx, vy, first, last, ft_epochs, ft_lr, bs, butterfly_budget,
         quick, methods=METHODS, transform=None, calib_n=512, lowrank_epochs=None, rank="evbmf"):
    """Every method on one trained model; appends rows."""
    t0 = time.time()
    exact_acc = models.accuracy(models.predict(model, vx), vy)
    x1 = torch.from_numpy(vx[:1])
    batch = 100
    mod = tvm_lut.from_torch(model, torch.from_numpy(vx[:batch]))
    base = compiled_eval(mod, vx[:batch], vy[:batch], batch, method="exact")
    exact_lat = batch1_latency(tvm_lut.from_torch(model, x1))
    rows.append({"dataset": dataset, "model": name, "method": "exact", "acc": exact_acc, "exact_acc": exact_acc,
                 "params": base["exact_params"], "mul": base["exact_mul"], "exact_params": base["exact_params"],
                 "exact_mul": base["exact_mul"], "latency_ms": exact_lat, "exact_latency_ms": exact_lat,
                 "slower_layers": [], "seconds": time.time() - t0})
    log(f"{name} exact: {exact_acc:.2f}%, {base['exact_params']} params, {base['exact_mul']} mul, {exact_lat:.3f} ms")
    calib = tx[np.random.default_rng(1).permutation(len(tx))[:calib_n]]

    def finish(method, lut_mod_fn, extra, t):
        res = lut_mod_fn()
        lat = batch1_latency(res.pop("lat_module"))
        row = {"dataset": dataset, "model": name, "method": method, "acc": res["acc"], "exact_acc": exact_acc,
               "params": res["params"], "mul": res["mul"], "exact_params": base["exact_params"],
               "exact_mul": base["exact_mul"], "latency_ms": lat, "exact_latency_ms": exact_lat,
               "slower_layers": res["slower_layers"], "layers": res["layers"], "seconds": time.time() - t, **extra}
        rows.append(row)
        log(f"{name} {method}: {row['acc']:.2f}% (drop {exact_acc - row['acc']:+.2f}), params "
            f"-{1 - row['params'] / row['exact_params']:.1%}, mul -{1 - row['mul'] / row['exact_mul']:.1%}, "
            f"{lat:.3f} ms vs {exact_lat:.3f} ms, slower layers {row['slower_layers']} [{row['seconds']:.0f} s]")

    steps = 30 if quick else None
    train = loader(tx, ty, bs, steps * bs if steps else None)
    kw = dict(epochs=ft_epochs, lr_=ft_lr, teacher=model, distill=0.5, transform=transform, progress=False)

    # DeBut and low rank: torch conversion + fine-tuning, then the compiler takes the factors
    for method, conv_kw in (("butterfly", {"budget": butterfly_budget}), ("lowrank", {"rank": rank})):
        if method not in methods:
            continue
        t = time.time()
        conv = sn.convert(model, method, exclude=[first, last], **conv_kw)
        epochs = lowrank_epochs if (method == "lowrank" and lowrank_epochs) else ft_epochs
        tuned, losses = sn.finetune(conv, train, **{**kw, "epochs": epochs})
        layers, factors = sn.structured_options(tuned)
        dense = sn.to_exact(tuned)

        def run(dense=dense, layers=layers, factors=factors):
            m = tvm_lut.from_torch(dense, torch.from_numpy(vx[:batch]))
            r = compiled_eval(m, vx, vy, batch, method="exact", layers=layers, factors=factors)
            r["lat_module"] = LUTify(method="exact", layers=layers, factors=factors, progress=False)(
                tvm_lut.from_torch(dense, x1))
            return r

        extra = {"finetune_losses": losses, "finetune_epochs": epochs,
                 "layer_options": {k: v for k, v in layers.items()}}
        if method == "lowrank":
            extra["ranks"] = {k: v["rank"] for k, v in layers.items()}
        finish(method if method == "butterfly" else f"lowrank-{rank}", run, extra, t)

    # EZCrop: the pass chooses and removes channels; the torch twin is fine-tuned; the pass's module
    # (names kept) is rebuilt from the fine-tuned weights
    if "ezcrop" in methods:
        ezcrop_case(finish, mod, model, calib, train, kw, vx, vy, batch, x1)
    if "pq" in methods:
        t = time.time()

        def run_pq():
            r = compiled_eval(mod, vx, vy, batch, calibration={"x": calib}, layers={first: "exact"}, all_layers=True)
            r["lat_module"] = LUTify({"x": calib}, layers={first: "exact"}, all_layers=True, progress=False)(
                tvm_lut.from_torch(model, x1))
            return r

        finish("pq-kmeans", run_pq, {}, t)


def ezcrop_case(finish, mod, model, calib, train, kw, vx, vy, batch, x1):
    t = time.time()
    pruned_mod = EZCrop(calib, 0.5)(mod)
    crop_records = ezcrop.records(pruned_mod)
    before = compiled_eval(pruned_mod, vx, vy, batch, method="exact")["acc"]
    twin = channel_energy.prune_torch(model, crop_records)
    tuned, losses = sn.finetune(twin, train, **kw)

    def run_ez():
        m = tvm_lut.from_torch(tuned, torch.from_numpy(vx[:batch]))
        r = compiled_eval(m, vx, vy, batch, method="exact")
        r["lat_module"] = tvm_lut.from_torch(tuned, x1)
        return r

    finish("ezcrop-50%", run_ez, {"acc_before_finetune": before, "finetune_losses": losses,
                                  "kept": {r["name"]: r["kept"] for r in crop_records if r.get("pruned")}}, t)


def mnist(rows, quick, methods):
    d = datasets.load_mnist()
    tx, ty = models.normalize_mnist(d["train_images"]), d["train_labels"]
    vx, vy = models.normalize_mnist(d["test_images"]), d["test_labels"]
    if quick:
        tx, ty, vx, vy = tx[:3000], ty[:3000], vx[:500], vy[:500]
    lenet, _ = trained("lenet5_mnist", models.LeNet5, tx, ty, epochs=1 if quick else 3, progress=False)
    case(rows, dataset="MNIST", name="LeNet-5", model=lenet, tx=tx, ty=ty, vx=vx, vy=vy, first="features.0",
         last="classifier.4", ft_epochs=2, ft_lr=1e-3, bs=64, butterfly_budget=0.15, quick=quick, methods=methods)


def cifar(rows, quick, methods, lowrank_epochs=None, rank="evbmf"):
    tx, ty = datasets.load_cifar10("train", limit=2000 if quick else None)
    vx, vy = datasets.load_cifar10("test", limit=500 if quick else None)
    vgg, _ = trained("vggsmall_cifar", models.VGGSmall, tx, ty, epochs=1 if quick else 12, batch_size=128, lr=0.05,
                     optimizer="sgd", augment=True, weight_decay=5e-4, progress=False)
    case(rows, dataset="CIFAR-10 (JPEG)", name="VGG-small", model=vgg, tx=tx, ty=ty, vx=vx, vy=vy,
         first="features.0", last="classifier.2", ft_epochs=2, ft_lr=1e-3, bs=64, butterfly_budget=0.25,
         quick=quick, methods=methods, transform=models.random_crop_flip, lowrank_epochs=lowrank_epochs, rank=rank)


def markdown(rows) -> str:
    out = ["| dataset | model | method | accuracy % | drop | params | params removed | multiplies | mult. removed | "
           "batch-1 latency (exact) | layers slower than exact |", "|" + "---|" * 11]
    for r in rows:
        label = r["method"] + (f" ({r['finetune_epochs']} ep.)" if r.get("finetune_epochs") else "")
        out.append(f"| {r['dataset']} | {r['model']} | {label} | {r['acc']:.2f} | {r['exact_acc'] - r['acc']:+.2f} | "
                   f"{r['params']:,} | {1 - r['params'] / r['exact_params']:.1%} | {r['mul']:,} | "
                   f"{1 - r['mul'] / r['exact_mul']:.1%} | {r['latency_ms']:.3f} ms ({r['exact_latency_ms']:.3f} ms) | "
                   f"{', '.join(r['slower_layers']) or 'none'} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["mnist", "cifar"], default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--lowrank-epochs", type=int, default=None,
                    help="CIFAR low-rank fine-tuning epochs (default: 2, like the other methods)")
    ap.add_argument("--rank", default="evbmf", help="CIFAR low-rank rule: evbmf (default) or energy=F (NRMF's threshold)")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="comma-separated subset of " + ",".join(METHODS) + " (the exact row is always measured); "
                         "rows replace the matching ones in the JSON")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    if not shared_data_present(args.only):
        return 1
    os.makedirs(CACHE, exist_ok=True)
    rows: list = []
    t0 = time.time()
    methods = tuple(m.strip() for m in args.methods.split(","))
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        print(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}", file=sys.stderr)
        return 2
    if args.only in (None, "mnist"):
        mnist(rows, args.quick, methods)
    if args.only in (None, "cifar"):
        cifar(rows, args.quick, methods, args.lowrank_epochs, args.rank)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"structured{'_quick' if args.quick else ''}.json")
    if args.only and os.path.isfile(path):  # a partial run replaces its own dataset's rows
        with open(path) as f:
            old = json.load(f)["rows"]
        mine = {(r["dataset"], r["method"]) for r in rows}
        rows = [r for r in old if (r["dataset"], r["method"]) not in mine] + rows
        order = ["exact", "butterfly", "lowrank", "ezcrop", "pq"]
        rows.sort(key=lambda r: (not r["dataset"].startswith("MNIST"),
                                 next(i for i, o in enumerate(order) if r["method"].startswith(o)), r["method"]))
    with open(path, "w") as f:
        json.dump({"rows": rows, "threads": torch.get_num_threads(), "wall_s": time.time() - t0}, f, indent=1)
    md = markdown(rows)
    with open(path.replace(".json", ".md"), "w") as f:
        f.write(md)
    print(md)
    log(f"done in {time.time() - t0:.0f} s; wrote {path} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
