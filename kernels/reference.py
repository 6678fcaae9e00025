"""Pure-PyTorch reference of INT4 dequant-and-attend: unpack -> dequantize -> masked softmax attention.

This is the CPU implementation behind ``kernels.int4_attend`` and the oracle the Triton kernel is
tested against, so it favours readability over speed. For each example b and head h::

    s_l   = q_h . z_l / sqrt(d) + bias_l            for l < length_b
    out_h = sum_l softmax_l(s) z_l                  (zeros when length_b == 0)
    lse_h = log sum_l exp(s_l)                      (-inf when length_b == 0)

``codes`` are packed uint8 ``[..., d/2]`` (see ``kernels.packing``) or, for comparison runs,
already-dequantized float values ``[..., d]``. Inputs are validated by ``kernels.ops``; padded
positions (l >= length) are ignored whatever they hold, NaN included.

Shapes: padded codes ``[B, L, d/2]`` + lengths ``[B]``, bias ``[B, L]`` or ``[B, H, L]``, weights
``[B, H, L]``; jagged values ``[total, d/2]`` + offsets ``[B+1]``, bias ``[total]`` or
``[total, H]``, weights ``[total, H]`` (row-aligned with the values, like the codes).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from .packing import dequantize_int4, unpack_int4

__all__ = [
    "stat_dtype",
    "sequence_values",
    "attend_padded",
    "attend_jagged",
    "attend_padded_backward",
    "attend_jagged_backward",
]

Tensor = torch.Tensor


def stat_dtype(query_dtype: torch.dtype) -> torch.dtype:
    """dtype of lse and weights: float64 for float64 queries (gradcheck), else float32."""
    return torch.float64 if query_dtype == torch.float64 else torch.float32


def sequence_values(codes: Tensor, codebook: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    """Dequantized values ``[..., d]`` of packed uint8 codes, or float codes cast to ``dtype``."""
    if codes.dtype.is_floating_point:
        return codes.to(dtype)
    return dequantize_int4(unpack_int4(codes), codebook).to(dtype)


def _bias_bhl(bias: Tensor, dtype: torch.dtype) -> Tensor:
    """Bias ``[B, L]`` (shared by all heads) or ``[B, H, L]`` as a broadcastable ``[B, H|1, L]``."""
    bias = bias.to(dtype)
    return bias[:, None, :] if bias.dim() == 2 else bias


def _scores(z: Tensor, queries: Tensor, bias: Optional[Tensor], valid: Tensor) -> Tensor:
    """Attention logits ``[B, H, L]``, -inf at padded positions."""
    scores = torch.einsum("bhd,bld->bhl", queries, z) / math.sqrt(z.shape[-1])
    if bias is not None:
        scores = scores + _bias_bhl(bias, scores.dtype)
    return scores.masked_fill(~valid[:, None, :], float("-inf"))


def _masked_values(codes: Tensor, lengths: Tensor, codebook: Optional[Tensor], dtype: torch.dtype):
    """(z ``[B, L, d]`` zeroed past each length, valid mask ``[B, L]``)."""
    valid = torch.arange(codes.shape[1], device=codes.device) < lengths[:, None]
    # Zeroing (not multiplying) keeps garbage or NaN in the padding out of values and gradients.
    z = sequence_values(codes, codebook, dtype).masked_fill(~valid[..., None], 0.0)
    return z, valid


def attend_padded(
    codes: Tensor,
    lengths: Tensor,
    queries: Tensor,
    codebook: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(out ``[B, H, d]``, lse ``[B, H]``, weights ``[B, H, L]``) for padded codes ``[B, L, d/2]``.

    Differentiable in ``queries`` and ``bias``; empty sequences give exact zeros and zero grads.
    """
    dtype = stat_dtype(queries.dtype)
    z, valid = _masked_values(codes, lengths, codebook, dtype)
    scores = _scores(z, queries.to(dtype), bias, valid)
    empty = ~valid.any(dim=-1)  # [B]
    # An all -inf row would make softmax (and its gradient) NaN; give it finite logits instead and
    # let the mask zero its weights, so the output and every gradient of an empty sequence are 0.
    safe = scores.masked_fill(empty[:, None, None], 0.0)
    weights = torch.softmax(safe, dim=-1) * valid[:, None, :]
    out = torch.einsum("bhl,bld->bhd", weights, z).to(queries.dtype)
    lse = torch.logsumexp(safe, dim=-1).masked_fill(empty[:, None], float("-inf"))
    return out.contiguous(), lse.detach(), weights


def attend_padded_backward(
    grad_out: Tensor,
    codes: Tensor,
    lengths: Tensor,
    queries: Tensor,
    codebook: Optional[Tensor],
    bias: Optional[Tensor],
    out: Tensor,
    lse: Tensor,
    bias_grad: bool,
) -> tuple[Tensor, Optional[Tensor]]:
    """(d queries, d bias or None), recomputed from the codes and the saved lse (flash-style).

    p = exp(s - lse), dp = g . z, ds = p (dp - g . out), dq = sum_l ds z / sqrt(d), dbias = ds
    (summed over heads for a [B, L] bias).
    """
    dtype = stat_dtype(queries.dtype)
    z, valid = _masked_values(codes, lengths, codebook, dtype)
    scores = _scores(z, queries.to(dtype), bias, valid)
    finite_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).to(dtype)
    p = torch.exp(scores - finite_lse[..., None]) * valid[:, None, :]
    g = grad_out.to(dtype)
    dp = torch.einsum("bhd,bld->bhl", g, z)
    delta = (g * out.to(dtype)).sum(dim=-1, keepdim=True)
    ds = p * (dp - delta)
    dq = (torch.einsum("bhl,bld->bhd", ds, z) / math.sqrt(z.shape[-1])).to(queries.dtype)
    if not bias_grad or bias is None:
        return dq, None
    dbias = ds.sum(dim=1) if bias.dim() == 2 else ds
    return dq, dbias.to(bias.dtype)


class _JaggedIndex(NamedTuple):
    index: Tensor  # [B, Lmax] row of each (example, position); 0 where invalid
    valid: Tensor  # [B, Lmax] bool
    lengths: Tensor  # [B]


def _jagged_index(offsets: Tensor) -> _JaggedIndex:
    lengths = (offsets[1:] - offsets[:-1]).clamp(min=0)
    max_len = int(lengths.max()) if lengths.numel() else 0
    pos = torch.arange(max_len, device=offsets.device)
    valid = pos < lengths[:, None]
    index = (offsets[:-1, None] + pos).masked_fill(~valid, 0).long()
    return _JaggedIndex(index, valid, lengths)


def _gather_rows(x: Tensor, jag: _JaggedIndex) -> Tensor:
    """Rows of a jagged ``[total, ...]`` tensor as padded ``[B, Lmax, ...]`` (invalid rows zero)."""
    if x.shape[0] == 0:  # nothing to gather; every position is invalid
        return x.new_zeros((*jag.index.shape, *x.shape[1:]))
    rows = x[jag.index]
    return rows.masked_fill(~jag.valid.view(*jag.valid.shape, *([1] * (x.dim() - 1))), 0)


def _scatter_rows(x: Tensor, jag: _JaggedIndex, total: int) -> Tensor:
    """Padded ``[B, Lmax, ...]`` back to jagged ``[total, ...]``; rows outside every segment are 0."""
    out = x.new_zeros((total, *x.shape[2:]))
    return out.index_put((jag.index[jag.valid],), x[jag.valid])


def _padded_bias(bias: Optional[Tensor], jag: _JaggedIndex) -> Optional[Tensor]:
    """Jagged bias ``[total]`` / ``[total, H]`` as padded ``[B, Lmax]`` / ``[B, H, Lmax]``."""
    if bias is None:
        return None
    rows = _gather_rows(bias, jag)
    return rows if bias.dim() == 1 else rows.permute(0, 2, 1)


def attend_jagged(
    values: Tensor,
    offsets: Tensor,
    queries: Tensor,
    codebook: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(out ``[B, H, d]``, lse ``[B, H]``, weights ``[total, H]``) for jagged codes ``[total, d/2]``.

    Example b owns rows ``offsets[b]:offsets[b+1]``; implemented by padding to the longest one.
    """
    jag = _jagged_index(offsets)
    codes = _gather_rows(values, jag)
    out, lse, weights = attend_padded(codes, jag.lengths, queries, codebook, _padded_bias(bias, jag))
    return out, lse, _scatter_rows(weights.permute(0, 2, 1), jag, values.shape[0])


def attend_jagged_backward(
    grad_out: Tensor,
    values: Tensor,
    offsets: Tensor,
    queries: Tensor,
    codebook: Optional[Tensor],
    bias: Optional[Tensor],
    out: Tensor,
    lse: Tensor,
    bias_grad: bool,
) -> tuple[Tensor, Optional[Tensor]]:
    """Jagged counterpart of ``attend_padded_backward``; d bias comes back jagged-aligned."""
    jag = _jagged_index(offsets)
    codes = _gather_rows(values, jag)
    dq, dbias = attend_padded_backward(
        grad_out, codes, jag.lengths, queries, codebook, _padded_bias(bias, jag), out, lse, bias_grad
    )
    if dbias is None:
        return dq, None
    dbias_rows = dbias if dbias.dim() == 2 else dbias.permute(0, 2, 1)  # [B, Lmax(, H)]
    return dq, _scatter_rows(dbias_rows, jag, values.shape[0])
