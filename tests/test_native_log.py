"""TVM's native memory-scope listings stay out of the terminal; other native output still reaches it."""

import os

import numpy as np
import onnx
import torch
import tvm

import tvm_lut
from tvm_lut.app import cli
from tvm_lut.frontend.native_log import drop_scope_listings, quiet_native

LISTING = ("[21:25:44] /project/src/runtime/vm/executable.cc:276: Warning: Scope Saving:\n"
           "  global\n\n")


def test_scope_listings_are_dropped_and_other_lines_kept():
    text = "before\n" + LISTING + "[21:25:45] src/x.cc:3: Warning: a real one\n" + LISTING.replace("Saving", "Loaded")
    assert drop_scope_listings(text) == "before\n[21:25:45] src/x.cc:3: Warning: a real one\n"


def test_quiet_native_replays_what_is_not_a_listing(capfd):
    with quiet_native():
        os.write(2, LISTING.encode() + b"native error: kept\n")
    assert capfd.readouterr().err == "native error: kept\n"


def test_compile_and_run_print_no_scope_listing(tmp_path, capfd):
    from tests.test_onnx_patterns import shared_and_constant  # a model whose executable has a memory-scope listing

    path = tmp_path / "m.onnx"
    onnx.save(shared_and_constant(8), str(path))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "c.npz", x=rng.standard_normal((32, 1, 8, 8)).astype(np.float32))
    np.savez(tmp_path / "x.npz", x=rng.standard_normal((2, 1, 8, 8)).astype(np.float32))
    out = str(tmp_path / "out")
    assert cli.main(["compile", str(path), "--calib", str(tmp_path / "c.npz"), "-o", out, "-q", "--no-latency"]) == 0
    assert cli.main(["run", out, "--input", str(tmp_path / "x.npz"), "--output", str(tmp_path / "y.npz")]) == 0
    captured = capfd.readouterr()
    assert "Scope Saving" not in captured.err and "Scope Loaded" not in captured.err


class _Embed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(50, 8)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, ids):
        return self.fc(self.emb(ids))


def test_embedding_lookups_are_bounded_and_compile_quietly(capfd):
    """An embedding is a ``take``: imported in TVM's "fast" mode it read out of bounds on a bad token id and
    every compile printed TOPI's "Fast mode segfaults" warning; ours clamp, and the compile is quiet."""
    model, ids = _Embed().eval(), torch.tensor([[1, 7, 49, 0]])
    mod = tvm_lut.from_torch(model, ids)
    capfd.readouterr()
    vm = tvm.relax.VirtualMachine(tvm_lut.build(mod), tvm.cpu())
    assert "Fast mode segfaults" not in capfd.readouterr().err
    run = lambda a: vm["main"](tvm.runtime.tensor(a)).numpy()  # noqa: E731
    with torch.no_grad():
        np.testing.assert_allclose(run(ids.numpy()), model(ids).numpy(), rtol=1e-5, atol=1e-6)
        bad = np.array([[1, 7, 10_000_000, -5]], dtype=ids.numpy().dtype)  # out of the vocabulary: clamped
        np.testing.assert_allclose(run(bad), model(torch.tensor([[1, 7, 49, 0]])).numpy(), rtol=1e-5, atol=1e-6)
