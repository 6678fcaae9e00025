"""INT4 packing convention: low nibble = even dimension; uniform codes (u - 8) / 8."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import dequantize_int4, pack_int4, quantize_uniform_int4, unpack_int4


def test_golden_byte():
    packed = pack_int4(torch.tensor([1, 2]))
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [0x21]


def test_golden_row():
    codes = torch.tensor([[0, 15, 3, 4, 15, 15]], dtype=torch.uint8)
    assert pack_int4(codes).tolist() == [[0xF0, 0x43, 0xFF]]
    assert unpack_int4(torch.tensor([0xF0, 0x43, 0xFF], dtype=torch.uint8)).tolist() == [0, 15, 3, 4, 15, 15]


@settings(max_examples=50, deadline=None)
@given(
    lead=st.lists(st.integers(0, 4), min_size=0, max_size=3),
    half_d=st.integers(1, 9),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip(lead, half_d, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (*lead, 2 * half_d), generator=gen, dtype=torch.int64)
    packed = pack_int4(codes)
    assert packed.shape == (*lead, half_d) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), codes.to(torch.uint8))
    # Every byte value survives unpack -> pack.
    all_bytes = torch.arange(256, dtype=torch.uint8).reshape(2, 128)
    assert torch.equal(pack_int4(unpack_int4(all_bytes)), all_bytes)


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="d must be even"):
        pack_int4(torch.zeros(2, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="0..15"):
        pack_int4(torch.tensor([3, 16]))
    with pytest.raises(ValueError, match="0..15"):
        pack_int4(torch.tensor([-1, 2]))
    with pytest.raises(ValueError, match="integer codes"):
        pack_int4(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="uint8"):
        unpack_int4(torch.tensor([1, 2], dtype=torch.int32))


def test_quantize_uniform():
    z = torch.tensor([-1.0, -0.5, 0.0, 0.0625, 0.1875, 0.875, 1.0, 3.0, -3.0])
    # round-half-even: 0.5 -> 0, 1.5 -> 2; values above 7/8 saturate at code 15.
    assert quantize_uniform_int4(z).tolist() == [0, 4, 8, 8, 10, 15, 15, 15, 0]
    assert quantize_uniform_int4(z).dtype == torch.uint8


def test_dequantize_uniform_and_codebook():
    codes = torch.arange(16, dtype=torch.uint8)
    assert torch.equal(dequantize_int4(codes), (torch.arange(16.0) - 8) / 8)
    codebook = torch.linspace(-2, 2, 16, dtype=torch.float64)
    values = dequantize_int4(codes.reshape(2, 8), codebook)
    assert values.dtype == torch.float32 and values.shape == (2, 8)
    assert torch.equal(values.flatten(), codebook.float())
    with pytest.raises(ValueError, match="16 entries"):
        dequantize_int4(codes, torch.zeros(8))


def test_quantize_dequantize_error_bound():
    z = torch.rand(1000) * 1.875 - 1.0  # [-1, 7/8]: the representable range
    err = (dequantize_int4(quantize_uniform_int4(z)) - z).abs().max()
    assert err <= 1 / 16 + 1e-7
