"""DMR (Lyu et al. 2020): Deep Match to Rank — user-to-item and item-to-item relevance of the
target to the behaviour sequence, fed with the other fields to a DNN.

With ``raw_seq``, `DMRRelevance` adds two fields (the user representation u and the
target-attention-pooled behaviours) and two scalars (r_u2i = ⟨u, target⟩ and r_i2i = the summed
attention logits). Simplified: u is a position-aware attention pooling (not DMR's last-position
query with a separate output embedding table), and DMR's auxiliary next-item (sampled softmax)
loss is not implemented. The LoopFM sequence goes through the configured encoder (default
DMIN-style); without a raw sequence the model is its DNN over the fields plus the LoopFM encoder.
The DNN input is `VerticalModel.deep_input`: the fields, plus target ⊙ each sequence field (as
the reference DIN/DIEN code feeds ``item_emb * item_his_sum``).
"""
from __future__ import annotations

from torch import Tensor

from loopfm.vm.layers import MLP, DMRRelevance
from loopfm.vm.model import VerticalModel


class DMR(VerticalModel):
    num_raw_fields = 2
    num_raw_dense = 2

    def __init__(self, cfg, schema, *, seq_dim=None, kd=None, current_dim=None) -> None:
        super().__init__(cfg, schema, seq_dim=seq_dim, kd=kd, current_dim=current_dim)
        D = cfg.embedding_dim
        if cfg.raw_seq:
            self.behaviour = DMRRelevance(D, cfg.max_position)
        self.dnn = MLP(self.deep_input_dim, cfg.dnn, cfg.dropout)
        self.build_heads(self.dnn.out_dim)

    def raw_fields(self, batch, emb):
        seq, lengths = self.raw_sequence(batch)
        u, pooled, relevance = self.behaviour(self.target(emb), seq, lengths)
        return [u, pooled], relevance

    def trunk(self, batch) -> Tensor:
        x, dense = self.fields(batch)
        return self.dnn(self.deep_input(x, dense))
