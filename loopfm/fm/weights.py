"""Load a trained FM for inference: ``RUN_DIR/fm`` (weights, config, schema) -> one unsharded model.

What later stages (extract) need, without the trainer: no process group, planner, DMP or train
pipeline. The model class itself is TorchRec's (EBC + EC), run unsharded on one process.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from loopfm.artifacts import read_manifest
from loopfm.data.schema import Schema
from loopfm.fm.config import AutoencoderConfig, FMConfig, ModelConfig, OptimizerConfig, ParallelConfig, TrainConfig
from loopfm.fm.features import FeatureLayout, select_features
from loopfm.fm.model import FoundationModel


def fm_config_from_dict(data: dict) -> FMConfig:
    """Rebuild an `FMConfig` from ``fm_config.json`` (plain dataclass fields, no config loader)."""
    return FMConfig(model=ModelConfig(**data["model"]), autoencoder=AutoencoderConfig(**data["autoencoder"]),
                    optimizer=OptimizerConfig(**data["optimizer"]), parallel=ParallelConfig(**data["parallel"]),
                    train=TrainConfig(**data["train"]))


def load_trained_fm(run_dir: str | Path, as_of_day: int | None = None) -> tuple[FoundationModel, Schema]:
    """The FM of ``RUN_DIR/fm`` on one process (unsharded, CPU, eval mode) and its schema.

    ``as_of_day=None``: the fixed FM (end of the training days). ``as_of_day=K``: the FM
    refreshed through day K (``fm.train.refresh_days``, saved under ``fm/daily/day=K``).
    Batches for it: ``BatchBuilder(model.layout)`` over `loopfm.fm.batch.global_batches`;
    ``model.forward_with_taps(batch)`` gives logits, probs, every tap and the AE codes ``z``.
    """
    fm = Path(run_dir) / "fm"
    manifest = read_manifest(fm)  # raises if the stage did not finish
    weights = fm / "model.pt"
    if as_of_day is not None:
        if as_of_day not in manifest.get("refresh_days", []):
            raise ValueError(f"{fm} has no FM refreshed through day {as_of_day} (its fm.train.refresh_days: "
                             f"{manifest.get('refresh_days', [])})")
        weights = fm / "daily" / f"day={as_of_day}" / "model.pt"
    schema = Schema.load(fm / "schema.json")
    cfg = fm_config_from_dict(json.loads((fm / "fm_config.json").read_text()))
    layout = FeatureLayout.build(select_features(schema, cfg.model), cfg.model.sequence_group)
    model = FoundationModel(layout, cfg.model, cfg.autoencoder)
    model.load_state_dict(torch.load(weights, weights_only=True, map_location="cpu"))
    return model.eval(), schema
