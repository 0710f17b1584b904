"""Learn the centroids of a trained CIFAR-10 model's lookup layers (LUT-NN), distilled from the exact model:
resumable, cached.

Post-training k-means at V=9 loses about 12 points of top-1 on the trained ResNet-18-class
(benchmarks/README.md); LUT-NN learns the centroids for the task instead. This script takes
``train_cifar.py``'s trained model, converts its conv/dense layers (the first conv and narrow layers such as
the classifier stay exact, as in ``pareto.py``) to lookup layers initialised by k-means, and fine-tunes
centroids, temperatures and weights by backprop with the soft-PQ straight-through estimator
(``tvm_lut.train.lutnn.finetune``), distilling the exact model's soft outputs:

    python benchmarks/learn_centroids.py --model resnet18                   # resumes where it stopped
    python benchmarks/learn_centroids.py --model resnet18 --max-minutes 30  # a slice of work
    python benchmarks/learn_centroids.py --model resnet18 --status
    python benchmarks/learn_centroids.py --model resnet18 --layer-v "layers.[4-7].conv?=3"  # per-layer V
    python benchmarks/learn_centroids.py --model resnet18 --layer-v "layers.[4-5].conv?=3" --init-from RUN_DIR

Checkpoints live beside the trained model's, under ``$TVM_LUT_CACHE/train/<model>-lut-<tag>/`` (default
``~/.cache/tvm-lut``; ``<tag>`` names V and the run's settings): ``lutnn_checkpoint.pt`` (every 50 steps), and
at the end of every call, also one stopped by ``--max-minutes``: ``learned.pt`` (the fine-tuned model as plain
convs, ``lutnn.to_exact``), ``codebooks.npz`` (``LUTify(codebooks=...)``) and ``learned.json`` (steps done of
the schedule's, ``complete``, the lookup model's top-1 in PyTorch on the first 2,000 test images, CPU).
``pareto.py``'s ``learned`` configurations (and ``learned@DIR`` for any run) compile these with LUTify and
measure the compiled model. The lookup layers compute the fp32 encoder's codes and the int8 tables; LUTify's
default int8 encoder picks another centroid for about 0.1 % of subvectors (``learned V=9/4 fp32 encoder``
compiles the codes training computed), so the PyTorch top-1 here is an estimate of the compiled one, not a
substitute for it."""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import train_cifar  # noqa: E402

from tvm_lut.app.baselines import host_cpu  # noqa: E402
from tvm_lut.math import pq  # noqa: E402
from tvm_lut.train import lutnn, models  # noqa: E402

#: Layers kept exact: the first conv sees 3 input channels (C=3 codebooks of a 3x3 patch: nothing to gain).
EXCLUDE = ("conv1",)


def kept_exact(model: torch.nn.Module, k: int = pq.DEFAULT_K) -> list[str]:
    """``EXCLUDE`` and the narrow layers LUTify keeps exact by itself (M <= K outputs, e.g. the 10-way
    classifier: encoding costs K*D multiplies per row against D*M exact), so training learns the layers the
    compiled model looks up and no others."""
    narrow = [name for name, m in lutnn.convertible_layers(model).items()
              if (m.out_features if isinstance(m, torch.nn.Linear) else m.out_channels) <= k]
    return sorted(set(EXCLUDE) | set(narrow))


def layers_matching(names, pattern: str) -> list[str]:
    """The layer names ``pattern`` selects: the name itself, the layers under it (``layers.0`` ->
    ``layers.0.conv1``, ...) or those matching it as a shell pattern (``layers.*.conv?``)."""
    return [n for n in names if n == pattern or n.startswith(pattern + ".") or fnmatch.fnmatchcase(n, pattern)]


def parse_layer_v(text: str | None) -> dict[str, int]:
    """``"layers.0=3,layers.1=3"`` -> {pattern: V} (``--layer-v``)."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        pattern, _, value = part.partition("=")
        if not value.strip().isdigit():
            raise SystemExit(f"--layer-v: {part!r} is not PATTERN=V (e.g. layers.0=3)")
        out[pattern.strip()] = int(value)
    return out


def parse_exact(text: str | None) -> list[str]:
    """``"layers.4,layers.5"`` -> the patterns of the layers ``--exact`` keeps exact (sorted, deduplicated)."""
    return sorted({p.strip() for p in (text or "").split(",") if p.strip()})


def exact_layers(model: torch.nn.Module, text: str | None) -> list[str]:
    """The layers training keeps exact: ``kept_exact``'s and those ``--exact`` names (``parse_exact``; the
    compiled model runs them exact too, in int8 with ``exact=int8``); a pattern naming no layer is an error."""
    kept = kept_exact(model)
    convertible = [n for n in lutnn.convertible_layers(model) if n not in kept]
    named = resolve_patterns(convertible, dict.fromkeys(parse_exact(text), 0), "--exact")
    return sorted(set(kept) | set(named))


def resolve_layer_v(model: torch.nn.Module, spec: dict[str, int], kept: list[str]) -> dict[str, int]:
    """{layer name: V} of ``spec``'s patterns over the model's convertible layers (the longest pattern wins;
    layers kept exact are skipped); a pattern that selects no layer is an error."""
    return resolve_patterns([n for n in lutnn.convertible_layers(model) if n not in kept], spec, "--layer-v")


def resolve_patterns(names: list[str], spec: dict[str, int], option: str) -> dict[str, int]:
    """{name: V} of ``spec``'s patterns (``layers_matching``) over ``names``, the longest pattern winning; a
    pattern that selects none is an error naming ``option`` and the layers (``--layer-v``, pareto's ``v@``)."""
    out: dict[str, int] = {}
    for pattern in sorted(spec, key=len):
        hit = layers_matching(names, pattern)
        if not hit:
            raise SystemExit(f"{option}: {pattern!r} names no layer; layers: {', '.join(names)}")
        out.update({n: spec[pattern] for n in hit})
    return out


class Batches:
    """``steps`` batches of ``batch`` images in ``order``, sliced when iterated (a whole pass held as
    slices would copy the training set: 600 MB for CIFAR-10)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, order: torch.Tensor, batch: int, steps: int):
        self.x, self.y, self.order, self.batch, self.steps = x, y, order, batch, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for i in range(self.steps):
            idx = self.order[i * self.batch:(i + 1) * self.batch]
            yield self.x[idx], self.y[idx]


def run_dir(model: str, v: int | None, tag: str) -> str:
    return train_cifar.cache_dir(model) + f"-lut-v{v or 'default'}-{tag}"


def default_tag() -> str:
    """The run tag of the default settings (what ``pareto.py``'s ``learned`` configuration reads)."""
    return tag_of(build_parser().parse_args([]))


def tag_of(args) -> str:
    tag = f"e{args.epochs:g}-b{args.batch}-lr{args.lr:g}-w{args.weight_lr:g}-d{args.distill:g}"
    spec = parse_layer_v(args.layer_v)
    if spec:  # per-layer V: a short digest of the patterns (they hold '*' and '?'); learned.json lists them
        tag += "-lv" + hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8]
    exact = parse_exact(args.exact)
    if exact:
        tag += "-ex" + hashlib.sha256(json.dumps(exact).encode()).hexdigest()[:8]
    if args.init_from:  # continued from another run: a digest of its directory's name
        name = os.path.basename(os.path.normpath(args.init_from))
        tag += "-from" + hashlib.sha256(name.encode()).hexdigest()[:8]
    return tag


def load_start(model: str, run: str) -> tuple[torch.nn.Module, dict[str, dict], dict]:
    """An earlier run's fine-tuned weights (``learned.pt``), its centroids (``codebooks.npz``) and its
    ``learned.json``: where ``--init-from`` starts. Layers whose V this run changes restart from k-means."""
    files = [os.path.join(run, f) for f in ("learned.pt", "codebooks.npz", "learned.json")]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise SystemExit(f"--init-from {run}: not a finished learn_centroids run directory (missing "
                         f"{', '.join(os.path.basename(f) for f in missing)})")
    net = train_cifar.MODELS[model]()
    try:
        net.load_state_dict(torch.load(files[0], map_location="cpu"))
    except RuntimeError as exc:
        raise SystemExit(f"--init-from {run}: learned.pt is not a {model} ({exc})") from exc
    with open(files[2]) as f:
        info = json.load(f)
    return net.eval(), lutnn.load_codebooks(files[1]), info


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet18", choices=sorted(train_cifar.MODELS))
    ap.add_argument("--v", type=int, default=None, help="subvector length (default LUT-NN's: 9 for 3x3 convs, else 4)")
    ap.add_argument("--epochs", type=float, default=1.0,
                    help="passes over the training images (a fraction trains on that share of one pass); a "
                         "ResNet-18 step at V=9 costs about 7x an exact one: one pass is ~1.8 h on 2 cores, "
                         "run in --max-minutes slices if need be")
    ap.add_argument("--layer-v", default="",
                    help="per-layer subvector lengths, PATTERN=V,...: a layer name, the layers under it or a shell "
                         "pattern (e.g. 'layers.0=3,layers.1=3': V=3, one kernel row per codebook, in the first "
                         "stage; LUTify's int8 encoder covers V=9 and V=3 at 3x3)")
    ap.add_argument("--exact", default="",
                    help="layers kept exact (trained as they are, not looked up), PATTERN,...: as --layer-v's "
                         "patterns (e.g. 'layers.4,layers.5,layers.7': the stages whose tables outgrow the cache, "
                         "run in int8 by LUTify(exact='int8'))")
    ap.add_argument("--init-from", default="",
                    help="start from an earlier run's directory (its fine-tuned weights and centroids) instead of the "
                         "trained model and k-means; layers whose V differs there restart from k-means. The "
                         "teacher stays the trained exact model. Consider a lower --lr/--weight-lr: the schedule "
                         "restarts")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of centroids and temperatures")
    ap.add_argument("--weight-lr", type=float, default=1e-4, help="Adam learning rate of the other parameters")
    ap.add_argument("--distill", type=float, default=0.5, help="weight of the distillation loss (0: labels only)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: every core)")
    ap.add_argument("--max-minutes", type=float, default=0, help="stop (resumable) after this long")
    ap.add_argument("--eval-images", type=int, default=2000,
                    help="test images for the PyTorch top-1 estimate (pareto.py measures the compiled model)")
    ap.add_argument("--status", action="store_true", help="print where the run stands and stop")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = run_dir(args.model, args.v, tag_of(args))
    done = os.path.join(out, "learned.json")
    ckpt = os.path.join(out, "lutnn_checkpoint.pt")
    info = None
    if os.path.isfile(done):
        with open(done) as f:
            info = json.load(f)
    if args.status or (info and info["complete"]):
        if info:
            print(json.dumps(info, indent=1))
        elif os.path.isfile(ckpt):
            print(f"{out}: step {torch.load(ckpt, weights_only=True)['step']}")
        else:
            print(f"{out}: not started")
        return 0
    trained = os.path.join(train_cifar.cache_dir(args.model), "final.pt")
    if not os.path.isfile(trained):
        print(f"no trained {args.model} at {trained}: run 'python benchmarks/train_cifar.py --model {args.model}' "
              "first", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher = train_cifar.MODELS[args.model]()
    teacher.load_state_dict(torch.load(trained, map_location="cpu"))
    teacher.eval()
    exclude = exact_layers(teacher, args.exact)
    layer_v = resolve_layer_v(teacher, parse_layer_v(args.layer_v), exclude)
    student, start, start_info = teacher, None, None
    if args.init_from:
        student, start, start_info = load_start(args.model, args.init_from)
    data = train_cifar.load_data(train_cifar.cache_dir(args.model))
    tx, ty = torch.from_numpy(data["train_x"]), torch.from_numpy(data["train_y"])
    steps = int(args.epochs * len(tx)) // args.batch
    # one "epoch" of the driver is the whole run: ``steps`` batches in a fixed shuffled order
    order = torch.randperm(len(tx), generator=torch.Generator().manual_seed(7))
    if start_info:  # a continued run goes on where the earlier one stopped in the same order
        order = torch.roll(order, -(start_info["steps"] * start_info["batch"]) % len(tx))
    loader = Batches(tx, ty, order, args.batch, steps)
    t0 = time.time()
    res = lutnn.finetune(student, loader, epochs=1, lr=args.lr, weight_lr=args.weight_lr, v=args.v, layer_v=layer_v,
                         exclude=exclude, codebooks=start, teacher=teacher if args.distill > 0 else None,
                         distill=args.distill,
                         transform=lambda x, gen: models.random_crop_flip(x, gen), checkpoint_dir=out,
                         checkpoint_every=50, max_minutes=args.max_minutes or None, progress=sys.stderr.isatty())
    n_eval = min(args.eval_images, len(data["test_y"]))
    top1 = train_cifar.evaluate(res.model, data["test_x"][:n_eval], data["test_y"][:n_eval], amp=False)
    torch.save(lutnn.to_exact(res.model).state_dict(), os.path.join(out, "learned.pt"))
    lutnn.save_codebooks(os.path.join(out, "codebooks.npz"), res.codebooks)
    info = {"model": args.model, "v": args.v, "complete": res.steps >= steps, "steps": res.steps,
            "total_steps": steps, "batch": args.batch, "epochs": args.epochs,
            "lr": args.lr, "weight_lr": args.weight_lr, "distill": args.distill, "exclude": exclude,
            "layer_v": layer_v,
            "init_from": None if start_info is None else {"dir": os.path.abspath(args.init_from),
                                                          "steps": start_info["steps"],
                                                          "layer_v": start_info.get("layer_v", {})},
            "torch_lut_top1": top1, "eval_images": n_eval, "last_call_minutes": (time.time() - t0) / 60,
            "cpu": host_cpu()["model"]}
    tmp = done + ".tmp"
    with open(tmp, "w") as f:
        json.dump(info, f, indent=1)
    os.replace(tmp, done)
    print(json.dumps(info, indent=1))
    if not info["complete"]:
        print(f"stopped at step {res.steps} of {steps} after {args.max_minutes} min (the partial result is saved "
              "above); run again to resume", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
