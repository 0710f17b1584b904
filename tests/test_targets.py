"""A target is one object (``tvm_lut.targets``): the built-in kinds answer the same questions, no other
module asks which kind a target is, and a kind registered from outside the package is used end to end."""

import ast
import pathlib

import numpy as np
import pytest
import torch
import tvm

import tvm_lut
from tvm_lut import targets
from tvm_lut.errors import TargetError
from tvm_lut.runtime.build import BatchRunner, compile_with_params

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_names_resolve_to_their_kinds_and_tvm_targets_are_classified():
    x86, arm, cam = targets.resolve("x86"), targets.resolve("arm"), targets.resolve("cam")
    assert (type(x86), type(arm), type(cam)) == (targets.X86, targets.Arm, targets.Cam)
    assert [t.name for t in (x86, arm, cam)] == ["x86", "arm", "cam"]
    assert [t.farm_key for t in (x86, arm, cam)] == ["x86", "arm64", None]
    # the same objects from the tvm targets they hold, as a user may pass them
    assert [type(targets.resolve(t.tvm)) for t in (x86, arm, cam)] == [targets.X86, targets.Arm, targets.Cam]
    assert targets.resolve(x86) is x86 and targets.resolve(None).name == "x86"
    assert x86.runs_here() and not arm.runs_here() and arm.local().name == "x86" and cam.local().name == "x86"
    assert arm.shuffle_isa().name == "neon" and cam.lookup_kernel("auto", 16, 4096, "conv2d", "l2") == "cam"
    assert arm.instruction_sets() == [] and x86.instruction_sets() == targets.instruction_sets("x86")
    assert x86.latency_note() is None and "simulator" in cam.latency_note() and "does not run here" in arm.latency_note()
    with pytest.raises(TargetError, match="unknown target 'sparc'.*x86, x86:CPU, arm, cam"):
        targets.resolve("sparc")


def test_no_module_outside_the_targets_asks_what_kind_a_target_is():
    """Which machine a target is (its triple, its keys, its family) is asked inside tvm_lut/targets only."""
    asked = []
    for path in [p for d in ("tvm_lut", "relay_passes", "tir_schedules") for p in (ROOT / d).rglob("*.py")]:
        if "targets" in path.relative_to(ROOT).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in ("mtriple", "keys"):
                asked.append(f"{path.name}:{node.lineno} {node.value!r}")
            if isinstance(node, ast.Attribute) and node.attr == "family":
                asked.append(f"{path.name}:{node.lineno} .family")
            if (isinstance(node, ast.Compare) and "target" in ast.unparse(node.left)
                    and not ast.unparse(node.left).startswith("args.")  # echoing the user's flag is not asking
                    and any(isinstance(c, ast.Constant) and isinstance(c.value, str) for c in node.comparators)):
                asked.append(f"{path.name}:{node.lineno} == {ast.unparse(node.comparators[0])}")
    assert not asked, asked


class GatherOnly(targets.X86):
    """This host, with every PQ layer on the gather readout: a kind of target defined outside the package."""

    family = "x86-gather"
    names = ("x86-gather",)

    @classmethod
    def from_name(cls, name):
        return cls.host() if name == "x86-gather" else None

    @classmethod
    def claims(cls, tvm_target):
        return False  # a plain tvm target stays the built-in X86

    @property
    def name(self):
        return "x86-gather"

    def shuffle_isa(self, grouped=True):
        return None


@pytest.fixture
def gather_only():
    targets.register(GatherOnly)
    yield GatherOnly
    targets.unregister(GatherOnly)


def test_a_target_registered_from_outside_is_used_end_to_end(gather_only):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(32 * 64, 10)).eval()
    x = np.random.default_rng(0).standard_normal((64, 3, 8, 8)).astype(np.float32)
    mod = tvm_lut.from_torch(model, torch.from_numpy(x[:8]))

    def outputs(target, **kw):
        p = tvm_lut.LUTify(x, all_layers=True, target=target, progress=False, **kw)
        res = p.run(mod)
        lut = res.module
        ex, params = compile_with_params(lut, target)
        return res.layers, BatchRunner(ex, [v for _, v in params], [("x", (8, 3, 8, 8), "float32")]).run({"x": x})[0]

    assert "x86-gather" in targets.TARGETS
    layers, got = outputs("x86-gather")
    assert [r["kernel"] for r in layers] == ["gather", "gather"]
    # the same tables and readout as the built-in x86 target told to gather: the same outputs, bit for bit
    ref_layers, want = outputs("x86", lookup="gather")
    assert [r["kernel"] for r in ref_layers] == ["gather", "gather"]
    np.testing.assert_array_equal(got, want)
    assert isinstance(targets.resolve("x86-gather").tvm, tvm.target.Target)
