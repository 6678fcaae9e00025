"""The saved feature schema of a prepared dataset (``OUT/schema.json``).

Conventions (one everywhere): categorical and sequence values are integer ids with 0 = padding
and ``vocab_size - 1`` = out-of-vocabulary; sequences are newest-last lists of ids truncated to
``max_len`` (newest kept); numeric features are float32. ``fm_only`` features are the FM's
"extra" features (the feature gap of the paper): vertical models never read them.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Kind = Literal["categorical", "numeric", "sequence"]
Role = Literal["user", "item", "context"]
KINDS = ("categorical", "numeric", "sequence")
ROLES = ("user", "item", "context")


@dataclass(frozen=True)
class FeatureSpec:
    name: str
    kind: Kind
    role: Role
    fm_only: bool = False
    # Vocabulary this feature's ids come from; a behaviour-history column names the vocabulary of
    # its target field (``hist_item_id`` -> ``item_id``) so both share one embedding table.
    vocab: str | None = None
    max_len: int = 0  # sequence features only
    group: str = ""  # feature group, so an FM generation can be configured to see only some groups
    vocab_size: int = 0  # filled in by prepare: ids are 0..vocab_size-1
    description: str = ""

    def __post_init__(self) -> None:
        if not self.name.isidentifier():  # names become file names (vocab/<name>.parquet) and columns
            raise ValueError(f"feature name {self.name!r} must be an identifier (letters, digits, _)")
        if self.vocab is not None and not self.vocab.isidentifier():
            raise ValueError(f"feature {self.name!r}: vocabulary name {self.vocab!r} must be an identifier")
        if self.kind not in KINDS:
            raise ValueError(f"feature {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.role not in ROLES:
            raise ValueError(f"feature {self.name!r}: role must be one of {ROLES}, got {self.role!r}")
        if self.kind == "sequence" and self.max_len <= 0:
            raise ValueError(f"feature {self.name!r}: a sequence feature needs max_len > 0")
        if self.kind == "numeric" and self.vocab is not None:
            raise ValueError(f"feature {self.name!r}: a numeric feature has no vocabulary")

    @property
    def vocab_name(self) -> str | None:
        if self.kind == "numeric":
            return None
        return self.vocab or self.name

    @property
    def oov_id(self) -> int:
        return self.vocab_size - 1


@dataclass
class Schema:
    dataset: str
    user_key: str
    item_key: str
    num_days: int
    features: list[FeatureSpec] = field(default_factory=list)

    def __post_init__(self) -> None:
        names = [f.name for f in self.features]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"duplicate feature names: {sorted(dupes)}")
        reserved = {"example_id", "ts", "day", "label"} & set(names)
        if reserved:
            raise ValueError(f"feature names {sorted(reserved)} are reserved for event-log columns")
        for key in (self.user_key, self.item_key):
            if key not in names:
                raise ValueError(f"key column {key!r} is not among the features {names}")

    def feature(self, name: str) -> FeatureSpec:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(f"no feature {name!r}; features: {[f.name for f in self.features]}")

    def vm_features(self) -> list[FeatureSpec]:
        """What a vertical model may read: everything that is not FM-only."""
        return [f for f in self.features if not f.fm_only]

    def vocab_sizes(self) -> dict[str, int]:
        return {f.vocab_name: f.vocab_size for f in self.features if f.vocab_name}

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "Schema":
        raw = json.loads(text)
        raw["features"] = [FeatureSpec(**f) for f in raw["features"]]
        return cls(**raw)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "Schema":
        return cls.from_json(Path(path).read_text())
