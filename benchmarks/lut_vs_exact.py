"""Kernel and end-to-end timings of LUT vs exact TVM (and PyTorch eager), side by side in one run.

    python benchmarks/lut_vs_exact.py [--quick] [--json benchmarks/results/lut_vs_exact.json]

Kernel level: one linear layer ``x (N x D) @ W (D x M)`` as compiled by tvm-lut (im2col-free PQ layer:
encode + int8 table accumulate + scale, hand-scheduled for this CPU) against the same layer compiled
exactly by TVM, and ``torch.nn.functional.linear``. End to end: LeNet-5 (random weights: speed does
not depend on them) at batch 1 and 16.

Both TVM builds use TVM's default CPU lowering for the non-LUT ops and are NOT tuned (MetaSchedule
comes with the fast-kernel issue): the exact-TVM column is an untuned baseline, so read the PyTorch
column as the realistic reference. Timings are medians of TVM's time_evaluator / perf_counter loops;
machines are noisy, so compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch
from torch import nn

import tvm_lut
from tvm_lut.frontend import graph
from tvm_lut.runtime.build import BatchRunner, compile_with_params, default_threads, resolve_target
from tvm_lut.train import models


def _runner(mod):
    ex, params = compile_with_params(mod)
    return BatchRunner(ex, [v for _, v in params], graph.input_signature(mod["main"]))


def _torch_ms(model, x, number=50):
    with torch.no_grad():
        for _ in range(5):
            model(x)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(number):
                model(x)
            times.append((time.perf_counter() - t) / number)
    return float(np.median(times) * 1e3)


def bench_layer(n: int, d: int, m: int, rng) -> dict:
    layer = nn.Sequential(nn.Linear(d, m)).eval()
    x = rng.standard_normal((n, d)).astype(np.float32)
    mod = tvm_lut.from_torch(layer, torch.from_numpy(x))
    lut = tvm_lut.LUTify(calibration=x, all_layers=True, progress=False)(mod)
    exact_ms = _runner(mod).latency_ms()
    lut_ms = _runner(lut).latency_ms()
    torch_ms = _torch_ms(layer, torch.from_numpy(x))
    return {"N": n, "D": d, "M": m, "C": d // 4, "K": 16, "exact_tvm_ms": exact_ms, "lut_ms": lut_ms,
            "torch_ms": torch_ms, "lut_vs_exact_tvm": exact_ms / lut_ms, "lut_vs_torch": torch_ms / lut_ms}


def bench_lenet(batch: int, rng) -> dict:
    model = models.LeNet5().eval()
    x = rng.standard_normal((max(batch, 64), 1, 28, 28)).astype(np.float32)
    mod = tvm_lut.from_torch(model, torch.from_numpy(x[:batch]))
    lut = tvm_lut.LUTify(calibration=x, all_layers=True, progress=False)(mod)
    exact_ms, lut_ms = _runner(mod).latency_ms(), _runner(lut).latency_ms()
    torch_ms = _torch_ms(model, torch.from_numpy(x[:batch]))
    return {"model": "LeNet-5", "batch": batch, "exact_tvm_ms": exact_ms, "lut_ms": lut_ms, "torch_ms": torch_ms,
            "lut_vs_exact_tvm": exact_ms / lut_ms, "lut_vs_torch": torch_ms / lut_ms}


def _table(rows: list[dict], cols: list[str]) -> str:
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)
    w = [max(len(c), *(len(fmt(r[c])) for r in rows)) for c in cols]
    out = ["  ".join(c.ljust(x) for c, x in zip(cols, w)), "  ".join("-" * x for x in w)]
    out += ["  ".join(fmt(r[c]).ljust(x) for c, x in zip(cols, w)) for r in rows]
    return "\n".join(out)


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "lut_vs_exact.json"))
    args = ap.parse_args()
    torch.set_num_threads(default_threads())
    rng = np.random.default_rng(0)
    shapes = [(1024, 256, 128)] if args.quick else [
        (1024, 256, 64), (1024, 256, 128), (1024, 256, 256), (1024, 576, 128), (1024, 128, 256)]
    kernels = []
    for n, d, m in shapes:
        kernels.append(bench_layer(n, d, m, rng))
        print(f"  layer N={n} D={d} M={m} done", flush=True)
    e2e = [bench_lenet(b, rng) for b in (1, 16)]
    cols_k = ["N", "D", "M", "C", "K", "exact_tvm_ms", "lut_ms", "torch_ms", "lut_vs_exact_tvm", "lut_vs_torch"]
    cols_e = ["model", "batch", "exact_tvm_ms", "lut_ms", "torch_ms", "lut_vs_exact_tvm", "lut_vs_torch"]
    print(f"\nkernel: one linear layer (V=4), {default_threads()} threads, ratios > 1 mean LUT is faster")
    print(_table(kernels, cols_k))
    print("\nend to end")
    print(_table(e2e, cols_e))
    print("\nexact TVM = untuned default build (not a strong baseline); PyTorch eager = MKL/oneDNN.")
    result = {"machine": {"cpu": str(resolve_target("x86").attrs["mcpu"]),
                          "threads": default_threads(), "platform": platform.platform()},
              "kernel": kernels, "end_to_end": e2e,
              "note": "both TVM builds untuned; LUT kernels hand-scheduled; medians, ms"}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
