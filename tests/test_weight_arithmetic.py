"""Weights that an exporter leaves as arithmetic on parameters, found by the zoo corpus:

* torch's weight norm (``parametrizations.weight_norm``, wav2vec2's positional conv): the weight is
  ``g * v / ||v||``, computed in the graph from two parameters;
* a 2-D weight broadcast to a batched matmul (Swin's attention output projection): ``matmul(x, broadcast_to(W))``.

Both are layers like any other: found, named after the module, converted, and the LUT build close to the
exact one. Before the graph reader evaluated this arithmetic, neither was in the records at all.
"""

import numpy as np
import torch
import tvm

import tvm_lut
from tvm_lut.frontend import graph


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.utils.parametrizations.weight_norm(torch.nn.Conv2d(4, 8, 3, padding=1))
        self.proj = torch.nn.Parameter(torch.randn(8, 8) / 3)

    def forward(self, x):
        y = torch.relu(self.conv(x))  # (1, 8, 6, 6)
        t = y.flatten(2).transpose(1, 2).reshape(4, 9, 8)  # four "windows" of 9 tokens
        return torch.matmul(t, self.proj.expand(4, 8, 8))


def _run(mod, x):
    vm = tvm.relax.VirtualMachine(tvm_lut.build(mod), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def test_weight_norm_and_broadcast_weights_are_layers():
    net = _Net().eval()
    x = torch.randn(1, 4, 6, 6)
    mod = tvm_lut.from_torch(net, x)
    layers = {lay.name: lay for lay in graph.find_layers(mod)}
    assert set(layers) == {"conv", "proj"}, sorted(layers)
    conv, proj = layers["conv"], layers["proj"]
    assert conv.unsupported is None and proj.unsupported is None
    with torch.no_grad():
        w = net.conv.weight.detach().numpy()  # g * v / ||v||, as torch computes it
    np.testing.assert_allclose(conv.weight, w.reshape(8, -1).T, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(proj.weight, net.proj.detach().numpy())
    assert proj.input_shape == (4, 9, 8)

    with torch.no_grad():
        ref = net(x).numpy()
    np.testing.assert_allclose(_run(mod, x.numpy()), ref, rtol=1e-4, atol=1e-4)
    calib = np.random.default_rng(0).standard_normal((64, 4, 6, 6)).astype(np.float32)
    p = tvm_lut.LUTify(calibration=calib, all_layers=True, progress=False, v=2)
    res = p.run(mod)
    lut = res.module
    assert {r["name"]: r["method"] for r in res.layers} == {"conv": "pq", "proj": "pq"}
    out = _run(lut, x.numpy())
    assert out.shape == ref.shape and np.isfinite(out).all()
    assert np.abs(out - ref).max() < 0.5 * np.abs(ref).max()  # a lookup approximation of this model, not garbage
