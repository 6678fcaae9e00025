# The two commands of the README, plus the benchmarks. Both are idempotent: the venv is made and
# filled once (scripts/install.sh, the one place that knows the install order) and reinstalled
# only when setup.py or the install script change.
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_DIR ?= runs/quickstart
CONFIG ?= configs/quickstart.yaml

.PHONY: run test bench gpu-check install install-test clean

run: $(VENV)/.installed
	$(PY) -m loopfm.cli run $(CONFIG) --out $(RUN_DIR)

test: $(VENV)/.installed-test
	$(PY) -m pytest

bench: $(VENV)/.installed-test
	$(PY) benchmarks/prepare_bench.py

# On a CUDA machine with only torch and triton: no venv, the machine's own python3 (README "GPU check").
GPU_CHECK_OUT ?= runs/gpu_check
gpu-check:
	bash benchmarks/gpu_check.sh $(GPU_CHECK_OUT)

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

$(VENV)/.installed: setup.py scripts/install.sh
	bash scripts/install.sh $(VENV)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	bash scripts/install.sh $(VENV) test
	touch $@

clean:
	rm -rf $(VENV) runs *.egg-info
