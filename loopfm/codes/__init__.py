"""The codes concept: what an FM code is once compressed, and how every consumer reads it.

* `quant`: `QuantSpec` (quantizer, dim, codebook), `encode` / `decode`, the k-means fit.
* `inputs`: packed codes -> the tensors a vertical model reads (`sequence_inputs`,
  `current_code_values`), shared by the VM stage and the server.

The on-disk formats of extract and compress outputs are in `loopfm.stages.codes_format`, the
timelines and their reader in `loopfm.stages.sequences`; `kernels` holds the INT4 packing and the
attention op and never imports loopfm.
"""
from loopfm.codes.inputs import attach_codes, current_code_values, sequence_inputs, stays_packed
from loopfm.codes.quant import INT8_RULE, QUANTIZERS, QuantSpec, decode, encode

__all__ = ["QuantSpec", "QUANTIZERS", "INT8_RULE", "encode", "decode", "sequence_inputs", "attach_codes",
           "current_code_values", "stays_packed"]
