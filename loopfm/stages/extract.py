"""Stage 1, extract: one FM inference pass over the days to log.

Per impression it writes the FM's soft label (its predicted probability, used by KD) and the
code ``z``: the co-trained autoencoder's tanh output for the configured taps (``kind: codes``),
the raw tap activations (``kind: raw``, for PCA / random-projection compression downstream), or
the soft label itself as a 1-d code ``2p - 1 = tanh(logit / 2)`` (``kind: soft_label``, the
paper's "soft label as a 1-d sequence" ablation of table 5).
Format: `loopfm.stages.codes_format` (``RUN/extract/codes/day=K/part-*.parquet`` + ``_SUCCESS``).
Streaming: a day is read in batches of ``batch_size`` rows and each scored batch goes straight to
the open part file (`codes_format.PartWriter`: a new part every ROWS_PER_PART rows, at most one
row group held); only the drift sums are kept, so the peak does not grow with the rows.

Which FM scores a day (``fm_checkpoint``): ``fixed`` (default, the paper's best setting) uses the
FM as of the end of its training days for every day; ``daily`` uses, for day d, the latest FM
available at the start of d: the one refreshed through day d - 1 (``fm.train.refresh_days``),
or the fixed FM when d - 1 is its last training day. The paper attributes the small loss of the
daily setting to embedding drift, so the manifest records it per day: ``drift[day]`` has
``centroid_shift`` (L2 distance of the day's mean code from the first day's) and, for ``daily``,
``cosine_to_fixed`` (mean cosine similarity of each example's code with the fixed FM's code of
the same example; so a refreshed day is scored twice, by its FM and by the fixed one).

Under N ranks (torchrun, or N TorchX replicas) each rank scores the users of its key-hash shard
with a full copy of the FM on one process, and writes its own shard folder; no collectives, so
`torch.no_grad()` inference needs no process group.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import torch
from loopfm.progress import progress_bar

from loopfm.artifacts import read_manifest, write_manifest
from loopfm.stages import codes_format as cf

ROWS_PER_PART = 1 << 20


@dataclass(kw_only=True)
class ExtractConfig:
    days: list[int] = field(default_factory=lambda: [5, 6, 7, 8], metadata={
        "help": "event-log days to score and log (the VM's training and test days)"})
    kind: Literal["codes", "raw", "soft_label"] = field(default="codes", metadata={
        "help": "codes: the autoencoder's tanh codes; raw: raw tap activations (compress with PCA "
                "or random projection); soft_label: the FM's probability as a 1-d code 2p-1"})
    fm_checkpoint: Literal["fixed", "daily"] = field(default="fixed", metadata={
        "help": "fixed: the FM as of its last training day scores every day; daily: day d is scored "
                "by the FM refreshed through day d-1 (needs fm.train.refresh_days)"})
    taps: list[str] = field(default_factory=list, metadata={
        "help": "kind=raw: FM taps to concatenate (emb, hidden0, ...); empty = the autoencoder's taps"})
    batch_size: int = field(default=4096, metadata={"help": "examples per inference batch"})

    def __post_init__(self) -> None:
        if not self.days:
            raise ValueError("extract.days must name at least one day")
        if self.batch_size < 1:
            raise ValueError(f"extract.batch_size must be >= 1, got {self.batch_size}")
        if self.kind != "raw" and self.taps:
            raise ValueError("extract.taps applies to kind=raw only (codes use the autoencoder's taps)")


def run_extract(cfg: ExtractConfig, run_dir: str | Path, out_dir: str | Path, *, rank: int = 0,
                world_size: int = 1, progress: bool = True, config_hash: str | None = None) -> dict:
    """Score ``cfg.days`` of ``RUN/data`` with the FM(s) of ``RUN/fm`` into ``out_dir``."""
    from loopfm.data.eventlog import EventLog
    from loopfm.fm.batch import BatchBuilder, global_batches
    from loopfm.fm.weights import load_trained_fm

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    cf.check_rank(rank, world_size)
    fixed, schema = load_trained_fm(run_dir)
    fm_manifest = read_manifest(run_dir / "fm")
    log = EventLog(run_dir / "data")
    missing = sorted(set(cfg.days) - set(log.days))
    if missing:
        raise ValueError(f"extract.days {missing} are not in the event log (days {log.days})")
    as_of = checkpoint_days(cfg, run_dir / "fm")
    taps = _taps(cfg, fixed)
    config_hash = config_hash or cf.hash_config(cfg, fm_manifest.get("config_hash", ""))
    builder = BatchBuilder(fixed.layout)
    keys = (schema.user_key, schema.item_key)
    columns = sorted(set(builder.columns) | {"example_id", "ts", "day", *keys})
    rows_per_day: dict[str, int] = {}
    sums: dict[str, dict] = {}
    with cf.shard_output(out_dir, rank, world_size) as tmp:
        bar = progress_bar(total=log.num_rows(cfg.days), desc=f"extract[{rank}]", unit=" ex", unit_scale=True,
                           enabled=progress)
        for day in cfg.days:
            model = fixed if as_of[str(day)] is None else load_trained_fm(run_dir, as_of[str(day)])[0]
            writer = cf.PartWriter(tmp, day, rows_per_part=ROWS_PER_PART)
            day_sums = {"code": np.zeros(_dim(fixed, taps, cfg)), "cosine_to_fixed": 0.0}
            for _, table in global_batches(log, [day], cfg.batch_size, columns):
                bar.update(table.num_rows)
                if world_size > 1:
                    mine = cf.shard_of(table.column(schema.user_key).to_numpy(), world_size) == rank
                    table = table.filter(pa.array(mine))
                if table.num_rows:
                    meta, z = _score(model, builder, table, cfg.kind, taps, keys)
                    writer.write(cf.codes_table(meta, z))
                    day_sums["code"] += z.sum(0, dtype=np.float64)
                    day_sums["cosine_to_fixed"] += (float(len(z)) if model is fixed else _cosine_sum(
                        z, _score(fixed, builder, table, cfg.kind, taps, keys)[1]))
                    _release_free_heap()
            writer.close()
            rows_per_day[str(day)] = writer.rows
            sums[str(day)] = {"code": day_sums["code"].tolist(), "cosine_to_fixed": day_sums["cosine_to_fixed"]}
        bar.close()
        manifest = write_manifest(
            tmp, stage="extract", config_hash=config_hash, dim=_dim(fixed, taps, cfg),
            kind=cfg.kind, taps=taps, rows_per_day=rows_per_day, user_key=schema.user_key,
            item_key=schema.item_key, rank=rank, world_size=world_size, fm=str(run_dir / "fm"),
            fm_checkpoint=cfg.fm_checkpoint, fm_as_of_day=as_of, drift_sums=sums,
            drift=_drift(sums, rows_per_day, cfg.fm_checkpoint),
            key_vocab_size={"user_key": schema.feature(schema.user_key).vocab_size,
                            "item_key": schema.feature(schema.item_key).vocab_size})
    if world_size > 1:
        return cf.finalize_shards(out_dir, world_size, merge=_merge) or manifest
    return manifest


def checkpoint_days(cfg: ExtractConfig, fm_dir: Path) -> dict[str, int | None]:
    """Per extract day, the day through which its FM was trained: None = the fixed FM; K = the
    FM refreshed through day K (``RUN/fm/daily/day=K``), the latest one available at day d."""
    if cfg.fm_checkpoint == "fixed":
        return {str(d): None for d in cfg.days}
    refreshed = read_manifest(fm_dir).get("refresh_days", [])
    last_train = max(json.loads((fm_dir / "fm_config.json").read_text())["train"]["train_days"])
    out: dict[str, int | None] = {}
    for d in cfg.days:
        if d - 1 <= last_train:
            out[str(d)] = None  # the fixed FM is the latest one at the start of day d
        elif d - 1 in refreshed:
            out[str(d)] = d - 1
        else:
            raise ValueError(f"extract.fm_checkpoint=daily: day {d} needs the FM refreshed through day {d - 1}; "
                             f"add it to fm.train.refresh_days (now {refreshed})")
    return out


def _taps(cfg: ExtractConfig, model) -> list[str]:
    if cfg.kind == "soft_label":
        return []
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
    if cfg.kind == "soft_label":
        return 1
    return model.autoencoder.dim if cfg.kind == "codes" else sum(model.tap_dims[t] for t in taps)


@torch.no_grad()
def _score(model, builder, table: pa.Table, kind: str, taps: list[str],
           keys: tuple[str, str]) -> tuple[dict, np.ndarray]:
    out = model.forward_with_taps(builder(table, table.num_rows))
    if kind == "soft_label":
        z = 2.0 * out["probs"].float()[:, None] - 1.0  # = tanh(logit / 2), in [-1, 1] like the codes
    else:
        z = out["z"] if kind == "codes" else torch.cat([out[t] for t in taps], dim=1)
    meta = {c: table.column(c).to_numpy() for c in ("example_id", "ts", "day", "label")}
    meta["user_key"] = table.column(keys[0]).to_numpy()
    meta["item_key"] = table.column(keys[1]).to_numpy()
    meta["soft_label"] = out["probs"].float().numpy()
    return meta, z.float().numpy()


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def _release_free_heap() -> None:
    """Hand the heap's free pages back (glibc ``malloc_trim``; a no-op elsewhere). glibc keeps each
    batch's freed activations in a fragmented heap, so without this the peak grew with the
    number of batches (0.9 -> 1.7 GB over the 61 batches of one 250k-row day); with it the
    resident size after each batch stays flat (~0.55 GB there, peak ~1.1 GB)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _cosine_sum(a: np.ndarray, b: np.ndarray) -> float:
    """Sum over rows of cos(a_i, b_i) (0 for a zero row)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.sum(np.where(norms > 0, (a * b).sum(1) / np.maximum(norms, 1e-30), 0.0)))


def _drift(sums: dict[str, dict], rows: dict[str, int], fm_checkpoint: str) -> dict[str, dict]:
    """Per day: the L2 distance of the mean code from the first day's, and (daily FM) the mean
    cosine similarity to the fixed FM's code of the same examples."""
    days = [d for d in sums if rows.get(d)]
    if not days:
        return {}
    centroid = {d: np.asarray(sums[d]["code"]) / rows[d] for d in days}
    out = {}
    for d in days:
        entry = {"centroid_shift": float(np.linalg.norm(centroid[d] - centroid[days[0]]))}
        if fm_checkpoint == "daily":
            entry["cosine_to_fixed"] = sums[d]["cosine_to_fixed"] / rows[d]
        out[d] = entry
    return out


def _merge(manifests: list[dict]) -> dict:
    rows = cf.sum_rows_per_day(manifests)
    sums = {d: {"code": np.sum([m["drift_sums"][d]["code"] for m in manifests], axis=0).tolist(),
                "cosine_to_fixed": sum(m["drift_sums"][d]["cosine_to_fixed"] for m in manifests)}
            for d in manifests[0]["drift_sums"]}
    return dict(manifests[0], rows_per_day=rows, drift_sums=sums,
                drift=_drift(sums, rows, manifests[0]["fm_checkpoint"]))
