#!/usr/bin/env bash
# The GPU check: one prepared run on a CUDA machine with only torch and triton (no install step,
# no TorchRec/FBGEMM/TorchX), under 8 minutes on an H200. Usage:
#
#   benchmarks/gpu_check.sh OUT_DIR            # on the GPU machine (or: make gpu-check OUT=...)
#   benchmarks/gpu_check.sh OUT_DIR --dry-run  # CPU: Triton interpreter, tiny sizes (make test runs it)
#
# Steps, each with its own time limit; each one's output is teed into OUT_DIR, and a failure or a
# timeout in one does not stop the next:
#   1 env           GPU, driver, torch/triton versions, device-to-device copy bandwidth
#   2 kernel_tests  tests/kernels compiled on CUDA, plus the training-size cases (B 4096, L 200)
#   3 kernel_bench  benchmarks/kernel_bench.py: GB/s vs the copy, speed-ups, fwd and fwd+bwd
#   4 kernel_sweep  the same with --sweep-only: BLOCK_L x warps x stages, best config per pass
#   5 vm_train      benchmarks/vm_device_bench.py: DeepFM and DMIN, Triton vs reference encoder
#   6 results       OUT_DIR/RESULTS.md, ready to commit as benchmarks/RESULTS.md
# Uses the machine's own python3 (or $PYTHON) with this checkout on PYTHONPATH.
set -uo pipefail

usage() { echo "usage: $0 OUT_DIR [--dry-run]" >&2; exit 2; }
[ $# -ge 1 ] || usage
out=$1
dry=0
[ "${2:-}" = "--dry-run" ] && dry=1
[ $# -le 2 ] && { [ $# -eq 1 ] || [ $dry -eq 1 ]; } || usage

repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$repo"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ $dry -eq 1 ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""  # the interpreter on CPU tensors, never a GPU
  tests=(tests/kernels/test_int4_triton_scale.py)      # the rest of tests/kernels runs in make test
  bench=(--quick --max-mb 0.01 --interpret-kernels)
  vm=(--dry-run)
else
  export TRITON_INTERPRET=0                             # tests/kernels would default to the interpreter
  # the training-size cases first: a time limit then cuts the older, smaller cases, not these
  tests=(tests/kernels/test_int4_triton_scale.py)
  for f in tests/kernels/test_*.py; do [ "$f" = "${tests[0]}" ] || tests+=("$f"); done
  bench=(--quick --max-mb 1024 --ref-max-mb 1024)
  vm=()
fi
: > "$out/steps.tsv"
started=$(date +%s)

# step NAME LIMIT_S COMMAND...: stdout to NAME.out, stderr to NAME.err, both to the terminal.
step() {
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*"
  local t0=$(date +%s)
  timeout -k 10 "$limit" "$@" > >(tee "$out/$name.out") 2> >(tee "$out/$name.err" >&2)
  local rc=$?
  wait  # let the tees finish writing
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$limit" >> "$out/steps.tsv"
  echo "== $name: exit $rc after $(( $(date +%s) - t0 ))s"
}

step 1_env 30 "$py" benchmarks/gpu_check.py env
step 2_kernel_tests 160 "$py" -m pytest "${tests[@]}" -v -rfE -p no:cacheprovider \
  -o addopts="" --junitxml="$out/kernel_tests.xml"
step 3_kernel_bench 110 "$py" benchmarks/kernel_bench.py "${bench[@]}"
step 4_kernel_sweep 70 "$py" benchmarks/kernel_bench.py --sweep-only --quick --max-mb 64
step 5_vm_train 60 "$py" benchmarks/vm_device_bench.py ${vm[@]+"${vm[@]}"}  # bash < 4.4: empty arrays and set -u
step 6_results 10 "$py" benchmarks/gpu_check.py results "$out" --seconds "$(( $(date +%s) - started ))"
echo "results: $out/RESULTS.md"
