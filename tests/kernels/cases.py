"""Input builders for the kernel tests: random cases, NaN/0xFF guard buffers, poisoned outputs.

Guard buffers: every input is a view into a larger buffer padded by one element on both sides of
every dimension and filled with NaN (floats) or 0xFF (codes). With a codebook whose entry 15 is
NaN and valid codes drawn from 0..14, any read outside a tensor or past a sequence's length
(padded positions hold 0xFF too) turns the result into NaN. Uniform codes have no NaN value, so
there a stray read shows up as a wrong number instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from kernels import pack_int4, reference

Tensor = torch.Tensor


@dataclass(frozen=True)
class Case:
    lengths: tuple[int, ...]
    L: int  # padded width (ignored for jagged)
    d: int
    H: int
    codebook: bool = False
    jagged: bool = False
    bias: str = "none"  # "none" | "shared" ([B, L] / [total]) | "heads" ([B, H, L] / [total, H])

    @property
    def B(self) -> int:
        return len(self.lengths)

    def __str__(self) -> str:  # readable pytest ids
        layout = "jag" if self.jagged else f"pad{self.L}"
        book = "cb" if self.codebook else "uni"
        return f"{layout}-d{self.d}-H{self.H}-{book}-bias_{self.bias}-len{'_'.join(map(str, self.lengths))}"


def guarded(x: Tensor, fill: float | int) -> Tensor:
    """``x`` copied into the middle of a buffer padded by 1 on each side of every dim, filled with ``fill``."""
    buf = torch.full([s + 2 for s in x.shape], fill, dtype=x.dtype, device=x.device)
    view = buf[tuple(slice(1, s + 1) for s in x.shape)]
    view.copy_(x)
    return view


def poisoned(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """(view, buffer): a NaN-filled output inside a NaN-filled guard buffer."""
    buf = torch.full([s + 2 for s in shape], float("nan"), dtype=dtype, device=device)
    return buf[tuple(slice(1, s + 1) for s in shape)], buf


def guard_intact(buf: Tensor) -> bool:
    """True when nothing was written into the guard region around the middle view."""
    outside = torch.ones(buf.shape, dtype=torch.bool, device=buf.device)
    outside[tuple(slice(1, s - 1) for s in buf.shape)] = False
    return bool(buf[outside].isnan().all())


@dataclass
class Inputs:
    codes: Tensor  # packed codes inside a 0xFF guard
    seq: Tensor  # lengths [B] int32 or offsets [B+1] int64
    queries: Tensor
    codebook: Optional[Tensor]
    bias: Optional[Tensor]
    grad_out: Tensor


def make_inputs(case: Case, device: torch.device, seed: int = 0,
                queries_dtype: torch.dtype = torch.float32) -> Inputs:
    """Random inputs for ``case``: valid codes 0..14 with a codebook (entry 15 is NaN), 0..15 without."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(case.lengths, dtype=torch.int64)
    high = 15 if case.codebook else 16
    if case.jagged:
        total = int(lengths.sum())
        codes = _random_packed((total, case.d), high, gen)
        seq = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        bias_shape = {"shared": (total,), "heads": (total, case.H)}.get(case.bias)
        pad_mask = None
    else:
        codes = _random_packed((case.B, case.L, case.d), high, gen)
        pad_mask = torch.arange(case.L) >= lengths[:, None]  # [B, L]
        codes[pad_mask] = 0xFF  # garbage past each length must never be read
        seq = lengths.to(torch.int32)
        bias_shape = {"shared": (case.B, case.L), "heads": (case.B, case.H, case.L)}.get(case.bias)
    codebook = None
    if case.codebook:
        codebook = torch.randn(16, generator=gen).sort().values
        codebook[15] = float("nan")  # only reachable by reading a guard or padding byte
    bias = None
    if bias_shape is not None:
        bias = torch.randn(bias_shape, generator=gen)
        if pad_mask is not None:
            bias.masked_fill_(pad_mask if bias.dim() == 2 else pad_mask[:, None, :], float("nan"))
    queries = torch.randn(case.B, case.H, case.d, generator=gen).to(queries_dtype)
    grad_out = torch.randn(case.B, case.H, case.d, generator=gen)
    to = lambda t, fill: None if t is None else guarded(t.to(device), fill)  # noqa: E731
    return Inputs(
        codes=to(codes, 0xFF),
        seq=to(seq, 1 << 30),
        queries=to(queries, float("nan")),
        codebook=to(codebook, float("nan")),
        bias=to(bias, float("nan")),
        grad_out=grad_out.to(device),
    )


def _random_packed(shape: tuple[int, ...], high: int, gen: torch.Generator) -> Tensor:
    return pack_int4(torch.randint(0, high, shape, generator=gen))


def reference_with_grads(inp: Inputs, case: Case):
    """(out, lse, weights, d queries, d bias) from the PyTorch reference and autograd, on clean copies."""
    q = inp.queries.detach().clone().float().requires_grad_(True)
    bias = None if inp.bias is None else inp.bias.detach().clone().requires_grad_(True)
    attend = reference.attend_jagged if case.jagged else reference.attend_padded
    out, lse, weights = attend(inp.codes.clone(), inp.seq.clone(), q, inp.codebook, bias)
    out.backward(inp.grad_out.float())
    dbias = None if bias is None else bias.grad
    return out.detach(), lse, weights.detach(), q.grad, dbias
