"""Throughput and peak memory of `loopfm prepare`.

Two cases, each in a fresh process (so peak RSS is its own):
  synthetic  the TaobaoAd-like generator, ROWS rows, straight into the event log;
  events     a ROWS-row CSV (written first, not timed) with a YAML schema: ids, a numeric,
             a string timestamp, a '|'-separated tag sequence.

    python benchmarks/prepare_bench.py              # 5M rows each (a few minutes on 2 cores)
    python benchmarks/prepare_bench.py --rows 200000
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

SCHEMA = """\
format: csv
timestamp: {column: time, strftime: "%Y-%m-%dT%H:%M:%S", tz: "UTC"}
label: {column: clicked}
user: uid
item: iid
features:
  - {name: uid, kind: categorical}
  - {name: iid, kind: categorical}
  - {name: region, kind: categorical, fm_only: true}
  - {name: price, kind: numeric}
  - {name: tags, kind: sequence, sep: "|", max_len: 10}
days: 8
"""


def write_events_csv(path: Path, rows: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    start = np.datetime64("2024-01-01T00:00:00")
    chunk = 1_000_000
    with pacsv.CSVWriter(path, pa.schema([("time", pa.string()), ("uid", pa.int64()), ("iid", pa.int64()),
                                          ("region", pa.string()), ("price", pa.float64()),
                                          ("tags", pa.string()), ("clicked", pa.int8())])) as w:
        for s in range(0, rows, chunk):
            n = min(chunk, rows - s)
            secs = np.sort(rng.integers(0, 8 * 86400, n))  # sorted within a chunk, not across
            tags = ["|".join(map(str, rng.integers(0, 50, k))) for k in rng.integers(0, 6, n)]
            w.write_table(pa.table({
                "time": (start + secs.astype("timedelta64[s]")).astype(str).astype(object),
                "uid": rng.zipf(1.3, n) % 100_000, "iid": rng.zipf(1.2, n) % 50_000,
                "region": np.char.add("r", (rng.integers(0, 30, n)).astype(str)),
                "price": np.round(rng.lognormal(3, 1, n), 2), "tags": tags,
                "clicked": (rng.random(n) < 0.05).astype(np.int8),
            }))


def run_timed(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"benchmark command failed: {' '.join(cmd)}")
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=5_000_000)
    args = parser.parse_args()
    py = [sys.executable, "-m", "loopfm.cli", "prepare"]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        wall, rss = run_timed(py + ["--out", str(tmp / "syn"), "--quiet", f"data.synthetic.rows={args.rows}"])
        results.append(("synthetic (generate + prepare)", wall, rss))
        csv = tmp / "events.csv"
        write_events_csv(csv, args.rows)
        (tmp / "schema.yaml").write_text(SCHEMA)
        wall, rss = run_timed(py + ["--source", "events", "--input", str(csv), "--schema", str(tmp / "schema.yaml"),
                                    "--out", str(tmp / "ev"), "--quiet"])
        results.append((f"events CSV ({csv.stat().st_size / 2**20:.0f} MB)", wall, rss))
    print(f"\nprepare, {args.rows:,} rows, {os.cpu_count()} cores\n")
    print("| case | seconds | rows/s | peak RSS (MB) |\n|---|---:|---:|---:|")
    for name, wall, rss in results:
        print(f"| {name} | {wall:.1f} | {args.rows / wall:,.0f} | {rss:,.0f} |")


if __name__ == "__main__":
    main()
