"""Training and evaluating one vertical model under the paper's protocol.

One pass over the training batches in the order given (time order: days 5–7 streamed, no
shuffle, no early stopping), then predictions on the evaluation batches (day 8) and AUC, LogLoss,
NE and gAUC (`loopfm.metrics.defined_metrics`, grouped by user; an undefined one is None). Deterministic for a seed: the
seed fixes the initialisation, and the data order is the caller's.

Speed (the VMs are small, so the loop around the model matters): Adam runs fused on one flat
tensor holding every parameter (`FlatAdam`: no per-tensor work, row gradients for embeddings),
the loss stays on the device and is read only every ``log_every`` steps and once at the end (no
host sync per step), and batches already on the training device are used as they are. On CUDA, batches are pinned once and copied with
``non_blocking`` one step ahead, and the INT4 sequence encoder runs the Triton op
(``vm.model.kernel_backend: auto``).
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Literal, Protocol

import numpy as np
import torch

from loopfm.data.schema import Schema
from loopfm.metrics import defined_metrics
from loopfm.vm.batch import VMBatch
from loopfm.vm.kd import KDConfig, kd_loss, kd_for_variant, uses_current_code, variant_flags
from loopfm.vm.layers import FeatureEmbedding
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
    device: str = field(default="auto", metadata={
        "help": "auto (cuda when a GPU is visible, else cpu) | cpu | cuda | cuda:N"})

    def __post_init__(self) -> None:
        if self.optimizer != "adam":
            raise ValueError(f"vm.train.optimizer must be 'adam', got {self.optimizer!r}")
        if not self.lr > 0:
            raise ValueError(f"vm.train.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("vm.train.weight_decay and vm.train.grad_clip must be >= 0")
        if self.batch_size < 1 or self.log_every < 1:
            raise ValueError("vm.train.batch_size and vm.train.log_every must be >= 1")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"vm.train.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")


def resolve_device(name: str) -> torch.device:
    """The torch device of ``vm.train.device`` (auto: cuda when a GPU is visible, else cpu)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"vm.train.device={name!r} but no GPU is visible (torch.cuda.is_available() is False)")
    return device


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


class FlatAdam:
    """Adam (fused) over every parameter of a model as one flat tensor; a context manager.

    Adam is elementwise, so updating one flat tensor is `torch.optim.Adam` on each parameter.
    What changes is the cost around it: a VM has dozens of small tensors, and torch's per-tensor
    bookkeeping (grouping, state lookups, one kernel per tensor, zero_grad per tensor) plus one
    dense ``[V, D]`` gradient per embedding lookup was over a third of a DeepFM step. Inside the
    ``with``, parameters are views into one buffer and their ``.grad`` views into another, so
    autograd adds into the flat gradient in place, `zero_grad` is one fill, `step` one kernel on
    one tensor, and embedding lookups emit row (sparse) gradients that add only the rows they
    touched (`FeatureEmbedding.grad_into`: one ``index_add_``). On exit every parameter gets its own
    storage back and the embeddings their setting.
    """

    def __init__(self, model: torch.nn.Module, cfg: VMTrainConfig) -> None:
        self.model, self.cfg = model, cfg
        self.params = [p for p in model.parameters() if p.requires_grad]

    def __enter__(self) -> "FlatAdam":
        first = self.params[0]
        if any(p.dtype != first.dtype or p.device != first.device for p in self.params):
            raise ValueError("FlatAdam needs every parameter in one dtype on one device")
        total = sum(p.numel() for p in self.params)
        self.flat = torch.nn.Parameter(torch.empty(total, dtype=first.dtype, device=first.device))
        self.flat.grad = torch.zeros_like(self.flat)
        offset = 0
        for p in self.params:
            n = p.numel()
            view = self.flat.data[offset:offset + n].view_as(p)
            view.copy_(p.detach())
            p.data, p.grad = view, self.flat.grad[offset:offset + n].view_as(p)
            offset += n
        self.sparse = {m: m.sparse for m in self.model.modules() if isinstance(m, (torch.nn.Embedding, FeatureEmbedding))}
        for m in self.sparse:
            m.sparse = True  # dense += sparse rows: the flat gradient is updated in place
            if isinstance(m, FeatureEmbedding):
                m.grad_into = True  # fields: one index_add into the flat gradient
        self.adam = torch.optim.Adam([self.flat], lr=self.cfg.lr, weight_decay=self.cfg.weight_decay, fused=True)
        return self

    def zero_grad(self) -> None:
        self.flat.grad.zero_()

    def step(self) -> None:
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([self.flat], self.cfg.grad_clip)
        self.adam.step()

    def __exit__(self, *exc) -> None:
        for p in self.params:
            p.data, p.grad = p.data.clone(), None
        for m, sparse in self.sparse.items():
            m.sparse = sparse
            if isinstance(m, FeatureEmbedding):
                m.grad_into = False


def on_device(batches: Iterable[VMBatch], device: torch.device) -> Iterator[VMBatch]:
    """The batches on ``device``: as they are when already there; else pinned and copied with
    ``non_blocking`` one batch ahead, so the copy of the next batch overlaps this step's work."""
    it = iter(batches)
    if device.type == "cpu":
        for batch in it:
            yield batch if batch.device.type == "cpu" else batch.to(device)
        return
    ahead = None
    for batch in it:
        moved = batch.to(device, non_blocking=True)
        if ahead is not None:
            yield ahead
        ahead = moved
    if ahead is not None:
        yield ahead


def train_one_pass(model: VerticalModel, batches: Iterable[VMBatch], cfg: VMTrainConfig,
                   kd: KDConfig, logger: Logger | None = None, prefix: str = "train/") -> tuple[int, float]:
    """One streaming pass (one optimizer step per batch, in order). Returns (steps, mean loss).

    The model must already be on the training device (`resolve_device`)."""
    device = next(model.parameters()).device
    model.train()
    step = 0
    total = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: no sync per step
    with FlatAdam(model, cfg) as opt:
        for batch in on_device(batches, device):
            loss, parts = kd_loss(model(batch), batch.labels, batch.soft_labels, kd)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            total += parts["loss"]
            if logger is not None and step % cfg.log_every == 0:
                logger.log({prefix + k: float(v) for k, v in parts.items()}, step)
    return step, float(total) / max(step, 1)


@torch.no_grad()
def predict(model: VerticalModel, batches: Iterable[VMBatch]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Served probabilities (serving head only), labels and user ids over all batches.

    Runs on the model's device; predictions are copied back once at the end, labels and user ids
    come from the host batches."""
    model_device = next(model.parameters()).device
    model.eval()
    host = list(batches)
    if not host:
        raise ValueError("no evaluation batches")
    preds = [model.predict(batch) for batch in on_device(host, model_device)]
    labels = np.concatenate([batch.labels.cpu().numpy() for batch in host])
    users = np.concatenate([batch.user_ids.cpu().numpy() for batch in host])
    return torch.cat(preds).double().cpu().numpy(), labels, users


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
    device = resolve_device(train_cfg.device)
    torch.manual_seed(train_cfg.seed)  # on the CPU generator: the same initialisation on every device
    model = build_model(model_cfg, schema, seq_dim=first.seq_dim if use_seq else None, kd=kd,
                        current_dim=first.current_code.shape[1] if current else None).to(device)
    steps, loss = train_one_pass(model, itertools.chain([first], it), train_cfg, kd, logger, prefix + "train/")
    preds, labels, users = predict(model, eval_batches)
    metrics = defined_metrics(labels, preds, groups=users)  # undefined ones None, with the reason
    if logger is not None:
        logger.log({f"{prefix}eval/{k}": v for k, v in metrics.items()}, steps)
    return VMResult(model, preds, labels, users, metrics, steps, loss)
