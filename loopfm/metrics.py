"""Offline binary-classification metrics for LoopFM: AUC, LogLoss, NE, gAUC and transfer ratio.

Pure numpy (no torchrec / torchmetrics). Every function accepts 1-D numpy arrays, torch tensors
(any device, any float/int/bool dtype) or plain sequences; values are converted to float64 numpy.

Conventions
-----------
* ``labels`` must be 0 or 1. ``preds`` must be finite; for AUC/gAUC they may be any real scores,
  for LogLoss/NE they are probabilities in ``[0, 1]``.
* AUC is exact: ties between a positive and a negative count 1/2 (Mann-Whitney U with average
  ranks), computed in O(n log n) by sorting.
* LogLoss clips predictions to ``[eps, 1 - eps]`` with ``eps = 1e-7`` (:data:`LOGLOSS_EPS`).
* Logarithms are natural logarithms throughout.

Invalid input raises :class:`ValueError` with a message naming what is wrong. A metric that is
undefined on valid input (AUC or NE when every label is one class, gAUC when no user has both
classes) raises :class:`UndefinedMetric`, a ``ValueError``; :func:`defined_metrics` returns such a
metric as ``None`` with its reason instead (what every stage reports per day).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Optional, Sequence, Union

import numpy as np

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

    ArrayLike = Union[np.ndarray, torch.Tensor, Sequence[float]]
else:
    ArrayLike = Any

__all__ = [
    "LOGLOSS_EPS",
    "auc",
    "logloss",
    "ne",
    "gauc",
    "transfer_ratio",
    "binary_metrics",
    "defined_metrics",
    "UndefinedMetric",
]

#: Predictions are clipped to ``[LOGLOSS_EPS, 1 - LOGLOSS_EPS]`` before taking logs.
LOGLOSS_EPS: float = 1e-7


class UndefinedMetric(ValueError):
    """The metric has no value on this (valid) input, e.g. AUC when every label is 0.

    ``reason`` is the why alone (``"all 62 labels are 0"``), for reports that already name the
    metric; ``str(err)`` is the full sentence."""

    def __init__(self, metric: str, reason: str) -> None:
        super().__init__(f"{metric} is undefined: {reason}")
        self.metric, self.reason = metric, reason


# --------------------------------------------------------------------------------------------
# Input conversion and validation
# --------------------------------------------------------------------------------------------
def _is_torch_tensor(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach") and hasattr(x, "cpu")


def _to_numpy(x: Any, name: str, *, numeric: bool = True) -> np.ndarray:
    """Convert ``x`` to a 1-D numpy array (float64 when ``numeric``)."""
    if _is_torch_tensor(x):
        import torch  # local: only needed when a tensor is actually passed

        t = x.detach().cpu()
        if numeric:
            if t.is_complex():
                raise ValueError(f"{name} must be real-valued; got a complex tensor ({t.dtype})")
            t = t.to(torch.float64)
        arr = t.numpy()
    else:
        arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D; got shape {tuple(arr.shape)}")
    if not numeric:
        return arr
    if np.iscomplexobj(arr):
        raise ValueError(f"{name} must be real-valued; got complex dtype {arr.dtype}")
    if arr.dtype.kind not in "biuf":
        try:
            arr = arr.astype(np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name} must be numeric; got dtype {arr.dtype}") from exc
    return np.asarray(arr, dtype=np.float64)


def _describe_bad(mask: np.ndarray, values: np.ndarray) -> tuple[int, int, float]:
    idx = np.flatnonzero(mask)
    return int(idx.size), int(idx[0]), float(values[idx[0]])


def _validate(
    labels: ArrayLike,
    preds: ArrayLike,
    *,
    probabilities: bool,
    metric: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Convert and validate a (labels, preds) pair; return float64 arrays."""
    y = _to_numpy(labels, "labels")
    p = _to_numpy(preds, "predictions")
    if y.shape[0] != p.shape[0]:
        raise ValueError(
            f"labels and predictions have different lengths: {y.shape[0]} labels vs "
            f"{p.shape[0]} predictions"
        )
    if y.shape[0] == 0:
        raise ValueError(f"{metric} is undefined for empty input (0 labels and predictions)")

    bad = (y != 0.0) & (y != 1.0)  # also catches NaN labels
    if bad.any():
        count, first, value = _describe_bad(bad, y)
        raise ValueError(
            f"labels must be 0 or 1; found {count} invalid label value"
            f"{'s' if count != 1 else ''} (first at index {first}: {value!r})"
        )

    nan = np.isnan(p)
    if nan.any():
        count, first, _ = _describe_bad(nan, p)
        raise ValueError(
            f"predictions contain {count} NaN value{'s' if count != 1 else ''} "
            f"(first at index {first})"
        )
    inf = np.isinf(p)
    if inf.any():
        count, first, value = _describe_bad(inf, p)
        raise ValueError(
            f"predictions contain {count} infinite value{'s' if count != 1 else ''} "
            f"(first at index {first}: {value!r})"
        )
    if probabilities:
        out = (p < 0.0) | (p > 1.0)
        if out.any():
            count, first, value = _describe_bad(out, p)
            raise ValueError(
                f"{metric} needs probability predictions in [0, 1]; found {count} value"
                f"{'s' if count != 1 else ''} outside (first at index {first}: {value!r})"
            )
    return y, p


def _require_both_classes(y: np.ndarray, metric: str, reason: str = "") -> int:
    """Return the number of positives; raise if all labels are one class."""
    n_pos = int(np.count_nonzero(y))
    if n_pos == 0 or n_pos == y.shape[0]:
        cls = 1 if n_pos else 0
        raise UndefinedMetric(metric, f"all {y.shape[0]} labels are {cls}" + (f" ({reason})" if reason else ""))
    return n_pos


# --------------------------------------------------------------------------------------------
# Core computations on validated float64 arrays
# --------------------------------------------------------------------------------------------
def _auc_core(y: np.ndarray, p: np.ndarray) -> float:
    is_pos = y > 0.5
    pos = np.sort(p[is_pos])
    neg = np.sort(p[~is_pos])
    # For each positive: #negatives strictly below (left) and #negatives <= it (right);
    # less + equal/2 == (left + right) / 2. Summed exactly in int64.
    left = np.searchsorted(neg, pos, side="left")
    right = np.searchsorted(neg, pos, side="right")
    twice_u = int(left.sum(dtype=np.int64)) + int(right.sum(dtype=np.int64))
    return twice_u / (2.0 * pos.shape[0] * neg.shape[0])


def _logloss_core(y: np.ndarray, p: np.ndarray, eps: float) -> float:
    is_pos = y > 0.5
    log_pos = np.log(np.clip(p[is_pos], eps, 1.0 - eps))
    log_neg = np.log1p(-np.clip(p[~is_pos], eps, 1.0 - eps))
    return float(-(log_pos.sum() + log_neg.sum()) / y.shape[0])


def _entropy(base_rate: float) -> float:
    q = base_rate
    return float(-(q * np.log(q) + (1.0 - q) * np.log1p(-q)))


def _ne_core(y: np.ndarray, p: np.ndarray, eps: float, ll: Optional[float] = None) -> float:
    n_pos = _require_both_classes(y, "NE", "the label entropy is 0")
    base_rate = n_pos / y.shape[0]
    if ll is None:
        ll = _logloss_core(y, p, eps)
    return ll / _entropy(base_rate)


def _gauc_core(y: np.ndarray, p: np.ndarray, groups: ArrayLike) -> float:
    g = _to_numpy(groups, "groups", numeric=False)
    if g.shape[0] != y.shape[0]:
        raise ValueError(
            f"groups and labels have different lengths: {g.shape[0]} groups vs "
            f"{y.shape[0]} labels"
        )
    try:
        _, gid = np.unique(g, return_inverse=True)
    except TypeError as exc:
        raise ValueError(f"groups must be sortable ids (ints or strings); got {exc}") from exc
    gid = gid.reshape(-1).astype(np.int64)
    n_groups = int(gid.max()) + 1

    impressions = np.bincount(gid, minlength=n_groups)
    is_pos = y > 0.5
    n_pos = np.bincount(gid[is_pos], minlength=n_groups)
    n_neg = impressions - n_pos
    valid = (n_pos > 0) & (n_neg > 0)
    if not valid.any():
        raise UndefinedMetric("gAUC", f"none of the {n_groups} groups has both positive and negative labels")

    # Composite key (group, rank of prediction): one sort + searchsorted handles all groups.
    _, rank = np.unique(p + 0.0, return_inverse=True)
    rank = rank.reshape(-1).astype(np.int64)
    n_ranks = int(rank.max()) + 1
    key = gid * n_ranks + rank
    pos_key = np.sort(key[is_pos])
    neg_key = np.sort(key[~is_pos])
    pos_gid = pos_key // n_ranks
    neg_offset = np.concatenate(([0], np.cumsum(n_neg)))[:-1]  # negatives in earlier groups
    left = np.searchsorted(neg_key, pos_key, side="left")
    right = np.searchsorted(neg_key, pos_key, side="right")
    twice_u_each = left + right - 2 * neg_offset[pos_gid]
    # Sorted by group, so a cumulative sum gives exact int64 per-group totals.
    csum = np.concatenate(([0], np.cumsum(twice_u_each, dtype=np.int64)))
    pos_bounds = np.concatenate(([0], np.cumsum(n_pos)))
    twice_u = csum[pos_bounds[1:]] - csum[pos_bounds[:-1]]

    v = valid
    group_auc = twice_u[v] / (2.0 * n_pos[v].astype(np.float64) * n_neg[v].astype(np.float64))
    weights = impressions[v].astype(np.float64)
    return float(np.sum(weights * group_auc) / np.sum(weights))


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def auc(labels: ArrayLike, preds: ArrayLike) -> float:
    """Exact ROC AUC (Mann-Whitney U with ties counted half), O(n log n).

    ``AUC = (#{(i,j): y_i=1, y_j=0, s_i > s_j} + 0.5 * #{... s_i == s_j}) / (P * N)``

    ``preds`` may be any finite real scores. Raises ``ValueError`` if all labels are one class.
    """
    y, p = _validate(labels, preds, probabilities=False, metric="AUC")
    _require_both_classes(y, "AUC")
    return _auc_core(y, p)


def logloss(labels: ArrayLike, preds: ArrayLike, eps: float = LOGLOSS_EPS) -> float:
    """Mean binary cross-entropy (natural log).

    ``LogLoss = -mean(y * log(p) + (1 - y) * log(1 - p))`` with ``p`` clipped to
    ``[eps, 1 - eps]``, ``eps = 1e-7`` by default. ``preds`` must lie in ``[0, 1]``.
    """
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"eps must be in [0, 0.5); got {eps!r}")
    y, p = _validate(labels, preds, probabilities=True, metric="LogLoss")
    return _logloss_core(y, p, eps)


def ne(labels: ArrayLike, preds: ArrayLike, eps: float = LOGLOSS_EPS) -> float:
    """Normalized entropy (He et al. 2014): LogLoss divided by the base-rate entropy.

    ``NE = LogLoss / H(q)``, ``H(q) = -(q log q + (1 - q) log(1 - q))``, ``q = mean(labels)``.
    NE == 1 for the constant base-rate predictor; lower is better. Raises ``ValueError`` if all
    labels are one class (``H(q) = 0``).
    """
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"eps must be in [0, 0.5); got {eps!r}")
    y, p = _validate(labels, preds, probabilities=True, metric="NE")
    return _ne_core(y, p, eps)


def gauc(labels: ArrayLike, preds: ArrayLike, groups: ArrayLike) -> float:
    """Group (per-user) AUC weighted by each user's number of impressions.

    ``gAUC = sum_u n_u * AUC_u / sum_u n_u`` over users ``u`` having both classes; users whose
    labels are all one class are skipped. ``groups`` holds one user id (int or str) per row.
    Raises ``ValueError`` if no user has both classes.
    """
    y, p = _validate(labels, preds, probabilities=False, metric="gAUC")
    return _gauc_core(y, p, groups)


def transfer_ratio(
    ne_vm_before: float, ne_vm_after: float, ne_fm_before: float, ne_fm_after: float
) -> float:
    """Transfer ratio of an FM improvement to a vertical model (VM).

    ``TR = dNE_VM / dNE_FM`` with ``dNE = NE_before - NE_after`` (positive = improvement).
    Raises ``ValueError`` if ``dNE_FM == 0`` or any argument is not finite.
    """
    args = {
        "ne_vm_before": ne_vm_before,
        "ne_vm_after": ne_vm_after,
        "ne_fm_before": ne_fm_before,
        "ne_fm_after": ne_fm_after,
    }
    for name, value in args.items():
        if not np.isfinite(float(value)):
            raise ValueError(f"transfer_ratio: {name} must be finite; got {value!r}")
    d_vm = float(ne_vm_before) - float(ne_vm_after)
    d_fm = float(ne_fm_before) - float(ne_fm_after)
    if d_fm == 0.0:
        raise ValueError(
            f"transfer ratio is undefined: the FM NE did not change "
            f"(ne_fm_before == ne_fm_after == {float(ne_fm_before)!r}, so dNE_FM = 0)"
        )
    return d_vm / d_fm


def binary_metrics(
    labels: ArrayLike, preds: ArrayLike, groups: Optional[ArrayLike] = None
) -> Dict[str, float]:
    """All binary metrics at once: ``{"auc", "logloss", "ne"}`` plus ``"gauc"`` if ``groups``.

    ``preds`` must be probabilities in ``[0, 1]``; inputs are validated once. Values are
    Python floats.
    """
    y, p = _validate(labels, preds, probabilities=True, metric="binary metrics")
    _require_both_classes(y, "AUC")
    ll = _logloss_core(y, p, LOGLOSS_EPS)
    out: Dict[str, float] = {
        "auc": float(_auc_core(y, p)),
        "logloss": float(ll),
        "ne": float(_ne_core(y, p, LOGLOSS_EPS, ll)),
    }
    if groups is not None:
        out["gauc"] = float(_gauc_core(y, p, groups))
    return out


def defined_metrics(
    labels: ArrayLike, preds: ArrayLike, groups: Optional[ArrayLike] = None
) -> Dict[str, Any]:
    """`binary_metrics`, but a metric undefined on these rows is ``None`` and its reason is in
    ``out["undefined"][name]`` (the key is present only when something is undefined).

    E.g. a day whose labels are all 0: ``{"auc": None, "logloss": 0.01, "ne": None,
    "undefined": {"auc": "all 62 labels are 0", "ne": "all 62 labels are 0"}}``. Invalid input
    (NaN predictions, labels other than 0/1, lengths that differ) still raises ``ValueError``.
    """
    y, p = _validate(labels, preds, probabilities=True, metric="binary metrics")
    ll = _logloss_core(y, p, LOGLOSS_EPS)
    out: Dict[str, Any] = {"auc": None, "logloss": float(ll), "ne": None}
    undefined: Dict[str, str] = {}

    def auc() -> float:
        _require_both_classes(y, "AUC")  # raises UndefinedMetric on one class
        return _auc_core(y, p)

    computations = {"auc": auc, "ne": lambda: _ne_core(y, p, LOGLOSS_EPS, ll)}
    if groups is not None:
        out["gauc"] = None
        computations["gauc"] = lambda: _gauc_core(y, p, groups)
    for name, compute in computations.items():
        try:
            out[name] = float(compute())
        except UndefinedMetric as err:
            undefined[name] = err.reason
    if undefined:
        out["undefined"] = undefined
    return out

