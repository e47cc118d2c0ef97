# Two commands for a fresh machine: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

.PHONY: env demo test test-fast fuzz bench clean gpu-check gpu-wheels

env: $(STAMP)

# Re-run only when the pins change. torch goes first so nothing can pull a CUDA build.
$(STAMP): requirements.txt constraints.txt pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	DS_BUILD_OPS=0 $(PIP) install -q -c constraints.txt -r requirements.txt
	$(PIP) install -q -c constraints.txt --no-deps -e .
	$(PIP) install -q -c constraints.txt --no-deps vtx==1.1.0 einops rich==15.0.0
	$(PIP) install -q -c constraints.txt hypothesis
	@touch $(STAMP)

demo: env
	$(VENV)/bin/hyena-glt demo

# Two workers (pytest-xdist): a test process runs torch on one thread (tests/conftest.py), so one
# worker left a core idle between launches. --dist loadfile keeps each file on one worker, so a
# file's shared launches and fixtures are made once (network-namespace hosts are named by their
# worker's PID, and apt installs take a lock: tests/support/).
test: env
	HYENA_GLT_REQUIRE_VTX=1 $(PY) -m pytest -q -n 2 --dist loadfile

# The inner loop: every test that starts no other process and takes seconds (< 3 min in all).
test-fast: env
	$(PY) -m pytest -q -m "not distributed and not slow"

# The fuzz tests of every input parser (tests/fuzz/, docs/where-to-change.md "Fuzzing") with far
# more examples than `make test` runs (25-60 per test there, derandomized, ~15 s in all):
# HYPOTHESIS_PROFILE=fuzz, FUZZ_EXAMPLES (default 2000) random examples per test.
fuzz: env
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q tests/fuzz -p no:cacheprovider --timeout=3600

bench: env
	$(VENV)/bin/hyena-glt bench ops

# The GPU check (docs/performance.md, "GPU check"): CUDA vs CPU forward, 1B bf16 training
# tokens/s, MFU, peak memory, Hyena vs attention-only. Without CUDA: its CPU fallback, exit 0.
gpu-check: env
	$(VENV)/bin/hyena-glt bench gpu

# Wheels for the GPU machine, which reaches no registry: carry gpu_wheels/ there and run
# `bash launch/cluster/gpu_check.sh` (installs them and runs the check in one command).
gpu-wheels: env
	PYTHON=$(PY) DS_BUILD_OPS=0 bash launch/cluster/gpu_check.sh wheels

clean:
	rm -rf $(VENV) runs .pytest_cache
