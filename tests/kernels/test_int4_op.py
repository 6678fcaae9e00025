"""The loopfm::int4_attend custom op: opcheck, torch.compile, torch.fx, autograd plumbing, dispatch."""
from __future__ import annotations

import pytest
import torch

import kernels
from kernels import pack_int4

from .cases import Case, make_inputs


def _op_args(case: Case, return_weights: bool, dtype=torch.float32):
    inp = make_inputs(case, torch.device("cpu"), seed=21)
    q = inp.queries.detach().to(dtype).requires_grad_(True)
    bias = None if inp.bias is None else inp.bias.detach().to(dtype).nan_to_num(0.0).requires_grad_(True)
    codebook = None if inp.codebook is None else inp.codebook.nan_to_num(0.0)
    return (inp.codes, inp.seq, q, codebook, bias, return_weights, "reference")


@pytest.mark.parametrize(
    "case, return_weights",
    [
        (Case((4, 0, 6), 6, 8, 2, False, False, "heads"), True),
        (Case((4, 0, 6), 6, 8, 1, True, False, "shared"), False),
        (Case((3, 0, 5), 0, 8, 2, True, True, "heads"), True),
        (Case((3, 0, 5), 0, 8, 2, False, True, "none"), False),
    ],
    ids=str,
)
def test_opcheck(case, return_weights):
    torch.library.opcheck(torch.ops.loopfm.int4_attend.default, _op_args(case, return_weights))


def test_opcheck_backward_op():
    codes, seq, q, codebook, bias, _, backend = _op_args(Case((4, 0, 6), 6, 8, 2, True, False, "heads"), False)
    out, lse, _ = torch.ops.loopfm.int4_attend(codes, seq, q.detach(), codebook, bias.detach(), False, backend)
    args = (torch.randn_like(out), codes, seq, q.detach(), codebook, bias.detach(), out, lse, True, backend)
    torch.library.opcheck(torch.ops.loopfm.int4_attend_backward.default, args)


def test_weights_and_lse_are_not_differentiable():
    codes, seq, q, codebook, bias, _, backend = _op_args(Case((4, 2), 4, 8, 2, False, False, "heads"), True)
    out, lse, weights = torch.ops.loopfm.int4_attend(codes, seq, q, codebook, bias, True, backend)
    assert out.requires_grad and not lse.requires_grad and not weights.requires_grad


def test_codebook_gets_no_gradient():
    codes, seq, q, _, bias, _, _ = _op_args(Case((4, 2), 4, 8, 2, False, False, "heads"), False)
    codebook = torch.linspace(-1, 1, 16, requires_grad=True)
    kernels.int4_attend(codes, seq, q, codebook, bias).sum().backward()
    assert codebook.grad is None and q.grad is not None and bias.grad is not None


@pytest.mark.parametrize("jagged", [False, True], ids=["padded", "jagged"])
def test_torch_compile_forward_and_backward(jagged):
    case = Case((5, 0, 7), 7, 16, 4, True, jagged, "heads")
    codes, seq, q, codebook, bias, _, _ = _op_args(case, False)
    attend = kernels.int4_attend_jagged if jagged else kernels.int4_attend

    def loss(q, bias):
        out, w = attend(codes, seq, q, codebook, bias, return_weights=True)
        return (out * out).sum() + 0.0 * w.sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    eager_loss = loss(q, bias)
    eager_grads = torch.autograd.grad(eager_loss, (q, bias))
    compiled_loss = compiled(q, bias)
    compiled_grads = torch.autograd.grad(compiled_loss, (q, bias))
    torch.testing.assert_close(compiled_loss, eager_loss)
    for c, e in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(c, e)


class _Pool(torch.nn.Module):
    """A small model calling the public function, as a VM's sequence encoder would."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.query = torch.nn.Linear(d, heads * d)
        self.heads = heads

    def forward(self, target, codes, lengths, bias):
        q = self.query(target).view(target.shape[0], self.heads, -1)
        out = kernels.int4_attend(codes, lengths, q, bias=bias)
        return out.flatten(1)


class _PoolDirectImport(_Pool):
    def forward(self, target, values, offsets):
        from kernels import int4_attend_jagged  # a bare name: not patched by torch.fx.wrap either way

        q = self.query(target).view(target.shape[0], self.heads, -1)
        out, w = int4_attend_jagged(values, offsets, q, return_weights=True)
        return out.sum(1), w


def test_fx_symbolic_trace_keeps_the_call_as_a_leaf():
    torch.manual_seed(0)
    model = _Pool(8, 2)
    gm = torch.fx.symbolic_trace(model)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert kernels.int4_attend in targets
    codes = pack_int4(torch.randint(0, 16, (3, 5, 8)))
    lengths = torch.tensor([5, 0, 2], dtype=torch.int32)
    args = (torch.randn(3, 8), codes, lengths, torch.randn(3, 5))
    torch.testing.assert_close(gm(*args), model(*args))


def test_fx_symbolic_trace_jagged_with_weights():
    torch.manual_seed(0)
    model = _PoolDirectImport(8, 2)
    gm = torch.fx.symbolic_trace(model)
    assert kernels.int4_attend_jagged in [n.target for n in gm.graph.nodes if n.op == "call_function"]
    values = pack_int4(torch.randint(0, 16, (6, 8)))
    offsets = torch.tensor([0, 4, 4, 6])
    args = (torch.randn(3, 8), values, offsets)
    for actual, expected in zip(gm(*args), model(*args)):
        torch.testing.assert_close(actual, expected)


def test_backend_resolution():
    cpu = torch.device("cpu")
    assert kernels.resolve_backend("auto", cpu) == "torch"
    assert kernels.resolve_backend("reference", torch.device("cuda")) == "reference"
    if kernels.triton_available():
        assert kernels.resolve_backend("auto", torch.device("cuda")) == "triton"
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.resolve_backend("fast", cpu)


def test_reference_backend_works_without_triton(monkeypatch):
    """CPU machines without triton: auto and reference work, triton is refused clearly."""
    from kernels import ops

    monkeypatch.setattr(ops, "triton_available", lambda: False)
    codes = pack_int4(torch.randint(0, 16, (2, 3, 8)))
    lengths = torch.tensor([3, 1], dtype=torch.int32)
    q = torch.randn(2, 1, 8)
    assert kernels.int4_attend(codes, lengths, q).shape == (2, 1, 8)
    assert ops.resolve_backend("auto", torch.device("cuda")) == "torch"
    with pytest.raises(ValueError, match="triton is not installed"):
        kernels.int4_attend(codes, lengths, q, backend="triton")
