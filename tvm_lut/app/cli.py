"""The ``tvm-lut`` command line: compile, tune, run, report, demo."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import zipfile

import numpy as np

from tvm_lut.errors import CalibrationError, LUTError, OptionError
from tvm_lut.math import distances


def _load_npz(path: str, what: str):
    if not os.path.isfile(path):
        raise CalibrationError(f"{what} file not found: {path}")
    try:
        data = np.load(path, allow_pickle=False)
        if not hasattr(data, "files"):
            raise CalibrationError(f"{path}: expected an .npz archive of named arrays, got a single array")
        return {k: data[k] for k in data.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise CalibrationError(f"{path}: not a readable .npz file ({exc})") from exc


def _parse_shapes(specs: list[str]) -> dict[str, list[int]]:
    out = {}
    for spec in specs:
        name, sep, dims = spec.rpartition(":")
        try:
            if not sep:
                raise ValueError
            out[name] = [int(d) for d in dims.lower().split("x")]
        except ValueError:
            raise OptionError(f"--input-shape {spec!r}: expected NAME:1x3x32x32") from None
    return out


def _baselines_for(path: str) -> dict:
    """The source model to time beside the builds: the ONNX file itself, or the ``.pt2`` program's module."""
    if path.endswith(".onnx"):
        return {"onnx": path}
    if path.endswith(".pt2"):
        import torch

        return {"torch": torch.export.load(path).module()}
    return {}


def cmd_compile(args) -> int:
    from tvm_lut import options, targets
    from tvm_lut.app import pipeline
    from tvm_lut.frontend import importer as frontend

    is_cam = isinstance(targets.resolve(args.target), targets.Cam)  # resolved first: fail fast, before any work
    cam_params = None
    if args.cam_param and not is_cam:
        raise OptionError(f"--cam-param applies to --target cam only (got --target {args.target})")
    if is_cam:
        from tvm_lut.targets.cam_simulator import CAMParams

        cam_params = CAMParams.parse_cli(args.cam_param)
        CAMParams.from_env().with_overrides(cam_params)  # fail fast on an unknown name, a bad value or file
    layer_opts = options.parse_cli(args.layer)
    calib = _load_npz(args.calib, "calibration")
    mod = frontend.load_model(args.model, batch=args.batch, shape_dict=_parse_shapes(args.input_shape) or None)
    kwargs = dict(k=args.k, v=args.v, distance=args.distance, layers=layer_opts, all_layers=args.all_layers,
                  sequential=args.sequential, max_calibration_rows=args.max_calib_rows, method=args.method,
                  rank=int(args.rank) if args.rank.isdigit() else args.rank, butterfly_budget=args.butterfly_budget)
    options.LayerOptions(rank=kwargs["rank"], budget=args.butterfly_budget)  # fail fast on a malformed value
    budget, budget_policy = pipeline.default_budget(args.budget, "labels" in calib, args.method, args.all_layers)
    if budget is not None:
        from relay_passes import Budget

        kwargs["budget"] = str(Budget.parse(budget))  # fail fast on a malformed budget
        if kwargs["budget"].startswith("max-drop") and "labels" not in calib:
            raise CalibrationError(f"--budget {args.budget} needs a 'labels' array in {args.calib} "
                                   "(or use --budget max-disagree=POINTS or min-removed=FRACTION)")
    kwargs["mask_rank"] = args.mask_rank
    kwargs["exact"] = args.exact
    kwargs["lookup"] = args.lookup
    kwargs["encoder"] = args.encoder
    if args.db:
        if not os.path.isfile(os.path.join(args.db, "database_workload.json")):
            raise OptionError(f"--db {args.db}: no tuning database there (run 'tvm-lut tune ... --db {args.db}' first)")
        kwargs["database"] = args.db
    if args.codebooks:
        from tvm_lut.train.lutnn import load_codebooks

        kwargs["codebooks"] = load_codebooks(args.codebooks)
    manifest = pipeline.compile_to_dir(args.out, mod, calib, target=args.target, holdout=args.holdout,
                                       seed=args.seed, source=os.path.basename(args.model), cam_params=cam_params,
                                       calibration_name=args.calib, budget_policy=budget_policy,
                                       baselines=_baselines_for(args.model),
                                       measure_latency=not args.no_latency, progress=not args.quiet, **kwargs)
    from tvm_lut.app.report import format_report

    print(format_report(manifest["report"]))
    print(f"\nwrote {args.out}/ (model.so, params.bin, manifest.json, report.json)")
    return 0


def cmd_tune(args) -> int:
    """LUTify the model as ``compile`` would, then tune its lookup kernels with MetaSchedule + XGBoost."""
    from relay_passes import LUTify
    from tir_schedules import tuning
    from tvm_lut import options, targets
    from tvm_lut.frontend import graph, importer as frontend
    from tvm_lut.runtime.calibrate import normalize_inputs

    if args.trials < 1:
        raise OptionError(f"--trials must be >= 1, got {args.trials}")
    build_for = targets.resolve(args.target)
    tgt = build_for.tvm
    farm = None
    if args.farm:
        from tvm_lut.targets.farm import parse_address

        parse_address(args.farm)
        if build_for.farm_key is None:
            where = "in the host's CAM simulator" if isinstance(build_for, targets.Cam) else "on no device of a farm"
            raise OptionError(f"--farm: a {build_for.name} build's lookups run {where}; nothing to tune remotely")
        if args.key != build_for.farm_key:
            raise OptionError(f"--key {args.key} with --target {args.target}: arm64 servers run --target arm builds, "
                              "x86 servers x86 builds")
        farm = tuning.RemoteDevices(args.farm, args.key)
        if farm.servers() < 1:
            raise OptionError(f"--farm {args.farm}: no server with key {args.key!r} is registered there")
    elif not build_for.runs_here():
        raise OptionError(f"--target {args.target}: its code cannot run on this machine, so candidates cannot be "
                          f"measured here; tune on a farm of such devices (--farm HOST:PORT --key "
                          f"{build_for.farm_key or 'x86'})")
    calib = _load_npz(args.calib, "calibration")
    mod = frontend.load_model(args.model, batch=args.batch, shape_dict=_parse_shapes(args.input_shape) or None)
    inputs = normalize_inputs({k: v for k, v in calib.items() if k != "labels"}, graph.input_signature(mod["main"]))
    pass_ = LUTify(calibration=inputs, k=args.k, v=args.v, distance=args.distance, layers=options.parse_cli(args.layer),
                   all_layers=args.all_layers, lookup=args.lookup, target=tgt, schedule=False,
                   progress=not args.quiet)
    lut = pass_(mod)
    results = tuning.tune_module_kernels(lut, tgt, args.db, args.trials, progress=not args.quiet, seed=args.seed,
                                         farm=farm)
    if not results:
        print("no tunable lookup kernels in this model (no layer became a PQ lookup)")
        return 0
    print(f"{'kernel':<40} {'role':<15} {'hand us':>9} {'tuned us':>9} {'speedup':>8} {'trials':>6} {'deploys':>7}")
    for r in results:
        tuned = "-" if r.tuned_us is None else f"{r.tuned_us:9.1f}"
        speed = "-" if r.speedup is None else f"{r.speedup:7.2f}x"
        deploys = "tuned" if r.speedup is not None and r.speedup > 1 else "hand"
        print(f"{r.name:<40} {r.role:<15} {r.hand_us:9.1f} {tuned:>9} {speed:>8} {r.trials:6d} {deploys:>7}")
    with open(os.path.join(args.db, "tune_report.json"), "w") as f:
        json.dump([r.__dict__ for r in results], f, indent=1)
    if farm is not None and farm.key == "arm64":
        print("\ntimes measured on the farm's arm64 servers: servers started by 'tvm-lut farm start --arm' run under "
              "qemu emulation, so their times only rank candidates and say nothing about ARM cores")
    print(f"\ndatabase: {args.db}/ (reuse with: tvm-lut compile ... --db {args.db}"
          + (f" --target {args.target})" if args.target != "x86" else ")"))
    return 0


def cmd_run(args) -> int:
    data = _load_npz(args.input, "input")
    labels = data.pop("labels", None)
    if args.farm:
        from tvm_lut.runtime.artifact import run_remote
        from tvm_lut.targets.farm import parse_address

        parse_address(args.farm)
        outputs = run_remote(args.artifact, data, args.farm, args.key)
    else:
        from tvm_lut.runtime.artifact import Model

        outputs = Model(args.artifact).run(data)
    n = len(next(iter(outputs.values())))
    first = next(iter(outputs.values()))
    if labels is not None:  # checked before anything is written
        from tvm_lut.runtime.calibrate import check_labels

        labels = check_labels(labels, n, int(first.reshape(n, -1).shape[1]), args.input)
    out = args.output
    tmp = out + ".tmp.npz"
    try:
        np.savez(tmp, **outputs)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    msg = f"ran {n} samples through {args.artifact} -> {out} ({', '.join(outputs)})"
    if labels is not None:
        acc = float((first.reshape(n, -1).argmax(-1) == labels).mean() * 100)
        msg += f"; top-1 accuracy against 'labels': {acc:.2f}%"
    print(msg)
    return 0


def cmd_farm(args) -> int:
    from tvm_lut.targets.farm import Farm

    if args.action == "setup-arm":
        from tvm_lut.targets import arm_emulator

        arm_emulator.setup(force=args.force)
        return 0
    if args.action == "start":
        farm = Farm(args.dir).start(x86=args.x86, arm=args.arm, host=args.host, port=args.port,
                                    allow_remote=args.allow_remote)
        print(farm.status_text())
        print(f"\ntune on it:  tvm-lut tune MODEL --calib CALIB --db DIR --farm {farm.address} --key x86")
        return 0
    farm = Farm.load(args.dir)
    if args.action == "status":
        print(farm.status_text())
        return 0
    farm.stop()
    print(f"stopped the farm at {farm.address}")
    return 0


def cmd_report(args) -> int:
    from tvm_lut.app.report import format_report
    from tvm_lut.runtime.artifact import read_manifest

    report = read_manifest(args.artifact)["report"]
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(format_report(report, exact_counts=args.exact_counts))
    return 0


def cmd_demo(args) -> int:
    from tvm_lut.app.demo import main as demo_main

    demo_main(out=args.out, epochs=args.epochs, calib_images=args.calib_images, progress=not args.quiet)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tvm-lut", description="Compile neural networks into table lookups with TVM.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="LUTify a model (.onnx or torch.export .pt2) and build it")
    c.add_argument("model", help="model file: .onnx or a torch.export.save'd .pt2")
    c.add_argument("--calib", required=True, help=".npz with one array per model input (+ optional 'labels')")
    c.add_argument("--target", default="x86",
                   help="x86 (default, this host's CPU), x86:CPU for another x86-64 CPU (LLVM names: x86-64-v3 runs "
                        "on any AVX2 CPU, znver4, icelake-server...), arm (aarch64 + NEON, cross-compiled) or cam "
                        "(PQ layers on the CAM simulator)")
    c.add_argument("--cam-param", action="append", default=[], metavar="NAME=VALUE",
                   help="--target cam: override a simulated device parameter (e.g. arrays=32; see tvm_lut/targets/cam_simulator.py)")
    c.add_argument("-o", "--out", required=True, help="output artifact directory")
    c.add_argument("--k", type=int, default=16, help="centroids per codebook (default 16)")
    c.add_argument("--v", type=int, default=None, help="subvector length (default: 9 for 3x3 convs, else 4)")
    c.add_argument("--distance", default="l2", choices=distances.names(), help="encoder distance")
    c.add_argument("--layer", action="append", default=[], metavar="NAME:OPTS",
                   help="per-layer options, e.g. features.3:k=8,v=2 or fc:exact (repeatable)")
    from relay_passes import registry  # the methods a user can name, built-in or registered

    c.add_argument("--method", default="pq", choices=registry.names(),
                   help="rewrite for every layer (default pq); --layer NAME:method=... overrides per layer")
    c.add_argument("--rank", default="evbmf", help="low-rank rank rule: evbmf (default), energy=0.95 or an integer")
    c.add_argument("--butterfly-budget", type=float, default=0.2,
                   help="butterfly parameter budget: a fraction of each dense layer (default 0.2) or a count")
    c.add_argument("--all-layers", action="store_true", help="also convert layers where lookup does not pay (M<=K)")
    c.add_argument("--sequential", action="store_true", help="calibrate layer by layer on converted upstream layers")
    c.add_argument("--budget", default=None, metavar="max-drop=P|max-disagree=P|min-removed=F|none",
                   help="priority mask: keep the most sensitive layers exact so the accuracy drop stays within P "
                        "points (needs 'labels' in --calib), the top-1 disagreement with the exact model within P "
                        "points, or at least a fraction F of multiplies is removed. Default: max-drop=1 with labels, "
                        "else max-disagree=1 (none with --all-layers or a method other than pq); 'none': no mask")
    c.add_argument("--mask-rank", default="multiplies", choices=["multiplies", "latency"],
                   help="how the priority mask ranks layers for --budget: accuracy lost per multiply removed "
                        "(default), or per millisecond saved, each layer's lookup and exact form timed on this host "
                        "(a layer whose lookup is no faster stays exact)")
    c.add_argument("--exact", default="fp32", choices=["fp32", "int8"],
                   help="arithmetic of the conv layers that stay exact (kept by the mask, requested, or too narrow to "
                        "pay): fp32 (default) or int8, ONNX Runtime's static int8 quantization of the layer on a VNNI "
                        "kernel (AVX-512 VBMI + VNNI; elsewhere, and for dense layers, fp32 with the reason)")
    c.add_argument("--codebooks", default=None, metavar="FILE.npz",
                   help="learned centroids by layer name (tvm_lut.train.lutnn.save_codebooks)")
    c.add_argument("--batch", type=int, default=1, help="batch size for a symbolic leading input dim (ONNX, dynamic .pt2)")
    c.add_argument("--input-shape", action="append", default=[], metavar="NAME:1x3x32x32", help="fix an input shape")
    c.add_argument("--holdout", type=float, default=0.2, help="fraction of calibration rows held back: accuracy with labels, top-1 agreement with the exact model without")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--max-calib-rows", type=int, default=16384, help="rows per layer used for k-means")
    c.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    c.add_argument("--lookup", default="auto", choices=["auto", "shuffle", "gather"],
                   help="table readout kernel: byte shuffles (pshufb) or gathers (default auto: shuffles when they apply)")
    c.add_argument("--encoder", default="int8", choices=["fp32", "int8"],
                   help="PQ encoder arithmetic: int8 (default; VNNI vpdpbusd integer scores where they apply: "
                        "convolutions with V = kernel area or one kernel row (--layer NAME:v=3 at 3x3) on AVX-512 VBMI + "
                        "VNNI; other layers keep fp32) or "
                        "fp32 scores everywhere (the exact nearest centroid)")
    c.add_argument("--db", default=None, metavar="DIR", help="use kernels tuned by 'tvm-lut tune --db DIR'")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    c.set_defaults(func=cmd_compile)

    t = sub.add_parser("tune", help="tune a model's lookup kernels with MetaSchedule (XGBoost cost model)")
    t.add_argument("model", help="model file: .onnx or a torch.export.save'd .pt2")
    t.add_argument("--calib", required=True, help=".npz with one array per model input (as for compile)")
    t.add_argument("--db", required=True, metavar="DIR", help="tuning database directory (created or extended)")
    t.add_argument("--trials", type=int, default=32, help="measured candidates per kernel variant (default 32)")
    t.add_argument("--target", default="x86", help="target to tune for (default: x86, this host)")
    t.add_argument("--k", type=int, default=16)
    t.add_argument("--v", type=int, default=None)
    t.add_argument("--distance", default="l2", choices=distances.names())
    t.add_argument("--layer", action="append", default=[], metavar="NAME:OPTS", help="per-layer options, as for compile")
    t.add_argument("--all-layers", action="store_true")
    t.add_argument("--lookup", default="auto", choices=["auto", "shuffle", "gather"])
    t.add_argument("--batch", type=int, default=1)
    t.add_argument("--input-shape", action="append", default=[], metavar="NAME:1x3x32x32")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--farm", default=None, metavar="HOST:PORT",
                   help="measure on the servers of an RPC tracker (tvm-lut farm start) instead of this process")
    t.add_argument("--key", default="x86", choices=["x86", "arm64"], help="device kind on the farm (default x86)")
    t.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    t.set_defaults(func=cmd_tune)

    r = sub.add_parser("run", help="run a compiled artifact on a dataset")
    r.add_argument("artifact", help="artifact directory written by 'compile'")
    r.add_argument("--input", required=True, help=".npz with one array per model input")
    r.add_argument("--output", required=True, help=".npz to write the outputs to")
    r.add_argument("--farm", default=None, metavar="HOST:PORT",
                   help="run on a server of this RPC tracker (e.g. an arm build on an arm64 server)")
    r.add_argument("--key", default="arm64", choices=["x86", "arm64"], help="device kind on the farm (default arm64)")
    r.set_defaults(func=cmd_run)

    rep = sub.add_parser("report", help="per-layer table of an artifact: methods, ops, bytes, accuracy, latency")
    rep.add_argument("artifact")
    rep.add_argument("--json", action="store_true", help="print the report as JSON")
    rep.add_argument("--exact-counts", action="store_true", help="print integer op counts instead of k/M/G")
    rep.set_defaults(func=cmd_report)

    f = sub.add_parser("farm", help="a local device farm: TVM RPC tracker + servers (x86, emulated arm64)")
    f.add_argument("action", choices=["setup-arm", "start", "status", "stop"],
                   help="setup-arm: install the aarch64 cross compiler + an emulated aarch64 TVM runtime (root, "
                        "Debian); start/status/stop: the tracker and its servers")
    f.add_argument("--x86", type=int, default=1, help="start: x86 servers (key x86), default 1")
    f.add_argument("--arm", type=int, default=0, help="start: emulated aarch64 servers (key arm64), default 0")
    f.add_argument("--host", default="127.0.0.1", help="start: address to bind (default loopback)")
    f.add_argument("--port", type=int, default=None, help="start: tracker port (default: a free one)")
    f.add_argument("--allow-remote", action="store_true",
                   help="start: allow a non-loopback --host (TVM RPC has no authentication)")
    f.add_argument("--dir", default=None, help="farm state directory (default $TVM_LUT_FARM_DIR or ~/.cache/tvm-lut/farm)")
    f.add_argument("--force", action="store_true", help="setup-arm: redo the setup")
    f.set_defaults(func=cmd_farm)

    sr = sub.add_parser("sr", help="super-resolution by whole-network lookup tables (HKLUT): train, compile, "
                                   "upscale, eval")
    srs = sr.add_subparsers(dest="sr_command", required=True)
    s_train = srs.add_parser("train", help="train an HKLUT network on T91 (resumable; ~/.cache/tvm-lut/sr/)")
    s_train.add_argument("--scale", type=int, default=4, choices=[2, 3, 4])
    s_train.add_argument("--steps", type=int, default=20_000)
    s_train.add_argument("--batch", type=int, default=32)
    s_train.add_argument("--patch", type=int, default=32, help="LR patch size")
    s_train.add_argument("--nf", type=int, default=64, help="width of each pattern unit's MLP")
    s_train.add_argument("--depth", type=int, default=4, help="hidden 1x1 layers of each pattern unit")
    s_train.add_argument("--max-minutes", type=float, default=0, help="stop after this long (resumable)")
    s_train.add_argument("-q", "--quiet", action="store_true")
    s_comp = srs.add_parser("compile", help="tabulate a trained network into int8 tables")
    s_comp.add_argument("checkpoint", help="a checkpoint of 'sr train' (final.pt or last.pt, or its directory)")
    s_comp.add_argument("-o", "--output", required=True, help="output directory (tables.npz + manifest.json)")
    s_up = srs.add_parser("upscale", help="upscale an image file (PNG out)")
    s_up.add_argument("input")
    s_up.add_argument("-o", "--output", required=True)
    s_up.add_argument("--scale", type=int, default=4)
    s_up.add_argument("--model", help="tables made by 'sr compile' (default: the tables shipped for --scale)")
    s_ev = srs.add_parser("eval", help="Y PSNR/SSIM of tables on a test set, beside bicubic")
    s_ev.add_argument("model", help="tables made by 'sr compile'")
    s_ev.add_argument("--set", default="set5", choices=["set5", "set14", "b100"])
    sr.set_defaults(func=cmd_sr)

    d = sub.add_parser("demo", help="the main job on embedded data: LeNet-5/MNIST, exact vs LUT")
    d.add_argument("--out", default="tvm-lut-demo", help="output directory (default ./tvm-lut-demo)")
    d.add_argument("--epochs", type=int, default=3)
    d.add_argument("--calib-images", type=int, default=2048)
    d.add_argument("-q", "--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)
    return p


def cmd_sr(args) -> int:
    """``tvm-lut sr train|compile|upscale|eval``: super-resolution by whole-network lookup tables."""
    from tvm_lut.app import sr

    if args.sr_command == "train":
        from tvm_lut.train import sr_training

        state = sr_training.train(scale=args.scale, steps=args.steps, batch=args.batch, patch=args.patch, nf=args.nf,
                                  depth=args.depth, max_minutes=args.max_minutes, progress=not args.quiet)
        print(f"x{state['scale']}: step {state['step']} of {state['steps']}"
              + (" (done)" if state["done"] else " (run the same command to resume)") + f"; {state['cache']}")
        return 0
    if args.sr_command == "compile":
        import torch

        from tvm_lut.train import hklut

        path = os.path.join(args.checkpoint, "final.pt") if os.path.isdir(args.checkpoint) else args.checkpoint
        try:
            ck = torch.load(path, map_location="cpu", weights_only=False)
            cfg = ck["settings"]
            model = hklut.HKNet(scale=cfg["scale"], nf=cfg["nf"], depth=cfg["depth"])
            model.load_state_dict(ck["model"])
        except Exception as exc:  # a missing file, another format, another network: all say the same
            raise OptionError(f"{path}: not a checkpoint of 'tvm-lut sr train' ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        tables, report = sr.tabulate(model)  # the Relax pass: subnetworks found and evaluated by TVM
        tables.save(args.output)
        for row in report["tables"]:
            print(f"{row['name']:24s} {row['inputs']} inputs x {row['levels']} levels: {row['entries']:5d} entries x "
                  f"{row['outputs']} int8 = {row['bytes']:6d} B, used {row['uses']}x"
                  + ("" if row["exact"] else f" (affine int8, max error {row['max_error']:.3g})"))
        print(f"x{tables.scale}: {tables.nbytes} bytes of tables -> {args.output}")
        return 0
    if args.sr_command == "upscale":
        done = sr.upscale_file(args.input, args.output, args.scale, args.model)
        print(f"{done['input']} {done['size_in'][1]}x{done['size_in'][0]} -> {done['output']} "
              f"{done['size_out'][1]}x{done['size_out'][0]} (x{done['scale']})")
        return 0
    from tvm_lut.train import sr_training

    tables = sr.SRTables.load(args.model)
    res = sr.evaluate(tables, sr_training.load_set(args.set))
    m = res["mean"]
    print(f"{args.set} x{res['scale']} (Y, {res['scale']} border pixels shaved, MATLAB-bicubic LR): "
          f"tables {m['psnr']:.2f} dB / {m['ssim']:.4f}, bicubic {m['bicubic_psnr']:.2f} dB / {m['bicubic_ssim']:.4f}; "
          f"{res['table_bytes']} bytes of tables")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LUTError as exc:
        print(f"tvm-lut: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
