"""The cluster image without a Docker daemon: the install script's CUDA branch is what the
Dockerfile gets, its pins agree with the CPU branch and setup.py, and the components name the image."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from torchx_components import loopfm as components

REPO = Path(__file__).resolve().parents[2]
ARGS = dict(config="configs/quickstart.yaml", out="/runs/r1")


def _install_plan(tmp_path: Path, *, smi_exit: int | None, env: dict | None = None) -> list[str]:
    """The pip commands scripts/install.sh would run, with a fake nvidia-smi exiting ``smi_exit``
    (None: no nvidia-smi on PATH)."""
    fake = tmp_path / f"bin-{smi_exit}"
    fake.mkdir(exist_ok=True)
    if smi_exit is not None:
        (fake / "nvidia-smi").write_text(f"#!/bin/sh\necho 'fake GPU'\nexit {smi_exit}\n")
        (fake / "nvidia-smi").chmod(0o755)
    path = os.pathsep.join([str(fake), "/usr/bin", "/bin"])
    base = {k: v for k, v in os.environ.items() if k not in ("LOOPFM_DEVICE", "LOOPFM_TORCH_INDEX")}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "install.sh"), str(tmp_path / "venv")],
                          env={**base, "PATH": path, "DRY_RUN": "1", **(env or {})},
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "venv").exists()  # a dry run makes nothing
    return proc.stdout.splitlines()


def _pins(lines: list[str]) -> dict[str, str]:
    return dict(re.findall(r"([A-Za-z][\w.-]*)==([\w.]+)", " ".join(lines)))


def test_gpu_branch_when_nvidia_smi_answers(tmp_path):
    gpu = _install_plan(tmp_path, smi_exit=0)
    assert gpu[0] == "# device: cuda"
    pins = _pins(gpu)
    assert pins["torch"] == "2.13.0" and pins["fbgemm-gpu"] == "1.8.0" and pins["torchrec"] == "1.8.0"
    assert pins["triton"] == "3.6.0" and "fbgemm-gpu-cpu" not in pins
    torch_line = next(line for line in gpu if "torch==" in line)
    assert "--index-url https://download.pytorch.org/whl/cu" in torch_line
    assert any(line.endswith("--no-deps torchrec==1.8.0") for line in gpu)


def test_cpu_branch_without_a_driver(tmp_path):
    for smi_exit in (None, 9):  # no nvidia-smi, or one that fails (driver missing)
        cpu = _install_plan(tmp_path, smi_exit=smi_exit)
        assert cpu[0] == "# device: cpu"
        pins = _pins(cpu)
        assert pins["fbgemm-gpu-cpu"] == "1.8.0" and "fbgemm-gpu" not in pins and "triton" not in pins
        assert not any("--index-url" in line for line in cpu)
    assert _install_plan(tmp_path, smi_exit=0, env={"LOOPFM_DEVICE": "cpu"})[0] == "# device: cpu"


def test_pins_agree_between_branches_and_setup_py(tmp_path):
    cpu, gpu = _pins(_install_plan(tmp_path, smi_exit=None)), _pins(_install_plan(tmp_path, smi_exit=0))
    for name in ("torch", "torchrec", "torchmetrics", "torchx"):
        assert cpu[name] == gpu[name], name
    assert cpu["fbgemm-gpu-cpu"] == gpu["fbgemm-gpu"]  # FBGEMM 1.N pairs with torch 2.(N+5)
    major, minor = (int(x) for x in cpu["torch"].split(".")[:2])
    assert (major, minor) == (2, int(cpu["fbgemm-gpu-cpu"].split(".")[1]) + 5)
    setup = _pins([(REPO / "setup.py").read_text()])
    assert setup["torch"] == cpu["torch"] and setup["torchmetrics"] == cpu["torchmetrics"]
    assert setup["triton"] == gpu["triton"]  # the test extra on CPU = the runtime on CUDA
    test_extras = _pins(subprocess.run(["bash", str(REPO / "scripts" / "install.sh"), "v", "test"],
                                       env={**os.environ, "DRY_RUN": "1"}, capture_output=True, text=True,
                                       cwd=REPO).stdout.splitlines())
    assert test_extras["triton"] == gpu["triton"]


def test_bad_device_is_refused(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "scripts" / "install.sh"), str(tmp_path / "v")],
                          env={**os.environ, "DRY_RUN": "1", "LOOPFM_DEVICE": "tpu"}, capture_output=True, text=True)
    assert proc.returncode == 2 and "LOOPFM_DEVICE must be cpu or cuda" in proc.stderr


def test_dockerfile_installs_the_cuda_branch(tmp_path):
    text = (REPO / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", text, re.M).group(1)
    assert base.startswith("pytorch/pytorch:") and "cuda" in base
    assert re.search(r"^ENV LOOPFM_DEVICE=cuda", text, re.M)
    assert "bash scripts/install.sh /opt/venv" in text and "PATH=/opt/venv/bin:$PATH" in text
    index = re.search(r"^ARG LOOPFM_TORCH_INDEX=(\S+)", text, re.M).group(1)
    # what that RUN line installs on a build host without a GPU
    plan = _install_plan(tmp_path, smi_exit=None, env={"LOOPFM_DEVICE": "cuda", "LOOPFM_TORCH_INDEX": index})
    assert plan[0] == "# device: cuda" and any(f"--index-url {index} torch==" in line for line in plan)
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv/" in ignored and "runs/" in ignored


def test_components_name_the_image():
    assert components.DEFAULT_IMAGE == "loopfm:latest"  # what `docker build -t loopfm:latest .` makes
    for name in ("train_fm", "train_vm", "extract", "pipeline"):
        role = getattr(components, name)(**ARGS, image="registry.example.com/loopfm:0.2").roles[0]
        assert role.image == "registry.example.com/loopfm:0.2", name
        assert getattr(components, name)(**ARGS).roles[0].image == "loopfm:latest"


def test_local_docker_dryrun_runs_the_image():
    pytest.importorskip("docker")
    from torchx.runner import get_runner

    app = components.train_vm(**ARGS, j="1x2", image="registry.example.com/loopfm:0.2")
    with get_runner() as runner:
        info = runner.dryrun(app, "local_docker", cfg={})
    container = info.request.containers[0]
    assert container.image == "registry.example.com/loopfm:0.2"
    command = " ".join(container.command)
    assert "--nproc_per_node 2" in command and "-m loopfm.cli train-vm configs/quickstart.yaml --out /runs/r1" in command
