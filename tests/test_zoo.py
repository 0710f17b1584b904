"""The zoo corpus (``tests/zoo.py``) through tvm-lut as a user would take it: import (torch, and ONNX from
both torch exporters), the exact build against PyTorch / ONNX Runtime, ``LUTify(all_layers=True)`` built
and run, and every conv/dense/matmul-with-constant-weight in the records, converted or exact with a reason.

Tolerance: the exact build's output is within 1e-4 of the reference's largest magnitude (fp32 reordering
only). The README's zoo table is checked against what this test measures (``from_torch`` route)."""

import os
import re

import numpy as np
import pytest
import torch
import tvm

import tvm_lut
from tests import zoo

TOL = 1e-4
README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def _readme_rows() -> dict[str, tuple[str, str, str]]:
    """model -> (found, converted, exact by reason) from README's zoo table."""
    rows = {}
    for line in open(README):
        m = re.match(r"\| `([^`]+)` \| (\d+) \| (\d+) \| (.*?) \|\s*$", line)
        if m:
            rows[m.group(1)] = (m.group(2), m.group(3), m.group(4))
    return rows


# known gaps, found by this corpus and not ours to fix: strict, so a fix makes them fail until removed here
KNOWN_GAPS: dict[tuple[str, str], str] = {
    ("swin", "onnx-dynamo-18"): "torch's dynamo ONNX exporter fails on Swin before tvm-lut sees a file (ConversionError: "
                                "aten.view of a non-contiguous transpose in the attention output)",
}


def _cases():
    for name, (_, default_routes) in zoo.MEMBERS.items():
        for route in zoo.ROUTES:
            marks = [] if route in default_routes else [pytest.mark.slow]
            if (name, route) in KNOWN_GAPS:
                marks.append(pytest.mark.xfail(strict=True, reason=KNOWN_GAPS[(name, route)]))
            yield pytest.param(name, route, marks=marks, id=f"{name}-{route}")


@pytest.mark.parametrize("name,route", list(_cases()))
def test_zoo_member(name, route, tmp_path):
    model, x = zoo.MEMBERS[name][0]()
    if route == "torch":
        with torch.no_grad():
            ref = model(x).numpy()
        mod = tvm_lut.from_torch(model, x)
        expected = zoo.weight_ops_torch(model, x)
    else:
        import onnx
        import onnxruntime as ort

        path = str(tmp_path / "model.onnx")
        zoo.export_onnx(model, x, path, route)
        proto = onnx.load(path)
        expected = zoo.weight_ops_onnx(proto)
        ref = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
        mod = tvm_lut.from_onnx(path)
    vm = tvm.relax.VirtualMachine(tvm_lut.build(mod), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x.numpy()))
    got = (got if hasattr(got, "numpy") else got[0]).numpy()
    assert got.shape == ref.shape and zoo.rel_err(got, ref) < TOL, (name, route, zoo.rel_err(got, ref))

    calib = zoo.calibration_like(x, 24)
    p = tvm_lut.LUTify(calibration=calib, all_layers=True, progress=False, max_calibration_rows=2048)
    res = p.run(mod)
    lut = res.module
    lvm = tvm.relax.VirtualMachine(tvm_lut.build(lut), tvm.cpu())
    out = lvm["main"](tvm.runtime.tensor(x.numpy()))
    out = (out if hasattr(out, "numpy") else out[0]).numpy()
    assert out.shape == ref.shape and np.isfinite(out).all()

    records = res.layers
    assert len(records) == expected, (name, route, len(records), expected)  # every weight op, none left out
    for r in records:
        assert r["method"] != "exact" or r["reason"], r
    if route == "torch":
        converted = sum(r["method"] != "exact" for r in records)
        reasons = "; ".join(f"{k} ×{v}" for k, v in zoo.exact_reasons(records).items()) or "-"
        want = _readme_rows().get(name)
        assert want == (str(len(records)), str(converted), reasons), (name, want, (len(records), converted, reasons))
