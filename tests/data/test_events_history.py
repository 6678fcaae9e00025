"""`kind: history` in the events schema: built by the framework, equal to the movielens source's
histories on the real ML-100K log, and right (against brute force) with windows, label filters,
another key and an input not in time order."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import yaml

from loopfm.data.errors import DataError
from loopfm.data.eventlog import EventLog
from loopfm.data.prepare import prepare
from loopfm.data.sources.events import EventsConfig, EventsSource
from loopfm.data.sources.movielens import MovieLensConfig, MovieLensSource


def _prepare_events(tmp: Path, csv_path: Path, schema: dict, chunk_rows: int = 100_000) -> EventLog:
    schema_path = tmp / f"{csv_path.stem}.yaml"
    schema_path.write_text(yaml.safe_dump(schema))
    src = EventsSource(EventsConfig(input=str(csv_path), schema=str(schema_path)), seed=0, chunk_rows=chunk_rows)
    out = tmp / f"{csv_path.stem}-log"
    prepare(src, out, config_hash="t", progress=False)
    return EventLog(out)


def _decoded(log: EventLog, column: str, vocab: str) -> list[list[str]]:
    values = log.vocab(vocab).values.to_pylist()
    t = log.read(columns=["example_id", column]).sort_by("example_id")
    return [[values[i - 1] for i in ids] for ids in t.column(column).to_pylist()]


ML_SCHEMA = {
    "timestamp": {"column": "timestamp", "unit": "s"},
    "label": {"column": "rating", "min": 4},
    "user": "user_id", "item": "item_id",
    "features": [
        {"name": "user_id", "kind": "categorical"},
        {"name": "item_id", "kind": "categorical"},
        {"name": "hist_item_id", "kind": "history", "of": "item_id", "max_len": 50},
        {"name": "hist_rating", "kind": "history", "of": "rating", "max_len": 50},
    ],
    "days": 8,
}


def test_ml100k_csv_gives_the_movielens_histories(tmp_path, shared_data):
    inter = shared_data / "movielens-100k" / "ml-100k.inter"
    lines = inter.read_text().splitlines()
    plain = tmp_path / "ratings.csv"
    with open(plain, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_id", "rating", "timestamp"])
        w.writerows(line.split("\t") for line in lines[1:])
    events = _prepare_events(tmp_path, plain, ML_SCHEMA, chunk_rows=30_000)  # 4 runs merged
    spec = events.schema.feature("hist_item_id")
    assert (spec.kind, spec.vocab, spec.fm_only, spec.group) == ("sequence", "item_id", True, "history")
    src = MovieLensSource(MovieLensConfig(path=str(shared_data / "movielens-100k")), seed=0, chunk_rows=30_000)
    prepare(src, tmp_path / "ml", config_hash="t", progress=False)
    ml = EventLog(tmp_path / "ml")
    assert events.num_rows() == ml.num_rows() == 100_000
    got, want = _decoded(events, "hist_item_id", "item_id"), _decoded(ml, "hist_item_id", "item_id")
    assert got == want
    assert sum(map(len, got)) > 1_000_000  # real histories, not empty lists
    assert _decoded(events, "hist_rating", "hist_rating") == _decoded(ml, "hist_rating", "hist_rating")
    a = events.read(columns=["example_id", "ts", "label"]).sort_by("example_id")
    b = ml.read(columns=["example_id", "ts", "label"]).sort_by("example_id")
    assert a.equals(b)


def _brute(rows, q, key, max_len, window_s=None, labels="all"):
    hist = [i for i, r in enumerate(rows) if r[key] == rows[q][key] and r["ts"] < rows[q]["ts"]
            and (window_s is None or r["ts"] >= rows[q]["ts"] - window_s)
            and (labels == "all" or r["label"] == (1 if labels == "positive" else 0))]
    hist.sort(key=lambda i: (rows[i]["ts"], i))
    return hist[-max_len:]


def test_windows_label_filters_other_keys_unsorted_input(tmp_path):
    rng = np.random.default_rng(0)
    n = 400
    rows = [{"u": f"u{rng.integers(0, 15)}", "shop": f"s{rng.integers(0, 4)}", "item": f"i{rng.integers(0, 40)}",
             "ts": int(1_600_000_000 + rng.integers(0, 20) * 43_200), "label": int(rng.integers(0, 2))}
            for _ in range(n)]  # not in time order; many rows share a timestamp
    path = tmp_path / "log.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["u", "shop", "item", "ts", "label"])
        w.writeheader()
        w.writerows(rows)
    schema = {
        "timestamp": {"column": "ts", "unit": "s"}, "label": {"column": "label"}, "user": "u", "item": "item",
        "features": [
            {"name": "shop", "kind": "categorical"},
            {"name": "h_item", "kind": "history", "of": "item", "max_len": 5},
            {"name": "h_shop", "kind": "history", "of": "shop", "max_len": 5},  # aligned with h_item
            {"name": "h_pos", "kind": "history", "of": "item", "max_len": 3, "labels": "positive",
             "window_days": 2},
            {"name": "h_by_shop", "kind": "history", "of": "u", "key": "shop", "max_len": 4},
        ],
        "days": 2,
    }
    log = _prepare_events(tmp_path, path, schema, chunk_rows=37)
    order = sorted(range(n), key=lambda i: (rows[i]["ts"], i))  # example id -> file row
    checks = [("h_item", "item", "u", 5, None, "all"), ("h_shop", "shop", "u", 5, None, "all"),
              ("h_pos", "item", "u", 3, 2 * 86_400, "positive"), ("h_by_shop", "u", "shop", 4, None, "all")]
    for name, of, key, max_len, window, labels in checks:
        got = _decoded(log, name, log.schema.feature(name).vocab_name)
        want = [[rows[i][of] for i in _brute(rows, q, key, max_len, window, labels)] for q in order]
        assert got == want, name
    assert log.schema.feature("h_item").vocab == "item"


@pytest.mark.parametrize("edit,message", [
    (lambda f: f.update(of="nope"), "no feature column 'nope'"),
    (lambda f: f.update(column="item"), "features[1].column: not for history features"),
    (lambda f: f.update(window_days=0), "features[1].window_days: expected a positive number"),
    (lambda f: f.update(labels="pos"), "features[1].labels: 'pos' is not one of all|positive|negative"),
    (lambda f: f.update(key="price"), "features[1].key: 'price' is a numeric feature"),
])
def test_history_schema_errors(tmp_path, edit, message):
    path = tmp_path / "e.csv"
    path.write_text("u,item,ts,label,price\na,x,1,1,2.5\n")
    hist = {"name": "h", "kind": "history", "of": "item"}
    edit(hist)
    schema = {"timestamp": "ts", "label": "label", "user": "u", "item": "item",
              "features": [{"name": "price", "kind": "numeric"}, hist]}
    schema_path = tmp_path / "s.yaml"
    schema_path.write_text(yaml.safe_dump(schema))
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]").replace("|", r"\|")):
        EventsSource(EventsConfig(input=str(path), schema=str(schema_path)), seed=0, chunk_rows=10)


def test_prepare_without_schema_is_a_one_line_error(tmp_path, capsys):
    from loopfm.cli import main

    path = tmp_path / "e.csv"
    path.write_text("u,item,ts,label\na,x,1,1\n")
    assert main(["prepare", "--source", "events", "--input", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["loopfm prepare: error: the events source needs data.events.schema (the YAML schema of that "
                   "file; on the command line: --schema SCHEMA.yaml)"]
    assert not (tmp_path / "o").exists()
