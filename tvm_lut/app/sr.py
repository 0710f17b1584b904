"""Super-resolution by lookup tables end to end: tables from a trained network, PNG in, PNG out, evaluation.

``SRTables`` holds a model's int8 stage tables (``tvm_lut.math.sr_lut.StageTables``); ``save``/``load`` keep
them as one ``tables.npz`` with a ``manifest.json`` (scale, stages, every table's entries and bytes), written
atomically. ``upscale`` runs the compiled TIR stage kernels (``tir_schedules.sr_lookup``: the fast x2 form
for x2 stages), built once per image size and kept for the process, on each colour channel.

Inputs are checked before any work: a file that is not an image, a 16-bit or alpha image, an image smaller
than the 3x3 pixels the patterns span, or a scale the tables do not make is an error naming the file and
the problem, and nothing is written. Outputs are written to a temporary file and renamed into place.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field

import numpy as np
import tvm

from tir_schedules import sr_lookup
from tvm_lut import targets
from tvm_lut.errors import ArtifactError, OptionError
from tvm_lut.math import image_io, image_quality, resize, sr_lut

SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")


@dataclass
class SRTables:
    """A tabulated SR model: its stages' int8 tables and the scale they make together."""

    stages: list[sr_lut.StageTables]
    _device: list | None = field(default=None, repr=False, compare=False)  # the tables as kernel arguments

    def device_tables(self) -> list[list]:
        """Each stage's tables as the tensors its kernel takes (made once: 100 KB copied per call otherwise)."""
        if self._device is None:
            self._device = [_stage_args(st) for st in self.stages]
        return self._device

    @property
    def scale(self) -> int:
        return int(np.prod([s.scale for s in self.stages]))

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.stages)

    def manifest(self) -> dict:
        rows = [{"stage": i, "branch": branch, "pattern": name, "entries": int(t.shape[0]),
                 "outputs_per_entry": int(t.shape[1] * t.shape[2]), "bytes": int(t.nbytes)}
                for i, st in enumerate(self.stages) for branch, tabs in (("msb", st.msb), ("lsb", st.lsb))
                for name, t in tabs.items()]
        return {"kind": "hklut", "scale": self.scale, "stage_scales": [s.scale for s in self.stages],
                "tables": rows, "total_bytes": self.nbytes}

    def save(self, out: str) -> None:
        """``out/tables.npz`` and ``out/manifest.json``, both or neither (written in a temporary directory)."""
        parent = os.path.dirname(os.path.abspath(out)) or "."
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".sr_", dir=parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary directory
        arrays = {f"s{i}_{b}_{n}": t for i, st in enumerate(self.stages)
                  for b, tabs in (("msb", st.msb), ("lsb", st.lsb)) for n, t in tabs.items()}
        np.savez(os.path.join(tmp, "tables.npz"), **arrays)
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(self.manifest(), f, indent=1)
        if os.path.isdir(out):
            import shutil

            shutil.rmtree(out)
        os.replace(tmp, out)

    @classmethod
    def load(cls, path: str) -> SRTables:
        """Tables saved by ``save`` (a directory, or its ``tables.npz``)."""
        folder = path if os.path.isdir(path) else os.path.dirname(path)
        try:
            with open(os.path.join(folder, "manifest.json")) as f:
                manifest = json.load(f)
            arrays = dict(np.load(os.path.join(folder, "tables.npz")))
        except (OSError, ValueError, KeyError) as exc:
            raise ArtifactError(f"{path}: not a tvm-lut SR model (tables.npz + manifest.json): {exc}") from None
        stages = []
        for i, s in enumerate(manifest["stage_scales"]):
            pick = lambda b: {r["pattern"]: arrays[f"s{i}_{b}_{r['pattern']}"]  # noqa: E731
                              for r in manifest["tables"] if r["stage"] == i and r["branch"] == b}
            stages.append(sr_lut.StageTables(int(s), pick("msb"), pick("lsb")))
        return cls(stages)


def shipped(scale: int) -> SRTables:
    """The tables that come with the package for ``scale``."""
    path = os.path.join(SHIPPED, f"hklut_x{scale}")
    if not os.path.isdir(path):
        have = sorted(d[len("hklut_x"):] for d in os.listdir(SHIPPED) if d.startswith("hklut_x")) \
            if os.path.isdir(SHIPPED) else []
        raise OptionError(f"no tables ship for x{scale} (shipped: {', '.join('x' + h for h in have) or 'none yet'}); "
                          "give --model DIR with tables made by 'tvm-lut sr compile'")
    return SRTables.load(path)


def calibration_ramp() -> np.ndarray:
    """A (1, 1, 16, 16) image in [0, 1] showing every 8-bit value once (``(k + 0.5) / 255``, so the network's
    ``floor(255 x)`` gives k): on it the tabulation pass sees every level of both nibble planes."""
    return ((np.arange(256, dtype=np.float32) + np.float32(0.5)) / np.float32(255)).reshape(1, 1, 16, 16)


def tabulate(model, target="x86") -> tuple[SRTables, dict]:
    """The int8 tables of a trained ``tvm_lut.train.hklut.HKNet``, made by TVM: the network imported into
    Relax, ``relay_passes.tabulate.TabulateSubnetworks`` finds its branches' subnetworks, measures their
    inputs' levels on a ramp image (every 8-bit value once) and evaluates them with TVM on every input
    combination. Returns (tables, the pass's report). A unit the pass did not tabulate is an error naming it."""
    import torch

    from relay_passes.tabulate import TabulateSubnetworks
    from tvm_lut.errors import ModelError
    from tvm_lut.frontend.importer import from_torch

    ramp = calibration_ramp()
    mod = from_torch(model.eval(), torch.from_numpy(ramp))
    res = TabulateSubnetworks({"x": ramp}, levels=sr_lut.LEVELS, max_inputs=3, target=target).run(mod)
    stages = []
    for i, st in enumerate(model.stages):
        found: dict = {}
        for branch, units in (("msb", st.msb), ("lsb", st.lsb)):
            found[branch] = {}
            for name in units:
                key = f"stages.{i}.{branch}.{name}.mlp"
                table = res.tables.get(key)
                if table is None:
                    why = next((r.get("reason", "") for r in res.records if r["name"] == key), "not found")
                    raise ModelError(f"stage {i} {branch} unit {name!r} was not tabulated: {why}")
                found[branch][name] = table.reshape(-1, st.scale, st.scale)
        stages.append(sr_lut.StageTables(st.scale, found["msb"], found["lsb"]))
    return SRTables(stages), {"tables": res.records, "total_bytes": res.total_bytes}


_KERNELS: dict[tuple, object] = {}  # compiled stage kernels of this process, by shape and tables' patterns


def _stage_kernel(h: int, w: int, st: sr_lut.StageTables, final: bool):
    key = (h, w, st.scale, tuple(st.msb), tuple(st.lsb), final)
    lib = _KERNELS.get(key)
    if lib is None:
        if st.scale == 2:
            func = sr_lookup.stage_x2(h, w, tuple(st.msb), tuple(st.lsb), final)
        else:
            func = sr_lookup.stage(h, w, st.scale, tuple(st.msb), tuple(st.lsb), final)
        lib = tvm.compile(tvm.IRModule({"main": sr_lookup.schedule(func).with_attr("global_symbol", "main")}),
                          targets.host_target())
        _KERNELS[key] = lib
    return lib


def _stage_args(st: sr_lut.StageTables) -> list:
    flat = sr_lookup.words_of if st.scale == 2 else (lambda t: np.ascontiguousarray(t.reshape(-1)))
    return [tvm.runtime.tensor(flat(t)) for t in (*st.msb.values(), *st.lsb.values())]


def upscale(image: np.ndarray, tables: SRTables) -> np.ndarray:
    """A uint8 (H, W) or (H, W, C) image through the compiled stage kernels, channel by channel."""
    if image.ndim == 3:
        return np.stack([upscale(np.ascontiguousarray(image[..., c]), tables) for c in range(image.shape[2])], -1)
    x = tvm.runtime.tensor(np.ascontiguousarray(image))
    for i, (st, args) in enumerate(zip(tables.stages, tables.device_tables())):
        h, w = x.shape
        lib = _stage_kernel(h, w, st, i == len(tables.stages) - 1)
        out = tvm.runtime.empty((h * st.scale, w * st.scale), "uint8")
        lib["main"](x, *args, out)
        x = out  # the next stage reads it where it is
    return x.numpy()


def write_png(path: str, image: np.ndarray) -> None:
    """Write atomically: a temporary file beside ``path``, renamed into place."""
    from PIL import Image

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".sr_", suffix=".png", dir=folder)
    os.close(fd)
    try:
        Image.fromarray(image).save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def upscale_file(src: str, dst: str, scale: int, model: str | None = None) -> dict:
    """``src`` (PNG or any 8-bit image) upscaled by ``scale`` into ``dst`` (PNG); checks everything first."""
    if scale not in (2, 3, 4):
        raise OptionError(f"--scale {scale}: the tables make x2, x3 or x4")
    tables = SRTables.load(model) if model else shipped(scale)
    if tables.scale != scale:
        raise OptionError(f"--scale {scale}, but the tables at {model} make x{tables.scale}")
    image = image_io.read_image(src)
    if min(image.shape[:2]) < 3:
        raise OptionError(f"{src}: {image.shape[1]}x{image.shape[0]} pixels is smaller than the 3x3 pixels the "
                          "tables' patterns span")
    out = upscale(image, tables)
    write_png(dst, out)
    return {"input": src, "output": dst, "scale": scale, "size_in": list(image.shape[:2]),
            "size_out": list(out.shape[:2])}


def evaluate(tables: SRTables, images: list[tuple[str, np.ndarray]]) -> dict:
    """Y PSNR/SSIM of the tables and of bicubic on ``images`` (HR), the field's protocol."""
    s = tables.scale
    rows = []
    for name, img in images:
        hr = image_quality.modcrop(img, s)
        lr = resize.imresize(hr, 1 / s)
        ours, bic = upscale(lr, tables), resize.imresize(lr, s)
        rows.append({"image": name, "psnr": image_quality.psnr(ours, hr, s), "ssim": image_quality.ssim(ours, hr, s),
                     "bicubic_psnr": image_quality.psnr(bic, hr, s), "bicubic_ssim": image_quality.ssim(bic, hr, s)})
    mean = {k: float(np.mean([r[k] for r in rows])) for k in ("psnr", "ssim", "bicubic_psnr", "bicubic_ssim")}
    return {"scale": s, "images": rows, "mean": mean, "table_bytes": tables.nbytes}
