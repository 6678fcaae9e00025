"""VMBatch checks and the event-log builder (VM-visible columns only)."""
from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from loopfm.vm.batch import VMBatch, check_raw_seq_feature, vm_batch_from_record_batch, vm_columns
from tests.vm.util import make_batch, tiny_schema


def event_rows(with_fm_only: bool) -> pa.Table:
    cols = {
        "example_id": pa.array([0, 1, 2], pa.int64()), "ts": pa.array([10, 11, 12], pa.int64()),
        "label": pa.array([1, 0, 1], pa.int8()),
        "user_id": pa.array([3, 4, 3], pa.int64()), "item_id": pa.array([5, 6, 7], pa.int64()),
        "cate_id": pa.array([1, 2, 6], pa.int64()), "price": pa.array([0.5, 1.5, 2.5], pa.float64()),
        "hist_cate": pa.array([[1, 2, 3, 4, 5, 6, 1], [], None], pa.list_(pa.int64())),
        "hist_item_id": pa.array([[9, 8], [1, 2, 3, 4, 5, 6, 7, 8], []], pa.list_(pa.int64())),
    }
    if with_fm_only:
        cols["secret_segment"] = pa.array([1, 2, 3], pa.int64())
        cols["secret_score"] = pa.array([0.1, 0.2, 0.3], pa.float32())
    return pa.table(cols)


def test_vm_columns_exclude_fm_only():
    s = tiny_schema()
    assert vm_columns(s) == ["example_id", "label", "user_id", "item_id", "cate_id", "price", "hist_cate"]
    assert vm_columns(s, "hist_item_id")[-1] == "hist_item_id"


def test_builder_reads_only_vm_columns():
    s = tiny_schema()
    # the fm_only columns are absent: the builder must not need them
    b = vm_batch_from_record_batch(event_rows(with_fm_only=False), s, raw_seq_feature="hist_item_id")
    assert set(b.sparse) == {"user_id", "item_id", "cate_id"}
    assert b.dense.dtype == torch.float32 and b.dense[:, 0].tolist() == [0.5, 1.5, 2.5]
    assert b.labels.tolist() == [1.0, 0.0, 1.0] and b.user_ids.tolist() == [3, 4, 3]
    assert b.example_ids.tolist() == [0, 1, 2]
    # bags: newest max_len (5) kept, left-aligned; empty and null lists have length 0
    assert b.bag_lengths["hist_cate"].tolist() == [5, 0, 0]
    assert b.bags["hist_cate"][0].tolist() == [3, 4, 5, 6, 1]
    assert b.raw_seq_lengths.tolist() == [2, 6, 0]
    assert b.raw_seq[0].tolist() == [9, 8, 0, 0, 0, 0] and b.raw_seq[1].tolist() == [3, 4, 5, 6, 7, 8]
    assert not b.has_sequence and b.seq_dim is None
    b2 = vm_batch_from_record_batch(event_rows(with_fm_only=True), s)
    assert b2.raw_seq is None and set(b2.sparse) == set(b.sparse)


def test_raw_seq_feature_must_share_the_item_vocabulary():
    with pytest.raises(ValueError, match="item"):
        check_raw_seq_feature(tiny_schema(), "hist_cate")


def test_vmbatch_checks():
    b = make_batch(seq="int4")
    assert b.seq_dim == 8 and len(b) == 6
    with pytest.raises(ValueError, match="rows"):
        VMBatch(sparse={"user_id": torch.zeros(5, dtype=torch.long)}, dense=torch.zeros(6, 0),
                labels=torch.zeros(6), user_ids=torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="seq_lengths"):
        VMBatch(sparse={}, dense=torch.zeros(2, 0), labels=torch.zeros(2), user_ids=torch.zeros(2),
                seq_float=torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="uint8"):
        VMBatch(sparse={}, dense=torch.zeros(2, 0), labels=torch.zeros(2), user_ids=torch.zeros(2),
                seq_packed=torch.zeros(2, 3, 4), seq_lengths=torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="not both"):
        b.with_sequence(packed=b.seq_packed, values=torch.zeros(6, 5, 8), lengths=b.seq_lengths)
    moved = b.to("cpu")
    assert torch.equal(moved.seq_packed, b.seq_packed) and moved.sparse.keys() == b.sparse.keys()
