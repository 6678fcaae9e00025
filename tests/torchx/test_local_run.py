"""Real runs through TorchX's local_cwd scheduler on a tiny synthetic dataset (60-90 s on a
2-core machine): `torchx run ... train_fm` with 2 processes, then `loopfm launch` of every stage the CLI has
on the same run folder (prepare and train-fm are then up to date), and a launch that fails."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loopfm import launch
from loopfm.cli import main as loopfm_main
from tests.conftest import REPO

VENV_BIN = Path(sys.executable).parent
DATA = ["data.synthetic.rows=3000", "data.synthetic.history_len=10", "data.synthetic.cross_domain_len=5"]
TINY = [*DATA, "fm.model.embedding_dim=8", "fm.model.dnn=[16,8,4]", "fm.model.head_dim=4",
        "fm.model.attention_mlp=[8]", "fm.model.position_dim=4", "fm.autoencoder.dim=8",
        "fm.autoencoder.prefixes=[4,8]", "fm.autoencoder.hidden=[16]",
        "fm.parallel.sharding_types=[table_wise]", "fm.parallel.cpu_threads=1",
        "fm.train.batch_size=64", "fm.train.eval_batch_size=512",
        "compress.dim=8", "sequences.max_len=10", "vm.models=[deepfm]", "vm.seeds=1",
        "vm.model.embedding_dim=8", "vm.model.dnn=[16]", "vm.model.attention_mlp=[8]"]
CONFIG = "configs/quickstart.yaml"


def _env() -> dict[str, str]:
    # dist.ddp runs `torchrun` from PATH: the venv's bin/ must come first
    return {**os.environ, "PATH": os.pathsep.join([str(VENV_BIN), os.environ.get("PATH", "")])}


@pytest.fixture(scope="module")
def fm_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """RUN/data prepared in-process, then RUN/fm trained by `torchx run -s local_cwd ...:train_fm`."""
    tmp = tmp_path_factory.mktemp("torchx")
    run = tmp / "run"
    assert loopfm_main(["prepare", CONFIG, *DATA, "--out", str(run / "data"), "--quiet"]) == 0
    torchx = shutil.which("torchx", path=str(VENV_BIN)) or "torchx"
    proc = subprocess.run(
        [torchx, "run", "-s", "local_cwd", "-cfg", f"log_dir={tmp / 'logs'}",
         "torchx_components/loopfm.py:train_fm", "--config", CONFIG, "--out", str(run), "-j", "1x2",
         "--", *TINY],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=180)
    return run, proc


def test_torchx_run_train_fm_local_cwd_two_processes(fm_run) -> None:
    run, proc = fm_run
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "Job finished: SUCCEEDED" in output, output[-3000:]
    assert "train-fm: 2 process(es)" in output  # really ran under torchrun with 2 ranks
    fm = run / "fm"
    assert (fm / "_SUCCESS").is_file() and (fm / "model.pt").is_file()
    assert any((fm / "checkpoints").iterdir()), "no checkpoint left in RUN/fm/checkpoints"
    assert set(json.loads((fm / "eval.json").read_text())) == {"5", "6", "7", "8"}


def _launch(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="loopfm")
    launch.add_launch_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["launch", *argv])
    return args.func(args)


def test_launch_local_cwd_runs_every_stage(fm_run, monkeypatch, capsys) -> None:
    run, proc = fm_run
    assert proc.returncode == 0, "train_fm failed: see the test above"
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("PATH", os.environ.get("PATH", ""))  # launch prepends the venv; restore after
    # -j 1x1 (train-fm is up to date; one replica per sharded stage) keeps this test short on a 2-core
    # CI machine; the --rank/--world-size arguments of several replicas are checked by the dry runs
    # in test_components.py
    assert _launch(["--scheduler", "local_cwd", CONFIG, *TINY, "--out", str(run), "--poll", "0.3",
                    "-j", "1x1"]) == 0
    out = capsys.readouterr().out
    have = launch.available_stages()
    for stage in have:
        assert f"[launch] {stage}: SUCCEEDED" in out
    for stage in set(launch.PIPELINE) - set(have):
        assert f"[launch] {stage}: skipped" in out
    logs = run / "torchx_logs"
    assert "up to date" in "".join(p.read_text() for p in logs.rglob("prepare/0/stdout.log"))
    for stage, folder in (("extract", "extract"), ("compress", "compress"), ("build-sequences", "sequences"),
                          ("train-vm", "vm")):
        if stage in have:
            assert (run / folder / "_SUCCESS").is_file(), stage
    if "report" in have:
        results = json.loads((run / "results.json").read_text())
        assert results["dataset"] == "synthetic" and set(results["vm"]) == {"deepfm"}


def test_launch_stops_at_the_first_failing_stage_and_points_at_its_logs(tmp_path: Path, monkeypatch,
                                                                         capsys) -> None:
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("PATH", os.environ.get("PATH", ""))
    run = tmp_path / "run"
    assert _launch(["-s", "local_cwd", CONFIG, *DATA, "fm.train.batch_sizee=64", "--out", str(run),
                    "--poll", "0.2"]) == 1
    captured = capsys.readouterr()
    err = captured.err
    assert "[launch] prepare: FAILED; stopping" in err
    assert "local_cwd://torchx/loopfm-prepare-" in err  # the app handle
    log = next(line.split()[-1] for line in err.splitlines() if line.endswith("/prepare/0/stderr.log"))
    assert Path(log).is_file() and str(run / "torchx_logs") in log
    assert "unknown key 'fm.train.batch_sizee'" in err  # the stage's own error, quoted from its log
    assert "train-fm: submitted" not in captured.out  # nothing after the failure
    assert not (run / "data").exists()
