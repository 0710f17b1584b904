"""The build fuses the model's elementwise ops and vectorizes them; reductions and our kernels keep their code."""

import numpy as np
import tvm
from tvm import relax

from tvm_lut.runtime.elementwise import fuse_and_vectorize


def _module():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 16, 16), "float32"))
    r = relax.Var("r", relax.TensorType((8, 256), "float32"))
    with bb.function("main", [x, r]):
        with bb.dataflow():
            a = bb.emit(relax.op.reshape(r, (1, 8, 16, 16)))
            b = bb.emit(relax.op.nn.relu(relax.op.add(x, a)))
            m = bb.emit(relax.op.mean(b, axis=[2, 3]))  # a reduction: left to the default lowering
            o = bb.emit_output(relax.op.add(m, relax.const(1.0, "float32")))
        bb.emit_func_output(o)
    return bb.get()


def test_elementwise_chain_is_one_vectorized_function_and_computes_the_same():
    mod = _module()
    fused = fuse_and_vectorize(mod)
    prims = {gv.name_hint: f for gv, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    chain = [f for name, f in prims.items() if "relu" in name]
    assert len(chain) == 1 and "add" in [n for n in prims if "relu" in n][0]  # reshape + add + relu: one loop nest
    assert chain[0].attrs["tirx.is_scheduled"] and "T.vectorized" in chain[0].script()
    reductions = [f for name, f in prims.items() if "mean" in name]
    assert reductions and not any("tirx.is_scheduled" in (f.attrs or {}) for f in reductions)
    rng = np.random.default_rng(0)
    args = [tvm.runtime.tensor(rng.standard_normal((1, 8, 16, 16)).astype(np.float32)),
            tvm.runtime.tensor(rng.standard_normal((8, 256)).astype(np.float32))]
    target = tvm.target.Target("llvm")
    got = relax.VirtualMachine(tvm.compile(fused, target), tvm.cpu())["main"](*args).numpy()
    want = relax.VirtualMachine(tvm.compile(mod, target), tvm.cpu())["main"](*args).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_exact_convolutions_are_register_tiled_and_compute_what_torch_does():
    """conv2d (with a fused bias/ReLU, a stride, a 5x5 kernel, batch > 1) gets the tiled schedule; same values."""
    import torch
    from torch import nn

    import tvm_lut
    from tvm_lut.runtime.build import build

    torch.manual_seed(0)
    cases = [(nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU()), (1, 16, 16, 16)),
             (nn.Sequential(nn.Conv2d(3, 24, 3, stride=2, padding=1)), (2, 3, 28, 28)),
             (nn.Sequential(nn.Conv2d(8, 12, 5, padding=2), nn.ReLU()), (3, 8, 7, 7))]
    for model, shape in cases:
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        mod = tvm_lut.from_torch(model.eval(), torch.from_numpy(x))
        fused = fuse_and_vectorize(mod)
        convs = [f for _, f in fused.functions_items()
                 if isinstance(f, tvm.tirx.PrimFunc) and "conv2d_nchw" in f.script()]
        assert convs and all(f.attrs["tirx.is_scheduled"] for f in convs), shape
        got = relax.VirtualMachine(build(mod), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_matmuls_are_register_tiled_and_sum_exactly_as_the_default_lowering():
    """Attention's batched activation products and exact dense layers (with a fused bias) get the tiled
    schedule; the reduction order is kept, so the outputs equal the unscheduled build's bit for bit. A
    product too narrow for a vector keeps the default lowering, and still computes the same."""
    bb = relax.BlockBuilder()
    q = relax.Var("q", relax.TensorType((2, 24, 16), "float32"))
    k = relax.Var("k", relax.TensorType((2, 16, 48), "float32"))
    x = relax.Var("x", relax.TensorType((24, 32), "float32"))
    w = relax.Var("w", relax.TensorType((32, 37), "float32"))  # 37 columns: no vector width divides them
    with bb.function("main", [q, k, x, w]):
        with bb.dataflow():
            a = bb.emit(relax.op.matmul(q, k))
            d = bb.emit(relax.op.add(relax.op.matmul(x, relax.const(np.ones((32, 64), np.float32) / 7)),
                                     relax.const(np.arange(64, dtype=np.float32))))
            n = bb.emit(relax.op.matmul(x, w))
            o = bb.emit_output(relax.Tuple([a, d, n]))
        bb.emit_func_output(o)
    mod = bb.get()
    fused = fuse_and_vectorize(mod)
    prims = [f for _, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc) and "matmul" in f.script()]
    tiled = [f for f in prims if "tirx.is_scheduled" in (f.attrs or {})]
    assert len(prims) == 3 and len(tiled) == 2 and all("T.vectorized" in f.script() for f in tiled)
    rng = np.random.default_rng(1)
    args = [tvm.runtime.tensor(rng.standard_normal(s).astype(np.float32)) for s in ((2, 24, 16), (2, 16, 48),
                                                                                   (24, 32), (32, 37))]
    target = tvm.target.Target("llvm")
    got = relax.VirtualMachine(tvm.compile(fused, target), tvm.cpu())["main"](*args)
    want = relax.VirtualMachine(tvm.compile(mod, target), tvm.cpu())["main"](*args)
    for g, e in zip(got, want):
        np.testing.assert_array_equal(g.numpy(), e.numpy())


def test_gelu_and_softmax_run_as_vector_polynomials_within_float_rounding_of_torch():
    """``fast_math`` (the default): GELU's erf and softmax's exp as TVM's polynomials, so the GELU loop
    vectorizes; outputs stay within 1e-5 of torch's. ``fast_math=False`` keeps the libm forms."""
    import torch
    from torch import nn

    import tvm_lut
    from tvm_lut.runtime.build import build

    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 32), nn.Softmax(-1)).eval()
    x = np.random.default_rng(2).standard_normal((8, 16)).astype(np.float32) * 3
    mod = tvm_lut.from_torch(model, torch.from_numpy(x))
    fused = fuse_and_vectorize(mod)
    scripts = [f.script() for _, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    gelu = [s for s in scripts if "gelu" in s or "erf" in s.lower()]
    assert gelu and all("T.erf" not in s for s in scripts) and any("T.vectorized" in s for s in gelu)
    assert any("T.erf" in f.script() for _, f in fuse_and_vectorize(mod, fast_math=False).functions_items()
               if isinstance(f, tvm.tirx.PrimFunc))
    got = relax.VirtualMachine(build(mod), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
