"""Torch modules for the structured rewrites (DeBut butterfly chains, low-rank pairs / Tucker-2) and
their fine-tuning, including NRMF's nuclear-norm penalty.

The flow mirrors ``tvm_lut.train.lutnn``: ``convert`` swaps ``nn.Conv2d`` / ``nn.Linear`` layers for factorised
modules initialised from the trained weights (ALS for butterfly chains, SVD / HOSVD for low rank);
``finetune`` trains the result; the compiler then takes it over:

- low rank: ``to_exact`` multiplies the factors back into ordinary layers and ``ranks_of`` gives the
  per-layer ranks; ``LUTify(method="exact", layers={name: {"method": "lowrank", "rank": r, "form": f}})``
  (``structured_options``; layers left as they were stay exact) refactorises
  that rank-``r`` weight exactly (an SVD of a rank-r matrix loses nothing; batch norm folded by the
  compiler scales rows and keeps the rank).
- butterfly: ``butterfly_factors`` gives each layer's chain and factor values for
  ``LUTify(factors=...)`` (a following batch norm is folded into the last factor's rows).

Conv inputs are unfolded in ``(c, kh, kw)`` column order, the order ``tvm_lut.frontend.graph`` uses for a conv
weight matrix, so the same chain describes the layer in torch and in the compiled model.
"""

from __future__ import annotations

import copy
import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tvm_lut.errors import OptionError
from tvm_lut.math import butterfly as bf, lowrank as lr

log = logging.getLogger("tvm_lut")


# ----------------------------------------------------------------------------------------------
# Butterfly
# ----------------------------------------------------------------------------------------------


class _ButterflyChain(nn.Module):
    """``x (N, d_in) -> (N, d_out)`` through the factors of ``chain`` (one parameter per factor)."""

    def __init__(self, chain: bf.Chain, values: list[np.ndarray]):
        super().__init__()
        self.chain = chain
        self.factors = nn.ParameterList([nn.Parameter(torch.from_numpy(np.asarray(v, np.float32).copy()))
                                         for v in values])

    def forward(self, x):
        n = x.shape[0]
        if self.chain.in_pad > self.chain.d_in:
            x = F.pad(x, (0, self.chain.in_pad - self.chain.d_in))
        for f, w in zip(self.chain.factors, self.factors):
            x = torch.einsum("bijd,nbjd->nbid", w, x.reshape(n, f.blocks, f.s, f.t)).reshape(n, f.p)
        return x[:, : self.chain.d_out]

    def values(self) -> list[np.ndarray]:
        return [w.detach().cpu().numpy().copy() for w in self.factors]


class ButterflyLinear(nn.Module):
    def __init__(self, layer: nn.Linear, chain: bf.Chain, values: list[np.ndarray]):
        super().__init__()
        self.chain = _ButterflyChain(chain, values)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())

    def forward(self, x):
        shape = x.shape
        y = self.chain(x.reshape(-1, shape[-1]))
        y = y.reshape(*shape[:-1], -1)
        return y if self.bias is None else y + self.bias

    def dense_weight(self) -> torch.Tensor:
        return torch.from_numpy(bf.product(self.chain.chain, self.chain.values()).astype(np.float32))


class ButterflyConv2d(nn.Module):
    """im2col (``F.unfold``, columns ``(c, kh, kw)``) -> butterfly chain -> fold back to NCHW."""

    def __init__(self, layer: nn.Conv2d, chain: bf.Chain, values: list[np.ndarray]):
        super().__init__()
        self.chain = _ButterflyChain(chain, values)
        self.kernel_size, self.stride = layer.kernel_size, layer.stride
        self.padding, self.dilation = layer.padding, layer.dilation
        self.out_channels = layer.out_channels
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())

    def forward(self, x):
        n, _, h, w = x.shape
        cols = F.unfold(x, self.kernel_size, dilation=self.dilation, padding=self.padding, stride=self.stride)
        oh = (h + 2 * self.padding[0] - self.dilation[0] * (self.kernel_size[0] - 1) - 1) // self.stride[0] + 1
        ow = (w + 2 * self.padding[1] - self.dilation[1] * (self.kernel_size[1] - 1) - 1) // self.stride[1] + 1
        y = self.chain(cols.transpose(1, 2).reshape(n * oh * ow, -1))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(n, oh, ow, self.out_channels).permute(0, 3, 1, 2)

    def dense_weight(self) -> torch.Tensor:
        w = bf.product(self.chain.chain, self.chain.values()).astype(np.float32)
        return torch.from_numpy(w.reshape(self.out_channels, -1, *self.kernel_size))


# ----------------------------------------------------------------------------------------------
# Low rank
# ----------------------------------------------------------------------------------------------


class LowRankLinear(nn.Module):
    """``x @ first.T @ last.T (+ bias)``: two thin matmuls."""

    def __init__(self, layer: nn.Linear, fact: lr.LowRank):
        super().__init__()
        self.form = "pair"
        self.first = nn.Parameter(torch.from_numpy(fact.first.copy()))
        self.last = nn.Parameter(torch.from_numpy(fact.last.copy()))
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())

    def forward(self, x):
        return F.linear(F.linear(x, self.first), self.last, self.bias)

    def ranks(self) -> tuple[int, ...]:
        return (self.first.shape[0],)

    def dense_weight(self) -> torch.Tensor:
        return (self.last @ self.first).detach()


class LowRankConv2d(nn.Module):
    """``pair``: KxK conv (C -> R, the layer's attributes) then 1x1 (R -> M). ``tucker2``: 1x1 (C -> R_in),
    KxK (R_in -> R_out, the layer's attributes), 1x1 (R_out -> M)."""

    def __init__(self, layer: nn.Conv2d, fact: lr.LowRank):
        super().__init__()
        self.form = fact.form
        self.stride, self.padding, self.dilation = layer.stride, layer.padding, layer.dilation
        self.kernel_size = layer.kernel_size
        if fact.form == "pair":
            self.first = nn.Parameter(torch.from_numpy(fact.first.copy()))  # (R, C, KH, KW)
            self.core = None
        else:
            self.first = nn.Parameter(torch.from_numpy(fact.first.copy())[:, :, None, None])  # (R_in, C, 1, 1)
            self.core = nn.Parameter(torch.from_numpy(fact.core.copy()))  # (R_out, R_in, KH, KW)
        self.last = nn.Parameter(torch.from_numpy(fact.last.copy())[:, :, None, None])  # (M, R, 1, 1)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())

    def forward(self, x):
        if self.core is None:
            y = F.conv2d(x, self.first, None, self.stride, self.padding, self.dilation)
        else:
            y = F.conv2d(F.conv2d(x, self.first), self.core, None, self.stride, self.padding, self.dilation)
        return F.conv2d(y, self.last, self.bias)

    def ranks(self) -> tuple[int, ...]:
        return (self.first.shape[0],) if self.core is None else (self.first.shape[0], self.core.shape[0])

    def dense_weight(self) -> torch.Tensor:
        last = self.last[:, :, 0, 0]
        if self.core is None:
            return torch.einsum("mr,rchw->mchw", last, self.first).detach()
        return torch.einsum("ma,abhw,bc->mchw", last, self.core, self.first[:, :, 0, 0]).detach()


STRUCTURED = (ButterflyLinear, ButterflyConv2d, LowRankLinear, LowRankConv2d)


# ----------------------------------------------------------------------------------------------
# Conversion, penalties, export
# ----------------------------------------------------------------------------------------------


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _matrix(layer) -> np.ndarray:
    """The layer's weight as ``(M, D)`` with conv columns ordered (c, kh, kw)."""
    w = layer.weight.detach().cpu().numpy().astype(np.float64)
    return w.reshape(w.shape[0], -1)


def convert(model: nn.Module, method: str, *, layers: list[str] | None = None, exclude=(), budget: float = 0.2,
            rank="evbmf", form: str | None = None, als_sweeps: int = 4, seed: int = 0,
            progress: bool = False) -> nn.Module:
    """A copy of ``model`` with its conv/dense layers (``layers`` by name, default all but ``exclude``)
    factorised by ``method``: ``"butterfly"`` (DeBut chain with at most ``budget`` of the dense params,
    ALS-initialised) or ``"lowrank"`` (``rank``: int, ``"evbmf"`` or ``"energy=F"``; ``form``: pair or
    tucker2, default the one with fewer multiplies). Grouped convs, layers with no chain within the
    budget and ranks that save nothing are left as they are (logged)."""
    if method not in ("butterfly", "lowrank"):
        raise OptionError(f"unknown structured method {method!r}; choose butterfly or lowrank")
    model = copy.deepcopy(model).eval()
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    unknown = sorted(set(layers or []) - set(names)) + sorted(set(exclude) - set(names))
    if unknown:
        raise OptionError(f"unknown layer name(s) {unknown}; the model's layers are: {names}")
    todo = [n for n in (layers or names) if n not in set(exclude)]
    for name in todo:
        layer = model.get_submodule(name)
        if isinstance(layer, nn.Conv2d) and layer.groups != 1:
            continue
        w = _matrix(layer)
        if method == "butterfly":
            try:
                chain = bf.chain_for(w.shape[1], w.shape[0], budget)
            except OptionError as e:
                log.warning("layer %s left as it is: %s", name, e)
                continue
            values, err = bf.als_fit(w, chain, sweeps=als_sweeps, seed=seed)
            if progress:
                print(f"{name}: {chain.describe()} ({chain.params} params, ALS error {err:.3f})")
            new = ButterflyConv2d(layer, chain, values) if isinstance(layer, nn.Conv2d) else \
                ButterflyLinear(layer, chain, values)
        else:
            fact = lr.factorize(layer.weight.detach().cpu().numpy(), rank, form)
            if fact.params >= layer.weight.numel():
                log.warning("layer %s left as it is: rank %s saves nothing (%d >= %d parameters)", name,
                            list(fact.ranks), fact.params, layer.weight.numel())
                continue
            new = LowRankConv2d(layer, fact) if isinstance(layer, nn.Conv2d) else LowRankLinear(layer, fact)
        _set_submodule(model, name, new)
    return model


def nuclear_penalty(model: nn.Module) -> torch.Tensor:
    """NRMF's regulariser: the sum of nuclear norms of every conv weight's output- and input-channel
    unfoldings (and every dense weight), which pushes weights toward low multilinear rank while they
    train; ranks are then read off with an energy threshold."""
    total = None
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.groups == 1:
            w = m.weight
            terms = [torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), "nuc"),
                     torch.linalg.matrix_norm(w.transpose(0, 1).reshape(w.shape[1], -1), "nuc")]
        elif isinstance(m, nn.Linear):
            terms = [torch.linalg.matrix_norm(m.weight, "nuc")]
        else:
            continue
        s = sum(terms)
        total = s if total is None else total + s
    return total if total is not None else torch.zeros(())


def finetune(model: nn.Module, loader, *, epochs: int = 1, lr_: float = 1e-3, nuclear: float = 0.0,
             transform=None, teacher: nn.Module | None = None, distill: float = 0.5, temperature: float = 4.0,
             seed: int = 0, progress: bool = True) -> tuple[nn.Module, list[float]]:
    """Train ``model`` (structured or not) with Adam and a cosine schedule; ``nuclear`` adds
    ``nuclear * nuclear_penalty`` (NRMF); ``teacher`` adds knowledge distillation as in
    ``lutnn.finetune``. Returns (trained copy, mean loss per epoch)."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    model = copy.deepcopy(model)
    if teacher is not None:
        teacher = copy.deepcopy(teacher).eval()
    opt = torch.optim.Adam(model.parameters(), lr_)
    total = max(1, epochs * len(loader))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    gen = torch.Generator().manual_seed(seed)
    losses = []
    bar = tqdm(total=total, desc="fine-tuning", unit="step", disable=None if progress else True, leave=False)
    model.train()
    for _ in range(epochs):
        run = 0.0
        for x, y in loader:
            if transform is not None:
                x = transform(x, gen)
            out = model(x)
            loss = F.cross_entropy(out, y)
            if teacher is not None:
                with torch.no_grad():
                    soft = F.softmax(teacher(x) / temperature, 1)
                kd = F.kl_div(F.log_softmax(out / temperature, 1), soft, reduction="batchmean")
                loss = (1 - distill) * loss + distill * temperature ** 2 * kd
            if nuclear:
                loss = loss + nuclear * nuclear_penalty(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            run += loss.item()
            bar.update(1)
        losses.append(run / max(1, len(loader)))
    bar.close()
    return model.eval(), losses


def to_exact(model: nn.Module) -> nn.Module:
    """A copy with every structured layer multiplied back into an ``nn.Conv2d`` / ``nn.Linear`` (for
    export: ``tvm_lut.from_torch`` imports ordinary layers; the compiler refactorises them)."""
    model = copy.deepcopy(model)
    for name, m in list(model.named_modules()):
        if not isinstance(m, STRUCTURED):
            continue
        w = m.dense_weight()
        if isinstance(m, (ButterflyConv2d, LowRankConv2d)):
            new = nn.Conv2d(w.shape[1], w.shape[0], tuple(w.shape[2:]), stride=m.stride, padding=m.padding,
                            dilation=m.dilation, bias=m.bias is not None)
        else:
            new = nn.Linear(w.shape[1], w.shape[0], bias=m.bias is not None)
        with torch.no_grad():
            new.weight.copy_(w.reshape(new.weight.shape))
            if m.bias is not None:
                new.bias.copy_(m.bias)
        _set_submodule(model, name, new)
    return model.eval()


def structured_options(model: nn.Module) -> tuple[dict, dict]:
    """``(layers, factors)`` for ``LUTify``: per-layer method options for every structured layer of
    ``model`` (low-rank ranks and form, so the compiler refactorises ``to_exact(model)`` exactly), and
    the butterfly chains with their trained factor values."""
    layers, factors = {}, {}
    for name, m in model.named_modules():
        if isinstance(m, (LowRankLinear, LowRankConv2d)):
            r = m.ranks()
            layers[name] = {"method": "lowrank", "rank": list(r) if len(r) > 1 else r[0], "form": m.form}
        elif isinstance(m, (ButterflyLinear, ButterflyConv2d)):
            layers[name] = {"method": "butterfly"}
            factors[name] = {"chain": m.chain.chain.to_json(), "values": m.chain.values()}
    return layers, factors


def param_count(model: nn.Module) -> int:
    """Parameters of conv/dense/structured layers (weights and biases; batch norm excluded)."""
    total = 0
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, *STRUCTURED)):
            total += sum(p.numel() for p in m.parameters())
    return total
