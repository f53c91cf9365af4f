# The two commands of the README are `make demo` and `make test`; both install first.
SHELL := /bin/bash
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WORKDIR ?= runs
SLURM_CONF := $(CURDIR)/.cache/slurm/etc/slurm.conf
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_OFFLINE := 1
export DS_ACCELERATOR ?= cpu
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: install demo test test-slow bench lint clean slurm-up slurm-down

install: $(STAMP)

# Reinstalls only when the packaging files change: a second `make` run installs nothing.
$(STAMP): pyproject.toml tools/fix_torchvision_cpu.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	# Pin the torch just installed so that no dependency swaps it for another build.
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/constraints.txt
	$(BIN)/python -m pip install -q -c $(VENV)/constraints.txt -e ".[dev]"
	$(BIN)/python tools/fix_torchvision_cpu.py
	$(BIN)/python -c "import timm, torchvision, deepspeed, mlflow, submitit, webdataset, pycocotools"
	touch $(STAMP)

demo: install
	$(BIN)/detrforge demo --workdir $(WORKDIR)

# CI's command: lint, then the fast suite, including the tests on a real two-node SLURM
# cluster that launch/slurm/cluster.sh installs (Debian packages, needs root) and starts here.
# Off CI a machine without root skips the `slurm` tests with a reason; on CI it must start.
test: install
	$(BIN)/python -m ruff check .
	@command -v chromium >/dev/null || apt-get install -y chromium >/dev/null \
		|| echo "chromium not installed (needs root): the MLflow UI browser test skips"
	@if [ "$$CI" = "true" ]; then launch/slurm/cluster.sh up --nodes 2; \
	else launch/slurm/cluster.sh up --nodes 2 || echo "SLURM test cluster not started: slurm tests skip"; fi
	SLURM_CONF=$(SLURM_CONF) $(BIN)/python -m pytest -m "not slow and not gpu" tests; \
	rc=$$?; launch/slurm/cluster.sh down >/dev/null 2>&1; exit $$rc

test-slow: install
	$(BIN)/python -m pytest -m "slow" tests

bench: install
	$(BIN)/python -m pip install -q -c $(VENV)/constraints.txt -e ".[dev,bench]"
	mkdir -p benchmarks/results
	for b in benchmarks/*.py; do $(BIN)/python $$b --out benchmarks/results || exit 1; done

lint: install
	$(BIN)/python -m ruff check .
	$(BIN)/python -m ruff format --check .

clean:
	rm -rf $(VENV) .cache runs
