"""Stage outputs: a folder written to a temp sibling and renamed into place, plus a manifest.

Every stage (prepare, extract, compress, build-sequences, ...) writes ``OUT/`` this way:

    with atomic_output(out) as tmp:   # tmp = OUT/../.OUT.tmp-<pid>-<rand>
        ... write files under tmp ...
        write_manifest(tmp, stage=..., config_hash=..., **facts)

A killed or failed stage leaves no ``_SUCCESS`` and no half folder at ``OUT``. Stale temp folders
of killed runs are removed the next time the same output is written, by the holder of the run
folder's lock only (`loopfm.lock`), so a live run's temp folder is never taken for a dead one's.

``_SUCCESS`` lists every file of the output with its byte size (and row count for Parquet), so a
stage is complete (`is_complete`) only when its manifest is valid JSON with the same config hash
*and* its files are all there, unchanged: a truncated or deleted file makes the stage damaged
(`check_files` names the file), never "up to date".
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

MANIFEST = "_SUCCESS"


class ManifestError(ValueError):
    """A manifest (or a path read from one) that is not valid: names the file."""


@contextlib.contextmanager
def replaced_folder(folder: str | Path) -> Iterator[Path]:
    """A fresh temp sibling of ``folder`` to write into; when the block succeeds it replaces
    ``folder`` (the old one moved aside first, so there is never a half folder), when it fails it
    is removed and ``folder`` is left as it was."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if folder.exists():
            trash = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
            folder.rename(trash)
            tmp.rename(folder)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_output(out: str | Path) -> Iterator[Path]:
    """A stage output: written into a temp sibling, put in place only once it has its manifest."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out)
    with replaced_folder(out) as tmp:
        yield tmp
        if not (tmp / MANIFEST).exists():
            raise RuntimeError(f"stage output {out} was not given a {MANIFEST} manifest")


def _remove_stale_temps(out: Path) -> None:
    """Temp folders of earlier writers of ``out``: removed only by the run folder's lock holder,
    and never one whose process (same host) is still alive."""
    from loopfm.lock import holds

    if not holds(out.parent):
        return
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        pid = stale.name.rsplit(".tmp-", 1)[1].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


# -- JSON ----------------------------------------------------------------------------------------
class RowGroupWriter:
    """One Parquet file written table by table in row groups of ``group_rows`` rows: the file that
    ``pq.write_table(all tables, row_group_size=group_rows, **options)`` gives, with at most one
    group's rows held. Without ``schema`` the file is created at the first flush and a writer given
    no rows creates none; with it the file is opened at once and no rows give an empty file. Call
    `close` after the last `write` (or use it as a context manager)."""

    def __init__(self, path: str | Path, group_rows: int, *, schema=None, **options: Any) -> None:
        if group_rows < 1:
            raise ValueError(f"group_rows must be >= 1, got {group_rows}")
        self.path, self.group_rows, self.options = Path(path), int(group_rows), options
        self.schema = schema
        self.rows = 0  # written and pending
        self._pending: list = []
        self._pending_rows = 0
        self._writer = None
        if schema is not None:
            self._open(schema)

    def write(self, table) -> None:
        if not table.num_rows:
            return
        self._pending.append(table)
        self._pending_rows += table.num_rows
        self.rows += table.num_rows
        while self._pending_rows >= self.group_rows:
            self._flush(self.group_rows)

    def close(self) -> None:
        if self._pending_rows:
            self._flush(self._pending_rows)
        elif self._writer is not None and not self.rows:
            self._writer.write_table(self.schema.empty_table())  # as pq.write_table of no rows
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "RowGroupWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self.close()
        elif self._writer is not None:  # a failed write: the file is in a temp output, dropped with it
            self._writer.close()

    def _open(self, schema) -> None:
        import pyarrow.parquet as pq

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.schema, self._writer = schema, pq.ParquetWriter(self.path, schema, **self.options)

    def _flush(self, n: int) -> None:
        import pyarrow as pa

        merged = pa.concat_tables(self._pending)
        group, rest = merged.slice(0, n), merged.slice(n)
        if self._writer is None:
            self._open(group.schema)
        # one row group copied out; the rest stays in the pieces handed in
        self._writer.write_table(group.combine_chunks(), row_group_size=n)
        self._pending, self._pending_rows = ([rest] if rest.num_rows else []), rest.num_rows


def write_json_atomic(path: str | Path, data: Any, **dumps: Any) -> None:
    """Write JSON to a temp file beside ``path`` and rename it into place (never a half file)."""
    atomic_write_text(path, json.dumps(data, **({"indent": 2} | dumps)))


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to a temp file beside ``path``, fsync it and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: str | Path) -> Any:
    """JSON from ``path``; a file that is not valid JSON is a `ManifestError` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path} is not valid JSON ({err}); delete it or rerun the stage that "
                            "wrote it") from None


def inside(root: str | Path, relative: str) -> Path:
    """``root / relative`` for a path read from a manifest; refuses one that leaves ``root``."""
    rel = Path(str(relative))
    if rel.is_absolute() or ".." in rel.parts:
        raise ManifestError(f"{root}: the manifest path {relative!r} leaves the folder (absolute or '..')")
    return Path(root) / rel


# -- manifests -----------------------------------------------------------------------------------
def file_list(folder: str | Path) -> dict[str, dict]:
    """Every file under ``folder`` but the manifest: {relative path: {"bytes", "rows" (Parquet)}}."""
    import pyarrow.parquet as pq

    folder = Path(folder)
    out: dict[str, dict] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == MANIFEST:
            continue
        entry = {"bytes": path.stat().st_size}
        if path.suffix == ".parquet":
            entry["rows"] = pq.read_metadata(path).num_rows
        out[rel] = entry
    return out


def write_manifest(folder: str | Path, *, stage: str, config_hash: str, **facts: Any) -> dict:
    """Write ``folder/_SUCCESS`` last: the facts plus the list of the folder's files."""
    manifest = {
        "stage": stage,
        "config_hash": config_hash,
        "created_unix": int(time.time()),
        **facts,
        "files": file_list(folder),
    }
    (Path(folder) / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} is not a finished stage output (no {MANIFEST}); run the stage that makes it first"
        )
    manifest = read_json(path)
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path} is not a manifest (a JSON object expected)")
    return manifest


def check_files(folder: str | Path, manifest: dict | None = None) -> str | None:
    """None when every file ``_SUCCESS`` lists is there with its size and row count (and so for
    each shard it names), else what is wrong, naming the file."""
    import pyarrow.parquet as pq

    folder = Path(folder)
    try:
        manifest = manifest if manifest is not None else read_manifest(folder)
    except (FileNotFoundError, ManifestError) as err:
        return str(err)
    files = manifest.get("files")
    if not isinstance(files, dict):
        return f"{folder / MANIFEST} lists no files (written by an older version); redo the stage"
    for rel, want in files.items():
        try:
            path = inside(folder, rel)
        except ManifestError as err:
            return str(err)
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != want.get("bytes"):
            return f"{path} has {size} bytes, {MANIFEST} lists {want.get('bytes')}"
        if "rows" in want:
            try:
                rows = pq.read_metadata(path).num_rows
            except Exception as err:  # noqa: BLE001 - any unreadable footer is damage
                return f"{path} is not a readable Parquet file ({type(err).__name__})"
            if rows != want["rows"]:
                return f"{path} has {rows} rows, {MANIFEST} lists {want['rows']}"
    for shard in manifest.get("shards", []):
        if shard == ".":
            continue
        try:
            problem = check_files(inside(folder, shard))
        except ManifestError as err:
            return str(err)
        if problem:
            return problem
    return None


def is_complete(folder: str | Path, config_hash: str) -> bool:
    """True when ``folder`` holds a finished, undamaged output made with the same config."""
    return stage_state(folder, config_hash)[0] == "ok"


def stage_state(folder: str | Path, config_hash: str | None = None) -> tuple[str, str]:
    """("ok" | "missing" | "damaged" | "stale", detail): stale = intact but of another config."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        return "missing", f"no {folder / MANIFEST}"
    try:
        manifest = read_manifest(folder)
    except ManifestError as err:
        return "damaged", str(err)
    problem = check_files(folder, manifest)
    if problem:
        return "damaged", problem
    if config_hash is not None and manifest.get("config_hash") != config_hash:
        return "stale", "made with another config"
    return "ok", f"{len(manifest.get('files', {}))} files"


def require_intact(folder: str | Path) -> dict:
    """The manifest of a finished, undamaged stage output, else a one-line error naming the file."""
    manifest = read_manifest(folder)
    problem = check_files(folder, manifest)
    if problem:
        raise ManifestError(f"{folder} is damaged: {problem}; rerun its stage (or `loopfm run`) to redo it")
    return manifest
