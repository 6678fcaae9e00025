"""The online timeline store: per key, (ts, event id, code) entries, one interface, two backends.

* ``sqlite:PATH`` — embedded, on disk, no server (the stdlib's sqlite3): one table keyed by
  (key, ts, event id), so a key's entries are contiguous and time-ordered on disk.
* ``redis://HOST:PORT/DB`` — a Redis sorted set per key, score = ts, member = big-endian
  (ts, event id) + code, so members of one second sort by event id.

Semantics (the offline rule of `loopfm.stages.sequences`, so served sequences equal the built
ones): `read` returns the newest ``max_len`` entries with ``before - window_s <= ts < before``,
ordered by (ts, event id), oldest first. Appending an entry that is already there (same key, ts
and event id) changes nothing, so re-running a day's append is harmless. `evict` drops every
entry older than a time. A store also keeps a few string facts (`meta`: key kind, code width,
days loaded) so a server can check it serves the codes its bundle expects.

Any failure to reach the backend raises `StoreUnavailable` (the server answers 503).
"""
from __future__ import annotations

import sqlite3
import struct
import threading
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

import numpy as np


class StoreUnavailable(RuntimeError):
    """The store cannot be reached or read right now."""


class TimelineStore(Protocol):
    url: str

    def append(self, keys: np.ndarray, ts: np.ndarray, event_ids: np.ndarray, codes: np.ndarray) -> None:
        """Add entries (int64 [n] each, codes uint8 [n, code_bytes])."""

    def read(self, key: int, before: int, window_s: int, max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """(ts int64 [n], codes uint8 [n, code_bytes]) of ``key``, oldest first (see the module docstring)."""

    def evict(self, older_than: int) -> None:
        """Drop every entry with ts < ``older_than``."""

    def clear(self) -> None: ...

    def dump(self) -> dict[int, list[tuple[int, int, bytes]]]:
        """Every entry, per key, in (ts, event id) order (tests, audits)."""

    def set_meta(self, facts: dict[str, str]) -> None: ...

    def meta(self) -> dict[str, str]: ...

    def nbytes(self) -> int:
        """Bytes the backend uses for the entries (benchmarks)."""

    def ping(self) -> None: ...

    def close(self) -> None: ...


def open_store(url: str) -> TimelineStore:
    """``sqlite:PATH`` or ``redis://HOST:PORT/DB``."""
    if url.startswith("sqlite:"):
        path = url[len("sqlite:"):]
        if not path:
            raise ValueError(f"store URL {url!r}: expected sqlite:PATH")
        return SQLiteStore(path)
    if url.startswith("redis://"):
        return RedisStore(url)
    raise ValueError(f"store URL {url!r}: expected sqlite:PATH or redis://HOST:PORT/DB")


# -- SQLite ---------------------------------------------------------------------------------------
class SQLiteStore:
    def __init__(self, path: str | Path) -> None:
        self.url = f"sqlite:{path}"
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # one connection, used from the server's threads one at a time
        try:
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=5.0)
            self._db.executescript(
                "PRAGMA journal_mode=WAL;"
                "CREATE TABLE IF NOT EXISTS timeline (key INTEGER NOT NULL, ts INTEGER NOT NULL, "
                "id INTEGER NOT NULL, code BLOB NOT NULL, PRIMARY KEY (key, ts, id)) WITHOUT ROWID;"
                "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);")
        except sqlite3.Error as err:
            raise StoreUnavailable(f"{self.url}: {err}") from None

    def _run(self, fn):
        with self._lock:
            try:
                return fn(self._db)
            except sqlite3.Error as err:
                raise StoreUnavailable(f"{self.url}: {err}") from None

    def append(self, keys, ts, event_ids, codes) -> None:
        codes = np.ascontiguousarray(codes, np.uint8)
        rows = zip(np.asarray(keys, np.int64).tolist(), np.asarray(ts, np.int64).tolist(),
                   np.asarray(event_ids, np.int64).tolist(), (r.tobytes() for r in codes))

        def go(db):
            with db:
                db.executemany("INSERT OR IGNORE INTO timeline VALUES (?, ?, ?, ?)", rows)
        self._run(go)

    def read(self, key, before, window_s, max_len):
        rows = self._run(lambda db: db.execute(
            "SELECT ts, code FROM timeline WHERE key = ? AND ts < ? AND ts >= ? ORDER BY ts DESC, id DESC LIMIT ?",
            (int(key), int(before), int(before) - int(window_s), int(max_len))).fetchall())
        return _entries(rows[::-1])

    def evict(self, older_than) -> None:
        def go(db):
            with db:
                db.execute("DELETE FROM timeline WHERE ts < ?", (int(older_than),))
        self._run(go)

    def clear(self) -> None:
        def go(db):
            with db:
                db.execute("DELETE FROM timeline")
                db.execute("DELETE FROM meta")
        self._run(go)

    def dump(self):
        out: dict[int, list] = {}
        for key, ts, eid, code in self._run(lambda db: db.execute(
                "SELECT key, ts, id, code FROM timeline ORDER BY key, ts, id").fetchall()):
            out.setdefault(key, []).append((ts, eid, bytes(code)))
        return out

    def set_meta(self, facts) -> None:
        def go(db):
            with db:
                db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", [(k, str(v)) for k, v in facts.items()])
        self._run(go)

    def meta(self):
        return dict(self._run(lambda db: db.execute("SELECT name, value FROM meta").fetchall()))

    def nbytes(self) -> int:
        def go(db):
            db.execute("VACUUM")
            pages = db.execute("SELECT count(*) FROM dbstat WHERE name = 'timeline'").fetchone()[0] \
                if _has_dbstat(db) else None
            size = db.execute("PRAGMA page_size").fetchone()[0]
            return pages * size if pages is not None else self.path.stat().st_size
        return self._run(go)

    def ping(self) -> None:
        self._run(lambda db: db.execute("SELECT 1").fetchone())

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _has_dbstat(db) -> bool:
    try:
        db.execute("SELECT 1 FROM dbstat LIMIT 1")
        return True
    except sqlite3.Error:
        return False


def _entries(rows) -> tuple[np.ndarray, np.ndarray]:
    ts = np.fromiter((r[0] for r in rows), np.int64, len(rows))
    if not rows:
        return ts, np.zeros((0, 0), np.uint8)
    codes = np.frombuffer(b"".join(bytes(r[1]) for r in rows), np.uint8).reshape(len(rows), -1)
    return ts, codes


# -- Redis ----------------------------------------------------------------------------------------
_ENTRY = struct.Struct(">qq")  # (ts, event id): big-endian, so members of one score sort by event id


class RedisStore:
    PREFIX = b"loopfm:tl:"
    META = b"loopfm:meta"

    def __init__(self, url: str) -> None:
        import redis

        p = urlparse(url)
        if not p.hostname or not p.port:
            raise ValueError(f"store URL {url!r}: expected redis://HOST:PORT/DB")
        db = int(p.path.strip("/") or 0)
        self.url = url
        self._errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                        redis.exceptions.BusyLoadingError)
        self._r = redis.Redis(host=p.hostname, port=p.port, db=db, socket_timeout=2.0, socket_connect_timeout=2.0)

    def _run(self, fn):
        try:
            return fn(self._r)
        except self._errors as err:
            raise StoreUnavailable(f"{self.url}: {err}") from None

    def _key(self, key: int) -> bytes:
        return self.PREFIX + str(int(key)).encode()

    def append(self, keys, ts, event_ids, codes, chunk: int = 10_000) -> None:
        codes = np.ascontiguousarray(codes, np.uint8)
        keys, ts, event_ids = (np.asarray(a, np.int64) for a in (keys, ts, event_ids))

        def go(r):
            for s in range(0, len(keys), chunk):
                pipe = r.pipeline(transaction=False)
                for k, t, e, c in zip(keys[s:s + chunk].tolist(), ts[s:s + chunk].tolist(),
                                      event_ids[s:s + chunk].tolist(), codes[s:s + chunk]):
                    pipe.zadd(self._key(k), {_ENTRY.pack(t, e) + c.tobytes(): t})
                pipe.execute()
        self._run(go)

    def read(self, key, before, window_s, max_len):
        members = self._run(lambda r: r.zrevrangebyscore(
            self._key(key), f"({int(before)}", int(before) - int(window_s), start=0, num=int(max_len)))
        members = members[::-1]
        ts = np.fromiter((_ENTRY.unpack_from(m)[0] for m in members), np.int64, len(members))
        if not members:
            return ts, np.zeros((0, 0), np.uint8)
        codes = np.frombuffer(b"".join(m[_ENTRY.size:] for m in members), np.uint8).reshape(len(members), -1)
        return ts, codes

    def _keys(self, r) -> list[bytes]:
        return list(r.scan_iter(match=self.PREFIX + b"*", count=1000))

    def evict(self, older_than) -> None:
        def go(r):
            pipe = r.pipeline(transaction=False)
            for k in self._keys(r):
                pipe.zremrangebyscore(k, "-inf", f"({int(older_than)}")
            pipe.execute()
        self._run(go)

    def clear(self) -> None:
        def go(r):
            keys = self._keys(r)
            for s in range(0, len(keys), 1000):
                r.delete(*keys[s:s + 1000])
            r.delete(self.META)
        self._run(go)

    def dump(self):
        def go(r):
            out = {}
            for k in self._keys(r):
                entries = [(*_ENTRY.unpack_from(m), m[_ENTRY.size:]) for m in r.zrange(k, 0, -1)]
                if entries:
                    out[int(k[len(self.PREFIX):])] = entries
            return out
        return self._run(go)

    def set_meta(self, facts) -> None:
        self._run(lambda r: r.hset(self.META, mapping={k: str(v) for k, v in facts.items()}))

    def meta(self):
        return {k.decode(): v.decode() for k, v in self._run(lambda r: r.hgetall(self.META)).items()}

    def nbytes(self) -> int:
        def go(r):
            return sum(int(r.memory_usage(k, samples=0) or 0) for k in self._keys(r))
        return self._run(go)

    def ping(self) -> None:
        self._run(lambda r: r.ping())

    def close(self) -> None:
        self._r.close()
