"""FM training throughput and peak memory, 1 and 2 processes, on the quickstart data and MovieLens-100K.

    python benchmarks/fm_train_bench.py [--steps 60] [--datasets quickstart movielens100k] [--nprocs 1 2]
                                        [--cpu-threads 1] [--baseline-ref GIT_REF] [--repeats 2]

For each dataset (prepared once per code tree under ROOT/<code>/<name>/data with the config's
data section) and each process count, trains the config's FM for ``--steps`` global batches
through the real trainer (`loopfm.fm.train.train_fm`, launched with torch's elastic launcher like
``torchrun``), then prints a Markdown table: global batch, examples/s (median over windows of 10
steps; the first window -- fx tracing, first-touch allocations, lazy imports -- is dropped), and
the peak resident memory per process (VmHWM). One torch thread per process by default: on a
2-core machine shared with other work, torch's default pool of 2 threads was up to 6x slower.
``--clock cpu`` divides by the training process's CPU seconds instead of wall-clock seconds: on a
machine where other jobs come and go, wall-clock rates of the same code varied 4x within minutes.

``--baseline-ref REF`` also times the code of git ref REF (checked out into a temporary
``git worktree``, removed afterwards): every measurement runs in its own subprocess, interleaved
this-code / baseline ``--repeats`` times (A B A B ...), so both see the same machine load; the
table gets a row per code and the ratios of their median and of their best window's examples/s
(on a machine shared with other jobs the best window is the least disturbed one).
Not a test: numbers depend on the machine (and on what else runs on it).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from memory import peak_rss_mb  # benchmarks/memory.py, beside this script

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"quickstart": "configs/quickstart.yaml", "movielens100k": "configs/movielens100k.yaml"}
WINDOW = 10


def _worker(data: str, out: str, fm: dict, seed: int, result: str, clock: str = "wall") -> None:
    import time
    import types

    import loopfm.fm.train as trainer
    from loopfm.fm.train import fm_config_from_dict, train_fm

    if clock == "cpu":  # the trainer's examples/s windows read this process's CPU time instead
        trainer.time = types.SimpleNamespace(**{**vars(time), "perf_counter": time.process_time})

    train_fm(fm_config_from_dict(fm), data, out, seed=seed, config_hash="bench", progress=False)
    rank = int(os.environ.get("RANK", "0"))
    Path(f"{result}.rank{rank}").write_text(json.dumps({"peak_mb": peak_rss_mb()}))


def _launch(nproc: int, scratch: Path, *args) -> None:
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint=str(scratch / f"rdzv-{uuid.uuid4().hex}"),
                          rdzv_configs={"store_type": "file"}, start_method="spawn", max_restarts=0)
    elastic_launch(config, entrypoint=_worker)(*args)


def _load_config(code: Path, name: str):
    from loopfm.config import load_config
    try:
        from loopfm.experiment import LoopFMConfig
    except ImportError:  # older trees composed the experiment in loopfm.config
        from loopfm.config import LoopFMConfig
    return load_config(LoopFMConfig, code / CONFIGS[name])


def measure(code: Path, name: str, nproc: int, steps: int, root: Path, threads: int, tag: str,
            clock: str = "wall") -> dict:
    """One measurement with the loopfm package of ``code`` (must be first on sys.path)."""
    from loopfm.pipeline import run_prepare

    cfg = _load_config(code, name)
    data = root / name / "data"
    run_prepare(cfg, data, force=False, progress=False)
    train = dataclasses.replace(cfg.fm.train, max_steps=steps, log_every_steps=WINDOW, checkpoint_every_steps=0)
    parallel = dataclasses.replace(cfg.fm.parallel, cpu_threads=threads)
    fm = dataclasses.replace(cfg.fm, train=train, parallel=parallel)
    run = root / name / f"np{nproc}-{tag}"
    _launch(nproc, root, str(data), str(run / "fm"), dataclasses.asdict(fm), cfg.seed, str(run / "result"), clock)
    rows = [json.loads(line) for line in (run / "fm.work" / "metrics.jsonl").read_text().splitlines()]
    rates = [r["train/examples_per_s"] for r in rows if "train/examples_per_s" in r][1:]
    peaks = [json.loads(Path(f"{run / 'result'}.rank{r}").read_text())["peak_mb"] for r in range(nproc)]
    return {"dataset": name, "nproc": nproc, "batch": fm.train.batch_size, "dim": fm.model.embedding_dim,
            "dnn": fm.model.dnn, "arch": fm.model.arch,
            "examples_per_s": statistics.median(rates) if rates else float("nan"),
            "best_examples_per_s": max(rates) if rates else float("nan"), "peak_mb": max(peaks)}


def _child(args) -> None:
    code = Path(args.code)
    sys.path.insert(0, str(code))
    result = measure(code, args.child, args.child_nproc, args.steps, Path(args.root), args.cpu_threads, args.tag,
                     args.clock)
    Path(args.result).write_text(json.dumps(result))


def _run_child(code: Path, label: str, name: str, nproc: int, args, rep: int, scratch: Path) -> dict:
    result = scratch / f"{label}-{name}-{nproc}-{rep}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--child-nproc", str(nproc),
           "--code", str(code), "--root", str(Path(args.root) / label), "--steps", str(args.steps),
           "--cpu-threads", str(args.cpu_threads), "--tag", f"r{rep}", "--result", str(result),
           "--clock", args.clock]
    env = {**os.environ, "PYTHONPATH": str(code)}
    subprocess.run(cmd, check=True, env=env, cwd=code)
    return json.loads(result.read_text())


def _worktree(ref: str, parent: Path) -> Path:
    path = parent / "baseline"
    shared = REPO.parent / "shared"
    if shared.is_dir():  # configs name data relative to the checkout (../shared/data/...)
        (parent / "shared").symlink_to(shared)
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), ref], check=True,
                   stdout=subprocess.DEVNULL)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60, help="global batches trained per measurement")
    p.add_argument("--datasets", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--nprocs", nargs="+", type=int, default=[1, 2])
    p.add_argument("--root", default=str(REPO / "runs" / "bench"), help="scratch folder")
    p.add_argument("--cpu-threads", type=int, default=1,
                   help="fm.parallel.cpu_threads per process (0 = the config's/auto; 1 keeps runs "
                        "comparable on a small shared CPU)")
    p.add_argument("--baseline-ref", default=None,
                   help="git ref to time against, interleaved in this run (default: none)")
    p.add_argument("--repeats", type=int, default=2, help="with --baseline-ref: measurements per code")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="examples per wall-clock second, or per CPU second of the training process "
                        "(cpu: insensitive to other jobs on a shared machine; 1 thread per process)")
    # internal: one measurement in a subprocess
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-nproc", type=int, help=argparse.SUPPRESS)
    p.add_argument("--code", help=argparse.SUPPRESS)
    p.add_argument("--tag", default="r0", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(args)
        return
    Path(args.root).mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the temporary worktree is removed
    with tempfile.TemporaryDirectory(prefix="fm-bench-") as tmp:
        scratch = Path(tmp)
        codes = {"this": REPO}
        if args.baseline_ref:
            codes["baseline"] = _worktree(args.baseline_ref, scratch)
        try:
            repeats = args.repeats if args.baseline_ref else 1
            results: dict[tuple, list[dict]] = {}
            for name in args.datasets:
                for nproc in args.nprocs:
                    for rep in range(repeats):
                        for label, code in codes.items():  # A B A B: both codes see the same load
                            r = _run_child(code, label, name, nproc, args, rep, scratch)
                            results.setdefault((name, nproc, label), []).append(r)
                            print(f"{name} np={nproc} {label} run {rep}: {r['examples_per_s']:,.0f} ex/s "
                                  f"(best window {r['best_examples_per_s']:,.0f})", flush=True)
        finally:
            if args.baseline_ref:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force",
                                str(codes["baseline"])], check=False)
    _print_table(results, codes, args)


def _print_table(results: dict, codes: dict, args) -> None:
    ref = f" ({args.baseline_ref})" if args.baseline_ref else ""
    print(f"\nexamples per {'CPU' if args.clock == 'cpu' else 'wall-clock'} second of each training process")
    print("\n| data | FM | processes | global batch | code | examples/s, median window per run | "
          "best window | peak RSS per process | speed-up (median / best) |")
    print("|---|---|---:|---:|---|---|---:|---:|---:|")
    for name in args.datasets:
        for nproc in args.nprocs:
            medians, bests = {}, {}
            for label in codes:
                runs = results[(name, nproc, label)]
                r = runs[0]
                medians[label] = statistics.median(x["examples_per_s"] for x in runs)
                bests[label] = max(x["best_examples_per_s"] for x in runs)
                fm = f"{r['arch']} dim {r['dim']} dnn {r['dnn']}"
                each = ", ".join(f"{x['examples_per_s']:,.0f}" for x in runs)
                speed = ""
                if label == "baseline":
                    speed = (f"{medians['this'] / medians['baseline']:.2f}x / "
                             f"{bests['this'] / bests['baseline']:.2f}x")
                print(f"| {name} | {fm} | {nproc} | {r['batch']} | {label}{ref if label == 'baseline' else ''} | "
                      f"{each} | {bests[label]:,.0f} | {max(x['peak_mb'] for x in runs):,.0f} MB | {speed} |")


if __name__ == "__main__":
    main()
