"""What the simulated CAM (``--target cam``, PECAN's mapping) would spend per inference, per model and distance.

    python benchmarks/cam.py [--out benchmarks/results] [--cam-param arrays=32 ...]

For LeNet-5 (MNIST), ResNet-20 and a ResNet-18-class CIFAR model at batch 1, every conv/dense layer but the
first conv becomes a K=16 PQ layer (V=9 for 3x3 convs, else 4: the defaults). The costs depend on the layer
shapes only, so the weights are random and no calibration runs. Per model and distance (``l1`` = PECAN-D,
``l2`` = LUT-NN): searches, table reads, cycles, time at the simulator's clock, CAM energy, and the
multiplies left (the CAM's: zero for PECAN-D; the host's: one dequantising FMA per output).

For scale, the last columns price the exact layers' multiply-adds with the same 45 nm figures
(Horowitz, ISSCC 2014: fp32 multiply 3.7 pJ + add 0.9 pJ; int8 multiply 0.2 pJ + add 0.03 pJ), arithmetic
only: unlike the CAM figure they leave out every memory access, so they flatter the exact model.
The CAM figures are estimates from a documented cost model (``tvm_lut/targets/cam_simulator.py``), not a chip measurement.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

import tvm_lut
from tvm_lut.frontend import graph
from tvm_lut.math import pq
from tvm_lut.targets import cam_simulator as cam
from tvm_lut.train import models

MODELS = {
    "LeNet-5 (MNIST)": (models.LeNet5, {}, (1, 1, 28, 28)),
    "ResNet-20 (CIFAR)": (models.CifarResNet, {}, (1, 3, 32, 32)),
    "ResNet-18-class (CIFAR)": (models.CifarResNet, {"widths": (64, 128, 256, 512), "blocks": 2}, (1, 3, 32, 32)),
}
FP32_MAC_PJ = 3.7 + 0.9
INT8_MAC_PJ = 0.2 + 0.03


def pq_records(model, shape, distance: str) -> tuple[list[dict], int]:
    """PQ layer records as LUTify writes them (first conv and unsupported layers exact), and the exact
    multiply-adds of the converted layers."""
    mod = tvm_lut.from_torch(model.eval(), torch.zeros(shape))
    layers = graph.find_layers(mod)
    records, macs = [], 0
    first_conv = next(l.name for l in layers if l.kind == "conv2d")
    for l in layers:
        if l.unsupported or l.name == first_conv:
            continue
        v = pq.default_subvector_len(l.kind, l.conv["kernel_hw"] if l.conv else None)
        records.append({"name": l.name, "method": "pq", "rows": l.rows, "c": pq.num_subspaces(l.d, v), "k": 16,
                        "v": v, "m": l.m, "distance": distance})
        macs += l.rows * l.d * l.m
    return records, macs


def main(out: str, overrides: dict) -> list[dict]:
    params = cam.CAMParams.from_env().with_overrides(overrides)
    rows = []
    for name, (cls, kwargs, shape) in MODELS.items():
        torch.manual_seed(0)
        model = cls(**kwargs)
        for distance in ("l1", "l2"):
            records, macs = pq_records(model, shape, distance)
            rep = cam.model_report(records, params)
            t = rep["total"]
            rows.append({"model": name, "distance": distance, "layers": len(records), **{k: t[k] for k in t},
                         "exact_macs": macs, "exact_fp32_arith_nj": macs * FP32_MAC_PJ * 1e-3,
                         "exact_int8_arith_nj": macs * INT8_MAC_PJ * 1e-3, "per_layer": rep["layers"]})
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "cam.json"), "w") as f:
        json.dump({"params": params.__dict__, "sources": cam.SOURCES, "rows": rows}, f, indent=1)
    head = ("model", "dist", "PQ layers", "searches", "reads", "CAM mul", "host mul", "cycles", "time us",
            "CAM nJ", "exact MACs", "fp32 MAC nJ*", "int8 MAC nJ*")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([r["model"], r["distance"], str(r["layers"]), f"{r['searches']:,}",
                                        f"{r['reads']:,}", f"{r['cam_mul']:,}", f"{r['host_mul']:,}",
                                        f"{r['cycles']:,}", f"{r['time_us']:.1f}", f"{r['energy_nj']:.0f}",
                                        f"{r['exact_macs']:,}", f"{r['exact_fp32_arith_nj']:.0f}",
                                        f"{r['exact_int8_arith_nj']:.0f}"]) + " |")
    lines.append("")
    lines.append("batch 1; CAM parameters: " + ", ".join(f"{k}={v}" for k, v in params.__dict__.items())
                 + " (sources: tvm_lut/targets/cam_simulator.py). *arithmetic only, no memory traffic: a lower bound for the "
                   "exact model, while the CAM figure includes its table reads.")
    with open(os.path.join(out, "cam.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--cam-param", action="append", default=[], metavar="NAME=VALUE")
    a = ap.parse_args()
    main(a.out, cam.CAMParams.parse_cli(a.cam_param))
