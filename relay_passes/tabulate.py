"""TabulateSubnetworks: replace per-pixel subnetworks of a few quantized inputs by lookup tables (SR-LUT, HKLUT).

A subnetwork whose receptive field is ``n`` pixels, each of which takes one of ``levels`` values, computes a
function with ``levels ** n`` possible inputs: it can be replaced *whole* by a table of its outputs. HKLUT's
branches are such subnetworks (2 or 3 pixels of a 4-bit plane, 16 levels each: 256 or 4,096 entries).

What the pass looks for in ``main`` (``_find``): a chain that starts at a 1x1 ``conv2d`` reading at most
``max_inputs`` channels and continues through per-pixel ops (1x1 convs, bias adds and scalings by weights,
ReLU, tanh, sigmoid, clip, floor, round) whose values have no other user; then, optionally, layout-only ops
(``reshape``, ``permute_dims``: a pixel shuffle) followed by elementwise ops with scalar constants (the
network's ``floor(127 * y)`` to int8). Elementwise ops commute with the layout, so the table stores them
too, and the layout ops run on the table's output.

Which inputs are quantized is measured, not assumed: the model runs on the ``calibration`` inputs (with
TVM) and the values each chain input takes are collected. A channel whose values are all multiples
``k * step`` with ``0 <= k < levels`` is quantized (the step is the smallest gap between the values seen:
calibrate on data that shows neighbouring levels, a ramp image for pixels). A chain with an input that is not
stays as it is, with the reason in its record.

Each distinct chain (its weights and ops; HKLUT's four rotations of a unit are one) is then evaluated **with
TVM** on all ``levels ** n`` inputs: a Relax function of the chain's ops, compiled for the host, run once.
Outputs that are integers within int8 are stored exactly (scale 1); others as affine int8 (scale and offset
from their range, the largest error in the record). The chain is replaced by ``call_tir`` of the lookup
kernel (``tir_schedules.table_lookup``) with the table as a module constant. The records (``records(mod)``,
the ``tvm_lut.tables`` attribute): each table's name (its first weight's), inputs, levels, steps, outputs per
entry, entries, bytes, uses, whether exact; ``total_bytes`` sums the distinct tables.
"""

from __future__ import annotations

import heapq
import json
import logging
import re
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from tir_schedules import table_lookup
from tvm_lut.errors import OptionError
from tvm_lut.frontend import graph
from tvm_lut.runtime import calibrate
from tvm_lut.runtime.build import BatchRunner, bind_params, resolve_target

log = logging.getLogger("tvm_lut")

TABLES_ATTR = "tvm_lut.tables"

PER_PIXEL_UNARY = {"relax.nn.relu", "relax.tanh", "relax.sigmoid", "relax.clip", "relax.floor", "relax.round",
                   "relax.nn.leakyrelu", "relax.nn.gelu", "relax.nn.silu", "relax.negative"}
BINARY = {"relax.add", "relax.subtract", "relax.multiply", "relax.divide"}
LAYOUT = {"relax.reshape", "relax.permute_dims"}


@dataclass
class Chain:
    """One subnetwork found in ``main``: its input, its bindings and the value that leaves it."""

    input: relax.Var
    ops: list  # chain vars, in order (per-pixel, on the input's (B, n, H, W) layout)
    layout: list  # layout vars after the chain (the lookup's output goes through them)
    tail: list  # elementwise vars after the layout, evaluated into the table
    output: relax.Var  # the var whose users read the subnetwork's result
    weights: list  # names of the weight parameters the chain reads
    key: tuple = ()  # what makes two chains one table (``_structure``)


def _op(value) -> str:
    return value.op.name if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) else ""


def _shape(expr) -> tuple:
    return tuple(int(d) for d in expr.ty.shape)


class _Graph:
    """``main``'s bindings, users and constant-like values (weights, constants, ops on them only)."""

    def __init__(self, func: relax.Function):
        self.bindings, self.users = graph.uses(func)
        self.vars = list(self.bindings)
        self.order = {v: i for i, v in enumerate(self.vars)}
        self.weights = {p: p.name for p in func.params[graph.num_inputs(func):]}
        self._const: dict = {}

    def const_like(self, expr) -> bool:
        if isinstance(expr, (tvm.ir.Constant, relax.ShapeExpr)):
            return True
        if not isinstance(expr, relax.Var):
            return False
        if expr in self.weights:
            return True
        if expr not in self._const:
            value = self.bindings.get(expr)
            self._const[expr] = isinstance(value, relax.Call) and all(self.const_like(a) for a in value.args)
        return self._const[expr]

    def weight_names(self, expr, out: list) -> None:
        if isinstance(expr, relax.Var):
            if expr in self.weights:
                out.append(self.weights[expr])
            elif isinstance(self.bindings.get(expr), relax.Call):
                for a in self.bindings[expr].args:
                    self.weight_names(a, out)

    def sole_user(self, var):
        users = self.users.get(var, [])
        return users[0] if len(users) == 1 and users[0] is not None else None


def _is_pointwise_conv(value, g: _Graph, max_inputs: int | None) -> bool:
    if _op(value) != "relax.nn.conv2d" or not g.const_like(value.args[1]):
        return False
    a = value.attrs
    w = _shape(value.args[1])
    if (w[2], w[3]) != (1, 1) or int(a.groups) != 1 or str(a.data_layout) != "NCHW" \
            or str(a.kernel_layout) != "OIHW" or any(int(s) != 1 for s in a.strides) \
            or any(int(p) != 0 for p in a.padding):
        return False
    return max_inputs is None or _shape(value.args[0])[1] <= max_inputs


def _scalar(expr) -> float | None:
    if isinstance(expr, tvm.ir.GenericConst) and isinstance(expr.ty, relax.TensorType) and \
            expr.value.numpy().size == 1:
        return float(expr.value.numpy().reshape(()))
    return None


def _per_pixel(value, cur, g: _Graph) -> bool:
    """``value`` applies the same map at every pixel to ``cur`` (channel-wise weights allowed)."""
    op = _op(value)
    if op in PER_PIXEL_UNARY:
        return value.args[0].same_as(cur)
    if op == "relax.nn.conv2d":
        return value.args[0].same_as(cur) and _is_pointwise_conv(value, g, None)
    if op in BINARY:
        a, b = value.args
        other = b if a.same_as(cur) else a if b.same_as(cur) else None
        if other is None or not g.const_like(other):
            return False
        shape = _shape(other)
        return len(shape) <= 1 and (not shape or shape[0] == 1) or \
            (len(shape) == 4 and shape[0] == 1 and shape[2] == 1 and shape[3] == 1)
    return False


def _identity(value) -> bool:
    """Adding 0 or multiplying by 1 (a sum's start, say): left in the graph, so shared units stay one table."""
    op = _op(value)
    s = _scalar(value.args[1]) if op in BINARY else None
    return (op in ("relax.add", "relax.subtract") and s == 0.0) or (op in ("relax.multiply", "relax.divide")
                                                                      and s == 1.0)


def _tail(start, g: _Graph) -> tuple[list, relax.Var]:
    """Elementwise ops with scalar constants after ``start`` (their other inputs inside): (vars, the one
    that leaves them). Nothing when more than one value leaves.

    Walks forward along users only, in binding order (a heap of candidates), so finding every chain's
    tail costs the size of the tails, not chains x bindings."""
    inside, tail = {start}, []
    heap = sorted({g.order[u] for u in g.users.get(start, []) if u is not None})  # binding indices
    seen = set()
    while heap:
        i = heapq.heappop(heap)
        if i in seen:
            continue
        seen.add(i)
        var = g.vars[i]
        value = g.bindings[var]
        op = _op(value)
        if op in PER_PIXEL_UNARY and value.args[0] in inside:
            pass
        elif op in BINARY and any(a in inside for a in value.args) and not _identity(value) and \
                all(a in inside or _scalar(a) is not None for a in value.args):
            pass
        else:
            continue
        inside.add(var)
        tail.append(var)
        for u in g.users.get(var, []):
            if u is not None and g.order[u] not in seen:
                heapq.heappush(heap, g.order[u])
    leaving = [v for v in [start, *tail] if any(u is None or u not in inside for u in g.users.get(v, []))]
    if len(leaving) != 1 or not tail:
        return [], start
    # keep only what the leaving value depends on
    need, stack = set(), [leaving[0]]
    while stack:
        v = stack.pop()
        if v in need or v is start:
            continue
        need.add(v)
        stack.extend(a for a in g.bindings[v].args if a in inside)
    return [v for v in tail if v in need], leaving[0]


def _find(func: relax.Function, max_inputs: int) -> tuple[list[Chain], "_Graph"]:
    g = _Graph(func)
    found = []
    for var, value in g.bindings.items():
        if not _is_pointwise_conv(value, g, max_inputs) or not isinstance(value.args[0], relax.Var):
            continue
        ops, cur = [var], var
        while True:
            nxt = g.sole_user(cur)
            if nxt is None or not _per_pixel(g.bindings[nxt], cur, g):
                break
            ops.append(nxt)
            cur = nxt
        layout, lcur = [], cur
        while (nxt := g.sole_user(lcur)) is not None and _op(g.bindings[nxt]) in LAYOUT:
            layout.append(nxt)
            lcur = nxt
        tail, output = _tail(lcur, g) if layout else ([], cur)
        if layout and not tail:
            layout, output = [], cur  # nothing elementwise after the layout: the chain ends before it
        names: list[str] = []
        for v in ops:
            for a in g.bindings[v].args[1:]:
                g.weight_names(a, names)
        found.append(Chain(value.args[0], ops, layout, tail, output, names))
    return found, g


def _chain_name(weights: list[str]) -> str:
    if not weights:
        return "subnet"
    return re.sub(r"[._]\d+[._]weight$|[._]weight$", "", weights[0])


def _structure(chain: Chain, g: _Graph) -> tuple:
    """What makes two chains the same function: ops, attributes, weights and scalar constants."""
    parts = []
    for v in [*chain.ops, *chain.tail]:
        value = g.bindings[v]
        consts = tuple(_scalar(a) for a in value.args if isinstance(a, tvm.ir.Constant))
        names: list[str] = []
        for a in value.args:
            g.weight_names(a, names)
        parts.append((_op(value), str(value.attrs) if value.attrs is not None else "", tuple(names), consts))
    return (_shape(chain.input)[1], tuple(parts))


def _steps(values: list[np.ndarray], levels: int) -> tuple[float, np.ndarray] | str:
    """(step, the value of each level) of one input channel from the values it took, or why it is not one
    of ``levels`` multiples of a step."""
    seen = np.unique(np.concatenate([v.reshape(-1) for v in values]).astype(np.float32))
    if len(seen) > levels:
        return f"takes {len(seen)} distinct values in calibration (more than {levels} levels)"
    if len(seen) < 2:
        return "takes a single value in calibration: its step cannot be measured"
    gaps = np.diff(np.concatenate([[0.0], seen.astype(np.float64)]))
    step = float(gaps[gaps > 0].min())
    k = seen / step
    if seen.min() < 0 or np.abs(k - np.rint(k)).max() > 1e-3 or np.rint(k).max() >= levels:
        return f"its values are not multiples k * step, 0 <= k < {levels} (step {step:.6g})"
    grid = np.float32(step) * np.arange(levels, dtype=np.float32)
    grid[np.rint(k).astype(int)] = seen  # the values the network really computes where seen
    return step, grid


def _table_function(chain: Chain, g: _Graph, grids: list[np.ndarray]) -> tuple[relax.Function, list, np.ndarray]:
    """The chain (and its tail) as a Relax function ``(x, *weights)`` of every input combination ``x``:
    (function, the weight vars it takes, x)."""
    n = len(grids)
    combos = np.stack(np.meshgrid(*grids, indexing="ij"), -1).reshape(-1, n).astype(np.float32)
    order = [*chain.ops, *chain.tail]
    used: list = []  # the weights the chain reads, directly or through constant-like bindings

    def collect(a):
        if not isinstance(a, relax.Var):
            return
        if a in g.weights:
            if not any(a.same_as(u) for u in used):
                used.append(a)
        elif a in g.bindings and g.const_like(a):
            for b in g.bindings[a].args:
                collect(b)

    for v in order:
        for a in g.bindings[v].args:
            collect(a)
    x = relax.Var("x", relax.TensorType((len(combos), n, 1, 1), "float32"))
    wvars = [relax.Var(w.name, w.ty) for w in used]
    mapping: dict = {chain.input: x, **dict(zip(used, wvars))}
    bb = relax.BlockBuilder()

    def arg(a):
        if a in mapping:
            return mapping[a]
        if isinstance(a, relax.Var):  # a constant-like binding (a bias reshaped, say)
            value = g.bindings[a]
            mapping[a] = bb.emit(relax.Call(value.op, [arg(b) for b in value.args], value.attrs, value.ty_args))
            return mapping[a]
        return a

    with bb.function("main", [x, *wvars]):
        for v in order:
            value = g.bindings[v]
            mapping[v] = bb.emit(relax.Call(value.op, [arg(a) for a in value.args], value.attrs, value.ty_args))
            if v is chain.ops[-1] and chain.layout:
                mapping[chain.layout[-1]] = mapping[v]  # the tail is elementwise: it runs before the layout
        bb.emit_func_output(mapping[order[-1]])
    return bb.get()["main"], used, combos


def _evaluate(jobs: list[tuple[relax.Function, list, np.ndarray]], params: dict, target) -> list[np.ndarray]:
    """Every table function compiled in one module (one LLVM run) and run once: [(levels^n, c)]."""
    mod = tvm.IRModule({f"table_{i}": func.with_attr("global_symbol", f"table_{i}") for i, (func, _, _) in enumerate(jobs)})
    vm = relax.VirtualMachine(tvm.compile(mod, resolve_target(target)), tvm.cpu())
    out = []
    for i, (_, used, combos) in enumerate(jobs):
        y = vm[f"table_{i}"](tvm.runtime.tensor(combos[:, :, None, None]),
                             *[tvm.runtime.tensor(params[w.name]) for w in used]).numpy()
        out.append(y.reshape(len(combos), -1))
    return out


def _quantize(values: np.ndarray) -> tuple[np.ndarray, float, float, float]:
    """(int8 table, scale, offset, largest error): exact when the values are int8 integers already."""
    v = values.astype(np.float64)
    if np.all(v == np.rint(v)) and v.min() >= -128 and v.max() <= 127:
        return v.astype(np.int8), 1.0, 0.0, 0.0
    lo, hi = float(v.min()), float(v.max())
    scale = (hi - lo) / 255 if hi > lo else 1.0
    q = np.clip(np.rint((v - lo) / scale) - 128, -128, 127).astype(np.int8)
    offset = lo + 128 * scale
    err = float(np.abs(q.astype(np.float64) * scale + offset - v).max())
    return q, scale, offset, err


@mutator
class _Replace(PyExprMutator):
    """Re-emits ``main`` with each tabulated chain's last op replaced by the lookup kernel's call, and the
    tail's leaving value by the layout ops' result."""

    def __init__(self, mod, chains: list[Chain], kernels: dict):
        super().__init__(mod)
        self.last = {c.ops[-1]: c for c in chains}
        self.leaving = {c.output: c for c in chains if c.tail}
        self.kernels = kernels
        self.layout_out: dict = {}

    def visit_var_binding_(self, binding):
        var = binding.var
        chain = self.last.get(var)
        if chain is not None:
            x = self.visit_expr(chain.input)
            gv, table, out_ty = self.kernels[id(chain)]
            self._rebind(var, relax.call_tir(gv, [x, table], out_ty=out_ty), "table_lookup")
            return
        if var in self.leaving:
            self._rebind(var, self.visit_expr(self.leaving[var].layout[-1]))
            return
        super().visit_var_binding_(binding)

    def _rebind(self, var, value, name: str = "") -> None:
        """``var``'s users read ``value`` from now on. A var that leaves the dataflow block (the model's
        output, when a table's result is what the model returns) stays a block output: remapped to a
        dataflow var, the block would return a value that does not exist outside it."""
        leaves_block = not isinstance(var, relax.DataflowVar) and self.builder_.current_block_is_dataflow()
        if leaves_block:
            new = self.builder_.emit_output(value, name)
        elif isinstance(value, relax.Var) and not name:
            new = value  # already bound: no new binding needed
        else:
            new = self.builder_.emit(value, name)
        self.set_var_remap(var, new)


@tvm.transform.module_pass(opt_level=0, name="TabulateSubnetworks")
class TabulateSubnetworks:
    """Replace per-pixel subnetworks of a few quantized inputs by int8 lookup tables (see the module doc).

    Parameters
    ----------
    calibration : model inputs the inputs' levels are measured on (for images, ones that show every level).
    levels : values each input may take (16: a 4-bit plane of HKLUT's MSB/LSB branches).
    max_inputs : the most input channels a tabulated subnetwork may read (4: 65,536 entries at 16 levels).
    target : where the subnetworks are evaluated (the host) and the kernels compiled for.
    """

    def __init__(self, calibration, *, levels: int = 16, max_inputs: int = 4, target="x86"):
        if not 2 <= int(levels) <= 256:
            raise OptionError(f"TabulateSubnetworks levels {levels} must be within [2, 256]")
        if int(levels) ** int(max_inputs) > 1 << 24:
            raise OptionError(f"{levels} levels over {max_inputs} inputs is {levels ** max_inputs} entries per "
                              "table; lower max_inputs")
        self.calibration = calibration
        self.levels = int(levels)
        self.max_inputs = int(max_inputs)
        self.target = target

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return self.run(mod).module

    def run(self, mod: tvm.IRModule) -> "TabulateResult":
        mod = relax.transform.DeadCodeElimination(["main"])(relax.transform.CanonicalizeBindings()(mod))
        func = mod["main"]
        chains, g = _find(func, self.max_inputs)
        if not chains:
            return TabulateResult(mod.with_attr(TABLES_ATTR, json.dumps({"tables": [], "total_bytes": 0})), [], {})
        params = graph.param_values(func)
        # the values every chain input takes, measured with TVM on the calibration inputs
        inputs = list({c.input: None for c in chains})
        signature = graph.input_signature(func)
        data = calibrate.normalize_inputs(self.calibration, signature)
        runner = BatchRunner(calibrate.compile_or_explain(
            lambda: tvm.compile(bind_params(calibrate.expose(mod, inputs)), resolve_target(self.target))),
            [], signature)
        seen: dict = {v: [] for v in inputs}
        for outs, valid in runner.run_batches(data):
            for v, x in zip(inputs, outs[1:]):
                seen[v].append(x[:valid])
        groups: dict[tuple, list[Chain]] = {}
        for c in chains:
            c.key = _structure(c, g)
            groups.setdefault(c.key, []).append(c)
        records, tables, tabulated, kernels, jobs = [], {}, [], {}, []
        names_used: dict[str, int] = {}
        for key, members in groups.items():
            first = members[0]
            name = _chain_name(first.weights)
            names_used[name] = names_used.get(name, 0) + 1
            if names_used[name] > 1:
                name = f"{name}#{names_used[name]}"
            n = _shape(first.input)[1]
            rec = {"name": name, "inputs": n, "uses": len(members), "weights": sorted(set(first.weights))}
            records.append(rec)
            grids = []
            for i in range(n):
                got = _steps([x[:, i] for m in members for x in seen[m.input]], self.levels)
                if isinstance(got, str):
                    rec["reason"] = f"input channel {i} {got}"
                    log.info("TabulateSubnetworks: %s kept: %s", name, rec["reason"])
                    break
                grids.append(got)
            else:
                jobs.append((rec, members, tuple(s for s, _ in grids), _table_function(first, g, [gr for _, gr in grids])))
        values_all = _evaluate([job for *_, job in jobs], params, self.target) if jobs else []
        for (rec, members, steps, _), values in zip(jobs, values_all):
            first = members[0]
            table, scale, offset, err = _quantize(values)
            c = values.shape[1]
            rec.update(levels=self.levels, steps=list(steps), outputs=c, entries=int(values.shape[0]),
                       bytes=int(table.nbytes), exact=err == 0.0, scale=scale, offset=offset, max_error=err,
                       ops=[_op(g.bindings[v]) for v in [*first.ops, *first.tail]])
            tables[rec["name"]] = table
            const = relax.const(table.reshape(-1))  # one constant, read by every use (4 rotations: 1 table)
            for m in members:
                shape = _shape(m.ops[-1])
                spec = (_shape(m.input), c, self.levels, steps, scale, offset)  # one kernel per distinct spec
                kernels[id(m)] = (spec, const, relax.TensorType(shape, "float32"))
                tabulated.append(m)
        rep = {"tables": records, "total_bytes": int(sum(r.get("bytes", 0) for r in records))}
        if not tabulated:
            return TabulateResult(mod.with_attr(TABLES_ATTR, json.dumps(rep)), records, tables)
        out = _rewrite(mod, tabulated, kernels)
        return TabulateResult(out.with_attr(TABLES_ATTR, json.dumps(rep)), records, tables)


def _rewrite(mod: tvm.IRModule, chains: list[Chain], kernels: dict) -> tvm.IRModule:
    m = _Replace(mod, chains, {})
    gvs: dict = {}
    for c in chains:
        spec, table, out_ty = kernels[id(c)]
        if spec not in gvs:
            prim = table_lookup.schedule(table_lookup.compute(*spec))
            gvs[spec] = m.builder_.add_func(prim.with_attr("global_symbol", f"table_lookup_{len(gvs)}"),
                                            f"table_lookup_{len(gvs)}")
        m.kernels[id(c)] = (gvs[spec], table, out_ty)
    new = m.visit_expr(mod["main"])
    out = m.builder_.get()
    out["main"] = new
    out = relax.transform.DeadCodeElimination(["main"])(out)
    return out


@dataclass
class TabulateResult:
    """A run's module (tables as constants), its records and the int8 tables by name."""

    module: tvm.IRModule
    records: list[dict]
    tables: dict[str, np.ndarray]

    @property
    def total_bytes(self) -> int:
        return int(sum(t.nbytes for t in self.tables.values()))


def records(mod: tvm.IRModule) -> dict:
    """``{"tables": [...], "total_bytes": ...}`` a TabulateSubnetworks run left on ``mod``."""
    if mod.attrs is None or TABLES_ATTR not in mod.attrs:
        return {"tables": [], "total_bytes": 0}
    return json.loads(str(mod.attrs[TABLES_ATTR]))
