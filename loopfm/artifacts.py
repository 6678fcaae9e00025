"""Stage outputs: a folder written to a temp sibling and renamed into place, plus a manifest.

Every stage (prepare, extract, compress, build-sequences, ...) writes ``OUT/`` this way:

    with atomic_output(out) as tmp:   # tmp = OUT/../.OUT.tmp-<pid>-<rand>
        ... write files under tmp ...
        write_manifest(tmp, stage=..., config_hash=..., **facts)

A killed or failed stage leaves no ``_SUCCESS`` and no half folder at ``OUT``; stale temp folders
from killed runs are removed the next time the same output is written. A stage whose
``_SUCCESS`` exists with the same config hash is skipped unless forced (`is_complete`).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

MANIFEST = "_SUCCESS"


@contextlib.contextmanager
def atomic_output(out: str | Path) -> Iterator[Path]:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if not (tmp / MANIFEST).exists():
            raise RuntimeError(f"stage output {out} was not given a {MANIFEST} manifest")
        if out.exists():
            # Move the old folder aside first, so there is never a moment with a half folder.
            trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(trash)
            tmp.rename(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_manifest(folder: str | Path, *, stage: str, config_hash: str, **facts: Any) -> dict:
    manifest = {
        "stage": stage,
        "config_hash": config_hash,
        "created_unix": int(time.time()),
        **facts,
    }
    (Path(folder) / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} is not a finished stage output (no {MANIFEST}); run the stage that makes it first"
        )
    return json.loads(path.read_text())


def is_complete(folder: str | Path, config_hash: str) -> bool:
    """True when ``folder`` holds a finished output made with the same config."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return False
    return json.loads(path.read_text()).get("config_hash") == config_hash
