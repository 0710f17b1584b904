"""Report: operation counts and bytes checked against hand calculation, and the printed table."""

import numpy as np
import torch
from torch import nn

import tvm_lut
from tvm_lut import relay
from tvm_lut.app import pipeline
from tvm_lut.app.report import format_report


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 5)  # 12x12 -> 8x8: R=64 rows, D=25, M=8, V=4 -> C=7, Dp=28
        self.fc = nn.Linear(8 * 8 * 8, 20)  # D=512, M=20, V=4 -> C=128
        self.out = nn.Linear(20, 16)  # D=20, M=16, V=4 -> C=5

    def forward(self, x):
        return self.out(torch.relu(self.fc(torch.flatten(torch.relu(self.conv(x)), 1))))


def _records(distance_out="l2"):
    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((64, 1, 12, 12)).astype(np.float32)
    mod = tvm_lut.from_torch(Tiny().eval(), torch.from_numpy(x[:2]))
    p = relay.transform.LUTify(calibration=x, all_layers=True, progress=False,
                               layers={"out": {"distance": distance_out}})
    res = p.run(mod)
    return {r["name"]: r for r in res.layers}


def test_counts_match_hand_calculation_l2():
    r = _records()
    K = 16
    conv = r["conv"]  # per image: R=64, D=25 (Dp=28, C=7), M=8, bias
    assert conv["exact_ops"] == {"mul": 64 * 25 * 8, "add": 64 * 24 * 8 + 64 * 8, "cmp": 0}
    assert conv["lut_ops"]["mul"] == 64 * (K * 28 + 8)  # encoder K*Dp + dequantise M
    assert conv["lut_ops"]["add"] == 64 * (K * 28 + 6 * 8 + 8)  # encoder K*Dp + accumulate (C-1)*M + bias M
    assert conv["lut_ops"]["cmp"] == 64 * 7 * 15
    assert conv["weight_bytes"] == 4 * (25 * 8 + 8)
    assert conv["table_bytes"] == 7 * 16 * 8 + 4 * 8 + 4 * 8
    assert conv["codebook_bytes"] == 4 * 7 * 16 * 4 + 4 * 7 * 16
    fc = r["fc"]  # R=1, D=512, C=128, M=20
    assert fc["exact_ops"]["mul"] == 512 * 20 and fc["exact_ops"]["add"] == 511 * 20 + 20
    assert fc["lut_ops"]["mul"] == K * 512 + 20 and fc["lut_ops"]["add"] == K * 512 + 127 * 20 + 20


def test_counts_cosine_and_l1():
    out = _records("cosine")["out"]  # D=20, C=5, V=4, M=16
    assert out["lut_ops"]["mul"] == 16 * 20 + 16 and out["lut_ops"]["add"] == 16 * 5 * 3 + 4 * 16 + 16
    out = _records("l1")["out"]
    assert out["lut_ops"]["mul"] == 16  # multiplier-free encoder; only the per-output dequantise scale
    assert out["lut_ops"]["add"] == 16 * 5 * 7 + 4 * 16 + 16
    assert out["codebook_bytes"] == 4 * 5 * 16 * 4 + 4 * 5 * 16


def test_printed_report_has_every_layer_totals_and_formulas():
    layers = list(_records().values())
    report = {"model": "tiny", "target": "x86", "batch": 2, "layers": layers, "totals": pipeline.totals(layers),
              "accuracy": {"exact": 90.0, "lut": 89.0, "drop": 1.0, "rows": 10, "agreement": 95.0},
              "latency": {"exact_ms": 1.0, "lut_ms": 0.5, "speedup": 2.0, "batch": 2, "threads": 2, "note": "n"}}
    text = format_report(report, exact_counts=True)
    for name in ("conv", "fc", "out", "TOTAL"):
        assert name in text
    assert str(64 * (16 * 28 + 8)) in text  # integer counts printed
    t = report["totals"]
    assert t["exact_mul"] == 64 * 25 * 8 + 512 * 20 + 20 * 16
    assert "drop +1.00 points" in text and "x2.00" in text and "accumulate add R*(C-1)*M" in text
