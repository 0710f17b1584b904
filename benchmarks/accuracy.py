"""Accuracy tables: post-training k-means vs learned centroids (LUT-NN / PECAN), and the priority-mask sweep.

    python benchmarks/accuracy.py                 # everything (MNIST + CIFAR-10), ~1-2 h on 2 cores
    python benchmarks/accuracy.py --only mnist    # or: cifar
    python benchmarks/accuracy.py --quick         # tiny subsets and steps: checks the script end to end

Data: ../shared/data/mnist and ../shared/data/cifar10_jpeg (a lossy JPEG re-encoding of CIFAR-10, so
retention is reported against our own exact model trained on the same data, not against papers).
Exact models are trained by this script (recipes below) and cached as .npz in benchmarks/results/cache.

Every LUT accuracy is measured by running the **compiled TVM model** (LUTify + build) on the full test
set; the exact accuracy is the PyTorch model's on the same test set (TVM's exact build gives the same
predictions; its untuned CPU conv lowering would only cost minutes here). Columns as TabConv / LUT-NN
report them: exact accuracy, LUT accuracy, retention (LUT / exact), fraction of multiplies removed
(``tvm_lut.math.cost`` counting), LUT bytes (int8 tables + codebooks) vs the fp32 weights of those layers.

Writes benchmarks/results/accuracy.json, accuracy.md and accuracy.png (accuracy vs multiplies removed).
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

import tvm_lut  # noqa: E402
from relay_passes import MASK_ATTR, LUTify, PriorityMask  # noqa: E402
from tvm_lut.app import pipeline
from tvm_lut.runtime.build import BatchRunner, compile_with_params, resolve_target  # noqa: E402
from tvm_lut.train import datasets, lutnn, models  # noqa: E402

RESULTS = os.path.join(HERE, "results")
CACHE = os.path.join(RESULTS, "cache")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def shared_data_present(only: str | None) -> bool:
    """Whether ../shared/data has what the ``--only`` part (None: both) needs; says what is missing."""
    for part, sub in (("mnist", "mnist"), ("cifar", "cifar10_jpeg")):
        if only in (None, part) and not os.path.isdir(os.path.join(datasets.SHARED_DATA, sub)):
            print(f"{sub} not found under {datasets.SHARED_DATA}: this benchmark needs ../shared/data", file=sys.stderr)
            return False
    return True


def trained(name: str, make, x, y, **train_kw):
    """Train (or load from the cache) an exact model; returns (model, seconds spent training now)."""
    os.makedirs(CACHE, exist_ok=True)
    tag = "_".join(f"{k}{v}" for k, v in sorted(train_kw.items()) if k != "progress")
    path = os.path.join(CACHE, f"{name}_{tag}_n{len(x)}.npz")
    model = make()
    if os.path.isfile(path):
        log(f"{name}: cached exact model {os.path.basename(path)}")
        return models.load_state(model, path), 0.0
    t = time.time()
    model = models.train_classifier(model, x, y, **train_kw)
    models.save_state(model, path)
    return model, time.time() - t


def lut_accuracy(mod, test_x, test_y, batch: int, **lutify_kw) -> dict:
    """LUTify + build with TVM and measure top-1 on the test set with the compiled model."""
    tgt = resolve_target("x86")
    p = LUTify(target=tgt, progress=False, **lutify_kw)
    p_res = p.run(mod)
    lut_mod = p_res.module
    ex, params = compile_with_params(lut_mod, tgt)
    runner = BatchRunner(ex, [v for _, v in params], [("x", (batch, *test_x.shape[1:]), "float32")])
    logits = runner.run({"x": test_x})[0]
    t = pipeline.totals(p_res.layers)
    conv_w = sum(r["weight_bytes"] for r in p_res.layers if r["method"] == "pq")
    return {
        "lut_acc": models.accuracy(logits, test_y),
        "mul_removed": t["mul_removed_frac"],
        "lut_bytes": t["table_bytes"] + t["codebook_bytes"],
        "weight_bytes_converted": conv_w,
        "weight_bytes_model": t["weight_bytes"],
        "layers_lut": sum(r["method"] == "pq" for r in p_res.layers),
        "layers": len(p_res.layers),
    }


def loader(x, y, batch: int, limit: int | None, seed: int = 0):
    idx = np.random.default_rng(seed).permutation(len(x))[: limit or len(x)]
    ds = torch.utils.data.TensorDataset(torch.from_numpy(x[idx]), torch.from_numpy(y[idx]))
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True)


def run_case(rows: list, *, dataset, model_name, model, exact_acc, calib, test_x, test_y, batch, variants,
             exclude=(), finetune_kw=None, train_x=None, train_y=None, v=None):
    """k-means and learned variants of one exact model; appends table rows. ``v``: one subvector length
    for every LUT layer (None: LUT-NN's, 9 for 3x3 convs and 4 otherwise)."""
    mod = tvm_lut.from_torch(model, torch.from_numpy(test_x[:batch]))
    layer_opts = {n: "exact" for n in exclude}
    for method, distance in variants:
        t = time.time()
        if method == "kmeans":
            res = lut_accuracy(mod, test_x, test_y, batch, calibration={"x": calib}, distance=distance,
                               all_layers=True, layers=layer_opts, v=v)
            extra = {"fit_s": time.time() - t}
        else:
            kw = dict(finetune_kw or {})
            lim, bs = kw.pop("limit"), kw.pop("batch_size")
            tag = f"_{lim or 'all'}_{kw.get('max_steps') or 'all'}"
            if kw.get("epochs", 1) != 1:
                tag += f"_e{kw['epochs']}"
            if v:
                tag += f"_v{v}"
            if kw.get("weight_lr") is not None:
                tag += f"_wlr{kw['weight_lr']:g}"
            if kw.get("distill"):
                kw["teacher"] = model
                tag += f"_kd{kw['distill']}"
            else:
                kw.pop("distill", None)
            ft = lutnn.finetune(model, loader(train_x, train_y, bs, lim), distance=distance, exclude=list(exclude), v=v,
                                checkpoint_dir=os.path.join(CACHE, f"ckpt_{dataset.split()[0]}_{model_name}_{distance}"
                                                                   + tag), **kw)
            fit_s = time.time() - t
            mod_ft = tvm_lut.from_torch(lutnn.to_exact(ft.model), torch.from_numpy(test_x[:batch]))
            res = lut_accuracy(mod_ft, test_x, test_y, batch, codebooks=ft.codebooks, layers=layer_opts)
            extra = {"fit_s": fit_s, "finetune_steps": ft.steps, "finetune_images": ft.steps * bs,
                     "finetune_loss": ft.losses, "distill": kw.get("distill", 0.0),
                     "weight_lr": kw.get("weight_lr") or kw["lr"] * lutnn.WEIGHT_LR_FRACTION}
        row = {"dataset": dataset, "model": model_name, "centroids": method, "distance": distance, "v": v or "LUT-NN",
               "exact_acc": exact_acc, **res, "retention": res["lut_acc"] / exact_acc,
               "drop": exact_acc - res["lut_acc"], **extra}
        rows.append(row)
        log(f"{dataset} {model_name} {method} {distance}: exact {exact_acc:.2f} LUT {res['lut_acc']:.2f} "
            f"(drop {row['drop']:+.2f}) mul removed {res['mul_removed']:.1%} [{row['fit_s']:.0f} s]")


# ----------------------------------------------------------------------------------------------
# the experiments
# ----------------------------------------------------------------------------------------------


def mnist(rows: list, quick: bool) -> dict:
    d = datasets.load_mnist()
    tx, ty = models.normalize_mnist(d["train_images"]), d["train_labels"]
    vx, vy = models.normalize_mnist(d["test_images"]), d["test_labels"]
    if quick:
        tx, ty, vx, vy = tx[:3000], ty[:3000], vx[:1000], vy[:1000]
    calib = tx[np.random.default_rng(1).permutation(len(tx))[:2048]]
    info = {}
    steps = 60 if quick else None
    # LeNet-5: 3 epochs Adam on the 60k training images
    t = time.time()
    lenet, train_s = trained("lenet5_mnist", models.LeNet5, tx, ty, epochs=1 if quick else 3, progress=False)
    acc = models.accuracy(models.predict(lenet, vx), vy)
    info["lenet5"] = {"train_s": train_s, "recipe": f"Adam 1e-3, {1 if quick else 3} epochs, batch 64, {len(tx)} images"}
    log(f"LeNet-5 exact {acc:.2f}% ({time.time() - t:.0f} s)")
    ft = {"epochs": 1, "lr": 1e-3, "batch_size": 64, "limit": None, "max_steps": steps, "progress": False}
    run_case(rows, dataset="MNIST", model_name="LeNet-5", model=lenet, exact_acc=acc, calib=calib, test_x=vx,
             test_y=vy, batch=100, variants=[("kmeans", "l2"), ("learned", "l2"), ("learned", "l1")],
             finetune_kw=ft, train_x=tx, train_y=ty)
    # a small ResNet (ResNet-8: one basic block per stage, 16-32-64 channels), 2 epochs Adam
    make = lambda: models.CifarResNet(in_channels=1, blocks=1)
    t = time.time()
    rn, train_s = trained("resnet8_mnist", make, tx, ty, epochs=1 if quick else 2, progress=False)
    acc = models.accuracy(models.predict(rn, vx), vy)
    info["resnet8"] = {"train_s": train_s, "recipe": f"Adam 1e-3, {1 if quick else 2} epochs, batch 64, {len(tx)} images"}
    log(f"ResNet-8 exact {acc:.2f}% ({time.time() - t:.0f} s)")
    ft = {"epochs": 1, "lr": 1e-3, "batch_size": 32, "limit": 16000, "max_steps": steps, "progress": False}
    run_case(rows, dataset="MNIST", model_name="ResNet-8", model=rn, exact_acc=acc, calib=calib, test_x=vx,
             test_y=vy, batch=100, variants=[("kmeans", "l2"), ("learned", "l2")], finetune_kw=ft, train_x=tx,
             train_y=ty)
    # LUT-NN's V=9 (one channel's 3x3 patch per codebook) is coarse for the 3x3 convs; V=3 (one kernel row,
    # as on CIFAR-10) with the same recipe
    run_case(rows, dataset="MNIST", model_name="ResNet-8", model=rn, exact_acc=acc, calib=calib, test_x=vx,
             test_y=vy, batch=100, variants=[("learned", "l2")], finetune_kw=ft, train_x=tx, train_y=ty, v=3)
    return info


def cifar(rows: list, sweep: list, quick: bool, finetune_images: int, finetune_epochs: int | None = None,
          distill: float = 0.0, variants=None, v: int | None = None, weight_lr: float | None = None) -> dict:
    tx, ty = datasets.load_cifar10("train", limit=2000 if quick else None)
    vx, vy = datasets.load_cifar10("test", limit=500 if quick else None)
    t = time.time()
    epochs = 1 if quick else 10
    rn, train_s = trained("resnet20_cifar", models.CifarResNet, tx, ty, epochs=epochs, batch_size=128, lr=0.1,
                          optimizer="sgd", augment=True, weight_decay=5e-4, progress=False)
    acc = models.accuracy(models.predict(rn, vx), vy)
    info = {"resnet20": {"train_s": train_s, "recipe": f"SGD nesterov one-cycle lr 0.1, wd 5e-4, {epochs} epochs, "
                                                       f"batch 128, crop+flip, {len(tx)} JPEG train images"}}
    log(f"ResNet-20 exact {acc:.2f}% ({time.time() - t:.0f} s)")
    calib = tx[np.random.default_rng(1).permutation(len(tx))[:1024]]
    bs = 32
    steps = 20 if quick else finetune_images // bs
    ft = {"epochs": 1, "lr": 1e-3, "batch_size": bs, "limit": steps * bs, "progress": False,
          "transform": models.random_crop_flip, "distill": distill, "weight_lr": weight_lr}
    if finetune_epochs and not quick:  # whole passes over the 50k training images instead
        ft.update(epochs=finetune_epochs, limit=None)
    run_case(rows, dataset="CIFAR-10 (JPEG)", model_name="ResNet-20", model=rn, exact_acc=acc, calib=calib,
             test_x=vx, test_y=vy, batch=100, exclude=("conv1",), finetune_kw=ft, train_x=tx, train_y=ty,
             variants=variants or [("kmeans", "l2"), ("kmeans", "l1"), ("learned", "l2"), ("learned", "l1")], v=v)
    if variants:
        return info
    # priority-mask Pareto sweep (k-means L1 lookups: every converted layer is multiplier-free)
    t = time.time()
    n_cal = 200 if quick else 1000
    pidx = np.random.default_rng(2).permutation(len(tx))[:n_cal]
    mod = tvm_lut.from_torch(rn, torch.from_numpy(vx[:100]))
    budgets = ["max-drop=1", "max-drop=2", "max-drop=4", "max-drop=8", "min-removed=0.5", "min-removed=0.9"]
    pm = PriorityMask({"x": tx[pidx], "labels": ty[pidx]}, budgets[0], distance="l1", layers={"conv1": "exact"},
                      progress=False)
    results, fitted = pm.sweep(mod, budgets)
    log(f"priority-mask analysis + {len(budgets)} budgets: {time.time() - t:.0f} s")
    tgt = resolve_target("x86")
    for b, res in zip(budgets, results):
        masked = mod.with_attr(MASK_ATTR, json.dumps(res))
        out = lut_accuracy(masked, vx, vy, 100, distance="l1", fitted=fitted, layers={"conv1": "exact"})
        point = {"budget": b, "converted": res["converted"], "val_drop": res.get("val_drop"),
                 "val_drop_margin": res.get("val_drop_margin"), "exact_acc": acc, "test_acc": out["lut_acc"],
                 "test_drop": acc - out["lut_acc"], "mul_removed": out["mul_removed"],
                 "met_on_test": (acc - out["lut_acc"] <= float(b.split("=")[1])) if b.startswith("max-drop")
                 else out["mul_removed"] >= float(b.split("=")[1]) - 1e-9}
        sweep.append(point)
        log(f"  {b}: {len(res['converted'])} layers LUT, test drop {point['test_drop']:+.2f}, "
            f"mul removed {out['mul_removed']:.1%}, met on test: {point['met_on_test']}")
    del tgt
    info["priority_mask"] = {"calibration_images": n_cal, "validation_fraction": 0.3, "seconds": time.time() - t,
                             "scores": results[0]["scores"]}
    return info


# ----------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------


def markdown(rows: list, sweep: list, info: dict) -> str:
    out = ["| dataset | model | centroids | distance | V | exact % | LUT % | retention | drop | mult. removed | "
           "LUT bytes / fp32 weights | layers LUT | fit time |", "|" + "---|" * 13]
    for r in rows:
        ratio = r["lut_bytes"] / max(r["weight_bytes_converted"], 1)
        extra = f" ({r['finetune_images']} imgs{', distilled' if r.get('distill') else ''}" \
                f"{', weight lr %g' % r['weight_lr'] if r.get('weight_lr') else ''})" if "finetune_images" in r else ""
        out.append(f"| {r['dataset']} | {r['model']} | {r['centroids']} | {r['distance']} | {r.get('v', 'LUT-NN')} | "
                   f"{r['exact_acc']:.2f} | "
                   f"{r['lut_acc']:.2f} | {r['retention']:.1%} | {r['drop']:+.2f} | {r['mul_removed']:.1%} | "
                   f"{r['lut_bytes'] / 1e3:.1f} kB / {r['weight_bytes_converted'] / 1e3:.1f} kB ({ratio:.2f}x) | "
                   f"{r['layers_lut']}/{r['layers']} | {r['fit_s']:.0f} s{extra} |")
    if sweep:
        out += ["", "Priority mask (ResNet-20 / CIFAR-10, k-means L1 lookups, conv1 exact): budget chosen on "
                    "held-out calibration images, checked on the 10k test set", "",
                "| budget | layers LUT | validation drop (+1 s.e.) | test drop | mult. removed | met on test |",
                "|---|---|---|---|---|---|"]
        for p in sweep:
            vd = "-" if p["val_drop"] is None else f"{p['val_drop']:+.2f} (+{p['val_drop_margin']:.2f})"
            out.append(f"| {p['budget']} | {len(p['converted'])} | {vd} | {p['test_drop']:+.2f} | "
                       f"{p['mul_removed']:.1%} | {'yes' if p['met_on_test'] else 'NO'} |")
    out += ["", "Training recipes and wall times (2 CPU cores):"]
    for name, i in info.items():
        if "recipe" in i:
            out.append(f"- {name}: {i['recipe']}; {i['train_s']:.0f} s (0 = cached)")
    return "\n".join(out) + "\n"


def chart(rows: list, sweep: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        marker = "o" if r["centroids"] == "learned" else "x"
        ax.scatter(100 * r["mul_removed"], r["retention"] * 100, marker=marker)
        ax.annotate(f"{r['model']} {r['centroids']} {r['distance']}", (100 * r["mul_removed"], r["retention"] * 100),
                    fontsize=7, xytext=(3, 3), textcoords="offset points")
    if sweep:
        pts = sorted((100 * p["mul_removed"], 100 - p["test_drop"] / p["exact_acc"] * 100) for p in sweep)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "k.--", label="priority-mask sweep (ResNet-20, L1)")
        ax.legend(fontsize=8)
    ax.set_xlabel("multiplies removed (%)")
    ax.set_ylabel("accuracy retention (% of exact)")
    ax.set_title("LUT models: accuracy vs compute removed")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def row_key(r: dict) -> tuple:
    """What identifies a table row: a rerun of the same case (and weight learning rate) replaces it."""
    # older rows did not record it: they used finetune's default at lr 1e-3
    wlr = r.get("weight_lr") or (1e-3 * lutnn.WEIGHT_LR_FRACTION if r["centroids"] == "learned" else None)
    return r["dataset"], r["model"], r["centroids"], r["distance"], r.get("v", "LUT-NN"), wlr


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["mnist", "cifar"], default=None)
    ap.add_argument("--quick", action="store_true", help="tiny subsets and step counts (a smoke run)")
    ap.add_argument("--finetune-images", type=int, default=9600,
                    help="CIFAR images seen while learning centroids (one pass, batch 32)")
    ap.add_argument("--finetune-epochs", type=int, default=None,
                    help="instead: whole passes over the 50k CIFAR training images (about 37 min each here at "
                         "V=3; resumable from the checkpoints in benchmarks/results/cache)")
    ap.add_argument("--distill", type=float, default=0.0,
                    help="knowledge-distillation weight from the exact model while learning centroids (0 = labels only)")
    ap.add_argument("--variants", default=None,
                    help="CIFAR only these comma-separated method:distance pairs (e.g. learned:l2), "
                         "no priority sweep; rows replace the matching ones in the JSON")
    ap.add_argument("--subvector", type=int, default=None, metavar="V",
                    help="CIFAR: one subvector length for every LUT layer (default LUT-NN's: 9 for 3x3 convs, "
                         "one input channel's patch, and 4 otherwise); smaller V = more codebooks, larger tables")
    ap.add_argument("--weight-lr", type=float, default=None,
                    help="CIFAR: Adam learning rate of the weights (and BN) while learning centroids "
                         "(default lr/10 = 1e-4; centroids and temperatures use 1e-3)")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)
    if args.subvector is not None and args.subvector < 1:
        ap.error(f"--subvector must be a positive subvector length, got {args.subvector}")
    if args.weight_lr is not None and not args.weight_lr > 0:
        ap.error(f"--weight-lr must be a positive learning rate, got {args.weight_lr}")
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    if not shared_data_present(args.only):
        return 1
    rows, sweep, info = [], [], {}
    t0 = time.time()
    if args.only in (None, "mnist"):
        info.update(mnist(rows, args.quick))
    if args.only in (None, "cifar"):
        variants = [tuple(v.split(":")) for v in args.variants.split(",")] if args.variants else None
        info.update(cifar(rows, sweep, args.quick, args.finetune_images, args.finetune_epochs, args.distill,
                          variants, args.subvector, args.weight_lr))
    os.makedirs(args.out, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    path = os.path.join(args.out, f"accuracy{suffix}.json")
    wall = {args.only or "all": time.time() - t0}
    if args.only and os.path.isfile(path):  # a partial run replaces its own part of an earlier full result
        with open(path) as f:
            old = json.load(f)
        mine = "MNIST" if args.only == "mnist" else "CIFAR"
        new = {row_key(r) for r in rows}
        if args.variants:  # only the rows this run measured are replaced
            rows = [r for r in old["rows"] if row_key(r) not in new] \
                + rows
        else:
            rows = [r for r in old["rows"] if not r["dataset"].startswith(mine)] + rows
        sweep = sweep if args.only == "cifar" and not args.variants else old.get("priority_sweep", [])
        info = {**{k: v for k, v in old.get("info", {}).items() if k not in info}, **info}
        wall = {**old.get("wall_s", {}), **wall} if isinstance(old.get("wall_s"), dict) else wall
    rows.sort(key=lambda r: (not r["dataset"].startswith("MNIST"), r["model"]))
    with open(path, "w") as f:
        json.dump({"rows": rows, "priority_sweep": sweep, "info": info, "wall_s": wall,
                   "threads": torch.get_num_threads()}, f, indent=1)
    md = markdown(rows, sweep, info)
    with open(os.path.join(args.out, f"accuracy{suffix}.md"), "w") as f:
        f.write(md)
    chart(rows, sweep, os.path.join(args.out, f"accuracy{suffix}.png"))
    print(md)
    log(f"done in {time.time() - t0:.0f} s; wrote {args.out}/accuracy{suffix}.json/.md/.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
