"""`loopfm sweep` on the tiny pipeline: two sequence lengths share data, FM, extract and compress
(symlinks to the first point) and rebuild only sequences and VMs; sweep.json, report.md, the
AUC-vs-L plot and TensorBoard scalars are written; bad --param values fail before anything runs."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from loopfm.artifacts import read_manifest
from loopfm.cli import main
from loopfm.config import ConfigError
from loopfm.sweep import parse_param
from tests.test_pipeline import TINY

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
# TINY pins sequences.max_len, which the sweep sets; one model, one seed, two variants keep it fast.
OVERRIDES = [o for o in TINY if not o.startswith("sequences.max_len=")] + [
    "vm.models=[deepfm]", "vm.seeds=2", "vm.variants=[baseline,loopfm]", "report.n_boot=200"]
SHARED = ("data", "fm", "extract", "compress")
OWN = ("sequences", "vm")


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sweep")
    argv = ["sweep", CONFIG, "--out", str(out), "--param", "sequences.max_len=2,10", "--quiet", *OVERRIDES]
    assert main(argv) == 0
    return out


def test_sweep_json_has_a_finite_auc_per_value(sweep_dir):
    summary = json.loads((sweep_dir / "sweep.json").read_text())
    assert summary["param"] == "sequences.max_len"
    assert summary["values"] == [2, 10]
    assert summary["runs"] == {"2": "sequences.max_len=2", "10": "sequences.max_len=10"}
    for metric in ("auc", "ne", "logloss"):
        assert set(summary[metric]) == {"deepfm"}
        assert set(summary[metric]["deepfm"]) == {"baseline", "loopfm"}
        for by_value in summary[metric]["deepfm"].values():
            assert set(by_value) == {"2", "10"}
            assert all(isinstance(x, float) and math.isfinite(x) for x in by_value.values())
    assert summary["shared"] == {"2": {}, "10": {folder: "2" for folder in SHARED}}


def test_every_point_is_compared_with_the_reference_on_per_seed_metrics(sweep_dir, capsys):
    """Statistics anyone can reproduce: per-seed metrics kept; ΔAUC = mean over seeds of the per-seed
    difference; its seed t-test and its user bootstrap recomputed here from the predictions."""
    import numpy as np
    import pyarrow.parquet as pq

    from loopfm.stats import paired_bootstrap_auc, paired_t_test

    summary = json.loads((sweep_dir / "sweep.json").read_text())
    assert summary["reference"] == "2" and set(summary["comparisons"]) == {"10"}
    assert summary["statistics"]["t_test"].startswith("seeds: initialisation on a fixed test set")
    assert summary["statistics"]["user_bootstrap"].startswith("users: resampled test users")
    tables = {v: pq.read_table(sweep_dir / f"sequences.max_len={v}" / "vm" / "predictions.parquet") for v in ("2", "10")}
    y, users = tables["2"].column("label").to_numpy(), tables["2"].column("user_id").to_numpy()
    for variant in ("baseline", "loopfm"):
        c = summary["comparisons"]["10"]["deepfm"][variant]
        auc = {v: [summary["per_seed"][v]["deepfm"][variant][str(s)]["auc"] for s in (0, 1)] for v in ("2", "10")}
        assert c["seeds"] == [0, 1]
        assert c["delta_auc"] == pytest.approx(np.mean(np.subtract(auc["10"], auc["2"])), abs=1e-12)
        assert c["t_test"]["p_value"] == pytest.approx(paired_t_test(auc["10"], auc["2"]), rel=1e-9)
        preds = {v: np.stack([tables[v].column(f"deepfm/{variant}/{s}").to_numpy() for s in (0, 1)]) for v in ("2", "10")}
        lo, hi, mean = paired_bootstrap_auc(y, preds["10"], preds["2"], users, n_boot=200)
        assert c["user_bootstrap"]["ci95"] == [lo, hi] and c["user_bootstrap"]["mean"] == mean
    assert "Against sequences.max_len=2" in (sweep_dir / "report.md").read_text()


def test_unknown_reference_exits_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", CONFIG, "--out", str(out), "--param", "sequences.max_len=2,10", "--reference", "5", *OVERRIDES]
    assert main(argv) == 2
    assert "--reference '5' is not one of the values" in capsys.readouterr().err
    assert not out.exists()


def test_later_point_links_upstream_stages_and_rebuilds_sequences(sweep_dir):
    first, second = sweep_dir / "sequences.max_len=2", sweep_dir / "sequences.max_len=10"
    for folder in SHARED:
        link = second / folder
        assert link.is_symlink(), folder
        assert os.readlink(link) == os.path.join("..", first.name, folder)
        assert link.resolve() == (first / folder).resolve()
        assert not (first / folder).is_symlink()
    for folder in OWN:
        assert (second / folder).is_dir() and not (second / folder).is_symlink(), folder
        assert (second / folder / "_SUCCESS").is_file()
    assert read_manifest(first / "sequences")["max_len"] == 2
    assert read_manifest(second / "sequences")["max_len"] == 10
    assert (second / "results.json").is_file() and (second / "report.md").is_file()


def test_plot_report_and_tensorboard(sweep_dir):
    assert (sweep_dir / "auc_vs_L.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (sweep_dir / "report.md").read_text()
    assert "auc_vs_L.png" in report and "deepfm/loopfm" in report and "sequence length L" in report
    assert list((sweep_dir / "tb" / "sweep").glob("events.out.tfevents.*"))


def test_rerun_skips_every_stage(sweep_dir, capsys):
    argv = ["sweep", CONFIG, "--out", str(sweep_dir), "--param", "sequences.max_len=2,10", "--quiet", *OVERRIDES]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for point in ("sequences.max_len=2", "sequences.max_len=10"):
        for stage in ("prepare", "train-fm", "extract", "compress", "build-sequences", "train-vm"):
            assert f"[sweep] {point} [{stage}] up to date" in out, (point, stage)
    assert (sweep_dir / "sequences.max_len=10" / "fm").is_symlink()


def test_unknown_key_exits_2_with_hint_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", CONFIG, "--out", str(out), "--param", "sequences.max_lenn=1,2", "--quiet", *OVERRIDES]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "sequences.max_lenn" in err and "did you mean 'max_len'" in err
    assert not out.exists()


@pytest.mark.parametrize("param, message", [
    ("sequences.max_len=5", "at least two"),
    ("sequences.max_len=2,2", "duplicate"),
    ("sequences.max_len=2,", "empty value"),
    ("sequences.max_len", "expected KEY=V1,V2"),
])
def test_bad_param_is_rejected(param, message, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", CONFIG, "--out", str(out), "--param", param, *OVERRIDES]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(ConfigError, match=message):
        parse_param(param)


def test_values_are_checked_against_the_config_before_running(tmp_path, capsys):
    out = tmp_path / "sweep"
    # a bad type, the same setting spelled twice, and a key also given as an override
    for argv, message in [
        (["--param", "sequences.max_len=2,ten"], "expected an integer"),
        (["--param", "sequences.max_len=2,02"], "are the same setting"),
        (["--param", "sequences.max_len=2,10", "sequences.max_len=5"], "swept by --param"),
    ]:
        assert main(["sweep", CONFIG, "--out", str(out), *argv, *OVERRIDES]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()


def test_value_put_in_front_reuses_the_finished_points(sweep_dir, capsys):
    argv = ["sweep", CONFIG, "--out", str(sweep_dir), "--param", "sequences.max_len=1,2,10", "--quiet", *OVERRIDES]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for stage in ("prepare", "train-fm", "extract", "compress"):
        assert f"[sweep] sequences.max_len=1 [{stage}] up to date" in out, stage
    assert "[sweep] sequences.max_len=1 [build-sequences] done" in out
    new, first = sweep_dir / "sequences.max_len=1", sweep_dir / "sequences.max_len=2"
    for folder in SHARED:
        assert os.readlink(new / folder) == os.path.join("..", first.name, folder)
        assert not (first / folder).is_symlink()
    assert read_manifest(new / "sequences")["max_len"] == 1
    summary = json.loads((sweep_dir / "sweep.json").read_text())
    assert summary["values"] == [1, 2, 10] and summary["shared"]["2"] == {}


def test_force_recomputes_each_distinct_stage_once(sweep_dir, capsys):
    argv = ["sweep", CONFIG, "--out", str(sweep_dir), "--param", "sequences.max_len=2,10", "--quiet", "--force",
            *OVERRIDES]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for stage in ("prepare", "train-fm", "extract", "compress", "build-sequences", "train-vm"):
        assert f"[sweep] sequences.max_len=2 [{stage}] done" in out, stage
    for stage in ("prepare", "train-fm", "extract", "compress"):
        assert f"[sweep] sequences.max_len=10 [{stage}] up to date" in out, stage
    for stage in ("build-sequences", "train-vm"):
        assert f"[sweep] sequences.max_len=10 [{stage}] done" in out, stage
    second = sweep_dir / "sequences.max_len=10"
    assert all((second / folder).is_symlink() for folder in SHARED)
    assert not any((second / folder).is_symlink() for folder in OWN)
