"""VM training on one device with INT4 LoopFM sequences: the Triton op vs the PyTorch reference encoder.

Needs only torch (and triton for the kernel rows): batches are synthetic, generated here (no event
log, no TorchRec). Each row is one streaming pass of `loopfm.vm.train.train_one_pass` (the real
trainer: fused Adam, batches pinned once and copied with non_blocking) over ``--steps`` batches,
after an untimed warm-up; the clock stops after a device synchronisation. The last column compares
the served predictions on held-out batches with those of the same model trained with the other
backend (same seed, same batches): the two encoders compute the same function, so the difference
is rounding carried through training.

    python benchmarks/vm_device_bench.py                      # cuda when present, else cpu
    python benchmarks/vm_device_bench.py --dry-run            # tiny, CPU, Triton interpreter
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():  # the kernels decide compile vs interpret when first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import kernels  # noqa: E402
from loopfm.data.schema import FeatureSpec, Schema  # noqa: E402
from loopfm.vm.batch import VMBatch  # noqa: E402
from loopfm.vm.kd import KDConfig, kd_for_variant  # noqa: E402
from loopfm.vm.model import VMModelConfig, build_model  # noqa: E402
from loopfm.vm.train import VMTrainConfig, predict, train_one_pass  # noqa: E402

VOCABS = {"user_id": 100_000, "item_id": 50_000, "cate_id": 1_000, "brand": 5_000, "age": 8}
ROLES = {"user_id": "user", "item_id": "item", "cate_id": "item", "brand": "item", "age": "user"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="deepfm,dmin")
    p.add_argument("--variant", default="loopfm", help="a variant with a LoopFM sequence")
    p.add_argument("--batch-sizes", default="256,4096")
    p.add_argument("--steps", type=int, default=200, help="timed steps per row")
    p.add_argument("--L", type=int, default=100, help="sequence length (every length drawn in 0..L)")
    p.add_argument("--d", type=int, default=32, help="INT4 code width")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny sizes on the CPU (Triton interpreter): checks this script, times nothing useful")
    args = p.parse_args(argv)
    if args.dry_run:
        args.batch_sizes, args.steps, args.L, args.d, args.device = "8", 3, 6, 8, "cpu"
    return args


def schema() -> Schema:
    return Schema(dataset="synthetic-bench", user_key="user_id", item_key="item_id", num_days=2, features=[
        FeatureSpec(name, "categorical", ROLES[name], vocab_size=size) for name, size in VOCABS.items()])


def make_batches(n: int, B: int, L: int, d: int, seed: int, small: bool) -> list[VMBatch]:
    """``n`` batches of B examples with INT4 sequences (lengths 0..L), labels and soft labels."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        sparse = {k: torch.randint(1, min(20, v) if small else v, (B,), generator=g) for k, v in VOCABS.items()}
        labels = torch.bernoulli(torch.full((B,), 0.3), generator=g)
        codes = kernels.pack_int4(torch.randint(0, 16, (B, L, d), generator=g))
        batch = VMBatch(sparse=sparse, dense=torch.zeros(B, 0), labels=labels, user_ids=sparse["user_id"],
                        soft_labels=torch.rand(B, generator=g))
        batch = batch.with_sequence(packed=codes, lengths=torch.randint(0, L + 1, (B,), generator=g),
                                    deltas=torch.rand(B, L, generator=g) * 86400)
        # pinned once, as the train-vm stage does on a GPU: host-to-device copies are then async
        out.append(batch.pin_memory() if torch.cuda.is_available() else batch)
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args: argparse.Namespace) -> str:
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    backends = ["triton", "reference"] if kernels.triton_available() else ["reference"]
    sch = schema()
    train_cfg = VMTrainConfig(lr=1e-3, device=str(device))
    kd = kd_for_variant(args.variant, KDConfig())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [f"VM training on {name}: {args.variant} variant, INT4 codes d={args.d}, L<={args.L}, "
             f"{args.steps} timed steps per row (torch {torch.__version__})", "",
             "| model | batch | encoder backend | examples/s | ms/step | max abs diff of predictions vs the other backend |",
             "|---|---|---|---:|---:|---:|"]
    for B in (int(b) for b in args.batch_sizes.split(",")):
        warm = make_batches(1 if args.dry_run else 3, B, args.L, args.d, seed=1, small=args.dry_run)
        # a few distinct batches, cycled: generating 200 batches of 4096 would take longer than training
        distinct = make_batches(min(args.steps, 16), B, args.L, args.d, seed=2, small=args.dry_run)
        train = [distinct[i % len(distinct)] for i in range(args.steps)]
        test = make_batches(2, B, args.L, args.d, seed=3, small=args.dry_run)
        for model_name in args.models.split(","):
            rows, preds = [], {}
            for backend in backends:
                cfg = VMModelConfig(model=model_name, kernel_backend=backend)

                def fresh():
                    torch.manual_seed(0)
                    return build_model(cfg, sch, seq_dim=args.d, kd=kd).to(device)
                train_one_pass(fresh(), warm, train_cfg, kd)  # compiles kernels, imports torch._dynamo
                model = fresh()
                _sync(device)
                start = time.perf_counter()
                train_one_pass(model, train, train_cfg, kd)
                _sync(device)
                wall = time.perf_counter() - start
                preds[backend] = predict(model, test)[0]
                rows.append((backend, B * args.steps / wall, 1e3 * wall / args.steps))
            for backend, rate, ms in rows:
                other = [b for b in backends if b != backend]
                diff = f"{abs(preds[backend] - preds[other[0]]).max():.1e}" if other else "—"
                lines.append(f"| {model_name} | {B} | {backend} | {rate:,.0f} | {ms:.2f} | {diff} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1 if args.dry_run else torch.get_num_threads())
    print(run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
