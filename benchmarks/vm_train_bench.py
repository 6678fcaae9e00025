"""VM training throughput per model and variant, so the cost of the LoopFM sequence is visible.

Uses a finished run folder (event log, extract, compress, sequences), e.g. the quickstart's:

    loopfm run configs/quickstart.yaml --out runs/quickstart      # once
    python benchmarks/vm_train_bench.py --run runs/quickstart
    python benchmarks/vm_train_bench.py --run runs/quickstart --models deepfm,dmin \\
        --variants baseline,kd+loopfm --baseline-ref 06a73da      # this code vs an older commit

Batches (with soft labels and INT4 sequences attached) are built once, outside the timing; each
row is one streaming pass over the training days with one torch thread, after an untimed warm-up
of a few steps (the first optimizer of a process imports torch._dynamo: 2-3 s). Figures are the
median of ``--repeats`` passes, by two clocks: wall time, and the process's CPU time (user + system
of every thread), which on a machine shared with other jobs leaves out the time this process
waited for a core; on an idle machine, with one thread, the two agree.

``--baseline-ref GIT_REF`` checks that commit out into a temporary ``git worktree`` and times both
codes in child processes, interleaved (this, ref, this, ref, ...) so that both see the same load;
it prints each one's examples/s and the ratio. The children import ``loopfm`` from their own tree,
so this file only uses calls both versions have (`VMInputs`, `build_model`, `train_one_pass`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WARMUP_STEPS = 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/quickstart", help="finished run folder")
    p.add_argument("--models", default="fm,fmfm,deepfm,din,dien,dmr,dmin")
    p.add_argument("--variants", default="baseline,kd,loopfm,kd+loopfm")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per row (median reported)")
    p.add_argument("--baseline-ref", default="", metavar="GIT_REF",
                   help="also time the code of this commit, interleaved, and print the ratio")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one timing child
    return p.parse_args(argv)


def _load_config(path: Path):
    """The run's config with this tree's loader (the experiment tree moved modules over time).

    An older tree does not know keys added since (``report``, ``vm.train.device``, ...): each is
    dropped, so both codes train the same VMs on the same batches; a key that changes the VM
    itself would show up as a different row count or seq_dim in the printed facts."""
    import yaml

    try:
        from loopfm.experiment import LoopFMConfig
        from loopfm.config import ConfigError, from_dict
    except ImportError:
        from loopfm.config import ConfigError, LoopFMConfig, from_dict
    data = yaml.safe_load(Path(path).read_text())
    while True:
        try:
            return from_dict(LoopFMConfig, data)
        except ConfigError as err:
            if "unknown key '" not in str(err):
                raise
            *parents, key = str(err).split("unknown key '")[1].split("'")[0].split(".")
            node = data
            for part in parents:
                node = node[part]
            print(f"(this tree's config has no {'.'.join([*parents, key])}: dropped for the timing)", file=sys.stderr)
            del node[key]


def time_passes(run: Path, models: list[str], variants: list[str], repeats: int) -> tuple[dict, dict]:
    """{(model, variant): [(wall examples/s, CPU examples/s) per pass]} and facts about the data,
    in this process."""
    import torch

    from loopfm.data.eventlog import EventLog
    from loopfm.stages.train_vm import VMInputs
    from loopfm.vm.kd import kd_for_variant, variant_flags
    from loopfm.vm.model import build_model
    from loopfm.vm.train import train_one_pass

    cfg = _load_config(run / "config.yaml")
    train_cfg = dataclasses.replace(cfg.vm.train, device="cpu")  # a value every version accepts
    torch.set_num_threads(1)
    log = EventLog(run / "data")
    batches = VMInputs(run, log, cfg.vm, needs_seq=True, needs_kd=True).batches(cfg.vm.train_days)
    rows = sum(len(b.labels) for b in batches)
    seq_dim = batches[0].seq_dim
    rates: dict = {}
    for model_name in models:
        for variant in variants:
            kd = kd_for_variant(variant, cfg.vm.kd)
            _, use_seq = variant_flags(variant)

            def fresh():
                torch.manual_seed(0)
                return build_model(dataclasses.replace(cfg.vm.model, model=model_name), log.schema,
                                   seq_dim=seq_dim if use_seq else None, kd=kd)
            train_one_pass(fresh(), batches[:WARMUP_STEPS], train_cfg, kd)  # untimed warm-up
            rates[(model_name, variant)] = []
            for _ in range(repeats):
                model = fresh()
                start, cpu_start = time.perf_counter(), time.process_time()
                train_one_pass(model, batches, train_cfg, kd)
                wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
                rates[(model_name, variant)].append((rows / wall, rows / cpu))
    facts = dict(rows=rows, steps=len(batches), batch=cfg.vm.train.batch_size, L=cfg.sequences.max_len,
                 quantizer=cfg.compress.quantizer, days=cfg.vm.train_days)
    return rates, facts


def _worker(args: argparse.Namespace) -> None:
    rates, facts = time_passes(Path(args.run), args.models.split(","), args.variants.split(","), args.repeats)
    print(json.dumps({"facts": facts, "rates": [[m, v, r] for (m, v), r in rates.items()]}))


def _child(tree: Path, args: argparse.Namespace) -> dict:
    """One timing pass per row in a child process importing ``loopfm`` from ``tree``."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--run", str(Path(args.run).resolve()),
           "--models", args.models, "--variants", args.variants, "--repeats", "1"]
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"timing child for {tree} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["rates"] = {(m, v): tuple(r[0]) for m, v, r in out["rates"]}
    return out


def compare(args: argparse.Namespace) -> None:
    """This tree against ``--baseline-ref``, interleaved in child processes."""
    with tempfile.TemporaryDirectory(prefix="vm_bench_ref_") as tmp:
        ref_tree = Path(tmp) / "ref"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "--quiet", str(ref_tree),
                        args.baseline_ref], check=True)
        try:
            this, ref = {}, {}
            for i in range(args.repeats):
                for name, tree, acc in (("this", REPO, this), (args.baseline_ref, ref_tree, ref)):
                    print(f"  round {i + 1}/{args.repeats}: {name}", file=sys.stderr, flush=True)
                    out = _child(tree, args)
                    facts = out["facts"]
                    for key, rate in out["rates"].items():
                        acc.setdefault(key, []).append(rate)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(ref_tree)], check=False)
    _header(args, facts)
    ref_name = args.baseline_ref
    print(f"| model | variant | {ref_name} examples/s (wall) | this examples/s (wall) | speed-up (wall) "
          f"| {ref_name} examples/s (CPU) | this examples/s (CPU) | speed-up (CPU) |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|")
    for key in this:
        cells = []
        for clock in (0, 1):
            a = statistics.median(r[clock] for r in ref[key])
            b = statistics.median(r[clock] for r in this[key])
            cells.append(f"{a:,.0f} | {b:,.0f} | {b / a:.2f}x")
        print(f"| {key[0]} | {key[1]} | {' | '.join(cells)} |")


def _header(args: argparse.Namespace, facts: dict) -> None:
    print(f"\nVM training, one pass over days {facts['days']} of {args.run} ({facts['rows']:,} examples, "
          f"{facts['steps']} steps of batch {facts['batch']}, L={facts['L']}, {facts['quantizer']} codes, "
          f"1 thread; median of {args.repeats} passes)\n")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        _worker(args)
    elif args.baseline_ref:
        compare(args)
    else:
        rates, facts = time_passes(Path(args.run), args.models.split(","), args.variants.split(","), args.repeats)
        _header(args, facts)
        print("| model | variant | examples/s (wall) | ms/step (wall) | examples/s (CPU) |\n|---|---|---:|---:|---:|")
        for (model, variant), r in rates.items():
            rate, cpu_rate = statistics.median(x[0] for x in r), statistics.median(x[1] for x in r)
            print(f"| {model} | {variant} | {rate:,.0f} | {1e3 * facts['rows'] / rate / facts['steps']:.2f} "
                  f"| {cpu_rate:,.0f} |")


if __name__ == "__main__":
    main()
