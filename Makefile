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

# Tests + AOT compile-check on side venvs (torch 2.11 + triton 3.6, and the pinned stack), as a
# table; downloads CPU torch wheels into .compat/ (tools/compat.py says what each stack is).
compat:
	$(PYTHON) tools/compat.py

clean:
	rm -rf $(VENV) build dist *.egg-info vit_fast/*.so vit_fast/_C_build.json
