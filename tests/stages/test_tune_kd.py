"""`loopfm tune-kd` on a tiny synthetic run: a 2×1×1 grid ranked on the validation day, the test
day's event rows and soft labels never read, reruns bit-identical, bad days refused (exit 2)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from loopfm.cli import main
from loopfm.config import load_config
from loopfm.experiment import LoopFMConfig
from loopfm.stages.tune_kd import KDSearchConfig, summarize
from tests.tiny import TINY_MODELS

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "quickstart.yaml")
TINY = ["data.synthetic.rows=6000", *TINY_MODELS, "vm.models=[deepfm]"]  # tests/test_pipeline.py's, one VM
GRID = ["tune_kd.alpha=[1,5]", "tune_kd.gamma=[1]", "tune_kd.beta=[1]"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """RUN/data, fm, extract, compress, sequences of the tiny config (no VM stage)."""
    out = tmp_path_factory.mktemp("tune_kd")
    assert main(["prepare", CONFIG, "--out", str(out / "data"), "--quiet", *TINY]) == 0
    for stage in ("train-fm", "extract", "compress", "build-sequences"):
        assert main([stage, CONFIG, "--out", str(out), "--quiet", *TINY]) == 0, stage
    return out


def tune(run_dir: Path, *extra: str) -> int:
    return main(["tune-kd", CONFIG, "--out", str(run_dir), "--quiet", *TINY, *GRID, *extra])


@pytest.fixture
def day_reads(monkeypatch):
    """Every event-log day and extract day any reader opens a file of, during the test."""
    from loopfm.data.eventlog import EventLog
    from loopfm.codes import format as codes_format  # where read_codes looks stage_files up

    seen = {"events": set(), "extract": set()}
    files, stage_files = EventLog.files, codes_format.stage_files

    def log_files(self, days=None):
        seen["events"].update(days or self.days)
        return files(self, days)

    def extract_files(root, day, manifest=None):
        seen["extract"].add(day)
        return stage_files(root, day, manifest)

    monkeypatch.setattr(EventLog, "files", log_files)
    monkeypatch.setattr(codes_format, "stage_files", extract_files)
    return seen


def test_grid_is_ranked_on_the_validation_day(run_dir, day_reads, capsys):
    assert tune(run_dir, "--force") == 0
    out = capsys.readouterr().out
    results = json.loads((run_dir / "tune_kd" / "results.json").read_text())
    assert (run_dir / "tune_kd" / "_SUCCESS").is_file()
    assert results["valid_day"] == 7 and results["train_days"] == [5, 6] and results["models"] == ["deepfm"]
    assert results["reference"]["variant"] == "baseline"
    assert len(results["points"]) == 2
    assert {(p["alpha"], p["gamma"], p["beta"]) for p in results["points"]} == {(1.0, 1.0, 1.0), (5.0, 1.0, 1.0)}
    for entry in [results["reference"], *results["points"]]:
        for k in ("auc", "logloss", "ne"):
            assert math.isfinite(entry["mean"][k]), (entry, k)
            assert len(entry["by_model"]["deepfm"]["seeds"]) == 1
    best = max(results["points"], key=lambda p: p["mean"]["auc"])
    assert (results["best"]["alpha"], results["best"]["score"]) == (best["alpha"], best["mean"]["auc"])
    assert results["points"][0]["score"] >= results["points"][1]["score"]
    assert best["delta"] == pytest.approx(best["mean"]["auc"] - results["reference"]["mean"]["auc"])
    assert "| alpha | gamma | beta | valid AUC | LogLoss | NE |" in out
    assert f"best on day 7: vm.kd.alpha={best['alpha']}" in out and "the test day 8 was not used" in out
    # the test day: no event row and no soft label of day 8 was read; no soft label of day 7 either
    assert day_reads["events"] == {5, 6, 7}
    assert day_reads["extract"] == {5, 6}


def test_kd_loopfm_reads_no_test_day_rows(run_dir, day_reads):
    assert tune(run_dir, "--force", "tune_kd.variant=kd+loopfm", "tune_kd.alpha=[1]") == 0
    results = json.loads((run_dir / "tune_kd" / "results.json").read_text())
    assert results["reference"]["variant"] == "loopfm" and len(results["points"]) == 1
    assert math.isfinite(results["points"][0]["mean"]["auc"])
    assert day_reads["events"] == {5, 6, 7} and day_reads["extract"] == {5, 6}


def test_same_seed_same_numbers_and_rerun_is_skipped(run_dir, capsys):
    assert tune(run_dir, "--force") == 0
    first = (run_dir / "tune_kd" / "results.json").read_text()
    assert tune(run_dir, "--force") == 0
    assert (run_dir / "tune_kd" / "results.json").read_text() == first
    capsys.readouterr()
    assert tune(run_dir) == 0
    assert "[tune-kd] up to date" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["tune_kd.valid_day=6"], "also a training day"),
    (["tune_kd.valid_day=8"], "must not use the test day"),
    (["tune_kd.train_days=[5,8]", "tune_kd.valid_day=9"], "must not use the test day"),
    (["tune_kd.alpha=[]"], "at least one value"),
    (["tune_kd.gamma=[-1]"], ">= 0"),
    (["tune_kd.train_days=[3,4]", "tune_kd.valid_day=5"], "after the FM training days"),
    (["vm.kd.mode=soft_label"], "aux_head"),
    (["tune_kd.models=[nope]"], "tune_kd.models"),
])
def test_bad_config_is_refused(run_dir, capsys, extra, message):
    assert tune(run_dir, *extra) == 2
    assert message in capsys.readouterr().err


def test_section_does_not_change_stage_hashes():
    from loopfm.pipeline import stage_hashes

    a = load_config(LoopFMConfig, CONFIG)
    b = load_config(LoopFMConfig, CONFIG, ["tune_kd.alpha=[0.1]", "tune_kd.metric=ne", "tune_kd.seeds=3"])
    assert stage_hashes(a) == stage_hashes(b)


def test_ne_ranks_lower_first_and_undefined_last():
    search = KDSearchConfig(alpha=[1, 2, 3], gamma=[1], beta=[1], metric="ne")

    def run(point, ne):
        return {"point": point, "model": "m", "seed": 0,
                "metrics": {"auc": 0.6, "logloss": 0.3, "ne": ne, "gauc": 0.5}}

    runs = [run(None, 0.95), run((1.0, 1.0, 1.0), 0.97), run((2.0, 1.0, 1.0), math.nan), run((3.0, 1.0, 1.0), 0.9)]
    results = summarize(search, runs, ["m"], test_day=8)
    assert [p["alpha"] for p in results["points"]] == [3.0, 1.0, 2.0]
    assert results["best"]["overrides"] == "vm.kd.alpha=3.0 vm.kd.gamma=1.0 vm.kd.beta=1.0"
    assert results["best"]["delta"] == pytest.approx(-0.05)
