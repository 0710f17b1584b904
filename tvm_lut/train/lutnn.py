"""Learned centroids (LUT-NN, PECAN): train codebooks by backprop in PyTorch, then compile with LUTify.

Post-training k-means picks centroids that reconstruct a layer's *inputs*; LUT-NN instead learns them
for the *task loss*. ``LUTConv2d`` / ``LUTLinear`` replace ``nn.Conv2d`` / ``nn.Linear`` and compute
exactly what the compiled lookup computes:

forward (hard)
    rows (im2col for convs, columns ordered (c, kh, kw)) -> split into C subvectors of length V ->
    code = nearest centroid per subspace, scored like the TIR encode kernel (``pq.encode_scores``) ->
    output = scale * sum_c Tq[c, code_c] (+ bias), with int8 tables Tq = round(P.W / scale), one
    symmetric scale per output: the same codes and tables ``LUTify`` builds from these centroids.
    (Without gradients, e.g. in eval, the scores are summed exactly as the TIR kernel sums them; while
    training, codes come from the differentiable distances below, which agree up to float near-ties.)
backward (soft, straight-through)
    the one-hot code is replaced by ``softmax(-distance / temperature)`` over the K centroids, with a
    learned temperature per layer; the int8 rounding of the tables passes gradients straight through
    (quantization-aware training). Gradients reach the centroids, the temperature, the layer's weight
    and bias, and the layers before it.

Distances: ``"l2"`` (LUT-NN), ``"cosine"`` (PECAN-A, angle-based) and ``"l1"`` (PECAN-D, multiplier-free at
inference). The fine-tuning driver (``finetune``) takes a model and a data loader of ``(inputs, labels)``
batches, initialises the centroids by k-means on a few batches, trains with progress bar, seed and
resumable checkpoints, and returns the fine-tuned model with its codebooks. To compile:

>>> result = lutnn.finetune(model, loader, epochs=2, checkpoint_dir="ckpt")
>>> mod = tvm_lut.from_torch(lutnn.to_exact(result.model), example)     # the fine-tuned weights
>>> mod = tvm_lut.LUTify(codebooks=result.codebooks)(mod)               # the learned centroids

Batch norm after a layer stays a separate module here and is folded into the weight by ``LUTify``;
per-output int8 quantization commutes with that per-output scaling, so the codes are the same and the
tables equal up to the folded factor (bit-identical tables for layers without a following batch norm).
"""

from __future__ import annotations

import copy
import ctypes
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tvm_lut.errors import CalibrationError, OptionError
from tvm_lut.math import distances, pq
from tvm_lut.options import LayerOptions

# ----------------------------------------------------------------------------------------------
# The lookup layers
# ----------------------------------------------------------------------------------------------


def quantize_tables(tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of ``pq.quantize_tables``: int8-valued float tables (C, K, M) and the scale (M,)."""
    amax = tables.detach().abs().amax(dim=(0, 1))
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    return torch.clamp(torch.round(tables.detach() / scale), -127, 127), scale


def _per_codebook_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``bmm(a, b)`` for (C, n, V) x (C, V, K) as one ``mm`` per codebook into a preallocated result: with
    V and K this small, batched matmul is ~3x slower than the loop (75 vs 26 ms at C=64, n=32768, V=9,
    K=16, one thread). Outside autograd only (``out=``)."""
    out = torch.empty(a.shape[0], a.shape[1], b.shape[2], dtype=a.dtype)
    for i in range(a.shape[0]):
        torch.mm(a[i], b[i], out=out[i])
    return out


class _SoftAssign(torch.autograd.Function):
    """Hard nearest-centroid forward, soft (softmax) backward: the soft-PQ straight-through estimator.

    ``logits`` (C, n, K) are -distance / temperature, ``centroids`` (C, K, V). Forward returns the
    reconstruction (C, n, V), whose value is each row's nearest centroid, and the codes (C, n). Backward
    treats the reconstruction as ``onehot @ P + softmax @ P - stop_gradient(softmax @ P)``: gradients
    reach the chosen centroids (hard path) and, through the softmax, every centroid and the logits
    (soft path). Written by hand because autograd's version of that expression materialises five more
    (C, n, K) tensors, and those memory passes dominate training time."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, centroids: torch.Tensor):
        c, k, v = centroids.shape
        codes = logits.argmax(-1)
        soft = torch.softmax(logits, dim=-1)
        flat = (codes + torch.arange(c).unsqueeze(1) * k).reshape(-1)
        recon = centroids.reshape(c * k, v).index_select(0, flat).reshape(c, -1, v)
        ctx.save_for_backward(soft, centroids, flat)
        ctx.mark_non_differentiable(codes)
        return recon, codes

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _codes_grad):
        soft, centroids, flat = ctx.saved_tensors
        c, k, v = centroids.shape
        d_logits = d_cents = None
        if ctx.needs_input_grad[1]:  # soft path S^T G plus the hard path (one-hot^T G)
            # as (G^T S)^T: with the long reduction over rows, MKL's bmm runs this orientation ~4x faster
            d_cents = torch.bmm(grad.transpose(1, 2), soft).transpose(1, 2).contiguous()
            d_cents.view(c * k, v).index_add_(0, flat, grad.reshape(-1, v))
        if ctx.needs_input_grad[0]:  # softmax backward, in place: S * (dS - <S, dS>)
            d_soft = _per_codebook_mm(grad, centroids.transpose(1, 2))
            d_logits = d_soft.sub_((d_soft * soft).sum(-1, keepdim=True)).mul_(soft)
        return d_logits, d_cents


#: Scores per block of the eval-mode encoder (rows x C x K floats): bounds its memory on large batches.
ENCODE_BLOCK = 1 << 22


class _LUTLayer(nn.Module):
    """Shared machinery of ``LUTConv2d`` and ``LUTLinear``: codebooks, tables, encode, lookup."""

    kind = "dense"

    def __init__(self, exact: nn.Module, centroids: np.ndarray, distance: str, temperature: float):
        super().__init__()
        distances.get(distance)  # an OptionError naming the known ones
        self.distance = distance
        self.weight = nn.Parameter(exact.weight.detach().clone())
        self.bias = None if exact.bias is None else nn.Parameter(exact.bias.detach().clone())
        self.centroids = nn.Parameter(torch.as_tensor(np.asarray(centroids, np.float32)).clone())
        self.log_temperature = nn.Parameter(torch.tensor(math.log(max(float(temperature), 1e-6))))
        c, _k, v = self.centroids.shape
        self.d = int(self.weight[0].numel())
        if c * v < self.d or (c - 1) * v >= self.d:
            raise OptionError(f"centroids of shape {tuple(self.centroids.shape)} do not cover the layer's D={self.d}")

    @property
    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp()

    def weight_matrix(self) -> torch.Tensor:
        """The layer as a (Dp, M) matrix, rows ordered like im2col columns, zero rows for the padding."""
        c, _k, v = self.centroids.shape
        w = self.weight.reshape(self.weight.shape[0], -1).t()
        return F.pad(w, (0, 0, 0, c * v - self.d))

    def tables(self) -> torch.Tensor:
        """Float tables T[c, k, m] = P[c, k] . W[cV:(c+1)V, m] (float64 sums, like ``pq.build_tables``)."""
        c, k, v = self.centroids.shape
        w = self.weight_matrix().reshape(c, v, -1)
        return torch.einsum("ckv,cvm->ckm", self.centroids.double(), w.double()).float()

    def lookup_tables(self) -> tuple[np.ndarray, np.ndarray]:
        """(int8 tables (C, K, M), float32 scale (M,)) exactly as the compiled layer stores them."""
        with torch.no_grad():
            q, scale = quantize_tables(self.tables())
        return q.numpy().astype(np.int8), scale.numpy().astype(np.float32)

    def encode(self, sub: torch.Tensor) -> torch.Tensor:
        """Codes (n, C) for subvectors (n, C, V): the kernel's scores, summed over v in the kernel's order."""
        with torch.no_grad():
            cents, offsets = pq.encoder_operands(self.centroids.detach().numpy(), self.distance)
            cents, offsets = torch.from_numpy(cents), torch.from_numpy(offsets)
            n, c, v = sub.shape
            k = cents.shape[1]
            codes = torch.empty(n, c, dtype=torch.long)
            absolute = distances.get(self.distance).absolute  # |x - p| added (l1) or x * p subtracted
            step = max(1, ENCODE_BLOCK // (c * k))  # rows per block of (rows, C, K) scores
            tmp = torch.empty(min(step, n), c, k)
            cols = [cents[None, :, :, i].contiguous() for i in range(v)]
            for r0 in range(0, n, step):
                part = sub[r0:r0 + step]
                t = tmp[:len(part)]
                score = offsets.unsqueeze(0).repeat(len(part), 1, 1)
                for i in range(v):  # in place, same operations and order as before: one rounding each
                    xi = part[:, :, i, None].contiguous()
                    if absolute:
                        score.add_(torch.sub(xi, cols[i], out=t).abs_())
                    else:
                        score.sub_(torch.mul(xi, cols[i], out=t))
                codes[r0:r0 + step] = score.argmin(-1)
            return codes

    def logits(self, sub_t: torch.Tensor) -> torch.Tensor:
        """-distance / temperature of each subvector to each centroid, (C, n, K), for subvectors laid out
        subspace-major, (C, n, V), up to a constant per (subspace, row), which softmax and argmax ignore:
        the differentiable path.

        Subspace-major keeps every (C, n, K) tensor (logits, softmax, their gradients: what dominates the
        training time) contiguous with C as the batch of ``bmm``, so no large tensor is ever transposed.
        l2 drops ``||x||^2`` and folds ``2 / temperature`` into the centroids: one ``baddbmm``."""
        return distances.get(self.distance).torch_logits(self.centroids, sub_t, self.temperature)

    def rows(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """Input -> (n, D) rows and what ``unrows`` needs to restore the output layout."""
        return x.reshape(-1, self.d), x.shape[:-1]

    def unrows(self, y: torch.Tensor, ctx) -> torch.Tensor:
        """(n, M) outputs, one per row -> the layer's output layout."""
        return y.reshape(*ctx, y.shape[-1])

    def subspace_major(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """Input -> subvectors laid out subspace-major, (C, n, V) (zero-padded to C*V), and ``rows``' context:
        the training path's layout (see ``logits``)."""
        sub, ctx = self._subvectors(x)
        return sub.transpose(0, 1).contiguous(), ctx

    def _subvectors(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """Input -> (n, C, V) subvectors, zero-padded to C*V, and ``rows``' context."""
        rows, ctx = self.rows(x)
        c, _k, v = self.centroids.shape
        return F.pad(rows, (0, c * v - self.d)).reshape(-1, c, v), ctx

    def project(self, recon: torch.Tensor, ctx) -> torch.Tensor:
        """Subspace-major reconstructed subvectors (C, n, V) times the weights plus the bias, in the output
        layout: the smooth path whose gradient training follows."""
        c, n, v = recon.shape
        y = recon.transpose(0, 1).reshape(n, c * v) @ self.weight_matrix()
        return self.unrows(y if self.bias is None else y + self.bias, ctx)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (n, C) -> the compiled layer's outputs (n, M): int8-valued tables summed over codebooks
        (exact in float32: |sum| <= 127*C < 2^24), then one scale multiply (+ bias) per output rounded once,
        like the kernels' fused multiply-add (``pq.dequantize``). No gradient."""
        c, k, _v = self.centroids.shape
        with torch.no_grad():
            tq, scale = quantize_tables(self.tables())
            acc = F.embedding_bag(codes + torch.arange(c) * k, tq.reshape(c * k, -1), mode="sum")
            hard = acc.double() * scale.double()
            if self.bias is not None:
                hard = hard + self.bias.double()
            return hard.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():  # inference: exactly the compiled kernel's scores, order and lookup
            sub, ctx = self._subvectors(x)
            return self.unrows(self.lookup(self.encode(sub)), ctx)
        # training: codes from the differentiable distances (equal to the kernel's up to float near-ties),
        # soft assignment for the backward path, all subspace-major (C, n, .)
        sub_t, ctx = self.subspace_major(x)
        recon, codes_t = _SoftAssign.apply(self.logits(sub_t), self.centroids)  # (C, n, V), (C, n)
        smooth = self.project(recon, ctx)
        hard = self.unrows(self.lookup(codes_t.t()), ctx)
        # forward value: the lookup (bit for bit wherever hard and smooth are within 2x, Sterbenz);
        # backward: straight through the smooth reconstruction. ``smooth`` first keeps its memory layout.
        return smooth - (smooth - hard).detach()


class LUTLinear(_LUTLayer):
    """``nn.Linear`` computed by table lookup (see the module docstring); ``exact`` gives the weights."""

    kind = "dense"


class LUTConv2d(_LUTLayer):
    """``nn.Conv2d`` (groups=1) computed as im2col -> table lookup, with the conv's geometry."""

    kind = "conv2d"

    def __init__(self, exact: nn.Conv2d, centroids: np.ndarray, distance: str, temperature: float):
        if exact.groups != 1 or isinstance(exact.padding, str) or exact.padding_mode != "zeros":
            raise OptionError("LUTConv2d supports groups=1, numeric zero padding only")
        super().__init__(exact, centroids, distance, temperature)
        self.kernel_size, self.stride = exact.kernel_size, exact.stride
        self.padding, self.dilation = exact.padding, exact.dilation

    def _geometry(self, x: torch.Tensor) -> tuple[int, int, int]:
        n, _, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        return n, (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1

    def rows(self, x):
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # (N, D, L)
        return cols.transpose(1, 2).reshape(-1, self.d), self._geometry(x)

    def unrows(self, y, ctx):
        n, oh, ow = ctx
        return y.reshape(n, oh, ow, -1).permute(0, 3, 1, 2)

    def subspace_major(self, x):
        """``unfold``'s (N, D, L) columns straight to (C, N*L, V): one copy of the layer's largest tensor
        where going through rows took three (transpose, pad, transpose), each also in the backward pass."""
        c, _k, v = self.centroids.shape
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)
        if c * v != self.d:
            cols = F.pad(cols, (0, 0, 0, c * v - self.d))
        n, _, l_ = cols.shape
        return cols.view(n, c, v, l_).permute(1, 0, 3, 2).reshape(c, n * l_, v), self._geometry(x)

    def project(self, recon, ctx):
        """W (M, D) @ columns (N, D, L) gives (N, M, L), already NCHW: no output transpose."""
        c, _, v = recon.shape
        n, oh, ow = ctx
        cols = recon.view(c, n, oh * ow, v).permute(1, 0, 3, 2).reshape(n, c * v, oh * ow)
        w = F.pad(self.weight.reshape(self.weight.shape[0], -1), (0, c * v - self.d))
        y = torch.matmul(w, cols).view(n, -1, oh, ow)
        return y if self.bias is None else y + self.bias.view(-1, 1, 1)


# ----------------------------------------------------------------------------------------------
# Converting a model
# ----------------------------------------------------------------------------------------------


def convertible_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's ``nn.Linear`` and ``nn.Conv2d`` (groups=1) modules by name (LUTify's layer names)."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) or (isinstance(mod, nn.Conv2d) and mod.groups == 1
                                          and not isinstance(mod.padding, str) and mod.padding_mode == "zeros"):
            out[name] = mod
    return out


def _layer_rows(mod: nn.Module, x: torch.Tensor) -> np.ndarray:
    if isinstance(mod, nn.Conv2d):
        cols = F.unfold(x, mod.kernel_size, mod.dilation, mod.padding, mod.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1]).numpy()
    return x.reshape(-1, mod.weight.shape[1]).numpy()


def _initial_temperature(rows: np.ndarray, cents: np.ndarray, distance: str) -> float:
    """Mean gap between the nearest and second-nearest centroid: the softmax starts neither flat nor hard."""
    c, k, v = cents.shape
    sub = torch.from_numpy(pq.pad_columns(rows[:2048], c * v).reshape(-1, c, v))
    p = torch.from_numpy(cents)
    dist = distances.get(distance).torch_distance(sub, p)
    two = dist.topk(2, dim=-1, largest=False).values
    gap = float((two[..., 1] - two[..., 0]).mean())
    return gap if gap > 0 else 1.0


def convert(
    model: nn.Module,
    batches,
    *,
    layers: list[str] | None = None,
    exclude: tuple[str, ...] | list[str] = (),
    k: int = pq.DEFAULT_K,
    v: int | None = None,
    layer_v: dict[str, int] | None = None,
    distance: str = "l2",
    seed: int = 0,
    max_rows: int = 16384,
    codebooks: dict[str, dict] | None = None,
) -> nn.Module:
    """A copy of ``model`` with its conv/dense layers replaced by lookup layers, centroids from k-means.

    ``batches``: an iterable of input tensors (or ``(inputs, labels)`` pairs) whose layer inputs seed the
    k-means, like LUTify's calibration. ``layers`` picks layers by name (default: every convertible one)
    and ``exclude`` keeps some exact (e.g. the first conv). ``v`` is the subvector length of every layer
    (default LUT-NN's: 9 for 3x3 convs, else 4); ``layer_v`` overrides it per layer name (e.g. V=3, one
    kernel row, for the layers that lose the most accuracy at V=9), as LUTify's ``layers={name: {"v": V}}``.

    ``codebooks`` (``learned_codebooks``' form, e.g. an earlier run's ``load_codebooks``) starts the layers it
    names from those centroids instead of k-means, where their shape is the layer's (C, K, V): a run can
    continue another's learning with some layers' V changed; the others start from k-means.
    """
    _check_pq_options(k, v)
    layer_v = dict(layer_v or {})
    for val in layer_v.values():
        _check_pq_options(k, val)
    model = copy.deepcopy(model).eval()
    found = convertible_layers(model)
    names = list(found) if layers is None else list(layers)
    unknown = sorted(set(names) - set(found)) + sorted(set(exclude) - set(found)) + sorted(set(layer_v) - set(found))
    if unknown:
        raise OptionError(f"unknown or unconvertible layer name(s) {unknown}; convertible layers: {sorted(found)}")
    names = [n for n in names if n not in set(exclude)]
    rows: dict[str, list[np.ndarray]] = {n: [] for n in names}
    hooks = [found[n].register_forward_pre_hook(lambda m, a, n=n: rows[n].append(_layer_rows(m, a[0].detach())))
             for n in names]
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch[0] if isinstance(batch, (tuple, list)) else batch)
    finally:
        for h in hooks:
            h.remove()
    rng = np.random.default_rng(seed)
    for name in names:
        if not rows[name]:
            raise CalibrationError(f"layer {name!r} saw no calibration data (is it used in forward?)")
        r = np.concatenate(rows[name])
        if len(r) > max_rows:
            r = r[np.sort(rng.choice(len(r), max_rows, replace=False))]
        mod = found[name]
        kh = tuple(mod.kernel_size) if isinstance(mod, nn.Conv2d) else None
        vv = layer_v.get(name, v)
        vv = vv if vv is not None else pq.default_subvector_len("conv2d" if kh else "dense", kh)
        d = mod.weight[0].numel()
        given = (codebooks or {}).get(name)
        if given is not None and np.shape(given["centroids"]) == (pq.num_subspaces(d, vv), k, vv):
            cents = np.asarray(given["centroids"], np.float32)
        else:
            cents = pq.fit_codebooks(pq.pad_columns(r, pq.num_subspaces(d, vv) * vv), vv, k, distance, seed)
        temp = _initial_temperature(r, cents, distance)
        new = (LUTConv2d if kh else LUTLinear)(mod, cents, distance, temp)
        _set_submodule(model, name, new)
    return model


def _check_pq_options(k: int, v: int | None) -> None:
    """K and V under the same rules as LUTify's layer options (``LayerOptions``): one message for both."""
    LayerOptions(k=k, v=v)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` by ``new``."""
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


def lut_layers(model: nn.Module) -> dict[str, _LUTLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, _LUTLayer)}


def learned_codebooks(model: nn.Module) -> dict[str, dict]:
    """``{layer name: {"centroids": (C, K, V) float32, "distance": str}}``: what ``LUTify(codebooks=)`` takes."""
    return {n: {"centroids": m.centroids.detach().numpy().astype(np.float32).copy(), "distance": m.distance}
            for n, m in lut_layers(model).items()}


def to_exact(model: nn.Module) -> nn.Module:
    """A copy with every lookup layer back as ``nn.Conv2d``/``nn.Linear`` holding the fine-tuned weights
    (what to export to TVM; the codebooks travel separately)."""
    model = copy.deepcopy(model)
    for name, m in lut_layers(model).items():
        m_out, has_bias = m.weight.shape[0], m.bias is not None
        if isinstance(m, LUTConv2d):
            new = nn.Conv2d(m.weight.shape[1], m_out, m.kernel_size, m.stride, m.padding, m.dilation, bias=has_bias)
        else:
            new = nn.Linear(m.weight.shape[1], m_out, bias=has_bias)
        with torch.no_grad():
            new.weight.copy_(m.weight)
            if has_bias:
                new.bias.copy_(m.bias)
        _set_submodule(model, name, new)
    return model.eval()


def save_codebooks(path: str, codebooks: dict[str, dict]) -> None:
    """Codebooks as an .npz (no pickle): ``<layer>`` -> centroids, ``<layer>@distance`` -> the distance."""
    arrays = {}
    for name, cb in codebooks.items():
        arrays[name] = np.asarray(cb["centroids"], np.float32)
        arrays[f"{name}@distance"] = np.array(cb["distance"])
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load_codebooks(path: str) -> dict[str, dict]:
    """Read ``save_codebooks``' file; a plain npz of (C, K, V) arrays gets the default distance later."""
    if not os.path.isfile(path):
        raise OptionError(f"codebooks file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            files = {k: data[k] for k in data.files}
    except (ValueError, OSError, EOFError) as exc:
        raise OptionError(f"{path}: not a readable .npz of codebooks ({exc})") from exc
    out = {}
    for name, arr in files.items():
        if name.endswith("@distance"):
            continue
        entry = {"centroids": arr}
        if f"{name}@distance" in files:
            entry["distance"] = str(files[f"{name}@distance"])
        out[name] = entry
    return out


# ----------------------------------------------------------------------------------------------
# The fine-tuning driver
# ----------------------------------------------------------------------------------------------


def _retain_freed_memory() -> None:
    """Keep freed large blocks in the process heap instead of returning them to the kernel (glibc only).

    glibc serves every block above its mmap threshold (at most 32 MB by default) by ``mmap`` and unmaps it
    on free, so the next step's identical (C, n, K) tensors come back as fresh zero-filled pages: with
    100 MB tensors that page faulting took half the CPU time of a training step here (``vmstat``: 50 %
    system time). Raising the threshold and the trim limit (``mallopt``) keeps those blocks for reuse.
    Process-wide, like the ``MALLOC_MMAP_THRESHOLD_`` environment variable it stands for; a no-op where
    the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 1 << 30)
    mallopt(m_trim_threshold, (1 << 31) - 1)


@dataclass
class FinetuneResult:
    model: nn.Module  # with lookup layers (eval mode); ``to_exact(model)`` for export
    codebooks: dict[str, dict]  # for LUTify(codebooks=...)
    steps: int
    losses: list[float]  # mean training loss per epoch (of the steps run in this call)


_CKPT = "lutnn_checkpoint.pt"
#: ``finetune``'s default learning rate of the weights, as a fraction of the centroids' ``lr``.
WEIGHT_LR_FRACTION = 0.1


def finetune(
    model: nn.Module,
    loader,
    *,
    epochs: int = 1,
    lr: float = 1e-3,
    weight_lr: float | None = None,
    layers: list[str] | None = None,
    exclude: tuple[str, ...] | list[str] = (),
    k: int = pq.DEFAULT_K,
    v: int | None = None,
    layer_v: dict[str, int] | None = None,
    distance: str = "l2",
    init_batches: int = 8,
    loss_fn=None,
    transform=None,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 100,
    max_steps: int | None = None,
    max_minutes: float | None = None,
    seed: int = 0,
    progress: bool = True,
    teacher: nn.Module | None = None,
    distill: float = 0.5,
    distill_temperature: float = 4.0,
    codebooks: dict[str, dict] | None = None,
) -> FinetuneResult:
    """Learn centroids (and fine-tune the weights) of ``model``'s conv/dense layers by backprop.

    ``loader`` yields ``(inputs, labels)`` batches (a ``torch.utils.data.DataLoader``; it is re-iterated
    each epoch). The first ``init_batches`` seed the k-means initialisation (``convert``, with its ``v`` and
    ``layer_v``; ``codebooks`` start the layers whose shape they match from earlier centroids); an
    already-converted model (with lookup layers) is trained as it is. Adam on centroids and temperatures
    at ``lr`` and on all other parameters at ``weight_lr`` (default ``lr / 10``), cosine-decayed over the
    run; ``loss_fn(logits, labels)`` defaults to cross-entropy; ``transform`` (e.g. augmentation) is
    applied to each input batch.

    With ``checkpoint_dir`` the state (model, optimizer, schedule, step, RNG) is saved atomically every
    ``checkpoint_every`` steps and at the end; calling again with the same arguments resumes from it
    (data order is reseeded per epoch from ``seed``, so a resumed run sees the same batches). ``max_steps``
    stops early (e.g. to split a long run); the result then holds the partially trained model.

    With a ``teacher`` (typically the exact model, ``teacher=model``) the loss is knowledge
    distillation: ``(1 - distill) * loss_fn + distill * T² * KL(teacher || student)`` at temperature
    ``T = distill_temperature`` (Hinton et al.), so the lookup model learns the exact model's soft
    outputs rather than the labels alone.

    Speed: on glibc the process keeps freed large blocks for reuse (``_retain_freed_memory``). Here that
    cut a ResNet-20 step with V=3 codebooks (batch 32, distilled) from 4.5 s to 1.4 s.
    """
    from tqdm import tqdm

    deadline = None if not max_minutes else time.time() + 60.0 * max_minutes  # the k-means start counts too
    _check_pq_options(k, v)
    _retain_freed_memory()
    torch.manual_seed(seed)
    if teacher is not None:
        if lut_layers(teacher):
            raise OptionError("the teacher must be an exact model (it has lookup layers)")
        teacher = copy.deepcopy(teacher).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    if not 0.0 <= distill <= 1.0:
        raise OptionError(f"distill weight {distill} must be within [0, 1]")
    if lut_layers(model):
        model = copy.deepcopy(model)
    else:
        init = []
        for i, batch in enumerate(loader):
            if i >= init_batches:
                break
            init.append(batch[0] if isinstance(batch, (tuple, list)) else batch)
        model = convert(model, init, layers=layers, exclude=exclude, k=k, v=v, layer_v=layer_v, distance=distance,
                        seed=seed, codebooks=codebooks)
    luts = lut_layers(model)
    if not luts:
        raise OptionError("no layer to learn centroids for: the model has no convertible conv/dense layer")
    loss_fn = loss_fn or F.cross_entropy
    codebook_params = [p for m in luts.values() for p in (m.centroids, m.log_temperature)]
    ids = {id(p) for p in codebook_params}
    other = [p for p in model.parameters() if id(p) not in ids]
    opt = torch.optim.Adam([{"params": codebook_params, "lr": lr},
                            {"params": other, "lr": weight_lr if weight_lr is not None else lr * WEIGHT_LR_FRACTION}])
    steps_per_epoch = len(loader)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    config = {"epochs": epochs, "lr": lr, "weight_lr": weight_lr, "k": k, "v": v, "distance": distance,
              "seed": seed, "steps_per_epoch": steps_per_epoch, "layers": sorted(luts)}
    if layer_v:  # (absent otherwise, so earlier runs' checkpoints still resume)
        config["layer_v"] = dict(sorted(layer_v.items()))
    if teacher is not None:
        config["distill"] = [distill, distill_temperature]
    if codebooks:  # a digest of the starting centroids (absent otherwise, as above)
        digest = hashlib.sha256()
        for name in sorted(codebooks):
            digest.update(name.encode() + np.ascontiguousarray(codebooks[name]["centroids"], np.float32).tobytes())
        config["codebooks"] = digest.hexdigest()[:16]
    tag = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    step = 0
    path = os.path.join(checkpoint_dir, _CKPT) if checkpoint_dir else None
    if path and os.path.isfile(path):
        state = torch.load(path, weights_only=True)
        if state.get("config") != tag:
            raise OptionError(f"{path} was written by a run with other settings; remove it or use another "
                              "checkpoint_dir")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step = int(state["step"])

    def save():
        if not path:
            return
        os.makedirs(checkpoint_dir, exist_ok=True)
        tmp = path + ".tmp"
        torch.save({"config": tag, "model": model.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "step": step}, tmp)
        os.replace(tmp, path)

    stop = total if max_steps is None else min(total, max_steps)
    bar = tqdm(total=total, initial=step, desc="learning centroids", unit="step",
               disable=None if progress else True, leave=False)
    losses = []
    model.train()

    def done() -> bool:
        return step >= stop or (deadline is not None and time.time() > deadline)

    while not done():
        epoch, skip = divmod(step, steps_per_epoch)
        torch.manual_seed(seed * 1000 + epoch)  # data order and augmentation of this epoch
        gen = torch.Generator().manual_seed(seed * 1000 + epoch)
        run_loss, run_n = 0.0, 0
        for i, (x, y) in enumerate(loader):
            if i < skip:
                continue
            if done():
                break
            if transform is not None:
                x = transform(x, gen)
            opt.zero_grad()
            out = model(x)
            loss = loss_fn(out, y)
            if teacher is not None:
                with torch.no_grad():
                    soft = F.softmax(teacher(x) / distill_temperature, dim=1)
                kd = F.kl_div(F.log_softmax(out / distill_temperature, dim=1), soft, reduction="batchmean")
                loss = (1.0 - distill) * loss + distill * distill_temperature ** 2 * kd
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            run_loss, run_n = run_loss + loss.item(), run_n + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            if path and step % checkpoint_every == 0:
                save()
        if run_n:
            losses.append(run_loss / run_n)
    bar.close()
    save()
    model.eval()
    return FinetuneResult(model=model, codebooks=learned_codebooks(model), steps=step, losses=losses)
