"""Triton kernels for fused INT4 dequant-and-attend (forward and backward) and their launchers.

One program per example handles all H heads, so each code byte is read from memory once. The
program walks the sequence in blocks of BLOCK_L positions with an online (flash-attention style)
softmax; codes are unpacked and dequantized in registers and never written back. All arithmetic is
fp32 whatever the input dtypes (the Triton CPU interpreter computes bf16 wrongly, and fp32 is cheap
next to the memory traffic).

Inner-loop choices (the H100 has ~5 instructions per 4-bit element at full bandwidth):

* uniform codes become floats without a conversion instruction: ``bitcast(u | 0x4B000000)`` is the
  float 2^23 + u, so one subtraction of 2^23 + 8 gives u - 8 exactly; the 1/8 scale and
  log2(e)/sqrt(d) are folded into the queries once per program and into the output once at the end;
* softmax runs in base 2 (``exp2``) with log2(e) folded into the queries and the bias;
* the running maximum starts at a finite sentinel (-1e30), never -inf, so ``exp2(m - m_new)`` can
  never be ``exp2(-inf - -inf) = NaN``; an empty sequence runs no loop iteration, keeps l = 0 and
  stores exact zeros (and lse = -inf).

Import this module only after deciding on ``TRITON_INTERPRET``: ``triton.jit`` reads it when the
kernels below are decorated. ``kernels.ops`` imports it lazily for that reason.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import triton
import triton.language as tl

__all__ = ["INTERPRET", "TUNED", "int4_attend_fwd", "int4_attend_bwd", "default_config", "launch_config"]

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
_FLOAT_2P23_PLUS_8 = tl.constexpr(8388616.0)  # 2^23 + 8: strips the exponent bits and the offset 8
_M_INIT = tl.constexpr(-1.0e30)  # finite sentinel for the running max (see module docstring)

Tensor = torch.Tensor


@triton.jit
def _sequence(b, seq, L_pad, JAGGED: tl.constexpr):
    """(first row of example b, its length, positions to write for padded-width outputs)."""
    if JAGGED:
        start = tl.load(seq + b)
        length = tl.load(seq + b + 1) - start
        n_out = length
    else:
        start = b * 0
        # A length past the padded width is clamped so no read can leave the example's rows.
        length = tl.minimum(tl.maximum(tl.load(seq + b), 0), L_pad)
        n_out = L_pad
    return start, length, n_out


@triton.jit
def _load_values(code_base, stride_cl, pos, valid, offs_j, j_mask, codebook,
                 CODEBOOK: tl.constexpr, FP_CODES: tl.constexpr):
    """Values of the even and odd dimensions of BLOCK_L rows: two fp32 [BLOCK_L, DH_PAD] tiles.

    Uniform INT4 yields u - 8 (the 1/8 is applied by the caller); masked lanes hold finite junk
    that the callers weight by zero.
    """
    mask = valid[:, None] & j_mask[None, :]
    if FP_CODES:
        ptrs = code_base + pos[:, None] * stride_cl + 2 * offs_j[None, :]
        z_even = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        z_odd = tl.load(ptrs + 1, mask=mask, other=0.0).to(tl.float32)
    else:
        byte = tl.load(code_base + pos[:, None] * stride_cl + offs_j[None, :], mask=mask, other=0)
        byte = byte.to(tl.int32)
        lo = byte & 15  # low nibble = even dimension
        hi = byte >> 4
        if CODEBOOK:
            # The 64-byte table stays in L1; a gather from it beats a 16-way select.
            z_even = tl.load(codebook + lo)
            z_odd = tl.load(codebook + hi)
        else:
            z_even = (lo | 0x4B000000).to(tl.float32, bitcast=True) - _FLOAT_2P23_PLUS_8
            z_odd = (hi | 0x4B000000).to(tl.float32, bitcast=True) - _FLOAT_2P23_PLUS_8
    return z_even, z_odd


@triton.jit
def _scores(q_even, q_odd, z_even, z_odd, bias_base, stride_bh, stride_bl, pos, valid, offs_h,
            h_mask, HAS_BIAS: tl.constexpr):
    """Logits in base-2 units, [H_PAD, BLOCK_L], -inf past the length (queries carry the scale)."""
    s = tl.sum(q_even[:, None, :] * z_even[None, :, :] + q_odd[:, None, :] * z_odd[None, :, :], axis=2)
    if HAS_BIAS:
        ptrs = bias_base + offs_h[:, None] * stride_bh + pos[None, :] * stride_bl
        bias = tl.load(ptrs, mask=h_mask[:, None] & valid[None, :], other=0.0)
        s += bias.to(tl.float32) * _LOG2E
    return tl.where(valid[None, :], s, float("-inf"))


@triton.jit
def _load_pair(base, offs_h, stride_h, offs_j, h_mask, j_mask):
    """Even and odd dimensions of a [H, d] row block (unit stride along d) as fp32 [H_PAD, DH_PAD]."""
    ptrs = base + offs_h[:, None] * stride_h + 2 * offs_j[None, :]
    mask = h_mask[:, None] & j_mask[None, :]
    even = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    odd = tl.load(ptrs + 1, mask=mask, other=0.0).to(tl.float32)
    return even, odd


@triton.jit
def _store_pair(base, offs_h, stride_h, offs_j, h_mask, j_mask, even, odd):
    ptrs = base + offs_h[:, None] * stride_h + 2 * offs_j[None, :]
    mask = h_mask[:, None] & j_mask[None, :]
    tl.store(ptrs, even.to(base.dtype.element_ty), mask=mask)
    tl.store(ptrs + 1, odd.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _fwd_kernel(
    codes, seq, q, codebook, bias, out, lse, weights,
    H, L_pad, qk_scale, out_scale,
    stride_cb, stride_cl, stride_qb, stride_qh,
    stride_bb, stride_bh, stride_bl, stride_ob, stride_oh, stride_lb,
    stride_wb, stride_wh, stride_wl,
    DH: tl.constexpr, DH_PAD: tl.constexpr, H_PAD: tl.constexpr, BLOCK_L: tl.constexpr,
    JAGGED: tl.constexpr, CODEBOOK: tl.constexpr, FP_CODES: tl.constexpr,
    HAS_BIAS: tl.constexpr, RETURN_WEIGHTS: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_h = tl.arange(0, H_PAD)
    h_mask = offs_h < H
    offs_j = tl.arange(0, DH_PAD)
    j_mask = offs_j < DH
    offs_l = tl.arange(0, BLOCK_L)
    start, length, n_out = _sequence(b, seq, L_pad, JAGGED)
    # Padded tensors start at b * batch stride, jagged ones at row `start` (batch stride is 0).
    code_base = codes + b * stride_cb + start * stride_cl
    bias_base = bias + b * stride_bb + start * stride_bl

    q_even, q_odd = _load_pair(q + b * stride_qb, offs_h, stride_qh, offs_j, h_mask, j_mask)
    q_even *= qk_scale
    q_odd *= qk_scale
    m = tl.full([H_PAD], _M_INIT, tl.float32)
    l_sum = tl.zeros([H_PAD], tl.float32)
    acc_even = tl.zeros([H_PAD, DH_PAD], tl.float32)
    acc_odd = tl.zeros([H_PAD, DH_PAD], tl.float32)
    for l0 in range(0, length, BLOCK_L):
        pos = l0 + offs_l
        valid = pos < length
        z_even, z_odd = _load_values(code_base, stride_cl, pos, valid, offs_j, j_mask, codebook,
                                     CODEBOOK, FP_CODES)
        s = _scores(q_even, q_odd, z_even, z_odd, bias_base, stride_bh, stride_bl, pos, valid,
                    offs_h, h_mask, HAS_BIAS)
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        acc_even = acc_even * alpha[:, None] + tl.sum(p[:, :, None] * z_even[None, :, :], axis=1)
        acc_odd = acc_odd * alpha[:, None] + tl.sum(p[:, :, None] * z_odd[None, :, :], axis=1)
        m = m_new

    nonempty = l_sum > 0.0
    l_safe = tl.where(nonempty, l_sum, 1.0)
    inv = tl.where(nonempty, out_scale / l_safe, 0.0)
    _store_pair(out + b * stride_ob, offs_h, stride_oh, offs_j, h_mask, j_mask,
                acc_even * inv[:, None], acc_odd * inv[:, None])
    lse2 = m + tl.log2(l_safe)  # base-2 log-sum-exp of the scaled logits
    tl.store(lse + b * stride_lb + offs_h, tl.where(nonempty, lse2 * _LN2, float("-inf")), mask=h_mask)

    if RETURN_WEIGHTS:
        # A second pass: weights need the final lse. Padded outputs get zeros past the length.
        w_base = weights + b * stride_wb + start * stride_wl
        for l0 in range(0, n_out, BLOCK_L):
            pos = l0 + offs_l
            valid = pos < length
            z_even, z_odd = _load_values(code_base, stride_cl, pos, valid, offs_j, j_mask, codebook,
                                         CODEBOOK, FP_CODES)
            s = _scores(q_even, q_odd, z_even, z_odd, bias_base, stride_bh, stride_bl, pos, valid,
                        offs_h, h_mask, HAS_BIAS)
            w = tl.where(valid[None, :], tl.exp2(s - lse2[:, None]), 0.0)
            ptrs = w_base + offs_h[:, None] * stride_wh + pos[None, :] * stride_wl
            tl.store(ptrs, w, mask=h_mask[:, None] & (pos < n_out)[None, :])


@triton.jit
def _bwd_kernel(
    codes, seq, q, codebook, bias, out, grad_out, lse, dq, dbias,
    H, L_pad, qk_scale, z_scale, dq_scale,
    stride_cb, stride_cl, stride_qb, stride_qh,
    stride_bb, stride_bh, stride_bl, stride_ob, stride_oh, stride_gb, stride_gh, stride_lb,
    stride_dqb, stride_dqh, stride_dbb, stride_dbh, stride_dbl,
    DH: tl.constexpr, DH_PAD: tl.constexpr, H_PAD: tl.constexpr, BLOCK_L: tl.constexpr,
    JAGGED: tl.constexpr, CODEBOOK: tl.constexpr, FP_CODES: tl.constexpr,
    HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, BIAS_SHARED: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_h = tl.arange(0, H_PAD)
    h_mask = offs_h < H
    offs_j = tl.arange(0, DH_PAD)
    j_mask = offs_j < DH
    offs_l = tl.arange(0, BLOCK_L)
    start, length, n_out = _sequence(b, seq, L_pad, JAGGED)
    code_base = codes + b * stride_cb + start * stride_cl
    bias_base = bias + b * stride_bb + start * stride_bl
    dbias_base = dbias + b * stride_dbb + start * stride_dbl

    q_even, q_odd = _load_pair(q + b * stride_qb, offs_h, stride_qh, offs_j, h_mask, j_mask)
    q_even *= qk_scale
    q_odd *= qk_scale
    g_even, g_odd = _load_pair(grad_out + b * stride_gb, offs_h, stride_gh, offs_j, h_mask, j_mask)
    o_even, o_odd = _load_pair(out + b * stride_ob, offs_h, stride_oh, offs_j, h_mask, j_mask)
    delta = tl.sum(g_even * o_even + g_odd * o_odd, axis=1)  # g . out = sum_l p_l (g . z_l)
    g_even *= z_scale  # so that g . z_code below is g . z
    g_odd *= z_scale
    lse_v = tl.load(lse + b * stride_lb + offs_h, mask=h_mask, other=0.0)
    lse2 = tl.where(lse_v > float("-inf"), lse_v * _LOG2E, 0.0)  # empty rows: keep exp2 finite

    dq_even = tl.zeros([H_PAD, DH_PAD], tl.float32)
    dq_odd = tl.zeros([H_PAD, DH_PAD], tl.float32)
    n_iter = length
    if BIAS_GRAD:
        n_iter = n_out  # padded d bias gets zeros written past the length
    for l0 in range(0, n_iter, BLOCK_L):
        pos = l0 + offs_l
        valid = pos < length
        z_even, z_odd = _load_values(code_base, stride_cl, pos, valid, offs_j, j_mask, codebook,
                                     CODEBOOK, FP_CODES)
        s = _scores(q_even, q_odd, z_even, z_odd, bias_base, stride_bh, stride_bl, pos, valid,
                    offs_h, h_mask, HAS_BIAS)
        p = tl.where(valid[None, :] & h_mask[:, None], tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.sum(g_even[:, None, :] * z_even[None, :, :] + g_odd[:, None, :] * z_odd[None, :, :], axis=2)
        ds = p * (dp - delta[:, None])
        dq_even += tl.sum(ds[:, :, None] * z_even[None, :, :], axis=1)
        dq_odd += tl.sum(ds[:, :, None] * z_odd[None, :, :], axis=1)
        if BIAS_GRAD:
            in_range = pos < n_out
            if BIAS_SHARED:
                ds_pos = tl.sum(ds, axis=0)  # a [B, L] bias is shared by the heads
                tl.store(dbias_base + pos * stride_dbl, ds_pos.to(dbias.dtype.element_ty), mask=in_range)
            else:
                ptrs = dbias_base + offs_h[:, None] * stride_dbh + pos[None, :] * stride_dbl
                tl.store(ptrs, ds.to(dbias.dtype.element_ty), mask=h_mask[:, None] & in_range[None, :])
    _store_pair(dq + b * stride_dqb, offs_h, stride_dqh, offs_j, h_mask, j_mask,
                dq_even * dq_scale, dq_odd * dq_scale)


# --------------------------------------------------------------------------------------------------
# Launchers


def _kernel_is_interpreted() -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(_fwd_kernel, InterpretedFunction)


INTERPRET = _kernel_is_interpreted()
"""True when the kernels were decorated under TRITON_INTERPRET=1 (they then take CPU tensors)."""


def _fix_interpreter_scalar_index() -> None:
    """Let loops bounded by a loaded scalar run in the interpreter under NumPy >= 2.4.

    Triton 3.6's interpreter turns a scalar into an int with ``int(array_of_shape_1)``, which
    NumPy 2.4 rejects, so ``range(0, length, BLOCK_L)`` fails there; ``.item()`` is equivalent.
    Only the interpreter is touched, and only when that NumPy behaviour is present.
    """
    try:
        int(np.ones(1))
        return
    except TypeError:
        pass
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_loopfm_fixed", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patched._loopfm_fixed = True
    interpreter._patch_lang_tensor = patched


if INTERPRET:
    _fix_interpreter_scalar_index()


def default_config(h_pad: int, dh_pad: int) -> tuple[int, int]:
    """(BLOCK_L, num_warps) for padded head count and half width.

    Sized from ptxas register counts for sm_90 (no GPU timing yet): at most ~2048 fp32 products
    per [H, BLOCK_L, d/2] tile and 1024 code bytes per block keep the shapes checked (d 8..128,
    H 1..8) at 64..128 registers per thread without spills, except the backward with a bias
    gradient at H = 1, d = 128 (spills at any block size); wide tiles get 8 warps. Tune with
    ``benchmarks/kernel_bench.py --sweep`` on the target GPU.
    """
    block_l = min(2048 // (h_pad * dh_pad), 1024 // dh_pad)
    block_l = max(8, min(128, triton.next_power_of_2(max(1, block_l))))
    num_warps = 8 if h_pad * dh_pad >= 256 else 4
    return block_l, num_warps


TUNED: dict[tuple[str, int, int], tuple[int, int, int]] = {}
"""Measured launch configs: (pass "fwd" | "bwd", H_PAD, DH_PAD) -> (BLOCK_L, num_warps, num_stages).

Empty until a GPU session fills it from ``benchmarks/kernel_bench.py --sweep``, which prints the
entries to paste here (the fastest config it timed per pass and shape). Shapes not listed use
`default_config` and Triton's default number of pipeline stages."""


def launch_config(kind: str, h_pad: int, dh_pad: int) -> tuple[int, int, Optional[int]]:
    """(BLOCK_L, num_warps, num_stages or None for Triton's default) of pass ``kind``."""
    if (kind, h_pad, dh_pad) in TUNED:
        return TUNED[(kind, h_pad, dh_pad)]
    return (*default_config(h_pad, dh_pad), None)


def _unit_last(x: Tensor) -> Tensor:
    """The kernels index the last dimension with unit stride; other strides are passed through."""
    return x if x.dim() == 0 or x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def _seq_strides(x: Optional[Tensor], jagged: bool, heads_dim: bool) -> tuple[int, int, int]:
    """(batch, head, position) strides of a sequence-aligned tensor (bias, weights, d bias).

    Padded: ``[B, L]`` or ``[B, H, L]``; jagged: ``[total]`` or ``[total, H]`` (batch stride 0,
    the kernel starts at row offsets[b]). Missing tensors get zeros.
    """
    if x is None or x.numel() == 0:
        return 0, 0, 0
    if jagged:
        return 0, (x.stride(1) if heads_dim else 0), x.stride(0)
    if heads_dim:
        return x.stride(0), x.stride(1), x.stride(2)
    return x.stride(0), 0, x.stride(1)


def _check_triton_inputs(codes: Tensor, queries: Tensor) -> None:
    if queries.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"the Triton kernel takes float16/bfloat16/float32 queries, got {queries.dtype}")
    if queries.device.type == "cpu" and not INTERPRET:
        raise ValueError(
            "the Triton kernel needs CUDA tensors; CPU tensors run only under TRITON_INTERPRET=1 "
            "set before kernels.triton_int4_attend is imported"
        )


class _Meta:
    """Shapes, flags and scales shared by the forward and backward launches."""

    def __init__(self, kind: str, codes: Tensor, queries: Tensor, codebook: Optional[Tensor],
                 block_l: Optional[int], num_warps: Optional[int], num_stages: Optional[int]):
        self.jagged = codes.dim() == 2
        self.fp_codes = codes.dtype.is_floating_point
        self.B, self.H, self.d = queries.shape
        self.dh = self.d // 2
        self.L_pad = 0 if self.jagged else codes.shape[1]
        self.h_pad = triton.next_power_of_2(self.H)
        self.dh_pad = triton.next_power_of_2(self.dh)
        default_block, default_warps, default_stages = launch_config(kind, self.h_pad, self.dh_pad)
        self.block_l = block_l or default_block
        self.num_warps = num_warps or default_warps
        stages = num_stages or default_stages
        # launch options beside num_warps; None keeps Triton's default
        self.launch = {"num_warps": self.num_warps, **({"num_stages": stages} if stages else {})}
        uniform = not self.fp_codes and codebook is None
        self.z_scale = 0.125 if uniform else 1.0  # uniform values are (u - 8) / 8
        self.qk_scale = self.z_scale * 1.4426950408889634 / math.sqrt(self.d)
        self.code_strides = (0, codes.stride(0)) if self.jagged else (codes.stride(0), codes.stride(1))

    def constexprs(self, codebook: Optional[Tensor], bias: Optional[Tensor]) -> dict:
        return dict(
            DH=self.dh, DH_PAD=self.dh_pad, H_PAD=self.h_pad, BLOCK_L=self.block_l,
            JAGGED=self.jagged, CODEBOOK=codebook is not None, FP_CODES=self.fp_codes,
            HAS_BIAS=bias is not None,
        )


def _prepare(codes: Tensor, queries: Tensor, codebook: Optional[Tensor], bias: Optional[Tensor]):
    _check_triton_inputs(codes, queries)
    codes, queries = _unit_last(codes), _unit_last(queries)
    if codebook is not None:
        codebook = codebook.to(device=queries.device, dtype=torch.float32).contiguous()
    return codes, queries, codebook, bias


def int4_attend_fwd(
    codes: Tensor,
    seq: Tensor,
    queries: Tensor,
    codebook: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    return_weights: bool = False,
    *,
    out: Optional[Tensor] = None,
    lse: Optional[Tensor] = None,
    weights: Optional[Tensor] = None,
    block_l: Optional[int] = None,
    num_warps: Optional[int] = None,
    num_stages: Optional[int] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the forward kernel: (out ``[B, H, d]``, lse ``[B, H]`` fp32, weights).

    Padded when ``codes`` is ``[B, L, d/2]`` (``seq`` = lengths ``[B]``), jagged when it is
    ``[total, d/2]`` (``seq`` = offsets ``[B+1]``); float codes ``[.., d]`` take the same kernel
    without the unpacking. Inputs are assumed validated (``kernels.ops``). ``out``/``lse``/``weights``
    may be preallocated (tests poison them with NaN to prove every element is written); padded
    weights are fully written by the kernel, jagged ones are zero-filled first because rows outside
    every segment belong to no program.
    """
    codes, queries, codebook, bias = _prepare(codes, queries, codebook, bias)
    meta = _Meta("fwd", codes, queries, codebook, block_l, num_warps, num_stages)
    B, H, d = meta.B, meta.H, meta.d
    if out is None:
        out = torch.empty((B, H, d), device=queries.device, dtype=queries.dtype)
    if lse is None:
        lse = torch.empty((B, H), device=queries.device, dtype=torch.float32)
    if weights is None:
        weights = _new_weights(codes, queries, meta, return_weights)
    _check_out(out, (B, H, d), "out")
    _check_out(lse, (B, H), "lse")
    if B == 0:
        return out, lse, weights
    bias_heads = bias is not None and bias.dim() == (2 if meta.jagged else 3)
    _fwd_kernel[(B,)](
        codes, seq, queries, codebook if codebook is not None else queries,
        bias if bias is not None else queries, out, lse, weights,
        H, meta.L_pad, meta.qk_scale, meta.z_scale,
        *meta.code_strides, queries.stride(0), queries.stride(1),
        *_seq_strides(bias, meta.jagged, bias_heads), out.stride(0), out.stride(1), lse.stride(0),
        *(_seq_strides(weights, meta.jagged, True) if return_weights else (0, 0, 0)),
        RETURN_WEIGHTS=return_weights, **meta.launch, **meta.constexprs(codebook, bias),
    )
    return out, lse, weights


def _new_weights(codes: Tensor, queries: Tensor, meta: _Meta, return_weights: bool) -> Tensor:
    kw = dict(device=queries.device, dtype=torch.float32)
    if not return_weights:
        return torch.empty((0,), **kw)
    if meta.jagged:
        return torch.zeros((codes.shape[0], meta.H), **kw)
    return torch.empty((meta.B, meta.H, meta.L_pad), **kw)


def _check_out(x: Tensor, shape: tuple, name: str) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"preallocated {name} has shape {list(x.shape)}, expected {list(shape)}")
    if x.numel() and x.stride(-1) != 1:
        raise ValueError(f"preallocated {name} must have unit stride in its last dimension")


def int4_attend_bwd(
    grad_out: Tensor,
    codes: Tensor,
    seq: Tensor,
    queries: Tensor,
    codebook: Optional[Tensor],
    bias: Optional[Tensor],
    out: Tensor,
    lse: Tensor,
    bias_grad: bool,
    *,
    dq: Optional[Tensor] = None,
    dbias: Optional[Tensor] = None,
    block_l: Optional[int] = None,
    num_warps: Optional[int] = None,
    num_stages: Optional[int] = None,
) -> tuple[Tensor, Tensor]:
    """Launch the backward kernel: (d queries ``[B, H, d]``, d bias shaped like ``bias`` or empty).

    Recomputes the logits from the codes and the forward's lse (fp32 ``[B, H]``).
    """
    codes, queries, codebook, bias = _prepare(codes, queries, codebook, bias)
    grad_out, out = _unit_last(grad_out), _unit_last(out)
    lse = lse.to(torch.float32)
    meta = _Meta("bwd", codes, queries, codebook, block_l, num_warps, num_stages)
    bias_grad = bias_grad and bias is not None
    if dq is None:
        dq = torch.empty_like(queries, memory_format=torch.contiguous_format)
    if dbias is None:
        dbias = _new_dbias(bias, queries, meta, bias_grad)
    _check_out(dq, tuple(queries.shape), "dq")
    if bias_grad:
        _check_out(dbias, tuple(bias.shape), "dbias")
    if meta.B == 0:
        return dq, dbias
    bias_heads = bias is not None and bias.dim() == (2 if meta.jagged else 3)
    _bwd_kernel[(meta.B,)](
        codes, seq, queries, codebook if codebook is not None else queries,
        bias if bias is not None else queries, out, grad_out, lse, dq,
        dbias if bias_grad else queries,
        meta.H, meta.L_pad, meta.qk_scale, meta.z_scale, meta.z_scale / math.sqrt(meta.d),
        *meta.code_strides, queries.stride(0), queries.stride(1),
        *_seq_strides(bias, meta.jagged, bias_heads), out.stride(0), out.stride(1),
        grad_out.stride(0), grad_out.stride(1), lse.stride(0), dq.stride(0), dq.stride(1),
        *(_seq_strides(dbias, meta.jagged, bias_heads) if bias_grad else (0, 0, 0)),
        BIAS_GRAD=bias_grad, BIAS_SHARED=not bias_heads, **meta.launch,
        **meta.constexprs(codebook, bias),
    )
    return dq, dbias


def _new_dbias(bias: Optional[Tensor], queries: Tensor, meta: _Meta, bias_grad: bool) -> Tensor:
    if not bias_grad or bias is None:
        return torch.empty((0,), device=queries.device, dtype=queries.dtype)
    if meta.jagged:  # rows outside every segment belong to no program
        return torch.zeros(bias.shape, device=bias.device, dtype=bias.dtype)
    return torch.empty(bias.shape, device=bias.device, dtype=bias.dtype)
