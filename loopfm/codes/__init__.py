"""The codes concept: what an FM code is once compressed, on disk, and how every consumer reads it.

* `quant`: `QuantSpec` (quantizer, dim, codebook), `encode` / `decode`, the k-means fit.
* `format`: the extract and compress outputs (Parquet columns, manifests, readers of day files).
* `reader`: `SequenceReader`, the per-example point-in-time sequences of a build-sequences output.
* `inputs`: packed codes -> the tensors a vertical model reads (`sequence_inputs`,
  `current_code_values`), shared by the VM stage and the server.

Import the submodules (``from loopfm.codes.quant import decode``): this package imports nothing
itself, so the format and the reader load without torch. `kernels` holds the INT4 packing and the
attention op and never imports loopfm; `loopfm.stages.codes_format` and `loopfm.stages.compress`
re-export these names at their old paths.
"""
