"""Filling a timeline store from a run: `load` the built timelines, `append` a new day's codes.

``load`` copies RUN/sequences' timelines of one key kind (all shards), optionally only the
entries of days <= K, into an emptied store. ``append`` is what a daily FM job does after extract
and compress: it reads day K of RUN/compress, keeps the events the build-sequences rule lets into
timelines (``entry_labels``, unknown keys skipped: read from RUN/sequences' manifest), adds them.

Both then evict what no request can read any more: a store holding days <= K serves day K and
later, so entries older than (first event of day K) - window go, the rule build-sequences uses
for its retention. Hence ``load --through-day K`` equals ``load --through-day K-1`` followed by
``append --day K``, entry for entry (tested).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from loopfm.serving.store import TimelineStore
from loopfm.codes import format as cf
from loopfm.data.history import entry_mask
from loopfm.stages.sequences import open_manifest


def _kind(seq_manifest: dict, key: str | None) -> str:
    kind = key or seq_manifest["keys"][0]
    if kind not in seq_manifest["keys"]:
        raise ValueError(f"the sequences output has timelines for {seq_manifest['keys']}, not {kind!r}")
    return kind


def _day_min_ts(run_dir: Path, day: int) -> int:
    t = cf.read_codes(run_dir / "compress", [day], ["ts"])
    if t.num_rows == 0:
        raise ValueError(f"{run_dir}/compress has no rows on day {day}")
    return int(t.column("ts").to_numpy().min())


def load(run_dir: str | Path, store: TimelineStore, *, through_day: int | None = None,
         key: str | None = None) -> dict:
    """Empty ``store`` and fill it with RUN/sequences' timelines (days <= ``through_day``)."""
    run_dir = Path(run_dir)
    m = open_manifest(run_dir / "sequences")
    kind = _kind(m, key)
    days = [d for d in m["days_read"] if through_day is None or d <= through_day]
    if not days:
        raise ValueError(f"no sequence days <= {through_day}; the timelines hold days {m['days_read']}")
    last = max(days)
    cutoff = _day_min_ts(run_dir, last) - int(m["window_s"])
    day_of = _example_days(run_dir)
    store.clear()
    rows = 0
    for shard in m.get("shards", ["."]):
        t = pq.read_table(run_dir / "sequences" / shard / kind / "timeline.parquet",
                          columns=["key", "ts", "example_id", cf.CODE_COLUMN])
        eid, ts = t.column("example_id").to_numpy(), t.column("ts").to_numpy()
        keep = (ts >= cutoff) & (day_of(eid) <= last)
        sel = np.flatnonzero(keep)
        codes = cf.bytes_from_arrow(t.column(cf.CODE_COLUMN))[sel]
        store.append(t.column("key").to_numpy()[sel], ts[sel], eid[sel], codes)
        rows += len(sel)
    facts = _facts(m, kind, days)
    store.set_meta(facts)
    return dict(facts, entries=rows, evicted_before=cutoff)


def append(run_dir: str | Path, store: TimelineStore, day: int, *, key: str | None = None) -> dict:
    """Add day ``day`` of RUN/compress to ``store`` under the build-sequences entry rule; evict."""
    run_dir = Path(run_dir)
    m = open_manifest(run_dir / "sequences")
    kind = _kind(m, key)
    meta = store.meta()
    if meta:
        if meta.get("key_kind") != kind or int(meta.get("code_bytes", -1)) != int(m["code_bytes"]):
            raise ValueError(f"{store.url} holds {meta.get('key_kind')} timelines of {meta.get('code_bytes')}-byte "
                             f"codes; this run's are {kind}, {m['code_bytes']} bytes")
        if day <= int(meta["last_day"]):
            raise ValueError(f"{store.url} already holds days up to {meta['last_day']}: append day "
                             f"{int(meta['last_day']) + 1} or later (or load again)")
    # read_codes refuses a day compress does not have, naming the days it has
    t = cf.read_codes(run_dir / "compress", [day], ["example_id", "ts", "label", f"{kind}_key", cf.CODE_COLUMN])
    keys, label = t.column(f"{kind}_key").to_numpy(), t.column("label").to_numpy()
    ok = entry_mask(label, m["entry_labels"]) & ~np.isin(keys, m["unknown_keys"][kind])
    sel = np.flatnonzero(ok)
    ts = t.column("ts").to_numpy()
    store.append(keys[sel], ts[sel], t.column("example_id").to_numpy()[sel],
                 cf.bytes_from_arrow(t.column(cf.CODE_COLUMN))[sel])
    cutoff = int(ts.min()) - int(m["window_s"])
    store.evict(cutoff)
    days = sorted(set(int(d) for d in meta.get("days", "").split(",") if d) | {day})
    facts = _facts(m, kind, days)
    store.set_meta(facts)
    return dict(facts, entries=len(sel), evicted_before=cutoff)


def _facts(m: dict, kind: str, days: list[int]) -> dict:
    return {"key_kind": kind, "code_bytes": str(m["code_bytes"]), "window_s": str(m["window_s"]),
            "max_len": str(m["max_len"]), "days": ",".join(str(d) for d in sorted(days)),
            "last_day": str(max(days))}


def _example_days(run_dir: Path):
    """example id -> day, from RUN/compress (rows are example ids 0..n-1 of the event log)."""
    t = cf.read_codes(run_dir / "compress", columns=["example_id", "day"])
    eid, day = t.column("example_id").to_numpy(), t.column("day").to_numpy()
    table = np.full(int(eid.max()) + 1 if len(eid) else 1, np.iinfo(np.int32).max, np.int32)
    table[eid] = day
    return lambda ids: table[ids]
