"""The vertical-model base class, its config, and `build_model` (the zoo lives in `models/`).

A vertical model (VM) reads only VM-visible features (`Schema.vm_features()`), embeds them as
fields [B, F, D], optionally appends

* the LoopFM sequence pooled by a `SequenceEncoder` and projected to D (one more field), and
* the model's own reading of a raw-id behaviour sequence (``VMBatch.raw_seq``, item ids embedded
  with the VM's item table) — the "raw user seq" of table 4 of the paper,
* the FM's code of the example itself projected to D (``VMBatch.current_code``, one more field):
  the "current-sample embedding" of table 2, which needs the FM at serving time,

and reduces them to a trunk vector h [B, T] (`trunk`, one per model). A serving head
``Linear(T, 1)`` gives the served logit; with ``kd.mode == "aux_head"`` an auxiliary head reads
``scale_grad(h, β)`` (`loopfm.vm.kd`). Every input size is computed from the schema and the code
width, never written by hand.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from loopfm.data.schema import Schema
from loopfm.vm.encoders import ENCODERS, EncoderKind, SequenceEncoder
from loopfm.vm.kd import KDConfig, scale_grad
from loopfm.vm.layers import FeatureEmbedding, masked_mean

ModelName = Literal["fm", "fmfm", "deepfm", "din", "dien", "dmr", "dmin"]
MODELS = ("fm", "fmfm", "deepfm", "din", "dien", "dmr", "dmin")


@dataclass(kw_only=True)
class VMModelConfig:
    """One vertical model (`loopfm.vm.model`, `loopfm.vm.models`)."""
    model: ModelName = field(default="deepfm", metadata={
        "help": f"architecture: one of {list(MODELS)} (fm = factorization machine)"})
    embedding_dim: int = field(default=16, metadata={"help": "dimension D of every feature embedding"})
    dnn: list[int] = field(default_factory=lambda: [128, 64], metadata={
        "help": "hidden sizes of the DNN tower (deepfm, din, dien, dmr, dmin)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout after each DNN hidden layer"})
    encoder: EncoderKind = field(default="dmin", metadata={
        "help": "LoopFM sequence encoder: mean | sum | din | dmin (multi-head attention, INT4 kernel)"})
    heads: int = field(default=2, metadata={
        "help": "attention heads of the dmin encoder and of DMIN's own behaviour module"})
    attention_mlp: list[int] = field(default_factory=lambda: [64, 32], metadata={
        "help": "hidden sizes of DIN-style attention scorers"})
    raw_seq: bool = field(default=False, metadata={
        "help": "read VMBatch.raw_seq (past item ids) with the model's own behaviour module "
                "(DIN/DIEN/DMR/DMIN) or as a mean-pooled field (FM/FmFM/DeepFM)"})
    max_position: int = field(default=200, metadata={
        "help": "positions (recency ranks) with their own embedding; older entries share the last"})
    kernel_backend: Literal["auto", "reference", "torch", "triton"] = field(default="auto", metadata={
        "help": "backend of kernels.int4_attend for INT4 sequences (auto: Triton on CUDA, else the fast "
                "PyTorch path 'torch'; 'reference' is the readable oracle)"})

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"vm.model.model must be one of {MODELS}, got {self.model!r}")
        if self.encoder not in ENCODERS:
            raise ValueError(f"vm.model.encoder must be one of {ENCODERS}, got {self.encoder!r}")
        for name in ("embedding_dim", "heads", "max_position"):
            if getattr(self, name) < 1:
                raise ValueError(f"vm.model.{name} must be >= 1, got {getattr(self, name)}")
        if any(h < 1 for h in self.dnn) or any(h < 1 for h in self.attention_mlp):
            raise ValueError("vm.model.dnn and vm.model.attention_mlp sizes must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"vm.model.dropout must be in [0, 1), got {self.dropout}")


def _mean_weights(groups: list[list[int]], num_fields: int) -> Tensor:
    """[G, F]: row g averages the fields of ``groups[g]``."""
    w = torch.zeros(len(groups), num_fields)
    for g, idx in enumerate(groups):
        w[g, idx] = 1.0 / len(idx)
    return w


class VerticalModel(nn.Module):
    """Shared skeleton: fields → `trunk` (per model) → serving head (+ auxiliary KD head).

    Subclasses set ``num_raw_fields`` and build their raw-sequence module in ``__init__`` (after
    ``super().__init__``), override `raw_fields` if they read the raw sequence their own way,
    implement `trunk`, and finish with `build_heads`.
    """

    num_raw_fields = 1  # fields the raw sequence adds when cfg.raw_seq (default: one mean-pool)
    num_raw_dense = 0  # scalars it adds beside them (DMR's relevance scores)

    def __init__(self, cfg: VMModelConfig, schema: Schema, *, seq_dim: int | None = None,
                 kd: KDConfig | None = None, current_dim: int | None = None) -> None:
        super().__init__()
        self.cfg, self.kd = cfg, kd or KDConfig(mode="none")
        D = cfg.embedding_dim
        features = schema.vm_features()
        self.embedding = FeatureEmbedding(features, D)
        roles = [f.role for f in features]
        self.item_fields = [i for i, r in enumerate(roles) if r == "item"]
        self.user_fields = [i for i, r in enumerate(roles) if r == "user"]
        self.item_vocab = schema.feature(schema.item_key).vocab_name
        if cfg.raw_seq and self.item_vocab not in self.embedding.tables:
            raise ValueError(f"raw_seq needs the VM-visible item key {schema.item_key!r} (its table embeds the ids)")
        self.query_dim = D * (bool(self.item_fields) + bool(self.user_fields)) or D
        # means over field groups as [groups, F] weights: one matmul (and one back), where indexing
        # the fields costs an index and a scatter-add per batch
        F = len(features)
        groups = [idx for idx in (self.item_fields, self.user_fields) if idx] or [list(range(F))]
        self.register_buffer("query_means", _mean_weights(groups, F), persistent=False)
        self.register_buffer("target_means", _mean_weights([self.item_fields or list(range(F))], F),
                             persistent=False)
        self.encoder = None
        if seq_dim is not None:
            self.encoder = SequenceEncoder(cfg.encoder, seq_dim, self.query_dim, heads=cfg.heads,
                                           attention_hidden=tuple(cfg.attention_mlp), backend=cfg.kernel_backend)
            self.seq_proj = nn.Linear(self.encoder.out_dim, D)
        self.current_proj = nn.Linear(current_dim, D) if current_dim is not None else None

    # -- fields -----------------------------------------------------------------------------------
    @property
    def num_fields(self) -> int:
        """Fields the interaction layers see: features + LoopFM field + current-code field +
        raw-sequence fields."""
        return (self.embedding.num_fields + (self.encoder is not None) + (self.current_proj is not None)
                + (self.num_raw_fields if self.cfg.raw_seq else 0))

    def target(self, emb: Tensor) -> Tensor:
        """The target item [B, D]: mean of the item-role fields (all fields if there are none)."""
        return torch.matmul(self.target_means, emb).squeeze(1)

    def query(self, emb: Tensor) -> Tensor:
        """Attention query for the LoopFM encoder: [target item, user] embeddings."""
        return torch.matmul(self.query_means, emb).flatten(1)

    def raw_sequence(self, batch) -> tuple[Tensor, Tensor]:
        if batch.raw_seq is None:
            raise ValueError("this model was built with raw_seq=True; the batch carries no raw_seq")
        return self.embedding.lookup(self.item_vocab, batch.raw_seq), batch.raw_seq_lengths

    @property
    def num_dense(self) -> int:
        return self.num_raw_dense if self.cfg.raw_seq else 0

    def raw_fields(self, batch, emb: Tensor) -> tuple[list[Tensor], Tensor | None]:
        """Default reading of the raw sequence: its mean-pooled item embedding as one field."""
        seq, lengths = self.raw_sequence(batch)
        return [masked_mean(seq, lengths)], None

    def fields(self, batch) -> tuple[Tensor, Tensor]:
        """(fields [B, num_fields, D], extra scalars [B, num_dense])."""
        emb = self.embedding(batch)
        extra: list[Tensor] = []
        dense = emb.new_zeros(emb.shape[0], 0)
        if self.encoder is not None:
            extra.append(self.seq_proj(self.encoder(batch, self.query(emb))))
        if self.current_proj is not None:
            if batch.current_code is None:
                raise ValueError("this model was built with the FM's current code; the batch carries none")
            extra.append(self.current_proj(batch.current_code.float()))
        if self.cfg.raw_seq:
            raw, raw_dense = self.raw_fields(batch, emb)
            extra.extend(raw)
            if raw_dense is not None:
                dense = raw_dense
        x = torch.cat([emb] + [f[:, None] for f in extra], 1) if extra else emb
        return x, dense

    @property
    def deep_input_dim(self) -> int:
        F0, F = self.embedding.num_fields, self.num_fields
        return (F + (F - F0)) * self.cfg.embedding_dim + self.num_dense

    def deep_input(self, x: Tensor, dense: Tensor) -> Tensor:
        """DNN input of the sequential models: the flattened fields, the extra scalars, and
        target ⊙ each sequence field (the LoopFM field and the raw-sequence fields), as DIN's and
        DIEN's reference code feed ``item_emb * item_his_sum`` to their DNN: an MLP learns such
        products slowly, and one streaming pass gives it little time."""
        F0 = self.embedding.num_fields
        parts = [x.flatten(1)] + ([dense] if dense.shape[1] else [])
        if x.shape[1] > F0:
            parts.append((self.target(x[:, :F0])[:, None] * x[:, F0:]).flatten(1))
        return torch.cat(parts, -1) if len(parts) > 1 else parts[0]  # one part: a view, no copy

    # -- heads ------------------------------------------------------------------------------------
    def build_heads(self, trunk_dim: int, fm_dims: int = 0) -> None:
        """Serving (and auxiliary) heads over h [B, trunk_dim]; the first ``fm_dims`` entries of h
        are FM terms whose head weights start at 1, so the model starts as its textbook formula."""
        self.trunk_dim = trunk_dim

        def head() -> nn.Linear:
            lin = nn.Linear(trunk_dim, 1)
            with torch.no_grad():
                lin.weight[:, :fm_dims] = 1.0
                lin.bias.zero_()
            return lin
        self.head = head()
        self.aux_head = head() if self.kd.mode == "aux_head" else None

    def trunk(self, batch) -> Tensor:
        raise NotImplementedError

    def forward(self, batch) -> dict[str, Tensor]:
        h = self.trunk(batch)
        out = {"logit": self.head(h).squeeze(-1)}
        if self.aux_head is not None:
            out["aux_logit"] = self.aux_head(scale_grad(h, self.kd.beta)).squeeze(-1)
        return out

    @torch.no_grad()
    def predict(self, batch) -> Tensor:
        """Served probability: the serving head only."""
        return torch.sigmoid(self.head(self.trunk(batch)).squeeze(-1))


def build_model(cfg: VMModelConfig, schema: Schema, *, seq_dim: int | None = None,
                kd: KDConfig | None = None, current_dim: int | None = None) -> VerticalModel:
    """The configured VM; ``seq_dim`` = LoopFM code width d (None: no sequence, e.g. baseline);
    ``current_dim`` = width of the example's own FM code (None: not an input)."""
    from loopfm.vm.models import MODEL_CLASSES
    return MODEL_CLASSES[cfg.model](cfg, schema, seq_dim=seq_dim, kd=kd, current_dim=current_dim)
