"""The events source: CSV and Parquet files described by a YAML schema, the real ML-1M and Amazon
format samples, and every bad-input case (each naming file, row and column)."""
from __future__ import annotations

import csv
from datetime import datetime, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from loopfm.data.errors import DataError
from loopfm.data.eventlog import EventLog
from loopfm.data.prepare import prepare
from loopfm.data.sources.events import EventsConfig, EventsSource
from tests.conftest import SHARED_DATA




SAMPLES = SHARED_DATA / "format-samples"
needs_samples = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"format samples not found at {SAMPLES}")

TZ = "Europe/Berlin"
FMT = "%Y-%m-%d %H:%M:%S"
SCHEMA = {
    "timestamp": {"column": "time", "strftime": FMT, "tz": TZ},
    "label": {"column": "clicked"},
    "user": "uid",
    "item": "iid",
    "features": [
        {"name": "uid", "kind": "categorical"},
        {"name": "iid", "kind": "categorical"},
        {"name": "region", "kind": "categorical", "fm_only": True},
        {"name": "price", "kind": "numeric"},
        {"name": "tags", "kind": "sequence", "sep": "|", "max_len": 4, "fm_only": True},
        {"name": "hist_iid", "kind": "sequence", "vocab": "iid", "max_len": 10, "group": "history"},
    ],
    "days": 8,
}
COLUMNS = ["time", "uid", "iid", "clicked", "region", "price", "tags", "hist_iid"]


def make_rows(n: int = 3000, seed: int = 0) -> list[dict]:
    """Events over a month that crosses the spring DST change in Berlin, not in time order."""
    rng = np.random.default_rng(seed)
    start = datetime(2021, 3, 20, tzinfo=ZoneInfo(TZ)).timestamp()
    ts = np.sort(rng.integers(int(start), int(start) + 20 * 86400, n))
    ts[::7] = ts[::7][::-1]  # some disorder
    rows = []
    for i in range(n):
        local = datetime.fromtimestamp(int(ts[i]), ZoneInfo(TZ))
        tags = [f"t{k}" for k in rng.choice(12, size=rng.integers(0, 6), replace=False)]
        rows.append({
            "ts": int(ts[i]), "time": local.strftime(FMT), "uid": int(rng.integers(1, 200)),
            "iid": int(rng.integers(1, 500)), "clicked": int(rng.random() < 0.3),
            "region": ["north", "south", "", "east"][int(rng.integers(0, 4))],
            "price": float(np.round(rng.gamma(2.0, 10.0), 3)), "tags": tags,
            "hist_iid": [int(x) for x in rng.integers(1, 500, size=rng.integers(0, 15))],
        })
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow([r["time"], r["uid"], r["iid"], r["clicked"], r["region"], r["price"],
                        "|".join(r["tags"]), "|".join(map(str, r["hist_iid"]))])


def write_parquet(path: Path, rows: list[dict]) -> None:
    table = pa.table({
        "time": [r["time"] for r in rows], "uid": [r["uid"] for r in rows],
        "iid": [r["iid"] for r in rows], "clicked": [r["clicked"] for r in rows],
        "region": [r["region"] for r in rows], "price": [r["price"] for r in rows],
        "tags": pa.array([r["tags"] for r in rows], pa.list_(pa.string())),  # a native list column
        "hist_iid": ["|".join(map(str, r["hist_iid"])) for r in rows],      # or a separated string
    })
    pq.write_table(table, path, row_group_size=700)


def write_schema(path: Path, schema: dict) -> Path:
    path.write_text(yaml.safe_dump(schema, sort_keys=False))
    return path


def source(data: Path, schema: dict | Path, tmp_path: Path, chunk_rows: int = 1000, **cfg) -> EventsSource:
    if isinstance(schema, dict):
        schema = write_schema(tmp_path / f"{data.stem}.schema.yaml", schema)
    return EventsSource(EventsConfig(input=str(data), schema=str(schema), **cfg), seed=0, chunk_rows=chunk_rows)


def run(src: EventsSource, out: Path) -> EventLog:
    prepare(src, out, config_hash="test", progress=False)
    return EventLog(out)


def decode(log: EventLog, name: str, ids) -> list[str]:
    values = log.vocab(name).values.to_pylist()
    return [values[i - 1] for i in ids]


@pytest.fixture(scope="module")
def rows():
    return make_rows()


def test_csv_and_parquet_give_the_same_log(tmp_path, rows):
    write_csv(tmp_path / "ev.csv", rows)
    write_parquet(tmp_path / "ev.parquet", rows)
    a = run(source(tmp_path / "ev.csv", SCHEMA, tmp_path, chunk_rows=777), tmp_path / "a")
    b = run(source(tmp_path / "ev.parquet", SCHEMA, tmp_path), tmp_path / "b")
    assert a.read().equals(b.read())
    for name in a.schema.vocab_sizes():
        assert a.vocab(name).values.equals(b.vocab(name).values)

    # Against the rows themselves, in (ts, input order) order.
    log = a
    assert log.num_rows() == len(rows)
    assert log.manifest["rows_per_day"] == {str(d): len(rows) // 8 for d in range(1, 9)}
    order = np.argsort([r["ts"] for r in rows], kind="stable")
    t = log.read()
    assert t["ts"].to_pylist() == [rows[i]["ts"] for i in order]  # local Berlin time -> UTC, DST included
    assert t["label"].to_pylist() == [rows[i]["clicked"] for i in order]
    assert decode(log, "uid", t["uid"].to_pylist()) == [str(rows[i]["uid"]) for i in order]
    assert decode(log, "region", t["region"].to_pylist()) == [rows[i]["region"] for i in order]
    assert np.allclose(t["price"].to_numpy(), [rows[i]["price"] for i in order], rtol=1e-6)
    tags = t["tags"].to_pylist()
    hist = t["hist_iid"].to_pylist()
    for k in range(0, len(rows), 97):
        r = rows[order[k]]
        assert decode(log, "tags", tags[k]) == r["tags"][-4:]  # newest (last) kept
        assert decode(log, "iid", hist[k]) == [str(x) for x in r["hist_iid"][-10:]]
    s = log.schema
    assert (s.user_key, s.item_key) == ("uid", "iid")
    assert s.feature("hist_iid").vocab == "iid" and s.feature("hist_iid").group == "history"
    assert s.feature("uid").role == "user" and s.feature("iid").role == "item"
    assert s.feature("region").role == "context" and s.feature("region").group == "context"
    assert [f.name for f in s.vm_features()] == ["uid", "iid", "price", "hist_iid"]


def test_parquet_native_timestamps_and_calendar_days(tmp_path, rows):
    sub = rows[:500]
    utc = [datetime.fromtimestamp(r["ts"], timezone.utc) for r in sub]
    naive_local = [datetime.fromtimestamp(r["ts"], ZoneInfo(TZ)).replace(tzinfo=None) for r in sub]
    base = {"uid": [r["uid"] for r in sub], "iid": [r["iid"] for r in sub],
            "clicked": pa.array([bool(r["clicked"]) for r in sub])}
    pq.write_table(pa.table({**base, "time": pa.array(utc, pa.timestamp("ms", tz="UTC"))}), tmp_path / "aware.parquet")
    pq.write_table(pa.table({**base, "time": pa.array(naive_local, pa.timestamp("us"))}), tmp_path / "naive.parquet")
    schema = {"timestamp": {"column": "time", "tz": TZ}, "label": {"column": "clicked"}, "user": "uid",
              "item": "iid", "days": {"by": "calendar"}}
    a = run(source(tmp_path / "aware.parquet", schema, tmp_path), tmp_path / "a")
    b = run(source(tmp_path / "naive.parquet", schema, tmp_path), tmp_path / "b")
    expected = sorted(r["ts"] for r in sub)
    assert a.read()["ts"].to_pylist() == b.read()["ts"].to_pylist() == expected
    dates = sorted({datetime.fromtimestamp(r["ts"], ZoneInfo(TZ)).date() for r in sub})
    assert a.days == [(d - dates[0]).days + 1 for d in dates]  # day 1 = first local date seen
    # user / item features were added automatically
    assert [f.name for f in a.schema.features] == ["uid", "iid"]


@needs_samples
def test_ml1m_sample(tmp_path):
    path = SAMPLES / "ml-1m_joined_200.txt"
    schema = {
        "dataset": "ml-1m-sample",
        "format": "csv",
        "timestamp": {"column": "timestamp", "unit": "s"},
        "label": {"column": "rating", "min": 4},
        "user": "user_id",
        "item": "movie_id",
        "features": [
            {"name": "user_id", "kind": "categorical"},
            {"name": "item_id", "column": "movie_id", "kind": "categorical"},
            {"name": "gender", "kind": "categorical", "role": "user", "fm_only": True, "group": "user_profile"},
            {"name": "age", "kind": "categorical", "role": "user", "fm_only": True, "group": "user_profile"},
            {"name": "occupation", "kind": "categorical", "role": "user", "fm_only": True, "group": "user_profile"},
            {"name": "zip", "kind": "categorical", "role": "user", "fm_only": True, "group": "user_profile"},
            {"name": "title", "kind": "categorical", "role": "item", "fm_only": True},
            {"name": "genres", "kind": "sequence", "sep": "|", "max_len": 6, "role": "item", "fm_only": True},
        ],
        "days": 4,
    }
    log = run(source(path, schema, tmp_path), tmp_path / "ml1m")
    with open(path, newline="") as f:
        raw = list(csv.DictReader(f))
    assert log.num_rows() == len(raw) == 200
    assert log.schema.dataset == "ml-1m-sample" and log.schema.item_key == "item_id"
    assert log.manifest["rows_per_day"] == {str(d): 50 for d in range(1, 5)}
    order = np.argsort([int(r["timestamp"]) for r in raw], kind="stable")
    t = log.read()
    assert t["label"].to_pylist() == [int(int(raw[i]["rating"]) >= 4) for i in order]
    assert decode(log, "item_id", t["item_id"].to_pylist()) == [raw[i]["movie_id"] for i in order]
    assert decode(log, "title", t["title"].to_pylist()) == [raw[i]["title"] for i in order]
    assert "Bridges of Madison County, The (1995)" in log.vocab("title").values.to_pylist()  # quoted comma
    genres = t["genres"].to_pylist()
    assert [decode(log, "genres", g) for g in genres] == [raw[i]["genres"].split("|")[-6:] for i in order]
    assert [f.name for f in log.schema.vm_features()] == ["user_id", "item_id"]

    # The same rows without a header line, tab-separated: header: false + columns + delimiter.
    names = list(raw[0].keys())
    tsv = tmp_path / "ml1m.tsv"
    tsv.write_text("".join("\t".join(r[c] for c in names) + "\n" for r in raw))
    headless = dict(schema, header=False, columns=names, delimiter="\t", quote_char=False)
    log2 = run(source(tsv, headless, tmp_path), tmp_path / "ml1m_tsv")
    assert log2.read().equals(t)


@needs_samples
def test_amazon_sample(tmp_path):
    path = SAMPLES / "amazon_electronics_sample.csv"
    schema = {
        "timestamp": {"column": "time", "unit": "s"},
        "label": {"constant": 1},  # implicit feedback: every review is a positive
        "user": "user_id",
        "item": "item_id",
        "features": [{"name": "cate_id", "kind": "categorical", "role": "item", "fm_only": True}],
        "days": {"by": "calendar", "tz": "UTC"},
    }
    log = run(source(path, schema, tmp_path, chunk_rows=30), tmp_path / "amz")
    with open(path, newline="") as f:
        raw = list(csv.DictReader(f))
    assert log.num_rows() == len(raw) == 100
    t = log.read()
    assert t["label"].to_pylist() == [1] * 100
    assert t["ts"].to_pylist() == sorted(int(r["time"]) for r in raw)
    first = min(int(r["time"]) for r in raw) // 86400
    assert sorted(set(t["day"].to_pylist())) == sorted({int(r["time"]) // 86400 - first + 1 for r in raw})
    order = np.argsort([int(r["time"]) for r in raw], kind="stable")
    assert decode(log, "cate_id", t["cate_id"].to_pylist()) == [raw[i]["cate_id"] for i in order]
    assert [f.name for f in log.schema.features] == ["user_id", "item_id", "cate_id"]


# --- bad input -----------------------------------------------------------------------------------

SMALL = {"timestamp": {"column": "ts_s", "unit": "ms"}, "label": {"column": "clicked"}, "user": "uid",
         "item": "iid", "features": [{"name": "price", "kind": "numeric"},
                                     {"name": "region", "kind": "categorical"}], "days": 2}
HEADER = "ts_s,uid,iid,clicked,price,region"
GOOD = [f"{1600000000000 + 1000 * i},{i % 7},{i % 11},{i % 2},{i * 0.5},r{i % 3}" for i in range(20)]


def bad_csv(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(lines) + ("\n" if lines else ""))
    return path


def expect_error(tmp_path, lines, row, column, what, schema=SMALL, **cfg):
    path = bad_csv(tmp_path, lines)
    with pytest.raises(DataError) as err:
        run(source(path, schema, tmp_path, chunk_rows=8, **cfg), tmp_path / "out")
    msg = str(err.value)
    assert msg.startswith(f"{path}, row {row}, column {column!r}: "), msg
    assert what in msg, msg
    assert not (tmp_path / "out").exists()
    return err.value


def with_line(k: int, text: str) -> list[str]:
    """HEADER + GOOD with physical line ``k`` (header = line 1) replaced by ``text``."""
    lines = [HEADER] + GOOD
    lines[k - 1] = text
    return lines


def test_good_small_file(tmp_path):
    log = run(source(bad_csv(tmp_path, [HEADER] + GOOD), SMALL, tmp_path, chunk_rows=8), tmp_path / "ok")
    assert log.num_rows() == 20
    assert log.read()["ts"].to_pylist() == [1600000000 + i for i in range(20)]  # ms -> s


def test_unknown_column_suggests(tmp_path):
    schema = dict(SMALL, features=SMALL["features"] + [{"name": "regoin", "kind": "categorical"}])
    expect_error(tmp_path, [HEADER] + GOOD, 1, "regoin", "no feature column 'regoin' in the header; did you mean 'region'?",
                 schema=schema)


@pytest.mark.parametrize("key,column,role", [("user", "user_id", "user key"), ("item", "item", "item key")])
def test_missing_user_or_item_column(tmp_path, key, column, role):
    hint = "; did you mean 'uid'?" if key == "user" else ""
    err = expect_error(tmp_path, [HEADER] + GOOD, 1, column, f"no {role} column {column!r} in the header{hint}",
                       schema=dict(SMALL, **{key: column}))
    assert "columns: ts_s, uid, iid" in str(err)


def test_unparsable_timestamp(tmp_path):
    expect_error(tmp_path, with_line(6, "16000000x0000,1,2,0,1.5,r1"), 6, "ts_s",
                 "expected an integer timestamp in ms, got '16000000x0000'")
    lines = [HEADER.replace("ts_s", "when")] + [f"2021-03-0{1 + i % 5} 12:00:00,1,2,0,1.0,r" for i in range(10)]
    lines[9] = "2021-03-32 12:00:00,1,2,0,1.0,r"
    schema = dict(SMALL, timestamp={"column": "when", "strftime": FMT, "tz": "Asia/Shanghai"})
    expect_error(tmp_path, lines, 10, "when", f"expected a time like {FMT!r}, got '2021-03-32 12:00:00'",
                 schema=schema)


def test_label_outside_0_1(tmp_path):
    expect_error(tmp_path, with_line(15, "1600000099000,1,2,2,1.5,r1"), 15, "clicked",
                 "expected a label 0 or 1, got '2'")
    schema = dict(SMALL, label={"column": "clicked", "min": 4})
    expect_error(tmp_path, with_line(3, "1600000099000,1,2,four,1.5,r1"), 3, "clicked",
                 "expected a number (label = value >= 4), got 'four'", schema=schema)


def test_empty_file_and_header_only(tmp_path):
    expect_error(tmp_path, [], 1, "ts_s", "the file is empty")
    expect_error(tmp_path, [HEADER], 2, "ts_s", "no data rows after the header")


def test_ragged_rows(tmp_path):
    expect_error(tmp_path, with_line(9, "1600000099000,1,2,0,1.5"), 9, "region", "expected 6 fields, got 5")
    expect_error(tmp_path, with_line(18, "1600000099000,1,2,0,1.5,r1,extra"), 18, "region",
                 "expected 6 fields, got 7 (extra fields after this column)")


def test_numeric_garbage(tmp_path):
    expect_error(tmp_path, with_line(12, "1600000099000,1,2,0,12abc,r1"), 12, "price",
                 "expected a finite number, got '12abc'")
    expect_error(tmp_path, with_line(4, "1600000099000,1,2,0,,r1"), 4, "price",
                 "expected a finite number, got an empty value")
    # with `missing:` an empty cell is filled, garbage still is an error
    schema = dict(SMALL, features=[{"name": "price", "kind": "numeric", "missing": -1.0}])
    log = run(source(bad_csv(tmp_path, with_line(4, "1600000002000,1,2,0,,r1")), schema, tmp_path), tmp_path / "m")
    assert log.read()["price"].to_pylist()[2] == -1.0


def test_rows_are_physical_lines(tmp_path):
    """Blank lines count, and a late error is reported in a later chunk with its real line."""
    lines = [HEADER] + GOOD[:5] + [""] + GOOD[5:] + ["", "1600000099000,1,2,0,oops,r1"]
    expect_error(tmp_path, lines, 24, "price", "got 'oops'")


def test_parquet_rows(tmp_path):
    n = 50
    table = pa.table({"ts_s": pa.array([1600000000000 + i for i in range(n)]),
                      "uid": list(range(n)), "iid": list(range(n)), "clicked": [0] * n,
                      "price": [str(i) for i in range(n - 1)] + ["n/a"], "region": ["x"] * n})
    path = tmp_path / "bad.parquet"
    pq.write_table(table, path, row_group_size=16)
    with pytest.raises(DataError) as err:
        run(source(path, SMALL, tmp_path, chunk_rows=16), tmp_path / "out")
    assert str(err.value).startswith(f"{path}, row 50, column 'price': expected a finite number, got 'n/a'")
    table = table.set_column(3, "clicked", pa.array([0] * 20 + [3] + [0] * (n - 21)))
    pq.write_table(table, path)
    with pytest.raises(DataError, match=r"row 21, column 'clicked': expected a label 0 or 1, got 3"):
        run(source(path, SMALL, tmp_path, chunk_rows=16), tmp_path / "out")
    pq.write_table(table.slice(0, 0), path)
    with pytest.raises(DataError, match=r"row 1, column 'ts_s': no data rows"):
        run(source(path, SMALL, tmp_path), tmp_path / "out")
    with pytest.raises(DataError, match=r"column 'uidd': no feature column 'uidd' in the Parquet schema; did you mean 'uid'"):
        source(path, dict(SMALL, features=[{"name": "uidd", "kind": "categorical"}]), tmp_path)


def test_skip_bad_rows(tmp_path):
    lines = [HEADER] + GOOD
    lines[3] = "1600000099000,1,2,0,1.5"          # ragged
    lines[5] = "nope,1,2,0,1.5,r1"               # timestamp
    lines[7] = "1600000099000,1,2,7,1.5,r1"      # label
    lines[9] = "1600000099000,1,2,1,abc,r1"      # number
    src = source(bad_csv(tmp_path, lines), SMALL, tmp_path, chunk_rows=8, skip_bad_rows=True)
    log = run(src, tmp_path / "skip")
    assert log.num_rows() == 16
    assert log.manifest["skipped_rows"] == {"ragged_row": 1, "bad_timestamp": 1, "bad_label": 1, "bad_number": 1}


def test_deterministic(tmp_path, rows):
    write_csv(tmp_path / "ev.csv", rows[:1000])
    logs = [run(source(tmp_path / "ev.csv", SCHEMA, tmp_path, chunk_rows=300), tmp_path / f"d{k}") for k in (0, 1)]
    for a, b in zip(logs[0].files(), logs[1].files()):
        assert a.read_bytes() == b.read_bytes()


# --- the schema and config ------------------------------------------------------------------------

@pytest.mark.parametrize("edit,message", [
    (lambda s: s["features"][3].update(kind="cat"),
     "features[3].kind: 'cat' is not one of categorical|numeric|sequence|history; did you mean 'categorical'?"),
    (lambda s: s["features"][2].update(fmonly=True), "features[2].fmonly: unknown key; did you mean 'fm_only'?"),
    (lambda s: s.update(lable={"column": "clicked"}), "lable: unknown key; did you mean 'label'?"),
    (lambda s: s["timestamp"].update(tz="Europe/Berln"),
     "timestamp.tz: unknown time zone 'Europe/Berln'; did you mean 'Europe/Berlin'?"),
    (lambda s: s["timestamp"].update(unit="s"), "timestamp.unit: give either unit"),
    (lambda s: s["features"][5].update(vocab="iidd"), "features[5].vocab: 'iidd' is not another feature; did you mean 'iid'?"),
    (lambda s: s["features"][3].update(sep=","), "features[3].sep: only for sequence features"),
    (lambda s: s["features"][4].update(max_len=0), "features[4].max_len: expected an integer >= 1, got 0"),
    (lambda s: s["features"][2].update(role="usr"), "features[2].role: 'usr' is not one of user|item|context; did you mean 'user'?"),
    (lambda s: s["features"][2].update(name="label"), "features[2].name: 'label' is reserved"),
    (lambda s: s.update(days={"by": "calender"}), "days.by: 'calender' is not one of equal_count|calendar"),
    (lambda s: s.update(label={"constant": 2}), "label.constant: expected 0 or 1, got 2"),
    (lambda s: s.update(delimiter="\n"), "delimiter: expected a field separator without line breaks"),
    (lambda s: s.update(header=False), "columns: a CSV with header: false needs `columns`"),
    (lambda s: s["features"].append({"name": "uid", "kind": "numeric"}), "features[6].name: duplicate feature name 'uid'"),
])
def test_schema_errors(tmp_path, rows, edit, message):
    write_csv(tmp_path / "ev.csv", rows[:10])
    schema = yaml.safe_load(yaml.safe_dump(SCHEMA))
    edit(schema)
    path = write_schema(tmp_path / "s.yaml", schema)
    with pytest.raises(DataError) as err:
        source(tmp_path / "ev.csv", path, tmp_path)
    assert str(err.value).startswith(f"{path}: "), str(err.value)
    assert message in str(err.value), str(err.value)


def test_config_checks(tmp_path):
    with pytest.raises(ValueError, match=r"data\.events\.input .*--input FILE"):
        EventsSource(EventsConfig(schema="s.yaml"), seed=0, chunk_rows=10)
    with pytest.raises(ValueError, match=r"data\.events\.schema .*--schema SCHEMA\.yaml"):
        EventsSource(EventsConfig(input="x.csv"), seed=0, chunk_rows=10)
    with pytest.raises(DataError, match="input file not found"):
        EventsSource(EventsConfig(input=str(tmp_path / "x.csv"), schema="s.yaml"), seed=0, chunk_rows=10)
    path = bad_csv(tmp_path, [HEADER] + GOOD)
    with pytest.raises(DataError, match="schema file not found"):
        EventsSource(EventsConfig(input=str(path), schema=str(tmp_path / "none.yaml")), seed=0, chunk_rows=10)
