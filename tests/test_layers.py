"""Shared layers (`loopfm.layers`) and the FM's DMIN: the restructured attention equals the plain
formulation (concatenated unit inputs, explicit masked softmax) on the same parameters, values and
gradients; padding never changes an output."""
from __future__ import annotations

import math

import pytest
import torch

from loopfm.fm.config import ModelConfig
from loopfm.fm.model import DMIN
import loopfm.layers
from loopfm.layers import (NEG, DINAttention, SelfAttention, additive_key_mask, length_buckets, length_mask,
                           shared_rows)


def _plain_self_attention(layer: SelfAttention, x, mask):
    B, L, D = x.shape
    heads = lambda t: t.reshape(B, L, layer.h, layer.hd).transpose(1, 2)  # noqa: E731
    q, k, v = heads(layer.q(x)), heads(layer.k(x)), heads(layer.v(x))
    s = (q @ k.transpose(-1, -2) / math.sqrt(layer.hd)).masked_fill(~mask[:, None, None, :], NEG)
    a = (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(B, L, D)
    return layer.norm(x + layer.out(a))


def _plain_dmin(m: DMIN, seq, lengths, target):
    steps = torch.arange(m.L)
    mask = steps[None] < lengths[:, None]
    pos = m.position((lengths[:, None] - 1 - steps[None]).clamp(min=0))
    h = _plain_self_attention(m.extractor, _plain_self_attention(m.refiner, m.inp(seq), mask), mask)
    h = h.reshape(-1, m.L, m.h, m.hd)
    q = m.target(target).reshape(-1, m.h, m.hd)
    out = []
    for i, unit in enumerate(m.units):
        hi, qi = h[:, :, i], q[:, i, None].expand_as(h[:, :, i])
        score = unit(torch.cat([hi, qi, hi * qi, hi - qi, pos], -1)).squeeze(-1)
        w = torch.softmax(score.masked_fill(~mask, NEG), 1) * mask
        out.append((w[..., None] * hi).sum(1))
    return torch.cat(out, 1)


def _grads(module, out, g):
    module.zero_grad()
    out.backward(g)
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attention_mlp", [[8, 5], [6], []])
def test_dmin_equals_the_plain_formulation(attention_mlp):
    torch.manual_seed(0)
    cfg = ModelConfig(arch="dmin", num_heads=3, head_dim=4, attention_mlp=attention_mlp, position_dim=3)
    m = DMIN(seq_dim=6, seq_len=7, cfg=cfg)
    seq, target = torch.randn(9, 7, 6), torch.randn(9, 6)
    lengths = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 7])
    fast, plain = m(seq, lengths, target), _plain_dmin(m, seq, lengths, target)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(fast)
    gf, gp = _grads(m, fast, g), _grads(m, plain, g)
    assert gf.keys() == gp.keys()
    for name in gf:
        torch.testing.assert_close(gf[name], gp[name], rtol=1e-4, atol=1e-5, msg=name)
    assert fast[0].abs().max() == 0  # an empty history is a zero interest
    # garbage in the padding changes nothing
    noisy = torch.where(length_mask(lengths, 7)[..., None], seq, torch.full_like(seq, 1e3))
    torch.testing.assert_close(m(noisy, lengths, target), fast, rtol=1e-5, atol=1e-6)


def test_dmin_encodes_a_shared_history_once_and_equals_the_plain_formulation():
    """Rows repeating a history (with their own targets) share one encoding: values and gradients,
    of the parameters and of every input row, equal the plain formulation's."""
    torch.manual_seed(3)
    cfg = ModelConfig(arch="dmin", num_heads=2, head_dim=4, attention_mlp=[6, 5], position_dim=3)
    m = DMIN(seq_dim=6, seq_len=7, cfg=cfg)
    base, base_len = torch.randn(4, 7, 6), torch.tensor([7, 3, 0, 5])
    pick = torch.tensor([0, 1, 0, 2, 3, 1, 1, 2, 0, 3, 3])  # 11 rows, 4 distinct histories
    lengths = base_len[pick]
    seq = base[pick].requires_grad_()
    target = torch.randn(11, 6, requires_grad=True)
    assert shared_rows(seq, lengths)[0].numel() == 4
    _assert_dmin_equals_plain(m, seq, lengths, target, pick)


def _assert_dmin_equals_plain(m, seq, lengths, target, pick) -> torch.Tensor:
    """DMIN's output and gradients (parameters, targets, and per distinct history ``pick == k``
    the summed input rows) equal the plain formulation's; returns the output."""
    fast = m(seq, lengths, target)
    seq_p, target_p = seq.detach().clone().requires_grad_(), target.detach().clone().requires_grad_()
    plain = _plain_dmin(m, seq_p, lengths, target_p)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(fast)
    gf, gp = _grads(m, fast, g), _grads(m, plain, g)
    assert gf.keys() == gp.keys()
    for name in gp:
        torch.testing.assert_close(gf[name], gp[name], rtol=1e-4, atol=1e-5, msg=name)
    # the input gradient of a shared history sums its rows' (it reaches the embedding tables
    # through one row instead of several): equal per distinct history
    for k in range(int(pick.max()) + 1):
        rows = pick == k
        torch.testing.assert_close(seq.grad[rows].sum(0), seq_p.grad[rows].sum(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(target.grad, target_p.grad, rtol=1e-4, atol=1e-5)
    return fast


@pytest.mark.parametrize("bucket_cost", [0, 200, 10**9])  # a bucket per length, a few, one
def test_dmin_over_length_buckets_equals_the_plain_formulation(monkeypatch, bucket_cost):
    """Many lengths (0 to L, some repeated, histories shared by several rows): values and
    gradients equal the plain formulation's however the attention is cut into buckets."""
    monkeypatch.setattr(loopfm.layers, "BUCKET_COST", bucket_cost)
    torch.manual_seed(4)
    cfg = ModelConfig(arch="dmin", num_heads=2, head_dim=4, attention_mlp=[6, 5], position_dim=3)
    m = DMIN(seq_dim=5, seq_len=12, cfg=cfg)
    base_len = torch.tensor([12, 12, 12, 11, 9, 9, 7, 4, 3, 1, 0, 12, 6, 2])
    pick = torch.cat([torch.arange(14), torch.tensor([0, 0, 4, 7, 10, 13, 13, 2])])
    lengths = base_len[pick]
    seq = torch.randn(14, 12, 5)[pick].requires_grad_()
    target = torch.randn(len(pick), 5, requires_grad=True)
    fast = _assert_dmin_equals_plain(m, seq, lengths, target, pick)
    assert fast[pick == 10].abs().max() == 0  # the empty history


def test_dmin_on_a_batch_of_empty_histories_gives_zeros_and_reaches_every_parameter():
    torch.manual_seed(6)
    m = DMIN(seq_dim=5, seq_len=6, cfg=ModelConfig(arch="dmin", num_heads=2, head_dim=4, attention_mlp=[6],
                                                    position_dim=3))
    out = m(torch.randn(4, 6, 5), torch.zeros(4, dtype=torch.int32), torch.randn(4, 5))
    assert torch.equal(out, torch.zeros(4, 8))
    out.sum().backward()  # every parameter in the graph (DDP expects a gradient for each)
    assert all(p.grad is not None for p in m.parameters())


def test_length_buckets_cover_every_real_position_once(monkeypatch):
    lengths = torch.tensor([9, 9, 9, 8, 5, 5, 2, 0, 0])
    packed = torch.arange(int(lengths.sum()))
    monkeypatch.setattr(loopfm.layers, "BUCKET_COST", 10**9)
    one = length_buckets(lengths, torch.float32)
    assert one.shapes == [(7, 9)]  # the empty rows join no bucket
    monkeypatch.setattr(loopfm.layers, "BUCKET_COST", 0)
    each = length_buckets(lengths, torch.float32)
    assert each.shapes == [(3, 9), (1, 8), (2, 5), (1, 2)] and each.key_masks == [None] * 4
    assert each.pad is None and each.real is None  # equal lengths in every bucket: nothing padded
    monkeypatch.setattr(loopfm.layers, "BUCKET_COST", 30)  # (4 x 81 + 30) + (3 x 25 + 30) is the cheapest
    two = length_buckets(lengths, torch.float32)
    assert two.shapes == [(4, 9), (3, 5)]
    for b in (one, two):
        assert torch.equal(packed.index_select(0, b.pad).index_select(0, b.real), packed)
        slots = packed.index_select(0, b.pad)
        assert slots.numel() == sum(r * n for r, n in b.shapes)
    # padding slots of a bucket are masked out of its keys
    assert (two.key_masks[0][3, 0, 0] == torch.tensor([0.0] * 8 + [NEG])).all()
    assert length_buckets(torch.zeros(3, dtype=torch.long), torch.float32).shapes == []


def test_packed_self_attention_equals_the_padded_one(monkeypatch):
    monkeypatch.setattr(loopfm.layers, "BUCKET_COST", 20)
    torch.manual_seed(5)
    layer = SelfAttention(8, 2)
    lengths = torch.tensor([6, 6, 5, 3, 3, 1, 0])
    x = torch.randn(7, 6, 8)
    real = length_mask(lengths, 6)
    buckets = length_buckets(lengths, x.dtype)
    assert len(buckets.shapes) > 1
    packed = layer.forward_packed(x[real], buckets)
    padded = _plain_self_attention(layer, x, real)[real]
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-6)


def test_shared_rows_groups_exactly_equal_rows_only():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [1.0, 2.0], [1.0, 2.0], [0.0, 0.0]])
    lengths = torch.tensor([2, 2, 2, 1, 0])  # row 3 equals row 0 but is another length
    first, inverse = shared_rows(x, lengths)
    assert first.numel() == 4
    assert torch.equal(x[first][inverse], x) and torch.equal(lengths[first][inverse], lengths)
    assert inverse[0] == inverse[2] and len({int(i) for i in inverse[[0, 1, 3, 4]]}) == 4
    assert shared_rows(torch.randn(6, 3), torch.full((6,), 3)) is None  # all distinct
    assert shared_rows(x[:1], lengths[:1]) is None
    # a -0.0 and a 0.0 weigh the same in any sum: equal fingerprints, but not equal rows
    y, ones = torch.tensor([[0.0, 1.0], [-0.0, 1.0]]), torch.ones(2, dtype=torch.long)
    got = shared_rows(y, ones)
    assert got is None or torch.equal(y[got[0]][got[1]], y)


def test_self_attention_equals_the_plain_formulation():
    torch.manual_seed(1)
    layer = SelfAttention(8, 2)
    x, lengths = torch.randn(4, 5, 8), torch.tensor([5, 3, 1, 0])
    mask = length_mask(lengths, 5)
    torch.testing.assert_close(layer(x, additive_key_mask(mask, x.dtype)), _plain_self_attention(layer, x, mask),
                               rtol=1e-5, atol=1e-6)


def test_din_attention_equals_the_concatenated_scorer():
    torch.manual_seed(2)
    att = DINAttention(query_dim=3, key_dim=4, hidden=(6, 5))
    q, keys = torch.randn(5, 3), torch.randn(5, 7, 4)
    qp = att.project(q)[:, None].expand_as(keys)
    plain = att.scorer(torch.cat([qp, keys, qp - keys, qp * keys], -1)).squeeze(-1)
    torch.testing.assert_close(att.scores(q, keys), plain, rtol=1e-5, atol=1e-6)
