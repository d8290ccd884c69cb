# Two commands do all set-up on a fresh machine with python3 and a C++ compiler:
#   make bench   build .venv if missing, install, run the CPU benchmark table
#   make test    build .venv if missing, install, run the tests (what CI runs)
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.vit_fast-installed
SOURCES := setup.py requirements-dev.txt $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu)

.PHONY: test bench install clean

install: $(STAMP)

$(VPY):
	$(PYTHON) -m venv $(VENV)

# Re-runs only when the requirements, setup.py or the extension sources change.
$(STAMP): $(VPY) $(SOURCES)
	$(VPY) -m pip install -q -r requirements-dev.txt 2>&1 | grep -v "is ignored" || true
	$(VPY) -c "import torch, timm, pytest" 
	$(VPY) -m pip install -q --no-build-isolation -e . 2>&1 | grep -v "is ignored" || true
	$(VPY) -c "import vit_fast"
	touch $(STAMP)

# TRITON_INTERPRET=1 lets the triton backend run its real kernels on CPU tensors in the tests.
test: $(STAMP)
	TRITON_INTERPRET=1 $(VPY) -m pytest tests -q -p no:cacheprovider --durations=15

bench: $(STAMP)
	$(VPY) -m vit_fast.bench

clean:
	rm -rf $(VENV) build *.egg-info vit_fast/*.so

# The GPU acceptance kit (README "On a GPU"). Runs with the machine's own $(PYTHON), torch and timm,
# no .venv: gpu-check installs vit_fast itself (pip -e, the extension built for the GPU's arch).
# make gpu-check [GPU_OUT=dir] [GPU_CHECK_ARGS=--quick]
GPU_OUT ?= benchmarks/results/$(shell date -u +%Y-%m-%d)-$(shell nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | sed 's/^NVIDIA //; s/[^A-Za-z0-9]\{1,\}/-/g; s/-$$//' | grep . || echo no-gpu)
.PHONY: gpu-check
gpu-check:
	@$(PYTHON) -c "import timm" 2>/dev/null || { echo "gpu-check: $(PYTHON) cannot import timm (vit_fast needs it). On a networked machine: pip download $$(grep '^timm==' requirements-dev.txt) --no-deps -d wheels/ ; carry wheels/ here; then $(PYTHON) -m pip install --no-deps wheels/timm-*.whl"; exit 2; }
	$(PYTHON) -m vit_fast.bench gpu-check --out $(GPU_OUT) $(GPU_CHECK_ARGS)
