"""LoopFM kernels: INT4 packing and fused INT4 dequant-and-attend.

Imports only torch; triton is imported on the first Triton launch (see ``kernels.ops``), so CPU
machines without triton use the PyTorch paths (``kernels.torch_int4_attend``, ``kernels.reference``).
Layout, API and how to test and benchmark: kernels/README.md.
"""
from .ops import BACKENDS, int4_attend, int4_attend_jagged, resolve_backend, triton_available
from .packing import dequantize_int4, pack_int4, quantize_uniform_int4, unpack_int4

__all__ = [
    "BACKENDS",
    "int4_attend",
    "int4_attend_jagged",
    "resolve_backend",
    "triton_available",
    "pack_int4",
    "unpack_int4",
    "quantize_uniform_int4",
    "dequantize_int4",
]
