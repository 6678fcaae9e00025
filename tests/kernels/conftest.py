"""Kernel tests run the Triton kernels on CPU through Triton's interpreter.

TRITON_INTERPRET must be set before ``kernels.triton_int4_attend`` is imported (``triton.jit``
reads it when the kernels are decorated), hence at the top of this conftest, before any test
module of this folder is imported. ``setdefault`` lets a GPU machine run the same tests on CUDA
with ``TRITON_INTERPRET=0``.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from kernels import triton_available  # noqa: E402


@pytest.fixture(scope="session")
def tk() -> SimpleNamespace:
    """The Triton kernel module and the device its tests use; skips when neither can run."""
    if not triton_available():
        pytest.skip("triton is not installed: Triton kernel tests skipped (reference tests still run)")
    module = importlib.import_module("kernels.triton_int4_attend")
    if module.INTERPRET:
        return SimpleNamespace(mod=module, device=torch.device("cpu"))
    if torch.cuda.is_available():
        return SimpleNamespace(mod=module, device=torch.device("cuda"))
    pytest.skip("kernels.triton_int4_attend was imported before TRITON_INTERPRET=1 was set and "
                "there is no GPU; run tests/kernels on its own or export TRITON_INTERPRET=1")
