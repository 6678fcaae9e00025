"""Vocabularies: raw value -> id, 0 = padding, 1..n = values seen at least ``min_count`` times
(most frequent first, ties by the value's text, so ids are deterministic), n+1 = out-of-vocabulary.
A missing value (null) is a value of its own.

Saved as ``OUT/vocab/<name>.parquet`` with columns ``value`` (string; null = missing),
``id`` (int64), ``count`` (int64); padding and OOV are implicit (``vocab_size = n + 2``).
In memory the values keep their key type (int64 when every column sharing the vocabulary is
an integer column, else string) so counting and encoding never format integers as text.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


class VocabCounter:
    """Accumulates value counts over chunks of one key type."""

    def __init__(self, key_type: pa.DataType = pa.string()) -> None:
        self.key_type = key_type
        self.counts: Counter = Counter()

    def update(self, values: pa.Array | pa.ChunkedArray) -> None:
        if len(values) == 0:
            return
        vc = pc.value_counts(values)
        self.counts.update(dict(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist())))

    def build(self, min_count: int) -> "Vocab":
        kept = [(v, c) for v, c in self.counts.items() if c >= min_count]
        kept.sort(key=lambda vc: (-vc[1], vc[0] is None, str(vc[0])))
        return Vocab(pa.array([v for v, _ in kept], type=self.key_type), [c for _, c in kept])


class Vocab:
    def __init__(self, values: pa.Array | list, counts: list[int] | None = None) -> None:
        self.values = values if isinstance(values, pa.Array) else pa.array(values, type=pa.string())
        self.counts = counts if counts is not None else [0] * len(self.values)

    @property
    def size(self) -> int:
        """Number of ids including padding (0) and OOV (last)."""
        return len(self.values) + 2

    @property
    def oov_id(self) -> int:
        return len(self.values) + 1

    def encode(self, values: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Map values to int64 ids; unseen values get the OOV id (null matches a null entry)."""
        if values.type != self.values.type:
            values = values.cast(self.values.type)
        idx = pc.index_in(values, value_set=self.values, skip_nulls=False)
        ids = pc.add(idx.cast(pa.int64()), 1)
        return pc.fill_null(ids, self.oov_id).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)

    def save(self, path: str | Path) -> None:
        table = pa.table({
            "value": self.values.cast(pa.string()),
            "id": pa.array(np.arange(1, len(self.values) + 1, dtype=np.int64)),
            "count": pa.array(self.counts, type=pa.int64()),
        })
        pq.write_table(table, path)

    @classmethod
    def load(cls, path: str | Path) -> "Vocab":
        table = pq.read_table(path)
        return cls(table.column("value").combine_chunks(), table.column("count").to_pylist())
