"""Low-rank factorisation of dense and conv weights, with automatic ranks (EVBMF or energy threshold).

Forms (weights as the model holds them; a conv weight is ``(M, C, KH, KW)``):

- ``"pair"``: the layer's ``(M, C*KH*KW)`` matrix ``= U V`` with ``U (M, R)``, ``V (R, C*KH*KW)``: a dense
  layer becomes two matmuls, a conv a ``KHxKW`` conv ``C -> R`` (the layer's stride, padding, dilation)
  followed by a ``1x1`` conv ``R -> M``. Multiplies per output pixel ``R*(C*KH*KW + M)`` vs ``M*C*KH*KW``.
- ``"tucker2"`` (convs): ``W ~= core x_0 U_out x_1 U_in`` with the core ``(R_out, R_in, KH, KW)``:
  ``1x1 (C -> R_in)``, ``KHxKW (R_in -> R_out)`` with the layer's attributes, ``1x1 (R_out -> M)``.
  Multiplies ``C*R_in + R_in*R_out*KH*KW + R_out*M`` per output pixel (the first 1x1 runs on the input
  resolution: with stride s that is ``s^2`` times as many pixels, counted in ``tvm_lut.math.cost``).

Ranks (per layer, per unfolding): ``"evbmf"`` (empirical variational Bayes matrix factorisation,
Nakajima et al. 2013: the analytic global solution, noise variance estimated by minimising the free
energy), or ``energy=0.95``: the smallest rank whose singular values keep that fraction of the squared
Frobenius mass (NRMF's threshold after nuclear-norm training). ``tvm_lut.train.structured_nn`` has the torch
modules and the nuclear-norm fine-tuning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tvm_lut.errors import OptionError

FORMS = ("pair", "tucker2")


# ----------------------------------------------------------------------------------------------
# Rank selection
# ----------------------------------------------------------------------------------------------


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    return 0.5 * (x - (1 + alpha) + np.sqrt(np.maximum((x - (1 + alpha)) ** 2 - 4 * alpha, 0.0)))


def _evb_free_energy(sigma2: float, l: int, m: int, s: np.ndarray, residual: float, xubar: float) -> float:
    h = len(s)
    alpha = l / m
    x = s ** 2 / (m * sigma2)
    z1, z2 = x[x > xubar], x[x <= xubar]
    tau_z1 = _tau(z1, alpha)
    term1 = np.sum(z2 - np.log(z2))
    term2 = np.sum(z1 - tau_z1)
    term3 = np.sum(np.log((tau_z1 + 1) / z1))
    term4 = alpha * np.sum(np.log(tau_z1 / alpha + 1))
    return float(term1 + term2 + term3 + term4 + residual / (m * sigma2) + (l - h) * np.log(sigma2))


def evbmf_rank(y: np.ndarray, sigma2: float | None = None) -> int:
    """Rank kept by EVBMF for the matrix ``y``: singular values above
    ``sqrt(M * sigma2 * (1 + tau) * (1 + alpha / tau))`` with ``alpha = L/M`` (``L <= M``), ``tau = 2.5129
    sqrt(alpha)`` and the noise variance ``sigma2`` estimated by minimising the EVB free energy."""
    from scipy.optimize import minimize_scalar

    y = np.asarray(y, dtype=np.float64)
    if y.shape[0] > y.shape[1]:
        y = y.T
    l, m = y.shape
    s = np.linalg.svd(y, compute_uv=False)
    h = l
    alpha = l / m
    tauubar = 2.5129 * math.sqrt(alpha)
    residual = 0.0  # h == l: every singular value is kept in the model
    if sigma2 is None:
        xubar = (1 + tauubar) * (1 + alpha / tauubar)
        e_h_ub = int(min(math.ceil(l / (1 + alpha)) - 1, h)) - 1
        upper = (np.sum(s ** 2) + residual) / (l * m)
        lower = max(s[e_h_ub + 1] ** 2 / (m * xubar), np.mean(s[e_h_ub + 1 :] ** 2) / m) if e_h_ub + 1 < len(s) \
            else upper * 1e-6
        lower = max(lower, upper * 1e-12)
        if not lower < upper:
            return int(np.sum(s > 0))
        sigma2 = float(minimize_scalar(_evb_free_energy, args=(l, m, s, residual, xubar), bounds=(lower, upper),
                                       method="bounded").x)
    threshold = math.sqrt(m * sigma2 * (1 + tauubar) * (1 + alpha / tauubar))
    return int(np.sum(s > threshold))


def energy_rank(y: np.ndarray, energy: float) -> int:
    """Smallest rank whose singular values hold ``energy`` of the squared Frobenius norm."""
    if not 0 < energy <= 1:
        raise OptionError(f"energy threshold {energy} must be within (0, 1]")
    s = np.linalg.svd(np.asarray(y, dtype=np.float64), compute_uv=False)
    cum = np.cumsum(s ** 2) / max(np.sum(s ** 2), 1e-300)
    return int(min(np.searchsorted(cum, energy - 1e-12) + 1, len(s)))


def select_rank(y: np.ndarray, rank) -> int:
    """``rank`` as given (int), ``"evbmf"``, or ``"energy=0.95"`` / a float energy -> an int >= 1."""
    if isinstance(rank, (int, np.integer)) and not isinstance(rank, bool):
        r = int(rank)
    elif isinstance(rank, float):
        r = energy_rank(y, rank)
    elif rank == "evbmf":
        r = evbmf_rank(y)
    elif isinstance(rank, str) and rank.startswith("energy="):
        try:
            r = energy_rank(y, float(rank.split("=", 1)[1]))
        except ValueError:
            raise OptionError(f"rank {rank!r}: expected energy=FRACTION") from None
    else:
        raise OptionError(f"rank {rank!r}: use an integer, 'evbmf' or 'energy=0.95'")
    return max(1, min(r, min(y.shape)))


# ----------------------------------------------------------------------------------------------
# Factorisations
# ----------------------------------------------------------------------------------------------


@dataclass
class LowRank:
    """A factorised layer. ``pair``: ``first (R, C*KH*KW)`` then ``last (M, R)``. ``tucker2``:
    ``first (R_in, C)`` (1x1), ``core (R_out, R_in, KH, KW)``, ``last (M, R_out)`` (1x1)."""

    form: str
    first: np.ndarray
    last: np.ndarray
    core: np.ndarray | None = None
    kernel_hw: tuple[int, int] = (1, 1)

    @property
    def ranks(self) -> tuple[int, ...]:
        return (self.first.shape[0],) if self.form == "pair" else (self.first.shape[0], self.core.shape[0])

    @property
    def params(self) -> int:
        return int(self.first.size + self.last.size + (0 if self.core is None else self.core.size))

    def weight(self) -> np.ndarray:
        """The reconstructed weight, ``(M, C, KH, KW)`` (convs) or ``(M, C)``."""
        kh, kw = self.kernel_hw
        if self.form == "pair":
            w = self.last.astype(np.float64) @ self.first.reshape(self.first.shape[0], -1).astype(np.float64)
            return w.reshape(w.shape[0], *self.first.shape[1:]) if self.first.ndim == 4 else w
        # tucker2: W[m, c, h, w] = sum last[m, a] core[a, b, h, w] first[b, c]
        return np.einsum("ma,abhw,bc->mchw", self.last, self.core, self.first)

    def mul_per_pixel(self, c: int, m: int, stride_area: int = 1) -> int:
        """Multiplies per output pixel (``stride_area``: input pixels per output pixel, for the 1x1 that
        runs before a strided core)."""
        kh, kw = self.kernel_hw
        if self.form == "pair":
            r = self.first.shape[0]
            return r * (c * kh * kw) + m * r
        r_in, r_out = self.first.shape[0], self.core.shape[0]
        return c * r_in * stride_area + r_in * r_out * kh * kw + r_out * m


def factorize_pair(weight: np.ndarray, rank) -> LowRank:
    """Truncated SVD of the ``(M, C*KH*KW)`` matrix: ``W = (U_R S_R^1/2)(S_R^1/2 V_R^T)``."""
    w = np.asarray(weight, dtype=np.float64)
    kh, kw = (w.shape[2], w.shape[3]) if w.ndim == 4 else (1, 1)
    mat = w.reshape(w.shape[0], -1)
    r = select_rank(mat, rank)
    u, s, vt = np.linalg.svd(mat, full_matrices=False)
    root = np.sqrt(s[:r])
    out = LowRank("pair", (root[:, None] * vt[:r]).astype(np.float32), (u[:, :r] * root).astype(np.float32),
                  kernel_hw=(kh, kw))
    if w.ndim == 4:
        out.first = out.first.reshape(r, w.shape[1], kh, kw)
    return out


def unfold(weight: np.ndarray, mode: int) -> np.ndarray:
    """Mode-``mode`` unfolding of a ``(M, C, KH, KW)`` tensor: ``(dim_mode, rest)``."""
    return np.moveaxis(np.asarray(weight, dtype=np.float64), mode, 0).reshape(weight.shape[mode], -1)


def factorize_tucker2(weight: np.ndarray, rank_out, rank_in=None, *, iters: int = 10) -> LowRank:
    """Tucker-2 of a conv weight over its output and input channel modes: HOSVD start, then HOOI
    iterations (each refits one mode's basis to the other's projection). Ranks: ints, ``"evbmf"`` or
    an energy threshold, chosen on the mode unfoldings (Kim et al. 2016 with EVBMF; NRMF with energy)."""
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 4:
        raise OptionError(f"Tucker-2 needs a conv weight (M, C, KH, KW), got shape {w.shape}")
    rank_in = rank_out if rank_in is None else rank_in
    r_out = select_rank(unfold(w, 0), rank_out)
    r_in = select_rank(unfold(w, 1), rank_in)
    u_out = np.linalg.svd(unfold(w, 0), full_matrices=False)[0][:, :r_out]
    u_in = np.linalg.svd(unfold(w, 1), full_matrices=False)[0][:, :r_in]
    for _ in range(iters):
        y = np.einsum("mchw,cb->mbhw", w, u_in)
        u_out = np.linalg.svd(unfold(y, 0), full_matrices=False)[0][:, :r_out]
        y = np.einsum("mchw,ma->achw", w, u_out)
        u_in = np.linalg.svd(unfold(y, 1), full_matrices=False)[0][:, :r_in]
    core = np.einsum("mchw,ma,cb->abhw", w, u_out, u_in)
    return LowRank("tucker2", u_in.T.astype(np.float32), u_out.astype(np.float32), core.astype(np.float32),
                   kernel_hw=(w.shape[2], w.shape[3]))


def factorize(weight: np.ndarray, rank="evbmf", form: str | None = None) -> LowRank:
    """``form=None`` picks, for a conv, whichever of ``pair`` / ``tucker2`` has fewer multiplies at the
    selected ranks (``pair`` for dense weights)."""
    w = np.asarray(weight)
    if form is not None and form not in FORMS:
        raise OptionError(f"unknown low-rank form {form!r}; choose one of {', '.join(FORMS)}")
    if w.ndim == 2 or form == "pair":
        return factorize_pair(w, rank)
    if form == "tucker2":
        return factorize_tucker2(w, rank)
    m, c = w.shape[:2]
    a, b = factorize_pair(w, rank), factorize_tucker2(w, rank)
    return a if a.mul_per_pixel(c, m) <= b.mul_per_pixel(c, m) else b


def relative_error(weight: np.ndarray, lr: LowRank) -> float:
    w = np.asarray(weight, dtype=np.float64)
    return float(np.linalg.norm(w - lr.weight().reshape(w.shape)) / (np.linalg.norm(w) or 1.0))
