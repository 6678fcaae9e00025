"""TaobaoAd_x1 / DMR 267-column source: the real DMR sample, the x1 CSV layout, bad input."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from loopfm.data.errors import DataError
from loopfm.data.eventlog import EventLog
from loopfm.data.prepare import prepare
from loopfm.data.sources.taobao_x1 import TaobaoX1Config, TaobaoX1Source
from tests.conftest import SHARED_DATA

USER = ["userid", "cms_segid", "cms_group_id", "final_gender_code", "age_level", "pvalue_level",
        "shopping_level", "occupation", "new_user_class_level"]
AD = ["adgroup_id", "cate_id", "campaign_id", "customer", "brand", "price", "pid"]
START = 1_494_000_000




@pytest.fixture
def dmr() -> Path:
    path = SHARED_DATA / "taobao-samples" / "alimama_dmr_267col_500.txt"
    if not path.is_file():
        pytest.skip(f"real DMR sample {path} is absent (../shared/data is not in git)")
    return path


def dmr_rows(path: Path) -> list[list[str]]:
    return [line.rstrip("\n").split(",") for line in open(path)]


def named(fields: list[str]) -> dict[str, str]:
    return dict(zip(USER + AD, fields[250:266])) | {"clk": fields[266]}


def histories(fields: list[str]) -> dict[str, list[str]]:
    """The unmasked entries of a DMR row, in field order (oldest first, newest last)."""
    keep = [j for j in range(50) if fields[150 + j] == "1"]
    return {name: [fields[base + j] for j in keep]
            for name, base in (("hist_btag", 0), ("hist_cate", 50), ("hist_brand", 100))}


def run(tmp_path: Path, name: str = "out", chunk_rows: int = 64, allow_any_time: bool = False, **cfg) -> EventLog:
    source = TaobaoX1Source(TaobaoX1Config(**cfg), seed=0, chunk_rows=chunk_rows)
    prepare(source, tmp_path / name, config_hash="test", progress=False, allow_any_time=allow_any_time)
    return EventLog(tmp_path / name)


def decode(log: EventLog, feature: str, ids) -> list:
    """ids -> raw values ("" = missing, None = padding)."""
    spec = log.schema.feature(feature)
    cache = log.__dict__.setdefault("_test_vocab_cache", {})
    if spec.vocab_name not in cache:
        cache[spec.vocab_name] = [None] + log.vocab(spec.vocab_name).values.to_pylist()
    return [cache[spec.vocab_name][i] for i in ids]


def test_dmr_sample(tmp_path, dmr):
    rows = dmr_rows(dmr)
    log = run(tmp_path, path=str(dmr))
    t = log.read()
    assert t.num_rows == len(rows) == 500
    labels = t.column("label").to_pylist()
    assert labels == [int(r[266]) for r in rows] and sum(labels) / 500 == pytest.approx(0.42)
    # One synthetic second per row, file order kept, 8 equal-count days of 62-63 rows.
    assert t.column("ts").to_pylist() == list(range(START, START + 500))
    counts = log.manifest["rows_per_day"]
    assert sorted(counts) == [str(d) for d in range(1, 9)] and set(counts.values()) == {62, 63}
    days = t.column("day").to_numpy()
    assert np.all(np.diff(days) >= 0) and days[0] == 1 and days[-1] == 8
    for name in ("userid", "adgroup_id", "cate_id", "brand", "pvalue_level", "pid"):
        assert decode(log, name, t.column(name).to_pylist()) == [named(r)[name] for r in rows], name
    np.testing.assert_allclose(t.column("price").to_numpy(), [float(r[264]) for r in rows], rtol=1e-6)
    # Histories decode back to the file's unmasked entries, newest last.
    lengths = set()
    for i, r in enumerate(rows):
        want = histories(r)
        lengths.add(len(want["hist_cate"]))
        for name in ("hist_btag", "hist_cate", "hist_brand"):
            assert decode(log, name, t.column(name)[i].as_py()) == want[name], (i, name)
    assert {1, 2, 28, 48, 50} <= lengths  # left-padded short histories occur in the sample
    # Row 129 (line 130) has a 2-long history: the last two fields of each block.
    assert histories(rows[129])["hist_cate"] == [rows[129][98], rows[129][99]]
    schema = log.schema
    assert (schema.user_key, schema.item_key, schema.dataset) == ("userid", "adgroup_id", "taobao-x1")
    assert {f.name for f in schema.features if f.fm_only} == {"hist_btag", "hist_cate", "hist_brand"}
    assert schema.feature("hist_cate").vocab == "cate_id" and schema.feature("hist_brand").vocab == "brand"
    assert schema.feature("hist_btag").vocab is None and schema.feature("hist_btag").max_len == 50
    assert schema.vocab_sizes()["cate_id"] == schema.feature("hist_cate").vocab_size


def write_x1(rows: list[list[str]], path: Path, *, pad: bool = False) -> Path:
    """A TaobaoAd_x1-style CSV (FuxiCTR's columns, '^' lists) written from DMR rows."""
    header = ["clk", "btag_his", "cate_his", "brand_his", *USER, *AD, "btag"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        for r in rows:
            h = histories(r)
            if pad and len(h["hist_cate"]) < 50:  # DMR-style left padding with zeros
                h = {k: r[base:base + 50] for k, base in (("hist_btag", 0), ("hist_cate", 50),
                                                           ("hist_brand", 100))}
            w.writerow([r[266], "^".join(h["hist_btag"]), "^".join(h["hist_cate"]),
                        "^".join(h["hist_brand"]), *r[250:266], "1"])
    return path


def test_x1_csv_gives_the_same_event_log(tmp_path, dmr):
    rows = dmr_rows(dmr)
    x1 = write_x1(rows, tmp_path / "train.csv")
    padded = write_x1(rows, tmp_path / "padded.csv", pad=True)
    a = run(tmp_path, "a", path=str(dmr))
    b = run(tmp_path, "b", chunk_rows=7, path=str(x1))
    c = run(tmp_path, "c", chunk_rows=1000, path=str(padded))
    assert TaobaoX1Source(TaobaoX1Config(path=str(x1)), seed=0, chunk_rows=7).layout() == "x1"
    assert a.read().equals(b.read()) and a.read().equals(c.read())
    assert a.schema == b.schema == c.schema
    assert a.manifest["rows_per_day"] == b.manifest["rows_per_day"]
    for name in ("cate_id", "brand", "hist_btag", "userid"):
        assert a.vocab(name).values.equals(b.vocab(name).values)


def test_options(tmp_path, dmr):
    log = run(tmp_path, path=str(dmr), days=4, fm_only_features=[], start_ts=0, history_len=10,
              allow_any_time=True)  # the clock-less source's synthetic times may start anywhere
    assert log.manifest["rows_per_day"] == {"1": 125, "2": 125, "3": 125, "4": 125}
    assert not any(f.fm_only for f in log.schema.features)
    t = log.read()
    assert t.column("ts")[499].as_py() == 499
    full = histories(dmr_rows(dmr)[0])["hist_cate"]
    assert decode(log, "hist_cate", t.column("hist_cate")[0].as_py()) == full[-10:]  # newest kept
    with pytest.raises(ValueError, match="did you mean 'hist_cate'"):
        TaobaoX1Config(fm_only_features=["hist_cat"])
    with pytest.raises(ValueError, match="days"):
        TaobaoX1Config(days=0)


def _write_dmr(rows: list[list[str]], path: Path) -> Path:
    path.write_text("".join(",".join(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("line, field, value, column, message", [
    (7, 100, None, "clk", "expected 267 fields, got 266"),  # the row ends before clk
    (3, 264, "abc", "price", "expected a number, got 'abc'"),
    (5, 60, "x", "cate_his_10", "expected an integer, got 'x'"),
    (4, 266, "2", "clk", "expected a click label 0 or 1, got '2'"),
    (9, 170, "2", "mask_20", "expected a history mask 0 or 1, got 2"),
    (2, 259, "", "adgroup_id", "expected an integer, got an empty value"),
])
def test_bad_dmr_rows(tmp_path, dmr, line, field, value, column, message):
    rows = dmr_rows(dmr)[:40]
    if value is None:
        del rows[line - 1][field]
    else:
        rows[line - 1][field] = value
    path = _write_dmr(rows, tmp_path / "bad.txt")
    with pytest.raises(DataError) as err:
        run(tmp_path, chunk_rows=16, path=str(path))
    e = err.value
    assert message in str(e) and (e.file, e.row, e.column) == (str(path), line, column)


def test_bad_x1_files(tmp_path, dmr):
    rows = dmr_rows(dmr)[:40]
    good = write_x1(rows, tmp_path / "good.csv").read_text().splitlines()

    def attempt(lines: list[str]) -> DataError:
        path = tmp_path / "bad.csv"
        path.write_text("".join(line + "\n" for line in lines))
        with pytest.raises(DataError) as err:
            run(tmp_path, chunk_rows=16, path=str(path))
        assert err.value.file == str(path)
        return err.value

    e = attempt([good[0].replace("brand_his", "brand_hist")] + good[1:])
    assert "missing column 'brand_his'; did you mean 'brand_hist'?" in str(e) and e.row == 1
    bad = good.copy()
    bad[5] = bad[5].replace("^", "^oops^", 1)  # a non-integer entry inside a list
    e = attempt(bad)
    assert (e.row, e.column) == (6, "btag_his") and "expected an integer, got 'oops'" in str(e)
    bad = good.copy()
    bad[8] = bad[8].rsplit(",", 1)[0]
    e = attempt(bad)
    assert e.row == 9 and "expected 21 fields, got 20" in str(e)
    bad = good.copy()
    bad[3] = "2" + bad[3][1:]
    e = attempt(bad)
    assert (e.row, e.column) == (4, "clk") and "got '2'" in str(e)
    fields = next(csv.reader([good[10]]))
    fields[2] = fields[2].rsplit("^", 1)[0]  # cate_his one entry shorter than btag_his
    e = attempt(good[:10] + [",".join(fields)] + good[11:])
    assert (e.row, e.column) == (11, "cate_his") and "expected as many entries as btag_his" in str(e)
    e = attempt(["1,2,3"])
    assert e.row == 1 and "found 3 fields" in str(e)
    e = attempt([])
    assert "empty" in str(e)
    e = attempt(good[:1])
    assert "no data rows" in str(e)
