"""A content-addressable-memory (CAM) accelerator simulator for PQ layers (PECAN's mapping).

What the device does, per PQ layer (``--target cam``):

* **search**: each codebook's K centroids are stored as K words of a CAM array (V cells of ``cell_bits``
  each). One search presents a row's V-element subvector to the array and returns the address of the
  best-matching word: the nearest centroid. PECAN-D (``l1``) sums per-cell absolute differences on the
  match line, with no multiplier; ``l2``/``cosine`` need a dot product per cell (counted as multiplies).
* **readout**: the match address selects one table row (M int8 entries) in an SRAM next to the array; the
  rows of the C codebooks are summed in int32.

The host CPU keeps everything else, including the one scale-and-bias multiply-add per output
(``float(acc) * scale + bias``, the dequantisation; counted separately as ``host_mul``).

Numerics: the simulator computes exactly what the x86 kernels compute, in numpy: the search uses
``pq.encode`` (L1: sub/abs/add in the kernel's order; L2/cosine: one correctly rounded FMA per element,
``pq.fma32``) and the readout ``pq.accumulate`` (exact int32). It is deterministic and bit-identical to
the x86 path (tests/test_cam.py).

Cost model (per layer and inference; ``CAMParams``, each default with its source):

* searches = rows * C; each compares K words of V cells: ``search_energy = searches * K * V * cell_bits *
  e_search_bit``, plus ``K * V`` cell products per search for l2/cosine at ``e_cell_mul`` (none for l1); codebooks sit in ``arrays`` parallel arrays, one search per array per cycle:
  ``search_cycles = rows * ceil(C / arrays) * cycles_per_search``;
* reads = rows * C table rows of M bytes: ``read_energy = reads * M * e_read_byte``,
  ``read_cycles = rows * C * ceil(M / read_bytes_per_cycle)`` (one SRAM port);
* adds = rows * C * M int32 additions: ``add_energy = adds * e_add``; they overlap the reads (an adder
  per read byte), so they add no cycles;
* cycles = search_cycles + read_cycles (searches and reads are not overlapped: a conservative model);
  time = cycles / clock.

The parameters are overridable (``CAMParams(**changes)``, ``--cam-param name=value`` on the command line, or a
JSON file named by ``$TVM_LUT_CAM_PARAMS``); the report records the values it used.
"""

from __future__ import annotations

import json
import math
import os
import threading
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import tvm_ffi

from tvm_lut.errors import OptionError
from tvm_lut.math import distances, pq

#: Where each default comes from. Energies are 45 nm CMOS figures; treat results as estimates to compare
#: layers and models with each other, not as a measurement of any chip.
SOURCES = {
    "e_search_bit_fj": "about 1 fJ per bit per search, the order of CMOS NOR-type CAM match-line search energy "
                       "(K. Pagiamtzis and A. Sheikholeslami, 'Content-addressable memory (CAM) circuits and "
                       "architectures: a tutorial and survey', IEEE JSSC 41(3):712-727, 2006)",
    "e_read_byte_pj": "10 pJ per 64-bit read of an 8 KB SRAM = 1.25 pJ/byte (M. Horowitz, 'Computing's energy "
                      "problem (and what we can do about it)', ISSCC 2014, 45 nm)",
    "e_add_pj": "0.1 pJ per 32-bit integer add (Horowitz, ISSCC 2014, 45 nm)",
    "e_mul_pj": "3.7 pJ per 32-bit float multiply (Horowitz, ISSCC 2014, 45 nm): the host's dequantisation",
    "e_cell_mul_pj": "0.2 pJ per 8-bit multiply (Horowitz, ISSCC 2014, 45 nm): the per-cell products an l2/cosine "
                     "search needs (PECAN-D's l1 search has none)",
    "cycles_per_search": "1: a CAM search completes in one clock cycle (Pagiamtzis and Sheikholeslami 2006)",
    "array_words": "64 words per array: a small array keeps the match lines short (Pagiamtzis and "
                   "Sheikholeslami 2006); K=16 centroids use 16 of them",
    "cell_bits": "8 bits per stored centroid element (int8, as PECAN's quantised prototypes)",
    "arrays": "16 arrays searched in parallel (one codebook each per cycle): a design choice, not a figure",
    "read_bytes_per_cycle": "64 bytes per SRAM read cycle (one cache line): a design choice",
    "clock_ghz": "1 GHz: a design choice",
}


@dataclass(frozen=True)
class CAMParams:
    """The simulated device. Defaults and their sources: ``SOURCES``."""

    arrays: int = 16
    array_words: int = 64
    cell_bits: int = 8
    cycles_per_search: int = 1
    read_bytes_per_cycle: int = 64
    clock_ghz: float = 1.0
    e_search_bit_fj: float = 1.0
    e_read_byte_pj: float = 1.25
    e_add_pj: float = 0.1
    e_mul_pj: float = 3.7
    e_cell_mul_pj: float = 0.2

    def __post_init__(self):
        for f in fields(self):
            if not getattr(self, f.name) > 0:
                raise OptionError(f"CAM parameter {f.name}={getattr(self, f.name)!r} must be > 0")

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def with_overrides(self, changes: dict) -> "CAMParams":
        """A copy with ``{name: value}`` applied; unknown names and bad values raise ``OptionError``."""
        unknown = sorted(set(changes) - set(self.names()))
        if unknown:
            raise OptionError(f"unknown CAM parameter(s) {unknown}; known: {', '.join(self.names())}")
        typed = {}
        for f in fields(self):
            if f.name in changes:
                try:
                    typed[f.name] = type(getattr(self, f.name))(changes[f.name])
                except (TypeError, ValueError):
                    raise OptionError(f"CAM parameter {f.name}={changes[f.name]!r}: expected a number") from None
        return replace(self, **typed)

    @classmethod
    def from_env(cls) -> "CAMParams":
        """Defaults, overridden by the JSON object in the file ``$TVM_LUT_CAM_PARAMS`` if set."""
        path = os.environ.get("TVM_LUT_CAM_PARAMS")
        if not path:
            return cls()
        try:
            with open(path) as f:
                changes = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise OptionError(f"$TVM_LUT_CAM_PARAMS={path}: not a readable JSON file ({exc})") from None
        if not isinstance(changes, dict):
            raise OptionError(f"$TVM_LUT_CAM_PARAMS={path}: expected a JSON object of parameter: value")
        return cls().with_overrides(changes)

    @staticmethod
    def parse_cli(specs: list[str]) -> dict:
        """``["arrays=32", "clock_ghz=0.5"]`` -> {name: value}."""
        out = {}
        for spec in specs:
            name, eq, value = spec.partition("=")
            if not eq:
                raise OptionError(f"--cam-param {spec!r}: expected NAME=VALUE (names: {', '.join(CAMParams.names())})")
            out[name.strip()] = value.strip()
        return out


def layer_cost(rows: int, c: int, k: int, v: int, m: int, distance: str, params: CAMParams) -> dict:
    """Searches, reads, adds, multiplies, cycles and energy of one PQ layer for one run of ``rows`` rows."""
    if k > params.array_words:
        raise OptionError(f"K={k} centroids do not fit a CAM array of {params.array_words} words")
    searches = rows * c
    reads = rows * c
    adds = rows * c * m
    cam_mul = distances.get(distance).cam_multiplies(searches, k, v)  # a dot product per cell; PECAN-D has none
    search_cycles = rows * math.ceil(c / params.arrays) * params.cycles_per_search
    read_cycles = rows * c * math.ceil(m / params.read_bytes_per_cycle)
    e_search = searches * k * v * params.cell_bits * params.e_search_bit_fj * 1e-15
    e_read = reads * m * params.e_read_byte_pj * 1e-12
    e_add = adds * params.e_add_pj * 1e-12
    e_mul = cam_mul * params.e_cell_mul_pj * 1e-12
    host_mul = rows * m  # the dequantisation FMA per output, on the host CPU
    cycles = search_cycles + read_cycles
    return {
        "searches": searches, "reads": reads, "adds": adds, "cam_mul": cam_mul, "host_mul": host_mul,
        "search_cycles": search_cycles, "read_cycles": read_cycles, "cycles": cycles,
        "time_us": cycles / (params.clock_ghz * 1e3),
        "energy_nj": (e_search + e_mul + e_read + e_add) * 1e9,
        "host_energy_nj": host_mul * params.e_mul_pj * 1e-3,
        "energy_split_nj": {"search": e_search * 1e9, "search_mul": e_mul * 1e9, "read": e_read * 1e9,
                            "add": e_add * 1e9},
        "arrays_used": math.ceil(c * k / params.array_words),
        # more arrays than the device has: the codebooks are taken as resident anyway (reloading is not modeled)
        "resident": math.ceil(c * k / params.array_words) <= params.arrays,
    }


def model_report(layers: list[dict], params: CAMParams) -> dict:
    """Per-layer CAM costs of a LUTify pass's records (PQ layers only) and their totals."""
    per_layer = []
    for r in layers:
        if r.get("method") != "pq":
            continue
        cost = layer_cost(r["rows"], r["c"], r["k"], r["v"], r["m"], r["distance"], params)
        per_layer.append({"layer": r["name"], "distance": r["distance"], **cost})
    keys = ("searches", "reads", "adds", "cam_mul", "host_mul", "cycles", "time_us", "energy_nj", "host_energy_nj")
    total = {k: sum(l[k] for l in per_layer) for k in keys}
    return {"params": asdict(params), "sources": SOURCES, "layers": per_layer, "total": total}


# ----------------------------------------------------------------------------------------------
# The device functions the compiled model calls (by name, at run time: R.call_dps_packed)
# ----------------------------------------------------------------------------------------------

SEARCH_FUNC = "tvm_lut.targets.cam_simulator.search"
READOUT_FUNC = "tvm_lut.targets.cam_simulator.readout"

_lock = threading.Lock()
#: run-time counters per layer: {"searches", "reads", "adds"}; ``reset_counters`` clears them
COUNTERS: dict[str, dict[str, int]] = {}


def reset_counters() -> None:
    with _lock:
        COUNTERS.clear()


def _count(layer: str, **incs: int) -> None:
    with _lock:
        c = COUNTERS.setdefault(layer, {"searches": 0, "reads": 0, "adds": 0})
        for k, v in incs.items():
            c[k] += v


def search(x: np.ndarray, centroids_t: np.ndarray, offsets: np.ndarray, distance: str, row_stride: int) -> np.ndarray:
    """Nearest-centroid search of rows (N, C*V) against (C, V, K) stored centroids -> table row addresses
    ((c*K + code) * row_stride), what the x86 encoder emits."""
    enc = np.ascontiguousarray(centroids_t.transpose(0, 2, 1))
    codes = pq.encode(x, enc, offsets, distance)
    return pq.row_offsets(codes, enc.shape[1], row_stride)


def readout(addresses: np.ndarray, tables_flat: np.ndarray, m: int) -> np.ndarray:
    """Sum of the addressed table rows: (N, C) addresses into the flat (C*K*M,) int8 tables -> (N, M) int32."""
    rows = tables_flat.reshape(-1, m)[addresses // m]  # (N, C, M)
    return rows.astype(np.int32).sum(axis=1, dtype=np.int32)


@tvm_ffi.register_global_func(SEARCH_FUNC, override=True)
def _search_packed(x, centroids_t, offsets, distance, row_stride, layer, out):
    xs = x.numpy()
    res = search(xs, centroids_t.numpy(), offsets.numpy(), str(distance), int(row_stride))
    _count(str(layer), searches=int(res.size))
    out.copyfrom(res)


@tvm_ffi.register_global_func(READOUT_FUNC, override=True)
def _readout_packed(addresses, tables_flat, m, layer, out):
    addr = addresses.numpy()
    res = readout(addr, tables_flat.numpy(), int(m))
    _count(str(layer), reads=int(addr.size), adds=int(addr.size) * int(m))
    out.copyfrom(res)
