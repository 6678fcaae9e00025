"""FM: the factorization machine (Rendle 2010) on the VM-visible fields.

logit = b + Σ_i w_i + Σ_{i<j} ⟨v_i, v_j⟩ over the fields: the features, the LoopFM field (the
pooled sequence projected to D) and, with ``raw_seq``, the mean-pooled raw item sequence.
Trunk h = [bi-interaction vector (D), first-order sum (1)]; the serving head starts with weight 1
on every entry (exactly the FM) and is learned, i.e. a per-dimension weighted FM — the head the
KD scheme needs. The LoopFM and raw-sequence fields have no first-order weight.
"""
from __future__ import annotations

import torch
from torch import Tensor

from loopfm.vm.layers import FeatureEmbedding, fm_interaction
from loopfm.vm.model import VerticalModel


class FM(VerticalModel):
    def __init__(self, cfg, schema, *, seq_dim=None, kd=None, current_dim=None) -> None:
        super().__init__(cfg, schema, seq_dim=seq_dim, kd=kd, current_dim=current_dim)
        self.first_order = FeatureEmbedding(schema.vm_features(), 1)
        self.build_heads(cfg.embedding_dim + 1, fm_dims=cfg.embedding_dim + 1)

    def trunk(self, batch) -> Tensor:
        x, _ = self.fields(batch)
        return torch.cat([fm_interaction(x), self.first_order(batch).sum(1)], -1)
