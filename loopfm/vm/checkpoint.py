"""A trained VM on disk: its state dict plus what rebuilds the module (config, KD heads, input widths).

One file per run, ``torch.save`` of plain dicts, lists, numbers and tensors, so it loads with
``torch.load(weights_only=True)`` (no pickle of classes). The export command rebuilds the model
from it and the run's schema.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from loopfm.data.schema import Schema
from loopfm.vm.kd import KDConfig
from loopfm.vm.model import VerticalModel, VMModelConfig, build_model

FORMAT = 2  # 2: the embedding tables are one stacked weight (FeatureEmbedding.weight)


def vm_checkpoint(model: VerticalModel) -> dict:
    """Everything `load_vm` needs, on the CPU."""
    return {"format": FORMAT, "model": dataclasses.asdict(model.cfg), "kd": dataclasses.asdict(model.kd),
            "seq_dim": None if model.encoder is None else int(model.encoder.code_dim),
            "current_dim": None if model.current_proj is None else int(model.current_proj.in_features),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}


def checkpoint_path(folder: str | Path, name: str) -> Path:
    """``folder/models/<model>/<variant>/<seed>.pt`` for a run named ``model/variant/seed``."""
    return Path(folder) / "models" / f"{name}.pt"


def save_checkpoints(folder: str | Path, checkpoints: dict[str, dict]) -> None:
    for name, ckpt in checkpoints.items():
        path = checkpoint_path(folder, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(ckpt, path)


def load_vm(path: str | Path, schema: Schema) -> VerticalModel:
    """The trained VM saved at ``path`` (by `vm_checkpoint`), in eval mode."""
    ckpt = torch.load(path, weights_only=True, map_location="cpu")
    if ckpt.get("format") != FORMAT:
        raise ValueError(f"{path}: VM checkpoint format {ckpt.get('format')!r}, expected {FORMAT}")
    model = build_model(VMModelConfig(**ckpt["model"]), schema, seq_dim=ckpt["seq_dim"],
                        kd=KDConfig(**ckpt["kd"]), current_dim=ckpt["current_dim"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()
