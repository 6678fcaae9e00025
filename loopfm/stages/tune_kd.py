"""tune-kd: choose the aux-head KD hyperparameters (α, γ, β) on a validation day, never the test day.

The paper's α=5, γ=10, β=5 were chosen for TaobaoAd (a few % positives): the auxiliary target
``min(α·ŷ_F, 1)`` then stays below 1. On MovieLens (55 % positives) α=5 saturates nearly every
target at 1, so the values must be chosen per dataset, and choosing them on the test day would
leak the test set into the reported numbers. This stage trains one streaming pass on
``tune_kd.train_days`` (default 5–6) per grid point, scores ``tune_kd.valid_day`` (default 7) and
ranks the points; the chosen values then go into ``vm.kd`` for `train-vm` (days 5–7 → test day 8).

What is read: the event log's rows of the tuning days only and the FM's soft labels of the
training days only (extract); ``vm.test_day`` is refused as a tuning day. For ``kd+loopfm`` the
sequence reader (`VMInputs`) loads the shared timeline and its per-day offset index, but an
example's history holds only entries strictly earlier than the example, so nothing of a later
day reaches a VM.

Only ``vm.kd.mode=aux_head`` (the paper's KD, whose α is the dataset-dependent knob) is
searched; a config with another mode is refused rather than tuning a loss it does not train.

Output ``RUN/tune_kd/``: ``results.json`` (every point per model and seed, the no-KD reference,
the best point) and ``_SUCCESS``, written atomically.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # loopfm.experiment imports this module's config: no runtime import of it here
    from loopfm.experiment import LoopFMConfig

REFERENCE = {"kd": "baseline", "kd+loopfm": "loopfm"}  # the same VM without KD
METRICS = ("auc", "logloss", "ne", "gauc")


@dataclass(kw_only=True)
class KDSearchConfig:
    """The grid `loopfm tune-kd` searches and the days it trains and validates on."""
    train_days: list[int] = field(default_factory=lambda: [5, 6], metadata={
        "help": "days of the one streaming training pass per grid point"})
    valid_day: int = field(default=7, metadata={
        "help": "day the grid points are scored on (after the training days; never vm.test_day)"})
    alpha: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 5.0], metadata={
        "help": "values of vm.kd.alpha to try (aux target = min(alpha * soft label, 1))"})
    # With Adam, gamma and beta act only through gamma * beta (Adam cancels a constant scale of the
    # auxiliary head's own gradient; the trunk gets task + gamma * beta * aux), so the default grid
    # spans that product once: {1, 5, 10, 50} (the paper's 10 * 5 = 50).
    gamma: list[float] = field(default_factory=lambda: [1.0, 10.0], metadata={
        "help": "values of vm.kd.gamma to try (weight of the auxiliary loss)"})
    beta: list[float] = field(default_factory=lambda: [1.0, 5.0], metadata={
        "help": "values of vm.kd.beta to try (scale of the auxiliary gradient into the trunk)"})
    variant: Literal["kd", "kd+loopfm"] = field(default="kd", metadata={
        "help": "which KD variant to tune; its no-KD counterpart (baseline / loopfm) is the reference"})
    models: list[str] = field(default_factory=list, metadata={
        "help": "VMs to tune on (the score is their mean); empty = the first of vm.models"})
    metric: Literal["auc", "ne"] = field(default="auc", metadata={
        "help": "ranking metric on the validation day: auc (higher is better) or ne (lower is better)"})
    seeds: int = field(default=1, metadata={"help": "repeat every grid point with this many seeds (mean ranks)"})

    def __post_init__(self) -> None:
        if not self.train_days:
            raise ValueError("tune_kd.train_days must name at least one day")
        if self.valid_day in self.train_days:
            raise ValueError(f"tune_kd.valid_day {self.valid_day} is also a training day {self.train_days}")
        if self.valid_day < max(self.train_days):
            raise ValueError(f"tune_kd.valid_day {self.valid_day} must come after the training days "
                             f"{self.train_days} (one streaming pass forward in time)")
        for name in ("alpha", "gamma", "beta"):
            values = getattr(self, name)
            if not values:
                raise ValueError(f"tune_kd.{name} must list at least one value")
            if not all(v >= 0 for v in values):
                raise ValueError(f"tune_kd.{name} values must be >= 0, got {values}")
        if self.seeds < 1:
            raise ValueError(f"tune_kd.seeds must be >= 1, got {self.seeds}")

    def grid(self) -> list[tuple[float, float, float]]:
        """Every (alpha, gamma, beta), in config order (ties in the ranking keep this order)."""
        unique = [list(dict.fromkeys(v)) for v in (self.alpha, self.gamma, self.beta)]
        return list(itertools.product(*unique))

    def days(self) -> list[int]:
        return [*self.train_days, self.valid_day]


def run_tune_kd(cfg: LoopFMConfig, run_dir: str | Path, *, progress: bool = True, force: bool = False) -> dict:
    """Score every grid point (× models × seeds) and the no-KD reference on the validation day;
    write ``RUN/tune_kd`` and return its results (undefined metrics as None). When ``RUN/tune_kd`` is
    complete for the same config and inputs and not ``force``, returns it with ``up_to_date``."""
    from loopfm.artifacts import is_complete

    run_dir = Path(run_dir)
    out = run_dir / "tune_kd"
    models = _check(cfg)
    key = _config_hash(cfg, run_dir)
    if not force and is_complete(out, key):
        return {**json.loads((out / "results.json").read_text()), "up_to_date": True}
    schema, train, valid = _tuning_batches(cfg, run_dir)
    runs = _train_grid(cfg, models, schema, train, valid, progress=progress)
    results = _finite_or_null(summarize(cfg.tune_kd, runs, models, test_day=cfg.vm.test_day))
    _write(out, results, key)
    return results


def _check(cfg: LoopFMConfig) -> list[str]:
    """Refuse the test day as a tuning day, a KD mode other than aux_head and unknown models
    before any work; returns the models to tune on."""
    from loopfm.config import ConfigError

    t, test = cfg.tune_kd, cfg.vm.test_day
    if t.valid_day == test or test in t.train_days:
        raise ConfigError(f"tune_kd must not use the test day vm.test_day={test} (train_days {t.train_days}, "
                          f"valid_day {t.valid_day}): choose hyperparameters on earlier days")
    if cfg.vm.kd.mode != "aux_head":
        raise ConfigError(f"tune-kd searches the aux_head KD (alpha, gamma, beta); vm.kd.mode is "
                          f"{cfg.vm.kd.mode!r}: set vm.kd.mode=aux_head")
    models = t.models or cfg.vm.models[:1]
    for m in models:
        try:
            dataclasses.replace(cfg.vm.model, model=m)
        except ValueError as err:
            raise ConfigError(f"tune_kd.models: {err}") from None
    return models


def _config_hash(cfg: LoopFMConfig, run_dir: Path) -> str:
    """This search's config plus the hashes of the stage outputs it reads (as found on disk)."""
    from loopfm.artifacts import read_manifest
    from loopfm.config import config_hash

    inputs = ["data", "extract"] + (["compress", "sequences"] if cfg.tune_kd.variant == "kd+loopfm" else [])
    up = {name: read_manifest(run_dir / name).get("config_hash", "") for name in inputs}
    return config_hash({"up": up, "vm": cfg.vm, "tune_kd": cfg.tune_kd})


def _tuning_batches(cfg: LoopFMConfig, run_dir: Path) -> tuple[object, list, list]:
    """(schema, training batches with soft labels, validation batches), built once for every run.

    Soft labels are read for the training days only (validation predicts with the serving head)."""
    import torch

    from loopfm.config import ConfigError
    from loopfm.data.eventlog import EventLog
    from loopfm.stages.train_vm import VMInputs, soft_labels

    t = cfg.tune_kd
    assert cfg.vm.test_day not in t.days(), "the test day must never be read here"  # _check refused it
    log = EventLog(run_dir / "data")
    missing = sorted(set(t.days()) - set(log.days))
    if missing:
        raise ConfigError(f"tune_kd days {missing} are not in the event log (days {log.days})")
    try:  # the training days' soft labels only: the validation day predicts without them
        soft = soft_labels(run_dir / "extract", log.num_rows(), days=t.train_days)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    inputs = VMInputs(run_dir, log, cfg.vm, needs_seq=t.variant == "kd+loopfm", needs_kd=False)
    train = []
    for b in inputs.batches(t.train_days):
        s = soft[b.example_ids.numpy()]
        if math.isnan(float(s.sum())):
            raise ConfigError(f"extract has no soft label for some examples of days {t.train_days}: "
                              "rerun extract over them")
        train.append(dataclasses.replace(b, soft_labels=torch.from_numpy(s)))
    return log.schema, train, inputs.batches([t.valid_day])


def _train_grid(cfg: LoopFMConfig, models: list[str], schema, train: list, valid: list, *,
                progress: bool) -> list[dict]:
    """One run per (point or reference, model, seed): ``{"point", "model", "seed", "metrics"}``,
    ``point`` = (alpha, gamma, beta), or None for the no-KD reference (run first)."""
    import torch
    from loopfm.progress import progress_bar, write

    from loopfm.vm.train import run_vm

    t, vm = cfg.tune_kd, cfg.vm
    points: list[tuple[float, float, float] | None] = [None, *t.grid()]
    jobs = [(p, m, s) for p in points for m in models for s in range(t.seeds)]
    runs = []
    threads = torch.get_num_threads()
    torch.set_num_threads(vm.threads)
    try:
        for point, model, seed in progress_bar(jobs, desc="tune-kd", unit=" run", enabled=progress):
            variant, kd = REFERENCE[t.variant], vm.kd
            if point is not None:
                variant, kd = t.variant, dataclasses.replace(vm.kd, alpha=point[0], gamma=point[1], beta=point[2])
            name = f"{model}/{'reference' if point is None else 'a%g_g%g_b%g' % point}/{seed}"
            result = run_vm(dataclasses.replace(vm.model, model=model),
                            dataclasses.replace(vm.train, seed=vm.train.seed + seed), kd, schema, train, valid,
                            variant=variant)
            runs.append({"point": point, "model": model, "seed": seed, "metrics": result.metrics})
            if progress:
                write(f"  {name:28s} auc {_fmt(result.metrics['auc'])}  ne {_fmt(result.metrics['ne'])}")
    finally:
        torch.set_num_threads(threads)
    return runs


def summarize(search: KDSearchConfig, runs: list[dict], models: list[str], *, test_day: int) -> dict:
    """Group the runs by point, average seeds then models, rank by ``search.metric`` (NaN last)."""
    higher = search.metric == "auc"
    ref = _aggregate([r for r in runs if r["point"] is None], models)
    points = []
    for alpha, gamma, beta in search.grid():
        agg = _aggregate([r for r in runs if r["point"] == (alpha, gamma, beta)], models)
        delta = agg["mean"][search.metric] - ref["mean"][search.metric]
        points.append({"alpha": alpha, "gamma": gamma, "beta": beta, "score": agg["mean"][search.metric],
                       "delta": delta, **agg})

    def rank_key(p: dict) -> tuple[bool, float]:
        s = p["score"]
        return (math.isnan(s), -s if higher else s)

    points.sort(key=rank_key)  # stable: ties keep the grid order
    best = points[0]
    return {
        "metric": search.metric, "higher_is_better": higher, "variant": search.variant,
        "train_days": search.train_days, "valid_day": search.valid_day, "test_day_unused": test_day,
        "models": models, "seeds": search.seeds,
        "reference": {"variant": REFERENCE[search.variant], "score": ref["mean"][search.metric], **ref},
        "points": points,
        "best": {"alpha": best["alpha"], "gamma": best["gamma"], "beta": best["beta"], "score": best["score"],
                 "delta": best["delta"], "overrides": best_overrides(best)},
    }


def best_overrides(point: dict) -> str:
    """The ``key=value`` overrides that put a point into the VM config."""
    return " ".join(f"vm.kd.{k}={float(point[k])}" for k in ("alpha", "gamma", "beta"))


def results_table(results: dict) -> str:
    """Markdown: the points best first (means over models and seeds), then the no-KD reference."""
    metric, ref = results["metric"], results["reference"]
    name = {"auc": "AUC", "ne": "NE"}[metric]
    lines = [f"tune-kd {results['variant']} on {', '.join(results['models'])}: train days "
             f"{results['train_days']}, valid day {results['valid_day']}, {results['seeds']} seed(s), "
             f"ranked by {name} ({'higher' if results['higher_is_better'] else 'lower'} is better)",
             "", f"| alpha | gamma | beta | valid AUC | LogLoss | NE | Δ{name} vs {ref['variant']} |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for p in results["points"]:
        m = p["mean"]
        lines.append(f"| {p['alpha']:g} | {p['gamma']:g} | {p['beta']:g} | {_fmt(m['auc'])} | "
                     f"{_fmt(m['logloss'])} | {_fmt(m['ne'])} | {_fmt(p['delta'], '+.4f')} |")
    m = ref["mean"]
    lines.append(f"| {ref['variant']} (no KD) | | | {_fmt(m['auc'])} | {_fmt(m['logloss'])} | {_fmt(m['ne'])} | "
                 "0 |")
    return "\n".join(lines)


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)


def _aggregate(runs: list[dict], models: list[str]) -> dict:
    """``by_model``: each model's per-seed metrics and seed mean; ``mean``: the mean over models."""
    by_model = {}
    for m in models:
        seeds = [r["metrics"] for r in sorted(runs, key=lambda r: r["seed"]) if r["model"] == m]
        by_model[m] = {"seeds": seeds, "mean": _mean(seeds)}
    return {"by_model": by_model, "mean": _mean([v["mean"] for v in by_model.values()])}


def _mean(rows: list[dict]) -> dict[str, float]:
    return {k: sum(r.get(k, math.nan) for r in rows) / len(rows) for k in METRICS}


def _write(out: Path, results: dict, key: str) -> None:
    from loopfm.artifacts import atomic_output, write_manifest

    with atomic_output(out) as tmp:
        (tmp / "results.json").write_text(json.dumps(results, indent=2))
        best = results["best"]
        write_manifest(tmp, stage="tune-kd", config_hash=key, metric=results["metric"],
                       valid_day=results["valid_day"], train_days=results["train_days"],
                       test_day_unused=results["test_day_unused"], points=len(results["points"]),
                       best=best["overrides"])


def _finite_or_null(x):
    """JSON without NaN / Infinity (a metric can be undefined, e.g. gAUC with no mixed user)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite_or_null(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_or_null(v) for v in x]
    return x
