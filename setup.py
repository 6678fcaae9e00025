"""LoopFM: foundation-model knowledge to small vertical models, on TorchRec.

Install with `make install` (or scripts/install.sh): the order matters and is not expressible
here (torch CPU wheel first, fbgemm-gpu-cpu matched to it, torchrec without its deps).
"""
import shutil
import subprocess

from setuptools import find_packages, setup


def _has_nvidia_driver() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi"], capture_output=True).returncode == 0


FBGEMM = "fbgemm-gpu==1.8.0" if _has_nvidia_driver() else "fbgemm-gpu-cpu==1.8.0"

setup(
    name="loopfm",
    version="0.1.0",
    description="LoopFM: compressed foundation-model embeddings as sequence features for vertical models",
    python_requires=">=3.10",
    packages=find_packages(include=["loopfm", "loopfm.*", "kernels", "kernels.*",
                                    "torchx_components", "torchx_components.*"]),
    include_package_data=True,
    install_requires=[
        "torch==2.13.0",
        FBGEMM,
        # torchrec 1.8.0 itself is installed with --no-deps by scripts/install.sh.
        "torchmetrics==1.0.3",
        "torchx==0.7.0",
        "pyarrow",
        "tensorboard",
        "pyyaml",
        "tqdm",
        "numpy",
        "matplotlib",
        "fastapi",  # loopfm serve
        "uvicorn",
        "redis",  # the Redis timeline store's client
    ],
    extras_require={
        "test": ["pytest", "pytest-timeout", "hypothesis", "triton==3.6.0", "scikit-learn"],
        "k8s": ["kubernetes<37"],  # 37 needs urllib3>=2.8; torchx 0.7.0 pins urllib3<1.27
        "bench": ["duckdb"],
    },
    entry_points={"console_scripts": ["loopfm = loopfm.cli:main"]},
)
