"""compress: quantizer round trips and error bounds, k-means vs uniform, packing, the stage."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from loopfm.artifacts import MANIFEST, read_manifest
from loopfm.stages import codes_format as cf
from loopfm.stages import compress as cp
from loopfm.stages.compress import CompressConfig, QuantSpec, decode, encode, run_compress
from tests.stages.util import fabricate_extract, toy_event_log


def _tanh_codes(n=4000, d=16, seed=0):
    return np.tanh(1.5 * np.random.default_rng(seed).normal(size=(n, d))).astype(np.float16).astype(np.float32)


def test_packing_golden_bytes_through_the_compress_path():
    z = np.array([[-7 / 8, -6 / 8]], np.float32)  # uniform INT4 codes (1, 2)
    codes = encode(z, QuantSpec("int4", 2))
    assert codes.dtype == np.uint8 and codes.tolist() == [[0x21]]
    np.testing.assert_array_equal(decode(codes, QuantSpec("int4", 2)), z)
    cb = np.linspace(-1, 1, 16).astype(np.float32)
    km = encode(cb[[1, 2, 15, 0]][None], QuantSpec("int4-kmeans", 4, cb))
    assert km.tolist() == [[0x21, 0x0F]]


def test_uniform_int4_error_bound_and_grid_is_exact():
    z = np.linspace(-1, 1 - 1 / 16, 4001, dtype=np.float32).reshape(-1, 1)
    z = np.concatenate([z, z[::-1]], axis=1)
    spec = QuantSpec("int4", 2)
    assert np.max(np.abs(decode(encode(z, spec), spec) - z)) <= 1 / 16 + 1e-7
    grid = ((np.arange(16) - 8) / 8).astype(np.float32).reshape(8, 2)
    np.testing.assert_array_equal(decode(encode(grid, spec), spec), grid)
    assert decode(encode(np.ones((1, 2), np.float32), spec), spec).tolist() == [[7 / 8, 7 / 8]]  # saturates


def test_int8_and_fp16_error_bounds():
    z = np.random.default_rng(0).uniform(-1, 1, (3000, 8)).astype(np.float32)
    e8 = cp.quant_error(z, QuantSpec("int8", 8))
    assert e8["max_abs"] <= 1 / 254 + 1e-7
    codes = encode(z, QuantSpec("int8", 8))
    assert codes.shape == (3000, 8) and codes.view(np.int8).min() >= -127
    e16 = cp.quant_error(z, QuantSpec("fp16", 8))
    assert e16["max_abs"] <= 2 ** -11 and encode(z, QuantSpec("fp16", 8)).shape == (3000, 16)
    zf16 = z.astype(np.float16).astype(np.float32)  # fp16 codes from extract round-trip exactly
    assert cp.quant_error(zf16, QuantSpec("fp16", 8))["max_abs"] == 0.0


@pytest.mark.parametrize("tables", ["shared", "per-dim"])
def test_kmeans_int4_beats_uniform_int4_on_tanh_codes(tables):
    fit, held = _tanh_codes(seed=0), _tanh_codes(seed=1)
    cb = cp.fit_codebook(fit, tables, 50)
    assert cb.shape == ((16,) if tables == "shared" else (16, 16))
    assert np.all(np.diff(cb, axis=-1) > 0)  # sorted levels: nearest-level search is a searchsorted
    km, uni = QuantSpec("int4-kmeans", 16, cb), QuantSpec("int4", 16)
    for z in (fit, held):
        assert cp.quant_error(z, km)["mse"] < cp.quant_error(z, uni)["mse"]
    u = cp.kmeans_assign(held, cb)
    # nearest level: no other level is closer
    dist = np.abs(held[:, :, None] - (cb[None, None, :] if cb.ndim == 1 else cb[None]))
    chosen = np.take_along_axis(dist, u[..., None].astype(np.int64), -1)[..., 0]
    assert np.all(chosen <= dist.min(-1) + 1e-6)  # ties at a midpoint may go either way


def test_kmeans_levels_never_worse_than_uniform_even_on_narrow_codes():
    z = np.random.default_rng(3).normal(0, 0.1, (5000, 4)).astype(np.float32)
    cb = cp.fit_kmeans_levels(z)
    kmeans, uniform = cp.quant_error(z, QuantSpec("int4-kmeans", 4, cb)), cp.quant_error(z, QuantSpec("int4", 4))
    assert kmeans["mse"] < 0.2 * uniform["mse"]


@pytest.fixture(scope="module")
def extract(tmp_path_factory):
    root = tmp_path_factory.mktemp("cx")
    log = toy_event_log(root)
    fabricate_extract(log, root / "extract", dim=16, seed=2, rows_per_part=100)
    fabricate_extract(log, root / "raw", dim=24, kind="raw", seed=3)
    return root


@pytest.mark.parametrize("quantizer,dim", [("fp16", 0), ("int8", 8), ("int4", 16), ("int4-kmeans", 8)])
def test_compress_stage(extract, tmp_path, quantizer, dim, capsys):
    m = run_compress(CompressConfig(quantizer=quantizer, dim=dim), extract / "extract", tmp_path / "c")
    assert "bytes/event" in capsys.readouterr().out  # the report goes to stdout
    d = dim or 16
    width = {"fp16": 2 * d, "int8": d}.get(quantizer, d // 2)
    assert m["stage"] == "compress" and m["dim"] == d and m["bytes_per_event"] == width == m["code_bytes"]
    assert m["rows"] == 1000 and m["rows_per_day"] == {"1": 250, "2": 250, "3": 250, "4": 250}
    assert m["fit_days"] == [1, 2, 3]  # the last day is never used to fit
    assert set(m["error_sample"]) == set(cp.QUANTIZERS)
    rep = m["error_sample"]
    assert rep["int4-kmeans"]["mse"] < rep["int4"]["mse"] and rep["fp16"]["mse"] == 0.0
    assert rep["int8"]["max_abs"] <= 1 / 254 + 1e-6
    assert (m["codebook"] is not None) == (quantizer == "int4-kmeans")
    src = cf.read_codes(extract / "extract")
    out = cf.read_codes(tmp_path / "c")
    for c in cf.META_COLUMNS:
        assert out.column(c).equals(src.column(c)), c
    assert out.schema.field("code").type.byte_width == width
    z = cf.z_from_arrow(src.column("z")).astype(np.float32)[:, :d]
    spec = cp.load_spec(tmp_path / "c")
    got = decode(cf.bytes_from_arrow(out.column("code")), spec)
    np.testing.assert_array_equal(got, decode(encode(z, spec), spec))
    err = np.abs(got - z).max()
    assert err == pytest.approx(m["error_all_rows"][quantizer]["max_abs"], abs=1e-7)
    assert len(list((tmp_path / "c" / "codes" / "day=1").glob("part-*.parquet"))) == 3  # parts kept


def test_compress_raw_activations_pca_and_random(extract, tmp_path):
    for method in ("pca", "random"):
        m = run_compress(CompressConfig(quantizer="int8", dim=8, projection=method, fit_days=[1, 2]),
                         extract / "raw", tmp_path / method, progress=False)
        assert m["projection"]["method"] == method and m["source_kind"] == "raw" and m["dim"] == 8
        proj = cp.load_projection(tmp_path / method)
        assert proj.matrix.shape == (24, 8) and proj.mean.shape == (24,) and proj.scale.shape == (8,)
        assert sorted(p.name for p in (tmp_path / method / "projection").iterdir()) == \
            ["matrix.npy", "mean.npy", "scale.npy"]
        raw = cf.z_from_arrow(cf.read_codes(extract / "raw").column("z"))
        packed = cf.bytes_from_arrow(cf.read_codes(tmp_path / method).column("code"))
        got = decode(packed, cp.load_spec(tmp_path / method))
        assert np.abs(got - proj(raw)).max() <= 1 / 254 + 1e-6
    pca = cp.load_projection(tmp_path / "pca")
    y = (raw.astype(np.float32) - pca.mean) @ pca.matrix
    var = y.var(axis=0)
    assert np.all(np.diff(var) <= 1e-3 * var[0])  # PCA: largest variance first (Matryoshka prefixes)


def test_compress_sharded_equals_single(extract, tmp_path):
    cfg = CompressConfig(quantizer="int4-kmeans", dim=8)
    single = run_compress(cfg, extract / "extract", tmp_path / "one", progress=False)
    for r in range(3):
        m = run_compress(cfg, extract / "extract", tmp_path / "many", rank=r, world_size=3, progress=False)
        assert (tmp_path / "many" / MANIFEST).exists() == (r == 2)
    assert m["codebook"] == single["codebook"] and m["rows_per_day"] == single["rows_per_day"]
    assert m["error_all_rows"]["int4-kmeans"]["max_abs"] == single["error_all_rows"]["int4-kmeans"]["max_abs"]
    assert cf.read_codes(tmp_path / "many").equals(cf.read_codes(tmp_path / "one"))


def test_failed_compress_leaves_no_success(extract, tmp_path, monkeypatch):
    calls = []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(*a, **k)
    real = cf.packed_table
    monkeypatch.setattr(cf, "packed_table", flaky)
    with pytest.raises(OSError, match="disk full"):
        run_compress(CompressConfig(), extract / "extract", tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists()
    with pytest.raises(FileNotFoundError):
        read_manifest(tmp_path / "c")


def test_compress_input_and_config_errors(extract, tmp_path):
    with pytest.raises(ValueError, match="even"):
        CompressConfig(dim=7)
    with pytest.raises(ValueError, match="quantizer"):
        CompressConfig(quantizer="int2")
    with pytest.raises(ValueError, match="larger than the extract dim"):
        run_compress(CompressConfig(dim=32), extract / "extract", tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="fit_days"):
        run_compress(CompressConfig(fit_days=[9]), extract / "extract", tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="unbounded"):
        run_compress(CompressConfig(projection="none"), extract / "raw", tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="expected an extract output"):
        run_compress(CompressConfig(), extract / "events", tmp_path / "c", progress=False)


def test_codes_format_round_trips_and_hash(tmp_path):
    z = np.random.default_rng(0).uniform(-1, 1, (7, 6)).astype(np.float16)
    np.testing.assert_array_equal(cf.z_from_arrow(cf.z_to_arrow(z)), z)
    b = np.random.default_rng(0).integers(0, 256, (7, 3), dtype=np.uint8)
    arr = cf.bytes_to_arrow(b)
    np.testing.assert_array_equal(cf.bytes_from_arrow(arr), b)
    np.testing.assert_array_equal(cf.bytes_from_arrow(arr.slice(2, 3)), b[2:5])
    # SplitMix64 golden value (first output of the generator seeded with 0) and stable shards.
    assert int(cf.splitmix64(np.array([0]))[0]) == 0xE220A8397B1DCDAF
    keys = np.arange(-1000, 1000)
    s = cf.shard_of(keys, 3)
    assert set(s.tolist()) == {0, 1, 2} and np.all(s == cf.shard_of(keys.copy(), 3))
    meta = {c: np.arange(7) for c in cf.META_COLUMNS}
    p = cf.write_codes(tmp_path, 3, 0, meta, z)
    assert p == tmp_path / "codes" / "day=3" / "part-00000.parquet"
    assert pq.read_schema(p).equals(cf.extract_schema(6))


def test_part_writer_streams_the_files_a_one_shot_write_gives(tmp_path, monkeypatch):
    """Pieces of any size in, the same part files (rows, row groups) as writing each cut at once."""
    from loopfm.codes import format as fmt

    monkeypatch.setattr(fmt, "ROW_GROUP_ROWS", 16)
    rng = np.random.default_rng(0)
    n, rows_per_part = 230, 100
    meta = {c: np.arange(n) for c in cf.META_COLUMNS}
    meta["label"] = np.arange(n) % 2
    z = rng.uniform(-1, 1, (n, 6)).astype(np.float32)
    writer = cf.PartWriter(tmp_path / "stream", 4, rows_per_part=rows_per_part)
    cuts = np.unique(np.r_[0, rng.integers(0, n, 12), n])
    for s, e in zip(cuts[:-1], cuts[1:]):
        writer.write(cf.codes_table({k: v[s:e] for k, v in meta.items()}, z[s:e]))
    writer.close()
    assert writer.rows == n and writer.part == 3
    for part, s in enumerate(range(0, n, rows_per_part)):
        one = cf.write_codes(tmp_path / "one", 4, part, {k: v[s:s + rows_per_part] for k, v in meta.items()},
                             z[s:s + rows_per_part])
        streamed = tmp_path / "stream" / one.relative_to(tmp_path / "one")
        assert pq.read_table(streamed).equals(pq.read_table(one))
        groups = [pq.ParquetFile(p).metadata.row_group(i).num_rows
                  for p in (streamed, one) for i in range(pq.ParquetFile(p).metadata.num_row_groups)]
        assert groups[:len(groups) // 2] == groups[len(groups) // 2:] and max(groups) == 16
    assert sorted(p.name for p in (tmp_path / "stream" / "codes" / "day=4").iterdir()) == [
        "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    empty = cf.PartWriter(tmp_path / "empty", 4, rows_per_part=rows_per_part)
    empty.close()
    assert not (tmp_path / "empty").exists()


def test_compress_streamed_in_small_batches_equals_one_pass(extract, tmp_path, monkeypatch):
    """Parts encoded a few rows at a time (batches straddling row groups): the same files, rows and
    errors as each part in one pass."""
    from loopfm.codes import format as fmt

    cfg = CompressConfig(quantizer="int4-kmeans", dim=8)
    whole = run_compress(cfg, extract / "extract", tmp_path / "whole", progress=False)
    monkeypatch.setattr(cp, "BATCH_ROWS", 7)
    monkeypatch.setattr(fmt, "ROW_GROUP_ROWS", 16)
    small = run_compress(cfg, extract / "extract", tmp_path / "small", progress=False)
    for key in ("rows_per_day", "codebook", "error_sample"):
        assert small[key] == whole[key], key
    err_w, err_s = whole["error_all_rows"]["int4-kmeans"], small["error_all_rows"]["int4-kmeans"]
    assert err_s["max_abs"] == err_w["max_abs"] and err_s["mse"] == pytest.approx(err_w["mse"], rel=1e-12)
    for day in range(1, 5):
        a, b = cf.stage_files(tmp_path / "whole", day), cf.stage_files(tmp_path / "small", day)
        assert [p.name for p in a] == [p.name for p in b] and len(a) == 3
        for pa_, pb in zip(a, b):
            assert pq.read_table(pb).equals(pq.read_table(pa_))
            assert pq.ParquetFile(pb).metadata.row_group(0).num_rows == 16
