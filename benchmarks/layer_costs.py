"""What one conv layer costs at each lookup setting, beside ONNX Runtime's fp32 and int8 conv: the per-layer
prices a mixed-V (or latency-aware) configuration of the ResNet-18-class model is assembled from.

    python benchmarks/layer_costs.py                 # every distinct 3x3 conv shape of the model, ~5 min
    python benchmarks/layer_costs.py --quick         # two shapes

For each distinct 3x3 conv of the ResNet-18-class CIFAR model (64-512 channels; random weights, ReLU'd
inputs as inside the network), at batch 1 on one thread: the layer compiled by LUTify at V=9 (one input
channel's 3x3 patch per codebook, LUT-NN's setting) and V=3 (one kernel row per codebook: three times the
codebooks, lookups and table bytes), each with the int8 (VNNI) and the fp32 encoder, and the same conv
alone in ONNX Runtime fp32 and int8 (static QDQ, per-channel weights, calibrated on the same inputs).
Everything in this process, one thread (``TVM_NUM_THREADS=1``, torch and ONNX Runtime likewise): read the
ratios within one run. Writes ``benchmarks/results/layer_costs.{json,md}`` with the CPU model and flags.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ["TVM_NUM_THREADS"] = "1"  # before tvm starts its thread pool

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import speed  # noqa: E402

from tvm_lut.app.baselines import host_cpu  # noqa: E402

RESULTS = os.path.join(HERE, "results")
#: (input channels, output channels, input map side, stride) of the model's 3x3 convs, once each
SHAPES = [(64, 64, 32, 1), (64, 128, 32, 2), (128, 128, 16, 1), (128, 256, 16, 2), (256, 256, 8, 1),
          (256, 512, 8, 2), (512, 512, 4, 1)]
QUICK_SHAPES = [(64, 64, 32, 1), (512, 512, 4, 1)]
#: configuration -> LUTify options
CONFIGS = {"V=9 int8": {"v": 9, "encoder": "int8"}, "V=9 fp32": {"v": 9, "encoder": "fp32"},
           "V=3 int8": {"v": 3, "encoder": "int8"}, "V=3 fp32": {"v": 3, "encoder": "fp32"}}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def measure_shape(cin: int, cout: int, side: int, stride: int, calib: int, cache: str) -> dict:
    """One conv shape: ms per call of every configuration and of ONNX Runtime fp32/int8."""
    import torch

    import tvm_lut
    from relay_passes import LUTify
    from tvm_lut.app import baselines
    from tvm_lut.runtime.build import compile_with_params
    from tvm_lut.targets import host_target

    torch.manual_seed(cin * 7 + cout + side)
    conv = torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 3, stride=stride, padding=1)).eval()
    x = np.maximum(np.random.default_rng(side).standard_normal((calib, cin, side, side)), 0).astype(np.float32)
    mod = tvm_lut.from_torch(conv, torch.from_numpy(x[:1]))
    target = host_target()
    tag = f"c{cin}_m{cout}_s{side}_st{stride}"
    row: dict = {"shape": {"cin": cin, "cout": cout, "side": side, "stride": stride,
                           "out_side": (side - 1) // stride + 1}}
    for name, opts in CONFIGS.items():
        t0 = time.time()
        res = LUTify(x, layers={"0": {"v": opts["v"]}}, all_layers=True, encoder=opts["encoder"],
                     target=target, progress=False).run(mod)
        ex, params = compile_with_params(res.module, target)
        rec = res.layers[0]
        art = speed.export_build(ex, params, [x[:1]], os.path.join(cache, f"{tag}_{name.replace(' ', '_').replace('=', '')}"))
        row[name] = {"ms": speed.tvm_ms(art), "encoder": rec.get("encoder"), "c": rec.get("c"),
                     "note": rec.get("encoder_note", ""), "build_s": time.time() - t0}
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        row["onnxruntime_note"] = baselines.INSTALL_HINT
        return row
    path = os.path.join(cache, f"{tag}.onnx")
    torch.onnx.export(conv, (torch.from_numpy(x[:1]),), path, input_names=["x"], output_names=["y"], dynamo=False)
    qdir = os.path.join(cache, f"{tag}_int8")
    os.makedirs(qdir, exist_ok=True)
    q = baselines.quantize_int8(path, {"x": x}, qdir, batch=1)
    for kind, p in (("ORT fp32", path), ("ORT int8", q)):
        sess = baselines.ort_session(p, 1)
        row[kind] = {"ms": baselines.median_call_ms(lambda s=sess: s.run(None, {"x": x[:1]}), repeat=5)}
    return row


def summarize(rows: list[dict]) -> str:
    cols = ["ORT fp32", "ORT int8", *CONFIGS]
    lines = ["| conv (in -> out, map, stride) | " + " | ".join(f"{c} ms" for c in cols)
             + " | V=3 / V=9 (int8) | V=3 int8 x ORT int8 |",
             "|---" * (len(cols) + 3) + "|"]
    for r in rows:
        s = r["shape"]
        cells = [f"{r[c]['ms']:.3f}" if c in r else "n/a" for c in cols]
        ratio = r["V=3 int8"]["ms"] / r["V=9 int8"]["ms"]
        vs = f"{r['ORT int8']['ms'] / r['V=3 int8']['ms']:.2f}" if "ORT int8" in r else "n/a"
        lines.append(f"| {s['cin']} -> {s['cout']}, {s['side']}x{s['side']}, {s['stride']} | " + " | ".join(cells)
                     + f" | {ratio:.2f} | {vs} |")
    fp32 = [f"{r['shape']['cin']}->{r['shape']['cout']}@{r['shape']['side']}: {c}" for r in rows for c in CONFIGS
            if c.endswith("int8") and r[c]["encoder"] != "int8"]
    if fp32:
        lines += ["", "Kept the fp32 encoder (not eligible for int8): " + "; ".join(fp32)]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="two shapes")
    ap.add_argument("--calib", type=int, default=16, help="calibration images per layer")
    ap.add_argument("--out", default=os.path.join(RESULTS, "layer_costs"))
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    cache = os.path.join(RESULTS, "cache", "layer_costs")
    os.makedirs(cache, exist_ok=True)
    rows = []
    for shape in QUICK_SHAPES if args.quick else SHAPES:
        _log(f"conv {shape}")
        rows.append(measure_shape(*shape, args.calib, cache))
    md = summarize(rows)
    cpu = host_cpu()
    md = (f"Per-layer cost at batch 1, one thread; {cpu['model']} ({', '.join(cpu.get('cpu_flags', []))}).\n\n"
          + md + "\n")
    print(md)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"cpu": cpu, "threads": 1, "batch": 1, "rows": rows}, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
