"""The movielens source on the real MovieLens-100K copy (RecBole layout) and on a GroupLens-layout
conversion written by the test; error cases on small bad copies."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from loopfm.data.errors import DataError
from loopfm.data.eventlog import EventLog
from loopfm.data.prepare import prepare
from loopfm.data.sources.movielens import GENRES, MovieLensConfig, MovieLensSource
from tests.conftest import SHARED_DATA




ML = SHARED_DATA / "movielens-100k"
pytestmark = pytest.mark.skipif(not (ML / "ml-100k.inter").is_file(),
                                reason=f"MovieLens-100K copy not found at {ML}")


def read_raw() -> dict:
    """The RecBole files parsed with plain Python (the ground truth)."""
    def rows(name):
        lines = (ML / name).read_text().splitlines()
        return lines[0].split("\t"), [line.split("\t") for line in lines[1:]]
    _, inter = rows("ml-100k.inter")
    _, users = rows("ml-100k.user")
    _, items = rows("ml-100k.item")
    return {"inter": inter, "users": {r[0]: r for r in users}, "items": {r[0]: r for r in items}}


@pytest.fixture(scope="module")
def raw():
    return read_raw()


@pytest.fixture(scope="module")
def full_log(tmp_path_factory):
    out = tmp_path_factory.mktemp("ml") / "prepared"
    src = MovieLensSource(MovieLensConfig(path=str(ML)), seed=0, chunk_rows=30_000)
    assert src.layout == "recbole"
    prepare(src, out, config_hash="test", progress=False)
    return EventLog(out)


_VOCABS: dict[tuple[Path, str], list[str]] = {}


def decode(log: EventLog, name: str, ids) -> list[str | None]:
    """Raw values of vocabulary ids (None for padding / OOV)."""
    key = (log.root, name)
    if key not in _VOCABS:
        _VOCABS[key] = log.vocab(name).values.to_pylist()
    values = _VOCABS[key]
    return [None if i == 0 or i > len(values) else values[i - 1] for i in ids]


def time_order(inter: list[list[str]]) -> np.ndarray:
    """File rows in event-log order: by (timestamp, file order)."""
    return np.argsort(np.array([int(r[3]) for r in inter]), kind="stable")


def test_real_counts_labels_days(full_log, raw):
    log, inter = full_log, raw["inter"]
    assert log.num_rows() == 100_000
    assert log.manifest["rows_per_day"] == {str(d): 12_500 for d in range(1, 9)}
    assert log.schema.vocab_sizes()["user_id"] == 943 + 2
    assert log.schema.vocab_sizes()["item_id"] == 1682 + 2
    t = log.read(columns=["example_id", "ts", "day", "label", "user_id", "item_id"])
    label = t["label"].to_numpy()
    assert abs(label.mean() - 0.55) < 0.01
    assert (np.diff(t["example_id"].to_numpy()) == 1).all()
    assert (np.diff(t["ts"].to_numpy()) >= 0).all()
    order = time_order(inter)
    assert (t["ts"].to_numpy() == np.array([int(inter[i][3]) for i in order])).all()
    assert (label == np.array([float(inter[i][2]) >= 4 for i in order])).all()
    users = decode(log, "user_id", t["user_id"].to_numpy())
    items = decode(log, "item_id", t["item_id"].to_numpy())
    assert users == [inter[i][0] for i in order]
    assert items == [inter[i][1] for i in order]
    # Only the ids are visible to vertical models.
    assert [f.name for f in log.schema.vm_features()] == ["user_id", "item_id"]


def test_side_features(full_log, raw):
    log = full_log
    t = log.read(columns=["user_id", "item_id", "age", "gender", "occupation", "zip",
                          "release_year", "genres"]).slice(0, 2000).to_pylist()
    lows = [(56, "56+"), (50, "50-55"), (45, "45-49"), (35, "35-44"), (25, "25-34"), (18, "18-24"), (0, "under 18")]
    for r in t[::37]:
        uid, iid = decode(log, "user_id", [r["user_id"]])[0], decode(log, "item_id", [r["item_id"]])[0]
        _, age, gender, occupation, zipc = raw["users"][uid]
        _, _, year, cls = raw["items"][iid]
        assert decode(log, "gender", [r["gender"]]) == [gender]
        assert decode(log, "occupation", [r["occupation"]]) == [occupation]
        assert decode(log, "zip", [r["zip"]]) == [zipc[0].upper()]
        got_age = decode(log, "age", [r["age"]])[0]
        a = int(age)
        expected = next(name for low, name in lows if a >= low)
        assert got_age == expected
        got_year = decode(log, "release_year", [r["release_year"]])[0]
        assert got_year == (year if year.isdigit() else "")  # missing -> "" entry
        assert sorted(decode(log, "genres", r["genres"])) == sorted(cls.split())
        assert decode(log, "genres", r["genres"]) == [g for g in GENRES if g in cls.split()]


def test_history_brute_force(full_log, raw):
    log, inter = full_log, raw["inter"]
    order = time_order(inter)
    spec = log.schema.feature("hist_item_id")
    assert spec.vocab == "item_id" and spec.max_len == 50 and spec.fm_only
    ts_all = [int(r[3]) for r in inter]
    by_user: dict[str, list[tuple[int, int]]] = {}  # user -> [(ts, file row)] in (ts, file order)
    for i, r in enumerate(inter):
        by_user.setdefault(r[0], []).append((ts_all[i], i))
    for events in by_user.values():
        events.sort()
    rng = random.Random(0)
    sample = rng.sample(range(len(inter)), 400) + [0, len(inter) - 1]
    t = log.read(columns=["hist_item_id", "hist_rating"]).take(sample)
    hist_items, hist_ratings = t["hist_item_id"].to_pylist(), t["hist_rating"].to_pylist()
    item_values = log.vocab("item_id").values.to_pylist()  # hist ids decode through item_id's vocab
    rating_values = log.vocab("hist_rating").values.to_pylist()
    lengths, ties = [], 0
    for k, items, ratings in zip(sample, hist_items, hist_ratings):
        i = order[k]
        u, ts = inter[i][0], ts_all[i]
        prior = [e for e in by_user[u] if e[0] < ts][-50:]  # strictly earlier, newest last
        ties += sum(1 for e in by_user[u] if e[0] == ts and e[1] != i) > 0
        assert [item_values[x - 1] for x in items] == [inter[j][1] for _, j in prior]
        assert [rating_values[x - 1] for x in ratings] == [inter[j][2] for _, j in prior]
        lengths.append(len(items))
    assert max(lengths) == 50 and min(lengths) == 0
    assert ties > 20  # the sample covers many same-second ties (excluded from each other's history)


def _write_copies(tmp_path: Path, raw: dict, n: int) -> tuple[Path, Path]:
    """The first ``n`` ratings in both layouts: RecBole (as in the shared copy) and GroupLens."""
    inter_lines = (ML / "ml-100k.inter").read_text().splitlines()[: n + 1]
    rb = tmp_path / "recbole"
    rb.mkdir()
    (rb / "ml-100k.inter").write_text("\n".join(inter_lines) + "\n")
    for ext in ("user", "item"):
        (rb / f"ml-100k.{ext}").write_text((ML / f"ml-100k.{ext}").read_text())
    gl = tmp_path / "grouplens"
    gl.mkdir()
    (gl / "u.data").write_text("".join("\t".join(r) + "\n" for r in raw["inter"][:n]))
    (gl / "u.user").write_text("".join("|".join(r) + "\n" for r in raw["users"].values()))
    item_lines = []
    for iid, title, year, cls in raw["items"].values():
        date = f"01-Jan-{year}" if year.isdigit() else ""
        flags = ["1" if g in cls.split() else "0" for g in GENRES]
        item_lines.append("|".join([iid, f"{title} ({year})", date, "", "http://example.org/x"] + flags))
    (gl / "u.item").write_bytes(("\n".join(item_lines) + "\n").encode("latin-1"))
    return rb, gl


@pytest.fixture
def copies(tmp_path, raw):
    return _write_copies(tmp_path, raw, 3000)


def _prepare(path: Path, out: Path, **cfg) -> EventLog:
    src = MovieLensSource(MovieLensConfig(path=str(path), **cfg), seed=0, chunk_rows=1000)
    prepare(src, out, config_hash="test", progress=False)
    return EventLog(out)


def test_grouplens_layout_gives_the_same_log(tmp_path, copies):
    rb, gl = copies
    assert MovieLensSource(MovieLensConfig(path=str(gl)), seed=0, chunk_rows=10).layout == "grouplens"
    a = _prepare(rb, tmp_path / "a")
    b = _prepare(gl, tmp_path / "b", layout="grouplens")
    assert a.num_rows() == b.num_rows() == 3000
    assert a.read().equals(b.read())
    for name in a.schema.vocab_sizes():
        assert a.vocab(name).values.equals(b.vocab(name).values), name
    assert a.manifest["rows_per_day"] == b.manifest["rows_per_day"]


def test_options(tmp_path, copies):
    rb, _ = copies
    log = _prepare(rb, tmp_path / "o", history_len=5, history_value="label", age="raw", zip_prefix=3,
                   label_min_rating=5, days=3)
    assert log.days == [1, 2, 3]
    names = [f.name for f in log.schema.features]
    assert "hist_label" in names and "hist_rating" not in names
    t = log.read(columns=["label", "hist_item_id", "hist_label", "age", "zip"])
    lens = [len(h) for h in t["hist_label"].to_pylist()]
    assert max(lens) == 5
    assert set(log.vocab("hist_label").values.to_pylist()) == {"0", "1"}
    assert set(log.vocab("age").values.to_pylist()) <= {str(a) for a in range(1, 100)}
    assert all(len(z) <= 3 for z in log.vocab("zip").values.to_pylist())
    assert 0 < t["label"].to_numpy().mean() < 0.3  # rating == 5 only
    off = _prepare(rb, tmp_path / "off", history_len=0)
    assert "hist_item_id" not in [f.name for f in off.schema.features]
    with pytest.raises(ValueError, match="history_len"):
        MovieLensConfig(history_len=-1)


def _edit_line(path: Path, line: int, new: str) -> None:
    lines = path.read_text().splitlines()
    lines[line - 1] = new
    path.write_text("\n".join(lines) + "\n")


def test_missing_files(tmp_path, copies):
    rb, gl = copies
    (gl / "u.user").unlink()
    with pytest.raises(DataError, match=r"u\.user.*missing file for the grouplens layout"):
        MovieLensSource(MovieLensConfig(path=str(gl)), seed=0, chunk_rows=10)
    (rb / "ml-100k.item").unlink()
    with pytest.raises(DataError, match=r"ml-100k\.item.*missing file for the recbole layout"):
        MovieLensSource(MovieLensConfig(path=str(rb)), seed=0, chunk_rows=10)
    with pytest.raises(DataError, match=r"missing file for the recbole layout"):
        MovieLensSource(MovieLensConfig(path=str(gl), layout="recbole"), seed=0, chunk_rows=10)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no MovieLens files"):
        MovieLensSource(MovieLensConfig(path=str(tmp_path / "empty")), seed=0, chunk_rows=10)
    with pytest.raises(DataError, match="folder not found"):
        MovieLensSource(MovieLensConfig(path=str(tmp_path / "nope")), seed=0, chunk_rows=10)


@pytest.mark.parametrize("layout,case", [(layout, case) for layout in ("recbole", "grouplens")
                                         for case in ("rating", "timestamp", "ragged")]
                         + [("recbole", "column")])  # GroupLens files have no header
def test_bad_values(tmp_path, copies, layout, case):
    rb, gl = copies
    folder = rb if layout == "recbole" else gl
    inter = folder / ("ml-100k.inter" if layout == "recbole" else "u.data")
    line = 57  # a physical line of the file (RecBole: header = line 1)
    if case == "column":
        _edit_line(inter, 1, "user_id:token\titem_id:token\trateing:float\ttimestamp:float")
        line, column, what = 1, "rating", "did you mean 'rateing'"
    else:
        fields = inter.read_text().splitlines()[line - 1].split("\t")
        if case == "rating":
            fields[2], column, what = "x4", "rating", "expected a rating (a number), got 'x4'"
        elif case == "timestamp":
            fields[3], column, what = "881250949.5", "timestamp", "expected an integer timestamp"
        else:
            fields, column, what = fields[:3], "timestamp", "expected 4 fields, got 3"
        _edit_line(inter, line, "\t".join(fields))
    src = MovieLensSource(MovieLensConfig(path=str(folder)), seed=0, chunk_rows=1000)
    with pytest.raises(DataError) as err:
        prepare(src, tmp_path / "out", config_hash="test", progress=False)
    msg = str(err.value)
    assert str(inter) in msg and f"row {line}," in msg and f"column {column!r}" in msg and what in msg, msg
    assert (err.value.file, err.value.row, err.value.column) == (str(inter), line, column)
    assert not (tmp_path / "out").exists()


def test_bad_side_file_values(tmp_path, copies):
    _, gl = copies
    item = gl / "u.item"
    lines = item.read_bytes().decode("latin-1").splitlines()
    fields = lines[9].split("|")
    fields[5 + GENRES.index("Drama")] = "2"
    lines[9] = "|".join(fields)
    item.write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    src = MovieLensSource(MovieLensConfig(path=str(gl)), seed=0, chunk_rows=1000)
    with pytest.raises(DataError, match=r"u\.item, row 10, column 'Drama': expected a genre flag 0 or 1, got '2'"):
        src.table()
    _edit_line(gl / "u.user", 4, "4|twenty|M|technician|43537")
    src = MovieLensSource(MovieLensConfig(path=str(gl)), seed=0, chunk_rows=1000)
    with pytest.raises(DataError, match=r"u\.user, row 4, column 'age': expected an age in years, got 'twenty'"):
        src.table()
