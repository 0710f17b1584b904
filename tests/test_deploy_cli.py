"""Build, export and deploy (fresh process, TVM runtime only), the CLI, and every bad input of the issue."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import tvm

import tvm_lut
from tvm_lut import relay
from tvm_lut.app import cli
from tvm_lut.runtime.artifact import Model


def _onnx_model(tmp_path, model, batch=1):
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (torch.zeros(batch, 3, 8, 8),), str(path), input_names=["image"],
                      output_names=["logits"], dynamo=False)
    return str(path)


def _calib(tmp_path, x, labels=None, name="image"):
    path = tmp_path / "calib.npz"
    arrays = {name: x}
    if labels is not None:
        arrays["labels"] = labels
    np.savez(path, **arrays)
    return str(path)


def test_build_export_and_run_in_fresh_process(tmp_path, small_cnn, small_inputs):
    mod = tvm_lut.from_torch(small_cnn, torch.from_numpy(small_inputs[:4]))
    lut = relay.transform.LUTify(calibration=small_inputs, progress=False)(mod)
    lib = tvm_lut.build(lut, target="x86")
    assert isinstance(lib, tvm.relax.VMExecutable)
    so = str(tmp_path / "model.so")
    lib.export_library(so)
    expected = tvm.relax.VirtualMachine(lib, tvm.cpu())["main"](tvm.runtime.tensor(small_inputs[:4])).numpy()
    np.save(tmp_path / "x.npy", small_inputs[:4])
    code = (
        "import sys, numpy as np, tvm.runtime\n"
        "from tvm.relax import VirtualMachine\n"
        f"vm = VirtualMachine(tvm.runtime.load_module({so!r}), tvm.cpu())\n"
        f"y = vm['main'](tvm.runtime.tensor(np.load({str(tmp_path / 'x.npy')!r}))).numpy()\n"
        f"np.save({str(tmp_path / 'y.npy')!r}, y)\n"
        "assert 'tvm_lut' not in sys.modules and 'relay_passes' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), expected)


def test_cli_onnx_batch1_compile_run_report(tmp_path, small_cnn, small_inputs, capsys):
    model = _onnx_model(tmp_path, small_cnn, batch=1)  # fixed batch 1: run must iterate over the dataset
    labels = np.argmax(small_cnn(torch.from_numpy(small_inputs)).detach().numpy(), 1)
    calib = _calib(tmp_path, small_inputs, labels)
    out = str(tmp_path / "out")
    assert cli.main(["compile", model, "--calib", calib, "--target", "x86", "-o", out, "-q"]) == 0
    text = capsys.readouterr().out
    assert "features.3" in text and "accuracy on 13 held-out rows" in text and "latency per batch of 1" in text
    assert sorted(os.listdir(out)) == ["manifest.json", "model.so", "params.bin", "report.json"]
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["inputs"] == [{"name": "image", "shape": [1, 3, 8, 8], "dtype": "float32"}]
    assert {l["name"]: l["method"] for l in manifest["layers"]} == {
        "features.0": "pq", "features.3": "pq", "features.5": "exact", "fc1": "pq", "fc2": "exact"}
    assert set(manifest["params"]) == {"features.5.weight", "features.5.bias", "fc2.weight", "fc2.bias"}
    for name in os.listdir(out):  # no pickle anywhere in the artifact
        assert not open(os.path.join(out, name), "rb").read(2).startswith(b"\x80")
    # run in a fresh process, 37 samples through a batch-1 model
    data = tmp_path / "data.npz"
    np.savez(data, image=small_inputs[:37])
    pred = tmp_path / "pred.npz"
    subprocess.run([sys.executable, "-m", "tvm_lut.app.cli", "run", out, "--input", str(data), "--output", str(pred)],
                   check=True, timeout=180)
    got = np.load(pred)["logits"]  # outputs keep the ONNX model's names
    assert got.shape == (37, 10)
    np.testing.assert_array_equal(got, Model(out).run({"image": small_inputs[:37]})["logits"])
    assert cli.main(["report", out, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["accuracy"]["rows"] == 13 and report["latency"]["batch"] == 1
    assert cli.main(["report", out]) == 0
    assert "multiplies removed" in capsys.readouterr().out


def test_cli_torch_pt2_all_layers(tmp_path, small_cnn, small_inputs, capsys):
    ep = torch.export.export(small_cnn, (torch.from_numpy(small_inputs[:8]),))
    pt2 = str(tmp_path / "model.pt2")
    torch.export.save(ep, pt2)
    calib = _calib(tmp_path, small_inputs, name="x")
    out = str(tmp_path / "out")
    assert cli.main(["compile", pt2, "--calib", calib, "-o", out, "--all-layers", "--layer", "fc1:k=8,v=2",
                     "--no-latency", "-q"]) == 0
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    rec = {l["name"]: l for l in manifest["layers"]}
    assert rec["fc2"]["method"] == "pq" and (rec["fc1"]["k"], rec["fc1"]["v"]) == (8, 2)
    assert rec["features.5"]["method"] == "exact"  # grouped conv cannot be forced
    y = Model(out).run({"x": small_inputs[:20]})["output"]
    assert y.shape == (20, 10) and np.isfinite(y).all()


# ------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the problem, exit code 2, and no (half-written) output directory
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def onnx_case(tmp_path, small_cnn, small_inputs):
    return _onnx_model(tmp_path, small_cnn, batch=4), small_inputs


def _fails(capsys, args, match, out):
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "tvm-lut: error:" in err and __import__("re").search(match, err), err
    if out is not None:
        assert not os.path.exists(out)
        assert not [p for p in os.listdir(os.path.dirname(out)) if ".tmp-" in p]


def test_bad_model_files(tmp_path, capsys, small_inputs):
    calib = _calib(tmp_path, small_inputs)
    out = str(tmp_path / "out")
    _fails(capsys, ["compile", str(tmp_path / "nope.onnx"), "--calib", calib, "-o", out], "model file not found", out)
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    _fails(capsys, ["compile", str(bad), "--calib", calib, "-o", out], "corrupt.onnx: not a valid ONNX model", out)
    badpt = tmp_path / "corrupt.pt2"
    badpt.write_bytes(b"not a zip")
    _fails(capsys, ["compile", str(badpt), "--calib", calib, "-o", out], "corrupt.pt2: not a readable", out)
    other = tmp_path / "model.h5"
    other.write_bytes(b"x")
    _fails(capsys, ["compile", str(other), "--calib", calib, "-o", out], "unsupported model file type", out)


@pytest.mark.parametrize("kind", ["shape", "name", "nan", "empty", "missing", "corrupt", "labels"])
def test_bad_calibration(tmp_path, capsys, onnx_case, kind):
    model, x = onnx_case
    out = str(tmp_path / "out")
    path = tmp_path / "calib.npz"
    if kind == "shape":
        np.savez(path, image=x[:, :, :7])
        match = r"'image' has shape \(64, 3, 7, 8\).*expects \(N, 3, 8, 8\)"
    elif kind == "name":
        np.savez(path, image=x, extra=x)
        match = r"arrays \['extra'\] do not match the model inputs \['image'\]"
    elif kind == "nan":
        y = x.copy()
        y[0, 0, 0, 0] = np.inf
        np.savez(path, image=y)
        match = "'image' contains 1 NaN/Inf"
    elif kind == "empty":
        np.savez(path, image=x[:0])
        match = "'image' is empty"
    elif kind == "missing":
        path = tmp_path / "none.npz"
        match = "calibration file not found"
    elif kind == "corrupt":
        path.write_bytes(b"PK\x03\x04broken")
        match = "not a readable .npz"
    else:
        np.savez(path, image=x, labels=np.zeros(5))
        match = "'labels' has 5 entries but the inputs have 64"
    _fails(capsys, ["compile", model, "--calib", str(path), "-o", out], match, out)


def test_bad_options_and_target(tmp_path, capsys, onnx_case):
    model, x = onnx_case
    calib = _calib(tmp_path, x)
    out = str(tmp_path / "out")
    _fails(capsys, ["compile", model, "--calib", calib, "-o", out, "--layer", "features.9:exact"],
           r"unknown layer name\(s\) \['features.9'\]", out)
    _fails(capsys, ["compile", model, "--calib", calib, "-o", out, "--target", "tpu"],
           "unknown target 'tpu'; supported: x86", out)
    _fails(capsys, ["compile", model, "--calib", calib, "-o", out, "--layer", "fc1:k=999"], "K=999 out of range", out)
    small = _calib(tmp_path, x[:10])
    _fails(capsys, ["compile", model, "--calib", small, "-o", out, "--k", "32", "--budget", "none", "--holdout", "0"],
           "layer 'fc1': K=32 centroids need at least 32 calibration vectors, got 10", out)


def test_failed_compile_keeps_previous_artifact(tmp_path, capsys, onnx_case):
    model, x = onnx_case
    out = str(tmp_path / "out")
    assert cli.main(["compile", model, "--calib", _calib(tmp_path, x), "-o", out, "-q", "--no-latency"]) == 0
    before = open(os.path.join(out, "manifest.json")).read()
    np.savez(tmp_path / "bad.npz", image=np.full_like(x, np.nan))
    assert cli.main(["compile", model, "--calib", str(tmp_path / "bad.npz"), "-o", out]) == 2
    assert open(os.path.join(out, "manifest.json")).read() == before
    capsys.readouterr()

    # corrupt or tampered artifacts are refused at run time, before the library is loaded
    data = tmp_path / "data.npz"
    np.savez(data, image=x[:4])
    pred = str(tmp_path / "pred.npz")
    so = os.path.join(out, "model.so")
    blob = bytearray(open(so, "rb").read())
    blob[len(blob) // 2] ^= 0xFF
    open(so, "wb").write(bytes(blob))
    _fails(capsys, ["run", out, "--input", str(data), "--output", pred], "model.so: SHA-256 does not match", None)
    assert not os.path.exists(pred)
    open(os.path.join(out, "manifest.json"), "w").write("{not json")
    _fails(capsys, ["run", out, "--input", str(data), "--output", pred], "manifest.json: corrupt", None)
    os.remove(os.path.join(out, "params.bin"))
    _fails(capsys, ["run", out, "--input", str(data), "--output", pred], "incomplete artifact, missing params.bin", None)
    _fails(capsys, ["run", str(tmp_path / "nothing"), "--input", str(data), "--output", pred],
           "not an artifact directory", None)


def test_run_rejects_mismatched_input(tmp_path, capsys, onnx_case):
    model, x = onnx_case
    out = str(tmp_path / "out")
    assert cli.main(["compile", model, "--calib", _calib(tmp_path, x), "-o", out, "-q", "--no-latency"]) == 0
    np.savez(tmp_path / "data.npz", pixels=x)
    _fails(capsys, ["run", out, "--input", str(tmp_path / "data.npz"), "--output", str(tmp_path / "p.npz")],
           r"input arrays \['pixels'\] do not match the model inputs \['image'\]", None)


def test_onnx_dotted_input_names_are_kept(tmp_path, small_cnn, small_inputs):
    path = tmp_path / "m.onnx"
    torch.onnx.export(small_cnn, (torch.zeros(2, 3, 8, 8),), str(path), input_names=["input.1"], dynamo=False)
    np.savez(tmp_path / "calib.npz", **{"input.1": small_inputs})
    out = str(tmp_path / "out")
    assert cli.main(["compile", str(path), "--calib", str(tmp_path / "calib.npz"), "-o", out, "-q",
                     "--no-latency"]) == 0
    (y,) = Model(out).run({"input.1": small_inputs[:5]}).values()  # output keeps the exporter's name
    assert y.shape == (5, 10)


def test_dynamic_batch_pt2_is_fixed_to_batch(tmp_path, small_cnn, small_inputs):
    dim = torch.export.Dim("b", min=1, max=64)
    ep = torch.export.export(small_cnn, (torch.from_numpy(small_inputs[:4]),), dynamic_shapes=({0: dim},))
    torch.export.save(ep, str(tmp_path / "dyn.pt2"))
    out = str(tmp_path / "out")
    assert cli.main(["compile", str(tmp_path / "dyn.pt2"), "--calib", _calib(tmp_path, small_inputs, name="x"),
                     "-o", out, "--batch", "8", "-q", "--no-latency"]) == 0
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["inputs"][0]["shape"] == [8, 3, 8, 8]
    assert {l["name"]: l["method"] for l in manifest["layers"]}["fc1"] == "pq"


def _foreign_x86_cpu() -> str | None:
    """An x86 CPU with an instruction set this one lacks (AVX-512 on a Zen 3, AMX on a Zen 5), or None."""
    from tvm_lut.targets import instruction_sets, missing_instruction_sets

    for cpu in ("znver4", "sapphirerapids", "graniterapids", "diamondrapids"):
        if missing_instruction_sets(instruction_sets(f"x86:{cpu}")):
            return cpu
    return None


def test_build_for_another_x86_cpu_is_measured_here_and_refused_where_it_cannot_run(tmp_path, small_cnn, small_inputs):
    """--target x86:CPU cross-compiles for a CPU this one is not: calibration and accuracy run on a host build
    of the same tables, the manifest lists the instruction sets the code may use, and loading the artifact on
    a CPU without one of them is an error naming them, not an illegal instruction in the middle of a run."""
    from tvm_lut.targets import missing_instruction_sets

    cpu = _foreign_x86_cpu()
    if cpu is None:
        pytest.skip("this CPU has every instruction set of znver4, sapphirerapids, graniterapids and diamondrapids")
    model = _onnx_model(tmp_path, small_cnn, batch=4)
    labels = np.argmax(small_cnn(torch.from_numpy(small_inputs)).detach().numpy(), 1)
    calib = _calib(tmp_path, small_inputs, labels)
    out = str(tmp_path / "out")
    assert cli.main(["compile", model, "--calib", calib, "--target", f"x86:{cpu}", "-o", out, "-q"]) == 0
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    missing = missing_instruction_sets(manifest["instruction_sets"])
    assert manifest["target_name"] == f"x86:{cpu}" and missing
    assert manifest["report"]["accuracy"]["measured_on"].startswith("host build")
    assert manifest["report"]["accuracy"]["agreement"] > 50
    with pytest.raises(tvm_lut.errors.ArtifactError, match=f"lacks {missing[0]}.*illegal instruction"):
        Model(out)
    # the CLI in a fresh process: exit status 2 and the reason (without the check the process dies of SIGILL)
    np.savez(tmp_path / "data.npz", image=small_inputs[:8])
    pred = tmp_path / "pred.npz"
    run = subprocess.run([sys.executable, "-c", "import sys; from tvm_lut.app.cli import main; sys.exit(main(sys.argv[1:]))",
                          "run", out, "--input", str(tmp_path / "data.npz"), "--output", str(pred)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "illegal instruction" in run.stderr and not pred.exists(), run.stderr[-2000:]


def test_host_build_lists_its_instruction_sets_and_unknown_cpus_are_refused(tmp_path, small_cnn, small_inputs, capsys):
    from tvm_lut import targets
    from tvm_lut.targets import instruction_sets, missing_instruction_sets, resolve_target

    assert targets.resolve("x86").runs_here() and not missing_instruction_sets(instruction_sets("x86"))
    assert "avx512vbmi" in instruction_sets("x86:znver4") and "avx512f" not in instruction_sets("x86:x86-64-v3")
    assert str(resolve_target("x86:x86-64-v3").attrs["mcpu"]) == "x86-64-v3"
    with pytest.raises(tvm_lut.errors.TargetError, match="unknown x86 CPU 'znver99'"):
        resolve_target("x86:znver99")
    model = _onnx_model(tmp_path, small_cnn, batch=4)
    calib = _calib(tmp_path, small_inputs)
    out = tmp_path / "out"
    assert cli.main(["compile", model, "--calib", calib, "--target", "x86:znver99", "-o", str(out), "-q"]) == 2
    assert "unknown x86 CPU 'znver99'" in capsys.readouterr().err and not out.exists()
