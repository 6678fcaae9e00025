"""Run tracking: one metrics-logger interface with TensorBoard and JSONL behind it.

``log(scalars, step)`` and ``close()``; written on rank 0 only (other ranks get a `NullLogger`).
Values that are not numbers (an undefined metric's None, its reasons) are not logged.
JSONL lines are ``{"step": N, "name": value, ...}``; TensorBoard gets one scalar per name.

A rerun never stacks values: a stage that writes event files from scratch writes them into
`replaced_folder`, which replaces the last run's folder when the stage succeeds; a resumed trainer
truncates its JSONL after the checkpoint's step and has TensorBoard purge the later events.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Protocol


class MetricLogger(Protocol):
    def log(self, scalars: Mapping[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def numbers(scalars: Mapping[str, object]) -> dict[str, float]:
    """The entries that are real numbers (tensors included); None and text are left out."""
    return {k: v for k, v in scalars.items()
            if v is not None and not isinstance(v, (str, bytes, bool, Mapping, list, tuple))}


class NullLogger:
    def log(self, scalars: Mapping[str, float], step: int) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlLogger:
    """Appends one JSON line per call; ``truncate_after`` drops records past a resumed step."""

    def __init__(self, path: str | Path, truncate_after: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_after is not None and self.path.is_file():
            keep = [line for line in self.path.read_text().splitlines()
                    if line and json.loads(line)["step"] <= truncate_after]
            self.path.write_text("".join(line + "\n" for line in keep))
        self._f = open(self.path, "a")

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        self._f.write(json.dumps({"step": step, **{k: float(v) for k, v in numbers(scalars).items()}}) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class TensorBoardLogger:
    """``purge_step``: a resumed run's events from this step on replace the killed run's."""

    def __init__(self, folder: str | Path, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imported lazily: tensorboard is heavy

        self._writer = SummaryWriter(log_dir=str(folder), purge_step=purge_step)

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        for name, value in numbers(scalars).items():
            self._writer.add_scalar(name, float(value), step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class MultiLogger:
    def __init__(self, *loggers: MetricLogger) -> None:
        self.loggers = loggers

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.log(scalars, step)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def build_logger(folder: str | Path, rank: int, *, resume_step: int | None = None,
                 tensorboard: bool = True) -> MetricLogger:
    """``folder/metrics.jsonl`` + ``folder/tb/`` on rank 0; a no-op logger elsewhere."""
    if rank != 0:
        return NullLogger()
    folder = Path(folder)
    loggers: list[MetricLogger] = [JsonlLogger(folder / "metrics.jsonl", truncate_after=resume_step)]
    if tensorboard:
        try:
            purge = None if resume_step is None else resume_step + 1
            loggers.append(TensorBoardLogger(folder / "tb", purge_step=purge))
        except ImportError:  # tensorboard not installed: JSONL still records everything
            pass
    return MultiLogger(*loggers)


