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


def test_streamed_parts_equal_the_one_shot_output(trained_run, tmp_path, monkeypatch):
    """Tiny parts and row groups (several per day, batches straddling them): the same rows and
    values, and the same drift statistics, as one part per day."""
    import pyarrow.parquet as pq
    from loopfm.codes import format as fmt
    from loopfm.stages import extract as extract_stage

    cfg = ExtractConfig(days=[5, 6], batch_size=37)
    whole = run_extract(cfg, trained_run, tmp_path / "whole", progress=False)
    monkeypatch.setattr(extract_stage, "ROWS_PER_PART", 50)
    monkeypatch.setattr(fmt, "ROW_GROUP_ROWS", 16)
    parts = run_extract(cfg, trained_run, tmp_path / "parts", progress=False)
    for key in ("rows_per_day", "drift_sums", "drift"):
        assert parts[key] == whole[key], key
    for day in (5, 6):
        files = cf.stage_files(tmp_path / "parts", day)
        rows = whole["rows_per_day"][str(day)]
        assert [pq.ParquetFile(p).metadata.num_rows for p in files] == [
            min(50, rows - s) for s in range(0, rows, 50)]
        assert pq.ParquetFile(files[0]).metadata.num_row_groups == 4  # 16 + 16 + 16 + 2
        assert len(cf.stage_files(tmp_path / "whole", day)) == 1
    assert cf.read_codes(tmp_path / "parts").equals(cf.read_codes(tmp_path / "whole"))


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


# -- the FM checkpoint of each day (paper table 5, "ckpt frequency") -------------------------------
@pytest.fixture(scope="module")
def refreshed_run(tmp_path_factory):
    """The same FM as ``trained_run``, then refreshed one streaming pass over day 5."""
    from loopfm.fm.train import train_fm
    from tests.fm.toy import make_log, tiny_config

    run = tmp_path_factory.mktemp("refreshed")
    make_log(run / "data", n=1200, days=6)
    train_fm(tiny_config(refresh_days=[5]), run / "data", run / "fm", seed=0, config_hash="toy")
    return run


def test_refresh_keeps_the_fixed_fm_and_saves_each_day(trained_run, refreshed_run):
    fixed = torch.load(trained_run / "fm" / "model.pt", weights_only=True)
    same = torch.load(refreshed_run / "fm" / "model.pt", weights_only=True)
    assert fixed.keys() == same.keys() and all(torch.equal(fixed[k], same[k]) for k in fixed)
    daily = torch.load(refreshed_run / "fm" / "daily" / "day=5" / "model.pt", weights_only=True)
    assert any(not torch.equal(fixed[k], daily[k]) for k in fixed)  # it trained on day 5
    m = read_manifest(refreshed_run / "fm")
    assert m["refresh_days"] == [5] and set(m["eval_fresh"]) == {"6"}
    assert m["eval"] == read_manifest(trained_run / "fm")["eval"]  # eval is the fixed FM's
    assert 0.0 < m["eval_fresh"]["6"]["auc"] <= 1.0 and m["eval_fresh"]["6"]["rows"] == m["eval"]["6"]["rows"]


def test_daily_extract_scores_each_day_with_the_latest_fm(refreshed_run, tmp_path):
    from loopfm.data.eventlog import EventLog
    from loopfm.fm.batch import BatchBuilder
    from loopfm.fm.train import load_trained_fm

    fixed = run_extract(ExtractConfig(days=[5, 6]), refreshed_run, tmp_path / "fixed", progress=False)
    daily = run_extract(ExtractConfig(days=[5, 6], fm_checkpoint="daily"), refreshed_run, tmp_path / "daily",
                        progress=False)
    assert fixed["fm_as_of_day"] == {"5": None, "6": None}
    assert daily["fm_as_of_day"] == {"5": None, "6": 5}  # day 5 starts with the FM of day 4
    a, b = cf.read_codes(tmp_path / "fixed"), cf.read_codes(tmp_path / "daily")
    day = a.column("day").to_numpy()
    za, zb = cf.z_from_arrow(a.column("z")), cf.z_from_arrow(b.column("z"))
    np.testing.assert_array_equal(za[day == 5], zb[day == 5])
    assert not np.allclose(za[day == 6], zb[day == 6])
    model, _ = load_trained_fm(refreshed_run, as_of_day=5)
    events = EventLog(refreshed_run / "data").read([6]).slice(0, 40)
    probs = model.forward_with_taps(BatchBuilder(model.layout)(events, events.num_rows))["probs"].numpy()
    np.testing.assert_allclose(b.column("soft_label").to_numpy()[day == 6][:40], probs, rtol=1e-6)
    # Drift: day 5 is the fixed FM's own code; day 6 moved away from it, but not to noise.
    assert "cosine_to_fixed" not in fixed["drift"]["6"] and fixed["drift"]["5"]["centroid_shift"] == 0.0
    assert daily["drift"]["5"]["cosine_to_fixed"] == 1.0
    assert 0.0 < daily["drift"]["6"]["cosine_to_fixed"] < 0.9999


def test_daily_extract_needs_the_refreshed_fm(trained_run, refreshed_run, tmp_path):
    with pytest.raises(ValueError, match=r"day 6 needs the FM refreshed through day 5; add it to fm.train.refresh_days"):
        run_extract(ExtractConfig(days=[5, 6], fm_checkpoint="daily"), trained_run, tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="no FM refreshed through day 4"):
        from loopfm.fm.train import load_trained_fm
        load_trained_fm(refreshed_run, as_of_day=4)


def test_daily_extract_shards_union_to_single(refreshed_run, tmp_path):
    cfg = ExtractConfig(days=[5, 6], fm_checkpoint="daily", batch_size=100)
    single = run_extract(cfg, refreshed_run, tmp_path / "one", progress=False)
    for rank in range(2):
        run_extract(cfg, refreshed_run, tmp_path / "two", rank=rank, world_size=2, progress=False)
    top = read_manifest(tmp_path / "two")
    assert top["rows_per_day"] == single["rows_per_day"]
    for d in ("5", "6"):
        for k, v in single["drift"][d].items():
            assert top["drift"][d][k] == pytest.approx(v, abs=1e-3), (d, k)


# -- the soft label as a 1-d sequence (paper table 5) ---------------------------------------------
def test_soft_label_kind_is_a_one_dim_code(trained_run, tmp_path):
    m = run_extract(ExtractConfig(days=[5, 6], kind="soft_label"), trained_run, tmp_path / "extract", progress=False)
    assert m["dim"] == 1 and m["taps"] == []
    t = cf.read_codes(tmp_path / "extract")
    z = cf.z_from_arrow(t.column("z"))
    assert z.shape == (t.num_rows, 1)
    np.testing.assert_allclose(z[:, 0], 2 * t.column("soft_label").to_numpy() - 1, atol=1e-3)  # fp16
    with pytest.raises(ValueError, match="INT4 packs two codes per byte"):
        run_compress(CompressConfig(quantizer="int4"), tmp_path / "extract", tmp_path / "bad", progress=False)
    with pytest.raises(ValueError, match="even for INT4"):
        CompressConfig(quantizer="int4", dim=1)
    c = run_compress(CompressConfig(quantizer="int8"), tmp_path / "extract", tmp_path / "compress", progress=False)
    assert c["dim"] == 1 and c["code_bytes"] == 1
    run_build_sequences(SequencesConfig(max_len=6), tmp_path / "compress", tmp_path / "sequences", progress=False)
    batch = next(iter(SequenceReader(tmp_path / "sequences", key="user", days=[6]).iter_batches(64)))
    assert batch.codes.shape[1:] == (6, 1)


def _vm_cfg(**kw):
    from loopfm.stages.train_vm import VMStageConfig
    from loopfm.vm.model import VMModelConfig
    from loopfm.vm.train import VMTrainConfig

    base = dict(models=["deepfm", "dmin"], train_days=[4, 5], test_day=6, seeds=1,
                model=VMModelConfig(embedding_dim=4, dnn=[8], attention_mlp=[8]), train=VMTrainConfig(batch_size=64))
    base.update(kw)
    return VMStageConfig(**base)


def _chain(trained_run, run, extract: ExtractConfig, compress: CompressConfig):
    import shutil

    shutil.copytree(trained_run, run)
    run_extract(extract, run, run / "extract", progress=False)
    run_compress(compress, run / "extract", run / "compress", progress=False)
    run_build_sequences(SequencesConfig(max_len=8), run / "compress", run / "sequences", progress=False)


def test_vm_reads_the_soft_label_sequence(trained_run, tmp_path):
    import pyarrow.parquet as pq
    from loopfm.stages.train_vm import run_train_vm

    run = tmp_path / "run"
    _chain(trained_run, run, ExtractConfig(days=[4, 5, 6], kind="soft_label"), CompressConfig(quantizer="fp16"))
    m = run_train_vm(_vm_cfg(variants=["baseline", "loopfm"]), run, run / "vm", config_hash="h", progress=False)
    assert m["runs"] == 4 and m["quantizer"] == "fp16"
    preds = pq.read_table(run / "vm" / "predictions.parquet")
    assert not np.allclose(preds.column("dmin/baseline/0").to_numpy(), preds.column("dmin/loopfm/0").to_numpy())


def test_current_sample_code_variant(trained_run, tmp_path):
    """Table 2: the FM's code of the example itself (needs a real-time FM) beside KD."""
    import pyarrow.parquet as pq
    from loopfm.data.eventlog import EventLog
    from loopfm.stages.compress import decode, load_spec
    from loopfm.stages.train_vm import VMInputs, run_train_vm

    run = tmp_path / "run"
    _chain(trained_run, run, ExtractConfig(days=[4, 5, 6]), CompressConfig(quantizer="int4"))
    cfg = _vm_cfg(models=["deepfm"], variants=["kd", "kd+current"])
    log = EventLog(run / "data")
    batch = VMInputs(run, log, cfg, needs_seq=False, needs_kd=True, needs_current=True).batches([6])[0]
    assert batch.current_code.shape == (len(batch), 8) and batch.seq_packed is None
    t = cf.read_codes(run / "compress")
    row = {int(e): i for i, e in enumerate(t.column("example_id").to_numpy())}
    want = decode(cf.bytes_from_arrow(t.column(cf.CODE_COLUMN)), load_spec(run / "compress"))
    idx = [row[int(e)] for e in batch.example_ids]
    np.testing.assert_array_equal(batch.current_code.numpy(), want[idx])
    m = run_train_vm(cfg, run, run / "vm", config_hash="h", progress=False)
    assert m["runs"] == 2
    preds = pq.read_table(run / "vm" / "predictions.parquet")
    assert not np.allclose(preds.column("deepfm/kd/0").to_numpy(), preds.column("deepfm/kd+current/0").to_numpy())
    with pytest.raises(ValueError, match="no FM code for .* examples of days \\[3\\]"):
        VMInputs(run, log, cfg, needs_seq=False, needs_kd=False, needs_current=True).batches([3])
