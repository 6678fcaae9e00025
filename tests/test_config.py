from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from loopfm.config import ConfigError, apply_overrides, config_hash, from_dict, load_config, save_config, to_dict
from loopfm.experiment import LoopFMConfig


@dataclass(kw_only=True)
class Inner:
    rate: float = 0.1
    mode: Literal["a", "b"] = "a"
    dims: list[int] = field(default_factory=lambda: [8, 16])

    def __post_init__(self) -> None:
        if self.rate < 0:
            raise ValueError("rate must be >= 0")


@dataclass(kw_only=True)
class Outer:
    name: str = "x"
    steps: int = 3
    path: str | None = None
    flag: bool = False
    inner: Inner = field(default_factory=Inner)


def test_defaults_and_nested_values():
    cfg = from_dict(Outer, {"steps": 5, "inner": {"rate": 1, "dims": [1, 2, 3]}})
    assert cfg.steps == 5 and cfg.inner.rate == 1.0 and isinstance(cfg.inner.rate, float)
    assert cfg.inner.dims == [1, 2, 3] and cfg.inner.mode == "a"


@pytest.mark.parametrize("data, message", [
    ({"step": 5}, "unknown key 'step'; did you mean 'steps'?"),
    ({"inner": {"rat": 1.0}}, "unknown key 'inner.rat'; did you mean 'rate'?"),
    ({"steps": "5"}, "steps: expected an integer, got '5'"),
    ({"steps": 2.5}, "steps: expected an integer"),
    ({"flag": 1}, "flag: expected true/false"),
    ({"inner": {"mode": "c"}}, "inner.mode: 'c' is not one of ['a', 'b']"),
    ({"inner": {"dims": [1, "x"]}}, "inner.dims[1]: expected an integer"),
    ({"inner": {"rate": -1.0}}, "inner: rate must be >= 0"),
    ({"inner": 3}, "inner: expected a mapping"),
])
def test_bad_configs_are_rejected_with_location(data, message):
    with pytest.raises(ConfigError) as err:
        from_dict(Outer, data)
    assert message in str(err.value)


def test_overrides_are_yaml_typed():
    data = apply_overrides({"inner": {"rate": 0.5}}, ["steps=7", "inner.dims=[4, 5]", "path=null",
                                                      "name=hello", "inner.mode=b"])
    cfg = from_dict(Outer, data)
    assert cfg.steps == 7 and cfg.inner.dims == [4, 5] and cfg.path is None and cfg.name == "hello"
    assert cfg.inner.rate == 0.5 and cfg.inner.mode == "b"
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides({}, ["steps"])
    with pytest.raises(ConfigError, match="did you mean 'steps'"):
        from_dict(Outer, apply_overrides({}, ["stepz=1"]))


def test_round_trip_and_hash(tmp_path):
    cfg = from_dict(Outer, {"steps": 9, "inner": {"mode": "b"}})
    save_config(cfg, tmp_path / "c.yaml")
    again = from_dict(Outer, yaml.safe_load((tmp_path / "c.yaml").read_text()))
    assert again == cfg and config_hash(again) == config_hash(cfg)
    assert config_hash(dataclasses.replace(cfg, steps=10)) != config_hash(cfg)


def test_experiment_config_loads_quickstart_and_rejects_typos(tmp_path):
    repo = __import__("pathlib").Path(__file__).resolve().parents[1]
    cfg = load_config(LoopFMConfig, repo / "configs" / "quickstart.yaml", ["data.synthetic.rows=1000"])
    assert cfg.data.source == "synthetic" and cfg.data.synthetic.rows == 1000
    with pytest.raises(ConfigError, match="did you mean 'min_count'"):
        load_config(LoopFMConfig, None, ["data.min_cont=3"])
    with pytest.raises(ConfigError, match="did you mean 'movielens'"):
        load_config(LoopFMConfig, None, ["data.source=movielenz"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 1\ndata:\n  sorce: synthetic\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'data.sorce'; did you mean 'source'"):
        load_config(LoopFMConfig, bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(LoopFMConfig, tmp_path / "missing.yaml")
    assert to_dict(cfg)["data"]["synthetic"]["rows"] == 1000


def test_seeds_flag_is_shorthand_for_vm_seeds():
    from pathlib import Path

    from loopfm.cli import _load, build_parser

    quickstart = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
    args = build_parser().parse_args(["run", quickstart, "--out", "x", "--seeds", "3"])
    assert _load(args).vm.seeds == 3
    args = build_parser().parse_args(["train-vm", quickstart, "--out", "x"])
    assert _load(args).vm.seeds == 1
