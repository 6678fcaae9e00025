"""The pipeline in one place: each stage's folder, config hash and runner, in order.

    RUN/data        prepare          event log                  (data, seed, input files)
    RUN/fm          train-fm         FM + autoencoder           (+ fm)
    RUN/extract     extract          soft labels + codes        (+ extract)
    RUN/compress    compress         packed codes               (+ compress)
    RUN/sequences   build-sequences  per-key timelines          (+ sequences)
    RUN/vm          train-vm         VM predictions per run     (+ vm)
    RUN/results.json, report.md, *.png, tb/   report

A stage's hash covers its own config section and the hash of the stage before it, so changing
``fm.*`` reruns train-fm and everything after it, while ``vm.*`` reruns only train-vm and report.
A stage whose ``_SUCCESS`` carries the same hash and whose files all match its file list is
skipped; a damaged one is redone; a killed stage left no ``_SUCCESS`` and is run again (train-fm
resumes from its last checkpoint, or starts over with ``force``). `loopfm.protocol` checks the
days of every section against each other before the first stage.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import yaml

from loopfm.artifacts import (ManifestError, is_complete, read_json, read_manifest, require_intact, stage_state,
                              write_json_atomic)
from loopfm.config import ConfigError, config_hash, to_dict
from loopfm.experiment import LoopFMConfig
from loopfm.data.sources import DataConfig

# The pipeline's stages in order: the one list the CLI, `loopfm launch` and `run_all` share.
STAGES = ("prepare", "train-fm", "extract", "compress", "build-sequences", "train-vm", "report")
FOLDERS = {"prepare": "data", "train-fm": "fm", "extract": "extract", "compress": "compress",
           "build-sequences": "sequences", "train-vm": "vm"}
# The stage folders each stage reads (checked intact before it runs, when present).
INPUTS = {"train-fm": ("data",), "extract": ("data", "fm"), "compress": ("extract",),
          "build-sequences": ("compress",), "train-vm": ("data", "extract", "compress", "sequences"),
          "report": ("data", "fm", "vm")}


def input_fingerprint(data: DataConfig) -> dict[str, list]:
    """Size and mtime of the input files the chosen source names (config fields marked
    ``metadata={"input": True}``), so an edited input or schema is not taken for the prepared one."""
    prints = {}
    section = data.source_config()
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if not (f.metadata.get("input") and isinstance(value, str) and value and Path(value).exists()):
            continue
        path = Path(value)
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        prints[f.name] = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return prints


def stage_hashes(cfg: LoopFMConfig) -> dict[str, str]:
    """The config hash of every stage, each chained to the one before it."""
    from loopfm.fm.train import fm_hash_payload
    from loopfm.stages.sequences import hash_payload as sequences_hash_payload

    h = {"prepare": config_hash({"seed": cfg.seed, "data": cfg.data, "inputs": input_fingerprint(cfg.data)})}
    h["train-fm"] = config_hash({"up": h["prepare"], "seed": cfg.seed, "fm": fm_hash_payload(cfg.fm)})
    h["extract"] = config_hash({"up": h["train-fm"], "extract": cfg.extract})
    # With compress.fit_days empty the fit days are "every extract day but the test day".
    held_out = {} if cfg.compress.fit_days else {"test_day": cfg.vm.test_day}
    h["compress"] = config_hash({"up": h["extract"], "compress": cfg.compress, **held_out})
    h["build-sequences"] = config_hash({"up": h["compress"], "sequences": sequences_hash_payload(cfg.sequences)})
    h["train-vm"] = config_hash({"up": h["build-sequences"], "vm": cfg.vm})
    return h


def config_yaml(cfg: LoopFMConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def check_inputs(run_dir: Path, stage: str) -> None:
    """The finished input folders of ``stage`` are undamaged (a missing one is the stage's to report)."""
    for name in INPUTS.get(stage, ()):
        if (run_dir / name / "_SUCCESS").is_file():
            require_intact(run_dir / name)


# -- the stages -----------------------------------------------------------------------------------
def run_prepare(cfg: LoopFMConfig, out: Path, *, force: bool, progress: bool) -> tuple[dict, bool]:
    """Prepare ``cfg.data`` into ``out`` unless it is already there; returns (manifest, ran)."""
    from loopfm.data.prepare import prepare
    from loopfm.data.sources import build_source

    key = stage_hashes(cfg)["prepare"]
    if not force and is_complete(out, key):
        return read_manifest(out), False
    source = build_source(cfg.data, seed=cfg.seed)
    manifest = prepare(source, out, min_count=cfg.data.min_count, config_hash=key,
                       allow_any_time=cfg.data.allow_any_time,
                       config_yaml=config_yaml(cfg), progress=progress)
    return manifest, True


def run_train_fm(cfg: LoopFMConfig, run_dir: Path, *, resume: bool, force: bool,
                 progress: bool) -> tuple[dict | None, bool]:
    """Train RUN_DIR/fm from RUN_DIR/data unless complete; returns (eval metrics, ran)."""
    from loopfm.fm.config import FMConfigError
    from loopfm.fm.train import train_fm

    key = stage_hashes(cfg)["train-fm"]
    if not force and is_complete(run_dir / "fm", key):
        return read_manifest(run_dir / "fm")["eval"], False
    require_intact(run_dir / "data")  # a clear error if prepare has not run or its output is damaged
    try:  # --force starts the FM over: no resume from a checkpoint
        metrics = train_fm(cfg.fm, run_dir / "data", run_dir / "fm", seed=cfg.seed, config_hash=key,
                           config_yaml=config_yaml(cfg), resume=resume and not force, progress=progress)
    except FMConfigError as err:  # the config does not fit this event log
        raise ConfigError(str(err)) from None
    return metrics, True


def _sharded_stage(name: str, run: Callable[..., dict], exp: LoopFMConfig, run_folder: Path, *,
                   rank: int, world_size: int, force: bool, progress: bool, **kwargs) -> tuple[dict, bool]:
    key = stage_hashes(exp)[name]
    out = run_folder / FOLDERS[name]
    if not force and is_complete(out, key):
        return read_manifest(out), False
    check_inputs(run_folder, name)
    return run(out_dir=out, rank=rank, world_size=world_size, progress=progress, config_hash=key,
               **kwargs), True


def run_extract(cfg: LoopFMConfig, run_dir: Path, *, rank: int = 0, world_size: int = 1, force: bool = False,
                progress: bool = True) -> tuple[dict, bool]:
    from loopfm.stages.extract import run_extract as extract

    return _sharded_stage("extract", extract, cfg, run_dir, rank=rank, world_size=world_size, force=force,
                          progress=progress, cfg=cfg.extract, run_dir=run_dir)


def run_compress(cfg: LoopFMConfig, run_dir: Path, *, rank: int = 0, world_size: int = 1, force: bool = False,
                 progress: bool = True) -> tuple[dict, bool]:
    from loopfm.stages.compress import run_compress as compress

    return _sharded_stage("compress", compress, cfg, run_dir, rank=rank, world_size=world_size, force=force,
                          progress=progress, cfg=cfg.compress, extract_dir=run_dir / "extract",
                          test_day=cfg.vm.test_day)


def run_build_sequences(cfg: LoopFMConfig, run_dir: Path, *, rank: int = 0, world_size: int = 1,
                        append: bool = False, force: bool = False, progress: bool = True) -> tuple[dict, bool]:
    from loopfm.stages.sequences import run_build_sequences as build

    out = run_dir / "sequences"
    return _sharded_stage("build-sequences", build, cfg, run_dir, rank=rank, world_size=world_size,
                          force=force or append, progress=progress, cfg=cfg.sequences,
                          compress_dir=run_dir / "compress", append_dir=out if append else None)


def vm_tensorboard_folder(run_dir: Path, rank: int, world_size: int) -> Path:
    """Where this rank's train-vm TensorBoard events go: ``RUN/tb/vm`` for one process; under W
    ranks ``RUN/tb/vm/rank-R``, so no two ranks swap one folder (each run is trained by one rank,
    so their tags never collide). Rank 0 first drops what an earlier run with another process
    count left there (events directly in ``tb/vm``, ``rank-R`` folders with R >= W), so no tag
    holds two values."""
    import shutil

    root = run_dir / "tb" / "vm"
    if world_size == 1:
        return root
    if rank == 0 and root.is_dir():
        for entry in root.iterdir():
            if entry.is_file():
                entry.unlink()
            elif entry.name.startswith("rank-") and entry.name[5:].isdigit() and int(entry.name[5:]) >= world_size:
                shutil.rmtree(entry, ignore_errors=True)
    return root / f"rank-{rank}"


def run_train_vm(cfg: LoopFMConfig, run_dir: Path, *, force: bool = False, progress: bool = True) -> tuple[dict, bool]:
    from loopfm.stages.train_vm import process_rank, run_train_vm as train_vm
    from loopfm.artifacts import replaced_folder
    from loopfm.tracking import TensorBoardLogger

    key = stage_hashes(cfg)["train-vm"]
    out = run_dir / "vm"
    if not force and is_complete(out, key):
        return read_manifest(out), False
    check_inputs(run_dir, "train-vm")
    tb_folder = vm_tensorboard_folder(run_dir, *process_rank())
    with replaced_folder(tb_folder) as tb:  # a rerun replaces the last run's events
        logger = TensorBoardLogger(tb)
        try:
            return train_vm(cfg.vm, run_dir, out, config_hash=key, logger=logger, progress=progress), True
        finally:
            logger.close()


def run_report(cfg: LoopFMConfig, run_dir: Path, timings: dict[str, float] | None = None,
               fm_before: Path | None = None) -> dict:
    """results.json, report.md with plots, TensorBoard test scalars, from the stage outputs.

    ``fm_before``: the run folder of the previous FM generation on the same data (FM1, whose
    features are a subset of this run's FM2). The report then adds the paper's transfer ratio
    TR = (NE_VM[FM1] - NE_VM[FM2]) / (NE_FM1 - NE_FM2) per model and variant.
    """
    import numpy as np
    import pyarrow.parquet as pq

    from loopfm import report
    from loopfm.diagnose import report_section

    check_inputs(run_dir, "report")
    fm_manifest = read_manifest(run_dir / "fm")
    test_day = str(cfg.vm.test_day)
    # The teacher on the test day: the fixed FM, or with a daily FM the one refreshed the day before
    # (the FM whose codes and soft labels the test day's VM inputs come from).
    daily = cfg.extract.fm_checkpoint == "daily" and test_day in fm_manifest.get("eval_fresh", {})
    fm_eval = fm_manifest["eval_fresh"] if daily else fm_manifest["eval"]
    if test_day not in {str(d) for d in fm_eval}:
        raise ConfigError(f"the FM was not evaluated on the VM test day {test_day}: add it to fm.train.eval_days")
    fm = {k: fm_eval[test_day].get(k) for k in ("auc", "logloss", "ne", "undefined")}
    preds = pq.read_table(run_dir / "vm" / "predictions.parquet")
    runs = []
    for name in preds.column_names[3:]:
        model, variant, seed = name.split("/")
        runs.append(report.Run(model=model, variant=variant, seed=int(seed), preds=preds.column(name).to_numpy()))
    labels, users = preds.column("label").to_numpy(), preds.column("user_id").to_numpy()
    if timings is None:
        timings = read_timings(run_dir)
    transfer = None
    if fm_before is not None:
        before = report.read_results(Path(fm_before) / "results.json")
        transfer = {"ne_fm_before": before["fm"]["ne"],
                    "ne_vm_before": {m: {v: x["ne"] for v, x in vs.items()} for m, vs in before["vm"].items()}}
    results = report.build_results(read_manifest(run_dir / "data")["dataset"], fm, runs, labels, users, timings,
                                   transfer_ratio=transfer, n_boot=cfg.report.n_boot,
                                   boot_seed=cfg.report.boot_seed, min_dne_fm=cfg.report.min_dne_fm)
    results["fm"]["checkpoint"] = "daily" if daily else "fixed"
    report.write_results(run_dir / "results.json", results)
    report.write_report(run_dir, results, sections=report_section(run_dir))  # + the diagnosis, if any
    report.log_tensorboard(run_dir / "tb", results)
    return results


def read_timings(run_dir: Path, echo: Callable[[str], None] = print) -> dict[str, float]:
    """``RUN/timings.json`` (seconds per stage); an unreadable one is dropped with a note."""
    path = run_dir / "timings.json"
    if not path.is_file():
        return {}
    try:
        timings = read_json(path)
    except ManifestError as err:
        echo(f"note: {err}; starting the timings afresh")
        return {}
    return timings if isinstance(timings, dict) else {}


def _diagnosis(cfg: LoopFMConfig, run_dir: Path, *, force: bool) -> str:
    """`loopfm diagnose` after extract: can KD and LoopFM help? (skipped, saying why, if it cannot run)"""
    from loopfm.diagnose import render, run_diagnose

    try:
        return "[diagnose]\n" + render(run_diagnose(cfg, run_dir, force=force))
    except ConfigError as err:
        return f"[diagnose] skipped: {err}"


def run_all(cfg: LoopFMConfig, run_dir: Path, *, force: bool = False, progress: bool = True,
            echo: Callable[[str], None] = print) -> dict:
    """Every stage in order, one process; returns results.json's content."""
    from loopfm.protocol import check_days_in_log, check_protocol

    check_protocol(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(config_yaml(cfg))
    timings = read_timings(run_dir, echo)
    hashes = stage_hashes(cfg)
    steps: list[tuple[str, Callable[[], tuple[object, bool]]]] = [
        ("prepare", lambda: run_prepare(cfg, run_dir / "data", force=force, progress=progress)),
        ("train-fm", lambda: run_train_fm(cfg, run_dir, resume=True, force=force, progress=progress)),
        ("extract", lambda: run_extract(cfg, run_dir, force=force, progress=progress)),
        ("compress", lambda: run_compress(cfg, run_dir, force=force, progress=progress)),
        ("build-sequences", lambda: run_build_sequences(cfg, run_dir, force=force, progress=progress)),
        ("train-vm", lambda: run_train_vm(cfg, run_dir, force=force, progress=progress)),
    ]
    assert [name for name, _ in steps] == list(STAGES[:-1])
    for name, step in steps:
        # one integrity check per stage: an intact stage of this config is skipped here, not
        # checked again by its run_* function
        state, detail = ("forced", "") if force else stage_state(run_dir / FOLDERS[name], hashes[name])
        if state == "damaged":
            echo(f"[{name}] damaged ({detail}): redoing it")
        start = time.perf_counter()
        manifest, ran = (read_manifest(run_dir / FOLDERS[name]), False) if state == "ok" else step()
        if name == "prepare":  # the days a source yields are known once it is prepared
            check_days_in_log(cfg, [int(d) for d in manifest["rows_per_day"]], str(run_dir / "data"))
        if ran:
            timings[name] = round(time.perf_counter() - start, 2)
            write_json_atomic(run_dir / "timings.json", timings)
        echo(f"[{name}] {'done in %.1fs' % timings[name] if ran else 'up to date'}")
        if name == "extract":
            echo(_diagnosis(cfg, run_dir, force=force))
    start = time.perf_counter()
    results = run_report(cfg, run_dir, timings)
    timings["report"] = round(time.perf_counter() - start, 2)
    write_json_atomic(run_dir / "timings.json", timings)
    results["timings_s"] = timings
    from loopfm import report

    report.write_results(run_dir / "results.json", results)
    return results
