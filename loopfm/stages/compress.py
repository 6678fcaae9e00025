"""`compress`: extract codes -> quantized, packed codes (one fixed-size binary ``code`` per event).

Input: an extract output (`loopfm.stages.codes_format`). Output ``OUT/codes/day=K/part-*.parquet``
with the extract's metadata columns and ``code``, plus ``OUT/_SUCCESS`` (quantizer, dim, codebook,
bytes per event, error report) and, for raw activations, ``OUT/projection/*.npy``.

The quantizers (what is stored per value, bytes per event, the error bound) are tabled in
`loopfm.codes.quant`, which implements them. INT4 codes are packed two per byte (low nibble = even
dimension), the layout the dequant-and-attend kernel reads. k-means levels are fitted on a sample
of the fit days (``fit_days``, by default every extract day but the VM's test day -- the
``test_day`` argument, the last extract day when run alone -- so the test day is never used),
either one 16-level table shared by all dimensions (what the kernel takes) or one per dimension
(``kmeans_tables: per-dim``; decode with `decode`). The fit starts from the uniform grid and from
quantiles and keeps the better, so on the fit sample it is never worse than uniform INT4.

Raw activations (extract ``kind == "raw"``): centre, project to ``dim`` with PCA (top principal
axes of the fit sample) or a seeded Gaussian random projection, then divide each output dimension
by its ``scale_quantile`` absolute quantile on the sample and clip to [-1, 1]; the quantizer then
runs on those values. Mean [D], matrix [D, dim] and scale [dim] are saved as .npy (no pickle).

Errors (MSE, max |error|) are measured against the fp16 codes (against the projected values for
raw input): for every quantizer on the fit sample, and for the chosen one over every row.
Ranks split the input files round-robin; see codes_format for the sharded-output rule.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from loopfm.progress import progress_bar

from loopfm.artifacts import inside, read_manifest, write_manifest
# The quantizers live in loopfm.codes; imported here by name, as other modules and tests use them.
from loopfm.codes.quant import (INT8_RULE, QUANTIZERS, QuantSpec, Quantizer, decode, encode,  # noqa: F401
                                fit_codebook, fit_kmeans_levels, kmeans_assign, quant_error)
from loopfm.stages import codes_format as cf

BATCH_ROWS = 1 << 18  # rows encoded at a time (an extract part holds up to 2^20)


@dataclass(kw_only=True)
class CompressConfig:
    """How extract codes are cut to a prefix, projected (raw input) and quantized."""
    quantizer: Quantizer = field(default="int4", metadata={
        "help": "fp16 | int8 (round(127z)/127) | int4 (round(8z).clamp(-8,7)/8) | int4-kmeans (16 fitted levels)"})
    dim: int = field(default=0, metadata={
        "help": "Matryoshka prefix kept (codes) or projection size (raw); 0 = all extract dims"})
    kmeans_tables: Literal["shared", "per-dim"] = field(default="shared", metadata={
        "help": "int4-kmeans: one 16-level table for all dims (kernel-ready) or one per dim"})
    kmeans_iters: int = field(default=50, metadata={"help": "int4-kmeans: Lloyd iterations at most"})
    projection: Literal["auto", "none", "pca", "random"] = field(default="auto", metadata={
        "help": "raw input: pca or random projection to dim; auto = pca for raw, none for tanh codes"})
    scale_quantile: float = field(default=0.999, metadata={
        "help": "raw input: each projected dim is divided by this quantile of |value| and clipped to [-1,1]"})
    fit_days: list[int] = field(default_factory=list, metadata={
        "help": "days whose codes fit k-means / the projection; empty = every extract day but the test day "
                "(vm.test_day; the last extract day when run alone)"})
    fit_rows: int = field(default=200_000, metadata={"help": "rows sampled from the fit days"})
    seed: int = field(default=0, metadata={"help": "seeds the fit sample and the random projection"})

    def __post_init__(self) -> None:
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"compress.quantizer must be one of {QUANTIZERS}, got {self.quantizer!r}")
        if self.dim < 0 or (self.dim % 2 and self.quantizer.startswith("int4")):
            raise ValueError("compress.dim must be 0 or positive, and even for INT4 (2 codes per byte), "
                             f"got {self.dim} with {self.quantizer}")
        if self.kmeans_iters < 1:
            raise ValueError(f"compress.kmeans_iters must be >= 1, got {self.kmeans_iters}")
        if not 0.5 <= self.scale_quantile <= 1.0:
            raise ValueError(f"compress.scale_quantile must be in [0.5, 1], got {self.scale_quantile}")
        if self.fit_rows < 16:
            raise ValueError(f"compress.fit_rows must be >= 16, got {self.fit_rows}")


# -- projection for raw activations ---------------------------------------------------------------
@dataclass
class Projection:
    method: str
    mean: np.ndarray    # [D]
    matrix: np.ndarray  # [D, dim]
    scale: np.ndarray   # [dim]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = (np.asarray(x, np.float32) - self.mean) @ self.matrix
        return np.clip(y / self.scale, -1.0, 1.0).astype(np.float32)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("mean", "matrix", "scale"):
            np.save(folder / f"{name}.npy", getattr(self, name).astype(np.float32), allow_pickle=False)

    @classmethod
    def load(cls, folder: Path, method: str) -> "Projection":
        arrays = {n: np.load(folder / f"{n}.npy", allow_pickle=False) for n in ("mean", "matrix", "scale")}
        return cls(method, **arrays)


def fit_projection(x: np.ndarray, dim: int, method: str, quantile: float, seed: int) -> Projection:
    x = np.asarray(x, np.float64)
    mean = x.mean(axis=0)
    xc = x - mean
    if method == "pca":
        _, vecs = np.linalg.eigh(xc.T @ xc / max(len(x) - 1, 1))
        mat = vecs[:, ::-1][:, :dim]  # largest variance first: any prefix is a valid Matryoshka cut
        mat = mat * np.where(mat[np.abs(mat).argmax(axis=0), np.arange(dim)] < 0, -1.0, 1.0)  # sign-fix
    else:
        mat = np.random.default_rng(seed).normal(size=(x.shape[1], dim)) / np.sqrt(dim)
    y = xc @ mat
    scale = np.maximum(np.quantile(np.abs(y), quantile, axis=0), 1e-12)
    return Projection(method, mean.astype(np.float32), mat.astype(np.float32), scale.astype(np.float32))


# -- the stage -----------------------------------------------------------------------------------
def run_compress(cfg: CompressConfig, extract_dir: str | Path, out_dir: str | Path, *, rank: int = 0,
                 world_size: int = 1, progress: bool = True, config_hash: str | None = None,
                 test_day: int | None = None) -> dict:
    """Quantize the extract output into ``out_dir``; returns the top manifest when this call completed
    the output, else this rank's shard manifest. Every rank fits the same quantizer (same sample).
    ``test_day``: the VM's test day, never a fit day (default: the last extract day)."""
    cf.check_rank(rank, world_size)
    extract_dir, out_dir = Path(extract_dir), Path(out_dir)
    src = read_manifest(extract_dir)
    cf.check_extract_manifest(src, extract_dir)
    dim, projection, fit_days = _resolve(cfg, src, test_day)
    config_hash = config_hash or cf.hash_config(cfg, src.get("config_hash", ""))
    sample = _fit_sample(extract_dir, src, fit_days, cfg.fit_rows, cfg.seed)
    proj = None if projection == "none" else fit_projection(sample, dim, projection, cfg.scale_quantile, cfg.seed)
    ref = proj(sample) if proj is not None else sample[:, :dim]
    codebook = fit_codebook(ref, cfg.kmeans_tables, cfg.kmeans_iters) if cfg.quantizer == "int4-kmeans" else None
    spec = QuantSpec(cfg.quantizer, dim, codebook)
    days = cf.stage_days(src)
    files = [(d, i, p) for d in days for i, p in enumerate(cf.stage_files(extract_dir, d, src))]
    with cf.shard_output(out_dir, rank, world_size) as tmp:
        if proj is not None:
            proj.save(tmp / "projection")
        stats = _compress_files(files[rank::world_size], days, spec, proj, tmp, progress, rank)
        facts = dict(
            spec.to_manifest(), **stats, rank=rank, world_size=world_size, source_dim=int(src["dim"]),
            source_kind=src["kind"], int8_rule=INT8_RULE,
            kmeans_tables=cfg.kmeans_tables if codebook is not None else None,
            projection=None if proj is None else {"method": projection, "dir": "projection",
                                                  "scale_quantile": cfg.scale_quantile},
            fit_days=list(fit_days), fit_rows=int(len(sample)), bytes_per_event=spec.code_bytes,
            error_sample=_sample_report(ref, spec, cfg), user_key=src.get("user_key"),
            item_key=src.get("item_key"), key_vocab_size=src.get("key_vocab_size"), extract=str(extract_dir))
        manifest = write_manifest(tmp, stage="compress", config_hash=config_hash, **facts)
    top = cf.finalize_shards(out_dir, world_size, merge=_merge) if world_size > 1 else manifest
    if progress:
        print_report(top or manifest, file=sys.stdout)
    return top or manifest


def _resolve(cfg: CompressConfig, src: dict, test_day: int | None = None) -> tuple[int, str, list[int]]:
    """dim, projection method and fit days for this extract output, or a ValueError saying why not."""
    source_dim, kind, days = int(src["dim"]), src["kind"], cf.stage_days(src)
    dim = cfg.dim or source_dim
    projection = cfg.projection if cfg.projection != "auto" else ("pca" if kind == "raw" else "none")
    if kind == "raw" and projection == "none" and cfg.quantizer != "fp16":
        raise ValueError("raw activations are unbounded: use compress.projection pca or random before an "
                         f"integer quantizer (got projection none with {cfg.quantizer})")
    if projection in ("none", "pca") and dim > source_dim:
        raise ValueError(f"compress.dim={dim} is larger than the extract dim {source_dim}"
                         + (" (PCA cannot add dims)" if projection == "pca" else ""))
    if dim % 2 and cfg.quantizer.startswith("int4"):
        raise ValueError(f"the extract codes are {dim}-d (odd); INT4 packs two codes per byte: use "
                         "compress.quantizer fp16 or int8 (e.g. for extract.kind=soft_label)")
    held_out = days[-1] if test_day is None else test_day
    fit_days = list(cfg.fit_days) or ([d for d in days if d != held_out] if len(days) > 1 else days)
    missing = sorted(set(fit_days) - set(days))
    if missing:
        raise ValueError(f"compress.fit_days {missing} are not extract days {days}")
    return dim, projection, fit_days


def _compress_files(files, days, spec: QuantSpec, proj, tmp: Path, progress: bool, rank: int) -> dict:
    """Encode and write this rank's files (one output part per input part, streamed a row group
    at a time, so memory does not grow with the part size); rows, bytes, errors."""
    rows_per_day = {str(d): 0 for d in days}
    sq, mx, n_vals, nbytes = 0.0, 0.0, 0, 0
    for day, part, path in progress_bar(files, desc=f"compress[{rank}]", enabled=progress, unit="file"):
        writer = cf.PartWriter(tmp, day, first_part=part)
        for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS):
            table = pa.Table.from_batches([batch])
            z = cf.z_from_arrow(table.column(cf.Z_COLUMN))
            zr = proj(z) if proj is not None else z[:, :spec.dim].astype(np.float32)
            codes = encode(zr, spec)
            err = decode(codes, spec) - zr
            sq += float(np.sum(err.astype(np.float64) ** 2))
            mx = max(mx, float(np.max(np.abs(err)))) if err.size else mx
            n_vals += err.size
            writer.write(cf.packed_table(table, codes))
        writer.close()
        nbytes += writer.bytes
        rows_per_day[str(day)] += writer.rows
    rows = sum(rows_per_day.values())
    return dict(rows=rows, rows_per_day=rows_per_day, parquet_bytes=nbytes,
                parquet_bytes_per_event=nbytes / max(rows, 1),
                error_all_rows={spec.quantizer: {"mse": sq / max(n_vals, 1), "max_abs": mx, "values": n_vals}})


def _fit_sample(root: Path, src: dict, fit_days: list[int], rows: int, seed: int) -> np.ndarray:
    """Up to ``rows`` rows of z from the fit days, drawn without replacement (same on every rank)."""
    files = [p for d in fit_days for p in cf.stage_files(root, d, src)]
    counts = np.array([pq.ParquetFile(p).metadata.num_rows for p in files], np.int64)
    total = int(counts.sum())
    if total == 0:
        raise ValueError(f"{root}: the fit days {fit_days} hold no rows")
    pick = np.sort(np.random.default_rng(seed).choice(total, size=min(rows, total), replace=False))
    starts = np.concatenate([[0], np.cumsum(counts)])
    out = []
    for i, p in enumerate(files):
        sel = pick[(pick >= starts[i]) & (pick < starts[i + 1])] - starts[i]
        if len(sel):
            z = cf.z_from_arrow(pq.read_table(p, columns=[cf.Z_COLUMN]).column(0))
            out.append(z[sel].astype(np.float32))
    return np.concatenate(out)


def _sample_report(ref: np.ndarray, chosen: QuantSpec, cfg: CompressConfig) -> dict:
    report = {}
    for q in QUANTIZERS:
        if q.startswith("int4") and chosen.dim % 2:
            continue  # odd dims (a 1-d soft-label code) cannot be INT4-packed
        if q == chosen.quantizer:
            spec = chosen
        elif q == "int4-kmeans":
            spec = QuantSpec(q, chosen.dim, fit_codebook(ref, cfg.kmeans_tables, cfg.kmeans_iters))
        else:
            spec = QuantSpec(q, chosen.dim)
        report[q] = dict(quant_error(ref, spec), bytes_per_event=spec.code_bytes)
    return report


def _merge(manifests: list[dict]) -> dict:
    top = dict(manifests[0])
    top["rows_per_day"] = cf.sum_rows_per_day(manifests)
    top["rows"] = sum(m["rows"] for m in manifests)
    top["parquet_bytes"] = sum(m["parquet_bytes"] for m in manifests)
    top["parquet_bytes_per_event"] = top["parquet_bytes"] / max(top["rows"], 1)
    q = top["quantizer"]
    errs = [m["error_all_rows"][q] for m in manifests]
    n = sum(e["values"] for e in errs)
    top["error_all_rows"] = {q: {"mse": sum(e["mse"] * e["values"] for e in errs) / max(n, 1),
                                 "max_abs": max(e["max_abs"] for e in errs), "values": n}}
    top["projection"] = None if top["projection"] is None else dict(top["projection"], dir="shards/rank-0/projection")
    return top


def print_report(m: dict, file=sys.stdout) -> None:
    print(f"compress: {m['quantizer']} dim={m['dim']} ({m['bytes_per_event']} code bytes/event, "
          f"{m['parquet_bytes_per_event']:.1f} Parquet bytes/event, {m['rows']} rows)", file=file)
    print(f"  {'quantizer':<12} {'bytes/event':>11} {'MSE':>12} {'max |err|':>10}   (fit sample, vs fp16 codes)",
          file=file)
    for q, e in m["error_sample"].items():
        print(f"  {q:<12} {e['bytes_per_event']:>11} {e['mse']:>12.3e} {e['max_abs']:>10.4f}", file=file)
    for q, e in m["error_all_rows"].items():
        print(f"  all rows, {q}: MSE {e['mse']:.3e}, max |err| {e['max_abs']:.4f}", file=file)


def load_spec(compress_dir: str | Path) -> QuantSpec:
    """The quantizer of a finished compress output (to decode its codes)."""
    return QuantSpec.from_manifest(read_manifest(compress_dir))


def load_projection(compress_dir: str | Path) -> Projection | None:
    m = read_manifest(compress_dir)
    p = m.get("projection")
    return None if p is None else Projection.load(inside(compress_dir, p["dir"]), p["method"])


__all__ = ["CompressConfig", "QuantSpec", "Projection", "run_compress", "encode", "decode", "kmeans_assign",
           "fit_kmeans_levels", "quant_error", "fit_projection", "load_spec", "load_projection",
           "print_report", "QUANTIZERS", "INT8_RULE"]
