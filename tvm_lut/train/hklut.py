"""HKLUT-style super-resolution networks in torch: what is trained, then tabulated whole.

Each pattern unit (``PatternUnit``) reads ``n`` pixels of one nibble plane (``tvm_lut.math.sr_lut.PATTERNS``),
maps them through a 1x1-conv MLP (n -> nf -> ... -> scale^2, ReLU, tanh at the end) and pixel-shuffles the
result into a ``scale x scale`` block. ``HKStage`` applies every unit of the MSB branch (high nibbles) and of
the LSB branch (low nibbles) at the 4 rotations, floors ``127 * tanh`` to the int8 a table will hold
(straight-through gradient), and adds both branches to the nearest-neighbour upscaled input, exactly as
``sr_lut.stage`` does from tables. ``HKNet`` chains stages (x4 = two x2 stages; a stage's input is the
floored output of the one before).

``tabulate`` evaluates every unit on all 16^n nibble combinations and returns the int8 tables: the
network and its tables compute the same function (up to the last bit of float rounding before a floor,
``tests/test_hklut.py`` counts the differing pixels).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tvm_lut.math import sr_lut


def _floor_ste(x: torch.Tensor) -> torch.Tensor:
    """floor in the forward pass, identity gradient in the backward pass."""
    return x + (torch.floor(x) - x).detach()


class PatternUnit(nn.Module):
    """The network one table replaces: ``n`` pixels -> ``scale x scale`` outputs in (-1, 1)."""

    def __init__(self, pattern: str, scale: int, nf: int = 64, depth: int = 4):
        super().__init__()
        self.pattern, self.scale = pattern, scale
        n = len(sr_lut.PATTERNS[pattern])
        layers: list[nn.Module] = [nn.Conv2d(n, nf, 1), nn.ReLU()]
        for _ in range(depth):
            layers += [nn.Conv2d(nf, nf, 1), nn.ReLU()]
        layers.append(nn.Conv2d(nf, scale * scale, 1))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) plane -> (B, n, H, W): the pattern's pixels at every anchor (reflect padded)."""
        bottom, right = sr_lut.pad_of(self.pattern)
        h, w = x.shape[2:]
        xp = nn.functional.pad(x, (0, right, 0, bottom), mode="reflect") if bottom or right else x
        return torch.cat([xp[:, :, dy:dy + h, dx:dx + w] for dy, dx in sr_lut.PATTERNS[self.pattern]], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) plane in [0, 1] -> (B, 1, H*scale, W*scale), the int8 a table stores (as float)."""
        y = torch.tanh(self.mlp(self.gather(x)))
        return _floor_ste(nn.functional.pixel_shuffle(y, self.scale) * 127.0)

    def rows(self, plane: str) -> torch.Tensor:
        """The unit on every input it can see: (16^n, scale^2) in (-1, 1), the table before its int8 floor."""
        return torch.tanh(self.mlp(_unit_inputs(self.pattern, plane)))[:, :, 0, 0]

    def lookup(self, rows: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """``forward`` by table: (B, 1, H, W) nibble plane (integer-valued, 0..15) -> what ``forward`` gives
        on that plane's values, read from ``rows`` (``self.rows(plane)``) at ``sr_lut.table_index``.

        The same function as ``forward`` (one row per distinct input instead of one MLP evaluation per
        pixel), and the same gradient for the weights: the rows' gradient is the sum of their pixels'. A
        table read has no gradient for its indices, as the deployed table has none."""
        bottom, right = sr_lut.pad_of(self.pattern)
        h, w = levels.shape[2:]
        lp = nn.functional.pad(levels, (0, right, 0, bottom), mode="reflect") if bottom or right else levels
        lp = lp.detach().long()[:, 0]
        idx = torch.zeros_like(lp[:, :h, :w])
        for dy, dx in sr_lut.PATTERNS[self.pattern]:
            idx = idx * sr_lut.LEVELS + lp[:, dy:dy + h, dx:dx + w]
        y = rows[idx].permute(0, 3, 1, 2)  # (B, scale^2, H, W)
        return _floor_ste(nn.functional.pixel_shuffle(y, self.scale) * 127.0)


class HKStage(nn.Module):
    """One x``scale`` stage: an MSB and an LSB branch of pattern units, rotation ensemble, residual."""

    def __init__(self, scale: int = 2, msb=("h", "d", "b"), lsb=("h2", "d2"), nf: int = 64, depth: int = 4):
        super().__init__()
        self.scale = scale
        self.msb = nn.ModuleDict({p: PatternUnit(p, scale, nf, depth) for p in msb})
        self.lsb = nn.ModuleDict({p: PatternUnit(p, scale, nf, depth) for p in lsb})

    @staticmethod
    def _branch(plane: torch.Tensor, units: nn.ModuleDict) -> torch.Tensor:
        acc = 0.0
        for unit in units.values():
            for r in range(4):
                out = unit(torch.rot90(plane, r, (2, 3)))
                acc = acc + torch.rot90(out, -r, (2, 3))
        return acc

    @staticmethod
    def _branch_by_table(levels: torch.Tensor, units: nn.ModuleDict, plane: str) -> torch.Tensor:
        acc = 0.0
        for unit in units.values():
            rows = unit.rows(plane)  # once per unit: the 4 rotations read one table
            for r in range(4):
                out = unit.lookup(rows, torch.rot90(levels, r, (2, 3)))
                acc = acc + torch.rot90(out, -r, (2, 3))
        return acc

    def forward(self, x255: torch.Tensor, by_table: bool = False) -> torch.Tensor:
        """(B, 1, H, W) integer-valued pixels 0..255 (float) -> the stage's y in [0, 1], upscaled.

        ``by_table``: every unit read from its rows (``PatternUnit.lookup``) rather than run per pixel; the
        same function, many times cheaper to train (4,096 MLP evaluations per MSB unit instead of one per
        pixel and rotation). The default, per-pixel form is the graph the Relax importer and
        ``TabulateSubnetworks`` see."""
        hi = torch.floor(x255 / 16)  # exact for integer-valued floats: 16 is a power of two
        lo = x255 - hi * 16
        if by_table:
            msb_sum, lsb_sum = self._branch_by_table(hi, self.msb, "msb"), self._branch_by_table(lo, self.lsb, "lsb")
        else:
            msb_sum, lsb_sum = self._branch(hi * 16 / 255, self.msb), self._branch(lo / 255, self.lsb)
        msb = torch.clamp(msb_sum / (len(self.msb) * 255), -1, 1)
        lsb = torch.clamp(lsb_sum / (len(self.lsb) * 255), -1, 1)
        nearest = nn.functional.interpolate(x255 / 255, scale_factor=self.scale, mode="nearest")
        return torch.clamp((nearest + msb) + lsb, 0, 1)


class HKNet(nn.Module):
    """Stages of x2 (or one of x``scale``) chained; ``forward`` takes images in [0, 1] (B, 1, H, W)."""

    def __init__(self, scale: int = 4, nf: int = 64, depth: int = 4, msb=("h", "d", "b"), lsb=("h2", "d2")):
        super().__init__()
        if scale not in (2, 3, 4):
            raise ValueError(f"scale must be 2, 3 or 4, got {scale}")
        factors = [2, 2] if scale == 4 else [scale]
        self.scale = scale
        self.stages = nn.ModuleList([HKStage(f, msb, lsb, nf, depth) for f in factors])

    def forward(self, x: torch.Tensor, by_table: bool = False) -> torch.Tensor:
        """``by_table``: see ``HKStage.forward``."""
        x255 = torch.floor(x * 255)
        for i, st in enumerate(self.stages):
            y = st(x255, by_table)
            if i < len(self.stages) - 1:
                x255 = _floor_ste(y * 255)
        return y


def _unit_inputs(pattern: str, plane: str) -> torch.Tensor:
    """Every input a unit can see: (16^n, n, 1, 1), first pixel most significant (``sr_lut.table_index``)."""
    n = len(sr_lut.PATTERNS[pattern])
    grid = np.stack(np.meshgrid(*[np.arange(sr_lut.LEVELS)] * n, indexing="ij"), -1).reshape(-1, n)
    levels = torch.from_numpy(grid.astype(np.float32))
    values = levels * 16 / 255 if plane == "msb" else levels / 255  # as HKStage computes them, in float32
    return values[:, :, None, None]


@torch.no_grad()
def tabulate(model: HKNet) -> list[sr_lut.StageTables]:
    """The int8 tables of every stage: each unit evaluated on all its 16^n inputs."""
    out = []
    for st in model.stages:
        tables = {}
        for plane, units in (("msb", st.msb), ("lsb", st.lsb)):
            tables[plane] = {}
            for name, unit in units.items():
                y = torch.tanh(unit.mlp(_unit_inputs(name, plane)))[:, :, 0, 0]  # (16^n, s*s)
                q = torch.floor(y * 127.0).numpy().astype(np.int8)
                tables[plane][name] = q.reshape(-1, st.scale, st.scale)
        out.append(sr_lut.StageTables(st.scale, tables["msb"], tables["lsb"]))
    return out
