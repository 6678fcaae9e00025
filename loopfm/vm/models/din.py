"""DIN (Zhou et al. 2018): target attention over the user's behaviour sequence, then a DNN.

With ``raw_seq`` the raw item-id sequence is pooled by DIN's attention unit (MLP scorer over
[target, item, target−item, target⊙item], raw-score weights) with the target item as query. The
LoopFM sequence goes through the configured encoder (default the DMIN-style module, as in the
paper; ``encoder: din`` gives DIN attention over the codes). Without a raw sequence the model is
its DNN over the fields plus the LoopFM encoder. Simplification: the Dice activation and
mini-batch-aware regularisation of the paper are replaced by ReLU and no regularisation.
The DNN input is `VerticalModel.deep_input`: the fields, plus target ⊙ each sequence field (as
the reference DIN/DIEN code feeds ``item_emb * item_his_sum``).
"""
from __future__ import annotations

from torch import Tensor

from loopfm.vm.layers import MLP, DINAttention
from loopfm.vm.model import VerticalModel


class DIN(VerticalModel):
    def __init__(self, cfg, schema, *, seq_dim=None, kd=None, current_dim=None) -> None:
        super().__init__(cfg, schema, seq_dim=seq_dim, kd=kd, current_dim=current_dim)
        D = cfg.embedding_dim
        if cfg.raw_seq:
            self.behaviour = DINAttention(D, D, cfg.attention_mlp)
        self.dnn = MLP(self.deep_input_dim, cfg.dnn, cfg.dropout)
        self.build_heads(self.dnn.out_dim)

    def raw_fields(self, batch, emb):
        seq, lengths = self.raw_sequence(batch)
        return [self.behaviour(self.target(emb), seq, lengths)], None

    def trunk(self, batch) -> Tensor:
        x, dense = self.fields(batch)
        return self.dnn(self.deep_input(x, dense))
