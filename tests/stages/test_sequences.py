"""build-sequences: point-in-time correctness, append == rebuild, shards == single, reader, show."""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loopfm.artifacts import MANIFEST, read_manifest
from loopfm.data.eventlog import EventLog
from loopfm.stages import codes_format as cf
from loopfm.stages import sequences as seq

from loopfm.stages.compress import CompressConfig, run_compress
from loopfm.stages.sequences import (SequenceReader, SequencesConfig, build_offsets, query_offsets,
                                     run_build_sequences, show_sequence)
from tests.stages.util import brute_force, fabricate_extract, make_compress, toy_event_log

DAY = 86_400
REPO = Path(__file__).resolve().parents[2]


# -- random event logs -------------------------------------------------------------------------
@st.composite
def event_logs(draw, max_rows=60):
    n = draw(st.integers(0, max_rows))
    key_pool = draw(st.lists(st.integers(-2**63, 2**63 - 1), min_size=1, max_size=5, unique=True))
    keys = np.array(draw(st.lists(st.sampled_from(key_pool), min_size=n, max_size=n)), np.int64)
    gaps = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))  # many same-second ties
    ts = 1_700_000_000 + np.cumsum(np.array(gaps, np.int64)) if n else np.zeros(0, np.int64)
    label = np.array(draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)), np.int8)
    window = draw(st.integers(1, 40))
    max_len = draw(st.integers(1, 8))
    entry_labels = draw(st.sampled_from(["all", "positive", "negative"]))
    return keys, ts.astype(np.int64), label, window, max_len, entry_labels


def _check_against_reference(keys, ts, label, window, max_len, entry_labels, got):
    """got[q] = list of example ids of q's sequence; every property of the rule, then equality."""
    ref = brute_force(keys, ts, label, window, max_len, entry_labels)
    for q, hist in enumerate(got):
        assert q not in hist                                   # never the example itself
        assert all(ts[i] < ts[q] for i in hist)                # strictly earlier, ties excluded
        assert all(ts[i] >= ts[q] - window for i in hist)      # inside the window
        assert all(keys[i] == keys[q] for i in hist)           # never another key's event
        assert len(hist) <= max_len
        assert hist == ref[q], (q, hist, ref[q])               # the newest <= L that qualify, in order


@settings(max_examples=150, deadline=None)
@given(event_logs())
def test_offsets_match_brute_force(log):
    keys, ts, label, window, max_len, entry_labels = log
    ok = seq.entry_mask(label, entry_labels)
    rows, start, end = build_offsets(keys, ts, ok, window, max_len)
    assert np.all(end - start <= max_len) and np.all(start <= end)
    got = [rows[s:e].tolist() for s, e in zip(start, end)]
    _check_against_reference(keys, ts, label, window, max_len, entry_labels, got)
    # The append path's search (arbitrary queries against a finished timeline) agrees.
    qs, qe = query_offsets(keys[rows], ts[rows], keys, ts, window, max_len)
    assert [rows[s:e].tolist() for s, e in zip(qs, qe)] == got


@settings(max_examples=40, deadline=None)
@given(event_logs())
def test_offsets_dense_time_fallback(log):
    keys, ts, label, window, max_len, entry_labels = log
    ok = seq.entry_mask(label, entry_labels)
    fast = build_offsets(keys, ts, ok, window, max_len)
    old, seq._COMPOSITE_LIMIT = seq._COMPOSITE_LIMIT, 1  # force the dense-rank path
    try:
        dense = build_offsets(keys, ts, ok, window, max_len)
    finally:
        seq._COMPOSITE_LIMIT = old
    for a, b in zip(fast, dense):
        np.testing.assert_array_equal(a, b)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(event_logs(max_rows=40), st.integers(1, 3), st.integers(1, 3))
def test_stage_and_reader_match_brute_force(log, num_days, world_size):
    """Through the files: compress folder -> build-sequences (N ranks) -> reader and show_sequence."""
    keys, ts, label, window, max_len, entry_labels = log
    n = len(keys)
    if n == 0:
        return
    day = (np.arange(n) * num_days // n + 1).astype(np.int32)  # day cuts in example-id order
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_compress(tmp / "c", key=keys, ts=ts, label=label, day=day)
        cfg = SequencesConfig(max_len=max_len, window_days=window / DAY, entry_labels=entry_labels,
                              skip_unknown_keys=False)
        assert cfg.window_s == window
        for r in range(world_size):
            run_build_sequences(cfg, tmp / "c", tmp / "s", rank=r, world_size=world_size, progress=False)
        reader = SequenceReader(tmp / "s")
        got = [reader.history_ids(q).tolist() for q in range(n)]
        _check_against_reference(keys, ts, label, window, max_len, entry_labels, got)
        q = n - 1
        shown = show_sequence(tmp / "s", q)
        assert shown["key"] == int(keys[q]) and shown["ts"] == int(ts[q])
        assert [h["example_id"] for h in shown["history"]] == got[q]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(event_logs(max_rows=40), st.integers(0, 2), st.sampled_from([1, 2]))
def test_append_equals_rebuild_on_random_logs(log, keep_days, world_size):
    """Same-second ties split across the day boundary, drops by the window, several ranks."""
    keys, ts, label, window, max_len, entry_labels = log
    n = len(keys)
    if n < 3:
        return
    day = (np.arange(n) * 3 // n + 1).astype(np.int32)
    cfg = dict(max_len=max_len, window_days=window / DAY, entry_labels=entry_labels, keep_days=keep_days,
               skip_unknown_keys=False)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_compress(tmp / "c", key=keys, ts=ts, label=label, day=day)
        for r in range(world_size):
            run_build_sequences(SequencesConfig(**cfg, days=[1, 2]), tmp / "c", tmp / "a", rank=r,
                                world_size=world_size, progress=False)
        for r in range(world_size):
            run_build_sequences(SequencesConfig(**cfg), tmp / "c", tmp / "a", append_dir=tmp / "a", rank=r,
                                world_size=world_size, progress=False)
            run_build_sequences(SequencesConfig(**cfg), tmp / "c", tmp / "f", rank=r, world_size=world_size,
                                progress=False)
        for shard in read_manifest(tmp / "f").get("shards", ["."]):
            a, f = _tables(tmp / "a" / shard), _tables(tmp / "f" / shard)
            assert a.keys() == f.keys() and all(a[k].equals(f[k]) for k in a)
        reader = SequenceReader(tmp / "a")
        ref = brute_force(keys, ts, label, window, max_len, entry_labels, queries=reader.example_id.tolist())
        assert [reader.history_ids(q).tolist() for q in reader.example_id] == ref


# -- on a prepared event log -------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    log = toy_event_log(root)
    fabricate_extract(log, root / "extract", dim=16, seed=1)
    run_compress(CompressConfig(quantizer="int4"), root / "extract", root / "compress", progress=False)
    return root


def _tables(folder: Path, kind: str = "user") -> dict:
    out = {"timeline": pq.read_table(folder / kind / "timeline.parquet")}
    for p in sorted((folder / kind / "examples").glob("*.parquet")):
        out[p.name] = pq.read_table(p)
    return out


def test_show_sequence_audits_against_the_event_log(run_dir):
    cfg = SequencesConfig(keys=["user", "item"], max_len=5, window_days=0.5)
    m = run_build_sequences(cfg, run_dir / "compress", run_dir / "seq", progress=False)
    assert m["keys"] == ["user", "item"] and m["days"] == [1, 2, 3, 4] and m["window_s"] == 43_200
    events = EventLog(run_dir / "events").read(columns=["example_id", "ts", "label", "uid", "iid"])
    eid, ts, label = (events.column(c).to_numpy() for c in ("example_id", "ts", "label"))
    for kind, col in (("user", "uid"), ("item", "iid")):
        keys = events.column(col).to_numpy()
        queries = list(range(0, len(eid), 37))
        ref = brute_force(keys, ts, label, 43_200, 5, queries=queries)
        for q, r in zip(queries, ref):
            shown = show_sequence(run_dir / "seq", int(eid[q]), key=kind)
            assert shown["key"] == int(keys[q]) and shown["ts"] == int(ts[q]) and shown["key_kind"] == kind
            assert [h["example_id"] for h in shown["history"]] == [int(eid[i]) for i in r]
            assert [h["ts"] for h in shown["history"]] == sorted(h["ts"] for h in shown["history"])
    assert sum(m["rows_per_day"]["user"].values()) == len(eid)
    with pytest.raises(KeyError):
        show_sequence(run_dir / "seq", 10**9)
    (run_dir / "seq").rename(run_dir / "sequences")  # a run folder works too
    try:
        assert show_sequence(run_dir, 500, key="item") == show_sequence(run_dir / "sequences", 500, key="item")
    finally:
        (run_dir / "sequences").rename(run_dir / "seq")


@pytest.mark.parametrize("entry_labels,keep_days,window_days", [("all", 0, 30.0), ("positive", 2, 1.0)])
def test_append_equals_rebuild(run_dir, tmp_path, entry_labels, keep_days, window_days):
    base = dict(keys=["user", "item"], max_len=4, window_days=window_days, entry_labels=entry_labels,
                keep_days=keep_days)
    run_build_sequences(SequencesConfig(**base, days=[1, 2, 3]), run_dir / "compress", tmp_path / "a",
                        progress=False)
    appended = run_build_sequences(SequencesConfig(**base), run_dir / "compress", tmp_path / "a",
                                   append_dir=tmp_path / "a", progress=False)  # in place: adds day 4
    full = run_build_sequences(SequencesConfig(**base), run_dir / "compress", tmp_path / "full", progress=False)
    for k in ("days", "days_read", "timeline_rows", "rows_per_day", "day_min_ts", "length_sum", "empty"):
        assert appended[k] == full[k], k
    if keep_days:
        assert appended["days"] == [3, 4]
        labels = cf.read_codes(run_dir / "compress", columns=["label"]).column("label").to_numpy()
        assert full["timeline_rows"]["user"] < np.sum(labels == 1)  # old entries were dropped
    for kind in ("user", "item"):
        a, f = _tables(tmp_path / "a", kind), _tables(tmp_path / "full", kind)
        assert a.keys() == f.keys()
        for name in a:
            assert a[name].equals(f[name]), (kind, name)


def test_append_drops_entries_older_than_the_window(run_dir, tmp_path):
    base = dict(max_len=4, window_days=0.5, keep_days=1)
    run_build_sequences(SequencesConfig(**base, days=[1, 2, 3]), run_dir / "compress", tmp_path / "a", progress=False)
    m = run_build_sequences(SequencesConfig(**base), run_dir / "compress", tmp_path / "b",
                            append_dir=tmp_path / "a", progress=False)
    tl = pq.read_table(tmp_path / "b" / "user" / "timeline.parquet")
    assert tl.num_rows == m["timeline_rows"]["user"]
    assert min(tl.column("ts").to_pylist()) >= m["day_min_ts"]["4"] - 43_200
    assert m["days"] == [4] and not (tmp_path / "b" / "user" / "examples" / "day=3.parquet").exists()


def test_append_rejects_changed_config_and_old_days(run_dir, tmp_path):
    run_build_sequences(SequencesConfig(days=[1, 2]), run_dir / "compress", tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="config differs"):
        run_build_sequences(SequencesConfig(max_len=7), run_dir / "compress", tmp_path / "b",
                            append_dir=tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="after the existing"):
        run_build_sequences(SequencesConfig(days=[1]), run_dir / "compress", tmp_path / "b",
                            append_dir=tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="same number"):
        run_build_sequences(SequencesConfig(), run_dir / "compress", tmp_path / "b",
                            append_dir=tmp_path / "a", world_size=2, progress=False)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_equals_single(run_dir, tmp_path, world_size):
    cfg = SequencesConfig(keys=["user", "item"], max_len=6, window_days=1.0)
    single = run_build_sequences(cfg, run_dir / "compress", tmp_path / "one", progress=False)
    for r in range(world_size):
        m = run_build_sequences(cfg, run_dir / "compress", tmp_path / "many", rank=r, world_size=world_size,
                                progress=False)
        done = (tmp_path / "many" / MANIFEST).exists()
        assert done == (r == world_size - 1)  # the top manifest appears with the last shard only
        assert cf.shard_dir(tmp_path / "many", r).is_dir()
    assert m["shards"] == [f"shards/rank-{r}" for r in range(world_size)]
    for k in ("timeline_rows", "rows_per_day", "days", "day_min_ts", "length_sum", "empty"):
        assert m[k] == single[k], k
    for kind in ("user", "item"):
        a, b = SequenceReader(tmp_path / "one", key=kind), SequenceReader(tmp_path / "many", key=kind)
        np.testing.assert_array_equal(a.example_id, b.example_id)
        ba, bb = a.gather(a.example_id), b.gather(a.example_id)
        for f in ("lengths", "codes", "deltas", "values", "offsets", "key"):
            np.testing.assert_array_equal(getattr(ba, f), getattr(bb, f))
        # Each key's timeline lives in exactly one shard, its hash shard.
        for r in range(world_size):
            keys = pq.read_table(cf.shard_dir(tmp_path / "many", r) / kind / "timeline.parquet").column("key")
            assert np.all(cf.shard_of(keys.to_numpy(), world_size) == r)


def test_concurrent_replicas_produce_one_output(run_dir, tmp_path):
    """N independent processes (TorchX replicas, no collective) writing one output at the same time."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]);"
            "from loopfm.stages.sequences import SequencesConfig, run_build_sequences;"
            "run_build_sequences(SequencesConfig(keys=['user', 'item'], max_len=6), sys.argv[2], sys.argv[3],"
            " rank=int(sys.argv[4]), world_size=3, progress=False)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(REPO), str(run_dir / "compress"),
                               str(tmp_path / "many"), str(r)]) for r in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    run_build_sequences(SequencesConfig(keys=["user", "item"], max_len=6), run_dir / "compress", tmp_path / "one",
                        progress=False)
    assert read_manifest(tmp_path / "many")["world_size"] == 3
    a, b = SequenceReader(tmp_path / "one", key="item"), SequenceReader(tmp_path / "many", key="item")
    np.testing.assert_array_equal(a.gather(a.example_id).codes, b.gather(a.example_id).codes)
    assert not list((tmp_path / "many").glob(".*")) and not list((tmp_path / "many" / "shards").glob(".*"))


def test_finalize_waits_for_every_shard_of_the_same_run(run_dir, tmp_path):
    cfg = SequencesConfig(max_len=3)
    run_build_sequences(cfg, run_dir / "compress", tmp_path / "s", rank=1, world_size=2, progress=False)
    assert cf.finalize_shards(tmp_path / "s", 2) is None
    assert not (tmp_path / "s" / MANIFEST).exists()
    with pytest.raises(FileNotFoundError):
        SequenceReader(tmp_path / "s")
    # Rank 0 of a different config does not complete it either.
    run_build_sequences(SequencesConfig(max_len=4), run_dir / "compress", tmp_path / "s", rank=0, world_size=2,
                        progress=False)
    assert not (tmp_path / "s" / MANIFEST).exists()
    run_build_sequences(cfg, run_dir / "compress", tmp_path / "s", rank=0, world_size=2, progress=False)
    assert read_manifest(tmp_path / "s")["max_len"] == 3


def test_failed_build_leaves_no_success(run_dir, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(seq, "_write_kind", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        run_build_sequences(SequencesConfig(), run_dir / "compress", tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists() and not list(tmp_path.glob(".s.tmp-*"))
    with pytest.raises(RuntimeError):
        run_build_sequences(SequencesConfig(), run_dir / "compress", tmp_path / "m", rank=0, world_size=2,
                            progress=False)
    assert not (tmp_path / "m" / MANIFEST).exists() and not cf.shard_dir(tmp_path / "m", 0).exists()


def test_reader_shapes_padding_and_deltas(run_dir, tmp_path):
    cfg = SequencesConfig(max_len=6, window_days=0.4)
    run_build_sequences(cfg, run_dir / "compress", tmp_path / "s", progress=False)
    reader = SequenceReader(tmp_path / "s", days=[2, 3])
    compress = cf.read_codes(run_dir / "compress", columns=["example_id", "ts", "code"])
    all_codes = cf.bytes_from_arrow(compress.column("code"))
    all_ts = compress.column("ts").to_numpy()
    seen = []
    for b in reader.iter_batches(batch_size=64):
        B = len(b.example_id)
        assert b.codes.shape == (B, 6, 8) and b.codes.dtype == np.uint8
        assert b.lengths.dtype == np.int32 and b.lengths.shape == (B,)
        assert b.deltas.shape == (B, 6) and b.deltas.dtype == np.int64
        assert b.offsets.shape == (B + 1,) and b.offsets[-1] == len(b.values) == b.lengths.sum()
        for i in range(B):
            n = b.lengths[i]
            hist = reader.history_ids(b.example_id[i])
            assert len(hist) == n
            np.testing.assert_array_equal(b.codes[i, :n], all_codes[hist])       # oldest .. newest
            assert not b.codes[i, n:].any() and not b.deltas[i, n:].any()        # zero padding
            np.testing.assert_array_equal(b.deltas[i, :n], b.ts[i] - all_ts[hist])
            assert np.all(b.deltas[i, :n] >= 1) and np.all(np.diff(b.deltas[i, :n]) <= 0)
            np.testing.assert_array_equal(b.values[b.offsets[i]:b.offsets[i + 1]], b.codes[i, :n])
            np.testing.assert_array_equal(b.value_deltas[b.offsets[i]:b.offsets[i + 1]], b.deltas[i, :n])
        seen.extend(b.example_id.tolist())
    days = compress.column("example_id").to_numpy()
    day_col = cf.read_codes(run_dir / "compress", columns=["example_id", "day"]).column("day").to_numpy()
    assert seen == days[np.isin(day_col, [2, 3])].tolist()  # example-id order, requested days only
    assert reader.gather(np.array(seen[5:2:-1])).example_id.tolist() == seen[5:2:-1]
    with pytest.raises(KeyError):
        reader.gather(np.array([days[0]]))  # a day-1 example is not in this reader
    assert 0 < np.mean([len(reader.history_ids(e)) for e in seen]) < 6
    from loopfm.stages.compress import decode
    values = decode(b.codes, reader.quant_spec())
    assert values.shape == (len(b.example_id), 6, 16) and np.all(np.abs(values) <= 1)


def test_reader_batch_feeds_the_int4_kernel(run_dir, tmp_path):
    import kernels
    run_build_sequences(SequencesConfig(max_len=5), run_dir / "compress", tmp_path / "s", progress=False)
    reader = SequenceReader(tmp_path / "s")
    b = reader.batch(np.arange(32)).to_torch()
    q = torch.randn(32, 1, 16)
    out = kernels.int4_attend(b["codes"], b["lengths"], q, backend="reference")
    jag = kernels.int4_attend_jagged(b["values"], b["offsets"], q, backend="reference")
    assert out.shape == (32, 1, 16)
    torch.testing.assert_close(out, jag)
    assert torch.all(out[b["lengths"] == 0] == 0)


@pytest.mark.parametrize("skip", [True, False])
def test_missing_and_oov_keys_get_no_timeline(tmp_path, skip):
    key = np.array([0, 5, 9, 0, 5, 9, 0, 5, 9], np.int64)  # 0 = missing, 9 = OOV of a 10-id vocabulary
    ts = np.arange(9, dtype=np.int64) * 10
    make_compress(tmp_path / "c", key=key, ts=ts, label=np.ones(9, np.int8), day=np.ones(9, np.int32),
                  key_vocab_size={"user_key": 10, "item_key": 7})
    m = run_build_sequences(SequencesConfig(max_len=5, skip_unknown_keys=skip), tmp_path / "c", tmp_path / "s",
                            progress=False)
    assert m["unknown_keys"] == {"user": [0, 9] if skip else []}
    reader = SequenceReader(tmp_path / "s")
    got = [reader.history_ids(i).tolist() for i in range(9)]
    assert got[7] == [1, 4]  # a known key keeps its history
    assert got[6] == ([] if skip else [0, 3]) and got[8] == ([] if skip else [2, 5])


def test_config_checks():
    with pytest.raises(ValueError, match="keys"):
        SequencesConfig(keys=["usr"])
    with pytest.raises(ValueError, match="keys"):
        SequencesConfig(keys=[])
    with pytest.raises(ValueError, match="max_len"):
        SequencesConfig(max_len=0)
    with pytest.raises(ValueError, match="window_days"):
        SequencesConfig(window_days=0)
    with pytest.raises(ValueError, match="entry_labels"):
        SequencesConfig(entry_labels="watched")


# -- bounded memory: key ranges built one at a time give the same files ---------------------------
def _same_output(a: Path, b: Path, *, same_hash: bool = True) -> None:
    """Every data file the same bytes; the manifests equal but for the time (and the hash, where
    one output was appended to: its hash chains the old output's)."""
    def files(root):
        return {p.relative_to(root): p for p in sorted(root.rglob("*")) if p.is_file()}
    fa, fb = files(a), files(b)
    assert fa.keys() == fb.keys()
    for rel in fa:
        if rel.name != MANIFEST:
            assert fa[rel].read_bytes() == fb[rel].read_bytes(), rel
            continue
        ma, mb = read_manifest(fa[rel].parent), read_manifest(fb[rel].parent)
        for m in (ma, mb):
            m.pop("created_unix")
            if not same_hash:
                m.pop("config_hash")
        assert ma == mb, rel


def _count_ranges(monkeypatch) -> list[int]:
    """Patches the per-range builders to count the key ranges built (full, append)."""
    calls = [0, 0]
    full, append = seq._full_part, seq._append_kind

    def counted_full(*a, **k):
        calls[0] += 1
        return full(*a, **k)

    def counted_append(*a, **k):
        calls[1] += 1
        return append(*a, **k)
    monkeypatch.setattr(seq, "_full_part", counted_full)
    monkeypatch.setattr(seq, "_append_kind", counted_append)
    return calls


@pytest.mark.parametrize("world_size", [1, 2])
def test_key_ranges_write_the_same_bytes(run_dir, tmp_path, monkeypatch, world_size):
    """Many key ranges (tiny batch_rows), several row groups per file and a merge of tiny blocks:
    the same bytes as one range, for user and item timelines, a full build and an append."""
    monkeypatch.setattr(seq, "ROW_GROUP_ROWS", 64)
    monkeypatch.setattr(seq, "_MERGE_ROWS", 16)
    calls = _count_ranges(monkeypatch)
    base = dict(keys=["user", "item"], max_len=4, window_days=1.0, keep_days=3)

    def build(out, append=False, **kw):
        for r in range(world_size):
            run_build_sequences(SequencesConfig(**base, **kw), run_dir / "compress", tmp_path / out, rank=r,
                                world_size=world_size, append_dir=tmp_path / out if append else None,
                                progress=False)

    build("one")
    assert calls == [2 * world_size, 0]  # one range per kind and rank
    build("many", batch_rows=60)
    assert calls[0] > 2 * world_size + 20
    _same_output(tmp_path / "one", tmp_path / "many")
    build("append", days=[1, 2], batch_rows=45)
    build("append", append=True, batch_rows=45)
    assert calls[1] > 20
    _same_output(tmp_path / "one", tmp_path / "append", same_hash=False)
    # The row groups are those of the whole table written at once (the code before ranges).
    for kind in ("user", "item"):
        folder = tmp_path / "one" / (cf.shard_dir(".", 1) if world_size > 1 else ".") / kind
        for path, options in [(folder / "timeline.parquet", {"use_dictionary": ["label"]}),
                              (folder / "examples" / "day=4.parquet", {"use_dictionary": False})]:
            whole = pa.BufferOutputStream()
            pq.write_table(pq.read_table(path), whole, row_group_size=64, **options)
            assert pq.ParquetFile(path).num_row_groups > 1
            assert whole.getvalue().to_pybytes() == path.read_bytes(), path


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(event_logs(max_rows=40), st.integers(1, 6), st.sampled_from([1, 2]))
def test_key_ranges_on_random_logs(monkeypatch, log, batch_rows, world_size):
    """Heavy keys, empty ranges, extreme int64 keys: any batch_rows, the same files."""
    monkeypatch.setattr(seq, "ROW_GROUP_ROWS", 5)
    monkeypatch.setattr(seq, "_MERGE_ROWS", 3)
    keys, ts, label, window, max_len, entry_labels = log
    n = len(keys)
    if n < 3:
        return
    day = (np.arange(n) * 3 // n + 1).astype(np.int32)
    cfg = dict(keys=["user", "item"], max_len=max_len, window_days=window / DAY, entry_labels=entry_labels,
               skip_unknown_keys=False)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_compress(tmp / "c", key=keys, ts=ts, label=label, day=day)
        for r in range(world_size):
            for out, kw in (("one", {}), ("many", dict(batch_rows=batch_rows)),
                            ("append", dict(batch_rows=batch_rows, days=[1, 2]))):
                run_build_sequences(SequencesConfig(**cfg, **kw), tmp / "c", tmp / out, rank=r,
                                    world_size=world_size, progress=False)
        for r in range(world_size):
            run_build_sequences(SequencesConfig(**cfg, batch_rows=batch_rows), tmp / "c", tmp / "append",
                                append_dir=tmp / "append", rank=r, world_size=world_size, progress=False)
        _same_output(tmp / "one", tmp / "many")
        _same_output(tmp / "one", tmp / "append", same_hash=False)


def test_key_sample_is_bounded_and_cuts_evenly():
    rng = np.random.default_rng(0)
    keys = rng.zipf(1.5, 100_000).astype(np.int64)  # key 1 alone holds about 40% of the rows
    eids = np.arange(len(keys), dtype=np.int64)
    sample = seq.KeySample(cap=1000)
    for chunk in np.array_split(np.arange(len(keys)), 37):
        sample.add(keys[chunk], eids[chunk])
    assert sample.size <= 1000 and sample.seen == len(keys)
    np.testing.assert_array_equal(np.concatenate([p[0] for p in sample.parts]), keys[::sample.stride])
    cuts = sample.cuts(10_000)  # inside heavy keys too: ranges of about batch_rows rows each
    order = np.lexsort((eids, keys))
    rank = np.empty(len(keys), np.int64)
    rank[order] = np.arange(len(keys))
    cut_rank = [int(rank[(keys == k) & (eids == e)][0]) for k, e in cuts]
    sizes = np.diff([0, *cut_rank, len(keys)])
    assert len(sizes) == 10 and sizes.max() < 15_000
    assert seq.KeySample().cuts(1) == []  # no rows, one (empty) range


def test_batch_rows_is_checked_and_not_hashed():
    with pytest.raises(ValueError, match="batch_rows"):
        SequencesConfig(batch_rows=0)
    assert seq.hash_payload(SequencesConfig(batch_rows=7)) == seq.hash_payload(SequencesConfig())
