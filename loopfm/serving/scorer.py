"""Scoring one request: raw values -> ids, the key's codes from the store as of the request time,
the exported VM. The HTTP server and `serve-check` both call `Scorer.score`, so what the check
verifies is what the server computes.

Request (a dict, as parsed from JSON)::

    {"user": "<raw user value>", "ts": <unix seconds, default now>,
     "features": {<name>: <raw>, ...},              optional: shared by every item (user, context)
     "items": [{"<item key>": "<raw>", <name>: <raw>, ...}, ...]}

Every VM-visible feature is looked up in the item first, then in ``features``; the user key may
come from ``user``. A categorical value is matched as text against its vocabulary (null =
missing, a value of its own); an unseen or absent one gets the OOV id. A sequence-kind feature is
a list of raw values, newest last. Numeric features are required numbers. ``item_id`` is accepted
for the item key. Response: ``{"scores": [...], "sequence_length": n}``.
"""
from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

from loopfm.codes.inputs import sequence_inputs
from loopfm.serving.bundle import Bundle
from loopfm.serving.store import TimelineStore

MAX_ITEMS = 10_000
_MISSING = object()  # a feature the request does not give


class RequestError(ValueError):
    """A malformed request (the server answers 400 with this message)."""


class Scorer:
    def __init__(self, bundle: Bundle, store: TimelineStore | None) -> None:
        if bundle.uses_sequence and store is None:
            raise ValueError(f"{bundle.manifest['name']} reads LoopFM sequences: it needs a store")
        self.bundle, self.store = bundle, store
        self.user_key, self.item_key = bundle.manifest["user_key"], bundle.manifest["item_key"]

    def check_store(self) -> None:
        """Raise ValueError when the store holds other codes than the bundle reads (StoreUnavailable: down)."""
        if not self.bundle.uses_sequence:
            return
        meta = self.store.meta()
        seq = self.bundle.sequence
        if not meta:
            raise ValueError(f"{self.store.url} holds no timelines: run `loopfm store load` first")
        if meta["key_kind"] != seq["key"] or int(meta["code_bytes"]) != self.bundle.spec.code_bytes:
            raise ValueError(f"{self.store.url} holds {meta['key_kind']} timelines of {meta['code_bytes']}-byte codes; "
                             f"the bundle reads {seq['key']} timelines of {self.bundle.spec.code_bytes}-byte codes")

    # -- request -> tensors -------------------------------------------------------------------------
    def score(self, request: Any) -> dict:
        if not isinstance(request, dict):
            raise RequestError("the request body must be a JSON object")
        unknown = set(request) - {"user", "ts", "items", "features"}
        if unknown:
            raise RequestError(f"unknown request fields {sorted(unknown)}; expected user, ts, items, features")
        items = request.get("items")
        if not isinstance(items, list) or not items:
            raise RequestError("'items' must be a non-empty list of objects")
        if len(items) > MAX_ITEMS:
            raise RequestError(f"'items' holds {len(items)} entries; at most {MAX_ITEMS} per request")
        ts = request.get("ts", None)
        if ts is None:
            ts = int(time.time())
        if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts):
            raise RequestError(f"'ts' must be unix seconds (a number), got {ts!r}")
        shared = request.get("features", {})
        if not isinstance(shared, dict):
            raise RequestError("'features' must be an object of feature name -> raw value")
        shared = dict(shared)
        if "user" in request:
            shared.setdefault(self.user_key, request["user"])
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise RequestError(f"items[{i}] must be an object, got {type(item).__name__}")
        return self._score_items(items, shared, int(ts))

    def _column(self, items: list[dict], shared: dict, name: str) -> list:
        """The raw values of feature ``name`` over the items (item first, then shared; else missing)."""
        alias = "item_id" if name == self.item_key else None
        default = shared.get(name, _MISSING)
        return [it[name] if name in it else (it[alias] if alias in it else default) for it in items]

    def _ids(self, raws: list, name: str) -> list[int]:
        vocab = self.bundle.vocab_of(name) if name in self.bundle.features else self.bundle.key_vocab
        ids, oov = vocab.ids, vocab.oov_id
        out = []
        for i, raw in enumerate(raws):
            if raw is _MISSING or raw is None:
                out.append(oov if raw is _MISSING else ids.get(None, oov))
            elif isinstance(raw, (dict, list)):
                raise RequestError(f"items[{i}].{name}: expected one value, got {type(raw).__name__}")
            else:
                out.append(ids.get(raw if isinstance(raw, str) else str(raw), oov))
        return out

    def _score_items(self, items: list[dict], shared: dict, ts: int) -> dict:
        b, n = self.bundle, len(items)
        lay = b.layout
        sparse = torch.tensor([self._ids(self._column(items, shared, c), c) for c in lay.categorical],
                              dtype=torch.long).reshape(len(lay.categorical), n).T
        numeric = []
        for name in lay.numeric:
            column = self._column(items, shared, name)
            for i, raw in enumerate(column):
                if raw is _MISSING or isinstance(raw, bool) or not isinstance(raw, (int, float)):
                    raise RequestError(f"items[{i}].{name}: a number is required, got "
                                       f"{'nothing' if raw is _MISSING else repr(raw)}")
            numeric.append(column)
        dense = torch.tensor(numeric, dtype=torch.float32).reshape(len(lay.numeric), n).T
        bags = torch.zeros(n, sum(m for _, m in lay.bags), dtype=torch.long)
        bag_lengths = torch.zeros(n, len(lay.bags), dtype=torch.int32)
        start = 0
        for j, (name, max_len) in enumerate(lay.bags):
            for i, raw in enumerate(self._column(items, shared, name)):
                raw = [] if raw is _MISSING or raw is None else raw
                if not isinstance(raw, list):
                    raise RequestError(f"items[{i}].{name}: expected a list of values (newest last)")
                ids = self._ids(raw[-max_len:], name)
                bags[i, start:start + len(ids)] = torch.tensor(ids, dtype=torch.long)
                bag_lengths[i, j] = len(ids)
            start += max_len
        raw_keys = self._column(items, shared, b.key_feature)
        keys = [0 if raw is _MISSING else k for raw, k in zip(raw_keys, self._ids(raw_keys, b.key_feature))]
        seq, lengths, deltas, seq_len = self._sequences(keys, ts)
        with torch.no_grad():
            scores = b.program(sparse, dense, bags, bag_lengths, seq, lengths, deltas)
        return {"scores": scores.double().tolist(), "sequence_length": seq_len}

    def _sequences(self, keys: list[int], ts: int):
        """Padded sequences of the rows' keys as of ``ts`` (one store read per distinct key)."""
        b, n = self.bundle, len(keys)
        if not b.uses_sequence:
            return torch.zeros(n, 1, 1, dtype=torch.uint8), torch.zeros(n, dtype=torch.int32), torch.zeros(n, 1), 0
        L, window = int(b.sequence["max_len"]), int(b.sequence["window_s"])
        code_bytes = b.spec.code_bytes
        unique = sorted(set(keys))
        codes = np.zeros((len(unique), L, code_bytes), np.uint8)
        deltas = np.zeros((len(unique), L), np.int64)
        lengths = np.zeros(len(unique), np.int32)
        for u, key in enumerate(unique):
            e_ts, e_codes = self.store.read(key, ts, window, L)
            k = len(e_ts)
            if k:
                codes[u, :k] = e_codes
                deltas[u, :k] = ts - e_ts
            lengths[u] = k
        # one decode per distinct key; the rows share it (broadcast when there is one key)
        inputs = sequence_inputs(b.spec, codes, lengths, deltas)
        seq = inputs["packed"] if "packed" in inputs else inputs["values"]
        if len(unique) == 1:  # one user x N candidates: no copies
            return (seq.expand(n, *seq.shape[1:]), inputs["lengths"].expand(n), inputs["deltas"].expand(n, L),
                    int(lengths[0]))
        rows = torch.from_numpy(np.searchsorted(unique, keys))
        return seq[rows], inputs["lengths"][rows], inputs["deltas"][rows], int(lengths.max())
