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
