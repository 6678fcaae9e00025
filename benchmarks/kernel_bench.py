"""Fused INT4 dequant-and-attend: correctness first, then achieved bandwidth.

Variants timed (padded input, every sequence full so every code byte is read):
  eager ref      the PyTorch reference: unpack -> dequantize -> masked softmax attention
  torch path     the op's fast PyTorch backend ("torch", the CPU default; kernels/torch_int4_attend.py)
  compiled ref   torch.compile of that reference (GPU only)
  INT4 kernel    the fused Triton kernel on packed uint8 codes [B, L, d/2]
  fp16 kernel    the same fused kernel on unpacked fp16 values [B, L, d]
Each is timed forward only and forward + backward (the gradient of the queries, through autograd:
the reference's own, and the custom op's Triton backward for the kernel); "vs" columns are the
kernel's speed-up over the eager and compiled reference.

GB/s counts the minimum bytes each variant must move: codes (or fp16 values) + lengths + queries +
output. It is set against a device-to-device copy measured in the same run (read + write bytes).
Timings are medians: ``triton.testing.do_bench`` on CUDA, ``time.perf_counter`` on CPU.

    python benchmarks/kernel_bench.py                # GPU: 1 MB .. 1 GB of packed codes
    python benchmarks/kernel_bench.py --max-mb 64 --quick
    python benchmarks/kernel_bench.py --sweep        # GPU: also BLOCK_L x warps x stages, best config

Without a GPU it checks the Triton kernel in the interpreter, times the eager reference and the
torch path on small sizes, and says that no kernel timings were taken. It never writes benchmarks/RESULTS.md
(benchmarks/gpu_check.sh does, from its output).
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

Tensor = torch.Tensor

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
                   help="GPU only: time the INT4 kernels (forward, backward) for each BLOCK_L x num_warps x "
                        "num_stages at one size (min(64, --max-mb) MB) and print the fastest as "
                        "kernels.triton_int4_attend.TUNED entries")
    p.add_argument("--sweep-only", action="store_true", help="GPU only: the sweep without the size table")
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


_COMPILED: dict = {}


def compiled_reference() -> Callable:
    """torch.compile of the reference, made once (a new wrapper per case would recompile)."""
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(reference.attend_padded, dynamic=True)
    return _COMPILED["fn"]


def _try_compiled(fn: Callable[[], float]) -> Optional[float]:
    """Like `_try`, and a torch.compile failure (e.g. no C compiler for inductor) skips the column."""
    try:
        return _try(fn)
    except Exception as e:  # noqa: BLE001 - any compiler error: report it, keep the other columns
        print(f"torch.compile of the reference failed, column left empty: {type(e).__name__}: "
              f"{str(e).splitlines()[0][:200] if str(e) else ''}", file=sys.stderr)
        return None


def _fwd_bwd(forward: Callable[[Tensor], Tensor], q: Tensor, grad: Tensor) -> Callable[[], object]:
    """One forward and backward through ``forward(queries)`` (d queries only, as a VM encoder)."""
    def step():
        qg = q.detach().requires_grad_(True)
        forward(qg).backward(grad)
    return step


def run_case(mb: float, L: int, args: argparse.Namespace, device: torch.device) -> dict:
    d, H = args.d, args.heads
    B = max(1, round(mb * 2**20 / (L * d // 2)))
    codes = torch.randint(0, 256, (B, L, d // 2), dtype=torch.uint8, device=device)
    lengths = torch.full((B,), L, dtype=torch.int32, device=device)
    q = torch.randn(B, H, d, device=device)
    grad = torch.randn(B, H, d, device=device)
    io_bytes = lengths.numel() * 4 + 2 * q.numel() * 4  # lengths + queries + output (fp32)
    row = dict(mb=codes.numel() / 2**20, B=B, L=L, int4_bytes=codes.numel() + io_bytes,
               fp16_bytes=2 * B * L * d + io_bytes)
    cuda = device.type == "cuda"
    if cuda:
        timer = lambda fn: _median_gpu(fn, args.quick)  # noqa: E731
    else:
        timer = lambda fn: _median_cpu(fn, 1 if args.interpret_kernels else 5)  # noqa: E731
    ref_out = lambda qq: reference.attend_padded(codes, lengths, qq)[0]  # noqa: E731
    if mb <= args.ref_max_mb:
        row["eager"] = _try(lambda: timer(lambda: ref_out(q)))
        row["eager_bwd"] = _try(lambda: timer(_fwd_bwd(ref_out, q, grad)))
        torch_out = lambda qq: kernels.int4_attend(codes, lengths, qq, backend="torch")  # noqa: E731
        row["torch"] = _try(lambda: timer(lambda: torch_out(q)))
        row["torch_bwd"] = _try(lambda: timer(_fwd_bwd(torch_out, q, grad)))
        if cuda:  # on CPU, inductor's C++ compile alone would take most of a minute
            compiled = lambda qq: compiled_reference()(codes, lengths, qq)[0]  # noqa: E731
            row["compiled"] = _try_compiled(lambda: timer(lambda: compiled(q)))
            if row["compiled"] is not None:
                row["compiled_bwd"] = _try_compiled(lambda: timer(_fwd_bwd(compiled, q, grad)))
    if not (cuda or args.interpret_kernels):
        return row
    from kernels import triton_int4_attend as tk

    row["int4"] = _try(lambda: timer(lambda: tk.int4_attend_fwd(codes, lengths, q)))
    op_out = lambda qq: kernels.int4_attend(codes, lengths, qq, backend="triton")  # noqa: E731
    row["int4_bwd"] = _try(lambda: timer(_fwd_bwd(op_out, q, grad)))
    values = _try(lambda: kernels.dequantize_int4(kernels.unpack_int4(codes)).half())
    if values is not None:
        row["fp16"] = _try(lambda: timer(lambda: tk.int4_attend_fwd(values, lengths, q)))
    del values
    return row


FWD_GRID = dict(block_l=(16, 32, 64, 128), num_warps=(4, 8), num_stages=(1, 2, 3))
BWD_GRID = dict(block_l=(16, 32, 64), num_warps=(4, 8), num_stages=(1, 2))


def sweep(args: argparse.Namespace, device: torch.device, emit: Callable[[str], None] = lambda line: None) -> str:
    """Markdown tables of INT4 kernel times over BLOCK_L x num_warps x num_stages (GPU), forward and
    backward, and the fastest config of each as ``TUNED`` entries for kernels/triton_int4_attend.py."""
    from kernels import triton_int4_attend as tk

    d, H, L = args.d, args.heads, max(SEQ_LENS)
    mb = min(64.0, args.max_mb)
    B = max(1, round(mb * 2**20 / (L * d // 2)))
    codes = torch.randint(0, 256, (B, L, d // 2), dtype=torch.uint8, device=device)
    lengths = torch.full((B,), L, dtype=torch.int32, device=device)
    q = torch.randn(B, H, d, device=device)
    grad = torch.randn(B, H, d, device=device)
    out, lse, _ = tk.int4_attend_fwd(codes, lengths, q)
    nbytes = codes.numel() + lengths.numel() * 4 + 2 * q.numel() * 4
    h_pad, dh_pad = 1 << (H - 1).bit_length(), 1 << (d // 2 - 1).bit_length()
    passes = {
        "fwd": (FWD_GRID, lambda cfg: tk.int4_attend_fwd(codes, lengths, q, **cfg)),
        "bwd": (BWD_GRID, lambda cfg: tk.int4_attend_bwd(grad, codes, lengths, q, None, None, out, lse, False, **cfg)),
    }
    lines: list[str] = []

    def add(*new: str) -> None:  # printed as measured, so a time limit still leaves the rows done
        for line in new:
            lines.append(line)
            emit(line)
    add(f"INT4 kernel sweep at {codes.numel() / 2**20:.0f} MB, B={B}, L={L}, d={d}, H={H} "
        f"(defaults: {', '.join(f'{k} {tk.launch_config(k, h_pad, dh_pad)}' for k in passes)})")
    best_lines = []
    for kind, (grid, launch) in passes.items():
        add("", "| pass | BLOCK_L | num_warps | num_stages | ms | GB/s (codes + io) |", "|---|---|---|---|---|---|")
        timings = []
        for block_l in grid["block_l"]:
            for warps in grid["num_warps"]:
                for stages in grid["num_stages"]:
                    cfg = dict(block_l=block_l, num_warps=warps, num_stages=stages)
                    ms = _try(lambda: _median_gpu(lambda: launch(cfg), True))
                    if ms is None:
                        continue
                    timings.append((ms, block_l, warps, stages))
                    add(f"| {kind} | {block_l} | {warps} | {stages} | {ms:.3f} | {nbytes / ms / 1e6:.0f} |")
        if timings:
            ms, block_l, warps, stages = min(timings)
            default_ms = _median_gpu(lambda: launch({}), True)
            best_lines.append(f"best {kind}: BLOCK_L={block_l} num_warps={warps} num_stages={stages} "
                              f"{ms:.3f} ms ({default_ms / ms:.2f}x the default config's {default_ms:.3f} ms); "
                              f"TUNED[({kind!r}, {h_pad}, {dh_pad})] = ({block_l}, {warps}, {stages})")
    add("", *best_lines)
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


def _ratio(row: dict, slow: str, fast: str) -> str:
    a, b = row.get(slow), row.get(fast)
    return "—" if a is None or b is None else f"{a / b:.1f}x"


COLUMNS: list[tuple[str, Callable[[dict, Optional[float]], str]]] = [
    ("packed MB", lambda r, c: f"{r['mb']:.3g}"),
    ("B", lambda r, c: str(r["B"])),
    ("L", lambda r, c: str(r["L"])),
    ("eager ref ms", lambda r, c: _ms(r, "eager")),
    ("eager GB/s", lambda r, c: _gbs(r, "eager", "int4_bytes", c)),
    ("torch path ms", lambda r, c: _ms(r, "torch")),
    ("torch path vs eager", lambda r, c: _ratio(r, "eager", "torch")),
    ("compiled ref ms", lambda r, c: _ms(r, "compiled")),
    ("INT4 kernel ms", lambda r, c: _ms(r, "int4")),
    ("INT4 GB/s (% copy)", lambda r, c: _gbs(r, "int4", "int4_bytes", c)),
    ("fp16 kernel ms", lambda r, c: _ms(r, "fp16")),
    ("fp16 GB/s (% copy)", lambda r, c: _gbs(r, "fp16", "fp16_bytes", c)),
    ("INT4 vs eager", lambda r, c: _ratio(r, "eager", "int4")),
    ("INT4 vs compiled", lambda r, c: _ratio(r, "compiled", "int4")),
    ("fwd+bwd eager ms", lambda r, c: _ms(r, "eager_bwd")),
    ("fwd+bwd torch path ms", lambda r, c: _ms(r, "torch_bwd")),
    ("fwd+bwd torch path vs eager", lambda r, c: _ratio(r, "eager_bwd", "torch_bwd")),
    ("fwd+bwd compiled ms", lambda r, c: _ms(r, "compiled_bwd")),
    ("fwd+bwd INT4 ms", lambda r, c: _ms(r, "int4_bwd")),
    ("fwd+bwd vs eager", lambda r, c: _ratio(r, "eager_bwd", "int4_bwd")),
    ("fwd+bwd vs compiled", lambda r, c: _ratio(r, "compiled_bwd", "int4_bwd")),
]


def table_header() -> str:
    return "| " + " | ".join(name for name, _ in COLUMNS) + " |\n|" + "---|" * len(COLUMNS)


def table_row(r: dict, copy_gbs: Optional[float]) -> str:
    return "| " + " | ".join(cell(r, copy_gbs) for _, cell in COLUMNS) + " |"


def goals(rows: list[dict], copy_gbs: Optional[float]) -> str:
    """The issue's goals at the largest shape timed: INT4 forward >= 70% of the copy bandwidth,
    >= 3x the eager reference, >= 1.5x torch.compile of it."""
    timed = [r for r in rows if r.get("int4") is not None]
    if not timed or not copy_gbs:
        return "goals: not checked (no GPU timings)"
    r = max(timed, key=lambda r: (r["mb"], r["L"]))
    share = r["int4_bytes"] / r["int4"] / 1e6 / copy_gbs
    checks = [("INT4 forward bandwidth >= 70% of copy", share, 0.70, f"{100 * share:.0f}%")]
    for key, need, what in (("eager", 3.0, "eager reference"), ("compiled", 1.5, "torch.compile reference")):
        if r.get(key) is not None:
            x = r[key] / r["int4"]
            checks.append((f"INT4 forward >= {need:g}x the {what}", x, need, f"{x:.1f}x"))
    lines = [f"goals at the largest shape ({r['mb']:.0f} MB packed, B={r['B']}, L={r['L']}):",
             "| goal | measured | met |", "|---|---|---|"]
    lines += [f"| {name} | {shown} | {'yes' if v >= need else 'NO'} |" for name, v, need, shown in checks]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.d % 2:
        raise SystemExit(f"--d must be even, got {args.d}")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    print(f"# INT4 dequant-and-attend  (d={args.d}, H={args.heads}, fp32 queries, full-length sequences)")
    print(f"device: {torch.cuda.get_device_name() if cuda else 'CPU'}; torch {torch.__version__}")
    if not args.sweep_only:  # a sweep-only run follows a full one, which checked this
        print("correctness:", check_correctness(device))

    sizes = GPU_SIZES_MB if cuda else CPU_SIZES_MB
    sizes = [s for s in sizes if s <= args.max_mb] or [args.max_mb]
    if args.quick:
        sizes = sizes[:2] if not cuda else [s for s in sizes if s in (1, 16, 256, 1024)] or sizes[:1]
    copy_gbs = None
    if cuda:
        copy_gbs = copy_bandwidth_gbs(device, 1 << 30, args.quick)
        print(f"device-to-device copy: {copy_gbs:.0f} GB/s (1 GiB buffer, read + write bytes)")
    else:
        print("no GPU found: Triton kernel timings not taken (eager reference and torch path only, "
              "perf_counter medians)")
        if args.interpret_kernels:
            print("--interpret-kernels: the kernel columns are Triton-interpreter runs that only check "
                  "this script; they are not performance figures")
    if not args.sweep_only:
        print()
        print(table_header(), flush=True)
        rows = []
        for mb in sizes:  # each row printed as measured, so a time limit still leaves the rows done
            for L in SEQ_LENS:
                rows.append(run_case(mb, L, args, device))
                print(table_row(rows[-1], copy_gbs), flush=True)
        print()
        print(goals(rows, copy_gbs))
    if (args.sweep or args.sweep_only) and cuda:
        print()
        sweep(args, device, emit=lambda line: print(line, flush=True))
    elif args.sweep or args.sweep_only:
        print("\n--sweep skipped: no GPU found")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
