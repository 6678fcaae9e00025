"""One writer per run folder: ``RUN/.lock``, held for a whole command.

Every command that writes into a run folder (run, each stage, sweep, tune-kd, report) takes
``fcntl.flock`` on ``RUN/.lock`` before it writes anything and keeps it until it exits; the file
holds a JSON record of the holder (pid, command line, start time). A second command on the same
folder stops at once with `RunLocked`, naming the holder. The kernel drops the lock when the
holder dies, so a killed run never leaves the folder locked. Within one process the lock is
re-entrant (``sweep`` holds its folder while it runs each point).

Only the holder deletes stale temp folders (`loopfm.artifacts.atomic_output` asks `holds`), so a
live run's temp folder is never taken for a dead one's.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterator

LOCK_FILE = ".lock"
_held: dict[Path, int] = {}  # resolved run folder -> open file descriptor (this process)


class RunLocked(RuntimeError):
    """Another process holds the run folder's lock."""


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def run_lock(run_dir: str | Path, command: list[str] | None = None) -> Iterator[Path]:
    """Hold ``RUN/.lock`` for the ``with`` block, or raise `RunLocked` naming the holder."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    key = run_dir.resolve()
    if key in _held:  # re-entrant within this process
        yield key
        return
    path = key / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        h = _holder(path)
        raise RunLocked(f"{run_dir} is in use by pid {h.get('pid', '?')} ({h.get('command', '?')}, since "
                        f"{h.get('started', '?')}); wait for it to finish or stop it") from None
    record = {"pid": os.getpid(), "command": " ".join(command if command is not None else sys.argv),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    _held[key] = fd
    try:
        yield key
    finally:
        del _held[key]
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def holds(path: str | Path) -> bool:
    """True when this process holds the lock of a run folder that contains ``path``."""
    p = Path(path).resolve()
    return any(p == k or k in p.parents for k in _held)
