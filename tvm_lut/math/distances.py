"""Encoder distances: what ``l2``, ``cosine`` and ``l1`` mean, each in one object.

The encoder gives each subvector the centroid of the lowest *score*, ``offset[k] +/- sum_t term(x_t, p_kt)``
over its V elements. A distance fixes every step of that, and this module is the one place that says it:

* ``encoder_operands``: the centroids as the kernels consume them and the per-centroid offset (numpy);
* ``score_step``: one element's term, for numpy and for TIR (``fabs=T.fabs``): ``acc - x * p`` (l2,
  cosine: a fused multiply-add in the compiled kernels) or ``acc + |x - p|`` (l1, multiplier-free);
* ``encode_ops``: the encoder's multiplies and adds per row (``tvm_lut.math.cost``);
* ``cam_multiplies``: what the CAM's search spends on multiplies (``tvm_lut.targets.cam_simulator``);
* ``kmeans_data``/``refine``: how k-means sees the subvectors and what follows it (``pq.fit_codebooks``);
* ``torch_logits`` and ``torch_distance``: the training path's differentiable scores (``tvm_lut.train.lutnn``),
  which rank centroids the same way the kernels do.

``get(name)`` and ``names()`` are what options, the CLI and the passes accept.
"""

from __future__ import annotations

import functools

import numpy as np

from tvm_lut.errors import OptionError


class Distance:
    """Base of the encoder distances; the subclasses below are the ones the kernels implement."""

    name: str = ""
    description: str = ""
    multiplier_free: bool = False  # no multiply in the encoder (PECAN-D's L1): kept off paths that add one
    absolute: bool = False  # the score adds |x - p| (else subtracts x * p)
    integer_scores: bool = False  # the int8 encoder (``int8_scores``) computes this distance's scores

    def encoder_operands(self, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(centroids as the encode kernel consumes them (C, K, V), per-centroid score offset (C, K))."""
        p = centroids.astype(np.float32)
        return p, np.zeros(p.shape[:2], np.float32)

    def score_step(self, acc, x, p, fabs=np.abs):
        """One subvector element's term added to a score: ``acc - x * p`` (or ``acc + |x - p|``)."""
        return acc + fabs(x - p) if self.absolute else acc - x * p

    def encode_ops(self, c: int, k: int, v: int) -> tuple[int, int]:
        """Multiplies and adds the encoder spends on one row of C subvectors of length V."""
        raise NotImplementedError

    def cam_multiplies(self, searches: int, k: int, v: int) -> int:
        """Multiplies of ``searches`` CAM searches over K stored centroids of V cells: a dot product per
        stored cell, none for a multiplier-free distance."""
        return 0 if self.multiplier_free else searches * k * v

    def kmeans_data(self, sub: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(what k-means clusters, per-subvector norms or None) for subvectors (C, n, V)."""
        return sub, None

    def refine(self, cent: np.ndarray, labels: np.ndarray, sub: np.ndarray, norms, k: int) -> np.ndarray:
        """Centroids after k-means (C', K, V), given its labels, the subvectors and ``kmeans_data``'s norms."""
        return cent

    def torch_logits(self, p, sub_t, t):
        """-distance / temperature of each subvector (C, n, V) to each centroid (C, K, V) -> (C, n, K), up
        to a constant per (subspace, row): the differentiable path of training."""
        raise NotImplementedError

    def torch_distance(self, sub, p):
        """Distance of rows (n, C, V) to centroids (C, K, V) -> (n, C, K), lower is nearer (torch)."""
        raise NotImplementedError


class L2(Distance):
    name = "l2"
    description = "squared Euclidean (LUT-NN): score 0.5*||p||^2 - x.p"
    integer_scores = True

    def encoder_operands(self, centroids):
        p = centroids.astype(np.float32)
        return p, (np.float32(0.5) * (p * p).sum(-1, dtype=np.float32)).astype(np.float32)

    def encode_ops(self, c, k, v):
        return k * c * v, k * c * v

    def torch_logits(self, p, sub_t, t):
        import torch

        # drops ||x||^2 and folds 2 / temperature into the centroids: one baddbmm
        return torch.baddbmm((p * p).sum(-1).unsqueeze(1) / -t, sub_t, (p * (2 / t)).transpose(1, 2))

    def torch_distance(self, sub, p):
        return ((sub[:, :, None, :] - p[None]) ** 2).sum(-1)


class Cosine(Distance):
    name = "cosine"
    description = "angle (PECAN-A): score -x.(p/||p||)"

    def encoder_operands(self, centroids):
        p = centroids.astype(np.float32)
        norms = np.sqrt((p * p).sum(-1, keepdims=True, dtype=np.float32))
        return (p / np.maximum(norms, np.float32(1e-12))).astype(np.float32), np.zeros(p.shape[:2], np.float32)

    def encode_ops(self, c, k, v):
        return k * c * v, k * c * (v - 1)

    def kmeans_data(self, sub):
        norms = np.linalg.norm(sub, axis=-1, keepdims=True)
        return sub / np.maximum(norms, 1e-12), norms

    def refine(self, cent, labels, sub, norms, k):
        # spherical k-means, then each centroid rescaled to the mean norm of its members, so the table row
        # stays a faithful reconstruction
        member_norm = np.stack([np.bincount(lab, weights=nm[:, 0], minlength=k) for lab, nm in zip(labels, norms)])
        counts = np.stack([np.bincount(lab, minlength=k) for lab in labels])
        mean_norm = np.where(counts > 0, member_norm / np.maximum(counts, 1), 0.0)
        return cent / np.maximum(np.linalg.norm(cent, axis=-1, keepdims=True), 1e-12) * mean_norm[..., None]

    def torch_logits(self, p, sub_t, t):
        import torch

        u = p / p.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        xn = sub_t / sub_t.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return torch.bmm(xn, (u / t).transpose(1, 2))

    def torch_distance(self, sub, p):
        import torch

        u = p / p.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return -torch.einsum("ncv,ckv->nck", sub / sub.norm(dim=-1, keepdim=True).clamp_min(1e-12), u)


#: Longest subvector for which the hand-written L1 backward (rather than ``cdist``'s) computes the training
#: logits: 2.6x faster at V=3 (C=48, n=32768), slower at V=9.
L1_HAND_BACKWARD_MAX_V = 4


class L1(Distance):
    name = "l1"
    description = "Manhattan (PECAN-D): score sum |x - p|, no multiplies"
    multiplier_free = True
    absolute = True

    def encode_ops(self, c, k, v):
        return 0, k * c * (2 * v - 1)

    def refine(self, cent, labels, sub, norms, k):
        for _ in range(5):  # k-medians steps: they minimise the L1 distance the encoder uses
            lab = np.abs(sub[:, :, None, :] - cent[:, None]).sum(-1).argmin(-1)  # (c, n)
            cent = kmedians_step(sub, lab, cent)
        return cent

    def torch_logits(self, p, sub_t, t):
        import torch

        if p.shape[-1] <= L1_HAND_BACKWARD_MAX_V:
            return l1_autograd().apply(sub_t, p) / -t
        return torch.cdist(sub_t, p, p=1) / -t

    def torch_distance(self, sub, p):
        import torch

        return torch.cdist(sub.transpose(0, 1), p, p=1).transpose(0, 1)


def kmedians_step(data: np.ndarray, labels: np.ndarray, cents: np.ndarray) -> np.ndarray:
    """One k-medians update, all subspaces at once: each centroid becomes the per-dimension median of
    its members (``np.median``'s: the mean of the two middle values for an even count); an empty
    cluster keeps its centroid.

    ``data`` (c, n, V), ``labels`` (c, n), ``cents`` (c, K, V) -> new centroids (c, K, V). Vectorised by
    sorting: within each subspace the points are ordered by value (per dimension), then stably by label,
    so each cluster's members form a sorted run whose middle is read by index. That replaces a Python
    loop over (subspace, centroid), about 30,000 ``np.median`` calls per pass on ResNet-20 at V=3."""
    c, n, v = data.shape
    k = cents.shape[1]
    by_value = np.argsort(data, axis=1, kind="stable")  # (c, n, V)
    lab_sorted = np.take_along_axis(np.broadcast_to(labels[:, :, None], data.shape), by_value, 1)
    by_label = np.argsort(lab_sorted, axis=1, kind="stable")  # runs of one label, values ascending
    ordered = np.take_along_axis(np.take_along_axis(data, by_value, 1), by_label, 1)  # (c, n, V)
    counts = np.stack([np.bincount(lab, minlength=k) for lab in labels])  # (c, K)
    start = np.cumsum(counts, 1) - counts
    lo = np.minimum(start + (counts - 1) // 2, n - 1)  # the two middle members (equal for odd counts)
    hi = np.minimum(start + counts // 2, n - 1)
    med = 0.5 * (np.take_along_axis(ordered, np.broadcast_to(lo[:, :, None], (c, k, v)), 1)
                 + np.take_along_axis(ordered, np.broadcast_to(hi[:, :, None], (c, k, v)), 1))
    return np.where(counts[:, :, None] > 0, med, cents)


@functools.cache
def l1_autograd():
    """``torch.cdist(x, p, p=1)`` for (C, n, V) rows and (C, K, V) centroids, with a backward written as
    V passes of ``sign(x_v - p_v) * grad`` over the (C, n, K) gradient (``cdist``'s own L1 backward
    dominated an L1 training step at short subvectors). Built on first use: torch loads only for training."""
    import torch

    class L1Distance(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, p):
            ctx.save_for_backward(x, p)
            return torch.cdist(x, p, p=1)

        @staticmethod
        def backward(ctx, grad):
            x, p = ctx.saved_tensors
            dx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
            dp = torch.empty_like(p) if ctx.needs_input_grad[1] else None
            s = torch.empty_like(grad)
            for i in range(x.shape[2]):
                torch.sub(x[:, :, i:i + 1], p[:, None, :, i], out=s)  # (C, n, K)
                s.sign_().mul_(grad)
                if dx is not None:
                    dx[:, :, i] = s.sum(-1)
                if dp is not None:
                    dp[:, :, i] = -s.sum(1)
            return dx, dp

    return L1Distance


_DISTANCES: dict[str, Distance] = {d.name: d for d in (L2(), Cosine(), L1())}


def get(name: str) -> Distance:
    """The distance called ``name``; an ``OptionError`` naming the known ones otherwise."""
    try:
        return _DISTANCES[name]
    except (KeyError, TypeError):
        raise OptionError(f"unknown distance {name!r}; choose one of {', '.join(names())}") from None


def names() -> tuple[str, ...]:
    return tuple(_DISTANCES)
