"""Fused INT4 dequant-and-attend: correctness first, then achieved bandwidth.

Variants timed (padded input, every sequence full so every code byte is read):
  eager ref      the PyTorch reference: unpack -> dequantize -> masked softmax attention
  compiled ref   torch.compile of that reference (GPU only)
  INT4 kernel    the fused Triton kernel on packed uint8 codes [B, L, d/2]
  fp16 kernel    the same fused kernel on unpacked fp16 values [B, L, d]

GB/s counts the minimum bytes each variant must move: codes (or fp16 values) + lengths + queries +
output. It is set against a device-to-device copy measured in the same run (read + write bytes).
Timings are medians: ``triton.testing.do_bench`` on CUDA, ``time.perf_counter`` on CPU.

    python benchmarks/kernel_bench.py                # GPU: 1 MB .. 1 GB of packed codes
    python benchmarks/kernel_bench.py --max-mb 64 --quick
    python benchmarks/kernel_bench.py --sweep        # GPU: also BLOCK_L x num_warps for the INT4 kernel

Without a GPU it checks the Triton kernel in the interpreter, times the eager reference on small
sizes, and says that no kernel timings were taken. It never writes benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

# The Triton kernels choose between compiling and interpreting when they are imported, so on a
# machine without CUDA the interpreter must be switched on before `kernels` loads them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import kernels  # noqa: E402
from kernels import reference  # noqa: E402

GPU_SIZES_MB = (1, 4, 16, 64, 256, 1024)
CPU_SIZES_MB = (0.25, 1, 4)
SEQ_LENS = (50, 200)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-mb", type=float, default=1024.0, help="largest packed-code size, MB")
    p.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    p.add_argument("--d", type=int, default=32, help="embedding dimension (even)")
    p.add_argument("--heads", type=int, default=4, help="query heads H")
    p.add_argument("--ref-max-mb", type=float, default=256.0,
                   help="skip the PyTorch reference above this size (it materialises fp32 values)")
    p.add_argument("--sweep", action="store_true",
                   help="GPU only: time the INT4 kernel for each BLOCK_L x num_warps at one size "
                        "(min(64, --max-mb) MB), to tune kernels.triton_int4_attend.default_config")
    p.add_argument("--interpret-kernels", action="store_true",
                   help="CPU only: also run the kernel variants in the Triton interpreter, to check "
                        "this script end to end (those times mean nothing)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# Correctness


def check_correctness(device: torch.device) -> str:
    """Kernel vs reference on a small case (forward and backward); raises on a mismatch."""
    if not kernels.triton_available():
        return "triton not installed: kernel correctness not checked (reference only)"
    from kernels import triton_int4_attend as tk

    gen = torch.Generator().manual_seed(0)
    B, L, d, H = 4, 37, 32, 4
    codes = torch.randint(0, 256, (B, L, d // 2), generator=gen, dtype=torch.uint8).to(device)
    lengths = torch.tensor([0, 37, 5, 20], dtype=torch.int32, device=device)
    q = torch.randn(B, H, d, generator=gen).to(device)
    codebook = torch.randn(16, generator=gen).to(device)
    bias = torch.randn(B, H, L, generator=gen).to(device)
    grad = torch.randn(B, H, d, generator=gen).to(device)
    worst = 0.0
    for cb in (None, codebook):
        out, lse, w = tk.int4_attend_fwd(codes, lengths, q, cb, bias, True)
        r_out, r_lse, r_w = reference.attend_padded(codes, lengths, q, cb, bias)
        dq, db = tk.int4_attend_bwd(grad, codes, lengths, q, cb, bias, out, lse, True)
        r_dq, r_db = reference.attend_padded_backward(grad, codes, lengths, q, cb, bias, r_out, r_lse, True)
        for a, b in ((out, r_out), (w, r_w), (dq, r_dq), (db, r_db)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
            worst = max(worst, float((a - b).abs().max()))
    mode = "Triton interpreter" if tk.INTERPRET else "compiled"
    return f"kernel matches reference ({mode}; fwd, weights, bwd; max abs diff {worst:.1e})"


# --------------------------------------------------------------------------------------------------
# Timing


def _median_cpu(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _median_gpu(fn: Callable[[], object], quick: bool) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100,
                                   return_mode="median")


def copy_bandwidth_gbs(device: torch.device, nbytes: int, quick: bool) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _median_gpu(lambda: dst.copy_(src), quick)
    return 2 * nbytes / ms / 1e6


def _try(fn: Callable[[], float]) -> Optional[float]:
    """A timing, or None when the variant runs out of memory at this size."""
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


def run_case(mb: float, L: int, args: argparse.Namespace, device: torch.device) -> dict:
    d, H = args.d, args.heads
    B = max(1, round(mb * 2**20 / (L * d // 2)))
    codes = torch.randint(0, 256, (B, L, d // 2), dtype=torch.uint8, device=device)
    lengths = torch.full((B,), L, dtype=torch.int32, device=device)
    q = torch.randn(B, H, d, device=device)
    io_bytes = lengths.numel() * 4 + 2 * q.numel() * 4  # lengths + queries + output (fp32)
    row = dict(mb=codes.numel() / 2**20, B=B, L=L, int4_bytes=codes.numel() + io_bytes,
               fp16_bytes=2 * B * L * d + io_bytes)
    cuda = device.type == "cuda"
    if cuda:
        timer = lambda fn: _median_gpu(fn, args.quick)  # noqa: E731
    else:
        timer = lambda fn: _median_cpu(fn, 1 if args.interpret_kernels else 5)  # noqa: E731
    if mb <= args.ref_max_mb:
        row["eager"] = _try(lambda: timer(lambda: reference.attend_padded(codes, lengths, q)))
        if cuda:  # on CPU, inductor's C++ compile alone would take most of a minute
            compiled = torch.compile(reference.attend_padded, dynamic=True)
            row["compiled"] = _try(lambda: timer(lambda: compiled(codes, lengths, q)))
    if not (cuda or args.interpret_kernels):
        return row
    from kernels import triton_int4_attend as tk

    row["int4"] = _try(lambda: timer(lambda: tk.int4_attend_fwd(codes, lengths, q)))
    values = _try(lambda: kernels.dequantize_int4(kernels.unpack_int4(codes)).half())
    if values is not None:
        row["fp16"] = _try(lambda: timer(lambda: tk.int4_attend_fwd(values, lengths, q)))
    del values
    return row


def sweep(args: argparse.Namespace, device: torch.device) -> str:
    """Markdown table of INT4 kernel times over BLOCK_L x num_warps (GPU)."""
    from kernels import triton_int4_attend as tk

    d, H, L = args.d, args.heads, max(SEQ_LENS)
    mb = min(64.0, args.max_mb)
    B = max(1, round(mb * 2**20 / (L * d // 2)))
    codes = torch.randint(0, 256, (B, L, d // 2), dtype=torch.uint8, device=device)
    lengths = torch.full((B,), L, dtype=torch.int32, device=device)
    q = torch.randn(B, H, d, device=device)
    nbytes = codes.numel() + lengths.numel() * 4 + 2 * q.numel() * 4
    h_pad, dh_pad = 1 << (H - 1).bit_length(), 1 << (d // 2 - 1).bit_length()
    default = tk.default_config(h_pad, dh_pad)
    lines = [f"INT4 kernel sweep at {codes.numel() / 2**20:.0f} MB, L={L} (default BLOCK_L, warps = {default})",
             "| BLOCK_L | num_warps | fwd ms | fwd GB/s |", "|---|---|---|---|"]
    for block_l in (8, 16, 32, 64, 128):
        for warps in (2, 4, 8):
            ms = _median_gpu(lambda: tk.int4_attend_fwd(codes, lengths, q, block_l=block_l, num_warps=warps),
                             args.quick)
            lines.append(f"| {block_l} | {warps} | {ms:.3f} | {nbytes / ms / 1e6:.0f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Report


def _ms(row: dict, key: str) -> str:
    v = row.get(key)
    return "—" if v is None else f"{v:.3f}"


def _gbs(row: dict, key: str, nbytes_key: str, copy_gbs: Optional[float]) -> str:
    v = row.get(key)
    if v is None:
        return "—"
    gbs = row[nbytes_key] / v / 1e6
    return (f"{gbs:.0f}" if gbs >= 10 else f"{gbs:.2g}") + (f" ({100 * gbs / copy_gbs:.0f}%)" if copy_gbs else "")


def table(rows: list[dict], copy_gbs: Optional[float]) -> str:
    head = ("| packed MB | B | L | eager ref ms | eager GB/s | compiled ref ms | INT4 kernel ms | "
            "INT4 GB/s (% copy) | fp16 kernel ms | fp16 GB/s (% copy) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['mb']:.3g} | {r['B']} | {r['L']} | {_ms(r, 'eager')} | "
            f"{_gbs(r, 'eager', 'int4_bytes', copy_gbs)} | {_ms(r, 'compiled')} | {_ms(r, 'int4')} | "
            f"{_gbs(r, 'int4', 'int4_bytes', copy_gbs)} | {_ms(r, 'fp16')} | "
            f"{_gbs(r, 'fp16', 'fp16_bytes', copy_gbs)} |"
        )
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.d % 2:
        raise SystemExit(f"--d must be even, got {args.d}")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    print(f"# INT4 dequant-and-attend  (d={args.d}, H={args.heads}, fp32 queries, full-length sequences)")
    print(f"device: {torch.cuda.get_device_name() if cuda else 'CPU'}; torch {torch.__version__}")
    print("correctness:", check_correctness(device))

    sizes = GPU_SIZES_MB if cuda else CPU_SIZES_MB
    sizes = [s for s in sizes if s <= args.max_mb] or [args.max_mb]
    if args.quick:
        sizes = sizes[:2] if not cuda else [s for s in sizes if s in (1, 16, 256)] or sizes[:1]
    copy_gbs = None
    if cuda:
        copy_gbs = copy_bandwidth_gbs(device, 1 << 30, args.quick)
        print(f"device-to-device copy: {copy_gbs:.0f} GB/s (1 GiB buffer, read + write bytes)")
    else:
        print("no GPU found: Triton kernel timings not taken (eager reference only, perf_counter medians)")
        if args.interpret_kernels:
            print("--interpret-kernels: the kernel columns are Triton-interpreter runs that only check "
                  "this script; they are not performance figures")
    rows = [run_case(mb, L, args, device) for mb in sizes for L in SEQ_LENS]
    print()
    print(table(rows, copy_gbs))
    if args.sweep and cuda:
        print()
        print(sweep(args, device))
    elif args.sweep:
        print("\n--sweep skipped: no GPU found")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
