"""``--target arm``: NEON ``tbl`` lookups, cross-compiled and exported for aarch64, run on a real aarch64 TVM
runtime (qemu-user, over RPC on 127.0.0.1) and compared with the x86 build.

The emulated runtime is set up by ``tvm-lut farm setup-arm`` (root on Debian, about a minute on a fresh
machine); where that cannot be done, the tests that need it skip with the reason. Nothing here times
anything: emulated timings say nothing about ARM cores."""

import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
import tvm

import tvm_lut
from tir_schedules import cpu, shuffle
from tvm_lut import targets
from tvm_lut.app import cli, pipeline
from tvm_lut.errors import ArtifactError
from tvm_lut.runtime.artifact import Model, run_remote
from tvm_lut.targets import Arm, arm_emulator
from tvm_lut.targets.farm import Farm


def test_arm_target_uses_neon_tbl():
    tgt = Arm.generic().tvm
    isa = shuffle.isa_for(tgt)
    assert isa.name == "neon" and isa.lanes == 16 and not targets.resolve(tgt).runs_here()
    assert targets.resolve(tgt).local().runs_here()  # calibration and accuracy runs stay on this host
    f = cpu.schedule(shuffle.lookup(100, 9, 20, isa.lanes, 4, isa.intrinsic))
    lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), tgt)
    asm = lib.mod.inspect_source("asm") if hasattr(lib, "mod") else lib.inspect_source("asm")
    assert asm.count("tbl\t") + asm.count("tbl ") >= 16  # one per codebook and output of a tile, at least
    assert "pshufb" not in asm


@pytest.fixture(scope="module")
def arm_runtime():
    reason = arm_emulator.unavailable_reason()
    if reason is not None:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            pytest.skip(f"no emulated aarch64 runtime: {reason}")
        try:
            arm_emulator.setup(log=lambda *_: None)
        except Exception as exc:  # no network, not Debian...: the check cannot run here
            pytest.skip(f"aarch64 emulation could not be set up here: {exc}")
    return arm_emulator.home()


@pytest.fixture(scope="module")
def arm_farm(arm_runtime, tmp_path_factory):
    old = os.environ.get("TVM_LUT_FARM_DIR")
    os.environ["TVM_LUT_FARM_DIR"] = str(tmp_path_factory.mktemp("armfarm"))
    farm = Farm().start(x86=0, arm=1, log=lambda *_: None)
    yield farm
    farm.stop()
    if old is None:
        os.environ.pop("TVM_LUT_FARM_DIR", None)
    else:
        os.environ["TVM_LUT_FARM_DIR"] = old


def test_arm_build_gives_the_x86_predictions_under_emulation(arm_farm, tmp_path, small_cnn, small_inputs, capsys):
    mod = tvm_lut.from_torch(small_cnn, torch.from_numpy(small_inputs[:1]))
    labels = np.arange(len(small_inputs)) % 10
    calib = {"x": small_inputs, "labels": labels}
    arm_dir, x86_dir = str(tmp_path / "arm"), str(tmp_path / "x86")
    manifest = pipeline.compile_to_dir(arm_dir, mod, calib, target="arm", all_layers=True, progress=False)
    pipeline.compile_to_dir(x86_dir, mod, calib, target="x86", all_layers=True, progress=False, measure_latency=False)
    kernels = {r["kernel"] for r in manifest["layers"] if r["method"] == "pq"}
    assert "shuffle-neon" in kernels
    assert manifest["report"]["latency"] is None and "does not run here" in manifest["report"]["latency_note"]
    assert manifest["report"]["accuracy"]["measured_on"].startswith("host build")
    with open(os.path.join(arm_dir, "model.so"), "rb") as f:
        head = f.read(20)
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183  # EM_AARCH64
    with pytest.raises(ArtifactError, match="aarch64"):
        Model(arm_dir)
    x = small_inputs[:12]
    on_arm = run_remote(arm_dir, {"x": x}, arm_farm.address, "arm64")["output"]
    on_x86 = Model(x86_dir).run({"x": x})["output"]
    np.testing.assert_array_equal(on_arm.argmax(1), on_x86.argmax(1))
    np.testing.assert_allclose(on_arm, on_x86, rtol=1e-5, atol=1e-5)
    # the CLI does the same
    np.savez(tmp_path / "in.npz", x=x)
    assert cli.main(["run", arm_dir, "--input", str(tmp_path / "in.npz"), "--output", str(tmp_path / "out.npz"),
                     "--farm", arm_farm.address, "--key", "arm64"]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "out.npz")["output"], on_arm)


def test_neon_shuffle_lookup_bit_exact_on_aarch64(arm_farm, tmp_path):
    """The NEON tbl kernel on the real aarch64 runtime against the numpy reference, both output layouts:
    odd rows, codebooks and outputs, and more than 256 codebooks (two uint16 blocks). One shared library
    holds every case (each library load under qemu costs seconds)."""
    from tvm.support import cc

    from tvm_lut.math import pq
    from tvm_lut.targets.farm import request

    isa = shuffle.ISAS[-1]
    cases, funcs = [], {}
    for n, c, m, mb in [(77, 5, 13, 4), (100, 33, 20, 8), (40, 301, 7, 2)]:
        for rows_major in (False, True):
            name = f"k_{n}_{c}_{m}_{int(rows_major)}"
            f = cpu.schedule(shuffle.lookup(n, c, m, isa.lanes, mb, isa.intrinsic, rows_major=rows_major))
            funcs[name] = f.with_attr("global_symbol", name)
            cases.append((name, n, c, m, mb, rows_major))
    lib = tvm.compile(tvm.IRModule(funcs), Arm.generic().tvm)
    path = str(tmp_path / "kernels.so")
    lib.export_library(path, fcompile=cc.cross_compiler(arm_emulator.CROSS_CXX))
    sess = request(arm_farm.address, "arm64")
    dev = sess.cpu()
    sess.upload(path)
    rlib = sess.load_module("kernels.so")
    for name, n, c, m, mb, rows_major in cases:
        rng = np.random.default_rng(n + c + m)
        codes = rng.integers(0, 16, (n, c)).astype(np.int32)
        tab = rng.integers(-127, 128, (c, 16, m)).astype(np.int8)
        scale, bias = rng.random(m).astype(np.float32), rng.standard_normal(m).astype(np.float32)
        args = [tvm.runtime.tensor(a, dev) for a in (pq.pack_codes(codes, 16, shuffle.padded_pairs(c)),
                                                      shuffle.pack_tables(tab, mb), scale, bias)]
        out = tvm.runtime.tensor(np.zeros((n, m) if rows_major else (m, n), np.float32), dev)
        rlib[name](*args, out)
        got = out.numpy() if rows_major else out.numpy().T
        np.testing.assert_array_equal(got, pq.dequantize(pq.accumulate(codes, tab), scale, bias), err_msg=name)


@pytest.mark.slow  # about 2 min (tuning under qemu); the x86 farm tuning in test_farm.py stays in the default suite
def test_tune_on_the_arm_farm(arm_farm, tmp_path):
    """MetaSchedule through RPCRunner on the emulated aarch64 server: candidates cross-compiled here."""
    from tir_schedules import tuning

    isa = shuffle.ISAS[-1]
    func = shuffle.lookup(256, 8, 32, isa.lanes, 4, isa.intrinsic)
    db = str(tmp_path / "db")
    assert tuning.tune_kernel(func, Arm.generic().tvm, db, trials=4, farm=tuning.RemoteDevices(arm_farm.address, "arm64")) == 4
    assert tuning.valid_records(func, db) >= 1


def test_cross_export_needs_the_cross_compiler(tmp_path, monkeypatch, small_cnn, small_inputs):
    from tvm_lut.errors import TargetError
    from tvm_lut.runtime.build import build

    mod = tvm_lut.from_torch(small_cnn, torch.from_numpy(small_inputs[:1]))
    lut = tvm_lut.LUTify(calibration=small_inputs, target="arm", progress=False)(mod)
    ex = build(lut, "arm")
    monkeypatch.setenv("PATH", str(tmp_path))  # no aarch64-linux-gnu-g++ on PATH
    with pytest.raises(TargetError, match="cross compiler"):
        targets.resolve("arm").export(ex, str(tmp_path / "m.so"))
    assert not (tmp_path / "m.so").exists()


def test_setup_arm_is_idempotent(arm_runtime):
    out = subprocess.run(["tvm-lut", "farm", "setup-arm"], capture_output=True, text=True, check=True).stdout
    assert "already set up" in out


def test_hklut_stage_kernels_are_bit_exact_on_aarch64(arm_farm, tmp_path):
    """The super-resolution stage kernels (both x2 stages of an x4 model, the fast form) cross-compiled for
    aarch64 and run on the emulated runtime give the x86 build's pixels, which are the numpy reference's."""
    from tvm.support import cc

    from tir_schedules import sr_lookup
    from tvm_lut.math import sr_lut
    from tvm_lut.targets.farm import request
    from tvm_lut.train import hklut

    torch.manual_seed(0)
    stages = hklut.tabulate(hklut.HKNet(scale=4, nf=8, depth=1))
    x = np.random.default_rng(0).integers(0, 256, (11, 14), dtype=np.uint8)
    shapes, funcs = [], {}
    h, w = x.shape
    for i, st in enumerate(stages):
        f = sr_lookup.schedule(sr_lookup.stage_x2(h, w, tuple(st.msb), tuple(st.lsb), i == len(stages) - 1))
        funcs[f"stage{i}"] = f.with_attr("global_symbol", f"stage{i}")
        shapes.append((h, w))
        h, w = 2 * h, 2 * w
    path = str(tmp_path / "sr.so")
    tvm.compile(tvm.IRModule(funcs), Arm.generic().tvm).export_library(path, fcompile=cc.cross_compiler(arm_emulator.CROSS_CXX))
    sess = request(arm_farm.address, "arm64")
    dev = sess.cpu()
    sess.upload(path)
    rlib = sess.load_module("sr.so")
    cur = x
    for i, (st, (h, w)) in enumerate(zip(stages, shapes)):
        out = tvm.runtime.tensor(np.zeros((2 * h, 2 * w), np.uint8), dev)
        tabs = [tvm.runtime.tensor(sr_lookup.words_of(t), dev) for t in (*st.msb.values(), *st.lsb.values())]
        rlib[f"stage{i}"](tvm.runtime.tensor(cur, dev), *tabs, out)
        cur = out.numpy()
    np.testing.assert_array_equal(cur, sr_lut.upscale(x, stages))
