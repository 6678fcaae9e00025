"""Input formats, one module each, all turned into the same event log by `loopfm.data.prepare`.

To add a format: write ``sources/<name>.py`` with a config dataclass and a class with
``info()`` and ``chunks()`` (see `loopfm.data.source`), then register both below.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from loopfm.data.source import RawSource
from loopfm.data.sources.events import EventsConfig, EventsSource
from loopfm.data.sources.movielens import MovieLensConfig, MovieLensSource
from loopfm.data.sources.synthetic import SyntheticConfig, SyntheticSource
from loopfm.data.sources.taobao_raw import TaobaoRawConfig, TaobaoRawSource
from loopfm.data.sources.taobao_x1 import TaobaoX1Config, TaobaoX1Source

SourceName = Literal["synthetic", "movielens", "taobao-raw", "taobao-x1", "events"]


@dataclass(kw_only=True)
class DataConfig:
    """Which source to prepare and how; only the section named by ``source`` is used."""
    source: SourceName = field(default="synthetic", metadata={"help": "input format"})
    min_count: int = field(default=1, metadata={
        "help": "values seen fewer times (over all days) map to the out-of-vocabulary id"})
    chunk_rows: int = field(default=250_000, metadata={
        "help": "rows read per chunk: bounds memory (about 1 GB per 250k rows with 3 x 50-long histories)"})
    allow_any_time: bool = field(default=False, metadata={
        "help": "accept timestamps outside [1990-01-01, now + 1 day] (refused by default: a wrong unit or zone)"})
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    movielens: MovieLensConfig = field(default_factory=MovieLensConfig)
    taobao_raw: TaobaoRawConfig = field(default_factory=TaobaoRawConfig)
    taobao_x1: TaobaoX1Config = field(default_factory=TaobaoX1Config)
    events: EventsConfig = field(default_factory=EventsConfig)

    def __post_init__(self) -> None:
        if self.min_count < 1:
            raise ValueError(f"data.min_count must be >= 1, got {self.min_count}")
        if self.chunk_rows < 1:
            raise ValueError(f"data.chunk_rows must be >= 1, got {self.chunk_rows}")

    def source_config(self):
        return getattr(self, self.source.replace("-", "_"))


_SOURCES = {
    "synthetic": SyntheticSource,
    "movielens": MovieLensSource,
    "taobao-raw": TaobaoRawSource,
    "taobao-x1": TaobaoX1Source,
    "events": EventsSource,
}


def build_source(cfg: DataConfig, seed: int) -> RawSource:
    return _SOURCES[cfg.source](cfg.source_config(), seed=seed, chunk_rows=cfg.chunk_rows)
