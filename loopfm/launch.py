"""`loopfm launch`: run the pipeline's stages as TorchX jobs, one after the other.

    loopfm launch --scheduler local_cwd CONFIG [key=value ...] --out RUN_DIR
    loopfm launch --scheduler slurm --cfg partition=gpu,time=2:00:00 CONFIG --out /shared/runs/r1
    loopfm launch --scheduler kubernetes --cfg queue=default,namespace=ml --image REG/loopfm:TAG \\
        --mount type=volume,src=loopfm-runs,dst=/runs CONFIG --out /runs/r1 --dryrun

Each stage is the component of the same name in ``torchx_components/loopfm.py``, submitted through
`torchx.runner.get_runner`; launch waits for it and stops at the first one that does not succeed,
printing its handle, where its logs are and the last error lines. Rerunning the same command resumes: complete stages are skipped
by their manifests, and train-fm continues from its last checkpoint (``--resume``).
"""
from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from loopfm.pipeline import STAGES as PIPELINE  # the one list of stages, shared with the CLI

DISTRIBUTED = ("train-fm", "train-vm")           # dist.ddp: -j NxM, torchrun sets RANK/WORLD_SIZE
REPLICATED = ("extract", "compress", "build-sequences")  # --replicas independent key-hash shards
LOCAL_SCHEDULERS = ("local_cwd", "local_docker")


def add_launch_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``loopfm launch`` on the CLI's sub-parsers; returns the new parser."""
    p = subparsers.add_parser(
        "launch", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="run the pipeline's stages as TorchX jobs (local_cwd, slurm, kubernetes)",
        description=__doc__.split("\n\n", 1)[1])
    p.add_argument("config", nargs="?", help="YAML experiment config, read on the workers")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted config overrides, passed to every stage")
    p.add_argument("--out", required=True, help="run folder, on storage every worker sees")
    p.add_argument("-s", "--scheduler", default="local_cwd",
                   help="TorchX scheduler: local_cwd (default), slurm, kubernetes, ...")
    p.add_argument("--cfg", default="",
                   help="scheduler options key=value,... e.g. partition=gpu,time=2:00:00 (slurm), "
                        "queue=default,namespace=ml (kubernetes), log_dir=DIR (local_cwd; default "
                        "OUT/torchx_logs). `torchx runopts SCHEDULER` lists them")
    p.add_argument("--dryrun", action="store_true",
                   help="print each stage's scheduler request (sbatch script, Volcano job, ...) and submit nothing")
    p.add_argument("--stages", help="comma-separated subset of the stages to run, e.g. train-fm,extract")
    p.add_argument("-j", default="1x2", help="nodes x processes of train-fm (default 1x2)")
    p.add_argument("--vm-j", default="1x1",
                   help="nodes x processes of train-vm (default 1x1: train-vm is single-process in this version)")
    p.add_argument("--replicas", type=int,
                   help="replicas of extract, compress, build-sequences (default: the process count of -j)")
    p.add_argument("--image", help="container image with loopfm installed (kubernetes, local_docker)")
    p.add_argument("--h", dest="resource", metavar="NAME",
                   help="named TorchX resource of the compute stages (takes precedence over --cpu/--gpu/--memMB)")
    p.add_argument("--cpu", type=int, help="CPUs per node/replica of the compute stages")
    p.add_argument("--gpu", type=int, help="GPUs per node/replica of the compute stages")
    p.add_argument("--memMB", type=int, help="memory in MB per node/replica of the compute stages")
    p.add_argument("--max-retries", type=int, default=0,
                   help="scheduler restarts of a failed stage (each resumes from its checkpoints)")
    p.add_argument("--mount", action="append", default=[], metavar="SPEC",
                   help="volume for container schedulers, e.g. type=volume,src=claim,dst=/runs (repeatable)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable of every stage (repeatable)")
    p.add_argument("--force", action="store_true", help="redo every stage even if its output is complete")
    p.add_argument("--poll", type=float, default=2.0, help="seconds between status checks (default 2)")
    p.set_defaults(func=cmd_launch)
    return p


def available_stages() -> list[str]:
    """Pipeline stages the ``loopfm`` CLI has a command for, in pipeline order: all of them, since
    the CLI registers one command per entry of the shared list (`loopfm.pipeline.STAGES`)."""
    return list(PIPELINE)


def stage_app(stage: str, args: argparse.Namespace):
    """The TorchX AppDef of one stage, from its component and the launch options."""
    from torchx_components import loopfm as components

    fn = getattr(components, stage.replace("-", "_"))
    kw: dict[str, Any] = {"config": args.config, "out": args.out, "max_retries": args.max_retries}
    if args.image:
        kw["image"] = args.image
    if args.mount:
        kw["mounts"] = [tok for spec in args.mount for tok in spec.split(",")]  # torchx wants tokens
    if args.env:
        kw["env"] = dict(_key_value(e, "--env") for e in args.env)
    if stage in DISTRIBUTED + REPLICATED:  # prepare and report keep their small defaults
        kw.update({k: v for k, v in (("h", args.resource), ("cpu", args.cpu), ("gpu", args.gpu),
                                     ("memMB", args.memMB)) if v is not None})
    if stage in DISTRIBUTED:
        kw["j"] = args.vm_j if stage == "train-vm" else args.j
    if stage in REPLICATED:
        kw["replicas"] = args.replicas or _processes(args.j)
    if args.force:
        kw["force"] = True
    return fn(*args.overrides, **kw)


def cmd_launch(args: argparse.Namespace) -> int:
    """Submit the stages in order through the TorchX runner; 0 if all succeeded (or --dryrun)."""
    from torchx.runner import get_runner

    if args.config is None:
        print("loopfm launch: error: CONFIG is required (e.g. configs/quickstart.yaml)", file=sys.stderr)
        return 2
    _wanted_stages(args.stages)  # a misspelled stage fails before anything else
    if args.scheduler in LOCAL_SCHEDULERS:
        # dist.ddp runs `torchrun`, replicas run `python`: both from this interpreter's environment
        os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    with get_runner() as runner:
        if args.scheduler not in runner.scheduler_backends():
            print(f"loopfm launch: error: unknown scheduler {args.scheduler!r}; "
                  f"choose from {', '.join(sorted(runner.scheduler_backends()))}", file=sys.stderr)
            return 2
        cfg = _scheduler_cfg(runner, args)
        planned = _plan(runner, args, cfg)
        if planned is None:
            return 2
        for stage, info in planned:
            if args.dryrun:
                print(f"[launch] {stage}: dry run on {args.scheduler}\n{info}\n")
            elif not _run_stage(runner, stage, info, args):
                return 1
    if not args.dryrun:
        print(f"[launch] done: outputs in {args.out}")
    return 0


def _plan(runner, args: argparse.Namespace, cfg: dict) -> list | None:
    """(stage, dry-run info) for every wanted stage, built before anything is submitted so that a
    bad option fails first; None after printing an error."""
    from torchx.specs.api import InvalidRunConfigException

    planned = []
    for stage in _wanted_stages(args.stages):
        try:
            planned.append((stage, runner.dryrun(stage_app(stage, args), args.scheduler, cfg=cfg)))
        except (InvalidRunConfigException, ValueError, ImportError) as err:
            hint = " (pip install -e '.[k8s]')" if "kubernetes" in str(err) else ""
            print(f"loopfm launch: error: {stage} on {args.scheduler}: {err}{hint}", file=sys.stderr)
            return None
    return planned


def _run_stage(runner, stage: str, info, args: argparse.Namespace) -> bool:
    """Submit one stage and wait for it; on failure say where its logs are. True if it succeeded."""
    from torchx.specs import AppState

    start = time.perf_counter()
    handle = runner.schedule(info)
    local = args.scheduler in LOCAL_SCHEDULERS
    log_dir = getattr(info.request, "log_dir", None) if local else None
    print(f"[launch] {stage}: submitted {handle}", flush=True)
    if not local:  # a local app is known only to this process, so `torchx log` cannot find it later
        print(f"[launch] {stage}: follow with `torchx log {handle}`", flush=True)
    try:
        status = runner.wait(handle, wait_interval=args.poll)
    except KeyboardInterrupt:
        runner.cancel(handle)
        print(f"[launch] {stage}: interrupted; cancelled {handle}", file=sys.stderr)
        raise
    state = status.state if status is not None else AppState.UNKNOWN
    if state == AppState.SUCCEEDED:
        print(f"[launch] {stage}: SUCCEEDED in {time.perf_counter() - start:.1f}s", flush=True)
        return True
    print(f"[launch] {stage}: {state.name}; stopping (later stages not run)", file=sys.stderr)
    print(f"[launch] app handle: {handle}", file=sys.stderr)
    if log_dir:
        print(f"[launch] logs: {log_dir}", file=sys.stderr)
        for role, dirs in getattr(info.request, "role_log_dirs", {}).items():
            for d in dirs:
                print(f"[launch]   {d}/stderr.log", file=sys.stderr)
    elif args.scheduler == "slurm":
        print("[launch] logs: slurm-<jobid>-<role>-<replica>.{out,err} in the job's directory; "
              f"`torchx log {handle}`", file=sys.stderr)
    else:
        print(f"[launch] logs: `torchx log {handle}`", file=sys.stderr)
    for line in _error_lines(runner, handle, info):
        print(f"[launch]   {line}", file=sys.stderr)
    print(f"[launch] fix the cause and rerun the same command: complete stages are skipped, "
          f"train-fm resumes from its last checkpoint", file=sys.stderr)
    return False


def _error_lines(runner, handle: str, info, limit: int = 8) -> list[str]:
    """The last error-looking lines of each replica's stderr (best effort: some schedulers keep none)."""
    from torchx.schedulers.api import Stream

    found: list[str] = []
    app = info._app
    for role in app.roles if app is not None else []:
        for k in range(role.num_replicas):
            try:
                lines = [ln.rstrip() for ln in runner.log_lines(handle, role.name, k, streams=Stream.STDERR)]
            except Exception as err:  # noqa: BLE001 - logs are a courtesy; the state is the answer
                return [f"(could not read the logs: {err})"]
            hits = [_strip_rank(ln) for ln in lines if _ERROR.search(ln) and not _NOISE.search(ln)]
            for ln in dict.fromkeys(hits[-limit:]):  # each rank repeats the same message
                found.append(f"{role.name}/{k}: {ln}")
    return found[-limit:]


# "loopfm train-fm: error: ...", "ValueError: ...", "ConfigError: ..." - not torchrun's own summary
_ERROR = re.compile(r"error: |\b[A-Z]\w*(Error|Exception): ")
_NOISE = re.compile(r"ChildFailedError|error_file|errors\.html|torch\.distributed\.elastic|^\s*raise ")
_RANK_PREFIX = re.compile(r"^(\[\d+\]:)?(\[rank\d+\]:)?\s*")


def _strip_rank(line: str) -> str:
    return _RANK_PREFIX.sub("", line)


def _wanted_stages(stages: str | None) -> list[str]:
    if not stages:
        return list(PIPELINE)
    names = [s.strip() for s in stages.split(",") if s.strip()]
    for s in names:
        if s not in PIPELINE:
            near = difflib.get_close_matches(s, PIPELINE, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise SystemExit(f"loopfm launch: error: unknown stage {s!r}{hint}; stages: {', '.join(PIPELINE)}")
    return [s for s in PIPELINE if s in names]


def _scheduler_cfg(runner, args: argparse.Namespace) -> dict:
    """--cfg parsed and checked against the scheduler's run options (TorchX drops unknown keys
    silently), then completed from ~/.torchxconfig and ./.torchxconfig as `torchx run` does."""
    from torchx.runner import config

    opts = runner.scheduler_run_opts(args.scheduler)
    known = [name for name, _ in opts]
    for pair in filter(None, (p.strip() for p in args.cfg.replace(";", ",").split(","))):
        key = pair.split("=", 1)[0]
        if "=" in pair and key not in known:
            near = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise SystemExit(f"loopfm launch: error: {args.scheduler} has no option {key!r}{hint}; "
                             f"options: {', '.join(known)}")
    cfg = dict(opts.cfg_from_str(args.cfg))
    if cfg.get("job_dir"):  # torchx copies the workspace into a job_dir that must not exist yet: one stage only
        raise SystemExit("loopfm launch: error: job_dir is not supported (every stage would need a fresh copy "
                         "of the checkout); launch runs the jobs in the current directory, where slurm "
                         "writes slurm-<jobid>-<role>-<replica>.out")
    if args.scheduler in LOCAL_SCHEDULERS and "log_dir" not in cfg:
        cfg["log_dir"] = str(Path(args.out) / "torchx_logs")  # keep the logs next to the outputs
    config.apply(scheduler=args.scheduler, cfg=cfg)  # fills options unset so far from .torchxconfig files
    return cfg


def _processes(j: str) -> int:
    from torchx.components.dist import parse_nnodes

    _, max_nnodes, nproc, _ = parse_nnodes(j)
    return max_nnodes * nproc


def _key_value(text: str, flag: str) -> tuple[str, str]:
    if "=" not in text:
        raise SystemExit(f"loopfm launch: error: {flag} expects KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key, value


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m loopfm.launch``) until the CLI wires `add_launch_parser`."""
    parser = argparse.ArgumentParser(prog="loopfm")
    add_launch_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
