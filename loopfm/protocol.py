"""The day protocol, checked once on the whole config before any stage runs.

A LoopFM result is "the VMs, tested on a day no model trained on". Each section configures its own
days; only here are they checked against each other:

* every day list names at least one day (an empty list never means "all days");
* FM training days < VM training days < test day (one pass forward in time);
* the test day is never an FM training or refresh day, a KD-tuning day, or a compress fit day;
* the FM is evaluated on the test day (the report compares the VMs with it);
* extract days (and sequences.days, when given) cover the VM training and test days;
* KD tuning (``tune-kd`` only) trains and validates after the FM days, inside the extract days;
* every VM model name is known (variants, encoders and quantizers are checked by their sections).

`check_protocol` raises a `ConfigError` naming the key; the CLI turns it into one line, exit 2,
before anything is written. `check_days_in_log` does the same against a prepared event log (the
days a source produces are known only once it is read).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from loopfm.config import ConfigError

if TYPE_CHECKING:
    from loopfm.experiment import LoopFMConfig


def check_protocol(cfg: LoopFMConfig, *, tune_kd: bool = False) -> None:
    """Raise `ConfigError` naming the key unless the config keeps the day protocol."""
    fm, vm, test = cfg.fm.train, cfg.vm, cfg.vm.test_day
    _nonempty({"fm.train.train_days": fm.train_days, "fm.train.eval_days": fm.eval_days,
               "vm.train_days": vm.train_days, "extract.days": cfg.extract.days})
    if max(fm.train_days) >= min(vm.train_days):
        raise ConfigError(f"vm.train_days {vm.train_days} must all come after the FM training days "
                          f"fm.train.train_days {fm.train_days}")
    if max(vm.train_days) >= test:
        raise ConfigError(f"vm.test_day {test} must come after every VM training day vm.train_days {vm.train_days}")
    if test in fm.refresh_days:
        raise ConfigError(f"fm.train.refresh_days {fm.refresh_days} must not hold the test day vm.test_day={test}")
    if test not in fm.eval_days:
        raise ConfigError(f"fm.train.eval_days {fm.eval_days} must hold the test day vm.test_day={test} "
                          "(the report compares the VMs with the FM on it)")
    _cover("extract.days", cfg.extract.days, [*vm.train_days, test])
    if cfg.sequences.days:
        _cover("sequences.days", cfg.sequences.days, [*vm.train_days, test])
    if test in cfg.compress.fit_days:
        raise ConfigError(f"compress.fit_days {cfg.compress.fit_days} must not hold the test day vm.test_day={test}")
    _cover("extract.days", cfg.extract.days, cfg.compress.fit_days, what="compress.fit_days")
    _known_models("vm.models", vm.models)
    if tune_kd:
        _check_tune_kd(cfg)


def check_days_in_log(cfg: LoopFMConfig, log_days: Sequence[int], where: str) -> None:
    """Every configured day is a day of the prepared event log ``where``."""
    have = set(log_days)
    lists = {"fm.train.train_days": cfg.fm.train.train_days, "fm.train.eval_days": cfg.fm.train.eval_days,
             "fm.train.refresh_days": cfg.fm.train.refresh_days, "extract.days": cfg.extract.days,
             "vm.train_days": cfg.vm.train_days, "vm.test_day": [cfg.vm.test_day],
             "compress.fit_days": cfg.compress.fit_days, "sequences.days": cfg.sequences.days}
    for key, days in lists.items():
        missing = sorted(set(days) - have)
        if missing:
            raise ConfigError(f"{key}: days {missing} are not in the event log {where} "
                              f"(days {sorted(have)})")


def _nonempty(lists: dict[str, list[int]]) -> None:
    for key, days in lists.items():
        if not days:
            raise ConfigError(f"{key} is empty: name the days explicitly (an empty list never means all days)")


def _cover(key: str, have: Sequence[int], need: Sequence[int], what: str = "the VM training and test days") -> None:
    missing = sorted(set(need) - set(have))
    if missing:
        raise ConfigError(f"{key} {list(have)} must cover {what}: add {missing}")


def _known_models(key: str, models: Sequence[str]) -> None:
    from loopfm.vm.model import MODELS

    for m in models:
        if m not in MODELS:
            import difflib

            near = difflib.get_close_matches(m, MODELS, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"{key}: unknown model {m!r}{hint} (models: {', '.join(MODELS)})")


def _check_tune_kd(cfg: LoopFMConfig) -> None:
    t, test = cfg.tune_kd, cfg.vm.test_day
    if test in t.days():
        raise ConfigError(f"tune_kd must not use the test day vm.test_day={test} (tune_kd.train_days "
                          f"{t.train_days}, tune_kd.valid_day {t.valid_day}): choose hyperparameters on earlier days")
    if max(t.days()) > test:
        raise ConfigError(f"tune_kd.train_days {t.train_days} and tune_kd.valid_day {t.valid_day} must come "
                          f"before the test day vm.test_day={test}")
    if min(t.days()) <= max(cfg.fm.train.train_days):
        raise ConfigError(f"tune_kd.train_days {t.train_days} must come after the FM training days "
                          f"fm.train.train_days {cfg.fm.train.train_days}")
    _cover("extract.days", cfg.extract.days, t.days(), what="the KD-tuning days tune_kd.train_days + valid_day")
    _known_models("tune_kd.models", t.models)
