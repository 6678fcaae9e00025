"""VM training throughput per model and variant, so the cost of the LoopFM sequence is visible.

Uses a finished run folder (event log, extract, compress, sequences), e.g. the quickstart's:

    loopfm run configs/quickstart.yaml --out runs/quickstart      # once
    python benchmarks/vm_train_bench.py --run runs/quickstart

Batches (with soft labels and INT4 sequences attached) are built once, outside the timing; each
row is one streaming pass over the training days with one torch thread.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from loopfm.config import load_config
from loopfm.experiment import LoopFMConfig
from loopfm.data.eventlog import EventLog
from loopfm.stages.train_vm import VMInputs
from loopfm.vm.kd import kd_for_variant, variant_flags
from loopfm.vm.model import build_model
from loopfm.vm.train import train_one_pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/quickstart", help="finished run folder")
    parser.add_argument("--models", default="fm,fmfm,deepfm,din,dien,dmr,dmin")
    parser.add_argument("--variants", default="baseline,kd,loopfm,kd+loopfm")
    args = parser.parse_args()
    run = Path(args.run)
    cfg = load_config(LoopFMConfig, run / "config.yaml")
    torch.set_num_threads(1)
    log = EventLog(run / "data")
    batches = VMInputs(run, log, cfg.vm, needs_seq=True, needs_kd=True).batches(cfg.vm.train_days)
    rows = sum(len(b.labels) for b in batches)
    seq_dim = batches[0].seq_dim
    print(f"\nVM training, one pass over days {cfg.vm.train_days} of {run} ({rows:,} examples, "
          f"batch {cfg.vm.train.batch_size}, L={cfg.sequences.max_len}, {cfg.compress.quantizer} codes, 1 thread)\n")
    print("| model | variant | examples/s | seconds |\n|---|---|---:|---:|")
    for model_name in args.models.split(","):
        for variant in args.variants.split(","):
            kd = kd_for_variant(variant, cfg.vm.kd)
            _, use_seq = variant_flags(variant)
            torch.manual_seed(0)
            model = build_model(dataclasses.replace(cfg.vm.model, model=model_name), log.schema,
                                seq_dim=seq_dim if use_seq else None, kd=kd)
            start = time.perf_counter()
            train_one_pass(model, batches, cfg.vm.train, kd)
            wall = time.perf_counter() - start
            print(f"| {model_name} | {variant} | {rows / wall:,.0f} | {wall:.1f} |")


if __name__ == "__main__":
    main()
