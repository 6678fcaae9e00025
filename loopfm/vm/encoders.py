"""LoopFM sequence encoders ("Seq Arch" of the paper's figure 1): pool a user's sequence of FM
codes into one vector the VM concatenates with its other feature embeddings.

Inputs (from a `VMBatch`): INT4-packed codes ``seq_packed`` uint8 [B, L, d/2] (low nibble = even
dimension, uniform or k-means with ``seq_codebook``), or float codes ``seq_float`` [B, L, d]
(fp16/int8 codes dequantized by the reader; ``d = 1`` expresses the "soft label as a 1-d sequence"
ablation), ``seq_lengths`` [B] and optional ``seq_deltas`` [B, L] (seconds to the example).

Encoders (table 3 of the paper):

* ``mean`` / ``sum``: masked mean / sum of the codes → [B, d].
* ``din``: DIN target attention (MLP scorer over [q, z, q−z, q⊙z], raw-score weights) of the
  target embedding projected to the code space over the dequantized codes → [B, d].
* ``dmin``: multi-head dot-product target attention (DMIN style): queries are a per-head projection
  of the target [B, H, d], bias = a learned per-head scalar × log1p(Δt / 1 h) (recency), output
  [B, H, d] flattened → [B, H·d]. On INT4-packed codes this calls the fused dequant-and-attend op
  `kernels.int4_attend` (its fast PyTorch path on CPU, Triton on CUDA, where codes are never
  dequantized in memory); float codes go through the same op (it reads float values as they are). Mean / sum
  pooling also go through the op (zero queries → uniform weights = the mean).

Masks come from lengths only: positions ``>= length`` never change an output; empty sequences
pool to zeros.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

import kernels
from loopfm.layers import DINAttention, length_mask

EncoderKind = Literal["mean", "sum", "din", "dmin"]
ENCODERS = ("mean", "sum", "din", "dmin")


def dequantize(batch) -> Tensor:
    """Float codes [B, L, d] of a batch's sequence (INT4 codes are unpacked and dequantized)."""
    if batch.seq_packed is not None:
        return kernels.dequantize_int4(kernels.unpack_int4(batch.seq_packed), batch.seq_codebook)
    return batch.seq_float.float()


class SequenceEncoder(nn.Module):
    """Pools a LoopFM sequence; ``out_dim`` is d (mean/sum/din) or heads·d (dmin)."""

    def __init__(self, kind: EncoderKind, code_dim: int, query_dim: int, heads: int = 2,
                 attention_hidden: tuple[int, ...] = (64, 32), backend: str = "auto") -> None:
        super().__init__()
        if kind not in ENCODERS:
            raise ValueError(f"encoder must be one of {ENCODERS}, got {kind!r}")
        self.kind, self.code_dim, self.heads, self.backend = kind, code_dim, heads, backend
        if kind == "din":
            self.attention = DINAttention(query_dim, code_dim, attention_hidden)
        if kind == "dmin":
            self.query = nn.Linear(query_dim, heads * code_dim)
            # recency slope per head; starts at 0 (no bias), learns how fast old entries fade
            self.recency = nn.Parameter(torch.zeros(heads))
        self.out_dim = heads * code_dim if kind == "dmin" else code_dim

    def forward(self, batch, query: Tensor) -> Tensor:
        if batch.seq_lengths is None or not batch.has_sequence:
            raise ValueError("this model was built with a LoopFM sequence; the batch carries none")
        if batch.seq_dim != self.code_dim:
            raise ValueError(f"sequence code width {batch.seq_dim} != the encoder's {self.code_dim}")
        codes = batch.seq_packed if batch.seq_packed is not None else batch.seq_float
        lengths = batch.seq_lengths.to(torch.int32).clamp(0, codes.shape[1])  # as the kernel does
        B = lengths.shape[0]
        if self.kind in ("mean", "sum"):
            pooled = self._attend(batch, lengths, query.new_zeros(B, 1, self.code_dim), None)[:, 0]
            if self.kind == "sum":
                pooled = pooled * lengths.to(pooled.dtype)[:, None]
            return pooled
        if self.kind == "din":
            return self.attention(query, dequantize(batch), lengths)
        q = self.query(query).view(B, self.heads, self.code_dim)
        bias = None
        if batch.seq_deltas is not None:
            age = torch.log1p(batch.seq_deltas.float().clamp(min=0) / 3600.0)
            age = torch.where(length_mask(lengths, age.shape[1]), age, torch.zeros_like(age))
            bias = self.recency[None, :, None] * age[:, None, :]  # [B, H, L]
        return self._attend(batch, lengths, q, bias).reshape(B, -1)

    def _attend(self, batch, lengths: Tensor, q: Tensor, bias: Tensor | None) -> Tensor:
        """`kernels.int4_attend` on the batch's packed codes, or on its float codes as values."""
        codebook = None
        if batch.seq_packed is not None:
            codes = batch.seq_packed
            codebook = batch.seq_codebook.float() if batch.seq_codebook is not None else None
        else:
            codes = batch.seq_float.float()
        return kernels.int4_attend(codes, lengths, q.float(), codebook=codebook,
                                   bias=None if bias is None else bias.float(), backend=self.backend)
