"""The foundation model for one device: TorchRec lookups, DMIN or DeepFM towers, named taps.

No distribution code here (`loopfm.fm.parallelize` shards it). The top-level forward is
torch.fx-traceable (no Python control flow on tensor values), as `TrainPipelineSparseDist` needs,
and returns ``(loss, (logits, aux))``.

Layers (the paper's ablation points are the *taps*):

    EBC (pooled features) + EC (behaviour sequence + its targets) + numeric embeddings
      -> arch: DMIN  (self-attention refiner, multi-head self-attention, one target attention
                      per head with recency-position embeddings, masked by true length)
               DeepFM (histories mean-pooled into fields; second-order FM term on the logit)
      ``emb``  = concatenated feature lookups before any interaction (histories mean-pooled)
      -> DNN over [non-sequence lookups, DMIN interests] (DMIN) or ``emb`` (DeepFM):
         ``hidden0``, ``hidden1``, ``hidden2``, ... -> logit
    Matryoshka autoencoder on stop-gradient(concat of the configured taps) -> codes ``z``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from loopfm.fm.autoencoder import MatryoshkaAutoencoder
from loopfm.fm.config import AutoencoderConfig, ModelConfig
from loopfm.fm.features import FeatureLayout
from loopfm.layers import MLP, NEG, SelfAttention, length_buckets, shared_rows


class Tower(nn.Module):
    """DNN over ``emb``; returns the logit and every hidden layer's output (the deep taps)."""

    def __init__(self, in_dim: int, hidden: list[int], dropout: float) -> None:
        super().__init__()
        dims = [in_dim, *hidden]
        self.layers = nn.ModuleList(MLP(a, [b], dropout) for a, b in zip(dims[:-1], dims[1:]))
        self.out = nn.Linear(dims[-1], 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        hidden = []
        for layer in self.layers:
            x = layer(x)
            hidden.append(x)
        return self.out(x).squeeze(-1), hidden


class DMIN(nn.Module):
    """Deep Multi-Interest Network interaction (Xiao et al. 2020): one interest vector per head.

    Behaviour refiner (self-attention), multi-interest extractor (multi-head self-attention),
    then per head a DIN-style target attention unit over [h, q, h*q, h-q, position] whose
    softmax weights are zeroed beyond the true length: an empty history gives a zero interest.
    """

    def __init__(self, seq_dim: int, seq_len: int, cfg: ModelConfig) -> None:
        super().__init__()
        d_model = cfg.num_heads * cfg.head_dim
        self.h, self.hd, self.L = cfg.num_heads, cfg.head_dim, seq_len
        self.inp = nn.Linear(seq_dim, d_model)
        self.target = nn.Linear(seq_dim, d_model)
        self.refiner = SelfAttention(d_model, cfg.num_heads)
        self.extractor = SelfAttention(d_model, cfg.num_heads)
        self.position = nn.Embedding(seq_len, cfg.position_dim)
        self.units = nn.ModuleList(MLP(4 * cfg.head_dim + cfg.position_dim, cfg.attention_mlp, out=1)
                                   for _ in range(cfg.num_heads))
        self.out_dim = d_model

    def forward(self, seq: torch.Tensor, lengths: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Interests [B, H * hd] of left-aligned histories seq [B, L, S] with their targets [B, S]."""
        B, H, hd = seq.shape[0], self.h, self.hd
        h, real = self.histories(seq, lengths.to(torch.long))  # [H B, L, hd], [B, L]
        q = self.target(target).view(B, H, hd).transpose(0, 1).contiguous()  # [H, B, hd]
        score = self.scores(h, q).view(H, B, self.L)
        weights = torch.softmax(score.masked_fill(~real, NEG), dim=-1) * real  # [H, B, L]
        # a broadcast product and a sum: bmm with a single output row is several times slower on CPU
        interests = (weights.view(H * B, self.L, 1) * h).sum(1)  # [H B, hd]; an empty history: zeros
        return interests.view(H, B, hd).transpose(0, 1).reshape(B, H * hd)

    def histories(self, seq: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's history after the refiner and the extractor, per head, right-aligned:
        [H B, L, hd] (slot L - length + i holds position i; padding slots are zeros) and the
        mask of its real slots [B, L]. Right-aligned, the recency of a slot (L - 1 - slot) is
        the same in every row.

        Both self-attention layers see only the history, not the target: rows with the same
        history (impressions of one page view, ratings given in one session) are encoded once
        and gathered back (exact: the gradient of a shared history sums its rows'), on their
        real positions only, packed one after another, longest first (`length_buckets`)."""
        B, L, H, hd = seq.shape[0], self.L, self.h, self.hd
        steps = torch.arange(L, device=lengths.device)
        shared = shared_rows(seq, lengths)
        first, inverse = shared if shared is not None else (torch.arange(B, device=seq.device),) * 2
        order = torch.argsort(lengths[first], descending=True, stable=True)
        first = first[order]
        rank = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        inverse, hist_len = rank[inverse], lengths[first]
        x = seq.reshape(B * L, -1).index_select(0, (first[:, None] * L + steps[None])[steps[None] < hist_len[:, None]])
        buckets = length_buckets(hist_len, x.dtype)
        h = self.extractor.forward_packed(self.refiner.forward_packed(self.inp(x), buckets), buckets)  # [N, D]
        N, D = h.shape
        real = steps[None] >= (L - lengths)[:, None]
        hist_start = torch.cumsum(hist_len, 0) - hist_len
        src = torch.where(real, (hist_start[inverse] - L + lengths)[:, None] + steps[None], N)  # N: a zero row
        h = torch.cat([h, h.new_zeros(1, D)]).view(N + 1, H, hd).transpose(0, 1).reshape(H * (N + 1), hd)
        h = h.index_select(0, (src[None] + (N + 1) * torch.arange(H, device=src.device)[:, None, None]).view(-1))
        return h.view(H * B, L, hd), real

    def scores(self, h: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """The target-attention units' scores [H, B L, 1] of right-aligned histories h [H B, L, hd]
        for queries q [H, B, hd]: all heads at once, each on its own weights. Their first layer's
        input [h, q, h*q, h-q, position] is never built: per row one matmul with the key weights
        into which q is folded (as `din_unit_input`), plus the row's q W_q + b and the slot's
        projected position embedding."""
        H, B, hd = q.shape
        L = self.L
        first = [unit[0] for unit in self.units]
        w = torch.stack([f.weight for f in first])  # [H, hidden, 4 hd + P]
        w_h, w_q, w_prod, w_diff, w_pos = w.split([hd, hd, hd, hd, w.shape[-1] - 4 * hd], dim=-1)
        bias = torch.stack([f.bias for f in first])  # [H, hidden]
        w_key, w_prod = (w_h + w_diff).transpose(1, 2).contiguous(), w_prod.transpose(1, 2).contiguous()
        per_key = torch.addcmul(w_key.unsqueeze(1), q.unsqueeze(-1), w_prod.unsqueeze(1))  # [H, B, hd, hidden]
        per_row = torch.baddbmm(bias.unsqueeze(1), q, (w_q - w_diff).transpose(1, 2))  # [H, B, hidden]
        per_slot = torch.matmul(self.position.weight.flip(0), w_pos.transpose(1, 2))  # [H, L, hidden]
        rest = (per_row.unsqueeze(2) + per_slot.unsqueeze(1)).view(H * B, L, -1)
        x = torch.baddbmm(rest, h, per_key.view(H * B, hd, -1))  # [H B, L, hidden]
        depth = len(self.units[0])  # Linear, ReLU, Linear, ReLU, ..., Linear
        x = (x.relu_() if depth > 1 else x).view(H, B * L, -1)  # in place: baddbmm's backward needs no output
        for j in range(2, depth, 2):  # the units' remaining layers
            lin = [unit[j] for unit in self.units]
            x = torch.baddbmm(torch.stack([f.bias for f in lin]).unsqueeze(1), x,
                              torch.stack([f.weight for f in lin]).transpose(1, 2))
            if j + 1 < depth:
                x = torch.relu(x)
        return x


class FoundationModel(nn.Module):
    """EBC + EC + numeric embeddings -> DMIN or DeepFM -> DNN -> logit, with taps and the AE."""

    def __init__(self, layout: FeatureLayout, cfg: ModelConfig, ae_cfg: AutoencoderConfig | None = None,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.layout, self.arch, d = layout, cfg.arch, cfg.embedding_dim
        self.d = d
        self.ebc = EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name=t.name, embedding_dim=d, num_embeddings=t.num_embeddings,
                               feature_names=list(t.features), pooling=PoolingType.MEAN)
            for t in layout.ebc_tables], device=device) if layout.ebc_tables else None
        self.ec = EmbeddingCollection(tables=[
            EmbeddingConfig(name=t.name, embedding_dim=d, num_embeddings=t.num_embeddings,
                            feature_names=list(t.features))
            for t in layout.ec_tables], device=device) if layout.ec_tables else None
        self.numeric = nn.Parameter(torch.randn(len(layout.numeric), d, device=device) * 0.01) \
            if layout.numeric else None
        seq_dim = len(layout.behaviour) * d
        self.dmin = DMIN(seq_dim, layout.max_len, cfg) if cfg.arch == "dmin" and layout.behaviour else None
        lookups = (layout.num_fields + len(layout.behaviour)) * d  # the ``emb`` tap
        # DNN input: DeepFM reads the lookups; DMIN replaces the pooled history by its interests.
        self.dnn_in = lookups if self.dmin is None else layout.num_fields * d + self.dmin.out_dim
        self.tower = Tower(self.dnn_in, list(cfg.dnn), cfg.dropout)
        self.tap_dims = {"emb": lookups, **{f"hidden{i}": h for i, h in enumerate(cfg.dnn)}}
        self.ae_taps: list[str] = []
        self.autoencoder = None
        if ae_cfg is not None and ae_cfg.enabled:  # built last: FM init is the same with or without it
            missing = [t for t in ae_cfg.taps if t not in self.tap_dims]
            if missing:
                raise ValueError(f"autoencoder taps {missing} do not exist; taps: {list(self.tap_dims)}")
            self.ae_taps = list(ae_cfg.taps)
            self.ae_weight = ae_cfg.loss_weight
            self.autoencoder = MatryoshkaAutoencoder(sum(self.tap_dims[t] for t in self.ae_taps), ae_cfg)

    # -- the parts of the forward ---------------------------------------------------------------
    def fields(self, batch) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor | None,
                                     torch.Tensor | None]:
        """Field embeddings [B, d] each, behaviour sequences [B, L, d] each, lengths, target."""
        lay, d = self.layout, self.d
        fields: list[torch.Tensor] = []
        seqs: list[torch.Tensor] = []
        lengths = target = None
        if self.ebc is not None:
            fields.append(self.ebc(batch.sparse).values())
        if self.ec is not None:
            out = self.ec(batch.seq)
            fields.extend(out[t].values() for t in lay.targets)
            for name in lay.ec_bags:
                fields.append(_mean_pool(out[name].to_padded_dense(), out[name].lengths()))
            seqs = [out[s].to_padded_dense(desired_length=lay.max_len) for s in lay.behaviour]
            if seqs:
                lengths = out[lay.behaviour[0]].lengths()
                by_name = {t: out[t].values() for t in lay.targets}
                target = torch.cat([by_name[t] if t is not None else torch.zeros_like(seqs[0][:, 0, :])
                                    for t in lay.seq_target], dim=1)
        if self.numeric is not None:
            fields.append((batch.dense.unsqueeze(-1) * self.numeric).reshape(-1, len(lay.numeric) * d))
        return fields, seqs, lengths, target

    def logits_and_taps(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        fields, seqs, lengths, target = self.fields(batch)
        # ``emb``: the concatenated feature lookups before any interaction (histories mean-pooled)
        emb = torch.cat(fields + [_mean_pool(s, lengths) for s in seqs], dim=1)
        extra = None
        if self.dmin is not None:
            dnn_in = torch.cat(fields + [self.dmin(torch.cat(seqs, dim=-1), lengths, target)], dim=1)
        else:
            dnn_in = emb
            if self.arch == "deepfm":  # second-order FM term over all fields
                f = emb.reshape(-1, self.tap_dims["emb"] // self.d, self.d)
                extra = 0.5 * (f.sum(dim=1).pow(2) - f.pow(2).sum(dim=1)).sum(dim=1)
        # Unsharded submodules are leaves of the pipeline's fx trace: index their outputs, never
        # iterate them.
        out = self.tower(dnn_in)
        logits = out[0] if extra is None else out[0] + extra
        taps = {"emb": emb}
        for i in range(len(self.tower.layers)):
            taps[f"hidden{i}"] = out[1][i]
        return logits, taps

    def forward(self, batch):
        """``(loss, (logits, aux))``: the loss is this rank's share of the global-batch mean."""
        logits, taps = self.logits_and_taps(batch)
        bce = F.binary_cross_entropy_with_logits(logits, batch.labels, reduction="none")
        fm_loss = (bce * batch.weights).sum() / batch.norm
        loss = fm_loss
        aux = {"fm_loss": fm_loss.detach()}
        if self.autoencoder is not None:
            recon = self.autoencoder(self.ae_input(taps))[1]
            ae_loss = (recon * batch.weights).sum() / batch.norm
            loss = loss + self.ae_weight * ae_loss
            aux["ae_loss"] = ae_loss.detach()
        return loss, (logits.detach(), aux)

    def ae_input(self, taps: dict[str, torch.Tensor]) -> torch.Tensor:
        # Stop-gradient: the autoencoder learns from the FM, never the other way round.
        return torch.cat([taps[t] for t in self.ae_taps], dim=1).detach()

    @torch.no_grad()
    def forward_with_taps(self, batch) -> dict[str, torch.Tensor]:
        """Inference outputs for the extract stage: logits, probabilities, every tap, codes ``z``."""
        logits, taps = self.logits_and_taps(batch)
        out = {"logits": logits, "probs": torch.sigmoid(logits), **taps}
        if self.autoencoder is not None:
            out["z"] = self.autoencoder.encode(self.ae_input(taps))
        return out


def _mean_pool(seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean over the first ``lengths`` positions of left-aligned ``seq`` [B, L, d]; empty -> 0."""
    steps = torch.arange(seq.shape[1], device=seq.device)
    mask = (steps.unsqueeze(0) < lengths.unsqueeze(1)).to(seq.dtype)
    return (seq * mask.unsqueeze(-1)).sum(dim=1) / lengths.clamp(min=1).unsqueeze(1).to(seq.dtype)
