"""TaobaoAd_x1 (reczoo/FuxiCTR) and the 267-column Alimama/DMR layout it is converted from.

Input (``path``, one file; the layout is detected from its first line):

* **TaobaoAd_x1 CSV** (a header line naming ``clk``): columns found by name --
  ``clk, userid, cms_segid, cms_group_id, final_gender_code, age_level, pvalue_level,
  shopping_level, occupation, new_user_class_level, adgroup_id, cate_id, campaign_id, customer,
  brand, price, pid, btag_his, cate_his, brand_his``; the ``*_his`` columns are lists joined by
  ``separator`` (FuxiCTR's ``splitter: ^``), oldest first, newest last (FuxiCTR pads and truncates
  them at the front, ``padding: pre``). Other columns are ignored -- notably FuxiCTR's ``btag``
  (the vocabulary anchor of ``btag_his``), which the DMR layout has no field for.
* **DMR 267-column text** (no header, comma-separated, one impression per line, as PaddleRec's
  DMR ``alimama_sampled.txt``): fields 0-49 behaviour type (btag) history, 50-99 category
  history, 100-149 brand history, 150-199 history mask, 200-249 "match" mask (unused), 250-258
  user fields (uid, cms_segid, cms_group_id, final_gender_code, age_level, pvalue_level,
  shopping_level, occupation, new_user_class_level), 259-265 ad fields (adgroup_id, cate_id,
  campaign_id, customer, brand, price normalised to about 0..1, pid 0/1), 266 click label.

How the DMR histories are laid out (checked on the 500-row sample in ``shared/data``): padding is
on the *left* -- the mask is 0 for a prefix and 1 for the rest (lengths 1, 2, 28, 48 and 50 occur)
and every masked-out entry is 0 while no unmasked one is; btag values are 1..4 with 0 = padding.
The newest entry is the *last*: of the 50 pairs of consecutive same-user rows whose histories
differ, 47 are the earlier history shifted left by a few positions with new entries appended on
the right, none is a right shift (beyond coincidences of repeated values), 3 fit neither. So the
history of a row is its unmasked entries in field order, which is already newest last. In the
TaobaoAd_x1 CSV an entry whose btag is ``0`` is DMR padding and is dropped together with the
cate/brand entries at the same position.

Time. Neither layout has timestamps; row order stands for time order. ``ts`` is synthesised as
``start_ts + row position`` (one second per row, strictly increasing, so prepare keeps the file
order), and days are ``DayRule("equal_count", num_days=days)``: ``days`` periods of equal row
count by row position (8 by default, the raw data's 8 days). Caveat, seen in the DMR sample: its
rows are grouped by user (nearly sorted by user id as a string) and in time order only within a
user, so "days" by row position are then only an approximation of real days.

Features (the same names and kinds as `taobao_raw`): ``userid`` (user key), the 8 profile fields
(role user, group user_profile), ``adgroup_id`` (item key), ``cate_id, campaign_id, customer,
brand`` (item, ad), ``price`` (numeric, taken as given: the DMR price is already normalised),
``pid`` (context), and the sequences ``hist_btag`` (own vocabulary), ``hist_cate`` (vocabulary of
``cate_id``) and ``hist_brand`` (vocabulary of ``brand``), max_len ``history_len``, newest last.
The three histories are FM-only by default (``fm_only_features``): the long behaviour history is
the FM's extra signal, which a vertical model should get only through LoopFM sequences.

Errors (`DataError` with file, 1-based line, column): empty file, a first line that is neither
layout, missing x1 column (nearest name suggested), ragged row (wrong field count), non-numeric
value in a numeric or id field, click label other than 0/1, mask value other than 0/1, history
lists of unequal length.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from loopfm.data.errors import DataError
from loopfm.data.source import DayRule, SourceInfo
from loopfm.data.sources.taobao_raw import (
    AD_FIELDS, ALL_FEATURES, HISTORY_FEATURES, PROFILE_FIELDS, check_feature_names, taobao_features,
)
from loopfm.data.text import (iter_text_chunks, parse_float, parse_int, parse_label, parse_str, read_header,
                              require_columns, split_line)

DMR_FIELDS = 267
DMR_HISTORY = 50
DMR_NAMES = ([f"btag_his_{j}" for j in range(DMR_HISTORY)] + [f"cate_his_{j}" for j in range(DMR_HISTORY)]
             + [f"brand_his_{j}" for j in range(DMR_HISTORY)] + [f"mask_{j}" for j in range(DMR_HISTORY)]
             + [f"match_mask_{j}" for j in range(DMR_HISTORY)]
             + ["userid", *PROFILE_FIELDS, "adgroup_id", *AD_FIELDS, "price", "pid", "clk"])
DMR_USED = [n for n in DMR_NAMES if not n.startswith("match_mask_")]
X1_COLUMNS = ("clk", "userid", *PROFILE_FIELDS, "adgroup_id", *AD_FIELDS, "price", "pid",
              "btag_his", "cate_his", "brand_his")
# A 267-field DMR row is ~1.5 kB of text: bound the rows parsed at once whatever chunk_rows is.
DMR_MAX_CHUNK_ROWS = 131_072


@dataclass(kw_only=True)
class TaobaoX1Config:
    path: str = field(default="", metadata={"input": True,
        "help": "TaobaoAd_x1 CSV (header with clk, *_his lists) or the 267-column DMR text file"})
    days: int = field(default=8, metadata={"help": "equal-count days cut by row position"})
    start_ts: int = field(default=1_494_000_000, metadata={
        "help": "synthetic ts of the first row (unix s; default 2017-05-06 00:00 Asia/Shanghai); "
                "row k gets start_ts + k"})
    history_len: int = field(default=50, metadata={"help": "max_len of the behaviour histories"})
    fm_only_features: list[str] | None = field(default=None, metadata={
        "help": "features only the FM sees; null = the three behaviour histories"})
    separator: str = field(default="^", metadata={"help": "list separator of the x1 *_his columns"})

    def __post_init__(self) -> None:
        if self.days < 1:
            raise ValueError(f"taobao_x1.days must be >= 1, got {self.days}")
        if self.history_len < 1:
            raise ValueError(f"taobao_x1.history_len must be >= 1, got {self.history_len}")
        if len(self.separator) != 1 or self.separator == ",":
            raise ValueError(f"taobao_x1.separator must be one character other than ',', "
                             f"got {self.separator!r}")
        if self.fm_only_features is not None:
            check_feature_names(self.fm_only_features, ALL_FEATURES, "taobao_x1.fm_only_features")


class TaobaoX1Source:
    """TaobaoAd_x1 CSV or DMR 267-column rows -> raw event chunks. See module doc."""

    def __init__(self, cfg: TaobaoX1Config, *, seed: int, chunk_rows: int) -> None:
        self.cfg, self.seed, self.chunk_rows = cfg, seed, chunk_rows  # reading is deterministic
        self.skipped: dict[str, int] = {}

    def info(self) -> SourceInfo:
        fm_only = set(HISTORY_FEATURES if self.cfg.fm_only_features is None else self.cfg.fm_only_features)
        return SourceInfo(dataset="taobao-x1", user_key="userid", item_key="adgroup_id",
                          features=taobao_features(fm_only, self.cfg.history_len, True),
                          days=DayRule("equal_count", num_days=self.cfg.days))

    def layout(self) -> Literal["x1", "dmr"]:
        """``x1`` when the first line is a header naming ``clk``, ``dmr`` when it has 267 fields."""
        if not self.cfg.path:
            raise ValueError("data.taobao_x1.path is empty: set it to the TaobaoAd_x1 CSV or DMR file")
        path = Path(self.cfg.path)
        if not path.is_file():
            raise DataError("no such file", file=str(path))
        with open(path, newline="", encoding="utf-8-sig") as f:
            first = f.readline()
        if not first.strip():
            raise DataError("the file is empty", file=str(path), row=1)
        fields = [x.strip() for x in split_line(first.rstrip("\r\n"), ",", '"')]
        if "clk" in fields:
            return "x1"
        if len(fields) == DMR_FIELDS:
            return "dmr"
        raise DataError(f"expected a TaobaoAd_x1 header naming 'clk' or {DMR_FIELDS} DMR fields, "
                        f"found {len(fields)} fields", file=str(path), row=1)

    def chunks(self) -> Iterator[pa.Table]:
        path = Path(self.cfg.path)
        if self.layout() == "x1":
            header = read_header(path)
            require_columns(path, header, X1_COLUMNS)
            parts = iter_text_chunks(path, names=header, use=X1_COLUMNS, chunk_rows=self.chunk_rows)
            parse = self._x1_rows
        else:
            parts = iter_text_chunks(path, names=DMR_NAMES, use=DMR_USED, header=False,
                                     chunk_rows=min(self.chunk_rows, DMR_MAX_CHUNK_ROWS))
            parse = self._dmr_rows
        position = 0
        for t, line in parts:
            cols = parse(t, str(path), line)
            cols["ts"] = self.cfg.start_ts + np.arange(position, position + t.num_rows, dtype=np.int64)
            position += t.num_rows
            yield pa.table({name: cols[name] for name in ["ts", "label", *ALL_FEATURES]})

    def _scalars(self, t: pa.Table, file: str, line: int) -> dict:
        cols = {"label": parse_label(t["clk"], file=file, line=line, column="clk"),
                "price": parse_float(t["price"], file=file, line=line, column="price")}
        for name in ("userid", "adgroup_id"):
            cols[name] = parse_int(t[name], file=file, line=line, column=name)
        for name in (*PROFILE_FIELDS, *AD_FIELDS):
            cols[name] = parse_int(t[name], file=file, line=line, column=name, nullable=True)
        cols["pid"] = parse_str(t["pid"])  # DMR: 0/1; TaobaoAd_x1 may keep Tianchi's '430548_1007'
        return cols

    def _dmr_rows(self, t: pa.Table, file: str, line: int) -> dict:
        cols = self._scalars(t, file, line)

        def block(prefix: str) -> np.ndarray:
            return np.column_stack([
                parse_int(t[f"{prefix}_{j}"], file=file, line=line, column=f"{prefix}_{j}").to_numpy()
                for j in range(DMR_HISTORY)])

        mask = block("mask")
        if not np.isin(mask, (0, 1)).all():
            i, j = (int(x[0]) for x in np.nonzero(~np.isin(mask, (0, 1))))
            raise DataError(f"expected a history mask 0 or 1, got {int(mask[i, j])}", file=file,
                            row=line + i, column=f"mask_{j}")
        valid = mask == 1
        offsets = pa.array(np.r_[0, np.cumsum(valid.sum(axis=1))].astype(np.int32))
        for name, prefix in zip(HISTORY_FEATURES, ("btag_his", "cate_his", "brand_his")):
            # Row-major selection keeps field order: oldest first, newest last.
            cols[name] = pa.ListArray.from_arrays(offsets, pa.array(block(prefix)[valid]))
        return cols

    def _x1_rows(self, t: pa.Table, file: str, line: int) -> dict:
        cols = self._scalars(t, file, line)
        lists = {}
        for name, column in zip(HISTORY_FEATURES, ("btag_his", "cate_his", "brand_his")):
            text = t[column].combine_chunks()
            split = pc.split_pattern(pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text),
                                     self.cfg.separator)
            split = pc.fill_null(split, pa.scalar([], pa.list_(pa.string())))
            flat = split.flatten()
            parents = pc.list_parent_indices(split).to_numpy()
            try:
                values = parse_int(flat, file=file, line=0, column=column)
            except DataError as err:  # re-point the error at the row the bad entry belongs to
                k = _first_bad_entry(flat)
                raise DataError(err.detail, file=file, row=line + int(parents[k]), column=column) from None
            lists[column] = (pc.list_value_length(split).to_numpy(), values.to_numpy())
        lengths = lists["btag_his"][0]
        for column in ("cate_his", "brand_his"):
            uneven = np.flatnonzero(lists[column][0] != lengths)
            if len(uneven):
                i = int(uneven[0])
                raise DataError(f"expected as many entries as btag_his ({lengths[i]}), found "
                                f"{lists[column][0][i]}", file=file, row=line + i, column=column)
        keep = lists["btag_his"][1] != 0  # btag 0 marks DMR padding
        owner = np.repeat(np.arange(len(lengths)), lengths)
        offsets = pa.array(np.r_[0, np.cumsum(np.bincount(owner[keep], minlength=len(lengths)))]
                           .astype(np.int32))
        for name, column in zip(HISTORY_FEATURES, ("btag_his", "cate_his", "brand_his")):
            cols[name] = pa.ListArray.from_arrays(offsets, pa.array(lists[column][1][keep]))
        return cols


def _first_bad_entry(flat: pa.Array) -> int:
    ok = pc.match_substring_regex(flat, r"^[+-]?[0-9]+$").to_numpy(zero_copy_only=False)
    return int(np.flatnonzero(~np.asarray(ok, dtype=bool))[0])
