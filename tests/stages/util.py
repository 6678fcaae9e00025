"""Helpers for the stage tests: toy event logs, fabricated stage outputs, a brute-force reference."""
from __future__ import annotations

from pathlib import Path

from typing import Sequence

import numpy as np

from loopfm.artifacts import atomic_output, write_manifest
from loopfm.data.eventlog import EventLog
from loopfm.data.prepare import prepare
from loopfm.stages import codes_format as cf
from tests.data.test_prepare import ToySource


def toy_event_log(root: Path, n: int = 1000, seed: int = 0) -> Path:
    """A prepared toy event log (4 equal-count days, 50 users, events every 10 minutes)."""
    out = root / "events"
    prepare(ToySource(n, seed=seed), out, config_hash="toy", progress=False)
    return out


def make_compress(out: Path, *, key: np.ndarray, ts: np.ndarray, label: np.ndarray, day: np.ndarray,
                  item: np.ndarray | None = None, code_bytes: int = 4, seed: int = 0,
                  key_vocab_size: dict | None = None) -> dict:
    """A compress output straight from arrays (rows must be in example-id = time order)."""
    n = len(key)
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, (n, code_bytes), dtype=np.uint8)
    meta = {"example_id": np.arange(n), "ts": ts, "day": day, "label": label, "user_key": key,
            "item_key": item if item is not None else rng.integers(0, 5, n), "soft_label": np.zeros(n)}
    rows_per_day = {}
    with atomic_output(out) as tmp:
        for d in np.unique(day):
            sel = day == d
            cf.write_packed(tmp, int(d), 0, {k: np.asarray(v)[sel] for k, v in meta.items()}, codes[sel])
            rows_per_day[str(int(d))] = int(sel.sum())
        return write_manifest(tmp, stage="compress", config_hash=f"arrays-{seed}", quantizer="int4",
                              dim=2 * code_bytes, code_bytes=code_bytes, codebook=None,
                              rows_per_day=rows_per_day, user_key="uid", item_key="iid",
                              key_vocab_size=key_vocab_size)


def brute_force(key, ts, label, window, max_len, entry_labels="all", queries=None):
    """Reference sequences (lists of row indices = example ids), one example at a time."""
    key, ts, label = np.asarray(key), np.asarray(ts), np.asarray(label)
    ok = {"all": np.ones(len(key), bool), "positive": label == 1, "negative": label == 0}[entry_labels]
    out = []
    for q in range(len(key)) if queries is None else queries:
        cand = [i for i in range(len(key))
                if key[i] == key[q] and ts[i] < ts[q] and ts[i] >= ts[q] - window and ok[i]]
        cand.sort(key=lambda i: (ts[i], i))
        out.append(cand[len(cand) - max_len:] if len(cand) > max_len else cand)
    return out


def fabricate_extract(event_log: str | Path, out: str | Path, *, dim: int = 16, kind: str = "codes",
                      seed: int = 0, days: Sequence[int] | None = None, rows_per_part: int = 1 << 20) -> dict:
    """An extract output for an event log, with random codes instead of an FM (tests, benchmarks).

    ``kind="codes"``: tanh(N(0, 1.5²)) codes, bunched near ±1 like a trained tanh encoder's.
    ``kind="raw"``: unbounded activations with a decaying spectrum (for the PCA path).
    ``kind="soft_label"``: the 1-d code 2p - 1 of the random soft labels (``dim`` must be 1).
    """
    if kind not in cf.KINDS:
        raise ValueError(f"kind must be one of {cf.KINDS}, got {kind!r}")
    if kind == "soft_label" and dim != 1:
        raise ValueError(f"kind='soft_label' codes are 1-d, got dim={dim}")
    log = EventLog(event_log)
    days = list(days) if days is not None else log.days
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(dim, dim)) * (0.7 ** np.arange(dim))[:, None]
    rows_per_day = {}
    with atomic_output(out) as tmp:
        for day in days:
            t = log.read([day], ["example_id", "ts", "day", "label", log.schema.user_key, log.schema.item_key])
            n = t.num_rows
            meta = {c: t.column(c).to_numpy() for c in ("example_id", "ts", "day", "label")}
            meta["user_key"] = t.column(log.schema.user_key).to_numpy()
            meta["item_key"] = t.column(log.schema.item_key).to_numpy()
            meta["soft_label"] = rng.random(n, dtype=np.float32)
            g = rng.normal(size=(n, dim))
            z = np.tanh(1.5 * g) if kind == "codes" else 3.0 * (g @ mix) + 0.5
            if kind == "soft_label":
                z = 2.0 * meta["soft_label"][:, None] - 1.0
            for part, s in enumerate(range(0, max(n, 1), rows_per_part)):
                cf.write_codes(tmp, day, part, {k: v[s:s + rows_per_part] for k, v in meta.items()},
                            z[s:s + rows_per_part])
            rows_per_day[str(day)] = n
        return write_manifest(tmp, stage="extract", config_hash=f"fabricated-{seed}", dim=dim, kind=kind,
                              taps=["fabricated"], rows_per_day=rows_per_day,
                              user_key=log.schema.user_key, item_key=log.schema.item_key,
                              key_vocab_size={"user_key": log.schema.feature(log.schema.user_key).vocab_size,
                                              "item_key": log.schema.feature(log.schema.item_key).vocab_size})
