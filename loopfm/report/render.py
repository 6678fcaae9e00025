"""Rendering of a run's results: ``report.md`` (a Table-1-style block, details, comparisons with
both tests labelled by what they resample, the FM row, the transfer ratio, timings) and its PNG
plots (``auc_by_variant.png``, ``auc_vs_<param>.png`` per sweep). Reads only the results dict.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from loopfm.artifacts import atomic_write_text
from loopfm.report.results import VARIANT_LABELS, num, variant_sort_key

# --------------------------------------------------------------------------------------------
# report.md and plots
# --------------------------------------------------------------------------------------------
def fmt_number(x: Any, digits: int = 4, *, signed: bool = False) -> str:
    """A metric cell: ``0.6573`` (``+0.0042`` when ``signed``), ``–`` when missing."""
    v = num(x)
    return "–" if v is None else f"{v:{'+' if signed else ''}.{digits}f}"


def fmt_p(p: Any) -> str:
    """A p-value cell: ``0.0180``, ``3.2e-05`` below 1e-3, ``n/a`` when missing."""
    v = num(p)
    if v is None:
        return "n/a"
    if v == 0.0:
        return "0"
    return f"{v:.1e}" if v < 1e-3 else f"{v:.4f}"


def fmt_ci(ci: Any) -> str:
    """An interval cell: ``[-0.0014, +0.0097]``, ``–`` when either end is missing."""
    if not ci or any(num(c) is None for c in ci):
        return "–"
    return f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"


def _label(variant: str) -> str:
    return VARIANT_LABELS.get(variant, variant)


def _all_variants(results: Mapping[str, Any]) -> List[str]:
    seen = {v for variants in results.get("vm", {}).values() for v in variants}
    return sorted(seen, key=variant_sort_key)


def results_table(results: Mapping[str, Any]) -> str:
    """The Table-1-style markdown block: rows = methods, columns = models x (AUC, LogLoss).

    The best AUC per model is in bold; "–" marks a missing (model, variant).
    """
    vm = results.get("vm", {})
    models = list(vm)
    variants = _all_variants(results)
    lines = [f"LoopFM on {results.get('dataset', '?')} (test day; mean over seeds)", ""]
    header = "| Method | " + " | ".join(f"{m} AUC | {m} LogLoss" for m in models) + " |"
    lines += [header, "|---|" + "---:|---:|" * len(models)]
    best = {m: max((e["auc"] for e in vm[m].values() if e.get("auc") is not None), default=None)
            for m in models}
    for v in variants:
        cells = []
        for m in models:
            e = vm[m].get(v)
            if e is None:
                cells += ["–", "–"]
                continue
            a = fmt_number(e.get("auc"))
            if best[m] is not None and e.get("auc") == best[m] and len(vm[m]) > 1:
                a = f"**{a}**"
            cells += [a, fmt_number(e.get("logloss"))]
        lines.append(f"| {_label(v)} | " + " | ".join(cells) + " |")
    fm = results.get("fm") or {}
    if any(fm.get(k) is not None for k in ("auc", "logloss")):
        lines.append("| FM (teacher) | " + " | ".join(
            f"{fmt_number(fm.get('auc'))} | {fmt_number(fm.get('logloss'))}" for _ in models) + " |")
    return "\n".join(lines)


def _detail_table(results: Mapping[str, Any]) -> str:
    vm, pv = results.get("vm", {}), results.get("p_values", {})
    ci = results.get("bootstrap_ci95", {})
    lines = ["| Model | Method | AUC ± std | seeds | LogLoss | NE | gAUC | ΔAUC vs w/o distill "
             "| p (seeds: paired t) | 95% CI ΔAUC (users: bootstrap) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for m, variants in vm.items():
        for v, e in variants.items():
            key = f"{v}_vs_baseline"
            delta = fmt_number((results.get("delta_auc") or {}).get(m, {}).get(key), signed=True)
            lines.append(
                f"| {m} | {_label(v)} | {fmt_number(e.get('auc'))} ± {fmt_number(e.get('auc_std'))} | "
                f"{e.get('n_seeds', '–')} | {fmt_number(e.get('logloss'))} | {fmt_number(e.get('ne'))} | "
                f"{fmt_number(e.get('gauc'))} | {delta} | "
                f"{fmt_p(pv.get(m, {}).get(key)) if key in pv.get(m, {}) else '–'} | "
                f"{fmt_ci(ci.get(m, {}).get(key))} |")
    return "\n".join(lines)


def _comparison_table(results: Mapping[str, Any]) -> str:
    """One row per comparison: ΔAUC, the seed t-test and the user bootstrap of the same ΔAUC."""
    lines = ["| Model | Comparison | ΔAUC (mean over seeds of per-seed Δ) | seeds | p (seeds: paired t) "
             "| 95% CI (users: bootstrap of the same ΔAUC) | note |",
             "|---|---|---:|---:|---:|---|---|"]
    for m, comps in (results.get("comparisons") or {}).items():
        for key, c in comps.items():
            a, _, b = key.partition("_vs_")
            t, boot = c.get("t_test", {}), c.get("user_bootstrap", {})
            notes = sorted({w for w in (t.get("why_null"), boot.get("why_null")) if w})
            lines.append(f"| {m} | {_label(a)} vs {_label(b)} | {fmt_number(c.get('delta_auc'), signed=True)} | "
                         f"{t.get('n', '–')} | {fmt_p(t.get('p_value'))} | {fmt_ci(boot.get('ci95'))} | "
                         f"{'; '.join(notes) or ''} |")
    return "\n".join(lines)


def _undefined_lines(results: Mapping[str, Any]) -> List[str]:
    """One line per metric that is null on the test day, with its reason."""
    out = [f"- FM {k}: {why}" for k, why in ((results.get("fm") or {}).get("undefined") or {}).items()]
    for m, variants in (results.get("vm") or {}).items():
        for v, e in variants.items():
            out += [f"- {m} {_label(v)} {k}: {why}" for k, why in (e.get("undefined") or {}).items()]
    return out


def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: Agg canvas, no global backend state
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _plot_auc_by_variant(results: Mapping[str, Any], path: Path) -> Optional[Path]:
    vm = results.get("vm", {})
    models = list(vm)
    variants = _all_variants(results)
    if not models or not variants:
        return None
    fig = _new_figure(max(5.0, 1.6 * len(models) + 2.0), 4.0)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(variants)
    x = np.arange(len(models), dtype=np.float64)
    lows = []
    for i, v in enumerate(variants):
        h = [(vm[m].get(v) or {}).get("auc") for m in models]
        s = [(vm[m].get(v) or {}).get("auc_std") for m in models]
        hv = np.array([np.nan if a is None else a for a in h])
        sv = np.array([0.0 if a is None else a for a in s])
        lows += [a for a in h if a is not None]
        ax.bar(x + (i - (len(variants) - 1) / 2) * width, hv, width, yerr=sv, capsize=3,
               label=_label(v))
    if lows:
        lo, hi = min(lows), max(lows)
        pad = max(0.01, (hi - lo) * 0.5)
        ax.set_ylim(max(0.0, lo - pad), min(1.0, hi + pad))
    ax.set_xticks(x)
    ax.set_xticklabels(models)
    ax.set_ylabel("test AUC (mean ± std over seeds)")
    ax.set_title(f"AUC by variant — {results.get('dataset', '')}")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
    return path


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)) or "param"


def sweep_lines(values: Mapping[Any, Any]) -> Dict[str, List[Tuple[float, float]]]:
    """``{x: auc}`` -> one line; ``{line: {x: auc}}`` -> one line per key."""
    def points(d: Mapping[Any, Any]) -> List[Tuple[float, float]]:
        pts = []
        for k, v in d.items():
            xv, yv = num(k), num(v.get("auc") if isinstance(v, Mapping) else v)
            if xv is not None and yv is not None:
                pts.append((xv, yv))
        return sorted(pts)

    if values and all(isinstance(v, Mapping) and "auc" not in v for v in values.values()):
        return {str(k): points(v) for k, v in values.items()}
    return {"AUC": points(values)}


def plot_sweep(param: str, values: Mapping[Any, Any], path: Path) -> Optional[Path]:
    """A line plot of AUC vs ``param`` (``values`` as in `write_report`'s ``sweeps``); None when
    nothing is numeric. ``param == "L"`` is labelled as the LoopFM sequence length."""
    lines = {k: v for k, v in sweep_lines(values).items() if v}
    if not lines:
        return None
    fig = _new_figure(5.5, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    for name, pts in lines.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    xs = [p[0] for pts in lines.values() for p in pts]
    if min(xs) > 0 and max(xs) >= 20 * min(xs):  # e.g. L = 1 ... 100: even spacing per decade
        ax.set_xscale("log")
        ax.set_xticks(sorted(set(xs)), [f"{x:g}" for x in sorted(set(xs))])
        ax.minorticks_off()
    ax.set_xlabel("sequence length L" if param == "L" else param)
    ax.set_ylabel("test AUC")
    ax.set_title("AUC vs sequence length" if param == "L" else f"AUC vs {param}")
    ax.grid(alpha=0.3)
    if len(lines) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
    return path


def write_report(out_dir: str | os.PathLike, results: Mapping[str, Any],
                 sweeps: Optional[Mapping[str, Mapping[Any, Any]]] = None,
                 sections: Sequence[str] = ()) -> Path:
    """Write ``out_dir/report.md`` and its PNGs (``auc_by_variant.png``, ``auc_vs_<p>.png``).

    ``sweeps``: ``{param: {value: auc}}`` (e.g. ``{"L": {10: 0.61, 25: 0.62}}``) or
    ``{param: {line_name: {value: auc}}}``; one line plot per param. ``sections``: markdown
    appended at the end (e.g. the run's diagnosis). Returns the report path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = [f"# LoopFM report — {results.get('dataset', '?')}", ""]
    n_test, n_users = results.get("n_test"), results.get("n_users")
    if n_test is not None:
        parts += [f"Test day: {n_test:,} examples, {n_users:,} users. Metrics are means over seeds. "
                  "A comparison's ΔAUC is the mean over seeds of the per-seed AUC difference; its "
                  "p-value is a two-sided paired t-test over seeds (what the seeds change, on this fixed "
                  "test set) and its interval the 95% percentile interval of a "
                  f"{results.get('n_boot', '?')}-resample bootstrap of the same ΔAUC over test users "
                  "(what another sample of users would change).", ""]
    parts += ["## Main results (Table-1 layout)", "", results_table(results), ""]
    fm = results.get("fm") or {}
    parts += ["## Foundation model (teacher)", "", "| Model | AUC | LogLoss | NE |",
              "|---|---:|---:|---:|",
              f"| FM | {fmt_number(fm.get('auc'))} | {fmt_number(fm.get('logloss'))} | {fmt_number(fm.get('ne'))} |", ""]
    parts += ["## Details per model and method", "", _detail_table(results), ""]
    if any((results.get("comparisons") or {}).values()):
        parts += ["## Comparisons", "", _comparison_table(results), ""]
    undefined = _undefined_lines(results)
    if undefined:
        parts += ["## Undefined on the test day", "", *undefined, ""]
    tr = results.get("transfer_ratio") or {}
    if tr.get("by_model"):
        parts += ["## Transfer ratio", "", f"Definition: {tr.get('definition', '')}", "",
                  "| Model | Method | TR |", "|---|---|---:|"]
        why = tr.get("undefined") or {}
        for m, variants in tr["by_model"].items():
            for v, val in variants.items():
                note = (why.get(m) or {}).get(v)
                parts.append(f"| {m} | {_label(v)} | {fmt_number(val, 3) if note is None else f'– ({note})'} |")
        parts.append("")
    if _plot_auc_by_variant(results, out / "auc_by_variant.png"):
        parts += ["## Plots", "", "![AUC by variant](auc_by_variant.png)", ""]
    for param, values in (sweeps or {}).items():
        fname = f"auc_vs_{_safe_name(param)}.png"
        if plot_sweep(str(param), values, out / fname):
            title = "AUC vs sequence length" if param == "L" else f"AUC vs {param}"
            lines = sweep_lines(values)
            parts += [f"### {title}", "", f"| {param} | " + " | ".join(lines.keys()) + " |"]
            xs = sorted({p[0] for pts in lines.values() for p in pts})
            parts.append("|---:|" + "---:|" * len(lines))
            for xv in xs:
                row = [next((f"{p[1]:.4f}" for p in pts if p[0] == xv), "–")
                       for pts in lines.values()]
                parts.append(f"| {xv:g} | " + " | ".join(row) + " |")
            parts += ["", f"![{title}]({fname})", ""]
    timings = results.get("timings_s") or {}
    if timings:
        parts += ["## Stage timings", "", "| Stage | seconds |", "|---|---:|"]
        parts += [f"| {k} | {fmt_number(v, 1)} |" for k, v in timings.items()]
        total = sum(v for v in timings.values() if num(v) is not None)
        parts += [f"| **total** | {total:.1f} |", ""]
    parts += [text for section in sections for text in (section.rstrip("\n"), "")]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(parts).rstrip() + "\n")
    return path
