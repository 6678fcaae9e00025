#!/usr/bin/env bash
# The one place that knows the install order. setup.py cannot express it:
#  - torch must be the 2.13.0 CPU wheel before anything asks for "torch";
#  - fbgemm-gpu-cpu 1.8.0 pairs with torch 2.13 exactly (FBGEMM 1.N <-> torch 2.(N+5));
#  - torchrec 1.8.0 goes in with --no-deps: its metadata names the CUDA fbgemm-gpu, which
#    overwrites fbgemm_gpu/ and fails to import without an NVIDIA driver;
#  - torchmetrics must stay at 1.0.3 (newer breaks torchrec's NE metric).
# Usage: scripts/install.sh VENV_DIR         the package and its runtime dependencies
#        scripts/install.sh VENV_DIR test    the test extras only (after the above)
set -euo pipefail
venv=${1:-.venv}
extras=${2:-}
py=${PYTHON:-python3.11}
command -v "$py" >/dev/null || py=python3
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)

if [ "$extras" = test ]; then
  "${pip[@]}" pytest pytest-timeout hypothesis triton==3.6.0 scikit-learn
  # The serving tests start a real redis-server (Debian's package) on a loopback port.
  if ! command -v redis-server >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
    else
      echo "install.sh: no redis-server (as root: apt-get install redis-server); the Redis tests will skip" >&2
    fi
  fi
  exit 0
fi

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  fbgemm=fbgemm-gpu==1.8.0
else
  fbgemm=fbgemm-gpu-cpu==1.8.0
fi
"${pip[@]}" torch==2.13.0
"${pip[@]}" "$fbgemm"
"${pip[@]}" --no-deps torchrec==1.8.0
# torchrec's own runtime deps, minus fbgemm-gpu (installed above).
"${pip[@]}" torchmetrics==1.0.3 tensordict iopath pyre-extensions tqdm "numpy<3"
"${pip[@]}" --no-deps -e .
"${pip[@]}" torchx==0.7.0 pyarrow tensorboard pyyaml matplotlib
# serving: the HTTP server and the Redis client of the timeline store
"${pip[@]}" fastapi uvicorn redis
