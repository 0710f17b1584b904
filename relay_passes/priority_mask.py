"""PriorityMask: decide which layers stay exact so a LUT model meets an accuracy or compute budget (TabConv).

Not every layer tolerates table lookup equally: TabConv keeps the sensitive ones exact with a priority
mask. This pass measures each convertible layer's sensitivity on calibration data, then picks the set
of layers to convert:

1. The calibration data is split (seeded) into a *fit* part, on which every candidate layer's codebooks
   and tables are learned (one ``planning.Planner`` fit, all layers), and a *validation* part, never used for
   fitting, on which everything below is measured.
2. Per layer: the **similarity** of the LUT layer's output to the exact layer's output on the layer's
   own validation inputs (cosine similarity, and the relative error ``||y_lut - y|| / ||y||``), and,
   when labels are given, the **accuracy drop when that layer alone is converted**. Every such
   evaluation runs one build (``lutify.switchable``) holding each candidate's lookup and exact paths,
   with a run-time switch per layer: one compile for the whole analysis, not one per evaluation.
   Its **gain** (``rank="latency"``) is the time its lookup saves, measured on the target:
   the layer alone, exact, compiled as the model compiles it, against its lookup kernels timed in that
   same switchable build (``latency``); layers whose lookup runs no faster are never candidates, whatever
   multiplies it removes (a lookup's tables can outweigh the weights it replaces). With
   ``rank="multiplies"`` (the default) the gain is the multiplies it removes (exact minus lookup count,
   ``tvm_lut.math.cost``), nothing is timed, and layers whose lookup removes none are never candidates.
3. Layers are ranked by sensitivity per unit of gain (accuracy drop alone, clamped at zero, plus
   ``1 - similarity`` as a tie-breaker; without labels, ``1 - similarity``), least sensitive first, and a
   prefix of that ranking is converted:

   * ``max-drop=P`` (needs labels): the longest prefix whose measured validation drop, plus a margin of
     ``MARGIN_Z`` = 2 standard errors of that paired difference (``drop_margin``: ``2 * 100 * sqrt(flips)
     / n``, flips = validation samples whose correctness changes), stays within P points; found by binary
     search over the prefix length. Two, not one: the search tries several prefixes of a ranking learned
     on the same rows and keeps the longest that passes, so it picks the lucky ones. With one standard
     error a ResNet-18 mask validated on 307 images promised -0.33 (+1.08) and lost 2.06 points on the
     10,000 test images.
   * ``min-removed=F``: the shortest prefix removing at least a fraction F of the model's multiplies
     (an error names the reachable maximum when F is out of reach); its validation drop is reported.
   * ``max-disagree=P`` (no labels needed): as ``max-drop``, with the exact model's own top-1 on the
     validation part as the labels, so the "drop" is the share of samples whose top-1 the LUT model
     changes: at least ``100 - P`` % top-1 agreement with the exact model (less the same margin).

The decision and the scores go into the module attribute ``"tvm_lut.priority_mask"`` (JSON), which
``LUTify`` obeys (masked layers stay exact, the others are converted even when narrow); per-layer scores
appear in ``tvm-lut report``. ``LUTify(budget=...)`` runs this pass first and reuses its fitted layers.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass

import numpy as np
import tvm

from tvm_lut.errors import CalibrationError, OptionError
from tvm_lut.frontend import graph
from tvm_lut.runtime import calibrate
from tvm_lut.runtime.build import BatchRunner, compile_with_params, resolve_target

from . import latency
from .planning import Planner, check_exact
from .rewrite import MASK_ATTR, switchable

log = logging.getLogger("tvm_lut")

MARGIN_Z = 2.0  # standard errors of the validation drop that a max-drop budget must also hold


def drop_margin(flips: int, n: int) -> float:
    """What a budget adds to a validation drop measured on ``n`` samples of which ``flips`` changed
    correctness: ``MARGIN_Z`` standard errors of the paired difference, in points."""
    return MARGIN_Z * 100.0 * math.sqrt(flips) / n


@dataclass(frozen=True)
class Budget:
    """``max-drop`` (accuracy points), ``max-disagree`` (points of top-1 agreement with the exact model)
    or ``min-removed`` (fraction of multiplies, 0..1)."""

    kind: str
    value: float

    @classmethod
    def parse(cls, spec) -> "Budget":
        if isinstance(spec, Budget):
            return spec
        m = re.fullmatch(r"\s*(max-drop|max-disagree|min-removed)\s*=\s*([0-9.eE+-]+)\s*", str(spec))
        if not m:
            raise OptionError(f"budget {spec!r}: expected max-drop=POINTS (e.g. max-drop=2.0), "
                              "max-disagree=POINTS (e.g. max-disagree=1) or min-removed=FRACTION (e.g. min-removed=0.6)")
        kind, value = m.group(1), float(m.group(2))
        if kind in ("max-drop", "max-disagree") and not (0 <= value <= 100):
            raise OptionError(f"budget {spec!r}: {kind} is in points, 0..100")
        if kind == "min-removed" and not (0 < value <= 1):
            raise OptionError(f"budget {spec!r}: min-removed is a fraction of multiplies in (0, 1]")
        return cls(kind, value)

    def __str__(self) -> str:
        return f"{self.kind}={self.value:g}"


def _labels_of(calibration, labels):
    if labels is not None:
        return np.asarray(labels).reshape(-1)
    if hasattr(calibration, "files") or isinstance(calibration, dict):
        keys = calibration.files if hasattr(calibration, "files") else list(calibration)
        if "labels" in keys:
            return np.asarray(calibration["labels"]).reshape(-1)
    return None


def _top1(runner: BatchRunner, inputs) -> np.ndarray:
    logits = runner.run(inputs)[0]
    return logits.reshape(len(logits), -1).argmax(-1)


@dataclass(frozen=True)
class MaskResult:
    """What one PriorityMask run produced."""

    module: tvm.IRModule  # the module marked with the decision (``MASK_ATTR``), for LUTify to obey
    result: dict  # the decision: converted and kept layers, the measurements behind it
    pq_layers: dict  # the fitted layers chosen for conversion (LUTify(budget=) reuses them)
    fitted: dict  # every fitted candidate layer


@tvm.transform.module_pass(opt_level=0, name="PriorityMask")
class PriorityMask:
    """Choose which layers stay exact to meet ``budget``; see the module docstring.

    Parameters
    ----------
    calibration : model inputs (as for ``LUTify``), optionally with a ``labels`` array.
    budget : ``"max-drop=2.0"`` (accuracy points; needs labels) or ``"min-removed=0.6"``.
    labels : class labels of the calibration samples (instead of a ``labels`` entry).
    validation : fraction of the calibration samples held out for the measurements, at most
        ``max_validation`` (each accuracy measurement runs the compiled model on all of them).
    rank : ``"latency"``: gain is the measured time a layer's lookup saves on ``target`` (a few seconds of
        compiling and timing per distinct layer shape); ``"multiplies"`` (default): the multiplies it
        removes (nothing timed; blind to table traffic and encoder cost).
    exact : how the layers kept exact will run (``LUTify(exact=)``): with ``"int8"`` a lookup's gain is
        measured against the layer's int8 kernel where it applies, not its fp32 conv.
    lutify_options : passed to the ``planning.Planner`` fit (``k``, ``v``, ``distance``, ``layers``, ``codebooks``...).
    """

    RANKS = ("latency", "multiplies")

    def __init__(self, calibration, budget, *, labels=None, validation: float = 0.3, max_validation: int = 512,
                 seed: int = 0, target="x86", progress: bool = True, rank: str = "multiplies", exact: str = "fp32",
                 **lutify_options):
        if rank not in self.RANKS:
            raise OptionError(f"rank {rank!r}: expected one of {', '.join(self.RANKS)}")
        check_exact(exact)
        self.rank = rank
        self.exact = exact
        self.calibration = calibration
        self.budget = Budget.parse(budget)
        self.labels = labels
        self.validation = validation
        self.max_validation = max_validation
        self.seed = seed
        self.target = target
        self.progress = progress
        self.lutify_options = lutify_options

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return self.run(mod).module

    def run(self, mod: tvm.IRModule) -> MaskResult:
        """The pass, returning the marked module with the decision and the fitted layers."""
        state = self._analyse(mod)
        result = self._choose(state, self.budget)
        return MaskResult(mod.with_attr(MASK_ATTR, json.dumps(result)), result,
                          {nm: state["plans"][nm].pq_layer for nm in result["converted"]},
                          {nm: p.pq_layer for nm, p in state["plans"].items()})

    def sweep(self, mod: tvm.IRModule, budgets) -> tuple[list[dict], dict]:
        """The decision for each of several budgets from one analysis (a Pareto sweep): the fit and the
        per-layer measurements are shared, only the prefix search runs per budget. Returns the decisions
        and every fitted candidate layer (for ``LUTify(fitted=...)``)."""
        state = self._analyse(mod)
        return [self._choose(state, Budget.parse(b)) for b in budgets], \
            {nm: p.pq_layer for nm, p in state["plans"].items()}

    def _analyse(self, mod: tvm.IRModule) -> dict:
        """Fit all candidates, measure per-layer sensitivity, rank; everything a budget choice needs."""
        from tqdm import tqdm


        tgt = resolve_target(self.target)
        signature = graph.input_signature(mod["main"])
        inputs = calibrate.normalize_inputs(self.calibration, signature)
        n = len(next(iter(inputs.values())))
        labels = _labels_of(self.calibration, self.labels)
        if labels is not None and len(labels) != n:
            raise CalibrationError(f"labels has {len(labels)} entries but the calibration inputs have {n} samples")
        if labels is None and (self.budget.kind == "max-drop"):
            raise CalibrationError(f"budget {self.budget} needs labels: add a 'labels' array to the calibration "
                                   "data (or use min-removed=FRACTION)")
        n_val = min(int(round(n * self.validation)), self.max_validation)
        if n_val < 1 or n - n_val < 1:
            raise CalibrationError(f"cannot hold {self.validation:.0%} of {n} calibration samples for validation")
        perm = np.random.default_rng(self.seed).permutation(n)
        val_idx, fit_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        fit_in = {k: v[fit_idx] for k, v in inputs.items()}
        val_in = {k: v[val_idx] for k, v in inputs.items()}
        val_y = None if labels is None else labels[val_idx]

        # 1. fit every candidate layer once
        fitted = Planner(fit_in, all_layers=True, seed=self.seed, target=tgt, progress=self.progress,
                         **self.lutify_options).plan(mod)
        plans = {p.layer.name: p for p in fitted if p.method == "pq"}
        records = {p.layer.name: p.record for p in fitted}
        total_mul = sum(r["exact_ops"]["mul"] for r in records.values() if "exact_ops" in r)
        mul_gain = {name: records[name]["exact_ops"]["mul"] - records[name]["lut_ops"]["mul"] for name in plans}

        # 2. per-layer sensitivity on the validation part
        val_rows = calibrate.collect(mod, [p.layer for p in plans.values()], val_in, target=tgt,
                                     seed=self.seed, progress=False)
        scores: dict[str, dict] = {}
        for name, p in plans.items():
            rows = val_rows[name]
            exact = rows.astype(np.float64) @ p.layer.weight.astype(np.float64)
            if p.layer.bias is not None:
                exact = exact + p.layer.bias
            lut = p.pq_layer.emulate(rows).astype(np.float64)
            denom = np.linalg.norm(exact) or 1.0
            cos = float((exact * lut).sum() / (denom * (np.linalg.norm(lut) or 1.0)))
            scores[name] = {"similarity": cos, "rel_error": float(np.linalg.norm(lut - exact) / denom),
                            "mul_removed": int(mul_gain[name]), "mul_removed_frac": mul_gain[name] / total_mul}
        timed = self.rank == "latency"
        labelled = val_y is not None or self.budget.kind == "max-disagree"
        calls: dict = {}
        runner = ex = None
        if plans and (labelled or timed):
            # one compile: every fitted layer's lookup and exact paths, picked per run by the switch parameter
            order_all = list(plans)
            slot = {nm: i for i, nm in enumerate(order_all)}
            ex, params = compile_with_params(switchable(mod, [plans[nm] for nm in order_all], calls), tgt)
            runner = BatchRunner(ex, [v for _, v in params], signature)
        if timed:
            gain = self._time_saved(plans, scores, ex, calls, tgt)
            total = sum(scores[nm]["exact_ms"] for nm in plans) or 1.0
            for nm in plans:
                scores[nm]["ms_saved_frac"] = gain[nm] / total
            frac = {nm: scores[nm]["ms_saved_frac"] for nm in plans}
        else:
            gain, frac = mul_gain, {nm: scores[nm]["mul_removed_frac"] for nm in plans}
        candidates = [nm for nm in plans if gain[nm] > 0]
        base_pred = None
        cache: dict[tuple, tuple[float, int]] = {}
        if labelled:

            def predict(names: tuple[str, ...]) -> np.ndarray:
                if runner is not None:
                    on = np.zeros(len(slot), bool)
                    on[[slot[nm] for nm in names]] = True
                    runner.params[-1] = tvm.runtime.tensor(on, runner.device)
                    return _top1(runner, val_in)
                ex0, params0 = compile_with_params(mod, tgt)  # nothing fitted: the exact model
                return _top1(BatchRunner(ex0, [v for _, v in params0], signature), val_in)

            base_pred = predict(())
            if self.budget.kind == "max-disagree":  # the exact model's top-1 is the reference
                val_y = base_pred
            base_acc = float((base_pred == val_y).mean() * 100)

        def evaluate(names: tuple[str, ...]) -> tuple[float, int]:
            """(validation accuracy drop in points, flips) with exactly ``names`` converted."""
            if names not in cache:
                pred = predict(names)
                ok_b, ok_l = base_pred == val_y, pred == val_y
                cache[names] = (base_acc - float(ok_l.mean() * 100), int((ok_b != ok_l).sum()))
            return cache[names]

        if val_y is not None:
            for name in tqdm(candidates, desc="layer sensitivity", unit="layer",
                             disable=None if self.progress else True, leave=False):
                scores[name]["drop_alone"], scores[name]["flips_alone"] = evaluate((name,))

        def sensitivity(nm: str) -> float:
            s = 1.0 - scores[nm]["similarity"]
            if "drop_alone" in scores[nm]:
                s += max(scores[nm]["drop_alone"], 0.0)
            return s / max(frac[nm], 1e-12)

        order = sorted(candidates, key=sensitivity)
        for rank, nm in enumerate(order):
            scores[nm]["rank"] = rank
        removed = np.cumsum([0] + [mul_gain[nm] for nm in order]) / total_mul  # removed[i]: first i layers
        return {"plans": plans, "records": records, "scores": scores, "order": order, "removed": removed,
                "gain": gain, "timed": timed, "evaluate": evaluate, "cache": cache, "labelled": val_y is not None,
                "base_acc": base_acc if val_y is not None else None, "val_n": len(val_idx), "fit_n": len(fit_idx),
                "reference": "exact-top1" if self.budget.kind == "max-disagree" else "labels"}

    def _time_saved(self, plans: dict, scores: dict, executable, calls: dict, tgt) -> dict[str, float]:
        """Per fitted layer: the exact layer's time alone (compiled as the model is; one measurement per
        shape) minus its lookup kernels' time in the switchable build (ms), into ``scores`` too."""
        from tqdm import tqdm

        exact_cache: dict = {}
        saved = {}
        for nm, p in tqdm(plans.items(), desc="layer latency", unit="layer",
                          disable=None if self.progress else True, leave=False):
            exact_ms = latency.exact_latency_ms(p.layer, tgt, exact_cache, self.exact)
            lookup_ms, _ = latency.rewrite_latency_ms(p, tgt, executable, calls.get(nm))
            scores[nm].update(exact_ms=exact_ms, lookup_ms=lookup_ms, ms_saved=exact_ms - lookup_ms)
            saved[nm] = exact_ms - lookup_ms
        return saved

    def _choose(self, state: dict, budget: Budget) -> dict:
        """The prefix of the ranking to convert under ``budget`` (see the module docstring)."""
        order, removed, evaluate, val_n = state["order"], state["removed"], state["evaluate"], state["val_n"]
        plans, gain = state["plans"], state["gain"]
        scores = {nm: dict(sc) for nm, sc in state["scores"].items()}
        if budget.kind in ("max-drop", "max-disagree") and not state["labelled"]:
            raise CalibrationError(f"budget {budget} needs labels: add a 'labels' array to the calibration data")
        if budget.kind == "min-removed":  # (max-drop and max-disagree: the same search on their labels)
            reach = [i for i in range(len(order) + 1) if removed[i] >= budget.value - 1e-12]
            if not reach:
                raise OptionError(f"budget {budget} cannot be met: converting every candidate layer removes "
                                  f"{removed[-1]:.1%} of the multiplies")
            chosen = reach[0]
        else:
            def fits(i: int) -> bool:
                if i == 0:
                    return True
                drop, flips = evaluate(tuple(order[:i]))
                return drop + drop_margin(flips, val_n) <= budget.value

            lo, hi = 0, len(order)  # invariant: fits(lo); find the largest fitting prefix
            if fits(hi):
                lo = hi
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if fits(mid):
                    lo = mid
                else:
                    hi = mid
            chosen = lo
        convert = set(order[:chosen])
        result = {"budget": str(budget), "validation_samples": int(val_n), "fit_samples": int(state["fit_n"]),
                  "rank": "latency" if state["timed"] else "multiplies",
                  "candidates": order, "converted": [nm for nm in order if nm in convert],
                  "mul_removed_frac": float(removed[chosen])}
        if state["timed"]:  # the layers' measured savings, summed: an estimate of the model's
            result["ms_saved"] = float(sum(gain[nm] for nm in convert))
        if state["labelled"]:
            drop, flips = evaluate(tuple(order[:chosen])) if chosen else (0.0, 0)
            result.update(val_exact_acc=state["base_acc"], val_drop=drop,
                          val_drop_margin=drop_margin(flips, val_n))
            if state["reference"] == "exact-top1":
                result["val_reference"] = "exact model's top-1"
        result["compiles"] = int(state["labelled"] or state["timed"])  # one switchable build serves all runs
        result["evaluations"] = len(state["cache"]) + state["labelled"]
        decision = {}
        for name in state["records"]:
            if name in convert:
                decision[name] = "pq"
            elif name in plans:
                decision[name] = "exact"
                if gain[name] > 0:
                    scores[name]["why"] = f"kept exact to meet {budget}"
                elif state["timed"]:
                    sc = scores[name]
                    sc["why"] = (f"lookup runs no faster than the exact layer ({sc['lookup_ms']:.3f} vs "
                                 f"{sc['exact_ms']:.3f} ms)")
                else:
                    scores[name]["why"] = "lookup removes no multiplies"
        result["decision"] = decision
        result["scores"] = scores
        log.info("priority mask (%s): converting %d of %d candidate layers, %.1f%% multiplies removed",
                 budget, len(convert), len(order), 100 * removed[chosen])
        return result
