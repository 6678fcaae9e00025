"""DMIN (Xiao et al. 2020): Deep Multi-Interest Network — self-attention over the behaviour
sequence, then one target attention per head (interest), the interests fed to a DNN.

With ``raw_seq`` the raw item-id sequence goes through `MultiHeadTargetAttention` (``heads``
interests of size D, each one more field). The LoopFM sequence goes through the configured
encoder (default: the DMIN-style multi-head attention over the codes, computed by the INT4
kernel op on packed codes). Without a raw sequence the model is its DNN over the fields plus that
encoder. Simplifications: one single-head self-attention layer (the paper's multi-head
self-attention with per-head projections is reduced to it), dot-product per-head target
attention with a learned per-head position (recency) bias instead of DMIN's per-head MLP scorer,
and no auxiliary loss.
The DNN input is `VerticalModel.deep_input`: the fields, plus target ⊙ each sequence field (as
the reference DIN/DIEN code feeds ``item_emb * item_his_sum``).
"""
from __future__ import annotations

from torch import Tensor

from loopfm.vm.layers import MLP, MultiHeadTargetAttention
from loopfm.vm.model import VerticalModel


class DMIN(VerticalModel):
    @property
    def num_raw_fields(self) -> int:  # one field per interest
        return self.cfg.heads

    def __init__(self, cfg, schema, *, seq_dim=None, kd=None, current_dim=None) -> None:
        super().__init__(cfg, schema, seq_dim=seq_dim, kd=kd, current_dim=current_dim)
        D = cfg.embedding_dim
        if cfg.raw_seq:
            self.behaviour = MultiHeadTargetAttention(D, D, cfg.heads, cfg.max_position)
        self.dnn = MLP(self.deep_input_dim, cfg.dnn, cfg.dropout)
        self.build_heads(self.dnn.out_dim)

    def raw_fields(self, batch, emb):
        seq, lengths = self.raw_sequence(batch)
        interests = self.behaviour(self.target(emb), seq, lengths)
        return list(interests.view(interests.shape[0], self.cfg.heads, -1).unbind(1)), None

    def trunk(self, batch) -> Tensor:
        x, dense = self.fields(batch)
        return self.dnn(self.deep_input(x, dense))
