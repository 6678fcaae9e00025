"""benchmarks/gpu_check.sh in its dry-run mode (CPU, Triton interpreter, tiny sizes), with torchrec,
fbgemm_gpu and torchx made unimportable as on the GPU machine: every step runs and RESULTS.md holds
each step's table, so the script cannot rot between GPU sessions (about a minute)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_import_layers import _BLOCKER

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    # sitecustomize runs at every interpreter start: each step's python sees the block
    (site / "sitecustomize.py").write_text(_BLOCKER.format(blocked={"torchrec", "fbgemm_gpu", "torchx"}))
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(site)}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(out), "--dry-run"],
                          cwd=tmp_path_factory.getbasetemp(), env=env, capture_output=True, text=True, timeout=400)
    return proc, out


def test_every_step_runs_without_torchrec(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()]
    assert [s[0] for s in steps] == ["1_env", "2_kernel_tests", "3_kernel_bench", "4_kernel_sweep", "5_vm_train",
                                     "6_results"]
    failed = {s[0]: (out / f"{s[0]}.err").read_text()[-2000:] for s in steps if s[1] != "0"}
    assert not failed, failed


def test_results_hold_every_table(dry_run):
    _, out = dry_run
    text = (out / "RESULTS.md").read_text()
    assert "| torchrec importable | no |" in text and "| torchx importable | no |" in text  # blocked
    assert "8 passed, 0 failed, 0 errors" in text  # the training-size kernel cases, interpreted
    assert "| packed MB | B | L | eager ref ms" in text and "kernel matches reference" in text
    assert "--sweep skipped: no GPU found" in text
    for model in ("deepfm", "dmin"):
        for backend in ("triton", "reference"):
            assert f"| {model} | 8 | {backend} |" in text


def test_bad_usage_is_refused(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(tmp_path), "--fast"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_kernel_test_summary_of_a_stopped_step(tmp_path):
    """When the time limit stops pytest before it writes its XML, the verbose output still counts."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    out = ("tests/kernels/a.py::test_x[1] PASSED  [ 10%]\ntests/kernels/a.py::test_x[2] FAILED  [ 20%]\n"
           "tests/kernels/b.py::test_y SKIPPED (no GPU)  [ 30%]\n")
    text = gpu_check.kernel_test_summary(tmp_path / "missing.xml", out)
    assert text.startswith("stopped before the end (no report): 1 passed, 1 failed, 0 errors, 1 skipped")
    assert "- FAILED `tests/kernels/a.py::test_x[2]`" in text
