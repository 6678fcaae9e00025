"""The fast PyTorch backend ("torch", the CPU path) against the reference: values, weights, lse and
gradients on guarded inputs (NaN / 0xFF past every length), through the op and its backward."""
from __future__ import annotations

import pytest
import torch

import kernels
from kernels import dequantize_int4, torch_int4_attend, unpack_int4

from .cases import Case, make_inputs, reference_with_grads

CASES = [
    Case((9, 0, 1, 12), 12, 16, 3, False, False, "none"),
    Case((9, 0, 1, 12), 12, 16, 3, True, False, "shared"),
    Case((5, 7, 0, 3), 7, 32, 2, False, False, "heads"),
    Case((5, 7, 0, 3), 7, 32, 2, True, False, "heads"),
    Case((4, 0, 6, 1), 6, 8, 1, False, True, "shared"),
    Case((4, 0, 6, 1), 6, 8, 2, True, True, "heads"),
    Case((3, 2), 3, 8, 2, False, True, "none"),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference_values_and_grads(case):
    inp = make_inputs(case, torch.device("cpu"), seed=11)
    exp_out, exp_lse, exp_w, exp_dq, exp_dbias = reference_with_grads(inp, case)
    q = inp.queries.detach().clone().requires_grad_(True)
    bias = None if inp.bias is None else inp.bias.detach().clone().requires_grad_(True)
    attend = kernels.int4_attend_jagged if case.jagged else kernels.int4_attend
    out, w = attend(inp.codes, inp.seq, q, inp.codebook, bias, return_weights=True, backend="torch")
    out.backward(inp.grad_out)
    torch.testing.assert_close(out, exp_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w, exp_w, atol=1e-6, rtol=1e-5)
    assert not out.isnan().any() and not q.grad.isnan().any()
    torch.testing.assert_close(q.grad, exp_dq, atol=1e-5, rtol=1e-5)
    if bias is not None:
        grad = bias.grad
        if not case.jagged:  # padded positions: 0 from the fast path, NaN-free; compare where valid
            valid = torch.arange(case.L) < torch.tensor(case.lengths)[:, None]
            mask = valid if bias.dim() == 2 else valid[:, None, :].expand_as(bias)
            assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))
            grad, exp_dbias = grad[mask], exp_dbias[mask]
        torch.testing.assert_close(grad, exp_dbias, atol=1e-5, rtol=1e-5)
    fwd = torch_int4_attend.attend_jagged if case.jagged else torch_int4_attend.attend_padded
    _, lse, _ = fwd(inp.codes, inp.seq, inp.queries, inp.codebook, inp.bias)
    torch.testing.assert_close(lse, exp_lse, atol=1e-5, rtol=1e-5)


def test_float_codes_match_the_int4_result():
    """Float values (NaN in the padding) through the fast path equal the packed codes' result."""
    case = Case((5, 2, 0), 5, 16, 2, True, False, "shared")
    inp = make_inputs(case, torch.device("cpu"), seed=8)
    cb = inp.codebook.nan_to_num(0.0)
    values = dequantize_int4(unpack_int4(inp.codes), cb)
    values[1, 2:] = float("nan")
    q = inp.queries.detach().clone().requires_grad_(True)
    out_float = kernels.int4_attend(values, inp.seq, q, None, inp.bias, backend="torch")
    out_float.sum().backward()
    out_int4 = kernels.int4_attend(inp.codes, inp.seq, inp.queries, cb, inp.bias, backend="reference")
    torch.testing.assert_close(out_float, out_int4, atol=1e-5, rtol=1e-5)
    assert not q.grad.isnan().any()


@pytest.mark.parametrize("jagged", [False, True], ids=["padded", "jagged"])
@pytest.mark.parametrize("codebook", [False, True], ids=["uniform", "codebook"])
def test_gradcheck_float64(jagged, codebook):
    case = Case((3, 0, 5), 5, 8, 2, codebook, jagged, "heads")
    inp = make_inputs(case, torch.device("cpu"), seed=4)
    q = inp.queries.detach().double().requires_grad_(True)
    bias = inp.bias.detach().double().nan_to_num(0.0).requires_grad_(True)
    cb = None if inp.codebook is None else inp.codebook.nan_to_num(0.0)
    attend = kernels.int4_attend_jagged if jagged else kernels.int4_attend
    fn = lambda q, b: attend(inp.codes, inp.seq, q, cb, b, backend="torch")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, bias), eps=1e-6, atol=1e-7, fast_mode=True)


def test_auto_is_the_fast_path_on_cpu():
    assert kernels.resolve_backend("auto", torch.device("cpu")) == "torch"
    assert kernels.resolve_backend("torch", torch.device("cpu")) == "torch"


def test_opcheck():
    inp = make_inputs(Case((4, 0, 6), 6, 8, 2, True, False, "heads"), torch.device("cpu"), seed=21)
    q = inp.queries.detach().requires_grad_(True)
    bias = inp.bias.detach().nan_to_num(0.0).requires_grad_(True)
    args = (inp.codes, inp.seq, q, inp.codebook.nan_to_num(0.0), bias, True, "torch")
    torch.library.opcheck(torch.ops.loopfm.int4_attend.default, args)
