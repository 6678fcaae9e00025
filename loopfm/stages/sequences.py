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
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from loopfm.progress import progress_bar

from loopfm.artifacts import MANIFEST, inside, read_manifest, write_manifest
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
    config_hash = config_hash or cf.hash_config(cfg, src.get("config_hash", ""), old_m["config_hash"] if old else "")
    columns = ["example_id", "ts", "day", "label"] + [f"{k}_key" for k in cfg.keys]
    table = cf.read_codes(compress_dir, days, columns + [cf.CODE_COLUMN])
    cols = {c: table.column(c).to_numpy() for c in columns}
    codes = table.column(cf.CODE_COLUMN)  # stays in Arrow: its take() gathers fixed-width rows ~3x faster
    del table  # the numpy columns are copies (several parts): keep one copy only
    days_read = sorted(set(days) | set(old_m["days_read"] if old else []))
    example_days = days_read[-cfg.keep_days:] if cfg.keep_days else days_read
    facts = dict(keys=list(cfg.keys), max_len=cfg.max_len, window_s=cfg.window_s, entry_labels=cfg.entry_labels,
                 keep_days=cfg.keep_days, skip_unknown_keys=cfg.skip_unknown_keys,
                 unknown_keys={k: _unknown_keys(cfg, src, k) for k in cfg.keys},
                 days_read=days_read, days=example_days, rank=rank, world_size=world_size,
                 code_bytes=int(codes.type.byte_width),
                 quantizer={k: src.get(k) for k in ("quantizer", "dim", "code_bytes", "codebook")},
                 compress=str(compress_dir), timeline_rows={}, rows_per_day={}, length_sum={}, empty={})
    if old is not None:
        _check_append(old_m, facts, days)
    # Retention: nothing older than (earliest kept example - window) can enter a kept sequence.
    facts["day_min_ts"] = _day_min_ts(cols, example_days, old_m)
    cutoff = min(facts["day_min_ts"].values()) - cfg.window_s if facts["day_min_ts"] else None
    with cf.shard_output(out_dir, rank, world_size) as tmp:
        for kind in progress_bar(cfg.keys, desc=f"build-sequences[{rank}]", enabled=progress):
            mine = np.flatnonzero(cf.shard_of(cols[f"{kind}_key"], world_size) == rank) if world_size > 1 else None
            sub = {c: (v if mine is None else v[mine]) for c, v in cols.items()}
            sub["key"] = sub[f"{kind}_key"]
            old_kind = _load_kind(old["dir"] / kind) if old is not None else None
            stats = _build_kind(cfg, sub, codes if mine is None else _take(codes, mine), old_kind, example_days,
                                tmp / kind, cutoff, _unknown_keys(cfg, src, kind))
            for name, value in stats.items():
                facts[name][kind] = value
        manifest = write_manifest(tmp, stage="build-sequences", config_hash=config_hash, **facts)
    top = cf.finalize_shards(out_dir, world_size, merge=_merge) if world_size > 1 else manifest
    if progress:
        print_summary(top or manifest)
    return top or manifest


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


def _day_min_ts(cols: dict, example_days: list[int], old_manifest: dict | None) -> dict[str, int]:
    """Earliest event time of each kept example day, over all ranks' rows (old days: old manifest)."""
    out = {}
    for d in example_days:
        if old_manifest is not None and str(d) in old_manifest["day_min_ts"]:
            out[str(d)] = int(old_manifest["day_min_ts"][str(d)])
        else:
            sel = cols["day"] == d
            if sel.any():
                out[str(d)] = int(cols["ts"][sel].min())
    return out


def _build_kind(cfg, sub, codes, old_kind, example_days, out: Path, cutoff: int | None, unknown: list[int]):
    """Write ``out/timeline.parquet`` and ``out/examples/day=K.parquet`` for one key kind."""
    window = cfg.window_s
    ok = entry_mask(sub["label"], cfg.entry_labels)
    if unknown:
        ok &= ~np.isin(sub["key"], unknown)
    if cutoff is not None:
        ok &= sub["ts"] >= cutoff
    examples = {}
    if old_kind is None:
        tl_rows, start, end = build_offsets(sub["key"], sub["ts"], ok, window, cfg.max_len)
        tl = {c: sub[c][tl_rows] for c in ("key", "ts", "example_id", "label")}
        tl_codes = _take(codes, tl_rows)
        for d in example_days:
            sel = _day_slice(sub["day"], d)
            examples[d] = (sub["example_id"][sel], sub["ts"][sel], sub["key"][sel], start[sel], end[sel])
    else:
        is_ex = np.isin(sub["day"], example_days)
        tl, tl_codes, examples = _append_kind(cfg, sub, codes, ok, is_ex, old_kind, example_days, cutoff)
    _write_kind(out, tl, tl_codes, examples)
    lengths = [v[4] - v[3] for v in examples.values()]
    return {"timeline_rows": int(len(tl["key"])),
            "rows_per_day": {str(d): int(len(v[0])) for d, v in examples.items()},
            "length_sum": int(sum(int(x.sum()) for x in lengths)),
            "empty": int(sum(int((x == 0).sum()) for x in lengths))}


def _append_kind(cfg, sub, codes, ok, is_ex, old_kind, example_days, cutoff):
    o_tl, o_codes, o_examples = old_kind
    keep = o_tl["ts"] >= cutoff if cutoff is not None else np.ones(len(o_tl["ts"]), bool)
    n_keep = int(keep.sum())
    new_rows = np.flatnonzero(ok)
    m_key = np.concatenate([o_tl["key"][keep], sub["key"][new_rows]])
    order = np.argsort(m_key, kind="stable")  # old rows precede new ones in time: (key, ts, id) order
    tl = {c: np.concatenate([o_tl[c][keep], sub[c][new_rows]])[order] for c in ("key", "ts", "example_id", "label")}
    both = pa.chunked_array(_take(o_codes, np.flatnonzero(keep)).chunks + _take(codes, new_rows).chunks)
    tl_codes = _take(both, order)
    inv = np.empty(len(order), np.int64)
    inv[order] = np.arange(len(order))
    old_to_new = np.full(len(keep), -1, np.int64)
    old_to_new[keep] = inv[:n_keep]
    examples = {}
    for d in example_days:
        if d in o_examples:
            eid, ts, key, start, end = o_examples[d]
            length = end - start
            nz = length > 0
            new_start = np.zeros_like(start)
            new_start[nz] = old_to_new[start[nz]]
            if np.any(new_start[nz] < 0):
                raise RuntimeError("append: an old sequence references a dropped timeline entry")
            examples[d] = (eid, ts, key, new_start, np.where(nz, new_start + length, 0))
    ex = np.flatnonzero(is_ex)
    start, end = query_offsets(tl["key"], tl["ts"], sub["key"][ex], sub["ts"][ex], cfg.window_s, cfg.max_len)
    for d in example_days:
        if d not in examples:
            sel = _day_slice(sub["day"][ex], d)
            examples[d] = (sub["example_id"][ex][sel], sub["ts"][ex][sel], sub["key"][ex][sel], start[sel], end[sel])
    return tl, tl_codes, examples


def _take(codes: pa.Array | pa.ChunkedArray, rows: np.ndarray) -> pa.ChunkedArray:
    out = codes.take(pa.array(rows, pa.int64()))
    return out if isinstance(out, pa.ChunkedArray) else pa.chunked_array([out], type=codes.type)


def _day_slice(day: np.ndarray, d: int) -> slice:
    """Rows of day ``d`` (rows are in example-id order, so each day is one run)."""
    lo, hi = np.searchsorted(day, [d, d + 1])
    return slice(int(lo), int(hi))


def _write_kind(out: Path, tl: dict, tl_codes: pa.ChunkedArray, examples: dict) -> None:
    (out / "examples").mkdir(parents=True, exist_ok=True)
    arrays = [pa.chunked_array([pa.array(tl[c], type=t)]) for c, t in TIMELINE_SCHEMA_BASE] + [tl_codes]
    schema = pa.schema(TIMELINE_SCHEMA_BASE + [(cf.CODE_COLUMN, tl_codes.type)])
    pq.write_table(pa.Table.from_arrays(arrays, schema=schema), out / "timeline.parquet", row_group_size=1 << 20,
                   use_dictionary=["label"])  # dictionaries of ids and codes cost time, save nothing
    for d, (eid, ts, key, start, end) in examples.items():
        t = pa.Table.from_arrays([pa.array(np.asarray(a), type=f.type) for a, f in
                                  zip((eid, ts, key, start, end), EXAMPLES_SCHEMA)], schema=EXAMPLES_SCHEMA)
        pq.write_table(t, out / "examples" / f"day={d}.parquet", row_group_size=1 << 20, use_dictionary=False)


def _load_kind(folder: Path):
    t = pq.read_table(folder / "timeline.parquet")
    tl = {c: t.column(c).to_numpy() for c, _ in TIMELINE_SCHEMA_BASE}
    codes = t.column(cf.CODE_COLUMN)
    examples = {}
    for p in sorted((folder / "examples").glob("day=*.parquet")):
        e = pq.read_table(p)
        examples[int(p.stem.split("=")[1])] = tuple(e.column(c).to_numpy() for c in EXAMPLES_SCHEMA.names)
    return tl, codes, examples


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
