"""Quantizers of FM codes: the spec (kind, dim, codebook) and encode / decode, one rule each.

=============  =========================================  ===============  =====================
quantizer      value stored for z                         bytes per event  max error on [-1, 1]
=============  =========================================  ===============  =====================
fp16           float16(z), little-endian                  2 * dim          fp16 rounding
int8           q = clamp(round(127 z), -127, 127) (int8);  dim              1/254
               value q / 127 (symmetric, no scale)
int4           u = clamp(round(8 z), -8, 7) + 8;           dim / 2          1/16 on [-1, 15/16]
               value (u - 8) / 8 (the paper's rule)
int4-kmeans    u = nearest of 16 levels fitted by 1-D      dim / 2          data dependent
               k-means; value codebook[u]
=============  =========================================  ===============  =====================

INT4 codes are packed two per byte with `kernels.packing.pack_int4` (low nibble = even
dimension), the layout the dequant-and-attend kernel reads. The compress stage fits and applies
them; the VM stage and the serving path decode with the same functions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from kernels.packing import pack_int4, quantize_uniform_int4, unpack_int4

Quantizer = Literal["fp16", "int8", "int4", "int4-kmeans"]
QUANTIZERS = ("fp16", "int8", "int4", "int4-kmeans")
INT8_RULE = "q = clamp(round(127 z), -127, 127) stored as int8; value = q / 127"


@dataclass
class QuantSpec:
    """Everything needed to encode and decode codes: kind, dim and (k-means) the codebook."""
    quantizer: str
    dim: int
    codebook: np.ndarray | None = None  # float32 [16] (shared) or [dim, 16] (per-dim)

    @property
    def code_bytes(self) -> int:
        return {"fp16": 2 * self.dim, "int8": self.dim}.get(self.quantizer, self.dim // 2)

    def to_manifest(self) -> dict:
        cb = None if self.codebook is None else np.asarray(self.codebook, np.float32).tolist()
        return {"quantizer": self.quantizer, "dim": self.dim, "code_bytes": self.code_bytes, "codebook": cb}

    @classmethod
    def from_manifest(cls, m: dict) -> "QuantSpec":
        cb = m.get("codebook")
        return cls(m["quantizer"], int(m["dim"]), None if cb is None else np.asarray(cb, np.float32))


def encode(z: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """float [N, dim] -> uint8 [N, code_bytes]."""
    z = np.ascontiguousarray(z, dtype=np.float32)
    n = z.shape[0]
    if spec.quantizer == "fp16":
        return z.astype("<f2").view(np.uint8).reshape(n, 2 * spec.dim)
    if spec.quantizer == "int8":
        return np.clip(np.rint(z * 127.0), -127, 127).astype(np.int8).view(np.uint8)
    if spec.quantizer == "int4":
        u = quantize_uniform_int4(torch.from_numpy(z))
    else:
        u = torch.from_numpy(kmeans_assign(z, spec.codebook))
    return pack_int4(u).numpy()


def decode(codes: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """uint8 [..., code_bytes] -> float32 [..., dim] (any leading shape, e.g. [B, L, bytes])."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    lead = codes.shape[:-1]
    if spec.quantizer == "fp16":
        return codes.view("<f2").astype(np.float32).reshape(*lead, spec.dim)
    if spec.quantizer == "int8":
        return codes.view(np.int8).astype(np.float32) / 127.0
    u = unpack_int4(torch.from_numpy(codes)).numpy()
    if spec.quantizer == "int4":
        return (u.astype(np.float32) - 8.0) / 8.0
    cb = np.asarray(spec.codebook, np.float32)
    if cb.ndim == 1:
        return cb[u]
    return cb[np.arange(spec.dim), u]  # per-dim table: codebook[j, u[..., j]]


def kmeans_assign(z: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Nearest level of a sorted codebook ([16] shared or [dim, 16]) -> uint8 codes [N, dim]."""
    cb = np.asarray(codebook, np.float32)
    if cb.ndim == 1:
        return np.searchsorted((cb[1:] + cb[:-1]) / 2, z).astype(np.uint8)
    u = np.empty(z.shape, np.uint8)
    for j in range(z.shape[1]):
        u[:, j] = np.searchsorted((cb[j, 1:] + cb[j, :-1]) / 2, z[:, j])
    return u


def fit_kmeans_levels(values: np.ndarray, iters: int = 50) -> np.ndarray:
    """16 sorted levels minimising the squared error of 1-D values (exact Lloyd on sorted data).

    Two starts, the uniform INT4 grid and equal-mass quantile means; the lower-MSE result wins,
    so the result is never worse than uniform INT4 on ``values``.
    """
    v = np.sort(np.asarray(values, np.float64).ravel())
    if v.size == 0:
        raise ValueError("cannot fit k-means levels on no values")
    s1 = np.concatenate([[0.0], np.cumsum(v)])
    s2 = np.concatenate([[0.0], np.cumsum(v * v)])

    def stats(c):
        b = np.concatenate([[0], np.searchsorted(v, (c[1:] + c[:-1]) / 2), [v.size]])
        cnt, sm, sq = np.diff(b), s1[b[1:]] - s1[b[:-1]], s2[b[1:]] - s2[b[:-1]]
        return cnt, sm, float(np.sum(sq - 2 * c * sm + c * c * cnt))

    def lloyd(c):
        for _ in range(iters):
            cnt, sm, _ = stats(c)
            new = np.where(cnt > 0, sm / np.maximum(cnt, 1), c)
            if np.allclose(new, c, rtol=0, atol=1e-9):
                break
            c = np.sort(new)
        return c, stats(c)[2]

    grid = (np.arange(16) - 8) / 8.0
    edges = np.linspace(0, v.size, 17).astype(np.int64)
    quant = np.array([v[a:max(b, a + 1)].mean() if a < v.size else v[-1] for a, b in zip(edges[:-1], edges[1:])])
    best = min((lloyd(grid), lloyd(np.sort(quant) + np.arange(16) * 1e-12)), key=lambda r: r[1])
    return best[0].astype(np.float32)


def fit_codebook(z: np.ndarray, tables: str, iters: int) -> np.ndarray:
    if tables == "shared":
        return fit_kmeans_levels(z, iters)
    return np.stack([fit_kmeans_levels(z[:, j], iters) for j in range(z.shape[1])])


def quant_error(z: np.ndarray, spec: QuantSpec) -> dict:
    """MSE and max |error| of a round trip through ``spec`` (z float32 [N, dim])."""
    err = decode(encode(z, spec), spec) - z
    return {"mse": float(np.mean(err.astype(np.float64) ** 2)) if err.size else 0.0,
            "max_abs": float(np.max(np.abs(err))) if err.size else 0.0}
