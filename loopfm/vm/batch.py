"""`VMBatch`: one mini-batch as a vertical model sees it, and its builder from an event log.

A VMBatch holds only VM-visible inputs: categorical ids of the non-``fm_only`` features
(`Schema.vm_features`), their numeric values, their multi-valued (sequence-kind) features as
padded bags, the label, the user id (for gAUC), and the optional LoopFM inputs attached by the
caller (the VM sequence reader of `loopfm.stages`): soft labels ŷ_F, the user's LoopFM sequence
(INT4-packed ``seq_packed`` or float ``seq_float``) with lengths, time deltas and codebook, and a
raw-id behaviour sequence for the "raw user seq" ablation (table 4 of the paper).

One convention for every sequence: left-aligned (oldest .. newest, then padding), positions
``>= length`` are padding and are never read; an empty sequence (length 0) is allowed.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from loopfm.data.schema import FeatureSpec, Schema


@dataclass
class VMBatch:
    """Tensors of B examples (see the module docstring for the conventions).

    sparse: VM-visible categorical ids, LongTensor [B] each. dense: FloatTensor [B, n_numeric]
    (0 columns allowed). bags / bag_lengths: VM-visible sequence-kind features, LongTensor [B, L]
    and int32 [B]. labels: float [B] in {0, 1}. user_ids: long [B]. soft_labels: ŷ_F, float [B].
    seq_packed: uint8 [B, L, d/2] INT4 codes (low nibble = even dim) or seq_float: float
    [B, L, d] (fp16/int8 codes already dequantized, or [B, L, 1] scalar sequences); seq_lengths:
    int32 [B]; seq_deltas: float [B, L] seconds from each entry to the example; seq_codebook:
    float [16] for k-means INT4 (None = uniform). raw_seq: long [B, L_raw] item ids with
    raw_seq_lengths int32 [B]. example_ids: long [B], filled by the event-log builder so the caller
    can gather each example's sequence and soft label. current_code: float [B, d], the FM's
    (dequantized) code of the example itself, for the real-time-FM comparison of table 2.
    field_ids: long [B, F], one column per `Schema.vm_features()` feature in order (the categorical
    ids, 0 for numeric and sequence-kind features; ``sparse`` holds views of its columns), filled by
    the event-log builder so a VM looks all fields up at once without gathering them every step.
    """
    sparse: dict[str, Tensor]
    dense: Tensor
    labels: Tensor
    user_ids: Tensor
    bags: dict[str, Tensor] = field(default_factory=dict)
    bag_lengths: dict[str, Tensor] = field(default_factory=dict)
    soft_labels: Tensor | None = None
    seq_packed: Tensor | None = None
    seq_float: Tensor | None = None
    seq_lengths: Tensor | None = None
    seq_deltas: Tensor | None = None
    seq_codebook: Tensor | None = None
    raw_seq: Tensor | None = None
    raw_seq_lengths: Tensor | None = None
    example_ids: Tensor | None = None  # event-log example ids: the key to gather sequences by
    current_code: Tensor | None = None  # float [B, d]: the FM's code of this very example (table 2)
    field_ids: Tensor | None = None  # long [B, F]: ids per VM-visible feature, 0 for numeric / sequence

    def __post_init__(self) -> None:
        B = self.labels.shape[0]

        def check(name: str, t: Tensor | None, ndim: int, first: int | None = None) -> None:
            if t is None:
                return
            if t.dim() != ndim or t.shape[0] != B:
                raise ValueError(f"VMBatch.{name}: expected {ndim}-D with {B} rows, got shape {tuple(t.shape)}")
            if first is not None and t.shape[1] != first:
                raise ValueError(f"VMBatch.{name}: expected {first} positions, got {t.shape[1]}")

        check("labels", self.labels, 1)
        check("user_ids", self.user_ids, 1)
        check("dense", self.dense, 2)
        for k, v in self.sparse.items():
            check(f"sparse[{k!r}]", v, 1)
        for k, v in self.bags.items():
            check(f"bags[{k!r}]", v, 2)
            if k not in self.bag_lengths:
                raise ValueError(f"VMBatch.bags[{k!r}] has no bag_lengths entry")
            check(f"bag_lengths[{k!r}]", self.bag_lengths[k], 1)
        check("soft_labels", self.soft_labels, 1)
        if self.seq_packed is not None and self.seq_float is not None:
            raise ValueError("VMBatch: give seq_packed (INT4) or seq_float, not both")
        if self.seq_packed is not None and self.seq_packed.dtype != torch.uint8:
            raise ValueError(f"VMBatch.seq_packed must be uint8, got {self.seq_packed.dtype}")
        codes = self.seq_packed if self.seq_packed is not None else self.seq_float
        check("seq_packed" if self.seq_packed is not None else "seq_float", codes, 3)
        if codes is not None and self.seq_lengths is None:
            raise ValueError("VMBatch: a LoopFM sequence needs seq_lengths")
        check("seq_lengths", self.seq_lengths, 1)
        check("seq_deltas", self.seq_deltas, 2, None if codes is None else codes.shape[1])
        check("raw_seq", self.raw_seq, 2)
        if self.raw_seq is not None and self.raw_seq_lengths is None:
            raise ValueError("VMBatch: raw_seq needs raw_seq_lengths")
        check("raw_seq_lengths", self.raw_seq_lengths, 1)
        check("example_ids", self.example_ids, 1)
        check("current_code", self.current_code, 2)
        check("field_ids", self.field_ids, 2)

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def has_sequence(self) -> bool:
        return self.seq_packed is not None or self.seq_float is not None

    @property
    def seq_dim(self) -> int | None:
        """Width d of one LoopFM code (2 × bytes for INT4), None without a sequence."""
        if self.seq_packed is not None:
            return 2 * self.seq_packed.shape[-1]
        if self.seq_float is not None:
            return self.seq_float.shape[-1]
        return None

    @property
    def device(self) -> torch.device:
        return self.labels.device

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "VMBatch":
        """This batch on ``device`` (itself when already there: no copy, no rebuild). With
        ``non_blocking`` a CPU batch is pinned first, so the host-to-GPU copies are asynchronous."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if self.labels.device == device:
            return self
        src = self.pin_memory() if non_blocking and device.type == "cuda" else self
        return src._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "VMBatch":
        """A copy in page-locked host memory (host-to-GPU copies can then overlap compute)."""
        if self.labels.device.type != "cpu" or self.labels.is_pinned():
            return self
        return self._map(lambda t: t.pin_memory())

    def _map(self, fn: Callable[[Tensor], Tensor]) -> "VMBatch":
        def move(v):
            if isinstance(v, Tensor):
                return fn(v)
            if isinstance(v, dict):
                return {k: fn(t) for k, t in v.items()}
            return v
        return dataclasses.replace(self, **{f.name: move(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def with_sequence(self, *, packed: Tensor | None = None, values: Tensor | None = None,
                      lengths: Tensor, deltas: Tensor | None = None,
                      codebook: Tensor | None = None) -> "VMBatch":
        """A copy carrying a LoopFM sequence (INT4 ``packed`` or float ``values``)."""
        return dataclasses.replace(self, seq_packed=packed, seq_float=values, seq_lengths=lengths.to(torch.int32),
                                   seq_deltas=None if deltas is None else deltas.float(), seq_codebook=codebook)


# -- building VMBatches from an event log -----------------------------------------------------
def vm_columns(schema: Schema, raw_seq_feature: str | None = None) -> list[str]:
    """Event-log columns a VM batch reads: example id, label, the user key, the VM-visible features, and the
    explicitly named raw-sequence column (never any other ``fm_only`` column)."""
    cols = ["example_id", "label", schema.user_key] + [f.name for f in schema.vm_features()]
    if raw_seq_feature is not None and raw_seq_feature not in cols:
        cols.append(raw_seq_feature)
    return list(dict.fromkeys(cols))


def check_raw_seq_feature(schema: Schema, name: str) -> FeatureSpec:
    """The raw user sequence must be a sequence of item ids (it shares the item key's table).

    It may be an ``fm_only`` column: naming it is the explicit opt-in of the "raw user seq"
    ablation, and its ids are embedded with the VM's own item table, never a table of its own.
    """
    spec = schema.feature(name)
    item = schema.feature(schema.item_key)
    if spec.kind != "sequence" or spec.vocab_name != item.vocab_name:
        raise ValueError(f"raw_seq_feature {name!r} must be a sequence feature sharing the item "
                         f"vocabulary {item.vocab_name!r}; got kind={spec.kind}, vocab={spec.vocab_name}")
    return spec


def _padded(col: pa.Array | pa.ChunkedArray, max_len: int) -> tuple[Tensor, Tensor]:
    """A list<int> column as left-aligned LongTensor [B, max_len] + int32 lengths (newest kept)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    lengths = col.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    B = len(lengths)
    L = max(int(max_len), 1)
    flat = col.flatten().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    keep = np.minimum(lengths, L)
    out = np.zeros((B, L), np.int64)
    rows = np.repeat(np.arange(B), keep)
    within = np.arange(keep.sum()) - np.repeat(np.concatenate(([0], np.cumsum(keep)))[:-1], keep)
    src = np.repeat(offsets[1:] - keep, keep) + within  # the newest `keep` entries of each row
    out[rows, within] = flat[src]
    return torch.from_numpy(out), torch.from_numpy(keep.astype(np.int32))


def vm_batch_from_record_batch(rb: pa.RecordBatch | pa.Table, schema: Schema, *,
                               raw_seq_feature: str | None = None) -> VMBatch:
    """One VMBatch from event-log rows: VM-visible columns only, numeric as float32."""
    names = rb.schema.names

    def col(name: str) -> pa.Array:
        if name not in names:
            raise ValueError(f"event-log batch has no column {name!r}; columns: {names}")
        return rb.column(name)

    def ints(name: str) -> Tensor:
        return torch.from_numpy(col(name).to_numpy(zero_copy_only=False).astype(np.int64))

    features = schema.vm_features()
    B = rb.num_rows
    field_ids = torch.zeros(B, len(features), dtype=torch.long)
    sparse, bags, bag_lengths, dense = {}, {}, {}, []
    for j, f in enumerate(features):
        if f.kind == "categorical":
            field_ids[:, j] = ints(f.name)
            sparse[f.name] = field_ids[:, j]
        elif f.kind == "numeric":
            dense.append(col(f.name).to_numpy(zero_copy_only=False).astype(np.float32))
        else:
            bags[f.name], bag_lengths[f.name] = _padded(col(f.name), f.max_len)
    dense_t = torch.from_numpy(np.stack(dense, 1)) if dense else torch.zeros(B, 0)
    raw, raw_len = None, None
    if raw_seq_feature is not None:
        spec = check_raw_seq_feature(schema, raw_seq_feature)
        raw, raw_len = _padded(col(raw_seq_feature), spec.max_len)
    return VMBatch(sparse=sparse, dense=dense_t, bags=bags, bag_lengths=bag_lengths,
                   labels=torch.from_numpy(col("label").to_numpy(zero_copy_only=False).astype(np.float32)),
                   user_ids=ints(schema.user_key), raw_seq=raw, raw_seq_lengths=raw_len,
                   example_ids=ints("example_id") if "example_id" in names else None, field_ids=field_ids)


def iter_vm_batches(event_log, days: Sequence[int], batch_size: int, *,
                    raw_seq_feature: str | None = None) -> Iterator[VMBatch]:
    """VMBatches of an `EventLog`'s days in time order (no shuffle; a batch never spans files).

    LoopFM sequences and soft labels are attached afterwards by the caller
    (`VMBatch.with_sequence`, ``dataclasses.replace(b, soft_labels=...)``).
    """
    schema = event_log.schema
    cols = vm_columns(schema, raw_seq_feature)
    for rb in event_log.iter_batches(days=days, batch_size=batch_size, columns=cols):
        yield vm_batch_from_record_batch(rb, schema, raw_seq_feature=raw_seq_feature)
