"""``tvm-lut report``: the per-layer table of methods, operations and storage, exact vs lookup.

Operation counts are per input sample and follow the rules in ``tvm_lut.math.cost`` (printed under the
table), so each figure can be checked by hand.
"""

from __future__ import annotations

from relay_passes.latency import layer_time
from tvm_lut.app.pipeline import layer_params
from tvm_lut.errors import LUTError


def _method_columns(r: dict) -> str:
    """What the layer's rewrite method says of it (``RewriteMethod.columns``); empty for a method this
    process does not have registered (a report read back from another one)."""
    from relay_passes import registry

    try:
        return registry.get(r["method"]).columns(r)
    except LUTError:
        return ""


def _fmt(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def format_report(report: dict, exact_counts: bool = False) -> str:
    """The report as a plain-text table (``exact_counts`` prints integers instead of k/M/G)."""
    num = (lambda n: str(int(n))) if exact_counts else _fmt
    head = ("layer", "kind", "method", "K", "V", "C", "dist", "params", "mul exact", "mul LUT", "add exact",
            "add LUT", "cmp LUT", "weight B", "table B", "codebk B", "ms (share)", "note")
    times = {r["name"]: layer_time(r) for r in report["layers"]}
    total_ms = sum(t for t in times.values() if t is not None)
    rows = []
    for r in report["layers"]:
        pqm = r["method"] == "pq"
        ex = r.get("exact_ops", {})
        lut = r.get("lut_ops", ex) if r["method"] != "exact" else ex
        t_ms = times[r["name"]]
        timing = f"{t_ms:.3f} ({t_ms / total_ms:.0%})" if t_ms is not None and total_ms else "-"
        note = r.get("reason", "")
        if r["method"] not in ("pq", "exact"):  # a method's own summary (butterfly: its chain; lowrank: ranks)
            note = _method_columns(r) or note
        if r.get("slower_than_exact"):
            lat = r["latency"]
            note = f"SLOWER than exact ({lat['rewrite_ms']:.3f} vs {lat['exact_ms']:.3f} ms); " + note
        rows.append((
            r["name"], r["kind"], r["method"],
            str(r.get("k", "")) if pqm else "", str(r.get("v", "")) if pqm else "", str(r.get("c", "")) if pqm else "",
            r.get("distance", "") if pqm else "", num(layer_params(r)) if ex else "-",
            num(ex.get("mul", 0)) if ex else "-", num(lut.get("mul", 0)) if lut else "-",
            num(ex.get("add", 0)) if ex else "-", num(lut.get("add", 0)) if lut else "-",
            num(lut.get("cmp", 0)) if pqm else "0",
            num(r.get("weight_bytes", 0)), num(r["table_bytes"]) if pqm else "-",
            num(r["codebook_bytes"]) if pqm else (num(r["factor_bytes"]) if "factor_bytes" in r else "-"),
            timing, note,
        ))
    t = report["totals"]
    rows.append(("TOTAL", "", "", "", "", "", "", num(t.get("params", 0)), num(t["exact_mul"]), num(t["lut_mul"]),
                 num(t["exact_add"]), num(t["lut_add"]), num(t["lut_cmp"]), num(t["weight_bytes"]),
                 num(t["table_bytes"]), num(t["codebook_bytes"] + t.get("factor_bytes", 0)),
                 f"{total_ms:.3f}" if total_ms else "-", ""))
    widths = [max(len(str(x[i])) for x in [head, *rows]) for i in range(len(head))]
    widths[-1] = 0
    line = lambda cells: "  ".join(str(c).ljust(w) if i < len(cells) - 1 else str(c)
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    out = [f"model: {report.get('model', '')}   target: {report.get('target', '')}   batch: {report.get('batch', '')}",
           line(head), line(["-" * w for w in widths[:-1]] + ["----"])]
    out += [line(r) for r in rows[:-1]]
    out.append(line(["-" * w for w in widths[:-1]] + [""]))
    out.append(line(rows[-1]))
    out.append("")
    removed = t.get("mul_removed_frac", 0.0)
    lut_bytes = t["table_bytes"] + t["codebook_bytes"] + t["lut_weight_bytes"]
    lut_bytes += t.get("factor_bytes", 0)
    out.append(f"multiplies removed: {removed:.1%}   parameters removed: {t.get('params_removed_frac', 0.0):.1%}   "
               f"model bytes exact {num(t['weight_bytes'])}, "
               f"rewritten {num(lut_bytes)} (tables {num(t['table_bytes'])} + codebooks {num(t['codebook_bytes'])}"
               f" + factors {num(t.get('factor_bytes', 0))} + exact layers {num(t['lut_weight_bytes'])})")
    slower = [r["name"] for r in report["layers"] if r.get("slower_than_exact")]
    if total_ms:
        sources = [r["latency"].get("rewrite_from") for r in report["layers"] if r.get("latency")]
        from_model, alone = sources.count("model"), sources.count("layer")
        how = "exact layers compiled alone on their input shape and timed"
        if from_model:
            how += f"; {from_model} rewritten layer(s) timed by their kernels in the model's build"
        if alone:
            how += f"; {alone} rewritten layer(s) compiled alone"
        out.append(f"per-layer times: {how} (share = of the sum over layers); slower than exact: "
                   f"{', '.join(slower) if slower else 'none'}")
    out += kept_lines(report)
    lat = report.get("latency")
    if lat:
        out += latency_lines(lat, report.get("baselines"))
    if report.get("latency_note"):
        out.append(f"latency: {report['latency_note']}")
    if report.get("cam"):
        out.append("")
        out.append(_cam_table(report["cam"], num))
    pm = report.get("priority_mask")
    if pm:
        out.append("")
        out.append(_priority_table(report, pm))
    out.append("")
    out.append("counts per input sample; R = rows per sample (output pixels or tokens), Dp = C*V:")
    out.append("  exact: mul R*D*M, add R*(D-1)*M (+R*M bias).  LUT: encode l2 mul R*K*Dp add R*K*Dp | cosine mul "
               "R*K*Dp add R*K*C*(V-1) | l1 mul 0 add R*K*C*(2V-1);")
    out.append("  + accumulate add R*(C-1)*M, dequantise mul R*M (+R*M bias add), argmin cmp R*C*(K-1).")
    out.append("  bytes: weight 4*(D*M+M); table C*K*M int8 + 4*M scale (+4*M bias); codebook 4*C*K*V + 4*C*K offsets.")
    out.append("  butterfly: mul R*sum(p_k*s_k) (one per factor nonzero); low rank: the stages' R*d*n (Tucker-2's first "
               "1x1 on input pixels); factors 4 bytes each (codebk B column).")
    return "\n".join(out)


def latency_lines(lat: dict, base: dict | None) -> list[str]:
    """The latency headline: the LUT build against ONNX Runtime fp32 and int8 and PyTorch (same process,
    batch and threads); TVM's untuned exact build is a column, never the headline."""
    head = f"latency per batch of {lat['batch']}, {lat['threads']} threads: LUT {lat['lut_ms']:.3f} ms"
    rows = []
    base = base or {}
    for key, name in (("onnxruntime_fp32_ms", "ONNX Runtime fp32"), ("onnxruntime_int8_ms", "ONNX Runtime int8"),
                      ("pytorch_ms", "PyTorch")):
        if base.get(key):
            rows.append(f"{base[key] / lat['lut_ms']:.2f}x {name} ({base[key]:.3f} ms)")
    out = [head + (": " + ", ".join(rows) if rows else "")]
    if "onnxruntime_int8_accuracy" in base:
        out.append(f"  ONNX Runtime accuracy on the same held-out rows: fp32 {base['onnxruntime_fp32_accuracy']:.2f}%, "
                   f"int8 {base['onnxruntime_int8_accuracy']:.2f}%")
    out.append(f"  TVM exact build (default lowering, untuned): {lat['exact_ms']:.3f} ms (x{lat['speedup']:.2f}); "
               f"{lat['note']}")
    for note in base.get("notes", []):
        out.append(f"  {note}")
    if not base:
        out.append("  no baseline given: ONNX Runtime and PyTorch are timed for models compiled from an .onnx "
                   "file (tvm-lut compile) or from torch (the demo)")
    return out


POOR_DROP = 1.0  # points of accuracy (or of top-1 agreement) lost beyond which the summary says what to try


def kept_lines(report: dict) -> list[str]:
    """What the compiled model kept: accuracy (with labels) or top-1 agreement with the exact model on
    held-out rows, the budget that was applied and why, and, when much was lost, what to try next."""
    out = []
    acc, agr, budget = report.get("accuracy"), report.get("agreement"), report.get("budget")
    if acc:
        out.append(f"accuracy on {acc['rows']} held-out rows: exact {acc['exact']:.2f}%  LUT {acc['lut']:.2f}%  "
                   f"(drop {acc['drop']:+.2f} points, top-1 agreement {acc['agreement']:.1f}%)"
                   + (f"; measured on the {acc['measured_on']}" if acc.get("measured_on") else ""))
        lost = acc["drop"]
    elif agr:
        out.append(f"top-1 agreement with the exact model on {agr['rows']} held-out calibration rows: "
                   f"{agr['agreement']:.1f}% (accuracy not measured: the calibration file has no 'labels' array)"
                   + (f"; measured on the {agr['measured_on']}" if agr.get("measured_on") else ""))
        lost = 100.0 - agr["agreement"]
    else:
        out.append("accuracy: not measured (the calibration file has no 'labels' array and too few rows to hold "
                   "any back)")
        lost = None
    if budget:
        out.append(f"budget: {budget['budget'] or 'none'} ({budget['why']})")
    pm = report.get("priority_mask")
    if pm and pm.get("candidates") and not pm.get("converted"):
        out.append(f"NOTE: no layer could be converted within {pm['budget']}: converting even the first of the "
                   f"{len(pm['candidates'])} candidates (the least sensitive per multiply removed) costs more than "
                   "the budget, so this is the exact model. To convert layers: learned centroids (tvm_lut.train.lutnn, then --codebooks), a shorter "
                   "subvector (--v 4 or --v 2), more centroids (--k 32), or a looser budget")
    if lost is not None and lost > POOR_DROP:
        what = "accuracy" if acc else "top-1 agreement"
        applied = budget and budget.get("budget")
        tighter = (f"a tighter budget than {applied} (e.g. --budget {applied.split('=')[0]}=0.5)" if applied else
                   "a budget (--budget max-drop=1, or max-disagree=1 without labels)")
        out.append(f"WARNING: the LUT model lost {lost:.1f} points of {what}. To keep more: {tighter}, a shorter "
                   "subvector (--v 4 or --v 2), learned centroids (tvm_lut.train.lutnn, then --codebooks), or "
                   "--sequential calibration")
    return out


def _priority_table(report: dict, pm: dict) -> str:
    """The priority-mask decision: per-layer sensitivity scores and the budget outcome."""
    timed = pm.get("rank") == "latency"
    head = ("layer", "rank", "similarity", "rel err", "drop alone", "mul removed",
            *(("exact ms", "lookup ms") if timed else ()), "decision")
    rows = []
    for r in report["layers"]:
        sc = r.get("priority")
        if sc is None:
            continue
        ms = (f"{sc['exact_ms']:.3f}", f"{sc['lookup_ms']:.3f}") if timed else ()
        rows.append((r["name"], str(sc.get("rank", "-")), f"{sc['similarity']:.4f}", f"{sc['rel_error']:.3f}",
                     f"{sc['drop_alone']:+.2f}" if "drop_alone" in sc else "-", f"{sc['mul_removed_frac']:+.1%}", *ms,
                     "LUT" if r["method"] == "pq" else "exact" + (f" ({sc['why']})" if sc.get("why") else "")))
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    saved = f", {pm['ms_saved']:.3f} ms saved by the layers' own timings" if timed else ""
    lines = [f"priority mask, budget {pm['budget']}: {len(pm['converted'])} of {len(pm['candidates'])} candidate "
             f"layers converted, {pm['mul_removed_frac']:.1%} of multiplies removed{saved}; measured on "
             f"{pm['validation_samples']} validation samples held out of the {pm['fit_samples'] + pm['validation_samples']}"
             " used for the mask"]
    if "val_drop" in pm and pm.get("val_reference"):  # max-disagree: measured against the exact model
        lines.append(f"  validation: top-1 agreement with the exact model {100 - pm['val_drop']:.2f}% "
                     f"(-{pm['val_drop_margin']:.2f} two standard errors, which the budget includes)")
    elif "val_drop" in pm:
        lines.append(f"  validation: exact {pm['val_exact_acc']:.2f}%, drop {pm['val_drop']:+.2f} points "
                     f"(+{pm['val_drop_margin']:.2f} two standard errors, which the budget includes)")
    lines += [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
    lines.append("  similarity: cosine of LUT vs exact layer output; drop alone: validation accuracy drop with only "
                 "that layer converted; rank: order of conversion (least sensitive per "
                 + ("millisecond saved" if timed else "multiply removed") + " first)")
    return "\n".join(lines)


def _cam_table(cam: dict, num) -> str:
    """``--target cam``: per PQ layer, what the CAM simulator does for one batch and what it costs."""
    head = ("layer", "dist", "searches", "reads", "adds", "CAM mul", "host mul", "cycles", "time us", "energy nJ",
            "arrays needed")
    rows = [(l["layer"], l["distance"], num(l["searches"]), num(l["reads"]), num(l["adds"]), num(l["cam_mul"]),
             num(l["host_mul"]), num(l["cycles"]), f"{l['time_us']:.2f}", f"{l['energy_nj']:.2f}",
             str(l["arrays_used"]) + ("" if l.get("resident", True) else " (> device: reloads not modeled)"))
            for l in cam["layers"]]
    t = cam["total"]
    rows.append(("TOTAL", "", num(t["searches"]), num(t["reads"]), num(t["adds"]), num(t["cam_mul"]),
                 num(t["host_mul"]), num(t["cycles"]), f"{t['time_us']:.2f}", f"{t['energy_nj']:.2f}", ""))
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    p = cam["params"]
    lines = ["CAM simulator, per batch (searches: one subvector against a codebook's K words; reads: one table row "
             "of M int8):", fmt(head), fmt(["-" * w for w in widths])]
    lines += [fmt(r) for r in rows[:-1]] + [fmt(["-" * w for w in widths]), fmt(rows[-1])]
    lines.append(f"  device: {p['arrays']} arrays of {p['array_words']} words, {p['cell_bits']}-bit cells, "
                 f"{p['cycles_per_search']} cycle/search, {p['read_bytes_per_cycle']} B/read cycle, "
                 f"{p['clock_ghz']} GHz; {p['e_search_bit_fj']} fJ/bit/search, {p['e_read_byte_pj']} pJ/byte read, "
                 f"{p['e_add_pj']} pJ/add, {p.get('e_cell_mul_pj', 0)} pJ/cell product (sources: tvm_lut/targets/cam_simulator.py SOURCES; override with --cam-param NAME=VALUE)")
    lines.append("  CAM mul: dot-product terms of an l2/cosine search (0 for l1, PECAN-D); host mul: the one "
                 "scale-and-bias multiply-add per output, on the host CPU")
    return "\n".join(lines)
