"""An encoder distance is one object (``tvm_lut.math.distances``): its numpy reference, cost formula, TIR score
step, torch training op and CAM cost agree with each other, and nothing else in the package decides by a
distance's name."""

import pathlib
import re

import numpy as np
import pytest
import torch

from tvm_lut.app import cli
from tvm_lut.errors import OptionError
from tvm_lut.math import cost, distances, pq
from tvm_lut.targets import cam_simulator as cam

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", distances.names())
def test_training_scores_rank_centroids_as_the_encoder_does(name):
    """The torch path (soft-PQ logits and the distance behind the initial temperature) picks the code the
    numpy reference of the kernels picks."""
    d = distances.get(name)
    g = np.random.default_rng(0)
    c, k, v, n = 4, 16, 3, 500
    cents = g.standard_normal((c, k, v)).astype(np.float32)
    x = g.standard_normal((n, c * v)).astype(np.float32)
    enc_c, offsets = d.encoder_operands(cents)
    codes = pq.encode(x, enc_c, offsets, name)  # (n, C), what the kernels compute
    sub = torch.from_numpy(x.reshape(n, c, v))
    logits = d.torch_logits(torch.from_numpy(cents), sub.transpose(0, 1).contiguous(), torch.tensor(1.0))
    agree = (logits.argmax(-1).T.numpy() == codes).mean()
    near = (d.torch_distance(sub, torch.from_numpy(cents)).argmin(-1).numpy() == codes).mean()
    assert agree > 0.995 and near > 0.995, (agree, near)  # float rounding may flip a near tie


def test_costs_come_from_the_distance():
    for name in distances.names():
        d = distances.get(name)
        mul, add = d.encode_ops(8, 16, 4)
        ops = cost.lut_ops(10, 8, 16, 4, 32, name, False)
        assert ops["encode_mul"] == 10 * mul and ops["encode_add"] == 10 * add
        assert cam.layer_cost(10, 8, 16, 4, 32, name, cam.CAMParams())["cam_mul"] == d.cam_multiplies(80, 16, 4)
    assert distances.get("l1").encode_ops(8, 16, 4)[0] == 0 and distances.get("l1").multiplier_free
    assert distances.get("l1").cam_multiplies(5, 16, 4) == 0 < distances.get("l2").cam_multiplies(5, 16, 4)


def test_the_score_step_is_the_same_expression_for_numpy_and_tir():
    from tvm import tirx
    from tvm.script import tirx as T

    acc, x, p = (tirx.Var(s, "float32") for s in "axp")
    assert "fabs" in str(distances.get("l1").score_step(acc, x, p, fabs=T.fabs))
    assert "fabs" not in str(distances.get("l2").score_step(acc, x, p, fabs=T.fabs))
    assert distances.get("l1").score_step(1.0, 2.0, 5.0) == 4.0 and distances.get("cosine").score_step(1.0, 2.0, 5.0) == -9.0


def test_names_are_what_the_cli_offers_and_unknown_ones_are_refused():
    parser = cli.build_parser()
    compile_ = parser._subparsers._group_actions[0].choices["compile"]
    choices = next(a.choices for a in compile_._actions if a.dest == "distance")
    assert tuple(choices) == distances.names() == pq.DISTANCES
    with pytest.raises(OptionError, match="unknown distance 'l3'; choose one of l2, cosine, l1"):
        distances.get("l3")


def test_no_module_but_distances_decides_by_a_distance_name():
    pattern = re.compile(r"""distance\s*[!=]=\s*["'](l1|l2|cosine)["']|["'](l1|l2|cosine)["']\s*[!=]=\s*\w*distance""")
    hits = [f"{p.relative_to(ROOT)}:{i + 1}" for d in ("tvm_lut", "relay_passes", "tir_schedules")
            for p in sorted((ROOT / d).rglob("*.py")) if p.name != "distances.py"
            for i, line in enumerate(p.read_text().splitlines()) if pattern.search(line)]
    assert not hits, hits
