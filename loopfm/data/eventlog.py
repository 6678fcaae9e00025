"""Reading a prepared event log (the output of `prepare`)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from loopfm.artifacts import read_manifest
from loopfm.data.schema import Schema
from loopfm.data.vocab import Vocab


class EventLog:
    """A finished ``prepare`` output: schema, vocabularies and day-partitioned events.

    Rows come back in example-id (= time) order: days ascending, parts in name order.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.schema = Schema.load(self.root / "schema.json")

    @property
    def days(self) -> list[int]:
        return sorted(int(d) for d in self.manifest["rows_per_day"])

    def _days(self, days: Sequence[int] | None) -> Sequence[int]:
        """None = every day; an empty list is an error, never "all days" (it once trained VMs on the test day)."""
        if days is None:
            return self.days
        if len(days) == 0:
            raise ValueError(f"{self.root}: an empty list of days was asked for (name the days)")
        return days

    def num_rows(self, days: Sequence[int] | None = None) -> int:
        rows = self.manifest["rows_per_day"]
        return sum(rows[str(d)] for d in self._days(days) if str(d) in rows)

    def files(self, days: Sequence[int] | None = None) -> list[Path]:
        out: list[Path] = []
        for d in self._days(days):
            if d not in self.days:
                raise ValueError(f"{self.root}: no day {d}; days are {self.days}")
            out.extend(sorted((self.root / "events" / f"day={d}").glob("part-*.parquet")))
        return out

    def read(self, days: Sequence[int] | None = None, columns: Sequence[str] | None = None) -> pa.Table:
        tables = [pq.read_table(p, columns=list(columns) if columns else None) for p in self.files(days)]
        return pa.concat_tables(tables)

    def iter_batches(self, days: Sequence[int] | None = None, batch_size: int = 4096,
                     columns: Sequence[str] | None = None) -> Iterator[pa.RecordBatch]:
        """Stream record batches in time order (a batch never spans two files)."""
        for path in self.files(days):
            yield from pq.ParquetFile(path).iter_batches(batch_size=batch_size,
                                                         columns=list(columns) if columns else None)

    def vocab(self, name: str) -> Vocab:
        return Vocab.load(self.root / "vocab" / f"{name}.parquet")
