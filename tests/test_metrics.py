"""Tests for loopfm.metrics against scikit-learn and hand computations."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from sklearn.metrics import log_loss as sk_log_loss
from sklearn.metrics import roc_auc_score

from loopfm import metrics as M
from loopfm.metrics import (
    LOGLOSS_EPS,
    auc,
    binary_metrics,
    gauc,
    logloss,
    ne,
    transfer_ratio,
)

HYP = settings(
    max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


def _entropy(q: float) -> float:
    return -(q * math.log(q) + (1 - q) * math.log(1 - q))


def _random_case(seed: int, n: int, decimals: int | None):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < rng.uniform(0.05, 0.6)).astype(np.int64)
    p = np.clip(rng.beta(2, 5, n) + 0.25 * y * rng.random(n), 0.0, 1.0)
    if decimals is not None:
        p = np.round(p, decimals)
    return y, p


def _sk_gauc(y: np.ndarray, p: np.ndarray, g: np.ndarray) -> float:
    num = den = 0.0
    for u in np.unique(g):
        m = g == u
        if len(np.unique(y[m])) < 2:
            continue
        num += m.sum() * roc_auc_score(y[m], p[m])
        den += m.sum()
    return num / den


# Strategies: small arrays, predictions drawn from a coarse grid so ties are frequent.
@st.composite
def labeled_scores(draw, min_size: int = 2, max_size: int = 40, grid: int = 6, probs: bool = True):
    n = draw(st.integers(min_size, max_size))
    y = np.array(draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)), dtype=np.int64)
    if probs:
        k = np.array(draw(st.lists(st.integers(0, grid), min_size=n, max_size=n)))
        p = k / grid
    else:
        p = np.array(
            draw(st.lists(st.integers(-grid, grid), min_size=n, max_size=n)), dtype=np.float64
        ) * 3.7
    return y, p


# ------------------------------------------------------------------------------------- AUC
@HYP
@given(labeled_scores(probs=False))
def test_auc_matches_sklearn_small_with_ties(case):
    y, p = case
    assume(0 < y.sum() < len(y))
    assert auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)


@HYP
@given(
    st.lists(
        st.tuples(st.integers(0, 1), st.floats(-1e6, 1e6, allow_nan=False, allow_subnormal=False)),
        min_size=2,
        max_size=30,
    )
)
def test_auc_matches_sklearn_arbitrary_floats(pairs):
    y = np.array([a for a, _ in pairs])
    p = np.array([b for _, b in pairs])
    assume(0 < y.sum() < len(y))
    assert auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)


@pytest.mark.parametrize("decimals", [None, 2, 1])
@pytest.mark.parametrize("seed", [0, 1])
def test_auc_matches_sklearn_large(seed, decimals):
    y, p = _random_case(seed, 200_000, decimals)
    assert auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)


def test_auc_hand_examples():
    assert auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    assert auc([0, 1], [0.5, 0.5]) == 0.5  # tie counts half
    # pairs (pos, neg): (0.5,0.1)=1 (0.5,0.5)=.5 (0.9,0.1)=1 (0.9,0.5)=1 -> 3.5/4
    assert auc([0, 1, 0, 1], [0.1, 0.5, 0.5, 0.9]) == 0.875
    assert auc([0, 1], [-0.0, 0.0]) == 0.5  # signed zeros tie


def test_auc_accepts_any_real_scores_and_is_rank_invariant():
    y, p = _random_case(3, 5_000, 2)
    logits = np.log(np.clip(p, 1e-6, 1 - 1e-6) / (1 - np.clip(p, 1e-6, 1 - 1e-6)))
    assert auc(y, 100 * logits - 7) == pytest.approx(auc(y, p), abs=1e-12)


def test_auc_input_types():
    y, p = _random_case(4, 1_000, 2)
    ref = roc_auc_score(y, p)
    assert auc(list(y), list(p)) == pytest.approx(ref, abs=1e-12)
    assert auc(torch.tensor(y), torch.tensor(p)) == pytest.approx(ref, abs=1e-12)
    assert auc(torch.tensor(y, dtype=torch.bool), torch.tensor(p, dtype=torch.float32)) == (
        pytest.approx(roc_auc_score(y, p.astype(np.float32)), abs=1e-12)
    )
    assert auc(y.astype(np.float32), p.astype(np.float16)) == pytest.approx(
        roc_auc_score(y, p.astype(np.float16)), abs=1e-12
    )
    t = torch.tensor(p, requires_grad=True)
    assert auc(torch.tensor(y, dtype=torch.float32), t) == pytest.approx(ref, abs=1e-12)
    assert isinstance(auc(y, p), float)


# ------------------------------------------------------------------------------------- LogLoss
@HYP
@given(labeled_scores(min_size=1, grid=10))
def test_logloss_matches_sklearn_small(case):
    y, k = case
    p = 0.01 + 0.98 * k  # stay away from clipping so both implementations agree exactly
    assert logloss(y, p) == pytest.approx(sk_log_loss(y, p, labels=[0, 1]), rel=1e-12)


@pytest.mark.parametrize("decimals", [None, 2])
@pytest.mark.parametrize("seed", [0, 1])
def test_logloss_matches_sklearn_large(seed, decimals):
    y, p = _random_case(seed, 200_000, decimals)
    p = np.clip(p, 1e-3, 1 - 1e-3)
    assert logloss(y, p) == pytest.approx(sk_log_loss(y, p, labels=[0, 1]), rel=1e-12)


def test_logloss_hand_and_clipping():
    assert logloss([1, 0], [0.8, 0.4]) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)
    assert LOGLOSS_EPS == 1e-7
    # Perfectly wrong / right confident predictions are clipped to [eps, 1 - eps].
    expected = -(math.log(1e-7) + math.log1p(-(1 - 1e-7)) + math.log1p(-1e-7) * 2) / 4
    assert logloss([1, 0, 1, 0], [0.0, 1.0, 1.0, 0.0]) == pytest.approx(expected, rel=1e-9)
    assert math.isfinite(logloss([1], [0.0]))
    # A single class is fine for logloss.
    assert logloss([1, 1], [0.5, 0.5]) == pytest.approx(math.log(2))


# ------------------------------------------------------------------------------------- NE
def test_ne_hand_computation():
    y = [1, 0, 0, 0]
    p = [0.6, 0.2, 0.1, 0.3]
    ll = -(math.log(0.6) + math.log(0.8) + math.log(0.9) + math.log(0.7)) / 4
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert ne(y, p) == pytest.approx(ll / h, rel=1e-12)


@HYP
@given(labeled_scores(grid=10))
def test_ne_identity(case):
    y, k = case
    assume(0 < y.sum() < len(y))
    p = 0.02 + 0.96 * k
    assert ne(y, p) == pytest.approx(logloss(y, p) / _entropy(y.mean()), rel=1e-12)
    assert ne(y, p) == pytest.approx(sk_log_loss(y, p) / _entropy(y.mean()), rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ne_base_rate_predictor_is_one(seed):
    y, _ = _random_case(seed, 50_000, None)
    assert ne(y, np.full(len(y), y.mean())) == pytest.approx(1.0, abs=1e-12)


def test_ne_better_than_base_rate_for_informative_model():
    y, p = _random_case(5, 50_000, None)
    p = np.clip(p, 0.01, 0.99)
    # Calibrate by per-bucket base rates so the model is informative and calibrated.
    b = np.digitize(p, np.linspace(0, 1, 21))
    cal = np.array([y[b == i].mean() if (b == i).any() else 0.5 for i in range(22)])[b]
    assert ne(y, np.clip(cal, 1e-3, 1 - 1e-3)) < 1.0


# ------------------------------------------------------------------------------------- gAUC
def test_gauc_matches_weighted_sklearn_loop():
    rng = np.random.default_rng(7)
    n = 20_000
    g = rng.integers(0, 400, n)
    y, p = _random_case(7, n, 2)
    # Make some users single-class so they must be skipped.
    y[np.isin(g, np.arange(0, 400, 7))] = 1
    y[np.isin(g, np.arange(3, 400, 11))] = 0
    assert gauc(y, p, g) == pytest.approx(_sk_gauc(y, p, g), abs=1e-12)


@HYP
@given(labeled_scores(max_size=50), st.data())
def test_gauc_matches_loop_small(case, data):
    y, p = case
    g = np.array(data.draw(st.lists(st.integers(0, 4), min_size=len(y), max_size=len(y))))
    has_both = [0 < y[g == u].sum() < (g == u).sum() for u in np.unique(g)]
    assume(any(has_both))
    assert gauc(y, p, g) == pytest.approx(_sk_gauc(y, p, g), abs=1e-12)


def test_gauc_weighting_and_skipping_by_hand():
    # user a: 4 impressions, AUC 1.0; user b: 2 impressions, AUC 0.0; user c: single class.
    y = [0, 0, 1, 1, 1, 0, 1, 1, 1]
    p = [0.1, 0.2, 0.3, 0.4, 0.1, 0.9, 0.5, 0.6, 0.7]
    g = ["a", "a", "a", "a", "b", "b", "c", "c", "c"]
    assert gauc(y, p, g) == pytest.approx((4 * 1.0 + 2 * 0.0) / 6)
    assert gauc(torch.tensor(y), torch.tensor(p), torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2])) == (
        pytest.approx(4 / 6)
    )


def test_gauc_single_group_equals_auc():
    y, p = _random_case(8, 5_000, 1)
    assert gauc(y, p, np.zeros(len(y), dtype=int)) == pytest.approx(auc(y, p), abs=1e-12)


def test_gauc_errors():
    with pytest.raises(ValueError, match="gAUC is undefined: none of the 2 groups"):
        gauc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4], [1, 1, 2, 2])
    with pytest.raises(ValueError, match="groups and labels have different lengths"):
        gauc([0, 1, 1], [0.1, 0.2, 0.3], [1, 1])


# ------------------------------------------------------------------------------------- TR
def test_transfer_ratio_simple():
    assert transfer_ratio(0.80, 0.79, 0.70, 0.68) == pytest.approx(0.5)
    assert transfer_ratio(1.0, 0.9, 1.0, 0.9) == pytest.approx(1.0)
    assert transfer_ratio(0.8, 0.81, 0.7, 0.68) == pytest.approx(-0.5)  # VM regressed
    assert transfer_ratio(0.8, 0.8, 0.7, 0.6) == 0.0
    assert isinstance(transfer_ratio(0.8, 0.79, 0.7, 0.68), float)


def test_transfer_ratio_zero_denominator():
    with pytest.raises(ValueError, match="dNE_FM = 0"):
        transfer_ratio(0.8, 0.79, 0.7, 0.7)
    with pytest.raises(ValueError, match="must be finite"):
        transfer_ratio(0.8, float("nan"), 0.7, 0.6)


# ------------------------------------------------------------------------------------- binary_metrics
def test_binary_metrics():
    y, p = _random_case(9, 10_000, 2)
    p = np.clip(p, 1e-3, 1 - 1e-3)
    g = np.random.default_rng(9).integers(0, 50, len(y))
    out = binary_metrics(y, p)
    assert set(out) == {"auc", "logloss", "ne"}
    assert all(type(v) is float for v in out.values())
    assert out["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert out["logloss"] == pytest.approx(sk_log_loss(y, p), rel=1e-12)
    assert out["ne"] == pytest.approx(ne(y, p), rel=1e-12)
    out_g = binary_metrics(torch.tensor(y), torch.tensor(p), groups=g)
    assert set(out_g) == {"auc", "logloss", "ne", "gauc"}
    assert type(out_g["gauc"]) is float
    assert out_g["gauc"] == pytest.approx(_sk_gauc(y, p, g), abs=1e-12)


def test_binary_metrics_requires_probabilities():
    with pytest.raises(ValueError, match=r"probability predictions in \[0, 1\]"):
        binary_metrics([0, 1], [-0.5, 2.0])


# ------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("fn", [auc, ne])
@pytest.mark.parametrize("cls", [0, 1])
def test_all_one_class(fn, cls):
    name = "AUC" if fn is auc else "NE"
    with pytest.raises(ValueError, match=f"{name} is undefined: all 500 labels are {cls}"):
        fn(np.full(500, cls), np.full(500, 0.3))


def test_all_one_class_binary_metrics():
    with pytest.raises(ValueError, match="AUC is undefined: all 10 labels are 1"):
        binary_metrics(np.ones(10), np.full(10, 0.3))


@pytest.mark.parametrize("fn", [auc, logloss, ne, binary_metrics])
def test_nan_predictions(fn):
    y = np.tile([0, 1], 50)
    p = np.full(100, 0.5)
    p[[17, 40, 99]] = np.nan
    with pytest.raises(ValueError, match=re.escape("predictions contain 3 NaN values (first at index 17)")):
        fn(y, p)


@pytest.mark.parametrize("fn", [auc, logloss, ne])
def test_inf_predictions(fn):
    p = np.array([0.1, np.inf, 0.3, -np.inf])
    with pytest.raises(ValueError, match=re.escape("predictions contain 2 infinite values (first at index 1")):
        fn([0, 1, 0, 1], p)


@pytest.mark.parametrize("fn", [auc, logloss, ne, binary_metrics])
def test_length_mismatch(fn):
    with pytest.raises(ValueError, match="different lengths: 3 labels vs 2 predictions"):
        fn([0, 1, 0], [0.1, 0.2])


@pytest.mark.parametrize("fn", [auc, logloss, ne, binary_metrics])
def test_empty(fn):
    with pytest.raises(ValueError, match="empty input"):
        fn(np.array([]), np.array([]))


@pytest.mark.parametrize("fn", [auc, logloss, ne])
@pytest.mark.parametrize(
    "bad, idx, shown", [(2, 1, "2.0"), (0.5, 1, "0.5"), (-1, 1, "-1.0"), (np.nan, 1, "nan")]
)
def test_invalid_labels(fn, bad, idx, shown):
    y = np.array([0.0, bad, 1.0, bad])
    with pytest.raises(
        ValueError,
        match=re.escape(f"labels must be 0 or 1; found 2 invalid label values (first at index {idx}: {shown})"),
    ):
        fn(y, [0.1, 0.2, 0.3, 0.4])


@pytest.mark.parametrize("fn", [logloss, ne])
def test_predictions_outside_unit_interval(fn):
    with pytest.raises(ValueError, match=r"in \[0, 1\]; found 2 values outside \(first at index 1: 1.5\)"):
        fn([0, 1, 0, 1], [0.1, 1.5, -0.2, 0.9])
    # AUC accepts arbitrary real scores.
    assert auc([0, 1, 0, 1], [0.1, 1.5, -0.2, 0.9]) == 1.0


def test_shape_and_dtype_errors():
    with pytest.raises(ValueError, match=r"labels must be 1-D; got shape \(2, 2\)"):
        auc(np.zeros((2, 2)), np.zeros(4))
    with pytest.raises(ValueError, match="predictions must be 1-D"):
        auc([0, 1], 0.5)
    with pytest.raises(ValueError, match="predictions must be numeric"):
        auc([0, 1], ["a", "b"])
    with pytest.raises(ValueError, match="must be real-valued"):
        auc([0, 1], np.array([0.1, 0.2], dtype=complex))


def test_defined_metrics_null_with_reason_instead_of_raising():
    y, p = np.zeros(62), np.linspace(0.01, 0.5, 62)
    out = M.defined_metrics(y, p, groups=np.arange(62) % 5)
    assert out["auc"] is None and out["ne"] is None and out["gauc"] is None
    assert out["logloss"] == pytest.approx(M.logloss(y, p))
    assert out["undefined"]["auc"] == "all 62 labels are 0"
    assert "none of the 5 groups" in out["undefined"]["gauc"]
    y2 = np.r_[0, 1, 0, 1.0]
    full = M.defined_metrics(y2, np.r_[0.1, 0.9, 0.2, 0.8])
    assert "undefined" not in full and full == M.binary_metrics(y2, np.r_[0.1, 0.9, 0.2, 0.8])
    with pytest.raises(ValueError, match="NaN"):  # bad input is still an error, not "undefined"
        M.defined_metrics(y2, np.r_[0.1, np.nan, 0.2, 0.8])
