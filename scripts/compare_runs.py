"""Compare two run folders: every number of results.json and the stage outputs' data.

    python scripts/compare_runs.py RUN_A RUN_B [--tol 1e-4]

For a refactor that should not change behaviour: run the same config on the code before and after
(``loopfm run CONFIG --out RUN``) and compare. Prints, per stage output (fm eval metrics, extract
codes, compress codes, sequences, vm predictions), whether its Parquet tables hold equal data,
then the largest absolute difference over the numbers results.json has in common, and the keys
only one side has (a newer report may add fields). Timings and paths are ignored. Exit 0 when
every shared number is within --tol, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

STAGE_DATA = ("extract", "compress", "sequences", "vm")
IGNORED = ("timings_s", "seconds", "created_unix", "path")


def _numbers(tree, prefix: str = "") -> dict[str, float]:
    """Flatten a JSON tree to {dotted.key: number} (lists indexed), skipping timings and paths."""
    out: dict[str, float] = {}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        name = f"{prefix}.{key}" if prefix else str(key)
        if any(part in IGNORED for part in name.split(".")):
            continue
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, (int, float)):
            out[name] = float(value)
        else:
            out.update(_numbers(value, name))
    return out


def _tables(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*.parquet"))}


def compare_stage(a: Path, b: Path) -> str:
    import pyarrow.parquet as pq

    ta, tb = _tables(a), _tables(b)
    if not ta and not tb:
        return "no Parquet output"
    if ta.keys() != tb.keys():
        return f"different files ({len(ta)} vs {len(tb)})"
    differing = [name for name in ta if not pq.read_table(ta[name]).equals(pq.read_table(tb[name]))]
    if differing:
        return f"{len(differing)} of {len(ta)} tables differ (first: {differing[0]})"
    return f"equal ({len(ta)} tables)"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_a")
    p.add_argument("run_b")
    p.add_argument("--tol", type=float, default=1e-4, help="largest allowed |difference| of a shared number")
    args = p.parse_args()
    a, b = Path(args.run_a), Path(args.run_b)
    for run in (a, b):
        if not (run / "results.json").is_file():
            raise SystemExit(f"compare_runs: {run / 'results.json'} not found (is {run} a finished run?)")
    for stage in STAGE_DATA:
        if (a / stage).is_dir() or (b / stage).is_dir():
            print(f"{stage:10s} {compare_stage(a / stage, b / stage)}")
    na = _numbers(json.loads((a / "results.json").read_text()))
    nb = _numbers(json.loads((b / "results.json").read_text()))
    shared = sorted(na.keys() & nb.keys())
    diffs = {k: abs(na[k] - nb[k]) for k in shared if not (math.isnan(na[k]) and math.isnan(nb[k]))}
    worst = max(diffs, key=diffs.get) if diffs else None
    print(f"results.json: {len(shared)} shared numbers, {sum(d == 0 for d in diffs.values())} identical; "
          f"largest |difference| {diffs[worst] if worst else 0:.3g}"
          + (f" ({worst})" if worst and diffs[worst] > 0 else ""))
    for key in sorted((k for k in diffs if diffs[k] > 0), key=diffs.get, reverse=True)[:10]:  # largest first
        print(f"  {key}: {na[key]!r} vs {nb[key]!r}")
    only_a, only_b = sorted(na.keys() - nb.keys()), sorted(nb.keys() - na.keys())
    if only_a or only_b:
        print(f"keys only in {a.name}: {len(only_a)} {only_a[:5]}; only in {b.name}: {len(only_b)} {only_b[:5]}")
    return 0 if all(d <= args.tol for d in diffs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
