"""The raw Tianchi "Ad Display/Click Data on Taobao.com" tables (TaobaoAd, dataset 56).

Input (``path``), detected from what ``path`` is:

* **a folder** with the original files (header line first, comma-separated):

  - ``raw_sample.csv``   ``user,time_stamp,adgroup_id,pid,nonclk,clk`` (26M impressions;
    ``time_stamp`` in unix seconds; ``nonclk`` is ignored, the label is ``clk``);
  - ``ad_feature.csv``   ``adgroup_id,cate_id,campaign_id,customer,brand,price`` (~850k ads;
    ``brand`` may be ``NULL``);
  - ``user_profile.csv`` ``userid,cms_segid,cms_group_id,final_gender_code,age_level,pvalue_level,
    shopping_level,occupation,new_user_class_level`` (~1.1M users; empty fields occur; the real
    header has a trailing space in ``new_user_class_level `` -- header names are stripped);
  - ``behavior_log.csv`` ``user,time_stamp,btag,cate,brand`` (723M rows), read only when
    ``behavior_log: true``.

* **a single CSV file** in which raw_sample is already joined with ad_feature and user_profile
  (FuxiCTR's ``tiny_csv`` layout: ``clk,time_stamp,userid,adgroup_id,pid,cate_id,...``). Columns
  are found by name, extra columns (e.g. ``click_sequence``) are ignored. A row whose profile
  fields are empty is kept with missing values (a joined file cannot tell a missing user from an
  empty profile).

Rows are read ``chunk_rows`` at a time; each raw_sample chunk is joined against ad_feature and
user_profile held in memory as sorted int64 key arrays plus their columns (numpy
``searchsorted``), so the 26M-row file needs memory for one chunk plus the two side tables: on a
synthetic folder of the real sizes (850k ads, 1.1M users) with 3M impressions, reading took
0.8 GB peak RSS with 1M-row chunks, independent of the raw_sample length.

A raw_sample row whose ``adgroup_id`` is not in ad_feature.csv (or whose ``user`` is not in
user_profile.csv) is an error naming the raw_sample line; with ``skip_missing: true`` such rows
are dropped and counted in ``skipped`` (``missing_ad``, ``missing_user``; a row missing both
counts as ``missing_ad``). reczoo's TaobaoAd_x1 notes that about 5% of the
real rows were dropped for a missing user or ad profile, so the full data needs
``skip_missing: true``.

Time. ``time_stamp`` is either unix seconds (raw_sample.csv, behavior_log.csv) or a
``YYYY-MM-DD HH:MM:SS`` date-time (the joined sample). A date-time string is taken as local wall
time in ``timezone`` (default Asia/Shanghai): the Tianchi documentation gives ``1494032110`` as
``2017-05-06 08:55:10``, which is Shanghai time (00:55:10 UTC), the data's 8 days are
2017-05-06..13 in Shanghai dates, and the joined sample begins at ``2017-05-06 00:00:00``, i.e.
exactly the first second of the first Shanghai day (1494000000). Days are calendar days in
``timezone``: ``DayRule("calendar", tz="Asia/Shanghai")``, cut at Shanghai midnight.

Features (names follow FuxiCTR's TaobaoAd_x1, so `taobao_x1` gives the same schema):

=====================  ===========  =======  ============  =====================================
name                   kind         role     group         from
=====================  ===========  =======  ============  =====================================
userid (user key)      categorical  user     user          raw_sample ``user``
cms_segid ..           categorical  user     user_profile  the 8 user_profile fields
new_user_class_level
adgroup_id (item key)  categorical  item     ad            raw_sample ``adgroup_id``
cate_id, campaign_id,  categorical  item     ad            ad_feature (``NULL`` brand = missing)
customer, brand
price                  numeric      item     ad            ad_feature, ``log1p`` by default
pid                    categorical  context  context       raw_sample ``pid`` (ad slot)
hist_btag              sequence     user     history       behavior_log ``btag`` (own vocabulary)
hist_cate              sequence     user     history       behavior_log ``cate`` (vocab cate_id)
hist_brand             sequence     user     history       behavior_log ``brand`` (vocab brand)
=====================  ===========  =======  ============  =====================================

FM-only features (``fm_only_features``). In the paper's TaobaoAd setup every standard feature is
visible to both the FM and the vertical models, so with the three tables alone nothing is
FM-only. With ``behavior_log: true`` the behaviour histories are FM-only by default: they are the
expensive long-term signal the FM can afford and a small VM should receive only through LoopFM
sequences (the feature gap). Setting ``fm_only_features`` to a list replaces this default.

Behaviour histories (``behavior_log: true``, folder layout only). For each impression of user
``u`` at time ``t``: the last ``history_len`` behaviour-log events of ``u`` with
``time_stamp < t`` (strictly earlier; events at the same second keep file order), newest last.
The 723M-row log does not fit in memory and is not sorted by user, so it is processed in
bounded passes through a scratch folder (``work_dir``, default a temp folder, removed afterwards;
it needs about as much disk as the log in Parquet):

1. stream behavior_log.csv and raw_sample.csv once each, writing each row to one of
   ``behavior_shards`` Parquet files chosen by ``user % behavior_shards``;
2. per shard: the shared point-in-time search (`loopfm.data.history.Timeline`: events in
   (user, time, file order), the newest ``history_len`` strictly earlier than each impression)
   and write the lists per block of ``chunk_rows`` raw_sample rows;
3. while yielding raw_sample chunks, read back that block's lists from every shard.

Memory is one shard -- about 1/``behavior_shards`` of the log and of the impressions, with their
gathered lists (for the real 723M events and 26M impressions with the default 64 shards, roughly
11M events and 0.4M x 50 list entries, 2-3 GB) -- plus one block of lists. The scratch folder
holds the log and every impression's lists as Parquet, tens of GB for the real data. (Synthetic
check: 6M events, 3M impressions, 8 shards: 1.6 GB peak RSS, about 35 s on 2 cores.)

Errors (`DataError` with file, 1-based line, column): empty file, missing column (with the nearest
header name suggested), ragged row, non-integer id, non-numeric or negative price, ``clk`` not 0/1,
unparsable ``time_stamp``, duplicate ad/user in the side tables, ad/user missing from them.
Line numbers assume no quoted field spans lines (true of all Tianchi files).
"""
from __future__ import annotations

import difflib
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Sequence
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from loopfm.data.errors import DataError
from loopfm.data.history import Timeline, gather, timeline_order
from loopfm.data.schema import FeatureSpec
from loopfm.data.source import DayRule, SourceInfo
from loopfm.data.text import (_first, iter_text_chunks, parse_float, parse_int, parse_label, parse_str,
                              parse_time, read_header, require_columns)

# Text reading and converters: loopfm.data.text (shared with every text source).

# --- the source ---------------------------------------------------------------------------------

PROFILE_FIELDS = ("cms_segid", "cms_group_id", "final_gender_code", "age_level", "pvalue_level",
                  "shopping_level", "occupation", "new_user_class_level")
AD_FIELDS = ("cate_id", "campaign_id", "customer", "brand")
HISTORY_FEATURES = ("hist_btag", "hist_cate", "hist_brand")
ALL_FEATURES = ("userid", *PROFILE_FIELDS, "adgroup_id", *AD_FIELDS, "price", "pid", *HISTORY_FEATURES)

RAW_SAMPLE_COLUMNS = ("user", "time_stamp", "adgroup_id", "pid", "clk")
AD_COLUMNS = ("adgroup_id", *AD_FIELDS, "price")
USER_COLUMNS = ("userid", *PROFILE_FIELDS)
BEHAVIOR_COLUMNS = ("user", "time_stamp", "btag", "cate", "brand")
JOINED_COLUMNS = ("clk", "time_stamp", "userid", "adgroup_id", "pid", *AD_FIELDS, "price", *PROFILE_FIELDS)


def taobao_features(fm_only: set[str], history_len: int, with_history: bool) -> list[FeatureSpec]:
    """The TaobaoAd feature list shared by `taobao_raw` and `taobao_x1`."""
    def cat(name, role, group, desc, vocab=None):
        return FeatureSpec(name, "categorical", role, fm_only=name in fm_only, vocab=vocab,
                           group=group, description=desc)

    feats = [cat("userid", "user", "user", "user id (the user key)")]
    feats += [cat(f, "user", "user_profile", f"user_profile {f}") for f in PROFILE_FIELDS]
    feats.append(cat("adgroup_id", "item", "ad", "ad id (the item key)"))
    feats += [cat(f, "item", "ad", f"ad_feature {f}") for f in AD_FIELDS]
    feats.append(FeatureSpec("price", "numeric", "item", fm_only="price" in fm_only, group="ad",
                             description="ad price"))
    feats.append(cat("pid", "context", "context", "ad slot (scenario)"))
    if with_history:
        for name, vocab, desc in (("hist_btag", None, "behaviour types (pv/cart/fav/buy)"),
                                  ("hist_cate", "cate_id", "categories of past behaviours"),
                                  ("hist_brand", "brand", "brands of past behaviours")):
            feats.append(FeatureSpec(name, "sequence", "user", fm_only=name in fm_only, vocab=vocab,
                                     max_len=history_len, group="history",
                                     description=f"{desc}, strictly earlier, newest last"))
    return feats


def check_feature_names(names: Sequence[str], valid: Sequence[str], where: str) -> None:
    for name in names:
        if name not in valid:
            near = difflib.get_close_matches(name, list(valid), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ValueError(f"{where}: unknown feature {name!r}{hint} (features: {list(valid)})")


@dataclass(kw_only=True)
class TaobaoRawConfig:
    path: str = field(default="", metadata={"input": True,
        "help": "folder with raw_sample.csv, ad_feature.csv, user_profile.csv (+ behavior_log.csv), "
                "or one CSV with raw_sample already joined to ad_feature and user_profile"})
    behavior_log: bool = field(default=False, metadata={
        "help": "build hist_btag/hist_cate/hist_brand from behavior_log.csv (folder layout only)"})
    history_len: int = field(default=50, metadata={
        "help": "behaviour events kept per impression (newest), the histories' max_len"})
    fm_only_features: list[str] | None = field(default=None, metadata={
        "help": "features only the FM sees; null = the behaviour histories when behavior_log is "
                "on, else none"})
    skip_missing: bool = field(default=False, metadata={
        "help": "drop raw_sample rows whose ad or user is missing from ad_feature/user_profile "
                "(counted in the manifest's skipped_rows) instead of failing"})
    price_transform: Literal["log1p", "none"] = field(default="log1p", metadata={
        "help": "transform of the numeric price feature"})
    timezone: str = field(default="Asia/Shanghai", metadata={
        "help": "time zone of the calendar days and of date-time strings in time_stamp"})
    behavior_shards: int = field(default=64, metadata={
        "help": "user-hash shards of the behaviour log (memory ~ log size / shards)"})
    work_dir: str = field(default="", metadata={
        "help": "scratch folder for the behaviour-log shards (empty = a temp folder)"})

    def __post_init__(self) -> None:
        if self.history_len < 1:
            raise ValueError(f"taobao_raw.history_len must be >= 1, got {self.history_len}")
        if self.behavior_shards < 1:
            raise ValueError(f"taobao_raw.behavior_shards must be >= 1, got {self.behavior_shards}")
        if self.price_transform not in ("log1p", "none"):
            raise ValueError(f"taobao_raw.price_transform must be 'log1p' or 'none', "
                             f"got {self.price_transform!r}")
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"taobao_raw.timezone: unknown time zone {self.timezone!r}") from None
        if self.fm_only_features is not None:
            valid = ALL_FEATURES if self.behavior_log else ALL_FEATURES[:-len(HISTORY_FEATURES)]
            check_feature_names(self.fm_only_features, valid, "taobao_raw.fm_only_features")


class TaobaoRawSource:
    """Raw Tianchi TaobaoAd tables (or the joined sample) -> raw event chunks. See module doc."""

    def __init__(self, cfg: TaobaoRawConfig, *, seed: int, chunk_rows: int) -> None:
        self.cfg, self.seed, self.chunk_rows = cfg, seed, chunk_rows  # reading is deterministic
        self.skipped: dict[str, int] = {}

    # -- description ---------------------------------------------------------------------------
    def info(self) -> SourceInfo:
        fm_only = (set(self.cfg.fm_only_features) if self.cfg.fm_only_features is not None
                   else set(HISTORY_FEATURES) if self.cfg.behavior_log else set())
        return SourceInfo(
            dataset="taobao-raw", user_key="userid", item_key="adgroup_id",
            features=taobao_features(fm_only, self.cfg.history_len, self.cfg.behavior_log),
            days=DayRule("calendar", tz=self.cfg.timezone),
        )

    def _layout(self) -> Literal["folder", "joined"]:
        if not self.cfg.path:
            raise ValueError("data.taobao_raw.path is empty: set it to the Tianchi folder or a joined CSV")
        path = Path(self.cfg.path)
        if path.is_dir():
            need = ["raw_sample.csv", "ad_feature.csv", "user_profile.csv"]
            need += ["behavior_log.csv"] if self.cfg.behavior_log else []
            for name in need:
                if not (path / name).is_file():
                    raise DataError(f"the TaobaoAd folder has no {name} (expected {need})",
                                    file=str(path / name))
            return "folder"
        if path.is_file():
            if self.cfg.behavior_log:
                raise ValueError("taobao_raw.behavior_log needs the folder layout (path is a file: "
                                 f"{path}); put behavior_log.csv beside raw_sample.csv")
            return "joined"
        raise DataError("no such file or folder", file=str(path))

    # -- rows ----------------------------------------------------------------------------------
    def chunks(self) -> Iterator[pa.Table]:
        self.skipped = {}
        if self._layout() == "joined":
            yield from self._joined_chunks(Path(self.cfg.path))
            return
        folder = Path(self.cfg.path)
        ads = self._load_side(folder / "ad_feature.csv", AD_COLUMNS)
        users = self._load_side(folder / "user_profile.csv", USER_COLUMNS)
        if not self.cfg.behavior_log:
            yield from self._folder_chunks(folder, ads, users, None)
            return
        work = Path(tempfile.mkdtemp(prefix="loopfm-taobao-behavior-", dir=self.cfg.work_dir or None))
        try:
            hist = _BehaviorHistories(folder, work, self.cfg, self.chunk_rows)
            hist.build()
            yield from self._folder_chunks(folder, ads, users, hist)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _read(self, path: Path, required: Sequence[str]) -> Iterator[tuple[pa.Table, int]]:
        header = read_header(path)
        require_columns(path, header, required)
        return iter_text_chunks(path, names=header, use=required, chunk_rows=self.chunk_rows)

    def _joined_chunks(self, path: Path) -> Iterator[pa.Table]:
        file = str(path)
        for t, line in self._read(path, JOINED_COLUMNS):
            cols = {
                "ts": parse_time(t["time_stamp"], file=file, line=line, column="time_stamp",
                                 tz=self.cfg.timezone),
                "label": parse_label(t["clk"], file=file, line=line, column="clk"),
                "userid": parse_int(t["userid"], file=file, line=line, column="userid"),
                "adgroup_id": parse_int(t["adgroup_id"], file=file, line=line, column="adgroup_id"),
                "pid": parse_str(t["pid"]),
            }
            for f in PROFILE_FIELDS + AD_FIELDS:
                cols[f] = parse_int(t[f], file=file, line=line, column=f, nullable=True)
            cols["price"] = self._price(t["price"], file, line)
            yield _ordered(pa.table(cols), with_history=False)

    def _price(self, col, file: str, line: int) -> pa.Array:
        price = parse_float(col, file=file, line=line, column="price")
        negative = pc.less(price, 0)
        if pc.any(negative).as_py():
            i = _first(negative)
            raise DataError(f"expected a non-negative price, got {price[i].as_py()}",
                            file=file, row=line + i, column="price")
        return pc.log1p(price) if self.cfg.price_transform == "log1p" else price

    def _load_side(self, path: Path, columns: Sequence[str]) -> "_Lookup":
        """ad_feature.csv or user_profile.csv in memory: int64 keys + typed columns."""
        file, key = str(path), columns[0]
        parts: list[pa.Table] = []
        for t, line in self._read(path, columns):
            cols = {key: parse_int(t[key], file=file, line=line, column=key)}
            for c in columns[1:]:
                cols[c] = (self._price(t[c], file, line) if c == "price"
                           else parse_int(t[c], file=file, line=line, column=c, nullable=True))
            parts.append(pa.table(cols))
        table = pa.concat_tables(parts).combine_chunks()
        return _Lookup(table, key, file)

    def _folder_chunks(self, folder: Path, ads: "_Lookup", users: "_Lookup",
                       hist: "_BehaviorHistories | None") -> Iterator[pa.Table]:
        path = folder / "raw_sample.csv"
        file = str(path)
        for block, (t, line) in enumerate(self._read(path, RAW_SAMPLE_COLUMNS)):
            user = parse_int(t["user"], file=file, line=line, column="user")
            ad = parse_int(t["adgroup_id"], file=file, line=line, column="adgroup_id")
            ts = parse_time(t["time_stamp"], file=file, line=line, column="time_stamp",
                            tz=self.cfg.timezone)
            label = parse_label(t["clk"], file=file, line=line, column="clk")
            ad_rows, ad_ok = ads.find(ad.to_numpy())
            user_rows, user_ok = users.find(user.to_numpy())
            keep = self._check_missing(ad, ad_ok, user, user_ok, file, line)
            mask = pa.array(keep)
            cols = {"ts": ts[keep], "label": label.filter(mask), "userid": user.filter(mask),
                    "adgroup_id": ad.filter(mask), "pid": parse_str(t["pid"]).filter(mask)}
            side = ads.table.take(ad_rows[keep])
            for c in AD_COLUMNS[1:]:
                cols[c] = side[c]
            side = users.table.take(user_rows[keep])
            for c in USER_COLUMNS[1:]:
                cols[c] = side[c]
            if hist is not None:
                lists = hist.block(block, t.num_rows).filter(mask)
                for c in HISTORY_FEATURES:
                    cols[c] = lists[c]
            yield _ordered(pa.table(cols), with_history=hist is not None)

    def _check_missing(self, ad, ad_ok, user, user_ok, file: str, line: int) -> np.ndarray:
        """Rows whose ad and user are both known; the first unknown one is an error unless skipping."""
        keep = ad_ok & user_ok
        if not keep.all() and not self.cfg.skip_missing:
            i = int(np.flatnonzero(~keep)[0])
            name, value, side = (("adgroup_id", ad[i], "ad_feature.csv") if not ad_ok[i]
                                 else ("user", user[i], "user_profile.csv"))
            raise DataError(f"{name} {value.as_py()} is not in {side} (set taobao_raw.skip_missing: "
                            "true to drop such rows)", file=file, row=line + i, column=name)
        for what, n in (("missing_ad", int((~ad_ok).sum())), ("missing_user", int((ad_ok & ~user_ok).sum()))):
            if n:
                self.skipped[what] = self.skipped.get(what, 0) + n
        return keep

def _ordered(table: pa.Table, with_history: bool) -> pa.Table:
    names = ["ts", "label", "userid", *PROFILE_FIELDS, "adgroup_id", *AD_FIELDS, "price", "pid"]
    return table.select(names + (list(HISTORY_FEATURES) if with_history else []))


class _Lookup:
    """A side table keyed by a unique int64 column, joined with numpy ``searchsorted``."""

    def __init__(self, table: pa.Table, key: str, file: str) -> None:
        keys = table.column(key).to_numpy()
        self.table = table
        self.order = np.argsort(keys, kind="stable")
        self.sorted = keys[self.order]
        dup = np.flatnonzero(self.sorted[1:] == self.sorted[:-1])
        if len(dup):
            first, second = sorted((int(self.order[dup[0]]), int(self.order[dup[0] + 1])))
            raise DataError(f"duplicate {key} {int(keys[second])} (also on line {first + 2})",
                            file=file, row=second + 2, column=key)

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row of each key in ``table`` (0 where absent) and whether it was found."""
        if len(self.sorted) == 0:
            return np.zeros(len(keys), np.int64), np.zeros(len(keys), bool)
        pos = np.minimum(np.searchsorted(self.sorted, keys), len(self.sorted) - 1)
        ok = self.sorted[pos] == keys
        return np.where(ok, self.order[pos], 0), ok


class _BehaviorHistories:
    """Point-in-time behaviour histories for every raw_sample row, in bounded memory.

    Scratch layout under ``work``: ``ev-SSSS.parquet`` (events of shard S), ``imp-SSSS.parquet``
    (raw_sample row number, user, time of the impressions of shard S), ``res/bBBBBBB-sSSSS.parquet``
    (the lists of shard S for the raw_sample rows of block B, sorted by row).
    """

    EVENT_SCHEMA = pa.schema([("user", pa.int64()), ("ts", pa.int64()), ("btag", pa.string()),
                              ("cate", pa.int64()), ("brand", pa.int64())])
    IMP_SCHEMA = pa.schema([("row", pa.int64()), ("user", pa.int64()), ("ts", pa.int64())])

    def __init__(self, folder: Path, work: Path, cfg: TaobaoRawConfig, chunk_rows: int) -> None:
        self.folder, self.work, self.cfg, self.block_rows = folder, work, cfg, chunk_rows
        self.shards = cfg.behavior_shards

    def build(self) -> None:
        self._split(self.folder / "behavior_log.csv", "ev", self.EVENT_SCHEMA, self._events)
        self._split(self.folder / "raw_sample.csv", "imp", self.IMP_SCHEMA, self._impressions)
        (self.work / "res").mkdir()
        for s in range(self.shards):
            self._shard(s)
            for kind in ("ev", "imp"):
                (self.work / f"{kind}-{s:04d}.parquet").unlink(missing_ok=True)

    def _events(self, t: pa.Table, line: int, row0: int, file: str) -> pa.Table:
        return pa.table({
            "user": parse_int(t["user"], file=file, line=line, column="user"),
            "ts": parse_time(t["time_stamp"], file=file, line=line, column="time_stamp",
                             tz=self.cfg.timezone),
            "btag": parse_str(t["btag"]),
            "cate": parse_int(t["cate"], file=file, line=line, column="cate", nullable=True),
            "brand": parse_int(t["brand"], file=file, line=line, column="brand", nullable=True),
        }, schema=self.EVENT_SCHEMA)

    def _impressions(self, t: pa.Table, line: int, row0: int, file: str) -> pa.Table:
        return pa.table({
            "row": np.arange(row0, row0 + t.num_rows, dtype=np.int64),
            "user": parse_int(t["user"], file=file, line=line, column="user"),
            "ts": parse_time(t["time_stamp"], file=file, line=line, column="time_stamp",
                             tz=self.cfg.timezone),
        }, schema=self.IMP_SCHEMA)

    def _split(self, path: Path, kind: str, schema: pa.Schema, parse) -> None:
        """Stream ``path`` into per-shard Parquet files (file order kept within each shard)."""
        columns = BEHAVIOR_COLUMNS if kind == "ev" else ("user", "time_stamp")
        header = read_header(path)
        require_columns(path, header, columns)
        writers: dict[int, pq.ParquetWriter] = {}
        row0 = 0
        try:
            for t, line in iter_text_chunks(path, names=header, use=columns, chunk_rows=self.block_rows):
                table = parse(t, line, row0, str(path))
                row0 += t.num_rows
                shard = table.column("user").to_numpy() % self.shards
                order = np.argsort(shard, kind="stable")
                bounds = np.searchsorted(shard[order], np.arange(self.shards + 1))
                for s in range(self.shards):
                    if bounds[s + 1] > bounds[s]:
                        if s not in writers:
                            writers[s] = pq.ParquetWriter(self.work / f"{kind}-{s:04d}.parquet", schema)
                        writers[s].write_table(table.take(order[bounds[s]:bounds[s + 1]]))
        finally:
            for w in writers.values():
                w.close()

    def _read_shard(self, kind: str, s: int, schema: pa.Schema) -> pa.Table:
        path = self.work / f"{kind}-{s:04d}.parquet"
        return pq.read_table(path) if path.exists() else schema.empty_table()

    def _shard(self, s: int) -> None:
        imp = self._read_shard("imp", s, self.IMP_SCHEMA)
        if imp.num_rows == 0:
            return
        ev = self._read_shard("ev", s, self.EVENT_SCHEMA)
        eu, et = ev.column("user").to_numpy(), ev.column("ts").to_numpy()
        iu, it = imp.column("user").to_numpy(), imp.column("ts").to_numpy()
        # The shared point-in-time search: events in (user, time, file order), strictly earlier.
        order = timeline_order(eu, et)
        start, end = Timeline(eu[order], et[order]).bounds(iu, it, max_len=self.cfg.history_len)
        gather_rows, offsets = gather(start, end)
        values = ev.take(pa.array(order[gather_rows])).combine_chunks()
        rows = imp.column("row").to_numpy()
        blocks = rows // self.block_rows
        bounds = np.flatnonzero(np.diff(blocks)) + 1  # rows are ascending within a shard
        for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(rows)]):
            # One block's lists (at most chunk_rows * history_len values): int32 offsets suffice.
            off = pa.array((offsets[lo:hi + 1] - offsets[lo]).astype(np.int32))
            part = values.slice(offsets[lo], offsets[hi] - offsets[lo])
            table = pa.table({"row": rows[lo:hi], **{
                name: pa.ListArray.from_arrays(off, part.column(src).combine_chunks())
                for name, src in zip(HISTORY_FEATURES, ("btag", "cate", "brand"))}})
            pq.write_table(table, self.work / "res" / f"b{int(blocks[lo]):06d}-s{s:04d}.parquet")

    def block(self, b: int, n: int) -> pa.Table:
        """The lists of raw_sample rows ``b * chunk_rows ..`` (``n`` rows), in row order."""
        parts = [pq.read_table(p) for p in sorted((self.work / "res").glob(f"b{b:06d}-s*.parquet"))]
        table = pa.concat_tables(parts).sort_by("row")
        rows = table.column("row").to_numpy()
        expect = np.arange(b * self.block_rows, b * self.block_rows + n)
        if len(rows) != n or not np.array_equal(rows, expect):
            raise RuntimeError(f"behaviour histories of block {b} are incomplete "
                               f"({len(rows)} of {n} rows); was raw_sample.csv changed while reading?")
        return table.select(list(HISTORY_FEATURES)).combine_chunks()
