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


def _rows(text: str) -> list[dict[str, str]]:
    """The markdown table's data rows, as {column name: cell}."""
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| packed MB"))
    names = [c.strip() for c in header.split("|")[1:-1]]
    return [dict(zip(names, (c.strip() for c in line.split("|")[1:-1])))
            for line in lines if re.match(r"^\| \d", line)]


def test_cpu_run_prints_reference_table(capsys):
    bench = _load_bench()
    if bench.torch.cuda.is_available():
        pytest.skip("a GPU is present: the CPU report is not what this machine prints")
    assert bench.main(["--quick", "--max-mb", "0.01"]) == 0
    text = capsys.readouterr().out
    assert "no GPU found: Triton kernel timings not taken" in text
    rows = _rows(text)
    assert len(rows) == len(bench.SEQ_LENS)
    assert all(row["eager ref ms"] != "—" and row["fwd+bwd eager ms"] != "—" for row in rows)
    assert all(row["torch path ms"] != "—" and row["fwd+bwd torch path vs eager"] != "—" for row in rows)
    assert all(row["INT4 kernel ms"] == "—" and row["INT4 vs eager"] == "—" for row in rows)  # reference only
    assert "goals: not checked" in text


def test_interpreted_kernel_columns(tk, capsys):
    if tk.device.type != "cpu":
        pytest.skip("only meaningful without a GPU")
    bench = _load_bench()
    assert bench.main(["--quick", "--max-mb", "0.005", "--interpret-kernels"]) == 0
    text = capsys.readouterr().out
    assert "kernel matches reference" in text
    rows = _rows(text)
    assert len(rows) == len(bench.SEQ_LENS)
    kernel_cols = ("INT4 kernel ms", "fp16 kernel ms", "fwd+bwd INT4 ms", "INT4 vs eager", "fwd+bwd vs eager")
    assert all(row[c] != "—" for row in rows for c in kernel_cols)  # every kernel variant ran
    assert kernels.triton_available()


def test_sweep_table(tk, monkeypatch):
    """The GPU-only --sweep, with the CPU timer standing in for do_bench (interpreter, tiny size)."""
    if tk.device.type != "cpu":
        pytest.skip("only meaningful without a GPU")
    bench = _load_bench()
    monkeypatch.setattr(bench, "_median_gpu", lambda fn, quick: bench._median_cpu(fn, 1))
    monkeypatch.setattr(bench, "SEQ_LENS", (20,))
    monkeypatch.setattr(bench, "FWD_GRID", dict(block_l=(8, 16), num_warps=(4,), num_stages=(1, 2)))
    monkeypatch.setattr(bench, "BWD_GRID", dict(block_l=(16,), num_warps=(4,), num_stages=(1,)))
    args = bench.parse_args(["--max-mb", "0.0002", "--d", "8", "--heads", "3"])
    text = bench.sweep(args, tk.device)
    rows = [line.split("|")[1:-1] for line in text.splitlines() if re.match(r"^\| (fwd|bwd) \| \d", line)]
    assert len(rows) == 4 + 1 and all(float(row[4]) > 0 for row in rows)
    assert "TUNED[('fwd', 4, 4)] = (" in text and "TUNED[('bwd', 4, 4)] = (16, 4, 1)" in text


def test_tuned_config_is_used(tk, monkeypatch):
    """A TUNED entry replaces the default launch config of its pass and shape."""
    monkeypatch.setitem(tk.mod.TUNED, ("fwd", 4, 4), (8, 2, 1))
    assert tk.mod.launch_config("fwd", 4, 4) == (8, 2, 1)
    assert tk.mod.launch_config("bwd", 4, 4)[2] is None  # untuned: Triton's default stages
