"""The report stage: ``results.json``, ``report.md`` with PNG plots, and TensorBoard scalars.

Three jobs, one module each; the statistics live in `loopfm.stats`, beside `loopfm.metrics`:

    results.py      Run, build_results (metrics per run and over seeds, labelled comparisons,
                    transfer ratio), write_results / read_results, ReportConfig
    render.py       results_table, write_report (report.md), plot_sweep and the PNGs
    tensorboard.py  results_scalars, log_tensorboard (a fresh folder per report: tags == results.json)

`make_report` does all three. The names below stay importable from ``loopfm.report``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

from loopfm.report.render import plot_sweep, results_table, write_report
from loopfm.report.results import (COMPARISONS, MIN_DNE_FM, VARIANT_LABELS, VARIANT_ORDER, ReportConfig, Run,
                                   build_results, compare, read_results, write_results)
from loopfm.report.tensorboard import log_tensorboard, results_scalars
from loopfm.stats import betainc, paired_bootstrap_auc, paired_t_test, t_two_sided_p, weighted_auc

__all__ = [
    "Run", "ReportConfig", "VARIANT_ORDER", "VARIANT_LABELS", "COMPARISONS", "MIN_DNE_FM",
    "betainc", "t_two_sided_p", "paired_t_test", "weighted_auc", "paired_bootstrap_auc",
    "build_results", "compare", "write_results", "read_results", "results_table", "write_report",
    "plot_sweep", "log_tensorboard", "results_scalars", "make_report",
]


def make_report(out_dir: str | os.PathLike, dataset: str, fm_metrics: Optional[Mapping[str, float]],
                runs: Sequence[Run], labels: Any, user_ids: Any,
                timings: Optional[Mapping[str, float]] = None,
                transfer_ratio: Optional[Mapping[str, Any]] = None, *,
                sweeps: Optional[Mapping[str, Mapping[Any, Any]]] = None,
                curves: Optional[Mapping[str, Any]] = None,
                tb_dir: Optional[str | os.PathLike] = None,
                n_boot: int = 1000, boot_seed: int = 0, min_dne_fm: float = MIN_DNE_FM) -> Dict[str, Any]:
    """Everything at once: ``out_dir/results.json``, ``out_dir/report.md`` + PNGs and, when
    ``tb_dir`` is given, TensorBoard scalars. Returns the results dict."""
    results = build_results(dataset, fm_metrics, runs, labels, user_ids, timings, transfer_ratio,
                            n_boot=n_boot, boot_seed=boot_seed, min_dne_fm=min_dne_fm)
    out = Path(out_dir)
    write_results(out / "results.json", results)
    write_report(out, results, sweeps=sweeps)
    if tb_dir is not None:
        log_tensorboard(tb_dir, results, curves=curves, sweeps=sweeps)
    return results
