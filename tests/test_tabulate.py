"""TabulateSubnetworks: per-pixel subnetworks of quantized inputs become lookup tables evaluated by TVM.

The pass's tables are the torch network's own (``hklut.tabulate``), the tabulated module computes what
the module it came from computes when TVM runs both, a subnetwork whose inputs are not quantized stays
with its reason, and the lookup kernel is bit-exact against its numpy reference on odd sizes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from torch import nn

from relay_passes import tabulate
from relay_passes.tabulate import TabulateSubnetworks
from tir_schedules import table_lookup
from tvm_lut.app import sr
from tvm_lut.errors import ModelError, OptionError
from tvm_lut.frontend.importer import from_torch
from tvm_lut.runtime.build import BatchRunner, compile_with_params
from tvm_lut.targets import host_target
from tvm_lut.train import hklut

RAMP = sr.calibration_ramp()


def _run(mod, x):
    ex, params = compile_with_params(mod, "x86")
    return BatchRunner(ex, [v for _, v in params], [("x", x.shape, "float32")]).run({"x": x})[0]


@pytest.fixture(scope="module")
def x2_net():
    torch.manual_seed(0)
    net = hklut.HKNet(scale=2, nf=8, depth=1).eval()
    mod = from_torch(net, torch.from_numpy(RAMP))
    return net, mod, TabulateSubnetworks({"x": RAMP}).run(mod)


def test_every_branch_unit_becomes_one_table_of_the_networks_values(x2_net):
    net, _, res = x2_net
    recs = {r["name"]: r for r in res.records}
    assert len(recs) == 5 and all(r["uses"] == 4 for r in recs.values())  # 4 rotations share a table
    want = hklut.tabulate(net)[0]
    for branch, tabs in (("msb", want.msb), ("lsb", want.lsb)):
        for name, table in tabs.items():
            rec = recs[f"stages.0.{branch}.{name}.mlp"]
            assert rec["exact"] and rec["levels"] == 16
            assert rec["entries"] == table.shape[0] and rec["bytes"] == table.size and rec["outputs"] == 4
            # TVM's tanh and torch's may round an entry differently just below an integer: at most one level
            diff = np.abs(res.tables[f"stages.0.{branch}.{name}.mlp"].reshape(table.shape).astype(int) - table)
            assert diff.max() <= 1 and (diff > 0).sum() <= table.size // 1000
    assert res.total_bytes == 3 * 16384 + 2 * 1024  # HKLUT-S's x2 stage: 3 MSB tables 16^3 x 4, 2 LSB 16^2 x 4
    assert tabulate.records(res.module)["total_bytes"] == res.total_bytes


def test_tabulated_module_computes_what_the_network_did(x2_net):
    _, mod, res = x2_net
    text = res.module.script()
    assert text.count("call_tir(cls.table_lookup") == 20 and "R.nn.conv2d(" not in text  # 5 units x 4 rotations
    img = np.random.default_rng(1).integers(0, 256, (1, 1, 16, 16)).astype(np.float32) / 255
    tabulated, network = _run(res.module, img), _run(mod, img)
    # the same values up to float rounding of the non-table ops (the build fuses them: FMA contraction);
    # no output moves by a level (1/255)
    np.testing.assert_allclose(tabulated, network, rtol=0, atol=1e-4)
    with torch.no_grad():
        torch_out = x2_net[0](torch.from_numpy(img)).numpy()
    assert np.mean(tabulated != torch_out) < 0.01  # measured: 0 of 1,024 differ


@pytest.mark.parametrize("kwargs,match", [({"levels": 1}, "within"), ({"levels": 300}, "within"),
                                          ({"levels": 256, "max_inputs": 4}, "entries per table")])
def test_bad_options_are_refused_naming_the_option(kwargs, match):
    with pytest.raises(OptionError, match=match):
        TabulateSubnetworks({"x": RAMP}, **kwargs)


def test_sr_tabulate_names_a_unit_the_pass_left(monkeypatch):
    """A unit whose inputs are not quantized stays in the graph, and ``sr.tabulate`` refuses to ship it."""
    torch.manual_seed(0)
    net = hklut.HKNet(scale=2, nf=8, depth=1).eval()
    # as if every input took more values than a table has levels (a network fed unquantized planes)
    monkeypatch.setattr(tabulate, "_steps", lambda values, levels: f"takes more than {levels} values")
    with pytest.raises(ModelError, match=r"stage 0 msb unit 'h' was not tabulated: input channel 0 takes more"):
        sr.tabulate(net)


def test_a_subnetwork_of_unquantized_inputs_stays_with_its_reason():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.Tanh()).eval()
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    mod = from_torch(net, torch.from_numpy(x))
    res = TabulateSubnetworks(x).run(mod)
    assert not res.tables and "more than 16 levels" in res.records[0]["reason"]
    assert "nn.conv2d" in res.module.script()


def test_a_unary_op_after_the_pixel_shuffle_goes_into_the_table():
    """Elementwise ops after the layout ops (here leaky ReLU and a scaling after a pixel shuffle) commute
    with the layout, so the table stores them; the tabulated module computes what the network did."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(2, 8, 1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = nn.functional.pixel_shuffle(self.b(torch.relu(self.a(x))), 2)
            return nn.functional.leaky_relu(y, 0.1) * 3.0

    levels = np.arange(256).reshape(1, 1, 16, 16) % 16
    calib = (np.concatenate([levels, levels.transpose(0, 1, 3, 2)], 1) / 16).astype(np.float32)
    mod = from_torch(Net().eval(), torch.from_numpy(calib))
    res = TabulateSubnetworks({"x": calib}).run(mod)
    text = res.module.script()
    assert len(res.tables) == 1 and "R.nn.leaky_relu" not in text and "R.multiply" not in text
    assert res.records[0]["ops"][-2:] == ["relax.nn.leakyrelu", "relax.multiply"]
    img = (np.random.default_rng(2).integers(0, 16, (1, 2, 16, 16)) / 16).astype(np.float32)
    err = res.records[0]["max_error"]
    np.testing.assert_allclose(_run(res.module, img), _run(mod, img), rtol=0, atol=err + 1e-5)


def test_a_table_whose_result_the_model_returns():
    """The tabulated chain is the whole model: the lookup's result stays the dataflow block's output."""
    torch.manual_seed(0)
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(2, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.Tanh())

        def forward(self, x):
            return self.body(x)

    net = Net().eval()
    levels = np.arange(256).reshape(1, 1, 16, 16) % 16
    calib = (np.concatenate([levels, levels.transpose(0, 1, 3, 2)], 1) / 16).astype(np.float32)
    mod = from_torch(net, torch.from_numpy(calib))
    res = TabulateSubnetworks({"x": calib}).run(mod)
    assert len(res.tables) == 1 and "R.nn.conv2d" not in res.module.script()
    img = (np.random.default_rng(3).integers(0, 16, (1, 2, 16, 16)) / 16).astype(np.float32)
    err = res.records[0]["max_error"]
    np.testing.assert_allclose(_run(res.module, img), _run(mod, img), rtol=0, atol=err + 1e-5)


@pytest.mark.parametrize("shape,c,steps", [((1, 3, 5, 7), 4, (16 / 255,) * 3), ((2, 2, 3, 33), 9, (1 / 255, 2 / 255))])
def test_lookup_kernel_is_bit_exact_against_numpy(shape, c, steps):
    rng = np.random.default_rng(0)
    levels = 16
    f = table_lookup.schedule(table_lookup.compute(shape, c, levels, steps, 0.25, -3.0))
    lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), host_target())
    k = rng.integers(0, levels, shape)
    x = (k * np.asarray(steps, np.float32)[None, :, None, None]).astype(np.float32)
    table = rng.integers(-128, 128, levels ** shape[1] * c).astype(np.int8)
    out = tvm.runtime.empty((shape[0], c, shape[2], shape[3]), "float32")
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(table), out)
    np.testing.assert_array_equal(out.numpy(), table_lookup.reference(x, table, c, levels, steps, 0.25, -3.0))
