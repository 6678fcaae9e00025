"""The FM on the real MovieLens-100K copy (../shared/data, never in the repo)."""
from __future__ import annotations

import json

import pytest

from tests.conftest import SHARED_DATA


def test_fm_learns_movielens_100k(tmp_path):
    folder = SHARED_DATA / "movielens-100k"
    if not folder.is_dir():
        pytest.skip(f"real data folder {folder} is absent (see DESIGN.md: it is not in git)")
    try:
        from loopfm.data.sources.movielens import MovieLensConfig, MovieLensSource
    except ImportError as err:
        pytest.skip(f"the movielens source is not importable: {err}")
    from loopfm.data.prepare import prepare
    from loopfm.fm.train import train_fm
    from tests.fm.toy import tiny_config

    source = MovieLensSource(MovieLensConfig(path=str(folder), history_len=20), seed=0, chunk_rows=1_000_000)
    prepare(source, tmp_path / "data", config_hash="ml", progress=False)
    cfg = tiny_config(train_days=[1, 2, 3, 4], eval_days=[8], batch_size=512, eval_batch_size=4096,
                      log_every_steps=20)
    metrics = train_fm(cfg, tmp_path / "data", tmp_path / "fm", seed=0, config_hash="ml", progress=False)
    day8 = metrics["8"]
    print(json.dumps(metrics))
    assert day8["rows"] == 12_500
    assert day8["auc"] > 0.68, day8  # ids alone reach ~0.70 (FuxiCTR DeepFM); 0.5 is chance
    assert day8["ne"] < 0.95, day8
