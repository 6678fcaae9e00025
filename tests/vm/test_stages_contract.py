"""The VM reads what the LoopFM stages write: a real MovieLens event log, a fabricated extract
(random codes and soft labels: no FM), compress (INT4 / fp16), build-sequences, and the stages'
`SequenceReader` gathering each VMBatch's sequences by example id."""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from loopfm.vm import (KDConfig, VMModelConfig, VMTrainConfig, build_model, iter_vm_batches,
                       run_vm)

stages = pytest.importorskip("loopfm.stages.sequences")
from tests.stages.util import fabricate_extract  # noqa: E402
from loopfm.stages.compress import CompressConfig, run_compress  # noqa: E402
from loopfm.stages.sequences import SequenceReader, SequencesConfig, run_build_sequences  # noqa: E402
from loopfm.codes.inputs import attach_codes  # noqa: E402


@pytest.fixture(scope="module")
def pipeline(ml_log, tmp_path_factory):
    root = tmp_path_factory.mktemp("vm_stages")
    fabricate_extract(ml_log.root, root / "extract", dim=8, seed=0, days=[5, 6, 7, 8])
    out = {}
    for q in ("int4", "fp16"):
        run_compress(CompressConfig(quantizer=q), root / "extract", root / f"compress_{q}", progress=False)
        run_build_sequences(SequencesConfig(max_len=20), root / f"compress_{q}", root / f"seq_{q}", progress=False)
        out[q] = SequenceReader(root / f"seq_{q}", key="user", days=[5, 6, 7, 8])
    soft = {}
    for f in sorted((root / "extract").rglob("*.parquet")):
        t = pq.read_table(f, columns=["example_id", "soft_label"])
        soft.update(zip(t.column("example_id").to_pylist(), t.column("soft_label").to_pylist()))
    return out, soft


def with_loopfm(batches, reader, soft):
    spec = reader.quant_spec()
    for b in batches:
        sb = reader.gather(b.example_ids.numpy(), layout="padded")
        b = attach_codes(b, sb.codes, sb.lengths, sb.deltas, spec)
        yield dataclasses.replace(b, soft_labels=torch.tensor([soft[i] for i in b.example_ids.tolist()]))


def test_reader_sequences_feed_every_encoder(ml_log, pipeline):
    readers, soft = pipeline
    first = {q: next(with_loopfm(iter_vm_batches(ml_log, [6], 64), r, soft)) for q, r in readers.items()}
    assert first["int4"].seq_packed is not None and first["int4"].seq_dim == 8
    assert first["fp16"].seq_float is not None and first["fp16"].seq_dim == 8
    assert torch.equal(first["int4"].seq_lengths, first["fp16"].seq_lengths)
    assert first["int4"].seq_lengths.max() > 0 and (first["int4"].seq_deltas[:, 0][first["int4"].seq_lengths > 0] > 0).all()
    # INT4 codes are within 1/16 of the fp16 values at the real positions, 1/8 at the top of the
    # range (uniform INT4 stops at 7/8)
    from loopfm.vm.encoders import dequantize
    mask = torch.arange(20)[None] < first["int4"].seq_lengths[:, None]
    gap = (dequantize(first["int4"]) - dequantize(first["fp16"])).abs()[mask]
    assert gap.max() <= 1 / 8 + 1e-3 and gap.mean() < 0.05
    for encoder in ("mean", "sum", "din", "dmin"):
        torch.manual_seed(0)
        model = build_model(VMModelConfig(model="dmin", encoder=encoder, raw_seq=False), ml_log.schema, seq_dim=8,
                            kd=KDConfig())
        for b in first.values():
            out = model(b)
            assert torch.isfinite(out["logit"]).all() and torch.isfinite(out["aux_logit"]).all()


def test_loopfm_run_on_reader_sequences(ml_log, pipeline):
    """One pass on days 5-7 with the reader's INT4 sequences and the raw item history; the codes are
    random (no FM), so the ids carry the signal and the sequence must not break learning."""
    readers, soft = pipeline

    def data(days, bs):
        return with_loopfm(iter_vm_batches(ml_log, days, bs, raw_seq_feature="hist_item_id"), readers["int4"], soft)
    r = run_vm(VMModelConfig(model="deepfm", raw_seq=True), VMTrainConfig(lr=0.01), KDConfig(), ml_log.schema,
               data([5, 6, 7], 256), data([8], 4096), variant="loopfm")
    print(f"MovieLens DeepFM loopfm (random codes) + raw seq: {r.metrics}")
    assert len(r.preds) == ml_log.num_rows([8]) and np.isfinite(r.preds).all()
    assert r.metrics["auc"] > 0.65
    # KD with the extract's soft labels runs end to end too (a few batches: random soft labels)
    kd = run_vm(VMModelConfig(model="dmin"), VMTrainConfig(lr=0.01), KDConfig(), ml_log.schema,
                itertools.islice(data([5], 256), 5), itertools.islice(data([8], 1024), 2), variant="kd+loopfm")
    assert np.isfinite(kd.preds).all() and kd.steps == 5
