"""`build-sequences`: per-key timelines of packed codes and, per example, the offsets of its history.

Semantics (one rule, checked against a brute-force reference in the tests). For an example e with
key k (its user id, or item id) and time t_e, its sequence is the timeline entries i of key k with

    t_i < t_e                      (strictly earlier: e itself and same-second events are excluded)
    t_i >= t_e - window            (retention window, default 30 days)
    label_i passes entry_labels    (optional: only positive events enter timelines, KuaiVideo style)
    k is a known key               (skip_unknown_keys: id 0 = missing and the OOV id, when the
                                    compress manifest carries key_vocab_size, get no timeline)

ordered by (t_i, example_id_i), oldest -> newest, truncated to the newest ``max_len``.

Storage: the codes are stored once. Per key kind (``user``, ``item``) and per shard::

    OUT/<kind>/timeline.parquet          key, ts, example_id, label, code   sorted by (key, ts, example_id)
    OUT/<kind>/examples/day=K.parquet    example_id, ts, key, start, end    (sorted by example_id)

so example e's sequence is rows ``start:end`` of the timeline (``end - start <= max_len``; an empty
sequence is stored as 0:0). Because a key's entries are contiguous and sorted, a sequence is one
contiguous slice: no per-example copies of codes.

Retention: the timelines keep the entries with ``ts >= (earliest kept example) - window`` (older
ones can never enter a kept example's sequence). ``keep_days = N`` keeps only the newest N example
days (a serving-style rolling store); 0 keeps every day read.

Append (``append_dir``): add new days to an existing output without recomputing the old
examples: the new entries are merged into the sorted timelines, entries that fell out of the
retention window are dropped, the old examples' offsets are remapped (a vectorised position map;
their sequences cannot change, since new entries are later in time and dropped ones are older
than their windows) and only the new days' examples are searched. The result is identical, file
content for file content, to a full build over the same days (tested).

Reading (the VM side; `loopfm.codes.reader`)::

    reader = SequenceReader(RUN / "sequences", key="user", days=[5, 6, 7])
    batch = reader.gather(example_ids)          # or: for batch in reader.iter_batches(4096)
    t = batch.to_torch()                        # codes [B, L, bytes] uint8, lengths [B] int32, ...
    kernels.int4_attend(t["codes"], t["lengths"], queries, codebook=...)   # shared k-means table:
                                                # torch.from_numpy(reader.quant_spec().codebook)

Sharding: rank R of N builds the keys with ``splitmix64(key) % N == R`` (the user hash for user
timelines, the item hash for item timelines) and writes ``OUT/shards/rank-R/``; the top
``_SUCCESS`` appears when all N shards exist (rule in `loopfm.stages.codes_format`). Every
example lives in exactly one shard per kind; the reader merges the shards.

Algorithm: the shared point-in-time search of `loopfm.data.history` (`Timeline`): a stable
argsort by key of the rows (already in example-id = time order) gives timeline order, and two
``np.searchsorted`` calls on a composite int64 code give each example's offsets.

Memory (bounded, whatever the rows): pass 1 reads the days one row group at a time for each day's
earliest time and a bounded sample of (key, example id), which cuts the timeline into ranges of
about ``batch_rows`` rows. Pass 2 builds one range at a time, in timeline order (it reads the part
files again, keeping that range's rows), and appends it to the timeline file, offsets shifted by
the rows written before. A cut may fall inside a heavy key: the next range then starts from that
key's newest entries (its latest second's ties plus ``max_len`` before them: all any later example
of the key can reach), which are not written twice. Each range's examples are spilled per day in
example-id order; a k-way merge writes each day's file. Row groups are cut at fixed row counts, so
the files are the same bytes for any ``batch_rows`` (tested). Append goes range by range too: the
existing timeline's rows of the range (its sorted row groups), the kept examples of the range's
keys (each old day file is scanned once per range), and for a key cut in two the constant by
which its kept old entries moved.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from loopfm.progress import progress_bar

from loopfm.artifacts import MANIFEST, RowGroupWriter, inside, read_manifest, write_manifest
from loopfm.data.history import COMPOSITE_LIMIT, ENTRY_LABELS, Timeline, entry_mask
from loopfm.stages import codes_format as cf

KeyKind = Literal["user", "item"]
KEY_KINDS = ("user", "item")
DAY_SECONDS = 86_400
_COMPOSITE_LIMIT = COMPOSITE_LIMIT  # keys * time span must stay below this (tests lower it)
TIMELINE_SCHEMA_BASE = [("key", pa.int64()), ("ts", pa.int64()), ("example_id", pa.int64()), ("label", pa.int8())]
EXAMPLES_SCHEMA = pa.schema([("example_id", pa.int64()), ("ts", pa.int64()), ("key", pa.int64()),
                             ("start", pa.int64()), ("end", pa.int64())])


@dataclass(kw_only=True)
class SequencesConfig:
    """Which keys get timelines, the sequence length and window, and which events enter them."""
    keys: list[KeyKind] = field(default_factory=lambda: ["user"], metadata={
        "help": "key kinds to build timelines for: user, item, or both"})
    max_len: int = field(default=200, metadata={"help": "L: the newest L qualifying entries are kept"})
    window_days: float = field(default=30.0, metadata={
        "help": "retention window: entries with t_i >= t_example - window_days * 86400 (seconds)"})
    entry_labels: Literal["all", "positive", "negative"] = field(default="all", metadata={
        "help": "which events enter timelines: all, positive (label 1, 'watched only'), negative"})
    days: list[int] = field(default_factory=list, metadata={
        "help": "compress days to read (entries and examples); empty = all; with --append: the new days"})
    keep_days: int = field(default=0, metadata={
        "help": "keep only the newest N example days (rolling store); 0 = every day read"})
    skip_unknown_keys: bool = field(default=True, metadata={
        "help": "key id 0 (missing) and the OOV id get no timeline (their examples get empty sequences), "
                "instead of pooling all unknown users into one"})
    batch_rows: int = field(default=500_000, metadata={
        "help": "rows held at once: the keys are cut into ranges of about this many rows, built one after "
                "another (memory only: the output is the same for any value)"})

    def __post_init__(self) -> None:
        bad = [k for k in self.keys if k not in KEY_KINDS]
        if not self.keys or bad or len(set(self.keys)) != len(self.keys):
            raise ValueError(f"sequences.keys must be a non-empty list of distinct {KEY_KINDS}, got {self.keys}")
        if self.max_len < 1:
            raise ValueError(f"sequences.max_len must be >= 1, got {self.max_len}")
        if not self.window_s >= 1:
            raise ValueError(f"sequences.window_days must be at least one second (> 0), got {self.window_days}")
        if self.entry_labels not in ENTRY_LABELS:
            raise ValueError(f"sequences.entry_labels must be one of {ENTRY_LABELS}, got {self.entry_labels!r}")
        if self.keep_days < 0:
            raise ValueError(f"sequences.keep_days must be >= 0, got {self.keep_days}")
        if self.batch_rows < 1:
            raise ValueError(f"sequences.batch_rows must be >= 1, got {self.batch_rows}")

    @property
    def window_s(self) -> int:
        return int(round(self.window_days * DAY_SECONDS))


# -- the core: offsets, via the shared point-in-time search (loopfm.data.history) -------------
def build_offsets(key: np.ndarray, ts: np.ndarray, is_entry: np.ndarray, window: int, max_len: int):
    """Timeline order and per-row sequence offsets for rows in example-id (time) order.

    Returns ``(timeline_rows, start, end)``: ``timeline_rows`` indexes the rows that are entries, in
    (key, ts, example_id) order; ``start``/``end`` [n] give each row's sequence as rows
    ``timeline_rows[start:end]`` (as if every row were an example).
    """
    key, ts = np.asarray(key, np.int64), np.asarray(ts, np.int64)
    if len(key) and np.any(ts[1:] < ts[:-1]):
        raise ValueError("rows must be in example-id order with non-decreasing timestamps")
    order = np.argsort(key, kind="stable")  # rows are in (ts, example_id) order -> (key, ts, id)
    rows = order[np.asarray(is_entry, bool)[order]]
    start, end = Timeline(key[rows], ts[rows], limit=_COMPOSITE_LIMIT).bounds(
        key, ts, max_len=max_len, window=window)
    return rows, start, end


def query_offsets(tl_key: np.ndarray, tl_ts: np.ndarray, q_key: np.ndarray, q_ts: np.ndarray,
                  window: int, max_len: int):
    """Offsets into an existing timeline (sorted by key, ts) for arbitrary queries (append path)."""
    return Timeline(tl_key, tl_ts, limit=_COMPOSITE_LIMIT).bounds(q_key, q_ts, max_len=max_len, window=window)


# -- the stage -----------------------------------------------------------------------------------
def run_build_sequences(cfg: SequencesConfig, compress_dir: str | Path, out_dir: str | Path, *,
                        append_dir: str | Path | None = None, rank: int = 0, world_size: int = 1,
                        progress: bool = True, config_hash: str | None = None) -> dict:
    """Build (or, with ``append_dir``, extend) the sequences output; returns the manifest.

    ``append_dir`` is the existing output (usually ``out_dir`` itself: it is read before being
    replaced). Returns the top manifest when this call completed the output, else this rank's
    shard manifest.
    """
    cf.check_rank(rank, world_size)
    compress_dir, out_dir = Path(compress_dir), Path(out_dir)
    src = read_manifest(compress_dir)
    if src.get("stage") != "compress":
        raise ValueError(f"{compress_dir} is a {src.get('stage')!r} output, expected a compress output")
    old = _old_shard(append_dir, rank, world_size, cfg) if append_dir is not None else None
    old_m = old["manifest"] if old else None
    days = _days_to_read(cfg, src, old_m, append_dir)
    config_hash = config_hash or cf.hash_config(hash_payload(cfg), src.get("config_hash", ""),
                                                old_m["config_hash"] if old else "")
    files = cf.day_files(compress_dir, src, days)
    code_type = pq.read_schema(files[0]).field(cf.CODE_COLUMN).type
    days_read = sorted(set(days) | set(old_m["days_read"] if old else []))
    example_days = days_read[-cfg.keep_days:] if cfg.keep_days else days_read
    facts = dict(keys=list(cfg.keys), max_len=cfg.max_len, window_s=cfg.window_s, entry_labels=cfg.entry_labels,
                 keep_days=cfg.keep_days, skip_unknown_keys=cfg.skip_unknown_keys,
                 unknown_keys={k: _unknown_keys(cfg, src, k) for k in cfg.keys},
                 days_read=days_read, days=example_days, rank=rank, world_size=world_size,
                 code_bytes=int(code_type.byte_width),
                 quantizer={k: src.get(k) for k in ("quantizer", "dim", "code_bytes", "codebook")},
                 compress=str(compress_dir), timeline_rows={}, rows_per_day={}, length_sum={}, empty={})
    if old is not None:
        _check_append(old_m, facts, days)
    day_min, samples = _scan(files, cfg.keys, rank, world_size)
    # Retention: nothing older than (earliest kept example - window) can enter a kept sequence.
    facts["day_min_ts"] = _day_min_ts(day_min, example_days, old_m)
    cutoff = min(facts["day_min_ts"].values()) - cfg.window_s if facts["day_min_ts"] else None
    with cf.shard_output(out_dir, rank, world_size) as tmp:
        for kind in progress_bar(cfg.keys, desc=f"build-sequences[{rank}]", enabled=progress):
            old_kind = old["dir"] / kind if old is not None else None
            if old_kind is not None:  # the merged timeline's keys count towards the ranges too
                for rg in _row_groups(old_kind / "timeline.parquet", ["key", "example_id"]):
                    samples[kind].add(rg.column("key").to_numpy(), rg.column("example_id").to_numpy())
            parts = _kind_parts(cfg, files, kind, samples[kind], rank, world_size, old_kind, example_days, cutoff,
                                _unknown_keys(cfg, src, kind))
            stats = _write_kind(tmp / kind, parts, code_type, example_days)
            for name, value in stats.items():
                facts[name][kind] = value
        manifest = write_manifest(tmp, stage="build-sequences", config_hash=config_hash, **facts)
    top = cf.finalize_shards(out_dir, world_size, merge=_merge) if world_size > 1 else manifest
    if progress:
        print_summary(top or manifest)
    return top or manifest


def hash_payload(cfg: SequencesConfig) -> dict:
    """What identifies the output: the config without ``batch_rows`` (memory only, same files)."""
    data = dataclasses.asdict(cfg)
    data.pop("batch_rows")
    return data


def _days_to_read(cfg: SequencesConfig, src: dict, old_m: dict | None, append_dir) -> list[int]:
    days = list(cfg.days) or cf.stage_days(src)
    if old_m is not None and not cfg.days:
        days = [d for d in days if d not in old_m["days_read"]]
    if not days:
        raise ValueError(f"no days to {'append' if old_m else 'build'}: compress days are {cf.stage_days(src)}"
                         + (f", already in {append_dir}: {old_m['days_read']}" if old_m else ""))
    return days


def print_summary(m: dict) -> None:
    scope = "" if "shards" in m or m["world_size"] == 1 else f" (rank {m['rank']} of {m['world_size']})"
    for kind in m["keys"]:
        n = sum(m["rows_per_day"][kind].values())
        print(f"build-sequences{scope}: {kind} timelines {m['timeline_rows'][kind]:,} entries; "
              f"{n:,} examples on days {m['days']}, mean length {m['length_sum'][kind] / max(n, 1):.1f} "
              f"(L={m['max_len']}), {m['empty'][kind] / max(n, 1):.1%} empty")


def _unknown_keys(cfg: SequencesConfig, src: dict, kind: str) -> list[int]:
    """Key ids that stand for no one: padding/missing 0 and, when known, the OOV id (vocab_size - 1)."""
    if not cfg.skip_unknown_keys:
        return []
    size = (src.get("key_vocab_size") or {}).get(f"{kind}_key")
    return [0] + ([int(size) - 1] if size else [])


def _day_min_ts(day_min: dict[int, int], example_days: list[int], old_manifest: dict | None) -> dict[str, int]:
    """Earliest event time of each kept example day, over all ranks' rows (old days: old manifest)."""
    out = {}
    for d in example_days:
        if old_manifest is not None and str(d) in old_manifest["day_min_ts"]:
            out[str(d)] = int(old_manifest["day_min_ts"][str(d)])
        elif d in day_min:
            out[str(d)] = day_min[d]
    return out


# -- reading in bounded memory: one row group at a time, one key range at a time -----------------
class KeySample:
    """Every s-th (key, example id) of a stream, s doubling whenever the sample passes ``cap``
    rows: bounded memory, and the same sample (so the same ranges) for the same stream."""

    def __init__(self, cap: int = 1 << 20) -> None:
        self.cap, self.stride, self.seen, self.size = cap, 1, 0, 0
        self.parts: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, keys: np.ndarray, example_ids: np.ndarray) -> None:
        first = (-self.seen) % self.stride  # keep stream positions divisible by the stride
        picked = (np.array(keys[first::self.stride], np.int64), np.array(example_ids[first::self.stride], np.int64))
        self.seen += len(keys)
        self.parts.append(picked)
        self.size += len(picked[0])
        while self.size > self.cap:  # positions divisible by 2s: every other kept row
            k, e = self._sample()
            self.parts, self.size, self.stride = [(k[::2], e[::2])], len(k[::2]), self.stride * 2

    def _sample(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.parts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate([p[0] for p in self.parts]), np.concatenate([p[1] for p in self.parts])

    def cuts(self, batch_rows: int) -> list[tuple[int, int]]:
        """Ascending (key, example id) cut points, in timeline order, splitting the stream into
        ranges of about ``batch_rows`` rows."""
        k = -(-self.seen // batch_rows)
        if k <= 1:
            return []
        key, eid = self._sample()
        order = np.lexsort((eid, key))
        at = order[np.arange(1, k) * len(order) // k]
        return sorted(set(zip(key[at].tolist(), eid[at].tolist())))


def _row_groups(path: Path, columns: list[str], key_col: str | None = None, lo=None, hi=None):
    """The file's row groups as tables; with ``key_col``, skipping those whose key statistics lie
    outside the range from cut ``lo`` to cut ``hi`` (the sorted timeline: a range reads its own)."""
    pf = pq.ParquetFile(path)
    leaves = [pf.metadata.schema.column(j).path for j in range(pf.metadata.num_columns)]
    idx = leaves.index(key_col) if key_col in leaves else -1  # statistics are per leaf column
    for i in range(pf.num_row_groups):
        stats = pf.metadata.row_group(i).column(idx).statistics if idx >= 0 else None
        if stats is not None and stats.has_min_max and (
                (lo is not None and stats.max < lo[0]) or (hi is not None and stats.min > hi[0])):
            continue
        yield pf.read_row_group(i, columns=columns)


def _in_range(key: np.ndarray, eid: np.ndarray, lo, hi, rank: int, world_size: int) -> np.ndarray:
    """Rows with cut ``lo`` <= (key, example id) < cut ``hi`` (None: open) and, sharded, of this rank."""
    mask = np.ones(len(key), bool) if lo is None else (key > lo[0]) | ((key == lo[0]) & (eid >= lo[1]))
    if hi is not None:
        mask &= (key < hi[0]) | ((key == hi[0]) & (eid < hi[1]))
    if world_size > 1:
        mask &= cf.shard_of(key, world_size) == rank
    return mask


def _rows_in_range(paths: Sequence[Path], columns: list[str], key_col: str, lo, hi, rank: int = 0,
                   world_size: int = 1) -> pa.Table:
    """The rows of ``paths`` (in file order) from cut ``lo`` to cut ``hi`` and, sharded, of this rank."""
    pieces = []
    for path in paths:
        for t in _row_groups(path, columns, key_col, lo, hi):
            mask = _in_range(t.column(key_col).to_numpy(), t.column("example_id").to_numpy(), lo, hi, rank,
                             world_size)
            pieces.append(t if mask.all() else t.filter(pa.array(mask)))
    if not pieces:
        return pq.read_schema(paths[0]).empty_table().select(columns)
    return pa.concat_tables(pieces)


def _scan(files: list[Path], kinds: Sequence[str], rank: int, world_size: int):
    """Pass 1, one row group at a time: each day's earliest ts (all rows) and, per key kind, a
    sample of this rank's (key, example id) that cuts the timeline into ranges."""
    day_min: dict[int, int] = {}
    samples = {k: KeySample() for k in kinds}
    for path in files:
        for t in _row_groups(path, ["example_id", "day", "ts"] + [f"{k}_key" for k in kinds]):
            day, ts, eid = (t.column(c).to_numpy() for c in ("day", "ts", "example_id"))
            for d in np.unique(day):
                m = int(ts[day == d].min())
                day_min[int(d)] = min(m, day_min.get(int(d), m))
            for k in kinds:
                key = t.column(f"{k}_key").to_numpy()
                mine = slice(None) if world_size == 1 else cf.shard_of(key, world_size) == rank
                samples[k].add(key[mine], eid[mine])
    return day_min, samples


def _kind_parts(cfg, files, kind, sample: KeySample, rank, world_size, old_kind: Path | None, example_days,
                cutoff, unknown):
    """Per range of the timeline, in order: (timeline columns, codes, examples per day) with offsets
    local to the range's timeline rows (`_write_kind` adds the rows written before). A cut may fall
    inside a key: the next range then starts from what the range before hands over (``edge``)."""
    bounds = [None, *sample.cuts(cfg.batch_rows), None]
    key_col = f"{kind}_key"
    old_base = new_base = 0  # timeline rows of the ranges before: existing output (sorted by key), new
    edge = None
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        table = _rows_in_range(files, ["example_id", "ts", "day", "label", key_col, cf.CODE_COLUMN],
                               key_col, lo, hi, rank, world_size)
        sub = {c: table.column(c).to_numpy() for c in ("example_id", "ts", "day", "label")}
        sub["key"] = table.column(key_col).to_numpy()
        codes = table.column(cf.CODE_COLUMN)
        del table
        ok = entry_mask(sub["label"], cfg.entry_labels)
        if unknown:
            ok &= ~np.isin(sub["key"], unknown)
        if cutoff is not None:
            ok &= sub["ts"] >= cutoff
        edge = edge if edge is not None and lo is not None and edge[0] == lo[0] else None  # the key goes on
        if old_kind is None:
            part, edge = _full_part(cfg, sub, codes, ok, example_days, edge)
        else:
            order = _id_order(sub["example_id"])
            if order is not None:
                sub, ok, codes = {c: v[order] for c, v in sub.items()}, ok[order], _take(codes, order)
            old_part = _old_range(old_kind, lo, hi, example_days, old_base)
            is_ex = np.isin(sub["day"], example_days)
            part, edge = _append_kind(cfg, sub, codes, ok, is_ex, old_part, example_days, cutoff, edge,
                                      old_base - new_base)
            old_base += len(old_part[0]["key"])
        new_base += len(part[0]["key"])
        yield part


def _id_order(eid: np.ndarray) -> np.ndarray | None:
    """The order that sorts rows by example id, None when they already are (one part per day)."""
    return None if len(eid) < 2 or np.all(eid[1:] > eid[:-1]) else np.argsort(eid, kind="stable")


def _full_part(cfg, sub, codes, ok, example_days, edge):
    """One range of a full build. ``edge``: (key, newest entries, their codes) of the range's first
    key from the ranges before (a key cut in two), enough for its examples here: the latest
    second's ties plus ``max_len`` before them. They lead the range's timeline, written already."""
    n_carry = 0
    is_ex = np.ones(len(sub["key"]), bool)
    if edge is not None:
        _, c_cols, c_codes = edge
        n_carry = len(c_cols["key"])
        sub = {**{c: np.concatenate([c_cols[c], sub[c]]) for c in ("key", "ts", "example_id", "label")},
               "day": np.concatenate([np.full(n_carry, -1, sub["day"].dtype), sub["day"]])}
        codes = pa.chunked_array(c_codes.chunks + codes.chunks, type=codes.type)
        ok = np.concatenate([np.ones(n_carry, bool), ok])
        is_ex = np.concatenate([np.zeros(n_carry, bool), is_ex])
    order = _id_order(sub["example_id"])  # several parts per day, or carried entries
    if order is not None:
        sub, ok, is_ex, codes = {c: v[order] for c, v in sub.items()}, ok[order], is_ex[order], _take(codes, order)
    tl_rows, start, end = build_offsets(sub["key"], sub["ts"], ok, cfg.window_s, cfg.max_len)
    rows = tl_rows[_carry_from(sub["key"][tl_rows], sub["ts"][tl_rows], cfg.max_len):]
    next_edge = (int(sub["key"][rows[0]]), {c: sub[c][rows] for c in ("key", "ts", "example_id", "label")},
                 _take(codes, rows)) if len(rows) else None
    tl = {c: sub[c][tl_rows[n_carry:]] for c in ("key", "ts", "example_id", "label")}
    start, end = start - n_carry, end - n_carry  # the carried rows were written with the range before
    ex = np.flatnonzero(is_ex)
    examples = {}
    for d in example_days:
        sel = ex[_day_slice(sub["day"][ex], d)]
        examples[d] = (sub["example_id"][sel], sub["ts"][sel], sub["key"][sel], start[sel], end[sel])
    return (tl, _take(codes, tl_rows[n_carry:]), examples), next_edge


def _carry_from(key: np.ndarray, ts: np.ndarray, max_len: int) -> int:
    """Where the newest entries of a timeline's last key start: its latest second's ties plus
    ``max_len`` more (all a later example of the key can see, and enough to count its ties out)."""
    if not len(key):
        return 0
    first_of_key = int(np.searchsorted(key, key[-1]))
    ties = len(ts) - first_of_key - int(np.searchsorted(ts[first_of_key:], ts[-1]))
    return max(first_of_key, len(key) - ties - max_len)


def _old_range(folder: Path, lo, hi, example_days, old_base: int):
    """The existing output's timeline rows and kept examples from cut ``lo`` to cut ``hi``, offsets
    made local (negative: into the ranges before, a key cut in two)."""
    t = _rows_in_range([folder / "timeline.parquet"], [c for c, _ in TIMELINE_SCHEMA_BASE] + [cf.CODE_COLUMN],
                       "key", lo, hi)
    tl = {c: t.column(c).to_numpy() for c, _ in TIMELINE_SCHEMA_BASE}
    examples = {}
    for d in example_days:
        path = folder / "examples" / f"day={d}.parquet"
        if not path.is_file():
            continue  # a new day
        e = _rows_in_range([path], EXAMPLES_SCHEMA.names, "key", lo, hi)
        eid, ts, key, start, end = (e.column(c).to_numpy() for c in EXAMPLES_SCHEMA.names)
        nz = end > start
        start, end = np.where(nz, start - old_base, 0), np.where(nz, end - old_base, 0)
        if np.any(end > len(tl["key"])):
            raise RuntimeError(f"append: {path} has a sequence outside its key's rows of {folder / 'timeline.parquet'}")
        examples[d] = (eid, ts, key, start, end)
    return tl, t.column(cf.CODE_COLUMN), examples


def _append_kind(cfg, sub, codes, ok, is_ex, old_kind, example_days, cutoff, edge, base_shift: int):
    """One range of an append: the kept old entries and the new ones merged; old examples remapped,
    new ones searched. ``edge`` as in `_full_part`, plus the constant by which the first key's kept
    old entries moved (they stay contiguous); ``base_shift``: old minus new rows of ranges before."""
    o_tl, o_codes, o_examples = old_kind
    keep = o_tl["ts"] >= cutoff if cutoff is not None else np.ones(len(o_tl["ts"]), bool)
    n_keep = int(keep.sum())
    new_rows = np.flatnonzero(ok)
    _, c_cols, c_codes, moved = edge if edge is not None else (None, None, None, None)
    n_carry = len(c_cols["key"]) if c_cols is not None else 0
    blocks = ([c_cols] if n_carry else []) + [{c: v[keep] for c, v in o_tl.items()},
                                              {c: sub[c][new_rows] for c in o_tl}]
    # carried, old, new rows are in time order per key: a stable sort by key gives (key, ts, id)
    order = np.argsort(np.concatenate([b["key"] for b in blocks]), kind="stable")
    tl = {c: np.concatenate([b[c] for b in blocks])[order] for c in ("key", "ts", "example_id", "label")}
    chunks = (c_codes.chunks if n_carry else []) + _take(o_codes, np.flatnonzero(keep)).chunks \
        + _take(codes, new_rows).chunks
    tl_codes = _take(pa.chunked_array(chunks, type=codes.type), order)
    inv = np.empty(len(order), np.int64)
    inv[order] = np.arange(len(order))
    old_to_new = np.full(len(keep), -1, np.int64)
    old_to_new[keep] = inv[n_carry:n_carry + n_keep] - n_carry
    examples = {}
    for d in example_days:
        if d in o_examples:
            eid, ts, key, start, end = o_examples[d]
            length = end - start
            inside, before = (length > 0) & (start >= 0), (length > 0) & (start < 0)
            new_start = np.zeros_like(start)
            new_start[inside] = old_to_new[start[inside]]
            if np.any(new_start[inside] < 0):
                raise RuntimeError("append: an old sequence references a dropped timeline entry")
            if np.any(before):  # into the ranges before: its key's kept old entries moved by `moved`
                if moved is None or np.any(key[before] != edge[0]):
                    raise RuntimeError("append: an old sequence starts outside its key's timeline")
                new_start[before] = start[before] + base_shift + moved
            examples[d] = (eid, ts, key, new_start, np.where(length > 0, new_start + length, 0))
    ex = np.flatnonzero(is_ex)
    start, end = query_offsets(tl["key"], tl["ts"], sub["key"][ex], sub["ts"][ex], cfg.window_s, cfg.max_len)
    start, end = start - n_carry, end - n_carry
    for d in example_days:
        if d not in examples:
            sel = _day_slice(sub["day"][ex], d)
            examples[d] = (sub["example_id"][ex][sel], sub["ts"][ex][sel], sub["key"][ex][sel], start[sel], end[sel])
    return (({c: v[n_carry:] for c, v in tl.items()}, tl_codes.slice(n_carry), examples),
            _append_edge(cfg, tl, tl_codes, o_tl, keep, old_to_new, edge, base_shift))


def _append_edge(cfg, tl, tl_codes, o_tl, keep, old_to_new, edge, base_shift: int):
    """What the next range needs if it goes on with this range's last key: its newest entries, and
    how far its kept old entries moved (new global row minus old global row)."""
    p = _carry_from(tl["key"], tl["ts"], cfg.max_len)
    if p == len(tl["key"]):
        return None
    key = int(tl["key"][-1])
    mine = np.flatnonzero(keep & (o_tl["key"] == key))
    # new global - old global = (new_base + new local) - (old_base + old local)
    moved = (int(old_to_new[mine[-1]] - mine[-1]) - base_shift if len(mine)
             else edge[3] if edge is not None and edge[0] == key else None)
    return key, {c: v[p:] for c, v in tl.items()}, tl_codes.slice(p), moved


def _take(codes: pa.Array | pa.ChunkedArray, rows: np.ndarray) -> pa.ChunkedArray:
    out = codes.take(pa.array(rows, pa.int64()))
    return out if isinstance(out, pa.ChunkedArray) else pa.chunked_array([out], type=codes.type)


def _day_slice(day: np.ndarray, d: int) -> slice:
    """Rows of day ``d`` (rows are in example-id order, so each day is one run)."""
    lo, hi = np.searchsorted(day, [d, d + 1])
    return slice(int(lo), int(hi))


# -- writing: the ranges in key order, then each day's examples merged by example id -------------
ROW_GROUP_ROWS = 1 << 20
_MERGE_ROWS = 1 << 18  # example rows held by a day's merge, over all its runs


def _write_kind(out: Path, parts, code_type: pa.DataType, example_days: list[int]) -> dict:
    """Write ``out/timeline.parquet`` and ``out/examples/day=K.parquet`` for one key kind from its key
    ranges' parts (ascending, so the timeline is sorted); returns the kind's counts."""
    (out / "examples").mkdir(parents=True, exist_ok=True)
    spill = out / ".spill"  # per day, each range's examples (sorted by id): merged at the end
    spill.mkdir()
    runs: dict[int, list[int]] = {d: [] for d in example_days}
    stats = {"rows_per_day": {str(d): 0 for d in example_days}, "length_sum": 0, "empty": 0}
    schema = pa.schema(TIMELINE_SCHEMA_BASE + [(cf.CODE_COLUMN, code_type)])
    # dictionaries of ids and codes cost time, save nothing
    with RowGroupWriter(out / "timeline.parquet", ROW_GROUP_ROWS, schema=schema,
                        use_dictionary=["label"]) as timeline:
        for tl, tl_codes, examples in parts:
            base = timeline.rows
            arrays = [pa.chunked_array([pa.array(tl[c], type=t)]) for c, t in TIMELINE_SCHEMA_BASE] + [tl_codes]
            timeline.write(pa.Table.from_arrays(arrays, schema=schema))
            for d, (eid, ts, key, start, end) in examples.items():
                length = end - start
                nz = length > 0
                block = np.stack([eid, ts, key, np.where(nz, start + base, 0), np.where(nz, end + base, 0)], axis=1)
                with open(spill / f"day={d}.bin", "ab") as f:
                    block.astype("<i8").tofile(f)
                runs[d].append(len(eid))
                stats["rows_per_day"][str(d)] += len(eid)
                stats["length_sum"] += int(length.sum())
                stats["empty"] += int((~nz).sum())
        stats["timeline_rows"] = timeline.rows
    for d in example_days:
        _merge_runs(spill / f"day={d}.bin", runs[d], out / "examples" / f"day={d}.parquet")
    shutil.rmtree(spill)
    return stats


def _examples_table(rows: np.ndarray) -> pa.Table:
    return pa.Table.from_arrays([pa.array(np.ascontiguousarray(rows[:, i]), type=f.type)
                                 for i, f in enumerate(EXAMPLES_SCHEMA)], schema=EXAMPLES_SCHEMA)


def _merge_runs(spill: Path, counts: list[int], out: Path) -> None:
    """K-way merge by example id of the sorted runs (``counts`` rows each, in order) of ``spill``,
    holding a block of each run: rows up to the smallest last id of the blocks of unfinished runs
    are complete, since every row still on disk lies beyond its run's block."""
    width = len(EXAMPLES_SCHEMA)
    block = max(1, _MERGE_ROWS // max(len(counts), 1))
    pos = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64).tolist() if counts else []
    left = list(counts)
    bufs = [np.zeros((0, width), np.int64) for _ in counts]
    with RowGroupWriter(out, ROW_GROUP_ROWS, schema=EXAMPLES_SCHEMA, use_dictionary=False) as writer, \
            open(spill, "rb") if spill.exists() else contextlib.nullcontext() as f:

        def refill(i: int) -> None:
            n = min(block, left[i])
            f.seek(pos[i] * width * 8)
            bufs[i] = np.fromfile(f, "<i8", n * width).reshape(n, width)
            pos[i] += n
            left[i] -= n

        for i in range(len(counts)):
            if left[i]:
                refill(i)
        while any(len(b) for b in bufs):
            limit = min((bufs[i][-1, 0] for i in range(len(bufs)) if left[i]), default=None)
            out_rows = []
            for i, b in enumerate(bufs):
                cut = len(b) if limit is None else int(np.searchsorted(b[:, 0], limit, side="right"))
                out_rows.append(b[:cut])
                bufs[i] = b[cut:]
                if not len(bufs[i]) and left[i]:
                    refill(i)
            rows = np.concatenate(out_rows)
            writer.write(_examples_table(rows[np.argsort(rows[:, 0], kind="stable")]))


def _old_shard(append_dir, rank, world_size, cfg) -> dict:
    """The previous output of this rank: its folder and manifest (read before anything is replaced)."""
    append_dir = Path(append_dir)
    if (append_dir / MANIFEST).is_file():  # a finished output says how many ranks built it
        built_by = json.loads((append_dir / MANIFEST).read_text()).get("world_size")
        if built_by != world_size:
            raise ValueError(f"--append: {append_dir} was built by {built_by} ranks; append with the same "
                             f"number (got {world_size}) or rebuild")
    folder = append_dir if world_size == 1 else cf.shard_dir(append_dir, rank)
    if not (folder / MANIFEST).is_file():
        raise ValueError(f"--append: {folder} holds no finished build-sequences output"
                         + ("" if world_size == 1 else f" for rank {rank} of {world_size}"))
    m = json.loads((folder / MANIFEST).read_text())
    if m.get("stage") != "build-sequences":
        raise ValueError(f"--append: {append_dir} is a {m.get('stage')!r} output, expected build-sequences")
    if m["world_size"] != world_size:
        raise ValueError(f"--append: {append_dir} was built by {m['world_size']} ranks; append with the same "
                         f"number (got {world_size}) or rebuild")
    want = dict(keys=list(cfg.keys), max_len=cfg.max_len, window_s=cfg.window_s, entry_labels=cfg.entry_labels,
                keep_days=cfg.keep_days, skip_unknown_keys=cfg.skip_unknown_keys)
    diff = {k: (m.get(k), v) for k, v in want.items() if m.get(k) != v}
    if diff:
        raise ValueError(f"--append: config differs from {append_dir}'s (old, new): {diff}; rebuild instead")
    return {"dir": folder, "manifest": m}


def _check_append(old: dict, new: dict, new_days: list[int]) -> None:
    if old["code_bytes"] != new["code_bytes"] or old["quantizer"] != new["quantizer"]:
        raise ValueError(f"--append: the new codes use {new['quantizer']}, the existing output "
                         f"{old['quantizer']}; rebuild instead")
    last_old = max(old["days_read"])
    if min(new_days) <= last_old:
        raise ValueError(f"--append: new days {sorted(new_days)} must come after the existing ones "
                         f"(days {old['days_read']}); rebuild instead")


def _merge(manifests: list[dict]) -> dict:
    top = dict(manifests[0])
    kinds = top["keys"]
    for name in ("timeline_rows", "length_sum", "empty"):
        top[name] = {k: sum(m[name][k] for m in manifests) for k in kinds}
    top["rows_per_day"] = {k: {d: sum(m["rows_per_day"][k].get(d, 0) for m in manifests)
                               for d in manifests[0]["rows_per_day"][k]} for k in kinds}
    return top


def open_manifest(seq_dir: str | Path) -> dict:
    """The top manifest; finalises a sharded output whose shards all exist but whose top is missing."""
    seq_dir = Path(seq_dir)
    if not (seq_dir / MANIFEST).is_file() and (cf.shard_dir(seq_dir, 0) / MANIFEST).is_file():
        ws = json.loads((cf.shard_dir(seq_dir, 0) / MANIFEST).read_text())["world_size"]
        cf.finalize_shards(seq_dir, ws, merge=_merge)
    return read_manifest(seq_dir)


def show_sequence(seq_dir: str | Path, example_id: int, key: str | None = None) -> dict:
    """One example's sequence as JSON-able data, oldest -> newest, to audit against the event log.

    ``seq_dir`` is the build-sequences output or a run folder holding it as ``sequences/``.
    Returns ``{"example_id", "key_kind", "key", "ts", "day", "history": [{"example_id", "ts",
    "label"}, ...]}``; raises KeyError for an example that is not in the output.
    """
    seq_dir = Path(seq_dir)
    if not (seq_dir / MANIFEST).is_file() and not (seq_dir / "shards").is_dir() and (seq_dir / "sequences").is_dir():
        seq_dir = seq_dir / "sequences"
    m = open_manifest(seq_dir)
    kind = key or m["keys"][0]
    if kind not in m["keys"]:
        raise ValueError(f"{seq_dir} has timelines for {m['keys']}, not {kind!r}")
    for shard in m.get("shards", ["."]):
        folder = inside(seq_dir, shard) / kind
        for d in m["days"]:
            e = pq.read_table(folder / "examples" / f"day={d}.parquet", filters=[("example_id", "=", int(example_id))])
            if e.num_rows:
                row = {c: e.column(c)[0].as_py() for c in EXAMPLES_SCHEMA.names}
                tl = pq.read_table(folder / "timeline.parquet", columns=["ts", "example_id", "label"])
                hist = tl.slice(row["start"], row["end"] - row["start"])
                return {"example_id": int(example_id), "key_kind": kind, "key": row["key"], "ts": row["ts"],
                        "day": d, "history": [{"example_id": i, "ts": t, "label": lb} for i, t, lb in zip(
                            hist.column("example_id").to_pylist(), hist.column("ts").to_pylist(),
                            hist.column("label").to_pylist())]}
    raise KeyError(f"example {example_id} is not among the examples of {seq_dir} (days {m['days']})")


# The reader lives with the codes; imported here by name, as the VM stage and tests use it.
from loopfm.codes.reader import SequenceBatch, SequenceReader  # noqa: E402,F401

__all__ = ["SequencesConfig", "run_build_sequences", "build_offsets", "query_offsets", "SequenceReader",
           "SequenceBatch", "show_sequence", "open_manifest", "entry_mask", "print_summary"]
