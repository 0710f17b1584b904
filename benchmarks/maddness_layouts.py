"""The LUT layer on MADDNESS's own data layouts, next to the layer as tvm-lut deploys it, in one run.

    python benchmarks/maddness_layouts.py [--threads 1] [--out benchmarks/results]

MADDNESS (Mithral, dblalock/bolt) reads ``X`` column-major (``ColMatrix``: ``x_col_stride = nrows`` in
``mithral_encode``) and writes each output's N results contiguously (``out_stride = nblocks * 32`` per
output in ``mithral_scan``): input (D, N), output (M, N). ``tvm-lut`` deploys a dense layer on PyTorch's
layouts instead: input (N, D), output (N, M). Each layout has its own cost:

* on (N, D) the deployed encoder puts 16 codebooks of one row in the vector lanes
  (``kernels.encode_codebook_lanes``: contiguous loads, deinterleaving shuffles); on (D, N) this script's
  encoder puts 16 rows in the lanes and loads them contiguously (``kernels.encode(x_transposed=True)``);
* the shuffle lookup produces a block of rows of one output per vector, so (M, N) stores them
  contiguously while (N, M) transposes 4x4 tiles in registers first (``shuffle.lookup(rows_major=True)``).

Same tables, same codes, so both give the same numbers (checked here). Shape: N=1024, D=128, M=256, C=32,
K=16 (RESEARCH.md §6: MADDNESS measured 114 µs there on this machine, single thread, AVX2; that figure
is from RESEARCH.md, not from this run). Kernels are hand-scheduled.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

MADDNESS_US = 114.0  # RESEARCH.md §6: N=1024, D=128, M=256, C=32, one thread, AVX2 (measured there, not here)


def build(n: int, d: int, m: int):
    import torch
    import tvm
    from torch import nn
    from tvm import relax

    import tvm_lut
    from tir_schedules import cpu, kernels, shuffle
    from tvm_lut.runtime.build import compile_with_params

    rng = np.random.default_rng(0)
    layer = nn.Linear(d, m).eval()
    x = rng.standard_normal((n, d)).astype(np.float32)
    mod = tvm_lut.from_torch(layer, torch.from_numpy(x))
    from tvm_lut.targets import host_target

    target = host_target(1)
    p = tvm_lut.LUTify(calibration=x, all_layers=True, v=4, progress=False, target=target)
    p_res = p.run(mod)
    deployed_ex, params = compile_with_params(p_res.module, target)
    q = next(iter(p_res.pq_layers.values()))
    c, k, v = q.num_codebooks, q.k, q.v
    isa = shuffle.isa_for(target)  # the kernel LUTify deploys on this machine (grouped where VBMI+VNNI)
    lanes = shuffle.block_rows(isa, n)
    pairs, mb = shuffle.padded_pairs(c), shuffle.DEFAULT_TILE
    cents, offsets = q.encoder_operands()
    bb = relax.BlockBuilder()
    xt = relax.Var("xt", relax.TensorType((c * v, n), "float32"))
    with bb.function("main", [xt]):
        with bb.dataflow():
            enc = bb.add_func(cpu.schedule(kernels.encode(n, c, k, v, q.distance, pack_lanes=lanes, pairs=pairs,
                                                          x_transposed=True, grouped=isa.grouped)), "lut_encode_colmajor")
            look = bb.add_func(cpu.schedule(shuffle.lookup(n, c, m, lanes, mb, isa.intrinsic)), "lut_lookup")
            packed = bb.emit(relax.call_tir(enc, [xt, relax.const(np.ascontiguousarray(cents.transpose(0, 2, 1))),
                                                  relax.const(offsets)],
                                            relax.TensorType(shuffle.packed_shape(n, c, lanes, isa.grouped), "uint8")))
            bias = q.bias if q.bias is not None else np.zeros(m, np.float32)
            y = bb.emit_output(relax.call_tir(look, [packed, relax.const(shuffle.pack_tables(q.tables, mb, isa.grouped)),
                                                     relax.const(q.scale), relax.const(bias.astype(np.float32))],
                                              relax.TensorType((m, n), "float32")))
        bb.emit_func_output(y)
    colmajor_ex = tvm.compile(bb.get(), target)
    return x, deployed_ex, [v_ for _, v_ in params], colmajor_ex, q, p_res.layers[0]["kernel"]


def main(threads: int, out: str) -> dict:
    os.environ["TVM_NUM_THREADS"] = str(threads)
    import tvm
    from tvm import relax

    n, d, m = 1024, 128, 256
    x, deployed_ex, params, colmajor_ex, q, p_kernel = build(n, d, m)
    dev = tvm.cpu()
    dep = relax.VirtualMachine(deployed_ex, dev)
    col = relax.VirtualMachine(colmajor_ex, dev)
    a_dep = [tvm.runtime.tensor(x, dev)] + [tvm.runtime.tensor(p, dev) for p in params]
    a_col = [tvm.runtime.tensor(np.ascontiguousarray(x.T), dev)]
    y_dep, y_col = dep["main"](*a_dep).numpy(), col["main"](*a_col).numpy()
    same = bool(np.array_equal(y_dep, y_col.T))

    def us(vm, args):
        return float(np.median(vm.time_evaluator("main", dev, number=200, repeat=9)(*args).results) * 1e6)

    rows = {"deployed (N,D) -> (N,M)": us(dep, a_dep), "MADDNESS layouts (D,N) -> (M,N)": us(col, a_col)}
    res = {"N": n, "D": d, "M": m, "C": q.num_codebooks, "K": q.k, "threads": threads, "identical_outputs": same,
           "lookup_kernel": p_kernel,
           "us": rows, "maddness_us_from_research_md": MADDNESS_US,
           "ratio_to_maddness": {k: v / MADDNESS_US for k, v in rows.items()}}
    lines = [f"N={n} D={d} M={m} C={q.num_codebooks} K=16, {threads} thread(s), hand schedules, lookup {p_kernel}; "
             f"outputs identical: {same}",
             "| layouts | µs | × MADDNESS (114 µs, RESEARCH.md) |", "|---|---|---|"]
    lines += [f"| {k} | {v:.1f} | {v / MADDNESS_US:.2f} |" for k, v in rows.items()]
    print("\n".join(lines))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "maddness_layouts.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(out, "maddness_layouts.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    a = ap.parse_args()
    main(a.threads, a.out)
