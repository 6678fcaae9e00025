"""The VM stage: every configured vertical model × variant × seed, one streaming pass over the
VM training days (default 5–7), tested on the test day (default 8).

Inputs are the earlier stages' artefacts, joined by example id: the event log (VM-visible
features only), the extract output (the FM's soft labels, for KD), the sequences (the LoopFM
channel, user-keyed, built from strictly earlier events) and, for ``kd+current`` only, the
compress output (the FM's code of the example itself, table 2's real-time-FM comparison).
Batches are built once and shared by every run, so runs differ only in model, variant and seed.
The runs are independent: under torchrun, rank r of W trains runs r, r+W, ... and rank 0 merges
the predictions (`run_train_vm`), giving exactly the output of one process.

Output ``RUN/vm/``: ``predictions.parquet`` (example_id, label, user_id, one float column per run
``model/variant/seed``), ``runs.json`` (per-run test metrics and training facts), ``models/`` (each
trained VM, `loopfm.vm.checkpoint`: what `loopfm export` serves), ``_SUCCESS``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from loopfm.progress import progress_bar, write

from loopfm.artifacts import atomic_output, read_manifest, write_manifest
from loopfm.vm.checkpoint import save_checkpoints, vm_checkpoint
from loopfm.vm.kd import TABLE1_VARIANTS, VARIANTS, KDConfig, uses_current_code, variant_flags
from loopfm.vm.model import VMModelConfig
from loopfm.vm.train import VMTrainConfig, resolve_device


@dataclass(kw_only=True)
class VMStageConfig:
    """Which VMs to train and compare (`loopfm.stages.train_vm`)."""
    models: list[str] = field(default_factory=lambda: ["deepfm", "din", "dmin"], metadata={
        "help": "architectures to train (fm, fmfm, deepfm, din, dien, dmr, dmin)"})
    variants: list[str] = field(default_factory=lambda: list(TABLE1_VARIANTS), metadata={
        "help": "baseline | kd | loopfm | kd+loopfm (table 1 of the paper) | kd+current (KD and the "
                "FM's code of the example itself as a feature: table 2, needs a real-time FM)"})
    train_days: list[int] = field(default_factory=lambda: [5, 6, 7], metadata={
        "help": "days of the one streaming pass (no shuffle)"})
    test_day: int = field(default=8, metadata={"help": "day the metrics are reported on"})
    seeds: int = field(default=1, metadata={"help": "repeat every run with this many seeds (table 9)"})
    sequence_key: str = field(default="user", metadata={"help": "which timelines feed the VM: user or item"})
    raw_seq_feature: str = field(default="", metadata={
        "help": "event-log column of past item ids fed to the VM as a raw-ID sequence (table 4: raw "
                "vs LoopFM vs both; e.g. hist_item_id on MovieLens); needs vm.model.raw_seq=true"})
    threads: int = field(default=1, metadata={
        "help": "torch threads per run (small VMs run fastest single-threaded on a shared CPU)"})
    model: VMModelConfig = field(default_factory=VMModelConfig)
    train: VMTrainConfig = field(default_factory=VMTrainConfig)
    kd: KDConfig = field(default_factory=KDConfig)

    def __post_init__(self) -> None:
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad or not self.variants:
            raise ValueError(f"vm.variants must be among {list(VARIANTS)}, got {self.variants}")
        if self.test_day in self.train_days:
            raise ValueError(f"vm.test_day {self.test_day} is also a training day {self.train_days}")
        if self.seeds < 1 or self.threads < 1:
            raise ValueError("vm.seeds and vm.threads must be >= 1")
        if not self.models:
            raise ValueError("vm.models must name at least one model")
        if bool(self.raw_seq_feature) != self.model.raw_seq:
            raise ValueError("vm.raw_seq_feature and vm.model.raw_seq=true go together (the column to "
                             "read and the model's switch to read it)")


def run_name(model: str, variant: str, seed: int) -> str:
    """``model/variant/seed``: a run's column in predictions.parquet and its folder under models/."""
    return f"{model}/{variant}/{seed}"


@dataclass(frozen=True)
class VMJob:
    """One independent run of the stage: a model, a variant and a seed."""
    index: int  # position in the stage's run list (fixes the output column order)
    model: str
    variant: str
    seed: int

    @property
    def name(self) -> str:
        return run_name(self.model, self.variant, self.seed)


def vm_jobs(cfg: VMStageConfig) -> list[VMJob]:
    """Every (model, variant, seed) of the stage, in output order."""
    combos = [(m, v, s) for m in cfg.models for v in cfg.variants for s in range(cfg.seeds)]
    return [VMJob(i, m, v, s) for i, (m, v, s) in enumerate(combos)]


def train_one(cfg: VMStageConfig, job: VMJob, schema, train: list, test: list, *, logger=None) -> tuple:
    """Train and test one run: (VMResult, its runs.json record). Depends on nothing but its
    arguments, so any process can run any job and get the same predictions."""
    from loopfm.vm.train import run_vm

    start = time.perf_counter()
    result = run_vm(dataclasses.replace(cfg.model, model=job.model),
                    dataclasses.replace(cfg.train, seed=cfg.train.seed + job.seed), cfg.kd, schema,
                    train, test, variant=job.variant, logger=logger, prefix=f"vm/{job.name}/")
    record = {"model": job.model, "variant": job.variant, "seed": job.seed, "metrics": result.metrics,
              "steps": result.steps, "train_loss": result.train_loss,
              "seconds": time.perf_counter() - start}
    return result, record


def process_rank() -> tuple[int, int]:
    """(rank, world size) of this process: torchrun's RANK / WORLD_SIZE, else (0, 1)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def run_train_vm(cfg: VMStageConfig, run_dir: str | Path, out_dir: str | Path, *, config_hash: str,
                 logger=None, progress: bool = True, rank: int | None = None,
                 world_size: int | None = None) -> dict:
    """Train and test every (model, variant, seed); write ``out_dir`` atomically.

    Under torchrun (or with ``rank``/``world_size``) the runs are shared out: rank r of W trains
    runs r, r+W, ... and writes its predictions to ``OUT.work/rank-r``; after a barrier rank 0
    merges them, in run order, into ``out_dir``. Every run seeds itself, so W processes give
    exactly the predictions of one. Returns the manifest (on every rank).
    """
    from loopfm.data.eventlog import EventLog

    env_rank, env_world = process_rank()
    rank = env_rank if rank is None else rank
    world_size = env_world if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    log = EventLog(run_dir / "data")
    for m in cfg.models:  # fail on a typo before any work
        dataclasses.replace(cfg.model, model=m)
    needs_seq = any(variant_flags(v)[1] for v in cfg.variants)
    needs_kd = any(variant_flags(v)[0] for v in cfg.variants)
    needs_current = any(uses_current_code(v) for v in cfg.variants)
    inputs = VMInputs(run_dir, log, cfg, needs_seq, needs_kd, needs_current)
    train = inputs.batches(cfg.train_days)
    test = inputs.batches([cfg.test_day])
    if world_size > 1 and cfg.train.device in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    device = resolve_device(cfg.train.device)
    if device.type == "cuda":  # pinned once, shared by every run: their copies to the GPU are async
        train, test = [b.pin_memory() for b in train], [b.pin_memory() for b in test]
    jobs = vm_jobs(cfg)[rank::world_size]
    preds: dict[str, np.ndarray] = {}
    checkpoints: dict[str, dict] = {}
    runs: list[dict] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        desc = "train-vm" if world_size == 1 else f"train-vm rank {rank}/{world_size}"
        for job in progress_bar(jobs, desc=desc, unit=" run", enabled=progress):
            result, record = train_one(cfg, job, log.schema, train, test, logger=logger)
            preds[job.name] = result.preds.astype(np.float32)
            checkpoints[job.name] = vm_checkpoint(result.model)
            runs.append({"index": job.index, **record})
            if progress:
                shown = {k: "n/a" if result.metrics[k] is None else f"{result.metrics[k]:.4f}" for k in ("auc", "ne")}
                write(f"  {job.name:28s} auc {shown['auc']}  ne {shown['ne']}")
    finally:
        torch.set_num_threads(threads)
    key = dict(example_id=np.concatenate([b.example_ids.numpy() for b in test]),
               label=np.concatenate([b.labels.numpy() for b in test]).astype(np.int8),
               user_id=np.concatenate([b.user_ids.numpy() for b in test]))
    facts = dict(test_day=cfg.test_day, train_days=cfg.train_days, test_rows=int(len(key["label"])),
                 quantizer=inputs.quantizer, sequence_key=cfg.sequence_key)
    if world_size == 1:
        return _write_vm(out_dir, key, preds, runs, config_hash, facts, checkpoints=checkpoints)
    return _merge_ranks(out_dir, rank, world_size, key, preds, runs, config_hash, facts, checkpoints)


def _write_vm(out_dir: Path, key: dict, preds: dict, runs: list[dict], config_hash: str, facts: dict, *,
              checkpoints: dict[str, dict] | None = None, model_dirs: list[Path] = ()) -> dict:
    """``predictions.parquet`` (key columns, then one column per run in run order), runs.json, manifest."""
    order = sorted(range(len(runs)), key=lambda i: runs[i]["index"])
    runs = [{k: v for k, v in runs[i].items() if k != "index"} for i in order]
    names = [f"{r['model']}/{r['variant']}/{r['seed']}" for r in runs]
    with atomic_output(out_dir) as tmp:
        pq.write_table(pa.table({**key, **{n: preds[n] for n in names}}), tmp / "predictions.parquet")
        (tmp / "runs.json").write_text(json.dumps(runs, indent=2))
        for folder in model_dirs:  # the ranks' saved VMs (names are unique across ranks)
            shutil.copytree(folder, tmp / "models", dirs_exist_ok=True)
        save_checkpoints(tmp, checkpoints or {})
        return write_manifest(tmp, stage="train-vm", config_hash=config_hash, runs=len(runs), **facts)


def _merge_ranks(out_dir: Path, rank: int, world_size: int, key: dict, preds: dict, runs: list[dict],
                 config_hash: str, facts: dict, checkpoints: dict[str, dict]) -> dict:
    """Each rank writes its runs to ``OUT.work/rank-R``; rank 0 merges them into ``out_dir``."""
    import torch.distributed as dist

    own_group = not dist.is_initialized()
    if own_group:  # a CPU group is enough for two barriers, whatever device trains
        dist.init_process_group("gloo")
    try:
        work = out_dir.parent / f"{out_dir.name}.work"
        part = work / f"rank-{rank}"
        with atomic_output(part) as tmp:
            pq.write_table(pa.table(preds or {"_": np.zeros(0, np.float32)}), tmp / "predictions.parquet")
            (tmp / "runs.json").write_text(json.dumps(runs))
            save_checkpoints(tmp, checkpoints)
            write_manifest(tmp, stage="train-vm-part", config_hash=config_hash, rank=rank, world_size=world_size)
        dist.barrier()
        if rank == 0:
            all_preds: dict[str, np.ndarray] = {}
            all_runs: list[dict] = []
            for r in range(world_size):
                folder = work / f"rank-{r}"
                if read_manifest(folder).get("config_hash") != config_hash:
                    raise RuntimeError(f"{folder} was written for another config")
                part_runs = json.loads((folder / "runs.json").read_text())
                table = pq.read_table(folder / "predictions.parquet")
                for record in part_runs:
                    name = run_name(record["model"], record["variant"], record["seed"])
                    all_preds[name] = table.column(name).to_numpy()
                all_runs.extend(part_runs)
            model_dirs = [work / f"rank-{r}" / "models" for r in range(world_size)]
            _write_vm(out_dir, key, all_preds, all_runs, config_hash, facts,
                      model_dirs=[d for d in model_dirs if d.is_dir()])
            shutil.rmtree(work, ignore_errors=True)
        dist.barrier()  # every rank returns once the merged output exists
        return read_manifest(out_dir)
    finally:
        if own_group:
            dist.destroy_process_group()


class VMInputs:
    """Builds VMBatches with soft labels, LoopFM sequences and (table 2) each example's own
    FM code attached, by example id."""

    def __init__(self, run_dir: Path, log, cfg: VMStageConfig, needs_seq: bool, needs_kd: bool,
                 needs_current: bool = False) -> None:
        from loopfm.stages.compress import load_spec

        self.log, self.cfg = log, cfg
        self.soft = soft_labels(run_dir / "extract", log.num_rows()) if needs_kd else None
        self.reader = self.spec = self.current = None
        self.quantizer = None
        if needs_seq or needs_current:
            self.spec = load_spec(run_dir / "compress")
            self.quantizer = self.spec.quantizer
        if needs_seq:
            from loopfm.stages.sequences import SequenceReader

            self.reader = SequenceReader(run_dir / "sequences", key=cfg.sequence_key)
        if needs_current:
            self.current = _packed_codes(run_dir / "compress", log.num_rows(), self.spec.code_bytes)

    def batches(self, days: list[int]) -> list:
        from loopfm.codes.inputs import attach_codes, current_code_values
        from loopfm.vm.batch import iter_vm_batches

        out = []
        raw = self.cfg.raw_seq_feature or None
        for b in iter_vm_batches(self.log, days, self.cfg.train.batch_size, raw_seq_feature=raw):
            ids = b.example_ids.numpy()
            if self.soft is not None:
                soft = self.soft[ids]
                if np.isnan(soft).any():
                    raise ValueError(f"no soft label for {int(np.isnan(soft).sum())} examples of days {days}: "
                                     "extract.days must cover the VM's training and test days")
                b = dataclasses.replace(b, soft_labels=torch.from_numpy(soft))
            if self.current is not None:
                codes, present = self.current
                if not present[ids].all():
                    raise ValueError(f"no FM code for {int((~present[ids]).sum())} examples of days {days}: "
                                     "extract.days must cover the VM's training and test days")
                b = dataclasses.replace(b, current_code=current_code_values(self.spec, codes[ids]))
            if self.reader is not None:
                seq = self.reader.gather(ids, layout="padded")
                b = attach_codes(b, seq.codes, seq.lengths, seq.deltas, self.spec)
            out.append(b)
        if not out:
            raise ValueError(f"the event log has no rows on days {days}")
        return out


def _packed_codes(compress_dir: Path, num_examples: int, code_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """Every example's packed code (uint8 [num_examples, code_bytes]) and whether it has one."""
    from loopfm.stages.codes_format import CODE_COLUMN, bytes_from_arrow, read_codes

    read_manifest(compress_dir)
    t = read_codes(compress_dir, columns=["example_id", CODE_COLUMN])
    codes = np.zeros((num_examples, code_bytes), dtype=np.uint8)
    present = np.zeros(num_examples, dtype=bool)
    ids = t.column("example_id").to_numpy()
    codes[ids] = bytes_from_arrow(t.column(CODE_COLUMN))
    present[ids] = True
    return codes, present


def soft_labels(extract_dir: Path, num_examples: int, days: list[int] | None = None) -> np.ndarray:
    """The FM's predicted probability per example id (NaN where the extract did not log it), from
    ``days`` only (default: every extract day)."""
    from loopfm.stages.codes_format import read_codes, stage_days

    have = stage_days(read_manifest(extract_dir))
    missing = sorted(set(days or []) - set(have))
    if missing:
        raise ValueError(f"{extract_dir} has no soft labels for days {missing} (extract.days was {have}): "
                         "add them to extract.days and rerun extract")
    t = read_codes(extract_dir, days=days, columns=["example_id", "soft_label"])
    soft = np.full(num_examples, np.nan, dtype=np.float32)
    soft[t.column("example_id").to_numpy()] = t.column("soft_label").to_numpy()
    return soft
