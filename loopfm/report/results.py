"""``results.json``: every VM run's test-day metrics, averaged over seeds, the comparisons between
variants with both tests labelled by what they resample, the FM row and the transfer ratio.

Input: for every trained vertical model (VM) a :class:`Run` ``(model, variant, seed, preds)``
holding its test-day predictions, all in the same example order, plus the shared test-day
``labels`` and ``user_ids``. Variants are ``"baseline"`` (w/o distill), ``"kd"``, ``"loopfm"``
(LoopFM-only), ``"kd+loopfm"``, ``"kd+current"``; any other name (e.g. ``"loopfm[L=10]"``) is
reported as it is and compared with the baseline.

Shape (:func:`build_results`; written atomically by :func:`write_results`)::

    {"dataset": str,
     "fm": {"auc", "logloss", "ne"[, "undefined": {metric: reason}]},
     "vm": {MODEL: {VARIANT: {"auc", "logloss", "ne", "gauc", "auc_std", "n_seeds"
                              [, "undefined": {metric: reason}]}}},
     "statistics": {"delta_auc" | "p_values" | "bootstrap_ci95" | "bootstrap_mean": what it is},
     "comparisons": {MODEL: {"A_vs_B": {"delta_auc", "seeds": [..],
                                        "t_test": {"measures", "n", "p_value"[, "why_null"]},
                                        "user_bootstrap": {"measures", "n_boot", "ci95", "mean"
                                                           [, "why_null"]}}}},
     "delta_auc" | "p_values" | "bootstrap_mean": {MODEL: {"A_vs_B": float | null}},
     "bootstrap_ci95": {MODEL: {"A_vs_B": [lo, hi]}},      (flat views of "comparisons")
     "transfer_ratio": {"definition", "min_dne_fm", ..., "by_model": {MODEL: {VARIANT: float | null}}
                        [, "undefined": {MODEL: {VARIANT: reason}}]},
     "timings_s": {STAGE: float},
     "per_seed": {MODEL: {VARIANT: {SEED: {"auc", "logloss", "ne", "gauc"[, "undefined"]}}}},
     "n_test": int, "n_users": int, "n_boot": int}

ΔAUC is the mean over the seeds both variants have of the per-seed ``AUC(a) - AUC(b)``. Both
tests are of that one number: the t-test resamples seeds (initialisation on a fixed test set),
the bootstrap resamples test users (`loopfm.stats`). Every float is finite or ``null``; a null
says why (one seed: no t-test; a metric undefined on the test day: no comparison).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from loopfm import metrics as M
from loopfm.artifacts import atomic_write_text
from loopfm.stats import SEEDS_MEASURE, USERS_MEASURE, bootstrap_aucs, paired_bootstrap_from_aucs, paired_t_test

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
METRIC_KEYS = ("auc", "logloss", "ne", "gauc")
#: A transfer ratio whose FM NE gain |ΔNE_FM| is below this is null (it would divide by noise).
MIN_DNE_FM = 0.01
STATISTICS = {
    "delta_auc": "mean over the seeds both variants have of the per-seed AUC(a) - AUC(b)",
    "p_values": f"{SEEDS_MEASURE}, of the per-seed AUC(a) - AUC(b); null with fewer than two seeds",
    "bootstrap_ci95": f"{USERS_MEASURE}, of delta_auc: users drawn with replacement, every seed of both "
                      "variants scored on the same resample",
    "bootstrap_mean": "mean of delta_auc over the user-bootstrap resamples",
}


@dataclass(kw_only=True)
class ReportConfig:
    """How the report computes its statistics (`loopfm.report`)."""
    n_boot: int = field(default=1000, metadata={"help": "user-bootstrap resamples per comparison"})
    boot_seed: int = field(default=0, metadata={"help": "seed of the user bootstrap's resampling"})
    min_dne_fm: float = field(default=MIN_DNE_FM, metadata={
        "help": "a transfer ratio whose |dNE_FM| is below this is null with a reason (it would divide by noise)"})

    def __post_init__(self) -> None:
        if self.n_boot < 1 or self.min_dne_fm < 0:
            raise ValueError(f"report.n_boot must be >= 1 and report.min_dne_fm >= 0; got {self.n_boot}, "
                             f"{self.min_dne_fm}")


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


def num(x: Any) -> Optional[float]:
    """A finite Python float, or None (NaN/inf/None/non-numeric)."""
    if x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def json_safe(obj: Any) -> Any:
    """Recursively: numpy scalars -> Python, non-finite floats -> None, tuples -> lists."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [json_safe(v) for v in obj.tolist()]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return num(obj)
    return obj


def variant_sort_key(variant: str) -> Tuple[int, str]:
    if variant in VARIANT_ORDER:
        return VARIANT_ORDER.index(variant), ""
    return len(VARIANT_ORDER), variant


def _run_metrics(run: Run, labels: np.ndarray, user_ids: np.ndarray) -> Dict[str, Any]:
    """The run's metrics (given ones kept); undefined ones None with their reason."""
    given = dict(run.metrics or {})
    out: Dict[str, Any] = {k: num(given.get(k)) for k in METRIC_KEYS}
    undefined = dict(given.get("undefined") or {})
    if any(out[k] is None and k not in undefined for k in METRIC_KEYS):
        computed = M.defined_metrics(labels, run.preds, groups=user_ids)
        for k in METRIC_KEYS:
            if out[k] is None and k not in undefined:
                out[k] = num(computed[k])
        undefined.update(computed.get("undefined", {}))
    if undefined:
        out["undefined"] = {k: undefined[k] for k in METRIC_KEYS if k in undefined}
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


class ResampledAUCs:
    """The AUCs of prediction arrays on the user resamples of one test set, each array's computed
    once. Every comparison on a test set draws the same resamples (`stats.bootstrap_aucs`), so a
    variant that is in several comparisons needs its resampled AUCs only once; `prefetch` computes
    many arrays in one pass over the resamples."""

    def __init__(self, labels: np.ndarray, users: np.ndarray, *, n_boot: int, seed: int) -> None:
        self.labels, self.users, self.n_boot, self.seed = labels, users, int(n_boot), int(seed)
        self._rows: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}  # id(preds) -> (preds, its AUCs)

    def prefetch(self, arrays: Sequence[np.ndarray]) -> None:
        missing = list({id(p): p for p in arrays if id(p) not in self._rows}.values())
        if missing:
            aucs = bootstrap_aucs(self.labels, np.stack(missing), self.users, self.n_boot, self.seed)
            for p, row in zip(missing, aucs):
                self._rows[id(p)] = (p, row)  # the array is held, so its id is not reused

    def of(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        """``[len(arrays), n_boot]``."""
        self.prefetch(arrays)
        return np.stack([self._rows[id(p)][1] for p in arrays])


def compare(labels: np.ndarray, users: np.ndarray, a: Mapping[int, Tuple[np.ndarray, Optional[float]]],
            b: Mapping[int, Tuple[np.ndarray, Optional[float]]], *, n_boot: int, boot_seed: int,
            resampled: Optional[ResampledAUCs] = None) -> Dict[str, Any]:
    """Variant a against b on one test set: ``a`` / ``b`` map seed -> (predictions, AUC).

    ΔAUC is the mean over the common seeds of the per-seed AUC difference; the paired t-test over
    those seeds and the user bootstrap of the same ΔAUC come with what each resamples, and a null
    comes with why. ``resampled``: the test set's `ResampledAUCs`, shared by its comparisons (made
    for this call when None; the same numbers either way).
    """
    seeds = sorted(set(a) & set(b))
    t_test: Dict[str, Any] = {"measures": SEEDS_MEASURE, "n": len(seeds), "p_value": None}
    boot: Dict[str, Any] = {"measures": USERS_MEASURE, "n_boot": int(n_boot), "ci95": [None, None], "mean": None}
    out: Dict[str, Any] = {"delta_auc": None, "seeds": seeds, "t_test": t_test, "user_bootstrap": boot}
    auc_a, auc_b = [a[s][1] for s in seeds], [b[s][1] for s in seeds]
    if not seeds or None in auc_a + auc_b:
        why = "no seed in common" if not seeds else "AUC is undefined on the test day"
        t_test["why_null"] = boot["why_null"] = why
        return out
    out["delta_auc"] = float(np.mean(np.subtract(auc_a, auc_b)))
    if len(seeds) < 2:
        t_test["why_null"] = "one seed: a t-test over seeds needs at least two (vm.seeds)"
    else:
        t_test["p_value"] = num(paired_t_test(auc_a, auc_b))
    resampled = resampled or ResampledAUCs(labels, users, n_boot=n_boot, seed=boot_seed)
    lo, hi, mean = paired_bootstrap_from_aucs(resampled.of([a[s][0] for s in seeds]),
                                              resampled.of([b[s][0] for s in seeds]))
    boot["ci95"], boot["mean"] = [num(lo), num(hi)], num(mean)
    if boot["mean"] is None:
        boot["why_null"] = "no user resample had both classes"
    return out


def _transfer_ratio(spec: Optional[Mapping[str, Any]], fm: Mapping[str, Optional[float]],
                    vm: Mapping[str, Mapping[str, Mapping[str, Any]]], min_dne_fm: float) -> Dict[str, Any]:
    """See :func:`build_results` for the three forms of ``spec``."""
    undefined: Dict[str, Dict[str, str]] = {}

    def tr(model: str, variant: str, vm_before, vm_after, fm_before, fm_after) -> Optional[float]:
        why = None
        if None in (vm_before, vm_after, fm_before, fm_after):
            why = "an NE it needs is missing or undefined"
        elif abs(fm_before - fm_after) < min_dne_fm:
            why = (f"|dNE_FM| = {abs(fm_before - fm_after):.4g} is below the floor {min_dne_fm:g} "
                   "(report.min_dne_fm): the ratio would divide by noise")
        if why is not None:
            undefined.setdefault(model, {})[variant] = why
            return None
        return num(M.transfer_ratio(vm_before, vm_after, fm_before, fm_after))

    if spec is None:
        ne_fm = num(fm.get("ne"))
        by_model: Dict[str, Dict[str, Optional[float]]] = {}
        for model, variants in vm.items():
            base = variants.get("baseline")
            if base is None or (ne_fm is None and "ne" not in (fm.get("undefined") or {})):
                continue  # nothing to compare with (a null FM NE with a reason is reported as such)
            by_model[model] = {v: tr(model, v, base["ne"], m["ne"], base["ne"], ne_fm)
                               for v, m in variants.items() if v != "baseline"}
        if not by_model:
            return {}
        out = {"definition": "fm_gap: TR = (NE_VM[baseline] - NE_VM[variant]) / (NE_VM[baseline] - NE_FM), "
                             "the fraction of the FM's NE advantage over the baseline VM that the variant "
                             "captures (metrics.transfer_ratio); dNE_FM = NE_VM[baseline] - NE_FM",
               "min_dne_fm": min_dne_fm, "ne_fm": ne_fm, "by_model": by_model}
    elif "ne_fm_before" in spec or "ne_fm_after" in spec:
        fm_before, fm_after = num(spec.get("ne_fm_before")), num(spec.get("ne_fm_after"))
        if fm_after is None:
            fm_after = num(fm.get("ne"))
        by_model = {str(model): {str(v): tr(str(model), str(v), num(ne_b), (vm.get(model, {}).get(v) or {}).get("ne"),
                                            fm_before, fm_after) for v, ne_b in variants.items()}
                    for model, variants in (spec.get("ne_vm_before") or {}).items()}
        out = {"definition": "fm_update: TR = (NE_VM before - NE_VM after) / (NE_FM before - NE_FM after) for "
                             "an FM update, VM 'after' = this run (metrics.transfer_ratio)",
               "min_dne_fm": min_dne_fm, "ne_fm_before": fm_before, "ne_fm_after": fm_after, "by_model": by_model}
    else:
        by_model = spec.get("by_model", spec)
        return {"definition": str(spec.get("definition", "given")),
                "by_model": json_safe({m: dict(v) for m, v in by_model.items() if isinstance(v, Mapping)})}
    if undefined:
        out["undefined"] = undefined
    return out


def _group_runs(runs: Sequence[Run], n: int) -> Dict[str, Dict[str, Dict[int, Run]]]:
    grouped: Dict[str, Dict[str, Dict[int, Run]]] = {}
    for run in runs:
        preds = np.asarray(run.preds, dtype=np.float64).reshape(-1)
        if preds.shape[0] != n:
            raise ValueError(f"run {run.model}/{run.variant}/seed={run.seed} has {preds.shape[0]} "
                             f"predictions for {n} test examples")
        slot = grouped.setdefault(str(run.model), {}).setdefault(str(run.variant), {})
        if int(run.seed) in slot:
            raise ValueError(f"duplicate run {run.model}/{run.variant}/seed={run.seed}")
        slot[int(run.seed)] = Run(str(run.model), str(run.variant), int(run.seed), preds, run.metrics)
    return grouped


def _aggregate(ms: Mapping[int, Mapping[str, Any]]) -> Dict[str, Any]:
    """Mean over seeds of each metric (null if any seed's is), AUC std over seeds, reasons."""
    seeds = sorted(ms)
    entry: Dict[str, Any] = {k: _mean_or_none([ms[s][k] for s in seeds]) for k in METRIC_KEYS}
    aucs = [ms[s]["auc"] for s in seeds]
    entry["auc_std"] = (float(np.std(aucs, ddof=1)) if len(aucs) > 1 else 0.0) if None not in aucs else None
    entry["n_seeds"] = len(seeds)
    undefined = {k: why for s in seeds for k, why in ms[s].get("undefined", {}).items()}
    if undefined:
        entry["undefined"] = undefined
    return entry


def build_results(
    dataset: str,
    fm_metrics: Optional[Mapping[str, Any]],
    runs: Sequence[Run],
    labels: Any,
    user_ids: Any,
    timings: Optional[Mapping[str, float]] = None,
    transfer_ratio: Optional[Mapping[str, Any]] = None,
    *,
    n_boot: int = 1000,
    boot_seed: int = 0,
    min_dne_fm: float = MIN_DNE_FM,
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
    A computed ratio is null, with its reason, when ``|dNE_FM| < min_dne_fm``.
    """
    y = np.asarray(labels).reshape(-1)
    users = np.asarray(user_ids).reshape(-1)
    n = y.shape[0]
    if users.shape[0] != n:
        raise ValueError(f"user_ids have {users.shape[0]} entries for {n} labels")
    if not runs:
        raise ValueError("build_results needs at least one Run")
    grouped = _group_runs(runs, n)

    vm: Dict[str, Dict[str, Dict[str, Any]]] = {}
    per_seed: Dict[str, Dict[str, Dict[str, Dict[str, Any]]]] = {}
    comparisons: Dict[str, Dict[str, Dict[str, Any]]] = {}
    resampled = ResampledAUCs(y, users, n_boot=n_boot, seed=boot_seed)
    for model in grouped:
        variants = dict(sorted(grouped[model].items(), key=lambda kv: variant_sort_key(kv[0])))
        vm[model], per_seed[model], comparisons[model] = {}, {}, {}
        seed_metrics = {v: {s: _run_metrics(by_seed[s], y, users) for s in sorted(by_seed)}
                        for v, by_seed in variants.items()}
        for variant, ms in seed_metrics.items():
            vm[model][variant] = _aggregate(ms)
            per_seed[model][variant] = {str(s): m for s, m in ms.items()}
        pairs = _comparisons(variants)
        if all(m["auc"] is not None for ms in seed_metrics.values() for m in ms.values()):
            compared = dict.fromkeys(v for pair in pairs for v in pair)
            resampled.prefetch([run.preds for v in compared for run in variants[v].values()])  # one pass
        for a, b in pairs:
            side = {v: {s: (variants[v][s].preds, seed_metrics[v][s]["auc"]) for s in variants[v]} for v in (a, b)}
            comparisons[model][f"{a}_vs_{b}"] = compare(y, users, side[a], side[b], n_boot=n_boot,
                                                        boot_seed=boot_seed, resampled=resampled)

    def view(get) -> Dict[str, Dict[str, Any]]:
        return {m: {k: get(c) for k, c in cs.items()} for m, cs in comparisons.items()}

    fm_metrics = fm_metrics or {}
    fm: Dict[str, Any] = {k: num(fm_metrics.get(k)) for k in ("auc", "logloss", "ne")}
    if fm_metrics.get("undefined"):
        fm["undefined"] = dict(fm_metrics["undefined"])
    results = {
        "dataset": str(dataset),
        "fm": fm,
        "vm": vm,
        "statistics": dict(STATISTICS),
        "comparisons": comparisons,
        "delta_auc": view(lambda c: c["delta_auc"]),
        "p_values": view(lambda c: c["t_test"]["p_value"]),
        "bootstrap_ci95": view(lambda c: c["user_bootstrap"]["ci95"]),
        "bootstrap_mean": view(lambda c: c["user_bootstrap"]["mean"]),
        "transfer_ratio": _transfer_ratio(transfer_ratio, fm, vm, min_dne_fm),
        "timings_s": {str(k): num(v) for k, v in (timings or {}).items()},
        "per_seed": per_seed,
        "n_test": int(n),
        "n_users": int(np.unique(users).shape[0]),
        "n_boot": int(n_boot),
    }
    return json_safe(results)


def write_results(path: str | os.PathLike, results: Mapping[str, Any]) -> Path:
    """Write ``results`` as JSON atomically (temp file + ``os.replace``); NaN/inf become null."""
    path = Path(path)
    atomic_write_text(path, json.dumps(json_safe(results), indent=2, allow_nan=False) + "\n")
    return path


def read_results(path: str | os.PathLike) -> Dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))
