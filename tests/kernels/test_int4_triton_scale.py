"""The Triton kernels at training sizes against the reference, forward and backward.

On a GPU (TRITON_INTERPRET=0) every case is B=4096 examples with sequences up to L=200; in the
interpreter the same cases shrink to B=3, L=21 so `make test` keeps them cheap. Covers d 32 and 64,
H 1..4 (3 is not a power of two), padded and jagged, uniform and codebook, every bias kind, with
random lengths that include empty and full sequences.
"""
from __future__ import annotations

import pytest
import torch

from .cases import Case, make_inputs, reference_with_grads


def _cases(B: int, L: int) -> list[tuple[str, Case]]:
    out = []
    combos = [(d, jagged, codebook) for d in (32, 64) for jagged in (False, True) for codebook in (False, True)]
    for i, (d, jagged, codebook) in enumerate(combos):
        H = (1, 2, 4, 3)[i % 4]
        bias = ("none", "shared", "heads")[i % 3]
        gen = torch.Generator().manual_seed(i)
        lengths = torch.randint(0, L + 1, (B,), generator=gen)
        lengths[0], lengths[-1] = 0, L  # an empty and a full sequence in every case
        name = f"{'jag' if jagged else 'pad'}-B{B}-L{L}-d{d}-H{H}-{'cb' if codebook else 'uni'}-bias_{bias}"
        out.append((name, Case(tuple(lengths.tolist()), L, d, H, codebook, jagged, bias)))
    return out


GPU = torch.cuda.is_available()
SIZES = (4096, 200) if GPU else (3, 21)
CASES = _cases(*SIZES)


def _close(actual, expected, atol, rtol=1e-3):
    torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("case", [c for _, c in CASES], ids=[n for n, _ in CASES])
def test_kernels_match_reference_at_scale(tk, case: Case):
    if GPU and tk.device.type != "cuda":
        pytest.skip("a GPU is present but the kernels are interpreted: sizes meant for CUDA")
    inp = make_inputs(case, tk.device, seed=case.d + case.H)
    ref_out, ref_lse, _, ref_dq, ref_dbias = reference_with_grads(inp, case)
    out, lse, _ = tk.mod.int4_attend_fwd(inp.codes, inp.seq, inp.queries, inp.codebook, inp.bias)
    _close(out, ref_out, atol=5e-5)
    _close(lse, ref_lse, atol=5e-5)
    dq, dbias = tk.mod.int4_attend_bwd(inp.grad_out, inp.codes, inp.seq, inp.queries, inp.codebook, inp.bias,
                                       out, lse, inp.bias is not None)
    _close(dq, ref_dq, atol=2e-4)
    if inp.bias is not None:
        _close(dbias, ref_dbias, atol=2e-4)
