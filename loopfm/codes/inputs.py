"""Packed codes -> the tensors a vertical model reads; one path for training, evaluation and serving.

``int4`` codes and ``int4-kmeans`` codes with one shared [16] codebook stay packed (the kernel op
`kernels.int4_attend` reads them as they are stored); fp16, int8 and per-dim k-means codes are
decoded to float [B, L, d] with `loopfm.codes.quant.decode`. The VM stage and the server both call
`sequence_inputs` / `current_code_values`, so a served score equals the offline one.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from loopfm.codes.quant import QuantSpec, decode


def stays_packed(spec: QuantSpec) -> bool:
    """True when the VM reads these codes packed (uniform INT4, or k-means INT4 with one shared table)."""
    if spec.quantizer == "int4":
        return True
    return spec.quantizer == "int4-kmeans" and spec.codebook is not None and np.ndim(spec.codebook) == 1


def as_tensor(x) -> Tensor:
    """A tensor sharing ``x``'s memory when it can (a writable contiguous array), else a copy."""
    if isinstance(x, Tensor):
        return x
    x = np.ascontiguousarray(x)
    return torch.from_numpy(x if x.flags.writeable else x.copy())  # Arrow-backed views are read-only


def sequence_inputs(spec: QuantSpec, codes, lengths, deltas=None) -> dict[str, Tensor | None]:
    """Keyword arguments of `VMBatch.with_sequence` for a padded code batch: ``codes`` uint8
    [B, L, code_bytes], ``lengths`` [B], ``deltas`` [B, L] seconds from each entry to the example."""
    lengths_t = as_tensor(lengths).to(torch.int32)
    deltas_t = None if deltas is None else as_tensor(deltas).float()
    if stays_packed(spec):
        codebook = None if spec.codebook is None else torch.from_numpy(np.asarray(spec.codebook, np.float32))
        return dict(packed=as_tensor(codes).to(torch.uint8), lengths=lengths_t, deltas=deltas_t, codebook=codebook)
    values = decode(codes.numpy() if isinstance(codes, Tensor) else codes, spec)
    return dict(values=as_tensor(np.asarray(values, np.float32)), lengths=lengths_t, deltas=deltas_t)


def attach_codes(batch, codes, lengths, deltas, spec: QuantSpec):
    """``batch`` (a `VMBatch`) carrying the LoopFM sequence of a padded code batch."""
    return batch.with_sequence(**sequence_inputs(spec, codes, lengths, deltas))


def current_code_values(spec: QuantSpec, codes: np.ndarray) -> Tensor:
    """float [B, d]: the decoded FM code of each example itself (uint8 [B, code_bytes])."""
    return as_tensor(np.asarray(decode(codes, spec), np.float32))
