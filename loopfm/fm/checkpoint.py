"""Resumable FM training checkpoints: one file per rank per step, published atomically.

Layout under the checkpoint folder::

    step-000120/rank-00000.pt   this rank's local shards of the model and of the fused sparse
    step-000120/rank-00001.pt   optimizer state, the dense optimizer, the RNG state, the data position
    LATEST                      {"step": 120, "dir": "step-000120", "world_size": 2}

Each rank writes ``rank-R.pt.tmp`` and renames it; after a barrier rank 0 replaces ``LATEST``
(temp + rename). A kill at any moment leaves ``LATEST`` pointing at a complete step folder.
Files hold plain tensors, numbers and strings only, and are read with
``torch.load(weights_only=True)``. Resuming needs the same world size and sharding plan (the
trainer stores the plan beside the checkpoints and reuses it).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from loopfm.artifacts import ManifestError, inside, read_json


def _local(value: Any) -> Any:
    """Plain-data copy of a (nested) state dict; a ShardedTensor becomes its local shards."""
    if isinstance(value, dict):
        return {k: _local(v) for k, v in value.items()}
    if hasattr(value, "local_shards"):
        return [s.tensor.detach().clone() for s in value.local_shards()]
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    return value


def _restore(live: Any, saved: Any, where: str = "") -> Any:
    """Copy ``saved`` into the tensors of ``live`` in place; returns ``live`` (new leaves if not tensors)."""
    if isinstance(live, dict):
        missing = set(live) ^ set(saved)
        if missing:
            raise ValueError(f"checkpoint does not match the model at {where or '/'}: keys {sorted(map(str, missing))}")
        for k in live:
            live[k] = _restore(live[k], saved[k], f"{where}/{k}")
        return live
    with torch.no_grad():
        if hasattr(live, "local_shards"):
            shards = live.local_shards()
            if len(shards) != len(saved):
                raise ValueError(f"checkpoint at {where}: {len(saved)} shards saved, {len(shards)} here")
            for s, t in zip(shards, saved):
                s.tensor.copy_(t)
            return live
        if isinstance(live, torch.Tensor):
            live.copy_(saved)
            return live
    return saved


class Checkpointer:
    def __init__(self, folder: str | Path, rank: int = 0, world_size: int = 1, keep: int = 2) -> None:
        self.folder, self.rank, self.world_size, self.keep = Path(folder), rank, world_size, keep

    def latest(self) -> dict | None:
        path = self.folder / "LATEST"
        if not path.is_file():
            return None
        meta = read_json(path)
        if not isinstance(meta, dict) or not meta.get("dir"):
            raise ManifestError(f"{path} names no checkpoint folder")
        inside(self.folder, meta["dir"])  # refuses a path that leaves the checkpoint folder
        return meta

    def save(self, step: int, model: nn.Module, fused_optimizer: Any, dense_optimizer: torch.optim.Optimizer,
             position: dict) -> None:
        name = f"step-{step:06d}"
        folder = self.folder / name
        folder.mkdir(parents=True, exist_ok=True)
        state = {
            "model": _local(model.state_dict()),
            "fused_optimizer": _local(fused_optimizer.state_dict()),
            "dense_optimizer": dense_optimizer.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.empty(0),
            "position": dict(position),
            "world_size": self.world_size,
        }
        target = folder / f"rank-{self.rank:05d}.pt"
        torch.save(state, f"{target}.tmp")
        os.replace(f"{target}.tmp", target)
        _barrier()
        if self.rank == 0:
            latest = self.folder / "LATEST"
            latest.with_suffix(".tmp").write_text(json.dumps(
                {"step": step, "dir": name, "world_size": self.world_size, "position": position}))
            os.replace(latest.with_suffix(".tmp"), latest)
            self._prune(name)
        _barrier()

    def load(self, model: nn.Module, fused_optimizer: Any, dense_optimizer: torch.optim.Optimizer) -> dict:
        """Restore the latest checkpoint into the live objects; returns its data position."""
        meta = self.latest()
        if meta is None:
            raise FileNotFoundError(f"no checkpoint in {self.folder}")
        if meta["world_size"] != self.world_size:
            raise ValueError(f"checkpoint {self.folder / meta['dir']} was written by {meta['world_size']} "
                             f"processes; resume it with the same number (this run has {self.world_size})")
        state = torch.load(inside(self.folder, meta["dir"]) / f"rank-{self.rank:05d}.pt", weights_only=True)
        model.load_state_dict(_restore(model.state_dict(), state["model"]))
        fused_optimizer.load_state_dict(_restore(fused_optimizer.state_dict(), state["fused_optimizer"]))
        dense_optimizer.load_state_dict(state["dense_optimizer"])
        torch.set_rng_state(state["rng"])
        if torch.cuda.is_available() and state["cuda_rng"].numel():
            torch.cuda.set_rng_state(state["cuda_rng"])
        return state["position"]

    def _prune(self, newest: str) -> None:
        steps = sorted(p for p in self.folder.glob("step-*") if p.is_dir())
        keep = {p.name for p in steps[-self.keep:]} | {newest}
        for p in steps:
            if p.name not in keep:
                shutil.rmtree(p, ignore_errors=True)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
