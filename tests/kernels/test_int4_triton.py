"""Triton kernels (forward and backward) against the PyTorch reference, under TRITON_INTERPRET=1 on CPU.

Every launch writes into NaN-poisoned outputs inside NaN guard buffers (so each element must be
written, and nothing outside), and reads inputs inside NaN/0xFF guard buffers (see cases.py).
Each case keeps to a few programs: the interpreter costs milliseconds per program and loop step.
"""
from __future__ import annotations

import zlib

import pytest
import torch

import kernels
from kernels import pack_int4, unpack_int4, dequantize_int4

from .cases import Case, guard_intact, make_inputs, poisoned, reference_with_grads

D_VALUES = (8, 16, 32, 64, 128)
BIAS_KINDS = ("none", "shared", "heads")


def _cases() -> list[Case]:
    """d x layout x bias, with H and codebook/uniform alternating so every pair of them is met."""
    cases = []
    for i, (d, jagged, bias) in enumerate((d, j, b) for d in D_VALUES for j in (False, True) for b in BIAS_KINDS):
        H = (1, 4)[i % 2]
        codebook = bool((i // 2) % 2)
        if jagged:
            lengths = (0, 19, 1, 37)[: 3 if d >= 64 else 4]
            cases.append(Case(lengths, 0, d, H, codebook, True, bias))
        else:
            L = 37 if d <= 32 else 21  # not powers of two; shorter when rows are wide
            cases.append(Case((L, 0, 5, L - 3)[: 3 if d >= 64 else 4], L, d, H, codebook, False, bias))
    # Non-power-of-two heads and code width (padded tiles in both directions).
    cases.append(Case((7, 0, 11), 11, 24, 3, True, False, "heads"))
    cases.append(Case((0, 9, 4), 0, 24, 3, False, True, "shared"))
    return cases


CASES = _cases()
BLOCK_L = 16  # several loop steps per sequence: exercises the online softmax rescaling


def _seq_shape(case: Case, n_codes_rows: int) -> tuple[int, ...]:
    return (n_codes_rows, case.H) if case.jagged else (case.B, case.H, case.L)


def _assert_close(actual, expected, atol=2e-5, rtol=2e-4):
    torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), atol=atol, rtol=rtol, equal_nan=False)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_and_backward_match_reference(tk, case: Case):
    inp = make_inputs(case, tk.device, seed=zlib.crc32(str(case).encode()) % 1000)
    ref_out, ref_lse, ref_w, ref_dq, ref_dbias = reference_with_grads(inp, case)
    B, H, d = case.B, case.H, case.d

    out, out_buf = poisoned((B, H, d), torch.float32, tk.device)
    lse, lse_buf = poisoned((B, H), torch.float32, tk.device)
    w, w_buf = poisoned(_seq_shape(case, inp.codes.shape[0]), torch.float32, tk.device)
    tk.mod.int4_attend_fwd(inp.codes, inp.seq, inp.queries, inp.codebook, inp.bias, True,
                           out=out, lse=lse, weights=w, block_l=BLOCK_L)
    _assert_close(out, ref_out)
    _assert_close(lse, ref_lse)  # -inf on both sides for empty sequences
    _assert_close(w, ref_w)
    assert all(guard_intact(buf) for buf in (out_buf, lse_buf, w_buf)), "kernel wrote outside its outputs"

    dq, dq_buf = poisoned((B, H, d), torch.float32, tk.device)
    dbias, dbias_buf = (None, None) if inp.bias is None else poisoned(tuple(inp.bias.shape), torch.float32, tk.device)
    tk.mod.int4_attend_bwd(inp.grad_out, inp.codes, inp.seq, inp.queries, inp.codebook, inp.bias, out, lse,
                           inp.bias is not None, dq=dq, dbias=dbias, block_l=BLOCK_L)
    _assert_close(dq, ref_dq, atol=5e-5)
    assert guard_intact(dq_buf)
    if dbias is not None:
        _assert_close(dbias, ref_dbias, atol=5e-5)
        assert guard_intact(dbias_buf)


def test_empty_sequences_give_exact_zeros(tk):
    case = Case((0, 0, 6), 8, 16, 4, False, False, "heads")
    inp = make_inputs(case, tk.device)
    out, lse, w = tk.mod.int4_attend_fwd(inp.codes, inp.seq, inp.queries, None, inp.bias, True)
    assert torch.equal(out[:2], torch.zeros_like(out[:2]))
    assert torch.equal(w[:2], torch.zeros_like(w[:2]))
    assert torch.isneginf(lse[:2]).all() and torch.isfinite(lse[2]).all()
    dq, dbias = tk.mod.int4_attend_bwd(inp.grad_out, inp.codes, inp.seq, inp.queries, None, inp.bias,
                                       out, lse, True)
    assert torch.equal(dq[:2], torch.zeros_like(dq[:2]))
    assert torch.equal(dbias[:2], torch.zeros_like(dbias[:2]))
    assert torch.equal(dbias[2, :, 6:], torch.zeros_like(dbias[2, :, 6:]))  # padding gets zero grads


def test_default_block_size_and_long_sequence(tk):
    """The launcher's own block size (one program, several steps at the default tile)."""
    case = Case((300, 0), 300, 32, 4, True, False, "shared")
    inp = make_inputs(case, tk.device, seed=3)
    ref_out, ref_lse, _, ref_dq, ref_dbias = reference_with_grads(inp, case)
    out, lse, _ = tk.mod.int4_attend_fwd(inp.codes, inp.seq, inp.queries, inp.codebook, inp.bias)
    _assert_close(out, ref_out)
    dq, dbias = tk.mod.int4_attend_bwd(inp.grad_out, inp.codes, inp.seq, inp.queries, inp.codebook,
                                       inp.bias, out, lse, True)
    _assert_close(dq, ref_dq, atol=5e-5)
    _assert_close(dbias, ref_dbias, atol=5e-5)


def test_lengths_beyond_padded_width_are_clamped(tk):
    codes = pack_int4(torch.randint(0, 16, (2, 5, 16))).to(tk.device)
    lengths = torch.tensor([9, -3], dtype=torch.int32, device=tk.device)
    q = torch.randn(2, 1, 16, device=tk.device)
    out, _, _ = tk.mod.int4_attend_fwd(codes, lengths, q)
    expected = kernels.int4_attend(codes.cpu(), torch.tensor([5, 0], dtype=torch.int32), q.cpu(),
                                   backend="reference")
    _assert_close(out, expected)


@pytest.mark.parametrize("jagged", [False, True], ids=["padded", "jagged"])
def test_fp16_codes_match_int4_codes(tk, jagged):
    """The same fused kernel on unpacked fp16 values gives the INT4 kernel's result."""
    case = Case((13, 0, 20), 20, 32, 4, False, jagged, "heads")
    inp = make_inputs(case, tk.device, seed=5)
    values = dequantize_int4(unpack_int4(inp.codes)).to(torch.float16)  # exact: multiples of 1/8
    if not jagged:
        values[torch.arange(case.L, device=tk.device) >= inp.seq[:, None].long()] = float("nan")
    out_int4, lse_int4, w_int4 = tk.mod.int4_attend_fwd(inp.codes, inp.seq, inp.queries, None, inp.bias, True)
    out_fp16, lse_fp16, w_fp16 = tk.mod.int4_attend_fwd(values, inp.seq, inp.queries, None, inp.bias, True,
                                                        block_l=BLOCK_L)
    _assert_close(out_fp16, out_int4)
    _assert_close(w_fp16, w_int4)
    dq_int4, db_int4 = tk.mod.int4_attend_bwd(inp.grad_out, inp.codes, inp.seq, inp.queries, None, inp.bias,
                                              out_int4, lse_int4, True)
    dq_fp16, db_fp16 = tk.mod.int4_attend_bwd(inp.grad_out, values, inp.seq, inp.queries, None, inp.bias,
                                              out_fp16, lse_fp16, True)
    _assert_close(dq_fp16, dq_int4, atol=5e-5)
    _assert_close(db_fp16, db_int4, atol=5e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_queries(tk, dtype):
    """Half queries are loaded and cast to fp32 at once; the output comes back in their dtype."""
    case = Case((10, 3), 12, 32, 4, True, False, "shared")
    inp = make_inputs(case, tk.device, seed=7, queries_dtype=dtype)
    ref_out, *_ = reference_with_grads(inp, case)
    out, _, _ = tk.mod.int4_attend_fwd(inp.codes, inp.seq, inp.queries, inp.codebook, inp.bias)
    assert out.dtype == dtype
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    _assert_close(out, ref_out, atol=tol, rtol=tol)


@pytest.mark.parametrize("jagged", [False, True], ids=["padded", "jagged"])
def test_op_with_triton_backend_and_autograd(tk, jagged):
    """The public function with backend="triton": custom op -> kernel, autograd -> backward kernel."""
    case = Case((6, 0, 17), 17, 16, 4, False, jagged, "heads")
    inp = make_inputs(case, tk.device, seed=11)
    attend = kernels.int4_attend_jagged if jagged else kernels.int4_attend
    grads = {}
    for backend in ("reference", "triton"):
        q = inp.queries.detach().clone().requires_grad_(True)
        bias = inp.bias.detach().clone().nan_to_num(0.0).requires_grad_(True)
        out, w = attend(inp.codes, inp.seq, q, bias=bias, return_weights=True, backend=backend)
        (out * inp.grad_out).sum().backward()
        grads[backend] = (out.detach(), w, q.grad, bias.grad)
    for actual, expected in zip(grads["triton"], grads["reference"]):
        _assert_close(actual, expected, atol=5e-5)


def test_opcheck_triton_backend(tk):
    case = Case((5, 0, 9), 9, 16, 4, True, False, "shared")
    inp = make_inputs(case, tk.device, seed=13)
    q = inp.queries.detach().clone().requires_grad_(True)
    bias = inp.bias.detach().clone().nan_to_num(0.0).requires_grad_(True)
    args = (inp.codes, inp.seq, q, inp.codebook.nan_to_num(0.0), bias, False, "triton")
    torch.library.opcheck(torch.ops.loopfm.int4_attend.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
