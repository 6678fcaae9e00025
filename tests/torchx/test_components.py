"""TorchX components: every one validates, and dry runs on slurm and kubernetes give the job a
cluster would run (no cluster needed). Each test takes well under a second."""
from __future__ import annotations

import argparse
import importlib.util
import shlex

import pytest
import yaml
from torchx.components.component_test_base import ComponentTestCase
from torchx.runner import get_runner
from torchx.specs import AppDef

from loopfm import launch
from torchx_components import loopfm as components

COMPONENTS = ("prepare", "train_fm", "extract", "compress", "build_sequences", "train_vm", "report",
              "pipeline")
ARGS = dict(config="configs/quickstart.yaml", out="/shared/runs/r1")


class TestValidate(ComponentTestCase):
    def test_every_component_validates(self) -> None:
        for name in COMPONENTS:
            with self.subTest(component=name):
                self.validate(components, name)


@pytest.mark.parametrize("name", COMPONENTS)
def test_entry_point_is_the_cli_module(name: str) -> None:
    app = getattr(components, name)("seed=3", **ARGS)
    role = app.roles[0]
    cmd = role.entrypoint + " " + " ".join(role.args)
    stage = "run" if name == "pipeline" else name.replace("_", "-")
    assert f"-m loopfm.cli {stage} configs/quickstart.yaml seed=3 --out /shared/runs/r1" in cmd \
        or (name == "prepare" and "prepare configs/quickstart.yaml seed=3 --out /shared/runs/r1/data" in cmd)
    assert role.env["PYTHONUNBUFFERED"] == "1"
    assert role.name == name


def test_replicated_roles_get_their_shard_from_the_replica_id() -> None:
    role = components.extract(**ARGS, replicas=3, max_retries=2).roles[0]
    assert role.num_replicas == 3 and role.max_retries == 2
    assert role.args[-5:] == ["--rank", "${replica_id}", "--world-size", "3", "--quiet"]
    assert "RANK" not in role.env  # independent replicas: no process group
    single = components.compress(**ARGS, replicas=1).roles[0]
    assert "--rank" not in single.args


def test_named_resource_takes_precedence() -> None:
    role = components.train_fm(**ARGS, h="gpu.small", cpu=99).roles[0]
    assert role.resource.gpu == 1 and role.resource.cpu != 99
    role = components.train_vm(**ARGS, cpu=8, gpu=2, memMB=16000).roles[0]
    assert (role.resource.cpu, role.resource.gpu, role.resource.memMB) == (8, 2, 16000)


def _slurm_script(app: AppDef, cfg: dict) -> str:
    with get_runner() as runner:
        return runner.dryrun(app, "slurm", cfg=cfg).request.materialize()


def test_slurm_dryrun_train_fm_2x4() -> None:
    app = components.train_fm("fm.train.batch_size=4096", **ARGS, j="2x4", gpu=4, cpu=16, memMB=64000,
                              max_retries=2)
    script = _slurm_script(app, {"partition": "gpu", "time": "2:00:00"})
    # one heterogeneous group per node, each with the partition, time limit and resources
    assert script.count("#SBATCH --job-name=train_fm-") == 2 and "#SBATCH hetjob" in script
    for opt in ("--partition=gpu", "--time=2:00:00", "--cpus-per-task=16", "--gpus-per-task=4", "--requeue"):
        assert opt in script
    assert "TORCHX_MAX_RETRIES=2" in script
    # torchrun rendezvous on the first node of the allocation, 2 nodes x 4 processes
    assert script.count("--rdzv_backend c10d --rdzv_endpoint ${SLURM_JOB_NODELIST_HET_GROUP_0:=localhost}:29500") == 2
    assert "--nnodes 2 --nproc_per_node 4" in script
    # the stage's own command line
    assert ("-m loopfm.cli train-fm configs/quickstart.yaml fm.train.batch_size=4096 "
            "--out /shared/runs/r1 --resume --quiet") in script
    assert 'slurm-"$SLURM_JOB_ID"-train_fm-0.out' in script


def test_slurm_dryrun_replicated_stage() -> None:
    script = _slurm_script(components.build_sequences(**ARGS, replicas=2), {"partition": "cpu"})
    for r in (0, 1):
        assert f"build-sequences configs/quickstart.yaml --out /shared/runs/r1 --rank {r} --world-size 2" in script
    assert "torchrun" not in script


@pytest.mark.skipif(importlib.util.find_spec("kubernetes") is None,
                    reason="kubernetes client not installed (pip install -e .[k8s])")
def test_kubernetes_dryrun_volcano_job() -> None:
    app = components.train_fm(**{**ARGS, "out": "/runs/r1"}, j="2x4", gpu=4, cpu=16, memMB=64000,
                              image="registry.example.com/loopfm:0.1", max_retries=2,
                              mounts=["type=volume", "src=loopfm-runs", "dst=/runs"])
    with get_runner() as runner:
        info = runner.dryrun(app, "kubernetes", cfg={"queue": "default", "namespace": "ml"})
    job = yaml.safe_load(str(info.request))
    assert job["kind"] == "Job" and job["apiVersion"].startswith("batch.volcano.sh")
    assert job["spec"]["queue"] == "default" and job["spec"]["maxRetry"] == 2
    tasks = job["spec"]["tasks"]
    assert [t["name"] for t in tasks] == ["trainfm-0", "trainfm-1"]
    container = tasks[0]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example.com/loopfm:0.1"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    command = " ".join(container["command"])
    assert "--nnodes 2 --nproc_per_node 4" in command
    assert "-m loopfm.cli train-fm configs/quickstart.yaml --out /runs/r1 --resume" in command
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/runs" in mounts


def _launch_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="loopfm")
    launch.add_launch_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_launch_dryrun_slurm_prints_each_existing_stage(capsys) -> None:
    args = _launch_args(["launch", "--scheduler", "slurm", "--cfg", "partition=gpu,time=1:00:00",
                         "configs/quickstart.yaml", "seed=1", "--out", "/shared/runs/r1", "-j", "2x4",
                         "--dryrun"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    have = launch.available_stages()
    assert have[:2] == ["prepare", "train-fm"]
    for stage in launch.PIPELINE:
        assert (f"[launch] {stage}: dry run on slurm" in out) == (stage in have)
        assert (f"[launch] {stage}: skipped" in out) == (stage not in have)
    assert "--partition=gpu" in out and "--nnodes 2 --nproc_per_node 4" in out
    assert "prepare configs/quickstart.yaml seed=1 --out /shared/runs/r1/data" in out


def test_launch_rejects_a_misspelled_scheduler_option() -> None:
    args = _launch_args(["launch", "-s", "slurm", "--cfg", "partiton=gpu", "c.yaml", "--out", "x", "--dryrun"])
    with pytest.raises(SystemExit, match="did you mean 'partition'"):
        args.func(args)


def test_launch_builds_stage_apps_from_its_options() -> None:
    args = _launch_args(["launch", "c.yaml", "a=1", "--out", "R", "-j", "2x3", "--gpu", "1",
                         "--env", "K=V", "--max-retries", "1", "--force",
                         "--mount", "type=bind,src=/data,dst=/data"])
    fm = launch.stage_app("train-fm", args).roles[0]
    assert fm.resource.gpu == 1 and fm.max_retries == 1 and fm.env["K"] == "V"
    assert fm.mounts[0].src_path == "/data" and fm.mounts[0].dst_path == "/data"
    assert "--nnodes 2 --nproc_per_node 3" in fm.args[1] and "--force" in fm.args[1]
    ex = launch.stage_app("extract", args).roles[0]
    assert ex.num_replicas == 6 and shlex.join(ex.args).startswith("-m loopfm.cli extract c.yaml a=1 --out R")
    prep = launch.stage_app("prepare", args).roles[0]
    assert prep.resource.gpu == 0  # prepare keeps its small CPU default


def test_launch_checks_every_stage_before_submitting_any(tmp_path, capsys) -> None:
    args = _launch_args(["launch", "-s", "local_cwd", "c.yaml", "--out", str(tmp_path / "run"), "-j", "3y"])
    assert args.func(args) == 2  # train-fm's -j is bad: prepare must not have been submitted
    assert "train-fm on local_cwd: Invalid format for -j" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
