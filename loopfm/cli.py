"""`loopfm` command line: one sub-command per pipeline stage, plus `run` for the whole chain.

Every command takes a YAML config and dotted ``key=value`` overrides (``data.synthetic.rows=5000``);
``loopfm CMD --help`` lists the command's options and the config keys it reads. Stage commands
take the run folder as ``--out RUN`` and read / write ``RUN/<stage>`` (see `loopfm.pipeline`).
The work itself lives in `loopfm.pipeline`; this file only parses and prints.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
import typing
from pathlib import Path

from loopfm.artifacts import ManifestError
from loopfm.config import ConfigError, load_config
from loopfm.experiment import LoopFMConfig
from loopfm.data.errors import DataError
from loopfm.launch import add_launch_parser
from loopfm.lock import RunLocked, run_lock
from loopfm.pipeline import STAGES

# Errors of the user's making (config, data, manifests, a busy run folder): one line, exit 2.
USER_ERRORS = (ConfigError, DataError, ManifestError, RunLocked, OSError, ValueError)


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


def _stage_parser(sub, name: str, help: str, description: str, func, *, keys: tuple[str, ...] = (),
                  out_help: str = "run folder", sharded: bool = False) -> argparse.ArgumentParser:
    """A stage command: CONFIG, overrides, --out, --force, --quiet (+ --rank/--world-size)."""
    epilog = [line for line in config_keys_help(LoopFMConfig)
              if not keys or line.split()[0].split(".")[0] in keys]
    p = sub.add_parser(name, help=help, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="config keys:\n" + "\n".join(epilog))
    p.add_argument("config", nargs="?", help="YAML experiment config (e.g. configs/quickstart.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted config overrides, e.g. data.synthetic.rows=5000 seed=1")
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--force", action="store_true", help="redo the stage even if its output is complete")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run_folder=_out_folder)  # held under RUN/.lock for the whole command
    if sharded:
        p.add_argument("--rank", type=int, default=int(os.environ.get("RANK", 0)),
                       help="this replica's key-hash shard (default $RANK or 0)")
        p.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)),
                       help="number of shards (default $WORLD_SIZE or 1)")
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loopfm",
        description="LoopFM: move a foundation model's knowledge into small vertical models "
                    "through compressed historical embedding sequences.",
        epilog="pipeline: " + " -> ".join(STAGES) + ".  Run `loopfm CMD --help` for a stage's options.",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _stage_parser(sub, "prepare", "turn a data source into the canonical Parquet event log",
                      "Read a source (synthetic, movielens, taobao-raw, taobao-x1, events) and write "
                      "OUT/events/day=K/*.parquet, schema.json, vocab/, _SUCCESS.", cmd_prepare,
                      keys=("seed", "data"), out_help="output folder (written atomically), e.g. RUN/data")
    p.add_argument("--source", help="shorthand for data.source=SOURCE")
    p.add_argument("--input", help="input file or folder (data.events.input for events, else data.<source>.path)")
    p.add_argument("--schema", help="YAML schema of an events input (data.events.schema)")
    p.set_defaults(run_folder=lambda args: Path(args.out).parent)  # --out RUN/data: the run folder is RUN

    p = _stage_parser(sub, "train-fm", "train the foundation model and evaluate it",
                      "Train the FM (TorchRec, sharded) on RUN/data and write RUN/fm: model, autoencoder, "
                      "per-day eval metrics. Works under `torchrun --nproc_per_node=N -m loopfm.cli`.",
                      cmd_train_fm, keys=("seed", "fm"), out_help="run folder: reads OUT/data, writes OUT/fm")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUT/fm.work")

    _stage_parser(sub, "extract", "log the FM's soft labels and codes for the VM days",
                  "One FM inference pass over extract.days of RUN/data with the final RUN/fm; writes "
                  "RUN/extract. Under N ranks each scores its users' key-hash shard.", cmd_extract,
                  keys=("extract",), sharded=True)
    _stage_parser(sub, "compress", "quantize the codes (fp16, int8, int4, int4-kmeans)",
                  "Read RUN/extract, write RUN/compress: packed codes and an error report.", cmd_compress,
                  keys=("compress",), sharded=True)
    p = _stage_parser(sub, "build-sequences", "group codes into point-in-time per-key timelines",
                      "Read RUN/compress, write RUN/sequences: timelines stored once, per-example "
                      "(key, start, end) offsets; entries strictly earlier than the example, within "
                      "the window, newest last, at most sequences.max_len.", cmd_build_sequences,
                      keys=("sequences",), sharded=True)
    p.add_argument("--append", action="store_true",
                   help="add sequences.days to the existing RUN/sequences instead of rebuilding")

    p = sub.add_parser("sequences", help="inspect built sequences")
    seq = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = seq.add_parser("show", help="print one example's sequence as JSON (oldest -> newest)")
    p.add_argument("run_dir", help="run folder (or its sequences/ folder)")
    p.add_argument("--example-id", type=int, required=True)
    p.add_argument("--key", choices=("user", "item"), help="which timelines (default: the first built)")
    p.set_defaults(func=cmd_sequences_show)

    p = _stage_parser(sub, "train-vm", "train and test the vertical models (all variants and seeds)",
                      "Train vm.models x vm.variants x vm.seeds one pass over vm.train_days and test on "
                      "vm.test_day; writes RUN/vm.", cmd_train_vm, keys=("vm",))
    _add_seeds(p)
    p = _stage_parser(sub, "report", "results.json, report.md with plots, TensorBoard scalars",
                      "Summarise RUN/fm and RUN/vm: results.json, report.md (+ PNG plots), RUN/tb/.",
                      cmd_report, keys=("vm",))
    p.add_argument("--fm-before", metavar="RUN1",
                   help="run folder of the previous FM generation (FM1, a feature subset of this run's "
                        "FM2) on the same data: adds the transfer ratio dNE_VM / dNE_FM")
    _stage_parser(sub, "tune-kd", "choose vm.kd alpha/gamma/beta on a validation day (not the test day)",
                  "Train the KD variant one pass on tune_kd.train_days for every point of the tune_kd "
                  "grid (and its no-KD reference), rank them on tune_kd.valid_day; never reads the rows of "
                  "vm.test_day. Reads RUN/data, RUN/extract (+ compress, sequences for kd+loopfm); "
                  "writes RUN/tune_kd.", cmd_tune_kd, keys=("vm", "tune_kd"))
    p = sub.add_parser("diagnose", help="can KD and LoopFM help here? (after extract, before any VM run)",
                       description="On the validation day (tune_kd.valid_day, never vm.test_day): the FM's NE "
                                   "and AUC against a quick VM baseline; the share of test-day rows with a "
                                   "LoopFM sequence and its mean length; the share of test-day users seen in "
                                   "VM training; FM code drift. Then a verdict. Writes RUN/diagnose.")
    p.add_argument("run_dir", metavar="RUN", help="run folder whose prepare, train-fm and extract are done")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.add_argument("--config", help="YAML experiment config (default: RUN/config.yaml, written by `loopfm run`)")
    p.add_argument("--force", action="store_true", help="measure again even if RUN/diagnose is up to date")
    p.set_defaults(func=cmd_diagnose)
    p = _stage_parser(sub, "sweep", "run the pipeline once per value of one config key; AUC vs the value",
                      "Run every stage into OUT/<key>=<value>/ for each --param value, in order; stages "
                      "whose config equals an earlier value's are linked to it, not rerun. Writes "
                      "OUT/sweep.json, OUT/report.md, OUT/auc_vs_<key>.png (auc_vs_L.png for "
                      "sequences.max_len), OUT/tb/. --force recomputes each distinct stage once.", cmd_sweep,
                      out_help="sweep folder: one run folder per value, plus the sweep's report")
    p.add_argument("--param", required=True, metavar="KEY=V1,V2,...",
                   help="the config key and its values, e.g. sequences.max_len=10,25,50,100")
    p.add_argument("--reference", metavar="V",
                   help="the value every other point is compared with (ΔAUC, t-test over seeds, user "
                        "bootstrap); default the first")
    _add_seeds(p)
    p = sub.add_parser("plan", help="TorchRec's sharding plan for the FM on N devices (no training, no GPU)",
                       description="Run TorchRec's planner for the FM of CONFIG on --world-size devices "
                                   "of --device type (tables on the meta device: nothing is allocated) "
                                   "and print the table placement per rank, per-rank HBM / DDR and the "
                                   "planner's perf estimates. Table sizes: --data's schema, --rows, "
                                   "--default-rows.", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="YAML experiment config (e.g. configs/quickstart.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted config overrides, e.g. fm.model.embedding_dim=64")
    p.add_argument("--world-size", type=int, required=True, help="number of devices")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="device type planned for")
    p.add_argument("--local-world-size", type=int, default=8, help="devices per host (default 8)")
    p.add_argument("--hbm-gb", type=float, default=80.0, help="memory per device in GB (default 80)")
    p.add_argument("--ddr-gb", type=float, default=512.0, help="host memory per host in GB (default 512)")
    p.add_argument("--batch-per-rank", type=int, help="examples per rank per step for the cost model "
                   "(default fm.train.batch_size / world size)")
    p.add_argument("--data", help="prepared event log (RUN/data) whose vocabulary sizes size the tables")
    p.add_argument("--rows", action="append", default=[], metavar="VOCAB=N",
                   help="rows of one vocabulary's table, e.g. item_id=1e9 (repeatable; wins over --data)")
    p.add_argument("--default-rows", type=float, help="rows of every table not sized otherwise")
    p.add_argument("--json", help="also write the report as JSON to this file")
    p.set_defaults(func=cmd_plan)

    p = _stage_parser(sub, "run", "run the whole pipeline on one config",
                      "Run every stage in order into RUN/<stage>, skipping stages whose output is complete "
                      "for the same config; a killed run picks up where it stopped.", cmd_run)
    _add_seeds(p)
    p = sub.add_parser("verify", help="check every stage folder of a run against its _SUCCESS file list",
                       description="Print each stage's state: ok, missing, or damaged (naming the file). "
                                   "Exit 0 when every present stage is intact, 2 otherwise.")
    p.add_argument("run_dir", help="run folder")
    p.set_defaults(func=cmd_verify)
    _add_serving_parsers(sub)
    add_launch_parser(sub)
    return parser


def _out_folder(args: argparse.Namespace) -> Path | None:
    """The run folder a command writes (None for the non-zero ranks of a multi-process stage, which
    run under rank 0's lock)."""
    if getattr(args, "rank", 0) != 0 or int(os.environ.get("RANK", "0")) != 0:
        return None
    return Path(args.out)


def _add_serving_parsers(sub) -> None:
    """export, store load / append, serve, serve-check (`loopfm.serving`)."""
    store_help = "timeline store: sqlite:PATH (embedded) or redis://HOST:PORT/DB"
    p = sub.add_parser("export", help="a trained VM as a self-contained serving bundle",
                       description="Write BUNDLE: the VM of RUN/vm as a torch.export program, the "
                                   "vocabularies of its features, the code and sequence specs, a manifest.")
    p.add_argument("run_dir", metavar="RUN")
    p.add_argument("--model", required=True, help="VM architecture of the run, e.g. dmin")
    p.add_argument("--variant", required=True, help="baseline | kd | loopfm | kd+loopfm")
    p.add_argument("--seed", type=int, default=0, help="seed index of the run (default 0)")
    p.add_argument("--out", required=True, metavar="BUNDLE", help="bundle folder (written atomically)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("store", help="fill an online timeline store from a run")
    act = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = act.add_parser("load", help="empty the store and load RUN/sequences' timelines")
    p.add_argument("run_dir", metavar="RUN")
    p.add_argument("--store", required=True, help=store_help)
    p.add_argument("--through-day", type=int, metavar="K", help="only the entries of days <= K")
    p.add_argument("--key", choices=("user", "item"), help="which timelines (default: the first built)")
    p.set_defaults(func=cmd_store_load)
    p = act.add_parser("append", help="append day K of RUN/compress (a daily FM job's new codes)")
    p.add_argument("run_dir", metavar="RUN")
    p.add_argument("--store", required=True, help=store_help)
    p.add_argument("--day", type=int, required=True, metavar="K")
    p.add_argument("--key", choices=("user", "item"), help="which timelines (default: the first built)")
    p.set_defaults(func=cmd_store_append)

    p = sub.add_parser("serve", help="score requests over HTTP JSON (GET /health, POST /score)",
                       description="Serve BUNDLE: POST /score {user, ts, items: [{<item key>: raw, ...}]} -> "
                                   "{scores, sequence_length}; codes are read from the store, no FM call.")
    p.add_argument("bundle", metavar="BUNDLE")
    p.add_argument("--store", help=store_help + " (required when the VM reads sequences)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: one core per process)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("serve-check", help="replay a day through the serving code; compare with RUN/vm",
                       description="Score every impression of the day with the server's code (codes read "
                                   "from the store as of each impression), compare with RUN/vm/predictions."
                                   "parquet; exit 1 when max |diff| > 1e-5.")
    p.add_argument("bundle", metavar="BUNDLE")
    p.add_argument("--store", help=store_help)
    p.add_argument("--run", required=True, metavar="RUN", dest="run_dir")
    p.add_argument("--day", type=int, help="default: the VM test day")
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=cmd_serve_check)


def _add_seeds(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seeds", type=int, metavar="N",
                   help="shorthand for vm.seeds=N: every VM run N times, mean ± std and paired t-tests")


def _seed_overrides(args: argparse.Namespace) -> list[str]:
    return [f"vm.seeds={args.seeds}"] if getattr(args, "seeds", None) is not None else []


def _config_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """The config file (or None) and the overrides, ``--seeds`` first so a ``key=value`` wins."""
    config, overrides = args.config, [*_seed_overrides(args), *args.overrides]
    if config is not None and "=" in config and not Path(config).exists():
        config, overrides = None, [config, *overrides]  # no config file, only overrides
    return config, overrides


def _load(args: argparse.Namespace, extra: list[str] = ()) -> LoopFMConfig:
    config, overrides = _config_and_overrides(args)
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


def _print_prepare_summary(out: Path, manifest: dict) -> None:
    import numpy as np

    from loopfm.data.eventlog import EventLog

    log = EventLog(out)
    labels = log.read(columns=["day", "label"])
    print(f"dataset {manifest['dataset']}: {manifest['rows']:,} events in {out}")
    print("| day | rows | positive rate |\n|---:|---:|---:|")
    day = labels.column("day").to_numpy()
    lab = labels.column("label").to_numpy()
    for d in log.days:
        m = day == d
        print(f"| {d} | {int(m.sum()):,} | {lab[m].mean():.4f} |")
    fm_only = [f.name for f in log.schema.features if f.fm_only]
    print(f"VM-visible features: {', '.join(f.name for f in log.schema.vm_features())}")
    print(f"FM-only features:    {', '.join(fm_only) or '(none)'}")
    if manifest.get("skipped_rows"):
        print(f"skipped rows: {manifest['skipped_rows']}")


def _print_eval(metrics: dict | None) -> None:
    if metrics:  # None when stopped early (fm.train.max_steps)
        print("| day | rows | AUC | LogLoss | NE |\n|---:|---:|---:|---:|---:|")
        for day, m in metrics.items():
            cells = " | ".join("–" if m.get(k) is None else f"{m[k]:.4f}" for k in ("auc", "logloss", "ne"))
            print(f"| {day} | {m['rows']:,} | {cells} |")


def _done(stage: str, ran: bool, start: float) -> None:
    print(f"[{stage}] {'done in %.1fs' % (time.perf_counter() - start) if ran else 'up to date (--force to redo)'}")


def cmd_prepare(args: argparse.Namespace) -> int:
    from loopfm.pipeline import run_prepare

    cfg = _load(args, _source_overrides(args))
    start = time.perf_counter()
    manifest, ran = run_prepare(cfg, Path(args.out), force=args.force, progress=not args.quiet)
    _done("prepare", ran, start)
    _print_prepare_summary(Path(args.out), manifest)
    return 0


def cmd_train_fm(args: argparse.Namespace) -> int:
    from loopfm.pipeline import run_train_fm

    cfg = _load(args)
    start = time.perf_counter()
    metrics, ran = run_train_fm(cfg, Path(args.out), resume=args.resume, force=args.force,
                                progress=not args.quiet)
    if metrics is not None and os.environ.get("RANK", "0") == "0":
        _done("train-fm", ran, start)
        _print_eval(metrics)
    return 0


def _sharded(args: argparse.Namespace, stage: str, run, **kwargs) -> int:
    cfg = _load(args)
    start = time.perf_counter()
    manifest, ran = run(cfg, Path(args.out), rank=args.rank, world_size=args.world_size, force=args.force,
                        progress=not args.quiet, **kwargs)
    _done(f"{stage}{'' if args.world_size == 1 else f' rank {args.rank}/{args.world_size}'}", ran, start)
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from loopfm.pipeline import run_extract
    return _sharded(args, "extract", run_extract)


def cmd_compress(args: argparse.Namespace) -> int:
    from loopfm.pipeline import run_compress
    return _sharded(args, "compress", run_compress)


def cmd_build_sequences(args: argparse.Namespace) -> int:
    from loopfm.pipeline import run_build_sequences
    return _sharded(args, "build-sequences", run_build_sequences, append=args.append)


def cmd_sequences_show(args: argparse.Namespace) -> int:
    from loopfm.stages.sequences import show_sequence

    print(json.dumps(show_sequence(args.run_dir, args.example_id, args.key), indent=2))
    return 0


def cmd_train_vm(args: argparse.Namespace) -> int:
    from loopfm.pipeline import run_train_vm

    cfg = _load(args)
    start = time.perf_counter()
    _, ran = run_train_vm(cfg, Path(args.out), force=args.force, progress=not args.quiet)
    _done("train-vm", ran, start)
    return 0


def _serving_errors(fn):
    """An unknown key or an unreachable store: one line on stderr, exit 2 (bad input, a
    ValueError, is `main`'s like every command's)."""
    def run(args: argparse.Namespace) -> int:
        from loopfm.serving.store import StoreUnavailable
        try:
            return fn(args)
        except (KeyError, StoreUnavailable) as err:
            print(f"loopfm {args.command}: error: {err}", file=sys.stderr)
            return 2
    return run


@_serving_errors
def cmd_export(args: argparse.Namespace) -> int:
    from loopfm.serving.bundle import export_bundle

    m = export_bundle(args.run_dir, args.model, args.variant, args.seed, args.out)
    print(f"exported {m['name']} to {args.out} (codes: {m['code_spec'] and m['code_spec']['quantizer']}, "
          f"sequence: {m['sequence']})")
    return 0


@_serving_errors
def cmd_store_load(args: argparse.Namespace) -> int:
    from loopfm.serving import timelines
    from loopfm.serving.store import open_store

    store = open_store(args.store)
    facts = timelines.load(args.run_dir, store, through_day=args.through_day, key=args.key)
    print(f"store load: {facts['entries']:,} {facts['key_kind']} entries of days {facts['days']} into {args.store}")
    return 0


@_serving_errors
def cmd_store_append(args: argparse.Namespace) -> int:
    from loopfm.serving import timelines
    from loopfm.serving.store import open_store

    store = open_store(args.store)
    facts = timelines.append(args.run_dir, store, args.day, key=args.key)
    print(f"store append: day {args.day}, {facts['entries']:,} entries; evicted ts < {facts['evicted_before']}")
    return 0


def _scorer(args: argparse.Namespace, *, store_may_be_down: bool = False):
    import torch

    from loopfm.serving.bundle import Bundle
    from loopfm.serving.scorer import Scorer
    from loopfm.serving.store import StoreUnavailable, open_store

    torch.set_num_threads(args.threads)  # small requests: extra threads only add hand-off latency
    scorer = Scorer(Bundle(args.bundle), open_store(args.store) if args.store else None)
    try:
        scorer.check_store()
    except StoreUnavailable as err:
        if not store_may_be_down:
            raise
        print(f"loopfm serve: warning: {err}; answering 503 until the store is back", file=sys.stderr)
    return scorer


@_serving_errors
def cmd_serve(args: argparse.Namespace) -> int:
    from loopfm.serving.server import serve

    scorer = _scorer(args, store_may_be_down=True)
    print(f"serving {scorer.bundle.manifest['name']} on http://{args.host}:{args.port} (store {args.store})")
    serve(scorer, args.host, args.port)
    return 0


@_serving_errors
def cmd_serve_check(args: argparse.Namespace) -> int:
    from loopfm.serving.check import TOLERANCE, serve_check

    r = serve_check(_scorer(args), args.run_dir, args.day)
    ok = r["max_abs_diff"] <= TOLERANCE
    print(f"serve-check {r['name']} day {r['day']}: {r['rows']:,} rows in {r['requests']:,} requests, "
          f"max |served - offline| = {r['max_abs_diff']:.3g} ({'ok' if ok else f'FAIL: > {TOLERANCE:g}'})")
    return 0 if ok else 1


def cmd_report(args: argparse.Namespace) -> int:
    from loopfm import report
    from loopfm.pipeline import run_report

    results = run_report(_load(args), Path(args.out), fm_before=Path(args.fm_before) if args.fm_before else None)
    print(report.results_table(results))
    print(f"\nwrote {Path(args.out) / 'results.json'} and {Path(args.out) / 'report.md'}")
    return 0


def cmd_tune_kd(args: argparse.Namespace) -> int:
    from loopfm.stages.tune_kd import results_table, run_tune_kd

    start = time.perf_counter()
    results = run_tune_kd(_load(args), Path(args.out), progress=not args.quiet, force=args.force)
    _done("tune-kd", not results.get("up_to_date"), start)
    print(results_table(results))
    best = results["best"]
    print(f"\nbest on day {results['valid_day']}: {best['overrides']}  (put these in the "
          f"config; the test day {results['test_day_unused']} was not used)")
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    from loopfm.diagnose import render, run_diagnose

    run_dir = Path(args.run_dir)
    config = args.config or (str(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else None)
    cfg = load_config(LoopFMConfig, config, args.overrides)
    with run_lock(run_dir):  # writes RUN/diagnose
        print(render(run_diagnose(cfg, run_dir, force=args.force)))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from loopfm.sweep import comparison_table, parse_param, run_sweep, sweep_table

    config, overrides = _config_and_overrides(args)
    key, values = parse_param(args.param)
    out = Path(args.out)
    summary = run_sweep(config, overrides, out, key, values, force=args.force, progress=not args.quiet,
                        reference=args.reference)
    print()
    print(sweep_table(summary))
    print()
    print(comparison_table(summary))
    print(f"\nsweep: {out / 'sweep.json'}   report: {out / 'report.md'}   "
          f"TensorBoard: tensorboard --logdir {out / 'tb'}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from loopfm.data.schema import Schema
    from loopfm.fm.plan import PlanRequest, format_report, plan_fm, planning_schema, source_schema

    cfg = _load(args)
    rows = {}
    for item in args.rows:
        vocab, _, n = item.partition("=")
        try:
            rows[vocab] = int(float(n))
        except ValueError:
            raise ConfigError(f"--rows {item!r}: expected VOCAB=N (N a number of rows, e.g. 1e9)") from None
    try:
        req = PlanRequest(world_size=args.world_size, device=args.device, local_world_size=args.local_world_size,
                          hbm_gb=args.hbm_gb, ddr_gb=args.ddr_gb, batch_size=args.batch_per_rank)
        schema = Schema.load(Path(args.data) / "schema.json") if args.data else source_schema(cfg.data, cfg.seed)
        default = int(args.default_rows) if args.default_rows else None
        report = plan_fm(cfg.fm, planning_schema(schema, rows, default), req)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from loopfm import report
    from loopfm.pipeline import run_all

    out = Path(args.out)
    results = run_all(_load(args), out, force=args.force, progress=not args.quiet)
    print()
    print(report.results_table(results))
    print(f"\nresults: {out / 'results.json'}   report: {out / 'report.md'}   "
          f"TensorBoard: tensorboard --logdir {out / 'tb'}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from loopfm.artifacts import stage_state
    from loopfm.pipeline import FOLDERS

    run = Path(args.run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"{run} is not a folder")
    bad = 0
    for stage, folder in FOLDERS.items():
        state, detail = stage_state(run / folder)
        bad += state == "damaged"
        print(f"{stage:16s} {state:8s} {detail if state != 'ok' else run / folder}")
    return 2 if bad else 0


def _check_config(args: argparse.Namespace) -> None:
    """The whole config and its day protocol, before anything is written (sweep checks each point)."""
    from loopfm.protocol import check_protocol

    if args.command == "sweep":
        from loopfm.sweep import check_sweep

        check_sweep(*_config_and_overrides(args), args.param, args.reference)
    elif hasattr(args, "run_folder"):
        extra = _source_overrides(args) if args.command == "prepare" else []
        cfg = _load(args, extra)
        check_protocol(cfg, tune_kd=args.command == "tune-kd")
        data = Path(args.out) / "data"
        if args.command not in ("prepare", "run") and (data / "_SUCCESS").is_file():
            from loopfm.artifacts import read_manifest
            from loopfm.protocol import check_days_in_log

            check_days_in_log(cfg, [int(d) for d in read_manifest(data)["rows_per_day"]], str(data))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also follow options (`run CONFIG --out RUN a.b=1`); so may --debug.
    args.debug = args.debug or "--debug" in extra
    extra = [a for a in extra if a != "--debug"]
    unknown = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        _check_config(args)
        folder = args.run_folder(args) if hasattr(args, "run_folder") else None
        with run_lock(folder) if folder is not None else contextlib.nullcontext():
            return args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"\nloopfm {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        if args.debug:
            raise
        print(f"loopfm {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - a bug: one line, the traceback with --debug
        if args.debug:
            raise
        print(f"loopfm {args.command}: internal error: {type(err).__name__}: {_one_line(err)} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        return 1


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if isinstance(err, USER_ERRORS) else text[:500]


if __name__ == "__main__":
    sys.exit(main())
