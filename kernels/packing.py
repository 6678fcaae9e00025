"""INT4 codes: packing, unpacking, uniform quantization and dequantization.

The one convention used everywhere in LoopFM: a row of d 4-bit codes is stored as d/2 bytes,
uint8 ``[..., d/2]``, and byte j holds dimension 2j in its low nibble and dimension 2j+1 in its
high nibble (FBGEMM's INT4 row layout without the per-row scale/bias). Codes (1, 2) pack to 0x21.

Two code books share that layout:

* uniform INT4: code u in 0..15 stands for (u - 8) / 8, so values lie in [-1, 7/8] in steps of 1/8
  and need no per-row scale;
* k-means INT4: code u stands for ``codebook[u]`` of one shared 16-entry float32 table.

All functions work on any leading shape ``[..., d]`` so the compress stage can reuse them on
embedding tables as well as on sequences.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = [
    "UNIFORM_OFFSET",
    "UNIFORM_SCALE",
    "pack_int4",
    "unpack_int4",
    "quantize_uniform_int4",
    "dequantize_int4",
    "check_codebook",
]

UNIFORM_OFFSET = 8
"""Uniform INT4: value = (u - UNIFORM_OFFSET) * UNIFORM_SCALE."""
UNIFORM_SCALE = 0.125


def _check_even_last_dim(x: torch.Tensor, what: str) -> None:
    if x.dim() == 0:
        raise ValueError(f"{what} must have at least one dimension (the code dimension d), got a scalar")
    if x.shape[-1] % 2 != 0:
        raise ValueError(
            f"{what} has an odd last dimension d={x.shape[-1]}; INT4 packing stores two codes per byte, "
            "so d must be even"
        )


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes ``[..., d]`` (any integer dtype, values 0..15) into uint8 ``[..., d/2]``.

    Even dimensions go to the low nibble, odd dimensions to the high nibble.
    Raises ValueError for a float dtype, an odd d, or a code outside 0..15.
    """
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"pack_int4 expects integer codes 0..15, got dtype {codes.dtype}")
    _check_even_last_dim(codes, "codes")
    # The range check costs a device sync; a silent wrap-around would corrupt every stored row.
    if codes.numel() > 0 and (int(codes.min()) < 0 or int(codes.max()) > 15):
        raise ValueError(
            f"INT4 codes must lie in 0..15, got values in [{int(codes.min())}, {int(codes.max())}]"
        )
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Unpack uint8 ``[..., d/2]`` into uint8 codes ``[..., d]`` (values 0..15)."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_int4 expects uint8 packed codes, got dtype {packed.dtype}")
    if packed.dim() == 0:
        raise ValueError("packed codes must have at least one dimension, got a scalar")
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def quantize_uniform_int4(z: torch.Tensor) -> torch.Tensor:
    """Uniform INT4 codes of values in [-1, 1]: u = clamp(round(8 z), -8, 7) + 8, as uint8.

    The inverse is ``dequantize_int4(u) = (u - 8) / 8``; values above 7/8 saturate to 7/8.
    Rounding is round-half-to-even (``torch.round``).
    """
    if not z.dtype.is_floating_point:
        raise ValueError(f"quantize_uniform_int4 expects a float tensor, got dtype {z.dtype}")
    u = torch.round(z.float() / UNIFORM_SCALE).clamp(-UNIFORM_OFFSET, 15 - UNIFORM_OFFSET)
    return (u + UNIFORM_OFFSET).to(torch.uint8)


def check_codebook(codebook: torch.Tensor) -> None:
    """Raise ValueError unless ``codebook`` is a floating tensor of shape [16]."""
    if codebook.shape != (16,):
        raise ValueError(f"an INT4 codebook has 16 entries, shape [16]; got shape {list(codebook.shape)}")
    if not codebook.dtype.is_floating_point:
        raise ValueError(f"the INT4 codebook must be floating point, got dtype {codebook.dtype}")


def dequantize_int4(codes: torch.Tensor, codebook: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Values of unpacked codes ``[..., d]`` (0..15) as float32.

    Uniform ``(u - 8) / 8`` when ``codebook`` is None, else ``codebook[u]`` (a [16] float table,
    returned in float32). Pass ``unpack_int4(packed)`` for packed rows.
    """
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"dequantize_int4 expects integer codes 0..15, got dtype {codes.dtype}")
    if codebook is None:
        return (codes.to(torch.float32) - UNIFORM_OFFSET) * UNIFORM_SCALE
    check_codebook(codebook)
    return codebook.to(torch.float32)[codes.long()]
