"""The sharded-output rule shared by every replicated stage, and the code formats' old import path.

The formats of extract and compress outputs live in `loopfm.codes.format`; their names are
re-exported here, where the stages and tests import them from.

Sharded outputs (one rule for every stage run by N independent replicas, no collective):
with ``world_size == 1`` the stage writes ``OUT/`` at once through `atomic_output`. With
``world_size > 1`` rank R writes ``OUT/shards/rank-R/`` atomically (its own ``_SUCCESS``), so no
two ranks ever write the same file; then any rank that sees all ``world_size`` shard manifests
with the same config hash writes ``OUT/_SUCCESS`` (an atomic rename; several ranks may do it,
they write the same facts). The top manifest lists ``shards`` (folders relative to OUT, ``["."]``
for a single process); readers take files from those folders only, so a stale ``rank-R`` from an
earlier run with more ranks is never read. A rank that starts removes ``OUT/_SUCCESS`` first, so
a rerun never leaves an old top manifest next to new shards. `finalize_shards` is also callable
alone (e.g. by the CLI after the replicas exit).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from loopfm.artifacts import MANIFEST, atomic_output, read_manifest, write_manifest
from loopfm.codes.format import (  # noqa: F401  (re-exported)
    CODE_COLUMN, KINDS, META_COLUMNS, Z_COLUMN, PartWriter, bytes_from_arrow, bytes_to_arrow,
    check_extract_manifest, codes_table, day_files, extract_schema, packed_table, read_codes, stage_days,
    stage_files, sum_rows_per_day, write_codes, write_packed, z_from_arrow, z_to_arrow)


# -- sharded stage outputs -----------------------------------------------------------------------
def shard_dir(out: str | Path, rank: int) -> Path:
    return Path(out) / "shards" / f"rank-{int(rank)}"


@contextlib.contextmanager
def shard_output(out: str | Path, rank: int, world_size: int) -> Iterator[Path]:
    """The temp folder this rank writes; see the module docstring for the rule."""
    check_rank(rank, world_size)
    if world_size == 1:
        with atomic_output(out) as tmp:
            yield tmp
        return
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / MANIFEST).unlink(missing_ok=True)
    with atomic_output(shard_dir(out, rank)) as tmp:
        yield tmp


def finalize_shards(out: str | Path, world_size: int,
                    merge: Callable[[list[dict]], dict] | None = None) -> dict | None:
    """Write ``OUT/_SUCCESS`` when all ``world_size`` shards are finished with one config hash.

    ``merge(shard_manifests)`` returns the facts of the top manifest (default: rank 0's facts).
    Returns the top manifest, or None while shards are missing. With world_size 1 it only reads.
    """
    out = Path(out)
    if world_size == 1:
        return read_manifest(out)
    manifests = []
    for r in range(world_size):
        path = shard_dir(out, r) / MANIFEST
        if not path.is_file():
            return None
        manifests.append(json.loads(path.read_text()))
    hashes = {m["config_hash"] for m in manifests}
    sizes = {m.get("world_size") for m in manifests}
    if len(hashes) != 1 or sizes != {world_size}:
        return None  # shards of different runs: wait for the stale ones to be rewritten
    facts = dict(merge(manifests) if merge else manifests[0])
    for k in ("created_unix", "rank"):
        facts.pop(k, None)
    facts.update(world_size=world_size, shards=[f"shards/rank-{r}" for r in range(world_size)])
    stage, config_hash = facts.pop("stage"), facts.pop("config_hash")
    with tempfile.TemporaryDirectory(dir=out, prefix=".final-") as tmp:
        manifest = write_manifest(tmp, stage=stage, config_hash=config_hash, **facts)
        os.replace(Path(tmp) / MANIFEST, out / MANIFEST)
    return manifest


def shard_of(keys: np.ndarray, world_size: int) -> np.ndarray:
    """Rank that owns each int64 key: splitmix64(key) mod world_size (stable across runs/machines)."""
    return (splitmix64(keys) % np.uint64(world_size)).astype(np.int64)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser of ``x + golden gamma`` on int64/uint64 arrays -> uint64 (wrapping)."""
    z = np.asarray(x).astype(np.int64, copy=False).view(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


def hash_config(cfg: Any, *upstream: str) -> str:
    """A stable hash of a config dataclass (or its dict) plus the config hashes of the stage's inputs."""
    data = {"cfg": cfg if isinstance(cfg, dict) else dataclasses.asdict(cfg), "upstream": list(upstream)}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
