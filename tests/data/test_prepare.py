"""The source-independent part of prepare: order, ids, days, vocabularies, atomic output."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pyarrow as pa
import pytest

from loopfm.data.errors import DataError
from loopfm.data.eventlog import EventLog
from loopfm.data.prepare import prepare
from loopfm.data.schema import FeatureSpec
from loopfm.data.source import DayRule, SourceInfo
from loopfm.lock import run_lock

REPO = Path(__file__).resolve().parents[2]


class ToySource:
    """Random events; optionally shuffled (input not in time order) or failing mid-way."""

    def __init__(self, n=1000, *, shuffled=False, days=DayRule("equal_count", 4), ts=None,
                 chunk=300, fail_at_chunk=None, seed=0):
        self.n, self.shuffled, self.days, self.chunk = n, shuffled, days, chunk
        self.fail_at_chunk, self.seed, self.skipped = fail_at_chunk, seed, {}
        self.ts = ts

    def info(self):
        return SourceInfo("toy", "uid", "iid", [
            FeatureSpec("uid", "categorical", "user"),
            FeatureSpec("iid", "categorical", "item"),
            FeatureSpec("price", "numeric", "item"),
            FeatureSpec("hist", "sequence", "user", vocab="iid", max_len=3, fm_only=True),
        ], self.days)

    def chunks(self):
        rng = np.random.default_rng(self.seed)
        ts = self.ts if self.ts is not None else np.arange(self.n) * 600 + 1_700_000_000
        if self.shuffled:
            ts = rng.permutation(ts)
        for k, s in enumerate(range(0, len(ts), self.chunk)):
            if k == self.fail_at_chunk:
                raise DataError("boom", file="toy.csv", row=s + 2, column="iid")
            e = min(s + self.chunk, len(ts))
            yield pa.table({
                "ts": ts[s:e], "label": rng.integers(0, 2, e - s),
                "uid": rng.integers(0, 50, e - s),
                "iid": [f"i{x}" for x in rng.zipf(1.5, e - s) % 30],
                "price": rng.random(e - s),
                "hist": [[f"i{x}" for x in rng.integers(0, 40, rng.integers(0, 6))] for _ in range(e - s)],
            })


def _raw(source) -> pa.Table:
    return pa.concat_tables(list(source.chunks()))


@pytest.mark.parametrize("shuffled", [False, True])
def test_time_order_ids_and_equal_count_days(tmp_path, shuffled):
    manifest = prepare(ToySource(shuffled=shuffled), tmp_path / "out", config_hash="h", progress=False)
    log = EventLog(tmp_path / "out")
    t = log.read()
    assert t.column_names[:4] == ["example_id", "ts", "day", "label"]
    np.testing.assert_array_equal(t.column("example_id").to_numpy(), np.arange(1000))
    assert np.all(np.diff(t.column("ts").to_numpy()) >= 0)
    assert manifest["rows_per_day"] == {"1": 250, "2": 250, "3": 250, "4": 250}
    assert manifest["config_hash"] == "h" and log.schema.num_days == 4
    assert t.schema.field("label").type == pa.int8() and t.schema.field("day").type == pa.int32()
    assert t.schema.field("price").type == pa.float32()
    assert sorted(t.column("ts").to_pylist()) == sorted(_raw(ToySource(shuffled=shuffled)).column("ts").to_pylist())


def test_equal_count_ties_follow_input_order(tmp_path):
    ts = np.full(8, 1_700_000_000)  # all at the same second: input order decides
    prepare(ToySource(8, ts=ts, days=DayRule("equal_count", 2), chunk=3), tmp_path / "o",
            config_hash="h", progress=False)
    t = EventLog(tmp_path / "o").read()
    raw = _raw(ToySource(8, ts=ts, chunk=3))
    assert t.column("price").to_pylist() == pytest.approx(raw.column("price").to_pylist())
    assert t.column("day").to_pylist() == [1, 1, 1, 1, 2, 2, 2, 2]


def test_calendar_days_follow_local_midnight_across_dst(tmp_path):
    tz = ZoneInfo("America/New_York")
    # Hourly events from 2024-03-09 00:30 to 2024-03-12 (DST starts 2024-03-10 02:00 local).
    start = int(datetime(2024, 3, 9, 0, 30, tzinfo=tz).timestamp())
    ts = np.arange(start, start + 3 * 86400, 3600)
    prepare(ToySource(len(ts), ts=ts, days=DayRule("calendar", tz="America/New_York")),
            tmp_path / "o", config_hash="h", progress=False)
    t = EventLog(tmp_path / "o").read()
    expected = [(datetime.fromtimestamp(int(x), tz).date() - datetime(2024, 3, 9).date()).days + 1
                for x in t.column("ts").to_numpy()]
    assert t.column("day").to_pylist() == expected
    assert set(expected) == {1, 2, 3, 4}


def test_vocab_padding_oov_min_count_and_shared_table(tmp_path):
    src = ToySource(2000)
    prepare(src, tmp_path / "o", min_count=5, config_hash="h", progress=False)
    log = EventLog(tmp_path / "o")
    raw = _raw(ToySource(2000))
    iid = log.schema.feature("iid")
    hist = log.schema.feature("hist")
    assert hist.vocab_name == "iid" and hist.vocab_size == iid.vocab_size
    vocab = log.vocab("iid")
    counts = {}
    for v in raw.column("iid").to_pylist() + [x for h in raw.column("hist").to_pylist() for x in h]:
        counts[v] = counts.get(v, 0) + 1
    kept = sorted((v for v, c in counts.items() if c >= 5), key=lambda v: (-counts[v], v))
    assert vocab.values.to_pylist() == kept  # most frequent first, ties by value
    assert iid.vocab_size == len(kept) + 2 and iid.oov_id == len(kept) + 1
    # Decode: event-log ids map back to the raw values (rare values -> OOV), by time order.
    t = log.read()
    lookup = {v: i + 1 for i, v in enumerate(kept)}
    order = np.argsort(raw.column("ts").to_numpy(), kind="stable")
    raw_iid = np.array(raw.column("iid").to_pylist(), dtype=object)[order]
    assert t.column("iid").to_pylist() == [lookup.get(v, iid.oov_id) for v in raw_iid]
    assert min(t.column("iid").to_pylist()) >= 1  # 0 is padding only


def test_sequences_keep_the_newest_max_len(tmp_path):
    prepare(ToySource(400), tmp_path / "o", config_hash="h", progress=False)
    log = EventLog(tmp_path / "o")
    vocab = log.vocab("iid")
    decode = {i + 1: v for i, v in enumerate(vocab.values.to_pylist())}
    raw = _raw(ToySource(400)).column("hist").to_pylist()
    got = log.read().column("hist").to_pylist()
    for r, g in zip(raw, got):
        assert [decode[x] for x in g] == r[-3:]


def test_bad_label_names_row_and_column(tmp_path):
    class BadLabel(ToySource):
        def chunks(self):
            for k, c in enumerate(super().chunks()):
                if k == 1:
                    c = c.set_column(1, "label", pa.array([0] * 10 + [2] + [0] * (c.num_rows - 11)))
                yield c
    with pytest.raises(DataError, match=r"column 'label': event #311 of the toy source: expected a label 0 or 1, got 2"):
        prepare(BadLabel(), tmp_path / "o", config_hash="h", progress=False)
    assert not (tmp_path / "o").exists() and list(tmp_path.iterdir()) == []


def test_failed_rebuild_leaves_the_old_output_and_no_temp(tmp_path):
    prepare(ToySource(), tmp_path / "o", config_hash="old", progress=False)
    with pytest.raises(DataError, match="toy.csv, row 602, column 'iid': boom"):
        prepare(ToySource(fail_at_chunk=2), tmp_path / "o", config_hash="new", progress=False)
    assert EventLog(tmp_path / "o").manifest["config_hash"] == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["o"]


def test_same_input_same_bytes(tmp_path):
    for name in ("a", "b"):
        prepare(ToySource(shuffled=True), tmp_path / name, config_hash="h", progress=False)
    a = EventLog(tmp_path / "a").read()
    b = EventLog(tmp_path / "b").read()
    assert a.equals(b)
    for f in (tmp_path / "a" / "events").rglob("*.parquet"):
        assert f.read_bytes() == (tmp_path / "b" / f.relative_to(tmp_path / "a")).read_bytes()


def test_killed_prepare_leaves_no_success_and_is_cleaned_up(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO / 'tests' / 'data')!r})
        from test_prepare import ToySource
        from loopfm.data.prepare import prepare
        class Slow(ToySource):
            def chunks(self):
                for c in super().chunks():
                    print("chunk", flush=True)
                    yield c
                    time.sleep(60)
        prepare(Slow(), {str(tmp_path / 'o')!r}, config_hash="h", progress=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "chunk"
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "o").exists()
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".o.tmp-")
    prepare(ToySource(), tmp_path / "o", config_hash="h", progress=False)  # no lock: temps are not ours to clean
    assert len([p for p in tmp_path.iterdir() if p.name.startswith(".o.tmp-")]) == 1
    with run_lock(tmp_path):  # the run folder's lock holder removes them
        prepare(ToySource(), tmp_path / "o", config_hash="h", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "o"]
    assert (tmp_path / "o" / "_SUCCESS").is_file()


@pytest.mark.parametrize("days", [DayRule("equal_count", 4), DayRule("calendar", tz="America/New_York")])
def test_streamed_in_order_prepare_equals_the_global_sort(tmp_path, monkeypatch, days):
    """Time-ordered input numbered chunk by chunk, encoded a few rows at a time: the same rows,
    ids and days as ordering all rows at once; and the same part files and row groups as one
    encoding pass per chunk."""
    import pyarrow.parquet as pq
    from loopfm.data import prepare as prep

    start = int(datetime(2024, 3, 9, 20, 0, tzinfo=ZoneInfo("America/New_York")).timestamp())
    src = dict(n=1000, ts=start + np.arange(1000) * 300, days=days, chunk=300)
    prepare(ToySource(**src), tmp_path / "one", config_hash="h", progress=False)
    monkeypatch.setattr(prep, "ENCODE_ROWS", 7)
    monkeypatch.setattr(prep, "ROW_GROUP_ROWS", 16)
    prepare(ToySource(**src), tmp_path / "small", config_hash="h", progress=False)
    real_stage = prep._stage
    monkeypatch.setattr(prep, "_stage", lambda *a, **k: real_stage(*a, **k)[:2] + (False,))  # global sort
    prepare(ToySource(**src), tmp_path / "sorted", config_hash="h", progress=False)
    one, small, srt = (EventLog(tmp_path / n) for n in ("one", "small", "sorted"))
    assert one.manifest["rows_per_day"] == small.manifest["rows_per_day"] == srt.manifest["rows_per_day"]
    assert one.schema.num_days == small.schema.num_days == srt.schema.num_days == len(one.days) > 1
    assert one.read().equals(small.read()) and one.read().equals(srt.read())
    assert [p.name for p in one.files()] == [p.name for p in small.files()]
    assert len(one.files()) > len(one.days)  # chunks straddle days: several parts per day
    for a, b in zip(one.files(), small.files()):
        assert pq.read_table(a).equals(pq.read_table(b))
        groups = [pq.ParquetFile(b).metadata.row_group(i).num_rows for i in range(pq.ParquetFile(b).metadata.num_row_groups)]
        assert all(g == 16 for g in groups[:-1]) and 0 < groups[-1] <= 16
