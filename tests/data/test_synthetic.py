"""The synthetic TaobaoAd-like source: config checks, schema, determinism, days, CTR, Zipf skew,
histories, the prepared event log, and the planted signal (FM-only features must help)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from torch.nn import functional

from loopfm.data.eventlog import EventLog
from loopfm.data.prepare import prepare
from loopfm.data.sources.synthetic import SyntheticConfig, SyntheticSource

FM_ONLY = {"hist_cate_id", "hist_brand", "hist_btag", "xd_content_cate", "xd_views_7d", "xd_likes_7d"}
PROFILE = {"cms_segid", "cms_group_id", "gender", "age_level", "pvalue_level", "shopping_level",
           "occupation", "new_user_class_level"}
AD = {"adgroup_id", "cate_id", "campaign_id", "customer", "brand", "price"}
SIGNAL_ROWS = 80_000


def raw_table(cfg: SyntheticConfig, seed: int = 0, chunk_rows: int = 1_000_000) -> pa.Table:
    return pa.concat_tables(SyntheticSource(cfg, seed=seed, chunk_rows=chunk_rows).chunks())


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """One 80k-row dataset (histories of 30 to keep the file fast), generated in 30k-row chunks
    and prepared end to end."""
    cfg = SyntheticConfig(rows=SIGNAL_ROWS, history_len=30)
    out = tmp_path_factory.mktemp("synthetic") / "prepared"
    manifest = prepare(SyntheticSource(cfg, seed=0, chunk_rows=30_000), out, config_hash="test",
                       progress=False)
    return cfg, manifest, raw_table(cfg), EventLog(out)


# --- config and schema -------------------------------------------------------------------------

def test_config_defaults_and_derived_sizes():
    cfg = SyntheticConfig()
    assert cfg.rows == 200_000 and cfg.days == 8 and cfg.ctr == 0.05 and cfg.history_len == 50
    assert cfg.num_users == 5_000 and cfg.num_ads == 10_000
    assert SyntheticConfig(rows=1000).num_users == 25
    assert SyntheticConfig(rows=10_000, users=77, ads=300).num_users == 77
    for f in dataclasses.fields(SyntheticConfig):
        assert f.metadata.get("help"), f"field {f.name} has no help"


@pytest.mark.parametrize("kwargs, word", [
    (dict(rows=10), "rows"), (dict(ctr=0.0), "ctr"), (dict(ctr=1.5), "ctr"), (dict(days=0), "days"),
    (dict(start_date="May 6"), "start_date"), (dict(brands=10, categories=20), "brands"),
    (dict(users=-1), "users"), (dict(zipf_ads=-1.0), "zipf_ads"), (dict(session_events=0.5), "session"),
    (dict(history_len=0), "history_len"), (dict(rows=2000, users=3000), "users"),
])
def test_config_rejects_bad_values(kwargs, word):
    with pytest.raises(ValueError, match=word):
        SyntheticConfig(**kwargs)


def test_info_roles_and_fm_only():
    info = SyntheticSource(SyntheticConfig(rows=1000), seed=0, chunk_rows=100).info()
    assert (info.dataset, info.user_key, info.item_key) == ("synthetic", "user_id", "adgroup_id")
    assert info.days.kind == "calendar" and info.days.tz == "UTC"
    spec = {f.name: f for f in info.features}
    assert {n for n, f in spec.items() if f.fm_only} == FM_ONLY
    assert {n for n, f in spec.items() if f.role == "user"} == {"user_id"} | PROFILE | FM_ONLY
    assert {n for n, f in spec.items() if f.role == "item"} == AD
    assert {n for n, f in spec.items() if f.role == "context"} == {"pid"}
    assert spec["hist_cate_id"].vocab == "cate_id" and spec["hist_brand"].vocab == "brand"
    assert spec["hist_btag"].vocab is None and spec["xd_content_cate"].vocab is None
    assert spec["hist_cate_id"].max_len == 50 and spec["xd_content_cate"].max_len == 20
    assert {spec[n].group for n in ("hist_cate_id", "hist_brand", "hist_btag")} == {"history"}
    assert {spec[n].group for n in ("xd_content_cate", "xd_views_7d", "xd_likes_7d")} == {"cross_domain"}
    assert {spec[n].kind for n in ("price", "xd_views_7d", "xd_likes_7d")} == {"numeric"}
    assert all(f.description for f in info.features)


# --- determinism -------------------------------------------------------------------------------

def test_same_seed_same_rows_whatever_the_chunking():
    cfg = SyntheticConfig(rows=5_000)
    chunks = list(SyntheticSource(cfg, seed=3, chunk_rows=1_234).chunks())
    assert [c.num_rows for c in chunks] == [1_234] * 4 + [5_000 - 4 * 1_234]
    assert pa.concat_tables(chunks).equals(raw_table(cfg, seed=3))
    assert raw_table(cfg, seed=3).equals(raw_table(cfg, seed=3))


@pytest.mark.parametrize("chunk_rows", [1, 977, 4_096, 10_000_000])
def test_rows_independent_of_chunk_rows(chunk_rows):
    """Chunks straddle block and day boundaries; the concatenated rows never change."""
    cfg = SyntheticConfig(rows=4_000, days=3)
    chunks = list(SyntheticSource(cfg, seed=2, chunk_rows=chunk_rows).chunks())
    assert all(c.num_rows == chunk_rows for c in chunks[:-1]) and 0 < chunks[-1].num_rows <= chunk_rows
    assert pa.concat_tables(chunks).equals(raw_table(cfg, seed=2))


@pytest.mark.parametrize("slice_rows, user_block", [(None, None), (777, 5)])
def test_rows_pinned(monkeypatch, slice_rows, user_block):
    """A digest of a small draw, also with slices and user blocks far smaller than the arrays
    (they bound memory, never the rows); a change of the data model must change it on purpose."""
    import hashlib
    from loopfm.data.sources import synthetic

    if slice_rows:
        monkeypatch.setattr(synthetic, "SLICE_ROWS", slice_rows)
        monkeypatch.setattr(synthetic, "USER_BLOCK", user_block)
        monkeypatch.setattr(synthetic, "HISTORY_SLICE", 333)
    t = pa.concat_tables(SyntheticSource(SyntheticConfig(rows=3000), seed=7, chunk_rows=1000).chunks())
    h = hashlib.sha256()
    for name in t.column_names:
        h.update(name.encode())
        h.update(repr(t.column(name).to_pylist()).encode())
    assert h.hexdigest()[:16] == "c7aac5b2933bb6e7"


def test_different_seed_or_offset_different_rows():
    cfg = SyntheticConfig(rows=5_000)
    base = raw_table(cfg, seed=0)
    for other in (raw_table(cfg, seed=1), raw_table(SyntheticConfig(rows=5_000, seed_offset=1), seed=0)):
        assert not other.column("user_id").equals(base.column("user_id"))
        assert not other.column("ts").equals(base.column("ts"))


def test_prepared_event_logs_identical_for_same_seed(tmp_path):
    logs = []
    for name, chunk_rows in (("a", 2_000), ("b", 1_000_000)):
        prepare(SyntheticSource(SyntheticConfig(rows=3_000), seed=5, chunk_rows=chunk_rows),
                tmp_path / name, config_hash="test", progress=False)
        logs.append(EventLog(tmp_path / name))
    assert logs[0].read().equals(logs[1].read())
    assert logs[0].schema == logs[1].schema


# --- streaming: point-in-time histories and memory held between days --------------------------

def test_histories_match_brute_force_reference():
    """Every history (buffer of earlier days + the day's own earlier behaviours) equals the
    reference: all of the user's behaviours strictly before the impression, in (ts, draw) order,
    newest history_len of them. A short history_len makes the per-user buffer overflow."""
    cfg = SyntheticConfig(rows=3_000, users=40, days=3, history_len=8)
    behaviours: list[dict] = []
    source = SyntheticSource(cfg, seed=4, chunk_rows=10_000)
    t = pa.concat_tables(list(source.stream(record=behaviours).blocks()))
    b = {k: np.concatenate([r[k] for r in behaviours]) for k in ("user", "ts", "cat", "brand", "btag")}
    order = np.lexsort((np.arange(len(b["ts"])), b["ts"], b["user"]))  # (user, ts, draw order)
    b = {k: v[order] for k, v in b.items()}
    users = t.column("user_id").to_numpy() - 1
    ts = t.column("ts").to_numpy() - cfg.start_ts
    hist = {k: t.column(f"hist_{n}").to_pylist() for k, n in
            (("cat", "cate_id"), ("brand", "brand"), ("btag", "btag"))}
    full = 0
    for i in range(t.num_rows):
        mine = np.flatnonzero((b["user"] == users[i]) & (b["ts"] < ts[i]))[-cfg.history_len:]
        full += len(mine) == cfg.history_len
        for k in hist:
            assert hist[k][i] == b[k][mine].astype(int).tolist(), (i, k)
    assert full > t.num_rows / 2  # the buffer's truncation is exercised


def test_behaviours_lead_their_users_impressions():
    """In-period behaviours fall 1..300 s before an impression of their user on the same day
    (or at the day's start when that impression is earlier than 300 s into the day)."""
    cfg = SyntheticConfig(rows=3_000, days=3)
    behaviours: list[dict] = []
    t = pa.concat_tables(list(SyntheticSource(cfg, seed=1, chunk_rows=10_000).stream(behaviours).blocks()))
    users = t.column("user_id").to_numpy() - 1
    ts = t.column("ts").to_numpy() - cfg.start_ts
    assert np.all(behaviours[0]["ts"] < 0) and np.all(behaviours[0]["ts"] >= -14 * 86_400)
    assert len(behaviours) == 1 + cfg.days
    for d, day in enumerate(behaviours[1:]):
        assert len(day["ts"]) > 0 and np.all(day["ts"] // 86_400 == d)
        for u, tb in zip(day["user"], day["ts"]):
            lead = ts[users == u] - tb
            assert np.any((lead >= 1) & (lead <= 300)) or (tb % 86_400 == 0 and np.any(lead >= 0))


def _held_bytes_between_days(cfg: SyntheticConfig) -> list[int]:
    stream = SyntheticSource(cfg, seed=0, chunk_rows=10_000).stream()
    held, day = [stream.held_bytes()], None
    for block in stream.blocks():
        day_now = (block.column("ts")[0].as_py() - cfg.start_ts) // 86_400
        if day_now != day:
            held.append(stream.held_bytes())
            day = day_now
    return held


def test_state_held_between_days_does_not_grow_with_rows():
    """With users and ads fixed, 4x the rows leaves the arrays the generator carries from day to
    day (per-user and per-ad state, the history buffers) exactly as large."""
    small = _held_bytes_between_days(SyntheticConfig(rows=20_000, users=500, ads=1_000))
    large = _held_bytes_between_days(SyntheticConfig(rows=80_000, users=500, ads=1_000))
    assert len(small) == len(large) == 9
    assert len(set(small)) == 1 and small == large


def test_peak_memory_follows_one_day_not_all_rows(monkeypatch):
    """tracemalloc peak (numpy's allocations, the output blocks' buffers included) of generating
    4x the rows over 4x the days, same users, ads and rows per day: flat (measured 0.9x; the
    generator that held every row's time and every behaviour grew 3.0x here). β0's calibration
    sample is shrunk so that its fixed-size temporaries do not hide the rows' share."""
    import gc
    import tracemalloc

    from loopfm.data.sources import synthetic

    monkeypatch.setattr(synthetic, "CALIBRATION_PAIRS", 5_000)

    def peak(rows: int, days: int) -> int:
        cfg = SyntheticConfig(rows=rows, days=days, users=500, ads=1_000, history_len=20)
        gc.collect()
        tracemalloc.start()
        try:
            for _ in SyntheticSource(cfg, seed=0, chunk_rows=2_000).chunks():
                pass
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = peak(20_000, 2), peak(80_000, 8)
    assert large < 1.5 * small, (small, large)


# --- the prepared log --------------------------------------------------------------------------

def test_prepared_log_matches_raw_rows(prepared):
    cfg, manifest, raw, log = prepared
    assert manifest["rows"] == SIGNAL_ROWS == raw.num_rows == log.num_rows()
    assert log.days == list(range(1, 9))
    assert all(log.num_rows([d]) > SIGNAL_ROWS / 8 * 0.8 for d in log.days)
    events = log.read()
    # Raw chunks are already in time order, so example ids follow input order.
    np.testing.assert_array_equal(events.column("example_id").to_numpy(), np.arange(SIGNAL_ROWS))
    ts = events.column("ts").to_numpy()
    assert np.all(np.diff(ts) >= 0)
    np.testing.assert_array_equal(ts, raw.column("ts").to_numpy())
    assert ts.min() >= cfg.start_ts and ts.max() < cfg.start_ts + 8 * 86_400
    np.testing.assert_array_equal(events.column("day").to_numpy(), (ts - cfg.start_ts) // 86_400 + 1)
    np.testing.assert_array_equal(events.column("label").to_numpy(), raw.column("label").to_numpy())
    schema = log.schema
    assert {f.name for f in schema.vm_features()} == {f.name for f in schema.features} - FM_ONLY
    # Decode a few columns through their vocabularies and compare with the raw values.
    for name in ("user_id", "brand", "pvalue_level", "pid"):
        vocab = log.vocab(schema.feature(name).vocab_name).values.to_pylist()
        decoded = [vocab[i - 1] for i in events.column(name).to_numpy()[:2_000]]
        expect = [None if v is None else str(v) for v in raw.column(name).slice(0, 2_000).to_pylist()]
        assert decoded == expect, name
    vocab = log.vocab("cate_id").values.to_pylist()
    hist = events.column("hist_cate_id").slice(0, 500).to_pylist()
    assert [[vocab[i - 1] for i in h] for h in hist] == \
        [[str(v) for v in h[-cfg.history_len:]] for h in raw.column("hist_cate_id").slice(0, 500).to_pylist()]
    assert raw.column("brand").null_count > 0 and raw.column("pvalue_level").null_count > 0
    np.testing.assert_allclose(events.column("price").to_numpy(),
                               raw.column("price").to_numpy().astype(np.float32))


def test_ctr_and_zipf_skew(prepared):
    cfg, _, raw, _ = prepared
    assert 0.03 <= pc.mean(raw.column("label")).as_py() <= 0.08
    ads = np.sort(np.bincount(raw.column("adgroup_id").to_numpy()))[::-1]
    assert ads[: cfg.num_ads // 100].sum() / SIGNAL_ROWS > 0.4  # top 1% of ads: a big share
    users = np.sort(np.bincount(raw.column("user_id").to_numpy()))[::-1]
    assert users[: cfg.num_users // 100].sum() / SIGNAL_ROWS > 0.05
    assert np.mean(users[users > 0]) > 30  # users come back: ~40 impressions each
    cates = np.sort(np.bincount(raw.column("cate_id").to_numpy()))[::-1]
    assert cates[:10].sum() / SIGNAL_ROWS > 0.3


def test_histories_are_strictly_earlier_and_grow(prepared):
    cfg, _, raw, _ = prepared
    users = raw.column("user_id").to_numpy()
    lens = pc.list_value_length(raw.column("hist_cate_id")).to_numpy()
    assert lens.max() <= cfg.history_len and lens.mean() > cfg.history_len / 2
    assert np.array_equal(lens, pc.list_value_length(raw.column("hist_brand")).to_numpy())
    assert np.array_equal(lens, pc.list_value_length(raw.column("hist_btag")).to_numpy())
    order = np.lexsort((np.arange(len(users)), users))  # by user, then time
    same_user = users[order][1:] == users[order][:-1]
    assert np.all(np.diff(lens[order])[same_user] >= 0)  # more behaviours seen later
    btags = set(pc.unique(pc.list_flatten(raw.column("hist_btag"))).to_pylist())
    assert btags == {1, 2, 3, 4}
    xd = pc.list_value_length(raw.column("xd_content_cate")).to_numpy()
    assert xd.max() <= cfg.cross_domain_len and xd.mean() > cfg.cross_domain_len / 3


# --- the planted signal: FM-only features must carry information the VM features do not --------

def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Exact ROC AUC via average ranks (ties count one half)."""
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]
    pos = labels == 1
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _padded(col: pa.ChunkedArray, max_len: int) -> np.ndarray:
    arr = col.combine_chunks()
    offsets = arr.offsets.to_numpy()
    values = arr.values.to_numpy()
    lens = np.diff(offsets)
    out = np.zeros((len(lens), max_len), dtype=np.int64)
    rows = np.repeat(np.arange(len(lens)), lens)
    out[rows, np.arange(len(values)) - np.repeat(offsets[:-1], lens)] = values
    return out


class TinyFM(torch.nn.Module):
    """Second-order factorization machine over one shared id space.

    A sequence is mean-pooled as the sparse product ``W @ E[block]`` with ``W[b, v]`` = share of
    id ``v`` in row ``b``'s sequence, which is much cheaper to train on a CPU than an embedding-bag
    backward; numerics scale a learned vector.
    """

    def __init__(self, num_ids: int, num_numeric: int, dim: int = 8):
        super().__init__()
        self.emb = torch.nn.Embedding(num_ids, dim)
        self.lin = torch.nn.Embedding(num_ids, 1)
        torch.nn.init.normal_(self.emb.weight, std=0.01)
        torch.nn.init.zeros_(self.lin.weight)
        self.num_v = torch.nn.Parameter(torch.randn(num_numeric, dim) * 0.01)
        self.num_w = torch.nn.Parameter(torch.zeros(num_numeric))
        self.bias = torch.nn.Parameter(torch.tensor(-3.0))

    def forward(self, cat, seqs, num):
        vecs, lin = [self.emb(cat)], self.bias + self.lin(cat).sum((1, 2))
        for ids, share, (lo, size) in seqs:  # ids [B, L] ids within the vocabulary, share [B, L]
            rows = torch.arange(len(ids)).repeat_interleave(ids.shape[1])
            w = torch.sparse_coo_tensor(torch.stack([rows, ids.reshape(-1)]), share.reshape(-1),
                                        (len(ids), size), check_invariants=False)
            table = torch.cat([self.emb.weight[lo:lo + size], self.lin.weight[lo:lo + size]], 1)
            pooled = torch.sparse.mm(w, table)
            vecs.append(pooled[:, None, :-1])
            lin = lin + pooled[:, -1]
        if num.shape[1]:
            vecs.append(num[:, :, None] * self.num_v)
            lin = lin + num @ self.num_w
        v = torch.cat(vecs, 1)
        return lin + 0.5 * (v.sum(1).pow(2) - v.pow(2).sum(1)).sum(1)


def _fit_and_score(log: EventLog, use_fm_only: bool) -> float:
    """Train a TinyFM on days 1-7 and return its AUC on day 8."""
    schema = log.schema
    feats = [f for f in schema.features if use_fm_only or not f.fm_only]
    sizes, base, offset = schema.vocab_sizes(), {}, 0
    for f in feats:  # one id space; a history shares the rows of its target's vocabulary
        if f.vocab_name and f.vocab_name not in base:
            base[f.vocab_name] = offset
            offset += sizes[f.vocab_name]

    def tensors(days):
        t = log.read(days)
        cat = torch.from_numpy(np.stack([t.column(f.name).to_numpy() + base[f.vocab_name]
                                         for f in feats if f.kind == "categorical"], 1))
        seqs = []
        for f in feats:
            if f.kind == "sequence":
                ids = _padded(t.column(f.name), f.max_len)
                mask = (ids > 0).astype(np.float32)
                share = mask / np.maximum(mask.sum(1, keepdims=True), 1.0)
                seqs.append((torch.from_numpy(ids), torch.from_numpy(share),
                             (base[f.vocab_name], sizes[f.vocab_name])))
        num = np.stack([np.log1p(t.column(f.name).to_numpy().astype(np.float64))
                        for f in feats if f.kind == "numeric"], 1)
        label = torch.from_numpy(t.column("label").to_numpy().astype(np.float32))
        return cat, seqs, num, label

    cat, seqs, num, y = tensors(list(range(1, 8)))
    cat_t, seqs_t, num_t, y_t = tensors([8])
    mu, sd = num.mean(0), num.std(0) + 1e-6
    num, num_t = (torch.from_numpy(((x - mu) / sd).astype(np.float32)) for x in (num, num_t))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops: one thread is faster and steadier on a busy CPU
    try:
        torch.manual_seed(0)
        model = TinyFM(offset, num.shape[1])
        opt = torch.optim.Adam(model.parameters(), lr=0.02)
        for _ in range(2):
            for idx in torch.randperm(len(y)).split(2048):
                b_seqs = [(ids[idx], share[idx], block) for ids, share, block in seqs]
                loss = functional.binary_cross_entropy_with_logits(
                    model(cat[idx], b_seqs, num[idx]), y[idx])
                loss = loss + 1e-5 * model.emb(cat[idx]).pow(2).sum() / len(idx)
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            scores = model(cat_t, seqs_t, num_t).numpy()
    finally:
        torch.set_num_threads(threads)
    return auc(y_t.numpy(), scores)


def test_fm_only_features_carry_extra_signal(prepared):
    _, _, _, log = prepared
    vm_auc = _fit_and_score(log, use_fm_only=False)
    fm_auc = _fit_and_score(log, use_fm_only=True)
    assert vm_auc > 0.58, vm_auc  # the VM-visible features carry real signal
    assert fm_auc > vm_auc + 0.02, (vm_auc, fm_auc)  # and the FM-only ones clearly add to it


def test_auc_helper():
    assert auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert auc(np.array([0, 1, 0, 1]), np.array([0.5, 0.5, 0.5, 0.5])) == 0.5
    assert auc(np.array([1, 0, 1, 0]), np.array([0.1, 0.2, 0.3, 0.4])) == 0.25
