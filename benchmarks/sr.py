"""Super-resolution by lookup tables: quality on Set5/Set14/B100 and speed, side by side in one run.

    python benchmarks/sr.py                         # quality (x2, x4) and speed
    python benchmarks/sr.py --only speed            # 320x180 -> 1280x720, one thread
    python benchmarks/sr.py --tables x4=DIR,x2=DIR  # tables made by 'tvm-lut sr compile' (default: the shipped ones)

Quality, the field's protocol (``tvm_lut.math.image_quality``): HR modcropped to the scale, LR by MATLAB's
bicubic, Y-channel PSNR and SSIM with ``scale`` border pixels shaved. Rows: bicubic; our network before
tabulation (from its ``sr train`` checkpoint, when there is one); our tables after, compiled (with their
bytes). Beside them the published figures (trained on DIV2K; ours on T91 only).

Speed: 320x180 -> 1280x720 (x4), one thread, medians: the compiled table kernels, the PyTorch network, the
numpy table reference, and Pillow's and OpenCV's bicubic (OpenCV when installed). Without trained tables
the speed rows use random tables of the same shapes: a lookup's cost does not depend on the values.

Writes ``benchmarks/results/sr.json`` (with the CPU model and its ISA flags) and ``sr.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from tvm_lut.app import sr  # noqa: E402
from tvm_lut.app.baselines import host_cpu  # noqa: E402
from tvm_lut.math import image_quality, resize, sr_lut  # noqa: E402
from tvm_lut.train import hklut, sr_training  # noqa: E402

RESULTS = os.path.join(HERE, "results")
PUBLISHED = {  # Set5 / Set14 / B100 Y PSNR (dB) at x4, table bytes; trained on DIV2K
    "bicubic": {"set5": 28.42, "set14": 26.00, "b100": 25.96, "bytes": 0},
    "SR-LUT-S": {"set5": 29.82, "set14": 27.01, "b100": 26.53, "bytes": 1_304 * 1024},
    "HKLUT-S": {"set5": 30.32, "set14": 27.33, "b100": 26.74, "bytes": 102_400},
    "TinyLUT-S": {"set5": 30.22, "set14": 27.33, "b100": 26.71, "bytes": 37 * 1024},
}


def median_ms(fn, repeat: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


def network(scale: int):
    """The trained network of ``sr train`` for ``scale`` (final, else last checkpoint), or None."""
    import torch

    for name in ("final.pt", "last.pt"):
        path = os.path.join(sr_training.cache_dir(scale), name)
        if os.path.isfile(path):
            ck = torch.load(path, map_location="cpu", weights_only=False)
            cfg = ck["settings"]
            model = hklut.HKNet(scale=cfg["scale"], nf=cfg["nf"], depth=cfg["depth"])
            model.load_state_dict(ck["model"])
            return model.eval(), path
    return None, None


def tables_for(scale: int, given: dict[int, str]) -> tuple[sr.SRTables | None, str]:
    if scale in given:
        return sr.SRTables.load(given[scale]), given[scale]
    try:
        return sr.shipped(scale), "shipped"
    except Exception as exc:  # noqa: BLE001  (no tables yet: the report says so)
        return None, str(exc)


def quality(given: dict[int, str], sets: list[str]) -> list[dict]:
    rows = []
    for scale in (2, 4):
        tables, where = tables_for(scale, given)
        model, ckpt = network(scale)
        for name in sets:
            images = sr_training.load_set(name)
            row = {"scale": scale, "set": name, "tables_from": where, "network_from": ckpt}
            bic = []
            for _, img in images:
                hr = image_quality.modcrop(img, scale)
                bic.append(image_quality.psnr(resize.imresize(resize.imresize(hr, 1 / scale), scale), hr, scale))
            row["bicubic_psnr"] = float(np.mean(bic))
            if model is not None:
                # the network as it is imported and tabulated: every unit run per pixel (not its table form)
                row["network_psnr"] = sr_training.evaluate(model, images, scale, by_table=False)
            if tables is not None:
                res = sr.evaluate(tables, images)
                row.update(tables_psnr=res["mean"]["psnr"], tables_ssim=res["mean"]["ssim"],
                           table_bytes=tables.nbytes)
            print(f"x{scale} {name:6s} bicubic {row['bicubic_psnr']:.2f} dB"
                  + (f", network {row['network_psnr']:.2f}" if "network_psnr" in row else ", no trained network")
                  + (f", tables {row['tables_psnr']:.2f} dB ({row['table_bytes']} B)" if "tables_psnr" in row
                     else ", no tables"), flush=True)
            rows.append(row)
    return rows


def speed(given: dict[int, str]) -> dict:
    import torch
    from PIL import Image

    torch.set_num_threads(1)
    tables, where = tables_for(4, given)
    model, _ = network(4)
    if tables is None:
        torch.manual_seed(0)
        random_net = hklut.HKNet(scale=4)
        tables, where = sr.SRTables(hklut.tabulate(random_net)), "random tables of the HKLUT-S shapes"
        model = model or random_net.eval()
    lr = np.random.default_rng(0).integers(0, 256, (180, 320), dtype=np.uint8)
    res = {"input": "320x180 gray plane", "output": "1280x720", "threads": 1, "tables": where}
    sr.upscale(lr, tables)  # builds the kernels for this size
    res["tables_compiled_ms"] = median_ms(lambda: sr.upscale(lr, tables))
    res["numpy_reference_ms"] = median_ms(lambda: sr_lut.upscale(lr, tables.stages), repeat=3)
    x = torch.from_numpy(lr.astype(np.float32) / 255)[None, None]
    with torch.no_grad():
        res["pytorch_network_ms"] = median_ms(lambda: model(x), repeat=3)
    im = Image.fromarray(lr)
    res["pillow_bicubic_ms"] = median_ms(lambda: im.resize((1280, 720), Image.BICUBIC))
    try:
        import cv2

        cv2.setNumThreads(1)
        res["opencv_bicubic_ms"] = median_ms(lambda: cv2.resize(lr, (1280, 720), interpolation=cv2.INTER_CUBIC))
    except ImportError:
        res["opencv_bicubic_ms"] = None
    res["megapixels_per_s_tables"] = 1280 * 720 / 1e6 / (res["tables_compiled_ms"] / 1e3)
    res["x_faster_than_pytorch"] = res["pytorch_network_ms"] / res["tables_compiled_ms"]
    return res


def crop_figure(given: dict[int, str], path: str, size: int = 96) -> str:
    """A side-by-side crop (PNG) of Set5 butterfly at x4: bicubic, our tables (when there are tables), HR."""
    from PIL import Image

    tables, where = tables_for(4, given)
    name, img = [x for x in sr_training.load_set("set5") if x[0] == "butterfly"][0]
    hr = image_quality.modcrop(img, 4)
    lr = resize.imresize(hr, 0.25)
    y, x = (hr.shape[0] - size) // 2, (hr.shape[1] - size) // 2
    panels = [resize.imresize(lr, 4)] + ([sr.upscale(lr, tables)] if tables is not None else []) + [hr]
    crops = [p[y:y + size, x:x + size] for p in panels]
    gap = np.full((size, 4, 3), 255, np.uint8)
    strip = np.concatenate([c if i == 0 else np.concatenate([gap, c], 1) for i, c in enumerate(crops)], 1)
    Image.fromarray(strip).resize((strip.shape[1] * 3, size * 3), Image.NEAREST).save(path)
    return f"{name} x4, {size}x{size} HR pixels: bicubic | " + ("tables | " if tables is not None else "") + "HR"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=["quality", "speed"])
    ap.add_argument("--tables", default="", help="x4=DIR,x2=DIR: tables made by 'tvm-lut sr compile'")
    ap.add_argument("--sets", default="set5,set14,b100")
    ap.add_argument("--out", default=os.path.join(RESULTS, "sr"))
    args = ap.parse_args()
    given = {int(k.strip().lstrip("x")): v for k, v in (p.split("=", 1) for p in args.tables.split(",") if p)}
    result = {"cpu": host_cpu(), "published_x4": PUBLISHED,
              "note": "ours are trained on T91 only; the published figures used DIV2K"}
    if args.only in (None, "quality"):
        result["quality"] = quality(given, [s.strip() for s in args.sets.split(",")])
    if args.only in (None, "quality"):
        result["crop_png"] = args.out + "_crop.png"
        result["crop"] = crop_figure(given, result["crop_png"])
    if args.only in (None, "speed"):
        result["speed"] = speed(given)
        s = result["speed"]
        print(f"320x180 -> 1280x720, one thread ({s['tables']}): tables {s['tables_compiled_ms']:.2f} ms "
              f"({s['megapixels_per_s_tables']:.0f} MP/s), PyTorch network {s['pytorch_network_ms']:.0f} ms "
              f"({s['x_faster_than_pytorch']:.0f}x), numpy reference {s['numpy_reference_ms']:.0f} ms, Pillow bicubic "
              f"{s['pillow_bicubic_ms']:.2f} ms" + (f", OpenCV bicubic {s['opencv_bicubic_ms']:.2f} ms"
                                                    if s["opencv_bicubic_ms"] is not None else ", OpenCV not installed"))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    lines = ["# Super-resolution by lookup tables", "", f"CPU: {result['cpu']['model']}; "
             f"ISA flags: {' '.join(result['cpu']['cpu_flags'])}", "", result["note"], ""]
    if "quality" in result:
        lines += ["| scale | set | bicubic dB | network dB | tables dB | tables SSIM | table bytes |",
                  "|---|---|---|---|---|---|---|"]
        fmt = lambda v: "" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
        lines += [f"| x{r['scale']} | {r['set']} | {fmt(r['bicubic_psnr'])} | {fmt(r.get('network_psnr'))} | "
                  f"{fmt(r.get('tables_psnr'))} | {fmt(r.get('tables_ssim'))} | {fmt(r.get('table_bytes'))} |"
                  for r in result["quality"]]
        lines += ["", "Published x4 (DIV2K): " + "; ".join(f"{k} {v['set5']}/{v['set14']}/{v['b100']} dB"
                                                          for k, v in PUBLISHED.items())]
    if "speed" in result:
        lines += ["", "Speed (ms, one thread): " + json.dumps({k: v for k, v in result["speed"].items()})]
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
