"""Statistics behind the reported comparisons: the paired t-test over seeds and the paired user
bootstrap of ΔAUC, plus the weighted AUC the bootstrap needs. Pure numpy (no scipy).

* :func:`paired_t_test`: two-sided paired t-test of per-seed values (runs paired by seed; the
  paper's Table 9 uses the same test, df = n - 1). It measures the spread due to the seeds
  (initialisation, batch order of the VM) on a fixed test set. The Student t distribution is
  computed through the regularized incomplete beta function (:func:`betainc`, continued fraction
  of Numerical Recipes ``betacf``).
* :func:`paired_bootstrap_auc`: 95% percentile interval of ΔAUC under a cluster bootstrap over
  test *users* (a user drawn k times contributes all of its rows k times). With predictions of
  several seeds (``[S, n]``, seeds paired by row), the resampled quantity is the mean over seeds
  of the per-seed ``AUC(a_s) - AUC(b_s)``: exactly the ΔAUC that is reported, so the interval
  and the t-test describe the same number and differ only in what they resample. A resample is
  an integer weight per row; the weighted AUC is the rank-sum formula over the rows sorted once
  by prediction, ties grouped (counted 1/2, as :func:`loopfm.metrics.auc`): O(rows) per resample.
"""
from __future__ import annotations

import math
from typing import Any, Sequence, Tuple

import numpy as np

from loopfm import metrics as M

__all__ = ["betainc", "t_two_sided_p", "paired_t_test", "weighted_auc", "paired_bootstrap_auc",
           "bootstrap_aucs", "paired_bootstrap_from_aucs",
           "SEEDS_MEASURE", "USERS_MEASURE"]

#: What each test resamples, as written into results.json and sweep.json.
SEEDS_MEASURE = "seeds: initialisation on a fixed test set (two-sided paired t-test over seeds)"
USERS_MEASURE = "users: resampled test users (95% percentile interval of a paired cluster bootstrap)"


# --------------------------------------------------------------------------------------------
# Student t distribution (no scipy)
# --------------------------------------------------------------------------------------------
def _betacf(a: float, b: float, x: float, max_iter: int = 10_000, eps: float = 1e-15) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; NR ``betacf``)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = 1.0
    d = 1.0 - qab * x / qap
    d = tiny if abs(d) < tiny else d
    d = 1.0 / d
    h = d
    for m in range(1, max_iter + 1):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = tiny if abs(d) < tiny else d
        c = 1.0 + aa / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = tiny if abs(d) < tiny else d
        c = 1.0 + aa / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            return h
    raise RuntimeError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function ``I_x(a, b)`` for ``a, b > 0``, ``0 <= x <= 1``."""
    if not (a > 0 and b > 0):
        raise ValueError(f"betainc needs a > 0 and b > 0; got a={a!r}, b={b!r}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc needs 0 <= x <= 1; got x={x!r}")
    if x == 0.0 or x == 1.0:
        return float(x)
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """Two-sided p-value ``P(|T| >= |t|)`` of Student's t with ``df`` degrees of freedom.

    ``p = I_{df/(df+t^2)}(df/2, 1/2)``; ``t = ±inf`` gives 0.0, ``t = 0`` gives 1.0.
    """
    if not df > 0:
        raise ValueError(f"degrees of freedom must be > 0; got {df!r}")
    t = float(t)
    if math.isnan(t):
        return float("nan")
    if math.isinf(t):
        return 0.0
    if t == 0.0:
        return 1.0
    return min(1.0, max(0.0, betainc(df / 2.0, 0.5, df / (df + t * t))))


def paired_t_test(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of the paired t-test of ``a`` vs ``b`` (e.g. per-seed AUCs).

    ``d = a - b``, ``t = mean(d) / (std(d, ddof=1) / sqrt(n))``, ``df = n - 1``.
    Degenerate cases: ``n < 2`` -> ``nan``; all differences exactly equal: non-zero -> ``0.0``
    (a constant shift, infinitely significant), all zero -> ``1.0``. Non-finite input -> ``nan``.
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"paired_t_test needs equal lengths; got {a.shape[0]} and {b.shape[0]}")
    n = a.shape[0]
    if n < 2:
        return float("nan")
    d = a - b
    if not np.all(np.isfinite(d)):
        return float("nan")
    if np.all(d == d[0]):
        return 1.0 if d[0] == 0.0 else 0.0
    sd = float(np.std(d, ddof=1))
    t = float(np.mean(d)) / (sd / math.sqrt(n))
    return t_two_sided_p(t, n - 1)


# --------------------------------------------------------------------------------------------
# Weighted AUC and the user-level paired bootstrap
# --------------------------------------------------------------------------------------------
def _sorted_blocks(labels: np.ndarray,
                   preds: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort rows by prediction once: (order, start index of each tie block, positive mask)."""
    order = np.argsort(preds, kind="stable")
    p = preds[order]
    starts = np.flatnonzero(np.concatenate(([True], p[1:] != p[:-1])))
    return order, starts, labels[order] > 0.5


def _weighted_auc_sorted(w: np.ndarray, starts: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Weighted AUC for each row of ``w`` ``[B, n]`` (weights of rows already in sorted order).

    Rank-sum over tie blocks: ``2U = sum_k Wp_k * (2 * Wn_below_k + Wn_k)``; integer weights
    are summed exactly in int64. ``nan`` where a resample has no positive or no negative weight.
    """
    wp = np.where(pos, w, 0)
    wn = w - wp
    bp = np.add.reduceat(wp, starts, axis=1)
    bn = np.add.reduceat(wn, starts, axis=1)
    below = np.cumsum(bn, axis=1) - bn
    twice_u = np.sum(bp * (2 * below + bn), axis=1)
    n_pos = bp.sum(axis=1)
    n_neg = bn.sum(axis=1)
    denom = 2.0 * n_pos.astype(np.float64) * n_neg.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = twice_u.astype(np.float64) / denom
    out[denom == 0] = np.nan
    return out


def weighted_auc(labels: Any, preds: Any, weights: Any) -> Any:
    """AUC where row i counts ``weights[i]`` times (ties count 1/2, as :func:`metrics.auc`).

    ``weights`` is ``[n]`` (returns a float) or ``[B, n]`` (returns ``[B]``); integer weights
    are exact. With integer weights this equals :func:`loopfm.metrics.auc` on the rows repeated
    ``weights[i]`` times. ``nan`` when the weighted data lacks a class.
    """
    M.auc(labels, preds)  # validates (lengths, 0/1 labels, finite preds, both classes)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    p = np.asarray(preds, dtype=np.float64).reshape(-1)
    w = np.asarray(weights)
    single = w.ndim == 1
    w = np.atleast_2d(w)
    if w.shape[1] != y.shape[0]:
        raise ValueError(f"weights have {w.shape[1]} columns for {y.shape[0]} rows")
    if np.any(w < 0):
        raise ValueError("weights must be >= 0")
    w = w.astype(np.int64) if w.dtype.kind in "biu" else w.astype(np.float64)
    order, starts, pos = _sorted_blocks(y, p)
    out = _weighted_auc_sorted(w[:, order], starts, pos)
    return float(out[0]) if single else out


def _user_index(groups: Any, n: int) -> Tuple[np.ndarray, int]:
    g = np.asarray(groups).reshape(-1)
    if g.shape[0] != n:
        raise ValueError(f"groups have {g.shape[0]} entries for {n} rows")
    _, gid = np.unique(g, return_inverse=True)
    gid = gid.reshape(-1).astype(np.int64)
    return gid, int(gid.max()) + 1


def _seed_rows(preds: Any, n: int, name: str) -> np.ndarray:
    p = np.asarray(preds, dtype=np.float64)
    p = p.reshape(1, -1) if p.ndim == 1 else p
    if p.ndim != 2 or p.shape[1] != n:
        raise ValueError(f"{name} must be [n] or [seeds, n] with n = {n} rows; got shape {np.shape(preds)}")
    return p


def bootstrap_aucs(labels: Any, preds: Any, groups: Any, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """``[S, n_boot]``: the AUC of each seed's predictions (``preds`` ``[n]`` or ``[S, n]``) on
    each cluster-bootstrap resample of the users (``groups``); nan where a resample lacks a class.

    The resamples depend only on the number of rows, of users, ``n_boot`` and ``seed``, so two
    calls on the same labels and users see the same resamples: the rows of two calls pair up, and
    a variant's AUCs computed once serve every comparison it is in
    (`paired_bootstrap_from_aucs`). Deterministic for a given ``seed``.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1; got {n_boot}")
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    n = y.shape[0]
    rows = _seed_rows(preds, n, "preds")
    for row in rows:
        M.auc(y, row)  # validation through loopfm.metrics (labels, finite preds, both classes)
    gid, n_users = _user_index(groups, n)
    # Per seed: the rows sorted once by prediction, tie blocks, positives, user of each row.
    sides = []
    for p in rows:
        order, starts, pos = _sorted_blocks(y, p)
        sides.append((gid[order], starts, pos))

    rng = np.random.default_rng(seed)
    chunk = int(max(1, min(n_boot, 4_000_000 // max(n, n_users))))
    out = np.empty((len(rows), n_boot), dtype=np.float64)
    done = 0
    while done < n_boot:
        bsz = min(chunk, n_boot - done)
        draws = rng.integers(0, n_users, size=(bsz, n_users))
        offsets = (np.arange(bsz, dtype=np.int64) * n_users)[:, None]
        counts = np.bincount((draws + offsets).ravel(), minlength=bsz * n_users)
        counts = counts.reshape(bsz, n_users).astype(np.int64)
        for s, (g, starts, pos) in enumerate(sides):
            out[s, done:done + bsz] = _weighted_auc_sorted(counts[:, g], starts, pos)
        done += bsz
    return out


def paired_bootstrap_from_aucs(aucs_a: np.ndarray, aucs_b: np.ndarray) -> Tuple[float, float, float]:
    """``(lo, hi, mean)`` of ΔAUC = mean over seeds of ``a_s - b_s`` from two `bootstrap_aucs`
    results on the same resamples (``[S, n_boot]`` each, seed s of a paired with seed s of b).
    Resamples without a positive or a negative are dropped (all dropped -> nans)."""
    if aucs_a.shape != aucs_b.shape:
        raise ValueError(f"the bootstrap AUCs must pair up seed by seed; got {aucs_a.shape} and {aucs_b.shape}")
    n_seeds = aucs_a.shape[0]
    diffs = sum(aucs_a[s] - aucs_b[s] for s in range(n_seeds)) / n_seeds
    diffs = diffs[np.isfinite(diffs)]
    if diffs.size == 0:
        return float("nan"), float("nan"), float("nan")
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return float(lo), float(hi), float(np.mean(diffs))


def paired_bootstrap_auc(
    labels: Any,
    preds_a: Any,
    preds_b: Any,
    groups: Any,
    n_boot: int = 1000,
    seed: int = 0,
) -> Tuple[float, float, float]:
    """95% cluster-bootstrap interval of ΔAUC = mean over seeds of ``AUC(a_s) - AUC(b_s)``,
    resampling users (``groups``).

    ``preds_a`` / ``preds_b``: ``[n]`` (one seed) or ``[S, n]`` (seed s of a is paired with seed s
    of b). Each resample draws as many users as there are, with replacement; a user drawn k times
    weighs all of its rows k. Every seed of both predictors sees the same resample (paired).
    Returns ``(lo, hi, mean)``: the 2.5% and 97.5% percentiles and the mean of the resampled ΔAUC.
    Resamples without a positive or a negative are dropped (all dropped -> nans). Deterministic
    for a given ``seed``. Identical predictors give exactly ``(0.0, 0.0, 0.0)``.
    """
    n = np.asarray(labels).reshape(-1).shape[0]
    pa, pb = _seed_rows(preds_a, n, "preds_a"), _seed_rows(preds_b, n, "preds_b")
    if pa.shape != pb.shape:
        raise ValueError(f"preds_a and preds_b must pair up seed by seed; got {pa.shape} and {pb.shape}")
    return paired_bootstrap_from_aucs(bootstrap_aucs(labels, pa, groups, n_boot, seed),
                                      bootstrap_aucs(labels, pb, groups, n_boot, seed))
