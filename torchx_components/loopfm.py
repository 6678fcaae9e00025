"""TorchX components for the LoopFM pipeline: one per stage, the same on every scheduler.

Each component runs ``python -m loopfm.cli STAGE CONFIG [key=value ...] --out RUN_DIR`` (the
entry point is a module, not a path, so it works in any image or checkout where ``loopfm`` is
installed) and only the scheduler changes between a laptop and a cluster::

    torchx run -s local_cwd torchx_components/loopfm.py:train_fm --config C --out RUN -j 1x2
    torchx run -s slurm -cfg partition=gpu,time=2:00:00 torchx_components/loopfm.py:train_fm ...
    torchx run -s kubernetes -cfg queue=default,namespace=ml torchx_components/loopfm.py:train_fm \\
        --image REGISTRY/loopfm:TAG --mounts type=volume,src=loopfm-runs,dst=/runs --out /runs/r1 ...

Two kinds of roles:

* **distributed** (``train_fm``, ``train_vm``): built on `torchx.components.dist.ddp`;
  ``-j NxM`` = N nodes x M processes, ``torchrun`` does the rendezvous and sets
  ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, which the trainers read.
* **replicated** (``extract``, ``compress``, ``build_sequences``): ``replicas`` independent
  processes with no collective; replica R owns the key-hash shard R of ``replicas`` and writes
  ``OUT/<stage>/shards/rank-R`` (see `loopfm.stages.codes_format`). The shard is passed as
  ``--rank ${replica_id} --world-size N`` on the command line: TorchX substitutes the
  ``replica_id`` macro per replica on local_cwd, slurm and kubernetes alike (and keeps it when a
  replica is restarted), whereas env vars like ``SLURM_PROCID`` or Volcano's ``VC_TASK_INDEX``
  exist on one scheduler only. No ``RANK``/``MASTER_ADDR`` env is set, so a replica never tries to
  form a process group.

Retries: ``max_retries=K`` lets the scheduler restart a failed job up to K times (slurm requeues,
Volcano restarts the job; local_cwd ignores it). A restarted ``train_fm`` resumes from its last
checkpoint (``resume=True`` passes ``--resume``; without a checkpoint it starts from the
beginning), and a stage whose output (or shard) is complete is skipped, so a retry redoes only
what was lost.

Resources: ``h=NAME`` (a registered named resource) takes precedence over ``cpu``/``gpu``/``memMB``.
Paths (``config``, ``out``) are read on the worker: relative to the job's working directory
(the current directory for local_cwd and slurm, the image's WORKDIR on kubernetes); ``out`` must
be on storage every node sees.

This file imports only torchx (no torch, no loopfm) so ``torchx run`` and dry runs work on a
submit host that has just torchx installed.
"""

from typing import Dict, List, Optional

import torchx.specs as specs
from torchx.components import dist

# The image of container jobs: the repository's Dockerfile (`docker build -t loopfm:latest .`), with
# loopfm installed and its configs in the WORKDIR. local_cwd and slurm ignore it (they run in the
# current directory and environment).
DEFAULT_IMAGE = "loopfm:latest"
MODULE = "loopfm.cli"
# Unbuffered output so `torchx log` shows progress as it happens.
BASE_ENV = {"PYTHONUNBUFFERED": "1"}


def _env(env: Optional[Dict[str, str]]) -> Dict[str, str]:
    return {**BASE_ENV, **(env or {})}


def _stage_args(stage: str, config: str, out: str, overrides: tuple, flags: List[str]) -> List[str]:
    # overrides must follow CONFIG directly: argparse cannot take them after --out
    return [stage, config, *overrides, "--out", out, *flags]


def _distributed(stage: str, role: str, config: str, out: str, overrides: tuple, flags: List[str],
                 *, name: str, image: str, h: Optional[str], cpu: int, gpu: int, memMB: int, j: str,
                 env: Optional[Dict[str, str]], max_retries: int, rdzv_port: int,
                 mounts: Optional[List[str]]) -> specs.AppDef:
    """A `dist.ddp` app running ``torchrun ... -m loopfm.cli STAGE ...``, its role named ``role``."""
    app = dist.ddp(*_stage_args(stage, config, out, overrides, flags), m=MODULE, image=image,
                   name=name, h=h, cpu=cpu, gpu=gpu, memMB=memMB, j=j, env=_env(env),
                   max_retries=max_retries, rdzv_port=rdzv_port, mounts=mounts)
    app.roles[0].name = role  # dist.ddp would call it "cli" (the module's last part)
    return app


def _replicated(stage: str, role: str, config: str, out: str, overrides: tuple, flags: List[str],
                *, name: str, image: str, h: Optional[str], cpu: int, gpu: int, memMB: int,
                replicas: int, env: Optional[Dict[str, str]], max_retries: int,
                mounts: Optional[List[str]]) -> specs.AppDef:
    """``replicas`` copies of ``python -m loopfm.cli STAGE ... --rank R --world-size N``."""
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    shard = ["--rank", specs.macros.replica_id, "--world-size", str(replicas)] if replicas > 1 else []
    return specs.AppDef(name=name, roles=[specs.Role(
        name=role, image=image, entrypoint="python",
        args=["-m", MODULE, *_stage_args(stage, config, out, overrides, [*shard, *flags])],
        num_replicas=replicas, resource=specs.resource(cpu=cpu, gpu=gpu, memMB=memMB, h=h),
        env=_env(env), max_retries=max_retries,
        mounts=specs.parse_mounts(mounts) if mounts else [])])


def _flags(resume: bool = False, force: bool = False, quiet: bool = True) -> List[str]:
    return (["--resume"] if resume else []) + (["--force"] if force else []) + (["--quiet"] if quiet else [])


def prepare(*overrides: str, config: str, out: str, image: str = DEFAULT_IMAGE, h: Optional[str] = None,
            cpu: int = 2, gpu: int = 0, memMB: int = 8192, env: Optional[Dict[str, str]] = None,
            max_retries: int = 0, force: bool = False, quiet: bool = True,
            mounts: Optional[List[str]] = None) -> specs.AppDef:
    """Turn the config's data source into the event log OUT/data (one process).

    Args:
        overrides: dotted config overrides, e.g. data.synthetic.rows=5000 seed=1
        config: YAML experiment config, e.g. configs/quickstart.yaml (path on the worker)
        out: run folder on shared storage; this stage writes OUT/data
        image: container image with loopfm installed (kubernetes; ignored by local_cwd and slurm)
        h: registered named resource; takes precedence over cpu, gpu, memMB
        cpu: CPUs of the replica
        gpu: GPUs of the replica
        memMB: memory of the replica in MB
        env: extra environment variables, e.g. ENV1=v1,ENV2=v2
        max_retries: scheduler restarts of a failed job
        force: rebuild even if OUT/data is complete for this config
        quiet: no progress bars in the logs
        mounts: volumes for container schedulers, e.g. type=bind,src=/data,dst=/data
    """
    return _replicated("prepare", "prepare", config, f"{out.rstrip('/')}/data", overrides,
                       _flags(force=force, quiet=quiet), name="loopfm-prepare", image=image, h=h,
                       cpu=cpu, gpu=gpu, memMB=memMB, replicas=1, env=env, max_retries=max_retries,
                       mounts=mounts)


def train_fm(*overrides: str, config: str, out: str, j: str = "1x2", image: str = DEFAULT_IMAGE,
             h: Optional[str] = None, cpu: int = 2, gpu: int = 0, memMB: int = 8192,
             env: Optional[Dict[str, str]] = None, max_retries: int = 0, resume: bool = True,
             force: bool = False, quiet: bool = True, rdzv_port: int = 29500,
             mounts: Optional[List[str]] = None) -> specs.AppDef:
    """Train the foundation model (TorchRec, sharded) on OUT/data into OUT/fm, under torchrun.

    Args:
        overrides: dotted config overrides, e.g. fm.train.batch_size=1024 fm.model.embedding_dim=16
        config: YAML experiment config, e.g. configs/quickstart.yaml (path on the worker)
        out: run folder on shared storage (reads OUT/data, writes OUT/fm and OUT/fm.work)
        j: {nnodes}x{nproc_per_node}, e.g. 2x4; on GPU hosts nproc_per_node <= GPUs per node
        image: container image with loopfm installed (kubernetes; ignored by local_cwd and slurm)
        h: registered named resource; takes precedence over cpu, gpu, memMB
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: memory per node in MB
        env: extra environment variables, e.g. ENV1=v1,ENV2=v2
        max_retries: scheduler restarts of a failed job (each resumes from the last checkpoint)
        resume: pass --resume: continue from the last checkpoint in OUT/fm.work if there is one
        force: retrain even if OUT/fm is complete for this config
        quiet: no progress bars in the logs
        rdzv_port: port of the c10d rendezvous on the first node (multi-node only)
        mounts: volumes for container schedulers, e.g. type=bind,src=/data,dst=/data
    """
    return _distributed("train-fm", "train_fm", config, out, overrides, _flags(resume, force, quiet),
                        name="loopfm-train-fm", image=image, h=h, cpu=cpu, gpu=gpu, memMB=memMB, j=j,
                        env=env, max_retries=max_retries, rdzv_port=rdzv_port, mounts=mounts)


def extract(*overrides: str, config: str, out: str, replicas: int = 2, image: str = DEFAULT_IMAGE,
            h: Optional[str] = None, cpu: int = 2, gpu: int = 0, memMB: int = 8192,
            env: Optional[Dict[str, str]] = None, max_retries: int = 0, force: bool = False,
            quiet: bool = True, mounts: Optional[List[str]] = None) -> specs.AppDef:
    """Run the trained FM over the event log: soft labels and codes into OUT/extract.

    Args:
        overrides: dotted config overrides
        config: YAML experiment config (path on the worker)
        out: run folder on shared storage (reads OUT/data and OUT/fm, writes OUT/extract)
        replicas: independent processes; replica R takes key-hash shard R (--rank R --world-size N)
        image: container image with loopfm installed (kubernetes; ignored by local_cwd and slurm)
        h: registered named resource; takes precedence over cpu, gpu, memMB
        cpu: CPUs per replica
        gpu: GPUs per replica
        memMB: memory per replica in MB
        env: extra environment variables, e.g. ENV1=v1,ENV2=v2
        max_retries: scheduler restarts of a failed job (a complete stage output is skipped)
        force: redo even if the output is complete for this config
        quiet: no progress bars in the logs
        mounts: volumes for container schedulers, e.g. type=bind,src=/data,dst=/data
    """
    return _replicated("extract", "extract", config, out, overrides, _flags(force=force, quiet=quiet),
                       name="loopfm-extract", image=image, h=h, cpu=cpu, gpu=gpu, memMB=memMB,
                       replicas=replicas, env=env, max_retries=max_retries, mounts=mounts)


def compress(*overrides: str, config: str, out: str, replicas: int = 2, image: str = DEFAULT_IMAGE,
             h: Optional[str] = None, cpu: int = 2, gpu: int = 0, memMB: int = 8192,
             env: Optional[Dict[str, str]] = None, max_retries: int = 0, force: bool = False,
             quiet: bool = True, mounts: Optional[List[str]] = None) -> specs.AppDef:
    """Compress the extracted codes (Matryoshka prefix, fp16/int8/int4/int4-kmeans) into OUT/compress.

    Args:
        overrides: dotted config overrides
        config: YAML experiment config (path on the worker)
        out: run folder on shared storage (reads OUT/extract, writes OUT/compress)
        replicas: independent processes; replica R takes shard R (--rank R --world-size N)
        image: container image with loopfm installed (kubernetes; ignored by local_cwd and slurm)
        h: registered named resource; takes precedence over cpu, gpu, memMB
        cpu: CPUs per replica
        gpu: GPUs per replica
        memMB: memory per replica in MB
        env: extra environment variables, e.g. ENV1=v1,ENV2=v2
        max_retries: scheduler restarts of a failed job (a complete stage output is skipped)
        force: redo even if the output is complete for this config
        quiet: no progress bars in the logs
        mounts: volumes for container schedulers, e.g. type=bind,src=/data,dst=/data
    """
    return _replicated("compress", "compress", config, out, overrides, _flags(force=force, quiet=quiet),
                       name="loopfm-compress", image=image, h=h, cpu=cpu, gpu=gpu, memMB=memMB,
                       replicas=replicas, env=env, max_retries=max_retries, mounts=mounts)


def build_sequences(*overrides: str, config: str, out: str, replicas: int = 2,
                    image: str = DEFAULT_IMAGE, h: Optional[str] = None, cpu: int = 2, gpu: int = 0,
                    memMB: int = 8192, env: Optional[Dict[str, str]] = None, max_retries: int = 0,
                    force: bool = False, quiet: bool = True,
                    mounts: Optional[List[str]] = None) -> specs.AppDef:
    """Group the packed codes into per-key, point-in-time sequences in OUT/sequences.

    Args:
        overrides: dotted config overrides
        config: YAML experiment config (path on the worker)
        out: run folder on shared storage (reads OUT/compress and OUT/data, writes OUT/sequences)
        replicas: independent processes; replica R owns the keys whose hash falls in shard R
        image: container image with loopfm installed (kubernetes; ignored by local_cwd and slurm)
        h: registered named resource; takes precedence over cpu, gpu, memMB
        cpu: CPUs per replica
        gpu: GPUs per replica
        memMB: memory per replica in MB
        env: extra environment variables, e.g. ENV1=v1,ENV2=v2
        max_retries: scheduler restarts of a failed job (a complete stage output is skipped)
        force: redo even if the output is complete for this config
        quiet: no progress bars in the logs
        mounts: volumes for container schedulers, e.g. type=bind,src=/data,dst=/data
    """
    return _replicated("build-sequences", "build_sequences", config, out, overrides,
                       _flags(force=force, quiet=quiet), name="loopfm-build-sequences", image=image,
                       h=h, cpu=cpu, gpu=gpu, memMB=memMB, replicas=replicas, env=env,
                       max_retries=max_retries, mounts=mounts)


def train_vm(*overrides: str, config: str, out: str, j: str = "1x1", image: str = DEFAULT_IMAGE,
             h: Optional[str] = None, cpu: int = 2, gpu: int = 0, memMB: int = 8192,
             env: Optional[Dict[str, str]] = None, max_retries: int = 0, force: bool = False,
             quiet: bool = True, rdzv_port: int = 29500,
             mounts: Optional[List[str]] = None) -> specs.AppDef:
    """Train and test the vertical models (models x variants x seeds) into OUT/vm, under torchrun.

    The (model, variant, seed) runs are independent: rank r of W trains runs r, r+W, ... and rank 0
    merges the predictions into OUT/vm (the same output as one process). ``-j 1x2`` on two GPUs
    gives each process its own device (``LOCAL_RANK``).

    Args:
        overrides: dotted config overrides
        config: YAML experiment config (path on the worker)
        out: run folder on shared storage (reads the event log, soft labels and sequences; writes OUT/vm)
        j: {nnodes}x{nproc_per_node}; the runs are shared out over all processes
        image: container image with loopfm installed (kubernetes; ignored by local_cwd and slurm)
        h: registered named resource; takes precedence over cpu, gpu, memMB
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: memory per node in MB
        env: extra environment variables, e.g. ENV1=v1,ENV2=v2
        max_retries: scheduler restarts of a failed job
        force: retrain even if the output is complete for this config
        quiet: no progress bars in the logs
        rdzv_port: port of the c10d rendezvous on the first node (multi-node only)
        mounts: volumes for container schedulers, e.g. type=bind,src=/data,dst=/data
    """
    return _distributed("train-vm", "train_vm", config, out, overrides, _flags(force=force, quiet=quiet),
                        name="loopfm-train-vm", image=image, h=h, cpu=cpu, gpu=gpu, memMB=memMB, j=j,
                        env=env, max_retries=max_retries, rdzv_port=rdzv_port, mounts=mounts)


def report(*overrides: str, config: str, out: str, image: str = DEFAULT_IMAGE, h: Optional[str] = None,
           cpu: int = 1, gpu: int = 0, memMB: int = 4096, env: Optional[Dict[str, str]] = None,
           max_retries: int = 0, force: bool = False, quiet: bool = True,
           mounts: Optional[List[str]] = None) -> specs.AppDef:
    """Collect the run's metrics into OUT/results.json, report.md and plots (one process).

    Args:
        overrides: dotted config overrides
        config: YAML experiment config (path on the worker)
        out: run folder on shared storage
        image: container image with loopfm installed (kubernetes; ignored by local_cwd and slurm)
        h: registered named resource; takes precedence over cpu, gpu, memMB
        cpu: CPUs of the replica
        gpu: GPUs of the replica
        memMB: memory of the replica in MB
        env: extra environment variables, e.g. ENV1=v1,ENV2=v2
        max_retries: scheduler restarts of a failed job
        force: rewrite the report even if it is complete
        quiet: no progress bars in the logs
        mounts: volumes for container schedulers, e.g. type=bind,src=/data,dst=/data
    """
    return _replicated("report", "report", config, out, overrides, _flags(force=force, quiet=quiet),
                       name="loopfm-report", image=image, h=h, cpu=cpu, gpu=gpu, memMB=memMB,
                       replicas=1, env=env, max_retries=max_retries, mounts=mounts)


def pipeline(*overrides: str, config: str, out: str, image: str = DEFAULT_IMAGE, h: Optional[str] = None,
             cpu: int = 8, gpu: int = 0, memMB: int = 32768, env: Optional[Dict[str, str]] = None,
             max_retries: int = 0, force: bool = False, quiet: bool = True,
             mounts: Optional[List[str]] = None) -> specs.AppDef:
    """The whole chain (``loopfm run``) as one single-process job on one node: for small data, or
    to get one allocation instead of one job per stage (`loopfm launch` runs one job per stage).

    Args:
        overrides: dotted config overrides
        config: YAML experiment config (path on the worker)
        out: run folder (every stage's output, results.json)
        image: container image with loopfm installed (kubernetes; ignored by local_cwd and slurm)
        h: registered named resource; takes precedence over cpu, gpu, memMB
        cpu: CPUs of the node
        gpu: GPUs of the node
        memMB: memory of the node in MB
        env: extra environment variables, e.g. ENV1=v1,ENV2=v2
        max_retries: scheduler restarts of a failed job (complete stages are skipped)
        force: rerun every stage
        quiet: no progress bars in the logs
        mounts: volumes for container schedulers, e.g. type=bind,src=/data,dst=/data
    """
    return _replicated("run", "pipeline", config, out, overrides, _flags(force=force, quiet=quiet),
                       name="loopfm-pipeline", image=image, h=h, cpu=cpu, gpu=gpu, memMB=memMB,
                       replicas=1, env=env, max_retries=max_retries, mounts=mounts)
