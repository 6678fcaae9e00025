"""Reading delimited text files: the one reader every text source uses (events, movielens,
taobao-raw, taobao-x1), and the string -> value converters behind their error messages.

`DelimitedReader` streams a file as all-string tables of ``chunk_rows`` rows with pyarrow's CSV
reader and keeps what is needed to name the physical 1-based line of any data row (header =
line 1). It adds, over pyarrow:

* multi-character delimiters (GroupLens MovieLens-1M/10M ``::``): the bytes are rewritten on the
  fly to the ASCII unit separator (a file already holding that byte is refused); quoting is off
  by default for them (MovieLens titles hold bare ``"`` characters);
* any Python text encoding (``latin-1`` MovieLens titles), decoded by pyarrow;
* ragged rows as a `DataError` naming file, line and the column where the row ends (or counted
  and skipped with ``skip_ragged``);
* blank lines skipped (events, movielens) or read as a row of empty fields (``keep_empty_lines``:
  the Tianchi files, where every line is a row).

Converters: ``parse_int_strings`` / ``parse_float_strings`` return values and a bad-row mask (the
caller names the row); ``parse_int`` / ``parse_float`` / ``parse_label`` / ``parse_time`` raise the
`DataError` themselves, given the chunk's first line.
"""
from __future__ import annotations

import csv
import difflib
import io
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Sequence
from zoneinfo import ZoneInfo

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from loopfm.data.errors import DataError

UNIT_SEPARATOR = b"\x1f"  # what a multi-character delimiter becomes for pyarrow


class _Substituted(io.RawIOBase):
    """A binary file with every occurrence of ``delimiter`` replaced by the unit separator."""

    def __init__(self, path: str, delimiter: bytes, block: int = 1 << 20) -> None:
        self._f = open(path, "rb")
        self.path, self._delim, self._block = path, delimiter, block
        self._pending, self._out, self._pos = b"", b"", 0

    def readable(self) -> bool:
        return True

    def _fill(self) -> bool:
        data = self._f.read(self._block)
        if not data:
            if self._pending:
                self._out, self._pos = self._pending, 0  # an unfinished delimiter at the end: as is
                self._pending = b""
                return True
            return False
        data = self._pending + data
        if UNIT_SEPARATOR in data:
            raise DataError("the file holds the control character U+001F, which a multi-character "
                            "delimiter cannot be read around", file=self.path)
        data = data.replace(self._delim, UNIT_SEPARATOR)
        keep = 0  # a delimiter may straddle the block boundary: hold back an unfinished one
        for k in range(len(self._delim) - 1, 0, -1):
            if data.endswith(self._delim[:k]):
                keep = k
                break
        self._out, self._pos = data[:len(data) - keep], 0
        self._pending = data[len(data) - keep:]
        return True

    def readinto(self, buffer) -> int:
        while self._pos >= len(self._out):
            if not self._fill():
                return 0
        n = min(len(buffer), len(self._out) - self._pos)
        buffer[:n] = memoryview(self._out)[self._pos:self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        self._f.close()
        super().close()


def split_line(line: str, delimiter: str, quote_char: str | bool) -> list[str]:
    """One text line's fields (the header parser)."""
    if len(delimiter) > 1:
        return line.split(delimiter)
    quoting = {"quoting": csv.QUOTE_NONE} if quote_char is False else {"quotechar": quote_char}
    return next(csv.reader([line], delimiter=delimiter, **quoting))


def _python_encoding(encoding: str) -> str:
    return "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding


class DelimitedReader:
    """Streams a delimited text file as all-string tables of ``chunk_rows`` rows.

    ``header``: the first line names the columns (``columns``, when given, replaces those names).
    ``include``: the columns read (all others are skipped). After `tables` has run,
    ``line(k)`` is the physical line of data row ``k`` (0-based, over the whole file).
    """

    def __init__(self, path: str, *, delimiter: str = ",", quote_char: str | bool | None = None,
                 header: bool = True, columns: Sequence[str] | None = None, encoding: str = "utf-8",
                 include: Sequence[str] = (), chunk_rows: int = 1 << 62, skip_ragged: bool = False,
                 keep_empty_lines: bool = False, strip_names: bool = False, what: str = ""):
        if not delimiter:
            raise ValueError("the delimiter must not be empty")
        self.path, self.delimiter = str(path), delimiter
        self.quote_char = (False if len(delimiter) > 1 else '"') if quote_char is None else quote_char
        self.header, self.encoding, self.chunk_rows = header, encoding, chunk_rows
        self.include, self.skip_ragged, self.what = list(include), skip_ragged, what
        self.keep_empty_lines, self.strip_names = keep_empty_lines, strip_names
        self.ragged_skipped = 0
        self._dropped: list[int] = []  # logical row numbers of skipped ragged rows
        self._ragged: tuple[int | None, int, int, str] | None = None
        self._renamed = columns is not None and header
        self.names = list(columns) if columns is not None else self._read_header()

    def _read_header(self) -> list[str] | None:
        with open(self.path, encoding=_python_encoding(self.encoding), newline="") as f:
            line = f.readline()
        if not line.strip():
            return None
        names = split_line(line.rstrip("\r\n"), self.delimiter, self.quote_char)
        return [n.strip() for n in names] if self.strip_names else names

    def _handler(self, row) -> str:
        if self.skip_ragged:
            self._dropped.append(row.number)
            self.ragged_skipped += 1
            return "skip"
        if self._ragged is None:
            self._ragged = (row.number, row.expected_columns, row.actual_columns, row.text)
        return "error"

    def logical_row(self, k: int) -> int:
        """Logical line (blank lines not counted, unless kept) of the 0-based data row ``k``."""
        line = k + (2 if self.header else 1)
        for s in self._dropped:
            if s <= line:
                line += 1
            else:
                break
        return line

    def physical_line(self, logical: int) -> int:
        """Physical 1-based line of a logical one (error path only: scans the file)."""
        if self.keep_empty_lines:
            return logical
        seen = 0
        with open(self.path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if raw.rstrip(b"\r\n"):
                    seen += 1
                    if seen == logical:
                        return number
        return logical

    def line(self, k: int) -> int:
        return self.physical_line(self.logical_row(k))

    def _ragged_error(self) -> DataError:
        number, expected, actual, text = self._ragged
        names = self.names or []
        if actual < expected:
            column = names[actual] if actual < len(names) else None
            msg = f"expected {expected} fields, got {actual} (the row ends before this column)"
        else:
            column = names[-1] if names else None
            msg = f"expected {expected} fields, got {actual} (extra fields after this column)"
        text = text.replace(UNIT_SEPARATOR.decode(), self.delimiter)
        text = text if len(text) <= 80 else text[:77] + "..."
        row = self.physical_line(number) if number is not None else None
        return DataError(f"{msg}: {text!r}", file=self.path, row=row, column=column)

    def _source(self):
        if len(self.delimiter) == 1:
            return self.path, self.delimiter
        raw = self.delimiter.encode(_python_encoding(self.encoding).replace("-sig", ""))
        return io.BufferedReader(_Substituted(self.path, raw)), UNIT_SEPARATOR.decode()

    def tables(self) -> Iterator[pa.Table]:
        """The file's data rows, ``chunk_rows`` at a time, every included column as strings."""
        source, delimiter = self._source()
        read = pcsv.ReadOptions(use_threads=False, encoding=self.encoding,
                                column_names=self.names if (self._renamed or not self.header) else None,
                                skip_rows=1 if self._renamed else 0,
                                block_size=int(min(max(min(self.chunk_rows, 1 << 20) * 256, 1 << 16), 64 << 20)))
        parse = pcsv.ParseOptions(delimiter=delimiter, quote_char=self.quote_char,
                                  invalid_row_handler=self._handler,
                                  ignore_empty_lines=not self.keep_empty_lines)
        convert = pcsv.ConvertOptions(column_types={c: pa.string() for c in self.include},
                                      include_columns=self.include, strings_can_be_null=False,
                                      quoted_strings_can_be_null=False)
        buf: list[pa.RecordBatch] = []
        n = 0
        schema = None
        try:
            reader = pcsv.open_csv(source, read_options=read, parse_options=parse, convert_options=convert)
            schema = reader.schema
            for batch in reader:
                if self._ragged is not None:
                    raise self._ragged_error()
                buf.append(batch)
                n += batch.num_rows
                while n >= self.chunk_rows:
                    table = pa.Table.from_batches(buf, schema)
                    yield table.slice(0, self.chunk_rows).combine_chunks()
                    rest = table.slice(self.chunk_rows)
                    buf, n = rest.to_batches(), rest.num_rows
        except (pa.ArrowInvalid, UnicodeDecodeError) as err:
            if self._ragged is not None:
                raise self._ragged_error() from None
            raise DataError(f"cannot parse the {self.what or 'file'}: {err}", file=self.path) from None
        finally:
            if not isinstance(source, str):
                source.close()
        if self._ragged is not None:
            raise self._ragged_error()
        if n:
            yield pa.Table.from_batches(buf, schema).combine_chunks()


# --- header helpers ----------------------------------------------------------------------------

def read_header(path: Path, delimiter: str = ",", encoding: str = "utf-8") -> list[str]:
    """The stripped column names of ``path``'s first line; `DataError` for an empty file or
    duplicate names."""
    names = DelimitedReader(str(path), delimiter=delimiter, encoding=encoding, strip_names=True).names
    if names is None:
        raise DataError("the file is empty (expected a header line)", file=str(path), row=1)
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"duplicate column names {dupes} in the header", file=str(path), row=1)
    return names


def require_columns(path: Path, header: Sequence[str], required: Sequence[str]) -> None:
    """`DataError` naming the first required column absent from ``header`` (nearest match hinted)."""
    for name in required:
        if name not in header:
            near = difflib.get_close_matches(name, list(header), n=1, cutoff=0.6)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise DataError(f"missing column {name!r}{hint} (the header has {list(header)})",
                            file=str(path), row=1, column=name)


def iter_text_chunks(path: Path, *, names: Sequence[str], use: Sequence[str], chunk_rows: int,
                     header: bool = True, delimiter: str = ",") -> Iterator[tuple[pa.Table, int]]:
    """Stream a file whose every line is a row as ``(table, line of its first row)``.

    ``names`` are all the file's columns (a header line is skipped and replaced by them), ``use``
    the ones kept. An empty line is a row of empty fields (so line numbers stay right) and fails
    where a value is required.
    """
    reader = DelimitedReader(str(path), delimiter=delimiter, header=header, columns=list(names),
                             include=list(use), chunk_rows=chunk_rows, keep_empty_lines=True)
    line = first = 2 if header else 1
    for table in reader.tables():
        yield table, line
        line += table.num_rows
    if line == first:
        raise DataError("the file has no data rows" + (" (only a header)" if header else ""),
                        file=str(path), row=first)


# --- converters that return a bad-row mask (the caller names the row) --------------------------

_INT_OR_DOT0_RE = r"^[+-]?\d+(\.0*)?$"
_DECIMAL_RE = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"


def mask(arr: pa.Array) -> np.ndarray:
    """A boolean array as numpy, null = True."""
    return np.asarray(pc.fill_null(arr, True).to_numpy(zero_copy_only=False), dtype=bool)


def trimmed(arr: pa.Array) -> pa.Array:
    return pc.utf8_trim_whitespace(arr.cast(pa.string()))


def parse_int_strings(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Integer strings (``"881250949"``, ``"881250949.0"``) -> (int64 values, bad mask)."""
    s = trimmed(arr)
    ok = pc.fill_null(pc.match_substring_regex(s, _INT_OR_DOT0_RE), False)
    cleaned = pc.replace_substring_regex(pc.if_else(ok, s, "0"), r"\.0*$", "")
    try:
        values = cleaned.cast(pa.int64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, OverflowError):  # out of int64 range: find it in Python
        vals, okl = [], []
        for v in cleaned.to_pylist():
            try:
                vals.append(int(v)); okl.append(-2**63 <= int(v) < 2**63)
            except ValueError:
                vals.append(0); okl.append(False)
        values = np.array([v if o else 0 for v, o in zip(vals, okl)], dtype=np.int64)
        ok = pc.and_(ok, pa.array(okl))
    return values.astype(np.int64, copy=False), ~mask(pc.fill_null(ok, False))


def parse_float_strings(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Finite decimal number strings -> (float64 values, bad mask); empty/garbage are bad."""
    s = trimmed(arr)
    ok = pc.fill_null(pc.match_substring_regex(s, _DECIMAL_RE), False)
    values = pc.if_else(ok, s, "0").cast(pa.float64()).to_numpy(zero_copy_only=False)
    bad = ~mask(ok) | ~np.isfinite(values)
    return np.where(bad, 0.0, values), bad


def local_to_utc(local: np.ndarray, tz: str) -> np.ndarray:
    """Unix-like seconds of naive local times in ``tz`` -> true unix seconds (the zone's offset
    at the start of each local hour, looked up once per distinct hour)."""
    if tz == "UTC" or len(local) == 0:
        return local
    zone = ZoneInfo(tz)
    hours, inverse = np.unique(local // 3600, return_inverse=True)
    offsets = np.array([datetime.fromtimestamp(int(h) * 3600, tz=timezone.utc).replace(tzinfo=zone)
                        .utcoffset().total_seconds() for h in hours], dtype=np.int64)
    return local - offsets[inverse]


# --- converters that raise (Tianchi files: every line a row, so row = first line + index) -------

NULL_TOKENS = ("", "NULL")
_INT_RE = r"^[+-]?[0-9]+$"
_FLOAT_RE = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$"
_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
_LABELS = pa.array(["0", "1", "0.0", "1.0"])


def _first(bad: pa.Array | pa.ChunkedArray) -> int:
    return int(np.flatnonzero(np.asarray(bad.to_numpy(zero_copy_only=False), dtype=bool))[0])


def _array(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _got(value: str | None) -> str:
    return repr(value) if value else "an empty value"


def _is_null_token(col: pa.Array) -> pa.Array:
    return pc.is_in(col, value_set=pa.array(NULL_TOKENS))


def parse_str(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    """A categorical string column: empty and ``NULL`` become null (missing)."""
    col = _array(col)
    return pc.if_else(_is_null_token(col), pa.scalar(None, pa.string()), col)


def parse_int(col: pa.Array | pa.ChunkedArray, *, file: str, line: int, column: str,
              nullable: bool = False, what: str = "an integer") -> pa.Array:
    """int64 from strings; empty/``NULL`` is null when ``nullable``, else an error."""
    col = _array(col)
    null = _is_null_token(col) if nullable else None
    try:  # fast path: a plain cast succeeds on clean input; only a failure pays for the search
        return pc.cast(pc.if_else(null, pa.scalar(None, pa.string()), col) if nullable else col,
                       pa.int64())
    except pa.ArrowInvalid:
        pass
    bad = pc.invert(pc.match_substring_regex(col, _INT_RE))
    if nullable:
        bad = pc.and_(bad, pc.invert(null))
    if pc.any(bad).as_py():
        i = _first(bad)
        raise DataError(f"expected {what}, got {_got(col[i].as_py())}", file=file, row=line + i, column=column)
    cleaned = pc.if_else(null, pa.scalar(None, pa.string()), col) if nullable else col
    try:
        return pc.cast(cleaned, pa.int64())
    except pa.ArrowInvalid:  # more than 19 digits
        values = cleaned.to_pylist()
        i = next(k for k, v in enumerate(values) if v is not None and not -2**63 <= int(v) < 2**63)
        raise DataError(f"expected {what} within int64, got {values[i]!r}", file=file,
                        row=line + i, column=column) from None


def parse_float(col: pa.Array | pa.ChunkedArray, *, file: str, line: int, column: str) -> pa.Array:
    """float64 from strings; empty values and non-numbers (also nan/inf) are errors."""
    col = _array(col)
    try:  # fast path, as in parse_int; nan/inf parse but are rejected below
        out = pc.cast(col, pa.float64())
        if pc.all(pc.is_finite(out)).as_py() is not False:
            return out
    except pa.ArrowInvalid:
        pass
    bad = pc.invert(pc.match_substring_regex(col, _FLOAT_RE))
    if pc.any(bad).as_py():
        i = _first(bad)
        raise DataError(f"expected a number, got {_got(col[i].as_py())}", file=file, row=line + i, column=column)
    return pc.cast(col, pa.float64())


def parse_label(col: pa.Array | pa.ChunkedArray, *, file: str, line: int, column: str) -> pa.Array:
    """A click label: 0 or 1 (also written 0.0 / 1.0)."""
    col = _array(col)
    bad = pc.invert(pc.is_in(col, value_set=_LABELS))
    if pc.any(bad).as_py():
        i = _first(bad)
        raise DataError(f"expected a click label 0 or 1, got {_got(col[i].as_py())}",
                        file=file, row=line + i, column=column)
    return pc.cast(pc.is_in(col, value_set=pa.array(["1", "1.0"])), pa.int8())


def parse_time(col: pa.Array | pa.ChunkedArray, *, file: str, line: int, column: str,
               tz: str) -> np.ndarray:
    """Unix seconds (int64) from integer seconds or ``YYYY-MM-DD HH:MM:SS`` local time in ``tz``."""
    col = _array(col)
    is_int = pc.match_substring_regex(col, _INT_RE)
    naive = pc.strptime(col, format=_TIME_FORMAT, unit="s", error_is_null=True)
    bad = pc.and_(pc.invert(is_int), pc.is_null(naive))
    if pc.any(bad).as_py():
        i = _first(bad)
        raise DataError("expected a unix timestamp in seconds or a 'YYYY-MM-DD HH:MM:SS' date-time, "
                        f"got {_got(col[i].as_py())}", file=file, row=line + i, column=column)
    out = np.zeros(len(col), dtype=np.int64)
    ints = np.asarray(is_int.to_numpy(zero_copy_only=False), dtype=bool)
    if ints.any():
        digits = pc.if_else(is_int, col, pa.scalar("0"))
        out[ints] = parse_int(digits, file=file, line=line, column=column,
                              what="a unix timestamp").to_numpy()[ints]
    if not ints.all():
        wall = pc.fill_null(naive.cast(pa.int64()), 0).to_numpy()[~ints]
        out[~ints] = local_to_utc(wall, tz)
    return out
