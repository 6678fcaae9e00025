"""`prepare`: any source -> one canonical event log.

Output (written to a temp folder, renamed into place):

    OUT/events/day=K/part-NNNNN.parquet   example_id, ts, day, label, then every feature (ids)
    OUT/schema.json                       features: kind, role, fm_only, vocab, vocab_size, ...
    OUT/vocab/<vocab>.parquet             value -> id (0 = padding, last = OOV)
    OUT/config.yaml                       the resolved data config
    OUT/_SUCCESS                          rows per day, config hash, skipped rows

Three passes keep memory bounded by one chunk (plus, for input out of time order, a few int64
arrays over all rows):
1. read the source chunk by chunk: normalise types, count vocabularies, stage to Parquet;
2. example ids and days: input already in time order (checked in pass 1) numbers its rows in
   input order and takes each chunk's days from its own timestamps (no array over all rows);
   otherwise all rows are ordered by (ts, input order); build vocabularies;
3. encode each staged chunk, ENCODE_ROWS rows at a time, and stream it to its days' part files;
   if the input was not already in time order, each day is then sorted by example id (one day
   in memory at a time).
"""
from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from loopfm.progress import progress_bar

from loopfm.artifacts import RowGroupWriter, atomic_output, write_manifest
from loopfm.data.errors import DataError
from loopfm.data.schema import FeatureSpec, Schema
from loopfm.data.source import DayRule, RawSource, SourceInfo
from loopfm.data.vocab import Vocab, VocabCounter

ROW_GROUP_ROWS = 128 * 1024
ENCODE_ROWS = 32 * 1024  # staged rows encoded at a time (bounds the encoder's temporaries)
EVENT_COLUMNS = ("example_id", "ts", "day", "label")


def prepare(source: RawSource, out: str | Path, *, min_count: int = 1, config_hash: str,
            config_yaml: str | None = None, progress: bool = True, allow_any_time: bool = False) -> dict:
    """Run the three passes and return the manifest written to ``OUT/_SUCCESS``.

    Timestamps outside [1990-01-01, now + 1 day] are refused (a unit or zone mistake would
    otherwise become thousands of calendar days) unless ``allow_any_time``."""
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    info = source.info()
    _check_info(info)
    time_range = None if allow_any_time else plausible_time_range()
    if time_range is not None and hasattr(source, "time_range"):
        # A source that can name the file row refuses such rows itself: no second check here.
        source.time_range, time_range = time_range, None
    with atomic_output(out) as tmp:
        staged, counters, in_order = _stage(source, info, tmp / "_staging", progress, time_range)
        numbering = _Numbering(staged, info.days, in_order)
        vocabs = {name: c.build(min_count) for name, c in counters.items()}
        (tmp / "vocab").mkdir()
        for name, vocab in vocabs.items():
            vocab.save(tmp / "vocab" / f"{name}.parquet")
        features = [dataclasses.replace(f, vocab_size=vocabs[f.vocab_name].size) if f.vocab_name else f
                    for f in info.features]
        schema = Schema(dataset=info.dataset, user_key=info.user_key, item_key=info.item_key,
                        num_days=numbering.num_days, features=features)
        rows_per_day, positives = _write_events(staged, numbering, schema, vocabs, tmp, progress)
        one_class = _warn_one_class_days(rows_per_day, positives)
        shutil.rmtree(tmp / "_staging")
        schema.save(tmp / "schema.json")
        if config_yaml is not None:
            (tmp / "config.yaml").write_text(config_yaml)
        return write_manifest(
            tmp, stage="prepare", config_hash=config_hash, dataset=info.dataset,
            rows=numbering.rows, rows_per_day={str(k): v for k, v in rows_per_day.items()},
            skipped_rows=dict(getattr(source, "skipped", {}) or {}), min_count=min_count,
            positives_per_day={str(k): v for k, v in positives.items()}, one_class_days=one_class,
        )


def _check_info(info: SourceInfo) -> None:
    # Schema's own checks (unique names, keys present) run on construction.
    Schema(dataset=info.dataset, user_key=info.user_key, item_key=info.item_key, num_days=0,
           features=list(info.features))
    names = {f.name for f in info.features}
    for f in info.features:
        if f.vocab is not None and f.vocab not in names:
            raise ValueError(f"feature {f.name!r} shares vocabulary {f.vocab!r}, which is no feature")


def plausible_time_range() -> tuple[int, int]:
    """[1990-01-01, now + 1 day] in unix seconds: what a logged impression's timestamp can be."""
    return int(datetime(1990, 1, 1, tzinfo=timezone.utc).timestamp()), int(time.time()) + 86_400


def _check_time_range(ts: np.ndarray, time_range: tuple[int, int] | None, source: RawSource,
                      info: SourceInfo, offset: int) -> None:
    if time_range is None or not len(ts):
        return
    bad = (ts < time_range[0]) | (ts > time_range[1])
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        when = datetime.fromtimestamp(int(ts[i]), tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S") \
            if -62_135_596_800 <= ts[i] <= 253_402_300_799 else "out of the calendar"
        column = getattr(getattr(getattr(source, "schema", None), "timestamp", None), "column", "ts")
        raise DataError(f"data row {offset + i + 1} (in input order) has timestamp {int(ts[i])} ({when} UTC), "
                        "outside [1990-01-01, now + 1 day]: a wrong unit or zone? Set data.allow_any_time=true "
                        "to accept it", file=getattr(source, "path", None), column=column)


def _warn_one_class_days(rows: dict[int, int], positives: dict[int, int]) -> list[int]:
    """Days whose labels are all 0 or all 1: AUC is undefined there (a warning, not an error)."""
    days = [d for d, n in rows.items() if positives.get(d, 0) in (0, n)]
    for d in days:
        print(f"warning: day {d} has one class only ({rows[d]} rows, all labels "
              f"{1 if positives.get(d, 0) else 0}): AUC and NE are undefined on it", file=sys.stderr)
    return days


def _stage(source: RawSource, info: SourceInfo, staging: Path, progress: bool,
           time_range: tuple[int, int] | None = None):
    """Pass 1. Returns the staged chunks ``(path, first row, rows)``, the vocabulary counters and
    whether the input is in time order (ts non-decreasing over all rows)."""
    staging.mkdir()
    counters: dict[str, VocabCounter] = {}
    staged: list[tuple[Path, int, int]] = []
    offset, in_order, last_ts = 0, True, None
    bar = progress_bar(desc=f"prepare {info.dataset}: read", unit=" rows", unit_scale=True, enabled=progress)
    for i, chunk in enumerate(source.chunks()):
        if not counters:  # the first chunk fixes each vocabulary's key type
            counters = {name: VocabCounter(t) for name, t in _key_types(chunk, info).items()}
        path = staging / f"chunk-{i:05d}.parquet"
        writer = None
        for start in range(0, max(chunk.num_rows, 1), ENCODE_ROWS):  # normalised a piece at a time
            piece = _normalise(chunk.slice(start, ENCODE_ROWS), info, offset + start,
                               {n: c.key_type for n, c in counters.items()})
            ts = piece.column("ts").to_numpy()
            _check_time_range(ts, time_range, source, info, offset + start)
            if len(ts):
                in_order = in_order and (last_ts is None or ts[0] >= last_ts) and bool(np.all(ts[1:] >= ts[:-1]))
                last_ts = ts[-1]
            for f in info.features:
                if f.kind == "categorical":
                    counters[f.vocab_name].update(piece.column(f.name))
                elif f.kind == "sequence":
                    counters[f.vocab_name].update(pc.list_flatten(piece.column(f.name)))
            if writer is None:
                writer = pq.ParquetWriter(path, piece.schema, compression="none")  # scratch: read once, deleted
            writer.write_table(piece, row_group_size=max(piece.num_rows, 1))
            del piece, ts
        writer.close()
        staged.append((path, offset, chunk.num_rows))
        offset += chunk.num_rows
        bar.update(chunk.num_rows)
        del chunk
    bar.close()
    if offset == 0:
        raise DataError(f"the {info.dataset} input has no data rows")
    return staged, counters, in_order


class _Numbering:
    """Example ids and days of the staged rows (pass 2).

    Input in time order: example id = input position, and a chunk's days follow from its own
    timestamps and the first local date (a min over the chunks), so nothing is held per row.
    Otherwise the rows are ordered by (ts, input order) over all of them (int64 arrays over all rows).
    The two give the same ids and days on time-ordered input.
    """

    def __init__(self, staged: list[tuple[Path, int, int]], rule: DayRule, in_order: bool) -> None:
        self.rule, self.in_order = rule, in_order
        self.rows = sum(n for _, _, n in staged)
        if rule.kind == "equal_count" and self.rows < rule.num_days:
            raise DataError(f"{self.rows} rows cannot be cut into {rule.num_days} equal-count days")
        if in_order:
            self.example_id = self.day = None
            if rule.kind == "equal_count":
                self.num_days = int(rule.num_days)
            else:
                # The local date can step back at a DST change, so min/max over every chunk's
                # ts column (read one at a time) rather than the first and last row.
                lo, hi = None, None
                for path, _, n in staged:
                    if n:
                        dates = _local_dates(_staged_ts(path), rule.tz)
                        lo = int(dates.min()) if lo is None else min(lo, int(dates.min()))
                        hi = int(dates.max()) if hi is None else max(hi, int(dates.max()))
                self.first_date, self.num_days = lo, hi - lo + 1
            return
        ts = np.concatenate([_staged_ts(path) for path, _, _ in staged])
        order = np.argsort(ts, kind="stable")  # (ts, input order)
        self.example_id = np.empty(len(ts), dtype=np.int64)
        self.example_id[order] = np.arange(len(ts), dtype=np.int64)
        self.day = _assign_days(ts, order, rule)
        self.num_days = int(self.day.max())

    def __call__(self, offset: int, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Example ids and days of the staged rows ``offset .. offset + len(ts)``."""
        n = len(ts)
        if not self.in_order:
            return self.example_id[offset:offset + n], self.day[offset:offset + n]
        ids = np.arange(offset, offset + n, dtype=np.int64)
        if self.rule.kind == "equal_count":
            return ids, (ids * self.rule.num_days // self.rows + 1).astype(np.int32)
        return ids, (_local_dates(ts, self.rule.tz) - self.first_date + 1).astype(np.int32)


def _staged_ts(path: Path) -> np.ndarray:
    return pq.read_table(path, columns=["ts"]).column("ts").to_numpy()


def _key_types(chunk: pa.Table, info: SourceInfo) -> dict[str, pa.DataType]:
    """int64 for a vocabulary whose columns are all integers, else string."""
    integer: dict[str, bool] = {}
    for f in info.features:
        if f.vocab_name is None or f.name not in chunk.column_names:
            continue
        t = chunk.schema.field(f.name).type
        if f.kind == "sequence" and (pa.types.is_list(t) or pa.types.is_large_list(t)):
            t = t.value_type
        is_int = pa.types.is_integer(t) or pa.types.is_null(t)
        integer[f.vocab_name] = integer.get(f.vocab_name, True) and is_int
    return {name: pa.int64() if is_int else pa.string() for name, is_int in integer.items()}


def _normalise(chunk: pa.Table, info: SourceInfo, offset: int,
               key_types: dict[str, pa.DataType]) -> pa.Table:
    """Check a source chunk's columns and cast them to the staging types."""
    needed = ["ts", "label"] + [f.name for f in info.features]
    missing = [c for c in needed if c not in chunk.column_names]
    if missing:
        raise ValueError(f"source {info.dataset!r} produced a chunk without columns {missing}")
    cols: dict[str, pa.ChunkedArray | pa.Array] = {}
    for name in ("ts", "label"):
        col = chunk.column(name)
        if col.null_count:
            event = offset + _first_true(col.is_null()) + 1
            raise DataError(f"event #{event} of the {info.dataset} source has no {name}", column=name)
        cols[name] = col.cast(pa.int64())
    bad = pc.invert(pc.is_in(cols["label"], value_set=pa.array([0, 1], pa.int64())))
    if pc.any(bad).as_py():
        i = _first_true(bad)
        raise DataError(f"event #{offset + i + 1} of the {info.dataset} source: expected a label 0 or 1, "
                        f"got {cols['label'][i].as_py()}", column="label")
    cols["label"] = cols["label"].cast(pa.int8())
    for f in info.features:
        col = chunk.column(f.name)
        if f.kind == "categorical":
            cols[f.name] = col.cast(key_types[f.vocab_name])
        elif f.kind == "numeric":
            if col.null_count:
                event = offset + _first_true(col.is_null()) + 1
                raise DataError(f"event #{event} of the {info.dataset} source: expected a number, "
                                "got an empty value", column=f.name)
            cols[f.name] = col.cast(pa.float32())
        else:
            col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
            col = pc.fill_null(col, pa.scalar([], type=col.type))
            cols[f.name] = col.cast(pa.list_(key_types[f.vocab_name]))
    return pa.table(cols)


def _first_true(mask: pa.Array | pa.ChunkedArray) -> int:
    return int(np.flatnonzero(np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool))[0])


def _assign_days(ts: np.ndarray, order: np.ndarray, rule: DayRule) -> np.ndarray:
    n = len(ts)
    if rule.kind == "equal_count":
        if n < rule.num_days:
            raise DataError(f"{n} rows cannot be cut into {rule.num_days} equal-count days")
        day = np.empty(n, dtype=np.int32)
        day[order] = (np.arange(n, dtype=np.int64) * rule.num_days // n + 1).astype(np.int32)
        return day
    local_date = _local_dates(ts, rule.tz)
    return (local_date - local_date.min() + 1).astype(np.int32)


def _local_dates(ts: np.ndarray, tz_name: str) -> np.ndarray:
    """Days since 1970-01-01 of each timestamp's local calendar date in ``tz_name``."""
    tz = ZoneInfo(tz_name)
    # Offsets can change only on hour boundaries (DST): look each distinct hour up once.
    hours, inverse = np.unique(ts // 3600, return_inverse=True)
    offsets = np.array([datetime.fromtimestamp(int(h) * 3600, tz=timezone.utc).astimezone(tz)
                        .utcoffset().total_seconds() for h in hours], dtype=np.int64)
    return (ts + offsets[inverse]) // 86400


def _encode_sequence(col: pa.ListArray, vocab: Vocab, max_len: int) -> pa.ListArray:
    """Encode a list column and keep the newest ``max_len`` entries (newest last)."""
    offsets = col.offsets.to_numpy()
    ids = vocab.encode(col.flatten()) if len(col.flatten()) else np.zeros(0, np.int64)
    offsets = offsets - offsets[0]
    lengths = np.diff(offsets)
    keep = np.minimum(lengths, max_len)
    new_offsets = np.zeros(len(keep) + 1, dtype=np.int32)
    np.cumsum(keep, out=new_offsets[1:])
    start = offsets[1:] - keep
    gather = np.arange(new_offsets[-1]) - np.repeat(new_offsets[:-1], keep) + np.repeat(start, keep)
    return pa.ListArray.from_arrays(pa.array(new_offsets), pa.array(ids[gather]))


def _encode_chunk(table: pa.Table, ids: np.ndarray, day: np.ndarray, schema: Schema,
                  vocabs: dict[str, Vocab]) -> pa.Table:
    cols: dict[str, Any] = {"example_id": pa.array(ids), "ts": table.column("ts"),
                            "day": pa.array(day), "label": table.column("label")}
    for f in schema.features:
        col = table.column(f.name)
        if f.kind == "categorical":
            cols[f.name] = pa.array(vocabs[f.vocab_name].encode(col))
        elif f.kind == "numeric":
            cols[f.name] = col
        else:
            cols[f.name] = _encode_sequence(col.combine_chunks(), vocabs[f.vocab_name], f.max_len)
    return pa.table(cols)


def _write_events(staged, numbering: _Numbering, schema, vocabs, tmp: Path,
                  progress: bool) -> tuple[dict[int, int], dict[int, int]]:
    events = tmp / "events"
    target = events if numbering.in_order else tmp / "_unsorted"
    rows_per_day: dict[int, int] = {}
    positives: dict[int, int] = {}
    part_no: dict[int, int] = {}
    for path, off, _ in progress_bar(staged, desc="prepare: encode", unit=" chunk", enabled=progress):
        writers: dict[int, RowGroupWriter] = {}  # this chunk's part file per day it touches
        for batch in pq.ParquetFile(path).iter_batches(batch_size=ENCODE_ROWS):
            table = pa.Table.from_batches([batch])
            ids, chunk_days = numbering(off, table.column("ts").to_numpy())
            off += table.num_rows
            table = _encode_chunk(table, ids, chunk_days, schema, vocabs)
            for d in np.unique(chunk_days):
                d = int(d)
                sub = table.filter(pa.array(chunk_days == d))
                if d not in writers:
                    writers[d] = RowGroupWriter(target / f"day={d}" / f"part-{part_no.get(d, 0):05d}.parquet",
                                                ROW_GROUP_ROWS)
                    part_no[d] = part_no.get(d, 0) + 1
                writers[d].write(sub)
                rows_per_day[d] = rows_per_day.get(d, 0) + sub.num_rows
                positives[d] = positives.get(d, 0) + int(pc.sum(sub.column("label")).as_py() or 0)
            del table, batch
        for w in writers.values():
            w.close()
    if not numbering.in_order:
        for d in progress_bar(sorted(rows_per_day), desc="prepare: sort days", enabled=progress):
            folder = target / f"day={d}"
            table = pa.concat_tables([pq.read_table(p) for p in sorted(folder.glob("*.parquet"))])
            (events / f"day={d}").mkdir(parents=True)
            pq.write_table(table.sort_by("example_id"), events / f"day={d}" / "part-00000.parquet",
                           row_group_size=ROW_GROUP_ROWS)
        shutil.rmtree(target)
    return dict(sorted(rows_per_day.items())), positives
