"""What a data source hands to `prepare`: a description and raw chunks in file order.

A source module (``loopfm/data/sources/*.py``) knows one input format. It yields
``pyarrow.Table`` chunks, in the input's own order, with these columns:

* ``ts``    int64 unix seconds (sources without timestamps synthesise an order-preserving one);
* ``label`` integer 0/1;
* one column per feature of `SourceInfo.features`, with *raw* values:
  categorical -> any scalar type (null = missing, a vocabulary entry of its own);
  numeric -> float (no nulls); sequence -> list of scalars, newest last.

Everything else (global time order, example ids, day cuts, vocabularies, id encoding,
truncation, Parquet layout, atomic output) is done once, in `loopfm.data.prepare`.
Bad input is reported by the source as a `DataError` naming the file, row and column.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal, Protocol

import pyarrow as pa

from loopfm.data.schema import FeatureSpec


@dataclass(frozen=True)
class DayRule:
    """How events are cut into days.

    ``equal_count``: ``num_days`` periods of equal row count in (ts, input order) order (for data
    that spans months, like MovieLens, or has no clock, like TaobaoAd_x1).
    ``calendar``: one day per local calendar date in time zone ``tz``; day 1 = first date seen.
    """
    kind: Literal["equal_count", "calendar"]
    num_days: int = 8
    tz: str = "UTC"


@dataclass
class SourceInfo:
    dataset: str
    user_key: str
    item_key: str
    features: list[FeatureSpec]
    days: DayRule


class RawSource(Protocol):
    # Rows dropped under an explicit skip option, by reason; complete once chunks() is exhausted.
    skipped: dict[str, int]

    def info(self) -> SourceInfo: ...

    def chunks(self) -> Iterator[pa.Table]: ...
