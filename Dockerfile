# The image cluster jobs run (TorchX kubernetes / local_docker, `loopfm launch --image`): LoopFM
# installed by scripts/install.sh's CUDA branch (torch 2.13 for CUDA, fbgemm-gpu 1.8.0, torchrec
# 1.8.0, triton 3.6.0) into /opt/venv, the checkout (configs included) in the WORKDIR.
#
#   docker build -t REGISTRY/loopfm:TAG .        # from the repository root; see README "Docker image"
#   docker push REGISTRY/loopfm:TAG
#
# TorchX's workspace build uses this image as its base and copies the local checkout over
# /workspace (the package is installed editable, so the copied code is what runs).
ARG BASE_IMAGE=pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

# The build has no GPU, so the install script is told the target instead of detecting it.
ARG LOOPFM_TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV LOOPFM_DEVICE=cuda \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH

WORKDIR /workspace
# Dependencies first (their layer is reused while only the code changes).
COPY setup.py ./
COPY scripts/install.sh scripts/
COPY loopfm/__init__.py loopfm/
COPY kernels/__init__.py kernels/
COPY torchx_components/__init__.py torchx_components/
RUN PYTHON=python3 LOOPFM_TORCH_INDEX=${LOOPFM_TORCH_INDEX} bash scripts/install.sh /opt/venv \
    && rm -rf /root/.cache/pip
COPY . .
# torchrun and `python -m loopfm.cli` come from /opt/venv; check the stack imports at build time
# (fbgemm-gpu loads without a driver for the import; kernels need a GPU only when they launch).
RUN python -c "import torch, triton, torchrec, fbgemm_gpu, torchx, loopfm.cli; print('torch', torch.__version__)"
