"""benchmarks/kernel_bench.py runs end to end on CPU (kernel columns through the interpreter)."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

import kernels

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "kernel_bench.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("kernel_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(text: str) -> list[list[str]]:
    """Cells of the markdown table's data rows."""
    return [line.split("|")[1:-1] for line in text.splitlines() if re.match(r"^\| \d", line)]


def test_cpu_run_prints_reference_table(capsys):
    bench = _load_bench()
    if bench.torch.cuda.is_available():
        pytest.skip("a GPU is present: the CPU report is not what this machine prints")
    assert bench.main(["--quick", "--max-mb", "0.01"]) == 0
    text = capsys.readouterr().out
    assert "no GPU found: Triton kernel timings not taken" in text
    rows = _rows(text)
    assert len(rows) == len(bench.SEQ_LENS)
    assert all(row[3].strip() != "—" and row[6].strip() == "—" for row in rows)  # reference only


def test_interpreted_kernel_columns(tk, capsys):
    if tk.device.type != "cpu":
        pytest.skip("only meaningful without a GPU")
    bench = _load_bench()
    assert bench.main(["--quick", "--max-mb", "0.005", "--interpret-kernels"]) == 0
    text = capsys.readouterr().out
    assert "kernel matches reference" in text
    rows = _rows(text)
    assert len(rows) == len(bench.SEQ_LENS)
    assert all("—" not in row[6] + row[7] + row[8] + row[9] for row in rows)  # both kernel variants ran
    assert kernels.triton_available()


def test_sweep_table(tk, monkeypatch):
    """The GPU-only --sweep, with the CPU timer standing in for do_bench (interpreter, tiny size)."""
    if tk.device.type != "cpu":
        pytest.skip("only meaningful without a GPU")
    bench = _load_bench()
    monkeypatch.setattr(bench, "_median_gpu", lambda fn, quick: bench._median_cpu(fn, 1))
    monkeypatch.setattr(bench, "SEQ_LENS", (20,))
    args = bench.parse_args(["--max-mb", "0.0002", "--d", "8", "--heads", "3"])
    text = bench.sweep(args, tk.device)
    rows = _rows(text)
    assert len(rows) == 15 and all(float(row[2]) > 0 for row in rows)
