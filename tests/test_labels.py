"""Bad ``labels`` in a calibration or input file: a clear error naming the file and the bad values, and
nothing written (no artifact directory, no output file)."""

import os

import numpy as np
import pytest
import torch

from tvm_lut.app import cli
from tvm_lut.errors import CalibrationError
from tvm_lut.runtime.calibrate import check_labels

BAD = {  # labels for 64 samples of a 10-class model -> what the error must say
    "negative": (np.r_[np.full(63, 3), -1], "'labels' -1 (1 of 64 entries) are outside [0, 10): the model has 10 outputs"),
    "too_large": (np.r_[np.full(62, 3), 57, 10], "'labels' 10, 57 (2 of 64 entries) are outside [0, 10)"),
    "fractional": (np.r_[np.full(63, 3.0), 0.5], "must be integer class indices; got float64 values such as 0.5"),
    "text": (np.array(["cat"] * 64), "must be integer class indices, got dtype <U3"),
    "count": (np.full(50, 3), "'labels' has 50 entries but the inputs have 64 samples"),
    "shape": (np.full((64, 2), 3), "one class index per sample, got shape (64, 2)"),
}


def test_check_labels_accepts_integer_classes_and_whole_floats():
    assert check_labels(np.arange(10), 10, 10, "f").dtype == np.int64
    np.testing.assert_array_equal(check_labels(np.arange(4.0).reshape(4, 1), 4, 10, "f"), [0, 1, 2, 3])
    with pytest.raises(CalibrationError, match=r"^f\.npz: 'labels' 10 \(1 of 1 entries\)"):
        check_labels(np.array([10]), 1, 10, "f.npz")


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory, small_cnn):
    path = tmp_path_factory.mktemp("m") / "model.onnx"
    torch.onnx.export(small_cnn, (torch.zeros(1, 3, 8, 8),), str(path), input_names=["image"],
                      output_names=["logits"], dynamo=False)
    return str(path)


@pytest.mark.parametrize("case", sorted(BAD))
def test_compile_refuses_bad_labels_and_writes_nothing(tmp_path, onnx_model, small_inputs, case, capsys):
    labels, message = BAD[case]
    calib = tmp_path / "calib.npz"
    np.savez(calib, image=small_inputs, labels=labels)
    out = tmp_path / "out"
    assert cli.main(["compile", onnx_model, "--calib", str(calib), "-o", str(out), "-q", "--no-latency"]) == 2
    err = capsys.readouterr().err
    assert f"{calib}: " in err and message in err, err
    assert not os.path.exists(out)


def test_run_refuses_bad_labels_and_writes_no_output(tmp_path, onnx_model, small_inputs, capsys):
    calib = tmp_path / "calib.npz"
    np.savez(calib, image=small_inputs, labels=np.arange(64) % 10)
    out = tmp_path / "out"
    assert cli.main(["compile", onnx_model, "--calib", str(calib), "-o", str(out), "-q", "--no-latency"]) == 0
    capsys.readouterr()
    x = tmp_path / "x.npz"
    np.savez(x, image=small_inputs[:8], labels=np.array([0, 1, 2, 3, 4, 5, 6, 57]))
    y = tmp_path / "y.npz"
    assert cli.main(["run", str(out), "--input", str(x), "--output", str(y)]) == 2
    assert f"{x}: 'labels' 57 (1 of 8 entries) are outside [0, 10)" in capsys.readouterr().err
    assert not os.path.exists(y)
    np.savez(x, image=small_inputs[:8], labels=np.arange(8))
    assert cli.main(["run", str(out), "--input", str(x), "--output", str(y)]) == 0
    assert "top-1 accuracy against 'labels'" in capsys.readouterr().out and os.path.exists(y)
