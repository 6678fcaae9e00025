"""The report's TensorBoard scalars: exactly what ``results.json`` holds, in ``tb_dir/report``.

The folder is written afresh and swapped in whole (`loopfm.artifacts.replaced_folder`), so a rerun
replaces every tag: a value that is now null (a transfer ratio below its floor, an undefined AUC)
is absent, never left at its old value, and no tag holds two values at one step.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from loopfm.report.render import results_table, sweep_lines
from loopfm.report.results import METRIC_KEYS, num
from loopfm.artifacts import replaced_folder

def _curve_points(curve: Any) -> List[Tuple[int, float]]:
    if isinstance(curve, Mapping):
        items = curve.items()
    else:
        seq = list(curve)
        items = seq if seq and isinstance(seq[0], (tuple, list)) else list(enumerate(seq))
    return [(int(s), float(v)) for s, v in items if num(v) is not None]


def results_scalars(results: Mapping[str, Any]) -> Dict[str, float]:
    """``{tag: value}`` for every non-null test number of ``results``: ``test/{model}/{variant}/
    {auc,logloss,ne,gauc,auc_std}``, ``test/fm/{auc,logloss,ne}``, ``delta_auc/{model}/{a_vs_b}``,
    ``transfer_ratio/{model}/{variant}``. (Timings stay in results.json: they are not results.)"""
    out: Dict[str, float] = {}
    for model, variants in results.get("vm", {}).items():
        for variant, entry in variants.items():
            for k in (*METRIC_KEYS, "auc_std"):
                out[f"test/{model}/{variant}/{k}"] = num(entry.get(k))
    for k in ("auc", "logloss", "ne"):
        out[f"test/fm/{k}"] = num((results.get("fm") or {}).get(k))
    for model, comps in (results.get("delta_auc") or {}).items():
        for key, v in comps.items():
            out[f"delta_auc/{model}/{key}"] = num(v)
    for model, variants in (results.get("transfer_ratio") or {}).get("by_model", {}).items():
        for variant, v in variants.items():
            out[f"transfer_ratio/{model}/{variant}"] = num(v)
    return {tag: v for tag, v in out.items() if v is not None}


def log_tensorboard(tb_dir: str | os.PathLike, results: Mapping[str, Any],
                    curves: Optional[Mapping[str, Any]] = None, *, run_name: str = "report",
                    sweeps: Optional[Mapping[str, Mapping[Any, Any]]] = None) -> Path:
    """Write `results_scalars` (step 0) to a fresh ``tb_dir/run_name`` that replaces the old one;
    returns that folder. Also ``sweep/{param}[/{line}]/auc`` (step = value) for ``sweeps``, and
    ``curves`` = ``{tag: {step: value} | [(step, value)] | [values]}``. The Table-1 block is
    logged as text.
    """
    from torch.utils.tensorboard import SummaryWriter  # lazy: heavy import

    folder = Path(tb_dir) / run_name
    with replaced_folder(folder) as tmp:
        writer = SummaryWriter(log_dir=str(tmp))
        try:
            for tag, v in results_scalars(results).items():
                writer.add_scalar(tag, v, 0)
            for param, values in (sweeps or {}).items():
                for line, pts in sweep_lines(values).items():
                    tag = f"sweep/{param}/auc" if line == "AUC" else f"sweep/{param}/{line}/auc"
                    for xv, yv in pts:
                        writer.add_scalar(tag, yv, int(round(xv)))
            for tag, curve in (curves or {}).items():
                for step, v in _curve_points(curve):
                    writer.add_scalar(str(tag), v, step)
            writer.add_text("report/table1", results_table(results), 0)
            writer.flush()
        finally:
            writer.close()
    return folder
