"""`loopfm diagnose RUN`: can KD and LoopFM help on this data? Answered after extract, before
any VM run is spent.

LoopFM's gain needs information the FM has and the VM lacks (the paper's corollary): if the FM
does not beat a VM trained on the same ids, neither its soft labels (KD) nor its codes (LoopFM)
carry much a VM could learn. Everything here is measured on the **validation day**
(``tune_kd.valid_day``, default 7; never ``vm.test_day``), except the two coverage shares, which
count only ids and timestamps of the test day (no labels):

* **FM vs VM baseline** -- the FM's NE and AUC from its soft labels in RUN/extract (the FM that
  scores the VM's days: the fixed or the daily one), against one quick VM baseline (the VM's
  features only, no KD, no sequences; the first of ``tune_kd.models`` or ``vm.models``) trained
  one pass on *every* day before the validation day -- at least the data the FM had, so what
  separates the two is the FM's own features and size, not more days (a VM on two days is so
  badly calibrated on small logs that the FM would always look ahead). ΔNE = NE_VM - NE_FM
  (> 0: the FM is better).
* **Sequence coverage** -- the share of test-day rows whose LoopFM sequence (the
  ``sequences`` rule: ``vm.sequence_key``, window, entry labels, max_len, entries from the extract
  days) is non-empty, and the mean length.
* **Users seen** -- the share of test-day users (and rows) whose user appears in the VM's
  training days: a VM's id embedding is untrained for the rest.
* **Code drift** -- from extract's manifest: the daily FM's mean cosine with the fixed FM's codes,
  and the day centroid's shift.

Verdict: headroom when ΔNE >= ``HEADROOM_NE`` (0.01, one percent of the NE of a constant
predictor) and the FM reads at least one FM-only feature (without one there is no feature gap: the
FM knows nothing the VM cannot see, whatever its margin); otherwise little is to be expected from
KD or LoopFM. A thin sequence coverage adds a caveat.

Output: ``RUN/diagnose/diagnose.json`` (+ ``_SUCCESS``, written atomically, skipped when up to date);
`run` prints it after extract and the report appends it to report.md.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from loopfm.artifacts import atomic_output, is_complete, read_manifest, write_manifest
from loopfm.config import ConfigError, config_hash

if TYPE_CHECKING:
    from loopfm.experiment import LoopFMConfig

HEADROOM_NE = 0.01  # ΔNE below this: expect little from KD or LoopFM
THIN_COVERAGE = 0.5  # below this share of non-empty test-day sequences LoopFM has little to read
FOLDER = "diagnose"


def run_diagnose(cfg: LoopFMConfig, run_dir: str | Path, *, force: bool = False, progress: bool = False) -> dict:
    """Measure (or read back) the diagnosis of a run whose prepare, train-fm and extract are done."""
    run_dir = Path(run_dir)
    out = run_dir / FOLDER
    for stage in ("data", "fm", "extract"):
        if not (run_dir / stage / "_SUCCESS").is_file():
            raise ConfigError(f"diagnose needs a finished {stage} stage in {run_dir} (run prepare, train-fm "
                              f"and extract first)")
    key = config_hash({"up": {s: read_manifest(run_dir / s).get("config_hash", "") for s in ("data", "extract")},
                       "vm": cfg.vm, "tune_kd": cfg.tune_kd, "sequences": cfg.sequences})
    if not force and is_complete(out, key):
        return json.loads((out / "diagnose.json").read_text())
    result = diagnose(cfg, run_dir, progress=progress)
    with atomic_output(out) as tmp:
        (tmp / "diagnose.json").write_text(json.dumps(result, indent=2))
        write_manifest(tmp, stage="diagnose", config_hash=key, verdict=result["verdict"])
    return result


def diagnose(cfg: LoopFMConfig, run_dir: Path, *, progress: bool = False) -> dict:
    from loopfm.data.eventlog import EventLog

    log = EventLog(run_dir / "data")
    valid_day, test_day = cfg.tune_kd.valid_day, cfg.vm.test_day
    if valid_day >= test_day:
        raise ConfigError(f"diagnose measures on tune_kd.valid_day={valid_day}, which must come before "
                          f"vm.test_day={test_day}")
    missing = sorted({valid_day, test_day} - set(log.days))
    if missing:
        raise ConfigError(f"days {missing} are not in the event log (days {log.days}); set tune_kd.valid_day "
                          f"and vm.test_day to days of this log")
    train_days = [d for d in log.days if d < valid_day]  # what the FM could learn from, and more
    if not train_days:
        raise ConfigError(f"diagnose trains its VM baseline on the days before tune_kd.valid_day={valid_day}; "
                          f"the event log has none (days {log.days})")
    fm = _fm_metrics(log, run_dir, valid_day)
    model, vm = _vm_baseline(cfg, run_dir, log, train_days, valid_day, progress)
    delta_ne, delta_auc = vm["ne"] - fm["ne"], fm["auc"] - vm["auc"]
    extract = read_manifest(run_dir / "extract")
    coverage = sequence_coverage(cfg, log, extract, test_day)
    seen = users_seen(log, cfg.vm.train_days, test_day)
    fm_only = fm_only_features(cfg, run_dir)
    result = {
        "valid_day": valid_day, "test_day": test_day, "vm_train_days": train_days, "baseline_model": model,
        "fm": fm, "vm_baseline": vm, "delta_ne": delta_ne, "delta_auc": delta_auc,
        "sequences": coverage, "users_seen": seen,
        "drift": {"fm_checkpoint": extract.get("fm_checkpoint", "fixed"), "by_day": extract.get("drift", {})},
        "fm_only_features": fm_only,
    }
    result["headroom"] = bool(delta_ne >= HEADROOM_NE and fm_only)
    result["verdict"] = verdict(result)
    return result


def fm_only_features(cfg: LoopFMConfig, run_dir: Path) -> list[str]:
    """The FM-only features the FM reads (``fm.model``'s feature selection on the event log)."""
    from loopfm.data.schema import Schema
    from loopfm.fm.features import select_features

    return [f.name for f in select_features(Schema.load(run_dir / "data" / "schema.json"), cfg.fm.model)
            if f.fm_only]


def _fm_metrics(log, run_dir: Path, day: int) -> dict:
    from loopfm.metrics import binary_metrics
    from loopfm.stages.train_vm import soft_labels

    try:
        soft = soft_labels(run_dir / "extract", log.num_rows(), days=[day])
    except ValueError as err:
        raise ConfigError(f"diagnose scores the FM on the validation day {day}: {err}") from None
    t = log.read(days=[day], columns=["example_id", "label"])
    preds = soft[t.column("example_id").to_numpy()]
    return _floats(binary_metrics(t.column("label").to_numpy(), preds.astype(np.float64)))


def _vm_baseline(cfg: LoopFMConfig, run_dir: Path, log, train_days: list[int], valid_day: int,
                 progress: bool) -> tuple[str, dict]:
    import torch

    from loopfm.stages.train_vm import VMInputs
    from loopfm.vm.train import run_vm

    model = (cfg.tune_kd.models or cfg.vm.models)[0]
    inputs = VMInputs(run_dir, log, cfg.vm, needs_seq=False, needs_kd=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.vm.threads)
    try:
        result = run_vm(dataclasses.replace(cfg.vm.model, model=model), cfg.vm.train, cfg.vm.kd, log.schema,
                        inputs.batches(train_days), inputs.batches([valid_day]), variant="baseline")
    finally:
        torch.set_num_threads(threads)
    return model, _floats({k: result.metrics[k] for k in ("auc", "logloss", "ne")})


def sequence_coverage(cfg: LoopFMConfig, log, extract_manifest: dict, day: int) -> dict:
    """Share of ``day``'s rows with a non-empty LoopFM sequence, and the mean length (all rows)."""
    from loopfm.data.history import entry_mask, timeline_order
    from loopfm.stages.sequences import query_offsets

    s = log.schema
    key_col = s.user_key if cfg.vm.sequence_key == "user" else s.item_key
    entry_days = sorted(int(d) for d, n in extract_manifest.get("rows_per_day", {}).items() if n)
    if cfg.sequences.days:
        entry_days = [d for d in entry_days if d in cfg.sequences.days]
    entries = log.read(days=[d for d in entry_days if d <= day], columns=[key_col, "ts", "label"])
    ekey, ets = entries.column(key_col).to_numpy(), entries.column("ts").to_numpy()
    keep = entry_mask(entries.column("label").to_numpy(), cfg.sequences.entry_labels)
    if cfg.sequences.skip_unknown_keys:  # id 0 (missing) and the OOV id get no timeline
        keep &= (ekey != 0) & (ekey != s.feature(key_col).oov_id)
    ekey, ets = ekey[keep], ets[keep]
    order = timeline_order(ekey, ets)
    q = log.read(days=[day], columns=[key_col, "ts"])
    start, end = query_offsets(ekey[order], ets[order], q.column(key_col).to_numpy(), q.column("ts").to_numpy(),
                               window=cfg.sequences.window_s, max_len=cfg.sequences.max_len)
    lengths = end - start
    return {"key": cfg.vm.sequence_key, "rows": int(len(lengths)),
            "nonempty_share": round(float((lengths > 0).mean()) if len(lengths) else 0.0, 4),
            "mean_length": round(float(lengths.mean()) if len(lengths) else 0.0, 2),
            "max_len": cfg.sequences.max_len}


def users_seen(log, train_days: list[int], day: int) -> dict:
    """Share of ``day``'s users (and rows) whose user id occurs in ``train_days``."""
    key = log.schema.user_key
    train = np.unique(log.read(days=train_days, columns=[key]).column(key).to_numpy())
    test = log.read(days=[day], columns=[key]).column(key).to_numpy()
    users = np.unique(test)
    return {"user_share": round(float(np.isin(users, train).mean()) if len(users) else 0.0, 4),
            "row_share": round(float(np.isin(test, train).mean()) if len(test) else 0.0, 4),
            "test_users": int(len(users))}


def verdict(r: dict) -> str:
    d = r["delta_ne"]
    if not r["fm_only_features"]:
        line = (f"the FM reads no FM-only feature, so it knows nothing the VM cannot see (ΔNE = {d:.3f}): "
                f"expect little from KD or LoopFM; try more FM-only features (e.g. a behaviour history, "
                f"kind: history) or fm.train.refresh_days")
    elif r["headroom"]:
        line = (f"the FM beats the VM baseline by ΔNE = {d:.3f} (AUC {r['fm']['auc']:.4f} vs "
                f"{r['vm_baseline']['auc']:.4f}): KD and LoopFM have headroom")
    else:
        line = (f"only ΔNE = {d:.3f} (FM AUC {r['fm']['auc']:.4f} vs VM baseline {r['vm_baseline']['auc']:.4f}): "
                f"expect little from KD or LoopFM; try fm.train.refresh_days or more FM-only features")
    cov = r["sequences"]["nonempty_share"]
    if cov < THIN_COVERAGE:
        line += (f"; only {cov:.0%} of test-day rows have a LoopFM sequence (raise sequences.window_days or "
                 f"extract more days)")
    return line


def render(r: dict) -> str:
    """The diagnosis as Markdown lines (printed by the CLI, appended to report.md)."""
    fm, vm, seq, seen = r["fm"], r["vm_baseline"], r["sequences"], r["users_seen"]
    lines = [f"Validation day {r['valid_day']} (VM baseline {r['baseline_model']} trained on days "
             f"{r['vm_train_days']}; test day {r['test_day']} only for the coverage counts):", "",
             "| | AUC | LogLoss | NE |", "|---|---:|---:|---:|",
             f"| FM (soft labels) | {fm['auc']:.4f} | {fm['logloss']:.4f} | {fm['ne']:.4f} |",
             f"| VM baseline | {vm['auc']:.4f} | {vm['logloss']:.4f} | {vm['ne']:.4f} |", "",
             f"- ΔNE (VM - FM) = {r['delta_ne']:.4f}, ΔAUC (FM - VM) = {r['delta_auc']:.4f}",
             f"- test-day rows with a non-empty {seq['key']} sequence: {seq['nonempty_share']:.1%}, mean length "
             f"{seq['mean_length']:.1f} (max {seq['max_len']})",
             f"- test-day users seen in the VM's training days: {seen['user_share']:.1%} "
             f"({seen['row_share']:.1%} of rows)",
             f"- FM-only features the FM reads: {', '.join(r['fm_only_features']) or 'none'}"]
    drift = r["drift"]["by_day"]
    if drift:
        if r["drift"]["fm_checkpoint"] == "daily":
            cos = ", ".join(f"day {d}: {v['cosine_to_fixed']:.3f}" for d, v in drift.items() if "cosine_to_fixed" in v)
            lines.append(f"- FM code drift (daily FM, mean cosine to the fixed FM's codes): {cos}")
        else:
            shift = ", ".join(f"day {d}: {v['centroid_shift']:.3f}" for d, v in drift.items())
            lines.append(f"- code centroid shift from the first extract day (fixed FM): {shift}")
    lines += ["", f"**Verdict:** {r['verdict']}"]
    return "\n".join(lines)


def report_section(run_dir: str | Path) -> list[str]:
    """``## Diagnosis`` for RUN/report.md, when RUN/diagnose exists (else nothing)."""
    path = Path(run_dir) / FOLDER / "diagnose.json"
    if not path.is_file():
        return []
    return [f"## Diagnosis (before the VM runs)\n\n{render(json.loads(path.read_text()))}"]


def _floats(metrics: dict) -> dict:
    return {k: float(v) for k, v in metrics.items()}
