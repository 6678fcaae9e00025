"""The report stage: results.json, report.md, PNG plots and TensorBoard scalars for a LoopFM run.

Input: for every trained vertical model (VM) a :class:`Run` ``(model, variant, seed, preds)``
holding its test-day predictions, all in the same example order, plus the shared test-day
``labels`` and ``user_ids``; the FM's test-day metrics; stage timings; optionally transfer-ratio
inputs and parameter sweeps. Variants are ``"baseline"`` (w/o distill), ``"kd"``, ``"loopfm"``
(LoopFM-only), ``"kd+loopfm"``; any other name (e.g. ``"loopfm[L=10]"`` from an ablation) is
reported as it is and compared with the baseline.

Statistics
----------
* Metrics (AUC, LogLoss, NE, gAUC) come from :mod:`loopfm.metrics` (never re-implemented here),
  per run, then averaged over seeds; ``auc_std`` is the std over seeds (``ddof=1``; 0.0 for one
  seed).
* :func:`paired_t_test`: two-sided paired t-test over seeds of per-seed AUCs (runs are paired by
  seed; the paper's Table 9 uses the same test, df = n - 1). The Student t distribution is
  computed here through the regularized incomplete beta function (:func:`betainc`, continued
  fraction of Numerical Recipes ``betacf``); no scipy.
* :func:`paired_bootstrap_auc`: 95% percentile interval of ``AUC(a) - AUC(b)`` under a cluster
  bootstrap over test-day *users* (a user drawn k times contributes all of its rows k times),
  computed on the seed-averaged predictions of each variant. A resample is an integer weight per
  row; the weighted AUC is the rank-sum formula over the rows sorted once by prediction, with tied
  predictions grouped (ties count 1/2, exactly as :func:`loopfm.metrics.auc`), so every resample
  costs O(rows).

Files
-----
``results.json`` (:func:`build_results` + :func:`write_results`, written atomically)::

    {"dataset": str,
     "fm": {"auc", "logloss", "ne"},
     "vm": {MODEL: {VARIANT: {"auc", "logloss", "ne", "gauc", "auc_std", "n_seeds"}}},
     "p_values": {MODEL: {"kd+loopfm_vs_kd", "kd+loopfm_vs_baseline", "loopfm_vs_baseline",
                          "kd_vs_baseline", OTHER_vs_baseline...: float | null}},
     "bootstrap_ci95": {MODEL: {COMPARISON: [lo, hi]}},
     "bootstrap_mean": {MODEL: {COMPARISON: float}},
     "transfer_ratio": {"definition": str, ..., "by_model": {MODEL: {VARIANT: float | null}}},
     "timings_s": {STAGE: float},
     "per_seed": {MODEL: {VARIANT: {SEED: {"auc", "logloss", "ne", "gauc"}}}},
     "n_test": int, "n_users": int, "n_boot": int}

Only comparisons whose two variants both exist are present. Every float is finite or ``null``
(a p-value is ``null`` when fewer than two seeds pair up).

``report.md`` (:func:`write_report`): a Table-1-style block (rows = methods, columns = models x
{AUC, LogLoss}; :func:`results_table` returns it alone), a detail table (NE, gAUC, AUC ± std,
p-values, bootstrap CIs), the FM row, the transfer ratio, the timings, and links to
``auc_by_variant.png`` and, per sweep, ``auc_vs_<param>.png`` (e.g. ``auc_vs_L.png``).

TensorBoard (:func:`log_tensorboard`): ``test/{model}/{variant}/{auc,logloss,ne,gauc}``,
``test/fm/{auc,logloss,ne}``, ``transfer_ratio/{model}/{variant}``, sweeps and optional curves,
in ``tb_dir/report`` so that ``tensorboard --logdir DIR/tb`` shows it beside the trainers' runs.
"""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from loopfm import metrics as M

__all__ = [
    "Run",
    "VARIANT_ORDER",
    "VARIANT_LABELS",
    "COMPARISONS",
    "betainc",
    "t_two_sided_p",
    "paired_t_test",
    "weighted_auc",
    "paired_bootstrap_auc",
    "build_results",
    "write_results",
    "read_results",
    "results_table",
    "write_report",
    "plot_sweep",
    "log_tensorboard",
    "make_report",
]

#: Main variants in the paper's row order (Table 1), with their row labels.
VARIANT_ORDER: Tuple[str, ...] = ("baseline", "kd", "loopfm", "kd+loopfm", "kd+current")
VARIANT_LABELS: Dict[str, str] = {
    "baseline": "w/o distill",
    "kd": "KD",
    "loopfm": "LoopFM-only",
    "kd+loopfm": "KD + LoopFM",
    "kd+current": "KD + current-sample FM emb",  # table 2: needs the FM at serving time
}
#: (a, b) pairs compared for every model where both exist; key = f"{a}_vs_{b}".
COMPARISONS: Tuple[Tuple[str, str], ...] = (
    ("kd+loopfm", "kd"),
    ("kd+loopfm", "baseline"),
    ("loopfm", "baseline"),
    ("kd", "baseline"),
    ("kd+current", "kd"),
    ("kd+loopfm", "kd+current"),
)
_METRIC_KEYS = ("auc", "logloss", "ne", "gauc")


@dataclass
class Run:
    """One trained VM: test-day predictions (probabilities) in the shared example order.

    ``metrics`` (optional) are the run's own test-day metrics (``auc``, ``logloss``, ``ne``,
    ``gauc``); missing ones are computed from ``preds`` with :mod:`loopfm.metrics`.
    """

    model: str
    variant: str
    seed: int
    preds: np.ndarray
    metrics: Optional[Mapping[str, float]] = field(default=None)


# --------------------------------------------------------------------------------------------
# Student t distribution (no scipy)
# --------------------------------------------------------------------------------------------
def _betacf(a: float, b: float, x: float, max_iter: int = 10_000, eps: float = 1e-15) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; NR ``betacf``)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = 1.0
    d = 1.0 - qab * x / qap
    d = tiny if abs(d) < tiny else d
    d = 1.0 / d
    h = d
    for m in range(1, max_iter + 1):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = tiny if abs(d) < tiny else d
        c = 1.0 + aa / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = tiny if abs(d) < tiny else d
        c = 1.0 + aa / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            return h
    raise RuntimeError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function ``I_x(a, b)`` for ``a, b > 0``, ``0 <= x <= 1``."""
    if not (a > 0 and b > 0):
        raise ValueError(f"betainc needs a > 0 and b > 0; got a={a!r}, b={b!r}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc needs 0 <= x <= 1; got x={x!r}")
    if x == 0.0 or x == 1.0:
        return float(x)
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """Two-sided p-value ``P(|T| >= |t|)`` of Student's t with ``df`` degrees of freedom.

    ``p = I_{df/(df+t^2)}(df/2, 1/2)``; ``t = ±inf`` gives 0.0, ``t = 0`` gives 1.0.
    """
    if not df > 0:
        raise ValueError(f"degrees of freedom must be > 0; got {df!r}")
    t = float(t)
    if math.isnan(t):
        return float("nan")
    if math.isinf(t):
        return 0.0
    if t == 0.0:
        return 1.0
    return min(1.0, max(0.0, betainc(df / 2.0, 0.5, df / (df + t * t))))


def paired_t_test(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of the paired t-test of ``a`` vs ``b`` (e.g. per-seed AUCs).

    ``d = a - b``, ``t = mean(d) / (std(d, ddof=1) / sqrt(n))``, ``df = n - 1``.
    Degenerate cases: ``n < 2`` -> ``nan``; all differences exactly equal: non-zero -> ``0.0``
    (a constant shift, infinitely significant), all zero -> ``1.0``. Non-finite input -> ``nan``.
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"paired_t_test needs equal lengths; got {a.shape[0]} and {b.shape[0]}")
    n = a.shape[0]
    if n < 2:
        return float("nan")
    d = a - b
    if not np.all(np.isfinite(d)):
        return float("nan")
    if np.all(d == d[0]):
        return 1.0 if d[0] == 0.0 else 0.0
    sd = float(np.std(d, ddof=1))
    t = float(np.mean(d)) / (sd / math.sqrt(n))
    return t_two_sided_p(t, n - 1)


# --------------------------------------------------------------------------------------------
# Weighted AUC and the user-level paired bootstrap
# --------------------------------------------------------------------------------------------
def _sorted_blocks(labels: np.ndarray,
                   preds: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort rows by prediction once: (order, start index of each tie block, positive mask)."""
    order = np.argsort(preds, kind="stable")
    p = preds[order]
    starts = np.flatnonzero(np.concatenate(([True], p[1:] != p[:-1])))
    return order, starts, labels[order] > 0.5


def _weighted_auc_sorted(w: np.ndarray, starts: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Weighted AUC for each row of ``w`` ``[B, n]`` (weights of rows already in sorted order).

    Rank-sum over tie blocks: ``2U = sum_k Wp_k * (2 * Wn_below_k + Wn_k)``; integer weights
    are summed exactly in int64. ``nan`` where a resample has no positive or no negative weight.
    """
    wp = np.where(pos, w, 0)
    wn = w - wp
    bp = np.add.reduceat(wp, starts, axis=1)
    bn = np.add.reduceat(wn, starts, axis=1)
    below = np.cumsum(bn, axis=1) - bn
    twice_u = np.sum(bp * (2 * below + bn), axis=1)
    n_pos = bp.sum(axis=1)
    n_neg = bn.sum(axis=1)
    denom = 2.0 * n_pos.astype(np.float64) * n_neg.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = twice_u.astype(np.float64) / denom
    out[denom == 0] = np.nan
    return out


def weighted_auc(labels: Any, preds: Any, weights: Any) -> Any:
    """AUC where row i counts ``weights[i]`` times (ties count 1/2, as :func:`metrics.auc`).

    ``weights`` is ``[n]`` (returns a float) or ``[B, n]`` (returns ``[B]``); integer weights
    are exact. With integer weights this equals :func:`loopfm.metrics.auc` on the rows repeated
    ``weights[i]`` times. ``nan`` when the weighted data lacks a class.
    """
    M.auc(labels, preds)  # validates (lengths, 0/1 labels, finite preds, both classes)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    p = np.asarray(preds, dtype=np.float64).reshape(-1)
    w = np.asarray(weights)
    single = w.ndim == 1
    w = np.atleast_2d(w)
    if w.shape[1] != y.shape[0]:
        raise ValueError(f"weights have {w.shape[1]} columns for {y.shape[0]} rows")
    if np.any(w < 0):
        raise ValueError("weights must be >= 0")
    w = w.astype(np.int64) if w.dtype.kind in "biu" else w.astype(np.float64)
    order, starts, pos = _sorted_blocks(y, p)
    out = _weighted_auc_sorted(w[:, order], starts, pos)
    return float(out[0]) if single else out


def _user_index(groups: Any, n: int) -> Tuple[np.ndarray, int]:
    g = np.asarray(groups).reshape(-1)
    if g.shape[0] != n:
        raise ValueError(f"groups have {g.shape[0]} entries for {n} rows")
    _, gid = np.unique(g, return_inverse=True)
    gid = gid.reshape(-1).astype(np.int64)
    return gid, int(gid.max()) + 1


def paired_bootstrap_auc(
    labels: Any,
    preds_a: Any,
    preds_b: Any,
    groups: Any,
    n_boot: int = 1000,
    seed: int = 0,
) -> Tuple[float, float, float]:
    """95% cluster-bootstrap interval of ``AUC(a) - AUC(b)``, resampling users (``groups``).

    Each resample draws as many users as there are, with replacement; a user drawn k times
    weighs all of its rows k. Both predictors see the same resample (paired). Returns
    ``(lo, hi, mean)``: the 2.5% and 97.5% percentiles and the mean of the resampled
    differences. Resamples without a positive or a negative are dropped (all dropped -> nans).
    Deterministic for a given ``seed``. Identical predictors give exactly ``(0.0, 0.0, 0.0)``.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1; got {n_boot}")
    M.auc(labels, preds_a)  # validation through loopfm.metrics
    M.auc(labels, preds_b)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    pa = np.asarray(preds_a, dtype=np.float64).reshape(-1)
    pb = np.asarray(preds_b, dtype=np.float64).reshape(-1)
    n = y.shape[0]
    gid, n_users = _user_index(groups, n)
    order_a, starts_a, pos_a = _sorted_blocks(y, pa)
    order_b, starts_b, pos_b = _sorted_blocks(y, pb)
    gid_a, gid_b = gid[order_a], gid[order_b]

    rng = np.random.default_rng(seed)
    chunk = int(max(1, min(n_boot, 4_000_000 // max(n, n_users))))
    diffs = np.empty(n_boot, dtype=np.float64)
    done = 0
    while done < n_boot:
        bsz = min(chunk, n_boot - done)
        draws = rng.integers(0, n_users, size=(bsz, n_users))
        offsets = (np.arange(bsz, dtype=np.int64) * n_users)[:, None]
        counts = np.bincount((draws + offsets).ravel(), minlength=bsz * n_users)
        counts = counts.reshape(bsz, n_users).astype(np.int64)
        auc_a = _weighted_auc_sorted(counts[:, gid_a], starts_a, pos_a)
        auc_b = _weighted_auc_sorted(counts[:, gid_b], starts_b, pos_b)
        diffs[done:done + bsz] = auc_a - auc_b
        done += bsz
    diffs = diffs[np.isfinite(diffs)]
    if diffs.size == 0:
        return float("nan"), float("nan"), float("nan")
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return float(lo), float(hi), float(np.mean(diffs))


# --------------------------------------------------------------------------------------------
# results.json
# --------------------------------------------------------------------------------------------
def _num(x: Any) -> Optional[float]:
    """A finite Python float, or None (NaN/inf/None/non-numeric)."""
    if x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _json_safe(obj: Any) -> Any:
    """Recursively: numpy scalars -> Python, non-finite floats -> None, tuples -> lists."""
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [_json_safe(v) for v in obj.tolist()]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return _num(obj)
    return obj


def _variant_sort_key(variant: str) -> Tuple[int, str]:
    if variant in VARIANT_ORDER:
        return VARIANT_ORDER.index(variant), ""
    return len(VARIANT_ORDER), variant


def _run_metrics(run: Run, labels: np.ndarray, user_ids: np.ndarray) -> Dict[str, Optional[float]]:
    given = dict(run.metrics or {})
    out: Dict[str, Optional[float]] = {k: _num(given.get(k)) for k in _METRIC_KEYS}
    if any(out[k] is None for k in ("auc", "logloss", "ne")):
        computed = M.binary_metrics(labels, run.preds)
        for k in ("auc", "logloss", "ne"):
            if out[k] is None:
                out[k] = _num(computed[k])
    if out["gauc"] is None and "gauc" not in given:
        try:
            out["gauc"] = _num(M.gauc(labels, run.preds, user_ids))
        except ValueError:  # no user has both classes
            out["gauc"] = None
    return out


def _mean_or_none(values: List[Optional[float]]) -> Optional[float]:
    if not values or any(v is None for v in values):
        return None
    return float(np.mean(values))


def _comparisons(variants: Iterable[str]) -> List[Tuple[str, str]]:
    present = set(variants)
    pairs = [(a, b) for a, b in COMPARISONS if a in present and b in present]
    if "baseline" in present:
        pairs += [(v, "baseline") for v in sorted(present - set(VARIANT_ORDER))]
    return pairs


def _transfer_ratio(spec: Optional[Mapping[str, Any]], fm: Mapping[str, Optional[float]],
                    vm: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> Dict[str, Any]:
    """See :func:`build_results` for the three forms of ``spec``."""
    def tr(vm_before, vm_after, fm_before, fm_after) -> Optional[float]:
        if None in (vm_before, vm_after, fm_before, fm_after):
            return None
        try:
            return _num(M.transfer_ratio(vm_before, vm_after, fm_before, fm_after))
        except ValueError:  # dNE_FM == 0
            return None

    if spec is None:
        ne_fm = _num(fm.get("ne"))
        by_model: Dict[str, Dict[str, Optional[float]]] = {}
        for model, variants in vm.items():
            base = variants.get("baseline")
            if base is None or ne_fm is None:
                continue
            by_model[model] = {
                v: tr(base["ne"], m["ne"], base["ne"], ne_fm)
                for v, m in variants.items() if v != "baseline"
            }
        if not by_model:
            return {}
        return {
            "definition": "fm_gap: TR = (NE_VM[baseline] - NE_VM[variant]) / "
                          "(NE_VM[baseline] - NE_FM), the fraction of the FM's NE advantage over "
                          "the baseline VM that the variant captures (metrics.transfer_ratio)",
            "ne_fm": ne_fm,
            "by_model": by_model,
        }
    if "ne_fm_before" in spec or "ne_fm_after" in spec:
        fm_before, fm_after = _num(spec.get("ne_fm_before")), _num(spec.get("ne_fm_after"))
        if fm_after is None:
            fm_after = _num(fm.get("ne"))
        before = spec.get("ne_vm_before") or {}
        by_model = {}
        for model, variants in before.items():
            by_model[str(model)] = {
                str(v): tr(_num(ne_b), (vm.get(model, {}).get(v) or {}).get("ne"),
                           fm_before, fm_after)
                for v, ne_b in variants.items()
            }
        return {
            "definition": "fm_update: TR = (NE_VM before - NE_VM after) / (NE_FM before - "
                          "NE_FM after) for an FM update, VM 'after' = this run "
                          "(metrics.transfer_ratio)",
            "ne_fm_before": fm_before,
            "ne_fm_after": fm_after,
            "by_model": by_model,
        }
    by_model = spec.get("by_model", spec)
    return {"definition": str(spec.get("definition", "given")),
            "by_model": _json_safe({m: dict(v) for m, v in by_model.items()
                                    if isinstance(v, Mapping)})}


def build_results(
    dataset: str,
    fm_metrics: Optional[Mapping[str, float]],
    runs: Sequence[Run],
    labels: Any,
    user_ids: Any,
    timings: Optional[Mapping[str, float]] = None,
    transfer_ratio: Optional[Mapping[str, Any]] = None,
    *,
    n_boot: int = 1000,
    boot_seed: int = 0,
) -> Dict[str, Any]:
    """Aggregate all runs into the JSON-safe ``results.json`` dict (shape in the module doc).

    ``transfer_ratio``:
      * ``None`` (default): the "fm_gap" ratio per model and non-baseline variant,
        ``(NE_VM[baseline] - NE_VM[variant]) / (NE_VM[baseline] - NE_FM)``; ``{}`` when there is
        no baseline or no FM NE.
      * ``{"ne_fm_before": x, "ne_fm_after": y (default: this FM's NE),
        "ne_vm_before": {MODEL: {VARIANT: ne}}}``: an FM update (paper's TR = dNE_VM / dNE_FM),
        with this run's VM NE as "after".
      * anything else: precomputed ``{MODEL: {VARIANT: float}}`` (or ``{"by_model": ...}``),
        passed through.
    """
    y = np.asarray(labels).reshape(-1)
    users = np.asarray(user_ids).reshape(-1)
    n = y.shape[0]
    if users.shape[0] != n:
        raise ValueError(f"user_ids have {users.shape[0]} entries for {n} labels")
    if not runs:
        raise ValueError("build_results needs at least one Run")

    grouped: Dict[str, Dict[str, Dict[int, Run]]] = {}
    for run in runs:
        preds = np.asarray(run.preds, dtype=np.float64).reshape(-1)
        if preds.shape[0] != n:
            raise ValueError(f"run {run.model}/{run.variant}/seed={run.seed} has {preds.shape[0]} "
                             f"predictions for {n} test examples")
        slot = grouped.setdefault(str(run.model), {}).setdefault(str(run.variant), {})
        if int(run.seed) in slot:
            raise ValueError(f"duplicate run {run.model}/{run.variant}/seed={run.seed}")
        slot[int(run.seed)] = Run(str(run.model), str(run.variant), int(run.seed), preds,
                                  run.metrics)

    vm: Dict[str, Dict[str, Dict[str, Any]]] = {}
    per_seed: Dict[str, Dict[str, Dict[str, Dict[str, Optional[float]]]]] = {}
    p_values: Dict[str, Dict[str, Optional[float]]] = {}
    ci95: Dict[str, Dict[str, List[Optional[float]]]] = {}
    boot_mean: Dict[str, Dict[str, Optional[float]]] = {}
    for model in grouped:
        variants = dict(sorted(grouped[model].items(), key=lambda kv: _variant_sort_key(kv[0])))
        vm[model], per_seed[model] = {}, {}
        seed_metrics: Dict[str, Dict[int, Dict[str, Optional[float]]]] = {}
        for variant, by_seed in variants.items():
            seeds = sorted(by_seed)
            ms = {s: _run_metrics(by_seed[s], y, users) for s in seeds}
            seed_metrics[variant] = ms
            aucs = [ms[s]["auc"] for s in seeds]
            entry: Dict[str, Any] = {k: _mean_or_none([ms[s][k] for s in seeds])
                                     for k in _METRIC_KEYS}
            entry["auc_std"] = (float(np.std(aucs, ddof=1)) if len(aucs) > 1 else 0.0) \
                if None not in aucs else None
            entry["n_seeds"] = len(seeds)
            vm[model][variant] = entry
            per_seed[model][variant] = {str(s): ms[s] for s in seeds}

        p_values[model], ci95[model], boot_mean[model] = {}, {}, {}
        mean_preds = {v: np.mean([r.preds for r in variants[v].values()], axis=0) for v in variants}
        for a, b in _comparisons(variants):
            key = f"{a}_vs_{b}"
            common = sorted(set(seed_metrics[a]) & set(seed_metrics[b]))
            auc_a = [seed_metrics[a][s]["auc"] for s in common]
            auc_b = [seed_metrics[b][s]["auc"] for s in common]
            p_values[model][key] = (_num(paired_t_test(auc_a, auc_b))
                                    if None not in auc_a + auc_b else None)
            lo, hi, mean = paired_bootstrap_auc(y, mean_preds[a], mean_preds[b], users,
                                                n_boot=n_boot, seed=boot_seed)
            ci95[model][key] = [_num(lo), _num(hi)]
            boot_mean[model][key] = _num(mean)

    fm = {k: _num((fm_metrics or {}).get(k)) for k in ("auc", "logloss", "ne")}
    results = {
        "dataset": str(dataset),
        "fm": fm,
        "vm": vm,
        "p_values": p_values,
        "bootstrap_ci95": ci95,
        "bootstrap_mean": boot_mean,
        "transfer_ratio": _transfer_ratio(transfer_ratio, fm, vm),
        "timings_s": {str(k): _num(v) for k, v in (timings or {}).items()},
        "per_seed": per_seed,
        "n_test": int(n),
        "n_users": int(np.unique(users).shape[0]),
        "n_boot": int(n_boot),
    }
    return _json_safe(results)


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_results(path: str | os.PathLike, results: Mapping[str, Any]) -> Path:
    """Write ``results`` as JSON atomically (temp file + ``os.replace``); NaN/inf become null."""
    path = Path(path)
    text = json.dumps(_json_safe(results), indent=2, allow_nan=False) + "\n"
    _atomic_write_text(path, text)
    return path


def read_results(path: str | os.PathLike) -> Dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------
# report.md and plots
# --------------------------------------------------------------------------------------------
def _f(x: Any, digits: int = 4) -> str:
    v = _num(x)
    return "–" if v is None else f"{v:.{digits}f}"


def _fp(p: Any) -> str:
    v = _num(p)
    if v is None:
        return "n/a"
    if v == 0.0:
        return "0"
    return f"{v:.1e}" if v < 1e-3 else f"{v:.4f}"


def _fci(ci: Any) -> str:
    if not ci or any(_num(c) is None for c in ci):
        return "–"
    return f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"


def _label(variant: str) -> str:
    return VARIANT_LABELS.get(variant, variant)


def _all_variants(results: Mapping[str, Any]) -> List[str]:
    seen = {v for variants in results.get("vm", {}).values() for v in variants}
    return sorted(seen, key=_variant_sort_key)


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
            a = _f(e.get("auc"))
            if best[m] is not None and e.get("auc") == best[m] and len(vm[m]) > 1:
                a = f"**{a}**"
            cells += [a, _f(e.get("logloss"))]
        lines.append(f"| {_label(v)} | " + " | ".join(cells) + " |")
    fm = results.get("fm") or {}
    if any(fm.get(k) is not None for k in ("auc", "logloss")):
        lines.append("| FM (teacher) | " + " | ".join(
            f"{_f(fm.get('auc'))} | {_f(fm.get('logloss'))}" for _ in models) + " |")
    return "\n".join(lines)


def _detail_table(results: Mapping[str, Any]) -> str:
    vm, pv = results.get("vm", {}), results.get("p_values", {})
    ci = results.get("bootstrap_ci95", {})
    lines = ["| Model | Method | AUC ± std | seeds | LogLoss | NE | gAUC | ΔAUC vs w/o distill "
             "| p (paired t) | 95% CI ΔAUC (user bootstrap) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for m, variants in vm.items():
        base = variants.get("baseline")
        for v, e in variants.items():
            key = f"{v}_vs_baseline"
            delta = "–"
            if base is not None and v != "baseline" and None not in (e.get("auc"), base.get("auc")):
                delta = f"{e['auc'] - base['auc']:+.4f}"
            lines.append(
                f"| {m} | {_label(v)} | {_f(e.get('auc'))} ± {_f(e.get('auc_std'))} | "
                f"{e.get('n_seeds', '–')} | {_f(e.get('logloss'))} | {_f(e.get('ne'))} | "
                f"{_f(e.get('gauc'))} | {delta} | "
                f"{_fp(pv.get(m, {}).get(key)) if key in pv.get(m, {}) else '–'} | "
                f"{_fci(ci.get(m, {}).get(key))} |")
    return "\n".join(lines)


def _comparison_table(results: Mapping[str, Any]) -> str:
    vm, pv = results.get("vm", {}), results.get("p_values", {})
    ci, bm = results.get("bootstrap_ci95", {}), results.get("bootstrap_mean", {})
    lines = ["| Model | Comparison | ΔAUC (mean over seeds) | p (paired t over seeds) "
             "| 95% CI (user bootstrap, seed-averaged preds) | bootstrap mean |",
             "|---|---|---:|---:|---|---:|"]
    for m in vm:
        for key, p in pv.get(m, {}).items():
            a, _, b = key.partition("_vs_")
            ea, eb = vm[m].get(a, {}), vm[m].get(b, {})
            delta = "–"
            if None not in (ea.get("auc"), eb.get("auc")):
                delta = f"{ea['auc'] - eb['auc']:+.4f}"
            mean = bm.get(m, {}).get(key)
            lines.append(f"| {m} | {_label(a)} vs {_label(b)} | {delta} | {_fp(p)} | "
                         f"{_fci(ci.get(m, {}).get(key))} | "
                         f"{'–' if _num(mean) is None else f'{mean:+.4f}'} |")
    return "\n".join(lines)


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


def _sweep_lines(values: Mapping[Any, Any]) -> Dict[str, List[Tuple[float, float]]]:
    """``{x: auc}`` -> one line; ``{line: {x: auc}}`` -> one line per key."""
    def points(d: Mapping[Any, Any]) -> List[Tuple[float, float]]:
        pts = []
        for k, v in d.items():
            xv, yv = _num(k), _num(v.get("auc") if isinstance(v, Mapping) else v)
            if xv is not None and yv is not None:
                pts.append((xv, yv))
        return sorted(pts)

    if values and all(isinstance(v, Mapping) and "auc" not in v for v in values.values()):
        return {str(k): points(v) for k, v in values.items()}
    return {"AUC": points(values)}


def plot_sweep(param: str, values: Mapping[Any, Any], path: Path) -> Optional[Path]:
    """A line plot of AUC vs ``param`` (``values`` as in `write_report`'s ``sweeps``); None when
    nothing is numeric. ``param == "L"`` is labelled as the LoopFM sequence length."""
    lines = {k: v for k, v in _sweep_lines(values).items() if v}
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
                 sweeps: Optional[Mapping[str, Mapping[Any, Any]]] = None) -> Path:
    """Write ``out_dir/report.md`` and its PNGs (``auc_by_variant.png``, ``auc_vs_<p>.png``).

    ``sweeps``: ``{param: {value: auc}}`` (e.g. ``{"L": {10: 0.61, 25: 0.62}}``) or
    ``{param: {line_name: {value: auc}}}``; one line plot per param. Returns the report path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = [f"# LoopFM report — {results.get('dataset', '?')}", ""]
    n_test, n_users = results.get("n_test"), results.get("n_users")
    if n_test is not None:
        parts += [f"Test day: {n_test:,} examples, {n_users:,} users. Metrics are means over "
                  f"seeds; p-values are paired t-tests over seeds (two-sided); confidence "
                  f"intervals "
                  f"are 95% percentile intervals of a {results.get('n_boot', '?')}-resample "
                  f"user-level bootstrap on seed-averaged predictions (an ensemble over seeds, so "
                  f"its interval need not centre on the mean per-seed ΔAUC).", ""]
    parts += ["## Main results (Table-1 layout)", "", results_table(results), ""]
    fm = results.get("fm") or {}
    parts += ["## Foundation model (teacher)", "", "| Model | AUC | LogLoss | NE |",
              "|---|---:|---:|---:|",
              f"| FM | {_f(fm.get('auc'))} | {_f(fm.get('logloss'))} | {_f(fm.get('ne'))} |", ""]
    parts += ["## Details per model and method", "", _detail_table(results), ""]
    if any(results.get("p_values", {}).values()):
        parts += ["## Comparisons", "", _comparison_table(results), ""]
    tr = results.get("transfer_ratio") or {}
    if tr.get("by_model"):
        parts += ["## Transfer ratio", "", f"Definition: {tr.get('definition', '')}", "",
                  "| Model | Method | TR |", "|---|---|---:|"]
        for m, variants in tr["by_model"].items():
            for v, val in variants.items():
                parts.append(f"| {m} | {_label(v)} | {_f(val, 3)} |")
        parts.append("")
    if _plot_auc_by_variant(results, out / "auc_by_variant.png"):
        parts += ["## Plots", "", "![AUC by variant](auc_by_variant.png)", ""]
    for param, values in (sweeps or {}).items():
        fname = f"auc_vs_{_safe_name(param)}.png"
        if plot_sweep(str(param), values, out / fname):
            title = "AUC vs sequence length" if param == "L" else f"AUC vs {param}"
            parts += [f"### {title}", "", f"| {param} | " + " | ".join(
                _sweep_lines(values).keys()) + " |"]
            lines = _sweep_lines(values)
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
        parts += [f"| {k} | {_f(v, 1)} |" for k, v in timings.items()]
        total = sum(v for v in timings.values() if _num(v) is not None)
        parts += [f"| **total** | {total:.1f} |", ""]
    path = out / "report.md"
    _atomic_write_text(path, "\n".join(parts).rstrip() + "\n")
    return path


# --------------------------------------------------------------------------------------------
# TensorBoard
# --------------------------------------------------------------------------------------------
def _curve_points(curve: Any) -> List[Tuple[int, float]]:
    if isinstance(curve, Mapping):
        items = curve.items()
    else:
        seq = list(curve)
        items = seq if seq and isinstance(seq[0], (tuple, list)) else list(enumerate(seq))
    return [(int(s), float(v)) for s, v in items if _num(v) is not None]


def log_tensorboard(tb_dir: str | os.PathLike, results: Mapping[str, Any],
                    curves: Optional[Mapping[str, Any]] = None, *, run_name: str = "report",
                    sweeps: Optional[Mapping[str, Mapping[Any, Any]]] = None) -> Path:
    """Log the test metrics as TensorBoard scalars under ``tb_dir/run_name``; returns that folder.

    Tags: ``test/{model}/{variant}/{auc,logloss,ne,gauc,auc_std}``, ``test/fm/{auc,logloss,ne}``,
    ``transfer_ratio/{model}/{variant}``, ``sweep/{param}[/{line}]/auc`` (step = value),
    ``timings_s/{stage}``, and ``curves`` = ``{tag: {step: value} | [(step, value)] | [values]}``.
    The Table-1 block is also logged as text.
    """
    from torch.utils.tensorboard import SummaryWriter  # lazy: heavy import

    folder = Path(tb_dir) / run_name
    writer = SummaryWriter(log_dir=str(folder))
    try:
        for model, variants in results.get("vm", {}).items():
            for variant, entry in variants.items():
                for k in (*_METRIC_KEYS, "auc_std"):
                    v = _num(entry.get(k))
                    if v is not None:
                        writer.add_scalar(f"test/{model}/{variant}/{k}", v, 0)
        for k, v in (results.get("fm") or {}).items():
            if _num(v) is not None:
                writer.add_scalar(f"test/fm/{k}", float(v), 0)
        for model, variants in (results.get("transfer_ratio") or {}).get("by_model", {}).items():
            for variant, v in variants.items():
                if _num(v) is not None:
                    writer.add_scalar(f"transfer_ratio/{model}/{variant}", float(v), 0)
        for stage, v in (results.get("timings_s") or {}).items():
            if _num(v) is not None:
                writer.add_scalar(f"timings_s/{stage}", float(v), 0)
        for param, values in (sweeps or {}).items():
            for line, pts in _sweep_lines(values).items():
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


def make_report(out_dir: str | os.PathLike, dataset: str, fm_metrics: Optional[Mapping[str, float]],
                runs: Sequence[Run], labels: Any, user_ids: Any,
                timings: Optional[Mapping[str, float]] = None,
                transfer_ratio: Optional[Mapping[str, Any]] = None, *,
                sweeps: Optional[Mapping[str, Mapping[Any, Any]]] = None,
                curves: Optional[Mapping[str, Any]] = None,
                tb_dir: Optional[str | os.PathLike] = None,
                n_boot: int = 1000, boot_seed: int = 0) -> Dict[str, Any]:
    """Everything at once: ``out_dir/results.json``, ``out_dir/report.md`` + PNGs and, when
    ``tb_dir`` is given, TensorBoard scalars. Returns the results dict."""
    results = build_results(dataset, fm_metrics, runs, labels, user_ids, timings, transfer_ratio,
                            n_boot=n_boot, boot_seed=boot_seed)
    out = Path(out_dir)
    write_results(out / "results.json", results)
    write_report(out, results, sweeps=sweeps)
    if tb_dir is not None:
        log_tensorboard(tb_dir, results, curves=curves, sweeps=sweeps)
    return results
