"""Tiny schemas and fabricated VMBatches for the vertical-model tests."""
from __future__ import annotations

import torch

import kernels
from loopfm.data.schema import FeatureSpec, Schema
from loopfm.vm.batch import VMBatch

USERS, ITEMS, CATES = 30, 40, 7


def tiny_schema() -> Schema:
    """user_id, item_id, cate_id (VM-visible), price (numeric), a VM-visible bag, and two fm_only
    features (one categorical with its own vocabulary, one numeric)."""
    return Schema(dataset="tiny", user_key="user_id", item_key="item_id", num_days=8, features=[
        FeatureSpec("user_id", "categorical", "user", vocab_size=USERS),
        FeatureSpec("item_id", "categorical", "item", vocab_size=ITEMS),
        FeatureSpec("cate_id", "categorical", "item", vocab_size=CATES),
        FeatureSpec("price", "numeric", "item"),
        FeatureSpec("hist_cate", "sequence", "user", vocab="cate_id", max_len=5, vocab_size=CATES),
        FeatureSpec("secret_segment", "categorical", "user", fm_only=True, vocab_size=11),
        FeatureSpec("secret_score", "numeric", "user", fm_only=True),
        FeatureSpec("hist_item_id", "sequence", "user", fm_only=True, vocab="item_id", max_len=6,
                    vocab_size=ITEMS),
    ])


def make_batch(B: int = 6, seq: str = "none", L: int = 5, d: int = 8, raw: bool = False,
               seed: int = 0, lengths: list[int] | None = None, soft: bool = True) -> VMBatch:
    """seq: none | int4 (packed uint8, uniform) | int4km (k-means codebook) | fp16 | scalar ([B, L, 1])."""
    g = torch.Generator().manual_seed(seed)
    hl = torch.randint(0, 6, (B,), generator=g, dtype=torch.int32)
    b = VMBatch(
        sparse={"user_id": torch.randint(1, USERS, (B,), generator=g),
                "item_id": torch.randint(1, ITEMS, (B,), generator=g),
                "cate_id": torch.randint(1, CATES, (B,), generator=g)},
        dense=torch.rand(B, 1, generator=g),
        bags={"hist_cate": torch.randint(1, CATES, (B, 5), generator=g)},
        bag_lengths={"hist_cate": hl},
        labels=torch.randint(0, 2, (B,), generator=g).float(),
        user_ids=torch.randint(1, USERS, (B,), generator=g),
        soft_labels=torch.rand(B, generator=g) * 0.3 if soft else None,
    )
    if raw:
        b.raw_seq = torch.randint(1, ITEMS, (B, 6), generator=g)
        b.raw_seq_lengths = torch.randint(0, 7, (B,), generator=g, dtype=torch.int32)
    if seq == "none":
        return b
    lens = torch.tensor(lengths, dtype=torch.int32) if lengths is not None else \
        torch.randint(0, L + 1, (B,), generator=g, dtype=torch.int32)
    deltas = torch.rand(B, L, generator=g) * 86400 * 3
    if seq in ("int4", "int4km"):
        codes = torch.randint(0, 16, (B, L, d), generator=g, dtype=torch.uint8)
        codebook = torch.sort(torch.rand(16, generator=g) * 2 - 1).values if seq == "int4km" else None
        return b.with_sequence(packed=kernels.pack_int4(codes), lengths=lens, deltas=deltas, codebook=codebook)
    if seq == "fp16":
        return b.with_sequence(values=(torch.rand(B, L, d, generator=g) * 2 - 1).half(), lengths=lens, deltas=deltas)
    if seq == "scalar":
        return b.with_sequence(values=torch.rand(B, L, 1, generator=g), lengths=lens, deltas=deltas)
    raise ValueError(seq)
