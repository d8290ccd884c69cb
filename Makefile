# Two commands do all set-up on a fresh machine with python3 and a C++ compiler:
#   make bench   build .venv if missing, install, run the CPU benchmark table
#   make test    build .venv if missing, install, run the tests (what CI runs)
# bash with pipefail: a pip failure is not hidden by the grep that filters its output.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.vit_fast-installed
SOURCES := setup.py pyproject.toml requirements-dev.txt $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu)

.PHONY: test bench install clean compat

install: $(STAMP)

$(VPY):
	$(PYTHON) -m venv $(VENV)

# Re-runs only when the requirements, setup.py or the extension sources change. The venv's bin on
# PATH puts its ninja there for the extension build (parallel, MAX_JOBS or all cores).
# VIT_FAST_REQUIRE_EXT=1 (CI) makes a failed extension build fail the install.
$(STAMP): $(VPY) $(SOURCES)
	$(VPY) -m pip install -q -r requirements-dev.txt 2>&1 | { grep -v "is ignored" || true; }
	$(VPY) -c "import torch, timm, pytest"
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VPY) -m pip install -q --no-build-isolation -e . 2>&1 \
		| { grep -v "is ignored" || true; }
	$(VPY) -c "import vit_fast"
	if [ "$${VIT_FAST_REQUIRE_EXT:-0}" = 1 ]; then $(VPY) -c "import vit_fast._C"; fi
	touch $(STAMP)

# TRITON_INTERPRET=1 lets the triton backend run its real kernels on CPU tensors in the tests.
test: $(STAMP)
	TRITON_INTERPRET=1 $(VPY) -m pytest tests -q -p no:cacheprovider --durations=15

bench: $(STAMP)
	$(VPY) -m vit_fast.bench

# Tests + AOT compile-check on side venvs, as a table: the oldest supported stack (torch 2.11 +
# triton 3.6) and the newest (torch 2.15 + triton 3.9); COMPAT_STACKS=floor,newest,pinned picks.
# Venvs live in $$VIT_FAST_COMPAT_DIR (default ~/.cache/vit_fast-compat), outside the repo.
# make compat [COMPAT_ARGS='--pytest-args "-k attention"']
compat:
	$(PYTHON) tools/compat.py $(COMPAT_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info vit_fast/*.so vit_fast/_C_build.json

# The GPU acceptance kit (README "On a GPU"). Runs with the machine's own $(PYTHON), torch and timm,
# no .venv: gpu-check installs vit_fast itself (pip -e, the extension built for the GPU's arch).
# make gpu-check [GPU_OUT=dir] [GPU_CHECK_ARGS=--quick]
GPU_OUT ?= benchmarks/results/$(shell date -u +%Y-%m-%d)-$(shell nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | sed 's/^NVIDIA //; s/[^A-Za-z0-9]\{1,\}/-/g; s/-$$//' | grep . || echo no-gpu)
.PHONY: gpu-check
gpu-check:
	@$(PYTHON) -c "import timm" 2>/dev/null || { echo "gpu-check: $(PYTHON) cannot import timm (vit_fast needs it). On a networked machine: pip download $$(grep '^timm==' requirements-dev.txt) --no-deps -d wheels/ ; carry wheels/ here; then $(PYTHON) -m pip install --no-deps wheels/timm-*.whl"; exit 2; }
	$(PYTHON) -m vit_fast.bench gpu-check --out $(GPU_OUT) $(GPU_CHECK_ARGS)
