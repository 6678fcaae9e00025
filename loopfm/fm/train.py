"""`loopfm train-fm`: train the FM on the training days, evaluate it on each later day.

One entry point, `train_fm`, wired in a fixed order: process group -> model -> sharding plan +
DMP -> optimizers -> data -> checkpointer -> metrics logger -> loop -> evaluation -> output.
The same code runs in one process or under ``torchrun`` (each rank reads its slice of every
global batch; see `loopfm.fm.batch`).

Folders (``OUT`` is ``RUN_DIR/fm``):

    RUN_DIR/fm.work/   while training: checkpoints/, plan.json, run.json, tb/, metrics.jsonl;
                       ``--resume`` continues from its latest checkpoint; removed once OUT is done
    RUN_DIR/fm/        written atomically at the end (`loopfm.artifacts`): model.pt (unsharded
                       state dict, FM + autoencoder), fm_config.json, schema.json, plan.json,
                       eval.json (per eval day: auc, logloss, ne, rows), metrics.jsonl, tb/,
                       checkpoints/ (the last one), config.yaml, _SUCCESS; with
                       fm.train.refresh_days also daily/day=K/model.pt (the FM refreshed through
                       day K) and, in _SUCCESS, eval_fresh (each refreshed FM on the next day)
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.optim.optimizers import in_backward_optimizer_filter
from loopfm.progress import progress_bar

from loopfm.artifacts import atomic_output, read_json, write_json_atomic, write_manifest
from loopfm.data.eventlog import EventLog
from loopfm.fm.batch import BatchBuilder, iter_batches, num_global_batches
from loopfm.fm.checkpoint import Checkpointer
from loopfm.fm.config import FMConfig, FMConfigError, TrainConfig
from loopfm.fm.features import ArchitectureWarning, FeatureLayout, architecture_warnings, select_features
from loopfm.fm.model import FoundationModel
from loopfm.fm.parallelize import parallelize, plan_summary, plan_to_json
from loopfm.fm.weights import fm_config_from_dict, load_trained_fm  # noqa: F401  (re-exported)
from loopfm.metrics import defined_metrics
from loopfm.tracking import MetricLogger, build_logger


@dataclass
class DistContext:
    rank: int
    world_size: int
    device: torch.device
    owned: bool  # this module created the process group (and destroys it)


def train_fm(cfg: FMConfig, data_dir: str | Path, out_dir: str | Path, *, seed: int, config_hash: str,
             config_yaml: str | None = None, resume: bool = False, progress: bool = True) -> dict | None:
    """Train, evaluate and write ``out_dir``; returns the eval metrics (None if stopped by max_steps)."""
    out_dir = Path(out_dir)
    work = out_dir.parent / f"{out_dir.name}.work"
    ctx = init_distributed(cfg.parallel.device, cfg.parallel.cpu_threads)  # 1. process group
    kept = keep_freed_memory()
    logger: MetricLogger | None = None
    try:
        log = EventLog(data_dir)
        _check_protocol(cfg.train, log, ctx.world_size)
        features = select_features(log.schema, cfg.model)
        layout = FeatureLayout.build(features, cfg.model.sequence_group)
        if ctx.rank == 0:
            for message in architecture_warnings(features, layout, cfg.model):
                warnings.warn(message, ArchitectureWarning, stacklevel=2)
        torch.manual_seed(seed)  # 2. model: identical on every rank, independent of the world size
        model = FoundationModel(layout, cfg.model, cfg.autoencoder)
        latest = _prepare_work(work, ctx, resume, config_hash, config_yaml)
        plan = json.loads((work / "plan.json").read_text()) if latest else None
        dmp = parallelize(model, cfg.parallel, cfg.optimizer, ctx.device, plan=plan)  # 3. plan + DMP
        if ctx.rank == 0 and plan is None:
            write_json_atomic(work / "plan.json", plan_to_json(dmp), indent=1)
        dense_params = [p for _, p in in_backward_optimizer_filter(dmp.named_parameters())]
        # 4. optimizers; fused Adam: one kernel over all dense parameters instead of a per-tensor loop
        dense_opt = torch.optim.Adam(dense_params, lr=cfg.optimizer.dense_lr, fused=True)
        torch.manual_seed(seed + 1 + ctx.rank)  # per-rank stream (dropout); checkpointed
        builder = BatchBuilder(layout, ctx.rank, ctx.world_size)  # 5. data
        ckpt = Checkpointer(work / "checkpoints", ctx.rank, ctx.world_size, cfg.train.keep_checkpoints)  # 6.
        position = {"epoch": 0, "day_index": 0, "batch_in_day": 0, "step": 0}
        if latest:
            position = ckpt.load(dmp, dmp.fused_optimizer, dense_opt)
            _print(ctx, f"resuming from {work / 'checkpoints' / latest['dir']} (step {position['step']})")
        logger = build_logger(work, ctx.rank, resume_step=position["step"] if latest else None)  # 7.
        _print(ctx, f"train-fm: {ctx.world_size} process(es) on {ctx.device}, plan {plan_summary(dmp)}")
        finished = _train_loop(cfg.train, dmp, dense_opt, log, builder, ckpt, logger, position, ctx, progress)
        if not finished:
            return None
        metrics = evaluate(dmp, log, cfg.train.eval_days, cfg.train.eval_batch_size, builder, ctx)
        if ctx.rank == 0:
            step = position["step"]
            logger.log({f"eval/day{d}/{k}": v for d, m in metrics.items() for k, v in m.items()}, step)
        logger.close()
        logger = None
        full = full_state_dict(dmp, ctx.rank, ctx.device)  # the fixed FM, before any refresh
        fresh = None
        if cfg.train.refresh_days:  # 8. the daily incremental updates (extract.fm_checkpoint=daily)
            fresh = refresh_daily(cfg.train, dmp, dense_opt, log, builder, work / "daily", ctx, progress)
        if ctx.rank == 0:
            _publish(out_dir, work, full, cfg, log, metrics, config_hash, config_yaml, ctx, fresh)
        _barrier()
        return metrics
    finally:
        if logger is not None:
            logger.close()
        if ctx.owned:
            dist.destroy_process_group()
        if kept:
            give_back_freed_memory()


_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # <malloc.h>


def keep_freed_memory() -> bool:
    """Let glibc keep freed memory for reuse instead of returning it to the system, while the FM
    trains (`give_back_freed_memory` undoes it); False where the C library is not glibc (nothing
    changes there).

    By default glibc maps every large block (any tensor above a few hundred KB) afresh and unmaps
    it when freed, so each training step page-faults and zero-fills its activations again: about
    15% of the FM's CPU step (system time). With the thresholds raised, freed blocks stay in the
    heap and the next step reuses them."""
    return _mallopt({_M_MMAP_THRESHOLD: 256 << 20, _M_TRIM_THRESHOLD: 1 << 30, _M_TOP_PAD: 64 << 20})


def give_back_freed_memory() -> None:
    """glibc's documented defaults again (128 KiB each), and the free heap returned to the system,
    so that later stages of the same process (``loopfm run``) run as before."""
    if _mallopt({_M_MMAP_THRESHOLD: 128 << 10, _M_TRIM_THRESHOLD: 128 << 10, _M_TOP_PAD: 128 << 10}):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _mallopt(settings: dict[int, int]) -> bool:
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return all([mallopt(option, value) == 1 for option, value in settings.items()])


def init_distributed(device: str, threads: int = 0) -> DistContext:
    """gloo on CPU, nccl on GPU; env:// under torchrun, else a one-process group."""
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        raise RuntimeError("fm.parallel.device=cuda but no CUDA device is available")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if threads:
        torch.set_num_threads(threads)
    elif "OMP_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    dev = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    if dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), dev, owned=False)
    backend = "nccl" if cuda else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend)
        return DistContext(dist.get_rank(), dist.get_world_size(), dev, owned=True)
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)  # in-memory store
    return DistContext(0, 1, dev, owned=True)


def _check_protocol(cfg: TrainConfig, log: EventLog, world_size: int) -> None:
    missing = [d for d in (*cfg.train_days, *cfg.eval_days, *cfg.refresh_days) if d not in log.days]
    if missing:
        raise FMConfigError(f"fm.train: days {missing} are not in the event log {log.root} (days: {log.days})")
    for name in ("batch_size", "eval_batch_size"):
        if getattr(cfg, name) % world_size:
            raise FMConfigError(f"fm.train.{name}={getattr(cfg, name)} must divide by the number of "
                             f"processes ({world_size}): each rank takes an equal slice of a global batch")


def _prepare_work(work: Path, ctx: DistContext, resume: bool, config_hash: str,
                  config_yaml: str | None = None) -> dict | None:
    """Fresh work folder, or the latest checkpoint's record when resuming (same config only)."""
    latest, error = None, None
    if ctx.rank == 0:
        run = work / "run.json"
        if resume and run.is_file():
            latest = Checkpointer(work / "checkpoints").latest()
            record = read_json(run)
            if latest is not None and record.get("config_hash") != config_hash:
                error = (f"{work} holds a checkpoint of another config ({_changed(record.get('config'), config_yaml)}); "
                         "rerun with --force to start the FM over (or restore the config to resume)")
        if resume and latest is None:
            print(f"train-fm: no checkpoint in {work}; starting from the beginning", flush=True)
        if latest is None and error is None:
            if work.exists():
                shutil.rmtree(work)
            work.mkdir(parents=True)
            write_json_atomic(run, {"config_hash": config_hash, "world_size": ctx.world_size, "config": config_yaml})
    box = [latest, error]
    if ctx.world_size > 1:  # every rank learns the outcome (and fails together)
        dist.broadcast_object_list(box, src=0)
    if box[1]:
        raise ValueError(box[1])
    return box[0]


def _changed(old_yaml: str | None, new_yaml: str | None) -> str:
    """"changed: key, key" between two resolved configs, over what identifies the FM (seed, data, fm)."""
    import yaml

    from loopfm.config import changed_keys

    if not old_yaml or not new_yaml:
        return "its config was not recorded"
    keys = [k for k in changed_keys(yaml.safe_load(old_yaml), yaml.safe_load(new_yaml))
            if k.split(".")[0] in ("seed", "data", "fm") and k != "fm.train.max_steps"]
    return f"changed: {', '.join(keys)}" if keys else "the input files changed"


def _train_loop(cfg: TrainConfig, dmp, dense_opt, log: EventLog, builder: BatchBuilder, ckpt: Checkpointer,
                logger: MetricLogger, position: dict, ctx: DistContext, progress: bool) -> bool:
    """One pass per epoch over the training days in time order; False if stopped by max_steps."""
    pipeline = TrainPipelineSparseDist(dmp, dense_opt, ctx.device)
    G, days = cfg.batch_size, cfg.train_days
    per_day = [num_global_batches(log, d, G) for d in days]
    step = position["step"]
    bar = progress_bar(total=cfg.epochs * sum(per_day) * G, initial=step * G, unit=" ex", unit_scale=True,
                       desc="train-fm", enabled=progress and ctx.rank == 0, smoothing=0.1)
    window = torch.zeros(2, device=ctx.device)
    t0, n0 = time.perf_counter(), step
    for epoch in range(position["epoch"], cfg.epochs):
        for di in range(len(days)):
            if (epoch, di) < (position["epoch"], position["day_index"]):
                continue
            k = position["batch_in_day"] if (epoch, di) == (position["epoch"], position["day_index"]) else 0
            batches = iter_batches(log, [days[di]], G, builder, skip=k)
            while True:
                try:
                    _, aux = pipeline.progress(batches)  # the model output (logits, aux)
                except StopIteration:
                    break
                step, k = step + 1, k + 1
                bar.update(G)
                window += torch.stack([aux["fm_loss"], aux.get("ae_loss", torch.zeros((), device=ctx.device))])
                if step % cfg.log_every_steps == 0:  # examples/s over the last window of steps
                    _log_train(logger, window / (step - n0), step, (step - n0) * G / (time.perf_counter() - t0))
                    window.zero_()
                    t0, n0 = time.perf_counter(), step
                if cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0 and k < per_day[di]:
                    ckpt.save(step, dmp, dmp.fused_optimizer, dense_opt,
                              {"epoch": epoch, "day_index": di, "batch_in_day": k, "step": step})
                if cfg.max_steps and step >= cfg.max_steps:
                    bar.close()
                    return False
            nxt = (epoch, di + 1) if di + 1 < len(days) else (epoch + 1, 0)
            ckpt.save(step, dmp, dmp.fused_optimizer, dense_opt,  # day end
                      {"epoch": nxt[0], "day_index": nxt[1], "batch_in_day": 0, "step": step})
            pipeline.detach()  # the next day's iterator re-attaches it
    bar.close()
    position["step"] = step
    return True


def refresh_daily(cfg: TrainConfig, dmp, dense_opt, log: EventLog, builder: BatchBuilder, folder: Path,
                  ctx: DistContext, progress: bool) -> dict[str, dict[str, float]]:
    """Go on training one streaming pass per ``cfg.refresh_days`` day, in order, saving the
    unsharded FM after each day as ``folder/day=K/model.pt`` (the FM "as of the end of day K").

    Each snapshot is evaluated on the next day when that is an eval day, so the fresh FM's soft
    labels can be compared with the fixed FM's: returns ``{str(K + 1): metrics}``. Not
    checkpointed: a killed run resumes from the end of the training days and redoes the refresh
    (the same numbers, the optimizer and RNG states being restored).
    """
    pipeline = TrainPipelineSparseDist(dmp, dense_opt, ctx.device)
    fresh: dict[str, dict[str, float]] = {}
    bar = progress_bar(total=log.num_rows(cfg.refresh_days), unit=" ex", unit_scale=True, desc="refresh-fm",
                       enabled=progress and ctx.rank == 0)
    for day in cfg.refresh_days:
        batches = iter_batches(log, [day], cfg.batch_size, builder)
        while True:
            try:
                pipeline.progress(batches)
            except StopIteration:
                break
            bar.update(cfg.batch_size)
        pipeline.detach()
        state = full_state_dict(dmp, ctx.rank, ctx.device)
        if ctx.rank == 0:
            (folder / f"day={day}").mkdir(parents=True, exist_ok=True)
            torch.save(state, folder / f"day={day}" / "model.pt")
        if day + 1 in cfg.eval_days:  # collective; every rank gets the same numbers
            fresh[str(day + 1)] = evaluate(dmp, log, [day + 1], cfg.eval_batch_size, builder, ctx)[str(day + 1)]
    bar.close()
    return fresh


def _log_train(logger: MetricLogger, mean: torch.Tensor, step: int, examples_per_s: float) -> None:
    # Each rank's loss is its share of the global-batch mean: the sum over ranks is the mean.
    total = mean.clone()
    if dist.get_world_size() > 1:
        dist.all_reduce(total)
    total = total.tolist()
    logger.log({"train/loss": total[0], "train/ae_loss": total[1], "train/examples_per_s": examples_per_s}, step)


@torch.no_grad()
def evaluate(dmp, log: EventLog, days: list[int], batch_size: int, builder: BatchBuilder,
             ctx: DistContext) -> dict[str, dict[str, float]]:
    """AUC, LogLoss, NE and row count per eval day (``{"5": {...}}``), the same on every rank; an
    undefined metric is None with its reason under ``"undefined"`` (`loopfm.metrics.defined_metrics`)."""
    dmp.eval()
    out: dict[str, dict[str, float]] = {}
    for day in days:
        preds, labels = [], []
        for batch in iter_batches(log, [day], batch_size, builder):
            batch = batch.to(ctx.device)
            _, (logits, _) = dmp(batch)
            real = batch.weights > 0
            preds.append(torch.sigmoid(logits)[real])
            labels.append(batch.labels[real])
        p, y = _gather(torch.cat(preds)), _gather(torch.cat(labels))
        if ctx.rank == 0:
            # A day with one class has no AUC / NE: null with the reason, not a crash.
            out[str(day)] = {**defined_metrics(y.cpu().numpy(), p.double().cpu().numpy()), "rows": int(y.numel())}
    dmp.train()
    box = [out]
    if ctx.world_size > 1:  # every rank returns the same metrics
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenation over ranks (rank order) of 1-D tensors of any lengths."""
    world = dist.get_world_size()
    if world == 1:
        return t
    n = torch.tensor([t.numel()], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=t.dtype, device=t.device)
    padded[:t.numel()] = t
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:int(s.item())] for p, s in zip(parts, sizes)])


def full_state_dict(dmp, rank: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The unsharded model state on CPU (complete on rank 0, empty elsewhere); a collective call."""
    out: dict[str, torch.Tensor] = {}
    for key, value in dmp.state_dict().items():
        if hasattr(value, "local_shards"):
            full = torch.empty(value.size(), dtype=value.dtype, device=device) if rank == 0 else None
            value.gather(dst=0, out=full)
            if rank == 0:
                out[key] = full.cpu()
        elif rank == 0:
            out[key] = value.detach().cpu().clone()
    return out


def _publish(out_dir: Path, work: Path, full: dict, cfg: FMConfig, log: EventLog, metrics: dict,
             config_hash: str, config_yaml: str | None, ctx: DistContext, fresh: dict | None = None) -> None:
    latest = Checkpointer(work / "checkpoints").latest()
    extra = {} if fresh is None else {"refresh_days": cfg.train.refresh_days, "eval_fresh": fresh}
    with atomic_output(out_dir) as tmp:
        torch.save(full, tmp / "model.pt")
        if fresh is not None:
            shutil.copytree(work / "daily", tmp / "daily", copy_function=_link_or_copy)
        (tmp / "fm_config.json").write_text(json.dumps(asdict(cfg), indent=2))
        log.schema.save(tmp / "schema.json")
        (tmp / "eval.json").write_text(json.dumps(metrics, indent=2))
        if config_yaml is not None:
            (tmp / "config.yaml").write_text(config_yaml)
        for name in ("plan.json", "metrics.jsonl"):
            shutil.copy2(work / name, tmp / name)
        if (work / "tb").is_dir():
            shutil.copytree(work / "tb", tmp / "tb")
        if latest is not None:  # hard links: no copy of a large checkpoint, and the work folder stays valid
            shutil.copytree(work / "checkpoints" / latest["dir"], tmp / "checkpoints" / latest["dir"],
                            copy_function=_link_or_copy)
            (tmp / "checkpoints" / "LATEST").write_text(json.dumps(latest))
        write_manifest(tmp, stage="train-fm", config_hash=config_hash, data=str(log.root),
                       world_size=ctx.world_size, steps=latest["step"] if latest else 0, eval=metrics,
                       **extra)
    shutil.rmtree(work, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _barrier() -> None:
    if dist.get_world_size() > 1:
        dist.barrier()


def _print(ctx: DistContext, msg: str) -> None:
    if ctx.rank == 0:
        print(msg, flush=True)


def fm_hash_payload(cfg: FMConfig) -> dict:
    """What identifies a trained FM: the config without run controls (``max_steps``), so that a
    stopped run resumes under the same hash."""
    data = asdict(cfg)
    data["train"].pop("max_steps")
    return data
