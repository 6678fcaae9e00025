"""The point-in-time rule (loopfm.data.history): in memory, streamed, with windows and entry filters,
against a brute-force reference."""
import numpy as np
import pyarrow as pa
import pytest

from loopfm.data.history import StreamingHistories, Timeline, history_lists, timeline_order


def brute(keys, ts, max_len, window=None, entry=None):
    out = []
    for q in range(len(ts)):
        hist = [i for i in range(len(ts)) if keys[i] == keys[q] and ts[i] < ts[q]
                and (window is None or ts[i] >= ts[q] - window) and (entry is None or entry[i])]
        hist.sort(key=lambda i: (ts[i], i))
        out.append(hist[len(hist) - max_len:] if len(hist) > max_len else hist)
    return out


def _log(seed, n=300):
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, 12, n)
    ts = np.sort(rng.integers(0, 60, n))  # many ties at the same second
    entry = rng.random(n) < 0.6
    return keys, ts, entry


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("filtered", [False, True])
def test_in_memory_and_streamed_match_brute_force(seed, window, filtered):
    keys, ts, entry = _log(seed)
    entry = entry if filtered else None
    max_len = 1 + seed * 2
    ref = brute(keys, ts, max_len, window, entry)
    rows = pa.array(np.arange(len(ts)))
    # in memory, rows shuffled (input order need not be time order)
    perm = np.random.default_rng(seed).permutation(len(ts))
    got = history_lists(pa.array([f"u{k}" for k in keys[perm]]), ts[perm], [rows.take(pa.array(perm))],
                        max_len, window=window, is_entry=None if entry is None else entry[perm])[0].to_pylist()
    ref_perm = brute(keys[perm], ts[perm], max_len, window, None if entry is None else entry[perm])
    assert got == [[int(perm[i]) for i in h] for h in ref_perm]
    # streamed in uneven chunks, ties split across chunk borders
    stream = StreamingHistories(max_len, window=window)
    out = []
    cuts = [0, 1, 37, 38, 150, 299, len(ts)]
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        part = stream.update(pa.array([f"u{k}" for k in keys[lo:hi]]), ts[lo:hi], {"row": rows[lo:hi]},
                             None if entry is None else entry[lo:hi])
        out += part["row"].to_pylist()
    assert out == ref
    assert stream._carry.num_rows <= 12 * (max_len + 60)  # bounded by keys x (max_len + ties)


def test_dense_time_ranks_agree():
    keys, ts, _ = _log(9)
    ts = ts * 10**12  # a span that forces dense ranks with many keys
    order = timeline_order(keys, ts)
    a = Timeline(keys[order], ts[order]).bounds(keys, ts, max_len=4, window=3 * 10**12)
    b = Timeline(keys[order], ts[order], limit=1).bounds(keys, ts, max_len=4, window=3 * 10**12)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_streaming_refuses_rows_out_of_time_order():
    s = StreamingHistories(3)
    s.update(pa.array([1, 2]), np.array([5, 6]), {"v": pa.array([1, 2])})
    with pytest.raises(ValueError, match="time order"):
        s.update(pa.array([1]), np.array([4]), {"v": pa.array([1])})
