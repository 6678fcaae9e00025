"""extract on a tiny trained FM: one row per example of the logged days, codes in [-1, 1],
soft labels equal to the FM's own predictions, shards that union to the single-process output."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from loopfm.artifacts import read_manifest
from loopfm.stages import codes_format as cf
from loopfm.stages.compress import CompressConfig, run_compress
from loopfm.stages.extract import ExtractConfig, run_extract
from loopfm.stages.sequences import SequencesConfig, SequenceReader, run_build_sequences


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from loopfm.fm.train import train_fm
    from tests.fm.toy import make_log, tiny_config

    run = tmp_path_factory.mktemp("run")
    make_log(run / "data", n=1200, days=6)
    train_fm(tiny_config(), run / "data", run / "fm", seed=0, config_hash="toy")
    return run


def test_codes_and_soft_labels(trained_run, tmp_path):
    from loopfm.data.eventlog import EventLog
    from loopfm.fm.batch import BatchBuilder
    from loopfm.fm.train import load_trained_fm

    m = run_extract(ExtractConfig(days=[5, 6]), trained_run, tmp_path / "extract", progress=False)
    log = EventLog(trained_run / "data")
    assert m["dim"] == 8 and m["kind"] == "codes" and m["taps"] == ["hidden0", "hidden1"]
    assert m["rows_per_day"] == {"5": log.num_rows([5]), "6": log.num_rows([6])}
    t = cf.read_codes(tmp_path / "extract")
    events = log.read([5, 6])
    np.testing.assert_array_equal(t.column("example_id").to_numpy(), events.column("example_id").to_numpy())
    np.testing.assert_array_equal(t.column("user_key").to_numpy(), events.column("uid").to_numpy())
    z = cf.z_from_arrow(t.column("z"))
    assert z.shape == (events.num_rows, 8) and np.all(np.abs(z) <= 1.0)
    model, _ = load_trained_fm(trained_run)
    builder = BatchBuilder(model.layout)
    head = events.slice(0, 50)
    probs = model.forward_with_taps(builder(head, head.num_rows))["probs"].numpy()
    np.testing.assert_allclose(t.column("soft_label").to_numpy()[:50], probs, rtol=1e-6)


def test_raw_taps_and_errors(trained_run, tmp_path):
    m = run_extract(ExtractConfig(days=[6], kind="raw", taps=["emb"]), trained_run, tmp_path / "raw",
                    progress=False)
    assert m["kind"] == "raw" and m["taps"] == ["emb"] and m["dim"] > 8
    with pytest.raises(ValueError, match="must be among the FM's taps"):
        run_extract(ExtractConfig(days=[6], kind="raw", taps=["hidden9"]), trained_run, tmp_path / "x",
                    progress=False)
    with pytest.raises(ValueError, match=r"extract.days \[9\] are not in the event log"):
        run_extract(ExtractConfig(days=[9]), trained_run, tmp_path / "y", progress=False)


def test_shards_union_to_single(trained_run, tmp_path):
    cfg = ExtractConfig(days=[5, 6], batch_size=100)
    single = run_extract(cfg, trained_run, tmp_path / "one", progress=False)
    for rank in range(2):
        run_extract(cfg, trained_run, tmp_path / "two", rank=rank, world_size=2, progress=False)
    top = read_manifest(tmp_path / "two")
    assert top["rows_per_day"] == single["rows_per_day"] and top["world_size"] == 2
    a, b = cf.read_codes(tmp_path / "one"), cf.read_codes(tmp_path / "two")
    for c in ("example_id", "ts", "day", "label", "user_key", "item_key"):
        assert a.column(c).equals(b.column(c)), c
    # Same model, other batch compositions: equal up to float rounding (BLAS blocking, fp16).
    np.testing.assert_allclose(a.column("soft_label").to_numpy(), b.column("soft_label").to_numpy(),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cf.z_from_arrow(a.column("z")), cf.z_from_arrow(b.column("z")), atol=2e-3)


def test_extract_compress_sequences_chain(trained_run, tmp_path):
    run_extract(ExtractConfig(days=[5, 6]), trained_run, tmp_path / "extract", progress=False)
    run_compress(CompressConfig(quantizer="int4", dim=8), tmp_path / "extract", tmp_path / "compress",
                 progress=False)
    run_build_sequences(SequencesConfig(max_len=10), tmp_path / "compress", tmp_path / "sequences",
                        progress=False)
    reader = SequenceReader(tmp_path / "sequences", key="user", days=[6])
    batch = next(iter(reader.iter_batches(64)))
    assert batch.codes.shape[1:] == (10, 4) and batch.codes.dtype == np.uint8
    assert (batch.lengths > 0).any()
    import kernels
    out = kernels.int4_attend(torch.from_numpy(batch.codes), torch.from_numpy(batch.lengths),
                              torch.randn(len(batch.lengths), 1, 8))
    assert torch.isfinite(out).all()


def test_train_vm_on_the_chain(trained_run, tmp_path):
    """The VM stage joins the event log, soft labels and sequences by example id."""
    import shutil
    import pyarrow.parquet as pq
    from loopfm.stages.train_vm import VMStageConfig, run_train_vm
    from loopfm.vm.model import VMModelConfig
    from loopfm.vm.train import VMTrainConfig

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    run_extract(ExtractConfig(days=[4, 5, 6]), run, run / "extract", progress=False)
    run_compress(CompressConfig(quantizer="int4"), run / "extract", run / "compress", progress=False)
    run_build_sequences(SequencesConfig(max_len=8), run / "compress", run / "sequences", progress=False)
    cfg = VMStageConfig(models=["deepfm", "dmin"], train_days=[4, 5], test_day=6, seeds=2,
                        model=VMModelConfig(embedding_dim=4, dnn=[8], attention_mlp=[8]),
                        train=VMTrainConfig(batch_size=64))
    m = run_train_vm(cfg, run, run / "vm", config_hash="h", progress=False)
    assert m["runs"] == 2 * 4 * 2 and m["quantizer"] == "int4"
    preds = pq.read_table(run / "vm" / "predictions.parquet")
    assert preds.num_rows == m["test_rows"] and "dmin/kd+loopfm/1" in preds.column_names
    for name in preds.column_names[3:]:
        p = preds.column(name).to_numpy()
        assert np.all((p > 0) & (p < 1)), name
    # Seeds differ, variants differ.
    assert not np.allclose(preds.column("deepfm/baseline/0").to_numpy(), preds.column("deepfm/baseline/1").to_numpy())
    assert not np.allclose(preds.column("deepfm/baseline/0").to_numpy(), preds.column("deepfm/loopfm/0").to_numpy())
    # Table 4's raw-ID sequence: the toy log's history column (item ids) read by the VM itself.
    raw = dataclasses.replace(cfg, models=["din"], variants=["baseline", "loopfm"], seeds=1, raw_seq_feature="hist",
                              model=dataclasses.replace(cfg.model, raw_seq=True))
    m = run_train_vm(raw, run, run / "vm_raw", config_hash="h", progress=False)
    assert m["runs"] == 2
    with pytest.raises(ValueError, match="go together"):
        dataclasses.replace(cfg, raw_seq_feature="hist")
    with pytest.raises(ValueError, match="no soft label"):
        run_train_vm(dataclasses.replace(cfg, train_days=[3]), run, run / "vm2", config_hash="h", progress=False)
