"""FM batches: built vectorised from event-log record batches, sharded by rank.

A *global batch* is ``G`` consecutive rows of one day (a batch never spans two days); rank ``r``
of ``W`` takes rows ``[r*G/W, (r+1)*G/W)``, so one process and two processes see exactly the same
global batches. The last global batch of a day is padded to ``G`` with rows of weight 0 (ids 0,
empty histories), so every rank always holds ``G/W`` rows and every collective sees equal sizes;
``Batch.norm`` (the number of real rows in the global batch) normalises the loss so that the
summed gradient over ranks is the global-batch mean.

No per-row Python: ids come from Arrow columns as numpy arrays, list columns give their
lengths (`pyarrow.compute.list_value_length`) and flat values in one call each.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from loopfm.data.eventlog import EventLog
from loopfm.fm.features import FeatureLayout


@dataclass
class Batch(Pipelineable):
    """One rank's slice of a global batch (what `FoundationModel.forward` takes)."""
    dense: torch.Tensor  # [B, n_numeric] float32
    sparse: KeyedJaggedTensor  # EmbeddingBagCollection features
    seq: KeyedJaggedTensor  # EmbeddingCollection features
    labels: torch.Tensor  # [B] float32
    weights: torch.Tensor  # [B] float32, 0 for padding rows
    norm: torch.Tensor  # [] float32, real rows in the global batch

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return Batch(*(getattr(self, f).to(device=device, non_blocking=non_blocking) for f in _FIELDS))

    def record_stream(self, stream: torch.Stream) -> None:
        for f in _FIELDS:
            getattr(self, f).record_stream(stream)

    def pin_memory(self) -> "Batch":
        return Batch(*(getattr(self, f).pin_memory() for f in _FIELDS))

    @property
    def size(self) -> int:
        return int(self.labels.shape[0])


_FIELDS = ("dense", "sparse", "seq", "labels", "weights", "norm")


def global_batches(log: EventLog, days: Sequence[int], batch_size: int,
                   columns: Sequence[str]) -> Iterator[tuple[int, pa.Table]]:
    """``(day, table)`` of ``batch_size`` rows (fewer at a day's end), in time order."""
    for day in days:
        buf: list[pa.RecordBatch] = []
        n = 0
        for rb in log.iter_batches([day], batch_size=batch_size, columns=columns):
            buf.append(rb)
            n += rb.num_rows
            while n >= batch_size:
                table = pa.Table.from_batches(buf)
                yield day, table.slice(0, batch_size)
                rest = table.slice(batch_size)
                buf, n = rest.to_batches(), rest.num_rows
        if n:
            yield day, pa.Table.from_batches(buf)


def num_global_batches(log: EventLog, day: int, batch_size: int) -> int:
    return -(-log.num_rows([day]) // batch_size)


class BatchBuilder:
    """Turns a global-batch Arrow table into this rank's `Batch`."""

    def __init__(self, layout: FeatureLayout, rank: int = 0, world_size: int = 1) -> None:
        self.layout, self.rank, self.world_size = layout, rank, world_size

    @property
    def columns(self) -> list[str]:
        return ["label", *self.layout.columns]

    def __call__(self, table: pa.Table, global_size: int) -> Batch:
        if global_size % self.world_size:
            raise ValueError(f"batch size {global_size} does not divide by the world size {self.world_size}")
        b = global_size // self.world_size
        real = table.num_rows
        start = min(self.rank * b, real)
        part = table.slice(start, min(b, real - start))
        n = part.num_rows
        lay = self.layout
        dense = np.zeros((b, len(lay.numeric)), dtype=np.float32)
        for j, name in enumerate(lay.numeric):
            dense[:n, j] = _numpy(part.column(name), np.float32)
        labels = np.zeros(b, dtype=np.float32)
        labels[:n] = _numpy(part.column("label"), np.float32)
        weights = np.zeros(b, dtype=np.float32)
        weights[:n] = 1.0
        return Batch(
            dense=torch.from_numpy(dense),
            sparse=self._kjt(part, lay.pooled, b),
            seq=self._kjt(part, lay.ec_keys, b),
            labels=torch.from_numpy(labels),
            weights=torch.from_numpy(weights),
            norm=torch.tensor(float(real)),
        )

    def _kjt(self, part: pa.Table, keys: Sequence[str], b: int) -> KeyedJaggedTensor:
        n = part.num_rows
        values, lengths = [], []
        for key in keys:
            col = part.column(key)
            lens = np.zeros(b, dtype=np.int32)
            if self.layout.kind(key) == "sequence":
                col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
                lens[:n] = _numpy(pc.list_value_length(col), np.int32)
                values.append(_numpy(pc.list_flatten(col), np.int64))
            else:  # one id per row; padding rows get the padding id 0
                lens[:] = 1
                ids = np.zeros(b, dtype=np.int64)
                ids[:n] = _numpy(col, np.int64)
                values.append(ids)
            lengths.append(lens)
        return KeyedJaggedTensor(
            keys=list(keys),
            values=torch.from_numpy(np.concatenate(values) if values else np.zeros(0, np.int64)),
            lengths=torch.from_numpy(np.concatenate(lengths) if lengths else np.zeros(0, np.int32)),
        )


def _numpy(col: pa.Array | pa.ChunkedArray, dtype: np.dtype) -> np.ndarray:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if len(col) == 0:
        return np.zeros(0, dtype=dtype)
    return col.to_numpy(zero_copy_only=False).astype(dtype, copy=False)


def iter_batches(log: EventLog, days: Sequence[int], batch_size: int, builder: BatchBuilder,
                 skip: int = 0) -> Iterator[Batch]:
    """This rank's batches of ``days``, after skipping the first ``skip`` global batches."""
    for i, (_, table) in enumerate(global_batches(log, days, batch_size, builder.columns)):
        if i >= skip:
            yield builder(table, batch_size)
