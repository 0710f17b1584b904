"""EZCrop channel scores (numpy reference): the FFT energy ratio of each channel's feature maps.

For a feature map ``F`` (h x w): ``S = log(1 + |fftshift(FFT2(F))|)``; the low-frequency part is the
centred square of half-widths ``ceil(alpha * h/2)`` x ``ceil(alpha * w/2)``; the channel's ratio is
``1 - sum(S in the square) / sum(S)``, averaged over samples. Channels whose energy sits at high
frequencies (a high ratio) carry the detail and are kept; ``relay_passes.EZCrop`` removes the rest.
"""

from __future__ import annotations

import math

import numpy as np


def channel_scores(fmaps: np.ndarray, alpha: float = 0.25) -> np.ndarray:
    """Mean energy ratio per channel of ``fmaps`` (N, C, H, W) -> (C,)."""
    f = np.asarray(fmaps, dtype=np.float64)
    if f.ndim != 4:
        raise ValueError(f"EZCrop scores need (N, C, H, W) feature maps, got shape {f.shape}")
    _, _, h, w = f.shape
    s = np.log1p(np.abs(np.fft.fftshift(np.fft.fft2(f), axes=(-2, -1))))
    ch, cw = h // 2, w // 2
    rh, rw = math.ceil(alpha * h / 2), math.ceil(alpha * w / 2)
    centre = s[..., max(ch - rh, 0): ch + rh + 1, max(cw - rw, 0): cw + rw + 1].sum((-2, -1))
    total = s.sum((-2, -1))
    ratio = 1.0 - centre / np.maximum(total, 1e-12)
    ratio = np.where(total > 1e-12, ratio, 0.0)  # a dead channel (all zeros) scores lowest
    return ratio.mean(0)


def prune_torch(model, layers: list[dict]):
    """The torch twin of ``relay_passes.EZCrop``'s rewrite, for fine-tuning after pruning: a copy of
    ``model`` with the same channels removed (``layers`` = ``relay_passes.ezcrop.records(pruned_module)``: per pruned conv its
    ``kept_channels`` and ``next_layer``). Slices the conv, the ``BatchNorm2d`` right after it in its
    parent module, and the next conv's input channels or the next dense layer's flattened columns."""
    import copy

    import torch
    from torch import nn

    model = copy.deepcopy(model)
    mods = dict(model.named_modules())

    def following_bn(name: str):
        parent, _, leaf = name.rpartition(".")
        siblings = list(mods[parent].named_children()) if parent in mods else list(model.named_children())
        idx = [n for n, _ in siblings].index(leaf)
        if idx + 1 < len(siblings) and isinstance(siblings[idx + 1][1], nn.BatchNorm2d):
            return siblings[idx + 1][1]
        return None

    with torch.no_grad():
        for rec in layers:
            if not rec.get("pruned"):
                continue
            keep = torch.as_tensor(rec["kept_channels"], dtype=torch.long)
            conv, nxt = mods[rec["name"]], mods[rec["next_layer"]]
            if not isinstance(conv, nn.Conv2d):
                raise ValueError(f"{rec['name']} is not an nn.Conv2d in this model")
            conv.weight = nn.Parameter(conv.weight[keep].clone())
            if conv.bias is not None:
                conv.bias = nn.Parameter(conv.bias[keep].clone())
            conv.out_channels = len(keep)
            bn = following_bn(rec["name"])
            if bn is not None:
                bn.weight = nn.Parameter(bn.weight[keep].clone())
                bn.bias = nn.Parameter(bn.bias[keep].clone())
                bn.running_mean = bn.running_mean[keep].clone()
                bn.running_var = bn.running_var[keep].clone()
                bn.num_features = len(keep)
            if isinstance(nxt, nn.Conv2d):
                nxt.weight = nn.Parameter(nxt.weight[:, keep].clone())
                nxt.in_channels = len(keep)
            elif isinstance(nxt, nn.Linear):
                hw = nxt.in_features // rec["channels"]
                cols = (keep[:, None] * hw + torch.arange(hw)[None, :]).reshape(-1)
                nxt.weight = nn.Parameter(nxt.weight[:, cols].clone())
                nxt.in_features = len(cols)
            else:
                raise ValueError(f"next layer {rec['next_layer']} is neither nn.Conv2d nor nn.Linear")
    return model.eval()
