"""FmFM: field-matrixed factorization machine (Sun et al. 2021).

logit = b + Σ_i w_i + Σ_{i<j} v_i^T M_{ij} v_j, one learned D×D matrix per field pair (FuxiCTR's
"matrixed" FmFM), over the same fields as `FM` (features, LoopFM field, optional raw-sequence
field). Trunk h = [Σ_{i<j} (v_i M_ij) ⊙ v_j (D), first-order sum (1)], serving head initialised
to ones (the textbook FmFM) and learned. Matrices start at identity (= FM).
"""
from __future__ import annotations

import torch
from torch import Tensor

from loopfm.vm.layers import FeatureEmbedding, FmFMInteraction
from loopfm.vm.model import VerticalModel


class FmFM(VerticalModel):
    def __init__(self, cfg, schema, *, seq_dim=None, kd=None, current_dim=None) -> None:
        super().__init__(cfg, schema, seq_dim=seq_dim, kd=kd, current_dim=current_dim)
        self.first_order = FeatureEmbedding(schema.vm_features(), 1)
        self.interaction = FmFMInteraction(self.num_fields, cfg.embedding_dim)
        self.build_heads(cfg.embedding_dim + 1, fm_dims=cfg.embedding_dim + 1)

    def trunk(self, batch) -> Tensor:
        x, _ = self.fields(batch)
        return torch.cat([self.interaction(x), self.first_order(batch).sum(1)], -1)
