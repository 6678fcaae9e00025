"""Point-in-time histories: the one rule every behaviour sequence in LoopFM follows.

For a query (key k, time t) -- an impression, a rating, an example -- its history is the entries
i of key k with

    t_i < t                    strictly earlier: the query itself and same-second events are out
    t_i >= t - window          optional retention window (seconds)

ordered by (t_i, then input order), oldest -> newest, truncated to the newest ``max_len``.

Three ways in, one search underneath (`Timeline.bounds`):

* `Timeline` -- entries sorted by (key, ts, input order) and a vectorised search for any batch of
  queries. build-sequences (timelines of codes), the taobao-raw behaviour-log shards and the
  synthetic generator use it directly.
* `history_lists` -- a whole log in memory, every row both an entry and a query (movielens).
* `StreamingHistories` -- a log read chunk by chunk in time order (`time_ordered` puts any
  stream in that order through sorted runs on disk); it carries, per key, only the
  newest ``max_len`` entries (plus those of the key's latest second, which a later query of the
  same second must not see but the next second must), so memory is bounded by keys x max_len
  whatever the log's length (the events source's ``kind: history``).

Search: each entry gets the int64 code ``key_rank * span + (ts - t0)``, monotone in timeline
order; two ``np.searchsorted`` calls give, per query, the first entry at or after ``t`` (end) and
at or after ``t - window`` (start). When ``keys * span`` would overflow, times are replaced by their
dense ranks among the entries (``searchsorted(left)`` of a query time keeps every comparison).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

COMPOSITE_LIMIT = 1 << 62  # key ranks * time span must stay below this for the composite code
ENTRY_LABELS = ("all", "positive", "negative")  # which events enter a history, by label


def entry_mask(label: np.ndarray, entry_labels: str) -> np.ndarray:
    """Which events enter a history under ``entry_labels`` (one of ENTRY_LABELS)."""
    if entry_labels == "all":
        return np.ones(len(label), bool)
    return np.asarray(label) == (1 if entry_labels == "positive" else 0)


class Timeline:
    """Entries sorted by (key, ts, input order), searchable for point-in-time histories."""

    def __init__(self, key: np.ndarray, ts: np.ndarray, *, limit: int | None = None) -> None:
        """``key``/``ts``: int64 arrays already in timeline order (key ascending, then ts)."""
        key, ts = np.asarray(key, np.int64), np.asarray(ts, np.int64)
        newrun = np.ones(len(key), bool)
        newrun[1:] = key[1:] != key[:-1]
        self.keys = key[newrun]  # distinct keys, ascending
        rank = np.cumsum(newrun) - 1  # not kept: the code alone is searched
        self.t0 = int(ts.min()) if len(ts) else 0
        self.span = (int(ts.max()) - self.t0 + 2) if len(ts) else 2
        if max(len(self.keys), 1) * self.span < (COMPOSITE_LIMIT if limit is None else limit):
            self.times = None
            self.code = rank * self.span + (ts - self.t0)
        else:  # dense time ranks: rank(t_i) < searchsorted_left(times, t)  <=>  t_i < t
            self.times = np.unique(ts)
            self.span = len(self.times) + 1
            self.code = rank * self.span + np.searchsorted(self.times, ts)

    def __len__(self) -> int:
        return len(self.code)

    def _tcode(self, t: np.ndarray) -> np.ndarray:
        if self.times is not None:
            return np.searchsorted(self.times, t, side="left")
        return np.clip(t - self.t0, 0, self.span - 1)  # outside the entries' range: before / after all

    def bounds(self, key: np.ndarray, ts: np.ndarray, *, max_len: int,
               window: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Per query, its history as timeline rows ``[start, end)``; an empty one is ``0:0``."""
        key, ts = np.asarray(key, np.int64), np.asarray(ts, np.int64)
        qrank = np.searchsorted(self.keys, key)
        present = np.zeros(len(key), bool)
        ok = qrank < len(self.keys)
        present[ok] = self.keys[qrank[ok]] == key[ok]
        base = qrank * self.span
        end = np.searchsorted(self.code, base + self._tcode(ts), side="left")
        lo = (np.searchsorted(self.code, base, side="left") if window is None
              else np.searchsorted(self.code, base + self._tcode(ts - window), side="left"))
        start = np.maximum(lo, end - max_len)
        empty = (start >= end) | ~present
        start[empty] = 0
        end[empty] = 0
        return start.astype(np.int64), end.astype(np.int64)


def timeline_order(key: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Row order (key, ts, input order): a stable lexsort."""
    return np.lexsort((np.arange(len(ts)), np.asarray(ts, np.int64), np.asarray(key, np.int64)))


def gather(start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(flat timeline rows, int64 list offsets) of the ranges ``[start, end)``, concatenated."""
    lengths = (end - start).astype(np.int64)
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    rows = np.arange(offsets[-1]) - np.repeat(offsets[:-1] - start, lengths)
    return rows, offsets


def key_codes(keys: pa.Array | np.ndarray) -> np.ndarray:
    """int64 codes of any key column (equal values, equal codes; null is a key of its own)."""
    if isinstance(keys, np.ndarray) and np.issubdtype(keys.dtype, np.integer):
        return keys.astype(np.int64, copy=False)
    arr = keys if isinstance(keys, (pa.Array, pa.ChunkedArray)) else pa.array(keys)
    enc = pc.dictionary_encode(arr, null_encoding="encode")
    enc = enc.combine_chunks() if isinstance(enc, pa.ChunkedArray) else enc
    return enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)


def history_lists(keys: pa.Array | np.ndarray, ts: np.ndarray, values: Sequence[pa.Array], max_len: int, *,
                  window: int | None = None, is_entry: np.ndarray | None = None) -> list[pa.ListArray]:
    """A whole log in memory: per row (input order), each of ``values`` over its history (entries:
    the rows with ``is_entry``, default all)."""
    ts = np.asarray(ts, np.int64)
    code = key_codes(keys)
    order = timeline_order(code, ts)
    if is_entry is not None:
        order = order[np.asarray(is_entry, bool)[order]]
    timeline = Timeline(code[order], ts[order])
    start, end = timeline.bounds(code, ts, max_len=max_len, window=window)
    rows, offsets = gather(start, end)
    idx, off = pa.array(order[rows]), pa.array(offsets.astype(np.int32))
    return [pa.ListArray.from_arrays(off, v.take(idx)) for v in values]


class StreamingHistories:
    """Histories of a log fed in chunks in time order (non-decreasing ``ts`` across chunks).

    Memory: the carried entries, at most ``max_len`` per key (plus ties of the key's latest
    second; a key seen again also drops those outside ``window``), and one chunk. Work per chunk:
    its rows plus the carried entries of its keys.
    """

    def __init__(self, max_len: int, *, window: int | None = None) -> None:
        self.max_len, self.window = max_len, window
        self._carry: pa.Table | None = None  # key, ts, then the value columns
        self._last_ts: int | None = None

    def update(self, keys: pa.Array, ts: np.ndarray, values: dict[str, pa.Array],
               is_entry: np.ndarray | None = None) -> dict[str, pa.ListArray]:
        """The histories of this chunk's rows (in its order); then its entries join the state."""
        ts = np.asarray(ts, np.int64)
        if len(ts) and ((np.diff(ts) < 0).any() or (self._last_ts is not None and ts[0] < self._last_ts)):
            raise ValueError("StreamingHistories needs rows in time order")
        entry = np.ones(len(ts), bool) if is_entry is None else np.asarray(is_entry, bool)
        keys = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
        chunk = pa.table({"key": keys, "ts": pa.array(ts, pa.int64()), **values}).filter(pa.array(entry))
        # Only the carried entries of keys in this chunk take part (a key's entries move together,
        # so their order is kept); the others wait untouched: work per chunk, not per carry.
        carry, untouched = self._carry, None
        if carry is not None:
            hit = np.asarray(pc.is_in(carry.column("key"), value_set=keys.cast(carry.schema.field("key").type))
                             .to_numpy(zero_copy_only=False), bool)
            untouched, carry = carry.filter(pa.array(~hit)), carry.filter(pa.array(hit))
        both = chunk if carry is None else pa.concat_tables([carry, chunk.cast(carry.schema)])
        all_keys = pc.dictionary_encode(pa.concat_arrays(
            [both.column("key").combine_chunks().cast(keys.type), keys]), null_encoding="encode")
        codes = all_keys.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        e_code, q_code = codes[:both.num_rows], codes[both.num_rows:]
        e_ts = both.column("ts").to_numpy()
        # carried entries precede the chunk's in input order, and both are time-ordered
        order = timeline_order(e_code, e_ts)
        timeline = Timeline(e_code[order], e_ts[order])
        start, end = timeline.bounds(q_code, ts, max_len=self.max_len, window=self.window)
        rows, offsets = gather(start, end)
        idx, off = pa.array(order[rows]), pa.array(offsets.astype(np.int32))
        out = {name: pa.ListArray.from_arrays(off, both.column(name).combine_chunks().take(idx))
               for name in values}
        if len(ts):
            self._last_ts = int(ts[-1])
        kept = both.take(pa.array(self._keep(e_code[order], e_ts[order], order)))
        self._carry = kept if untouched is None else pa.concat_tables([untouched, kept]).combine_chunks()
        return out

    def _keep(self, key: np.ndarray, ts: np.ndarray, order: np.ndarray) -> np.ndarray:
        """Rows (input numbering) still needed by a later query: per key the newest ``max_len``
        strictly before its latest second, every entry of that second, none outside the window."""
        n = len(key)
        if n == 0:
            return order
        last_of_key = np.ones(n, bool)
        last_of_key[:-1] = key[1:] != key[:-1]
        key_ends = np.flatnonzero(last_of_key)
        run_lengths = np.diff(np.r_[0, key_ends + 1])
        key_last_ts = np.repeat(ts[last_of_key], run_lengths)
        at_last = ts == key_last_ts
        # position from the end among the key's entries before its latest second
        before = ~at_last
        pos = np.arange(n)
        key_end = np.repeat(key_ends, run_lengths)
        n_last = np.zeros(n, np.int64)
        np.add.at(n_last, key_end, at_last.astype(np.int64))
        from_end = key_end - n_last[key_end] - pos  # 0 for the newest entry before the last second
        keep = at_last | (before & (from_end < self.max_len))
        if self.window is not None and self._last_ts is not None:
            keep &= ts >= self._last_ts - self.window  # later queries are at or after _last_ts
        return order[keep]


def time_ordered(chunks: Iterator[pa.Table], work: Path, chunk_rows: int) -> Iterator[pa.Table]:
    """Re-emit a stream of tables (with an int64 ``ts`` column) in (ts, input order), in bounded
    memory: each chunk is sorted and spilled to ``work`` as a run, then the runs are merged.

    Feeding prepare (ts, input order) instead of input order changes nothing downstream: prepare
    orders rows by (ts, input order) with a stable sort, so every example id stays the same.
    """
    runs: list[Path] = []
    row = 0
    for table in chunks:
        n = table.num_rows
        table = table.append_column(_ROW, pa.array(np.arange(row, row + n, dtype=np.int64)))
        row += n
        if n:
            order = np.lexsort((np.arange(n), table.column("ts").to_numpy()))
            runs.append(work / f"run-{len(runs):05d}.parquet")
            pq.write_table(table.take(pa.array(order)), runs[-1], compression="none")
    batch = max(1024, chunk_rows // max(len(runs), 1))
    pending: list[pa.Table] = []
    buffered = 0
    for part in _merge(runs, batch):
        pending.append(part)
        buffered += part.num_rows
        if buffered >= chunk_rows:
            yield pa.concat_tables(pending).drop_columns([_ROW]).combine_chunks()
            pending, buffered = [], 0
    if pending:
        yield pa.concat_tables(pending).drop_columns([_ROW]).combine_chunks()


_ROW = "__input_row__"


def _merge(runs: list[Path], batch: int) -> Iterator[pa.Table]:
    """K-way merge of runs sorted by (ts, row): emit, each round, every buffered row up to the
    smallest of the runs' last buffered (ts, row), which no unread row can precede."""
    iters = [pq.ParquetFile(p).iter_batches(batch_size=batch) for p in runs]
    bufs: list[pa.Table | None] = [None] * len(runs)

    def refill(i: int) -> None:
        b = next(iters[i], None)
        bufs[i] = pa.Table.from_batches([b]) if b is not None and b.num_rows else None

    for i in range(len(runs)):
        refill(i)
    while True:
        active = [i for i, b in enumerate(bufs) if b is not None]
        if not active:
            return
        cut = min((bufs[i].column("ts")[-1].as_py(), bufs[i].column(_ROW)[-1].as_py()) for i in active)
        parts = []
        for i in active:
            t = bufs[i]
            ts, row = t.column("ts").to_numpy(), t.column(_ROW).to_numpy()
            n = int(((ts < cut[0]) | ((ts == cut[0]) & (row <= cut[1]))).sum())  # a prefix: runs are sorted
            parts.append(t.slice(0, n))
            if n == t.num_rows:
                refill(i)
            else:
                bufs[i] = t.slice(n)
        merged = pa.concat_tables(parts)
        order = np.lexsort((merged.column(_ROW).to_numpy(), merged.column("ts").to_numpy()))
        yield merged.take(pa.array(order))
