"""Do two revisions of tvm-lut compile the tutorials' models to the same outputs, bit for bit?

A refactoring (issue 31: the rewrite service, the method registry, the folder layout) must not change what
a user gets. This script builds the tutorials' models the way the tutorials do (LeNet-5 on the shipped
MNIST subset: LUTify's default, every layer with the L1 encoder, learned L1 codebooks, a max-drop=1.0
priority mask, low rank, butterfly, EZCrop, the CAM target), runs each compiled model on 64 test images
and compares the outputs of two revisions byte for byte.

    python scripts/same_outputs.py --against b63dfe7     # this tree vs the commit before issue 31
    python scripts/same_outputs.py --write outputs.npz   # just this tree's outputs

Each revision runs in its own process (``--against`` checks the other one out as a git worktree under the
system's temporary folder and puts it first on ``PYTHONPATH``); training runs on one thread with fixed
seeds, so a revision compiles the same weights every time. Outputs of one machine are compared with each
other only: the lookup kernel a layer gets depends on the CPU's instruction sets.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile

import numpy as np


def _import(new: str, old: str):
    """A module under its current name, or the flat name it had before the folder layout (issue 31).

    Decided by the imported tree's files: an editable install's finder would otherwise find the new name
    in another checkout."""
    import importlib

    import tvm_lut

    foldered = os.path.isdir(os.path.join(os.path.dirname(tvm_lut.__file__), "runtime"))
    return importlib.import_module(new if foldered else old)


def build_outputs() -> dict[str, np.ndarray]:
    """Each tutorial configuration's compiled outputs on the first 64 test images."""
    import torch

    torch.set_num_threads(1)
    import tvm_lut
    from relay_passes import LUTify
    from relay_passes.ezcrop import EZCrop

    models = _import("tvm_lut.train.models", "tvm_lut.models")
    lutnn = _import("tvm_lut.train.lutnn", "tvm_lut.lutnn")
    build = _import("tvm_lut.runtime.build", "tvm_lut.build")

    data = models.load_mnist_subset()
    tx, ty = data["train_images"][:3000], data["train_labels"][:3000]
    vx = data["test_images"][:64]
    torch.manual_seed(0)
    model = models.train_classifier(models.LeNet5(), tx, ty, epochs=1, progress=False)
    example = torch.from_numpy(vx[:32])
    mod = tvm_lut.from_torch(model, example)

    def run(m, target="x86") -> np.ndarray:
        ex, params = build.compile_with_params(m, build.resolve_target(target))
        runner = build.BatchRunner(ex, [v for _, v in params], [("x", (32, 1, 28, 28), "float32")])
        return runner.run({"x": vx})[0]

    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.from_numpy(tx), torch.from_numpy(ty)),
                                         batch_size=64, shuffle=True, drop_last=True)
    learned = lutnn.finetune(model, loader, epochs=1, distance="l1", max_steps=20, progress=False)
    tuned = tvm_lut.from_torch(lutnn.to_exact(learned.model), example)
    keep = {"features.0": "exact", "classifier.4": "exact"}
    out = {
        "exact": run(mod),
        "default (tutorial 1)": run(LUTify(tx[:512], progress=False)(mod)),
        "all layers, L1 (tutorial 3)": run(LUTify({"x": tx[:1024]}, all_layers=True, distance="l1",
                                                  progress=False)(mod)),
        "learned L1 codebooks (tutorial 3)": run(LUTify(codebooks=learned.codebooks, progress=False)(tuned)),
        "max-drop=1.0 mask (tutorial 3)": run(LUTify({"x": tx[-1000:], "labels": ty[-1000:]}, budget="max-drop=1.0",
                                                     distance="l1", progress=False)(mod)),
        "low rank (tutorial 4)": run(LUTify(method="lowrank", layers=keep, progress=False)(mod)),
        "butterfly (tutorial 4)": run(LUTify(method="butterfly", layers=keep, progress=False)(mod)),
        "EZCrop 0.5 (tutorial 4)": run(EZCrop(tx[:256], 0.5)(mod)),
        "cam, L1 (tutorial 5)": run(LUTify(tx[:512], all_layers=True, distance="l1", target="cam",
                                           progress=False)(mod), "cam"),
        "cosine, K=8 V=2": run(LUTify(tx[:512], all_layers=True, distance="cosine", k=8, v=2, progress=False)(mod)),
    }
    return out


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


def _outputs_of(revision: str, path: str) -> None:
    """Run this script's ``--write`` with ``revision`` checked out first on the import path."""
    repo = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                          check=True).stdout.strip()
    tree = tempfile.mkdtemp(prefix="same_outputs_")
    subprocess.run(["git", "-C", repo, "worktree", "add", "--detach", tree, revision], check=True,
                   capture_output=True)
    try:
        env = {**os.environ, "PYTHONPATH": tree + os.pathsep + os.environ.get("PYTHONPATH", "")}
        subprocess.run([sys.executable, os.path.abspath(__file__), "--write", path, "--expect-root", tree],
                       check=True, env=env, cwd=tree)
    finally:
        subprocess.run(["git", "-C", repo, "worktree", "remove", "--force", tree], capture_output=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", help="write this tree's outputs to this .npz and stop")
    ap.add_argument("--against", help="a git revision to compare this tree with")
    ap.add_argument("--expect-root", help=argparse.SUPPRESS)  # the worktree --against put on the path
    args = ap.parse_args()
    if args.write:
        import tvm_lut

        if args.expect_root and not os.path.abspath(tvm_lut.__file__).startswith(os.path.abspath(args.expect_root)):
            raise SystemExit(f"imported {tvm_lut.__file__}, not the revision under {args.expect_root}")
        np.savez(args.write, **build_outputs())
        return 0
    if not args.against:
        ap.error("give --write FILE or --against REVISION")
    with tempfile.TemporaryDirectory() as tmp:
        theirs, ours = os.path.join(tmp, "theirs.npz"), os.path.join(tmp, "ours.npz")
        _outputs_of(args.against, theirs)
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ, "PYTHONPATH": here + os.pathsep + os.environ.get("PYTHONPATH", "")}
        subprocess.run([sys.executable, os.path.abspath(__file__), "--write", ours, "--expect-root", here],
                       check=True, env=env)
        a, b = dict(np.load(theirs)), dict(np.load(ours))
    same = True
    print(f"{'build':36s} {args.against[:12]:>18s} {'this tree':>18s}")
    for name in a:
        equal = name in b and a[name].shape == b[name].shape and a[name].tobytes() == b[name].tobytes()
        same &= equal
        print(f"{name:36s} {_digest(a[name]):>18s} {_digest(b[name]) if name in b else '-':>18s}"
              f"  {'same' if equal else 'DIFFERENT'}")
    print("bit-identical" if same else "outputs differ")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
