"""Structured rewrites: DeBut chain generator (property-tested), ALS, the factor kernel against numpy,
EVBMF / energy ranks, Tucker-2, and compiled butterfly / low-rank models against their torch twins."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tvm_lut
from relay_passes import LUTify
from tir_schedules import cpu, kernels
from tvm_lut.errors import OptionError
from tvm_lut.math import butterfly as bf, lowrank as lr
from tvm_lut.options import coerce, parse_cli
from tvm_lut.runtime.build import BatchRunner, compile_with_params, resolve_target
from tvm_lut.train import structured_nn as sn

from .test_kernels import _run

# ----------------------------------------------------------------------------------------------
# chain generator
# ----------------------------------------------------------------------------------------------


def test_chain_generator_property_random_triples():
    """Many random (in, out, budget) triples, powers of two or not: every chain returned is valid
    (shapes chain up, covers the layer, dense product), fits the budget and wastes little on padding;
    when no chain fits, the error names the smallest one and it is indeed above the budget."""
    rng = np.random.default_rng(0)
    made = 0
    for _ in range(60):
        d_in, d_out = (int(v) for v in rng.integers(2, 600, 2))
        frac = float(rng.uniform(0.02, 0.9))
        try:
            chain = bf.chain_for(d_in, d_out, frac)
        except OptionError as e:
            assert "smallest valid chain" in str(e)
            smallest = int(str(e).split(" has ")[1].split(" ")[0])
            assert smallest > int(frac * d_in * d_out)
            continue
        made += 1
        fs = chain.factors
        assert all(a.p == b.q for a, b in zip(fs, fs[1:]))
        assert chain.in_pad >= d_in and chain.out_pad >= d_out
        assert chain.in_pad <= d_in * 1.125 + 1 and chain.out_pad <= d_out * 1.125 + 1
        assert chain.params <= int(frac * d_in * d_out)
        assert chain.wasted_params <= 0.15 * chain.params
        assert bf.is_dense(chain)
    assert made > 30  # most random budgets are achievable


def test_chain_for_non_powers_of_two_uses_the_budget():
    # LeNet's 400 -> 120 dense layer at 17% of its parameters (DeBut's LeNet point): no padding needed
    chain = bf.chain_for(400, 120, 0.17)
    assert chain.in_pad == 400 and chain.out_pad == 120
    assert 0.10 * 48000 <= chain.params <= 0.17 * 48000
    # a prime width is padded to a nearby composite, never to the next power of two
    chain = bf.chain_for(131, 67, 0.5)
    assert chain.in_pad < 147 and chain.out_pad < 76


def test_is_dense_catches_a_chain_with_structural_zeros():
    ok = bf.chain_from_radices(16, 16, (4, 4), (4, 4))
    assert bf.is_dense(ok)
    bad = bf.Chain(16, 16, (bf.Factor(16, 16, 4, 4, 1), bf.Factor(16, 16, 4, 4, 1)))  # same digit twice
    assert not bf.is_dense(bad)
    with pytest.raises(OptionError, match="structural zeros"):
        bf.validate(bad)
    with pytest.raises(OptionError, match="block count"):
        bf.Factor(10, 12, 2, 3, 2)


def test_als_recovers_a_representable_weight_and_reference_forward_agrees():
    rng = np.random.default_rng(1)
    chain = bf.chain_for(120, 84, 0.2)
    values = [rng.standard_normal(f.shape) for f in chain.factors]
    w = bf.product(chain, values)
    fitted, err = bf.als_fit(w, chain, sweeps=8, seed=3)
    assert err < 1e-4
    x = rng.standard_normal((7, 120))
    np.testing.assert_allclose(bf.apply_chain(x, chain, values), x @ w.T, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(bf.apply_chain(x, chain, fitted), x @ w.T, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("scheduled", [False, True])
@pytest.mark.parametrize("factor", [(324, 405, 12, 15, 1), (120, 324, 10, 27, 12), (18, 27, 2, 3, 3),
                                    (64, 64, 4, 4, 16), (14, 18, 7, 9, 2)])
def test_butterfly_factor_kernel_matches_numpy(scheduled, factor):
    f = bf.Factor(*factor)
    rng = np.random.default_rng(sum(factor))
    n = 37
    x = rng.standard_normal((n, f.q)).astype(np.float32)
    w = rng.standard_normal(f.shape).astype(np.float32)
    func = kernels.butterfly_factor(n, f.blocks, f.r, f.s, f.t)
    func = cpu.schedule(func) if scheduled else func
    got = _run(func, x, np.ascontiguousarray(w.transpose(0, 2, 1, 3)), out_shape=(n, f.p), out_dtype="float32")
    np.testing.assert_allclose(got, bf.apply_factor(x.astype(np.float64), f, w.astype(np.float64)),
                               rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# low rank
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,rank,noise", [((64, 128), 10, 0.1), ((200, 100), 25, 0.05), ((50, 90), 5, 0.3)])
def test_evbmf_finds_the_rank_of_noisy_low_rank_matrices(shape, rank, noise):
    rng = np.random.default_rng(rank)
    y = rng.standard_normal((shape[0], rank)) @ rng.standard_normal((rank, shape[1]))
    y += noise * np.sqrt(rank) * rng.standard_normal(shape)
    assert lr.evbmf_rank(y) == rank
    assert lr.evbmf_rank(rng.standard_normal(shape)) <= 2  # pure noise: (almost) nothing to keep


def test_energy_rank_and_exact_factorisations():
    rng = np.random.default_rng(0)
    s = np.array([10.0, 5.0, 1.0, 0.1])
    y = rng.standard_normal((8, 4)) @ np.diag(s) @ rng.standard_normal((4, 6))
    sv = np.linalg.svd(y, compute_uv=False)
    e = np.cumsum(sv ** 2) / np.sum(sv ** 2)
    assert lr.energy_rank(y, float(e[1]) - 1e-9) == 2 and lr.energy_rank(y, 1.0) <= 4
    core = rng.standard_normal((5, 4, 3, 3))
    w = np.einsum("ma,abhw,bc->mchw", rng.standard_normal((32, 5)), core, rng.standard_normal((4, 16)))
    t = lr.factorize_tucker2(w, "evbmf")
    assert t.ranks == (4, 5) and lr.relative_error(w, t) < 1e-6
    p = lr.factorize_pair(w, 5)
    assert lr.relative_error(w, p) < 1e-6 and p.first.shape == (5, 16, 3, 3)
    assert lr.factorize(w, "evbmf").form == "tucker2"  # fewer multiplies than the rank-5 pair here
    with pytest.raises(OptionError, match="rank"):
        lr.select_rank(y, "lots")


# ----------------------------------------------------------------------------------------------
# compiled rewrites == torch modules
# ----------------------------------------------------------------------------------------------


def _compiled(mod, x, **lutify):
    p = LUTify(progress=False, **lutify)
    res = p.run(mod)
    out = res.module
    ex, params = compile_with_params(out, resolve_target("x86"))
    y = BatchRunner(ex, [v for _, v in params], [("x", x.shape, "float32")]).run({"x": x})[0]
    return y, {r["name"]: r for r in res.layers}


@pytest.mark.parametrize("method,kw", [("lowrank", {"rank": 3}), ("lowrank", {"rank": 4, "form": "tucker2"}),
                                       ("lowrank", {"rank": 3, "form": "pair"}), ("butterfly", {"budget": 0.3})])
def test_compiled_structured_model_reproduces_torch(small_cnn, small_inputs, method, kw):
    """Convert in torch, export the dense equivalent, compile with the structured options: the compiled
    rewrite must compute what the torch structured model computes (batch norm folded, the strided /
    padded / dilated conv keeping its attributes, the grouped conv left exact)."""
    model = sn.convert(small_cnn, method, **kw)
    x = small_inputs[:16]
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    layers, factors = sn.structured_options(model)
    mod = tvm_lut.from_torch(sn.to_exact(model), torch.from_numpy(x))
    y, recs = _compiled(mod, x, method="exact", layers=layers, factors=factors)  # other layers: as trained
    np.testing.assert_allclose(y, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())
    assert recs["features.5"]["method"] == "exact" and "grouped" in recs["features.5"]["reason"]
    for name in layers:
        assert recs[name]["method"] == method, recs[name]
        assert recs[name]["lut_ops"]["mul"] < recs[name]["exact_ops"]["mul"]


def test_lowrank_pass_alone_and_unprofitable_ranks_stay_exact(small_cnn, small_inputs):
    x = small_inputs[:16]
    mod = tvm_lut.from_torch(small_cnn, torch.from_numpy(x))
    with torch.no_grad():
        ref = small_cnn(torch.from_numpy(x)).numpy()
    full = {n: {"rank": "energy=1.0"} for n in ("features.0", "features.3", "fc1", "fc2")}
    y, recs = _compiled(mod, x, method="lowrank", layers=full)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)  # full rank: nothing to gain, all exact
    assert all(recs[n]["method"] == "exact" and "removes no multiplies" in recs[n]["reason"] for n in full)
    _, recs = _compiled(mod, x, method="lowrank", layers={"fc1": {"rank": 2}, "fc2": "exact"})
    assert recs["fc1"]["ranks"] == [2] and recs["fc2"]["method"] == "exact"


def test_structured_options_are_checked():
    assert coerce("a", {"method": "lowrank", "rank": [2, 3]}).rank == (2, 3)
    assert parse_cli(["conv:method=lowrank,rank=energy=0.9"])["conv"].rank == "energy=0.9"
    assert parse_cli(["fc:method=butterfly,budget=0.25"])["fc"].budget == 0.25
    with pytest.raises(OptionError, match="needs method='pq'"):
        LUTify(method="lowrank", budget="max-drop=1")
    for bad, msg in [({"method": "lowrank", "rank": "many"}, "rank"), ({"method": "lowrank", "form": "cp"}, "form"),
                     ({"method": "butterfly", "budget": -1}, "budget")]:
        with pytest.raises(OptionError, match=msg):
            coerce("layer", bad)
    with pytest.raises(OptionError, match="unknown method 'magic'; choose one of pq, butterfly, lowrank, int8, exact"):
        LUTify(layers={"layer": {"method": "magic"}})  # names are checked against the method registry
    with pytest.raises(OptionError, match="unknown method 'magic'"):
        LUTify(method="magic")


def test_trained_factors_that_do_not_fit_the_layer_are_refused(small_cnn, small_inputs):
    x = small_inputs[:4]
    model = sn.convert(small_cnn, "butterfly", budget=0.3, layers=["fc1"])
    _, factors = sn.structured_options(model)
    mod = tvm_lut.from_torch(small_cnn, torch.from_numpy(x))  # the original weights, not the chain's
    with pytest.raises(OptionError, match="do not reproduce the layer's weight"):
        LUTify(factors=factors, progress=False)(mod)
    with pytest.raises(OptionError, match="unknown layer"):
        LUTify(factors={"nope": factors["fc1"]}, progress=False)(mod)


def test_cli_method_and_report_show_params_and_measured_latency(tmp_path, small_cnn, small_inputs, capsys):
    from tvm_lut.app import cli

    from .test_deploy_cli import _calib, _onnx_model

    model = _onnx_model(tmp_path, small_cnn)
    calib = _calib(tmp_path, small_inputs[:64], labels=np.arange(64) % 10)
    out = str(tmp_path / "art")
    assert cli.main(["compile", model, "--calib", calib, "-o", out, "-q", "--method", "lowrank", "--rank", "2",
                     "--layer", "fc2:exact"]) == 0
    capsys.readouterr()
    assert cli.main(["report", out, "--json"]) == 0
    import json

    rep = json.loads(capsys.readouterr().out)
    recs = {r["name"]: r for r in rep["layers"]}
    lowr = [r for r in recs.values() if r["method"] == "lowrank"]
    assert lowr and all(r["ranks"][0] == 2 for r in lowr)
    for r in recs.values():
        if "exact_ops" in r:  # every layer timed, rewritten ones both ways
            assert r["latency"]["exact_ms"] > 0
            assert (r["method"] == "exact") or (r["latency"]["rewrite_ms"] > 0
                                                and r["slower_than_exact"] == (r["latency"]["rewrite_ms"] >
                                                                               r["latency"]["exact_ms"]))
    assert cli.main(["report", out]) == 0
    text = capsys.readouterr().out
    assert "ms (share)" in text and "params" in text and "lowrank" in text and "parameters removed" in text
    assert cli.main(["compile", model, "--calib", calib, "-o", str(tmp_path / "bad"), "-q", "--method",
                     "lowrank", "--rank", "lots"]) == 2
    assert not (tmp_path / "bad").exists()


def test_nuclear_norm_finetuning_lowers_the_rank_energy_picks():
    """NRMF: training with the nuclear-norm penalty concentrates the singular values, so the energy
    threshold keeps fewer of them than after the same training without it."""
    torch.manual_seed(0)
    x = torch.randn(512, 32)
    teacher_w = torch.randn(32, 16) @ torch.randn(16, 32) / 4  # a rank-16 map plus what noise adds
    y = (x @ teacher_w).argmax(1) % 4
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=True)
    net = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    plain, _ = sn.finetune(net, data, epochs=20, lr_=3e-3, progress=False)
    nrmf, losses = sn.finetune(net, data, epochs=20, lr_=3e-3, nuclear=3e-3, progress=False)
    r_plain = lr.energy_rank(plain[0].weight.detach().numpy(), 0.9)
    r_nrmf = lr.energy_rank(nrmf[0].weight.detach().numpy(), 0.9)
    assert r_nrmf < r_plain, (r_nrmf, r_plain)
    with torch.no_grad():
        assert float(sn.nuclear_penalty(nrmf)) < float(sn.nuclear_penalty(plain))
