"""Training HKLUT networks on T91: MATLAB-bicubic LR patches, resumable checkpoints outside the repository.

``train(scale=4)`` trains ``hklut.HKNet`` on random LR/HR patch pairs cut from T91 (``../shared/data/sr/t91``),
each colour channel a grayscale plane (the tables run on every channel alike). LR images are made once per
image by ``math.resize.imresize`` (MATLAB's antialiased bicubic: the protocol the evaluation uses), and an
LR patch at (i, j) pairs with the HR patch at (scale i, scale j). Loss: MSE on [0, 1]; Adam with a cosine
learning rate. The network runs in its table form (``HKNet(..., by_table=True)``: each unit evaluated once
on its 16^n inputs per step, then read per pixel): the same function and weight gradient as the per-pixel
form, about 17 times faster (x4, batch 16: 0.12 s a step against 2.1 s), and one thread is as fast as two. Every ``checkpoint_minutes`` and at the end the state (weights, optimiser, schedule, step,
RNG) is written atomically to ``<cache>/last.pt``; a later call with the same settings resumes from it.
Every ``eval_every`` steps the network (before tabulation) is scored on Set5 (Y PSNR, the field's protocol).
"""

from __future__ import annotations

import glob
import json
import os
import time

import numpy as np
import torch

from tvm_lut.errors import CalibrationError
from tvm_lut.math import image_io, image_quality, resize
from tvm_lut.train import datasets, hklut


def sr_root() -> str:
    return os.path.join(datasets.SHARED_DATA, "sr")


def cache_dir(scale: int) -> str:
    root = os.environ.get("TVM_LUT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "tvm-lut"))
    return os.path.join(root, "sr", f"x{scale}")


def load_set(name: str, limit: int | None = None) -> list[tuple[str, np.ndarray]]:
    """A dataset of ``../shared/data/sr`` (``t91``, ``set5``, ``set14``, ``b100``) as (name, uint8 image);
    ``limit``: its first images (by file name) only."""
    folder = os.path.join(sr_root(), name)
    files = sorted(glob.glob(os.path.join(folder, "*.png")))[:limit]
    if not files:
        raise CalibrationError(f"no PNG images under {folder}: the SR data lives in ../shared/data/sr")
    return [(os.path.splitext(os.path.basename(f))[0], image_io.read_image(f)) for f in files]


def planes(images: list[np.ndarray], scale: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(LR, HR) grayscale plane pairs: every channel of every image, HR modcropped, LR by MATLAB bicubic."""
    out = []
    for img in images:
        hr = image_quality.modcrop(img, scale)
        lr = resize.imresize(hr, 1 / scale)
        if hr.ndim == 2:
            out.append((lr, hr))
        else:
            out += [(lr[..., c], hr[..., c]) for c in range(hr.shape[2])]
    return out


def patch_batch(pairs, scale: int, batch: int, size: int, gen: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` random aligned patches (LR ``size`` x ``size``), randomly flipped and transposed."""
    lrs, hrs = [], []
    while len(lrs) < batch:
        lr, hr = pairs[gen.integers(len(pairs))]
        if min(lr.shape) < size:
            continue
        i, j = gen.integers(lr.shape[0] - size + 1), gen.integers(lr.shape[1] - size + 1)
        a = lr[i:i + size, j:j + size]
        b = hr[i * scale:(i + size) * scale, j * scale:(j + size) * scale]
        if gen.random() < 0.5:
            a, b = a[:, ::-1], b[:, ::-1]
        if gen.random() < 0.5:
            a, b = a.T, b.T
        lrs.append(np.ascontiguousarray(a))
        hrs.append(np.ascontiguousarray(b))
    to = lambda xs: torch.from_numpy(np.stack(xs).astype(np.float32) / 255)[:, None]  # noqa: E731
    return to(lrs), to(hrs)


def evaluate(model: hklut.HKNet, images: list[tuple[str, np.ndarray]], scale: int, by_table: bool = True) -> float:
    """Mean Y PSNR of the network (before tabulation) on ``images``, the field's protocol; ``by_table=False``
    runs it per pixel (the graph that is imported and tabulated), the default its table form (the same
    function, much faster)."""
    model.eval()
    scores = []
    with torch.no_grad():
        for _, img in images:
            hr = image_quality.modcrop(img, scale)
            lr = resize.imresize(hr, 1 / scale)
            chans = [lr] if lr.ndim == 2 else [lr[..., c] for c in range(lr.shape[2])]
            outs = [model(torch.from_numpy(c.astype(np.float32) / 255)[None, None], by_table=by_table)[0, 0].numpy()
                    for c in chans]
            sr = np.stack([np.floor(o * np.float32(255) + np.float32(0.5)).astype(np.uint8) for o in outs], -1)
            scores.append(image_quality.psnr(sr if lr.ndim == 3 else sr[..., 0], hr, scale))
    model.train()
    return float(np.mean(scores))


def train(scale: int = 4, steps: int = 20_000, batch: int = 32, patch: int = 32, lr: float = 1e-3, nf: int = 64,
          depth: int = 4, max_minutes: float = 0, checkpoint_minutes: float = 5.0, eval_every: int = 2000,
          progress: bool = True, cache: str | None = None, log=print, max_images: int | None = None) -> dict:
    """Train (or resume) an HKLUT network for ``scale``; returns the state summary (also ``<cache>/state.json``).

    Stops after ``steps`` (then writes ``final.pt``) or after ``max_minutes`` (resumable). ``max_images``
    trains on the first T91 images only (quick checks)."""
    from tqdm import tqdm

    cache = cache or cache_dir(scale)
    os.makedirs(cache, exist_ok=True)
    settings = {"scale": scale, "steps": steps, "batch": batch, "patch": patch, "lr": lr, "nf": nf, "depth": depth}
    torch.manual_seed(0)
    model = hklut.HKNet(scale=scale, nf=nf, depth=depth)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=lr / 100)
    step, seconds, history = 0, 0.0, []
    last = os.path.join(cache, "last.pt")
    if os.path.isfile(last):
        ck = torch.load(last, weights_only=False)
        if ck["settings"] != settings:
            raise CalibrationError(f"{last} was trained with {ck['settings']}; resume with those settings, or "
                                   f"remove {cache} to start over")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        step, seconds, history = ck["step"], ck["seconds"], ck["history"]
        log(f"resuming x{scale} at step {step} of {steps} ({seconds / 3600:.2f} h done)")
    pairs = planes([img for _, img in load_set("t91", max_images)], scale)
    set5 = None  # loaded at the first evaluation
    gen = np.random.default_rng(step + 12345)  # a resumed run draws new patches, deterministically

    def save(path: str) -> None:
        tmp = path + ".tmp"
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "step": step, "seconds": seconds, "history": history, "settings": settings}, tmp)
        os.replace(tmp, path)

    started = saved = t0 = time.time()
    bar = tqdm(total=steps, initial=step, desc=f"HKLUT x{scale}", disable=not progress)
    while step < steps:
        lr_t, hr_t = patch_batch(pairs, scale, batch, patch, gen)
        loss = torch.nn.functional.mse_loss(model(lr_t, by_table=True), hr_t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.5f}")
        now = time.time()
        if step % eval_every == 0 or step == steps:
            set5 = set5 or load_set("set5")
            history.append({"step": step, "loss": float(loss.item()), "set5_psnr_net": evaluate(model, set5, scale)})
            log(f"step {step}: Set5 Y PSNR of the network {history[-1]['set5_psnr_net']:.2f} dB")
        if now - saved > 60 * checkpoint_minutes or step == steps:
            seconds += now - t0
            t0 = saved = now
            save(last)
        if max_minutes and now - started > 60 * max_minutes and step < steps:
            seconds += time.time() - t0
            save(last)
            log(f"stopped after {max_minutes} min at step {step} of {steps}; the same command resumes")
            break
    bar.close()
    done = step >= steps
    if done:
        tmp = os.path.join(cache, "final.pt.tmp")
        torch.save({"model": model.state_dict(), "settings": settings}, tmp)
        os.replace(tmp, os.path.join(cache, "final.pt"))
    state = {**settings, "step": step, "done": done, "hours": seconds / 3600, "history": history, "cache": cache}
    with open(os.path.join(cache, "state.json"), "w") as f:
        json.dump(state, f, indent=1)
    return state
