"""Train the benchmark models on CIFAR-10 (../shared/data/cifar10_jpeg) to their exact accuracy: resumable, cached.

The speed-and-accuracy benchmark (issue 32) needs a *trained* ResNet-18-class network: accuracy kept by a
lookup build means nothing on random weights. This script trains it on this machine's CPU and can be stopped
and resumed at any point:

    python benchmarks/train_cifar.py --model resnet18                 # 10 epochs; resumes where it stopped
    python benchmarks/train_cifar.py --model resnet18 --max-minutes 60  # a slice of work
    python benchmarks/train_cifar.py --model resnet18 --status          # where it stands

Checkpoints live outside the repository, under ``$TVM_LUT_CACHE/train/<model>/`` (default
``~/.cache/tvm-lut``): ``last.pt`` (weights, optimiser, schedule, epoch and step; data order and augmentation
derive from them) is written every ``--checkpoint-minutes`` and at each epoch's end, atomically; ``final.pt`` and ``final.json`` (test
top-1 on all 10,000 test images, epochs, time, CPU) when the schedule is done. A resumed run continues the
same epoch at the same step with the same data order and augmentation, so stopping does not change what is
learned (up to bf16 rounding). SIGTERM or Ctrl-C checkpoints at the end of the current step before exiting.

Recipe (the usual CIFAR one): SGD with Nesterov momentum 0.9, weight decay 5e-4, batch 128, one-cycle
learning rate peaking at 0.1, random crop (pad 4) and horizontal flip, label smoothing 0.1. Where the CPU
has bfloat16 matrix units (AMX, AVX512-BF16) the forward and backward run under bfloat16 autocast
(``--amp auto``), which oneDNN runs on them; the weights and the optimiser stay float32. The data is
lossy JPEG (see its MANIFEST): report retention against this model's own exact accuracy, not paper numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tvm_lut.app.baselines import host_cpu  # noqa: E402
from tvm_lut.train import datasets, models  # noqa: E402

MODELS = {
    "resnet18": lambda: models.CifarResNet(widths=(64, 128, 256, 512), blocks=2),
    "resnet20": lambda: models.CifarResNet(),
    "vgg-small": lambda: models.VGGSmall(),
}


def cache_dir(model: str) -> str:
    root = os.environ.get("TVM_LUT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "tvm-lut"))
    return os.path.join(root, "train", model)


def bf16_capable() -> bool:
    """Whether this CPU has bfloat16 matrix or vector units (AMX-BF16, AVX512-BF16) for oneDNN to use."""
    return bool({"amx_bf16", "avx512_bf16"} & set(host_cpu()["cpu_flags"]))


def load_data(cache: str) -> dict[str, np.ndarray]:
    """CIFAR-10 as normalised float32 NCHW and labels; the JPEGs are decoded once and the uint8 pixels kept
    beside the checkpoints (150 MB)."""
    path = os.path.join(os.path.dirname(cache), "cifar10_decoded.npz")
    if not os.path.isfile(path):
        raw = {}
        for split in ("train", "test"):
            raw[f"{split}_x"], raw[f"{split}_y"] = datasets.load_cifar10(split, seed=0, raw=True)
        tmp = path + ".tmp.npz"
        np.savez(tmp, **raw)
        os.replace(tmp, path)
    with np.load(path) as f:
        return {k: (datasets.normalize_cifar10(f[k]) if k.endswith("_x") else f[k].astype(np.int64)) for k in f.files}


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, amp: bool, batch: int = 500) -> float:
    model.eval()
    correct = 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        for i in range(0, len(x), batch):
            logits = model(torch.from_numpy(x[i:i + batch]))
            correct += int((logits.argmax(1).numpy() == y[i:i + batch]).sum())
    return 100.0 * correct / len(x)


def save_atomic(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet18", choices=sorted(MODELS))
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: every core)")
    ap.add_argument("--amp", default="auto", choices=["auto", "on", "off"],
                    help="bfloat16 autocast: auto = where the CPU has AMX or AVX512-BF16")
    ap.add_argument("--max-minutes", type=float, default=0, help="stop (resumable) after this long")
    ap.add_argument("--checkpoint-minutes", type=float, default=5.0)
    ap.add_argument("--status", action="store_true", help="print where the run stands and stop")
    args = ap.parse_args(argv)

    cache = cache_dir(args.model)
    os.makedirs(cache, exist_ok=True)
    last, final = os.path.join(cache, "last.pt"), os.path.join(cache, "final.json")
    if args.status:
        if os.path.isfile(final):
            print(open(final).read())
        elif os.path.isfile(last):
            ck = torch.load(last, weights_only=False)
            print(f"{args.model}: epoch {ck['epoch']} step {ck['step']} of {ck['epochs']} epochs, "
                  f"{ck['seconds'] / 3600:.2f} h so far, last test top-1 {ck.get('test_top1')}")
        else:
            print(f"{args.model}: not started ({cache})")
        return 0
    if os.path.isfile(final):
        print(open(final).read())
        return 0
    if not os.path.isdir(os.path.join(datasets.SHARED_DATA, "cifar10_jpeg")):
        print(f"cifar10_jpeg not found under {datasets.SHARED_DATA}: this benchmark needs ../shared/data",
              file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    amp = args.amp == "on" or (args.amp == "auto" and bf16_capable())
    data = load_data(cache)
    tx, ty = torch.from_numpy(data["train_x"]), torch.from_numpy(data["train_y"])
    steps = len(tx) // args.batch

    torch.manual_seed(0)
    model = MODELS[args.model]().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps,
                                                pct_start=0.15, div_factor=10, final_div_factor=100)
    epoch, step, seconds, history = 0, 0, 0.0, []
    if os.path.isfile(last):
        ck = torch.load(last, weights_only=False)
        if ck["epochs"] != args.epochs or ck["batch"] != args.batch or ck["lr"] != args.lr:
            raise SystemExit(f"{last} is a run with --epochs {ck['epochs']} --batch {ck['batch']} --lr {ck['lr']}; "
                             "resume it with those, or remove the directory to start over")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        epoch, step, seconds, history = ck["epoch"], ck["step"], ck["seconds"], ck.get("history", [])
        print(f"resuming {args.model} at epoch {epoch} step {step} ({seconds / 3600:.2f} h done)")

    def checkpoint(test_top1=None):
        save_atomic({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                     "epoch": epoch, "step": step, "seconds": seconds, "epochs": args.epochs, "batch": args.batch,
                     "lr": args.lr, "history": history, "test_top1": test_top1}, last)

    from tqdm import tqdm

    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    started, saved = time.time(), time.time()
    stop: dict = {"signal": None}  # SIGTERM / Ctrl-C: checkpoint at the end of the step, then exit

    def on_signal(signum, _frame):
        stop["signal"] = signal.Signals(signum).name

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while epoch < args.epochs:
        order = torch.randperm(len(tx), generator=torch.Generator().manual_seed(1000 + epoch))
        model.train()
        bar = tqdm(range(step, steps), desc=f"{args.model} epoch {epoch + 1}/{args.epochs}", initial=step,
                   total=steps, disable=not sys.stderr.isatty())
        t0 = time.time()
        for step in bar:
            idx = order[step * args.batch:(step + 1) * args.batch]
            aug = torch.Generator().manual_seed(2000 + epoch * 100_000 + step)  # per step: a resume draws the same
            xb = models.random_crop_flip(tx[idx], aug).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss = loss_fn(model(xb), ty[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
            now = time.time()
            if now - saved > 60 * args.checkpoint_minutes:
                seconds += now - t0
                t0 = now
                step += 1
                checkpoint()
                step -= 1
                saved = now
            if stop["signal"] or (args.max_minutes and now - started > 60 * args.max_minutes):
                seconds += now - t0
                step += 1
                checkpoint()
                why = stop["signal"] or f"after {args.max_minutes} min"
                print(f"stopped ({why}) at epoch {epoch} step {step}; run again to resume", flush=True)
                return 0
        seconds += time.time() - t0
        epoch, step = epoch + 1, 0
        top1 = evaluate(model, data["test_x"], data["test_y"], amp) if epoch % 5 == 0 or epoch == args.epochs else None
        history.append({"epoch": epoch, "loss": float(loss.item()), "test_top1": top1, "hours": seconds / 3600})
        print(f"epoch {epoch}/{args.epochs}: loss {loss.item():.3f}" + (f", test top-1 {top1:.2f}%" if top1 else ""),
              flush=True)
        checkpoint(top1)
        saved = time.time()
    model.eval()
    top1_fp32 = evaluate(model, data["test_x"], data["test_y"], False)
    save_atomic(model.state_dict(), os.path.join(cache, "final.pt"))
    summary = {"model": args.model, "epochs": args.epochs, "batch": args.batch, "lr": args.lr, "amp_bf16": amp,
               "test_top1_fp32": top1_fp32, "test_images": int(len(data["test_y"])), "train_hours": seconds / 3600,
               "cpu": host_cpu(), "history": history, "weights": os.path.join(cache, "final.pt")}
    with open(final, "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
