"""scripts/compare_runs.py: equal runs pass, a moved number or a changed table is named and fails."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_runs.py"


def _run(root: Path, auc: float, preds: list[float], seconds: float) -> Path:
    (root / "vm").mkdir(parents=True)
    pq.write_table(pa.table({"example_id": [0, 1], "p": preds}), root / "vm" / "predictions.parquet")
    results = {"fm": {"auc": 0.7}, "vm": {"deepfm": {"kd": {"auc": auc, "auc_std": None}}},
               "timings_s": {"train-vm": seconds}}
    (root / "results.json").write_text(json.dumps(results))
    return root


def _compare(a: Path, b: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(a), str(b)], capture_output=True, text=True)


def test_equal_runs_pass_whatever_their_timings(tmp_path):
    out = _compare(_run(tmp_path / "a", 0.65, [0.1, 0.2], 3.0), _run(tmp_path / "b", 0.65, [0.1, 0.2], 9.0))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "vm         equal (1 tables)" in out.stdout
    assert "2 shared numbers, 2 identical" in out.stdout


def test_a_moved_number_and_a_changed_table_are_named(tmp_path):
    out = _compare(_run(tmp_path / "a", 0.65, [0.1, 0.2], 3.0), _run(tmp_path / "b", 0.66, [0.1, 0.3], 3.0))
    assert out.returncode == 1
    assert "1 of 1 tables differ (first: predictions.parquet)" in out.stdout
    assert "vm.deepfm.kd.auc: 0.65 vs 0.66" in out.stdout


def test_a_folder_without_results_is_one_line(tmp_path):
    (tmp_path / "a").mkdir()
    out = _compare(tmp_path / "a", _run(tmp_path / "b", 0.65, [0.1, 0.2], 1.0))
    assert out.returncode != 0 and "results.json not found" in out.stderr
