"""Shared test fixtures: where the real data lives (never copied into the repo)."""
from __future__ import annotations

import os
from pathlib import Path

# The Triton kernels run under the interpreter on CPU. Set before anything imports triton or
# decorates a kernel (torch.compile in other tests can pull triton in first); a GPU machine runs
# the same tests on CUDA with TRITON_INTERPRET=0.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """../shared/data from the project's root; tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (see DESIGN.md: it is not in git)")
    return SHARED_DATA
