"""The on-disk formats of FM codes: extract output (float codes) and compress output (packed codes).

Extract output (written by the extract stage, read by compress)::

    RUN/extract/codes/day=K/part-NNNNN.parquet
        example_id int64, ts int64, day int32, label int8,
        user_key int64, item_key int64      (the event log's user / item id columns)
        soft_label float32                  (FM predicted probability, for KD)
        z fixed_size_list<float16>[D]       (tanh autoencoder codes in [-1, 1];
                                             raw tap activations when manifest kind == "raw")
    RUN/extract/_SUCCESS   stage="extract", dim=D, kind="codes"|"raw", taps=[...],
                           rows_per_day={"K": n}, user_key=<feature name>, item_key=<feature name>,
                           key_vocab_size={"user_key": V_u, "item_key": V_i}   (optional: lets
                           build-sequences skip the OOV id V-1 as well as the padding id 0)

Rows of a file are in example-id order (= time order); a day may have several parts. Parts are
written whole (`write_codes`, `write_packed`) or streamed (`PartWriter`: the same files, one row
group of ROW_GROUP_ROWS held at a time).

Compress output (read by build-sequences)::

    RUN/compress/codes/day=K/part-NNNNN.parquet
        example_id, ts, day, label, user_key, item_key, soft_label (as above)
        code fixed_size_binary[code_bytes]  (dim/2 for int4 kinds, dim for int8, 2*dim for fp16)

`loopfm.stages.codes_format` re-exports every name here (the stages import them from there) and
holds the sharded-output rule the stages share.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from loopfm.artifacts import RowGroupWriter, inside, read_manifest

CODES_DIR = "codes"
META_COLUMNS = ("example_id", "ts", "day", "label", "user_key", "item_key", "soft_label")
META_TYPES = {
    "example_id": pa.int64(), "ts": pa.int64(), "day": pa.int32(), "label": pa.int8(),
    "user_key": pa.int64(), "item_key": pa.int64(), "soft_label": pa.float32(),
}
Z_COLUMN = "z"        # extract: fixed_size_list<float16>[D]
CODE_COLUMN = "code"  # compress: fixed_size_binary[code_bytes]
KINDS = ("codes", "raw", "soft_label")


def extract_schema(dim: int) -> pa.Schema:
    return pa.schema([(c, META_TYPES[c]) for c in META_COLUMNS] + [(Z_COLUMN, pa.list_(pa.float16(), dim))])


def compress_schema(code_bytes: int) -> pa.Schema:
    return pa.schema([(c, META_TYPES[c]) for c in META_COLUMNS] + [(CODE_COLUMN, pa.binary(code_bytes))])


# -- numpy <-> arrow for the two vector columns --------------------------------------------------
def z_to_arrow(z: np.ndarray) -> pa.FixedSizeListArray:
    """float [N, D] -> fixed_size_list<float16>[D]."""
    z = np.ascontiguousarray(z, dtype=np.float16)
    if z.ndim != 2:
        raise ValueError(f"z must be [rows, D], got shape {z.shape}")
    return pa.FixedSizeListArray.from_arrays(pa.array(z.reshape(-1), type=pa.float16()), z.shape[1])


def z_from_arrow(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """fixed_size_list<float16>[D] -> float16 [N, D]."""
    arr = _one_array(col)
    dim = arr.type.list_size
    return arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), dim)


def bytes_to_arrow(codes: np.ndarray) -> pa.FixedSizeBinaryArray:
    """uint8 [N, B] -> fixed_size_binary[B] (no copy beyond making it contiguous)."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    if codes.ndim != 2 or codes.shape[1] == 0:
        raise ValueError(f"codes must be uint8 [rows, bytes>0], got shape {codes.shape}")
    return pa.Array.from_buffers(pa.binary(codes.shape[1]), codes.shape[0], [None, pa.py_buffer(codes)])


def bytes_from_arrow(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """fixed_size_binary[B] -> uint8 [N, B] (a view of the Arrow buffer when possible)."""
    arr = _one_array(col)
    width = arr.type.byte_width
    if arr.null_count:
        raise ValueError("a code column must not hold nulls")
    buf = arr.buffers()[1]
    flat = np.frombuffer(buf, dtype=np.uint8) if buf is not None else np.zeros(0, np.uint8)
    return flat[arr.offset * width:(arr.offset + len(arr)) * width].reshape(len(arr), width)


def _one_array(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(col, pa.ChunkedArray):
        return col.chunk(0) if col.num_chunks == 1 else (
            pa.concat_arrays(col.chunks) if col.num_chunks else pa.array([], type=col.type))
    return col


# -- writing and reading -------------------------------------------------------------------------
def part_path(root: str | Path, day: int, part: int) -> Path:
    return Path(root) / CODES_DIR / f"day={int(day)}" / f"part-{int(part):05d}.parquet"


def _meta_arrays(meta: dict[str, Any]) -> list[pa.Array]:
    missing = [c for c in META_COLUMNS if c not in meta]
    if missing:
        raise ValueError(f"missing code-table columns {missing}; expected {list(META_COLUMNS)}")
    return [pa.array(np.asarray(meta[c]), type=META_TYPES[c]) for c in META_COLUMNS]


def write_codes(root: str | Path, day: int, part: int, meta: dict[str, Any], z: np.ndarray) -> Path:
    """Write one extract part: ``meta`` maps every name of META_COLUMNS to a [N] array, ``z`` [N, D]."""
    return _write(codes_table(meta, z), part_path(root, day, part))


def write_packed(root: str | Path, day: int, part: int, meta: dict[str, Any] | pa.Table,
                 codes: np.ndarray) -> Path:
    """Write one compress part: metadata columns plus ``code`` from uint8 [N, code_bytes]."""
    return _write(packed_table(meta, codes), part_path(root, day, part))


ROW_GROUP_ROWS = 256 * 1024
_PARQUET_OPTIONS = {"use_dictionary": ["day", "label"]}


def _write(table: pa.Table, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=ROW_GROUP_ROWS, **_PARQUET_OPTIONS)
    return path


def codes_table(meta: dict[str, Any], z: np.ndarray) -> pa.Table:
    """The extract rows ``write_codes`` writes, as a table (for `PartWriter`)."""
    return pa.Table.from_arrays(_meta_arrays(meta) + [z_to_arrow(z)], schema=extract_schema(z.shape[1]))


def packed_table(meta: dict[str, Any] | pa.Table, codes: np.ndarray) -> pa.Table:
    """The compress rows ``write_packed`` writes, as a table (for `PartWriter`)."""
    arrays = ([meta.column(c).combine_chunks().cast(META_TYPES[c]) for c in META_COLUMNS]
              if isinstance(meta, pa.Table) else _meta_arrays(meta))
    return pa.Table.from_arrays(arrays + [bytes_to_arrow(codes)], schema=compress_schema(codes.shape[1]))


class PartWriter:
    """Streams one day's rows into ``part-NNNNN.parquet`` files of ``rows_per_part`` rows each.

    The files hold the rows and row groups that writing the whole day at once, cut every
    ``rows_per_part`` rows, would give (`write_codes`/`write_packed` per cut); memory holds at most
    one row group. ``rows_per_part=None``: a single part. A day with no rows writes no file.
    """

    def __init__(self, root: str | Path, day: int, *, first_part: int = 0,
                 rows_per_part: int | None = None) -> None:
        if rows_per_part is not None and rows_per_part < 1:
            raise ValueError(f"rows_per_part must be >= 1, got {rows_per_part}")
        self.root, self.day, self.part, self.rows_per_part = Path(root), int(day), int(first_part), rows_per_part
        self.rows = 0  # written and pending, this day
        self.bytes = 0  # of the closed part files
        self._file: RowGroupWriter | None = None  # the open part

    def write(self, table: pa.Table) -> None:
        self.rows += table.num_rows
        while table.num_rows:
            if self._file is None:
                self._file = RowGroupWriter(part_path(self.root, self.day, self.part), ROW_GROUP_ROWS,
                                            **_PARQUET_OPTIONS)
            room = self.rows_per_part - self._file.rows if self.rows_per_part else table.num_rows
            self._file.write(table.slice(0, room))
            table = table.slice(room)
            if self.rows_per_part and self._file.rows == self.rows_per_part:
                self._close_part()

    def close(self) -> None:
        """Write what is pending and close the open part (call once, after the last `write`)."""
        self._close_part()

    def _close_part(self) -> None:
        if self._file is not None:
            self._file.close()
            self.bytes += self._file.path.stat().st_size
            self._file = None
            self.part += 1


EXTRACT_FACTS = ("dim", "kind", "taps", "rows_per_day", "user_key", "item_key")


def check_extract_manifest(manifest: dict, where: str | Path) -> None:
    """Raise ValueError unless ``manifest`` is a finished extract output's, with every fact above."""
    if manifest.get("stage") != "extract":
        raise ValueError(f"{where} is a {manifest.get('stage')!r} output, expected an extract output")
    missing = [k for k in EXTRACT_FACTS if k not in manifest]
    if missing:
        raise ValueError(f"{where}: the extract manifest lacks {missing} (see loopfm/codes/format.py)")
    if manifest["kind"] not in KINDS:
        raise ValueError(f"{where}: extract kind must be one of {KINDS}, got {manifest['kind']!r}")


def stage_files(root: str | Path, day: int, manifest: dict | None = None) -> list[Path]:
    """Part files of ``day`` in a finished extract/compress output, over all its shards, in order."""
    root = Path(root)
    manifest = manifest if manifest is not None else read_manifest(root)
    out: list[Path] = []
    for shard in manifest.get("shards", ["."]):
        out.extend(sorted((inside(root, shard) / CODES_DIR / f"day={int(day)}").glob("part-*.parquet")))
    return out


def sum_rows_per_day(manifests: list[dict]) -> dict[str, int]:
    """``rows_per_day`` of a sharded output: the shards' counts added up (rank 0's days)."""
    return {d: sum(m["rows_per_day"].get(d, 0) for m in manifests) for d in manifests[0]["rows_per_day"]}


def stage_days(manifest: dict) -> list[int]:
    return sorted(int(d) for d in manifest["rows_per_day"])


def day_files(root: str | Path, manifest: dict, days: Sequence[int] | None = None) -> list[Path]:
    """The part files of ``days`` (default: every day) of an extract or compress output, in day
    order; refuses a day the output does not have, or days without any part file."""
    days = list(days) if days is not None else stage_days(manifest)
    bad = sorted(set(days) - set(stage_days(manifest)))
    if bad:
        raise ValueError(f"{root}: no day(s) {bad}; days are {stage_days(manifest)}")
    files = [p for d in days for p in stage_files(root, d, manifest)]
    if not files:
        raise ValueError(f"{root}: no part files for days {days}")
    return files


def read_codes(root: str | Path, days: Sequence[int] | None = None,
               columns: Sequence[str] | None = None) -> pa.Table:
    """All rows of ``days`` (default: every day) of an extract or compress output, sorted by example id."""
    files = day_files(root, read_manifest(root), days)
    table = pa.concat_tables([pq.read_table(p, columns=list(columns) if columns else None) for p in files])
    if "example_id" in table.column_names:
        eid = table.column("example_id").to_numpy()
        if len(eid) > 1 and not np.all(eid[1:] > eid[:-1]):
            table = table.take(pa.array(np.argsort(eid, kind="stable")))
    return table
