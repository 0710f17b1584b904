"""Per-layer latency (``relay_passes.latency``): rewritten layers timed from the model's own build."""

import dataclasses

import numpy as np
import pytest
import torch
import tvm
from torch import nn

import tvm_lut
from relay_passes import latency
from relay_passes.rewrite import LayerInput
from tvm_lut import targets
from tvm_lut.math import pq


def _lutify(model, x, example):
    mod = tvm_lut.from_torch(model, torch.from_numpy(example))
    p = tvm_lut.LUTify(calibration=x, progress=False)
    res = p.run(mod)
    lut = res.module
    return res, lut, tvm_lut.build(lut)


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_layer_kernels_from_the_model_build_reproduce_the_layer(kind):
    """The kernels LUTify records for a layer (encoder, then lookup, with the layer's constants) are found
    in the compiled model by name, and run alone on the layer's input they give the emulator's output bit
    for bit: what ``measure_layers`` times is the layer the model runs."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    if kind == "dense":  # D=32: no padding column, so the rewrite is the two kernels and nothing else
        model, x = nn.Sequential(nn.Linear(32, 48)).eval(), rng.standard_normal((256, 32)).astype(np.float32)
        example = x[:24]
    else:  # batch 1: the lookup writes NCHW, so only a reshape (a view) follows it
        model, x = nn.Sequential(nn.Conv2d(4, 24, 3, padding=1)).eval(), rng.standard_normal((16, 4, 8, 8)).astype(np.float32)
        example = x[:1]
    res, _, ex = _lutify(model, x, example)
    calls = res.kernel_calls["0"]
    # which readout the layer gets depends on the host's ISA (24 dense rows: gather on 64-lane VBMI,
    # shuffle on AVX2): expect what the pass's own rule decides for this target
    rec = res.layers[0]
    kernel = targets.resolve(res.options.target).lookup_kernel("auto", rec["k"], len(example) * (64 if kind == "conv" else 1),
                                                     rec["kind"], rec["distance"])
    assert rec["kernel"] == kernel
    want = ["lut_encode_0", "lut_lookup_0"] if kernel.startswith("shuffle") else \
        ["lut_encode_0", "lut_accumulate_0", "lut_dequantize_0"]
    assert [c.name for c in calls] == want
    assert isinstance(calls[0].args[0], LayerInput) and calls[1].args[0] == 0
    got = latency.run_kernels(ex, calls, example)
    if kind == "dense":
        ref = res.pq_layers["0"].emulate(example)
    else:
        rows = pq.im2col(example, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
        ref = res.pq_layers["0"].emulate(rows).reshape(1, 8 * 8, 24).transpose(0, 2, 1).reshape(1, 24, 64)
    np.testing.assert_array_equal(got.reshape(ref.shape), ref)
    vm = tvm.relax.VirtualMachine(ex, tvm.cpu())
    np.testing.assert_array_equal(got.reshape(example.shape[0], -1),
                                  vm["main"](tvm.runtime.tensor(example)).numpy().reshape(example.shape[0], -1))

    latency.measure_layers(res.plans, "x86", executable=ex, kernel_calls=res.kernel_calls)
    lat = res.layers[0]["latency"]
    assert lat["rewrite_from"] == "model" and lat["rewrite_ms"] > 0 and lat["exact_ms"] > 0
    assert res.layers[0]["slower_than_exact"] == (lat["rewrite_ms"] > lat["exact_ms"])


def test_layers_with_other_ops_or_missing_kernels_are_compiled_alone():
    """A rewrite that runs more than kernels (here the pad of D=30 to C*V=32 columns) records no kernel
    calls, and a kernel the build does not hold under its name is not guessed at: both layers are timed
    compiled alone, and the record says so."""
    torch.manual_seed(0)
    x = np.random.default_rng(1).standard_normal((256, 30)).astype(np.float32)
    res, _, ex = _lutify(nn.Sequential(nn.Linear(30, 48)).eval(), x, x[:16])
    assert res.layers[0]["method"] == "pq" and res.kernel_calls["0"] is None
    latency.measure_layers(res.plans, "x86", executable=ex, kernel_calls=res.kernel_calls)
    assert res.layers[0]["latency"]["rewrite_from"] == "layer" and res.layers[0]["latency"]["rewrite_ms"] > 0

    y = np.random.default_rng(2).standard_normal((256, 32)).astype(np.float32)
    q, _, ex = _lutify(nn.Sequential(nn.Linear(32, 48)).eval(), y, y[:16])  # q: that run's LUTResult
    renamed = {"0": [dataclasses.replace(c, name=c.name + "_gone") for c in q.kernel_calls["0"]]}
    assert latency.kernels_latency_ms(ex, renamed["0"], (16, 32)) is None
    assert latency.run_kernels(ex, renamed["0"], y[:16]) is None
    latency.measure_layers(q.plans, "x86", executable=ex, kernel_calls=renamed)
    assert q.layers[0]["latency"]["rewrite_from"] == "layer"
    latency.measure_layers(q.plans, "x86", executable=ex, kernel_calls=q.kernel_calls)
    assert q.layers[0]["latency"]["rewrite_from"] == "model"


def test_butterfly_and_lowrank_rewrites_record_no_kernel_chain():
    """Butterfly (slice + bias after its factor kernels) and low rank (matmuls) run more than kernels."""
    torch.manual_seed(0)
    x = np.random.default_rng(3).standard_normal((128, 32)).astype(np.float32)
    mod = tvm_lut.from_torch(nn.Sequential(nn.Linear(32, 48)).eval(), torch.from_numpy(x[:8]))
    for method, options in (("butterfly", {"butterfly_budget": 0.5}), ("lowrank", {})):
        p = tvm_lut.LUTify(calibration=x, progress=False, method=method, **options)
        res = p.run(mod)
        assert res.layers[0]["method"] == method and res.kernel_calls["0"] is None



def test_exact_layers_of_one_shape_share_one_measurement_compiled_like_the_model(monkeypatch):
    """``exact_latency_ms`` compiles a layer alone through the model's pipeline (``compile_with_params``,
    so the conv gets the model's schedules) and times it; two layers of one shape (different weights) share
    the measurement through the cache, a layer of another shape gets its own."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1),
                          nn.Conv2d(8, 16, 3, padding=1)).eval()
    mod = tvm_lut.from_torch(model, torch.zeros(1, 8, 8, 8))
    from tvm_lut.frontend import graph

    layers = graph.find_layers(mod)
    compiled = []
    real = latency.compile_with_params
    monkeypatch.setattr(latency, "compile_with_params", lambda m, t: compiled.append(1) or real(m, t))
    cache: dict = {}
    times = [latency.exact_latency_ms(layer, "x86", cache) for layer in layers]
    assert len(compiled) == 2 and times[0] == times[1] and all(t > 0 for t in times)


def test_exact_int8_times_the_int8_kernel_where_it_applies(monkeypatch):
    """``exact="int8"`` (``LUTify(exact="int8")``'s kept layers, what the latency-ranked mask measures a
    lookup against): an eligible conv is timed as the ``int8`` method's kernel, compiled alone; a conv the
    kernel cannot run (M=24 is not a multiple of 16) is timed as the fp32 conv; int8 and fp32 timings of
    one shape are cached apart."""
    from relay_passes.methods.int8 import REQUIRED_ISA
    from tvm_lut.frontend import graph

    if not set(REQUIRED_ISA) <= set(targets.resolve("x86").instruction_sets()):
        pytest.skip("host has no AVX-512 VBMI + VNNI (the int8 conv's target)")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.Conv2d(32, 24, 3, padding=1)).eval()
    eligible, other = graph.find_layers(tvm_lut.from_torch(model, torch.zeros(1, 8, 16, 16)))
    rewritten = []
    real = latency.rewrite_latency_ms
    monkeypatch.setattr(latency, "rewrite_latency_ms", lambda p, t: rewritten.append(p.method) or real(p, t))
    cache: dict = {}
    t8 = latency.exact_latency_ms(eligible, "x86", cache, "int8")
    assert rewritten == ["int8"] and t8 > 0
    assert latency.exact_latency_ms(other, "x86", cache, "int8") > 0 and rewritten == ["int8"]
    assert latency.exact_latency_ms(eligible, "x86", cache) > 0 and len(cache) == 3


def test_every_layer_timing_is_cold(monkeypatch):
    """Per-layer times are taken with the layer's constants flushed before every call (TVM's
    ``cache_flush_cpu_non_first_arg``), as the whole model finds them: the exact layer compiled alone and
    the lookup kernels taken from the model's build alike; one call per flush."""
    from tvm.relax import VirtualMachine

    timed = []
    for cls in (tvm.runtime.Module, VirtualMachine):
        real = cls.time_evaluator

        def spy(self, name, dev, *a, _real=real, **kw):
            timed.append((kw.get("f_preproc", ""), kw.get("number")))
            return _real(self, name, dev, *a, **kw)

        monkeypatch.setattr(cls, "time_evaluator", spy)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 32)).astype(np.float32)
    model = nn.Sequential(nn.Linear(32, 64)).eval()
    res, _, built = _lutify(model, x, x[:1])
    (plan,) = res.plans
    latency.measure_layers(res.plans, "x86", executable=built, kernel_calls=res.kernel_calls)
    rec = plan.record
    assert rec["latency"]["rewrite_from"] == "model" and rec["latency"]["exact_ms"] > 0
    measured = [t for t in timed if t[1] != 1 or t[0]]  # the warm-up calls aside (number=1, no flush)
    assert measured and all(t == ("cache_flush_cpu_non_first_arg", 1) for t in measured)
