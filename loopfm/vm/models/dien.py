"""DIEN (Zhou et al. 2019): interest extractor (GRU) + interest evolution (AUGRU driven by
target attention) over the user's behaviour sequence, then a DNN.

With ``raw_seq`` the raw item-id sequence goes through `InterestEvolution` (hidden size D); its
final evolved interest is one more field. The LoopFM sequence goes through the configured encoder
(default DMIN-style, as in the paper's table 1). Without a raw sequence the model is its DNN over
the fields plus the LoopFM encoder. Simplifications: no auxiliary next-behaviour loss (negative
sampling) and a dot-product (not MLP) attention for the AUGRU gates.
The DNN input is `VerticalModel.deep_input`: the fields, plus target ⊙ each sequence field (as
the reference DIN/DIEN code feeds ``item_emb * item_his_sum``).
"""
from __future__ import annotations

from torch import Tensor

from loopfm.vm.layers import MLP, InterestEvolution
from loopfm.vm.model import VerticalModel


class DIEN(VerticalModel):
    def __init__(self, cfg, schema, *, seq_dim=None, kd=None, current_dim=None) -> None:
        super().__init__(cfg, schema, seq_dim=seq_dim, kd=kd, current_dim=current_dim)
        D = cfg.embedding_dim
        if cfg.raw_seq:
            self.behaviour = InterestEvolution(D, D, D)
        self.dnn = MLP(self.deep_input_dim, cfg.dnn, cfg.dropout)
        self.build_heads(self.dnn.out_dim)

    def raw_fields(self, batch, emb):
        seq, lengths = self.raw_sequence(batch)
        return [self.behaviour(self.target(emb), seq, lengths)], None

    def trunk(self, batch) -> Tensor:
        x, dense = self.fields(batch)
        return self.dnn(self.deep_input(x, dense))
