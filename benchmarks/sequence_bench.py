"""build-sequences throughput and peak memory, side by side with the same semantics in DuckDB.

    .venv/bin/python benchmarks/sequence_bench.py                 # 10M events, ~1M Zipf keys (minutes)
    .venv/bin/python benchmarks/sequence_bench.py --rows 2000000   # smaller

A synthetic compress output (random packed INT4 codes, user keys drawn from a Zipf law over
``--keys`` keys, timestamps spread over ``--days`` days with many same-second ties) is written
once; then, each in its own process (so peak RSS is its own):

* loopfm: `run_build_sequences` (read Parquet -> timelines + per-example offsets -> Parquet);
* duckdb: the same output with SQL: the timeline sorted by (key, ts, example_id) and, per example,
  ``count(*) OVER (PARTITION BY key ORDER BY ts RANGE BETWEEN W PRECEDING AND 1 PRECEDING)``
  (strictly earlier, inside the window) turned into (start, end) offsets, written to Parquet.

The two offset tables are compared row for row (same semantics), and the script prints events/s,
wall seconds and peak RSS of each, and their ratio. DuckDB is a benchmark-only dependency:
``.venv/bin/pip install duckdb``; without it the DuckDB column is skipped with a message.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from loopfm.artifacts import atomic_output, write_manifest  # noqa: E402
from memory import peak_rss_mb  # noqa: E402  (benchmarks/memory.py, beside this script)
from loopfm.stages import codes_format as cf  # noqa: E402

DAY = 86_400


def make_compress(out: Path, rows: int, keys: int, zipf: float, days: int, code_bytes: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, keys + 1, dtype=np.float64)
    cdf = np.cumsum(ranks ** -zipf)
    key_rank = np.searchsorted(cdf / cdf[-1], rng.random(rows))
    user = cf.splitmix64(key_rank).view(np.int64)  # arbitrary int64 ids, not frequency-ordered
    ts = np.sort(1_700_000_000 + rng.integers(0, days * DAY // 4, rows) * 4)  # 4-second grid: ties
    day = (np.arange(rows) * days // rows + 1).astype(np.int32)
    label = (rng.random(rows) < 0.3).astype(np.int8)
    codes = rng.integers(0, 256, (rows, code_bytes), dtype=np.uint8)
    per_part = 2_000_000
    rows_per_day = {}
    with atomic_output(out) as tmp:
        for d in range(1, days + 1):
            idx = np.flatnonzero(day == d)
            rows_per_day[str(d)] = int(len(idx))
            for part, s in enumerate(range(0, len(idx), per_part)):
                sel = idx[s:s + per_part]
                meta = {"example_id": sel.astype(np.int64), "ts": ts[sel], "day": day[sel], "label": label[sel],
                        "user_key": user[sel], "item_key": key_rank[sel] % 1000, "soft_label": np.zeros(len(sel))}
                cf.write_packed(tmp, d, part, meta, codes[sel])
        write_manifest(tmp, stage="compress", config_hash="bench", quantizer="int4", dim=2 * code_bytes,
                       code_bytes=code_bytes, codebook=None, rows_per_day=rows_per_day,
                       user_key="user", item_key="item")


def run_loopfm(compress: Path, out: Path, max_len: int, window_days: float) -> dict:
    from loopfm.stages.sequences import SequencesConfig, run_build_sequences
    t0 = time.perf_counter()
    run_build_sequences(SequencesConfig(max_len=max_len, window_days=window_days), compress, out, progress=False)
    return {"seconds": time.perf_counter() - t0}


def run_reader(out: Path, batch_size: int = 4096, batches: int = 40) -> dict:
    """The VM-side reader: load time, then padded + jagged batches in example order."""
    from loopfm.stages.sequences import SequenceReader
    t0 = time.perf_counter()
    reader = SequenceReader(out)
    t1 = time.perf_counter()
    n = 0
    for i, b in enumerate(reader.iter_batches(batch_size)):
        n += len(b.example_id)
        if i + 1 == batches:
            break
    return {"load_s": t1 - t0, "examples_per_s": n / (time.perf_counter() - t1), "batch_size": batch_size}


def run_duckdb(compress: Path, out: Path, max_len: int, window_days: float) -> dict:
    import duckdb
    window = int(round(window_days * DAY))
    out.mkdir(parents=True, exist_ok=True)
    src = f"read_parquet('{compress}/codes/*/*.parquet')"
    con = duckdb.connect()
    con.execute(f"SET threads TO {os.cpu_count()}")
    con.execute(f"SET temp_directory = '{out}/tmp'")
    t0 = time.perf_counter()
    con.execute(f"""COPY (SELECT user_key AS key, ts, example_id, label, code FROM {src}
                          ORDER BY user_key, ts, example_id) TO '{out}/timeline.parquet' (FORMAT parquet)""")
    con.execute(f"""COPY (
        WITH t AS (SELECT example_id, ts, user_key FROM {src}),
        k AS (SELECT user_key, count(*) AS cnt FROM t GROUP BY user_key),
        kb AS (SELECT user_key, sum(cnt) OVER (ORDER BY user_key ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
                                - cnt AS base FROM k),
        w AS (SELECT example_id, ts, user_key,
                count(*) OVER (PARTITION BY user_key ORDER BY ts
                               RANGE BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS n_before,
                count(*) OVER (PARTITION BY user_key ORDER BY ts
                               RANGE BETWEEN {window} PRECEDING AND 1 PRECEDING) AS n_window
              FROM t)
        SELECT example_id, ts, user_key AS key,
               CASE WHEN n_window > 0 THEN base + n_before - least(n_window, {max_len}) ELSE 0 END AS start,
               CASE WHEN n_window > 0 THEN base + n_before ELSE 0 END AS "end"
        FROM w JOIN kb USING (user_key) ORDER BY example_id
    ) TO '{out}/examples.parquet' (FORMAT parquet)""")
    return {"seconds": time.perf_counter() - t0}


def child(args) -> None:
    fn = run_loopfm if args.child == "loopfm" else run_duckdb
    res = fn(Path(args.compress), Path(args.child_out), args.max_len, args.window_days)
    res["peak_rss_mb"] = peak_rss_mb()  # the build only
    if args.child == "loopfm":
        res["reader"] = run_reader(Path(args.child_out))
    print("RESULT " + json.dumps(res))


def spawn(which: str, compress: Path, out: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--child", which, "--compress", str(compress), "--child-out", str(out),
           "--max-len", str(args.max_len), "--window-days", str(args.window_days)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{which} failed:\n{proc.stderr[-3000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def same_offsets(ours: Path, duck: Path) -> bool:
    import pyarrow as pa
    import pyarrow.parquet as pq
    a = pa.concat_tables([pq.read_table(p) for p in sorted((ours / "user" / "examples").glob("*.parquet"))])
    a = a.sort_by("example_id")
    b = pq.read_table(duck / "examples.parquet").sort_by("example_id")
    return all(np.array_equal(a.column(c).to_numpy(), b.column(c).to_numpy())
               for c in ("example_id", "ts", "key", "start", "end"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=10_000_000, help="events (default 10M)")
    p.add_argument("--keys", type=int, default=1_000_000, help="distinct user keys in the Zipf law")
    p.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of key popularity")
    p.add_argument("--days", type=int, default=4, help="days the events span")
    p.add_argument("--code-bytes", type=int, default=32, help="bytes per packed code (32 = INT4, d=64)")
    p.add_argument("--max-len", type=int, default=200, help="L")
    p.add_argument("--window-days", type=float, default=30.0, help="retention window")
    p.add_argument("--workdir", help="where to write (default: a temp folder, removed at the end)")
    p.add_argument("--no-duckdb", action="store_true", help="skip the DuckDB side")
    p.add_argument("--child", choices=["loopfm", "duckdb"], help=argparse.SUPPRESS)
    p.add_argument("--compress", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="seqbench-"))
    try:
        t0 = time.perf_counter()
        make_compress(work / "compress", args.rows, args.keys, args.zipf, args.days, args.code_bytes, seed=0)
        print(f"synthetic compress output: {args.rows:,} events, {args.keys:,} Zipf({args.zipf}) keys, "
              f"{args.days} days, {args.code_bytes} B codes, L={args.max_len}, window {args.window_days} d "
              f"({time.perf_counter() - t0:.1f} s to write); {os.cpu_count()} CPUs")
        results = {"loopfm": spawn("loopfm", work / "compress", work / "loopfm", args)}
        try:
            import duckdb  # noqa: F401
            have_duckdb = not args.no_duckdb
        except ImportError:
            have_duckdb = False
            print("duckdb is not installed: skipping the DuckDB side (install: .venv/bin/pip install duckdb)")
        if have_duckdb:
            import duckdb
            results[f"duckdb {duckdb.__version__}"] = spawn("duckdb", work / "compress", work / "duckdb", args)
        print(f"\n| engine | seconds | events/s | peak RSS (MB) |\n|---|---:|---:|---:|")
        for name, r in results.items():
            print(f"| {name} | {r['seconds']:.2f} | {args.rows / r['seconds']:,.0f} | {r['peak_rss_mb']:,.0f} |")
        r = results["loopfm"]["reader"]
        print(f"\nreader (SequenceReader, padded [B, {args.max_len}, {args.code_bytes}] + jagged, "
              f"B={r['batch_size']}): load {r['load_s']:.1f} s, {r['examples_per_s']:,.0f} examples/s")
        if have_duckdb:
            duck = [v for k, v in results.items() if k.startswith("duckdb")][0]
            same = same_offsets(work / "loopfm", work / "duckdb")
            print(f"\nloopfm / duckdb speed ratio: {duck['seconds'] / results['loopfm']['seconds']:.2f}x "
                  f"(>1 = loopfm faster); identical offsets: {same}")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
