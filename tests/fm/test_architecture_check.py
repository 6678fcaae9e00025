"""The FM is told when its architecture will not get what it needs (with the fix named)."""
from __future__ import annotations

from loopfm.data.schema import FeatureSpec
from loopfm.fm.config import ModelConfig
from loopfm.fm.features import FeatureLayout, architecture_warnings


def _features(hist_group: str | None) -> list[FeatureSpec]:
    out = [FeatureSpec("uid", "categorical", "user", vocab_size=5), FeatureSpec("iid", "categorical", "item", vocab_size=5),
           FeatureSpec("genres", "sequence", "item", max_len=3, vocab_size=4)]  # a bag, not a history
    if hist_group is not None:
        out.append(FeatureSpec("hist_iid", "sequence", "user", vocab="iid", max_len=4, group=hist_group, vocab_size=5))
    return out


def _check(features, **model):
    cfg = ModelConfig(**model)
    return architecture_warnings(features, FeatureLayout.build(features, cfg.sequence_group), cfg)


def test_dmin_with_its_history_is_quiet():
    assert _check(_features("history"), arch="dmin") == []


def test_dmin_without_any_history_names_the_fix():
    (msg,) = _check(_features(None), arch="dmin")
    assert "no selected sequence feature is in group 'history'" in msg and "kind: history" in msg
    assert "fm.model.arch=deepfm" in msg
    assert _check(_features(None), arch="deepfm") == []


def test_history_outside_the_sequence_group_is_a_pooled_bag():
    stray, dmin = _check(_features("user"), arch="dmin")
    assert "'hist_iid' looks like a behaviour history" in stray and "group: history" in stray
    assert "fm.model.sequence_group=user" in dmin
    (only,) = _check(_features("user"), arch="deepfm")  # a bag under DeepFM too: still worth saying
    assert "mean-pools" in only
