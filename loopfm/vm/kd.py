"""Knowledge distillation from the FM's soft labels ŷ_F (the scalar channel beside LoopFM).

``aux_head`` (the paper's KD, the auxiliary-head scheme of ExFM, Liang et al. 2025): the VM's
shared trunk h feeds two heads. The serving head is trained on the true label; the auxiliary head
is trained on ``min(α·ŷ_F, 1)`` with loss weight γ, and its gradient into the trunk is scaled by β
(`scale_grad` on h before the auxiliary head: identity forward, ×β backward). Serving uses the
serving head only, so the auxiliary head's weights never change a served prediction.

``soft_label``: plain KD, ``BCE(ŷ_V, y) + λ·BCE(ŷ_V, ŷ_F)`` on the serving head.
``none``: ``BCE(ŷ_V, y)``.

Variants (the paper's four rows): ``baseline`` (no KD, no sequence), ``kd``, ``loopfm``
(sequence, no KD), ``kd+loopfm``; `variant_flags` maps a name to (KD on, sequence on). One more
for table 2: ``kd+current`` (KD, and the FM's code of the example being scored as one more
input, which needs the FM at serving time; `uses_current_code`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

KDMode = Literal["none", "aux_head", "soft_label"]
KD_MODES = ("none", "aux_head", "soft_label")
TABLE1_VARIANTS = ("baseline", "kd", "loopfm", "kd+loopfm")  # the default comparison
VARIANTS = (*TABLE1_VARIANTS, "kd+current")
# name -> (KD on, LoopFM sequence on, the example's own FM code on)
_FLAGS = {"baseline": (False, False, False), "kd": (True, False, False), "loopfm": (False, True, False),
          "kd+loopfm": (True, True, False), "kd+current": (True, False, True)}


@dataclass(kw_only=True)
class KDConfig:
    """How the VM uses the FM's soft labels (`loopfm.vm.kd`)."""
    mode: KDMode = field(default="aux_head", metadata={
        "help": "none | aux_head (ExFM auxiliary head, the paper's KD) | soft_label (λ·BCE(ŷ_V, ŷ_F))"})
    alpha: float = field(default=5.0, metadata={"help": "aux_head: target = min(alpha * soft label, 1)"})
    gamma: float = field(default=10.0, metadata={"help": "aux_head: weight of the auxiliary head's loss"})
    beta: float = field(default=5.0, metadata={
        "help": "aux_head: scale of the auxiliary loss's gradient into the shared trunk"})
    lam: float = field(default=1.0, metadata={"help": "soft_label: weight λ of BCE(ŷ_V, ŷ_F)"})

    def __post_init__(self) -> None:
        if self.mode not in KD_MODES:
            raise ValueError(f"kd.mode must be one of {KD_MODES}, got {self.mode!r}")
        for name in ("alpha", "gamma", "beta", "lam"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"kd.{name} must be >= 0, got {getattr(self, name)}")

    @property
    def enabled(self) -> bool:
        return self.mode != "none"


def variant_flags(variant: str) -> tuple[bool, bool]:
    """``variant`` → (KD on, LoopFM sequence on)."""
    if variant not in _FLAGS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    return _FLAGS[variant][:2]


def uses_current_code(variant: str) -> bool:
    """Whether ``variant`` feeds the FM's code of the example itself (real-time FM, table 2)."""
    variant_flags(variant)  # a clear error for an unknown name
    return _FLAGS[variant][2]


def kd_for_variant(variant: str, kd: KDConfig) -> KDConfig:
    """The KD config a variant runs with: ``kd`` unchanged when the variant distils, else mode none."""
    on, _ = variant_flags(variant)
    if on and not kd.enabled:
        raise ValueError(f"variant {variant!r} needs KD but kd.mode is 'none'")
    return kd if on else dataclasses.replace(kd, mode="none")


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.scale, None


def scale_grad(x: Tensor, scale: float) -> Tensor:
    """Identity forward; multiplies the incoming gradient by ``scale`` on the way back."""
    return _ScaleGrad.apply(x, float(scale))


def aux_target(soft_labels: Tensor, alpha: float) -> Tensor:
    """The auxiliary head's target ``min(α·ŷ_F, 1)``."""
    return torch.clamp(alpha * soft_labels, max=1.0)


def kd_loss(out: dict[str, Tensor], labels: Tensor, soft_labels: Tensor | None,
            cfg: KDConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """Total loss of one batch and its parts (detached 0-d tensors, for logging: reading them is
    a host sync, so the trainer does it only when it logs).

    ``out`` has ``logit`` (serving head) and, for aux_head, ``aux_logit``; both [B]."""
    task = F.binary_cross_entropy_with_logits(out["logit"], labels)
    if cfg.mode == "none":
        return task, {"loss_task": task.detach(), "loss": task.detach()}
    if soft_labels is None:
        raise ValueError(f"kd.mode={cfg.mode!r} needs soft labels in every training batch")
    if cfg.mode == "aux_head":
        if "aux_logit" not in out:
            raise ValueError("kd.mode='aux_head' needs a model built with that KDConfig (it has no aux head)")
        kd = cfg.gamma * F.binary_cross_entropy_with_logits(out["aux_logit"], aux_target(soft_labels, cfg.alpha))
    else:
        kd = cfg.lam * F.binary_cross_entropy_with_logits(out["logit"], soft_labels.clamp(0.0, 1.0))
    total = task + kd
    return total, {"loss_task": task.detach(), "loss_kd": kd.detach(), "loss": total.detach()}
