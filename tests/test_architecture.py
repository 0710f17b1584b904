"""The walls between modules that import-linter cannot see.

``lint-imports`` (run by ``.ci/run``, contracts in ``pyproject.toml``) checks which package may import which.
This file checks the rest of the architecture issue's rules on the source itself:

* no module uses another module's ``_private`` name (``from x import _y``, ``x._y``);
* the passes reach the rewrite only through its public service (``relay_passes.rewrite``), and the priority
  mask fits through ``planning.Planner``, never a nested ``LUTify``;
* the import contracts exist and hold (the same check ``.ci/run`` makes, so a plain ``pytest`` run sees it).
"""

import ast
import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("tvm_lut", "relay_passes", "tir_schedules")
SOURCES = [p for d in (*PACKAGES, "tutorials", "benchmarks", "scripts") for p in sorted((ROOT / d).rglob("*.py"))]
# module names the project's own code binds our modules to (``from tvm_lut import graph``, ``bf``, ``lr``)
OWN = {p.stem for d in PACKAGES for p in (ROOT / d).rglob("*.py")} | {"bf", "lr", "bl", "sn", "cam"}


def _private_uses(path: pathlib.Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] in PACKAGES):
            found += [f"{path.name}:{node.lineno} from {node.module or '.'} import {a.name}" for a in node.names
                      if a.name.startswith("_") and not a.name.startswith("__")]
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name) and node.value.id in OWN):
            found.append(f"{path.name}:{node.lineno} {node.value.id}.{node.attr}")
    return found


def test_no_module_uses_another_modules_private_names():
    uses = [u for p in SOURCES for u in _private_uses(p)]
    assert not uses, uses


def test_the_check_sees_a_private_use(tmp_path):
    """The scan above must be able to fail: both spellings of a private use are caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("from relay_passes.lutify import _x\nfrom tvm_lut import graph\ngraph._uses(None)\n")
    assert len(_private_uses(bad)) == 2


def test_passes_use_the_public_rewrite_service():
    mask = ast.parse((ROOT / "relay_passes" / "priority_mask.py").read_text())
    imported = {(n.module, a.name) for n in ast.walk(mask) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert ("planning", "Planner") in imported and not any(m == "lutify" or a == "LUTify" for m, a in imported)
    for name in ("lutify.py", "priority_mask.py", "ezcrop.py"):
        src = (ROOT / "relay_passes" / name).read_text()
        assert "class LookupEmitter" not in src and "def rewrite(" not in src, name


@pytest.mark.skipif(shutil.which("lint-imports") is None, reason="import-linter is not installed (the test extra)")
def test_import_contracts_hold():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(["lint-imports", "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_options_are_one_object_and_results_are_returned():
    """LUTify's options are one validated ``LUTifyOptions``; ``run`` returns what the pass produced and a
    call returns its module, and neither changes the pass; ``retarget`` derives a module from a result."""
    import dataclasses
    import json

    import numpy as np
    import torch

    import tvm_lut
    from relay_passes.lutify import LUTify, LUTifyOptions, LUTResult

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 10)).eval()
    mod = tvm_lut.from_torch(model, torch.randn(1, 3, 4, 4))
    calib = np.random.default_rng(0).standard_normal((64, 3, 4, 4)).astype(np.float32)
    opts = LUTifyOptions(v=4, all_layers=True, progress=False)
    p = LUTify(calib, options=opts)
    before = dict(vars(p))
    res = p.run(mod)
    assert isinstance(res, LUTResult) and [r["method"] for r in res.layers] == ["pq", "pq"]
    assert vars(p) == before  # run() leaves the pass as it was
    out = p(mod)  # a call is the run's module, and leaves the pass as it was too
    assert vars(p) == before and json.loads(str(out.attrs["tvm_lut.layers"])) == res.layers
    assert not any(hasattr(p, name) for name in ("last", "layers", "plans", "pq_layers", "kernel_calls", "tuned"))
    arm = res.retarget("arm")
    assert p.options == opts and p.target == "x86" and res.options == opts and arm is not res.module
    assert LUTify(calib, options=opts, k=8).options == dataclasses.replace(opts, k=8)
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        LUTify(calib, kay=8)
