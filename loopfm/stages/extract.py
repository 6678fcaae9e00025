"""Stage 1, extract: one FM inference pass over the days to log.

Per impression it writes the FM's soft label (its predicted probability, used by KD) and the
code ``z``: the co-trained autoencoder's tanh output for the configured taps (``kind: codes``),
or the raw tap activations (``kind: raw``, for PCA / random-projection compression downstream).
Format: `loopfm.stages.codes_format` (``RUN/extract/codes/day=K/part-*.parquet`` + ``_SUCCESS``).

Under N ranks (torchrun, or N TorchX replicas) each rank scores the users of its key-hash shard
with a full copy of the FM on one process, and writes its own shard folder; no collectives, so
`torch.no_grad()` inference needs no process group. The final FM of ``RUN/fm`` is used for
every day (the paper's "fixed checkpoint", its default and best setting).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from loopfm.artifacts import read_manifest, write_manifest
from loopfm.stages import codes_format as cf

ROWS_PER_PART = 1 << 20


@dataclass(kw_only=True)
class ExtractConfig:
    days: list[int] = field(default_factory=lambda: [5, 6, 7, 8], metadata={
        "help": "event-log days to score and log (the VM's training and test days)"})
    kind: Literal["codes", "raw"] = field(default="codes", metadata={
        "help": "codes: the autoencoder's tanh codes; raw: raw tap activations (compress with PCA "
                "or random projection)"})
    taps: list[str] = field(default_factory=list, metadata={
        "help": "kind=raw: FM taps to concatenate (emb, hidden0, ...); empty = the autoencoder's taps"})
    batch_size: int = field(default=4096, metadata={"help": "examples per inference batch"})

    def __post_init__(self) -> None:
        if not self.days:
            raise ValueError("extract.days must name at least one day")
        if self.batch_size < 1:
            raise ValueError(f"extract.batch_size must be >= 1, got {self.batch_size}")
        if self.kind == "codes" and self.taps:
            raise ValueError("extract.taps applies to kind=raw only (codes use the autoencoder's taps)")


def run_extract(cfg: ExtractConfig, run_dir: str | Path, out_dir: str | Path, *, rank: int = 0,
                world_size: int = 1, progress: bool = True, config_hash: str | None = None) -> dict:
    """Score ``cfg.days`` of ``RUN/data`` with the final FM of ``RUN/fm`` into ``out_dir``."""
    from loopfm.data.eventlog import EventLog
    from loopfm.fm.batch import BatchBuilder, global_batches
    from loopfm.fm.train import load_trained_fm

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    cf.check_rank(rank, world_size)
    model, schema = load_trained_fm(run_dir)
    fm_manifest = read_manifest(run_dir / "fm")
    log = EventLog(run_dir / "data")
    missing = sorted(set(cfg.days) - set(log.days))
    if missing:
        raise ValueError(f"extract.days {missing} are not in the event log (days {log.days})")
    taps = _taps(cfg, model)
    config_hash = config_hash or cf.hash_config(cfg, fm_manifest.get("config_hash", ""))
    builder = BatchBuilder(model.layout)
    keys = (schema.user_key, schema.item_key)
    columns = sorted(set(builder.columns) | {"example_id", "ts", "day", *keys})
    rows_per_day: dict[str, int] = {}
    with cf.shard_output(out_dir, rank, world_size) as tmp:
        bar = tqdm(total=log.num_rows(cfg.days), desc=f"extract[{rank}]", unit=" ex", unit_scale=True,
                   disable=not progress)
        for day in cfg.days:
            parts: list[tuple[dict, np.ndarray]] = []
            for _, table in global_batches(log, [day], cfg.batch_size, columns):
                bar.update(table.num_rows)
                if world_size > 1:
                    mine = cf.shard_of(table.column(schema.user_key).to_numpy(), world_size) == rank
                    table = table.filter(pa.array(mine))
                if table.num_rows:
                    parts.append(_score(model, builder, table, cfg.kind, taps, keys))
            if parts:
                _write_day(tmp, day, parts)
            rows_per_day[str(day)] = sum(len(m["example_id"]) for m, _ in parts)
        bar.close()
        manifest = write_manifest(
            tmp, stage="extract", config_hash=config_hash, dim=_dim(model, taps, cfg),
            kind=cfg.kind, taps=taps, rows_per_day=rows_per_day, user_key=schema.user_key,
            item_key=schema.item_key, rank=rank, world_size=world_size, fm=str(run_dir / "fm"),
            key_vocab_size={"user_key": schema.feature(schema.user_key).vocab_size,
                            "item_key": schema.feature(schema.item_key).vocab_size})
    if world_size > 1:
        return cf.finalize_shards(out_dir, world_size, merge=_merge) or manifest
    return manifest


def _taps(cfg: ExtractConfig, model) -> list[str]:
    if cfg.kind == "codes":
        if model.autoencoder is None:
            raise ValueError("extract.kind=codes needs an FM trained with fm.autoencoder.enabled=true; "
                             "use extract.kind=raw otherwise")
        return list(model.ae_taps)
    taps = list(cfg.taps) or list(model.ae_taps)
    unknown = [t for t in taps if t not in model.tap_dims]
    if not taps or unknown:
        raise ValueError(f"extract.taps {unknown or taps} must be among the FM's taps {list(model.tap_dims)}")
    return taps


def _dim(model, taps: list[str], cfg: ExtractConfig) -> int:
    return model.autoencoder.dim if cfg.kind == "codes" else sum(model.tap_dims[t] for t in taps)


@torch.no_grad()
def _score(model, builder, table: pa.Table, kind: str, taps: list[str],
           keys: tuple[str, str]) -> tuple[dict, np.ndarray]:
    out = model.forward_with_taps(builder(table, table.num_rows))
    z = out["z"] if kind == "codes" else torch.cat([out[t] for t in taps], dim=1)
    meta = {c: table.column(c).to_numpy() for c in ("example_id", "ts", "day", "label")}
    meta["user_key"] = table.column(keys[0]).to_numpy()
    meta["item_key"] = table.column(keys[1]).to_numpy()
    meta["soft_label"] = out["probs"].float().numpy()
    return meta, z.float().numpy()


def _write_day(root: Path, day: int, parts: list[tuple[dict, np.ndarray]]) -> None:
    meta = {k: np.concatenate([m[k] for m, _ in parts]) for k in parts[0][0]}
    z = np.concatenate([z for _, z in parts])
    for part, s in enumerate(range(0, len(z), ROWS_PER_PART)):
        cf.write_codes(root, day, part, {k: v[s:s + ROWS_PER_PART] for k, v in meta.items()},
                       z[s:s + ROWS_PER_PART])


def _merge(manifests: list[dict]) -> dict:
    return dict(manifests[0], rows_per_day=cf.sum_rows_per_day(manifests))
