"""Configuration of the foundation model stage (``fm:`` section of an experiment config).

Pure dataclasses with no torch import, so that loading a config stays cheap; each section
configures one module of ``loopfm.fm`` (named in its docstring). Checks live in
``__post_init__``; unknown keys are rejected by the config loader.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

TAPS = ("emb", "hidden0", "hidden1", "hidden2")


class FMConfigError(ValueError):
    """An FM config that does not fit the event log (unknown feature or day, bad batch split)."""


@dataclass(kw_only=True)
class ModelConfig:
    """The FM for one device (`loopfm.fm.model`)."""
    arch: Literal["dmin", "deepfm"] = field(default="dmin", metadata={
        "help": "interaction architecture: dmin (multi-interest attention over the behaviour "
                "sequence, the paper's FM) or deepfm (FM + DNN, histories mean-pooled)"})
    embedding_dim: int = field(default=32, metadata={"help": "dimension of every embedding table"})
    dnn: list[int] = field(default_factory=lambda: [512, 256, 128], metadata={
        "help": "hidden sizes of the DNN tower; its layers are the taps hidden0, hidden1, ..."})
    dropout: float = field(default=0.0, metadata={"help": "dropout after each DNN hidden layer"})
    num_heads: int = field(default=2, metadata={"help": "DMIN: attention heads (= interests)"})
    head_dim: int = field(default=32, metadata={"help": "DMIN: width of one attention head"})
    attention_mlp: list[int] = field(default_factory=lambda: [64, 32], metadata={
        "help": "DMIN: hidden sizes of each head's target-attention unit"})
    position_dim: int = field(default=8, metadata={
        "help": "DMIN: size of the position (recency) embedding fed to the target attention"})
    groups: list[str] = field(default_factory=list, metadata={
        "help": "feature groups (schema FeatureSpec.group) the FM sees; empty = all"})
    features: list[str] = field(default_factory=list, metadata={
        "help": "explicit feature names the FM sees (overrides groups); empty = all"})
    sequence_group: str = field(default="history", metadata={
        "help": "sequence features of this group form the behaviour sequence (aligned, same "
                "max_len, attended by DMIN); other sequence features are mean-pooled bags"})

    def __post_init__(self) -> None:
        if self.embedding_dim < 1:
            raise ValueError(f"fm.model.embedding_dim must be >= 1, got {self.embedding_dim}")
        if any(h < 1 for h in self.dnn) or any(h < 1 for h in self.attention_mlp):
            raise ValueError("fm.model.dnn and fm.model.attention_mlp sizes must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"fm.model.dropout must be in [0, 1), got {self.dropout}")
        for name in ("num_heads", "head_dim", "position_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"fm.model.{name} must be >= 1, got {getattr(self, name)}")


@dataclass(kw_only=True)
class AutoencoderConfig:
    """The Matryoshka autoencoder co-trained on stop-gradient taps (`loopfm.fm.autoencoder`)."""
    enabled: bool = field(default=True, metadata={"help": "co-train the autoencoder"})
    taps: list[str] = field(default_factory=lambda: ["hidden0"], metadata={
        "help": f"FM layers whose concatenation is compressed, from {list(TAPS)}; "
                "several = joint compression"})
    dim: int = field(default=32, metadata={"help": "code size d (encoder output, tanh-bounded)"})
    prefixes: list[int] = field(default_factory=lambda: [8, 16, 32], metadata={
        "help": "Matryoshka prefix sizes, increasing, the last equal to dim; one decoder each"})
    hidden: list[int] = field(default_factory=lambda: [256], metadata={
        "help": "encoder hidden sizes (decoders mirror them)"})
    loss_weight: float = field(default=1.0, metadata={"help": "weight of the AE loss in the total"})

    def __post_init__(self) -> None:
        bad = [t for t in self.taps if t not in TAPS]
        if bad or not self.taps:
            raise ValueError(f"fm.autoencoder.taps must be a non-empty subset of {list(TAPS)}, got {self.taps}")
        if len(set(self.taps)) != len(self.taps):
            raise ValueError(f"fm.autoencoder.taps has duplicates: {self.taps}")
        if self.dim < 1:
            raise ValueError(f"fm.autoencoder.dim must be >= 1, got {self.dim}")
        if (not self.prefixes or sorted(set(self.prefixes)) != self.prefixes
                or self.prefixes[0] < 1 or self.prefixes[-1] != self.dim):
            raise ValueError("fm.autoencoder.prefixes must be strictly increasing, >= 1, and end "
                             f"at dim={self.dim}; got {self.prefixes}")
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"fm.autoencoder.hidden sizes must be >= 1, got {self.hidden}")
        if self.loss_weight < 0:
            raise ValueError(f"fm.autoencoder.loss_weight must be >= 0, got {self.loss_weight}")


@dataclass(kw_only=True)
class OptimizerConfig:
    """Fused sparse optimizer (in backward, on the embedding shards) and dense Adam."""
    sparse: Literal["rowwise_adagrad", "adagrad", "sgd"] = field(default="rowwise_adagrad", metadata={
        "help": "fused optimizer of the embedding tables (Adam is not available on CPU)"})
    sparse_lr: float = field(default=0.05, metadata={"help": "learning rate of the embedding tables"})
    dense_lr: float = field(default=1e-3, metadata={"help": "Adam learning rate of the dense part"})

    def __post_init__(self) -> None:
        if self.sparse_lr <= 0 or self.dense_lr <= 0:
            raise ValueError("fm.optimizer learning rates must be > 0")


@dataclass(kw_only=True)
class ParallelConfig:
    """Sharding and device (`loopfm.fm.parallelize`)."""
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={
        "help": "auto = cuda (nccl) when available, else cpu (gloo)"})
    sharding_types: list[str] = field(default_factory=lambda: ["table_wise", "column_wise"], metadata={
        "help": "sharding types the planner may choose per table (table_wise, column_wise, row_wise, "
                "table_column_wise); row-wise types are dropped for pooled tables on CPU"})
    cpu_threads: int = field(default=0, metadata={
        "help": "torch CPU threads per process; 0 = OMP_NUM_THREADS if set, else cores / local processes "
                "(on a small shared CPU, 1 is often much faster)"})

    def __post_init__(self) -> None:
        if self.cpu_threads < 0:
            raise ValueError(f"fm.parallel.cpu_threads must be >= 0, got {self.cpu_threads}")
        allowed = ("table_wise", "column_wise", "row_wise", "table_column_wise")
        bad = [s for s in self.sharding_types if s not in allowed]
        if bad or not self.sharding_types:
            raise ValueError(f"fm.parallel.sharding_types must be a non-empty subset of {list(allowed)}, "
                             f"got {self.sharding_types}")


@dataclass(kw_only=True)
class TrainConfig:
    """The training protocol (`loopfm.fm.train`)."""
    train_days: list[int] = field(default_factory=lambda: [1, 2, 3, 4], metadata={
        "help": "days trained on, in this order (one pass in time order per epoch)"})
    eval_days: list[int] = field(default_factory=lambda: [5, 6, 7, 8], metadata={
        "help": "days evaluated after training (AUC, LogLoss, NE per day)"})
    batch_size: int = field(default=512, metadata={
        "help": "global batch size (split evenly over ranks; must divide by the world size)"})
    eval_batch_size: int = field(default=4096, metadata={"help": "global batch size for evaluation"})
    epochs: int = field(default=1, metadata={"help": "passes over the training days"})
    checkpoint_every_steps: int = field(default=0, metadata={
        "help": "also checkpoint every N steps (0 = only at each day end)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "checkpoints kept for resume"})
    log_every_steps: int = field(default=50, metadata={"help": "training scalars every N steps"})
    max_steps: int = field(default=0, metadata={
        "help": "stop (without finishing) after this many steps in total, as if killed; 0 = no limit"})
    refresh_days: list[int] = field(default_factory=list, metadata={
        "help": "after training and evaluation, go on training one streaming pass per day over these "
                "days (the FM's daily incremental update) and keep the FM as of each day's end in "
                "RUN/fm/daily/day=K: the 'latest checkpoint of each day' of extract.fm_checkpoint=daily"})

    def __post_init__(self) -> None:
        if not self.train_days:
            raise ValueError("fm.train.train_days must not be empty")
        if self.refresh_days:
            if sorted(set(self.refresh_days)) != self.refresh_days or self.refresh_days[0] <= max(self.train_days):
                raise ValueError("fm.train.refresh_days must be increasing and after the last training day "
                                 f"{max(self.train_days)}, got {self.refresh_days}")
        overlap = set(self.train_days) & set(self.eval_days)
        if overlap:
            raise ValueError(f"fm.train: days {sorted(overlap)} are both trained on and evaluated")
        for name in ("batch_size", "eval_batch_size", "epochs", "log_every_steps", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"fm.train.{name} must be >= 1, got {getattr(self, name)}")
        if self.checkpoint_every_steps < 0 or self.max_steps < 0:
            raise ValueError("fm.train.checkpoint_every_steps and max_steps must be >= 0")


@dataclass(kw_only=True)
class FMConfig:
    """The foundation model: architecture, autoencoder, optimizers, sharding, protocol."""
    model: ModelConfig = field(default_factory=ModelConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        deep = [t for t in self.autoencoder.taps if t.startswith("hidden") and self.autoencoder.enabled]
        for t in deep:
            if int(t[len("hidden"):]) >= len(self.model.dnn):
                raise ValueError(f"fm.autoencoder.taps: {t} needs a DNN with more than "
                                 f"{len(self.model.dnn)} layers (fm.model.dnn={self.model.dnn})")
