"""Run tracking: one metrics-logger interface with TensorBoard and JSONL behind it.

``log(scalars, step)`` and ``close()``; written on rank 0 only (other ranks get a `NullLogger`).
JSONL lines are ``{"step": N, "name": value, ...}``; TensorBoard gets one scalar per name.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Protocol


class MetricLogger(Protocol):
    def log(self, scalars: Mapping[str, float], step: int) -> None: ...

    def close(self) -> None: ...


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
        self._f.write(json.dumps({"step": step, **{k: float(v) for k, v in scalars.items()}}) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class TensorBoardLogger:
    def __init__(self, folder: str | Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imported lazily: tensorboard is heavy

        self._writer = SummaryWriter(log_dir=str(folder))

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        for name, value in scalars.items():
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
            loggers.append(TensorBoardLogger(folder / "tb"))
        except ImportError:  # tensorboard not installed: JSONL still records everything
            pass
    return MultiLogger(*loggers)
