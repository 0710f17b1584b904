"""Targets, building a Relax module into a VM executable, and running it batch by batch.

``build`` is what users call after ``LUTify``; ``compile_with_params`` is what the CLI uses to keep
the remaining (exact-layer) weights out of the ``.so`` as a params file. ``BatchRunner`` feeds a whole
dataset through a shape-specialised executable in chunks of its compiled batch size.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import tvm
from tvm import relax

from tvm_lut import targets
from tvm_lut.frontend import graph
from tvm_lut.runtime.elementwise import fuse_and_vectorize
from tvm_lut.targets import TARGETS, resolve_target  # noqa: F401  (re-exported: the names users know)


def vector_lanes(target) -> int:
    """float32 elements per vector register of ``target``: 16 (AVX-512), 8 (AVX/AVX2), else 4 (SSE, NEON)."""
    sets = set(targets.resolve(target).instruction_sets())
    return 16 if "avx512f" in sets else 8 if "avx" in sets else 4


def split_params(mod: tvm.IRModule) -> tuple[tvm.IRModule, list[tuple[str, np.ndarray]]]:
    """(module without the ``"params"`` attribute, [(weight name, value)] in parameter order)."""
    func = mod["main"]
    values = graph.param_values(func)
    if func.attrs is None or "params" not in func.attrs:
        return mod, []
    out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    out["main"] = func.without_attr("params")
    return out, list(values.items())


def bind_params(mod: tvm.IRModule) -> tvm.IRModule:
    """Bind every weight into the module as a constant and fold what becomes constant (transposes)."""
    stripped, params = split_params(mod)
    if not params:
        return stripped
    bound = relax.transform.BindParams("main", {k: v for k, v in params})(stripped)
    return relax.transform.FoldConstant()(bound)


def build(mod: tvm.IRModule, target="x86") -> relax.VMExecutable:
    """Compile a (LUTified) module into a self-contained Relax VM executable.

    Weights are bound as constants, so ``lib.export_library("model.so")`` is the whole model and
    ``relax.VirtualMachine(lib, tvm.cpu())["main"](x)`` runs it.
    """
    tgt = resolve_target(target)
    return tvm.compile(fuse_and_vectorize(bind_params(mod), vector_lanes(target)), tgt)


def compile_with_params(mod: tvm.IRModule, target="x86") -> tuple[relax.VMExecutable, list[tuple[str, np.ndarray]]]:
    """Compile keeping weights as runtime inputs: (executable, [(name, value)] to pass after the inputs)."""
    tgt = resolve_target(target)
    stripped, params = split_params(mod)
    return tvm.compile(fuse_and_vectorize(stripped, vector_lanes(target)), tgt), params


def _flatten(out) -> list[np.ndarray]:
    if isinstance(out, tvm.runtime.Tensor):
        return [out.numpy()]
    if hasattr(out, "numpy"):
        return [out.numpy()]
    res = []
    for o in out:
        res.extend(_flatten(o))
    return res


class BatchRunner:
    """Runs a shape-specialised VM executable over datasets of any length, chunk by chunk."""

    def __init__(self, ex, params: list[np.ndarray], inputs: list[tuple[str, tuple, str]], device=None):
        self.device = device or tvm.cpu()
        self.vm = relax.VirtualMachine(ex, self.device)
        self.params = [tvm.runtime.tensor(np.ascontiguousarray(p), self.device) for p in params]
        self.inputs = inputs
        self.batch = int(inputs[0][1][0])

    def _batches(self, arrays: dict[str, np.ndarray]) -> Iterator[tuple[list, int]]:
        n = len(next(iter(arrays.values())))
        for start in range(0, n, self.batch):
            chunk = []
            valid = min(self.batch, n - start)
            for name, shape, dtype in self.inputs:
                part = arrays[name][start : start + self.batch].astype(dtype, copy=False)
                if valid < self.batch:
                    pad = np.zeros((self.batch - valid,) + part.shape[1:], dtype)
                    part = np.concatenate([part, pad])
                chunk.append(tvm.runtime.tensor(np.ascontiguousarray(part), self.device))
            yield chunk, valid

    def run_batches(self, arrays: dict[str, np.ndarray]) -> Iterator[tuple[list[np.ndarray], int]]:
        """Yield (outputs of one chunk, number of valid rows in it)."""
        for chunk, valid in self._batches(arrays):
            outs = _flatten(self.vm["main"](*chunk, *self.params))
            yield outs, valid

    def run(self, arrays: dict[str, np.ndarray]) -> list[np.ndarray]:
        """All outputs for the whole dataset, concatenated over chunks (padding rows dropped)."""
        parts: list[list[np.ndarray]] = []
        for outs, valid in self.run_batches(arrays):
            parts.append([o[:valid] for o in outs])
        return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]

    def latency_ms(self, repeat: int = 3, target_s: float = 0.2, cold: bool = False) -> float:
        """Median wall time of one batch in milliseconds (TVM's time_evaluator, zeros as input).

        One warm-up call sets the number of calls per repeat so that each repeat takes about
        ``target_s``: fast models get many calls, a slow untuned build is not run for minutes.
        ``cold``: the parameters are evicted from the caches before every call (``median_ms``).
        """
        args = [tvm.runtime.tensor(np.zeros(shape, dtype), self.device) for _, shape, dtype in self.inputs]
        return median_ms(self.vm, "main", self.device, [*args, *self.params], repeat, target_s, cold)


def median_ms(module, name: str, device, args: list, repeat: int = 3, target_s: float = 0.2,
              cold: bool = False) -> float:
    """Median wall time of ``module[name](*args)`` in milliseconds (TVM's ``time_evaluator``). One warm-up
    call sets the number of calls per repeat so that each repeat takes about ``target_s``.

    ``cold``: every argument but the first (a layer's weights, tables, centroids, its output) is flushed
    from the caches before each timed call (TVM's ``cache_flush_cpu_non_first_arg``), as a layer finds them
    in a whole model at batch 1, where each layer's constants are read once per call and the other layers'
    evict them. A layer timed warm and alone keeps megabytes of tables in the L3 that the model streams
    from memory (a ResNet-18 stage-4 lookup: 0.061 ms warm, 0.143 ms cold, 0.146 ms in the model)."""
    once = module.time_evaluator(name, device, number=1, repeat=1)(*args).mean
    if cold:  # the flush runs before each repeat: one call per repeat, as many repeats as the warm calls
        calls = int(min(max(repeat * target_s / max(once, 1e-6), 5), 3000))
        res = module.time_evaluator(name, device, number=1, repeat=calls,
                                    f_preproc="cache_flush_cpu_non_first_arg")(*args)
        return float(np.median(res.results) * 1e3)
    number = int(min(max(target_s / max(once, 1e-6), 1), 1000))
    res = module.time_evaluator(name, device, number=number, repeat=repeat)(*args)
    return float(np.median(res.results) * 1e3)


def default_threads() -> int:
    return len(os.sched_getaffinity(0))
