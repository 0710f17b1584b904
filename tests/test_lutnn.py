"""Learned centroids (LUT-NN / PECAN): the torch lookup layers against the numpy reference, gradients,
the fine-tuning driver (seeded, resumable), and the compiled model reproducing the torch LUT outputs."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import tvm_lut
from relay_passes import LUTify
from tvm_lut.errors import OptionError
from tvm_lut.math import distances, pq
from tvm_lut.runtime.build import BatchRunner, compile_with_params, resolve_target
from tvm_lut.train import lutnn


class TinyNet(nn.Module):
    """conv (padded) -> conv (strided, no bias) -> dense, no batch norm: tables must match bit for bit."""

    def __init__(self, bn: bool = False):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8) if bn else nn.Identity()
        self.c2 = nn.Conv2d(8, 24, 3, stride=2, padding=1, bias=False)
        self.fc = nn.Linear(24 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.c1(x)))
        return self.fc(torch.flatten(torch.relu(self.c2(x)), 1))


def _data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = (x[:, 0].mean((1, 2)) > 0).long() + 2 * (x[:, 1].mean((1, 2)) > 0).long()  # learnable labels
    return x, y


def _loader(x, y, bs=32):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=bs, shuffle=True)


@pytest.mark.parametrize("distance", ["l2", "cosine", "l1"])
@pytest.mark.parametrize("conv", [False, True])
def test_lookup_layer_matches_numpy_reference(distance, conv):
    torch.manual_seed(1)
    rng = np.random.default_rng(2)
    if conv:
        exact = nn.Conv2d(5, 20, 3, stride=2, padding=(1, 2), dilation=(1, 2))
        x = torch.randn(3, 5, 9, 11)
        rows = pq.im2col(x.numpy(), (3, 3), (2, 2), (1, 2, 1, 2), (1, 2))
        cents = rng.standard_normal((5, 16, 9)).astype(np.float32)
    else:
        exact = nn.Linear(18, 20)
        x = torch.randn(7, 18)
        rows = x.numpy()
        cents = rng.standard_normal((5, 16, 4)).astype(np.float32)  # D=18 -> 5 subspaces, 2 pad columns
    layer = (lutnn.LUTConv2d if conv else lutnn.LUTLinear)(exact, cents, distance, 1.0).eval()
    with torch.no_grad():
        got = layer(x)
    w = exact.weight.detach().numpy().reshape(20, -1).T
    tq, scale = pq.quantize_tables(pq.build_tables(cents, pq.pad_columns(w.T, cents.shape[0] * cents.shape[2]).T))
    ref = pq.PQLayer(cents, tq, scale, exact.bias.detach().numpy(), distance, w.shape[0]).emulate(rows)
    if conv:
        ref = ref.reshape(3, got.shape[2], got.shape[3], 20).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(got.numpy(), ref)
    q2, s2 = layer.lookup_tables()
    np.testing.assert_array_equal(q2, tq)
    np.testing.assert_array_equal(s2, scale)


@pytest.mark.parametrize("distance", ["l2", "cosine", "l1"])
def test_straight_through_gradients_reach_everything(distance):
    torch.manual_seed(0)
    layer = lutnn.LUTLinear(nn.Linear(12, 6), np.random.default_rng(0).standard_normal((3, 16, 4)).astype(np.float32),
                            distance, 0.5).train()
    x = torch.randn(40, 12, requires_grad=True)
    with torch.no_grad():
        hard = layer.eval()(x)
    layer.train()
    y = layer(x)
    np.testing.assert_array_equal(y.detach().numpy(), hard.numpy())  # forward value is the hard lookup
    (y ** 2).sum().backward()
    for name, p in [("centroids", layer.centroids), ("temperature", layer.log_temperature),
                    ("weight", layer.weight), ("bias", layer.bias), ("input", x)]:
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


@pytest.mark.parametrize("distance", ["l2", "cosine", "l1"])
def test_hand_written_soft_assign_equals_autograd(distance):
    """``_SoftAssign``'s backward against autograd of the estimator it stands for,
    ``onehot @ P + softmax @ P - stop_gradient(softmax @ P)``, in float64."""
    torch.manual_seed(3)
    layer = lutnn.LUTLinear(nn.Linear(12, 6), np.random.default_rng(3).standard_normal((3, 16, 4)).astype(np.float32),
                            distance, 0.7).double()
    sub_t = torch.randn(3, 50, 4, dtype=torch.float64)
    g = torch.randn(3, 50, 4, dtype=torch.float64)

    def grads(fn):
        layer.zero_grad()
        x = sub_t.clone().requires_grad_(True)
        recon, codes = fn(layer.logits(x))
        (recon * g).sum().backward()
        return recon.detach(), codes, [x.grad, layer.centroids.grad, layer.log_temperature.grad]

    def reference(logits):
        codes = logits.detach().argmax(-1)
        soft = torch.softmax(logits, -1)
        onehot = torch.nn.functional.one_hot(codes, 16).double()
        soft_recon = torch.bmm(soft, layer.centroids)
        return torch.bmm(onehot, layer.centroids) + soft_recon - soft_recon.detach(), codes

    got, want = grads(lambda lg: lutnn._SoftAssign.apply(lg, layer.centroids)), grads(reference)
    np.testing.assert_array_equal(got[1].numpy(), want[1].numpy())
    np.testing.assert_allclose(got[0].numpy(), want[0].numpy(), rtol=0, atol=1e-12)  # value: the chosen centroids
    for name, a, b in zip(["input", "centroids", "temperature"], got[2], want[2]):
        assert float(b.abs().sum()) > 0, name
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("v", [1, 3, 4])
def test_hand_written_l1_distance_equals_cdist(v):
    """``distances.l1_autograd`` (the L1 logits' backward for short subvectors) against ``torch.cdist(p=1)``'s own
    gradients in float64, and against finite differences (``gradcheck``)."""
    torch.manual_seed(4)
    x0 = torch.randn(3, 40, v, dtype=torch.float64)
    p0 = torch.randn(3, 16, v, dtype=torch.float64)
    g = torch.randn(3, 40, 16, dtype=torch.float64)
    out = []
    for fn in (distances.l1_autograd().apply, lambda a, b: torch.cdist(a, b, p=1)):
        x, p = x0.clone().requires_grad_(True), p0.clone().requires_grad_(True)
        d = fn(x, p)
        (d * g).sum().backward()
        out.append((d.detach(), x.grad, p.grad))
    for a, b in zip(*out):
        assert float(b.abs().sum()) > 0
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(distances.l1_autograd().apply, (x0[:, :5].clone().requires_grad_(True),
                                                              p0.clone().requires_grad_(True)))


def test_finetune_learns_beyond_kmeans_and_is_seeded():
    x, y = _data(512)
    model = TinyNet()
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(60):  # a trained exact model first
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    init = lutnn.convert(model, [x[:128]], seed=0)
    with torch.no_grad():
        loss0 = float(nn.functional.cross_entropy(init(x), y))
    res = lutnn.finetune(model, _loader(x, y), epochs=4, lr=3e-3, progress=False, init_batches=4, seed=0)
    with torch.no_grad():
        loss1 = float(nn.functional.cross_entropy(res.model(x), y))
    assert loss1 < loss0, (loss0, loss1)
    assert set(res.codebooks) == {"c1", "c2", "fc"} and res.steps == 4 * 16
    again = lutnn.finetune(model, _loader(x, y), epochs=4, lr=3e-3, progress=False, init_batches=4, seed=0)
    for name in res.codebooks:  # same seed, same run (up to float rounding of multithreaded reductions)
        np.testing.assert_allclose(res.codebooks[name]["centroids"], again.codebooks[name]["centroids"],
                                   rtol=1e-4, atol=1e-5)


def test_distillation_follows_the_teacher_not_the_labels():
    """distill=1 ignores the labels: with shuffled labels the student still moves toward the teacher."""
    x, y = _data(512)
    teacher = TinyNet()
    torch.manual_seed(0)
    opt = torch.optim.Adam(teacher.parameters(), 1e-2)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(teacher(x), y).backward()
        opt.step()
    teacher.eval()
    wrong = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]

    def kl(student):
        with torch.no_grad():
            return float(nn.functional.kl_div(nn.functional.log_softmax(student(x), 1),
                                              nn.functional.softmax(teacher(x), 1), reduction="batchmean"))

    kw = dict(epochs=6, lr=1e-2, weight_lr=3e-3, progress=False, init_batches=4, seed=0)
    init = lutnn.convert(teacher, [x[:128]], seed=0)
    kd = lutnn.finetune(teacher, _loader(x, wrong), teacher=teacher, distill=1.0, **kw)
    ce = lutnn.finetune(teacher, _loader(x, wrong), **kw)
    assert kl(kd.model) < 0.7 * min(kl(init), kl(ce.model)), (kl(kd.model), kl(init), kl(ce.model))
    with pytest.raises(OptionError, match="teacher must be an exact model"):
        lutnn.finetune(teacher, _loader(x, y), teacher=init, **kw)
    with pytest.raises(OptionError, match="distill weight"):
        lutnn.finetune(teacher, _loader(x, y), teacher=teacher, distill=1.5, **kw)


def test_finetune_resumes_from_checkpoint(tmp_path):
    x, y = _data(192)
    model = TinyNet().eval()
    kw = dict(epochs=2, progress=False, init_batches=2, seed=3, checkpoint_every=2)
    full = lutnn.finetune(model, _loader(x, y), **kw)
    ck = str(tmp_path / "ck")
    part = lutnn.finetune(model, _loader(x, y), checkpoint_dir=ck, max_steps=5, **kw)  # "interrupted"
    assert part.steps == 5 and os.path.isfile(os.path.join(ck, "lutnn_checkpoint.pt"))
    resumed = lutnn.finetune(model, _loader(x, y), checkpoint_dir=ck, **kw)
    assert resumed.steps == full.steps == 12
    for name in full.codebooks:
        np.testing.assert_allclose(resumed.codebooks[name]["centroids"], full.codebooks[name]["centroids"],
                                   rtol=1e-5, atol=1e-6)
    with pytest.raises(OptionError, match="other settings"):
        lutnn.finetune(model, _loader(x, y), checkpoint_dir=ck, **{**kw, "seed": 4})


def test_finetune_stops_after_max_minutes_and_resumes(tmp_path):
    """A wall-time slice (``max_minutes``) stops between steps with a checkpoint; the next call finishes
    the same run as an uninterrupted one."""
    import time

    x, y = _data(192)
    model = TinyNet().eval()
    kw = dict(epochs=2, progress=False, init_batches=2, seed=3, checkpoint_every=100)
    full = lutnn.finetune(model, _loader(x, y), **kw)
    ck = str(tmp_path / "ck")

    def slow(xb, _gen):  # 0.3 s a step: a 1.5 s slice (k-means start included) stops before the 12th step
        time.sleep(0.3)
        return xb

    part = lutnn.finetune(model, _loader(x, y), checkpoint_dir=ck, max_minutes=1.5 / 60, transform=slow, **kw)
    assert part.steps < 12
    assert torch.load(os.path.join(ck, "lutnn_checkpoint.pt"), weights_only=True)["step"] == part.steps
    resumed = lutnn.finetune(model, _loader(x, y), checkpoint_dir=ck, transform=lambda xb, g: xb, **kw)
    assert resumed.steps == full.steps == 12
    for name in full.codebooks:
        np.testing.assert_allclose(resumed.codebooks[name]["centroids"], full.codebooks[name]["centroids"],
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("distance", ["l2", "l1"])
def test_compiled_model_reproduces_torch_lookup_outputs(distance, tmp_path):
    x, y = _data(256)
    res = lutnn.finetune(TinyNet().eval(), _loader(x, y), epochs=1, distance=distance, progress=False,
                         init_batches=4)
    path = str(tmp_path / "cb.npz")
    lutnn.save_codebooks(path, res.codebooks)
    codebooks = lutnn.load_codebooks(path)
    mod = tvm_lut.from_torch(lutnn.to_exact(res.model), x[:16])
    lut = LUTify(codebooks=codebooks, progress=False)  # no calibration data needed
    lut_res = lut.run(mod)
    lut_mod = lut_res.module
    assert all(r["method"] == "pq" and r["distance"] == distance for r in lut_res.layers)
    for name, layer in lutnn.lut_layers(res.model).items():
        q, scale = layer.lookup_tables()
        np.testing.assert_array_equal(lut_res.pq_layers[name].tables, q)  # same tables
        np.testing.assert_array_equal(lut_res.pq_layers[name].scale, scale)
    ex, params = compile_with_params(lut_mod, resolve_target("x86"))
    out = BatchRunner(ex, [v for _, v in params], [("x", (16, 3, 8, 8), "float32")]).run({"x": x[:64].numpy()})[0]
    with torch.no_grad():
        ref = res.model(x[:64]).numpy()
    np.testing.assert_array_equal(out, ref)  # same codes -> same int32 sums -> same floats


def test_batch_norm_is_folded_yet_outputs_match():
    x, y = _data(256)
    res = lutnn.finetune(TinyNet(bn=True).eval(), _loader(x, y), epochs=1, progress=False, init_batches=4)
    mod = tvm_lut.from_torch(lutnn.to_exact(res.model), x[:16])
    ex, params = compile_with_params(LUTify(codebooks=res.codebooks, progress=False)(mod), resolve_target("x86"))
    out = BatchRunner(ex, [v for _, v in params], [("x", (16, 3, 8, 8), "float32")]).run({"x": x[:64].numpy()})[0]
    with torch.no_grad():
        ref = res.model(x[:64]).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-3 * float(np.abs(ref).max()))
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.98


def test_bad_codebooks_are_named():
    x, _ = _data(32)
    mod = tvm_lut.from_torch(TinyNet().eval(), x[:16])
    with pytest.raises(OptionError, match="'fc'.*shape"):
        LUTify(codebooks={"fc": np.zeros((4, 16))}, progress=False)(mod)
    with pytest.raises(OptionError, match="does not cover"):
        LUTify(codebooks={"fc": np.zeros((3, 16, 4), np.float32)}, progress=False)(mod)
    with pytest.raises(OptionError, match="unknown layer"):
        LUTify(codebooks={"nope": np.zeros((3, 16, 4), np.float32)}, progress=False)(mod)
    with pytest.raises(OptionError, match="not found"):
        lutnn.load_codebooks("/nonexistent/cb.npz")


@pytest.mark.parametrize("kw, match", [({"v": 0}, "V=0"), ({"v": -3}, "V=-3"), ({"k": 1}, "K=1"),
                                       ({"k": 300}, "K=300")])
def test_bad_k_and_v_are_refused_not_defaulted(kw, match):
    """``v=0`` once read as "the default V"; convert and finetune now refuse it, like LUTify's options."""
    x, y = _data(64)
    with pytest.raises(OptionError, match=match):
        lutnn.convert(TinyNet(), [x[:32]], **kw)
    with pytest.raises(OptionError, match=match):
        lutnn.finetune(TinyNet(), _loader(x, y), max_steps=1, progress=False, **kw)
    lut = lutnn.convert(TinyNet(), [x[:32]], v=1)  # the smallest V is accepted
    assert lutnn.lut_layers(lut)["fc"].centroids.shape[-1] == 1


@pytest.mark.parametrize("distance", ["l2", "cosine", "l1"])
def test_eval_encoder_blocks_rows_without_changing_codes(distance, monkeypatch):
    """The eval-mode encoder works in row blocks (bounded memory on large batches): blocks of 5 rows,
    the last one partial, give the codes of one block and of the numpy reference encoder."""
    rng = np.random.default_rng(5)
    layer = lutnn.LUTLinear(nn.Linear(9, 4), rng.standard_normal((3, 16, 3)).astype(np.float32), distance, 1.0)
    sub = torch.from_numpy(rng.standard_normal((23, 3, 3)).astype(np.float32))
    whole = layer.encode(sub)
    monkeypatch.setattr(lutnn, "ENCODE_BLOCK", 5 * 3 * 16)
    blocked = layer.encode(sub)
    cents, offsets = pq.encoder_operands(layer.centroids.detach().numpy(), distance)
    ref = pq.encode(sub.reshape(23, 9).numpy(), cents, offsets, distance)
    np.testing.assert_array_equal(blocked.numpy(), whole.numpy())
    np.testing.assert_array_equal(blocked.numpy(), ref)


def test_layer_v_sets_one_layers_subvector_and_the_codebooks_carry_it_to_lutify():
    """``layer_v`` (per-layer V): c2 at V=3 (one kernel row per codebook), the rest LUT-NN's default; the
    learned codebooks hold that V, so LUTify builds each layer at its own V without being told."""
    x, y = _data(64)
    lut = lutnn.convert(TinyNet(), [x[:32]], layer_v={"c2": 3})
    shapes = {n: tuple(m.centroids.shape) for n, m in lutnn.lut_layers(lut).items()}
    assert shapes["c2"] == (24, 16, 3) and shapes["c1"] == (3, 16, 9) and shapes["fc"][-1] == 4
    with pytest.raises(OptionError, match="nope"):
        lutnn.convert(TinyNet(), [x[:32]], layer_v={"nope": 3})
    with pytest.raises(OptionError, match="V=0"):
        lutnn.convert(TinyNet(), [x[:32]], layer_v={"c2": 0})
    res = lutnn.finetune(TinyNet().eval(), _loader(x, y), max_steps=1, progress=False, init_batches=2,
                         layer_v={"c2": 3})
    mod = tvm_lut.from_torch(lutnn.to_exact(res.model), x[:4])
    recs = {r["name"]: r for r in LUTify(codebooks=res.codebooks, progress=False).run(mod).layers}
    assert recs["c2"]["v"] == 3 and recs["c2"]["c"] == 24 and recs["c1"]["v"] == 9


@pytest.mark.parametrize("geometry", [dict(stride=1, padding=1, v=9), dict(stride=2, padding=(1, 2), v=3),
                                      dict(stride=1, padding=0, v=4)])
def test_training_layout_is_the_rows_layout(geometry):
    """The training path goes from ``unfold``'s columns straight to subspace-major subvectors and back
    (``subspace_major``/``project``, one copy each way instead of three): the same subvectors and the same
    smooth outputs as going through rows, with strides, asymmetric padding and a V that does not divide D."""
    torch.manual_seed(3)
    v = geometry.pop("v")
    exact = nn.Conv2d(5, 7, 3, bias=True, **geometry)
    c = -(-5 * 9 // v)
    layer = lutnn.LUTConv2d(exact, np.random.default_rng(0).standard_normal((c, 16, v)).astype(np.float32), "l2", 1.0)
    x = torch.randn(2, 5, 9, 11)
    rows, ctx = layer.rows(x)
    via_rows = F.pad(rows, (0, c * v - layer.d)).reshape(-1, c, v).transpose(0, 1)
    sub_t, ctx2 = layer.subspace_major(x)
    assert ctx == ctx2 and torch.equal(sub_t, via_rows)
    recon = torch.randn_like(sub_t)
    smooth = layer.unrows(recon.transpose(0, 1).reshape(-1, c * v) @ layer.weight_matrix() + layer.bias, ctx)
    torch.testing.assert_close(layer.project(recon, ctx), smooth, rtol=1e-5, atol=1e-5)
    assert layer.project(recon, ctx).is_contiguous()


def test_convert_starts_from_given_codebooks_where_their_shape_fits():
    """``codebooks=`` (a continued run): a layer whose centroids match its (C, K, V) starts from them; one
    whose V changed (c2 now V=3, the given ones V=9) starts from k-means."""
    x, _ = _data(64)
    net = TinyNet()
    first = lutnn.learned_codebooks(lutnn.convert(net, [x[:32]], seed=0))
    moved = {n: {"centroids": cb["centroids"] + 1.0, "distance": "l2"} for n, cb in first.items()}
    again = lutnn.learned_codebooks(lutnn.convert(net, [x[:32]], seed=0, layer_v={"c2": 3}, codebooks=moved))
    np.testing.assert_array_equal(again["c1"]["centroids"], moved["c1"]["centroids"])
    np.testing.assert_array_equal(again["fc"]["centroids"], moved["fc"]["centroids"])
    assert again["c2"]["centroids"].shape == (24, 16, 3)
    fresh = lutnn.learned_codebooks(lutnn.convert(net, [x[:32]], seed=0, layer_v={"c2": 3}))
    np.testing.assert_array_equal(again["c2"]["centroids"], fresh["c2"]["centroids"])
