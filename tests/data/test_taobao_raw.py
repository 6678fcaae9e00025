"""The raw Tianchi TaobaoAd source: joined sample, folder layout, behaviour log, bad input."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from loopfm.data.errors import DataError
from loopfm.data.eventlog import EventLog
from loopfm.data.prepare import prepare
from loopfm.data.sources.taobao_raw import TaobaoRawConfig, TaobaoRawSource
from tests.conftest import SHARED_DATA

PROFILE = ["cms_segid", "cms_group_id", "final_gender_code", "age_level", "pvalue_level",
           "shopping_level", "occupation", "new_user_class_level"]
AD = ["cate_id", "campaign_id", "customer", "brand", "price"]
DAY1 = 1_494_000_000  # 2017-05-06 00:00:00 in Asia/Shanghai (2017-05-05 16:00:00 UTC)




@pytest.fixture
def sample() -> Path:
    path = SHARED_DATA / "taobao-samples" / "taobao_raw_joined_100.csv"
    if not path.is_file():
        pytest.skip(f"real TaobaoAd sample {path} is absent (../shared/data is not in git)")
    return path


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    return path


def run(tmp_path: Path, name: str = "out", chunk_rows: int = 7, **cfg) -> EventLog:
    source = TaobaoRawSource(TaobaoRawConfig(**cfg), seed=0, chunk_rows=chunk_rows)
    prepare(source, tmp_path / name, config_hash="test", progress=False)
    return EventLog(tmp_path / name)


def decode(log: EventLog, feature: str, ids) -> list:
    """ids -> raw values as the CSV spells them ("" = missing, None = padding)."""
    spec = log.schema.feature(feature)
    cache = log.__dict__.setdefault("_test_vocab_cache", {})
    if spec.vocab_name not in cache:
        values = log.vocab(spec.vocab_name).values.to_pylist()  # null entry = missing value
        cache[spec.vocab_name] = [None] + ["" if v is None else v for v in values]
    return [cache[spec.vocab_name][i] for i in ids]


def to_unix(stamp: str) -> int:
    """'2017-05-06 HH:MM:SS' (Shanghai wall time) -> unix seconds, by hand."""
    day, clock = stamp.split(" ")
    assert day.startswith("2017-05-")
    h, m, s = (int(x) for x in clock.split(":"))
    return DAY1 + (int(day[-2:]) - 6) * 86400 + h * 3600 + m * 60 + s


def consistent(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """The sample repeats a few adgroup_ids with different ad fields (it is FuxiCTR's tiny test
    file, not a true join); a real ad_feature.csv has one row per ad, so keep the first."""
    first: dict[str, dict[str, str]] = {}
    out = []
    for r in rows:
        ad = first.setdefault(r["adgroup_id"], r)
        out.append({**r, **{c: ad[c] for c in AD}})
    return out


def split_layout(rows: list[dict[str, str]], folder: Path, *, drop_ad: str | None = None,
                 drop_user: str | None = None) -> Path:
    """Write raw_sample.csv / ad_feature.csv / user_profile.csv as Tianchi ships them."""
    folder.mkdir(parents=True, exist_ok=True)
    write_csv(folder / "raw_sample.csv", ["user", "time_stamp", "adgroup_id", "pid", "nonclk", "clk"],
              [[r["userid"], to_unix(r["time_stamp"]), r["adgroup_id"], r["pid"], 1 - int(r["clk"]),
                r["clk"]] for r in rows])
    ads = {r["adgroup_id"]: [r[c] or "NULL" if c == "brand" else r[c] for c in AD] for r in rows}
    write_csv(folder / "ad_feature.csv", ["adgroup_id", *AD],
              [[k, *v] for k, v in sorted(ads.items(), reverse=True) if k != drop_ad])
    users = {r["userid"]: [r[c] for c in PROFILE] for r in rows}
    header = ["userid", *PROFILE[:-1], "new_user_class_level "]  # the real header's trailing space
    write_csv(folder / "user_profile.csv", header,
              [[k, *v] for k, v in users.items() if k != drop_user])
    return folder


def test_joined_sample(tmp_path, sample):
    rows = read_rows(sample)
    source = TaobaoRawSource(TaobaoRawConfig(path=str(sample)), seed=0, chunk_rows=7)
    sizes = [c.num_rows for c in source.chunks()]
    assert sizes == [7] * 14 + [2]  # chunk_rows is honoured exactly
    log = run(tmp_path, path=str(sample))
    t = log.read()
    assert t.num_rows == len(rows) == 100 and log.manifest["skipped_rows"] == {}
    # The file is in time order, so the event log keeps its order.
    assert t.column("label").to_pylist() == [int(r["clk"]) for r in rows]
    assert sum(t.column("label").to_pylist()) == 4
    assert t.column("ts").to_pylist() == [to_unix(r["time_stamp"]) for r in rows]
    # Hand check: '2017-05-06 00:00:00' is Shanghai midnight = 1494000000, day 1; all 100 rows lie
    # within the first three seconds of 2017-05-06 (Shanghai), so there is one day.
    assert rows[0]["time_stamp"] == "2017-05-06 00:00:00" and t.column("ts")[0].as_py() == DAY1
    assert rows[-1]["time_stamp"] == "2017-05-06 00:00:02" and t.column("ts")[99].as_py() == DAY1 + 2
    assert set(t.column("day").to_pylist()) == {1} and log.manifest["rows_per_day"] == {"1": 100}
    for name in ("userid", "adgroup_id", "pid", "brand", "pvalue_level", "new_user_class_level", "cate_id"):
        assert decode(log, name, t.column(name).to_pylist()) == [r[name] for r in rows], name
    assert sum(r["pvalue_level"] == "" for r in rows) == 60  # empty pvalue_level -> missing value ""
    np.testing.assert_allclose(t.column("price").to_numpy(), [math.log1p(float(r["price"])) for r in rows],
                               rtol=1e-6)
    schema = log.schema
    assert (schema.user_key, schema.item_key, schema.dataset) == ("userid", "adgroup_id", "taobao-raw")
    assert [f.name for f in schema.features if f.fm_only] == []
    assert {f.name: f.role for f in schema.features}["pid"] == "context"
    assert schema.feature("price").kind == "numeric"
    assert source.info().days.kind == "calendar" and source.info().days.tz == "Asia/Shanghai"


def test_calendar_days_cut_at_shanghai_midnight(tmp_path, sample):
    rows = read_rows(sample)
    hours = list(range(0, 100))  # row i at 2017-05-06 00:00 + i hours, Shanghai wall time
    for r, h in zip(rows, hours):
        r["time_stamp"] = f"2017-05-{6 + h // 24:02d} {h % 24:02d}:00:00"
    path = write_csv(tmp_path / "joined.csv", list(rows[0]), [list(r.values()) for r in rows])
    log = run(tmp_path, path=str(path), price_transform="none")
    t = log.read()
    assert t.column("ts").to_pylist() == [DAY1 + 3600 * h for h in hours]
    # Hand check: 23:00 on 05-06 (15:00 UTC) is day 1, 00:00 on 05-07 (16:00 UTC, the same UTC
    # date) is day 2, 07:00 on 05-07 (still 05-06 23:00 UTC) is day 2 as well.
    day = dict(zip(hours, t.column("day").to_pylist()))
    assert (day[23], day[24], day[31], day[47], day[48]) == (1, 2, 2, 2, 3)
    assert day == {h: h // 24 + 1 for h in hours}
    assert log.manifest["rows_per_day"] == {"1": 24, "2": 24, "3": 24, "4": 24, "5": 4}
    np.testing.assert_allclose(t.column("price").to_numpy(), [float(r["price"]) for r in rows], rtol=1e-6)


def test_folder_layout_gives_the_same_event_log(tmp_path, sample):
    rows = consistent(read_rows(sample))
    joined = write_csv(tmp_path / "joined.csv", list(rows[0]), [list(r.values()) for r in rows])
    folder = split_layout(rows, tmp_path / "tianchi")
    a = run(tmp_path, "a", chunk_rows=1000, path=str(joined))
    b = run(tmp_path, "b", chunk_rows=7, path=str(folder))
    assert a.read().equals(b.read())
    assert a.schema == b.schema and a.manifest["rows_per_day"] == b.manifest["rows_per_day"]
    for name in ("userid", "adgroup_id", "brand", "cms_segid", "pid"):
        assert a.vocab(name).values.equals(b.vocab(name).values)
    # The user whose profile is all empty is kept with missing profile values.
    t = b.read()
    blank = [i for i, r in enumerate(rows) if r["userid"] == "693616"]
    assert blank and all(decode(b, "cms_segid", [t.column("cms_segid")[i].as_py()]) == [""] for i in blank)


def test_missing_ad_or_user_is_an_error_or_skipped(tmp_path, sample):
    rows = consistent(read_rows(sample))
    folder = split_layout(rows, tmp_path / "tianchi", drop_ad="170301", drop_user="514836")
    with pytest.raises(DataError) as err:
        run(tmp_path, path=str(folder))
    first_ad = next(i for i, r in enumerate(rows) if r["adgroup_id"] == "170301")
    assert err.value.file.endswith("raw_sample.csv") and err.value.row == first_ad + 2
    assert err.value.column == "adgroup_id" and "170301 is not in ad_feature.csv" in str(err.value)
    assert "skip_missing" in str(err.value)

    log = run(tmp_path, path=str(folder), skip_missing=True)
    n_ad = sum(r["adgroup_id"] == "170301" for r in rows)
    n_user = sum(r["userid"] == "514836" and r["adgroup_id"] != "170301" for r in rows)
    assert n_ad == 3 and n_user >= 1
    assert log.manifest["skipped_rows"] == {"missing_ad": n_ad, "missing_user": n_user}
    kept = [r for r in rows if r["adgroup_id"] != "170301" and r["userid"] != "514836"]
    t = log.read()
    assert t.num_rows == len(kept)
    assert decode(log, "adgroup_id", t.column("adgroup_id").to_pylist()) == [r["adgroup_id"] for r in kept]

    only_user = split_layout(rows, tmp_path / "tianchi2", drop_user="514836")
    with pytest.raises(DataError, match="user 514836 is not in user_profile.csv") as err:
        run(tmp_path, path=str(only_user))
    assert err.value.row == next(i for i, r in enumerate(rows) if r["userid"] == "514836") + 2


def make_behavior_log(rows: list[dict[str, str]], path: Path, n: int = 240) -> list[list]:
    """A small behaviour log around the sample's impressions, with ties, late events, NULLs."""
    rng = np.random.default_rng(7)
    users = sorted({r["userid"] for r in rows})[:12] + ["999999999"]  # plus a user with no impressions
    cates = sorted({r["cate_id"] for r in rows})[:6] + ["77777"]
    brands = ["NULL", "339907", "158849", "88888"]
    events = []
    for _ in range(n):
        ts = DAY1 + int(rng.choice([-5000, -60, -3, -1, 0, 1, 2, 3])) + int(rng.integers(0, 2))
        events.append([str(rng.choice(users)), ts, str(rng.choice(["pv", "cart", "fav", "buy"])),
                       str(rng.choice(cates)), str(rng.choice(brands))])
    write_csv(path, ["user", "time_stamp", "btag", "cate", "brand"], events)
    return events


def test_behavior_histories_point_in_time(tmp_path, sample):
    rows = consistent(read_rows(sample))
    folder = split_layout(rows, tmp_path / "tianchi")
    events = make_behavior_log(rows, folder / "behavior_log.csv")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    log = run(tmp_path, path=str(folder), behavior_log=True, history_len=5, behavior_shards=3,
              work_dir=str(scratch))
    assert list(scratch.iterdir()) == []  # the shards are removed afterwards
    t = log.read()
    longest = 0
    for i, r in enumerate(rows):
        t_imp = to_unix(r["time_stamp"])
        past = [e for e in events if e[0] == r["userid"] and e[1] < t_imp]  # file order kept on ties
        past = sorted(past, key=lambda e: e[1])[-5:]
        longest = max(longest, len(past))
        for name, k in (("hist_btag", 2), ("hist_cate", 3), ("hist_brand", 4)):
            got = decode(log, name, t.column(name)[i].as_py())
            assert got == [e[k] if e[k] != "NULL" else "" for e in past], (i, name)
    assert longest == 5  # truncation to the newest history_len is exercised
    schema = log.schema
    assert {f.name for f in schema.features if f.fm_only} == {"hist_btag", "hist_cate", "hist_brand"}
    assert schema.feature("hist_cate").vocab == "cate_id" and schema.feature("hist_brand").vocab == "brand"
    assert schema.feature("hist_btag").max_len == 5
    # A different shard count and chunking give the same event log.
    other = run(tmp_path, "other", chunk_rows=100, path=str(folder), behavior_log=True, history_len=5,
                behavior_shards=1)
    assert other.read().equals(t)


def test_fm_only_option_and_config_checks(tmp_path, sample):
    log = run(tmp_path, path=str(sample), fm_only_features=["pid", "price"])
    assert {f.name for f in log.schema.features if f.fm_only} == {"pid", "price"}
    with pytest.raises(ValueError, match="did you mean 'brand'"):
        TaobaoRawConfig(fm_only_features=["brnd"])
    with pytest.raises(ValueError, match="hist_cate"):  # histories exist only with behavior_log
        TaobaoRawConfig(fm_only_features=["hist_cate"])
    with pytest.raises(ValueError, match="folder layout"):
        run(tmp_path, path=str(sample), behavior_log=True)
    with pytest.raises(ValueError, match="time zone"):
        TaobaoRawConfig(timezone="Mars/Olympus")


def test_deterministic_output(tmp_path, sample):
    a, b = run(tmp_path, "a", path=str(sample)), run(tmp_path, "b", path=str(sample))
    files_a, files_b = a.files(), b.files()
    assert [p.read_bytes() for p in files_a] == [p.read_bytes() for p in files_b]
    vocab = "vocab/userid.parquet"
    assert pq.read_table(a.root / vocab).equals(pq.read_table(b.root / vocab))


def _edit(sample: Path, tmp_path: Path, line: int, column: str | None, value: str | None,
          header: dict[str, str] | None = None) -> Path:
    """A copy of the sample with one field of one line changed (or the field removed)."""
    rows = list(csv.reader(open(sample, newline="")))
    names = rows[0]
    if header:
        rows[0] = [header.get(n, n) for n in names]
    if column is not None:
        k = names.index(column)
        if value is None:
            del rows[line - 1][k]
        else:
            rows[line - 1][k] = value
    path = tmp_path / "bad.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)
    return path


@pytest.mark.parametrize("line, column, value, header, row, message", [
    (1, None, None, {"clk": "clik"}, 1, "missing column 'clk'; did you mean 'clik'?"),
    (5, "price", None, None, 5, "expected 19 fields, got 18"),
    (4, "price", "abc", None, 4, "expected a number, got 'abc'"),
    (9, "price", "-3", None, 9, "expected a non-negative price, got -3.0"),
    (6, "clk", "2", None, 6, "expected a click label 0 or 1, got '2'"),
    (3, "time_stamp", "2017-13-45 25:00:00", None, 3, "expected a unix timestamp in seconds or a"),
    (7, "adgroup_id", "12a", None, 7, "expected an integer, got '12a'"),
    (8, "userid", "", None, 8, "expected an integer, got an empty value"),
])
def test_bad_joined_file(tmp_path, sample, line, column, value, header, row, message):
    path = _edit(sample, tmp_path, line, column, value, header)
    with pytest.raises(DataError) as err:
        run(tmp_path, path=str(path))
    e = err.value
    assert message in str(e) and e.row == row and e.file == str(path)
    assert e.column == (column or "clk") or message.startswith("expected 19 fields")


def test_bad_folder_files(tmp_path, sample):
    rows = consistent(read_rows(sample))
    folder = split_layout(rows, tmp_path / "tianchi")
    ad_lines = (folder / "ad_feature.csv").read_text().splitlines()
    # Non-numeric price in ad_feature.csv names that file, line and column.
    bad = ad_lines.copy()
    bad[3] = bad[3].rsplit(",", 1)[0] + ",cheap"
    (folder / "ad_feature.csv").write_text("\n".join(bad) + "\n")
    with pytest.raises(DataError, match="expected a number, got 'cheap'") as err:
        run(tmp_path, path=str(folder))
    assert err.value.file.endswith("ad_feature.csv") and (err.value.row, err.value.column) == (4, "price")
    # A duplicate ad.
    (folder / "ad_feature.csv").write_text("\n".join(ad_lines + [ad_lines[2]]) + "\n")
    with pytest.raises(DataError, match="duplicate adgroup_id") as err:
        run(tmp_path, path=str(folder))
    assert err.value.row == len(ad_lines) + 1
    # An empty user_profile.csv, and a header-only one.
    (folder / "ad_feature.csv").write_text("\n".join(ad_lines) + "\n")
    (folder / "user_profile.csv").write_text("")
    with pytest.raises(DataError, match="empty"):
        run(tmp_path, path=str(folder))
    (folder / "user_profile.csv").write_text("userid," + ",".join(PROFILE) + "\n")
    with pytest.raises(DataError, match="no data rows"):
        run(tmp_path, path=str(folder))
    # A misspelled raw_sample column is suggested.
    raw = (folder / "raw_sample.csv").read_text().replace("adgroup_id", "adgroupid", 1)
    split_layout(rows, folder)
    (folder / "raw_sample.csv").write_text(raw)
    with pytest.raises(DataError, match="missing column 'adgroup_id'; did you mean 'adgroupid'"):
        run(tmp_path, path=str(folder))
    with pytest.raises(DataError, match="no such file"):
        run(tmp_path, path=str(tmp_path / "nowhere"))
