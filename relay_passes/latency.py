"""Per-layer latency, measured: each layer is compiled on its own, exact and as rewritten, and timed.

Shared machinery of the passes and the application: the priority mask ranks layers by the milliseconds
their lookup saves (``PriorityMask(rank="latency")``), ``tvm-lut compile --profile`` reports every layer's.

A rewrite that removes multiplies can still run slower than the dense layer it replaces (the top
complaint about factorised layers); counts do not show that, a clock does. For every conv/dense layer
of a LUTify run this builds two one-layer Relax modules on the layer's real input shape:

- exact: ``conv2d``/``matmul`` with the folded weight (+ bias), through the same pipeline and schedules
  as the model's build (``compile_with_params``); layers of one shape share one measurement;
- rewritten: the same module passed through the same rewrite (PQ, butterfly or low rank) with the
  already fitted tables / factors,

compiles both for the target and times them with TVM's ``time_evaluator`` (``BatchRunner.latency_ms``),
side by side in one process, **cold**: the layer's constants (weights, tables, centroids) are flushed from
the caches before every call (``build.median_ms(cold=True)``). That is how a layer finds them in a whole
model, where each layer's constants are read once per inference and the other layers' evict them; timed
warm, a lookup with megabytes of tables looks 3x faster than it runs in the model (ResNet-18 stage 4 at
V=9, 4 MB of tables: 0.061 ms warm, 0.143 ms cold, 0.146 ms measured inside the model by the VM's
instrument), and the priority mask converted such layers for savings the model never saw. The records
get ``latency = {"exact_ms", "rewrite_ms"}`` and ``slower_than_exact`` where the rewrite loses.

Given the model's own build (``executable`` and the pass's ``kernel_calls``), a rewritten layer that runs
nothing but kernels (PQ: encoder and lookup) is not compiled again: its kernels are taken from that build
and timed one by one on the layer's shapes and constants, their times summed (``rewrite_from:
"model"``). Code generation for those kernels is most of a layer's compile time (a dense encoder takes
LLVM seconds): in the demo the rewritten layers' compiles went from 11.4 to 2.4 s. Kernels called directly
skip the VM's call and output allocation, about a microsecond a layer here (the demo's dense layers: 12.7,
4.0 and 2.3 us from the model against 14.1, 5.1 and 3.3 compiled alone through the VM). Layers with other
ops in their rewrite (a pad, a transpose, a bias add, a matmul: butterfly, low rank) are still compiled
alone (``rewrite_from: "layer"``).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import tvm
from tvm import relax

from tvm_lut.frontend import graph
from tvm_lut.runtime.build import BatchRunner, compile_with_params, median_ms, resolve_target

from . import methods  # noqa: F401  (registers the built-in methods: the int8 one times exact layers)
from . import registry
from .registry import KeepExact
from .rewrite import KernelCall, LayerInput, Plan, rewrite

log = logging.getLogger("tvm_lut")


def _library_function(module, name: str):
    """The module of a built VM executable's module tree that holds the kernel ``name``, or None."""
    if module.implements_function(name):
        return module
    for sub in module.imports:
        got = _library_function(sub, name)
        if got is not None:
            return got
    return None


def kernel_steps(module, calls: list[KernelCall], x: np.ndarray) -> list[tuple] | None:
    """``[(library, name, arguments with the destination last)]`` for running ``calls`` from a built
    model's runtime module (``executable.mod``, or an exported library loaded back) on input ``x``,
    buffers preallocated, run once in order; None when a kernel is not in the build under its name
    (fused into something else by the compile pipeline)."""
    dev = tvm.cpu()
    libs = [_library_function(module, c.name) for c in calls]
    if any(lib is None for lib in libs):
        return None
    outs: list = []
    steps = []
    for c, lib in zip(calls, libs):
        args = []
        for a in c.args:
            if isinstance(a, LayerInput):
                args.append(tvm.runtime.tensor(np.ascontiguousarray(x, np.float32).reshape(a.shape), dev))
            elif isinstance(a, int):
                args.append(outs[a])
            else:
                args.append(a)
        outs.append(tvm.runtime.empty(c.shape, c.dtype, dev))
        steps.append((lib, c.name, args + [outs[-1]]))
    for lib, name, args in steps:  # in order: each kernel then reads what its producer wrote
        lib.get_function(name)(*args)
    return steps


def run_kernels(executable, calls: list[KernelCall], x: np.ndarray) -> np.ndarray | None:
    """The layer's output for input ``x`` computed by its kernels in the built model (None: not there)."""
    steps = kernel_steps(executable.mod, calls, x)
    return None if steps is None else steps[-1][2][-1].numpy()


def kernels_latency_ms(executable, calls: list[KernelCall], input_shape: tuple, seed: int = 0, repeat: int = 3,
                       target_s: float = 0.05) -> float | None:
    """The layer's kernels from a built model (``tvm.compile``'s executable), each timed with TVM's
    ``time_evaluator`` on preallocated buffers, summed (ms); None when one is not in the build.

    The layer input is Gaussian, not zeros: a gather lookup then touches the tables as real data would."""
    x = np.random.default_rng(seed).standard_normal(input_shape).astype(np.float32)
    steps = kernel_steps(executable.mod, calls, x)
    if steps is None:
        return None
    return sum(median_ms(lib, name, tvm.cpu(), args, repeat, target_s, cold=True) for lib, name, args in steps)


def single_layer_module(layer: graph.Layer) -> tvm.IRModule:
    """``main(x)`` = the layer alone (folded weight and bias as constants) on its input shape."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(list(layer.input_shape), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            if layer.kind == "conv2d":
                cv = layer.conv
                kh, kw = cv["kernel_hw"]
                w = np.ascontiguousarray(layer.weight.T.reshape(layer.m, -1, kh, kw))
                y = bb.emit(relax.op.nn.conv2d(x, relax.const(w), strides=cv["strides"], padding=cv["padding"],
                                               dilation=cv["dilation"]))
                bshape = (1, layer.m, 1, 1)
            else:
                y = bb.emit(relax.op.matmul(x, relax.const(np.ascontiguousarray(layer.weight))))
                bshape = (layer.m,)
            if layer.bias is not None:
                y = bb.emit(relax.op.add(y, relax.const(layer.bias.reshape(bshape).astype(np.float32))))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _signature(layer: graph.Layer) -> tuple:
    """What an exact layer's time depends on: kind, shapes, conv geometry, bias (not the weight values)."""
    conv = tuple(sorted((k, str(v)) for k, v in (layer.conv or {}).items())) if layer.kind == "conv2d" else ()
    return layer.kind, tuple(layer.input_shape), tuple(np.shape(layer.weight)), conv, layer.bias is None


def exact_latency_ms(layer: graph.Layer, target="x86", cache: dict | None = None, exact: str = "fp32") -> float:
    """The layer alone, exact, compiled as the model's build compiles it (``compile_with_params``: the same
    fusion and conv/matmul schedules), timed (ms). ``cache`` shares one measurement between layers of one
    shape (a ResNet's repeated blocks). ``exact="int8"``: as ``LUTify(exact="int8")`` builds a layer kept
    exact, the ``int8`` method where it applies (else fp32)."""
    key = (_signature(layer), str(resolve_target(target)), exact)
    if cache is not None and key in cache:
        return cache[key]
    plan = _int8_plan(layer, target) if exact == "int8" else None
    if plan is not None:
        ms, _ = rewrite_latency_ms(plan, target)
    else:
        ex, params = compile_with_params(single_layer_module(layer), target)
        ms = BatchRunner(ex, [v for _, v in params], [("x", tuple(layer.input_shape), "float32")]).latency_ms(cold=True)
    if cache is not None:
        cache[key] = ms
    return ms


def _int8_plan(layer: graph.Layer, target) -> Plan | None:
    """The layer as the ``int8`` method runs it (its time does not depend on the input scale: fitted on a
    unit range), or None where that method does not apply."""
    method = registry.get("int8")
    plan = Plan(layer, {"name": layer.name, "method": "int8"})
    try:
        method.fit_layer(plan, target, np.ones(1, np.float32))
    except KeepExact:
        return None
    return plan


def rewrite_latency_ms(plan, target="x86", executable=None, calls: list[KernelCall] | None = None,
                       schedule: bool = True) -> tuple[float, str]:
    """The rewritten layer's time (ms) and where it was measured: its kernels in ``executable`` (a build
    holding them, ``calls`` as the rewrite recorded them; ``"model"``), else the rewrite compiled alone on
    a one-layer module through the model's pipeline (``"layer"``)."""
    if executable is not None and calls:
        ms = kernels_latency_ms(executable, calls, tuple(plan.layer.input_shape))
        if ms is not None:
            return ms, "model"
    exact_mod = single_layer_module(plan.layer)
    (one,) = graph.find_layers(exact_mod)
    twin = dataclasses.replace(plan, layer=one)  # the same fitted rewrite on the one-layer module
    ex, params = compile_with_params(rewrite(exact_mod, [twin], schedule), target)
    sig = [("x", tuple(plan.layer.input_shape), "float32")]
    return BatchRunner(ex, [v for _, v in params], sig).latency_ms(cold=True), "layer"


def measure_layers(plans: list, target="x86", schedule: bool = True, executable=None,
                   kernel_calls: dict[str, list[KernelCall] | None] | None = None) -> None:
    """Time every layer of a LUTify run (``LUTResult.plans``) exact and rewritten; fills the records.

    With ``executable`` (the LUTify'd model compiled for ``target``) and ``kernel_calls``
    (``LUTResult.kernel_calls`` of that run), layers that run only kernels are timed from that build."""
    tgt = resolve_target(target)
    exact_cache: dict = {}
    for plan in plans:
        layer, rec = plan.layer, plan.record
        if layer.weight is None or layer.unsupported:
            continue
        exact_ms = exact_latency_ms(layer, tgt, exact_cache)
        rec["latency"] = {"exact_ms": exact_ms}
        if rec["method"] == "exact":
            continue
        rewrite_ms, source = rewrite_latency_ms(plan, tgt, executable, (kernel_calls or {}).get(layer.name),
                                                schedule)
        rec["latency"].update(rewrite_ms=rewrite_ms, rewrite_from=source)
        rec["slower_than_exact"] = bool(rewrite_ms > exact_ms)
        if rewrite_ms > exact_ms:
            log.warning("layer %s: the %s rewrite runs slower than the exact layer on %s (%.3f ms vs %.3f ms)",
                        layer.name, rec["method"], tgt.kind.name, rewrite_ms, exact_ms)


def layer_time(rec: dict) -> float | None:
    """The layer's time in the compiled model: rewritten if converted, else exact (ms)."""
    lat = rec.get("latency")
    if not lat:
        return None
    return lat.get("rewrite_ms", lat["exact_ms"]) if rec["method"] != "exact" else lat["exact_ms"]
