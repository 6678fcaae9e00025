"""Reading built sequences: `SequenceReader` serves, per example, its point-in-time sequence of packed
codes (the build-sequences output, `loopfm.stages.sequences`) as padded or jagged batches.

    reader = SequenceReader(RUN / "sequences", key="user", days=[5, 6, 7])
    batch = reader.gather(example_ids)          # or: for batch in reader.iter_batches(4096)
    t = batch.to_torch()                        # codes [B, L, bytes] uint8, lengths [B] int32, ...

`loopfm.codes.inputs.sequence_inputs` turns a padded batch into the VM's inputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from loopfm.artifacts import inside
from loopfm.codes import format as cf
from loopfm.data.history import gather


@dataclass
class SequenceBatch:
    """Sequences of B examples, ready for `kernels.int4_attend` (padded) or `int4_attend_jagged`.

    Padded: ``codes`` uint8 [B, L, code_bytes], left-aligned (oldest .. newest, then zero padding),
    ``lengths`` int32 [B]; positions >= length are padding. ``deltas`` int64 [B, L]: seconds from
    each entry to the example (>= 1 on real entries, 0 on padding). Jagged: ``values`` uint8
    [total, code_bytes], ``offsets`` int64 [B+1], ``value_deltas`` int64 [total].
    """
    example_id: np.ndarray
    ts: np.ndarray
    key: np.ndarray
    lengths: np.ndarray
    codes: np.ndarray | None = None
    deltas: np.ndarray | None = None
    values: np.ndarray | None = None
    offsets: np.ndarray | None = None
    value_deltas: np.ndarray | None = None

    def to_torch(self) -> dict:
        from loopfm.codes.inputs import as_tensor  # torch only when asked for

        return {k: as_tensor(v) for k, v in self.__dict__.items() if v is not None}


class SequenceReader:
    """Loads one key kind's timelines (all shards) and serves batches of sequences by example.

    Memory: the timeline codes, ts and example ids of the kind (each code stored once), plus
    five int64 per example of the requested days.
    """

    def __init__(self, seq_dir: str | Path, key: str | None = None, days: Sequence[int] | None = None) -> None:
        from loopfm.stages.sequences import EXAMPLES_SCHEMA, open_manifest  # the stage imports this module

        self.root = Path(seq_dir)
        self.manifest = open_manifest(self.root)
        self.kind = key or self.manifest["keys"][0]
        if self.kind not in self.manifest["keys"]:
            raise ValueError(f"{seq_dir} has timelines for {self.manifest['keys']}, not {self.kind!r}")
        self.max_len = int(self.manifest["max_len"])
        self.days = list(days) if days is not None else list(self.manifest["days"])
        bad = sorted(set(self.days) - set(self.manifest["days"]))
        if bad:
            raise ValueError(f"{seq_dir}: no example day(s) {bad}; days are {self.manifest['days']}")
        ts, eid, codes, ex, base = [], [], [], [], 0
        for shard in self.manifest.get("shards", ["."]):
            folder = inside(self.root, shard) / self.kind
            t = pq.read_table(folder / "timeline.parquet", columns=["ts", "example_id", cf.CODE_COLUMN])
            ts.append(t.column("ts").to_numpy())
            eid.append(t.column("example_id").to_numpy())
            codes.extend(t.column(cf.CODE_COLUMN).chunks)
            for d in self.days:
                e = pq.read_table(folder / "examples" / f"day={d}.parquet")
                cols = [e.column(c).to_numpy() for c in EXAMPLES_SCHEMA.names]
                nz = cols[4] > cols[3]
                cols[3] = np.where(nz, cols[3] + base, 0)
                cols[4] = np.where(nz, cols[4] + base, 0)
                ex.append(cols)
            base += t.num_rows
        width = int(self.manifest["code_bytes"])
        self.tl_ts = np.concatenate(ts) if ts else np.zeros(0, np.int64)
        self.tl_example_id = np.concatenate(eid) if eid else np.zeros(0, np.int64)
        # Arrow keeps the codes: its take() gathers fixed-width rows ~10x faster than numpy indexing.
        self.tl_codes = pa.concat_arrays(codes) if codes else pa.array([], pa.binary(width))
        self.code_bytes = width
        cat = [np.concatenate([c[i] for c in ex]) if ex else np.zeros(0, np.int64) for i in range(5)]
        order = np.argsort(cat[0], kind="stable")
        self.example_id, self.ts, self.key, self.start, self.end = (c[order] for c in cat)

    def __len__(self) -> int:
        return len(self.example_id)

    def quant_spec(self):
        """How to decode the codes (`loopfm.codes.quant.decode`); ``codebook`` feeds the kernel."""
        from loopfm.codes.quant import QuantSpec  # imports torch: only when asked
        return QuantSpec.from_manifest(self.manifest["quantizer"])

    def rows_of(self, example_ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(example_ids, np.int64)
        rows = np.searchsorted(self.example_id, ids)
        rows_c = np.minimum(rows, max(len(self.example_id) - 1, 0))
        bad = (rows >= len(self.example_id)) | (self.example_id[rows_c] != ids) if len(self.example_id) else \
            np.ones(len(ids), bool)
        if np.any(bad):
            raise KeyError(f"example ids not in {self.root} ({self.kind}, days {self.days}): "
                           f"{ids[bad][:5].tolist()}")
        return rows

    def gather(self, example_ids: np.ndarray, layout: str = "both") -> SequenceBatch:
        """The batch for the given example ids (in the given order)."""
        return self.batch(self.rows_of(example_ids), layout)

    def iter_batches(self, batch_size: int = 1024, layout: str = "both") -> Iterator[SequenceBatch]:
        """Batches in example-id (time) order over the reader's days."""
        for s in range(0, len(self), batch_size):
            yield self.batch(np.arange(s, min(s + batch_size, len(self))), layout)

    def batch(self, rows: np.ndarray, layout: str = "both") -> SequenceBatch:
        """Sequences of the examples at reader positions ``rows``: one gather of the valid entries
        (jagged), scattered into the zero-padded [B, L] layout when asked."""
        if layout not in ("padded", "jagged", "both"):
            raise ValueError(f"layout must be padded, jagged or both, got {layout!r}")
        start, t_ex = self.start[rows], self.ts[rows]
        lengths = (self.end[rows] - start).astype(np.int32)
        out = SequenceBatch(self.example_id[rows], t_ex, self.key[rows], lengths)
        idx, offsets = gather(start, self.end[rows])  # timeline row of each entry
        within = idx - np.repeat(start, lengths)      # its position in its sequence
        values = self._gather(idx)
        value_deltas = np.repeat(t_ex, lengths) - self.tl_ts[idx]
        if layout in ("jagged", "both"):
            out.values, out.offsets, out.value_deltas = values, offsets, value_deltas
        if layout in ("padded", "both"):
            L, B = self.max_len, len(rows)
            flat = np.repeat(np.arange(B, dtype=np.int64) * L, lengths) + within
            codes = np.zeros((B * L, self.code_bytes), np.uint8)
            void = np.dtype((np.void, self.code_bytes))  # whole-row moves, not byte-wise indexing
            codes.view(void)[flat, 0] = np.ascontiguousarray(values).view(void)[:, 0]
            deltas = np.zeros(B * L, np.int64)
            deltas[flat] = value_deltas
            out.codes, out.deltas = codes.reshape(B, L, self.code_bytes), deltas.reshape(B, L)
        return out

    def _gather(self, rows: np.ndarray) -> np.ndarray:
        """uint8 [len(rows), code_bytes] codes of timeline rows."""
        if len(rows) == 0:
            return np.zeros((0, self.code_bytes), np.uint8)
        return cf.bytes_from_arrow(self.tl_codes.take(pa.array(rows, pa.int64())))

    def history_ids(self, example_id: int) -> np.ndarray:
        r = self.rows_of(np.array([example_id]))[0]
        return self.tl_example_id[self.start[r]:self.end[r]]
