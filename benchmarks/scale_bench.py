"""The whole pipeline on N synthetic TaobaoAd-like rows: seconds, rows/s and peak RSS per stage.

    python benchmarks/scale_bench.py --rows 1000000 --out /tmp/scale1m [--stages prepare,...]
                                     [--config configs/quickstart.yaml] [key=value ...]

Runs ``loopfm <stage> CONFIG --out DIR data.synthetic.rows=N [key=value ...]`` for each stage in
pipeline order, each in its own subprocess, so the peak resident memory is the stage's own
(VmHWM of the stage process, plus the peak of any process it starts). rows/s is N / the stage's
seconds (every stage is reported against the whole data set's size, whatever share of the days
it reads). CPU seconds (user + system over all threads) say what a stage costs when the machine is
shared, where wall seconds also count the waiting. A stage whose output is already complete in DIR
is skipped by the pipeline (its seconds are then the check's); pass a fresh DIR to measure
everything.
Not a test: numbers depend on the machine (and on what else runs on it).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from memory import peak_rss_mb  # benchmarks/memory.py, beside this script

REPO = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "train-fm", "extract", "compress", "build-sequences", "train-vm", "report")


def _peak_mb() -> float:
    """This process's peak RSS, or its children's if larger."""
    return max(peak_rss_mb(), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)

def _cpu_s() -> float:
    """CPU seconds (user + system, all threads) of this process and the processes it waited for."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _child(argv: list[str], result: str) -> None:
    """Run one CLI stage in this process, then record its exit code and peak RSS."""
    from loopfm.cli import main

    code = main(argv)
    Path(result).write_text(json.dumps({"rc": code, "peak_mb": _peak_mb(), "cpu_s": _cpu_s()}))
    sys.exit(code)


def run_stage(stage: str, config: str, out: Path, rows: int, overrides: list[str]) -> dict:
    result = out.parent / f".{out.name}.{stage}.json"
    target = out / "data" if stage == "prepare" else out  # prepare writes the data folder itself
    argv = [stage, config, "--out", str(target), "--quiet", f"data.synthetic.rows={rows}", *overrides]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(argv), "--result", str(result)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"scale_bench: stage {stage} failed (exit {proc.returncode})")
    facts = json.loads(result.read_text())
    result.unlink()
    return {"stage": stage, "seconds": seconds, "cpu_s": facts["cpu_s"], "rows_per_s": rows / seconds,
            "peak_mb": facts["peak_mb"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, help="synthetic impressions (data.synthetic.rows)")
    p.add_argument("--out", help="run folder (use a fresh one to time every stage)")
    p.add_argument("--config", default="configs/quickstart.yaml")
    p.add_argument("--stages", default=",".join(STAGES),
                   help=f"comma-separated stages, in pipeline order (default all: {','.join(STAGES)})")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every stage")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(json.loads(args.child), args.result)
        return
    if not args.rows or not args.out:
        p.error("--rows and --out are required")
    stages = [s for s in args.stages.split(",") if s]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        p.error(f"unknown stages {bad}; choose from {','.join(STAGES)}")
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for stage in stages:
        r = run_stage(stage, args.config, out, args.rows, args.overrides)
        results.append(r)
        print(f"[scale_bench] {stage}: {r['seconds']:.1f} s, {r['rows_per_s']:,.0f} rows/s, "
              f"{r['cpu_s']:.1f} CPU s, peak {r['peak_mb']:,.0f} MB", flush=True)
    total = sum(r["seconds"] for r in results)
    print(f"\n{args.rows:,} rows, {args.config} {' '.join(args.overrides)}".rstrip())
    cpu = sum(r["cpu_s"] for r in results)
    print("\n| stage | seconds | CPU seconds | rows/s | peak RSS |\n|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['stage']} | {r['seconds']:,.1f} | {r['cpu_s']:,.1f} | {r['rows_per_s']:,.0f} | {r['peak_mb']:,.0f} MB |")
    print(f"| **total** | {total:,.1f} | {cpu:,.1f} | {args.rows / total:,.0f} | "
          f"{max(r['peak_mb'] for r in results):,.0f} MB |")


if __name__ == "__main__":
    main()
