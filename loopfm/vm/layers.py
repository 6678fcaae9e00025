"""Layers of the vertical-model zoo (FuxiCTR's ``layers`` in spirit); those the FM uses too (MLP,
DIN attention, masks, dot-product attention) live in `loopfm.layers` and are re-exported here.

Every sequence input follows one convention: left-aligned [B, L, ...] with lengths [B]; positions
``>= length`` are padding, masked out (by `length_mask`) and never able to change an output;
an empty sequence pools to zeros.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loopfm.data.schema import FeatureSpec
from loopfm.layers import MLP, DINAttention, dot_attention, length_mask, masked_mean, masked_softmax

__all__ = ["MLP", "DINAttention", "dot_attention", "length_mask", "masked_mean", "masked_softmax",
           "FeatureEmbedding", "fm_interaction", "FmFMInteraction", "AUGRUCell", "InterestEvolution",
           "MultiHeadTargetAttention", "DMRRelevance"]


class _GatherRowsIntoGrad(torch.autograd.Function):
    """``weight[rows]`` whose backward adds the row gradients into the dense ``weight.grad`` with
    one ``index_add_`` and hands autograd nothing for ``weight``: autograd's own ways (a sparse
    gradient added into the dense one, or a dense ``[V, D]`` gradient built and then added) cost
    3-10x more per batch. Only for a trainer that owns ``weight.grad`` (`FeatureEmbedding.grad_into`)."""

    @staticmethod
    def forward(ctx, weight: Tensor, rows: Tensor) -> Tensor:
        ctx.weight = weight
        ctx.save_for_backward(rows)
        return F.embedding(rows, weight)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (rows,) = ctx.saved_tensors
        weight = ctx.weight
        weight.grad.index_add_(0, rows.reshape(-1), grad.reshape(-1, weight.shape[1]))
        return None, None


class FeatureEmbedding(nn.Module):
    """Embeds the VM-visible features as fields [B, F, D].

    One table per vocabulary (a history feature shares its target's table, e.g. hist_item_id →
    item_id); categorical ids are looked up, sequence-kind features are mean-pooled bags (from
    their lengths), numeric features are ``value × w_f`` (FuxiCTR's numeric embedding).
    FM-only features are refused: a VM must be built from `Schema.vm_features()`.

    Speed: every table and every numeric feature's ``w_f`` are rows of one ``weight`` (``tables``
    maps a vocabulary to its first row and size), so all fields are one lookup, one multiply and
    one backward per batch: field f reads row ``first_f + id`` (numeric: its ``w_f`` row) times a
    scale (1, the numeric value, or 0 for the padding id 0). Row 0 of every table is the padding
    id: zero at init, and the zero scale keeps every gradient out of it, so it stays zero.
    ``sparse`` (as `nn.Embedding`'s, for `lookup`): row gradients instead of a dense one.
    ``grad_into`` (set by a trainer that keeps a dense ``weight.grad``, `loopfm.vm.train.FlatAdam`):
    the fields' backward adds its rows into ``weight.grad`` directly instead of returning them.
    """

    def __init__(self, features: Sequence[FeatureSpec], dim: int) -> None:
        super().__init__()
        bad = [f.name for f in features if f.fm_only]
        if bad:
            raise ValueError(f"vertical models never read fm_only features; got {bad} "
                             "(build the model from schema.vm_features())")
        self.dim = dim
        self.features = list(features)
        self.tables: dict[str, tuple[int, int]] = {}  # vocabulary -> (first row, rows)
        rows = 0
        for f in self.features:
            if f.kind != "numeric" and f.vocab_name not in self.tables:
                if f.vocab_size < 2:
                    raise ValueError(f"feature {f.name!r} has vocab_size {f.vocab_size}; "
                                     "use the schema of a prepared event log")
                self.tables[f.vocab_name] = (rows, f.vocab_size)
                rows += f.vocab_size
        self.numeric_names = [f.name for f in self.features if f.kind == "numeric"]
        self.numeric_first = rows  # the w_f rows follow the tables
        self.weight = nn.Parameter(torch.empty(rows + len(self.numeric_names), dim))
        first, n = [], 0
        for f in self.features:
            if f.kind == "numeric":
                first.append(self.numeric_first + n)
                n += 1
            else:
                first.append(self.tables[f.vocab_name][0])
        self.register_buffer("field_first", torch.tensor(first, dtype=torch.long), persistent=False)
        kind_cols = {k: [i for i, f in enumerate(self.features) if f.kind == k] for k in ("categorical", "numeric", "sequence")}
        for kind, cols in kind_cols.items():
            self.register_buffer(f"{kind}_cols", torch.tensor(cols, dtype=torch.long), persistent=False)
        self.categorical = [self.features[i] for i in kind_cols["categorical"]]
        self.bags = [self.features[i] for i in kind_cols["sequence"]]
        self.sparse = self.grad_into = False
        with torch.no_grad():  # the draws one nn.Embedding per table made (it initialises itself):
            for first_row, size in self.tables.values():  # a seed gives the same model as unstacked tables
                nn.init.normal_(self.weight[first_row:first_row + size])
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for first, size in self.tables.values():
                table = self.weight[first:first + size]
                nn.init.normal_(table, std=1e-2 if self.dim > 1 else 1e-3)
                table[0].zero_()
            nn.init.normal_(self.weight[self.numeric_first:], std=1e-2)

    @property
    def num_fields(self) -> int:
        return len(self.features)

    @property
    def numeric(self) -> Tensor:
        """The numeric features' ``w_f`` [n_numeric, D] (rows of ``weight``)."""
        return self.weight[self.numeric_first:]

    def lookup(self, vocab_name: str, ids: Tensor) -> Tensor:
        """Embeddings [*ids.shape, D] of ids of one vocabulary (e.g. a raw item-id sequence)."""
        rows = torch.where(ids > 0, ids + self.tables[vocab_name][0], 0)  # id 0: row 0, the first table's padding
        return F.embedding(rows, self.weight, padding_idx=0, sparse=self.sparse)

    def field_ids(self, batch) -> Tensor:
        """[B, F] ids per field (0 for numeric and sequence fields): the batch's ``field_ids`` when
        its builder filled them for these features, else gathered from ``batch.sparse``."""
        ids = getattr(batch, "field_ids", None)
        if ids is not None and ids.shape[1] == len(self.features):
            return ids
        B = batch.labels.shape[0]
        ids = torch.zeros(B, len(self.features), dtype=torch.long, device=batch.labels.device)
        if self.categorical:
            ids[:, self.categorical_cols] = torch.stack([batch.sparse[f.name] for f in self.categorical], 1)
        return ids

    def forward(self, batch) -> Tensor:
        ids = self.field_ids(batch)
        scale = (ids != 0).to(self.weight.dtype)
        if self.numeric_names:
            scale = scale.index_copy(1, self.numeric_cols, batch.dense.to(scale.dtype))
        rows = ids + self.field_first
        if self.grad_into and self.weight.grad is not None and torch.is_grad_enabled():
            x = _GatherRowsIntoGrad.apply(self.weight, rows)
        else:
            x = F.embedding(rows, self.weight, sparse=self.sparse)
        x = x * scale.unsqueeze(-1)
        if self.bags:
            pooled = [masked_mean(self.lookup(f.vocab_name, batch.bags[f.name]), batch.bag_lengths[f.name])
                      for f in self.bags]
            x = x.index_copy(1, self.sequence_cols, torch.stack(pooled, 1))
        return x


def fm_interaction(x: Tensor) -> Tensor:
    """Bi-interaction vector of fields x [B, F, D]: ``0.5((Σv)² − Σv²)`` [B, D]; its sum over D is
    the FM second-order term Σ_{i<j} <v_i, v_j>."""
    s = x.sum(1)
    return 0.5 * (s * s - (x * x).sum(1))


class FmFMInteraction(nn.Module):
    """FmFM (Sun et al. 2021) field-matrixed interaction: Σ_{i<j} (v_i M_{f(i),f(j)}) ⊙ v_j [B, D];
    its sum over D is the FmFM second-order term Σ_{i<j} v_i^T M_ij v_j. M_ij start at identity
    (= plain FM)."""

    def __init__(self, num_fields: int, dim: int) -> None:
        super().__init__()
        i, j = torch.triu_indices(num_fields, num_fields, offset=1)
        self.register_buffer("left", i, persistent=False)
        self.register_buffer("right", j, persistent=False)
        self.matrices = nn.Parameter(torch.eye(dim).repeat(len(i), 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        vi = torch.einsum("bpd,pde->bpe", x[:, self.left], self.matrices)
        return (vi * x[:, self.right]).sum(1)


class AUGRUCell(nn.Module):
    """DIEN's GRU with attentional update gate: u' = a·u, h' = (1 − u')h + u'·h̃."""

    def __init__(self, input_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.x2h = nn.Linear(input_dim, 3 * hidden_dim)
        self.h2h = nn.Linear(hidden_dim, 3 * hidden_dim, bias=False)

    def forward(self, x: Tensor, h: Tensor, att: Tensor) -> Tensor:
        xr, xu, xn = self.x2h(x).chunk(3, -1)
        hr, hu, hn = self.h2h(h).chunk(3, -1)
        r = torch.sigmoid(xr + hr)
        u = torch.sigmoid(xu + hu) * att[:, None]
        n = torch.tanh(xn + r * hn)
        return (1 - u) * h + u * n


class InterestEvolution(nn.Module):
    """DIEN's two layers: a GRU interest extractor over the behaviour embeddings, then an AUGRU
    driven by target attention (softmax of ⟨W q, h_t⟩ over real positions). Returns the final
    evolved interest [B, H] (zeros for an empty sequence; padding steps keep the state)."""

    def __init__(self, input_dim: int, hidden_dim: int, query_dim: int) -> None:
        super().__init__()
        self.gru = nn.GRU(input_dim, hidden_dim, batch_first=True)
        self.query = nn.Linear(query_dim, hidden_dim, bias=False)
        self.augru = AUGRUCell(hidden_dim, hidden_dim)
        self.hidden_dim = hidden_dim

    def forward(self, query: Tensor, seq: Tensor, lengths: Tensor) -> Tensor:
        mask = length_mask(lengths, seq.shape[1])
        seq = torch.where(mask[..., None], seq, torch.zeros((), dtype=seq.dtype))
        states, _ = self.gru(seq)  # left-aligned: real positions never see padding
        att = masked_softmax(torch.einsum("bd,bld->bl", self.query(query), states), mask)
        h = states.new_zeros(seq.shape[0], self.hidden_dim)
        for t in range(seq.shape[1]):
            h = torch.where(mask[:, t, None], self.augru(states[:, t], h, att[:, t]), h)
        return h


class MultiHeadTargetAttention(nn.Module):
    """DMIN's multi-interest extractor, simplified: one self-attention layer over the behaviour
    sequence (key-padding masked), then per head a target attention whose query is a per-head
    projection of the target (dot-product, recency bias from a position embedding). Returns
    [B, heads × dim]."""

    def __init__(self, dim: int, query_dim: int, heads: int, max_len: int) -> None:
        super().__init__()
        self.heads = heads
        self.self_attn = nn.MultiheadAttention(dim, num_heads=1, batch_first=True)
        self.query = nn.Linear(query_dim, heads * dim)
        self.position = nn.Embedding(max_len + 1, heads)
        nn.init.zeros_(self.position.weight)
        self.max_len = max_len
        self.out_dim = heads * dim

    def forward(self, query: Tensor, seq: Tensor, lengths: Tensor) -> Tensor:
        B, L, D = seq.shape
        mask = length_mask(lengths, L)
        seq = torch.where(mask[..., None], seq, torch.zeros((), dtype=seq.dtype))
        # an all-padding row would make attention NaN: let empty rows attend to position 0 (zeros)
        kpm = ~(mask | (lengths == 0)[:, None] & (torch.arange(L, device=seq.device) == 0)[None])
        att, _ = self.self_attn(seq, seq, seq, key_padding_mask=kpm, need_weights=False)
        att = torch.where(mask[..., None], att + seq, torch.zeros((), dtype=seq.dtype))
        recency = (lengths.to(torch.long)[:, None] - 1 - torch.arange(L, device=seq.device)).clamp(0, self.max_len)
        bias = self.position(recency).permute(0, 2, 1)  # [B, H, L]
        q = self.query(query).view(B, self.heads, D)
        return dot_attention(q, att, lengths, bias).reshape(B, -1)


class DMRRelevance(nn.Module):
    """DMR's two relevance terms (Lyu et al. 2020), simplified.

    User-to-Item: a user representation u = Σ_l a_l W h_l with a_l = softmax over real positions of
    a position-embedding-driven score, relevance r_u2i = ⟨u, target⟩. Item-to-Item: target
    attention of the target over the behaviours, relevance r_i2i = Σ_l (attention logit_l) and the
    attention-pooled behaviours. Returns (u [B, D], pooled [B, D], relevances [B, 2]). Not
    implemented: DMR's auxiliary next-item loss and its separate output item embeddings.
    """

    def __init__(self, dim: int, max_len: int) -> None:
        super().__init__()
        self.position = nn.Embedding(max_len + 1, dim)
        nn.init.normal_(self.position.weight, std=1e-2)
        self.u2i_score = nn.Linear(2 * dim, 1)
        self.u2i_proj = nn.Linear(dim, dim)
        self.i2i_query = nn.Linear(dim, dim, bias=False)
        self.max_len = max_len

    def forward(self, target: Tensor, seq: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, L, D = seq.shape
        mask = length_mask(lengths, L)
        seq = torch.where(mask[..., None], seq, torch.zeros((), dtype=seq.dtype))
        recency = (lengths.to(torch.long)[:, None] - 1 - torch.arange(L, device=seq.device)).clamp(0, self.max_len)
        pos = self.position(recency)
        a = masked_softmax(self.u2i_score(torch.cat([seq, pos], -1)).squeeze(-1), mask)
        u = self.u2i_proj(torch.einsum("bl,bld->bd", a, seq))
        r_u2i = (u * target).sum(-1)
        logits = torch.einsum("bd,bld->bl", self.i2i_query(target), seq + pos)
        w = masked_softmax(logits, mask)
        pooled = torch.einsum("bl,bld->bd", w, seq)
        r_i2i = torch.where(mask, logits, torch.zeros_like(logits)).sum(-1)
        return u, pooled, torch.stack([r_u2i, r_i2i], -1)
