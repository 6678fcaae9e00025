#!/usr/bin/env bash
# The one place that knows the install order. setup.py cannot express it:
#  - torch must be the 2.13.0 wheel for the machine (CPU, or CUDA from the PyTorch index) before
#    anything asks for "torch";
#  - FBGEMM 1.8.0 pairs with torch 2.13 exactly (FBGEMM 1.N <-> torch 2.(N+5)): fbgemm-gpu-cpu on
#    CPU machines, fbgemm-gpu (CUDA) where an NVIDIA driver answers;
#  - torchrec 1.8.0 goes in with --no-deps: its metadata names the CUDA fbgemm-gpu, which
#    overwrites fbgemm_gpu/ and fails to import without an NVIDIA driver;
#  - torchmetrics must stay at 1.0.3 (newer breaks torchrec's NE metric);
#  - triton 3.6.0 runs the INT4 kernel on CUDA (a runtime dependency there; a test extra on CPU,
#    where the tests run it in its interpreter).
# Usage: scripts/install.sh VENV_DIR         the package and its runtime dependencies
#        scripts/install.sh VENV_DIR test    the test extras only (after the above)
# Environment:
#   LOOPFM_DEVICE=cpu|cuda   skip the detection (a Docker build has no GPU but targets one);
#                            default: cuda when `nvidia-smi` runs, else cpu
#   LOOPFM_TORCH_INDEX=URL   where the CUDA torch wheel comes from (default the PyTorch cu128 index)
#   DRY_RUN=1                print the pip commands instead of running them (no venv is made)
set -euo pipefail
venv=${1:-.venv}
extras=${2:-}
py=${PYTHON:-python3.11}
command -v "$py" >/dev/null || py=python3

TORCH=torch==2.13.0
FBGEMM_VERSION=1.8.0
TORCHREC=torchrec==1.8.0
TRITON=triton==3.6.0

device=${LOOPFM_DEVICE:-}
if [ -z "$device" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then device=cuda; else device=cpu; fi
fi
case "$device" in
  cpu|cuda) ;;
  *) echo "install.sh: LOOPFM_DEVICE must be cpu or cuda, got '$device'" >&2; exit 2 ;;
esac

if [ "${DRY_RUN:-0}" = 1 ]; then
  echo "# device: $device"
  pip() { echo "pip install $*"; }
else
  [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
  pip() { "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@"; }
fi

if [ "$extras" = test ]; then
  pip pytest pytest-timeout hypothesis "$TRITON" scikit-learn
  # The serving tests start a real redis-server (Debian's package) on a loopback port.
  if ! command -v redis-server >/dev/null 2>&1; then
    if [ "${DRY_RUN:-0}" = 1 ]; then
      echo "apt-get install redis-server"
    elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
    else
      echo "install.sh: no redis-server (as root: apt-get install redis-server); the Redis tests will skip" >&2
    fi
  fi
  exit 0
fi

if [ "$device" = cuda ]; then
  index=${LOOPFM_TORCH_INDEX:-https://download.pytorch.org/whl/cu128}
  pip --index-url "$index" "$TORCH"
  pip --index-url "$index" "fbgemm-gpu==$FBGEMM_VERSION"
  pip "$TRITON"
else
  pip "$TORCH"
  pip "fbgemm-gpu-cpu==$FBGEMM_VERSION"
fi
pip --no-deps "$TORCHREC"
# torchrec's own runtime deps, minus fbgemm-gpu (installed above).
pip torchmetrics==1.0.3 tensordict iopath pyre-extensions tqdm "numpy<3"
pip --no-deps -e .
pip torchx==0.7.0 pyarrow tensorboard pyyaml matplotlib
# serving: the HTTP server and the Redis client of the timeline store
pip fastapi uvicorn redis
