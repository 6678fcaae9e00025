"""The metrics logger the FM trainer writes through (loopfm/tracking.py)."""
from __future__ import annotations

import json

from loopfm.tracking import JsonlLogger, NullLogger, build_logger


def test_jsonl_appends_and_a_resume_drops_records_past_its_step(tmp_path):
    log = JsonlLogger(tmp_path / "m.jsonl")
    for step in (1, 2, 3):
        log.log({"train/loss": step / 10}, step)
    log.close()
    log = JsonlLogger(tmp_path / "m.jsonl", truncate_after=2)  # resumed from a step-2 checkpoint
    log.log({"train/loss": 0.5}, 3)
    log.close()
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "train/loss": 0.1}, {"step": 2, "train/loss": 0.2},
                    {"step": 3, "train/loss": 0.5}]


def test_only_rank_zero_writes(tmp_path):
    assert isinstance(build_logger(tmp_path / "r1", rank=1), NullLogger)
    logger = build_logger(tmp_path / "r0", rank=0)
    logger.log({"eval/auc": 0.7}, 5)
    logger.close()
    assert json.loads((tmp_path / "r0" / "metrics.jsonl").read_text()) == {"step": 5, "eval/auc": 0.7}
    assert any((tmp_path / "r0" / "tb").iterdir())  # a TensorBoard event file
    assert not (tmp_path / "r1").exists()
