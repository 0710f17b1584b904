"""``tvm-lut sr``: compile a checkpoint into tables, upscale PNG files with the compiled kernels, evaluate;
bad inputs are refused with the reason and nothing is written."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from tvm_lut.app import cli, sr
from tvm_lut.math import sr_lut
from tvm_lut.train import hklut, sr_training


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Tables of a small random x4 network, made by ``sr compile`` from a checkpoint as ``sr train`` writes."""
    d = tmp_path_factory.mktemp("sr")
    torch.manual_seed(0)
    net = hklut.HKNet(scale=4, nf=8, depth=1)
    settings = {"scale": 4, "steps": 1, "batch": 1, "patch": 8, "lr": 1e-3, "nf": 8, "depth": 1}
    torch.save({"model": net.state_dict(), "settings": settings}, d / "final.pt")
    assert cli.main(["sr", "compile", str(d), "-o", str(d / "tables")]) == 0
    return d / "tables", sr.SRTables.load(str(d / "tables")).stages, hklut.tabulate(net)


def test_compile_writes_every_table_with_its_bytes(model_dir, capsys):
    out, *_ = model_dir
    manifest = json.load(open(out / "manifest.json"))
    assert manifest["scale"] == 4 and manifest["total_bytes"] == 102_400 and len(manifest["tables"]) == 10
    assert {(r["branch"], r["entries"], r["bytes"]) for r in manifest["tables"]} == {("msb", 4096, 16384),
                                                                                     ("lsb", 256, 1024)}
    # made by TVM (the tabulation pass), they are the torch network's own tables (an entry may differ by one
    # level where TVM's tanh and torch's round differently just below an integer)
    made = sr.SRTables.load(str(out))
    for st, want in zip(made.stages, model_dir[2]):
        for branch in ("msb", "lsb"):
            for name, table in getattr(want, branch).items():
                diff = np.abs(getattr(st, branch)[name].astype(int) - table)
                assert diff.max() <= 1 and (diff > 0).sum() <= table.size // 1000


def test_upscale_a_png_is_the_table_reference(model_dir, tmp_path, capsys):
    out, stages, _ = model_dir
    img = np.random.default_rng(0).integers(0, 256, (17, 20, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "in.png")
    assert cli.main(["sr", "upscale", str(tmp_path / "in.png"), "-o", str(tmp_path / "x4.png"), "--scale", "4",
                     "--model", str(out)]) == 0
    got = np.asarray(Image.open(tmp_path / "x4.png"))
    assert got.shape == (68, 80, 3)
    np.testing.assert_array_equal(got, sr_lut.upscale(img, stages))
    gray = img[..., 0]
    Image.fromarray(gray).save(tmp_path / "gray.png")
    assert cli.main(["sr", "upscale", str(tmp_path / "gray.png"), "-o", str(tmp_path / "g4.png"), "--model",
                     str(out)]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "g4.png")), sr_lut.upscale(gray, stages))


def test_bad_inputs_are_refused_and_nothing_is_written(model_dir, tmp_path, capsys):
    out, *_ = model_dir
    (tmp_path / "text.png").write_text("not an image")
    Image.fromarray(np.zeros((8, 8), np.uint16) + 1000).save(tmp_path / "deep.png")
    Image.fromarray(np.zeros((8, 8, 4), np.uint8)).save(tmp_path / "alpha.png")
    Image.fromarray(np.zeros((2, 5, 3), np.uint8)).save(tmp_path / "tiny.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "ok.png")
    cases = [("text.png", [], "not an image"), ("deep.png", [], "16-bit"), ("alpha.png", [], "alpha channel"),
             ("tiny.png", [], "smaller than the 3x3"), ("ok.png", ["--scale", "2"], "make x4"),
             ("ok.png", ["--scale", "5"], "x2, x3 or x4"), ("missing.png", [], "no such file")]
    for name, extra, why in cases:
        dst = tmp_path / f"out_{name}"
        assert cli.main(["sr", "upscale", str(tmp_path / name), "-o", str(dst), "--model", str(out), *extra]) == 2
        assert why in capsys.readouterr().err, name
        assert not dst.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".sr_")]
    assert cli.main(["sr", "upscale", str(tmp_path / "ok.png"), "-o", str(tmp_path / "o.png"), "--scale", "3"]) == 2
    assert "no tables ship for x3" in capsys.readouterr().err
    assert cli.main(["sr", "compile", str(tmp_path / "ok.png"), "-o", str(tmp_path / "t")]) == 2
    assert "not a checkpoint" in capsys.readouterr().err and not (tmp_path / "t").exists()


@pytest.mark.slow  # about 10 s: one kernel build per Set5 image size and stage
@pytest.mark.skipif(not os.path.isdir(os.path.join(sr_training.sr_root(), "set5")),
                    reason=f"Set5 is not under {sr_training.sr_root()} (../shared/data/sr)")
def test_eval_reports_tables_beside_bicubic(model_dir, capsys):
    out, *_ = model_dir
    assert cli.main(["sr", "eval", str(out), "--set", "set5"]) == 0
    text = capsys.readouterr().out
    assert "set5 x4" in text and "bicubic 28.43 dB" in text and "102400 bytes" in text


@pytest.mark.parametrize("scale,nbytes", [(2, 51_200), (4, 102_400)])
def test_shipped_tables_upscale_out_of_the_box(scale, nbytes, tmp_path, capsys):
    """The trained x2 and x4 tables ship in the package: ``sr upscale`` needs no --model, and its output is
    the numpy reference's on those tables."""
    tables = sr.shipped(scale)
    assert tables.scale == scale and tables.nbytes == nbytes
    img = np.random.default_rng(scale).integers(0, 256, (9, 11, 3)).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "in.png")
    dst = tmp_path / "out.png"
    assert cli.main(["sr", "upscale", str(tmp_path / "in.png"), "-o", str(dst), "--scale", str(scale)]) == 0
    out = np.asarray(Image.open(dst))
    assert out.shape == (9 * scale, 11 * scale, 3)
    np.testing.assert_array_equal(out, sr_lut.upscale(img, tables.stages))
