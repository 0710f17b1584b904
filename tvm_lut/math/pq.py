"""Product quantization (PQ) for linear layers: the numpy reference implementation.

A linear map ``y = x @ W`` (x: N x D rows, W: D x M) becomes a table lookup:

1. split each row into ``C`` subspaces of length ``V`` (D is zero-padded up to ``D_pad = C * V``);
2. per subspace ``c`` keep ``K`` centroids ``P[c] in R^{K x V}`` (the codebook);
3. **encode**: ``code[n, c]`` = index of the nearest centroid of ``x[n, cV:(c+1)V]``;
4. **tables** (offline): ``T[c, k, m] = P[c, k] . W[cV:(c+1)V, m]``, stored as int8 with one symmetric
   scale per output ``m``;
5. **accumulate**: ``y[n, m] = scale[m] * sum_c Tq[c, code[n, c], m] (+ bias[m])``.

Everything here is float32/int numpy and mirrors operation for operation what the TIR kernels in
``tir_schedules.kernels`` compute, so tests can hold one against the other. The integer accumulate is
bit-exact; the float encoders agree except on near-ties (the compiled kernel may fuse multiply-adds).

Distances (how a subvector picks its centroid):

* ``"l2"`` (LUT-NN): ``argmin_k ||x - p_k||^2 = argmin_k (0.5 ||p_k||^2 - x . p_k)``; the kernel evaluates
  the right-hand form: K*V multiplies and K*V adds per subspace.
* ``"cosine"`` (PECAN-A, angle-based): ``argmax_k x . p_k / ||p_k||``, evaluated as ``argmin_k -x . u_k``
  with unit centroids ``u_k``; the table still uses the un-normalised centroid.
* ``"l1"`` (PECAN-D, multiplier-free): ``argmin_k sum_v |x_v - p_kv|``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from tvm_lut.math import distances, int8_scores

DISTANCES = distances.names()  # ("l2", "cosine", "l1"): see tvm_lut.math.distances

#: Defaults from LUT-NN: 16 centroids (a 4-bit code), 9-long subvectors for 3x3 convs, 4 otherwise.
DEFAULT_K = 16


def default_subvector_len(kind: str, kernel_hw: tuple[int, int] | None) -> int:
    """LUT-NN's default V: one input channel's 3x3 patch for 3x3 convs, 4 for everything else."""
    if kind == "conv2d" and kernel_hw == (3, 3):
        return 9
    return 4


def num_subspaces(d: int, v: int) -> int:
    """Number of codebooks C for a D-long row split into V-long subvectors (the last is zero-padded)."""
    return math.ceil(d / v)


def pad_columns(x: np.ndarray, d_pad: int) -> np.ndarray:
    """Zero-pad the last axis of ``x`` to ``d_pad`` columns (a no-op when already that wide)."""
    d = x.shape[-1]
    if d == d_pad:
        return x
    pad = [(0, 0)] * (x.ndim - 1) + [(0, d_pad - d)]
    return np.pad(x, pad)


def im2col(
    x: np.ndarray,
    kernel_hw: tuple[int, int],
    strides: tuple[int, int] = (1, 1),
    padding: tuple[int, int, int, int] = (0, 0, 0, 0),
    dilation: tuple[int, int] = (1, 1),
) -> np.ndarray:
    """NCHW input -> (N*OH*OW, C*KH*KW) patch rows, columns ordered (c, kh, kw) like an OIHW weight.

    ``padding`` is (top, left, bottom, right) as in Relax's conv2d. With this column order a V=KH*KW
    subspace is exactly one input channel's patch (LUT-NN's choice for 3x3 convs).
    """
    n, c, h, w = x.shape
    kh, kw = kernel_hw
    sh, sw = strides
    pt, pl, pb, pr = padding
    dh, dw = dilation
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
    cols = np.empty((n, oh, ow, c, kh, kw), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i * dh : i * dh + sh * (oh - 1) + 1 : sh, j * dw : j * dw + sw * (ow - 1) + 1 : sw]
            cols[:, :, :, :, i, j] = patch.transpose(0, 2, 3, 1)
    return cols.reshape(n * oh * ow, c * kh * kw)


# ----------------------------------------------------------------------------------------------
# Codebook learning (post-training, from calibration rows)
# ----------------------------------------------------------------------------------------------


#: Rows k-means sees per subspace (a seeded subsample): 256 per centroid at K=16 is plenty for V <= 9-dim
#: data, and k-means time grows faster than linearly with rows (12.6 s -> 1.0 s for a 128-codebook layer).
KMEANS_MAX_ROWS = 4096
#: Above this many rows k-means first converges on a seeded subsample of this size, then runs at most
#: ``KMEANS_FINE_ITERS`` Lloyd iterations on all rows from there: Lloyd's late iterations move centroids
#: little, and on the subsample they cost half as much (the trained ResNet-18's layers: 1.6-1.9x faster,
#: error of the reconstruction within 0.1 % of the all-rows run; benchmarks/README.md).
KMEANS_COARSE_ROWS = 2048
KMEANS_FINE_ITERS = 10


def _sq_dist(x: np.ndarray, p: np.ndarray, x2: np.ndarray) -> np.ndarray:
    """Squared L2 distances (c, n, K) of subvectors x (c, n, V) to centroids p (c, K, V)."""
    d = x2[:, :, None] - 2.0 * np.matmul(x, p.transpose(0, 2, 1)) + (p * p).sum(-1)[:, None, :]
    return np.maximum(d, 0.0)


def kmeans(data: np.ndarray, k: int, seed: int = 0, max_iter: int = 100,
           tol: float = 1e-4, init: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Batched k-means: one independent clustering per subspace, all subspaces at once.

    ``data`` (c, n, V) float64 -> centroids (c, K, V) and labels (c, n). Greedy k-means++ seeding (the
    best of ``2 + log K`` sampled candidates per step, as scikit-learn seeds), then Lloyd iterations until
    no centroid moves more than ``tol`` times the data's variance. Vectorised over subspaces in numpy: a
    layer's hundreds of small clusterings cost one pass of batched matrix products per iteration instead
    of hundreds of library calls (scikit-learn's per-call OpenMP pool also fights torch's threads).
    An empty cluster keeps its previous centroid. ``init`` (c, K, V) starts the Lloyd iterations from
    given centroids instead of seeding (``fit_codebooks``' coarse-to-fine pass)."""
    c, n, v = data.shape
    if init is None:
        cents = _seed_plus_plus(data, k, seed)
    else:
        cents = np.array(init, np.float64)
    tol_abs = tol * data.var(1).mean(-1)  # per subspace (c,)
    active = np.arange(c)  # subspaces still moving: converged ones leave the batch
    lanes = np.arange(v)
    for _ in range(max_iter):
        whole = len(active) == c  # no copy of the data while every subspace still moves
        xa, ca = (data, cents) if whole else (data[active], cents[active])  # ca is read before cents is set
        labels = _nearest(xa, ca)
        idx = (labels + (np.arange(len(active)) * k)[:, None]).ravel()
        counts = np.bincount(idx, minlength=len(active) * k).reshape(-1, k)
        # every coordinate's sums in one pass: bin (centroid, lane), rows added in order as before
        sums = np.bincount((idx[:, None] * v + lanes).ravel(), weights=xa.reshape(-1),
                           minlength=len(active) * k * v).reshape(-1, k, v)
        new = np.where(counts[..., None] > 0, sums / np.maximum(counts, 1)[..., None], ca)
        shift = ((new - ca) ** 2).sum((1, 2))
        cents[active] = new
        active = active[shift > tol_abs[active]]
        if not len(active):
            break
    return cents, _nearest(data, cents)


def _seed_plus_plus(data: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Greedy k-means++ centroids (c, K, V) for every subspace of ``data`` (c, n, V) at once."""
    c, n, v = data.shape
    rng = np.random.default_rng(seed)
    x2 = (data * data).sum(-1)  # (c, n)
    ar = np.arange(c)
    trials = 2 + int(np.log(k))
    cents = np.empty((c, k, v))
    cents[:, 0] = data[ar, rng.integers(0, n, c)]
    closest = _sq_dist(data, cents[:, :1], x2)[:, :, 0]  # (c, n)
    for j in range(1, k):
        pot = closest.sum(1, keepdims=True)
        cum = np.cumsum(closest, 1)
        r = rng.random((c, trials)) * pot
        cand = np.minimum(np.stack([np.searchsorted(cum[i], r[i]) for i in range(c)]), n - 1)  # (c, trials)
        d_cand = _sq_dist(data, data[ar[:, None], cand], x2)  # (c, n, trials)
        new_closest = np.minimum(closest[:, :, None], d_cand)
        best = new_closest.sum(1).argmin(1)  # (c,)
        cents[:, j] = data[ar, cand[ar, best]]
        closest = new_closest[ar, :, best]
    return cents


def _nearest(x: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (c, n) by squared L2, ``||p||^2 - 2 x.p`` (``||x||^2`` is constant)."""
    scores = np.matmul(x, -2.0 * p.transpose(0, 2, 1))
    scores += (p * p).sum(-1)[:, None, :]
    return scores.argmin(-1)


def fit_codebooks(rows: np.ndarray, v: int, k: int, distance: str = "l2", seed: int = 0) -> np.ndarray:
    """Learn K centroids per subspace from calibration rows (n x D_pad, D_pad = C*V) -> (C, K, V).

    ``l2`` and ``cosine`` use k-means (``kmeans``; ``cosine`` on unit-normalised subvectors, i.e.
    spherical k-means, then each centroid is rescaled to the mean norm of its members so the table row
    stays a faithful reconstruction). ``l1`` refines the k-means solution with a few k-medians steps,
    which minimise the L1 distance the encoder uses.
    """
    dist = distances.get(distance)
    n, d_pad = rows.shape
    if d_pad % v:
        raise ValueError(f"row width {d_pad} is not a multiple of the subvector length V={v}")
    if n < k:
        raise ValueError(f"K={k} centroids need at least {k} calibration vectors, got {n}")
    c_count = d_pad // v
    rows = rows.astype(np.float32, copy=False)
    if n > KMEANS_MAX_ROWS:
        rows = rows[np.sort(np.random.default_rng(seed).choice(n, KMEANS_MAX_ROWS, replace=False))]
    sub = rows.reshape(len(rows), c_count, v).transpose(1, 0, 2).astype(np.float64)  # (C, n, V)
    data, norms = dist.kmeans_data(sub)
    out = np.empty((c_count, k, v), dtype=np.float32)
    chunk = max(1, (1 << 22) // (len(rows) * k))  # subspaces per batch: (chunk, n, K) distances of ~32 MB
    coarse = None
    if len(rows) > KMEANS_COARSE_ROWS:  # coarse-to-fine: converge on a subsample, finish on all rows
        coarse = np.sort(np.random.default_rng(seed + 1).choice(len(rows), KMEANS_COARSE_ROWS, replace=False))
    for c0 in range(0, c_count, chunk):
        part = slice(c0, min(c0 + chunk, c_count))
        init = None if coarse is None else kmeans(data[part][:, coarse], k, seed + c0)[0]
        cent, labels = kmeans(data[part], k, seed + c0, max_iter=100 if init is None else KMEANS_FINE_ITERS,
                              init=init)
        cent = dist.refine(cent, labels, sub[part], None if norms is None else norms[part], k)
        out[part] = cent
    return out


# ----------------------------------------------------------------------------------------------
# Encoder operands and encoding (what the encode kernel computes)
# ----------------------------------------------------------------------------------------------


def encoder_operands(centroids: np.ndarray, distance: str) -> tuple[np.ndarray, np.ndarray]:
    """Centroids as the encode kernel consumes them, and the per-centroid score offset (C, K).

    l2: (P, 0.5*||P||^2); cosine: (P/||P||, 0); l1: (P, 0) (``Distance.encoder_operands``).
    """
    return distances.get(distance).encoder_operands(centroids)


def fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``a * b + c`` for float32 operands, rounded once to float32, as a fused multiply-add instruction.

    LLVM contracts the encoder's ``score - x * p`` into one FMA (``vfnmadd`` on x86, ``fmls`` on AArch64),
    so the reference must round once too. The float64 product of two float32 is exact; the float64 sum is
    made round-to-odd (Boldo and Melquiond's trick: 53 >= 24 + 2 bits), after which rounding to float32
    is correctly rounded, with no double-rounding error."""
    p = np.asarray(a, np.float32).astype(np.float64) * np.asarray(b, np.float32).astype(np.float64)
    c64 = np.asarray(c, np.float32).astype(np.float64)
    p, c64 = np.broadcast_arrays(p, c64)
    t = p + c64
    tb = t - p
    err = (p - (t - tb)) + (c64 - tb)  # TwoSum: t + err == p + c exactly
    t = np.array(t, dtype=np.float64, copy=True)
    fix = (err != 0) & ((t.view(np.int64) & 1) == 0)  # inexact with an even last bit: step toward err
    t[fix] = np.nextafter(t[fix], np.where(err[fix] > 0, np.inf, -np.inf))
    return t.astype(np.float32)


def encode_scores(x: np.ndarray, enc_centroids: np.ndarray, offsets: np.ndarray, distance: str,
                  fused: bool = True) -> np.ndarray:
    """Per (row, subspace, centroid) score, accumulated over v in order like the kernel -> (N, C, K).

    L1 is sub, abs, add (exact IEEE operations, nothing to contract); the dot-product scores are one
    fused multiply-add per element (``fma32``), as the compiled encoder computes them. ``fused=False``
    rounds the product and the sum each, as code for a CPU without FMA (``x86:x86-64-v2``) computes them."""
    c_count, k, v = enc_centroids.shape
    dist = distances.get(distance)
    xs = x.astype(np.float32).reshape(x.shape[0], c_count, 1, v)
    score = np.broadcast_to(offsets, (x.shape[0], c_count, k)).astype(np.float32)
    for i in range(v):
        if dist.absolute:
            score = dist.score_step(score, xs[..., i], enc_centroids[None, :, :, i])
        else:
            score = fma32(-xs[..., i], enc_centroids[None, :, :, i], score) if fused else \
                score + (-xs[..., i]) * enc_centroids[None, :, :, i]
    return score


def encode_for_fit(x: np.ndarray, enc_centroids: np.ndarray, offsets: np.ndarray, distance: str) -> np.ndarray:
    """Codes (N, C) for fitting tables: the dot-product scores as one batched matrix product in float64
    (``offsets - x . p``) instead of ``encode``'s element-by-element FMA emulation, about 10x faster on a
    layer's calibration rows. The codes differ from the kernel's only where two scores tie within float32
    rounding; table refinement is a least-squares fit over thousands of rows and does not notice. L1
    scores have no matrix form and go through ``encode``. Inference emulation keeps ``encode`` (bit-exact)."""
    if distances.get(distance).absolute:
        return encode(x, enc_centroids, offsets, distance)
    c_count, k, v = enc_centroids.shape
    xs = x.astype(np.float64).reshape(x.shape[0], c_count, v).transpose(1, 0, 2)  # (C, N, V)
    scores = offsets.astype(np.float64)[:, None, :] - np.matmul(xs, enc_centroids.astype(np.float64).transpose(0, 2, 1))
    return scores.argmin(-1).T.astype(np.int32)


def encode(x: np.ndarray, enc_centroids: np.ndarray, offsets: np.ndarray, distance: str,
           fused: bool = True) -> np.ndarray:
    """Nearest-centroid codes (N, C) int32 for padded rows x (N, C*V); ties go to the lowest index."""
    return encode_scores(x, enc_centroids, offsets, distance, fused).argmin(-1).astype(np.int32)


# ----------------------------------------------------------------------------------------------
# Tables and accumulation
# ----------------------------------------------------------------------------------------------


def build_tables(centroids: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Float tables T[c, k, m] = P[c, k] . W[cV:(c+1)V, m] for a (D_pad, M) weight -> (C, K, M)."""
    c_count, k, v = centroids.shape
    w = weight.astype(np.float32).reshape(c_count, v, -1)
    return np.einsum("ckv,cvm->ckm", centroids.astype(np.float64), w.astype(np.float64)).astype(np.float32)


def quantize_tables(tables: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 quantization with one scale per output column -> (int8 (C, K, M), scale (M,))."""
    amax = np.abs(tables).max(axis=(0, 1))
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(tables / scale), -127, 127).astype(np.int8)
    return q, scale


def row_offsets(codes: np.ndarray, k: int, m: int) -> np.ndarray:
    """Codes (N, C) -> offsets of the selected rows in the flattened (C*K*M) table: (c*K + code) * M.

    The compiled encoder emits these instead of raw codes so the accumulate spends no multiply on
    addressing (``kernels.encode(..., row_stride=M)``)."""
    return ((codes.astype(np.int64) + np.arange(codes.shape[1]) * k) * m).astype(np.int32)


def accumulate(codes: np.ndarray, tables_q: np.ndarray) -> np.ndarray:
    """int32 sums y[n, m] = sum_c Tq[c, code[n, c], m]: what the accumulate kernel computes, bit for bit."""
    n, c_count = codes.shape
    acc = np.zeros((n, tables_q.shape[2]), dtype=np.int32)
    for c in range(c_count):
        acc += tables_q[c, codes[:, c], :].astype(np.int32)
    return acc


def dequantize(acc: np.ndarray, scale: np.ndarray, bias: np.ndarray | None, fused: bool = True) -> np.ndarray:
    """``float(acc) * scale + bias`` rounded once to float32, as the compiled epilogue's fused
    multiply-add computes it (the float64 product of an int32 and a float32 is exact); ``fused=False``
    rounds the product first, as code for a CPU without FMA does."""
    if not fused:
        y = acc.astype(np.float32) * scale.astype(np.float32)
        return y if bias is None else y + bias.astype(np.float32)
    y = acc.astype(np.float64) * scale.astype(np.float64)
    if bias is not None:
        y = y + bias.astype(np.float64)
    return y.astype(np.float32)


def pack_codes(codes: np.ndarray, lanes: int, pairs: int | None = None) -> np.ndarray:
    """Codes (N, C) in [0, 16) -> the shuffle kernel's layout (ceil(N/lanes), pairs, lanes) uint8.

    Byte ``j`` of block ``b``, pair ``p`` holds codebook ``2p`` in its low nibble and ``2p+1`` in its high
    nibble, for row ``b*lanes + j//2`` (even ``j``) or ``b*lanes + lanes/2 + j//2`` (odd ``j``): each 16-bit
    word carries one row of each half of the block (``tir_schedules.shuffle``). Missing rows and codebooks
    (padding up to ``pairs``, default ceil(C/2)) get code 0.
    """
    n, c = codes.shape
    pairs = -(-c // 2) if pairs is None else pairs
    nb = -(-n // lanes)
    full = np.zeros((nb * lanes, 2 * pairs), np.uint8)
    full[:n, :c] = codes
    byte = (full[:, 0::2] | (full[:, 1::2] << 4)).reshape(nb, lanes, pairs)
    order = np.empty(lanes, np.int64)
    order[0::2] = np.arange(lanes // 2)
    order[1::2] = np.arange(lanes // 2, lanes)
    return np.ascontiguousarray(byte[:, order, :].transpose(0, 2, 1))


def pack_codes_grouped(codes: np.ndarray, lanes: int) -> np.ndarray:
    """Codes (N, C) in [0, 16) -> the grouped shuffle kernel's layout (ceil(N/lanes), ceil(C/4), 4*lanes)
    uint8: byte ``4r + j`` of block ``b``, group ``g`` is ``16j + code`` of row ``b*lanes + r``, codebook
    ``4g + j`` (the index of that codebook's entry in the group's 64-byte table, ``vpermb``). Missing rows
    and codebooks get code 0."""
    n, c = codes.shape
    groups, nb = -(-c // 4), -(-n // lanes)
    full = np.zeros((nb * lanes, groups * 4), np.uint8)
    full[:n, :c] = codes
    full += (16 * (np.arange(groups * 4) % 4)).astype(np.uint8)
    return np.ascontiguousarray(full.reshape(nb, lanes, groups, 4).transpose(0, 2, 1, 3).reshape(nb, groups, 4 * lanes))


@dataclass
class PQLayer:
    """Everything one LUT layer stores: codebooks, int8 tables and the per-output affine epilogue."""

    centroids: np.ndarray  # (C, K, V) float32, the learned codebooks (table rows are built from these)
    tables: np.ndarray  # (C, K, M) int8
    scale: np.ndarray  # (M,) float32 dequantisation scale per output
    bias: np.ndarray | None  # (M,) float32 or None
    distance: str
    d: int  # unpadded input width D
    int8: int8_scores.Int8Encoder | None = None  # integer encoder operands (``encoder="int8"``), else fp32

    @property
    def num_codebooks(self) -> int:
        return self.centroids.shape[0]

    @property
    def k(self) -> int:
        return self.centroids.shape[1]

    @property
    def v(self) -> int:
        return self.centroids.shape[2]

    @property
    def m(self) -> int:
        return self.tables.shape[2]

    def encoder_operands(self) -> tuple[np.ndarray, np.ndarray]:
        return encoder_operands(self.centroids, self.distance)

    def emulate(self, x: np.ndarray, fused: bool = True) -> np.ndarray:
        """Reference output for rows x (N, D): encode -> accumulate -> scale (+ bias), as compiled
        (``fused=False``: for a target without fused multiply-add, e.g. ``x86:x86-64-v2``)."""
        xp = pad_columns(x.astype(np.float32), self.num_codebooks * self.v)
        acc = accumulate(self.encode(xp, fused), self.tables)
        return dequantize(acc, self.scale, self.bias, fused)

    def encode(self, xp: np.ndarray, fused: bool = True) -> np.ndarray:
        """Codes (N, C) of padded rows as the compiled encoder computes them: integer scores of the
        quantized rows (``int8``) or fp32 scores (``encode``)."""
        if self.int8 is not None:
            return int8_scores.encode_float(xp, self.int8)
        cents, offsets = self.encoder_operands()
        return encode(xp, cents, offsets, self.distance, fused)

    def with_int8_encoder(self, rows: np.ndarray) -> PQLayer:
        """This layer with an int8 encoder whose input quantization comes from ``rows`` (N, D), the
        layer's calibration inputs (tables unchanged)."""
        if not distances.get(self.distance).integer_scores:
            raise ValueError(f"the int8 encoder computes L2 scores, not {self.distance!r}")
        inv, zp = int8_scores.input_quantization(rows)
        return replace(self, int8=int8_scores.fit(self.centroids, inv, zp))


def _one_hot(codes: np.ndarray, k: int):
    """Sparse (n, C*K) indicator matrix of the codes (scipy CSR)."""
    from scipy import sparse

    n, c_count = codes.shape
    cols = (codes.astype(np.int64) + np.arange(c_count, dtype=np.int64) * k).ravel()
    rows = np.repeat(np.arange(n, dtype=np.int64), c_count)
    return sparse.csr_matrix((np.ones(n * c_count), (rows, cols)), shape=(n, c_count * k))


def refine_tables(
    codes: np.ndarray,
    k: int,
    targets: np.ndarray,
    init: np.ndarray,
    ridges: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0),
    holdout: float = 0.2,
    seed: int = 0,
) -> tuple[np.ndarray, float | None]:
    """Least-squares tables (MADDNESS-style ridge refinement), validated on held-out rows.

    With the codes fixed the layer output is linear in the table entries, so the tables that best
    reproduce ``targets`` (n, M) solve a ridge regression over one-hot code indicators, pulled
    towards ``init`` (the P.W tables). Each ridge strength (relative to the mean code frequency) is
    fitted on all but a ``holdout`` fraction of the rows and scored on the rest, against ``init``
    itself; the winner is refitted on all rows. Returns (tables, chosen ridge or None if ``init`` won).
    """
    n, c_count = codes.shape
    m = targets.shape[1]
    ck = c_count * k
    t0 = init.reshape(ck, m).astype(np.float64)
    y = targets.astype(np.float64)
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(n * holdout)
    if n_val < 200 or n - n_val < ck:  # too few rows to fit ck unknowns per output, or to validate
        return init, None
    val, fit = perm[:n_val], perm[n_val:]
    # the normal equations of each split, built once: every ridge reuses them, and the whole set's are
    # their sums (the Gram of one-hot codes is integer counts, exact in float64)
    g_fit, g_val = _one_hot(codes[fit], k), _one_hot(codes[val], k)
    gram_fit, gram_val = (g_fit.T @ g_fit).toarray(), (g_val.T @ g_val).toarray()
    rhs_fit, rhs_val = g_fit.T @ y[fit], g_val.T @ y[val]

    def solve(gram, rhs, rows, ridge):
        from scipy import linalg

        lam = ridge * max(rows * c_count / ck, 1.0)  # relative to the mean code frequency
        a = gram + lam * np.eye(ck)
        return linalg.solve(a, rhs + lam * t0, assume_a="pos", overwrite_a=True, check_finite=False)

    best, best_err = None, float(np.linalg.norm(g_val @ t0 - y[val]))
    for ridge in ridges:
        err = float(np.linalg.norm(g_val @ solve(gram_fit, rhs_fit, len(fit), ridge) - y[val]))
        if err < best_err:
            best, best_err = ridge, err
    if best is None:
        return init, None
    return solve(gram_fit + gram_val, rhs_fit + rhs_val, n, best).reshape(c_count, k, m).astype(np.float32), best


#: Largest C*K for which the dense ridge solve is used (a (C*K)^2 system; beyond it the P.W tables stay).
MAX_REFINE_UNKNOWNS = 4096


def fit_layer(
    rows: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray | None,
    *,
    k: int = DEFAULT_K,
    v: int = 4,
    distance: str = "l2",
    seed: int = 0,
    refine: bool = True,
    targets: np.ndarray | None = None,
    encoder: str = "fp32",
) -> PQLayer:
    """Post-training PQ of one linear layer y = x @ weight + bias from calibration rows (n, D).

    ``weight`` is (D, M) with any batch-norm scale already folded in. With ``refine`` the float tables
    are re-fitted by validated ridge regression (``refine_tables``) before int8 quantization, when
    C*K <= ``MAX_REFINE_UNKNOWNS``, towards ``targets`` (n, M): by default ``rows @ weight``; in
    sequential calibration, the exact model's outputs of this layer for the same rows, so the tables
    also absorb the error of the layers before it.

    ``encoder="int8"`` (L2 only) adds integer encoder operands (``int8_scores``; input quantization from
    ``rows``), and the tables are refined on the codes that encoder gives.
    """
    d, _m = weight.shape
    if rows.ndim != 2 or rows.shape[1] != d:
        raise ValueError(f"calibration rows have shape {rows.shape}, expected (n, {d})")
    if not np.isfinite(rows).all():
        raise ValueError("calibration rows contain NaN or Inf")
    d_pad = num_subspaces(d, v) * v
    xp = pad_columns(rows, d_pad)
    if encoder not in ("fp32", "int8"):
        raise ValueError(f"encoder={encoder!r}; choose 'fp32' or 'int8'")
    centroids = fit_codebooks(xp, v, k, distance, seed)
    int8 = None
    if encoder == "int8":
        if not distances.get(distance).integer_scores:
            raise ValueError(f"the int8 encoder computes L2 scores, not {distance!r}")
        int8 = int8_scores.fit(centroids, *int8_scores.input_quantization(rows))
    tables = build_tables(centroids, pad_columns(weight.T, d_pad).T)
    if refine and tables.shape[0] * k <= MAX_REFINE_UNKNOWNS:
        if int8 is not None:
            codes = int8_scores.encode_float(xp, int8)
        else:
            cents, offsets = encoder_operands(centroids, distance)
            codes = encode_for_fit(xp, cents, offsets, distance)
        if targets is None:
            targets = rows.astype(np.float64) @ weight.astype(np.float64)
        tables, _ = refine_tables(codes, k, targets, tables, seed=seed)
    tables_q, scale = quantize_tables(tables)
    return PQLayer(
        centroids=centroids,
        tables=tables_q,
        scale=scale,
        bias=None if bias is None else bias.astype(np.float32),
        distance=distance,
        d=d,
        int8=int8,
    )
