"""Every MovieLens layout on small files the test writes: ML-1M / ML-10M (``::``, Latin-1 titles,
users.dat optional) and ML-20M / ML-25M / ml-latest (quoted CSV, half-star ratings), detection,
missing files, and the same ``::`` file read through the events source."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from loopfm.data.errors import DataError
from loopfm.data.eventlog import EventLog
from loopfm.data.prepare import prepare
from loopfm.data.sources.events import EventsConfig, EventsSource
from loopfm.data.sources.movielens import MovieLensConfig, MovieLensSource

MOVIES = [  # id, title, genres (Latin-1 accents, a comma and bare quotes in titles)
    (1, "Toy Story (1995)", "Animation|Children's|Comedy"),
    (2, "Café au lait (1993)", "Comedy|Romance"),
    (3, '"Great Performances" Cats (1998)', "Musical"),
    (4, "Bridges of Madison County, The (1995)", "Drama|Romance"),
    (5, "Untitled", "(no genres listed)"),
]
USERS = [(1, "F", 1, 10, "48067"), (2, "M", 56, 16, "70072"), (3, "M", 25, 15, "55117"), (4, "F", 45, 7, "02460")]


def _ratings(half_stars: bool) -> list[tuple]:
    rng = np.random.default_rng(1)
    rows = []
    for _ in range(120):
        rating = rng.integers(1, 11) / 2 if half_stars else int(rng.integers(1, 6))
        rows.append((int(rng.integers(1, 5)), int(rng.integers(1, 6)), rating,
                     978_300_000 + int(rng.integers(0, 30)) * 60))  # many same-second ties
    return rows


def _fmt(r) -> str:
    return str(int(r)) if float(r).is_integer() else str(r)


def write_dat(folder: Path, with_users: bool = True) -> list[tuple]:
    folder.mkdir(parents=True)
    ratings = _ratings(False)
    (folder / "ratings.dat").write_text("".join(f"{u}::{i}::{_fmt(r)}::{t}\n" for u, i, r, t in ratings))
    (folder / "movies.dat").write_bytes("".join(f"{i}::{t}::{g}\n" for i, t, g in MOVIES).encode("latin-1"))
    if with_users:
        (folder / "users.dat").write_text("".join("::".join(map(str, u)) + "\n" for u in USERS))
    return ratings


def write_csv(folder: Path) -> list[tuple]:
    folder.mkdir(parents=True)
    ratings = _ratings(True)
    (folder / "ratings.csv").write_text("userId,movieId,rating,timestamp\n"
                                        + "".join(f"{u},{i},{r},{t}\n" for u, i, r, t in ratings))
    quoted = ['"' + t.replace('"', '""') + '"' if ("," in t or '"' in t) else t for _, t, _ in MOVIES]
    (folder / "movies.csv").write_text("movieId,title,genres\n"
                                       + "".join(f"{i},{q},{g}\n" for (i, _, g), q in zip(MOVIES, quoted)))
    return ratings


def _prepare(folder: Path, out: Path, **kw) -> EventLog:
    src = MovieLensSource(MovieLensConfig(path=str(folder), days=2, **kw), seed=0, chunk_rows=50)
    prepare(src, out, config_hash="t", progress=False)
    return EventLog(out)


def _decode(log: EventLog, column: str) -> list:
    f = log.schema.feature(column)
    values = log.vocab(f.vocab_name).values.to_pylist()
    t = log.read(columns=["example_id", column]).sort_by("example_id").column(column).to_pylist()
    dec = (lambda i: None if i == 0 or i > len(values) else values[i - 1])
    return [[dec(i) for i in v] if isinstance(v, list) else dec(v) for v in t]


def _expected_histories(ratings: list[tuple]) -> list[list[str]]:
    order = sorted(range(len(ratings)), key=lambda k: (ratings[k][3], k))
    out = []
    for q in order:
        hist = sorted((k for k in range(len(ratings)) if ratings[k][0] == ratings[q][0]
                       and ratings[k][3] < ratings[q][3]), key=lambda k: (ratings[k][3], k))
        out.append([str(ratings[k][1]) for k in hist[-50:]])
    return out


@pytest.mark.parametrize("with_users", [True, False], ids=["ml-1m", "ml-10m"])
def test_dat_layout(tmp_path, with_users):
    ratings = write_dat(tmp_path / "ml-1m", with_users)
    src = MovieLensSource(MovieLensConfig(path=str(tmp_path / "ml-1m")), seed=0, chunk_rows=50)
    assert src.layout == "dat" and src.info().dataset == "ml-1m"
    log = _prepare(tmp_path / "ml-1m", tmp_path / "out")
    names = [f.name for f in log.schema.features]
    assert ("age" in names) == with_users and ("gender" in names) == with_users
    assert log.num_rows() == len(ratings)
    assert _decode(log, "hist_item_id") == _expected_histories(ratings)
    order = sorted(range(len(ratings)), key=lambda k: (ratings[k][3], k))
    years = {1: "1995", 2: "1993", 3: "1998", 4: "1995", 5: None}
    assert _decode(log, "release_year") == [years[ratings[k][1]] for k in order]
    genres = {i: [g for g in gs.split("|") if g != "(no genres listed)"] for i, _, gs in MOVIES}
    got = _decode(log, "genres")
    assert got == [sorted(genres[ratings[k][1]], key=lambda g: ["Animation", "Children's", "Comedy", "Drama",
                                                                "Musical", "Romance"].index(g))
                   for k in order]
    if with_users:
        ages = {1: "under 18", 2: "56+", 3: "25-34", 4: "45-49"}
        assert _decode(log, "age") == [ages[ratings[k][0]] for k in order]
        assert _decode(log, "zip") == [{1: "4", 2: "7", 3: "5", 4: "0"}[ratings[k][0]] for k in order]


def test_csv_layout(tmp_path):
    ratings = write_csv(tmp_path / "ml-25m")
    log = _prepare(tmp_path / "ml-25m", tmp_path / "out")
    assert log.schema.dataset == "ml-25m"
    assert "age" not in [f.name for f in log.schema.features]
    assert _decode(log, "hist_item_id") == _expected_histories(ratings)
    order = sorted(range(len(ratings)), key=lambda k: (ratings[k][3], k))
    labels = log.read(columns=["example_id", "label"]).sort_by("example_id").column("label").to_pylist()
    assert labels == [int(ratings[k][2] >= 4) for k in order]
    hist_r = _decode(log, "hist_rating")
    assert any("." in r for h in hist_r for r in h)  # half stars kept as "3.5"


def test_missing_files_and_unknown_folders(tmp_path):
    write_dat(tmp_path / "dat")
    (tmp_path / "dat" / "movies.dat").unlink()
    with pytest.raises(DataError, match=r"movies\.dat.*missing file for the dat layout \(it needs ratings\.dat, movies\.dat"):
        MovieLensSource(MovieLensConfig(path=str(tmp_path / "dat")), seed=0, chunk_rows=10)
    write_csv(tmp_path / "csv")
    (tmp_path / "csv" / "movies.csv").unlink()
    with pytest.raises(DataError, match=r"missing file for the csv layout"):
        MovieLensSource(MovieLensConfig(path=str(tmp_path / "csv")), seed=0, chunk_rows=10)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "ratings.txt").write_text("1,2,3\n")
    with pytest.raises(DataError) as err:
        MovieLensSource(MovieLensConfig(path=str(tmp_path / "other")), seed=0, chunk_rows=10)
    message = str(err.value)
    for needs in ("<name>.inter", "u.data", "ratings.dat, movies.dat", "ratings.csv, movies.csv"):
        assert needs in message


def test_bad_dat_rows_name_file_line_column(tmp_path):
    write_dat(tmp_path / "d")
    path = tmp_path / "d" / "ratings.dat"
    lines = path.read_text().splitlines()
    lines[6] = "1::2::x::978300000"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        MovieLensSource(MovieLensConfig(path=str(tmp_path / "d")), seed=0, chunk_rows=10).table()
    assert (err.value.file, err.value.row, err.value.column) == (str(path), 7, "rating")
    lines[6] = "1::2::4"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="expected 4 fields, got 3") as err:
        MovieLensSource(MovieLensConfig(path=str(tmp_path / "d")), seed=0, chunk_rows=10).table()
    assert (err.value.row, err.value.column) == (7, "timestamp")


def test_dat_through_the_events_source(tmp_path):
    """The same ``::`` ratings.dat via the events schema (kind: history) gives the same histories."""
    ratings = write_dat(tmp_path / "ml-1m")
    schema = {"delimiter": "::", "header": False, "columns": ["user", "movie", "rating", "ts"],
              "timestamp": {"column": "ts", "unit": "s"}, "label": {"column": "rating", "min": 4},
              "user": "user", "item": "movie", "days": 2,
              "features": [{"name": "hist_movie", "kind": "history", "of": "movie"}]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(schema))
    src = EventsSource(EventsConfig(input=str(tmp_path / "ml-1m" / "ratings.dat"), schema=str(tmp_path / "s.yaml")),
                       seed=0, chunk_rows=33)
    prepare(src, tmp_path / "ev", config_hash="t", progress=False)
    assert _decode(EventLog(tmp_path / "ev"), "hist_movie") == _expected_histories(ratings)
    # Latin-1 titles through the events source: the encoding option
    schema = {"delimiter": "::", "header": False, "columns": ["movie", "title", "genres"], "encoding": "latin-1",
              "timestamp": {"column": "movie", "unit": "s"}, "label": {"constant": 1},
              "user": "genres", "item": "movie", "days": 1,
              "features": [{"name": "title", "kind": "categorical"}]}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(schema))
    src = EventsSource(EventsConfig(input=str(tmp_path / "ml-1m" / "movies.dat"), schema=str(tmp_path / "m.yaml")),
                       seed=0, chunk_rows=33)
    prepare(src, tmp_path / "mv", config_hash="t", progress=False, allow_any_time=True)  # movie ids as times
    assert "Café au lait (1993)" in EventLog(tmp_path / "mv").vocab("title").values.to_pylist()
