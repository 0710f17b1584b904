"""The numpy PQ reference: encoders, tables, int8 quantization, accumulate, emulator, codebooks."""

import numpy as np
import pytest

from tvm_lut.math import distances, pq


@pytest.fixture
def rng():
    return np.random.default_rng(1)


def test_l2_encoder_is_nearest_centroid(rng):
    x = rng.standard_normal((200, 12)).astype(np.float32)
    cents = rng.standard_normal((3, 16, 4)).astype(np.float32)
    ec, eb = pq.encoder_operands(cents, "l2")
    codes = pq.encode(x, ec, eb, "l2")
    brute = ((x.reshape(200, 3, 1, 4) - cents[None]) ** 2).sum(-1).argmin(-1)
    assert (codes == brute).mean() > 0.995  # differences only on float near-ties


def test_cosine_encoder_maximises_angle_similarity(rng):
    x = rng.standard_normal((200, 8)).astype(np.float32)
    cents = rng.standard_normal((2, 16, 4)).astype(np.float32) * rng.uniform(0.1, 5, (2, 16, 1)).astype(np.float32)
    ec, eb = pq.encoder_operands(cents, "cosine")
    assert not eb.any()
    codes = pq.encode(x, ec, eb, "cosine")
    xs = x.reshape(200, 2, 1, 4)
    cos = (xs * cents[None]).sum(-1) / np.linalg.norm(cents, axis=-1)[None]
    assert (codes == cos.argmax(-1)).mean() > 0.995


def test_l1_encoder(rng):
    x = rng.standard_normal((100, 8)).astype(np.float32)
    cents = rng.standard_normal((2, 16, 4)).astype(np.float32)
    codes = pq.encode(x, cents, np.zeros((2, 16), np.float32), "l1")
    brute = np.abs(x.reshape(100, 2, 1, 4) - cents[None]).sum(-1).argmin(-1)
    np.testing.assert_array_equal(codes, brute)


def test_int8_tables_symmetric_per_output(rng):
    t = rng.standard_normal((5, 16, 7)).astype(np.float32)
    t[:, :, 3] = 0
    q, s = pq.quantize_tables(t)
    assert q.dtype == np.int8 and q.min() >= -127 and q.max() <= 127
    assert np.all(np.abs(q).max(axis=(0, 1))[[0, 1, 2, 4, 5, 6]] == 127)
    assert s[3] == 1.0 and np.all(q[:, :, 3] == 0)
    assert np.abs(q * s - t).max() <= s.max() / 2 + 1e-6


def test_accumulate_sums_table_rows(rng):
    codes = rng.integers(0, 16, (9, 4)).astype(np.int32)
    tab = rng.integers(-127, 128, (4, 16, 5)).astype(np.int8)
    acc = pq.accumulate(codes, tab)
    assert acc.dtype == np.int32
    for n in range(9):
        np.testing.assert_array_equal(acc[n], sum(tab[c, codes[n, c]].astype(np.int32) for c in range(4)))


def test_im2col_matches_direct_convolution(rng):
    x = rng.standard_normal((2, 3, 7, 6)).astype(np.float32)
    w = rng.standard_normal((5, 3, 3, 2)).astype(np.float32)
    cols = pq.im2col(x, (3, 2), (2, 1), (1, 0, 2, 1), (2, 1))
    y = cols @ w.reshape(5, -1).T
    import torch

    ref = torch.nn.functional.conv2d(torch.from_numpy(np.pad(x, ((0, 0), (0, 0), (1, 2), (0, 1)))),
                                     torch.from_numpy(w), stride=(2, 1), dilation=(2, 1)).numpy()
    np.testing.assert_allclose(y.reshape(ref.shape[0], ref.shape[2], ref.shape[3], 5).transpose(0, 3, 1, 2), ref,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("distance", ["l2", "cosine", "l1"])
def test_fit_layer_approximates_the_layer(rng, distance):
    basis = rng.standard_normal((4, 10)).astype(np.float32)
    rows = (rng.standard_normal((3000, 4)) @ basis).astype(np.float32)  # low-rank, clusterable data
    w = rng.standard_normal((10, 24)).astype(np.float32)
    b = rng.standard_normal(24).astype(np.float32)
    layer = pq.fit_layer(rows[:2000], w, b, k=16, v=4, distance=distance)
    assert layer.num_codebooks == 3 and layer.centroids.shape == (3, 16, 4) and layer.tables.dtype == np.int8
    y = layer.emulate(rows[2000:])
    ref = rows[2000:] @ w + b
    rel = np.linalg.norm(y - ref) / np.linalg.norm(ref)
    assert rel < 0.6, rel
    # an uninformed baseline (always the mean) is much worse
    assert rel < 0.8 * np.linalg.norm(ref - ref.mean(0)) / np.linalg.norm(ref)


def test_batched_kmeans_matches_scikit_learn_quality(rng):
    """``pq.kmeans`` clusters every subspace at once; its inertia is scikit-learn's (same seeding scheme,
    Lloyd to the same tolerance) on average over subspaces and seeds (single runs of either land in
    local optima a few percent apart), and it is seeded."""
    from sklearn.cluster import KMeans

    # ReLU-like activations with a per-row scale, like conv inputs; one subspace with 5 distinct points
    data = np.maximum(rng.standard_normal((6, 1500, 4)), 0) * rng.gamma(1.0, 1.0, (1, 1500, 1))
    data[5] = rng.standard_normal((5, 4))[rng.integers(0, 5, 1500)]
    cents, labels = pq.kmeans(data, 16, seed=3)
    assert cents.shape == (6, 16, 4) and labels.shape == (6, 1500)
    ratios = []
    for i, sub in enumerate(data):
        d = ((sub[:, None] - cents[i][None]) ** 2).sum(-1)
        np.testing.assert_allclose(d[np.arange(1500), labels[i]], d.min(1), atol=1e-9)  # a nearest centroid
        if i < 5:
            ref = np.mean([KMeans(16, n_init=1, max_iter=100, random_state=s).fit(sub).inertia_ for s in range(3)])
            ratios.append(d.min(1).sum() / ref)
    assert np.mean(ratios) < 1.03 and max(ratios) < 1.1, ratios
    assert d.min(1).sum() < 1e-9  # 5 distinct points: each is a centroid
    again, _ = pq.kmeans(data, 16, seed=3)
    np.testing.assert_array_equal(cents, again)


def test_coarse_to_fine_kmeans_keeps_the_all_rows_quality(rng, monkeypatch):
    """Above ``KMEANS_COARSE_ROWS`` rows, ``fit_codebooks`` converges on a subsample and finishes with a few
    Lloyd iterations on every row (``kmeans(init=)``): its reconstruction error on all rows is within 1 %
    of k-means run to convergence on all of them. Lloyd from ``init`` never raises the inertia it starts at."""
    rows = (np.maximum(rng.standard_normal((4000, 32)), 0) * rng.gamma(1.0, 1.0, (4000, 1))).astype(np.float32)

    def error(cents):
        codes = pq.encode(rows, *pq.encoder_operands(cents, "l2"), "l2")
        recon = np.take_along_axis(cents[None], codes[:, :, None, None].astype(np.int64), axis=2)[:, :, 0]
        return np.linalg.norm(recon.reshape(len(rows), -1) - rows)

    fast = pq.fit_codebooks(rows, 4, 16, seed=0)
    monkeypatch.setattr(pq, "KMEANS_COARSE_ROWS", 10 ** 9)  # off: Lloyd to convergence on every row
    full = pq.fit_codebooks(rows, 4, 16, seed=0)
    assert not np.array_equal(fast, full) and error(fast) <= 1.01 * error(full)
    data = rows.reshape(-1, 8, 4).transpose(1, 0, 2).astype(np.float64)
    start, _ = pq.kmeans(data, 16, seed=0, max_iter=2)

    def inertia(cents):
        return (((data[:, :, None] - cents[:, None]) ** 2).sum(-1).min(-1)).sum()

    assert inertia(pq.kmeans(data, 16, init=start, max_iter=3)[0]) <= inertia(start) + 1e-9


def test_fit_codebooks_needs_k_vectors(rng):
    with pytest.raises(ValueError, match="at least 16 calibration vectors"):
        pq.fit_codebooks(rng.standard_normal((10, 8)).astype(np.float32), 4, 16)


def test_fit_layer_rejects_nonfinite(rng):
    rows = rng.standard_normal((100, 8)).astype(np.float32)
    rows[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        pq.fit_layer(rows, np.ones((8, 4), np.float32), None)


def test_refined_tables_never_worse_on_validation(rng):
    rows = rng.standard_normal((2000, 8)).astype(np.float32)
    w = rng.standard_normal((8, 6)).astype(np.float32)
    plain = pq.fit_layer(rows, w, None, refine=False)
    refined = pq.fit_layer(rows, w, None, refine=True)
    test = rng.standard_normal((500, 8)).astype(np.float32)
    err = lambda l: np.linalg.norm(l.emulate(test) - test @ w)
    assert err(refined) <= err(plain) * 1.05


def test_default_subvector_lengths():
    assert pq.default_subvector_len("conv2d", (3, 3)) == 9
    assert pq.default_subvector_len("conv2d", (1, 1)) == 4
    assert pq.default_subvector_len("dense", None) == 4


def test_kmedians_step_equals_per_cluster_median(rng):
    """The vectorised k-medians update is ``np.median`` of each cluster's members, dimension by
    dimension (odd and even member counts, ties from ReLU zeros), and an empty cluster keeps its centroid."""
    data = np.maximum(rng.standard_normal((5, 301, 3)), 0.0)  # many exact zeros: ties in the sort
    labels = rng.integers(0, 15, (5, 301))  # centroid 15 is empty everywhere
    labels[2] = rng.integers(0, 3, 301)  # few, large clusters in one subspace
    cents = rng.standard_normal((5, 16, 3))
    new = distances.kmedians_step(data, labels, cents)
    for i in range(5):
        for j in range(16):
            members = data[i][labels[i] == j]
            want = np.median(members, axis=0) if len(members) else cents[i, j]
            np.testing.assert_array_equal(new[i, j], want)


@pytest.mark.parametrize("distance", ["l2", "cosine", "l1"])
def test_fit_encoder_gives_the_kernels_codes(distance):
    """The fast encoder of table fitting (one matrix product) picks the codes of the bit-exact emulation,
    up to ties within float32 rounding."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4096, 72)).astype(np.float32)
    cents, offsets = pq.encoder_operands(rng.standard_normal((8, 16, 9)).astype(np.float32), distance)
    exact = pq.encode(x, cents, offsets, distance)
    fast = pq.encode_for_fit(x, cents, offsets, distance)
    assert fast.shape == exact.shape and fast.dtype == np.int32 and (fast != exact).mean() < 1e-3
