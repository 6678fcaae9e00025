"""train-vm on 1 and on N processes: wall seconds of the whole stage, and whether the outputs agree.

    python benchmarks/train_vm_ranks_bench.py --run runs/quickstart [--nprocs 1,2] [--repeats 2]
                                              [key=value ...]

RUN must hold a finished pipeline through build-sequences (``make run`` leaves one in
runs/quickstart). Each measurement runs ``torchrun --nproc_per_node=N -m loopfm.cli train-vm
CONFIG --out COPY`` in a fresh folder COPY whose inputs (config.yaml, data, fm, extract, compress,
sequences) link to RUN's, so RUN itself is never written. The runs (model, variant, seed) are
shared out by rank, so N processes should take about 1/N of the time on N free cores; the table
also checks that every N wrote the predictions of N = 1 exactly. Passes alternate (1, N, 1, N,
...) so a change in the machine's load hits both. Not a test: timings depend on the machine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INPUTS = ("config.yaml", "data", "fm", "extract", "compress", "sequences")


def _copy_run(run: Path, dest: Path) -> None:
    dest.mkdir(parents=True)
    for name in INPUTS:
        if not (run / name).exists():
            raise SystemExit(f"train_vm_ranks_bench: {run / name} is missing; finish the pipeline through "
                             "build-sequences first (e.g. make run)")
        (dest / name).symlink_to((run / name).resolve())


def _train_vm(nprocs: int, out: Path, overrides: list[str]) -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nprocs}",
           "-m", "loopfm.cli", "train-vm", str(out / "config.yaml"), "--out", str(out), "--quiet", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"train_vm_ranks_bench: {nprocs} process(es) failed (exit {proc.returncode}):\n"
                         + proc.stderr[-3000:])
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a run folder finished through build-sequences")
    p.add_argument("--nprocs", default="1,2", help="comma-separated process counts; the first is the reference")
    p.add_argument("--repeats", type=int, default=2, help="passes per process count")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for train-vm")
    args = p.parse_args()
    import pyarrow.parquet as pq

    run = Path(args.run).resolve()
    counts = [int(n) for n in args.nprocs.split(",") if n]
    seconds: dict[int, list[float]] = {n: [] for n in counts}
    same: dict[int, bool] = {}
    reference = None
    with tempfile.TemporaryDirectory(prefix="train_vm_ranks_") as tmp:
        for rep in range(args.repeats):
            for n in counts:
                out = Path(tmp) / f"n{n}-r{rep}"
                _copy_run(run, out)
                seconds[n].append(_train_vm(n, out, args.overrides))
                preds = pq.read_table(out / "vm" / "predictions.parquet")
                if reference is None:
                    reference = preds
                same[n] = same.get(n, True) and preds.equals(reference)
                print(f"[train_vm_ranks_bench] {n} process(es), pass {rep + 1}: {seconds[n][-1]:.1f} s", flush=True)
    runs = reference.num_columns - 3  # example_id, label, user_id, then one column per run
    base = statistics.median(seconds[counts[0]])
    print(f"\n{run}: {runs} runs (model, variant, seed), {os.cpu_count()} cores, OMP_NUM_THREADS=1")
    print("\n| processes | seconds per pass | median | speed-up | predictions equal the first row's |")
    print("|---:|---|---:|---:|---|")
    for n in counts:
        med = statistics.median(seconds[n])
        print(f"| {n} | {', '.join(f'{s:.1f}' for s in seconds[n])} | {med:.1f} | {base / med:.2f}x | "
              f"{'yes' if same[n] else 'NO'} |")


if __name__ == "__main__":
    main()
