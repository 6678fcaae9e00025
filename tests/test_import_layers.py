"""The layering the code relies on: the config loader loads no model, the VM path needs no
TorchRec (a GPU box with only torch and triton trains VMs), the kernels need no loopfm."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

_BLOCKER = """
import importlib.abc, sys
class _Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(f"{{name}} is blocked in this test")
sys.meta_path.insert(0, _Blocked())
"""


def _python(code: str, blocked: tuple[str, ...] = ()) -> str:
    prelude = _BLOCKER.format(blocked=set(blocked)) if blocked else ""
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_config_loader_imports_no_torch():
    out = _python("""
        import sys
        import loopfm.config
        print(sorted(m for m in ("torch", "torchrec", "loopfm.fm", "loopfm.vm") if m in sys.modules))
    """)
    assert out.strip() == "[]"


@pytest.mark.parametrize("module", ["loopfm.vm.model", "loopfm.stages.train_vm", "loopfm.vm.train"])
def test_vm_path_imports_without_torchrec(module):
    _python(f"import {module}", blocked=("torchrec", "fbgemm_gpu", "torchx"))


def test_kernels_import_neither_loopfm_nor_torchrec():
    out = _python("""
        import sys
        import kernels
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("loopfm", "torchrec", "fbgemm_gpu")))
    """)
    assert out.strip() == "[]"


def test_blocker_does_block():
    # the guard above would pass vacuously if blocking did nothing
    proc = subprocess.run([sys.executable, "-c", _BLOCKER.format(blocked={"torchrec"}) + "import torchrec"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "blocked" in proc.stderr
