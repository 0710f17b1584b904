"""MetaSchedule tuning of the lookup kernels (XGBoost cost model), the database, and ``tvm-lut tune``.

A handful of trials per kernel keeps this in the default suite; the speed comparison of tuned vs hand
schedules lives in ``benchmarks/speed.py``.
"""

import json
import os
import sys

import numpy as np
import pytest
import torch
import tvm

from tir_schedules import kernels, shuffle, tuning
from tvm_lut.app import cli
from tvm_lut.math import pq
from tvm_lut.targets import host_target

TARGET = host_target()


def test_pitfall_fixes_stub_intrinsics_and_keep_codes_in_range():
    tuning.stub_tensor_intrins()
    assert type(sys.modules["tvm.s_tir.tensor_intrin.cuda"]).__name__ == "module"
    args = tuning.alloc_argument(tvm.cpu(), [["TENSOR", "int32", [4, 3]], ["TENSOR", "float32", [5]]], 2)
    assert len(args) == 2 and not args[0][0].numpy().any()  # row offsets / codes 0: always in range
    assert args[0][1].numpy().std() > 0


@pytest.mark.parametrize("grouped", [False, True])
def test_tuned_shuffle_kernel_is_bit_exact_and_reused_from_the_database(tmp_path, grouped):
    n, c, m = 200, 9, 40
    if grouped and shuffle.isa_for(TARGET) is not shuffle.ISAS[0]:
        pytest.skip("host has no AVX-512 VBMI + VNNI (grouped vpermb lookup)")
    lanes = 64 if grouped else shuffle.isa_for(TARGET, grouped=False).lanes  # 32 on an AVX2-only host
    func = shuffle.lookup(n, c, m, lanes, 4, shuffle.PERMUTE_INTRINSIC if grouped else None)
    db = str(tmp_path / "db")
    tuning.tune_kernel(func, TARGET, db, trials=8)
    assert os.path.isfile(os.path.join(db, "database_tuning_record.json"))
    got = tuning.best_from_database(func, TARGET, db)
    assert got is not None and got[1] > 0
    tuned = tuning.apply_database(func, TARGET, db)  # what LUTify(database=...) takes
    assert tuned is not None and shuffle.tile_of(tuned) == 4
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, (n, c))
    tab = rng.integers(-127, 128, (c, 16, m)).astype(np.int8)
    scale, bias = rng.random(m).astype(np.float32), rng.standard_normal(m).astype(np.float32)
    ex = tvm.compile(tvm.IRModule({"main": tuned.with_attr("global_symbol", "main")}), TARGET)
    packed = pq.pack_codes_grouped(codes, 64) if grouped else pq.pack_codes(codes, lanes, shuffle.padded_pairs(c))
    args = [tvm.runtime.tensor(a) for a in (packed, shuffle.pack_tables(tab, 4, grouped), scale, bias,
                                            np.zeros((m, n), np.float32))]
    ex["main"](*args)
    np.testing.assert_array_equal(args[-1].numpy().T, pq.dequantize(pq.accumulate(codes, tab), scale, bias))
    # a kernel of another shape has no record: the hand schedule is used
    assert tuning.apply_database(shuffle.lookup(n + 1, c, m, lanes, 4, func.attrs["tvm_lut.intrinsic"]), TARGET, db) is None
    # where the tuning run measured the hand schedule faster, the hand schedule is deployed
    tuning.record_comparison(func, TARGET, db, "lookup", hand_us=1.0, tuned_us=2.0)
    assert tuning.apply_database(func, TARGET, db) is None
    assert tuning.best_tuned(func, TARGET, db) is not None
    tuning.record_comparison(func, TARGET, db, "lookup", hand_us=2.0, tuned_us=1.0)
    assert tuning.apply_database(func, TARGET, db) is not None


def test_gather_accumulate_space_tunes(tmp_path):
    func = kernels.accumulate(128, 8, 16, 64)
    db = str(tmp_path / "db")
    tuning.tune_kernel(func, TARGET, db, trials=4)
    assert tuning.best_from_database(func, TARGET, db) is not None


def test_two_tunings_in_one_process_leave_the_process_logging_alone(tmp_path, capsys):
    """Two tunings in one process, with an unnamed handler on MetaSchedule's non-propagating logger (what
    pytest >= 9.1 attaches to every such logger, and what a user's logging setup may) and a user's file
    handler on the root logger: both tunings run, the user's handler is neither closed nor replaced,
    and the trials' log lines go to the database's log file, not to the terminal. ``ms.tune_tir``'s
    ``dictConfig`` failed the first of these (``'NoneType' object has no attribute 'format'``) and closed
    the user's handler."""
    import logging

    ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    foreign, user = logging.NullHandler(), logging.FileHandler(str(tmp_path / "user.log"))
    ms_logger.addHandler(foreign)
    logging.getLogger().addHandler(user)
    try:
        for i, m in enumerate((16, 32)):
            db = str(tmp_path / f"db{i}")
            assert tuning.tune_kernel(kernels.accumulate(64, 8, 16, m), TARGET, db, trials=2) > 0
            assert os.path.getsize(os.path.join(db, "logs", "tuning.log")) > 0
        assert foreign in ms_logger.handlers and user in logging.getLogger().handlers
        assert user.stream is not None and not user.stream.closed
        logging.getLogger("tvm_lut").warning("still logging")
        user.flush()
        assert "still logging" in open(tmp_path / "user.log").read()
    finally:
        ms_logger.removeHandler(foreign)
        logging.getLogger().removeHandler(user)
        user.close()
    assert "Trial" not in capsys.readouterr().out  # MetaSchedule's per-trial table stays in the log file


def test_cli_tune_then_compile_with_db(tmp_path, small_cnn, small_inputs, monkeypatch, capsys):
    monkeypatch.setattr(tuning, "SHUFFLE_TILES", (4,))  # one register tile: keeps the test short
    path = tmp_path / "model.onnx"
    torch.onnx.export(small_cnn, (torch.zeros(1, 3, 8, 8),), str(path), input_names=["image"],
                      output_names=["logits"], dynamo=False)
    calib = tmp_path / "calib.npz"
    np.savez(calib, image=small_inputs)
    db = str(tmp_path / "db")
    assert cli.main(["tune", str(path), "--calib", str(calib), "--db", db, "--trials", "4", "-q"]) == 0
    out = capsys.readouterr().out
    assert "shuffle_lookup" in out and "hand us" in out
    report = json.load(open(os.path.join(db, "tune_report.json")))
    assert report and all(r["trials"] >= 4 for r in report)
    tuned_dir, plain_dir = str(tmp_path / "tuned"), str(tmp_path / "plain")
    assert cli.main(["compile", str(path), "--calib", str(calib), "-o", tuned_dir, "--db", db, "-q", "--no-latency"]) == 0
    assert cli.main(["compile", str(path), "--calib", str(calib), "-o", plain_dir, "-q", "--no-latency"]) == 0
    rep = json.load(open(os.path.join(tuned_dir, "report.json")))
    # deployed tuned: exactly the kernels whose tuned time beat the hand schedule's in the tuning run
    faster = {r["name"] for r in report if r["tuned_us"] is not None and r["tuned_us"] < r["hand_us"]}
    assert rep["tuning"]["database"] == db and set(rep["tuning"]["tuned_kernels"]) == faster
    assert len(json.load(open(os.path.join(db, tuning.HAND_VS_TUNED)))) == len(report)
    x = tmp_path / "x.npz"
    np.savez(x, image=small_inputs[:8])
    for d in (tuned_dir, plain_dir):
        assert cli.main(["run", d, "--input", str(x), "--output", os.path.join(d, "y.npz")]) == 0
    a, b = (np.load(os.path.join(d, "y.npz")) for d in (tuned_dir, plain_dir))
    np.testing.assert_array_equal(a[a.files[0]], b[b.files[0]])  # same tables and codes: same outputs
    # a database directory that does not exist: clear error, no artifact
    bad = str(tmp_path / "bad")
    assert cli.main(["compile", str(path), "--calib", str(calib), "-o", bad, "--db", str(tmp_path / "nodb"), "-q"]) == 2
    assert "no tuning database" in capsys.readouterr().err and not os.path.exists(bad)


def test_bad_tuning_and_lookup_options_are_clear_errors(tmp_path, small_cnn, small_inputs, capsys):
    import tvm_lut
    from tvm_lut.errors import OptionError

    with pytest.raises(OptionError, match="lookup='bogus'"):
        tvm_lut.LUTify(calibration=small_inputs, lookup="bogus")
    mod = tvm_lut.from_torch(small_cnn, torch.from_numpy(small_inputs[:1]))
    with pytest.raises(OptionError, match="needs K=16"):  # shuffles index 16-entry tables
        tvm_lut.LUTify(calibration=small_inputs, k=8, lookup="shuffle", progress=False)(mod)
    path = tmp_path / "model.onnx"
    torch.onnx.export(small_cnn, (torch.zeros(1, 3, 8, 8),), str(path), input_names=["image"],
                      output_names=["logits"], dynamo=False)
    calib = tmp_path / "calib.npz"
    np.savez(calib, image=small_inputs)
    db = tmp_path / "db"
    assert cli.main(["tune", str(path), "--calib", str(calib), "--db", str(db), "--trials", "0", "-q"]) == 2
    assert "--trials must be >= 1" in capsys.readouterr().err and not db.exists()
