"""The VM stage: every configured vertical model × variant × seed, one streaming pass over the
VM training days (default 5–7), tested on the test day (default 8).

Inputs are the earlier stages' artefacts, joined by example id: the event log (VM-visible
features only), the extract output (the FM's soft labels, for KD), the sequences (the LoopFM
channel, user-keyed, built from strictly earlier events) and, for ``kd+current`` only, the
compress output (the FM's code of the example itself, table 2's real-time-FM comparison).
Batches are built once and shared by every run, so runs differ only in model, variant and seed.

Output ``RUN/vm/``: ``predictions.parquet`` (example_id, label, user_id, one float column per run
``model/variant/seed``), ``runs.json`` (per-run test metrics and training facts), ``_SUCCESS``.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from loopfm.artifacts import atomic_output, read_manifest, write_manifest
from loopfm.vm.kd import TABLE1_VARIANTS, VARIANTS, KDConfig, uses_current_code, variant_flags
from loopfm.vm.model import VMModelConfig
from loopfm.vm.train import VMTrainConfig


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


def run_train_vm(cfg: VMStageConfig, run_dir: str | Path, out_dir: str | Path, *, config_hash: str,
                 logger=None, progress: bool = True) -> dict:
    """Train and test every (model, variant, seed); write ``out_dir`` atomically."""
    from loopfm.data.eventlog import EventLog
    from loopfm.vm.train import run_vm

    run_dir = Path(run_dir)
    log = EventLog(run_dir / "data")
    for m in cfg.models:  # fail on a typo before any work
        dataclasses.replace(cfg.model, model=m)
    needs_seq = any(variant_flags(v)[1] for v in cfg.variants)
    needs_kd = any(variant_flags(v)[0] for v in cfg.variants)
    needs_current = any(uses_current_code(v) for v in cfg.variants)
    inputs = VMInputs(run_dir, log, cfg, needs_seq, needs_kd, needs_current)
    train = inputs.batches(cfg.train_days)
    test = inputs.batches([cfg.test_day])
    labels = np.concatenate([b.labels.numpy() for b in test])
    users = np.concatenate([b.user_ids.numpy() for b in test])
    example_ids = np.concatenate([b.example_ids.numpy() for b in test])
    preds: dict[str, np.ndarray] = {}
    runs: list[dict] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    jobs = [(m, v, s) for m in cfg.models for v in cfg.variants for s in range(cfg.seeds)]
    try:
        for model, variant, seed in tqdm(jobs, desc="train-vm", unit=" run", disable=not progress):
            start = time.perf_counter()
            name = f"{model}/{variant}/{seed}"
            result = run_vm(dataclasses.replace(cfg.model, model=model),
                            dataclasses.replace(cfg.train, seed=cfg.train.seed + seed), cfg.kd, log.schema,
                            train, test, variant=variant, logger=logger, prefix=f"vm/{name}/")
            preds[name] = result.preds.astype(np.float32)
            runs.append({"model": model, "variant": variant, "seed": seed, "metrics": result.metrics,
                         "steps": result.steps, "train_loss": result.train_loss,
                         "seconds": time.perf_counter() - start})
            if progress:
                shown = {k: "n/a" if result.metrics[k] is None else f"{result.metrics[k]:.4f}" for k in ("auc", "ne")}
                tqdm.write(f"  {name:28s} auc {shown['auc']}  ne {shown['ne']}")
    finally:
        torch.set_num_threads(threads)
    with atomic_output(out_dir) as tmp:
        table = {"example_id": example_ids, "label": labels.astype(np.int8), "user_id": users, **preds}
        pq.write_table(pa.table(table), tmp / "predictions.parquet")
        (tmp / "runs.json").write_text(json.dumps(runs, indent=2))
        return write_manifest(tmp, stage="train-vm", config_hash=config_hash, runs=len(runs),
                              test_day=cfg.test_day, train_days=cfg.train_days, test_rows=int(len(labels)),
                              quantizer=inputs.quantizer)


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
        from loopfm.vm.batch import attach_sequence, iter_vm_batches

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
                b = dataclasses.replace(b, current_code=torch.from_numpy(
                    np.ascontiguousarray(self._decode(codes[ids][:, None])[:, 0], dtype=np.float32)))
            if self.reader is not None:
                seq = self.reader.gather(ids, layout="padded")
                b = attach_sequence(b, seq.codes, seq.lengths, seq.deltas, quantizer=self.spec.quantizer,
                                    codebook=self.spec.codebook, decode=self._decode)
            out.append(b)
        if not out:
            raise ValueError(f"the event log has no rows on days {days}")
        return out

    def _decode(self, codes: np.ndarray) -> np.ndarray:
        from loopfm.stages.compress import decode

        b, length, nbytes = codes.shape
        flat = decode(codes.reshape(b * length, nbytes), self.spec)
        return flat.reshape(b, length, -1)


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
