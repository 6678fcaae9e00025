"""`events`: any CSV or Parquet file of logged impressions, described by a YAML schema, so a
user's own data needs no code.

    loopfm prepare --source events --input FILE --schema SCHEMA.yaml --out DIR

The schema (``yaml.safe_load``; unknown keys are an error naming the nearest valid key; a wrong
value is named with its YAML path, e.g. ``features[3].kind: 'cat' is not one of
categorical|numeric|sequence; did you mean 'categorical'?``)::

    format: csv                           # csv | parquet (default: from the file name's suffix)
    timestamp: {column: ts, unit: s}      # unit s|ms|us|ns (integers), or
                                          # {column: time, strftime: "%Y-%m-%d %H:%M:%S", tz: "UTC"}
    label: {column: clicked}              # 0/1; or {column: rating, min: 4}; or {constant: 1}
    user: uid                             # the input column holding the user key
    item: iid                             # the input column holding the item key
    features:
      - {name: uid, kind: categorical}
      - {name: iid, kind: categorical}
      - {name: region, kind: categorical, fm_only: true}
      - {name: price, kind: numeric}
      - {name: tags, kind: sequence, sep: "|", max_len: 10}
      - {name: hist_iid, kind: history, of: iid, max_len: 50}   # built by the framework
    days: 8                               # equal-count periods; or {by: calendar, tz: "UTC"}

Top-level keys:

* ``dataset`` -- name of the dataset (default: the input file's stem).
* ``format`` -- ``csv`` or ``parquet``; default ``parquet`` for ``.parquet``/``.pq`` files,
  else ``csv``.
* CSV only: ``delimiter`` (default ``,``; ``"\\t"`` for TSV; several characters work too, e.g.
  ``"::"`` for the GroupLens MovieLens-1M/10M files), ``quote_char`` (default ``'"'``, but no
  quoting for a multi-character delimiter; ``false`` = no quoting), ``header`` (default
  ``true``; with ``false`` the file has no header line and ``columns`` lists its column names in
  order), ``columns``,
  ``encoding`` (default ``utf-8``). Values may not contain line breaks (one row per line).
  Latin-1 files (MovieLens titles): ``encoding: latin-1``.
* ``timestamp`` -- ``column``, and either ``unit`` (integer epoch values in s, ms, us or ns;
  values like ``881250949.0`` are accepted, fractions are not) or ``strftime`` (a format for
  ``pyarrow.compute.strptime``) with ``tz`` (IANA zone of the local times, default UTC; a ``%z``
  in the format wins). Parquet timestamp columns are read natively (naive ones in ``tz``).
  Local -> UTC uses the zone's offset at the start of each local hour (exact except for zones
  whose clocks change on a half hour). A bare string ``timestamp: ts`` means ``{column: ts}``.
* ``label`` -- ``{column: C}`` (values 0/1; a boolean Parquet column works too),
  ``{column: C, min: X}`` (label = value >= X, e.g. ratings), or ``{constant: 0|1}`` for
  implicit-feedback logs where every row is a positive (e.g. Amazon reviews).
* ``user`` / ``item`` -- input columns of the user and item keys. The feature reading that
  column (it must be categorical) is the key; if none is listed, a categorical feature named
  after the column is added (role user / item, visible to vertical models).
* ``features`` -- one mapping per feature: ``name``; ``kind`` (categorical | numeric |
  sequence); ``column`` (input column, default = ``name``); ``role`` (user | item | context;
  default user for the user column, item for the item column, context otherwise);
  ``fm_only`` (default false: only the FM reads it, the paper's feature gap); ``vocab``
  (share another feature's vocabulary, e.g. a history of item ids shares ``iid``'s);
  ``group`` (feature group; default = the role); ``description``. Numeric only:
  ``missing`` (value for empty cells; default: an empty cell is an error). Sequence only:
  ``sep`` (token separator inside a string cell, default ``|``; empty tokens are dropped,
  tokens are whitespace-trimmed; a Parquet list column is read as is) and ``max_len``
  (default 50; prepare keeps the newest). Sequence values must be newest last.
  Names ``ts``, ``label``, ``day`` and ``example_id`` are reserved: use ``column:`` to read an
  input column of that name under another feature name.
* ``kind: history`` -- a behaviour history built here, point in time: per row, the values of
  ``of`` in the same key's *strictly earlier* events (``t_i < t``: events of the same second do
  not see each other), oldest -> newest, the newest ``max_len`` (default 50). ``of``: a
  categorical feature (the history then shares its vocabulary, e.g. ``hist_iid`` and ``iid``
  share ids and embedding rows), a numeric feature or any input column (e.g. the ``rating``
  behind a ``min:`` label; own vocabulary). ``key``: a categorical feature or input column
  (default: the schema's ``user``). ``window_days``: only events at most this old.
  ``labels``: ``all`` (default), ``positive`` or ``negative`` events only. Defaults:
  ``fm_only: true`` (the feature gap: the FM reads the history, a VM gets it only through
  LoopFM sequences), ``group: history`` (the FM's behaviour group that DIN/DMIN attend over),
  ``role: user``. Histories with the same key, window and label filter are aligned (entry k
  of each is the same event). Built by `loopfm.data.history` (the rule build-sequences and the
  other sources follow) in one streaming pass in time order: the converted rows are spilled to
  sorted runs in a temp folder and merged, so memory is one chunk plus, per key, ``max_len``
  entries (plus those of its latest second).
* ``days`` -- an integer N (N equal-count periods in time order, `DayRule("equal_count")`),
  ``{by: equal_count, num_days: N}``, or ``{by: calendar, tz: ZONE}`` (one day per local date;
  ``tz`` defaults to the timestamp's ``tz``).

Input is streamed: CSV with ``pyarrow.csv.open_csv`` (every column read as a string, then
converted here, so a bad value's row is known), Parquet with ``iter_batches``; ``chunk_rows``
rows per chunk. Errors are `DataError`s naming file, row and column: for CSV the row is the
physical 1-based line (header = line 1, blank lines counted); for Parquet the 1-based row.
Covered: empty file, no data rows, unknown columns (with the nearest column name suggested),
missing user/item columns, ragged rows (wrong field count), unparsable timestamps, labels
outside {0,1}, non-numbers in numeric columns, timestamps outside [1990-01-01, now + 1 day]
(unless ``data.allow_any_time``), feature names that are not identifiers. With ``skip_bad_rows``
(off by default) the rows with the per-row problems are dropped instead and counted in
``skipped`` by reason (``ragged_row``, ``bad_timestamp``, ``bad_label``, ``bad_number``).
"""
from __future__ import annotations

import difflib
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from loopfm.config import ConfigError
from loopfm.data.errors import DataError
from loopfm.data.history import ENTRY_LABELS, StreamingHistories, entry_mask, time_ordered
from loopfm.data.schema import KINDS, ROLES, FeatureSpec
from loopfm.data.source import DayRule, SourceInfo
from loopfm.data.text import DelimitedReader, local_to_utc, parse_float_strings, parse_int_strings
from loopfm.data.text import mask as _mask
from loopfm.data.text import trimmed as _strings

RESERVED = ("example_id", "ts", "day", "label")
EVENT_KINDS = KINDS + ("history",)
UNITS = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


@dataclass(kw_only=True)
class EventsConfig:
    """Where the input and its YAML schema are (the schema's format is in the module docs)."""
    input: str = field(default="", metadata={"input": True, "help": "CSV or Parquet file of events (--input)"})
    schema: str = field(default="", metadata={"input": True, "help": "YAML schema describing the file's columns (--schema)"})
    skip_bad_rows: bool = field(default=False, metadata={
        "help": "drop rows with a wrong field count, bad timestamp, bad label or non-number in a "
                "numeric column (counted in the manifest) instead of stopping with an error"})


# --- the YAML schema ---------------------------------------------------------------------------

class SchemaError(DataError):
    """A schema file that does not describe a valid event source (names the YAML path)."""

    def __init__(self, path: str, message: str, *, file: str | None = None):
        super().__init__(f"{path}: {message}" if path else message, file=file)


@dataclass
class TimestampSpec:
    column: str
    unit: str = "s"
    strftime: str | None = None
    tz: str = "UTC"


@dataclass
class LabelSpec:
    column: str | None = None
    min: float | None = None
    constant: int | None = None


@dataclass
class FeatureEntry:
    name: str
    kind: str
    column: str
    role: str
    fm_only: bool = False
    vocab: str | None = None
    group: str = ""
    description: str = ""
    max_len: int = 0
    sep: str = "|"
    missing: float | None = None
    # kind: history only (see HistoryEntry in the module docs): input columns of the values and
    # the key, and which earlier events count
    of: str = ""
    of_column: str = ""
    key: str = ""
    key_column: str = ""
    window_days: float | None = None
    labels: str = "all"
    yaml_path: str = ""


@dataclass
class EventsSchema:
    dataset: str
    format: str
    timestamp: TimestampSpec
    label: LabelSpec
    user: str
    item: str
    features: list[FeatureEntry]
    days: DayRule
    delimiter: str = ","
    quote_char: str | bool = '"'
    header: bool = True
    columns: list[str] | None = None
    encoding: str = "utf-8"

    def input_columns(self) -> list[str]:
        """Every input column the schema reads, in first-use order."""
        cols = [self.timestamp.column]
        if self.label.column is not None:
            cols.append(self.label.column)
        cols += [self.user, self.item]
        for f in self.features:
            cols += [f.of_column, f.key_column] if f.kind == "history" else [f.column]
        return list(dict.fromkeys(cols))

    def histories(self) -> list[FeatureEntry]:
        return [f for f in self.features if f.kind == "history"]

    def key_feature(self, column: str) -> FeatureEntry:
        return next(f for f in self.features if f.column == column and f.kind == "categorical")


def _suggest(value: Any, choices: list[str]) -> str:
    """``"; did you mean 'x'?"`` for the nearest choice (an abbreviation counts), else ``""``."""
    value, choices = str(value), [str(c) for c in choices]
    prefixed = [c for c in choices if value and c.lower().startswith(value.lower()) and c != value]
    near = prefixed[:1] if len(prefixed) == 1 else difflib.get_close_matches(value, choices, n=1, cutoff=0.5)
    return f"; did you mean {near[0]!r}?" if near else ""


class _Reader:
    """Typed access to one mapping of the schema, errors named by YAML path."""

    def __init__(self, raw: Any, path: str, allowed: list[str], file: str):
        self.path, self.file = path, file
        if not isinstance(raw, dict):
            raise SchemaError(path, f"expected a mapping, got {raw!r}", file=file)
        for key in raw:
            if key not in allowed:
                where = f"{path}.{key}" if path else str(key)
                raise SchemaError(where, f"unknown key{_suggest(key, allowed)} (valid keys: "
                                         f"{', '.join(allowed)})", file=file)
        self.raw = raw

    def where(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def fail(self, key: str, message: str) -> SchemaError:
        return SchemaError(self.where(key), message, file=self.file)

    def has(self, key: str) -> bool:
        return key in self.raw and self.raw[key] is not None

    def str(self, key: str, default: Any = ..., *, nonempty: bool = True) -> Any:
        if not self.has(key):
            if default is ...:
                raise self.fail(key, "missing (a string is required)")
            return default
        value = self.raw[key]
        if not isinstance(value, str) or (nonempty and not value):
            raise self.fail(key, f"expected a non-empty string, got {value!r}")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: Any = ...) -> Any:
        value = self.str(key, default)
        if value is not default and value not in choices:
            raise self.fail(key, f"{value!r} is not one of {'|'.join(choices)}{_suggest(value, list(choices))}")
        return value

    def bool(self, key: str, default: bool) -> bool:
        value = self.raw.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(key, f"expected true or false, got {value!r}")
        return value

    def int(self, key: str, default: Any, *, minimum: int) -> int:
        value = self.raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(key, f"expected an integer >= {minimum}, got {value!r}")
        return value

    def number(self, key: str, default: Any = None) -> float | None:
        value = self.raw.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(key, f"expected a number, got {value!r}")
        return float(value)


def _identifier(name: str) -> str:
    return re.sub(r"\W+", "_", name).strip("_") or "feature"


def _zone(reader: _Reader, key: str, default: str) -> str:
    tz = reader.str(key, default)
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise reader.fail(key, f"unknown time zone {tz!r}{_suggest(tz, sorted(available_timezones()))}") from None
    return tz


def _history_entry(fr: _Reader, name: str, features: list[FeatureEntry]) -> FeatureEntry:
    """A ``kind: history`` mapping (references to other features are resolved later)."""
    if name in RESERVED:
        raise fr.fail("name", f"{name!r} is reserved for event-log columns ({', '.join(RESERVED)})")
    if any(f.name == name for f in features):
        raise fr.fail("name", f"duplicate feature name {name!r}")
    for key, why in (("column", "a history is built from `of`"), ("sep", "only for sequence features"),
                     ("missing", "only for numeric features")):
        if fr.has(key):
            raise fr.fail(key, f"not for history features ({why})")
    window = fr.number("window_days")
    if window is not None and not window > 0:
        raise fr.fail("window_days", f"expected a positive number of days, got {window:g}")
    return FeatureEntry(
        name=name, kind="history", column="", role=fr.choice("role", ROLES, "user"),
        fm_only=fr.bool("fm_only", True), vocab=fr.str("vocab", None), group=fr.str("group", "history"),
        description=fr.str("description", ""), max_len=fr.int("max_len", 50, minimum=1),
        of=fr.str("of"), key=fr.str("key", ""), window_days=window,
        labels=fr.choice("labels", ENTRY_LABELS, "all"), yaml_path=fr.path)


def _resolve_history(f: FeatureEntry, features: list[FeatureEntry], user: str, item: str,
                     schema_file: str) -> None:
    """``of`` and ``key`` name a feature (its input column is read) or an input column."""
    where = f.yaml_path
    others = {g.name: g for g in features if g is not f}
    target = others.get(f.of)
    if target is not None:
        if target.kind not in ("categorical", "numeric"):
            raise SchemaError(f"{where}.of", f"{f.of!r} is a {target.kind} feature; a history holds the "
                                             f"values of a categorical or numeric column", file=schema_file)
        f.of_column = target.column
        if f.vocab is None and target.kind == "categorical":
            f.vocab = target.vocab or target.name  # hist_item_id shares item_id's ids and embeddings
    else:
        f.of_column = f.of  # an input column that is no feature (e.g. the rating behind the label)
    key = f.key or user
    target = others.get(key)
    if target is not None and target.kind != "categorical":
        raise SchemaError(f"{where}.key", f"{key!r} is a {target.kind} feature; the key of a history "
                                          f"must be categorical (e.g. the user)", file=schema_file)
    f.key_column = target.column if target is not None else key
    if f.key_column == item and f.role == "user" and f.key:
        f.role = "item"


def parse_schema(raw: Any, *, input_path: str, schema_file: str = "") -> EventsSchema:
    """Validate a ``yaml.safe_load``-ed schema into an `EventsSchema`."""
    top_keys = ["dataset", "format", "delimiter", "quote_char", "header", "columns", "encoding",
                "timestamp", "label", "user", "item", "features", "days"]
    if raw is None:
        raise SchemaError("", "the schema is empty; it needs at least timestamp, label, user, item",
                          file=schema_file)
    top = _Reader(raw, "", top_keys, schema_file)
    suffix = Path(input_path).suffix.lower()
    fmt = top.choice("format", ("csv", "parquet"), "parquet" if suffix in (".parquet", ".pq") else "csv")
    dataset = top.str("dataset", Path(input_path).stem or "events")
    delimiter = top.str("delimiter", ",")
    if "\n" in delimiter or "\r" in delimiter:
        raise top.fail("delimiter", f"expected a field separator without line breaks, got {delimiter!r}")
    # Quoting is off by default for multi-character delimiters (GroupLens titles hold bare quotes).
    quote_char = top.raw.get("quote_char", '"' if len(delimiter) == 1 else False)
    if quote_char is not False and not (isinstance(quote_char, str) and len(quote_char) == 1):
        raise top.fail("quote_char", f"expected one character or false, got {quote_char!r}")
    header = top.bool("header", True)
    columns = top.raw.get("columns")
    if columns is not None:
        if not isinstance(columns, list) or not all(isinstance(c, str) and c for c in columns):
            raise top.fail("columns", f"expected a list of column names, got {columns!r}")
        if header:
            raise top.fail("columns", "only for a CSV without a header line (set header: false)")
        if len(set(columns)) != len(columns):
            raise top.fail("columns", f"duplicate names in {columns}")
    elif not header and fmt == "csv":
        raise top.fail("columns", "a CSV with header: false needs `columns`, its column names in order")
    encoding = top.str("encoding", "utf-8")

    # timestamp
    ts_raw = raw.get("timestamp")
    if ts_raw is None:
        raise top.fail("timestamp", "missing (e.g. {column: ts, unit: s})")
    if isinstance(ts_raw, str):
        ts_raw = {"column": ts_raw}
    tr = _Reader(ts_raw, "timestamp", ["column", "unit", "strftime", "tz"], schema_file)
    if tr.has("unit") and tr.has("strftime"):
        raise tr.fail("unit", "give either unit (epoch integers) or strftime (date strings), not both")
    timestamp = TimestampSpec(column=tr.str("column"), unit=tr.choice("unit", tuple(UNITS), "s"),
                              strftime=tr.str("strftime", None), tz=_zone(tr, "tz", "UTC"))

    # label
    lb_raw = raw.get("label")
    if lb_raw is None:
        raise top.fail("label", "missing (e.g. {column: clicked}, {column: rating, min: 4} or {constant: 1})")
    if isinstance(lb_raw, str):
        lb_raw = {"column": lb_raw}
    lr = _Reader(lb_raw, "label", ["column", "min", "constant"], schema_file)
    if lr.has("constant"):
        if lr.has("column") or lr.has("min"):
            raise lr.fail("constant", "give either constant or column (with an optional min), not both")
        constant = lr.raw["constant"]
        if constant not in (0, 1) or isinstance(constant, bool):
            raise lr.fail("constant", f"expected 0 or 1, got {constant!r}")
        label = LabelSpec(constant=int(constant))
    else:
        label = LabelSpec(column=lr.str("column"), min=lr.number("min"))

    user, item = top.str("user"), top.str("item")
    if user == item:
        raise top.fail("item", f"the item column must differ from the user column ({user!r})")

    # features
    feats_raw = raw.get("features", [])
    if not isinstance(feats_raw, list):
        raise top.fail("features", f"expected a list of feature mappings, got {feats_raw!r}")
    feature_keys = ["name", "kind", "column", "role", "fm_only", "vocab", "group", "description",
                    "max_len", "sep", "missing", "of", "key", "window_days", "labels"]
    features: list[FeatureEntry] = []
    for i, fr_raw in enumerate(feats_raw):
        fr = _Reader(fr_raw, f"features[{i}]", feature_keys, schema_file)
        name = fr.str("name")
        if not name.isidentifier():  # a feature name becomes a file name: no paths, no spaces
            raise fr.fail("name", f"{name!r} is not an identifier (letters, digits, _; e.g. {_identifier(name)!r})")
        kind = fr.choice("kind", EVENT_KINDS)
        if kind == "history":
            features.append(_history_entry(fr, name, features))
            continue
        for key in ("of", "key", "window_days", "labels"):
            if fr.has(key):
                raise fr.fail(key, f"only for history features (this one is {kind})")
        column = fr.str("column", name)
        default_role = "user" if column == user else "item" if column == item else "context"
        role = fr.choice("role", ROLES, default_role)
        if name in RESERVED:
            raise fr.fail("name", f"{name!r} is reserved for event-log columns ({', '.join(RESERVED)}); "
                                  f"name the feature otherwise and set column: {name}")
        if any(f.name == name for f in features):
            raise fr.fail("name", f"duplicate feature name {name!r}")
        if kind != "sequence" and (fr.has("sep") or fr.has("max_len")):
            raise fr.fail("sep" if fr.has("sep") else "max_len", f"only for sequence features (this one is {kind})")
        if kind != "numeric" and fr.has("missing"):
            raise fr.fail("missing", f"only for numeric features (this one is {kind})")
        if kind == "numeric" and fr.has("vocab"):
            raise fr.fail("vocab", "a numeric feature has no vocabulary")
        sep = fr.str("sep", "|")
        features.append(FeatureEntry(
            name=name, kind=kind, column=column, role=role, fm_only=fr.bool("fm_only", False),
            vocab=fr.str("vocab", None), group=fr.str("group", role), description=fr.str("description", ""),
            max_len=fr.int("max_len", 50, minimum=1) if kind == "sequence" else 0, sep=sep,
            missing=fr.number("missing")))
    for i, f in enumerate(features):
        if f.vocab is None:
            continue
        target = next((g for g in features if g.name == f.vocab), None)
        where = f"features[{i}].vocab"
        if target is None or target is f:
            names = [g.name for g in features if g is not f]
            raise SchemaError(where, f"{f.vocab!r} is not another feature{_suggest(f.vocab, names)}",
                              file=schema_file)
        if target.kind == "numeric":
            raise SchemaError(where, f"{f.vocab!r} is numeric and has no vocabulary", file=schema_file)
        if target.vocab is not None:
            raise SchemaError(where, f"{f.vocab!r} itself shares {target.vocab!r}'s vocabulary; "
                                     f"name {target.vocab!r} instead", file=schema_file)
    for col, role in ((user, "user"), (item, "item")):
        owners = [f for f in features if f.column == col and f.kind != "history"]
        if any(f.kind != "categorical" for f in owners) and not any(f.kind == "categorical" for f in owners):
            raise top.fail(role, f"the {role} column {col!r} must be read by a categorical feature")
        if not owners:
            if col in RESERVED or any(f.name == col for f in features):
                raise top.fail(role, f"no feature reads the {role} column {col!r} and its name is taken; "
                                     f"list a categorical feature with column: {col}")
            features.insert(0 if role == "user" else 1, FeatureEntry(
                name=col, kind="categorical", column=col, role=role, group=role))
    for i, f in enumerate(features):
        if f.kind == "history":
            _resolve_history(f, features, user, item, schema_file)

    # days
    days_raw = raw.get("days", 8)
    if isinstance(days_raw, int) and not isinstance(days_raw, bool):
        if days_raw < 1:
            raise top.fail("days", f"expected a positive number of periods, got {days_raw}")
        days = DayRule("equal_count", num_days=days_raw)
    else:
        dr = _Reader(days_raw, "days", ["by", "num_days", "tz"], schema_file)
        by = dr.choice("by", ("equal_count", "calendar"))
        if by == "equal_count":
            if dr.has("tz"):
                raise dr.fail("tz", "only for by: calendar")
            days = DayRule("equal_count", num_days=dr.int("num_days", 8, minimum=1))
        else:
            if dr.has("num_days"):
                raise dr.fail("num_days", "only for by: equal_count (calendar days are counted)")
            days = DayRule("calendar", tz=_zone(dr, "tz", timestamp.tz))
    return EventsSchema(dataset=dataset, format=fmt, timestamp=timestamp, label=label, user=user,
                        item=item, features=features, days=days, delimiter=delimiter,
                        quote_char=quote_char, header=header, columns=columns, encoding=encoding)


def load_schema(path: str | Path, *, input_path: str) -> EventsSchema:
    path = Path(path)
    if not path.is_file():
        raise DataError("schema file not found", file=str(path))
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise DataError(f"not valid YAML: {err}", file=str(path)) from None
    return parse_schema(raw, input_path=input_path, schema_file=str(path))


# --- value conversion -------------------------------------------------------------------------

def _numeric(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Any column -> (float64 values, bad mask)."""
    t = arr.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return parse_float_strings(arr)
    if pa.types.is_boolean(t) or pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        values = pc.fill_null(arr.cast(pa.float64()), np.nan).to_numpy(zero_copy_only=False)
        bad = ~np.isfinite(values)
        return np.where(bad, 0.0, values), bad
    raise TypeError(t)


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


# --- the source --------------------------------------------------------------------------------

class EventsSource:
    """A CSV or Parquet file plus its YAML schema (see the module docs)."""

    def __init__(self, cfg: EventsConfig, *, seed: int, chunk_rows: int):
        for option, flag, what in (("input", "--input FILE", "the CSV or Parquet file of events"),
                                   ("schema", "--schema SCHEMA.yaml", "the YAML schema of that file")):
            if not getattr(cfg, option):
                raise ConfigError(f"the events source needs data.events.{option} ({what}; on the "
                                 f"command line: {flag})")
        self.cfg, self.seed, self.chunk_rows = cfg, seed, chunk_rows
        self.path = str(cfg.input)
        if not Path(self.path).is_file():
            raise DataError("input file not found", file=self.path)
        self.schema = load_schema(cfg.schema, input_path=self.path)
        self.skipped: dict[str, int] = {}
        self.time_range: tuple[int, int] | None = None  # set by prepare: plausible unix seconds
        self._names = self._file_columns()
        for col in self.schema.input_columns():
            self._need(col)

    # -- columns --
    def _file_columns(self) -> list[str] | None:
        if self.schema.format == "parquet":
            try:
                return pq.ParquetFile(self.path).schema_arrow.names
            except (pa.ArrowInvalid, OSError) as err:
                raise DataError(f"not a readable Parquet file: {err}", file=self.path) from None
        names = self._csv_reader(include=[]).names
        return names

    def _need(self, column: str) -> None:
        s = self.schema
        names = self._names
        if names is None:  # empty CSV file
            raise DataError(f"the file is empty: expected a header line naming the columns "
                            f"{', '.join(s.input_columns())}", file=self.path, row=1,
                            column=s.timestamp.column)
        if column in names:
            if names.count(column) > 1:
                raise DataError(f"the header names column {column!r} more than once",
                                file=self.path, row=1 if s.format == "csv" and s.header else None,
                                column=column)
            return
        role = ("user key" if column == s.user else "item key" if column == s.item
                else "timestamp" if column == s.timestamp.column else "label"
                if column == s.label.column else "feature")
        where = "the header" if s.format == "csv" and s.header else (
            "the schema's `columns`" if s.format == "csv" else "the Parquet schema")
        raise DataError(f"no {role} column {column!r} in {where}{_suggest(column, names)} "
                        f"(columns: {', '.join(names)})", file=self.path,
                        row=1 if s.format == "csv" and s.header else None, column=column)

    def _csv_reader(self, include: list[str]) -> DelimitedReader:
        s = self.schema
        return DelimitedReader(self.path, delimiter=s.delimiter, quote_char=s.quote_char,
                               header=s.header, columns=s.columns, encoding=s.encoding,
                               include=include, chunk_rows=self.chunk_rows,
                               skip_ragged=self.cfg.skip_bad_rows, what="CSV file")

    # -- protocol --
    def info(self) -> SourceInfo:
        s = self.schema
        feats = [FeatureSpec(name=f.name, kind="sequence" if f.kind == "history" else f.kind, role=f.role,
                             fm_only=f.fm_only, vocab=f.vocab, max_len=f.max_len, group=f.group,
                             description=f.description or _history_description(f))
                 for f in s.features]
        return SourceInfo(dataset=s.dataset, user_key=s.key_feature(s.user).name,
                          item_key=s.key_feature(s.item).name, features=feats, days=s.days)

    def chunks(self) -> Iterator[pa.Table]:
        if not self.schema.histories():
            yield from self._converted()
            return
        with tempfile.TemporaryDirectory(prefix="loopfm-events-") as work:
            yield from attach_histories(self._converted(), self.schema.histories(), Path(work),
                                        self.chunk_rows)

    def _converted(self) -> Iterator[pa.Table]:
        """Converted chunks in file order (with the raw key/value columns histories need)."""
        s = self.schema
        self.skipped = {}
        total = 0
        if s.format == "csv":
            reader = self._csv_reader(include=s.input_columns())
            offset = 0
            for table in reader.tables():
                base = offset
                out = self._convert(table, lambda i, base=base: reader.line(base + i))
                offset += table.num_rows
                total += out.num_rows
                yield out
            if reader.ragged_skipped:
                self.skipped["ragged_row"] = reader.ragged_skipped
            if offset == 0 and not reader.ragged_skipped:
                raise DataError("no data rows" + (" after the header" if s.header else ""),
                                file=self.path, row=reader.physical_line(2 if s.header else 1),
                                column=s.timestamp.column)
        else:
            offset = 0
            pf = pq.ParquetFile(self.path)
            for batch in pf.iter_batches(batch_size=self.chunk_rows, columns=s.input_columns()):
                base = offset
                out = self._convert(pa.Table.from_batches([batch]), lambda i, base=base: base + i + 1)
                offset += batch.num_rows
                total += out.num_rows
                yield out
            if offset == 0:
                raise DataError("no data rows", file=self.path, row=1, column=s.timestamp.column)
        if total == 0:
            raise DataError(f"every row was skipped as bad ({self.skipped})", file=self.path)

    # -- conversion of one chunk --
    def _convert(self, table: pa.Table, row_of: Callable[[int], int]) -> pa.Table:
        s = self.schema
        n = table.num_rows
        problems: list[tuple[str, str, np.ndarray, Callable[[int], str]]] = []  # reason, column, bad, message

        def col(name: str) -> pa.Array:
            c = table.column(name)
            return c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c

        def show(arr: pa.Array, i: int) -> str:
            v = arr[i].as_py()
            return "an empty value" if v is None or v == "" else repr(v)

        # timestamp
        tcol = col(s.timestamp.column)
        ts, bad_ts, ts_msg = self._timestamps(tcol)
        problems.append(("bad_timestamp", s.timestamp.column, bad_ts, lambda i: f"{ts_msg}, got {show(tcol, i)}"))
        if self.time_range is not None:  # refused here so the error names the row
            odd = ~bad_ts & ((ts < self.time_range[0]) | (ts > self.time_range[1]))
            problems.append(("bad_timestamp", s.timestamp.column, odd, lambda i: (
                f"timestamp {show(tcol, i)} is outside [1990-01-01, now + 1 day] (a wrong unit or zone?); "
                "set data.allow_any_time=true to accept it")))

        # label
        if s.label.constant is not None:
            label = np.full(n, s.label.constant, dtype=np.int8)
        else:
            lcol = col(s.label.column)
            try:
                values, bad_l = _numeric(lcol)
            except TypeError:
                raise DataError(f"expected a numeric label column, the file has type {lcol.type}",
                                file=self.path, column=s.label.column) from None
            if s.label.min is None:
                bad_l = bad_l | ~np.isin(values, (0.0, 1.0))
                label = values.astype(np.int8)
                expect = "expected a label 0 or 1"
            else:
                label = (values >= s.label.min).astype(np.int8)
                expect = f"expected a number (label = value >= {s.label.min:g})"
            problems.append(("bad_label", s.label.column, bad_l, lambda i: f"{expect}, got {show(lcol, i)}"))

        out: dict[str, Any] = {"ts": None, "label": None}
        for f in s.features:
            if f.kind == "history":
                continue
            c = col(f.column)
            if f.kind == "categorical":
                if not (pa.types.is_primitive(c.type) or pa.types.is_null(c.type) or pa.types.is_string(c.type)
                        or pa.types.is_large_string(c.type) or pa.types.is_dictionary(c.type)):
                    raise DataError(f"expected scalar values for categorical feature {f.name!r}, "
                                    f"the file has type {c.type}", file=self.path, column=f.column)
                out[f.name] = c.cast(pa.string()) if pa.types.is_dictionary(c.type) else c
            elif f.kind == "numeric":
                try:
                    values, bad_n = _numeric(c)
                except TypeError:
                    raise DataError(f"expected numbers for numeric feature {f.name!r}, the file has "
                                    f"type {c.type}", file=self.path, column=f.column) from None
                if f.missing is not None:
                    empty = _mask(c.is_null())
                    if pa.types.is_string(c.type) or pa.types.is_large_string(c.type):
                        empty |= _mask(pc.equal(_strings(c), ""))
                    values = np.where(empty, f.missing, values)
                    bad_n = bad_n & ~empty
                out[f.name] = pa.array(values, pa.float64())
                problems.append(("bad_number", f.column, bad_n,
                                 lambda i, c=c: f"expected a finite number, got {show(c, i)}"))
            else:
                out[f.name] = self._sequence(c, f)

        bad_any = np.zeros(n, dtype=bool)
        for _, _, bad, _ in problems:
            bad_any |= bad
        if bad_any.any():
            if not self.cfg.skip_bad_rows:
                first = _first(bad_any)
                reason, column, _, message = next(p for p in problems if p[2][first])
                raise DataError(message(first), file=self.path, row=row_of(first), column=column)
            claimed = np.zeros(n, dtype=bool)
            for reason, _, bad, _ in problems:
                new = bad & ~claimed
                if new.any():
                    self.skipped[reason] = self.skipped.get(reason, 0) + int(new.sum())
                claimed |= bad
        out["ts"] = pa.array(ts, pa.int64())
        out["label"] = pa.array(label, pa.int8())
        for f in s.histories():  # raw values for attach_histories (categorical: as the feature reads them)
            for c in (f.of_column, f.key_column):
                if _raw_name(c) not in out:
                    out[_raw_name(c)] = _history_values(col(c))
        result = pa.table(out)
        return result.filter(pa.array(~bad_any)) if bad_any.any() else result

    def _timestamps(self, c: pa.Array) -> tuple[np.ndarray, np.ndarray, str]:
        spec = self.schema.timestamp
        t = c.type
        if pa.types.is_timestamp(t):
            per_s = UNITS[t.unit]
            raw = pc.fill_null(c.cast(pa.int64()), 0).to_numpy(zero_copy_only=False)
            secs = np.floor_divide(raw, per_s)
            if t.tz is None:
                secs = local_to_utc(secs, spec.tz)
            return secs, _mask(c.is_null()), "expected a timestamp"
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            if spec.strftime is not None:
                parsed = pc.strptime(_strings(c), format=spec.strftime, unit="s", error_is_null=True)
                secs = pc.fill_null(parsed.cast(pa.int64()), 0).to_numpy(zero_copy_only=False)
                if parsed.type.tz is None:
                    secs = local_to_utc(secs, spec.tz)
                return secs, _mask(parsed.is_null()), f"expected a time like {spec.strftime!r}"
            values, bad = parse_int_strings(c)
        elif spec.strftime is not None:
            raise DataError(f"the schema gives strftime {spec.strftime!r} but the column holds {t} "
                            f"values, not strings; give unit instead", file=self.path, column=spec.column)
        elif pa.types.is_integer(t):
            values = pc.fill_null(c.cast(pa.int64()), 0).to_numpy(zero_copy_only=False)
            bad = _mask(c.is_null())
        elif pa.types.is_floating(t):
            f = pc.fill_null(c.cast(pa.float64()), np.nan).to_numpy(zero_copy_only=False)
            bad = ~np.isfinite(f) | (np.floor(f) != f)
            values = np.where(bad, 0, f).astype(np.int64)
        else:
            raise DataError(f"expected integer, string or timestamp values, the file has type {t}",
                            file=self.path, column=spec.column)
        return np.floor_divide(values, UNITS[spec.unit]), bad, f"expected an integer timestamp in {spec.unit}"

    def _sequence(self, c: pa.Array, f: FeatureEntry) -> pa.Array:
        t = c.type
        if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
            return c.cast(pa.list_(t.value_type)) if not pa.types.is_list(t) else c
        if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
            raise DataError(f"expected a list or a {f.sep!r}-separated string for sequence feature "
                            f"{f.name!r}, the file has type {t}", file=self.path, column=f.column)
        split = pc.fill_null(pc.split_pattern(c.cast(pa.string()), f.sep), pa.scalar([], pa.list_(pa.string())))
        tokens = pc.utf8_trim_whitespace(split.flatten())
        keep = _mask(pc.not_equal(tokens, ""))
        if keep.all():
            offsets = split.offsets.to_numpy()
            return pa.ListArray.from_arrays(pa.array(offsets - offsets[0]), tokens)
        parents = pc.list_parent_indices(split).to_numpy()
        counts = np.bincount(parents[keep], minlength=len(split))
        offsets = np.zeros(len(split) + 1, dtype=np.int32)
        np.cumsum(counts, out=offsets[1:])
        return pa.ListArray.from_arrays(pa.array(offsets), tokens.filter(pa.array(keep)))


# --- kind: history ---------------------------------------------------------------------------------

def _raw_name(column: str) -> str:
    return f"__raw__{column}"


def _history_values(c: pa.Array) -> pa.Array:
    """A column's values as a categorical feature reads them (a dictionary column decoded)."""
    return c.cast(pa.string()) if pa.types.is_dictionary(c.type) else c


def _history_description(f: FeatureEntry) -> str:
    if f.kind != "history":
        return ""
    window = f" within {f.window_days:g} days" if f.window_days else ""
    which = "" if f.labels == "all" else f" {f.labels}"
    return f"{f.of} of the same {f.key or 'user'}'s strictly earlier{which} events{window}, newest last"


def attach_histories(chunks: Iterator[pa.Table], specs: list[FeatureEntry], work: Path,
                     chunk_rows: int) -> Iterator[pa.Table]:
    """Add every ``kind: history`` column, in one streaming pass over the rows in time order.

    Histories with the same key, window and label filter share one `StreamingHistories` (their
    lists are aligned); each keeps the group's longest ``max_len`` and prepare truncates it.
    """
    groups: dict[tuple, list[FeatureEntry]] = {}
    for f in specs:
        groups.setdefault((f.key_column, f.window_days, f.labels), []).append(f)
    builders = {g: StreamingHistories(max(f.max_len for f in fs),
                                      window=None if g[1] is None else int(round(g[1] * 86_400)))
                for g, fs in groups.items()}
    for table in time_ordered(chunks, work, chunk_rows):
        label, ts = table.column("label").to_numpy(), table.column("ts").to_numpy()
        for (key_col, window_days, labels), fs in groups.items():
            entry = None if labels == "all" else entry_mask(label, labels)
            lists = builders[(key_col, window_days, labels)].update(
                table.column(_raw_name(key_col)).combine_chunks(), ts,
                {f.name: table.column(_raw_name(f.of_column)).combine_chunks() for f in fs}, entry)
            for f in fs:
                table = table.append_column(f.name, lists[f.name])
        yield table.drop_columns([c for c in table.column_names if c.startswith("__raw__")])
