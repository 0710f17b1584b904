"""The transformer case: a BERT-class encoder with every dense layer as table lookup, beside ONNX Runtime fp32,
int8 (static and dynamic) and PyTorch, and where each build's time goes.

    python benchmarks/bert.py                        # 4 layers, d=512, FFN 2048, 128 tokens; ~5 min
    python benchmarks/bert.py --layers 1 --tokens 32 # a smoke run

LUT-NN's other headline is BERT. The model (random weights: speed does not depend on them): ``--layers``
post-norm encoder layers, each q/k/v/o projections (d x d), 8-head scaled dot-product attention, residual +
LayerNorm, FFN d -> 4d -> d with GELU, residual + LayerNorm; the input is the token embeddings
(1, tokens, d). All of it at batch 1 on one thread (``TVM_NUM_THREADS=1``, torch and ONNX Runtime
likewise), in this process; read the ratios within one run.

Builds (``tvm_lut.runtime.build.build``: weights bound as constants, so a dense weight's transpose folds at
compile time): LUTify with every dense layer as lookup (``--configs``, V per build; calibrated on
``--calib`` random token sequences) and the exact model through the same TVM build (our fused elementwise,
conv and matmul schedules, TVM's default lowering of the rest; untuned); ONNX Runtime fp32, static int8 (QDQ, per-channel weights,
calibrated on the same sequences) and dynamic int8 (``quantize_dynamic``); PyTorch eager.

**Where the time goes**: each TVM build runs once more under a VM instrument that clocks every call,
grouped into lookup kernels (encode + accumulate), dense matmuls (a 2-D weight operand), attention matmuls
(two activations, batched over heads), softmax, layer norm, other fused elementwise/layout functions and VM builtins
(allocation, reshapes). The instrument's Python hook adds a few microseconds per call, so those columns sum
to a little more than the timed latency.

Writes ``benchmarks/results/bert.{json,md}`` with the CPU model and ISA flags. The LUT build's output is
compared with the exact model's (relative error, cosine similarity of the last hidden states): random
weights, so this checks the build, not task accuracy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

os.environ["TVM_NUM_THREADS"] = "1"  # before tvm starts its thread pool

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from tvm_lut.app.baselines import host_cpu  # noqa: E402

RESULTS = os.path.join(HERE, "results")
GROUPS = ("lookup", "dense matmul", "attention matmul", "softmax", "layer norm", "elementwise/layout", "VM builtins")


def bert_class(layers: int, d: int, heads: int, ffn: int):
    """The encoder (torch), in eval mode."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class EncoderLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.ff1, self.ff2 = nn.Linear(d, ffn), nn.Linear(ffn, d)

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = (f(x).view(b, t, heads, d // heads).transpose(1, 2) for f in (self.q, self.k, self.v))
            a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), -1)
            x = self.ln1(x + self.o((a @ v).transpose(1, 2).reshape(b, t, d)))
            return self.ln2(x + self.ff2(F.gelu(self.ff1(x))))

    torch.manual_seed(0)
    return nn.Sequential(*[EncoderLayer() for _ in range(layers)]).eval()


def group_of(symbol: str, weight_operand: bool) -> str:
    """The time-breakdown group of a VM call (``GROUPS``)."""
    if symbol.startswith("vm.builtin"):
        return "VM builtins"
    if "lut_" in symbol and ("encode" in symbol or "accumulate" in symbol or "lookup" in symbol):
        return "lookup"
    if "softmax" in symbol:
        return "softmax"
    if "layer_norm" in symbol:
        return "layer norm"
    if "matmul" in symbol:
        return "dense matmul" if weight_operand else "attention matmul"
    return "elementwise/layout"


def breakdown(art: dict, repeat: int = 5) -> dict:
    """ms per group (``GROUPS``) of one call of an exported TVM build, median over ``repeat`` calls."""
    import speed
    import tvm

    _, vm, inputs, params = speed._load(art)
    args = inputs + params
    runs: list[dict] = []
    current: dict = {}
    starts: list[float] = []

    def instrument(func, symbol, before, ret, *call_args):
        if before:
            starts.append(time.perf_counter())
            return 0
        dt = (time.perf_counter() - starts.pop()) * 1e3
        # a dense layer multiplies by a 2-D weight; attention's products are batched over heads (3-D and up)
        shapes = [tuple(a.shape) for a in call_args if isinstance(a, tvm.runtime.Tensor)]
        g = group_of(str(symbol), len(shapes) > 1 and len(shapes[1]) == 2)
        current[g] = current.get(g, 0.0) + dt
        return 0

    vm["main"](*args)
    vm.set_instrument(tvm.runtime.convert(instrument) if hasattr(tvm.runtime, "convert") else instrument)
    for _ in range(repeat):
        current = {}
        vm["main"](*args)
        runs.append(current)
    return {g: float(np.median([r.get(g, 0.0) for r in runs])) for g in GROUPS}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--ffn", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--configs", default="8,4", help="comma-separated V of the LUT builds (K=16)")
    ap.add_argument("--calib", type=int, default=8, help="calibration sequences")
    ap.add_argument("--out", default=os.path.join(RESULTS, "bert"))
    args = ap.parse_args(argv)

    import speed
    import torch

    import tvm_lut
    from relay_passes import LUTify
    from tvm_lut.app import baselines
    from tvm_lut.runtime.build import build
    from tvm_lut.targets import host_target

    torch.set_num_threads(1)
    cache = os.path.join(RESULTS, "cache", "bert")
    os.makedirs(cache, exist_ok=True)
    model = bert_class(args.layers, args.d, args.heads, args.ffn)
    x = np.random.default_rng(0).standard_normal((args.calib + 1, args.tokens, args.d)).astype(np.float32)
    x1 = x[:1]
    with torch.no_grad():
        ref = model(torch.from_numpy(x1)).numpy()
    target = host_target()
    mod = tvm_lut.from_torch(model, torch.from_numpy(x1))
    rows: list[dict] = []

    def tvm_row(name: str, module, t0: float, extra: dict) -> None:
        """Compile, time and break down one TVM build; ``t0``: when its build (LUTify included) began."""
        ex = build(module, target)  # weights bound as constants: their transposes fold at compile time
        extra = {"build_s": time.time() - t0, **extra}
        art = speed.export_build(ex, [], [x1], os.path.join(cache, name.replace(" ", "_").replace("=", "")))
        _, vm, inputs, prm = speed._load(art)
        out = vm["main"](*(inputs + prm)).numpy()
        err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
        cos = float((out * ref).sum() / (np.linalg.norm(out) * np.linalg.norm(ref)))
        rows.append({"build": name, "ms": speed.tvm_ms(art), "breakdown": breakdown(art), "rel_err": err,
                     "cosine": cos, **extra})
        _log(f"{name}: {rows[-1]['ms']:.2f} ms")

    tvm_row("TVM exact (untuned)", mod, time.time(), {})
    for v in (int(s) for s in args.configs.split(",") if s.strip()):
        t0 = time.time()
        res = LUTify(x[1:], v=v, progress=False, target=target).run(mod)
        pq = [r for r in res.layers if r["method"] == "pq"]
        tvm_row(f"LUT V={v}", res.module, t0, {"lut_layers": len(pq), "layers": len(res.layers),
                                               "kernels": sorted({r.get("kernel", "") for r in pq})})
    try:
        import onnxruntime  # noqa: F401
    except ImportError:  # pragma: no cover - the bench extra installs it
        notes = baselines.INSTALL_HINT
    else:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        notes = ""
        path = os.path.join(cache, "bert.onnx")
        torch.onnx.export(model, (torch.from_numpy(x1),), path, input_names=["x"], output_names=["y"], dynamo=False)
        qdir = os.path.join(cache, "int8")
        os.makedirs(qdir, exist_ok=True)
        static = baselines.quantize_int8(path, {"x": x[1:]}, qdir, batch=1)
        dynamic = os.path.join(qdir, "dynamic.onnx")
        quantize_dynamic(path, dynamic, weight_type=QuantType.QInt8)
        for name, p in (("ONNX Runtime fp32", path), ("ONNX Runtime int8 static", static),
                        ("ONNX Runtime int8 dynamic", dynamic)):
            sess = baselines.ort_session(p, 1)
            out = sess.run(None, {"x": x1})[0]
            rows.append({"build": name, "ms": baselines.median_call_ms(lambda s=sess: s.run(None, {"x": x1}), repeat=5),
                         "rel_err": float(np.linalg.norm(out - ref) / np.linalg.norm(ref))})
            _log(f"{name}: {rows[-1]['ms']:.2f} ms")
    with torch.no_grad():
        t = torch.from_numpy(x1)
        rows.append({"build": "PyTorch", "ms": baselines.median_call_ms(lambda: model(t), repeat=5), "rel_err": 0.0})
    md = summarize(rows, vars(args), notes)
    print(md)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"cpu": host_cpu(), "threads": 1, "batch": 1, "model": vars(args), "rows": rows, "notes": notes},
                  f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(md)
    return 0


def summarize(rows: list[dict], model: dict, notes: str = "") -> str:
    """The markdown report: latency and ratios, then each TVM build's time by group."""
    cpu = host_cpu()
    by = {r["build"]: r for r in rows}
    fp32 = by.get("ONNX Runtime fp32", {}).get("ms")
    lines = [f"BERT-class encoder: {model['layers']} layers, d={model['d']}, {model['heads']} heads, FFN "
             f"{model['ffn']}, {model['tokens']} tokens; batch 1, one thread; {cpu['model']}.", "",
             "| build | ms | x ONNX Runtime fp32 | output rel. error vs exact | build s |", "|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{fp32 / r['ms']:.2f}" if fp32 else "n/a"
        build_s = f"{r['build_s']:.0f}" if "build_s" in r else ""
        lines.append(f"| {r['build']} | {r['ms']:.2f} | {ratio} | {r.get('rel_err', 0.0):.3f} | {build_s} |")
    tvm_rows = [r for r in rows if "breakdown" in r]
    if tvm_rows:
        lines += ["", "Where each TVM build's time goes (ms per call, VM instrument; sums exceed the latency by the "
                  "hook's overhead):", "", "| build | " + " | ".join(GROUPS) + " |", "|---" * (len(GROUPS) + 1) + "|"]
        for r in tvm_rows:
            lines.append(f"| {r['build']} | " + " | ".join(f"{r['breakdown'][g]:.2f}" for g in GROUPS) + " |")
    if notes:
        lines += ["", notes]
    return "\n".join(lines) + "\n"


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
