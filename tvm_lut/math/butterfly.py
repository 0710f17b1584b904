"""Deformable butterfly (DeBut) factor chains: structure, chain generator, reference forward, ALS fit.

A factor ``R(p, q | r, s, t)`` is a ``p x q`` matrix, block-diagonal with ``nb = p / (r*t)`` blocks, each
block an ``r x s`` grid of ``t x t`` diagonal matrices; it has ``p*s`` nonzeros. We store its values as
``(nb, r, s, t)``: entry ``[b, i, j, d]`` sits at row ``b*r*t + i*t + d``, column ``b*s*t + j*t + d``.
Applied to ``x`` of width ``q`` viewed as ``(nb, s, t)``::

    y[b, i, d] = sum_j w[b, i, j, d] * x[b, j, d]          (width p = nb * r * t)

i.e. ``nb*t`` small ``r x s`` matmuls (a grouped matmul; ``tir_schedules.kernels.butterfly_factor``).

A chain ``B_L ... B_1`` (listed input-first) is built from two factorisations ``in' = s_1 ... s_L`` and
``out' = r_1 ... r_L`` with ``t_1 = 1, t_{k+1} = r_k t_k``. Reading the input index as mixed-radix digits,
factor ``k`` replaces the digit of radix ``s_k`` by one of radix ``r_k``; once every input digit has been
consumed (``nb_L = 1``) each output depends on every input, so the product is dense. Factor ``k`` has
``p_k = r_1..r_k * s_{k+1}..s_L`` rows and ``p_k * s_k`` parameters.

``chain_for(d_in, d_out, budget)`` searches those factorisations for any sizes (not only powers of two,
not only the published k=3 templates): it may pad ``in``/``out`` up to a nearby size with a better
factorisation, but counts the parameters that padding wastes and rejects chains that waste much.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from tvm_lut.errors import OptionError


@dataclass(frozen=True)
class Factor:
    """One DeBut factor R(p, q | r, s, t)."""

    p: int
    q: int
    r: int
    s: int
    t: int

    def __post_init__(self):
        if min(self.p, self.q, self.r, self.s, self.t) < 1:
            raise OptionError(f"butterfly factor {self}: all sizes must be >= 1")
        if self.p % (self.r * self.t) or self.q % (self.s * self.t) or self.p // (self.r * self.t) != \
                self.q // (self.s * self.t):
            raise OptionError(f"butterfly factor {self}: p/(r*t) and q/(s*t) must be the same whole block count")

    @property
    def blocks(self) -> int:
        return self.p // (self.r * self.t)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """Shape of the stored values: (nb, r, s, t)."""
        return (self.blocks, self.r, self.s, self.t)

    @property
    def params(self) -> int:
        return self.p * self.s


@dataclass(frozen=True)
class Chain:
    """A factor chain (input-first) for a ``d_in -> d_out`` layer, padded to ``in_pad -> out_pad``."""

    d_in: int
    d_out: int
    factors: tuple[Factor, ...]

    @property
    def in_pad(self) -> int:
        return self.factors[0].q

    @property
    def out_pad(self) -> int:
        return self.factors[-1].p

    @property
    def params(self) -> int:
        return sum(f.params for f in self.factors)

    @property
    def wasted_params(self) -> int:
        """Parameters that only touch padded inputs or padded outputs (never change the result)."""
        first, last = self.factors[0], self.factors[-1]
        waste = 0
        if self.in_pad > self.d_in:  # factor 1 columns beyond d_in: each column holds r_1 nonzeros
            waste += (self.in_pad - self.d_in) * first.r
        if self.out_pad > self.d_out:  # last factor rows beyond d_out: each row holds s_L nonzeros
            waste += (self.out_pad - self.d_out) * last.s
        return waste

    def macs_per_row(self) -> int:
        """Multiply-accumulates per input row (one per nonzero)."""
        return self.params

    def describe(self) -> str:
        return " -> ".join(f"R({f.p},{f.q}|{f.r},{f.s},{f.t})" for f in self.factors)

    def to_json(self) -> dict:
        return {"d_in": self.d_in, "d_out": self.d_out,
                "factors": [[f.p, f.q, f.r, f.s, f.t] for f in self.factors]}

    @classmethod
    def from_json(cls, obj: dict) -> "Chain":
        chain = cls(int(obj["d_in"]), int(obj["d_out"]), tuple(Factor(*map(int, f)) for f in obj["factors"]))
        validate(chain)
        return chain


def chain_from_radices(d_in: int, d_out: int, s: tuple[int, ...], r: tuple[int, ...]) -> Chain:
    """The chain with input radices ``s`` and output radices ``r`` (``t_1 = 1, t_{k+1} = r_k t_k``)."""
    if len(s) != len(r) or not s:
        raise OptionError(f"butterfly radices s={s}, r={r}: need the same nonzero number of factors")
    factors, t = [], 1
    for k in range(len(s)):
        p = math.prod(r[: k + 1]) * math.prod(s[k + 1 :])
        q = math.prod(r[:k]) * math.prod(s[k:])
        factors.append(Factor(p, q, r[k], s[k], t))
        t *= r[k]
    return Chain(d_in, d_out, tuple(factors))


def validate(chain: Chain) -> None:
    """Raise OptionError unless shapes chain up, cover the layer, and the product is dense."""
    fs = chain.factors
    if not fs:
        raise OptionError("butterfly chain has no factor")
    for a, b in zip(fs, fs[1:]):
        if a.p != b.q:
            raise OptionError(f"butterfly chain {chain.describe()}: factor output {a.p} != next input {b.q}")
    if chain.in_pad < chain.d_in or chain.out_pad < chain.d_out:
        raise OptionError(f"butterfly chain {chain.describe()} does not cover {chain.d_in} -> {chain.d_out}")
    if not is_dense(chain):
        raise OptionError(f"butterfly chain {chain.describe()}: the product has structural zeros")


def support(f: Factor) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the factor's nonzeros, in the order of the stored values (nb, r, s, t)."""
    b, i, j, d = np.meshgrid(*(np.arange(n) for n in f.shape), indexing="ij")
    rows = b * f.r * f.t + i * f.t + d
    cols = b * f.s * f.t + j * f.t + d
    return rows.reshape(-1), cols.reshape(-1)


def dense(f: Factor, values: np.ndarray) -> np.ndarray:
    """The factor as a dense (p, q) matrix."""
    out = np.zeros((f.p, f.q), dtype=np.result_type(values, np.float32))
    rows, cols = support(f)
    out[rows, cols] = np.asarray(values).reshape(-1)
    return out


def is_dense(chain: Chain) -> bool:
    """Whether every (output < d_out, input < d_in) pair is connected: the product of the factors'
    0/1 support patterns (sparse, so this stays cheap for wide conv layers) has no zero."""
    from scipy import sparse

    reach = np.eye(chain.in_pad, dtype=np.float32)[:, : chain.d_in]
    for f in chain.factors:
        rows, cols = support(f)
        pattern = sparse.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(f.p, f.q))
        reach = np.minimum(pattern @ reach, 1.0)  # clip: only connectivity matters, keep floats small
    return bool((reach[: chain.d_out] > 0).all())


def product(chain: Chain, values: list[np.ndarray]) -> np.ndarray:
    """The dense ``(d_out, d_in)`` matrix B_L ... B_1 (sliced to the unpadded sizes)."""
    m = dense(chain.factors[0], values[0]).astype(np.float64)
    for f, v in zip(chain.factors[1:], values[1:]):
        m = dense(f, v).astype(np.float64) @ m
    return m[: chain.d_out, : chain.d_in]


def apply_factor(x: np.ndarray, f: Factor, values: np.ndarray) -> np.ndarray:
    """Numpy reference forward of one factor: ``x`` (N, q) -> (N, p)."""
    n = x.shape[0]
    xv = x.reshape(n, f.blocks, f.s, f.t)
    y = np.einsum("bijd,nbjd->nbid", values.reshape(f.shape), xv)
    return y.reshape(n, f.p)


def apply_chain(x: np.ndarray, chain: Chain, values: list[np.ndarray]) -> np.ndarray:
    """``x`` (N, d_in) -> (N, d_out) through the chain (pads the input, slices the output)."""
    y = np.zeros((x.shape[0], chain.in_pad), dtype=np.float64)
    y[:, : chain.d_in] = x
    for f, v in zip(chain.factors, values):
        y = apply_factor(y, f, v)
    return y[:, : chain.d_out]


# ----------------------------------------------------------------------------------------------
# Chain generator
# ----------------------------------------------------------------------------------------------


@lru_cache(maxsize=4096)
def _ordered_factorisations(n: int, parts: int) -> tuple[tuple[int, ...], ...]:
    """All ordered tuples of ``parts`` integers >= 1 whose product is ``n``."""
    if parts == 1:
        return ((n,),)
    out = []
    for d in range(1, n + 1):
        if n % d == 0:
            out += [(d, *rest) for rest in _ordered_factorisations(n // d, parts - 1)]
    return tuple(out)


def _balanced(n: int, parts: int, keep: int) -> list[tuple[int, ...]]:
    """The ``keep`` most balanced ordered factorisations of ``n`` (smallest max/min ratio; 1s allowed
    only where n has too few prime factors), each ordering kept."""
    cands = _ordered_factorisations(n, parts)
    if not cands:
        return []
    big = [c for c in cands if min(c) >= 2] or list(cands)
    big.sort(key=lambda c: (max(c) / min(c), c))
    seen, out = set(), []
    for c in big:
        key = tuple(sorted(c))
        if key in seen and len(seen) >= keep:
            continue
        seen.add(key)
        out.append(c)
        if len(out) >= keep * math.factorial(min(parts, 3)):
            break
    return out


def _pad_candidates(n: int, slack: float, limit: int = 6) -> list[int]:
    """``n`` and nearby larger sizes (within ``slack``) that have many small prime factors."""
    top = max(n, int(math.floor(n * (1 + slack))))
    scored = []
    for m in range(n, top + 1):
        largest = max(_prime_factors(m)) if m > 1 else 1
        scored.append((largest, m - n, m))
    scored.sort()
    out = sorted({m for _, _, m in scored[:limit]} | {n})
    return out


def _prime_factors(n: int) -> list[int]:
    out, d = [], 2
    while d * d <= n:
        while n % d == 0:
            out.append(d)
            n //= d
        d += 1
    if n > 1:
        out.append(n)
    return out


def chain_for(d_in: int, d_out: int, budget: int | float, *, max_factors: int = 4, pad_slack: float = 0.125,
              max_waste: float = 0.15) -> Chain:
    """A dense DeBut chain for a ``d_in -> d_out`` layer with at most ``budget`` parameters.

    ``budget`` is a parameter count, or a fraction (< 1) of the dense ``d_in * d_out``. Among valid
    chains (shapes consistent, product dense) whose parameters fit the budget and whose padding wastes at
    most ``max_waste`` of them, those within 5% of the most useful parameters (more parameters, better
    approximation) are kept, and of these the one with the least padding, then the fewest factors.
    Sizes may be padded by up to ``pad_slack`` (a prime like 17 has no factorisation; 18 does).
    Intermediate widths stay between ``min(d_in, d_out)`` and the padded ``max``: narrower would cap
    the rank, wider only costs memory. Raises OptionError naming the
    smallest achievable chain when the budget is below it.
    """
    if d_in < 1 or d_out < 1:
        raise OptionError(f"butterfly chain for {d_in} -> {d_out}: sizes must be positive")
    dense_params = d_in * d_out
    limit = int(budget * dense_params) if 0 < budget < 1 else int(budget)
    if limit < 1:
        raise OptionError(f"butterfly budget {budget!r} must be a positive count or a fraction in (0, 1)")
    feasible, smallest = [], None
    ins, outs = _pad_candidates(d_in, pad_slack), _pad_candidates(d_out, pad_slack)
    for parts in range(1, max_factors + 1):
        for ip, op in itertools.product(ins, outs):
            for s in _balanced(ip, parts, 4):
                for r in _balanced(op, parts, 4):
                    if any(a == 1 and b == 1 for a, b in zip(s, r)):
                        continue  # an identity factor: adds nothing
                    chain = chain_from_radices(d_in, d_out, s, r)
                    widths = [f.p for f in chain.factors[:-1]]
                    if widths and (min(widths) < min(d_in, d_out) or max(widths) > max(ip, op)):
                        continue  # a narrower width is a rank bottleneck; a wider one wastes memory
                    useful = chain.params - chain.wasted_params
                    if chain.wasted_params > max_waste * chain.params:
                        continue
                    if smallest is None or chain.params < smallest.params:
                        smallest = chain
                    if chain.params > limit:
                        continue
                    feasible.append((useful, parts, (ip - d_in) + (op - d_out), chain))
    if not feasible:
        raise OptionError(f"no butterfly chain for {d_in} -> {d_out} within {limit} parameters; the smallest "
                          f"valid chain ({smallest.describe() if smallest else '-'}) has "
                          f"{smallest.params if smallest else '?'} (dense: {dense_params})")
    # within 5% of the most useful parameters, prefer no padding, then fewer factors
    top = max(f[0] for f in feasible)
    near = [f for f in feasible if f[0] >= 0.95 * top]
    best = min(near, key=lambda f: (f[2], f[1], -f[0]))[3]
    validate(best)
    return best


# ----------------------------------------------------------------------------------------------
# ALS initialisation from a dense weight
# ----------------------------------------------------------------------------------------------


def als_fit(weight: np.ndarray, chain: Chain, *, sweeps: int = 8, cg_iters: int = 40, seed: int = 0,
            values: list[np.ndarray] | None = None) -> tuple[list[np.ndarray], float]:
    """Factor values approximating ``weight`` (d_out, d_in) by alternating least squares.

    Each step solves one factor exactly (others fixed): minimise ``||W - A B_k C||_F`` over the nonzeros
    of ``B_k``, with ``A = (B_L..B_{k+1})[:d_out]`` and ``C = (B_{k-1}..B_1)[:, :d_in]``; the normal
    equations ``P(A^T A B C C^T) = P(A^T W C^T)`` (P: keep the support) are solved by conjugate gradients
    from the current values, so no (d_out*d_in) x nnz design matrix is formed. Returns (values, relative
    Frobenius error). DeBut's ALS errors are large (0.6-0.98 on trained layers); fine-tuning does the rest.
    """
    w = np.asarray(weight, dtype=np.float64)
    if w.shape != (chain.d_out, chain.d_in):
        raise OptionError(f"ALS: weight shape {w.shape} does not match the chain's {chain.d_out} x {chain.d_in}")
    rng = np.random.default_rng(seed)
    fs = chain.factors
    if values is None:
        # scale so the product has about the weight's norm: each factor ~ unit gain
        target = (np.linalg.norm(w) / math.sqrt(chain.d_out) + 1e-12) ** (1.0 / len(fs))
        values = [rng.standard_normal(f.shape) * target / math.sqrt(f.s) for f in fs]
    values = [np.asarray(v, dtype=np.float64).copy() for v in values]
    sup = [support(f) for f in fs]
    wn = np.linalg.norm(w) or 1.0

    def dense_k(k):
        return dense(fs[k], values[k]).astype(np.float64)

    for _ in range(sweeps):
        for k in range(len(fs)):
            a = np.eye(fs[-1].p)
            for j in range(len(fs) - 1, k, -1):
                a = a @ dense_k(j)
            a = a[: chain.d_out]
            c = np.eye(fs[0].q)[:, : chain.d_in]
            for j in range(k):
                c = dense_k(j) @ c
            ata, cct = a.T @ a, c @ c.T
            rows, cols = sup[k]
            rhs = (a.T @ w @ c.T)[rows, cols]

            def op(vec):
                m = np.zeros((fs[k].p, fs[k].q))
                m[rows, cols] = vec
                return (ata @ m @ cct)[rows, cols]

            x = values[k].reshape(-1)
            res = rhs - op(x)
            p = res.copy()
            rr = res @ res
            for _ in range(cg_iters):
                if rr <= 1e-20 * (rhs @ rhs + 1e-30):
                    break
                ap = op(p)
                alpha = rr / max(p @ ap, 1e-300)
                x = x + alpha * p
                res = res - alpha * ap
                rr_new = res @ res
                p = res + (rr_new / rr) * p
                rr = rr_new
            values[k] = x.reshape(fs[k].shape)
    err = float(np.linalg.norm(w - product(chain, values)) / wn)
    return [v.astype(np.float32) for v in values], err
