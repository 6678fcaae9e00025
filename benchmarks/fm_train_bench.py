"""FM training throughput and peak memory, 1 and 2 processes, on the quickstart data and MovieLens-100K.

    python benchmarks/fm_train_bench.py [--steps 60] [--datasets quickstart movielens100k] [--nprocs 1 2]
                                        [--cpu-threads 1]

For each dataset (prepared once under runs/bench/<name>/data with the config's data section) and
each process count, trains the config's FM for ``--steps`` global batches through the real
trainer (`loopfm.fm.train.train_fm`, launched with torch's elastic launcher like ``torchrun``),
then prints a Markdown table: global batch, examples/s (median over windows of 10 steps, the
first window -- fx tracing, warm-up -- dropped), and the peak resident memory per process
(VmHWM). One torch thread per process by default: on a 2-core machine shared with other work,
torch's default pool of 2 threads was up to 6x slower than 1 thread.
Not a test: numbers depend on the machine (and on what else runs on it).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import sys
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIGS = {"quickstart": REPO / "configs" / "quickstart.yaml",
           "movielens100k": REPO / "configs" / "movielens100k.yaml"}
WINDOW = 10


def _worker(data: str, out: str, fm: dict, seed: int, result: str) -> None:
    import os

    from loopfm.fm.train import fm_config_from_dict, train_fm

    train_fm(fm_config_from_dict(fm), data, out, seed=seed, config_hash="bench", progress=False)
    rank = int(os.environ.get("RANK", "0"))
    peak_mb = _peak_rss_mb()
    Path(f"{result}.rank{rank}").write_text(json.dumps({"peak_mb": peak_mb}))


def _peak_rss_mb() -> float:
    # VmHWM: this process's own peak (ru_maxrss would carry the launcher's RSS over fork + exec).
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _launch(nproc: int, scratch: Path, *args) -> None:
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint=str(scratch / f"rdzv-{uuid.uuid4().hex}"),
                          rdzv_configs={"store_type": "file"}, start_method="spawn", max_restarts=0)
    elastic_launch(config, entrypoint=_worker)(*args)


def bench(name: str, nproc: int, steps: int, root: Path, threads: int) -> dict:
    from loopfm.pipeline import run_prepare
    from loopfm.config import load_config
    from loopfm.experiment import LoopFMConfig

    cfg = load_config(LoopFMConfig, CONFIGS[name])
    data = root / name / "data"
    run_prepare(cfg, data, force=False, progress=False)
    train = dataclasses.replace(cfg.fm.train, max_steps=steps, log_every_steps=WINDOW, checkpoint_every_steps=0)
    parallel = dataclasses.replace(cfg.fm.parallel, cpu_threads=threads)
    fm = dataclasses.replace(cfg.fm, train=train, parallel=parallel)
    out = root / name / f"np{nproc}" / "fm"
    result = root / name / f"np{nproc}" / "result"
    _launch(nproc, root, str(data), str(out), dataclasses.asdict(fm), cfg.seed, str(result))
    rows = [json.loads(line) for line in (out.parent / "fm.work" / "metrics.jsonl").read_text().splitlines()]
    rates = [r["train/examples_per_s"] for r in rows if "train/examples_per_s" in r][1:]
    peaks = [json.loads(Path(f"{result}.rank{r}").read_text())["peak_mb"] for r in range(nproc)]
    return {"dataset": name, "nproc": nproc, "batch": fm.train.batch_size, "dim": fm.model.embedding_dim,
            "dnn": fm.model.dnn, "arch": fm.model.arch,
            "examples_per_s": statistics.median(rates) if rates else float("nan"), "peak_mb": max(peaks)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60, help="global batches trained per measurement")
    p.add_argument("--datasets", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--nprocs", nargs="+", type=int, default=[1, 2])
    p.add_argument("--root", default=str(REPO / "runs" / "bench"), help="scratch folder")
    p.add_argument("--cpu-threads", type=int, default=1,
                   help="fm.parallel.cpu_threads per process (0 = the config's/auto; 1 keeps runs "
                        "comparable on a small shared CPU)")
    args = p.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    results = [bench(d, n, args.steps, root, args.cpu_threads) for d in args.datasets for n in args.nprocs]
    print("\n| data | FM | processes | global batch | examples/s | peak RSS per process |")
    print("|---|---|---:|---:|---:|---:|")
    for r in results:
        fm = f"{r['arch']} dim {r['dim']} dnn {r['dnn']}"
        print(f"| {r['dataset']} | {fm} | {r['nproc']} | {r['batch']} | {r['examples_per_s']:,.0f} | "
              f"{r['peak_mb']:,.0f} MB |")


if __name__ == "__main__":
    main()
