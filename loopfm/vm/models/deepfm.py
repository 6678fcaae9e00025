"""DeepFM (Guo et al. 2017): an FM and a DNN sharing the field embeddings.

logit = FM(fields) + DNN(concat(fields)), fields = features + LoopFM field + optional mean-pooled
raw-sequence field. Trunk h = [bi-interaction (D), first-order sum (1), last DNN hidden layer]; the
serving head has weight 1 on the FM part at start (so it is FM + a linear readout of the DNN,
which is DeepFM's final layer) and is learned.
"""
from __future__ import annotations

import torch
from torch import Tensor

from loopfm.vm.layers import MLP, FeatureEmbedding, fm_interaction
from loopfm.vm.model import VerticalModel


class DeepFM(VerticalModel):
    def __init__(self, cfg, schema, *, seq_dim=None, kd=None, current_dim=None) -> None:
        super().__init__(cfg, schema, seq_dim=seq_dim, kd=kd, current_dim=current_dim)
        D = cfg.embedding_dim
        self.first_order = FeatureEmbedding(schema.vm_features(), 1)
        self.dnn = MLP(self.num_fields * D + self.num_dense, cfg.dnn, cfg.dropout)
        self.build_heads(D + 1 + self.dnn.out_dim, fm_dims=D + 1)

    def trunk(self, batch) -> Tensor:
        x, dense = self.fields(batch)
        deep = self.dnn(torch.cat([x.flatten(1), dense], -1) if dense.shape[1] else x.flatten(1))
        return torch.cat([fm_interaction(x), self.first_order(batch).sum(1), deep], -1)
