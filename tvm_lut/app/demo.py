"""``tvm-lut demo``: the main job on embedded data, offline, in well under 3 minutes on 2 cores.

Train a LeNet-5 on the embedded MNIST subset, import it with ``from_torch``, convert every layer to
table lookup (``LUTify(all_layers=True)``), compile exact and LUT models for this x86 host, and print
accuracy on the embedded test images, latency against ONNX Runtime fp32 and int8 and PyTorch (same process,
``tvm_lut.app.baselines``), operations and table storage; write the artifact (runnable with ``tvm-lut run``), the test data as ``.npz`` and a PNG chart.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

BATCH = 16


def _chart(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [r for r in report["layers"] if "exact_ops" in r]
    names = [r["name"] for r in layers]
    x = np.arange(len(names))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    ax = axes[0]
    ax.bar(x - 0.2, [r["exact_ops"]["mul"] / 1e3 for r in layers], 0.4, label="exact")
    ax.bar(x + 0.2, [r.get("lut_ops", r["exact_ops"])["mul"] / 1e3 for r in layers], 0.4, label="LUT")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("multiplies per image (k)")
    ax.legend()
    ax.set_title("multiplies")
    ax = axes[1]
    ax.bar(x - 0.2, [r["weight_bytes"] / 1e3 for r in layers], 0.4, label="fp32 weights")
    ax.bar(x + 0.2, [(r.get("table_bytes", 0) + r.get("codebook_bytes", 0)) / 1e3 for r in layers], 0.4,
           label="int8 tables + codebooks")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("kB")
    ax.legend()
    ax.set_title("storage")
    ax = axes[2]
    for name, ms, top1, lut in chart_points(report):
        ax.scatter(ms, top1, marker="o" if lut else "s", color="C1" if lut else "C0", zorder=3)
        ax.annotate(name, (ms, top1), fontsize=7, xytext=(4, 3), textcoords="offset points")
    lat = report["latency"]
    ax.set_xscale("log")
    ax.set_xlabel(f"ms per batch of {lat['batch']}, {lat['threads']} threads (log)")
    ax.set_ylabel("accuracy on the test images (%)")
    ax.set_title("accuracy vs latency (LUT: circle)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def chart_points(report: dict) -> list[tuple[str, float, float, bool]]:
    """(name, ms, accuracy %, is ours) of every build with both measured: LUT, TVM exact and the baselines
    (ONNX Runtime fp32 and int8 when installed, PyTorch), all timed in this process on this machine."""
    acc, lat, base = report["accuracy"], report["latency"], report.get("baselines") or {}
    pts = [("LUT (tvm-lut)", lat["lut_ms"], acc["lut"], True), ("TVM exact (untuned)", lat["exact_ms"], acc["exact"], False)]
    for key, name in (("onnxruntime_fp32", "ONNX Runtime fp32"), ("onnxruntime_int8", "ONNX Runtime int8")):
        if base.get(f"{key}_ms") and base.get(f"{key}_accuracy") is not None:
            pts.append((name, base[f"{key}_ms"], base[f"{key}_accuracy"], False))
    if base.get("pytorch_ms") and report.get("pytorch_accuracy") is not None:
        pts.append(("PyTorch", base["pytorch_ms"], report["pytorch_accuracy"], False))
    return pts


def main(out: str = "tvm-lut-demo", epochs: int = 3, calib_images: int = 2048, progress: bool = True) -> dict:
    import torch

    import tvm_lut
    from tvm_lut.app import pipeline
    from tvm_lut.app.report import format_report
    from tvm_lut.train import models

    t0 = time.time()
    torch.manual_seed(0)
    data = models.load_mnist_subset()
    print(f"[1/4] training LeNet-5 on {len(data['train_images'])} embedded MNIST images ({epochs} epochs)")
    model = models.train_classifier(models.LeNet5(), data["train_images"], data["train_labels"], epochs=epochs,
                                    progress=progress)
    test_x, test_y = data["test_images"], data["test_labels"]
    with torch.no_grad():
        torch_acc = models.accuracy(model(torch.from_numpy(test_x)).numpy(), test_y)
        example = torch.from_numpy(test_x[:BATCH])

    print(f"[2/4] importing with tvm_lut.from_torch, batch {BATCH}")
    mod = tvm_lut.from_torch(model, example)

    print(f"[3/4] LUTify(all_layers=True) on {calib_images} calibration images, compiling exact and LUT for x86")
    os.makedirs(out, exist_ok=True)
    # the baselines users compare against, timed in this process: the same model through ONNX Runtime
    # (fp32, and int8 calibrated on the same images) and PyTorch
    onnx_path = os.path.join(out, "lenet5.onnx")
    torch.onnx.export(model, (example,), onnx_path, input_names=["x"], output_names=["logits"], dynamo=False)
    manifest = pipeline.compile_to_dir(
        os.path.join(out, "model"), mod, {"x": data["train_images"][:calib_images]},
        evaluation=({"x": test_x}, test_y), all_layers=True, source="LeNet-5 (embedded MNIST subset)",
        progress=progress, baselines={"onnx": onnx_path, "torch": model},
    )
    report = manifest["report"]
    report["pytorch_accuracy"] = torch_acc

    print("[4/4] results\n")
    print(format_report(report))
    print(f"\nPyTorch accuracy on the same test images: {torch_acc:.2f}%")
    np.savez(os.path.join(out, "test.npz"), x=test_x, labels=test_y)
    _chart(report, os.path.join(out, "demo.png"))
    with open(os.path.join(out, "demo.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nwrote {out}/model/ (deployable artifact), {out}/demo.png, {out}/demo.json, {out}/test.npz, "
          f"{out}/lenet5.onnx (the model ONNX Runtime ran)")
    print(f"try:  tvm-lut run {out}/model --input {out}/test.npz --output {out}/pred.npz")
    print(f"      tvm-lut report {out}/model")
    print(f"done in {time.time() - t0:.0f} s")
    return report
