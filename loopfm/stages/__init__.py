"""The three LoopFM stages after the FM: extract, compress, build-sequences.

Each stage reads the previous stage's folder and writes its own (Parquet + ``_SUCCESS``):

* ``codes_format`` — the on-disk contract of extract and compress outputs, and the sharded-output
  rule shared by every multi-rank stage;
* ``compress``     — Matryoshka prefix / projection, fp16 | int8 | int4 | int4-kmeans, packing;
* ``sequences``    — per-key point-in-time timelines, per-example offsets, append, the VM reader.

Modules are imported on use (``from loopfm.stages.sequences import SequenceReader``), so importing
the package stays cheap.
"""
