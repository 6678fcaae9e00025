"""Steps 1 and 6 of benchmarks/gpu_check.sh: the environment report and OUT_DIR/RESULTS.md.

    python benchmarks/gpu_check.py env                    # markdown: GPU, versions, copy bandwidth
    python benchmarks/gpu_check.py results OUT_DIR        # RESULTS.md from the steps' outputs

Imports only torch (and triton when present), so it runs on a GPU machine without TorchRec.
"""
from __future__ import annotations

import argparse
import importlib.util
import platform
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

STEPS = {
    "1_env": "Environment",
    "2_kernel_tests": "Kernel tests (compiled, against the PyTorch reference)",
    "3_kernel_bench": "INT4 dequant-and-attend: bandwidth and speed-ups",
    "4_kernel_sweep": "Launch-config sweep",
    "5_vm_train": "VM training on the device",
}


def env_report() -> str:
    import torch

    rows = [("python", platform.python_version()), ("torch", torch.__version__),
            ("CUDA (torch build)", str(torch.version.cuda))]
    try:
        import triton
        rows.append(("triton", triton.__version__))
    except ImportError:
        rows.append(("triton", "not installed"))
    for name in ("torchrec", "fbgemm_gpu", "torchx"):
        rows.append((f"{name} importable", "yes" if _findable(name) else "no"))
    copy = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        rows += [("GPU", f"{props.name} ({props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}, "
                         f"{props.multi_processor_count} SMs)"), ("GPUs visible", str(torch.cuda.device_count()))]
        smi = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        rows.append(("driver", smi.splitlines()[0] if smi else "nvidia-smi not found"))
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from kernel_bench import copy_bandwidth_gbs

        copy = copy_bandwidth_gbs(torch.device("cuda"), 1 << 30, quick=False)
        rows.append(("device-to-device copy", f"{copy:.0f} GB/s (1 GiB buffer, read + write bytes)"))
    else:
        rows.append(("GPU", "none visible: CPU only"))
    return "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def _findable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _read(path: Path) -> str:
    return path.read_text(errors="replace").strip() if path.is_file() else ""


def kernel_test_summary(xml_path: Path, verbose_out: str = "") -> str:
    """Counts and failures of the kernel tests from pytest's JUnit XML, or from its verbose output
    when the step was stopped before pytest wrote the XML."""
    if not xml_path.is_file():
        results = re.findall(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED)", verbose_out, re.M)
        counts = {k: sum(1 for _, r in results if r == k) for k in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
        lines = [f"stopped before the end (no report): {counts['PASSED']} passed, {counts['FAILED']} failed, "
                 f"{counts['ERROR']} errors, {counts['SKIPPED']} skipped so far"]
        return "\n".join(lines + [f"- {r} `{name}`" for name, r in results if r in ("FAILED", "ERROR")])
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as e:
        return f"unreadable test report: {e}"
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    n, failures, errors, skipped = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    lines = [f"{n - failures - errors - skipped} passed, {failures} failed, {errors} errors, {skipped} skipped "
             f"in {float(suite.get('time', 0)):.0f} s"]
    for case in suite.iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            msg = (bad.get("message") or "").splitlines()[0][:200] if bad.get("message") else ""
            lines.append(f"- FAILED `{case.get('classname')}::{case.get('name')}`: {msg}")
    return "\n".join(lines)


def _tables(text: str) -> str:
    """The report lines of a step's stdout (tables, headings, goals, best configs), not its noise."""
    keep = [line for line in text.splitlines() if not re.match(r"^\s*(\[|WARNING|W\d{4}|I\d{4})", line)]
    return "\n".join(keep).strip()


def results(out: Path, seconds: int | None) -> str:
    steps = {}
    for line in _read(out / "steps.tsv").splitlines():
        name, rc, secs, limit = line.split("\t")
        steps[name] = (int(rc), int(secs), int(limit))
    total = f"{seconds} s" if seconds is not None else "?"
    parts = ["# GPU check results", "",
             "Written by `benchmarks/gpu_check.sh OUT_DIR` (steps and time limits in the script); "
             f"total {total}.", "",
             "| step | exit | seconds | limit |", "|---|---:|---:|---:|"]
    for name in STEPS:
        rc, secs, limit = steps.get(name, (None, None, None))
        status = "not run" if rc is None else ("timed out" if rc in (124, 137) else str(rc))
        parts.append(f"| {name} | {status} | {secs if secs is not None else '—'} | {limit or '—'} |")
    for name, title in STEPS.items():
        parts += ["", f"## {title}", ""]
        if name == "2_kernel_tests":
            parts.append(kernel_test_summary(out / "kernel_tests.xml", _read(out / f"{name}.out")))
            continue
        text = _tables(_read(out / f"{name}.out"))
        parts.append(text or "(no output)")
        rc = steps.get(name, (None,))[0]
        if rc not in (None, 0):
            err = _read(out / f"{name}.err").splitlines()[-15:]
            parts += ["", "Last lines of its stderr:", "", "```", *err, "```"]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="the environment as a markdown table")
    r = sub.add_parser("results", help="write OUT_DIR/RESULTS.md from the steps' outputs")
    r.add_argument("out_dir")
    r.add_argument("--seconds", type=int, default=None, help="total seconds so far (for the header)")
    args = p.parse_args(argv)
    if args.command == "env":
        print(env_report())
        return 0
    out = Path(args.out_dir)
    if not out.is_dir():
        print(f"gpu_check results: {out} is not a folder", file=sys.stderr)
        return 2
    text = results(out, args.seconds)
    tmp = out / ".RESULTS.md.tmp"
    tmp.write_text(text)
    tmp.replace(out / "RESULTS.md")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
