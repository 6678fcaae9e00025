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
A stage whose ``_SUCCESS`` carries the same hash is skipped; a killed stage left no ``_SUCCESS``
and is run again (train-fm resumes from its last checkpoint).
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

import yaml

from loopfm.artifacts import is_complete, read_manifest
from loopfm.config import ConfigError, config_hash, to_dict
from loopfm.experiment import LoopFMConfig
from loopfm.data.sources import DataConfig

STAGES = ("prepare", "train-fm", "extract", "compress", "build-sequences", "train-vm", "report")
FOLDERS = {"prepare": "data", "train-fm": "fm", "extract": "extract", "compress": "compress",
           "build-sequences": "sequences", "train-vm": "vm"}


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

    h = {"prepare": config_hash({"seed": cfg.seed, "data": cfg.data, "inputs": input_fingerprint(cfg.data)})}
    h["train-fm"] = config_hash({"up": h["prepare"], "seed": cfg.seed, "fm": fm_hash_payload(cfg.fm)})
    h["extract"] = config_hash({"up": h["train-fm"], "extract": cfg.extract})
    h["compress"] = config_hash({"up": h["extract"], "compress": cfg.compress})
    h["build-sequences"] = config_hash({"up": h["compress"], "sequences": cfg.sequences})
    h["train-vm"] = config_hash({"up": h["build-sequences"], "vm": cfg.vm})
    return h


def config_yaml(cfg: LoopFMConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


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
    read_manifest(run_dir / "data")  # a clear error if prepare has not run
    try:
        metrics = train_fm(cfg.fm, run_dir / "data", run_dir / "fm", seed=cfg.seed, config_hash=key,
                           config_yaml=config_yaml(cfg), resume=resume, progress=progress)
    except FMConfigError as err:  # the config does not fit this event log
        raise ConfigError(str(err)) from None
    return metrics, True


def _sharded_stage(name: str, run: Callable[..., dict], exp: LoopFMConfig, run_folder: Path, *,
                   rank: int, world_size: int, force: bool, progress: bool, **kwargs) -> tuple[dict, bool]:
    key = stage_hashes(exp)[name]
    out = run_folder / FOLDERS[name]
    if not force and is_complete(out, key):
        return read_manifest(out), False
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
                          progress=progress, cfg=cfg.compress, extract_dir=run_dir / "extract")


def run_build_sequences(cfg: LoopFMConfig, run_dir: Path, *, rank: int = 0, world_size: int = 1,
                        append: bool = False, force: bool = False, progress: bool = True) -> tuple[dict, bool]:
    from loopfm.stages.sequences import run_build_sequences as build

    out = run_dir / "sequences"
    return _sharded_stage("build-sequences", build, cfg, run_dir, rank=rank, world_size=world_size,
                          force=force or append, progress=progress, cfg=cfg.sequences,
                          compress_dir=run_dir / "compress", append_dir=out if append else None)


def run_train_vm(cfg: LoopFMConfig, run_dir: Path, *, force: bool = False, progress: bool = True) -> tuple[dict, bool]:
    from loopfm.stages.train_vm import run_train_vm as train_vm
    from loopfm.tracking import TensorBoardLogger, replaced_folder

    key = stage_hashes(cfg)["train-vm"]
    out = run_dir / "vm"
    if not force and is_complete(out, key):
        return read_manifest(out), False
    with replaced_folder(run_dir / "tb" / "vm") as tb:  # a rerun replaces the last run's events
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
        path = run_dir / "timings.json"
        timings = json.loads(path.read_text()) if path.is_file() else {}
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
    report.write_report(run_dir, results)
    report.log_tensorboard(run_dir / "tb", results)
    return results


def run_all(cfg: LoopFMConfig, run_dir: Path, *, force: bool = False, progress: bool = True,
            echo: Callable[[str], None] = print) -> dict:
    """Every stage in order, one process; returns results.json's content."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(config_yaml(cfg))
    timings_path = run_dir / "timings.json"
    timings: dict[str, float] = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    steps: list[tuple[str, Callable[[], tuple[object, bool]]]] = [
        ("prepare", lambda: run_prepare(cfg, run_dir / "data", force=force, progress=progress)),
        ("train-fm", lambda: run_train_fm(cfg, run_dir, resume=True, force=force, progress=progress)),
        ("extract", lambda: run_extract(cfg, run_dir, force=force, progress=progress)),
        ("compress", lambda: run_compress(cfg, run_dir, force=force, progress=progress)),
        ("build-sequences", lambda: run_build_sequences(cfg, run_dir, force=force, progress=progress)),
        ("train-vm", lambda: run_train_vm(cfg, run_dir, force=force, progress=progress)),
    ]
    for name, step in steps:
        start = time.perf_counter()
        _, ran = step()
        if ran:
            timings[name] = round(time.perf_counter() - start, 2)
            timings_path.write_text(json.dumps(timings, indent=2))
        echo(f"[{name}] {'done in %.1fs' % timings[name] if ran else 'up to date'}")
    start = time.perf_counter()
    results = run_report(cfg, run_dir, timings)
    timings["report"] = round(time.perf_counter() - start, 2)
    timings_path.write_text(json.dumps(timings, indent=2))
    results["timings_s"] = timings
    from loopfm import report

    report.write_results(run_dir / "results.json", results)
    return results
