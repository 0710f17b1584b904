"""What users compare a LUT build against, timed in the same process on the same batch and threads.

* **ONNX Runtime fp32**: the source ONNX model as it is.
* **ONNX Runtime int8**: what a user gets from ONNX Runtime's quantizer in minutes: ``quant_pre_process``,
  then ``quantize_static`` (QDQ format, per-channel int8 weights, uint8 activations) calibrated on the same
  calibration rows the LUT model was calibrated on.
* **PyTorch** eager, where the model came from torch.

Each is timed like the TVM builds (``build.median_ms``): one warm-up call sizes repeats of about 0.2 s,
and the median of three repeats is kept. When ``onnxruntime`` is not installed the result says so and how
to install it, instead of a number. With held-out labels, the int8 model's accuracy is measured too
(int8 is only a fair baseline if its accuracy is known).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable

import numpy as np

INSTALL_HINT = "ONNX Runtime is not installed: pip install onnxruntime (or pip install -e '.[bench]') to compare"
CALIBRATION_ROWS = 64  # rows the int8 quantizer calibrates on (of the LUT model's calibration rows)


def host_cpu() -> dict:
    """The CPU these figures were measured on: its model name, the SIMD flags the kernel reports
    (``/proc/cpuinfo``: AVX2, AVX-512, VNNI, BF16/FP16, AMX) and the x86 instruction sets LLVM targets for it
    (which can be fewer: under a hypervisor LLVM may take the CPU for an older model, without AMX)."""
    model, flags = "unknown", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = line.split(":", 1)[1].split()
    except OSError:
        pass
    simd = sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "sse4", "ssse3", "f16c")))
    from tvm_lut import targets

    return {"model": model, "cpu_flags": simd, "instruction_sets": targets.resolve("x86").instruction_sets()}


def median_call_ms(fn: Callable[[], object], repeat: int = 3, target_s: float = 0.2) -> float:
    """Median wall time of ``fn()`` in ms: one warm-up call sizes each repeat to about ``target_s``."""
    t = time.perf_counter()
    fn()
    once = time.perf_counter() - t
    number = int(min(max(target_s / max(once, 1e-6), 1), 1000))
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - t) / number)
    return statistics.median(times) * 1e3


def ort_session(path: str, threads: int):
    """An ONNX Runtime CPU session with ``threads`` intra-op threads (one inter-op), errors-only logging."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # errors only: the quantizer's models trigger informational warnings
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def quantize_int8(onnx_path: str, calibration: dict[str, np.ndarray], out_dir: str, batch: int = 1) -> str:
    """ONNX Runtime's static int8 model of ``onnx_path`` (QDQ, per-channel weights, uint8 activations),
    calibrated on ``calibration`` (input name -> samples, fed ``batch`` rows at a time: a model exported
    with a fixed batch takes no other); returns its path in ``out_dir``."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    src = onnx_path
    model = onnx.load(onnx_path)
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=13)
    if opset < 13:  # per-channel QDQ needs DequantizeLinear's axis (opset 13): convert old models first
        from onnx import version_converter

        src = os.path.join(out_dir, "opset13.onnx")
        onnx.save(version_converter.convert_version(model, 13), src)
    pre = os.path.join(out_dir, "pre.onnx")
    try:
        quant_pre_process(src, pre, skip_symbolic_shape=False)
    except Exception:  # shape inference it cannot do: quantize the model as it is
        pre = src
    names = list(calibration)
    rows = min(len(v) for v in calibration.values())
    chunks = max(rows // batch, 1)

    class _Reader(CalibrationDataReader):
        def __init__(self):
            self.i = 0

        def get_next(self):
            if self.i >= chunks:
                return None
            s, self.i = self.i * batch, self.i + 1
            return {n: _rows(calibration[n][s:s + batch], batch) for n in names}

    q = os.path.join(out_dir, "int8.onnx")
    common = dict(quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                  weight_type=QuantType.QInt8)
    try:
        quantize_static(pre, q, _Reader(), **common)
    except ValueError:
        # onnxruntime's int32-bias weight-scale adjustment fails on some per-channel graphs (a bias Add
        # after the conv, as in the ONNX zoo's mnist-8): quantize without that adjustment
        quantize_static(pre, q, _Reader(), extra_options={"QDQDisableWeightAdjustForInt32Bias": True}, **common)
    return q


def _rows(x: np.ndarray, batch: int) -> np.ndarray:
    """``x`` with exactly ``batch`` rows (the last repeated when there are fewer)."""
    return x if len(x) == batch else np.concatenate([x, np.repeat(x[-1:], batch - len(x), 0)])


def _batch_inputs(sess, inputs: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """The session's inputs at ``batch`` rows (by name; a single unnamed input by position)."""
    names = [i.name for i in sess.get_inputs()]
    if set(names) <= set(inputs):
        return {n: inputs[n][:batch] for n in names}
    if len(names) == 1 and len(inputs) == 1:
        return {names[0]: next(iter(inputs.values()))[:batch]}
    raise ValueError(f"ONNX inputs {names} do not match the calibration inputs {sorted(inputs)}")


def ort_top1(sess, inputs: dict[str, np.ndarray], batch: int) -> np.ndarray:
    """The session's top-1 class per row of ``inputs``, ``batch`` rows per call (the last chunk padded)."""
    n = min(len(v) for v in inputs.values())
    preds = []
    for s in range(0, n, batch):
        chunk = {k: v[s:s + batch] for k, v in inputs.items()}
        valid = min(batch, n - s)
        if valid < batch:  # a fixed-batch model: pad the last chunk
            chunk = {k: np.concatenate([v, np.repeat(v[-1:], batch - valid, 0)]) for k, v in chunk.items()}
        out = sess.run(None, _batch_inputs(sess, chunk, batch))[0]
        preds.append(out.reshape(len(out), -1).argmax(-1)[:valid])
    return np.concatenate(preds)


def measure(*, batch: int, threads: int, calibration: dict[str, np.ndarray], onnx_model=None, torch_module=None,
            held: dict[str, np.ndarray] | None = None, labels: np.ndarray | None = None) -> dict:
    """Latency (ms per batch) of each baseline that applies; ``notes`` says why one is missing.

    ``onnx_model``: a path or ``onnx.ModelProto`` of the source model; ``torch_module``: the source torch
    module; ``calibration``: input name -> samples (the LUT model's calibration rows); ``held``/``labels``:
    held-out rows for the int8 model's accuracy."""
    out: dict = {"batch": batch, "threads": threads, "cpu": host_cpu(), "notes": []}
    if onnx_model is not None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            out["notes"].append(INSTALL_HINT)
        else:
            import onnx

            with tempfile.TemporaryDirectory(prefix="tvm_lut_ort_") as tmp:
                path = onnx_model if isinstance(onnx_model, (str, os.PathLike)) else os.path.join(tmp, "model.onnx")
                if not isinstance(onnx_model, (str, os.PathLike)):
                    onnx.save(onnx_model, path)
                fp32 = ort_session(str(path), threads)
                feed = _batch_inputs(fp32, calibration, batch)
                out["onnxruntime_fp32_ms"] = median_call_ms(lambda: fp32.run(None, feed))
                try:
                    cal = {k: v[:max(CALIBRATION_ROWS, batch)] for k, v in calibration.items()}
                    int8 = ort_session(quantize_int8(str(path), cal, tmp, batch), threads)
                except Exception as exc:  # a model the quantizer cannot handle: say so, keep the rest
                    out["notes"].append(f"ONNX Runtime int8: quantize_static failed ({type(exc).__name__}: {exc})")
                else:
                    feed8 = _batch_inputs(int8, calibration, batch)
                    out["onnxruntime_int8_ms"] = median_call_ms(lambda: int8.run(None, feed8))
                    if held is not None and labels is not None:
                        out["onnxruntime_int8_accuracy"] = float((ort_top1(int8, held, batch) == labels).mean() * 100)
                        out["onnxruntime_fp32_accuracy"] = float((ort_top1(fp32, held, batch) == labels).mean() * 100)
    else:
        out["notes"].append("ONNX Runtime: not measured (the model is not an ONNX file)")
    if torch_module is not None:
        import torch

        args = tuple(torch.from_numpy(np.ascontiguousarray(v[:batch])) for v in calibration.values())
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with torch.inference_mode():
                out["pytorch_ms"] = median_call_ms(lambda: torch_module(*args))
        finally:
            torch.set_num_threads(before)
    return out
