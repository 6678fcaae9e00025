"""Training and evaluating one vertical model under the paper's protocol.

One pass over the training batches in the order given (time order: days 5–7 streamed, no
shuffle, no early stopping), then predictions on the evaluation batches (day 8) and AUC, LogLoss,
NE and gAUC (`loopfm.metrics.defined_metrics`, grouped by user; an undefined one is None). Deterministic for a seed: the
seed fixes the initialisation, and the data order is the caller's.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Iterable, Literal, Protocol

import numpy as np
import torch

from loopfm.data.schema import Schema
from loopfm.metrics import defined_metrics
from loopfm.vm.batch import VMBatch
from loopfm.vm.kd import KDConfig, kd_loss, kd_for_variant, uses_current_code, variant_flags
from loopfm.vm.model import VerticalModel, VMModelConfig, build_model


@dataclass(kw_only=True)
class VMTrainConfig:
    """How a VM is trained (`loopfm.vm.train`)."""
    optimizer: Literal["adam"] = field(default="adam", metadata={"help": "optimizer (Adam)"})
    lr: float = field(default=1e-3, metadata={"help": "learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "Adam weight decay"})
    batch_size: int = field(default=256, metadata={
        "help": "examples per batch (used by whoever builds the batches; one step per batch)"})
    grad_clip: float = field(default=0.0, metadata={"help": "clip the gradient norm to this (0 = off)"})
    seed: int = field(default=0, metadata={"help": "seed of the initialisation"})
    log_every: int = field(default=50, metadata={"help": "log training losses every N steps"})
    device: str = field(default="cpu", metadata={"help": "torch device"})

    def __post_init__(self) -> None:
        if self.optimizer != "adam":
            raise ValueError(f"vm.train.optimizer must be 'adam', got {self.optimizer!r}")
        if not self.lr > 0:
            raise ValueError(f"vm.train.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("vm.train.weight_decay and vm.train.grad_clip must be >= 0")
        if self.batch_size < 1 or self.log_every < 1:
            raise ValueError("vm.train.batch_size and vm.train.log_every must be >= 1")


class Logger(Protocol):
    def log(self, scalars: dict, step: int) -> None: ...


@dataclass
class VMResult:
    """What one run returns: the trained model, eval predictions and metrics."""
    model: VerticalModel
    preds: np.ndarray
    labels: np.ndarray
    user_ids: np.ndarray
    metrics: dict[str, float]
    steps: int
    train_loss: float  # mean total loss over the pass


def train_one_pass(model: VerticalModel, batches: Iterable[VMBatch], cfg: VMTrainConfig,
                   kd: KDConfig, logger: Logger | None = None, prefix: str = "train/") -> tuple[int, float]:
    """One streaming pass (one optimizer step per batch, in order). Returns (steps, mean loss)."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    step, total = 0, 0.0
    for batch in batches:
        batch = batch.to(cfg.device)
        loss, parts = kd_loss(model(batch), batch.labels, batch.soft_labels, kd)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        total += parts["loss"]
        if logger is not None and step % cfg.log_every == 0:
            logger.log({prefix + k: v for k, v in parts.items()}, step)
    return step, total / max(step, 1)


@torch.no_grad()
def predict(model: VerticalModel, batches: Iterable[VMBatch], device: str = "cpu"
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Served probabilities (serving head only), labels and user ids over all batches."""
    model.eval()
    preds, labels, users = [], [], []
    for batch in batches:
        batch = batch.to(device)
        preds.append(model.predict(batch).double().cpu().numpy())
        labels.append(batch.labels.cpu().numpy())
        users.append(batch.user_ids.cpu().numpy())
    if not preds:
        raise ValueError("no evaluation batches")
    return np.concatenate(preds), np.concatenate(labels), np.concatenate(users)


def run_vm(model_cfg: VMModelConfig, train_cfg: VMTrainConfig, kd: KDConfig, schema: Schema,
           train_batches: Iterable[VMBatch], eval_batches: Iterable[VMBatch], *,
           variant: str = "baseline", logger: Logger | None = None, prefix: str = "") -> VMResult:
    """Build the VM for ``variant`` (baseline | kd | loopfm | kd+loopfm | kd+current), train it one pass over
    ``train_batches`` and evaluate it on ``eval_batches``.

    The LoopFM code width is read from the first training batch (which must carry a sequence
    for the loopfm variants; for the others any sequence is ignored). Metrics are logged once
    at the last training step under ``{prefix}eval/``.
    """
    kd = kd_for_variant(variant, kd)
    _, use_seq = variant_flags(variant)
    it = iter(train_batches)
    first = next(it, None)
    if first is None:
        raise ValueError("no training batches")
    if use_seq and not first.has_sequence:
        raise ValueError(f"variant {variant!r} needs LoopFM sequences in the batches")
    current = uses_current_code(variant)
    if current and first.current_code is None:
        raise ValueError(f"variant {variant!r} needs the FM's code of each example in the batches")
    torch.manual_seed(train_cfg.seed)
    model = build_model(model_cfg, schema, seq_dim=first.seq_dim if use_seq else None, kd=kd,
                        current_dim=first.current_code.shape[1] if current else None).to(train_cfg.device)
    steps, loss = train_one_pass(model, itertools.chain([first], it), train_cfg, kd, logger, prefix + "train/")
    preds, labels, users = predict(model, eval_batches, train_cfg.device)
    metrics = defined_metrics(labels, preds, groups=users)  # undefined ones None, with the reason
    if logger is not None:
        logger.log({f"{prefix}eval/{k}": v for k, v in metrics.items()}, steps)
    return VMResult(model, preds, labels, users, metrics, steps, loss)
