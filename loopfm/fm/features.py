"""Which event-log columns the FM reads, and where each one is looked up.

`select_features` applies the FM's feature-set config (groups or explicit names), so two FM
generations with a feature gap (FM1 sees a subset of FM2's features) come from one event log.
`FeatureLayout` then decides the lookup path of every selected feature:

* **behaviour sequence** -- sequence features of ``sequence_group`` (default ``history``): aligned
  per position (same ``max_len``), looked up in the `EmbeddingCollection` (one vector per id) and
  attended by DMIN. A history column shares the table of its target field (schema ``vocab``), so
  those tables, and every feature that uses them (the target ``item_id`` itself, as a 1-long
  sequence), live in the EmbeddingCollection;
* **pooled** -- all other categorical features (one id) and multi-valued sequence features
  (mean-pooled bags, an empty bag pools to zeros) in the `EmbeddingBagCollection`;
* **numeric** -- float columns, embedded as value x learned vector.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass

from loopfm.data.schema import FeatureSpec, Schema
from loopfm.fm.config import FMConfigError, ModelConfig


def select_features(schema: Schema, cfg: ModelConfig) -> list[FeatureSpec]:
    """The features this FM sees, in schema order."""
    names = [f.name for f in schema.features]
    if cfg.features:
        for n in cfg.features:
            if n not in names:
                near = difflib.get_close_matches(n, names, n=1)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                raise FMConfigError(f"fm.model.features: no feature {n!r} in the event log{hint} (features: {names})")
        chosen = [f for f in schema.features if f.name in cfg.features]
    elif cfg.groups:
        groups = sorted({f.group for f in schema.features})
        for g in cfg.groups:
            if g not in groups:
                near = difflib.get_close_matches(g, groups, n=1)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                raise FMConfigError(f"fm.model.groups: no feature group {g!r} in the event log{hint} "
                                    f"(groups: {groups})")
        chosen = [f for f in schema.features if f.group in cfg.groups]
    else:
        chosen = list(schema.features)
    if not any(f.kind != "numeric" for f in chosen):
        raise FMConfigError("the FM needs at least one categorical or sequence feature")
    return chosen


@dataclass(frozen=True)
class Table:
    name: str  # embedding table name, "t_<vocab>"
    vocab: str
    num_embeddings: int
    features: tuple[str, ...]


@dataclass(frozen=True)
class FeatureLayout:
    """Lookup paths of the selected features (see module docstring); all tuples keep schema order."""
    numeric: tuple[str, ...]
    pooled: tuple[str, ...]  # EBC keys, in KJT order
    behaviour: tuple[str, ...]  # EC behaviour sequences
    targets: tuple[str, ...]  # EC single-id features (targets of the behaviour sequence)
    ec_bags: tuple[str, ...]  # EC multi-valued features pooled by mean
    seq_target: tuple[str | None, ...]  # per behaviour sequence: its target feature, if selected
    max_len: int  # behaviour sequence length
    ebc_tables: tuple[Table, ...]
    ec_tables: tuple[Table, ...]
    kinds: tuple[tuple[str, str], ...]  # (feature, kind) of every selected feature

    @property
    def ec_keys(self) -> tuple[str, ...]:
        return self.behaviour + self.targets + self.ec_bags

    @property
    def num_fields(self) -> int:
        """Feature embeddings besides the behaviour sequence."""
        return len(self.pooled) + len(self.targets) + len(self.ec_bags) + len(self.numeric)

    @property
    def columns(self) -> list[str]:
        return [n for n, _ in self.kinds]

    def kind(self, name: str) -> str:
        return dict(self.kinds)[name]

    @classmethod
    def build(cls, features: list[FeatureSpec], sequence_group: str) -> "FeatureLayout":
        behaviour = [f for f in features if f.kind == "sequence" and f.group == sequence_group]
        lens = {f.max_len for f in behaviour}
        if len(lens) > 1:
            raise FMConfigError(f"behaviour sequences {[f.name for f in behaviour]} must share one max_len "
                             f"(found {sorted(lens)}); select a consistent set with fm.model.features")
        ec_vocabs = {f.vocab_name for f in behaviour}
        in_ec = [f for f in features if f.kind != "numeric" and f.vocab_name in ec_vocabs]
        targets = [f for f in in_ec if f.kind == "categorical"]
        ec_bags = [f for f in in_ec if f.kind == "sequence" and f not in behaviour]
        pooled = [f for f in features if f.kind != "numeric" and f.vocab_name not in ec_vocabs]
        by_vocab = {f.vocab_name: f for f in targets}
        return cls(
            numeric=tuple(f.name for f in features if f.kind == "numeric"),
            pooled=tuple(_table_order(pooled)),
            behaviour=tuple(f.name for f in behaviour),
            targets=tuple(f.name for f in targets),
            ec_bags=tuple(f.name for f in ec_bags),
            seq_target=tuple(by_vocab[f.vocab_name].name if f.vocab_name in by_vocab else None
                             for f in behaviour),
            max_len=max(lens) if lens else 0,
            ebc_tables=_tables(pooled),
            ec_tables=_tables(in_ec),
            kinds=tuple((f.name, f.kind) for f in features),
        )


def _tables(features: list[FeatureSpec]) -> tuple[Table, ...]:
    tables: dict[str, list[FeatureSpec]] = {}
    for f in features:
        tables.setdefault(f.vocab_name, []).append(f)
    return tuple(Table(f"t_{v}", v, fs[0].vocab_size, tuple(f.name for f in fs)) for v, fs in tables.items())


def _table_order(features: list[FeatureSpec]) -> list[str]:
    # An EmbeddingBagCollection's pooled output is ordered table by table, then by feature.
    return [name for t in _tables(features) for name in t.features]


class ArchitectureWarning(UserWarning):
    """The FM's architecture will not get the input it is built for (see `architecture_warnings`)."""


def architecture_warnings(features: list[FeatureSpec], layout: FeatureLayout, cfg: ModelConfig) -> list[str]:
    """What the selected features fail to give the FM's architecture, each with its fix.

    * a DMIN FM without a behaviour sequence trains without its attention (nothing to attend
      over): LoopFM's gain comes from what the FM sees and the VM does not, usually that history;
    * a sequence that shares another feature's vocabulary (a history of item ids, say) outside
      ``fm.model.sequence_group`` is mean-pooled as a bag, not attended as a sequence.
    """
    out = []
    group = cfg.sequence_group
    stray = [f for f in features if f.kind == "sequence" and f.vocab is not None and f.group != group]
    for f in stray:
        out.append(f"feature {f.name!r} looks like a behaviour history (it shares {f.vocab!r}'s vocabulary) but "
                   f"is in group {f.group!r}, so the FM mean-pools it as a bag instead of attending over it; "
                   f"fix: give it group: {group} (events schema: kind: history does so by default) or set "
                   f"fm.model.sequence_group={f.group}")
    if cfg.arch == "dmin" and not layout.behaviour:
        fix = (f"set fm.model.sequence_group={stray[0].group}" if stray else
               "add a history to the event log (events schema: {name: hist_item_id, kind: history, of: "
               "ITEM}) or set fm.model.arch=deepfm")
        out.append(f"fm.model.arch=dmin attends over a behaviour sequence, but no selected sequence feature is in "
                   f"group {group!r}: the FM trains without its attention; fix: {fix}")
    return out
