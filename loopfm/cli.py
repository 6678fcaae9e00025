"""`loopfm` command line: one sub-command per pipeline stage, plus `run` for the whole chain.

Every command takes a YAML config and dotted ``key=value`` overrides (``data.synthetic.rows=5000``);
``loopfm CMD --help`` lists the command's options and the config keys it reads.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import typing
from pathlib import Path

from loopfm.artifacts import is_complete
from loopfm.config import ConfigError, LoopFMConfig, config_hash, load_config, save_config, to_dict
from loopfm.data.errors import DataError
from loopfm.data.sources import DataConfig

import yaml

# Stages of the pipeline in order; the ones without a command yet are listed by `run`.
PIPELINE = ("prepare", "train-fm", "extract", "compress", "build-sequences", "train-vm", "report")


def config_keys_help(cls: type, prefix: str = "") -> list[str]:
    """One line per config key: dotted name, type, default, help text."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            lines.extend(config_keys_help(hints[f.name], name + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
        tp = getattr(hints[f.name], "__name__", str(hints[f.name]).replace("typing.", ""))
        lines.append(f"  {name} ({tp}, default {default!r}): {f.metadata.get('help', '')}")
    return lines


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML experiment config (e.g. configs/quickstart.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted config overrides, e.g. data.synthetic.rows=5000 seed=1")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loopfm",
        description="LoopFM: move a foundation model's knowledge into small vertical models "
                    "through compressed historical embedding sequences.",
        epilog="pipeline: " + " -> ".join(PIPELINE) + ".  Run `loopfm CMD --help` for a stage's options.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("prepare", formatter_class=fmt,
                       help="turn a data source into the canonical Parquet event log",
                       description="Read a source (synthetic, movielens, taobao-raw, taobao-x1, events) "
                                   "and write OUT/events/day=K/*.parquet, schema.json, vocab/, _SUCCESS.",
                       epilog="config keys:\n" + "\n".join(config_keys_help(LoopFMConfig)))
    _add_config_args(p)
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--source", help="shorthand for data.source=SOURCE")
    p.add_argument("--input", help="input file or folder (data.events.input for events, else data.<source>.path)")
    p.add_argument("--schema", help="YAML schema of an events input (data.events.schema)")
    p.add_argument("--force", action="store_true", help="rebuild even if OUT is complete for this config")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train-fm", formatter_class=fmt, help="train the foundation model and evaluate it",
                       description="Train the FM (TorchRec, sharded) on RUN_DIR/data (made by `loopfm prepare "
                                   "CONFIG --out RUN_DIR/data`) and write RUN_DIR/fm: model, autoencoder, "
                                   "per-day eval metrics. Works under `torchrun --nproc_per_node=N -m loopfm.cli`.",
                       epilog="config keys:\n" + "\n".join(config_keys_help(LoopFMConfig)))
    _add_config_args(p)
    p.add_argument("--out", required=True, help="run folder: reads OUT/data, writes OUT/fm")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUT/fm.work")
    p.add_argument("--force", action="store_true", help="retrain even if OUT/fm is complete for this config")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train_fm)

    p = sub.add_parser("run", formatter_class=fmt, help="run the whole pipeline on one config",
                       description="Run every stage in order into OUT/<stage>, skipping stages whose "
                                   "output is complete for the same config.",
                       epilog="config keys:\n" + "\n".join(config_keys_help(LoopFMConfig)))
    _add_config_args(p)
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--force", action="store_true", help="rerun every stage")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_run)
    return parser


def _load(args: argparse.Namespace, extra: list[str]) -> LoopFMConfig:
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not Path(config).exists():
        config, overrides = None, [config, *overrides]  # no config file, only overrides
    return load_config(LoopFMConfig, config, [*extra, *overrides])


def _source_overrides(args: argparse.Namespace) -> list[str]:
    extra = []
    source = args.source
    if source:
        extra.append(f"data.source={source}")
    if args.input:
        if source is None:
            raise ConfigError("--input needs --source (or set data.<source>.path in the config)")
        section = source.replace("-", "_")
        extra.append(f"data.{section}.{'input' if source == 'events' else 'path'}={args.input}")
    if args.schema:
        extra.append(f"data.events.schema={args.schema}")
    return extra


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


def run_prepare(cfg: LoopFMConfig, out: Path, *, force: bool, progress: bool) -> tuple[dict, bool]:
    """Prepare ``cfg.data`` into ``out`` unless it is already there; returns (manifest, ran)."""
    from loopfm.artifacts import read_manifest
    from loopfm.data.prepare import prepare
    from loopfm.data.sources import build_source

    key = config_hash({"seed": cfg.seed, "data": cfg.data, "inputs": input_fingerprint(cfg.data)})
    if not force and is_complete(out, key):
        return read_manifest(out), False
    source = build_source(cfg.data, seed=cfg.seed)
    manifest = prepare(source, out, min_count=cfg.data.min_count, config_hash=key,
                       config_yaml=yaml.safe_dump(to_dict(cfg), sort_keys=False), progress=progress)
    return manifest, True


def _print_prepare_summary(out: Path, manifest: dict) -> None:
    from loopfm.data.eventlog import EventLog

    log = EventLog(out)
    labels = log.read(columns=["day", "label"])
    print(f"dataset {manifest['dataset']}: {manifest['rows']:,} events in {out}")
    print("| day | rows | positive rate |\n|---:|---:|---:|")
    import numpy as np
    day = labels.column("day").to_numpy()
    lab = labels.column("label").to_numpy()
    for d in log.days:
        m = day == d
        print(f"| {d} | {int(m.sum()):,} | {lab[m].mean():.4f} |")
    fm_only = [f.name for f in log.schema.features if f.fm_only]
    vm = [f.name for f in log.schema.vm_features()]
    print(f"VM-visible features: {', '.join(vm)}")
    print(f"FM-only features:    {', '.join(fm_only) or '(none)'}")
    if manifest.get("skipped_rows"):
        print(f"skipped rows: {manifest['skipped_rows']}")


def cmd_prepare(args: argparse.Namespace) -> int:
    cfg = _load(args, _source_overrides(args))
    out = Path(args.out)
    start = time.perf_counter()
    manifest, ran = run_prepare(cfg, out, force=args.force, progress=not args.quiet)
    if not ran:
        print(f"{out} is complete for this config (use --force to rebuild)")
    else:
        print(f"prepared in {time.perf_counter() - start:.1f}s")
    _print_prepare_summary(out, manifest)
    return 0


def run_train_fm(cfg: LoopFMConfig, run_dir: Path, *, resume: bool, force: bool,
                 progress: bool) -> tuple[dict | None, bool]:
    """Train RUN_DIR/fm from RUN_DIR/data unless complete; returns (eval metrics, ran)."""
    from loopfm.artifacts import read_manifest
    from loopfm.fm.train import train_fm

    key = config_hash({"seed": cfg.seed, "data": cfg.data, "fm": cfg.fm})
    if not force and is_complete(run_dir / "fm", key):
        return read_manifest(run_dir / "fm")["eval"], False
    read_manifest(run_dir / "data")  # a clear error if prepare has not run
    metrics = train_fm(cfg.fm, run_dir / "data", run_dir / "fm", seed=cfg.seed, config_hash=key,
                       config_yaml=yaml.safe_dump(to_dict(cfg), sort_keys=False), resume=resume,
                       progress=progress)
    return metrics, True


def _print_eval(metrics: dict | None) -> None:
    if metrics:  # None on ranks > 0 and when stopped early
        print("| day | rows | AUC | LogLoss | NE |\n|---:|---:|---:|---:|---:|")
        for day, m in metrics.items():
            print(f"| {day} | {m['rows']:,} | {m['auc']:.4f} | {m['logloss']:.4f} | {m['ne']:.4f} |")


def cmd_train_fm(args: argparse.Namespace) -> int:
    cfg = _load(args, [])
    start = time.perf_counter()
    metrics, ran = run_train_fm(cfg, Path(args.out), resume=args.resume, force=args.force,
                                progress=not args.quiet)
    if metrics is not None:  # rank 0 of a finished run (other ranks and max_steps stops get None)
        print(f"[train-fm] {'done' if ran else 'up to date'} in {time.perf_counter() - start:.1f}s")
        _print_eval(metrics)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _load(args, [])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    timings: dict[str, float] = {}
    start = time.perf_counter()
    manifest, ran = run_prepare(cfg, out / "data", force=args.force, progress=not args.quiet)
    timings["prepare"] = time.perf_counter() - start
    print(f"[prepare] {'done' if ran else 'up to date'} in {timings['prepare']:.1f}s")
    _print_prepare_summary(out / "data", manifest)
    start = time.perf_counter()
    metrics, ran = run_train_fm(cfg, out, resume=False, force=args.force, progress=not args.quiet)
    timings["train-fm"] = time.perf_counter() - start
    print(f"[train-fm] {'done' if ran else 'up to date'} in {timings['train-fm']:.1f}s")
    _print_eval(metrics)
    todo = [s for s in PIPELINE if s not in ("prepare", "train-fm")]
    (out / "timings.json").write_text(json.dumps(timings, indent=2))
    print(f"\nstages still to come in this version: {', '.join(todo)} "
          "(the event log above is their input)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError, FileNotFoundError) as err:
        print(f"loopfm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
