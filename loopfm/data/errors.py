"""One error type for bad input data: it names the file, row, column and what was expected."""
from __future__ import annotations


class DataError(ValueError):
    """Bad input data. ``row`` is the 1-based line number in a text file (header = line 1),
    or the 1-based row number in a Parquet file."""

    def __init__(self, message: str, *, file: str | None = None, row: int | None = None,
                 column: str | None = None):
        self.file, self.row, self.column, self.detail = file, row, column, message
        where = []
        if file is not None:
            where.append(str(file))
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column {column!r}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
