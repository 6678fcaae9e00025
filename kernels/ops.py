"""``loopfm::int4_attend`` custom op (reference on CPU, Triton on CUDA) and its public wrappers.

Layers, outermost first:

* ``int4_attend`` / ``int4_attend_jagged``: validate arguments with clear ValueErrors, call the op,
  return ``out`` (and the weights when asked). Both are leaves for ``torch.fx.symbolic_trace``
  (TorchRec's train pipeline traces the model): called with fx Proxies they record themselves as
  one ``call_function`` node instead of tracing their Python checks.
* ``torch.ops.loopfm.int4_attend``: one op for padded (3-D codes + lengths) and jagged (2-D codes
  + offsets) input, returning ``(out, lse, weights)``; fake impl for ``torch.compile``; autograd
  through ``torch.ops.loopfm.int4_attend_backward``, itself an op so compiled graphs keep the
  Triton backward as an opaque call.

Backends: "reference" (readable pure PyTorch, any device: the oracle), "torch" (the same result,
PyTorch written for speed: ``kernels.torch_int4_attend``, the CPU path), "triton" (CUDA, or CPU
tensors under ``TRITON_INTERPRET=1``), "auto" (Triton for CUDA tensors when triton imports, else
"torch").
"""
from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Optional, Union

import torch

from . import reference, torch_int4_attend
from .packing import check_codebook

__all__ = ["BACKENDS", "int4_attend", "int4_attend_jagged", "triton_available", "resolve_backend"]

Tensor = torch.Tensor
BACKENDS = ("auto", "reference", "torch", "triton")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when triton imports. Importing triton is harmless here: only decorating the kernels
    (``_triton``) fixes the choice between compiling and interpreting."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _triton() -> ModuleType:
    # Imported on first use, not with the package: triton.jit decides between compiling and
    # interpreting when the kernels are decorated, so TRITON_INTERPRET only has to be set by then.
    return importlib.import_module("kernels.triton_int4_attend")


def resolve_backend(backend: str, device: torch.device) -> str:
    """"reference", "torch" or "triton" for ``backend`` in BACKENDS and tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton" and not triton_available():
        raise ValueError("backend='triton' requested but triton is not installed")
    return backend


# --------------------------------------------------------------------------------------------------
# The ops


@torch.library.custom_op("loopfm::int4_attend", mutates_args=())
def _attend_op(
    codes: Tensor,
    seq: Tensor,
    queries: Tensor,
    codebook: Optional[Tensor],
    bias: Optional[Tensor],
    return_weights: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(out ``[B, H, d]``, lse ``[B, H]``, weights or an empty tensor); see ``int4_attend``."""
    resolved = resolve_backend(backend, queries.device)
    if resolved == "triton":
        out, lse, weights = _triton().int4_attend_fwd(codes, seq, queries, codebook, bias, return_weights)
        return out, lse, weights
    impl = torch_int4_attend if resolved == "torch" else reference
    attend = impl.attend_jagged if codes.dim() == 2 else impl.attend_padded
    out, lse, weights = attend(codes, seq, queries, codebook, bias)
    if not return_weights:
        weights = weights.new_empty((0,))
    return out, lse.contiguous(), weights.contiguous()


@_attend_op.register_fake
def _attend_fake(codes, seq, queries, codebook, bias, return_weights, backend):
    B, H, d = queries.shape
    stat = reference.stat_dtype(queries.dtype)
    if not return_weights:
        weights_shape = (0,)
    elif codes.dim() == 2:
        weights_shape = (codes.shape[0], H)
    else:
        weights_shape = (B, H, codes.shape[1])
    return (
        queries.new_empty((B, H, d)),
        queries.new_empty((B, H), dtype=stat),
        queries.new_empty(weights_shape, dtype=stat),
    )


@torch.library.custom_op("loopfm::int4_attend_backward", mutates_args=())
def _attend_backward_op(
    grad_out: Tensor,
    codes: Tensor,
    seq: Tensor,
    queries: Tensor,
    codebook: Optional[Tensor],
    bias: Optional[Tensor],
    out: Tensor,
    lse: Tensor,
    bias_grad: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """(d queries, d bias shaped like ``bias``, or an empty tensor when ``bias_grad`` is False)."""
    resolved = resolve_backend(backend, queries.device)
    if resolved == "triton":
        return _triton().int4_attend_bwd(grad_out, codes, seq, queries, codebook, bias, out, lse, bias_grad)
    impl = torch_int4_attend if resolved == "torch" else reference
    backward = impl.attend_jagged_backward if codes.dim() == 2 else impl.attend_padded_backward
    dq, dbias = backward(grad_out, codes, seq, queries, codebook, bias, out, lse, bias_grad)
    if dbias is None:
        dbias = queries.new_empty((0,))
    return dq.contiguous(), dbias.contiguous()


@_attend_backward_op.register_fake
def _attend_backward_fake(grad_out, codes, seq, queries, codebook, bias, out, lse, bias_grad, backend):
    dq = torch.empty_like(queries, memory_format=torch.contiguous_format)
    if bias_grad and bias is not None:
        return dq, torch.empty_like(bias, memory_format=torch.contiguous_format)
    return dq, queries.new_empty((0,))


def _setup_context(ctx, inputs, output) -> None:
    codes, seq, queries, codebook, bias, _return_weights, backend = inputs
    out, lse, weights = output
    ctx.save_for_backward(codes, seq, queries, codebook, bias, out, lse)
    ctx.backend = backend
    # Weights are for analysis; a gradient through them is not implemented, so say so loudly
    # (they do not require grad) rather than drop it silently.
    ctx.mark_non_differentiable(lse, weights)


def _backward(ctx, grad_out, _grad_lse, _grad_weights):
    codes, seq, queries, codebook, bias, out, lse = ctx.saved_tensors
    bias_grad = bias is not None and ctx.needs_input_grad[4]
    dq, dbias = torch.ops.loopfm.int4_attend_backward(
        grad_out, codes, seq, queries, codebook, bias, out, lse, bias_grad, ctx.backend
    )
    # Codes, lengths/offsets and the codebook get no gradient.
    return None, None, dq if ctx.needs_input_grad[2] else None, None, dbias if bias_grad else None, None, None


_attend_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# Argument checks (shapes and dtypes only: data checks would cost a device sync per call)


def _check_common(codes: Tensor, queries: Tensor, codebook: Optional[Tensor], backend: str) -> int:
    """Checks shared by both layouts; returns d."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if codes.dtype != torch.uint8 and not codes.dtype.is_floating_point:
        raise ValueError(f"codes must be packed uint8 [.., d/2] or float values [.., d], got {codes.dtype}")
    if queries.dim() != 3 or not queries.dtype.is_floating_point:
        raise ValueError(f"queries must be a float tensor [B, H, d], got {queries.dtype} {list(queries.shape)}")
    d = codes.shape[-1] * (2 if codes.dtype == torch.uint8 else 1)
    if queries.shape[2] != d or d == 0:
        raise ValueError(f"queries have d={queries.shape[2]} but the codes hold d={d} per position "
                         "(packed uint8 codes hold 2 per byte)")
    if queries.shape[1] == 0:
        raise ValueError("queries need at least one head (H >= 1)")
    if codebook is not None:
        if codes.dtype.is_floating_point:
            raise ValueError("a codebook only applies to uint8 codes; float codes are already values")
        check_codebook(codebook)
    return d


def _check_seq(seq: Tensor, size: int, name: str) -> None:
    if seq.dim() != 1 or seq.shape[0] != size:
        raise ValueError(f"{name} must have shape [{size}], got {list(seq.shape)}")
    if seq.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be int32 or int64, got {seq.dtype}")


def _check_bias(bias: Optional[Tensor], shapes: tuple[tuple[int, ...], ...], names: str) -> None:
    if bias is None:
        return
    if not bias.dtype.is_floating_point:
        raise ValueError(f"bias must be floating point, got {bias.dtype}")
    if tuple(bias.shape) not in shapes:
        raise ValueError(f"bias must have shape {names} = {' or '.join(str(list(s)) for s in shapes)}, "
                         f"got {list(bias.shape)}")


def _check_devices(queries: Tensor, *tensors: Optional[Tensor]) -> None:
    for t in tensors:
        if t is not None and t.device != queries.device:
            raise ValueError(f"all tensors must be on {queries.device}, found one on {t.device}")


def _check_padded(packed, lengths, queries, codebook, bias, backend) -> None:
    if packed.dim() != 3:
        raise ValueError(f"padded codes must be [B, L, d/2] (uint8) or [B, L, d] (float), got {list(packed.shape)}")
    _check_common(packed, queries, codebook, backend)
    B, L = packed.shape[:2]
    if queries.shape[0] != B:
        raise ValueError(f"queries have batch {queries.shape[0]} but the codes have {B}")
    _check_seq(lengths, B, "lengths")
    H = queries.shape[1]
    _check_bias(bias, ((B, L), (B, H, L)), "[B, L] or [B, H, L]")
    _check_devices(queries, packed, lengths, codebook, bias)


def _check_jagged(values, offsets, queries, codebook, bias, backend) -> None:
    if values.dim() != 2:
        raise ValueError(f"jagged values must be [total, d/2] (uint8) or [total, d] (float), got {list(values.shape)}")
    _check_common(values, queries, codebook, backend)
    B, H, total = queries.shape[0], queries.shape[1], values.shape[0]
    _check_seq(offsets, B + 1, "offsets")
    _check_bias(bias, ((total,), (total, H)), "[total] or [total, H]")
    _check_devices(queries, values, offsets, codebook, bias)


# --------------------------------------------------------------------------------------------------
# Public functions


def _fx_leaf(fn, args: tuple, kwargs: dict):
    """Under ``torch.fx.symbolic_trace``: record ``fn`` as one node, or None when not tracing."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.fx.Proxy):
            return a.tracer.create_proxy("call_function", fn, args, kwargs)
    return None


Result = Union[Tensor, tuple[Tensor, Tensor]]


def int4_attend(
    packed: Tensor,
    lengths: Tensor,
    queries: Tensor,
    codebook: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    return_weights: bool = False,
    backend: str = "auto",
) -> Result:
    """Attention pooling of INT4 sequences: ``out[b, h] = sum_l softmax_l(q.z_l/sqrt(d) + bias) z_l``.

    Args:
        packed: uint8 ``[B, L, d/2]`` codes (low nibble = even dimension), or float values
            ``[B, L, d]`` (the same computation without dequantization, for comparisons).
        lengths: int32/int64 ``[B]``; positions ``>= lengths[b]`` are ignored (clamped to [0, L]).
        queries: float ``[B, H, d]``; H = 1 is DIN-style target attention.
        codebook: optional float ``[16]`` k-means table (value = codebook[u]); uniform
            ``(u - 8) / 8`` when None.
        bias: optional additive logit bias ``[B, L]`` (all heads) or ``[B, H, L]``.
        return_weights: also return the attention weights ``[B, H, L]`` (float32; not differentiable).
        backend: "auto", "reference", "torch" or "triton".

    Returns ``out`` ``[B, H, d]`` in the queries' dtype (zeros for empty sequences), or
    ``(out, weights)``. Gradients flow to ``queries`` and ``bias``; codes and codebook get none.
    """
    leaf = _fx_leaf(int4_attend, (packed, lengths, queries),
                    dict(codebook=codebook, bias=bias, return_weights=return_weights, backend=backend))
    if leaf is not None:
        return leaf
    _check_padded(packed, lengths, queries, codebook, bias, backend)
    out, _lse, weights = torch.ops.loopfm.int4_attend(packed, lengths, queries, codebook, bias,
                                                      return_weights, backend)
    return (out, weights) if return_weights else out


def int4_attend_jagged(
    values: Tensor,
    offsets: Tensor,
    queries: Tensor,
    codebook: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    return_weights: bool = False,
    backend: str = "auto",
) -> Result:
    """``int4_attend`` on jagged sequences: example b owns rows ``offsets[b]:offsets[b+1]``.

    Args:
        values: uint8 ``[total, d/2]`` (or float ``[total, d]``).
        offsets: int64/int32 ``[B+1]``, non-decreasing, within [0, total] (trusted, not checked:
            checking would cost a device sync per call).
        bias: optional ``[total]`` (all heads) or ``[total, H]``, row-aligned with ``values``.
        return_weights: weights come back row-aligned too, float32 ``[total, H]`` (0 on rows that
            belong to no example).

    Other arguments and the result are as for ``int4_attend``.
    """
    leaf = _fx_leaf(int4_attend_jagged, (values, offsets, queries),
                    dict(codebook=codebook, bias=bias, return_weights=return_weights, backend=backend))
    if leaf is not None:
        return leaf
    _check_jagged(values, offsets, queries, codebook, bias, backend)
    out, _lse, weights = torch.ops.loopfm.int4_attend(values, offsets, queries, codebook, bias,
                                                      return_weights, backend)
    return (out, weights) if return_weights else out
