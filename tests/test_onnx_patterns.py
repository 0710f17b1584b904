"""ONNX graph patterns exported models have and our own exports do not, each in a small graph built here.

* mnist-8's pattern (ONNX zoo, opset 8, IR version 3): every initializer is also listed as a graph input, a
  weight arrives through a ``Reshape`` by a shape-only initializer (``Parameter193_reshape1_shape``), and
  biases are separate ``Add`` nodes. TVM's importer made each such initializer a parameter twice, so the
  compiled ``main`` expected more arguments than the model has ("expects 17 arguments ... but 9 were
  provided"), under every method and target.
* One initializer used by several nodes (two convs sharing a weight), and a weight arriving as a
  ``Constant`` node, with the initializers listed as inputs (IR 3) and not (IR 8).

Each model compiles through ``tvm-lut compile`` (with the latency step, where mnist-8 failed) for every
method and the CAM target; the exact build agrees with ONNX's reference evaluator; every conv/dense of the
graph is in the report; and ``tvm-lut run`` runs the artifact.
"""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper as h, numpy_helper as nh
from onnx.reference import ReferenceEvaluator

import tvm_lut
from tvm_lut.app import cli

RNG = np.random.default_rng(0)


def _model(nodes, inputs, outputs, inits, opset: int, ir: int) -> onnx.ModelProto:
    ins = [h.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs]
    if ir < 4:  # IR < 4: initializers are graph inputs too
        ins += [h.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in inits]
    outs = [h.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs]
    m = h.make_model(h.make_graph(nodes, "g", ins, outs, inits), opset_imports=[h.make_opsetid("", opset)])
    m.ir_version = ir
    onnx.checker.check_model(m)
    return m


def mnist8_pattern() -> onnx.ModelProto:
    """Conv + bias Add + ReLU + MaxPool, then a MatMul whose weight is a 4-d initializer reshaped by a
    shape initializer, as in the zoo's mnist-8 (opset 8, IR 3)."""
    f32 = np.float32
    inits = [nh.from_array((RNG.standard_normal((8, 1, 5, 5)) * 0.2).astype(f32), "Parameter5"),
             nh.from_array((RNG.standard_normal((8, 1, 1)) * 0.1).astype(f32), "Parameter6"),
             nh.from_array((RNG.standard_normal((8, 4, 4, 10)) * 0.1).astype(f32), "Parameter193"),
             nh.from_array(np.array([128, 10], np.int64), "Parameter193_reshape1_shape"),
             nh.from_array(np.array([1, 128], np.int64), "Pooling66_Output_0_reshape0_shape"),
             nh.from_array((RNG.standard_normal((1, 10)) * 0.1).astype(f32), "Parameter194")]
    nodes = [h.make_node("Conv", ["Input3", "Parameter5"], ["c"], kernel_shape=[5, 5], pads=[2, 2, 2, 2]),
             h.make_node("Add", ["c", "Parameter6"], ["a"]),
             h.make_node("Relu", ["a"], ["r"]),
             h.make_node("MaxPool", ["r"], ["p"], kernel_shape=[4, 4], strides=[4, 4]),
             h.make_node("Reshape", ["Parameter193", "Parameter193_reshape1_shape"], ["w"]),
             h.make_node("Reshape", ["p", "Pooling66_Output_0_reshape0_shape"], ["f"]),
             h.make_node("MatMul", ["f", "w"], ["m"]),
             h.make_node("Add", ["m", "Parameter194"], ["Plus214_Output_0"])]
    return _model(nodes, [("Input3", [1, 1, 16, 16])], [("Plus214_Output_0", [1, 10])], inits, opset=8, ir=3)


def shared_and_constant(ir: int) -> onnx.ModelProto:
    """A stem conv, two convs sharing one weight initializer, and a MatMul whose weight is a Constant node."""
    f32 = np.float32
    inits = [nh.from_array((RNG.standard_normal((8, 1, 3, 3)) * 0.3).astype(f32), "stem"),
             nh.from_array((RNG.standard_normal((8, 8, 3, 3)) * 0.2).astype(f32), "shared")]
    wc = nh.from_array((RNG.standard_normal((8 * 64, 10)) * 0.05).astype(f32), "wc")
    conv = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    nodes = [h.make_node("Conv", ["x", "stem"], ["s"], **conv), h.make_node("Relu", ["s"], ["s1"]),
             h.make_node("Conv", ["s1", "shared"], ["c1"], **conv), h.make_node("Relu", ["c1"], ["r1"]),
             h.make_node("Conv", ["r1", "shared"], ["c2"], **conv), h.make_node("Relu", ["c2"], ["r2"]),
             h.make_node("Flatten", ["r2"], ["f"]),
             h.make_node("Constant", [], ["wc"], value=wc),
             h.make_node("MatMul", ["f", "wc"], ["y"])]
    return _model(nodes, [("x", ["N", 1, 8, 8])], [("y", ["N", 10])], inits, opset=11, ir=ir)


PATTERNS = {"mnist8": (mnist8_pattern, (1, 16, 16), 2), "shared_ir3": (lambda: shared_and_constant(3), (1, 8, 8), 4),
            "shared_ir8": (lambda: shared_and_constant(8), (1, 8, 8), 4)}  # builder, input shape, layers


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_exact_import_agrees_with_the_onnx_reference(pattern):
    build, shape, _ = PATTERNS[pattern]
    model = build()
    x = RNG.standard_normal((1, *shape)).astype(np.float32)
    ref = ReferenceEvaluator(model).run(None, {model.graph.input[0].name: x})[0]
    import tvm

    vm = tvm.relax.VirtualMachine(tvm_lut.build(tvm_lut.from_onnx(model)), tvm.cpu())
    np.testing.assert_allclose(vm["main"](tvm.runtime.tensor(x)).numpy(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("flags", [[], ["--method", "lowrank"], ["--method", "butterfly"], ["--target", "cam"]],
                         ids=["pq", "lowrank", "butterfly", "cam"])
@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_every_method_and_target_compiles_and_runs(tmp_path, pattern, flags, capsys):
    build, shape, layers = PATTERNS[pattern]
    model = build()
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    name = model.graph.input[0].name
    calib = tmp_path / "calib.npz"
    np.savez(calib, **{name: RNG.standard_normal((64, *shape)).astype(np.float32)})
    out = tmp_path / "out"
    # the latency step runs the compiled model with its weight arguments: where mnist-8 failed
    latency = [] if flags == [] else ["--no-latency"]
    assert cli.main(["compile", str(path), "--calib", str(calib), "-o", str(out), "--all-layers", "-q",
                     *latency, *flags]) == 0, capsys.readouterr().err
    rep = json.load(open(out / "report.json"))
    assert len(rep["layers"]) == layers  # every conv/dense of the graph, converted or exact with a reason
    for r in rep["layers"]:
        assert r["method"] != "exact" or r.get("reason"), r
    if flags == []:
        assert rep["latency"]["lut_ms"] > 0
    x = tmp_path / "x.npz"
    np.savez(x, **{name: RNG.standard_normal((3, *shape)).astype(np.float32)})
    assert cli.main(["run", str(out), "--input", str(x), "--output", str(tmp_path / "y.npz")]) == 0
    y = np.load(tmp_path / "y.npz")
    assert y[y.files[0]].shape == (3, 10) and np.isfinite(y[y.files[0]]).all()


def computed_reshape() -> onnx.ModelProto:
    """A Reshape whose shape is computed from the input's (``Shape -> Gather -> Unsqueeze -> Concat``), as
    exporters write ``x.view(x.size(0), -1)`` (MobileViT's and Swin's TorchScript exports): TVM's importer
    rejects a Reshape whose shape is not known when it reads the graph."""
    f32 = np.float32
    inits = [nh.from_array((RNG.standard_normal((8, 4, 3, 3)) * 0.3).astype(f32), "conv.weight"),
             nh.from_array((RNG.standard_normal((8 * 36, 10)) * 0.05).astype(f32), "fc.weight"),
             nh.from_array(np.array(0, np.int64), "zero"), nh.from_array(np.array([0], np.int64), "axes"),
             nh.from_array(np.array([-1], np.int64), "minus_one")]
    nodes = [h.make_node("Conv", ["x", "conv.weight"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             h.make_node("Relu", ["c"], ["r"]),
             h.make_node("Shape", ["r"], ["s"]),
             h.make_node("Gather", ["s", "zero"], ["n"], axis=0),
             h.make_node("Unsqueeze", ["n", "axes"], ["n1"]),
             h.make_node("Concat", ["n1", "minus_one"], ["shape"], axis=0),
             h.make_node("Reshape", ["r", "shape"], ["f"]),
             h.make_node("MatMul", ["f", "fc.weight"], ["y"])]
    return _model(nodes, [("x", ["N", 4, 6, 6])], [("y", ["N", 10])], inits, opset=13, ir=8)


def test_a_reshape_computed_from_the_input_shape_imports_and_compiles(tmp_path, capfd):
    import tvm

    model = computed_reshape()
    x = RNG.standard_normal((2, 4, 6, 6)).astype(np.float32)
    ref = ReferenceEvaluator(model).run(None, {"x": x})[0]
    capfd.readouterr()
    mod = tvm_lut.from_onnx(model, batch=2)
    noise = capfd.readouterr()
    assert "BlockBuilder destroyed" not in noise.err and "Error converting" not in noise.out  # the first try is quiet
    assert sorted(lay.name for lay in tvm_lut.frontend.graph.find_layers(mod)) == ["conv", "fc"]  # source names kept
    vm = tvm.relax.VirtualMachine(tvm_lut.build(mod), tvm.cpu())
    np.testing.assert_allclose(vm["main"](tvm.runtime.tensor(x)).numpy(), ref, rtol=1e-4, atol=1e-5)
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    np.savez(tmp_path / "calib.npz", x=RNG.standard_normal((64, 4, 6, 6)).astype(np.float32))
    assert cli.main(["compile", str(path), "--calib", str(tmp_path / "calib.npz"), "-o", str(tmp_path / "out"),
                     "--all-layers", "-q", "--no-latency"]) == 0
    rep = json.load(open(tmp_path / "out" / "report.json"))
    assert {r["name"]: r["method"] for r in rep["layers"]} == {"conv": "pq", "fc": "pq"}
