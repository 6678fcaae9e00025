"""Layers shared by the foundation model (`loopfm.fm.model`) and the vertical models (`loopfm.vm`).

Plain PyTorch (no TorchRec). Sequence convention: left-aligned [B, L, ...] with lengths [B];
positions ``>= length`` are padding, masked out (`length_mask`) and never able to change an
output; an empty sequence pools to zeros.

Speed notes (CPU, one thread, 50-long histories): self-attention runs through
`F.scaled_dot_product_attention` with one additive float mask and one QKV matmul; on packed
sequences (`SelfAttention.forward_packed`: the real positions only, `length_buckets` cutting the
attention into buckets of similar lengths) as batched matmuls, faster than SDPA's kernel at these
sizes. DIN-style attention units never build the [q, k, q⊙k, k−q] concatenation per position:
their first linear layer is split into a per-key part (one batched matmul whose per-example
matrix folds in q⊙), a per-query part computed once per example, and (for position features) a
projected table looked up per position. `shared_rows` finds the rows of a batch that repeat a
sequence (impressions of one page view share their user's history), so that work depending on
the sequence alone is done once per distinct row. Parameters and their names are those of the
plain formulation, so results match it up to float rounding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NEG = -1e9  # finite mask sentinel: a fully masked row softmaxes to finite values, never NaN


def length_mask(lengths: Tensor, L: int) -> Tensor:
    """Bool [B, L]: True at real positions (``position < length``)."""
    return torch.arange(L, device=lengths.device)[None, :] < lengths.to(torch.long)[:, None]


def masked_mean(x: Tensor, lengths: Tensor) -> Tensor:
    """Mean over the real positions of x [B, L, D]; zeros for empty sequences."""
    m = length_mask(lengths, x.shape[1]).unsqueeze(-1)
    s = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(1)
    return s / lengths.clamp(min=1).to(x.dtype)[:, None]


def shared_rows(x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor] | None:
    """Rows of ``x`` [B, ...] that repeat (with equal ``lengths`` [B]): ``(first, inverse)`` such that
    ``x[first][inverse]`` equals ``x`` exactly, ``first`` [U] holding one row index per distinct row;
    None when every row is distinct.

    Rows are grouped by a fingerprint, an integer weighted sum of their bytes (32 bits at a time;
    16 for rows of 16 KB or more) plus their length, computed exactly in float64 (every partial sum stays below
    2**53, so identical rows get identical fingerprints whatever the summation order), then every
    row is compared exactly with its group's first row; if two different rows ever shared a
    fingerprint, the batch counts as all distinct (None): a grouping is never wrong, at worst missed.
    """
    B = x.shape[0]
    if B < 2:
        return None
    flat = x.detach().reshape(B, -1).contiguous()
    nbytes = flat.shape[1] * flat.element_size()
    # |sum| < 2**52: |word| <= 2**31, weights <= 2**9, fewer than 2**12 words; or 2**15, 2**16, 2**21
    if nbytes % 4 == 0 and nbytes < 4 * 2**12:
        words, modulus = flat.view(torch.int32).to(torch.float64), 509
    else:
        words, modulus = flat.view(torch.int16).to(torch.float64), 65521
    n = words.shape[1]
    weights = (torch.arange(n, dtype=torch.float64, device=x.device) * 40503 % modulus) + 1
    key = words @ weights + lengths.to(torch.float64)  # lengths < 2**31: still below 2**53, exact
    _, inverse = torch.unique(key, return_inverse=True)
    U = int(inverse.max()) + 1
    if U == B:
        return None
    first = torch.full((U,), B, dtype=torch.long, device=x.device).scatter_reduce_(
        0, inverse, torch.arange(B, device=x.device), "amin")
    rep = first.index_select(0, inverse)
    again = (rep != torch.arange(B, device=x.device)).nonzero().squeeze(1)  # rows after their group's first
    rep = rep.index_select(0, again)
    if not (torch.equal(flat.index_select(0, again), flat.index_select(0, rep))
            and torch.equal(lengths.index_select(0, again), lengths.index_select(0, rep))):
        return None
    return first, inverse


def masked_softmax(logits: Tensor, mask: Tensor) -> Tensor:
    """Softmax over the last dim restricted to ``mask``; all-masked rows give zeros (not NaN)."""
    logits = logits.masked_fill(~mask, float("-inf"))
    any_valid = mask.any(-1, keepdim=True)
    w = torch.softmax(torch.where(any_valid, logits, torch.zeros_like(logits)), dim=-1)
    return torch.where(mask, w, torch.zeros_like(w))


def additive_key_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """[B, L] bool key mask -> additive float mask [B, 1, 1, L] (0 real, `NEG` padding) for SDPA."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, NEG)[:, None, None, :]


class MLP(nn.Sequential):
    """Linear → activation (→ dropout) blocks, then an optional plain Linear to ``out``.

    ``out_dim`` is the last width (the input's when there are no layers)."""

    def __init__(self, in_dim: int, hidden: Sequence[int], dropout: float = 0.0,
                 activation: type[nn.Module] = nn.ReLU, out: int | None = None) -> None:
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden:
            layers += [nn.Linear(d, h), activation()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            d = h
        if out is not None:
            layers.append(nn.Linear(d, out))
            d = out
        super().__init__(*layers)
        self.out_dim = d


@dataclass
class LengthBuckets:
    """Packed rows (see `length_buckets`) in buckets of similar lengths, each padded to its longest
    and laid out one after another: ``pad`` reads them from the packed positions, ``real`` reads
    the packed positions back (both None when nothing is padded)."""
    shapes: list[tuple[int, int]]  # (rows, length) per bucket
    key_masks: list[Tensor | None]  # additive [rows, 1, 1, length] per bucket; None: no padding in it
    pad: Tensor | None  # [slots] packed position read into every padded slot (padding reads any real one)
    real: Tensor | None  # [packed positions] slot of every packed position


BUCKET_COST = 16000  # the fixed cost of one more attention bucket, in rows x length^2 (measured, CPU)


def length_buckets(lengths: Tensor, dtype: torch.dtype) -> LengthBuckets:
    """Buckets for attention over the real positions only, of rows packed one after another.

    ``lengths`` [R] in descending order; row r's positions are packed at ``sum(lengths[:r]) +
    [0, lengths[r])`` (an empty row holds none and joins no bucket). Attention costs about rows x
    length^2 per bucket plus a fixed `BUCKET_COST`: the buckets (runs of rows, cut where the length
    changes) minimise that sum."""
    ls = lengths.tolist()
    groups: list[list[int]] = []  # [length, rows] per distinct length
    for n in ls:
        if n == 0:
            break
        if groups and groups[-1][0] == n:
            groups[-1][1] += 1
        else:
            groups.append([n, 1])
    count = [0]
    for _, rows in groups:
        count.append(count[-1] + rows)
    best, cut = [0.0], [0]  # best[j]: cheapest cover of groups [0, j); cut[j]: where its last bucket starts
    for j in range(1, len(groups) + 1):
        options = [(best[i] + (count[j] - count[i]) * groups[i][0] ** 2 + BUCKET_COST, i) for i in range(j)]
        b, i = min(options)
        best.append(b)
        cut.append(i)
    bounds, j = [], len(groups)
    while j > 0:
        bounds.append((cut[j], j))
        j = cut[j]
    shapes, masks, pads, reals = [], [], [], []
    slots = torch.arange(groups[0][0] if groups else 0, device=lengths.device)
    start = torch.cumsum(lengths, 0) - lengths
    padded = False
    for gi, gj in reversed(bounds):
        r0, r1, longest = count[gi], count[gj], groups[gi][0]
        real = slots[None, :longest] < lengths[r0:r1, None]  # [rows, longest]
        shapes.append((r1 - r0, longest))
        masks.append(None if groups[gj - 1][0] == longest else additive_key_mask(real, dtype))
        padded = padded or masks[-1] is not None
        pads.append(torch.where(real, start[r0:r1, None] + slots[None, :longest], start[r0]).reshape(-1))
        reals.append(real.reshape(-1))
    if not padded:
        return LengthBuckets(shapes, masks, None, None)
    pad = torch.cat(pads)
    return LengthBuckets(shapes, masks, pad, torch.cat(reals).nonzero().squeeze(1))


class SelfAttention(nn.Module):
    """Multi-head self-attention + residual + LayerNorm over [B, L, D]; padded keys are masked out.

    ``key_mask`` is the additive float mask of `additive_key_mask` (built once per sequence and
    shared by stacked layers)."""

    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model {d_model} is not a multiple of num_heads {num_heads}")
        self.h, self.hd = num_heads, d_model // num_heads
        self.q, self.k, self.v = (nn.Linear(d_model, d_model) for _ in range(3))
        self.out = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)

    def qkv(self, x: Tensor) -> Tensor:
        """[..., 3 * d_model]: the q, k and v projections as one matmul (the parameters stay the
        three `nn.Linear` of the plain formulation)."""
        weight = torch.cat([self.q.weight, self.k.weight, self.v.weight])
        bias = torch.cat([self.q.bias, self.k.bias, self.v.bias])
        return F.linear(x, weight, bias)

    def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.h, self.hd).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # [B, H, L, hd]
        return self.norm(x + self.out(a.transpose(1, 2).reshape(B, L, D)))

    def forward_packed(self, x: Tensor, buckets: LengthBuckets) -> Tensor:
        """The same on packed sequences (x [N, D], the real positions only, see `length_buckets`):
        projections, residual and norm per real position, attention per bucket of similar lengths
        (one gather into the padded buckets and one back, whatever their number)."""
        D = x.shape[1]
        qkv = self.qkv(x)
        if buckets.pad is not None:
            qkv = qkv.index_select(0, buckets.pad)
        parts, at = [], 0
        for (rows, length), key_mask in zip(buckets.shapes, buckets.key_masks):
            t = qkv[at:at + rows * length].view(rows, length, 3, self.h, self.hd)
            q, k, v = t.permute(2, 0, 3, 1, 4).unbind(0)
            parts.append(_attend(q, k, v, key_mask).transpose(1, 2).reshape(rows * length, D))
            at += rows * length
        a = torch.cat(parts) if len(parts) > 1 else parts[0] if parts else qkv[:, :D]  # none: empty
        if buckets.real is not None:
            a = a.index_select(0, buckets.real)
        return self.norm(x + self.out(a))


def _attend(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None) -> Tensor:
    """Softmax attention of q, k, v [B, H, L, hd] with an optional additive key mask [B, 1, 1, L]
    as batched matmuls: for the short buckets of `SelfAttention.forward_packed` (L <= 50, hd 16)
    faster on CPU than SDPA's flash kernel, which works in blocks of 32 queries."""
    B, H, L, hd = q.shape
    q, k, v = (t.reshape(B * H, L, hd) for t in (q, k, v))
    if key_mask is None:
        s = torch.bmm(q, k.transpose(1, 2)).mul_(1 / math.sqrt(hd))
    else:
        s = torch.baddbmm(key_mask.expand(B, H, 1, L).reshape(B * H, 1, L), q, k.transpose(1, 2),
                          alpha=1 / math.sqrt(hd))
    return torch.bmm(torch.softmax(s, -1), v).view(B, H, L, hd)


def din_unit_input(keys: Tensor, query: Tensor, w_key: Tensor, w_query: Tensor, w_prod: Tensor,
                   bias: Tensor | None) -> Tensor:
    """First linear layer of a DIN attention unit, ``k W_k + q W_q + (k⊙q) W_p + b``, per position.

    keys [..., L, d], query [..., d]; weights [..., out, d] (nn.Linear layout, broadcasting over
    the leading dims), bias [..., out]. Returns [..., L, out]. A difference feature k−q folds into
    the weights (W_k + W_diff, W_q − W_diff) before the call.
    """
    per_key = w_key.transpose(-1, -2) + query.unsqueeze(-1) * w_prod.transpose(-1, -2)  # [..., d, out]
    per_query = torch.matmul(query.unsqueeze(-2), w_query.transpose(-1, -2))  # [..., 1, out]
    if bias is not None:
        per_query = per_query + bias.unsqueeze(-2)
    return torch.matmul(keys, per_key) + per_query


class DINAttention(nn.Module):
    """DIN's target attention (Zhou et al. 2018): an MLP scores [q, k, q−k, q⊙k] per position;
    weights are the raw scores (no softmax, as DIN and FuxiCTR's default), zero past the length;
    returns Σ_l w_l v_l [B, D_v]. Keys may differ from values in width via ``key_dim``."""

    def __init__(self, query_dim: int, key_dim: int, hidden: Sequence[int] = (64, 32),
                 softmax: bool = False) -> None:
        super().__init__()
        self.project = nn.Linear(query_dim, key_dim) if query_dim != key_dim else nn.Identity()
        self.scorer = MLP(4 * key_dim, hidden, activation=nn.Sigmoid, out=1)
        self.softmax = softmax

    def scores(self, query: Tensor, keys: Tensor) -> Tensor:
        q = self.project(query)
        first = self.scorer[0]
        w_q, w_k, w_diff, w_prod = first.weight.chunk(4, dim=1)  # input order [q, k, q−k, q⊙k]
        x = din_unit_input(keys, q, w_k - w_diff, w_q + w_diff, w_prod, first.bias)
        for layer in list(self.scorer)[1:]:
            x = layer(x)
        return x.squeeze(-1)

    def forward(self, query: Tensor, keys: Tensor, lengths: Tensor, values: Tensor | None = None) -> Tensor:
        values = keys if values is None else values
        mask = length_mask(lengths, keys.shape[1])
        keys = torch.where(mask[..., None], keys, torch.zeros((), dtype=keys.dtype))
        values = torch.where(mask[..., None], values, torch.zeros((), dtype=values.dtype))
        s = self.scores(query, keys)
        w = masked_softmax(s, mask) if self.softmax else torch.where(mask, s, torch.zeros_like(s))
        return torch.einsum("bl,bld->bd", w, values)


def dot_attention(queries: Tensor, values: Tensor, lengths: Tensor, bias: Tensor | None = None) -> Tensor:
    """Dot-product target attention over learned values: out[b,h] = Σ_l softmax_l(q_h·z_l/√d + bias) z_l.

    queries [B, H, d], values [B, L, d], bias [B, L] or [B, H, L]; zeros for empty sequences.
    Differentiable in the values too; sequences of data (codes) go through `kernels.int4_attend`,
    which computes the same without building the weights in memory."""
    mask = length_mask(lengths, values.shape[1])
    values = torch.where(mask[..., None], values, torch.zeros((), dtype=values.dtype))
    logits = torch.einsum("bhd,bld->bhl", queries, values.to(queries.dtype)) / math.sqrt(values.shape[-1])
    if bias is not None:
        logits = logits + (bias[:, None] if bias.dim() == 2 else bias)
    w = masked_softmax(logits, mask[:, None, :])
    return torch.einsum("bhl,bld->bhd", w, values.to(queries.dtype))
