"""`movielens`: MovieLens ratings as impressions, with user/item side features and each user's
behaviour history, in every layout GroupLens and RecBole publish.

Layouts (``layout: auto`` picks the one whose files are in ``path``; naming one forces it; a
folder matching none is an error listing what each layout needs):

* RecBole "atomic files" (``<name>.inter``, ``<name>.user``, ``<name>.item``): tab-separated,
  header line of typed names ``name:type``; ``.inter`` has ``user_id, item_id, rating,
  timestamp``, ``.user`` has ``user_id, age, gender, occupation, zip_code``, ``.item`` has
  ``item_id, movie_title, release_year, class`` (class = space-separated genres).
* GroupLens original (``u.data``, ``u.user``, ``u.item``), no header lines: ``u.data`` is
  tab-separated ``user item rating timestamp``; ``u.user`` is ``id|age|gender|occupation|zip``;
  ``u.item`` is latin-1 ``id|title|release date|video release date|url|`` + 19 genre flags in
  the order of ``u.genre`` (unknown, Action, ..., Western).
* ``dat`` -- ML-1M and ML-10M (``ratings.dat``, ``movies.dat``, and ``users.dat`` in ML-1M only),
  ``::``-separated, no header: ``UserID::MovieID::Rating::Timestamp``,
  ``MovieID::Title::Genres`` (genres ``|``-separated; the year is the title's ``(YYYY)``),
  ``UserID::Gender::Age::Occupation::Zip-code`` (age is already the ML-1M bucket code).
* ``csv`` -- ML-20M, ML-25M, ml-latest(-small): ``ratings.csv`` (``userId,movieId,rating,
  timestamp``) and ``movies.csv`` (``movieId,title,genres``, quoted titles), header lines; no
  user table, so no user profile features.

Text encodings: side files are read as UTF-8 when they decode as UTF-8, else as Latin-1 (the
ML-1M ``movies.dat`` and ML-100K ``u.item`` titles). Both ML-100K layouts give the same event
log. ``path`` is resolved against the current directory (the
default ``../shared/data/movielens-100k`` reaches the shared copy from the project root).

Events: one per rating, in file order; ``ts`` = the rating's unix timestamp; ``label`` = rating
>= ``label_min_rating`` (default 4: 55% positive). The rating itself is not a feature.

Features (vertical models see only ``user_id`` and ``item_id``; everything else is ``fm_only``,
the FM's extra knowledge -- the feature gap of the paper):

* ``user_id`` (user key), ``item_id`` (item key): categorical, VM-visible.
* (layouts with a user table) ``age`` -- the MovieLens-1M age bucket (under 18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+) with
  ``age: bucket`` (default), or the raw age with ``age: raw``; ``gender``; ``occupation``;
  ``zip`` -- the first ``zip_prefix`` characters of the zip code, upper-cased (default 1: the
  first digit, the US region; 3 gives the sectional centre; Canadian codes keep their letters).
  Group ``user_profile``.
* ``release_year`` (missing/``unknown`` dates -> missing) and ``genres`` (a sequence feature:
  the multi-hot genre set as a list, in ``u.genre`` order). Group ``item_profile``.
* The user's behaviour history (group ``history``), the analog of TaobaoAd's behaviour
  sequences read by the paper's FM: ``hist_item_id`` (shares the ``item_id`` vocabulary) and
  ``hist_rating`` (ratings as tokens "1".."5"; with ``history_value: label`` it is
  ``hist_label``, tokens "0"/"1") -- the items and ratings of that user's *strictly earlier*
  events (``t_i < t``; events at the same second, which ML-100K has many of, do not see each
  other), newest last, at most ``history_len`` (default 50; 0 = no history features).
  Computed in one vectorised pass over (user, ts, file order).

Days: ratings sorted by (timestamp, file order) and cut into ``days`` (default 8) periods of
equal row count (`DayRule("equal_count")`; ML-100K spans 7 months, 12,500 ratings a period).
Note: about 80% of the last period's rows come from users with no rating in any earlier
period (MovieLens users rate in one burst), so what history they have comes from that same
period (ML-100K: mean history length ~39 in every period, ~2% of rows with none): in the last
period, histories that reach back into earlier periods are rare.

Errors are `DataError`s naming file, line and column: a missing file (naming the layout), ragged
rows, a rating that is not a number, a timestamp that is not an integer, a bad age or genre flag.
Users or items absent from the side files get missing side features.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from loopfm.data.errors import DataError
from loopfm.data.history import history_lists
from loopfm.data.schema import FeatureSpec
from loopfm.data.source import DayRule, SourceInfo
from loopfm.data.sources.events import _suggest
from loopfm.data.text import DelimitedReader, parse_float_strings, parse_int_strings

# u.genre order; RecBole's ``class`` tokens are put in this order too.
GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
          "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
          "Romance", "Sci-Fi", "Thriller", "War", "Western")
# MovieLens-1M age buckets: (upper bound exclusive, name)
AGE_BUCKETS = ((18, "under 18"), (25, "18-24"), (35, "25-34"), (45, "35-44"), (50, "45-49"), (56, "50-55"))
INTER_COLUMNS = ("user_id", "item_id", "rating", "timestamp")
USER_COLUMNS = ("user_id", "age", "gender", "occupation", "zip_code")
ITEM_COLUMNS_GROUPLENS = ("item_id", "title", "release_date", "video_release_date", "url") + GENRES
USER_COLUMNS_DAT = ("user_id", "gender", "age", "occupation", "zip_code")
ITEM_COLUMNS_TITLED = ("item_id", "title", "genres")
CSV_HEADERS = {"inter": ("userId", "movieId", "rating", "timestamp"), "item": ("movieId", "title", "genres")}
# layout -> kind -> (file name or None for RecBole's <name>.<suffix>, delimiter, column names)
LAYOUTS = {
    "recbole": {"inter": (".inter", "\t", None), "user": (".user", "\t", None), "item": (".item", "\t", None)},
    "grouplens": {"inter": ("u.data", "\t", INTER_COLUMNS), "user": ("u.user", "|", USER_COLUMNS),
                  "item": ("u.item", "|", ITEM_COLUMNS_GROUPLENS)},
    "dat": {"inter": ("ratings.dat", "::", INTER_COLUMNS), "user": ("users.dat", "::", USER_COLUMNS_DAT),
            "item": ("movies.dat", "::", ITEM_COLUMNS_TITLED)},
    "csv": {"inter": ("ratings.csv", ",", INTER_COLUMNS), "item": ("movies.csv", ",", ITEM_COLUMNS_TITLED)},
}
OPTIONAL = {("dat", "user")}  # ML-10M has no users.dat
NEEDS = {"recbole": "<name>.inter, <name>.user, <name>.item (RecBole ML-100K)",
         "grouplens": "u.data, u.user, u.item (GroupLens ML-100K)",
         "dat": "ratings.dat, movies.dat (+ users.dat) with '::' (GroupLens ML-1M / ML-10M)",
         "csv": "ratings.csv, movies.csv (GroupLens ML-20M / ML-25M / ml-latest)"}
ALL_ROWS = 1 << 62


@dataclass(kw_only=True)
class MovieLensConfig:
    """MovieLens in any GroupLens or RecBole layout (see the module docs)."""
    path: str = field(default="../shared/data/movielens-100k", metadata={"input": True,
        "help": "folder with ml-100k.inter/.user/.item (RecBole), u.data/u.user/u.item (GroupLens "
                "ML-100K), ratings.dat/movies.dat/users.dat (ML-1M, ML-10M) or ratings.csv/movies.csv "
                "(ML-20M, ML-25M, ml-latest); relative to the current directory"})
    layout: Literal["auto", "recbole", "grouplens", "dat", "csv"] = field(default="auto", metadata={
        "help": "file layout; auto detects it from the files in the folder"})
    label_min_rating: float = field(default=4.0, metadata={"help": "label = 1 when rating >= this"})
    history_len: int = field(default=50, metadata={
        "help": "max entries of the hist_item_id / hist_rating sequences (0 = no history features)"})
    history_value: Literal["rating", "label"] = field(default="rating", metadata={
        "help": "what the second history sequence holds: the ratings (hist_rating) or labels (hist_label)"})
    age: Literal["bucket", "raw"] = field(default="bucket", metadata={
        "help": "age feature: MovieLens-1M buckets or the raw age"})
    zip_prefix: int = field(default=1, metadata={"help": "characters of the zip code kept (1 = US region)"})
    days: int = field(default=8, metadata={"help": "number of equal-count periods"})

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("movielens.path must name the MovieLens folder")
        if self.history_len < 0:
            raise ValueError(f"movielens.history_len must be >= 0, got {self.history_len}")
        if not 1 <= self.zip_prefix <= 10:
            raise ValueError(f"movielens.zip_prefix must be 1..10, got {self.zip_prefix}")
        if self.days < 1:
            raise ValueError(f"movielens.days must be >= 1, got {self.days}")


class MovieLensSource:
    def __init__(self, cfg: MovieLensConfig, *, seed: int, chunk_rows: int):
        self.cfg, self.seed, self.chunk_rows = cfg, seed, chunk_rows
        self.skipped: dict[str, int] = {}
        self.folder = Path(cfg.path)
        self.layout, self.files = self._locate()

    # -- files --
    def _locate(self) -> tuple[str, dict[str, Path]]:
        folder = self.folder
        if not folder.is_dir():
            raise DataError(f"MovieLens folder not found (data.movielens.path = {self.cfg.path!r}, "
                            f"resolved against {Path.cwd()})", file=str(folder.resolve()))
        layout = self.cfg.layout
        inters = sorted(folder.glob("*.inter"))
        if layout == "auto":
            found = [name for name, first in (("recbole", bool(inters)), ("grouplens", (folder / "u.data").exists()),
                                              ("dat", (folder / "ratings.dat").exists()),
                                              ("csv", (folder / "ratings.csv").exists())) if first]
            if not found:
                raise DataError("no MovieLens files; each layout needs: " + "; ".join(
                    f"{k}: {v}" for k, v in NEEDS.items()), file=str(folder))
            layout = found[0]
        if layout == "recbole":
            if not inters:
                raise DataError("missing file for the recbole layout: no <name>.inter here (the layout "
                                "needs <name>.inter, <name>.user, <name>.item)", file=str(folder / "*.inter"))
            if len(inters) > 1:
                raise DataError(f"several .inter files {[p.name for p in inters]}; keep one per folder",
                                file=str(folder))
            stem = inters[0].with_suffix("")
            files = {kind: stem.with_suffix(suffix) for kind, (suffix, _, _) in LAYOUTS["recbole"].items()}
        else:
            files = {kind: folder / name for kind, (name, _, _) in LAYOUTS[layout].items()}
        for kind, path in list(files.items()):
            if not path.is_file():
                if (layout, kind) in OPTIONAL:
                    del files[kind]
                    continue
                raise DataError(f"missing file for the {layout} layout (it needs {NEEDS[layout]})", file=str(path))
        return layout, files

    def _read(self, kind: str, columns: tuple[str, ...]) -> tuple[dict[str, pa.Array], DelimitedReader]:
        """Read one file whole as strings; returns base-named columns and the reader (line numbers)."""
        path = str(self.files[kind])
        _, delimiter, names = LAYOUTS[self.layout][kind]
        encoding = "utf-8" if kind == "inter" else _encoding(self.files[kind])
        if self.layout == "recbole":
            reader = DelimitedReader(path, delimiter="\t", quote_char=False, header=True, columns=None,
                                     encoding=encoding, include=[], chunk_rows=ALL_ROWS)
            header = reader.names or []
            if not header:
                raise DataError(f"the file is empty: expected a header line with {', '.join(columns)}",
                                file=path, row=1, column=columns[0])
            base = {h.split(":", 1)[0]: h for h in header}
            wanted = {}
            for c in columns:
                if c not in base:
                    raise DataError(f"no column {c!r} in the header{_suggest(c, list(base))} "
                                    f"(columns: {', '.join(header)})", file=path, row=1, column=c)
                wanted[c] = base[c]
            reader.include = list(wanted.values())
            reader.names = [h.split(":", 1)[0] for h in header]  # error messages name base columns
        else:
            header = self.layout == "csv"
            if header:
                found = DelimitedReader(path, delimiter=",", encoding=encoding, strip_names=True).names or []
                if tuple(found) != CSV_HEADERS[kind]:
                    raise DataError(f"expected the header {','.join(CSV_HEADERS[kind])}, got "
                                    f"{','.join(found) or 'an empty file'}", file=path, row=1)
            reader = DelimitedReader(path, delimiter=delimiter, quote_char='"' if header else False,
                                     header=header, columns=list(names), encoding=encoding,
                                     include=list(columns), chunk_rows=ALL_ROWS)
            wanted = {c: c for c in columns}
        tables = list(reader.tables())
        if not tables:
            raise DataError("no data rows", file=path, row=2 if reader.header else 1, column=columns[0])
        table = pa.concat_tables(tables).combine_chunks()
        return {c: table.column(h).chunk(0) if table.column(h).num_chunks else pa.array([], pa.string())
                for c, h in wanted.items()}, reader

    def _fail(self, kind: str, reader: DelimitedReader, i: int, column: str, message: str) -> DataError:
        return DataError(message, file=str(self.files[kind]), row=reader.line(i), column=column)

    def _events(self) -> dict[str, np.ndarray | pa.Array]:
        cols, reader = self._read("inter", INTER_COLUMNS)
        rating, bad = parse_float_strings(cols["rating"])
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise self._fail("inter", reader, i, "rating",
                             f"expected a rating (a number), got {cols['rating'][i].as_py()!r}")
        ts, bad = parse_int_strings(cols["timestamp"])
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise self._fail("inter", reader, i, "timestamp", f"expected an integer timestamp (unix "
                             f"seconds), got {cols['timestamp'][i].as_py()!r}")
        for c in ("user_id", "item_id"):
            empty = np.asarray(pc.equal(pc.utf8_trim_whitespace(cols[c]), "").to_numpy(zero_copy_only=False))
            if empty.any():
                raise self._fail("inter", reader, int(np.flatnonzero(empty)[0]), c, "expected an id, got an empty value")
        return {"user_id": pc.utf8_trim_whitespace(cols["user_id"]),
                "item_id": pc.utf8_trim_whitespace(cols["item_id"]), "rating": rating, "ts": ts}

    def _users(self) -> dict[str, pa.Array]:
        cols, reader = self._read("user", USER_COLUMNS)
        age_s = pc.utf8_trim_whitespace(cols["age"])
        if self.cfg.age == "bucket":
            ages, bad = parse_int_strings(age_s)
            empty = np.asarray(pc.equal(age_s, "").to_numpy(zero_copy_only=False))
            if (bad & ~empty).any():
                i = int(np.flatnonzero(bad & ~empty)[0])
                raise self._fail("user", reader, i, "age", f"expected an age in years, got {age_s[i].as_py()!r}")
            bounds = np.array([b for b, _ in AGE_BUCKETS])
            names = np.array([n for _, n in AGE_BUCKETS] + ["56+"], dtype=object)
            age = pa.array(names[np.searchsorted(bounds, ages, side="right")], pa.string())
            age = pc.if_else(pa.array(empty), pa.scalar(None, pa.string()), age)
        else:
            age = age_s
        zip_s = pc.utf8_upper(pc.utf8_trim_whitespace(cols["zip_code"]))
        zip_p = pc.utf8_slice_codeunits(zip_s, 0, self.cfg.zip_prefix)
        return {"user_id": pc.utf8_trim_whitespace(cols["user_id"]), "age": age,
                "gender": pc.utf8_trim_whitespace(cols["gender"]),
                "occupation": pc.utf8_trim_whitespace(cols["occupation"]), "zip": _nullify_empty(zip_p)}

    def _items(self) -> dict[str, pa.Array]:
        if self.layout in ("dat", "csv"):
            cols, reader = self._read("item", ("item_id", "title", "genres"))
            year = pc.utf8_trim_whitespace(pc.extract_regex(
                cols["title"], r"\((?P<year>\d{4})\)\s*$").field("year"))
            order = {g: k for k, g in enumerate(GENRES)}
            genres = [sorted(dict.fromkeys(t for t in (v or "").split("|") if t and t != "(no genres listed)"),
                             key=lambda g: (order.get(g, len(GENRES)),))
                      for v in cols["genres"].to_pylist()]
        elif self.layout == "recbole":
            cols, reader = self._read("item", ("item_id", "release_year", "class"))
            year = pc.utf8_trim_whitespace(cols["release_year"])
            order = {g: k for k, g in enumerate(GENRES)}
            genres = [sorted(dict.fromkeys((v or "").split()), key=lambda g: (order.get(g, len(GENRES)),))
                      for v in cols["class"].to_pylist()]
        else:
            cols, reader = self._read("item", ("item_id", "release_date") + GENRES)
            year = pc.utf8_slice_codeunits(pc.utf8_trim_whitespace(cols["release_date"]), -4)
            flags = []
            for g in GENRES:
                f = pc.utf8_trim_whitespace(cols[g])
                bad = ~np.asarray(pc.is_in(f, value_set=pa.array(["0", "1"])).to_numpy(zero_copy_only=False))
                if bad.any():
                    i = int(np.flatnonzero(bad)[0])
                    raise self._fail("item", reader, i, g, f"expected a genre flag 0 or 1, got {f[i].as_py()!r}")
                flags.append(np.asarray(pc.equal(f, "1").to_numpy(zero_copy_only=False)))
            flags_m = np.stack(flags, axis=1)
            genres = [[GENRES[k] for k in np.flatnonzero(row)] for row in flags_m]
        is_year = pc.fill_null(pc.match_substring_regex(year, r"^\d{4}$"), False)
        return {"item_id": pc.utf8_trim_whitespace(cols["item_id"]),
                "release_year": pc.if_else(is_year, year, pa.scalar(None, pa.string())),
                "genres": pa.array(genres, pa.list_(pa.string()))}

    # -- protocol --
    def info(self) -> SourceInfo:
        f = []
        f.append(FeatureSpec("user_id", "categorical", "user", group="user", description="user id (VM-visible)"))
        f.append(FeatureSpec("item_id", "categorical", "item", group="item", description="movie id (VM-visible)"))
        age_desc = "age bucket (MovieLens-1M buckets)" if self.cfg.age == "bucket" else "age in years"
        for name, desc in (("age", age_desc), ("gender", "M/F"), ("occupation", "one of 21 occupations"),
                           ("zip", f"first {self.cfg.zip_prefix} character(s) of the zip code")):
            if "user" in self.files:  # ML-10M and the csv layout have no user table
                f.append(FeatureSpec(name, "categorical", "user", fm_only=True, group="user_profile",
                                     description=desc))
        f.append(FeatureSpec("release_year", "categorical", "item", fm_only=True, group="item_profile",
                             description="year of the movie's release"))
        f.append(FeatureSpec("genres", "sequence", "item", fm_only=True, max_len=len(GENRES),
                             group="item_profile", description="the movie's genres (multi-hot as a list)"))
        if self.cfg.history_len:
            L = self.cfg.history_len
            f.append(FeatureSpec("hist_item_id", "sequence", "user", fm_only=True, vocab="item_id", max_len=L,
                                 group="history", description="items the user rated strictly earlier, newest last"))
            f.append(FeatureSpec(self._hist_value_name, "sequence", "user", fm_only=True, max_len=L,
                                 group="history", description=f"the {self.cfg.history_value}s of those ratings"))
        return SourceInfo(dataset=self.dataset, user_key="user_id", item_key="item_id", features=f,
                          days=DayRule("equal_count", num_days=self.cfg.days))

    @property
    def dataset(self) -> str:
        if self.layout in ("recbole", "grouplens"):
            return "movielens-100k"
        name = self.folder.resolve().name.lower()
        return name if name.startswith("ml") and name != "ml" else f"movielens-{self.layout}"

    @property
    def _hist_value_name(self) -> str:
        return "hist_rating" if self.cfg.history_value == "rating" else "hist_label"

    def table(self) -> pa.Table:
        """The whole event table (ML-100K/1M fit easily; ML-25M needs a few GB; `chunks` slices it)."""
        ev = self._events()
        users, items = (self._users() if "user" in self.files else None), self._items()
        label = (ev["rating"] >= self.cfg.label_min_rating).astype(np.int8)
        cols: dict[str, pa.Array] = {"ts": pa.array(ev["ts"], pa.int64()), "label": pa.array(label),
                                     "user_id": ev["user_id"], "item_id": ev["item_id"]}
        if users is not None:
            u_idx = pc.index_in(ev["user_id"], value_set=users["user_id"])
            for name in ("age", "gender", "occupation", "zip"):
                cols[name] = users[name].take(u_idx)
        i_idx = pc.index_in(ev["item_id"], value_set=items["item_id"])
        cols["release_year"] = items["release_year"].take(i_idx)
        cols["genres"] = items["genres"].take(i_idx)
        if self.cfg.history_len:
            if self.cfg.history_value == "rating":
                r = ev["rating"]
                tokens = np.where(r == np.floor(r), r.astype(np.int64).astype(str), r.astype(str))
            else:
                tokens = label.astype(str)
            cols["hist_item_id"], cols[self._hist_value_name] = history_lists(
                ev["user_id"], ev["ts"], [ev["item_id"], pa.array(tokens, pa.string())], self.cfg.history_len)
        return pa.table(cols)

    def chunks(self) -> Iterator[pa.Table]:
        table = self.table()
        for start in range(0, table.num_rows, self.chunk_rows):
            yield table.slice(start, self.chunk_rows)


def _encoding(path: Path) -> str:
    """UTF-8 if the whole file decodes as UTF-8, else Latin-1 (older GroupLens files)."""
    try:
        path.read_bytes().decode("utf-8")
        return "utf-8"
    except UnicodeDecodeError:
        return "latin-1"


def _nullify_empty(arr: pa.Array) -> pa.Array:
    return pc.if_else(pc.equal(arr, ""), pa.scalar(None, arr.type), arr)
