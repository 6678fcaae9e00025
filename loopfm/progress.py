"""Progress display: a tqdm bar on a terminal, a few plain lines in a log.

Every stage reports progress through `progress_bar` (and per-run lines through `write`). When
stderr is a terminal it is an ordinary tqdm bar; otherwise (a log file, a CI job, a scheduler's
stderr) it prints at most one line per ``LOG_EVERY_S`` seconds, plus one at the end, instead of
thousands of carriage-return frames.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Iterable, Iterator

LOG_EVERY_S = 30.0


def progress_bar(iterable: Iterable | None = None, *, desc: str, total: float | None = None,
                 enabled: bool = True, **tqdm_kwargs: Any):
    """A tqdm bar when ``enabled`` and stderr is a terminal, else a `LogProgress` (silent when not
    ``enabled``). Either one iterates ``iterable`` and has ``update(n)`` and ``close()``."""
    if enabled and sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(iterable, desc=desc, total=total, **tqdm_kwargs)
    return LogProgress(iterable, desc=desc, total=total, enabled=enabled, unit=tqdm_kwargs.get("unit", "it"),
                       initial=tqdm_kwargs.get("initial", 0))


def write(message: str) -> None:
    """A line that does not break a live bar (tqdm.write on a terminal, print otherwise)."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        tqdm.write(message)
    else:
        print(message, flush=True)


class LogProgress:
    """tqdm's interface for a log: one ``[desc] n/total unit (elapsed)`` line every LOG_EVERY_S."""

    def __init__(self, iterable: Iterable | None = None, *, desc: str, total: float | None = None,
                 enabled: bool = True, unit: str = "it", initial: float = 0, every_s: float = LOG_EVERY_S,
                 file=None) -> None:
        self.iterable, self.desc, self.enabled, self.unit = iterable, desc, enabled, unit.strip() or "it"
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n, self.every_s, self.file = total, initial, every_s, file
        self.start = self.last = time.monotonic()
        self.closed = False

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self.enabled and now - self.last >= self.every_s:
            self.last = now
            self._line()

    def close(self) -> None:
        if self.enabled and not self.closed and self.n:
            self._line()
        self.closed = True

    def _line(self) -> None:
        of = f"/{self.total:g}" if self.total else ""
        print(f"[{self.desc}] {self.n:g}{of} {self.unit} ({time.monotonic() - self.start:.0f}s)",
              file=self.file or sys.stderr, flush=True)
