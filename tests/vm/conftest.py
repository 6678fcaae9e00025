"""A MovieLens-100K event log prepared once for the VM tests (skipped when the data is absent)."""
from __future__ import annotations

from pathlib import Path

import pytest


def shared_data_dir() -> Path:
    """The project's sibling ``../shared/data`` folder of real data files."""
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


ML = shared_data_dir() / "movielens-100k"


@pytest.fixture(scope="session")
def ml_log(tmp_path_factory):
    """MovieLens-100K prepared by `loopfm.data.sources.movielens` (8 equal-count days, 20-long
    fm_only item histories for the raw-sequence ablation)."""
    if not (ML / "ml-100k.inter").is_file():
        pytest.skip(f"MovieLens-100K copy not found at {ML}")
    from loopfm.data.eventlog import EventLog
    from loopfm.data.prepare import prepare
    from loopfm.data.sources.movielens import MovieLensConfig, MovieLensSource

    out = tmp_path_factory.mktemp("vm_ml") / "events"
    src = MovieLensSource(MovieLensConfig(path=str(ML), history_len=20), seed=0, chunk_rows=100_000)
    prepare(src, out, config_hash="test", progress=False)
    return EventLog(out)


@pytest.fixture(autouse=True)
def one_thread():
    """The VM tests' models are tiny: one intra-op thread is faster, much faster on a loaded
    2-core machine (2 threads measured 5-10x slower there). Restored after each test."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
