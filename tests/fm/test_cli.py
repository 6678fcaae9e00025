"""`loopfm train-fm` end to end: a run killed with SIGKILL and resumed with --resume ends with
exactly the metrics and parameters of an uninterrupted run; a finished run is not redone."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch

from loopfm.cli import main
from tests.conftest import REPO

CONFIG = """
seed: 0
data:
  source: synthetic
  synthetic: {rows: 4000, history_len: 10, cross_domain_len: 5}
fm:
  model: {embedding_dim: 8, dnn: [16, 8, 4], num_heads: 2, head_dim: 4, attention_mlp: [8], position_dim: 4}
  autoencoder: {taps: [hidden0], dim: 8, prefixes: [4, 8], hidden: [16]}
  parallel: {sharding_types: [table_wise], cpu_threads: 1}
  train: {batch_size: 32, eval_batch_size: 512, checkpoint_every_steps: 2, log_every_steps: 10}
"""


def test_killed_run_resumes_to_the_same_result(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(CONFIG)
    assert main(["prepare", str(cfg), "--out", str(tmp_path / "a" / "data"), "--quiet"]) == 0
    (tmp_path / "b").mkdir()
    os.symlink(tmp_path / "a" / "data", tmp_path / "b" / "data")

    proc = subprocess.Popen([sys.executable, "-m", "loopfm.cli", "train-fm", str(cfg), "--out",
                             str(tmp_path / "b"), "--quiet"], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    latest = tmp_path / "b" / "fm.work" / "checkpoints" / "LATEST"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if latest.is_file() and json.loads(latest.read_text())["step"] >= 4:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(latest.read_text())["step"]
    assert not (tmp_path / "b" / "fm").exists()

    assert main(["train-fm", str(cfg), "--out", str(tmp_path / "a"), "--quiet"]) == 0
    assert main(["train-fm", str(cfg), "--out", str(tmp_path / "b"), "--resume", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "resuming from" in out and f"(step {killed_at})" in out
    a, b = tmp_path / "a" / "fm", tmp_path / "b" / "fm"
    assert json.loads((a / "eval.json").read_text()) == json.loads((b / "eval.json").read_text())
    sa, sb = (torch.load(p / "model.pt", weights_only=True) for p in (a, b))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert set(json.loads((a / "eval.json").read_text())) == {"5", "6", "7", "8"}

    assert main(["train-fm", str(cfg), "--out", str(tmp_path / "a"), "--quiet"]) == 0
    assert "[train-fm] up to date" in capsys.readouterr().out
