"""Fast plain-PyTorch INT4 dequant-and-attend: the CPU backend ("torch") of ``kernels.int4_attend``.

Same contract and results as ``kernels.reference`` (the oracle it is tested against), built for
speed on a CPU where the VM's whole step is a few milliseconds:

* Uniform codes are unpacked by two casting copies (low and high nibbles) straight into one float
  ``[B, L, d]``, not through unpack -> stack -> cast -> subtract -> scale -> mask passes.
* Uniform INT4 is affine, z = (u - 8) / 8, so the kernel works on u and folds the map into the
  small ``[B, H, *]`` tensors: q.z = (q.u) / 8 - sum(q), sum_l w_l z_l = (sum_l w_l u_l) / 8 - sum(w).
  A k-means codebook is not affine: its values come from a 257-row table (one row per byte,
  both nibbles, plus a zero row that padded positions read).
* Padding is masked on the ``[B, H, L]`` logits only: uniform codes are finite whatever a padded
  byte holds, so a zero weight keeps them out exactly; codebook and float values, which may hold
  NaN there, are zeroed first.
* Two ``bmm`` per pass; the backward recomputes the values from the codes (flash-style, from the
  saved lse) and gets the logits and ``g . z`` from one ``bmm`` of the stacked queries and grads.

Shapes and conventions are those of ``kernels.reference``; jagged input is padded to the longest
segment with the reference's helpers.
"""
from __future__ import annotations

import math
import threading
from typing import NamedTuple, Optional

import torch

from . import reference
from .packing import UNIFORM_OFFSET, UNIFORM_SCALE

__all__ = ["attend_padded", "attend_padded_backward", "attend_jagged", "attend_jagged_backward"]

Tensor = torch.Tensor


class _Values(NamedTuple):
    """The sequence as ``z = scale * u + shift``, u [B, L, d] (scale 1, shift 0: u is z)."""
    u: Tensor
    scale: float
    shift: float


_SCRATCH = threading.local()


def _scratch(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A per-thread buffer for the unpacked values, reused across calls: they never leave the
    function that fills them, and a fresh ``[B, L, d]`` float buffer (1.6 MB for a VM batch) comes
    from fresh pages each time, whose faults cost more than the unpacking itself."""
    key = (shape, dtype, device)
    if getattr(_SCRATCH, "key", None) != key:
        _SCRATCH.key, _SCRATCH.buf = key, torch.empty(shape, dtype=dtype, device=device)
    return _SCRATCH.buf


def _byte_table(codebook: Tensor, dtype: torch.dtype) -> Tensor:
    """[257, 2]: row b = (codebook[b & 15], codebook[b >> 4]); row 256 = zeros (for padding)."""
    byte = torch.arange(256, device=codebook.device)
    table = torch.stack((codebook[byte & 15], codebook[byte >> 4]), -1).to(dtype)
    return torch.cat((table, table.new_zeros(1, 2)))


def _values(codes: Tensor, valid: Tensor, codebook: Optional[Tensor], dtype: torch.dtype) -> _Values:
    """The values of padded codes ``[B, L, d/2]`` (uint8) or ``[B, L, d]`` (float), see `_Values`."""
    if codes.dtype.is_floating_point:
        return _Values(codes.to(dtype).masked_fill(~valid[..., None], 0.0), 1.0, 0.0)
    B, L, half = codes.shape
    if codebook is not None:
        byte = codes.long().masked_fill_(~valid[..., None], 256)
        z = _byte_table(codebook, dtype).index_select(0, byte.view(-1))
        return _Values(z.view(B, L, 2 * half), 1.0, 0.0)
    u = _scratch((B, L, half, 2), dtype, codes.device)
    u[..., 0] = codes & 0x0F  # the copies cast uint8 -> float on the way
    u[..., 1] = codes >> 4
    return _Values(u.view(B, L, 2 * half), UNIFORM_SCALE, -UNIFORM_OFFSET * UNIFORM_SCALE)


def _logits(zq: Tensor, q: Tensor, v: _Values, bias: Optional[Tensor], valid: Tensor, scale: float) -> Tensor:
    """Logits ``[B, H, L]`` (-inf past each length) from ``zq = q . u`` (reused in place)."""
    s = zq.mul_(v.scale * scale)
    if v.shift:
        s.add_(q.sum(-1, keepdim=True), alpha=v.shift * scale)
    if bias is not None:
        s.add_(bias[:, None, :] if bias.dim() == 2 else bias)
    return s.masked_fill_(~valid[:, None, :], float("-inf"))


def _setup(codes: Tensor, lengths: Tensor, queries: Tensor, codebook: Optional[Tensor]):
    dtype = reference.stat_dtype(queries.dtype)
    valid = torch.arange(codes.shape[1], device=codes.device) < lengths[:, None]
    return dtype, valid, _values(codes, valid, codebook, dtype), 1.0 / math.sqrt(queries.shape[-1])


def attend_padded(
    codes: Tensor,
    lengths: Tensor,
    queries: Tensor,
    codebook: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(out ``[B, H, d]``, lse ``[B, H]``, weights ``[B, H, L]``), as ``reference.attend_padded``."""
    if codes.shape[1] == 0:  # no positions at all (an all-empty jagged batch): nothing to speed up
        return reference.attend_padded(codes, lengths, queries, codebook, bias)
    dtype, valid, v, scale = _setup(codes, lengths, queries, codebook)
    q = queries.to(dtype)
    b = None if bias is None else bias.to(dtype)
    s = _logits(torch.bmm(q, v.u.transpose(1, 2)), q, v, b, valid, scale)
    top = s.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # empty rows: every logit -inf
    p = s.sub_(top).exp_()  # 0 past each length, and everywhere in an empty row
    total = p.sum(-1, keepdim=True)
    weights = p.div_(total.clamp(min=torch.finfo(dtype).tiny))
    out = torch.bmm(weights, v.u)
    if v.scale != 1.0:
        out.mul_(v.scale)
    if v.shift:
        out.add_(weights.sum(-1, keepdim=True), alpha=v.shift)  # sum(w) is 1, or 0 when empty
    lse = (top + total.log()).squeeze(-1)  # log(0) = -inf for an empty row
    return out.to(queries.dtype), lse, weights


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
    """(d queries, d bias or None), as ``reference.attend_padded_backward``."""
    if codes.shape[1] == 0:
        return reference.attend_padded_backward(grad_out, codes, lengths, queries, codebook, bias, out, lse, bias_grad)
    dtype, valid, v, scale = _setup(codes, lengths, queries, codebook)
    q, g = queries.to(dtype), grad_out.to(dtype)
    H = q.shape[1]
    both = torch.bmm(torch.cat((q, g), 1), v.u.transpose(1, 2))  # [B, 2H, L]: q.u and g.u
    s = _logits(both[:, :H], q, v, None if bias is None else bias.to(dtype), valid, scale)
    finite_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).to(dtype)
    p = s.sub_(finite_lse[..., None]).exp_()  # 0 past each length
    dp = both[:, H:]
    if v.scale != 1.0:
        dp.mul_(v.scale)
    delta = (g * out.to(dtype)).sum(-1, keepdim=True)
    if v.shift:
        delta.sub_(g.sum(-1, keepdim=True), alpha=v.shift)  # g.z = scale * g.u + shift * sum(g)
    ds = p.mul_(dp.sub_(delta))
    dq = torch.bmm(ds, v.u).mul_(v.scale * scale)
    if v.shift:
        dq.add_(ds.sum(-1, keepdim=True), alpha=v.shift * scale)
    dq = dq.to(queries.dtype)
    if not bias_grad or bias is None:
        return dq, None
    dbias = ds.sum(dim=1) if bias.dim() == 2 else ds
    return dq, dbias.to(bias.dtype)


def attend_jagged(
    values: Tensor,
    offsets: Tensor,
    queries: Tensor,
    codebook: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """As ``reference.attend_jagged``: padded to the longest segment, weights row-aligned."""
    jag = reference._jagged_index(offsets)
    codes = reference._gather_rows(values, jag)
    out, lse, weights = attend_padded(codes, jag.lengths, queries, codebook, reference._padded_bias(bias, jag))
    return out, lse, reference._scatter_rows(weights.permute(0, 2, 1), jag, values.shape[0])


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
    """As ``reference.attend_jagged_backward``; d bias comes back jagged-aligned."""
    jag = reference._jagged_index(offsets)
    codes = reference._gather_rows(values, jag)
    dq, dbias = attend_padded_backward(grad_out, codes, jag.lengths, queries, codebook,
                                       reference._padded_bias(bias, jag), out, lse, bias_grad)
    if dbias is None:
        return dq, None
    dbias_rows = dbias if dbias.dim() == 2 else dbias.permute(0, 2, 1)
    return dq, reference._scatter_rows(dbias_rows, jag, values.shape[0])
