"""The PyTorch reference: against a per-example loop, padded vs jagged, gradients, empty sequences."""
from __future__ import annotations

import math

import pytest
import torch

import kernels
from kernels import dequantize_int4, pack_int4, reference, unpack_int4

from .cases import Case, make_inputs


def _loop_attend(codes, lengths, q, codebook, bias):
    """Independent oracle: one example at a time, plain softmax over the valid slice."""
    B, H, d = q.shape
    out = torch.zeros(B, H, d, dtype=torch.float64)
    for b in range(B):
        n = int(lengths[b])
        if n == 0:
            continue
        z = dequantize_int4(unpack_int4(codes[b, :n]), codebook).double()
        s = q[b].double() @ z.T / math.sqrt(d)
        if bias is not None:
            s = s + (bias[b, :n] if bias.dim() == 2 else bias[b, :, :n]).double()
        out[b] = torch.softmax(s, dim=-1) @ z
    return out


@pytest.mark.parametrize("bias", ["none", "shared", "heads"])
@pytest.mark.parametrize("codebook", [False, True], ids=["uniform", "codebook"])
def test_padded_matches_loop(bias, codebook):
    case = Case((9, 0, 1, 12), 12, 16, 3, codebook, False, bias)
    inp = make_inputs(case, torch.device("cpu"), seed=1)
    out, lse, w = reference.attend_padded(inp.codes, inp.seq, inp.queries, inp.codebook, inp.bias)
    expected = _loop_attend(inp.codes, inp.seq, inp.queries, inp.codebook, inp.bias)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.sum(-1)[[0, 2, 3]], torch.ones(3, 3))
    assert torch.equal(w[1], torch.zeros_like(w[1])) and torch.isneginf(lse[1]).all()


@pytest.mark.parametrize("bias", ["none", "shared", "heads"])
def test_jagged_matches_padded(bias):
    pad_case = Case((4, 0, 7), 7, 8, 2, True, False, bias)
    inp = make_inputs(pad_case, torch.device("cpu"), seed=2)
    lengths = inp.seq.long()
    valid = torch.arange(7) < lengths[:, None]
    values = inp.codes[valid]  # [total, d/2], row-aligned with the jagged bias
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    jag_bias = None
    if inp.bias is not None:
        jag_bias = inp.bias[valid] if inp.bias.dim() == 2 else inp.bias.permute(0, 2, 1)[valid]
    out_p, lse_p, w_p = reference.attend_padded(inp.codes, inp.seq, inp.queries, inp.codebook, inp.bias)
    out_j, lse_j, w_j = reference.attend_jagged(values, offsets, inp.queries, inp.codebook, jag_bias)
    torch.testing.assert_close(out_j, out_p)
    torch.testing.assert_close(lse_j, lse_p)
    torch.testing.assert_close(w_j, w_p.permute(0, 2, 1)[valid])


def _gradcheck_inputs(jagged: bool, bias_kind: str, codebook: bool):
    case = Case((3, 0, 5), 5, 8, 2, codebook, jagged, bias_kind)
    inp = make_inputs(case, torch.device("cpu"), seed=4)
    q = inp.queries.detach().double().requires_grad_(True)
    bias = None if inp.bias is None else inp.bias.detach().double().nan_to_num(0.0).requires_grad_(True)
    codebook_t = None if inp.codebook is None else inp.codebook.nan_to_num(0.0)
    return inp, q, bias, codebook_t


@pytest.mark.parametrize("jagged", [False, True], ids=["padded", "jagged"])
@pytest.mark.parametrize("bias_kind", ["none", "shared", "heads"])
def test_gradcheck_float64_through_op(jagged, bias_kind):
    """gradcheck of the public function: the op's registered (explicit, lse-based) backward."""
    inp, q, bias, codebook = _gradcheck_inputs(jagged, bias_kind, codebook=jagged)
    attend = kernels.int4_attend_jagged if jagged else kernels.int4_attend
    inputs = (q,) if bias is None else (q, bias)

    def fn(*args):
        return attend(inp.codes, inp.seq, args[0], codebook, args[1] if len(args) > 1 else None,
                      backend="reference")

    # fast_mode checks a random projection of the Jacobian: the same failures, a fraction of the time.
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, fast_mode=True)


def test_gradcheck_float64_reference_autograd():
    inp, q, bias, codebook = _gradcheck_inputs(False, "heads", codebook=True)
    fn = lambda q, b: reference.attend_padded(inp.codes, inp.seq, q, codebook, b)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, bias), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("jagged", [False, True], ids=["padded", "jagged"])
def test_explicit_backward_matches_autograd(jagged):
    case = Case((6, 0, 9, 2), 9, 16, 4, True, jagged, "heads")
    inp = make_inputs(case, torch.device("cpu"), seed=6)
    q = inp.queries.detach().clone().requires_grad_(True)
    bias = inp.bias.detach().clone().requires_grad_(True)
    fwd = reference.attend_jagged if jagged else reference.attend_padded
    bwd = reference.attend_jagged_backward if jagged else reference.attend_padded_backward
    out, lse, _ = fwd(inp.codes, inp.seq, q, inp.codebook, bias)
    out.backward(inp.grad_out)
    dq, dbias = bwd(inp.grad_out, inp.codes, inp.seq, q.detach(), inp.codebook, bias.detach(), out.detach(),
                    lse, True)
    torch.testing.assert_close(dq, q.grad)
    torch.testing.assert_close(dbias, bias.grad.nan_to_num(0.0))


@pytest.mark.parametrize("jagged", [False, True], ids=["padded", "jagged"])
def test_empty_sequences_exact_zeros_and_zero_grads(jagged):
    case = Case((0, 0, 4), 6, 8, 2, False, jagged, "heads")
    inp = make_inputs(case, torch.device("cpu"))
    q = inp.queries.detach().clone().requires_grad_(True)
    bias = inp.bias.detach().clone().nan_to_num(0.0).requires_grad_(True)
    attend = kernels.int4_attend_jagged if jagged else kernels.int4_attend
    out, w = attend(inp.codes, inp.seq, q, bias=bias, return_weights=True, backend="reference")
    assert torch.equal(out[:2], torch.zeros_like(out[:2]))
    assert not w.isnan().any()
    out.sum().backward()
    assert torch.equal(q.grad[:2], torch.zeros_like(q.grad[:2]))
    assert q.grad[2].abs().sum() > 0
    if not jagged:
        assert torch.equal(bias.grad[:2], torch.zeros_like(bias.grad[:2]))


def test_all_empty_batch():
    values = torch.zeros(0, 4, dtype=torch.uint8)
    offsets = torch.zeros(4, dtype=torch.int64)
    q = torch.randn(3, 1, 8, requires_grad=True)
    out = kernels.int4_attend_jagged(values, offsets, q)
    assert torch.equal(out, torch.zeros(3, 1, 8))
    out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q))


def test_float_codes_give_the_int4_result():
    case = Case((5, 2), 5, 16, 2, True, False, "shared")
    inp = make_inputs(case, torch.device("cpu"), seed=8)
    cb = inp.codebook.nan_to_num(0.0)
    values = dequantize_int4(unpack_int4(inp.codes), cb)
    out_int4 = kernels.int4_attend(inp.codes, inp.seq, inp.queries, cb, inp.bias)
    out_float = kernels.int4_attend(values, inp.seq, inp.queries, None, inp.bias)
    torch.testing.assert_close(out_float, out_int4)


def _valid_padded_args():
    codes = pack_int4(torch.randint(0, 16, (2, 3, 8)))
    return dict(packed=codes, lengths=torch.tensor([3, 1], dtype=torch.int32), queries=torch.randn(2, 4, 8))


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(packed=torch.zeros(2, 3, 4, dtype=torch.int32)), "packed uint8"),
        (dict(packed=torch.zeros(2, 12, dtype=torch.uint8)), r"\[B, L, d/2\]"),
        (dict(queries=torch.randn(2, 4, 6)), "d=6"),
        (dict(queries=torch.randn(3, 4, 8)), "batch 3"),
        (dict(queries=torch.randn(2, 0, 8)), "at least one head"),
        (dict(lengths=torch.tensor([3, 1, 2])), r"lengths must have shape \[2\]"),
        (dict(lengths=torch.tensor([3.0, 1.0])), "int32 or int64"),
        (dict(codebook=torch.zeros(8)), "16 entries"),
        (dict(bias=torch.zeros(2, 4)), r"\[B, L\] or \[B, H, L\]"),
        (dict(bias=torch.zeros(2, 2, 3)), r"\[B, L\] or \[B, H, L\]"),
        (dict(backend="cuda"), "backend must be one of"),
    ],
)
def test_padded_argument_errors(change, match):
    with pytest.raises(ValueError, match=match):
        kernels.int4_attend(**{**_valid_padded_args(), **change})


def test_jagged_argument_errors():
    values = torch.zeros(5, 4, dtype=torch.uint8)
    q = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match=r"offsets must have shape \[3\]"):
        kernels.int4_attend_jagged(values, torch.tensor([0, 5]), q)
    with pytest.raises(ValueError, match=r"\[total\] or \[total, H\]"):
        kernels.int4_attend_jagged(values, torch.tensor([0, 2, 5]), q, bias=torch.zeros(4, 5))
    with pytest.raises(ValueError, match="codebook only applies"):
        kernels.int4_attend_jagged(torch.zeros(5, 8), torch.tensor([0, 2, 5]), q, codebook=torch.zeros(16))
