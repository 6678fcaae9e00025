"""Tests for loopfm.report: t-test, user bootstrap, results.json, report.md + PNGs, TensorBoard."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest

from loopfm import metrics as M
from loopfm import report as R

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------ t distribution
@pytest.mark.parametrize("t, df, p", [
    (2.0, 4, 0.1161),       # tables
    (3.0, 10, 0.01334),
    (-2.0, 4, 0.1161),      # symmetric
    (2.228, 10, 0.05),      # classic critical values
    (2.776, 4, 0.05),
    (12.706, 1, 0.05),
])
def test_t_two_sided_p_known_values(t, df, p):
    assert R.t_two_sided_p(t, df) == pytest.approx(p, rel=2e-3)


@pytest.mark.parametrize("t", [0.1, 0.5, 1.0, 2.5, 7.0, 40.0])
def test_t_two_sided_p_closed_forms(t):
    # df = 1 (Cauchy): p = 1 - 2/pi * atan|t|; df = 2: p = 1 - |t| / sqrt(2 + t^2)
    assert R.t_two_sided_p(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(t), rel=1e-10)
    assert R.t_two_sided_p(t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-9)


def test_t_two_sided_p_edges_and_betainc():
    assert R.t_two_sided_p(0.0, 5) == 1.0
    assert R.t_two_sided_p(math.inf, 5) == 0.0
    assert math.isnan(R.t_two_sided_p(math.nan, 5))
    assert 0 < R.t_two_sided_p(265.2, 4) < 1e-6  # paper Table 9: p < 0.001
    assert R.betainc(2.0, 3.0, 0.0) == 0.0 and R.betainc(2.0, 3.0, 1.0) == 1.0
    # I_x(a, 1) = x^a ; I_x(1, b) = 1 - (1 - x)^b ; I_x(a, b) = 1 - I_{1-x}(b, a)
    assert R.betainc(3.5, 1.0, 0.3) == pytest.approx(0.3 ** 3.5, rel=1e-12)
    assert R.betainc(1.0, 2.5, 0.7) == pytest.approx(1 - 0.3 ** 2.5, rel=1e-12)
    assert R.betainc(2.2, 0.5, 0.8) == pytest.approx(1 - R.betainc(0.5, 2.2, 0.2), rel=1e-12)
    with pytest.raises(ValueError):
        R.betainc(0.0, 1.0, 0.5)
    with pytest.raises(ValueError):
        R.t_two_sided_p(1.0, 0)


def test_paired_t_test_hand_computed():
    a = [0.60, 0.61, 0.62]
    b = [0.58, 0.60, 0.59]
    # d = [.02, .01, .03]: mean .02, sd .01, t = .02 / (.01 / sqrt 3) = 2 sqrt 3, df = 2
    t = 2 * math.sqrt(3)
    expected = 1 - t / math.sqrt(2 + t * t)  # = 0.07418
    assert R.paired_t_test(a, b) == pytest.approx(expected, rel=1e-8)
    assert R.paired_t_test(a, b) == pytest.approx(0.07418, abs=1e-5)
    assert R.paired_t_test(b, a) == pytest.approx(expected, rel=1e-8)
    # 5 seeds, df = 4: t computed by hand with numpy and checked against the t table value
    x = np.array([0.6340, 0.6342, 0.6343, 0.6341, 0.6344])
    y = np.array([0.5880, 0.5884, 0.5890, 0.5885, 0.5881])
    d = x - y
    t5 = d.mean() / (d.std(ddof=1) / math.sqrt(5))
    assert R.paired_t_test(x, y) == pytest.approx(R.t_two_sided_p(t5, 4), rel=1e-12)
    assert R.paired_t_test(x, y) < 1e-3


def test_paired_t_test_degenerate():
    assert math.isnan(R.paired_t_test([0.6], [0.5]))
    assert math.isnan(R.paired_t_test([], []))
    assert R.paired_t_test([0.6, 0.7, 0.8], [0.5, 0.6, 0.7]) < 1e-6  # diffs equal up to rounding
    assert R.paired_t_test([1.0, 2.0, 3.0], [0.5, 1.5, 2.5]) == 0.0  # exactly equal, non-zero
    assert R.paired_t_test([0.6, 0.7], [0.6, 0.7]) == 1.0  # all zero
    with pytest.raises(ValueError):
        R.paired_t_test([1, 2], [1, 2, 3])


# ------------------------------------------------------------------------------ weighted AUC
def _data(n=3000, users=400, seed=0, ties=False):
    rng = np.random.default_rng(seed)
    u = rng.integers(0, users, n)
    y = (rng.random(n) < 0.2).astype(np.int64)
    y[:2] = [0, 1]
    p = 1 / (1 + np.exp(-(0.8 * y + rng.standard_normal(n) - 1.5)))
    if ties:
        p = np.round(p, 2)
    return y, p, u


@pytest.mark.parametrize("ties", [False, True])
def test_weighted_auc_matches_metrics_auc(ties):
    y, p, u = _data(ties=ties)
    assert R.weighted_auc(y, p, np.ones_like(y)) == pytest.approx(M.auc(y, p), abs=1e-15)
    # an explicit user resample, materialised row by row
    rng = np.random.default_rng(5)
    uniq, gid = np.unique(u, return_inverse=True)
    drawn = rng.integers(0, uniq.size, uniq.size)
    counts = np.bincount(drawn, minlength=uniq.size)
    w = counts[gid]
    rows = np.concatenate([np.flatnonzero(gid == g) for g in drawn])
    assert R.weighted_auc(y, p, w) == pytest.approx(M.auc(y[rows], p[rows]), abs=1e-15)
    # batched weights give the same per row
    batch = R.weighted_auc(y, p, np.stack([np.ones_like(y), w]))
    assert batch == pytest.approx([M.auc(y, p), M.auc(y[rows], p[rows])], abs=1e-15)


def test_weighted_auc_all_ties_and_missing_class():
    y = np.array([0, 1, 0, 1])
    assert R.weighted_auc(y, np.full(4, 0.3), np.array([1, 2, 3, 1])) == 0.5
    assert math.isnan(R.weighted_auc(y, np.array([0.1, 0.2, 0.3, 0.4]), np.array([1, 0, 1, 0])))


# ------------------------------------------------------------------------------ bootstrap
def test_bootstrap_clearly_better_contains_true_difference():
    rng = np.random.default_rng(1)
    n = 12_500
    u = rng.integers(0, 2500, n)
    y = (rng.random(n) < 0.15).astype(int)
    good = 1 / (1 + np.exp(-(1.5 * y + rng.standard_normal(n) - 2)))
    weak = 1 / (1 + np.exp(-(0.3 * y + rng.standard_normal(n) - 2)))
    start = time.perf_counter()
    lo, hi, mean = R.paired_bootstrap_auc(y, good, weak, u, n_boot=1000, seed=0)
    elapsed = time.perf_counter() - start
    true = M.auc(y, good) - M.auc(y, weak)
    assert 0 < lo < true < hi
    assert lo < mean < hi
    assert elapsed < 10, f"1000 resamples of 12.5k rows took {elapsed:.1f}s"
    assert R.paired_bootstrap_auc(y, good, weak, u, n_boot=50, seed=3) == \
        R.paired_bootstrap_auc(y, good, weak, u, n_boot=50, seed=3)


def test_bootstrap_identical_and_independent_noise():
    y, p, u = _data(n=4000)
    assert R.paired_bootstrap_auc(y, p, p.copy(), u, n_boot=200) == (0.0, 0.0, 0.0)
    rng = np.random.default_rng(7)
    lo, hi, _ = R.paired_bootstrap_auc(y, rng.random(y.size), rng.random(y.size), u, n_boot=500)
    assert lo < 0 < hi


def test_bootstrap_string_users_and_validation():
    y, p, u = _data(n=1000)
    users = np.array([f"user{i}" for i in u])
    assert R.paired_bootstrap_auc(y, p, p ** 2, users, n_boot=100) == \
        R.paired_bootstrap_auc(y, p, p ** 2, u, n_boot=100)
    with pytest.raises(ValueError):
        R.paired_bootstrap_auc(y, p, p[:-1], u, n_boot=10)
    with pytest.raises(ValueError):
        R.paired_bootstrap_auc(y, p, p, u[:-1], n_boot=10)


# ------------------------------------------------------------------------------ results.json
VARIANTS = ("baseline", "kd", "loopfm", "kd+loopfm")
STRENGTH = {"baseline": 0.3, "kd": 0.5, "loopfm": 0.9, "kd+loopfm": 1.1, "loopfm[L=10]": 0.7}


def _runs(y, models=("DeepFM", "DIN"), seeds=(0, 1, 2), variants=VARIANTS, with_metrics=False):
    runs = []
    for mi, model in enumerate(models):
        for v in variants:
            for s in seeds:
                rng = np.random.default_rng(1000 * mi + 10 * s + len(v))
                p = 1 / (1 + np.exp(-(STRENGTH[v] * y + rng.standard_normal(y.size) - 2)))
                metrics = M.binary_metrics(y, p) if with_metrics else None
                runs.append(R.Run(model, v, s, p, metrics))
    return runs


def _walk_floats(obj, path="$"):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk_floats(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _walk_floats(v, f"{path}[{i}]")
    elif isinstance(obj, float):
        yield path, obj


@pytest.fixture(scope="module")
def built():
    y, _, u = _data(n=2500, users=300, seed=11)
    runs = _runs(y, with_metrics=True)
    runs += _runs(y, models=("Tiny",), seeds=(0,), variants=("baseline", "loopfm", "loopfm[L=10]"))
    fm = {"auc": 0.7, "logloss": 0.4, "ne": 0.8}
    res = R.build_results("synthetic", fm, runs, y, u, {"prepare": 1.5, "train-fm": 10.0},
                          n_boot=200)
    return y, u, runs, res


def test_results_shape(built, tmp_path):
    y, u, runs, res = built
    assert {"dataset", "fm", "vm", "p_values", "bootstrap_ci95", "transfer_ratio",
            "timings_s"} <= set(res)
    assert res["dataset"] == "synthetic"
    assert set(res["fm"]) == {"auc", "logloss", "ne"}
    assert set(res["vm"]) == {"DeepFM", "DIN", "Tiny"}
    for model in ("DeepFM", "DIN"):
        assert list(res["vm"][model]) == list(VARIANTS)
        for entry in res["vm"][model].values():
            assert set(entry) == {"auc", "logloss", "ne", "gauc", "auc_std", "n_seeds"}
            assert entry["n_seeds"] == 3
        assert set(res["p_values"][model]) == {"kd+loopfm_vs_kd", "kd+loopfm_vs_baseline",
                                               "loopfm_vs_baseline", "kd_vs_baseline"}
        assert set(res["bootstrap_ci95"][model]) >= {"kd+loopfm_vs_kd", "kd+loopfm_vs_baseline",
                                                     "loopfm_vs_baseline"}
        for lo, hi in res["bootstrap_ci95"][model].values():
            assert lo <= hi
    # only comparisons whose variants exist; ablation variants compared with the baseline
    assert set(res["p_values"]["Tiny"]) == {"loopfm_vs_baseline", "loopfm[L=10]_vs_baseline"}
    assert res["p_values"]["Tiny"]["loopfm_vs_baseline"] is None  # one seed
    assert res["vm"]["Tiny"]["baseline"]["auc_std"] == 0.0
    assert res["timings_s"] == {"prepare": 1.5, "train-fm": 10.0}
    for path, v in _walk_floats(res):
        assert math.isfinite(v), path
    out = R.write_results(tmp_path / "run" / "results.json", res)
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == json.loads(json.dumps(res))
    assert R.read_results(out) == json.loads(text)
    assert [p.name for p in out.parent.iterdir()] == ["results.json"]  # no temp file left


def test_results_values(built):
    y, u, runs, res = built
    sel = [r for r in runs if r.model == "DeepFM" and r.variant == "kd+loopfm"]
    aucs = [M.auc(y, r.preds) for r in sorted(sel, key=lambda r: r.seed)]
    e = res["vm"]["DeepFM"]["kd+loopfm"]
    assert e["auc"] == pytest.approx(np.mean(aucs), abs=1e-12)
    assert e["auc_std"] == pytest.approx(np.std(aucs, ddof=1), abs=1e-12)
    assert e["gauc"] == pytest.approx(np.mean([M.gauc(y, r.preds, u) for r in sel]), abs=1e-12)
    base = sorted((r for r in runs if r.model == "DeepFM" and r.variant == "baseline"),
                  key=lambda r: r.seed)
    p = R.paired_t_test(aucs, [M.auc(y, r.preds) for r in base])
    assert res["p_values"]["DeepFM"]["kd+loopfm_vs_baseline"] == pytest.approx(p, rel=1e-12)
    # the reported ΔAUC is the mean of the per-seed differences; the user bootstrap resamples
    # that same quantity (every seed of both variants on one resample), not seed-averaged preds
    delta = np.mean(np.subtract(aucs, [M.auc(y, r.preds) for r in base]))
    assert res["delta_auc"]["DeepFM"]["kd+loopfm_vs_baseline"] == pytest.approx(delta, abs=1e-12)
    lo, hi, _ = R.paired_bootstrap_auc(y, np.stack([r.preds for r in sel]), np.stack([r.preds for r in base]),
                                       u, n_boot=200)
    assert res["bootstrap_ci95"]["DeepFM"]["kd+loopfm_vs_baseline"] == [lo, hi]
    assert 0 < lo < delta < hi  # much stronger signal
    comp = res["comparisons"]["DeepFM"]["kd+loopfm_vs_baseline"]
    assert comp["t_test"]["measures"].startswith("seeds: initialisation on a fixed test set")
    assert comp["user_bootstrap"]["measures"].startswith("users: resampled test users")
    assert comp["seeds"] == [0, 1, 2] and comp["t_test"]["n"] == 3
    # default transfer ratio: fraction of the FM's NE gap over the baseline that is captured
    tr = res["transfer_ratio"]["by_model"]["DeepFM"]["kd"]
    ne_b = res["vm"]["DeepFM"]["baseline"]["ne"]
    assert tr == pytest.approx(M.transfer_ratio(ne_b, res["vm"]["DeepFM"]["kd"]["ne"], ne_b, 0.8))


def test_results_transfer_ratio_forms_and_errors():
    y, _, u = _data(n=800, users=100, seed=2)
    runs = _runs(y, models=("M",), seeds=(0, 1), variants=("baseline", "kd"))
    upd = {"ne_fm_before": 0.9, "ne_fm_after": 0.8, "ne_vm_before": {"M": {"kd": 1.0}}}
    res = R.build_results("d", None, runs, y, u, None, upd, n_boot=20)
    ne_kd = res["vm"]["M"]["kd"]["ne"]
    assert res["transfer_ratio"]["by_model"]["M"]["kd"] == pytest.approx((1.0 - ne_kd) / 0.1)
    assert res["fm"] == {"auc": None, "logloss": None, "ne": None}
    given = R.build_results("d", None, runs, y, u, None, {"M": {"kd": float("nan")}}, n_boot=20)
    assert given["transfer_ratio"]["by_model"] == {"M": {"kd": None}}
    assert R.build_results("d", None, runs, y, u, n_boot=20)["transfer_ratio"] == {}
    # |dNE_FM| below the floor (default 0.01): null with the reason, not a ratio of noise
    tiny = {"ne_fm_before": 0.802, "ne_fm_after": 0.8, "ne_vm_before": {"M": {"kd": 1.0}}}
    tr = R.build_results("d", None, runs, y, u, None, tiny, n_boot=20)["transfer_ratio"]
    assert tr["by_model"]["M"]["kd"] is None and tr["min_dne_fm"] == 0.01
    assert "below the floor 0.01" in tr["undefined"]["M"]["kd"]
    low = R.build_results("d", None, runs, y, u, None, tiny, n_boot=20, min_dne_fm=0.001)["transfer_ratio"]
    assert low["by_model"]["M"]["kd"] == pytest.approx((1.0 - ne_kd) / 0.002) and "undefined" not in low
    with pytest.raises(ValueError, match="duplicate"):
        R.build_results("d", None, runs + runs[:1], y, u, n_boot=20)
    with pytest.raises(ValueError, match="predictions"):
        R.build_results("d", None, [R.Run("M", "kd", 0, np.zeros(3))], y, u, n_boot=20)


# ------------------------------------------------------------------------------ report + TB
def test_write_report_and_plots(built, tmp_path):
    *_, res = built
    sweeps = {"L": {10: 0.61, 25: 0.62, 50: 0.625, 100: 0.63}}
    path = R.write_report(tmp_path, res, sweeps=sweeps)
    assert path == tmp_path / "report.md"
    text = path.read_text()
    for s in ("w/o distill", "KD", "LoopFM-only", "KD + LoopFM", "DeepFM AUC", "DeepFM LogLoss",
              "gAUC", "NE", "± ", "p (seeds: paired t", "95% CI (users: bootstrap", "FM (teacher)", "Transfer ratio",
              "Stage timings", "auc_by_variant.png", "auc_vs_L.png", "loopfm[L=10]"):
        assert s in text, s
    assert R.results_table(res) in text
    for name in ("auc_by_variant.png", "auc_vs_L.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000
    # the table: one row per method, 2 columns per model
    table = R.results_table(res).splitlines()
    rows = [line for line in table if line.startswith("| ") and "Method" not in line]
    assert [r.split("|")[1].strip() for r in rows][:4] == ["w/o distill", "KD", "LoopFM-only",
                                                          "KD + LoopFM"]
    assert all(r.count("|") == 2 + 2 * 3 for r in rows)
    # per-line sweeps and no sweep
    other = tmp_path / "other"
    R.write_report(other, res, sweeps={"L": {"DeepFM": {10: 0.6, 50: 0.62}, "DIN": {10: 0.59}}})
    assert (other / "auc_vs_L.png").read_bytes()[:8] == PNG_MAGIC
    bare = tmp_path / "bare"
    R.write_report(bare, res)
    assert not (bare / "auc_vs_L.png").exists()


def test_log_tensorboard(built, tmp_path):
    *_, res = built
    tb = tmp_path / "tb"
    folder = R.log_tensorboard(tb, res, curves={"train/DeepFM/kd/loss": [0.7, 0.6, 0.5]},
                               sweeps={"L": {10: 0.6, 50: 0.62}})
    events = list(tb.rglob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    assert folder.parent == tb
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:  # pragma: no cover - tensorboard ships with the env
        return
    acc = EventAccumulator(str(folder))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"test/DeepFM/kd+loopfm/auc", "test/DIN/baseline/gauc", "test/fm/auc",
            "transfer_ratio/DeepFM/kd", "train/DeepFM/kd/loss", "sweep/L/auc"} <= tags
    assert acc.Scalars("test/DeepFM/kd/auc")[0].value == pytest.approx(
        res["vm"]["DeepFM"]["kd"]["auc"], rel=1e-6)


def test_make_report(tmp_path):
    y, _, u = _data(n=600, users=80, seed=4)
    runs = _runs(y, models=("M",), seeds=(0, 1))
    res = R.make_report(tmp_path / "out", "d", {"auc": 0.7, "logloss": 0.5, "ne": 0.9}, runs, y,
                        u, {"report": 0.1}, tb_dir=tmp_path / "out" / "tb", n_boot=20)
    assert (tmp_path / "out" / "results.json").is_file()
    assert (tmp_path / "out" / "report.md").is_file()
    assert list((tmp_path / "out" / "tb").rglob("events.out.tfevents.*"))
    assert R.read_results(tmp_path / "out" / "results.json") == res


def test_tensorboard_rerun_replaces_tags_and_equals_results(built, tmp_path):
    """A rerun never stacks values; a value that is now null is gone, not left at its old value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    *_, res = built
    tb = tmp_path / "tb"
    R.log_tensorboard(tb, res)
    now = json.loads(json.dumps(res))
    now["transfer_ratio"]["by_model"]["DeepFM"]["kd"] = None  # e.g. |dNE_FM| fell below the floor
    now["vm"]["DeepFM"]["kd"]["auc"] += 0.01
    folder = R.log_tensorboard(tb, now)
    assert [p.name for p in tb.iterdir()] == ["report"]  # no temp or old folder left
    acc = EventAccumulator(str(folder))
    acc.Reload()
    logged = {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    assert all(len(values) == 1 for values in logged.values())
    expected = R.results_scalars(now)
    assert set(logged) == set(expected) and "transfer_ratio/DeepFM/kd" not in logged
    for tag, value in expected.items():
        assert logged[tag][0] == pytest.approx(value, rel=1e-6), tag
