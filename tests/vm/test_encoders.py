"""LoopFM sequence encoders: the INT4 kernel path equals the float path on the dequantized codes,
pooling formulas, scalar (soft-label) sequences."""
from __future__ import annotations

import pytest
import torch

import kernels
from loopfm.vm.encoders import SequenceEncoder, dequantize
from tests.vm.util import make_batch


@pytest.mark.parametrize("seq", ["int4", "int4km"])
@pytest.mark.parametrize("kind", ["mean", "sum", "din", "dmin"])
def test_int4_path_equals_float_path(kind, seq):
    torch.manual_seed(0)
    enc = SequenceEncoder(kind, 8, query_dim=4, heads=3, backend="reference")
    if kind == "dmin":
        with torch.no_grad():
            enc.recency.copy_(torch.tensor([-0.5, 0.0, 0.3]))
    packed = make_batch(seq=seq, lengths=[0, 1, 2, 3, 4, 5])
    dense = packed.with_sequence(values=dequantize(packed), lengths=packed.seq_lengths, deltas=packed.seq_deltas)
    q = torch.randn(6, 4, requires_grad=True)
    a = enc(packed, q)
    b = enc(dense, q)
    assert a.shape == (6, enc.out_dim) == b.shape
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    if kind in ("din", "dmin"):
        ga, = torch.autograd.grad(a.sum(), q)
        gb, = torch.autograd.grad(b.sum(), q)
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-5)


def test_pooling_formulas():
    enc_mean = SequenceEncoder("mean", 8, 4, backend="reference")
    enc_sum = SequenceEncoder("sum", 8, 4, backend="reference")
    for seq in ("int4", "fp16"):
        b = make_batch(seq=seq, lengths=[0, 1, 2, 3, 4, 5])
        z = dequantize(b)
        q = torch.zeros(6, 4)
        for i, n in enumerate(b.seq_lengths.tolist()):
            expected = z[i, :n].sum(0)
            torch.testing.assert_close(enc_sum(b, q)[i], expected, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(enc_mean(b, q)[i], expected / max(n, 1), rtol=1e-4, atol=1e-5)


def test_dmin_matches_the_kernel_formula():
    torch.manual_seed(1)
    enc = SequenceEncoder("dmin", 8, 4, heads=2, backend="reference")
    with torch.no_grad():
        enc.recency.fill_(-0.7)
    b = make_batch(seq="int4", lengths=[5, 4, 3, 2, 1, 0])
    q = torch.randn(6, 4)
    queries = enc.query(q).view(6, 2, 8)
    age = torch.log1p(b.seq_deltas / 3600.0)
    expected = kernels.int4_attend(b.seq_packed, b.seq_lengths, queries, bias=-0.7 * age, backend="reference")
    torch.testing.assert_close(enc(b, q), expected.reshape(6, -1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["mean", "sum", "din", "dmin"])
def test_soft_label_scalar_sequence(kind):
    """The "soft label as a 1-d sequence" ablation: codes [B, L, 1]."""
    enc = SequenceEncoder(kind, 1, 4, heads=2)
    b = make_batch(seq="scalar", lengths=[0, 1, 2, 3, 4, 5])
    out = enc(b, torch.randn(6, 4))
    assert out.shape == (6, enc.out_dim) and torch.isfinite(out).all()
    assert (out[0] == 0).all()


def test_code_width_mismatch_is_an_error():
    enc = SequenceEncoder("mean", 16, 4)
    with pytest.raises(ValueError, match="code width"):
        enc(make_batch(seq="int4", d=8), torch.zeros(6, 4))
    with pytest.raises(ValueError):
        SequenceEncoder("max", 8, 4)
